"""Linear probes on frozen video embeddings: AUROC for binary labels, MAE for continuous ones.

For: the probe heads (``fit_logistic``, ``fit_ridge``: NumPy, float64, on
standardised features), the metrics (``auroc`` with ties, ``bootstrap_auroc_ci``,
``probe_metrics``) and ``Evaluator`` (``type='linear_probe'`` in
``config.evals``), which embeds a train and an eval split with the frozen model
(``encode_video``'s normalised ``video_emb``), fits one head per label column
carried by prepare on the train split and scores it on the eval split:

- a label whose values (both splits, missing ones aside) are all 0 or 1 is
  binary: an L2-regularised logistic regression, fitted by Newton's method,
  gives '<label>/auroc' and its bootstrap 95% CI '<label>/auroc_ci_low',
  '<label>/auroc_ci_high' (resampling the eval examples; seeded);
- any other label is continuous: ridge regression (closed form) gives '<label>/mae';
- '<label>/num_examples' counts the eval examples scored. Rows whose label is
  missing (NaN) are left out of both the fit and the score. A label that cannot
  be probed (no labelled rows, one class only in either split) is skipped with
  a warning.

The regularisation is ``l2 * ||w||^2 / 2`` added to the summed log-loss
(logistic; scikit-learn's ``C = 1 / l2``) or ``l2 * ||w||^2`` added to the
summed squared error (ridge), on features standardised with the labelled train
rows' mean and standard deviation; the intercept is not penalised.

Not for: exporting embeddings (``deepcoro_jax/export.py``), clinical metrics of
generated reports (``captioning.py``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from evaluators import common

_BOOTSTRAP_CHUNK_ELEMENTS = 1 << 22  # resamples x examples per chunk of the bootstrap
_NEWTON_MAX_STEPS = 100
_NEWTON_TOLERANCE = 1e-16  # on half the squared Newton decrement (quadratic convergence)


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


def _standardise(features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    features = np.asarray(features, np.float64)
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)  # a constant feature stays 0
    return (features - mean) / scale, mean, scale


def _check_fit_inputs(features: np.ndarray, labels: np.ndarray, l2: float, what: str) -> None:
    if features.ndim != 2 or labels.shape != (features.shape[0],) or not len(labels):
        raise ValueError(f"{what}: need features [N, E] and labels [N] with N > 0, got "
                         f"{features.shape} and {labels.shape}")
    if not np.all(np.isfinite(labels)):
        raise ValueError(f"{what}: labels must be finite (drop the missing rows first)")
    if l2 <= 0:
        raise ValueError(f"{what}: l2={l2} must be positive")


def fit_ridge(features: np.ndarray, labels: np.ndarray, l2: float) -> LinearHead:
    """Ridge regression: argmin sum (y - x.w - b)^2 + l2 ||w||^2, in closed form."""
    features, labels = np.asarray(features), np.asarray(labels, np.float64)
    _check_fit_inputs(features, labels, l2, "fit_ridge")
    x, mean, scale = _standardise(features)  # [N, E], columns centred
    bias = labels.mean()  # the intercept of centred features
    centred = labels - bias
    num_examples, dim = x.shape
    if num_examples >= dim:
        weights = np.linalg.solve(x.T @ x + l2 * np.eye(dim), x.T @ centred)
    else:  # the dual: the same solution from an N x N system
        weights = x.T @ np.linalg.solve(x @ x.T + l2 * np.eye(num_examples), centred)
    return LinearHead(weights, float(bias), mean, scale)


def fit_logistic(features: np.ndarray, labels: np.ndarray, l2: float) -> LinearHead:
    """L2-regularised logistic regression by Newton's method with a backtracking line search.

    Minimises sum_i [log(1 + exp(z_i)) - y_i z_i] + l2 ||w||^2 / 2 with
    z = x.w + b. Labels must hold both 0 and 1.
    """
    features, labels = np.asarray(features), np.asarray(labels, np.float64)
    _check_fit_inputs(features, labels, l2, "fit_logistic")
    if not np.all((labels == 0) | (labels == 1)) or len(np.unique(labels)) != 2:
        raise ValueError("fit_logistic: labels must be 0 or 1, with both present")
    x, mean, scale = _standardise(features)
    design = np.concatenate([x, np.ones((len(x), 1))], axis=1)  # [N, E + 1]
    penalty = np.full(design.shape[1], float(l2))
    penalty[-1] = 0.0  # the intercept

    def objective(params: np.ndarray) -> float:
        logits = design @ params
        return float(np.sum(np.logaddexp(0.0, logits) - labels * logits)
                     + 0.5 * np.sum(penalty * params**2))

    params = np.zeros(design.shape[1])
    value = objective(params)
    for _ in range(_NEWTON_MAX_STEPS):
        probs = np.exp(-np.logaddexp(0.0, -(design @ params)))  # sigmoid, without overflow
        gradient = design.T @ (probs - labels) + penalty * params
        hessian = design.T @ (design * (probs * (1.0 - probs))[:, None]) + np.diag(penalty)
        step = np.linalg.solve(hessian, gradient)
        decrement = float(gradient @ step)  # squared Newton decrement
        if decrement / 2 <= _NEWTON_TOLERANCE:
            break
        size = 1.0  # backtracking (Armijo) line search along the Newton step
        candidate_value = objective(params - step)
        while candidate_value > value - 0.25 * size * decrement:
            size /= 2
            if size < 1e-10:  # no descent left at floating-point precision
                return LinearHead(params[:-1], float(params[-1]), mean, scale)
            candidate_value = objective(params - size * step)
        params, value = params - size * step, candidate_value
    return LinearHead(params[:-1], float(params[-1]), mean, scale)


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


def _weighted_auroc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC [R] of R weightings [R, N] of one sample (NaN where a class has no weight).

    The probability that a positive scores above a negative, ties counting one half.
    """
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    group_starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    weights = weights[:, order]  # [R, N]
    positives = np.add.reduceat(weights * labels[order], group_starts, axis=1)  # [R, G]
    negatives = np.add.reduceat(weights * (1.0 - labels[order]), group_starts, axis=1)  # [R, G]
    negatives_below = np.cumsum(negatives, axis=1) - negatives  # [R, G]
    wins = np.sum(positives * (negatives_below + 0.5 * negatives), axis=1)  # [R]
    pairs = positives.sum(axis=1) * negatives.sum(axis=1)  # [R]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / pairs, np.nan)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties 1/2."""
    scores, labels = _check_binary(scores, labels, "auroc")
    if len(np.unique(labels)) != 2:
        raise ValueError("auroc: labels must hold both classes")
    return float(_weighted_auroc(scores, labels, np.ones((1, len(scores))))[0])


