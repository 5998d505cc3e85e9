"""Checkpoints with orbax: save, keep, resume, best-by-metric, preemption, partial init.

`Checkpointer` wraps one `ocp.CheckpointManager` over a run's checkpoint
directory (``workdir/checkpoints``). Each step folder holds three items:

    state/    the whole train state pytree (params, optimizer state, EMA teacher,
              step, RNG), one tensorstore array per leaf, written asynchronously;
    data/     the input stream's position (a few integers, the same in every
              process): the iterator's own ``save(directory)``, called by every
              process synchronously, so the position is the one at the moment of
              the save; any number of processes can restore it;
    metrics   JSON, when a best metric is tracked (written by orbax itself).

Retention is one orbax preservation policy, ``AnyPreservationPolicy`` of
``LatestN(keep)`` and `BestRanked` (the `keep_best` best by the tracked
metric): a step survives when it is among the last `keep` OR among the best
`keep_best` so far, so a best one is never deleted while it is among them; a
step without a finite value of the metric is kept only while among the latest.
Orbax writes each step to
``<step>.orbax-checkpoint-tmp*`` and renames it when complete; a step folder
without that suffix is complete, and tmp folders left by a killed save are
ignored and removed when the next `Checkpointer` opens the directory.

`PreemptionGuard` turns SIGTERM/SIGINT into a flag the trainer polls;
`load_subset` copies selected parameters from another run (``config.init``).

Not here: when to save (the trainer decides), non-finite checks (the trainer
never saves a NaN state), exporting weights for other frameworks.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import signal
import threading
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
import orbax.checkpoint as ocp
from etils import epath

from deepcoro_jax import paths
from deepcoro_jax.training.sharding import param_name

STATE_ITEM = "state"
DATA_ITEM = "data"
BEST_MODES = ("max", "min")


class DataIterator(Protocol):
    """What the checkpoint needs of an input iterator (`input_pipeline.pipeline.TrainIterator`)."""

    def save(self, directory: str) -> Any:
        """Writes the position into `directory`."""

    def restore(self, directory: str) -> None:
        """Moves to the position saved in `directory`."""


class _DataIteratorHandler(ocp.CheckpointHandler):
    """Saves/restores a `DataIterator` position in the item's directory."""

    def save(self, directory: epath.Path, args: DataIteratorSave) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        args.iterator.save(os.fspath(directory))

    def restore(self, directory: epath.Path, args: DataIteratorRestore) -> DataIterator:
        args.iterator.restore(os.fspath(directory))
        return args.iterator


@ocp.args.register_with_handler(_DataIteratorHandler, for_save=True)
class DataIteratorSave(ocp.args.CheckpointArgs):
    def __init__(self, iterator: DataIterator):
        self.iterator = iterator


@ocp.args.register_with_handler(_DataIteratorHandler, for_restore=True)
class DataIteratorRestore(ocp.args.CheckpointArgs):
    def __init__(self, iterator: DataIterator):
        self.iterator = iterator


def _saved_shape(leaf: Any) -> tuple[int, ...]:
    """The shape a leaf has on disk: typed PRNG keys are stored as their key data."""
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return tuple(jax.eval_shape(jax.random.key_data, leaf).shape)
    return tuple(leaf.shape)


def _named_leaves(tree: Any) -> dict[str, Any]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {param_name(path): leaf for path, leaf in leaves}


