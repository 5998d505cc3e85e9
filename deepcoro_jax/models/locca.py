"""LocCa caption decoder: writes the angiography report from the video tokens.

A pre-LN transformer decoder over report tokens: token embedding plus learned
positions, then blocks of causal self-attention, cross-attention to the memory
(the encoder's video tokens [B, N, D_mem], linearly projected when D_mem is not
the decoder width, with an optional ``memory_mask`` [B, N], True = valid), and an
MLP; a final LayerNorm and an output projection that is the transposed token
embedding (``tie_embeddings=True``) or its own ``head`` Dense. Parameters are
float32, ``dtype`` is the compute dtype, logits are always float32.

One set of parameters, three ways to run it:

1. **Teacher forcing** (training, scoring):
   ``model.apply({'params': p}, shift_right(targets, bos_id), memory, memory_mask)``
   returns ``(logits [B, L, vocab], aux)``; position ``i`` predicts ``targets[:, i]``.
2. **Parallel prediction** (CapPa, arXiv:2306.07915), training only: with
   ``parallel_fraction > 0`` and ``train=True``, each example independently, with
   probability ``parallel_fraction`` (drawn from the ``'parallel'`` rng stream),
   replaces every input token by one learned ``mask_embedding`` (positions are
   still added) and drops the causal mask, so it must predict all report tokens
   at once from the video alone. The other examples are teacher-forced as usual;
   ``aux['is_parallel']`` [B] says which were which. This forces the decoder to
   read the video instead of leaning on the previous report tokens.
3. **Incremental decoding** with a KV cache held in the flax ``'cache'``
   collection::

       cache = model.init_cache(params, memory, memory_mask)
       logits, cache = model.decode_step(params, cache, tokens)  # tokens [B] -> [B, vocab]

   ``init_cache`` projects the memory once into every layer's cross-attention
   keys/values and allocates the self-attention cache; ``decode_step`` feeds the
   token at the next position (the first call takes BOS) and never sees the
   memory again. Cache layout (every non-scalar leaf is batch-major, which
   beam search relies on to reorder hypotheses)::

       position                         int32 []   next position to write
       block_i/self_attn/cached_key,    [B, max_len, heads, head_dim]
                         cached_value
       block_i/cross_attn/memory_key,   [B, N, heads, head_dim]
                          memory_value
       block_i/cross_attn/memory_mask   bool [B, N]

   More than ``max_len`` steps is not checked inside jit (the last slot would be
   overwritten); the loops in ``deepcoro_jax.models.decode`` never take more.

A teacher-forced call with ``mutable=['intermediates']`` also returns every
layer's cross-attention weights (``CrossAttention``), for attention maps
(``deepcoro_jax.tools.attention_maps``).

Not here: the decoding loops (``deepcoro_jax.models.decode``), the caption loss
(``deepcoro_jax.losses``), tokenisation, and the video encoder.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepcoro_jax.models.common import MlpBlock, attention, head_projection

Dtype = Any
Params = Any
Cache = Any

_EMBED_INIT = nn.initializers.normal(stddev=0.02)


def shift_right(targets: jax.Array, bos_id: int) -> jax.Array:
    """Decoder inputs for teacher forcing: ``bos_id`` then ``targets[:, :-1]``.

    Args:
        targets: int [B, L] report token ids.
        bos_id: the begin-of-sequence id put at position 0.

    Returns:
        int [B, L], same dtype as ``targets``.
    """
    if targets.ndim != 2:
        raise ValueError(f"shift_right: targets must be [B, L], got shape {targets.shape}")
    bos = jnp.full((targets.shape[0], 1), bos_id, dtype=targets.dtype)  # [B, 1]
    return jnp.concatenate([bos, targets[:, :-1]], axis=1)  # [B, L]


def _head_dim(width: int, num_heads: int, where: str) -> int:
    if width % num_heads:
        raise ValueError(f"{where}: width {width} is not divisible by num_heads={num_heads}")
    return width // num_heads


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with a KV cache for incremental decoding.

    Teacher forcing (``decode_position`` None): causal attention over the
    sequence, or ``mask`` (broadcastable to [B, heads, L, L]) when given.
    Decoding (``decode_position`` a traced int32 scalar): the first call creates
    a zero cache [B, max_len, heads, head_dim] and attends causally within its own
    input (its output is discarded by ``init_cache``); each later call takes one
    token x [B, 1, D], writes its key/value at ``decode_position`` and attends to
    positions ``<= decode_position``.
    """

    num_heads: int
    max_len: int
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None = None,
        decode_position: jax.Array | None = None,
    ) -> jax.Array:
        batch, _, width = x.shape
        head_dim = _head_dim(width, self.num_heads, "CausalSelfAttention")

        def project(name: str) -> jax.Array:
            return head_projection(name, self.num_heads, head_dim, self.dtype)(x)

        query, key, value = project("query"), project("key"), project("value")  # [B, L, H, Dh]
        is_causal = mask is None
        if decode_position is not None:
            cache_exists = self.has_variable("cache", "cached_key")
            cache_shape = (batch, self.max_len, self.num_heads, head_dim)
            cached_key = self.variable("cache", "cached_key", jnp.zeros, cache_shape, self.dtype)
            cached_value = self.variable(
                "cache", "cached_value", jnp.zeros, cache_shape, self.dtype
            )
            if cache_exists:
                start = (0, decode_position, 0, 0)
                key = jax.lax.dynamic_update_slice(cached_key.value, key.astype(self.dtype), start)
                value = jax.lax.dynamic_update_slice(
                    cached_value.value, value.astype(self.dtype), start
                )
                cached_key.value, cached_value.value = key, value  # [B, max_len, H, Dh]
                mask = (jnp.arange(self.max_len) <= decode_position)[None, None, None, :]
                is_causal = False
        out = attention(  # [B, L, H, Dh]
            query, key, value, mask=mask, is_causal=is_causal, implementation=self.attention_impl
        )
        return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name="out")(out)


