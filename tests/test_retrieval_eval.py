"""The retrieval evaluator plugin: independent of device count and batch size, and correct.

The metric functions themselves are tested in test_retrieval_metrics.py; here the
plugin's wiring: every example once, the candidates and relevance of a split whose
studies share reports, study-level pooling, and the same numbers on 1, 2 and 8
devices with different batch sizes.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from evaltools import init_params, make_context, micro_config

from evaluators import common, retrieval

SPLIT = "train"  # the tiny set's largest split (6 studies)


@pytest.fixture(scope="module")
def results(synthetic_data, tmp_path_factory):
    config = micro_config()
    out = {}
    for devices, batch_size, level in ((1, 4, "video"), (2, 2, "video"), (8, 8, "video"),
                                       (8, 8, "study")):
        ctx = make_context(config, synthetic_data, str(tmp_path_factory.mktemp("w")), devices)
        params = init_params(ctx)
        evaluator = retrieval.Evaluator(
            ctx.predict_fns, ctx.spec, name="r", split=SPLIT, batch_size=batch_size, level=level
        )
        out[devices, batch_size, level] = (evaluator.run(params, 0), ctx, params, evaluator)
    return out


def test_metrics_do_not_depend_on_devices_or_batch_size(results):
    one = results[1, 4, "video"][0]
    for key in ((2, 2, "video"), (8, 8, "video")):
        other = results[key][0]
        assert other.keys() == one.keys()
        for name, value in one.items():
            np.testing.assert_allclose(other[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_metrics_equal_an_independent_computation(results, synthetic_data):
    metrics, ctx, params, evaluator = results[1, 4, "video"]
    table = common.split_table(synthetic_data, SPLIT)
    # Independent embeddings: the model on each clip, one by one, in row order.
    out = common.predict_split(
        ctx.spec, evaluator._embed_videos, params, split=SPLIT, pp=ctx.spec.pp(), batch_size=4
    )
    assert out["row"].tolist() == sorted(table["row"].tolist())  # every video once
    texts = sorted(set(table["report"].tolist()))
    text_emb = common.encode_texts(ctx.spec, evaluator._embed_texts, params, texts, 4)
    sim = out["video_emb"] @ text_emb.T  # [V, R]
    truth = np.array([texts.index(r) for r in table["report"]])
    ranks = np.array(
        [1 + np.sum(np.delete(s, t) >= s[t]) for s, t in zip(sim, truth, strict=True)]
    )
    assert metrics["num_candidates"] == len(texts)
    assert metrics["v2t_num_queries"] == len(table["row"])
    np.testing.assert_allclose(metrics["v2t_mean_rank"], ranks.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["v2t_recall@1"], np.mean(ranks == 1), rtol=1e-6)
    np.testing.assert_allclose(metrics["v2t_chance_recall@1"], 1 / len(texts), rtol=1e-6)
    cosines = np.sum(out["video_emb"] * text_emb[truth], axis=1)
    np.testing.assert_allclose(metrics["alignment"], cosines.mean(), rtol=1e-5)
    for key, emb in (("query_mean_cosine", out["video_emb"]), ("report_mean_cosine", text_emb)):
        unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        gram = unit @ unit.T
        off_diagonal = gram[~np.eye(len(gram), dtype=bool)]
        np.testing.assert_allclose(metrics[key], off_diagonal.mean(), rtol=1e-5, atol=1e-6)


def test_study_level_pools_each_study_once(results, synthetic_data):
    metrics = results[8, 8, "study"][0]
    table = common.split_table(synthetic_data, SPLIT)
    assert metrics["v2t_num_queries"] == len(set(table["study_id"].tolist()))
    # A study's report is its first video's (the set's per-view reports differ).
    first_reports = {}
    for study, report in zip(table["study_id"].tolist(), table["report"].tolist(), strict=True):
        first_reports.setdefault(study, report)
    assert metrics["t2v_num_queries"] == len(set(first_reports.values()))


def test_chance_recall_matches_a_simulation():
    rng = np.random.default_rng(0)
    num_relevant, candidates, k = np.array([1, 2, 5]), 20, 3
    hits = []
    for r in num_relevant:
        ranks = np.array([rng.permutation(candidates)[:r].min() for _ in range(20000)])
        hits.append(np.mean(ranks < k))
    np.testing.assert_allclose(
        retrieval.chance_recall(num_relevant, candidates, k), np.mean(hits), atol=0.01
    )


def test_a_bad_level_or_batch_size_names_the_key(synthetic_data, tmp_path):
    ctx = make_context(micro_config(), synthetic_data, str(tmp_path), 8)
    with pytest.raises(ValueError, match="config.evals.r.level"):
        retrieval.Evaluator(ctx.predict_fns, ctx.spec, name="r", level="frame")
    with pytest.raises(ValueError, match="config.evals.r.batch_size"):
        retrieval.Evaluator(
            ctx.predict_fns, ctx.spec, name="r", batch_size=jax.device_count() + 1
        )


def test_mean_pairwise_cosine_known_cases():
    same = np.tile([[3.0, 4.0, 0.0]], (5, 1)) * np.arange(1, 6)[:, None]  # one direction, any norm
    assert retrieval.mean_pairwise_cosine(same) == pytest.approx(1.0)
    assert retrieval.mean_pairwise_cosine(np.eye(4)) == pytest.approx(0.0, abs=1e-12)
    opposite = np.array([[1.0, 2.0], [-2.0, -4.0]])
    assert retrieval.mean_pairwise_cosine(opposite) == pytest.approx(-1.0)
    # Three unit vectors 120 degrees apart: every pair has cosine -1/2.
    angles = np.array([0.0, 2.0, 4.0]) * np.pi / 3
    star = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    assert retrieval.mean_pairwise_cosine(star) == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="N >= 2"):
        retrieval.mean_pairwise_cosine(np.ones((1, 3)))
    with pytest.raises(ValueError, match="zero row"):
        retrieval.mean_pairwise_cosine(np.array([[1.0, 0.0], [0.0, 0.0]]))


def test_collapsed_embeddings_are_named_in_a_warning(results, caplog):
    """A video projection that ignores its input (kernel 0, bias 1): every video gets
    one embedding, their mean cosine is 1, and the evaluation says so."""
    _, _, params, evaluator = results[1, 4, "video"]
    projection = params["video_projection"]
    collapsed = {
        **params,
        "video_projection": {
            "kernel": jnp.zeros_like(projection["kernel"]),
            "bias": jnp.ones_like(projection["bias"]),
        },
    }
    with caplog.at_level(logging.WARNING):
        metrics = evaluator.run(collapsed, 0)
    assert metrics["query_mean_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert retrieval.collapsed_towers(metrics) == {"videos": metrics["query_mean_cosine"]}
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(
        "r: the embeddings of the videos have collapsed" in w and "docs/training.md" in w
        for w in warnings
    ), warnings
    assert not any("of the reports have collapsed" in w for w in warnings)


def test_collapse_is_read_from_the_mean_cosines():
    assert retrieval.collapsed_towers({"query_mean_cosine": 0.5, "report_mean_cosine": 0.995}) == {
        "reports": 0.995
    }
    assert retrieval.collapsed_towers({"query_mean_cosine": 0.99}) == {}  # above, not at
    assert retrieval.collapsed_towers({}) == {}


def _simulated_oracle_recall(relevant, levels, k, draws, rng):
    """Recall@K of rankings by `levels` ([Q, C, L]: compared first by level 0, then 1, ...),
    at random among candidates equal on every level."""
    hits = []
    for q in np.flatnonzero(relevant.any(axis=1)):
        for _ in range(draws):
            keys = [rng.random(relevant.shape[1])] + [-levels[q, :, i]
                                                     for i in reversed(range(levels.shape[2]))]
            top = np.lexsort(keys)[:k]
            hits.append(relevant[q][top].any())
    return float(np.mean(hits))


def test_findings_relevance_and_ceilings_equal_an_independent_computation(
        results, synthetic_data):
    """Relevance by parsed findings, the oracles by simulation, the CI around the recall."""
    from deepcoro_jax.domain import reports

    _, ctx, params, _ = results[1, 4, "video"]
    evaluator = retrieval.Evaluator(ctx.predict_fns, ctx.spec, name="r", split=SPLIT,
                                    batch_size=4, relevance="findings", bootstrap=500)
    assert evaluator.anatomy_columns == ["system", "landmark", "magnification"]
    metrics = evaluator.run(params, 0)
    table = common.split_table(synthetic_data, SPLIT)
    out = common.predict_split(ctx.spec, evaluator._embed_videos, params, split=SPLIT,
                               pp=ctx.spec.pp(), batch_size=4)
    texts = sorted(set(table["report"].tolist()))
    text_emb = common.encode_texts(ctx.spec, evaluator._embed_texts, params, texts, 4)
    sim = out["video_emb"] @ text_emb.T  # [V, R], videos in row order
    findings = [reports.parse(text) for text in texts]
    video_findings = [reports.parse(text) for text in table["report"]]
    relevant = np.array([[f == g for g in findings] for f in video_findings])
    assert relevant.sum() > len(table["row"])  # some reports say the same in other words
    best = np.where(relevant, sim, -np.inf).max(axis=1)
    ranks = 1 + (~relevant & (sim >= best[:, None])).sum(axis=1)
    np.testing.assert_allclose(metrics["v2t_recall@1"], np.mean(ranks == 1), rtol=1e-6)
    np.testing.assert_allclose(metrics["v2t_recall@5"], np.mean(ranks <= 5), rtol=1e-6)
    assert metrics["v2t_recall@1_ci_low"] <= metrics["v2t_recall@1"]
    assert metrics["v2t_recall@1"] <= metrics["v2t_recall@1_ci_high"]

    anatomy = [(str(s), str(lm), float(m), f.dominance) for s, lm, m, f in zip(
        table["label/system"], table["label/landmark"], table["label/magnification"],
        video_findings, strict=True)]
    written_for = [{anatomy[v] for v in range(len(anatomy)) if table["report"][v] == text}
                   for text in texts]
    same_anatomy = np.array([[a in w for w in written_for] for a in anatomy])
    # How many videos (of the query's anatomy, or of any) state each candidate's findings.
    in_anatomy = np.array([[sum(anatomy[w] == anatomy[q] and video_findings[w] == f
                            for w in range(len(anatomy))) for f in findings]
                       for q in range(len(anatomy))])
    frequency = np.array([sum(g == f for g in video_findings) for f in findings])
    # One candidate per findings before its rewordings (which one: any, they are relevant
    # to the same queries), among all candidates; for the anatomy oracle, among those of
    # the query's anatomy and among the others.
    first = np.array([findings.index(f) == c for c, f in enumerate(findings)])
    first_in_group = np.array([[not any(same_anatomy[q, d] == same_anatomy[q, c]
                                        and findings[d] == findings[c] for d in range(c))
                                for c in range(len(texts))] for q in range(len(anatomy))])
    everyone = lambda x: np.broadcast_to(x, relevant.shape)
    prior = np.stack([everyone(first), everyone(frequency)], -1).astype(float)
    by_anatomy = np.stack([same_anatomy, first_in_group, in_anatomy, everyone(frequency)],
                          -1).astype(float)
    rng = np.random.default_rng(0)
    for k in (1, 5):
        for key, levels in (("oracle_prior", prior), ("oracle_anatomy", by_anatomy),
                            ("v2t_chance", np.zeros_like(prior))):
            simulated = _simulated_oracle_recall(relevant, levels, k, 400, rng)
            assert metrics[f"{key}_recall@{k}"] == pytest.approx(simulated, abs=0.02), key
    assert metrics["oracle_findings_recall@1"] == 1.0  # it knows exactly what is relevant
    assert (metrics["v2t_chance_recall@1"] < metrics["oracle_prior_recall@1"]
            <= metrics["oracle_anatomy_recall@1"])
    for stratum in reports.STRATA:
        in_stratum = np.array([reports.stratum(f) == stratum for f in video_findings])
        if in_stratum.any():
            simulated = _simulated_oracle_recall(relevant[in_stratum], by_anatomy[in_stratum],
                                                 1, 400, rng)
            assert metrics[f"v2t_{stratum}/oracle_anatomy_recall@1"] == pytest.approx(
                simulated, abs=0.03)
    assert "v2t_cto/num_queries" in metrics


def test_study_level_embeds_each_study_with_the_models_own_pooling(results, synthetic_data):
    """A study's query is the model on its stacked clips (all its videos, with their
    mask), not the mean of its videos' embeddings: recomputed here study by study."""
    from input_pipeline import pipeline

    metrics, ctx, params, evaluator = results[8, 8, "study"]
    table = common.split_table(synthetic_data, SPLIT)
    clips = {}
    for batch in pipeline.make_eval_dataset(
        synthetic_data, SPLIT, ctx.spec.pp(), 4
    ).as_numpy_iterator():
        clips.update({int(r): v for r, v, m in zip(batch["row"], batch["video"], batch["_mask"],
                                                   strict=True) if m})
    largest = int(table["video_in_study"].max()) + 1
    studies = list(dict.fromkeys(table["study_id"].tolist()))  # in row order
    study_emb, video_means, first_reports = [], [], []
    for study in studies:
        rows = [int(r) for r, s in zip(table["row"], table["study_id"], strict=True) if s == study]
        stacked = np.stack([clips[r] for r in rows] + [clips[rows[0]]] * (largest - len(rows)))
        mask = np.arange(largest) < len(rows)
        emb, _ = ctx.model.apply({"params": params}, jnp.asarray(stacked[None]),
                                 jnp.asarray(mask[None]), method="encode_video")
        study_emb.append(np.asarray(emb)[0])
        videos, _ = ctx.model.apply({"params": params}, jnp.asarray(stacked[mask]),
                                    method="encode_video")
        video_means.append(np.asarray(videos).mean(axis=0))
        first_reports.append(table["report"][table["row"].tolist().index(rows[0])])
    study_emb = np.stack(study_emb)
    texts = sorted(set(first_reports))
    text_emb = common.encode_texts(ctx.spec, evaluator._embed_texts, params, texts, 8)
    truth = text_emb[[texts.index(r) for r in first_reports]]
    np.testing.assert_allclose(
        metrics["alignment"], np.sum(study_emb * truth, axis=1).mean(), rtol=1e-5, atol=1e-6
    )
    means = np.stack(video_means)
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    assert not np.allclose(means, study_emb, atol=1e-3)  # the old, averaged embedding differs
    # The split's predictions as the evaluator gets them: one per study, in row order.
    out = common.predict_split(ctx.spec, evaluator._embed_videos, params, split=SPLIT,
                               pp=ctx.spec.pp(), batch_size=8, study_videos=largest)
    np.testing.assert_allclose(out["video_emb"], study_emb, atol=1e-5)
