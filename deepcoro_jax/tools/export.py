"""Command line: video and report embeddings of a prepared split, for downstream probes.

Usage:
  python -m deepcoro_jax.tools.export --workdir DIR --split S --out FILE.npz
      [--data PREPARED] [--checkpoint STEP] [--batch_size 32]

``--data`` defaults to the prepared dataset the run trained on.

Writes one ``.npz`` with a row per video of the split, every video exactly
once, ordered by manifest row:

  video_emb      float32 [N, E]  L2-normalised video embeddings of the run's eval
                                 clip (``input.eval_video_pp``)
  text_emb       float32 [N, E]  L2-normalised embeddings of each video's report
  row            int32 [N]       the manifest row (0-based)
  study_id, path, report  str [N]
  label/<name>   float32 (NaN when missing) or str [N], every label column
                 ``prepare`` carried
  checkpoint     int64 scalar, the step of the parameters

Read it with ``np.load(FILE)`` (no pickles). Runs in one process on every
local device. Not for: raw files (``infer.py``), evaluation metrics
(``evaluators/``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from deepcoro_jax import console, paths
from deepcoro_jax.tools import inference
from deepcoro_jax.tools.inference import positive_int

TEXT_KEYS = ("study_id", "path", "report")
LABEL_PREFIX = "label/"


def _host_column(values: np.ndarray) -> np.ndarray:
    """A batch column as NumPy: TF strings (bytes) become str."""
    if values.dtype.kind in "OS":
        return np.asarray([v.decode("utf-8") for v in values], dtype=str)
    return values


def export_embeddings(
    run: inference.Run, data_dir: str, split: str, batch_size: int = 32
) -> dict[str, np.ndarray]:
    """The arrays of the module docstring for `split` of the prepared dataset `data_dir`.

    Raises RuntimeError if the split was not covered exactly once.
    """
    from input_pipeline import dataset_format, pipeline

    meta = dataset_format.load_meta(data_dir)
    label_keys = [f"{LABEL_PREFIX}{name}" for name in meta.label_columns]
    kept = ["video", "row", *TEXT_KEYS, *label_keys]
    pp = run.video_pp + ("|flatten_labels" if label_keys else "")
    pp += "|keep(" + ", ".join(repr(k) for k in kept) + ")"
    dataset = pipeline.make_eval_dataset(data_dir, split, pp, batch_size)
    columns: dict[str, list[np.ndarray]] = {k: [] for k in ["video_emb", *kept[1:]]}
    for batch in dataset.as_numpy_iterator():
        real = np.asarray(batch[pipeline.MASK_KEY], bool)
        if not real.any():
            continue
        columns["video_emb"].append(inference.embed_videos(run, batch["video"][real], batch_size))
        for key in kept[1:]:
            columns[key].append(_host_column(batch[key][real]))
    if not columns["row"]:
        raise ValueError(f"split {split!r} of {data_dir} holds no examples")
    out = {k: np.concatenate(v) for k, v in columns.items()}
    order = np.argsort(out["row"], kind="stable")
    out = {k: v[order] for k, v in out.items()}
    expected = dataset_format.num_examples(data_dir, split)
    if len(out["row"]) != expected or np.any(out["row"][1:] == out["row"][:-1]):
        raise RuntimeError(
            f"export: split {split!r} has {expected} examples, but {len(out['row'])} rows "
            f"({len(np.unique(out['row']))} distinct) were embedded"
        )
    candidates, index = np.unique(out["report"], return_inverse=True)
    out["text_emb"] = inference.embed_texts(run, candidates.tolist())[index]
    out["row"] = out["row"].astype(np.int32)
    out["checkpoint"] = np.int64(run.step)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deepcoro_jax.tools.export",
        description="Video and report embeddings of a prepared split, as one .npz.",
    )
    inference.add_run_arguments(parser)
    parser.add_argument("--data", help="a prepared dataset folder (default: the run's own)")
    parser.add_argument("--split", required=True, help="the split to embed, e.g. test")
    parser.add_argument("--out", required=True, help="the .npz file to write")
    parser.add_argument("--batch_size", type=positive_int, default=32, help="clips per batch")
    args = parser.parse_args(argv)
    args.workdir, args.out = paths.resolve(args.workdir), paths.resolve(args.out)
    args.data = paths.resolve(args.data) if args.data else None
    inference.start_tool(args, command_line=argv is None)
    if not args.out.endswith(".npz"):
        print(f"{parser.prog}: error: --out {args.out} must end with .npz", file=console.terminal())
        return 2
    try:
        run = inference.load_run(args.workdir, args.checkpoint)
        arrays = export_embeddings(run, args.data or run.data_dir, args.split, args.batch_size)
    except (OSError, ValueError) as e:
        print(f"{parser.prog}: error: {e}", file=console.terminal())
        return 2
    with paths.Path(args.out).open("wb") as f:
        np.savez(f, **arrays)
    num_videos, width = arrays["video_emb"].shape
    print(
        f"wrote {args.out}: {num_videos} videos of split {args.split!r}, embeddings of width "
        f"{width}, checkpoint {run.step}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
