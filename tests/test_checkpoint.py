"""Tests for deepcoro_jax.training.checkpoint: exact sharded round trips across mesh layouts,
retention (latest K + best), the data position, resume after restart, a SIGKILL
during a save, the SIGTERM guard, and partial init from another run."""

import functools
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deepcoro_jax.training import checkpoint, sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBPROCESS_TIMEOUT_S = 60


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    ema_params: dict | None
    rng: jax.Array


class CountingIterator:
    """A stand-in for pipeline.TrainIterator: yields 0, 1, 2...; saves its position to a file."""

    def __init__(self, position: int = 0):
        self.position = position

    def __next__(self) -> int:
        self.position += 1
        return self.position - 1

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "position.json"), "w") as f:
            json.dump({"position": self.position}, f)

    def restore(self, directory: str) -> None:
        with open(os.path.join(directory, "position.json")) as f:
            self.position = json.load(f)["position"]


def _numpy_params(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "video_encoder": {
            "block_0": {
                "kernel": rng.normal(size=(16, 8)).astype(np.float32),
                "bias": rng.normal(size=(8,)).astype(np.float32),
            },
            "embed": rng.normal(size=(8, 4, 4)).astype(np.float32),
        },
        "head": {"kernel": rng.normal(size=(8, 3)).astype(jnp.bfloat16)},
    }


RULES = ((".*video_encoder/.*", "fsdp"), (".*", "replicate"))


def _build_state(params: dict, seed: jax.Array, with_ema: bool) -> TrainState:
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    opt_state = tx.init(params)
    # One real update so the optimizer moments are not all zeros.
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)
    _, opt_state = tx.update(grads, opt_state, params)
    return TrainState(
        step=jnp.int32(7) + seed,
        params=params,
        opt_state=opt_state,
        ema_params=jax.tree.map(lambda p: p * 2, params) if with_ema else None,
        rng=jax.random.key(seed),
    )


@functools.cache
def _state_builder(mesh, with_ema: bool):
    """One jitted builder per layout: the state is born sharded, compiled once."""
    build = functools.partial(_build_state, with_ema=with_ema)
    abstract = jax.eval_shape(build, _numpy_params(0), jnp.int32(0))
    shardings = sharding.param_shardings(abstract, RULES, mesh, min_fsdp_size=1)
    return jax.jit(build, out_shardings=shardings)


def _make_state(mesh, seed: int = 0, with_ema: bool = True) -> TrainState:
    return _state_builder(mesh, with_ema)(_numpy_params(seed), jnp.int32(seed))


def _host(tree):
    """Host copies; typed PRNG keys as their key data."""

    def to_numpy(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(jax.device_get(x))

    return jax.tree.map(to_numpy, tree)


def _data_split_abstract(state, mesh):
    """Abstract state on `mesh`: leading dim over 'data' when divisible, else replicated."""
    size = mesh.shape["data"]

    def abstract(x):
        spec = P("data") if x.ndim and x.shape[0] % size == 0 else P()
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

    return jax.tree.map(abstract, state)


def _assert_equal_trees(actual, expected):
    flat_actual, tree_actual = jax.tree_util.tree_flatten_with_path(actual)
    flat_expected, tree_expected = jax.tree_util.tree_flatten_with_path(expected)
    assert tree_actual == tree_expected
    for (path, a), (_, e) in zip(flat_actual, flat_expected, strict=True):
        assert a.dtype == e.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(a, e, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def mesh_2x4():
    return sharding.make_mesh((("data", 2), ("fsdp", 4)))


@pytest.fixture(scope="module")
def mesh_8x1():
    return sharding.make_mesh((("data", 8), ("fsdp", 1)))


@pytest.mark.parametrize("with_ema", [True, False])
def test_round_trip_into_another_mesh_layout(tmp_path, mesh_2x4, mesh_8x1, with_ema):
    state = _make_state(mesh_2x4, with_ema=with_ema)
    kernel = state.params["video_encoder"]["block_0"]["kernel"]
    assert kernel.sharding.spec == P("fsdp", None)  # saved split 4 ways on fsdp
    expected = _host(state)
    abstract = _data_split_abstract(state, mesh_8x1)  # split 8 ways on data instead
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
    iterator = CountingIterator(position=11)
    # The trainer saves inside transfer_guard("disallow") and donates the state next.
    with jax.transfer_guard("disallow"):
        assert ckpt.save(7, state, data_iterator=iterator)
    jax.tree.map(lambda x: x.delete(), state)
    next(iterator)  # the position saved is the one at save time
    ckpt.wait()
    ckpt.close()

    resumed = checkpoint.Checkpointer(str(tmp_path), keep=2)
    assert resumed.latest_step() == 7
    fresh_iterator = CountingIterator()
    restored = resumed.restore(abstract, data_iterator=fresh_iterator)
    assert fresh_iterator.position == 11
    assert type(restored) is TrainState
    assert (restored.ema_params is None) == (not with_ema)
    assert jax.random.key_data(restored.rng).shape == (2,)
    _assert_equal_trees(_host(restored), expected)
    for leaf, wanted in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract), strict=True):
        assert leaf.sharding == wanted.sharding
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            continue
        host = np.asarray(jax.device_get(leaf))
        for shard in leaf.addressable_shards:  # every device holds exactly its slice
            np.testing.assert_array_equal(np.asarray(shard.data), host[shard.index])
    restored_kernel = restored.params["video_encoder"]["block_0"]["kernel"]
    assert restored_kernel.addressable_shards[0].data.shape == (2, 8)  # 16 rows over 8 devices
    resumed.close()


