"""Hugging Face VideoMAE and ViViT checkpoints in and out of the ViViT encoder and MVM decoder.

For: starting the video encoder (and VideoMAE's pretraining decoder) from a
public checkpoint saved by ``transformers`` (a local folder: config.json +
model.safetensors or pytorch_model.bin), and writing a trained encoder back as
such a folder, for PyTorch users. The two families and how they map:

  ===================  ===============================  ==============================
                       VideoMAE (``model_type``         ViViT (``vivit``)
                       ``videomae``)
  ===================  ===============================  ==============================
  tokens               Conv3d tubelets, no [CLS]        Conv3d tubelets, [CLS] first
  positions            fixed 1-D sinusoid, not saved    learned [1 + N, D] table
                       (``posemb='sincos'``)            (``posemb='learned'``)
  blocks               pre-LN, eps ``layer_norm_eps``   pre-LN, eps ``layer_norm_eps``
                       (1e-12), q and v biases only,    (1e-6), q/k/v biases, tanh GELU
                       exact GELU ('gelu')              ('gelu_fast')
  final LayerNorm      only if not use_mean_pooling     always
  pooled output        mean (+ ``fc_norm``, eps 1e-5,   tanh(Dense([CLS])) (``pooler``)
                       of video classifiers)
  ===================  ===============================  ==============================

``encoder_kwargs`` gives the ``ViViT`` attributes of a checkpoint and
``encoder_params`` its weights in our tree; ``vivit.from_pretrained`` combines
them. A key bias (ViViT) is dropped: it adds the same value to every score of a
query, which the softmax removes, so the outputs are unchanged (our encoder has
none, see ``common.head_projection``); on export it is written as zeros.

Other input sizes: a learned table is interpolated from the checkpoint's grid
to the model's (linear in time, bicubic in space,
``common.interpolate_posemb_grid``); the sinusoid is recomputed for any grid.
Channels: a 3-channel checkpoint imported into a 1-channel (grayscale) encoder
has its patch kernel summed over the channels (a gray video then gives the
tokens its 3-channel copy gives), and the decoder head's three predictions of
each pixel averaged.

Not here: the text tower's BERT import (``text.py``), training or the
command-line export (``tools/export_hf.py``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deepcoro_jax.models.common import interpolate_posemb_grid
from deepcoro_jax.models.text import read_checkpoint

logger = logging.getLogger(__name__)

Params = dict[str, Any]
FAMILIES = ("videomae", "vivit")
# hidden_act values and whether they are the tanh approximation of GELU.
_ACTIVATIONS = {"gelu": False, "gelu_fast": True, "gelu_new": True, "gelu_pytorch_tanh": True}
# VideoMAE's fc_norm and decoder norm are torch LayerNorms with their default epsilon.
TORCH_LAYER_NORM_EPS = 1e-5
# Weights of heads that are never imported (video classifiers' classifier layers).
_IGNORED = re.compile(r"classifier\..*")
# transformers 5 module names -> the names its save_pretrained writes (and older files use).
_CURRENT_TO_SAVED = {
    "vivit": (
        (r"^layers\.(\d+)\.", r"encoder.layer.\1."),
        (r"\.attention\.q_proj\.", ".attention.attention.query."),
        (r"\.attention\.k_proj\.", ".attention.attention.key."),
        (r"\.attention\.v_proj\.", ".attention.attention.value."),
        (r"\.attention\.o_proj\.", ".attention.output.dense."),
        (r"\.mlp\.fc1\.", ".intermediate.dense."),
        (r"\.mlp\.fc2\.", ".output.dense."),
    ),
    "videomae": (
        (r"\.attention\.attention\.query\.bias$", ".attention.attention.q_bias"),
        (r"\.attention\.attention\.value\.bias$", ".attention.attention.v_bias"),
    ),
}


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A local Hugging Face video checkpoint: its family, config.json and weights
    (names as ``save_pretrained`` writes them, without the 'videomae.'/'vivit.' prefix
    of the task models)."""

    path: Path
    family: str
    config: dict[str, Any]
    weights: dict[str, np.ndarray]
    weights_file: Path

    def get(self, key: str, default: Any = None) -> Any:
        return self.config.get(key, default)

    @property
    def channels(self) -> int:
        return int(self.get("num_channels", 3))

    @property
    def num_frames(self) -> int:
        return _num_frames(self.config)

    @property
    def image_size(self) -> tuple[int, int]:
        return _image_size(self.config)

    @property
    def grid(self) -> tuple[int, int, int]:
        return _grid(self.config)

    @property
    def has_decoder(self) -> bool:
        return "encoder_to_decoder.weight" in self.weights


