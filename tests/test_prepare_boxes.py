"""Tests of prepare --boxes: lesion boxes from a boxes file into the shards' "lesions".

Synthetic studies go through with their boxes.jsonl under --fps and --max_frames,
and their stored boxes and frames are checked against the ground truth by an
independent computation; hand-written .npy videos and a CSV with a bad row of
each kind check the report, and non-square sources the crop-and-resize mapping,
by numbers and by where the drawn lesion lands in the stored pixels.
"""

import collections
import csv
import json

import numpy as np
import pytest

from deepcoro_jax.domain import reports
from input_pipeline import dataset_format, pipeline, prepare, synthetic, video_io

SYNTHETIC_SIZE = 48  # the generated videos' side
STORED_SIZE = 32
OUT_FPS = 20  # from the synthetic 15 fps (frames repeated) and 30 fps (frames dropped)
MAX_FRAMES = 5
BOX_COLUMNS = ["file", "frame", "segment", "severity", "y0", "x0", "y1", "x1"]


def _write_manifest(path, files, split="train"):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["FileName", "Split", "Report"])
        writer.writerows((name, split if isinstance(split, str) else split[name], "Normal.")
                         for name in files)
    return str(path)


def _write_boxes_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(BOX_COLUMNS)
        writer.writerows(rows)
    return str(path)


def _examples(data_dir, split="train"):
    """{path: example} of a prepared split, read as the pipeline reads it."""
    ds = dataset_format.read_split(str(data_dir), split, decode_frames=True)
    return {ex["path"].decode(): ex for ex in ds.as_numpy_iterator()}


def _lesion_tuples(lesions):
    """[(frame, segment, severity, box)] of a decoded "lesions" feature, in stored order."""
    return [
        (int(f), s.decode(), float(v), tuple(b.tolist()))
        for f, s, v, b in zip(lesions["frame"], lesions["segment"], lesions["severity"],
                              lesions["box"], strict=True)
    ]


def _assert_lesions(lesions, expected):
    """The decoded "lesions" equal [(frame, segment, severity, box)], in that order."""
    stored = _lesion_tuples(lesions)
    assert [entry[:3] for entry in stored] == [entry[:3] for entry in expected]
    np.testing.assert_allclose(lesions["box"], np.array([e[3] for e in expected]).reshape(-1, 4),
                               atol=1e-6)


