"""Linear probes on frozen video embeddings: AUROC for binary labels, MAE for continuous ones.

For: the probe heads (``fit_logistic``, ``fit_ridge``), the metrics (``auroc``,
``bootstrap_auroc_ci``, ``probe_metrics``) and ``Evaluator``
(``type='linear_probe'`` in ``config.evals``), which embeds a train and an eval
split with the frozen model (``encode_video``'s normalised ``video_emb``), fits
one head per label column carried by prepare on the train split and scores it
on the eval split:

- a label whose values (both splits, missing ones aside) are all 0 or 1 is
  binary: an L2-regularised logistic regression gives '<label>/auroc' and its
  bootstrap 95% CI '<label>/auroc_ci_low', '<label>/auroc_ci_high' (resampling
  the eval examples; seeded), beside '<label>/base_rate', the eval examples'
  fraction of positives, and '<label>/auroc_within', the AUROC within groups of
  examples of the same view anatomy (``group_columns``), which a probe that only
  recognises the anatomy cannot raise above 0.5;
- any other label is continuous: ridge regression gives '<label>/mae', beside
  '<label>/baseline_mae', the error of predicting the train median for every example;
- '<label>/num_examples' counts the eval examples scored. Rows whose label is
  missing (NaN) are left out of both the fit and the score. A label that cannot
  be probed (no labelled rows, one class only in either split) is skipped with
  a warning.

scikit-learn does the numerical work, in float64: ``StandardScaler`` (the
labelled train rows' mean and standard deviation), ``LogisticRegression``
(solver 'newton-cholesky': Newton steps on the exact Hessian), ``Ridge``
(solver 'cholesky': the closed form, or its dual when there are fewer examples
than features), ``roc_auc_score`` (ties count one half) and
``mean_absolute_error``. What is ours: choosing the head per label, the
bootstrap, and leaving out missing labels.

The regularisation is fixed by ``l2`` (default 1): ``l2 * ||w||^2 / 2`` added to
the summed log-loss (logistic: ``C = 1 / l2``) or ``l2 * ||w||^2`` added to the
summed squared error (ridge: ``alpha = l2``), on the standardised features; the
intercept is not penalised. It is not tuned: CLIP's linear probes (and
CLIP_benchmark's, when given a validation split) sweep it on a held-out part of
the train data and keep the best; here one setting is kept for every
evaluation of a run, so that the numbers move only with the embeddings.

Not for: exporting embeddings (``deepcoro_jax/tools/export.py``), clinical
metrics of generated reports (``captioning.py``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from evaluators import common

# scikit-learn is imported where it is used: the import takes about a second and a
# half of CPU, which every process that registers the evaluators (every training run)
# would otherwise pay for a probe it may not run.

BOOTSTRAP_CHUNK = 128  # resamples scored together by `weighted_aurocs`
_NEWTON_MAX_STEPS = 100
# On max |gradient| and half the squared Newton decrement of scikit-learn's objective,
# which is ours divided by the number of examples; Newton converges quadratically.
_NEWTON_TOLERANCE = 1e-12


@dataclasses.dataclass(frozen=True)
class LinearHead:
    """A linear head on standardised features: ((x - mean) / scale) @ weights + bias."""

    weights: np.ndarray  # [E]
    bias: float
    mean: np.ndarray  # [E]
    scale: np.ndarray  # [E]

    def predict(self, features: np.ndarray) -> np.ndarray:
        """[N, E] features -> [N] scores (logits for a logistic head)."""
        standardised = (np.asarray(features, np.float64) - self.mean) / self.scale
        return standardised @ self.weights + self.bias


def _check_fit_inputs(
    features: np.ndarray, labels: np.ndarray, l2: float, what: str
) -> tuple[np.ndarray, np.ndarray]:
    features, labels = np.asarray(features, np.float64), np.asarray(labels, np.float64)
    if features.ndim != 2 or labels.shape != (features.shape[0],) or not len(labels):
        raise ValueError(f"{what}: need features [N, E] and labels [N] with N > 0, got "
                         f"{features.shape} and {labels.shape}")
    if not np.all(np.isfinite(labels)):
        raise ValueError(f"{what}: labels must be finite (drop the missing rows first)")
    if l2 <= 0:
        raise ValueError(f"{what}: l2={l2} must be positive")
    return features, labels


def fit_ridge(features: np.ndarray, labels: np.ndarray, l2: float) -> LinearHead:
    """Ridge regression: argmin sum (y - x.w - b)^2 + l2 ||w||^2 on standardised x,
    in closed form (``Ridge(alpha=l2, solver='cholesky')``)."""
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    features, labels = _check_fit_inputs(features, labels, l2, "fit_ridge")
    scaler = StandardScaler().fit(features)
    ridge = Ridge(alpha=l2, solver="cholesky").fit(scaler.transform(features), labels)
    return LinearHead(ridge.coef_, float(ridge.intercept_), scaler.mean_, scaler.scale_)


def fit_logistic(features: np.ndarray, labels: np.ndarray, l2: float) -> LinearHead:
    """L2-regularised logistic regression on standardised features.

    Minimises sum_i [log(1 + exp(z_i)) - y_i z_i] + l2 ||w||^2 / 2 with
    z = x.w + b: ``LogisticRegression(C=1 / l2, solver='newton-cholesky')``.
    Labels must hold both 0 and 1.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    features, labels = _check_fit_inputs(features, labels, l2, "fit_logistic")
    if not np.all((labels == 0) | (labels == 1)) or len(np.unique(labels)) != 2:
        raise ValueError("fit_logistic: labels must be 0 or 1, with both present")
    scaler = StandardScaler().fit(features)
    logistic = LogisticRegression(C=1.0 / l2, solver="newton-cholesky",
                                  tol=_NEWTON_TOLERANCE, max_iter=_NEWTON_MAX_STEPS)
    logistic.fit(scaler.transform(features), labels)  # classes_ [0, 1]: logits of 1
    return LinearHead(logistic.coef_[0], float(logistic.intercept_[0]), scaler.mean_,
                      scaler.scale_)


