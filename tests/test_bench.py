"""The benchmark harness: FLOP counts (formula vs ONNX graph), the fields `hexfast bench engine |
e2e | roofline` and benchmarks/reference_hex.py produce, plots. Correctness only: no timing is
asserted anywhere (other jobs share the machine)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import hexfast
from hexfast.bench.roofline import (MUSK_L16_384, TERMS, HexShape, elementwise_estimate, hex_flops, hex_params,
                                    measure_peak)
from hexfast.bundle import load_bundle

ROOT = Path(__file__).resolve().parents[1]
ENGINE_FIELDS = {"model", "demo", "encoder", "backend", "describe", "precision", "tile", "batch", "runs", "tiles_per_s",
                 "latency_ms", "latency_p90_ms", "cpu_ms_per_tile", "peak_rss_mib", "gpu_mem_mib"}
E2E_FIELDS = {"slide", "tiles", "tile_px", "backend", "describe", "batch_size", "threads", "seconds", "wall_seconds",
              "e2e_seconds", "e2e_tiles_per_s", "slide_tiles_per_s", "engine_batch", "engine_tiles_per_s",
              "stream_tiles_per_s", "pipeline_efficiency", "steady_tiles_per_s", "pipeline_efficiency_steady",
              "engine_busy", "engine_before", "engine_after", "cpu_efficiency", "pipeline_efficiency_load_robust",
              "cpu_ms_per_tile", "peak_rss_mib", "stream_peak_rss_mib", "gpu_mem_mib", "trace"}

onnx = pytest.importorskip("onnx", reason="the graph count needs onnx (pip install '.[test]')")
pytest.importorskip("onnxruntime", reason="the graph count and the engines need onnxruntime (pip install '.[test]')")



@pytest.fixture(scope="module")
def tiny_slide(tmp_path_factory) -> Path:
    """A synthetic 40x slide with a handful of 224-px tissue tiles."""
    from hexfast.slide.synthetic import write_demo_slide

    return write_demo_slide(tmp_path_factory.mktemp("slide") / "tiny.tiff", 1400, 1000, mpp=0.25, seed=0)  # 15 tiles


# ----------------------------------------------------------------------------- FLOPs

@pytest.mark.parametrize("tile", [224, 112, 384, 448])
def test_formula_equals_onnx_graph_count_on_the_demo_bundle(tile):
    from hexfast.bench.roofline import onnx_flops

    bundle = load_bundle()
    shape = HexShape.from_manifest(bundle.manifest)
    assert (shape.dim, shape.depth, shape.patch_size, shape.embed_dim) == (64, 2, 32, 1024)
    analytic = hex_flops(shape, tile)
    graph = onnx_flops(bundle.model_path("hex"), tile)
    assert graph["terms"]["other"] == 0  # every MatMul/Gemm/Conv is one of the formula's terms
    assert {k: graph["terms"][k] for k in TERMS} == analytic
    assert graph["total"] == sum(analytic.values())
    assert graph["ops"] == {"MatMul": 18, "Conv": 1, "Gemm": 4}


def test_graph_count_is_per_tile_whatever_the_batch():
    from hexfast.bench.roofline import onnx_flops

    path = load_bundle().model_path("hex")
    assert onnx_flops(path, 224, batch=3)["total"] == onnx_flops(path, 224, batch=1)["total"]


def test_graph_count_cache(tmp_path, monkeypatch):
    from hexfast.bench.roofline import onnx_flops_cached

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = load_bundle().model_path("hex")
    first = onnx_flops_cached(path, 224)
    second = onnx_flops_cached(path, 224)
    assert (first["cached"], second["cached"]) == (False, True)
    assert first["total"] == second["total"]
    assert len(list((tmp_path / "hexfast" / "flops").glob("*-224.json"))) == 1


def test_musk_large_formula():
    """MUSK-L/16 @ 384, 577 tokens, multiply-add = 2, written out term by term. Layers 1-23 run all
    tokens; layer 24 computes keys and values for all tokens, everything else for CLS alone."""
    n, d, f, L = 577, 1024, 4096, 24
    flops = hex_flops(MUSK_L16_384, 224)
    assert flops["patch_embed"] == 2 * 576 * 1024 * 3 * 16 * 16
    assert flops["projections"] == (L - 1) * 4 * 2 * n * d * d + 2 * 2 * n * d * d + 2 * 2 * 1 * d * d
    assert flops["attn_qk"] == flops["attn_av"] == (L - 1) * 2 * n * n * d + 2 * 1 * n * d
    assert flops["ffn"] == (L - 1) * 2 * (2 * n * d * f) + 2 * (2 * 1 * d * f)
    assert flops["heads"] == 2 * (1024 * 256 + 256 * 128 + 128 * 40)
    assert flops["embed_proj"] == 0
    assert flops["resize"] == 2 * 3 * 224 * 224 * 1152 + 2 * 3 * 1152 * 224 * 384
    assert sum(flops.values()) == 369_631_602_688  # every token through layer 24: 383,072,512,000
    # Elementwise work left out of the count is well under 1 % for the real model.
    assert sum(elementwise_estimate(MUSK_L16_384).values()) < 0.01 * sum(flops.values())
    assert hex_params(MUSK_L16_384) > 300e6


def test_shape_from_a_manifest_without_encoder_block_is_musk_large():
    assert HexShape.from_manifest({"markers": ["m"] * 40}) == MUSK_L16_384


def test_measure_peak_cpu_rows():
    peak = measure_peak("cpu", n=128, seconds=0.01)
    assert peak.device.startswith("cpu")
    kernels = [r["kernel"] for r in peak.rows]
    assert any(k.startswith("numpy") for k in kernels) and any(k.startswith("onnxruntime") for k in kernels)
    for row in peak.rows:
        assert row["dtype"] == "fp32" and row["n"] == 128
        assert row["tflops"] > 0 and row["tflop_per_cpu_s"] >= 0
    assert peak.peak() == max(r["tflops"] for r in peak.rows)


# ----------------------------------------------------------------------------- engine

def test_timed_engine_records_each_run():
    from hexfast.bench.measure import measure
    from hexfast.bench.model import TimedEngine
    from hexfast.engines import create_engine

    with create_engine(load_bundle().model_path("hex"), "ort-cpu", threads=1) as engine:
        timed = TimedEngine(engine, keep_first=True)
        rows = measure(timed, lambda b: np.zeros((b, 64, 64, 3), np.uint8), [2], seconds=0.0, warmup=1, min_runs=2)
    assert rows[0]["runs"] == 2
    assert [r[2] for r in timed.records] == [2, 2, 2]  # warm-up + 2 timed
    assert all(end >= start and 0 <= inside <= end - start for start, end, _, _, inside in timed.records)
    assert timed.first["tiles"].shape == (2, 64, 64, 3)
    assert timed.backend == "ort-cpu"  # everything else is the engine's


def test_bench_engine_rows_in_process():
    from hexfast.bench.model import bench_engine, format_engine_table

    rows = bench_engine(None, ["ort-cpu"], batch_sizes=[2, 1], tile=96, seconds=0.01, threads=1, isolate=False)
    assert [r["batch"] for r in rows] == [2, 1]  # the order asked for
    for row in rows:
        assert ENGINE_FIELDS <= set(row)
        assert row["backend"] == "ort-cpu" and row["tile"] == 96 and row["demo"] is True
        assert row["runs"] >= 3 and row["tiles_per_s"] > 0 and row["cpu_ms_per_tile"] >= 0
        assert row["gpu_mem_mib"] == "n/a" or isinstance(row["gpu_mem_mib"], float)
    table = format_engine_table(rows)
    assert table.count("\n") == 3 and "| ort-cpu | fp32 | 96 | 2 |" in table


def test_cli_bench_engine_json(tmp_path):
    out = tmp_path / "engine.json"
    result = hexfast("bench", "engine", "--backend", "ort-cpu", "--batch-sizes", "1,3", "--tile", "64", "--seconds",
                     "0.01", "--engine-threads", "1", "--json", out)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert [r["batch"] for r in rows] == [1, 3]
    assert all(ENGINE_FIELDS <= set(r) for r in rows)
    assert "| backend | precision | tile | batch | tiles/s |" in result.stdout


def test_cli_bench_engine_all_skips_what_cannot_run(tmp_path):
    out = tmp_path / "all.json"
    result = hexfast("bench", "engine", "--backend", "all", "--batch-sizes", "1", "--tile", "64", "--seconds", "0.01",
                     "--json", out)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert any(r.get("backend") == "ort-cpu" and "tiles_per_s" in r for r in rows)


@pytest.mark.parametrize("args, fragment", [
    (["--backend", "nope"], "choose from"),
    (["--batch-sizes", "0,2"], "positive"),
    (["--model", "/no/such/bundle"], "/no/such/bundle"),
])
def test_cli_bench_engine_errors_are_one_line(args, fragment):
    result = hexfast("bench", "engine", "--seconds", "0.01", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- roofline

def test_roofline_fields_on_the_demo_bundle(tmp_path, monkeypatch):
    from hexfast.bench.roofline import format_roofline, roofline

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the graph-count cache

    r = roofline(None, "ort-cpu", batch_size=2, tile=96, seconds=0.01, peak_seconds=0.01, threads=1)
    assert r["agree"] is True and r["analytic_total"] == r["graph_total"] > 0
    assert r["engine"]["batch"] == 2 and r["engine"]["tile"] == 96
    assert r["peak"]["tflops"] > 0 and r["peak"]["dtype"] == "fp32"
    assert r["achieved_tflops"] == pytest.approx(r["graph_total"] * r["engine"]["tiles_per_s"] / 1e12)
    assert math.isfinite(r["percent_of_peak"]) and r["percent_of_peak_cpu"] is not None
    text = format_roofline(r)
    assert "| **total** (multiply-add = 2) |" in text and "equal" in text and "of the best fp32 matmul" in text


def test_cli_roofline_json(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    out = tmp_path / "roof.json"
    result = hexfast("bench", "roofline", "--batch-size", "1", "--tile", "64", "--seconds", "0.01", "--peak-seconds",
                     "0.01", "--json", out)
    assert result.returncode == 0, result.stderr
    r = json.loads(out.read_text())
    assert r["agree"] is True and set(r["analytic"]) == set(TERMS)
    assert {"engine", "peak", "achieved_tflops", "percent_of_peak", "roofline_tiles_per_s"} <= set(r)


# ----------------------------------------------------------------------------- end to end

def test_bench_e2e_fields(tiny_slide, tmp_path):
    from hexfast.bench.model import bench_e2e, format_e2e

    r = bench_e2e(tiny_slide, None, "ort-cpu", batch_size=4, threads=1, engine_threads=1, engine_seconds=0.01,
                  out=tmp_path / "out")
    assert E2E_FIELDS <= set(r)
    assert r["tiles"] > 4 and r["tile_px"] == 224 and r["backend"] == "ort-cpu"
    assert sum(b["tiles"] for b in r["trace"]) == r["tiles"]
    assert all(b["end"] >= b["start"] >= 0 for b in r["trace"])
    assert r["engine_batch"] == 4 and r["engine_tiles_per_s"] > 0
    assert r["pipeline_efficiency"] == pytest.approx(r["e2e_tiles_per_s"] / r["engine_tiles_per_s"])
    assert 0 < r["engine_busy"] <= 1.0
    assert r["engine_before"]["batch"] == r["engine_after"]["batch"] == 4
    assert r["engine_tiles_per_s"] == pytest.approx((r["engine_before"]["tiles_per_s"]
                                                     + r["engine_after"]["tiles_per_s"]) / 2)
    assert r["pipeline_efficiency_load_robust"] == pytest.approx(r["engine_busy"] * r["cpu_efficiency"])
    assert "stream+hex" in r["seconds"] and r["wall_seconds"] <= r["e2e_seconds"] + 1e-6
    assert r["gpu_mem_mib"] == "n/a" or isinstance(r["gpu_mem_mib"], float)
    assert (tmp_path / "out" / "tiny").is_dir()  # --out keeps the slide's outputs
    assert "pipeline efficiency" in format_e2e(r)


def test_cli_bench_e2e_and_plots(tiny_slide, tmp_path):
    pytest.importorskip("matplotlib", reason="plots need matplotlib (the [bench] extra)")
    e2e, engine = tmp_path / "e2e.json", tmp_path / "engine.json"
    result = hexfast("bench", "e2e", tiny_slide, "--batch-size", "8", "--threads", "1", "--seconds", "0.01",
                     "--json", e2e)
    assert result.returncode == 0, result.stderr
    assert E2E_FIELDS <= set(json.loads(e2e.read_text()))
    assert "e2e tiles/s" in result.stdout and "stages (s):" in result.stdout
    assert hexfast("bench", "engine", "--batch-sizes", "1,2", "--tile", "64", "--seconds", "0.01",
                   "--json", engine).returncode == 0
    for kind, source in (("timeline", e2e), ("throughput", engine)):
        png = tmp_path / f"{kind}.png"
        run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plot_bench.py"), kind, source, "-o", png],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bench_e2e_bad_slide(tmp_path):
    bad = tmp_path / "x.svs"
    bad.write_bytes(b"not a slide")
    result = hexfast("bench", "e2e", bad)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- the reference path

def test_reference_script_same_outputs_and_fields(tiny_slide, tmp_path):
    pytest.importorskip("torch", reason="the reference path runs torch")
    pytest.importorskip("hexfast_export", reason="the reference path rebuilds the model with hexfast_export")
    out = tmp_path / "ref.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reference_hex.py"), tiny_slide, "--tiles", "6",
                          "--ref-batch", "4", "--batch-size", "4", "--threads", "1", "--json", out],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    r = json.loads(out.read_text())
    assert r["tiles"] == 6 and r["tile_px"] == 224 and r["model_size"] == "tiny"
    # Same weights and the same pixels (the graph's resize is PIL-exact): the same numbers.
    assert r["max_rel_diff"]["markers"] < 1e-4 and r["max_rel_diff"]["embedding"] < 1e-4
    for side in ("reference", "hexfast"):
        assert {"tiles_per_s", "cpu_ms_per_tile", "peak_rss_mib", "how"} <= set(r[side])
    assert r["speedup"] == pytest.approx(r["hexfast"]["tiles_per_s"] / r["reference"]["tiles_per_s"])
    assert "hexfast ÷ reference" in run.stdout


def test_ab_script_same_graph_agrees_exactly(tmp_path):
    """benchmarks/ab_engines.py: a graph against itself gives identical outputs and one ratio per pair."""
    hex_onnx = load_bundle(None).model_path("hex", "fp32")
    out = tmp_path / "ab.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ab_engines.py"), hex_onnx, hex_onnx,
                          "--batch-size", "2", "--pairs", "3", "--threads", "1", "--json", out],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    r = json.loads(out.read_text())
    assert r["max_rel_diff"] == {"markers": 0.0, "embedding": 0.0}
    assert len(r["runs"]["a"]) == len(r["runs"]["b"]) == 3
    assert r["a_over_b_cpu_median"] > 0 and r["a_over_b_wall_median"] > 0