def _expected_stored_frame(t, num_frames, source_fps, out_fps, max_frames):
    """The stored frame showing source frame t, from first principles: stored frame k is
    on display at k / out_fps and shows the source frame on display then, for every k
    within the video's duration; the nearest (earlier on a tie) when none shows t."""
    count = -(-num_frames * out_fps // source_fps)  # ceil(T * out / source), exactly
    shown = [k * source_fps // out_fps for k in range(count)]
    distances = [abs(s - t) for s in shown]
    k = distances.index(min(distances))
    return k if k < max_frames else None


@pytest.fixture(scope="module")
def synthetic_prepared(tmp_path_factory):
    """2 synthetic studies (seed 4: 15 and 30 fps videos, with and without lesions)
    prepared with their boxes.jsonl at another size, --fps and --max_frames."""
    root = tmp_path_factory.mktemp("synthetic_boxes")
    manifest = synthetic.generate(root / "source", 2, 4, size=SYNTHETIC_SIZE, num_frames=(8, 10))
    out = root / "prepared"
    report = prepare.prepare(
        str(manifest), str(out), workers=0, size=STORED_SIZE, fps=OUT_FPS,
        max_frames=MAX_FRAMES, vocab_size=100, boxes=str(root / "source" / "boxes.jsonl"),
    )
    with open(root / "source" / "ground_truth.json", encoding="utf-8") as f:
        truth = json.load(f)
    return {"out": out, "report": report, "truth": truth}


def test_synthetic_boxes_round_trip_through_fps_and_max_frames(synthetic_prepared):
    truth, report = synthetic_prepared["truth"], synthetic_prepared["report"]
    examples = _examples(synthetic_prepared["out"])
    videos = [video for study in truth["studies"] for video in study["videos"]]
    assert report["failed"] == [] and sorted(examples) == sorted(v["file"] for v in videos)
    read = dropped = 0
    seen = {"with boxes": 0, "without": 0, "repeated source frames": 0, "dropped ones": 0}
    for video in videos:
        shown = reports.from_json(video["view_findings"])
        expected = []
        for segment, boxes in video["lesion_boxes"].items():
            for t, (x0, y0, x1, y1) in enumerate(boxes):
                read += 1
                k = _expected_stored_frame(t, video["num_frames"], video["fps"], OUT_FPS,
                                           MAX_FRAMES)
                if k is None:
                    dropped += 1
                    continue
                # Ground truth: pixel centres at integers; stored: pixel i spans [i, i + 1).
                box = np.array([y0, x0, y1, x1]) + 0.5
                expected.append((k, segment, shown.stenosis(segment), box / SYNTHETIC_SIZE))
        # Stored in order of frame, then of line in boxes.jsonl (the order built here).
        expected.sort(key=lambda entry: entry[0])
        lesions = examples[video["file"]]["lesions"]
        assert lesions["box"].shape == (len(expected), 4) and lesions["box"].dtype == np.float32
        for got, want in zip(_lesion_tuples(lesions), expected, strict=True):
            assert got[:3] == want[:3]
            np.testing.assert_allclose(got[3], want[3], atol=1e-5)
        seen["with boxes" if expected else "without"] += 1
        seen["repeated source frames" if video["fps"] < OUT_FPS else "dropped ones"] += 1
    assert all(seen.values()), seen  # the data covers each case
    assert 0 < dropped < read
    assert report["boxes"]["read"] == read
    assert report["boxes"]["stored"] == read - dropped
    assert report["boxes"]["rejected_by_reason"] == {prepare.FRAME_NOT_STORED: dropped}
    meta = dataset_format.load_meta(str(synthetic_prepared["out"]))
    assert meta.lesion_boxes and meta.fps == OUT_FPS and meta.max_frames == MAX_FRAMES


def test_lesions_come_through_the_training_pipeline(synthetic_prepared):
    """make_train_dataset reads "lesions" as read_split does, K = 0 included."""
    data_dir = str(synthetic_prepared["out"])
    by_row = {int(ex["row"]): ex["lesions"] for ex in _examples(data_dir).values()}
    ds = pipeline.make_train_dataset(data_dir, "train", "keep('row', 'lesions')", 1, seed=0)
    counts = set()
    for batch in ds.take(len(by_row)).as_numpy_iterator():
        expected = by_row[int(batch["row"][0])]
        for key, value in batch["lesions"].items():
            np.testing.assert_array_equal(value[0], expected[key])
        counts.add(len(expected["frame"]))
    assert 0 in counts and len(counts) > 1


@pytest.fixture(scope="module")
def npy_videos(tmp_path_factory):
    """a.npy: 8 frames of 40 x 60; b.npy: 4 frames of 32 x 32; c.npy: 8 of 32 x 32."""
    root = tmp_path_factory.mktemp("npy_videos")
    rng = np.random.default_rng(0)
    for name, shape in (("a.npy", (8, 40, 60)), ("b.npy", (4, 32, 32)), ("c.npy", (8, 32, 32))):
        np.save(root / name, rng.integers(0, 256, shape, dtype=np.uint8))
    return root


# (row, expected reason kind; None: stored), one of each kind of bad row. a.npy is
# centre-cropped to columns 10-50 (left 10, side 40); --max_frames 6 stops its
# decoding at 6 frames; b.npy has 4 frames; c.npy's manifest row fails.
BAD_ROWS = [
    (("a.npy", "0", "prox_lad", "70", "4", "20", "12", "30"), None),
    (("a.npy", "5", "Proximal LAD", "100", "4", "20", "12", "30"), None),
    (("b.npy", "3", "om1", "50", "0", "0", "32", "32"), None),
    (("missing.npy", "0", "prox_lad", "70", "4", "20", "12", "30"), prepare.UNKNOWN_BOX_FILE),
    (("a.npy", "0", "circumflex", "70", "4", "20", "12", "30"), prepare.UNKNOWN_SEGMENT),
    (("a.npy", "0", "prox_lad", "severe", "4", "20", "12", "30"), prepare.NON_NUMERIC_VALUE),
    (("a.npy", "0", "prox_lad", "70", "nan", "20", "12", "30"), prepare.NON_NUMERIC_VALUE),
    (("a.npy", "1.5", "prox_lad", "70", "4", "20", "12", "30"), prepare.NON_NUMERIC_VALUE),
    (("a.npy", "0", "prox_lad", "70", "12", "20", "4", "30"), prepare.EMPTY_BOX),
    (("a.npy", "0", "prox_lad", "70", "4", "30", "12", "30"), prepare.EMPTY_BOX),
    (("a.npy", "0", "prox_lad", "70", "41", "20", "50", "30"), prepare.BOX_OUTSIDE_SOURCE),
    (("a.npy", "0", "prox_lad", "70", "-5", "20", "12", "30"), None),  # clipped to the source
    (("a.npy", "0", "prox_lad", "70", "4", "0", "12", "8"), prepare.BOX_CROPPED_AWAY),
    (("a.npy", "0", "mid_lad", "70", "4", "5", "12", "20"), None),  # clipped to the crop
    (("b.npy", "4", "om1", "50", "0", "0", "32", "32"), prepare.FRAME_OUTSIDE_VIDEO),
    (("b.npy", "-1", "om1", "50", "0", "0", "32", "32"), prepare.FRAME_OUTSIDE_VIDEO),
    (("a.npy", "6", "prox_lad", "70", "4", "20", "12", "30"), prepare.FRAME_NOT_STORED),
    (("a.npy", "0", "prox_lad", "0", "4", "20", "12", "30"), prepare.SEVERITY_OUT_OF_RANGE),
    (("a.npy", "0", "prox_lad", "100.5", "4", "20", "12", "30"), prepare.SEVERITY_OUT_OF_RANGE),
    (("c.npy", "0", "prox_lad", "70", "4", "20", "12", "30"), prepare.VIDEO_NOT_WRITTEN),
    (("a.npy", "0", "prox_lad"), prepare.MALFORMED_BOX_ROW),
]


def test_bad_box_rows_are_reported_and_the_rest_stored(npy_videos, tmp_path, capsys):
    manifest = _write_manifest(tmp_path / "m.csv", ["a.npy", "b.npy", "c.npy"],
                               {"a.npy": "train", "b.npy": "train", "c.npy": "holdout"})
    boxes = _write_boxes_csv(tmp_path / "boxes.csv", [row for row, _ in BAD_ROWS])
    out = tmp_path / "out"
    report = prepare.prepare(manifest, str(out), root=str(npy_videos), workers=0, size=24,
                             max_frames=6, min_frames=2, vocab_size=20, boxes=boxes)
    assert report["written"]["train"] == 2
    assert [(e["row"], e["reason"].split(":")[0]) for e in report["failed"]] == [
        (2, prepare.UNKNOWN_SPLIT)]
    with open(out / prepare.REPORT_FILE) as f:
        section = json.load(f)["boxes"]
    assert section == report["boxes"]
    line = {index: index + 2 for index in range(len(BAD_ROWS))}  # the header is line 1
    expected_rejected = [(line[i], row[0], kind) for i, (row, kind) in enumerate(BAD_ROWS) if kind]
    assert [(e["line"], e["file"], e["reason"].split(":")[0]) for e in section["rejected_rows"]
            ] == expected_rejected
    kinds = collections.Counter(kind for _, kind in BAD_ROWS if kind)
    assert section["rejected_by_reason"] == kinds
    assert [(e["line"], e["reason"].split(":")[0]) for e in section["clipped_rows"]] == [
        (13, prepare.CLIPPED_TO_SOURCE), (15, prepare.CLIPPED_TO_STORED)]
    assert (section["read"], section["stored"], section["clipped"], section["rejected"]) == (
        len(BAD_ROWS), 5, 2, len(BAD_ROWS) - 5)
    examples = _examples(out)
    _assert_lesions(examples["a.npy"]["lesions"], [
        (0, "prox_lad", 70.0, (0.1, 0.25, 0.3, 0.5)),  # line 2
        (0, "prox_lad", 70.0, (0.0, 0.25, 0.3, 0.5)),  # line 13, y0 clipped to 0
        (0, "mid_lad", 70.0, (0.1, 0.0, 0.3, 0.25)),  # line 15, x0 clipped to the crop
        (5, "prox_lad", 100.0, (0.1, 0.25, 0.3, 0.5)),  # line 3, the segment by its name
    ])
    _assert_lesions(examples["b.npy"]["lesions"], [(3, "om1", 50.0, (0.0, 0.0, 1.0, 1.0))])
    printed = capsys.readouterr().out
    assert (f"prepare: lesion boxes: 5 of {len(BAD_ROWS)} stored (2 clipped), "
            f"{len(BAD_ROWS) - 5} rejected (") in printed


def _rectangle_video(height, width, rect, num_frames=8):
    """uint8 [T, H, W]: black, white where rows rect[0]..rect[2] and columns
    rect[1]..rect[3] (pixel edges) overlap."""
    video = np.zeros([num_frames, height, width], np.uint8)
    video[:, rect[0] : rect[2], rect[1] : rect[3]] = 255
    return video


@pytest.mark.parametrize(
    "shape, rect, expected",
    [
        # Wide, an odd margin: side 45, columns from (60 - 45) // 2 = 7.
        ((45, 60), (9, 16, 18, 25), (9 / 45, 9 / 45, 18 / 45, 18 / 45)),
        # Tall: side 40, rows from 10.
        ((60, 40), (14, 6, 34, 20), (4 / 40, 6 / 40, 24 / 40, 20 / 40)),
        # Square, larger than --size.
        ((50, 50), (5, 10, 20, 45), (0.1, 0.2, 0.4, 0.9)),
    ],
)
def test_boxes_follow_the_crop_and_resize(tmp_path, shape, rect, expected):
    """The stored box is the numbers worked out by hand, and where the drawn lesion
    shows in the stored frame (to a stored pixel: the resize blurs its edges)."""
    size = 24
    np.save(tmp_path / "v.npy", _rectangle_video(*shape, rect))
    manifest = _write_manifest(tmp_path / "m.csv", ["v.npy"])
    boxes = _write_boxes_csv(tmp_path / "b.csv", [("v.npy", 2, "prox_rca", 90, *rect)])
    out = tmp_path / "out"
    report = prepare.prepare(manifest, str(out), workers=0, size=size, vocab_size=20,
                             boxes=boxes)
    assert report["boxes"]["stored"] == 1 and report["boxes"]["clipped"] == 0
    example = _examples(out)["v.npy"]
    _assert_lesions(example["lesions"], [(2, "prox_rca", 90.0, expected)])
    bright = example["frames"][2, :, :, 0] > 127
    rows, cols = np.flatnonzero(bright.any(axis=1)), np.flatnonzero(bright.any(axis=0))
    drawn = np.array([rows[0], cols[0], rows[-1] + 1, cols[-1] + 1])  # stored pixel edges
    np.testing.assert_allclose(drawn, np.array(expected) * size, atol=1.0)


def test_without_boxes_there_is_no_lesions_feature(npy_videos, tmp_path):
    manifest = _write_manifest(tmp_path / "m.csv", ["a.npy", "c.npy"])
    out = tmp_path / "out"
    report = prepare.prepare(manifest, str(out), root=str(npy_videos), workers=0, size=24,
                             vocab_size=20)
    assert "boxes" not in report
    meta = dataset_format.load_meta(str(out))
    assert meta.lesion_boxes is False
    assert "lesions" not in dataset_format.builder(str(out)).info.features
    assert all("lesions" not in example for example in _examples(out).values())
    # A dataset written before lesion boxes existed reads as without them.
    old = {k: v for k, v in meta.to_json().items() if k != "lesion_boxes"}
    assert dataset_format.DatasetMeta.from_json(old).lesion_boxes is False


def test_a_boxes_file_that_cannot_be_used_is_an_error_before_decoding(
    npy_videos, tmp_path, monkeypatch, capsys
):
    def no_decoding(*args, **kwargs):
        raise AssertionError("a video was decoded")

    monkeypatch.setattr(video_io, "load_video", no_decoding)
    manifest = _write_manifest(tmp_path / "m.csv", ["a.npy"])
    kwargs = dict(root=str(npy_videos), workers=0, size=24, vocab_size=20)
    no_severity = tmp_path / "no_severity.csv"
    no_severity.write_text("file,frame,segment,y0,x0,y1,x1\na.npy,0,prox_lad,1,1,2,2\n")
    with pytest.raises(ValueError, match=rf"{no_severity} has no column\(s\) severity"):
        prepare.prepare(manifest, str(tmp_path / "o1"), boxes=str(no_severity), **kwargs)
    jsonl = tmp_path / "boxes.jsonl"
    jsonl.write_text(json.dumps({"file": "a.npy", "frame": 0, "segment": "prox_lad"}) + "\n")
    with pytest.raises(ValueError, match=rf"{jsonl}: no row has the field\(s\) severity, y0, x0"):
        prepare.prepare(manifest, str(tmp_path / "o2"), boxes=str(jsonl), **kwargs)
    with pytest.raises(FileNotFoundError, match="missing.csv does not exist"):
        prepare.prepare(manifest, str(tmp_path / "o3"), boxes=str(tmp_path / "missing.csv"),
                        **kwargs)
    argv = ["--manifest", manifest, "--out", str(tmp_path / "o4"), "--root", str(npy_videos),
            "--workers", "0", "--boxes", str(tmp_path / "boxes.txt")]
    assert prepare.main(argv) == 1
    assert "boxes.txt: unknown extension '.txt'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "boxes.jsonl", "m.csv", "no_severity.csv"]  # no output, no work folder
