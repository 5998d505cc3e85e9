"""Location tokens (deepcoro_jax/domain/locations.py): the box round trip, IoU, the vocabulary,
lesion phrases, the per-clip lesion targets and the task sequences with their loss masks."""

import numpy as np
import pytest

from deepcoro_jax.domain import locations, reports, tokenizers

REPORTS = [
    "Right dominant circulation. Critical 90% stenosis of the proximal LAD.",
    "Left dominant circulation. Mild 30% stenosis of the mid RCA.",
    "Codominant circulation. Chronic total occlusion of the distal LCx.",
    "Total occlusion of the first diagonal. Moderate 55.5% stenosis of the left main.",
] * 5


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sp") / "spm.model")
    return tokenizers.get_tokenizer(tokenizers.train_sentencepiece(REPORTS, path, vocab_size=150))


def random_boxes(rng, n):
    corners = rng.uniform(0, 1, (n, 2, 2))
    low, high = corners.min(1), corners.max(1)
    return np.concatenate([low, high], axis=1)  # (y0, x0, y1, x1)


@pytest.mark.parametrize("num_bins", [2, 64, 1000, 1024])
def test_box_round_trip_is_exact_to_half_a_bin(num_bins):
    rng = np.random.default_rng(num_bins)
    boxes = np.concatenate([random_boxes(rng, 500), [[0, 0, 1, 1], [0.5, 0.5, 0.5, 0.5]]])
    bins = locations.box_to_tokens(boxes, num_bins)
    assert bins.dtype == np.int32 and bins.min() >= 0 and bins.max() < num_bins
    back = locations.tokens_to_box(bins, num_bins)
    assert np.abs(back - boxes).max() <= 0.5 / num_bins + 1e-7
    # Bin k holds [k / n, (k + 1) / n): its centre maps back to itself.
    np.testing.assert_array_equal(locations.box_to_tokens(back, num_bins), bins)


def test_bad_boxes_are_named_errors():
    with pytest.raises(ValueError, match=r"y0 <= y1"):
        locations.box_to_tokens([0.5, 0.1, 0.4, 0.2], 10)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        locations.box_to_tokens([0.1, 0.1, 1.2, 0.2], 10)
    with pytest.raises(ValueError, match="4 numbers"):
        locations.box_to_tokens([0.1, 0.1, 0.2], 10)
    with pytest.raises(ValueError, match=r"bins must be in"):
        locations.tokens_to_box([0, 0, 10, 3], 10)


def test_iou_equals_counting_cells_on_a_fine_grid():
    """IoU against an independent computation: boxes rasterised on a 400 x 400 grid of
    cells whose edges are the boxes' own coordinates' multiples of 1/400."""
    rng = np.random.default_rng(1)
    grid = 400
    a = np.round(random_boxes(rng, 50) * grid) / grid
    b = np.round(random_boxes(rng, 50) * grid) / grid
    b[:10] = a[:10]  # identical boxes: IoU 1
    centres = (np.arange(grid) + 0.5) / grid

    def raster(box):
        inside_y = (centres >= box[0]) & (centres < box[2])
        inside_x = (centres >= box[1]) & (centres < box[3])
        return inside_y[:, None] & inside_x[None, :]

    for box_a, box_b, value in zip(a, b, locations.iou(a, b), strict=True):
        ra, rb = raster(box_a), raster(box_b)
        union = (ra | rb).sum()
        expected = (ra & rb).sum() / union if union else 0.0
        assert value == pytest.approx(expected, abs=1e-9)
    assert locations.iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0
    # Broadcasting: one box against many.
    assert locations.iou(a[0], a).shape == (50,)


def test_vocabulary_layout_and_box_ids_read_back(tok):
    vocab = locations.LocationVocab(tok.vocab_size, num_bins=64, num_times=8)
    assert vocab.size == tok.vocab_size + 2 + 8 + 64
    ids = {vocab.task_id("aref"), vocab.task_id("gcap")}
    assert min(ids) == tok.vocab_size and len(ids) == 2
    box = np.array([0.1, 0.2, 0.55, 0.9])
    frame_and_box = vocab.read_box(vocab.box_ids(5, box))
    assert frame_and_box[0] == 5
    assert np.abs(frame_and_box[1] - box).max() <= 0.5 / 64
    masks = vocab.box_step_masks()
    assert masks.shape == (5, vocab.size)
    assert all(masks[i, t] for i, t in enumerate(vocab.box_ids(7, box)))
    assert not masks[:, : vocab.time_start].any()  # no text, EOS or task id in a box
    # What is not a box: a text id, coordinates before the time, a reversed box.
    assert vocab.read_box([3] + vocab.box_ids(0, box)[1:]) is None
    assert vocab.read_box(vocab.box_ids(0, box)[1:] + vocab.box_ids(0, box)[:1]) is None
    reversed_box = vocab.box_ids(0, box)
    reversed_box[1], reversed_box[3] = reversed_box[3], reversed_box[1]
    assert vocab.read_box(reversed_box) is None
    with pytest.raises(ValueError, match="outside the clip"):
        vocab.box_ids(8, box)


