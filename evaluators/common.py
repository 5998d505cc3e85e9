"""What every evaluator plugin shares: the base class, the registry, the eval input, prediction.

An evaluator is a class registered by type, in a module of this package::

    @common.register("retrieval")
    class Evaluator(common.Evaluator):
        PREDICT = ("encode_video", "encode_text")  # the predict functions it uses

        def __init__(self, predict_fns, spec, *, level="video", **base):
            super().__init__(predict_fns, spec, **base)  # name, split, batch_size, log_steps...
            ...

        def run(self, params, step) -> dict[str, float]: ...  # artefacts under spec.workdir

It gets the run's predict functions (``self.predict_fns``, only those it names in
``PREDICT``) and an ``EvalSpec`` (the data, the eval preprocessing, the tokenizers,
the mesh, where to write), never the model or the config: what it computes of the
model goes through the predict functions. A predict function is
``fn(params, batch, **options) -> {name: [B, ...]}``; ``deepcoro_jax/training/run.py``
(``predict_fns``) builds them, and ``docs/metrics.md`` lists them.

The trainer builds one evaluator per entry of ``config.evals``
(``build_evaluators``): ``{name: dict(type=..., log_steps=..., split=...,
at_start=False, **options)}``; ``type`` picks the registered class, the rest
are its constructor's keyword arguments. Every module of this package is
imported first, so a new evaluator is one file here and its ``register``. The
trainer logs the results as ``<name>/<metric>``. A constructor raises
``DataLacks`` when the prepared data lacks what the evaluator needs (a split, a
label column); ``build_evaluators`` then leaves that evaluator out with one
warning, so the recipe runs on any prepared data. Every other error in an
evaluator's options still stops the run.

Every evaluator covers each example of its split exactly once on any number of
devices and processes: ``predict_split`` runs a jitted function
(``make_predict``) over ``pipeline.make_eval_dataset`` batches (each process
reads its part; padding examples carry ``_mask`` False), gathers the
per-example outputs on every process, drops the padding and orders the rest by
manifest row. So results do not depend on the batch size, the device count or
the process count (up to floating-point reassociation inside the model).
Host-side facts about the examples (report text, study id, labels) come from
``split_table``, read once per split without frames, and are joined on the row.

Not here: the metric functions (``retrieval.py``, ``text_metrics.py``,
``captioning.py``'s clinical metrics), the predict functions and the spec's
values (``deepcoro_jax/training/run.py``), the schedule's loop
(``deepcoro_jax/training/train.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import evaluators
from deepcoro_jax.domain import locations, tokenizers

ROW_KEY = "row"  # the manifest row: unique per video within a prepared dataset
# Label columns that say what anatomy a view shows, where prepare carried them: the
# retrieval oracles and the probes' within-anatomy AUROC group examples by them.
ANATOMY_COLUMNS = ("system", "landmark", "magnification")
MASK_KEY = "_mask"  # real example (True) or padding (False); see pipeline.make_eval_dataset

PredictFn = Callable[..., dict[str, jax.Array]]  # fn(params, batch, **options) -> {name: [B, ...]}


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """What an evaluator gets of a run besides its predict functions: no model, no config."""

    data_dir: str  # the prepared dataset
    workdir: str  # artefacts go under it (process 0 writes them)
    mesh: Mesh  # the predict functions' devices
    batch_axes: tuple[str, ...]  # the mesh axes a batch is split over
    video_pp: str  # config.input.eval_video_pp: deterministic clips
    clip_shape: tuple[int, int, int]  # (frames, height, width) the model takes
    text_tokenizer_spec: str
    caption_tokenizer_spec: str
    text_max_len: int  # config.input.text_max_len
    caption_max_len: int  # config.input.caption_max_len: the reference captions' length
    max_decode_len: int  # the caption decoder's position table: its longest report
    patch_size: tuple[int, int, int]  # the encoder's tubelet (pt, ph, pw)
    normalize_mvm_target: bool  # MVM targets are normalised per tubelet
    location_bins: int = 0  # config.model.location_bins: LocCa's location ids, 0 = none

    @property
    def text_tokenizer(self) -> tokenizers.Tokenizer:
        return tokenizers.get_tokenizer(self.text_tokenizer_spec)

    @property
    def caption_tokenizer(self) -> tokenizers.Tokenizer:
        """The caption decoder's: with the location ids when the model has them."""
        tok = tokenizers.get_tokenizer(self.caption_tokenizer_spec)
        return locations.with_locations(tok, self.location_bins, self.clip_shape[0])

    @property
    def is_main_process(self) -> bool:
        return jax.process_index() == 0

    def pp(self, *, text: bool = False, caption: bool = False, keys: Sequence[str] = ()) -> str:
        """The eval pp: deterministic clips (``video_pp``), optionally the text-encoder
        ids and the caption targets, keeping video, row and `keys`."""
        parts = [self.video_pp]
        kept = ["video", ROW_KEY, *keys]
        if text:
            parts.append(
                f"tokenize({self.text_max_len}, tokenizer='{self.text_tokenizer_spec}')"
            )
            kept += ["text_ids", "text_mask"]
        if caption:
            spec = self.caption_tokenizer_spec
            parts.append(f"tokenize_caption({self.caption_max_len}, tokenizer='{spec}')")
            kept += ["caption_in", "caption_out", "caption_mask"]
        parts.append("keep(" + ", ".join(repr(k) for k in kept) + ")")
        return "|".join(parts)


