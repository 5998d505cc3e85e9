"""The multitask model: one ViViT video encoder shared by SigLIP, LocCa captioning and MVM.

``MultitaskModel`` composes the components of the other model files and adds
the contrastive heads: ``video_projection`` and ``text_projection`` (Dense to
``embed_dim``, then L2 normalisation) and the learnable scalars
``log_temperature`` and ``bias`` (initialised from ``init_temperature`` and
``init_bias``, by default SigLIP's 10 and -10). Parameter tree (one top-level
name per component, so a trainer can replace or freeze one, e.g. put a Hugging
Face BERT import under ``'text'``)::

    encoder/ text/ caption_decoder/ mvm_decoder/ video_projection/ text_projection/
    log_temperature  bias

One training call returns everything the losses need::

    out, aux = model.apply(variables, batch, train=True, rngs={'dropout': r1, 'mask': r2})

``batch`` holds 'video' [B, T, H, W, C] (or a study batch [B, V, T, H, W, C]
with 'video_mask' [B, V]), 'text_ids' / 'text_mask' [B, Lt] and 'caption_in'
[B, Lc] (the shifted-right caption). ``out``: 'video_emb', 'text_emb' [B, E]
(L2-normalised, float32), 'log_temperature', 'bias', 'caption_logits'
[B, Lc, vocab] and, with ``mvm=True``, 'mvm_pred' / 'mvm_target' [B, V*M, P]
(the masked tubelets; M per video) and 'mvm_mask' [B, V*M] (False for
tubelets of padded videos, whose targets are zero). ``aux``: 'video_tokens'
[B, L, D], 'video_token_mask' [B, L], 'video_pooled', 'text_tokens',
'text_pooled', 'caption_is_parallel' and, with MVM, 'mvm_keep_indices' /
'mvm_masked_indices' ([B, K] / [B, M], or [B, V, K] / [B, V, M] for studies)
and 'mvm_visible_tokens'.

With ``mvm=True`` the encoder runs once on the visible tubelets (a random
'tube' or 'random' mask from the 'mask' rng) and the MVM decoder reconstructs
the others. ``contrastive_tokens`` says what the contrastive and caption heads
see: 'full' runs the encoder a second time on the whole video; 'masked'
(FLIP-style) reuses the visible-token pass, one encoder pass in all. With
``mvm=False`` (evaluation, or an MVM weight of 0) there is no masking at all.

Entry points for evaluators and inference (``model.apply(variables, ...,
method=...)``): ``encode_video``, ``encode_text``, ``caption_logits``,
``reconstruct``; :func:`generate` writes reports from videos (encode once,
decode on the KV cache). :func:`make_model` builds a model from named sizes
and overrides (config-friendly); :func:`training_flops_per_example` counts its
matmul FLOPs analytically.

Not here: the losses and their weights (``deepcoro_jax/losses.py``,
``deepcoro_jax/training/optim.py``), the decoding loops (``decode.py``), the
Hugging Face weight import (``text.py``).
"""

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepcoro_jax.models import decode
from deepcoro_jax.models.common import resolve_attention
from deepcoro_jax.models.locca import CaptionDecoder
from deepcoro_jax.models.mvm import (
    MVMDecoder,
    random_mask,
    tube_mask,
    tubelet_grid,
    tubelet_targets,
)
from deepcoro_jax.models.text import BertConfig, TextEncoder
from deepcoro_jax.models.vivit import ViViT, vivit_kwargs

Params = Any
Batch = Mapping[str, jax.Array]

# SigLIP's initial contrastive temperature (10) and bias (-10).
INIT_LOG_TEMPERATURE = math.log(10.0)
INIT_BIAS = -10.0
CONTRASTIVE_TOKENS = ("full", "masked")
MASK_FUNCTIONS = {"tube": tube_mask, "random": random_mask}

# name: (hidden_size, num_layers, mlp_dim, num_heads). 'base' is the size of the
# PyTorch reference's report decoder.
CAPTION_DECODER_SIZES: dict[str, tuple[int, int, int, int]] = {
    "mu": (64, 2, 256, 2),
    "tiny": (192, 4, 768, 3),
    "small": (384, 6, 1536, 6),
    "base": (512, 6, 2048, 8),
    "large": (768, 12, 3072, 12),
}