def _attention_weights(query: jax.Array, key: jax.Array, mask: jax.Array | None) -> jax.Array:
    """softmax(q k^T / sqrt(head_dim)) over the keys, float32 [B, heads, Lq, Lk].

    The weights ``attention`` applies (its default scale); masked keys get 0.
    """
    scale = query.shape[-1] ** -0.5
    logits = jnp.einsum(
        "bqhd,bkhd->bhqk", query.astype(jnp.float32), key.astype(jnp.float32)
    )  # [B, H, Lq, Lk]
    logits = logits * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1)


class CrossAttention(nn.Module):
    """Multi-head attention from the report tokens to the memory (video tokens).

    With ``decode=True`` the memory's keys/values and mask are computed on the
    first call and stored in the ``'cache'`` collection; later calls read them
    and take ``memory=None``. Only when the ``'intermediates'`` collection is
    mutable (``apply(..., mutable=['intermediates'])``, as attention maps do) it
    also sows its attention weights, float32 [B, heads, L, N], as
    ``intermediates/.../cross_attn/attention_weights``; otherwise (training,
    decoding) nothing extra is computed.
    """

    num_heads: int
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        memory: jax.Array | None,
        memory_mask: jax.Array | None,
        decode: bool = False,
    ) -> jax.Array:
        width = x.shape[-1]
        head_dim = _head_dim(width, self.num_heads, "CrossAttention")

        def project(name: str, inputs: jax.Array) -> jax.Array:
            return head_projection(name, self.num_heads, head_dim, self.dtype)(inputs)

        query = project("query", x)  # [B, L, H, Dh]
        if decode and self.has_variable("cache", "memory_key"):
            key = self.get_variable("cache", "memory_key")  # [B, N, H, Dh]
            value = self.get_variable("cache", "memory_value")  # [B, N, H, Dh]
            memory_mask = self.get_variable("cache", "memory_mask")  # [B, N]
        else:
            if memory is None:
                raise ValueError("CrossAttention: memory is None and no cached memory keys")
            key = project("key", memory)  # [B, N, H, Dh]
            value = project("value", memory)  # [B, N, H, Dh]
            if decode:
                if memory_mask is None:
                    memory_mask = jnp.ones(memory.shape[:2], dtype=bool)
                self.put_variable("cache", "memory_key", key.astype(self.dtype))
                self.put_variable("cache", "memory_value", value.astype(self.dtype))
                self.put_variable("cache", "memory_mask", memory_mask)
        mask = None if memory_mask is None else memory_mask[:, None, None, :]  # [B, 1, 1, N]
        if self.is_mutable_collection("intermediates"):
            self.sow("intermediates", "attention_weights", _attention_weights(query, key, mask))
        out = attention(
            query,
            key.astype(query.dtype),
            value.astype(query.dtype),
            mask=mask,
            implementation=self.attention_impl,
        )
        return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name="out")(out)