class DataLacks(ValueError):
    """The prepared data lacks what an evaluator needs; the message says what."""


class Evaluator:
    """The base of every evaluator: the options every one takes, checked.

    name: its key in ``config.evals`` (errors name ``config.evals.<name>``, results
    are logged as ``<name>/<metric>``); split: the split it evaluates; batch_size:
    global, a multiple of the device count; log_steps, at_start: when the trainer
    runs it (``due``). Subclasses list the predict functions they use in
    ``PREDICT`` and get those in ``self.predict_fns``; ``HEADLINE`` names the
    metrics the trainer prints.
    """

    PREDICT: tuple[str, ...] = ()
    HEADLINE: tuple[str, ...] = ()

    def __init__(
        self,
        predict_fns: Mapping[str, PredictFn],
        spec: EvalSpec,
        *,
        name: str,
        split: str = "val",
        batch_size: int = 32,
        log_steps: int = 1,
        at_start: bool = False,
    ):
        self.where = f"config.evals.{name}"
        if "/" in name:
            raise ValueError(f"{self.where}: an evaluator name may not contain '/'")
        if int(log_steps) < 1:
            raise ValueError(f"{self.where}.log_steps={log_steps} must be at least 1")
        if batch_size < 1 or batch_size % spec.mesh.size:
            raise ValueError(
                f"{self.where}.batch_size={batch_size} must be a positive multiple of the device "
                f"count ({spec.mesh.size})"
            )
        missing = [fn for fn in self.PREDICT if fn not in predict_fns]
        if missing:
            raise ValueError(
                f"{self.where}: needs the predict functions {missing}; the run has "
                f"{sorted(predict_fns)}"
            )
        self.predict_fns = {fn: predict_fns[fn] for fn in self.PREDICT}
        self.spec, self.name, self.split, self.batch_size = spec, name, split, batch_size
        self.log_steps, self.at_start = int(log_steps), bool(at_start)

    def run(self, params: Any, step: int) -> dict[str, float]:
        """The metrics of `params` at training step `step` (which names its artefacts)."""
        raise NotImplementedError

    def due(self, step: int, total_steps: int) -> bool:
        """Every `log_steps` steps and at the last step."""
        return step % self.log_steps == 0 or step == total_steps


_REGISTRY: dict[str, type[Evaluator]] = {}


def register(type_name: str) -> Callable[[type[Evaluator]], type[Evaluator]]:
    """Class decorator: ``config.evals[name].type == type_name`` builds this class."""

    def decorate(cls: type[Evaluator]) -> type[Evaluator]:
        if not (isinstance(cls, type) and issubclass(cls, Evaluator)):
            raise TypeError(f"register({type_name!r}): {cls!r} is not a common.Evaluator")
        known = _REGISTRY.get(type_name)
        if known is not None and _qualified(known) != _qualified(cls):  # a reload is no clash
            raise ValueError(
                f"register({type_name!r}): already registered by {_qualified(known)}, "
                f"not also by {_qualified(cls)}"
            )
        _REGISTRY[type_name] = cls
        return cls

    return decorate


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def registered() -> dict[str, type[Evaluator]]:
    """Every registered evaluator type, after importing every module of this package."""
    for module in pkgutil.iter_modules(evaluators.__path__, f"{evaluators.__name__}."):
        importlib.import_module(module.name)
    return dict(sorted(_REGISTRY.items()))


