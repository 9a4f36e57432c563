"""Loading official checkpoints into the hexfast_export models.

Local files only (.pth / .pt / .bin via torch.load(weights_only=True),
.safetensors via safetensors). Every load:

* unwraps a `model` / `module` / `state_dict` container and strips a leading
  `module.` (DataParallel / DDP);
* drops keys that are known to be unused at inference, by name (training-time
  FDS buffers, MUSK's text embedding and "B" experts, vision/language heads,
  logit_scale, mask tokens), and lists them in the report;
* refuses (`IncompleteCheckpointError`) a file that leaves any weight the
  forward uses uninitialised, naming the first few, and refuses a shape
  mismatch (`CheckpointError`);
* reports keys it did not recognise (`LoadReport.unexpected`) without failing:
  extra tensors cannot change the forward.

Entry points: `load_musk`, `load_hex` (full checkpoint, `--hex`),
`build_hex` (`--musk W --hex-heads C`, or `--hex H`), `load_dinov2`,
`load_mica`.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hexfast.errors import HexfastError

from .dinov2 import DINOV2_VITS14_REG, Dinov2Config, Dinov2Encoder, resize_pos_embed
from .hex_model import HexModel
from .mica import Mica, MicaConfig
from .musk import MUSK_LARGE_384, POSITION_OFFSET, MuskConfig, MuskVision

SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
CONTAINER_KEYS = ("model", "module", "state_dict")
SHOW = 5  # keys named in an error message

# Keys that official checkpoints carry but an image-only inference never reads.
MUSK_IGNORED = (
    r"(^|\.)text_embed\.",  # MUSK text token embedding
    r"\.B\.",  # multiway "B" (text) experts, incl. embed_positions.B
    r"(^|\.)vision_embed\.mask_token$",  # masked-image-modelling token
    r"(^|\.)vision_head\.",
    r"(^|\.)language_head\.",
    r"(^|\.)logit_scale$",
)
HEX_IGNORED = MUSK_IGNORED + (r"^FDS\.",)  # training-time feature distribution smoothing buffers
DINOV2_IGNORED = (r"^mask_token$", r"^head\.")


class CheckpointError(HexfastError):
    """A checkpoint that cannot be used; the message is one line naming the file."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class IncompleteCheckpointError(CheckpointError):
    """The checkpoint leaves weights the forward uses uninitialised."""

    def __init__(self, path: str | os.PathLike, missing: list[str]):
        self.missing = list(missing)
        shown = ", ".join(self.missing[:SHOW]) + (", …" if len(self.missing) > SHOW else "")
        super().__init__(path, f"{len(self.missing)} weight(s) the model uses are missing: {shown}")


@dataclass
class LoadReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # known-unused keys dropped by name
    unexpected: list[str] = field(default_factory=list)  # unknown keys, not used
    notes: list[str] = field(default_factory=list)  # conversions applied (prefix strip, resizes)

    def summary(self) -> str:
        parts = [f"{self.source}: {len(self.loaded)} tensors loaded"]
        if self.ignored:
            parts.append(f"{len(self.ignored)} known-unused ignored")
        if self.unexpected:
            shown = ", ".join(self.unexpected[:SHOW]) + (", …" if len(self.unexpected) > SHOW else "")
            parts.append(f"{len(self.unexpected)} unexpected ({shown})")
        parts.extend(self.notes)
        return "; ".join(parts)


