"""Tests of input_pipeline/pipeline.py on a tiny prepared dataset written in the fixture.

The dataset: 8 studies of 1-3 videos (15 videos, 10-20 frames of 32x32, fps 15
or 30), shards of at most 4 videos, a SentencePiece model trained on the reports.
"""

import shutil

import jax
import numpy as np
import pytest
import tensorflow as tf

from deepcoro_jax.domain.tokenizers import get_tokenizer, train_sentencepiece
from input_pipeline import dataset_format, pipeline

VIDEOS_PER_STUDY = [1, 2, 3, 1, 2, 3, 1, 2]
SIZE = 32
TRAIN_PP = (
    "decode_sample_frames(4, stride=2)|random_resized_crop(24)|scale_rotate_jitter()"
    "|intensity_jitter()|value_range(-1, 1)|tokenize(96)|tokenize_caption(96)|flatten_labels"
    "|keep('video', 'frame_mask', 'text_ids', 'text_mask', 'caption_in', 'caption_out',"
    " 'caption_mask', 'row', 'label/left_max_stenosis')"
)
RESTORE_PP = (
    "decode_sample_frames(3, stride=2)|random_resized_crop(8)|intensity_jitter()|tokenize(96)"
    "|keep('video', 'text_ids', 'row')"
)
LIGHT_PP = "decode_sample_frames(2)|random_resized_crop(8)|keep('video', 'row')"


def _report(study: int) -> str:
    return (
        f"Severe stenosis of the mid LAD, approximately {60 + 5 * study}%. "
        f"{'Right' if study % 2 else 'Left'} dominant system."
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    data_dir = str(tmp_path_factory.mktemp("dataset"))
    meta = dataset_format.DatasetMeta(
        size=SIZE, label_columns={"left_max_stenosis": "float", "view": "text"}
    )
    features = dataset_format.build_features(meta)
    writer = dataset_format.SplitWriter(data_dir, "train", examples_per_shard=4)
    rng = np.random.default_rng(0)
    frames, studies, row = {}, [], 0
    for study, count in enumerate(VIDEOS_PER_STUDY):
        studies.append(list(range(row, row + count)))
        for video in range(count):
            frames[row] = rng.integers(0, 256, (10 + row % 11, SIZE, SIZE), dtype=np.uint8)
            example = {
                "frames": dataset_format.encode_frames(frames[row]),
                "num_frames": len(frames[row]),
                "fps": 15.0 if row % 2 else 30.0,
                "report": _report(study),
                "study_id": f"1.2.840.{study}",
                "path": f"videos/{row}.avi",
                "row": row,
                "study_index": study,
                "video_in_study": video,
                "videos_in_study": count,
                "labels": {"left_max_stenosis": 10.0 * study, "view": "LAO"},
            }
            writer.write(dataset_format.serialize_example(features, example), video == 0)
            row += 1
    dataset_format.write_metadata(data_dir, meta, [writer.close()])
    train_sentencepiece(
        [_report(s) for s in range(len(VIDEOS_PER_STUDY))],
        f"{data_dir}/{dataset_format.TOKENIZER_FILE}",
        vocab_size=60,
    )
    study_of_row = {r: s for s, rows in enumerate(studies) for r in rows}
    return {"dir": data_dir, "frames": frames, "studies": studies, "study_of_row": study_of_row}


def _batches(ds, count: int) -> list[dict]:
    return list(ds.take(count).as_numpy_iterator())


def test_train_batches_have_the_right_types_shapes_and_values(dataset):
    ds = pipeline.make_train_dataset(dataset["dir"], "train", TRAIN_PP, 4, seed=0)
    tok = get_tokenizer(dataset_format.tokenizer_spec(dataset["dir"]))
    for batch in _batches(ds, 2):
        assert batch["video"].shape == (4, 4, 24, 24, 1) and batch["video"].dtype == np.float32
        assert -1.0 <= batch["video"].min() < batch["video"].max() <= 1.0
        assert batch["frame_mask"].dtype == bool and batch["frame_mask"].shape == (4, 4)
        for key in ("text_ids", "caption_in", "caption_out"):
            assert batch[key].shape == (4, 96) and batch[key].dtype == np.int32
        for i, row in enumerate(batch["row"]):
            study = dataset["study_of_row"][int(row)]
            assert tok.decode(batch["text_ids"][i]) == _report(study)
            assert tok.decode(batch["caption_out"][i]) == _report(study)
            assert batch["label/left_max_stenosis"][i] == 10.0 * study
            # Frames 2 apart from a video of 10-20 frames: padding only where it is short.
            assert batch["frame_mask"][i].all() == (len(dataset["frames"][int(row)]) >= 7)


def test_same_seed_same_stream_other_seed_other_stream_and_epochs_reshuffle(dataset):
    def stream(seed):
        return _batches(
            pipeline.make_train_dataset(dataset["dir"], "train", LIGHT_PP, 5, seed=seed), 6
        )

    first, again, other = stream(0), stream(0), stream(1)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["row"], b["row"])
        np.testing.assert_array_equal(a["video"], b["video"])
    rows = np.concatenate([b["row"] for b in first])
    assert not np.array_equal(rows, np.concatenate([b["row"] for b in other]))
    # 15 videos in batches of 5: each 3 batches are one epoch, each epoch in a new order.
    assert sorted(rows[:15]) == sorted(rows[15:]) == list(range(15))
    assert not np.array_equal(rows[:15], rows[15:])


