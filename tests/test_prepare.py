"""Tests of input_pipeline.prepare: real files in, shards read back with dataset_format.

One 'α' manifest with good and crafted bad rows is prepared once (2 spawn
workers) and checked from several sides, and prepared again after an
interruption; smaller runs decode in-process (--workers 0) to stay fast.
"""

import collections
import csv
import json
import math
import os
import re

import numpy as np
import pytest
import sentencepiece as spm
from PIL import Image
from test_video_io import write_container, write_dicom

from deepcoro_jax.domain import tokenizers
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
    ("videos/a.npy", "test", "S3", "60", "AP"),  # 16 a.npy is in val (row 5): split overlap
    ("videos/c.npy", "val", "S6", "30", "RAO"),  # 17 S6 is in train (row 15): split overlap
    ("videos/rle.dcm", "test", "S5", "95", "AP"),  # 18 duplicate of row 14 (same resolved file)
    ("videos/a.mp4", "train", "S1", "80", "LAO"),  # 19 duplicate of row 0
    ("videos/still.mp4", "train", "S2", "", "AP"),  # 20 a PNG named .mp4: 1 frame
]
EXPECTED_FAILED = {
    1: video_io.MISSING_FILE,
    7: video_io.ZERO_BYTE_FILE,
    8: video_io.UNREADABLE_VIDEO,
    9: video_io.NOT_A_VIDEO,
    11: prepare.UNKNOWN_SPLIT,
    12: prepare.EMPTY_REPORT,
    13: video_io.UNDECODABLE_DICOM,
    16: prepare.SPLIT_OVERLAP,
    17: prepare.SPLIT_OVERLAP,
    18: prepare.DUPLICATE_ROW,
    19: prepare.DUPLICATE_ROW,
    20: prepare.TOO_FEW_FRAMES,
}
# split -> written rows in order, grouped by study.
EXPECTED_ORDER = {"train": [0, 2, 6, 3, 4, 15], "val": [5], "test": [10, 14]}
# The rows decoded, in the order they are written (failures included).
DECODE_ORDER = [0, 1, 2, 6, 3, 4, 20, 15, 5, 7, 8, 9, 10, 13, 14]
PREPARED_ARGS = dict(  # PNG: lossless, so stored frames can be compared exactly
    size=SIZE, label_columns=["stenosis", "view"], vocab_size=200, examples_per_shard=2,
    frame_format="png",
)


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


def _files(data_dir):
    """{name: bytes} of a prepared folder's files but the report and the tokenizer."""
    names = set(os.listdir(data_dir)) - {prepare.REPORT_FILE, dataset_format.TOKENIZER_FILE}
    return {name: (data_dir / name).read_bytes() for name in names}


def _pieces(data_dir):
    """The SentencePiece model's pieces and scores (its file also holds its own path)."""
    model = spm.SentencePieceProcessor(model_file=str(data_dir / dataset_format.TOKENIZER_FILE))
    return [(model.id_to_piece(i), model.get_score(i)) for i in range(model.get_piece_size())]


def _without_timings(report):
    return {k: v for k, v in report.items() if k not in ("seconds", "videos_per_second")}


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
        "b.npy": _noise((10, SIZE, SIZE), 3),
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
    Image.fromarray(_noise((SIZE, SIZE), 10)).save(videos / "still.mp4", format="PNG")
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
    report = prepare.prepare(manifest, str(out), workers=2, **PREPARED_ARGS)
    examples = {split: _read_back(out, split) for split in EXPECTED_ORDER}
    return {"out": out, "report": report, "examples": examples}


def test_report_counts_every_row_with_its_reason(prepared, sources):
    report = prepared["report"]
    assert report["written"] == {split: len(rows) for split, rows in EXPECTED_ORDER.items()}
    assert [entry["row"] for entry in report["failed"]] == sorted(EXPECTED_FAILED)
    for entry in report["failed"]:
        assert entry["reason"].startswith(EXPECTED_FAILED[entry["row"]] + ":"), entry
        assert entry["path"] == ROWS[entry["row"]][0]
    unknown = next(e for e in report["failed"] if e["row"] == 11)["reason"]
    assert "'holdout'" in unknown and "train, val, test" in unknown
    assert "JPEG-LS" in next(e for e in report["failed"] if e["row"] == 13)["reason"]
    reasons = {e["row"]: e["reason"] for e in report["failed"]}
    videos = sources["root"] / "videos"
    assert f"the file {videos / 'a.npy'} is in split 'val' from row 5" in reasons[16]
    assert "study 'S6' is in split 'train' from row 15" in reasons[17]
    assert "--allow_split_overlap" in reasons[16] and "--allow_split_overlap" in reasons[17]
    assert reasons[18].endswith("as row 14") and reasons[19].endswith("as row 0")
    assert "has 1 frame, fewer than 8 (--min_frames 8)" in reasons[20]
    kinds = collections.Counter(EXPECTED_FAILED[row] for row in sorted(EXPECTED_FAILED))
    assert report["failed_by_reason"] == dict(kinds.most_common())
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
        assert int(example["num_frames"]) == len(frames) == 8 + 2 * (name == "b.npy")
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


