"""ViViT video encoder: tubelet embedding, joint or factorised attention, pooled embedding.

One ``ViViT`` module encodes a batch of videos [B, T, H, W, C] (float pixels)
or of studies [B, V, T, H, W, C] with a ``video_mask`` [B, V]. The tubelet
embedding is a 3D convolution with kernel = stride = ``patch_size`` (pt, ph, pw),
giving a (T', H', W') grid of N = T'*H'*W' tokens flattened row-major (the
order of ``mvm.patchify``); with ``stem='conv'`` it is a small CNN instead
(``ConvStem``), same grid and order. Learned positional embeddings are
factorised, temporal [T', D] + spatial [H'*W', D], sized from ``num_frames``
and ``image_size`` and resized (linear in time, bilinear in space) for other
grids.

``attention_type``:
  * ``'joint'``: pre-LN blocks with space-time attention over all tokens.
    ``tokens`` are the final LayerNorm of the blocks' outputs, one per token.
  * ``'factorized_encoder'`` (ViViT model 2): ``depth`` spatial blocks attend
    within each frame; the frame's representation is the mean of its spatial
    outputs (after ``spatial_norm``); ``temporal_depth`` blocks attend across
    these T' frame representations (temporal positional embedding added
    there). ``tokens[(t, s)] = LayerNorm(spatial_out[t, s] + temporal_out[t])``:
    every token keeps its spatial detail and gains its frame's temporal context.

``keep_indices`` [B, K] (int, into the flattened grid) encodes only those
tokens, each with its own positional embedding, so the transformer's cost
scales with K (masked video modelling). The factorised encoder needs the same
number of kept tokens in every frame, sorted by frame (``mvm.tube_mask``
gives this): K must be a multiple of T' (checked from the shapes), and when
the indices are concrete (not traced under ``jit``) their range and per-frame
layout are checked too; a ValueError names what is wrong. Under ``jit``
out-of-range indices would be clamped silently, so pass indices from
``mvm.random_mask`` / ``mvm.tube_mask``.

``stem``: ``'linear'`` (the 3D convolution above) or ``'conv'``: each group of
pt frames, stacked as channels, goes through ``len(stem_features)`` stages of
two 3x3 convolutions (ReLU) and a 2x2 max pool, so ph = pw must be
2**len(stem_features); a Dense layer then gives the D-wide token. The max-pool
stages make a local finding (a short narrowing of a 1-2 px vessel) survive
into its token; docs/training.md says what it reads on small synthetic
angiograms, with which pooling and learning rate, and at what cost. Its
receptive fields cross tubelet borders, so with ``keep_indices`` the pixels of the dropped
tubelets are zeroed before the stem: masked content never reaches a kept
token, but the stem runs on the whole frame whatever the mask ratio.

Returns ``(pooled [B, D], aux)`` with aux 'tokens' [B, L, D], 'token_mask'
[B, L] bool, 'pooled', and 'grid' = (T', H', W') and 'num_prefix_tokens'
(1 with a [CLS] token, else 0) as Python ints (static even while tracing; a
jitted function returning aux turns them into arrays).
L' = P + N, or P + K with ``keep_indices`` (P prefix tokens first); for study
input the tokens of video v occupy [v*L', (v+1)*L') with L = V*L'; tokens of
padded videos are zero and ``token_mask`` False there. The pooled embedding
is MAP attention pooling (``pool_type='map'``), the mean (``'mean'``) or the
per-channel maximum (``'max'``) over the valid grid tokens only, or the
[CLS] output ('cls', 'cls_tanh'; a study's is the mean over its videos), so
padded videos never influence any output; a study with no valid video pools
to zeros. Outputs are in the compute ``dtype``; parameters are float32.

Parameter counts (joint attention, 16x224x224x1 input, patch 2x16x16; each
extra input channel adds 512 * D; tested in tests/test_vivit.py):

  size     encoder       with MAP head
  mu           145,856         195,712
  tiny       5,474,112       5,918,592
  small     21,565,056      23,338,752
  base      85,597,440      92,683,776
  large    303,021,056     315,615,232

``posemb``, ``cls_token``, ``norm_eps``, ``approximate_gelu``, ``final_norm``
and ``pool_norm`` let the encoder take the exact shape of a Hugging Face
VideoMAE or ViViT checkpoint (:func:`from_pretrained`; ``hf_video.py`` maps
the weights both ways).

Not here: the MVM decoder and masks (``mvm.py``), heads and losses.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepcoro_jax.models.common import (
    Dtype,
    EncoderBlock,
    MAPHead,
    interpolate_posemb_grid,
    resize_posemb,
    sincos_posemb,
)
from deepcoro_jax.models.mvm import Grid, tubelet_grid

SIZES: dict[str, tuple[int, int, int, int]] = {
    # name: (hidden_size, depth, mlp_dim, num_heads)
    "mu": (64, 2, 256, 2),
    "tiny": (192, 12, 768, 3),
    "small": (384, 12, 1536, 6),
    "base": (768, 12, 3072, 12),
    "large": (1024, 24, 4096, 16),
}
ATTENTION_TYPES = ("joint", "factorized_encoder")
STEMS = ("linear", "conv")
POOL_TYPES = ("map", "mean", "max", "cls", "cls_tanh")
POSEMB_TYPES = ("factorized", "learned", "sincos")
# What a rematerialised block saves for the backward pass (None: only its input).
REMAT_POLICIES = {
    "none": None,  # not rematerialised
    "full": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy(remat: str | bool) -> str:
    """`remat` as a ``REMAT_POLICIES`` name (True: 'full', False: 'none')."""
    if isinstance(remat, bool):
        return "full" if remat else "none"
    if remat not in REMAT_POLICIES:
        raise ValueError(
            f"ViViT: remat={remat!r}; choose one of {list(REMAT_POLICIES)} (or True/False)"
        )
    return remat


def vivit_kwargs(size: str) -> dict[str, int]:
    """ViViT constructor arguments for a named size (see ``SIZES``)."""
    if size not in SIZES:
        raise ValueError(f"vivit_kwargs: unknown size {size!r}; choose one of {list(SIZES)}")
    hidden_size, depth, mlp_dim, num_heads = SIZES[size]
    return {"hidden_size": hidden_size, "depth": depth, "mlp_dim": mlp_dim, "num_heads": num_heads}


def _concrete(x: jax.Array) -> np.ndarray | None:
    """The value of ``x`` as NumPy, or None when it is traced (inside jit/grad)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


