"""Helpers shared by the test_export_* modules (import after pytest.importorskip("torch"))."""

import torch

from hexfast_export import MuskConfig, MuskVision

# dim 1024 so the official 1024→256 head fits; shallow and small otherwise.
ENC = MuskConfig(img_size=64, depth=2, dim=1024, heads=16, ffn_dim=512)


def musk_file_state(cfg=ENC, seed=0):
    """A MUSK-format state dict (as MUSK's model.safetensors holds it): vision weights plus
    what an image-only forward ignores (text embedding, B experts, heads, logit scale)."""
    model = MuskVision(cfg)
    model.reset_parameters(seed)
    sd = dict(model.state_dict())
    extra = {}
    for k, v in sd.items():
        if ".A." in k:
            extra[k.replace(".A.", ".B.")] = torch.randn_like(v)
    extra["beit3.text_embed.weight"] = torch.randn(100, cfg.dim)
    extra["beit3.vision_embed.mask_token"] = torch.zeros(1, 1, cfg.dim)
    extra["vision_head.weight"] = torch.randn(cfg.dim, cfg.dim)
    extra["language_head.weight"] = torch.randn(cfg.dim, cfg.dim)
    extra["logit_scale"] = torch.tensor(2.6)
    sd.update(extra)
    return sd


def save(sd, path):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    return path