def test_exit_codes_overwrite_and_nothing_written(sources, tmp_path, capsys):
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
    capsys.readouterr()
    assert prepare.main(["--manifest", bad, *args, "--overwrite"]) == 2
    assert _read_back(out, "train")[0]["path"].decode().endswith("a.npy")  # left untouched
    with open(out / prepare.REPORT_FILE) as f:
        assert json.load(f)["written"]["train"] == 1  # still the good run's report
    bad_report_path = tmp_path / f"out.{prepare.REPORT_FILE}"
    with open(bad_report_path) as f:
        bad_report = json.load(f)
    assert bad_report["written"] == {"train": 0, "val": 0, "test": 0}
    assert bad_report["failed_by_reason"] == {video_io.NOT_A_VIDEO: 1}
    printed = capsys.readouterr().out.splitlines()
    assert printed[-3:] == [
        f"prepare: 0 written; the existing dataset at {out} is kept",
        f"prepare: 1 rows failed (1 {video_io.NOT_A_VIDEO})",
        f"prepare: report in {bad_report_path}",
    ]
    assert prepare.main(["--manifest", bad, *args[:2], "--workers", "0"]) == 1  # exists
    fresh = tmp_path / "fresh"
    assert prepare.main(["--manifest", bad, "--out", str(fresh), "--workers", "0"]) == 2
    assert not fresh.exists()
    assert (tmp_path / f"fresh.{prepare.REPORT_FILE}").is_file()
    assert prepare.main(["--manifest", good, *args, "--overwrite"]) == 0
    assert not bad_report_path.exists()  # a run that writes removes the stale report
    assert sorted(os.listdir(tmp_path)) == [
        "bad.csv",
        f"fresh.{prepare.REPORT_FILE}",
        "good.csv",
        "out",
    ]


@pytest.mark.parametrize("workers", [0, 1])
def test_an_interrupted_run_resumes_and_decodes_only_the_rest(
    prepared, sources, tmp_path, monkeypatch, capsys, workers
):
    """Stopped by Ctrl-C (decoding in-process) or a full disk (one worker), then run
    again in-process: it decodes only what is not in its work folder, and writes
    what the uninterrupted `prepared` run wrote, byte for byte."""
    manifest = str(sources["root"] / "manifest.csv")  # the `prepared` run's
    out = tmp_path / "out"
    load_video = video_io.load_video
    if workers == 0:  # Ctrl-C while the 4th video (row 6) decodes; row 1 has failed.
        calls = []

        def interrupted(*args, **kwargs):
            calls.append(1)
            if len(calls) == 4:
                raise KeyboardInterrupt
            return load_video(*args, **kwargs)

        monkeypatch.setattr(video_io, "load_video", interrupted)
        expected_error, cached = KeyboardInterrupt, [0, 2]
    else:  # The disk fills while row 6, the third example, is written (row 3 is decoded).
        writes = []
        write = dataset_format.SplitWriter.write

        def failing(self, serialized, new_study):
            writes.append(1)
            if len(writes) == 3:
                raise OSError("disk full")
            write(self, serialized, new_study)

        monkeypatch.setattr(dataset_format.SplitWriter, "write", failing)
        expected_error, cached = OSError, [0, 2, 3, 6]
    with pytest.raises(expected_error):
        prepare.prepare(manifest, str(out), workers=workers, **PREPARED_ARGS)
    [work_name] = os.listdir(tmp_path)  # no `out`, no partial shards
    work = tmp_path / work_name
    assert work_name.startswith(".out.tmp-") and os.listdir(work) == ["decoded"]
    assert sorted(os.listdir(work / "decoded")) == [f"{row}.pkl" for row in cached]
    assert f"the {len(cached)} videos decoded so far are kept in {work}" in capsys.readouterr().out

    monkeypatch.undo()
    decoded = []

    def counted(path, *args, **kwargs):
        decoded.append(os.path.basename(path))
        return load_video(path, *args, **kwargs)

    monkeypatch.setattr(video_io, "load_video", counted)
    report = prepare.prepare(manifest, str(out), workers=0, **PREPARED_ARGS)
    assert decoded == [os.path.basename(ROWS[r][0]) for r in DECODE_ORDER if r not in cached]
    printed = capsys.readouterr().out
    assert f"resuming in {work}: {len(cached)} videos already decoded" in printed
    assert f"{len(DECODE_ORDER)}/{len(DECODE_ORDER)} videos ({len(cached)} reused)" in printed
    assert _without_timings(report) == _without_timings(prepared["report"])
    assert _files(out) == _files(prepared["out"])  # shards and metadata
    assert _pieces(out) == _pieces(prepared["out"])
    assert os.listdir(tmp_path) == ["out"]


