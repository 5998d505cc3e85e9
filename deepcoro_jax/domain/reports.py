"""Angiography report schema: segments, severities, findings; render text <-> parse text.

For: the findings record of one catheterisation study (17 segments, dominance,
per-segment lesion qualifiers); the one home of the severity bins and of the
significant-lesion rule; a templated report renderer with controlled variation in
phrasing; a tolerant parser that reads back what the renderer writes (exactly)
and hand-written reports (as well as it can).

Not for: tokenisation (tokenizers.py), metrics over parsed reports (evaluators/), or
random findings for synthetic data (input_pipeline/synthetic_findings.py).
Pure Python + NumPy: no TensorFlow, no JAX.

Precision of the text round trip (`parse(render(f, rng)) == f` for every rng):
stenosis is written as an integer when it is one, else rounded to 0.1 percent, so
the round trip is exact for percents with at most one decimal; IFR and FFR are
written with 2 decimals, exact for values with at most two.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from collections.abc import Mapping, Sequence

import numpy as np

# ----------------------------------------------------------------------------- schema

LEFT_SEGMENTS: tuple[str, ...] = (
    "lmca", "prox_lad", "mid_lad", "dist_lad", "d1", "d2",
    "prox_lcx", "dist_lcx", "om1", "om2", "ramus", "lvp",
)
RIGHT_SEGMENTS: tuple[str, ...] = ("prox_rca", "mid_rca", "dist_rca", "pda", "rpl")
SEGMENTS: tuple[str, ...] = LEFT_SEGMENTS + RIGHT_SEGMENTS
SYSTEMS: tuple[str, ...] = ("left", "right")

SEGMENT_NAMES: dict[str, str] = {
    "lmca": "left main",
    "prox_lad": "proximal LAD",
    "mid_lad": "mid LAD",
    "dist_lad": "distal LAD",
    "d1": "first diagonal",
    "d2": "second diagonal",
    "prox_lcx": "proximal LCx",
    "dist_lcx": "distal LCx",
    "om1": "first obtuse marginal",
    "om2": "second obtuse marginal",
    "ramus": "ramus intermedius",
    "lvp": "left posterolateral branch",
    "prox_rca": "proximal RCA",
    "mid_rca": "mid RCA",
    "dist_rca": "distal RCA",
    "pda": "posterior descending artery",
    "rpl": "right posterolateral branch",
}

DOMINANCES: tuple[str, ...] = ("right", "left", "codominant")
SEVERITIES: tuple[str, ...] = ("normal", "mild", "moderate", "severe", "critical", "occluded")
STRATA: tuple[str, ...] = ("normal", "mild", "moderate", "severe+")
CALCIFICATION_GRADES: tuple[str, ...] = ("minimal", "moderate", "severe")

# The percent `parse` gives a severity word stated without a number.
SEVERITY_REPRESENTATIVE_PERCENT: dict[str, float] = {
    "normal": 0.0, "mild": 30.0, "moderate": 60.0,
    "severe": 80.0, "critical": 95.0, "occluded": 100.0,
}


def _check_segment(segment: str, what: str) -> None:
    if segment not in SEGMENT_NAMES:
        raise ValueError(f"{what}={segment!r}: not a segment; expected one of {SEGMENTS}")


def _check_percent(percent: float, what: str) -> float:
    if isinstance(percent, bool) or not isinstance(percent, numbers.Real):
        raise TypeError(f"{what} must be a number, got {percent!r}")
    percent = float(percent)
    if not (math.isfinite(percent) and 0.0 <= percent <= 100.0):
        raise ValueError(f"{what}={percent}: expected a percent in [0, 100]")
    return percent


def system_of(segment: str) -> str:
    """'left' or 'right': the coronary system the segment belongs to."""
    _check_segment(segment, "segment")
    return "left" if segment in LEFT_SEGMENTS else "right"


def severity_class(percent: float) -> str:
    """Severity bin of a percent diameter stenosis.

    normal < 1 <= mild < 50 <= moderate < 70 <= severe < 90 <= critical < 100 = occluded.
    """
    percent = _check_percent(percent, "percent")
    if percent < 1:
        return "normal"
    if percent < 50:
        return "mild"
    if percent < 70:
        return "moderate"
    if percent < 90:
        return "severe"
    if percent < 100:
        return "critical"
    return "occluded"


def is_significant(segment: str, percent: float) -> bool:
    """Clinically significant lesion: >= 70 percent, or >= 50 percent in the left main."""
    _check_segment(segment, "segment")
    percent = _check_percent(percent, "percent")
    return percent >= (50.0 if segment == "lmca" else 70.0)


@dataclasses.dataclass(frozen=True)
class Lesion:
    """Findings in one segment. Validated and normalised on construction.

    stenosis: percent diameter reduction in [0, 100] (stored as float).
    cto: chronic total occlusion; only with stenosis 100.
    calcification: None or one of CALCIFICATION_GRADES.
    medina: bifurcation lesion class (main proximal, main distal, side branch), each 0/1.
    ifr, ffr: pressure ratios in (0, 1].
    """

    stenosis: float
    cto: bool = False
    calcification: str | None = None
    thrombus: bool = False
    in_stent_restenosis: bool = False
    prior_stent: bool = False
    medina: tuple[int, int, int] | None = None
    ifr: float | None = None
    ffr: float | None = None
    collaterals: bool = False

    def __post_init__(self) -> None:
        set_field = lambda name, value: object.__setattr__(self, name, value)
        set_field("stenosis", _check_percent(self.stenosis, "Lesion.stenosis"))
        for name in ("cto", "thrombus", "in_stent_restenosis", "prior_stent", "collaterals"):
            value = getattr(self, name)
            if not isinstance(value, bool | np.bool_):
                raise TypeError(f"Lesion.{name} must be a bool, got {value!r}")
            set_field(name, bool(value))
        if self.cto and self.stenosis != 100.0:
            raise ValueError(f"Lesion.cto=True needs stenosis 100, got {self.stenosis}")
        if self.calcification is not None and self.calcification not in CALCIFICATION_GRADES:
            raise ValueError(f"Lesion.calcification={self.calcification!r}: expected None or "
                             f"one of {CALCIFICATION_GRADES}")
        if self.medina is not None:
            medina = tuple(self.medina)
            if len(medina) != 3 or any(
                    isinstance(m, bool) or not isinstance(m, numbers.Integral) or m not in (0, 1)
                    for m in medina):
                raise ValueError(f"Lesion.medina={self.medina!r}: expected three 0/1 integers")
            set_field("medina", tuple(int(m) for m in medina))
        for name in ("ifr", "ffr"):
            value = getattr(self, name)
            if value is None:
                continue
            if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                    or not 0.0 < float(value) <= 1.0):
                raise ValueError(f"Lesion.{name}={value!r}: expected None or a ratio in (0, 1]")
            set_field(name, float(value))


_NO_LESION = Lesion(0.0)


@dataclasses.dataclass(frozen=True)
class Findings:
    """The findings of one study: segment -> Lesion (absent segments are normal), dominance.

    On construction, lesions are validated, put in SEGMENTS order, and lesions equal
    to `Lesion(0)` (nothing to report) are dropped, so equal findings compare equal.
    """

    lesions: Mapping[str, Lesion]
    dominance: str = "right"

    def __post_init__(self) -> None:
        if not isinstance(self.lesions, Mapping):
            raise TypeError(f"Findings.lesions must be a mapping, got {type(self.lesions)}")
        for segment, lesion in self.lesions.items():
            _check_segment(segment, "Findings.lesions key")
            if not isinstance(lesion, Lesion):
                raise TypeError(f"Findings.lesions[{segment!r}] must be a Lesion, got {lesion!r}")
        if self.dominance not in DOMINANCES:
            raise ValueError(f"Findings.dominance={self.dominance!r}: expected one of {DOMINANCES}")
        lesions = {s: self.lesions[s] for s in SEGMENTS
                   if s in self.lesions and self.lesions[s] != _NO_LESION}
        object.__setattr__(self, "lesions", lesions)

    def stenosis(self, segment: str) -> float:
        """Percent stenosis of the segment, 0 where nothing is reported."""
        _check_segment(segment, "segment")
        lesion = self.lesions.get(segment)
        return 0.0 if lesion is None else lesion.stenosis


def max_stenosis(findings: Findings, system: str | None = None) -> float:
    """The largest stenosis in the study, or in one system; 0 when there is none."""
    return max((lesion.stenosis for _, lesion in _lesions_in(findings, system)), default=0.0)


def has_significant(findings: Findings, system: str | None = None) -> bool:
    """Whether the study (or one system) has a significant lesion (`is_significant`)."""
    return any(is_significant(s, lesion.stenosis) for s, lesion in _lesions_in(findings, system))


def stratum(findings: Findings) -> str:
    """The study's most severe finding as one of STRATA (severe/critical/occluded: 'severe+')."""
    severity = severity_class(max_stenosis(findings))
    return severity if severity in STRATA else "severe+"


