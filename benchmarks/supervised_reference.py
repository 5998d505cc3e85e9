"""What the recipe's video encoder can see when told directly: a supervised reference.

For: the number beside the linear probes of a pretrained encoder. The same
encoder (``config.model``: size, tubelets, stem, pooling), on the same clips
(``config.input``: the training augmentation, the evaluation preprocessing) and
data, is trained from scratch with a logistic head on one binary label column
(default ``view_severe``: a lesion of 70% or more in the view) for a wall-clock
budget, and scored on the validation split at regular times: AUROC, AUROC
within groups of the same view anatomy (what it sees beyond the view's system,
landmark and magnification; `linear_probe.within_group_auroc`), and the AUROC
of each stenosis band against the negatives where the data has
``view_max_stenosis`` and ``view_cto`` (CTO, 90-99%, 70-89%). A pretraining
recipe whose probe reaches this reference in the same minutes learned from
text what supervision would have taught.

Not for: the pretraining itself, or probes of a trained run (``linear_probe``).

Usage, from the repository root (the synthetic set is generated on first use):

  python -m benchmarks.supervised_reference --config configs/multitask.py:runlocal \\
      --minutes 5 [--label view_severe] [--lr 3e-4] [--batch_size 32] \\
      [--config.model.encoder_overrides.stem=conv ...]

Prints one JSON object per evaluation ({"seconds", "step", "train_loss",
"auroc", "auroc_within", "auroc/<band>", ...}) and a last one with the best
validation AUROC and when it was reached.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import linen as nn
from ml_collections import config_flags

from deepcoro_jax import console, paths
from deepcoro_jax.models import vivit

_CONFIG = config_flags.DEFINE_config_file("config", "configs/multitask.py:runlocal",
                                          "The recipe whose encoder and data are used.")
_LABEL = flags.DEFINE_string("label", "view_severe", "A binary (0/1) label column.")
_MINUTES = flags.DEFINE_float("minutes", 5.0, "Training budget in wall-clock minutes.")
_EVAL_SECONDS = flags.DEFINE_float("eval_seconds", 30.0, "Evaluate about this often.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Training batch size.")
_LR = flags.DEFINE_float("lr", 3e-4, "AdamW peak learning rate (50-step warmup, constant).")
_WD = flags.DEFINE_float("wd", 0.05, "AdamW weight decay.")
_SEED = flags.DEFINE_integer("seed", 0, "Initialisation and data order.")
BANDS = {"cto": None, "90-99": (90.0, 100.0), "70-89": (70.0, 90.0)}


class Classifier(nn.Module):
    """The recipe's ViViT encoder and a linear head on its pooled output: one logit."""

    encoder: vivit.ViViT

    @nn.compact
    def __call__(self, video: jax.Array, train: bool) -> jax.Array:
        pooled, _ = self.encoder(video, train=train)
        return nn.Dense(1, name="head")(pooled.astype(jnp.float32))[:, 0]


def encoder_of(config) -> vivit.ViViT:
    m = config.model
    return vivit.ViViT.from_size(
        m.size, patch_size=tuple(m.patch_size), num_frames=m.num_frames,
        image_size=m.image_size, dtype=jnp.dtype(m.dtype), **dict(m.encoder_overrides))


def band_aurocs(scores: np.ndarray, labels: np.ndarray, facts: dict) -> dict[str, float]:
    """AUROC of each stenosis band's positives against all negatives."""
    from evaluators import linear_probe

    if "label/view_max_stenosis" not in facts:
        return {}
    stenosis = facts["label/view_max_stenosis"].astype(float)
    cto = facts.get("label/view_cto", np.zeros_like(stenosis)).astype(float) == 1
    out = {}
    for band, bounds in BANDS.items():
        members = cto if bounds is None else (~cto & (stenosis >= bounds[0])
                                              & (stenosis < bounds[1]))
        chosen = (labels == 0) | (members & (labels == 1))
        if members.any() and (labels[chosen] == 0).any():
            out[f"auroc/{band}"] = linear_probe.auroc(scores[chosen], labels[chosen])
    return out


def main(argv: Sequence[str]) -> None:
    del argv
    from evaluators import common, linear_probe
    from input_pipeline import data_cache, pipeline

    console.start(verbose=False)
    config = paths.resolve_config(_CONFIG.value)
    data_dir = data_cache.resolve_data_dir(config.input)
    label_key = f"label/{_LABEL.value}"
    table = common.split_table(data_dir, "val")
    if label_key not in table:
        sys.exit(f"{data_dir} has no label column {_LABEL.value!r}")
    train_pp = f"{config.input.video_pp}|flatten_labels|keep('video', '{label_key}')"
    eval_pp = f"{config.input.eval_video_pp}|keep('video', 'row')"
    train = pipeline.TrainIterator(data_dir, "train", train_pp, _BATCH.value, seed=_SEED.value)
    model = Classifier(encoder_of(config))
    example = next(train)
    params = model.init(jax.random.key(_SEED.value), example["video"][:1], train=False)["params"]
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, _LR.value, 50), optax.constant_schedule(_LR.value)], [50])
    optimizer = optax.adamw(schedule, weight_decay=_WD.value)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, video, labels, rng):
        def loss_fn(p):
            logits = model.apply({"params": p}, video, train=True, rngs={"dropout": rng})
            return optax.sigmoid_binary_cross_entropy(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    predict = jax.jit(lambda params, video: model.apply({"params": params}, video, train=False))
    facts = table
    labels = facts[label_key].astype(float)
    groups = common.anatomy_keys(
        facts, [c for c in common.ANATOMY_COLUMNS if f"label/{c}" in facts])

    def evaluate(params) -> dict[str, float]:
        scores = {}
        for batch in pipeline.make_eval_dataset(data_dir, "val", eval_pp,
                                                _BATCH.value).as_numpy_iterator():
            logits = np.asarray(predict(params, batch["video"]))
            for row, logit, real in zip(batch["row"], logits, batch["_mask"], strict=True):
                if real:
                    scores[int(row)] = float(logit)
        ordered = np.array([scores[int(row)] for row in facts["row"]])
        return {"auroc": linear_probe.auroc(ordered, labels),
                "auroc_within": linear_probe.within_group_auroc(ordered, labels, groups),
                **band_aurocs(ordered, labels, facts)}

    rng = jax.random.key(_SEED.value + 1)
    start = time.monotonic()
    next_eval, steps, losses, best = _EVAL_SECONDS.value, 0, [], None
    for batch in train:
        rng, step_rng = jax.random.split(rng)
        params, opt_state, loss = step(params, opt_state, batch["video"],
                                       batch[label_key].astype(np.float32), step_rng)
        steps += 1
        losses.append(float(loss))
        elapsed = time.monotonic() - start
        done = elapsed >= 60.0 * _MINUTES.value
        if elapsed >= next_eval or done:
            record = {"seconds": round(elapsed, 1), "step": steps,
                      "train_loss": round(float(np.mean(losses[-50:])), 4),
                      **{k: round(v, 4) for k, v in evaluate(params).items()}}
            print(json.dumps(record), flush=True)
            if best is None or record["auroc"] > best["auroc"]:
                best = record
            next_eval = elapsed + _EVAL_SECONDS.value
        if done:
            break
    print(json.dumps({"best": best, "label": _LABEL.value, "minutes": _MINUTES.value,
                      "seconds_per_step": round((time.monotonic() - start) / steps, 3)}))


if __name__ == "__main__":
    app.run(main, flags_parser=console.parse_flags)
