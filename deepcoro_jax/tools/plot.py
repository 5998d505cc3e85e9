"""Training curves of a run: ``python -m deepcoro_jax.tools.plot DIR [--out PNG]``.

Reads ``DIR/metrics.jsonl`` (one JSON object per logged step, written by the
trainer; see docs/metrics.md) and draws one panel per group of values into a
PNG (default ``DIR/plots/training_curves.png``), with matplotlib's Agg backend:

- ``loss``: the total;
- ``loss/<term>``: each loss term, raw (``loss/<term>``) and weighted
  (``loss_weighted/<term>``);
- ``learning rate``: ``lr/<component>`` of every component;
- ``throughput``: ``videos_per_s`` (and ``mfu``, on a right axis, where logged);
  ``step time``: ``step_time_s`` and ``data_wait_s``;
- ``norms``: ``l2_grads``, ``l2_params``, ``l2_updates`` (log scale);
  ``temperature and bias``;
- one panel per evaluator (keys ``<eval name>/<metric>``, logged only at eval
  steps, drawn with markers) with its headline metrics: those whose name after
  ``<eval name>/`` matches ``--eval_metrics`` (default ``HEADLINE_METRICS``:
  Recall@1/5, MRR, median rank, alignment, BLEU-4, ROUGE-L, CIDEr-D, perplexity, the
  clinical summary metrics, MSE, PSNR, AUROC, MAE, with an optional direction
  prefix such as ``v2t_``; per-stratum breakdowns, which hold a ``/``, are
  left out). An evaluator none of whose metrics match gets all of its metrics
  but the counts (``num_*``, also per label), probes' base rates and its
  ``seconds``. Ceilings and baselines among them (``chance``, ``oracle_<kind>``,
  ``baseline`` metrics: what a random ranking, an oracle or a constant predictor
  reach on the same split) are drawn as dotted horizontal lines at their value. Metrics whose
  values all lie in [0, 1] share the left axis; the others (ranks, BLEU, PSNR,
  ...) go on a right axis, dashed
  (on the main axis when there are no [0, 1] metrics).

Lines that are not complete JSON (the last line of a run that was killed while
writing it) are skipped with a note on stderr. ``curve_panels`` returns exactly
the series that are drawn, for tests and for other plotting front ends.

Not for: TensorBoard (the trainer writes its events too), evaluator artefacts
(generated reports, reconstructions, attention maps).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from deepcoro_jax import paths

METRICS_FILE = "metrics.jsonl"
DEFAULT_OUT = os.path.join("plots", "training_curves.png")
HEADLINE_METRICS = (
    r"^(?:[^/]*_)?(?:recall@(?:1|5)|mrr|median_rank|alignment|bleu4|rouge_l|cider_d"
    r"|perplexity|parse_rate|stenosis_mae|severity_macro_f1|significant_f1|cto_recall"
    r"|dominance_accuracy|mse|psnr|auroc|mae)$"
)
# First segments of the trainer's own keys; any other '<name>/<metric>' key is an evaluator's.
TRAINING_PREFIXES = ("loss", "loss_weighted", "lr")
NORM_KEYS = ("l2_grads", "l2_params", "l2_updates")
PANELS_PER_ROW = 3
MARKER_MAX_POINTS = 50  # series with at most this many points are drawn with markers


@dataclasses.dataclass(frozen=True)
class Series:
    """One curve: the values of metrics.jsonl key `key` at the steps that logged it."""

    key: str
    steps: np.ndarray  # [N] int, increasing
    values: np.ndarray  # [N] float


@dataclasses.dataclass(frozen=True)
class Panel:
    """One subplot: `left` on the main axis, `right` (possibly empty) on a twin axis."""

    title: str
    left: tuple[Series, ...]
    right: tuple[Series, ...] = ()
    log_scale: bool = False
    markers: bool = False
    # Ceilings and baselines (chance, oracles): horizontal dotted lines at their last value.
    references: tuple[Series, ...] = ()

    @property
    def series(self) -> tuple[Series, ...]:
        return self.left + self.right + self.references


def read_metrics(path: str) -> list[dict[str, float]]:
    """The complete records of a metrics.jsonl file, in file order.

    Lines that are not valid JSON (cut short by a killed run) and blank lines
    are skipped, with a note on stderr. A complete record that is not an object
    with a numeric 'step' and numeric values is an error naming the line.
    """
    if not paths.Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file (is the folder a training run's workdir?)")
    records, cut_lines = [], []
    with paths.Path(path).open() as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                cut_lines.append(line_number)
                continue
            records.append(_checked_record(record, path, line_number))
    if cut_lines:
        print(f"{path}: skipped incomplete line(s) {cut_lines}", file=sys.stderr)
    if not records:
        raise ValueError(f"{path} holds no complete metrics record (empty, or only cut lines)")
    return records


def _checked_record(record: object, path: str, line_number: int) -> dict[str, float]:
    where = f"{path}, line {line_number}"
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "step" not in record:
        raise ValueError(f"{where}: the record has no 'step'")
    for key, value in record.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}: {key!r} is {value!r}, not a number")
    return record


def _series(records: Sequence[Mapping[str, float]], key: str) -> Series:
    """`key`'s values by step (a step logged twice keeps its last value)."""
    by_step = {int(r["step"]): float(r[key]) for r in records if key in r}
    steps = np.array(sorted(by_step), np.int64)
    return Series(key, steps, np.array([by_step[s] for s in steps], np.float64))