def _mismatches(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(names in `wanted` missing from `saved`, 'name: checkpoint S vs target T' lines)."""
    missing = sorted(set(wanted) - set(saved))
    shapes = [
        f"{name}: checkpoint {tuple(saved[name].shape)} vs target {_saved_shape(wanted[name])}"
        for name in sorted(set(wanted) & set(saved))
        if tuple(saved[name].shape) != _saved_shape(wanted[name])
    ]
    return missing, shapes


@dataclasses.dataclass
class BestRanked:
    """An orbax preservation policy: the `n` checkpoints of highest finite `rank`.

    Unlike orbax's ``BestN``, a checkpoint without metrics or whose rank is not
    finite is never among the best, however few checkpoints there are. Ties go to
    the later step.
    """

    rank: Callable[[Mapping[str, float]], float]
    n: int

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
        del context
        ranked = [
            (self.rank(info.metrics), info.step, i)
            for i, info in enumerate(checkpoints)
            if info.metrics is not None
        ]
        best = {i for _, _, i in sorted(r for r in ranked if math.isfinite(r[0]))[-self.n :]}
        return [i in best for i in range(len(checkpoints))]


class Checkpointer:
    """Async checkpoints of the train state + data position in one directory.

    Args:
      directory: where step folders go (the run's ``workdir/checkpoints``).
      keep: how many of the latest checkpoints to keep.
      best_metric: a key of the `metrics` given to `save`; the `keep_best`
        checkpoints with the best values so far are kept as well (None: keep only
        the latest).
      best_mode: 'max' or 'min', which value of `best_metric` is best.
      keep_best: how many of the best checkpoints to keep (with `best_metric`).
    """

    def __init__(
        self,
        directory: str,
        *,
        keep: int = 3,
        best_metric: str | None = None,
        best_mode: str = "max",
        keep_best: int = 1,
    ):
        if keep < 1:
            raise ValueError(f"Checkpointer: keep must be >= 1, got {keep}")
        if best_mode not in BEST_MODES:
            raise ValueError(f"Checkpointer: best_mode must be in {BEST_MODES}, got {best_mode!r}")
        if best_metric is not None and keep_best < 1:
            raise ValueError(
                f"config.keep_best={keep_best} must be at least 1 when config.best_metric is set"
            )
        self.directory = paths.resolve(directory)  # orbax needs an absolute path or a URL
        self.best_metric = best_metric
        self._sign = 1.0 if best_mode == "max" else -1.0
        self._warned_missing_metric = False
        policies = [ocp.checkpoint_managers.LatestN(n=keep)]
        if best_metric is not None:
            policies.append(BestRanked(rank=self._rank, n=keep_best))
        # best_fn also makes orbax write the metrics with each step (and read them on restart).
        options = ocp.CheckpointManagerOptions(
            best_fn=self._rank if best_metric is not None else None,
            best_mode="max",
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            cleanup_tmp_directories=True,
            enable_async_checkpointing=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={
                STATE_ITEM: ocp.StandardCheckpointHandler(),
                DATA_ITEM: _DataIteratorHandler(),
            },
            options=options,
        )

    def _rank(self, metrics: Mapping[str, float]) -> float:
        """Higher is better; a missing or non-finite metric ranks last."""
        value = metrics.get(self.best_metric)
        if value is None or not math.isfinite(value):
            return -math.inf
        return self._sign * value

    def latest_step(self) -> int | None:
        """The latest complete checkpoint's step (None when there is none)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, ascending."""
        return sorted(self._manager.all_steps())

    def best_step(self) -> int | None:
        """The step with the best `best_metric`, the later one on ties (None without a
        best metric or any value)."""
        if self.best_metric is None:
            return None
        ranked = {s: self._rank(self._manager.metadata(s).metrics or {}) for s in self.all_steps()}
        ranked = {s: r for s, r in ranked.items() if r > -math.inf}
        return max(ranked, key=lambda s: (ranked[s], s)) if ranked else None

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_iterator: DataIterator | None = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> bool:
        """Starts writing `state` (and the iterator's position) as checkpoint `step`.

        Returns as soon as the arrays are copied to host memory (the state's
        buffers may be donated right after); the files are written in the
        background, `wait` blocks until they are. `metrics` rank the
        checkpoint when `best_metric` is set (a checkpoint whose metrics lack it
        is kept only while among the latest), and are ignored otherwise. A
        step at or below the latest saved one is not saved again: returns False.
        """
        args = {STATE_ITEM: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            args[DATA_ITEM] = DataIteratorSave(data_iterator)
        # Saving is a deliberate device->host copy, also inside a loop that disallows transfers.
        with jax.transfer_guard("allow"):
            ranked = self._metrics_to_record(metrics)
            return self._manager.save(int(step), args=ocp.args.Composite(**args), metrics=ranked)

    def _metrics_to_record(self, metrics: Mapping[str, Any] | None) -> dict[str, float] | None:
        if self.best_metric is None or metrics is None:
            return None
        recorded = {}
        for name, value in metrics.items():
            try:
                recorded[str(name)] = float(value)
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"Checkpointer.save: metric {name!r} is not a number: {value!r}"
                ) from e
        if self.best_metric not in recorded and not self._warned_missing_metric:
            logging.warning(
                "checkpoint metrics %s lack best_metric %r: such checkpoints are only kept "
                "while among the latest",
                sorted(recorded),
                self.best_metric,
            )
            self._warned_missing_metric = True
        return recorded

    def restore(
        self,
        abstract_state: Any,
        *,
        step: int | None = None,
        data_iterator: DataIterator | None = None,
    ) -> Any:
        """The state of checkpoint `step` (default: the latest), laid out as `abstract_state`.

        `abstract_state` is the state's pytree of `jax.ShapeDtypeStruct` with a
        `sharding` on every leaf (`jax.eval_shape` + the trainer's shardings):
        each process reads only its shards, so no array is ever whole on one
        device; leaves are cast to the abstract dtype. The tree must match the
        checkpoint leaf for leaf (names and shapes), else a ValueError lists every
        difference. `data_iterator`, when given, is moved to the saved position.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        if step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; steps: {self.all_steps()}"
            )
        wanted = _named_leaves(abstract_state)
        unsharded = [n for n, leaf in wanted.items() if getattr(leaf, "sharding", None) is None]
        if unsharded:
            raise ValueError(
                "Checkpointer.restore: abstract_state leaves need a sharding "
                f"(jax.ShapeDtypeStruct(..., sharding=...)); missing for: {unsharded}"
            )
        _check_state_matches(self._manager, self.directory, step, wanted)
        args = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            if not (epath.Path(self.directory) / str(step) / DATA_ITEM).exists():
                raise FileNotFoundError(
                    f"checkpoint {self.directory} step {step} holds no data position "
                    f"(no {DATA_ITEM}/ item) to restore the data iterator from"
                )
            args[DATA_ITEM] = DataIteratorRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        return restored[STATE_ITEM]

    def wait(self) -> None:
        """Blocks until every started save is on disk (and old ones deleted)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager's threads."""
        self._manager.close()


class PreemptionGuard:
    """Turns SIGTERM and SIGINT into a flag the training loop polls.

    Usage::

        with PreemptionGuard() as guard:
            while step < total_steps:
                ...one step...
                if guard.requested:
                    checkpointer.save(step, state, ...)
                    break

    A second signal while a stop is already requested acts as if no guard were
    installed (Ctrl-C twice interrupts at once). The previous handlers come back
    on exit. The flag is per process: on multi-process runs every process must
    receive the signal (as SLURM and Kubernetes do), since saving is collective.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self._requested = False
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop was requested; the trainer then saves and exits."""
        return self._requested

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionGuard must be entered from the main thread")
        for signum in self.SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        if not self._requested:
            self._requested = True
            logging.warning(
                "received %s: saving a checkpoint after this step, then stopping "
                "(send it again to stop at once)",
                signal.Signals(signum).name,
            )
            return
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, frame)
        elif previous in (signal.SIG_DFL, None):
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)


