"""MICA against an independent float64 evaluation of the published formulas, and its
transformer / co-attention against torch's own nn modules loaded with the same keys."""

import math

import pytest

torch = pytest.importorskip("torch", reason="hexfast_export needs torch (pip install '.[export]')")

from torch import nn  # noqa: E402

from hexfast.score.mica_stream import INITIAL_LSE  # noqa: E402
from hexfast_export import Mica, MicaConfig  # noqa: E402


def randomise(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1, generator=gen)
            elif ".norm" in name:
                p.normal_(1.0, 0.2, generator=gen)
            else:
                p.normal_(0.0, 1.5 / math.sqrt(p.shape[-1]), generator=gen)
    return model


def reference(sd, x_path, x_codex, fusion, pooling):
    """The MCAT_Surv forward (eval) in float64, written from the formulas."""
    sd = {k: v.double() for k, v in sd.items()}
    relu, sig = torch.relu, torch.sigmoid

    def lin(x, name):
        return x @ sd[name + ".weight"].T + sd[name + ".bias"]

    def softmax(z, dim):
        z = torch.exp(z - z.max(dim, keepdim=True).values)
        return z / z.sum(dim, keepdim=True)

    def ln(z, name):
        mu = z.mean(-1, keepdim=True)
        var = ((z - mu) ** 2).mean(-1, keepdim=True)
        return (z - mu) / torch.sqrt(var + 1e-5) * sd[name + ".weight"] + sd[name + ".bias"]

    def mha(q_in, kv_in, name, heads):
        w, b = sd[name + ".in_proj_weight"], sd[name + ".in_proj_bias"]
        d = q_in.shape[-1]
        hd = d // heads
        q = q_in @ w[:d].T + b[:d]
        k = kv_in @ w[d:2 * d].T + b[d:2 * d]
        v = kv_in @ w[2 * d:].T + b[2 * d:]
        outs, raw = [], []
        for i in range(heads):
            s = slice(i * hd, (i + 1) * hd)
            scores = (q[:, s] / math.sqrt(hd)) @ k[:, s].T
            raw.append(scores)
            outs.append(softmax(scores, -1) @ v[:, s])
        return lin(torch.cat(outs, -1), name + ".out_proj"), raw

    def encoder(x, name):
        for i in range(2):
            pre = f"{name}.layers.{i}"
            x = ln(x + mha(x, x, pre + ".self_attn", 8)[0], pre + ".norm1")
            x = ln(x + lin(relu(lin(x, pre + ".linear1")), pre + ".linear2"), pre + ".norm2")
        return x

    def pool(t, head, rho):
        if pooling == "gap":
            return t.mean(0)
        a = lin(torch.tanh(lin(t, head + ".attention_a.0")) * sig(lin(t, head + ".attention_b.0")),
                head + ".attention_c")  # [T, 1]
        return relu(lin(softmax(a.T, 1) @ t, rho + ".0"))[0]

    p = relu(lin(x_path.double(), "wsi_net.0"))
    c = relu(lin(x_codex.double(), "codex_net.0"))
    co, raw = mha(c, p, "coattn", 1)
    h_path = pool(encoder(co, "path_transformer"), "path_attention_head", "path_rho")
    h_codex = pool(encoder(c, "codex_transformer"), "codex_attention_head", "codex_rho")
    if fusion == "concat":
        h = relu(lin(relu(lin(torch.cat([h_path, h_codex]), "mm.0")), "mm.2"))
    else:
        both = torch.cat([h_path, h_codex])
        o1 = relu(lin(sig(lin(both, "mm.linear_z1.0")) * relu(lin(h_path, "mm.linear_h1.0")), "mm.linear_o1.0"))
        o2 = relu(lin(sig(lin(both, "mm.linear_z2.0")) * relu(lin(h_codex, "mm.linear_h2.0")), "mm.linear_o2.0"))
        o1 = torch.cat([o1, torch.ones(1, dtype=o1.dtype)])
        o2 = torch.cat([o2, torch.ones(1, dtype=o2.dtype)])
        outer = torch.outer(o1, o2).flatten()
        h = relu(lin(relu(lin(outer, "mm.encoder1.0")), "mm.encoder2.0"))
    logits = lin(h, "classifier")[None]
    hazards = sig(logits)
    survival = torch.cumprod(1 - hazards, 1)
    return hazards, survival, -survival.sum(1), raw[0]


