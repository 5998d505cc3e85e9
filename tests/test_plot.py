"""deepcoro_jax/tools/plot.py: the curves it draws are the values of a hand-written
metrics.jsonl."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from deepcoro_jax.tools import plot

TRAIN_RECORDS = [
    {
        "step": step,
        "loss": 3.0 / step,
        "loss/contrastive": 1.0 / step,
        "loss/caption": 2.0 / step,
        "loss_weighted/contrastive": 1.0 / step,
        "loss_weighted/caption": 0.5 * 2.0 / step,
        "l2_grads": 0.5 + step,
        "l2_params": 40.0 + step,
        "l2_updates": 0.01 * step,
        "temperature": 10.0 + 0.1 * step,
        "bias": -10.0 + 0.01 * step,
        "lr/video_encoder": 1e-4 * step,
        "lr/caption_decoder": 2e-4 * step,
        "videos_per_s": 100.0 + step,
        "step_time_s": 16.0 / (100.0 + step),
        "data_wait_s": 0.001 * step,
    }
    for step in (1, 10, 20)
]
# Evaluator records, at eval steps only, each evaluator in its own record.
EVAL_RECORDS = [
    {
        "step": 10,
        "val_retrieval/v2t_recall@5": 0.25,
        "val_retrieval/v2t_recall@50": 0.75,
        "val_retrieval/v2t_median_rank": 14.0,
        "val_retrieval/v2t_normal/recall@5": 0.5,
        "val_retrieval/num_queries": 64.0,
    },
    {"step": 10, "val_captions/bleu4": 12.5, "val_captions/severity_macro_f1": 0.25},
    {  # a probe-like evaluator: per-label metrics and counts, and its run time
        "step": 10,
        "probe/custom_score": 3.5,
        "probe/num_examples": 40.0,
        "probe/label_a/num_examples": 40.0,
        "probe/seconds": 2.5,
    },
    {
        "step": 20,
        "val_retrieval/v2t_recall@5": 0.5,
        "val_retrieval/v2t_recall@50": 1.0,
        "val_retrieval/v2t_median_rank": 3.0,
        "val_retrieval/v2t_normal/recall@5": 0.75,
        "val_retrieval/num_queries": 64.0,
    },
    {"step": 20, "val_captions/bleu4": 30.0, "val_captions/severity_macro_f1": 0.5},
]
ALL_RECORDS = [TRAIN_RECORDS[0], TRAIN_RECORDS[1], *EVAL_RECORDS[:3], TRAIN_RECORDS[2]]
ALL_RECORDS += EVAL_RECORDS[3:]
CUT_LINE = '{"step": 30, "loss": 0.1, "loss/contr'  # a run killed while writing step 30

EXPECTED_PANELS = {  # title: (left-axis keys, right-axis keys)
    "loss": (["loss"], []),
    "loss/contrastive": (["loss/contrastive", "loss_weighted/contrastive"], []),
    "loss/caption": (["loss/caption", "loss_weighted/caption"], []),
    "learning rate": (["lr/video_encoder", "lr/caption_decoder"], []),
    "throughput": (["videos_per_s"], []),
    "step time": (["step_time_s", "data_wait_s"], []),
    "norms": (["l2_grads", "l2_params", "l2_updates"], []),
    "temperature and bias": (["temperature", "bias"], []),
    # Headline metrics only: no Recall@50, per-stratum recall or counts; ranks on the right.
    "val_retrieval": (["val_retrieval/v2t_recall@5"], ["val_retrieval/v2t_median_rank"]),
    "val_captions": (["val_captions/severity_macro_f1"], ["val_captions/bleu4"]),
    # No headline metric: everything but the counts and seconds (on the main axis, as
    # nothing is in [0, 1]).
    "probe": (["probe/custom_score"], []),
}


def expected_points(key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in the hand-written records, in step order."""
    points = sorted((r["step"], r[key]) for r in ALL_RECORDS if key in r)
    return [s for s, _ in points], [v for _, v in points]


def write_run(directory, lines: list[str]) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return str(directory)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
    lines = [json.dumps(r) for r in ALL_RECORDS]
    return write_run(tmp_path_factory.mktemp("run"), [*lines[:3], "", *lines[3:], CUT_LINE])


def test_read_metrics_skips_the_cut_line(run_dir, capsys):
    records = plot.read_metrics(f"{run_dir}/metrics.jsonl")
    assert records == ALL_RECORDS
    assert f"skipped incomplete line(s) [{len(ALL_RECORDS) + 2}]" in capsys.readouterr().err


def test_panels_hold_the_file_values(run_dir):
    panels = plot.curve_panels(plot.read_metrics(f"{run_dir}/metrics.jsonl"))
    assert [p.title for p in panels] == list(EXPECTED_PANELS)
    for panel in panels:
        left, right = EXPECTED_PANELS[panel.title]
        assert [s.key for s in panel.left] == left, panel.title
        assert [s.key for s in panel.right] == right, panel.title
        for series in panel.series:
            steps, values = expected_points(series.key)
            np.testing.assert_array_equal(series.steps, steps, err_msg=series.key)
            np.testing.assert_array_equal(series.values, values, err_msg=series.key)
    by_title = {p.title: p for p in panels}
    assert by_title["norms"].log_scale and not by_title["loss"].log_scale
    assert by_title["val_retrieval"].markers and not by_title["loss"].markers


