"""Tests of the lesion boxes in input_pipeline/ops.py: they move with the pixels.

The spatial ops are checked by content: the video shows the lesion as a white
rectangle on black, and the bounding box of the bright pixels after an op must
agree with the op's box. scale_rotate_jitter's corner mapping is also checked
against an affine formula in NumPy, with the op's draws reproduced from its seed
and confirmed by where bright points land. decode_sample_frames' clip frames and
time visibility come from a NumPy reference.
"""

import math

import numpy as np
import pytest
import tensorflow as tf

from input_pipeline import dataset_format, ops

SEED = np.array([5, 11], np.int64)


def _run(pp: str, example: dict, seed=SEED, **context) -> dict:
    example = tf.nest.map_structure(tf.convert_to_tensor, example)
    if seed is not None:
        example = {**example, ops.SEED_KEY: tf.constant(seed, tf.int64)}
    out = ops.get_preprocess_fn(pp, **context)(example)
    return tf.nest.map_structure(lambda v: v.numpy(), out)


def _lesions(boxes, frames=None, **extra) -> dict:
    """A lesions dict as decoding gives it: boxes (y0, x0, y1, x1) normalised, [K, 4]."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    count = len(boxes)
    frames = np.zeros(count, np.int32) if frames is None else np.asarray(frames, np.int32)
    return {
        "box": boxes,
        "frame": frames,
        "segment": tf.constant(["mid_lad"] * count, tf.string),
        "severity": np.full(count, 70.0, np.float32),
        **extra,
    }


def _rectangle_clip(height: int, width: int, rect, num_frames: int = 2) -> np.ndarray:
    """uint8 [T, H, W, 1], black but for white pixel rows rect[0]..rect[2]-1 and
    columns rect[1]..rect[3]-1 (rect = (y0, x0, y1, x1) in pixel edges)."""
    clip = np.zeros([num_frames, height, width, 1], np.uint8)
    clip[:, rect[0] : rect[2], rect[1] : rect[3]] = 255
    return clip


def _normalised(rect, height: int, width: int) -> np.ndarray:
    return np.asarray(rect, np.float32) / np.array([height, width, height, width], np.float32)


def _bright_box(frame: np.ndarray) -> np.ndarray | None:
    """(y0, x0, y1, x1) in output pixel edges of the pixels above half intensity."""
    bright = frame > 127.5
    rows, cols = np.flatnonzero(bright.any(axis=1)), np.flatnonzero(bright.any(axis=0))
    if rows.size == 0:
        return None
    return np.array([rows[0], cols[0], rows[-1] + 1, cols[-1] + 1], np.float64)


def _check_box_on_pixels(out: dict, tolerance: float) -> None:
    """Every frame's bright pixels agree with the (one) output box within `tolerance`
    output pixels; a box with no bright pixels must be empty and not visible."""
    video = out["video"][..., 0]  # [T, h, w]
    height, width = video.shape[1:]
    box = out["lesions"]["box"][0] * np.array([height, width, height, width])
    for frame in video:
        bright = _bright_box(frame)
        if bright is None:
            assert not out["lesions"]["visible"][0]
            assert box[2] - box[0] < 1 or box[3] - box[1] < 1
        else:
            np.testing.assert_allclose(box, bright, atol=tolerance, rtol=0)


# ----------------------------------------------------------------------------- temporal


def _reference_clip_lesions(out: dict, frames, step: int, total: int):
    """NumPy: the nearest real clip frame (the first on ties) and whether the frame
    is in the video within step / 2 of it."""
    real = out["frame_indices"][out["frame_mask"]]  # the real frames lead the clip
    clip_frame, visible = [], []
    for frame in frames:
        distance = np.abs(real - frame)
        nearest = int(np.argmin(distance))
        clip_frame.append(nearest)
        visible.append(bool(distance[nearest] <= step / 2 and 0 <= frame < total))
    return np.array(clip_frame, np.int32), np.array(visible)


def _frames_example(total: int, fps: float = 15.0, **extra) -> dict:
    frames = np.zeros([total, 8, 8], np.uint8)
    return {
        "frames": tf.constant(dataset_format.encode_frames(frames)),
        "fps": tf.constant(fps, tf.float32),
        **extra,
    }


@pytest.mark.parametrize(
    "pp, total, fps, step, frames, clip_frame, visible",
    [
        # stride 1, clip 8..11: only the sampled frames themselves are in the clip
        ("decode_sample_frames(4)", 20, 15.0, 1,
         [7, 8, 11, 12, 0, 19], [0, 0, 3, 3, 0, 3], [0, 1, 1, 0, 0, 0]),
        # stride 2, clip 6, 8, ..., 14: one frame either side; 9 and 11 are ties
        ("decode_sample_frames(5, stride=2)", 21, 15.0, 2,
         [5, 4, 9, 11, 15, 16], [0, 0, 1, 2, 4, 4], [1, 0, 1, 1, 1, 0]),
        # stride 3, clip 0, 3, 6, 9 (span 10 of 11): 1.5 frames either side means 1
        ("decode_sample_frames(4, stride=3)", 11, 15.0, 3,
         [1, 2, 4, 10, -1], [0, 1, 1, 3, 0], [1, 1, 1, 1, 0]),
        # a short video: clip 0, 2, 4 + padding; frame 5 is not in the video
        ("decode_sample_frames(4, stride=2)", 5, 15.0, 2,
         [4, 5, 3, -1], [2, 2, 1, 0], [1, 0, 1, 0]),
        # 6 frames, clip 0, 2, 4 + the padded frame (which shows 5): 5 is in, near 4
        ("decode_sample_frames(4, stride=2, pad='zeros')", 6, 15.0, 2,
         [5, 6], [2, 2], [1, 0]),
        # target_fps: 30 -> 15 fps is stride 2 (not the stride argument 1), clip 16..22
        ("decode_sample_frames(4, target_fps=15)", 40, 30.0, 2,
         [23, 24, 15, 17], [3, 3, 0, 0], [1, 0, 1, 1]),
        # fps unknown: the stride argument (3), clip 15, 18, 21, 24
        ("decode_sample_frames(4, stride=3, target_fps=15)", 40, 0.0, 3,
         [13, 14, 16, 26], [0, 0, 0, 3], [0, 1, 1, 0]),
    ],
)
def test_decode_sample_frames_places_lesions_in_the_clip(
    pp, total, fps, step, frames, clip_frame, visible
):
    boxes = np.tile([[0.1, 0.2, 0.3, 0.4]], [len(frames), 1])
    out = _run(pp, _frames_example(total, fps, lesions=_lesions(boxes, frames)))
    lesions = out["lesions"]
    assert lesions["clip_frame"].dtype == np.int32 and lesions["visible"].dtype == bool
    np.testing.assert_array_equal(lesions["clip_frame"], clip_frame)
    np.testing.assert_array_equal(lesions["visible"], np.array(visible, bool))
    expected = _reference_clip_lesions(out, frames, step, total)
    np.testing.assert_array_equal(lesions["clip_frame"], expected[0])
    np.testing.assert_array_equal(lesions["visible"], expected[1])
    np.testing.assert_array_equal(lesions["box"], boxes.astype(np.float32))
    np.testing.assert_array_equal(lesions["frame"], frames)
    assert list(lesions["segment"]) == [b"mid_lad"] * len(frames)


def test_decode_sample_frames_lesions_match_numpy_for_random_offsets():
    frames = np.arange(-1, 32)
    example = _frames_example(30, lesions=_lesions(np.zeros([len(frames), 4]), frames))
    starts = set()
    for s in range(6):
        for num_frames, stride in [(5, 3), (4, 2), (6, 1)]:
            pp = f"decode_sample_frames({num_frames}, stride={stride})"
            out = _run(pp, example, seed=[s, 7], train=True)
            starts.add(int(out["frame_indices"][0]))
            clip_frame, visible = _reference_clip_lesions(out, frames, stride, 30)
            np.testing.assert_array_equal(out["lesions"]["clip_frame"], clip_frame)
            np.testing.assert_array_equal(out["lesions"]["visible"], visible)
    assert len(starts) > 5


def test_decode_sample_frames_ands_an_existing_visible_and_handles_no_lesions():
    lesions = _lesions(np.zeros([3, 4]), [8, 9, 30], visible=np.array([False, True, True]))
    out = _run("decode_sample_frames(4)", _frames_example(20, lesions=lesions))
    np.testing.assert_array_equal(out["lesions"]["visible"], [False, True, False])
    np.testing.assert_array_equal(out["lesions"]["clip_frame"], [0, 1, 3])
    empty = _run("decode_sample_frames(4)", _frames_example(20, lesions=_lesions([])))
    assert empty["lesions"]["clip_frame"].shape == (0,)
    assert empty["lesions"]["visible"].shape == (0,)


# ----------------------------------------------------------------------------- spatial

HEIGHT, WIDTH = 56, 64
LESION = (22, 16, 34, 40)  # pixel edges (y0, x0, y1, x1): 12 x 24, left of centre


@pytest.mark.parametrize(
    "pp, tolerance",
    [
        ("random_resized_crop((32, 40), scale=(0.3, 1.0))", 0.55),  # shrinks
        ("random_resized_crop((96, 80), scale=(0.3, 1.0))", 0.55),  # enlarges
        ("random_resized_crop((40, 40), scale=(0.3, 1.0), antialias=True)", 0.55),
        ("central_crop((40, 30))", 1e-4),
        ("central_crop((16, 20))", 1e-4),  # cuts the lesion's sides
        ("resize((40, 96))", 0.55),
        ("resize((24, 32), antialias=True)", 0.55),
        ("flip_left_right()", 1e-4),
    ],
)
def test_crop_resize_and_flip_boxes_follow_the_pixels(pp, tolerance):
    example = {
        "video": _rectangle_clip(HEIGHT, WIDTH, LESION),
        "lesions": _lesions(_normalised(LESION, HEIGHT, WIDTH)),
    }
    flipped = 0
    for s in range(12):
        out = _run(pp, example, seed=[s, 1])
        _check_box_on_pixels(out, tolerance)
        box = out["lesions"]["box"][0]
        assert (box >= 0).all() and (box <= 1).all()
        flipped += box[1] > 0.3  # 0.25 as it was, 0.375 mirrored
    if pp.startswith("flip"):
        assert 0 < flipped < 12  # both branches were checked
    if pp.startswith("resize"):
        np.testing.assert_allclose(box, _normalised(LESION, HEIGHT, WIDTH), rtol=0, atol=1e-7)


def _reflection_reach(height: int, width: int, min_zoom: float) -> tuple[float, float]:
    """How deep (y, x) into the frame reflected borders can reach: an output pixel
    samples at most half a diagonal / zoom from the centre, and what lies beyond an
    edge is mirrored back inside by as much."""
    radius = math.hypot(height, width) / 2 / min_zoom
    return radius - height / 2, radius - width / 2


def test_scale_rotate_jitter_boxes_enclose_the_rotated_lesion():
    reach_y, reach_x = _reflection_reach(HEIGHT, WIDTH, 0.9)
    # The lesion lies deeper than any reflection reaches: the bright pixels are its own.
    assert min(LESION[0], HEIGHT - LESION[2]) > reach_y
    assert min(LESION[1], WIDTH - LESION[3]) > reach_x
    example = {
        "video": _rectangle_clip(HEIGHT, WIDTH, LESION),
        "lesions": _lesions(_normalised(LESION, HEIGHT, WIDTH)),
    }
    growth = []
    for s in range(12):
        out = _run("scale_rotate_jitter(0.1, 45.0)", example, seed=[s, 2])
        # The rotated rectangle's bound is its corners' bound: the box, to within the
        # bilinear blunting of the corners.
        _check_box_on_pixels(out, 1.0)
        box = out["lesions"]["box"][0] * np.array([HEIGHT, WIDTH, HEIGHT, WIDTH])
        growth.append((box[2] - box[0]) * (box[3] - box[1]) / (12 * 24))
        assert out["lesions"]["visible"][0]
    assert max(growth) > 1.6  # some angles near 45 degrees: the bound is much larger


def _jitter_draws(seed, max_scale: float, max_degrees: float) -> tuple[float, float]:
    """The zoom and angle (radians) scale_rotate_jitter draws as the first op of a pp
    string: the module's seed folding (op index 0, then salts 0 and 1)."""
    op_seed = tf.random.experimental.stateless_fold_in(tf.constant(seed, tf.int64), 0)

    def draw(salt: int, low: float, high: float) -> float:
        salted = tf.random.experimental.stateless_fold_in(op_seed, salt)
        return float(tf.random.stateless_uniform([], salted, minval=low, maxval=high))

    zoom = draw(0, 1 - max_scale, 1 + max_scale)
    return zoom, math.radians(draw(1, -max_degrees, max_degrees))


