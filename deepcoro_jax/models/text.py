"""BERT-style text tower: report token ids -> token features and one pooled embedding.

For: the report side of the video-report objectives. The encoder is Hugging Face
BERT, layer for layer (post-LN blocks, exact erf GELU, absolute positions), so a
local HF BERT checkpoint such as PubMedBERT imports exactly (``from_pretrained``);
``BertConfig.from_size`` gives a small from-scratch tower for the demo.

Not for: tokenisation (``deepcoro_jax/domain/tokenizers.py``), caption decoding
(``locca.py``), or masked-language-model pretraining: the HF pooler and MLM/NSP
heads are deliberately not imported (``IGNORED_HF_WEIGHT_PREFIXES``).
Parameters are float32; ``dtype`` is the compute dtype.
"""

import dataclasses
import functools
import json
import logging
import math
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepcoro_jax.models.common import attention, cudnn_applies

Dtype = Any
Params = dict[str, Any]

logger = logging.getLogger(__name__)

# Widths of the from-scratch towers; 'base' and 'large' are the BERT/PubMedBERT shapes.
TEXT_SIZES: dict[str, dict[str, int]] = {
    "mu": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256),
    "tiny": dict(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512
    ),
    "small": dict(
        hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048
    ),
    "base": dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
    ),
    "large": dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
    ),
}

# Hugging Face checkpoint entries we never load (after stripping a leading "bert."):
# the tanh pooler, the MLM and NSP heads of BertForPreTraining/BertForMaskedLM, and
# the position_ids / token_type_ids buffers that older checkpoints serialised.
IGNORED_HF_WEIGHT_PREFIXES: tuple[str, ...] = (
    "pooler.",
    "cls.",
    "embeddings.position_ids",
    "embeddings.token_type_ids",
)

# config.json keys that old checkpoints may omit; the values are transformers' own defaults.
_HF_CONFIG_DEFAULTS = {
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
    "is_decoder": False,
}
_HF_CONFIG_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
)

