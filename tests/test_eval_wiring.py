"""Evaluators run by the trainer: on schedule, at step 0, logged, and with --mode eval;
those the data cannot serve are left out with a warning.

One in-process training of the micro config (2 steps on 8 fake devices) with a
retrieval evaluator at step 0 and at the end; then mode='eval' on its checkpoint
must reproduce the end-of-training results, since it evaluates the same parameters.
"""

import json
import logging

import pytest
from evaltools import make_context, micro_config, without_labels

from deepcoro_jax.training import train
from evaluators import common


def _config(data_dir: str):
    config = micro_config()
    config.input.data_dir = data_dir
    config.update(total_steps=2, ckpt_steps=2, log_training_steps=1)
    config.optim.schedule.warmup_steps = 1
    config.loss.weights.mvm = 0.0  # a smaller train step to compile; MVM plays no part here
    config.evals = {
        "train_retrieval": dict(
            type="retrieval", log_steps=2, at_start=True, split="train", batch_size=16
        )
    }
    return config


@pytest.fixture(scope="module")
def trained(synthetic_data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    returned = train.main(_config(synthetic_data), str(workdir))
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return workdir, returned, {r["step"]: r for r in records}


def test_evaluators_run_at_step_0_and_on_schedule(trained):
    _, returned, records = trained
    assert sorted(records) == [0, 1, 2]
    assert "loss" not in records[0] and "train_retrieval/v2t_recall@5" in records[0]
    assert "train_retrieval/v2t_recall@5" not in records[1]
    assert "loss" in records[2] and "train_retrieval/v2t_recall@5" in records[2]
    assert returned["train_retrieval/v2t_mrr"] == records[2]["train_retrieval/v2t_mrr"]
    # Training moved the embeddings: the evaluations at steps 0 and 2 differ.
    assert records[0]["train_retrieval/alignment"] != records[2]["train_retrieval/alignment"]


def test_mode_eval_reproduces_the_last_evaluation(trained, synthetic_data):
    workdir, _, records = trained
    results = train.main(_config(synthetic_data), str(workdir), mode="eval")
    for name, value in results.items():
        if not name.endswith("/seconds"):
            assert value == pytest.approx(records[2][name], rel=1e-5, abs=1e-6), name


def test_mode_eval_needs_a_checkpoint_and_evaluators(synthetic_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train.main(_config(synthetic_data), str(tmp_path / "empty"), mode="eval")
    config = _config(synthetic_data)
    config.evals = {}
    with pytest.raises(ValueError, match="config.evals, which is empty"):
        train.main(config, str(tmp_path / "none"), mode="eval")


def test_a_bad_evaluator_is_named(synthetic_data, tmp_path):
    config = _config(synthetic_data)
    config.evals.train_retrieval.type = "retreival"
    with pytest.raises(ValueError, match=r"config.evals.train_retrieval.type='retreival'"):
        train.main(config, str(tmp_path / "typo"))
    config = _config(synthetic_data)
    config.evals.train_retrieval.topk = 3
    with pytest.raises(ValueError, match=r"config.evals.train_retrieval: .*topk"):
        train.main(config, str(tmp_path / "unknown_option"))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_evaluators_the_data_cannot_serve_are_left_out(synthetic_data, tmp_path, caplog):
    data_dir = without_labels(synthetic_data, tmp_path / "no_labels")
    config = micro_config()  # the recipe's evaluators; val_probe needs a numeric label column
    ctx = make_context(config, data_dir, str(tmp_path / "work"), 8)
    with caplog.at_level(logging.WARNING):
        built = common.build_evaluators(config.evals, ctx)
    assert sorted(s.name for s in built) == ["val_captioning", "val_mvm", "val_retrieval"]
    assert _warnings(caplog) == [
        f"config.evals.val_probe left out: {data_dir} carries no numeric label column "
        "(prepare --label_columns)"
    ]

    caplog.clear()
    missing_split = {"r": dict(type="retrieval", log_steps=1, split="holdout", batch_size=8)}
    with caplog.at_level(logging.WARNING):
        assert common.build_evaluators(missing_split, ctx) == []
    assert _warnings(caplog) == [
        f"config.evals.r left out: {data_dir} has no split 'holdout' (it has "
        "['test', 'train', 'val'])"
    ]
    # An error in the options still stops the run, whatever the data lacks.
    missing_split["r"]["batch_size"] = 3
    with pytest.raises(ValueError, match="config.evals.r.batch_size=3"):
        common.build_evaluators(missing_split, ctx)