def _forward(points_xy: np.ndarray, zoom: float, angle: float, height: int, width: int):
    """Continuous pixel coordinates (x, y), y down, of input points in the output of a
    zoom and rotation about the frame centre: c + zoom R(angle) (p - c), as the op's
    inverse map in = c + R(-angle) (out - c) / zoom says."""
    centre = np.array([width / 2, height / 2])
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return centre + zoom * (points_xy - centre) @ rotation.T


def _blob_clip(points_xy: np.ndarray, height: int, width: int, sigma: float = 1.5) -> np.ndarray:
    """float32 [1, H, W, 1]: a Gaussian blob of peak 255 at each continuous point."""
    y, x = np.mgrid[0:height, 0:width] + 0.5  # pixel centres
    frame = sum(
        np.exp(-((x - px) ** 2 + (y - py) ** 2) / (2 * sigma**2)) for px, py in points_xy
    )
    return (255 * frame)[None, :, :, None].astype(np.float32)


def _centroid(frame: np.ndarray, around_xy: np.ndarray, radius: int = 6) -> np.ndarray:
    y, x = np.mgrid[0 : frame.shape[0], 0 : frame.shape[1]] + 0.5
    near = (np.abs(x - around_xy[0]) <= radius) & (np.abs(y - around_xy[1]) <= radius)
    weight = frame * near
    return np.array([(weight * x).sum(), (weight * y).sum()]) / weight.sum()


