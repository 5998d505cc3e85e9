"""Masked video modelling (VideoMAE / AV-MAE style): tubelets, masks, targets, decoder.

The token order everywhere is the ViViT encoder's: the row-major flattening of
the (T', H', W') tubelet grid, token ``n = (t * H' + h) * W' + w``, and a
tubelet's pixels are flattened in (pt, ph, pw, C) order, the same order as the
flattened kernel of the encoder's tubelet convolution.

Typical use in a train step::

    keep, masked = tube_mask(rng, batch, grid, mask_ratio=0.9)
    _, enc_aux = encoder.apply(enc_vars, video, keep_indices=keep)
    pred, _ = decoder.apply(dec_vars, enc_aux["tokens"], keep, masked, grid)
    target = jnp.take_along_axis(tubelet_targets(video, patch_size), masked[..., None], axis=1)

Not here: the loss (``deepcoro_jax.losses``) and the encoder (``vivit.py``).
"""

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepcoro_jax.models.common import Dtype, EncoderBlock, resize_posemb, sincos_posemb

Grid = tuple[int, int, int]


def tubelet_grid(video_shape: Sequence[int], patch_size: Sequence[int]) -> Grid:
    """(T', H', W') = (T // pt, H // ph, W // pw) for a video shape [..., T, H, W, C].

    Raises ValueError when the video is not divisible into whole tubelets.
    """
    if len(video_shape) < 4 or len(patch_size) != 3:
        raise ValueError(
            f"tubelet_grid: need video_shape [..., T, H, W, C] and patch_size (pt, ph, pw), "
            f"got {tuple(video_shape)} and {tuple(patch_size)}"
        )
    sizes = tuple(int(s) for s in video_shape[-4:-1])
    patch = tuple(int(p) for p in patch_size)
    if any(s % p for s, p in zip(sizes, patch, strict=True)):
        raise ValueError(
            f"tubelet_grid: video (T, H, W) = {sizes} is not divisible by "
            f"patch_size (pt, ph, pw) = {patch}"
        )
    return tuple(s // p for s, p in zip(sizes, patch, strict=True))


def patchify(video: jax.Array, patch_size: Sequence[int]) -> jax.Array:
    """[B, T, H, W, C] -> tubelets [B, N, pt*ph*pw*C] in the encoder's token order."""
    if video.ndim != 5:
        raise ValueError(f"patchify: video must be [B, T, H, W, C], got shape {video.shape}")
    t, h, w = tubelet_grid(video.shape, patch_size)
    pt, ph, pw = patch_size
    batch, channels = video.shape[0], video.shape[-1]
    x = video.reshape(batch, t, pt, h, ph, w, pw, channels)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)  # [B, T', H', W', pt, ph, pw, C]
    return x.reshape(batch, t * h * w, pt * ph * pw * channels)


def unpatchify(patches: jax.Array, patch_size: Sequence[int], grid: Sequence[int]) -> jax.Array:
    """Exact inverse of :func:`patchify`: [B, N, pt*ph*pw*C] -> [B, T, H, W, C]."""
    pt, ph, pw = patch_size
    t, h, w = grid
    if patches.ndim != 3 or patches.shape[1] != t * h * w or patches.shape[2] % (pt * ph * pw):
        raise ValueError(
            f"unpatchify: patches {patches.shape} do not fit grid {tuple(grid)} "
            f"(N = {t * h * w}) with patch_size {tuple(patch_size)}"
        )
    batch = patches.shape[0]
    channels = patches.shape[2] // (pt * ph * pw)
    x = patches.reshape(batch, t, h, w, pt, ph, pw, channels)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)  # [B, T', pt, H', ph, W', pw, C]
    return x.reshape(batch, t * pt, h * ph, w * pw, channels)


def _num_kept(num_tokens: int, mask_ratio: float, what: str) -> int:
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"{what}: mask_ratio must be in [0, 1), got {mask_ratio}")
    num_keep = round((1.0 - mask_ratio) * num_tokens)
    if num_keep < 1:
        raise ValueError(
            f"{what}: mask_ratio={mask_ratio} keeps no token out of {num_tokens}; lower it"
        )
    return num_keep


def _split_permutations(
    rng: jax.Array, batch_size: int, num_tokens: int, num_keep: int
) -> tuple[jax.Array, jax.Array]:
    """Per-example random permutations of range(num_tokens), split into sorted keep / rest."""
    perms = jax.vmap(lambda key: jax.random.permutation(key, num_tokens))(
        jax.random.split(rng, batch_size)
    )  # [B, num_tokens]
    keep = jnp.sort(perms[:, :num_keep], axis=1)
    rest = jnp.sort(perms[:, num_keep:], axis=1)
    return keep.astype(jnp.int32), rest.astype(jnp.int32)


