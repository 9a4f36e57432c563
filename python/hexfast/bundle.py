"""Model bundles: a directory with `manifest.json` and the files it lists (numpy/json only, no torch).

    bundle = load_bundle()                      # the untrained demo model shipped with hexfast
    bundle = load_bundle("models/hex-lung")     # one written by `hexfast export`
    bundle.model_path("hex", "fp16")            # Path to hex.fp16.onnx
    bundle.model_file("hex")                    # ListedFile: read() checks its sha256 first
    bundle.engine_cache_dir(key)                # TensorRT plans for this bundle, outside it

A bundle is executable content: ONNX graphs, torch.export programs (which
unpickle) and TensorRT plans can all carry code or change results. So the
runtime opens only files the manifest lists, and a loader is only ever given
the bytes of a `ListedFile.read()`, checked against the manifest's sha256 as
they are read (nothing can change between the check and the load). Files the
manifest does not list are never opened. Trust comes from the bundle's hash
(`bundle.hash`, the sha256 of manifest.json): get bundles from someone you
trust and compare it.

`load_bundle` checks the schema, the manifest's required keys and the sha256
of every file the manifest lists; every problem is a one-line `BundleError`
(a `HexfastError`) naming the file. TensorRT plans are built on the target GPU
into a cache outside the bundle (engine_cache_dir), with their own sha256
recorded when built and checked when loaded (engines.build, engines.trt).

Manifest (schema 2):

    schema: 2, demo: bool, exporter: "hexfast_export <version>", created: ISO UTC,
    markers: [40 names], tile: {"um": 56.0, "px_at_40x": 224},
    input_normalisation: text,
    models: {name: {files: {precision: ONNX file}, programs: {precision: .pt2 file} (optional),
                    inputs: {tensor: {dtype, shape}}, outputs: {...},
                    parity: {precision: {output: max|Δ|/max|ref|}}, ...}},
        names: "hex" (required), "codex_encoder", "mica", "he_features" (optional)
    mica_features: what MICA's bag is, declared at export (required when "mica" is):
        {"kind": "resnet50-trunc", "model": "he_features", "patching": {CLAM's parameters}, ...}
            CLAM's patches (slide.clam_patches) through the he_features model: the official pipeline;
        {"kind": "hex-embedding", "model": "hex", ...}: the HEX embedding on hexfast's grid.
    sources: {role: {path, sha256}}, files: {relative path: sha256}
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import HexfastError
from .files import sha256_file

SCHEMA = 2  # 2: MICA's graph is a chunk step with an online-softmax state (schema 1: all tiles at once)
MANIFEST = "manifest.json"
PRECISIONS = ("fp32", "fp16")
MICA_FEATURES = ("resnet50-trunc", "hex-embedding")  # MICA bags hexfast can make (mica_features.kind)
REQUIRED_KEYS = ("schema", "demo", "exporter", "markers", "tile", "input_normalisation", "models", "files")
DEFAULT_BUNDLE = Path(__file__).resolve().parent / "models" / "demo"
ENGINE_CACHE_ENV = "HEXFAST_ENGINE_CACHE"


class BundleError(HexfastError):
    """A model bundle that cannot be used: one line naming the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ManifestMissingError(BundleError):
    """No manifest.json (not a bundle, or an incomplete copy)."""


class ManifestInvalidError(BundleError):
    """manifest.json is not JSON, has an unsupported schema, or lacks required keys."""


class BundleFileMissingError(BundleError):
    """A file the manifest lists is absent."""


class ChecksumError(BundleError):
    """A file's sha256 differs from the manifest's (corrupted or edited)."""


class MissingModelError(BundleError):
    """The bundle has no such model (or not at that precision)."""


