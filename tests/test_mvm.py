"""Tests for masked video modelling (deepcoro_jax/models/mvm.py) with the ViViT encoder.

References are NumPy written here; the masked MSE is computed inline (the loss
itself lives in deepcoro_jax/losses.py).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepcoro_jax.models import mvm
from deepcoro_jax.models.vivit import ViViT

PATCH = (2, 8, 8)
VIDEO_SHAPE = (2, 4, 32, 32, 1)  # [B, T, H, W, C]
GRID = (2, 4, 4)  # N = 32 tubelets of 2*8*8*1 = 128 pixels
PATCH_DIM = 128


def make_video(seed: int, shape: tuple[int, ...] = VIDEO_SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def random_params(module, *args, seed: int, **kwargs) -> dict:
    """Random parameters of the module's shapes, without compiling ``init`` (slow on CPU)."""
    init = functools.partial(module.init, **kwargs)
    shapes = jax.eval_shape(init, jax.random.key(0), *args)["params"]
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        noise = rng.normal(size=leaf.shape).astype(np.float32)
        name = path[-1].key
        if name == "kernel":
            return jnp.asarray(noise / np.sqrt(math.prod(leaf.shape[:-1])))
        return jnp.asarray(1.0 + 0.1 * noise if name == "scale" else 0.1 * noise)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def np_layer_norm(x: np.ndarray, params: dict) -> np.ndarray:
    normed = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    return normed * np.asarray(params["scale"]) + np.asarray(params["bias"])


def pixel_is_masked(masked: np.ndarray) -> np.ndarray:
    """[B, T, H, W, 1] bool: pixel lies in a tubelet listed in masked [B, M]."""
    t = np.arange(VIDEO_SHAPE[1])[:, None, None] // PATCH[0]
    h = np.arange(VIDEO_SHAPE[2])[None, :, None] // PATCH[1]
    w = np.arange(VIDEO_SHAPE[3])[None, None, :] // PATCH[2]
    token_of_pixel = (t * GRID[1] + h) * GRID[2] + w  # [T, H, W]
    return np.stack([np.isin(token_of_pixel, row) for row in masked])[..., None]


def test_patchify_order_and_round_trip():
    video = make_video(0, (2, 4, 16, 24, 3))
    patches = np.asarray(mvm.patchify(video, PATCH))
    assert mvm.tubelet_grid(video.shape, PATCH) == (2, 2, 3)
    assert patches.shape == (2, 12, 2 * 8 * 8 * 3)
    n = 0
    for t in range(2):
        for h in range(2):
            for w in range(3):
                tube = video[:, 2 * t : 2 * t + 2, 8 * h : 8 * h + 8, 8 * w : 8 * w + 8]
                np.testing.assert_array_equal(patches[:, n], tube.reshape(2, -1))
                n += 1
    np.testing.assert_array_equal(mvm.unpatchify(patches, PATCH, (2, 2, 3)), video)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        mvm.tubelet_grid((2, 5, 16, 24, 3), PATCH)
    with pytest.raises(ValueError, match="do not fit grid"):
        mvm.unpatchify(patches, PATCH, (2, 2, 2))


def test_token_order_matches_vivit_embedding():
    model = ViViT(
        hidden_size=16,
        depth=0,
        mlp_dim=32,
        num_heads=2,
        patch_size=PATCH,
        num_frames=4,
        image_size=32,
        pool_type="mean",
    )
    video = make_video(1)
    params = random_params(model, video, seed=1)
    _, aux = jax.jit(model.apply)({"params": params}, video)
    kernel = np.asarray(params["embedding"]["kernel"])  # [pt, ph, pw, C, D]
    embedded = np.asarray(mvm.patchify(video, PATCH)) @ kernel.reshape(PATCH_DIM, 16)
    temporal = np.asarray(params["pos_embedding_temporal"])  # [T', D]
    spatial = np.asarray(params["pos_embedding_spatial"])  # [H'*W', D]
    posemb = (temporal[:, None] + spatial[None]).reshape(32, 16)
    x = embedded + np.asarray(params["embedding"]["bias"]) + posemb
    np.testing.assert_allclose(aux["tokens"], np_layer_norm(x, params["encoder_norm"]), atol=1e-4)


def check_partition(keep: np.ndarray, masked: np.ndarray, num_tokens: int) -> None:
    assert keep.dtype == masked.dtype == np.int32
    assert np.all(np.diff(keep, axis=1) > 0) and np.all(np.diff(masked, axis=1) > 0)
    for keep_row, masked_row in zip(keep, masked, strict=True):
        np.testing.assert_array_equal(
            np.sort(np.concatenate([keep_row, masked_row])), np.arange(num_tokens)
        )


