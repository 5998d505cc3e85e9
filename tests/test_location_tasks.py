"""LocCa's location tasks end to end on the tiny synthetic set: the task sequences the
pipeline builds from the augmented boxes, the grounding evaluator on 1 and 8 devices,
and ``inference.ground_lesions`` against a step-by-step restricted argmax."""

import csv
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from evaltools import init_params, make_context, micro_config

from deepcoro_jax.domain import locations, reports, tokenizers
from deepcoro_jax.models.locca import shift_right
from evaluators import common, grounding

SPLIT = "train"  # the tiny set's largest split: its val split may show no lesion
TRAIN_PP = (
    "decode_sample_frames(4, stride=2, train=True)|random_resized_crop(32, scale=(0.7, 1.0))"
    "|scale_rotate_jitter(0.05, 5.0)|value_range(-1, 1)"
)
BINS = 16


def _seeded(example, seed):
    import tensorflow as tf

    from input_pipeline import ops

    tensors = {k: tf.constant(v) for k, v in example.items() if k not in ("labels", "lesions")}
    tensors["lesions"] = {k: tf.constant(v) for k, v in example["lesions"].items()}
    tensors[ops.SEED_KEY] = tf.constant([seed, 7], tf.int64)
    return tensors


def _floor_bins(box):
    """Coordinate bins, written out: floor(v * bins), 1.0 in the last bin."""
    return [min(int(np.floor(v * BINS)), BINS - 1) for v in box]


@pytest.fixture(scope="module")
def task_examples(synthetic_data):
    """For train examples that show lesions and 12 seeds each: the clip's lesions after the
    augmentation, and the locca_task outputs drawn with the same seed."""
    from input_pipeline import dataset_format, location_ops, ops  # noqa: F401 (its ops)

    spec = dataset_format.tokenizer_spec(synthetic_data)
    lesions_pp = ops.get_preprocess_fn(TRAIN_PP)
    task_pp = ops.get_preprocess_fn(
        f"{TRAIN_PP}|locca_task(160, tasks={{'cap': 1, 'aref': 1, 'gcap': 2}}, num_bins={BINS}, "
        f"tokenizer='{spec}')")
    out = []
    split = dataset_format.read_split(synthetic_data, SPLIT).as_numpy_iterator()
    for index, example in enumerate(split):
        if not len(example["lesions"]["segment"]):
            continue
        for seed in range(100 * index, 100 * index + 12):
            augmented = lesions_pp(_seeded(example, seed))["lesions"]
            lesions = {k: v.numpy() for k, v in augmented.items()}
            found = locations.clip_lesions(
                lesions["segment"], lesions["severity"], lesions["clip_frame"], lesions["box"],
                lesions["visible"], 4)
            task = {k: v.numpy() for k, v in task_pp(_seeded(example, seed)).items()
                    if k.startswith("caption_") or k == "locca_task"}
            out.append((example["report"].decode(), found, task))
    return tokenizers.get_tokenizer(spec), out


