"""End-to-end tests of the trainer (deepcoro_jax/training/train.py) and its entry point (launch.py).

Every trainer run uses a micro config (the runlocal recipe shrunk to 4 frames of
32x32, tubelets 2x8x8, one-layer encoder and caption decoder, batch 8, a constant
learning rate) on 8 synthetic studies generated once per session. The runs are
subprocesses of ``launch.py`` (their own device counts, kills and signals), started
side by side where they do not depend on each other so that both CPUs work; they
share one persistent compilation cache, so only the first run of each device
layout compiles. Single-device runs are bitwise deterministic on CPU (same
executable, same inputs), which the resume tests rely on. Gradient accumulation
is tested in-process on the train step itself (test_accumulation.py).
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import testenv
from evaltools import SYNTHETIC

REPO = Path(__file__).resolve().parents[1]
TOTAL = 40  # steps of the reference run; the resume test stops halfway
FSDP_MESH = "(('data', 2), ('fsdp', 2))"
# Attention key biases (only the BERT-compatible text tower has them): softmax over the
# keys is invariant to q.b, the same for every key, so their exact gradient is 0 and
# the computed one is rounding noise that Adam scales to ~lr per step; any change of
# rounding moves them by up to ~1e-4.
KEY_BIAS = re.compile(r"\['key'\]\['bias'\]$")
LOSS_KEYS = ("loss", "loss/contrastive", "loss/caption", "loss/mvm")
VIDEO_PP = (
    "decode_sample_frames(4, stride=2, train=True)|random_resized_crop(32, scale=(0.7, 1.0))"
    "|value_range(-1, 1)"
)
MICRO_CONFIG = f'''"""The runlocal recipe shrunk for tests (4 x 32 x 32 clips, one-layer towers)."""

from configs import multitask


def get_config(arg=None):
    config = multitask.get_config("runlocal")
    config.total_steps = {TOTAL}
    config.log_training_steps = 1
    config.input.synthetic.update({SYNTHETIC})
    config.input.batch_size = 8
    config.input.text_max_len = 32
    config.input.caption_max_len = 32
    config.input.video_pp = "{VIDEO_PP}"
    config.input.eval_video_pp = "decode_sample_frames(4, stride=2)|resize(32)|value_range(-1, 1)"
    # Retrieval over the train split at the last step: the multi-device and two-process
    # runs check that it sees every example once (more in test_eval_wiring.py).
    config.evals = {{
        "train_retrieval": dict(type="retrieval", log_steps=1000, split="train", batch_size=8)
    }}
    config.model.update(num_frames=4, image_size=32, patch_size=(2, 8, 8), mask_ratio=0.75)
    config.model.encoder_overrides.stem = "linear"  # faster to compile than the conv stem
    config.model.encoder_overrides.depth = 1
    config.model.caption_decoder_overrides.num_layers = 1
    config.optim.schedule.update(decay_type="constant", warmup_steps=2)
    return config
'''


# ------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def setup(tmp_path_factory, synthetic_cache):
    """The micro config file, the test run's synthetic cache and compilation cache."""
    config_file = tmp_path_factory.mktemp("config") / "micro_config.py"
    config_file.write_text(MICRO_CONFIG)
    return {
        "config": config_file,
        "cache": synthetic_cache,
        "xla": testenv.cache_dir(),
        "root": tmp_path_factory.mktemp("runs"),
    }


def _command(setup, workdir: Path, overrides: dict, flags: tuple = ()) -> list[str]:
    """launch.py's command line for the micro config; `overrides` are --config.<key>=<value>."""
    return [
        str(REPO / "launch.py"),
        f"--config={setup['config']}",
        f"--workdir={workdir}",
        f"--compilation_cache_dir={setup['xla']}",
        f"--config.input.synthetic.cache_dir={setup['cache']}",
        *(f"--config.{k}={v}" for k, v in overrides.items()),
        *flags,
    ]


def _env(devices: int) -> dict:
    return testenv.subprocess_env(devices)


