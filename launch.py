"""Entry point: ``python launch.py --config configs/multitask.py[:args] --workdir DIR``.

Trains the config in DIR, resuming from DIR's latest checkpoint. Config
fields are overridable: ``--config.total_steps=1000 --config.input.batch_size=64``;
an override of a field the config lacks, or of the wrong type, stops with an
error naming it.

Multi-process runs (one process per host, or per GPU): ``jax.distributed`` is
initialised from ``--coordinator_address/--num_processes/--process_id``, or
from the environment of a multi-task SLURM step (``srun``), Open MPI or a
multi-host TPU slice; never on a plain single-process run. On CPU, processes
talk through gloo. The persistent compilation cache (on by default) lets a
restarted run reuse its compiled train step.

The terminal shows progress, evaluations, the project's warnings and, for a
run stopped by an error, one line naming the cause; library log lines and
tracebacks go to WORKDIR/log.txt (`deepcoro_jax.console`), all of it also to
the terminal with ``--verbose``. Paths may be relative, start with ``~`` or be
URLs (``gs://...``).

Not here: anything about training itself (``deepcoro_jax/training/train.py``).
"""

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from deepcoro_jax import console, paths

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/multitask.py:runlocal"
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, artefacts.")
_MODE = flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "eval"],
    "'train' trains, resuming from the latest checkpoint; 'eval' runs every evaluator of "
    "config.evals once on the latest checkpoint and logs the results at its step.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (explicit multi-process runs)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (explicit).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (explicit).")
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Show every library log line on the terminal (always in WORKDIR/log.txt)."
)
_CACHE = flags.DEFINE_bool("compilation_cache", True, "Persistent XLA compilation cache.")
_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir",
    None,
    f"Where the compilation cache lives (default: $JAX_COMPILATION_CACHE_DIR, else "
    f"{paths.COMPILATION_CACHE}).",
)
flags.mark_flags_as_required(["config", "workdir"])


def _launched_as_one_of_several() -> bool:
    """True under a multi-task SLURM step, Open MPI, or a multi-host TPU slice."""
    env = os.environ
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def initialize_distributed() -> None:
    """Starts jax.distributed on a multi-process launch; does nothing on a single process."""
    explicit = [_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value]
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise app.UsageError(
            "give all of --coordinator_address, --num_processes and --process_id, or none"
        )
    if explicit[0] is None and not _launched_as_one_of_several():
        return
    # Collectives between CPU devices of different processes (unused on GPU/TPU).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit[0] is not None:
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    else:
        jax.distributed.initialize()
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    console.start(verbose=_VERBOSE.value)
    try:
        initialize_distributed()
        if _CACHE.value:
            paths.use_compilation_cache(_CACHE_DIR.value)
        from deepcoro_jax.training import train

        train.main(_CONFIG.value, paths.resolve(_WORKDIR.value), _MODE.value)
    except Exception as e:  # one line on the terminal, the traceback in the log
        sys.exit(console.fatal(e))


if __name__ == "__main__":
    app.run(main, flags_parser=console.parse_flags)