class ConvStem(nn.Module):
    """Convolutional tubelet embedding: [B, T, H, W, C] -> [B, T/pt, H/ph, W/pw, D].

    The pt frames of a tubelet row are stacked as channels; each stage is two
    3x3 convolutions with ReLU and a 2x2 max pool (``features`` gives each
    stage's width), and a Dense layer maps the final pixel of each tubelet to D.
    """

    hidden_size: int
    patch_size: tuple[int, int, int]
    features: tuple[int, ...]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, video: jax.Array) -> jax.Array:
        batch, frames, height, width, channels = video.shape
        pt, ph, pw = self.patch_size
        t = frames // pt
        x = video.reshape(batch, t, pt, height, width, channels)
        x = x.transpose(0, 1, 3, 4, 2, 5).reshape(batch * t, height, width, pt * channels)
        for i, features in enumerate(self.features):
            for j in range(2):
                x = nn.Conv(features, (3, 3), padding="SAME", dtype=self.dtype,
                            name=f"stage{i}_conv{j}")(x)
                x = nn.relu(x)
            # 2x2 max pool as a reshape and max: its gradient is a compare, where
            # nn.max_pool's select-and-scatter makes the stem a fifth slower on CPU.
            n, h, w, c = x.shape
            x = x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
        x = nn.Dense(self.hidden_size, dtype=self.dtype, name="proj")(x)  # [B*T', H', W', D]
        return x.reshape(batch, t, height // ph, width // pw, self.hidden_size)


class ViViT(nn.Module):
    """Video Vision Transformer encoder; see the module docstring for inputs and outputs.

    Attributes:
        hidden_size, depth, mlp_dim, num_heads: transformer size (``depth`` is
            the number of spatial blocks for the factorised encoder).
        patch_size: tubelet size (pt, ph, pw).
        num_frames, image_size: the input size the positional embeddings are
            sized for (image_size an int or (H, W)).
        attention_type: 'joint' or 'factorized_encoder'.
        temporal_depth: number of temporal blocks of the factorised encoder.
        pool_type: 'map', 'mean' or 'max' (per channel, over the valid tokens),
            'cls' (the [CLS] token's output) or 'cls_tanh' (tanh of a Dense of it:
            the pooler of Hugging Face's ViViT).
        stem: 'linear' (3D convolution) or 'conv' (``ConvStem``).
        stem_features: the conv stem's stage widths; 2**len must equal ph and pw.
        posemb: 'factorized' (learned temporal [T', D] + spatial [H'*W', D]),
            'learned' (one learned table over the T'*H'*W' tokens, and the [CLS]
            token first when there is one: Hugging Face's ViViT; other grids are
            interpolated linearly in time and bicubically in space) or 'sincos'
            (VideoMAE's fixed 1-D sinusoid over the flattened grid, recomputed
            for any grid). 'learned' and 'sincos' need attention_type='joint'.
        cls_token: prepend a learned [CLS] token to each video's tokens (joint
            attention only); it is token 0 of each video in aux['tokens'] and
            aux['num_prefix_tokens'] is 1.
        norm_eps: the LayerNorms' epsilon (1e-6; VideoMAE's checkpoints 1e-12).
        approximate_gelu: tanh GELU (True) or exact erf GELU (False, VideoMAE).
        final_norm: a LayerNorm on the last block's output (VideoMAE checkpoints
            made for mean pooling have none).
        pool_norm: a LayerNorm (epsilon 1e-5) on the pooled vector (VideoMAE's
            ``fc_norm`` after mean pooling).
        dropout: dropout rate after the embeddings and inside the blocks.
        remat: what each block keeps for the backward pass (``REMAT_POLICIES``):
            'none' (everything), 'dots_no_batch' (the weight matmuls' outputs;
            the attention scores and elementwise ops are recomputed), 'dots'
            (every matmul's output, the attention scores included) or 'full'
            (only the block's input; the whole block is recomputed). True and
            False, as older configs give it, mean 'full' and 'none'. Gradients
            are the same under every policy; memory and speed are not.
        remat_blocks: how many blocks of each stack, from the first, follow
            ``remat`` (-1: all); the others keep everything. Lets a run
            rematerialise only as much as its memory needs.
        attention_impl: the attention kernel, 'xla' or 'cudnn'
            (``common.attention``; ``common.resolve_attention`` picks it).
        dtype: compute dtype.
    """

    hidden_size: int = 64
    depth: int = 2
    mlp_dim: int = 256
    num_heads: int = 2
    patch_size: tuple[int, int, int] = (2, 16, 16)
    num_frames: int = 16
    image_size: int | tuple[int, int] = 224
    attention_type: str = "joint"
    temporal_depth: int = 4
    pool_type: str = "map"
    stem: str = "linear"
    stem_features: tuple[int, ...] = (16, 32, 64, 64)
    posemb: str = "factorized"
    cls_token: bool = False
    norm_eps: float = 1e-6
    approximate_gelu: bool = True
    final_norm: bool = True
    pool_norm: bool = False
    dropout: float = 0.0
    remat: str | bool = "none"
    remat_blocks: int = -1
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32

    @classmethod
    def from_size(cls, size: str, **overrides: Any) -> "ViViT":
        """A ViViT of a named size (``SIZES``), other attributes from ``overrides``."""
        return cls(**{**vivit_kwargs(size), **overrides})

    def param_grid(self) -> Grid:
        """The (T', H', W') grid of ``num_frames`` x ``image_size``: the size of the
        learned positional tables."""
        image_h, image_w = (
            (self.image_size, self.image_size)
            if isinstance(self.image_size, int)
            else self.image_size
        )
        return tubelet_grid((self.num_frames, image_h, image_w, 1), self.patch_size)

    def _joint_posemb(self, grid: Grid) -> tuple[jax.Array, jax.Array | None]:
        """The 'learned' or 'sincos' embedding of each of the grid's tokens [N, D], and
        the [CLS] token's ([D], or None without one)."""
        t, h, w = grid
        if self.posemb == "sincos":
            table = jnp.asarray(sincos_posemb(t * h * w, self.hidden_size), self.dtype)
            return table, None  # a [CLS] token has no sinusoid position (checked)
        param_t, param_h, param_w = self.param_grid()
        rows = param_t * param_h * param_w + int(self.cls_token)
        table = self.param(
            "pos_embedding", nn.initializers.normal(stddev=0.02), (rows, self.hidden_size),
            jnp.float32,
        )
        cls_row = table[0].astype(self.dtype) if self.cls_token else None
        grid_rows = table[int(self.cls_token):].reshape(param_t, param_h, param_w, -1)
        grid_rows = interpolate_posemb_grid(grid_rows, grid).reshape(t * h * w, -1)
        return grid_rows.astype(self.dtype), cls_row

    def _posemb(self, grid: Grid) -> tuple[jax.Array, jax.Array]:
        """Temporal [T', D] and spatial [H'*W', D] embeddings, resized to ``grid``."""
        param_t, param_h, param_w = self.param_grid()
        temporal = self.param(
            "pos_embedding_temporal",
            nn.initializers.normal(stddev=0.02),
            (param_t, self.hidden_size),
            jnp.float32,
        )
        spatial = self.param(
            "pos_embedding_spatial",
            nn.initializers.normal(stddev=0.02),
            (param_h * param_w, self.hidden_size),
            jnp.float32,
        )
        t, h, w = grid
        temporal = resize_posemb(temporal, (t,))
        spatial = resize_posemb(spatial.reshape(param_h, param_w, self.hidden_size), (h, w))
        return temporal.astype(self.dtype), spatial.reshape(h * w, -1).astype(self.dtype)

    def _blocks(self, x: jax.Array, depth: int, prefix: str, train: bool) -> jax.Array:
        policy = remat_policy(self.remat)
        remat_cls = None
        if policy != "none":
            remat_cls = nn.remat(
                EncoderBlock, static_argnums=(3,), policy=REMAT_POLICIES[policy]
            )
        rematerialised = depth if self.remat_blocks < 0 else min(self.remat_blocks, depth)
        for i in range(depth):
            block_cls = remat_cls if remat_cls is not None and i < rematerialised else EncoderBlock
            block = block_cls(
                self.mlp_dim,
                self.num_heads,
                self.dropout,
                self.norm_eps,
                self.approximate_gelu,
                dtype=self.dtype,
                attention_impl=self.attention_impl,
                name=f"{prefix}_{i}",
            )
            x = block(x, None, train)
        return x

    def _check_keep_indices(self, keep_indices: jax.Array, grid: Grid) -> None:
        t, h, w = grid
        num_tokens = t * h * w
        if self.attention_type == "factorized_encoder" and keep_indices.shape[1] % t:
            raise ValueError(
                f"ViViT(factorized_encoder): keep_indices keeps {keep_indices.shape[1]} tokens, "
                f"not a multiple of the T'={t} frames; it needs the same number of kept "
                "tokens in every frame (tube masking, mvm.tube_mask)"
            )
        indices = _concrete(keep_indices)
        if indices is None:
            return
        if indices.min(initial=0) < 0 or indices.max(initial=0) >= num_tokens:
            raise ValueError(
                f"ViViT: keep_indices must lie in [0, {num_tokens}) for grid {grid}, got "
                f"values in [{indices.min()}, {indices.max()}]"
            )
        if self.attention_type == "factorized_encoder":
            frames = (indices // (h * w)).reshape(indices.shape[0], t, -1)  # [B, T', K_s]
            if np.any(frames != np.arange(t)[None, :, None]):
                raise ValueError(
                    "ViViT(factorized_encoder): keep_indices must keep the same number of "
                    "tokens in every frame, sorted by frame (use mvm.tube_mask)"
                )

    def _encode_videos(
        self, video: jax.Array, keep_indices: jax.Array | None, train: bool
    ) -> tuple[jax.Array, Grid]:
        """[B, T, H, W, C] (+ keep [B, K]) -> tokens [B, L, D] and the (T', H', W') grid."""
        grid = tubelet_grid(video.shape, self.patch_size)
        t, h, w = grid
        batch = video.shape[0]
        num_spatial = h * w
        if keep_indices is not None:
            if keep_indices.shape[0] != batch:
                raise ValueError(
                    f"ViViT: keep_indices {keep_indices.shape} must be [B, K] with B = {batch}"
                )
            self._check_keep_indices(keep_indices, grid)

        if self.stem == "linear":
            x = nn.Conv(
                self.hidden_size,
                kernel_size=self.patch_size,
                strides=self.patch_size,
                padding="VALID",
                dtype=self.dtype,
                name="embedding",
            )(video)  # [B, T', H', W', D]
        else:
            if keep_indices is not None:  # zero the dropped tubelets' pixels
                kept = jnp.zeros((batch, t * num_spatial), bool)
                kept = kept.at[jnp.arange(batch)[:, None], keep_indices].set(True)
                kept = kept.reshape(batch, t, 1, h, 1, w, 1, 1)
                pt, ph, pw = self.patch_size
                pixels = video.reshape(batch, t, pt, h, ph, w, pw, video.shape[-1])
                video = jnp.where(kept, pixels, jnp.zeros((), video.dtype)).reshape(video.shape)
            x = ConvStem(
                self.hidden_size, self.patch_size, tuple(self.stem_features), dtype=self.dtype,
                name="conv_stem",
            )(video)  # [B, T', H', W', D]
        x = x.reshape(batch, t * num_spatial, self.hidden_size)  # [B, N, D]

        if self.attention_type == "joint":
            cls_posemb = None
            if self.posemb == "factorized":
                temporal, spatial = self._posemb(grid)
                posemb = (temporal[:, None, :] + spatial[None]).reshape(t * num_spatial, -1)
            else:
                posemb, cls_posemb = self._joint_posemb(grid)  # [N, D], [D] or None
            x = x + posemb
            if keep_indices is not None:
                x = jnp.take_along_axis(x, keep_indices[:, :, None], axis=1)  # [B, K, D]
            if self.cls_token:
                cls = self.param(
                    "cls", nn.initializers.zeros, (self.hidden_size,), jnp.float32
                ).astype(self.dtype)
                if cls_posemb is not None:
                    cls = cls + cls_posemb
                x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, cls.shape[0])), x], axis=1)
            x = nn.Dropout(self.dropout)(x, deterministic=not train)
            x = self._blocks(x, self.depth, "encoderblock", train)
            if self.final_norm:
                x = nn.LayerNorm(self.norm_eps, dtype=self.dtype, name="encoder_norm")(x)
            return x, grid

        temporal, spatial = self._posemb(grid)

        if keep_indices is None:
            x = x.reshape(batch, t, num_spatial, self.hidden_size) + spatial  # [B, T', S, D]
        else:
            x = jnp.take_along_axis(x, keep_indices[:, :, None], axis=1)  # [B, K, D]
            x = x + spatial[keep_indices % num_spatial]  # [B, K, D]
            x = x.reshape(batch, t, -1, self.hidden_size)  # [B, T', K_s, D]
        tokens_per_frame = x.shape[2]
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        x = x.reshape(batch * t, tokens_per_frame, self.hidden_size)  # [B*T', S, D]
        x = self._blocks(x, self.depth, "encoderblock", train)
        x = nn.LayerNorm(self.norm_eps, dtype=self.dtype, name="spatial_norm")(x)
        x = x.reshape(batch, t, tokens_per_frame, self.hidden_size)  # [B, T', S, D]
        frames = x.mean(axis=2) + temporal  # [B, T', D]
        frames = self._blocks(frames, self.temporal_depth, "temporalblock", train)
        x = nn.LayerNorm(self.norm_eps, dtype=self.dtype, name="encoder_norm")(
            x + frames[:, :, None, :]
        )
        return x.reshape(batch, t * tokens_per_frame, self.hidden_size), grid

    @nn.compact
    def __call__(
        self,
        video: jax.Array,
        *,
        video_mask: jax.Array | None = None,
        keep_indices: jax.Array | None = None,
        train: bool = False,
    ) -> tuple[jax.Array, dict[str, Any]]:
        """Encodes videos or studies.

        Args:
            video: float pixels, [B, T, H, W, C] or a study batch [B, V, T, H, W, C].
            video_mask: [B, V] bool, True for real videos; required with study
                input, not allowed otherwise.
            keep_indices: optional int [B, K] ([B, V, K] for study input) indices
                into the flattened (T', H', W') grid: encode only those tokens.
            train: enables dropout (needs a 'dropout' rng).

        Returns:
            pooled [B, D] and aux {'tokens', 'token_mask', 'pooled', 'grid'}.
        """
        if self.attention_type not in ATTENTION_TYPES:
            raise ValueError(
                f"ViViT: attention_type={self.attention_type!r}; choose one of {ATTENTION_TYPES}"
            )
        if self.pool_type not in POOL_TYPES:
            raise ValueError(f"ViViT: pool_type={self.pool_type!r}; choose one of {POOL_TYPES}")
        if self.stem not in STEMS:
            raise ValueError(f"ViViT: stem={self.stem!r}; choose one of {STEMS}")
        if self.posemb not in POSEMB_TYPES:
            raise ValueError(f"ViViT: posemb={self.posemb!r}; choose one of {POSEMB_TYPES}")
        if self.attention_type != "joint" and (self.posemb != "factorized" or self.cls_token):
            raise ValueError(
                f"ViViT(attention_type={self.attention_type!r}) has factorised positional "
                f"embeddings and no [CLS] token; posemb={self.posemb!r} and cls_token="
                f"{self.cls_token} need attention_type='joint'"
            )
        if self.posemb == "sincos" and self.cls_token:
            raise ValueError("ViViT: posemb='sincos' gives no position to a [CLS] token; "
                             "use posemb='learned' with cls_token=True")
        if self.pool_type in ("cls", "cls_tanh") and not self.cls_token:
            raise ValueError(f"ViViT: pool_type={self.pool_type!r} needs cls_token=True")
        reduction = 2 ** len(self.stem_features)
        if self.stem == "conv" and tuple(self.patch_size[1:]) != (reduction, reduction):
            raise ValueError(
                f"ViViT(stem='conv'): stem_features={tuple(self.stem_features)} has "
                f"{len(self.stem_features)} max-pool stages, which need patch_size (ph, pw) = "
                f"({reduction}, {reduction}); got {tuple(self.patch_size[1:])}"
            )
        if not jnp.issubdtype(video.dtype, jnp.floating):
            raise ValueError(
                f"ViViT: video must hold float pixel values (normalised), got dtype {video.dtype}"
            )
        is_study = video.ndim == 6
        if video.ndim == 5:
            if video_mask is not None:
                raise ValueError(
                    "ViViT: video_mask is only for study input [B, V, T, H, W, C]; got video "
                    f"{video.shape}"
                )
            batch, num_videos = video.shape[0], 1
            video_mask = jnp.ones((batch, 1), bool)
        elif is_study:
            batch, num_videos = video.shape[:2]
            if video_mask is None or video_mask.shape != (batch, num_videos):
                raise ValueError(
                    f"ViViT: study input {video.shape} needs video_mask of shape "
                    f"[B, V] = {(batch, num_videos)}, got "
                    f"{None if video_mask is None else video_mask.shape}"
                )
            video = video.reshape(batch * num_videos, *video.shape[2:])  # [B*V, T, H, W, C]
        else:
            raise ValueError(
                f"ViViT: video must be [B, T, H, W, C] or [B, V, T, H, W, C], got {video.shape}"
            )
        if keep_indices is not None:
            leading = (batch, num_videos) if is_study else (batch,)
            if keep_indices.shape[:-1] != leading:
                raise ValueError(
                    f"ViViT: keep_indices must be {'[B, V, K]' if is_study else '[B, K]'} with "
                    f"leading dims {leading}, got {keep_indices.shape}"
                )
            keep_indices = keep_indices.reshape(batch * num_videos, -1)  # [B*V, K]

        tokens, grid = self._encode_videos(video, keep_indices, train)  # [B*V, L', D]
        tokens_per_video = tokens.shape[1]
        tokens = tokens.reshape(batch, num_videos * tokens_per_video, -1)  # [B, V*L', D]
        token_mask = jnp.repeat(video_mask.astype(bool), tokens_per_video, axis=1)  # [B, V*L']
        tokens = jnp.where(token_mask[:, :, None], tokens, jnp.zeros((), tokens.dtype))
        prefix = int(self.cls_token)
        # The pooling below reads the grid's tokens; 'cls' pooling the [CLS] tokens.
        is_prefix = (jnp.arange(tokens.shape[1]) % tokens_per_video < prefix)[None, :]  # [1, L]
        pool_mask = token_mask & ~is_prefix

        if self.pool_type in ("cls", "cls_tanh"):
            cls = tokens.reshape(batch, num_videos, tokens_per_video, -1)[:, :, 0]  # [B, V, D]
            count = jnp.maximum(video_mask.sum(axis=1, keepdims=True), 1)  # [B, 1]
            pooled = (cls.astype(jnp.float32).sum(axis=1) / count).astype(tokens.dtype)
            if self.pool_type == "cls_tanh":
                pooler = nn.Dense(self.hidden_size, dtype=self.dtype, name="pooler")
                pooled = jnp.tanh(pooler(pooled))
        elif self.pool_type == "map":
            pooled = MAPHead(self.num_heads, self.mlp_dim, dtype=self.dtype, name="map_head")(
                tokens, pool_mask
            )
        elif self.pool_type == "max":
            # The maximum as a gather at its argmax: its gradient goes to that token.
            # (jnp.max's gradient divides by the number of tokens equal to the max it
            # recomputes, 0 when XLA computes the two apart, e.g. at
            # --xla_backend_optimization_level=0 on CPU: NaN.)
            lowest = jnp.finfo(tokens.dtype).min
            index = jnp.where(pool_mask[:, :, None], tokens, lowest).argmax(axis=1)  # [B, D]
            pooled = jnp.take_along_axis(tokens, index[:, None, :], axis=1)[:, 0]
        else:
            count = jnp.maximum(pool_mask.sum(axis=1, keepdims=True), 1)  # [B, 1]
            pooled = jnp.where(pool_mask[:, :, None], tokens, jnp.zeros((), tokens.dtype))
            pooled = (pooled.astype(jnp.float32).sum(axis=1) / count).astype(tokens.dtype)
        if self.pool_norm:
            pooled = nn.LayerNorm(1e-5, dtype=self.dtype, name="pool_norm")(pooled)
        pooled = jnp.where(token_mask.any(axis=1, keepdims=True), pooled, 0)
        aux = {
            "tokens": tokens,
            "token_mask": token_mask,
            "pooled": pooled,
            "grid": grid,
            "num_prefix_tokens": prefix,
        }
        return pooled, aux


