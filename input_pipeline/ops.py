"""Preprocessing ops for the tf.data pipeline, registered by name and composed from a string.

    pp = ("decode_sample_frames(16, stride=2)|random_resized_crop(224)|value_range(-1, 1)"
          "|tokenize(64)|tokenize_caption(128)|keep('video', 'frame_mask', 'text_ids', ...)")
    preprocess = get_preprocess_fn(pp, train=True, data_dir=DIR)  # dict -> dict, TF ops

Each op is a small ``dict -> dict`` TensorFlow function of one example (the
feature dict of ``dataset_format``) with in-key / out-key arguments. Arguments
are Python literals. Keyword-only arguments named like a context entry
(``train``, ``data_dir``) are filled from the context unless the string gives
them; the pipeline passes ``train`` and ``data_dir``.

Randomness is stateless and per example: random ops read the example's
``_seed`` ([2] int64, added by ``pipeline.make_train_dataset``); op number i
of the string sees that seed folded with i, so two runs with the same seeds
augment identically whatever the parallelism. A random op without ``_seed``
raises. All random choices are made once per clip, never per frame.

Pixel values stay on the 0..255 scale through the spatial and intensity ops
(uint8 after decoding, float32 after any resampling); ``value_range`` maps
them to the model's range at the end. Nothing here flips images unless
``flip_left_right`` is asked for: coronary anatomy is lateralised.

Not here: reading shards, shuffling, batching (``pipeline.py``); decoding
source videos (``prepare.py``).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import math
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from deepcoro_jax.domain import reports
from deepcoro_jax.domain.tokenizers import encode_padded, get_tokenizer
from input_pipeline import dataset_format

Example = dict[str, tf.Tensor]
Op = Callable[[Example], Example]

SEED_KEY = "_seed"
PAD_MODES = ("last", "zeros")

OPS: dict[str, Callable[..., Op]] = {}


def register(name: str) -> Callable[[Callable[..., Op]], Callable[..., Op]]:
    """Registers an op factory under `name` (the name used in pp strings)."""

    def add(factory: Callable[..., Op]) -> Callable[..., Op]:
        if name in OPS:
            raise ValueError(f"pp op {name!r} is registered twice")
        OPS[name] = factory
        return factory

    return add


# ----------------------------------------------------------------------------- parsing


def _split_ops(pp: str) -> list[str]:
    """Splits `pp` at the '|' that are outside quotes and brackets."""
    parts, current, depth, quote = [], [], 0, None
    for char in pp:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "|" and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts]


def _literal(node: ast.AST, text: str):
    try:
        return ast.literal_eval(node)
    except ValueError as e:
        raise ValueError(
            f"pp op {text!r}: argument {ast.unparse(node)!r} is not a Python literal"
        ) from e


def _parse_call(text: str) -> tuple[str, tuple, dict]:
    """'name(1, k="v")' -> ('name', (1,), {'k': 'v'}); a bare 'name' has no arguments."""
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"pp op {text!r} is not a valid op call: {e.msg}") from e
    if isinstance(node, ast.Name):
        return node.id, (), {}
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise ValueError(f"pp op {text!r} is not of the form name(args...)")
    for arg in node.args:
        if isinstance(arg, ast.Starred):
            raise ValueError(f"pp op {text!r}: *args are not supported")
    for keyword in node.keywords:
        if keyword.arg is None:
            raise ValueError(f"pp op {text!r}: **kwargs are not supported")
    args = tuple(_literal(a, text) for a in node.args)
    kwargs = {k.arg: _literal(k.value, text) for k in node.keywords}
    return node.func.id, args, kwargs


def _build_op(text: str, context: dict) -> Op:
    name, args, kwargs = _parse_call(text)
    if name not in OPS:
        raise ValueError(f"unknown pp op {name!r} in {text!r}; known ops: {', '.join(sorted(OPS))}")
    factory = OPS[name]
    signature = inspect.signature(factory)
    try:
        bound = signature.bind_partial(*args, **kwargs)
        for key, value in context.items():
            parameter = signature.parameters.get(key)
            if (
                parameter is not None
                and parameter.kind is inspect.Parameter.KEYWORD_ONLY
                and key not in bound.arguments
            ):
                bound.arguments[key] = value
        signature.bind(*bound.args, **bound.kwargs)
        return factory(*bound.args, **bound.kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"pp op {text!r}: {e}") from e


def get_preprocess_fn(pp: str, **context) -> Callable[[Example], Example]:
    """Parses a pp string into one ``dict -> dict`` function (see the module docstring).

    `context` fills keyword-only op arguments of the same name (e.g. ``train``,
    ``data_dir``) that the string does not set. Unknown op names, malformed
    calls and bad arguments raise ValueError naming the op.
    """
    texts = _split_ops(pp)
    if any(not t for t in texts):
        raise ValueError(f"pp string {pp!r} has an empty op (a stray '|'?)")
    ops = [_build_op(t, context) for t in texts]

    @tf.autograph.experimental.do_not_convert  # plain TF ops: tracing needs no autograph
    def preprocess(data: Example) -> Example:
        data = dict(data)
        base_seed = data.pop(SEED_KEY, None)
        for index, op in enumerate(ops):
            if base_seed is not None:
                data[SEED_KEY] = tf.random.experimental.stateless_fold_in(base_seed, index)
            data = op(data)
            data.pop(SEED_KEY, None)
        return data

    return preprocess


# ----------------------------------------------------------------------------- helpers


def _get(data: Example, key: str, op: str) -> tf.Tensor:
    if key not in data:
        raise KeyError(f"pp op {op}: key {key!r} not in the example (keys: {sorted(data)})")
    return data[key]


def _seed(data: Example, op: str) -> tf.Tensor:
    if SEED_KEY not in data:
        raise ValueError(
            f"pp op {op} is random and needs a per-example {SEED_KEY!r} ([2] int64 seed); "
            "pipeline.make_train_dataset adds it. Use the deterministic ops for evaluation."
        )
    return data[SEED_KEY]


def _uniform(seed: tf.Tensor, salt: int, low: float, high: float) -> tf.Tensor:
    """A float32 scalar ~ U(low, high) from `seed`; `salt` separates draws of one op."""
    seed = tf.random.experimental.stateless_fold_in(seed, salt)
    return tf.random.stateless_uniform([], seed, minval=low, maxval=high)


def _randint(seed: tf.Tensor, salt: int, maxval: tf.Tensor) -> tf.Tensor:
    """An int32 scalar ~ U{0, ..., maxval - 1} from `seed`."""
    seed = tf.random.experimental.stateless_fold_in(seed, salt)
    return tf.random.stateless_uniform([], seed, minval=0, maxval=maxval, dtype=tf.int32)


def _size_pair(size: int | tuple[int, int], op: str) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and s > 0 for s in pair):
        raise ValueError(f"{op}: size must be a positive int or (height, width), got {size!r}")
    return pair


def _check_range(name: str, value: float, low: float, high: float, op: str) -> None:
    if not low <= value <= high:
        raise ValueError(f"{op}: {name} must be in [{low}, {high}], got {value!r}")


def _resize(video: tf.Tensor, size: tuple[int, int], antialias: bool) -> tf.Tensor:
    """Bilinear resize of [T, H, W, C] to float32 [T, *size, C]."""
    return tf.image.resize(tf.cast(video, tf.float32), size, method="bilinear", antialias=antialias)


# ----------------------------------------------------------------------------- temporal

# Lesion annotations, where an example has them: ``data[LESIONS_KEY]`` is a dict of
# "box" float32 [K, 4] (y0, x0, y1, x1) normalised to [0, 1] of the frame, in
# continuous pixel coordinates (pixel i spans [i, i + 1), so x = pixel_x / width);
# "frame" int32 [K], the stored frame each box was drawn on; "segment" and
# "severity" [K]. The ops keep them in step with the pixels: decode_sample_frames
# adds "clip_frame" and "visible", the spatial ops move "box" and clear "visible"
# for boxes cut off. K may be 0; examples without LESIONS_KEY are left as they were.
LESIONS_KEY = "lesions"
MIN_VISIBLE = 0.5  # the spatial ops' default: the least share of a box that must stay in view


def _lesions_in_clip(
    lesions: dict[str, tf.Tensor],
    positions: tf.Tensor,
    frame_mask: tf.Tensor,
    step: tf.Tensor,
    total: tf.Tensor,
) -> dict[str, tf.Tensor]:
    """Adds "clip_frame" (the real clip frame nearest each lesion's annotated frame, the
    earlier on ties) and ANDs "visible" with: the annotated frame is a frame of the video
    and at most step // 2 source frames from that clip frame."""
    frame = tf.cast(lesions["frame"], tf.int32)  # [K]
    distance = tf.abs(frame[:, None] - positions[None, :])  # [K, num_frames]
    distance = tf.where(frame_mask[None, :], distance, tf.int32.max)
    nearest = tf.reduce_min(distance, axis=1)  # [K]
    num_frames = tf.shape(positions)[0]
    clip_index = tf.range(num_frames)[None, :]
    clip_frame = tf.reduce_min(
        tf.where(distance == nearest[:, None], clip_index, num_frames), axis=1
    )  # [K]: the first of the nearest
    visible = (nearest <= step // 2) & (frame >= 0) & (frame < total)
    if "visible" in lesions:
        visible = visible & lesions["visible"]
    return {**lesions, "clip_frame": clip_frame, "visible": visible}


@register("decode_sample_frames")
def decode_sample_frames(
    num_frames: int,
    stride: int = 1,
    *,
    target_fps: float | None = None,
    pad: str = "last",
    train: bool = False,
    key: str = "frames",
    outkey: str = "video",
    mask_key: str = "frame_mask",
    indices_key: str = "frame_indices",
) -> Op:
    """Picks `num_frames` frames `stride` apart from the encoded frames and decodes only those.

    The clip covers ``span = (num_frames - 1) * stride + 1`` source frames. With
    ``train`` its start is uniform over the valid starts, otherwise the clip is
    centred: start ``(T - span) // 2``. With `target_fps`, the stride is
    ``max(1, round(fps / target_fps))`` from the example's ``fps``; where the fps
    is unknown (0) the `stride` argument is used. A video shorter than the span
    starts at frame 0 and is padded (`pad`: 'last' repeats the last frame,
    'zeros' uses black frames); ``mask_key`` [num_frames] bool is False for
    padded frames. Outputs `outkey` uint8 [num_frames, H, W, 1], `mask_key`, and
    `indices_key` int32 [num_frames], the source frame each output frame shows
    (the last frame's index for padding).

    Lesions (``LESIONS_KEY``), where present, gain "clip_frame" int32 [K]: the
    real (unpadded) output frame whose source index is nearest the lesion's
    annotated "frame", the earlier one on ties; and "visible" bool [K] (ANDed
    into an existing one): True when the annotated frame is a frame of the video
    (0 <= frame < T) within half the stride in use (``step // 2`` frames, the
    stride from `target_fps` where that applies) of that clip frame, i.e. inside
    the clip's time span. Their boxes are untouched.
    """
    op = "decode_sample_frames"
    if not (isinstance(num_frames, int) and num_frames > 0):
        raise ValueError(f"{op}: num_frames must be a positive int, got {num_frames!r}")
    if not (isinstance(stride, int) and stride > 0):
        raise ValueError(f"{op}: stride must be a positive int, got {stride!r}")
    if target_fps is not None and not target_fps > 0:
        raise ValueError(f"{op}: target_fps must be positive, got {target_fps!r}")
    if pad not in PAD_MODES:
        raise ValueError(f"{op}: pad must be one of {PAD_MODES}, got {pad!r}")

    def apply(data: Example) -> Example:
        frames = _get(data, key, op)  # [T] encoded
        total = tf.shape(frames)[0]
        check = tf.debugging.Assert(
            total > 0, [f"{op}: no frames in {key!r} of the video", data.get("path", "")]
        )
        with tf.control_dependencies([check]):
            total = tf.identity(total)
        step = tf.constant(stride, tf.int32)
        if target_fps is not None:
            fps = _get(data, "fps", op)
            from_fps = tf.maximum(1, tf.cast(tf.round(fps / target_fps), tf.int32))
            step = tf.where(fps > 0, from_fps, step)
        span = (num_frames - 1) * step + 1
        slack = tf.maximum(total - span, 0)
        if train:
            offset = _randint(_seed(data, op), 0, slack + 1)
        else:
            offset = slack // 2
        positions = offset + step * tf.range(num_frames)  # [num_frames]
        frame_mask = positions < total
        indices = tf.minimum(positions, total - 1)
        picked = tf.gather(frames, indices)  # [num_frames] encoded
        video = tf.stack(
            [
                tf.io.decode_image(picked[i], channels=1, expand_animations=False)
                for i in range(num_frames)
            ]
        )  # [num_frames, H, W, 1]
        if pad == "zeros":
            video = tf.where(frame_mask[:, None, None, None], video, tf.zeros_like(video))
        video.set_shape([num_frames, None, None, 1])
        out = {**data, outkey: video, mask_key: frame_mask, indices_key: indices}
        if LESIONS_KEY in data:
            out[LESIONS_KEY] = _lesions_in_clip(
                data[LESIONS_KEY], positions, frame_mask, step, total
            )
        return out

    return apply


# ----------------------------------------------------------------------------- spatial

# Each spatial op moves the lesion boxes (LESIONS_KEY) with the same geometry it
# applies to the pixels, clips them to [0, 1], and clears "visible" (all True where
# it is missing) for a box of which less than `min_visible` of its area (as mapped,
# before clipping) lies in the new frame, or nothing does. Padding that an op fills
# in (scale_rotate_jitter's reflected borders) does not count as in the frame.


def _lesion_boxes(data: Example) -> tf.Tensor:
    """The lesions' boxes, float32 [K, 4] (y0, x0, y1, x1)."""
    return tf.reshape(tf.cast(data[LESIONS_KEY]["box"], tf.float32), [-1, 4])


def _place_lesions(data: Example, boxes: tf.Tensor, min_visible: float) -> Example:
    """`data` with its lesions' boxes set to `boxes` (float32 [K, 4], normalised to the
    new frame, not yet clipped) clipped to [0, 1], and "visible" ANDed with: at least
    `min_visible` of the unclipped box's area lies in [0, 1]^2 and the clipped box is
    not empty."""
    lesions = data[LESIONS_KEY]
    clipped = tf.clip_by_value(boxes, 0.0, 1.0)
    y0, x0, y1, x1 = tf.unstack(boxes, 4, axis=1)
    in_y0, in_x0, in_y1, in_x1 = tf.unstack(clipped, 4, axis=1)
    area = (y1 - y0) * (x1 - x0)  # [K]
    area_inside = (in_y1 - in_y0) * (in_x1 - in_x0)
    visible = (in_y1 > in_y0) & (in_x1 > in_x0) & (area_inside >= min_visible * area)
    if "visible" in lesions:
        visible = visible & lesions["visible"]
    return {**data, LESIONS_KEY: {**lesions, "box": clipped, "visible": visible}}


def _boxes_in_window(
    boxes: tf.Tensor,
    height: tf.Tensor,
    width: tf.Tensor,
    top: tf.Tensor,
    left: tf.Tensor,
    window_h: tf.Tensor,
    window_w: tf.Tensor,
) -> tf.Tensor:
    """Boxes normalised to a height x width frame -> normalised to its window of
    window_h x window_w pixels at (top, left): y' = (y * height - top) / window_h."""
    frame = tf.cast(tf.stack([height, width, height, width]), tf.float32)
    origin = tf.cast(tf.stack([top, left, top, left]), tf.float32)
    window = tf.cast(tf.stack([window_h, window_w, window_h, window_w]), tf.float32)
    return (boxes * frame - origin) / window


def _boxes_through_affine(
    boxes: tf.Tensor, inverse_map: tuple[tf.Tensor, ...], height: tf.Tensor, width: tf.Tensor
) -> tf.Tensor:
    """The axis-aligned bounds of boxes (normalised to a height x width frame) carried
    into a frame of the same size by the forward map of an affine warp.

    `inverse_map` (a0, a1, a2, b0, b1, b2) is the warp's output -> input map as
    ImageProjectiveTransform takes it: x_in = a0 x + a1 y + a2, y_in = b0 x + b1 y + b2
    in pixel-index coordinates, where pixel centres are integers, i.e. continuous
    coordinate - 0.5.
    """
    a0, a1, a2, b0, b1, b2 = inverse_map
    size_y, size_x = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    y0, x0, y1, x1 = tf.unstack(boxes, 4, axis=1)
    corner_x = tf.stack([x0, x1, x0, x1], axis=1) * size_x - 0.5  # [K, 4] pixel index
    corner_y = tf.stack([y0, y0, y1, y1], axis=1) * size_y - 0.5
    dx, dy = corner_x - a2, corner_y - b2
    det = a0 * b1 - a1 * b0
    out_x = ((b1 * dx - a1 * dy) / det + 0.5) / size_x  # [K, 4] normalised, continuous
    out_y = ((a0 * dy - b0 * dx) / det + 0.5) / size_y
    return tf.stack(
        [
            tf.reduce_min(out_y, axis=1),
            tf.reduce_min(out_x, axis=1),
            tf.reduce_max(out_y, axis=1),
            tf.reduce_max(out_x, axis=1),
        ],
        axis=1,
    )


def _mirror(index: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """Integer pixel indices reflected into [0, size): -1 -> 0, size -> size - 1."""
    period = 2 * size
    index = tf.math.floormod(index, period)
    return tf.where(index >= size, period - 1 - index, index)


def _affine_warp(
    video: tf.Tensor, inverse_map: tuple[tf.Tensor, ...], out_size: tuple[int, int]
) -> tf.Tensor:
    """Bilinear resampling of every frame of [T, H, W, C] to float32 [T, *out_size, C]:
    output pixel (x, y) reads input (a0 x + a1 y + a2, b0 x + b1 y + b2), pixel-index
    coordinates (centres at integers), with `inverse_map` = (a0, a1, a2, b0, b1, b2);
    the input's borders mirrored. The four neighbours of each output pixel are
    gathered once for all frames, which costs about 60% of ImageProjectiveTransform's
    per-pixel CPU time on a 16-frame clip."""
    a0, a1, a2, b0, b1, b2 = inverse_map
    shape = tf.shape(video)
    frames, height, width, channels = shape[0], shape[1], shape[2], shape[3]
    out_h, out_w = out_size
    y, x = tf.meshgrid(
        tf.range(out_h, dtype=tf.float32), tf.range(out_w, dtype=tf.float32), indexing="ij"
    )
    x_in, y_in = a0 * x + a1 * y + a2, b0 * x + b1 * y + b2  # [h, w]
    x_floor, y_floor = tf.floor(x_in), tf.floor(y_in)
    fx, fy = (x_in - x_floor)[..., None], (y_in - y_floor)[..., None]  # [h, w, 1]
    x0, y0 = tf.cast(x_floor, tf.int32), tf.cast(y_floor, tf.int32)
    cols = (_mirror(x0, width), _mirror(x0 + 1, width))
    rows = (_mirror(y0, height) * width, _mirror(y0 + 1, height) * width)
    pixels = tf.reshape(
        tf.transpose(tf.cast(video, tf.float32), [1, 2, 0, 3]), [height * width, -1]
    )  # [H*W, T*C]

    def at(row: tf.Tensor, col: tf.Tensor) -> tf.Tensor:
        return tf.gather(pixels, row + col)  # [h, w, T*C]

    top = at(rows[0], cols[0]) * (1.0 - fx) + at(rows[0], cols[1]) * fx
    bottom = at(rows[1], cols[0]) * (1.0 - fx) + at(rows[1], cols[1]) * fx
    out = top * (1.0 - fy) + bottom * fy
    out = tf.reshape(out, [out_h, out_w, frames, channels])
    return tf.transpose(out, [2, 0, 1, 3])


@register("random_resized_crop")
def random_resized_crop(
    size: int | tuple[int, int],
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    *,
    max_scale: float = 0.0,
    max_degrees: float = 0.0,
    antialias: bool = False,
    min_visible: float = MIN_VISIBLE,
    key: str = "video",
) -> Op:
    """Crops one random box (area fraction in `scale`, aspect w/h in `ratio`) from every
    frame of the clip and resizes it to `size` (bilinear; `antialias` matters only when
    shrinking by well over 1.5x); the box is clipped to the frame. Output float32.

    With `max_scale` or `max_degrees`, the output is also zoomed by a factor in
    [1 - max_scale, 1 + max_scale] and rotated by an angle in [-max_degrees,
    max_degrees] about its centre, as ``scale_rotate_jitter`` does after a crop,
    but in one bilinear resampling of the input frame (``_affine_warp``): one
    interpolation instead of two, the frame's own pixels beyond the crop instead
    of reflections of it, mirrored only at the frame's borders, and less CPU time
    than the crop and the warp apart (``benchmarks/input_pipeline.py``).

    Lesion boxes go to the crop window (top, left, crop_h, crop_w in input pixels):
    y' = (y * H - top) / crop_h, x' = (x * W - left) / crop_w; the resize keeps
    normalised coordinates; a zoom and rotation then move them as in
    ``scale_rotate_jitter``. Then clipped, "visible" as for every spatial op."""
    op = "random_resized_crop"
    out_size = _size_pair(size, op)
    _check_range("min_visible", min_visible, 0.0, 1.0, op)
    _check_range("max_scale", max_scale, 0.0, 0.5, op)
    _check_range("max_degrees", max_degrees, 0.0, 45.0, op)
    warp = max_scale > 0 or max_degrees > 0
    if warp and antialias:
        raise ValueError(f"{op}: antialias=True does not go with max_scale or max_degrees")
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"{op}: scale must satisfy 0 < low <= high <= 1, got {scale!r}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"{op}: ratio must satisfy 0 < low <= high, got {ratio!r}")

    def apply(data: Example) -> Example:
        video = _get(data, key, op)  # [T, H, W, C]
        seed = _seed(data, op)
        height, width = tf.shape(video)[1], tf.shape(video)[2]
        area = tf.cast(height * width, tf.float32) * _uniform(seed, 0, *scale)
        aspect = tf.exp(_uniform(seed, 1, math.log(ratio[0]), math.log(ratio[1])))
        crop_w = tf.clip_by_value(tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32), 1, width)
        crop_h = tf.clip_by_value(tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32), 1, height)
        top = _randint(seed, 2, height - crop_h + 1)
        left = _randint(seed, 3, width - crop_w + 1)
        if not warp:
            crop = video[:, top : top + crop_h, left : left + crop_w]  # [T, h, w, C]
            out = {**data, key: _resize(crop, out_size, antialias)}
        else:
            zoom = _uniform(seed, 4, 1.0 - max_scale, 1.0 + max_scale)
            angle = _uniform(seed, 5, -max_degrees, max_degrees) * (math.pi / 180.0)
            rotation = _rotation_map(zoom, angle, *out_size)  # output -> resized crop
            # Resized crop -> input, half-pixel centres as the bilinear resize has them.
            scale_y = tf.cast(crop_h, tf.float32) / out_size[0]
            scale_x = tf.cast(crop_w, tf.float32) / out_size[1]
            shift_y = tf.cast(top, tf.float32) + 0.5 * scale_y - 0.5
            shift_x = tf.cast(left, tf.float32) + 0.5 * scale_x - 0.5
            r0, r1, r2, s0, s1, s2 = rotation
            inverse_map = (
                scale_x * r0, scale_x * r1, scale_x * r2 + shift_x,
                scale_y * s0, scale_y * s1, scale_y * s2 + shift_y,
            )
            out = {**data, key: _affine_warp(video, inverse_map, out_size)}
        if LESIONS_KEY in data:
            boxes = _boxes_in_window(_lesion_boxes(data), height, width, top, left, crop_h, crop_w)
            if warp:
                boxes = _boxes_through_affine(boxes, rotation, *out_size)
            out = _place_lesions(out, boxes, min_visible)
        return out

    return apply


