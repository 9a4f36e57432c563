"""CODEX encoder and MICA ONNX graphs, and the fp16 variants of all three models, against torch with
ONNX Runtime (CPU).

The CODEX preprocessing is checked stage by stage against an independent reference: Pillow's own
Image.resize(BICUBIC) on the uint8 RGB image the reference script builds (mica/codex_h5_png2fea.py:
channel → 3 equal planes → PIL image → transforms.Resize((224, 224), interpolation=3), which on a PIL
image is Image.resize(BICUBIC)). The in-graph resize is bit-exact with it; the only residual difference
in the features is float32 arithmetic order in the network (printed).
"""

import glob

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="hexfast_export needs torch (pip install '.[export]')")
ort = pytest.importorskip("onnxruntime", reason="the ONNX checks need onnxruntime")
onnx = pytest.importorskip("onnx", reason="the ONNX export needs onnx")

from PIL import Image  # noqa: E402

from conftest import shared_file  # noqa: E402
from export_helpers import musk_file_state, save  # noqa: E402
from hexfast_export import Dinov2Config, Dinov2Encoder, Mica, MicaConfig, MuskConfig, build_hex  # noqa: E402
from hexfast_export.codex_preprocess import CodexPreprocess, PilBicubicResize, quantise  # noqa: E402
from hexfast_export.onnx_export import (  # noqa: E402
    CodexGraph,
    codex_parity,
    convert_fp16,
    export_codex_onnx,
    export_hex_onnx,
    export_mica_onnx,
    hex_parity,
    mica_parity,
    onnx_session,
    worst,
)

FP32, FP16 = 1e-4, 1e-2
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)


def sample_grid() -> np.ndarray:
    """The reference's MICA sample virtual CODEX grid, [40, 30, 30] float32 (stored [30, 30, 40] float16)."""
    return np.load(shared_file("hex-official/mica_sample_codex.npy")).transpose(2, 0, 1).astype(np.float32)


def stretched(grid: np.ndarray) -> np.ndarray:
    """The sample's values are tiny (max 0.0016: every channel quantises to 0 by either rule); stretched
    per channel to [0, 1] it keeps its real spatial structure and exercises every uint8 level."""
    return grid / np.maximum(grid.max(axis=(1, 2), keepdims=True), 1e-6)


def reference_uint8(grid: np.ndarray) -> np.ndarray:
    """DESIGN.md's 8-bit step in numpy, after the reference's float16 storage."""
    return np.rint(np.clip(grid.astype(np.float16).astype(np.float32), 0, 1) * np.float32(255)).astype(np.uint8)


def reference_preprocess(grid: np.ndarray) -> np.ndarray:
    """[40, gh, gw] → [40, 3, 224, 224] as the reference does it: PIL RGB image per channel, Resize BICUBIC,
    ToTensor, ImageNet Normalize (float32)."""
    out = []
    for channel in reference_uint8(grid):
        resized = pil_bicubic(channel)
        out.append(np.stack([resized] * 3).astype(np.float32) / np.float32(255))
    return (np.stack(out) - IMAGENET_MEAN) / IMAGENET_STD


def torch_bicubic(img: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return PilBicubicResize(224)(torch.from_numpy(img).float()[None, None])[0, 0].numpy().astype(np.uint8)


def pil_bicubic(img: np.ndarray) -> np.ndarray:
    """Pillow's BICUBIC resize to 224x224 with the horizontal pass first, as every Pillow up to 12 does it (the
    reference's): two single-axis Image.resize calls, each of which is exactly one Pillow pass."""
    rgb = Image.fromarray(np.stack([img] * 3, axis=2))
    return np.asarray(rgb.resize((224, img.shape[0]), Image.Resampling.BICUBIC)
                      .resize((224, 224), Image.Resampling.BICUBIC))[..., 0]


def pil_bicubic_one_call(img: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(np.stack([img] * 3, axis=2)).resize((224, 224), Image.Resampling.BICUBIC))[..., 0]


def pillow_goes_vertical_first(shape) -> bool:
    """Pillow 13 (python-pillow/Pillow#9549) does the vertical pass first when the height shrinks much more than
    the width: for a 224x224 target, when gh > 224 and gh + 224 > 2 gw (found by probing Pillow 13.0)."""
    major = int(__import__("PIL").__version__.split(".")[0])
    gh, gw = shape
    return major >= 13 and gh > 224 and gw != 224 and gh + 224 > 2 * gw


# --------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (7, 5), (30, 30), (31, 57), (111, 224), (224, 224), (225, 223),
                                   (300, 260), (448, 449), (900, 1200), (4095, 17)])
