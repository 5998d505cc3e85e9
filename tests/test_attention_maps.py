"""Attention maps: the sown cross-attention weights, sentences, tubelet mapping and overlays.

The weights are checked against a NumPy softmax(q k^T / sqrt(d)) of the projected
queries and keys of a random tiny decoder (its LayerNorm outputs captured by flax);
a memory token made to take all the attention (by setting the query and key
projections) must colour exactly its tubelet's frames and pixels, in the overlay
and in the PNG strip; the tubelet order is checked against ViViT itself.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from test_locca import random_params

from deepcoro_jax.domain import reports, tokenizers
from deepcoro_jax.models.locca import CaptionDecoder
from deepcoro_jax.models.vivit import ViViT
from deepcoro_jax.tools import attention_maps
from input_pipeline import synthetic_findings

VOCAB, WIDTH, LAYERS, HEADS, MLP, MAX_LEN = 30, 16, 2, 2, 32, 6
BATCH, NUM_MEMORY, MEMORY_DIM = 2, 7, 12
GRID, PATCH = (2, 3, 4), (2, 4, 4)  # clips of 4 x 12 x 16: 24 memory tokens


def make_decoder() -> CaptionDecoder:
    return CaptionDecoder(
        vocab_size=VOCAB,
        num_layers=LAYERS,
        hidden_size=WIDTH,
        mlp_dim=MLP,
        num_heads=HEADS,
        max_len=MAX_LEN,
    )


@pytest.fixture(scope="module")
def decoder_case():
    decoder = make_decoder()
    params = random_params(decoder, MEMORY_DIM, seed=0)
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, VOCAB, (BATCH, MAX_LEN)), jnp.int32)
    memory = jnp.asarray(rng.standard_normal((BATCH, NUM_MEMORY, MEMORY_DIM)), jnp.float32)
    memory_mask = jnp.asarray([[1, 1, 0, 1, 0, 1, 1], [0, 1, 1, 1, 1, 1, 0]], bool)
    return decoder, params, tokens, memory, memory_mask


def _numpy_weights(x, memory, query_params, key_params, memory_mask):
    """softmax(q k^T / sqrt(d)) [B, H, L, N] of the projected inputs, masked keys excluded."""
    q = np.einsum("bld,dhk->blhk", x, query_params["kernel"]) + query_params["bias"]
    k = np.einsum("bnd,dhk->bnhk", memory, key_params["kernel"])  # keys have no bias
    scores = np.einsum("blhk,bnhk->bhln", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(memory_mask[:, None, None, :], scores, -np.inf)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return scores / scores.sum(axis=-1, keepdims=True)


def test_sown_weights_are_the_softmax_of_projected_queries_and_keys(decoder_case):
    decoder, params, tokens, memory, memory_mask = decoder_case
    captured = ("norm2", "memory_projection")  # the cross-attention's inputs
    apply = jax.jit(
        lambda p: decoder.apply(
            {"params": p},
            tokens,
            memory,
            memory_mask,
            mutable=["intermediates"],
            capture_intermediates=lambda module, _: module.name in captured,
        )
    )
    (logits, _), variables = apply(params)
    intermediates = variables["intermediates"]
    projected_memory = np.asarray(intermediates["memory_projection"]["__call__"][0])
    references = []
    for i in range(LAYERS):
        block = f"block_{i}"
        cross = params[block]["cross_attn"]
        expected = _numpy_weights(
            np.asarray(intermediates[block]["norm2"]["__call__"][0], np.float64),
            projected_memory.astype(np.float64),
            jax.tree.map(np.asarray, cross["query"]),
            jax.tree.map(np.asarray, cross["key"]),
            np.asarray(memory_mask),
        )
        sown = np.asarray(intermediates[block]["cross_attn"]["attention_weights"][0])
        np.testing.assert_allclose(sown, expected, atol=1e-5)
        # Normalised over the valid memory tokens; nothing on the masked ones.
        valid = np.asarray(memory_mask)[:, None, None, :]
        np.testing.assert_allclose(np.where(valid, sown, 0).sum(-1), 1.0, atol=1e-5)
        assert np.all(sown[np.broadcast_to(~valid, sown.shape)] == 0)
        references.append(expected)
    averaged = attention_maps.cross_attention_weights(
        decoder, params, memory, memory_mask, tokens
    )  # [B, L, N]
    np.testing.assert_allclose(averaged, np.mean(references, axis=(0, 2)), atol=1e-5)
    plain_logits, _ = jax.jit(decoder.apply)({"params": params}, tokens, memory, memory_mask)
    np.testing.assert_allclose(plain_logits, logits, atol=1e-6)


def test_weights_are_computed_only_when_intermediates_are_mutable(decoder_case):
    decoder, params, tokens, memory, memory_mask = decoder_case

    def plain(p):
        return decoder.apply({"params": p}, tokens, memory, memory_mask)

    def sown(p):
        return decoder.apply({"params": p}, tokens, memory, memory_mask, mutable=["intermediates"])

    plain_ops = len(jax.make_jaxpr(plain)(params).eqns)
    sown_ops = len(jax.make_jaxpr(sown)(params).eqns)
    assert plain_ops < sown_ops


def _attend_to(token: int) -> tuple[CaptionDecoder, dict, jax.Array]:
    """A decoder (width = memory width) whose every query puts (numerically) all its
    attention on memory token `token`, and that memory [1, N, D]: all queries are
    50 e_0 (zero query kernel), keys are the memory's first coordinate in e_0, and
    only that token has one (10)."""
    decoder = make_decoder()
    params = random_params(decoder, WIDTH, seed=2)
    head_dim = WIDTH // HEADS
    query_bias = np.zeros((HEADS, head_dim), np.float32)
    query_bias[:, 0] = 50.0
    key_kernel = np.zeros((WIDTH, HEADS, head_dim), np.float32)
    key_kernel[0, :, 0] = 1.0
    for i in range(LAYERS):
        cross = params[f"block_{i}"]["cross_attn"]
        cross["query"] = {"kernel": jnp.zeros_like(cross["query"]["kernel"]), "bias": query_bias}
        cross["key"] = {"kernel": key_kernel}
    memory = np.zeros((1, int(np.prod(GRID)), WIDTH), np.float32)
    memory[0, token, 0] = 10.0
    return decoder, params, jnp.asarray(memory)


def _tubelet_block(token: int) -> np.ndarray:
    """bool [T, H, W]: the pixels of memory token `token`, from (t, h, w) = unravel(token)."""
    t, h, w = np.unravel_index(token, GRID)
    pt, ph, pw = PATCH
    block = np.zeros([g * p for g, p in zip(GRID, PATCH, strict=True)], bool)
    block[t * pt : (t + 1) * pt, h * ph : (h + 1) * ph, w * pw : (w + 1) * pw] = True
    return block


@pytest.mark.parametrize("token", [0, 17, 23])
def test_a_token_given_all_the_attention_lands_on_its_frames_and_pixels(token, tmp_path):
    decoder, params, memory = _attend_to(token)
    tokens = jnp.asarray([[3, 4, 5, 6]], jnp.int32)
    weights = np.asarray(
        attention_maps.cross_attention_weights(decoder, params, memory, None, tokens)
    )[0]  # [L, N]
    assert np.all(np.argmax(weights, axis=-1) == token)
    np.testing.assert_allclose(weights[:, token], 1.0, atol=1e-6)

    heat = attention_maps.tubelet_heatmap(weights[1:3].mean(axis=0), GRID, PATCH)  # [T, H, W]
    block = _tubelet_block(token)
    rows = np.arange(block.shape[1])[None, :, None]
    clip = np.broadcast_to(rows * 0.1 - 0.5, block.shape)[..., None].astype(np.float32)
    frames = attention_maps.display_frames(clip)  # [T, H, W]
    rgb = attention_maps.overlay(frames, heat)  # [T, H, W, 3]
    coloured = rgb[..., 0] != rgb[..., 2]
    np.testing.assert_array_equal(coloured, block)
    np.testing.assert_array_equal(rgb[~block], np.repeat(frames[~block][:, None], 3, axis=1))

    sentence = attention_maps.SentenceAttention("CTO of the mid LAD.", 1, 3, heat)
    png_path, gif_path = attention_maps.save_attention_maps(
        clip, [sentence, sentence], str(tmp_path / "maps"), num_columns=4
    )
    strip = np.asarray(Image.open(png_path).convert("RGB")).astype(int)
    factor = -(-attention_maps.MIN_PANEL_SIZE // block.shape[1])  # enlargement (12 -> 132)
    height, width = block.shape[1] * factor, block.shape[2] * factor
    assert strip.shape == (2 * (attention_maps.LABEL_HEIGHT + height), 4 * width, 3)
    panels = strip[attention_maps.LABEL_HEIGHT : attention_maps.LABEL_HEIGHT + height]
    panels = panels.reshape(height, 4, width, 3).transpose(1, 0, 2, 3)  # [frame, h, w, 3]
    enlarged = block.repeat(factor, axis=1).repeat(factor, axis=2)  # [T, h, w]
    np.testing.assert_array_equal(panels[..., 0] != panels[..., 2], enlarged)

    gif = Image.open(gif_path)
    assert gif.n_frames == block.shape[0]
    for index in range(gif.n_frames):
        gif.seek(index)
        frame = np.asarray(gif.convert("RGB")).astype(int)
        red = frame[..., 0] - frame[..., 2] > 40
        assert red.any() == block[index].any()


def test_tubelet_order_is_vivits():
    """A video that is non-zero in one tubelet changes exactly one ViViT token, whose
    heat map covers exactly that tubelet."""
    encoder = ViViT(
        hidden_size=8,
        depth=0,
        mlp_dim=16,
        num_heads=2,
        patch_size=PATCH,
        num_frames=4,
        image_size=(12, 16),
        pool_type="mean",
    )
    video_shape = (1, 4, 12, 16, 1)
    variables = jax.jit(encoder.init)(jax.random.key(0), jnp.zeros(video_shape))
    params = dict(variables["params"])
    apply = jax.jit(encoder.apply)
    for name in ("pos_embedding_temporal", "pos_embedding_spatial"):
        params[name] = jnp.zeros_like(params[name])
    for token in (5, 14):
        block = _tubelet_block(token)
        video = jnp.asarray(block[None, ..., None], jnp.float32)
        _, aux = apply({"params": params}, video)
        encoded = np.asarray(aux["tokens"][0])  # [N, D]
        background = encoded[(token + 1) % len(encoded)]
        changed = np.nonzero(np.abs(encoded - background).max(axis=1) > 1e-5)[0]
        np.testing.assert_array_equal(changed, [token])
        one_hot = np.eye(len(encoded))[changed[0]]
        np.testing.assert_array_equal(
            attention_maps.tubelet_heatmap(one_hot, GRID, PATCH) > 0, block
        )


@pytest.fixture(scope="module")
def report_tokenizer(tmp_path_factory):
    rng = np.random.default_rng(0)
    texts = [reports.render(synthetic_findings.random_findings(rng), rng) for _ in range(300)]
    path = tmp_path_factory.mktemp("spm") / "spm.model"
    return tokenizers.get_tokenizer("sp:" + tokenizers.train_sentencepiece(texts, str(path), 300))


def test_sentences_end_at_full_stops_not_decimal_points(report_tokenizer):
    tok = report_tokenizer
    sentences = [
        "Right dominant circulation.",
        "Severe 72.5% stenosis of the mid LAD.",
        "CTO of the proximal RCA",
    ]
    ids = tok.encode(" ".join(sentences))
    spans = attention_maps.sentence_spans(ids + [tok.eos_id] + [tok.pad_id] * 3, tok)
    assert [text for _, _, text in spans] == sentences
    assert spans[0][0] == 0 and spans[-1][1] == len(ids)
    for (_, end, _), (start, _, _) in zip(spans, spans[1:], strict=False):
        assert end == start
    for start, end, text in spans:
        assert tok.decode(ids[start:end]).strip() == text


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="24 tubelets"):
        attention_maps.tubelet_heatmap(np.ones(23), GRID, PATCH)
    with pytest.raises(ValueError, match="must match"):
        attention_maps.overlay(np.zeros((4, 12, 16), np.uint8), np.zeros((4, 12, 15)))
