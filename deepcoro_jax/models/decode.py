"""Autoregressive decoding on a KV cache: greedy, sampling, beam search.

Every decoding loop is one jitted program: it runs on device as a
``lax.while_loop`` over decoding steps, batched over examples, and **ends as
soon as every sequence has finished** (emitted ``eos_id``; for beam search, as
soon as no alive hypothesis can beat the finished ones), or after ``max_len``
steps. A returned sequence includes its EOS; every position after it, and every
position never reached, holds ``pad_id``. BOS is fed, not returned.
Log-probabilities are sums of the model's own (temperature 1) log-softmax over
the returned tokens, EOS included, pads excluded.

The loops work with any decoder that implements :class:`CachedDecoder` (the
LocCa ``CaptionDecoder`` does): ``init_cache(params, memory, memory_mask)`` and
``decode_step(params, cache, tokens [B]) -> (logits [B, vocab], cache)``, with
every cache leaf either a scalar shared by the batch or batch-major (beam
search reorders the leading axis). The decoder and ``max_len`` (and
``beam_size``) are static, so the decoder must be hashable (flax modules and
frozen dataclasses are); token ids and sampling/penalty settings are traced, so
changing them does not recompile. Use them as::

    out = decode.greedy(decoder, params, video_tokens, video_mask,
                        bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    out.tokens  # [B, max_len]

Not here: the decoder itself (``deepcoro_jax.models.locca``), detokenisation
and the captioning metrics (``evaluators/captioning.py``).
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

Params = Any
Cache = Any

# Stands in for -inf in scores, so that sums and divisions stay finite.
_NEG_INF = -1.0e9


class CachedDecoder(Protocol):
    """What the decoding loops need from a decoder (see the module docstring)."""

    max_len: int

    def init_cache(self, params: Params, memory: jax.Array, memory_mask: jax.Array | None) -> Cache:
        """A fresh cache for memory [B, N, D]."""
        ...

    def decode_step(
        self, params: Params, cache: Cache, tokens: jax.Array
    ) -> tuple[jax.Array, Cache]:
        """tokens [B] at the next position -> (logits [B, vocab], cache)."""
        ...


class DecodeOutput(NamedTuple):
    """tokens int32 [B, max_len]; log_probs float32 [B]."""

    tokens: jax.Array
    log_probs: jax.Array


class BeamOutput(NamedTuple):
    """The best hypothesis per example: tokens int32 [B, max_len], log_probs and scores [B].

    ``scores`` are the log-probabilities divided by the GNMT length penalty.
    """

    tokens: jax.Array
    log_probs: jax.Array
    scores: jax.Array


def resolve_max_len(decoder: Any, max_len: int | None) -> int:
    """``max_len``, or the decoder's own when None; in [1, decoder.max_len]."""
    limit = decoder.max_len
    max_len = limit if max_len is None else max_len
    if not 1 <= max_len <= limit:
        raise ValueError(f"decode: max_len={max_len} must be in [1, decoder.max_len={limit}]")
    return max_len


def _decode_loop(
    decoder: CachedDecoder,
    params: Params,
    memory: jax.Array,
    memory_mask: jax.Array | None,
    choose: Callable[[jax.Array, jax.Array], jax.Array],
    bos_id: jax.Array,
    eos_id: jax.Array,
    pad_id: jax.Array,
    max_len: int,
) -> DecodeOutput:
    """One token per step for every sequence; ``choose(logits [B, V], step) -> tokens [B]``."""
    batch = memory.shape[0]

    def keep_going(state: tuple) -> jax.Array:
        step, _, _, _, finished, _ = state
        return (step < max_len) & ~jnp.all(finished)

    def one_step(state: tuple) -> tuple:
        step, cache, last_tokens, tokens, finished, log_probs = state
        logits, cache = decoder.decode_step(params, cache, last_tokens)
        logits = logits.astype(jnp.float32)  # [B, V]
        next_tokens = choose(logits, step).astype(jnp.int32)  # [B]
        token_log_probs = jnp.take_along_axis(
            jax.nn.log_softmax(logits), next_tokens[:, None], axis=1
        )[:, 0]  # [B]
        next_tokens = jnp.where(finished, pad_id, next_tokens)
        log_probs = log_probs + jnp.where(finished, 0.0, token_log_probs)
        tokens = tokens.at[:, step].set(next_tokens)
        finished = finished | (next_tokens == eos_id)
        return step + 1, cache, next_tokens, tokens, finished, log_probs

    init_state = (
        jnp.zeros((), jnp.int32),
        decoder.init_cache(params, memory, memory_mask),
        jnp.full((batch,), bos_id, jnp.int32),
        jnp.full((batch, max_len), pad_id, jnp.int32),
        jnp.zeros((batch,), bool),
        jnp.zeros((batch,), jnp.float32),
    )
    *_, tokens, _, log_probs = jax.lax.while_loop(keep_going, one_step, init_state)
    return DecodeOutput(tokens, log_probs)