def to_json(findings: Findings) -> dict:
    """A JSON-ready dict; lesion fields at their default are left out."""
    lesions = {}
    for segment, lesion in findings.lesions.items():
        record = {"stenosis": lesion.stenosis}
        for field in dataclasses.fields(Lesion)[1:]:
            value = getattr(lesion, field.name)
            if value != field.default:
                record[field.name] = list(value) if field.name == "medina" else value
        lesions[segment] = record
    return {"dominance": findings.dominance, "lesions": lesions}


def from_json(record: Mapping) -> Findings:
    """Inverse of `to_json` (exact); raises naming the offending key."""
    if not isinstance(record, Mapping):
        raise TypeError(f"from_json: expected a mapping, got {type(record)}")
    unknown = set(record) - {"dominance", "lesions"}
    if unknown:
        raise ValueError(f"from_json: unknown keys {sorted(unknown)}")
    lesion_records = record.get("lesions", {})
    if not isinstance(lesion_records, Mapping):
        raise TypeError("from_json: 'lesions' must be a mapping of segment -> lesion fields")
    lesion_fields = {field.name for field in dataclasses.fields(Lesion)}
    lesions = {}
    for segment, fields in lesion_records.items():
        if not isinstance(fields, Mapping) or "stenosis" not in fields:
            raise ValueError(f"from_json: lesion {segment!r} must be a mapping with 'stenosis'")
        unknown = set(fields) - lesion_fields
        if unknown:
            raise ValueError(f"from_json: lesion {segment!r} has unknown keys {sorted(unknown)}")
        lesions[segment] = Lesion(**fields)
    return Findings(lesions, record.get("dominance", "right"))


def _lesions_in(findings: Findings, system: str | None) -> list[tuple[str, Lesion]]:
    if system is not None and system not in SYSTEMS:
        raise ValueError(f"system={system!r}: expected None or one of {SYSTEMS}")
    return [(s, lesion) for s, lesion in findings.lesions.items()
            if system is None or system_of(s) == system]


# ----------------------------------------------------------------------------- render

