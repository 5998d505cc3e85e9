"""Tests of input_pipeline.prepare: real files in, shards read back with dataset_format.

One 'α' manifest with good and crafted bad rows is prepared once (2 spawn
workers) and checked from several sides; smaller runs decode in-process
(--workers 0) to stay fast.
"""

import csv
import json
import math
import os

import numpy as np
import pytest
from test_video_io import write_container, write_dicom

from deepcoro_jax import tokenizers
from input_pipeline import dataset_format, prepare, video_io

SIZE = 32
REPORTS = {
    "S1": "Severe 80% stenosis of the proximal LAD, mild disease of the mid RCA.",
    "S2": "No significant coronary artery disease. Right dominant.",
    "S3": "Moderate 60% stenosis of OM1.",
    "S4": "Total occlusion of the proximal RCA with collaterals.",
    "S5": "Critical 95% stenosis of the left main.",
    "S6": "Mild 30% stenosis of the distal LCx. Co-dominant.",
}
COLUMNS = ["FileName", "Split", "Report", "StudyInstanceUID", "stenosis", "view"]
# FileName, Split, study (report from REPORTS unless given), stenosis, view; the
# expected outcome of each row is in EXPECTED_FAILED and EXPECTED_ORDER below.
ROWS = [
    ("videos/a.mp4", "train", "S1", "80", "LAO"),  # 0
    ("videos/missing.mp4", "train", "S1", "80", "LAO"),  # 1 missing file
    ("videos/a.avi", "train", "S1", "80", "RAO"),  # 2
    ("videos/mono2.dcm", "train", "S2", "", "LAO"),  # 3 empty label -> NaN
    ("videos/mono1.dcm", "train", "S2", "10", "RAO"),  # 4
    ("videos/a.npy", "val", "S3", "60", "LAO"),  # 5
    ("videos/rgb.dcm", "train", "S1", "80", "AP"),  # 6 joins S1 (written with it)
    ("videos/empty.avi", "val", "S3", "60", "RAO"),  # 7 zero-byte
    ("videos/half.mp4", "test", "S4", "100", "LAO"),  # 8 truncated
    ("videos/notes.avi", "test", "S4", "100", "RAO"),  # 9 text named .avi; S4 has nothing left
    ("videos/jpeg.dcm", "test", "S5", "95", "LAO"),  # 10
    ("videos/rle.dcm", "holdout", "S5", "95", "LAO"),  # 11 unknown split
    ("videos/rle.dcm", "test", "S5", "95", "EMPTY_REPORT"),  # 12 empty report
    ("videos/jpegls.dcm", "test", "S5", "95", "RAO"),  # 13 undecodable DICOM
    ("ABSOLUTE/rle.dcm", "test", "S5", "95", "AP"),  # 14 absolute path
    ("videos/b.npy", "train", "S6", "30", "LAO"),  # 15
]
EXPECTED_FAILED = {
    1: video_io.MISSING_FILE,
    7: video_io.ZERO_BYTE_FILE,
    8: video_io.UNREADABLE_VIDEO,
    9: video_io.NOT_A_VIDEO,
    11: prepare.UNKNOWN_SPLIT,
    12: prepare.EMPTY_REPORT,
    13: video_io.UNDECODABLE_DICOM,
}
# split -> written rows in order, grouped by study.
EXPECTED_ORDER = {"train": [0, 2, 6, 3, 4, 15], "val": [5], "test": [10, 14]}


def _smooth_frames(num_frames, height, width, seed):
    """A moving blob: lossy codecs keep it close to the source."""
    yy, xx = np.mgrid[:height, :width]
    rng = np.random.default_rng(seed)
    cy, cx = rng.uniform(0.3, 0.7, 2) * (height, width)
    frames = [
        200 - 150 * np.exp(-((yy - cy - t) ** 2 + (xx - cx) ** 2) / 60.0) for t in range(num_frames)
    ]
    return np.stack(frames).astype(np.uint8)  # [T, H, W]


def _noise(shape, seed, high=256, dtype=np.uint8):
    return np.random.default_rng(seed).integers(0, high, shape, dtype=dtype)


def _write_manifest(path, rows, separator="α", columns=COLUMNS):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=separator)
        writer.writerow(columns)
        writer.writerows(rows)
    return str(path)


