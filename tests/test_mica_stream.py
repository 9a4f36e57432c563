"""hexfast.score.mica_stream: MICA over a slide's features in chunks (runtime side, numpy + ONNX Runtime)."""

import numpy as np
import pytest

from hexfast.bundle import load_bundle
from hexfast.score.mica_stream import AttentionRanking, stream_mica


def ranked(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent reference: a stable sort of the whole row (ties to the lower index)."""
    order = np.argsort(-values, kind="stable")[:k]
    return order, values[order]


@pytest.mark.parametrize("sizes", [[1000], [1, 7, 300, 692], [3] * 333 + [1]])
def test_ranking_equals_a_sort_of_the_whole_matrix(sizes):
    rng = np.random.default_rng(0)
    weights = np.round(rng.random((40, sum(sizes))), 2)  # coarse values: many ties
    ranking = AttentionRanking(40, 10)
    start = 0
    for n in sizes:
        ranking.add(weights[:, start:start + n])
        start += n
    assert ranking.seen == weights.shape[1]
    for row in (0, 17, 39):
        tiles, values = ranking.row(row)
        ref_tiles, ref_values = ranked(weights[row], 10)
        np.testing.assert_array_equal(tiles, ref_tiles)
        np.testing.assert_array_equal(values, ref_values)
    tiles, values = ranking.overall()
    ref_tiles, ref_values = ranked(weights.mean(axis=0), 10)
    np.testing.assert_array_equal(tiles, ref_tiles)
    np.testing.assert_allclose(values, ref_values, rtol=1e-12)


def test_ranking_with_fewer_tiles_than_k_and_bad_shapes():
    ranking = AttentionRanking(2, 10)
    ranking.add(np.array([[0.2, 0.8], [0.5, 0.5]]))
    assert ranking.row(0)[0].tolist() == [1, 0] and ranking.row(1)[0].tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"\(2, n\)"):
        ranking.add(np.zeros((3, 4)))


@pytest.fixture(scope="module")
def demo_mica():
    ort = pytest.importorskip("onnxruntime", reason="running the ONNX files needs onnxruntime")
    bundle = load_bundle()
    session = ort.InferenceSession(str(bundle.model_path("mica")), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    width = bundle.model("mica")["inputs"]["coattn_mean_in"]["shape"][1]
    return (lambda feeds: dict(zip(names, session.run(names, feeds)))), width


def test_chunking_does_not_change_the_answer(demo_mica):
    """The demo MICA graph over 1,500 tiles: one call with every tile vs chunks of 64 and 4096."""
    run, width = demo_mica
    rng = np.random.default_rng(3)
    features = rng.standard_normal((1500, 1024)).astype(np.float32)
    h_codex = rng.standard_normal((40, 384)).astype(np.float32)
    calls = []

    def chunked(size):
        def chunks():
            calls.append(size)
            return (features[i:i + size] for i in range(0, len(features), size))
        return chunks

    whole = stream_mica(run, h_codex, chunked(len(features)), state_width=width, keep_attention=True)
    for size in (64, 4096):
        got = stream_mica(run, h_codex, chunked(size), state_width=width, keep_attention=True, top_k=5)
        for name in ("hazards", "survival", "risk"):
            np.testing.assert_allclose(getattr(got, name), getattr(whole, name), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got.attention, whole.attention, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(got.attention.sum(axis=1), 1.0, rtol=1e-5)
        tiles, _ = got.ranking.overall()
        np.testing.assert_array_equal(tiles, np.argsort(-whole.attention.mean(axis=0), kind="stable")[:5])
    assert calls == [1500, 1500, 64, 64, 4096, 4096]  # two passes each
    with pytest.raises(ValueError, match="at least one tile"):
        stream_mica(run, h_codex, lambda: iter(()), state_width=width)
