"""Shared by the evaluator tests: a micro config, a tiny prepared synthetic set, contexts.

``micro_config()`` is the runlocal recipe shrunk to 4 x 32 x 32 clips and one-layer
towers, ``micro_run_config`` that of the test run's shared trained run
(conftest.py); ``prepared_synthetic(root)`` generates and prepares 8 synthetic
studies (train 6, val 1, test 1) once per folder, ``without_labels`` copies such a
set as if prepared without ``--label_columns``; ``make_context`` builds, as the
trainer does, the model, its predict functions and the evaluators' ``EvalSpec`` on
a mesh over the first `num_devices` devices (an ``EvalContext``: evaluators get
``ctx.predict_fns`` and ``ctx.spec``, the test keeps the model), and
``init_params`` gives seeded random parameters. Tests take the session fixtures
``synthetic_data`` and ``micro_run`` from conftest.py rather than making their own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from configs import multitask as multitask_config
from deepcoro_jax.models import multitask
from deepcoro_jax.training import run, sharding
from evaluators import common

SYNTHETIC = dict(num_studies=8, size=32, num_frames=(8, 12), seed=0, magnified_fraction=0.3,
                 magnifications=(2, 3), report_scope="view")


def micro_config() -> ml_collections.ConfigDict:
    """The runlocal recipe shrunk for tests (4 x 32 x 32 clips, one-layer towers)."""
    config = multitask_config.get_config("runlocal")
    config.input.batch_size = 8
    config.input.text_max_len = 32
    # Room for the location tasks: a lesion phrase takes up to 35 ids of this tiny set's
    # tokenizer, and a referring expression is <aref>, the phrase and a box.
    config.input.caption_max_len = 48
    config.model.location_bins = 16
    config.input.video_pp = (
        "decode_sample_frames(4, stride=2, train=True)|random_resized_crop(32, scale=(0.7, 1.0))"
        "|value_range(-1, 1)"
    )
    config.input.eval_video_pp = "decode_sample_frames(4, stride=2)|resize(32)|value_range(-1, 1)"
    config.model.update(num_frames=4, image_size=32, patch_size=(2, 8, 8), mask_ratio=0.75)
    config.model.encoder_overrides.stem = "linear"  # faster to compile than the conv stem
    config.model.encoder_overrides.depth = 1
    config.model.caption_decoder_overrides.num_layers = 1
    return config


def micro_run_config(data_dir: str) -> ml_collections.ConfigDict:
    """The shared micro run's config (conftest.py): `micro_config` trained 2 steps on
    `data_dir` (checkpoint at 2), logging every step, MVM off (a smaller train step to
    compile), retrieval on the train split at step 0 and step 2."""
    config = micro_config()
    config.input.data_dir = data_dir
    config.update(total_steps=2, ckpt_steps=2, log_training_steps=1)
    config.optim.schedule.warmup_steps = 1
    config.loss.weights.mvm = 0.0
    config.evals = {
        "train_retrieval": dict(
            type="retrieval", log_steps=2, at_start=True, split="train", batch_size=16
        )
    }
    return config


def prepared_synthetic(root: str) -> str:
    """The prepared tiny synthetic set under `root` (generated on first use)."""
    from input_pipeline import data_cache

    return data_cache.ensure_synthetic(dict(SYNTHETIC, cache_dir=os.fspath(root)))


def without_labels(data_dir: str, dest: str) -> str:
    """A copy of the prepared `data_dir` at `dest` whose metadata lists no label column."""
    from input_pipeline import dataset_format

    shutil.copytree(data_dir, dest)
    meta = dataclasses.replace(dataset_format.load_meta(dest), label_columns={})
    with open(os.path.join(dest, dataset_format.META_FILE), "w") as f:
        json.dump(meta.to_json(), f)
    return os.fspath(dest)


@dataclasses.dataclass
class EvalContext:
    """What a test holds of a run: the evaluators' share (predict functions and spec),
    and the model and config, which evaluators never see."""

    model: multitask.MultitaskModel
    config: ml_collections.ConfigDict
    predict_fns: dict[str, common.PredictFn]
    spec: common.EvalSpec


def make_context(
    config: ml_collections.ConfigDict, data_dir: str, workdir: str, num_devices: int
) -> EvalContext:
    """`config`'s model, predict functions and EvalSpec on a data-parallel mesh of the
    first `num_devices` devices, built as the trainer builds them (``run.predict_fns``,
    ``run.eval_spec``)."""
    from input_pipeline import dataset_format

    spec = dataset_format.tokenizer_spec(data_dir)
    tok = run.caption_tokenizer(config, spec)
    mesh = Mesh(np.asarray(jax.devices()[:num_devices]).reshape(num_devices, 1), ("data", "fsdp"))
    model = run.build_model(config, tok.vocab_size, tok.pad_id)
    eval_spec = run.eval_spec(
        config,
        model,
        mesh,
        data_dir=data_dir,
        workdir=workdir,
        text_tokenizer_spec=spec,
        caption_tokenizer_spec=spec,
    )
    return EvalContext(model, config, run.predict_fns(model, mesh), eval_spec)


def init_params(ctx: EvalContext, seed: int = 0):
    """Seeded random parameters of the context's model, replicated on its mesh."""
    cfg = ctx.config
    size = cfg.model.image_size
    batch = {
        "video": jnp.zeros((1, cfg.model.num_frames, size, size, 1)),
        "text_ids": jnp.zeros((1, cfg.input.text_max_len), jnp.int32),
        "text_mask": jnp.ones((1, cfg.input.text_max_len), bool),
        "caption_in": jnp.zeros((1, cfg.input.caption_max_len), jnp.int32),
    }

    def init(rng):
        rngs = {"params": rng, "dropout": rng, "mask": rng, "parallel": rng}
        return ctx.model.init(rngs, batch, train=False, mvm=True)["params"]

    # Jitted: an eager flax init of even the micro model takes about a minute on CPU.
    return jax.jit(init, out_shardings=sharding.replicated(ctx.spec.mesh))(jax.random.key(seed))
