"""The trainer: one readable loop from config to checkpoints, on 1 CPU or a pod.

`main(config, workdir)` is a sequence of named steps: `check_config`;
`set_up_input` (the prepared data, tokenizers, the training stream, the run's
length); `build_parts` (model, optimizer, the sharded state's shapes, the jitted
update step); the checkpoint to resume from, checked against them;
`build_evaluators`; `compile_train_step` (checked to fit in memory);
`init_or_restore`; only then `write_workdir` (log, config, the run's assets);
and `train_loop`, which logs through one `RunLog` (metrics.jsonl, TensorBoard,
the progress line). What these steps build from the config comes from
``run.py``, which the tools and the benchmarks share. Nothing but launch.py
imports this module.

Not here: the update step and what a run is built from (``run.py``), the losses
(``deepcoro_jax/losses.py``), optimizer components and schedules (``optim.py``),
checkpoint mechanics (``checkpoint.py``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from deepcoro_jax import console, paths
from deepcoro_jax.models import multitask
from deepcoro_jax.training import checkpoint, memory, run, sharding

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
MODES = ("train", "eval")


# ------------------------------------------------------------------------------ logging


class JsonlWriter:
    """One JSON object per logged step in a file (metrics.jsonl); process 0 only.

    Opening it for a run that starts at `start_step` drops the records of later
    steps left by an earlier attempt (a run killed after its last checkpoint),
    so every step appears once.
    """

    def __init__(self, path: str, start_step: int):
        path = paths.Path(path)  # a local file or a URL (gs://...)
        kept = []
        if path.exists():
            lines = path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if _logged_step(line) <= start_step]
        path.write_text("".join(kept))
        self._file = path.open("a")  # kept open for the run

    def write(self, step: int, values: Mapping[str, float]) -> None:
        record = {"step": int(step), **{k: float(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinite for a line cut short by a killed run."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


class RunLog:
    """Where a run's numbers go: metrics.jsonl (process 0), TensorBoard, and the
    terminal's progress line, with the throughput of the steps since the last one
    (videos/s, step time, data wait) and, on devices of known peak, the MFU."""

    def __init__(
        self,
        workdir: str,
        first_step: int,
        total_steps: int,
        *,
        global_batch: int,
        videos_per_example: int,
        flops_per_example: float,
        term_names: list[str],
    ):
        from clu import metric_writers  # TensorFlow's summary writer

        is_main = jax.process_index() == 0
        metrics_file = os.path.join(workdir, METRICS_FILE)
        self._jsonl = JsonlWriter(metrics_file, first_step) if is_main else None
        self._tensorboard = metric_writers.create_default_writer(
            workdir, just_logging=not is_main, asynchronous=False
        )
        self._first_step, self._total_steps = first_step, total_steps
        self._global_batch, self._videos_per_example = global_batch, videos_per_example
        self._flops_per_example = flops_per_example
        self._peak = run.peak_flops(jax.devices()[0])
        self._term_names = term_names
        self._prefix = f"[process {jax.process_index()}] " if jax.process_count() > 1 else ""
        self.restart_clock(first_step)

    def restart_clock(self, step: int) -> None:
        """Throughput is measured from now, over the steps after `step`."""
        self._window_start, self._window_step, self._data_wait = time.perf_counter(), step, 0.0

    def waited_for_data(self, seconds: float) -> None:
        self._data_wait += seconds

    def write(self, step: int, values: Mapping[str, float]) -> None:
        if self._jsonl:
            self._jsonl.write(step, values)
        self._tensorboard.write_scalars(step, values)

    def progress(self, step: int, metrics: Mapping[str, float], results: Mapping[str, float]):
        """Logs a step's metrics and evaluator `results` with the throughput, and prints
        its progress line."""
        steps = step - self._window_step
        seconds = (time.perf_counter() - self._window_start) / steps
        values = {
            **metrics,
            "videos_per_s": self._global_batch / seconds,
            "step_time_s": seconds,
            "data_wait_s": self._data_wait / steps,
            **results,
        }
        if self._peak:
            flops = self._flops_per_example * self._global_batch / seconds
            values["mfu"] = flops / (self._peak * jax.device_count())
        self.write(step, values)
        terms = "  ".join(f"{n} {values[f'loss/{n}']:.4f}" for n in self._term_names)
        # A (re)start's first step includes one-off start-up (the first execution, the
        # shuffle buffer): no ETA from it alone.
        eta = (
            f"ETA {(self._total_steps - step) * seconds / 60:.1f} min"
            if step > self._first_step + 1
            else "first step, start-up included"
        )
        print(
            f"{self._prefix}step {step}/{self._total_steps}  loss {values['loss']:.6f}  {terms}  "
            f"{values['videos_per_s'] * self._videos_per_example:.1f} videos/s  {eta}",
            flush=True,
        )
        self.restart_clock(step)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        self._tensorboard.close()


# --------------------------------------------------------------------------------- main


def main(config: ml_collections.ConfigDict, workdir: str, mode: str = "train") -> dict:
    """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the last metrics.

    Evaluators (``config.evals``) run on their schedule, before the checkpoint of
    that step is saved, so the best checkpoint can be chosen by their metrics.
    mode='eval' runs every evaluator once on the latest checkpoint, logs the
    results at its step and returns them, without training.

    Nothing is written to `workdir` before the config, the data, a checkpoint to
    resume from and the compiled step's memory have been checked: a bad override
    or a mismatched checkpoint leaves the workdir as it was. A SIGTERM or SIGINT
    stops the loop at the step during which it came, which is saved first.
    """
    check_config(config, mode)
    # Resolved once here: nothing below (nor orbax's threads) sees a relative path.
    workdir = paths.resolve(workdir)
    config = paths.resolve_config(config)
    logging.info(
        "devices: %d (%d local) on %d processes",
        jax.device_count(),
        jax.local_device_count(),
        jax.process_count(),
    )
    mesh = sharding.make_mesh(tuple(tuple(a) for a in config.mesh))
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    resume_step = checkpoint.latest_step(checkpoint_dir)
    if mode == "eval" and resume_step is None:
        raise FileNotFoundError(f"mode='eval': no checkpoint in {checkpoint_dir}")

    for change in run.resolve_video_init(config, workdir if resume_step is not None else None):
        logging.info("video_init: the encoder takes the checkpoint's shape: %s", change)
    inputs = set_up_input(config, workdir, resuming=resume_step is not None)
    parts = build_parts(config, inputs, mesh)
    if resume_step is not None:  # checked before anything is written
        checkpoint.check_matches(checkpoint_dir, resume_step, parts.abstract_state)
    evaluators = build_evaluators(config, inputs, parts, mesh, workdir, mode)
    compiled_step = compile_train_step(parts, inputs, mesh) if mode == "train" else None
    ckpt = open_checkpointer(config, checkpoint_dir) if resume_step is not None else None
    state = init_or_restore(config, inputs, parts, ckpt, resume_step, mode)
    # Everything above checked the config, the data and the checkpoint: now write.
    write_workdir(config, inputs, workdir, mode)
    ckpt = ckpt or open_checkpointer(config, checkpoint_dir)  # makes its folder

    step = int(jax.device_get(state.step))
    log = RunLog(
        workdir,
        step,
        inputs.total_steps,
        global_batch=inputs.global_batch,
        videos_per_example=inputs.videos_per_example,
        flops_per_example=multitask.training_flops_per_example(
            parts.model,
            inputs.example_batch["video"].shape[1:],
            config.input.text_max_len,
            config.input.caption_max_len,
            mvm=run.uses_mvm(config),
        )["training"],
        term_names=run.loss_term_names(config),
    )
    try:
        if mode == "eval":
            results = run_evaluators(evaluators, state.params, step)
            log.write(step, results)
            return results
        return train_loop(config, state, compiled_step, inputs, mesh, evaluators, ckpt, log)
    finally:
        ckpt.close()
        log.close()


def check_config(config: ml_collections.ConfigDict, mode: str) -> None:
    """The checks that need nothing but the config and the mode."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {MODES}")
    if mode == "eval" and not config.evals:
        raise ValueError("mode='eval' runs config.evals, which is empty")
    for name in ("log_training_steps", "ckpt_steps", "keep_ckpts", "grad_accum_steps"):
        if config[name] < 1:
            raise ValueError(f"config.{name}={config[name]} must be at least 1")
    devices, accum_steps = jax.device_count(), config.grad_accum_steps
    if config.input.batch_size % (devices * accum_steps):
        raise ValueError(
            f"config.input.batch_size={config.input.batch_size} must divide by the device "
            f"count ({devices}) x grad_accum_steps ({accum_steps})"
        )
    if config.video_init_include not in run.VIDEO_INIT_INCLUDE:
        raise ValueError(
            f"config.video_init_include={config.video_init_include!r}: choose one of "
            f"{run.VIDEO_INIT_INCLUDE}"
        )