def _rotation_map(
    zoom: tf.Tensor, angle: tf.Tensor, height: int | tf.Tensor, width: int | tf.Tensor
) -> tuple[tf.Tensor, ...]:
    """The output -> input pixel map (a0, a1, a2, b0, b1, b2) of a zoom and rotation
    about the centre of a height x width frame: in = c + R(-angle) (out - c) / zoom."""
    center_x = (tf.cast(width, tf.float32) - 1.0) / 2.0
    center_y = (tf.cast(height, tf.float32) - 1.0) / 2.0
    a0, a1 = tf.cos(angle) / zoom, tf.sin(angle) / zoom
    b0, b1 = -tf.sin(angle) / zoom, tf.cos(angle) / zoom
    a2 = center_x - a0 * center_x - a1 * center_y
    b2 = center_y - b0 * center_x - b1 * center_y
    return a0, a1, a2, b0, b1, b2


@register("scale_rotate_jitter")
def scale_rotate_jitter(
    max_scale: float = 0.1,
    max_degrees: float = 10.0,
    *,
    min_visible: float = MIN_VISIBLE,
    key: str = "video",
) -> Op:
    """Zooms by a factor in [1 - max_scale, 1 + max_scale] and rotates by an angle in
    [-max_degrees, max_degrees] about the frame centre, the same for every frame;
    bilinear, borders filled by reflection. Output float32. Costly on CPU: TF's
    projective warp about doubles the CPU time per 16x224x224 clip of the whole
    training pipeline (benchmarks/input_pipeline.py measures both).

    Lesion boxes: the 4 corners go through the forward map (input -> output, the
    inverse of the warp's output -> input map) and the box becomes their axis-aligned
    bound, so a rotated box is enclosed, a little larger than the lesion. Then
    clipped, "visible" as for every spatial op; the reflected borders count as
    outside the frame."""
    op = "scale_rotate_jitter"
    _check_range("max_scale", max_scale, 0.0, 0.5, op)
    _check_range("max_degrees", max_degrees, 0.0, 45.0, op)
    _check_range("min_visible", min_visible, 0.0, 1.0, op)

    def apply(data: Example) -> Example:
        video = tf.cast(_get(data, key, op), tf.float32)  # [T, H, W, C]
        seed = _seed(data, op)
        zoom = _uniform(seed, 0, 1.0 - max_scale, 1.0 + max_scale)
        angle = _uniform(seed, 1, -max_degrees, max_degrees) * (math.pi / 180.0)
        height, width = tf.shape(video)[1], tf.shape(video)[2]
        a0, a1, a2, b0, b1, b2 = _rotation_map(zoom, angle, height, width)
        transform = tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0])[None]  # [1, 8]
        warped = tf.raw_ops.ImageProjectiveTransformV3(
            images=video,
            transforms=transform,
            output_shape=tf.shape(video)[1:3],
            fill_value=0.0,
            interpolation="BILINEAR",
            fill_mode="REFLECT",
        )
        warped.set_shape(video.shape)
        out = {**data, key: warped}
        if LESIONS_KEY in data:
            boxes = _boxes_through_affine(
                _lesion_boxes(data), (a0, a1, a2, b0, b1, b2), height, width
            )
            out = _place_lesions(out, boxes, min_visible)
        return out

    return apply


