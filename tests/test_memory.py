"""deepcoro_jax.training.memory: a compiled step is checked against the memory there is.

A jitted sort of a 4096 x 4096 float32 outer product needs that 64 MiB array as
a temporary; its arguments and output are small arrays whose sizes are known.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deepcoro_jax.training import memory

N = 4096
INTERMEDIATE_BYTES = N * N * 4  # the outer product, float32


def _sorted_outer(x, y):
    return jnp.sort(jnp.outer(x, y), axis=None)[-16:]


@pytest.fixture(scope="module")
def compiled():
    x = np.linspace(0.0, 1.0, N, dtype=np.float32)
    return jax.jit(_sorted_outer).lower(x, x).compile(), x


def test_fits_with_the_real_memory_and_counts_every_buffer(compiled):
    step, x = compiled
    result = memory.check_fits(step, jax.local_devices()[:1], what="the sort")
    by_hand = 2 * x.nbytes + np.zeros(16, np.float32).nbytes  # x, y and the top 16
    assert result["argument_bytes"] + result["output_bytes"] >= by_hand
    assert result["needed_bytes"] >= by_hand + INTERMEDIATE_BYTES
    assert result["scope"] == "host" and result["devices"] == 1
    assert 0 < result["needed_bytes"] <= result["available_bytes"]
    line = memory.describe(result)
    assert line.startswith("the sort needs ") and "\n" not in line


def test_too_little_memory_raises_with_both_numbers_and_the_knobs(compiled, monkeypatch):
    step, _ = compiled
    available = 3 * 1024 * 1024
    monkeypatch.setattr(memory, "host_available_bytes", lambda: available)
    with pytest.raises(memory.StepTooLarge) as error:
        memory.check_fits(step, jax.local_devices()[:1], what="the sort")
    message = str(error.value)
    needed = memory.step_bytes(step)["peak_bytes"]
    assert f"the sort needs {memory.format_bytes(needed)} of host memory" in message
    assert f"there is {memory.format_bytes(available)}" in message
    for knob in (
        "config.input.batch_size",
        "config.grad_accum_steps",
        "config.model.num_frames",
        "config.model.image_size",
        "config.input.video_pp",
        "config.model.dtype",
        "config.model.encoder_overrides.remat",
        "config.model.contrastive_tokens",
    ):
        assert knob in message
    assert isinstance(error.value, MemoryError)


def test_cpu_devices_share_the_host_and_accelerators_have_their_own_limit(monkeypatch):
    devices = jax.local_devices()
    mesh = Mesh(np.asarray(devices), ("data",))
    rows = NamedSharding(mesh, P("data"))
    x = jax.ShapeDtypeStruct((len(devices) * 512, 1024), jnp.float32, sharding=rows)
    step = jax.jit(lambda a: jnp.exp(a) * 2, out_shardings=rows).lower(x).compile()
    per_device = memory.step_bytes(step)["peak_bytes"]
    assert per_device >= 2 * 512 * 1024 * 4  # each device's shard in and out
    assert memory.check_fits(step, devices)["needed_bytes"] == len(devices) * per_device

    class Accelerator:  # what a GPU reports: its own allocator limit
        platform = "gpu"

        def memory_stats(self):
            return {"bytes_limit": per_device - 1, "bytes_in_use": 0}

    with pytest.raises(memory.StepTooLarge, match="(?s)per GPU.*config.mesh with an fsdp axis"):
        memory.check_fits(step, [Accelerator(), Accelerator()])
    Accelerator.memory_stats = lambda self: {"bytes_limit": per_device}
    fits = memory.check_fits(step, [Accelerator(), Accelerator()])
    assert (fits["scope"], fits["needed_bytes"], fits["available_bytes"]) == (
        "per device",
        per_device,
        per_device,
    )


def test_unknown_memory_is_not_checked(compiled, caplog):
    class Unknown:  # a backend that gives no allocator statistics
        platform = "tpu"

        def memory_stats(self):
            raise NotImplementedError

    step, _ = compiled
    result = memory.check_fits(step, [Unknown()])
    assert result["available_bytes"] is None and result["needed_bytes"] > 0
    assert [r.getMessage() for r in caplog.records] == [
        f"memory not checked: {memory.describe(result)}"
    ]
    assert memory.describe(result).endswith("there is an unknown amount")


def test_format_bytes():
    assert memory.format_bytes(3 * 2**30) == "3.00 GiB"
    assert memory.format_bytes(70337475136) == "65.51 GiB"
    assert memory.format_bytes(12.5 * 2**20) == "12.5 MiB"
    assert memory.format_bytes(32 * 1024) == "32.0 KiB"