_WEIGHT_INIT = nn.initializers.normal(stddev=0.02)  # BERT's initializer_range


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The BERT encoder's shape and regularisation, named as in HF's config.json."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int | None = 0  # its word-embedding row starts at zero, as in HF

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"BertConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"BertConfig: hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"BertConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"BertConfig.pad_token_id={self.pad_token_id} is outside the vocabulary "
                f"[0, {self.vocab_size})"
            )

    @classmethod
    def from_json(cls, path: str | Path) -> "BertConfig":
        """Reads a Hugging Face BERT ``config.json``.

        Keys that old checkpoints omit (``layer_norm_eps``, ``pad_token_id``,
        ``hidden_act``, ``position_embedding_type``) take transformers' defaults;
        any other missing key, or an architecture this encoder does not implement
        (non-erf GELU, relative positions, a causal decoder), is an error.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"BERT config file not found: {path}")
        with path.open() as f:
            raw = json.load(f)
        model_type = raw.get("model_type", "bert")
        if model_type != "bert":
            raise ValueError(f"{path}: model_type={model_type!r}, only 'bert' is supported")
        missing = [key for key in _HF_CONFIG_REQUIRED if key not in raw]
        if missing:
            raise ValueError(f"{path}: missing key(s) {missing} in the BERT config")
        hf = {**_HF_CONFIG_DEFAULTS, **raw}
        if hf["hidden_act"] != "gelu":
            raise ValueError(
                f"{path}: hidden_act={hf['hidden_act']!r} is not supported; this encoder "
                "implements HF BERT's 'gelu' (exact, erf-based)"
            )
        if hf["position_embedding_type"] != "absolute":
            raise ValueError(
                f"{path}: position_embedding_type={hf['position_embedding_type']!r} is not "
                "supported; only 'absolute' position embeddings are implemented"
            )
        if hf["is_decoder"]:
            raise ValueError(f"{path}: is_decoder=true (causal BERT) is not supported")
        try:
            return cls(**{field.name: hf[field.name] for field in dataclasses.fields(cls)})
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    @classmethod
    def from_size(
        cls,
        size: str,
        *,
        vocab_size: int,
        max_position_embeddings: int = 512,
        pad_token_id: int | None = 0,
        dropout_prob: float = 0.1,
    ) -> "BertConfig":
        """A from-scratch config of one of ``TEXT_SIZES`` for a tokenizer's vocabulary.

        ``dropout_prob`` sets both the hidden and the attention-probability dropout.
        """
        if size not in TEXT_SIZES:
            raise ValueError(f"unknown text size {size!r}; choose one of {sorted(TEXT_SIZES)}")
        return cls(
            vocab_size=vocab_size,
            max_position_embeddings=max_position_embeddings,
            pad_token_id=pad_token_id,
            hidden_dropout_prob=dropout_prob,
            attention_probs_dropout_prob=dropout_prob,
            **TEXT_SIZES[size],
        )


def _word_embedding_init(pad_token_id: int | None) -> nn.initializers.Initializer:
    def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
        table = _WEIGHT_INIT(key, shape, dtype)
        if pad_token_id is None:
            return table
        return table.at[pad_token_id].set(0.0)

    return init


class BertEmbeddings(nn.Module):
    """Word + token-type + absolute position embeddings, then LayerNorm and dropout."""

    config: BertConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array, train: bool) -> jax.Array:
        cfg = self.config
        seq_len = input_ids.shape[1]

        def embed(
            num: int, name: str, init: nn.initializers.Initializer = _WEIGHT_INIT
        ) -> nn.Embed:
            return nn.Embed(num, cfg.hidden_size, dtype=self.dtype, embedding_init=init, name=name)

        words = embed(cfg.vocab_size, "word_embeddings", _word_embedding_init(cfg.pad_token_id))
        positions = embed(cfg.max_position_embeddings, "position_embeddings")
        token_types = embed(cfg.type_vocab_size, "token_type_embeddings")
        x = words(input_ids) + token_types(token_type_ids)  # [B, L, D]
        x = x + positions(jnp.arange(seq_len))[None]  # [B, L, D]
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="layer_norm")(x)
        return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=not train)


def _bert_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None = None,
    *,
    implementation: str,
    key_lengths: jax.Array,
    dropout_rng: jax.Array | None = None,
    dropout_rate: float = 0.0,
    broadcast_dropout: bool = True,
    deterministic: bool = False,
    dtype: Dtype | None = None,
    precision: Any = None,
) -> jax.Array:
    """The ``attention_fn`` of BERT's attention (Flax passes the arguments it names):
    Flax's softmax attention in float32, or cuDNN's fused kernel
    (``implementation='cudnn'``) where it applies: no attention dropout in this
    call and 16-bit inputs. cuDNN reads the padding as `key_lengths` (real tokens
    first, padding after, as the tokenizers write it)."""
    if (
        implementation == "cudnn"
        and (deterministic or dropout_rate == 0.0)
        and cudnn_applies(query, key)
    ):
        out = attention(query, key, value, implementation="cudnn", key_lengths=key_lengths)
        return out.astype(dtype or query.dtype)
    return nn.dot_product_attention(
        query,
        key,
        value,
        mask=mask,
        dropout_rng=dropout_rng,
        dropout_rate=dropout_rate,
        broadcast_dropout=broadcast_dropout,
        deterministic=deterministic,
        dtype=dtype,
        precision=precision,
        force_fp32_for_softmax=True,
    )


class BertLayer(nn.Module):
    """Post-LN block as in HF BERT: LN(x + Attn(x)), then LN(x + FFN(x)), erf GELU.

    ``attention_impl`` is the attention kernel, 'xla' or 'cudnn' (``_bert_attention``).
    """

    config: BertConfig
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(
        self, x: jax.Array, key_mask: jax.Array, train: bool, key_lengths: jax.Array
    ) -> jax.Array:
        """x [B, L, D]; key_mask [B, 1, 1, L] bool, True for real (non-padding) keys;
        key_lengths [B], the number of real keys (for cuDNN)."""
        cfg = self.config

        def dropout(y: jax.Array, rate: float) -> jax.Array:
            return nn.Dropout(rate)(y, deterministic=not train)

        def layer_norm(name: str) -> nn.LayerNorm:
            return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name=name)

        attended = nn.MultiHeadDotProductAttention(
            num_heads=cfg.num_attention_heads,
            dtype=self.dtype,
            dropout_rate=cfg.attention_probs_dropout_prob,
            broadcast_dropout=False,
            kernel_init=_WEIGHT_INIT,
            attention_fn=functools.partial(
                _bert_attention, implementation=self.attention_impl, key_lengths=key_lengths
            ),
            name="attention",
        )(x, mask=key_mask, deterministic=not train)  # [B, L, D]
        x = layer_norm("attention_norm")(x + dropout(attended, cfg.hidden_dropout_prob))
        hidden = nn.Dense(
            cfg.intermediate_size, dtype=self.dtype, kernel_init=_WEIGHT_INIT, name="intermediate"
        )(x)  # [B, L, intermediate_size]
        hidden = nn.gelu(hidden, approximate=False)
        hidden = nn.Dense(
            cfg.hidden_size, dtype=self.dtype, kernel_init=_WEIGHT_INIT, name="output"
        )(hidden)  # [B, L, D]
        return layer_norm("output_norm")(x + dropout(hidden, cfg.hidden_dropout_prob))


def _projection_head(embed_dim: int, dtype: Dtype) -> nn.Dense:
    return nn.Dense(embed_dim, dtype=dtype, name="head")


class TextEncoder(nn.Module):
    """BERT encoder, pooling ('cls' token or masked 'mean') and an optional projection.

    Attributes:
        config: the encoder's shape.
        embed_dim: width of the projected embedding; None returns the pooled features.
        pool_type: 'cls' (hidden state of the first token, [CLS] for BERT tokenizers)
            or 'mean' (average over positions where ``attention_mask`` is 1).
        attention_impl: the attention kernel, 'xla' or 'cudnn'; cuDNN reads the
            mask as right padding (real tokens first), which is what the
            tokenizers write.
        dtype: compute dtype; parameters stay float32.
    """

    config: BertConfig
    embed_dim: int | None = None
    pool_type: str = "cls"
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
        *,
        train: bool = False,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Encodes a batch of token ids.

        Args:
            input_ids: [B, L] int token ids.
            attention_mask: [B, L], 1 (or True) for real tokens, 0 for padding.
                Padding is never attended to; its hidden states are computed (as in
                HF) but are excluded from mean pooling.
            token_type_ids: [B, L] segment ids; None means all zeros.
            train: enables dropout (needs a 'dropout' rng).

        Returns:
            (embedding [B, embed_dim or D], aux) with aux['tokens'] the last hidden
            states [B, L, D], aux['pooled'] [B, D] before the projection and
            aux['embedding'].
        """
        cfg = self.config
        if self.pool_type not in ("cls", "mean"):
            raise ValueError(f"TextEncoder: pool_type={self.pool_type!r}, expected 'cls' or 'mean'")
        if input_ids.ndim != 2:
            raise ValueError(f"TextEncoder: input_ids must be [B, L], got shape {input_ids.shape}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"TextEncoder: attention_mask shape {attention_mask.shape} != input_ids shape "
                f"{input_ids.shape}"
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        elif token_type_ids.shape != input_ids.shape:
            raise ValueError(
                f"TextEncoder: token_type_ids shape {token_type_ids.shape} != input_ids shape "
                f"{input_ids.shape}"
            )
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(
                f"TextEncoder: sequence length {input_ids.shape[1]} exceeds "
                f"max_position_embeddings={cfg.max_position_embeddings}"
            )

        is_token = attention_mask.astype(bool)  # [B, L]
        x = BertEmbeddings(cfg, dtype=self.dtype, name="embeddings")(
            input_ids, token_type_ids, train
        )
        key_mask = is_token[:, None, None, :]  # [B, 1 head, 1 query, L keys]
        key_lengths = is_token.sum(axis=1, dtype=jnp.int32)  # [B]
        for i in range(cfg.num_hidden_layers):
            x = BertLayer(
                cfg, dtype=self.dtype, attention_impl=self.attention_impl, name=f"layer_{i}"
            )(x, key_mask, train, key_lengths)
        tokens = x  # [B, L, D]

        if self.pool_type == "cls":
            pooled = tokens[:, 0]  # [B, D]
        else:
            weights = is_token.astype(tokens.dtype)[:, :, None]  # [B, L, 1]
            count = jnp.maximum(weights.sum(axis=1), 1.0)  # [B, 1]
            pooled = (tokens * weights).sum(axis=1) / count  # [B, D]

        if self.embed_dim is None:
            embedding = pooled
        else:
            embedding = _projection_head(self.embed_dim, self.dtype)(pooled)  # [B, embed_dim]
        return embedding, {"tokens": tokens, "pooled": pooled, "embedding": embedding}


# ---------------------------------------------------------------------------
# Hugging Face checkpoint import.

# Our module names -> HF module paths; a layer's entries are relative to encoder.layer.{i}.
_HF_EMBEDDING_MODULES = {
    "word_embeddings": "embeddings.word_embeddings",
    "position_embeddings": "embeddings.position_embeddings",
    "token_type_embeddings": "embeddings.token_type_embeddings",
    "layer_norm": "embeddings.LayerNorm",
}
_HF_LAYER_MODULES = {
    ("attention", "query"): "attention.self.query",
    ("attention", "key"): "attention.self.key",
    ("attention", "value"): "attention.self.value",
    ("attention", "out"): "attention.output.dense",
    ("attention_norm",): "attention.output.LayerNorm",
    ("intermediate",): "intermediate.dense",
    ("output",): "output.dense",
    ("output_norm",): "output.LayerNorm",
}
_HF_LEAF_NAMES = {"embedding": "weight", "kernel": "weight", "scale": "weight", "bias": "bias"}
_HF_LEGACY_LEAF_NAMES = {"LayerNorm.gamma": "LayerNorm.weight", "LayerNorm.beta": "LayerNorm.bias"}


def _hf_name(path: tuple[str, ...]) -> str:
    """Our parameter path -> the HF BertModel weight name."""
    *module, leaf = path
    if module[0] == "embeddings":
        hf_module = _HF_EMBEDDING_MODULES[module[1]]
    else:
        layer_index = int(module[0].removeprefix("layer_"))
        hf_module = f"encoder.layer.{layer_index}.{_HF_LAYER_MODULES[tuple(module[1:])]}"
    return f"{hf_module}.{_HF_LEAF_NAMES[leaf]}"


def _kernel_input_ndim(path: tuple[str, ...]) -> int:
    """How many leading kernel axes are inputs: 2 for attention out [heads, head_dim, D]."""
    return 2 if path[-2] == "out" else 1


def _expected_hf_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape of the weight that becomes our parameter of ``shape``."""
    if path[-1] == "embedding":
        return shape
    if path[-1] == "kernel":  # torch Linear weight is [out_features, in_features]
        n_in = _kernel_input_ndim(path)
        return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))
    return (math.prod(shape),)  # biases and LayerNorm scales are flat in torch


def _to_flax(path: tuple[str, ...], weight: np.ndarray, shape: tuple[int, ...]) -> jax.Array:
    weight = np.asarray(weight, dtype=np.float32)
    if path[-1] == "kernel":
        weight = weight.T  # [in_features, out_features]
    return jnp.asarray(weight.reshape(shape))


# The weight files of a local Hugging Face folder that `read_checkpoint` reads, in order.
CHECKPOINT_FILES = ("model.safetensors", "pytorch_model.bin")


def read_checkpoint(directory: Path) -> tuple[dict[str, np.ndarray], Path]:
    """Reads every tensor of a local HF checkpoint as NumPy (torch only for .bin files)."""
    safetensors_path, bin_path = (directory / name for name in CHECKPOINT_FILES)
    if safetensors_path.is_file():
        from safetensors.numpy import load_file

        try:
            return load_file(safetensors_path), safetensors_path
        except TypeError:  # NumPy has no bfloat16; read such files through JAX instead.
            from safetensors.flax import load_file as load_file_as_jax

            tensors = load_file_as_jax(safetensors_path)
            return {name: np.asarray(t, dtype=np.float32) for name, t in tensors.items()}, (
                safetensors_path
            )
    if bin_path.is_file():
        try:
            import torch
        except ImportError as e:
            raise ImportError(
                f"{bin_path} is a PyTorch pickle and reading it needs torch, which is not "
                "installed; convert the checkpoint to model.safetensors (e.g. "
                "`model.save_pretrained(dir, safe_serialization=True)` in transformers) "
                "or install torch"
            ) from e
        state = torch.load(bin_path, map_location="cpu", weights_only=True)
        return {
            name: (t.float() if t.is_floating_point() else t).numpy() for name, t in state.items()
        }, bin_path
    present = sorted(p.name for p in directory.iterdir())
    raise FileNotFoundError(
        f"{directory}: no model.safetensors or pytorch_model.bin (sharded checkpoints are not "
        f"supported); found {present}"
    )


def _canonical_hf_names(
    raw: dict[str, np.ndarray], source: str
) -> dict[str, tuple[str, np.ndarray]]:
    """bare BertModel name -> (name in the file, tensor): strips 'bert.', renames gamma/beta."""
    canonical: dict[str, tuple[str, np.ndarray]] = {}
    for name, tensor in raw.items():
        bare = name.removeprefix("bert.")
        for legacy, current in _HF_LEGACY_LEAF_NAMES.items():
            if bare.endswith(legacy):
                bare = bare[: -len(legacy)] + current
        if bare in canonical:
            raise ValueError(
                f"{source}: weights {canonical[bare][0]!r} and {name!r} both map to {bare!r}"
            )
        canonical[bare] = (name, tensor)
    return canonical


def params_from_hf_weights(
    weights: dict[str, np.ndarray], config: BertConfig, *, source: str = "checkpoint"
) -> Params:
    """Maps HF BERT weights (bare or 'bert.'-prefixed names) to ``TextEncoder`` params.

    Every encoder weight must be present with the shape ``config`` implies; the
    entries under ``IGNORED_HF_WEIGHT_PREFIXES`` are skipped. Anything else
    (a missing, unused or mis-shaped weight) raises one error listing them all.
    The returned tree has no projection head.
    """
    canonical = _canonical_hf_names(weights, source)
    encoder = TextEncoder(config)
    dummy = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(encoder.init, jax.random.key(0), dummy, dummy)["params"]
    flat_shapes, treedef = jax.tree_util.tree_flatten_with_path(shapes)

    missing, mismatched, leaves, used = [], [], [], set()
    for key_path, leaf in flat_shapes:
        path = tuple(k.key for k in key_path)
        hf_name = _hf_name(path)
        expected = _expected_hf_shape(path, leaf.shape)
        if hf_name not in canonical:
            missing.append(hf_name)
            leaves.append(None)
            continue
        file_name, tensor = canonical[hf_name]
        used.add(hf_name)
        if tuple(tensor.shape) != expected:
            mismatched.append(f"{file_name}: {tuple(tensor.shape)} (expected {expected})")
            leaves.append(None)
            continue
        leaves.append(_to_flax(path, tensor, leaf.shape))

    ignored = sorted(
        file_name
        for bare, (file_name, _) in canonical.items()
        if bare not in used and bare.startswith(IGNORED_HF_WEIGHT_PREFIXES)
    )
    unused = sorted(
        file_name
        for bare, (file_name, _) in canonical.items()
        if bare not in used and not bare.startswith(IGNORED_HF_WEIGHT_PREFIXES)
    )
    problems = []
    if missing:
        problems.append(f"missing weights (names with or without 'bert.'): {missing}")
    if unused:
        problems.append(f"unused weights: {unused}")
    if mismatched:
        problems.append(f"shape mismatches: {mismatched}")
    if problems:
        raise ValueError(f"{source}: cannot load as BERT:\n  " + "\n  ".join(problems))
    if ignored:
        logger.info("%s: deliberately ignored (pooler/MLM/NSP heads, buffers): %s", source, ignored)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def hf_config(config: BertConfig) -> dict[str, Any]:
    """The config.json of the Hugging Face ``BertModel`` with `config`'s shape."""
    return {
        "model_type": "bert",
        "architectures": ["BertModel"],
        **dataclasses.asdict(config),
        "hidden_act": "gelu",
        "position_embedding_type": "absolute",
        "initializer_range": 0.02,
        "dtype": "float32",
    }


def hf_weights(params: Params) -> dict[str, np.ndarray]:
    """``TextEncoder`` params (its projection head, if any, left out) as the tensors of
    a Hugging Face ``BertModel`` (names and torch layouts of ``params_from_hf_weights``,
    the other way); the pooler is not ours, so it is not written."""
    flat, _ = jax.tree_util.tree_flatten_with_path({k: v for k, v in params.items() if k != "head"})
    tensors = {}
    for key_path, value in flat:
        path = tuple(k.key for k in key_path)
        value = np.asarray(value, np.float32)
        expected = _expected_hf_shape(path, value.shape)
        if path[-1] == "kernel":
            n_in = _kernel_input_ndim(path)
            value = value.reshape(math.prod(value.shape[:n_in]), -1).T
        tensors[_hf_name(path)] = np.ascontiguousarray(value.reshape(expected))
    return tensors


def from_pretrained(
    path: str | Path,
    *,
    embed_dim: int | None = None,
    pool_type: str = "cls",
    dtype: Dtype = jnp.float32,
    rng: jax.Array | int = 0,
) -> tuple[TextEncoder, Params]:
    """Loads a local Hugging Face BERT folder (config.json + model.safetensors or .bin).

    Accepts BertModel, BertForMaskedLM and BertForPreTraining checkpoints (e.g.
    PubMedBERT); their pooler and MLM/NSP heads are not loaded. If ``embed_dim``
    is set, the projection head is freshly initialised from ``rng`` (a key or an
    int seed). Returns ``(model, params)`` for ``model.apply({'params': params}, ...)``.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"Hugging Face checkpoint folder not found: {directory}")
    config = BertConfig.from_json(directory / "config.json")
    weights, weights_path = read_checkpoint(directory)
    params = params_from_hf_weights(weights, config, source=str(weights_path))
    model = TextEncoder(config, embed_dim=embed_dim, pool_type=pool_type, dtype=dtype)
    if embed_dim is not None:
        key = jax.random.key(rng) if isinstance(rng, int) else rng
        pooled = jnp.zeros((1, config.hidden_size), jnp.float32)
        params["head"] = _projection_head(embed_dim, dtype).init(key, pooled)["params"]
    return model, params