@register("central_crop")
def central_crop(
    size: int | tuple[int, int], *, min_visible: float = MIN_VISIBLE, key: str = "video"
) -> Op:
    """Crops the centre `size` of every frame; the frame must be at least that large.

    Lesion boxes go to the window (top, left) = ((H - h) // 2, (W - w) // 2):
    y' = (y * H - top) / h, x' = (x * W - left) / w; then clipped, "visible" as for
    every spatial op."""
    op = "central_crop"
    crop_h, crop_w = _size_pair(size, op)
    _check_range("min_visible", min_visible, 0.0, 1.0, op)

    def apply(data: Example) -> Example:
        video = _get(data, key, op)  # [T, H, W, C]
        height, width = tf.shape(video)[1], tf.shape(video)[2]
        check = tf.debugging.assert_greater_equal(
            tf.stack([height, width]),
            tf.constant([crop_h, crop_w]),
            message=f"{op}: frames smaller than the crop {(crop_h, crop_w)}",
        )
        with tf.control_dependencies([check]):
            top, left = (height - crop_h) // 2, (width - crop_w) // 2
        crop = video[:, top : top + crop_h, left : left + crop_w]
        crop.set_shape([video.shape[0], crop_h, crop_w, video.shape[3]])
        out = {**data, key: crop}
        if LESIONS_KEY in data:
            boxes = _boxes_in_window(_lesion_boxes(data), height, width, top, left, crop_h, crop_w)
            out = _place_lesions(out, boxes, min_visible)
        return out

    return apply


