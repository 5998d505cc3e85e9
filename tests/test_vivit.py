"""Tests for the ViViT encoder (deepcoro_jax/models/vivit.py) and the shared blocks (common.py).

Numerical references are written here in NumPy (tubelet embedding, positional
embeddings and their interpolation, attention, pre-LN blocks, LayerNorm) and
read the module's own parameters.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepcoro_jax.models import vivit
from deepcoro_jax.models.common import MAPHead, attention, resize_posemb
from deepcoro_jax.models.mvm import random_mask, tube_mask

PATCH = (2, 8, 8)
VIDEO_SHAPE = (2, 4, 32, 32, 1)  # [B, T, H, W, C] -> grid (2, 4, 4), N = 32
GRID = (2, 4, 4)
SMALL = dict(
    hidden_size=32, depth=1, mlp_dim=64, num_heads=2, patch_size=PATCH, num_frames=4, image_size=32
)


def make_video(seed: int, shape: tuple[int, ...] = VIDEO_SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def np_layer_norm(x: np.ndarray, params: dict) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * np.asarray(params["scale"]) + np.asarray(
        params["bias"]
    )


def np_tubelets(video: np.ndarray, patch: tuple[int, int, int]) -> np.ndarray:
    """[B, T, H, W, C] -> [B, N, pt*ph*pw*C], built tubelet by tubelet in (t, h, w) order."""
    pt, ph, pw = patch
    batch, frames, height, width, _ = video.shape
    rows = []
    for t in range(frames // pt):
        for h in range(height // ph):
            for w in range(width // pw):
                tube = video[:, t * pt : (t + 1) * pt, h * ph : (h + 1) * ph, w * pw : (w + 1) * pw]
                rows.append(tube.reshape(batch, -1))
    return np.stack(rows, axis=1)


def pixel_token_ids() -> np.ndarray:
    """[T, H, W] index of the tubelet (in the flattened (T', H', W') grid) holding each pixel."""
    t = np.arange(VIDEO_SHAPE[1])[:, None, None] // PATCH[0]
    h = np.arange(VIDEO_SHAPE[2])[None, :, None] // PATCH[1]
    w = np.arange(VIDEO_SHAPE[3])[None, None, :] // PATCH[2]
    return (t * GRID[1] + h) * GRID[2] + w


def np_linear_resize(x: np.ndarray, new_size: int, axis: int) -> np.ndarray:
    """Linear interpolation along one axis, half-pixel centres, edges clamped."""
    old_size = x.shape[axis]
    src = (np.arange(new_size) + 0.5) * old_size / new_size - 0.5
    src = np.clip(src, 0, old_size - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, old_size - 1)
    frac = src - lo
    shape = [1] * x.ndim
    shape[axis] = new_size
    frac = frac.reshape(shape)
    return np.take(x, lo, axis=axis) * (1 - frac) + np.take(x, hi, axis=axis) * frac


def np_gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def np_encoder_block(params: dict, x: np.ndarray) -> np.ndarray:
    """Pre-LN transformer block in NumPy: x + Attn(LN(x)), then x + MLP(LN(x))."""
    p = jax.tree.map(np.asarray, params)
    attn, mlp = p["attn"], p["mlp"]
    y = np_layer_norm(x, p["norm1"])
    q, k, v = (
        np.einsum("bld,dhk->blhk", y, attn[name]["kernel"]) + attn[name].get("bias", 0.0)
        for name in ("query", "key", "value")  # the key projection has no bias
    )  # [B, L, heads, head_dim]
    logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    heads = np.einsum("bhqs,bshk->bqhk", probs, v)
    x = x + np.einsum("bqhk,hkd->bqd", heads, attn["out"]["kernel"]) + attn["out"]["bias"]
    y = np_layer_norm(x, p["norm2"])
    hidden = np_gelu(y @ mlp["fc1"]["kernel"] + mlp["fc1"]["bias"])
    return x + hidden @ mlp["fc2"]["kernel"] + mlp["fc2"]["bias"]


def reference_tokens(
    model: vivit.ViViT,
    params: dict,
    video: np.ndarray,
    keep: np.ndarray,
    temporal: np.ndarray,
    spatial: np.ndarray,
) -> np.ndarray:
    """Encoder tokens for the kept indices, computed in NumPy from the module's params."""
    kernel = np.asarray(params["embedding"]["kernel"])  # [pt, ph, pw, C, D]
    embedded = np_tubelets(video, model.patch_size) @ kernel.reshape(-1, kernel.shape[-1])
    embedded = embedded + np.asarray(params["embedding"]["bias"])  # [B, N, D]
    rows = np.arange(video.shape[0])[:, None]
    num_spatial = spatial.shape[0]
    if model.attention_type == "joint":
        posemb = (temporal[:, None] + spatial[None]).reshape(-1, temporal.shape[-1])  # [N, D]
        x = (embedded + posemb)[rows, keep]  # [B, K, D]
        for i in range(model.depth):
            x = np_encoder_block(params[f"encoderblock_{i}"], x)
        return np_layer_norm(x, params["encoder_norm"])
    frames_count = temporal.shape[0]
    x = embedded[rows, keep] + spatial[keep % num_spatial]  # [B, K, D]
    batch, _, width = x.shape
    x = x.reshape(batch * frames_count, -1, width)  # [B*T', K_s, D]
    for i in range(model.depth):
        x = np_encoder_block(params[f"encoderblock_{i}"], x)
    x = np_layer_norm(x, params["spatial_norm"]).reshape(batch, frames_count, -1, width)
    frames = x.mean(axis=2) + temporal  # [B, T', D]
    for i in range(model.temporal_depth):
        frames = np_encoder_block(params[f"temporalblock_{i}"], frames)
    tokens = np_layer_norm(x + frames[:, :, None], params["encoder_norm"])
    return tokens.reshape(batch, -1, width)


def random_params(module, *args, seed: int, **kwargs) -> dict:
    """Random parameters of the module's shapes, without compiling ``init`` (slow on CPU).

    Kernels ~ N(0, 1/fan_in), LayerNorm scales ~ 1 + N(0, 0.1^2), everything else N(0, 0.1^2).
    """
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


def build(model: vivit.ViViT, seed: int):
    """(model, params, jitted apply(params, video, keep_indices=None) -> (pooled, aux))."""
    params = random_params(model, jnp.zeros(VIDEO_SHAPE), seed=seed)

    @jax.jit
    def apply(params, video, keep=None):
        return model.apply({"params": params}, video, keep_indices=keep)

    return model, params, apply


@pytest.fixture(scope="module")
def joint():
    return build(vivit.ViViT(**SMALL), seed=0)


@pytest.fixture(scope="module")
def factorized():
    return build(
        vivit.ViViT(**SMALL, attention_type="factorized_encoder", temporal_depth=1), seed=1
    )


@pytest.fixture(scope="module")
def conv_stem():
    return build(vivit.ViViT(**SMALL, stem="conv", stem_features=(4, 8, 8)), seed=3)


def np_conv_stem(params: dict, video: np.ndarray, patch_size, num_stages: int) -> np.ndarray:
    """[B, T, H, W, C] -> [B, T', H', W', D]: the conv stem written out in NumPy."""
    pt = patch_size[0]
    groups = []
    for start in range(0, video.shape[1], pt):
        frames = video[:, start:start + pt]  # [B, pt, H, W, C]
        groups.append(np.concatenate([frames[:, k] for k in range(pt)], axis=-1))
    x = np.stack(groups, 1).astype(np.float64)  # [B, T', H, W, pt*C]
    for i in range(num_stages):
        for j in range(2):
            layer = params[f"stage{i}_conv{j}"]
            kernel = np.asarray(layer["kernel"], np.float64)  # [3, 3, Cin, Cout]
            padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
            height, width = x.shape[2:4]
            out = sum(padded[:, :, dy:dy + height, dx:dx + width] @ kernel[dy, dx]
                      for dy in range(3) for dx in range(3))
            x = np.maximum(out + np.asarray(layer["bias"]), 0.0)
        b, t, height, width, c = x.shape
        x = x.reshape(b, t, height // 2, 2, width // 2, 2, c).max(axis=(3, 5))
    return x @ np.asarray(params["proj"]["kernel"]) + np.asarray(params["proj"]["bias"])


def test_conv_stem_matches_numpy(conv_stem):
    model, params, _ = conv_stem
    video = make_video(20)
    stem = vivit.ConvStem(model.hidden_size, model.patch_size, model.stem_features)
    tokens = stem.apply({"params": params["conv_stem"]}, video)
    assert tokens.shape == (2, *GRID, model.hidden_size)
    expected = np_conv_stem(params["conv_stem"], video, model.patch_size, 3)
    np.testing.assert_allclose(tokens, expected, rtol=1e-4, atol=1e-4)
    # The stem replaces the linear embedding: its parameters, and nothing else, differ.
    linear = jax.eval_shape(vivit.ViViT(**SMALL).init, jax.random.key(0), video)["params"]
    assert set(params) - {"conv_stem"} == set(linear) - {"embedding"}
    widths = (PATCH[0] * 1, 4, 8, 8)  # input channels pt*C, then each stage's width
    expected_count = sum(
        9 * c_in * c + c + 9 * c * c + c for c_in, c in zip(widths[:-1], widths[1:], strict=True)
    )
    expected_count += 8 * model.hidden_size + model.hidden_size  # the projection
    assert sum(v.size for v in jax.tree.leaves(params["conv_stem"])) == expected_count


def test_attention_matches_numpy_with_mask():
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, n, 3, 4)).astype(np.float32) for n in (5, 6, 6))
    mask = rng.random((2, 1, 5, 6)) > 0.3
    mask[..., 0] = True
    out = np.asarray(attention(q, k, v, mask=mask))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / 2.0  # sqrt(head_dim = 4)
    logits = np.where(mask, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(out, np.einsum("bhqk,bkhd->bqhd", probs, v), atol=1e-5)


def test_map_head_ignores_masked_tokens():
    head = MAPHead(num_heads=2, mlp_dim=16)
    x = np.random.default_rng(1).normal(size=(2, 6, 8)).astype(np.float32)
    key_mask = np.array([[1, 1, 0, 1, 0, 0], [0, 1, 0, 1, 1, 0]], bool)  # 3 valid per row
    params = {"params": random_params(head, x, key_mask, seed=0)}
    apply = jax.jit(head.apply)
    poisoned = np.where(key_mask[:, :, None], x, np.nan)
    pooled = np.asarray(apply(params, poisoned, key_mask))
    valid_only = x[key_mask].reshape(2, 3, 8)
    np.testing.assert_allclose(pooled, apply(params, valid_only, np.ones((2, 3), bool)), atol=1e-5)
    assert not np.allclose(pooled[0], pooled[1])


def test_resize_posemb_identity_and_matches_numpy():
    rng = np.random.default_rng(2)
    temporal = rng.normal(size=(4, 3)).astype(np.float32)
    spatial = rng.normal(size=(3, 4, 3)).astype(np.float32)
    assert resize_posemb(temporal, (4,)) is temporal
    for new_t in (7, 3, 8):
        np.testing.assert_allclose(
            resize_posemb(temporal, (new_t,)), np_linear_resize(temporal, new_t, 0), atol=1e-5
        )
    for new_hw in ((5, 2), (6, 8), (3, 7)):
        expected = np_linear_resize(np_linear_resize(spatial, new_hw[0], 0), new_hw[1], 1)
        np.testing.assert_allclose(resize_posemb(spatial, new_hw), expected, atol=1e-5)
    with pytest.raises(ValueError, match="new_grid"):
        resize_posemb(spatial, (5,))


def test_joint_keep_indices_match_reference_forward(joint):
    model, params, apply = joint
    video = make_video(3)
    keep, _ = random_mask(jax.random.key(3), 2, GRID, mask_ratio=0.5)
    _, aux = apply(params, video, keep)
    temporal = np.asarray(params["pos_embedding_temporal"])
    spatial = np.asarray(params["pos_embedding_spatial"])
    expected = reference_tokens(model, params, video, np.asarray(keep), temporal, spatial)
    assert aux["tokens"].shape == (2, 16, 32)
    np.testing.assert_allclose(aux["tokens"], expected, atol=1e-4)


def test_factorized_keep_indices_match_reference_forward(factorized):
    model, params, apply = factorized
    video = make_video(4)
    keep, _ = tube_mask(jax.random.key(4), 2, GRID, mask_ratio=0.5)
    _, aux = apply(params, video, keep)
    temporal = np.asarray(params["pos_embedding_temporal"])
    spatial = np.asarray(params["pos_embedding_spatial"])
    expected = reference_tokens(model, params, video, np.asarray(keep), temporal, spatial)
    np.testing.assert_allclose(aux["tokens"], expected, atol=1e-4)


def test_positional_embeddings_resized_for_other_grid(joint):
    model, params, apply = joint
    video = make_video(5, (1, 8, 24, 40, 1))  # grid (4, 3, 5) vs parameter grid (2, 4, 4)
    _, aux = apply(params, video)
    temporal = np_linear_resize(np.asarray(params["pos_embedding_temporal"]), 4, 0)
    spatial = np.asarray(params["pos_embedding_spatial"]).reshape(4, 4, -1)
    spatial = np_linear_resize(np_linear_resize(spatial, 3, 0), 5, 1).reshape(15, -1)
    keep_all = np.arange(60)[None]
    expected = reference_tokens(model, params, video, keep_all, temporal, spatial)
    np.testing.assert_allclose(aux["tokens"], expected, atol=1e-4)

    grids = []  # aux["grid"] holds Python ints even while tracing: usable as static shapes

    def record_grid(params, video):
        grids.append(model.apply({"params": params}, video)[1]["grid"])
        return 0

    jax.eval_shape(record_grid, params, video)
    assert grids == [(4, 3, 5)] and all(type(n) is int for n in grids[0])


@pytest.mark.parametrize("variant", ["joint", "factorized", "conv_stem"])
def test_masked_tubelets_never_influence_the_encoding(variant, request):
    model, params, apply = request.getfixturevalue(variant)
    video = make_video(6)
    keep, masked = tube_mask(jax.random.key(7), 2, GRID, mask_ratio=0.5)
    pooled, aux = apply(params, video, keep)
    assert aux["tokens"].shape == (2, 16, 32) and aux["token_mask"].all()
    token_of_pixel = pixel_token_ids()  # [T, H, W]
    is_masked_pixel = np.stack([np.isin(token_of_pixel, np.asarray(m)) for m in masked])
    changed = np.where(is_masked_pixel[..., None], 100.0 * make_video(8), video)
    pooled_changed, aux_changed = apply(params, changed, keep)
    np.testing.assert_allclose(aux_changed["tokens"], aux["tokens"], atol=1e-6)
    np.testing.assert_allclose(pooled_changed, pooled, atol=1e-6)
    # Attention really is restricted to the kept tokens: their outputs differ from the full run.
    _, full_aux = apply(params, video)
    full_at_keep = np.take_along_axis(
        np.asarray(full_aux["tokens"]), np.asarray(keep)[..., None], 1
    )
    assert not np.allclose(aux["tokens"], full_at_keep, atol=1e-3)


def test_factorized_rejects_non_tube_keep_indices(factorized):
    model, params, _ = factorized
    video = make_video(9)
    with pytest.raises(ValueError, match="multiple of the T'=2"):
        model.apply({"params": params}, video, keep_indices=jnp.zeros((2, 5), jnp.int32))
    uneven = np.tile(np.array([0, 1, 2, 3, 4, 20], np.int32), (2, 1))  # 5 in frame 0, 1 in 1
    with pytest.raises(ValueError, match="same number of tokens in every frame"):
        model.apply({"params": params}, video, keep_indices=uneven)
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        model.apply({"params": params}, video, keep_indices=np.full((2, 2), 40, np.int32))


def test_study_padding_never_influences_valid_outputs():
    studies = make_video(10, (2, 3, 4, 32, 32, 1))  # [B, V, T, H, W, C]
    video_mask = np.array([[True, True, False], [True, False, False]])
    changed = studies.copy()
    changed[~video_mask] = np.nan
    map_model = vivit.ViViT(**SMALL)
    params = random_params(map_model, studies, video_mask=video_mask, seed=2)
    mean_model = vivit.ViViT(**SMALL, pool_type="mean")
    mean_params = {k: v for k, v in params.items() if k != "map_head"}
    max_model = vivit.ViViT(**SMALL, pool_type="max")

    @functools.partial(jax.jit, static_argnums=0)
    def apply(model, params, studies, video_mask):
        return model.apply({"params": params}, studies, video_mask=video_mask)

    pooled_by = {}
    for model, model_params in (
        (map_model, params), (mean_model, mean_params), (max_model, mean_params)
    ):
        pooled, aux = apply(model, model_params, studies, video_mask)
        tokens, token_mask = np.asarray(aux["tokens"]), np.asarray(aux["token_mask"])
        assert tokens.shape == (2, 3 * 32, 32)
        np.testing.assert_array_equal(token_mask, np.repeat(video_mask, 32, axis=1))
        assert np.all(tokens[~token_mask] == 0)

        pooled_changed, aux_changed = apply(model, model_params, changed, video_mask)
        np.testing.assert_allclose(
            np.asarray(aux_changed["tokens"])[token_mask], tokens[token_mask], atol=1e-6
        )
        np.testing.assert_allclose(pooled_changed, pooled, atol=1e-6)
        empty, _ = apply(model, model_params, studies, np.zeros((2, 3), bool))
        np.testing.assert_array_equal(empty, 0.0)
        if model is map_model:
            without_padded, _ = apply(model, model_params, studies[:, :2], video_mask[:, :2])
            np.testing.assert_allclose(without_padded, pooled, atol=1e-5)
        pooled_by[model.pool_type] = np.asarray(pooled)
    # Mean pooling: the mean over the valid videos' tokens (64 and 32 of them).
    np.testing.assert_allclose(
        pooled_by["mean"], tokens.sum(1) / np.array([[64], [32]]), atol=1e-5
    )
    # Max pooling: the per-channel maximum over the same tokens.
    np.testing.assert_allclose(pooled_by["max"][0], tokens[0, :64].max(0), atol=1e-6)
    np.testing.assert_allclose(pooled_by["max"][1], tokens[1, :32].max(0), atol=1e-6)


def count_params(tree: dict) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize(
    "size,encoder_count,total_count",
    [
        ("mu", 145_856, 195_712),
        ("tiny", 5_474_112, 5_918_592),
        ("small", 21_565_056, 23_338_752),
        ("base", 85_597_440, 92_683_776),
        ("large", 303_021_056, 315_615_232),
    ],
)
def test_parameter_counts_16x224x224(size, encoder_count, total_count):
    model = vivit.ViViT.from_size(size)  # 16 frames, 224x224, patch 2x16x16
    shapes = jax.eval_shape(
        model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 16, 224, 224, 1), jnp.float32)
    )["params"]
    width, depth, mlp, _ = vivit.SIZES[size]
    attention = 4 * width * width + 3 * width  # query, key, value, out; no key bias
    block = 2 * 2 * width + attention + 2 * width * mlp + mlp + width
    embedding = 2 * 16 * 16 * width + width + (8 + 14 * 14) * width
    assert count_params(shapes) - count_params(shapes["map_head"]) == encoder_count
    assert encoder_count == embedding + depth * block + 2 * width
    map_head = width + attention + 2 * width + 2 * width * mlp + mlp + width
    assert count_params(shapes) == total_count == encoder_count + map_head
    if size == "base":
        assert 85e6 < encoder_count < 87e6