def _check_state_matches(
    manager: ocp.CheckpointManager, directory: str, step: int, wanted: Mapping[str, Any]
) -> None:
    """A ValueError listing every leaf of `wanted` that checkpoint `step` lacks or shapes
    differently, and every saved leaf that `wanted` lacks."""
    saved = _named_leaves(manager.item_metadata(step)[STATE_ITEM].tree)
    missing, shapes = _mismatches(saved, wanted)
    unexpected = sorted(set(saved) - set(wanted))
    if missing or shapes or unexpected:
        raise ValueError(
            f"checkpoint {directory} step {step} does not match the state to restore:"
            + (f"\n  missing from the checkpoint: {missing}" if missing else "")
            + (f"\n  not in the state to restore: {unexpected}" if unexpected else "")
            + (f"\n  shape mismatches: {shapes}" if shapes else "")
        )


def _read_only(directory: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        directory,
        item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True),
    )


def latest_step(directory: str) -> int | None:
    """The latest complete checkpoint in `directory`, read without writing anything there
    (None when the folder or a complete checkpoint is missing)."""
    directory = paths.resolve(directory)
    if not epath.Path(directory).exists():
        return None
    manager = _read_only(directory)
    try:
        return manager.latest_step()
    finally:
        manager.close()


def check_matches(directory: str, step: int, abstract_state: Any) -> None:
    """Checks, reading only metadata, that checkpoint `step` in `directory` has exactly the
    leaves and shapes of `abstract_state`; a ValueError lists every difference."""
    directory = paths.resolve(directory)
    manager = _read_only(directory)
    try:
        _check_state_matches(manager, directory, step, _named_leaves(abstract_state))
    finally:
        manager.close()