@register("resize")
def resize(size: int | tuple[int, int], *, antialias: bool = False, key: str = "video") -> Op:
    """Resizes every frame to `size` (bilinear; `antialias` for large shrinks); float32.

    Lesion boxes keep their normalised coordinates (the resize maps continuous
    coordinates linearly, frame edge to frame edge); they are clipped to [0, 1] and
    "visible" is checked as for every spatial op, with ``MIN_VISIBLE``."""
    out_size = _size_pair(size, "resize")

    def apply(data: Example) -> Example:
        out = {**data, key: _resize(_get(data, key, "resize"), out_size, antialias)}
        if LESIONS_KEY in data:
            out = _place_lesions(out, _lesion_boxes(data), MIN_VISIBLE)
        return out

    return apply


@register("flip_left_right")
def flip_left_right(prob: float = 0.5, *, key: str = "video") -> Op:
    """Mirrors the whole clip left-right with probability `prob`. Opt-in only: it swaps the
    patient's left and right, which angiographic views do not do.

    Lesion boxes of a mirrored clip become x0' = 1 - x1, x1' = 1 - x0; they are
    clipped and "visible" is checked as for every spatial op, with ``MIN_VISIBLE``."""
    op = "flip_left_right"
    _check_range("prob", prob, 0.0, 1.0, op)

    def apply(data: Example) -> Example:
        video = _get(data, key, op)  # [T, H, W, C]
        flip = _uniform(_seed(data, op), 0, 0.0, 1.0) < prob
        out = {**data, key: tf.cond(flip, lambda: tf.reverse(video, axis=[2]), lambda: video)}
        if LESIONS_KEY in data:
            boxes = _lesion_boxes(data)
            y0, x0, y1, x1 = tf.unstack(boxes, 4, axis=1)
            mirrored = tf.stack([y0, 1.0 - x1, y1, 1.0 - x0], axis=1)
            out = _place_lesions(out, tf.where(flip, mirrored, boxes), MIN_VISIBLE)
        return out

    return apply


