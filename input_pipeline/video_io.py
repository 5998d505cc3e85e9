"""Reads one angiography video (DICOM, AVI, MP4 or .npy) as square uint8 grayscale frames.

This is the one place where video files are decoded: `prepare` calls it to build
the dataset shards, and inference code can call it on new files, so it imports
neither TensorFlow nor JAX. It does not sample frames, augment or normalise:
that is the training pipeline's job.

What `load_video` returns, for every format:

- every frame of the source, in order; with `fps`, resampled in time to that
  rate by `resample_frames` (a video whose rate is unknown is then an error);
  with `max_frames` only the first `max_frames` frames are kept (without `fps`
  only those are decoded);
- each frame center-cropped to a square (the shorter side) and resized to
  `size` x `size` with PIL's bilinear filter, which PIL antialiases when
  shrinking (its support widens with the scale factor); a square source of
  side `size` is passed through unchanged;
- 8-bit grayscale. DICOM: the modality LUT (rescale) is applied, then the VOI
  LUT or window center/width when the file has one, mapped onto 0..255;
  without one, the range the stored bits can hold (0..2**BitsStored - 1, or
  -2**(BitsStored - 1)..2**(BitsStored - 1) - 1 when PixelRepresentation is 1,
  taken through the modality LUT) is mapped linearly onto 0..255 and rounded
  to the nearest integer (so 8-bit data is kept as is); MONOCHROME1 is
  inverted so that vessels are dark as in MONOCHROME2; RGB and YBR_* frames
  are converted to luma (ITU-R 601). Every frame of a multi-frame DICOM is
  kept. AVI/MP4 are decoded by FFmpeg (PyAV) straight to gray. `.npy` arrays
  must be uint8 [T, H, W] or [T, H, W, C] with C in (1, 3);
- the frame rate in frames per second: `fps` when given, else the source's:
  DICOM CineRate, else RecommendedDisplayFrameRate, else 1000 / FrameTime,
  else 1000 / the mean of FrameTimeVector's entries after the first (which is
  0); the container's average rate for AVI/MP4; 0.0 when unknown (always for
  .npy).

DICOM transfer syntaxes (pydicom with the pylibjpeg plugins): implicit and
explicit VR little endian, deflated explicit VR little endian, explicit VR big
endian, JPEG baseline and extended, JPEG Lossless Process 14 (with or without
Selection Value 1, what cath labs mostly write), JPEG-LS lossless and
near-lossless, JPEG 2000 (lossless and lossy) and RLE lossless.

Any problem raises `VideoError`, whose message starts with one of the `ERROR_KINDS`
and says what to fix.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os

import av
import numpy as np
import pydicom
import pydicom.errors
import pydicom.multival
import pydicom.pixels
from PIL import Image

MISSING_FILE = "missing file"
ZERO_BYTE_FILE = "zero-byte file"
UNREADABLE_VIDEO = "unreadable or truncated video"
ZERO_FRAMES = "zero frames"
UNDECODABLE_DICOM = "undecodable DICOM"
NOT_A_VIDEO = "not a video"
UNSUPPORTED_EXTENSION = "unsupported extension"
UNKNOWN_FRAME_RATE = "unknown frame rate"
ERROR_KINDS = (
    MISSING_FILE,
    ZERO_BYTE_FILE,
    UNREADABLE_VIDEO,
    ZERO_FRAMES,
    UNDECODABLE_DICOM,
    NOT_A_VIDEO,
    UNSUPPORTED_EXTENSION,
    UNKNOWN_FRAME_RATE,
)

DICOM_EXTENSIONS = (".dcm", ".dicom")
CONTAINER_EXTENSIONS = (".avi", ".mp4")
NPY_EXTENSIONS = (".npy",)
SUPPORTED_EXTENSIONS = DICOM_EXTENSIONS + CONTAINER_EXTENSIONS + NPY_EXTENSIONS

_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_COLOR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
_ISO_BMFF_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot")
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])  # ITU-R 601, as PIL's convert("L")
_FRAME_TOLERANCE = 0.01  # in frames, for `resample_frames`


class VideoError(Exception):
    """A video that cannot be used; ``str(error)`` is ``"<kind>: <detail>"``."""

    def __init__(self, kind: str, detail: str):
        super().__init__(kind, detail)
        self.kind = kind
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


@dataclasses.dataclass(frozen=True)
class DecodedVideo:
    """Frames uint8 [T, size, size]; their fps (0.0 when unknown); the source's (H, W)."""

    frames: np.ndarray
    fps: float
    source_shape: tuple[int, int]


