"""Location tokens for LocCa's grounding tasks: boxes <-> tokens, task prefixes, lesion phrases.

For: the location vocabulary appended to the caption tokenizer, the quantisation of a
box into coordinate bins and back, the IoU of boxes, and the phrase that names one
lesion ("90% stenosis of the proximal LAD") and its reading back.

A box is ``(y0, x0, y1, x1)`` normalised to [0, 1] in the clip's frame (after its
crop), ``y0 <= y1`` and ``x0 <= x1``. Each coordinate is quantised into one of
``num_bins`` bins (PaliGemma's ``<locNNNN>`` style): bin ``floor(v * num_bins)``
(1.0 falls in the last bin), read back as the bin's centre, so the round trip is
exact to half a bin.

The caption decoder's vocabulary with locations (``LocationVocab``)::

    [0, base)                        the caption tokenizer's own ids
    base + 0, base + 1               task prefixes <aref>, <gcap>
    base + 2 ... + num_times         frame-time tokens <t00> ...: the clip frame a box is on
    then num_bins ids                coordinate tokens <loc0000> ...

Captioning (the report) has no prefix, so a model trained with the location tasks
writes reports exactly as one trained without them. The three tasks as token
sequences (the decoder's targets; BOS is fed before them, and only the part after
the prefix is in the loss):

    cap    report tokens                                  EOS
    aref   <aref> phrase tokens | <tNN> <loc y0> <loc x0> <loc y1> <loc x1> EOS
    gcap   <gcap>               | <tNN> <loc y0> <loc x0> <loc y1> <loc x1> phrase tokens EOS

Not for: tokenising text (tokenizers.py), moving boxes with augmentation
(input_pipeline/ops.py), sampling tasks (input_pipeline/ops.py, ``locca_task``).
Pure Python + NumPy: no TensorFlow, no JAX.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from deepcoro_jax.domain import reports

TASKS: tuple[str, ...] = ("cap", "aref", "gcap")
PREFIXED_TASKS: tuple[str, ...] = ("aref", "gcap")
BOX_TOKENS = 5  # one frame-time token, then y0 x0 y1 x1


def _check_bins(num_bins: int) -> None:
    if not (isinstance(num_bins, (int, np.integer)) and num_bins >= 2):
        raise ValueError(f"num_bins must be an int >= 2, got {num_bins!r}")


def check_boxes(boxes: np.ndarray, what: str = "box") -> np.ndarray:
    """float64 [..., 4] boxes (y0, x0, y1, x1), checked to be ordered and inside [0, 1]."""
    boxes = np.asarray(boxes, np.float64)
    if boxes.shape[-1:] != (4,):
        raise ValueError(f"{what}: a box is 4 numbers (y0, x0, y1, x1), got shape {boxes.shape}")
    if not np.all(np.isfinite(boxes)):
        raise ValueError(f"{what}: coordinates must be finite, got {boxes.tolist()}")
    if np.any(boxes < 0) or np.any(boxes > 1):
        raise ValueError(f"{what}: coordinates must be in [0, 1], got {boxes.tolist()}")
    if np.any(boxes[..., 2] < boxes[..., 0]) or np.any(boxes[..., 3] < boxes[..., 1]):
        raise ValueError(f"{what}: need y0 <= y1 and x0 <= x1, got {boxes.tolist()}")
    return boxes


def box_to_tokens(box: np.ndarray, num_bins: int) -> np.ndarray:
    """Coordinate bins int32 [..., 4] in [0, num_bins) of boxes [..., 4] in [0, 1]."""
    _check_bins(num_bins)
    box = check_boxes(box)
    return np.minimum(np.floor(box * num_bins), num_bins - 1).astype(np.int32)


def tokens_to_box(tokens: np.ndarray, num_bins: int) -> np.ndarray:
    """Boxes float32 [..., 4] at the centres of coordinate bins [..., 4]."""
    _check_bins(num_bins)
    tokens = np.asarray(tokens)
    if tokens.shape[-1:] != (4,):
        raise ValueError(f"tokens_to_box: need [..., 4] bins, got shape {tokens.shape}")
    if np.any(tokens < 0) or np.any(tokens >= num_bins):
        raise ValueError(f"tokens_to_box: bins must be in [0, {num_bins}), got {tokens.tolist()}")
    return ((tokens.astype(np.float64) + 0.5) / num_bins).astype(np.float32)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of boxes [..., 4] (y0, x0, y1, x1), broadcast; 0 when the
    union is empty (two empty boxes)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    height = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    width = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = height * width
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


@dataclasses.dataclass(frozen=True)
class LocationVocab:
    """The location ids appended after a caption tokenizer's `base` ids (module docstring)."""

    base: int  # the caption tokenizer's vocabulary size
    num_bins: int  # coordinate bins per axis
    num_times: int  # frame-time tokens: the clip's frames

    def __post_init__(self):
        if not (isinstance(self.base, (int, np.integer)) and self.base >= 1):
            raise ValueError(f"LocationVocab: base must be a positive int, got {self.base!r}")
        _check_bins(self.num_bins)
        if not (isinstance(self.num_times, (int, np.integer)) and self.num_times >= 1):
            raise ValueError(f"LocationVocab: num_times must be >= 1, got {self.num_times!r}")

    @property
    def time_start(self) -> int:
        return self.base + len(PREFIXED_TASKS)

    @property
    def coord_start(self) -> int:
        return self.time_start + self.num_times

    @property
    def size(self) -> int:
        """The whole vocabulary: the base ids and the location ids."""
        return self.coord_start + self.num_bins

    def task_id(self, task: str) -> int:
        if task not in PREFIXED_TASKS:
            raise ValueError(f"task {task!r} has no prefix token; prefixed: {PREFIXED_TASKS}")
        return self.base + PREFIXED_TASKS.index(task)

    def box_ids(self, frame: int, box: np.ndarray) -> list[int]:
        """The 5 ids of a box on clip frame `frame`: <tNN> then y0 x0 y1 x1."""
        if not 0 <= int(frame) < self.num_times:
            raise ValueError(f"frame {frame} outside the clip's [0, {self.num_times})")
        bins = box_to_tokens(box, self.num_bins)
        return [self.time_start + int(frame)] + [self.coord_start + int(b) for b in bins]

    def read_box(self, ids: Sequence[int]) -> tuple[int, np.ndarray] | None:
        """(frame, box) from the first 5 ids, or None unless they are a time token and
        four coordinate tokens with y0 <= y1 and x0 <= x1."""
        ids = [int(i) for i in ids[:BOX_TOKENS]]
        if len(ids) < BOX_TOKENS or not self.is_time(ids[0]):
            return None
        if not all(self.is_coord(i) for i in ids[1:]):
            return None
        bins = np.array(ids[1:]) - self.coord_start
        box = tokens_to_box(bins, self.num_bins)
        if box[2] < box[0] or box[3] < box[1]:
            return None
        return ids[0] - self.time_start, box

    def is_time(self, token: int) -> bool:
        return self.time_start <= token < self.coord_start

    def is_coord(self, token: int) -> bool:
        return self.coord_start <= token < self.size

    def allowed(self, kind: str) -> np.ndarray:
        """bool [size]: the ids one decoding step may take, `kind` 'time', 'coord' or
        'text' (the base ids)."""
        mask = np.zeros([self.size], bool)
        if kind == "time":
            mask[self.time_start : self.coord_start] = True
        elif kind == "coord":
            mask[self.coord_start :] = True
        elif kind == "text":
            mask[: self.base] = True
        else:
            raise ValueError(f"allowed: kind must be 'time', 'coord' or 'text', got {kind!r}")
        return mask

    def box_step_masks(self) -> np.ndarray:
        """bool [5, size]: what each of a box's 5 decoding steps may take."""
        return np.stack([self.allowed("time")] + [self.allowed("coord")] * 4)

    def token_text(self, token: int) -> str:
        """How a location id reads in decoded text: <aref>, <gcap>, <t03>, <loc0123>."""
        if self.base <= token < self.time_start:
            return f"<{PREFIXED_TASKS[token - self.base]}>"
        if self.is_time(token):
            return f"<t{token - self.time_start:02d}>"
        if self.is_coord(token):
            return f"<loc{token - self.coord_start:04d}>"
        raise ValueError(f"token {token} is not a location id of {self}")


