"""Tests for evaluators/captioning.py (clinical metrics on hand-made report pairs with
known answers) and evaluators/text_metrics.py (BLEU-4, ROUGE-L and CIDEr-D against
independent re-computations written here, and CIDEr-D against the COCO caption
evaluation's own code, pycocoevalcap's ``Cider``)."""

import math
from collections import Counter

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from deepcoro_jax.domain import reports
from deepcoro_jax.domain.reports import Findings, Lesion
from evaluators import captioning, text_metrics
from input_pipeline import synthetic_findings

# ----------------------------------------------------------------------------- clinical


def rendered(findings: Findings, seed: int) -> str:
    return reports.render(findings, np.random.default_rng(seed))


UNPARSEABLE = "The patient tolerated the procedure well."


@pytest.fixture(scope="module")
def hand_made_pairs():
    references = [
        rendered(Findings({"mid_lad": Lesion(80.0), "prox_rca": Lesion(40.0)}, "right"), 0),
        rendered(Findings({"lmca": Lesion(55.0), "prox_lcx": Lesion(100.0, cto=True)}, "left"), 1),
        rendered(Findings({"dist_rca": Lesion(100.0, cto=True)}, "right"), 2),
        rendered(Findings({}, "right"), 3),
        "Normal coronary arteries.",  # free text, no dominance stated
    ]
    generated = [
        rendered(Findings({"mid_lad": Lesion(70.0), "prox_rca": Lesion(40.0)}, "right"), 10),
        rendered(Findings({"lmca": Lesion(45.0), "prox_lcx": Lesion(100.0, cto=True)},
                          "left"), 11),
        UNPARSEABLE,
        rendered(Findings({"d1": Lesion(75.0)}, "right"), 13),
        "Left dominant. No significant coronary artery disease.",
    ]
    return generated, references


def test_clinical_metrics_on_hand_made_pairs(hand_made_pairs):
    generated, references = hand_made_pairs
    assert not reports.parse_result(UNPARSEABLE).ok
    metrics = captioning.clinical_metrics(generated, references)
    cells = 5 * 17
    # Errors: mid LAD 10, left main 10, distal RCA 100 (unparsed report), D1 75;
    # 6 segment cells hold a lesion in either report.
    expected = {
        "num_reports": 5.0,
        "parse_rate": 4 / 5,
        "stenosis_mae": 195 / cells,
        "stenosis_mae_lesions": 195 / 6,
        # Wrong class: left main (mild vs moderate), distal RCA, D1.
        "severity_accuracy": (cells - 3) / cells,
        # normal 158/160; mild 2/3; moderate 0; severe 2/3; occluded 2/3 (no critical).
        "severity_macro_f1": (158 / 160 + 0 + 3 * 2 / 3) / 5,
        # Significant: TP mid LAD, prox LCx; FP D1; FN left main (55 >= 50), distal RCA.
        "significant_precision": 2 / 3,
        "significant_recall": 2 / 4,
        "significant_f1": 4 / 7,
        "num_reference_cto": 2.0,
        "cto_recall": 1 / 2,
        # References 0-3 state dominance; report 2 states none (not read as 'right'): 3 of 4.
        "dominance_accuracy": 3 / 4,
    }
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key


def test_identical_findings_differently_phrased_are_perfect():
    rng = np.random.default_rng(5)
    findings = [synthetic_findings.random_findings(rng) for _ in range(30)]
    findings.append(Findings({"prox_rca": Lesion(100.0, cto=True)}))
    references = [rendered(f, i) for i, f in enumerate(findings)]
    generated = [rendered(f, 1000 + i) for i, f in enumerate(findings)]
    assert generated != references
    metrics = captioning.clinical_metrics(generated, references)
    for key in ("parse_rate", "severity_accuracy", "severity_macro_f1", "significant_f1",
                "cto_recall", "dominance_accuracy"):
        assert metrics[key] == 1.0, key
    assert metrics["stenosis_mae"] == 0.0 and metrics["stenosis_mae_lesions"] == 0.0


