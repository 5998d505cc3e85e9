"""Tests for input_pipeline/synthetic_findings.py: the prevalence of the random findings
that the synthetic studies are drawn from."""

import numpy as np

from deepcoro_jax.domain import reports
from input_pipeline import synthetic_findings


def test_random_findings_prevalence():
    rng = np.random.default_rng(0)
    studies = [synthetic_findings.random_findings(rng) for _ in range(4000)]
    dominance = {d: np.mean([f.dominance == d for f in studies]) for d in reports.DOMINANCES}
    assert 0.77 < dominance["right"] < 0.83
    assert 0.08 < dominance["left"] < 0.12 and 0.08 < dominance["codominant"] < 0.12
    cto_fraction = np.mean([any(lesion.cto for lesion in f.lesions.values()) for f in studies])
    assert 0.04 < cto_fraction < 0.06
    normal_fraction = np.mean([not f.lesions for f in studies])
    assert 0.30 < normal_fraction < 0.38
    lesion_counts = np.array([len(f.lesions) for f in studies])
    assert lesion_counts.max() <= 7 and 1.0 < lesion_counts.mean() < 1.8
    segment_counts = {s: sum(s in f.lesions for f in studies) for s in reports.SEGMENTS}
    assert segment_counts["mid_lad"] > 5 * segment_counts["lvp"]  # most lesions proximal
    percents = [lesion.stenosis for f in studies for lesion in f.lesions.values()]
    assert all(p % 5 == 0 or p == 99 for p in percents)  # reported to ~5 %
    strata = {s: np.mean([reports.stratum(f) == s for f in studies]) for s in reports.STRATA}
    assert all(fraction > 0.08 for fraction in strata.values())  # every stratum populated