def evaluator_class(type_name: str, where: str) -> type[Evaluator]:
    """The class registered as `type_name`; `where` names the config key."""
    types = registered()
    if type_name not in types:
        raise ValueError(f"{where}.type={type_name!r}: choose one of {list(types)}")
    return types[type_name]


def build_evaluators(
    evals: Mapping[str, Mapping[str, Any]],
    predict_fns: Mapping[str, PredictFn],
    spec: EvalSpec,
) -> list[Evaluator]:
    """The evaluators of ``config.evals``, each with a clear error naming its config key.

    An evaluator whose constructor raises `DataLacks` is left out, with one
    warning naming its config key and what the data lacks.
    """
    built = []
    for name, options in evals.items():
        where = f"config.evals.{name}"
        options = dict(options)
        for key in ("type", "log_steps"):
            if key not in options:
                raise ValueError(f"{where} needs {key!r} (it has {sorted(options)})")
        cls = evaluator_class(options.pop("type"), where)
        try:
            built.append(cls(predict_fns, spec, name=name, **options))
        except DataLacks as e:
            logging.warning("%s left out: %s", where, e)
        except TypeError as e:
            raise ValueError(f"{where}: {e}") from e
    return built


def require_split(spec: EvalSpec, split: str) -> None:
    """Raises `DataLacks` unless the prepared dataset holds `split`."""
    from input_pipeline import dataset_format  # TensorFlow

    names = dataset_format.split_names(spec.data_dir)
    if split not in names:
        raise DataLacks(f"{spec.data_dir} has no split {split!r} (it has {names})")


def jit_replicated(fn: Callable, mesh: Mesh) -> Callable:
    """``jax.jit(fn)`` whose outputs come back whole on every device (and process)."""
    return jax.jit(fn, out_shardings=NamedSharding(mesh, P()))


def make_predict(fn: Callable[[Any, dict], dict], mesh: Mesh) -> Callable:
    """Jits ``fn(params, batch) -> {name: [B, ...]}`` for ``predict_split``.

    `fn` composes predict functions (called inside, they run data-parallel like
    the batch). The outputs (and the batch's row and mask) come back replicated
    on every device, so every process holds the whole batch's predictions.
    """

    def predict(params, batch):
        return {**fn(params, batch), ROW_KEY: batch[ROW_KEY], MASK_KEY: batch[MASK_KEY]}

    return jit_replicated(predict, mesh)


def video_embedder(predict_fns: Mapping[str, PredictFn], spec: EvalSpec) -> Callable:
    """``make_predict`` of ``encode_video``'s normalised embedding: {'video_emb': [B, E]},
    of videos or (with 'video_mask' in the batch) of studies."""
    encode_video = predict_fns["encode_video"]

    def embed_videos(params, batch):
        videos = {k: batch[k] for k in ("video", "video_mask") if k in batch}  # study: + mask
        return {"video_emb": encode_video(params, videos)["video_emb"]}

    return make_predict(embed_videos, spec.mesh)


def predict_split(
    spec: EvalSpec,
    predict: Callable,
    params: Any,
    *,
    split: str,
    pp: str,
    batch_size: int,
    study_videos: int | None = None,
) -> dict[str, np.ndarray]:
    """``predict`` (from ``make_predict``) over every example of `split`, once.

    Returns the outputs of the real examples, ordered by manifest row, with
    'row' among them. `batch_size` is global (over every process). With
    `study_videos` the examples are whole studies (``make_study_eval_dataset``:
    'video' [V, ...] and 'video_mask' [V], the first V videos of each), and 'row'
    is the row of each study's first video.
    """
    from input_pipeline import pipeline  # TensorFlow

    process_count = jax.process_count()
    local_batch_size = batch_size // process_count
    where = dict(process_index=jax.process_index(), process_count=process_count)
    if study_videos is None:
        dataset = pipeline.make_eval_dataset(spec.data_dir, split, pp, local_batch_size, **where)
    else:
        dataset = pipeline.make_study_eval_dataset(
            spec.data_dir, split, pp, local_batch_size, study_videos=study_videos, **where
        )
    pipeline.check_clip_shape(
        tuple(dataset.element_spec["video"].shape), spec.clip_shape, "eval_video_pp"
    )
    chunks: list[dict[str, np.ndarray]] = []
    for local_batch in dataset.as_numpy_iterator():
        batch = pipeline.global_batch(local_batch, spec.mesh, spec.batch_axes)
        out = jax.device_get(predict(params, batch))
        keep = np.asarray(out.pop(MASK_KEY), bool)
        chunks.append({k: np.asarray(v)[keep] for k, v in out.items()})
    if not chunks:
        raise ValueError(f"split {split!r} of {spec.data_dir} holds no examples")
    merged = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    order = np.argsort(merged[ROW_KEY], kind="stable")
    merged = {k: v[order] for k, v in merged.items()}
    rows = merged[ROW_KEY]
    if np.any(rows[1:] == rows[:-1]):
        raise RuntimeError(f"split {split!r}: an example was evaluated twice (duplicate rows)")
    return merged


