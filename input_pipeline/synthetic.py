"""Synthetic coronary angiography studies, written as real video files plus a manifest.

For: the demo and the tests, which need angiogram-like studies whose findings are
known exactly and which go through the real path (files -> `prepare` -> shards).
Each study gets findings from `synthetic_findings.random_findings`, a rendered
report, and 2-4 views (at least one left- and one right-system view). Each view is
a procedurally drawn 3D vessel tree projected for its C-arm angles at a fixed
magnification (a left-dominant study's short RCA looks small): segments know
their report key, stenoses narrow the vessel by their percent, occlusions stop the
contrast (faint late filling with collaterals), contrast arrives, fills and washes
out, the heart beats, and a catheter, spine, ribs and noise sit in the field.
With --magnified_fraction, a full view may be followed by a magnified one (2x, or
--magnifications 2 3) at the same angles, centred on a fixed landmark of its system
(the middle of the proximal LAD, the mid RCA, ...), never on a lesion: lumens and
narrowings grow with it, a lesion keeps its percent. Every video also gets its own
report, of what its frame shows (its system's lesions, for a magnified view those
inside the frame, and dominance): the ViewReport column.
Videos are written as MP4 (libx264), AVI (MJPEG) or multi-frame XA DICOM.

Not for: realistic image statistics or any clinical use, and not a data loader
(`prepare` reads what this writes). It imports no TensorFlow.

Usage:
  python -m input_pipeline.synthetic --out /tmp/synth --num_studies 300 --seed 0
Defaults are small for speed: 128x128 pixels, 32-64 frames at 15 or 30 fps; 300
studies (~900 videos) then take ~100 CPU-seconds, about a minute with --workers 2
on two idle cores. `--size 512 --num_frames 40 120` gives the real size and length
(~1.5 CPU-seconds and up to ~1 GB of memory per video and worker).
Writes DIR/manifest.csv (DeepCORO-CLIP format, 'α'-separated unless --sep),
DIR/ground_truth.json (findings, views and per-frame lesion boxes), DIR/boxes.jsonl
(those boxes as `prepare --boxes` reads them) and
DIR/videos/study_NNNNN/VV_<view>.{mp4,avi,dcm}.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import multiprocessing
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import av
import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, XRayAngiographicImageStorage, generate_uid

from deepcoro_jax.domain import reports
from input_pipeline import synthetic_findings

# Bumped whenever a change alters what `generate` writes for a seed (pixels, findings,
# boxes) or how the trainer's synthetic cache prepares it, which is keyed on it
# (data_cache.synthetic_dir).
RENDERER_VERSION = 4
FORMATS = ("mp4", "avi", "dcm")
MANIFEST_COLUMNS = (
    "FileName",
    "Split",
    "Report",
    "StudyInstanceUID",
    "left_significant",
    "right_significant",
    "left_max_stenosis",
    "right_max_stenosis",
    "view",
    "system",
    # What this video shows: its magnification (1 for a full view), the landmark a
    # magnified view is centred on ('' for a full view), its report (the findings
    # its frame shows, plus dominance) and labels read from that.
    "magnification",
    "landmark",
    "ViewReport",
    "dominance",
    "right_dominant",
    "view_cto",
    "view_severe",
    "view_max_stenosis",
)
# Magnified views are centred on one of these fixed points (the middle of the named
# segment), never on a lesion; a study's magnified view uses a landmark of its system.
LANDMARKS: dict[str, tuple[str, ...]] = {
    "left": ("prox_lad", "mid_lad", "prox_lcx", "dist_lcx"),
    "right": ("prox_rca", "mid_rca", "dist_rca"),
}
# A lesion shows in a magnified view when the middle of its narrowing lies inside the
# frame, this many pixels from its border, in at least half the frames.
_IN_VIEW_MARGIN_PX = 2.0


@dataclasses.dataclass(frozen=True)
class View:
    """A C-arm view: which coronary system it shows and its angles in degrees.

    primary_deg > 0 is LAO (< 0 RAO); secondary_deg > 0 is cranial (< 0 caudal),
    as in DICOM PositionerPrimaryAngle / PositionerSecondaryAngle.
    """

    system: str
    primary_deg: float
    secondary_deg: float


VIEWS: dict[str, View] = {
    "LAO_cranial": View("left", 40.0, 25.0),
    "RAO_cranial": View("left", -30.0, 30.0),
    "LAO_caudal": View("left", 45.0, -25.0),
    "RAO_caudal": View("left", -25.0, -25.0),
    "LAO": View("right", 40.0, 0.0),
    "RAO": View("right", -30.0, 0.0),
    "AP_cranial": View("right", 0.0, 30.0),
}
LEFT_VIEWS = tuple(name for name, view in VIEWS.items() if view.system == "left")
RIGHT_VIEWS = tuple(name for name, view in VIEWS.items() if view.system == "right")


@dataclasses.dataclass(frozen=True)
class _BranchSpec:
    """One vessel of the tree template, in heart coordinates.

    Heart coordinates: x to the patient's left, y superior, z anterior; about one
    unit across the left tree. `offsets` are control points relative to the branch
    start; `segments` split the branch by arc fraction into report segments
    ((key, end fraction), ...; key None for unnamed side branches).
    """

    name: str
    system: str
    parent: str | None
    attach: float
    offsets: tuple[tuple[float, float, float], ...]
    segments: tuple[tuple[str | None, float], ...]
    radius: tuple[float, float]


_LEFT_OSTIUM = (0.0, 0.02, 0.0)
_RIGHT_OSTIUM = (-0.08, 0.0, 0.12)
_MAX_CONTROL_POINTS = 6
_BRANCHES: tuple[_BranchSpec, ...] = (
    _BranchSpec("lm", "left", None, 0.0,
                ((0, 0, 0), (0.06, -0.01, 0.07), (0.12, -0.04, 0.13)),
                (("lmca", 1.0),), (0.022, 0.020)),
    _BranchSpec("lad", "left", "lm", 1.0,
                ((0, 0, 0), (0.04, -0.12, 0.12), (0.1, -0.35, 0.18), (0.18, -0.6, 0.13),
                 (0.24, -0.82, 0.0)),
                (("prox_lad", 0.3), ("mid_lad", 0.62), ("dist_lad", 1.0)), (0.018, 0.006)),
    _BranchSpec("d1", "left", "lad", 0.3,
                ((0, 0, 0), (0.12, -0.08, 0.0), (0.22, -0.22, -0.04), (0.28, -0.36, -0.08)),
                (("d1", 1.0),), (0.011, 0.005)),
    _BranchSpec("d2", "left", "lad", 0.55,
                ((0, 0, 0), (0.1, -0.08, -0.02), (0.18, -0.2, -0.06), (0.22, -0.3, -0.1)),
                (("d2", 1.0),), (0.009, 0.004)),
    _BranchSpec("septal1", "left", "lad", 0.2,
                ((0, 0, 0), (-0.04, -0.06, -0.06), (-0.06, -0.15, -0.1)),
                ((None, 1.0),), (0.004, 0.002)),
    _BranchSpec("septal2", "left", "lad", 0.42,
                ((0, 0, 0), (-0.04, -0.07, -0.06), (-0.05, -0.16, -0.1)),
                ((None, 1.0),), (0.004, 0.002)),
    _BranchSpec("lcx", "left", "lm", 1.0,
                ((0, 0, 0), (0.14, -0.02, -0.08), (0.26, -0.1, -0.25), (0.26, -0.22, -0.45),
                 (0.16, -0.38, -0.58), (0.04, -0.5, -0.62)),
                (("prox_lcx", 0.45), ("dist_lcx", 1.0)), (0.016, 0.008)),
    _BranchSpec("om1", "left", "lcx", 0.35,
                ((0, 0, 0), (0.08, -0.12, 0.02), (0.12, -0.28, 0.03), (0.13, -0.42, 0.02)),
                (("om1", 1.0),), (0.010, 0.004)),
    _BranchSpec("om2", "left", "lcx", 0.7,
                ((0, 0, 0), (0.04, -0.12, -0.02), (0.06, -0.26, -0.02), (0.05, -0.38, 0.0)),
                (("om2", 1.0),), (0.009, 0.004)),
    _BranchSpec("ramus", "left", "lm", 1.0,
                ((0, 0, 0), (0.1, -0.1, 0.03), (0.18, -0.24, 0.04), (0.22, -0.38, 0.02)),
                (("ramus", 1.0),), (0.010, 0.004)),
    _BranchSpec("lvp", "left", "lcx", 1.0,
                ((0, 0, 0), (-0.02, -0.12, -0.03), (-0.06, -0.24, -0.02)),
                (("lvp", 1.0),), (0.008, 0.004)),
    _BranchSpec("pda_from_lcx", "left", "lcx", 1.0,
                ((0, 0, 0), (0.06, -0.12, 0.08), (0.14, -0.24, 0.2), (0.22, -0.32, 0.34)),
                (("pda", 1.0),), (0.008, 0.004)),
    _BranchSpec("rca", "right", None, 0.0,
                ((0, 0, 0), (-0.16, -0.04, 0.1), (-0.32, -0.22, 0.08), (-0.34, -0.46, -0.1),
                 (-0.2, -0.56, -0.35), (0.02, -0.56, -0.5)),
                (("prox_rca", 0.3), ("mid_rca", 0.62), ("dist_rca", 1.0)), (0.02, 0.011)),
    _BranchSpec("conus", "right", "rca", 0.05,
                ((0, 0, 0), (0.04, 0.04, 0.08), (0.1, 0.04, 0.14)),
                ((None, 1.0),), (0.005, 0.002)),
    _BranchSpec("acute_marginal", "right", "rca", 0.55,
                ((0, 0, 0), (0.08, -0.1, 0.08), (0.16, -0.2, 0.1)),
                ((None, 1.0),), (0.006, 0.003)),
    _BranchSpec("pda", "right", "rca", 1.0,
                ((0, 0, 0), (0.08, -0.1, 0.06), (0.16, -0.24, 0.16), (0.22, -0.36, 0.28)),
                (("pda", 1.0),), (0.008, 0.004)),
    _BranchSpec("rpl", "right", "rca", 1.0,
                ((0, 0, 0), (0.1, 0.02, 0.0), (0.18, 0.0, 0.02), (0.24, -0.08, 0.06)),
                (("rpl", 1.0),), (0.008, 0.004)),
)
# Control points used per dominance where the vessel length depends on it.
_LCX_CONTROL_POINTS = {"right": 4, "codominant": 5, "left": 6}
_RCA_CONTROL_POINTS = {"right": 6, "codominant": 6, "left": 4}
_RAMUS_PREVALENCE = 0.3
_SAMPLES_PER_CONTROL_INTERVAL = 40
# Heart units that `fill` of the frame spans in every view of both systems. The largest
# trees project to about 1.1 units (a dominant RCA in LAO), so they stay in the frame,
# while a non-dominant RCA (about 0.5 units) looks as small as it is.
_FIELD_OF_VIEW = 1.0
# Centerline attenuation per unit of vessel radius at full contrast (a left main
# of radius 0.022 darkens its background by about e).
_CONTRAST_ATTENUATION = 45.0
_VESSEL_SIGMA_PER_RADIUS = 0.7  # Gaussian cross profile with about the lumen's FWHM
_MIN_SIGMA_PX = 0.5
# Stamps along a line at most 1.5 sigma apart sum to a smooth line (ripple < 1e-3).
_SPACING_PER_SIGMA = 1.5


@dataclasses.dataclass(frozen=True)
class Branch:
    """One drawn vessel: a dense 3D centerline with its radius and report segments."""

    name: str
    system: str
    parent: int  # index into Anatomy.branches, -1 for an ostial vessel
    attach: float  # arc fraction of the parent where this branch leaves it
    points: np.ndarray  # [N, 3] heart coordinates
    radius: np.ndarray  # [N] heart units
    arc: np.ndarray  # [N] arc fraction in [0, 1]
    length: float  # 3D length, heart units
    segments: tuple[tuple[str | None, float, float], ...]  # (key, start, end) arc fractions


@dataclasses.dataclass(frozen=True)
class Anatomy:
    """A study's coronary tree, shared by all its views so lesions agree across views."""

    dominance: str
    branches: tuple[Branch, ...]
    lesion_centre: Mapping[str, float]  # segment -> arc fraction within the segment
    lesion_half_length: Mapping[str, float]  # segment -> heart units

    def segment_location(self, segment: str) -> tuple[int, float, float] | None:
        """(branch index, start, end arc fractions) of a segment, None if not drawn."""
        for index, branch in enumerate(self.branches):
            for key, start, end in branch.segments:
                if key == segment:
                    return index, start, end
        return None


