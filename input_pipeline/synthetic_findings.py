"""Random report findings with roughly realistic prevalence, for synthetic studies and tests.

For: `random_findings`, which draws a `deepcoro_jax.domain.reports.Findings` (dominance,
lesion sites, stenosis bins, qualifiers) from a NumPy generator; `synthetic.py` renders
each synthetic study from it. The prevalences are approximate, not epidemiology.

Not for: the report schema, rendering or parsing (``deepcoro_jax/domain/reports.py``), or
drawing the videos (``synthetic.py``). Pure Python + NumPy: no TensorFlow, no JAX.
"""

from __future__ import annotations

import numpy as np

from deepcoro_jax.domain.reports import CALCIFICATION_GRADES, DOMINANCES, SEGMENTS, Findings, Lesion

# Relative chance that a lesion sits in each segment (approximate, for synthetic data).
_LESION_SITE_WEIGHTS = {
    "lmca": 0.03, "prox_lad": 0.15, "mid_lad": 0.15, "dist_lad": 0.05, "d1": 0.07, "d2": 0.03,
    "prox_lcx": 0.08, "dist_lcx": 0.05, "om1": 0.07, "om2": 0.03, "ramus": 0.02, "lvp": 0.01,
    "prox_rca": 0.09, "mid_rca": 0.09, "dist_rca": 0.05, "pda": 0.02, "rpl": 0.01,
}
_CTO_SITES = ("prox_lad", "mid_lad", "prox_lcx", "dist_lcx", "prox_rca", "mid_rca", "dist_rca")
_BIFURCATION_SITES = ("lmca", "prox_lad", "mid_lad", "prox_lcx", "dist_rca")
_STENOSIS_GRID = (  # percents as reported (to ~5%), per bin: mild, moderate, severe, critical
    (10, 15, 20, 25, 30, 35, 40, 45), (50, 55, 60, 65), (70, 75, 80, 85), (90, 95, 99))
_STENOSIS_BIN_PROBABILITY = (0.45, 0.25, 0.18, 0.12)
_NORMAL_STUDY_PROBABILITY = 0.35
_CTO_STUDY_PROBABILITY = 0.05


def random_findings(rng: np.random.Generator) -> Findings:
    """Random findings with roughly realistic prevalence (for synthetic studies and tests).

    Dominance right/left/codominant 80/10/10 %; ~35 % of studies have no lesion, the
    rest 1-6 lesions (1 + Poisson(1)), mostly in the proximal/mid LAD, LCx and RCA;
    stenosis bins mild/moderate/severe/critical 45/25/18/12 % at multiples of 5;
    a chronic total occlusion (collaterals in 85 %) in ~5 % of studies; qualifiers
    (calcification, stents, restenosis, thrombus, Medina, FFR/IFR, collaterals) at
    plausible rates. Approximate, not epidemiology.
    """
    dominance = DOMINANCES[rng.choice(len(DOMINANCES), p=[0.8, 0.1, 0.1])]
    lesions = {}
    if rng.random() >= _NORMAL_STUDY_PROBABILITY:
        weights = np.array([_LESION_SITE_WEIGHTS[s] for s in SEGMENTS])
        num_lesions = min(1 + int(rng.poisson(1.0)), 6)
        for index in rng.choice(len(SEGMENTS), size=num_lesions, replace=False,
                                p=weights / weights.sum()):
            lesions[SEGMENTS[index]] = _random_lesion(SEGMENTS[index], rng)
    if rng.random() < _CTO_STUDY_PROBABILITY:
        site = _CTO_SITES[rng.integers(len(_CTO_SITES))]
        lesions[site] = Lesion(100.0, cto=True, collaterals=bool(rng.random() < 0.85))
    return Findings(lesions, dominance)


def _random_lesion(segment: str, rng: np.random.Generator) -> Lesion:
    grid = _STENOSIS_GRID[rng.choice(len(_STENOSIS_GRID), p=_STENOSIS_BIN_PROBABILITY)]
    stenosis = float(grid[rng.integers(len(grid))])
    calcification = None
    if rng.random() < 0.2:
        calcification = CALCIFICATION_GRADES[rng.choice(3, p=[0.4, 0.4, 0.2])]
    prior_stent = bool(rng.random() < 0.08)
    medina = None
    if segment in _BIFURCATION_SITES and rng.random() < 0.1:
        code = int(rng.integers(1, 8))  # any Medina class but 0.0.0
        medina = ((code >> 2) & 1, (code >> 1) & 1, code & 1)
    ifr = ffr = None
    if 40 <= stenosis <= 85 and rng.random() < 0.25:
        measured = int(rng.integers(3))  # 0: FFR, 1: IFR, 2: both
        if measured != 1:
            ffr = round(float(np.clip(1.05 - 0.004 * stenosis + rng.normal(0, 0.03), 0.5, 1.0)), 2)
        if measured != 0:
            ifr = round(float(np.clip(1.06 - 0.0035 * stenosis + rng.normal(0, 0.025), 0.6, 1.0)),
                        2)
    return Lesion(
        stenosis=stenosis,
        calcification=calcification,
        thrombus=bool(rng.random() < (0.08 if stenosis >= 90 else 0.02)),
        in_stent_restenosis=bool(prior_stent and stenosis >= 50 and rng.random() < 0.5),
        prior_stent=prior_stent,
        medina=medina,
        ifr=ifr,
        ffr=ffr,
        collaterals=bool(stenosis >= 90 and rng.random() < 0.3),
    )
