"""Tests of input_pipeline.video_io against files written here with PyAV, pydicom and NumPy.

The helpers `write_container` and `write_dicom` are shared with tests/test_prepare.py.
"""

import io
import pathlib
import subprocess
import sys

import av
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    MPEG4HP41,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    XRayAngiographicImageStorage,
    generate_uid,
)

from input_pipeline import video_io


def write_container(path, frames, codec, pix_fmt, fps=15, options=None):
    """Writes uint8 gray frames [T, H, W] as an AVI/MP4 file with PyAV."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options=options or {})
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="gray")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def write_dicom(path, frames, kind, **attributes):
    """Writes a multi-frame XA DICOM of `frames`, encoded as `kind`, plus `attributes`.

    kind: 'mono2' (uint8 [T, H, W]), 'mono1_16' (uint16, 12 bits stored), 'rgb'
    ([T, H, W, 3]), 'jpeg' (uint8, JPEG baseline per frame, returns the JPEG
    bytes too), 'rle' (uint8, RLE lossless), 'jpegls' (JPEG-LS frames that are
    not valid codestreams).
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = XRayAngiographicImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "XA"
    jpeg_frames = None
    if kind in ("mono2", "rle", "jpegls"):
        ds.set_pixel_data(frames, "MONOCHROME2", 8)
    elif kind == "mono1_16":
        ds.set_pixel_data(frames, "MONOCHROME1", 12)
    elif kind == "rgb":
        ds.set_pixel_data(frames, "RGB", 8)
    elif kind == "jpeg":
        ds.set_pixel_data(frames, "MONOCHROME2", 8)
        jpeg_frames = []
        for frame in frames:
            buf = io.BytesIO()
            Image.fromarray(frame).save(buf, format="JPEG", quality=90)
            jpeg_frames.append(buf.getvalue())
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PixelData = encapsulate(jpeg_frames)
        ds["PixelData"].VR = "OB"
    if kind == "rle":
        ds.compress(RLELossless)
    if kind == "jpegls":
        ds.file_meta.TransferSyntaxUID = JPEGLSLossless
        ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7 not decodable here"] * len(frames))
        ds["PixelData"].VR = "OB"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.save_as(str(path), enforce_file_format=True)
    return str(path), jpeg_frames


def _noise(shape, seed=0, high=256, dtype=np.uint8, low=0):
    return np.random.default_rng(seed).integers(low, high, shape, dtype=dtype)


def _luma(rgb):
    """ITU-R 601 luma, rounded: an independent reference for RGB -> gray."""
    weights = np.array([0.299, 0.587, 0.114])
    return np.clip(np.rint(rgb.astype(np.float64) @ weights), 0, 255).astype(np.uint8)


def _error_kind(path, size=32, **kwargs):
    with pytest.raises(video_io.VideoError) as info:
        video_io.load_video(str(path), size, **kwargs)
    assert str(info.value).startswith(info.value.kind + ": ")
    return info.value.kind, str(info.value)


# DICOM.


def test_dicom_monochrome2_8bit_is_lossless_and_reads_cine_rate(tmp_path):
    frames = _noise((5, 32, 32))
    path, _ = write_dicom(tmp_path / "a.dcm", frames, "mono2", CineRate=15)
    video = video_io.load_video(path, 32)
    np.testing.assert_array_equal(video.frames, frames)
    assert video.frames.dtype == np.uint8
    assert video.fps == 15.0
    assert video.source_shape == (32, 32)


def test_extensionless_dicom_is_recognised(tmp_path):
    frames = _noise((3, 16, 16))
    write_dicom(tmp_path / "a.dcm", frames, "mono2")
    (tmp_path / "a.dcm").rename(tmp_path / "IM0001")
    np.testing.assert_array_equal(video_io.load_video(str(tmp_path / "IM0001"), 16).frames, frames)


def test_dicom_monochrome1_16bit_window_is_applied_and_inverted(tmp_path):
    values = _noise((4, 24, 24), high=4096, dtype=np.uint16)
    center, width = 2000.0, 1000.0
    path, _ = write_dicom(
        tmp_path / "a.dcm",
        values,
        "mono1_16",
        WindowCenter=center,
        WindowWidth=width,
        FrameTime=1000 / 30,
    )
    video = video_io.load_video(path, 24)
    # DICOM PS3.3 C.11.2.1.2.1 (LINEAR) onto 0..255, then MONOCHROME1 inverted.
    windowed = np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0, 1) * 255
    np.testing.assert_array_equal(video.frames, 255 - np.rint(windowed).astype(np.uint8))
    assert video.fps == pytest.approx(30.0)