def _catmull_rom(control: np.ndarray, samples_per_interval: int) -> np.ndarray:
    """Dense curve through the control points [K, D] -> [(K-1) * n + 1, D]."""
    padded = np.concatenate(
        [2 * control[:1] - control[1:2], control, 2 * control[-1:] - control[-2:-1]]
    )
    u = np.linspace(0.0, 1.0, samples_per_interval, endpoint=False)[:, None]  # [n, 1]
    u2, u3 = u * u, u * u * u
    pieces = []
    for k in range(len(control) - 1):
        p0, p1, p2, p3 = padded[k], padded[k + 1], padded[k + 2], padded[k + 3]
        pieces.append(
            0.5 * (2 * p1 + (-p0 + p2) * u + (2 * p0 - 5 * p1 + 4 * p2 - p3) * u2
                   + (-p0 + 3 * p1 - 3 * p2 + p3) * u3)
        )
    pieces.append(control[-1:])
    return np.concatenate(pieces)


def _arc_fraction(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Cumulative arc fraction [N] along a polyline [N, D] and its total length."""
    steps = np.linalg.norm(np.diff(points, axis=0), axis=-1)
    cumulative = np.concatenate([[0.0], np.cumsum(steps)])
    total = float(cumulative[-1])
    return cumulative / max(total, 1e-9), total


def _rotation(angles: np.ndarray) -> np.ndarray:
    """3x3 rotation from small angles (radians) about x, y, z."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rot_z @ rot_y @ rot_x


def _branches_drawn(dominance: str, lesion_segments: frozenset[str], has_ramus: bool) -> set[str]:
    """Names of the template branches present for a dominance and the lesions to show."""
    drawn = {"lm", "lad", "d1", "d2", "septal1", "septal2", "lcx", "om1", "om2", "rca", "conus",
             "acute_marginal"}
    if has_ramus or "ramus" in lesion_segments:
        drawn.add("ramus")
    if dominance in ("left", "codominant") or "lvp" in lesion_segments:
        drawn.add("lvp")
    drawn.add("pda_from_lcx" if dominance == "left" else "pda")
    if dominance == "right" or "rpl" in lesion_segments:
        drawn.add("rpl")
    return drawn


def sample_anatomy(findings: reports.Findings, rng: np.random.Generator) -> Anatomy:
    """Draws a coronary tree for a study: dominance from the findings, every segment
    with a lesion present, and anatomical variation (branch course, size, lesion sites).

    The number of random draws does not depend on the findings, so the same rng state
    gives the same tree with or without a given lesion (same dominance).
    """
    if findings.dominance not in reports.DOMINANCES:
        raise ValueError(f"findings.dominance={findings.dominance!r}: not in {reports.DOMINANCES}")
    num_specs = len(_BRANCHES)
    jitter = rng.normal(0.0, 0.025, size=(num_specs, _MAX_CONTROL_POINTS, 3))
    attach_jitter = rng.uniform(-0.05, 0.05, size=num_specs)
    wiggle_amplitude = rng.uniform(0.004, 0.012, size=num_specs)
    wiggle_cycles = rng.uniform(1.5, 4.0, size=num_specs)
    wiggle_phase = rng.uniform(0.0, 2 * np.pi, size=num_specs)
    wiggle_direction = rng.normal(size=(num_specs, 3))
    heart_rotation = _rotation(rng.uniform(-0.15, 0.15, size=3))
    heart_scale = rng.uniform(0.9, 1.1)
    radius_scale = rng.uniform(0.85, 1.15)
    has_ramus = bool(rng.random() < _RAMUS_PREVALENCE)
    lesion_centre = rng.uniform(0.3, 0.7, size=len(reports.SEGMENTS))
    lesion_half_length = rng.uniform(0.04, 0.07, size=len(reports.SEGMENTS))

    lesion_segments = frozenset(findings.lesions)
    drawn = _branches_drawn(findings.dominance, lesion_segments, has_ramus)
    branches: list[Branch] = []
    index_of: dict[str, int] = {}
    unrotated: list[np.ndarray] = []  # centerlines before the heart's rotation
    for spec_index, spec in enumerate(_BRANCHES):
        if spec.name not in drawn:
            continue
        num_control = len(spec.offsets)
        radius_end = spec.radius[1]
        if spec.name == "lcx":
            num_control = _LCX_CONTROL_POINTS[findings.dominance]
            radius_end *= 1.4 if findings.dominance == "left" else 1.0
        elif spec.name == "rca":
            num_control = _RCA_CONTROL_POINTS[findings.dominance]
            radius_end *= 0.7 if findings.dominance == "left" else 1.0
        offsets = np.asarray(spec.offsets[:num_control], float)
        offsets[1:] += jitter[spec_index, 1:num_control]
        if spec.parent is None:
            start = np.asarray(_LEFT_OSTIUM if spec.system == "left" else _RIGHT_OSTIUM, float)
            parent, attach = -1, 0.0
        else:
            parent = index_of[spec.parent]
            attach = spec.attach if spec.attach >= 1.0 else spec.attach + attach_jitter[spec_index]
            parent_arc = branches[parent].arc
            start = unrotated[parent][min(np.searchsorted(parent_arc, attach), len(parent_arc) - 1)]
        control = start + offsets * heart_scale
        centerline = _catmull_rom(control, _SAMPLES_PER_CONTROL_INTERVAL)  # [N, 3]
        arc, _ = _arc_fraction(centerline)
        direction = wiggle_direction[spec_index] / np.linalg.norm(wiggle_direction[spec_index])
        wiggle = wiggle_amplitude[spec_index] * np.sin(
            2 * np.pi * wiggle_cycles[spec_index] * arc + wiggle_phase[spec_index]
        ) * np.sin(np.pi * arc)  # zero at both ends so branches stay attached
        centerline = centerline + wiggle[:, None] * direction
        unrotated.append(centerline)
        points = centerline @ heart_rotation.T
        arc, length = _arc_fraction(points)
        radius = radius_scale * (spec.radius[0] + (radius_end - spec.radius[0]) * arc)
        segments = []
        segment_start = 0.0
        for key, segment_end in spec.segments:
            segments.append((key, segment_start, segment_end))
            segment_start = segment_end
        index_of[spec.name] = len(branches)
        branches.append(Branch(spec.name, spec.system, parent, attach, points, radius, arc,
                               length, tuple(segments)))
    return Anatomy(
        dominance=findings.dominance,
        branches=tuple(branches),
        lesion_centre=dict(zip(reports.SEGMENTS, lesion_centre.tolist(), strict=True)),
        lesion_half_length=dict(zip(reports.SEGMENTS, lesion_half_length.tolist(), strict=True)),
    )


def _view_basis(primary_deg: float, secondary_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Image right and image up unit vectors (heart coordinates) for C-arm angles."""
    primary, secondary = np.deg2rad(primary_deg), np.deg2rad(secondary_deg)
    toward_detector = np.array([
        np.sin(primary) * np.cos(secondary), np.sin(secondary), np.cos(primary) * np.cos(secondary)
    ])
    image_right = np.cross([0.0, 1.0, 0.0], toward_detector)
    image_right /= np.linalg.norm(image_right)
    image_up = np.cross(toward_detector, image_right)
    return image_right, image_up


@dataclasses.dataclass(frozen=True)
class _Centerlines:
    """A view's vessel samples in pixels (P samples in all)."""

    xy: np.ndarray  # [P, 2] pixels (column, row)
    radius: np.ndarray  # [P] heart units
    pixels_per_unit: float
    spacing: np.ndarray  # [P] projected pixels between samples
    branch: np.ndarray  # [P] index into Anatomy.branches
    arc: np.ndarray  # [P] arc fraction within the branch
    depth: np.ndarray  # [P] heart units along the tree from the ostium


def _branch_depth_offsets(anatomy: Anatomy) -> list[float]:
    """Distance along the tree from the ostium to each branch start, heart units."""
    offsets: list[float] = []
    for branch in anatomy.branches:
        if branch.parent < 0:
            offsets.append(0.0)
        else:
            offsets.append(offsets[branch.parent]
                           + branch.attach * anatomy.branches[branch.parent].length)
    return offsets


def _project_centerlines(anatomy: Anatomy, system: str, image_right: np.ndarray,
                         image_up: np.ndarray, size: int, fill: float,
                         shift: np.ndarray, magnification: float = 1.0,
                         centre_point: np.ndarray | None = None) -> _Centerlines:
    """Projects the system's branches, centres them in the frame and resamples each at
    _SPACING_PER_SIGMA times its smallest Gaussian width.

    `fill` is the fraction of the frame that _FIELD_OF_VIEW heart units span at
    magnification 1 (the detector's field); the tree's own extent does not change
    it. `magnification` scales it; `centre_point` (heart coordinates) is put at the
    frame's centre instead of the middle of the system's extent.
    """
    indices = [i for i, branch in enumerate(anatomy.branches) if branch.system == system]
    projected = {
        i: np.stack([anatomy.branches[i].points @ image_right,
                     -(anatomy.branches[i].points @ image_up)], axis=-1)  # [N, 2]
        for i in indices
    }
    everything = np.concatenate(list(projected.values()))
    low, high = everything.min(axis=0), everything.max(axis=0)
    pixels_per_unit = fill * size * magnification / _FIELD_OF_VIEW
    if centre_point is None:
        centre = 0.5 * (low + high)
    else:
        centre = np.array([centre_point @ image_right, -(centre_point @ image_up)])
    depth_offsets = _branch_depth_offsets(anatomy)
    columns: dict[str, list[np.ndarray]] = {k: [] for k in
                                            ("xy", "radius", "spacing", "branch", "arc", "depth")}
    for i in indices:
        branch = anatomy.branches[i]
        xy = (projected[i] - centre) * pixels_per_unit + size / 2 + shift  # [N, 2]
        smallest_sigma = _VESSEL_SIGMA_PER_RADIUS * branch.radius.min() * pixels_per_unit
        xy, spacing, (arc, radius) = _resample(
            xy, _SPACING_PER_SIGMA * max(_MIN_SIGMA_PX, smallest_sigma),
            (branch.arc, branch.radius))
        columns["xy"].append(xy)
        columns["arc"].append(arc)
        columns["radius"].append(radius)
        columns["spacing"].append(np.full(len(arc), spacing))
        columns["branch"].append(np.full(len(arc), i))
        columns["depth"].append(depth_offsets[i] + arc * branch.length)
    return _Centerlines(
        pixels_per_unit=pixels_per_unit,
        **{key: np.concatenate(value) for key, value in columns.items()},
    )


def _downstream(anatomy: Anatomy, lines: _Centerlines, branch: int, arc: float) -> np.ndarray:
    """[P] bool: samples fed through the point `arc` of `branch`."""
    fed_branches = {branch}
    for index, other in enumerate(anatomy.branches):
        if other.parent in fed_branches and (other.parent != branch or other.attach >= arc):
            fed_branches.add(index)
    whole = np.isin(lines.branch, sorted(fed_branches - {branch}))
    return whole | ((lines.branch == branch) & (lines.arc >= arc))


@dataclasses.dataclass(frozen=True)
class _LesionEffects:
    """How the findings change a view's vessels: per sample radius, flow and static opacity."""

    radius: np.ndarray  # [P] heart units after narrowing
    delay: np.ndarray  # [P] extra normalised depth before contrast arrives
    flow: np.ndarray  # [P] contrast fraction reaching the sample
    static: np.ndarray  # [P] contrast-independent opacity (calcium, stent struts)
    regions: dict[str, np.ndarray]  # segment -> [P] bool, samples inside the lesion


def _plateau(distance: np.ndarray) -> np.ndarray:
    """Lesion profile: 1 for |distance| <= 0.5, a cosine ramp to 0 at |distance| = 1."""
    ramp = np.clip(2 * np.abs(distance) - 1, 0.0, 1.0)
    return 0.5 * (1 + np.cos(np.pi * ramp))


_CALCIFICATION_OPACITY = {"minimal": 0.15, "moderate": 0.3, "severe": 0.5}
_STENT_OPACITY = 0.25


def _lesion_effects(findings: reports.Findings, anatomy: Anatomy, system: str,
                    lines: _Centerlines) -> _LesionEffects:
    """Applies each lesion of `system` to the view's samples."""
    radius = lines.radius.copy()
    delay = np.zeros_like(radius)
    flow = np.ones_like(radius)
    static = np.zeros_like(radius)
    regions: dict[str, np.ndarray] = {}
    for segment, lesion in findings.lesions.items():
        location = anatomy.segment_location(segment)
        if location is None or anatomy.branches[location[0]].system != system:
            continue
        branch_index, start, end = location
        branch = anatomy.branches[branch_index]
        centre = start + anatomy.lesion_centre[segment] * (end - start)
        half = min(anatomy.lesion_half_length[segment] / branch.length, 0.35 * (end - start))
        on_branch = lines.branch == branch_index
        profile = np.where(on_branch, _plateau((lines.arc - centre) / half), 0.0)  # [P]
        regions[segment] = on_branch & (np.abs(lines.arc - centre) <= half)
        fraction = lesion.stenosis / 100.0
        radius *= 1.0 - fraction * profile
        distal = _downstream(anatomy, lines, branch_index, centre)
        if lesion.stenosis >= 100:
            flow[distal] *= 0.35 if lesion.collaterals else 0.0
            delay[distal] += 0.6
        elif lesion.stenosis > 50:
            delay[distal] += 0.5 * ((lesion.stenosis - 50) / 50) ** 2
        if lesion.thrombus:
            flow *= 1.0 - 0.4 * profile
        if lesion.calcification is not None:
            static += _CALCIFICATION_OPACITY[lesion.calcification] * profile
        if lesion.prior_stent or lesion.in_stent_restenosis:
            stent = on_branch & (np.abs(lines.arc - centre) <= 1.5 * half)
            static += _STENT_OPACITY * stent
    return _LesionEffects(radius, delay, flow, static, regions)


def _interpolation_matrix(size: int, cells: int) -> np.ndarray:
    """[size, cells] linear interpolation weights from a coarse grid to pixels."""
    position = np.linspace(0, cells - 1, size)
    low = np.floor(position).astype(int).clip(0, cells - 2)
    weight = position - low
    matrix = np.zeros((size, cells))
    matrix[np.arange(size), low] = 1 - weight
    matrix[np.arange(size), low + 1] = weight
    return matrix


def _background(rng: np.random.Generator, size: int, spine_x: float,
                heart_centre: np.ndarray) -> np.ndarray:
    """[size, size] static attenuation: heart shadow, soft tissue blobs, spine, ribs,
    diaphragm, texture; heart_centre [2] (column, row) pixels."""
    rows, cols = np.mgrid[0:size, 0:size] / size  # [S, S] each, in [0, 1)
    attenuation = np.full((size, size), 0.2)
    heart_col, heart_row = heart_centre / size
    heart_radii = rng.uniform(0.35, 0.5, size=2)
    heart = ((cols - heart_col) / heart_radii[0]) ** 2 + ((rows - heart_row) / heart_radii[1]) ** 2
    attenuation += rng.uniform(0.1, 0.25) * _sigmoid((1 - heart) / 0.15)
    centres = rng.uniform(-0.1, 1.1, size=(8, 2))
    widths = rng.uniform(0.12, 0.35, size=8)
    amplitudes = rng.uniform(-0.12, 0.18, size=8)
    for (cy, cx), width, amplitude in zip(centres, widths, amplitudes, strict=True):
        attenuation += amplitude * np.exp(-((rows - cy) ** 2 + (cols - cx) ** 2) / (2 * width**2))
    vertebra_period = rng.uniform(0.11, 0.16)
    vertebra_phase = rng.uniform(0, 2 * np.pi)
    spine = np.exp(-((cols - spine_x) ** 2) / (2 * 0.07**2))
    attenuation += 0.35 * spine * (1 + 0.3 * np.cos(2 * np.pi * rows / vertebra_period
                                                    + vertebra_phase))
    rib_rows = rng.uniform(-0.1, 1.0, size=4)
    rib_curvature = rng.uniform(0.3, 0.8, size=4)
    for rib_row, curvature in zip(rib_rows, rib_curvature, strict=True):
        curve = rib_row + curvature * (cols - spine_x) ** 2
        attenuation += 0.1 * np.exp(-((rows - curve) ** 2) / (2 * 0.018**2))
    diaphragm_row = rng.uniform(0.75, 1.05)
    diaphragm_tilt = rng.uniform(-0.3, 0.3)
    diaphragm = diaphragm_row + diaphragm_tilt * (cols - 0.5) - 0.4 * (cols - 0.5) ** 2
    attenuation += 0.45 / (1 + np.exp(-(rows - diaphragm) / 0.015))
    cells = 12
    coarse = rng.normal(0.0, 0.05, size=(cells, cells))
    interpolate = _interpolation_matrix(size, cells)
    attenuation += interpolate @ coarse @ interpolate.T
    corner = (rows - 0.5) ** 2 + (cols - 0.5) ** 2
    attenuation += 0.5 * np.clip(corner - 0.2, 0.0, None)
    return attenuation


def _splat(frame: np.ndarray, xy: np.ndarray, sigma: np.ndarray, amplitude: np.ndarray,
           num_frames: int, size: int) -> np.ndarray:
    """Sums Gaussian stamps into float32 [T, S, S]: frame [M] int, xy [M, 2] (column, row)
    pixels, sigma [M] pixels, amplitude [M] peak value of each stamp. Each stamp covers
    the pixels within 2.5 sigma of it at least (a square window about its nearest pixel)."""
    image = np.zeros(num_frames * size * size)
    half_widths = np.ceil(2.5 * sigma + 0.5).astype(np.int32)
    for half_width in np.unique(half_widths):
        chosen = half_widths == half_width
        offsets = np.arange(-half_width, half_width + 1, dtype=np.int32)  # [K]
        x = xy[chosen, 0].astype(np.float32)
        y = xy[chosen, 1].astype(np.float32)
        inv_two_var = (0.5 / sigma[chosen] ** 2).astype(np.float32)[:, None]
        columns = np.round(x).astype(np.int32)[:, None] + offsets  # [M', K]
        rows = np.round(y).astype(np.int32)[:, None] + offsets  # [M', K]
        weight_x = np.exp(-np.square(columns - x[:, None]) * inv_two_var)
        weight_y = np.exp(-np.square(rows - y[:, None]) * inv_two_var)
        weight_x *= (columns >= 0) & (columns < size)
        weight_y *= ((rows >= 0) & (rows < size)) * amplitude[chosen, None].astype(np.float32)
        weights = weight_y[:, :, None] * weight_x[:, None, :]  # [M', K, K]
        row_starts = (frame[chosen].astype(np.int32)[:, None] * size
                      + np.clip(rows, 0, size - 1)) * size  # [M', K]
        flat = row_starts[:, :, None] + np.clip(columns, 0, size - 1)[:, None, :]  # [M', K, K]
        image += np.bincount(flat.ravel(), weights.ravel(), minlength=image.size)
    return image.reshape(num_frames, size, size).astype(np.float32)


def _frame_stamps(xy: np.ndarray, sigma: np.ndarray | float, amplitude: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame stamps xy [T, P, 2] with sigma and amplitude (broadcast to [T, P]) ->
    flat (frame [M], xy [M, 2], sigma [M], amplitude [M]) of the stamps that show."""
    shape = xy.shape[:2]
    amplitude = np.broadcast_to(amplitude, shape)
    shows = amplitude > 1e-4
    frame = np.broadcast_to(np.arange(shape[0])[:, None], shape)
    return frame[shows], xy[shows], np.broadcast_to(sigma, shape)[shows], amplitude[shows]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * x))


def _line_stamps(peak: np.ndarray, sigma: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Stamp amplitudes such that stamps every `spacing` pixels along a line add up to a
    cross profile with the given peak (all broadcast together)."""
    return peak * spacing / (np.sqrt(2 * np.pi) * sigma)


def _catheter(rng: np.random.Generator, tip: np.ndarray, spine_x: float, size: int,
              sigma: float) -> tuple[np.ndarray, float]:
    """Catheter centerline [N, 2] pixels, from the ostium up over the aortic root and down
    along the spine out of the frame, and its sample spacing for stamps of width sigma."""
    arch_row = max(0.04 * size, tip[1] - size * rng.uniform(0.15, 0.3))
    control = np.array([
        tip,
        tip + np.array([rng.uniform(-0.05, 0.05) * size, -0.08 * size]),
        [0.5 * (tip[0] + spine_x * size), arch_row],
        [spine_x * size, 0.55 * size],
        [spine_x * size + rng.uniform(-0.05, 0.05) * size, 1.15 * size],
    ])
    xy, spacing, _ = _resample(_catmull_rom(control, 64), _SPACING_PER_SIGMA * sigma)
    return xy, spacing


def _resample(xy: np.ndarray, spacing: float, values: Sequence[np.ndarray] = ()
              ) -> tuple[np.ndarray, float, list[np.ndarray]]:
    """Resamples a polyline [N, 2] and per-point values (each [N]) at about `spacing`
    pixels; returns the new points, the exact spacing and the interpolated values."""
    arc, length = _arc_fraction(xy)
    num = max(2, int(np.ceil(length / spacing)) + 1)
    positions = np.linspace(0.0, 1.0, num)
    resampled = np.stack([np.interp(positions, arc, xy[:, 0]),
                          np.interp(positions, arc, xy[:, 1])], axis=-1)  # [num, 2]
    return resampled, length / (num - 1), [np.interp(positions, arc, v) for v in values]


@dataclasses.dataclass(frozen=True)
class _Motion:
    """Cardiac motion per frame: about 1 Hz beat, contraction, twist and a travelling
    deformation (breath is held during acquisition, so nothing else moves)."""

    beat: np.ndarray  # [T] in [-1, 1]
    contraction: np.ndarray  # [T] scale about the heart centre
    twist: np.ndarray  # [T] radians
    wave_number: np.ndarray  # [2] radians per pixel
    wave_phase: np.ndarray  # [2]
    wave_amplitude: float  # pixels
    heart_centre: np.ndarray  # [2] pixels

    def move(self, xy: np.ndarray, heart_weight: np.ndarray | float) -> np.ndarray:
        """[P, 2] rest positions -> [T, P, 2]; heart_weight [P] (or 1) scales the beat."""
        relative = xy - self.heart_centre  # [P, 2]
        cos, sin = np.cos(self.twist)[:, None], np.sin(self.twist)[:, None]  # [T, 1]
        rotated = np.stack([cos * relative[:, 0] - sin * relative[:, 1],
                            sin * relative[:, 0] + cos * relative[:, 1]], axis=-1)  # [T, P, 2]
        waves = self.wave_amplitude * np.stack([
            np.sin(self.wave_number[0] * xy[:, 1] + self.wave_phase[0]),
            np.sin(self.wave_number[1] * xy[:, 0] + self.wave_phase[1]),
        ], axis=-1)  # [P, 2]
        beating = (self.heart_centre + self.contraction[:, None, None] * rotated
                   + self.beat[:, None, None] * waves)  # [T, P, 2]
        weight = np.asarray(heart_weight)[..., None]
        return xy + weight * (beating - xy)


def _sample_motion(rng: np.random.Generator, times: np.ndarray, heart_centre: np.ndarray,
                   size: int) -> _Motion:
    heart_rate = rng.uniform(1.0, 1.5)  # Hz
    beat = np.sin(2 * np.pi * heart_rate * times + rng.uniform(0, 2 * np.pi))
    return _Motion(
        beat=beat,
        contraction=1 - rng.uniform(0.04, 0.08) * (0.5 + 0.5 * beat),
        twist=rng.uniform(0.03, 0.06) * beat,
        wave_number=rng.uniform(2.0, 4.0, size=2) * 2 * np.pi / size,
        wave_phase=rng.uniform(0, 2 * np.pi, size=2),
        wave_amplitude=rng.uniform(0.005, 0.012) * size,
        heart_centre=heart_centre,
    )


def render_video(
    findings: reports.Findings,
    view: str,
    rng: np.random.Generator,
    num_frames: int,
    size: int,
    fps: float,
    anatomy: Anatomy | None = None,
    magnification: float = 1.0,
    landmark: str | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Renders one angiographic run of `view` for a study with these findings.

    Args:
      findings: the study's findings; lesions on segments of the view's system show.
      view: a key of VIEWS.
      rng: all randomness of the run (and of the anatomy when `anatomy` is None).
      num_frames: T, at least 2.
      size: output height and width in pixels, even, at least 32.
      fps: frame rate; sets the timing of contrast and heartbeat.
      anatomy: the study's tree from `sample_anatomy`; drawn from `rng` when None.
      magnification: > 1 for a magnified view (vessels, lumens and lesions all
        scale with it; a lesion keeps its percent).
      landmark: with magnification > 1, the segment (one of LANDMARKS[system])
        whose middle the view is centred on, give or take 5% of the frame.

    Returns:
      frames: uint8 [T, size, size], vessels dark on a lighter background.
      boxes: segment -> float32 [T, 4] box (x0, y0, x1, y1) in pixel coordinates
        (column, row; pixel centres at integers) around each lesion this view
        shows: every lesion of its system in a full view; in a magnified view, those
        whose narrowing lies inside the frame (_IN_VIEW_MARGIN_PX from its border) in
        at least half the frames.
    """
    if view not in VIEWS:
        raise ValueError(f"view={view!r}: not one of {sorted(VIEWS)}")
    if num_frames < 2:
        raise ValueError(f"num_frames={num_frames}: need at least 2")
    if size < 32 or size % 2:
        raise ValueError(f"size={size}: need an even size of at least 32 pixels")
    if fps <= 0:
        raise ValueError(f"fps={fps}: must be positive")
    system = VIEWS[view].system
    if magnification < 1:
        raise ValueError(f"magnification={magnification}: need at least 1")
    if (magnification > 1) != (landmark is not None):
        raise ValueError(f"magnification={magnification}, landmark={landmark!r}: a magnified "
                         "view needs a landmark to centre on, and only a magnified view has one")
    if landmark is not None and landmark not in LANDMARKS[system]:
        raise ValueError(f"landmark={landmark!r}: view {view} shows the {system} system; "
                         f"choose one of {LANDMARKS[system]}")
    if anatomy is None:
        anatomy = sample_anatomy(findings, rng)
    elif anatomy.dominance != findings.dominance:
        raise ValueError(f"anatomy.dominance={anatomy.dominance!r} differs from "
                         f"findings.dominance={findings.dominance!r}")
    undrawn = [s for s in findings.lesions if anatomy.segment_location(s) is None]
    if undrawn:
        raise ValueError(f"findings have lesions in {undrawn}, which this anatomy does not "
                         "draw; sample the anatomy from these findings")
    spec = VIEWS[view]
    angle_jitter = rng.uniform(-6.0, 6.0, size=2)
    image_right, image_up = _view_basis(spec.primary_deg + angle_jitter[0],
                                        spec.secondary_deg + angle_jitter[1])
    lines = _project_centerlines(anatomy, spec.system, image_right, image_up, size,
                                 fill=rng.uniform(0.65, 0.8),
                                 shift=rng.uniform(-0.05, 0.05, size=2) * size,
                                 magnification=magnification,
                                 centre_point=_landmark_point(anatomy, landmark))
    effects = _lesion_effects(findings, anatomy, spec.system, lines)

    # Contrast: arrives, fills the tree from the ostium outwards, washes out the same way.
    times = np.arange(num_frames) / fps  # [T] seconds
    duration = num_frames / fps
    arrival = duration * rng.uniform(0.02, 0.1)
    fill_time = duration * rng.uniform(0.22, 0.35)
    washout_start = duration * rng.uniform(0.6, 0.7)
    washout_time = duration * rng.uniform(0.2, 0.3)
    injection = rng.uniform(0.85, 1.1)
    front_width = 0.05  # in normalised depth
    depth = lines.depth / lines.depth.max() + effects.delay  # [P]
    fill_front = ((times - arrival) / fill_time)[:, None]  # [T, 1]
    washout_front = ((times - washout_start) / washout_time)[:, None]
    contrast = (_sigmoid((fill_front - depth) / front_width)
                * (1 - _sigmoid((washout_front - depth) / front_width))
                * effects.flow * injection)  # [T, P]
    catheter_contrast = (_sigmoid((times - arrival + 0.05 * duration) / (0.02 * duration))
                         * (1 - _sigmoid((times - washout_start) / (0.03 * duration))))  # [T]

    spine_x = float(np.clip(0.5 + 0.004 * spec.primary_deg + rng.uniform(-0.05, 0.05), 0.2, 0.8))
    catheter_radius = 0.006 * rng.uniform(0.9, 1.1)
    catheter_sigma = max(_MIN_SIGMA_PX, 0.8 * catheter_radius * lines.pixels_per_unit)
    catheter_xy, catheter_spacing = _catheter(rng, lines.xy[0], spine_x, size, catheter_sigma)
    motion = _sample_motion(rng, times, lines.xy.mean(axis=0), size)
    background = _background(rng, size, spine_x, motion.heart_centre)
    brightness = rng.uniform(200.0, 235.0)
    noise_gain = rng.uniform(0.25, 0.45)
    noise = rng.standard_normal((num_frames, size, size), dtype=np.float32)

    vessel_xy = motion.move(lines.xy, 1.0)  # [T, P, 2]
    # The catheter moves with the heart near its tip only; the rest of it stays still.
    catheter_heart_weight = np.exp(-np.arange(len(catheter_xy)) * catheter_spacing
                                   / (0.1 * size))  # [N]
    catheter_moves = catheter_heart_weight > 0.01
    catheter_peak = 0.2 + 0.7 * _CONTRAST_ATTENUATION * catheter_radius * catheter_contrast  # [T]

    # Gaussian stamps, per frame: contrast in the (narrowed) lumen, calcium and stent
    # opacity, the moving part of the catheter; then the still part of the catheter.
    lumen_sigma = np.maximum(lines.spacing / _SPACING_PER_SIGMA,
                             _VESSEL_SIGMA_PER_RADIUS * effects.radius * lines.pixels_per_unit)
    static_sigma = np.maximum(lines.spacing / _SPACING_PER_SIGMA,
                              _VESSEL_SIGMA_PER_RADIUS * lines.radius * lines.pixels_per_unit)
    lumen_peak = _CONTRAST_ATTENUATION * effects.radius * contrast  # [T, P]
    static_peak = _CONTRAST_ATTENUATION * lines.radius * effects.static  # [P]
    groups = [
        _frame_stamps(vessel_xy, lumen_sigma,
                      _line_stamps(lumen_peak, lumen_sigma, lines.spacing)),
        _frame_stamps(vessel_xy, static_sigma,
                      _line_stamps(static_peak, static_sigma, lines.spacing)),
        _frame_stamps(motion.move(catheter_xy[catheter_moves],
                                  catheter_heart_weight[catheter_moves]),
                      catheter_sigma,
                      _line_stamps(catheter_peak[:, None], catheter_sigma, catheter_spacing)),
    ]
    frame, xy, sigma, amplitude = (np.concatenate(column) for column in zip(*groups, strict=True))
    attenuation = _splat(frame, xy, sigma, amplitude, num_frames, size)  # [T, S, S]
    still = catheter_xy[~catheter_moves]  # [N', 2]
    still_catheter = _splat(np.zeros(len(still), int), still, np.full(len(still), catheter_sigma),
                            np.full(len(still), _line_stamps(1.0, catheter_sigma,
                                                             catheter_spacing)),
                            1, size)  # [1, S, S]
    attenuation += catheter_peak.astype(np.float32)[:, None, None] * still_catheter
    attenuation += background.astype(np.float32)

    # Exposure: Beer-Lambert on a bright field, then quantum noise (std ~ sqrt(intensity)).
    intensity = np.exp(-attenuation, out=attenuation)
    intensity *= brightness
    noise *= noise_gain * np.sqrt(intensity)
    intensity += noise
    frames = np.clip(np.rint(intensity, out=intensity), 0, 255).astype(np.uint8)

    boxes: dict[str, np.ndarray] = {}
    for segment, region in effects.regions.items():
        if not region.any():
            continue
        region_xy = vessel_xy[:, region]  # [T, R, 2]
        if magnification > 1:
            middle = region_xy.mean(axis=1)  # [T, 2]
            inside = np.all((middle >= _IN_VIEW_MARGIN_PX)
                            & (middle <= size - 1 - _IN_VIEW_MARGIN_PX), axis=-1)  # [T]
            if inside.mean() < 0.5:
                continue
        margin = lines.radius[region].max() * lines.pixels_per_unit + 1.0
        low = np.clip(region_xy.min(axis=1) - margin, 0, size - 1)  # [T, 2]
        high = np.clip(region_xy.max(axis=1) + margin, 0, size - 1)
        boxes[segment] = np.concatenate([low, high], axis=-1).astype(np.float32)  # [T, 4]
    return frames, boxes


def _landmark_point(anatomy: Anatomy, landmark: str | None) -> np.ndarray | None:
    """The 3D point (heart coordinates) in the middle of the landmark segment, or None."""
    if landmark is None:
        return None
    location = anatomy.segment_location(landmark)
    if location is None:
        raise ValueError(f"landmark={landmark!r}: this anatomy does not draw that segment")
    branch_index, start, end = location
    branch = anatomy.branches[branch_index]
    middle = int(np.searchsorted(branch.arc, 0.5 * (start + end)))
    return branch.points[min(middle, len(branch.arc) - 1)]


def view_findings(findings: reports.Findings, system: str,
                  shown: Sequence[str] | None = None) -> reports.Findings:
    """What one view shows of a study's findings: the lesions of its system (only those
    in `shown`, when given) and the dominance."""
    return reports.Findings({segment: lesion for segment, lesion in findings.lesions.items()
                             if reports.system_of(segment) == system
                             and (shown is None or segment in shown)}, findings.dominance)


_FF_QP2LAMBDA = 118  # FFmpeg's quantiser -> lambda factor for global_quality


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int) -> None:
    """Writes uint8 grayscale frames [T, H, W] as H.264 MP4 (libx264 ultrafast, crf 6, yuv420p)."""
    _write_with_pyav(path, frames, fps, container_format="mp4", codec="libx264",
                     pix_fmt="yuv420p", options={"crf": "6", "preset": "ultrafast"})


def write_avi(path: str | os.PathLike, frames: np.ndarray, fps: int) -> None:
    """Writes uint8 grayscale frames [T, H, W] as MJPEG AVI at fixed quality (qscale 1-3)."""
    _write_with_pyav(path, frames, fps, container_format="avi", codec="mjpeg",
                     pix_fmt="yuvj420p", options={}, qscale=True, qmin=1, qmax=3,
                     global_quality=2 * _FF_QP2LAMBDA)


def _write_with_pyav(path: str | os.PathLike, frames: np.ndarray, fps: int, *,
                     container_format: str, codec: str, pix_fmt: str,
                     options: dict[str, str], **codec_settings: object) -> None:
    _check_frames(path, frames)
    height, width = frames.shape[1:]
    with av.open(str(path), mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.options = options
        stream.codec_context.thread_count = 1
        for name, value in codec_settings.items():
            setattr(stream.codec_context, name, value)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="gray")))
        container.mux(stream.encode())


def _check_frames(path: str | os.PathLike, frames: np.ndarray) -> None:
    if frames.dtype != np.uint8 or frames.ndim != 3 or frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"{path}: frames must be uint8 [T, H, W] with even H and W, got "
                         f"{frames.dtype} {frames.shape}")


def write_dicom(path: str | os.PathLike, frames: np.ndarray, fps: int, *, study_uid: str,
                series_uid: str, instance_uid: str, patient_id: str, view: str,
                series_number: int) -> None:
    """Writes uint8 frames [T, H, W] as one multi-frame X-Ray Angiographic DICOM file
    (explicit VR little endian, uncompressed, MONOCHROME2, 8 bits)."""
    _check_frames(path, frames)
    if view not in VIEWS:
        raise ValueError(f"{path}: view={view!r} not one of {sorted(VIEWS)}")
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = XRayAngiographicImageStorage
    file_meta.MediaStorageSOPInstanceUID = instance_uid
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = pydicom.Dataset()
    dataset.file_meta = file_meta
    dataset.SpecificCharacterSet = "ISO_IR 100"
    dataset.ImageType = ["ORIGINAL", "PRIMARY", "SINGLE PLANE"]
    dataset.SOPClassUID = XRayAngiographicImageStorage
    dataset.SOPInstanceUID = instance_uid
    dataset.StudyInstanceUID = study_uid
    dataset.SeriesInstanceUID = series_uid
    dataset.Modality = "XA"
    dataset.Manufacturer = "DeepCORO-JAX synthetic"
    dataset.PatientName = f"Synthetic^{patient_id}"
    dataset.PatientID = patient_id
    dataset.StudyDescription = "Synthetic coronary angiography"
    dataset.SeriesDescription = view
    dataset.SeriesNumber = series_number
    dataset.InstanceNumber = 1
    dataset.PositionerPrimaryAngle = VIEWS[view].primary_deg
    dataset.PositionerSecondaryAngle = VIEWS[view].secondary_deg
    dataset.CineRate = fps
    dataset.RecommendedDisplayFrameRate = fps
    dataset.FrameTime = round(1000.0 / fps, 4)  # DS values hold at most 16 characters
    dataset.FrameIncrementPointer = Tag("FrameTime")
    dataset.NumberOfFrames = len(frames)
    dataset.Rows, dataset.Columns = frames.shape[1:]
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated = 8
    dataset.BitsStored = 8
    dataset.HighBit = 7
    dataset.PixelRepresentation = 0
    dataset.PixelData = np.ascontiguousarray(frames).tobytes()
    dataset.save_as(path, enforce_file_format=True)


@dataclasses.dataclass(frozen=True)
class VideoPlan:
    """One view of a planned study; `rng()` gives the generator its frames come from,
    `report_rng()` the one its view report's phrasing comes from."""

    view: str
    num_frames: int
    fps: int
    file_format: str
    seed: int
    study_index: int
    video_index: int
    magnification: int = 1
    landmark: str | None = None  # the segment a magnified view is centred on

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(
            np.random.SeedSequence(self.seed, spawn_key=(self.study_index, self.video_index)))

    def report_rng(self) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence(
            self.seed, spawn_key=(self.study_index, self.video_index, _REPORT_STREAM)))


@dataclasses.dataclass(frozen=True)
class StudyPlan:
    """Everything about a synthetic study except its pixels."""

    index: int
    study_uid: str
    findings: reports.Findings
    report: str
    anatomy: Anatomy
    videos: tuple[VideoPlan, ...]

    def render(self, video_index: int, size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The frames and lesion boxes of one of the study's videos (see render_video)."""
        video = self.videos[video_index]
        return render_video(self.findings, video.view, video.rng(), video.num_frames, size,
                            video.fps, anatomy=self.anatomy, magnification=video.magnification,
                            landmark=video.landmark)

    def view_report(self, video_index: int, shown: Sequence[str]) -> tuple[reports.Findings, str]:
        """What one video shows, as findings and as a report in its own words: the lesions
        of its system (of a magnified view: those in `shown`, the keys of its boxes) and
        the dominance."""
        video = self.videos[video_index]
        system = VIEWS[video.view].system
        findings = view_findings(self.findings, system,
                                 shown if video.magnification > 1 else None)
        return findings, reports.render(findings, video.report_rng(), system=system)


def _uid(*parts: object) -> str:
    """A DICOM UID derived deterministically from its parts (pydicom hashes the
    concatenated sources, so they are joined with a separator first)."""
    return str(generate_uid(entropy_srcs=["/".join(["deepcoro-jax-synthetic", *map(str, parts)])]))


_REPORT_STREAM = 1  # spawn-key tails of the random streams beside the frames' own
_MAGNIFIED_STREAM = 1000


def plan_study(
    seed: int,
    index: int,
    num_frames: tuple[int, int] = (32, 64),
    fps_choices: Sequence[int] = (15, 30),
    formats: Sequence[str] = FORMATS,
    magnified_fraction: float = 0.0,
    magnifications: Sequence[int] = (2,),
) -> StudyPlan:
    """Draws study `index` of the dataset with this seed: findings, report, anatomy and
    2-4 views (one left and one right at least), each with its length, fps and format.
    Each of those full views is followed, with probability `magnified_fraction`, by a
    magnified view at the same angles (magnification drawn from `magnifications`),
    centred on a landmark of its system. Studies are independent: study i is the same
    whatever the number of studies; its full views do not depend on the magnified
    ones (they come from a random stream of their own)."""
    _check_options(num_frames, fps_choices, formats, magnified_fraction, magnifications)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))
    findings = synthetic_findings.random_findings(rng)
    report = reports.render(findings, rng)
    anatomy = sample_anatomy(findings, rng)
    num_views = int(rng.integers(2, 5))
    views = [str(rng.choice(LEFT_VIEWS)), str(rng.choice(RIGHT_VIEWS))]
    others = [view for view in VIEWS if view not in views]
    views += [str(view) for view in rng.choice(others, size=num_views - 2, replace=False)]
    videos = tuple(
        VideoPlan(
            view=view,
            num_frames=int(rng.integers(num_frames[0], num_frames[1] + 1)),
            fps=int(rng.choice(fps_choices)),
            file_format=str(rng.choice(formats)),
            seed=seed,
            study_index=index,
            video_index=video_index,
        )
        for video_index, view in enumerate(views)
    )
    magnified_rng = np.random.default_rng(
        np.random.SeedSequence(seed, spawn_key=(index, _MAGNIFIED_STREAM)))
    magnified = []
    for video in videos:
        draws = magnified_rng.random(), magnified_rng.integers(1 << 30)
        if draws[0] >= magnified_fraction:
            continue
        choice = np.random.default_rng(draws[1])
        system = VIEWS[video.view].system
        magnified.append(VideoPlan(
            view=video.view,
            num_frames=int(choice.integers(num_frames[0], num_frames[1] + 1)),
            fps=int(choice.choice(fps_choices)),
            file_format=str(choice.choice(formats)),
            seed=seed,
            study_index=index,
            video_index=len(videos) + len(magnified),
            magnification=int(choice.choice(magnifications)),
            landmark=str(choice.choice(LANDMARKS[system])),
        ))
    return StudyPlan(index, _uid(seed, index), findings, report, anatomy, videos + tuple(magnified))


def _check_options(num_frames: tuple[int, int], fps_choices: Sequence[int],
                   formats: Sequence[str], magnified_fraction: float = 0.0,
                   magnifications: Sequence[int] = (2,)) -> None:
    if not 0.0 <= magnified_fraction <= 1.0:
        raise ValueError(f"magnified_fraction={magnified_fraction}: need a probability in [0, 1]")
    if not magnifications or any(int(m) != m or m < 2 for m in magnifications):
        raise ValueError(f"magnifications={magnifications}: need integers of at least 2")
    if len(num_frames) != 2 or not 2 <= num_frames[0] <= num_frames[1]:
        raise ValueError(f"num_frames={num_frames}: need (min, max) with 2 <= min <= max")
    if not fps_choices or any(int(fps) != fps or fps <= 0 for fps in fps_choices):
        raise ValueError(f"fps_choices={fps_choices}: need positive integers")
    unknown = sorted(set(formats) - set(FORMATS))
    if not formats or unknown:
        raise ValueError(f"formats={formats}: need a non-empty subset of {FORMATS}")


def assign_splits(num_studies: int, seed: int) -> list[str]:
    """Split of each study: ~10% val, ~10% test (at least one each from 3 studies on),
    the rest train, in a seeded random order."""
    held_out = max(1, round(0.1 * num_studies)) if num_studies >= 3 else 0
    splits = np.array(["train"] * num_studies, dtype=object)
    order = np.random.default_rng(np.random.SeedSequence(seed)).permutation(num_studies)
    splits[order[:held_out]] = "val"
    splits[order[held_out:2 * held_out]] = "test"
    return splits.tolist()


@dataclasses.dataclass(frozen=True)
class _StudyJob:
    seed: int
    index: int
    split: str
    out_dir: str
    size: int
    num_frames: tuple[int, int]
    fps_choices: tuple[int, ...]
    formats: tuple[str, ...]
    magnified_fraction: float
    magnifications: tuple[int, ...]


def _write_study(job: _StudyJob) -> tuple[list[dict[str, object]], dict[str, object]]:
    """Renders and writes one study; returns its manifest rows and ground-truth entry."""
    plan = plan_study(job.seed, job.index, job.num_frames, job.fps_choices, job.formats,
                      job.magnified_fraction, job.magnifications)
    study_dir = Path("videos") / f"study_{job.index:05d}"
    (Path(job.out_dir) / study_dir).mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []
    videos: list[dict[str, object]] = []
    labels = {}
    for system in reports.SYSTEMS:
        labels[f"{system}_significant"] = int(reports.has_significant(plan.findings, system))
        labels[f"{system}_max_stenosis"] = float(reports.max_stenosis(plan.findings, system))
    for video_index, video in enumerate(plan.videos):
        frames, boxes = plan.render(video_index, job.size)
        file_name = (study_dir / f"{video_index:02d}_{video.view}.{video.file_format}").as_posix()
        path = Path(job.out_dir) / file_name
        series_uid = _uid(job.seed, job.index, video_index)
        if video.file_format == "mp4":
            write_mp4(path, frames, video.fps)
        elif video.file_format == "avi":
            write_avi(path, frames, video.fps)
        else:
            write_dicom(path, frames, video.fps, study_uid=plan.study_uid, series_uid=series_uid,
                        instance_uid=_uid(job.seed, job.index, video_index, "instance"),
                        patient_id=f"SYN{job.index:05d}", view=video.view,
                        series_number=video_index + 1)
        system = VIEWS[video.view].system
        shown, view_report = plan.view_report(video_index, list(boxes))
        rows.append({
            "FileName": file_name, "Split": job.split, "Report": plan.report,
            "StudyInstanceUID": plan.study_uid, **labels, "view": video.view, "system": system,
            "magnification": video.magnification, "landmark": video.landmark or "",
            "ViewReport": view_report, "dominance": plan.findings.dominance,
            "right_dominant": int(plan.findings.dominance == "right"),
            "view_cto": int(any(lesion.cto for lesion in shown.lesions.values())),
            "view_severe": int(reports.max_stenosis(shown) >= 70.0),
            "view_max_stenosis": reports.max_stenosis(shown),
        })
        videos.append({
            "file": file_name, "view": video.view, "system": system,
            "format": video.file_format, "num_frames": video.num_frames, "fps": video.fps,
            "magnification": video.magnification, "landmark": video.landmark,
            "view_report": view_report, "view_findings": reports.to_json(shown),
            "series_uid": series_uid,
            "lesion_boxes": {segment: np.round(box, 2).tolist()
                             for segment, box in boxes.items()},
        })
    truth = {"index": job.index, "study_uid": plan.study_uid, "split": job.split,
             "report": plan.report, "findings": reports.to_json(plan.findings),
             "videos": videos}
    return rows, truth


def generate(
    out_dir: str | os.PathLike,
    num_studies: int,
    seed: int,
    *,
    size: int = 128,
    num_frames: tuple[int, int] = (32, 64),
    fps_choices: Sequence[int] = (15, 30),
    formats: Sequence[str] = FORMATS,
    sep: str = "α",
    workers: int = 1,
    magnified_fraction: float = 0.0,
    magnifications: Sequence[int] = (2,),
) -> Path:
    """Writes `num_studies` synthetic studies into out_dir and returns the manifest path.

    out_dir gets videos/study_NNNNN/VV_<view>.<format>, manifest.csv (columns
    MANIFEST_COLUMNS, separated by `sep`, FileName relative to out_dir),
    ground_truth.json ({"seed", "size", "studies": [{"index", "study_uid", "split",
    "report", "findings" (reports.to_json), "videos": [{"file", "view", "system",
    "format", "num_frames", "fps", "magnification", "landmark", "view_report",
    "view_findings", "series_uid", "lesion_boxes": {segment: [T x [x0, y0, x1,
    y1]]}}]}]}) and boxes.jsonl, the lesion boxes for `prepare --boxes` (see
    `box_rows`). `magnified_fraction` and `magnifications` add magnified views (see
    `plan_study`). The same arguments give the same frames whatever `workers` is
    (studies are seeded independently).
    """
    if num_studies < 1:
        raise ValueError(f"num_studies={num_studies}: need at least 1")
    if size < 32 or size % 2:
        raise ValueError(f"size={size}: need an even size of at least 32 pixels")
    if len(sep) != 1 or sep in "\"\n\r":
        raise ValueError(f"sep={sep!r}: need one character other than a quote or newline")
    if workers < 1:
        raise ValueError(f"workers={workers}: need at least 1")
    _check_options(num_frames, fps_choices, formats, magnified_fraction, magnifications)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [
        _StudyJob(seed, index, split, str(out_dir), size, tuple(num_frames), tuple(fps_choices),
                  tuple(formats), float(magnified_fraction), tuple(magnifications))
        for index, split in enumerate(assign_splits(num_studies, seed))
    ]
    if workers == 1:
        results = [_write_study(job) for job in jobs]
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_write_study, jobs, chunksize=4))
    manifest_path = out_dir / "manifest.csv"
    with open(manifest_path, "w", newline="", encoding="utf-8") as manifest:
        writer = csv.DictWriter(manifest, fieldnames=MANIFEST_COLUMNS, delimiter=sep)
        writer.writeheader()
        for rows, _ in results:
            writer.writerows(rows)
    truth = {"seed": seed, "size": size, "studies": [study for _, study in results]}
    with open(out_dir / "ground_truth.json", "w", encoding="utf-8") as ground_truth:
        json.dump(truth, ground_truth)
    with open(out_dir / "boxes.jsonl", "w", encoding="utf-8") as boxes:
        boxes.writelines(json.dumps(row) + "\n" for row in box_rows(truth))
    return manifest_path


