"""hexfast_export model definitions: shapes, state-dict names, configuration."""

import pytest

torch = pytest.importorskip("torch", reason="hexfast_export needs torch (pip install '.[export]')")

from hexfast_export import (  # noqa: E402
    Dinov2Config,
    Dinov2Encoder,
    HexModel,
    Mica,
    MicaConfig,
    MuskConfig,
    MuskVision,
)

SMALL = MuskConfig(img_size=64, depth=2, dim=64, heads=4, ffn_dim=128)


def test_musk_large_shapes_and_names():
    # Names and shapes only: parameters are created lazily on the meta device.
    with torch.device("meta"):
        model = MuskVision()
    sd = model.state_dict()
    assert sd["beit3.encoder.embed_positions.A.weight"].shape == (579, 1024)
    assert sd["beit3.vision_embed.proj.weight"].shape == (1024, 3, 16, 16)
    assert sd["beit3.vision_embed.cls_token"].shape == (1, 1, 1024)
    assert sd["beit3.encoder.layers.23.ffn.A.fc1.weight"].shape == (4096, 1024)
    assert sd["beit3.encoder.layers.23.ffn.A.ffn_layernorm.weight"].shape == (4096,)
    assert sd["beit3.encoder.layers.0.self_attn.inner_attn_ln.A.bias"].shape == (1024,)
    assert "beit3.encoder.layer_norm.A.weight" in sd
    assert not any(".B." in k or "text_embed" in k or "mask_token" in k for k in sd)
    per_layer = {k.split(".", 4)[4] for k in sd if k.startswith("beit3.encoder.layers.0.")}
    assert per_layer == {
        f"{m}.{p}" for m in ("self_attn.q_proj.A", "self_attn.k_proj.A", "self_attn.v_proj.A",
                             "self_attn.out_proj.A", "self_attn.inner_attn_ln.A", "self_attn_layer_norm.A",
                             "ffn.A.fc1", "ffn.A.ffn_layernorm", "ffn.A.fc2", "final_layer_norm.A")
        for p in ("weight", "bias")}
    assert sum(v.numel() for v in sd.values()) == pytest.approx(303.3e6, rel=0.01)


def test_hex_outputs_and_names():
    model = HexModel(SMALL).eval()
    keys = set(model.state_dict())
    assert {"regression_head.0.weight", "regression_head.3.weight", "regression_head1.0.weight"} <= keys
    assert all(k.startswith(("visual.beit3.", "regression_head.", "regression_head1.")) for k in keys)
    with torch.no_grad():
        out = model(torch.randn(3, 3, 64, 64))
    assert out.markers.shape == (3, 40) and out.embedding.shape == (3, 64) and out.features.shape == (3, 128)
    with torch.no_grad():
        markers, features = model.forward_head(out.embedding)
    torch.testing.assert_close(markers, out.markers)
    assert (out.features >= 0).all()  # after ReLU


def test_hex_cls_is_final_layernorm_token():
    model = HexModel(SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = model.visual.forward_features(x)
        out = model(x)
    assert tokens.shape == (2, 1 + 16, 64)
    torch.testing.assert_close(out.embedding, tokens[:, 0])
    # Batch independence: one image alone gives the same CLS.
    with torch.no_grad():
        single = model(x[1:]).embedding
    torch.testing.assert_close(single, out.embedding[1:], rtol=1e-5, atol=1e-5)


def test_dinov2_shapes_and_names():
    model = Dinov2Encoder().eval()
    sd = model.state_dict()
    assert sd["pos_embed"].shape == (1, 1 + 16 * 16, 384)
    assert sd["register_tokens"].shape == (1, 4, 384)
    assert sd["blocks.11.ls2.gamma"].shape == (384,)
    assert sd["blocks.0.attn.qkv.weight"].shape == (1152, 384)
    assert "mask_token" not in sd
    with torch.no_grad():
        assert model(torch.randn(2, 3, 224, 224)).shape == (2, 384)
    assert Dinov2Config().grid == 16


@pytest.mark.parametrize("fusion", ["concat", "bilinear"])
@pytest.mark.parametrize("pooling", ["gap", "attn"])
def test_mica_outputs(fusion, pooling):
    model = Mica(MicaConfig(fusion=fusion, pooling=pooling)).eval()
    with torch.no_grad():
        out = model(torch.randn(37, 1024), torch.randn(40, 384))
    assert out.hazards.shape == (1, 4) and out.survival.shape == (1, 4) and out.risk.shape == (1,)
    assert out.coattn.shape == (40, 37) and out.coattn_scores.shape == (40, 37)
    torch.testing.assert_close(out.coattn.sum(dim=1), torch.ones(40))
    assert out.path_attention.shape == (1, 40) and out.codex_attention.shape == (1, 40)
    assert ((out.hazards > 0) & (out.hazards < 1)).all()
    assert (out.survival[0, 1:] <= out.survival[0, :-1]).all()
    torch.testing.assert_close(out.risk, -out.survival.sum(dim=1))


def test_mica_shared_mode_aliases_modules():
    model = Mica(MicaConfig(transformer_mode="shared"))
    assert model.codex_transformer is model.path_transformer
    assert model.codex_rho is model.path_rho and model.codex_attention_head is model.path_attention_head
    sd = model.state_dict()  # both key sets appear, as in the reference's shared checkpoints
    assert "codex_transformer.layers.1.linear2.weight" in sd and "path_transformer.layers.1.linear2.weight" in sd


def test_mica_bad_config():
    for bad in ({"fusion": "sum"}, {"pooling": "max"}, {"transformer_mode": "tied"}):
        with pytest.raises(ValueError):
            MicaConfig(**bad)
