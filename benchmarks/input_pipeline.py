"""Input benchmark: prepare throughput, training-pipeline throughput, and the reference loader.

Prints one JSON object per line, ``{"name", "value", "unit"}``; the last line is
``pipeline_vs_reference_loader_per_core`` (target >= 10). Steps, all on the same
videos:

1. ``input_pipeline.synthetic`` writes ``--num_studies`` studies of AVI (MJPEG)
   videos at the real size, 512x512, with ``--num_frames MIN MAX`` frames each
   (40-120 by default, the usual range of real angiograms). Not timed.
2. For each of ``--frame_formats`` (JPEG q95, then prepare's default PNG),
   ``prepare`` writes 256x256 shards with ``--workers`` processes:
   ``prepare_videos_per_s/<fmt>``. The source AVIs are MJPEG, so JPEG shards
   add little loss; PNG shards are lossless but their decoding dominates.
3. The training pipeline (``make_train_dataset`` with ``TRAIN_PP``: 16 frames 2
   apart, random resized crop to 224, brightness/contrast/gamma jitter, value
   range, both tokenisations) runs ``--clips`` clips after a warm-up:
   ``train_pipeline_clips_per_s/<fmt>`` (wall clock, all cores) and
   ``train_pipeline_clips_per_core_s/<fmt>`` (clips per CPU-second). The same
   with the optional rotation/scale jitter op added (``ROTATION_PP``):
   ``train_pipeline_with_rotation_clips_per_core_s/<fmt>``. And the recipe's own
   train pp (``default_recipe_pp``): ``default_recipe_clips_per_core_s/<fmt>``.
4. The PyTorch reference's loader method, in this process: decode the whole
   AVI with PyAV (straight to grayscale), resize every frame to 224x224 (PIL
   bilinear; OpenCV is not installed), then take 16 frames 2 apart from a
   random start, for ``--reference_clips`` clips:
   ``reference_loader_clips_per_core_s``.
5. ``pipeline_vs_reference_loader_per_core/<fmt>``: the ratio of the per-core
   rates of 3 and 4; the last line repeats it for the first format (JPEG).

Per-core rates divide clips by the CPU time the process used while timing
(``time.process_time``, all threads), so a busy shared machine does not skew
them; the pipeline's CPU time includes tf.data's own threads.

Usage::

    python -m benchmarks.input_pipeline [--num_studies 4] [--clips 96] [--workdir DIR]

Not here: model and training-step speed (``benchmarks/models.py``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence

import av
import numpy as np
from PIL import Image

from input_pipeline import pipeline, prepare, synthetic

CLIP_FRAMES, CLIP_STRIDE, CLIP_SIZE = 16, 2, 224
TRAIN_PP = (
    f"decode_sample_frames({CLIP_FRAMES}, stride={CLIP_STRIDE})|random_resized_crop({CLIP_SIZE})"
    "|intensity_jitter()|value_range(-1, 1)|tokenize(64)|tokenize_caption(128)"
    "|keep('video', 'frame_mask', 'text_ids', 'text_mask', 'caption_in', 'caption_out',"
    " 'caption_mask')"
)
ROTATION_PP = TRAIN_PP.replace("|intensity_jitter()", "|scale_rotate_jitter()|intensity_jitter()")


def default_recipe_pp() -> str:
    """The recipe's own train pp (configs/multitask.py: 16 frames of 224 px with its
    crop, zoom, rotation and intensity jitter) with TRAIN_PP's tokenisation."""
    from configs import multitask

    video_pp = multitask.get_config().input.video_pp
    return video_pp + TRAIN_PP[TRAIN_PP.index("|tokenize(") :]


def emit(name: str, value: float, unit: str) -> None:
    print(json.dumps({"name": name, "value": round(value, 4), "unit": unit}), flush=True)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def avi_paths(manifest: str) -> list[str]:
    """The video files of a synthetic manifest (paths relative to its folder)."""
    with open(manifest, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="α"))
    root = os.path.dirname(manifest)
    return [os.path.join(root, row["FileName"]) for row in rows]


def reference_clip(path: str, rng: np.random.Generator) -> np.ndarray:
    """The reference loader: decode every frame, resize every frame, then sample."""
    with av.open(path) as container:
        frames = [
            np.asarray(
                Image.fromarray(frame.to_ndarray(format="gray")).resize(
                    (CLIP_SIZE, CLIP_SIZE), Image.Resampling.BILINEAR
                )
            )
            for frame in container.decode(video=0)
        ]
    video = np.stack(frames)  # [T, 224, 224]
    span = (CLIP_FRAMES - 1) * CLIP_STRIDE + 1
    start = int(rng.integers(0, max(len(video) - span, 0) + 1))
    indices = np.minimum(start + CLIP_STRIDE * np.arange(CLIP_FRAMES), len(video) - 1)
    return video[indices].astype(np.float32) / 127.5 - 1.0  # [16, 224, 224]


