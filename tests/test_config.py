"""Tests of configs/multitask.py: argument parsing, overrides, durations, and that the
trainer reads every field of the config (nothing in it is dead).

The read audit runs the real trainer (in a subprocess of one CPU device) on a
config wrapped in `ReadRecorder`, which records the path of every field the
trainer reads, and checks that every field of the config was read.
"""

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import testenv
from absl import flags
from evaltools import SYNTHETIC
from ml_collections import config_flags

from configs import multitask as multitask_config
from deepcoro_jax.training import run, sharding, train

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILE = str(REPO / "configs" / "multitask.py")


# ------------------------------------------------------------------------ parse_arg


def test_parse_arg_types_values_by_their_defaults():
    parsed = multitask_config.parse_arg(
        "size=base,runlocal,steps=12,rate=0.5,flag=no",
        size="small",
        runlocal=False,
        steps=1,
        rate=1.0,
        flag=True,
        data="",
    )
    assert parsed.size == "base" and parsed.data == ""
    assert parsed.runlocal is True and parsed.flag is False
    assert parsed.steps == 12 and isinstance(parsed.steps, int)
    assert parsed.rate == 0.5 and isinstance(parsed.rate, float)
    assert multitask_config.parse_arg("runlocal=TRUE", runlocal=False).runlocal is True
    assert multitask_config.parse_arg(None, size="small").size == "small"
    assert multitask_config.parse_arg("", size="small").size == "small"


@pytest.mark.parametrize(
    "arg,message",
    [
        ("sizes=base", "unknown config argument 'sizes'"),
        ("size", "config argument 'size' needs a value"),
        ("steps=ten", "config argument steps='ten': not a int"),
        ("runlocal=maybe", "config argument runlocal='maybe': give one of"),
    ],
)
def test_parse_arg_errors_name_the_argument(arg, message):
    with pytest.raises(ValueError, match=message):
        multitask_config.parse_arg(arg, size="small", steps=1, runlocal=False)


def test_get_config_arguments():
    assert multitask_config.get_config("runlocal").model.size == "mu"
    assert multitask_config.get_config("size=base").model.size == "base"
    assert multitask_config.get_config(None).model.size == "small"
    with pytest.raises(ValueError, match="size='huge'"):
        multitask_config.get_config("size=huge")
    data = multitask_config.get_config("data=/data/prepared").input.data_dir
    assert data == "/data/prepared"


# ------------------------------------------------------------------------ overrides