# ----------------------------------------------------------------------------- intensity


@register("intensity_jitter")
def intensity_jitter(
    brightness: float = 0.1, contrast: float = 0.1, gamma: float = 0.1, *, key: str = "video"
) -> Op:
    """Random gamma, contrast and brightness, one draw per clip, on the 0..255 scale.

    With x = pixel / 255: x <- x ** g, g ~ U(1 - gamma, 1 + gamma); then
    x <- mean + c (x - mean), c ~ U(1 - contrast, 1 + contrast), mean over the clip;
    then x <- x + b, b ~ U(-brightness, brightness); clipped to [0, 1]. Output
    float32 on 0..255.
    """
    op = "intensity_jitter"
    _check_range("brightness", brightness, 0.0, 1.0, op)
    _check_range("contrast", contrast, 0.0, 1.0, op)
    _check_range("gamma", gamma, 0.0, 0.9, op)

    def apply(data: Example) -> Example:
        x = tf.cast(_get(data, key, op), tf.float32) / 255.0
        seed = _seed(data, op)
        # x ** g as exp(g log x): several times faster than tf.pow on CPU; 0 stays 0.
        x = tf.exp(_uniform(seed, 0, 1.0 - gamma, 1.0 + gamma) * tf.math.log(x))
        mean = tf.reduce_mean(x)
        x = mean + _uniform(seed, 1, 1.0 - contrast, 1.0 + contrast) * (x - mean)
        x = x + _uniform(seed, 2, -brightness, brightness)
        return {**data, key: tf.clip_by_value(x, 0.0, 1.0) * 255.0}

    return apply


