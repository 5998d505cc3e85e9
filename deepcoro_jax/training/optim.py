"""Optimizers, learning-rate schedules and loss-weight schedules from config.

Parameters are grouped into components by regex over their flattened names
(``video_encoder/block_0/...``): each component gets the base learning rate and
weight decay times its own multipliers, or is frozen. A parameter that no
component matches is an error naming it. Weight decay is never applied to the
parameters that match ``no_decay`` (norms, biases, the contrastive temperature
and bias by default). Gradients are clipped by their global norm first.
``layer_decay`` scales the video encoder's updates layer by layer (BEiT and
VideoMAE fine-tuning's layer-wise learning-rate decay; ``layer_multipliers``).

Gradient accumulation lives in the trainer's step (it needs the model), and
durations are turned into steps by the trainer before they reach here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from deepcoro_jax.training.sharding import param_name

DECAY_TYPES = ("cosine", "rsqrt", "linear", "constant")
OPTIMIZERS = ("adamw", "sgd")
DEFAULT_NO_DECAY = r"(.*/)?(bias|scale|log_temperature|cls)|.*posemb.*|.*pos_embedding.*"
FROZEN = "frozen"

Schedule = Callable[[jax.Array], jax.Array]


def lr_schedule(
    base_lr: float,
    total_steps: int,
    *,
    decay_type: str = "cosine",
    warmup_steps: int = 0,
    end_lr_frac: float = 0.0,
    timescale: int = 10_000,
) -> Schedule:
    """Linear warmup from 0 to `base_lr`, then the decay of `decay_type`.

    cosine/linear decay to ``end_lr_frac * base_lr`` at `total_steps`;
    rsqrt multiplies by ``sqrt(timescale / (timescale + steps after warmup))``;
    constant stays at `base_lr`.
    """
    if decay_type not in DECAY_TYPES:
        raise ValueError(f"schedule decay_type must be one of {DECAY_TYPES}, got {decay_type!r}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"warmup_steps={warmup_steps} must be within [0, total_steps={total_steps}]"
        )

    def progress(after):  # 0 -> 1 over the steps after the warmup
        return jnp.clip(after / max(total_steps - warmup_steps, 1), 0.0, 1.0)

    # Only cosine and linear depend on total_steps: with rsqrt or constant the compiled
    # step is the same for any length, so a relaunch with another total_steps loads it
    # from the compilation cache.
    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = jnp.minimum(1.0, (step + 1.0) / warmup_steps) if warmup_steps else 1.0
        after = jnp.maximum(step - warmup_steps, 0.0)
        if decay_type == "cosine":
            decay = end_lr_frac + (1 - end_lr_frac) * 0.5 * (1 + jnp.cos(math.pi * progress(after)))
        elif decay_type == "linear":
            decay = end_lr_frac + (1 - end_lr_frac) * (1 - progress(after))
        elif decay_type == "rsqrt":
            decay = jnp.sqrt(timescale / (timescale + after))
        else:
            decay = 1.0
        return base_lr * warmup * decay

    return schedule


def loss_weight(spec: float | Mapping[str, Any], step: jax.Array) -> jax.Array:
    """The weight of a loss term at `step` (traceable).

    `spec` is a number (constant), or a mapping with ``type``:
    ``linear_warmup`` (``value``, ``start``, ``steps``: 0 before `start`, then a
    linear ramp to `value` over `steps`) or ``step`` (``values`` and
    ``boundaries``: ``values[i]`` from ``boundaries[i-1]`` on, ``values[0]`` first).
    """
    step = jnp.asarray(step, jnp.float32)
    if isinstance(spec, int | float):
        return jnp.asarray(float(spec), jnp.float32)
    kind = spec.get("type")
    if kind == "linear_warmup":
        ramp = jnp.clip((step - spec.get("start", 0)) / max(spec["steps"], 1), 0.0, 1.0)
        return spec["value"] * ramp
    if kind == "step":
        values, boundaries = list(spec["values"]), list(spec["boundaries"])
        if len(values) != len(boundaries) + 1:
            raise ValueError(f"step loss weight needs len(values) == len(boundaries) + 1: {spec}")
        index = jnp.sum(step >= jnp.asarray(boundaries, jnp.float32)).astype(jnp.int32)
        return jnp.asarray(values, jnp.float32)[index]
    raise ValueError(
        f"loss weight spec must be a number or have type 'linear_warmup' or 'step', got {spec}"
    )


def component_labels(params, components: Sequence[tuple[str, str, bool]]):
    """The component (or FROZEN) of every parameter: `components` is [(name, regex, frozen)]."""
    compiled = [(name, re.compile(pattern), frozen) for name, pattern, frozen in components]

    def label(path, _):
        name = param_name(path)
        for component, regex, frozen in compiled:
            if regex.fullmatch(name):
                return FROZEN if frozen else component
        raise ValueError(
            f"parameter {name!r} matches no optimizer component; components: "
            f"{[(c, p) for c, p, _ in components]}"
        )

    return jax.tree_util.tree_map_with_path(label, params)


def decay_mask(params, no_decay: str = DEFAULT_NO_DECAY):
    """True for the parameters that get weight decay (those not matching `no_decay`)."""
    regex = re.compile(no_decay)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: regex.fullmatch(param_name(path)) is None, params
    )


def make_optimizer(
    params,
    *,
    total_steps: int,
    lr: float,
    wd: float,
    components: Mapping[str, Mapping[str, Any]],
    schedule: Mapping[str, Any] | None = None,
    optimizer: str = "adamw",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    momentum: float = 0.9,
    grad_clip_norm: float | None = 1.0,
    no_decay: str = DEFAULT_NO_DECAY,
    layer_decay: float = 1.0,
) -> tuple[optax.GradientTransformation, dict[str, Schedule]]:
    """The optax chain for `params` and the learning-rate schedule of each component.

    `components` maps a name to ``dict(pattern=regex, lr_mult=1.0, wd_mult=1.0,
    frozen=False)``; the first pattern that matches a parameter's name wins.
    Weight decay is decoupled (AdamW: ``lr * wd * param``) and skips `no_decay`.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    allowed = {"pattern", "lr_mult", "wd_mult", "frozen"}
    for name, comp in components.items():
        unknown = set(comp) - allowed
        if unknown or "pattern" not in comp:
            raise ValueError(f"optimizer component {name!r}: needs 'pattern', allows {allowed}")
    labels = component_labels(
        params, [(n, c["pattern"], bool(c.get("frozen", False))) for n, c in components.items()]
    )
    used = set(jax.tree.leaves(labels))
    transforms: dict[str, optax.GradientTransformation] = {FROZEN: optax.set_to_zero()}
    schedules: dict[str, Schedule] = {}
    for name, comp in components.items():
        if comp.get("frozen", False):
            continue
        base = lr_schedule(lr * comp.get("lr_mult", 1.0), total_steps, **(schedule or {}))
        schedules[name] = base
        if optimizer == "adamw":
            scale = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
        else:
            scale = optax.trace(decay=momentum)
        weight_decay = wd * comp.get("wd_mult", 1.0)
        chain = [scale]
        if weight_decay:
            chain.append(optax.add_decayed_weights(weight_decay, lambda p: decay_mask(p, no_decay)))
        chain.append(optax.scale_by_learning_rate(base))
        transforms[name] = optax.chain(*chain)
    transforms = {k: v for k, v in transforms.items() if k in used}
    tx = optax.multi_transform(transforms, labels)
    if layer_decay != 1.0:
        multipliers = layer_multipliers(params, layer_decay)
        tx = optax.chain(tx, _scale_leaves(multipliers))
    if grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx)
    return tx, {k: v for k, v in schedules.items() if k in used}