def test_restore_errors_name_the_leaves(tmp_path, mesh_2x4):
    state = _make_state(mesh_2x4, with_ema=False)
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1)
    ckpt.save(3, state)
    ckpt.wait()
    abstract = _data_split_abstract(state, mesh_2x4)

    bad = dict(abstract.params)
    bad["video_encoder"] = dict(
        bad["video_encoder"],
        embed=jax.ShapeDtypeStruct((8, 4, 5), jnp.float32, sharding=NamedSharding(mesh_2x4, P())),
    )
    bad["new_head"] = {
        "kernel": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=NamedSharding(mesh_2x4, P()))
    }
    bad_state = abstract.replace(params=bad, ema_params={"x": bad["new_head"]["kernel"]})
    with pytest.raises(ValueError) as error:
        ckpt.restore(bad_state)
    message = str(error.value)
    assert "params/new_head/kernel" in message and "ema_params/x" in message
    assert "params/video_encoder/embed: checkpoint (8, 4, 4) vs target (8, 4, 5)" in message
    assert "opt_state" not in message  # only the differences are named

    no_sharding = abstract.replace(step=jax.ShapeDtypeStruct((), jnp.int32))
    with pytest.raises(ValueError, match="'step'"):
        ckpt.restore(no_sharding)
    with pytest.raises(FileNotFoundError, match="step 4"):
        ckpt.restore(abstract, step=4)
    with pytest.raises(FileNotFoundError, match="no data position"):
        ckpt.restore(abstract, data_iterator=CountingIterator())
    assert not ckpt.save(3, state)  # an existing step is not written again
    ckpt.close()
    empty = checkpoint.Checkpointer(str(tmp_path / "empty"))
    assert empty.latest_step() is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        empty.restore(abstract)
    empty.close()


def _tiny_state(value: float) -> dict:
    return {"w": jnp.full((4,), value, jnp.float32)}


def test_keeps_latest_and_best_across_restart(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2, best_metric="val/acc", best_mode="max")
    accuracies = {1: 0.1, 2: 0.9, 3: 0.3, 4: math.nan, 5: 0.4, 6: None}
    for step, acc in accuracies.items():
        metrics = {"loss": 1.0 / step} if acc is None else {"val/acc": acc, "loss": 1.0 / step}
        assert ckpt.save(step, _tiny_state(step), metrics=metrics)
        ckpt.wait()
    assert ckpt.all_steps() == [2, 5, 6]  # the last two + the best (step 2)
    assert ckpt.best_step() == 2
    ckpt.close()

    restarted = checkpoint.Checkpointer(str(tmp_path), keep=2, best_metric="val/acc")
    assert restarted.latest_step() == 6
    assert restarted.best_step() == 2  # ranks read back from disk
    restarted.save(7, _tiny_state(7), metrics={"val/acc": 0.5})
    restarted.wait()
    assert restarted.all_steps() == [2, 6, 7]
    restarted.save(8, _tiny_state(8), metrics={"val/acc": 0.95})
    restarted.save(9, _tiny_state(9), metrics={"val/acc": 0.2})
    restarted.wait()
    assert restarted.all_steps() == [8, 9]  # step 2 went once step 8 beat it
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _tiny_state(0)
    )
    np.testing.assert_array_equal(restarted.restore(abstract, step=8)["w"], np.full(4, 8.0))
    restarted.close()


def test_best_by_minimum_and_latest_only(tmp_path):
    ckpt = checkpoint.Checkpointer(
        str(tmp_path / "min"), keep=1, best_metric="loss", best_mode="min"
    )
    for step, loss in enumerate([3.0, 1.0, 2.0, 5.0], start=1):
        ckpt.save(step, _tiny_state(step), metrics={"loss": loss})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 4]
    assert ckpt.best_step() == 2
    ckpt.close()

    latest_only = checkpoint.Checkpointer(str(tmp_path / "latest"), keep=2)
    for step in range(1, 5):
        latest_only.save(step, _tiny_state(step), metrics={"loss": 1.0})
    latest_only.wait()
    assert latest_only.all_steps() == [3, 4]
    assert latest_only.best_step() is None
    latest_only.close()
    with pytest.raises(ValueError, match="best_mode"):
        checkpoint.Checkpointer(str(tmp_path / "bad"), best_metric="loss", best_mode="lowest")