def test_task_sequences_are_the_augmented_clips_lesions(task_examples):
    tok, examples = task_examples
    vocab = locations.LocationVocab(tok.vocab_size, BINS, 4)
    counts = {task: 0 for task in locations.TASKS}
    for report, found, task in examples:
        name = locations.TASKS[int(task["locca_task"])]
        counts[name] += bool(found)
        out, inp, mask = task["caption_out"], task["caption_in"], task["caption_mask"]
        np.testing.assert_array_equal(inp[1:][mask[1:]], out[:-1][mask[1:]])
        assert inp[0] == tok.bos_id
        length = int(np.sum(out != tok.pad_id))
        if name == "cap":
            np.testing.assert_array_equal(out[:length], [*tok.encode(report), tok.eos_id])
            assert mask[:length].all() and not mask[length:].any()
            continue
        assert found, "a location task on a clip that shows no lesion"
        prefix_length = int(np.argmax(mask))
        prefix, target = out[:prefix_length], out[prefix_length:length]
        assert mask[prefix_length:length].all() and not mask[length:].any()
        # The lesion the task is about: one the clip shows, named by the phrase.
        phrase_ids = prefix[1:] if name == "aref" else target[5:-1]
        assert prefix[0] == vocab.base + locations.PREFIXED_TASKS.index(name)
        segment, percent = locations.read_phrase(tok.decode(phrase_ids.tolist()))
        (lesion,) = [c for c in found if c.segment == segment]
        assert percent == lesion.percent
        box_ids = target[:5]
        assert box_ids[0] == vocab.base + 2 + lesion.frame
        expected = [vocab.base + 2 + 4 + b for b in _floor_bins(lesion.box)]
        np.testing.assert_array_equal(box_ids[1:], expected)
        assert target[-1] == tok.eos_id
    # The weights 1:1:2, within 4 standard deviations of the binomial counts.
    shown = sum(counts.values())
    assert shown > 100
    for task, share in (("cap", 0.25), ("aref", 0.25), ("gcap", 0.5)):
        assert abs(counts[task] - shown * share) < 4 * np.sqrt(shown * share * (1 - share)), counts


@pytest.fixture(scope="module")
def evaluated(synthetic_data, tmp_path_factory):
    config = micro_config()
    out = {}
    for devices, batch_size in ((1, 4), (8, 8)):
        workdir = tmp_path_factory.mktemp("w")
        ctx = make_context(config, synthetic_data, str(workdir), devices)
        evaluator = grounding.Evaluator(ctx.predict_fns, ctx.spec, name="g", split=SPLIT,
                                        batch_size=batch_size)
        metrics = evaluator.run(init_params(ctx), 3)
        out[devices] = metrics, workdir / "grounding" / "g_3.csv", ctx, evaluator
    return out


