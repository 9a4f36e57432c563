// hexfast view: a deep-zoom H&E with the virtual CODEX markers and MICA's attention over it.
// Everything is positioned in level-0 pixels of the slide, the unit of the h5: a tile (x, y) of size t
// covers [x, x + t) x [y, y + t); the marker overlay's cell (i, j) covers [j * cell, (j + 1) * cell) from (0, 0).
"use strict";

const $ = (id) => document.getElementById(id);
const canvas = $("view");
const ctx = canvas.getContext("2d");
const state = { info: null, cx: 0, cy: 0, scale: 1, layer: 0, opacity: 0.7, cmap: "fade", luts: {},
                overlays: new Map(), attention: null, tiles: new Map(), pending: 0, hoverKey: null,
                hovered: null, allValues: false };
const TOP_VALUES = 12;  // the tile's markers shown at first, highest (within each marker's range) first
const api = { ready: false };  // for the browser test and the console: window.hexfast
window.hexfast = api;

function toScreen(x, y) {
  return [(x - state.cx) * state.scale + canvas.clientWidth / 2, (y - state.cy) * state.scale + canvas.clientHeight / 2];
}
function toLevel0(sx, sy) {
  return [(sx - canvas.clientWidth / 2) / state.scale + state.cx, (sy - canvas.clientHeight / 2) / state.scale + state.cy];
}

function colour(unit) {  // [r, g, b, alpha 0..1] from the chosen colormap
  const i = Math.max(0, Math.min(255, Math.round((Number.isFinite(unit) ? Math.max(0, Math.min(1, unit)) : 0) * 255)));
  return state.luts[state.cmap][i];
}

// ---------------------------------------------------------------- deep zoom

function dzLevelFor(scale) {
  const dz = state.info.deepzoom, top = dz.levels - 1;
  const k = scale >= 1 ? 0 : Math.floor(Math.log2(1 / scale));
  return Math.max(0, top - k);
}

function tileImage(level, col, row) {
  const key = `${level}/${col}_${row}`;
  let entry = state.tiles.get(key);
  if (!entry) {
    const img = new Image();
    entry = { img, loaded: false, failed: false };
    state.pending += 1;
    img.onload = () => { entry.loaded = true; state.pending -= 1; schedule(); };
    img.onerror = () => { entry.failed = true; state.pending -= 1; schedule(); };
    img.src = `/dz/${key}.jpg`;
    state.tiles.set(key, entry);
    if (state.tiles.size > 800) {  // forget the oldest loaded tiles
      for (const [k, e] of state.tiles) { if (e.loaded) { state.tiles.delete(k); } if (state.tiles.size <= 600) break; }
    }
  }
  return entry;
}

function drawLevel(level, request) {
  const dz = state.info.deepzoom, [wl, hl] = dz.dimensions[level];
  const fx = state.info.width / wl, fy = state.info.height / hl, t = dz.tile;
  const [x0, y0] = toLevel0(0, 0), [x1, y1] = toLevel0(canvas.clientWidth, canvas.clientHeight);
  const c0 = Math.max(0, Math.floor(x0 / fx / t)), c1 = Math.min(Math.ceil(wl / t) - 1, Math.floor(x1 / fx / t));
  const r0 = Math.max(0, Math.floor(y0 / fy / t)), r1 = Math.min(Math.ceil(hl / t) - 1, Math.floor(y1 / fy / t));
  let complete = true;
  for (let r = r0; r <= r1; r++) {
    for (let c = c0; c <= c1; c++) {
      const entry = request ? tileImage(level, c, r) : state.tiles.get(`${level}/${c}_${r}`);
      if (!entry || !entry.loaded) { complete = false; continue; }
      const [sx, sy] = toScreen(c * t * fx, r * t * fy);
      const [ex, ey] = toScreen(Math.min((c + 1) * t, wl) * fx, Math.min((r + 1) * t, hl) * fy);
      ctx.drawImage(entry.img, sx, sy, ex - sx, ey - sy);
    }
  }
  return complete;
}

// ---------------------------------------------------------------- overlays

function overlayImage(channel) {
  const key = `${channel}-${state.cmap}`;
  let entry = state.overlays.get(key);
  if (!entry) {
    const img = new Image();
    entry = { img, loaded: false };
    img.onload = () => { entry.loaded = true; schedule(); };
    img.src = `/overlay/${channel}.png?cmap=${state.cmap}`;
    state.overlays.set(key, entry);
  }
  return entry;
}