@functools.partial(jax.jit, static_argnames=("decoder", "max_len"))
def greedy(
    decoder: CachedDecoder,
    params: Params,
    memory: jax.Array,
    memory_mask: jax.Array | None = None,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_len: int | None = None,
) -> DecodeOutput:
    """Greedy decoding on the cache (argmax at every step).

    Args:
        decoder: a :class:`CachedDecoder`, e.g. a ``CaptionDecoder``.
        params: the decoder's parameters.
        memory: [B, N, D_mem] encoder tokens.
        memory_mask: optional bool [B, N], True = valid.
        bos_id, eos_id, pad_id: special token ids.
        max_len: most tokens per sequence; defaults to ``decoder.max_len``.
    """
    max_len = resolve_max_len(decoder, max_len)
    choose = lambda logits, _: jnp.argmax(logits, axis=-1)
    return _decode_loop(
        decoder, params, memory, memory_mask, choose, bos_id, eos_id, pad_id, max_len
    )


def _filter_logits(
    logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array
) -> jax.Array:
    """Logits [B, V] over temperature, with tokens outside top-k, then top-p, set to -inf.

    ``top_k`` 0 and ``top_p`` >= 1 switch their filter off.
    """
    logits = logits / temperature
    vocab = logits.shape[-1]
    sorted_logits = -jnp.sort(-logits, axis=-1)  # [B, V], descending
    rank = jnp.arange(vocab)[None, :]  # [1, V]
    sorted_logits = jnp.where((top_k > 0) & (rank >= top_k), -jnp.inf, sorted_logits)
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)  # [B, V]
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # [B, V]
    # The smallest prefix whose mass reaches top_p (the top token always) survives.
    keep = (sorted_logits > -jnp.inf) & ((top_p >= 1.0) | (mass_before < top_p))
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def sample(
    decoder: CachedDecoder,
    params: Params,
    memory: jax.Array,
    memory_mask: jax.Array | None,
    rng: jax.Array,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_len: int | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> DecodeOutput:
    """Ancestral sampling on the cache, with temperature, top-k and nucleus (top-p) filtering.

    Args: as :func:`greedy`, plus
        rng: a PRNG key; step ``t`` samples with ``fold_in(rng, t)``.
        temperature: > 0; logits are divided by it before filtering and sampling.
        top_k: sample among the ``top_k`` most likely tokens; 0 = all.
        top_p: then among the smallest set of most likely tokens whose
            probability (after temperature and top-k) reaches ``top_p``; 1.0 = all.

    The three settings are Python numbers, checked here, then traced into the
    jitted loop. ``log_probs`` are under the model (temperature 1, unfiltered),
    not under the sampling distribution.
    """
    if not temperature > 0:
        raise ValueError(f"sample: temperature={temperature} must be > 0 (use greedy for 0)")
    if top_k < 0:
        raise ValueError(f"sample: top_k={top_k} must be >= 0 (0 = no top-k filtering)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"sample: top_p={top_p} must be in (0, 1]")
    return _sample_loop(
        decoder,
        params,
        memory,
        memory_mask,
        rng,
        jnp.float32(temperature),
        jnp.int32(top_k),
        jnp.float32(top_p),
        bos_id,
        eos_id,
        pad_id,
        max_len=resolve_max_len(decoder, max_len),
    )


@functools.partial(jax.jit, static_argnames=("decoder", "max_len"))
def _sample_loop(
    decoder: CachedDecoder,
    params: Params,
    memory: jax.Array,
    memory_mask: jax.Array | None,
    rng: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    bos_id: jax.Array,
    eos_id: jax.Array,
    pad_id: jax.Array,
    *,
    max_len: int,
) -> DecodeOutput:
    def choose(logits: jax.Array, step: jax.Array) -> jax.Array:
        filtered = _filter_logits(logits, temperature, top_k, top_p)
        return jax.random.categorical(jax.random.fold_in(rng, step), filtered)

    return _decode_loop(
        decoder, params, memory, memory_mask, choose, bos_id, eos_id, pad_id, max_len
    )


def beam_search(
    decoder: CachedDecoder,
    params: Params,
    memory: jax.Array,
    memory_mask: jax.Array | None = None,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_len: int | None = None,
    beam_size: int = 4,
    length_penalty: float = 0.6,
) -> BeamOutput:
    """Beam search on the cache with the GNMT/T5 length penalty.

    Each step extends the ``beam_size`` alive hypotheses of every example by
    every token and ranks the candidates by log-probability. Candidates ending
    in EOS that rank among the first ``beam_size`` join the example's pool of
    finished hypotheses, which keeps the best ``beam_size`` by score =
    log_prob / ((5 + length) / 6) ** length_penalty (length counts the EOS);
    the best ``beam_size`` candidates not ending in EOS stay alive. An example
    is done when its finished pool is full and no alive hypothesis can still
    beat its worst finished one (bounded with the penalty at ``max_len``). The
    answer is the best-scoring hypothesis among the finished and the alive ones
    (the latter scored at their current length, i.e. truncated at ``max_len``).
    With ``beam_size=1`` and ``length_penalty=0`` this is exactly greedy decoding.

    Args: as :func:`greedy`, plus
        beam_size: hypotheses kept per example, >= 1 (static).
        length_penalty: alpha >= 0; 0 ranks by plain log-probability (traced).
    """
    if beam_size < 1:
        raise ValueError(f"beam_search: beam_size={beam_size} must be >= 1")
    if not length_penalty >= 0:
        raise ValueError(f"beam_search: length_penalty={length_penalty} must be >= 0")
    return _beam_search_loop(
        decoder,
        params,
        memory,
        memory_mask,
        bos_id,
        eos_id,
        pad_id,
        jnp.float32(length_penalty),
        max_len=resolve_max_len(decoder, max_len),
        beam_size=beam_size,
    )


def _length_penalty(length: jax.Array, alpha: jax.Array) -> jax.Array:
    """GNMT length penalty ((5 + length) / 6) ** alpha."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _gather_beams(x: jax.Array, beam_indices: jax.Array) -> jax.Array:
    """x [B, K_in, ...] -> [B, K_out, ...] picking ``beam_indices`` [B, K_out] along axis 1."""
    indices = beam_indices.reshape(beam_indices.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, indices, axis=1)


@functools.partial(jax.jit, static_argnames=("decoder", "max_len", "beam_size"))
def _beam_search_loop(
    decoder: CachedDecoder,
    params: Params,
    memory: jax.Array,
    memory_mask: jax.Array | None,
    bos_id: jax.Array,
    eos_id: jax.Array,
    pad_id: jax.Array,
    alpha: jax.Array,
    *,
    max_len: int,
    beam_size: int,
) -> BeamOutput:
    batch, num_beams = memory.shape[0], beam_size
    flat_batch = batch * num_beams

    # Every example's memory repeated once per beam: batch-major [B * K, ...].
    memory = jnp.repeat(memory, num_beams, axis=0)  # [B*K, N, D]
    if memory_mask is not None:
        memory_mask = jnp.repeat(memory_mask, num_beams, axis=0)  # [B*K, N]
    max_penalty = _length_penalty(max_len, alpha)

    def reorder_cache(cache: Cache, flat_indices: jax.Array) -> Cache:
        def reorder(leaf: jax.Array) -> jax.Array:
            if leaf.ndim == 0:
                return leaf
            if leaf.shape[0] != flat_batch:
                raise ValueError(
                    f"beam_search: cache leaf of shape {leaf.shape} is neither a scalar "
                    f"nor batch-major with leading size {flat_batch}"
                )
            return leaf[flat_indices]

        return jax.tree.map(reorder, cache)

    def keep_going(state: dict) -> jax.Array:
        best_alive = jnp.max(state["alive_log_probs"], axis=1) / max_penalty  # [B]
        worst_finished = jnp.min(state["finished_scores"], axis=1)  # [B]
        return (state["step"] < max_len) & ~jnp.all(worst_finished > best_alive)

    def one_step(state: dict) -> dict:
        step = state["step"]
        logits, cache = decoder.decode_step(
            params, state["cache"], state["alive_last"].reshape(flat_batch)
        )
        log_softmax = jax.nn.log_softmax(logits.astype(jnp.float32))  # [B*K, V]
        vocab = log_softmax.shape[-1]
        candidates = state["alive_log_probs"][:, :, None] + log_softmax.reshape(
            batch, num_beams, vocab
        )  # [B, K, V]
        top_log_probs, top_flat = jax.lax.top_k(
            candidates.reshape(batch, num_beams * vocab), 2 * num_beams
        )  # [B, 2K]: at most K of them end in EOS, so K others can stay alive
        top_beams, top_tokens = top_flat // vocab, top_flat % vocab  # [B, 2K]
        top_seqs = _gather_beams(state["alive_seqs"], top_beams)  # [B, 2K, max_len]
        top_seqs = top_seqs.at[:, :, step].set(top_tokens)
        is_real = top_log_probs > _NEG_INF / 2  # not grown from an unused initial beam
        is_eos = top_tokens == eos_id

        # Finished: EOS candidates among the first K ranks join the pool.
        joins = is_eos & is_real & (jnp.arange(2 * num_beams) < num_beams)[None, :]
        new_scores = top_log_probs / _length_penalty(step + 1, alpha)
        pool_scores = jnp.concatenate(
            [state["finished_scores"], jnp.where(joins, new_scores, _NEG_INF)], axis=1
        )  # [B, 3K]
        pool_log_probs = jnp.concatenate(
            [state["finished_log_probs"], jnp.where(joins, top_log_probs, _NEG_INF)], axis=1
        )  # [B, 3K]
        pool_seqs = jnp.concatenate([state["finished_seqs"], top_seqs], axis=1)
        finished_scores, keep = jax.lax.top_k(pool_scores, num_beams)  # [B, K]

        # Alive: the best K candidates that did not end in EOS.
        alive_log_probs, alive_pos = jax.lax.top_k(
            jnp.where(is_eos, _NEG_INF, top_log_probs), num_beams
        )  # [B, K]
        source_beams = jnp.take_along_axis(top_beams, alive_pos, axis=1)  # [B, K]
        flat_sources = (jnp.arange(batch)[:, None] * num_beams + source_beams).reshape(-1)
        return {
            "step": step + 1,
            "cache": reorder_cache(cache, flat_sources),
            "alive_seqs": _gather_beams(top_seqs, alive_pos),
            "alive_log_probs": alive_log_probs,
            "alive_last": jnp.take_along_axis(top_tokens, alive_pos, axis=1),
            "finished_seqs": _gather_beams(pool_seqs, keep),
            "finished_scores": finished_scores,
            "finished_log_probs": jnp.take_along_axis(pool_log_probs, keep, axis=1),
        }

    # Only beam 0 is live at the start, so the K beams do not all grow the same prefix.
    initial_log_probs = jnp.where(jnp.arange(num_beams) == 0, 0.0, _NEG_INF)
    init_state = {
        "step": jnp.zeros((), jnp.int32),
        "cache": decoder.init_cache(params, memory, memory_mask),
        "alive_seqs": jnp.full((batch, num_beams, max_len), pad_id, jnp.int32),
        "alive_log_probs": jnp.broadcast_to(initial_log_probs, (batch, num_beams)),
        "alive_last": jnp.full((batch, num_beams), bos_id, jnp.int32),
        "finished_seqs": jnp.full((batch, num_beams, max_len), pad_id, jnp.int32),
        "finished_scores": jnp.full((batch, num_beams), _NEG_INF, jnp.float32),
        "finished_log_probs": jnp.full((batch, num_beams), _NEG_INF, jnp.float32),
    }
    final = jax.lax.while_loop(keep_going, one_step, init_state)

    alive_scores = final["alive_log_probs"] / _length_penalty(final["step"], alpha)
    scores = jnp.concatenate([final["finished_scores"], alive_scores], axis=1)  # [B, 2K]
    log_probs = jnp.concatenate(
        [final["finished_log_probs"], final["alive_log_probs"]], axis=1
    )  # [B, 2K]
    seqs = jnp.concatenate([final["finished_seqs"], final["alive_seqs"]], axis=1)
    best = jnp.argmax(scores, axis=1)[:, None]  # [B, 1]
    return BeamOutput(
        tokens=_gather_beams(seqs, best)[:, 0],
        log_probs=jnp.take_along_axis(log_probs, best, axis=1)[:, 0],
        scores=jnp.take_along_axis(scores, best, axis=1)[:, 0],
    )


@functools.partial(jax.jit, static_argnames=("decoder",))
def prefixed_greedy(
    decoder: CachedDecoder,
    params: Params,
    memory: jax.Array,
    memory_mask: jax.Array | None,
    prefix: jax.Array,
    prefix_len: jax.Array,
    step_masks: jax.Array,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
) -> DecodeOutput:
    """Greedy decoding after a forced prefix, each generated token restricted to allowed ids.

    The LocCa location tasks' decoding (``deepcoro_jax.domain.locations``): the decoder
    is fed BOS, then ``prefix[b, :prefix_len[b]]`` (teacher-forced, not returned), then
    its own argmax tokens; generated token ``g`` may only take the ids where
    ``step_masks[g]`` is True (e.g. a frame-time token, then four coordinate tokens).
    Rows with prefixes of different lengths decode together: each starts generating
    right after its own prefix. After a row emits ``eos_id`` it emits ``pad_id``.

    Args:
        decoder, params, memory, memory_mask: as in :func:`greedy`.
        prefix: int [B, P] prefix ids (anything after ``prefix_len``); P may be 0.
        prefix_len: int [B] in [0, P].
        step_masks: bool [G, vocab]: what generated token g may be; G steps in all.
        bos_id, eos_id, pad_id: special ids.

    Returns:
        tokens int32 [B, G] and the model's log-probabilities of them (temperature 1,
        unrestricted), summed over the tokens before padding.
    """
    batch, prefix_width = prefix.shape
    num_generated = step_masks.shape[0]
    steps = prefix_width + num_generated
    if steps > decoder.max_len:
        raise ValueError(
            f"prefixed_greedy: prefix width {prefix_width} + {num_generated} generated tokens "
            f"exceed the decoder's max_len {decoder.max_len}"
        )
    prefix = prefix.astype(jnp.int32)
    prefix_len = prefix_len.astype(jnp.int32)
    padded_prefix = jnp.concatenate(
        [prefix, jnp.full((batch, num_generated), pad_id, jnp.int32)], axis=1
    )  # [B, steps]: indexable at any step

    def one_step(step: jax.Array, state: tuple) -> tuple:
        cache, last_tokens, tokens, finished, log_probs = state
        logits, cache = decoder.decode_step(params, cache, last_tokens)
        logits = logits.astype(jnp.float32)  # [B, V]
        generated = step - prefix_len  # [B]: which generated token this step gives
        generating = (generated >= 0) & (generated < num_generated)
        index = jnp.clip(generated, 0, num_generated - 1)
        allowed = step_masks[index]  # [B, V]
        choice = jnp.argmax(jnp.where(allowed, logits, -jnp.inf), axis=-1).astype(jnp.int32)
        choice_log_prob = jnp.take_along_axis(
            jax.nn.log_softmax(logits), choice[:, None], axis=1
        )[:, 0]
        emitted = generating & ~finished
        choice = jnp.where(emitted, choice, pad_id)
        log_probs = log_probs + jnp.where(emitted, choice_log_prob, 0.0)
        rows = jnp.arange(batch)
        tokens = tokens.at[rows, index].set(jnp.where(generating, choice, tokens[rows, index]))
        finished = finished | (emitted & (choice == eos_id))
        # The next input: the prefix while it lasts, then the token just chosen.
        next_tokens = jnp.where(step < prefix_len, padded_prefix[:, step], choice)
        return cache, next_tokens, tokens, finished, log_probs

    init = (
        decoder.init_cache(params, memory, memory_mask),
        jnp.full((batch,), bos_id, jnp.int32),
        jnp.full((batch, num_generated), pad_id, jnp.int32),
        jnp.zeros((batch,), bool),
        jnp.zeros((batch,), jnp.float32),
    )
    _, _, tokens, _, log_probs = jax.lax.fori_loop(0, steps, one_step, init)
    return DecodeOutput(tokens, log_probs)
