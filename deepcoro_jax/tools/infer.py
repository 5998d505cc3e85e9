"""Command line: a trained run applied to raw angiography files (DICOM, AVI, MP4, .npy).

Usage:
  python -m deepcoro_jax.tools.infer --workdir DIR [--checkpoint STEP] [--bank CSV] [--top_k 5]
      [--json] [--attention OUTDIR] [--beam N] [--study] [--ground] FILE...

For each file: the report the caption decoder writes (greedy, or beam search
with ``--beam N``), the findings ``reports.parse_result`` reads from it, and the
``--top_k`` reports of a report bank closest to the video in the contrastive
embedding (cosine similarity). The bank is the unique reports of the run's
training split (read from its prepared dataset, without frames; none, with a
warning, when that dataset is no longer where the run found it), or the
unique non-empty values of the ``report`` column (any case) of ``--bank CSV``
('α'- or comma-separated, as manifests are). ``--attention OUTDIR`` also writes
the decoder's cross-attention per sentence as ``OUTDIR/<NNN>_<name>.png`` and
``.gif`` (``attention_maps``). ``--ground`` (a run trained with LocCa's location
tasks) also says where each lesion of the generated report is: the box the decoder
writes for the lesion's phrase (``inference.ground_lesions``), in the output (JSON:
``grounding``) and outlined on its sentence's attention maps.
``--json`` prints one JSON object per file.
``--study``: the files are the videos of one study, encoded together as the
model encodes a study (its pooling and the decoder read the tokens of every
video at once), for one report and one embedding; files that cannot be read are
reported and left out of the study.

A file is decoded exactly as ``prepare`` decoded the training videos
(``video_io.load_video`` at the dataset's frame size, ``--max_frames`` and
``--fps``, frames encoded in its frame format and JPEG quality, all read from the
copy of the dataset's metadata the run keeps) and turned into a clip by the run's
eval pp
(``input.eval_video_pp``: ``ops`` on an in-memory example).

A file that cannot be used is reported with its reason and skipped; the exit
status is 0 when any file was processed, 1 when none was, 2 for bad arguments
or a run that cannot be loaded.

Not for: prepared datasets (``export.py``), training or evaluation.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence

import numpy as np

from deepcoro_jax import console, paths
from deepcoro_jax.domain import reports
from deepcoro_jax.tools import attention_maps, inference
from deepcoro_jax.tools.inference import positive_int

FILES_PER_CHUNK = 16  # clips held in memory at once
BANK_COLUMN = "report"


def make_clip_loader(run: inference.Run) -> Callable[[str], np.ndarray]:
    """A function path -> the run's eval clip float32 [T, H, W, 1] of that file.

    Raises ``video_io.VideoError`` for a file that cannot be decoded.
    """
    import tensorflow as tf

    from input_pipeline import dataset_format, ops, video_io

    meta = dataset_format.DatasetMeta.from_json(run.dataset_meta)
    preprocess = ops.get_preprocess_fn(f"{run.video_pp}|keep('video')", train=False)

    def load(path: str) -> np.ndarray:
        decoded = video_io.load_video(path, meta.size, meta.max_frames, meta.fps)
        frames = video_io.encode_frames(decoded.frames, meta.frame_format, meta.jpeg_quality)
        example = {
            "frames": tf.constant(frames),
            "fps": tf.constant(decoded.fps, tf.float32),
            "path": tf.constant(path),
        }
        return preprocess(example)["video"].numpy()

    return load


def _split_reports(run: inference.Run) -> list[str]:
    from input_pipeline import dataset_format

    split = run.config.input.split
    texts = dataset_format.read_split(run.data_dir, split).map(lambda e: e["report"])
    return [t.decode("utf-8") for t in texts.as_numpy_iterator()]


def _csv_reports(path: str) -> list[str]:
    path = paths.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--bank {path} does not exist")
    text = path.read_bytes().decode("utf-8-sig")
    separator = "α" if "α" in text.partition("\n")[0] else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=separator)
    columns = [c for c in reader.fieldnames or () if c.strip().lower() == BANK_COLUMN]
    if not columns:
        raise ValueError(
            f"--bank {path} has no {BANK_COLUMN!r} column; its columns: {reader.fieldnames}"
        )
    return [(row[columns[0]] or "").strip() for row in reader]


def load_bank(run: inference.Run, csv_path: str | None) -> list[str] | None:
    """The unique non-empty bank reports, in order of first appearance (module docstring);
    None, with a warning, when no --bank is given and the run's data is not there."""
    if not csv_path and not paths.Path(run.data_dir).is_dir():
        logging.warning(
            "the run's training data (%s) is not there: no nearest reports; give --bank CSV",
            run.data_dir,
        )
        return None
    texts = _csv_reports(csv_path) if csv_path else _split_reports(run)
    bank = list(dict.fromkeys(t for t in texts if t))
    if not bank:
        where = csv_path or f"split {run.config.input.split!r} of {run.data_dir}"
        raise ValueError(f"the report bank ({where}) holds no report")
    return bank