# Ways to name each segment; the first is SEGMENT_NAMES'. Every one parses back.
_SEGMENT_NAME_VARIANTS = {
    "lmca": ("left main", "LMCA", "left main coronary artery", "LM"),
    "prox_lad": ("proximal LAD", "prox LAD", "LAD proximal",
                 "proximal left anterior descending artery"),
    "mid_lad": ("mid LAD", "LAD mid", "middle LAD", "mid left anterior descending artery"),
    "dist_lad": ("distal LAD", "dist LAD", "LAD distal", "distal left anterior descending artery"),
    "d1": ("first diagonal", "D1", "first diagonal branch", "diagonal 1"),
    "d2": ("second diagonal", "D2", "second diagonal branch", "diagonal 2"),
    "prox_lcx": ("proximal LCx", "prox LCx", "proximal circumflex", "LCx proximal",
                 "proximal LCX", "proximal left circumflex artery"),
    "dist_lcx": ("distal LCx", "dist LCx", "distal circumflex", "LCx distal",
                 "distal left circumflex artery"),
    "om1": ("first obtuse marginal", "OM1", "first obtuse marginal branch", "OM 1"),
    "om2": ("second obtuse marginal", "OM2", "second obtuse marginal branch", "OM 2"),
    "ramus": ("ramus intermedius", "ramus", "ramus intermedius branch"),
    "lvp": ("left posterolateral branch", "LVP", "left posterolateral"),
    "prox_rca": ("proximal RCA", "prox RCA", "RCA proximal", "proximal right coronary artery"),
    "mid_rca": ("mid RCA", "RCA mid", "middle RCA", "mid right coronary artery"),
    "dist_rca": ("distal RCA", "dist RCA", "RCA distal", "distal right coronary artery"),
    "pda": ("posterior descending artery", "PDA", "posterior descending branch"),
    "rpl": ("right posterolateral branch", "posterolateral branch", "RPL", "PL branch", "PLV"),
}
_STENOSIS_TEMPLATES = (
    "{Sev} {pct} {noun} of the {seg}",
    "The {seg} has a {sev} {pct} {noun}",
    "{Seg}: {sev} {pct} {noun}",
    "There is a {sev} {noun} of {pct} in the {seg}",
    "{Seg} with a {sev} {pct} {noun}",
    "{Sev} {noun} ({pct}) in the {seg}",
)
_STENOSIS_NOUNS = ("stenosis", "narrowing", "lesion")
_PERCENT_FORMATS = ("{s}%", "{s} %", "~{s}%", "approximately {s}%", "{d}%", "{s} percent",
                    "about {s}%")
_CTO_TEMPLATES = ("Chronic total occlusion of the {seg}", "CTO of the {seg}",
                  "{Seg}: chronic total occlusion", "The {seg} is chronically occluded",
                  "The {seg} is a chronic total occlusion")
_OCCLUSION_TEMPLATES = ("Total occlusion of the {seg}", "The {seg} is totally occluded",
                        "{Seg}: 100% occlusion", "100% occlusion of the {seg}", "{Seg}: occluded")
_NO_STENOSIS_TEMPLATES = ("No stenosis of the {seg}", "The {seg} has no significant stenosis",
                          "{Seg}: no stenosis", "No significant narrowing in the {seg}")
_CALCIFICATION_ADVERBS = {"minimal": "minimally", "moderate": "moderately", "severe": "severely"}
_DOMINANCE_TEMPLATES = ("{D} dominant circulation.", "The circulation is {d} dominant.",
                        "Dominance: {d}.", "The coronary system is {d}-dominant.")
_CODOMINANCE_SENTENCES = ("Codominant circulation.", "The circulation is codominant.",
                          "Dominance: codominant.", "The coronary system is co-dominant.")
_NORMAL_SYSTEM_SENTENCES = {
    "left": ("No significant disease in the left coronary system.",
             "The left coronary system is free of disease.",
             "The left system is angiographically normal."),
    "right": ("No significant disease in the right coronary system.",
              "The right coronary system is free of disease.",
              "No significant disease in the RCA or its branches."),
    None: ("No significant coronary artery disease.", "The coronary arteries are free of disease.",
           "Angiographically normal coronary arteries."),
}


def render(findings: Findings, rng: np.random.Generator | None = None,
           system: str | None = None) -> str:
    """Writes the report of `findings` as templated sentences.

    One dominance sentence, one sentence per segment with a finding (severity word,
    percent, qualifiers), and a "no significant disease" sentence for a system
    without findings. rng None gives the canonical phrasing (dominance, then segments
    in SEGMENTS order). With an rng, phrasing varies: templates, segment-name
    abbreviations, synonyms, number formats ("70%", "70 %", "~70%", "70.0%",
    "approximately 70%"), qualifier order, IFR/FFR in a sentence of their own,
    optional normal summaries, and sentence order. `parse` reads every variant back
    exactly (see the module docstring for precision).

    system: 'left' or 'right' writes only that system's part (plus dominance), e.g.
    for a video that shows one system.
    """
    if not isinstance(findings, Findings):
        raise TypeError(f"render: findings must be Findings, got {type(findings)}")
    lesions = _lesions_in(findings, system)
    sentences = [_dominance_sentence(findings.dominance, rng)]
    for segment, lesion in lesions:
        sentences.extend(_lesion_sentences(segment, lesion, rng))
    systems = SYSTEMS if system is None else (system,)
    normal_systems = [s for s in systems if all(system_of(seg) != s for seg, _ in lesions)]
    if len(normal_systems) == 2:
        sentences.append(_pick(rng, _NORMAL_SYSTEM_SENTENCES[None]))
    else:
        for normal_system in normal_systems:
            if rng is None or rng.random() < 0.7:
                sentences.append(_pick(rng, _NORMAL_SYSTEM_SENTENCES[normal_system]))
    if rng is not None:
        for diseased_system in [s for s in systems if s not in normal_systems]:
            if rng.random() < 0.25:
                sentences.append(f"The remaining {diseased_system} coronary segments are normal.")
        if rng.random() < 0.5:
            sentences = [sentences[i] for i in rng.permutation(len(sentences))]
    return " ".join(sentences)