def test_bfloat16_compute_keeps_float32_params(joint):
    model, params, apply = joint
    model_bf16 = vivit.ViViT(**SMALL, dtype=jnp.bfloat16)
    video = make_video(11)
    init_shapes = jax.eval_shape(model_bf16.init, jax.random.key(0), video)["params"]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(init_shapes))
    pooled, aux = jax.jit(model_bf16.apply)({"params": params}, video)
    assert aux["tokens"].dtype == jnp.bfloat16 and pooled.dtype == jnp.bfloat16
    reference, _ = apply(params, video)
    np.testing.assert_allclose(np.asarray(pooled, np.float32), reference, atol=0.1, rtol=0.05)


def test_remat_keeps_parameter_names(joint):
    """Remat changes only the backward pass (its gradients are checked in test_mvm.py)."""
    _, params, _ = joint
    remat_model = vivit.ViViT(**SMALL, remat=True, dropout=0.1)
    remat_shapes = jax.eval_shape(remat_model.init, jax.random.key(0), make_video(12))["params"]
    assert jax.tree.structure(remat_shapes) == jax.tree.structure(params)


def test_bad_inputs_raise_clear_errors(joint):
    model, params, _ = joint
    video = make_video(13)
    with pytest.raises(ValueError, match="float pixel values"):
        model.apply({"params": params}, video.astype(np.uint8))
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        model.apply({"params": params}, video[:, :3])
    with pytest.raises(ValueError, match="video_mask is only for study input"):
        model.apply({"params": params}, video, video_mask=np.ones((2, 1), bool))
    with pytest.raises(ValueError, match="needs video_mask"):
        model.apply({"params": params}, video[:, None])
    with pytest.raises(ValueError, match=r"keep_indices must be \[B, K\]"):
        model.apply({"params": params}, video, keep_indices=np.zeros((3, 4), np.int32))
    with pytest.raises(ValueError, match="attention_type"):
        vivit.ViViT(**SMALL, attention_type="divided").apply({"params": params}, video)
    with pytest.raises(ValueError, match="stem='cnn'"):
        vivit.ViViT(**SMALL, stem="cnn").apply({"params": params}, video)
    with pytest.raises(ValueError, match=r"stem_features=\(4, 8\) has 2 max-pool stages"):
        vivit.ViViT(**SMALL, stem="conv", stem_features=(4, 8)).init(jax.random.key(0), video)
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        vivit.ViViT.from_size("huge")
    tiny = vivit.ViViT.from_size("tiny", num_frames=8)
    assert (tiny.hidden_size, tiny.depth, tiny.num_frames) == (192, 12, 8)
