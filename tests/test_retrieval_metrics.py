"""Tests for evaluators/retrieval.py against an independent full-sort NumPy reference,
hand-computed examples, a perfect and an adversarial model, and ties."""

import math

import numpy as np
import pytest

from deepcoro_jax.domain import reports
from evaluators import retrieval


def reference_ranks(sim_row: np.ndarray, relevant_row: np.ndarray) -> np.ndarray:
    """1-based ranks of the relevant candidates after a full sort: score descending,
    non-relevant before relevant among equal scores."""
    order = np.lexsort((relevant_row, -sim_row))
    ranked_relevance = relevant_row[order]
    return np.flatnonzero(ranked_relevance) + 1


def reference_metrics(sim, relevant, ks):
    num_candidates = sim.shape[1]
    first_ranks, recalls, ndcgs = [], {k: [] for k in ks}, {k: [] for k in ks}
    skipped = 0
    for sim_row, relevant_row in zip(sim, relevant, strict=True):
        if not relevant_row.any():
            skipped += 1
            continue
        ranks = reference_ranks(sim_row, relevant_row)
        first_ranks.append(ranks[0])
        for k in ks:
            clamped = min(k, num_candidates)
            dcg = sum(1.0 / math.log2(r + 1) for r in ranks if r <= clamped)
            ideal = sum(1.0 / math.log2(i + 1) for i in range(1, min(len(ranks), clamped) + 1))
            recalls[k].append(float(ranks[0] <= clamped))
            ndcgs[k].append(dcg / ideal)
    first_ranks = np.array(first_ranks, float)
    expected = {}
    for k in ks:
        expected[f"recall@{k}"] = float(np.mean(recalls[k]))
        expected[f"ndcg@{k}"] = float(np.mean(ndcgs[k]))
    expected["mrr"] = float(np.mean(1.0 / first_ranks))
    expected["median_rank"] = float(np.median(first_ranks))
    expected["mean_rank"] = float(np.mean(first_ranks))
    expected["num_queries"] = float(len(first_ranks))
    expected["num_queries_without_relevant"] = float(skipped)
    return expected


def assert_metrics_close(actual, expected):
    assert set(actual) == set(expected)
    for key in expected:
        assert actual[key] == pytest.approx(expected[key], abs=1e-12), key


@pytest.mark.parametrize("num_candidates, num_levels, relevant_rate, ks", [
    (40, 4, 0.08, (1, 5, 10, 50)),  # K=50 > candidates: clamped
    (300, 6, 0.02, (1, 3, 7, 20)),  # heavy ties, boundary ties at every K
    (300, 10**6, 0.05, (1, 5, 10, 50)),  # almost no ties
    (25, 2, 0.3, (1, 25, 30)),  # top == all candidates
])
def test_matches_full_sort_reference_with_ties_and_duplicates(num_candidates, num_levels,
                                                             relevant_rate, ks):
    rng = np.random.default_rng(num_candidates + num_levels)
    num_queries = 60
    sim = rng.integers(0, num_levels, (num_queries, num_candidates)).astype(np.float32)
    relevant = rng.random((num_queries, num_candidates)) < relevant_rate
    relevant[:3] = False  # some queries without a relevant candidate
    relevant[3, :] = True  # every candidate relevant
    relevant[4, ::7] = True  # many relevant, some tied with each other
    actual = retrieval.retrieval_metrics(sim, relevant, ks)
    assert_metrics_close(actual, reference_metrics(sim, relevant, ks))
    assert actual["num_queries_without_relevant"] >= 3


def test_chunking_over_queries_gives_the_same_result(monkeypatch):
    rng = np.random.default_rng(0)
    sim = rng.integers(0, 5, (37, 50)).astype(np.float64)
    relevant = rng.random((37, 50)) < 0.1
    whole = retrieval.retrieval_metrics(sim, relevant, (1, 5, 10))
    monkeypatch.setattr(retrieval, "_CHUNK_ELEMENTS", 120)  # 2 queries per chunk
    assert retrieval.retrieval_metrics(sim, relevant, (1, 5, 10)) == whole
    assert_metrics_close(whole, reference_metrics(sim, relevant, (1, 5, 10)))