def test_scale_rotate_jitter_box_matches_numpy_affine():
    pp = "scale_rotate_jitter(0.5, 45.0)"
    # Blobs far apart, each well inside the frame, so that neither another blob nor a
    # reflected border falls in the window that measures where it went.
    points = np.array([[12.0, -6.0], [-10.0, 8.0], [4.0, 15.0]]) + [WIDTH / 2, HEIGHT / 2]
    blobs = {"video": _blob_clip(points, HEIGHT, WIDTH)}
    rects = np.array([[22, 16, 34, 40], [2, 3, 14, 15], [40, 50, 55, 63], [0, 0, 56, 64]])
    boxes = _lesions(rects / np.array([HEIGHT, WIDTH, HEIGHT, WIDTH]))
    marked = {"video": np.zeros([1, HEIGHT, WIDTH, 1], np.uint8), "lesions": boxes}
    outcomes = []
    for s in range(8):
        seed = [s, 3]
        zoom, angle = _jitter_draws(seed, 0.5, 45.0)
        # The draws and the formula are the warp's: the blobs land where they say.
        warped = _run(pp, blobs, seed=seed)["video"][0, ..., 0]
        for point in _forward(points, zoom, angle, HEIGHT, WIDTH):
            centroid = _centroid(warped, point, radius=max(3, round(6 * zoom)))
            np.testing.assert_allclose(centroid, point, atol=0.2, rtol=0)

        out = _run(pp, marked, seed=seed)["lesions"]
        for rect, box, visible in zip(rects, out["box"], out["visible"], strict=True):
            y0, x0, y1, x1 = rect
            corners = np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]], np.float64)
            mapped = _forward(corners, zoom, angle, HEIGHT, WIDTH)
            _check_mapped_box(box, visible, mapped, HEIGHT, WIDTH, outcomes)
    assert any(outcomes) and not all(outcomes)