def lesion_sentence(segment: str, lesion: Lesion, rng: np.random.Generator | None = None) -> str:
    """The sentence(s) `render` writes for one segment's finding (rng None: canonical)."""
    _check_segment(segment, "segment")
    return " ".join(_lesion_sentences(segment, lesion, rng))


def _pick(rng: np.random.Generator | None, options: Sequence[str]) -> str:
    return options[0] if rng is None else options[int(rng.integers(len(options)))]


def _capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


def _percent_text(percent: float, rng: np.random.Generator | None) -> str:
    short = str(int(percent)) if percent.is_integer() else f"{percent:.1f}"
    return _pick(rng, _PERCENT_FORMATS).format(s=short, d=f"{percent:.1f}")


def _dominance_sentence(dominance: str, rng: np.random.Generator | None) -> str:
    if dominance == "codominant":
        return _pick(rng, _CODOMINANCE_SENTENCES)
    return _pick(rng, _DOMINANCE_TEMPLATES).format(d=dominance, D=_capitalised(dominance))


def _lesion_sentences(segment: str, lesion: Lesion, rng: np.random.Generator | None) -> list[str]:
    name = _pick(rng, _SEGMENT_NAME_VARIANTS[segment])
    words = {"seg": name, "Seg": _capitalised(name)}
    if lesion.cto:
        template = _pick(rng, _CTO_TEMPLATES)
    elif lesion.stenosis == 100.0:
        template = _pick(rng, _OCCLUSION_TEMPLATES)
    elif lesion.stenosis == 0.0:
        template = _pick(rng, _NO_STENOSIS_TEMPLATES)
    else:
        template = _pick(rng, _STENOSIS_TEMPLATES)
        severity = severity_class(lesion.stenosis)
        severity = "minimal" if severity == "normal" else severity
        words |= {"Sev": _capitalised(severity), "sev": severity,
                  "noun": _pick(rng, _STENOSIS_NOUNS), "pct": _percent_text(lesion.stenosis, rng)}
    head = template.format(**words)

    qualifiers = []
    if lesion.calcification is not None:
        grade = lesion.calcification
        qualifiers.append(_pick(rng, (f"with {grade} calcification",
                                      f"{_CALCIFICATION_ADVERBS[grade]} calcified")))
    if lesion.thrombus:
        qualifiers.append(_pick(rng, ("with thrombus", "with intraluminal thrombus",
                                      "thrombus present")))
    if lesion.in_stent_restenosis:
        qualifiers.append(_pick(rng, ("with in-stent restenosis", "due to in-stent restenosis")))
    if lesion.prior_stent:
        qualifiers.append(_pick(rng, ("with a prior stent", "at the site of a previous stent",
                                      "in a previously stented segment")))
    if lesion.medina is not None:
        a, b, c = lesion.medina
        qualifiers.append(_pick(rng, (f"at a bifurcation (Medina {a}.{b}.{c})",
                                      f"bifurcation lesion, Medina {a},{b},{c}",
                                      f"involving the bifurcation (Medina {a}-{b}-{c})")))
    if lesion.collaterals:
        qualifiers.append(_pick(rng, ("filling via collaterals",
                                      "with the distal vessel filling via collaterals",
                                      "with collateral filling of the distal vessel")
                                if lesion.cto else
                                ("with collaterals", "collaterals are seen",
                                 "with collateral filling")))
    physiology = [
        _pick(rng, (f"{label} {value:.2f}", f"{label} of {value:.2f}", f"{label} = {value:.2f}",
                    f"with an {label} of {value:.2f}"))
        for label, value in (("iFR", lesion.ifr), ("FFR", lesion.ffr)) if value is not None]
    separate_physiology = rng is not None and bool(physiology) and rng.random() < 0.3
    if not separate_physiology:
        qualifiers.extend(physiology)
    if rng is not None:
        qualifiers = [qualifiers[i] for i in rng.permutation(len(qualifiers))]
    sentences = ["".join([head, *(", " + q for q in qualifiers)]) + "."]
    if separate_physiology:
        values = ", ".join(p.removeprefix("with an ") for p in physiology)
        sentences.append(_pick(rng, (f"{_capitalised(name)}: {values}.",
                                     f"Pressure wire assessment of the {name}: {values}.")))
    return sentences


# ----------------------------------------------------------------------------- parse
# Patterns run on lower-cased text. In the patterns written through `_compile`, a
# space stands for one or more spaces or hyphens, '~' for zero or more.


def _compile(pattern: str) -> re.Pattern:
    return re.compile(pattern.replace(" ", r"[\s-]+").replace("~", r"[\s-]*"))


_VESSEL_PATTERNS = {
    "lad": r"(?:lad|left anterior descending(?: (?:coronary )?artery)?)",
    "lcx": r"(?:l~cx|cx|(?:left )?circumflex(?: (?:coronary )?artery)?)",
    "rca": r"(?:rca|right coronary(?: artery)?)",
}
_VESSEL_ABBREVIATIONS = {"lad": "lad", "lcx": "(?:lcx|cx)", "rca": "rca"}
_POSITION_PATTERNS = {"prox": r"(?:proximal|prox\.?|ostial)", "mid": r"(?:mid|middle)",
                      "dist": r"(?:distal|dist\.?)"}
# The LCx has two segments: a "mid" circumflex lesion is read as distal (SYNTAX's mid-distal).
_VESSEL_POSITION_SEGMENTS = {
    ("lad", "prox"): "prox_lad", ("lad", "mid"): "mid_lad", ("lad", "dist"): "dist_lad",
    ("lcx", "prox"): "prox_lcx", ("lcx", "mid"): "dist_lcx", ("lcx", "dist"): "dist_lcx",
    ("rca", "prox"): "prox_rca", ("rca", "mid"): "mid_rca", ("rca", "dist"): "dist_rca",
}


