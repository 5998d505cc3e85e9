"""The on-disk format of prepared datasets: what `prepare` writes and the pipeline reads.

A prepared dataset is a TFDS-readable folder (``tfds.builder_from_directory``):

    DIR/
    deepcoro-train.tfrecord-00000-of-00004 ...  TFRecord shards of tf.train.Example
    dataset_info.json, features.json            TFDS metadata
    deepcoro_dataset.json                       DatasetMeta: size, frames, labels, tokenizer,
                                                lesion boxes or not
    spm.model                                   SentencePiece model trained on train reports
    record_index-train.npz ...                  per split: each record's size and where each
                                                study starts (the training stream's random
                                                access; rebuilt by reading the split when absent)
    prepare_report.json                         what `prepare` wrote and what failed

One example is one video:

    frames          [T, size, size, 1] uint8, each frame a PNG (lossless) or JPEG
    num_frames      int32, T
    fps             float32, frames per second: prepare's --fps, else the source's
                    (0 when unknown)
    report          the study's report text
    study_id        StudyInstanceUID (or the file path when the manifest has none)
    path            the video's path as written in the manifest
    row             int32, the manifest row (0-based, header excluded)
    study_index     int32, the study's index within its split
    video_in_study  int32, this video's index within its study
    videos_in_study int32, how many videos of the study the split holds
    labels          {column: float32 (NaN when missing) or text}, the label columns
    lesions         only when DatasetMeta.lesion_boxes (prepare's --boxes): the video's
                    K >= 0 lesion boxes, sorted by frame, as
                    box       [K, 4] float32, (y0, x0, y1, x1) in [0, 1] of the stored
                              frame (its pixel i spans [i / size, (i + 1) / size))
                    frame     [K] int32, the stored frame that shows the annotated one
                    segment   [K] text, a deepcoro_jax.domain.reports.SEGMENTS key
                    severity  [K] float32, percent stenosis in (0, 100] (100: occlusion)

Within a split, the videos of one study are written consecutively and in one
shard, so a pipeline that reads shards in order sees each study whole.

The frames are read still encoded (a string per frame) so the pipeline decodes
only the frames it samples.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

from input_pipeline.video_io import FRAME_FORMATS, encode_frames  # noqa: F401 (part of the format)

DATASET_NAME = "deepcoro"
FILENAME_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
META_FILE = "deepcoro_dataset.json"
TOKENIZER_FILE = "spm.model"
LABEL_KINDS = ("float", "text")


@dataclasses.dataclass(frozen=True)
class DatasetMeta:
    """What a prepared dataset holds beyond TFDS's own metadata."""

    size: int
    frame_format: str = "png"
    label_columns: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> kind
    tokenizer: str | None = TOKENIZER_FILE  # relative to the dataset folder, or a spec
    # How prepare decoded and stored the frames, so that inference on raw files can
    # do the same (datasets written before these were recorded read as the defaults).
    max_frames: int | None = None  # prepare's --max_frames: only the first N frames kept
    jpeg_quality: int = 95  # for frame_format 'jpeg'
    fps: float | None = None  # prepare's --fps: every video resampled to this rate
    lesion_boxes: bool = False  # prepare's --boxes: examples hold a "lesions" feature

    def __post_init__(self):
        if self.frame_format not in FRAME_FORMATS:
            raise ValueError(
                f"frame_format must be one of {FRAME_FORMATS}, got {self.frame_format!r}"
            )
        for name, kind in self.label_columns.items():
            if kind not in LABEL_KINDS:
                raise ValueError(
                    f"label column {name!r}: kind must be one of {LABEL_KINDS}, got {kind!r}"
                )

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> DatasetMeta:
        return cls(**d)


def build_features(meta: DatasetMeta) -> tfds.features.FeaturesDict:
    """The TFDS feature spec of one example (see the module docstring)."""
    spec = {
        "frames": tfds.features.Video(
            shape=(None, meta.size, meta.size, 1), encoding_format=meta.frame_format
        ),
        "num_frames": np.int32,
        "fps": np.float32,
        "report": tfds.features.Text(),
        "study_id": tfds.features.Text(),
        "path": tfds.features.Text(),
        "row": np.int32,
        "study_index": np.int32,
        "video_in_study": np.int32,
        "videos_in_study": np.int32,
    }
    if meta.label_columns:
        spec["labels"] = tfds.features.FeaturesDict(
            {
                name: (np.float32 if kind == "float" else tfds.features.Text())
                for name, kind in meta.label_columns.items()
            }
        )
    if meta.lesion_boxes:
        spec["lesions"] = tfds.features.Sequence(
            {
                "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                "frame": np.int32,
                "segment": tfds.features.Text(),
                "severity": np.float32,
            }
        )
    return tfds.features.FeaturesDict(spec)


def serialize_example(features: tfds.features.FeaturesDict, example: dict) -> bytes:
    """Serialises one example; ``example['frames']`` is a list of encoded frames."""
    example = dict(example)
    example["frames"] = [io.BytesIO(b) for b in example["frames"]]
    return features.serialize_example(example)