def random_mask(
    rng: jax.Array, batch_size: int, grid: Sequence[int], mask_ratio: float = 0.9
) -> tuple[jax.Array, jax.Array]:
    """Uniform random masking of tubelets, independently per example.

    Keeps K = round((1 - mask_ratio) * N) of the N = T'*H'*W' tokens.

    Returns:
        keep_indices [B, K] and masked_indices [B, N - K], int32, sorted within
        each row; together a partition of range(N). Jittable (static shapes).
    """
    num_tokens = math.prod(int(n) for n in grid)
    num_keep = _num_kept(num_tokens, mask_ratio, "random_mask")
    return _split_permutations(rng, batch_size, num_tokens, num_keep)


def tube_mask(
    rng: jax.Array, batch_size: int, grid: Sequence[int], mask_ratio: float = 0.9
) -> tuple[jax.Array, jax.Array]:
    """Tube masking (VideoMAE): the same spatial positions are masked in every frame.

    Keeps K_s = round((1 - mask_ratio) * H'*W') spatial positions per example,
    at every one of the T' time steps, so K = T' * K_s. Indices are sorted,
    hence grouped by frame: row ``keep[b].reshape(T', K_s)[t]`` holds frame
    t's kept tokens, the layout the factorised ViViT encoder requires.

    Returns:
        keep_indices [B, T'*K_s] and masked_indices [B, T'*(H'*W' - K_s)], int32.
    """
    t, h, w = (int(n) for n in grid)
    num_spatial = h * w
    num_keep = _num_kept(num_spatial, mask_ratio, "tube_mask")
    keep_spatial, masked_spatial = _split_permutations(rng, batch_size, num_spatial, num_keep)
    frame_offsets = (jnp.arange(t, dtype=jnp.int32) * num_spatial)[None, :, None]  # [1, T', 1]
    keep = frame_offsets + keep_spatial[:, None, :]  # [B, T', K_s]
    masked = frame_offsets + masked_spatial[:, None, :]  # [B, T', S - K_s]
    return keep.reshape(batch_size, -1), masked.reshape(batch_size, -1)


def tubelet_targets(
    video: jax.Array, patch_size: Sequence[int], normalize: bool = True
) -> jax.Array:
    """Reconstruction targets [B, N, pt*ph*pw*C], float32, in the encoder's token order.

    With ``normalize`` each tubelet is standardised over all of its pixels:
    (x - mean) / sqrt(var + 1e-6) (VideoMAE's per-patch normalised target);
    otherwise the raw pixel values.
    """
    patches = patchify(video.astype(jnp.float32), patch_size)
    if not normalize:
        return patches
    mean = patches.mean(axis=-1, keepdims=True)
    var = patches.var(axis=-1, keepdims=True)
    return (patches - mean) * jax.lax.rsqrt(var + 1e-6)