def test_bicubic_resize_is_bit_exact_with_pillow(shape):
    """Upscaling (grids smaller than 224), identity, and antialiased downscaling, up to the 4095 limit."""
    rng = np.random.default_rng(sum(shape))
    img = rng.integers(0, 256, shape, dtype=np.uint8)
    img[rng.random(shape) < 0.3] = 0  # empty grid cells
    np.testing.assert_array_equal(torch_bicubic(img), pil_bicubic(img))
    stripes = ((np.arange(shape[1]) % 2) * 255).astype(np.uint8)[None].repeat(shape[0], 0)  # overshoot → clipping
    np.testing.assert_array_equal(torch_bicubic(stripes), pil_bicubic(stripes))
    if not pillow_goes_vertical_first(shape):  # the installed Pillow's own single call agrees too
        np.testing.assert_array_equal(torch_bicubic(img), pil_bicubic_one_call(img))


def test_pillow_13_pass_order_is_what_we_think():
    """Documents the residual: with Pillow >= 13 a tall grid (rows shrink much more than columns) is resized
    vertical-first, which moves some pixels by a level or so; the reference ran an older Pillow (horizontal
    first always), which hexfast reproduces."""
    rng = np.random.default_rng(7)
    for shape in ((300, 200), (800, 511), (800, 512), (225, 10), (226, 225), (400, 100)):
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        same = np.array_equal(pil_bicubic_one_call(img), pil_bicubic(img))
        assert same != pillow_goes_vertical_first(shape), shape
        if not same:
            diff = np.abs(pil_bicubic_one_call(img).astype(int) - pil_bicubic(img)).max()
            print(f"Pillow {__import__('PIL').__version__} single call vs horizontal-first on {shape}: max |Δ| {diff}")


@pytest.mark.skipif(int(__import__("PIL").__version__.split(".")[0]) < 13, reason="needs Pillow 13 as the oracle")
def test_pillow13_resize_order_is_pillow_13():
    """resize_order="pillow13" is the installed Pillow 13's own single call, tall grids included (where it goes
    vertical first); "pillow12" stays the reference's horizontal-first order."""
    rng = np.random.default_rng(3)
    shapes = [(300, 260), (300, 200), (800, 511), (800, 512), (226, 225), (400, 100), (4095, 17), (17, 4095),
              (224, 224), (30, 30)] + [tuple(int(v) for v in rng.integers(2, 1200, 2)) for _ in range(30)]
    tall = 0
    for shape in shapes:
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        with torch.no_grad():
            got = PilBicubicResize(224, "pillow13")(torch.from_numpy(img).float()[None, None])[0, 0].numpy()
        np.testing.assert_array_equal(got.astype(np.uint8), pil_bicubic_one_call(img), err_msg=str(shape))
        tall += pillow_goes_vertical_first(shape)
    assert tall >= 5  # the rule was exercised


def test_resize_order_changes_tall_grids_and_is_recorded(tmp_path):
    """On the 300 x 260 parity grid (sparse, values like HEX's) the two orders disagree on many uint8 values,
    and the DINOv2 features move by ~1e-3; export records the order in the manifest."""
    from hexfast_export.bundle_writer import codex_parity_grids, write_bundle
    from hexfast_export.demo import demo_models

    grid = codex_parity_grids()[2]
    assert grid.shape == (40, 300, 260)
    with torch.no_grad():
        x = quantise(torch.from_numpy(grid)).unsqueeze(1)
        a = PilBicubicResize(224, "pillow12")(x)
        b = PilBicubicResize(224, "pillow13")(x)
    changed = float((a != b).float().mean())
    encoder = Dinov2Encoder(Dinov2Config()).eval()
    with torch.no_grad():
        fa = CodexGraph(encoder, resize_order="pillow12")(torch.from_numpy(grid))
        fb = CodexGraph(encoder, resize_order="pillow13")(torch.from_numpy(grid))
    moved = float((fa - fb).abs().max() / fa.abs().max())
    print(f"300x260 grid: Pillow 12 vs 13 order changes {changed:.0%} of the uint8 values, features by {moved:.1e}")
    assert changed > 0.05 and moved > 1e-5
    hex_model, codex_encoder, _ = demo_models("tiny")
    manifest = write_bundle(tmp_path / "b", hex_model=hex_model, codex_encoder=codex_encoder, fp16=False,
                            codex_resize_order="pillow13", log=lambda m: None)
    assert manifest["models"]["codex_encoder"]["resize_order"].startswith("vertical pass first for tall grids")


def test_quantisation_rules():
    grid = np.array([[[-0.3, 0.0, 0.001, 0.00196, 0.5, 0.99999, 1.0, 7.5]]], np.float32)
    got = quantise(torch.from_numpy(grid), "scale").numpy()
    np.testing.assert_array_equal(got, reference_uint8(grid))
    assert got.tolist() == [[[0, 0, 0, 0, 128, 255, 255, 255]]]  # 127.5 rounds half to even: 128
    truncated = quantise(torch.from_numpy(grid), "truncate").numpy()
    assert truncated.tolist() == [[[0, 0, 0, 0, 0, 1, 1, 7]]]  # 0.99999 is 1.0 in float16