def _parse(*overrides: str, arg: str = "runlocal") -> ml_collections.ConfigDict:
    """The config as launch.py's --config flag gives it, with `overrides`."""
    argv = ["launch.py", f"--config={CONFIG_FILE}:{arg}", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def _leaves(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every field; an empty ConfigDict (evals) is a field too."""
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict) and len(value):
            yield from _leaves(value, f"{path}.")
        else:
            yield path, value


def _command_line_value(config: ml_collections.ConfigDict, path: str, value: Any) -> tuple:
    """(the text of an override of `path`, the value it should give)."""
    parent, _, key = path.rpartition(".")
    field_type = (config[parent] if parent else config).get_type(key)
    if value is None:  # a placeholder: give a value of its type
        value = {int: 7, float: 0.5, str: "x"}[field_type]
    if isinstance(value, bool):
        return str(value).lower(), value
    if isinstance(value, tuple):
        return repr(value), value
    return str(value), value


@pytest.mark.parametrize("arg", ["runlocal", "size=base"])
def test_every_field_is_overridable(arg):
    config = multitask_config.get_config(arg)
    fields = [(p, v) for p, v in _leaves(config) if not isinstance(v, ml_collections.ConfigDict)]
    assert len(fields) > 60
    for path, value in fields:
        text, expected = _command_line_value(config, path, value)
        parsed = _parse(f"--config.{path}={text}", arg=arg)
        actual = parsed
        for key in path.split("."):
            actual = actual[key]
        assert actual == expected, path


def test_bad_overrides_are_errors():
    with pytest.raises(AttributeError, match="no_such_field"):
        _parse("--config.input.no_such_field=3")
    with pytest.raises(flags.IllegalFlagValueError, match="--config.input.batch_size=1.5"):
        _parse("--config.input.batch_size=1.5")
    with pytest.raises(flags.IllegalFlagValueError, match="--config.model.normalize_mvm_target"):
        _parse("--config.model.normalize_mvm_target=maybe")


def test_common_names_and_the_default_mesh():
    config = multitask_config.get_config()
    for name in ("total_steps", "log_training_steps", "ckpt_steps", "keep_ckpts", "seed"):
        assert name in config
    assert "batch_size" in config.input and isinstance(config.evals, ml_collections.ConfigDict)
    mesh = sharding.make_mesh(config.mesh)
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1}


# ------------------------------------------------------------------------ durations


def _section(**fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(fields)


def test_durations_in_any_unit():
    def steps(**fields):
        return run.resolve_steps(
            "total", _section(**fields), steps_per_epoch=2.5, global_batch=8, total_steps=200
        )

    assert steps(total_steps=30) == 30
    assert steps(total_epochs=3.0) == 8  # ceil(3 x 2.5)
    assert steps(total_examples=81) == 11  # ceil(81 / 8)
    assert steps(total_percent=10.0) == 20
    assert steps(total_steps=None, total_epochs=None) is None
    # A more explicit unit wins (a command-line override over the recipe's unit).
    assert steps(total_steps=3, total_examples=800, total_epochs=3.0) == 3
    assert steps(total_examples=81, total_epochs=30.0) == 11
    assert steps(total_epochs=3.0, total_percent=50.0) == 8
    with pytest.raises(ValueError, match="total_epochs is not defined"):
        run.resolve_steps(
            "total", _section(total_epochs=1.0), steps_per_epoch=None, global_batch=8
        )


@pytest.mark.parametrize("arg,total,warmup", [("runlocal", 900, 20), ("size=base", 1500, 75)])
def test_recipe_durations_resolve(arg, total, warmup):
    """The recipe sets exactly one unit of each duration (30 epochs, 5% warmup for the full one)."""
    config = multitask_config.get_config(arg)
    units = dict(steps_per_epoch=50.0, global_batch=config.input.batch_size)
    assert run.resolve_steps("total", config, **units) == total
    resolved = run.resolve_steps("warmup", config.optim.schedule, **units, total_steps=total)
    assert resolved == warmup


# ------------------------------------------------------------------------ read audit


class ReadRecorder(Mapping):
    """A view of a ConfigDict that records the dotted path of every field read.

    Nested ConfigDicts come back as recorders of their own; truth-testing one
    (``if config.evals:``) reads it as a whole. `to_json_best_effort` (writing
    config.json) reads nothing.
    """

    def __init__(self, config: ml_collections.ConfigDict, reads: set, path: str = ""):
        self._config, self._reads, self._path = config, reads, path

    def __getitem__(self, key: str) -> Any:
        value = self._config[key]  # KeyError for a field the config lacks
        path = f"{self._path}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            return ReadRecorder(value, self._reads, f"{path}.")
        self._reads.add(path)
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        """The trainer writes back the paths it resolved (deepcoro_jax/paths.py)."""
        self._config[key] = value

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        try:
            return self[key]
        except KeyError as e:
            raise AttributeError(key) from e

    def __iter__(self) -> Iterator[str]:
        return iter(self._config.keys())

    def __len__(self) -> int:
        return len(self._config)

    def __bool__(self) -> bool:
        self._reads.add(self._path.rstrip("."))
        return bool(len(self._config))

    def to_json_best_effort(self, **kwargs) -> str:
        return self._config.to_json_best_effort(**kwargs)


def micro_config(cache_dir: str) -> ml_collections.ConfigDict:
    """The runlocal recipe shrunk to seconds per run (as in test_train.py)."""
    config = multitask_config.get_config("runlocal")
    config.log_training_steps = 1
    config.input.synthetic.update(SYNTHETIC, cache_dir=cache_dir)
    # caption_max_len: room for a referring expression of this tiny set's tokenizer.
    config.input.update(batch_size=8, text_max_len=32, caption_max_len=48)
    config.model.location_bins = 16
    config.input.video_pp = (
        "decode_sample_frames(4, stride=2, train=True)|random_resized_crop(32)|value_range(-1, 1)"
    )
    config.input.eval_video_pp = "decode_sample_frames(4, stride=2)|resize(32)|value_range(-1, 1)"
    config.model.update(num_frames=4, image_size=32, patch_size=(2, 8, 8), mask_ratio=0.75)
    config.model.encoder_overrides.stem = "linear"  # faster to compile than the conv stem
    config.model.encoder_overrides.depth = 1
    config.model.caption_decoder_overrides.num_layers = 1
    config.optim.schedule.warmup_steps = 1
    return config


def audited_runs(cache_dir: str, workdir: str) -> None:
    """Two short trainings on recorded configs; prints the union of the paths read.

    The first trains with the EMA teacher on; the second starts from the
    first's encoder (config.init) with another seed: between them they take
    every branch that reads a field. Runs in a subprocess (see the test).
    """
    reads: set[str] = set()
    first = micro_config(cache_dir)
    first.update(total_steps=2, ckpt_steps=2)
    first.loss.weights.distill = 0.5
    train.main(ReadRecorder(first, reads), os.path.join(workdir, "first"))
    second = micro_config(cache_dir)
    # The first run's train step (the same length and schedule), saved after one step.
    second.update(total_steps=2, ckpt_steps=1, seed=1)
    second.loss.weights.distill = 0.5
    second.init.update(workdir=os.path.join(workdir, "first"), include="encoder/.*", step=2)
    train.main(ReadRecorder(second, reads), os.path.join(workdir, "second"))
    print("READS " + json.dumps(sorted(reads)))


def test_read_recorder_records_what_is_read():
    reads = set()
    config = ml_collections.ConfigDict(
        dict(a=1, b=dict(c=2, d=dict(e=3)), f=ml_collections.ConfigDict(), g=dict(h=4, i=5))
    )
    recorded = ReadRecorder(config, reads)
    assert recorded.a == 1 and recorded.b.d["e"] == 3 and dict(recorded.g) == {"h": 4, "i": 5}
    assert recorded.get("missing") is None and not recorded.f
    assert sorted(reads) == ["a", "b.d.e", "f", "g.h", "g.i"]


@pytest.mark.slow
def test_the_trainer_reads_every_config_field(tmp_path_factory, synthetic_cache):
    workdir = tmp_path_factory.mktemp("audit")
    code = (
        "import sys; sys.path.insert(0, 'tests'); import test_config; "
        f"test_config.audited_runs({str(synthetic_cache)!r}, {str(workdir)!r})"
    )
    env = testenv.subprocess_env(1)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-5000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("READS "))
    reads = set(json.loads(line[len("READS ") :]))

    def was_read(path: str) -> bool:
        parts = path.split(".")
        return any(".".join(parts[:n]) in reads for n in range(1, len(parts) + 1))

    fields = [path for path, _ in _leaves(micro_config("unused"))]
    unread = [path for path in fields if not was_read(path)]
    assert not unread, f"config fields that nothing reads: {unread}"
    assert len(fields) > 60

    # The EMA teacher: a copy of the model at step 1 (same rngs: no KL up to rounding),
    # then behind it.
    lines = (workdir / "first" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    distill = {r["step"]: r["loss/distill"] for r in records if "loss/distill" in r}
    assert abs(distill[1]) < 1e-6 and distill[2] > 1e-4, distill

    # config.init worked: the second run (another seed) started from the first run's
    # encoder, with its own fresh text tower. One Adam update at lr 1e-3 moves a
    # weight by about 1e-3 at most; two random initialisations differ far more.
    source = _saved_params(workdir / "first", 2)
    started = _saved_params(workdir / "second", 1)
    for name, copied in (("encoder", True), ("text", False), ("caption_decoder", False)):
        pairs = zip(jax.tree.leaves(started[name]), jax.tree.leaves(source[name]), strict=True)
        distance = max(float(np.max(np.abs(a - b))) for a, b in pairs)
        assert (distance <= 1.5e-3) == copied, (name, distance)


def _saved_params(workdir: Path, step: int) -> dict:
    path = workdir / "checkpoints" / str(step) / "state"
    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.metadata(path).item_metadata.tree
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        state = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    return state["params"]


def test_the_contact_sheet_names_a_bad_override_in_one_line(tmp_path):
    """`make demo`'s first command parses its flags as launch.py does."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "input_pipeline.contact_sheet",
            "--config=configs/multitask.py:runlocal",
            f"--out={tmp_path / 'sheet.png'}",
            "--config.model.encoder_overrides.depth=1",
        ],
        cwd=REPO,
        env=testenv.subprocess_env(1),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "FATAL Flags parsing error: the config has no field 'depth' (overrides given: "
        "['--config.model.encoder_overrides.depth'])"
    ], result.stderr[-2000:]
    assert not list(tmp_path.iterdir())
