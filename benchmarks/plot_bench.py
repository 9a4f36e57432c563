"""Plots for RESULTS.md from the JSON the bench commands write (matplotlib: the [bench] extra).

    hexfast bench engine --batch-sizes 1,2,4,8,16,32,64 --json tiny.json
    python benchmarks/plot_bench.py throughput tiny.json [full.json ...] -o benchmarks/throughput_cpu.png
    hexfast bench e2e SLIDE --json e2e.json
    python benchmarks/plot_bench.py timeline e2e.json -o benchmarks/timeline_cpu.png

throughput: tiles/s against batch size, one panel per model (their scales differ by 100×),
one line per backend / precision, with CPU ms per tile beside each point.
timeline: one slide through Scorer: the stages in order (top lane), then every HEX engine run
(bottom lane; the gaps are the engine waiting for tiles or for Python between batches).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STAGE_COLOURS = {"tissue+grid": "#8c564b", "stream start": "#e377c2", "stream+hex": "#1f77b4",
                 "virtual codex": "#bcbd22", "codex encoder+mica": "#ff7f0e", "outputs": "#2ca02c"}


def _label(row: dict) -> str:
    model = Path(row["model"]).name
    return f"{row['backend']} {row['precision']}" + (f" ({model})" if model else "")


def throughput(files: list[Path], out: Path, title: str | None = None) -> None:
    """Top row: engine tiles/s (wall clock); bottom row: CPU ms per tile (process CPU time, which
    other load on a shared machine barely moves). One column per JSON file (model)."""
    panels = []
    for f in files:
        rows = [r for r in json.loads(Path(f).read_text()) if "error" not in r]
        if rows:
            panels.append(rows)
    fig, axes = plt.subplots(2, len(panels), figsize=(5.4 * len(panels), 6.6), squeeze=False, sharex="col")
    for col, rows in enumerate(panels):
        lines: dict[str, list[dict]] = {}
        for r in rows:
            lines.setdefault(f"{r['backend']} {r['precision']}", []).append(r)
        top, bottom = axes[0][col], axes[1][col]
        for name, rs in lines.items():
            rs = sorted(rs, key=lambda r: r["batch"])
            xs = [r["batch"] for r in rs]
            top.plot(xs, [r["tiles_per_s"] for r in rs], marker="o", label=name)
            bottom.plot(xs, [r["cpu_ms_per_tile"] for r in rs], marker="s", label=name)
            for r in rs:
                top.annotate(f"{r['tiles_per_s']:.3g}", (r["batch"], r["tiles_per_s"]), textcoords="offset points",
                             xytext=(0, 6), ha="center", fontsize=7)
                bottom.annotate(f"{r['cpu_ms_per_tile']:.4g}", (r["batch"], r["cpu_ms_per_tile"]),
                                textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
        batches = sorted({r["batch"] for r in rows})
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xticks(batches)
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_xlim(batches[0] / 1.4, batches[-1] * 1.4)
            ax.grid(alpha=0.3)
        top.set_ylim(0, max(r["tiles_per_s"] for r in rows) * 1.25)
        bottom.set_ylim(0, max(r["cpu_ms_per_tile"] for r in rows) * 1.25)
        top.set_ylabel("tiles/s (engine alone, wall)")
        bottom.set_ylabel("CPU ms per tile (all threads)")
        bottom.set_xlabel("batch size (tiles)")
        top.legend(fontsize=8, loc="lower right")
        demo = " (demo weights)" if rows[0].get("demo") else ""
        name = rows[0].get("encoder") or Path(rows[0]["model"]).name
        top.set_title(f"{name}{demo}, {rows[0]['tile']} px tiles", fontsize=9)
    fig.suptitle(title or f"HEX engine throughput — {panels[0][0]['describe'].split(', ')[-1]}", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    print(f"wrote {out}")


def timeline(file: Path, out: Path, title: str | None = None) -> None:
    """Top: the Scorer's stages in order, and every HEX engine run (gaps: the engine waiting for tiles
    or for Python between batches). Bottom: each batch's tiles/s against the engine measured alone
    just before and just after the slide (dashed)."""
    r = json.loads(Path(file).read_text())
    stages = [(k, v) for k, v in r["seconds"].items() if "within" not in k]
    fig, (ax, rate) = plt.subplots(2, 1, figsize=(10, 5.6), sharex=True, gridspec_kw={"height_ratios": [1.2, 1]})
    t = 0.0
    for name, seconds in stages:
        ax.barh(1, seconds, left=t, height=0.6, color=STAGE_COLOURS.get(name, "#7f7f7f"), edgecolor="white",
                label=f"{name} {seconds:.2f} s")
        t += seconds
    for i, b in enumerate(r["trace"]):
        ax.barh(0, b["end"] - b["start"], left=b["start"], height=0.6, color="#1f77b4" if i else "#6baed6",
                edgecolor="white", linewidth=0.3)
    ax.set_yticks([0, 1], [f"HEX engine runs\n({len(r['trace'])} batches of ≤{r['batch_size']})", "Scorer stages"])
    end = max(t, r["trace"][-1]["end"] if r["trace"] else 0) * 1.01
    ax.set_xlim(0, end)
    ax.legend(fontsize=7.5, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False)

    if r["trace"]:
        mids = [(b["start"] + b["end"]) / 2 for b in r["trace"]]
        rates = [b["tiles"] / (b["end"] - b["start"]) for b in r["trace"]]
        rate.plot(mids, rates, marker="o", ms=3, lw=1, label="each batch in the slide")
    for key, style in (("engine_before", "--"), ("engine_after", ":")):
        m = r.get(key)
        if m:
            rate.axhline(m["tiles_per_s"], ls=style, color="#d62728", lw=1,
                         label=f"engine alone, {key.split('_')[1]} the slide: {m['tiles_per_s']:.3g} tiles/s")
    rate.set_ylim(0, max([*rates, *(r[k]["tiles_per_s"] for k in ("engine_before", "engine_after") if r.get(k))]) * 1.3
                  if r["trace"] else 1)
    rate.set_ylabel("tiles/s")
    rate.set_xlabel("seconds from Scorer.score()")
    rate.grid(alpha=0.3)
    rate.legend(fontsize=7.5, loc="lower right")

    def fmt(x):
        return f"{x:.2f}" if x is not None else "n/a"

    head = title or (f"{Path(r['slide']).name}: {r['tiles']} tiles of {r['tile_px']} px, {r['describe'].split(':')[0]} "
                     f"{r['precision']}, batch {r['batch_size']}, {r['e2e_seconds']:.1f} s")
    sub = (f"engine busy {100 * (r.get('engine_busy') or 0):.1f} % of stream+hex; e2e {r['e2e_tiles_per_s']:.3g} tiles/s "
           f"vs engine alone {r['engine_tiles_per_s']:.3g} (efficiency {fmt(r.get('pipeline_efficiency'))}, "
           f"load-robust {fmt(r.get('pipeline_efficiency_load_robust'))})")
    ax.set_title(f"{head}\n{sub}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    print(f"wrote {out}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=("throughput", "timeline"))
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("-o", "--out", type=Path, required=True)
    p.add_argument("--title")
    args = p.parse_args(argv)
    if args.kind == "throughput":
        throughput(args.files, args.out, args.title)
    else:
        timeline(args.files[0], args.out, args.title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
