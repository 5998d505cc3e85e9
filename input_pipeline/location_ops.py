"""Preprocessing ops of LocCa's location tasks: a task per training example, eval targets.

Both read an example's lesion boxes after the clip's augmentation (``lesions``: box,
segment, severity, and ``clip_frame`` / ``visible`` from ``decode_sample_frames`` and
the spatial ops; see ``ops.py``) and use the caption tokenizer with the location ids
appended (``deepcoro_jax.domain.locations``: vocabulary, task sequences, the one box
per lesion a clip shows). Registered in ``ops.OPS`` like every op, once this module is
imported (``pipeline.py`` imports it; so do code and tests that build a pp with these
ops through ``ops.get_preprocess_fn`` directly).

Not here: moving boxes with the pixels (``ops.py``), the location vocabulary and the
task sequences themselves (``deepcoro_jax/domain/locations.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import tensorflow as tf

from deepcoro_jax.domain import locations, reports
from input_pipeline import ops


def _clip_frames(data: ops.Example, video_key: str, op: str) -> int:
    frames = ops._get(data, video_key, op).shape[0]
    if frames is None:
        raise ValueError(
            f"{op}: the clip's frame count must be static (put decode_sample_frames first)")
    return int(frames)


def _lesion_tensors(data: ops.Example, op: str) -> list[tf.Tensor]:
    """segment, severity, clip_frame, box, visible of the example's lesions (empty when it
    has none)."""
    if ops.LESIONS_KEY not in data:
        return [tf.zeros([0], tf.string), tf.zeros([0], tf.float32), tf.zeros([0], tf.int32),
                tf.zeros([0, 4], tf.float32), tf.zeros([0], tf.bool)]
    lesions = data[ops.LESIONS_KEY]
    missing = [k for k in ("clip_frame", "visible") if k not in lesions]
    if missing:
        raise ValueError(f"{op}: the lesions lack {missing}: put decode_sample_frames before it")
    return [lesions["segment"], lesions["severity"], lesions["clip_frame"], lesions["box"],
            lesions["visible"]]


def _found(segments, severities, clip_frames, boxes, visible, num_frames):
    return locations.clip_lesions(
        [bytes(s) for s in np.asarray(segments).reshape(-1)],
        np.asarray(severities), np.asarray(clip_frames), np.asarray(boxes).reshape(-1, 4),
        np.asarray(visible), num_frames)


def _check_weights(tasks: Mapping[str, float], op: str) -> np.ndarray:
    """The weights of ``locations.TASKS``, in that order, normalised to sum to 1."""
    try:
        used = locations.task_weights(tasks)
    except ValueError as e:
        raise ValueError(f"{op}: {e}") from e
    weights = np.array([used.get(t, 0.0) for t in locations.TASKS])
    return weights / weights.sum()


@ops.register("locca_task")
def locca_task(
    max_len: int,
    *,
    tasks: Mapping[str, float],
    num_bins: int,
    tokenizer: str = "dataset",
    key: str = "report",
    video_key: str = "video",
    outkey: str = "caption",
    task_key: str = "locca_task",
    data_dir: str | None = None,
) -> ops.Op:
    """One LocCa task per example, drawn with the weights `tasks` ({'cap', 'aref', 'gcap'}
    -> weight), as teacher-forcing ids like ``tokenize_caption``'s.

    'cap' is the report; 'aref' the box of one lesion the clip shows, from its phrase;
    'gcap' the box then the phrase (``deepcoro_jax.domain.locations``). The lesion is
    drawn uniformly among those the clip shows (``locations.clip_lesions``); an
    example that shows none (or has no boxes), or whose task sequence would not fit
    in `max_len` with its EOS, is captioned. Outputs ``<outkey>_in``,
    ``<outkey>_out`` int32 [max_len], ``<outkey>_mask`` bool [max_len] (the target and
    EOS: not the task prefix, not the pads) and `task_key` int32, the index of the task
    done in ``locations.TASKS``. Random: needs the example's seed (training).
    """
    op = "locca_task"
    if not (isinstance(max_len, int) and max_len > 1):
        raise ValueError(f"{op}: max_len must be an int > 1, got {max_len!r}")
    weights = _check_weights(tasks, op)
    cumulative = np.cumsum(weights)
    tok = ops._tokenizer(tokenizer, data_dir, op)
    warned = []

    def encode(report, u_task, u_lesion, segments, severities, clip_frames, boxes, visible,
               num_frames):
        num_frames = int(num_frames)
        vocab = locations.LocationVocab(tok.vocab_size, num_bins, num_frames)
        task = locations.TASKS[min(int(np.searchsorted(cumulative, u_task, side="right")), 2)]
        found = _found(segments, severities, clip_frames, boxes, visible, num_frames)
        lesion = found[min(int(u_lesion * len(found)), len(found) - 1)] if found else None
        if lesion is None:
            task = "cap"
        report = ops._text(report)
        prefix, target = locations.task_tokens(task, vocab, tok, report, lesion)
        if task != "cap" and len(prefix) + len(target) + 1 > max_len:  # a cut box is no box
            task = "cap"
            prefix, target = locations.task_tokens(task, vocab, tok, report, None)
        inp, out, mask = locations.teacher_forcing(
            prefix, target, max_len, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
        return inp, out, mask, np.int32(locations.TASKS.index(task))

    def apply(data: ops.Example) -> ops.Example:
        num_frames = _clip_frames(data, video_key, op)
        if ops.LESIONS_KEY not in data and weights[0] < 1 and not warned:
            warned.append(True)
            logging.warning("%s: the examples carry no lesion boxes (prepare --boxes): every "
                            "example is captioned", op)
        seed = ops._seed(data, op)
        inputs = [ops._get(data, key, op), ops._uniform(seed, 0, 0.0, 1.0),
                  ops._uniform(seed, 1, 0.0, 1.0), *_lesion_tensors(data, op),
                  tf.constant(num_frames, tf.int32)]
        inp, out, mask, task = tf.numpy_function(
            encode, inputs, (tf.int32, tf.int32, tf.bool, tf.int32), stateful=False)
        for tensor in (inp, out, mask):
            tensor.set_shape([max_len])
        task.set_shape([])
        data = {k: v for k, v in data.items() if k != ops.LESIONS_KEY}
        return {**data, f"{outkey}_in": inp, f"{outkey}_out": out, f"{outkey}_mask": mask,
                task_key: task}

    return apply


@ops.register("lesion_targets")
def lesion_targets(
    max_lesions: int,
    prefix_len: int,
    *,
    num_bins: int,
    tokenizer: str = "dataset",
    video_key: str = "video",
    outkey: str = "lesion",
    data_dir: str | None = None,
) -> ops.Op:
    """The lesions a clip shows (``locations.clip_lesions``: one box per segment), padded
    to `max_lesions`, with each one's referring-expression prefix (<aref> and its phrase).

    Outputs ``<outkey>_box`` float32 [M, 4], ``<outkey>_frame`` int32 [M] (the clip frame
    the box is on), ``<outkey>_segment`` int32 [M] (index in ``reports.SEGMENTS``, -1 for
    padding), ``<outkey>_percent`` float32 [M], ``<outkey>_valid`` bool [M],
    ``<outkey>_count`` int32 (lesions shown, before the cut to M),
    ``<outkey>_prefix`` int32 [M, prefix_len] and ``<outkey>_prefix_len`` int32 [M].
    A prefix longer than `prefix_len` is an error naming the phrase.
    """
    op = "lesion_targets"
    if not (isinstance(max_lesions, int) and max_lesions >= 1):
        raise ValueError(f"{op}: max_lesions must be a positive int, got {max_lesions!r}")
    if not (isinstance(prefix_len, int) and prefix_len >= 2):
        raise ValueError(f"{op}: prefix_len must be an int >= 2, got {prefix_len!r}")
    tok = ops._tokenizer(tokenizer, data_dir, op)

    def encode(segments, severities, clip_frames, boxes, visible, num_frames):
        vocab = locations.LocationVocab(tok.vocab_size, num_bins, int(num_frames))
        found = _found(segments, severities, clip_frames, boxes, visible, int(num_frames))
        box = np.zeros([max_lesions, 4], np.float32)
        frame = np.zeros([max_lesions], np.int32)
        segment = np.full([max_lesions], -1, np.int32)
        percent = np.zeros([max_lesions], np.float32)
        prefix = np.full([max_lesions, prefix_len], tok.pad_id, np.int32)
        length = np.zeros([max_lesions], np.int32)
        for i, lesion in enumerate(found[:max_lesions]):
            box[i] = np.clip(lesion.box, 0.0, 1.0)
            frame[i] = lesion.frame
            segment[i] = reports.SEGMENTS.index(lesion.segment)
            percent[i] = lesion.percent
            ids = locations.referring_prefix(vocab, tok, lesion.segment, lesion.percent)
            if len(ids) > prefix_len:
                raise ValueError(
                    f"{op}: the phrase {locations.lesion_phrase(lesion.segment, lesion.percent)!r}"
                    f" takes {len(ids)} ids with its task id, more than prefix_len={prefix_len}")
            prefix[i, : len(ids)] = ids
            length[i] = len(ids)
        return box, frame, segment, percent, segment >= 0, np.int32(len(found)), prefix, length

    def apply(data: ops.Example) -> ops.Example:
        num_frames = _clip_frames(data, video_key, op)
        outputs = tf.numpy_function(
            encode, [*_lesion_tensors(data, op), tf.constant(num_frames, tf.int32)],
            (tf.float32, tf.int32, tf.int32, tf.float32, tf.bool, tf.int32, tf.int32, tf.int32),
            stateful=False)
        names = ("box", "frame", "segment", "percent", "valid", "count", "prefix", "prefix_len")
        shapes = ([max_lesions, 4], [max_lesions], [max_lesions], [max_lesions], [max_lesions],
                  [], [max_lesions, prefix_len], [max_lesions])
        data = {k: v for k, v in data.items() if k != ops.LESIONS_KEY}
        for name, tensor, shape in zip(names, outputs, shapes, strict=True):
            tensor.set_shape(shape)
            data[f"{outkey}_{name}"] = tensor
        return data

    return apply
