"""The attention kernel option and the encoder's rematerialisation policies.

cuDNN's fused kernel cannot run on a CPU, so the kernel option is tested in two
parts: which calls each component routes to cuDNN (recorded while tracing, with
the recorder computing them with XLA's kernel), and that what the routed calls
compute, padding read as lengths included, equals the XLA path. Every
rematerialisation policy must give the gradients of no rematerialisation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepcoro_jax.models import common, multitask, vivit
from deepcoro_jax.models.locca import CaptionDecoder, shift_right
from deepcoro_jax.models.mvm import MVMDecoder, tube_mask
from deepcoro_jax.models.text import BertConfig, TextEncoder

BF16 = jnp.bfloat16


@pytest.mark.parametrize(
    "implementation, platform, dtype, expected",
    [
        ("auto", "gpu", BF16, "cudnn"),
        ("auto", "gpu", jnp.float16, "cudnn"),
        ("auto", "gpu", jnp.float32, "xla"),
        ("auto", "cpu", BF16, "xla"),
        ("auto", "tpu", BF16, "xla"),
        ("xla", "gpu", BF16, "xla"),
        ("cudnn", "gpu", BF16, "cudnn"),
    ],
)
def test_resolve_attention(implementation, platform, dtype, expected):
    assert common.resolve_attention(implementation, dtype, platform) == expected


def test_resolve_attention_rejects_what_cannot_run():
    with pytest.raises(ValueError, match="needs an NVIDIA GPU.*cpu with bfloat16"):
        common.resolve_attention("cudnn", BF16, "cpu")
    with pytest.raises(ValueError, match="gpu with float32"):
        common.resolve_attention("cudnn", jnp.float32, "gpu")
    with pytest.raises(ValueError, match="'flash'.*choose one of"):
        common.resolve_attention("flash", BF16, "gpu")


def test_make_model_resolves_auto_for_every_component():
    model = multitask.make_model(vocab_size=50, size="mu", num_frames=4, image_size=32)
    expected = common.resolve_attention("auto", jnp.float32)
    assert expected == "xla"  # this CPU
    components = (model.encoder, model.text, model.caption_decoder, model.mvm_decoder)
    assert [c.attention_impl for c in components] == [expected] * 4


@pytest.fixture
def recorded(monkeypatch):
    """Records each jax.nn.dot_product_attention call, computed with XLA's kernel."""
    calls = []
    original = jax.nn.dot_product_attention

    def recorder(query, key, value, bias=None, mask=None, **kwargs):
        calls.append(
            dict(
                implementation=kwargs.get("implementation"),
                queries=query.shape[1],
                mask=mask is not None,
                causal=kwargs.get("is_causal", False),
                lengths=kwargs.get("key_value_seq_lengths") is not None,
            )
        )
        kwargs["implementation"] = None
        return original(query, key, value, bias, mask, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", recorder)
    return calls


def _text_batch(batch=3, length=12, vocab=40, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, (batch, length)).astype(np.int32)
    lengths = np.array([length, 7, 3])[:batch]
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)  # right padding
    return np.where(mask == 1, ids, 0), mask


def test_text_tower_cudnn_path_reads_padding_as_lengths(recorded):
    config = BertConfig.from_size("mu", vocab_size=40, max_position_embeddings=16)
    ids, mask = _text_batch()
    xla = TextEncoder(config, pool_type="mean", dtype=BF16)
    fused = TextEncoder(config, pool_type="mean", dtype=BF16, attention_impl="cudnn")
    params = xla.init(jax.random.key(0), ids, mask)["params"]
    reference, ref_aux = xla.apply({"params": params}, ids, mask)
    assert all(c["implementation"] is None for c in recorded)
    recorded.clear()
    out, aux = fused.apply({"params": params}, ids, mask)
    # Every layer went to cuDNN, with lengths and without the boolean mask.
    assert len(recorded) == config.num_hidden_layers
    assert all(
        c["implementation"] == "cudnn" and c["lengths"] and not c["mask"] for c in recorded
    )
    real = mask.astype(bool)
    np.testing.assert_allclose(
        np.asarray(aux["tokens"], np.float32)[real],
        np.asarray(ref_aux["tokens"], np.float32)[real],
        atol=0.06,
    )
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(reference, np.float32),
                               atol=0.06)


