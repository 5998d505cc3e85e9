"""Tests for input_pipeline/synthetic.py: the rasteriser against a direct NumPy sum,
lesions and occlusions visible in the pixels, determinism, and the written files
(MP4/AVI decoded by PyAV, DICOM by pydicom), manifest and ground truth."""

import csv
import json

import av
import numpy as np
import pydicom
import pytest

from deepcoro_jax.domain import reports
from input_pipeline import synthetic

SIZE = 64
NUM_FRAMES = 16
FPS = 15
SEED = 7
NUM_STUDIES = 4


def _render(findings, view, seed=0, anatomy_seed=0, size=SIZE, num_frames=NUM_FRAMES):
    anatomy = synthetic.sample_anatomy(findings, np.random.default_rng(anatomy_seed))
    return synthetic.render_video(findings, view, np.random.default_rng(seed), num_frames, size,
                                  FPS, anatomy=anatomy)


def _box_mean(frames, boxes, frame_indices):
    """Mean intensity inside each frame's box [x0, y0, x1, y1], averaged over frames."""
    values = []
    for t in frame_indices:
        x0, y0, x1, y1 = np.round(boxes[t]).astype(int)
        values.append(frames[t, y0:y1 + 1, x0:x1 + 1].astype(float).mean())
    return float(np.mean(values))


def _decode(path):
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="gray")
                         for frame in container.decode(video=0)])


# ------------------------------------------------------------------------------ rasteriser


def test_splat_matches_direct_gaussian_sum():
    rng = np.random.default_rng(0)
    num_frames, size, num_stamps = 3, 24, 40
    frame = rng.integers(0, num_frames, num_stamps)
    xy = rng.uniform(-2, size + 2, (num_stamps, 2))
    sigma = rng.uniform(0.5, 2.5, num_stamps)
    amplitude = rng.uniform(0.1, 1.0, num_stamps)
    image = synthetic._splat(frame, xy, sigma, amplitude, num_frames, size)
    rows, columns = np.mgrid[0:size, 0:size]
    full = np.zeros((num_frames, size, size))
    tails = np.zeros((num_frames, size, size))
    for t, (x, y), s, a in zip(frame, xy, sigma, amplitude, strict=True):
        distance2 = (columns - x) ** 2 + (rows - y) ** 2
        gaussian = a * np.exp(-distance2 / (2 * s**2))
        full[t] += gaussian
        tails[t] += gaussian * (distance2 > (2.5 * s) ** 2)
    # Exact within 2.5 sigma of every stamp; beyond, a stamp may be cut (never added to).
    missing = full - image
    assert missing.min() > -1e-5
    assert (missing <= tails + 1e-5).all()
    assert missing.max() > 0  # the cut does happen, so the bound above is tested


def test_line_of_stamps_has_the_requested_cross_profile():
    size, peak, sigma, spacing = 48, 0.8, 1.3, 0.75
    x = np.arange(-10, size + 10, spacing)
    xy = np.stack([x, np.full_like(x, 20.3)], axis=-1)
    amplitude = synthetic._line_stamps(np.full(len(x), peak), np.full(len(x), sigma), spacing)
    image = synthetic._splat(np.zeros(len(x), int), xy, np.full(len(x), sigma), amplitude, 1,
                             size)[0]
    rows = np.arange(size)
    expected = peak * np.exp(-((rows - 20.3) ** 2) / (2 * sigma**2))
    expected[np.abs(rows - 20.3) > 2.5 * sigma + 0.5] = 0.0
    np.testing.assert_allclose(image[:, 24], expected, atol=0.03)
    # The line is uniform along its length (no ripple from the sample spacing).
    assert np.ptp(image[20, 5:-5]) < 1e-3


# ------------------------------------------------------------------------------ rendering


def test_render_is_deterministic_and_depends_on_the_seed():
    findings = reports.Findings({"prox_lad": reports.Lesion(75.0)}, "right")
    frames_a, boxes_a = _render(findings, "LAO_cranial", seed=3)
    frames_b, boxes_b = _render(findings, "LAO_cranial", seed=3)
    frames_c, _ = _render(findings, "LAO_cranial", seed=4)
    assert frames_a.dtype == np.uint8 and frames_a.shape == (NUM_FRAMES, SIZE, SIZE)
    np.testing.assert_array_equal(frames_a, frames_b)
    assert boxes_a.keys() == boxes_b.keys() == {"prox_lad"}
    np.testing.assert_array_equal(boxes_a["prox_lad"], boxes_b["prox_lad"])
    assert np.abs(frames_a.astype(int) - frames_c).mean() > 3


