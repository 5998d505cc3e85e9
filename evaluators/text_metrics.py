"""Text-overlap metrics of generated reports: corpus BLEU-4, ROUGE-L, CIDEr-D.

For: scoring generated reports against their references, one reference per
example, as in captioning papers. BLEU comes from sacrebleu and ROUGE-L from
rouge-score (their default settings, so numbers compare with published ones).
CIDEr-D is computed here, in plain Python: it gives the numbers of the COCO
caption evaluation's ``Cider`` (pycocoevalcap) on the same tokens, which the
tests check, without that package's Java tokeniser. These are secondary for
angiography reports (a changed percent barely moves them): the clinical metrics
are in captioning.py.

Not for: parsing findings or clinical metrics (captioning.py), decoding
(deepcoro_jax/models/decode.py).

Scales: BLEU-4 in [0, 100] (sacrebleu's), ROUGE-L F in [0, 1], CIDEr-D in [0, 10].
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import sacrebleu

CIDER_MAX_N = 4
CIDER_SIGMA = 6.0
_CIDER_TOKEN = re.compile(r"\d+(?:\.\d+)?|[a-z]+|%")


def _check_pairs(generated: Sequence[str], references: Sequence[str]) -> None:
    for name, texts in (("generated", generated), ("references", references)):
        if isinstance(texts, str):
            raise TypeError(f"{name} must be a sequence of str, got one str")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"{name}[{i}] must be a str, got {type(text)}")
    if len(generated) != len(references):
        raise ValueError(f"generated has {len(generated)} reports, references has "
                         f"{len(references)}: they must pair up")
    if not generated:
        raise ValueError("generated and references are empty")


def bleu4(generated: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 in [0, 100]: `sacrebleu.corpus_bleu` with its defaults (13a
    tokenisation, case-sensitive, exponential smoothing), one reference per report."""
    _check_pairs(generated, references)
    return float(sacrebleu.corpus_bleu(list(generated), [list(references)]).score)


def rouge_l(generated: Sequence[str], references: Sequence[str]) -> float:
    """Mean over pairs of the ROUGE-L F-measure in [0, 1] (rouge-score; its tokeniser
    lowercases and keeps runs of letters and digits, no stemming)."""
    # Imported here: rouge-score loads NLTK (about 1.5 s of CPU), which every process
    # that registers the evaluators would pay otherwise.
    from rouge_score import rouge_scorer

    _check_pairs(generated, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [scorer.score(reference, candidate)["rougeL"].fmeasure
              for candidate, reference in zip(generated, references, strict=True)]
    return float(sum(scores) / len(scores))


def cider_tokens(text: str) -> list[str]:
    """CIDEr-D's tokens: lowercase words, numbers (decimals kept whole) and '%';
    other punctuation is dropped (like the PTB tokeniser of coco-caption)."""
    return _CIDER_TOKEN.findall(text.lower())


def _ngram_counts(tokens: list[str]) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for n in range(1, CIDER_MAX_N + 1)
                   for i in range(len(tokens) - n + 1))


def cider_d(generated: Sequence[str], references: Sequence[str]) -> float:
    """Corpus CIDEr-D (Vedantam et al. 2015), one reference each: coco-caption's ``Cider``.

    For each n in 1..4, candidate and reference become TF-IDF vectors over n-grams:
    weight = count in the sentence x log(#examples / max(1, #references containing
    the n-gram)), document frequencies from the reference corpus. The n-gram score
    is sum_g min(w_cand(g), w_ref(g)) * w_ref(g) / (|w_cand| |w_ref|) (candidate counts
    clipped by the reference's; 0 when either norm is 0), times the length penalty
    exp(-(len_cand - len_ref)^2 / (2 * 6^2)) with lengths in tokens (`cider_tokens`).
    An example's score is 10 x the mean over n; the corpus score is the mean over
    examples. IDF weights depend on the corpus, so scores compare only across the
    same reference set; a corpus of one example scores 0 (every n-gram is in every
    reference).

    coco-caption (pycocoevalcap's ``Cider``, given the same tokens joined by spaces)
    computes the same: its document frequency counts the examples whose references
    hold the n-gram (with one reference each, the references), and it measures
    lengths in bigrams, max(len - 1, 0), which changes no score: the difference of
    two lengths is the same when both sentences have a token, and an empty one
    scores 0 either way.
    """
    _check_pairs(generated, references)
    candidate_counts = [_ngram_counts(cider_tokens(text)) for text in generated]
    reference_tokens = [cider_tokens(text) for text in references]
    reference_counts = [_ngram_counts(tokens) for tokens in reference_tokens]
    document_frequency = Counter(g for counts in reference_counts for g in counts)
    log_num_documents = math.log(len(references))

    def tf_idf(counts: Counter) -> tuple[list[dict], list[float]]:
        weights: list[dict] = [{} for _ in range(CIDER_MAX_N)]
        for ngram, count in counts.items():
            idf = log_num_documents - math.log(max(1.0, document_frequency[ngram]))
            weights[len(ngram) - 1][ngram] = count * idf
        norms = [math.sqrt(sum(w * w for w in by_n.values())) for by_n in weights]
        return weights, norms

    total = 0.0
    for counts, ref_counts, ref_tokens in zip(candidate_counts, reference_counts,
                                              reference_tokens, strict=True):
        weights, norms = tf_idf(counts)
        ref_weights, ref_norms = tf_idf(ref_counts)
        length_delta = sum(counts[g] for g in counts if len(g) == 1) - len(ref_tokens)
        penalty = math.exp(-length_delta ** 2 / (2 * CIDER_SIGMA ** 2))
        score_per_n = []
        for n in range(CIDER_MAX_N):
            if norms[n] == 0 or ref_norms[n] == 0:
                score_per_n.append(0.0)
                continue
            overlap = sum(min(w, ref_weights[n].get(g, 0.0)) * ref_weights[n].get(g, 0.0)
                          for g, w in weights[n].items())
            score_per_n.append(penalty * overlap / (norms[n] * ref_norms[n]))
        total += 10.0 * sum(score_per_n) / CIDER_MAX_N
    return total / len(generated)


def text_metrics(generated: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """{'bleu4', 'rouge_l', 'cider_d'} of generated reports against their references."""
    return {"bleu4": bleu4(generated, references), "rouge_l": rouge_l(generated, references),
            "cider_d": cider_d(generated, references)}
