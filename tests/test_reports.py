"""Tests for deepcoro_jax/domain/reports.py: schema rules, JSON and text round trips, and
the parser on hand-written reports with exactly known findings."""

import json
import math

import numpy as np
import pytest

from deepcoro_jax.domain import reports
from deepcoro_jax.domain.reports import Findings, Lesion
from input_pipeline import synthetic_findings

# ----------------------------------------------------------------------------- schema rules


def test_segment_tables_are_consistent():
    assert len(reports.SEGMENTS) == 17
    assert reports.SEGMENTS[:3] == ("lmca", "prox_lad", "mid_lad")
    assert reports.SEGMENTS == reports.LEFT_SEGMENTS + reports.RIGHT_SEGMENTS
    assert set(reports.SEGMENT_NAMES) == set(reports.SEGMENTS)
    assert [reports.system_of(s) for s in reports.SEGMENTS] == ["left"] * 12 + ["right"] * 5
    with pytest.raises(ValueError, match="segment='lad'"):
        reports.system_of("lad")


@pytest.mark.parametrize("percent, expected", [
    (0, "normal"), (0.5, "normal"), (1, "mild"), (49, "mild"), (49.9, "mild"),
    (50, "moderate"), (69, "moderate"), (69.9, "moderate"), (70, "severe"), (89, "severe"),
    (90, "critical"), (99, "critical"), (99.9, "critical"), (100, "occluded"),
])
def test_severity_class_at_bin_boundaries(percent, expected):
    assert reports.severity_class(percent) == expected


@pytest.mark.parametrize("percent", [-1, 100.5, math.nan, math.inf])
def test_severity_class_rejects_non_percents(percent):
    with pytest.raises(ValueError, match="percent"):
        reports.severity_class(percent)


@pytest.mark.parametrize("segment, percent, expected", [
    ("mid_lad", 0, False), ("mid_lad", 50, False), ("mid_lad", 69, False),
    ("mid_lad", 69.9, False), ("mid_lad", 70, True), ("mid_lad", 100, True),
    ("lmca", 49, False), ("lmca", 49.9, False), ("lmca", 50, True), ("lmca", 70, True),
    ("pda", 69, False), ("pda", 70, True),
])
def test_is_significant(segment, percent, expected):
    assert reports.is_significant(segment, percent) is expected


def test_study_level_summaries():
    findings = Findings({"lmca": Lesion(55.0), "mid_lad": Lesion(40.0), "pda": Lesion(65.0)},
                        dominance="left")
    assert reports.max_stenosis(findings) == 65.0
    assert reports.max_stenosis(findings, "left") == 55.0
    assert reports.max_stenosis(findings, "right") == 65.0
    assert reports.has_significant(findings, "left")  # left main >= 50
    assert not reports.has_significant(findings, "right")  # 65 < 70 elsewhere
    assert reports.stratum(findings) == "moderate"
    assert findings.stenosis("pda") == 65.0 and findings.stenosis("rpl") == 0.0
    normal = Findings({})
    assert reports.max_stenosis(normal) == 0.0 and not reports.has_significant(normal)
    assert reports.stratum(normal) == "normal"
    assert reports.stratum(Findings({"d1": Lesion(30.0)})) == "mild"
    for percent in (70.0, 95.0, 100.0):
        assert reports.stratum(Findings({"d1": Lesion(30.0), "om1": Lesion(percent)})) == "severe+"
    with pytest.raises(ValueError, match="system='both'"):
        reports.max_stenosis(findings, "both")


