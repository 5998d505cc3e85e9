"""The MVM reconstruction evaluator: its numbers against NumPy, PSNR, independence, the PNG.

The evaluator runs on the tiny set's train split (the largest) on 8 devices with
batch 8 and on 2 devices with batch 2; a reference recomputes every example on
its own from ``model.reconstruct`` with the documented per-row rng and NumPy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from evaltools import init_params, make_context, micro_config
from PIL import Image

from deepcoro_jax.training import sharding
from evaluators import common, mvm

SPLIT = "train"  # the tiny set's largest split
SEED = 3
PIXEL_PEAK = 2.0  # value_range(-1, 1)


def split_videos(ctx, split):
    """{row: eval clip [T, H, W, C]}, read directly from the eval pipeline."""
    from input_pipeline import pipeline

    videos = {}
    dataset = pipeline.make_eval_dataset(ctx.spec.data_dir, split, ctx.spec.pp(), 4)
    for batch in dataset.as_numpy_iterator():
        for video, row, real in zip(batch["video"], batch["row"], batch["_mask"], strict=True):
            if real:
                videos[int(row)] = video
    return videos


def tubelet_block(video, index, grid, patch_size):
    """Token `index`'s pixels, flattened in (pt, ph, pw, C) order."""
    _, h, w = grid
    pt, ph, pw = patch_size
    t, rest = divmod(int(index), h * w)
    y, x = divmod(rest, w)
    return video[t * pt:(t + 1) * pt, y * ph:(y + 1) * ph, x * pw:(x + 1) * pw].reshape(-1)


@pytest.fixture(scope="module")
def setup(synthetic_data, tmp_path_factory):
    config = micro_config()
    ctx8 = make_context(config, synthetic_data, str(tmp_path_factory.mktemp("w8")), 8)
    params8 = init_params(ctx8)  # once: the 2-device run gets a copy on its mesh
    ctx2 = make_context(config, synthetic_data, str(tmp_path_factory.mktemp("w2")), 2)
    params2 = jax.device_put(params8, sharding.replicated(ctx2.spec.mesh))
    eval8 = mvm.Evaluator(ctx8.predict_fns, ctx8.spec, name="m", split=SPLIT, batch_size=8,
                          seed=SEED, num_images=2, num_frames_shown=3)
    eval2 = mvm.Evaluator(ctx2.predict_fns, ctx2.spec, name="m", split=SPLIT, batch_size=2,
                          seed=SEED, num_images=0)
    return {
        "metrics8": eval8.run(params8, 7),
        "metrics2": eval2.run(params2, 7),
        "ctx": ctx8,
        "params": params8,
        "evaluator": eval8,
    }


@pytest.fixture(scope="module")
def reconstruct(setup):
    """model.reconstruct of one clip [1, T, H, W, C] with a given 'mask' rng, jitted."""
    model = setup["ctx"].model
    return jax.jit(lambda params, video, key: model.apply(
        {"params": params}, video, method="reconstruct", rngs={"mask": key}))


@pytest.fixture(scope="module")
def reference(setup, reconstruct):
    """Per row: its clip, masked indices, prediction and target, one call each."""
    out = {}
    for row, video in sorted(split_videos(setup["ctx"], SPLIT).items()):
        key = jax.random.fold_in(jax.random.key(SEED), row)
        pred, aux = jax.device_get(reconstruct(setup["params"], video[None], key))
        out[row] = (video, np.asarray(aux["mvm_masked_indices"][0]),
                    np.asarray(pred["mvm_pred"][0], np.float64),
                    np.asarray(pred["mvm_target"][0], np.float64))
    return out