class MVMDecoder(nn.Module):
    """Light transformer that reconstructs masked tubelets from the visible tokens.

    Projects the encoder's visible tokens to ``width``, scatters them into the
    full (T', H', W') sequence with a learned mask token at the masked
    positions, adds decoder positional embeddings (learned, factorised
    temporal [T', width] + spatial [H'*W', width], sized for ``posemb_grid``
    and resized when the call's grid differs) at every position, runs pre-LN
    blocks and predicts the pixels of each masked tubelet.

    Defaults follow VideoMAE's ViT-B decoder (width 384, 4 blocks, 6 heads).
    With ``posemb='sincos'``, ``embed_bias=False``, ``norm_eps`` from the
    checkpoint, ``final_norm_eps=1e-5`` and ``approximate_gelu=False`` it is
    exactly VideoMAE's pretraining decoder (``hf_video.py`` imports it): its
    blocks attend over all N tokens, so the order they are fed in (VideoMAE:
    visible then masked) does not change any output.

    Attributes:
        patch_dim: pixels per tubelet, pt*ph*pw*C (the size of each prediction).
        posemb_grid: (T', H', W') the positional-embedding tables are sized for.
        posemb: 'factorized' (learned, as above) or 'sincos' (VideoMAE's fixed
            1-D sinusoid over the flattened grid).
        embed_bias: a bias in the projection of the encoder's tokens.
        norm_eps, approximate_gelu: the blocks' (see ``EncoderBlock``).
        final_norm_eps: the final LayerNorm's epsilon.
        attention_impl: the blocks' attention kernel, 'xla' or 'cudnn'.
    """

    patch_dim: int
    posemb_grid: Grid = (8, 14, 14)
    width: int = 384
    depth: int = 4
    num_heads: int = 6
    mlp_dim: int = 1536
    posemb: str = "factorized"
    embed_bias: bool = True
    norm_eps: float = 1e-6
    final_norm_eps: float = 1e-6
    approximate_gelu: bool = True
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        visible_tokens: jax.Array,
        keep_indices: jax.Array,
        masked_indices: jax.Array,
        grid: Sequence[int],
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Predicts the masked tubelets.

        Args:
            visible_tokens: encoder output tokens [B, K, D_enc], one per kept index.
            keep_indices: [B, K] int, indices into the flattened grid.
            masked_indices: [B, M] int, the other indices.
            grid: (T', H', W') of the video the indices refer to.

        Returns:
            pred [B, M, patch_dim] float32 (in ``masked_indices`` order) and aux
            with 'tokens': the full decoder output [B, N, width] after the final
            LayerNorm.
        """
        t, h, w = (int(n) for n in grid)
        num_tokens = t * h * w
        batch, num_keep = keep_indices.shape
        if visible_tokens.shape[:2] != (batch, num_keep):
            raise ValueError(
                f"MVMDecoder: visible_tokens {visible_tokens.shape} must be [B, K, D] with "
                f"[B, K] = keep_indices.shape = {keep_indices.shape}"
            )
        if masked_indices.shape[0] != batch or num_keep + masked_indices.shape[1] != num_tokens:
            raise ValueError(
                f"MVMDecoder: keep_indices {keep_indices.shape} and masked_indices "
                f"{masked_indices.shape} must partition the N = {num_tokens} tokens of "
                f"grid {(t, h, w)}"
            )

        if self.posemb not in ("factorized", "sincos"):
            raise ValueError(
                f"MVMDecoder: posemb={self.posemb!r}; choose 'factorized' or 'sincos'"
            )
        visible = nn.Dense(self.width, use_bias=self.embed_bias, dtype=self.dtype, name="embed")(
            visible_tokens
        )
        mask_token = self.param(
            "mask_token", nn.initializers.normal(stddev=0.02), (self.width,), jnp.float32
        )
        x = jnp.broadcast_to(mask_token.astype(self.dtype), (batch, num_tokens, self.width))
        rows = jnp.arange(batch)[:, None]  # [B, 1]
        x = x.at[rows, keep_indices].set(visible.astype(self.dtype))  # [B, N, width]

        x = x + self._posemb((t, h, w)).astype(self.dtype)
        for i in range(self.depth):
            x = EncoderBlock(
                self.mlp_dim,
                self.num_heads,
                norm_eps=self.norm_eps,
                approximate_gelu=self.approximate_gelu,
                dtype=self.dtype,
                attention_impl=self.attention_impl,
                name=f"block_{i}",
            )(x)
        x = nn.LayerNorm(self.final_norm_eps, dtype=self.dtype, name="norm")(x)  # [B, N, width]

        masked_tokens = jnp.take_along_axis(x, masked_indices[:, :, None], axis=1)  # [B, M, width]
        pred = nn.Dense(self.patch_dim, dtype=self.dtype, name="head")(masked_tokens)
        return pred.astype(jnp.float32), {"tokens": x}

    def _posemb(self, grid: Grid) -> jax.Array:
        """The positional embedding of every token of `grid`, [N, width]."""
        t, h, w = grid
        if self.posemb == "sincos":
            return jnp.asarray(sincos_posemb(t * h * w, self.width))
        param_t, param_h, param_w = self.posemb_grid
        temporal = self.param(
            "pos_embedding_temporal",
            nn.initializers.normal(stddev=0.02),
            (param_t, self.width),
            jnp.float32,
        )
        spatial = self.param(
            "pos_embedding_spatial",
            nn.initializers.normal(stddev=0.02),
            (param_h * param_w, self.width),
            jnp.float32,
        )
        temporal = resize_posemb(temporal, (t,))  # [T', width]
        spatial = resize_posemb(spatial.reshape(param_h, param_w, self.width), (h, w))
        posemb = temporal[:, None, None, :] + spatial[None]  # [T', H', W', width]
        return posemb.reshape(t * h * w, self.width)