def test_cto_recall_needs_a_cto_in_the_same_segment():
    reference = rendered(Findings({"prox_rca": Lesion(100.0, cto=True)}), 0)
    for generated, recall in (("Right dominant. Total occlusion of the proximal RCA.", 0.0),
                              ("Right dominant. CTO of the mid RCA.", 0.0),
                              ("Right dominant. CTO of the proximal RCA.", 1.0)):
        metrics = captioning.clinical_metrics([generated], [reference])
        assert metrics["cto_recall"] == recall, generated
        assert metrics["num_reference_cto"] == 1.0 and metrics["dominance_accuracy"] == 1.0


def test_empty_denominators_leave_keys_out():
    normal = rendered(Findings({}), 0)
    metrics = captioning.clinical_metrics([normal, UNPARSEABLE], [normal, "Normal arteries."])
    assert metrics["parse_rate"] == 0.5
    assert metrics["stenosis_mae"] == 0.0 and metrics["severity_accuracy"] == 1.0
    assert metrics["severity_macro_f1"] == 1.0  # only 'normal' occurs
    assert metrics["dominance_accuracy"] == 1.0  # only the first reference states it
    for key in ("stenosis_mae_lesions", "significant_precision", "significant_recall",
                "significant_f1", "cto_recall"):
        assert key not in metrics
    assert metrics["num_reference_cto"] == 0.0


def test_most_common_report_baseline():
    lesion = Findings({"mid_lad": Lesion(80.0)})
    references = [rendered(lesion, 0), rendered(Findings({}), 1), rendered(lesion, 2),
                  rendered(Findings({}), 3), rendered(Findings({}), 4)]
    assert len(set(references)) == 5  # counted by findings, not by text
    baseline = captioning.most_common_report_baseline(references)
    assert baseline == [references[1]] * 5
    metrics = captioning.clinical_metrics(baseline, references)
    # 2 severe cells missed: normal F1 = 2*83 / (2*83 + 2), severe F1 = 0.
    assert metrics["severity_macro_f1"] == pytest.approx((166 / 168 + 0.0) / 2)
    assert metrics["significant_recall"] == 0.0 and "significant_precision" not in metrics
    # Ties go to the findings seen first.
    tied = [rendered(lesion, 0), rendered(Findings({}), 1)]
    assert captioning.most_common_report_baseline(tied) == [tied[0]] * 2


@pytest.mark.parametrize("generated, references, error, message", [
    (["a"], ["a", "b"], ValueError, "must pair up"),
    ([], [], ValueError, "generated is empty"),
    (["a", 3], ["a", "b"], TypeError, r"generated\[1\]"),
    ("a report", ["a"], TypeError, "generated must be a sequence"),
])
def test_clinical_metrics_bad_input(generated, references, error, message):
    with pytest.raises(error, match=message):
        captioning.clinical_metrics(generated, references)


# ----------------------------------------------------------------------------- text metrics

PLAIN_PAIRS = (  # no punctuation, so sacrebleu's 13a tokenisation is a whitespace split
    ("the mid lad has a severe stenosis of eighty percent",
     "the mid lad has a severe stenosis of seventy percent"),
    ("the right coronary artery is normal with no disease",
     "the right coronary artery is free of disease"),
    ("mild disease of the first diagonal branch",
     "mild disease of the first obtuse marginal branch and the first diagonal"),
)


def reference_bleu4(generated, references):
    matches, totals = np.zeros(4), np.zeros(4)
    candidate_length = reference_length = 0
    for candidate, reference in zip(generated, references, strict=True):
        candidate, reference = candidate.split(), reference.split()
        candidate_length += len(candidate)
        reference_length += len(reference)
        for n in range(1, 5):
            candidate_ngrams = Counter(tuple(candidate[i:i + n])
                                       for i in range(len(candidate) - n + 1))
            reference_ngrams = Counter(tuple(reference[i:i + n])
                                       for i in range(len(reference) - n + 1))
            matches[n - 1] += sum((candidate_ngrams & reference_ngrams).values())
            totals[n - 1] += max(len(candidate) - n + 1, 0)
    brevity = min(1.0, math.exp(1 - reference_length / candidate_length))
    return 100 * brevity * math.exp(np.mean(np.log(matches / totals)))