def _saved_name(name: str, family: str) -> str:
    """A weight name as save_pretrained writes it: task-model prefix stripped,
    transformers 5 module names mapped to the saved ones."""
    name = name.removeprefix(f"{family}.")
    for pattern, saved in _CURRENT_TO_SAVED[family]:
        name = re.sub(pattern, saved, name)
    return name


def read(path: str | Path) -> Checkpoint:
    """Reads a local VideoMAE or ViViT folder; a clear error for anything else."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder}: not a Hugging Face model folder (no config.json); give the folder "
            "save_pretrained or `huggingface-cli download` wrote"
        )
    config = json.loads((folder / "config.json").read_text())
    family = config.get("model_type")
    try:
        architecture(config)
    except ValueError as e:
        raise ValueError(f"{folder}/{e}") from None
    hidden, heads = int(config.get("hidden_size", 768)), int(config.get("num_attention_heads", 12))
    if hidden % heads or int(config.get("head_dim", hidden // heads)) != hidden // heads:
        raise ValueError(
            f"{folder}/config.json: hidden_size={hidden} with num_attention_heads={heads} "
            f"and head_dim={config.get('head_dim')}: the heads must split hidden_size evenly"
        )
    raw, weights_file = read_checkpoint(folder)
    weights: dict[str, np.ndarray] = {}
    for name, tensor in raw.items():
        saved = _saved_name(name, family)
        if saved in weights:
            raise ValueError(f"{weights_file}: two weights map to {saved!r}")
        weights[saved] = np.asarray(tensor, np.float32)
    return Checkpoint(folder, family, config, weights, weights_file)


# ------------------------------------------------------------------ shapes


def _patch_size(config: Mapping[str, Any]) -> tuple[int, int, int]:
    if config.get("model_type") == "vivit":
        return tuple(int(p) for p in config.get("tubelet_size", (2, 16, 16)))
    p = int(config.get("patch_size", 16))
    return (int(config.get("tubelet_size", 2)), p, p)


def _num_frames(config: Mapping[str, Any]) -> int:
    return int(config.get("num_frames", 16 if config.get("model_type") == "videomae" else 32))


def _image_size(config: Mapping[str, Any]) -> tuple[int, int]:
    size = config.get("image_size", 224)
    return (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)


def _grid(config: Mapping[str, Any]) -> tuple[int, int, int]:
    """The (T', H', W') tubelet grid the checkpoint was made for."""
    pt, ph, pw = _patch_size(config)
    height, width = _image_size(config)
    return (_num_frames(config) // pt, height // ph, width // pw)


def architecture(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``ViViT`` attributes (``ARCHITECTURE_FIELDS``) that a VideoMAE or ViViT
    config.json describes."""
    family = config.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"config.json: model_type={family!r}; supported: {FAMILIES}")
    act = config.get("hidden_act", "gelu" if family == "videomae" else "gelu_fast")
    if act not in _ACTIVATIONS:
        raise ValueError(f"config.json: hidden_act={act!r}; supported: {sorted(_ACTIVATIONS)}")
    kwargs = dict(
        hidden_size=int(config.get("hidden_size", 768)),
        depth=int(config.get("num_hidden_layers", 12)),
        mlp_dim=int(config.get("intermediate_size", 3072)),
        num_heads=int(config.get("num_attention_heads", 12)),
        patch_size=_patch_size(config),
        attention_type="joint",
        stem="linear",
        approximate_gelu=_ACTIVATIONS[act],
    )
    if family == "videomae":
        return dict(
            kwargs,
            posemb="sincos",
            cls_token=False,
            norm_eps=float(config.get("layer_norm_eps", 1e-12)),
            final_norm=not bool(config.get("use_mean_pooling", True)),
        )
    return dict(
        kwargs,
        posemb="learned",
        cls_token=True,
        norm_eps=float(config.get("layer_norm_eps", 1e-6)),
        final_norm=True,
    )


def encoder_kwargs(ckpt: Checkpoint) -> dict[str, Any]:
    """The ``ViViT`` attributes that reproduce `ckpt`'s encoder: its architecture,
    sized for its own input (``num_frames``, ``image_size``), pooled as Hugging Face
    pools it (VideoMAE: the mean, then ``fc_norm`` when the folder has one; ViViT:
    its pooler, or the [CLS] output without one)."""
    kwargs = dict(architecture(ckpt.config), num_frames=ckpt.num_frames,
                  image_size=ckpt.image_size)
    if ckpt.family == "videomae":
        has_fc_norm = not kwargs["final_norm"] and "fc_norm.weight" in ckpt.weights
        return dict(kwargs, pool_type="mean", pool_norm=has_fc_norm)
    pooler = "pooler.dense.weight" in ckpt.weights
    return dict(kwargs, pool_type="cls_tanh" if pooler else "cls", pool_norm=False)


# The attributes that fix the shape of the encoder's weights and what they compute:
# a model built for a checkpoint must have these as encoder_kwargs gives them.
ARCHITECTURE_FIELDS = (
    "hidden_size", "depth", "mlp_dim", "num_heads", "patch_size", "attention_type", "stem",
    "posemb", "cls_token", "norm_eps", "approximate_gelu", "final_norm",
)


def decoder_kwargs(config: Mapping[str, Any], channels: int) -> dict[str, Any]:
    """The ``MVMDecoder`` attributes of the pretraining decoder a VideoMAE
    config.json describes, for videos of `channels` channels."""
    arch = architecture(config)
    return dict(
        patch_dim=math.prod(arch["patch_size"]) * channels,
        posemb_grid=_grid(config),
        width=int(config.get("decoder_hidden_size", 384)),
        depth=int(config.get("decoder_num_hidden_layers", 4)),
        num_heads=int(config.get("decoder_num_attention_heads", 6)),
        mlp_dim=int(config.get("decoder_intermediate_size", 1536)),
        posemb="sincos",
        embed_bias=False,
        norm_eps=arch["norm_eps"],
        final_norm_eps=TORCH_LAYER_NORM_EPS,
        approximate_gelu=arch["approximate_gelu"],
    )


# ----------------------------------------------------------------- weights


def _layer_names(family: str, prefix: str, ours: str) -> dict[tuple[str, ...], str]:
    """Our block's parameter paths -> saved HF names for the layer at `prefix`."""
    attn = f"{prefix}.attention.attention"
    names = {
        ("norm1", "scale"): f"{prefix}.layernorm_before.weight",
        ("norm1", "bias"): f"{prefix}.layernorm_before.bias",
        ("norm2", "scale"): f"{prefix}.layernorm_after.weight",
        ("norm2", "bias"): f"{prefix}.layernorm_after.bias",
        ("attn", "query", "kernel"): f"{attn}.query.weight",
        ("attn", "key", "kernel"): f"{attn}.key.weight",
        ("attn", "value", "kernel"): f"{attn}.value.weight",
        ("attn", "out", "kernel"): f"{prefix}.attention.output.dense.weight",
        ("attn", "out", "bias"): f"{prefix}.attention.output.dense.bias",
        ("mlp", "fc1", "kernel"): f"{prefix}.intermediate.dense.weight",
        ("mlp", "fc1", "bias"): f"{prefix}.intermediate.dense.bias",
        ("mlp", "fc2", "kernel"): f"{prefix}.output.dense.weight",
        ("mlp", "fc2", "bias"): f"{prefix}.output.dense.bias",
    }
    if family == "videomae":
        names[("attn", "query", "bias")] = f"{attn}.q_bias"
        names[("attn", "value", "bias")] = f"{attn}.v_bias"
    else:
        names[("attn", "query", "bias")] = f"{attn}.query.bias"
        names[("attn", "value", "bias")] = f"{attn}.value.bias"
    return {(ours, *k): v for k, v in names.items()}


def encoder_names(family: str, depth: int, params: Params) -> dict[tuple[str, ...], str]:
    """Every parameter path of a family-shaped ``ViViT`` -> its saved HF name."""
    names = {
        ("embedding", "kernel"): "embeddings.patch_embeddings.projection.weight",
        ("embedding", "bias"): "embeddings.patch_embeddings.projection.bias",
        ("encoder_norm", "scale"): "layernorm.weight",
        ("encoder_norm", "bias"): "layernorm.bias",
        ("pool_norm", "scale"): "fc_norm.weight",
        ("pool_norm", "bias"): "fc_norm.bias",
        ("pooler", "kernel"): "pooler.dense.weight",
        ("pooler", "bias"): "pooler.dense.bias",
        ("cls",): "embeddings.cls_token",
        ("pos_embedding",): "embeddings.position_embeddings",
    }
    for i in range(depth):
        names.update(_layer_names(family, f"encoder.layer.{i}", f"encoderblock_{i}"))
    present = set(_paths(params))
    return {path: name for path, name in names.items() if path in present}


def decoder_names(depth: int, params: Params) -> dict[tuple[str, ...], str]:
    """Every parameter path of a VideoMAE-shaped ``MVMDecoder`` -> its saved HF name."""
    names = {
        ("embed", "kernel"): "encoder_to_decoder.weight",
        ("mask_token",): "mask_token",
        ("norm", "scale"): "decoder.norm.weight",
        ("norm", "bias"): "decoder.norm.bias",
        ("head", "kernel"): "decoder.head.weight",
        ("head", "bias"): "decoder.head.bias",
    }
    for i in range(depth):
        names.update(_layer_names("videomae", f"decoder.decoder_layers.{i}", f"block_{i}"))
    present = set(_paths(params))
    return {path: name for path, name in names.items() if path in present}


def _paths(params: Params) -> list[tuple[str, ...]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return [tuple(k.key for k in key_path) for key_path, _ in flat]


def _to_ours(
    path: tuple[str, ...], weight: np.ndarray, shape: tuple[int, ...], ckpt: Checkpoint,
    grid: tuple[int, int, int] | None,
) -> np.ndarray:
    """One HF tensor -> our parameter of `shape` (layout, channels, grid)."""
    leaf = path[-1]
    if path == ("embedding", "kernel"):  # [D, C, pt, ph, pw] -> [pt, ph, pw, C, D]
        kernel = weight.transpose(2, 3, 4, 1, 0)
        if kernel.shape[3] != shape[3]:
            if shape[3] != 1:
                raise ValueError(
                    f"{ckpt.weights_file}: a {kernel.shape[3]}-channel checkpoint cannot feed "
                    f"a {shape[3]}-channel encoder (only 1 channel: the kernel is summed)"
                )
            kernel = kernel.sum(axis=3, keepdims=True)
        return kernel
    if path[0] == "head" and weight.shape[0] != shape[-1] and ckpt.channels > 1:
        # [P * C, ...] in pixel order (pt, ph, pw, C): one channel predicts each
        # pixel's mean over the checkpoint's channels.
        weight = weight.reshape(-1, ckpt.channels, *weight.shape[1:]).mean(axis=1)
    if path in (("cls",), ("mask_token",)):
        return weight.reshape(shape)
    if path == ("pos_embedding",):
        table = weight.reshape(-1, weight.shape[-1])  # [1 + N, D]
        t, h, w = ckpt.grid
        cls_rows, rows = table[:1], table[1:].reshape(t, h, w, -1)
        rows = np.asarray(interpolate_posemb_grid(jnp.asarray(rows), grid))
        return np.concatenate([cls_rows, rows.reshape(-1, rows.shape[-1])])
    if leaf == "kernel":  # torch Linear [out, in] -> ours [in(, heads, head_dim)...]
        return weight.T.reshape(shape)
    return weight.reshape(shape)


def _load(
    names: Mapping[tuple[str, ...], str],
    shapes: Params,
    ckpt: Checkpoint,
    grid: tuple[int, int, int] | None,
    what: str,
) -> tuple[Params, set[str]]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    leaves, missing, mismatched, used = [], [], [], set()
    for key_path, leaf in flat:
        path = tuple(k.key for k in key_path)
        name = names.get(path)
        if name is None or name not in ckpt.weights:
            if name is not None and _is_qv_bias(path):  # qv_bias / qkv_bias False: zeros
                leaves.append(np.zeros(leaf.shape, np.float32))
                continue
            missing.append(name or "/".join(path))
            leaves.append(None)
            continue
        used.add(name)
        value = _to_ours(path, ckpt.weights[name], tuple(leaf.shape), ckpt, grid)
        if tuple(value.shape) != tuple(leaf.shape):
            mismatched.append(f"{name}: gives {value.shape}, the {what} needs {leaf.shape}")
            leaves.append(None)
            continue
        leaves.append(value.astype(np.float32))
    if missing or mismatched:
        raise ValueError(
            f"{ckpt.weights_file}: cannot load the {what}:"
            + (f"\n  not in the checkpoint: {missing}" if missing else "")
            + (f"\n  shape mismatches: {mismatched}" if mismatched else "")
        )
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(v) for v in leaves]), used


def encoder_params(
    ckpt: Checkpoint, encoder, *, channels: int = 1, only_present: bool = False
) -> Params:
    """`ckpt`'s encoder weights as the params of ``encoder`` (a ``ViViT`` built with
    ``encoder_kwargs(ckpt)``'s architecture fields, for videos of `channels`
    channels; its own frames, image size and pooling). With ``only_present`` the
    parameters the checkpoint has no weights for (a MAP head, a pooler it lacks)
    are left out of the result instead of being an error."""
    _check_architecture(ckpt, encoder)
    shapes = encoder_shapes(encoder, channels)
    names = encoder_names(ckpt.family, encoder.depth, shapes)
    if only_present:
        names = {p: n for p, n in names.items() if n in ckpt.weights or _is_qv_bias(p)}
        shapes = _subtree(shapes, set(names))
    params, used = _load(names, shapes, ckpt, encoder.param_grid(), "encoder")
    key_biases = {n for n in ckpt.weights if n.endswith("attention.attention.key.bias")}
    decoder = {n for n in ckpt.weights if n.startswith(("decoder.", "encoder_to_decoder."))}
    unused = set(ckpt.weights) - used - key_biases - decoder - {"mask_token"}
    unused = {n for n in unused if not _IGNORED.fullmatch(n)}
    if unused:
        logger.info("%s: not imported into the encoder: %s", ckpt.weights_file, sorted(unused))
    return params


def decoder_params(ckpt: Checkpoint, decoder) -> Params:
    """VideoMAE's pretraining decoder of `ckpt` as ``decoder``'s params (an
    ``MVMDecoder`` built with ``decoder_kwargs``)."""
    if not ckpt.has_decoder:
        raise ValueError(
            f"{ckpt.weights_file}: no pretraining decoder (encoder_to_decoder.weight); it is "
            "saved by VideoMAEForPreTraining only"
        )
    grid = tuple(decoder.posemb_grid)
    shapes = jax.eval_shape(
        lambda key: decoder.init(
            key,
            jnp.zeros((1, 1, int(ckpt.get("hidden_size", 768)))),
            jnp.zeros((1, 1), jnp.int32),
            jnp.ones((1, math.prod(grid) - 1), jnp.int32),
            grid,
        ),
        jax.random.key(0),
    )["params"]
    params, _ = _load(decoder_names(decoder.depth, shapes), shapes, ckpt, None, "MVM decoder")
    return params


def _is_qv_bias(path: tuple[str, ...]) -> bool:
    return path[-1] == "bias" and path[-2] in ("query", "value")


def _subtree(tree: Params, paths: set[tuple[str, ...]], prefix: tuple[str, ...] = ()) -> Params:
    out = {}
    for key, value in tree.items():
        here = (*prefix, key)
        if isinstance(value, Mapping):
            sub = _subtree(value, paths, here)
            if sub:
                out[key] = sub
        elif here in paths:
            out[key] = value
    return out


def encoder_shapes(encoder, channels: int) -> Params:
    """The shapes of ``encoder``'s params for videos of `channels` channels."""
    image_h, image_w = (
        (encoder.image_size,) * 2 if isinstance(encoder.image_size, int) else encoder.image_size
    )
    video = jax.ShapeDtypeStruct((1, encoder.num_frames, image_h, image_w, channels), jnp.float32)
    return jax.eval_shape(encoder.init, jax.random.key(0), video)["params"]


def architecture_differences(encoder, config: Mapping[str, Any]) -> dict[str, tuple]:
    """{field: (the encoder's value, the checkpoint's)} for each of
    ``ARCHITECTURE_FIELDS`` where ``encoder`` differs from what config.json describes."""

    def plain(value: Any) -> Any:
        return tuple(value) if isinstance(value, list | tuple) else value

    expected = architecture(config)
    return {
        field: (getattr(encoder, field), expected[field])
        for field in ARCHITECTURE_FIELDS
        if plain(getattr(encoder, field)) != plain(expected[field])
    }


def _check_architecture(ckpt: Checkpoint, encoder) -> None:
    wrong = [
        f"{field}={ours!r} (the checkpoint: {theirs!r})"
        for field, (ours, theirs) in architecture_differences(encoder, ckpt.config).items()
    ]
    if wrong:
        raise ValueError(
            f"{ckpt.path}: the encoder does not have the {ckpt.family} checkpoint's "
            f"architecture: {', '.join(wrong)}"
        )


# ------------------------------------------------------------------ export


def family_of(encoder) -> str:
    """'videomae' or 'vivit': the family whose architecture ``encoder`` has; a
    ValueError naming each attribute that fits neither."""
    problems = []
    if encoder.attention_type != "joint":
        problems.append(f"attention_type={encoder.attention_type!r} (both: 'joint')")
    if encoder.stem != "linear":
        problems.append(f"stem={encoder.stem!r} (both: 'linear', a Conv3d tubelet embedding)")
    pt, ph, pw = encoder.patch_size
    if ph != pw:
        problems.append(f"patch_size={tuple(encoder.patch_size)} (both: square patches)")
    if encoder.posemb == "sincos" and not encoder.cls_token:
        family = "videomae"
    elif encoder.posemb == "learned" and encoder.cls_token:
        family = "vivit"
        if not encoder.final_norm:
            problems.append("final_norm=False (ViViT: a final LayerNorm)")
    else:
        family = None
        problems.append(
            f"posemb={encoder.posemb!r} with cls_token={encoder.cls_token} (VideoMAE: "
            "posemb='sincos' and no [CLS]; ViViT: posemb='learned' and cls_token=True)"
        )
    if problems:
        raise ValueError(
            "this encoder is neither a VideoMAE nor a ViViT, so Hugging Face cannot load it: "
            + "; ".join(problems)
        )
    return family


def hf_config(encoder, channels: int) -> dict[str, Any]:
    """The config.json of the Hugging Face model that computes what ``encoder`` does."""
    family = family_of(encoder)
    pt, ph, _ = encoder.patch_size
    image = encoder.image_size
    image_h, image_w = (image, image) if isinstance(image, int) else tuple(image)
    common = dict(
        model_type=family,
        hidden_size=encoder.hidden_size,
        num_hidden_layers=encoder.depth,
        num_attention_heads=encoder.num_heads,
        intermediate_size=encoder.mlp_dim,
        num_channels=channels,
        num_frames=encoder.num_frames,
        image_size=image_h if image_h == image_w else [image_h, image_w],
        layer_norm_eps=encoder.norm_eps,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.02,
        dtype="float32",
    )
    if family == "videomae":
        return dict(
            common,
            architectures=["VideoMAEModel"],
            patch_size=ph,
            tubelet_size=pt,
            hidden_act="gelu_pytorch_tanh" if encoder.approximate_gelu else "gelu",
            qv_bias=True,
            use_mean_pooling=not encoder.final_norm,
        )
    if image_h != image_w:
        raise ValueError(f"ViViT checkpoints are square; the encoder's image_size is {image}")
    return dict(
        common,
        architectures=["VivitModel"],
        tubelet_size=list(encoder.patch_size),
        hidden_act="gelu_fast" if encoder.approximate_gelu else "gelu",
        qkv_bias=True,
    )


def hf_weights(encoder, params: Params) -> dict[str, np.ndarray]:
    """``encoder``'s params as the tensors (saved names, torch layouts) of its Hugging
    Face model; a key bias is written as zeros (see the module docstring)."""
    family = family_of(encoder)
    names = encoder_names(family, encoder.depth, params)
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    tensors = {}
    for key_path, value in flat:
        path = tuple(k.key for k in key_path)
        if path not in names:
            continue  # our own heads (a MAP head): not part of the Hugging Face model
        value = np.asarray(value, np.float32)
        if path == ("embedding", "kernel"):
            value = value.transpose(4, 3, 0, 1, 2)
        elif path[-1] == "kernel":  # ours [in(, heads, head_dim)] or [heads, head_dim, out]
            per_head_out = path[-2] in ("query", "key", "value")
            value = value.reshape(value.shape[0], -1) if per_head_out else value.reshape(
                -1, value.shape[-1])
            value = value.T  # torch Linear [out, in]
        elif path == ("cls",):
            value = value.reshape(1, 1, -1)
        elif path == ("pos_embedding",):
            value = value[None]
        else:
            value = value.reshape(-1)
        tensors[names[path]] = np.ascontiguousarray(value)
    if family == "vivit":
        for i in range(encoder.depth):
            tensors[f"encoder.layer.{i}.attention.attention.key.bias"] = np.zeros(
                encoder.hidden_size, np.float32
            )
    return tensors


def export(
    encoder,
    params: Params,
    out: str | Path,
    *,
    channels: int,
    preprocessing: Mapping[str, Any] | None = None,
    readme: str = "",
) -> Path:
    """Writes ``encoder`` with its params as a Hugging Face folder: config.json,
    model.safetensors, preprocessor_config.json (from `preprocessing`: size,
    frames, pixel scaling) and README.md (`readme`). Returns the folder."""
    from safetensors.numpy import save_file

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    config = hf_config(encoder, channels)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(hf_weights(encoder, params), str(folder / "model.safetensors"), {"format": "pt"})
    if preprocessing is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(dict(preprocessing), indent=2))
    if readme:
        (folder / "README.md").write_text(readme)
    return folder