# name: (width, depth, mlp_dim, num_heads): VideoMAE's recipe, half the encoder's
# width and 4 blocks ('base' is VideoMAE's ViT-B decoder).
MVM_DECODER_SIZES: dict[str, tuple[int, int, int, int]] = {
    "mu": (64, 1, 256, 2),
    "tiny": (96, 4, 384, 3),
    "small": (192, 4, 768, 3),
    "base": (384, 4, 1536, 6),
    "large": (512, 4, 2048, 8),
}


def _l2_normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


def _batch_entry(batch: Batch, key: str) -> jax.Array:
    if key not in batch:
        raise KeyError(f"MultitaskModel: batch has no {key!r}; it has {sorted(batch)}")
    return batch[key]


class MultitaskModel(nn.Module):
    """Shared video encoder, text tower, caption and MVM decoders, contrastive heads.

    See the module docstring for the inputs, outputs and parameter names. Each
    component keeps its own compute ``dtype`` (``make_model`` gives them all the
    same); the projection heads compute in their tower's dtype; every
    parameter is float32.

    Attributes:
        encoder: the ViViT video encoder (its ``patch_size`` defines the tubelets).
        text: the BERT text tower, without projection (``embed_dim=None``).
        caption_decoder: the LocCa report decoder; cross-attends to the video tokens.
        mvm_decoder: reconstructs masked tubelets; ``patch_dim`` must be
            pt*ph*pw*C of the encoder's tubelets.
        embed_dim: width of the shared video-report embedding space.
        contrastive_tokens: 'full' or 'masked', the tokens the contrastive and
            caption heads see when ``mvm=True`` (module docstring).
        mask_type: 'tube' (same spatial positions in every frame; required by
            the factorised encoder) or 'random'.
        mask_ratio: fraction of each video's tubelets hidden from the encoder.
        normalize_mvm_target: per-tubelet standardised targets (VideoMAE) or raw pixels.
        init_temperature, init_bias: the contrastive logit scale and bias at
            initialisation. SigLIP's 10 and -10 suit large batches; for a batch
            of B, a bias near -log(B) starts the sigmoid loss at the prior of one
            positive per row, which small-batch runs learn from much sooner.
    """

    encoder: ViViT
    text: TextEncoder
    caption_decoder: CaptionDecoder
    mvm_decoder: MVMDecoder
    embed_dim: int
    contrastive_tokens: str = "full"
    mask_type: str = "tube"
    mask_ratio: float = 0.9
    normalize_mvm_target: bool = True
    init_temperature: float = math.exp(INIT_LOG_TEMPERATURE)
    init_bias: float = INIT_BIAS

    def setup(self) -> None:
        if self.contrastive_tokens not in CONTRASTIVE_TOKENS:
            raise ValueError(
                f"MultitaskModel: contrastive_tokens={self.contrastive_tokens!r}; choose one of "
                f"{CONTRASTIVE_TOKENS}"
            )
        if self.mask_type not in MASK_FUNCTIONS:
            raise ValueError(
                f"MultitaskModel: mask_type={self.mask_type!r}; choose one of "
                f"{tuple(MASK_FUNCTIONS)}"
            )
        if self.encoder.attention_type == "factorized_encoder" and self.mask_type != "tube":
            raise ValueError(
                "MultitaskModel: the factorised encoder needs the same number of visible "
                f"tubelets in every frame; use mask_type='tube', not {self.mask_type!r}"
            )
        if self.text.embed_dim is not None:
            raise ValueError(
                "MultitaskModel: give the text tower embed_dim=None; the model's own "
                "text_projection maps it to embed_dim"
            )
        self.video_projection = nn.Dense(self.embed_dim, dtype=self.encoder.dtype)
        self.text_projection = nn.Dense(self.embed_dim, dtype=self.text.dtype)
        self.log_temperature = self.param(
            "log_temperature",
            nn.initializers.constant(math.log(self.init_temperature)),
            (),
            jnp.float32,
        )
        self.bias = self.param("bias", nn.initializers.constant(self.init_bias), (), jnp.float32)

    def _video_outputs(self, encoder_aux: dict[str, Any]) -> tuple[jax.Array, dict[str, Any]]:
        """Encoder aux -> (normalised video_emb [B, E], named video intermediates)."""
        video_emb = _l2_normalize(self.video_projection(encoder_aux["pooled"]))
        return video_emb, {
            "video_tokens": encoder_aux["tokens"],
            "video_token_mask": encoder_aux["token_mask"],
            "video_pooled": encoder_aux["pooled"],
        }

    def _mvm_pass(
        self, video: jax.Array, video_mask: jax.Array | None, train: bool
    ) -> tuple[dict[str, jax.Array], dict[str, Any], dict[str, Any]]:
        """Masks, encodes the visible tubelets, reconstructs the masked ones.

        Returns (MVM outputs, MVM aux, the encoder's aux on the visible tokens).
        """
        is_study = video.ndim == 6
        batch = video.shape[0]
        videos = video.reshape(-1, *video.shape[-4:])  # [B*V, T, H, W, C]
        num_videos = videos.shape[0]
        grid = tubelet_grid(videos.shape, self.encoder.patch_size)
        keep, masked = MASK_FUNCTIONS[self.mask_type](
            self.make_rng("mask"), num_videos, grid, self.mask_ratio
        )  # [B*V, K], [B*V, M]
        targets = tubelet_targets(
            videos, self.encoder.patch_size, self.normalize_mvm_target
        )  # [B*V, N, P]
        if targets.shape[-1] != self.mvm_decoder.patch_dim:
            raise ValueError(
                f"MultitaskModel: mvm_decoder.patch_dim={self.mvm_decoder.patch_dim}, but the "
                f"video's tubelets {self.encoder.patch_size} x {videos.shape[-1]} channel(s) "
                f"hold {targets.shape[-1]} values"
            )
        encoder_keep = keep.reshape(batch, -1, keep.shape[1]) if is_study else keep
        _, visible_aux = self.encoder(
            video, video_mask=video_mask, keep_indices=encoder_keep, train=train
        )
        visible = visible_aux["tokens"]  # [B, V*(P+K), D], P prefix ([CLS]) tokens first
        prefix = visible_aux["num_prefix_tokens"]
        per_video = visible.reshape(num_videos, prefix + keep.shape[1], -1)[:, prefix:]
        pred, _ = self.mvm_decoder(per_video, keep, masked, grid)  # [B*V, M, P]
        target = jnp.take_along_axis(targets, masked[:, :, None], axis=1)  # [B*V, M, P]
        is_real_video = video_mask.astype(bool) if is_study else jnp.ones((batch, 1), bool)
        mvm_mask = jnp.repeat(is_real_video, masked.shape[1], axis=1)  # [B, V*M]
        target = target.reshape(batch, mvm_mask.shape[1], -1)  # [B, V*M, P]
        out = {
            "mvm_pred": pred.reshape(target.shape),
            "mvm_target": jnp.where(mvm_mask[:, :, None], target, 0.0),
            "mvm_mask": mvm_mask,
        }
        aux = {
            "mvm_keep_indices": encoder_keep,
            "mvm_masked_indices": masked.reshape(batch, -1, masked.shape[1])
            if is_study
            else masked,
            "mvm_visible_tokens": visible,
        }
        return out, aux, visible_aux

    def __call__(
        self, batch: Batch, *, train: bool, mvm: bool = True
    ) -> tuple[dict[str, jax.Array], dict[str, Any]]:
        """The training (and scoring) forward pass; see the module docstring.

        Args:
            batch: 'video', optional 'video_mask' (study input), 'text_ids',
                'text_mask', 'caption_in'; other keys are ignored.
            train: enables dropout ('dropout' rng) and the caption decoder's
                parallel prediction ('parallel' rng) when configured.
            mvm: run masked video modelling ('mask' rng); False skips it.

        Returns:
            ``(out, aux)`` as listed in the module docstring.
        """
        video = _batch_entry(batch, "video")
        video_mask = _batch_entry(batch, "video_mask") if video.ndim == 6 else None
        out: dict[str, jax.Array] = {}
        aux: dict[str, Any] = {}
        if mvm:
            mvm_out, mvm_aux, visible_aux = self._mvm_pass(video, video_mask, train)
            out.update(mvm_out)
            aux.update(mvm_aux)
        if mvm and self.contrastive_tokens == "masked":
            encoder_aux = visible_aux
        else:
            _, encoder_aux = self.encoder(video, video_mask=video_mask, train=train)
        out["video_emb"], video_aux = self._video_outputs(encoder_aux)
        aux.update(video_aux)

        out["text_emb"], text_aux = self._text_outputs(
            _batch_entry(batch, "text_ids"), _batch_entry(batch, "text_mask"), train
        )
        aux.update(text_aux)
        out["log_temperature"] = self.log_temperature
        out["bias"] = self.bias

        out["caption_logits"], caption_aux = self.caption_decoder(
            _batch_entry(batch, "caption_in"),
            aux["video_tokens"],
            aux["video_token_mask"],
            train=train,
        )
        aux["caption_is_parallel"] = caption_aux["is_parallel"]
        return out, aux

    def _text_outputs(
        self, text_ids: jax.Array, text_mask: jax.Array, train: bool
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        _, text_aux = self.text(text_ids, text_mask, train=train)
        text_emb = _l2_normalize(self.text_projection(text_aux["pooled"]))
        return text_emb, {"text_tokens": text_aux["tokens"], "text_pooled": text_aux["pooled"]}

    def encode_video(
        self, video: jax.Array, video_mask: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, Any]]:
        """Inference: video [B, T, H, W, C] (or study [B, V, ...] + video_mask [B, V]).

        Returns:
            normalised video_emb [B, E] float32 and aux with 'video_tokens'
            [B, L, D], 'video_token_mask' [B, L] and 'video_pooled' [B, D].
        """
        _, encoder_aux = self.encoder(video, video_mask=video_mask, train=False)
        return self._video_outputs(encoder_aux)

    def encode_text(
        self, text_ids: jax.Array, text_mask: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Inference: text_ids / text_mask [B, Lt] -> (normalised text_emb [B, E], aux).

        aux holds 'text_tokens' [B, Lt, D_text] and 'text_pooled' [B, D_text].
        """
        return self._text_outputs(text_ids, text_mask, train=False)

    def caption_logits(
        self, video_tokens: jax.Array, token_mask: jax.Array, caption_in: jax.Array
    ) -> jax.Array:
        """Teacher-forced caption logits [B, Lc, vocab] (float32) from encoder tokens.

        ``video_tokens`` [B, L, D] and ``token_mask`` [B, L] as in ``encode_video``'s aux.
        """
        logits, _ = self.caption_decoder(caption_in, video_tokens, token_mask, train=False)
        return logits

    def reconstruct(
        self, video: jax.Array, video_mask: jax.Array | None = None
    ) -> tuple[dict[str, jax.Array], dict[str, Any]]:
        """MVM only, without dropout (needs a 'mask' rng): for reconstruction evaluators.

        Returns:
            ({'mvm_pred', 'mvm_target', 'mvm_mask'}, {'mvm_keep_indices',
            'mvm_masked_indices', 'mvm_visible_tokens'}) as in the training call.
        """
        out, aux, _ = self._mvm_pass(video, video_mask, train=False)
        return out, aux


# --------------------------------------------------------------------------- construction


def _sized(sizes: Mapping[str, tuple[int, ...]], size: str, component: str) -> tuple[int, ...]:
    if size not in sizes:
        raise ValueError(
            f"make_model: unknown {component} size {size!r}; choose one of {list(sizes)}"
        )
    return sizes[size]


def _replace(obj: Any, overrides: Mapping[str, Any], argument: str) -> Any:
    """dataclasses.replace with an error naming the override argument and the bad key.

    Lists become tuples: a config read back from JSON holds lists, and module
    attributes must be hashable (modules are static arguments of jit).
    """
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    try:
        return dataclasses.replace(obj, **overrides)
    except TypeError as e:
        fields = sorted(f.name for f in dataclasses.fields(obj) if f.name not in ("parent", "name"))
        raise ValueError(f"make_model: {argument} has an unknown key ({e}); known: {fields}") from e


def make_model(
    *,
    vocab_size: int,
    size: str = "mu",
    encoder_size: str | None = None,
    text_size: str | None = None,
    caption_decoder_size: str | None = None,
    mvm_decoder_size: str | None = None,
    text_hf_config: str | None = None,
    num_frames: int = 16,
    image_size: int | Sequence[int] = 224,
    channels: int = 1,
    patch_size: Sequence[int] = (2, 16, 16),
    text_max_len: int = 512,
    caption_max_len: int = 128,
    pad_id: int = 0,
    embed_dim: int | None = None,
    contrastive_tokens: str = "full",
    mask_type: str = "tube",
    mask_ratio: float = 0.9,
    normalize_mvm_target: bool = True,
    init_temperature: float = math.exp(INIT_LOG_TEMPERATURE),
    init_bias: float = INIT_BIAS,
    dropout: float = 0.0,
    dtype: Any = "float32",
    attention_impl: str = "auto",
    encoder_overrides: Mapping[str, Any] | None = None,
    text_overrides: Mapping[str, Any] | None = None,
    caption_decoder_overrides: Mapping[str, Any] | None = None,
    mvm_decoder_overrides: Mapping[str, Any] | None = None,
) -> MultitaskModel:
    """Builds a ``MultitaskModel`` from named sizes; every argument is a plain config value.

    Args:
        vocab_size: the tokenizer's vocabulary (the caption decoder's, and the
            from-scratch text tower's).
        size: default size name of every component: 'mu' (tests, CPU demo),
            'tiny', 'small', 'base', 'large'.
        encoder_size: ViViT size (``vivit.SIZES``); default ``size``.
        text_size: text tower size (``text.TEXT_SIZES``); default ``size``.
        caption_decoder_size: ``CAPTION_DECODER_SIZES``; default ``size``.
        mvm_decoder_size: ``MVM_DECODER_SIZES``; default ``size``.
        text_hf_config: path of a Hugging Face BERT ``config.json`` (or its
            folder): the text tower takes that shape, to receive the
            checkpoint's weights (``text.params_from_hf_weights``) under
            params['text']; excludes ``text_size``.
        num_frames, image_size: the input the positional embeddings are sized
            for (encoder and MVM decoder; other sizes are interpolated).
        channels: video channels C (1 for angiograms); sets the MVM target size.
        patch_size: tubelet (pt, ph, pw).
        text_max_len: longest report for a from-scratch text tower (its position
            table; a Hugging Face config brings its own).
        caption_max_len: longest caption (decoder position table and KV cache).
        pad_id: the tokenizer's padding id (a from-scratch text tower's zero embedding row).
        embed_dim: the shared contrastive embedding width; default the encoder's width.
        contrastive_tokens, mask_type, mask_ratio, normalize_mvm_target,
            init_temperature, init_bias: see ``MultitaskModel``.
        dropout: dropout rate of the encoder, caption decoder and a from-scratch
            text tower (a Hugging Face config brings its own; ``text_overrides``
            can change it).
        dtype: compute dtype of every component, e.g. 'bfloat16'; params stay float32.
        attention_impl: every component's attention kernel: 'auto' (cuDNN's fused
            attention on NVIDIA GPUs in 16-bit, XLA's elsewhere), 'xla' or 'cudnn'
            (``common.resolve_attention``). It changes no parameter.
        encoder_overrides: ``ViViT`` attributes, e.g. {'attention_type':
            'factorized_encoder', 'pool_type': 'mean', 'remat': True}.
        text_overrides: ``BertConfig`` fields, and 'pool_type' ('cls' or 'mean').
        caption_decoder_overrides: ``CaptionDecoder`` attributes, e.g.
            {'parallel_fraction': 0.5, 'tie_embeddings': False}.
        mvm_decoder_overrides: ``MVMDecoder`` attributes.
    """
    compute_dtype = jnp.dtype(dtype)
    attention_impl = resolve_attention(attention_impl, compute_dtype)
    if isinstance(image_size, int):
        image_hw = (image_size, image_size)
    else:
        image_hw = tuple(int(s) for s in image_size)
    patch = tuple(int(p) for p in patch_size)

    encoder_kwargs = vivit_kwargs(encoder_size or size)
    encoder = ViViT(
        **encoder_kwargs,
        patch_size=patch,
        num_frames=num_frames,
        image_size=image_hw,
        dropout=dropout,
        attention_impl=attention_impl,
        dtype=compute_dtype,
    )
    encoder = _replace(encoder, encoder_overrides or {}, "encoder_overrides")

    text_overrides = dict(text_overrides or {})
    text_pool_type = text_overrides.pop("pool_type", "cls")
    if text_hf_config is not None:
        if text_size is not None:
            raise ValueError("make_model: give text_size or text_hf_config, not both")
        config_path = Path(text_hf_config)
        if config_path.suffix != ".json":
            config_path = config_path / "config.json"
        text_config = BertConfig.from_json(config_path)
    else:
        text_config = BertConfig.from_size(
            text_size or size,
            vocab_size=vocab_size,
            max_position_embeddings=text_max_len,
            pad_token_id=pad_id,
            dropout_prob=dropout,
        )
    text_config = _replace(text_config, text_overrides, "text_overrides")
    text = TextEncoder(
        text_config, pool_type=text_pool_type, attention_impl=attention_impl, dtype=compute_dtype
    )

    hidden, layers, mlp_dim, heads = _sized(
        CAPTION_DECODER_SIZES, caption_decoder_size or size, "caption decoder"
    )
    caption_decoder = CaptionDecoder(
        vocab_size=vocab_size,
        num_layers=layers,
        hidden_size=hidden,
        mlp_dim=mlp_dim,
        num_heads=heads,
        max_len=caption_max_len,
        dropout=dropout,
        attention_impl=attention_impl,
        dtype=compute_dtype,
    )
    caption_decoder = _replace(
        caption_decoder, caption_decoder_overrides or {}, "caption_decoder_overrides"
    )

    width, depth, mvm_mlp_dim, mvm_heads = _sized(
        MVM_DECODER_SIZES, mvm_decoder_size or size, "MVM decoder"
    )
    mvm_decoder = MVMDecoder(
        patch_dim=math.prod(patch) * channels,
        posemb_grid=tubelet_grid((num_frames, *image_hw, channels), patch),
        width=width,
        depth=depth,
        num_heads=mvm_heads,
        mlp_dim=mvm_mlp_dim,
        attention_impl=attention_impl,
        dtype=compute_dtype,
    )
    mvm_decoder = _replace(mvm_decoder, mvm_decoder_overrides or {}, "mvm_decoder_overrides")

    return MultitaskModel(
        encoder=encoder,
        text=text,
        caption_decoder=caption_decoder,
        mvm_decoder=mvm_decoder,
        embed_dim=embed_dim or encoder.hidden_size,
        contrastive_tokens=contrastive_tokens,
        mask_type=mask_type,
        mask_ratio=mask_ratio,
        normalize_mvm_target=normalize_mvm_target,
        init_temperature=init_temperature,
        init_bias=init_bias,
    )


# --------------------------------------------------------------------------- generation


@functools.partial(jax.jit, static_argnames="model")
def _video_memory(
    model: MultitaskModel, params: Params, video: jax.Array, video_mask: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """The caption decoder's memory: encoder tokens [B, L, D] and their mask [B, L]."""
    _, aux = model.apply({"params": params}, video, video_mask, method=MultitaskModel.encode_video)
    return aux["video_tokens"], aux["video_token_mask"]