def _in_unit_interval(series: Series) -> bool:
    finite = series.values[np.isfinite(series.values)]
    return bool(np.all((finite >= 0.0) & (finite <= 1.0)))


def _is_bookkeeping(metric: str) -> bool:
    """Counts (``num_*``, also per label as ``<label>/num_*``), a probe's ``base_rate``
    (not on its AUROC's scale) and an evaluator's ``seconds``."""
    last = metric.rsplit("/", 1)[-1]
    return last.startswith("num_") or last == "base_rate" or metric == "seconds"


def _is_reference(metric: str) -> bool:
    """What a model could reach without learning, or at best: ``*chance_*``,
    ``*oracle_<kind>_*`` and ``*baseline_*`` metrics (e.g. ``v2t_chance_recall@5``,
    ``oracle_anatomy_recall@1``, ``<label>/baseline_mae``)."""
    return bool(re.search(r"(?:^|[_/])(?:chance|oracle_[a-z]+|baseline)_", metric))


def _ordered_unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def curve_panels(
    records: Sequence[Mapping[str, float]], eval_metrics: str = HEADLINE_METRICS
) -> list[Panel]:
    """The panels `plot_run` draws from metrics records, each with the exact values it plots.

    Groups (in this order, each only when the records have its keys): loss,
    one panel per loss term, learning rate, throughput, step time, norms,
    temperature and bias, then one panel per evaluator in order of first
    appearance. `eval_metrics` is a regular expression searched in each
    evaluator metric's name after ``<eval name>/``.
    """
    try:
        headline = re.compile(eval_metrics)
    except re.error as e:
        raise ValueError(f"eval_metrics={eval_metrics!r} is not a regular expression: {e}") from e
    keys = _ordered_unique(k for r in records for k in r if k != "step")
    prefixed = [k for k in keys if "/" in k]
    series = lambda names: tuple(_series(records, k) for k in names if k in keys)
    panels = []

    def add(title: str, left: tuple[Series, ...], right: tuple[Series, ...] = (), **options):
        if not left:  # a lone right axis is drawn as the main one
            left, right = right, ()
        if left:
            panels.append(Panel(title, left, right, **options))

    add("loss", series(["loss"]))
    terms = _ordered_unique(
        k.split("/", 1)[1] for k in prefixed if k.split("/")[0] in ("loss", "loss_weighted")
    )
    for term in terms:
        add(f"loss/{term}", series([f"loss/{term}", f"loss_weighted/{term}"]))
    add("learning rate", series([k for k in prefixed if k.startswith("lr/")]))
    add("throughput", series(["videos_per_s"]), series(["mfu"]))
    add("step time", series(["step_time_s", "data_wait_s"]))
    add("norms", series(NORM_KEYS), log_scale=True)
    add("temperature and bias", series(["temperature", "bias"]))

    evaluators = _ordered_unique(
        k.split("/")[0] for k in prefixed if k.split("/")[0] not in TRAINING_PREFIXES
    )
    for name in evaluators:
        metrics = {k: k.split("/", 1)[1] for k in prefixed if k.split("/")[0] == name}
        chosen = [k for k, metric in metrics.items() if headline.search(metric)]
        if not chosen:
            chosen = [k for k, metric in metrics.items() if not _is_bookkeeping(metric)]
        eval_series = series(chosen or list(metrics))
        curves = [s for s in eval_series if not _is_reference(metrics[s.key])]
        add(
            name,
            tuple(s for s in curves if _in_unit_interval(s)),
            tuple(s for s in curves if not _in_unit_interval(s)),
            markers=True,
            references=tuple(s for s in eval_series if _is_reference(metrics[s.key])),
        )
    return panels


