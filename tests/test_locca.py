"""Tests for the LocCa caption decoder: NumPy reference forward, CapPa parallel
prediction, memory masking, and the KV cache against teacher forcing.

Every variant (tied/untied, parallel, dropout, bfloat16) runs on one parameter
tree, initialised once for the superset configuration (a model ignores the
parameters it does not use), and on one batch shape, so that the op-by-op
kernels compile once per module.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepcoro_jax.models.locca import CaptionDecoder, shift_right

VOCAB, WIDTH, LAYERS, HEADS, MLP, MAX_LEN = 50, 32, 2, 4, 64, 8
BATCH, NUM_MEMORY, MEMORY_DIM = 4, 5, 24


def make_decoder(**overrides) -> CaptionDecoder:
    config = dict(
        vocab_size=VOCAB,
        num_layers=LAYERS,
        hidden_size=WIDTH,
        mlp_dim=MLP,
        num_heads=HEADS,
        max_len=MAX_LEN,
    )
    return CaptionDecoder(**{**config, **overrides})


@pytest.fixture(scope="module")
def inputs():
    keys = jax.random.split(jax.random.key(0), 2)
    tokens = jax.random.randint(keys[0], (BATCH, MAX_LEN), 0, VOCAB)
    memory = jax.random.normal(keys[1], (BATCH, NUM_MEMORY, MEMORY_DIM))
    memory_mask = jnp.array(
        [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 1, 0, 1], [0, 0, 0, 1, 1]], dtype=bool
    )
    return tokens, memory, memory_mask


def random_params(decoder: CaptionDecoder, memory_dim: int, seed: int):
    """A random parameter tree of ``decoder.init``'s structure, without compiling init.

    Weights ~ N(0, 0.3); LayerNorm scales ~ 1 + N(0, 0.3).
    """
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    memory = jax.ShapeDtypeStruct((1, 1, memory_dim), jnp.float32)
    shapes = jax.eval_shape(decoder.init, jax.random.key(0), tokens, memory)["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        offset = 1.0 if path[-1].key == "scale" else 0.0
        return jnp.asarray(offset + 0.3 * rng.standard_normal(leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def params():
    """Parameters of the superset model: untied head, mask embedding, memory projection."""
    superset = make_decoder(tie_embeddings=False, parallel_fraction=0.5)
    return random_params(superset, MEMORY_DIM, seed=1)


# ----------------------------------------------------------------- NumPy reference


def np_layer_norm(x, p, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def np_dense(x, p):
    return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"])


def np_gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def np_attention(x_q, x_kv, p, allowed):
    """x_q [Lq, D], x_kv [Lk, Dkv], allowed bool [Lq, Lk] -> [Lq, D]; one example."""

    def heads(x, name):
        kernel = np.asarray(p[name]["kernel"], np.float64)  # [D, H, Dh]
        bias = np.asarray(p[name].get("bias", 0.0))  # the key projection has none
        return np.einsum("ld,dhk->hlk", x, kernel) + (bias[:, None, :] if bias.ndim else bias)

    q, k, v = heads(x_q, "query"), heads(x_kv, "key"), heads(x_kv, "value")  # [H, L, Dh]
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])  # [H, Lq, Lk]
    scores = np.where(allowed[None], scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = weights @ v  # [H, Lq, Dh]
    kernel = np.asarray(p["out"]["kernel"], np.float64)  # [H, Dh, D]
    return np.einsum("hlk,hkd->ld", out, kernel) + np.asarray(p["out"]["bias"])


def np_decoder(params, input_embeddings, memory, memory_mask, causal, tied):
    """One example: input_embeddings [L, D] (before positions), memory [N, Dm] -> logits."""
    length = input_embeddings.shape[0]
    x = input_embeddings + np.asarray(params["pos_embedding"])[:length]
    memory = np.asarray(memory, np.float64)
    if "memory_projection" in params:
        memory = np_dense(memory, params["memory_projection"])
    self_allowed = np.tril(np.ones((length, length), bool)) | (not causal)  # [L, L]
    cross_allowed = np.broadcast_to(np.asarray(memory_mask)[None], (length, memory.shape[0]))
    for i in range(LAYERS):
        p = params[f"block_{i}"]
        y = np_layer_norm(x, p["norm1"])
        x = x + np_attention(y, y, p["self_attn"], self_allowed)
        y = np_layer_norm(x, p["norm2"])
        x = x + np_attention(y, memory, p["cross_attn"], cross_allowed)
        y = np_layer_norm(x, p["norm3"])
        x = x + np_dense(np_gelu(np_dense(y, p["mlp"]["fc1"])), p["mlp"]["fc2"])
    x = np_layer_norm(x, params["final_norm"])
    if tied:
        return x @ np.asarray(params["token_embedding"]["embedding"], np.float64).T
    return np_dense(x, params["head"])


def embed_tokens(params, tokens):
    return np.asarray(params["token_embedding"]["embedding"], np.float64)[np.asarray(tokens)]


# ----------------------------------------------------------------------------- tests


def test_shift_right():
    targets = jnp.array([[5, 6, 7, 2], [8, 2, 0, 0]])
    np.testing.assert_array_equal(shift_right(targets, 1), [[1, 5, 6, 7], [1, 8, 2, 0]])
    with pytest.raises(ValueError, match="targets"):
        shift_right(jnp.zeros((4,), jnp.int32), 1)


def param_names(decoder, memory_dim=MEMORY_DIM):
    """Top-level parameter names of ``decoder.init``, from shapes only (nothing runs)."""
    tokens = jax.ShapeDtypeStruct((BATCH, MAX_LEN), jnp.int32)
    memory = jax.ShapeDtypeStruct((BATCH, NUM_MEMORY, memory_dim), jnp.float32)
    shapes = jax.eval_shape(decoder.init, jax.random.key(0), tokens, memory)["params"]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))
    return set(shapes)


def test_parameters_exist_only_when_used():
    assert {"head", "mask_embedding", "memory_projection"} <= param_names(
        make_decoder(tie_embeddings=False, parallel_fraction=0.5, dtype=jnp.bfloat16)
    )
    plain = param_names(make_decoder(), memory_dim=WIDTH)
    assert plain == {"token_embedding", "pos_embedding", "final_norm"} | {
        f"block_{i}" for i in range(LAYERS)
    }


@pytest.mark.parametrize("tied", [True, False])
def test_forward_matches_numpy_reference(inputs, params, tied):
    decoder = make_decoder(tie_embeddings=tied)
    tokens, memory, memory_mask = inputs
    logits, aux = decoder.apply({"params": params}, tokens, memory, memory_mask)
    assert logits.dtype == jnp.float32 and logits.shape == (BATCH, MAX_LEN, VOCAB)
    assert aux["pre_logits"].shape == (BATCH, MAX_LEN, WIDTH)
    assert not aux["is_parallel"].any()
    for b in range(BATCH):
        expected = np_decoder(
            params, embed_tokens(params, tokens[b]), memory[b], memory_mask[b], True, tied
        )
        np.testing.assert_allclose(logits[b], expected, atol=2e-5, rtol=1e-4)


def test_masked_memory_tokens_change_nothing(inputs, params):
    tokens, memory, memory_mask = inputs
    decoder = make_decoder()
    noise = 100.0 * jax.random.normal(jax.random.key(7), memory.shape)
    changed = jnp.where(memory_mask[..., None], memory, noise)
    logits, _ = decoder.apply({"params": params}, tokens, memory, memory_mask)
    logits_changed, _ = decoder.apply({"params": params}, tokens, changed, memory_mask)
    np.testing.assert_allclose(logits_changed, logits, atol=1e-6)
    # Without the mask the same change is visible, so the check above can fail.
    logits_unmasked, _ = decoder.apply({"params": params}, tokens, changed)
    assert np.abs(np.asarray(logits_unmasked - logits)).max() > 1e-3


def test_parallel_prediction_matches_reference(inputs, params):
    tokens, memory, memory_mask = inputs
    decoder = make_decoder(parallel_fraction=0.5, tie_embeddings=False)
    mask_embedding = np.asarray(params["mask_embedding"], np.float64)
    logits, aux = decoder.apply(
        {"params": params},
        tokens,
        memory,
        memory_mask,
        train=True,
        rngs={"parallel": jax.random.key(3)},
    )
    is_parallel = np.asarray(aux["is_parallel"])
    assert 0 < is_parallel.sum() < BATCH, is_parallel  # this seed draws both kinds
    for b in range(BATCH):
        if is_parallel[b]:  # mask tokens at every position, no causal mask
            embeddings, causal = np.tile(mask_embedding, (MAX_LEN, 1)), False
        else:
            embeddings, causal = embed_tokens(params, tokens[b]), True
        expected = np_decoder(params, embeddings, memory[b], memory_mask[b], causal, False)
        np.testing.assert_allclose(logits[b], expected, atol=2e-5, rtol=1e-4)
    _, aux_eval = decoder.apply({"params": params}, tokens, memory, memory_mask)
    assert not aux_eval["is_parallel"].any()


def test_dropout_only_in_training(inputs, params):
    tokens, memory, memory_mask = inputs
    decoder = make_decoder(dropout=0.5)
    logits_eval, _ = decoder.apply({"params": params}, tokens, memory, memory_mask)
    logits_plain, _ = make_decoder().apply({"params": params}, tokens, memory, memory_mask)
    np.testing.assert_allclose(logits_eval, logits_plain, atol=1e-6)
    logits_train, _ = decoder.apply(
        {"params": params},
        tokens,
        memory,
        memory_mask,
        train=True,
        rngs={"dropout": jax.random.key(0)},
    )
    assert np.abs(np.asarray(logits_train - logits_eval)).max() > 1e-3


def test_cached_decoding_matches_teacher_forcing(inputs, params):
    tokens, memory, memory_mask = inputs
    decoder = make_decoder(tie_embeddings=False)
    logits, _ = decoder.apply({"params": params}, tokens, memory, memory_mask)
    cache = jax.jit(decoder.init_cache)(params, memory, memory_mask)
    self_cache = cache["block_1"]["self_attn"]
    assert self_cache["cached_key"].shape == (BATCH, MAX_LEN, HEADS, WIDTH // HEADS)
    assert not np.asarray(self_cache["cached_key"]).any()  # allocated, nothing written yet
    assert int(cache["position"]) == 0
    # The memory is projected once, at init: block 0's keys against NumPy.
    key_params = params["block_0"]["cross_attn"]["key"]
    projected = np_dense(np.asarray(memory, np.float64), params["memory_projection"])
    expected_key = np.einsum("bnd,dhk->bnhk", projected, np.asarray(key_params["kernel"]))
    assert "bias" not in key_params  # a key bias would cancel in the softmax
    initial_cross = cache["block_0"]["cross_attn"]
    np.testing.assert_allclose(initial_cross["memory_key"], expected_key, atol=1e-5)
    decode_step = jax.jit(decoder.decode_step)
    for t in range(MAX_LEN):
        step_logits, cache = decode_step(params, cache, tokens[:, t])
        assert step_logits.shape == (BATCH, VOCAB) and step_logits.dtype == jnp.float32
        np.testing.assert_allclose(step_logits, logits[:, t], atol=1e-5, err_msg=f"step {t}")
    assert int(cache["position"]) == MAX_LEN
    for name, value in initial_cross.items():  # reused, never recomputed
        np.testing.assert_array_equal(cache["block_0"]["cross_attn"][name], value)


def test_bfloat16_compute(inputs, params):
    tokens, memory, memory_mask = inputs
    decoder = make_decoder(dtype=jnp.bfloat16, tie_embeddings=False)
    forward = jax.jit(decoder.apply)
    logits, aux = forward({"params": params}, tokens, memory, memory_mask)
    assert logits.dtype == jnp.float32 and aux["pre_logits"].dtype == jnp.bfloat16
    logits_fp32, _ = make_decoder(tie_embeddings=False).apply(
        {"params": params}, tokens, memory, memory_mask
    )
    scale = float(np.abs(np.asarray(logits_fp32)).max())
    np.testing.assert_allclose(logits, logits_fp32, atol=0.05 * scale)
    cache_shapes = jax.eval_shape(decoder.init_cache, params, memory, memory_mask)
    assert cache_shapes["block_0"]["self_attn"]["cached_value"].dtype == jnp.bfloat16
    assert cache_shapes["block_0"]["cross_attn"]["memory_value"].dtype == jnp.bfloat16


def test_bad_inputs_raise_clear_errors(inputs, params):
    tokens, memory, memory_mask = inputs
    decoder = make_decoder()
    apply = lambda *args, **kw: decoder.apply({"params": params}, *args, **kw)
    too_long = jnp.zeros((BATCH, MAX_LEN + 1), jnp.int32)
    with pytest.raises(ValueError, match="max_len"):
        apply(too_long, memory, memory_mask)
    with pytest.raises(ValueError, match="memory_mask"):
        apply(tokens, memory, memory_mask[:, :-1])
    with pytest.raises(ValueError, match="memory must be"):
        apply(tokens, memory[:-1])
    with pytest.raises(ValueError, match="memory is required"):
        apply(tokens, None)
    with pytest.raises(ValueError, match="num_heads"):
        jax.eval_shape(make_decoder(num_heads=5).init, jax.random.key(0), tokens, memory)
    with pytest.raises(ValueError, match="parallel_fraction"):
        jax.eval_shape(make_decoder(parallel_fraction=1.5).init, jax.random.key(0), tokens, memory)
    cache = jax.eval_shape(decoder.init_cache, params, memory, memory_mask)
    with pytest.raises(ValueError, match="tokens must be"):
        decoder.decode_step(params, cache, tokens[:, :1])
    with pytest.raises(ValueError, match="one token"):
        decoder.apply({"params": params}, tokens, memory, decode=True, mutable=["cache"])


def test_decoder_is_hashable():
    assert hash(make_decoder()) == hash(make_decoder())  # usable as a static jit argument