def _check_binary(scores: np.ndarray, labels: np.ndarray, what: str) -> tuple[np.ndarray, ...]:
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"{what}: scores and labels must be 1-D of one length, got "
                         f"{scores.shape} and {labels.shape}")
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError(f"{what}: labels must be 0 or 1")
    if np.isnan(scores).any():
        raise ValueError(f"{what}: scores contain NaN")
    return scores, labels.astype(np.float64)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (``roc_auc_score``): P(score of a positive > score of a
    negative), ties counting one half."""
    from sklearn.metrics import roc_auc_score

    scores, labels = _check_binary(scores, labels, "auroc")
    if len(np.unique(labels)) != 2:
        raise ValueError("auroc: labels must hold both classes")
    return float(roc_auc_score(labels, scores))


def within_group_auroc(scores: np.ndarray, labels: np.ndarray, groups: Sequence) -> float:
    """AUROC over the (positive, negative) pairs of the same group only: P(score of a
    positive > score of a negative of its group), ties one half, every such pair
    weighted alike. What a score knows beyond its group (for example a view's anatomy):
    a score that only tells groups apart gets 0.5. NaN when no group holds both classes.
    """
    from sklearn.metrics import roc_auc_score

    scores, labels = _check_binary(scores, labels, "within_group_auroc")
    groups = _group_ids(groups)
    if groups.shape != labels.shape:
        raise ValueError(f"within_group_auroc: {len(groups)} groups for {len(labels)} labels")
    wins = pairs = 0.0
    for group in np.unique(groups):
        members = groups == group
        positives = int(labels[members].sum())
        negatives = int(members.sum()) - positives
        if positives and negatives:
            wins += roc_auc_score(labels[members], scores[members]) * positives * negatives
            pairs += positives * negatives
    return float(wins / pairs) if pairs else float("nan")


def _group_ids(groups: Sequence) -> np.ndarray:
    """[N] int: one id per distinct group (any hashable values, tuples included)."""
    ids: dict = {}
    return np.array([ids.setdefault(group, len(ids)) for group in groups], np.int64)


def weighted_aurocs(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The AUROC of `scores` for each row of `weights` [R, N] as example weights: [R].

    The Mann-Whitney statistic over weighted pairs (ties count one half), which is
    what ``roc_auc_score(labels, scores, sample_weight=row)`` computes, for all rows
    at once: examples are grouped by score, and each group's positives win over the
    negatives of lower groups. NaN for a row without weight on both classes.
    """
    groups, index = np.unique(scores, return_inverse=True)
    order = np.argsort(index, kind="stable")
    starts = np.searchsorted(index[order], np.arange(len(groups)))
    positive = (labels == 1)[order]
    w = np.asarray(weights, np.float64)[:, order]
    pos = np.add.reduceat(w * positive, starts, axis=1)  # [R, G] positive weight per score
    neg = np.add.reduceat(w * ~positive, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # negative weight with a lower score
    wins = np.sum(pos * (below + 0.5 * neg), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return wins / (pos.sum(axis=1) * neg.sum(axis=1))


def bootstrap_auroc_ci(
    scores: np.ndarray,
    labels: np.ndarray,
    num_resamples: int,
    seed: int,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the AUROC: resamples the examples with replacement.

    Each resample is the number of times each example is drawn (a multinomial
    draw), scored as ``roc_auc_score`` with those counts as sample weights
    (`weighted_aurocs`, all resamples at once). Resamples holding one class only
    are dropped. Returns (low, high); NaN when no resample holds both classes.
    """
    scores, labels = _check_binary(scores, labels, "bootstrap_auroc_ci")
    if num_resamples < 1 or not 0 < level < 1:
        raise ValueError(f"bootstrap_auroc_ci: need num_resamples >= 1 and 0 < level < 1, got "
                         f"{num_resamples} and {level}")
    rng = np.random.default_rng(seed)
    num_examples = len(scores)
    uniform = np.full(num_examples, 1.0 / num_examples)
    values = []
    for start in range(0, num_resamples, BOOTSTRAP_CHUNK):  # [chunk, N] counts at a time
        size = min(BOOTSTRAP_CHUNK, num_resamples - start)
        counts = np.stack([rng.multinomial(num_examples, uniform) for _ in range(size)])
        aurocs = weighted_aurocs(scores, labels, counts)
        values.append(aurocs[np.isfinite(aurocs)])
    values = np.concatenate(values)
    if not len(values):
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def is_binary(*label_arrays: np.ndarray) -> bool:
    """Whether every non-missing value of the arrays is 0 or 1."""
    values = np.concatenate([np.asarray(a, np.float64).ravel() for a in label_arrays])
    values = values[~np.isnan(values)]
    return bool(np.all((values == 0) | (values == 1)))


def probe_metrics(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    eval_features: np.ndarray,
    eval_labels: np.ndarray,
    *,
    l2: float,
    bootstrap: int,
    seed: int,
    label: str = "label",
    eval_groups: np.ndarray | None = None,
) -> dict[str, float]:
    """Fits one probe on the labelled train rows and scores it on the labelled eval rows.

    Binary labels (``is_binary`` over both splits): 'auroc', 'auroc_ci_low',
    'auroc_ci_high' (when ``bootstrap`` > 0), 'base_rate' (the eval rows'
    fraction of positives; chance AUROC is 0.5 whatever it is) and, with
    `eval_groups` ([N] a group per eval row), 'auroc_within' (`within_group_auroc`);
    continuous: 'mae' and 'baseline_mae' (predicting the train median for every
    row); both 'num_examples'. Returns {} (and logs why, naming `label`) when the label
    cannot be probed.
    """
    train_labels = np.asarray(train_labels, np.float64)
    eval_labels = np.asarray(eval_labels, np.float64)
    train_rows, eval_rows = ~np.isnan(train_labels), ~np.isnan(eval_labels)
    train_features, train_labels = train_features[train_rows], train_labels[train_rows]
    eval_features, eval_labels = eval_features[eval_rows], eval_labels[eval_rows]
    if eval_groups is not None:
        eval_groups = _group_ids(eval_groups)[eval_rows]
    if not len(train_labels) or not len(eval_labels):
        logging.warning("linear probe %r skipped: no labelled %s rows", label,
                        "train" if not len(train_labels) else "eval")
        return {}
    if not is_binary(train_labels, eval_labels):
        from sklearn.metrics import mean_absolute_error

        head = fit_ridge(train_features, train_labels, l2)
        mae = mean_absolute_error(eval_labels, head.predict(eval_features))
        # What knowing nothing of the video gives: the train median for every example.
        baseline = mean_absolute_error(eval_labels, np.full_like(eval_labels,
                                                                 np.median(train_labels)))
        return {"mae": float(mae), "baseline_mae": float(baseline),
                "num_examples": float(len(eval_labels))}
    for split, values in (("train", train_labels), ("eval", eval_labels)):
        if len(np.unique(values)) != 2:
            logging.warning("linear probe %r skipped: the %s rows hold one class only", label,
                            split)
            return {}
    head = fit_logistic(train_features, train_labels, l2)
    scores = head.predict(eval_features)
    metrics = {"auroc": auroc(scores, eval_labels), "base_rate": float(eval_labels.mean()),
               "num_examples": float(len(eval_labels))}
    if bootstrap:
        low, high = bootstrap_auroc_ci(scores, eval_labels, bootstrap, seed)
        metrics.update(auroc_ci_low=low, auroc_ci_high=high)
    if eval_groups is not None:
        metrics["auroc_within"] = within_group_auroc(scores, eval_labels, eval_groups)
    return metrics


@common.register("linear_probe")
class Evaluator(common.Evaluator):
    """Linear probes of the frozen video embeddings (``encode_video``); see the module docstring.

    ``labels``: the label columns to probe (prepare's ``--label_columns``);
    default every numeric label column of the dataset (none, or none of those
    named: ``common.DataLacks``, the evaluator is left out; some of those named
    missing: a ValueError).
    ``group_columns``: label columns that group the eval examples for
    '<label>/auroc_within' (`within_group_auroc`, for binary labels); default those
    of ``common.ANATOMY_COLUMNS`` the dataset carries (a view's system, landmark and
    magnification: what the probe knows beyond the view's anatomy); () for none.
    """

    PREDICT = ("encode_video",)

    def __init__(
        self,
        predict_fns: Mapping[str, common.PredictFn],
        spec: common.EvalSpec,
        *,
        train_split: str = "train",
        labels: Sequence[str] | None = None,
        group_columns: Sequence[str] | None = None,
        l2: float = 1.0,
        bootstrap: int = 1000,
        seed: int = 0,
        **base: Any,
    ):
        from input_pipeline import dataset_format  # TensorFlow

        super().__init__(predict_fns, spec, **base)
        where = self.where
        if l2 <= 0:
            raise ValueError(f"{where}.l2={l2} must be positive")
        if bootstrap < 0:
            raise ValueError(f"{where}.bootstrap={bootstrap} must be at least 0")
        kinds = dataset_format.load_meta(spec.data_dir).label_columns
        numeric = [column for column, kind in kinds.items() if kind == "float"]
        if labels is not None:
            if isinstance(labels, str) or not labels:
                raise ValueError(f"{where}.labels={labels!r} must be a non-empty list of columns")
            if not set(labels) & set(numeric):
                raise common.DataLacks(
                    f"{spec.data_dir} carries none of the label columns {list(labels)} "
                    f"(numeric label columns: {numeric})"
                )
            for column in labels:
                if column not in numeric:
                    raise ValueError(
                        f"{where}.labels: {column!r} is not a numeric label column "
                        f"of {spec.data_dir}; it has {numeric}"
                    )
        common.require_split(spec, self.split)
        common.require_split(spec, train_split)
        if labels is None:
            if not numeric:
                raise common.DataLacks(
                    f"{spec.data_dir} carries no numeric label column (prepare --label_columns)"
                )
            labels = numeric
        if group_columns is None:
            group_columns = [column for column in common.ANATOMY_COLUMNS if column in kinds]
        elif isinstance(group_columns, str) or any(c not in kinds for c in group_columns):
            raise ValueError(f"{where}.group_columns={group_columns!r} must be a list of label "
                             f"columns of {spec.data_dir}; it has {sorted(kinds)}")
        self.group_columns = list(group_columns)
        self.train_split, self.labels = train_split, list(labels)
        # What the trainer prints: each label's AUROC or MAE (whichever it gets).
        self.HEADLINE = tuple(f"{c}/{m}" for c in self.labels for m in (
            "auroc", "auroc_within", "base_rate", "mae", "baseline_mae"))
        self.l2, self.bootstrap, self.seed = float(l2), int(bootstrap), seed
        self._embed_videos = common.video_embedder(self.predict_fns, spec)

    def _split_features(self, params: Any, split: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Video embeddings [N, E] of `split` and its label columns [N], by manifest row."""
        out = common.predict_split(self.spec, self._embed_videos, params, split=split,
                                   pp=self.spec.pp(), batch_size=self.batch_size)
        facts = common.join_rows(common.split_table(self.spec.data_dir, split), out[common.ROW_KEY])
        columns = dict.fromkeys([*self.labels, *self.group_columns])
        return out["video_emb"], {column: facts[f"label/{column}"] for column in columns}

    def run(self, params: Any, step: int) -> dict[str, float]:
        del step  # the probe writes no artefacts
        train_features, train_labels = self._split_features(params, self.train_split)
        if self.split == self.train_split:
            eval_features, eval_labels = train_features, train_labels
        else:
            eval_features, eval_labels = self._split_features(params, self.split)
        groups = None
        if self.group_columns:
            groups = [tuple(str(eval_labels[c][i]) for c in self.group_columns)
                      for i in range(len(eval_features))]
        metrics = {}
        for column in self.labels:
            probe = probe_metrics(
                train_features, train_labels[column], eval_features, eval_labels[column],
                l2=self.l2, bootstrap=self.bootstrap, seed=self.seed, label=column,
                eval_groups=groups,
            )
            metrics.update({f"{column}/{key}": value for key, value in probe.items()})
        return metrics