@dataclass(frozen=True)
class ListedFile:
    """A file whose sha256 was recorded (by the manifest, or by build-engines for a plan). read()
    returns its bytes only after checking them: a loader given those bytes loads exactly what was
    hashed, and never opens anything by path."""

    path: Path
    sha256: str
    recorded_by: str = "the manifest"

    def read(self) -> bytes:
        try:
            data = Path(self.path).read_bytes()
        except OSError as e:
            raise BundleFileMissingError(self.path, f"cannot read it: {e.strerror}") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != self.sha256:
            raise ChecksumError(self.path, f"sha256 {actual[:12]}… does not match {self.recorded_by}'s "
                                           f"{str(self.sha256)[:12]}… (corrupted or modified file); not loading it")
        return data


class Bundle:
    """A verified model bundle. Attributes: path, manifest (dict), demo, markers, hash (sha256 of
    manifest.json), tile_um."""

    def __init__(self, path: Path, manifest: dict[str, Any], manifest_hash: str):
        self.path = path
        self.manifest = manifest
        self.hash = manifest_hash
        self.demo = bool(manifest["demo"])
        self.markers: list[str] = list(manifest["markers"])
        self.tile_um = float(manifest["tile"]["um"])

    def __repr__(self) -> str:
        models = ", ".join(self.models)
        return f"Bundle({str(self.path)!r}, models=[{models}], demo={self.demo})"

    @property
    def models(self) -> list[str]:
        return list(self.manifest["models"])

    def has(self, name: str, precision: str | None = None) -> bool:
        entry = self.manifest["models"].get(name)
        if entry is None:
            return False
        return precision is None or precision in entry["files"]

    def model(self, name: str) -> dict[str, Any]:
        """The manifest entry of a model (files, inputs, outputs, parity, ...)."""
        entry = self.manifest["models"].get(name)
        if entry is None:
            raise MissingModelError(self.path / MANIFEST, f"the bundle has no '{name}' model "
                                                          f"(it has {', '.join(self.models)})")
        return entry

    def listed(self, rel: str) -> ListedFile:
        """A file of the manifest's `files`, with its recorded sha256."""
        sha = self.manifest["files"].get(rel)
        if sha is None:
            raise BundleError(self.path / rel, "is not listed in the bundle's manifest.json; hexfast opens only "
                                               "listed files")
        return ListedFile(self.path / rel, sha)

    @property
    def mica_features(self) -> dict | None:
        """What MICA's bag is (manifest `mica_features`), or None for a bundle without MICA."""
        return dict(self.manifest["mica_features"]) if "mica" in self.manifest["models"] else None

    def model_file(self, name: str, precision: str = "fp32") -> ListedFile:
        """The model's ONNX file at `precision`, to be read (and checked) by a loader."""
        return self.listed(self.model_path(name, precision).relative_to(self.path).as_posix())

    def program_file(self, name: str, precision: str = "fp32") -> ListedFile | None:
        """The model's torch.export program (.pt2) at `precision` the manifest lists, or None: no
        other .pt2 is ever loaded, whatever lies in the bundle's folder."""
        program = self.model(name).get("programs", {}).get(precision)
        return self.listed(program) if program is not None else None

    def model_path(self, name: str, precision: str = "fp32") -> Path:
        files = self.model(name)["files"]
        if precision not in files:
            raise MissingModelError(self.path / MANIFEST, f"the '{name}' model has no {precision} file "
                                                          f"(it has {', '.join(files)}); re-export with --fp16"
                                    if precision == "fp16" else f"the '{name}' model has no {precision} file")
        return self.path / files[precision]

    def engine_cache_dir(self, key: str) -> Path:
        """Where TensorRT plans for `key` (GPU + TensorRT version) built from this bundle live:
        $HEXFAST_ENGINE_CACHE (default ~/.cache/hexfast/engines) / <bundle hash[:16]> / <key>/.

        Outside the bundle: a plan is code the GPU runs, so it comes only from this machine's
        build-engines, never with a bundle from elsewhere. Not created here."""
        if not key or not re.fullmatch(r"[A-Za-z0-9._+-]+", key) or key in (".", ".."):
            raise ValueError(f"engine cache key {key!r} must be a plain name (letters, digits, . _ + -)")
        return engine_cache_root() / self.hash[:16] / key