def test_other_arguments_start_a_fresh_work_folder(sources, tmp_path, monkeypatch, capsys):
    videos = sources["root"] / "videos"
    rows = [(str(videos / name), "train", "Normal.") for name in ("a.npy", "b.npy")]
    manifest = _write_manifest(tmp_path / "m.csv", rows, ",", COLUMNS[:3])
    out = tmp_path / "out"
    load_video = video_io.load_video

    def interrupted(path, *args, **kwargs):
        if path.endswith("b.npy"):
            raise KeyboardInterrupt
        return load_video(path, *args, **kwargs)

    monkeypatch.setattr(video_io, "load_video", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(manifest, str(out), workers=0, size=SIZE, vocab_size=20)
    [old_work] = [name for name in os.listdir(tmp_path) if name.startswith(".out.tmp-")]
    monkeypatch.undo()
    capsys.readouterr()
    report = prepare.prepare(manifest, str(out), workers=0, size=SIZE // 2, vocab_size=20)
    assert report["written"]["train"] == 2
    printed = capsys.readouterr().out
    assert "prepare: working in" in printed and "resuming" not in printed
    assert f"{tmp_path / old_work} (from runs with other arguments" in printed
    assert sorted(os.listdir(tmp_path)) == [old_work, "m.csv", "out"]  # the old one is left


def test_split_overlap_is_dropped_unless_allowed_and_duplicates_always(sources, tmp_path):
    rows = [
        ("a.npy", "train", "Normal.", "S1"),
        ("a.npy", "val", "Normal.", "S2"),  # a.npy is in train
        ("mono2.dcm", "val", "Normal.", "S1"),  # S1 is in train
        ("b.npy", "test", "Normal.", "S3"),
        ("./b.npy", "test", "Normal.", "S3"),  # the same file, split, study and report
    ]
    manifest = _write_manifest(tmp_path / "m.csv", rows, ",", COLUMNS[:4])
    kwargs = dict(root=str(sources["root"] / "videos"), workers=0, size=SIZE, vocab_size=20)
    report = prepare.prepare(manifest, str(tmp_path / "strict"), **kwargs)
    assert report["written"] == {"train": 1, "val": 0, "test": 1}
    reasons = {e["row"]: e["reason"] for e in report["failed"]}
    assert sorted(reasons) == [1, 2, 4]
    assert reasons[1].startswith(f"{prepare.SPLIT_OVERLAP}: the file ")
    assert reasons[2].startswith(f"{prepare.SPLIT_OVERLAP}: study 'S1' is in split 'train'")
    assert reasons[4] == f"{prepare.DUPLICATE_ROW}: the same file, split, study and report as row 3"
    report = prepare.prepare(
        manifest, str(tmp_path / "allowed"), allow_split_overlap=True, **kwargs
    )
    assert report["written"] == {"train": 1, "val": 2, "test": 1}
    assert [e["row"] for e in report["failed"]] == [4]
    assert [int(e["row"]) for e in _read_back(tmp_path / "allowed", "val")] == [1, 2]


def test_videos_of_fewer_than_min_frames_are_skipped(sources, tmp_path):
    rows = [(name, "train", "Normal.") for name in ("a.npy", "b.npy", "still.mp4")]
    manifest = _write_manifest(tmp_path / "m.csv", rows, ",", COLUMNS[:3])
    kwargs = dict(root=str(sources["root"] / "videos"), workers=0, size=SIZE, vocab_size=20)
    report = prepare.prepare(manifest, str(tmp_path / "nine"), min_frames=9, **kwargs)
    assert [int(e["row"]) for e in _read_back(tmp_path / "nine", "train")] == [1]  # 10 frames
    reasons = {e["row"]: e["reason"] for e in report["failed"]}
    assert "a.npy has 8 frames, fewer than 9 (--min_frames 9)" in reasons[0]
    assert reasons[0].startswith(prepare.TOO_FEW_FRAMES + ":")
    assert "still.mp4 has 1 frame, fewer than 9" in reasons[2]
    # --max_frames below --min_frames lowers the bar to --max_frames.
    report = prepare.prepare(manifest, str(tmp_path / "five"), min_frames=9, max_frames=5, **kwargs)
    written = _read_back(tmp_path / "five", "train")
    assert [int(e["num_frames"]) for e in written] == [5, 5]
    [failure] = report["failed"]
    assert "fewer than 5 (--min_frames 9, capped by --max_frames 5)" in failure["reason"]
    with pytest.raises(ValueError, match="--min_frames must be at least 1"):
        prepare.prepare(manifest, str(tmp_path / "zero"), min_frames=0, **kwargs)


def test_progress_lines_summary_and_a_bounded_number_of_warnings(
    sources, tmp_path, monkeypatch, capsys, caplog
):
    rows = [(f"missing{i}.npy", "train", "Normal.") for i in range(12)]
    rows += [("a.npy", "train", "Normal."), ("b.npy", "val", "Normal.")]
    manifest = _write_manifest(tmp_path / "m.csv", rows, ",", COLUMNS[:3])
    out = tmp_path / "out"
    monkeypatch.setattr(prepare, "PROGRESS_SECONDS", math.inf)  # lines by count only
    prepare.prepare(
        manifest,
        str(out),
        root=str(sources["root"] / "videos"),
        workers=0,
        size=SIZE,
        vocab_size=20,
        log_every=5,
    )
    printed = capsys.readouterr().out.splitlines()
    progress = r"prepare: (\d+)/14 videos, [\d.]+ videos/s, ETA \d+:\d\d:\d\d, (\d+) failed"
    counts = [re.fullmatch(progress, line).groups() for line in printed[2:5]]
    assert counts == [("5", "5"), ("10", "10"), ("14", "12")]
    assert printed[0].startswith("prepare: working in ")
    assert printed[1] == (
        "prepare: 0 rows rejected from the manifest; 14 videos, 14 to decode with 0 workers"
    )
    assert re.fullmatch(
        rf"prepare: wrote 2 videos \(1 train, 1 val, 0 test\) to {out} in [\d.]+ s "
        r"\([\d.]+ videos/s\)",
        printed[5],
    )
    assert printed[6:] == [
        f"prepare: 12 rows failed (12 {video_io.MISSING_FILE})",
        f"prepare: report in {out / prepare.REPORT_FILE}",
    ]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len([w for w in warnings if " skipped: " in w]) == prepare.MAX_LOGGED_FAILURES
    assert warnings[-1] == "further failed rows are listed in the report only"


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
        frame_format="png",
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


def test_view_scope_keeps_what_each_view_shows(tmp_path):
    """--report_scope view: each video's report narrowed to its system (the synthetic
    manifest's own per-view report says the same), rows it cannot narrow kept whole and
    counted."""
    from deepcoro_jax.domain import reports
    from input_pipeline import synthetic

    manifest = synthetic.generate(tmp_path / "synth", num_studies=3, seed=0, size=48,
                                  num_frames=(8, 8))
    with open(manifest, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="α"))
    rows[0]["system"] = "lateral"
    rows[1]["Report"] = "Procedure uncomplicated. Radial access."
    rows[2]["system"] = "RCA" if rows[2]["system"] == "right" else "LCA"
    with open(manifest, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="α")
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(ValueError, match="system_column"):
        prepare.prepare(str(manifest), str(tmp_path / "no"), workers=0, report_scope="view")
    report = prepare.prepare(str(manifest), str(tmp_path / "out"), workers=0, size=SIZE,
                             report_scope="view", system_column="system", vocab_size=100)
    scope = report["report_scope"]
    assert scope["narrowed"] == len(rows) - 2 and scope["kept_whole"] == 2
    assert scope["kept_whole_by_reason"] == {prepare.UNKNOWN_SYSTEM: 1,
                                             prepare.UNPARSED_REPORT: 1}
    assert [entry["row"] for entry in scope["kept_whole_rows"]] == [0, 1]
    with open(tmp_path / "out" / prepare.REPORT_FILE) as f:
        assert json.load(f)["report_scope"] == scope
    seen = 0
    for split, count in report["written"].items():
        for example in _read_back(tmp_path / "out", split) if count else []:
            row = rows[int(example["row"])]
            text = example["report"].decode()
            if int(example["row"]) in (0, 1):
                assert text == row["Report"]
            else:
                assert reports.parse(text) == reports.parse(row["ViewReport"])
                assert set(reports._split_sentences(text)) <= set(
                    reports._split_sentences(row["Report"]))
            seen += 1
    assert seen == len(rows)