def _check_mapped_box(box, visible, mapped_xy, height, width, outcomes: list) -> None:
    """The op's box is the clipped bound of the mapped corners (output pixels), and
    it is visible when at least half of that bound is in the frame (cases at exactly
    half, up to rounding, are skipped; the others are appended to `outcomes`)."""
    (left, top), (right, bottom) = mapped_xy.min(axis=0), mapped_xy.max(axis=0)
    bound = np.array([top / height, left / width, bottom / height, right / width])
    clipped = np.clip(bound, 0, 1)
    np.testing.assert_allclose(box, clipped, atol=2e-4, rtol=0)
    area = (bound[2] - bound[0]) * (bound[3] - bound[1])
    share = (clipped[2] - clipped[0]) * (clipped[3] - clipped[1]) / area
    if abs(share - 0.5) > 1e-3:
        assert visible == (share >= 0.5)
        outcomes.append(bool(visible))


def test_crop_visibility_drops_boxes_cut_by_more_than_half():
    size = 32  # central_crop(16) keeps pixels 8..23 of both axes
    rects = np.array([
        [10, 2, 20, 12],  # 4 of its 10 columns kept: dropped
        [10, 6, 20, 14],  # 6 of 8 kept: kept, clipped at the left edge
        [10, 4, 20, 12],  # exactly half: kept
        [10, 0, 20, 6],  # all outside: dropped, empty
        [12, 12, 18, 18],  # inside, but already not visible
    ])
    lesions = _lesions(rects / size, visible=np.array([True, True, True, True, False]))
    example = {"video": np.zeros([1, size, size, 1], np.uint8), "lesions": lesions}
    out = _run("central_crop(16)", example, seed=None)["lesions"]
    np.testing.assert_array_equal(out["visible"], [False, True, True, False, False])
    expected = np.clip((rects - 8) / 16, 0, 1)
    np.testing.assert_allclose(out["box"], expected, atol=1e-6, rtol=0)
    assert out["box"][3, 3] == out["box"][3, 1] == 0.0
    strict = _run("central_crop(16, min_visible=0.8)", example, seed=None)["lesions"]
    np.testing.assert_array_equal(strict["visible"], [False, False, False, False, False])
    with pytest.raises(ValueError, match="min_visible must be in"):
        ops.get_preprocess_fn("central_crop(16, min_visible=1.5)")


