"""Gradient accumulation (config.grad_accum_steps), tested on the train step itself:
k micro-batches equal one step on the whole batch, and the MVM term is normalised by
the whole batch's masked tubelets."""

import jax
import ml_collections
import numpy as np
import pytest

from configs import multitask as multitask_config
from deepcoro_jax.training import run, sharding


def _accumulation_config(accum_steps: int) -> ml_collections.ConfigDict:
    config = multitask_config.get_config("runlocal")
    config.grad_accum_steps = accum_steps
    config.input.update(text_max_len=12, caption_max_len=12)
    config.model.update(
        num_frames=4,
        image_size=16,
        patch_size=(2, 8, 8),
        mask_ratio=0.5,
        normalize_mvm_target=False,
    )
    config.model.encoder_overrides.depth = 1
    config.model.encoder_overrides.stem = "linear"
    config.model.caption_decoder_overrides.num_layers = 1
    # Contrastive off (it does not decompose); MVM computed but weighted 0 at step 0.
    config.loss.weights = ml_collections.ConfigDict(
        dict(
            contrastive=0.0,
            caption=1.0,
            distill=0.0,
            mvm=dict(type="step", values=[0.0, 1.0], boundaries=[10]),
        )
    )
    config.optim.optimizer = "sgd"  # updates linear in the gradient: comparable to 1e-6
    return config


def _study_batch(vocab_size: int) -> tuple[dict, float]:
    """8 studies of 2 video slots; even examples hold long reports and 2 real videos,
    odd ones short reports and 1, so the two micro-batches' counts differ. Each video
    is one constant value: with a zero MVM head its error is that value squared."""
    rng = np.random.default_rng(0)
    batch_size, slots, length = 8, 2, 12
    values = rng.uniform(-1, 1, (batch_size, slots)).astype(np.float32)
    video = np.broadcast_to(values[:, :, None, None, None, None], (batch_size, slots, 4, 16, 16, 1))
    video_mask = np.array([[True, i % 2 == 0] for i in range(batch_size)])
    lengths = np.where(np.arange(batch_size) % 2 == 0, 11, 3)
    positions = np.arange(length)[None, :]
    caption_mask = positions < lengths[:, None]
    caption_out = np.where(caption_mask, rng.integers(4, vocab_size, (batch_size, length)), 0)
    caption_in = np.concatenate([np.full((batch_size, 1), 2), caption_out[:, :-1]], axis=1)
    text_mask = positions < (lengths[:, None] + 1)
    text_ids = np.where(text_mask, rng.integers(4, vocab_size, (batch_size, length)), 0)
    batch = {
        "video": np.ascontiguousarray(video),
        "video_mask": video_mask,
        "text_ids": text_ids.astype(np.int32),
        "text_mask": text_mask,
        "caption_in": caption_in.astype(np.int32),
        "caption_out": caption_out.astype(np.int32),
        "caption_mask": caption_mask,
        "findings_id": (np.arange(batch_size) % 3).astype(np.int32),  # contrastive positives
    }
    expected_mvm = float(np.mean(values[video_mask] ** 2))
    return batch, expected_mvm


@pytest.fixture(scope="module")
def accumulation_results():
    """One train step with k=1 and with k=2 micro-batches on the same state and batch."""
    vocab_size = 40
    mesh = sharding.make_mesh((("data", 1), ("fsdp", 1)), devices=jax.devices()[:1])
    batch, expected_mvm = _study_batch(vocab_size)
    results = {}
    for accum_steps in (1, 2):
        config = _accumulation_config(accum_steps)
        model = run.build_model(config, vocab_size, pad_id=0)
        example = {k: v[:1] for k, v in batch.items()}
        params_shape = jax.eval_shape(
            lambda r, model=model, example=example: model.init(
                {"params": r, "mask": r, "dropout": r, "parallel": r}, example, train=False
            )["params"],
            jax.random.key(0),
        )
        tx, schedules = run.make_optimizer(config, params_shape, total_steps=10, warmup_steps=0)
        init_fn = run.create_train_state(model, tx, example, with_teacher=False)
        abstract_state = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
        shardings = run.state_shardings(abstract_state, config, mesh)
        state = jax.jit(init_fn, out_shardings=shardings)(jax.random.PRNGKey(0))
        head = state.params["mvm_decoder"]["head"]
        params = dict(state.params)
        params["mvm_decoder"] = {
            **params["mvm_decoder"],
            "head": jax.tree.map(lambda x: x * 0, head),
        }
        state = state.replace(params=params)
        step = jax.jit(
            run.make_train_step(model, tx, config, mesh, schedules),
            in_shardings=(shardings, sharding.batch_sharding(mesh)),
            out_shardings=(shardings, sharding.replicated(mesh)),
        )
        new_state, metrics = step(state, jax.device_put(batch, sharding.batch_sharding(mesh)))
        results[accum_steps] = (jax.device_get(new_state.params), jax.device_get(metrics))
    return results, expected_mvm


@pytest.mark.slow
def test_accumulation_equals_one_large_step(accumulation_results):
    results, _ = accumulation_results
    (params_1, metrics_1), (params_2, metrics_2) = results[1], results[2]
    np.testing.assert_allclose(metrics_2["loss/caption"], metrics_1["loss/caption"], rtol=1e-6)
    np.testing.assert_allclose(metrics_2["l2_grads"], metrics_1["l2_grads"], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), params_2, params_1
    )
    doc = " ".join(run.make_train_step.__doc__.split())
    assert "The contrastive term does not decompose" in doc
    assert "compared only with the reports of its own micro-batch" in doc


@pytest.mark.slow
def test_accumulated_mvm_is_normalised_by_the_whole_batch(accumulation_results):
    results, expected_mvm = accumulation_results
    for accum_steps in (1, 2):
        np.testing.assert_allclose(results[accum_steps][1]["loss/mvm"], expected_mvm, rtol=1e-6)