def test_lesions_show_only_in_views_of_their_system():
    findings = reports.Findings({"mid_lad": reports.Lesion(80.0),
                                 "mid_rca": reports.Lesion(60.0)}, "right")
    _, left_boxes = _render(findings, "RAO_cranial")
    _, right_boxes = _render(findings, "LAO")
    assert set(left_boxes) == {"mid_lad"}
    assert set(right_boxes) == {"mid_rca"}
    for box in (*left_boxes.values(), *right_boxes.values()):
        assert box.shape == (NUM_FRAMES, 4)
        assert (box[:, 0] < box[:, 2]).all() and (box[:, 1] < box[:, 3]).all()
        assert box.min() >= 0 and box.max() <= SIZE - 1


def test_cardiac_motion_moves_the_lesion_box():
    findings = reports.Findings({"mid_lad": reports.Lesion(50.0)}, "right")
    _, boxes = _render(findings, "LAO_cranial", num_frames=40)
    centres = 0.5 * (boxes["mid_lad"][:, :2] + boxes["mid_lad"][:, 2:])  # [T, 2]
    assert np.ptp(centres, axis=0).max() > 0.5  # pixels


def _centre_mean(frames, boxes, frame_indices):
    """Mean intensity of the 3x3 pixels at each frame's box centre, averaged over frames."""
    values = []
    for t in frame_indices:
        column, row = np.round(0.5 * (boxes[t, :2] + boxes[t, 2:])).astype(int)
        values.append(frames[t, row - 1:row + 2, column - 1:column + 2].astype(float).mean())
    return float(np.mean(values))


@pytest.mark.parametrize("view", ["LAO_cranial", "RAO_cranial"])
def test_severe_stenosis_is_visible(view):
    normal = reports.Findings({}, "right")
    stenosed = reports.Findings({"mid_lad": reports.Lesion(90.0)}, "right")
    normal_frames, _ = _render(normal, view, size=96, num_frames=24)
    lesion_frames, boxes = _render(stenosed, view, size=96, num_frames=24)
    box = boxes["mid_lad"]
    filled = range(8, 14)  # after the contrast fills the tree, before the washout
    # Before contrast arrives the lesion changes nothing (same tree, same noise).
    np.testing.assert_array_equal(lesion_frames[0], normal_frames[0])
    # The narrowed lumen absorbs less: the lesion box is brighter ...
    assert _box_mean(lesion_frames, box, filled) > _box_mean(normal_frames, box, filled) + 4
    # ... and at the lesion's centre contrast darkens the vessel less than half as much.
    normal_darkening = (_centre_mean(normal_frames, box, [0])
                        - _centre_mean(normal_frames, box, filled))
    lesion_darkening = (_centre_mean(lesion_frames, box, [0])
                        - _centre_mean(lesion_frames, box, filled))
    assert normal_darkening > 20
    assert lesion_darkening < 0.5 * normal_darkening


def test_occlusion_stops_distal_contrast_and_collaterals_fill_faintly():
    # A 10% lesion marks where the distal RCA is (it barely changes the lumen).
    marker = reports.Lesion(10.0)

    def distal_brightness(prox_rca):
        lesions = {"dist_rca": marker} if prox_rca is None else {"dist_rca": marker,
                                                                 "prox_rca": prox_rca}
        frames, boxes = _render(reports.Findings(lesions, "right"), "LAO", size=96,
                                num_frames=32)
        box = boxes["dist_rca"]
        return _box_mean(frames, box, range(18, 21)), _box_mean(frames, box, [0])

    open_late, open_first = distal_brightness(None)
    cto_late, cto_first = distal_brightness(reports.Lesion(100.0, cto=True))
    collateral_late, _ = distal_brightness(reports.Lesion(100.0, cto=True, collaterals=True))
    assert open_late < open_first - 10  # an open artery fills with contrast
    assert abs(cto_late - cto_first) < 3  # nothing reaches past the occlusion
    assert open_late + 3 < collateral_late < cto_late - 3  # collaterals: faint, late filling


@pytest.mark.parametrize("view", synthetic.RIGHT_VIEWS)
def test_non_dominant_rca_looks_small(view):
    """The field of view is fixed, so a left-dominant study's short RCA covers far fewer
    pixels than a right-dominant one in the same view (a tree fitted to the frame
    would hide the difference)."""

    def vessel_pixels(dominance):
        frames, _ = _render(reports.Findings({}, dominance), view, size=96, num_frames=24)
        darkening = frames[0].astype(float) - frames[8:14].astype(float).mean(axis=0)
        return int((darkening > 25).sum())  # before contrast minus while filled

    right, left = vessel_pixels("right"), vessel_pixels("left")
    assert right > 80
    assert left < 0.6 * right