def _start(
    setup,
    workdir: Path,
    overrides: dict,
    *,
    devices: int = 1,
    flags: tuple = (),
    python_code: str | None = None,
) -> subprocess.Popen:
    """Starts launch.py (or `python_code`, given launch.py's command line as sys.argv[1:]).

    Its stdout and stderr go to <workdir>.<n>.out/.err, n counting the starts.
    """
    n = len(list(workdir.parent.glob(f"{workdir.name}.*.out")))
    out = open(f"{workdir}.{n}.out", "w")  # noqa: SIM115  (closed by _finish)
    err = open(f"{workdir}.{n}.err", "w")  # noqa: SIM115
    interpreter = [sys.executable, "-c", python_code] if python_code else [sys.executable]
    proc = subprocess.Popen(
        interpreter + _command(setup, workdir, overrides, flags),
        cwd=REPO,
        env=_env(devices),
        stdout=out,
        stderr=err,
    )
    proc.files = (out, err)
    return proc


def _finish(proc: subprocess.Popen, timeout: float = 900) -> tuple[int, str, str]:
    """Waits for a started run (killing it after `timeout`): (exit code, stdout, stderr)."""
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in proc.files:
            f.close()
    out, err = (Path(f.name).read_text() for f in proc.files)
    return proc.returncode, out, err


def _succeeded(proc: subprocess.Popen) -> str:
    """The stdout of a started run, once it has exited 0 (else the test fails)."""
    rc, out, err = _finish(proc)
    assert rc == 0, f"launch.py exited {rc}:\n{err[-5000:]}"
    return out


