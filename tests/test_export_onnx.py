"""In-graph preprocessing (PIL-exact bilinear resize) and the HEX ONNX export, checked with ONNX Runtime."""

import glob

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="hexfast_export needs torch (pip install '.[export]')")
ort = pytest.importorskip("onnxruntime", reason="the ONNX checks need onnxruntime")
pytest.importorskip("onnx", reason="the ONNX export needs onnx")

from PIL import Image  # noqa: E402

from conftest import shared_file  # noqa: E402
from export_helpers import musk_file_state, save  # noqa: E402
from hexfast_export import MuskConfig, build_hex  # noqa: E402
from hexfast_export.onnx_export import export_hex_onnx, hex_parity, onnx_session  # noqa: E402
from hexfast_export.preprocess import HexPreprocess, PilBilinearResize  # noqa: E402

ENC = MuskConfig(depth=2, dim=1024, heads=16, ffn_dim=512)  # full 384 input, shallow encoder


def pil_reference(tile: np.ndarray) -> np.ndarray:
    """The reference's preprocessing: PIL bilinear resize to 384 (what transforms.Resize does to a PIL image)."""
    return np.asarray(Image.fromarray(tile).resize((384, 384), Image.Resampling.BILINEAR))


def he_patches() -> np.ndarray:
    shared_file("hex-official/he_patches/0_0.png")
    files = sorted(glob.glob(str(shared_file("hex-official/he_patches") / "*.png")))
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


def slide_tiles(size: int, n: int = 2) -> np.ndarray:
    import openslide

    slide = openslide.OpenSlide(str(shared_file("slides/CMU-1-Small-Region.svs")))
    coords = [(0, 0), (700, 500), (1400, 1000)][:n]
    return np.stack([np.asarray(slide.read_region(c, 0, (size, size)).convert("RGB")) for c in coords])


def torch_resize(tiles: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        return PilBilinearResize(384)(x).permute(0, 2, 3, 1).numpy().astype(np.uint8)


@pytest.mark.parametrize("size", [112, 224, 448])
def test_resize_is_bit_exact_with_pil_on_slide_tiles(size):
    """The three tile sizes of the reference's magnification buckets: 20x, 40x and 80x (antialiased)."""
    tiles = slide_tiles(size)
    ours = torch_resize(tiles)
    for tile, mine in zip(tiles, ours):
        np.testing.assert_array_equal(mine, pil_reference(tile))


def test_resize_is_bit_exact_with_pil_on_official_tiles_and_odd_sizes():
    for tile, mine in zip(he_patches(), torch_resize(he_patches())):
        np.testing.assert_array_equal(mine, pil_reference(tile))
    rng = np.random.default_rng(0)
    for size in (96, 300, 383, 384, 385, 500, 1000):
        tile = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        np.testing.assert_array_equal(torch_resize(tile[None])[0], pil_reference(tile))


def test_resize_384_is_identity_and_normalisation():
    rng = np.random.default_rng(1)
    tiles = rng.integers(0, 256, (2, 384, 384, 3), dtype=np.uint8)
    np.testing.assert_array_equal(torch_resize(tiles), tiles)
    with torch.no_grad():
        x = HexPreprocess()(torch.from_numpy(tiles))
    expected = (tiles.transpose(0, 3, 1, 2).astype(np.float32) / 255.0 - 0.5) / 0.5
    np.testing.assert_allclose(x.numpy(), expected, rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript-based exporter, used deliberately
def test_preprocess_onnx_is_bit_exact_with_pil(tmp_path):
    path = tmp_path / "pre.onnx"
    with torch.no_grad():
        torch.onnx.export(PilBilinearResize(384).eval(), (torch.zeros(1, 3, 224, 224),), str(path), dynamo=False,
                          opset_version=17, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}})
    session = onnx_session(path, threads=1)
    run = lambda t: session.run(["y"], {"x": t.transpose(0, 3, 1, 2).astype(np.float32)})[0]  # noqa: E731
    for size in (112, 224, 448):
        tiles = slide_tiles(size, n=1)
        np.testing.assert_array_equal(run(tiles)[0].transpose(1, 2, 0).astype(np.uint8), pil_reference(tiles[0]))
    # One graph for every size: the tap matrix is built in the graph from the input width and height.
    rng = np.random.default_rng(2)
    for size in (96, 383, 384, 385, 577, 1000):
        tile = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)
        np.testing.assert_array_equal(run(tile)[0].transpose(1, 2, 0).astype(np.uint8), pil_reference(tile[0]))


@pytest.fixture(scope="module")
def hex_onnx(tmp_path_factory):
    """Shallow HEX (random MUSK-layout encoder + the official heads) and its ONNX export."""
    tmp = tmp_path_factory.mktemp("onnx")
    musk = save(musk_file_state(ENC), tmp / "musk.safetensors")
    model, _ = build_hex(musk=musk, hex_heads=shared_file("hex-official/hex_heads_demo_checkpoint.pth"), cfg=ENC)
    path = export_hex_onnx(model, tmp / "hex.onnx")
    return model, path, onnx_session(path, threads=2)


def test_onnx_signature(hex_onnx):
    import onnx

    _, path, session = hex_onnx
    proto = onnx.load(str(path))
    shape = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert [(i.name, shape(i)) for i in proto.graph.input] == [("tiles", ["batch", "height", "width", 3])]
    assert [(o.name, shape(o)) for o in proto.graph.output] == [("markers", ["batch", 40]),
                                                                ("embedding", ["batch", 1024])]
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8


def test_onnx_matches_torch_on_official_tiles(hex_onnx):
    model, _, session = hex_onnx
    figures = hex_parity(model, session, he_patches())
    print(f"HEX ONNX vs torch (he_patches, 224 px, batch 3): {figures}")
    for name in ("markers", "embedding"):
        assert figures[name]["max_rel"] <= 1e-4, (name, figures)


@pytest.mark.parametrize("size,batch", [(448, 2), (112, 1), (384, 1)])
def test_onnx_dynamic_size_and_batch(hex_onnx, size, batch):
    model, _, session = hex_onnx
    figures = hex_parity(model, session, slide_tiles(size, n=batch))
    for name in ("markers", "embedding"):
        assert figures[name]["max_rel"] <= 1e-4, (size, name, figures)


def test_onnx_graph_equals_reference_preprocessing(hex_onnx):
    """The exported graph on raw tiles == the torch model on PIL-resized, normalised tiles."""
    model, _, session = hex_onnx
    tiles = he_patches()
    resized = np.stack([pil_reference(t) for t in tiles]).transpose(0, 3, 1, 2).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy((resized / 255.0 - 0.5) / 0.5))
    markers, embedding = session.run(["markers", "embedding"], {"tiles": tiles})
    scale = np.abs(ref.markers.numpy()).max()
    assert np.abs(markers - ref.markers.numpy()).max() <= 1e-4 * scale
    assert np.abs(embedding - ref.embedding.numpy()).max() <= 1e-4 * np.abs(ref.embedding.numpy()).max()
