"""Evaluators run by the trainer: on schedule, at step 0, logged, and with --mode eval;
those the data cannot serve are left out with a warning; a new evaluator type is one
file with its registration; evaluators get predict functions, never the model.

The test run's shared micro run (conftest.py: 2 steps on 8 fake devices, with a
retrieval evaluator at step 0 and at the end); mode='eval' on its checkpoint must
reproduce the end-of-training results, since it evaluates the same parameters.
"""

import dataclasses
import json
import logging
import pathlib
import shutil
import sys

import flax.linen as nn
import ml_collections
import pytest
from evaltools import init_params, make_context, micro_config, micro_run_config, without_labels

import evaluators
from deepcoro_jax.training import train
from evaluators import common


@pytest.fixture(scope="module")
def trained(micro_run):
    workdir, returned = micro_run
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


def test_mode_eval_reproduces_the_last_evaluation(trained, synthetic_data, tmp_path):
    shared, _, records = trained
    workdir = tmp_path / "run"
    shutil.copytree(shared, workdir)  # eval mode logs into the run's workdir
    results = train.main(micro_run_config(synthetic_data), str(workdir), mode="eval")
    for name, value in results.items():
        if not name.endswith("/seconds"):
            assert value == pytest.approx(records[2][name], rel=1e-5, abs=1e-6), name