@pytest.mark.parametrize("study_videos", [None, 3])
def test_processes_read_their_parts_of_the_same_global_batches(dataset, study_videos):
    """Process p of P takes the p-th run of each global batch: their batches side by side
    are one process's batches of P times the size (an epoch of units each once)."""

    def batches(batch_size, process_index=0, process_count=1, count=5):
        ds = pipeline.make_train_dataset(
            dataset["dir"], "train", "keep('row', 'study_index')", batch_size, seed=3,
            process_index=process_index, process_count=process_count, study_videos=study_videos,
        )
        return _batches(ds, count)

    alone = batches(6)
    parts = [batches(2, i, 3) for i in range(3)]
    for step, whole in enumerate(alone):
        for key in whole:
            np.testing.assert_array_equal(
                whole[key], np.concatenate([part[step][key] for part in parts]), err_msg=key
            )
    units = 8 if study_videos else 15
    key = "study_index" if study_videos else "row"
    first = np.concatenate([b[key] for b in alone])[:units]
    if study_videos:
        first = first[:, 0]
    assert sorted(first.tolist()) == list(range(units))


def test_record_index_reads_what_tfds_reads(dataset, tmp_path):
    """Random access by the stored index, and by the index rebuilt from the shards,
    gives every record exactly as the TFDS reader does."""
    index = dataset_format.record_index(dataset["dir"], "train")
    assert index.num_records == 15 and index.num_studies == 8
    np.testing.assert_array_equal(
        index.study_start, np.cumsum([0] + [len(rows) for rows in dataset["studies"]])
    )
    scanned_dir = tmp_path / "without_index"
    shutil.copytree(dataset["dir"], scanned_dir)
    (scanned_dir / dataset_format.RECORD_INDEX_FILE.format(split="train")).unlink()
    scanned = dataset_format.record_index(str(scanned_dir), "train")
    for field in ("shard", "offset", "length", "study_start"):
        np.testing.assert_array_equal(getattr(scanned, field), getattr(index, field), field)
    records = dataset_format.read_records(index, np.arange(15))
    tfds_records = [
        r.numpy() for path in index.paths for r in tf.data.TFRecordDataset(path)
    ]
    assert records == tfds_records


