"""Video->report and report->video retrieval: the metric functions and the evaluator plugin.

For: the pure metric functions on a similarity matrix (Recall@K, nDCG@K, MRR,
median/mean rank, Recall@K per disease stratum, alignment of true pairs, the
Recall@K of a random ranking), the candidate/relevance bookkeeping for a split
where several videos share one report, and ``Evaluator`` (``type='retrieval'``
in ``config.evals``), which embeds a split's videos and its unique reports and
reports all of them for both directions. The metric functions are NumPy only,
linear time per query (no full sorts), chunked over queries so temporaries stay
near 100 MB at any size (1k queries x 100k candidates: about 1 s on one CPU core).

Not for: text or clinical metrics of generated reports (captioning.py,
text_metrics.py).

Conventions, shared by every function here:
- Ranks are 1-based. Ties in similarity are ranked pessimistically: a non-relevant
  candidate that scores the same as a relevant one is ranked before it. So a model
  that gives every candidate the same score gets the worst possible ranks, never
  credit for a lucky tie. The order among tied relevant candidates does not matter
  (relevance is binary).
- The rank of a query is the rank of its FIRST (best-ranked) relevant candidate:
  1 + #(non-relevant candidates with sim >= the best relevant sim).
- recall@K: the first relevant candidate is in the top K. ndcg@K: binary relevance,
  DCG@K = sum over ranks i <= K of rel_i / log2(i + 1), divided by the ideal DCG of
  min(#relevant, K) hits at ranks 1, 2, ...
- K larger than the number of candidates is clamped to it (the key keeps the K asked).
- Queries with no relevant candidate are left out of every average and counted
  in `num_queries_without_relevant`; `num_queries` counts the queries averaged over.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.special import gammaln

from deepcoro_jax.domain import reports
from evaluators import common

# Queries per chunk are chosen so a chunk's temporaries stay near this many elements.
_CHUNK_ELEMENTS = 1 << 23
_RESAMPLES_PER_CHUNK = 100


def _check_inputs(sim: np.ndarray, relevant: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sim = np.asarray(sim)
    relevant = np.asarray(relevant)
    if sim.ndim != 2:
        raise ValueError(f"sim must be a [queries, candidates] matrix, got shape {sim.shape}")
    if relevant.shape != sim.shape:
        raise ValueError(f"relevant has shape {relevant.shape}, sim has shape {sim.shape}: "
                         "they must match")
    if relevant.dtype != np.bool_:
        raise TypeError(f"relevant must be a boolean array, got dtype {relevant.dtype}")
    if not np.issubdtype(sim.dtype, np.floating) and not np.issubdtype(sim.dtype, np.integer):
        raise TypeError(f"sim must be a real-valued array, got dtype {sim.dtype}")
    if sim.shape[1] == 0:
        raise ValueError("sim has no candidates (0 columns)")
    if np.issubdtype(sim.dtype, np.integer):
        sim = sim.astype(np.float64)  # negated below; unsigned integers would wrap
    if np.isnan(sim).any():
        raise ValueError("sim contains NaN")
    return sim, relevant


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1
                     for k in ks):
        raise ValueError(f"ks={ks!r}: expected a non-empty sequence of positive integers")
    return tuple(int(k) for k in ks)


def _query_chunks(num_queries: int, num_candidates: int) -> tuple[range, int]:
    """Start rows of the query chunks, and the chunk length."""
    chunk = max(1, _CHUNK_ELEMENTS // num_candidates)
    return range(0, num_queries, chunk), chunk


def _first_relevant_ranks(sim: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """[Q] 1-based rank of each query's first relevant candidate; 0 where there is none."""
    ranks = np.zeros(sim.shape[0], np.int64)
    starts, chunk = _query_chunks(*sim.shape)
    for start in starts:
        sim_chunk, relevant_chunk = sim[start:start + chunk], relevant[start:start + chunk]
        best_relevant = np.where(relevant_chunk, sim_chunk, -np.inf).max(axis=1)  # [q]
        ahead = (~relevant_chunk & (sim_chunk >= best_relevant[:, None])).sum(axis=1)
        ranks[start:start + chunk] = np.where(relevant_chunk.any(axis=1), 1 + ahead, 0)
    return ranks


