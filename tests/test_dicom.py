"""Tests of DICOM decoding (transfer syntaxes, gray mapping, frame rate) and resampling in time.

The sources are the test files that ship inside the pydicom wheel, read from
its package folder so that nothing is downloaded, and cines built here from
them. The reference is pydicom's own decoding (``ds.pixel_array``) put through
`_reference`, a NumPy formula of the mapping that video_io's docstring states.
"""

import json
import pathlib

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from test_prepare import COLUMNS, _read_back, _write_manifest
from test_video_io import write_container, write_dicom

from input_pipeline import dataset_format, prepare, video_io

TEST_FILES = pathlib.Path(pydicom.data.__file__).parent / "test_files"
# (bundled file, its transfer syntax): every syntax the wheel ships a decodable file of.
BUNDLED = [
    ("SC_rgb_jpeg_gdcm.dcm", JPEGLosslessSV1),  # RGB
    ("SC_rgb_jpeg_dcmtk.dcm", JPEGBaseline8Bit),  # YBR_FULL
    ("examples_ybr_color.dcm", JPEGBaseline8Bit),  # a 30-frame YBR_FULL_422 cine
    ("JPGExtended.dcm", JPEGExtended12Bit),  # 12 bits stored, no window
    ("MR_small_jpeg_ls_lossless.dcm", JPEGLSLossless),  # signed 16-bit, window
    ("JPEGLSNearLossless_16.dcm", JPEGLSNearLossless),  # unsigned 16-bit, no window
    ("MR_small_jp2klossless.dcm", JPEG2000Lossless),
    ("693_J2KI.dcm", JPEG2000),  # signed 14-bit CT, rescale and window
    ("MR_small_RLE.dcm", RLELossless),
    ("MR_small.dcm", ExplicitVRLittleEndian),
    ("CT_small.dcm", ExplicitVRLittleEndian),  # signed 16-bit, rescale, no window
    ("MR_small_implicit.dcm", ImplicitVRLittleEndian),
    ("image_dfl.dcm", DeflatedExplicitVRLittleEndian),
    ("MR_small_bigendian.dcm", ExplicitVRBigEndian),
]


def _bundled(name):
    path = TEST_FILES / name
    assert path.is_file(), f"{name} is not in the installed pydicom wheel"
    return str(path)


def _center_square(frames):
    """[T, H, W] -> the centered [T, S, S], S = min(H, W) (load_video at size S: no resize)."""
    height, width = frames.shape[1:3]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return frames[:, top : top + side, left : left + side]


def _reference(ds):
    """What load_video must return for `ds` at its shorter side: uint8 [T, S, S]."""
    assert not {"ModalityLUTSequence", "VOILUTSequence", "VOILUTFunction"} & set(ds.dir())
    pixels = ds.pixel_array  # pydicom's decoding, YBR_* converted to RGB
    if int(ds.get("NumberOfFrames") or 1) == 1:
        pixels = pixels[None]
    if ds.SamplesPerPixel == 3:  # ITU-R 601 luma of 8-bit RGB
        luma = pixels.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return _center_square(np.clip(np.rint(luma), 0, 255).astype(np.uint8))
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    values = pixels.astype(np.float64) * slope + intercept
    if "WindowCenter" in ds:  # PS3.3 C.11.2.1.2.1 (LINEAR) onto 0..1, the first window
        center = float(np.atleast_1d(ds.WindowCenter)[0])
        width = float(np.atleast_1d(ds.WindowWidth)[0])
        unit = np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    else:  # the range the stored bits can hold, through the rescale
        bits = ds.BitsStored
        low = -(2 ** (bits - 1)) if ds.PixelRepresentation == 1 else 0
        high = low + 2**bits - 1
        low, high = low * slope + intercept, high * slope + intercept
        unit = (values - low) / (high - low)
    gray = np.rint(unit * 255).astype(np.uint8)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        gray = 255 - gray
    return _center_square(gray)


@pytest.mark.parametrize("name, syntax", BUNDLED, ids=[name for name, _ in BUNDLED])
def test_bundled_files_decode_like_pydicom(name, syntax):
    path = _bundled(name)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == syntax
    expected = _reference(ds)
    video = video_io.load_video(path, expected.shape[1])
    assert video.source_shape == (ds.Rows, ds.Columns)
    np.testing.assert_array_equal(video.frames, expected)
    assert len(np.unique(expected)) > 1  # not a flat image


# (bundled file, the syntax to label its cine with, PhotometricInterpretation or None to keep).
CINES = [
    ("SC_rgb_jpeg_gdcm.dcm", JPEGLosslessSV1, None),
    ("SC_rgb_jpeg_gdcm.dcm", JPEGLossless, None),  # a SV1 codestream is a Process 14 one
    ("SC_rgb_jpeg_dcmtk.dcm", JPEGBaseline8Bit, None),
    ("JPGExtended.dcm", JPEGExtended12Bit, "MONOCHROME1"),
    ("MR_small_jpeg_ls_lossless.dcm", JPEGLSLossless, "MONOCHROME1"),
    ("MR_small_jp2klossless.dcm", JPEG2000Lossless, None),
]