# Step -> the tracked metric (NaN: not finite, None: not among the saved metrics).
RANKED_VALUES = {
    1: 0.5,
    2: 0.9,
    3: 0.1,
    4: 0.7,
    5: math.nan,
    6: 0.8,
    7: 0.2,
    8: None,
    9: 0.3,
    10: 0.6,
}


@pytest.mark.parametrize(
    "mode, keep, keep_best, survivors",
    [
        ("max", 2, 3, [2, 4, 6, 9, 10]),  # the last two + 0.9, 0.8, 0.7
        ("min", 1, 2, [3, 7, 10]),  # the last one + 0.1, 0.2
        ("min", 2, 3, [3, 7, 9, 10]),  # the last two + 0.1, 0.2, 0.3 (step 9, also last)
    ],
)
def test_keeps_the_last_keep_ckpts_and_the_best_keep_best(
    tmp_path, mode, keep, keep_best, survivors
):
    ckpt = checkpoint.Checkpointer(
        str(tmp_path), keep=keep, best_metric="val/acc", best_mode=mode, keep_best=keep_best
    )
    for step, value in RANKED_VALUES.items():
        metrics = {"loss": 1.0} if value is None else {"val/acc": value, "loss": 1.0}
        assert ckpt.save(step, _tiny_state(step), metrics=metrics)
    ckpt.wait()
    assert ckpt.all_steps() == survivors
    assert ckpt.best_step() == (2 if mode == "max" else 3)
    ckpt.close()


def test_steps_without_the_metric_are_never_among_the_best(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1, best_metric="val/acc", keep_best=3)
    for step, metrics in enumerate(
        [{"loss": 1.0}, {"val/acc": math.nan}, {"val/acc": 0.5}, {"loss": 1.0}], start=1
    ):
        ckpt.save(step, _tiny_state(step), metrics=metrics)
    ckpt.wait()
    assert ckpt.all_steps() == [3, 4]  # fewer ranked steps than keep_best: no others kept
    ckpt.close()
    with pytest.raises(ValueError, match="config.keep_best=0 must be at least 1"):
        checkpoint.Checkpointer(str(tmp_path / "bad"), best_metric="val/acc", keep_best=0)
    checkpoint.Checkpointer(str(tmp_path / "latest_only"), keep_best=0).close()  # not used


def _run_child(script: str, tmp_path) -> subprocess.Popen:
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(script))
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )


def _wait_for_line(child: subprocess.Popen, prefix: str) -> str:
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    lines = []
    while time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line and child.poll() is not None:
            break
        lines.append(line)
        if line.startswith(prefix):
            return line.strip()
    child.kill()
    raise AssertionError(f"child never printed {prefix!r}; output:\n{''.join(lines)}")


def test_sigkill_during_save_leaves_previous_checkpoint(tmp_path):
    workdir = tmp_path / "ckpt"
    child = _run_child(
        f"""
        import time
        import jax.numpy as jnp
        from deepcoro_jax.training import checkpoint

        class HangingIterator:
            def save(self, path):
                print("SAVING", flush=True)
                time.sleep(600)

            def restore(self, path):
                pass

        ckpt = checkpoint.Checkpointer({str(workdir)!r}, keep=3)
        ckpt.save(1, {{"w": jnp.arange(4096, dtype=jnp.float32)}})
        ckpt.wait()
        ckpt.save(2, {{"w": jnp.zeros(4096, jnp.float32)}}, data_iterator=HangingIterator())
        """,
        tmp_path,
    )
    _wait_for_line(child, "SAVING")
    child.send_signal(signal.SIGKILL)
    assert child.wait(SUBPROCESS_TIMEOUT_S) == -signal.SIGKILL
    left = sorted(os.listdir(workdir))
    assert "1" in left and "2" not in left
    assert any(name.startswith("2.orbax-checkpoint-tmp") for name in left), left

    ckpt = checkpoint.Checkpointer(str(workdir), keep=3)
    assert ckpt.latest_step() == 1
    abstract = {
        "w": jax.ShapeDtypeStruct(
            (4096,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])
        )
    }
    np.testing.assert_array_equal(ckpt.restore(abstract)["w"], np.arange(4096, dtype=np.float32))
    ckpt.close()
    assert not any("tmp" in name for name in os.listdir(workdir))  # cleaned on open


