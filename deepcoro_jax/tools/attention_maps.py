"""Where the caption decoder looked: cross-attention of a generated report, mapped onto frames.

For: one teacher-forced pass of the caption decoder over a report it generated
(``CrossAttention`` sows its softmax weights only in this pass), the weights
averaged over heads and layers, grouped per sentence (the token span up to a
'.' token that ends a sentence, found by detokenising: a decimal point inside
"72.5%" does not end one), each memory token put back on its tubelet and
upsampled to pixels, then drawn as heat-map overlays on the clip: a PNG strip
(one row per sentence, a few frames) and a GIF (every frame, one panel per
sentence).

The encoder's tokens are its (T', H', W') tubelet grid flattened row-major
(``vivit``: time, then rows, then columns), so memory token n covers frames
[t*pt, (t+1)*pt), rows [h*ph, (h+1)*ph) and columns [w*pw, (w+1)*pw) of the
clip, with (t, h, w) = unravel(n, (T', H', W')). Single videos only (not
studies).

Not for: generating the report (``inference.generate_reports``), decoding files
(``infer.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from deepcoro_jax import paths
from deepcoro_jax.domain import tokenizers
from deepcoro_jax.models import multitask
from deepcoro_jax.models.locca import CaptionDecoder, shift_right
from deepcoro_jax.models.mvm import tubelet_grid
from deepcoro_jax.tools.inference import Run

MIN_PANEL_SIZE = 128  # frames are enlarged (nearest neighbour) to at least this many pixels
MAX_ALPHA = 0.6  # opacity of the heat map where the attention peaks
LABEL_HEIGHT = 14  # pixels of the text band above each row
GIF_FRAME_MS = 125


@dataclasses.dataclass(frozen=True)
class SentenceAttention:
    """One sentence of a report and where its tokens attended.

    start, end: the sentence's token positions [start, end) in the report.
    heat: float32 [T, H, W], the mean cross-attention of its tokens spread on
    the pixels of each memory token's tubelet (sums to 1 over the tubelets).
    """

    text: str
    start: int
    end: int
    heat: np.ndarray


@functools.partial(jax.jit, static_argnames="decoder")
def cross_attention_weights(
    decoder: CaptionDecoder,
    decoder_params: Any,
    memory: jax.Array,
    memory_mask: jax.Array | None,
    caption_in: jax.Array,
) -> jax.Array:
    """Teacher-forced cross-attention, float32 [B, L, N], mean over heads and layers.

    Row i is the attention of the query that predicts token i of the report
    (``caption_in = shift_right(tokens, bos_id)``); it sums to 1 over the valid
    memory tokens and is 0 on the masked ones.
    """
    _, variables = decoder.apply(
        {"params": decoder_params}, caption_in, memory, memory_mask, mutable=["intermediates"]
    )
    intermediates = variables["intermediates"]
    per_layer = [
        intermediates[f"block_{i}"]["cross_attn"]["attention_weights"][0]  # [B, H, L, N]
        for i in range(decoder.num_layers)
    ]
    return jnp.mean(jnp.stack(per_layer), axis=(0, 2))  # [layers, B, H, L, N] -> [B, L, N]


@functools.partial(jax.jit, static_argnames="model")
def _report_cross_attention(
    model: multitask.MultitaskModel, params: Any, video: jax.Array, caption_in: jax.Array
) -> jax.Array:
    _, aux = model.apply({"params": params}, video, method=multitask.MultitaskModel.encode_video)
    return cross_attention_weights(
        model.caption_decoder,
        params["caption_decoder"],
        aux["video_tokens"],
        aux["video_token_mask"],
        caption_in,
    )  # [B, L, N]


def report_tokens(tokens: Sequence[int], tokenizer: tokenizers.Tokenizer) -> list[int]:
    """The report's token ids: up to (not including) the first EOS."""
    ids = [int(t) for t in tokens]
    return ids[: ids.index(tokenizer.eos_id)] if tokenizer.eos_id in ids else ids


def sentence_spans(
    tokens: Sequence[int], tokenizer: tokenizers.Tokenizer
) -> list[tuple[int, int, str]]:
    """The sentences of a generated report as (start, end, text), token positions [start, end).

    A sentence ends at a token after which the detokenised text ends with '.'
    and the next token starts a new word (or the report ends); the last
    sentence may lack its '.'. Tokens from the first EOS on are not part of
    the report; sentences whose text is empty are dropped.
    """
    ids = report_tokens(tokens, tokenizer)
    prefixes = [tokenizer.decode(ids[: i + 1]) for i in range(len(ids))]
    bounds, start = [], 0
    for i, prefix in enumerate(prefixes):
        if not prefix.endswith("."):
            continue
        following = prefixes[i + 1][len(prefix) :] if i + 1 < len(ids) else ""
        if not following[:1] or following[:1].isspace():
            bounds.append((start, i + 1))
            start = i + 1
    if start < len(ids):
        bounds.append((start, len(ids)))
    spans = [(s, e, tokenizer.decode(ids[s:e]).strip()) for s, e in bounds]
    return [(s, e, text) for s, e, text in spans if text]