def describe_findings(result: reports.ParseResult) -> str:
    """One line: parse status, dominance and each lesion (segment, percent, class)."""
    if not result.ok:
        return "not parsed (no recognisable report sentence)"
    stated = "stated" if result.dominance_stated else "not stated, read as right"
    parts = [f"{result.findings.dominance} dominance ({stated})"]
    for segment, lesion in result.findings.lesions.items():
        percent = f"{lesion.stenosis:g}%"
        kind = "CTO" if lesion.cto else reports.severity_class(lesion.stenosis)
        parts.append(f"{reports.SEGMENT_NAMES[segment]} {percent} ({kind})")
    if not result.findings.lesions:
        parts.append("no lesion")
    return "; ".join(parts)


def _result_record(
    path: str, report: str, similarities: np.ndarray, bank: Sequence[str], top_k: int, step: int
) -> dict:
    parsed = reports.parse_result(report)
    order = np.argsort(-similarities, kind="stable")[:top_k]
    return {
        "file": path,
        "checkpoint": step,
        "report": report,
        "parse_ok": parsed.ok,
        "dominance_stated": parsed.dominance_stated,
        "findings": reports.to_json(parsed.findings),
        "unparsed_sentences": parsed.unparsed_sentences,
        "top_k": [
            {"rank": rank + 1, "similarity": float(similarities[i]), "report": bank[i]}
            for rank, i in enumerate(order)
        ],
    }


def _print_result(record: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(record), flush=True)
        return
    lines = [record["file"], f"  report: {record['report']}"]
    lines.append(f"  findings: {describe_findings(reports.parse_result(record['report']))}")
    if record["top_k"]:
        lines.append("  nearest bank reports (cosine similarity):")
        lines += [
            f"    {m['rank']}. {m['similarity']:+.3f}  {m['report']}" for m in record["top_k"]
        ]
    else:
        lines.append("  nearest bank reports: none (no report bank)")
    if "grounding" in record:
        if not record["grounding"]:
            lines.append("  where: no lesion in the report")
        for g in record["grounding"]:
            name = f"{reports.SEGMENT_NAMES[g['segment']]} {g['percent']:g}%"
            if g["box"] is None:
                lines.append(f"  where: {name}: no readable box")
            else:
                y0, x0, y1, x1 = g["box"]
                lines.append(f"  where: {name}: frame {g['frame']}, box y {y0:.3f}-{y1:.3f}, "
                             f"x {x0:.3f}-{x1:.3f}")
    if "attention_png" in record:
        lines.append(f"  attention maps: {record['attention_png']}, {record['attention_gif']}")
    elif "attention_error" in record:
        lines.append(f"  attention maps: none ({record['attention_error']})")
    print("\n".join(lines), flush=True)


