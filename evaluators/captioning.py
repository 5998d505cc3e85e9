"""Report generation: clinical metrics of generated reports, and the captioning evaluator.

For: comparing generated reports with their references through what
`reports.parse_result` reads from both (stenosis per segment, severity class,
significant lesions, CTOs, dominance) and how often a generated report parses at
all; the "always write the most common report" baseline to compare against; and
``Evaluator`` (``type='captioning'`` in ``config.evals``), which writes a report
for every video of a split (greedy or beam search on the KV cache, batched and
jitted), scores it with these and the text metrics (text_metrics.py), measures
the teacher-forced perplexity of the references, and writes the reports to
``<workdir>/captions/<name>_<step>.csv``.

Not for: the decoding loops (deepcoro_jax/models/decode.py, run by the ``generate``
predict function of deepcoro_jax/training/run.py), the text-overlap metrics
(text_metrics.py), or the report schema and parser themselves
(deepcoro_jax/domain/reports.py).

Conventions of `clinical_metrics`:
- A generated report that does not parse (ParseResult.ok False) still counts in
  every metric below, as a report of no findings (all segments normal); its
  failure is also counted in `parse_rate`.
- Per-segment metrics run over all 17 reports.SEGMENTS of every pair; a segment
  the report does not mention has stenosis 0 (severity 'normal').
- A lesion is a segment with severity other than 'normal' (stenosis >= 1 %).
- F1 of a class is 2 TP / (2 TP + FP + FN). Severity macro-F1 averages it over the
  classes of reports.SEVERITIES that occur in the references or the predictions
  (classes absent from both are left out, so a split without CTOs is not rewarded
  or punished for them).
- A metric whose denominator is empty (no lesion in either report, no predicted
  significant lesion for precision, no reference CTO, no reference that states
  dominance) is left out of the dict rather than given a made-up value.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from deepcoro_jax import losses, paths
from deepcoro_jax.domain import reports
from evaluators import common, text_metrics


def _check_reports(texts: Sequence[str], name: str) -> None:
    if isinstance(texts, str):
        raise TypeError(f"{name} must be a sequence of str, got one str")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(text)}")
    if not texts:
        raise ValueError(f"{name} is empty")


def _f1(true_positives: int, false_positives: int, false_negatives: int) -> float:
    return 2 * true_positives / (2 * true_positives + false_positives + false_negatives)


def clinical_metrics(generated: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Per-segment clinical agreement of generated reports with their references.

    Keys (see the module docstring for the conventions):
    - parse_rate: fraction of generated reports that parse (ParseResult.ok).
    - stenosis_mae: mean |generated - reference| percent stenosis over all segments.
    - stenosis_mae_lesions: the same over segments where either report has a lesion.
    - severity_accuracy, severity_macro_f1: severity class (reports.severity_class)
      per segment.
    - significant_precision, significant_recall, significant_f1: significant lesions
      (reports.is_significant) per segment.
    - cto_recall: fraction of reference CTO segments that the generated report calls a
      CTO in the same segment; num_reference_cto: their count.
    - dominance_accuracy: over pairs whose reference states dominance, the fraction
      whose generated report states the same one (an unstated dominance is wrong,
      not read as the default 'right').
    - num_reports.
    """
    _check_reports(generated, "generated")
    _check_reports(references, "references")
    if len(generated) != len(references):
        raise ValueError(f"generated has {len(generated)} reports, references has "
                         f"{len(references)}: they must pair up")
    generated_parses = [reports.parse_result(text) for text in generated]
    reference_parses = [reports.parse_result(text) for text in references]
    generated_stenosis = np.array([[p.findings.stenosis(s) for s in reports.SEGMENTS]
                                   for p in generated_parses])  # [N, 17]
    reference_stenosis = np.array([[p.findings.stenosis(s) for s in reports.SEGMENTS]
                                   for p in reference_parses])  # [N, 17]
    metrics = {"parse_rate": float(np.mean([p.ok for p in generated_parses])),
               "num_reports": float(len(generated))}

    absolute_error = np.abs(generated_stenosis - reference_stenosis)
    metrics["stenosis_mae"] = float(absolute_error.mean())
    either_lesion = (generated_stenosis >= 1) | (reference_stenosis >= 1)
    if either_lesion.any():
        metrics["stenosis_mae_lesions"] = float(absolute_error[either_lesion].mean())

    classify = np.vectorize(reports.severity_class, otypes=[object])
    generated_class = classify(generated_stenosis)  # [N, 17]
    reference_class = classify(reference_stenosis)  # [N, 17]
    metrics["severity_accuracy"] = float(np.mean(generated_class == reference_class))
    class_f1s = []
    for severity in reports.SEVERITIES:
        predicted, actual = generated_class == severity, reference_class == severity
        if predicted.any() or actual.any():
            class_f1s.append(_f1(np.sum(predicted & actual), np.sum(predicted & ~actual),
                                 np.sum(~predicted & actual)))
    metrics["severity_macro_f1"] = float(np.mean(class_f1s))

    significant = np.vectorize(reports.is_significant, otypes=[bool])
    segments = np.array(reports.SEGMENTS)[None, :]  # [1, 17]
    generated_significant = significant(segments, generated_stenosis)  # [N, 17]
    reference_significant = significant(segments, reference_stenosis)  # [N, 17]
    true_positives = int(np.sum(generated_significant & reference_significant))
    false_positives = int(np.sum(generated_significant & ~reference_significant))
    false_negatives = int(np.sum(~generated_significant & reference_significant))
    if true_positives + false_positives:
        metrics["significant_precision"] = true_positives / (true_positives + false_positives)
    if true_positives + false_negatives:
        metrics["significant_recall"] = true_positives / (true_positives + false_negatives)
    if true_positives + false_positives + false_negatives:
        metrics["significant_f1"] = _f1(true_positives, false_positives, false_negatives)

    pairs = list(zip(generated_parses, reference_parses, strict=True))
    cto_found = [segment in gen.findings.lesions and gen.findings.lesions[segment].cto
                 for gen, ref in pairs
                 for segment, lesion in ref.findings.lesions.items() if lesion.cto]
    metrics["num_reference_cto"] = float(len(cto_found))
    if cto_found:
        metrics["cto_recall"] = float(np.mean(cto_found))

    dominance_correct = [gen.dominance_stated and gen.findings.dominance == ref.findings.dominance
                         for gen, ref in pairs if ref.dominance_stated]
    if dominance_correct:
        metrics["dominance_accuracy"] = float(np.mean(dominance_correct))
    return metrics