def load_video(
    path: str, size: int, max_frames: int | None = None, fps: float | None = None
) -> DecodedVideo:
    """Decodes the video at `path` as described in the module docstring.

    With `fps` the frames are resampled to that rate and `max_frames` counts
    the resampled frames. Raises `VideoError` for a file that cannot be used
    and ValueError for a bad `size`, `max_frames` or `fps`.
    """
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be None or at least 1, got {max_frames}")
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be None or a positive frame rate, got {fps}")
    if not os.path.exists(path):
        raise VideoError(MISSING_FILE, f"{path} does not exist")
    if os.path.isdir(path):
        raise VideoError(NOT_A_VIDEO, f"{path} is a folder")
    if os.path.getsize(path) == 0:
        raise VideoError(ZERO_BYTE_FILE, f"{path} is empty (0 bytes); re-export or re-copy it")
    try:
        with open(path, "rb") as f:
            header = f.read(132)
    except OSError as e:
        raise VideoError(UNREADABLE_VIDEO, f"{path} cannot be opened: {e.strerror}") from e

    extension = os.path.splitext(path)[1].lower()
    decoded_frames = max_frames if fps is None else None
    if extension in DICOM_EXTENSIONS or (extension == "" and header[128:132] == b"DICM"):
        frames, source_fps = _read_dicom(path, decoded_frames)
    elif extension in CONTAINER_EXTENSIONS:
        frames, source_fps = _read_container(path, header, decoded_frames)
    elif extension in NPY_EXTENSIONS:
        frames, source_fps = _read_npy(path, header, decoded_frames)
    else:
        raise VideoError(
            UNSUPPORTED_EXTENSION,
            f"{path} has extension {extension or '(none)'!r}; supported: "
            f"{', '.join(SUPPORTED_EXTENSIONS)} (and extension-less DICOM files)",
        )
    if len(frames) == 0:
        raise VideoError(ZERO_FRAMES, f"{path} holds no frames")
    height, width = frames[0].shape
    if height == 0 or width == 0:
        raise VideoError(NOT_A_VIDEO, f"{path} has empty frames of shape {frames[0].shape}")
    if fps is not None:
        if source_fps == 0.0:
            raise VideoError(
                UNKNOWN_FRAME_RATE,
                f"{path} does not give its frame rate (DICOM CineRate, "
                "RecommendedDisplayFrameRate, FrameTime or FrameTimeVector; the AVI/MP4 "
                f"stream's rate; never for .npy), so it cannot be resampled to {fps} fps",
            )
        frames = resample_frames(frames, source_fps, fps)[:max_frames]
        source_fps = fps
    square = np.stack([_crop_and_resize(frame, size) for frame in frames])  # [T, size, size]
    return DecodedVideo(frames=square, fps=source_fps, source_shape=(height, width))