@pytest.mark.parametrize("mask_ratio,num_keep", [(0.9, 3), (0.5, 16), (0.75, 8)])
def test_random_mask_exact_ratio_and_partition(mask_ratio, num_keep):
    sample = jax.jit(mvm.random_mask, static_argnums=(1, 2, 3))
    keep, masked = (np.asarray(a) for a in sample(jax.random.key(0), 8, GRID, mask_ratio))
    assert keep.shape == (8, num_keep) and masked.shape == (8, 32 - num_keep)
    check_partition(keep, masked, 32)
    assert len({tuple(row) for row in keep}) > 1  # a permutation per example
    other_keep, _ = sample(jax.random.key(1), 8, GRID, mask_ratio)
    assert not np.array_equal(other_keep, keep)


def test_tube_mask_same_spatial_positions_in_every_frame():
    grid = (4, 4, 5)  # S = 20 spatial positions
    keep, masked = (np.asarray(a) for a in mvm.tube_mask(jax.random.key(2), 6, grid))
    assert keep.shape == (6, 4 * 2)  # default ratio 0.9: round(0.1 * 20) = 2 kept per frame
    check_partition(keep, masked, 80)
    for indices, per_frame in ((keep, 2), (masked, 18)):
        by_frame = indices.reshape(6, 4, per_frame)  # [B, T', per frame]
        np.testing.assert_array_equal(
            by_frame // 20, np.broadcast_to(np.arange(4)[:, None], (6, 4, per_frame))
        )
        spatial = by_frame % 20
        np.testing.assert_array_equal(spatial, np.broadcast_to(spatial[:, :1], spatial.shape))
    keep_half, _ = mvm.tube_mask(jax.random.key(2), 6, grid, mask_ratio=0.5)
    assert keep_half.shape == (6, 40)
    for ratio in (1.0, -0.1, 0.99):
        with pytest.raises(ValueError, match="mask_ratio"):
            mvm.tube_mask(jax.random.key(0), 2, grid, mask_ratio=ratio)
    with pytest.raises(ValueError, match="mask_ratio"):
        mvm.random_mask(jax.random.key(0), 2, grid, mask_ratio=1.0)


def test_tubelet_targets_normalised_per_tubelet():
    video = make_video(3) * 5.0 + 2.0
    raw = np.asarray(mvm.tubelet_targets(video, PATCH, normalize=False))
    np.testing.assert_array_equal(raw, np.asarray(mvm.patchify(video, PATCH)))
    targets = np.asarray(mvm.tubelet_targets(video.astype(jnp.bfloat16), PATCH))
    assert targets.dtype == np.float32
    raw_bf16 = np.asarray(mvm.patchify(video.astype(jnp.bfloat16), PATCH), np.float32)
    mean = raw_bf16.mean(-1, keepdims=True)
    expected = (raw_bf16 - mean) / np.sqrt(raw_bf16.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(targets, expected, atol=1e-4)
    np.testing.assert_allclose(targets.mean(-1), 0.0, atol=1e-4)


DECODER = dict(patch_dim=PATCH_DIM, posemb_grid=GRID, width=32, depth=1, num_heads=2, mlp_dim=64)


def decoder_inputs(seed: int, width: int = 24):
    keep, masked = mvm.tube_mask(jax.random.key(seed), 2, GRID, mask_ratio=0.5)
    visible = make_video(seed, (2, keep.shape[1], width))
    return visible, keep, masked


def test_decoder_scatters_visible_tokens_and_mask_token():
    decoder = mvm.MVMDecoder(**{**DECODER, "depth": 0})
    visible, keep, masked = decoder_inputs(4)
    params = random_params(decoder, visible, keep, masked, grid=GRID, seed=4)
    pred, aux = jax.jit(decoder.apply, static_argnums=4)(
        {"params": params}, visible, keep, masked, GRID
    )
    embed = visible @ np.asarray(params["embed"]["kernel"]) + np.asarray(params["embed"]["bias"])
    sequence = np.tile(np.asarray(params["mask_token"]), (2, 32, 1))  # [B, N, width]
    for b in range(2):
        sequence[b, np.asarray(keep[b])] = embed[b]
    temporal = np.asarray(params["pos_embedding_temporal"])
    spatial = np.asarray(params["pos_embedding_spatial"])
    sequence += (temporal[:, None] + spatial[None]).reshape(32, 32)
    expected_tokens = np_layer_norm(sequence, params["norm"])
    np.testing.assert_allclose(aux["tokens"], expected_tokens, atol=1e-4)
    head = params["head"]
    at_masked = np.take_along_axis(expected_tokens, np.asarray(masked)[..., None], axis=1)
    expected_pred = at_masked @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
    assert pred.shape == (2, 16, PATCH_DIM) and pred.dtype == jnp.float32
    np.testing.assert_allclose(pred, expected_pred, atol=1e-4)


def test_decoder_predictions_depend_on_position_and_grid_resizes():
    decoder = mvm.MVMDecoder(**DECODER)
    visible, keep, masked = decoder_inputs(5)
    params = random_params(decoder, visible, keep, masked, grid=GRID, seed=5)
    same_visible = np.broadcast_to(visible[:, :1], visible.shape)  # identical visible tokens
    pred, _ = jax.jit(decoder.apply, static_argnums=4)(
        {"params": params}, same_visible, keep, masked, GRID
    )
    pred = np.asarray(pred)
    distances = np.abs(pred[:, :, None] - pred[:, None, :]).max(-1)  # [B, M, M]
    assert np.all(distances + np.eye(16) > 1e-3)  # every masked position predicts differently

    longer_grid = (4, 4, 4)  # twice the frames of posemb_grid: temporal table interpolated
    keep, masked = mvm.tube_mask(jax.random.key(6), 2, longer_grid, mask_ratio=0.5)
    visible = make_video(6, (2, keep.shape[1], 24))
    bf16 = mvm.MVMDecoder(**DECODER, dtype=jnp.bfloat16)
    bf16_init = functools.partial(bf16.init, grid=longer_grid)
    bf16_shapes = jax.eval_shape(bf16_init, jax.random.key(0), visible, keep, masked)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(bf16_shapes))
    pred, aux = jax.jit(bf16.apply, static_argnums=4)(
        {"params": params}, visible, keep, masked, longer_grid
    )
    assert pred.shape == (2, 32, PATCH_DIM) and pred.dtype == jnp.float32
    assert aux["tokens"].shape == (2, 64, 32) and aux["tokens"].dtype == jnp.bfloat16
    assert np.all(np.isfinite(pred))
    with pytest.raises(ValueError, match="partition the N = 64"):
        bf16.apply({"params": params}, visible, keep, masked[:, :-1], longer_grid)