@dataclasses.dataclass(frozen=True)
class Input:
    """The training input and what is derived from it: tokenizers, shapes, durations."""

    data_dir: str
    caption_spec: str  # the tokenizers' specs (tokenizers.get_tokenizer)
    text_spec: str
    kept_assets: bool  # the tokenizers are the workdir's copies (a resumed run)
    train_iter: Any  # pipeline.TrainIterator: its position is checkpointed with the state
    example_batch: dict[str, jax.ShapeDtypeStruct]  # one example (batch dimension 1)
    global_batch: int
    videos_per_example: int  # 1, or a study's video slots
    total_steps: int
    warmup_steps: int


def set_up_input(config: ml_collections.ConfigDict, workdir: str, resuming: bool) -> Input:
    """The prepared data (made first for the synthetic recipe), the tokenizers and the
    sharded-per-process training stream, and the run's length in steps."""
    from input_pipeline import data_cache, dataset_format, pipeline

    data_dir = data_cache.resolve_data_dir(config.input, process_index=jax.process_index())
    # A run that has checkpoints keeps the tokenizers they were trained with (the workdir's
    # copies), whatever the data folder holds now; a new run takes the data's.
    kept = run.read_assets(workdir) if resuming else None
    if kept:
        caption_spec, text_spec = kept["caption_tokenizer"], kept["text_tokenizer"]
    else:
        caption_spec = run.tokenizer_spec(config.input.caption_tokenizer, data_dir)
        text_spec = run.tokenizer_spec(config.input.text_tokenizer, data_dir, config.text_init)
    global_batch = config.input.batch_size
    keys = ["video", "text_ids", "text_mask", "caption_in", "caption_out", "caption_mask"]
    findings = run.positive_ids_key(config) == "findings_id"  # contrastive positives by findings
    tasks = run.location_tasks(config)
    studies = config.input.study_videos is not None
    if studies and set(tasks) != {"cap"}:
        logging.warning(
            "config.loss.locca_tasks: study examples carry no lesion boxes (the location "
            "tasks are per video): every study is captioned")
    if studies or set(tasks) == {"cap"}:
        caption_pp = f"tokenize_caption({config.input.caption_max_len}, tokenizer='{caption_spec}')"
    else:  # LocCa's tasks, one drawn per example (which one: logged per task)
        caption_pp = (
            f"locca_task({config.input.caption_max_len}, tasks={tasks!r}, "
            f"num_bins={config.model.location_bins}, tokenizer='{caption_spec}')"
        )
        keys.append("locca_task")
    pp = (
        f"{config.input.video_pp}|tokenize({config.input.text_max_len}, tokenizer='{text_spec}')"
        f"|{caption_pp}"
        + ("|findings_id()" if findings else "")
        + f"|keep({', '.join(repr(k) for k in keys + ['findings_id'] * findings)})"
    )
    train_iter = pipeline.TrainIterator(
        data_dir,
        config.input.split,
        pp,
        global_batch // jax.process_count(),
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        study_videos=config.input.study_videos,
        # The report's fields repeat in every video slot of a study: keep one.
        batch_map=(
            lambda b: {
                k: v if k in ("video", pipeline.VIDEO_MASK_KEY) else v[:, 0] for k, v in b.items()
            }
        ) if studies else None,
    )
    example_batch = {
        k: jax.ShapeDtypeStruct((1, *s.shape[1:]), s.dtype.as_numpy_dtype)
        for k, s in train_iter.element_spec.items()
    }
    pipeline.check_video_shape(example_batch["video"].shape, config)

    # An epoch of studies is not known: the split counts videos.
    steps_per_epoch = (
        None
        if studies
        else dataset_format.num_examples(data_dir, config.input.split) / global_batch
    )
    durations = dict(steps_per_epoch=steps_per_epoch, global_batch=global_batch)
    total_steps = run.resolve_steps("total", config, **durations)
    if not total_steps:
        raise ValueError("config: set one of total_steps, total_epochs, total_examples (> 0)")
    warmup_steps = run.resolve_steps(
        "warmup", config.optim.schedule, **durations, total_steps=total_steps
    )
    return Input(
        data_dir=data_dir,
        caption_spec=caption_spec,
        text_spec=text_spec,
        kept_assets=bool(kept),
        train_iter=train_iter,
        example_batch=example_batch,
        global_batch=global_batch,
        videos_per_example=example_batch["video"].shape[1] if studies else 1,
        total_steps=total_steps,
        warmup_steps=warmup_steps or 0,
    )