def test_sigterm_saves_current_step_and_exits_zero(tmp_path):
    workdir = tmp_path / "ckpt"
    child = _run_child(
        f"""
        import time
        import jax.numpy as jnp
        from deepcoro_jax.training import checkpoint

        ckpt = checkpoint.Checkpointer({str(workdir)!r}, keep=2)
        step = 0
        with checkpoint.PreemptionGuard() as guard:
            while step < 100_000:
                state = {{"w": jnp.full((3,), step + 1, jnp.int32)}}
                step += 1
                if step == 1:
                    print("READY", flush=True)
                time.sleep(0.01)
                if guard.requested:
                    ckpt.save(step, state)
                    print("SAVED", step, flush=True)
                    break
        ckpt.close()
        """,
        tmp_path,
    )
    _wait_for_line(child, "READY")
    child.send_signal(signal.SIGTERM)
    saved_step = int(_wait_for_line(child, "SAVED").split()[1])
    assert child.wait(SUBPROCESS_TIMEOUT_S) == 0
    ckpt = checkpoint.Checkpointer(str(workdir), keep=2)
    assert ckpt.latest_step() == saved_step
    abstract = {
        "w": jax.ShapeDtypeStruct(
            (3,), jnp.int32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])
        )
    }
    np.testing.assert_array_equal(ckpt.restore(abstract)["w"], np.full(3, saved_step))
    ckpt.close()


def test_guard_flags_restores_handlers_and_second_signal_interrupts():
    before = signal.getsignal(signal.SIGTERM)
    with checkpoint.PreemptionGuard() as guard:
        assert not guard.requested
        signal.raise_signal(signal.SIGTERM)
        assert guard.requested  # still alive: the signal only set the flag
    assert signal.getsignal(signal.SIGTERM) is before

    # Python's own SIGINT handler, as in a terminal (a shell's background job starts with
    # SIGINT ignored, and the guard then leaves a second one ignored too).
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), checkpoint.PreemptionGuard() as guard:
            signal.raise_signal(signal.SIGINT)
            assert guard.requested
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)


def test_load_subset(tmp_path, mesh_2x4, mesh_8x1):
    source = _make_state(mesh_2x4, seed=3)
    saved = _host(source.params)
    workdir = tmp_path / "other_run"
    ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"), keep=2)
    ckpt.save(5, source)
    shifted = jax.tree.map(lambda p: p + 1, source.params)
    saved_at_9 = _host(shifted)
    ckpt.save(9, source.replace(params=shifted))
    ckpt.close()

    target = jax.tree.map(jnp.asarray, _numpy_params(seed=4))
    target["video_encoder"]["block_0"]["kernel"] = target["video_encoder"]["block_0"][
        "kernel"
    ].astype(jnp.bfloat16)
    target = jax.tree.map(
        lambda x, a: jax.device_put(x, a.sharding), target, _data_split_abstract(target, mesh_8x1)
    )
    loaded = checkpoint.load_subset(
        str(workdir), 5, target, include="video_encoder/.*", exclude=".*/bias"
    )
    kernel = loaded["video_encoder"]["block_0"]["kernel"]
    assert (
        kernel.dtype == jnp.bfloat16
        and kernel.sharding == target["video_encoder"]["block_0"]["kernel"].sharding
    )
    np.testing.assert_array_equal(
        np.asarray(kernel), saved["video_encoder"]["block_0"]["kernel"].astype(jnp.bfloat16)
    )
    np.testing.assert_array_equal(loaded["video_encoder"]["embed"], saved["video_encoder"]["embed"])
    assert loaded["video_encoder"]["block_0"]["bias"] is target["video_encoder"]["block_0"]["bias"]
    assert loaded["head"]["kernel"] is target["head"]["kernel"]

    latest = checkpoint.load_subset(str(workdir / "checkpoints"), None, target, include="head/.*")
    np.testing.assert_array_equal(latest["head"]["kernel"], saved_at_9["head"]["kernel"])

    wrong = dict(target, new_tower={"kernel": jnp.zeros((2,))})
    wrong["video_encoder"] = dict(target["video_encoder"], embed=jnp.zeros((8, 4, 2)))
    with pytest.raises(ValueError) as error:
        checkpoint.load_subset(str(workdir), 5, wrong)
    message = str(error.value)
    assert "new_tower/kernel" in message
    assert "video_encoder/embed: checkpoint (8, 4, 4) vs target (8, 4, 2)" in message
    with pytest.raises(ValueError, match="select no target parameter"):
        checkpoint.load_subset(str(workdir), 5, target, include="decoder/.*")
    with pytest.raises(FileNotFoundError, match="step 6"):
        checkpoint.load_subset(str(workdir), 6, target)