def engine_cache_root() -> Path:
    root = os.environ.get(ENGINE_CACHE_ENV)
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hexfast" / "engines"


def _fail_manifest(path: Path, problem: str):
    raise ManifestInvalidError(path, problem)


def _validate(manifest: Any, where: Path) -> None:
    if not isinstance(manifest, Mapping):
        _fail_manifest(where, "is not a JSON object")
    schema = manifest.get("schema")
    if schema != SCHEMA:
        if isinstance(schema, int) and schema > SCHEMA:
            _fail_manifest(where, f"schema {schema} is newer than this hexfast reads ({SCHEMA}); upgrade hexfast")
        if schema == 1:
            _fail_manifest(where, "schema 1 was written by an older hexfast (its MICA graph takes all tiles at once); "
                                  "export the bundle again with this hexfast's `hexfast export`")
        _fail_manifest(where, f"unsupported schema {schema!r} (expected {SCHEMA})")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        _fail_manifest(where, f"lacks required key(s) {', '.join(missing)}")
    markers = manifest["markers"]
    if not (isinstance(markers, list) and markers and all(isinstance(m, str) for m in markers)):
        _fail_manifest(where, "'markers' must be a list of marker names")
    tile = manifest["tile"]
    if not (isinstance(tile, Mapping) and isinstance(tile.get("um"), (int, float)) and tile["um"] > 0):
        _fail_manifest(where, "'tile' must hold a positive 'um'")
    models = manifest["models"]
    if not isinstance(models, Mapping):
        _fail_manifest(where, "'models' must be an object")
    if "hex" not in models:
        raise MissingModelError(where, "the bundle has no 'hex' model (required)")
    files = manifest["files"]
    if not isinstance(files, Mapping):
        _fail_manifest(where, "'files' must be an object of path: sha256")
    for name, entry in models.items():
        if not (isinstance(entry, Mapping) and isinstance(entry.get("files"), Mapping) and "fp32" in entry["files"]):
            _fail_manifest(where, f"model '{name}' must list its files, with an fp32 one")
        programs = entry.get("programs", {})
        if not isinstance(programs, Mapping):
            _fail_manifest(where, f"model '{name}' programs must be an object of precision: file")
        for precision, file in [*entry["files"].items(), *programs.items()]:
            if file not in files:
                _fail_manifest(where, f"model '{name}' {precision} file {file} is not among the listed files")
        for side in ("inputs", "outputs"):
            _validate_tensors(entry.get(side, {}), f"models.{name}.{side}", where)
    for (model, side, tensor, axis) in FIXED_DIMS:
        spec = models.get(model, {}).get(side, {}).get(tensor)
        if model in models and spec is not None:
            dim = spec["shape"][axis] if -len(spec["shape"]) <= axis < len(spec["shape"]) else None
            if not (type(dim) is int and dim > 0):
                _fail_manifest(where, f"models.{model}.{side}.{tensor}.shape {json.dumps(spec['shape'])} needs a positive "
                                      f"whole number at position {axis % max(1, len(spec['shape']))}")
    width = models["hex"].get("outputs", {}).get("markers", {}).get("shape", [None, len(markers)])[-1]
    if width != len(markers):
        _fail_manifest(where, f"the hex model gives {width} markers but the manifest names {len(markers)}")
    if "mica" in models:
        _validate_mica_features(manifest, where)


# Dimensions hexfast reads from the manifest as sizes: (model, side, tensor, axis).
FIXED_DIMS = (("hex", "outputs", "markers", -1), ("mica", "inputs", "h_path", 1),
              ("mica", "inputs", "coattn_mean_in", 1), ("codex_encoder", "inputs", "codex", 0))