def test_random_crop_keeps_a_box_it_cuts_by_less_than_half():
    # Crops of 56 x 48 (3/4 of the area, aspect 6/7) at scale 1, left edge 0..16: they
    # cut a 16 x 16 lesion at the frame's left edge by 0..16 columns.
    rect = (20, 0, 36, 16)
    example = {
        "video": _rectangle_clip(HEIGHT, WIDTH, rect, num_frames=1),
        "lesions": _lesions(_normalised(rect, HEIGHT, WIDTH)),
    }
    aspect = 48 / 56
    pp = f"random_resized_crop((56, 48), scale=(0.75, 0.75), ratio=({aspect}, {aspect}))"
    kept = dropped = 0
    for s in range(30):
        out = _run(pp, example, seed=[s, 4])
        share = (out["video"][0, ..., 0] > 127.5).sum() / (16 * 16)
        _check_box_on_pixels(out, 1e-4)
        if share != 0.5:
            assert out["lesions"]["visible"][0] == (share > 0.5)
        kept += 0.5 < share < 1
        dropped += 0 < share < 0.5
    assert kept and dropped


def test_boxes_follow_a_lesion_through_a_whole_pp_string():
    """The lesion is drawn on frame 9 only: where the clip keeps it, the clip frame the
    lesion names shows it inside its box and the other frames are black."""
    frames = np.zeros([16, HEIGHT, WIDTH], np.uint8)
    frames[9, LESION[0] : LESION[2], LESION[1] : LESION[3]] = 255
    example = {
        "frames": tf.constant(dataset_format.encode_frames(frames)),
        "fps": tf.constant(15.0),
        "lesions": _lesions(_normalised(LESION, HEIGHT, WIDTH), [9]),
    }
    pp = ("decode_sample_frames(4)|random_resized_crop((48, 40), scale=(0.6, 1.0))"
          "|flip_left_right()|resize((36, 30))")
    seen = 0
    for s in range(12):
        out = _run(pp, example, seed=[s, 5], train=True)
        lesions = out["lesions"]
        if 9 not in out["frame_indices"]:
            assert not lesions["visible"][0] and out["video"].max() < 1e-3
        if not lesions["visible"][0]:
            continue
        seen += 1
        clip_frame = lesions["clip_frame"][0]
        assert out["frame_indices"][clip_frame] == 9
        others = np.delete(out["video"], clip_frame, axis=0)
        assert others.max() < 1e-3
        _check_box_on_pixels({"video": out["video"][clip_frame : clip_frame + 1],
                              "lesions": lesions}, 1.0)
    assert 0 < seen < 12