@pytest.mark.parametrize("kwargs, message", [
    ({"stenosis": 120.0}, "Lesion.stenosis"),
    ({"stenosis": 70.0, "cto": True}, "Lesion.cto"),
    ({"stenosis": 70.0, "calcification": "heavy"}, "Lesion.calcification"),
    ({"stenosis": 70.0, "medina": (1, 2, 0)}, "Lesion.medina"),
    ({"stenosis": 70.0, "medina": (1, 1)}, "Lesion.medina"),
    ({"stenosis": 70.0, "ifr": 1.5}, "Lesion.ifr"),
    ({"stenosis": 70.0, "ffr": 0.0}, "Lesion.ffr"),
    ({"stenosis": 70.0, "thrombus": "yes"}, "Lesion.thrombus"),
    ({"stenosis": "70"}, "Lesion.stenosis"),
])
def test_lesion_rejects_invalid_fields(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Lesion(**kwargs)


def test_findings_validation_and_normalisation():
    with pytest.raises(ValueError, match="'mid_cx'"):
        Findings({"mid_cx": Lesion(50.0)})
    with pytest.raises(ValueError, match="dominance='top'"):
        Findings({}, dominance="top")
    with pytest.raises(TypeError, match=r"lesions\['d1'\]"):
        Findings({"d1": 50.0})
    # Nothing-to-report lesions are dropped and order does not matter, so equal
    # findings compare equal; values are normalised to float / tuple.
    a = Findings({"rpl": Lesion(40), "d1": Lesion(0.0), "lmca": Lesion(0.0, prior_stent=True)})
    b = Findings({"lmca": Lesion(0.0, prior_stent=True), "rpl": Lesion(40.0)})
    assert a == b and list(a.lesions) == ["lmca", "rpl"]
    assert isinstance(a.lesions["rpl"].stenosis, float)
    assert Lesion(50.0, medina=[1, 0, 1]).medina == (1, 0, 1)


# ----------------------------------------------------------------------------- generators


def stress_findings(rng: np.random.Generator) -> Findings:
    """Every field at high rates, odd values included: what realistic data rarely shows."""
    lesions = {}
    for segment in reports.SEGMENTS:
        if rng.random() > 0.35:
            continue
        stenosis = (0.0, 100.0, float(rng.integers(1, 100)), round(float(rng.uniform(0, 100)), 1),
                    float(rng.choice([0.5, 1, 49, 50, 69, 70, 89, 90, 99, 99.9])))[rng.integers(5)]
        often = lambda: bool(rng.random() < 0.3)
        lesions[segment] = Lesion(
            stenosis,
            cto=stenosis == 100.0 and often(),
            calcification=reports.CALCIFICATION_GRADES[rng.integers(3)] if often() else None,
            thrombus=often(), in_stent_restenosis=often(), prior_stent=often(),
            medina=tuple(int(m) for m in rng.integers(0, 2, size=3)) if often() else None,
            ifr=round(float(rng.uniform(0.5, 1.0)), 2) if often() else None,
            ffr=round(float(rng.uniform(0.5, 1.0)), 2) if often() else None,
            collaterals=often())
    return Findings(lesions, reports.DOMINANCES[rng.integers(3)])


@pytest.fixture(scope="module")
def many_findings() -> list[Findings]:
    realistic = [
        synthetic_findings.random_findings(np.random.default_rng(seed)) for seed in range(200)
    ]
    stress = [stress_findings(np.random.default_rng(10_000 + seed)) for seed in range(200)]
    return realistic + stress


# ----------------------------------------------------------------------------- round trips


def test_json_round_trip_is_exact(many_findings):
    for findings in many_findings:
        record = json.loads(json.dumps(reports.to_json(findings)))
        assert reports.from_json(record) == findings
    assert reports.to_json(Findings({"d1": Lesion(50.0, medina=(1, 0, 1))}, "left")) == {
        "dominance": "left", "lesions": {"d1": {"stenosis": 50.0, "medina": [1, 0, 1]}}}


@pytest.mark.parametrize("record, message", [
    ({"dominance": "right", "lesion": {}}, "unknown keys"),
    ({"lesions": {"d1": {"stenosis": 50.0, "ifr_value": 0.8}}}, "'d1' has unknown keys"),
    ({"lesions": {"d1": {"cto": False}}}, "'d1' must be a mapping with 'stenosis'"),
    ({"lesions": {"septal": {"stenosis": 50.0}}}, "'septal'"),
])
def test_from_json_names_bad_keys(record, message):
    with pytest.raises(ValueError, match=message):
        reports.from_json(record)


def test_canonical_render_is_fixed():
    findings = Findings({
        "lmca": Lesion(50.0),
        "mid_lad": Lesion(85.0, calcification="severe", medina=(1, 1, 0), ffr=0.72),
        "om1": Lesion(37.5),
        "dist_rca": Lesion(100.0, cto=True, collaterals=True),
    }, dominance="codominant")
    expected = (
        "Codominant circulation. Moderate 50% stenosis of the left main. "
        "Severe 85% stenosis of the mid LAD, with severe calcification, "
        "at a bifurcation (Medina 1.1.0), FFR 0.72. "
        "Mild 37.5% stenosis of the first obtuse marginal. "
        "Chronic total occlusion of the distal RCA, filling via collaterals.")
    assert reports.render(findings) == expected
    assert reports.render(Findings({}, "left")) == (
        "Left dominant circulation. No significant coronary artery disease.")


def test_render_parse_round_trip_is_exact(many_findings):
    for index, findings in enumerate(many_findings):
        for rng in (None, np.random.default_rng(index), np.random.default_rng(index + 99_991)):
            text = reports.render(findings, rng)
            result = reports.parse_result(text)
            assert result.findings == findings, text
            assert result.unparsed_sentences == [] and result.ok and result.dominance_stated, text
            assert result.parsed_sentences == len(reports._split_sentences(text))


def test_render_varies_phrasing_and_is_deterministic_per_seed():
    findings = Findings({"mid_lad": Lesion(70.0), "prox_rca": Lesion(45.0, thrombus=True)})
    texts = [reports.render(findings, np.random.default_rng(seed)) for seed in range(200)]
    assert len(set(texts)) > 150
    joined = " ".join(texts)
    for surface in ("70%", "70 %", "~70%", "70.0%", "approximately 70%", "LAD mid", "mid LAD",
                    "prox RCA", "narrowing", "lesion", "stenosis"):
        assert surface in joined, surface
    assert sum(t.startswith(("Severe", "Mild", "The mid", "Mid", "LAD", "There", "Middle"))
               for t in texts) > 20  # sentence order varies too, not only the dominance first
    assert texts[7] == reports.render(findings, np.random.default_rng(7))


def test_render_one_system():
    findings = Findings({"lmca": Lesion(60.0), "pda": Lesion(80.0, ffr=0.7)}, "left")
    for system in reports.SYSTEMS:
        expected = Findings({s: lesion for s, lesion in findings.lesions.items()
                             if reports.system_of(s) == system}, "left")
        for seed in range(20):
            text = reports.render(findings, np.random.default_rng(seed), system=system)
            assert reports.parse(text) == expected, text
    assert reports.render(findings, system="right") == (
        "Left dominant circulation. Severe 80% stenosis of the posterior descending artery, "
        "FFR 0.70.")
    with pytest.raises(ValueError, match="system='lad'"):
        reports.render(findings, system="lad")


def test_system_part_keeps_what_one_system_shows():
    """Over random studies and phrasings, the part of the report for a system parses to
    that system's findings with the study's dominance, in the report's own words."""
    from input_pipeline import synthetic_findings

    for seed in range(300):
        rng = np.random.default_rng(seed)
        findings = synthetic_findings.random_findings(rng)
        text = reports.render(findings, rng)
        for system in reports.SYSTEMS:
            part = reports.system_part(text, system)
            expected = Findings({s: lesion for s, lesion in findings.lesions.items()
                                 if reports.system_of(s) == system}, findings.dominance)
            assert reports.parse(part) == expected, (text, system, part)
            assert all(sentence in text for sentence in reports._split_sentences(part))
    written = ("Right dominant. 80% stenosis of the proximal LAD. The RCA is patent. "
               "No significant coronary artery disease elsewhere. Procedure uncomplicated.")
    assert reports.system_part(written, "right") == (
        "Right dominant. The RCA is patent. No significant coronary artery disease elsewhere.")
    assert reports.system_part(written, "left") == (
        "Right dominant. 80% stenosis of the proximal LAD. "
        "No significant coronary artery disease elsewhere.")
    assert reports.system_part("Procedure uncomplicated. Radial access.", "left") is None
    with pytest.raises(ValueError, match="system='lad'"):
        reports.system_part(written, "lad")


# ----------------------------------------------------------------------------- hand-written text

L = Lesion
HAND_WRITTEN = [
    ("Right dominant circulation. Mid LAD 70% stenosis. Patient tolerated the procedure well.",
     {"mid_lad": L(70.0)}, "right", ["Patient tolerated the procedure well."]),
    ("LMCA: ~50% narrowing. prox LAD 80 % stenosis with moderate calcification.",
     {"lmca": L(50.0), "prox_lad": L(80.0, calcification="moderate")}, None, []),
    ("The circulation is LEFT DOMINANT. CTO OF THE MID RCA WITH COLLATERALS FROM THE LAD.",
     {"mid_rca": L(100.0, cto=True, collaterals=True)}, "left", []),
    ("Co-dominant. LCx proximal 70-80% stenosis.", {"prox_lcx": L(75.0)}, "codominant", []),
    ("Severe stenosis of the first obtuse marginal. Mild disease in D1.",
     {"om1": L(80.0), "d1": L(30.0)}, None, []),
    ("Proximal right coronary artery: 90% stenosis with thrombus. Distal RCA 40.0%.",
     {"prox_rca": L(90.0, thrombus=True), "dist_rca": L(40.0)}, None, []),
    ("Left main: no significant disease. The LAD has a 70% proximal stenosis, FFR 0.78.",
     {"prox_lad": L(70.0, ffr=0.78)}, None, []),
    ("PDA 60 percent. PLV: 50%. Posterolateral branch of the circumflex 40%.",
     {"pda": L(60.0), "rpl": L(50.0), "lvp": L(40.0)}, None, []),
    ("In-stent restenosis of the mid LAD, approx. 60%. iFR 0.86 in the mid LAD.",
     {"mid_lad": L(60.0, in_stent_restenosis=True, ifr=0.86)}, None, []),
    ("Bifurcation lesion of the proximal LAD (Medina 1,1,1), 75%.",
     {"prox_lad": L(75.0, medina=(1, 1, 1))}, None, []),
    ("Normal coronary arteries. Right dominant.", {}, "right", []),
    ("Ramus intermedius: 99% subtotal stenosis. OM2 - mild luminal irregularities.",
     {"ramus": L(99.0), "om2": L(30.0)}, None, []),
    ("LM 30%; LAD mid 55%; D2 totally occluded; dist LCx 20%.",
     {"lmca": L(30.0), "mid_lad": L(55.0), "d2": L(100.0), "dist_lcx": L(20.0)}, None, []),
    ("The RCA is occluded proximally (chronic total occlusion), with the distal vessel "
     "filling via left-to-right collaterals.",
     {"prox_rca": L(100.0, cto=True, collaterals=True)}, None, []),
    ("Heavily calcified prox. LAD with severe 85% stenosis; FFR = 0.72.",
     {"prox_lad": L(85.0, calcification="severe", ffr=0.72)}, None, []),
    ("dominance: right\n- pLAD 50%\n- mRCA 95%",
     {"prox_lad": L(50.0), "mid_rca": L(95.0)}, "right", []),
    ("Ostial left main 60%, heavily calcified. Circumflex: normal.",
     {"lmca": L(60.0, calcification="severe")}, None, []),
    ("Mid LAD stent is patent. No thrombus in the distal RCA.",
     {"mid_lad": L(0.0, prior_stent=True)}, None, []),
    ("MID lad 70 PERCENT", {"mid_lad": L(70.0)}, None, []),
    ("Mid LAD 70%.Prox RCA 50 %.", {"mid_lad": L(70.0), "prox_rca": L(50.0)}, None, []),
    ("LAD: proximal 40%, mid 70%. RCA is dominant and has a 50% distal stenosis, no thrombus.",
     {"prox_lad": L(40.0), "mid_lad": L(70.0), "dist_rca": L(50.0)}, "right", []),
    ("Dominant RCA. Non-dominant circumflex with 30% plaque in OM1. LV function is normal.",
     {"om1": L(30.0)}, "right", ["LV function is normal."]),
    ("The mid-LAD has a tight 90 % lesion w/o calcification. FFR was measured at 0.68.",
     {"mid_lad": L(90.0)}, None, ["FFR was measured at 0.68."]),
    ("Left-dominant system. The proximal circumflex is occluded with thrombus "
     "(acute, not chronic).",
     {"prox_lcx": L(100.0, thrombus=True)}, "left", []),
    ("Second diagonal: moderate disease, mild calcification. The first OM has a 45-55% "
     "stenosis. PL branch without significant stenosis.",
     {"d2": L(60.0, calcification="minimal"), "om1": L(50.0)}, None, []),
    ("Distal LAD: 30-40 % narrowing at the site of a previously placed stent; no in-stent "
     "restenosis.",
     {"dist_lad": L(35.0, prior_stent=True)}, None, []),
]


@pytest.mark.parametrize("text, lesions, dominance, unparsed", HAND_WRITTEN)
def test_parse_hand_written_reports(text, lesions, dominance, unparsed):
    result = reports.parse_result(text)
    assert result.findings == Findings(lesions, dominance or "right")
    assert result.dominance_stated is (dominance is not None)
    assert result.unparsed_sentences == unparsed
    assert result.ok


@pytest.mark.parametrize("text, parsed, unparsed", [
    ("No significant coronary artery disease.", 1, []),
    ("The left system is free of disease. The remaining segments are normal.", 2, []),
    ("Patient tolerated the procedure well. Hemostasis with TR band.", 0,
     ["Patient tolerated the procedure well.", "Hemostasis with TR band."]),
    # A finding about a vessel without a position is not guessed.
    ("The LAD has a 70% stenosis.", 0, ["The LAD has a 70% stenosis."]),
    ("The LAD has a 70% stenosis, otherwise normal.", 0,
     ["The LAD has a 70% stenosis, otherwise normal."]),
    # Out-of-range numbers are ignored, not read.
    ("150% stenosis of the mid LAD. FFR 8.2 in the D1.", 0,
     ["150% stenosis of the mid LAD.", "FFR 8.2 in the D1."]),
    ("", 0, []),
])
def test_parse_structure_flags(text, parsed, unparsed):
    result = reports.parse_result(text)
    assert result.findings == Findings({})
    assert result.parsed_sentences == parsed and result.ok is (parsed > 0)
    assert result.unparsed_sentences == unparsed


def test_parse_never_raises_on_odd_text():
    rng = np.random.default_rng(0)
    alphabet = list("abcdlmoprx0123456789 .,;:%~-()/\n") + ["LAD", "RCA", "FFR", "Medina",
                                                            "mid", "CTO", "100%"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(0, 60))))
        result = reports.parse_result(text)
        assert isinstance(result.findings, Findings)
    with pytest.raises(TypeError, match="text must be a str"):
        reports.parse(None)
