"""The grounding evaluator's scores (evaluators/grounding.py) on a perfect, an adversarial
and a partly unreadable predictor, against IoU and priors computed here independently."""

import numpy as np
import pytest

from deepcoro_jax.domain import locations, reports, tokenizers
from evaluators import grounding

PHRASES = [locations.lesion_phrase(s, p) for s in reports.SEGMENTS for p in (30, 55, 75, 95, 100)]
BINS, FRAMES, VIDEOS, SLOTS = 64, 8, 12, 3


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sp") / "spm.model")
    base = tokenizers.get_tokenizer(tokenizers.train_sentencepiece(PHRASES * 3, path, 200))
    return locations.LocationTokenizer(base, BINS, FRAMES)


def numpy_iou(a, b):
    """IoU of two boxes (y0, x0, y1, x1), written out."""
    inter_h = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_w = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_h * inter_w
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def targets(seed=0):
    """Videos with 1-3 lesions each, every box in the upper-left quarter of the frame."""
    rng = np.random.default_rng(seed)
    valid = np.arange(SLOTS)[None, :] < rng.integers(1, SLOTS + 1, VIDEOS)[:, None]
    low = rng.uniform(0.0, 0.2, (VIDEOS, SLOTS, 2))
    size = rng.uniform(0.15, 0.25, (VIDEOS, SLOTS, 2))
    boxes = np.concatenate([low, low + size], axis=-1).astype(np.float32)
    segment = np.stack([rng.choice(len(reports.SEGMENTS), SLOTS, replace=False)
                        for _ in range(VIDEOS)])
    percent = rng.choice([30.0, 75.0, 95.0, 100.0], (VIDEOS, SLOTS)).astype(np.float32)
    return {
        "row": np.arange(VIDEOS), "lesion_valid": valid, "lesion_box": boxes,
        "lesion_frame": rng.integers(0, FRAMES, (VIDEOS, SLOTS)).astype(np.int32),
        "lesion_segment": np.where(valid, segment, -1).astype(np.int32),
        "lesion_percent": percent,
    }


def predictions(tok, out, move=lambda box: box, gcap_slot=0, gcap_segment=None):
    """AREF tokens of each lesion's (moved) box, and GCAP tokens naming one lesion per video."""
    vocab = tok.vocab
    aref = np.full((VIDEOS, SLOTS, 5), tok.pad_id, np.int32)
    gcap = np.full((VIDEOS, 5 + 64), tok.pad_id, np.int32)
    for v in range(VIDEOS):
        for m in range(SLOTS):
            if out["lesion_valid"][v, m]:
                aref[v, m] = vocab.box_ids(out["lesion_frame"][v, m], move(out["lesion_box"][v, m]))
        segment = gcap_segment or reports.SEGMENTS[out["lesion_segment"][v, gcap_slot]]
        phrase = tok.encode(locations.lesion_phrase(segment, out["lesion_percent"][v, gcap_slot]))
        ids = [*vocab.box_ids(0, move(out["lesion_box"][v, gcap_slot])), *phrase, tok.eos_id]
        gcap[v, : len(ids)] = ids
    return {**out, "aref_tokens": aref, "gcap_tokens": gcap}


def prior_for(out):
    """A prior whose boxes are the lower-right quarter: wrong for every target."""
    segments = list(reports.SEGMENTS)
    boxes = np.tile([[0.6, 0.6, 0.9, 0.9]], (len(segments), 1))
    return grounding.BoxPrior(segments, [("left",)] * len(segments), [75.0] * len(segments), boxes)


def test_a_perfect_predictor_scores_one(tok):
    out = targets()
    metrics, lines = grounding.score(predictions(tok, out), [("left",)] * VIDEOS, prior_for(out),
                                     tok)
    assert metrics["num_lesions"] == out["lesion_valid"].sum() == len(lines)
    for key in ("aref_accuracy@0.5", "aref_read_rate", "aref_frame_accuracy", "gcap_accuracy",
                "gcap_phrase_accuracy"):
        assert metrics[key] == 1.0, key
    # Mean IoU: the bins' centres against the targets, computed here.
    expected = []
    for v, m in zip(*np.nonzero(out["lesion_valid"]), strict=True):
        box = out["lesion_box"][v, m]
        centres = (np.minimum(np.floor(box * BINS), BINS - 1) + 0.5) / BINS
        expected.append(numpy_iou(centres, box))
    assert metrics["aref_mean_iou"] == pytest.approx(np.mean(expected), abs=1e-6)
    assert metrics["prior_aref_accuracy@0.5"] == 0.0 and metrics["prior_gcap_accuracy"] == 0.0
    groups = {k.split("/")[1] for k in metrics if k.startswith("aref_accuracy@0.5/")}
    assert groups and all(metrics[f"aref_accuracy@0.5/{g}"] == 1.0 for g in groups)


