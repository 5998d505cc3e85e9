"""How the tests run JAX: on CPU with fake devices, compiled fast, with one compilation cache.

- ``FAST_COMPILE``: XLA's CPU backend without LLVM's expensive passes and without
  its fusion emitters. Test programs are tiny, so compiling them, not running them,
  is what costs; these flags cut that by about a third. Every test process and every
  process a test starts uses them, so results compare across processes as before.
- ``CACHE_ENV``: the folder of a persistent compilation cache shared by the whole
  test run (the pytest workers, the launch.py and tool processes the tests start),
  made by conftest.py for one run and removed after it: a program compiled by one
  test is loaded, not compiled again, by every other that builds the same program.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

FAST_COMPILE = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
    "--xla_cpu_use_fusion_emitters=false"
)
CACHE_ENV = "DEEPCORO_TEST_XLA_CACHE"
# Which programs go to the cache: in the pytest workers, those that took half a second
# to compile (their many small ones are rarely built twice); in the processes the
# tests start (launch.py, the tools: some 30 of them build the same programs), all.
WORKER_CACHE_MIN_SECS = "0.5"
PROCESS_CACHE_MIN_SECS = "0"


def xla_flags(devices: int) -> str:
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"


def cache_dir() -> str:
    """The test run's compilation cache (conftest.py sets it up before any test)."""
    return os.environ[CACHE_ENV]


def subprocess_env(devices: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a process a test starts: `base` (default: this one's) without
    its JAX and XLA settings, then `devices` fake CPU devices, fast compilation and the
    run's compilation cache."""
    base = os.environ if base is None else base
    env = {k: v for k, v in base.items() if not k.startswith(("XLA_", "JAX_"))}
    env.update(
        XLA_FLAGS=xla_flags(devices),
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=cache_dir(),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=PROCESS_CACHE_MIN_SECS,
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    return env