def _read_back(data_dir, split):
    ds = dataset_format.read_split(str(data_dir), split, decode_frames=True)
    return list(ds.as_numpy_iterator())


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Writes the videos of ROWS; returns {file name: path, "lossless": {name: frames}}."""
    root = tmp_path_factory.mktemp("sources")
    videos = root / "videos"
    videos.mkdir()
    write_container(videos / "a.mp4", _smooth_frames(8, 48, 48, 0), "libx264", "yuv420p")
    write_container(videos / "a.avi", _smooth_frames(8, 48, 48, 1), "mpeg4", "yuv420p", fps=30)
    lossless = {
        "a.npy": _noise((8, SIZE, SIZE), 2),
        "b.npy": _noise((6, SIZE, SIZE), 3),
        "mono2.dcm": _noise((8, SIZE, SIZE), 4),
        "rle.dcm": _noise((8, SIZE, SIZE), 5),
    }
    np.save(videos / "a.npy", lossless["a.npy"])
    np.save(videos / "b.npy", lossless["b.npy"])
    write_dicom(videos / "mono2.dcm", lossless["mono2.dcm"], "mono2", CineRate=15)
    write_dicom(videos / "rle.dcm", lossless["rle.dcm"], "rle")
    write_dicom(
        videos / "mono1.dcm",
        _noise((8, 48, 48), 6, high=4096, dtype=np.uint16),
        "mono1_16",
        WindowCenter=2048,
        WindowWidth=2000,
    )
    write_dicom(videos / "rgb.dcm", _noise((8, 48, 48, 3), 7), "rgb")
    write_dicom(videos / "jpeg.dcm", _smooth_frames(8, 48, 48, 8), "jpeg")
    write_dicom(videos / "jpegls.dcm", _noise((8, SIZE, SIZE), 9), "jpegls")
    (videos / "empty.avi").write_bytes(b"")
    data = (videos / "a.mp4").read_bytes()
    (videos / "half.mp4").write_bytes(data[: len(data) // 2])
    (videos / "notes.avi").write_text("not a video\n")
    return {"root": root, "lossless": lossless}


def _manifest_rows(sources):
    rows = []
    for path, split, study, stenosis, view in ROWS:
        report = "" if view == "EMPTY_REPORT" else REPORTS[study]
        path = path.replace("ABSOLUTE", str(sources["root"] / "videos"))
        rows.append((path, split, report, study, stenosis, view))
    return rows


@pytest.fixture(scope="module")
def prepared(sources, tmp_path_factory):
    manifest = _write_manifest(sources["root"] / "manifest.csv", _manifest_rows(sources))
    out = tmp_path_factory.mktemp("prepared") / "dataset"
    report = prepare.prepare(
        manifest,
        str(out),
        workers=2,
        size=SIZE,
        label_columns=["stenosis", "view"],
        vocab_size=200,
        examples_per_shard=2,
    )
    examples = {split: _read_back(out, split) for split in EXPECTED_ORDER}
    return {"out": out, "report": report, "examples": examples}


def test_report_counts_every_row_with_its_reason(prepared):
    report = prepared["report"]
    assert report["written"] == {split: len(rows) for split, rows in EXPECTED_ORDER.items()}
    assert [entry["row"] for entry in report["failed"]] == sorted(EXPECTED_FAILED)
    for entry in report["failed"]:
        assert entry["reason"].startswith(EXPECTED_FAILED[entry["row"]] + ":"), entry
        assert entry["path"] == ROWS[entry["row"]][0]
    unknown = next(e for e in report["failed"] if e["row"] == 11)["reason"]
    assert "'holdout'" in unknown and "train, val, test" in unknown
    assert "JPEG-LS" in next(e for e in report["failed"] if e["row"] == 13)["reason"]
    assert report["seconds"] > 0 and report["videos_per_second"] > 0
    assert report["bytes_per_video"] > SIZE * SIZE  # 8 PNG frames of noise at least
    with open(prepared["out"] / prepare.REPORT_FILE) as f:
        assert json.load(f) == report
    leftovers = [p for p in os.listdir(prepared["out"].parent) if p != "dataset"]
    assert leftovers == []  # the temporary folder was renamed


def test_studies_are_grouped_consecutive_and_counted_after_decoding(prepared):
    for split, expected_rows in EXPECTED_ORDER.items():
        examples = prepared["examples"][split]
        assert [int(e["row"]) for e in examples] == expected_rows
        studies = [e["study_id"].decode() for e in examples]
        for example in examples:
            study = example["study_id"].decode()
            assert int(example["videos_in_study"]) == studies.count(study)
            assert example["report"].decode() == REPORTS[study]
        first_seen = list(dict.fromkeys(studies))
        assert [int(e["study_index"]) for e in examples] == [first_seen.index(s) for s in studies]
        video_in_study = [studies[:i].count(s) for i, s in enumerate(studies)]
        assert [int(e["video_in_study"]) for e in examples] == video_in_study
    assert {e["study_id"].decode() for e in prepared["examples"]["test"]} == {"S5"}


def test_frames_equal_the_sources_on_the_lossless_path(prepared, sources):
    videos = sources["root"] / "videos"
    by_row = {}
    for examples in prepared["examples"].values():
        by_row.update({int(e["row"]): e for e in examples})
    for row, example in by_row.items():
        name = os.path.basename(ROWS[row][0])
        frames = example["frames"][..., 0]  # [T, SIZE, SIZE]
        assert int(example["num_frames"]) == len(frames) == 8 - 2 * (name == "b.npy")
        assert example["path"].decode() == _manifest_rows(sources)[row][0]
        if name in sources["lossless"]:
            np.testing.assert_array_equal(frames, sources["lossless"][name])
        expected = video_io.load_video(str(videos / name), SIZE)
        np.testing.assert_array_equal(frames, expected.frames)
        assert example["fps"] == pytest.approx(expected.fps)
    assert by_row[0]["fps"] == 15.0 and by_row[2]["fps"] == 30.0 and by_row[3]["fps"] == 15.0


def test_labels_are_carried(prepared):
    meta = dataset_format.load_meta(str(prepared["out"]))
    assert meta.label_columns == {"stenosis": "float", "view": "text"}
    examples = {int(e["row"]): e for e in prepared["examples"]["train"]}
    assert examples[0]["labels"]["stenosis"] == 80.0
    assert math.isnan(examples[3]["labels"]["stenosis"])
    assert examples[6]["labels"]["view"] == b"AP"


def test_tokenizer_is_trained_on_train_reports(prepared):
    spec = dataset_format.tokenizer_spec(str(prepared["out"]))
    assert spec == "sp:" + str(prepared["out"] / dataset_format.TOKENIZER_FILE)
    tokenizer = tokenizers.get_tokenizer(spec)
    text = REPORTS["S1"]
    ids = tokenizer.encode(text)
    assert tokenizers.SP_UNK_ID not in ids
    assert tokenizer.decode(ids) == text


def test_comma_manifest_renamed_columns_root_jpeg_and_given_vocab(prepared, sources, tmp_path):
    rows = [
        ("a.npy", "train", "Mild stenosis, LAD."),
        ("mono2.dcm", "train", "Mild stenosis, LAD."),
        ("rgb.dcm", "val", "Normal."),
    ]
    manifest = _write_manifest(tmp_path / "m.csv", rows, ",", ["path", "fold", "text"])
    with open(manifest, "a") as f:
        f.write("b.npy,train,Mild stenosis, LAD.\n")  # an unquoted comma: 4 fields
    vocab = str(prepared["out"] / dataset_format.TOKENIZER_FILE)
    out = tmp_path / "out"
    report = prepare.prepare(
        manifest,
        str(out),
        root=str(sources["root"] / "videos"),
        workers=0,
        size=SIZE,
        max_frames=3,
        frame_format="jpeg",
        vocab=vocab,
        file_column="path",
        split_column="fold",
        report_column="text",
        splits=["train", "val"],
    )
    assert report["written"] == {"train": 2, "val": 1}
    [failure] = report["failed"]
    assert failure["row"] == 3 and failure["path"] == "b.npy"
    assert failure["reason"].startswith(prepare.MALFORMED_ROW + ": 4 fields")
    meta = dataset_format.load_meta(str(out))
    assert meta.tokenizer == "sp:" + vocab and meta.frame_format == "jpeg"
    assert not (out / dataset_format.TOKENIZER_FILE).exists()
    train = _read_back(out, "train")
    assert [e["study_id"].decode() for e in train] == ["a.npy", "mono2.dcm"]  # own studies
    assert [int(e["videos_in_study"]) for e in train] == [1, 1]
    source = sources["lossless"]["a.npy"][:3]
    assert train[0]["frames"].shape == (3, SIZE, SIZE, 1)
    assert np.abs(train[0]["frames"][..., 0].astype(int) - source).mean() < 12  # JPEG of noise


def test_bad_manifests_name_the_problem(sources, tmp_path):
    manifest = _write_manifest(tmp_path / "m.csv", [("a.npy", "train")], "α", ["File", "Split"])
    with pytest.raises(ValueError, match=r"no column 'FileName'.*\['File', 'Split'\]"):
        prepare.prepare(manifest, str(tmp_path / "out"), workers=0)
    manifest = _write_manifest(
        tmp_path / "m2.csv", [("a.npy", "train", "r")], ",", ["FileName", "Split", "Report"]
    )
    with pytest.raises(ValueError, match="'stenosis'.*--label_columns"):
        prepare.prepare(manifest, str(tmp_path / "out"), workers=0, label_columns=["stenosis"])
    with pytest.raises(ValueError, match="--vocab_size"):
        prepare.prepare(manifest, str(tmp_path / "out"), workers=0, vocab_size=5)
    assert not (tmp_path / "out").exists()


def test_exit_codes_overwrite_and_nothing_written(sources, tmp_path):
    videos = sources["root"] / "videos"
    good = _write_manifest(
        tmp_path / "good.csv", [(str(videos / "a.npy"), "train", "Normal.")], ",", COLUMNS[:3]
    )
    bad = _write_manifest(
        tmp_path / "bad.csv", [(str(videos / "notes.avi"), "train", "Normal.")], ",", COLUMNS[:3]
    )
    out = tmp_path / "out"
    args = ["--out", str(out), "--workers", "0", "--size", str(SIZE), "--vocab_size", "20"]
    assert prepare.main(["--manifest", good, *args]) == 0
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare.prepare(good, str(out), workers=0, size=SIZE, vocab_size=20)
    assert prepare.main(["--manifest", bad, *args, "--overwrite"]) == 2
    assert _read_back(out, "train")[0]["path"].decode().endswith("a.npy")  # left untouched
    assert prepare.main(["--manifest", bad, *args[:2], "--workers", "0"]) == 1  # exists
    fresh = tmp_path / "fresh"
    assert prepare.main(["--manifest", bad, "--out", str(fresh), "--workers", "0"]) == 2
    assert not fresh.exists()
    assert sorted(os.listdir(tmp_path)) == ["bad.csv", "good.csv", "out"]


@pytest.mark.parametrize("workers", [0, 1])
def test_interrupted_run_leaves_no_dataset(sources, tmp_path, monkeypatch, workers):
    manifest = _write_manifest(tmp_path / "m.csv", _manifest_rows(sources))
    out = tmp_path / "out"
    if workers == 0:  # Ctrl-C while the third video decodes.
        calls = []
        load_video = video_io.load_video

        def interrupted(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return load_video(*args, **kwargs)

        monkeypatch.setattr(video_io, "load_video", interrupted)
        expected_error = KeyboardInterrupt
    else:  # The disk fails while the writer is half-way.
        writes = []
        write = dataset_format.SplitWriter.write

        def failing(self, serialized, new_study):
            writes.append(1)
            if len(writes) == 3:
                raise OSError("disk full")
            write(self, serialized, new_study)

        monkeypatch.setattr(dataset_format.SplitWriter, "write", failing)
        expected_error = OSError
    with pytest.raises(expected_error):
        root = str(sources["root"])
        prepare.prepare(manifest, str(out), root=root, workers=workers, size=SIZE, vocab_size=200)
    assert sorted(os.listdir(tmp_path)) == ["m.csv"]


def test_synthetic_studies_go_through_prepare(tmp_path):
    synthetic = pytest.importorskip("input_pipeline.synthetic")
    manifest = synthetic.generate(
        tmp_path / "synth", num_studies=3, seed=0, size=48, num_frames=(8, 8)
    )
    out = tmp_path / "out"
    report = prepare.prepare(
        str(manifest),
        str(out),
        workers=0,
        size=SIZE,
        label_columns=["left_max_stenosis", "view"],
        vocab_size=100,
    )
    assert report["failed"] == []
    with open(manifest, encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="α"))
    for split in report["written"]:
        assert report["written"][split] == sum(r["Split"] == split for r in rows)
    split = next(s for s, n in report["written"].items() if n)
    for example in _read_back(out, split):
        row = rows[int(example["row"])]
        assert example["report"].decode() == row["Report"].strip()
        assert example["study_id"].decode() == row["StudyInstanceUID"]
        source = video_io.load_video(str(tmp_path / "synth" / row["FileName"]), SIZE)
        np.testing.assert_array_equal(example["frames"][..., 0], source.frames)
        assert example["labels"]["view"].decode() == row["view"]