def test_grounding_metrics_do_not_depend_on_devices_or_batch_size(evaluated):
    one, eight = evaluated[1][0], evaluated[8][0]
    assert one.keys() == eight.keys()
    for name, value in one.items():
        np.testing.assert_allclose(eight[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_grounding_metrics_equal_their_csv_recomputed(evaluated, synthetic_data):
    metrics, csv_path, ctx, _ = evaluated[1]
    lines = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert metrics["num_lesions"] == len(lines) > 0

    def box(line, prefix=""):
        return np.array([float(line[f"{prefix}{k}"]) for k in ("y0", "x0", "y1", "x1")])

    def numpy_iou(a, b):
        inter_h = max(0, min(a[2], b[2]) - max(a[0], b[0]))
        inter = inter_h * max(0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union if union > 0 else 0.0

    ious = []
    for line in lines:
        target = box(line)
        predicted = box(line, "pred_")
        value = 0.0 if np.isnan(predicted).any() else numpy_iou(predicted, target)
        assert float(line["iou"]) == pytest.approx(value, abs=2e-3)  # the CSV rounds to 1e-4
        ious.append(float(line["iou"]))
    ious = np.array(ious)
    assert metrics["aref_accuracy@0.5"] == pytest.approx(np.mean(ious >= 0.5), abs=1e-9)
    assert metrics["aref_mean_iou"] == pytest.approx(np.mean(ious), abs=1e-3)
    # The prior, recomputed: the mean stored box of the segment in the video's view over
    # the prior's split (the train split here too), and its IoU with each target.
    columns = ["system", "landmark", "magnification"]
    train = grounding.read_lesions(synthetic_data, SPLIT, columns)
    table = common.split_table(synthetic_data, SPLIT)
    prior_ious = []
    for line in lines:
        i = int(np.flatnonzero(table["row"] == int(line["row"]))[0])
        view = tuple(str(table[f"label/{c}"][i]) for c in columns)
        same = [b for s, v, b in zip(train["segment"], train["view"], train["box"], strict=True)
                if s == line["segment"] and v == view]
        prior_ious.append(numpy_iou(np.mean(same, axis=0), box(line)))
        assert float(line["prior_iou"]) == pytest.approx(prior_ious[-1], abs=2e-3)
    assert metrics["prior_aref_accuracy@0.5"] == pytest.approx(
        np.mean(np.array([float(line["prior_iou"]) for line in lines]) >= 0.5), abs=1e-9)
    assert metrics["prior_aref_mean_iou"] == pytest.approx(np.mean(prior_ious), abs=2e-3)


def test_ground_lesions_is_the_restricted_argmax_after_the_phrase(micro_run, synthetic_data):
    from deepcoro_jax.tools import inference
    from input_pipeline import dataset_format, ops

    run = inference.load_run(str(micro_run[0]))
    tok = run.caption_tokenizer
    example = next(dataset_format.read_split(synthetic_data, SPLIT).as_numpy_iterator())
    tensors = {k: v for k, v in _seeded(example, 0).items() if k not in ("lesions", "_seed")}
    clip = ops.get_preprocess_fn(f"{run.video_pp}|keep('video')")(tensors)["video"].numpy()
    named = [("prox_lad", 90.0), ("mid_rca", 100.0), ("om1", 55.5)]
    (grounded,) = inference.ground_lesions(run, clip[None], [named])
    base = tok.base_tokenizer.vocab_size
    time_ids = np.arange(base + 2, base + 2 + run.config.model.num_frames)
    coord_ids = np.arange(time_ids[-1] + 1, time_ids[-1] + 1 + run.config.model.location_bins)
    copies = jax.device_count()
    memory = run.predict["encode_video"](
        run.params, {"video": jnp.asarray(np.repeat(clip[None], copies, axis=0))})
    memory = {k: v[:1] for k, v in memory.items()}
    for lesion, (segment, percent) in zip(grounded, named, strict=True):
        sequence = [base, *tok.encode(locations.lesion_phrase(segment, percent))]
        assert (lesion.segment, lesion.percent) == (segment, percent)
        for allowed in [time_ids] + [coord_ids] * 4:
            targets = np.zeros((1, run.model.caption_decoder.max_len), np.int32)
            targets[0, : len(sequence)] = sequence
            copies = jax.device_count()  # one row per device: the predict functions split B
            logits = run.predict["caption_logits"](run.params, {
                "video_tokens": jnp.repeat(memory["video_tokens"], copies, axis=0),
                "video_token_mask": jnp.repeat(memory["video_token_mask"], copies, axis=0),
                "caption_in": shift_right(jnp.asarray(targets.repeat(copies, 0)), tok.bos_id),
            })["caption_logits"]
            row = np.asarray(jax.device_get(logits))[0, len(sequence)]
            sequence.append(int(allowed[np.argmax(row[allowed])]))
        frame = sequence[-5] - time_ids[0]
        bins = np.array(sequence[-4:]) - coord_ids[0]
        if bins[2] < bins[0] or bins[3] < bins[1]:
            assert lesion.box is None  # not a box: reported as unreadable
            continue
        assert lesion.frame == frame
        np.testing.assert_allclose(lesion.box, (bins + 0.5) / run.config.model.location_bins)
    assert reports.SEGMENT_NAMES[grounded[0].segment] == "proximal LAD"


def test_the_caption_term_splits_into_its_tasks(micro_run):
    """The shared micro run draws the recipe's tasks: each step logs the caption loss per
    task, and their token-weighted mean is the caption term."""
    import json

    records = [json.loads(line) for line in (micro_run[0] / "metrics.jsonl").read_text().split(
        "\n") if line.strip()]
    steps = [r for r in records if "loss/caption" in r]
    assert steps
    for record in steps:
        tokens = {t: record[f"caption_task/{t}_tokens"] for t in locations.TASKS}
        assert sum(tokens.values()) > 0
        mean = sum(record[f"caption_task/{t}"] * n for t, n in tokens.items() if n) / sum(
            tokens.values())
        assert mean == pytest.approx(record["loss/caption"], rel=1e-5)
        for task, n in tokens.items():
            assert (n == 0) == np.isnan(record[f"caption_task/{task}"])