class SplitWriter:
    """Writes the serialised examples of one split into TFRecord shards.

    A new shard starts only at a study boundary (``new_study=True``), so a study
    never spans two shards. Shards are named with their final count when the
    writer is closed.
    """

    def __init__(self, data_dir: str, split: str, examples_per_shard: int = 1024):
        self.data_dir = data_dir
        self.split = split
        self.examples_per_shard = examples_per_shard
        self.shard_lengths: list[int] = []
        self.record_lengths: list[int] = []
        self.study_starts: list[int] = []
        self.num_bytes = 0
        self._paths: list[str] = []
        self._writer: tf.io.TFRecordWriter | None = None

    def write(self, serialized: bytes, new_study: bool) -> None:
        full = self.shard_lengths and self.shard_lengths[-1] >= self.examples_per_shard
        if self._writer is None or (new_study and full):
            self._open_next()
        if new_study or not self.study_starts:
            self.study_starts.append(len(self.record_lengths))
        self._writer.write(serialized)
        self.shard_lengths[-1] += 1
        self.record_lengths.append(len(serialized))
        self.num_bytes += len(serialized)

    def _open_next(self) -> None:
        if self._writer is not None:
            self._writer.close()
        path = os.path.join(self.data_dir, f".{self.split}-{len(self._paths):05d}.tmp")
        self._paths.append(path)
        self.shard_lengths.append(0)
        self._writer = tf.io.TFRecordWriter(path)

    def close(self) -> tfds.core.SplitInfo:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        template = _template(self.data_dir, self.split)
        num_shards = len(self._paths)
        for index, path in enumerate(self._paths):
            os.replace(
                path, os.fspath(template.sharded_filepath(shard_index=index, num_shards=num_shards))
            )
        if self.record_lengths:
            _write_record_index(
                self.data_dir, self.split, np.asarray(self.record_lengths, np.int64),
                np.asarray(self.study_starts, np.int64),
            )
        return tfds.core.SplitInfo(
            name=self.split,
            shard_lengths=list(self.shard_lengths),
            num_bytes=self.num_bytes,
            filename_template=template,
        )


@dataclasses.dataclass(frozen=True)
class RecordIndex:
    """Where each example of a split lies in its TFRecord shards, for random access.

    Record r (in written order) is ``length[r]`` bytes at byte ``offset[r]`` of
    ``paths[shard[r]]``; the videos of study s are records
    ``study_start[s] .. study_start[s + 1] - 1`` (``study_start`` ends with the
    number of records).
    """

    paths: tuple[str, ...]
    shard: np.ndarray  # int32 [N]
    offset: np.ndarray  # int64 [N]
    length: np.ndarray  # int64 [N]
    study_start: np.ndarray  # int64 [S + 1]

    @property
    def num_records(self) -> int:
        return len(self.length)

    @property
    def num_studies(self) -> int:
        return len(self.study_start) - 1


RECORD_INDEX_FILE = "record_index-{split}.npz"
# A TFRecord is: length (uint64), its masked CRC (uint32), the data, the data's CRC (uint32).
TFRECORD_HEADER_BYTES = 12
TFRECORD_FRAMING_BYTES = 16


def _write_record_index(
    data_dir: str, split: str, lengths: np.ndarray, study_starts: np.ndarray
) -> None:
    path = os.path.join(data_dir, RECORD_INDEX_FILE.format(split=split))
    with open(path, "wb") as f:
        np.savez(f, length=lengths, study_start=study_starts)


def record_index(data_dir: str, split: str) -> RecordIndex:
    """The split's `RecordIndex`: from prepare's ``record_index-<split>.npz``, or, for a
    dataset written before prepare wrote one, by reading the split once (every record's
    size and ``video_in_study``). Kept for the process's later calls while the dataset's
    metadata file is unchanged."""
    written = (epath.Path(data_dir) / "dataset_info.json").stat().mtime
    return _record_index(data_dir, split, written)


@functools.lru_cache(maxsize=8)
def _record_index(data_dir: str, split: str, written: float) -> RecordIndex:
    info = builder(data_dir).info
    if split not in info.splits:
        raise ValueError(f"split {split!r} not in {data_dir}; it has {sorted(info.splits.keys())}")
    split_info = info.splits[split]
    paths = tuple(os.fspath(p) for p in split_info.filepaths)
    shard_lengths = np.asarray(split_info.shard_lengths, np.int64)
    stored = epath.Path(data_dir) / RECORD_INDEX_FILE.format(split=split)
    if stored.is_file():
        with stored.open("rb") as f:
            saved = np.load(f)
            lengths, starts = saved["length"], saved["study_start"]
    else:
        lengths, starts = _scan_records(paths)
    if len(lengths) != shard_lengths.sum():
        raise ValueError(
            f"{stored}: {len(lengths)} records, but the {split!r} shards hold "
            f"{shard_lengths.sum()}; prepare the dataset again"
        )
    shard = np.repeat(np.arange(len(paths), dtype=np.int32), shard_lengths)
    framed = lengths + TFRECORD_FRAMING_BYTES
    first_in_shard = np.concatenate([[0], np.cumsum(shard_lengths)[:-1]])
    ends = np.cumsum(framed)
    offset = ends - framed - np.repeat(np.concatenate([[0], ends])[first_in_shard], shard_lengths)
    return RecordIndex(
        paths=paths,
        shard=shard,
        offset=offset + TFRECORD_HEADER_BYTES,
        length=lengths.astype(np.int64),
        study_start=np.append(starts, len(lengths)).astype(np.int64),
    )


