"""Transformer pieces shared by the model files: MLP, attention, pre-LN block, MAP pooling.

Also the resizing of learned positional-embedding grids. Each piece is generic
(no video, text or task knowledge); whole models live in their own files.
Parameters are float32; ``dtype`` is the compute dtype (e.g. ``jnp.bfloat16``).
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None = None,
    is_causal: bool = False,
) -> jax.Array:
    """Scaled dot-product attention on [B, L, heads, head_dim] inputs.

    A thin wrapper around ``jax.nn.dot_product_attention`` with its default
    implementation, which is the XLA kernel on every backend: it stores each
    [Lq, Lk] score matrix for the backward pass (for ViViT-B's 1568 tokens at
    batch 16, an estimated 0.9-1.9 GB per layer; docs/running.md has the GPU
    table). ``implementation='cudnn'`` (fused attention) would avoid it but has
    not been measured here yet (benchmarks/gpu.sh).

    Args:
        query: [B, Lq, heads, head_dim].
        key: [B, Lk, heads, head_dim].
        value: [B, Lk, heads, head_dim].
        mask: optional bool array broadcastable to [B, heads, Lq, Lk]; True means
            "may attend". A query row whose keys are all masked gets a uniform
            average, so callers should not rely on its value.
        is_causal: apply a causal (lower-triangular) mask as well.

    Returns:
        [B, Lq, heads, head_dim].
    """
    return jax.nn.dot_product_attention(query, key, value, mask=mask, is_causal=is_causal)


class MlpBlock(nn.Module):
    """Dense -> GELU -> dropout -> Dense, back to the input width."""

    mlp_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        width = x.shape[-1]
        x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(x)
        x = nn.gelu(x)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        return nn.Dense(width, dtype=self.dtype, name="fc2")(x)


def head_projection(name: str, num_heads: int, head_dim: int, dtype: Dtype) -> nn.DenseGeneral:
    """The [..., D] -> [..., heads, head_dim] projection named 'query', 'key' or 'value'.

    Call it inside a compact module (the Dense is that module's child `name`).
    The key projection has no bias: a key bias b adds q.b to every score of a
    query, which the softmax over keys removes, so its gradient is exactly zero
    and an optimizer would only turn rounding noise into updates.
    """
    return nn.DenseGeneral((num_heads, head_dim), use_bias=name != "key", dtype=dtype, name=name)


class MultiHeadAttention(nn.Module):
    """Multi-head attention (self- or cross-) through :func:`attention`; projections
    from :func:`head_projection`."""

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, inputs_q: jax.Array, inputs_kv: jax.Array, mask: jax.Array | None = None
    ) -> jax.Array:
        """inputs_q [B, Lq, D], inputs_kv [B, Lk, Dkv], mask as in :func:`attention`."""
        width = inputs_q.shape[-1]
        if width % self.num_heads:
            raise ValueError(
                f"MultiHeadAttention: width {width} not divisible by num_heads={self.num_heads}"
            )
        head_dim = width // self.num_heads

        def project(name: str, inputs: jax.Array) -> jax.Array:
            return head_projection(name, self.num_heads, head_dim, self.dtype)(inputs)

        query = project("query", inputs_q)  # [B, Lq, heads, head_dim]
        key = project("key", inputs_kv)  # [B, Lk, heads, head_dim]
        value = project("value", inputs_kv)  # [B, Lk, heads, head_dim]
        out = attention(query, key, value, mask=mask)  # [B, Lq, heads, head_dim]
        return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name="out")(out)


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    mlp_dim: int
    num_heads: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        """x [B, L, D]; mask broadcastable to [B, heads, L, L] (True = attend).

        ``train`` is positional argument 3 (counting ``self``) so that it can be
        marked static when the block is wrapped in ``nn.remat``.
        """
        y = nn.LayerNorm(dtype=self.dtype, name="norm1")(x)
        y = MultiHeadAttention(self.num_heads, dtype=self.dtype, name="attn")(y, y, mask)
        x = x + nn.Dropout(self.dropout)(y, deterministic=not train)
        y = nn.LayerNorm(dtype=self.dtype, name="norm2")(x)
        y = MlpBlock(self.mlp_dim, self.dropout, dtype=self.dtype, name="mlp")(y, train)
        return x + nn.Dropout(self.dropout)(y, deterministic=not train)


class MAPHead(nn.Module):
    """Multi-head attention pooling with a learned probe (as in big_vision's ViT).

    Tokens whose ``key_mask`` entry is False never influence the result: they
    get zero attention weight and their values are zeroed first (so even NaNs
    there cannot leak). A row with no valid token returns the probe's
    attention over zeros, a constant; callers mask such rows themselves.
    """

    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
        """x [B, N, D], key_mask [B, N] bool (True = valid) -> pooled [B, D]."""
        batch, _, width = x.shape
        probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, width), jnp.float32)
        probe = jnp.broadcast_to(probe.astype(self.dtype), (batch, 1, width))  # [B, 1, D]
        mask = None
        if key_mask is not None:
            if key_mask.shape != x.shape[:2]:
                raise ValueError(
                    f"MAPHead: key_mask shape {key_mask.shape} does not match the tokens' "
                    f"[B, N] = {x.shape[:2]}"
                )
            x = jnp.where(key_mask[:, :, None], x, jnp.zeros((), x.dtype))
            mask = key_mask[:, None, None, :]  # [B, 1 head, 1 query, N]
        pooled = MultiHeadAttention(self.num_heads, dtype=self.dtype, name="attn")(probe, x, mask)
        y = nn.LayerNorm(dtype=self.dtype, name="norm")(pooled)
        pooled = pooled + MlpBlock(self.mlp_dim, dtype=self.dtype, name="mlp")(y)
        return pooled[:, 0]  # [B, D]


def resize_posemb(posemb: jax.Array, new_grid: Sequence[int]) -> jax.Array:
    """Resizes a positional-embedding grid [*grid, D] to [*new_grid, D].

    Linear interpolation along each grid axis whose size changes (so linear over
    time for a [T, D] table, bilinear over space for an [H, W, D] one), with
    half-pixel centres (``align_corners=False``), edge values repeated and no
    antialiasing, i.e. the same sampling as ``jax.image.resize(...,
    antialias=False)``. Returns the input unchanged when the grids match.
    """
    new_grid = tuple(int(n) for n in new_grid)
    if len(new_grid) != posemb.ndim - 1:
        raise ValueError(
            f"resize_posemb: new_grid {new_grid} must have {posemb.ndim - 1} entries "
            f"for an embedding of shape {posemb.shape}"
        )
    if tuple(posemb.shape[:-1]) == new_grid:
        return posemb
    return jax.image.resize(posemb, (*new_grid, posemb.shape[-1]), method="linear", antialias=False)
