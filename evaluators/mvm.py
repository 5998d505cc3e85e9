"""Masked video modelling evaluator: reconstruction quality on held-out videos.

For: ``Evaluator`` (``type='mvm'`` in ``config.evals``), which masks every
video of a split with a mask of its own, reconstructs the masked tubelets with
the model's MVM decoder and reports

- ``mse``: the training loss's definition (``losses.mvm_loss``): the squared
  error of each masked tubelet against its target (normalised per tubelet when
  ``model.normalize_mvm_target``, raw pixels otherwise), averaged over its
  pixels, then over every masked tubelet of the split;
- ``pixel_mse`` and ``psnr``: the same in pixel space. With normalised targets
  the prediction is taken back to pixels with the TRUE masked tubelet's own
  mean and standard deviation (as VideoMAE visualises its reconstructions: the
  decoder never predicts a tubelet's brightness or contrast, only its pattern).
  ``psnr = 10 log10(peak^2 / pixel_mse)`` with ``peak`` the width of
  ``pixel_range`` (the eval pp's ``value_range``: 2 for [-1, 1]);
- ``num_tubelets``: the masked tubelets averaged over.

Each video's mask comes from its own rng, ``jax.random.fold_in(key(seed),
row)`` with ``row`` its manifest row, so the numbers do not depend on the batch
size, the device count or the process count. Process 0 writes
``<workdir>/mvm/<name>_<step>.png``: for the first ``num_images`` videos of the
split (by manifest row), a row each of the original frames, the masked input
(masked tubelets mid-grey) and the reconstruction (visible tubelets as they
were, masked ones predicted), for ``num_frames_shown`` frames spread over the clip.

Not for: the training loss (``deepcoro_jax/losses.py``), masking and targets
(``deepcoro_jax/models/mvm.py``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deepcoro_jax import paths
from deepcoro_jax.models.mvm import patchify, unpatchify
from evaluators import common

TARGET_VARIANCE_EPS = 1e-6  # models/mvm.py tubelet_targets: (x - mean) / sqrt(var + eps)
FOLDER = "mvm"
ROW_TITLES = ("original", "masked", "reconstruction")


def example_mask_rng(seed: int, row: jax.Array) -> jax.Array:
    """The 'mask' rng of the video with manifest row `row`."""
    return jax.random.fold_in(jax.random.key(seed), row)


def pixel_predictions(pred: jax.Array, true_tubelets: jax.Array, normalized: bool) -> jax.Array:
    """Predicted tubelets [..., P] in pixel space.

    With normalised targets, un-normalised with the true tubelets' own mean and
    standard deviation (each over its P pixels); raw-pixel predictions are returned as is.
    """
    if not normalized:
        return pred
    mean = true_tubelets.mean(axis=-1, keepdims=True)
    std = jnp.sqrt(true_tubelets.var(axis=-1, keepdims=True) + TARGET_VARIANCE_EPS)
    return pred * std + mean


def psnr(pixel_mse: float, peak_to_peak: float) -> float:
    """Peak signal-to-noise ratio in dB, 10 log10(peak^2 / mse); inf for a perfect match."""
    if pixel_mse < 0 or peak_to_peak <= 0:
        raise ValueError(f"psnr: need pixel_mse >= 0 and peak_to_peak > 0, got {pixel_mse}, "
                         f"{peak_to_peak}")
    if pixel_mse == 0:
        return math.inf
    return float(10.0 * np.log10(peak_to_peak**2 / pixel_mse))


def tubelet_errors(
    pred: jax.Array,
    target: jax.Array,
    video: jax.Array,
    masked_indices: jax.Array,
    patch_size: Sequence[int],
    normalized: bool,
) -> dict[str, jax.Array]:
    """Per-example error sums over the masked tubelets.

    Args:
        pred, target: [B, M, P] the model's 'mvm_pred' and 'mvm_target'.
        video: [B, T, H, W, C] the input the targets were cut from.
        masked_indices: [B, M] the masked tubelets' token indices.
        patch_size: the encoder's (pt, ph, pw).
        normalized: whether the targets are per-tubelet normalised.

    Returns:
        'mse_sum' and 'pixel_mse_sum' [B] (per-tubelet mean squared errors,
        summed over the example's tubelets), 'num_tubelets' [B] and
        'pixel_pred' [B, M, P] (``pixel_predictions``).
    """
    true_tubelets = jnp.take_along_axis(
        patchify(video.astype(jnp.float32), patch_size), masked_indices[:, :, None], axis=1
    )  # [B, M, P]
    pixel_pred = pixel_predictions(pred, true_tubelets, normalized)
    mse = jnp.mean(jnp.square(pred - target), axis=-1)  # [B, M]
    pixel_mse = jnp.mean(jnp.square(pixel_pred - true_tubelets), axis=-1)  # [B, M]
    return {
        "mse_sum": mse.sum(axis=1),
        "pixel_mse_sum": pixel_mse.sum(axis=1),
        "num_tubelets": jnp.full(pred.shape[0], pred.shape[1], jnp.float32),
        "pixel_pred": pixel_pred,
    }


@common.register("mvm")
class Evaluator(common.Evaluator):
    """MVM reconstruction MSE, pixel MSE and PSNR on a split, and a PNG of a few videos.

    See the module docstring for the metrics and the masks (the ``reconstruct``
    predict function, one mask rng per video). ``pixel_range`` is the range of
    the eval pp's pixel values (its ``value_range``): PSNR's peak is its width,
    and the PNG shows that range from black to white.
    """

    PREDICT = ("reconstruct",)
    HEADLINE = ("mse", "psnr")

    def __init__(
        self,
        predict_fns: Mapping[str, common.PredictFn],
        spec: common.EvalSpec,
        *,
        seed: int = 0,
        num_images: int = 4,
        num_frames_shown: int = 4,
        pixel_range: Sequence[float] = (-1.0, 1.0),
        **base: Any,
    ):
        super().__init__(predict_fns, spec, **base)
        where = self.where
        if num_images < 0:
            raise ValueError(f"{where}.num_images={num_images} must be at least 0")
        if num_frames_shown < 1:
            raise ValueError(f"{where}.num_frames_shown={num_frames_shown} must be at least 1")
        if len(pixel_range) != 2 or not pixel_range[0] < pixel_range[1]:
            raise ValueError(f"{where}.pixel_range={tuple(pixel_range)} must be (low, high) "
                             "with low < high")
        common.require_split(spec, self.split)
        self.num_images, self.num_frames_shown = num_images, num_frames_shown
        self.pixel_range = (float(pixel_range[0]), float(pixel_range[1]))
        patch_size, normalized = spec.patch_size, spec.normalize_mvm_target
        fill = (self.pixel_range[0] + self.pixel_range[1]) / 2
        reconstruct_fn = self.predict_fns["reconstruct"]

        def reconstruct(params, video, row):
            """Per-example masks: each video [T, H, W, C] reconstructed with its own rng."""
            mask_rng = jax.vmap(lambda r: example_mask_rng(seed, r))(row)  # [B] keys
            out = reconstruct_fn(params, {"video": video, "mask_rng": mask_rng})
            masked = out["mvm_masked_indices"]  # [B, M]
            errors = tubelet_errors(
                out["mvm_pred"], out["mvm_target"], video, masked, patch_size, normalized
            )
            return errors, masked

        def score(params, batch):
            errors, _ = reconstruct(params, batch["video"], batch[common.ROW_KEY])
            errors.pop("pixel_pred")
            return errors

        def display(params, video, row):
            errors, masked = reconstruct(params, video, row)
            tubelets = patchify(video.astype(jnp.float32), patch_size)  # [B, N, P]
            rows = jnp.arange(video.shape[0])[:, None]  # [B, 1]
            grid = tuple(n // p for n, p in zip(video.shape[1:4], patch_size, strict=True))
            masked_input = tubelets.at[rows, masked].set(fill)
            reconstruction = tubelets.at[rows, masked].set(errors["pixel_pred"])
            return (unpatchify(masked_input, patch_size, grid),
                    unpatchify(reconstruction, patch_size, grid))  # [B, T, H, W, C] x2

        self._score = common.make_predict(score, spec.mesh)
        self._display = common.jit_replicated(display, spec.mesh)

    def run(self, params: Any, step: int) -> dict[str, float]:
        out = common.predict_split(
            self.spec, self._score, params, split=self.split, pp=self.spec.pp(),
            batch_size=self.batch_size,
        )
        num_tubelets = float(np.sum(out["num_tubelets"], dtype=np.float64))
        mse = float(np.sum(out["mse_sum"], dtype=np.float64)) / num_tubelets
        pixel_mse = float(np.sum(out["pixel_mse_sum"], dtype=np.float64)) / num_tubelets
        peak_to_peak = self.pixel_range[1] - self.pixel_range[0]
        if self.num_images:
            self._write_png(params, out[common.ROW_KEY][: self.num_images], step)
        return {
            "mse": mse,
            "pixel_mse": pixel_mse,
            "psnr": psnr(pixel_mse, peak_to_peak),
            "num_tubelets": num_tubelets,
        }

    def png_path(self, step: int) -> str:
        return os.path.join(self.spec.workdir, FOLDER, f"{self.name}_{step}.png")

    def _shown_videos(self, rows: np.ndarray) -> np.ndarray:
        """The eval clips [n, T, H, W, C] of `rows`, read whole by every process."""
        from input_pipeline import pipeline

        dataset = pipeline.make_eval_dataset(
            self.spec.data_dir, self.split, self.spec.pp(), len(rows),
            process_index=0, process_count=1,
        )
        wanted = {int(row): i for i, row in enumerate(rows)}
        videos: dict[int, np.ndarray] = {}
        for batch in dataset.as_numpy_iterator():
            for video, row, real in zip(
                batch["video"], batch[common.ROW_KEY], batch[common.MASK_KEY], strict=True
            ):
                if real and int(row) in wanted:
                    videos[int(row)] = video
            if len(videos) == len(wanted):
                break
        return np.stack([videos[int(row)] for row in rows])

    def _write_png(self, params: Any, rows: np.ndarray, step: int) -> None:
        videos = self._shown_videos(rows)
        # Every process runs the reconstruction (a collective); process 0 draws it.
        padded = -len(rows) % self.spec.mesh.size
        videos_in = np.concatenate([videos, np.zeros((padded, *videos.shape[1:]), videos.dtype)])
        rows_in = np.concatenate([rows, np.zeros(padded, rows.dtype)])
        masked_input, reconstruction = jax.device_get(self._display(
            params,
            common.global_array(videos_in, self.spec),
            common.global_array(rows_in, self.spec),
        ))
        if not self.spec.is_main_process:
            return
        strips = [(videos[i], masked_input[i], reconstruction[i]) for i in range(len(rows))]
        draw_reconstructions(strips, rows, self.num_frames_shown, self.pixel_range,
                             self.png_path(step))


def draw_reconstructions(
    strips: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    rows: Sequence[int],
    num_frames_shown: int,
    pixel_range: tuple[float, float],
    path: str,
) -> None:
    """Writes a PNG: per video, rows original / masked / reconstruction of a few frames.

    strips: per video, (original, masked input, reconstruction), each [T, H, W, C]
    with C 1 (grey) or 3 (RGB); rows: their manifest rows (row labels).
    """
    # Imported here, as the other evaluators' heavy libraries are: only writing the
    # figure needs matplotlib.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    num_frames = strips[0][0].shape[0]
    frames = np.unique(np.linspace(0, num_frames - 1, min(num_frames_shown, num_frames))
                       .round().astype(int))
    low, high = pixel_range
    figure = Figure(figsize=(1.6 * len(frames), 1.6 * 3 * len(strips)))
    FigureCanvasAgg(figure)
    axes = figure.subplots(3 * len(strips), len(frames), squeeze=False)
    for video_index, (strip, row) in enumerate(zip(strips, rows, strict=True)):
        for kind, (title, video) in enumerate(zip(ROW_TITLES, strip, strict=True)):
            for column, frame in enumerate(frames):
                ax = axes[3 * video_index + kind, column]
                image = (np.clip(video[frame], low, high) - low) / (high - low)  # [H, W, C]
                ax.imshow(image[..., 0] if image.shape[-1] == 1 else image,
                          cmap="gray", vmin=0.0, vmax=1.0)
                ax.set_xticks([])
                ax.set_yticks([])
                if column == 0:
                    ax.set_ylabel(f"row {row}\n{title}", fontsize=7)
                if video_index == 0 and kind == 0:
                    ax.set_title(f"frame {frame}", fontsize=7)
    figure.tight_layout()
    paths.Path(path).parent.mkdir(parents=True, exist_ok=True)  # local, or a URL
    with paths.Path(path).open("wb") as f:
        figure.savefig(f, dpi=100, format="png")