def test_text_tower_keeps_attention_dropout_on_xla(recorded):
    config = BertConfig.from_size("mu", vocab_size=40, max_position_embeddings=16)
    config = BertConfig(**{**config.__dict__, "attention_probs_dropout_prob": 0.1})
    ids, mask = _text_batch()
    model = TextEncoder(config, dtype=BF16, attention_impl="cudnn")
    params = model.init(jax.random.key(0), ids, mask)["params"]
    recorded.clear()
    model.apply({"params": params}, ids, mask, train=True, rngs={"dropout": jax.random.key(1)})
    assert recorded == []  # Flax's own attention with dropout, not jax.nn's
    model.apply({"params": params}, ids, mask)  # no dropout at eval: cuDNN
    assert [c["implementation"] for c in recorded] == ["cudnn"] * config.num_hidden_layers


def test_key_lengths_equal_a_right_padding_mask():
    rng = np.random.default_rng(3)
    q, k, v = (rng.normal(size=(3, 6, 2, 8)).astype(np.float32) for _ in range(3))
    lengths = np.array([6, 4, 1], np.int32)
    mask = (np.arange(6)[None] < lengths[:, None])[:, None, None, :]
    np.testing.assert_allclose(
        common.attention(q, k, v, key_lengths=lengths),
        common.attention(q, k, v, mask=mask),
        atol=1e-6,
    )


def test_encoder_and_decoders_route_unmasked_attention_to_cudnn(recorded):
    encoder = vivit.ViViT(
        hidden_size=32, depth=2, mlp_dim=64, num_heads=2, patch_size=(2, 8, 8), num_frames=4,
        image_size=32, pool_type="map", dtype=BF16, attention_impl="cudnn",
    )
    video = np.random.default_rng(0).normal(size=(2, 4, 32, 32, 1)).astype(np.float32)
    enc_params = jax.eval_shape(encoder.init, jax.random.key(0), video)
    recorded.clear()
    _, aux = jax.eval_shape(encoder.apply, enc_params, video)
    # Two self-attention blocks over 32 tokens on cuDNN; the MAP probe's one query on XLA.
    assert [(c["implementation"], c["queries"]) for c in recorded] == [
        ("cudnn", 32), ("cudnn", 32), (None, 1)
    ]

    decoder = MVMDecoder(patch_dim=128, posemb_grid=(2, 4, 4), width=32, depth=1, num_heads=2,
                         mlp_dim=64, dtype=BF16, attention_impl="cudnn")
    keep, masked = tube_mask(jax.random.key(1), 2, (2, 4, 4), 0.5)
    tokens = jnp.zeros((2, keep.shape[1], 32), BF16)
    dec_params = jax.eval_shape(
        functools.partial(decoder.init, grid=(2, 4, 4)), jax.random.key(0), tokens, keep, masked
    )
    recorded.clear()
    jax.eval_shape(functools.partial(decoder.apply, grid=(2, 4, 4)), dec_params, tokens, keep,
                   masked)
    assert [c["implementation"] for c in recorded] == ["cudnn"]

    caption = CaptionDecoder(vocab_size=30, num_layers=1, hidden_size=32, mlp_dim=64,
                             num_heads=2, max_len=8, dtype=BF16, attention_impl="cudnn")
    targets = jnp.ones((2, 8), jnp.int32)
    memory = jnp.zeros((2, 5, 32), BF16)
    cap_params = jax.eval_shape(caption.init, jax.random.key(0), shift_right(targets, 1), memory)
    recorded.clear()
    jax.eval_shape(caption.apply, cap_params, shift_right(targets, 1), memory)
    assert [(c["implementation"], c["causal"]) for c in recorded] == [
        ("cudnn", True), ("cudnn", False)  # causal self-attention, then cross-attention
    ]
    recorded.clear()
    memory_mask = jnp.ones((2, 5), bool)
    jax.eval_shape(caption.apply, cap_params, shift_right(targets, 1), memory, memory_mask)
    assert [(c["implementation"], c["mask"]) for c in recorded] == [("cudnn", False), (None, True)]