def test_bleu4_matches_an_independent_computation():
    generated, references = zip(*PLAIN_PAIRS, strict=True)
    assert text_metrics.bleu4(generated, references) == pytest.approx(
        reference_bleu4(generated, references), rel=1e-9)
    assert text_metrics.bleu4(references, references) == pytest.approx(100.0)


def lcs_length(a, b):
    table = np.zeros((len(a) + 1, len(b) + 1), int)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1, j + 1] = table[i, j] + 1 if x == y else max(table[i, j + 1],
                                                                       table[i + 1, j])
    return table[-1, -1]


def test_rouge_l_matches_an_independent_lcs():
    pairs = PLAIN_PAIRS + (("Severe (80%) stenosis: mid-LAD.", "mid LAD, severe 80% lesion"),)
    generated, references = zip(*pairs, strict=True)
    scores = []
    for candidate, reference in pairs:
        candidate = candidate.lower().replace("(", " ").replace(")", " ").replace("%", " ")
        candidate = candidate.replace(":", " ").replace("-", " ").replace(".", " ").split()
        reference = reference.lower().replace(",", " ").replace("%", " ").split()
        lcs = lcs_length(candidate, reference)
        precision, recall = lcs / len(candidate), lcs / len(reference)
        scores.append(2 * precision * recall / (precision + recall))
    assert text_metrics.rouge_l(generated, references) == pytest.approx(np.mean(scores))
    assert text_metrics.rouge_l(references, references) == pytest.approx(1.0)


def reference_cider_d(generated, references, sigma=6.0):
    """CIDEr-D in matrix form: per n, [examples, vocabulary] count matrices."""
    candidate_tokens = [text_metrics.cider_tokens(t) for t in generated]
    reference_tokens = [text_metrics.cider_tokens(t) for t in references]
    num_examples = len(references)
    scores = np.zeros((num_examples, 4))
    for n in range(1, 5):
        grams = lambda tokens, n=n: [tuple(tokens[i:i + n])
                                     for i in range(len(tokens) - n + 1)]
        vocabulary = sorted({g for tokens in candidate_tokens + reference_tokens
                             for g in grams(tokens)})
        column = {g: i for i, g in enumerate(vocabulary)}
        candidate_counts = np.zeros((num_examples, len(vocabulary)))
        reference_counts = np.zeros((num_examples, len(vocabulary)))
        for row, (cand, ref) in enumerate(zip(candidate_tokens, reference_tokens, strict=True)):
            for g in grams(cand):
                candidate_counts[row, column[g]] += 1
            for g in grams(ref):
                reference_counts[row, column[g]] += 1
        document_frequency = (reference_counts > 0).sum(axis=0)
        idf = np.log(num_examples) - np.log(np.maximum(document_frequency, 1))
        candidate_weights, reference_weights = candidate_counts * idf, reference_counts * idf
        clipped = np.minimum(candidate_weights, reference_weights) * reference_weights
        norms = (np.linalg.norm(candidate_weights, axis=1)
                 * np.linalg.norm(reference_weights, axis=1))
        cosine = np.divide(clipped.sum(axis=1), norms, out=np.zeros(num_examples),
                           where=norms > 0)
        length_delta = np.array([len(c) - len(r) for c, r in zip(candidate_tokens,
                                                                  reference_tokens,
                                                                  strict=True)])
        scores[:, n - 1] = cosine * np.exp(-length_delta ** 2 / (2 * sigma ** 2))
    return float(np.mean(10 * scores.mean(axis=1)))


def test_cider_d_hand_computed():
    # idf = log 2 for every n-gram; example 0 matches exactly on n = 1, 2 (no 3-, 4-grams):
    # 10 * (1 + 1) / 4 = 5. Example 1: unigram cosine 1/2 ('c' shared), nothing else:
    # 10 * 0.5 / 4 = 1.25. Corpus: 3.125.
    assert text_metrics.cider_d(["a b", "a c"], ["a b", "c d"]) == pytest.approx(3.125)
    # An n-gram in every reference has idf 0; a corpus of one example scores 0.
    assert text_metrics.cider_d(["a b"], ["a b"]) == 0.0