def decode_memory(
    model: MultitaskModel,
    params: Params,
    memory: jax.Array,
    memory_mask: jax.Array | None = None,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_len: int | None = None,
    strategy: str = "greedy",
    rng: jax.Array | None = None,
    **strategy_options: Any,
) -> decode.DecodeOutput | decode.BeamOutput:
    """Writes reports from the caption decoder's memory (``encode_video``'s tokens
    [B, L, D] and mask [B, L]), on the KV cache; the arguments as in `generate`."""
    if (rng is not None) != (strategy == "sample"):
        raise ValueError(
            f"generate: rng is needed by strategy='sample' and only by it; got "
            f"strategy={strategy!r} with rng={'set' if rng is not None else None}"
        )
    decoder, decoder_params = model.caption_decoder, params["caption_decoder"]
    ids = dict(bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, max_len=max_len)
    if strategy == "greedy":
        return decode.greedy(
            decoder, decoder_params, memory, memory_mask, **ids, **strategy_options
        )
    if strategy == "sample":
        return decode.sample(
            decoder, decoder_params, memory, memory_mask, rng, **ids, **strategy_options
        )
    if strategy == "beam":
        return decode.beam_search(
            decoder, decoder_params, memory, memory_mask, **ids, **strategy_options
        )
    raise ValueError(f"generate: strategy={strategy!r}; choose 'greedy', 'sample' or 'beam'")


