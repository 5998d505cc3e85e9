"""Turns a DeepCORO-style manifest and its videos into a prepared dataset (shards of uint8 frames).

For: the one-off conversion of DICOM / AVI / MP4 / .npy angiograms listed in a
manifest into the format of `input_pipeline.dataset_format`, which the training
pipeline reads. Not for: sampling frames, augmenting or tokenising (the pipeline
does that), nor for decoding at inference time (use `video_io.load_video`).

Usage:
  python -m input_pipeline.prepare --manifest data/manifest.csv --out data/prepared \\
      [--root DIR] [--workers N] [--size 256] [--max_frames N] [--fps F]
      [--min_frames 8] [--frame_format jpeg|png] [--label_columns a,b] [--vocab SPEC]
      [--splits train,val,test] [--allow_split_overlap] [--overwrite] [--log_every N]
      [--report_scope study|view --system_column COL] [--boxes FILE]

The manifest is DeepCORO-CLIP's: 'α'- or comma-separated (read from the header
line), one row per video with the columns FileName, Split, Report and optionally
StudyInstanceUID (renameable by flag); relative paths resolve against --root, or
else the manifest's folder. Without a study column (or with an empty value) a
video is its own study. A video shows one coronary system but its row usually
carries the whole study's report; `--report_scope view --system_column COL`
keeps of each report the sentences about that system (left/right, from COL,
e.g. a view classifier's output) plus dominance, so that two videos whose views
show the same thing get the same findings (rows whose report the parser cannot
read keep it whole and are counted in the report's "report_scope").

Videos are decoded by `video_io.load_video` in 'spawn' worker processes that
import no TensorFlow, frames are encoded there and the main process writes the
examples, grouped by split, then by study (in order of first appearance), then
in manifest order; the output does not depend on worker scheduling. A bad row
is listed with its reason in DIR/prepare_report.json and skipped; the rest is
written. Bad rows: an unknown split, an empty report or a malformed row; a
missing or empty file, an unreadable or truncated video, zero frames, an
undecodable DICOM, ...; a video of fewer than --min_frames frames (a still
image; the bar is --max_frames when that is lower); a split overlap: a file
(resolved path) or a study in two splits belongs to the split of its first row
in manifest order and its rows in other splits are skipped, unless
--allow_split_overlap; a duplicate: the same file, split, study and report as
an earlier row. A SentencePiece model is trained on the written train studies'
reports (one per study) and stored as DIR/spm.model, unless --vocab names a
tokenizer.

`--boxes FILE` stores lesion boxes with the videos (the "lesions" feature of
`dataset_format`): JSON lines (.jsonl, .json) or CSV (.csv) with the fields file
(as in the manifest's file column), frame (0-based, of the source video),
segment (a `reports.SEGMENTS` key or a `reports.SEGMENT_NAMES` name, any case),
severity (percent stenosis in (0, 100]) and y0, x0, y1, x1 (source pixels; pixel
i spans [i, i + 1)). Each box goes through what `video_io.load_video` does to
the frames: the centred square crop and the resize to --size (`normalised_box`:
stored as (y0, x0, y1, x1) in [0, 1]) and, in time, --fps and --max_frames
(`stored_frame`: the stored frame that shows the annotated one, or the one
nearest in time). A bad box row never stops the run and loses nothing else: it
is counted and listed with its reason in the report's "boxes" section (an
unknown file or segment, a value that is not a finite number, an empty box, a
severity out of range, a box outside the source frame or the crop, a frame
outside the video or beyond --max_frames, a video not written); a box partly
outside the frame is clipped, counted and listed. A boxes file that cannot be
read or lacks a field is an error before anything is decoded.

A run works in a hidden folder beside DIR, `.DIR.tmp-KEY`, where KEY hashes the
manifest's bytes and every argument that changes the output (not --workers,
--log_every nor --overwrite). Each video is kept there once decoded; a run
interrupted and started again with the same arguments reuses those and decodes
the rest (rows that failed are tried again), while other arguments start
another folder (the log names the old one, to delete). The shards are written
there (the folder holds about twice the dataset's size at the end) and renamed
to DIR at the very end, so a DIR that exists is complete; then the work folder
is removed. The exit status is 0 when any video was written and 2 when none
was: then DIR is neither created nor replaced, and the report is written beside
it as DIR.prepare_report.json (a later run that writes removes it).

Stdout shows a progress line every --log_every videos or 10 seconds (videos
done, videos/s, time left, failures) and a summary (videos per split, failures
per reason, where the report is); the first failures are logged as warnings,
and all of them are in the report.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import dataclasses
import datetime
import glob
import hashlib
import json
import logging
import math
import multiprocessing
import os
import pickle
import shutil
import sys
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from deepcoro_jax import console, paths
from deepcoro_jax.domain import reports, tokenizers
from input_pipeline import video_io

if TYPE_CHECKING:
    import tensorflow_datasets as tfds

# `dataset_format` imports TensorFlow, so it is imported inside the functions that
# run in the main process only: spawned workers re-import this module (as their
# task's home, and as __main__ under `python -m`) and must stay free of it.

# JPEG at quality 95: about 1.2 grey levels RMS from PNG, decoded about 4x faster, so the
# recipe's pipeline keeps up (docs/data.md); "png" is lossless.
DEFAULT_FRAME_FORMAT = "jpeg"
DEFAULT_SPLITS = ("train", "val", "test")
TRAIN_SPLIT = "train"
REPORT_FILE = "prepare_report.json"
UNKNOWN_SPLIT = "unknown split"
EMPTY_REPORT = "empty report"
MALFORMED_ROW = "malformed manifest row"
SPLIT_OVERLAP = "split overlap"
DUPLICATE_ROW = "duplicate row"
TOO_FEW_FRAMES = "too few frames"
UNEXPECTED_ERROR = "unexpected error"
REPORT_SCOPES = ("study", "view")
UNKNOWN_SYSTEM = "unknown system"
UNPARSED_REPORT = "report not parsed"
NOTHING_ABOUT_SYSTEM = "nothing about the view's system"
# --system_column values read as each system (lower-cased).
SYSTEM_NAMES = {
    "left": "left", "l": "left", "lca": "left", "left coronary": "left",
    "right": "right", "r": "right", "rca": "right", "right coronary": "right",
}
PROGRESS_SECONDS = 10.0  # at most this long between two progress lines
MAX_LOGGED_FAILURES = 10  # failures logged as warnings; all are in the report

log = logging.getLogger(__name__)


# Manifest.


@dataclasses.dataclass(frozen=True)
class ManifestRow:
    """One data row of the manifest; `index` is 0-based, header excluded."""

    index: int
    path: str  # as written in the manifest
    resolved_path: str
    split: str
    report: str
    study_id: str
    labels: dict[str, str]
    system: str = ""  # the view's coronary system (--system_column), '' without one


@dataclasses.dataclass(frozen=True)
class Manifest:
    rows: list[ManifestRow]
    failed: list[dict]  # rows unusable as written: {"row", "path", "reason"}
    label_kinds: dict[str, str]  # label column -> 'float' or 'text'


def read_manifest(
    manifest: str,
    *,
    root: str | None = None,
    file_column: str = "FileName",
    split_column: str = "Split",
    report_column: str = "Report",
    study_column: str = "StudyInstanceUID",
    label_columns: Sequence[str] = (),
    splits: Sequence[str] = DEFAULT_SPLITS,
    system_column: str | None = None,
) -> Manifest:
    """Reads and checks a manifest; rows with a bad split, report or shape go to `failed`.

    A label column is 'float' when every non-empty value parses as a float
    (empty values then read as NaN), else 'text'.
    """
    if not os.path.isfile(manifest):
        raise FileNotFoundError(f"manifest {manifest} does not exist")
    base = os.path.abspath(root if root is not None else os.path.dirname(manifest))
    with open(manifest, encoding="utf-8-sig", newline="") as f:
        separator = "α" if "α" in f.readline() else ","
        f.seek(0)
        records = (record for record in csv.reader(f, delimiter=separator) if record)
        header = [name.strip() for name in next(records, [])]
        required = {file_column: "--file_column", split_column: "--split_column"}
        required[report_column] = "--report_column"
        required.update({name: "--label_columns" for name in label_columns})
        if system_column:
            required[system_column] = "--system_column"
        for column, flag in required.items():
            if column not in header:
                raise ValueError(
                    f"manifest {manifest} has no column {column!r} ({flag}); its columns are "
                    f"{header} (separator {separator!r})"
                )
        has_study = study_column in header
        if not has_study:
            log.info("manifest has no %r column: each video is its own study", study_column)

        def parse(index: int, record: list[str]) -> ManifestRow | dict:
            """The row, or its failure entry {"row", "path", "reason"}."""
            if len(record) != len(header):
                file_index = header.index(file_column)
                path = record[file_index] if file_index < len(record) else ""
                reason = (
                    f"{MALFORMED_ROW}: {len(record)} fields where the header has {len(header)} "
                    f"(a {separator!r} inside an unquoted value?)"
                )
                return {"row": index, "path": path, "reason": reason}
            values = {name: value.strip() for name, value in zip(header, record, strict=True)}
            path, split, report = values[file_column], values[split_column], values[report_column]
            if not path:
                reason = f"{video_io.MISSING_FILE}: the {file_column} column is empty"
            elif split not in splits:
                reason = f"{UNKNOWN_SPLIT}: {split!r} is not one of {', '.join(splits)} (--splits)"
            elif not report:
                reason = f"{EMPTY_REPORT}: the {report_column} column is empty"
            else:
                expanded = os.path.expanduser(path)
                return ManifestRow(
                    index=index,
                    path=path,
                    # An absolute path stays as is; 'a/../b' and 'b' name one file.
                    resolved_path=os.path.normpath(os.path.join(base, expanded)),
                    split=split,
                    report=report,
                    study_id=(values[study_column] if has_study else "") or path,
                    labels={name: values[name] for name in label_columns},
                    system=values[system_column].lower() if system_column else "",
                )
            return {"row": index, "path": path, "reason": reason}

        parsed = [parse(index, record) for index, record in enumerate(records)]
    rows = [entry for entry in parsed if isinstance(entry, ManifestRow)]
    failed = [entry for entry in parsed if not isinstance(entry, ManifestRow)]
    label_kinds = {name: _label_kind(r.labels[name] for r in rows) for name in label_columns}
    return Manifest(rows=rows, failed=failed, label_kinds=label_kinds)


def view_reports(rows: Sequence[ManifestRow]) -> tuple[list[ManifestRow], dict]:
    """Each row's report narrowed to what its view can show (`reports.system_part` of its
    system: that system's sentences plus dominance), for ``--report_scope view``.

    A row keeps its whole report when its system is not one of SYSTEM_NAMES, when the
    parser reads no sentence of the report, or when no sentence is left. Returns the
    rows and the summary that goes into prepare_report.json: {"scope", "narrowed",
    "kept_whole", "kept_whole_by_reason", "kept_whole_rows": [{"row", "path",
    "reason"}]}.
    """
    narrowed: list[ManifestRow] = []
    kept_whole: list[dict] = []
    parts: dict[tuple[str, str], str | None] = {}  # one parse per distinct report and system
    for row in rows:
        system = SYSTEM_NAMES.get(row.system)
        if system is None:
            reason = f"{UNKNOWN_SYSTEM}: {row.system!r} is not one of {sorted(SYSTEM_NAMES)}"
        else:
            key = (row.report, system)
            if key not in parts:
                parts[key] = reports.system_part(row.report, system)
            part = parts[key]
            if part:
                narrowed.append(dataclasses.replace(row, report=part))
                continue
            reason = (f"{UNPARSED_REPORT}: the report parser read no sentence of it"
                      if part is None else
                      f"{NOTHING_ABOUT_SYSTEM}: no sentence about the {system} system or "
                      "dominance")
        kept_whole.append({"row": row.index, "path": row.path, "reason": reason})
        narrowed.append(row)
    summary = {
        "scope": "view",
        "narrowed": len(rows) - len(kept_whole),
        "kept_whole": len(kept_whole),
        "kept_whole_by_reason": _by_reason(kept_whole),
        "kept_whole_rows": kept_whole,
    }
    return narrowed, summary


def _label_kind(values: Iterable[str]) -> str:
    for value in values:
        if value:
            try:
                float(value)
            except ValueError:
                return "text"
    return "float"


def _label_value(value: str, kind: str) -> float | str:
    if kind == "text":
        return value
    return float(value) if value else math.nan


def _drop_overlaps_and_duplicates(
    rows: Sequence[ManifestRow], allow_split_overlap: bool = False
) -> tuple[list[ManifestRow], list[dict]]:
    """The rows to decode, and a failure entry {"row", "path", "reason"} for each other row.

    Split overlap: a file (its resolved path) and a study (StudyInstanceUID)
    belong to the split of their first row in manifest order; their rows in any
    other split are dropped, unless `allow_split_overlap`. Duplicate: a row with
    the same file, split, study and report as an earlier kept row is dropped.
    """
    first_of_file: dict[str, ManifestRow] = {}
    first_of_study: dict[str, ManifestRow] = {}
    first_of_row: dict[tuple[str, str, str, str], ManifestRow] = {}
    kept, failed = [], []
    keep_both = "(--allow_split_overlap keeps both)"
    for row in rows:
        file_first = first_of_file.setdefault(row.resolved_path, row)
        study_first = first_of_study.setdefault(row.study_id, row)
        key = (row.resolved_path, row.split, row.study_id, row.report)
        if not allow_split_overlap and file_first.split != row.split:
            reason = (
                f"{SPLIT_OVERLAP}: the file {row.resolved_path} is in split "
                f"{file_first.split!r} from row {file_first.index}, and kept there only {keep_both}"
            )
        elif not allow_split_overlap and study_first.split != row.split:
            reason = (
                f"{SPLIT_OVERLAP}: study {row.study_id!r} is in split {study_first.split!r} "
                f"from row {study_first.index}, and kept there only {keep_both}"
            )
        elif key in first_of_row:
            reason = (
                f"{DUPLICATE_ROW}: the same file, split, study and report as row "
                f"{first_of_row[key].index}"
            )
        else:
            first_of_row[key] = row
            kept.append(row)
            continue
        failed.append({"row": row.index, "path": row.path, "reason": reason})
    return kept, failed


# Worker side: decode and encode one video. Only video_io, NumPy and PIL here.


@dataclasses.dataclass(frozen=True)
class _DecodeTask:
    path: str
    size: int
    max_frames: int | None
    frame_format: str
    jpeg_quality: int
    fps: float | None  # resample to this rate (video_io.resample_frames)


@dataclasses.dataclass(frozen=True)
class _DecodeResult:
    frames: list[bytes]  # one PNG/JPEG per frame; empty on failure
    fps: float
    error: str | None
    # The source, for placing lesion boxes: its frames' (H, W), its length (None when
    # decoding stopped at --max_frames) and its own frame rate (0 when unknown).
    source_shape: tuple[int, int] = (0, 0)
    source_frames: int | None = None
    source_fps: float = 0.0


def _decode(task: _DecodeTask) -> _DecodeResult:
    """Decodes as `video_io.load_video(path, size, max_frames, fps)` does; with --fps the
    resampling is done here, so that the source's length and rate are known too."""
    try:
        video = video_io.load_video(task.path, task.size, None if task.fps else task.max_frames)
        frames, fps = video.frames, video.fps
        if task.fps is not None:
            if video.fps == 0.0:
                raise video_io.VideoError(
                    video_io.UNKNOWN_FRAME_RATE,
                    f"{task.path} does not give its frame rate (DICOM CineRate, "
                    "RecommendedDisplayFrameRate, FrameTime or FrameTimeVector; the AVI/MP4 "
                    f"stream's rate; never for .npy), so it cannot be resampled to {task.fps} fps",
                )
            shown = video_io.resample_frames(np.arange(len(frames)), video.fps, task.fps)
            frames, fps = frames[shown[: task.max_frames]], task.fps
    except video_io.VideoError as e:
        return _DecodeResult(frames=[], fps=0.0, error=str(e))
    except Exception as e:  # one bad file must not stop a run over 300k videos
        return _DecodeResult(
            frames=[], fps=0.0, error=f"{UNEXPECTED_ERROR}: {task.path}: {type(e).__name__}: {e}"
        )
    whole = task.fps is not None or task.max_frames is None or len(video.frames) < task.max_frames
    return _DecodeResult(
        frames=video_io.encode_frames(frames, task.frame_format, task.jpeg_quality),
        fps=fps,
        error=None,
        source_shape=video.source_shape,
        source_frames=len(video.frames) if whole else None,
        source_fps=video.fps,
    )