def test_an_adversarial_predictor_scores_zero(tok):
    out = targets(1)
    mirrored = lambda box: np.array([1 - box[2], 1 - box[3], 1 - box[0], 1 - box[1]])
    wrong = predictions(tok, out, move=mirrored)
    metrics, _ = grounding.score(wrong, [("left",)] * VIDEOS, prior_for(out), tok)
    assert metrics["aref_accuracy@0.5"] == 0.0 and metrics["aref_mean_iou"] == 0.0
    assert metrics["gcap_accuracy"] == 0.0 and metrics["gcap_phrase_accuracy"] == 1.0
    # The right box with the wrong phrase is wrong too.
    absent = next(s for s in reports.SEGMENTS if s not in {
        reports.SEGMENTS[i] for i in out["lesion_segment"][out["lesion_valid"]]})
    metrics, _ = grounding.score(predictions(tok, out, gcap_segment=absent),
                                 [("left",)] * VIDEOS, prior_for(out), tok)
    assert metrics["gcap_accuracy"] == 0.0 and metrics["gcap_phrase_accuracy"] == 0.0
    assert metrics["aref_accuracy@0.5"] == 1.0


def test_unreadable_boxes_score_zero_and_are_counted(tok):
    out = targets(2)
    predicted = predictions(tok, out)
    first = tuple(np.argwhere(out["lesion_valid"])[0])
    predicted["aref_tokens"][first] = [5, 6, 7, 8, 9]  # text ids, no box
    metrics, lines = grounding.score(predicted, [("left",)] * VIDEOS, prior_for(out), tok)
    total = out["lesion_valid"].sum()
    assert metrics["aref_read_rate"] == pytest.approx((total - 1) / total)
    assert metrics["aref_accuracy@0.5"] == pytest.approx((total - 1) / total)
    assert lines[0][grounding.CSV_COLUMNS.index("iou")] == 0.0


def test_priors_and_chance_against_counting():
    rng = np.random.default_rng(3)
    segments = ["prox_lad"] * 4 + ["mid_rca"] * 3
    views = [("left", "1"), ("left", "1"), ("left", "2"), ("left", "2"), ("right", "1"),
             ("right", "1"), ("right", "2")]
    percents = [90, 90, 50, 95, 100, 30, 100]
    low = rng.uniform(0, 0.5, (7, 2))
    boxes = np.concatenate([low, low + 0.3], axis=1)
    prior = grounding.BoxPrior(segments, views, percents, boxes)
    np.testing.assert_allclose(prior.box("prox_lad", ("left", "1")), boxes[:2].mean(0))
    np.testing.assert_allclose(prior.box("prox_lad", ("left", "9")), boxes[:4].mean(0))
    np.testing.assert_allclose(prior.box("d1", ("left", "1")), boxes.mean(0))
    assert prior.finding(("left", "1"))[:2] == ("prox_lad", "critical")
    assert prior.finding(("right", "2"))[:2] == ("mid_rca", "occluded")
    target = np.concatenate([rng.uniform(0, 0.5, (20, 2)), rng.uniform(0.5, 1, (20, 2))], 1)
    target = target[:, [0, 1, 2, 3]]
    expected = np.mean([[numpy_iou(t, b) >= 0.5 for b in boxes] for t in target])
    assert grounding.chance_accuracy(boxes, target) == pytest.approx(expected)


def test_the_oracle_is_the_targets_written_in_the_bins(tok):
    """The ceiling: for boxes smaller than two bins, quantising alone costs IoU."""
    out = targets(4)
    metrics, _ = grounding.score(predictions(tok, out), [("left",)] * VIDEOS, prior_for(out), tok)
    # A perfect predictor writes the same bins: it scores the oracle exactly.
    assert metrics["aref_mean_iou"] == pytest.approx(metrics["oracle_aref_mean_iou"])
    tiny = targets(5)
    tiny["lesion_box"][..., 2:] = tiny["lesion_box"][..., :2] + 1.2 / BINS  # 1.2 bins wide
    metrics, _ = grounding.score(predictions(tok, tiny), [("left",)] * VIDEOS, prior_for(tiny),
                                 tok)
    expected = []
    for v, m in zip(*np.nonzero(tiny["lesion_valid"]), strict=True):
        box = tiny["lesion_box"][v, m]
        centres = (np.minimum(np.floor(box * BINS), BINS - 1) + 0.5) / BINS
        expected.append(numpy_iou(centres, box) >= 0.5)
    assert metrics["oracle_aref_accuracy@0.5"] == pytest.approx(np.mean(expected))
    assert metrics["oracle_aref_accuracy@0.5"] < 1.0