def test_metrics_equal_an_independent_numpy_computation(setup, reference):
    model = setup["ctx"].model
    patch_size = tuple(model.encoder.patch_size)
    assert model.normalize_mvm_target
    squared, pixel_squared = [], []
    for video, masked, pred, target in reference.values():
        grid = tuple(n // p for n, p in zip(video.shape[:3], patch_size, strict=True))
        blocks = np.stack([tubelet_block(video, i, grid, patch_size) for i in masked])  # [M, P]
        blocks = blocks.astype(np.float64)
        mean, var = blocks.mean(axis=1, keepdims=True), blocks.var(axis=1, keepdims=True)
        np.testing.assert_allclose(target, (blocks - mean) / np.sqrt(var + 1e-6), atol=1e-4)
        squared.append(np.mean((pred - target) ** 2, axis=1))
        pixel_pred = pred * np.sqrt(var + 1e-6) + mean
        pixel_squared.append(np.mean((pixel_pred - blocks) ** 2, axis=1))
    squared, pixel_squared = np.concatenate(squared), np.concatenate(pixel_squared)
    metrics = setup["metrics8"]
    assert metrics["num_tubelets"] == len(squared)
    np.testing.assert_allclose(metrics["mse"], squared.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["pixel_mse"], pixel_squared.mean(), rtol=1e-5)
    expected_psnr = 10 * np.log10(PIXEL_PEAK**2 / pixel_squared.mean())
    np.testing.assert_allclose(metrics["psnr"], expected_psnr, atol=1e-4)


def test_metrics_do_not_depend_on_devices_or_batch_size(setup):
    metrics8, metrics2 = setup["metrics8"], setup["metrics2"]
    assert metrics8.keys() == metrics2.keys() == {"mse", "pixel_mse", "psnr", "num_tubelets"}
    for name, value in metrics8.items():
        np.testing.assert_allclose(metrics2[name], value, rtol=1e-5, err_msg=name)


def test_masks_depend_on_the_seed(setup, reference, reconstruct):
    row = next(iter(reference))
    video, masked = reference[row][:2]
    masks = [
        reconstruct(setup["params"], video[None],
                    jax.random.fold_in(jax.random.key(seed), row))[1]["mvm_masked_indices"][0]
        for seed in (SEED, SEED + 1)
    ]
    np.testing.assert_array_equal(masks[0], masked)
    assert not np.array_equal(masks[0], masks[1])


def _tubelets(rng, batch, normalized):
    """A random video [B, 4, 16, 16, 1] in [-1, 1], some masked indices, its true tubelets."""
    patch_size = (2, 8, 8)
    video = rng.uniform(-1, 1, size=(batch, 4, 16, 16, 1)).astype(np.float32)
    masked = np.stack([rng.permutation(8)[:5] for _ in range(batch)]).astype(np.int32)  # [B, 5]
    grid = (2, 2, 2)
    blocks = np.stack([
        np.stack([tubelet_block(video[b], i, grid, patch_size) for i in masked[b]])
        for b in range(batch)
    ]).astype(np.float64)  # [B, 5, P]
    mean, var = blocks.mean(axis=-1, keepdims=True), blocks.var(axis=-1, keepdims=True)
    target = (blocks - mean) / np.sqrt(var + 1e-6) if normalized else blocks
    return video, masked, patch_size, blocks, mean, var, target


@pytest.mark.parametrize("normalized", [True, False])
def test_psnr_of_a_perfect_reconstruction_is_very_large(normalized):
    video, masked, patch_size, _, _, _, target = _tubelets(np.random.default_rng(0), 2, normalized)
    target = jnp.asarray(target, jnp.float32)
    errors = mvm.tubelet_errors(target, target, jnp.asarray(video), jnp.asarray(masked),
                                patch_size, normalized)
    pixel_mse = float(errors["pixel_mse_sum"].sum() / errors["num_tubelets"].sum())
    assert float(errors["mse_sum"].sum()) == 0.0
    assert mvm.psnr(pixel_mse, PIXEL_PEAK) > 100.0
    assert mvm.psnr(0.0, PIXEL_PEAK) == np.inf


@pytest.mark.parametrize("normalized", [True, False])
def test_psnr_of_a_known_noise_level(normalized):
    rng = np.random.default_rng(1)
    video, masked, patch_size, blocks, mean, var, target = _tubelets(rng, 3, normalized)
    noise = rng.normal(0.0, 0.05, size=blocks.shape)
    noisy_pixels = blocks + noise
    pred = (noisy_pixels - mean) / np.sqrt(var + 1e-6) if normalized else noisy_pixels
    errors = mvm.tubelet_errors(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32),
                                jnp.asarray(video), jnp.asarray(masked), patch_size, normalized)
    pixel_mse = float(errors["pixel_mse_sum"].sum() / errors["num_tubelets"].sum())
    np.testing.assert_allclose(pixel_mse, np.mean(noise**2), rtol=1e-4)
    np.testing.assert_allclose(mvm.psnr(pixel_mse, PIXEL_PEAK),
                               10 * np.log10(PIXEL_PEAK**2 / np.mean(noise**2)), atol=1e-3)
    np.testing.assert_allclose(errors["mse_sum"].sum() / errors["num_tubelets"].sum(),
                               np.mean((pred - target) ** 2), rtol=1e-4)


def test_displayed_videos_hold_the_masked_input_and_the_reconstruction(setup, reference):
    ctx, evaluator = setup["ctx"], setup["evaluator"]
    rows = np.array(sorted(reference)[:8], np.int32)  # the shape the PNG pass compiled
    videos = np.stack([reference[row][0] for row in rows])
    masked_input, reconstruction = jax.device_get(evaluator._display(
        setup["params"], common.global_array(videos, ctx.spec),
        common.global_array(rows, ctx.spec)))
    patch_size = tuple(ctx.model.encoder.patch_size)
    grid = tuple(n // p for n, p in zip(videos.shape[1:4], patch_size, strict=True))
    for b, row in enumerate(rows):
        video, masked, pred, _ = reference[row]
        for index in range(int(np.prod(grid))):
            original = tubelet_block(video, index, grid, patch_size)
            shown_masked = tubelet_block(masked_input[b], index, grid, patch_size)
            shown = tubelet_block(reconstruction[b], index, grid, patch_size)
            if index in masked:
                np.testing.assert_array_equal(shown_masked, 0.0)  # mid-grey of [-1, 1]
                k = int(np.flatnonzero(masked == index)[0])
                std = np.sqrt(original.astype(np.float64).var() + 1e-6)
                np.testing.assert_allclose(shown, pred[k] * std + original.mean(), atol=1e-4)
            else:
                np.testing.assert_array_equal(shown_masked, original)
                np.testing.assert_array_equal(shown, original)


def test_png_is_written_and_decodes(setup):
    path = setup["evaluator"].png_path(7)
    assert path.endswith("/mvm/m_7.png")
    with Image.open(path) as image:
        image.load()
        width, height = image.size
        pixels = np.asarray(image.convert("L"))
    assert height > width > 0  # 2 videos x 3 rows, 3 frames
    assert pixels.std() > 0


def test_bad_options_name_the_key(setup):
    ctx = setup["ctx"]
    with pytest.raises(ValueError, match="config.evals.m.batch_size"):
        mvm.Evaluator(ctx.predict_fns, ctx.spec, name="m", batch_size=3)
    with pytest.raises(ValueError, match="config.evals.m.num_frames_shown"):
        mvm.Evaluator(ctx.predict_fns, ctx.spec, name="m", batch_size=8, num_frames_shown=0)
    with pytest.raises(ValueError, match="config.evals.m.pixel_range"):
        mvm.Evaluator(ctx.predict_fns, ctx.spec, name="m", batch_size=8,
                      pixel_range=(1.0, -1.0))
