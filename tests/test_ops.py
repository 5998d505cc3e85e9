"""Tests of input_pipeline/ops.py: parsing, frame sampling, spatial/intensity ops, tokenisation.

The ops run eagerly on hand-made examples; expected values come from NumPy.
"""

import numpy as np
import pytest
import tensorflow as tf

from deepcoro_jax.domain.tokenizers import get_tokenizer, train_sentencepiece
from input_pipeline import dataset_format, ops

REPORTS = [
    "Severe stenosis of the mid LAD, approximately 80%.",
    "The left main is normal. Right dominant system.",
    "Chronic total occlusion of the proximal RCA with collaterals.",
    "Moderate stenosis of the first diagonal, 60%. Mild disease of the distal LCx.",
    "Critical stenosis of OM1, 95%. Co-dominant circulation.",
]
SEED = np.array([3, 7], np.int64)


@pytest.fixture(scope="module")
def sp_spec(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("spm") / "spm.model"
    train_sentencepiece(REPORTS * 4, str(path), vocab_size=80)
    return f"sp:{path}"


def _video(num_frames: int, size: int = 16) -> np.ndarray:
    """Frames whose every pixel says which frame it is (value 6 * t + 3)."""
    return np.stack([np.full([size, size], 6 * t + 3, np.uint8) for t in range(num_frames)])


def _example(frames: np.ndarray, fps: float = 15.0, **extra) -> dict:
    encoded = dataset_format.encode_frames(frames)
    return {
        "frames": tf.constant(encoded),
        "fps": tf.constant(fps, tf.float32),
        "report": tf.constant(REPORTS[0]),
        **extra,
    }


def _run(pp: str, example: dict, seed=SEED, **context) -> dict:
    example = tf.nest.map_structure(tf.convert_to_tensor, example)
    if seed is not None:
        example = {**example, ops.SEED_KEY: tf.constant(seed, tf.int64)}
    out = ops.get_preprocess_fn(pp, **context)(example)
    return {k: (v.numpy() if isinstance(v, tf.Tensor) else v) for k, v in out.items()}


# ----------------------------------------------------------------------------- parsing


def test_split_keeps_bars_inside_strings_and_brackets():
    parts = ops._split_ops("a(1)|keep('x|y', \"z\")| b ( [1, 2] )")
    assert parts == ["a(1)", "keep('x|y', \"z\")", "b ( [1, 2] )"]


@pytest.mark.parametrize(
    "pp, message",
    [
        ("decode_sample_frames(4)|no_such_op(3)", "unknown pp op 'no_such_op'"),
        ("decode_sample_frames(4, strid=2)", "decode_sample_frames(4, strid=2)"),
        ("decode_sample_frames(0)", "num_frames must be a positive int"),
        ("decode_sample_frames(4, pad='mirror')", "pad must be one of"),
        ("value_range(-1, x)", "is not a Python literal"),
        ("resize(8)||value_range()", "empty op"),
        ("resize(8", "not a valid op call"),
        ("random_resized_crop(8, scale=(0.0, 1.0))", "scale must satisfy"),
        ("keep()", "give at least one key"),
    ],
)
def test_bad_pp_strings_raise_naming_the_problem(pp, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ops.get_preprocess_fn(pp)


def test_context_fills_only_unset_keyword_arguments():
    example = _example(_video(20))
    # train=True from the context: a random offset; the string's train=False wins over it.
    centred = _run("decode_sample_frames(4, train=False)", example, train=True)
    np.testing.assert_array_equal(centred["frame_indices"], [8, 9, 10, 11])
    offsets = {
        int(_run("decode_sample_frames(4)", example, seed=[s, 0], train=True)["frame_indices"][0])
        for s in range(12)
    }
    assert len(offsets) > 3 and min(offsets) >= 0 and max(offsets) <= 16


def test_random_op_without_seed_raises():
    with pytest.raises(ValueError, match="needs a per-example '_seed'"):
        _run("decode_sample_frames(4)|random_resized_crop(8)", _example(_video(8)), seed=None)


# ----------------------------------------------------------------------------- temporal


def _reference_indices(total: int, num_frames: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    span = (num_frames - 1) * stride + 1
    offset = max(total - span, 0) // 2
    positions = offset + stride * np.arange(num_frames)
    return np.minimum(positions, total - 1), positions < total


@pytest.mark.parametrize(
    "total, num_frames, stride", [(20, 4, 3), (21, 5, 2), (9, 3, 4), (7, 4, 1)]
)
def test_centred_sampling_matches_numpy(total, num_frames, stride):
    frames = _video(total)
    out = _run(f"decode_sample_frames({num_frames}, stride={stride})", _example(frames))
    indices, mask = _reference_indices(total, num_frames, stride)
    np.testing.assert_array_equal(out["frame_indices"], indices)
    np.testing.assert_array_equal(out["frame_mask"], mask)
    assert out["video"].dtype == np.uint8 and out["video"].shape == (num_frames, 16, 16, 1)
    np.testing.assert_array_equal(out["video"][..., 0], frames[indices])


@pytest.mark.parametrize("pad", ["last", "zeros"])
def test_short_clip_is_padded_and_masked(pad):
    frames = _video(5)
    out = _run(f"decode_sample_frames(4, stride=2, pad={pad!r})", _example(frames))
    np.testing.assert_array_equal(out["frame_mask"], [True, True, True, False])
    np.testing.assert_array_equal(out["frame_indices"], [0, 2, 4, 4])
    np.testing.assert_array_equal(out["video"][:3, ..., 0], frames[[0, 2, 4]])
    expected_pad = frames[4] if pad == "last" else np.zeros_like(frames[4])
    np.testing.assert_array_equal(out["video"][3, ..., 0], expected_pad)


@pytest.mark.parametrize("fps, stride", [(30.0, 2), (15.0, 1), (60.0, 4), (7.5, 1), (0.0, 3)])
def test_target_fps_sets_the_stride_from_the_example_fps(fps, stride):
    total = 40
    out = _run("decode_sample_frames(4, stride=3, target_fps=15)", _example(_video(total), fps=fps))
    indices, _ = _reference_indices(total, 4, stride)
    np.testing.assert_array_equal(out["frame_indices"], indices)


def test_train_sampling_picks_consecutive_strided_frames_in_range():
    for s in range(8):
        out = _run("decode_sample_frames(5, stride=3)", _example(_video(30)), [s, 1], train=True)
        indices = out["frame_indices"]
        np.testing.assert_array_equal(np.diff(indices), 3)
        assert 0 <= indices[0] <= 30 - 13 and out["frame_mask"].all()


# ----------------------------------------------------------------------------- spatial


def _ramp_clip(num_frames: int = 3, size: int = 32) -> np.ndarray:
    """Brighter to the right (x) and, less so, downwards (y): asymmetric in both axes."""
    y, x = np.mgrid[0:size, 0:size]
    frame = (6 * x + 2 * y).astype(np.uint8)  # 0..248
    return np.repeat(frame[None, :, :, None], num_frames, axis=0)


def test_random_resized_crop_keeps_orientation_and_one_box_per_clip():
    clip = tf.constant(_ramp_clip())
    for s in range(10):
        out = _run("random_resized_crop(16)", {"video": clip}, [s, 0])["video"]
        assert out.shape == (3, 16, 16, 1) and out.dtype == np.float32
        np.testing.assert_allclose(out[1], out[0])
        np.testing.assert_allclose(out[2], out[0])
        columns, rows = out[0, ..., 0].mean(axis=0), out[0, ..., 0].mean(axis=1)
        assert (np.diff(columns) > 0).all() and (np.diff(rows) > 0).all()
    flipped = _run("random_resized_crop(16)|flip_left_right(1.0)", {"video": clip})["video"]
    assert (np.diff(flipped[0, ..., 0].mean(axis=0)) < 0).all()


def test_full_box_crop_equals_resize_and_central_crop_equals_slicing():
    clip = _ramp_clip(2, 20)
    full = _run("random_resized_crop(10, scale=(1.0, 1.0), ratio=(1.0, 1.0))", {"video": clip})
    resized = _run("resize(10)", {"video": clip}, seed=None)
    np.testing.assert_allclose(full["video"], resized["video"], atol=1e-4)
    # Halving a linear ramp with a symmetric kernel gives each 2x2 block's mean (away
    # from the borders, where the antialiasing kernel is cut).
    blocks = clip[0, ..., 0].astype(np.float32).reshape(10, 2, 10, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(resized["video"][0, 1:-1, 1:-1, 0], blocks[1:-1, 1:-1], atol=1e-3)
    central = _run("central_crop((8, 6))", {"video": clip}, seed=None)["video"]
    np.testing.assert_array_equal(central, clip[:, 6:14, 7:13])


def test_scale_rotate_jitter_identity_and_orientation():
    clip = _ramp_clip()
    same = _run("scale_rotate_jitter(0.0, 0.0)", {"video": clip})["video"]
    np.testing.assert_allclose(same, clip.astype(np.float32), atol=1e-3)
    for s in range(5):
        out = _run("scale_rotate_jitter(0.1, 10.0)", {"video": clip}, [s, 2])["video"]
        assert not np.allclose(out, clip)
        np.testing.assert_allclose(out[1], out[0])
        assert out[0, :, :16].mean() < out[0, :, 16:].mean()


# ----------------------------------------------------------------------------- intensity


def test_gamma_jitter_is_one_power_law_for_the_whole_clip():
    clip = np.stack([np.arange(256, dtype=np.uint8).reshape(16, 16)] * 2)[..., None]
    out = _run("intensity_jitter(0.0, 0.0, 0.3)", {"video": clip})["video"]
    x = clip[..., 0].astype(np.float64) / 255.0
    y = out[..., 0].astype(np.float64) / 255.0
    gamma = np.log(y[0, 8, 0]) / np.log(x[0, 8, 0])
    assert 0.7 <= gamma <= 1.3 and abs(gamma - 1.0) > 1e-3
    np.testing.assert_allclose(y, x**gamma, atol=1e-4)


def test_intensity_jitter_stays_in_range_and_identity_when_off():
    clip = _ramp_clip()
    off = _run("intensity_jitter(0.0, 0.0, 0.0)", {"video": clip})["video"]
    np.testing.assert_allclose(off, clip.astype(np.float32), atol=1e-3)
    for s in range(5):
        out = _run("intensity_jitter(0.5, 0.5, 0.5)", {"video": clip}, [s, 3])["video"]
        assert out.min() >= 0.0 and out.max() <= 255.0
        np.testing.assert_allclose(out[2], out[0])


def test_value_range_matches_numpy():
    clip = _ramp_clip()
    out = _run("value_range(-1, 1)", {"video": clip}, seed=None)["video"]
    np.testing.assert_allclose(out, clip.astype(np.float32) / 127.5 - 1.0, atol=1e-6)
    out = _run("value_range(0, 1, 0, 248)", {"video": clip}, seed=None)["video"]
    assert out.min() == 0.0 and out.max() == 1.0


# ----------------------------------------------------------------------------- text


def test_tokenize_round_trips_with_bos_eos_and_mask(sp_spec):
    tok = get_tokenizer(sp_spec)
    for report in REPORTS:
        out = _run(f"tokenize(64, tokenizer={sp_spec!r})", {"report": tf.constant(report)}, None)
        ids, mask = out["text_ids"], out["text_mask"]
        tokens = tok.encode(report)
        assert ids.dtype == np.int32 and ids.shape == (64,)
        np.testing.assert_array_equal(ids[: len(tokens) + 2], [tok.bos_id, *tokens, tok.eos_id])
        assert (ids[len(tokens) + 2 :] == tok.pad_id).all()
        np.testing.assert_array_equal(mask, np.arange(64) < len(tokens) + 2)
        assert tok.decode(ids) == report


def test_tokenize_truncation_keeps_bos_and_eos(sp_spec):
    tok = get_tokenizer(sp_spec)
    tokens = tok.encode(REPORTS[3])
    out = _run(f"tokenize(8, tokenizer={sp_spec!r})", {"report": tf.constant(REPORTS[3])}, None)
    np.testing.assert_array_equal(out["text_ids"], [tok.bos_id, *tokens[:6], tok.eos_id])
    assert out["text_mask"].all()
    bare = f"tokenize(8, tokenizer={sp_spec!r}, bos=False, eos=False, outkey='t', mask_key='m')"
    out = _run(bare, {"report": tf.constant(REPORTS[3])}, None)
    np.testing.assert_array_equal(out["t"], tokens[:8])


def test_findings_id_is_equal_for_the_same_findings_in_other_words():
    from deepcoro_jax.domain import reports

    texts = ["Right dominant circulation. 70% stenosis of the proximal LAD.",
             "Prox LAD: severe ~70% lesion. Dominance: right.",
             "Right dominant circulation. 80% stenosis of the proximal LAD.",
             "Procedure uncomplicated.", "Radial access, no complications."]
    ids = [int(_run("findings_id()", {"report": tf.constant(t)}, None)["findings_id"])
           for t in texts]
    assert ids[0] == ids[1] and len(set(ids[1:])) == 4  # unread reports: their own text
    assert reports.findings_key(texts[3]) == "text:" + texts[3]
    out = _run("findings_id(key='r', outkey='f')", {"r": tf.constant(texts[0])}, None)
    assert out["f"].dtype == np.int32 and int(out["f"]) == ids[0]


def test_caption_in_out_are_shifted_and_truncation_drops_eos(sp_spec):
    tok = get_tokenizer(sp_spec)
    for report in REPORTS:
        tokens = tok.encode(report)
        for max_len in (len(tokens) - 2, len(tokens), len(tokens) + 1, 48):
            pp = f"tokenize_caption({max_len}, tokenizer={sp_spec!r})"
            out = _run(pp, {"report": tf.constant(report)}, None)
            cin, cout, mask = out["caption_in"], out["caption_out"], out["caption_mask"]
            length = int(mask.sum())
            assert cin[0] == tok.bos_id
            np.testing.assert_array_equal(cin[1:length], cout[: length - 1])
            np.testing.assert_array_equal(mask, np.arange(max_len) < length)
            assert (cout[length:] == tok.pad_id).all() and (cin[length:] == tok.pad_id).all()
            if len(tokens) >= max_len:
                assert length == max_len and tok.eos_id not in cout
                np.testing.assert_array_equal(cout, tokens[:max_len])
            else:
                np.testing.assert_array_equal(cout[:length], [*tokens, tok.eos_id])
                assert tok.decode(cout) == report == tok.decode(cin)


def test_dataset_tokenizer_needs_data_dir():
    with pytest.raises(ValueError, match="needs the data_dir context"):
        ops.get_preprocess_fn("tokenize(16)")


# ----------------------------------------------------------------------------- keys


def test_keep_and_flatten_labels():
    example = {
        "row": tf.constant(3),
        "report": tf.constant("x"),
        "labels": {"left_max_stenosis": tf.constant(70.0), "view": tf.constant("LAO")},
    }
    out = _run("flatten_labels|keep('row', 'label/left_max_stenosis', 'label/view')", example, None)
    assert out == {"row": 3, "label/left_max_stenosis": np.float32(70.0), "label/view": b"LAO"}
    with pytest.raises(KeyError, match="key 'video' not in the example"):
        _run("keep('row', 'video')", example, None)