PP_ALL = (
    "decode_sample_frames(4, stride=2)|random_resized_crop((40, 36))"
    "|scale_rotate_jitter(0.2, 30.0)|flip_left_right()|central_crop((32, 30))|resize(24)"
)


def test_outputs_without_lesions_are_unchanged():
    frames = np.random.default_rng(0).integers(0, 256, [12, HEIGHT, WIDTH], dtype=np.uint8)
    example = {"frames": tf.constant(dataset_format.encode_frames(frames)),
               "fps": tf.constant(15.0)}
    lesions = _lesions([[0.1, 0.1, 0.5, 0.6], [0.7, 0.0, 0.9, 0.2]], [3, 6])
    for s in range(4):
        bare = _run(PP_ALL, example, seed=[s, 6], train=True)
        marked = _run(PP_ALL, {**example, "lesions": lesions}, seed=[s, 6], train=True)
        assert "lesions" not in bare and set(marked) == set(bare) | {"lesions"}
        for key, value in bare.items():
            np.testing.assert_array_equal(marked[key], value)


def test_zero_lesions_pass_through_every_op():
    example = {"frames": tf.constant(dataset_format.encode_frames(np.zeros([6, 40, 40], np.uint8))),
               "fps": tf.constant(15.0), "lesions": _lesions([])}
    out = _run(PP_ALL, example, train=True)
    assert out["lesions"]["box"].shape == (0, 4) and out["lesions"]["visible"].shape == (0,)
    assert out["video"].shape == (4, 24, 24, 1)


# ------------------------------------------------- random_resized_crop with zoom and rotation

FUSED_PP = "random_resized_crop((40, 48), scale=(0.5, 0.9), max_scale=0.3, max_degrees=30.0)"


def _fused_draws(seed, height: int, width: int):
    """The crop window (top, left, crop_h, crop_w), zoom and angle (radians) that
    FUSED_PP draws as the first op of a pp string (op index 0, salts 0-5)."""
    op_seed = tf.random.experimental.stateless_fold_in(tf.constant(seed, tf.int64), 0)

    def salted(salt):
        return tf.random.experimental.stateless_fold_in(op_seed, salt)

    def uniform(salt, low, high):
        return float(tf.random.stateless_uniform([], salted(salt), minval=low, maxval=high))

    def randint(salt, maxval):
        return int(tf.random.stateless_uniform([], salted(salt), 0, maxval, dtype=tf.int32))

    area = height * width * uniform(0, 0.5, 0.9)
    aspect = math.exp(uniform(1, math.log(3 / 4), math.log(4 / 3)))
    crop_w = int(np.clip(np.round(np.float32(math.sqrt(area * aspect))), 1, width))
    crop_h = int(np.clip(np.round(np.float32(math.sqrt(area / aspect))), 1, height))
    top, left = randint(2, height - crop_h + 1), randint(3, width - crop_w + 1)
    zoom = uniform(4, 0.7, 1.3)
    angle = math.radians(uniform(5, -30.0, 30.0))
    return (top, left, crop_h, crop_w), zoom, angle