class _DecodeCache:
    """The videos decoded so far by runs with one work folder: a pickle per manifest row.

    An entry appears (by an atomic rename) only when complete, so an interrupted
    run leaves whole entries only. Failed decodes are not kept: the next run
    tries those rows again (a file may have been fixed or a mount come back).
    """

    def __init__(self, folder: str):
        os.makedirs(folder, exist_ok=True)
        self.folder = folder
        names = os.listdir(folder)
        self.rows = {int(name[: -len(".pkl")]) for name in names if name.endswith(".pkl")}

    def __contains__(self, row: int) -> bool:
        return row in self.rows

    def _path(self, row: int) -> str:
        return os.path.join(self.folder, f"{row}.pkl")

    def load(self, row: int) -> _DecodeResult:
        with open(self._path(row), "rb") as f:
            return pickle.load(f)  # written by `store` in a folder of this run's own

    def store(self, row: int, result: _DecodeResult) -> None:
        path = self._path(row)
        with open(path + ".tmp", "wb") as f:
            pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(path + ".tmp", path)
        self.rows.add(row)


def _decode_in_order(
    jobs: Iterator[tuple[int, _DecodeTask]], workers: int, cache: _DecodeCache
) -> Iterator[tuple[_DecodeResult, bool]]:
    """(result, reused) for each (row, task), in order: the cached decode of the row if
    any, else a new one (cached when it succeeds); at most 4 * workers in flight."""

    def finish(row: int, result: _DecodeResult | None) -> tuple[_DecodeResult, bool]:
        if result is None:
            return cache.load(row), True
        if result.error is None:
            cache.store(row, result)
        return result, False

    if workers == 0:
        for row, task in jobs:
            yield finish(row, None if row in cache else _decode(task))
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        pending = collections.deque()  # (row, future), future None for a cached row
        for row, task in jobs:
            pending.append((row, None if row in cache else pool.submit(_decode, task)))
            if len(pending) >= 4 * workers:
                row, future = pending.popleft()
                yield finish(row, future and future.result())
        while pending:
            row, future = pending.popleft()
            yield finish(row, future and future.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# Lesion boxes (--boxes): read and checked in the main process before decoding, placed
# in each written video's stored frames after it.

BOX_FIELDS = ("file", "frame", "segment", "severity", "y0", "x0", "y1", "x1")
BOX_FORMATS = {".jsonl": "JSON lines", ".json": "JSON lines", ".csv": "CSV"}
MAX_REPORTED_BOX_ROWS = 20  # offending box rows listed in the report; all are counted
# Why a box row is not stored ("kind: details", counted by kind).
MALFORMED_BOX_ROW = "malformed row"
UNKNOWN_BOX_FILE = "unknown file"
UNKNOWN_SEGMENT = "unknown segment"
NON_NUMERIC_VALUE = "non-numeric value"
SEVERITY_OUT_OF_RANGE = "severity outside (0, 100]"
EMPTY_BOX = "empty box"
BOX_OUTSIDE_SOURCE = "box outside the source frame"
BOX_CROPPED_AWAY = "box outside the stored frame"
FRAME_OUTSIDE_VIDEO = "frame outside the video"
FRAME_NOT_STORED = "frame not stored"
VIDEO_NOT_WRITTEN = "video not written"
# Why a stored box was clipped.
CLIPPED_TO_SOURCE = "box partly outside the source frame"
CLIPPED_TO_STORED = "box partly outside the stored frame"


@dataclasses.dataclass(frozen=True)
class BoxRow:
    """One usable row of a --boxes file; `line` is its line in the file (1-based)."""

    line: int
    file: str  # as written in the manifest's file column
    frame: int  # 0-based, in the source video
    segment: str  # a reports.SEGMENTS key
    severity: float  # percent stenosis in (0, 100]
    box: tuple[float, float, float, float]  # (y0, x0, y1, x1) in source pixels


@dataclasses.dataclass(frozen=True)
class BoxTable:
    path: str
    rows: dict[str, list[BoxRow]]  # file -> its usable rows, in file order
    read: int  # data rows in the file
    rejected: list[dict]  # rows unusable as written: {"line", "file", "reason"}


_SEGMENT_KEYS = {
    **{name.lower(): segment for segment, name in reports.SEGMENT_NAMES.items()},
    **{segment: segment for segment in reports.SEGMENTS},
}


def read_boxes(path: str, files: Collection[str]) -> BoxTable:
    """Reads and checks a --boxes file: JSON lines (.jsonl, .json: one object per line)
    or CSV (.csv, comma-separated, with a header), with the fields BOX_FIELDS.

    `files` are the manifest's file column values; a row naming another file, or with
    an unknown segment, a value that is not a finite number, a negative or fractional
    frame, an empty box (y1 <= y0 or x1 <= x0) or a severity outside (0, 100] goes to
    `rejected`. Raises FileNotFoundError or ValueError, naming the file, when it does
    not exist, cannot be read, has another extension or lacks a field in every row (a
    CSV: in its header); an empty JSON lines file holds no boxes.
    """
    extension = os.path.splitext(path)[1].lower()
    if extension not in BOX_FORMATS:
        raise ValueError(
            f"--boxes {path}: unknown extension {extension or '(none)'!r}; use "
            f"{', '.join(BOX_FORMATS)} (JSON lines or CSV)"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--boxes {path} does not exist")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            records = list(_json_records(f) if BOX_FORMATS[extension] == "JSON lines"
                           else _csv_records(f, path))
    except UnicodeDecodeError as e:
        raise ValueError(f"--boxes {path} is not UTF-8 text: {e}") from e
    except OSError as e:
        raise OSError(f"--boxes {path} cannot be read: {e.strerror or e}") from e
    if BOX_FORMATS[extension] == "JSON lines":
        present = {name for _, record, problem in records if problem is None for name in record}
        missing = [name for name in BOX_FIELDS if name not in present]
        if records and missing:
            raise ValueError(
                f"--boxes {path}: no row has the field(s) {', '.join(missing)}; each line must "
                f"be a JSON object with the fields {', '.join(BOX_FIELDS)} (found: "
                f"{', '.join(sorted(present)) or 'no object'})"
            )
    rows: dict[str, list[BoxRow]] = {}
    rejected = []
    for line, record, problem in records:
        parsed = _box_row(line, record, problem, files)
        if isinstance(parsed, BoxRow):
            rows.setdefault(parsed.file, []).append(parsed)
        else:
            rejected.append(parsed)
    return BoxTable(path=path, rows=rows, read=len(records), rejected=rejected)


def _json_records(lines: Iterable[str]) -> Iterator[tuple[int, dict, str | None]]:
    """(line number, its object, what is wrong with the line) of each non-blank line."""
    for line, text in enumerate(lines, start=1):
        if text.strip():
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                yield line, {}, f"not JSON ({e.msg})"
                continue
            if isinstance(value, dict):
                yield line, value, None
            else:
                yield line, {}, "not a JSON object"


def _csv_records(f: Iterable[str], path: str) -> Iterator[tuple[int, dict, str | None]]:
    """(line number, {column: value}, what is wrong with the row) of each CSV row."""
    reader = csv.reader(f)
    header = [name.strip() for name in next(reader, [])]
    missing = [name for name in BOX_FIELDS if name not in header]
    if missing:
        raise ValueError(
            f"--boxes {path} has no column(s) {', '.join(missing)}; its header is {header}, "
            f"and it needs {', '.join(BOX_FIELDS)} (comma-separated)"
        )
    for record in reader:
        if record:
            fields = dict(zip(header, record, strict=False))
            problem = None
            if len(record) != len(header):
                problem = f"{len(record)} fields where the header has {len(header)}"
            yield reader.line_num, fields, problem


def _box_row(
    line: int, record: dict, problem: str | None, files: Collection[str]
) -> BoxRow | dict:
    """The row, or its rejection {"line", "file", "reason"}."""
    file = str(record.get("file", "")).strip()

    def rejection(reason: str) -> dict:
        return {"line": line, "file": file, "reason": reason}

    if problem is not None:
        return rejection(f"{MALFORMED_BOX_ROW}: {problem}")
    absent = [name for name in BOX_FIELDS if name not in record]
    if absent:
        return rejection(f"{MALFORMED_BOX_ROW}: no {', '.join(absent)}")
    if file not in files:
        return rejection(f"{UNKNOWN_BOX_FILE}: {file!r} is not in the manifest's file column")
    segment = _SEGMENT_KEYS.get(str(record["segment"]).strip().lower())
    if segment is None:
        return rejection(f"{UNKNOWN_SEGMENT}: {record['segment']!r} is neither a segment key "
                         "(prox_lad, ...) nor a segment name (proximal LAD, ...)")
    values = {}
    for name in BOX_FIELDS[1:]:
        if name == "segment":
            continue
        value = _finite_number(record[name])
        if value is None:
            return rejection(f"{NON_NUMERIC_VALUE}: {name} is {record[name]!r}, not a finite "
                             "number")
        values[name] = value
    frame = values["frame"]
    if frame != int(frame):
        return rejection(f"{NON_NUMERIC_VALUE}: frame is {record['frame']!r}, not a whole number")
    if frame < 0:
        return rejection(f"{FRAME_OUTSIDE_VIDEO}: frame {int(frame)} is negative")
    if not 0 < values["severity"] <= 100:
        return rejection(f"{SEVERITY_OUT_OF_RANGE}: {values['severity']:g}% is not a stenosis "
                         "percent in (0, 100]")
    box = (values["y0"], values["x0"], values["y1"], values["x1"])
    if box[2] <= box[0] or box[3] <= box[1]:
        return rejection(f"{EMPTY_BOX}: (y0, x0, y1, x1) = {box} needs y1 > y0 and x1 > x0")
    return BoxRow(line, file, int(frame), segment, values["severity"], box)


def _finite_number(value: object) -> float | None:
    """`value` as a finite float (from a JSON number or a numeric string), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def normalised_box(
    box: tuple[float, float, float, float], source_shape: tuple[int, int]
) -> tuple[tuple[float, float, float, float] | None, str | None]:
    """A box (y0, x0, y1, x1) in source pixels (pixel i spans [i, i + 1)) -> in [0, 1] of
    the stored frame, through the spatial mapping of `video_io.load_video`: the centred
    square crop of side min(H, W) (rows from (H - side) // 2, columns from
    (W - side) // 2), then the resize to --size, which scales by size / side.

    Returns (box, None); (box, why it was clipped) when part of it lay outside the source
    frame or the crop; (None, why not) when none of it shows in the stored frame.
    """
    height, width = source_shape
    y0, x0, y1, x1 = box
    if y1 <= 0 or x1 <= 0 or y0 >= height or x0 >= width:
        return None, f"{BOX_OUTSIDE_SOURCE}: {box} lies outside the {height} x {width} frame"
    inside = (max(y0, 0.0), max(x0, 0.0), min(y1, float(height)), min(x1, float(width)))
    note = None
    if inside != box:
        note = f"{CLIPPED_TO_SOURCE}: {box} clipped to the {height} x {width} frame"
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    scaled = np.array(inside) - (top, left, top, left)  # in the square crop's pixels
    normalised = np.clip(scaled / side, 0.0, 1.0)
    if normalised[2] <= normalised[0] or normalised[3] <= normalised[1]:
        return None, (f"{BOX_CROPPED_AWAY}: {box} lies outside the centred {side} x {side} "
                      f"square (rows {top}-{top + side}, columns {left}-{left + side}) that is "
                      "stored")
    if note is None and not np.array_equal(normalised, scaled / side):
        note = (f"{CLIPPED_TO_STORED}: {box} clipped to the centred {side} x {side} square "
                f"(rows {top}-{top + side}, columns {left}-{left + side}) that is stored")
    return tuple(float(v) for v in normalised), note


def stored_frame(
    frame: int, shown: np.ndarray, num_stored: int, source_frames: int | None
) -> tuple[int | None, str | None]:
    """The stored frame that shows source frame `frame`, or (None, why not).

    `shown` [N]: the source frame each frame of the (resampled) video shows, before
    --max_frames keeps the first `num_stored`; `source_frames`: the source's length,
    None when decoding stopped at --max_frames. The stored frame is the first that
    shows `frame`; when none does (--fps dropped it), the one showing the source frame
    nearest in time (the earlier on a tie).
    """
    if source_frames is not None and frame >= source_frames:
        return None, f"{FRAME_OUTSIDE_VIDEO}: frame {frame} of a video of {source_frames} frames"
    if source_frames is None and frame > shown[-1]:
        return None, (f"{FRAME_NOT_STORED}: frame {frame} is beyond the first {num_stored} "
                      "frames, which are all that is stored (--max_frames)")
    index = int(np.argmin(np.abs(shown - frame)))
    if index >= num_stored:
        return None, (f"{FRAME_NOT_STORED}: frame {frame} would be stored frame {index}, beyond "
                      f"the first {num_stored} kept (--max_frames)")
    return index, None


class _BoxPlacer:
    """Places the box rows of each written video in its stored frames (`lesions`), and
    accounts for every row of the --boxes file (`report`)."""

    def __init__(self, table: BoxTable, fps: float | None):
        self.table = table
        self.fps = fps
        self.outcomes: dict[int, tuple[str | None, bool]] = {}  # line -> (reason, stored)

    def lesions(self, path: str, result: _DecodeResult) -> dict[str, np.ndarray | list[str]]:
        """The "lesions" feature of the video of manifest file `path`, sorted by frame."""
        placed = []  # (stored frame, line, normalised box, row)
        rows = self.table.rows.get(path, [])
        shown = _shown_frames(result, self.fps) if rows else np.zeros(0, np.int64)
        for row in rows:
            frame, reason = stored_frame(row.frame, shown, len(result.frames), result.source_frames)
            box = None
            if frame is not None:
                box, reason = normalised_box(row.box, result.source_shape)
            # A file written twice (--allow_split_overlap) is placed the same way twice.
            self.outcomes.setdefault(row.line, (reason, box is not None))
            if box is not None:
                placed.append((frame, row.line, box, row))
        placed.sort(key=lambda entry: entry[:2])
        return {
            "box": np.array([box for _, _, box, _ in placed], np.float32).reshape(-1, 4),
            "frame": np.array([frame for frame, _, _, _ in placed], np.int32),
            "segment": [row.segment for _, _, _, row in placed],
            "severity": np.array([row.severity for _, _, _, row in placed], np.float32),
        }

    def report(self) -> dict:
        """The "boxes" section of prepare_report.json (see `prepare`)."""
        rejected = list(self.table.rejected)
        clipped = []
        for rows in self.table.rows.values():
            for row in rows:
                not_written = (f"{VIDEO_NOT_WRITTEN}: no manifest row of {row.file!r} was "
                               "written (see 'failed')")
                reason, stored = self.outcomes.get(row.line, (not_written, False))
                if reason is not None:
                    (clipped if stored else rejected).append(
                        {"line": row.line, "file": row.file, "reason": reason})
        rejected.sort(key=lambda entry: entry["line"])
        clipped.sort(key=lambda entry: entry["line"])
        return {
            "file": self.table.path,
            "read": self.table.read,
            "stored": sum(stored for _, stored in self.outcomes.values()),
            "clipped": len(clipped),
            "rejected": len(rejected),
            "rejected_by_reason": _by_reason(rejected),
            "rejected_rows": rejected[:MAX_REPORTED_BOX_ROWS],
            "clipped_rows": clipped[:MAX_REPORTED_BOX_ROWS],
        }


def _shown_frames(result: _DecodeResult, fps: float | None) -> np.ndarray:
    """The source frame that each frame of the video shows, before --max_frames: as
    `video_io.resample_frames` picks them with --fps, else frame k shows frame k."""
    if fps is None:
        return np.arange(len(result.frames))
    return video_io.resample_frames(np.arange(result.source_frames), result.source_fps, fps)


# Main process: group, write, train the tokenizer, publish.


class _Progress:
    """Counts a run's videos and failures, and prints a progress line to stdout.

    A line every `log_every` videos or PROGRESS_SECONDS, whichever comes first,
    and after the last video. The rate and the time left count only the videos
    decoded by this run (not those reused from the work folder). The first
    MAX_LOGGED_FAILURES failures are logged as warnings; all are in the report.
    """

    def __init__(self, total: int, to_decode: int, log_every: int):
        self.total, self.to_decode, self.log_every = total, to_decode, log_every
        self.done = self.decoded = self.failed = 0
        self.start = self.last_time = time.monotonic()
        self.last_done = 0

    def fail(self, entry: dict) -> None:
        self.failed += 1
        if self.failed <= MAX_LOGGED_FAILURES:
            log.warning("row %d (%s) skipped: %s", entry["row"], entry["path"], entry["reason"])
        if self.failed == MAX_LOGGED_FAILURES:
            log.warning("further failed rows are listed in the report only")

    def update(self, reused: bool) -> None:
        self.done += 1
        self.decoded += not reused
        now = time.monotonic()
        every = self.done - self.last_done >= self.log_every
        if not (every or now - self.last_time >= PROGRESS_SECONDS or self.done == self.total):
            return
        self.last_time, self.last_done = now, self.done
        rate = self.decoded / max(now - self.start, 1e-9)
        left = self.to_decode - self.decoded
        if left == 0:
            eta = "0:00:00"
        else:
            eta = str(datetime.timedelta(seconds=round(left / rate))) if rate else "?"
        reused = f" ({self.done - self.decoded} reused)" if self.done > self.decoded else ""
        print(
            f"prepare: {self.done}/{self.total} videos{reused}, {rate:.1f} videos/s, "
            f"ETA {eta}, {self.failed} failed",
            flush=True,
        )


def _write_splits(
    data_dir: str,
    rows: list[ManifestRow],
    task_of: Callable[[ManifestRow], _DecodeTask],
    label_kinds: dict[str, str],
    features: tfds.features.FeaturesDict,
    splits: Sequence[str],
    examples_per_shard: int,
    workers: int,
    cache: _DecodeCache,
    min_frames: int,
    max_frames: int | None,
    progress: _Progress,
    boxes: _BoxPlacer | None = None,
) -> tuple[dict[str, int], list[tfds.core.SplitInfo], list[dict], list[str], int]:
    """Decodes (or takes from `cache`) and writes every row, with its lesion boxes when
    `boxes` is given.

    Returns the videos written per split, the split infos, the failed rows, the
    report of each written train study and the bytes written.
    """
    from input_pipeline import dataset_format

    studies: dict[str, dict[str, list[ManifestRow]]] = {split: {} for split in splits}
    for row in rows:
        studies[row.split].setdefault(row.study_id, []).append(row)
    ordered = [row for split in splits for group in studies[split].values() for row in group]

    writers = {
        split: dataset_format.SplitWriter(data_dir, split, examples_per_shard) for split in splits
    }
    written = dict.fromkeys(splits, 0)
    num_studies = dict.fromkeys(splits, 0)
    failed, train_reports = [], []

    def write_study(study: list[tuple[ManifestRow, _DecodeResult]]) -> None:
        if not study:
            return
        split = study[0][0].split
        for video_index, (row, result) in enumerate(study):
            example = {
                "frames": result.frames,
                "num_frames": len(result.frames),
                "fps": result.fps,
                "report": row.report,
                "study_id": row.study_id,
                "path": row.path,
                "row": row.index,
                "study_index": num_studies[split],
                "video_in_study": video_index,
                "videos_in_study": len(study),
            }
            if label_kinds:
                example["labels"] = {
                    name: _label_value(row.labels[name], kind) for name, kind in label_kinds.items()
                }
            if boxes is not None:
                example["lesions"] = boxes.lesions(row.path, result)
            serialized = dataset_format.serialize_example(features, example)
            writers[split].write(serialized, new_study=video_index == 0)
        written[split] += len(study)
        num_studies[split] += 1
        if split == TRAIN_SPLIT:
            # Each distinct report once (per-view reports differ within a study).
            train_reports.extend(dict.fromkeys(row.report for row, _ in study))

    study: list[tuple[ManifestRow, _DecodeResult]] = []  # the written videos of one study
    current = None
    results = _decode_in_order(((row.index, task_of(row)) for row in ordered), workers, cache)
    with contextlib.closing(results):
        for row, (result, reused) in zip(ordered, results, strict=True):
            if (row.split, row.study_id) != current:
                write_study(study)
                study, current = [], (row.split, row.study_id)
            error = result.error or _frame_count_error(row, result, min_frames, max_frames)
            if error is None:
                study.append((row, result))
            else:
                failed.append({"row": row.index, "path": row.path, "reason": error})
                progress.fail(failed[-1])
            progress.update(reused)
        write_study(study)
    split_infos = [writers[split].close() for split in splits]
    num_bytes = sum(writer.num_bytes for writer in writers.values())
    return written, split_infos, failed, train_reports, num_bytes


def _frame_count_error(
    row: ManifestRow, result: _DecodeResult, min_frames: int, max_frames: int | None
) -> str | None:
    """The failure of a video with fewer than `min_frames` frames (at most `max_frames`)."""
    needed = min_frames if max_frames is None else min(min_frames, max_frames)
    if len(result.frames) >= needed:
        return None
    count = f"{len(result.frames)} frame{'' if len(result.frames) == 1 else 's'}"
    capped = f", capped by --max_frames {max_frames}" if needed < min_frames else ""
    return (
        f"{TOO_FEW_FRAMES}: {row.resolved_path} has {count}, fewer than {needed} "
        f"(--min_frames {min_frames}{capped}); a still image is not a cine"
    )


def _canonical_vocab(spec: str) -> str:
    """`spec` with an absolute path, after checking that it loads."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in ("sp", "wordpiece"):
        kind, path = ("wordpiece" if os.path.isdir(spec) else "sp"), spec
    canonical = f"{kind}:{os.path.abspath(os.path.expanduser(path))}"
    try:
        tokenizers.get_tokenizer(canonical)
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"--vocab {spec!r} cannot be loaded: {e}") from e
    return canonical


def prepare(
    manifest: str,
    out: str,
    *,
    root: str | None = None,
    workers: int | None = None,
    size: int = 256,
    max_frames: int | None = None,
    fps: float | None = None,
    min_frames: int = 8,
    frame_format: str = DEFAULT_FRAME_FORMAT,
    jpeg_quality: int = 95,
    label_columns: Sequence[str] = (),
    vocab: str | None = None,
    vocab_size: int = 1000,
    file_column: str = "FileName",
    split_column: str = "Split",
    report_column: str = "Report",
    study_column: str = "StudyInstanceUID",
    splits: Sequence[str] = DEFAULT_SPLITS,
    report_scope: str = "study",
    system_column: str | None = None,
    boxes: str | None = None,
    examples_per_shard: int = 256,
    allow_split_overlap: bool = False,
    overwrite: bool = False,
    log_every: int = 1000,
) -> dict:
    """Prepares the dataset at `out` (see the module docstring); returns the prepare report.

    `workers`: decoding processes (default: one per CPU; 0 decodes in this
    process). `fps`: every video is resampled in time to this rate
    (`video_io.resample_frames`; a video whose rate is unknown fails) and
    `max_frames` counts the resampled frames. `report_scope` 'view' narrows each
    row's report to its view's coronary system, read from `system_column` (see
    `view_reports`; the report then has a "report_scope" entry). The report is ``{"written":
    {split: count}, "failed": [{"row", "path", "reason"}], "failed_by_reason":
    {kind: count}, "seconds", "videos_per_second", "bytes_per_video"}``, also
    saved as DIR/prepare_report.json, or as DIR.prepare_report.json when nothing
    was written. With `boxes` (a --boxes file, see the module docstring) every
    video gets a "lesions" feature and the report a "boxes" entry: {"file", "read",
    "stored", "clipped", "rejected", "rejected_by_reason": {kind: count},
    "rejected_rows", "clipped_rows": the first MAX_REPORTED_BOX_ROWS of each as
    {"line", "file", "reason"}}.
    """
    from input_pipeline import dataset_format

    start = time.monotonic()
    workers = (os.cpu_count() or 1) if workers is None else workers
    _check("size", size, size >= 1, "at least 1")
    _check("max_frames", max_frames, max_frames is None or max_frames >= 1, "at least 1")
    _check("min_frames", min_frames, min_frames >= 1, "at least 1")
    _check("fps", fps, fps is None or fps > 0, "a positive frame rate")
    _check(
        "frame_format",
        frame_format,
        frame_format in video_io.FRAME_FORMATS,
        f"one of {video_io.FRAME_FORMATS}",
    )
    _check("jpeg_quality", jpeg_quality, 1 <= jpeg_quality <= 100, "in 1..100")
    _check("workers", workers, workers >= 0, "at least 0 (0 decodes in this process)")
    _check(
        "splits",
        splits,
        len(splits) > 0 and len(set(splits)) == len(splits),
        "distinct split names",
    )
    _check("examples_per_shard", examples_per_shard, examples_per_shard >= 1, "at least 1")
    _check("report_scope", report_scope, report_scope in REPORT_SCOPES, f"one of {REPORT_SCOPES}")
    _check("system_column", system_column, report_scope != "view" or bool(system_column),
           "the manifest column of each video's coronary system (left/right) with "
           "--report_scope view")
    _check("log_every", log_every, log_every >= 1, "at least 1")
    out = os.path.abspath(out)
    if os.path.exists(out) and not (overwrite and os.path.isdir(out)):
        raise FileExistsError(
            f"--out {out} already exists; pass --overwrite to replace it"
            if os.path.isdir(out)
            else f"--out {out} exists and is not a folder"
        )
    tokenizer = _canonical_vocab(vocab) if vocab else None
    table = read_manifest(
        manifest,
        root=root,
        file_column=file_column,
        split_column=split_column,
        report_column=report_column,
        study_column=study_column,
        label_columns=label_columns,
        splits=splits,
        system_column=system_column if report_scope == "view" else None,
    )
    box_table = None
    if boxes is not None:
        boxes = os.path.abspath(boxes)
        box_table = read_boxes(boxes, {row.path for row in table.rows}
                               | {entry["path"] for entry in table.failed})
        print(
            f"prepare: {box_table.read} lesion boxes read from {boxes}, "
            f"{len(box_table.rejected)} of them unusable as written",
            flush=True,
        )
    rows, rejected = _drop_overlaps_and_duplicates(table.rows, allow_split_overlap)
    scope_summary = None
    if report_scope == "view":
        rows, scope_summary = view_reports(rows)
        print(
            f"prepare: reports narrowed to each view's system for {scope_summary['narrowed']} "
            f"rows; {scope_summary['kept_whole']} keep the whole report "
            f"{scope_summary['kept_whole_by_reason'] or ''}",
            flush=True,
        )
    if tokenizer is None:
        train_chars = {c for r in rows if r.split == TRAIN_SPLIT for c in r.report}
        # SentencePiece needs a piece per character, the word boundary and pad/unk/bos/eos.
        min_vocab_size = len({c for c in train_chars if not c.isspace()}) + 1 + 4
        _check(
            "vocab_size",
            vocab_size,
            vocab_size >= min_vocab_size,
            f"at least {min_vocab_size} for these train reports (one piece per character)",
        )

    meta = dataset_format.DatasetMeta(
        size=size,
        frame_format=frame_format,
        label_columns=table.label_kinds,
        tokenizer=tokenizer or dataset_format.TOKENIZER_FILE,
        max_frames=max_frames,
        jpeg_quality=jpeg_quality,
        fps=fps,
        lesion_boxes=box_table is not None,
    )
    task_of = lambda row: _DecodeTask(
        row.resolved_path, size, max_frames, frame_format, jpeg_quality, fps
    )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    settings = {  # what the output depends on besides the decode tasks and the manifest
        "manifest": os.path.abspath(manifest),
        "min_frames": min_frames,
        "label_columns": list(label_columns),
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "columns": [file_column, split_column, report_column, study_column],
        "report_scope": [report_scope, system_column if report_scope == "view" else None],
        "splits": list(splits),
        "examples_per_shard": examples_per_shard,
        "allow_split_overlap": allow_split_overlap,
        "boxes": _file_digest(boxes) if boxes is not None else None,
    }
    work_dir = _work_dir(out, manifest, settings, map(task_of, rows))
    others = _work_dirs(out) - {work_dir}
    cache = _DecodeCache(os.path.join(work_dir, "decoded"))
    data_dir = os.path.join(work_dir, "dataset")
    shutil.rmtree(data_dir, ignore_errors=True)  # the partial shards of an interrupted run
    os.makedirs(data_dir)
    if cache.rows:
        print(f"prepare: resuming in {work_dir}: {len(cache.rows)} videos already decoded")
    else:
        print(f"prepare: working in {work_dir}")
    if others:
        print(
            f"prepare: {', '.join(sorted(others))} (from runs with other arguments or another "
            "manifest) left as they are; delete them if not needed"
        )
    failed_before = table.failed + rejected
    progress = _Progress(len(rows), sum(row.index not in cache for row in rows), log_every)
    for entry in sorted(failed_before, key=lambda entry: entry["row"]):
        progress.fail(entry)
    print(
        f"prepare: {len(failed_before)} rows rejected from the manifest; {len(rows)} videos, "
        f"{progress.to_decode} to decode with {workers} workers",
        flush=True,
    )
    placer = _BoxPlacer(box_table, fps) if box_table is not None else None
    try:
        written, split_infos, failed, train_reports, num_bytes = _write_splits(
            data_dir,
            rows,
            task_of,
            table.label_kinds,
            dataset_format.build_features(meta),
            splits,
            examples_per_shard,
            workers,
            cache,
            min_frames,
            max_frames,
            progress,
            placer,
        )
        failed = sorted(failed_before + failed, key=lambda entry: entry["row"])
        if sum(written.values()) == 0:
            report = _report(written, failed, num_bytes, start, scope_summary, placer)
            report_path = f"{out}.{REPORT_FILE}"  # beside DIR: an existing DIR stays as it is
            with open(report_path, "w") as f:
                json.dump(report, f, indent=2)
            shutil.rmtree(work_dir)
            _print_summary(report, out, report_path)
            return report
        if tokenizer is None:
            if train_reports:
                tokenizers.train_sentencepiece(
                    train_reports, os.path.join(data_dir, dataset_format.TOKENIZER_FILE), vocab_size
                )
            else:
                log.warning(
                    "no %r videos written: no tokenizer trained (give --vocab)", TRAIN_SPLIT
                )
                meta = dataclasses.replace(meta, tokenizer=None)
        dataset_format.write_metadata(
            data_dir,
            meta,
            split_infos,
            description=f"Angiography videos and reports from {os.path.abspath(manifest)}.",
        )
        report = _report(written, failed, num_bytes, start, scope_summary, placer)
        with open(os.path.join(data_dir, REPORT_FILE), "w") as f:
            json.dump(report, f, indent=2)
        _move_into_place(data_dir, out)
    except BaseException:
        shutil.rmtree(data_dir, ignore_errors=True)
        if cache.rows:
            print(
                f"prepare: stopped; the {len(cache.rows)} videos decoded so far are kept in "
                f"{work_dir}, and the same command resumes from them",
                flush=True,
            )
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
        raise
    shutil.rmtree(work_dir)
    with contextlib.suppress(FileNotFoundError):
        os.remove(f"{out}.{REPORT_FILE}")  # the report of an earlier run that wrote nothing
    _print_summary(report, out, os.path.join(out, REPORT_FILE))
    return report


def _work_dir(out: str, manifest: str, settings: dict, tasks: Iterable[_DecodeTask]) -> str:
    """`.NAME.tmp-KEY` beside `out`; KEY hashes the manifest's bytes, `settings` and
    every decode task (the resolved paths and the decoding options)."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    with open(manifest, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    for task in tasks:
        digest.update(repr(task).encode())
    name = f".{os.path.basename(out)}.tmp-{digest.hexdigest()[:16]}"
    return os.path.join(os.path.dirname(out), name)


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _work_dirs(out: str) -> set[str]:
    """The work folders of every run for `out`, interrupted ones included."""
    pattern = f".{glob.escape(os.path.basename(out))}.tmp-*"
    return set(glob.glob(os.path.join(glob.escape(os.path.dirname(out)), pattern)))


def _print_summary(report: dict, out: str, report_path: str) -> None:
    """The end of a run, on stdout: videos written per split, failures per reason, the report."""
    written = report["written"]
    total = sum(written.values())
    if total:
        per_split = ", ".join(f"{count} {split}" for split, count in written.items())
        print(
            f"prepare: wrote {total} videos ({per_split}) to {out} in {report['seconds']:.1f} s "
            f"({report['videos_per_second']:.1f} videos/s)"
        )
    else:
        kept = f"the existing dataset at {out} is kept" if os.path.isdir(out) else "no dataset"
        print(f"prepare: 0 written; {kept}")
    reasons = ", ".join(f"{count} {kind}" for kind, count in report["failed_by_reason"].items())
    print(f"prepare: {len(report['failed'])} rows failed" + (f" ({reasons})" if reasons else ""))
    if "boxes" in report:
        boxes = report["boxes"]
        reasons = ", ".join(f"{n} {kind}" for kind, n in boxes["rejected_by_reason"].items())
        print(
            f"prepare: lesion boxes: {boxes['stored']} of {boxes['read']} stored "
            f"({boxes['clipped']} clipped), {boxes['rejected']} rejected"
            + (f" ({reasons})" if reasons else "")
        )
    print(f"prepare: report in {report_path}", flush=True)


def _report(written: dict[str, int], failed: list[dict], num_bytes: int, start: float,
            scope_summary: dict | None = None, boxes: _BoxPlacer | None = None) -> dict:
    total = sum(written.values())
    seconds = time.monotonic() - start
    scope = {"report_scope": scope_summary} if scope_summary else {}
    lesion_boxes = {"boxes": boxes.report()} if boxes is not None else {}
    return {
        **scope,
        **lesion_boxes,
        "written": written,
        "failed_by_reason": _by_reason(failed),
        "failed": failed,
        "seconds": round(seconds, 3),
        "videos_per_second": round(total / seconds, 3),
        "bytes_per_video": round(num_bytes / total, 1) if total else 0.0,
    }


def _by_reason(entries: Iterable[dict]) -> dict[str, int]:
    """{kind: count} of entries whose "reason" is "kind: details", most common first."""
    return dict(collections.Counter(e["reason"].partition(":")[0] for e in entries).most_common())


def _check(flag: str, value: object, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"--{flag} must be {expected}, got {value!r}")


def _move_into_place(tmp_dir: str, out: str) -> None:
    if not os.path.exists(out):
        os.rename(tmp_dir, out)
        return
    replaced = tmp_dir + ".replaced"
    os.rename(out, replaced)
    os.rename(tmp_dir, out)
    shutil.rmtree(replaced)


def _comma_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m input_pipeline.prepare",
        description="Manifest + angiography videos -> prepared dataset shards.",
    )
    parser.add_argument("--manifest", required=True, help="CSV, 'α'- or comma-separated")
    parser.add_argument("--out", required=True, help="the dataset folder to create")
    parser.add_argument("--root", help="folder of relative paths (default: the manifest's)")
    parser.add_argument("--workers", type=int, help="decoding processes (default: CPU count)")
    parser.add_argument("--size", type=int, default=256, help="output frame side in pixels")
    parser.add_argument("--max_frames", type=int, help="keep the first N frames of each video")
    parser.add_argument("--fps", type=float, help="resample every video in time to F frames/s")
    parser.add_argument(
        "--min_frames", type=int, default=8, help="skip videos of fewer frames (a still image)"
    )
    parser.add_argument(
        "--frame_format", default=DEFAULT_FRAME_FORMAT, choices=("png", "jpeg")
    )
    parser.add_argument("--jpeg_quality", type=int, default=95)
    parser.add_argument("--label_columns", type=_comma_list, default=[])
    parser.add_argument("--vocab", help="tokenizer spec (sp:FILE or wordpiece:DIR) to use")
    parser.add_argument("--vocab_size", type=int, default=1000)
    parser.add_argument("--file_column", default="FileName")
    parser.add_argument("--split_column", default="Split")
    parser.add_argument("--report_column", default="Report")
    parser.add_argument("--study_column", default="StudyInstanceUID")
    parser.add_argument(
        "--report_scope", default="study", choices=REPORT_SCOPES,
        help="view: keep of each study report what the video's coronary system shows "
        "(its sentences and dominance; needs --system_column)",
    )
    parser.add_argument("--system_column", help="the column of each video's system (left/right)")
    parser.add_argument(
        "--boxes",
        help="lesion boxes to store with the videos: JSON lines (.jsonl, .json) or CSV (.csv) "
        "with file, frame, segment, severity, y0, x0, y1, x1 (source pixels)",
    )
    parser.add_argument("--splits", type=_comma_list, default=list(DEFAULT_SPLITS))
    parser.add_argument("--examples_per_shard", type=int, default=256)
    parser.add_argument(
        "--allow_split_overlap",
        action="store_true",
        help="keep a study or file found in two splits in both (default: in its first only)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument(
        "--log_every", type=int, default=1000, help="a progress line every N videos (or 10 s)"
    )
    parser.add_argument("--verbose", action="store_true", help="library log lines too")
    args = vars(parser.parse_args(argv))
    for name in ("manifest", "out", "root", "boxes"):
        args[name] = paths.resolve(args[name]) if args[name] else args[name]
    if args["vocab"]:
        args["vocab"] = paths.resolve_tokenizer_spec(args["vocab"])
    verbose = args.pop("verbose")
    if argv is None:  # the command line: library log lines go to <out>.prepare_log.txt
        console.start(verbose=verbose)
        out = args["out"]
        console.attach(os.path.dirname(out), f"{os.path.basename(out)}.prepare_log.txt")
    else:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        report = prepare(args.pop("manifest"), args.pop("out"), **args)
    except (ValueError, OSError) as e:
        print(f"{parser.prog}: error: {e}", file=console.terminal())
        return 1
    except KeyboardInterrupt:  # Ctrl-C: prepare has said where its work is kept
        return 130
    return 0 if sum(report["written"].values()) else 2


if __name__ == "__main__":
    sys.exit(main())