def resample_frames(frames: np.ndarray, source_fps: float, target_fps: float) -> np.ndarray:
    """Frames [T, ...] at `source_fps` -> the same span of time at `target_fps`.

    Source frame i is on display from i / source_fps until the next one starts,
    so the video lasts T / source_fps seconds. Output frame k is the source
    frame on display at t = k / target_fps, i.e. floor(k * source_fps /
    target_fps), for every t within the video: ceil(T * target_fps /
    source_fps) frames. Frames are repeated or dropped, never blended: 15 -> 30
    fps shows each frame twice, 30 -> 15 keeps frames 0, 2, 4, ... Both
    quotients are taken with a tolerance of 0.01 frame, so that a rate read from
    a rounded FrameTime (1000 / 33.333 ms) resamples a cine of a few hundred
    frames like the exact rate.
    """
    if not (source_fps > 0 and target_fps > 0):
        raise ValueError(f"frame rates must be positive, got {source_fps} -> {target_fps}")
    num_frames = len(frames)
    ratio = source_fps / target_fps
    num_out = max(1, math.ceil(num_frames / ratio - _FRAME_TOLERANCE))
    indices = np.floor(np.arange(num_out) * ratio + _FRAME_TOLERANCE).astype(np.int64)
    return frames[np.minimum(indices, num_frames - 1)]


def _crop_and_resize(frame: np.ndarray, size: int) -> np.ndarray:
    """Center-crops a uint8 frame [H, W] to a square and resizes it to [size, size]."""
    height, width = frame.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = frame[top : top + side, left : left + side]
    if side == size:
        return np.ascontiguousarray(square)
    resized = Image.fromarray(np.ascontiguousarray(square)).resize(
        (size, size), Image.Resampling.BILINEAR
    )
    return np.asarray(resized)


