"""Gradient accumulation (config.grad_accum_steps), tested on the train step itself:
k micro-batches equal one step on the whole batch, the MVM term is normalised by
the whole batch's masked tubelets, and with loss.contrastive_accumulation='cached'
the SigLIP term is exact too, on 1 and 4 devices."""

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
    # SigLIP on, accumulated exactly ('cached'); MVM computed but weighted 0 at step 0.
    config.loss.contrastive_accumulation = "cached"
    config.loss.weights = ml_collections.ConfigDict(
        dict(
            contrastive=1.0,
            caption=1.0,
            distill=0.0,
            mvm=dict(type="step", values=[0.0, 1.0], boundaries=[10]),
        )
    )
    config.optim.optimizer = "sgd"  # updates linear in the gradient: comparable to 1e-6
    return config


def _study_batch(vocab_size: int, batch_size: int = 8) -> tuple[dict, float]:
    """8 studies of 2 video slots; even examples hold long reports and 2 real videos,
    odd ones short reports and 1, so the two micro-batches' counts differ. Each video
    is one constant value: with a zero MVM head its error is that value squared."""
    rng = np.random.default_rng(0)
    slots, length = 2, 12
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


def _one_step(config, batch, vocab_size: int, devices: int):
    """(params, metrics) after one train step of `config` on `batch`, from the seed-0
    state (its MVM head zeroed), on a data-parallel mesh of `devices` devices."""
    mesh = sharding.make_mesh((("data", devices), ("fsdp", 1)), devices=jax.devices()[:devices])
    model = run.build_model(config, vocab_size, pad_id=0)
    example = {k: v[:1] for k, v in batch.items()}
    params_shape = jax.eval_shape(
        lambda r: model.init(
            {"params": r, "mask": r, "dropout": r, "parallel": r}, example, train=False
        )["params"],
        jax.random.key(0),
    )
    tx, schedules = run.make_optimizer(config, params_shape, total_steps=10, warmup_steps=0)
    init_fn = run.create_train_state(model, tx, example, with_teacher=False)
    abstract_state = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    shardings = run.state_shardings(abstract_state, config, mesh)
    state = jax.jit(init_fn, out_shardings=shardings)(jax.random.PRNGKey(0))
    params = dict(state.params)
    head = params["mvm_decoder"]["head"]
    params["mvm_decoder"] = {**params["mvm_decoder"], "head": jax.tree.map(lambda x: x * 0, head)}
    state = state.replace(params=params)
    step = jax.jit(
        run.make_train_step(model, tx, config, mesh, schedules),
        in_shardings=(shardings, sharding.batch_sharding(mesh)),
        out_shardings=(shardings, sharding.replicated(mesh)),
    )
    new_state, metrics = step(state, jax.device_put(batch, sharding.batch_sharding(mesh)))
    return jax.device_get(new_state.params), jax.device_get(metrics)


# (grad_accum_steps, devices) of the steps compared with one step on the whole batch.
ACCUMULATED = ((4, 1), (4, 4))


@pytest.fixture(scope="module")
def accumulation_results():
    """One train step on the same state and batch of 16 studies: k=1 on one device, and
    k=4 micro-batches on one device and on four, the contrastive term cached."""
    vocab_size = 40
    batch, expected_mvm = _study_batch(vocab_size, batch_size=16)
    results = {}
    for accum_steps, devices in ((1, 1), *ACCUMULATED):
        config = _accumulation_config(accum_steps)
        results[accum_steps, devices] = _one_step(config, batch, vocab_size, devices)
    return results, expected_mvm


@pytest.mark.slow
@pytest.mark.parametrize(("accum_steps", "devices"), ACCUMULATED)
def test_accumulation_equals_one_large_step(accumulation_results, accum_steps, devices):
    """Every loss term, SigLIP included (cached), the gradient norm and the updated
    parameters equal one step on the whole batch."""
    results, _ = accumulation_results
    (params_1, metrics_1) = results[1, 1]
    (params_k, metrics_k) = results[accum_steps, devices]
    for name in ("loss/contrastive", "loss/caption", "loss/mvm", "loss", "l2_grads"):
        np.testing.assert_allclose(metrics_k[name], metrics_1[name], rtol=1e-5, err_msg=name)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), params_k, params_1
    )
    doc = " ".join(run.make_train_step.__doc__.split())
    assert "The contrastive term does not decompose" in doc
    assert "compared only with the reports of its own micro-batch" in doc


@pytest.mark.slow
def test_accumulated_mvm_is_normalised_by_the_whole_batch(accumulation_results):
    results, expected_mvm = accumulation_results
    for key in ((1, 1), *ACCUMULATED):
        np.testing.assert_allclose(results[key][1]["loss/mvm"], expected_mvm, rtol=1e-6)