function drawMarker(channel) {
  const entry = overlayImage(channel);
  if (!entry.loaded) return false;
  const cell = state.info.cell, [gh, gw] = state.info.grid;
  const [x0, y0] = toLevel0(0, 0), [x1, y1] = toLevel0(canvas.clientWidth, canvas.clientHeight);
  const j0 = Math.max(0, Math.floor(x0 / cell)), j1 = Math.min(gw, Math.ceil(x1 / cell));
  const i0 = Math.max(0, Math.floor(y0 / cell)), i1 = Math.min(gh, Math.ceil(y1 / cell));
  if (j1 <= j0 || i1 <= i0) return true;
  const [sx, sy] = toScreen(j0 * cell, i0 * cell), [ex, ey] = toScreen(j1 * cell, i1 * cell);
  ctx.save();
  ctx.imageSmoothingEnabled = false;  // one cell, one colour: the value of its tile
  ctx.globalAlpha = state.opacity;
  ctx.drawImage(entry.img, j0, i0, j1 - j0, i1 - i0, sx, sy, ex - sx, ey - sy);
  ctx.restore();
  return true;
}

function drawAttention() {
  const a = state.attention;
  if (!a) return false;
  const m = state.info.mica, span = m.hi - m.lo || 1, size = a.size;
  const [x0, y0] = toLevel0(0, 0), [x1, y1] = toLevel0(canvas.clientWidth, canvas.clientHeight);
  const W = state.info.width, H = state.info.height;
  ctx.save();
  for (let k = 0; k < a.x.length; k++) {
    const x = a.x[k], y = a.y[k];
    if (x + size < x0 || y + size < y0 || x > x1 || y > y1) continue;
    const [r, g, b, alpha] = colour((a.a[k] - m.lo) / span);
    ctx.globalAlpha = state.opacity * alpha;
    ctx.fillStyle = `rgb(${r},${g},${b})`;
    const [sx, sy] = toScreen(x, y);
    // CLAM pads patches at the slide's edge: draw only the part on the slide
    ctx.fillRect(sx, sy, (Math.min(x + size, W) - x) * state.scale, (Math.min(y + size, H) - y) * state.scale);
  }
  ctx.restore();
  return true;
}

function drawRegion() {
  const region = state.info.region;
  if (!region) return;
  const [x, y, w, h] = region.bounds_level0, [sx, sy] = toScreen(x, y);
  ctx.save();
  ctx.setLineDash([8, 6]);
  ctx.strokeStyle = "#0af";
  ctx.lineWidth = 2;
  ctx.strokeRect(sx, sy, w * state.scale, h * state.scale);
  ctx.restore();
}

// ---------------------------------------------------------------- drawing

let frame = 0;
function schedule() { if (!frame) frame = requestAnimationFrame(draw); }

function draw() {
  frame = 0;
  const dpr = window.devicePixelRatio || 1, w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, w, h);
  const target = dzLevelFor(state.scale);
  drawLevel(Math.min(state.coarse, target), true);  // a coarse level first: never a blank screen
  const sharp = drawLevel(target, true);
  let overlay = true;
  if (state.layer >= 0) overlay = drawMarker(state.layer);
  else if (state.layer === -1) overlay = drawAttention();
  drawRegion();
  drawHovered();
  drawScaleBar();
  api.ready = sharp && overlay && state.pending === 0;
}

function drawHovered() {  // the tile under the pointer, outlined: what the values panel describes
  const t = state.hovered;
  if (!t || !state.outline) return;
  const [sx, sy] = toScreen(t.x, t.y), side = t.size * state.scale;
  ctx.save();
  ctx.lineWidth = 3;
  ctx.strokeStyle = "#000";
  ctx.strokeRect(sx, sy, side, side);
  ctx.lineWidth = 1.5;
  ctx.strokeStyle = "#fff";
  ctx.strokeRect(sx, sy, side, side);
  ctx.restore();
}

function drawScaleBar() {
  const umPerPx = state.info.mpp / state.scale;
  const raw = 150 * umPerPx, p = Math.pow(10, Math.floor(Math.log10(raw)));
  const nice = [1, 2, 5, 10].map((k) => k * p).filter((v) => v <= raw).pop() || p;
  $("scaleline").style.width = `${nice / umPerPx}px`;
  $("scaletext").textContent = nice >= 1000 ? `${nice / 1000} mm` : `${nice} µm`;
}