def test_dicom_12bit_without_window_maps_the_stored_bit_range(tmp_path):
    values = _noise((3, 16, 16), low=1000, high=3000, dtype=np.uint16)  # not the full range
    values[0, 0, :3] = 0, 2048, 4095
    path, _ = write_dicom(
        tmp_path / "a.dcm", values, "mono1_16", PhotometricInterpretation="MONOCHROME2"
    )
    video = video_io.load_video(path, 16)
    assert video.frames[0, 0, :3].tolist() == [0, 128, 255]  # 2048 * 255 / 4095 = 127.53
    np.testing.assert_array_equal(video.frames, np.rint(values * (255 / 4095)).astype(np.uint8))
    assert video.fps == 0.0

    signed = values.astype(np.int16) - 2048  # PixelRepresentation 1: -2048..2047
    path, _ = write_dicom(
        tmp_path / "s.dcm", signed, "mono1_16", PhotometricInterpretation="MONOCHROME2"
    )
    assert pydicom.dcmread(path).PixelRepresentation == 1
    video = video_io.load_video(path, 16)
    assert video.frames[0, 0, :3].tolist() == [0, 128, 255]
    np.testing.assert_array_equal(
        video.frames, np.rint((signed + 2048) * (255 / 4095)).astype(np.uint8)
    )


def test_dicom_frame_rate_from_frame_time_vector(tmp_path):
    intervals = [0, 66.7, 66.6, 66.7]  # ms since the previous frame; the first is 0
    path, _ = write_dicom(tmp_path / "a.dcm", _noise((4, 8, 8)), "mono2", FrameTimeVector=intervals)
    assert video_io.load_video(path, 8).fps == pytest.approx(1000 / ((66.7 + 66.6 + 66.7) / 3))
    path, _ = write_dicom(tmp_path / "b.dcm", _noise((1, 8, 8)), "mono2", FrameTimeVector=[0])
    assert video_io.load_video(path, 8).fps == 0.0  # one frame: no interval


def test_dicom_rgb_becomes_luma(tmp_path):
    rgb = _noise((3, 16, 16, 3))
    path, _ = write_dicom(tmp_path / "a.dcm", rgb, "rgb", RecommendedDisplayFrameRate=30)
    video = video_io.load_video(path, 16)
    np.testing.assert_array_equal(video.frames, _luma(rgb))
    assert video.fps == 30.0


def test_dicom_jpeg_baseline_decodes_like_pil(tmp_path):
    frames = np.kron(_noise((3, 4, 4)), np.ones((1, 8, 8), np.uint8))  # [3, 32, 32] blocks
    path, jpeg_frames = write_dicom(tmp_path / "a.dcm", frames, "jpeg")
    video = video_io.load_video(path, 32)
    expected = np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in jpeg_frames])
    np.testing.assert_array_equal(video.frames, expected)
    assert np.abs(video.frames.astype(int) - frames).mean() < 3


def test_dicom_rle_is_lossless(tmp_path):
    frames = _noise((4, 16, 16))
    path, _ = write_dicom(tmp_path / "a.dcm", frames, "rle")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(video_io.load_video(path, 16).frames, frames)


def test_dicom_max_frames_keeps_the_first_frames(tmp_path):
    frames = _noise((6, 16, 16))
    path, _ = write_dicom(tmp_path / "a.dcm", frames, "rle")
    np.testing.assert_array_equal(video_io.load_video(path, 16, max_frames=2).frames, frames[:2])


def test_undecodable_dicoms_name_the_problem(tmp_path, monkeypatch):
    path, _ = write_dicom(tmp_path / "ls.dcm", _noise((2, 16, 16)), "jpegls")
    kind, message = _error_kind(path)
    assert kind == video_io.UNDECODABLE_DICOM
    assert "JPEG-LS Lossless" in message and JPEGLSLossless in message and "frame 0" in message
    with monkeypatch.context() as patch:  # as without the plugins of requirements.txt
        decoder = pydicom.pixels.get_decoder(JPEGLSLossless)
        patch.setattr(decoder, "_available", {})
        patch.setattr(decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg-libjpeg>=2.1",)})
        kind, message = _error_kind(path)
        assert kind == video_io.UNDECODABLE_DICOM and "pylibjpeg-libjpeg" in message

    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = MPEG4HP41
    ds.save_as(path)
    kind, message = _error_kind(path)
    assert kind == video_io.UNDECODABLE_DICOM and "cannot decode" in message
    assert "MPEG-4" in message

    path, _ = write_dicom(tmp_path / "nopixels.dcm", _noise((2, 16, 16)), "mono2")
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    kind, message = _error_kind(path)
    assert kind == video_io.UNDECODABLE_DICOM and "Pixel Data" in message

    path, _ = write_dicom(tmp_path / "short.dcm", _noise((4, 16, 16)), "mono2")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-300])
    kind, message = _error_kind(path)
    assert kind == video_io.UNDECODABLE_DICOM and "Explicit VR Little Endian" in message

    path, _ = write_dicom(tmp_path / "badjpeg.dcm", _noise((2, 16, 16)), "jpeg")
    ds = pydicom.dcmread(path)
    ds.PixelData = encapsulate([b"\xff\xd8 corrupt"] * 2)
    ds.save_as(path)
    kind, message = _error_kind(path)
    assert kind == video_io.UNDECODABLE_DICOM and "JPEG Baseline" in message


# AVI and MP4.


