"""Tests for the decoding loops: greedy, sampling and beam search on the KV cache,
checked against the teacher-forced (uncached) decoder, against each other, and on
toy decoders whose distributions are known exactly."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_locca import random_params

from benchmarks.models import greedy_uncached
from deepcoro_jax.models import decode
from deepcoro_jax.models.locca import CaptionDecoder, shift_right

VOCAB, WIDTH, LAYERS, HEADS, MLP, MAX_LEN = 50, 32, 2, 4, 64, 10
BATCH, NUM_MEMORY, MEMORY_DIM = 4, 6, 24
BOS, PAD = 1, 0
NEVER = -1  # an eos_id no model emits

DECODER = CaptionDecoder(
    vocab_size=VOCAB,
    num_layers=LAYERS,
    hidden_size=WIDTH,
    mlp_dim=MLP,
    num_heads=HEADS,
    max_len=MAX_LEN,
    tie_embeddings=False,
)


def make_problem(seed: int):
    """(params, memory [B, N, D], memory_mask [B, N]) for one random model and batch."""
    memory = jax.random.normal(jax.random.key(seed), (BATCH, NUM_MEMORY, MEMORY_DIM))
    lengths = jnp.array([NUM_MEMORY, 3, 1, 5])
    memory_mask = jnp.arange(NUM_MEMORY)[None, :] < lengths[:, None]  # [B, N]
    return random_params(DECODER, MEMORY_DIM, seed), memory, memory_mask


@pytest.fixture(scope="module")
def problem():
    return make_problem(seed=0)


@pytest.fixture(scope="module")
def eos_id(problem):
    """A token that greedy decoding emits mid-sequence in example 0 (first time at step >= 2)."""
    tokens = np.asarray(decode.greedy(DECODER, *problem, bos_id=BOS, eos_id=NEVER, pad_id=PAD)[0])
    for step in range(2, MAX_LEN - 1):
        if tokens[0, step] not in tokens[0, :step]:
            return int(tokens[0, step])
    pytest.fail(f"greedy output of example 0 never introduces a new token: {tokens[0]}")


@pytest.fixture(scope="module")
def greedy_output(problem, eos_id):
    return decode.greedy(DECODER, *problem, bos_id=BOS, eos_id=eos_id, pad_id=PAD)


_teacher_forced = jax.jit(DECODER.apply)


def teacher_forced_log_softmax(params, memory, memory_mask, tokens):
    """log p(next token) [B, L, V] under teacher forcing on ``tokens`` [B, L]."""
    logits, _ = _teacher_forced({"params": params}, shift_right(tokens, BOS), memory, memory_mask)
    return np.asarray(jax.nn.log_softmax(logits), np.float64)


def lengths_through_eos(tokens, eos_id):
    """Tokens up to and including the first EOS (all of them without an EOS), per row."""
    tokens = np.asarray(tokens)
    is_eos = tokens == eos_id
    return np.where(is_eos.any(1), is_eos.argmax(1) + 1, tokens.shape[1])


def sequence_log_probs(log_softmax, tokens, lengths):
    picked = np.take_along_axis(log_softmax, np.asarray(tokens)[..., None], axis=-1)[..., 0]
    return np.array([picked[b, : lengths[b]].sum() for b in range(len(lengths))])


def assert_padded_after_eos(tokens, eos_id):
    tokens = np.asarray(tokens)
    for row, length in zip(tokens, lengths_through_eos(tokens, eos_id), strict=True):
        assert (row[length:] == PAD).all(), row


# ---------------------------------------------------------------- the LocCa decoder


def test_greedy_is_the_teacher_forced_argmax(problem, eos_id, greedy_output):
    tokens, log_probs = (np.asarray(x) for x in greedy_output)
    lengths = lengths_through_eos(tokens, eos_id)
    assert lengths[0] < MAX_LEN and lengths.max() == MAX_LEN, lengths  # EOS and no EOS
    assert_padded_after_eos(tokens, eos_id)
    log_softmax = teacher_forced_log_softmax(*problem, jnp.asarray(tokens))
    argmax = log_softmax.argmax(-1)  # [B, L]
    for b, length in enumerate(lengths):
        np.testing.assert_array_equal(tokens[b, :length], argmax[b, :length], err_msg=f"row {b}")
    np.testing.assert_allclose(
        log_probs, sequence_log_probs(log_softmax, tokens, lengths), atol=1e-4
    )


def test_uncached_greedy_equals_cached_greedy(problem, eos_id, greedy_output):
    uncached = greedy_uncached(DECODER, *problem, bos_id=BOS, eos_id=eos_id, pad_id=PAD)
    np.testing.assert_array_equal(uncached.tokens, greedy_output.tokens)
    np.testing.assert_allclose(uncached.log_probs, greedy_output.log_probs, atol=1e-5)


def test_masked_memory_tokens_change_nothing(problem, eos_id, greedy_output):
    params, memory, memory_mask = problem
    noise = 50.0 * jax.random.normal(jax.random.key(9), memory.shape)
    changed = jnp.where(memory_mask[..., None], memory, noise)
    out = decode.greedy(
        DECODER, params, changed, memory_mask, bos_id=BOS, eos_id=eos_id, pad_id=PAD
    )
    np.testing.assert_array_equal(out.tokens, greedy_output.tokens)
    np.testing.assert_allclose(out.log_probs, greedy_output.log_probs, atol=1e-5)


def test_beam_size_one_is_greedy(problem, eos_id, greedy_output):
    beam = decode.beam_search(
        DECODER, *problem, bos_id=BOS, eos_id=eos_id, pad_id=PAD, beam_size=1, length_penalty=0.0
    )
    np.testing.assert_array_equal(beam.tokens, greedy_output.tokens)
    np.testing.assert_allclose(beam.log_probs, greedy_output.log_probs, atol=1e-5)
    np.testing.assert_allclose(beam.scores, beam.log_probs, atol=1e-6)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_beam_search_beats_greedy_and_scores_are_consistent(seed):
    problem = make_problem(seed)
    # The eos_id is traced, not static: picking one per seed does not recompile.
    eos_id = int(decode.greedy(DECODER, *problem, bos_id=BOS, eos_id=NEVER, pad_id=PAD)[0][1, 2])
    kw = dict(bos_id=BOS, eos_id=eos_id, pad_id=PAD)
    greedy = decode.greedy(DECODER, *problem, **kw)
    for alpha in (0.0, 0.6):
        beam = decode.beam_search(DECODER, *problem, beam_size=4, length_penalty=alpha, **kw)
        assert_padded_after_eos(beam.tokens, eos_id)
        # Rescore the returned sequences with the teacher-forced model.
        lengths = lengths_through_eos(beam.tokens, eos_id)
        log_softmax = teacher_forced_log_softmax(*problem, beam.tokens)
        np.testing.assert_allclose(
            beam.log_probs, sequence_log_probs(log_softmax, beam.tokens, lengths), atol=1e-4
        )
        penalty = ((5.0 + lengths) / 6.0) ** alpha
        np.testing.assert_allclose(beam.scores, np.asarray(beam.log_probs) / penalty, rtol=1e-5)
        if alpha == 0.0:
            assert (np.asarray(beam.log_probs) >= np.asarray(greedy.log_probs) - 1e-5).all()


def test_top_k_one_and_tiny_top_p_sample_greedily(problem, eos_id, greedy_output):
    kw = dict(bos_id=BOS, eos_id=eos_id, pad_id=PAD, temperature=1.5)
    for settings in (dict(top_k=1), dict(top_p=1e-6)):
        out = decode.sample(DECODER, *problem, jax.random.key(4), **kw, **settings)
        np.testing.assert_array_equal(out.tokens, greedy_output.tokens, err_msg=str(settings))
        np.testing.assert_allclose(out.log_probs, greedy_output.log_probs, atol=1e-5)


def test_sampling_is_random_and_reports_model_log_probs(problem, eos_id):
    kw = dict(bos_id=BOS, eos_id=eos_id, pad_id=PAD)
    first = decode.sample(DECODER, *problem, jax.random.key(0), **kw)
    second = decode.sample(DECODER, *problem, jax.random.key(1), **kw)
    assert (np.asarray(first.tokens) != np.asarray(second.tokens)).any()
    assert_padded_after_eos(first.tokens, eos_id)
    lengths = lengths_through_eos(first.tokens, eos_id)
    log_softmax = teacher_forced_log_softmax(*problem, first.tokens)
    np.testing.assert_allclose(
        first.log_probs, sequence_log_probs(log_softmax, first.tokens, lengths), atol=1e-4
    )


# ------------------------------------------------------------------- toy decoders


@dataclasses.dataclass(frozen=True)
class FixedLogitsDecoder:
    """The same logits at every step whatever the input: a known distribution."""

    logits: tuple[float, ...]
    max_len: int = 1

    def init_cache(self, params, memory, memory_mask):
        return {"position": jnp.zeros((), jnp.int32)}

    def decode_step(self, params, cache, tokens):
        logits = jnp.asarray(self.logits, jnp.float32)[None, :]  # [1, V]
        return jnp.broadcast_to(logits, (tokens.shape[0], len(self.logits))), cache


@dataclasses.dataclass(frozen=True)
class ScriptedDecoder:
    """Example b reads its row r from memory[b, 0, 0]; step t puts logit 10 on script[r][t]."""

    script: tuple[tuple[int, ...], ...]
    vocab_size: int

    @property
    def max_len(self) -> int:
        return len(self.script[0])

    def init_cache(self, params, memory, memory_mask):
        return {"row": memory[:, 0, 0].astype(jnp.int32), "position": jnp.zeros((), jnp.int32)}

    def decode_step(self, params, cache, tokens):
        targets = jnp.asarray(self.script)[cache["row"], cache["position"]]  # [B]
        logits = 10.0 * jax.nn.one_hot(targets, self.vocab_size)  # [B, V]
        return logits, {"row": cache["row"], "position": cache["position"] + 1}


TOY_LOGITS = (1.0, 0.0, 2.0, -1.0, 0.5)


def softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def first_token_frequencies(num_samples, seed, **settings):
    memory = jnp.zeros((num_samples, 1, 1))
    out = decode.sample(
        FixedLogitsDecoder(TOY_LOGITS),
        None,
        memory,
        None,
        jax.random.key(seed),
        bos_id=0,
        eos_id=NEVER,
        pad_id=0,
        **settings,
    )
    return np.bincount(np.asarray(out.tokens[:, 0]), minlength=len(TOY_LOGITS)) / num_samples


def chi_square(frequencies, probs, num_samples):
    support = probs > 0
    assert (frequencies[~support] == 0).all(), frequencies  # nothing outside the support
    expected = probs[support] * num_samples
    return (((frequencies[support] * num_samples) - expected) ** 2 / expected).sum()


def test_sampling_frequencies_follow_the_filtered_softmax():
    num_samples = 4000
    logits = np.asarray(TOY_LOGITS)

    def among_top(k):
        """softmax(logits) renormalised over the k most likely tokens."""
        kept = np.zeros(len(logits), bool)
        kept[np.argsort(-logits)[:k]] = True
        return np.where(kept, softmax(np.where(kept, logits, -np.inf)), 0.0)

    # softmax(logits) sorted: .563 .207 .126 .076 .028; top_p=0.8 needs the first three.
    cases = [
        (dict(temperature=0.5), softmax(logits / 0.5)),
        (dict(temperature=2.0), softmax(logits / 2.0)),
        (dict(top_k=2), among_top(2)),
        (dict(top_p=0.8), among_top(3)),
        # Top-p applies after top-k: renormalised .731 .269, so 0.7 keeps only the first.
        (dict(top_k=2, top_p=0.7), among_top(1)),
    ]
    for seed, (settings, probs) in enumerate(cases):
        frequencies = first_token_frequencies(num_samples, seed, **settings)
        # 99.99th percentile of chi-square with <= 4 degrees of freedom is ~23.5.
        assert chi_square(frequencies, probs, num_samples) < 23.5, (settings, frequencies)
    # The same check rejects the unscaled softmax, so it can fail.
    frequencies = first_token_frequencies(num_samples, 0, temperature=0.5)
    assert chi_square(frequencies, softmax(logits), num_samples) > 100


def test_eos_stops_each_sequence_and_pads_after_it():
    eos = 2
    script = ((5, 6, eos, 7, 8, 9), (eos, 5, 6, 7, 8, 9), (5, 6, 7, 8, 9, 5), (9, 8, 7, 6, 5, eos))
    decoder = ScriptedDecoder(script, vocab_size=10)
    memory = jnp.arange(len(script), dtype=jnp.float32)[:, None, None]  # row ids
    expected = np.array(
        [[5, 6, eos, PAD, PAD, PAD], [eos, PAD, PAD, PAD, PAD, PAD], script[2], script[3]]
    )
    step_log_prob = 10.0 - np.log(np.exp(10.0) + 9)
    expected_log_probs = step_log_prob * np.array([3, 1, 6, 6])
    kw = dict(bos_id=BOS, eos_id=eos, pad_id=PAD)
    outputs = {
        "greedy": decode.greedy(decoder, None, memory, **kw),
        "sample": decode.sample(decoder, None, memory, None, jax.random.key(0), top_k=1, **kw),
        "beam": decode.beam_search(decoder, None, memory, beam_size=2, **kw),
    }
    for name, out in outputs.items():
        np.testing.assert_array_equal(out.tokens, expected, err_msg=name)
        np.testing.assert_allclose(out.log_probs, expected_log_probs, atol=2e-6, err_msg=name)
    # max_len shorter than the decoder's: truncated, no EOS needed.
    short = decode.greedy(decoder, None, memory, max_len=2, **kw)
    np.testing.assert_array_equal(short.tokens, expected[:, :2])


def test_bad_arguments_raise_clear_errors(problem):
    params, memory, memory_mask = problem
    kw = dict(bos_id=BOS, eos_id=2, pad_id=PAD)
    rng = jax.random.key(0)
    with pytest.raises(ValueError, match="max_len"):
        decode.greedy(DECODER, params, memory, memory_mask, max_len=MAX_LEN + 1, **kw)
    with pytest.raises(ValueError, match="temperature"):
        decode.sample(DECODER, params, memory, memory_mask, rng, temperature=0.0, **kw)
    with pytest.raises(ValueError, match="top_k"):
        decode.sample(DECODER, params, memory, memory_mask, rng, top_k=-1, **kw)
    with pytest.raises(ValueError, match="top_p"):
        decode.sample(DECODER, params, memory, memory_mask, rng, top_p=0.0, **kw)
    with pytest.raises(ValueError, match="beam_size"):
        decode.beam_search(DECODER, params, memory, memory_mask, beam_size=0, **kw)
    with pytest.raises(ValueError, match="length_penalty"):
        decode.beam_search(DECODER, params, memory, memory_mask, length_penalty=-1.0, **kw)


# ---------------------------------------------------------------- forced prefix


def test_prefixed_greedy_without_prefix_or_restriction_is_greedy(problem, greedy_output, eos_id):
    out = decode.prefixed_greedy(
        DECODER, *problem, jnp.zeros((BATCH, 0), jnp.int32), jnp.zeros((BATCH,), jnp.int32),
        jnp.ones((MAX_LEN, VOCAB), bool), bos_id=BOS, eos_id=eos_id, pad_id=PAD,
    )
    np.testing.assert_array_equal(out.tokens, greedy_output.tokens)
    np.testing.assert_allclose(out.log_probs, greedy_output.log_probs, atol=1e-5)


def test_prefixed_greedy_is_the_restricted_argmax_after_each_rows_prefix(problem):
    """Prefixes of lengths 0-3 side by side; each generated step restricted to a different
    id range; checked row by row against teacher forcing on the growing sequence."""
    rng = np.random.default_rng(0)
    width, generated = 3, 4
    prefix = rng.integers(2, VOCAB, (BATCH, width)).astype(np.int32)
    prefix_len = np.array([0, 3, 1, 2], np.int32)
    masks = np.zeros((generated, VOCAB), bool)
    for g, (low, high) in enumerate([(10, 20), (20, 50), (2, 10), (30, 40)]):
        masks[g, low:high] = True
    out = decode.prefixed_greedy(
        DECODER, *problem, jnp.asarray(prefix), jnp.asarray(prefix_len), jnp.asarray(masks),
        bos_id=BOS, eos_id=NEVER, pad_id=PAD,
    )
    params, memory, memory_mask = problem
    for b in range(BATCH):
        sequence = list(prefix[b, : prefix_len[b]])
        expected_log_prob = 0.0
        for g in range(generated):
            tokens = np.full((BATCH, MAX_LEN), PAD, np.int32)
            tokens[b, : len(sequence)] = sequence
            # Position len(sequence) of the teacher-forced pass predicts the next token.
            log_softmax = teacher_forced_log_softmax(params, memory, memory_mask, tokens)
            row = log_softmax[b, len(sequence)]
            choice = int(np.argmax(np.where(masks[g], row, -np.inf)))
            expected_log_prob += row[choice]
            sequence.append(choice)
        np.testing.assert_array_equal(out.tokens[b], sequence[prefix_len[b] :], err_msg=f"row {b}")
        np.testing.assert_allclose(out.log_probs[b], expected_log_prob, atol=1e-4)
        assert all(masks[g, t] for g, t in enumerate(np.asarray(out.tokens[b])))


def test_prefixed_greedy_pads_after_eos(problem):
    """A row that emits EOS emits pad after it."""
    masks = np.zeros((3, VOCAB), bool)
    masks[0, 5] = True  # EOS forced first
    masks[1:, 10:] = True
    out = decode.prefixed_greedy(
        DECODER, *problem, jnp.zeros((BATCH, 1), jnp.int32), jnp.zeros((BATCH,), jnp.int32),
        jnp.asarray(masks), bos_id=BOS, eos_id=5, pad_id=PAD,
    )
    np.testing.assert_array_equal(np.asarray(out.tokens)[:, 0], 5)
    np.testing.assert_array_equal(np.asarray(out.tokens)[:, 1:], PAD)