def _top_relevance(sim: np.ndarray, relevant: np.ndarray, top: int) -> np.ndarray:
    """[Q, top] relevance of the candidates at ranks 1..top (pessimistic ties)."""
    num_candidates = sim.shape[1]
    top_relevant = np.zeros((sim.shape[0], top), bool)
    positions = np.arange(top)
    starts, chunk = _query_chunks(*sim.shape)
    for start in starts:
        sim_chunk, relevant_chunk = sim[start:start + chunk], relevant[start:start + chunk]
        # The last `top` columns of the partition hold a top-`top` set (any one among
        # candidates tied at its lowest score, the boundary).
        kth = num_candidates - top
        order = np.argpartition(sim_chunk, kth, axis=1)[:, kth:]  # [q, top]
        top_sim = np.take_along_axis(sim_chunk, order, axis=1)
        top_rel = np.take_along_axis(relevant_chunk, order, axis=1)
        # Sort by score descending, non-relevant first among equal scores.
        by_rank = np.lexsort((top_rel, -top_sim), axis=1)
        top_sim = np.take_along_axis(top_sim, by_rank, axis=1)
        top_rel = np.take_along_axis(top_rel, by_rank, axis=1)
        # Candidates tied with the boundary score may lie outside the selected set;
        # the tied block at the end of the top is filled non-relevant first, from the
        # whole row's tied candidates.
        boundary = top_sim[:, -1:]  # [q, 1]
        above_boundary = (top_sim > boundary).sum(axis=1, keepdims=True)  # [q, 1]
        tied_non_relevant = (~relevant_chunk & (sim_chunk == boundary)).sum(
            axis=1, keepdims=True)  # [q, 1]
        in_tied_block = positions[None, :] >= above_boundary
        tied_block_relevant = positions[None, :] - above_boundary >= tied_non_relevant
        top_relevant[start:start + chunk] = np.where(in_tied_block, tied_block_relevant, top_rel)
    return top_relevant


def retrieval_metrics(sim: np.ndarray, relevant: np.ndarray,
                      ks: Sequence[int] = (1, 5, 10, 50)) -> dict[str, float]:
    """Recall@K, nDCG@K, MRR, median and mean rank of a retrieval (see module docstring).

    sim: [queries, candidates] similarity, higher is better.
    relevant: [queries, candidates] bool, the candidates that count as a hit.
    Returns keys recall@K and ndcg@K for each K, mrr, median_rank, mean_rank,
    num_queries and num_queries_without_relevant.
    """
    sim, relevant = _check_inputs(sim, relevant)
    ks = _check_ks(ks)
    num_candidates = sim.shape[1]
    num_relevant = relevant.sum(axis=1)  # [Q]
    has_relevant = num_relevant > 0
    if not has_relevant.any():
        raise ValueError("relevant: no query has a relevant candidate")
    top = min(max(ks), num_candidates)
    # Computed for every query, then restricted (no copy of sim).
    ranks = _first_relevant_ranks(sim, relevant)[has_relevant]  # [Q']
    top_relevant = _top_relevance(sim, relevant, top)[has_relevant]  # [Q', top]
    num_relevant = num_relevant[has_relevant]  # [Q']
    discounts = 1.0 / np.log2(np.arange(2, top + 2))  # [top]
    metrics = {}
    for k in ks:
        k_clamped = min(k, num_candidates)
        metrics[f"recall@{k}"] = float(np.mean(ranks <= k_clamped))
    for k in ks:
        k_clamped = min(k, num_candidates)
        dcg = top_relevant[:, :k_clamped] @ discounts[:k_clamped]  # [Q]
        ideal_dcg = np.cumsum(discounts)[np.minimum(num_relevant, k_clamped) - 1]  # [Q]
        metrics[f"ndcg@{k}"] = float(np.mean(dcg / ideal_dcg))
    metrics["mrr"] = float(np.mean(1.0 / ranks))
    metrics["median_rank"] = float(np.median(ranks))
    metrics["mean_rank"] = float(np.mean(ranks))
    metrics["num_queries"] = float(len(ranks))
    metrics["num_queries_without_relevant"] = float(np.sum(~has_relevant))
    return metrics


