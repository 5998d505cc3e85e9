"""Clinical metrics of generated angiography reports, read per segment.

For: comparing generated reports with their references through what
`reports.parse_result` reads from both (stenosis per segment, severity class,
significant lesions, CTOs, dominance) and how often a generated report parses at
all; and the "always write the most common report" baseline to compare against.
Text-overlap metrics are in text_metrics.py.

Not for: running the decoder or logging (the evaluator plugin does that), or the
report schema and parser themselves (deepcoro_jax/reports.py).

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

from collections import Counter
from collections.abc import Sequence

import numpy as np

from deepcoro_jax import reports


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