def draw(panels: Sequence[Panel], out: str, title: str) -> Figure:
    """Draws `panels` in a grid of PANELS_PER_ROW columns, writes the PNG `out`; returns the figure.

    Each panel's main axis carries its title; every line is labelled with its
    metrics.jsonl key.
    """
    if not panels:
        raise ValueError(f"nothing to plot for {title}: the records hold only 'step'")
    columns = min(PANELS_PER_ROW, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(5.0 * columns, 3.4 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(title)
    for index, panel in enumerate(panels):
        axis = figure.add_subplot(rows, columns, index + 1)
        axis.set_title(panel.title)
        axis.set_xlabel("step")
        handles = _draw_series(axis, panel.left, panel.markers, "-")
        if panel.log_scale:
            axis.set_yscale("log")
        twin = None
        if panel.right or any(not _in_unit_interval(s) for s in panel.references):
            twin = axis.twinx()
            handles += _draw_series(twin, panel.right, panel.markers, "--", len(panel.left))
        colour = len(panel.left) + len(panel.right)
        for i, reference in enumerate(panel.references):
            on = axis if _in_unit_interval(reference) or twin is None else twin
            handles.append(on.axhline(reference.values[-1], linestyle=":", linewidth=1.5,
                                      color=f"C{(colour + i) % 10}",
                                      label=f"{reference.key} = {reference.values[-1]:.3g}"))
        axis.grid(alpha=0.3)
        crowded = len(handles) > 8
        axis.legend(handles=handles, fontsize="x-small" if crowded else "small",
                    ncol=2 if crowded else 1)
    paths.Path(out).parent.mkdir(parents=True, exist_ok=True)
    with paths.Path(out).open("wb") as f:
        figure.savefig(f, dpi=100, format="png")
    return figure


def _draw_series(
    axis: Axes, series: Sequence[Series], markers: bool, style: str, color_offset: int = 0
) -> list[Line2D]:
    handles = []
    for i, s in enumerate(series):
        marker = "o" if markers or len(s.steps) <= MARKER_MAX_POINTS else None
        (line,) = axis.plot(
            s.steps,
            s.values,
            style,
            marker=marker,
            markersize=3,
            label=s.key,
            color=f"C{(i + color_offset) % 10}",
        )
        handles.append(line)
    return handles


def plot_run(workdir: str, out: str | None = None, eval_metrics: str = HEADLINE_METRICS) -> str:
    """Reads ``workdir/metrics.jsonl``, writes its training curves; returns the PNG's path."""
    workdir = paths.resolve(workdir)
    records = read_metrics(os.path.join(workdir, METRICS_FILE))
    out = paths.resolve(out or os.path.join(workdir, DEFAULT_OUT))
    draw(curve_panels(records, eval_metrics), out, workdir)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m deepcoro_jax.tools.plot", description="Training curves of a run, as a PNG."
    )
    parser.add_argument("workdir", help="the run's folder, holding metrics.jsonl")
    parser.add_argument("--out", help=f"the PNG to write (default: WORKDIR/{DEFAULT_OUT})")
    parser.add_argument(
        "--eval_metrics",
        default=HEADLINE_METRICS,
        help="regular expression selecting each evaluator's metrics to draw, searched in the "
        "name after '<eval name>/' (default: the headline metrics)",
    )
    args = parser.parse_args(argv)
    try:
        out = plot_run(args.workdir, args.out, args.eval_metrics)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"plot: {e}")
    print(out)


if __name__ == "__main__":
    main()