def _numpy_fused(frames: np.ndarray, window, zoom, angle, out_h, out_w) -> np.ndarray:
    """An independent NumPy warp: output pixel centre p (continuous) -> rotated back
    about the output centre c, q = c + R(-angle)(p - c) / zoom -> input continuous
    coordinates top/left + q * crop / out -> bilinear at pixel centres, mirrored."""
    top, left, crop_h, crop_w = window
    height, width = frames.shape[1:3]
    py, px = np.mgrid[0:out_h, 0:out_w] + 0.5
    cx, cy = out_w / 2, out_h / 2
    cos, sin = math.cos(angle), math.sin(angle)
    qx = cx + (cos * (px - cx) + sin * (py - cy)) / zoom
    qy = cy + (-sin * (px - cx) + cos * (py - cy)) / zoom
    x = left + qx * crop_w / out_w - 0.5  # pixel-index coordinates
    y = top + qy * crop_h / out_h - 0.5

    def mirror(i, n):
        i = np.mod(i, 2 * n)
        return np.where(i >= n, 2 * n - 1 - i, i)

    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - x0, y - y0
    out = []
    for frame in frames[..., 0].astype(np.float64):
        def at(yy, xx, frame=frame):
            return frame[mirror(yy, height), mirror(xx, width)]

        top_row = at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx
        bottom_row = at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx
        out.append(top_row * (1 - fy) + bottom_row * fy)
    return np.stack(out)[..., None]


def test_fused_crop_zoom_rotation_equals_a_numpy_warp():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 50, 60, 1)).astype(np.uint8)
    for s in range(6):
        seed = [s, 7]
        window, zoom, angle = _fused_draws(seed, 50, 60)
        out = _run(FUSED_PP, {"video": frames}, seed=seed)["video"]
        assert out.shape == (3, 40, 48, 1) and out.dtype == np.float32
        expected = _numpy_fused(frames, window, zoom, angle, 40, 48)
        # float32 coordinates: about 1e-5 px, times gradients of up to 255 per pixel.
        np.testing.assert_allclose(out, expected, atol=1e-2, rtol=0)


def test_fused_without_rotation_is_the_crop_and_resize_inside():
    """Zoom 1 and angle 0 (a range of width 0 is not allowed; a tiny one is as good):
    the crop and resize's pixels, except on the border rows and columns that the
    resize clamps to the crop and the warp reads from beyond it."""
    frames = np.random.default_rng(1).integers(0, 256, (2, 50, 60, 1)).astype(np.uint8)
    plain = _run("random_resized_crop((40, 48), scale=(0.5, 0.9))", {"video": frames})["video"]
    fused = _run("random_resized_crop((40, 48), scale=(0.5, 0.9), max_scale=1e-7, "
                 "max_degrees=1e-7)", {"video": frames})["video"]
    np.testing.assert_allclose(fused[:, 1:-1, 1:-1], plain[:, 1:-1, 1:-1], atol=1e-2, rtol=0)


def test_fused_boxes_follow_the_window_then_the_rotation():
    rects = np.array([[12, 20, 30, 38], [2, 3, 14, 15], [30, 44, 48, 58]])
    marked = {"video": np.zeros([1, 50, 60, 1], np.uint8),
              "lesions": _lesions(rects / np.array([50, 60, 50, 60]))}
    outcomes = []
    for s in range(10):
        seed = [s, 2]
        (top, left, crop_h, crop_w), zoom, angle = _fused_draws(seed, 50, 60)
        out = _run(FUSED_PP, marked, seed=seed)["lesions"]
        for rect, box, visible in zip(rects, out["box"], out["visible"], strict=True):
            y0, x0, y1, x1 = rect
            corners = np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]], np.float64)
            in_crop = (corners - [left, top]) / [crop_w, crop_h] * [48, 40]  # output pixels
            mapped = _forward(in_crop, zoom, angle, 40, 48)
            _check_mapped_box(box, visible, mapped, 40, 48, outcomes)
    assert any(outcomes) and not all(outcomes)


def test_fused_options_are_checked():
    with pytest.raises(ValueError, match="antialias=True does not go with"):
        ops.get_preprocess_fn("random_resized_crop(32, max_degrees=5.0, antialias=True)")
    with pytest.raises(ValueError, match="max_degrees must be in"):
        ops.get_preprocess_fn("random_resized_crop(32, max_degrees=50.0)")
