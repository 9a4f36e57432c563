"""CLAM's own scripts, run unmodified from ../shared/reference/CLAM as the oracle for MICA's bags.

create_patches_fp.py and extract_features_fp.py run as CLAM's README runs them, each in a fresh
interpreter with CLAM's folder on its path. Two things make them run here, and only these:

* torchvision's PyPI build does not load beside the CPU torch (its compiled-op registration
  fails): a `sitecustomize` registers an empty `torchvision._meta_registrations` first (the shim
  ../shared/reference/README.md describes); torchvision's models and PIL transforms then work.
* CLAM's resnet50_trunc asks timm for the pretrained `resnet50.tv_in1k`, which timm fetches from
  the Hugging Face hub: the weights file under test is put where the hub client finds a
  download (HF_HUB_CACHE, offline), so timm loads it unmodified, as it would the real one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

TIMM_REPO = "timm/resnet50.tv_in1k"
SITECUSTOMIZE = (
    "import sys, types\n"
    "sys.modules.setdefault('torchvision._meta_registrations', types.ModuleType('torchvision._meta_registrations'))\n"
)


def _env(work: Path, clam: Path, hub: Path | None = None) -> dict:
    shim = work / "shim"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shim), str(clam)]), MPLBACKEND="Agg",
               CUDA_VISIBLE_DEVICES="")
    if hub is not None:
        env.update(HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1", HF_HOME=str(work / "hf-home"))
    return env


def run(script: str, args: list, *, clam: Path, work: Path, hub: Path | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(clam / script), *map(str, args)], cwd=work, capture_output=True,
                            text=True, env=_env(work, clam, hub), timeout=1800)
    assert result.returncode == 0, f"CLAM's {script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def patch(slide: Path, work: Path, clam: Path, settings: dict | None = None) -> Path:
    """create_patches_fp.py --seg --patch on one slide (its defaults; `settings` go into a process list,
    CLAM's per-slide parameter table); returns the patches h5, or the folder when it wrote none."""
    source = work / "source"
    source.mkdir(parents=True, exist_ok=True)
    link = source / slide.name
    if not link.exists():
        link.symlink_to(slide.resolve())
    save = work / "clam"
    save.mkdir(parents=True, exist_ok=True)
    args = ["--source", source, "--save_dir", save, "--patch", "--seg"]
    if settings:
        keys = list(settings)
        (save / "process_list.csv").write_text(
            ",".join(["slide_id", *keys]) + "\n" + ",".join([slide.name, *(str(settings[k]) for k in keys)]) + "\n")
        args += ["--process_list", "process_list.csv"]
    run("create_patches_fp.py", args, clam=clam, work=work)
    return save / "patches" / f"{slide.stem}.h5"


def extract_features(slide: Path, work: Path, clam: Path, weights: Path, batch_size: int = 32) -> Path:
    """extract_features_fp.py --model_name resnet50_trunc over the patches patch() wrote, with `weights`
    (torchvision / timm ResNet50 layout, safetensors) as timm's pretrained resnet50.tv_in1k."""
    hub = work / "hub"
    snapshot = hub / ("models--" + TIMM_REPO.replace("/", "--")) / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, snapshot / "model.safetensors")
    (snapshot.parents[1] / "refs").mkdir(exist_ok=True)
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    save = work / "clam"
    (save / "slides.csv").write_text(f"slide_id\n{slide.name}\n")
    run("extract_features_fp.py", ["--data_h5_dir", save, "--data_slide_dir", slide.parent, "--csv_path",
                                   save / "slides.csv", "--feat_dir", save / "features", "--batch_size", batch_size,
                                   "--slide_ext", slide.suffix, "--model_name", "resnet50_trunc"],
        clam=clam, work=work, hub=hub)
    return save / "features" / "h5_files" / f"{slide.stem}.h5"
