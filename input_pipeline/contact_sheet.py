"""One pass of the training input pipeline, and a contact sheet of what it feeds the model.

    python -m input_pipeline.contact_sheet --config configs/multitask.py:runlocal \
        --out runs/demo/contact_sheet.png

Resolves the data exactly as the trainer does (the prepared folder of
``config.input.data_dir``, or the synthetic set, generated and prepared on first
use), runs the config's training pp string over one epoch of the train split,
prints its throughput, and draws a few frames of a few augmented clips with
their report text. A quick look that the data path works before training.
Library log lines go to ``log.txt`` beside the PNG (``--verbose``: the terminal).
"""

from __future__ import annotations

import os
import sys
import textwrap
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from deepcoro_jax import console, paths

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, as for launch.py")
_OUT = flags.DEFINE_string("out", "contact_sheet.png", "Where the PNG goes.")
_VIDEOS = flags.DEFINE_integer("videos", 4, "Clips on the sheet.")
_FRAMES = flags.DEFINE_integer("frames", 6, "Frames per clip on the sheet.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show every library log line on the terminal.")
flags.mark_flag_as_required("config")


def draw(videos: np.ndarray, reports: list[str], path: str, num_frames: int) -> None:
    """Writes a grid: one row per clip [T, H, W, 1] in [-1, 1], `num_frames` evenly spaced."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(videos)
    fig, axes = plt.subplots(
        rows, num_frames, figsize=(1.6 * num_frames, 2.3 * rows), squeeze=False
    )
    for row, (video, report) in enumerate(zip(videos, reports, strict=True)):
        picks = np.linspace(0, video.shape[0] - 1, num_frames).round().astype(int)
        for col, t in enumerate(picks):
            ax = axes[row, col]
            ax.imshow(video[t, ..., 0], cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"t={t}", fontsize=7)
        text = textwrap.shorten(report, width=260, placeholder=" ...")
        axes[row, 0].annotate(
            "\n".join(textwrap.wrap(text, 110)),
            xy=(0, -0.12),
            xycoords="axes fraction",
            va="top",
            fontsize=6,
        )
    fig.subplots_adjust(left=0.02, right=0.98, top=0.95, bottom=0.05, hspace=0.7, wspace=0.05)
    paths.Path(path).parent.mkdir(parents=True, exist_ok=True)
    with paths.Path(path).open("wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)


def main(argv: list[str]) -> None:
    del argv
    out = paths.resolve(_OUT.value)
    console.start(verbose=_VERBOSE.value)
    try:
        _contact_sheet(paths.resolve_config(_CONFIG.value), out)
    except Exception as e:  # one line on the terminal, the traceback in the log
        sys.exit(console.fatal(e))


def _contact_sheet(config, out: str) -> None:
    from input_pipeline import data_cache, dataset_format, pipeline

    console.attach(os.path.dirname(out))
    data_dir = data_cache.resolve_data_dir(config.input)
    batch_size = config.input.batch_size
    pp = f"{config.input.video_pp}|keep('video', 'frame_mask', 'report')"
    stream = pipeline.TrainIterator(
        data_dir,
        config.input.split,
        pp,
        batch_size,
        seed=config.seed,
    )
    num_examples = dataset_format.num_examples(data_dir, config.input.split)
    num_batches = max(1, num_examples // batch_size)
    start = time.perf_counter()
    first = next(stream)
    for _ in range(num_batches - 1):
        next(stream)
    stream.close()
    seconds = time.perf_counter() - start
    clips = num_batches * batch_size
    print(
        f"pipeline: {clips} clips of shape {first['video'].shape[1:]} from {data_dir} "
        f"in {seconds:.1f} s ({clips / seconds:.1f} clips/s, value range "
        f"[{first['video'].min():.2f}, {first['video'].max():.2f}])"
    )
    count = min(_VIDEOS.value, batch_size)
    reports = [r.decode() for r in first["report"][:count]]
    draw(first["video"][:count], reports, out, _FRAMES.value)
    print(f"contact sheet: {out}")


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=console.parse_flags))