function legend() {
  const bar = $("bar"), g = bar.getContext("2d");
  g.fillStyle = "#fff";
  g.fillRect(0, 0, bar.width, bar.height);
  for (let x = 0; x < bar.width; x++) {
    const [r, gr, b, alpha] = colour(x / (bar.width - 1));
    g.globalAlpha = alpha;
    g.fillStyle = `rgb(${r},${gr},${b})`;
    g.fillRect(x, 0, 1, bar.height);
  }
  g.globalAlpha = 1;
  const range = state.layer >= 0 ? state.info.markers[state.layer] : state.layer === -1 ? state.info.mica : null;
  $("legend").hidden = !range;
  if (range) {
    $("lo").textContent = fmt(range.lo);
    $("hi").textContent = fmt(range.hi);
  }
}

function fmt(v) { return Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(3) : v.toPrecision(4); }

// ---------------------------------------------------------------- hover

async function hover(sx, sy) {
  const [x, y] = toLevel0(sx, sy), cell = state.info.cell;
  const key = `${Math.floor(x / cell)},${Math.floor(y / cell)}`;
  if (key === state.hoverKey) return;
  state.hoverKey = key;
  const tile = await (await fetch(`/api/tile?x=${x}&y=${y}`)).json();
  if (state.hoverKey !== key) return;  // the pointer moved on while this was in flight
  state.hovered = tile;
  state.outline = true;
  state.hoverAt = [x, y];
  showValues();
  schedule();
}

// The values panel: where the pointer is, then the tile's markers, highest first within each marker's own
// range over the slide (the overlay's colour scale), the overlay's marker marked; the top ones unless all.
function showValues() {
  const panel = $("hover"), tile = state.hovered, [x, y] = state.hoverAt || [0, 0];
  panel.textContent = "";
  const add = (text, cls) => { const div = document.createElement("div"); div.textContent = text; if (cls) div.className = cls; panel.append(div); return div; };
  add(`level-0 (${Math.round(x)}, ${Math.round(y)})`);
  const patch = attentionAt(x, y);
  if (patch !== null) add(`MICA patch attention ${fmt(patch)}`);
  if (!tile) {
    add("no tile here");
  } else {
    add(`tile ${tile.index}: (${tile.x}, ${tile.y}), ${tile.size} px`);
    if (tile.mica_attention !== undefined) add(`MICA attention ${fmt(tile.mica_attention)}`);
    add("marker           value   of range");
    const ranked = state.info.markers.map((m, i) => {
      const v = tile.values[m.name];
      return { i, name: m.name, v, unit: (v - m.lo) / ((m.hi - m.lo) || 1) };
    }).sort((a, b) => b.unit - a.unit);
    const shown = state.allValues ? ranked : ranked.slice(0, TOP_VALUES);
    for (const r of shown) {
      add(`${r.name.padEnd(16)} ${fmt(r.v).padStart(7)} ${String(Math.round(100 * r.unit)).padStart(5)}%`,
          r.i === state.layer ? "current" : "");
    }
    if (ranked.length > TOP_VALUES) {
      const more = add(state.allValues ? "show the top ones only" : `+ ${ranked.length - TOP_VALUES} more`, "more");
      more.onclick = () => { state.allValues = !state.allValues; showValues(); };
    }
  }
  panel.dataset.tile = JSON.stringify(tile);
  panel.dataset.key = state.hoverKey || "";
}

function attentionAt(x, y) {
  const a = state.attention;
  if (!a) return null;
  for (let k = 0; k < a.x.length; k++) {
    if (x >= a.x[k] && x < a.x[k] + a.size && y >= a.y[k] && y < a.y[k] + a.size) return a.a[k];
  }
  return null;
}

// ---------------------------------------------------------------- interaction

function zoomAt(factor, sx, sy) {
  const [x, y] = toLevel0(sx, sy);
  state.scale = Math.max(state.minScale / 2, Math.min(8, state.scale * factor));
  const [nx, ny] = toLevel0(sx, sy);
  state.cx += x - nx;
  state.cy += y - ny;
  schedule();
}