def test_mode_eval_needs_a_checkpoint_and_evaluators(synthetic_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train.main(micro_run_config(synthetic_data), str(tmp_path / "empty"), mode="eval")
    config = micro_run_config(synthetic_data)
    config.evals = {}
    with pytest.raises(ValueError, match="config.evals, which is empty"):
        train.main(config, str(tmp_path / "none"), mode="eval")


def test_a_bad_evaluator_is_named(synthetic_data, tmp_path):
    config = micro_run_config(synthetic_data)
    config.evals.train_retrieval.type = "retreival"
    with pytest.raises(ValueError, match=r"config.evals.train_retrieval.type='retreival'"):
        train.main(config, str(tmp_path / "typo"))
    config = micro_run_config(synthetic_data)
    config.evals.train_retrieval.topk = 3
    with pytest.raises(ValueError, match=r"config.evals.train_retrieval: .*topk"):
        train.main(config, str(tmp_path / "unknown_option"))
    # Both stop before compiling, let alone writing.
    assert not list(tmp_path.iterdir())


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_evaluators_the_data_cannot_serve_are_left_out(synthetic_data, tmp_path, caplog):
    data_dir = without_labels(synthetic_data, tmp_path / "no_labels")
    config = micro_config()  # the recipe's evaluators; val_probe needs a numeric label column
    ctx = make_context(config, data_dir, str(tmp_path / "work"), 8)
    with caplog.at_level(logging.WARNING):
        built = common.build_evaluators(config.evals, ctx.predict_fns, ctx.spec)
    assert sorted(s.name for s in built) == [
        "val_captioning", "val_grounding", "val_mvm", "val_retrieval"
    ]
    assert _warnings(caplog) == [
        f"config.evals.val_probe left out: {data_dir} carries none of the label columns "
        f"{list(config.evals.val_probe.labels)} (numeric label columns: [])"
    ]

    caplog.clear()
    missing_split = {"r": dict(type="retrieval", log_steps=1, split="holdout", batch_size=8)}
    with caplog.at_level(logging.WARNING):
        assert common.build_evaluators(missing_split, ctx.predict_fns, ctx.spec) == []
    assert _warnings(caplog) == [
        f"config.evals.r left out: {data_dir} has no split 'holdout' (it has "
        "['test', 'train', 'val'])"
    ]
    # An error in the options still stops the run, whatever the data lacks.
    missing_split["r"]["batch_size"] = 3
    with pytest.raises(ValueError, match="config.evals.r.batch_size=3"):
        common.build_evaluators(missing_split, ctx.predict_fns, ctx.spec)


def test_evaluators_get_predict_functions_and_a_spec_not_the_model(synthetic_data, tmp_path):
    config = micro_config()  # the recipe's evaluators
    ctx = make_context(config, synthetic_data, str(tmp_path / "work"), 8)
    built = common.build_evaluators(config.evals, ctx.predict_fns, ctx.spec)
    assert sorted(e.name for e in built) == [
        "val_captioning", "val_grounding", "val_mvm", "val_probe", "val_retrieval"
    ]
    spec_fields = [field.name for field in dataclasses.fields(common.EvalSpec)]
    assert not hasattr(ctx.spec, "model") and not hasattr(ctx.spec, "config")
    for evaluator in built:
        # Only the predict functions it names, and nothing that holds the model or config.
        assert set(evaluator.predict_fns) == set(type(evaluator).PREDICT) <= set(ctx.predict_fns)
        reachable = [*vars(evaluator).values(), *(getattr(ctx.spec, f) for f in spec_fields)]
        assert not any(isinstance(v, nn.Module | ml_collections.ConfigDict) for v in reachable)

    without_text = {k: v for k, v in ctx.predict_fns.items() if k != "encode_text"}
    needs = r"config.evals.val_retrieval: needs the predict functions \['encode_text'\]"
    with pytest.raises(ValueError, match=needs):
        common.build_evaluators(
            {"val_retrieval": config.evals.val_retrieval}, without_text, ctx.spec
        )


DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "metrics.md"
PLUGIN_MODULE = "embedding_norm"


def documented_plugin() -> str:
    """The example evaluator of docs/metrics.md ("Adding an evaluator")."""
    section = DOCS.read_text().split("### Adding an evaluator", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.fixture
def plugin_file(tmp_path, monkeypatch):
    """The documented example as a new file of the evaluators package (a folder added to
    its path), for one test: the registry and the imported modules are restored after it."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / f"{PLUGIN_MODULE}.py").write_text(documented_plugin())
    monkeypatch.setattr(evaluators, "__path__", [*evaluators.__path__, str(folder)])
    monkeypatch.setattr(common, "_REGISTRY", dict(common._REGISTRY))
    yield
    sys.modules.pop(f"evaluators.{PLUGIN_MODULE}", None)


def test_a_new_evaluator_type_is_one_file_and_its_registration(
    plugin_file, synthetic_data, tmp_path
):
    ctx = make_context(micro_config(), synthetic_data, str(tmp_path / "work"), 8)
    evals = {
        "norms": dict(type="embedding_norm", log_steps=3, split="train", batch_size=8, scale=2.0)
    }
    (evaluator,) = common.build_evaluators(evals, ctx.predict_fns, ctx.spec)
    assert type(evaluator).__module__ == f"evaluators.{PLUGIN_MODULE}"
    assert (evaluator.name, evaluator.split, evaluator.log_steps) == ("norms", "train", 3)
    assert evaluator.due(6, 100) and not evaluator.due(7, 100) and evaluator.due(7, 7)
    results = train.run_evaluators([evaluator], init_params(ctx), 0)
    assert sorted(results) == ["norms/mean_norm", "norms/num_videos", "norms/seconds"]
    assert results["norms/num_videos"] == len(common.split_table(synthetic_data, "train")["row"])
    assert results["norms/mean_norm"] == pytest.approx(2.0, rel=1e-5)  # normalised embeddings

    unknown = {"x": dict(type="embedding_norms", log_steps=1)}
    registered = ["captioning", "embedding_norm", "grounding", "linear_probe", "mvm", "retrieval"]
    with pytest.raises(ValueError) as error:
        common.build_evaluators(unknown, ctx.predict_fns, ctx.spec)
    assert str(error.value) == f"config.evals.x.type='embedding_norms': choose one of {registered}"
    for options, message in ((dict(scales=2.0), r"config.evals.norms: .*'scales'"),
                             (dict(scale=0.0), r"config.evals.norms.scale=0.0 must be positive")):
        with pytest.raises(ValueError, match=message):
            common.build_evaluators(
                {"norms": dict(evals["norms"], **options)}, ctx.predict_fns, ctx.spec
            )


def test_a_type_is_registered_once():
    assert "retrieval" in common.registered()
    with pytest.raises(ValueError, match="already registered by evaluators.retrieval.Evaluator"):
        common.register("retrieval")(type("Evaluator", (common.Evaluator,), {}))
    with pytest.raises(TypeError, match="is not a common.Evaluator"):
        common.register("not_an_evaluator")(object)


def test_study_level_training_and_retrieval_end_to_end(synthetic_data, tmp_path):
    """train.main on whole studies (input.study_videos: the encoder pools the tokens of a
    study's videos together), evaluated by study-level retrieval, which embeds each
    study the same way."""
    config = micro_run_config(synthetic_data)
    config.input.study_videos = 2
    config.evals = {
        "study_retrieval": dict(type="retrieval", log_steps=2, split="train", batch_size=8,
                                level="study")
    }
    returned = train.main(config, str(tmp_path / "studies"))
    table = common.split_table(synthetic_data, "train")
    assert returned["study_retrieval/v2t_num_queries"] == len(set(table["study_id"].tolist()))
    assert all(value == value for value in returned.values())  # no NaN
    records = [json.loads(x) for x in (tmp_path / "studies/metrics.jsonl").read_text().split("\n")
               if x]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    # The run trained on [B, 2, T, H, W, C] studies, and says so in its config.
    saved = json.loads((tmp_path / "studies/config.json").read_text())
    assert saved["input"]["study_videos"] == 2