@dataclasses.dataclass(frozen=True)
class Parts:
    """The model, and the train state's initialiser, sharded shapes and update step."""

    model: multitask.MultitaskModel
    init_fn: Callable[[jax.Array], run.TrainState]
    shardings: Any  # the state's NamedShardings
    abstract_state: Any  # its shapes, with their shardings
    train_step: Callable  # jitted, the state donated


def build_parts(config: ml_collections.ConfigDict, inputs: Input, mesh: Mesh) -> Parts:
    caption_tok = run.caption_tokenizer(config, inputs.caption_spec)
    model = run.build_model(config, caption_tok.vocab_size, caption_tok.pad_id)
    logging.info(
        "attention kernel: %s; encoder remat: %s (blocks: %s)",
        model.encoder.attention_impl,
        model.encoder.remat,
        "all" if model.encoder.remat_blocks < 0 else model.encoder.remat_blocks,
    )
    params_shape = jax.eval_shape(
        lambda r: model.init(
            {"params": r, "dropout": r, "mask": r, "parallel": r},
            {k: jnp.zeros(s.shape, s.dtype) for k, s in inputs.example_batch.items()},
            train=False,
            mvm=True,
        )["params"],
        jax.random.key(0),
    )
    tx, schedules = run.make_optimizer(
        config, params_shape, inputs.total_steps, inputs.warmup_steps
    )
    init_fn = run.create_train_state(
        model, tx, inputs.example_batch, with_teacher=run.uses_teacher(config)
    )
    abstract_state = jax.eval_shape(init_fn, jax.random.PRNGKey(config.seed))
    shardings = run.state_shardings(abstract_state, config, mesh)
    train_step = jax.jit(
        run.make_train_step(model, tx, config, mesh, schedules),
        in_shardings=(shardings, sharding.batch_sharding(mesh)),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    return Parts(
        model=model,
        init_fn=init_fn,
        shardings=shardings,
        abstract_state=jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            abstract_state,
            shardings,
        ),
        train_step=train_step,
    )