def test_eval_covers_every_example_once_in_order_with_equal_batch_counts(dataset):
    # Two processes hold 8 and 7 videos: 3 batches of 3 each, padded by 1 and 2.
    pp = "decode_sample_frames(4, stride=3)|central_crop(32)|keep('video', 'frame_mask', 'row')"
    assert pipeline._part_sizes(dataset["dir"], "train", 2) == [8, 7]
    rows, masks = [], []
    for index in range(2):
        ds = pipeline.make_eval_dataset(
            dataset["dir"], "train", pp, 3, process_index=index, process_count=2
        )
        batches = list(ds.as_numpy_iterator())
        assert len(batches) == ds.cardinality().numpy() == 3
        for batch in batches:
            rows.extend(batch["row"].tolist())
            masks.extend(batch["_mask"].tolist())
            for video, row, real in zip(batch["video"], batch["row"], batch["_mask"], strict=True):
                if real:  # centred: offset (T - 10) // 2, frames 3 apart
                    source = dataset["frames"][int(row)]
                    start = (len(source) - 10) // 2
                    np.testing.assert_array_equal(video[..., 0], source[start : start + 10 : 3])
                else:
                    assert not video.any() and row == 0
    assert masks == [True] * 8 + [False] + [True] * 7 + [False] * 2
    assert [r for r, m in zip(rows, masks, strict=True) if m] == list(range(15))


def test_eval_rejects_outputs_without_a_fixed_shape(dataset):
    with pytest.raises(ValueError, match="pp output 'video' has shape"):
        pipeline.make_eval_dataset(
            dataset["dir"], "train", "decode_sample_frames(4)|keep('video', 'row')", 4
        )


def test_study_batches_hold_one_study_each_with_the_right_video_mask(dataset):
    pp = "decode_sample_frames(2)|resize(8)|keep('video', 'row', 'study_index')"
    ds = pipeline.make_train_dataset(dataset["dir"], "train", pp, 2, seed=0, study_videos=2)
    seen = []
    for batch in _batches(ds, 8):  # two epochs of 8 studies
        assert batch["video"].shape == (2, 2, 2, 8, 8, 1) and batch["video_mask"].shape == (2, 2)
        for rows, study_index, video_mask in zip(
            batch["row"], batch["study_index"], batch["video_mask"], strict=True
        ):
            study = int(study_index[0])
            videos = dataset["studies"][study]
            real = min(len(videos), 2)
            np.testing.assert_array_equal(video_mask, np.arange(2) < real)
            assert (study_index == study).all()
            assert set(rows.tolist()) <= set(videos) and len(set(rows[:real].tolist())) == real
            seen.append(study)
    assert sorted(seen[:8]) == sorted(seen[8:]) == list(range(8))


@pytest.mark.parametrize("process_count", [1, 3])
def test_study_eval_covers_every_study_once_in_equal_batches(dataset, process_count):
    """Each study once over the processes, its first 2 videos' clips (in view order,
    the same clips as video-level evaluation) with their mask, padding studies last."""
    pp = "decode_sample_frames(2)|resize(8)|keep('video', 'row')"
    clips = {}
    for batch in pipeline.make_eval_dataset(dataset["dir"], "train", pp, 4).as_numpy_iterator():
        clips.update(zip(batch["row"][batch["_mask"]].tolist(), batch["video"][batch["_mask"]],
                         strict=True))
    seen, batch_counts = [], set()
    for index in range(process_count):
        ds = pipeline.make_study_eval_dataset(dataset["dir"], "train", pp, 2, study_videos=2,
                                              process_index=index, process_count=process_count)
        batches = list(ds.as_numpy_iterator())
        batch_counts.add(len(batches))
        for batch in batches:
            assert batch["video"].shape == (2, 2, 2, 8, 8, 1)
            for real, row, video, mask in zip(batch["_mask"], batch["row"], batch["video"],
                                              batch["video_mask"], strict=True):
                if not real:
                    assert not mask.any()
                    continue
                study = dataset["studies"][dataset["study_of_row"][int(row)]]
                assert int(row) == study[0]
                np.testing.assert_array_equal(mask, np.arange(2) < len(study))
                for slot in range(2):
                    expected = clips[study[slot] if slot < len(study) else study[0]]
                    np.testing.assert_array_equal(video[slot], expected)
                seen.append(int(row))
    assert sorted(seen) == sorted(rows[0] for rows in dataset["studies"])
    assert len(batch_counts) == 1