_EMBEDDING = re.compile(r"encoder/(embedding|conv_stem|pos_embedding.*|cls)(/.*)?")
_BLOCK = re.compile(r"encoder/(encoderblock|temporalblock)_(\d+)/.*")


def layer_multipliers(params, decay: float):
    """The update multiplier of every parameter for layer-wise decay `decay` (0 < decay
    <= 1): with L encoder blocks (spatial then temporal), block i (from 0) gets
    decay**(L - i), the tubelet and position embeddings and the [CLS] token
    decay**(L + 1), and everything else (the encoder's final norm and pooling, the
    other components) 1."""
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"config.optim.layer_decay={decay}: must be in (0, 1]")
    names = [param_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    spatial = {int(m[2]) for n in names if (m := _BLOCK.fullmatch(n)) and m[1] == "encoderblock"}
    temporal = {int(m[2]) for n in names if (m := _BLOCK.fullmatch(n)) and m[1] != "encoderblock"}
    depth = len(spatial) + len(temporal)

    def multiplier(path, _) -> float:
        name = param_name(path)
        if _EMBEDDING.fullmatch(name):
            return decay ** (depth + 1)
        if match := _BLOCK.fullmatch(name):
            index = int(match[2]) + (len(spatial) if match[1] == "temporalblock" else 0)
            return decay ** (depth - index)
        return 1.0

    return jax.tree_util.tree_map_with_path(multiplier, params)


def _scale_leaves(multipliers) -> optax.GradientTransformation:
    """Multiplies each update by its leaf of `multipliers` (Python floats)."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u * m, updates, multipliers), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