def build_evaluators(config, inputs: Input, parts: Parts, mesh: Mesh, workdir: str, mode: str):
    """The evaluators of config.evals, handed predict functions and the spec of their
    input, not the model or the config; built before compiling, so that a bad entry
    stops the run at once."""
    from evaluators import common as eval_common

    eval_spec = run.eval_spec(
        config,
        parts.model,
        mesh,
        data_dir=inputs.data_dir,
        workdir=workdir,
        text_tokenizer_spec=inputs.text_spec,
        caption_tokenizer_spec=inputs.caption_spec,
    )
    evaluators = eval_common.build_evaluators(
        config.evals, run.predict_fns(parts.model, mesh), eval_spec
    )
    if mode == "eval" and not evaluators:
        raise ValueError(
            f"mode='eval': every evaluator of config.evals left out for {inputs.data_dir}"
        )
    return evaluators


def compile_train_step(parts: Parts, inputs: Input, mesh: Mesh):
    """The train step compiled ahead of time for the global batch, and checked to fit in
    the devices' memory (memory.StepTooLarge otherwise)."""
    is_main = jax.process_index() == 0
    if is_main:
        print("compiling the train step...", flush=True)
    start = time.perf_counter()
    batch_sharding = sharding.batch_sharding(mesh)
    abstract_batch = {
        k: jax.ShapeDtypeStruct(
            (inputs.global_batch, *s.shape[1:]), s.dtype, sharding=batch_sharding
        )
        for k, s in inputs.example_batch.items()
    }
    compiled = parts.train_step.lower(parts.abstract_state, abstract_batch).compile()
    step_memory = memory.check_fits(compiled, jax.local_devices(), what="the train step")
    if is_main:
        print(
            f"compiled in {time.perf_counter() - start:.1f} s; {memory.describe(step_memory)}",
            flush=True,
        )
    return compiled