def _metrics(workdir: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"a step is logged twice: {steps}"
    return {r["step"]: r for r in records}


def _checkpoints(workdir: Path) -> list[int]:
    folder = workdir / "checkpoints"
    if not folder.exists():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def _saved_state(workdir: Path, step: int) -> dict:
    path = workdir / "checkpoints" / str(step) / "state"
    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.metadata(path).item_metadata.tree
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def _step_lines(stdout: str) -> list[str]:
    """The progress lines of a run's stdout (after its compile lines)."""
    return [line for line in stdout.splitlines() if line.startswith("step ")]


def _printed_steps(proc: subprocess.Popen) -> list[int]:
    """The steps a running launch.py has printed its progress line for."""
    text = Path(proc.files[0].name).read_text()
    return [int(s) for s in re.findall(r"^step (\d+)/", text, re.M)]


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before the event"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.02)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


POISON = """
import runpy, sys
import numpy as np
from input_pipeline import pipeline

original_next = pipeline.TrainIterator.__next__
served = []

def poisoned_next(self):
    batch = original_next(self)
    served.append(1)
    if len(served) == 3:
        batch["video"] = np.full_like(batch["video"], np.nan)
    return batch

pipeline.TrainIterator.__next__ = poisoned_next
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


# ------------------------------------------------------------------------------ runs


@pytest.fixture(scope="module")
def runs(setup):
    """The runs that need no other, started together so that they share the CPUs: the
    single-device reference (TOTAL steps), data parallel and FSDP on 4 devices, and two
    processes of 2 devices each."""
    root = setup["root"]
    multi_process = ("--num_processes=2", f"--coordinator_address=127.0.0.1:{_free_port()}")
    started = {
        "reference": _start(setup, root / "reference", {"ckpt_steps": TOTAL // 2}),
        "data_parallel": _start(setup, root / "data_parallel", {"total_steps": 3}, devices=4),
        "fsdp": _start(setup, root / "fsdp", {"total_steps": 3, "mesh": FSDP_MESH}, devices=4),
        **{
            f"process_{i}": _start(
                setup,
                root / "two_processes",
                {"total_steps": 3},
                devices=2,
                flags=(*multi_process, f"--process_id={i}"),
            )
            for i in range(2)
        },
    }
    yield started
    for proc in started.values():
        if proc.poll() is None:
            proc.kill()
        _finish(proc)


@pytest.fixture(scope="module")
def reference(setup, runs):
    """The reference run's workdir and stdout, once it has finished."""
    return setup["root"] / "reference", _succeeded(runs["reference"])


# SIGTERM raised inside the loop's wait for the device (the fetch of a step's metrics),
# where a real signal nearly always lands: deterministic, unlike a signal sent by timing.
SIGTERM_IN_FETCH = """
import runpy, signal, sys
from deepcoro_jax.training import train

original_fetch = train.fetch_metrics

def fetch_then_signal(step, metrics):
    values = original_fetch(step, metrics)
    if step == 3:
        signal.raise_signal(signal.SIGTERM)
    return values

train.fetch_metrics = fetch_then_signal
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def cached_runs(setup, reference):
    """Single-device runs started once the compiled step is cached, side by side: runs
    that get SIGTERM while fetching step 3's metrics (logged every step, so fetched at
    step 3; or rarely, so fetched late, at step 4), and a run fed a NaN video at step 3."""
    root = setup["root"]
    started = {
        "sigterm": _start(
            setup, root / "sigterm", {"total_steps": 1000}, python_code=SIGTERM_IN_FETCH
        ),
        "sigterm_pending": _start(
            setup,
            root / "sigterm_pending",
            {"total_steps": 1000, "log_training_steps": 1000},
            python_code=SIGTERM_IN_FETCH,
        ),
        "nan": _start(
            setup,
            root / "nan",
            {"total_steps": 6, "ckpt_steps": 2, "log_training_steps": 4},
            python_code=POISON,
        ),
    }
    yield started
    for proc in started.values():
        if proc.poll() is None:
            proc.kill()


# -------------------------------------------------------------------------------- tests


def test_library_imports_without_tensorflow():
    code = "import sys, deepcoro_jax.training.train; assert 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(1), check=True, timeout=120)


def test_bad_overrides_and_data_are_named_errors(setup, tmp_path):
    workdir = tmp_path / "run"
    cases = (
        ("--config.input.no_such_key=1", "the config has no field 'no_such_key'"),
        ("--config.total_steps=ten", "--config.total_steps=ten"),
        ("--config.model.mask_ratio=high", "--config.model.mask_ratio=high"),
        ("--config.input.data_dir=no/such/folder", "is not a prepared dataset"),
    )
    started = [  # side by side: each stops at start-up
        subprocess.Popen(
            [sys.executable, *_command(setup, workdir, {}, (override,))],
            cwd=REPO,
            env=_env(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for override, _ in cases
    ]
    for proc, (_, message) in zip(started, cases, strict=True):
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode != 0
        assert message in stderr, stderr[-2000:]
    assert not list(tmp_path.iterdir()), "a bad override wrote to the workdir"


@pytest.mark.slow
def test_a_mismatched_resume_leaves_the_workdir_as_it_was(setup, reference, tmp_path):
    """Resuming the reference run's checkpoint with a wider embedding stops before
    anything is written, with one line naming the mismatch."""
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    rc, out, err = _finish(_start(setup, workdir, {"model.embed_dim": 48}))
    assert rc == 1
    assert err.startswith("error: ValueError: checkpoint ") and "does not match" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert "compiling" not in out
    after = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    assert after == before


# ------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_every_loss_term_falls_and_everything_is_logged(reference):
    workdir, stdout = reference
    metrics = _metrics(workdir)
    assert sorted(metrics) == list(range(1, TOTAL + 1))
    for key in LOSS_KEYS:
        first = np.mean([metrics[s][key] for s in (1, 2, 3)])
        last = np.mean([metrics[s][key] for s in (TOTAL - 2, TOTAL - 1, TOTAL)])
        assert last < first - 0.05 * abs(first), f"{key}: {first:.4f} -> {last:.4f}"
    record = metrics[TOTAL]
    for key in (
        "loss_weighted/contrastive",
        "loss_weighted/caption",
        "loss_weighted/mvm",
        "l2_grads",
        "l2_params",
        "l2_updates",
        "temperature",
        "bias",
        "videos_per_s",
        "step_time_s",
        "data_wait_s",
        *(f"lr/{c}" for c in ("video_encoder", "text_encoder", "caption_decoder", "mvm_decoder")),
    ):
        assert np.isfinite(record[key]), key
    assert "mfu" not in record  # no known peak on CPU
    total = sum(record[f"loss_weighted/{t}"] for t in ("contrastive", "caption", "mvm"))
    np.testing.assert_allclose(record["loss"], total, rtol=1e-6)
    # Constant after 2 warmup steps; the recipe gives the video encoder a third of the lr.
    assert record["lr/video_encoder"] == pytest.approx(0.3e-3)
    assert record["lr/text_encoder"] == pytest.approx(1e-3)
    assert record["temperature"] != pytest.approx(10.0) and record["bias"] != -10.0
    assert re.search(rf"^step {TOTAL}/{TOTAL}  loss [0-9.]+ .* ETA 0\.0 min$", stdout, re.M)
    assert list(workdir.glob("events.out.tfevents.*")), "no TensorBoard events"
    assert json.loads((workdir / "config.json").read_text())["total_steps"] == TOTAL
    assert _checkpoints(workdir) == [TOTAL // 2, TOTAL]


@pytest.fixture(scope="module")
def interrupted(setup, reference, cached_runs):
    """One workdir trained in four processes: TOTAL/2 steps and exit; resume and die by
    kill -9 after a checkpoint; resume to the end. What each start printed."""
    workdir = setup["root"] / "interrupted"
    overrides = {"ckpt_steps": 4, "keep_ckpts": 3}
    first = _succeeded(_start(setup, workdir, {**overrides, "total_steps": TOTAL // 2}))
    killed = _start(setup, workdir, overrides)
    _wait_for(lambda: max(_checkpoints(workdir), default=0) >= TOTAL // 2 + 4, killed)
    killed.kill()  # SIGKILL: no chance to save anything
    _, killed_out, _ = _finish(killed)
    resumed_from = max(_checkpoints(workdir))
    last = _succeeded(_start(setup, workdir, overrides))
    return workdir, {"first": first, "killed": killed_out, "last": last}, resumed_from


@pytest.mark.slow
def test_resume_in_new_processes_matches_the_straight_run(reference, interrupted):
    """The interrupted workdir ends with the straight run's metrics and state.

    On this machine the runs agree bit for bit, but XLA CPU's rounding is not
    guaranteed to be the same in every process (a one-ulp difference of the
    gradient norm at step 1 has been seen), so the comparison allows what such a
    difference grows to in TOTAL steps, measured by changing XLA's CPU threading
    (--xla_cpu_multi_thread_eigen=false): loss terms moved by up to 1.1e-6
    relative and weights by up to 9e-7, except KEY_BIAS. Allowed: 3e-6 and 1e-5.
    """
    workdir, printed, _ = interrupted
    assert _step_lines(printed["first"])[-1].startswith(f"step {TOTAL // 2}/{TOTAL // 2}")
    assert _step_lines(printed["killed"])[0].startswith(f"step {TOTAL // 2 + 1}/{TOTAL}")
    metrics, reference_metrics = _metrics(workdir), _metrics(reference[0])
    assert metrics.keys() == reference_metrics.keys()
    for step, expected in reference_metrics.items():
        for key in (*LOSS_KEYS, "l2_params", "temperature", "bias"):
            np.testing.assert_allclose(metrics[step][key], expected[key], rtol=3e-6, err_msg=key)
    state, reference_state = _saved_state(workdir, TOTAL), _saved_state(reference[0], TOTAL)
    assert state["step"] == reference_state["step"] == TOTAL
    np.testing.assert_array_equal(state["rng"], reference_state["rng"])
    compared = 0
    for (path, value), expected in zip(
        jax.tree_util.tree_flatten_with_path(state["params"])[0],
        jax.tree.leaves(reference_state["params"]),
        strict=True,
    ):
        name = jax.tree_util.keystr(path)
        if not KEY_BIAS.search(name):
            np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-5, err_msg=name)
            compared += 1
    assert compared > 100


@pytest.mark.slow
def test_kill_9_resumes_from_the_last_complete_checkpoint(interrupted):
    workdir, printed, resumed_from = interrupted
    killed_steps = [int(s) for s in re.findall(r"^step (\d+)/", printed["killed"], re.M)]
    assert TOTAL // 2 + 4 <= resumed_from <= max(killed_steps) < TOTAL
    assert _step_lines(printed["last"])[0].startswith(f"step {resumed_from + 1}/{TOTAL}")
    assert not list((workdir / "checkpoints").glob("*tmp*")), "a partial checkpoint was left"


@pytest.mark.slow
@pytest.mark.parametrize(("run", "stop_step"), [("sigterm", 3), ("sigterm_pending", 4)])
def test_sigterm_saves_the_step_it_stops_at_and_exits_0(setup, cached_runs, run, stop_step):
    """The signal lands while the loop waits for step 3's metrics: fetched at step 3 when
    every step is logged, at step 4 (with step 4 running) otherwise. The run saves the
    step it stops at, says so, and trains no further."""
    rc, _, err = _finish(cached_runs[run])
    assert rc == 0, err[-3000:]
    workdir = setup["root"] / run
    assert _checkpoints(workdir) == [stop_step]
    assert f"warning: stop requested: saved step {stop_step} in " in err, err[-3000:]
    assert max(_metrics(workdir)) == (stop_step if run == "sigterm" else 1)


@pytest.mark.slow
def test_nan_in_a_batch_stops_with_the_term_and_step(setup, cached_runs):
    """A NaN video at step 3 (neither logged nor saved): the one error line names the
    terms and the step, the traceback is in the log, and no checkpoint of that state (or
    after it) is written."""
    rc, _, err = _finish(cached_runs["nan"])
    assert rc != 0
    found = re.search(r"^error: NonFiniteError: (.*) \(traceback in (.*)\)$", err, re.M)
    assert found, err[-3000:]
    assert found.group(1).startswith("non-finite training at step 3:")
    for term in LOSS_KEYS:
        assert f"{term} = nan" in found.group(1)
    # The run ends with that line; no traceback reaches the terminal. (The lines before
    # it come from this test's wrapper importing TensorFlow before launch.py runs.)
    assert err.strip().splitlines()[-1] == found.group(0) and "Traceback" not in err, err
    workdir = setup["root"] / "nan"
    assert Path(found.group(2)) == workdir / "log.txt"
    assert "deepcoro_jax.training.run.NonFiniteError" in (workdir / "log.txt").read_text()
    assert _checkpoints(workdir) == [2]
    assert sorted(_metrics(workdir)) == [1]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["data_parallel", "fsdp"])
def test_data_parallel_and_fsdp_match_one_device(setup, runs, reference, name):
    """4 devices on the data axis, or 2 data x 2 fsdp: the first steps' losses of one device."""
    _succeeded(runs[name])
    expected = _metrics(reference[0])
    metrics = _metrics(setup["root"] / name)
    assert sorted(metrics) == [1, 2, 3]
    for step, record in metrics.items():
        for key in LOSS_KEYS:
            np.testing.assert_allclose(record[key], expected[step][key], rtol=1e-5, err_msg=key)
    if name == "fsdp":  # the same parameters, sharded another way: the same evaluation
        data_parallel = _metrics(setup["root"] / "data_parallel")[3]
        for key, value in data_parallel.items():
            if key.startswith("train_retrieval/") and not key.endswith("/seconds"):
                np.testing.assert_allclose(metrics[3][key], value, rtol=1e-4, err_msg=key)


