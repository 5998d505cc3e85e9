"""Turns a DeepCORO-style manifest and its videos into a prepared dataset (shards of uint8 frames).

For: the one-off conversion of DICOM / AVI / MP4 / .npy angiograms listed in a
manifest into the format of `input_pipeline.dataset_format`, which the training
pipeline reads. Not for: sampling frames, augmenting or tokenising (the pipeline
does that), nor for decoding at inference time (use `video_io.load_video`).

Usage:
  python -m input_pipeline.prepare --manifest data/manifest.csv --out data/prepared \\
      [--root DIR] [--workers N] [--size 256] [--max_frames N] [--frame_format png|jpeg]
      [--label_columns a,b] [--vocab SPEC] [--splits train,val,test] [--overwrite]

The manifest is DeepCORO-CLIP's: 'α'- or comma-separated (read from the header
line), one row per video with the columns FileName, Split, Report and optionally
StudyInstanceUID (renameable by flag); relative paths resolve against --root, or
else the manifest's folder. Without a study column (or with an empty value) a
video is its own study.

Videos are decoded by `video_io.load_video` in 'spawn' worker processes that
import no TensorFlow, frames are encoded there and the main process writes the
examples, grouped by split, then by study (in order of first appearance), then
in manifest order; the output does not depend on worker scheduling. A bad row
(missing or empty file, unreadable or truncated video, zero frames, undecodable
DICOM, unknown split, empty report, ...) is logged, listed with its reason in
DIR/prepare_report.json and skipped; the rest is written. A SentencePiece model
is trained on the written train studies' reports (one per study) and stored as
DIR/spm.model, unless --vocab names a tokenizer.

Everything is written into a hidden temporary folder next to DIR which is
renamed to DIR at the very end, so an interrupted run never leaves a DIR that
looks complete (a killed run may leave a `.DIR.tmp-*` folder to delete). The
exit status is 0 when any video was written and 2 when none was (then no DIR).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING

from deepcoro_jax import tokenizers
from input_pipeline import video_io

if TYPE_CHECKING:
    import tensorflow_datasets as tfds

# `dataset_format` imports TensorFlow, so it is imported inside the functions that
# run in the main process only: spawned workers re-import this module (as their
# task's home, and as __main__ under `python -m`) and must stay free of it.

DEFAULT_SPLITS = ("train", "val", "test")
TRAIN_SPLIT = "train"
REPORT_FILE = "prepare_report.json"
UNKNOWN_SPLIT = "unknown split"
EMPTY_REPORT = "empty report"
MALFORMED_ROW = "malformed manifest row"
UNEXPECTED_ERROR = "unexpected error"

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
                    resolved_path=os.path.join(base, expanded),  # an absolute path stays as is
                    split=split,
                    report=report,
                    study_id=(values[study_column] if has_study else "") or path,
                    labels={name: values[name] for name in label_columns},
                )
            return {"row": index, "path": path, "reason": reason}

        parsed = [parse(index, record) for index, record in enumerate(records)]
    rows = [entry for entry in parsed if isinstance(entry, ManifestRow)]
    failed = [entry for entry in parsed if not isinstance(entry, ManifestRow)]
    label_kinds = {name: _label_kind(r.labels[name] for r in rows) for name in label_columns}
    return Manifest(rows=rows, failed=failed, label_kinds=label_kinds)


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


# Worker side: decode and encode one video. Only video_io, NumPy and PIL here.


@dataclasses.dataclass(frozen=True)
class _DecodeTask:
    path: str
    size: int
    max_frames: int | None
    frame_format: str
    jpeg_quality: int


@dataclasses.dataclass(frozen=True)
class _DecodeResult:
    frames: list[bytes]  # one PNG/JPEG per frame; empty on failure
    fps: float
    error: str | None


def _decode(task: _DecodeTask) -> _DecodeResult:
    try:
        video = video_io.load_video(task.path, task.size, task.max_frames)
    except video_io.VideoError as e:
        return _DecodeResult(frames=[], fps=0.0, error=str(e))
    except Exception as e:  # one bad file must not stop a run over 300k videos
        return _DecodeResult(
            frames=[], fps=0.0, error=f"{UNEXPECTED_ERROR}: {task.path}: {type(e).__name__}: {e}"
        )
    encoded = video_io.encode_frames(video.frames, task.frame_format, task.jpeg_quality)
    return _DecodeResult(frames=encoded, fps=video.fps, error=None)


def _decode_in_order(tasks: Iterator[_DecodeTask], workers: int) -> Iterator[_DecodeResult]:
    """Results in task order; at most 4 * workers tasks in flight (bounded memory)."""
    if workers == 0:
        yield from map(_decode, tasks)
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        pending = collections.deque()
        for task in tasks:
            pending.append(pool.submit(_decode, task))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# Main process: group, write, train the tokenizer, publish.


class _Progress:
    def __init__(self, total: int, log_every: int):
        self.total, self.log_every = total, log_every
        self.done = self.failed = 0
        self.start = time.monotonic()

    def update(self, failed: bool) -> None:
        self.done += 1
        self.failed += failed
        if self.done % self.log_every == 0 or self.done == self.total:
            elapsed = time.monotonic() - self.start
            rate = self.done / max(elapsed, 1e-9)
            log.info(
                "prepare: %d/%d videos (%d failed), %.1f videos/s, %.0f s left",
                self.done,
                self.total,
                self.failed,
                rate,
                (self.total - self.done) / rate,
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
    log_every: int,
) -> tuple[dict[str, int], list[tfds.core.SplitInfo], list[dict], list[str], int]:
    """Decodes and writes every row.

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
            serialized = dataset_format.serialize_example(features, example)
            writers[split].write(serialized, new_study=video_index == 0)
        written[split] += len(study)
        num_studies[split] += 1
        if split == TRAIN_SPLIT:
            train_reports.append(study[0][0].report)

    progress = _Progress(len(ordered), log_every)
    study: list[tuple[ManifestRow, _DecodeResult]] = []  # the written videos of one study
    current = None
    results = _decode_in_order((task_of(row) for row in ordered), workers)
    with contextlib.closing(results):
        for row, result in zip(ordered, results, strict=True):
            if (row.split, row.study_id) != current:
                write_study(study)
                study, current = [], (row.split, row.study_id)
            if result.error is None:
                study.append((row, result))
            else:
                failed.append({"row": row.index, "path": row.path, "reason": result.error})
                log.warning("row %d (%s) skipped: %s", row.index, row.path, result.error)
            progress.update(failed=result.error is not None)
        write_study(study)
    split_infos = [writers[split].close() for split in splits]
    num_bytes = sum(writer.num_bytes for writer in writers.values())
    return written, split_infos, failed, train_reports, num_bytes


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
    frame_format: str = "png",
    jpeg_quality: int = 95,
    label_columns: Sequence[str] = (),
    vocab: str | None = None,
    vocab_size: int = 1000,
    file_column: str = "FileName",
    split_column: str = "Split",
    report_column: str = "Report",
    study_column: str = "StudyInstanceUID",
    splits: Sequence[str] = DEFAULT_SPLITS,
    examples_per_shard: int = 256,
    overwrite: bool = False,
    log_every: int = 1000,
) -> dict:
    """Prepares the dataset at `out` (see the module docstring); returns the prepare report.

    `workers`: decoding processes (default: one per CPU; 0 decodes in this
    process). The report is ``{"written": {split: count}, "failed": [{"row",
    "path", "reason"}], "seconds", "videos_per_second", "bytes_per_video"}``, also
    saved as DIR/prepare_report.json when anything was written.
    """
    from input_pipeline import dataset_format

    start = time.monotonic()
    workers = (os.cpu_count() or 1) if workers is None else workers
    _check("size", size, size >= 1, "at least 1")
    _check("max_frames", max_frames, max_frames is None or max_frames >= 1, "at least 1")
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
    )
    if tokenizer is None:
        train_chars = {c for r in table.rows if r.split == TRAIN_SPLIT for c in r.report}
        # SentencePiece needs a piece per character, the word boundary and pad/unk/bos/eos.
        min_vocab_size = len({c for c in train_chars if not c.isspace()}) + 1 + 4
        _check(
            "vocab_size",
            vocab_size,
            vocab_size >= min_vocab_size,
            f"at least {min_vocab_size} for these train reports (one piece per character)",
        )
    for entry in table.failed:
        log.warning("row %d (%s) skipped: %s", entry["row"], entry["path"], entry["reason"])
    log.info("prepare: %d videos to decode with %d workers", len(table.rows), workers)

    meta = dataset_format.DatasetMeta(
        size=size,
        frame_format=frame_format,
        label_columns=table.label_kinds,
        tokenizer=tokenizer or dataset_format.TOKENIZER_FILE,
        max_frames=max_frames,
        jpeg_quality=jpeg_quality,
    )
    task_of = lambda row: _DecodeTask(
        row.resolved_path, size, max_frames, frame_format, jpeg_quality
    )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
    try:
        written, split_infos, failed, train_reports, num_bytes = _write_splits(
            tmp_dir,
            table.rows,
            task_of,
            table.label_kinds,
            dataset_format.build_features(meta),
            splits,
            examples_per_shard,
            workers,
            log_every,
        )
        failed = sorted(table.failed + failed, key=lambda entry: entry["row"])
        total = sum(written.values())
        if total == 0:
            shutil.rmtree(tmp_dir)
            log.error(
                "prepare: nothing written (%d rows failed); no dataset at %s", len(failed), out
            )
            return _report(written, failed, num_bytes, start)
        if tokenizer is None:
            if train_reports:
                tokenizers.train_sentencepiece(
                    train_reports, os.path.join(tmp_dir, dataset_format.TOKENIZER_FILE), vocab_size
                )
            else:
                log.warning(
                    "no %r videos written: no tokenizer trained (give --vocab)", TRAIN_SPLIT
                )
                meta = dataclasses.replace(meta, tokenizer=None)
        dataset_format.write_metadata(
            tmp_dir,
            meta,
            split_infos,
            description=f"Angiography videos and reports from {os.path.abspath(manifest)}.",
        )
        report = _report(written, failed, num_bytes, start)
        with open(os.path.join(tmp_dir, REPORT_FILE), "w") as f:
            json.dump(report, f, indent=2)
        _move_into_place(tmp_dir, out)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    log.info(
        "prepare: wrote %s to %s in %.1f s (%.1f videos/s, %.0f bytes/video); %d rows failed",
        written,
        out,
        report["seconds"],
        report["videos_per_second"],
        report["bytes_per_video"],
        len(report["failed"]),
    )
    return report