def open_checkpointer(config: ml_collections.ConfigDict, checkpoint_dir: str):
    """The run's checkpointer: config.keep_ckpts latest, and config.keep_best by
    config.best_metric ('name' or 'name:min')."""
    best_name, _, best_mode = config.best_metric.partition(":")
    return checkpoint.Checkpointer(
        checkpoint_dir,
        keep=config.keep_ckpts,
        keep_best=config.keep_best,
        best_metric=best_name or None,
        best_mode=best_mode or "max",
    )


def init_or_restore(config, inputs: Input, parts: Parts, ckpt, resume_step, mode):
    """The train state, restored by `ckpt` from `resume_step` (with the input's position,
    when training), or else initialised (with weights from config.init when set)."""
    if resume_step is not None:
        data_iterator = inputs.train_iter if mode == "train" else None
        state = ckpt.restore(parts.abstract_state, step=resume_step, data_iterator=data_iterator)
        logging.info("restored step %d", resume_step)
        return state
    state = jax.jit(parts.init_fn, out_shardings=parts.shardings)(jax.random.PRNGKey(config.seed))
    return run.initial_weights(state, config, parts.shardings, parts.model)


def write_workdir(config: ml_collections.ConfigDict, inputs: Input, workdir: str, mode: str):
    """The log file, and (training) the resolved config and, for a new run, its assets:
    the tokenizers and the prepared data's format, so that later uses need only the
    workdir."""
    from input_pipeline import dataset_format

    is_main = jax.process_index() == 0
    console.attach(workdir, console.LOG_FILE if is_main else f"log.{jax.process_index()}.txt")
    if not is_main:
        return
    paths.Path(workdir).mkdir(parents=True, exist_ok=True)
    if mode != "train":  # eval mode leaves the config the checkpoints were trained with
        return
    (paths.Path(workdir) / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))
    if not inputs.kept_assets:
        run.write_assets(
            workdir,
            caption_spec=inputs.caption_spec,
            text_spec=inputs.text_spec,
            data_dir=inputs.data_dir,
            dataset_meta=dataset_format.load_meta(inputs.data_dir).to_json(),
            config=config,
        )