@functools.lru_cache(maxsize=8)
def split_table(data_dir: str, split: str) -> dict[str, np.ndarray]:
    """Per-example facts of a split, without frames, ordered by manifest row.

    Keys: row, report, study_id, path (str arrays), study_index, video_in_study,
    and ``label/<column>`` for every label column prepare carried (float, NaN
    when missing; or str).
    """
    from input_pipeline import dataset_format  # TensorFlow

    dataset = dataset_format.read_split(data_dir, split)
    columns: dict[str, list] = {}
    for example in dataset.as_numpy_iterator():
        flat = {k: v for k, v in example.items() if k not in ("frames", "labels", "lesions")}
        flat.update({f"label/{k}": v for k, v in example.get("labels", {}).items()})
        for key, value in flat.items():
            if isinstance(value, bytes):
                value = value.decode("utf-8")
            columns.setdefault(key, []).append(value)
    if not columns:
        raise ValueError(f"split {split!r} of {data_dir} holds no examples")
    table = {k: np.asarray(v) for k, v in columns.items()}
    order = np.argsort(table[ROW_KEY], kind="stable")
    return {k: v[order] for k, v in table.items()}


def anatomy_keys(facts: Mapping[str, np.ndarray], columns: Sequence[str]) -> list[tuple]:
    """Each example's values of the label `columns` (``split_table`` facts), as a tuple."""
    values = [facts[f"label/{column}"] for column in columns]
    return [tuple(str(v[i]) for v in values) for i in range(len(facts[ROW_KEY]))]


def join_rows(table: Mapping[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """The entries of `table` (from ``split_table``) for `rows`, in that order."""
    index = np.searchsorted(table[ROW_KEY], rows)
    index = np.minimum(index, len(table[ROW_KEY]) - 1)
    if not np.array_equal(table[ROW_KEY][index], rows):
        raise ValueError("join_rows: some rows are not in the split table")
    return {k: v[index] for k, v in table.items()}


def global_array(x: np.ndarray, spec: EvalSpec) -> jax.Array:
    """A host array that every process holds whole, as a global array split on the batch axis."""
    batch_sharding = NamedSharding(spec.mesh, P(spec.batch_axes))
    return jax.make_array_from_callback(x.shape, batch_sharding, lambda index: x[index])


def encode_texts(
    spec: EvalSpec, encode: Callable, params: Any, texts: Sequence[str], batch_size: int
) -> np.ndarray:
    """Text embeddings [N, E] of `texts` (the same ids as the pipeline's ``tokenize``).

    `encode` is the ``encode_text`` predict function jitted with replicated
    outputs (``jit_replicated``); the last batch is padded and the padding dropped.
    """
    tok = spec.text_tokenizer
    max_len = spec.text_max_len
    embeddings = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        encoded = [tokenizers.encode_padded(tok, text, max_len) for text in chunk]
        ids = np.full([batch_size, max_len], tok.pad_id, np.int32)
        mask = np.zeros([batch_size, max_len], bool)
        for i, (row_ids, length) in enumerate(encoded):
            ids[i], mask[i, :length] = row_ids, True
        batch = {"text_ids": global_array(ids, spec), "text_mask": global_array(mask, spec)}
        emb = encode(params, batch)["text_emb"]
        embeddings.append(np.asarray(jax.device_get(emb))[: len(chunk)])
    return np.concatenate(embeddings)