def test_eval_metrics_pattern_selects_breakdowns():
    panels = plot.curve_panels(ALL_RECORDS, eval_metrics=r"normal/recall@5$")
    retrieval = next(p for p in panels if p.title == "val_retrieval")
    assert [s.key for s in retrieval.series] == ["val_retrieval/v2t_normal/recall@5"]
    np.testing.assert_array_equal(retrieval.series[0].values, [0.5, 0.75])
    with pytest.raises(ValueError, match="eval_metrics"):
        plot.curve_panels(ALL_RECORDS, eval_metrics="recall@(")


def test_mfu_goes_on_the_throughput_right_axis():
    records = [dict(r, mfu=0.1 * i) for i, r in enumerate(TRAIN_RECORDS)]
    throughput = next(p for p in plot.curve_panels(records) if p.title == "throughput")
    assert [s.key for s in throughput.right] == ["mfu"]
    np.testing.assert_allclose(throughput.right[0].values, [0.0, 0.1, 0.2])


def test_drawn_lines_and_png(run_dir, tmp_path):
    panels = plot.curve_panels(plot.read_metrics(f"{run_dir}/metrics.jsonl"))
    out = tmp_path / "nested" / "curves.png"
    figure = plot.draw(panels, str(out), "run")
    titles = [axis.get_title() for axis in figure.axes if axis.get_title()]
    assert titles == list(EXPECTED_PANELS)
    lines = {line.get_label(): line for axis in figure.axes for line in axis.get_lines()}
    drawn_keys = [k for left, right in EXPECTED_PANELS.values() for k in left + right]
    assert sorted(lines) == sorted(drawn_keys)
    for key in drawn_keys:
        steps, values = expected_points(key)
        np.testing.assert_array_equal(lines[key].get_xdata(), steps, err_msg=key)
        np.testing.assert_array_equal(lines[key].get_ydata(), values, err_msg=key)
    with Image.open(out) as image:
        image.load()
        columns = plot.PANELS_PER_ROW
        rows = math.ceil(len(EXPECTED_PANELS) / columns)
        assert image.size == (500 * columns, 340 * rows)
        assert len(np.unique(np.asarray(image.convert("L")))) > 10  # not a blank canvas


def test_command_line_writes_the_default_png(run_dir, capsys):
    plot.main([run_dir])
    out = f"{run_dir}/plots/training_curves.png"
    assert capsys.readouterr().out.strip() == out
    with Image.open(out) as image:
        image.verify()


@pytest.mark.parametrize(
    "lines, message",
    [
        (None, "no such file"),
        ([], "no complete metrics record"),
        ([CUT_LINE], "no complete metrics record"),
        (['{"loss": 1.0}'], "line 1: the record has no 'step'"),
        (['{"step": 1, "loss": 1.0}', '{"step": 2, "loss": "high"}'], "line 2: 'loss' is 'high'"),
        (["[1, 2]"], "line 1: expected a JSON object"),
    ],
)
def test_bad_metrics_files_are_clear_errors(tmp_path, capsys, lines, message):
    run = str(tmp_path) if lines is None else write_run(tmp_path / "run", lines)
    with pytest.raises(SystemExit, match=message) as raised:
        plot.main([run])
    assert "metrics.jsonl" in str(raised.value)


def test_ceilings_and_baselines_are_horizontal_lines_at_their_value(tmp_path):
    records = [
        {"step": step, "r/v2t_recall@1": value, "r/v2t_chance_recall@1": 0.02,
         "r/oracle_anatomy_recall@1": 0.3, "r/oracle_findings_recall@1": 1.0,
         "r/v2t_median_rank": 40.0 / step}
        for step, value in ((1, 0.05), (10, 0.4))
    ]
    panel = next(p for p in plot.curve_panels(records) if p.title == "r")
    assert [s.key for s in panel.left] == ["r/v2t_recall@1"]
    assert [s.key for s in panel.right] == ["r/v2t_median_rank"]
    assert [s.key for s in panel.references] == [
        "r/v2t_chance_recall@1", "r/oracle_anatomy_recall@1", "r/oracle_findings_recall@1"]
    figure = plot.draw([panel], str(tmp_path / "r.png"), "run")
    lines = {line.get_label(): line for axis in figure.axes for line in axis.get_lines()}
    for key, value in (("r/v2t_chance_recall@1", 0.02), ("r/oracle_anatomy_recall@1", 0.3),
                       ("r/oracle_findings_recall@1", 1.0)):
        line = lines[f"{key} = {value:.3g}"]
        assert line.get_linestyle() == ":"
        np.testing.assert_array_equal(line.get_ydata(), [value, value])
    assert not any(plot._is_reference(m) for m in ("v2t_recall@1", "v2t_normal/recall@5",
                                                   "label/auroc", "label/base_rate"))
    assert plot._is_reference("label/baseline_mae")