def _print_error(path: str, reason: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"file": path, "error": reason}), flush=True)
    else:
        print(f"skipped {path}: {reason}", file=console.terminal(), flush=True)


def _attention_files(
    run: inference.Run, clip: np.ndarray, tokens: np.ndarray, out_dir: str, index: int, path: str,
    grounded: Sequence[inference.GroundedLesion] = (),
) -> dict:
    """Writes the attention maps of file number `index`, with the box of each sentence's
    lesion where `grounded` has it; their paths (or why there are none)."""
    sentences = attention_maps.report_attention(run, clip, tokens)
    if not sentences:
        return {"attention_error": "the generated report is empty"}
    where = {lesion.segment: lesion.box for lesion in grounded}
    boxes = []
    for sentence in sentences:
        named = [s for s in reports.parse(sentence.text).lesions if where.get(s) is not None]
        boxes.append(where[named[0]] if named else None)
    stem = os.path.splitext(os.path.basename(path))[0] or "file"
    prefix = os.path.join(out_dir, f"{index:03d}_{stem}")
    png, gif = attention_maps.save_attention_maps(clip, sentences, prefix, boxes=boxes)
    return {"attention_png": png, "attention_gif": gif}


def report_lesions(report: str) -> list[tuple[str, float]]:
    """The (segment, percent) of each lesion a generated report states, in SEGMENTS order."""
    lesions = reports.parse(report).lesions
    return [(segment, lesion.stenosis) for segment, lesion in lesions.items()
            if lesion.stenosis > 0]


def _grounding_record(grounded: Sequence[inference.GroundedLesion]) -> dict:
    return {"grounding": [
        {"segment": g.segment, "percent": g.percent, "phrase": g.phrase, "frame": g.frame,
         "box": None if g.box is None else [round(float(v), 4) for v in g.box]}
        for g in grounded
    ]}


def _try_load(load_clip: Callable[[str], np.ndarray], path: str):
    """(the clip of `path`, None), or (None, why it cannot be used): a bad file must not
    stop the others."""
    from input_pipeline import video_io

    try:
        return load_clip(path), None
    except video_io.VideoError as e:
        return None, str(e)
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"


def _similarities(video_emb: np.ndarray, bank_emb: np.ndarray | None) -> np.ndarray:
    """[n, R] cosine similarities of the embeddings to the bank's ([n, 0] without one)."""
    if bank_emb is None:
        return np.zeros((len(video_emb), 0), np.float32)
    return video_emb @ bank_emb.T


def run_files(run: inference.Run, files: Sequence[str], args: argparse.Namespace) -> int:
    """Processes `files` with the flags of `args`, printing each chunk's results in file order.

    Returns how many files were processed.
    """
    bank = load_bank(run, args.bank) or []
    bank_emb = inference.embed_texts(run, bank) if bank else None  # [R, E]
    top_k = min(args.top_k, len(bank))
    load_clip = make_clip_loader(run)
    processed = 0
    for start in range(0, len(files), FILES_PER_CHUNK):
        chunk = files[start : start + FILES_PER_CHUNK]
        outcomes: list[dict] = []  # per file of the chunk: a result or an error record
        clips = []
        for path in chunk:
            clip, error = _try_load(load_clip, path)
            if error is None:
                clips.append(clip)
                outcomes.append({"file": path})
            else:
                outcomes.append({"file": path, "error": error})
        if clips:
            batch = np.stack(clips)  # [n, T, H, W, 1]
            video_emb = inference.embed_videos(run, batch, FILES_PER_CHUNK)  # [n, E]
            similarities = _similarities(video_emb, bank_emb)  # [n, R]
            generated = inference.generate_reports(
                run, batch, beam_size=args.beam, batch_size=FILES_PER_CHUNK
            )
            grounded = (
                inference.ground_lesions(run, batch, [report_lesions(t) for t in generated.texts],
                                         batch_size=FILES_PER_CHUNK)
                if args.ground else [[] for _ in clips]
            )
        loaded = [(position, o) for position, o in enumerate(outcomes) if "error" not in o]
        for i, (position, outcome) in enumerate(loaded):
            path = outcome["file"]
            outcome.update(
                _result_record(path, generated.texts[i], similarities[i], bank, top_k, run.step)
            )
            if args.ground:
                outcome.update(_grounding_record(grounded[i]))
            if args.attention:
                index = start + position
                outcome.update(
                    _attention_files(
                        run, batch[i], generated.tokens[i], args.attention, index, path,
                        grounded[i],
                    )
                )
        for outcome in outcomes:
            if "error" in outcome:
                _print_error(outcome["file"], outcome["error"], args.json)
            else:
                _print_result(outcome, args.json)
                processed += 1
    return processed


