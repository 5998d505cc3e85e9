"""The trainer: one readable loop from config to checkpoints, on 1 CPU or a pod.

`main(config, workdir)` reads top to bottom in sections: paths; mesh; input;
durations; model and optimizer; the train state's shapes and shardings; the
jitted train step; the checkpoint to resume from, checked against the state;
the step compiled and checked to fit in memory; the state, restored or
initialised (or from another run); evaluators; only then the workdir (config,
log); the loop. The functions
above `main` are what those sections call, and what the benchmarks and tests
reuse: `build_model`, `make_optimizer`, `create_train_state`,
`state_shardings`, `make_train_step`, `resolve_steps`, `check_finite`. They
import no TensorFlow: only `main` touches the input pipeline.

The train step is one jitted function of (state, batch): the composite forward
pass, the weighted sum of the contrastive (SigLIP or softmax), caption and MVM
losses (+ distillation from an EMA teacher when its weight is not 0),
gradients accumulated over micro-batches, clipping and the update, with the
state donated. Not here: the losses (``losses.py``), optimizer components and
schedules (``optim.py``), checkpoint mechanics (``checkpoint.py``).
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

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deepcoro_jax import checkpoint, console, losses, memory, optim, paths, sharding
from deepcoro_jax.models import multitask
from deepcoro_jax.models import mvm as mvm_lib

LOSS_TERMS = ("contrastive", "caption", "mvm", "distill")
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
DURATION_UNITS = ("steps", "examples", "epochs", "percent")  # in order of precedence
MODES = ("train", "eval")
# Nominal dense bf16 matmul peaks (FLOP/s) by exact `device_kind`, for the logged MFU.
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
}


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: updates applied so far
    params: Any
    opt_state: Any
    ema_params: Any  # the EMA teacher, or None when distillation is off
    rng: jax.Array  # raw uint32[2] base key; step keys are fold_in(rng, step)


class NonFiniteError(FloatingPointError):
    """A loss term or the gradient became NaN or infinite."""


# ----------------------------------------------------------------------------- durations


def resolve_steps(
    name: str,
    section: ml_collections.ConfigDict,
    *,
    steps_per_epoch: float | None,
    global_batch: int,
    total_steps: int | None = None,
) -> int | None:
    """Steps from ``<name>_steps``, ``_examples``, ``_epochs`` or ``_percent``; None if none is set.

    When several are set, the first of that order wins and the others are
    logged as ignored: a recipe states its duration in one unit, and a
    command-line override in a more explicit unit (``--config.total_steps=N``
    over the recipe's ``total_epochs``) takes over without clearing it.
    `steps_per_epoch` None means epochs are not defined for this input (an
    error if ``<name>_epochs`` is the unit used); percent is of `total_steps`.
    """
    given = {
        unit: section.get(f"{name}_{unit}")
        for unit in DURATION_UNITS
        if section.get(f"{name}_{unit}") is not None
    }
    if not given:
        return None
    if len(given) > 1:
        used, *ignored = given
        logging.warning(
            "config: %s_%s=%s sets the duration; ignored: %s",
            name,
            used,
            given[used],
            ", ".join(f"{name}_{u}={given[u]}" for u in ignored),
        )
    unit, value = next(iter(given.items()))
    if value < 0:
        raise ValueError(f"config: {name}_{unit}={value} must not be negative")
    if unit == "steps":
        return int(value)
    if unit == "epochs":
        if steps_per_epoch is None:
            raise ValueError(
                f"config: {name}_epochs is not defined for this input (study-level examples); "
                f"give {name}_steps or {name}_examples"
            )
        return int(math.ceil(value * steps_per_epoch))
    if unit == "examples":
        return int(math.ceil(value / global_batch))
    if total_steps is None:
        raise ValueError(f"config: {name}_percent needs the total duration")
    return int(round(value / 100 * total_steps))


# --------------------------------------------------------------------------------- model


def build_model(
    config: ml_collections.ConfigDict, vocab_size: int, pad_id: int
) -> multitask.MultitaskModel:
    """The multitask model described by ``config.model`` (and ``config.text_init``)."""
    m = config.model
    if len(m.patch_size) != 3:
        raise ValueError(f"config.model.patch_size={m.patch_size}: give (pt, ph, pw)")
    return multitask.make_model(
        vocab_size=vocab_size,
        size=m.size,
        text_hf_config=config.text_init or None,
        num_frames=m.num_frames,
        image_size=m.image_size,
        patch_size=tuple(m.patch_size),
        text_max_len=config.input.text_max_len,
        caption_max_len=config.input.caption_max_len,
        pad_id=pad_id,
        embed_dim=m.embed_dim,
        contrastive_tokens=m.contrastive_tokens,
        mask_type=m.mask_type,
        mask_ratio=m.mask_ratio,
        normalize_mvm_target=m.normalize_mvm_target,
        init_temperature=m.init_temperature,
        init_bias=m.init_bias,
        dropout=m.dropout,
        dtype=m.dtype,
        encoder_overrides=dict(m.encoder_overrides),
        text_overrides=dict(m.text_overrides),
        caption_decoder_overrides=dict(m.caption_decoder_overrides),
    )


def uses_mvm(config: ml_collections.ConfigDict) -> bool:
    """Whether the MVM term is on (a weight of exactly 0 switches masking off)."""
    weight = config.loss.weights.mvm
    return not (isinstance(weight, int | float) and weight == 0)


def uses_teacher(config: ml_collections.ConfigDict) -> bool:
    """Whether distillation from an EMA teacher is on (its weight is not exactly 0)."""
    weight = config.loss.weights.distill
    return not (isinstance(weight, int | float) and weight == 0)


def make_optimizer(
    config: ml_collections.ConfigDict, params, total_steps: int, warmup_steps: int
) -> tuple[optax.GradientTransformation, dict[str, optim.Schedule]]:
    """``config.optim``'s optax chain for `params` and each component's LR schedule."""
    o = config.optim
    schedule = {k: v for k, v in o.schedule.items() if not k.startswith("warmup_")}
    return optim.make_optimizer(
        params,
        total_steps=total_steps,
        lr=o.lr,
        wd=o.wd,
        components={k: dict(v) for k, v in o.components.items()},
        schedule={**schedule, "warmup_steps": warmup_steps},
        optimizer=o.optimizer,
        b2=o.b2,
        grad_clip_norm=o.grad_clip_norm,
    )


def create_train_state(
    model, tx: optax.GradientTransformation, example_batch: Mapping[str, Any], *, with_teacher: bool
) -> Callable[[jax.Array], TrainState]:
    """A function rng -> TrainState, to be jitted with the state's out_shardings.

    `example_batch` gives the shapes and dtypes of a batch (arrays or
    ShapeDtypeStructs; one example is enough): the zeros the model is
    initialised on are made inside the function, so no batch is captured.
    """
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in example_batch.items()}

    def init(rng):
        init_rng, state_rng = jax.random.split(rng)
        rngs = {"params": init_rng, "dropout": init_rng, "mask": init_rng, "parallel": init_rng}
        batch = {k: jnp.zeros(shape, dtype) for k, (shape, dtype) in shapes.items()}
        params = model.init(rngs, batch, train=False, mvm=True)["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            # A copy: the state is donated, so no buffer may appear in it twice.
            ema_params=jax.tree.map(jnp.copy, params) if with_teacher else None,
            rng=state_rng,
        )

    return init


def state_shardings(abstract_state, config: ml_collections.ConfigDict, mesh: Mesh):
    """NamedShardings of every leaf of the state, by ``config.sharding_rules``.

    The rules match the full names of the state's arrays: ``params/encoder/...``,
    ``opt_state/...``, ``ema_params/...``, ``step``, ``rng``.
    """
    rules = [tuple(r) for r in config.sharding_rules]
    return sharding.param_shardings(abstract_state, rules, mesh)


# --------------------------------------------------------------------------------- step


def _contrastive_loss(config, out, batch, mesh) -> jax.Array:
    kind = config.loss.positives
    if config.loss.contrastive == "sigmoid" and config.loss.sharded_contrastive:
        loss, _ = losses.sigmoid_loss_sharded(
            out["video_emb"],
            out["text_emb"],
            out["log_temperature"],
            out["bias"],
            mesh=mesh,
            axis_name=sharding.DATA_AXES,
            same_report_ids=batch["text_ids"] if kind == "same_report" else None,
        )
        return loss
    positives = losses.contrastive_positives(kind, batch["text_ids"])
    if config.loss.contrastive == "sigmoid":
        loss, _ = losses.sigmoid_loss(
            out["video_emb"], out["text_emb"], out["log_temperature"], out["bias"], positives
        )
        return loss
    if config.loss.contrastive == "softmax":
        loss, _ = losses.softmax_loss(
            out["video_emb"], out["text_emb"], out["log_temperature"], positives
        )
        return loss
    raise ValueError(f"config.loss.contrastive={config.loss.contrastive!r}: 'sigmoid' or 'softmax'")


def masked_tubelet_count(model: multitask.MultitaskModel, batch: Mapping[str, Any]) -> jax.Array:
    """Masked tubelets of the real videos of `batch`: the MVM normaliser (float32 scalar)."""
    video = batch["video"]
    grid = mvm_lib.tubelet_grid(video.shape[-4:], model.encoder.patch_size)
    mask_fn = multitask.MASK_FUNCTIONS[model.mask_type]
    _, masked = jax.eval_shape(lambda: mask_fn(jax.random.key(0), 1, grid, model.mask_ratio))
    per_video = masked.shape[1]
    if video.ndim == 6:  # studies [B, V, T, H, W, C]: only the real videos count
        num_videos = jnp.sum(batch["video_mask"].astype(jnp.float32))
    else:
        num_videos = jnp.float32(video.shape[0])
    return jnp.maximum(num_videos * per_video, 1.0)


def make_train_step(
    model,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    schedules: Mapping[str, Callable],
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """(state, batch) -> (state, metrics): one optimizer update over ``grad_accum_steps``.

    Accumulation splits the batch into k micro-batches (micro-batch i holds
    examples i, i+k, i+2k, ..., so every device works on each) and sums their
    gradients. The caption, MVM and distillation terms are sums over tokens or
    tubelets normalised by the counts of the WHOLE batch, so they equal one
    large step exactly. The contrastive term does not decompose: each video is
    compared only with the reports of its own micro-batch (fewer negatives),
    and the mean over micro-batches is used; with k=1 every term is exact.
    Each micro-batch i draws its dropout and MVM masks from
    ``fold_in(fold_in(state.rng, state.step), i)``.

    The EMA teacher (when the distill weight is not 0) sees the same rngs as
    the student and is updated once per step, after the parameters.
    """
    k = config.grad_accum_steps
    with_mvm, with_teacher = uses_mvm(config), uses_teacher(config)
    weights = config.loss.weights
    label_smoothing = config.loss.label_smoothing
    distill_temperature = config.loss.distill_temperature if with_teacher else None
    ema_decay = config.loss.ema_decay if with_teacher else None
    micro_sharding = NamedSharding(mesh, P(None, sharding.DATA_AXES))
    # The teacher's caption logits depend on the MVM mask only when the caption
    # decoder reads the visible tokens.
    teacher_mvm = with_mvm and model.contrastive_tokens == "masked"

    def loss_fn(params, teacher_params, batch, rng, counts, step):
        rngs = dict(zip(("dropout", "mask", "parallel"), jax.random.split(rng, 3), strict=True))
        out, _ = model.apply({"params": params}, batch, train=True, mvm=with_mvm, rngs=rngs)
        _, caption_aux = losses.caption_loss(
            out["caption_logits"], batch["caption_out"], batch["caption_mask"], label_smoothing
        )
        terms = {
            "contrastive": _contrastive_loss(config, out, batch, mesh) / k,
            "caption": caption_aux["loss_sum"] / counts["caption"],
        }
        if with_mvm:
            _, mvm_aux = losses.mvm_loss(out["mvm_pred"], out["mvm_target"], out["mvm_mask"])
            terms["mvm"] = mvm_aux["loss_sum"] / counts["mvm"]
        if with_teacher:
            teacher_out, _ = model.apply(
                {"params": teacher_params}, batch, train=True, mvm=teacher_mvm, rngs=rngs
            )
            _, distill_aux = losses.distillation_loss(
                out["caption_logits"],
                teacher_out["caption_logits"],
                distill_temperature,
                mask=batch["caption_mask"],
            )
            kl_sum = distill_aux["kl"] * distill_aux["num_examples"]
            terms["distill"] = distill_temperature**2 * kl_sum / counts["caption"]
        weighted = {n: optim.loss_weight(weights[n], step) * v for n, v in terms.items()}
        return sum(weighted.values()), (terms, weighted)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    term_names = loss_term_names(config)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        rng = jax.random.fold_in(state.rng, state.step)
        counts = {"caption": jnp.maximum(jnp.sum(batch["caption_mask"]), 1).astype(jnp.float32)}
        if with_mvm:
            counts["mvm"] = masked_tubelet_count(model, batch)

        def micro_grads(micro_batch, index):
            (_, (terms, weighted)), grads = grad_fn(
                state.params,
                state.ema_params,
                micro_batch,
                jax.random.fold_in(rng, index),
                counts,
                state.step,
            )
            return grads, terms, weighted

        if k == 1:
            # No loop around a single micro-batch: XLA optimises a loop body less
            # (on CPU the convolutions' gradients stay in slow layouts there: the
            # conv stem's step ran 13x slower inside a one-iteration scan).
            grads, terms, weighted = micro_grads(batch, 0)
        else:

            def split(x):
                micro = x.reshape(x.shape[0] // k, k, *x.shape[1:])  # [B/k, k, ...]
                return jnp.swapaxes(micro, 0, 1)  # [k, B/k, ...]: micro-batch i = examples i::k

            micro_batches = jax.lax.with_sharding_constraint(
                jax.tree.map(split, batch), micro_sharding
            )

            def accumulate(carry, inputs):
                return jax.tree.map(jnp.add, carry, micro_grads(*inputs)), None

            zero_terms = {n: jnp.zeros((), jnp.float32) for n in term_names}
            init = (jax.tree.map(jnp.zeros_like, state.params), zero_terms, dict(zero_terms))
            (grads, terms, weighted), _ = jax.lax.scan(
                accumulate, init, (micro_batches, jnp.arange(k))
            )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = state.ema_params
        if with_teacher:
            ema_params = jax.tree.map(
                lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema_params, params
            )
        metrics = {
            "loss": sum(weighted.values()),
            **{f"loss/{n}": v for n, v in terms.items()},
            **{f"loss_weighted/{n}": v for n, v in weighted.items()},
            "l2_grads": optax.global_norm(grads),
            "l2_params": optax.global_norm(params),
            "l2_updates": optax.global_norm(updates),
            "temperature": jnp.exp(params["log_temperature"]),
            "bias": params["bias"],
            **{f"lr/{n}": fn(state.step) for n, fn in schedules.items()},
        }
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params
        )
        return new_state, metrics

    return train_step


def loss_term_names(config: ml_collections.ConfigDict) -> list[str]:
    """The loss terms a run with `config` computes, in LOSS_TERMS order."""
    on = {"contrastive": True, "caption": True, "mvm": uses_mvm(config)}
    on["distill"] = uses_teacher(config)
    return [name for name in LOSS_TERMS if on[name]]


def check_finite(metrics: Mapping[str, Any], step: int) -> None:
    """Raises NonFiniteError naming every loss term (or the gradient) that is not finite."""
    bad = [
        name
        for name in sorted(metrics)
        if (name == "loss" or name.startswith("loss/") or name == "l2_grads")
        and not np.isfinite(metrics[name])
    ]
    if bad:
        terms = ", ".join(
            f"the gradient (l2_grads = {metrics[n]})" if n == "l2_grads" else f"{n} = {metrics[n]}"
            for n in bad
        )
        raise NonFiniteError(
            f"non-finite training at step {step}: {terms}; stopped before any checkpoint "
            "of this state was written"
        )


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


def peak_flops(device: jax.Device) -> float | None:
    """The nominal dense bf16 peak of `device` (FLOP/s), or None when unknown (e.g. CPU)."""
    return PEAK_FLOPS.get(getattr(device, "device_kind", ""))


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
    from clu import metric_writers

    from deepcoro_jax import tokenizers
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
    caption_spec = tokenizer_spec(config.input.caption_tokenizer, data_dir)
    caption_tok = tokenizers.get_tokenizer(caption_spec)
    text_spec = tokenizer_spec(config.input.text_tokenizer, data_dir, config.text_init)
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
    check_video_shape(example_batch["video"].shape, config)

    # -------------------------------------------------------------- durations
    if config.input.study_videos is None:
        steps_per_epoch = dataset_format.num_examples(data_dir, config.input.split) / global_batch
    else:
        steps_per_epoch = None  # the split counts videos; an epoch of studies is not known
    durations = dict(steps_per_epoch=steps_per_epoch, global_batch=global_batch)
    total_steps = resolve_steps("total", config, **durations)
    if not total_steps:
        raise ValueError("config: set one of total_steps, total_epochs, total_examples (> 0)")
    warmup_steps = resolve_steps(
        "warmup", config.optim.schedule, **durations, total_steps=total_steps
    )

    # ---------------------------------------------------- model and optimizer
    model = build_model(config, caption_tok.vocab_size, caption_tok.pad_id)
    params_shape = jax.eval_shape(
        lambda r: model.init(
            {"params": r, "dropout": r, "mask": r, "parallel": r},
            {k: jnp.zeros(s.shape, s.dtype) for k, s in example_batch.items()},
            train=False,
            mvm=True,
        )["params"],
        jax.random.key(0),
    )
    tx, schedules = make_optimizer(config, params_shape, total_steps, warmup_steps or 0)

    # ---------------------------------------------- train state, born sharded
    init_fn = create_train_state(model, tx, example_batch, with_teacher=uses_teacher(config))
    abstract_state = jax.eval_shape(init_fn, jax.random.PRNGKey(config.seed))
    shardings = state_shardings(abstract_state, config, mesh)

    # ------------------------------------------------------------ update step
    train_step = jax.jit(
        make_train_step(model, tx, config, mesh, schedules),
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
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    resume_step = checkpoint.latest_step(checkpoint_dir)
    if mode == "eval" and resume_step is None:
        raise FileNotFoundError(f"mode='eval': no checkpoint in {checkpoint_dir}")
    if resume_step is not None:
        checkpoint.check_matches(checkpoint_dir, resume_step, abstract_sharded)

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
        state = _initial_weights(state, config, shardings)

    # ------------------------------------------------------------- evaluators
    eval_ctx = eval_common.EvalContext(
        model=model,
        config=config,
        mesh=mesh,
        data_dir=data_dir,
        workdir=workdir,
        text_tokenizer_spec=text_spec,
        caption_tokenizer_spec=caption_spec,
    )
    evaluators = eval_common.build_evaluators(config.evals, eval_ctx)
    if mode == "eval" and not evaluators:
        raise ValueError(f"mode='eval': every evaluator of config.evals left out for {data_dir}")

    # ------------------------------------------------------------------ the workdir
    # Everything above checked the config, the data and the checkpoint: now write.
    console.attach(workdir, console.LOG_FILE if is_main else f"log.{jax.process_index()}.txt")
    if is_main:
        paths.Path(workdir).mkdir(parents=True, exist_ok=True)
        if mode == "train":  # eval mode leaves the config the checkpoints were trained with
            (paths.Path(workdir) / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))
    if ckpt is None:
        ckpt = checkpoint.Checkpointer(checkpoint_dir, **checkpoint_options)

    # ------------------------------------------------------------------- loop
    step = first_step = int(jax.device_get(state.step))
    writer = JsonlWriter(os.path.join(workdir, METRICS_FILE), first_step) if is_main else None
    tb_writer = metric_writers.create_default_writer(
        workdir, just_logging=not is_main, asynchronous=False
    )
    videos_per_example = example_batch["video"].shape[1] if config.input.study_videos else 1
    flops = multitask.training_flops_per_example(
        model,
        example_batch["video"].shape[1:],
        config.input.text_max_len,
        config.input.caption_max_len,
        mvm=uses_mvm(config),
    )["training"]
    peak = peak_flops(jax.devices()[0])
    prefix = f"[process {jax.process_index()}] " if jax.process_count() > 1 else ""
    term_names = loss_term_names(config)
    last: dict[str, float] = {}
    evaluated: dict[str, float] = {}  # the latest results of every evaluator
    pending: tuple[int, Any] | None = None  # a step's metrics, checked while the next one runs
    data_wait, window_start, window_step = 0.0, time.perf_counter(), step

    def evaluate(due: list[eval_common.Scheduled]) -> dict[str, float]:
        results = run_evaluators(due, state.params, step)
        evaluated.update(results)
        return results

    if mode == "eval" or (first_step == 0 and any(e.at_start for e in evaluators)):
        due = evaluators if mode == "eval" else [e for e in evaluators if e.at_start]
        results = evaluate(due)
        if writer:
            writer.write(step, results)
        tb_writer.write_scalars(step, results)
        if mode == "eval":
            ckpt.close()
            if writer:
                writer.close()
            tb_writer.close()
            return results

    window_start = time.perf_counter()  # the first ETA counts neither compilation nor evals
    try:
        with checkpoint.PreemptionGuard() as guard, jax.transfer_guard("disallow"):
            while step < total_steps:
                wait_start = time.perf_counter()
                local_batch = next(train_iter)
                data_wait += time.perf_counter() - wait_start
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
                    seconds = (time.perf_counter() - window_start) / (step - window_step)
                    values = {
                        **last,
                        "videos_per_s": global_batch / seconds,
                        "step_time_s": seconds,
                        "data_wait_s": data_wait / (step - window_step),
                        **step_results,
                    }
                    if peak:
                        values["mfu"] = flops * global_batch / seconds / (peak * jax.device_count())
                    if writer:
                        writer.write(step, values)
                    tb_writer.write_scalars(step, values)
                    terms = "  ".join(f"{n} {values[f'loss/{n}']:.4f}" for n in term_names)
                    # A (re)start's first step includes one-off start-up (the first
                    # execution, the shuffle buffer): no ETA from it alone.
                    eta = (
                        f"ETA {(total_steps - step) * seconds / 60:.1f} min"
                        if step > first_step + 1
                        else "first step, start-up included"
                    )
                    print(
                        f"{prefix}step {step}/{total_steps}  loss {values['loss']:.6f}  {terms}  "
                        f"{values['videos_per_s'] * videos_per_example:.1f} videos/s  {eta}",
                        flush=True,
                    )
                    data_wait, window_start, window_step = 0.0, time.perf_counter(), step
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
        if writer:
            writer.close()
        tb_writer.close()
    logging.info("trained steps %d..%d", first_step, step)
    return {**last, **evaluated}


def fetch_metrics(step: int, metrics: Mapping[str, jax.Array]) -> dict[str, float]:
    """A step's metrics on the host, checked finite: the loop's one wait for the device."""
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    check_finite(values, step)
    return values


def run_evaluators(evaluators: list, params: Any, step: int) -> dict[str, float]:
    """Runs `evaluators` on `params`; their results as ``<name>/<metric>``, plus
    ``<name>/seconds``. Prints each one's headline metrics (its ``HEADLINE``)."""
    results = {}
    for scheduled in evaluators:
        start = time.perf_counter()
        with jax.transfer_guard("allow"):  # evaluators move batches and results
            metrics = scheduled.evaluator.run(params, step)
        seconds = time.perf_counter() - start
        results.update({f"{scheduled.name}/{k}": float(v) for k, v in metrics.items()})
        results[f"{scheduled.name}/seconds"] = seconds
        headline = getattr(scheduled.evaluator, "HEADLINE", ())
        shown = "  ".join(f"{k} {metrics[k]:.4f}" for k in headline if k in metrics)
        if jax.process_index() == 0:
            print(f"eval {scheduled.name} @ step {step}: {shown}  ({seconds:.1f} s)", flush=True)
    return results


def check_video_shape(
    video_shape: tuple[int, ...], config: ml_collections.ConfigDict, pp_key: str = "video_pp"
) -> None:
    """The pp's clips must be the model's (``model.num_frames`` x ``model.image_size``)."""
    frames, height, width = video_shape[-4:-1]
    size = config.model.image_size
    expected = (config.model.num_frames, *((size, size) if isinstance(size, int) else size))
    if (frames, height, width) != tuple(expected):
        raise ValueError(
            f"config.input.{pp_key} makes clips of {frames} x {height} x {width}, but "
            f"config.model.num_frames x image_size is {' x '.join(map(str, expected))}: "
            "change both together"
        )


def tokenizer_spec(spec: str, data_dir: str, text_init: str = "") -> str:
    """The tokenizer spec a run uses for config.input.{text,caption}_tokenizer `spec`.

    'dataset' means the prepared dataset's own tokenizer, or the WordPiece
    vocabulary of `text_init` (a Hugging Face folder) when one is given; any other
    spec is used as it is.
    """
    from input_pipeline import dataset_format

    if text_init and spec == "dataset":
        return f"wordpiece:{text_init}"
    if spec == "dataset":
        return dataset_format.tokenizer_spec(data_dir)
    return spec


def _initial_weights(state: TrainState, config, shardings) -> TrainState:
    """Applies config.text_init (a Hugging Face folder) and config.init (another run)."""
    params = state.params
    if config.text_init:
        from deepcoro_jax.models import text as text_lib

        _, hf_params = text_lib.from_pretrained(config.text_init)
        params = dict(params)
        params["text"] = jax.device_put(hf_params, shardings.params["text"])
    if config.init.workdir:
        params = checkpoint.load_subset(
            config.init.workdir,
            None if config.init.step < 0 else config.init.step,
            params,
            include=config.init.include,
        )
    if params is state.params:
        return state
    ema = jax.tree.map(jnp.copy, params) if state.ema_params is not None else None
    return dataclasses.replace(state, params=params, ema_params=ema)


if __name__ == "__main__":
    sys.exit("run training with launch.py")