def unique_reports(report_texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """The retrieval candidates of a split: its distinct report texts.

    Videos whose report texts are identical (same string) share one candidate, so a
    video->report query counts a hit on the one text of its study, and a report->video
    query counts every video with that text as relevant.
    Returns (candidates in order of first appearance, [V] int index of each video's
    candidate).
    """
    if isinstance(report_texts, str):
        raise TypeError("report_texts must be a sequence of str, got one str")
    candidates: dict[str, int] = {}
    index_per_video = np.empty(len(report_texts), np.int64)
    for video, text in enumerate(report_texts):
        if not isinstance(text, str):
            raise TypeError(f"report_texts[{video}] must be a str, got {type(text)}")
        index_per_video[video] = candidates.setdefault(text, len(candidates))
    return list(candidates), index_per_video


def relevance_matrices(index_per_video: np.ndarray,
                       num_reports: int) -> tuple[np.ndarray, np.ndarray]:
    """The `relevant` matrices of both directions from `unique_reports`' index.

    Returns (video_to_report [V, R], report_to_video [R, V]) booleans: video v and
    report r are relevant to each other when v's report is r.
    """
    index_per_video = np.asarray(index_per_video)
    if index_per_video.ndim != 1 or not np.issubdtype(index_per_video.dtype, np.integer):
        raise ValueError("index_per_video must be a 1-D integer array, got shape "
                         f"{index_per_video.shape} dtype {index_per_video.dtype}")
    if index_per_video.size and (index_per_video.min() < 0
                                 or index_per_video.max() >= num_reports):
        raise ValueError(f"index_per_video must lie in [0, num_reports={num_reports})")
    video_to_report = index_per_video[:, None] == np.arange(num_reports)[None, :]  # [V, R]
    return video_to_report, video_to_report.T.copy()


def stratified_recall(sim: np.ndarray, relevant: np.ndarray, strata_per_query: Sequence[str],
                      ks: Sequence[int] = (1, 5, 10, 50)) -> dict[str, float]:
    """Recall@K per stratum of the query's study (reports.STRATA: most severe finding).

    For video->report retrieval: does the embedding rank the right report as well for
    diseased studies as for normal ones? strata_per_query: [Q] one of reports.STRATA
    per query (e.g. `reports.stratum(reports.parse(report))`). Returns
    '{stratum}/recall@{k}' for each stratum with at least one query that has a
    relevant candidate, and '{stratum}/num_queries' (those queries) for every stratum.
    Ties, clamping and queries without a relevant candidate as in `retrieval_metrics`.
    """
    sim, relevant = _check_inputs(sim, relevant)
    ks = _check_ks(ks)
    strata = np.asarray(strata_per_query, dtype=object)
    if strata.shape != (sim.shape[0],):
        raise ValueError(f"strata_per_query has {strata.size} entries, sim has "
                         f"{sim.shape[0]} queries: they must match")
    unknown = sorted(set(strata.tolist()) - set(reports.STRATA))
    if unknown:
        raise ValueError(f"strata_per_query: unknown strata {unknown}; expected {reports.STRATA}")
    ranks = _first_relevant_ranks(sim, relevant)  # [Q], 0 without a relevant candidate
    metrics = {}
    for stratum in reports.STRATA:
        stratum_ranks = ranks[(strata == stratum) & (ranks > 0)]
        metrics[f"{stratum}/num_queries"] = float(len(stratum_ranks))
        if len(stratum_ranks):
            for k in ks:
                recall = np.mean(stratum_ranks <= min(k, sim.shape[1]))
                metrics[f"{stratum}/recall@{k}"] = float(recall)
    return metrics


def _unit_rows(emb: np.ndarray, name: str) -> np.ndarray:
    """`emb` [N, D] with each row scaled to unit length (float64); a zero row is a ValueError."""
    norms = np.linalg.norm(emb, axis=1)  # [N]
    if not np.all(norms > 0):
        raise ValueError(f"{name} has a zero row (row {int(np.argmin(norms))}): "
                         "cosine similarity is undefined")
    return np.asarray(emb, np.float64) / norms[:, None]


def alignment(video_emb: np.ndarray, text_emb: np.ndarray) -> float:
    """Mean cosine similarity of true pairs: row i of video_emb with row i of text_emb."""
    video_emb = np.asarray(video_emb, np.float64)
    text_emb = np.asarray(text_emb, np.float64)
    if video_emb.ndim != 2 or video_emb.shape != text_emb.shape or not len(video_emb):
        raise ValueError(f"video_emb {video_emb.shape} and text_emb {text_emb.shape} must be "
                         "non-empty [N, D] matrices of the same shape")
    cosines = np.sum(_unit_rows(video_emb, "video_emb") * _unit_rows(text_emb, "text_emb"), axis=1)
    return float(np.mean(cosines))


def mean_pairwise_cosine(emb: np.ndarray) -> float:
    """Mean cosine similarity over all pairs of distinct rows of `emb` [N, D], N >= 2.

    A collapse check: 1 when every row points the same way (the embedding ignores
    its input), near 0 for directions spread over the sphere.
    """
    emb = np.asarray(emb, np.float64)
    if emb.ndim != 2 or len(emb) < 2:
        raise ValueError(f"emb {emb.shape} must be an [N, D] matrix with N >= 2")
    total = _unit_rows(emb, "emb").sum(axis=0)
    n = len(emb)
    return float((total @ total - n) / (n * (n - 1)))  # the Gram matrix's sum minus its diagonal


def _miss_probability(n: np.ndarray, r: np.ndarray, k: np.ndarray) -> np.ndarray:
    """P(no relevant candidate among the first k of n in random order, r of them relevant)
    = C(n-r, k) / C(n, k), elementwise, for 0 <= k <= n (log-gamma: no huge integers)."""
    n, r, k = (np.asarray(x, np.float64) for x in np.broadcast_arrays(n, r, k))
    possible = n - r >= k
    safe = np.where(possible, n - r - k, 0.0)
    log_ratio = gammaln(safe + k + 1) - gammaln(safe + 1) - gammaln(n + 1) + gammaln(n - k + 1)
    return np.where(possible, np.exp(np.where(possible, log_ratio, 0.0)), 0.0)


def chance_recall(num_relevant: np.ndarray, num_candidates: int, k: int) -> float:
    """The expected Recall@K of a uniformly random ranking, averaged over queries.

    A query with r relevant of C candidates has its first hit in the top K
    with probability 1 - C(C-r, K) / C(C, K). Queries with r = 0 are left out.
    """
    k = min(k, num_candidates)
    num_relevant = np.asarray(num_relevant)
    num_relevant = num_relevant[num_relevant > 0]
    return float(1.0 - np.mean(_miss_probability(num_candidates, num_relevant, k)))


def oracle_recall(relevant: np.ndarray, scores: np.ndarray | Sequence[np.ndarray],
                  k: int) -> np.ndarray:
    """[Q'] each query's expected Recall@K under an oracle that ranks the candidates by
    `scores` and can only guess among candidates of equal score (random order).

    relevant: [Q, C] bool; scores: [Q, C] real, higher first, or a sequence of such
    arrays compared in turn (the second orders what the first leaves tied, ...).
    With s* the best score of a relevant candidate, n_before candidates scoring
    above it, and r of the n candidates scoring exactly s* relevant, the first hit
    is in the top K with probability 1 - C(n-r, K') / C(n, K'), K' = clip(K -
    n_before, 0, n). Scores all equal give `chance_recall`; scores equal to
    `relevant` give 1. Queries without a relevant candidate are left out, as in
    `retrieval_metrics`.
    """
    relevant = np.asarray(relevant, bool)
    levels = [scores] if isinstance(scores, np.ndarray) else list(scores)
    levels = [np.broadcast_to(np.asarray(level, np.float64), relevant.shape)
              if np.ndim(level) < 2 else np.asarray(level, np.float64) for level in levels]
    if relevant.ndim != 2 or not levels or any(x.shape != relevant.shape for x in levels):
        raise ValueError(f"relevant {relevant.shape} and every level of scores "
                         f"{[x.shape for x in levels]} must be the same [queries, candidates] "
                         "shape")
    keep = relevant.any(axis=1)
    relevant, levels = relevant[keep], [level[keep] for level in levels]
    best = relevant  # the relevant candidates that are best on the levels so far
    above = np.zeros_like(relevant)  # candidates lexicographically above the best relevant
    tied = np.ones_like(relevant)
    for level in levels:
        best_value = np.where(best, level, -np.inf).max(axis=1, keepdims=True)  # [Q', 1]
        best = best & (level == best_value)
        above |= tied & (level > best_value)
        tied &= level == best_value
    n, r = tied.sum(axis=1), (tied & relevant).sum(axis=1)
    return 1.0 - _miss_probability(n, r, np.clip(int(k) - above.sum(axis=1), 0, n))


def recall_ci(ranks: np.ndarray, k: int, *, num_resamples: int = 1000, seed: int = 0,
              level: float = 0.95) -> tuple[float, float]:
    """Bootstrap percentile interval of Recall@K over queries.

    ranks: [Q] 1-based first-relevant ranks of the queries that have a relevant
    candidate (as `retrieval_metrics` computes them). Resamples the queries with
    replacement `num_resamples` times (seeded) and returns the (1 - level) / 2 and
    (1 + level) / 2 quantiles of the resampled Recall@K.
    """
    hits = (np.asarray(ranks) <= k).astype(np.float64)  # [Q]
    if not len(hits) or num_resamples < 1:
        raise ValueError(f"recall_ci: need queries ({len(hits)}) and resamples ({num_resamples})")
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, num_resamples, _RESAMPLES_PER_CHUNK):
        count = min(_RESAMPLES_PER_CHUNK, num_resamples - start)
        means.append(hits[rng.integers(len(hits), size=(count, len(hits)))].mean(axis=1))
    low, high = np.quantile(np.concatenate(means), [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def key_relevance(query_keys: Sequence[str], candidate_keys: Sequence[str]) -> np.ndarray:
    """[Q, C] bool: candidate c is relevant to query q when their keys are equal."""
    return np.asarray(query_keys, object)[:, None] == np.asarray(candidate_keys, object)[None, :]


LEVELS = ("video", "study")
RELEVANCE = ("text", "findings")
# Above this mean cosine between distinct items, a tower's embeddings point one way.
COLLAPSED_COSINE = 0.99


def collapsed_towers(metrics: Mapping[str, float]) -> dict[str, float]:
    """{'videos' and/or 'reports': mean cosine} for the towers whose
    ``query_mean_cosine`` / ``report_mean_cosine`` in `metrics` is above
    COLLAPSED_COSINE."""
    cosines = {
        "videos": metrics.get("query_mean_cosine"),
        "reports": metrics.get("report_mean_cosine"),
    }
    return {t: v for t, v in cosines.items() if v is not None and v > COLLAPSED_COSINE}


@common.register("retrieval")
class Evaluator(common.Evaluator):
    """Retrieval between a split's videos (or studies) and its unique reports.

    Queries of video->report are the split's videos (``level='video'``) or its
    studies (``level='study'``: the model's own study embedding, its pooling over
    the tokens of all the study's videos at once, as study-level training
    computes it, of the first ``study_videos`` videos in view order; default:
    as many as the split's largest study has, so every video counts); candidates
    are the split's distinct report texts (identical
    reports are one candidate). A candidate is relevant to a query when it is the
    query's own report (``relevance='text'``) or when it states the same findings
    (``relevance='findings'``: `reports.findings_key`, so reports that say the same thing
    in other words are the same answer). report->video swaps the two.

    Metrics, prefixed ``v2t_`` and ``t2v_``: everything ``retrieval_metrics``
    returns, with a bootstrap 95% interval over queries for each Recall@K
    (``..._recall@K_ci_low``/``_ci_high``; ``bootstrap`` resamples, 0: none);
    for video->report the Recall@K per stratum of the query's most severe finding
    and in queries whose report has a CTO (``v2t_<stratum>/recall@K``,
    ``v2t_cto/recall@K``). Beside them, on the same queries and candidates, what a
    model could reach without the embeddings (expected values of rankings that
    guess at random among what they cannot tell apart, `oracle_recall`):
    ``v2t_chance_recall@K`` (a random ranking); ``oracle_prior_recall@K`` (sees
    nothing of the video; ranks the candidates by how many of the split's queries
    state their findings, the best constant ranking); ``oracle_anatomy_recall@K``
    (knows each video's anatomy, the ``anatomy_columns`` labels such as its
    system, landmark and magnification, and the dominance its report states, but
    no lesion: ranks first the candidates written for videos of the same
    anatomy, most common findings among those videos first, then the rest by the
    prior; video level, where the data carries such a column). Both put one
    candidate of each findings first and its rewordings after (they cover the
    same queries);
    ``oracle_findings_recall@K`` (knows that and every finding the query's report
    states; 1 with ``relevance='findings'``); and the same per stratum and for
    CTOs (``v2t_<subset>/{chance,oracle_prior,oracle_anatomy,oracle_findings}_recall@K``).
    The frequencies are the split's own, so the oracles are upper bounds of what
    their knowledge allows on this split.
    ``alignment`` is the mean cosine of true pairs; ``query_mean_cosine`` and
    ``report_mean_cosine`` the mean cosine between distinct queries and between
    distinct candidates (near 1: the embedding has collapsed and ignores its input).
    """

    PREDICT = ("encode_video", "encode_text")
    HEADLINE = (
        "v2t_recall@1", "v2t_recall@1_ci_low", "v2t_recall@1_ci_high", "v2t_chance_recall@1",
        "oracle_prior_recall@1", "oracle_anatomy_recall@1", "oracle_findings_recall@1",
        "v2t_recall@5", "v2t_chance_recall@5", "oracle_anatomy_recall@5", "t2v_recall@5",
        "alignment",
    )

    def __init__(
        self,
        predict_fns: Mapping[str, common.PredictFn],
        spec: common.EvalSpec,
        *,
        level: str = "video",
        study_videos: int | None = None,
        ks: Sequence[int] = (1, 5, 10, 50),
        relevance: str = "text",
        anatomy_columns: Sequence[str] | None = None,
        bootstrap: int = 1000,
        seed: int = 0,
        **base: Any,
    ):
        from input_pipeline import dataset_format  # TensorFlow

        super().__init__(predict_fns, spec, **base)
        if level not in LEVELS:
            raise ValueError(f"{self.where}.level={level!r}: choose one of {LEVELS}")
        if relevance not in RELEVANCE:
            raise ValueError(f"{self.where}.relevance={relevance!r}: choose one of {RELEVANCE}")
        if bootstrap < 0:
            raise ValueError(f"{self.where}.bootstrap={bootstrap} must be at least 0")
        if study_videos is not None and (level != "study" or study_videos < 1):
            raise ValueError(f"{self.where}.study_videos={study_videos}: a positive number, "
                             "with level='study'")
        self.level, self.relevance, self.study_videos = level, relevance, study_videos
        self.bootstrap, self.seed = int(bootstrap), int(seed)
        self.ks = _check_ks(ks)
        common.require_split(spec, self.split)
        carried = dataset_format.load_meta(spec.data_dir).label_columns
        if anatomy_columns is None:
            anatomy_columns = [column for column in common.ANATOMY_COLUMNS if column in carried]
        elif isinstance(anatomy_columns, str):
            raise ValueError(f"{self.where}.anatomy_columns={anatomy_columns!r} must be a list")
        missing = [column for column in anatomy_columns if column not in carried]
        if missing:
            raise ValueError(f"{self.where}.anatomy_columns: {missing} are not label columns of "
                             f"{spec.data_dir}; it has {sorted(carried)}")
        self.anatomy_columns = list(anatomy_columns)
        self._embed_videos = common.video_embedder(self.predict_fns, spec)
        self._embed_texts = common.jit_replicated(self.predict_fns["encode_text"], spec.mesh)

    def run(self, params: Any, step: int) -> dict[str, float]:
        del step  # retrieval writes no artefacts
        table = common.split_table(self.spec.data_dir, self.split)
        study_videos = None
        if self.level == "study":
            study_videos = self.study_videos or int(table["video_in_study"].max()) + 1
            pairs = set(zip(table["study_id"].tolist(), table["report"].tolist(), strict=True))
            if len(pairs) > len(set(table["study_id"].tolist())):
                logging.warning(
                    "%s: the videos of a study carry different reports (per-view reports?); "
                    "each study is matched with its first video's report", self.name)
        out = common.predict_split(
            self.spec,
            self._embed_videos,
            params,
            split=self.split,
            pp=self.spec.pp(),
            batch_size=self.batch_size,
            study_videos=study_videos,
        )
        facts = common.join_rows(table, out["row"])  # a study: its first video's
        query_emb, query_reports = out["video_emb"], facts["report"]
        anatomy = None
        if self.level == "video" and self.anatomy_columns:
            anatomy = common.anatomy_keys(facts, self.anatomy_columns)
        candidates, report_index = unique_reports(query_reports.tolist())
        text_emb = common.encode_texts(
            self.spec, self._embed_texts, params, candidates, self.batch_size
        )
        sim = query_emb.astype(np.float32) @ text_emb.astype(np.float32).T  # [Q, R]
        candidate_findings = [reports.parse(text) for text in candidates]
        candidate_keys = [reports.findings_key(text) for text in candidates]
        query_keys = [candidate_keys[i] for i in report_index]
        if self.relevance == "findings":
            v2t_relevant = key_relevance(query_keys, candidate_keys)
            t2v_relevant = v2t_relevant.T.copy()
        else:
            v2t_relevant, t2v_relevant = relevance_matrices(report_index, len(candidates))
        metrics = {}
        for direction, direction_sim, relevant in (("v2t", sim, v2t_relevant),
                                                   ("t2v", sim.T, t2v_relevant)):
            found = retrieval_metrics(direction_sim, relevant, self.ks)
            metrics.update({f"{direction}_{k}": v for k, v in found.items()})
            if self.bootstrap:
                ranks = _first_relevant_ranks(direction_sim, relevant)
                for k in self.ks:
                    low, high = recall_ci(ranks[ranks > 0], min(k, direction_sim.shape[1]),
                                          num_resamples=self.bootstrap, seed=self.seed)
                    metrics[f"{direction}_recall@{k}_ci_low"] = low
                    metrics[f"{direction}_recall@{k}_ci_high"] = high
        query_findings = [candidate_findings[i] for i in report_index]
        strata = [reports.stratum(findings) for findings in query_findings]
        stratified = stratified_recall(sim, v2t_relevant, strata, self.ks)
        metrics.update({f"v2t_{k}": v for k, v in stratified.items()})
        metrics.update(self._ceilings(sim, v2t_relevant, report_index, query_keys,
                                      candidate_keys, anatomy, query_findings, strata))
        metrics["alignment"] = alignment(query_emb, text_emb[report_index])
        for key, emb in (("query_mean_cosine", query_emb), ("report_mean_cosine", text_emb)):
            if len(emb) > 1:
                metrics[key] = mean_pairwise_cosine(emb)
        metrics["num_candidates"] = float(len(candidates))
        for tower, cosine in collapsed_towers(metrics).items():
            logging.warning(
                "%s: the embeddings of the %s have collapsed (mean cosine %.4f between "
                "distinct %s, above %.2f): retrieval cannot rank; see 'Collapsed "
                "embeddings' in docs/training.md",
                self.name, tower, cosine, tower, COLLAPSED_COSINE,
            )
        return metrics

    def _ceilings(self, sim: np.ndarray, relevant: np.ndarray, report_index: np.ndarray,
                  query_keys: Sequence[str], candidate_keys: Sequence[str],
                  anatomy: Sequence[tuple[str, ...]] | None,
                  query_findings: Sequence[reports.Findings],
                  strata: Sequence[str]) -> dict[str, float]:
        """Chance and the oracles' Recall@K (video->report), overall and per subset of
        queries, and the model's Recall@K in queries with a CTO."""
        num_queries, num_candidates = relevant.shape
        same_findings = key_relevance(query_keys, candidate_keys)  # [Q, R]
        # How common each candidate's findings are among the queries: the prior that a
        # reader who cannot see the lesions ranks by. Candidates that state the same
        # findings cover the same queries, so one of each comes before the repeats.
        frequency = same_findings.sum(axis=0).astype(np.float64)  # [R]
        group = np.unique(np.asarray(candidate_keys, object), return_inverse=True)[1]  # [R]
        first_of_group = np.zeros(num_candidates, bool)
        first_of_group[np.unique(group, return_index=True)[1]] = True
        scores = {"chance": [np.zeros(num_candidates)],
                  "oracle_prior": [first_of_group, frequency]}
        if anatomy is not None:
            # The anatomy of a candidate: those of the videos it was written for.
            dominance = [findings.dominance for findings in query_findings]
            keys = [(*a, d) for a, d in zip(anatomy, dominance, strict=True)]
            ids = {key: i for i, key in enumerate(dict.fromkeys(keys))}
            anatomy_id = np.array([ids[key] for key in keys])  # [Q]
            candidate_has = np.zeros((num_candidates, len(ids)), bool)
            candidate_has[report_index, anatomy_id] = True  # [R, A]
            same_anatomy = candidate_has[:, anatomy_id].T  # [Q, R]
            # [A, R]: how many queries of each anatomy state each candidate's findings,
            # and whether the candidate is the first of its findings among that anatomy's.
            of_anatomy = np.zeros((len(ids), num_queries))
            of_anatomy[anatomy_id, np.arange(num_queries)] = 1.0
            common_in_anatomy = of_anatomy @ same_findings
            # One of each findings among the anatomy's candidates, and among the others.
            first_in_group = np.zeros((len(ids), num_candidates), bool)
            for a in range(len(ids)):
                for members in (np.flatnonzero(candidate_has[:, a]),
                                np.flatnonzero(~candidate_has[:, a])):
                    first_in_group[a, members[np.unique(group[members], return_index=True)[1]]] = 1
            scores["oracle_anatomy"] = [same_anatomy, first_in_group[anatomy_id],
                                        common_in_anatomy[anatomy_id], frequency]
            scores["oracle_findings"] = [same_anatomy & same_findings,
                                         *scores["oracle_anatomy"]]
        else:
            scores["oracle_findings"] = [same_findings, first_of_group, frequency]
        has_relevant = relevant.any(axis=1)
        subsets = {stratum: np.asarray(strata) == stratum for stratum in reports.STRATA}
        subsets["cto"] = np.array([any(lesion.cto for lesion in f.lesions.values())
                                   for f in query_findings], bool)
        metrics = {}
        for k in self.ks:
            for kind, kind_scores in scores.items():
                expected = oracle_recall(relevant, kind_scores, k)  # [Q'], those with a relevant
                overall = "v2t_chance" if kind == "chance" else kind
                metrics[f"{overall}_recall@{k}"] = float(expected.mean())
                for subset, mask in subsets.items():
                    if mask[has_relevant].any():
                        value = float(expected[mask[has_relevant]].mean())
                        metrics[f"v2t_{subset}/{kind}_recall@{k}"] = value
        ranks = _first_relevant_ranks(sim, relevant)
        cto_ranks = ranks[subsets["cto"] & (ranks > 0)]
        metrics["v2t_cto/num_queries"] = float(len(cto_ranks))
        for k in self.ks:
            if len(cto_ranks):
                metrics[f"v2t_cto/recall@{k}"] = float(np.mean(cto_ranks <= min(k, num_candidates)))
        return metrics
