"""Checkpoint loading: official layouts, ignorable keys, refusals."""

import pytest

torch = pytest.importorskip("torch", reason="hexfast_export needs torch (pip install '.[export]')")

from conftest import shared_file  # noqa: E402
from export_helpers import ENC, musk_file_state, save  # noqa: E402
from hexfast.errors import HexfastError  # noqa: E402
from hexfast_export import (  # noqa: E402
    CheckpointError,
    Dinov2Config,
    Dinov2Encoder,
    IncompleteCheckpointError,
    Mica,
    MicaConfig,
    MuskConfig,
    build_hex,
    load_dinov2,
    load_mica,
    load_musk,
    read_state_dict,
)

HEADS = "hex-official/hex_heads_demo_checkpoint.pth"


@pytest.fixture
def musk_path(tmp_path):
    return save(musk_file_state(), tmp_path / "musk.safetensors")


def test_official_heads_checkpoint_keys():
    sd = read_state_dict(shared_file(HEADS))
    assert sorted(sd) == sorted(f"{m}.{p}" for m in ("regression_head.0", "regression_head.3", "regression_head1.0")
                                for p in ("weight", "bias"))


def test_musk_plus_official_heads(musk_path):
    heads_path = shared_file(HEADS)
    model, (musk_report, heads_report) = build_hex(musk=musk_path, hex_heads=heads_path, cfg=ENC)
    assert not model.training
    # Everything MUSK-only was dropped by name, nothing unknown.
    assert musk_report.unexpected == [] and heads_report.unexpected == []
    assert "beit3.text_embed.weight" in musk_report.ignored and "logit_scale" in musk_report.ignored
    assert any(".B." in k for k in musk_report.ignored)
    assert len(heads_report.loaded) == 6
    heads = torch.load(heads_path, map_location="cpu", weights_only=True)
    torch.testing.assert_close(model.regression_head1[0].weight, heads["regression_head1.0.weight"])
    # The encoder is the MUSK file's: same CLS as loading MUSK alone; markers are the heads applied to it.
    encoder, report = load_musk(musk_path, ENC)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        cls = encoder(x)
        h = torch.relu(cls @ heads["regression_head.0.weight"].T + heads["regression_head.0.bias"])
        h = torch.relu(h @ heads["regression_head.3.weight"].T + heads["regression_head.3.bias"])
        ref = h @ heads["regression_head1.0.weight"].T + heads["regression_head1.0.bias"]
    torch.testing.assert_close(out.embedding, cls)
    torch.testing.assert_close(out.features, h)
    torch.testing.assert_close(out.markers, ref)


def test_full_hex_checkpoint_with_module_prefix_and_fds(tmp_path, musk_path):
    model, _ = build_hex(musk=musk_path, hex_heads=shared_file(HEADS), cfg=ENC)
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    for j in range(3):  # what the reference trainer saves beside the model
        sd[f"module.FDS.{j}.running_mean"] = torch.zeros(50, 128)
        sd[f"module.FDS.{j}.epoch"] = torch.zeros(1, dtype=torch.long)
    sd["module.visual.beit3.text_embed.weight"] = torch.randn(10, 1024)
    sd["module.visual.logit_scale"] = torch.tensor(1.0)
    path = save(sd, tmp_path / "checkpoint_epoch_5.pth")
    loaded, reports = build_hex(hex=path, cfg=ENC)
    assert reports[0].unexpected == []
    assert sum(k.startswith("FDS.") for k in reports[0].ignored) == 6
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).markers, model.eval()(x).markers)


def test_refuses_missing_weights(tmp_path, musk_path):
    sd = musk_file_state()
    del sd["beit3.encoder.layers.1.ffn.A.fc2.weight"]
    del sd["beit3.encoder.layer_norm.A.bias"]
    path = save(sd, tmp_path / "cut.pth")
    with pytest.raises(IncompleteCheckpointError) as info:
        load_musk(path, ENC)
    message = str(info.value)
    assert "\n" not in message and "cut.pth" in message and "2 weight(s)" in message
    assert "beit3.encoder.layers.1.ffn.A.fc2.weight" in message and "beit3.encoder.layer_norm.A.bias" in message
    assert isinstance(info.value, HexfastError)
    # A full HEX checkpoint without its encoder is refused, naming encoder keys.
    with pytest.raises(IncompleteCheckpointError, match="visual.beit3"):
        build_hex(hex=shared_file(HEADS), cfg=ENC)
    # Heads checkpoint without the last layer.
    heads = read_state_dict(shared_file(HEADS))
    del heads["regression_head1.0.bias"]
    with pytest.raises(IncompleteCheckpointError, match=r"regression_head1\.0\.bias"):
        build_hex(musk=musk_path, hex_heads=save(heads, tmp_path / "heads.pt"), cfg=ENC)


def test_missing_key_never_hidden_by_ignore_patterns(tmp_path):
    """Ignore patterns apply to extra keys only: a used weight whose name looks ignorable still counts."""
    sd = musk_file_state()
    del sd["beit3.vision_embed.cls_token"]
    with pytest.raises(IncompleteCheckpointError, match="cls_token"):
        load_musk(save(sd, tmp_path / "nocls.pth"), ENC)