def masked_mse(pred: np.ndarray, targets: np.ndarray, masked: np.ndarray) -> float:
    """Mean squared error over the masked tubelets only, on the full [B, N, P] grid."""
    is_masked = np.zeros(targets.shape[:2], bool)
    np.put_along_axis(is_masked, masked, True, axis=1)
    full_pred = np.zeros_like(targets)
    np.put_along_axis(full_pred, masked[..., None], pred, axis=1)
    squared = ((full_pred - targets) ** 2).mean(-1)  # [B, N]
    return float((squared * is_masked).sum() / is_masked.sum())


def test_encoder_decoder_gradients_reach_every_parameter_and_no_leak():
    encoder = ViViT(
        hidden_size=32,
        depth=1,
        mlp_dim=64,
        num_heads=2,
        patch_size=PATCH,
        num_frames=4,
        image_size=32,
        remat=True,
        dropout=0.1,
    )
    decoder = mvm.MVMDecoder(**DECODER)
    video = make_video(7)
    keep, masked = mvm.tube_mask(jax.random.key(7), 2, GRID)  # ratio 0.9: K = 2 * 2
    params = {"encoder": random_params(encoder, video, seed=7)}
    _, enc_aux = jax.eval_shape(
        functools.partial(encoder.apply, keep_indices=keep), {"params": params["encoder"]}, video
    )
    params["decoder"] = random_params(decoder, enc_aux["tokens"], keep, masked, grid=GRID, seed=8)

    def loss_fn(params, video, dropout_rng):
        pooled, aux = encoder.apply(
            {"params": params["encoder"]},
            video,
            keep_indices=keep,
            train=True,
            rngs={"dropout": dropout_rng},
        )
        pred, _ = decoder.apply({"params": params["decoder"]}, aux["tokens"], keep, masked, GRID)
        targets = jnp.take_along_axis(mvm.tubelet_targets(video, PATCH), masked[..., None], 1)
        loss = jnp.mean((pred - targets) ** 2) + 1e-2 * jnp.mean(pooled.astype(jnp.float32) ** 2)
        return loss, pred

    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (loss, pred), grads = grad_fn(params, video, jax.random.key(0))
    zero_grads = [
        jax.tree_util.keystr(path)
        for path, grad in jax.tree_util.tree_flatten_with_path(grads)[0]
        if not np.any(np.asarray(grad))
    ]
    assert not zero_grads, f"parameters without gradient: {zero_grads}"

    targets = np.asarray(mvm.tubelet_targets(video, PATCH))
    mse = masked_mse(np.asarray(pred), targets, np.asarray(masked))
    pooled_term = float(loss) - mse
    assert -1e-5 < pooled_term < 0.05 * float(loss)

    # Pixels of masked tubelets reach the loss only through the targets, never the predictions.
    changed = np.where(pixel_is_masked(np.asarray(masked)), 3.0 * make_video(9), video)
    (changed_loss, changed_pred), _ = grad_fn(params, changed, jax.random.key(0))
    np.testing.assert_allclose(changed_pred, pred, atol=1e-6)
    assert abs(float(changed_loss) - float(loss)) > 1e-3
    # ...and pixels of visible tubelets never enter the targets compared with the predictions.
    visible_changed = np.where(pixel_is_masked(np.asarray(masked)), video, 3.0 * make_video(10))
    visible_targets = np.asarray(mvm.tubelet_targets(visible_changed, PATCH))
    assert masked_mse(np.asarray(pred), visible_targets, np.asarray(masked)) == pytest.approx(mse)

    (other_loss, _), _ = grad_fn(params, video, jax.random.key(1))
    assert float(other_loss) != float(loss)  # dropout is active with train=True