def generate(
    model: MultitaskModel,
    params: Params,
    video: jax.Array,
    video_mask: jax.Array | None = None,
    **options: Any,
) -> decode.DecodeOutput | decode.BeamOutput:
    """Writes reports for videos (or studies): encodes once, then decodes on the KV cache.

    Args:
        model, params: the model and its 'params' collection.
        video, video_mask: as in ``MultitaskModel.encode_video``.
        options: keyword arguments of `decode_memory`: bos_id, eos_id, pad_id,
            max_len (as in ``decode.greedy``); strategy, 'greedy'
            (``decode.greedy``), 'sample' (``decode.sample``, needs ``rng``) or
            'beam' (``decode.beam_search``); rng, the sampling key, only for
            'sample'; and the chosen decode function's own options (temperature,
            top_k, top_p for 'sample'; beam_size, length_penalty for 'beam').

    Returns:
        The decode function's output: tokens [B, max_len] (EOS included, then pad_id).
    """
    memory, memory_mask = _video_memory(model, params, video, video_mask)
    return decode_memory(model, params, memory, memory_mask, **options)


# --------------------------------------------------------------------------- FLOPs


def _attention_flops(num_queries: int, num_keys: int, width: int, key_width: int) -> int:
    """Projections (query, key, value, out) plus scores and weighted sum, 2 FLOPs per MAC."""
    projections = 2 * num_queries * width * width * 2 + 2 * num_keys * key_width * width * 2
    scores_and_values = 2 * num_queries * num_keys * width * 2
    return projections + scores_and_values


