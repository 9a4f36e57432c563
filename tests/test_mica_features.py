"""MICA's H&E bag as the official pipeline makes it: CLAM's patches and CLAM's resnet50_trunc features.

Oracles, none of them hexfast: timm's and torchvision's ResNet50 with the same weights (the encoder),
CLAM's eval transforms (the preprocessing), and CLAM's own create_patches_fp.py and
extract_features_fp.py run unmodified from ../shared/reference/CLAM (clam_reference.py) on
CMU-1-Small-Region and on a synthetic pyramidal slide (patch coordinates and the whole bag).
torchvision is imported with the stub ../shared/reference/README.md describes.
"""

from __future__ import annotations

import json
import sys
import types

import h5py
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the encoder parity needs torch (pip install '.[export]')")
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
torchvision = pytest.importorskip("torchvision", reason="the reference ResNet50 needs torchvision (the [test] extra)")
timm = pytest.importorskip("timm", reason="CLAM's encoder is timm's resnet50.tv_in1k (the [test] extra)")
pytest.importorskip("cv2", reason="CLAM's patching needs OpenCV")

import clam_reference  # noqa: E402
from conftest import hexfast, one_line_error, shared_reference  # noqa: E402
from export_helpers import musk_file_state, save  # noqa: E402
from hexfast.bundle import DEFAULT_BUNDLE, load_bundle  # noqa: E402
from hexfast.slide import open_slide  # noqa: E402
from hexfast.slide.clam_patches import ClamParams, clam_patches  # noqa: E402
from hexfast.stream import TileStream  # noqa: E402
from hexfast_export.resnet_trunc import (  # noqa: E402
    RESNET50_TRUNC, HeFeatureGraph, HeFeaturePreprocess, ResNetTrunc, load_resnet50_trunc,
)

SHALLOW_FLAG = "depth=2,ffn_dim=512"
SMALL_REGION = {"a_t": 1}  # CMU-1-Small-Region (1.6 mm²) is below CLAM's default minimum tissue area