def _ordinal_branch_patterns(stem: str, number: int, abbreviation: str) -> list[str]:
    word = ("first", "second")[number - 1]
    short = ("1st", "2nd")[number - 1]
    return [rf"\b{abbreviation}~{number}(?!\w)",
            rf"\b{stem}(?: branch)?~(?:#|no\.?)?~{number}(?!\w)",
            rf"\b(?:{word}|{short}) {stem}(?: branch)?(?!\w)",
            rf"\b(?:{word}|{short}) {abbreviation}(?!\w)"]


_DIAGONAL = r"diag(?:onal)?"
_MARGINAL = r"(?:obtuse )?marginal"
_BRANCH_PATTERNS = {
    "lmca": [r"\b(?:lmca|lms|lm|left main(?: (?:coronary(?: artery)?|stem|artery|trunk))?)(?!\w)"],
    # An unnumbered diagonal or marginal branch is read as the first one.
    "d1": _ordinal_branch_patterns(_DIAGONAL, 1, "d")
    + [rf"\b{_DIAGONAL}(?: branch)?(?!\w)(?!~\d)"],
    "d2": _ordinal_branch_patterns(_DIAGONAL, 2, "d"),
    "om1": _ordinal_branch_patterns(_MARGINAL, 1, "om")
    + [rf"\b(?:om|{_MARGINAL}(?: branch)?)(?!\w)(?!~\d)"],
    "om2": _ordinal_branch_patterns(_MARGINAL, 2, "om"),
    "ramus": [r"\bramus(?: intermedi(?:us|ate|a))?(?: (?:branch|artery))?(?!\w)",
              r"\bintermediate (?:branch|artery)(?!\w)"],
    "lvp": [r"\b(?:lvp|l~plb?|left posterolateral(?: (?:ventricular )?(?:branch|artery))?"
            r"|left ventricular posterior(?: (?:branch|artery))?)(?!\w)",
            r"\bposterolateral(?: (?:branch|artery))? (?:of|from) (?:the )?"
            r"(?:l~cx|cx|circumflex|left circumflex)(?: artery)?(?!\w)"],
    "pda": [r"\b(?:[rl]~pda|pda|posterior descending(?: (?:coronary )?(?:artery|branch))?)(?!\w)"],
    "rpl": [r"\b(?:r~plb?|r~plv|plb|plv|pl(?: branch)?|right posterolateral(?: (?:ventricular )?"
            r"(?:branch|artery))?|posterolateral(?: (?:ventricular )?(?:branch|artery))?)(?!\w)"],
}


def _mention_patterns() -> list[tuple[re.Pattern, str, str]]:
    """(pattern, 'segment' or 'vessel', key) for everything that names a segment or vessel."""
    patterns = []
    for (vessel, position), segment in _VESSEL_POSITION_SEGMENTS.items():
        v, p = _VESSEL_PATTERNS[vessel], _POSITION_PATTERNS[position]
        for form in (rf"\b{p}~{v}(?!\w)",
                     rf"\b{p} (?:segment|portion|part|third) of (?:the )?{v}(?!\w)",
                     rf"\b{v} {p}(?!\w)",
                     rf"\b{position[0]}{_VESSEL_ABBREVIATIONS[vessel]}(?!\w)"):
            patterns.append((_compile(form), "segment", segment))
    for segment, forms in _BRANCH_PATTERNS.items():
        patterns.extend((_compile(form), "segment", segment) for form in forms)
    for vessel, form in _VESSEL_PATTERNS.items():
        patterns.append((_compile(rf"\b{form}(?!\w)"), "vessel", vessel))
    return patterns


_MENTIONS = _mention_patterns()
_POSITION_WORD = _compile(
    r"\b(?:(proximal(?:ly)?|prox\.?|ostial|ostium)|(mid|middle)|(distal(?:ly)?|dist\.?))(?!\w)"
    r"(?! (?:vessel|bed|run~?off|filling|reconstitution))")

_DOMINANCE_PATTERNS = [(_compile(p), d) for p, d in (
    (r"\bnon~dominant (?:rca|right coronary)", "left"),
    (r"\bnon~dominant (?:l~cx|cx|circumflex|left circumflex)", "right"),
    (r"(?<!non-)(?<!non\s)\bdominant (?:rca|right coronary)", "right"),
    (r"(?<!non-)(?<!non\s)\bdominant (?:l~cx|cx|circumflex|left circumflex)", "left"),
    (r"\b(?:rca|right coronary(?: artery)?) (?:is|was) dominant", "right"),
    (r"\b(?:l~cx|cx|circumflex|left circumflex(?: artery)?) (?:is|was) dominant", "left"),
    (r"\bco~dominan\w*|\bbalanced (?:coronary )?(?:circulation|dominance|system)"
     r"|\bdominance[:=\s]+(?:is )?balanced", "codominant"),
    (r"\bright~dominan\w*|\bdominance[:=\s]+(?:is )?right\b", "right"),
    (r"\bleft~dominan\w*|\bdominance[:=\s]+(?:is )?left\b", "left"),
)]

_NUMBER = r"(\d{1,3}(?:\.\d+)?)"
_PERCENT_SIGN = r"\s*(?:%|percent\b|pct\b)"
_PERCENT_RANGE = re.compile(rf"(?<![\w.]){_NUMBER}\s*%?\s*(?:-|to)\s*{_NUMBER}{_PERCENT_SIGN}")
_PERCENT = re.compile(rf"(?<![\w.]){_NUMBER}{_PERCENT_SIGN}")
_RATIO_VALUE = r"\s*(?:(?:value|ratio|of|was|is|measured|at)\s+)*[=:]?\s*(\d+(?:\.\d+)?)(?!\.?\d)"
_IFR = re.compile(rf"\bifr\b{_RATIO_VALUE}")
_FFR = re.compile(rf"\bffr\b{_RATIO_VALUE}")
_MEDINA = re.compile(r"\bmedina(?:[\s-]+(?:classification|class|type))?[\s:(]*"
                     r"([01])\s*[.,/-]\s*([01])\s*[.,/-]\s*([01])")