def _validate_tensors(tensors: Any, key: str, where: Path) -> None:
    """{tensor: {"dtype": str, "shape": [positive int or a symbolic name, ...]}}."""
    if not isinstance(tensors, Mapping):
        _fail_manifest(where, f"{key} must be an object of tensor: {{dtype, shape}}, not {json.dumps(tensors)[:40]}")
    for tensor, spec in tensors.items():
        if not isinstance(spec, Mapping):
            _fail_manifest(where, f"{key}.{tensor} must be an object with a shape, not {json.dumps(spec)[:40]}")
        shape = spec.get("shape")
        if not (isinstance(shape, list)
                and all((type(d) is int and d > 0) or (isinstance(d, str) and d) for d in shape)):
            _fail_manifest(where, f"{key}.{tensor}.shape must be a list of sizes and dimension names, not "
                                  f"{json.dumps(shape)[:40]}")
        if "dtype" in spec and not isinstance(spec["dtype"], str):
            _fail_manifest(where, f"{key}.{tensor}.dtype must be a type name such as \"float32\"")


def _validate_mica_features(manifest: Mapping, where: Path) -> None:
    """MICA runs only on the bag its manifest declares, made the way it says."""
    features = manifest.get("mica_features")
    if isinstance(features, str) or features is None:
        _fail_manifest(where, "does not declare which tile features its MICA was trained on (an export before "
                              "--mica-features guessed hex-embedding); export it again with --mica-features "
                              "resnet50-trunc or hex-embedding")
    kind = features.get("kind") if isinstance(features, Mapping) else None
    if kind not in MICA_FEATURES:
        _fail_manifest(where, f"the MICA model expects tile features {kind!r}; hexfast makes "
                              f"{', '.join(MICA_FEATURES)} and will not pair MICA with other features")
    if kind == "resnet50-trunc":
        if "he_features" not in manifest["models"]:
            raise MissingModelError(where, "MICA's resnet50-trunc features need the 'he_features' model, "
                                           "which the bundle lacks")
        if not isinstance(features.get("patching"), Mapping):  # its values: slide.clam_patches.ClamParams
            _fail_manifest(where, "mica_features.patching (CLAM's patching parameters) is missing")


def load_bundle(path: str | os.PathLike | None = None, *, verify: bool = True) -> Bundle:
    """Open and check a model bundle (None: the demo bundle shipped with hexfast).

    `verify` checks every listed file's sha256 (≈1 s per GB); it is on by default."""
    root = DEFAULT_BUNDLE if path is None else Path(path)
    if root.is_file() and root.name == MANIFEST:
        root = root.parent
    manifest_path = root / MANIFEST
    if not root.exists():
        raise ManifestMissingError(root, "no such model bundle")
    if not root.is_dir():
        raise ManifestMissingError(root, "is not a model bundle directory")
    if not manifest_path.is_file():
        raise ManifestMissingError(manifest_path, "missing: not a model bundle (expected manifest.json "
                                                  "as written by hexfast export)")
    raw = manifest_path.read_bytes()
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestInvalidError(manifest_path, f"is not valid JSON ({exc})") from None
    _validate(manifest, manifest_path)
    root = root.resolve()
    for rel, expected in manifest["files"].items():
        file = (root / rel).resolve()
        if root not in file.parents:
            raise ManifestInvalidError(manifest_path, f"lists {rel}, which lies outside the bundle")
        if not file.is_file():
            raise BundleFileMissingError(root / rel, "missing from the bundle (listed in manifest.json)")
        if verify:
            actual = sha256_file(file)
            if actual != expected:
                raise ChecksumError(root / rel, f"sha256 {actual[:12]}… does not match the manifest's "
                                                f"{str(expected)[:12]}… (corrupted or modified file)")
    return Bundle(root, manifest, hashlib.sha256(raw).hexdigest())