def _assert_same_batches(expected, got):
    for a, b in zip(expected, got, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if np.issubdtype(a[key].dtype, np.floating):
                # Same examples and augmentation draws; TF's threaded resize can round
                # differently by one ulp between runs under load (seen once in CI:
                # 3e-5 on 0-255 values), a wrong example or draw differs by far more.
                np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-4, err_msg=key)
            else:
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("study_videos", [None, 2])
def test_restored_iterator_continues_the_exact_stream(dataset, tmp_path, study_videos):
    """Saved after 4 batches of 6 by one process, restored by one process or by two (each
    reading 3 of every 6): the same next batches. The saved position is a few bytes."""

    def make(batch_size=6, process_index=0, process_count=1, seed=5):
        return pipeline.TrainIterator(
            dataset["dir"], "train", RESTORE_PP, batch_size, seed=seed,
            process_index=process_index, process_count=process_count, study_videos=study_videos,
        )

    iterator = make()
    for _ in range(4):
        next(iterator)
    saved = tmp_path / "data"
    iterator.save(str(saved))
    assert (saved / pipeline.POSITION_FILE).stat().st_size < 1024
    assert iterator.state()["position"] == 24
    expected = [next(iterator) for _ in range(3)]

    restored = make()
    restored.restore(str(saved))
    _assert_same_batches(expected, [next(restored) for _ in range(3)])

    two = [make(3, i, 2) for i in range(2)]
    for part in two:
        part.restore(str(saved))
    halves = [[next(part) for _ in range(3)] for part in two]
    joined = [
        {k: np.concatenate([halves[0][step][k], halves[1][step][k]]) for k in halves[0][step]}
        for step in range(3)
    ]
    _assert_same_batches(expected, joined)

    with pytest.raises(ValueError, match="the data stream changed.*'seed': \\(5, 6\\)"):
        make(seed=6).restore(str(saved))
    with pytest.raises(FileNotFoundError, match="cannot resume its data stream"):
        restored.restore(str(tmp_path / "missing"))


def test_global_batch_on_eight_devices(dataset):
    assert jax.device_count() == 8
    local = {"video": np.arange(8 * 2 * 3, dtype=np.float32).reshape(8, 2, 3), "row": np.arange(8)}
    for shape, names, batch_axes, rows_per_shard in [
        ((8,), ("data",), ("data",), 1),
        ((4, 2), ("data", "fsdp"), ("data",), 2),
        ((4, 2), ("data", "fsdp"), ("data", "fsdp"), 1),
    ]:
        mesh = jax.make_mesh(shape, names)
        arrays = pipeline.global_batch(local, mesh, batch_axes)
        for key, value in local.items():
            assert arrays[key].shape == value.shape
            np.testing.assert_array_equal(np.asarray(arrays[key]), value)
            for shard in arrays[key].addressable_shards:
                assert shard.data.shape == (rows_per_shard, *value.shape[1:])
                np.testing.assert_array_equal(np.asarray(shard.data), value[shard.index])
    with pytest.raises(ValueError, match="holds strings"):
        pipeline.global_batch({"report": np.array([b"x"] * 8)}, jax.make_mesh((8,), ("data",)))
    pp = "decode_sample_frames(4)|resize(8)|value_range(-1, 1)|keep('video', 'row')"
    batch = next(pipeline.make_eval_dataset(dataset["dir"], "train", pp, 8).as_numpy_iterator())
    arrays = pipeline.global_batch(batch, jax.make_mesh((8,), ("data",)))
    assert arrays["video"].shape == (8, 4, 8, 8, 1) and arrays["_mask"].dtype == bool
    np.testing.assert_array_equal(np.asarray(arrays["row"]), np.arange(8))