def tubelet_heatmap(
    token_weights: np.ndarray, grid: Sequence[int], patch_size: Sequence[int]
) -> np.ndarray:
    """Per-memory-token weights [..., N] -> per-pixel [..., T, H, W] (each tubelet's weight).

    N must be T'*H'*W' of `grid` (one video, every token); see the module
    docstring for the token order.
    """
    token_weights = np.asarray(token_weights, np.float32)
    t, h, w = (int(g) for g in grid)
    pt, ph, pw = (int(p) for p in patch_size)
    if token_weights.shape[-1] != t * h * w:
        raise ValueError(
            f"tubelet_heatmap: {token_weights.shape[-1]} memory tokens, but the grid {tuple(grid)} "
            f"has {t * h * w} tubelets (attention maps are for single videos)"
        )
    cells = token_weights.reshape(*token_weights.shape[:-1], t, h, w)  # [..., T', H', W']
    cells = np.repeat(cells, pt, axis=-3)  # [..., T, H', W']
    cells = np.repeat(cells, ph, axis=-2)  # [..., T, H, W']
    return np.repeat(cells, pw, axis=-1)  # [..., T, H, W]


def report_attention(run: Run, clip: np.ndarray, tokens: Sequence[int]) -> list[SentenceAttention]:
    """Per-sentence attention maps of a report the run generated for `clip` [T, H, W, C].

    `tokens` are the generated ids (``inference.generate_reports(...).tokens[i]``).
    """
    clip = np.asarray(clip, np.float32)
    if clip.ndim != 4:
        raise ValueError(f"report_attention: clip must be [T, H, W, C], got shape {clip.shape}")
    tok = run.caption_tokenizer
    spans = sentence_spans(tokens, tok)
    if not spans:
        return []
    targets = np.asarray(tokens, np.int32)[None]  # [1, Lc]
    caption_in = shift_right(jnp.asarray(targets), tok.bos_id)  # [1, Lc]
    weights = _report_cross_attention(run.model, run.params, clip[None], caption_in)
    weights = np.asarray(jax.device_get(weights))[0]  # [Lc, P + N]
    # The weight on a [CLS] token (P = 1) has no place in the frame: the maps show
    # the share of attention that went to the grid's tubelets.
    weights = weights[:, int(run.model.encoder.cls_token):]  # [Lc, N]
    patch_size = run.model.encoder.patch_size
    grid = tubelet_grid(clip.shape, patch_size)
    return [
        SentenceAttention(
            text=text,
            start=start,
            end=end,
            heat=tubelet_heatmap(weights[start:end].mean(axis=0), grid, patch_size),
        )
        for start, end, text in spans
    ]


# ------------------------------------------------------------------------------ drawing


def display_frames(clip: np.ndarray) -> np.ndarray:
    """A model clip [T, H, W, C] (any value range) as uint8 gray [T, H, W], min-max scaled."""
    gray = np.asarray(clip, np.float32).mean(axis=-1)  # [T, H, W]
    low, high = float(gray.min()), float(gray.max())
    if high <= low:
        return np.zeros(gray.shape, np.uint8)
    return np.rint((gray - low) * (255.0 / (high - low))).astype(np.uint8)


def overlay(frames: np.ndarray, heat: np.ndarray, max_alpha: float = MAX_ALPHA) -> np.ndarray:
    """Heat map over gray frames: uint8 [T, H, W] and [T, H, W] -> RGB uint8 [T, H, W, 3].

    The heat is scaled by its maximum over the clip; colours run black -> red ->
    yellow, blended with opacity ``max_alpha * heat``. Pixels of zero heat keep
    their gray value in all three channels.
    """
    frames, heat = np.asarray(frames), np.asarray(heat, np.float32)
    if frames.shape != heat.shape:
        raise ValueError(f"overlay: frames {frames.shape} and heat {heat.shape} must match")
    peak = float(heat.max())
    level = heat / peak if peak > 0 else np.zeros_like(heat)  # [T, H, W] in [0, 1]
    color = np.stack(
        [np.clip(2 * level, 0, 1), np.clip(2 * level - 1, 0, 1), np.zeros_like(level)], axis=-1
    )  # [T, H, W, 3]
    alpha = max_alpha * level[..., None]
    blended = (1 - alpha) * frames[..., None].astype(np.float32) + alpha * 255.0 * color
    return np.rint(blended).astype(np.uint8)


BOX_COLOR = (0, 255, 255)  # cyan: apart from the heat map's black-red-yellow


