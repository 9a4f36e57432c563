"""hexfast_export: the training side of hexfast (needs torch).

Plain-torch definitions of the models hexfast runs, loaders for the official
checkpoint layouts, and (later) ONNX export and parity checks. The runtime
package `hexfast` never imports this.

    from hexfast_export import build_hex, load_dinov2, load_mica
    hex_model, reports = build_hex(musk="musk.safetensors", hex_heads="hex_heads.pth")
"""

from .checkpoints import (
    CheckpointError,
    IncompleteCheckpointError,
    LoadReport,
    build_hex,
    load_dinov2,
    load_hex,
    load_mica,
    load_musk,
    read_state_dict,
)
from .dinov2 import DINOV2_VITS14_REG, Dinov2Config, Dinov2Encoder, resize_pos_embed
from .hex_model import HexModel, HexOutput
from .mica import Mica, MicaConfig, MicaOutput
from .musk import MUSK_LARGE_384, MuskConfig, MuskVision

__all__ = [
    "CheckpointError", "IncompleteCheckpointError", "LoadReport", "build_hex", "load_dinov2", "load_hex",
    "load_mica", "load_musk", "read_state_dict",
    "DINOV2_VITS14_REG", "Dinov2Config", "Dinov2Encoder", "resize_pos_embed",
    "HexModel", "HexOutput", "Mica", "MicaConfig", "MicaOutput", "MUSK_LARGE_384", "MuskConfig", "MuskVision",
]