def test_hand_computed_ranks_and_ndcg():
    sim = np.array([[0.9, 0.8, 0.7, 0.6],
                    [0.1, 0.2, 0.3, 0.4]])
    relevant = np.array([[False, True, False, True],  # relevant at ranks 2 and 4
                         [False, False, False, True]])  # rank 1
    metrics = retrieval.retrieval_metrics(sim, relevant, ks=(1, 2, 4))
    log3, log5 = math.log2(3), math.log2(5)
    assert metrics["recall@1"] == 0.5
    assert metrics["recall@2"] == 1.0
    assert metrics["ndcg@1"] == pytest.approx((0.0 + 1.0) / 2)
    ndcg2_first = (1 / log3) / (1 + 1 / log3)
    assert metrics["ndcg@2"] == pytest.approx((ndcg2_first + 1.0) / 2)
    ndcg4_first = (1 / log3 + 1 / log5) / (1 + 1 / log3)
    assert metrics["ndcg@4"] == pytest.approx((ndcg4_first + 1.0) / 2)
    assert metrics["mrr"] == pytest.approx((1 / 2 + 1) / 2)
    assert metrics["median_rank"] == 1.5 and metrics["mean_rank"] == 1.5
    assert metrics["num_queries"] == 2 and metrics["num_queries_without_relevant"] == 0


def test_ties_are_ranked_pessimistically():
    # The relevant candidate ties with two others: it is ranked after both.
    sim = np.array([[0.5, 0.5, 0.5, 0.1]])
    relevant = np.array([[True, False, False, False]])
    metrics = retrieval.retrieval_metrics(sim, relevant, ks=(1, 2, 3))
    assert metrics["median_rank"] == 3
    assert metrics["recall@2"] == 0.0 and metrics["recall@3"] == 1.0
    assert metrics["ndcg@3"] == pytest.approx(1 / math.log2(4))
    # A constant model gets the worst ranks: after every non-relevant candidate.
    rng = np.random.default_rng(1)
    relevant = rng.random((20, 30)) < 0.2
    relevant[:, 0] = True
    metrics = retrieval.retrieval_metrics(np.zeros((20, 30)), relevant, ks=(1,))
    assert metrics["mean_rank"] == pytest.approx(np.mean(30 - relevant.sum(1) + 1))
    # Ties among relevant candidates only do not hurt.
    metrics = retrieval.retrieval_metrics(np.array([[1.0, 1.0, 0.0]]),
                                          np.array([[True, True, False]]), ks=(1, 2))
    assert metrics["recall@1"] == 1.0 and metrics["ndcg@2"] == pytest.approx(1.0)


def test_boundary_tie_outside_the_selected_top():
    # Top-2 boundary score 0.5 is shared by a relevant and two non-relevant candidates;
    # pessimistically rank 2 holds a non-relevant one, whichever argpartition picked.
    sim = np.array([[0.5, 0.9, 0.5, 0.5]])
    for relevant_index in (0, 2, 3):
        relevant = np.zeros((1, 4), bool)
        relevant[0, relevant_index] = True
        metrics = retrieval.retrieval_metrics(sim, relevant, ks=(2, 4))
        assert metrics["ndcg@2"] == 0.0
        assert metrics["ndcg@4"] == pytest.approx(1 / math.log2(5))


def test_perfect_and_adversarial_models_on_shared_reports():
    texts = ["report a", "report b", "report a", "report c", "report b", "report a"]
    candidates, index = retrieval.unique_reports(texts)
    video_to_report, report_to_video = retrieval.relevance_matrices(index, len(candidates))
    rng = np.random.default_rng(2)
    for relevant in (video_to_report, report_to_video):
        noise = rng.random(relevant.shape) * 0.1
        perfect = retrieval.retrieval_metrics(relevant + noise, relevant, ks=(1, 2, 50))
        for k in (1, 2, 50):
            assert perfect[f"recall@{k}"] == 1.0 and perfect[f"ndcg@{k}"] == pytest.approx(1.0)
        assert perfect["mrr"] == 1.0 and perfect["median_rank"] == 1.0
        adversarial = retrieval.retrieval_metrics(noise - relevant, relevant, ks=(1, 50))
        worst_first_rank = relevant.shape[1] - relevant.sum(1) + 1
        assert adversarial["mean_rank"] == pytest.approx(worst_first_rank.mean())
        assert adversarial["recall@1"] == 0.0 and adversarial["recall@50"] == 1.0
        assert adversarial["mrr"] == pytest.approx(np.mean(1 / worst_first_rank))