def test_render_rejects_bad_arguments():
    findings = reports.Findings({}, "right")
    with pytest.raises(ValueError, match="view='AP'"):
        synthetic.render_video(findings, "AP", np.random.default_rng(0), 8, SIZE, FPS)
    with pytest.raises(ValueError, match="size=63"):
        synthetic.render_video(findings, "LAO", np.random.default_rng(0), 8, 63, FPS)
    anatomy = synthetic.sample_anatomy(reports.Findings({}, "left"), np.random.default_rng(0))
    with pytest.raises(ValueError, match="dominance"):
        synthetic.render_video(findings, "LAO", np.random.default_rng(0), 8, SIZE, FPS,
                               anatomy=anatomy)
    # A right-dominant tree has no left posterolateral branch unless a lesion needs one.
    anatomy = synthetic.sample_anatomy(findings, np.random.default_rng(0))
    with pytest.raises(ValueError, match="lvp"):
        synthetic.render_video(reports.Findings({"lvp": reports.Lesion(50.0)}, "right"),
                               "LAO", np.random.default_rng(0), 8, SIZE, FPS, anatomy=anatomy)


def test_a_magnified_view_is_centred_on_its_landmark_and_keeps_the_percent():
    """The same run at 1x and 2x (same rng, same tree): the lesion beside the landmark is
    near the frame's centre and about twice as large; a lesion far away leaves the frame
    and the view's boxes; the narrowing still brightens the lumen as at 1x."""
    findings = reports.Findings({"mid_lad": reports.Lesion(90.0),
                                 "dist_lcx": reports.Lesion(80.0)}, "right")
    anatomy = synthetic.sample_anatomy(findings, np.random.default_rng(0))
    render = lambda m, landmark, f=findings: synthetic.render_video(
        f, "RAO_cranial", np.random.default_rng(1), 24, 96, FPS, anatomy=anatomy,
        magnification=m, landmark=landmark)
    _, full_boxes = render(1, None)
    zoomed, zoomed_boxes = render(2, "mid_lad")
    assert set(full_boxes) == {"mid_lad", "dist_lcx"}
    assert set(zoomed_boxes) == {"mid_lad"}  # the distal LCx lies outside the 2x frame
    centre = 0.5 * (zoomed_boxes["mid_lad"][:, :2] + zoomed_boxes["mid_lad"][:, 2:])  # [T, 2]
    assert np.all(np.abs(centre - 47.5) < 0.2 * 96)
    extent = lambda box: np.linalg.norm(box[:, 2:] - box[:, :2], axis=-1).mean()
    assert 1.6 < extent(zoomed_boxes["mid_lad"]) / extent(full_boxes["mid_lad"]) < 2.4
    normal, _ = render(2, "mid_lad", reports.Findings({}, "right"))
    filled, box = range(8, 14), zoomed_boxes["mid_lad"]
    assert _box_mean(zoomed, box, filled) > _box_mean(normal, box, filled) + 4
    with pytest.raises(ValueError, match="needs a landmark"):
        render(2, None)
    with pytest.raises(ValueError, match="choose one of"):
        render(2, "mid_rca")


def test_magnified_views_are_added_after_the_unchanged_full_views():
    plain = synthetic.plan_study(SEED, 3)
    mixed = synthetic.plan_study(SEED, 3, magnified_fraction=1.0, magnifications=(2, 3))
    assert mixed.videos[:len(plain.videos)] == plain.videos
    added = mixed.videos[len(plain.videos):]
    assert len(added) == len(plain.videos)
    for full, magnified in zip(plain.videos, added, strict=True):
        assert magnified.view == full.view and magnified.magnification in (2, 3)
        assert magnified.landmark in synthetic.LANDMARKS[synthetic.VIEWS[full.view].system]
    assert [v.video_index for v in mixed.videos] == list(range(len(mixed.videos)))
    with pytest.raises(ValueError, match="magnified_fraction"):
        synthetic.plan_study(SEED, 3, magnified_fraction=1.5)
    with pytest.raises(ValueError, match="magnifications"):
        synthetic.plan_study(SEED, 3, magnified_fraction=0.5, magnifications=(1,))