def test_codex_preprocess_equals_reference_pipeline():
    for grid in (sample_grid(), stretched(sample_grid())):
        with torch.no_grad():
            ours = CodexPreprocess()(torch.from_numpy(grid)).numpy()
        ref = reference_preprocess(grid)
        assert ours.shape == (40, 3, 224, 224)
        np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-6)  # same uint8 values; float32 /255, -mean, /std
    assert (reference_uint8(sample_grid()) == 0).all()  # the sample as stored quantises to black by both rules


# --------------------------------------------------------------------------- CODEX encoder ONNX


@pytest.fixture(scope="module")
def codex_onnx(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("codex")
    encoder = Dinov2Encoder().eval()  # the real ViT-S/14-reg4 architecture, random weights
    encoder.reset_parameters(3)
    path = export_codex_onnx(encoder, tmp / "codex_encoder.onnx")
    half = convert_fp16(path, tmp / "codex_encoder.fp16.onnx")
    return encoder, path, half


def test_codex_onnx_signature(codex_onnx):
    _, path, half = codex_onnx
    for p in (path, half):
        proto = onnx.load(str(p))
        (inp,), (out,) = proto.graph.input, proto.graph.output
        assert inp.name == "codex" and inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == [40, "grid_height", "grid_width"]
        assert out.name == "features" and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert [d.dim_value for d in out.type.tensor_type.shape.dim] == [40, 384]


def test_codex_onnx_parity_on_the_sample_grid(codex_onnx):
    encoder, path, half = codex_onnx
    s32, s16 = onnx_session(path, threads=2), onnx_session(half, threads=2)
    rng = np.random.default_rng(0)
    sparse = rng.gamma(2.0, 0.03, (40, 300, 260)).astype(np.float32)
    sparse[:, rng.random((300, 260)) < 0.3] = 0
    grids = {"sample": sample_grid(), "sample stretched": stretched(sample_grid()), "300x260": sparse}
    for name, grid in grids.items():
        f32 = codex_parity(encoder, s32, grid)["features"]
        f16 = codex_parity(encoder, s16, grid)["features"]
        print(f"CODEX encoder ONNX vs torch ({name} {grid.shape}): fp32 rel {f32['max_rel']:.2e}, "
              f"fp16 rel {f16['max_rel']:.2e}")
        assert f32["max_rel"] <= FP32 and f16["max_rel"] <= FP16, (name, f32, f16)


def test_codex_graph_equals_reference_pipeline(codex_onnx):
    """ONNX graph on the raw grid vs DINOv2 (torch) on the reference's PIL-preprocessed images: the residual
    is float32 arithmetic order only (the preprocessing is bit-exact)."""
    encoder, path, _ = codex_onnx
    grid = stretched(sample_grid())
    with torch.no_grad():
        ref = encoder(torch.from_numpy(reference_preprocess(grid))).numpy()
    (got,) = onnx_session(path, threads=2).run(["features"], {"codex": grid})
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    print(f"CODEX ONNX vs reference pipeline (PIL bicubic + torch DINOv2): rel {rel:.2e}")
    assert rel <= FP32


def test_fp16_codex_keeps_preprocessing_exact(codex_onnx, tmp_path):
    """In the fp16 file the /preprocess/ block is float32: its output equals the reference's exactly."""
    _, _, half = codex_onnx
    proto = onnx.load(str(half))
    pre = [n for n in proto.graph.node if n.name.startswith("/preprocess/")]
    to_half = [n for n in pre if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT16]
    assert [n.input[0] for n in to_half] == ["codex"]  # only the reference's float16 grid storage
    last = pre[-1].output[0]  # the normalised images, [40, 3, 224, 224] float32
    proto.graph.output.append(onnx.helper.make_tensor_value_info(last, onnx.TensorProto.FLOAT, None))
    onnx.save(proto, str(tmp_path / "probe.onnx"))
    grid = stretched(sample_grid())
    got = onnx_session(tmp_path / "probe.onnx").run([last], {"codex": grid})[0]
    with torch.no_grad():
        expected = CodexPreprocess()(torch.from_numpy(grid)).numpy()
    np.testing.assert_array_equal(np.broadcast_to(got, expected.shape), expected)


def test_codex_truncate_quantisation_export(tmp_path):
    encoder = Dinov2Encoder(Dinov2Config(depth=1)).eval()
    path = export_codex_onnx(encoder, tmp_path / "c.onnx", quantisation="truncate")
    grid = stretched(sample_grid()) * 3.0
    figures = codex_parity(encoder, onnx_session(path), grid, "truncate")
    assert figures["features"]["max_rel"] <= FP32
    with torch.no_grad():
        assert not torch.equal(CodexGraph(encoder, "truncate")(torch.from_numpy(grid)),
                               CodexGraph(encoder, "scale")(torch.from_numpy(grid)))


# --------------------------------------------------------------------------- MICA ONNX


@pytest.mark.parametrize("cfg", [MicaConfig(), MicaConfig(fusion="bilinear", pooling="gap"),
                                 MicaConfig(transformer_mode="shared")], ids=["default", "bilinear-gap", "shared"])
def test_mica_onnx_parity(cfg, tmp_path):
    torch.manual_seed(0)
    mica = Mica(cfg).eval()
    path = export_mica_onnx(mica, tmp_path / "mica.onnx")
    half = convert_fp16(path, tmp_path / "mica.fp16.onnx")
    s32, s16 = onnx_session(path), onnx_session(half)
    rng = np.random.default_rng(1)
    h_codex = rng.standard_normal((40, 384)).astype(np.float32)
    f32, f16 = [], []
    for n in (1, 2, 40, 1000):  # streamed in chunks of 300 (mica_parity) vs torch's whole-bag forward
        h_path = rng.standard_normal((n, 1024)).astype(np.float32)
        f32.append(mica_parity(mica, s32, h_path, h_codex))
        f16.append(mica_parity(mica, s16, h_path, h_codex))
    w32, w16 = worst(*f32), worst(*f16)
    print(f"MICA {cfg.fusion}/{cfg.pooling}/{cfg.transformer_mode} ONNX streamed vs torch, N=1..1000: "
          f"fp32 {w32}, fp16 {w16}")
    assert max(w32.values()) <= FP32 and max(w16.values()) <= FP16, (w32, w16)
    proto = onnx.load(str(path))
    dims = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output}
    assert dims == {"hazards": [1, 4], "survival": [1, 4], "risk": [1], "coattn_scores": [40, "tiles"],
                    "coattn_lse": [40], "coattn_mean": [40, 256]}
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert inputs == {"h_path": ["tiles", 1024], "h_codex": [40, 384], "coattn_lse_in": [40],
                      "coattn_mean_in": [40, 256]}
    # The online softmax stays float32 in the fp16 file: fp16 scores are cast up where they enter it.
    nodes = onnx.load(str(half)).graph.node
    to_float = {n.output[0] for n in nodes if n.op_type == "Cast" and n.name.startswith("fp16_boundary/")
                and n.attribute[0].i == onnx.TensorProto.FLOAT}
    accumulate = [n for n in nodes if n.name.startswith("/accumulate/")]
    assert {"Exp", "Log"} <= {n.op_type for n in accumulate}
    assert any(i in to_float for n in accumulate for i in n.input)