class DecoderBlock(nn.Module):
    """Pre-LN block: x + SelfAttn(LN(x)), x + CrossAttn(LN(x), memory), x + MLP(LN(x))."""

    mlp_dim: int
    num_heads: int
    max_len: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        memory: jax.Array | None,
        memory_mask: jax.Array | None,
        self_mask: jax.Array | None,
        decode_position: jax.Array | None,
        train: bool,
    ) -> jax.Array:
        def residual(x: jax.Array, y: jax.Array) -> jax.Array:
            return x + nn.Dropout(self.dropout)(y, deterministic=not train)

        y = nn.LayerNorm(dtype=self.dtype, name="norm1")(x)
        y = CausalSelfAttention(
            self.num_heads, self.max_len, self.dtype, self.attention_impl, name="self_attn"
        )(y, self_mask, decode_position)
        x = residual(x, y)
        y = nn.LayerNorm(dtype=self.dtype, name="norm2")(x)
        y = CrossAttention(self.num_heads, self.dtype, self.attention_impl, name="cross_attn")(
            y, memory, memory_mask, decode_position is not None
        )
        x = residual(x, y)
        y = nn.LayerNorm(dtype=self.dtype, name="norm3")(x)
        y = MlpBlock(self.mlp_dim, self.dropout, dtype=self.dtype, name="mlp")(y, train)
        return residual(x, y)