@register("value_range")
def value_range(
    vmin: float = -1.0,
    vmax: float = 1.0,
    in_min: float = 0.0,
    in_max: float = 255.0,
    *,
    key: str = "video",
) -> Op:
    """Maps [in_min, in_max] linearly onto [vmin, vmax]; float32 output."""
    if in_max <= in_min:
        raise ValueError(f"value_range: in_max must exceed in_min, got {in_min}, {in_max}")

    def apply(data: Example) -> Example:
        x = tf.cast(_get(data, key, "value_range"), tf.float32)
        return {**data, key: vmin + (x - in_min) * ((vmax - vmin) / (in_max - in_min))}

    return apply


# ----------------------------------------------------------------------------- text


def _tokenizer(tokenizer: str, data_dir: str | None, op: str):
    if tokenizer == "dataset":
        if data_dir is None:
            raise ValueError(
                f"{op}: tokenizer='dataset' needs the data_dir context (the pipeline passes it)"
            )
        tokenizer = dataset_format.tokenizer_spec(data_dir)
    return get_tokenizer(tokenizer)


def _text(value: bytes | np.ndarray) -> str:
    """The str of a tf.string scalar as numpy_function passes it (bytes or a 0-d array)."""
    return np.asarray(value).item().decode("utf-8")


@register("tokenize")
def tokenize(
    max_len: int,
    *,
    tokenizer: str = "dataset",
    bos: bool = True,
    eos: bool = True,
    key: str = "report",
    outkey: str = "text_ids",
    mask_key: str = "text_mask",
    data_dir: str | None = None,
) -> Op:
    """Text-encoder ids: [BOS] tokens [EOS] padded with the pad id to `max_len`.

    `tokenizer` is a spec for ``deepcoro_jax.domain.tokenizers.get_tokenizer`` or
    'dataset' (the dataset's own, from the `data_dir` context). Long reports
    lose tokens from the end; BOS and EOS (where asked for) are always kept, as
    BERT does. Outputs `outkey` int32 [max_len] and `mask_key` bool [max_len]
    (True on BOS, tokens and EOS).
    """
    op = "tokenize"
    specials = int(bos) + int(eos)
    if not (isinstance(max_len, int) and max_len > specials):
        raise ValueError(f"{op}: max_len must be an int > {specials}, got {max_len!r}")
    tok = _tokenizer(tokenizer, data_dir, op)

    def encode(text: bytes) -> tuple[np.ndarray, np.ndarray]:
        ids, length = encode_padded(tok, _text(text), max_len, bos=bos, eos=eos)
        return ids, np.int32(length)

    def apply(data: Example) -> Example:
        ids, length = tf.numpy_function(
            encode, [_get(data, key, op)], (tf.int32, tf.int32), stateful=False
        )
        ids.set_shape([max_len])
        length.set_shape([])
        return {**data, outkey: ids, mask_key: tf.range(max_len) < length}

    return apply