def _scale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Maps [low, high] linearly onto 0..255 (clipped); a flat range maps to 0."""
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    scaled = (values.astype(np.float64) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _rgb_to_gray(rgb: np.ndarray, max_value: float) -> np.ndarray:
    """Luma of RGB frames [..., 3] with channel values in 0..max_value, as uint8."""
    luma = rgb.astype(np.float64) @ _LUMA_WEIGHTS
    return _scale_to_uint8(luma, 0.0, max_value)


# DICOM.


def _read_dicom(path: str, max_frames: int | None) -> tuple[np.ndarray, float]:
    try:
        ds = pydicom.dcmread(path)
    except pydicom.errors.InvalidDicomError as e:
        raise VideoError(
            NOT_A_VIDEO, f"{path} is not a DICOM file (no 'DICM' marker after the preamble)"
        ) from e
    except (OSError, EOFError, ValueError, KeyError, TypeError) as e:
        raise VideoError(UNDECODABLE_DICOM, f"{path} cannot be parsed: {e}") from e

    if "PixelData" not in ds:
        raise VideoError(UNDECODABLE_DICOM, f"{path} has no Pixel Data element (7FE0,0010)")
    transfer_syntax = ds.file_meta.get("TransferSyntaxUID")
    if transfer_syntax is None:
        raise VideoError(
            UNDECODABLE_DICOM, f"{path} has no Transfer Syntax UID (0002,0010) in its file meta"
        )
    syntax_name = f"{transfer_syntax.name} ({transfer_syntax})"
    try:
        decoder = pydicom.pixels.get_decoder(transfer_syntax)
    except NotImplementedError as e:
        raise VideoError(
            UNDECODABLE_DICOM, f"{path}: pydicom cannot decode transfer syntax {syntax_name}"
        ) from e
    if not decoder.is_available:
        raise VideoError(
            UNDECODABLE_DICOM,
            f"{path}: transfer syntax {syntax_name} needs one of: "
            + "; ".join(decoder.missing_dependencies),
        )
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in _MONOCHROME + _COLOR:
        raise VideoError(
            UNDECODABLE_DICOM,
            f"{path}: photometric interpretation {photometric or '(missing)'!r} is not "
            f"supported; supported: {', '.join(_MONOCHROME + _COLOR)}",
        )

    num_frames = int(ds.NumberOfFrames) if ds.get("NumberOfFrames") not in (None, "") else 1
    num_kept = num_frames if max_frames is None else min(num_frames, max_frames)
    if num_kept == 0:
        raise VideoError(ZERO_FRAMES, f"{path} holds no frames (NumberOfFrames is 0)")
    # Frame by frame: a 12-bit cine of 1024 x 1024 frames would need gigabytes as float64.
    gray = []
    pixels = pydicom.pixels.iter_pixels(ds, indices=range(num_kept))
    for index in range(num_kept):
        try:
            raw = next(pixels)
        except Exception as e:  # pydicom and its plugins raise many types for broken pixel data
            raise VideoError(
                UNDECODABLE_DICOM,
                f"{path}: pixel data ({syntax_name}) of frame {index} cannot be decoded: {e}",
            ) from e
        try:
            gray.append(_dicom_to_gray(raw, ds, photometric))
        except (ValueError, TypeError, AttributeError, IndexError) as e:
            raise VideoError(
                UNDECODABLE_DICOM,
                f"{path}: invalid pixel module or modality/VOI LUT attributes: {e}",
            ) from e
    return np.stack(gray), _dicom_fps(ds)


def _dicom_to_gray(raw: np.ndarray, ds: pydicom.Dataset, photometric: str) -> np.ndarray:
    """Decoded DICOM pixels [..., H, W] or [..., H, W, 3] -> uint8 [..., H, W] for display."""
    if photometric in _COLOR:  # pydicom has converted YBR_* to RGB while decoding.
        return _rgb_to_gray(raw, 255.0 if raw.dtype == np.uint8 else 2.0**ds.BitsStored - 1)
    values = pydicom.pixels.apply_modality_lut(raw, ds)
    voi_range = _voi_output_range(ds)
    if voi_range is not None:
        gray = _scale_to_uint8(pydicom.pixels.apply_voi_lut(values, ds), *voi_range)
    else:
        gray = _scale_to_uint8(values, *_stored_output_range(ds))
    return 255 - gray if photometric == "MONOCHROME1" else gray


def _stored_output_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """The range of values the stored bits can hold, after the modality LUT or rescale."""
    modality_luts = ds.get("ModalityLUTSequence")
    if modality_luts:
        return 0.0, 2.0 ** int(modality_luts[0].LUTDescriptor[2]) - 1
    bits = int(ds.BitsStored)
    if ds.get("PixelRepresentation", 0) == 1:
        stored = np.array([-(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1])
    else:
        stored = np.array([0.0, 2.0**bits - 1])
    ends = pydicom.pixels.apply_modality_lut(stored, ds)  # a negative slope swaps them
    return float(ends.min()), float(ends.max())


def _voi_output_range(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """The range of `apply_voi_lut`'s output for `ds`, or None when it has no VOI."""
    voi_luts = ds.get("VOILUTSequence")
    if voi_luts and "LUTDescriptor" in voi_luts[0] and "LUTData" in voi_luts[0]:
        return 0.0, 2.0 ** int(voi_luts[0].LUTDescriptor[2]) - 1
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        # The window maps everything below (above) it to the range's ends.
        low, high = pydicom.pixels.apply_voi_lut(np.array([-np.inf, np.inf]), ds)
        return float(low), float(high)
    return None


def _dicom_fps(ds: pydicom.Dataset) -> float:
    """The frame rate a DICOM gives, 0.0 if none.

    CineRate, else RecommendedDisplayFrameRate, else 1000 / FrameTime, else 1000
    / the mean of FrameTimeVector's entries after the first (each entry is the
    time in ms since the previous frame, so the first is 0).
    """
    for keyword, to_fps in (
        ("CineRate", float),
        ("RecommendedDisplayFrameRate", float),
        ("FrameTime", lambda ms: 1000.0 / ms),
    ):
        try:
            value = float(ds.get(keyword))
        except (TypeError, ValueError):  # absent, empty or not a number
            continue
        if value > 0:
            return to_fps(value)
    vector = ds.get("FrameTimeVector")
    if isinstance(vector, pydicom.multival.MultiValue) and len(vector) > 1:
        try:
            mean_interval = float(np.mean([float(ms) for ms in vector[1:]]))
        except (TypeError, ValueError):
            return 0.0
        if mean_interval > 0:
            return 1000.0 / mean_interval
    return 0.0