@pytest.mark.parametrize("mode", ["separate", "shared"])
@pytest.mark.parametrize("pooling", ["attn", "gap"])
@pytest.mark.parametrize("fusion", ["concat", "bilinear"])
def test_mica_matches_float64_reference(fusion, pooling, mode):
    torch.manual_seed(0)
    model = randomise(Mica(MicaConfig(fusion=fusion, pooling=pooling, transformer_mode=mode))).eval()
    x_path, x_codex = torch.randn(300, 1024), torch.rand(40, 384) * 3
    hazards, survival, risk, scores = reference(model.state_dict(), x_path, x_codex, fusion, pooling)
    with torch.no_grad():
        out = model(x_path, x_codex)
        out64 = model.double()(x_path.double(), x_codex.double())
    worst = 0.0
    for ours, ours64, ref in ((out.hazards, out64.hazards, hazards), (out.survival, out64.survival, survival),
                              (out.risk, out64.risk, risk), (out.coattn_scores, out64.coattn_scores, scores),
                              (out.coattn, out64.coattn, torch.softmax(scores, -1))):
        scale = ref.abs().max().item()
        err = (ours.double() - ref).abs().max().item() / scale
        worst = max(worst, err)
        assert err <= 1e-5, err
        assert (ours64 - ref).abs().max().item() <= 1e-12 * scale
    print(f"MICA {fusion}/{pooling}/{mode} fp32 vs float64 reference: worst rel {worst:.3g}; "
          f"risk {out.risk.item():.6f} vs {risk.item():.6f}")
    # The same slide in uneven chunks through the online softmax (what the ONNX graph computes).
    streamed = stream_chunks(model.float(), x_path, x_codex, [1, 70, 129, 100])
    for ours, ref in zip(streamed, (hazards, survival, risk, torch.softmax(scores, -1))):
        assert (ours.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def stream_chunks(model, x_path, x_codex, sizes):
    """Mica.forward_chunk over consecutive chunks of the given sizes → hazards, survival, risk, coattn."""
    lse, mean = torch.full((40,), INITIAL_LSE), torch.zeros(40, model.cfg.dim)
    scores, start = [], 0
    with torch.no_grad():
        for size in sizes:
            hazards, survival, risk, s, lse, mean = model.forward_chunk(x_path[start:start + size], x_codex, lse, mean)
            scores.append(s)
            start += size
    assert start == len(x_path)
    return hazards, survival, risk, torch.exp(torch.cat(scores, 1) - lse[:, None])


def test_streamed_softmax_survives_extreme_scores():
    """Scores in the thousands (exp overflows float32 beyond 88) and a first chunk far below the rest.
    float32 scores near 1000 are only good to ~6e-5 absolute, so the weights agree to ~1e-3 relative."""
    torch.manual_seed(2)
    model = randomise(Mica(), seed=2).eval()
    x_path, x_codex = torch.randn(200, 1024) * 40, torch.rand(40, 384) * 60
    x_path[:50] *= -1  # the first chunk's scores mostly far below the later maxima
    with torch.no_grad():
        out = model(x_path, x_codex)
    assert out.coattn_scores.abs().max() > 500
    hazards, _, risk, coattn = stream_chunks(model, x_path, x_codex, [50, 150])
    assert torch.isfinite(coattn).all() and torch.isfinite(risk).all()
    torch.testing.assert_close(coattn, out.coattn, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(hazards, out.hazards, rtol=1e-4, atol=1e-6)


def test_transformer_and_coattn_match_torch_modules():
    """Our layers load into nn.TransformerEncoder / nn.MultiheadAttention by name (strict) and agree."""
    torch.manual_seed(1)
    model = randomise(Mica(), seed=1).eval()
    sd = model.state_dict()
    ref = nn.TransformerEncoder(nn.TransformerEncoderLayer(d_model=256, nhead=8, dim_feedforward=512, dropout=0.25,
                                                           activation="relu"), num_layers=2,
                                enable_nested_tensor=False)
    ref.load_state_dict({k[len("path_transformer."):]: v for k, v in sd.items()
                         if k.startswith("path_transformer.")}, strict=True)
    coattn = nn.MultiheadAttention(embed_dim=256, num_heads=1)
    coattn.load_state_dict({k[len("coattn."):]: v for k, v in sd.items() if k.startswith("coattn.")}, strict=True)
    ref.eval(), coattn.eval()
    x = torch.randn(40, 256)
    tiles = torch.randn(123, 256)
    with torch.no_grad():
        torch.testing.assert_close(model.path_transformer(x), ref(x[:, None])[:, 0], rtol=1e-5, atol=1e-5)
        ours, _ = model.coattn(x, tiles, tiles)
        theirs, weights = coattn(x[:, None], tiles[:, None], tiles[:, None], need_weights=True)
        torch.testing.assert_close(ours, theirs[:, 0], rtol=1e-5, atol=1e-5)
        out = model(torch.randn(123, 1024), torch.randn(40, 384))
        assert out.coattn.shape == (40, 123)
        p = model.wsi_net(torch.randn(5, 1024))
        _, scores = model.coattn(x, p, p)
        _, w = coattn(x[:, None], p[:, None], p[:, None], need_weights=True)
        torch.testing.assert_close(scores[0].softmax(-1), w[0], rtol=1e-5, atol=1e-6)
