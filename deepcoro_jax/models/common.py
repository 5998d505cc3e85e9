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
import numpy as np

Dtype = Any


ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def resolve_attention(implementation: str, dtype: Dtype, platform: str | None = None) -> str:
    """The attention kernel a model should use: 'xla' or 'cudnn'.

    'auto' gives 'cudnn' (fused flash attention, which never stores the [Lq, Lk]
    score matrices) on NVIDIA GPUs with a 16-bit compute dtype, and 'xla'
    everywhere else (CPU, TPU, float32). 'cudnn' asked for explicitly must have
    both; 'xla' is always possible. `platform` defaults to JAX's default backend.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation {implementation!r}: choose one of "
            f"{ATTENTION_IMPLEMENTATIONS}"
        )
    platform = platform or jax.default_backend()
    sixteen_bit = jnp.dtype(dtype) in _CUDNN_DTYPES
    if implementation == "auto":
        return "cudnn" if platform == "gpu" and sixteen_bit else "xla"
    if implementation == "cudnn" and (platform != "gpu" or not sixteen_bit):
        raise ValueError(
            f"attention implementation 'cudnn' needs an NVIDIA GPU and a bfloat16 or float16 "
            f"compute dtype; this is {platform} with {jnp.dtype(dtype).name}. Use 'auto' or 'xla'"
        )
    return implementation


def cudnn_applies(query: jax.Array, key: jax.Array) -> bool:
    """Whether cuDNN's fused kernel takes these [B, L, heads, head_dim] inputs: 16-bit,
    a head_dim that is a multiple of 8 up to 128, and more than one query (single-query
    attention, as in MAP pooling and incremental decoding, gains nothing from it)."""
    head_dim = query.shape[-1]
    return (
        query.dtype in _CUDNN_DTYPES
        and key.dtype == query.dtype
        and head_dim % 8 == 0
        and head_dim <= 128
        and query.shape[1] > 1
    )


def attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    implementation: str = "xla",
    key_lengths: jax.Array | None = None,
) -> jax.Array:
    """Scaled dot-product attention on [B, L, heads, head_dim] inputs.

    A thin wrapper around ``jax.nn.dot_product_attention``. With
    ``implementation='xla'`` it is XLA's kernel, which stores each [Lq, Lk]
    score matrix for the backward pass (for ViViT-B's 1568 tokens at batch 16,
    an estimated 0.9-1.9 GB per layer). With 'cudnn' (see
    :func:`resolve_attention`) it is cuDNN's fused flash attention wherever
    that applies (no general `mask`, and :func:`cudnn_applies`), XLA's
    otherwise; both compute the same function. `key_lengths` and `is_causal`
    are masks cuDNN takes.

    Args:
        query: [B, Lq, heads, head_dim].
        key: [B, Lk, heads, head_dim].
        value: [B, Lk, heads, head_dim].
        mask: optional bool array broadcastable to [B, heads, Lq, Lk]; True means
            "may attend". A query row whose keys are all masked gets a uniform
            average, so callers should not rely on its value.
        is_causal: apply a causal (lower-triangular) mask as well.
        implementation: 'xla' or 'cudnn' (resolved, not 'auto').
        key_lengths: optional int [B]: query b attends only to its first
            key_lengths[b] keys (right padding).

    Returns:
        [B, Lq, heads, head_dim].
    """
    fused = implementation == "cudnn" and mask is None and cudnn_applies(query, key)
    return jax.nn.dot_product_attention(
        query,
        key,
        value,
        mask=mask,
        is_causal=is_causal,
        key_value_seq_lengths=key_lengths,
        implementation="cudnn" if fused else None,
    )


class MlpBlock(nn.Module):
    """Dense -> GELU -> dropout -> Dense, back to the input width.

    ``approximate_gelu``: the tanh approximation of GELU (True, as ViViT and
    big_vision use) or the exact erf form (False, as VideoMAE and BERT use).
    """

    mlp_dim: int
    dropout: float = 0.0
    approximate_gelu: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        width = x.shape[-1]
        x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(x)
        x = nn.gelu(x, approximate=self.approximate_gelu)
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
    from :func:`head_projection`. ``attention_impl``: 'xla' or 'cudnn' (its kernel)."""

    num_heads: int
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

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
        out = attention(query, key, value, mask=mask, implementation=self.attention_impl)
        return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name="out")(out)


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)).

    ``norm_eps`` is the LayerNorms' epsilon and ``approximate_gelu`` the MLP's
    GELU (see ``MlpBlock``); the defaults are big_vision's. ``attention_impl`` is the
    attention kernel, 'xla' or 'cudnn' (:func:`attention`).
    """

    mlp_dim: int
    num_heads: int
    dropout: float = 0.0
    norm_eps: float = 1e-6
    approximate_gelu: bool = True
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        """x [B, L, D]; mask broadcastable to [B, heads, L, L] (True = attend).

        ``train`` is positional argument 3 (counting ``self``) so that it can be
        marked static when the block is wrapped in ``nn.remat``.
        """
        y = nn.LayerNorm(self.norm_eps, dtype=self.dtype, name="norm1")(x)
        y = MultiHeadAttention(
            self.num_heads, dtype=self.dtype, attention_impl=self.attention_impl, name="attn"
        )(y, y, mask)
        x = x + nn.Dropout(self.dropout)(y, deterministic=not train)
        y = nn.LayerNorm(self.norm_eps, dtype=self.dtype, name="norm2")(x)
        y = MlpBlock(
            self.mlp_dim, self.dropout, self.approximate_gelu, dtype=self.dtype, name="mlp"
        )(y, train)
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


def _linear_weights(new: int, old: int) -> np.ndarray:
    """[new, old] weights of linear resampling with half-pixel centres (PyTorch's
    ``interpolate(mode='linear', align_corners=False)``: positions left of the first
    centre take the first value)."""
    weights = np.zeros((new, old))
    for i in range(new):
        x = max((i + 0.5) * old / new - 0.5, 0.0)
        x0 = min(int(np.floor(x)), old - 1)
        x1 = min(x0 + 1, old - 1)
        frac = x - x0
        weights[i, x0] += 1.0 - frac
        weights[i, x1] += frac
    return weights


def _cubic_weights(new: int, old: int, a: float = -0.75) -> np.ndarray:
    """[new, old] weights of cubic-convolution resampling with half-pixel centres and
    the border sample repeated (PyTorch's ``interpolate(mode='bicubic',
    align_corners=False)`` along one axis, a = -0.75)."""

    def kernel(d: float) -> float:
        d = abs(d)
        if d <= 1:
            return ((a + 2) * d - (a + 3)) * d * d + 1
        if d < 2:
            return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
        return 0.0

    weights = np.zeros((new, old))
    for i in range(new):
        x = (i + 0.5) * old / new - 0.5
        x0 = int(np.floor(x))
        for tap in range(x0 - 1, x0 + 3):
            weights[i, min(max(tap, 0), old - 1)] += kernel(x - tap)
    return weights


def interpolate_posemb_grid(posemb: jax.Array, new_grid: Sequence[int]) -> jax.Array:
    """Resizes a learned space-time positional table [T, H, W, D] to [*new_grid, D]:
    linear in time, bicubic in space, as pretrained ViT and VideoMAE checkpoints are
    adapted to other input sizes (PyTorch's ``interpolate`` conventions: half-pixel
    centres, no antialiasing, a = -0.75). Returns the input when the grids match."""
    new_grid = tuple(int(n) for n in new_grid)
    if posemb.ndim != 4 or len(new_grid) != 3:
        raise ValueError(
            f"interpolate_posemb_grid: need a [T, H, W, D] table and a (T, H, W) grid, got "
            f"{posemb.shape} and {new_grid}"
        )
    t, h, w, _ = posemb.shape
    if (t, h, w) == new_grid:
        return posemb
    time = jnp.asarray(_linear_weights(new_grid[0], t), posemb.dtype)
    rows = jnp.asarray(_cubic_weights(new_grid[1], h), posemb.dtype)
    cols = jnp.asarray(_cubic_weights(new_grid[2], w), posemb.dtype)
    return jnp.einsum("at,bh,cw,thwd->abcd", time, rows, cols, posemb)


def sincos_posemb(num_positions: int, width: int) -> np.ndarray:
    """The fixed 1-D sinusoid table [num_positions, width] of VideoMAE (and the
    original Transformer): angle(p, j) = p / 10000**(2 * (j // 2) / width), sine on
    the even channels and cosine on the odd ones (interleaved); float32, computed in
    float64."""
    positions = np.arange(num_positions, dtype=np.float64)[:, None]
    channels = np.arange(width)[None, :]
    angles = positions / np.power(10000.0, 2 * (channels // 2) / width)
    table = np.where(channels % 2 == 0, np.sin(angles), np.cos(angles))
    return table.astype(np.float32)