REMAT_KWARGS = dict(hidden_size=32, depth=2, mlp_dim=64, num_heads=2, patch_size=(2, 8, 8),
                    num_frames=4, image_size=32, dropout=0.1)


@functools.cache
def _remat_gradients(remat, remat_blocks, attention_type):
    model = vivit.ViViT(**REMAT_KWARGS, remat=remat, remat_blocks=remat_blocks,
                        attention_type=attention_type, temporal_depth=1)
    video = np.random.default_rng(5).normal(size=(2, 4, 32, 32, 1)).astype(np.float32)
    params = vivit.ViViT(**REMAT_KWARGS, attention_type=attention_type, temporal_depth=1).init(
        jax.random.key(0), video)["params"]

    def loss(p):
        pooled, aux = model.apply({"params": p}, video, train=True,
                                  rngs={"dropout": jax.random.key(9)})
        return jnp.sum(pooled**2) + jnp.mean(aux["tokens"] ** 3)

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return float(value), grads


@pytest.mark.parametrize(
    "remat, remat_blocks, attention_type",
    [
        ("full", -1, "joint"),
        ("dots", -1, "joint"),
        ("dots_no_batch", -1, "joint"),
        ("full", 1, "joint"),
        ("dots_no_batch", -1, "factorized_encoder"),
    ],
)
def test_every_remat_policy_gives_the_same_gradients(remat, remat_blocks, attention_type):
    """The same gradients up to float32 reassociation (XLA fuses the recomputation
    differently): 1e-5 of each parameter's largest gradient."""
    value, grads = _remat_gradients("none", -1, attention_type)
    remat_value, remat_grads = _remat_gradients(remat, remat_blocks, attention_type)
    assert remat_value == pytest.approx(value, rel=1e-6)
    assert jax.tree.structure(remat_grads) == jax.tree.structure(grads)
    for got, want in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads), strict=True):
        scale = float(np.abs(want).max())
        assert scale > 0
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)


def test_remat_policy_names():
    assert vivit.remat_policy(True) == "full" and vivit.remat_policy(False) == "none"
    assert [vivit.remat_policy(p) for p in vivit.REMAT_POLICIES] == list(vivit.REMAT_POLICIES)


def test_remat_blocks_choose_which_blocks_are_rematerialised():
    video = np.zeros((1, 4, 32, 32, 1), np.float32)
    params = jax.eval_shape(vivit.ViViT(**REMAT_KWARGS).init, jax.random.key(0), video)
    counts = {}
    for blocks in (0, 1, 2, 5):  # 5: more than the depth, so all
        m = vivit.ViViT(**REMAT_KWARGS, remat="full", remat_blocks=blocks)
        text = str(jax.make_jaxpr(jax.grad(lambda p, m=m: m.apply(p, video)[0].sum()))(params))
        counts[blocks] = text.count("remat")  # the jaxpr's remat primitives
    assert counts[0] == 0 and counts[1] > 0
    assert counts[2] == counts[5] == 2 * counts[1]


def test_bad_remat_names_the_choices():
    video = np.zeros((1, 4, 32, 32, 1), np.float32)
    with pytest.raises(ValueError, match="remat='dots_saveable'.*'dots_no_batch'"):
        vivit.ViViT(**REMAT_KWARGS, remat="dots_saveable").init(jax.random.key(0), video)