# ------------------------------------------------------------------------------ files


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("synthetic")
    manifest_path = synthetic.generate(out_dir, NUM_STUDIES, SEED, size=SIZE,
                                       num_frames=(12, 20), magnified_fraction=0.5,
                                       magnifications=(2, 3))
    with open(manifest_path, encoding="utf-8", newline="") as manifest:
        rows = list(csv.DictReader(manifest, delimiter="α"))
    with open(out_dir / "ground_truth.json", encoding="utf-8") as truth_file:
        truth = json.load(truth_file)
    return out_dir, rows, truth


def test_manifest_columns_labels_and_splits_by_study(dataset):
    _, rows, truth = dataset
    assert tuple(rows[0]) == synthetic.MANIFEST_COLUMNS
    studies = {study["study_uid"]: study for study in truth["studies"]}
    assert len(studies) == NUM_STUDIES
    assert sum(len(study["videos"]) for study in studies.values()) == len(rows)
    for row in rows:
        study = studies[row["StudyInstanceUID"]]
        findings = reports.from_json(study["findings"])
        assert row["Split"] == study["split"]
        assert row["Report"] == study["report"]
        assert reports.parse(row["Report"]) == findings
        for system in reports.SYSTEMS:
            assert int(row[f"{system}_significant"]) == reports.has_significant(findings, system)
            assert float(row[f"{system}_max_stenosis"]) == reports.max_stenosis(findings, system)
        assert row["system"] == synthetic.VIEWS[row["view"]].system
        video = next(v for v in study["videos"] if v["file"] == row["FileName"])
        shown = reports.from_json(video["view_findings"])
        assert video["view_report"] == row["ViewReport"]
        assert reports.parse(row["ViewReport"]) == shown
        of_system = {s for s in findings.lesions if reports.system_of(s) == row["system"]}
        if row["magnification"] == "1":
            assert row["landmark"] == "" and set(shown.lesions) == of_system
        else:
            assert row["landmark"] in synthetic.LANDMARKS[row["system"]]
            assert set(shown.lesions) == set(video["lesion_boxes"]) <= of_system
        assert all(shown.lesions[s] == findings.lesions[s] for s in shown.lesions)
        assert shown.dominance == findings.dominance == row["dominance"]
        assert int(row["right_dominant"]) == (findings.dominance == "right")
        assert int(row["view_cto"]) == any(lesion.cto for lesion in shown.lesions.values())
        assert int(row["view_severe"]) == (reports.max_stenosis(shown) >= 70)
        assert float(row["view_max_stenosis"]) == reports.max_stenosis(shown)
    assert {row["magnification"] for row in rows} == {"1", "2", "3"}
    uids = [*studies, *(video["series_uid"] for study in studies.values()
                        for video in study["videos"])]
    assert len(set(uids)) == len(uids)
    for study in studies.values():
        full = [video for video in study["videos"] if video["magnification"] == 1]
        assert {video["system"] for video in full} == {"left", "right"} and 2 <= len(full) <= 4
        assert len(study["videos"]) <= 2 * len(full)
    assert sorted(study["split"] for study in studies.values()) == ["test", "train", "train",
                                                                    "val"]


def test_splits_are_about_80_10_10():
    splits = synthetic.assign_splits(200, seed=1)
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (160, 20, 20)
    assert synthetic.assign_splits(200, seed=1) == splits
    assert synthetic.assign_splits(200, seed=2) != splits


def test_files_decode_to_the_rendered_frames(dataset):
    out_dir, rows, truth = dataset
    videos = {video["file"]: (study, video) for study in truth["studies"]
              for video in study["videos"]}
    assert {video["format"] for _, video in videos.values()} == set(synthetic.FORMATS)
    for row in rows:
        study, video = videos[row["FileName"]]
        plan = synthetic.plan_study(SEED, study["index"], num_frames=(12, 20),
                                    magnified_fraction=0.5, magnifications=(2, 3))
        video_index = study["videos"].index(video)
        expected, boxes = plan.render(video_index, SIZE)
        assert expected.shape == (video["num_frames"], SIZE, SIZE)
        assert plan.study_uid == study["study_uid"] == row["StudyInstanceUID"]
        assert video["lesion_boxes"].keys() == boxes.keys()
        for segment, box in boxes.items():
            np.testing.assert_allclose(video["lesion_boxes"][segment], box, atol=0.006)
        path = out_dir / row["FileName"]
        if video["format"] == "dcm":
            dataset_file = pydicom.dcmread(path)
            np.testing.assert_array_equal(dataset_file.pixel_array, expected)
            assert dataset_file.SOPClassUID == "1.2.840.10008.5.1.4.1.1.12.1"
            assert dataset_file.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert int(dataset_file.NumberOfFrames) == video["num_frames"]
            assert dataset_file.PhotometricInterpretation == "MONOCHROME2"
            assert dataset_file.BitsAllocated == 8
            assert dataset_file.StudyInstanceUID == study["study_uid"]
            assert dataset_file.SeriesInstanceUID == video["series_uid"]
            assert float(dataset_file.FrameTime) == pytest.approx(1000 / video["fps"], abs=1e-3)
            assert int(dataset_file.CineRate) == video["fps"]
        else:
            decoded = _decode(path)
            assert decoded.shape == expected.shape
            error = np.abs(decoded.astype(int) - expected)
            assert error.mean() < 2.0 and error.max() < 40
            with av.open(str(path)) as container:
                assert container.streams.video[0].average_rate == video["fps"]