# --------------------------------------------------------------------------- HEX fp16


def he_tiles() -> list[np.ndarray]:
    shared_file("hex-official/he_patches/0_0.png")
    files = sorted(glob.glob(str(shared_file("hex-official/he_patches") / "*.png")))
    official = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    import openslide

    slide = openslide.OpenSlide(str(shared_file("slides/CMU-1-Small-Region.svs")))
    cmu = {s: np.stack([np.asarray(slide.read_region(c, 0, (s, s)).convert("RGB")) for c in ((700, 500), (1400, 1000))])
           for s in (112, 224)}
    return [official, cmu[112], cmu[224]]


def test_hex_fp16_parity_on_real_tiles(tmp_path):
    """Shallow HEX (random MUSK-layout encoder at 384 px + the official heads): fp32 and fp16 files vs torch fp32
    on hex-official he_patches and CMU-1-Small-Region tiles (112 and 224 px)."""
    enc = MuskConfig(depth=2, dim=1024, heads=16, ffn_dim=512)
    musk = save(musk_file_state(enc), tmp_path / "musk.safetensors")
    model, _ = build_hex(musk=musk, hex_heads=shared_file("hex-official/hex_heads_demo_checkpoint.pth"), cfg=enc)
    path = export_hex_onnx(model, tmp_path / "hex.onnx")
    half = convert_fp16(path, tmp_path / "hex.fp16.onnx")
    s32, s16 = onnx_session(path, threads=2), onnx_session(half, threads=2)
    tiles = he_tiles()
    w32 = worst(*(hex_parity(model, s32, t) for t in tiles))
    w16 = worst(*(hex_parity(model, s16, t) for t in tiles))
    print(f"HEX ONNX vs torch on real H&E: fp32 {w32}, fp16 {w16}")
    assert max(w32.values()) <= FP32 and max(w16.values()) <= FP16, (w32, w16)
    proto = onnx.load(str(half))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in proto.graph.output)
    weights = [t for t in proto.graph.initializer if len(t.dims) == 2]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
