"""The prepared-dataset format: write shards, read them back through TFDS."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from input_pipeline import dataset_format as df


def _write(tmp_path, meta, splits, examples_per_shard=2):
    """Writes `splits` {name: [(study, frames)]} and returns {(split, row): frames}."""
    features = df.build_features(meta)
    written, infos = {}, []
    for split, videos in splits.items():
        writer = df.SplitWriter(str(tmp_path), split, examples_per_shard=examples_per_shard)
        previous_study = None
        for row, (study, frames) in enumerate(videos):
            example = dict(
                frames=df.encode_frames(frames, meta.frame_format),
                num_frames=len(frames),
                fps=15.0,
                report=f"report {study}",
                study_id=study,
                path=f"{split}/{row}.avi",
                row=row,
                study_index=0,
                video_in_study=0,
                videos_in_study=1,
                labels={"lvef": float(row), "site": "A"},
            )
            writer.write(df.serialize_example(features, example), new_study=study != previous_study)
            previous_study = study
            written[(split, row)] = frames
        infos.append(writer.close())
    df.write_metadata(str(tmp_path), meta, infos)
    return written


def test_png_round_trip_is_exact_and_parts_cover_the_split(tmp_path):
    rng = np.random.default_rng(0)
    meta = df.DatasetMeta(size=16, label_columns={"lvef": "float", "site": "text"})
    studies = ["a", "a", "a", "b", "c", "c", "d"]
    splits = {
        "train": [
            (s, rng.integers(0, 256, (3 + i, 16, 16), dtype=np.uint8))
            for i, s in enumerate(studies)
        ],
        "val": [("v", rng.integers(0, 256, (4, 16, 16), dtype=np.uint8))],
    }
    written = _write(tmp_path, meta, splits)
    assert df.load_meta(str(tmp_path)) == meta
    assert df.num_examples(str(tmp_path), "train") == 7
    assert df.tokenizer_spec(str(tmp_path)) == "sp:" + os.path.join(str(tmp_path), "spm.model")

    rows = []
    for ex in df.read_split(str(tmp_path), "train", decode_frames=True):
        row = int(ex["row"])
        rows.append(row)
        np.testing.assert_array_equal(ex["frames"].numpy()[..., 0], written[("train", row)])
        assert int(ex["num_frames"]) == len(written[("train", row)])
        assert float(ex["labels"]["lvef"]) == row
    assert rows == list(range(7))  # written order without shuffling

    parts = [
        [
            int(ex["row"])
            for ex in df.read_split(str(tmp_path), "train", process_index=i, process_count=3)
        ]
        for i in range(3)
    ]
    assert sorted(sum(parts, [])) == list(range(7))
    assert all(parts)

    encoded = next(iter(df.read_split(str(tmp_path), "val")))["frames"]
    assert encoded.dtype.name == "string" and encoded.shape == (4,)


def test_studies_never_span_two_shards(tmp_path):
    meta = df.DatasetMeta(size=8, label_columns={"lvef": "float", "site": "text"})
    frames = np.zeros((2, 8, 8), np.uint8)
    studies = ["a", "a", "a", "b", "c", "c"]
    _write(tmp_path, meta, {"train": [(s, frames) for s in studies]}, examples_per_shard=2)
    info = df.builder(str(tmp_path)).info.splits["train"]
    # Shard 1 holds all of study a (3 > 2 examples), then b and c follow.
    assert info.shard_lengths == [3, 3]


def test_jpeg_is_close_and_bad_inputs_are_named(tmp_path):
    frames = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (2, 32, 1))
    encoded = df.encode_frames(frames, "jpeg", jpeg_quality=95)
    assert len(encoded) == 2
    decoded = np.asarray(Image.open(io.BytesIO(encoded[0])))
    assert np.abs(decoded.astype(int) - frames[0]).max() <= 8
    with pytest.raises(ValueError, match="uint8"):
        df.encode_frames(frames.astype(np.float32))
    with pytest.raises(ValueError, match="frame_format"):
        df.DatasetMeta(size=8, frame_format="gif")
    with pytest.raises(ValueError, match="label column 'x'"):
        df.DatasetMeta(size=8, label_columns={"x": "int"})
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        df.load_meta(str(tmp_path))
