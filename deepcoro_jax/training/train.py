"""The trainer: one readable loop from config to checkpoints, on 1 CPU or a pod.

`main(config, workdir)` reads top to bottom in sections: paths; mesh; input;
durations; model and optimizer; the train state's shapes and shardings; the
jitted train step; the checkpoint to resume from, checked against the state;
the evaluators; the step compiled and checked to fit in memory; the state,
restored or initialised (or from another run); only then the workdir (config,
assets, log); the loop. What those sections build from the config (the model, the
optimizer, the state, the update step, durations) comes from ``run.py``, which
the tools and the benchmarks share; here are only the loop and its logging
(`RunLog`: metrics.jsonl by `JsonlWriter`, TensorBoard, the progress line;
`fetch_metrics`, `run_evaluators`). Nothing but launch.py imports
this module.

Not here: the update step and what a run is built from (``run.py``), the losses
(``deepcoro_jax/losses.py``), optimizer components and schedules (``optim.py``),
checkpoint mechanics (``checkpoint.py``).
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

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
    from deepcoro_jax.domain import tokenizers
    from evaluators import common as eval_common
    from input_pipeline import data_cache, dataset_format, pipeline

    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {MODES}")
    if mode == "eval" and not config.evals:
        raise ValueError("mode='eval' runs config.evals, which is empty")
    for name in ("log_training_steps", "ckpt_steps", "keep_ckpts", "grad_accum_steps"):
        if config[name] < 1:
            raise ValueError(f"config.{name}={config[name]} must be at least 1")

    # ------------------------------------------------------------------ paths
    # Resolved once here: nothing below (nor orbax's threads) sees a relative path.
    workdir = paths.resolve(workdir)
    config = paths.resolve_config(config)
    is_main = jax.process_index() == 0
    logging.info(
        "devices: %d (%d local) on %d processes",
        jax.device_count(),
        jax.local_device_count(),
        jax.process_count(),
    )

    # ------------------------------------------------------------------- mesh
    mesh = sharding.make_mesh(tuple(tuple(a) for a in config.mesh))

    # ------------------------------------------------------------------ input
    data_dir = data_cache.resolve_data_dir(config.input, process_index=jax.process_index())
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    resume_step = checkpoint.latest_step(checkpoint_dir)
    # A run that has checkpoints keeps the tokenizers they were trained with (the workdir's
    # copies), whatever the data folder holds now; a new run takes the data's.
    kept = run.read_assets(workdir) if resume_step is not None else None
    if kept:
        caption_spec, text_spec = kept["caption_tokenizer"], kept["text_tokenizer"]
    else:
        caption_spec = run.tokenizer_spec(config.input.caption_tokenizer, data_dir)
        text_spec = run.tokenizer_spec(config.input.text_tokenizer, data_dir, config.text_init)
    caption_tok = tokenizers.get_tokenizer(caption_spec)
    global_batch = config.input.batch_size
    accum_steps = config.grad_accum_steps
    if global_batch % (jax.device_count() * accum_steps):
        raise ValueError(
            f"config.input.batch_size={global_batch} must divide by the device count "
            f"({jax.device_count()}) x grad_accum_steps ({accum_steps})"
        )
    pp = (
        f"{config.input.video_pp}|tokenize({config.input.text_max_len}, tokenizer='{text_spec}')"
        f"|tokenize_caption({config.input.caption_max_len}, tokenizer='{caption_spec}')"
        "|keep('video', 'text_ids', 'text_mask', 'caption_in', 'caption_out', 'caption_mask')"
    )
    train_ds = pipeline.make_train_dataset(
        data_dir,
        config.input.split,
        pp,
        global_batch // jax.process_count(),
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        shuffle_buffer=config.input.shuffle_buffer,
        study_videos=config.input.study_videos,
    )
    if config.input.study_videos is not None:
        # The report's fields repeat in every video slot of a study: keep one.
        train_ds = train_ds.map(
            lambda b: {
                k: v if k in ("video", pipeline.VIDEO_MASK_KEY) else v[:, 0] for k, v in b.items()
            }
        )
    train_iter = pipeline.InputIterator(train_ds)
    # One example's shapes (per-process batch dimension replaced by 1).
    example_batch = {
        k: jax.ShapeDtypeStruct((1, *s.shape[1:]), s.dtype.as_numpy_dtype)
        for k, s in train_ds.element_spec.items()
    }
    pipeline.check_video_shape(example_batch["video"].shape, config)

    # -------------------------------------------------------------- durations
    if config.input.study_videos is None:
        steps_per_epoch = dataset_format.num_examples(data_dir, config.input.split) / global_batch
    else:
        steps_per_epoch = None  # the split counts videos; an epoch of studies is not known
    durations = dict(steps_per_epoch=steps_per_epoch, global_batch=global_batch)
    total_steps = run.resolve_steps("total", config, **durations)
    if not total_steps:
        raise ValueError("config: set one of total_steps, total_epochs, total_examples (> 0)")
    warmup_steps = run.resolve_steps(
        "warmup", config.optim.schedule, **durations, total_steps=total_steps
    )

    # ---------------------------------------------------- model and optimizer
    model = run.build_model(config, caption_tok.vocab_size, caption_tok.pad_id)
    params_shape = jax.eval_shape(
        lambda r: model.init(
            {"params": r, "dropout": r, "mask": r, "parallel": r},
            {k: jnp.zeros(s.shape, s.dtype) for k, s in example_batch.items()},
            train=False,
            mvm=True,
        )["params"],
        jax.random.key(0),
    )
    tx, schedules = run.make_optimizer(config, params_shape, total_steps, warmup_steps or 0)

    # ---------------------------------------------- train state, born sharded
    init_fn = run.create_train_state(
        model, tx, example_batch, with_teacher=run.uses_teacher(config)
    )
    abstract_state = jax.eval_shape(init_fn, jax.random.PRNGKey(config.seed))
    shardings = run.state_shardings(abstract_state, config, mesh)

    # ------------------------------------------------------------ update step
    train_step = jax.jit(
        run.make_train_step(model, tx, config, mesh, schedules),
        in_shardings=(shardings, sharding.batch_sharding(mesh)),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    abstract_sharded = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract_state, shardings
    )

    # --------------------------------------- restore (checked before anything is written)
    best_name, _, best_mode = config.best_metric.partition(":")
    checkpoint_options = dict(
        keep=config.keep_ckpts,
        keep_best=config.keep_best,
        best_metric=best_name or None,
        best_mode=best_mode or "max",
    )
    if mode == "eval" and resume_step is None:
        raise FileNotFoundError(f"mode='eval': no checkpoint in {checkpoint_dir}")
    if resume_step is not None:
        checkpoint.check_matches(checkpoint_dir, resume_step, abstract_sharded)

    # ------------------------------------------------------------- evaluators
    # They get predict functions and the spec of their input, not the model or the config;
    # built before compiling, so that a bad config.evals entry stops the run at once.
    eval_spec = run.eval_spec(
        config,
        model,
        mesh,
        data_dir=data_dir,
        workdir=workdir,
        text_tokenizer_spec=text_spec,
        caption_tokenizer_spec=caption_spec,
    )
    evaluators = eval_common.build_evaluators(
        config.evals, run.predict_fns(model, mesh), eval_spec
    )
    if mode == "eval" and not evaluators:
        raise ValueError(f"mode='eval': every evaluator of config.evals left out for {data_dir}")

    # ----------------------------------------- compile, and check that the step fits
    compiled_step = None
    if mode == "train":
        if is_main:
            print("compiling the train step...", flush=True)
        compile_start = time.perf_counter()
        abstract_batch = {
            k: jax.ShapeDtypeStruct(
                (global_batch, *s.shape[1:]), s.dtype, sharding=sharding.batch_sharding(mesh)
            )
            for k, s in example_batch.items()
        }
        compiled_step = train_step.lower(abstract_sharded, abstract_batch).compile()
        step_memory = memory.check_fits(compiled_step, jax.local_devices(), what="the train step")
        if is_main:
            print(
                f"compiled in {time.perf_counter() - compile_start:.1f} s; "
                f"{memory.describe(step_memory)}",
                flush=True,
            )

    # ----------------------------------------------------------- state
    ckpt = None
    if resume_step is not None:
        ckpt = checkpoint.Checkpointer(checkpoint_dir, **checkpoint_options)
        data_iterator = train_iter if mode == "train" else None
        state = ckpt.restore(abstract_sharded, step=resume_step, data_iterator=data_iterator)
        logging.info("restored step %d", resume_step)
    else:
        state = jax.jit(init_fn, out_shardings=shardings)(jax.random.PRNGKey(config.seed))
        state = run.initial_weights(state, config, shardings)

    # ------------------------------------------------------------------ the workdir
    # Everything above checked the config, the data and the checkpoint: now write.
    console.attach(workdir, console.LOG_FILE if is_main else f"log.{jax.process_index()}.txt")
    if is_main:
        paths.Path(workdir).mkdir(parents=True, exist_ok=True)
        if mode == "train":  # eval mode leaves the config the checkpoints were trained with
            (paths.Path(workdir) / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))
        if mode == "train" and not kept:
            run.write_assets(
                workdir,
                caption_spec=caption_spec,
                text_spec=text_spec,
                data_dir=data_dir,
                dataset_meta=dataset_format.load_meta(data_dir).to_json(),
            )
    if ckpt is None:
        ckpt = checkpoint.Checkpointer(checkpoint_dir, **checkpoint_options)

    # ------------------------------------------------------------------- loop
    step = first_step = int(jax.device_get(state.step))
    log = RunLog(
        workdir,
        first_step,
        total_steps,
        global_batch=global_batch,
        videos_per_example=(
            example_batch["video"].shape[1] if config.input.study_videos else 1
        ),
        flops_per_example=multitask.training_flops_per_example(
            model,
            example_batch["video"].shape[1:],
            config.input.text_max_len,
            config.input.caption_max_len,
            mvm=run.uses_mvm(config),
        )["training"],
        term_names=run.loss_term_names(config),
    )
    last: dict[str, float] = {}
    evaluated: dict[str, float] = {}  # the latest results of every evaluator
    pending: tuple[int, Any] | None = None  # a step's metrics, checked while the next one runs

    def evaluate(due: list[eval_common.Evaluator]) -> dict[str, float]:
        results = run_evaluators(due, state.params, step)
        evaluated.update(results)
        return results

    if mode == "eval" or (first_step == 0 and any(e.at_start for e in evaluators)):
        due = evaluators if mode == "eval" else [e for e in evaluators if e.at_start]
        results = evaluate(due)
        log.write(step, results)
        if mode == "eval":
            ckpt.close()
            log.close()
            return results

    log.restart_clock(step)  # the first ETA counts neither compilation nor evaluations
    try:
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
                step_results = evaluate(due) if due else {}
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
                        "stop requested: saved step %d in %s, exiting", step, checkpoint_dir
                    )
                    break
    finally:
        ckpt.close()
        log.close()
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