def test_location_tokenizer_decodes_text_and_location_ids(tok):
    loc = locations.LocationTokenizer(tok, num_bins=16, num_times=4)
    assert loc.vocab_size == tok.vocab_size + 2 + 4 + 16
    assert (loc.bos_id, loc.eos_id, loc.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    phrase = "Critical 90% stenosis of the proximal LAD."
    ids = [loc.vocab.task_id("gcap"), *loc.vocab.box_ids(2, [0, 0.25, 0.5, 1.0]),
           *tok.encode(phrase), tok.eos_id, loc.vocab.coord_start]
    assert loc.decode(ids) == f"<gcap> <t02> <loc0000> <loc0004> <loc0008> <loc0015> {phrase}"
    assert loc.decode(tok.encode(REPORTS[0])) == REPORTS[0]


@pytest.mark.parametrize("segment", reports.SEGMENTS)
def test_lesion_phrases_read_back(segment):
    for percent in (25, 55.5, 70, 90, 99, 100):
        phrase = locations.lesion_phrase(segment, percent)
        assert locations.read_phrase(phrase) == (segment, float(percent)), phrase
    assert locations.read_phrase("No significant coronary artery disease.") is None
    two = locations.lesion_phrase("prox_lad", 90) + " " + locations.lesion_phrase("mid_rca", 50)
    assert locations.read_phrase(two) is None


def test_clip_lesions_take_each_segments_box_nearest_the_middle():
    boxes = np.array([[0.1, 0.1, 0.2, 0.2], [0.3, 0.3, 0.4, 0.4], [0.5, 0.5, 0.6, 0.6],
                      [0.0, 0.0, 0.9, 0.9], [0.2, 0.2, 0.3, 0.3], [0.6, 0.6, 0.7, 0.7]])
    segments = [b"mid_rca", b"mid_rca", b"mid_rca", b"prox_lad", b"prox_lad", b"d1"]
    percents = [90, 90, 90, 50, 50, 100]
    frames = [0, 3, 4, 2, 7, 3]
    visible = [True, True, True, True, True, False]
    found = locations.clip_lesions(segments, percents, frames, boxes, visible, num_frames=8)
    # SEGMENTS order; the middle of 8 frames is 3.5: frames 3 and 4 tie, the earlier wins.
    assert [(c.segment, c.percent, c.frame) for c in found] == [
        ("prox_lad", 50.0, 2), ("mid_rca", 90.0, 3)]
    np.testing.assert_array_equal(found[1].box, boxes[1])
    assert locations.clip_lesions([], [], [], np.zeros([0, 4]), [], 8) == []


def test_task_sequences_and_loss_masks(tok):
    vocab = locations.LocationVocab(tok.vocab_size, num_bins=32, num_times=8)
    lesion = locations.ClipLesion("prox_lad", 90.0, 4, np.array([0.1, 0.2, 0.3, 0.4]))
    phrase = tok.encode(locations.lesion_phrase("prox_lad", 90.0))
    box = vocab.box_ids(4, lesion.box)
    ids = dict(bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    max_len = 96

    prefix, target = locations.task_tokens("aref", vocab, tok, REPORTS[0], lesion)
    assert prefix == [vocab.task_id("aref"), *phrase] and target == box
    inp, out, mask = locations.teacher_forcing(prefix, target, max_len, **ids)
    n = len(prefix) + len(target) + 1
    np.testing.assert_array_equal(out[:n], [*prefix, *box, tok.eos_id])
    np.testing.assert_array_equal(inp[:n], [tok.bos_id, *prefix, *box])
    assert (out[n:] == tok.pad_id).all() and (inp[n:] == tok.pad_id).all()
    # The loss sees the 5 box ids and EOS only: not the task id, the phrase or the pads.
    np.testing.assert_array_equal(np.flatnonzero(mask), np.arange(len(prefix), n))

    prefix, target = locations.task_tokens("gcap", vocab, tok, REPORTS[0], lesion)
    assert prefix == [vocab.task_id("gcap")] and target == box + phrase
    _, out, mask = locations.teacher_forcing(prefix, target, max_len, **ids)
    assert mask.sum() == len(box) + len(phrase) + 1 and not mask[0]

    # Captioning: no prefix, exactly tokenize_caption's encoding (written out here).
    report = tok.encode(REPORTS[0])
    inp, out, mask = locations.teacher_forcing(*locations.task_tokens(
        "cap", vocab, tok, REPORTS[0], None), max_len, **ids)
    np.testing.assert_array_equal(out[: len(report) + 1], [*report, tok.eos_id])
    np.testing.assert_array_equal(inp[: len(report) + 1], [tok.bos_id, *report])
    assert mask.sum() == len(report) + 1 and mask[0]
    # Cut at max_len: no EOS, the mask covers what is left of the target.
    inp, out, mask = locations.teacher_forcing([7, 8], list(range(10, 30)), 10, **ids)
    np.testing.assert_array_equal(out, [7, 8, *range(10, 18)])
    assert tok.eos_id not in out and mask.sum() == 8
    with pytest.raises(ValueError, match="needs a lesion"):
        locations.task_tokens("aref", vocab, tok, REPORTS[0], None)


def test_task_weights_keep_the_used_tasks_and_name_bad_ones():
    assert locations.task_weights({"cap": 1, "aref": 0, "gcap": 0.5}) == {"cap": 1.0, "gcap": 0.5}
    for tasks, message in (({"cap": 1, "vqa": 1}, "unknown tasks"),
                           ({"cap": -1, "aref": 1}, "'cap'"),
                           ({"cap": float("nan")}, "'cap'"),
                           ({"cap": 0, "aref": 0}, "at least one")):
        with pytest.raises(ValueError, match=message):
            locations.task_weights(tasks)