class CaptionDecoder(nn.Module):
    """The LocCa report decoder; see the module docstring for its three call modes.

    Attributes:
        vocab_size: number of token ids.
        num_layers: decoder blocks.
        hidden_size: decoder width D.
        mlp_dim: hidden width of each block's MLP.
        num_heads: attention heads (must divide ``hidden_size``).
        max_len: longest token sequence (size of the learned position table and
            of the self-attention cache).
        tie_embeddings: output projection = transposed token embedding; else a
            separate ``head`` Dense.
        dropout: dropout rate on the embeddings, residual branches and MLP.
        parallel_fraction: probability that a training example uses CapPa
            parallel prediction; 0 disables it (and creates no mask embedding).
        attention_impl: the attention kernel, 'xla' or 'cudnn' (``common.attention``:
            cuDNN takes the causal self-attention and unmasked cross-attention of
            teacher forcing; masked attention and decoding steps stay on XLA).
        dtype: compute dtype.
    """

    vocab_size: int
    num_layers: int
    hidden_size: int
    mlp_dim: int
    num_heads: int
    max_len: int
    tie_embeddings: bool = True
    dropout: float = 0.0
    parallel_fraction: float = 0.0
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        memory: jax.Array | None,
        memory_mask: jax.Array | None = None,
        *,
        train: bool = False,
        decode: bool = False,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Runs the decoder.

        Args:
            tokens: int [B, L] decoder inputs (``shift_right(targets, bos_id)``);
                [B, 1] for a decoding step.
            memory: [B, N, D_mem] video tokens; None in decoding steps (read from
                the cache).
            memory_mask: optional bool [B, N], True = valid memory token.
            train: enables dropout and parallel prediction.
            decode: incremental decoding through the ``'cache'`` collection (must
                be mutable); use ``init_cache``/``decode_step`` rather than this.

        Returns:
            ``(logits, aux)``: logits float32 [B, L, vocab]; aux holds
            ``pre_logits`` [B, L, D] (after the final LayerNorm) and
            ``is_parallel`` bool [B].
        """
        self._check_inputs(tokens, memory, memory_mask, train, decode)
        batch, length = tokens.shape
        token_embedding = nn.Embed(
            self.vocab_size,
            self.hidden_size,
            embedding_init=_EMBED_INIT,
            dtype=self.dtype,
            name="token_embedding",
        )
        pos_table = self.param(
            "pos_embedding", _EMBED_INIT, (self.max_len, self.hidden_size), jnp.float32
        )
        decode_position = None
        if decode:
            cache_exists = self.has_variable("cache", "position")
            position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
            decode_position = position.value
            positions = jax.lax.dynamic_slice_in_dim(pos_table, decode_position, 1)  # [1, D]
            if cache_exists:
                position.value = decode_position + 1
        else:
            positions = pos_table[:length]  # [L, D]

        x = token_embedding(tokens)  # [B, L, D]
        is_parallel = jnp.zeros((batch,), dtype=bool)
        self_mask = None
        if self.parallel_fraction > 0:
            mask_embedding = self.param(
                "mask_embedding", _EMBED_INIT, (self.hidden_size,), jnp.float32
            )
            if train:
                is_parallel = jax.random.bernoulli(
                    self.make_rng("parallel"), self.parallel_fraction, (batch,)
                )
                x = jnp.where(is_parallel[:, None, None], mask_embedding.astype(x.dtype), x)
                causal = jnp.tril(jnp.ones((length, length), dtype=bool))  # [L, L]
                self_mask = causal[None, None] | is_parallel[:, None, None, None]  # [B, 1, L, L]
        x = (x + positions[None].astype(x.dtype)).astype(self.dtype)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)

        if memory is not None and memory.shape[-1] != self.hidden_size:
            memory = nn.Dense(self.hidden_size, dtype=self.dtype, name="memory_projection")(memory)
        for i in range(self.num_layers):
            x = DecoderBlock(
                self.mlp_dim,
                self.num_heads,
                self.max_len,
                self.dropout,
                self.dtype,
                self.attention_impl,
                name=f"block_{i}",
            )(x, memory, memory_mask, self_mask, decode_position, train)
        x = nn.LayerNorm(dtype=self.dtype, name="final_norm")(x)
        if self.tie_embeddings:
            logits = token_embedding.attend(x)  # [B, L, vocab]
        else:
            logits = nn.Dense(self.vocab_size, dtype=self.dtype, name="head")(x)
        return logits.astype(jnp.float32), {"pre_logits": x, "is_parallel": is_parallel}

    @nn.nowrap
    def init_cache(
        self, params: Params, memory: jax.Array, memory_mask: jax.Array | None = None
    ) -> Cache:
        """A fresh decoding cache for ``memory`` [B, N, D_mem] (see the module docstring).

        The memory is projected here, once, into every layer's cross-attention
        keys/values; ``decode_step`` never needs it again.
        """
        if memory.ndim != 3:
            raise ValueError(f"init_cache: memory must be [B, N, D], got shape {memory.shape}")
        placeholder_tokens = jnp.zeros((memory.shape[0], 1), dtype=jnp.int32)  # [B, 1]
        _, variables = self.apply(
            {"params": params},
            placeholder_tokens,
            memory,
            memory_mask,
            decode=True,
            mutable=["cache"],
        )
        return variables["cache"]

    @nn.nowrap
    def decode_step(
        self, params: Params, cache: Cache, tokens: jax.Array
    ) -> tuple[jax.Array, Cache]:
        """Feeds ``tokens`` [B] at the cache's next position.

        Returns:
            ``(logits, cache)``: float32 [B, vocab] for the following token, and
            the updated cache.
        """
        if tokens.ndim != 1:
            raise ValueError(f"decode_step: tokens must be [B], got shape {tokens.shape}")
        (logits, _), variables = self.apply(
            {"params": params, "cache": cache},
            tokens[:, None],
            None,
            decode=True,
            mutable=["cache"],
        )
        return logits[:, 0], variables["cache"]

    @nn.nowrap
    def _check_inputs(
        self,
        tokens: jax.Array,
        memory: jax.Array | None,
        memory_mask: jax.Array | None,
        train: bool,
        decode: bool,
    ) -> None:
        if not 0.0 <= self.parallel_fraction <= 1.0:
            raise ValueError(
                f"CaptionDecoder: parallel_fraction={self.parallel_fraction} is not in [0, 1]"
            )
        if tokens.ndim != 2:
            raise ValueError(f"CaptionDecoder: tokens must be [B, L], got shape {tokens.shape}")
        if tokens.shape[1] > self.max_len:
            raise ValueError(
                f"CaptionDecoder: tokens have length {tokens.shape[1]} > max_len={self.max_len}"
            )
        if decode and tokens.shape[1] != 1:
            raise ValueError(
                f"CaptionDecoder: decode=True takes one token per call, got shape {tokens.shape}"
            )
        if decode and train:
            raise ValueError("CaptionDecoder: decode=True runs without dropout; pass train=False")
        if memory is None:
            if not decode:
                raise ValueError("CaptionDecoder: memory is required unless decoding from a cache")
            return
        if memory.ndim != 3 or memory.shape[0] != tokens.shape[0]:
            raise ValueError(
                f"CaptionDecoder: memory must be [B={tokens.shape[0]}, N, D], "
                f"got shape {memory.shape}"
            )
        if memory_mask is not None and (
            memory_mask.shape != memory.shape[:2] or memory_mask.dtype != jnp.bool_
        ):
            raise ValueError(
                f"CaptionDecoder: memory_mask must be bool {memory.shape[:2]}, "
                f"got {memory_mask.dtype} {memory_mask.shape}"
            )
