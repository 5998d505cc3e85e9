"""What every evaluator plugin shares: the run context, the eval input, prediction over a split.

An evaluator is the class ``Evaluator`` of the module ``evaluators.<type>``::

    evaluator = Evaluator(ctx, name="val_retrieval", split="val", **options)
    metrics = evaluator.run(params, step)  # {metric: float}; artefacts under ctx.workdir

The trainer builds one per entry of ``config.evals`` (``build_evaluators``):
``{name: dict(type=..., log_steps=..., split=..., at_start=False, **options)}``;
``type``, ``log_steps`` and ``at_start`` are the trainer's, the rest go to the
constructor. It logs the results as ``<name>/<metric>``. A constructor raises
``DataLacks`` when the prepared data lacks what the evaluator needs (a split, a
label column); ``build_evaluators`` then leaves that evaluator out with one
warning, so the recipe runs on any prepared data. Every other error in an
evaluator's options still stops the run.

Every evaluator covers each example of its split exactly once on any number of
devices and processes: ``predict_split`` runs a jitted function over
``pipeline.make_eval_dataset`` batches (each process reads its part; padding
examples carry ``_mask`` False), gathers the per-example outputs on every
process, drops the padding and orders the rest by manifest row. So results do
not depend on the batch size, the device count or the process count (up to
floating-point reassociation inside the model). Host-side facts about the
examples (report text, study id, labels) come from ``split_table``, read once
per split without frames, and are joined on the row.

Not here: the metric functions (``retrieval.py``, ``text_metrics.py``,
``captioning.py``'s clinical metrics), the schedule (``deepcoro_jax/training/train.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from deepcoro_jax.domain import tokenizers
from deepcoro_jax.models import multitask
from deepcoro_jax.training import sharding

ROW_KEY = "row"  # the manifest row: unique per video within a prepared dataset
MASK_KEY = "_mask"  # real example (True) or padding (False); see pipeline.make_eval_dataset
TRAINER_KEYS = ("type", "log_steps", "at_start")
TYPES = ("retrieval", "captioning", "mvm", "linear_probe")


@dataclasses.dataclass
class EvalContext:
    """What an evaluator needs of the run: the model, the mesh, the data, where to write."""

    model: multitask.MultitaskModel
    config: ml_collections.ConfigDict  # the run's config (input.*, model.*)
    mesh: Mesh
    data_dir: str  # the prepared dataset
    workdir: str  # artefacts go under it (process 0 writes them)
    text_tokenizer_spec: str
    caption_tokenizer_spec: str

    @property
    def text_tokenizer(self) -> tokenizers.Tokenizer:
        return tokenizers.get_tokenizer(self.text_tokenizer_spec)

    @property
    def caption_tokenizer(self) -> tokenizers.Tokenizer:
        return tokenizers.get_tokenizer(self.caption_tokenizer_spec)

    @property
    def is_main_process(self) -> bool:
        return jax.process_index() == 0

    def pp(self, *, text: bool = False, caption: bool = False, keys: Sequence[str] = ()) -> str:
        """The eval pp: deterministic clips (``input.eval_video_pp``), optionally the
        text-encoder ids and the caption targets, keeping video, row and `keys`."""
        cfg = self.config.input
        parts = [cfg.eval_video_pp]
        kept = ["video", ROW_KEY, *keys]
        if text:
            parts.append(f"tokenize({cfg.text_max_len}, tokenizer='{self.text_tokenizer_spec}')")
            kept += ["text_ids", "text_mask"]
        if caption:
            spec = self.caption_tokenizer_spec
            parts.append(f"tokenize_caption({cfg.caption_max_len}, tokenizer='{spec}')")
            kept += ["caption_in", "caption_out", "caption_mask"]
        parts.append("keep(" + ", ".join(repr(k) for k in kept) + ")")
        return "|".join(parts)


class DataLacks(ValueError):
    """The prepared data lacks what an evaluator needs; the message says what."""


def require_split(ctx: EvalContext, split: str) -> None:
    """Raises `DataLacks` unless the prepared dataset holds `split`."""
    from input_pipeline import dataset_format  # TensorFlow

    names = dataset_format.split_names(ctx.data_dir)
    if split not in names:
        raise DataLacks(f"{ctx.data_dir} has no split {split!r} (it has {names})")


def evaluator_class(type_name: str, where: str) -> type:
    """The ``Evaluator`` class of ``evaluators.<type_name>``; `where` names the config key."""
    if type_name not in TYPES:
        raise ValueError(f"{where}.type={type_name!r}: choose one of {TYPES}")
    return importlib.import_module(f"evaluators.{type_name}").Evaluator


@dataclasses.dataclass
class Scheduled:
    """An evaluator and when the trainer runs it."""

    name: str
    evaluator: Any
    log_steps: int
    at_start: bool

    def due(self, step: int, total_steps: int) -> bool:
        """Every `log_steps` steps and at the last step."""
        return step % self.log_steps == 0 or step == total_steps


def build_evaluators(evals: Mapping[str, Mapping[str, Any]], ctx: EvalContext) -> list[Scheduled]:
    """The evaluators of ``config.evals``, each with a clear error naming its config key.

    An evaluator whose constructor raises `DataLacks` is left out, with one
    warning naming its config key and what the data lacks.
    """
    scheduled = []
    for name, spec in evals.items():
        where = f"config.evals.{name}"
        spec = dict(spec)
        if "/" in name:
            raise ValueError(f"{where}: an evaluator name may not contain '/'")
        for key in ("type", "log_steps"):
            if key not in spec:
                raise ValueError(f"{where} needs {key!r} (it has {sorted(spec)})")
        cls = evaluator_class(spec["type"], where)
        log_steps, at_start = int(spec["log_steps"]), bool(spec.get("at_start", False))
        if log_steps < 1:
            raise ValueError(f"{where}.log_steps={log_steps} must be at least 1")
        options = {k: v for k, v in spec.items() if k not in TRAINER_KEYS}
        try:
            evaluator = cls(ctx, name=name, **options)
        except DataLacks as e:
            logging.warning("%s left out: %s", where, e)
            continue
        except TypeError as e:
            raise ValueError(f"{where}: {e}") from e
        scheduled.append(Scheduled(name, evaluator, log_steps, at_start))
    return scheduled


def check_batch_size(batch_size: int, mesh: Mesh, where: str) -> None:
    """Eval batches are split over every device of the mesh (of every process)."""
    if batch_size < 1 or batch_size % mesh.size:
        raise ValueError(
            f"{where}.batch_size={batch_size} must be a positive multiple of the device count "
            f"({mesh.size})"
        )


def make_predict(fn: Callable[[Any, dict], dict], mesh: Mesh) -> Callable:
    """Jits ``fn(params, batch) -> {name: [B, ...]}`` for ``predict_split``.

    The outputs (and the batch's row and mask) come back replicated on every
    device, so every process holds the whole batch's predictions.
    """

    def predict(params, batch):
        return {**fn(params, batch), ROW_KEY: batch[ROW_KEY], MASK_KEY: batch[MASK_KEY]}

    return jax.jit(predict, out_shardings=sharding.replicated(mesh))


def video_embedder(ctx: EvalContext) -> Callable:
    """``make_predict`` of the model's normalised video embedding: {'video_emb': [B, E]}."""
    model = ctx.model

    def embed_videos(params, batch):
        video_emb, _ = model.apply({"params": params}, batch["video"], method="encode_video")
        return {"video_emb": video_emb}

    return make_predict(embed_videos, ctx.mesh)


def predict_split(
    ctx: EvalContext,
    predict: Callable,
    params: Any,
    *,
    split: str,
    pp: str,
    batch_size: int,
) -> dict[str, np.ndarray]:
    """``predict`` (from ``make_predict``) over every example of `split`, once.

    Returns the outputs of the real examples, ordered by manifest row, with
    'row' among them. `batch_size` is global (over every process).
    """
    from input_pipeline import pipeline

    process_count = jax.process_count()
    dataset = pipeline.make_eval_dataset(
        ctx.data_dir,
        split,
        pp,
        batch_size // process_count,
        process_index=jax.process_index(),
        process_count=process_count,
    )
    pipeline.check_video_shape(
        tuple(dataset.element_spec["video"].shape), ctx.config, "eval_video_pp"
    )
    chunks: list[dict[str, np.ndarray]] = []
    for local_batch in dataset.as_numpy_iterator():
        batch = pipeline.global_batch(local_batch, ctx.mesh, sharding.DATA_AXES)
        out = jax.device_get(predict(params, batch))
        keep = np.asarray(out.pop(MASK_KEY), bool)
        chunks.append({k: np.asarray(v)[keep] for k, v in out.items()})
    if not chunks:
        raise ValueError(f"split {split!r} of {ctx.data_dir} holds no examples")
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
    from input_pipeline import dataset_format

    dataset = dataset_format.read_split(data_dir, split)
    columns: dict[str, list] = {}
    for example in dataset.as_numpy_iterator():
        flat = {k: v for k, v in example.items() if k not in ("frames", "labels")}
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


def join_rows(table: Mapping[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """The entries of `table` (from ``split_table``) for `rows`, in that order."""
    index = np.searchsorted(table[ROW_KEY], rows)
    index = np.minimum(index, len(table[ROW_KEY]) - 1)
    if not np.array_equal(table[ROW_KEY][index], rows):
        raise ValueError("join_rows: some rows are not in the split table")
    return {k: v[index] for k, v in table.items()}


def global_array(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array that every process holds whole, as a global array split on the batch axis."""
    batch_sharding = jax.sharding.NamedSharding(mesh, sharding.batch_spec())
    return jax.make_array_from_callback(x.shape, batch_sharding, lambda index: x[index])


def encode_texts(
    ctx: EvalContext, encode: Callable, params: Any, texts: Sequence[str], batch_size: int
) -> np.ndarray:
    """Text embeddings [N, E] of `texts` (the same ids as the pipeline's ``tokenize``).

    `encode` is ``jax.jit(fn(params, text_ids, text_mask) -> [B, E],
    out_shardings=replicated)``; the last batch is padded and the padding dropped.
    """
    tok = ctx.text_tokenizer
    max_len = ctx.config.input.text_max_len
    embeddings = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        encoded = [tokenizers.encode_padded(tok, text, max_len) for text in chunk]
        ids = np.full([batch_size, max_len], tok.pad_id, np.int32)
        mask = np.zeros([batch_size, max_len], bool)
        for i, (row_ids, length) in enumerate(encoded):
            ids[i], mask[i, :length] = row_ids, True
        emb = encode(params, global_array(ids, ctx.mesh), global_array(mask, ctx.mesh))
        embeddings.append(np.asarray(jax.device_get(emb))[: len(chunk)])
    return np.concatenate(embeddings)


def study_mean(
    embeddings: np.ndarray, study_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Study-level embeddings: the L2-normalised mean of each study's video embeddings.

    Returns (study embeddings [S, E], the study ids [S] in order of first
    appearance, each video's study index [V]).
    """
    studies, first, index = np.unique(study_ids, return_index=True, return_inverse=True)
    order = np.argsort(first)  # studies in order of first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    index = rank[index]
    sums = np.zeros((len(studies), embeddings.shape[1]), np.float64)
    np.add.at(sums, index, embeddings)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return (sums / np.maximum(norms, 1e-12)).astype(np.float32), studies[order], index