def test_cider_d_identical_unrelated_and_order():
    references = ["severe stenosis of the mid lad with heavy calcification",
                  "the right coronary artery is occluded at its origin",
                  "mild irregularities in the first obtuse marginal branch"]
    assert text_metrics.cider_d(references, references) == pytest.approx(10.0)
    unrelated = ["no words shared here", "completely different tokens again", "zzz yyy xxx"]
    assert text_metrics.cider_d(unrelated, references) == 0.0
    scrambled = [" ".join(reversed(r.split())) for r in references]
    order_score = text_metrics.cider_d(scrambled, references)
    # Same words (unigram cosine 1), but no shared 2-, 3-, 4-grams: 10 * 1/4.
    assert order_score == pytest.approx(2.5)
    # Clipping: a repeated word cannot earn more than its reference weight.
    repeated = ["severe severe severe severe stenosis of the mid lad", *references[1:]]
    assert text_metrics.cider_d(repeated, references) < 10.0


def test_cider_d_matches_an_independent_computation():
    rng = np.random.default_rng(7)
    vocabulary = ["the", "lad", "rca", "mid", "severe", "mild", "80", "%", "stenosis", "of"]
    sentence = lambda: " ".join(rng.choice(vocabulary, size=rng.integers(1, 14)))
    generated = [sentence() for _ in range(25)]
    references = [sentence() for _ in range(25)]
    references[3] = generated[3]
    assert text_metrics.cider_d(generated, references) == pytest.approx(
        reference_cider_d(generated, references), rel=1e-12)
    assert text_metrics.cider_tokens("Severe 80.5% stenosis, mid-LAD.") == [
        "severe", "80.5", "%", "stenosis", "mid", "lad"]


def coco_cider(generated, references):
    """coco-caption's CIDEr-D (pycocoevalcap's ``Cider``) on our tokens, joined by spaces
    as its tokeniser's output would be."""
    joined = lambda text: " ".join(text_metrics.cider_tokens(text))
    score, _ = Cider().compute_score({i: [joined(r)] for i, r in enumerate(references)},
                                     {i: [joined(g)] for i, g in enumerate(generated)})
    return float(score)


def test_cider_d_equals_coco_captions_cider():
    rng = np.random.default_rng(11)

    def random_findings():
        lesions = {}
        for segment in rng.choice(reports.SEGMENTS, size=rng.integers(0, 4), replace=False):
            percent = float(rng.choice([30, 45, 55, 70, 80, 90, 100]))
            lesions[str(segment)] = Lesion(percent, cto=percent == 100 and rng.random() < 0.5)
        return Findings(lesions, str(rng.choice(reports.DOMINANCES)))

    findings = [random_findings() for _ in range(40)]
    references = [rendered(f, i) for i, f in enumerate(findings)]
    perturbations = (
        lambda i, text: rendered(findings[i], 1000 + i),  # the same findings, other phrasing
        lambda i, text: rendered(findings[(i + 1) % len(findings)], 2000 + i),  # another's
        lambda i, text: text.replace("0", "5"),  # other percents
        lambda i, text: " ".join(text.split()[:6] + text.split()),  # repeats: clipping
        lambda i, text: " ".join(text.split()[:int(rng.integers(1, 8))]),  # truncated
    )
    generated = [perturbations[i % 5](i, text) for i, text in enumerate(references)]
    generated[:3] = ["", "Normal", references[2]]  # empty, one token, exact
    references[5] = "Normal."  # one token against a whole report
    for size in (2, 7, 40):  # the IDF weights of corpora of different sizes
        ours = text_metrics.cider_d(generated[:size], references[:size])
        assert abs(ours - coco_cider(generated[:size], references[:size])) <= 1e-12, size
    assert 1 < ours < 9


def test_text_metrics_keys_and_errors():
    generated, references = zip(*PLAIN_PAIRS, strict=True)
    metrics = text_metrics.text_metrics(generated, references)
    assert set(metrics) == {"bleu4", "rouge_l", "cider_d"}
    assert 0 < metrics["bleu4"] < 100 and 0 < metrics["rouge_l"] < 1
    with pytest.raises(ValueError, match="must pair up"):
        text_metrics.cider_d(["a"], ["a", "b"])
    with pytest.raises(TypeError, match=r"references\[0\]"):
        text_metrics.bleu4(["a"], [None])
