"""Whether a compiled step fits in memory, checked before it runs.

`check_fits` reads XLA's memory analysis of a compiled function (the buffers of
one device's program) and compares the peak it implies with the memory there
is: each accelerator's allocator limit (``memory_stats()['bytes_limit']``), or
for CPU devices, which share the host, the host's available memory
(MemAvailable of /proc/meminfo; a container's own limit is not read). A step that
cannot fit raises `StepTooLarge`, naming both numbers and the config fields that
change them, instead of an allocator abort minutes into the run. `describe`
formats the numbers for one log line.

The peak is XLA's estimate: arguments + outputs - outputs aliased to donated
arguments + temporaries + generated code. It counts the arguments (the train
state) as memory still to be taken, so compile from abstract arguments
(``jax.ShapeDtypeStruct``) before the state is placed, as the trainer does. A
step under the limit may still run out (fragmentation, other arrays alive).

Not here: the memory a step used (``device.memory_stats()['peak_bytes_in_use']``
after it ran), host memory of the input pipeline.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import jax

MIB = 1 << 20
GIB = 1 << 30
MEMINFO = "/proc/meminfo"
KNOBS = (
    "config.input.batch_size (a smaller batch)",
    "config.grad_accum_steps (the same batch in that many micro-batches)",
    "config.model.num_frames / config.model.image_size (smaller clips; change "
    "config.input.video_pp and eval_video_pp with them)",
    "config.model.dtype='bfloat16' (half-size activations on GPU and TPU, not on CPU)",
    "config.model.encoder_overrides.remat='dots_no_batch' or 'full' (recompute the "
    "encoder's activations in the backward pass)",
    "config.model.contrastive_tokens='masked' (one encoder pass, on the visible tubelets)",
)
SHARDED_KNOB = "config.mesh with an fsdp axis (shards the state over the devices)"


class StepTooLarge(MemoryError):
    """A compiled step needs more memory than its devices have."""


def format_bytes(num_bytes: float) -> str:
    """'3.00 GiB' from 0.1 GiB up, '12.5 MiB' from 0.1 MiB up, '32.0 KiB' below."""
    if num_bytes >= GIB / 10:
        return f"{num_bytes / GIB:.2f} GiB"
    if num_bytes >= MIB / 10:
        return f"{num_bytes / MIB:.1f} MiB"
    return f"{num_bytes / 1024:.1f} KiB"


def host_available_bytes() -> int | None:
    """Memory the host can still give: MemAvailable of /proc/meminfo, else the free
    physical pages (None when neither is known)."""
    try:
        with open(MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def step_bytes(compiled: jax.stages.Compiled) -> dict[str, int] | None:
    """XLA's per-device buffer sizes of `compiled`, and their peak (None when unknown)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    sizes = dict(
        argument_bytes=int(stats.argument_size_in_bytes),
        output_bytes=int(stats.output_size_in_bytes),
        alias_bytes=int(stats.alias_size_in_bytes),
        temp_bytes=int(stats.temp_size_in_bytes),
        code_bytes=int(stats.generated_code_size_in_bytes),
    )
    sizes["peak_bytes"] = (
        sizes["argument_bytes"]
        + sizes["output_bytes"]
        - sizes["alias_bytes"]
        + sizes["temp_bytes"]
        + sizes["code_bytes"]
    )
    return sizes


def _device_limit(device: jax.Device) -> int | None:
    try:
        stats = device.memory_stats()
    except (NotImplementedError, RuntimeError):  # a backend without allocator statistics
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def available_bytes(devices: Sequence[jax.Device]) -> tuple[str, int | None]:
    """The memory `devices` have for a step: ('per device', the smallest allocator
    limit) on accelerators, ('host', available host memory) for CPU devices, which
    share it; the amount is None when unknown."""
    limits = [_device_limit(d) for d in devices]
    if all(limit is not None for limit in limits):
        return "per device", min(limits)
    if all(d.platform == "cpu" for d in devices):
        return "host", host_available_bytes()
    return "per device", None


def check_fits(
    compiled: jax.stages.Compiled, devices: Sequence[jax.Device], what: str = "the train step"
) -> dict:
    """The memory `compiled` needs and the memory there is; StepTooLarge if it cannot fit.

    `devices` are this process's devices that run `compiled` (``jax.local_devices()``).
    Returns `step_bytes`'s per-device sizes and: ``devices``, ``platform``,
    ``scope`` ('per device', or 'host' when CPU devices share the host's memory),
    ``needed_bytes`` and ``available_bytes`` in that scope (None when unknown,
    and then nothing is checked).
    """
    devices = list(devices)
    if not devices:
        raise ValueError("check_fits: no devices given")
    sizes = step_bytes(compiled)
    platform = devices[0].platform
    scope, available = available_bytes(devices)
    needed = None
    if sizes is not None:
        needed = sizes["peak_bytes"] * (len(devices) if scope == "host" else 1)
    result = {
        **(sizes or {}),
        "what": what,
        "devices": len(devices),
        "platform": platform,
        "scope": scope,
        "needed_bytes": needed,
        "available_bytes": available,
    }
    if needed is None or available is None:
        logging.warning("memory not checked: %s", describe(result))
        return result
    if needed > available:
        knobs = KNOBS + ((SHARDED_KNOB,) if len(devices) > 1 else ())
        raise StepTooLarge(
            f"{describe(result)}. It cannot fit; change one of:\n  " + "\n  ".join(knobs)
        )
    return result


def describe(result: dict) -> str:
    """One line of what `check_fits` found, e.g. 'the train step needs 3.10 GiB per GPU
    (arguments 1.20 GiB, outputs 1.20 GiB of which 1.20 GiB aliased, temporaries
    1.90 GiB); there is 79.20 GiB'."""
    what, needed, available = result["what"], result["needed_bytes"], result["available_bytes"]
    platform = result["platform"].upper()
    if needed is None:
        return f"{what}: XLA gives no memory analysis on {platform}"
    if result["scope"] == "per device":
        where = f"per {platform} ("
    elif result["devices"] == 1:
        where = "of host memory ("
    else:
        each = format_bytes(result["peak_bytes"])
        where = f"of host memory ({result['devices']} {platform} devices x {each}: "
    outputs = f"outputs {format_bytes(result['output_bytes'])}"
    if result["alias_bytes"]:
        outputs += f" of which {format_bytes(result['alias_bytes'])} aliased"
    parts = [
        f"arguments {format_bytes(result['argument_bytes'])}",
        outputs,
        f"temporaries {format_bytes(result['temp_bytes'])}",
    ]
    if result["code_bytes"]:
        parts.append(f"code {format_bytes(result['code_bytes'])}")
    there = "an unknown amount" if available is None else format_bytes(available)
    return f"{what} needs {format_bytes(needed)} {where}{', '.join(parts)}); there is {there}"