def measure_reference(paths: Sequence[str], clips: int, seed: int) -> float:
    """Clips per CPU-second of the reference loader over `clips` clips (cycling `paths`)."""
    rng = np.random.default_rng(seed)
    reference_clip(paths[0], rng)  # warm-up (imports, codec set-up)
    cpu_start = time.process_time()
    for index in range(clips):
        clip = reference_clip(paths[index % len(paths)], rng)
        assert clip.shape == (CLIP_FRAMES, CLIP_SIZE, CLIP_SIZE)
    return clips / (time.process_time() - cpu_start)


def measure_pipeline(
    data_dir: str, pp: str, clips: int, batch_size: int, seed: int
) -> tuple[float, float]:
    """(clips per wall-second, clips per CPU-second) of the training pipeline with `pp`."""
    iterator = pipeline.TrainIterator(data_dir, "train", pp, batch_size, seed=seed)
    for _ in range(3):  # warm-up: tracing, autotuning, filling the buffers
        batch = next(iterator)
    assert batch["video"].shape == (batch_size, CLIP_FRAMES, CLIP_SIZE, CLIP_SIZE, 1)
    num_batches = max(1, clips // batch_size)
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
        next(iterator)
    wall, cpu = time.perf_counter() - wall_start, time.process_time() - cpu_start
    return num_batches * batch_size / wall, num_batches * batch_size / cpu


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_studies", type=int, default=4, help="synthetic studies")
    parser.add_argument(
        "--num_frames", type=int, nargs=2, default=[40, 120], metavar=("MIN", "MAX")
    )
    parser.add_argument(
        "--frame_formats",
        default="jpeg,png",
        help="shard frame formats; the last line is the first's",
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="prepare's")
    parser.add_argument("--clips", type=int, default=96, help="timed clips per pipeline")
    parser.add_argument("--reference_clips", type=int, default=12, help="timed reference clips")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="keep the videos and shards here (default: a temp dir)")
    args = parser.parse_args(argv)
    frame_formats = [f.strip() for f in args.frame_formats.split(",") if f.strip()]
    if not frame_formats:
        parser.error("--frame_formats names no format")

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        start = time.perf_counter()
        manifest = str(
            synthetic.generate(
                os.path.join(workdir, "videos"),
                args.num_studies,
                args.seed,
                size=512,
                num_frames=tuple(args.num_frames),
                formats=("avi",),
                workers=args.workers,
            )
        )
        paths = avi_paths(manifest)
        log(f"wrote {len(paths)} AVI videos in {time.perf_counter() - start:.0f}s")

        per_core, recipe = {}, {}
        for frame_format in frame_formats:
            data_dir = os.path.join(workdir, f"prepared_{frame_format}")
            start = time.perf_counter()
            report = prepare.prepare(
                manifest,
                data_dir,
                size=256,
                workers=args.workers,
                frame_format=frame_format,
                overwrite=True,
            )
            seconds = time.perf_counter() - start
            if report["failed"] or not report["written"].get("train"):
                raise RuntimeError(f"prepare wrote {report['written']}, failed {report['failed']}")
            written = sum(report["written"].values())
            emit(f"prepare_videos_per_s/{frame_format}", written / seconds, "videos/s")
            emit(f"prepare_bytes_per_video/{frame_format}", report["bytes_per_video"], "bytes")

            wall_rate, core_rate = measure_pipeline(
                data_dir, TRAIN_PP, args.clips, args.batch_size, args.seed
            )
            emit(f"train_pipeline_clips_per_s/{frame_format}", wall_rate, "clips/s")
            emit(f"train_pipeline_clips_per_core_s/{frame_format}", core_rate, "clips/s/core")
            per_core[frame_format] = core_rate
            _, rotation_rate = measure_pipeline(
                data_dir, ROTATION_PP, args.clips, args.batch_size, args.seed
            )
            emit(
                f"train_pipeline_with_rotation_clips_per_core_s/{frame_format}",
                rotation_rate,
                "clips/s/core",
            )
            _, recipe_rate = measure_pipeline(
                data_dir, default_recipe_pp(), args.clips, args.batch_size, args.seed
            )
            emit(f"default_recipe_clips_per_core_s/{frame_format}", recipe_rate, "clips/s/core")
            recipe[frame_format] = recipe_rate

        reference_rate = measure_reference(paths, args.reference_clips, args.seed)
        emit("reference_loader_clips_per_core_s", reference_rate, "clips/s/core")
        for frame_format, rate in per_core.items():
            emit(
                f"pipeline_vs_reference_loader_per_core/{frame_format}", rate / reference_rate, "x"
            )
            emit(
                f"default_recipe_vs_reference_loader_per_core/{frame_format}",
                recipe[frame_format] / reference_rate,
                "x",
            )
        # prepare's default shard format (PNG) with the recipe's pp: the headline.
        default_format = prepare.DEFAULT_FRAME_FORMAT
        if default_format in recipe:
            emit("default_recipe_clips_per_core_s", recipe[default_format], "clips/s/core")
            emit(
                "default_recipe_vs_reference_loader_per_core",
                recipe[default_format] / reference_rate,
                "x",
            )
        emit(
            "pipeline_vs_reference_loader_per_core",
            per_core[frame_formats[0]] / reference_rate,
            "x",
        )


if __name__ == "__main__":
    main()