def test_refuses_shape_mismatch_and_bad_files(tmp_path, musk_path):
    with pytest.raises(CheckpointError, match="shape"):
        load_musk(musk_path, MuskConfig(img_size=64, depth=2, dim=1024, heads=16, ffn_dim=1024))
    with pytest.raises(CheckpointError, match="only local"):
        read_state_dict("https://huggingface.co/xiangjx/musk/model.safetensors")
    with pytest.raises(CheckpointError, match="only local"):
        read_state_dict("hf_hub:xiangjx/musk")
    with pytest.raises(CheckpointError, match="no such file"):
        read_state_dict(tmp_path / "absent.pth")
    (tmp_path / "weights.ckpt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint type"):
        read_state_dict(tmp_path / "weights.ckpt")
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_state_dict(tmp_path / "junk.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a state dict"):
        read_state_dict(tmp_path / "list.pth")


def test_refuses_ambiguous_hex_sources(tmp_path, musk_path):
    model, _ = build_hex(musk=musk_path, hex_heads=shared_file(HEADS), cfg=ENC)
    full = save(model.state_dict(), tmp_path / "full.pth")
    with pytest.raises(CheckpointError, match="full HEX checkpoint"):
        build_hex(musk=musk_path, hex_heads=full, cfg=ENC)
    with pytest.raises(CheckpointError, match="not both"):
        build_hex(hex=full, musk=musk_path, cfg=ENC)
    with pytest.raises(CheckpointError, match="needs"):
        build_hex(musk=musk_path, cfg=ENC)


def test_container_and_prefix_unwrapping(tmp_path):
    sd = musk_file_state()
    path = save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "wrapped.pth")
    model, report = load_musk(path, ENC)
    assert report.unexpected == []
    torch.testing.assert_close(model.beit3.vision_embed.cls_token, sd["beit3.vision_embed.cls_token"])


def test_musk_positions_from_another_resolution(tmp_path):
    """A 224-px MUSK table (3 + 14x14 rows) is resized the way MUSK's own loader does."""
    cfg224 = MuskConfig(img_size=224, depth=1, dim=1024, heads=16, ffn_dim=256)
    sd = musk_file_state(cfg224)
    target = MuskConfig(img_size=384, depth=1, dim=1024, heads=16, ffn_dim=256)
    model, report = load_musk(save(sd, tmp_path / "m224.pth"), target)
    assert any("14x14 -> 24x24" in n for n in report.notes)
    table = model.beit3.encoder.embed_positions.A.weight
    assert table.shape == (579, 1024)
    torch.testing.assert_close(table[:3], sd["beit3.encoder.embed_positions.A.weight"][:3])


def dinov2_official_state(seed=0):
    """facebookresearch layout: pos_embed for 518 px (37x37), mask_token present."""
    model = Dinov2Encoder(Dinov2Config(img_size=518))
    model.reset_parameters(seed)
    sd = dict(model.state_dict())
    sd["mask_token"] = torch.zeros(1, 384)
    return sd


def test_dinov2_official_layout(tmp_path):
    sd = dinov2_official_state()
    assert sd["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    model, report = load_dinov2(save(sd, tmp_path / "dinov2_vits14_reg4_pretrain.pth"))
    assert report.ignored == ["mask_token"] and report.unexpected == []
    assert any("37x37 -> 16x16" in n for n in report.notes)
    assert model.pos_embed.shape == (1, 257, 384)
    torch.testing.assert_close(model.pos_embed[:, 0], sd["pos_embed"][:, 0])
    # Reloading an already-resized table leaves it as is.
    again, report2 = load_dinov2(save(model.state_dict(), tmp_path / "resized.pth"))
    assert report2.notes == []
    torch.testing.assert_close(again.pos_embed, model.pos_embed)
    del sd["blocks.3.ls1.gamma"]
    with pytest.raises(IncompleteCheckpointError, match=r"blocks\.3\.ls1\.gamma"):
        load_dinov2(save(sd, tmp_path / "cut.pth"))


@pytest.mark.parametrize("fusion", ["concat", "bilinear"])
@pytest.mark.parametrize("mode", ["separate", "shared"])
def test_mica_roundtrip(tmp_path, fusion, mode):
    torch.manual_seed(0)
    model = Mica(MicaConfig(fusion=fusion, transformer_mode=mode, pooling="attn")).eval()
    path = save(model.state_dict(), tmp_path / "s_0_checkpoint.pt")
    loaded, report = load_mica(path, pooling="attn")
    assert loaded.cfg.fusion == fusion and loaded.cfg.transformer_mode == mode
    assert report.unexpected == [] and report.ignored == []
    x, c = torch.randn(20, 1024), torch.randn(40, 384)
    with torch.no_grad():
        for a, b in zip(loaded(x, c), model(x, c)):
            torch.testing.assert_close(a, b)


def test_mica_gap_needs_no_attention_heads(tmp_path):
    model = Mica(MicaConfig(pooling="gap"))
    sd = {k: v for k, v in model.state_dict().items() if "attention_head" not in k and "_rho" not in k}
    path = save(sd, tmp_path / "gap.pt")
    loaded, _ = load_mica(path, pooling="gap")
    assert loaded.cfg.pooling == "gap"
    with pytest.raises(IncompleteCheckpointError, match="attention_head"):
        load_mica(path, pooling="attn")


def test_mica_shared_weights_must_agree(tmp_path):
    model = Mica(MicaConfig(transformer_mode="separate"))
    path = save(model.state_dict(), tmp_path / "sep.pt")
    with pytest.raises(CheckpointError, match="shared weight"):
        load_mica(path, pooling="attn", cfg=MicaConfig(transformer_mode="shared"))