def test_unique_reports_and_relevance():
    candidates, index = retrieval.unique_reports(["x", "y", "x", "z", "y"])
    assert candidates == ["x", "y", "z"]
    np.testing.assert_array_equal(index, [0, 1, 0, 2, 1])
    video_to_report, report_to_video = retrieval.relevance_matrices(index, 3)
    np.testing.assert_array_equal(video_to_report, [[1, 0, 0], [0, 1, 0], [1, 0, 0],
                                                    [0, 0, 1], [0, 1, 0]])
    np.testing.assert_array_equal(report_to_video, video_to_report.T)
    assert video_to_report.dtype == bool
    with pytest.raises(TypeError, match=r"report_texts\[1\]"):
        retrieval.unique_reports(["x", None])
    with pytest.raises(ValueError, match="num_reports=2"):
        retrieval.relevance_matrices(index, 2)


def test_stratified_recall_matches_per_stratum_reference():
    rng = np.random.default_rng(3)
    num_queries, num_candidates = 80, 30
    sim = rng.integers(0, 6, (num_queries, num_candidates)).astype(float)
    relevant = rng.random((num_queries, num_candidates)) < 0.1
    strata = rng.choice(["normal", "mild", "moderate"], num_queries)  # no 'severe+'
    metrics = retrieval.stratified_recall(sim, relevant, list(strata), ks=(1, 5, 100))
    for stratum in ("normal", "mild", "moderate"):
        rows = strata == stratum
        expected = reference_metrics(sim[rows], relevant[rows], (1, 5, 100))
        assert metrics[f"{stratum}/num_queries"] == expected["num_queries"]
        for k in (1, 5, 100):
            assert metrics[f"{stratum}/recall@{k}"] == pytest.approx(expected[f"recall@{k}"])
    assert metrics["severe+/num_queries"] == 0
    assert not any(key.startswith("severe+/recall") for key in metrics)
    # Strata read from rendered reports.
    findings = [reports.Findings({}), reports.Findings({"mid_lad": reports.Lesion(85.0)})]
    strata = [reports.stratum(reports.parse(reports.render(f))) for f in findings]
    metrics = retrieval.stratified_recall(np.eye(2), np.eye(2, dtype=bool), strata, ks=(1,))
    assert metrics["normal/recall@1"] == 1.0 and metrics["severe+/recall@1"] == 1.0
    with pytest.raises(ValueError, match="unknown strata"):
        retrieval.stratified_recall(np.eye(2), np.eye(2, dtype=bool), ["normal", "bad"])
    with pytest.raises(ValueError, match="strata_per_query has 1"):
        retrieval.stratified_recall(np.eye(2), np.eye(2, dtype=bool), ["normal"])


def test_alignment():
    rng = np.random.default_rng(4)
    video = rng.normal(size=(10, 8))
    text = rng.normal(size=(10, 8))
    expected = np.mean([v @ t / np.linalg.norm(v) / np.linalg.norm(t)
                        for v, t in zip(video, text, strict=True)])
    assert retrieval.alignment(video, text) == pytest.approx(expected)
    assert retrieval.alignment(video, 3.0 * video) == pytest.approx(1.0)
    assert retrieval.alignment(video, -video) == pytest.approx(-1.0)
    text[2] = 0.0
    with pytest.raises(ValueError, match="text_emb has a zero row"):
        retrieval.alignment(video, text)
    with pytest.raises(ValueError, match="same shape"):
        retrieval.alignment(video, text[:5])


@pytest.mark.parametrize("sim, relevant, ks, error, message", [
    (np.zeros((2, 3)), np.zeros((3, 2), bool), (1,), ValueError, "relevant has shape"),
    (np.zeros((2, 3)), np.zeros((2, 3)), (1,), TypeError, "relevant must be a boolean"),
    (np.full((1, 2), np.nan), np.ones((1, 2), bool), (1,), ValueError, "NaN"),
    (np.zeros((1, 2)), np.ones((1, 2), bool), (0,), ValueError, "ks="),
    (np.zeros((1, 2)), np.ones((1, 2), bool), (), ValueError, "ks="),
    (np.zeros((2, 2)), np.zeros((2, 2), bool), (1,), ValueError, "no query has a relevant"),
    (np.zeros(3), np.zeros(3, bool), (1,), ValueError, "sim must be a"),
])
def test_bad_input_raises_naming_the_argument(sim, relevant, ks, error, message):
    with pytest.raises(error, match=message):
        retrieval.retrieval_metrics(sim, relevant, ks)