def _block_flops(length: int, width: int, mlp_dim: int) -> int:
    """A self-attention + MLP transformer block (pre- or post-LN) on ``length`` tokens."""
    return _attention_flops(length, length, width, width) + 2 * length * width * mlp_dim * 2


def _encoder_flops(encoder: ViViT, grid: tuple[int, int, int], channels: int, num_kept: int) -> int:
    """One video through the ViViT blocks, ``num_kept`` of its tokens kept (no pooling).

    The tubelet embedding runs on all tokens (it comes before the selection).
    """
    flops = _stem_flops(encoder, grid, channels)
    t = grid[0]
    width, mlp_dim = encoder.hidden_size, encoder.mlp_dim
    if encoder.attention_type == "joint":
        return flops + encoder.depth * _block_flops(num_kept, width, mlp_dim)
    spatial = t * encoder.depth * _block_flops(num_kept // t, width, mlp_dim)
    return flops + spatial + encoder.temporal_depth * _block_flops(t, width, mlp_dim)


def _stem_flops(encoder: ViViT, grid: tuple[int, int, int], channels: int) -> int:
    """The tubelet embedding of one video: linear, or the conv stem on every pixel."""
    t, h, w = grid
    if encoder.stem == "linear":
        return 2 * t * h * w * math.prod(encoder.patch_size) * channels * encoder.hidden_size
    pt, ph, pw = encoder.patch_size
    pixels, in_features, flops = h * ph * w * pw, pt * channels, 0
    for features in encoder.stem_features:  # two 3x3 convolutions, then a 2x2 max pool
        flops += 2 * pixels * 9 * (in_features * features + features * features)
        pixels, in_features = pixels // 4, features
    return t * (flops + 2 * pixels * in_features * encoder.hidden_size)  # + the projection


def _pool_flops(encoder: ViViT, num_tokens: int) -> int:
    if encoder.pool_type != "map":  # mean and max pooling have no matmuls
        return 0
    width = encoder.hidden_size
    return _attention_flops(1, num_tokens, width, width) + 2 * width * encoder.mlp_dim * 2


def training_flops_per_example(
    model: MultitaskModel,
    video_shape: Sequence[int],
    text_length: int,
    caption_length: int,
    *,
    mvm: bool = True,
) -> dict[str, int]:
    """Analytic matmul FLOPs of one training example (the training call of ``model``).

    Counts 2 FLOPs per multiply-accumulate of every matrix product and
    convolution in the forward pass (dense layers, attention scores and
    weighted sums, the tubelet convolution, the output logits), as the model
    computes them: full L x L attention even where masks (causal, padding)
    zero part of it, padded study videos included. Elementwise work
    (LayerNorm, GELU, softmax), embedding lookups and the [B, B] contrastive
    logits are not counted. The backward pass is taken as twice the forward
    (gradients with respect to activations and to weights), so 'training' =
    3 x 'forward'.

    Args:
        model: the model (sizes and options are read from it).
        video_shape: one example's video [T, H, W, C] or study [V, T, H, W, C].
        text_length, caption_length: token lengths of 'text_ids' and 'caption_in'.
        mvm: whether the training call runs masked video modelling.

    Returns:
        Per-component forward FLOPs ('encoder' with its pooling head,
        'text', 'caption_decoder', 'mvm_decoder', 'projections'), their sum
        'forward', and 'training'.
    """
    if len(video_shape) not in (4, 5):
        raise ValueError(
            f"training_flops_per_example: video_shape must be [T, H, W, C] or "
            f"[V, T, H, W, C], got {tuple(video_shape)}"
        )
    num_videos = video_shape[0] if len(video_shape) == 5 else 1
    encoder, text_config = model.encoder, model.text.config
    grid = tubelet_grid(tuple(video_shape[-4:]), encoder.patch_size)
    num_tokens = math.prod(grid)
    channels = video_shape[-1]

    def encoder_pass(num_kept: int) -> int:
        per_video = _encoder_flops(encoder, grid, channels, num_kept)
        return num_videos * per_video + _pool_flops(encoder, num_videos * num_kept)

    flops = {"encoder": 0, "mvm_decoder": 0}
    memory_tokens = num_videos * num_tokens
    if mvm:
        keep, masked = jax.eval_shape(
            lambda: MASK_FUNCTIONS[model.mask_type](jax.random.key(0), 1, grid, model.mask_ratio)
        )
        num_kept, num_masked = keep.shape[1], masked.shape[1]
        flops["encoder"] += encoder_pass(num_kept)
        decoder = model.mvm_decoder
        per_video = 2 * num_kept * encoder.hidden_size * decoder.width  # embed
        per_video += decoder.depth * _block_flops(num_tokens, decoder.width, decoder.mlp_dim)
        per_video += 2 * num_masked * decoder.width * decoder.patch_dim  # head
        flops["mvm_decoder"] = num_videos * per_video
        if model.contrastive_tokens == "masked":
            memory_tokens = num_videos * num_kept
    if not mvm or model.contrastive_tokens == "full":
        flops["encoder"] += encoder_pass(num_tokens)

    flops["text"] = text_config.num_hidden_layers * _block_flops(
        text_length, text_config.hidden_size, text_config.intermediate_size
    )

    decoder = model.caption_decoder
    width = decoder.hidden_size
    caption = 0
    if encoder.hidden_size != width:
        caption += 2 * memory_tokens * encoder.hidden_size * width  # memory projection
    per_layer = _block_flops(caption_length, width, decoder.mlp_dim)
    per_layer += _attention_flops(caption_length, memory_tokens, width, width)
    caption += decoder.num_layers * per_layer
    caption += 2 * caption_length * width * decoder.vocab_size  # logits
    flops["caption_decoder"] = caption

    flops["projections"] = 2 * model.embed_dim * (encoder.hidden_size + text_config.hidden_size)
    flops["forward"] = sum(flops.values())
    flops["training"] = 3 * flops["forward"]
    return flops