@register("findings_id")
def findings_id(*, key: str = "report", outkey: str = "findings_id") -> Op:
    """An int32 id of what the report states (`reports.findings_key`: its parsed findings),
    for contrastive positives by meaning: two reports that say the same thing in other
    words get the same id (different findings collide with probability ~2^-32 a pair)."""
    op = "findings_id"

    @functools.lru_cache(maxsize=1 << 16)
    def identify(text: str) -> np.int32:
        digest = hashlib.blake2b(reports.findings_key(text).encode(), digest_size=4)
        return np.frombuffer(digest.digest(), np.int32)[0]

    def apply(data: Example) -> Example:
        value = tf.numpy_function(lambda text: identify(_text(text)), [_get(data, key, op)],
                                  tf.int32, stateful=False)
        value.set_shape([])
        return {**data, outkey: value}

    return apply


@register("tokenize_caption")
def tokenize_caption(
    max_len: int,
    *,
    tokenizer: str = "dataset",
    key: str = "report",
    outkey: str = "caption",
    data_dir: str | None = None,
) -> Op:
    """Decoder input and target ids for teacher forcing, each int32 [max_len].

    ``<outkey>_in`` = [BOS] + tokens and ``<outkey>_out`` = tokens + [EOS], so
    ``_in[1:] == _out[:-1]`` on real positions; ``<outkey>_mask`` bool marks the
    real target positions (pad excluded). A report of `max_len` tokens or more
    is truncated to `max_len` tokens and gets NO EOS (the model is not taught to
    stop where the report did not end). `tokenizer` as in ``tokenize``.
    """
    op = "tokenize_caption"
    if not (isinstance(max_len, int) and max_len > 1):
        raise ValueError(f"{op}: max_len must be an int > 1, got {max_len!r}")
    tok = _tokenizer(tokenizer, data_dir, op)

    def encode(text: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        tokens = tok.encode(_text(text))
        targets = tokens[:max_len] if len(tokens) >= max_len else tokens + [tok.eos_id]
        inputs = [tok.bos_id] + tokens[: max_len - 1]
        caption_in = np.full([max_len], tok.pad_id, np.int32)
        caption_out = np.full([max_len], tok.pad_id, np.int32)
        caption_in[: len(inputs)] = inputs
        caption_out[: len(targets)] = targets
        return caption_in, caption_out, np.int32(len(targets))

    def apply(data: Example) -> Example:
        caption_in, caption_out, length = tf.numpy_function(
            encode, [_get(data, key, op)], (tf.int32, tf.int32, tf.int32), stateful=False
        )
        caption_in.set_shape([max_len])
        caption_out.set_shape([max_len])
        length.set_shape([])
        return {
            **data,
            f"{outkey}_in": caption_in,
            f"{outkey}_out": caption_out,
            f"{outkey}_mask": tf.range(max_len) < length,
        }

    return apply


# ----------------------------------------------------------------------------- keys


@register("keep")
def keep(*keys: str) -> Op:
    """Keeps only `keys` (each must be present)."""
    if not keys:
        raise ValueError("keep: give at least one key")

    def apply(data: Example) -> Example:
        return {k: _get(data, k, "keep") for k in keys}

    return apply


@register("flatten_labels")
def flatten_labels(*, key: str = "labels", prefix: str = "label/") -> Op:
    """Replaces the nested `key` dict by top-level ``<prefix><name>`` entries."""

    def apply(data: Example) -> Example:
        labels = _get(data, key, "flatten_labels")
        if not isinstance(labels, dict):
            raise ValueError(f"flatten_labels: {key!r} is not a dict of labels")
        out = {k: v for k, v in data.items() if k != key}
        out.update({f"{prefix}{name}": value for name, value in labels.items()})
        return out

    return apply