def test_oracle_recall_equals_a_simulation_in_every_case():
    """Relevant candidates inside and outside the oracle's first group, K below and above
    its size, queries without a relevant candidate (left out)."""
    rng = np.random.default_rng(3)
    num_queries, num_candidates, draws = 12, 9, 6000
    relevant = rng.random((num_queries, num_candidates)) < 0.2
    relevant[np.arange(num_queries), np.arange(num_queries) % num_candidates] = True
    relevant[0] = False  # no relevant candidate: left out
    first = rng.random((num_queries, num_candidates)) < 0.4
    first[1] = False  # an oracle that knows nothing about this query: chance
    first[2] = relevant[2] | (rng.random(num_candidates) < 0.3)  # relevant all in its group
    relevant[3], first[3] = False, False
    relevant[3, :2], first[3, 2:6] = True, True  # relevant only after its first group
    for k in (1, 3, 5, 9, 20):
        expected = retrieval.oracle_recall(relevant, first, k)
        assert expected.shape == (num_queries - 1,)
        for q, value in zip(range(1, num_queries), expected, strict=True):
            scores = first[q][None, :] + rng.random((draws, num_candidates))
            top = np.argsort(-scores, axis=1)[:, :k]
            simulated = relevant[q][top].any(axis=1).mean()
            assert value == pytest.approx(simulated, abs=0.025), (q, k)
    assert retrieval.oracle_recall(relevant, relevant, 1).tolist() == [1.0] * (num_queries - 1)
    everything = np.ones_like(relevant)
    for k in (1, 4):
        assert retrieval.oracle_recall(relevant, everything, k).mean() == pytest.approx(
            retrieval.chance_recall(relevant.sum(axis=1), num_candidates, k))
    # Several score levels: ties broken at random within each level only.
    scores = rng.integers(0, 3, size=relevant.shape).astype(float)
    for k in (1, 2, 4):
        for q, value in zip(range(1, num_queries), retrieval.oracle_recall(relevant, scores, k),
                            strict=True):
            noisy = scores[q][None, :] + 0.5 * rng.random((draws, num_candidates))
            top = np.argsort(-noisy, axis=1)[:, :k]
            assert value == pytest.approx(relevant[q][top].any(axis=1).mean(), abs=0.025)
    with pytest.raises(ValueError, match="same"):
        retrieval.oracle_recall(relevant, first[:, :3], 1)


def test_recall_ci_agrees_with_the_normal_approximation():
    rng = np.random.default_rng(0)
    ranks = rng.integers(1, 11, size=4000)  # Recall@3 about 0.3
    low, high = retrieval.recall_ci(ranks, 3, num_resamples=2000, seed=1)
    p = np.mean(ranks <= 3)
    half = 1.96 * np.sqrt(p * (1 - p) / len(ranks))
    assert low == pytest.approx(p - half, abs=0.004)
    assert high == pytest.approx(p + half, abs=0.004)
    assert retrieval.recall_ci(np.ones(50, int), 1) == (1.0, 1.0)
    assert retrieval.recall_ci(ranks, 3, seed=5) == retrieval.recall_ci(ranks, 3, seed=5)
    with pytest.raises(ValueError, match="need queries"):
        retrieval.recall_ci(np.array([], int), 1)


def test_findings_relevance_reads_meaning_not_words():
    same = ["Right dominant circulation. 70% stenosis of the proximal LAD.",
            "Prox LAD: severe ~70% lesion. Dominance: right."]
    other = "Right dominant circulation. 80% stenosis of the proximal LAD."
    keys = [reports.findings_key(text) for text in [*same, other]]
    assert keys[0] == keys[1] != keys[2]
    relevant = retrieval.key_relevance(keys, keys)
    assert relevant.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