def test_lossless_avi_round_trips_exactly(tmp_path):
    frames = _noise((6, 32, 32))
    path = write_container(tmp_path / "a.avi", frames, "ffv1", "gray", fps=30)
    video = video_io.load_video(path, 32)
    np.testing.assert_array_equal(video.frames, frames)
    assert video.fps == 30.0
    np.testing.assert_array_equal(video_io.load_video(path, 32, max_frames=4).frames, frames[:4])


def test_lossless_mp4_round_trips_within_one_level(tmp_path):
    frames = _noise((6, 32, 32))
    path = write_container(tmp_path / "a.mp4", frames, "libx264", "yuv420p", options={"qp": "0"})
    video = video_io.load_video(path, 32)
    assert video.frames.shape == (6, 32, 32) and video.fps == 15.0
    assert np.abs(video.frames.astype(int) - frames).max() <= 1  # TV-range Y, rounded back


def test_non_square_source_is_center_cropped_then_resized(tmp_path):
    frames = _noise((3, 48, 64))
    path = write_container(tmp_path / "a.avi", frames, "ffv1", "gray")
    video = video_io.load_video(path, 32)
    crops = frames[:, :, 8:56]  # the centered 48 x 48 square
    expected = np.stack(
        [np.asarray(Image.fromarray(c).resize((32, 32), Image.Resampling.BILINEAR)) for c in crops]
    )
    np.testing.assert_array_equal(video.frames, expected)
    assert video.source_shape == (48, 64)
    # Antialiased: a 2x shrink of a fine checkerboard averages it to flat gray.
    checker = (np.indices((64, 64)).sum(0) % 2 * 200).astype(np.uint8)
    np.save(tmp_path / "c.npy", np.stack([checker] * 2))
    shrunk = video_io.load_video(str(tmp_path / "c.npy"), 32).frames
    assert np.abs(shrunk.astype(int) - 100).max() <= 2  # nearest would give 0 or 200


# NumPy arrays.


def test_npy_layouts(tmp_path):
    frames = _noise((4, 16, 16))
    for name, array in [("thw", frames), ("thw1", frames[..., None])]:
        np.save(tmp_path / f"{name}.npy", array)
        video = video_io.load_video(str(tmp_path / f"{name}.npy"), 16)
        np.testing.assert_array_equal(video.frames, frames)
        assert video.fps == 0.0
    rgb = _noise((4, 16, 16, 3))
    np.save(tmp_path / "rgb.npy", rgb)
    np.testing.assert_array_equal(
        video_io.load_video(str(tmp_path / "rgb.npy"), 16).frames, _luma(rgb)
    )
    np.save(tmp_path / "float.npy", frames.astype(np.float32))
    kind, message = _error_kind(tmp_path / "float.npy")
    assert kind == video_io.NOT_A_VIDEO and "float32" in message


# Errors.


def test_bad_files_raise_actionable_errors(tmp_path):
    good = _noise((8, 32, 32))
    assert _error_kind(tmp_path / "nope.mp4")[0] == video_io.MISSING_FILE
    (tmp_path / "empty.avi").write_bytes(b"")
    assert _error_kind(tmp_path / "empty.avi")[0] == video_io.ZERO_BYTE_FILE

    mp4 = write_container(tmp_path / "a.mp4", good, "libx264", "yuv420p")
    data = open(mp4, "rb").read()
    (tmp_path / "half.mp4").write_bytes(data[: len(data) // 2])
    assert _error_kind(tmp_path / "half.mp4")[0] == video_io.UNREADABLE_VIDEO

    avi = write_container(tmp_path / "a.avi", good, "ffv1", "gray")
    data = open(avi, "rb").read()
    (tmp_path / "cut.avi").write_bytes(data[: len(data) * 2 // 3])
    assert _error_kind(tmp_path / "cut.avi")[0] == video_io.UNREADABLE_VIDEO

    (tmp_path / "notes.avi").write_text("this is a text file, not a video\n")
    assert _error_kind(tmp_path / "notes.avi")[0] == video_io.NOT_A_VIDEO
    (tmp_path / "notes.dcm").write_text("this is a text file, not a DICOM\n")
    assert _error_kind(tmp_path / "notes.dcm")[0] == video_io.NOT_A_VIDEO

    (tmp_path / "clip.gif").write_bytes(b"GIF89a")
    kind, message = _error_kind(tmp_path / "clip.gif")
    assert kind == video_io.UNSUPPORTED_EXTENSION and ".gif" in message and ".dcm" in message

    np.save(tmp_path / "none.npy", np.zeros((0, 16, 16), np.uint8))
    assert _error_kind(tmp_path / "none.npy")[0] == video_io.ZERO_FRAMES

    with pytest.raises(ValueError, match="size"):
        video_io.load_video(avi, 0)


def test_video_io_imports_neither_tensorflow_nor_jax():
    code = (
        "import sys, input_pipeline.video_io, input_pipeline.prepare; "
        "bad = {'tensorflow', 'jax'} & set(sys.modules); assert not bad, bad"
    )
    repo_root = pathlib.Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=repo_root)