def train_loop(
    config, state, compiled_step, inputs: Input, mesh: Mesh, evaluators, ckpt, log: RunLog
) -> dict:
    """Steps from the state's step to inputs.total_steps: logs every
    config.log_training_steps, runs the evaluators that are due, saves every
    config.ckpt_steps (and the last step, and the step a stop was requested at).
    Returns the last step's metrics with the latest results of every evaluator."""
    from input_pipeline import pipeline

    step = first_step = int(jax.device_get(state.step))
    total_steps, train_iter = inputs.total_steps, inputs.train_iter
    last: dict[str, float] = {}
    evaluated: dict[str, float] = {}  # the latest results of every evaluator
    pending: tuple[int, Any] | None = None  # a step's metrics, checked while the next one runs

    if first_step == 0 and any(e.at_start for e in evaluators):
        results = run_evaluators([e for e in evaluators if e.at_start], state.params, step)
        evaluated.update(results)
        log.write(step, results)
    log.restart_clock(step)  # the first ETA counts neither compilation nor evaluations

    with checkpoint.PreemptionGuard() as guard, jax.transfer_guard("disallow"):
        while step < total_steps:
            wait_start = time.perf_counter()
            local_batch = next(train_iter)
            log.waited_for_data(time.perf_counter() - wait_start)
            with jax.transfer_guard_host_to_device("allow"):  # the one deliberate copy
                batch = pipeline.global_batch(local_batch, mesh, sharding.DATA_AXES)
            state, metrics = compiled_step(state, batch)
            step += 1
            if pending is not None:
                last = fetch_metrics(*pending)
                pending = None
            save_due = step % config.ckpt_steps == 0 or step == total_steps
            due = [e for e in evaluators if e.due(step, total_steps)]
            log_now = step % config.log_training_steps == 0 or step in (1, total_steps) or due
            if not (save_due or log_now or guard.requested):
                pending = (step, metrics)
                continue
            last = fetch_metrics(step, metrics)
            step_results = run_evaluators(due, state.params, step) if due else {}
            evaluated.update(step_results)
            if log_now:
                log.progress(step, last, step_results)
            # Read once, after everything above that waits (the fetch, the evaluators):
            # a signal that came during any of it stops at this step, which is saved.
            stop = guard.requested
            if save_due or stop:
                ckpt.save(step, state, data_iterator=train_iter, metrics={**last, **evaluated})
            if stop:
                ckpt.wait()
                if step not in ckpt.all_steps():
                    raise RuntimeError(f"stop requested: the checkpoint of step {step} failed")
                logging.warning(
                    "stop requested: saved step %d in %s, exiting", step, ckpt.directory
                )
                break
    train_iter.close()  # its reader threads stop now, not at interpreter exit
    logging.info("trained steps %d..%d", first_step, step)
    return {**last, **evaluated}


def fetch_metrics(step: int, metrics: Mapping[str, jax.Array]) -> dict[str, float]:
    """A step's metrics on the host, checked finite: the loop's one wait for the device."""
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    run.check_finite(values, step)
    return values


def run_evaluators(evaluators: list, params: Any, step: int) -> dict[str, float]:
    """Runs `evaluators` on `params`; their results as ``<name>/<metric>``, plus
    ``<name>/seconds``. Prints each one's headline metrics (its ``HEADLINE``)."""
    results = {}
    for evaluator in evaluators:
        start = time.perf_counter()
        with jax.transfer_guard("allow"):  # evaluators move batches and results
            metrics = evaluator.run(params, step)
        seconds = time.perf_counter() - start
        results.update({f"{evaluator.name}/{k}": float(v) for k, v in metrics.items()})
        results[f"{evaluator.name}/seconds"] = seconds
        shown = "  ".join(f"{k} {metrics[k]:.4f}" for k in evaluator.HEADLINE if k in metrics)
        if jax.process_index() == 0:
            print(f"eval {evaluator.name} @ step {step}: {shown}  ({seconds:.1f} s)", flush=True)
    return results


if __name__ == "__main__":
    sys.exit("run training with launch.py")