# --------------------------------------------------------------------------- reading


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a local checkpoint file, unwrapped and with `module.` stripped."""
    text = os.fspath(path)
    if "://" in text or text.startswith("hf_hub:"):
        raise CheckpointError(text, "only local checkpoint files are accepted (download it first)")
    p = Path(text)
    if not p.is_file():
        raise CheckpointError(p, "no such file")
    suffix = p.suffix.lower()
    if suffix not in SUFFIXES:
        raise CheckpointError(p, f"unknown checkpoint type {suffix or '(none)'}; expected {', '.join(SUFFIXES)}")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(p), device="cpu")
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's text suggests weights_only=False: never pass that on
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if found is None:
            raise CheckpointError(p, "cannot be read as a weights-only checkpoint (not a torch checkpoint, or a "
                                     "damaged one)") from None
        raise CheckpointError(p, f"holds Python objects ({found.group(1)}) besides tensors, which would run code "
                                 "when loaded; hexfast reads weights only and refuses it: save just the state_dict "
                                 "(or convert it to .safetensors) on a machine where you trust the file") from None
    except Exception as exc:  # noqa: BLE001 - any reader failure becomes one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(p, f"cannot be read as a weights-only checkpoint ({first})") from None
    return _flatten(obj, p)


def _flatten(obj, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(path, f"holds a {type(obj).__name__}, not a state dict")
    for key in CONTAINER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(path, "holds no tensors")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


# --------------------------------------------------------------------------- matching


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(re.search(p, key) for p in patterns)


def assign(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str, *,
           ignored: Iterable[str] = (), optional: Iterable[str] = (), report: LoadReport | None = None) -> LoadReport:
    """Copy `tensors` into `model` by name.

    `ignored`: regexes of keys to drop as known-unused. `optional`: model keys
    the forward does not read (allowed to be missing). Raises
    IncompleteCheckpointError for missing used keys, CheckpointError for a
    shape mismatch.
    """
    report = report or LoadReport(source)
    ignored = tuple(ignored)
    own = model.state_dict()
    optional = set(optional)
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update(dict(model.named_buffers(remove_duplicate=False)))
    aliases: dict[int, list[str]] = {}  # one tensor reachable under several names (MICA 'shared')
    for key, t in targets.items():
        aliases.setdefault(id(t), []).append(key)
    missing = [k for k in own if k not in optional
               and not any(a in tensors for a in aliases.get(id(targets.get(k)), [k]))]
    if missing:
        raise IncompleteCheckpointError(source, missing)
    for key, value in tensors.items():
        if key in own:
            if tuple(value.shape) != tuple(own[key].shape):
                raise CheckpointError(source, f"{key} has shape {tuple(value.shape)}, "
                                              f"the model expects {tuple(own[key].shape)}")
        elif _matches(key, ignored):
            report.ignored.append(key)
        else:
            report.unexpected.append(key)
    done: dict[int, str] = {}
    with torch.no_grad():
        for key in own:
            if key not in tensors:
                continue
            target = targets[key]
            first = done.get(id(target))
            if first is not None:
                if not torch.equal(tensors[first], tensors[key]):
                    raise CheckpointError(source, f"{key} and {first} are one shared weight in this model "
                                                  "but differ in the checkpoint")
                continue
            target.copy_(tensors[key].to(target.dtype))
            done[id(target)] = key
            report.loaded.append(key)
    return report


def _strip(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in tensors.items()}


def _fit_musk_positions(tensors: dict[str, torch.Tensor], key: str, cfg: MuskConfig, report: LoadReport) -> None:
    """Resize a MUSK position table trained at another resolution, as MUSK's loader does
    (keep the first 3 rows — 2 offset rows + CLS —, bicubic align_corners=False on the patch grid)."""
    table = tensors.get(key)
    if table is None or table.shape[0] == cfg.num_positions:
        return
    extra = POSITION_OFFSET + 1
    n = table.shape[0] - extra
    m = int(round(n ** 0.5))
    if m * m != n:
        return  # let the shape check refuse it
    grid = table[extra:].reshape(1, m, m, -1).permute(0, 3, 1, 2).float()
    grid = torch.nn.functional.interpolate(grid, size=(cfg.grid, cfg.grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(cfg.num_patches, -1).to(table.dtype)
    tensors[key] = torch.cat((table[:extra], grid), dim=0)
    report.notes.append(f"MUSK positions resized {m}x{m} -> {cfg.grid}x{cfg.grid}")


# --------------------------------------------------------------------------- models


def load_musk(path: str | os.PathLike, cfg: MuskConfig = MUSK_LARGE_384) -> tuple[MuskVision, LoadReport]:
    """MUSK image encoder from a MUSK checkpoint (keys `beit3.*`, e.g. the published model.safetensors)."""
    tensors = read_state_dict(path)
    model = MuskVision(cfg)
    report = LoadReport(os.fspath(path))
    _fit_musk_positions(tensors, "beit3.encoder.embed_positions.A.weight", cfg, report)
    assign(model, tensors, os.fspath(path), ignored=MUSK_IGNORED, report=report)
    return model.eval(), report


def _is_head(key: str) -> bool:
    return key.startswith(("regression_head.", "regression_head1."))


def load_hex(path: str | os.PathLike, cfg: MuskConfig = MUSK_LARGE_384) -> tuple[HexModel, LoadReport]:
    """HEX from a full checkpoint (`visual.beit3.*` + heads), as the reference trainer writes it."""
    tensors = read_state_dict(path)
    model = HexModel(cfg)
    report = LoadReport(os.fspath(path))
    _fit_musk_positions(tensors, "visual.beit3.encoder.embed_positions.A.weight", cfg, report)
    assign(model, tensors, os.fspath(path), ignored=HEX_IGNORED, report=report)
    return model.eval(), report


def build_hex(*, musk: str | os.PathLike | None = None, hex_heads: str | os.PathLike | None = None,
              hex: str | os.PathLike | None = None, cfg: MuskConfig = MUSK_LARGE_384
              ) -> tuple[HexModel, list[LoadReport]]:
    """HEX from `hex` (full checkpoint) or from `musk` (encoder) + `hex_heads` (head-only checkpoint)."""
    if hex is not None:
        if musk is not None or hex_heads is not None:
            raise CheckpointError(hex, "give either a full HEX checkpoint or a MUSK encoder + HEX heads, not both")
        model, report = load_hex(hex, cfg)
        return model, [report]
    if musk is None or hex_heads is None:
        raise CheckpointError(musk or hex_heads or "(none)", "HEX needs a full checkpoint, or both a MUSK encoder "
                                                             "and a HEX heads checkpoint")
    model = HexModel(cfg)
    heads = read_state_dict(hex_heads)
    if any(k.startswith("visual.") for k in heads):
        raise CheckpointError(hex_heads, "holds encoder weights (visual.*) too: load it as a full HEX checkpoint")
    encoder = read_state_dict(musk)
    if any(k.startswith("visual.beit3.") for k in encoder) and not any(k.startswith("beit3.") for k in encoder):
        encoder = _strip(encoder, "visual.")
    musk_report = LoadReport(os.fspath(musk))
    _fit_musk_positions(encoder, "beit3.encoder.embed_positions.A.weight", cfg, musk_report)
    head_keys = {k for k in model.state_dict() if _is_head(k)}
    assign(model.visual, encoder, os.fspath(musk), ignored=HEX_IGNORED, report=musk_report)
    heads_report = assign(model, heads, os.fspath(hex_heads), ignored=HEX_IGNORED,
                          optional=set(model.state_dict()) - head_keys)
    return model.eval(), [musk_report, heads_report]


def load_dinov2(path: str | os.PathLike, cfg: Dinov2Config = DINOV2_VITS14_REG) -> tuple[Dinov2Encoder, LoadReport]:
    """DINOv2 ViT-S/14-reg from the facebookresearch checkpoint layout; pos_embed resized once to cfg.grid."""
    tensors = read_state_dict(path)
    report = LoadReport(os.fspath(path))
    if "pos_embed" in tensors:
        before = tensors["pos_embed"].shape[1] - 1
        tensors["pos_embed"] = resize_pos_embed(tensors["pos_embed"], cfg.grid, antialias=cfg.interpolate_antialias,
                                                offset=cfg.interpolate_offset)
        if before != cfg.grid * cfg.grid:
            m = int(round(before ** 0.5))
            report.notes.append(f"pos_embed resized {m}x{m} -> {cfg.grid}x{cfg.grid} (bicubic, "
                                f"antialias={cfg.interpolate_antialias})")
    model = Dinov2Encoder(cfg)
    assign(model, tensors, os.fspath(path), ignored=DINOV2_IGNORED, report=report)
    return model.eval(), report


def infer_mica_config(tensors: Mapping[str, torch.Tensor], *, pooling: str, fusion: str | None = None,
                      transformer_mode: str | None = None, source: str = "MICA checkpoint") -> MicaConfig:
    """MICA's configuration: fusion and transformer mode read from the weights (a value given must agree),
    pooling given (both poolings hold the same attention-head weights, so the weights cannot tell).

    fusion: 'bilinear' when the BilinearFusion keys (mm.linear_h1.*) are there, else 'concat'.
    transformer mode: 'separate' when the codex_* transformer / attention head / rho weights differ from
    the path_* ones; 'shared' when they are absent or equal (the reference aliases them in 'shared', and
    equal weights compute the same function in either mode)."""
    found_fusion = "bilinear" if any(k.startswith("mm.linear_h1.") for k in tensors) else "concat"
    path_keys = [k for k in tensors if k.startswith(("path_transformer.", "path_attention_head.", "path_rho."))]
    codex_keys = [k.replace("path_", "codex_", 1) for k in path_keys]
    separate = any(c in tensors and not torch.equal(tensors[p], tensors[c]) for p, c in zip(path_keys, codex_keys))
    found_mode = "separate" if separate else "shared"
    for name, given, found in (("fusion", fusion, found_fusion), ("transformer mode", transformer_mode, found_mode)):
        if given is not None and given != found:
            raise CheckpointError(source, f"its weights are a {found} {name} model, not {given}")
    return MicaConfig(fusion=found_fusion, pooling=pooling, transformer_mode=found_mode)


def load_mica(path: str | os.PathLike, *, pooling: str, fusion: str | None = None,
              transformer_mode: str | None = None, cfg: MicaConfig | None = None) -> tuple[Mica, LoadReport]:
    """MICA from a reference `s_{fold}_checkpoint.pt` (plain state_dict); `pooling` must be given."""
    tensors = read_state_dict(path)
    cfg = cfg or infer_mica_config(tensors, pooling=pooling, fusion=fusion, transformer_mode=transformer_mode,
                                   source=os.fspath(path))
    model = Mica(cfg)
    report = assign(model, tensors, os.fspath(path), optional=model.unused_keys())
    report.notes.append(f"fusion={cfg.fusion} (from the weights) pooling={cfg.pooling} (given) "
                        f"transformer_mode={cfg.transformer_mode} (from the weights)")
    return model.eval(), report