def bootstrap_auroc_ci(
    scores: np.ndarray,
    labels: np.ndarray,
    num_resamples: int,
    seed: int,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the AUROC: resamples the examples with replacement.

    Resamples holding one class only are dropped. Returns (low, high); NaN when
    no resample holds both classes.
    """
    scores, labels = _check_binary(scores, labels, "bootstrap_auroc_ci")
    if num_resamples < 1 or not 0 < level < 1:
        raise ValueError(f"bootstrap_auroc_ci: need num_resamples >= 1 and 0 < level < 1, got "
                         f"{num_resamples} and {level}")
    rng = np.random.default_rng(seed)
    num_examples = len(scores)
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // num_examples)
    values = []
    for start in range(0, num_resamples, chunk):
        size = min(chunk, num_resamples - start)
        counts = rng.multinomial(num_examples, np.full(num_examples, 1.0 / num_examples),
                                 size=size)  # [R, N] times each example is drawn
        values.append(_weighted_auroc(scores, labels, counts.astype(np.float64)))
    values = np.concatenate(values)
    values = values[~np.isnan(values)]
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
) -> dict[str, float]:
    """Fits one probe on the labelled train rows and scores it on the labelled eval rows.

    Binary labels (``is_binary`` over both splits): 'auroc', 'auroc_ci_low',
    'auroc_ci_high' (when ``bootstrap`` > 0); continuous: 'mae'; both
    'num_examples'. Returns {} (and logs why, naming `label`) when the label
    cannot be probed.
    """
    train_labels = np.asarray(train_labels, np.float64)
    eval_labels = np.asarray(eval_labels, np.float64)
    train_rows, eval_rows = ~np.isnan(train_labels), ~np.isnan(eval_labels)
    train_features, train_labels = train_features[train_rows], train_labels[train_rows]
    eval_features, eval_labels = eval_features[eval_rows], eval_labels[eval_rows]
    if not len(train_labels) or not len(eval_labels):
        logging.warning("linear probe %r skipped: no labelled %s rows", label,
                        "train" if not len(train_labels) else "eval")
        return {}
    if not is_binary(train_labels, eval_labels):
        head = fit_ridge(train_features, train_labels, l2)
        mae = np.mean(np.abs(head.predict(eval_features) - eval_labels))
        return {"mae": float(mae), "num_examples": float(len(eval_labels))}
    for split, values in (("train", train_labels), ("eval", eval_labels)):
        if len(np.unique(values)) != 2:
            logging.warning("linear probe %r skipped: the %s rows hold one class only", label,
                            split)
            return {}
    head = fit_logistic(train_features, train_labels, l2)
    scores = head.predict(eval_features)
    metrics = {"auroc": auroc(scores, eval_labels), "num_examples": float(len(eval_labels))}
    if bootstrap:
        low, high = bootstrap_auroc_ci(scores, eval_labels, bootstrap, seed)
        metrics.update(auroc_ci_low=low, auroc_ci_high=high)
    return metrics


class Evaluator:
    """Linear probes of the frozen video embeddings; see the module docstring.

    ``labels``: the label columns to probe (prepare's ``--label_columns``);
    default every numeric label column of the dataset (none: ``common.DataLacks``).
    """

    def __init__(
        self,
        ctx: common.EvalContext,
        *,
        name: str,
        split: str = "val",
        train_split: str = "train",
        batch_size: int = 32,
        labels: Sequence[str] | None = None,
        l2: float = 1.0,
        bootstrap: int = 1000,
        seed: int = 0,
    ):
        from input_pipeline import dataset_format

        where = f"config.evals.{name}"
        common.check_batch_size(batch_size, ctx.mesh, where)
        if l2 <= 0:
            raise ValueError(f"{where}.l2={l2} must be positive")
        if bootstrap < 0:
            raise ValueError(f"{where}.bootstrap={bootstrap} must be at least 0")
        kinds = dataset_format.load_meta(ctx.data_dir).label_columns
        numeric = [column for column, kind in kinds.items() if kind == "float"]
        if labels is not None:
            if isinstance(labels, str) or not labels:
                raise ValueError(f"{where}.labels={labels!r} must be a non-empty list of columns")
            for column in labels:
                if column not in numeric:
                    raise ValueError(
                        f"{where}.labels: {column!r} is not a numeric label column "
                        f"of {ctx.data_dir}; it has {numeric}"
                    )
        common.require_split(ctx, split)
        common.require_split(ctx, train_split)
        if labels is None:
            if not numeric:
                raise common.DataLacks(
                    f"{ctx.data_dir} carries no numeric label column (prepare --label_columns)"
                )
            labels = numeric
        self.ctx, self.split, self.train_split = ctx, split, train_split
        self.batch_size, self.labels = batch_size, list(labels)
        # What the trainer prints: each label's AUROC or MAE (whichever it gets).
        self.HEADLINE = tuple(f"{c}/{m}" for c in self.labels for m in ("auroc", "mae"))
        self.l2, self.bootstrap, self.seed = float(l2), int(bootstrap), seed
        self._embed_videos = common.video_embedder(ctx)

    def _split_features(self, params: Any, split: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Video embeddings [N, E] of `split` and its label columns [N], by manifest row."""
        out = common.predict_split(self.ctx, self._embed_videos, params, split=split,
                                   pp=self.ctx.pp(), batch_size=self.batch_size)
        facts = common.join_rows(common.split_table(self.ctx.data_dir, split), out[common.ROW_KEY])
        return out["video_emb"], {column: facts[f"label/{column}"] for column in self.labels}

    def run(self, params: Any, step: int) -> dict[str, float]:
        del step  # the probe writes no artefacts
        train_features, train_labels = self._split_features(params, self.train_split)
        if self.split == self.train_split:
            eval_features, eval_labels = train_features, train_labels
        else:
            eval_features, eval_labels = self._split_features(params, self.split)
        metrics = {}
        for column in self.labels:
            probe = probe_metrics(
                train_features, train_labels[column], eval_features, eval_labels[column],
                l2=self.l2, bootstrap=self.bootstrap, seed=self.seed, label=column,
            )
            metrics.update({f"{column}/{key}": value for key, value in probe.items()})
        return metrics
