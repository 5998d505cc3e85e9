"""The captioning evaluator plugin: every example once, device independence, correct wiring.

The metric functions themselves are tested in test_caption_metrics.py; here the
plugin: one CSV line per video, the same numbers and reports on 1, 2 and 8
devices with different batch sizes, a perplexity equal to a NumPy computation
from the model's teacher-forced logits, beam search options that reach the
decoder, and the clinical metrics of a ``generate`` predict function forced to
write a known report.
"""

import csv
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from evaltools import EvalContext, init_params, make_context, micro_config

from deepcoro_jax.domain import reports
from evaluators import captioning, common

SPLIT = "train"  # the tiny set's largest split
STEP = 7
CAPTION_MAX_LEN = 40  # the val split's report is 34 tokens: a forced decoder can write it whole


def read_csv(ctx: EvalContext, name: str, step: int) -> list[dict[str, str]]:
    with open(os.path.join(ctx.spec.workdir, "captions", f"{name}_{step}.csv"), newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(synthetic_data, tmp_path_factory):
    """Greedy captioning of SPLIT on 8, 2 and 1 devices with batch sizes 8, 2, 4."""
    config = micro_config()
    config.input.caption_max_len = CAPTION_MAX_LEN
    out = {}
    for devices, batch_size in ((8, 8), (2, 2), (1, 4)):
        ctx = make_context(config, synthetic_data, str(tmp_path_factory.mktemp("w")), devices)
        params = init_params(ctx)
        evaluator = captioning.Evaluator(
            ctx.predict_fns, ctx.spec, name="cap", split=SPLIT, batch_size=batch_size
        )
        out[devices] = (evaluator.run(params, STEP), ctx, params)
    return out


def forced_generate(text: str, ctx: EvalContext) -> tuple[dict, list[int]]:
    """The predict functions with a ``generate`` that writes `text` for every video; its ids."""
    tokenizer = ctx.spec.caption_tokenizer
    ids = tokenizer.encode(text) + [tokenizer.eos_id]
    assert len(ids) <= CAPTION_MAX_LEN, text

    def generate(params, batch, *, bos_id, eos_id, pad_id, max_len, strategy, **options):
        assert (bos_id, eos_id, pad_id) == (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
        assert strategy == "greedy"
        row = np.full([max_len], pad_id, np.int32)
        row[: len(ids)] = ids
        return {"tokens": jnp.broadcast_to(row, (batch["video_tokens"].shape[0], max_len))}

    return {**ctx.predict_fns, "generate": generate}, ids


def test_csv_has_one_line_per_example(runs, synthetic_data):
    _, ctx, _ = runs[8]
    table = common.split_table(synthetic_data, SPLIT)
    lines = read_csv(ctx, "cap", STEP)
    assert list(lines[0]) == list(captioning.CSV_COLUMNS)
    assert [int(line["row"]) for line in lines] == table["row"].tolist()
    assert [line["reference"] for line in lines] == table["report"].tolist()
    assert [line["study_id"] for line in lines] == table["study_id"].tolist()


def test_results_do_not_depend_on_devices_or_batch_size(runs, synthetic_data):
    eight, ctx_eight, _ = runs[8]
    generated = [line["generated"] for line in read_csv(ctx_eight, "cap", STEP)]
    for devices in (2, 1):
        other, ctx, _ = runs[devices]
        assert [line["generated"] for line in read_csv(ctx, "cap", STEP)] == generated
        assert other.keys() == eight.keys()
        for name, value in eight.items():
            np.testing.assert_allclose(other[name], value, rtol=1e-5, err_msg=name)
    for name in ("bleu4", "rouge_l", "cider_d", "perplexity", "severity_macro_f1",
                 "baseline_severity_macro_f1", "baseline_severity_accuracy", "parse_rate",
                 "generated_length", "eos_rate"):
        assert name in eight, name
    assert eight["num_reports"] == len(common.split_table(synthetic_data, SPLIT)["row"])


def test_perplexity_equals_numpy_from_teacher_forced_logits(runs, synthetic_data):
    from input_pipeline import pipeline

    metrics, ctx, params = runs[1]
    model = ctx.model  # the test's own use of the model, which evaluators never get

    @jax.jit
    def caption_logits(params, batch):
        out, _ = model.apply({"params": params}, batch, train=False, mvm=False)
        return out["caption_logits"]  # [B, Lc, vocab]

    pp = ctx.spec.pp(text=True, caption=True)
    dataset = pipeline.make_eval_dataset(synthetic_data, SPLIT, pp, 4)
    total_nll, total_tokens = 0.0, 0
    for batch in dataset.as_numpy_iterator():
        logits = np.asarray(caption_logits(params, batch), np.float64)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        target_log_probs = np.take_along_axis(log_probs, batch["caption_out"][..., None], -1)
        weights = batch["caption_mask"] & batch["_mask"][:, None]  # [B, Lc]
        total_nll -= np.sum(target_log_probs[..., 0] * weights)
        total_tokens += int(weights.sum())
    np.testing.assert_allclose(metrics["nll"], total_nll / total_tokens, rtol=1e-5)
    np.testing.assert_allclose(metrics["perplexity"], np.exp(total_nll / total_tokens), rtol=1e-5)


def test_beam_options_reach_the_decoder(runs):
    # Beam search of width 1 without length penalty is greedy decoding.
    greedy_metrics, ctx, params = runs[8]
    evaluator = captioning.Evaluator(
        ctx.predict_fns, ctx.spec, name="beam", split=SPLIT, batch_size=8, strategy="beam",
        beam_size=1, length_penalty=0.0,
    )
    beam_metrics = evaluator.run(params, STEP)
    assert [line["generated"] for line in read_csv(ctx, "beam", STEP)] == [
        line["generated"] for line in read_csv(ctx, "cap", STEP)
    ]
    for name, value in greedy_metrics.items():
        np.testing.assert_allclose(beam_metrics[name], value, rtol=1e-5, err_msg=name)


def test_a_decoder_forced_to_write_the_reference_scores_one(runs, synthetic_data, monkeypatch):
    _, ctx, params = runs[8]
    # One reference for every video (the set's per-view reports differ): the split's first.
    reference = common.split_table(synthetic_data, "val")["report"][0]
    split_table = common.split_table

    def one_reference(data_dir, split):
        table = split_table(data_dir, split)
        return {**table, "report": np.full_like(table["report"], reference)}

    monkeypatch.setattr(common, "split_table", one_reference)
    predict_fns, ids = forced_generate(reference, ctx)
    evaluator = captioning.Evaluator(predict_fns, ctx.spec, name="forced", split="val",
                                     batch_size=8)
    metrics = evaluator.run(params, 0)
    for name in ("parse_rate", "severity_accuracy", "severity_macro_f1", "dominance_accuracy",
                 "baseline_severity_accuracy", "baseline_severity_macro_f1", "rouge_l", "eos_rate"):
        assert metrics[name] == 1.0, name
    assert metrics["stenosis_mae"] == 0.0
    assert metrics["bleu4"] == pytest.approx(100.0)
    assert metrics["generated_length"] == len(ids) - 1  # tokens before the EOS
    assert {line["generated"] for line in read_csv(ctx, "forced", 0)} == {reference}


def test_a_decoder_forced_to_write_the_common_report_scores_as_the_baseline(
    runs, synthetic_data
):
    _, ctx, params = runs[8]
    references = common.split_table(synthetic_data, SPLIT)["report"].tolist()
    common_report = captioning.most_common_report_baseline(references)[0]
    assert reports.parse(common_report).lesions == {}  # the formulas below rely on it
    predict_fns, _ = forced_generate(common_report, ctx)
    evaluator = captioning.Evaluator(predict_fns, ctx.spec, name="common", split=SPLIT,
                                     batch_size=8)
    metrics = evaluator.run(params, 0)
    # Independently: a report without lesions is right exactly on the normal segments.
    reference_classes = np.array([
        [reports.severity_class(reports.parse(text).stenosis(s)) for s in reports.SEGMENTS]
        for text in references
    ])  # [N, 17]
    is_normal = reference_classes == "normal"
    accuracy = is_normal.mean()
    normal_f1 = 2 * is_normal.sum() / (2 * is_normal.sum() + (~is_normal).sum())
    macro_f1 = normal_f1 / len(set(reference_classes.ravel().tolist()))  # other classes: F1 0
    assert accuracy < 1 and macro_f1 < 1
    for name, value in (("severity_accuracy", accuracy), ("severity_macro_f1", macro_f1)):
        np.testing.assert_allclose(metrics[name], value, rtol=1e-12, err_msg=name)
        np.testing.assert_allclose(metrics[f"baseline_{name}"], value, rtol=1e-12, err_msg=name)


def test_bad_options_name_the_config_key(runs):
    _, ctx, _ = runs[8]
    bad_options = {
        "strategy": dict(strategy="sample"),
        "beam_size": dict(strategy="beam", beam_size=0),
        "length_penalty": dict(length_penalty=-1.0),
        "max_len": dict(max_len=ctx.model.caption_decoder.max_len + 1),
        "batch_size": dict(batch_size=jax.device_count() + 1),
    }
    for key, options in bad_options.items():
        with pytest.raises(ValueError, match=f"config.evals.c.{key}"):
            captioning.Evaluator(ctx.predict_fns, ctx.spec, name="c", **options)