def _checkpoints_dir(path: str) -> str:
    """`path` itself, or `path/checkpoints` when `path` is a run's workdir."""
    nested = epath.Path(path) / "checkpoints"
    return os.fspath(nested) if nested.is_dir() else path


def load_subset(
    checkpoint_dir_or_workdir: str,
    step: int | None,
    target_params: Any,
    *,
    include: str = ".*",
    exclude: str | None = None,
) -> Any:
    """`target_params` with some leaves replaced by those of another run's checkpoint.

    The leaves whose flattened names (``video_encoder/block_0/...``) fully match
    `include` and not `exclude` are read from the saved state's ``params``
    (checkpoint `step`, default the latest), cast to the target leaf's dtype and
    placed with its sharding; the other leaves are returned untouched. Only the
    selected arrays are read. A ValueError names every selected weight missing
    from the checkpoint and every shape mismatch.
    """
    directory = _checkpoints_dir(paths.resolve(checkpoint_dir_or_workdir))
    if not epath.Path(directory).is_dir():
        raise FileNotFoundError(f"load_subset: no checkpoint directory at {directory}")
    manager = ocp.CheckpointManager(
        directory,
        item_handlers={STATE_ITEM: ocp.PyTreeCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True),
    )
    if step is None:
        step = manager.latest_step()
    if step is None or step not in manager.all_steps():
        raise FileNotFoundError(
            f"load_subset: no checkpoint for step {step} in {directory}; "
            f"steps: {sorted(manager.all_steps())}"
        )
    saved_tree = manager.item_metadata(step)[STATE_ITEM].tree
    if not isinstance(saved_tree, Mapping) or "params" not in saved_tree:
        raise ValueError(f"load_subset: checkpoint {directory} step {step} has no 'params' entry")
    saved = _named_leaves(saved_tree["params"])

    include_re = re.compile(include)
    exclude_re = re.compile(exclude) if exclude is not None else None
    target_leaves, treedef = jax.tree_util.tree_flatten_with_path(target_params)
    target_names = [param_name(path) for path, _ in target_leaves]
    selected = {
        name: leaf
        for name, (_, leaf) in zip(target_names, target_leaves, strict=True)
        if include_re.fullmatch(name) and not (exclude_re and exclude_re.fullmatch(name))
    }
    if not selected:
        raise ValueError(
            f"load_subset: include={include!r} exclude={exclude!r} select no target parameter"
        )
    missing, shapes = _mismatches(saved, selected)
    if missing or shapes:
        raise ValueError(
            f"load_subset from {directory} step {step}:"
            + (f"\n  missing from the checkpoint: {missing}" if missing else "")
            + (f"\n  shape mismatches: {shapes}" if shapes else "")
        )

    def restore_target(path, saved_leaf):
        name = param_name(path)
        if name.startswith("params/") and name[len("params/") :] in selected:
            leaf = selected[name[len("params/") :]]
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
        return ocp.PLACEHOLDER

    item = jax.tree_util.tree_map_with_path(restore_target, saved_tree)
    restore_args = jax.tree.map(
        lambda x: (
            ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype, global_shape=x.shape)
            if isinstance(x, jax.ShapeDtypeStruct)
            else ocp.PLACEHOLDER
        ),
        item,
    )
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            **{STATE_ITEM: ocp.args.PyTreeRestore(item=item, restore_args=restore_args)}
        ),
    )
    loaded = _named_leaves(restored[STATE_ITEM]["params"])
    manager.close()
    logging.info(
        "load_subset: %d of %d parameters from %s step %d: %s",
        len(selected),
        len(target_names),
        directory,
        step,
        sorted(selected),
    )
    new_leaves = [
        loaded[name] if name in selected else leaf
        for name, (_, leaf) in zip(target_names, target_leaves, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, new_leaves)