def box_rows(truth: Mapping) -> list[dict[str, object]]:
    """The ground truth's lesion boxes as rows of a `prepare --boxes` file: one per
    video, lesion and frame, {"file" (as in the manifest), "frame", "segment",
    "severity" (the lesion's percent in the video's findings; a CTO is 100), "y0",
    "x0", "y1", "x1"}. The ground truth's boxes (x0, y0, x1, y1) put pixel centres at
    integers; a --boxes file lets pixel i span [i, i + 1), hence the half pixel."""
    rows = []
    for study in truth["studies"]:
        for video in study["videos"]:
            shown = reports.from_json(video["view_findings"])
            for segment, boxes in video["lesion_boxes"].items():
                severity = shown.stenosis(segment)
                if severity == 0:  # a stent or calcium without narrowing: no stenosis box
                    continue
                for frame, (x0, y0, x1, y1) in enumerate(boxes):
                    rows.append({"file": video["file"], "frame": frame, "segment": segment,
                                 "severity": severity, "y0": y0 + 0.5, "x0": x0 + 0.5,
                                 "y1": y1 + 0.5, "x1": x1 + 0.5})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num_studies", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128, help="frame height and width")
    parser.add_argument("--num_frames", type=int, nargs="+", default=[32, 64],
                        help="frames per video: N, or MIN MAX drawn per video")
    parser.add_argument("--fps", type=int, nargs="+", default=[15, 30],
                        help="frame rates drawn from per video")
    parser.add_argument("--formats", default=",".join(FORMATS),
                        help="comma-separated subset of mp4,avi,dcm drawn from per video")
    parser.add_argument("--sep", default="α", help="manifest separator")
    parser.add_argument("--magnified_fraction", type=float, default=0.0,
                        help="chance that a full view is followed by a magnified one")
    parser.add_argument("--magnifications", type=int, nargs="+", default=[2],
                        help="magnifications drawn from per magnified view")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if len(args.num_frames) not in (1, 2):
        parser.error(f"--num_frames takes N or MIN MAX, got {args.num_frames}")
    start = time.perf_counter()
    manifest = generate(
        args.out, args.num_studies, args.seed, size=args.size,
        num_frames=(args.num_frames[0], args.num_frames[-1]), fps_choices=args.fps,
        formats=[name.strip() for name in args.formats.split(",") if name.strip()],
        sep=args.sep, workers=args.workers, magnified_fraction=args.magnified_fraction,
        magnifications=args.magnifications)
    print(f"wrote {args.num_studies} studies, manifest {manifest}, "
          f"in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