def from_pretrained(
    path: str,
    *,
    channels: int | None = None,
    num_frames: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    dtype: Dtype = jnp.float32,
) -> tuple["ViViT", dict[str, Any]]:
    """A local Hugging Face VideoMAE or ViViT folder (config.json + model.safetensors or
    .bin) as ``(model, params)``.

    ``model.apply({'params': params}, video)`` takes ``video`` [B, T, H, W, C] float,
    the values PyTorch gets as ``pixel_values`` [B, T, C, H, W], and returns
    ``(pooled, aux)``: aux['tokens'] is the model's ``last_hidden_state`` ([CLS]
    first for ViViT) and ``pooled`` its pooled output (ViViT's pooler; VideoMAE's
    mean, with ``fc_norm`` when the folder has one). `channels` (default the
    checkpoint's; 1 sums the kernel over its channels), `num_frames` and
    `image_size` (default the checkpoint's) size the model for other input
    (``hf_video`` module docstring).
    """
    from deepcoro_jax.models import hf_video

    ckpt = hf_video.read(path)
    kwargs = hf_video.encoder_kwargs(ckpt)
    if num_frames is not None:
        kwargs["num_frames"] = num_frames
    if image_size is not None:
        kwargs["image_size"] = image_size
    model = ViViT(**kwargs, dtype=dtype)
    params = hf_video.encoder_params(ckpt, model, channels=channels or ckpt.channels)
    return model, params