# AVI and MP4.


def _looks_like_video_container(header: bytes) -> bool:
    is_avi = header[:4] == b"RIFF" and header[8:12] == b"AVI "
    return is_avi or header[4:8] in _ISO_BMFF_BOXES


def _read_container(path: str, header: bytes, max_frames: int | None) -> tuple[np.ndarray, float]:
    try:
        container = av.open(path)
    except av.FFmpegError as e:
        if not _looks_like_video_container(header):
            raise VideoError(
                NOT_A_VIDEO, f"{path} is neither an AVI nor an MP4 file (FFmpeg: {e})"
            ) from e
        raise VideoError(UNREADABLE_VIDEO, f"{path} cannot be opened by FFmpeg: {e}") from e
    with container:
        if not container.streams.video:
            raise VideoError(NOT_A_VIDEO, f"{path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        declared_frames = stream.frames  # 0 when the container does not say
        rate = stream.average_rate or stream.guessed_rate
        frames = []
        try:
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="gray"))
                if max_frames is not None and len(frames) == max_frames:
                    break
        except av.FFmpegError as e:
            raise VideoError(
                UNREADABLE_VIDEO, f"{path} fails to decode after {len(frames)} frames: {e}"
            ) from e
    stopped_early = max_frames is not None and len(frames) == max_frames
    if frames and not stopped_early and len(frames) < declared_frames:
        raise VideoError(
            UNREADABLE_VIDEO,
            f"{path} is truncated: {len(frames)} frames decoded of the {declared_frames} "
            "its container declares",
        )
    if not frames:
        raise VideoError(ZERO_FRAMES, f"{path} has a video stream without decodable frames")
    return np.stack(frames), float(rate or 0.0)


# NumPy arrays.


def _read_npy(path: str, header: bytes, max_frames: int | None) -> tuple[np.ndarray, float]:
    if not header.startswith(b"\x93NUMPY"):
        raise VideoError(NOT_A_VIDEO, f"{path} is not a NumPy .npy file")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise VideoError(UNREADABLE_VIDEO, f"{path} cannot be read as an array: {e}") from e
    channels_ok = array.ndim == 3 or (array.ndim == 4 and array.shape[-1] in (1, 3))
    if array.dtype != np.uint8 or not channels_ok:
        raise VideoError(
            NOT_A_VIDEO,
            f"{path} holds a {array.dtype} array of shape {array.shape}; expected uint8 "
            "[T, H, W] or [T, H, W, C] with C in (1, 3)",
        )
    frames = np.asarray(array[:max_frames])
    if frames.ndim == 4:
        frames = frames[..., 0] if frames.shape[-1] == 1 else _rgb_to_gray(frames, 255.0)
    return frames, 0.0


FRAME_FORMATS = ("png", "jpeg")


def encode_frames(
    frames: np.ndarray, frame_format: str = "png", jpeg_quality: int = 95
) -> list[bytes]:
    """Encodes uint8 frames [T, H, W] or [T, H, W, 1] as one PNG or JPEG per frame."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    if frames.ndim == 4 and frames.shape[-1] == 1:
        frames = frames[..., 0]
    if frames.ndim != 3:
        raise ValueError(f"frames must be [T, H, W] or [T, H, W, 1], got shape {frames.shape}")
    encoded = []
    for frame in frames:
        buf = io.BytesIO()
        if frame_format == "png":
            Image.fromarray(frame).save(buf, format="PNG", compress_level=1)
        elif frame_format == "jpeg":
            Image.fromarray(frame).save(buf, format="JPEG", quality=jpeg_quality)
        else:
            raise ValueError(f"frame_format must be one of {FRAME_FORMATS}, got {frame_format!r}")
        encoded.append(buf.getvalue())
    return encoded