def run_study(run: inference.Run, files: Sequence[str], args: argparse.Namespace) -> int:
    """The files as one study: one result (``file``: the files joined by ', ', ``files``:
    the ones used). Returns 1 when any file was used, else 0."""
    bank = load_bank(run, args.bank) or []
    load_clip = make_clip_loader(run)
    clips, used = [], []
    for path in files:
        clip, error = _try_load(load_clip, path)
        if error is None:
            clips.append(clip)
            used.append(path)
        else:
            _print_error(path, error, args.json)
    if not clips:
        return 0
    study = np.stack(clips)[None]  # [1, V, T, H, W, 1]
    mask = np.ones(study.shape[:2], bool)
    video_emb = inference.embed_videos(run, study, 1, video_mask=mask)  # [1, E]
    similarities = _similarities(video_emb, inference.embed_texts(run, bank) if bank else None)
    generated = inference.generate_reports(run, study, beam_size=args.beam, batch_size=1,
                                           video_mask=mask)
    record = _result_record(", ".join(used), generated.texts[0], similarities[0], bank,
                            min(args.top_k, len(bank)), run.step)
    record["files"] = used
    _print_result(record, args.json)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deepcoro_jax.tools.infer",
        description="Reports, findings and nearest bank reports for raw angiography files.",
    )
    inference.add_run_arguments(parser)
    parser.add_argument("--bank", help="CSV with a 'report' column (default: the train split)")
    parser.add_argument("--top_k", type=positive_int, default=5, help="bank reports to show")
    parser.add_argument("--json", action="store_true", help="one JSON object per file")
    parser.add_argument("--attention", metavar="OUTDIR", help="write attention maps here")
    parser.add_argument("--beam", type=positive_int, default=1, help="beam size (1: greedy)")
    parser.add_argument(
        "--study", action="store_true", help="the files are one study: one report for all"
    )
    parser.add_argument(
        "--ground", action="store_true",
        help="where each lesion of the report is: its box (runs trained with location tokens)",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="DICOM, AVI, MP4 or .npy")
    args = parser.parse_args(argv)
    if args.study and args.attention:
        parser.error("--attention draws one video's maps; it does not combine with --study")
    if args.study and args.ground:
        parser.error("--ground locates lesions in one video's frames; it does not combine "
                     "with --study")
    for name in ("workdir", "bank", "attention"):
        setattr(args, name, paths.resolve(getattr(args, name)) if getattr(args, name) else None)
    args.files = [paths.resolve(f) for f in args.files]
    inference.start_tool(args, command_line=argv is None)
    try:
        run = inference.load_run(args.workdir, args.checkpoint)
        if not args.json:
            print(f"run {args.workdir}, checkpoint {run.step}", flush=True)
        processed = (run_study if args.study else run_files)(run, args.files, args)
    except (OSError, ValueError) as e:
        print(f"{parser.prog}: error: {e}", file=console.terminal())
        return 2
    if not processed:
        print(f"{parser.prog}: no file could be processed", file=console.terminal())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
