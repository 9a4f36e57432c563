"""DINOv2 ViT-S/14-reg against an independent float64 evaluation of the published architecture.

The reference below is written from the DINOv2 paper/code description, not from
hexfast_export.dinov2: numpy float64 for the position-table resize (the
antialiased bicubic filter PIL and torch's antialias path share: Keys cubic
a=-0.5 stretched by the scale factor, renormalised at the borders) and plain
float64 tensor arithmetic for the network (no nn modules, no fused kernels).
"""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="hexfast_export needs torch (pip install '.[export]')")

from hexfast_export import Dinov2Config, Dinov2Encoder, load_dinov2, resize_pos_embed  # noqa: E402


def cubic(x, a=-0.5):
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def aa_bicubic_matrix(n_in, n_out):
    """[n_out, n_in] weights of an antialiased bicubic resize (align_corners=False)."""
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    support = 2.0 * stretch
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        j = np.arange(lo, hi)
        k = cubic((j + 0.5 - center) / stretch)
        w[i, lo:hi] = k / k.sum()
    return w


def reference_resize(table, grid):
    """[1, 1+M*M, D] → [1, 1+grid*grid, D] in float64."""
    t = np.asarray(table, np.float64)[0]
    m = int(round(math.sqrt(t.shape[0] - 1)))
    patches = t[1:].reshape(m, m, -1)
    w = aa_bicubic_matrix(m, grid)
    out = np.einsum("ai,bj,ijd->abd", w, w, patches).reshape(grid * grid, -1)
    return np.concatenate([t[:1], out])[None]


def reference_forward(sd, images, cfg: Dinov2Config):
    """Float64 DINOv2 with registers; sd holds the official layout (518-px table)."""
    sd = {k: v.double() for k, v in sd.items()}
    x = images.double()
    b = x.shape[0]
    p, d, h = cfg.patch_size, cfg.dim, cfg.heads
    g = x.shape[-1] // p
    # Patch embedding as a matmul over flattened 14x14x3 patches.
    patches = x.reshape(b, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, 3 * p * p)
    tok = patches @ sd["patch_embed.proj.weight"].reshape(d, -1).T + sd["patch_embed.proj.bias"]
    pos = torch.from_numpy(reference_resize(sd["pos_embed"].numpy(), g))
    tok = torch.cat([sd["cls_token"].expand(b, 1, d), tok], 1) + pos
    tok = torch.cat([tok[:, :1], sd["register_tokens"].expand(b, -1, d), tok[:, 1:]], 1)

    def ln(z, w, bias, eps=1e-6):
        mu = z.mean(-1, keepdim=True)
        var = ((z - mu) ** 2).mean(-1, keepdim=True)
        return (z - mu) / torch.sqrt(var + eps) * w + bias

    for i in range(cfg.depth):
        pre = f"blocks.{i}."
        y = ln(tok, sd[pre + "norm1.weight"], sd[pre + "norm1.bias"])
        qkv = y @ sd[pre + "attn.qkv.weight"].T + sd[pre + "attn.qkv.bias"]
        q, k, v = qkv.split(d, dim=-1)
        split = lambda z: z.reshape(b, -1, h, d // h).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // h)
        att = torch.exp(att - att.max(-1, keepdim=True).values)
        att = att / att.sum(-1, keepdim=True)
        o = (att @ v).transpose(1, 2).reshape(b, -1, d)
        o = o @ sd[pre + "attn.proj.weight"].T + sd[pre + "attn.proj.bias"]
        tok = tok + sd[pre + "ls1.gamma"] * o
        y = ln(tok, sd[pre + "norm2.weight"], sd[pre + "norm2.bias"])
        y = y @ sd[pre + "mlp.fc1.weight"].T + sd[pre + "mlp.fc1.bias"]
        y = 0.5 * y * (1 + torch.special.erf(y / math.sqrt(2)))
        y = y @ sd[pre + "mlp.fc2.weight"].T + sd[pre + "mlp.fc2.bias"]
        tok = tok + sd[pre + "ls2.gamma"] * y
    return ln(tok, sd["norm.weight"], sd["norm.bias"])[:, 0]


def official_state(seed=0):
    model = Dinov2Encoder(Dinov2Config(img_size=518))
    model.reset_parameters(seed)
    sd = dict(model.state_dict())
    sd["mask_token"] = torch.zeros(1, 384)
    return sd


def test_pos_embed_resize_matches_reference():
    torch.manual_seed(0)
    table = torch.randn(1, 1 + 37 * 37, 384)
    ours = resize_pos_embed(table, 16).double().numpy()
    ref = reference_resize(table.numpy(), 16)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"DINOv2 pos_embed 37->16 resize vs float64 reference: rel {err:.3g}")
    assert err < 1e-6
    # Without antialiasing the result would differ a lot: the setting matters.
    plain = resize_pos_embed(table, 16, antialias=False).double().numpy()
    assert np.abs(plain - ref).max() / np.abs(ref).max() > 1e-2


def test_pos_embed_resize_matches_pil():
    """PIL's float-image bicubic resize is the antialiased filter the reference uses."""
    from PIL import Image

    torch.manual_seed(1)
    table = torch.randn(1, 1 + 37 * 37, 8)
    ours = resize_pos_embed(table, 16)[0, 1:].reshape(16, 16, 8).numpy()
    grid = table[0, 1:].reshape(37, 37, 8).numpy()
    pil = np.stack([np.asarray(Image.fromarray(grid[..., c], mode="F").resize((16, 16), Image.Resampling.BICUBIC))
                    for c in range(8)], axis=-1)
    assert np.abs(ours - pil).max() / np.abs(pil).max() < 1e-5


def test_dinov2_vits14_reg_matches_float64_reference(tmp_path):
    torch.manual_seed(0)
    sd = official_state()
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(sd, path)
    model, _ = load_dinov2(path)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours = model(images)
        ours64 = model.double()(images.double())
    ref = reference_forward(sd, images, Dinov2Config())
    scale = ref.abs().max().item()
    err32 = (ours.double() - ref).abs().max().item()
    err64 = (ours64 - ref).abs().max().item()
    print(f"DINOv2 ViT-S/14-reg fp32 vs float64 reference: max|d|={err32:.3g} rel={err32 / scale:.3g}; "
          f"module in fp64: rel={err64 / scale:.3g}")
    assert err32 <= 1e-5 * scale
    assert err64 <= 1e-6 * scale  # bounded by the float32 position resize the reference code also does