def task_weights(tasks) -> dict[str, float]:
    """{task: weight} checked: known tasks, numbers >= 0, at least one > 0. Returns the
    tasks with a weight > 0 (as floats, not normalised)."""
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; known: {TASKS}")
    for task, weight in tasks.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float, np.number)) or not (
                np.isfinite(weight) and weight >= 0):
            raise ValueError(f"task {task!r}: weight {weight!r} must be a finite number >= 0")
    used = {t: float(w) for t, w in tasks.items() if w > 0}
    if not used:
        raise ValueError(f"give at least one task a weight > 0, got {dict(tasks)}")
    return used


class LocationTokenizer:
    """A caption tokenizer with the location ids appended (``LocationVocab``): encodes as
    the base tokenizer; decodes base ids as it does and location ids as their names."""

    def __init__(self, base_tokenizer, num_bins: int, num_times: int):
        self.base_tokenizer = base_tokenizer
        self.vocab = LocationVocab(base_tokenizer.vocab_size, num_bins, num_times)
        self.vocab_size = self.vocab.size
        self.pad_id = base_tokenizer.pad_id
        self.bos_id = base_tokenizer.bos_id
        self.eos_id = base_tokenizer.eos_id

    def encode(self, text: str) -> list[int]:
        return self.base_tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Text up to the first EOS; BOS and pads dropped (as the base tokenizer does)."""
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        pieces, run = [], []
        for token in ids:
            if token < self.vocab.base:
                run.append(token)
                continue
            if run:
                pieces.append(self.base_tokenizer.decode(run))
                run = []
            pieces.append(self.vocab.token_text(token))
        if run:
            pieces.append(self.base_tokenizer.decode(run))
        return " ".join(p for p in pieces if p)


def with_locations(tokenizer, num_bins: int, num_times: int):
    """`tokenizer` with the location ids appended, or itself when `num_bins` is 0."""
    return LocationTokenizer(tokenizer, num_bins, num_times) if num_bins else tokenizer


# ----------------------------------------------------------------------------- phrases


def lesion_phrase(segment: str, percent: float) -> str:
    """The sentence that names one lesion, in the report renderer's first wording
    (e.g. "90% stenosis of the proximal LAD.", "Chronic total occlusion of the mid RCA.");
    `percent` 100 is written as a total occlusion."""
    if segment not in reports.SEGMENTS:
        raise ValueError(f"unknown segment {segment!r}; known: {reports.SEGMENTS}")
    if not 0 < percent <= 100:
        raise ValueError(f"lesion_phrase: percent must be in (0, 100], got {percent!r}")
    return reports.lesion_sentence(segment, reports.Lesion(float(percent)))


def read_phrase(text: str) -> tuple[str, float] | None:
    """(segment, percent) of the one lesion a phrase names, or None when it names none or
    several."""
    findings = reports.parse(text)
    named = [(s, lesion) for s, lesion in findings.lesions.items() if lesion.stenosis > 0]
    if len(named) != 1:
        return None
    segment, lesion = named[0]
    return segment, float(lesion.stenosis)


# ----------------------------------------------------------------------------- tasks


@dataclasses.dataclass(frozen=True)
class ClipLesion:
    """One lesion as a clip shows it: its box on one clip frame."""

    segment: str
    percent: float
    frame: int  # the clip frame the box is on
    box: np.ndarray  # float [4] (y0, x0, y1, x1) in [0, 1] of the clip's frame


def clip_lesions(
    segments: Sequence[str | bytes],
    percents: Sequence[float],
    clip_frames: Sequence[int],
    boxes: np.ndarray,
    visible: Sequence[bool],
    num_frames: int,
) -> list[ClipLesion]:
    """The lesions a clip shows, one per segment, in SEGMENTS order.

    The rows are a video's annotated boxes after augmentation (one per lesion and
    annotated frame: ``segments`` [K], ``percents`` [K], ``clip_frames`` [K],
    ``boxes`` [K, 4], ``visible`` [K]). Of a segment's visible rows, the box on the
    clip frame nearest the clip's middle is its box (the earlier frame on a tie),
    so a video annotated on every frame and one annotated on a single frame both
    give one target per lesion.
    """
    middle = (num_frames - 1) / 2
    best: dict[str, tuple[float, int, int]] = {}
    for row, (segment, frame, shown) in enumerate(zip(segments, clip_frames, visible, strict=True)):
        if not shown:
            continue
        segment = segment.decode() if isinstance(segment, bytes) else str(segment)
        key = (abs(int(frame) - middle), int(frame), row)
        if segment not in best or key < best[segment]:
            best[segment] = key
    return [
        ClipLesion(segment, float(percents[best[segment][2]]), best[segment][1],
                   np.asarray(boxes[best[segment][2]], np.float64))
        for segment in reports.SEGMENTS if segment in best
    ]


def task_tokens(
    task: str, vocab: LocationVocab, tokenizer, report: str, lesion: ClipLesion | None
) -> tuple[list[int], list[int]]:
    """(prefix, target) ids of one example of `task` (module docstring); EOS not included.
    'cap' needs no lesion; 'aref' and 'gcap' need one."""
    if task == "cap":
        return [], tokenizer.encode(report)
    if task not in PREFIXED_TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if lesion is None:
        raise ValueError(f"task {task!r} needs a lesion")
    box = vocab.box_ids(lesion.frame, np.clip(lesion.box, 0.0, 1.0))
    if task == "aref":
        return referring_prefix(vocab, tokenizer, lesion.segment, lesion.percent), box
    phrase = tokenizer.encode(lesion_phrase(lesion.segment, lesion.percent))
    return [vocab.task_id(task)], box + phrase


def referring_prefix(vocab: LocationVocab, tokenizer, segment: str, percent: float) -> list[int]:
    """The ids an AREF query is prompted with: <aref>, then the lesion's phrase."""
    return [vocab.task_id("aref"), *tokenizer.encode(lesion_phrase(segment, percent))]