def random_resnet50(seed: int = 0):
    """torchvision's ResNet50 with seeded weights and BatchNorm statistics that are not the identity."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet50().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory):
    """The user's weights file: torchvision's resnet50 state dict (timm's resnet50.tv_in1k layout) as safetensors."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("weights") / "resnet50.safetensors"
    save_file({k: v.contiguous() for k, v in random_resnet50().state_dict().items()}, str(path))
    return path


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# --------------------------------------------------------------------------- encoder


def test_resnet50_trunc_equals_timm_and_torchvision(tmp_path):
    """ResNetTrunc vs timm's resnet50.tv_in1k features_only out_indices=(3,) + AdaptiveAvgPool2d (CLAM's
    TimmCNNEncoder) and torchvision's resnet50 stem..layer3 + pool, same random weights: fp32 <= 1e-5."""
    tv = random_resnet50()
    sd = tv.state_dict()
    trunk = timm.create_model("resnet50.tv_in1k", features_only=True, out_indices=(3,), pretrained=False,
                              num_classes=0).eval()
    trunk.load_state_dict({k: v for k, v in sd.items() if not k.startswith(("layer4.", "fc."))}, strict=True)
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        via_timm = torch.nn.AdaptiveAvgPool2d(1)(trunk(x)[0]).squeeze(-1).squeeze(-1)
        h = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        via_torchvision = tv.layer3(tv.layer2(tv.layer1(h))).mean(dim=(2, 3))
        for layout in ("torchvision", "clam"):  # a full state dict, and CLAM's TimmCNNEncoder's own
            if layout == "torchvision":
                tensors = sd
            else:
                tensors = {f"model.{k}": v for k, v in trunk.state_dict().items()}
            path = tmp_path / f"{layout}.pth"
            torch.save(tensors, path)
            ours, report = load_resnet50_trunc(path)
            got = ours(x)
            assert got.shape == (3, 1024)
            assert rel(got, via_timm) <= 1e-5 and rel(got, via_torchvision) <= 1e-5, layout
            print(f"{layout} layout: {report.summary()}; vs timm {rel(got, via_timm):.2e}, "
                  f"vs torchvision {rel(got, via_torchvision):.2e}")


def test_a_resnet50_file_that_is_not_one_is_refused(tmp_path):
    from hexfast_export.checkpoints import CheckpointError

    sd = random_resnet50().state_dict()
    del sd["layer3.5.conv2.weight"]
    torch.save(sd, tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match=r"layer3\.5\.conv2\.weight"):
        load_resnet50_trunc(tmp_path / "cut.pth")
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(CheckpointError):
        load_resnet50_trunc(tmp_path / "r18.pth")


def test_preprocessing_equals_clam_eval_transforms(cmu_small):
    """HeFeaturePreprocess vs CLAM's get_eval_transforms (torchvision Resize(224) on the PIL patch, ToTensor,
    Normalize) from utils/transform_utils.py, on CLAM-sized patches of CMU-1: identical floats."""
    clam = shared_reference("CLAM")
    sys.path.insert(0, str(clam))
    try:
        from utils.constants import MODEL2CONSTANTS
        from utils.transform_utils import get_eval_transforms
    finally:
        sys.path.remove(str(clam))
    from PIL import Image

    constants = MODEL2CONSTANTS["resnet50_trunc"]
    transforms = get_eval_transforms(mean=constants["mean"], std=constants["std"], target_img_size=224)
    slide = open_slide(cmu_small)
    coords = np.array([[0, 0], [700, 900], [1900, 2700], [2100, 2900]])  # the last two reach past the edge
    tiles = np.concatenate([np.array(t) for _, t in TileStream(slide, coords, read_size=256, batch_size=4)])
    with torch.no_grad():
        ours = HeFeaturePreprocess()(torch.from_numpy(tiles))
    ref = torch.stack([transforms(Image.fromarray(t)) for t in tiles])
    assert ours.shape == ref.shape == (4, 3, 224, 224)
    assert torch.equal(ours, ref), float((ours - ref).abs().max())


# --------------------------------------------------------------------------- patching


def pyramid_slide(path):
    """A 3-level generic TIFF, 16000 x 12000 at 0.25 µm/px (4 x 3 mm; downsamples 4 and (16, 15.98): not an
    integer on one axis): two tissue islands above CLAM's default minimum area, one with a lumen large enough
    to stay a hole and one small enough to be filled, and a speck below the minimum, on glass. Level 0 is
    written tile by tile (nearest from level 1), so the file costs little memory."""
    import tifffile
    from PIL import Image, ImageDraw

    w, h = 16000, 12000
    sizes = [(w, h), (4000, 3000), (1000, 751)]
    shapes = [("ellipse", (500, 1500, 9500, 9500), 255), ("ellipse", (3500, 4000, 6500, 7000), 0),
              ("ellipse", (7000, 2500, 8500, 4000), 0), ("polygon", [(10500, 1000), (15500, 2000), (15000, 11000),
                                                                     (11000, 9500)], 255),
              ("ellipse", (12500, 11200, 12700, 11400), 255)]

    def mask(size):
        sx, sy = size[0] / w, size[1] / h
        img = Image.new("L", size, 0)
        draw = ImageDraw.Draw(img)
        for kind, geometry, fill in shapes:
            if kind == "ellipse":
                x0, y0, x1, y1 = geometry
                draw.ellipse((x0 * sx, y0 * sy, x1 * sx, y1 * sy), fill=fill)
            else:
                draw.polygon([(x * sx, y * sy) for x, y in geometry], fill=fill)
        return np.asarray(img) > 0

    def colour(tissue):
        rgb = np.empty((*tissue.shape, 3), np.uint8)
        rgb[:] = (242, 240, 245)
        rgb[tissue] = (215, 140, 190)
        return rgb

    level1 = mask(sizes[1])

    def level0_tiles():
        for ty in range(0, h, 256):
            for tx in range(0, w, 256):
                ys = np.minimum((np.arange(ty, ty + 256) * sizes[1][1]) // h, sizes[1][1] - 1)
                xs = np.minimum((np.arange(tx, tx + 256) * sizes[1][0]) // w, sizes[1][0] - 1)
                yield colour(level1[np.ix_(ys, xs)])

    with tifffile.TiffWriter(path) as tif:
        for i, size in enumerate(sizes):
            res = 1e4 / 0.25 / (w / size[0])
            data = level0_tiles() if i == 0 else colour(mask(size))
            extra = {"shape": (h, w, 3), "dtype": np.uint8} if i == 0 else {}
            tif.write(data, tile=(256, 256), photometric="rgb", compression="zlib", subfiletype=1 if i else 0,
                      resolution=(res, res), resolutionunit="CENTIMETER", metadata=None, **extra)
    return path


@pytest.mark.parametrize("case", ["cmu-defaults", "cmu-small-region-preset", "pyramid-defaults"])
def test_patches_equal_clam_create_patches_fp(tmp_path, cmu_small, case):
    """The same coordinates as CLAM's own create_patches_fp.py --seg --patch, in the same order.

    CMU-1-Small-Region with CLAM's defaults: no patch at all, in both (its 1.6 mm² of tissue is below
    a_t = 100 reference patches of 512² level-0 px, 26 mm² at 20x); with a_t = 1 (CLAM's process list): one
    contour, 50 patches. The pyramid: seg level 2 (best for downsample 64), a per-axis downsample of
    (16, 15.98), two islands, a lumen kept, one filled, a speck dropped."""
    clam = shared_reference("CLAM")
    slide_path = cmu_small if case.startswith("cmu") else pyramid_slide(tmp_path / "pyramid.tiff")
    settings = SMALL_REGION if case == "cmu-small-region-preset" else None
    h5 = clam_reference.patch(slide_path, tmp_path / "clam-run", clam, settings)
    slide = open_slide(slide_path)
    ours = clam_patches(slide, ClamParams(**(settings or {})))
    if case == "cmu-defaults":
        assert not h5.exists() and len(ours) == 0
        return
    with h5py.File(h5, "r") as f:
        ref = f["coords"][:]
        attrs = dict(f["coords"].attrs)
    np.testing.assert_array_equal(ours.coords, ref)
    assert ours.patch_size == attrs["patch_size"] == 256 and attrs["patch_level"] == 0
    if case == "pyramid-defaults":
        assert ours.seg_level == 2 and ours.contours == 2 and len(ours) > 150
    print(f"{case}: {len(ours)} patches, {ours.contours} contours, seg level {ours.seg_level}: equal to CLAM's")


# --------------------------------------------------------------------------- the whole bag, end to end


@pytest.fixture(scope="module")
def clam_bundle(tmp_path_factory, resnet50_file):
    """A bundle exported as a lab would, from files: a 2-layer MUSK + the official heads, DINOv2 and MICA
    (random), CLAM's resnet50_trunc from the weights file, patching with CLAM's preset CSV (a_t = 1)."""
    from conftest import shared_file
    from hexfast_export import Dinov2Encoder, Mica, MicaConfig, MuskConfig

    work = tmp_path_factory.mktemp("clam-bundle")
    musk = save(musk_file_state(MuskConfig(depth=2, dim=1024, heads=16, ffn_dim=512)), work / "model.safetensors")
    torch.manual_seed(0)
    torch.save(Dinov2Encoder().state_dict(), work / "dinov2.pth")
    torch.save(Mica(MicaConfig(pooling="attn")).state_dict(), work / "s_0_checkpoint.pt")
    preset = work / "small_region.csv"
    preset.write_text("seg_level,sthresh,mthresh,close,use_otsu,a_t,a_h,max_n_holes,vis_level,line_thickness,"
                      "use_padding,contour_fn,keep_ids,exclude_ids\n-1,8,7,4,False,1,16,8,-1,250,True,four_pt,none,"
                      "none\n")
    out = work / "bundle"
    r = hexfast("export", "--musk", musk, "--hex-heads", shared_file("hex-official/hex_heads_demo_checkpoint.pth"),
                "--musk-config", SHALLOW_FLAG, "--dinov2", work / "dinov2.pth", "--mica", work / "s_0_checkpoint.pt",
                "--mica-pooling", "attn", "--mica-features", "resnet50-trunc", "--resnet50", resnet50_file,
                "--clam-preset", preset, "-o", out, timeout=1800)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def clam_bag(tmp_path_factory, resnet50_file):
    """CLAM's own bag of CMU-1-Small-Region: create_patches_fp.py (a_t = 1 in its process list), then
    extract_features_fp.py --model_name resnet50_trunc with the weights file as timm's resnet50.tv_in1k."""
    from conftest import shared_file

    slide = shared_file("slides/CMU-1-Small-Region.svs")
    clam = shared_reference("CLAM")
    work = tmp_path_factory.mktemp("clam-run")
    clam_reference.patch(slide, work, clam, SMALL_REGION)
    return clam_reference.extract_features(slide, work, clam, resnet50_file)


def test_bag_equals_clam_feature_extraction(tmp_path, cmu_small, clam_bundle, clam_bag):
    """`hexfast score` on CMU-1-Small-Region: the h5's mica_coords are CLAM's coords and mica_features
    CLAM's extract_features_fp.py resnet50_trunc features (timm loading the same weights file) to <= 1e-4;
    report.json's most-attended tiles are in that grid; the manifest carries the parity figures."""
    with h5py.File(clam_bag, "r") as f:
        ref_coords, ref_features = f["coords"][:], f["features"][:]

    # --mpp 0.25: HEX's 40x tiles (224 px, 4x fewer than at 20x) keep the run short; CLAM's patches are level-0
    # pixels whatever the resolution
    r = hexfast("score", "--model", clam_bundle, cmu_small, "--mpp", "0.25", "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    stem = cmu_small.stem
    with h5py.File(tmp_path / "out" / stem / f"{stem}.h5", "r") as f:
        coords, features = f["mica_coords"][:], f["mica_features"][:]
        attrs = dict(f["mica_coords"].attrs)
        hex_tiles = len(f["coords"])
    np.testing.assert_array_equal(coords, ref_coords)
    assert features.shape == ref_features.shape == (50, 1024) and features.dtype == np.float32
    assert rel(features, ref_features) <= 1e-4, rel(features, ref_features)
    print(f"bag vs CLAM's own run: {len(coords)} patches, features max|Δ|/max|ref| {rel(features, ref_features):.2e}"
          f" (HEX grid: {hex_tiles} tiles)")
    assert attrs["patch_size"] == 256 and attrs["patch_level"] == 0 and attrs["name"] == stem

    report = json.loads((tmp_path / "out" / stem / "report.json").read_text())
    mica = report["mica"]
    assert mica["bag"]["features"] == "resnet50-trunc" and mica["bag"]["tiles"] == 50
    listed = {(t["x"], t["y"]) for t in mica["most_attended"]["overall"]}
    assert listed <= {tuple(c) for c in ref_coords.tolist()}
    entry = load_bundle(clam_bundle).manifest["models"]["he_features"]
    assert entry["parity"]["fp32"]["features"] <= 1e-4 and entry["tile"] == {"px": 256, "level": 0, "target_px": 224}


def test_a_labs_own_clam_bags(tmp_path, cmu_small, clam_bundle, clam_bag):
    """--mica-bag DIR: CLAM's h5_files/<slide>.h5 fed to MICA as is gives the computed run's risk; a missing,
    mismatched or foreign bag is one line naming the file."""
    ref_h5 = clam_bag
    bags = ref_h5.parents[1]  # CLAM's feat_dir: h5_files/ and pt_files/
    computed = hexfast("score", "--model", clam_bundle, cmu_small, "--mpp", "0.25", "-o", tmp_path / "computed")
    given = hexfast("score", "--model", clam_bundle, cmu_small, "--mpp", "0.25", "--mica-bag", bags,
                    "-o", tmp_path / "given")
    assert computed.returncode == 0 and given.returncode == 0, given.stderr
    stem = cmu_small.stem
    a = json.loads((tmp_path / "computed" / stem / "report.json").read_text())["mica"]
    b = json.loads((tmp_path / "given" / stem / "report.json").read_text())["mica"]
    assert b["bag"]["source"] == str(ref_h5) and b["bag"]["tiles"] == 50
    assert abs(a["risk"] - b["risk"]) <= 1e-5 * max(1.0, abs(a["risk"])), (a["risk"], b["risk"])
    with h5py.File(tmp_path / "given" / stem / f"{stem}.h5", "r") as f:  # the h5 keeps what MICA read
        assert f["mica_features"].shape == (50, 1024)

    def bad_bag(name, **datasets):
        d = tmp_path / name
        d.mkdir()
        with h5py.File(d / f"{stem}.h5", "w") as f:
            for key, value in datasets.items():
                f[key] = value
        return d

    ok_coords = np.array([[0, 0], [256, 0]])
    cases = [
        (tmp_path / "empty-dir", "holds no CLAM bag for slide CMU-1-Small-Region"),
        (bad_bag("narrow", features=np.zeros((2, 768), np.float32), coords=ok_coords), "768 wide"),
        (bad_bag("other-slide", features=np.zeros((2, 1024), np.float32), coords=np.array([[0, 0], [40000, 9000]])),
         "beyond slide CMU-1-Small-Region"),
        (bad_bag("not-clam", embeddings=np.zeros((2, 1024), np.float32)), "is not a CLAM features h5"),
        (bad_bag("counts", features=np.zeros((3, 1024), np.float32), coords=ok_coords), "3 feature rows for 2"),
    ]
    (tmp_path / "empty-dir").mkdir()
    for directory, fragment in cases:
        r = hexfast("score", "--model", clam_bundle, cmu_small, "--mica-bag", directory, "-o", tmp_path / "bad")
        assert r.returncode != 0, directory
        errors = [line for line in r.stderr.splitlines() if "error" in line]
        assert len(errors) == 1 and fragment in errors[0] and "Traceback" not in r.stderr, r.stderr


def test_mica_bag_needs_a_bundle_with_mica(tmp_path, cmu_small):
    demo = tmp_path / "hex-only"
    import shutil

    shutil.copytree(DEFAULT_BUNDLE, demo)
    manifest = json.loads((demo / "manifest.json").read_text())
    for name in ("mica", "codex_encoder", "he_features"):
        manifest["models"].pop(name)
    manifest.pop("mica_features")
    (demo / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(hexfast("score", "--model", demo, cmu_small, "--mica-bag", tmp_path, "-o", tmp_path / "o"),
                   "--mica-bag feeds MICA", "no MICA model")


def test_empty_bag_skips_mica_and_says_why(tmp_path, cmu_small):
    """CLAM's default minimum tissue area on a small region: no patch, so no MICA (CLAM would have no bag):
    the slide's outputs are complete, report.json says why, and the run warns."""
    import shutil

    demo = tmp_path / "defaults"
    shutil.copytree(DEFAULT_BUNDLE, demo)
    manifest = json.loads((demo / "manifest.json").read_text())
    manifest["mica_features"]["patching"]["a_t"] = 100.0  # CLAM's default
    (demo / "manifest.json").write_text(json.dumps(manifest))
    r = hexfast("score", "--model", demo, cmu_small, "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "MICA not run: CLAM's patching found no tissue contour" in r.stderr
    mica = json.loads((tmp_path / "out" / cmu_small.stem / "report.json").read_text())["mica"]
    assert "risk" not in mica and "no tissue contour" in mica["skipped"] and mica["bag"]["tiles"] == 0


def test_in_memory_results_carry_the_bag(cmu_small):
    """Scorer.score without an output directory: the bag's coords and features come back in the result,
    and equal the he_features model run on CLAM's patches directly."""
    from hexfast import Scorer
    from hexfast.engines import create_engine

    with Scorer() as scorer:
        result = scorer.score(cmu_small)
    bundle = load_bundle()
    slide = open_slide(cmu_small)
    patches = clam_patches(slide, ClamParams.from_manifest(bundle.mica_features["patching"], "manifest"))
    np.testing.assert_array_equal(result.mica_coords, patches.coords)
    engine = create_engine(bundle.model_file("he_features"), "ort-cpu")
    tiles = np.concatenate([np.array(t) for _, t in TileStream(slide, patches.coords, read_size=256)])
    np.testing.assert_allclose(result.mica_features, engine.run({"tiles": tiles})["features"], rtol=0, atol=1e-6)
    assert result.mica["bag"]["tiles"] == len(patches) and "risk" in result.mica


def test_he_feature_graph_program_and_onnx_agree_on_real_patches(tmp_path, cmu_small):
    """The he_features graph (torch), its ONNX file and torch program, full-size ResNet50 random weights,
    on CMU-1 patches: each within 1e-5 of the torch model."""
    from hexfast_export.onnx_export import export_he_features_onnx, onnx_session
    from hexfast_export.torch_export import export_he_features_program, load_program, run_program

    model = ResNetTrunc(RESNET50_TRUNC)
    model.load_state_dict({k: v for k, v in random_resnet50(3).state_dict().items()
                           if not k.startswith(("layer4.", "fc.")) and "num_batches" not in k})
    slide = open_slide(cmu_small)
    tiles = np.concatenate([np.array(t) for _, t in TileStream(slide, np.array([[600, 800], [1200, 1500]]),
                                                                 read_size=256)])
    with torch.no_grad():
        ref = HeFeatureGraph(model.eval())(torch.from_numpy(tiles)).numpy()
    onnx_out = onnx_session(export_he_features_onnx(model, tmp_path / "f.onnx")).run(None, {"tiles": tiles})[0]
    program_out = run_program(load_program(export_he_features_program(model, tmp_path / "f.pt2")), {"tiles": tiles})[0]
    assert rel(onnx_out, ref) <= 1e-5 and rel(program_out, ref) <= 1e-5


# --------------------------------------------------------------------------- declared, never guessed


def test_export_refuses_to_guess_micas_configuration(tmp_path):
    from hexfast_export import Mica, MicaConfig

    torch.save(Mica(MicaConfig(pooling="gap", fusion="bilinear")).state_dict(), tmp_path / "m.pt")
    (tmp_path / "x.pth").write_bytes(b"")
    common = ["export", "--hex", tmp_path / "x.pth", "--dinov2", tmp_path / "x.pth", "--mica", tmp_path / "m.pt"]
    out = ["-o", tmp_path / "b"]
    one_line_error(hexfast(*common, "--mica-pooling", "gap", *out), "--mica-features resnet50-trunc",
                   "hex-embedding")
    one_line_error(hexfast(*common, "--mica-features", "hex-embedding", *out), "--mica-pooling attn|gap",
                   "cannot tell")
    one_line_error(hexfast(*common, "--mica-pooling", "gap", "--mica-features", "resnet50-trunc", *out),
                   "needs --resnet50")
    one_line_error(hexfast("export", "--demo", "--mica-features", "hex-embedding", "--resnet50", tmp_path / "x.pth",
                           "-o", tmp_path / "d"), "go with --mica-features resnet50-trunc")
    from hexfast_export.checkpoints import CheckpointError, load_mica

    with pytest.raises(CheckpointError, match="bilinear fusion model, not concat"):
        load_mica(tmp_path / "m.pt", pooling="gap", fusion="concat")
    with pytest.raises(CheckpointError, match="separate transformer mode model, not shared"):
        load_mica(tmp_path / "m.pt", pooling="gap", transformer_mode="shared")
    model, report = load_mica(tmp_path / "m.pt", pooling="gap")
    assert (model.cfg.fusion, model.cfg.pooling, model.cfg.transformer_mode) == ("bilinear", "gap", "separate")
    assert "pooling=gap (given)" in report.summary()


def test_pooling_is_not_in_the_weights():
    """Why --mica-pooling is required: the same state dict loads under either pooling, and the two answers
    differ."""
    from hexfast_export import Mica, MicaConfig

    torch.manual_seed(0)
    sd = Mica(MicaConfig(pooling="gap")).state_dict()
    gap, attn = Mica(MicaConfig(pooling="gap")).eval(), Mica(MicaConfig(pooling="attn")).eval()
    gap.load_state_dict(sd)
    attn.load_state_dict(sd)
    x, c = torch.randn(50, 1024), torch.randn(40, 384)
    with torch.no_grad():
        assert not torch.allclose(gap(x, c).hazards, attn(x, c).hazards, atol=1e-3)


def test_clam_preset_csv_is_read_as_clam_reads_it(tmp_path):
    from hexfast.cli.models import read_clam_preset
    from hexfast.errors import HexfastError

    preset = tmp_path / "tcga.csv"  # CLAM's presets/tcga.csv columns
    preset.write_text("seg_level,sthresh,mthresh,close,use_otsu,a_t,a_h,max_n_holes,vis_level,line_thickness,"
                      "white_thresh,black_thresh,use_padding,contour_fn,keep_ids,exclude_ids\n"
                      "-1,15,11,2,False,16,4,8,-1,50,5,50,True,four_pt,none,none\n")
    got = read_clam_preset(preset)
    assert got == {"seg_level": -1, "sthresh": 15, "mthresh": 11, "close": 2, "use_otsu": False, "a_t": 16.0,
                   "a_h": 4.0, "max_n_holes": 8, "use_padding": True, "contour_fn": "four_pt"}
    ClamParams(**got)
    preset.write_text("a_t,keep_ids\n1,\"0,2\"\n")
    with pytest.raises(HexfastError, match="keep_ids picks contours"):
        read_clam_preset(preset)