function fit() {
  const w = canvas.clientWidth, h = canvas.clientHeight;
  state.scale = state.minScale = Math.min(w / state.info.width, h / state.info.height) * 0.95;
  state.cx = state.info.width / 2;
  state.cy = state.info.height / 2;
  schedule();
}

function wire() {
  let drag = null;
  canvas.addEventListener("mousedown", (e) => { drag = [e.clientX, e.clientY]; canvas.classList.add("dragging"); });
  window.addEventListener("mouseup", () => { drag = null; canvas.classList.remove("dragging"); });
  canvas.addEventListener("mousemove", (e) => {
    if (drag) {
      state.cx -= (e.clientX - drag[0]) / state.scale;
      state.cy -= (e.clientY - drag[1]) / state.scale;
      drag = [e.clientX, e.clientY];
      schedule();
    }
    const r = canvas.getBoundingClientRect();
    hover(e.clientX - r.left, e.clientY - r.top);
  });
  canvas.addEventListener("wheel", (e) => {
    e.preventDefault();
    const r = canvas.getBoundingClientRect();
    zoomAt(Math.exp(-e.deltaY * 0.0015), e.clientX - r.left, e.clientY - r.top);
  }, { passive: false });
  $("zoomin").onclick = () => zoomAt(1.5, canvas.clientWidth / 2, canvas.clientHeight / 2);
  $("zoomout").onclick = () => zoomAt(1 / 1.5, canvas.clientWidth / 2, canvas.clientHeight / 2);
  $("fit").onclick = fit;
  $("opacity").oninput = (e) => { state.opacity = Number(e.target.value); schedule(); };
  $("layer").onchange = (e) => { setLayer(Number(e.target.value)); };
  $("cmap").onchange = (e) => { state.cmap = e.target.value; legend(); schedule(); };
  $("values").onclick = () => { $("hover").hidden = !$("hover").hidden; };
  window.addEventListener("keydown", (e) => { if (e.key === "v" && e.target === document.body) $("values").onclick(); });
  // off the canvas (onto the values panel, say) the outline goes; the panel keeps the tile
  canvas.addEventListener("mouseleave", () => { state.outline = false; state.hoverKey = null; schedule(); });
  window.addEventListener("resize", schedule);
}

function setLayer(layer) {
  state.layer = layer;
  $("layer").value = String(layer);
  legend();
  schedule();
}

// ---------------------------------------------------------------- start

async function start() {
  const info = await (await fetch("/api/info")).json();
  state.info = info;
  for (const [name, hex] of Object.entries(info.colormaps)) {
    state.luts[name] = hex.match(/.{8}/g).map((h) => [0, 2, 4, 6].map((i) => parseInt(h.slice(i, i + 2), 16)))
      .map(([r, g, b, a]) => [r, g, b, a / 255]);
  }
  const dz = info.deepzoom;
  state.coarse = dz.dimensions.findIndex(([w, h]) => Math.max(w, h) >= 512);
  if (state.coarse < 0) state.coarse = dz.levels - 1;
  document.title = `hexfast view: ${info.slide}`;
  $("title").textContent = `${info.slide}: ${info.tiles} tiles` + (info.region ? " (region)" : "");
  if (info.demo) {
    const banner = $("banner");
    banner.hidden = false;
    banner.textContent = info.warning || "DEMO MODEL: untrained random weights; not a prediction";
  }
  const select = $("layer");
  const none = new Option("none", "-2");
  select.add(none);
  info.markers.forEach((m, i) => select.add(new Option(m.name, String(i))));
  if (info.mica) {
    select.add(new Option(`MICA attention${info.mica.partial ? " (region)" : ""}`, "-1"));
    state.attention = await (await fetch("/api/attention")).json();
  }
  const first = info.markers.findIndex((m) => m.name === "Pan-Cytokeratin");
  wire();
  fit();
  setLayer(first >= 0 ? first : 0);
  Object.assign(api, { toScreen, toLevel0, setLayer, info,
    setColormap: (name) => { state.cmap = name; $("cmap").value = name; legend(); schedule(); },
    setOpacity: (v) => { state.opacity = v; $("opacity").value = String(v); schedule(); },
    pixel: (sx, sy) => { const d = window.devicePixelRatio || 1; return Array.from(ctx.getImageData(Math.round(sx * d), Math.round(sy * d), 1, 1).data); },
    view: (cx, cy, scale) => { state.cx = cx; state.cy = cy; state.scale = scale; schedule(); } });
}

start();