def _scan_records(paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Each record's size and the records that start a study, read from the shards."""
    feature = {"video_in_study": tf.io.FixedLenFeature([], tf.int64)}

    def describe(record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        first = tf.io.parse_single_example(record, feature)["video_in_study"] == 0
        return tf.cast(tf.strings.length(record), tf.int64), first

    ds = tf.data.TFRecordDataset(list(paths)).map(describe, num_parallel_calls=tf.data.AUTOTUNE)
    lengths, firsts = [], []
    for length, first in ds.as_numpy_iterator():
        lengths.append(length)
        firsts.append(first)
    return np.asarray(lengths, np.int64), np.flatnonzero(np.asarray(firsts, bool)).astype(np.int64)


def read_records(index: RecordIndex, records: np.ndarray) -> list[bytes]:
    """The serialised examples `records` (record numbers of `index`), read by offset."""
    out = []
    for r in np.asarray(records).reshape(-1):
        with tf.io.gfile.GFile(index.paths[index.shard[r]], "rb") as f:
            f.seek(int(index.offset[r]))
            data = f.read(int(index.length[r]))
        if len(data) != index.length[r]:
            raise OSError(
                f"{index.paths[index.shard[r]]}: record at byte {index.offset[r]} is cut short "
                f"({len(data)} of {index.length[r]} bytes)"
            )
        out.append(data)
    return out


def _template(data_dir: str, split: str) -> tfds.core.ShardedFileTemplate:
    return tfds.core.ShardedFileTemplate(
        data_dir=epath.Path(data_dir),
        template=FILENAME_TEMPLATE,
        dataset_name=DATASET_NAME,
        split=split,
        filetype_suffix="tfrecord",
    )


def write_metadata(
    data_dir: str,
    meta: DatasetMeta,
    split_infos: Sequence[tfds.core.SplitInfo],
    description: str = "",
) -> None:
    """Writes the TFDS metadata and `META_FILE`, after every split was closed."""
    tfds.folder_dataset.write_metadata(
        data_dir=data_dir,
        features=build_features(meta),
        split_infos=[s for s in split_infos if sum(s.shard_lengths)],
        filename_template=FILENAME_TEMPLATE,
        check_data=False,
        description=description or "Angiography videos with their reports (DeepCORO-JAX prepare).",
    )
    with open(os.path.join(data_dir, META_FILE), "w") as f:
        json.dump(meta.to_json(), f, indent=2)


def load_meta(data_dir: str) -> DatasetMeta:
    path = epath.Path(data_dir) / META_FILE  # a local folder or a URL (gs://...)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {data_dir} is not a prepared dataset (run input_pipeline.prepare)"
        )
    return DatasetMeta.from_json(json.loads(path.read_text()))


def tokenizer_spec(data_dir: str) -> str:
    """The tokenizer spec (deepcoro_jax.domain.tokenizers.get_tokenizer) stored with a dataset."""
    meta = load_meta(data_dir)
    if meta.tokenizer is None:
        raise ValueError(f"the dataset at {data_dir} stores no tokenizer; give one in the config")
    if ":" in meta.tokenizer or os.path.isabs(meta.tokenizer):
        return meta.tokenizer
    return f"sp:{epath.Path(data_dir) / meta.tokenizer}"


def builder(data_dir: str) -> tfds.core.DatasetBuilder:
    return tfds.builder_from_directory(data_dir)


def num_examples(data_dir: str, split: str) -> int:
    return builder(data_dir).info.splits[split].num_examples


def split_names(data_dir: str) -> list[str]:
    """The splits a prepared dataset holds (prepare writes no empty split), sorted."""
    return sorted(builder(data_dir).info.splits.keys())


def read_split(
    data_dir: str,
    split: str,
    *,
    process_index: int = 0,
    process_count: int = 1,
    decode_frames: bool = False,
) -> tf.data.Dataset:
    """One process's part of a split, as a tf.data.Dataset of example dicts.

    The split is divided into `process_count` disjoint, near-equal parts that
    together hold every example once (``tfds.even_splits``); this process reads
    part `process_index`. Frames stay encoded (a string each, ``[T]``) unless
    `decode_frames`. Examples come in their written order.
    """
    ds_builder = builder(data_dir)
    if split not in ds_builder.info.splits:
        raise ValueError(
            f"split {split!r} not in {data_dir}; it has {sorted(ds_builder.info.splits.keys())}"
        )
    part = tfds.even_splits(split, n=process_count)[process_index]
    decoders = None if decode_frames else {"frames": tfds.decode.SkipDecoding()}
    read_config = tfds.ReadConfig(
        interleave_cycle_length=1, skip_prefetch=True, try_autocache=False
    )
    return ds_builder.as_dataset(
        split=part, shuffle_files=False, decoders=decoders, read_config=read_config
    )