def most_common_report_baseline(references: Sequence[str]) -> list[str]:
    """The "always write the most common report" baseline, one per reference.

    The most common report is the one with the most common parsed findings (so
    differently phrased reports of the same findings count together; ties go to the
    findings seen first), written as the first reference text with those findings.
    Score it with `clinical_metrics(most_common_report_baseline(refs), refs)`.
    """
    _check_reports(references, "references")
    # Findings hold a dict, so they are counted by a hashable key.
    keys = [(f.dominance, tuple(f.lesions.items()))
            for f in (reports.parse(text) for text in references)]
    counts = Counter(keys)
    most_common = max(counts, key=counts.__getitem__)  # first seen among equal counts
    text = references[keys.index(most_common)]
    return [text] * len(references)


STRATEGIES = ("greedy", "beam")
CSV_COLUMNS = ("study_id", "row", "reference", "generated")


@common.register("captioning")
class Evaluator(common.Evaluator):
    """Writes a report for every video of a split and scores it against the study's report.

    One jitted function per batch encodes the videos once (``encode_video``),
    decodes a report from the encoder tokens on the KV cache (``generate``:
    ``strategy`` 'greedy', or 'beam' with ``beam_size`` and ``length_penalty``; at
    most ``max_len`` tokens, default ``config.input.caption_max_len``), and scores
    the reference under teacher forcing (``caption_logits``). Metrics, all over
    the split's videos:

    - bleu4, rouge_l, cider_d: ``text_metrics.text_metrics``;
    - every key of ``clinical_metrics(generated, references)``;
    - baseline_severity_macro_f1, baseline_severity_accuracy: the same two for
      ``most_common_report_baseline(references)`` (the split's most common report
      written for every video), the number to beat;
    - nll, perplexity: the teacher-forced cross-entropy (no label smoothing) of
      the references' caption targets (``tokenize_caption`` at
      ``config.input.caption_max_len``: tokens then EOS, truncated), summed over
      the split and divided by their token count; perplexity = exp(nll);
    - generated_length: mean tokens of a generated report before its EOS
      (``max_len`` for one that never emits EOS); eos_rate: the fraction of
      generated reports that end with EOS.

    Process 0 writes ``<workdir>/captions/<name>_<step>.csv`` with the columns
    ``CSV_COLUMNS``, one line per video in manifest row order.
    """

    PREDICT = ("encode_video", "caption_logits", "generate")
    HEADLINE = (
        "parse_rate",
        "severity_macro_f1",
        "baseline_severity_macro_f1",
        "bleu4",
        "cider_d",
        "perplexity",
    )

    def __init__(
        self,
        predict_fns: Mapping[str, common.PredictFn],
        spec: common.EvalSpec,
        *,
        strategy: str = "greedy",
        beam_size: int = 4,
        length_penalty: float = 0.6,
        max_len: int | None = None,
        **base: Any,
    ):
        super().__init__(predict_fns, spec, **base)
        where = self.where
        if strategy not in STRATEGIES:
            raise ValueError(f"{where}.strategy={strategy!r}: choose one of {STRATEGIES}")
        if beam_size < 1:
            raise ValueError(f"{where}.beam_size={beam_size} must be at least 1")
        if not length_penalty >= 0:
            raise ValueError(f"{where}.length_penalty={length_penalty} must be >= 0")
        max_len = spec.caption_max_len if max_len is None else max_len
        if not 1 <= max_len <= spec.max_decode_len:
            raise ValueError(
                f"{where}.max_len={max_len} must be in [1, {spec.max_decode_len}] (the caption "
                "decoder's position table, config.input.caption_max_len)"
            )
        common.require_split(spec, self.split)
        self.max_len = max_len
        tok = spec.caption_tokenizer
        self.eos_id = tok.eos_id
        decode_options = dict(
            strategy=strategy, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id,
            max_len=max_len, beam_size=beam_size, length_penalty=length_penalty,
        )
        encode_video, caption_logits, generate = (
            self.predict_fns[name] for name in self.PREDICT
        )

        def token_losses(logits, targets, mask):
            _, aux = losses.caption_loss(logits[None], targets[None], mask[None])
            return aux["loss_sum"], aux["num_tokens"]

        def caption(params, batch):
            video = encode_video(params, {"video": batch["video"]})
            memory = {k: video[k] for k in ("video_tokens", "video_token_mask")}
            logits = caption_logits(params, {**memory, "caption_in": batch["caption_in"]})
            ce_sum, num_tokens = jax.vmap(token_losses)(
                logits["caption_logits"], batch["caption_out"], batch["caption_mask"]
            )  # [B], [B]
            tokens = generate(params, memory, **decode_options)["tokens"]  # [B, max_len]
            return {"tokens": tokens, "ce_sum": ce_sum, "num_tokens": num_tokens}

        self._predict = common.make_predict(caption, spec.mesh)

    def run(self, params: Any, step: int) -> dict[str, float]:
        out = common.predict_split(
            self.spec,
            self._predict,
            params,
            split=self.split,
            pp=self.spec.pp(caption=True),
            batch_size=self.batch_size,
        )
        facts = common.join_rows(common.split_table(self.spec.data_dir, self.split), out["row"])
        tok = self.spec.caption_tokenizer
        generated = [tok.decode(ids) for ids in out["tokens"]]
        references = facts["report"].tolist()

        metrics = text_metrics.text_metrics(generated, references)
        metrics.update(clinical_metrics(generated, references))
        baseline = clinical_metrics(most_common_report_baseline(references), references)
        for key in ("severity_macro_f1", "severity_accuracy"):
            metrics[f"baseline_{key}"] = baseline[key]
        total_tokens = np.sum(out["num_tokens"], dtype=np.float64)
        nll = np.sum(out["ce_sum"], dtype=np.float64) / total_tokens
        metrics["nll"] = nll
        metrics["perplexity"] = np.exp(nll)
        is_eos = out["tokens"] == self.eos_id  # [N, max_len]
        ends = is_eos.any(axis=1)
        metrics["generated_length"] = np.mean(np.where(ends, is_eos.argmax(axis=1), self.max_len))
        metrics["eos_rate"] = np.mean(ends)

        if self.spec.is_main_process:
            self._write_csv(step, facts["study_id"], out["row"], references, generated)
        return {key: float(value) for key, value in metrics.items()}

    def _write_csv(
        self,
        step: int,
        study_ids: np.ndarray,
        rows: np.ndarray,
        references: Sequence[str],
        generated: Sequence[str],
    ) -> None:
        folder = paths.Path(self.spec.workdir) / "captions"  # local, or a URL
        folder.mkdir(parents=True, exist_ok=True)
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(CSV_COLUMNS)
        for line in zip(study_ids.tolist(), rows.tolist(), references, generated, strict=True):
            writer.writerow(line)
        (folder / f"{self.name}_{step}.csv").write_text(text.getvalue(), encoding="utf-8")