def draw_box(image: np.ndarray, box: np.ndarray | None) -> np.ndarray:
    """A copy of RGB uint8 [H, W, 3] with the outline of `box` (y0, x0, y1, x1), normalised
    to [0, 1], drawn one pixel wide on the pixels it covers; unchanged for None."""
    image = np.array(image, copy=True)
    if box is None:
        return image
    height, width = image.shape[:2]
    y0, x0, y1, x1 = np.asarray(box, np.float64)
    top, left = int(np.clip(np.floor(y0 * height), 0, height - 1)), int(
        np.clip(np.floor(x0 * width), 0, width - 1))
    bottom = int(np.clip(np.ceil(y1 * height) - 1, top, height - 1))
    right = int(np.clip(np.ceil(x1 * width) - 1, left, width - 1))
    image[top, left : right + 1] = BOX_COLOR
    image[bottom, left : right + 1] = BOX_COLOR
    image[top : bottom + 1, left] = BOX_COLOR
    image[top : bottom + 1, right] = BOX_COLOR
    return image


def _enlarge(image: np.ndarray) -> np.ndarray:
    """[H, W, 3] enlarged by an integer factor to at least MIN_PANEL_SIZE (nearest)."""
    factor = max(1, math.ceil(MIN_PANEL_SIZE / min(image.shape[:2])))
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def _fitted(draw: ImageDraw.ImageDraw, font: Any, text: str, width: int) -> str:
    """`text` in ASCII, cut short with '...' to fit `width` pixels."""
    text = text.encode("ascii", "replace").decode("ascii")
    if draw.textlength(text, font=font) <= width:
        return text
    keep = len(text)
    while keep > 0 and draw.textlength(text[:keep] + "...", font=font) > width:
        keep -= 1
    return text[:keep] + "..." if keep else ""


def _labelled_rows(rows: Sequence[tuple[str, Sequence[np.ndarray]]]) -> Image.Image:
    """Rows of panels, each under a text band with its label, stacked vertically."""
    font = ImageFont.load_default()
    images = []
    for label, panels in rows:
        strip = np.concatenate([_enlarge(p) for p in panels], axis=1)  # [h, w, 3]
        row = Image.new("RGB", (strip.shape[1], LABEL_HEIGHT + strip.shape[0]), "black")
        row.paste(Image.fromarray(strip), (0, LABEL_HEIGHT))
        draw = ImageDraw.Draw(row)
        draw.text((2, 1), _fitted(draw, font, label, strip.shape[1] - 4), fill="white", font=font)
        images.append(row)
    width = max(image.width for image in images)
    canvas = Image.new("RGB", (width, sum(image.height for image in images)), "black")
    top = 0
    for image in images:
        canvas.paste(image, (0, top))
        top += image.height
    return canvas


def strip_frame_indices(num_frames: int, num_columns: int) -> list[int]:
    """`num_columns` frame indices spread evenly over the clip, first and last included."""
    if num_columns < 1:
        raise ValueError(f"num_columns must be at least 1, got {num_columns}")
    return sorted({int(i) for i in np.rint(np.linspace(0, num_frames - 1, num_columns))})


def save_attention_maps(
    clip: np.ndarray,
    sentences: Sequence[SentenceAttention],
    out_prefix: str,
    num_columns: int = 4,
    boxes: Sequence[np.ndarray | None] | None = None,
) -> tuple[str, str]:
    """Writes ``<out_prefix>.png`` (one row per sentence, `num_columns` frames) and
    ``<out_prefix>.gif`` (every frame, numbered; one panel per sentence). Returns both paths.

    `boxes`: per sentence, a box (y0, x0, y1, x1) in [0, 1] to outline on its frames
    (where the model locates the sentence's lesion: ``inference.ground_lesions``), or None.
    """
    if not sentences:
        raise ValueError("save_attention_maps: no sentences to draw")
    boxes = [None] * len(sentences) if boxes is None else list(boxes)
    if len(boxes) != len(sentences):
        raise ValueError(f"save_attention_maps: {len(boxes)} boxes for {len(sentences)} sentences")
    frames = display_frames(clip)  # [T, H, W]
    overlays = [
        np.stack([draw_box(frame, box) for frame in overlay(frames, s.heat)])
        for s, box in zip(sentences, boxes, strict=True)
    ]  # each [T, H, W, 3]
    labels = [f"{i + 1}. {s.text}" for i, s in enumerate(sentences)]
    columns = strip_frame_indices(len(frames), num_columns)
    out_prefix = paths.resolve(out_prefix)
    paths.Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    png_path, gif_path = f"{out_prefix}.png", f"{out_prefix}.gif"
    strip = _labelled_rows(
        [(label, [o[f] for f in columns]) for label, o in zip(labels, overlays, strict=True)]
    )
    with paths.Path(png_path).open("wb") as f:
        strip.save(f, format="PNG")
    gif_frames = [
        _labelled_rows(
            [
                (f"[{f + 1}/{len(frames)}] {label}", [o[f]])
                for label, o in zip(labels, overlays, strict=True)
            ]
        )
        for f in range(len(frames))
    ]
    with paths.Path(gif_path).open("wb") as f:
        gif_frames[0].save(
            f,
            format="GIF",
            save_all=True,
            append_images=gif_frames[1:],
            duration=GIF_FRAME_MS,
            loop=0,
        )
    return png_path, gif_path