def test_ground_truth_findings_round_trip(dataset):
    _, _, truth = dataset
    assert truth["seed"] == SEED and truth["size"] == SIZE
    for study in truth["studies"]:
        findings = reports.from_json(study["findings"])
        assert reports.to_json(findings) == study["findings"]
        assert findings == synthetic.plan_study(SEED, study["index"]).findings
        for video in study["videos"]:
            system = synthetic.VIEWS[video["view"]].system
            lesions_in_view = {s for s in findings.lesions if reports.system_of(s) == system}
            # Left-dominant hearts draw the PDA from the LCx, in left views.
            if findings.dominance == "left" and "pda" in findings.lesions:
                lesions_in_view ^= {"pda"}
            assert set(video["lesion_boxes"]) == lesions_in_view
            for boxes in video["lesion_boxes"].values():
                assert np.asarray(boxes).shape == (video["num_frames"], 4)


def test_generate_is_deterministic_across_runs_and_workers(tmp_path):
    options = dict(size=SIZE, num_frames=(8, 10), formats=("dcm",))
    first = synthetic.generate(tmp_path / "a", 3, 11, **options)
    second = synthetic.generate(tmp_path / "b", 3, 11, workers=2, **options)
    other = synthetic.generate(tmp_path / "c", 3, 12, **options)
    assert first.read_bytes() == second.read_bytes()
    assert ((tmp_path / "a" / "ground_truth.json").read_bytes()
            == (tmp_path / "b" / "ground_truth.json").read_bytes())
    assert first.read_bytes() != other.read_bytes()
    for dicom_file in sorted((tmp_path / "a").rglob("*.dcm")):
        twin = tmp_path / "b" / dicom_file.relative_to(tmp_path / "a")
        np.testing.assert_array_equal(pydicom.dcmread(dicom_file).pixel_array,
                                      pydicom.dcmread(twin).pixel_array)


def test_command_line_writes_a_comma_separated_manifest(tmp_path):
    synthetic.main(["--out", str(tmp_path), "--num_studies", "1", "--seed", "3", "--size", "32",
                    "--num_frames", "6", "--formats", "mp4", "--sep", ",", "--workers", "1"])
    with open(tmp_path / "manifest.csv", encoding="utf-8", newline="") as manifest:
        rows = list(csv.DictReader(manifest))
    assert tuple(rows[0]) == synthetic.MANIFEST_COLUMNS
    for row in rows:
        assert row["FileName"].endswith(".mp4")
        assert _decode(tmp_path / row["FileName"]).shape == (6, 32, 32)


def test_generate_rejects_bad_options(tmp_path):
    with pytest.raises(ValueError, match="formats"):
        synthetic.generate(tmp_path, 1, 0, formats=("gif",))
    with pytest.raises(ValueError, match="num_frames"):
        synthetic.generate(tmp_path, 1, 0, num_frames=(20, 10))
    with pytest.raises(ValueError, match="sep"):
        synthetic.generate(tmp_path, 1, 0, sep="ab")


def test_cache_folder_changes_with_the_renderer_version(monkeypatch):
    from input_pipeline import data_cache

    options = dict(cache_dir="/cache", num_studies=4, size=64, num_frames=(8, 12), seed=0)
    before = data_cache.synthetic_dir(options)
    assert before.startswith("/cache/")
    monkeypatch.setattr(synthetic, "RENDERER_VERSION", synthetic.RENDERER_VERSION + 1)
    assert data_cache.synthetic_dir(options) != before