@pytest.mark.parametrize("name, syntax, photometric", CINES)
def test_multi_frame_cine_keeps_every_frame(name, syntax, photometric, tmp_path):
    ds = pydicom.dcmread(_bundled(name))
    [frame] = generate_frames(ds.PixelData, number_of_frames=1)
    expected = _reference(ds)  # [1, S, S], before any relabelling
    if photometric == "MONOCHROME1":
        expected = 255 - expected  # vessels stay dark
        ds.PhotometricInterpretation = photometric
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([frame] * 7)
    ds.NumberOfFrames = 7
    ds.CineRate = 15
    path = str(tmp_path / "cine.dcm")
    ds.save_as(path)
    video = video_io.load_video(path, expected.shape[1])
    np.testing.assert_array_equal(video.frames, np.repeat(expected, 7, axis=0))
    assert video.fps == 15.0


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_12bit_monochrome1_cine_in_order_and_resampled(syntax, tmp_path):
    """A cine of distinct frames, compressed by pydicom's encoders: frame order and timing."""
    values = np.random.default_rng(0).integers(0, 4096, (6, 32, 48), dtype=np.uint16)
    path, _ = write_dicom(tmp_path / "a.dcm", values, "mono1_16", FrameTime="133.333")
    ds = pydicom.dcmread(path)
    ds.compress(syntax)
    ds.save_as(path)
    expected = 255 - np.rint(values[:, :, 8:40] * (255 / 4095)).astype(np.uint8)
    video = video_io.load_video(path, 32)
    np.testing.assert_array_equal(video.frames, expected)
    assert video.fps == pytest.approx(7.5, rel=1e-5)
    resampled = video_io.load_video(path, 32, fps=15)  # 7.5 -> 15: each frame twice
    np.testing.assert_array_equal(resampled.frames, np.repeat(expected, 2, axis=0))
    assert resampled.fps == 15.0


def test_real_30fps_cine_resampled_to_15_keeps_every_other_frame():
    path = _bundled("examples_ybr_color.dcm")  # FrameTime 33.333 ms, 30 frames
    full = video_io.load_video(path, 240)
    assert full.fps == pytest.approx(30.0, rel=1e-4) and len(full.frames) == 30
    half = video_io.load_video(path, 240, fps=15)
    np.testing.assert_array_equal(half.frames, full.frames[::2])
    assert half.fps == 15.0
    first = video_io.load_video(path, 240, max_frames=4, fps=15)  # counts resampled frames
    np.testing.assert_array_equal(first.frames, full.frames[:8:2])


def test_unknown_frame_rate_is_an_error_with_fps(tmp_path):
    path = _bundled("MR_small.dcm")  # no CineRate, FrameTime...
    assert video_io.load_video(path, 64).fps == 0.0
    with pytest.raises(video_io.VideoError) as info:
        video_io.load_video(path, 64, fps=15)
    assert info.value.kind == video_io.UNKNOWN_FRAME_RATE and "15" in str(info.value)
    with pytest.raises(ValueError, match="fps"):
        video_io.load_video(path, 64, fps=0)


@pytest.mark.parametrize(
    "num_frames, source_fps, target_fps, indices",
    [
        (4, 15, 30, [0, 0, 1, 1, 2, 2, 3, 3]),  # each frame twice
        (5, 30, 15, [0, 2, 4]),  # every other frame, from the first
        (6, 30, 15, [0, 2, 4]),
        (3, 7.5, 15, [0, 0, 1, 1, 2, 2]),
        (3, 7.5, 30, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]),
        (10, 30, 12.5, [0, 2, 4, 7, 9]),  # t * 30 = 0, 2.4, 4.8, 7.2, 9.6
        (4, 15, 15, [0, 1, 2, 3]),
        (1, 30, 7.5, [0]),
        (3, 1000 / 66.667, 30, [0, 0, 1, 1, 2, 2]),  # a rate read from a rounded FrameTime
        (300, 1000 / 33.333, 15, list(range(0, 300, 2))),
    ],
)
def test_resample_frames_picks_the_frame_on_display(num_frames, source_fps, target_fps, indices):
    frames = np.arange(num_frames)[:, None, None] * np.ones((1, 2, 3), np.int64)
    resampled = video_io.resample_frames(frames, source_fps, target_fps)
    np.testing.assert_array_equal(resampled, frames[indices])


def test_prepare_with_fps_resamples_and_records_it(tmp_path):
    cine = np.random.default_rng(1).integers(0, 256, (5, 16, 16), dtype=np.uint8)
    write_dicom(tmp_path / "cine.dcm", cine, "mono2", CineRate=15)
    clip = np.random.default_rng(2).integers(0, 256, (8, 16, 16), dtype=np.uint8)
    write_container(tmp_path / "clip.avi", clip, "ffv1", "gray", fps=30)
    np.save(tmp_path / "frames.npy", cine)  # no frame rate
    rows = [(name, "train", "Normal.") for name in ("cine.dcm", "clip.avi", "frames.npy")]
    manifest = _write_manifest(tmp_path / "m.csv", rows, ",", COLUMNS[:3])
    out = tmp_path / "out"
    args = ["--manifest", manifest, "--out", str(out), "--workers", "0", "--size", "16",
            "--frame_format", "png"]
    assert prepare.main([*args, "--vocab_size", "20", "--fps", "30"]) == 0
    assert dataset_format.load_meta(str(out)).fps == 30.0
    cine_example, clip_example = _read_back(out, "train")
    np.testing.assert_array_equal(cine_example["frames"][..., 0], np.repeat(cine, 2, axis=0))
    np.testing.assert_array_equal(clip_example["frames"][..., 0], clip)
    assert cine_example["fps"] == clip_example["fps"] == 30.0
    [failure] = json.loads((out / prepare.REPORT_FILE).read_text())["failed"]
    assert failure["path"] == "frames.npy"
    assert failure["reason"].startswith(video_io.UNKNOWN_FRAME_RATE + ": ")
