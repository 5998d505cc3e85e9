"""The linear-probe evaluator: AUROC, its bootstrap CI, the heads, and the plugin's wiring.

The metric and the heads (scikit-learn's) are checked against independent formulas
(Mann-Whitney U with average ranks, the logistic optimality condition, a known
linear map, the ridge normal equations), the bootstrap against resamples drawn
here; the plugin on the tiny set's train split on 8 devices (batch 8) and 1 device
(batch 4), against a probe fitted on embeddings computed clip by clip.
"""

import jax
import numpy as np
import pytest
from evaltools import init_params, make_context, micro_config, without_labels

from deepcoro_jax.training import sharding
from evaluators import common, linear_probe

SPLIT = "train"  # the tiny set's largest split: the probe is fitted and scored on it
# The numeric label columns of the synthetic set (system and landmark are text).
LABELS = ("left_significant", "right_significant", "left_max_stenosis", "right_max_stenosis",
          "magnification", "right_dominant", "view_cto", "view_severe", "view_max_stenosis")


def mann_whitney_auroc(scores, labels):
    """U / (P N), with U from the average ranks of the positives (ties share their mean rank)."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    ranks = np.empty(len(scores))
    for i, score in enumerate(scores):
        below, tied = np.sum(scores < score), np.sum(scores == score)
        ranks[i] = below + (tied + 1) / 2
    num_pos, num_neg = labels.sum(), (~labels).sum()
    u = ranks[labels].sum() - num_pos * (num_pos + 1) / 2
    return u / (num_pos * num_neg)


def test_auroc_matches_mann_whitney_with_ties():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(2, 60))
        scores = rng.integers(0, 5, size=n).astype(float)  # many ties
        labels = rng.integers(0, 2, size=n)
        labels[:2] = (0, 1)
        np.testing.assert_allclose(linear_probe.auroc(scores, labels),
                                   mann_whitney_auroc(scores, labels), rtol=1e-12,
                                   err_msg=f"trial {trial}")
    assert linear_probe.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert linear_probe.auroc([1.0, 1.0, 1.0], [0, 1, 1]) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        linear_probe.auroc([0.1, 0.2], [1, 1])


def test_weighted_aurocs_equal_sklearn_with_sample_weights():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(11)
    scores = rng.integers(0, 6, 40).astype(np.float64)  # many ties
    labels = (rng.random(40) < 0.4).astype(np.int64)
    weights = rng.integers(0, 4, (25, 40))
    weights[0] = 1
    weights[1, labels == 0] = 0  # one class only: no AUROC
    got = linear_probe.weighted_aurocs(scores, labels, weights)
    assert np.isnan(got[1])
    for row, value in zip(weights, got, strict=True):
        if row[labels == 1].any() and row[labels == 0].any():
            expected = roc_auc_score(labels, scores, sample_weight=row)
            np.testing.assert_allclose(value, expected, rtol=1e-12)
    np.testing.assert_allclose(got[0], roc_auc_score(labels, scores), rtol=1e-12)


def test_bootstrap_ci_matches_a_loop_over_resamples():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=40)
    labels = (scores + rng.normal(size=40) > 0).astype(int)
    low, high = linear_probe.bootstrap_auroc_ci(scores, labels, 300, seed=5)
    assert (low, high) == linear_probe.bootstrap_auroc_ci(scores, labels, 300, seed=5)  # seeded
    # A plain resampling loop has the same spread (a different random stream).
    loop_rng = np.random.default_rng(123)
    values = []
    for _ in range(3000):
        pick = loop_rng.integers(0, 40, size=40)
        if 0 < labels[pick].sum() < 40:
            values.append(mann_whitney_auroc(scores[pick], labels[pick]))
    np.testing.assert_allclose((low, high), np.percentile(values, [2.5, 97.5]), atol=0.04)
    assert low < linear_probe.auroc(scores, labels) < high


def test_bootstrap_ci_is_the_percentiles_of_resampled_aurocs():
    rng = np.random.default_rng(7)
    scores = rng.integers(0, 6, size=30).astype(float)  # ties, also across resamples
    labels = (scores + rng.normal(size=30) > 2.5).astype(int)
    labels[:4] = (0, 1, 0, 1)
    for size in (30, 4):  # with 4 examples, some resamples hold one class only: dropped
        draw = np.random.default_rng(9)  # the evaluator's stream: one multinomial per resample
        values = []
        for _ in range(100):
            counts = draw.multinomial(size, np.full(size, 1 / size))
            pick = np.repeat(np.arange(size), counts)  # the resample, duplicates and all
            if 0 < labels[pick].sum() < size:
                values.append(mann_whitney_auroc(scores[pick], labels[pick]))
        assert (len(values) < 100) == (size == 4)
        np.testing.assert_allclose(
            linear_probe.bootstrap_auroc_ci(scores[:size], labels[:size], 100, seed=9),
            np.percentile(values, [2.5, 97.5]), rtol=1e-12)


def test_a_separable_problem_gives_auroc_one():
    rng = np.random.default_rng(2)

    def sample(n):
        features = rng.normal(size=(n, 4))
        side = rng.integers(0, 2, size=n)
        features[:, 0] = np.where(side == 1, 1.0, -1.0) * (2.0 + rng.random(n))  # margin 4
        return features, side

    (train_x, train_y), (eval_x, eval_y) = sample(100), sample(100)
    metrics = linear_probe.probe_metrics(train_x, train_y, eval_x, eval_y, l2=1.0,
                                         bootstrap=200, seed=0)
    assert metrics["auroc"] == 1.0
    assert metrics["auroc_ci_low"] == pytest.approx(1.0, abs=1e-12)  # roc_auc_score's rounding
    assert metrics["auroc_ci_high"] == pytest.approx(1.0, abs=1e-12)
    assert metrics["num_examples"] == 100
    assert metrics["base_rate"] == eval_y.mean()


def test_logistic_head_satisfies_the_optimality_condition():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(80, 5)) * [1.0, 2.0, 0.5, 3.0, 1.0] + 4.0
    labels = (features[:, 0] + rng.normal(size=80) > 4.0).astype(float)
    l2 = 0.7
    head = linear_probe.fit_logistic(features, labels, l2)
    standardised = (features - features.mean(0)) / features.std(0)
    probs = 1 / (1 + np.exp(-(standardised @ head.weights + head.bias)))
    np.testing.assert_allclose(standardised.T @ (probs - labels) + l2 * head.weights, 0,
                               atol=1e-9)  # also: scikit-learn's C is 1 / l2
    np.testing.assert_allclose(np.sum(probs - labels), 0, atol=1e-9)  # unpenalised intercept
    np.testing.assert_allclose(head.predict(features), np.log(probs / (1 - probs)), rtol=1e-8)


@pytest.mark.parametrize("num_examples", [200, 3])  # the primal and the dual solve
def test_ridge_recovers_a_known_linear_map(num_examples):
    rng = np.random.default_rng(4)
    true_map, true_bias = np.array([1.5, -2.0, 0.25, 4.0]), 7.0
    features = rng.normal(size=(num_examples, 4)) * [1.0, 3.0, 0.5, 2.0] - 1.0
    labels = features @ true_map + true_bias
    head = linear_probe.fit_ridge(features, labels, l2=1e-6)
    if num_examples > 4:
        np.testing.assert_allclose(head.weights / head.scale, true_map, rtol=1e-5)
        np.testing.assert_allclose(head.bias - head.mean @ (head.weights / head.scale),
                                   true_bias, rtol=1e-5)
        eval_x = rng.normal(size=(50, 4))
        metrics = linear_probe.probe_metrics(features, labels, eval_x, eval_x @ true_map + 7.0,
                                             l2=1e-6, bootstrap=0, seed=0)
        assert metrics.keys() == {"mae", "baseline_mae", "num_examples"}
        assert metrics["mae"] < 1e-3
        eval_y = eval_x @ true_map + 7.0
        np.testing.assert_allclose(metrics["baseline_mae"],
                                   np.mean(np.abs(eval_y - np.median(labels))), rtol=1e-12)
    else:  # fewer examples than features: the minimum-norm interpolant
        np.testing.assert_allclose(head.predict(features), labels, atol=1e-4)
    # Closed form on the standardised features, solved here the other way round.
    x = (features - features.mean(0)) / features.std(0)
    if num_examples > 4:
        expected = np.linalg.solve(x.T @ x + 1e-6 * np.eye(4), x.T @ (labels - labels.mean()))
    else:
        expected = x.T @ np.linalg.solve(x @ x.T + 1e-6 * np.eye(3), labels - labels.mean())
    np.testing.assert_allclose(head.weights, expected, rtol=1e-6)


def test_noise_labels_give_auroc_near_one_half():
    rng = np.random.default_rng(5)
    train_x, eval_x = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    train_y, eval_y = rng.integers(0, 2, size=400), rng.integers(0, 2, size=400)
    metrics = linear_probe.probe_metrics(train_x, train_y, eval_x, eval_y, l2=1.0,
                                         bootstrap=1000, seed=0)
    assert abs(metrics["auroc"] - 0.5) < 0.07
    assert metrics["auroc_ci_low"] < 0.5 < metrics["auroc_ci_high"]
    assert 0.05 < metrics["auroc_ci_high"] - metrics["auroc_ci_low"] < 0.2


def test_missing_labels_are_left_out():
    rng = np.random.default_rng(6)
    train_x, eval_x = rng.normal(size=(60, 3)), rng.normal(size=(30, 3))
    train_y = (train_x[:, 0] > 0).astype(float)
    eval_y = (eval_x[:, 0] + rng.normal(size=30) > 0).astype(float)
    train_missing, eval_missing = train_y.copy(), eval_y.copy()
    train_missing[::4] = np.nan
    eval_missing[::3] = np.nan
    kwargs = dict(l2=1.0, bootstrap=100, seed=0)
    with_nan = linear_probe.probe_metrics(train_x, train_missing, eval_x, eval_missing, **kwargs)
    keep_train, keep_eval = ~np.isnan(train_missing), ~np.isnan(eval_missing)
    without = linear_probe.probe_metrics(train_x[keep_train], train_y[keep_train],
                                         eval_x[keep_eval], eval_y[keep_eval], **kwargs)
    assert with_nan == without
    assert with_nan["num_examples"] == keep_eval.sum()
    one_class = np.zeros(60)
    assert linear_probe.probe_metrics(train_x, one_class, eval_x, eval_y, **kwargs) == {}


@pytest.fixture(scope="module")
def plugin(synthetic_data, tmp_path_factory):
    config = micro_config()
    ctx8 = make_context(config, synthetic_data, str(tmp_path_factory.mktemp("w8")), 8)
    params8 = init_params(ctx8)  # once: the 1-device run gets a copy on its mesh
    ctx1 = make_context(config, synthetic_data, str(tmp_path_factory.mktemp("w1")), 1)
    params1 = jax.device_put(params8, sharding.replicated(ctx1.spec.mesh))
    options = dict(name="p", split=SPLIT, train_split=SPLIT, bootstrap=200, seed=1)
    eval8 = linear_probe.Evaluator(ctx8.predict_fns, ctx8.spec, batch_size=8, **options)
    eval1 = linear_probe.Evaluator(ctx1.predict_fns, ctx1.spec, batch_size=4, **options)
    return {"metrics8": eval8.run(params8, 0), "metrics1": eval1.run(params1, 0),
            "ctx": ctx8, "params": params8}


def test_plugin_does_not_depend_on_devices_or_batch_size(plugin):
    metrics8, metrics1 = plugin["metrics8"], plugin["metrics1"]
    assert metrics8.keys() == metrics1.keys()
    for name, value in metrics8.items():
        np.testing.assert_allclose(metrics1[name], value, rtol=1e-4, atol=1e-6, err_msg=name)


def test_plugin_equals_a_probe_on_clip_by_clip_embeddings(plugin, synthetic_data):
    from input_pipeline import pipeline

    ctx, params = plugin["ctx"], plugin["params"]
    encode = jax.jit(lambda params, video: ctx.model.apply(
        {"params": params}, video, method="encode_video")[0])
    embeddings = {}
    pp = ctx.spec.pp()
    for batch in pipeline.make_eval_dataset(synthetic_data, SPLIT, pp, 4).as_numpy_iterator():
        for video, row, real in zip(batch["video"], batch["row"], batch["_mask"], strict=True):
            if real:
                embeddings[int(row)] = np.asarray(encode(params, video[None])[0])
    table = common.split_table(synthetic_data, SPLIT)
    features = np.stack([embeddings[int(row)] for row in table["row"]])
    metrics = plugin["metrics8"]
    # The tiny train split has no right-sided significant lesion: one class, skipped.
    assert np.all(table["label/right_significant"] == 0)
    probed = set()
    groups = [tuple(str(table[f"label/{c}"][i]) for c in common.ANATOMY_COLUMNS)
              for i in range(len(features))]
    for column in LABELS:
        labels = table[f"label/{column}"]
        expected = linear_probe.probe_metrics(features, labels, features, labels, l2=1.0,
                                              bootstrap=200, seed=1, eval_groups=groups)
        probed.update([column] if expected else [])
        for key, value in expected.items():
            np.testing.assert_allclose(metrics[f"{column}/{key}"], value, rtol=1e-4, atol=1e-6,
                                       err_msg=f"{column}/{key}")
    assert "right_significant" not in probed and "left_significant" in probed
    assert "left_significant/auroc_within" in metrics
    assert {key.split("/")[0] for key in metrics} == probed
    labels = table["label/left_significant"]
    head = linear_probe.fit_logistic(features, labels, 1.0)
    np.testing.assert_allclose(metrics["left_significant/auroc"],
                               mann_whitney_auroc(head.predict(features), labels), rtol=1e-4)


def test_bad_options_name_the_key(plugin):
    ctx = plugin["ctx"]
    with pytest.raises(ValueError, match=r"config.evals.p.labels: 'lvef'"):
        linear_probe.Evaluator(ctx.predict_fns, ctx.spec, name="p", batch_size=8,
                               labels=["view_cto", "lvef"])
    with pytest.raises(common.DataLacks, match=r"none of the label columns \['lvef'\]"):
        linear_probe.Evaluator(ctx.predict_fns, ctx.spec, name="p", batch_size=8, labels=["lvef"])
    with pytest.raises(ValueError, match="config.evals.p.l2"):
        linear_probe.Evaluator(ctx.predict_fns, ctx.spec, name="p", batch_size=8, l2=0.0)
    with pytest.raises(ValueError, match="config.evals.p.batch_size"):
        linear_probe.Evaluator(ctx.predict_fns, ctx.spec, name="p", batch_size=3)


def test_data_without_labels_is_data_lacks_not_a_config_error(synthetic_data, tmp_path):
    data_dir = without_labels(synthetic_data, tmp_path / "no_labels")
    ctx = make_context(micro_config(), data_dir, str(tmp_path / "work"), 8)
    with pytest.raises(common.DataLacks, match="carries no numeric label column"):
        linear_probe.Evaluator(ctx.predict_fns, ctx.spec, name="p", batch_size=8)
    with pytest.raises(common.DataLacks, match="has no split 'holdout'"):
        linear_probe.Evaluator(
            ctx.predict_fns, ctx.spec, name="p", batch_size=8, train_split="holdout"
        )
    for options in (dict(l2=0.0), dict(labels=[])):  # the options' own errors come first
        with pytest.raises(ValueError) as error:
            linear_probe.Evaluator(ctx.predict_fns, ctx.spec, name="p", batch_size=8, **options)
        assert not isinstance(error.value, common.DataLacks)


def test_within_group_auroc_counts_pairs_of_a_group_only():
    rng = np.random.default_rng(4)
    groups = rng.integers(0, 4, size=300)
    labels = (rng.random(300) < 0.2 + 0.15 * groups).astype(float)
    scores = rng.normal(size=300) + labels
    wins = pairs = 0.0
    for i in range(300):  # every (positive, negative) pair of one group, ties one half
        for j in range(300):
            if groups[i] == groups[j] and labels[i] == 1 and labels[j] == 0:
                wins += (scores[i] > scores[j]) + 0.5 * (scores[i] == scores[j])
                pairs += 1
    assert linear_probe.within_group_auroc(scores, labels, groups) == pytest.approx(wins / pairs)
    # A score that only knows the group is chance within groups, though not pooled.
    assert linear_probe.within_group_auroc(groups.astype(float), labels, groups) == 0.5
    assert linear_probe.auroc(groups.astype(float), labels) > 0.6
    assert linear_probe.within_group_auroc(labels, labels, groups) == 1.0
    assert np.isnan(linear_probe.within_group_auroc(scores, labels, labels))  # one class each