@pytest.mark.slow
def test_two_processes_agree(setup, runs, reference):
    """Two launch.py processes of 2 CPU devices each, jax.distributed over localhost: they
    train on the global batches of one process, so their losses are the reference's."""
    losses = []
    for i in range(2):
        out = _succeeded(runs[f"process_{i}"])
        found = re.findall(rf"^\[process {i}\] step (\d)/3  loss ([0-9.]+)", out, re.M)
        assert [int(s) for s, _ in found] == [1, 2, 3], out
        losses.append([float(v) for _, v in found])
    assert losses[0] == losses[1]
    workdir = setup["root"] / "two_processes"
    metrics = _metrics(workdir)
    np.testing.assert_allclose([metrics[s]["loss"] for s in (1, 2, 3)], losses[0], atol=1e-6)
    expected = _metrics(reference[0])
    for step in (1, 2, 3):
        for key in LOSS_KEYS:
            np.testing.assert_allclose(metrics[step][key], expected[step][key], rtol=1e-5,
                                       err_msg=f"{key} at step {step}")
    # Each process embedded its own part of the split; together, every video once.
    from input_pipeline import data_cache, dataset_format

    prepared = os.path.join(
        data_cache.synthetic_dir(dict(SYNTHETIC, cache_dir=setup["cache"])), "prepared"
    )
    videos = dataset_format.num_examples(prepared, "train")
    assert metrics[3]["train_retrieval/v2t_num_queries"] == videos
    data = workdir / "checkpoints" / "3" / "data"
    assert [p.name for p in data.iterdir() if p.name != "commit_success.txt"] == ["position.json"]
    assert (data / "position.json").stat().st_size < 1024
    assert json.loads((data / "position.json").read_text())["position"] == 3 * 8


@pytest.mark.slow
def test_one_process_resumes_what_two_processes_saved(setup, runs, reference):
    """The two-process run's checkpoint continued by one process: the reference's steps."""
    for i in range(2):
        _succeeded(runs[f"process_{i}"])
    workdir = setup["root"] / "two_processes"
    _succeeded(_start(setup, workdir, {"total_steps": 5}))
    metrics, expected = _metrics(workdir), _metrics(reference[0])
    assert sorted(metrics) == [1, 2, 3, 4, 5]
    for step in (4, 5):
        for key in LOSS_KEYS:
            np.testing.assert_allclose(metrics[step][key], expected[step][key], rtol=1e-5,
                                       err_msg=f"{key} at step {step}")