_CALCIFICATION_GRADE_WORDS = {
    "minimal": "minimal", "minimally": "minimal", "mild": "minimal", "mildly": "minimal",
    "moderate": "moderate", "moderately": "moderate", "severe": "severe", "severely": "severe",
    "heavy": "severe", "heavily": "severe", "extensive": "severe", "extensively": "severe",
    "dense": "severe", "densely": "severe",
}
_GRADE = "(" + "|".join(_CALCIFICATION_GRADE_WORDS) + ")"
# Calcification without a grade is read as 'moderate'.
_CALCIFICATION = _compile(rf"\b{_GRADE} (?:calcifi\w*|calcium)|\bcalcifi\w*(?: (?:is|was))?:? "
                          rf"{_GRADE}\b|\bcalcifi\w*|\bcalcium\b")
_CTO = _compile(r"\bcto\b|\bchronic(?:ally)?(?: total(?:ly)?)? occlu\w*|\bchronic total\b")
_THROMBUS = _compile(r"\bthromb\w*")
# In-stent restenosis and a prior stent are separate flags: a stent is recorded only
# when it is named outside the restenosis phrase.
_RESTENOSIS = _compile(r"\bin~stent re~stenos\w*|\bisr\b|\bre~stenos\w*")
_STENT = _compile(r"\bstent(?:s|ed|ing)?\b|\bs/p (?:pci|stent\w*)|\bstatus post (?:pci|stent\w*)")
_COLLATERALS = _compile(r"\bcollateral\w*")
_NORMAL_PHRASE = _compile(
    r"\bno (?:[\w/]+ ){0,3}?(?:disease|stenos[ie]s|lesions?|narrowing|cad|obstruction|plaque)\b"
    r"|\bfree of (?:\w+ ){0,2}?disease\b|\bwithout (?:\w+ ){0,2}?(?:disease|stenos[ie]s|lesions?"
    r"|narrowing)\b|\bnon~significant\b|\binsignificant\b|\bnot significant\b|\bnormal\b"
    r"|\bunremarkable\b|\bpatent\b|\bsmooth\b")
# Checked in this order, each match blanked before the next (so "subtotal occlusion"
# is critical and "non-obstructive" is mild); the most severe class found wins.
_SEVERITY_WORDS = [(c, _compile(p)) for c, p in (
    ("critical", r"\bcritical(?:ly)?\b|\bsub~total(?:ly)?(?: occlu\w*)?|\bnear~(?:total|complete)?"
                 r"~occlu\w*|\bpre~occlusive\b"),
    ("occluded", r"\b(?:total(?:ly)?|complete(?:ly)?) occlu\w*|\bocclu(?:ded|sion|sive)\b"),
    ("mild", r"\bmild(?:ly)?\b|\bminimal(?:ly)?\b|\bnon~obstructive\b"
             r"|\b(?:luminal )?irregularit(?:y|ies)\b"),
    ("moderate", r"\bmoderate(?:ly)?\b"),
    ("severe", r"\bsevere(?:ly)?\b|\bhigh~grade\b|\btight\b|\bsignificant\b|\bobstructive\b"),
)]
_SCOPE_WORDS = re.compile(r"\b(?:coronar\w*|arter\w*|vessels?|system|circulation|segments?"
                          r"|branch\w*|tree|remaining|otherwise|elsewhere)\b")
_NEGATED_BEFORE = re.compile(r"\b(?:no|without|w/o|not|negative\s+for|absent)\s+"
                             r"(?:[\w-]+\s+){0,2}$")
_NEGATED_AFTER = re.compile(r"^\w*\s*(?:(?:is|are|was|were)\s+)?"
                            r"(?:absent|not\s+(?:seen|present|visuali[sz]ed))")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|(?<=[.!?])(?=[A-Z][a-z])|[\r\n]+")
_ABBREVIATION_AT_END = re.compile(r"(?:^|[\s(])(?:prox|dist|approx|est|vs|e\.g|i\.e|no)\.$",
                                  re.IGNORECASE)
_CLAUSE_BREAK = re.compile(r"[;,]|\s+(?:and|but|while)\s+")
_DASHES = re.compile("[\u2010\u2011\u2012\u2013\u2014\u2212]")


@dataclasses.dataclass(frozen=True)
class ParseResult:
    """What `parse_result` read from a report.

    findings: the findings read (segments not mentioned are normal).
    parsed_sentences: sentences that gave a dominance, a segment finding, or a
      "no significant disease"-style statement.
    unparsed_sentences: the other sentences, as written (free text, unreadable findings).
    ok: the text had a recognisable report structure (parsed_sentences > 0).
    dominance_stated: whether a sentence stated dominance (else findings say 'right').
    """

    findings: Findings
    parsed_sentences: int
    unparsed_sentences: list[str]
    ok: bool
    dominance_stated: bool


def findings_key(text: str) -> str:
    """What a report states, as a string: its parsed findings (`parse`) in canonical JSON,
    so reports that say the same thing in other words get the same key. A report the
    parser reads nothing of (`ParseResult.ok` False) is keyed by its own text instead:
    two such reports are the same only when they are identical."""
    result = parse_result(text)
    if not result.ok:
        return "text:" + text
    return json.dumps(to_json(result.findings), sort_keys=True)


def parse(text: str) -> Findings:
    """The findings in a report; see `parse_result`."""
    return parse_result(text).findings