def _report(written: dict[str, int], failed: list[dict], num_bytes: int, start: float) -> dict:
    total = sum(written.values())
    seconds = time.monotonic() - start
    return {
        "written": written,
        "failed": failed,
        "seconds": round(seconds, 3),
        "videos_per_second": round(total / seconds, 3),
        "bytes_per_video": round(num_bytes / total, 1) if total else 0.0,
    }


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
    parser.add_argument("--frame_format", default="png", choices=("png", "jpeg"))
    parser.add_argument("--jpeg_quality", type=int, default=95)
    parser.add_argument("--label_columns", type=_comma_list, default=[])
    parser.add_argument("--vocab", help="tokenizer spec (sp:FILE or wordpiece:DIR) to use")
    parser.add_argument("--vocab_size", type=int, default=1000)
    parser.add_argument("--file_column", default="FileName")
    parser.add_argument("--split_column", default="Split")
    parser.add_argument("--report_column", default="Report")
    parser.add_argument("--study_column", default="StudyInstanceUID")
    parser.add_argument("--splits", type=_comma_list, default=list(DEFAULT_SPLITS))
    parser.add_argument("--examples_per_shard", type=int, default=256)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--log_every", type=int, default=1000, help="progress line every N")
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        report = prepare(args.pop("manifest"), args.pop("out"), **args)
    except (ValueError, OSError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    return 0 if sum(report["written"].values()) else 2


if __name__ == "__main__":
    sys.exit(main())