def teacher_forcing(
    prefix: Sequence[int], target: Sequence[int], max_len: int, *, bos_id: int, eos_id: int,
    pad_id: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decoder input, target and loss mask, each [max_len], of prefix + target + EOS.

    ``out`` is the sequence, ``inp`` is BOS then the sequence shifted right, and
    ``mask`` is True on the target and its EOS only (the prefix and pads are not in
    the loss). As ``tokenize_caption`` does, a sequence of `max_len` tokens or more
    is cut to `max_len` and gets no EOS. With an empty prefix this is exactly
    ``tokenize_caption``'s encoding of the target.
    """
    if len(prefix) >= max_len:
        raise ValueError(f"a prefix of {len(prefix)} ids leaves no room in max_len={max_len}")
    sequence = [*prefix, *target]
    full = sequence[:max_len] if len(sequence) >= max_len else sequence + [eos_id]
    inputs = [bos_id, *sequence[: max_len - 1]]
    out = np.full([max_len], pad_id, np.int32)
    inp = np.full([max_len], pad_id, np.int32)
    out[: len(full)] = full
    inp[: len(inputs)] = inputs
    mask = np.zeros([max_len], bool)
    mask[len(prefix) : len(full)] = True
    return inp, out, mask


def longest_phrase(tokenizer) -> int:
    """The most ids `tokenizer` takes for a lesion phrase: over every segment and every
    percent in 1..100 in steps of 0.5 (what the room for a phrase must hold)."""
    percents = np.arange(1.0, 100.5, 0.5)
    return max(len(tokenizer.encode(lesion_phrase(s, float(p))))
               for s in reports.SEGMENTS for p in percents)