def parse_result(text: str) -> ParseResult:
    """Reads findings from a report: exact on `render`'s output, tolerant of real text.

    Reading rules:
    - Sentences end at '.', '!', '?' before a space or a capitalised word, or at a line
      break ("prox." and "approx." do not end one); clauses split at ',', ';', 'and'.
      A clause is about the segment it names (the first, if several); a clause naming
      none continues the previous one. A bare vessel ("LAD") plus a position word in the
      clause or a later one ("proximally", "mid") names the segment. A finding about a
      vessel without a position is not read (the sentence is listed as unparsed).
    - Case, hyphens, spacing and abbreviations are free: prox/proximal/ostial, dist/
      distal, mid/middle, LMCA/LM/left main, LCx/Cx/circumflex, RCA/right coronary
      artery, D1/first diagonal, OM1/first obtuse marginal, PDA/posterior descending,
      PL/PLV/posterolateral (right), LVP/left posterolateral, pLAD/mRCA. An unnumbered
      diagonal/marginal is the first; a "mid" circumflex lesion is the distal LCx.
    - Stenosis: the largest percent in the segment's clauses ("70%", "70 %", "~70%",
      "70.0%", "70 percent"); a range "70-80%" reads as its midpoint (75). Without a
      number, the most severe severity word gives SEVERITY_REPRESENTATIVE_PERCENT
      (mild/minimal/irregularities 30, moderate 60, severe/high-grade/significant 80,
      critical/subtotal 95, occluded 100); "no stenosis", "normal", "patent" give 0.
      "CTO"/"chronic total occlusion" gives 100 with cto=True.
    - Qualifiers: calcification (graded; mild -> minimal, heavy -> severe, ungraded ->
      moderate), thrombus, in-stent restenosis, stent, Medina a.b.c, iFR/FFR values in
      (0, 1], collaterals; "no"/"without"/"w/o" before one negates it.
    - A segment named in several sentences gets the merge: largest stenosis, flags or'ed,
      the first value of each other field. Percents outside [0, 100] are ignored.
    - Dominance: the first sentence that states it; absent dominance reads as 'right'
      (the common case), with dominance_stated False.
    Never raises on a string.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_result: text must be a str, got {type(text)}")
    lesions: dict[str, Lesion] = {}
    dominance = None
    parsed_sentences = 0
    unparsed_sentences = []
    for sentence in _split_sentences(text):
        normalised = _DASHES.sub("-", sentence.lower())
        sentence_dominance = _read_dominance(normalised)
        if dominance is None:
            dominance = sentence_dominance
        segment_lesions = _read_segment_lesions(normalised)
        for segment, lesion in segment_lesions:
            lesions[segment] = _merge(lesions[segment], lesion) if segment in lesions else lesion
        if sentence_dominance or segment_lesions or _is_normal_statement(normalised):
            parsed_sentences += 1
        else:
            unparsed_sentences.append(sentence)
    return ParseResult(
        findings=Findings(lesions, dominance or "right"),
        parsed_sentences=parsed_sentences,
        unparsed_sentences=unparsed_sentences,
        ok=parsed_sentences > 0,
        dominance_stated=dominance is not None,
    )


_SIDE_WORDS = {"left": re.compile(r"\bleft\b"), "right": re.compile(r"\bright\b")}
_VESSEL_SYSTEMS = {"lad": "left", "lcx": "left", "rca": "right"}


def _sentence_systems(sentence: str) -> set[str]:
    """The coronary systems a lower-cased sentence is about: those of the segments and
    vessels it names, and 'left'/'right' said as words ("the left coronary system")."""
    systems = {system_of(key) if kind == "segment" else _VESSEL_SYSTEMS[key]
               for _, _, kind, key in _mentions(sentence)}
    systems.update(side for side, pattern in _SIDE_WORDS.items() if pattern.search(sentence))
    return systems


def system_part(text: str, system: str) -> str | None:
    """The part of a study report that one coronary system's view can show.

    Keeps, in their order and words: every sentence that states dominance, every
    sentence about a segment or vessel of `system` (or saying "left"/"right" of it,
    as in "The left system is normal"), and "no disease"-style sentences that name
    no system (they hold for both). Drops sentences about the other system only and
    sentences the parser cannot read. For `render`'s output, `parse(system_part(
    render(f, rng), s))` equals the findings of `s` alone with f's dominance.

    Returns None when the report has no sentence the parser reads (free text,
    another language): the caller keeps the whole report.
    """
    if system not in SYSTEMS:
        raise ValueError(f"system={system!r}: expected one of {SYSTEMS}")
    if not parse_result(text).ok:
        return None
    kept = []
    for sentence in _split_sentences(text):
        normalised = _DASHES.sub("-", sentence.lower())
        systems = _sentence_systems(normalised)
        if _read_dominance(normalised) or system in systems:
            kept.append(sentence)
        elif not systems and _is_normal_statement(normalised):
            kept.append(sentence)
    return " ".join(kept)


def _split_sentences(text: str) -> list[str]:
    sentences: list[str] = []
    for piece in _SENTENCE_BREAK.split(text):
        piece = re.sub(r"^[-*\u2022\u00b7]+\s*", "", piece.strip())
        if not re.search(r"\w", piece):
            continue
        if sentences and _ABBREVIATION_AT_END.search(sentences[-1]):
            sentences[-1] += " " + piece
        else:
            sentences.append(piece)
    return sentences


def _blank(text: str, start: int, end: int) -> str:
    return text[:start] + " " * (end - start) + text[end:]


def _take(pattern: re.Pattern, text: str) -> tuple[str, list[re.Match]]:
    """All matches of pattern in text, and the text with them blanked out."""
    matches = list(pattern.finditer(text))
    for match in matches:
        text = _blank(text, *match.span())
    return text, matches


def _affirmed(matches: list[re.Match], text: str) -> list[re.Match]:
    return [m for m in matches if not _NEGATED_BEFORE.search(text[:m.start()])
            and not _NEGATED_AFTER.search(text[m.end():])]


def _read_dominance(text: str) -> str | None:
    for pattern, dominance in _DOMINANCE_PATTERNS:
        if pattern.search(text):
            return dominance
    return None


def _mentions(clause: str) -> list[tuple[int, int, str, str]]:
    """Non-overlapping (start, end, kind, key) mentions of segments and vessels; leftmost,
    then longest, wins."""
    found = sorted(((m.start(), m.end(), kind, key)
                    for pattern, kind, key in _MENTIONS for m in pattern.finditer(clause)),
                   key=lambda mention: (mention[0], mention[0] - mention[1]))
    chosen: list[tuple[int, int, str, str]] = []
    for mention in found:
        if not chosen or mention[0] >= chosen[-1][1]:
            chosen.append(mention)
    return chosen


def _read_segment_lesions(sentence: str) -> list[tuple[str, Lesion]]:
    groups: list[tuple[str | None, list[str]]] = []  # (segment or None for a bare vessel, texts)
    leading: list[str] = []
    context_vessel = None
    for clause in _CLAUSE_BREAK.split(sentence):
        mentions = _mentions(clause)
        for start, end, _, _ in mentions:
            clause = _blank(clause, start, end)
        segments = [key for _, _, kind, key in mentions if kind == "segment"]
        vessels = [key for _, _, kind, key in mentions if kind == "vessel"]
        segment = segments[0] if segments else None
        position = _POSITION_WORD.search(clause)
        vessel = vessels[0] if vessels else context_vessel
        if segment is None and vessel is not None and position is not None:
            position_key = ("prox", "mid", "dist")[position.lastindex - 1]
            segment = _VESSEL_POSITION_SEGMENTS[vessel, position_key]
        if vessels:
            context_vessel = vessels[-1]
        if segment is not None or vessels:
            groups.append((segment, [clause]))
        elif groups:
            groups[-1][1].append(clause)
        else:
            leading.append(clause)
    if groups:
        groups[0][1][:0] = leading
    found = []
    for segment, texts in groups:
        lesion = _read_lesion(" , ".join(texts)) if segment is not None else None
        if lesion is not None:
            found.append((segment, lesion))
    return found


def _is_normal_statement(sentence: str) -> bool:
    """A "no significant disease"-style sentence about vessels, a system or the arteries."""
    if not _NORMAL_PHRASE.search(sentence):
        return False
    if not (_SCOPE_WORDS.search(sentence) or _mentions(sentence)):
        return False
    return _read_lesion(sentence) == _NO_LESION


def _read_lesion(text: str) -> Lesion | None:
    """The lesion a segment's text describes, or None when it says nothing about one."""
    text, medina_matches = _take(_MEDINA, text)
    ratios = {}
    for name, pattern in (("ifr", _IFR), ("ffr", _FFR)):
        text, matches = _take(pattern, text)
        values = [float(m.group(1)) for m in matches if 0.0 < float(m.group(1)) <= 1.0]
        ratios[name] = values[0] if values else None
    calcification_text, calcification_matches = _take(_CALCIFICATION, text)
    calcification = None
    affirmed_calcification = _affirmed(calcification_matches, text)
    if affirmed_calcification:
        grade = affirmed_calcification[0].group(1) or affirmed_calcification[0].group(2)
        calcification = _CALCIFICATION_GRADE_WORDS[grade] if grade else "moderate"
    text = calcification_text
    flags = {}
    mentioned = bool(medina_matches or calcification_matches or any(ratios.values()))
    for name, pattern in (("cto", _CTO), ("thrombus", _THROMBUS),
                          ("in_stent_restenosis", _RESTENOSIS), ("prior_stent", _STENT),
                          ("collaterals", _COLLATERALS)):
        blanked, matches = _take(pattern, text)
        flags[name] = bool(_affirmed(matches, text))
        mentioned = mentioned or bool(matches)
        text = blanked
    percents = []
    text, range_matches = _take(_PERCENT_RANGE, text)
    for match in range_matches:
        low, high = float(match.group(1)), float(match.group(2))
        if 0.0 <= low <= 100.0 and 0.0 <= high <= 100.0:
            percents.append((low + high) / 2)
    text, percent_matches = _take(_PERCENT, text)
    percents += [float(m.group(1)) for m in percent_matches if 0.0 <= float(m.group(1)) <= 100.0]
    text, normal_matches = _take(_NORMAL_PHRASE, text)
    severities = []
    for severity, pattern in _SEVERITY_WORDS:
        text, matches = _take(pattern, text)
        if matches:
            severities.append(SEVERITY_REPRESENTATIVE_PERCENT[severity])
    if not (mentioned or percents or normal_matches or severities):
        return None
    if flags["cto"]:
        stenosis = 100.0
    elif percents:
        stenosis = max(percents)
    else:
        stenosis = max(severities, default=0.0)
    medina = tuple(int(d) for d in medina_matches[0].groups()) if medina_matches else None
    return Lesion(stenosis=stenosis, calcification=calcification, medina=medina, **ratios,
                  **flags)


def _merge(first: Lesion, second: Lesion) -> Lesion:
    merged = {}
    for field in dataclasses.fields(Lesion):
        a, b = getattr(first, field.name), getattr(second, field.name)
        if field.name == "stenosis":
            merged[field.name] = max(a, b)
        elif isinstance(a, bool):
            merged[field.name] = a or b
        else:
            merged[field.name] = a if a is not None else b
    return Lesion(**merged)
