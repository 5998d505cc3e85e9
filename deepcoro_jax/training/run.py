"""A run from its config: tokenizers, model, optimizer, train state, update step.

What the trainer (``train.py``), its eval mode, the tools (``deepcoro_jax/tools``)
and the benchmarks build from a run's config, each the same way: the tokenizer
specs (`tokenizer_spec`), the model (`build_model`), durations in any unit
(`resolve_steps`), the optax chain (`make_optimizer`), the train state born sharded
(`create_train_state`, `state_shardings`) and its initial weights from a Hugging
Face text tower or another run (`initial_weights`), and the update step
(`make_train_step`) with the checks of its metrics (`check_finite`), and the files a
run keeps of its inputs so that it can be used without them (`write_assets`,
`read_assets`: tokenizers, the data's format), and what its evaluators get
(`predict_fns`: named, jitted predict functions; `eval_spec`: their input). No
TensorFlow is imported at the top: only `tokenizer_spec` reads a prepared
dataset's metadata.

The train step is one jitted function of (state, batch): the composite forward
pass, the weighted sum of the contrastive (SigLIP or softmax), caption and MVM
losses (+ distillation from an EMA teacher when its weight is not 0),
gradients accumulated over micro-batches, clipping and the update, with the
state donated.

Not here: the loop, its logging and checkpoint schedule (``train.py``, for
launch.py alone); the losses (``deepcoro_jax/losses.py``); optimizer components
and schedules (``optim.py``); checkpoint mechanics (``checkpoint.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deepcoro_jax import losses
from deepcoro_jax.domain import locations, tokenizers
from deepcoro_jax.models import decode, multitask
from deepcoro_jax.models import mvm as mvm_lib
from deepcoro_jax.models import text as text_lib
from deepcoro_jax.models import vivit as vivit_lib
from deepcoro_jax.training import checkpoint, optim, sharding
from evaluators import common as eval_common

LOSS_TERMS = ("contrastive", "caption", "mvm", "distill")
# How grad_accum_steps treats the contrastive term (make_train_step).
CONTRASTIVE_ACCUMULATION = ("micro", "cached")
DURATION_UNITS = ("steps", "examples", "epochs", "percent")  # in order of precedence
# Nominal dense bf16 matmul peaks (FLOP/s) by exact `device_kind`, for the logged MFU.
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
}


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: updates applied so far
    params: Any
    opt_state: Any
    ema_params: Any  # the EMA teacher, or None when distillation is off
    rng: jax.Array  # raw uint32[2] base key; step keys are fold_in(rng, step)


class NonFiniteError(FloatingPointError):
    """A loss term or the gradient became NaN or infinite."""


# ----------------------------------------------------------------------------- durations


def resolve_steps(
    name: str,
    section: ml_collections.ConfigDict,
    *,
    steps_per_epoch: float | None,
    global_batch: int,
    total_steps: int | None = None,
) -> int | None:
    """Steps from ``<name>_steps``, ``_examples``, ``_epochs`` or ``_percent``; None if none is set.

    When several are set, the first of that order wins and the others are
    logged as ignored: a recipe states its duration in one unit, and a
    command-line override in a more explicit unit (``--config.total_steps=N``
    over the recipe's ``total_epochs``) takes over without clearing it.
    `steps_per_epoch` None means epochs are not defined for this input (an
    error if ``<name>_epochs`` is the unit used); percent is of `total_steps`.
    """
    given = {
        unit: section.get(f"{name}_{unit}")
        for unit in DURATION_UNITS
        if section.get(f"{name}_{unit}") is not None
    }
    if not given:
        return None
    if len(given) > 1:
        used, *ignored = given
        logging.warning(
            "config: %s_%s=%s sets the duration; ignored: %s",
            name,
            used,
            given[used],
            ", ".join(f"{name}_{u}={given[u]}" for u in ignored),
        )
    unit, value = next(iter(given.items()))
    if value < 0:
        raise ValueError(f"config: {name}_{unit}={value} must not be negative")
    if unit == "steps":
        return int(value)
    if unit == "epochs":
        if steps_per_epoch is None:
            raise ValueError(
                f"config: {name}_epochs is not defined for this input (study-level examples); "
                f"give {name}_steps or {name}_examples"
            )
        return int(math.ceil(value * steps_per_epoch))
    if unit == "examples":
        return int(math.ceil(value / global_batch))
    if total_steps is None:
        raise ValueError(f"config: {name}_percent needs the total duration")
    return int(round(value / 100 * total_steps))


# --------------------------------------------------------------------------------- model


def tokenizer_spec(spec: str, data_dir: str, text_init: str = "") -> str:
    """The tokenizer spec a run uses for config.input.{text,caption}_tokenizer `spec`.

    'dataset' means the prepared dataset's own tokenizer, or the WordPiece
    vocabulary of `text_init` (a Hugging Face folder) when one is given; any other
    spec is used as it is.
    """
    from input_pipeline import dataset_format

    if text_init and spec == "dataset":
        return f"wordpiece:{text_init}"
    if spec == "dataset":
        return dataset_format.tokenizer_spec(data_dir)
    return spec


# The files a run keeps of its inputs, under WORKDIR/assets (see `write_assets`).
ASSETS_DIR = "assets"
ASSETS_FILE = "run.json"
DATASET_META_FILE = "dataset_meta.json"
WORDPIECE_FILES = (
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
)


def _tokenizer_kind_and_path(spec: str) -> tuple[str, str]:
    """('sp' or 'wordpiece', path) of a spec, as `tokenizers.get_tokenizer` reads it."""
    kind, sep, path = spec.partition(":")
    if sep and kind in ("sp", "wordpiece"):
        return kind, path
    return ("wordpiece" if epath.Path(spec).is_dir() else "sp"), spec


def _copy_tokenizer(spec: str, folder: epath.Path) -> str:
    """Copies the files of tokenizer `spec` into `folder`; the spec relative to its parent."""
    kind, path = _tokenizer_kind_and_path(spec)
    source = epath.Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "sp":
        (folder / source.name).write_bytes(source.read_bytes())
        return f"sp:{folder.name}/{source.name}"
    for name in WORDPIECE_FILES:
        if (source / name).exists():
            (folder / name).write_bytes((source / name).read_bytes())
    return f"wordpiece:{folder.name}"


def write_assets(
    workdir: str,
    *,
    caption_spec: str,
    text_spec: str,
    data_dir: str,
    dataset_meta: dict,
    config: ml_collections.ConfigDict | None = None,
) -> None:
    """Writes into ``WORKDIR/assets`` what any later use of the run needs besides its
    config and checkpoints: copies of both tokenizers' files, the prepared data's
    format (`dataset_meta`: frame size and format, prepare's frame options and fps,
    label columns), where the data was and where the initial weights came from
    (``run.json``, `initial_weights_record`), and the config.json of a
    ``video_init`` checkpoint (``video_init/config.json``: a resumed run rebuilds
    its encoder from it). `read_assets` reads them back; inference and eval then
    need no prepared data to build the model."""
    assets = epath.Path(workdir) / ASSETS_DIR
    record = {
        "caption_tokenizer": _copy_tokenizer(caption_spec, assets / "caption_tokenizer"),
        "text_tokenizer": _copy_tokenizer(text_spec, assets / "text_tokenizer"),
        "data_dir": data_dir,
    }
    if config is not None:
        record["initial_weights"] = initial_weights_record(config)
        if config.get("video_init"):
            (assets / VIDEO_INIT_DIR).mkdir(parents=True, exist_ok=True)
            source = epath.Path(config.video_init) / "config.json"
            (assets / VIDEO_INIT_DIR / "config.json").write_text(source.read_text())
    (assets / DATASET_META_FILE).write_text(json.dumps(dataset_meta, indent=2))
    (assets / ASSETS_FILE).write_text(json.dumps(record, indent=2))


def read_assets(workdir: str) -> dict | None:
    """What `write_assets` wrote: the tokenizer specs (absolute), ``data_dir`` (where the
    run's data was; it may have moved since) and ``dataset_meta`` (a dict); None for a
    run without assets (written before runs kept them)."""
    assets = epath.Path(workdir) / ASSETS_DIR
    if not (assets / ASSETS_FILE).exists():
        return None
    record = json.loads((assets / ASSETS_FILE).read_text())
    for role in ("caption_tokenizer", "text_tokenizer"):
        kind, _, relative = record[role].partition(":")
        record[role] = f"{kind}:{assets / relative}"
    record["dataset_meta"] = json.loads((assets / DATASET_META_FILE).read_text())
    return record


VIDEO_INIT_INCLUDE = ("encoder", "encoder+decoder")
VIDEO_INIT_DIR = "video_init"


def _hf_video_config(config: ml_collections.ConfigDict, workdir: str | None) -> dict:
    """The config.json of config.video_init: the run's copy (assets/video_init) when it
    has one, else the folder's."""
    if workdir:
        kept = epath.Path(workdir) / ASSETS_DIR / VIDEO_INIT_DIR / "config.json"
        if kept.exists():
            return json.loads(kept.read_text())
    source = epath.Path(config.video_init) / "config.json"
    if not source.exists():
        raise FileNotFoundError(
            f"config.video_init={config.video_init!r}: no config.json there; give a local "
            "Hugging Face VideoMAE or ViViT folder (docs/training.md, 'Pretrained video "
            "weights')"
        )
    return json.loads(source.read_text())


def resolve_video_init(
    config: ml_collections.ConfigDict, workdir: str | None = None
) -> list[str]:
    """With ``config.video_init`` (a Hugging Face VideoMAE or ViViT folder), gives the
    encoder the checkpoint's architecture, in place: ``model.patch_size`` and the
    ``model.encoder_overrides`` of ``hf_video.ARCHITECTURE_FIELDS``; with
    ``video_init_include='encoder+decoder'`` also ``model.mvm_decoder_overrides``
    (VideoMAE's pretraining decoder). The input size and the pooling stay the
    config's. Returns the changes as 'field: old -> new' lines (none when the config
    already has them, as a resumed run's config.json does)."""
    from deepcoro_jax.models import hf_video

    if not config.get("video_init"):
        return []
    hf = _hf_video_config(config, workdir)
    arch = hf_video.architecture(hf)
    with_decoder = config.video_init_include == "encoder+decoder"
    if with_decoder and hf.get("model_type") != "videomae":
        raise ValueError(
            f"config.video_init_include='encoder+decoder': {config.video_init} is a "
            f"{hf.get('model_type')} checkpoint; only VideoMAE has a pretraining decoder"
        )
    encoder = vivit_lib.ViViT(**vivit_kwargs_of(config))
    differences = hf_video.architecture_differences(encoder, hf)
    changes = [
        f"model.{'' if field == 'patch_size' else 'encoder_overrides.'}{field}: {ours!r} -> "
        f"{theirs!r}"
        for field, (ours, theirs) in differences.items()
    ]
    config.model.patch_size = tuple(arch.pop("patch_size"))
    config.model.encoder_overrides = {**config.model.encoder_overrides, **arch}
    if with_decoder:
        decoder = {
            k: v
            for k, v in hf_video.decoder_kwargs(hf, channels=1).items()
            if k not in ("patch_dim", "posemb_grid")
        }
        before = dict(config.model.get("mvm_decoder_overrides") or {})
        if any(before.get(k) != v for k, v in decoder.items()):
            changes.append(f"model.mvm_decoder_overrides: {before} -> {decoder}")
        config.model.mvm_decoder_overrides = {**before, **decoder}
    return changes


def vivit_kwargs_of(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The ``ViViT`` attributes ``build_model`` gives the encoder of `config`."""
    m = config.model
    return {
        **vivit_lib.vivit_kwargs(m.size),
        "patch_size": tuple(m.patch_size),
        **dict(m.encoder_overrides),
    }


def initial_weights_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Where the run's initial weights came from (for ``assets/run.json``): the
    ``video_init`` and ``text_init`` folders (with their model type and the SHA-256
    of their weights file) and ``init`` (another run, its step and what it gave)."""
    record: dict[str, Any] = {}
    for key in ("video_init", "text_init"):
        folder = config.get(key)
        if not folder:
            continue
        entry: dict[str, Any] = {"folder": folder}
        hf_config = epath.Path(folder) / "config.json"
        if hf_config.exists():
            entry["model_type"] = json.loads(hf_config.read_text()).get("model_type")
        for name in text_lib.CHECKPOINT_FILES:
            weights = epath.Path(folder) / name
            if weights.exists():
                entry["weights_file"] = name
                entry["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
                break
        if key == "video_init":
            entry["include"] = config.video_init_include
        record[key] = entry
    if config.init.workdir:
        record["init"] = {
            "workdir": config.init.workdir,
            "step": None if config.init.step < 0 else int(config.init.step),
            "include": config.init.include,
        }
    return record


def location_tasks(config: ml_collections.ConfigDict) -> dict[str, float]:
    """``config.loss.locca_tasks`` checked: {task: weight} for the tasks with a weight > 0."""
    try:
        used = locations.task_weights(dict(config.loss.locca_tasks))
    except ValueError as e:
        raise ValueError(f"config.loss.locca_tasks: {e}") from e
    if set(used) - {"cap"} and not config.model.location_bins:
        raise ValueError(
            f"config.loss.locca_tasks uses {sorted(set(used) - {'cap'})}, which need "
            "location tokens: set config.model.location_bins (e.g. 64)")
    return used


def caption_tokenizer(config: ml_collections.ConfigDict, spec: str) -> tokenizers.Tokenizer:
    """The caption decoder's tokenizer: `spec`'s, with LocCa's location ids appended when
    ``config.model.location_bins`` is set (``locations.LocationTokenizer``)."""
    tok = tokenizers.get_tokenizer(spec)
    bins = config.model.get("location_bins", 0)  # runs written before it had none
    if bins and not (isinstance(bins, int) and bins >= 2):
        raise ValueError(f"config.model.location_bins={bins!r}: need 0 (none) or an int >= 2")
    return locations.with_locations(tok, bins, config.model.num_frames)


def build_model(
    config: ml_collections.ConfigDict, vocab_size: int, pad_id: int
) -> multitask.MultitaskModel:
    """The multitask model described by ``config.model`` (and ``config.text_init``)."""
    m = config.model
    if len(m.patch_size) != 3:
        raise ValueError(f"config.model.patch_size={m.patch_size}: give (pt, ph, pw)")
    return multitask.make_model(
        vocab_size=vocab_size,
        size=m.size,
        text_hf_config=config.text_init or None,
        num_frames=m.num_frames,
        image_size=m.image_size,
        patch_size=tuple(m.patch_size),
        text_max_len=config.input.text_max_len,
        caption_max_len=config.input.caption_max_len,
        pad_id=pad_id,
        embed_dim=m.embed_dim,
        contrastive_tokens=m.contrastive_tokens,
        mask_type=m.mask_type,
        mask_ratio=m.mask_ratio,
        normalize_mvm_target=m.normalize_mvm_target,
        init_temperature=m.init_temperature,
        init_bias=m.init_bias,
        dropout=m.dropout,
        dtype=m.dtype,
        attention_impl=m.get("attention_impl", "auto"),  # runs written before it had none
        encoder_overrides=dict(m.encoder_overrides),
        text_overrides=dict(m.text_overrides),
        caption_decoder_overrides=dict(m.caption_decoder_overrides),
        mvm_decoder_overrides=dict(m.get("mvm_decoder_overrides") or {}),
    )


def uses_mvm(config: ml_collections.ConfigDict) -> bool:
    """Whether the MVM term is on (a weight of exactly 0 switches masking off)."""
    weight = config.loss.weights.mvm
    return not (isinstance(weight, int | float) and weight == 0)


def uses_teacher(config: ml_collections.ConfigDict) -> bool:
    """Whether distillation from an EMA teacher is on (its weight is not exactly 0)."""
    weight = config.loss.weights.distill
    return not (isinstance(weight, int | float) and weight == 0)


def make_optimizer(
    config: ml_collections.ConfigDict, params, total_steps: int, warmup_steps: int
) -> tuple[optax.GradientTransformation, dict[str, optim.Schedule]]:
    """``config.optim``'s optax chain for `params` and each component's LR schedule."""
    o = config.optim
    schedule = {k: v for k, v in o.schedule.items() if not k.startswith("warmup_")}
    return optim.make_optimizer(
        params,
        total_steps=total_steps,
        lr=o.lr,
        wd=o.wd,
        components={k: dict(v) for k, v in o.components.items()},
        schedule={**schedule, "warmup_steps": warmup_steps},
        optimizer=o.optimizer,
        b2=o.b2,
        grad_clip_norm=o.grad_clip_norm,
        layer_decay=o.get("layer_decay", 1.0),
    )


def create_train_state(
    model, tx: optax.GradientTransformation, example_batch: Mapping[str, Any], *, with_teacher: bool
) -> Callable[[jax.Array], TrainState]:
    """A function rng -> TrainState, to be jitted with the state's out_shardings.

    `example_batch` gives the shapes and dtypes of a batch (arrays or
    ShapeDtypeStructs; one example is enough): the zeros the model is
    initialised on are made inside the function, so no batch is captured.
    """
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in example_batch.items()}

    def init(rng):
        init_rng, state_rng = jax.random.split(rng)
        rngs = {"params": init_rng, "dropout": init_rng, "mask": init_rng, "parallel": init_rng}
        batch = {k: jnp.zeros(shape, dtype) for k, (shape, dtype) in shapes.items()}
        params = model.init(rngs, batch, train=False, mvm=True)["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            # A copy: the state is donated, so no buffer may appear in it twice.
            ema_params=jax.tree.map(jnp.copy, params) if with_teacher else None,
            rng=state_rng,
        )

    return init


def state_shardings(abstract_state, config: ml_collections.ConfigDict, mesh: Mesh):
    """NamedShardings of every leaf of the state, by ``config.sharding_rules``.

    The rules match the full names of the state's arrays: ``params/encoder/...``,
    ``opt_state/...``, ``ema_params/...``, ``step``, ``rng``.
    """
    rules = [tuple(r) for r in config.sharding_rules]
    return sharding.param_shardings(abstract_state, rules, mesh)


def initial_weights(state: TrainState, config, shardings, model) -> TrainState:
    """Applies config.video_init and config.text_init (Hugging Face folders), then
    config.init (another run: what it includes replaces theirs)."""
    params = state.params
    if config.get("video_init"):
        params = dict(params)
        for name, value in _video_init_params(config, model, params).items():
            params[name] = jax.device_put(value, shardings.params[name])
    if config.text_init:
        _, hf_params = text_lib.from_pretrained(config.text_init)
        params = dict(params)
        params["text"] = jax.device_put(hf_params, shardings.params["text"])
    if config.init.workdir:
        params = checkpoint.load_subset(
            config.init.workdir,
            None if config.init.step < 0 else config.init.step,
            params,
            include=config.init.include,
        )
    if params is state.params:
        return state
    ema = jax.tree.map(jnp.copy, params) if state.ema_params is not None else None
    return dataclasses.replace(state, params=params, ema_params=ema)


def _video_init_params(config, model, params) -> dict[str, Any]:
    """params['encoder'] (and ['mvm_decoder']) with config.video_init's weights: the
    encoder's parameters the checkpoint has (the rest, e.g. a MAP head, keep their
    initialisation), position tables interpolated to the model's input."""
    from deepcoro_jax.models import hf_video

    ckpt = hf_video.read(config.video_init)
    imported = hf_video.encoder_params(ckpt, model.encoder, channels=1, only_present=True)
    encoder = traverse_util.flatten_dict(jax.device_get(params["encoder"]))
    encoder.update(traverse_util.flatten_dict(imported))
    out = {"encoder": traverse_util.unflatten_dict(encoder)}
    if config.video_init_include == "encoder+decoder":
        out["mvm_decoder"] = hf_video.decoder_params(ckpt, model.mvm_decoder)
    logging.info(
        "video_init: %s (%s) into %s", config.video_init, ckpt.family, ", ".join(sorted(out))
    )
    return out


# --------------------------------------------------------------------------------- step


def positive_ids_key(config: ml_collections.ConfigDict) -> str:
    """The batch key whose equal rows make contrastive positives (``config.loss.positives``):
    'findings_id' (the input pipeline's ``findings_id`` op) or 'text_ids'."""
    if config.loss.positives not in losses.POSITIVES_KINDS:
        raise ValueError(f"config.loss.positives={config.loss.positives!r}: choose one of "
                         f"{losses.POSITIVES_KINDS}")
    return "findings_id" if config.loss.positives == "same_findings" else "text_ids"


def _contrastive_loss(config, out, batch, mesh) -> jax.Array:
    kind = config.loss.positives
    report_ids = batch[positive_ids_key(config)]
    if config.loss.contrastive == "sigmoid" and config.loss.sharded_contrastive:
        loss, _ = losses.sigmoid_loss_sharded(
            out["video_emb"],
            out["text_emb"],
            out["log_temperature"],
            out["bias"],
            mesh=mesh,
            axis_name=sharding.DATA_AXES,
            same_report_ids=report_ids if kind != "diagonal" else None,
        )
        return loss
    positives = losses.contrastive_positives(kind, report_ids)
    if config.loss.contrastive == "sigmoid":
        loss, _ = losses.sigmoid_loss(
            out["video_emb"], out["text_emb"], out["log_temperature"], out["bias"], positives
        )
        return loss
    if config.loss.contrastive == "softmax":
        loss, _ = losses.softmax_loss(
            out["video_emb"], out["text_emb"], out["log_temperature"], positives
        )
        return loss
    raise ValueError(f"config.loss.contrastive={config.loss.contrastive!r}: 'sigmoid' or 'softmax'")


def masked_tubelet_count(model: multitask.MultitaskModel, batch: Mapping[str, Any]) -> jax.Array:
    """Masked tubelets of the real videos of `batch`: the MVM normaliser (float32 scalar)."""
    video = batch["video"]
    grid = mvm_lib.tubelet_grid(video.shape[-4:], model.encoder.patch_size)
    mask_fn = multitask.MASK_FUNCTIONS[model.mask_type]
    _, masked = jax.eval_shape(lambda: mask_fn(jax.random.key(0), 1, grid, model.mask_ratio))
    per_video = masked.shape[1]
    if video.ndim == 6:  # studies [B, V, T, H, W, C]: only the real videos count
        num_videos = jnp.sum(batch["video_mask"].astype(jnp.float32))
    else:
        num_videos = jnp.float32(video.shape[0])
    return jnp.maximum(num_videos * per_video, 1.0)


def make_train_step(
    model,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    schedules: Mapping[str, Callable],
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """(state, batch) -> (state, metrics): one optimizer update over ``grad_accum_steps``.

    Accumulation splits the batch into k micro-batches (micro-batch i holds
    examples i, i+k, i+2k, ..., so every device works on each) and sums their
    gradients. The caption, MVM and distillation terms are sums over tokens or
    tubelets normalised by the counts of the WHOLE batch, so they equal one
    large step exactly. The contrastive term does not decompose: each video is
    compared only with the reports of its own micro-batch (fewer negatives),
    and the mean over micro-batches is used; with k=1 every term is exact.
    Each micro-batch i draws its dropout and MVM masks from
    ``fold_in(fold_in(state.rng, state.step), i)``.

    With ``loss.contrastive_accumulation='cached'`` (and k > 1) the contrastive
    term is exact too, GradCache-style: a first pass computes every
    micro-batch's embeddings (forward only, nothing kept but the embeddings),
    the whole batch's contrastive loss and its gradient with respect to them;
    each micro-batch's backward pass then carries those embedding gradients
    along with its other terms. It costs one more forward pass of the model.

    The EMA teacher (when the distill weight is not 0) sees the same rngs as
    the student and is updated once per step, after the parameters.
    """
    k = config.grad_accum_steps
    accumulation = config.loss.contrastive_accumulation
    if accumulation not in CONTRASTIVE_ACCUMULATION:
        raise ValueError(f"config.loss.contrastive_accumulation={accumulation!r}: choose one "
                         f"of {CONTRASTIVE_ACCUMULATION}")
    cached = k > 1 and accumulation == "cached"
    positives_key = positive_ids_key(config)
    with_mvm, with_teacher = uses_mvm(config), uses_teacher(config)
    weights = config.loss.weights
    label_smoothing = config.loss.label_smoothing
    distill_temperature = config.loss.distill_temperature if with_teacher else None
    ema_decay = config.loss.ema_decay if with_teacher else None
    micro_sharding = NamedSharding(mesh, P(None, sharding.DATA_AXES))
    # The teacher's caption logits depend on the MVM mask only when the caption
    # decoder reads the visible tokens.
    teacher_mvm = with_mvm and model.contrastive_tokens == "masked"

    def forward(params, batch, rng):
        rngs = dict(zip(("dropout", "mask", "parallel"), jax.random.split(rng, 3), strict=True))
        out, _ = model.apply({"params": params}, batch, train=True, mvm=with_mvm, rngs=rngs)
        return out, rngs

    def loss_fn(params, teacher_params, batch, rng, counts, step, cache=None):
        out, rngs = forward(params, batch, rng)
        _, caption_aux = losses.caption_loss(
            out["caption_logits"], batch["caption_out"], batch["caption_mask"], label_smoothing
        )
        if cache is None:
            contrastive = _contrastive_loss(config, out, batch, mesh) / k
        else:  # the whole batch's value; the gradient through this micro-batch's embeddings
            (value, d_temperature, d_bias), d_video, d_text = cache
            surrogate = (
                jnp.sum(d_video * out["video_emb"])
                + jnp.sum(d_text * out["text_emb"])
                + (d_temperature * out["log_temperature"] + d_bias * out["bias"]) / k
            )
            contrastive = jax.lax.stop_gradient(value / k - surrogate) + surrogate
        terms = {
            "contrastive": contrastive,
            "caption": caption_aux["loss_sum"] / counts["caption"],
        }
        if with_mvm:
            _, mvm_aux = losses.mvm_loss(out["mvm_pred"], out["mvm_target"], out["mvm_mask"])
            terms["mvm"] = mvm_aux["loss_sum"] / counts["mvm"]
        if with_teacher:
            teacher_out, _ = model.apply(
                {"params": teacher_params}, batch, train=True, mvm=teacher_mvm, rngs=rngs
            )
            _, distill_aux = losses.distillation_loss(
                out["caption_logits"],
                teacher_out["caption_logits"],
                distill_temperature,
                mask=batch["caption_mask"],
            )
            kl_sum = distill_aux["kl"] * distill_aux["num_examples"]
            terms["distill"] = distill_temperature**2 * kl_sum / counts["caption"]
        weighted = {n: optim.loss_weight(weights[n], step) * v for n, v in terms.items()}
        return sum(weighted.values()), (terms, weighted, _task_sums(batch, caption_aux))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    term_names = loss_term_names(config)

    def full_contrastive(video_emb, text_emb, log_temperature, bias, ids):
        out = {"video_emb": video_emb, "text_emb": text_emb,
               "log_temperature": log_temperature, "bias": bias}
        return _contrastive_loss(config, out, {positives_key: ids}, mesh)

    contrastive_grad = jax.value_and_grad(full_contrastive, argnums=(0, 1, 2, 3))

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        rng = jax.random.fold_in(state.rng, state.step)
        counts = {"caption": jnp.maximum(jnp.sum(batch["caption_mask"]), 1).astype(jnp.float32)}
        if with_mvm:
            counts["mvm"] = masked_tubelet_count(model, batch)

        def contrastive_cache(params, micro_batches, indices):
            """The whole batch's contrastive loss with its gradients with respect to the
            temperature and the bias, and per micro-batch those with respect to its
            video and text embeddings ([k, B/k, E] each), from a forward pass over every
            micro-batch with the rngs its backward pass will use."""

            def embed(inputs):
                micro_batch, index = inputs
                out, _ = forward(params, micro_batch, jax.random.fold_in(rng, index))
                return out["video_emb"], out["text_emb"]

            video_emb, text_emb = jax.lax.map(embed, (micro_batches, indices))  # [k, B/k, E]
            ids = micro_batches[positives_key]  # [k, B/k]
            value, (d_video, d_text, d_temperature, d_bias) = contrastive_grad(
                video_emb.reshape(-1, video_emb.shape[-1]),
                text_emb.reshape(-1, text_emb.shape[-1]),
                params["log_temperature"],
                params["bias"],
                ids.reshape(-1, *ids.shape[2:]),
            )
            per_micro = (d_video.reshape(video_emb.shape), d_text.reshape(text_emb.shape))
            return (value, d_temperature, d_bias), per_micro

        def micro_grads(micro_batch, index, cache=None):
            (_, (terms, weighted, task_sums)), grads = grad_fn(
                state.params,
                state.ema_params,
                micro_batch,
                jax.random.fold_in(rng, index),
                counts,
                state.step,
                cache,
            )
            return grads, terms, weighted, task_sums

        if k == 1:
            # No loop around a single micro-batch: XLA optimises a loop body less (on
            # CPU the convolutions' gradients stay in slow layouts there; measured in
            # docs/training.md).
            grads, terms, weighted, task_sums = micro_grads(batch, 0)
        else:

            def split(x):
                micro = x.reshape(x.shape[0] // k, k, *x.shape[1:])  # [B/k, k, ...]
                return jnp.swapaxes(micro, 0, 1)  # [k, B/k, ...]: micro-batch i = examples i::k

            micro_batches = jax.lax.with_sharding_constraint(
                jax.tree.map(split, batch), micro_sharding
            )

            indices = jnp.arange(k)
            whole_batch, embedding_grads = None, None
            if cached:
                whole_batch, embedding_grads = contrastive_cache(
                    state.params, micro_batches, indices
                )

            def accumulate(carry, inputs):
                micro_batch, index, grads_i = inputs
                cache = None if grads_i is None else (whole_batch, *grads_i)
                return jax.tree.map(jnp.add, carry, micro_grads(micro_batch, index, cache)), None

            zero_terms = {n: jnp.zeros((), jnp.float32) for n in term_names}
            zero_sums = {n: jnp.zeros((), jnp.float32) for n in _task_sum_names(batch)}
            init = (jax.tree.map(jnp.zeros_like, state.params), zero_terms, dict(zero_terms),
                    zero_sums)
            (grads, terms, weighted, task_sums), _ = jax.lax.scan(
                accumulate, init, (micro_batches, indices, embedding_grads)
            )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = state.ema_params
        if with_teacher:
            ema_params = jax.tree.map(
                lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema_params, params
            )
        metrics = {
            "loss": sum(weighted.values()),
            **{f"loss/{n}": v for n, v in terms.items()},
            **{f"loss_weighted/{n}": v for n, v in weighted.items()},
            "l2_grads": optax.global_norm(grads),
            "l2_params": optax.global_norm(params),
            "l2_updates": optax.global_norm(updates),
            "temperature": jnp.exp(params["log_temperature"]),
            "bias": params["bias"],
            **{f"lr/{n}": fn(state.step) for n, fn in schedules.items()},
            **_task_metrics(task_sums),
        }
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params
        )
        return new_state, metrics

    return train_step


def _task_sum_names(batch: Mapping[str, Any]) -> list[str]:
    """The per-task caption sums a batch drawn with LocCa's tasks gives (none without)."""
    if "locca_task" not in batch:
        return []
    return [f"{task}/{kind}" for task in locations.TASKS for kind in ("loss_sum", "tokens")]


def _task_sums(batch: Mapping[str, jax.Array], caption_aux: Mapping[str, jax.Array]):
    """Per LocCa task: the caption loss summed over its examples' target tokens, and their
    number (empty for a batch without 'locca_task')."""
    sums = {}
    if "locca_task" in batch:
        for index, task in enumerate(locations.TASKS):
            chosen = batch["locca_task"] == index  # [B]
            for kind, per_example in (("loss_sum", caption_aux["example_loss_sum"]),
                                      ("tokens", caption_aux["example_tokens"])):
                sums[f"{task}/{kind}"] = jnp.sum(jnp.where(chosen, per_example, 0.0))
    return sums


def _task_metrics(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """``caption_task/<task>``: the caption loss (as the caption term: label-smoothed) per
    target token of that task's examples, NaN when the batch drew none; and
    ``caption_task/<task>_tokens``, how many target tokens that was."""
    metrics = {}
    for task in locations.TASKS:
        if f"{task}/tokens" in sums:
            tokens = sums[f"{task}/tokens"]
            metrics[f"caption_task/{task}"] = jnp.where(
                tokens > 0, sums[f"{task}/loss_sum"] / jnp.maximum(tokens, 1.0), jnp.nan)
            metrics[f"caption_task/{task}_tokens"] = tokens
    return metrics


def loss_term_names(config: ml_collections.ConfigDict) -> list[str]:
    """The loss terms a run with `config` computes, in LOSS_TERMS order."""
    on = {"contrastive": True, "caption": True, "mvm": uses_mvm(config)}
    on["distill"] = uses_teacher(config)
    return [name for name in LOSS_TERMS if on[name]]


def check_finite(metrics: Mapping[str, Any], step: int) -> None:
    """Raises NonFiniteError naming every loss term (or the gradient) that is not finite."""
    bad = [
        name
        for name in sorted(metrics)
        if (name == "loss" or name.startswith("loss/") or name == "l2_grads")
        and not np.isfinite(metrics[name])
    ]
    if bad:
        terms = ", ".join(
            f"the gradient (l2_grads = {metrics[n]})" if n == "l2_grads" else f"{n} = {metrics[n]}"
            for n in bad
        )
        raise NonFiniteError(
            f"non-finite training at step {step}: {terms}; stopped before any checkpoint "
            "of this state was written"
        )


def peak_flops(device: jax.Device) -> float | None:
    """The nominal dense bf16 peak of `device` (FLOP/s), or None when unknown (e.g. CPU)."""
    return PEAK_FLOPS.get(getattr(device, "device_kind", ""))


# ---------------------------------------------------------------------------- evaluation

def predict_fns(model: multitask.MultitaskModel, mesh: Mesh) -> dict[str, Callable]:
    """The predict functions a run hands its evaluators, by name (docs/metrics.md).

    Each is ``fn(params, batch, **options) -> {name: [B, ...]}``, jitted, its
    outputs split over the batch axes of `mesh` like the batch: an evaluator
    composes several inside one jitted function (``evaluators.common.make_predict``)
    without gathering in between, and a video is encoded once for all of them.

    - ``encode_video``: 'video' [B, T, H, W, C] (or studies [B, V, ...] with
      'video_mask' [B, V]) -> 'video_emb' [B, E] (normalised), 'video_tokens'
      [B, L, D] and 'video_token_mask' [B, L] (the caption decoder's memory);
    - ``encode_text``: 'text_ids', 'text_mask' [B, Lt] -> 'text_emb' [B, E] (normalised);
    - ``caption_logits``: the memory ('video_tokens', 'video_token_mask') and
      'caption_in' [B, Lc] -> teacher-forced 'caption_logits' [B, Lc, vocab];
    - ``generate``: the memory -> 'tokens' [B, max_len] (EOS, then pad_id), decoded
      on the KV cache (``decode.py``); options (static): bos_id, eos_id, pad_id,
      max_len, strategy ('greedy' or 'beam'), beam_size, length_penalty;
    - ``ground``: the memory and 'ground_prefix' [B, M, P] with 'ground_prefix_len'
      [B, M] (M prompts per video, e.g. a referring expression each) -> 'ground_tokens'
      [B, M, G]: greedy decoding after each prompt, generated token g restricted to
      the ids where ``step_masks`` [G, vocab] is True (``decode.prefixed_greedy``;
      LocCa's location tasks); options (static): bos_id, eos_id, pad_id;
    - ``reconstruct``: 'video' [B, T, H, W, C] and 'mask_rng' [B] (a key per
      video, its MVM mask) -> 'mvm_pred', 'mvm_target' [B, M, P] and
      'mvm_masked_indices' [B, M], as in training, without dropout.
    """

    def encode_video(params, batch):
        video_emb, aux = model.apply(
            {"params": params}, batch["video"], batch.get("video_mask"), method="encode_video"
        )
        return {
            "video_emb": video_emb,
            "video_tokens": aux["video_tokens"],
            "video_token_mask": aux["video_token_mask"],
        }

    def encode_text(params, batch):
        text_emb, _ = model.apply(
            {"params": params}, batch["text_ids"], batch["text_mask"], method="encode_text"
        )
        return {"text_emb": text_emb}

    def caption_logits(params, batch):
        logits = model.apply(
            {"params": params},
            batch["video_tokens"],
            batch["video_token_mask"],
            batch["caption_in"],
            method="caption_logits",
        )
        return {"caption_logits": logits}

    def generate(
        params,
        batch,
        *,
        bos_id: int,
        eos_id: int,
        pad_id: int,
        max_len: int,
        strategy: str = "greedy",
        beam_size: int = 4,
        length_penalty: float = 0.6,
    ):
        beam = dict(beam_size=beam_size, length_penalty=length_penalty)
        out = multitask.decode_memory(
            model,
            params,
            batch["video_tokens"],
            batch["video_token_mask"],
            bos_id=bos_id,
            eos_id=eos_id,
            pad_id=pad_id,
            max_len=max_len,
            strategy=strategy,
            **(beam if strategy == "beam" else {}),
        )
        return {"tokens": out.tokens}

    def ground(params, batch, step_masks, *, bos_id: int, eos_id: int, pad_id: int):
        prefix = batch["ground_prefix"]  # [B, M, P]
        batch_size, prompts, width = prefix.shape

        def per_prompt(x):  # [B, ...] -> [B * M, ...]: each video once per prompt
            return jnp.repeat(x, prompts, axis=0)

        out = decode.prefixed_greedy(
            model.caption_decoder,
            params["caption_decoder"],
            per_prompt(batch["video_tokens"]),
            per_prompt(batch["video_token_mask"]),
            prefix.reshape(batch_size * prompts, width),
            batch["ground_prefix_len"].reshape(batch_size * prompts),
            step_masks,
            bos_id=bos_id,
            eos_id=eos_id,
            pad_id=pad_id,
        )
        return {"ground_tokens": out.tokens.reshape(batch_size, prompts, -1)}

    def reconstruct(params, batch):
        def one(video, mask_rng):  # [T, H, W, C], its own mask
            out, aux = model.apply(
                {"params": params}, video[None], method="reconstruct", rngs={"mask": mask_rng}
            )
            return out["mvm_pred"][0], out["mvm_target"][0], aux["mvm_masked_indices"][0]

        pred, target, masked = jax.vmap(one)(batch["video"], batch["mask_rng"])
        return {"mvm_pred": pred, "mvm_target": target, "mvm_masked_indices": masked}

    split = sharding.batch_sharding(mesh)
    decode_options = (
        "bos_id", "eos_id", "pad_id", "max_len", "strategy", "beam_size", "length_penalty"
    )
    return {
        "encode_video": jax.jit(encode_video, out_shardings=split),
        "encode_text": jax.jit(encode_text, out_shardings=split),
        "caption_logits": jax.jit(caption_logits, out_shardings=split),
        "generate": jax.jit(generate, out_shardings=split, static_argnames=decode_options),
        "ground": jax.jit(
            ground, out_shardings=split, static_argnames=("bos_id", "eos_id", "pad_id")
        ),
        "reconstruct": jax.jit(reconstruct, out_shardings=split),
    }


def eval_spec(
    config: ml_collections.ConfigDict,
    model: multitask.MultitaskModel,
    mesh: Mesh,
    *,
    data_dir: str,
    workdir: str,
    text_tokenizer_spec: str,
    caption_tokenizer_spec: str,
) -> eval_common.EvalSpec:
    """What the evaluators get of this run besides `predict_fns`: where its data is and
    how to read it (``config.input``'s eval pp, tokenizers and lengths), the shapes of
    the model they need, the mesh, and the workdir for their artefacts."""
    size = config.model.image_size
    return eval_common.EvalSpec(
        data_dir=data_dir,
        workdir=workdir,
        mesh=mesh,
        batch_axes=sharding.DATA_AXES,
        video_pp=config.input.eval_video_pp,
        clip_shape=(config.model.num_frames, *((size, size) if isinstance(size, int) else size)),
        text_tokenizer_spec=text_tokenizer_spec,
        caption_tokenizer_spec=caption_tokenizer_spec,
        text_max_len=config.input.text_max_len,
        caption_max_len=config.input.caption_max_len,
        max_decode_len=model.caption_decoder.max_len,
        patch_size=tuple(model.encoder.patch_size),
        normalize_mvm_target=model.normalize_mvm_target,
        location_bins=config.model.get("location_bins", 0),
    )
