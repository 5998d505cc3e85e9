"""LocCa's location tasks, scored: where the decoder puts a lesion it is told of, or finds.

For every video of a split that shows annotated lesions (``prepare --boxes``), with the
eval clip (``config.input.eval_video_pp``) and the lesion boxes moved with it:

- AREF (referring expression): for each lesion the clip shows, the decoder reads
  "<aref> 90% stenosis of the proximal LAD." and writes a box (a frame-time token and
  four coordinate tokens; decoding allows nothing else there). Scored against the
  lesion's box on the clip frame nearest the clip's middle
  (``locations.clip_lesions``): accuracy at IoU >= 0.5, mean IoU, both overall and
  per vessel group, the share of boxes on the right frame, beside
  - ``prior_*``: the mean training box of the lesion's segment in the same view (the
    label columns ``system``, ``landmark``, ``magnification`` that the data carries;
    the segment's mean over all views where the train split lacks that view), what a
    model that knows anatomy but looks at no pixel would draw;
  - ``chance_*``: a training lesion's box drawn at random (the expected accuracy over
    every box of the train split);
  - ``oracle_*``: the ceiling, every box exactly right but written in the location
    bins (small boxes lose IoU to the quantisation).
- GCAP (grounded captioning): once per video, after "<gcap>", a box then a phrase. It
  is right when some lesion the clip shows has the phrase's segment and severity class
  (``reports.severity_class``) and its box at IoU >= 0.5; ``gcap_phrase_accuracy``
  asks the phrase only. ``prior_gcap_accuracy``: the train split's most common
  (segment, severity class) of the view, at its mean box.

The boxes are in the clip's frame, normalised to [0, 1]; the priors are taken from the
stored frames, the same frame when the eval clip is the whole frame resized (the
recipe's). Process 0 writes ``<workdir>/grounding/<name>_<step>.csv``: one line per
lesion (AREF) with the video's GCAP output.

Not here: the location vocabulary and the lesion targets (``deepcoro_jax/domain/
locations.py``, ``input_pipeline/location_ops.py``), the constrained decoding
(``deepcoro_jax/models/decode.py``, the ``ground`` predict function).
"""

from __future__ import annotations

import csv
import io
import logging
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from deepcoro_jax import paths
from deepcoro_jax.domain import locations, reports
from evaluators import common

IOU_THRESHOLD = 0.5
# Vessel groups for the per-group scores.
GROUPS: dict[str, tuple[str, ...]] = {
    "left_main": ("lmca",),
    "lad": ("prox_lad", "mid_lad", "dist_lad", "d1", "d2"),
    "lcx": ("prox_lcx", "dist_lcx", "om1", "om2", "ramus", "lvp"),
    "rca": ("prox_rca", "mid_rca", "dist_rca", "pda", "rpl"),
}
GROUP_OF = {segment: group for group, segments in GROUPS.items() for segment in segments}
CSV_COLUMNS = (
    "row", "segment", "percent", "frame", "y0", "x0", "y1", "x1",
    "pred_frame", "pred_y0", "pred_x0", "pred_y1", "pred_x1", "iou", "prior_iou", "gcap",
)


# ----------------------------------------------------------------------------- scores


def box_scores(predicted: np.ndarray, target: np.ndarray, prefix: str) -> dict[str, float]:
    """``<prefix>accuracy@0.5`` and ``<prefix>mean_iou`` of boxes [N, 4] against targets
    [N, 4]; a predicted row of NaN (no readable box) scores IoU 0."""
    predicted, target = np.asarray(predicted, np.float64), np.asarray(target, np.float64)
    readable = np.all(np.isfinite(predicted), axis=-1)
    iou = np.where(readable, locations.iou(np.nan_to_num(predicted), target), 0.0)
    return {f"{prefix}accuracy@0.5": float(np.mean(iou >= IOU_THRESHOLD)),
            f"{prefix}mean_iou": float(np.mean(iou))}


def chance_accuracy(train_boxes: np.ndarray, target: np.ndarray) -> float:
    """The expected accuracy at IoU >= 0.5 of a box drawn at random from `train_boxes`
    [K, 4], over targets [N, 4]."""
    hits = locations.iou(target[:, None, :], train_boxes[None, :, :]) >= IOU_THRESHOLD  # [N, K]
    return float(np.mean(hits))


class BoxPrior:
    """Mean training boxes by (segment, view), by segment, and overall; the most common
    (segment, severity class) per view."""

    def __init__(self, segments: Sequence[str], views: Sequence[tuple], percents: Sequence[float],
                 boxes: np.ndarray):
        if not len(segments):
            raise ValueError("BoxPrior: no training boxes")
        boxes = np.asarray(boxes, np.float64)
        by_view, by_segment = defaultdict(list), defaultdict(list)
        findings = defaultdict(Counter)
        for segment, view, percent, box in zip(segments, views, percents, boxes, strict=True):
            by_view[segment, view].append(box)
            by_segment[segment].append(box)
            findings[view][segment, reports.severity_class(percent)] += 1
        self.by_view = {k: np.mean(v, axis=0) for k, v in by_view.items()}
        self.by_segment = {k: np.mean(v, axis=0) for k, v in by_segment.items()}
        self.overall = boxes.mean(axis=0)
        self.boxes = boxes
        self.findings = {view: counts.most_common(1)[0][0] for view, counts in findings.items()}
        self.common_finding = Counter(
            (s, reports.severity_class(p)) for s, p in zip(segments, percents, strict=True)
        ).most_common(1)[0][0]

    def box(self, segment: str, view: tuple) -> np.ndarray:
        if (segment, view) in self.by_view:
            return self.by_view[segment, view]
        return self.by_segment.get(segment, self.overall)

    def finding(self, view: tuple) -> tuple[str, str, np.ndarray]:
        """(segment, severity class, box) that this view's training lesions most often are."""
        segment, severity = self.findings.get(view, self.common_finding)
        return segment, severity, self.box(segment, view)


def gcap_correct(
    segment: str | None, severity: str | None, box: np.ndarray | None,
    targets: Sequence[tuple[str, str, np.ndarray]],
) -> tuple[bool, bool]:
    """(phrase right, phrase and box right) of one grounded caption against the clip's
    lesions [(segment, severity class, box)]."""
    phrase = [t for t in targets if segment is not None and (t[0], t[1]) == (segment, severity)]
    boxed = box is not None and any(
        locations.iou(box, t[2]) >= IOU_THRESHOLD for t in phrase)
    return bool(phrase), bool(boxed)


def score(out: Mapping[str, np.ndarray], views: Sequence[tuple], prior: BoxPrior,
          tok: locations.LocationTokenizer) -> tuple[dict[str, float], list[tuple]]:
    """The metrics (module docstring) of the evaluator's outputs, per video: 'lesion_*'
    (``lesion_targets``), 'aref_tokens' [N, M, 5], 'gcap_tokens' [N, G] and 'row' [N];
    `views` [N] the videos' anatomy; `tok` the caption tokenizer with locations. Also
    the CSV lines, one per lesion."""
    vocab = tok.vocab
    valid = out["lesion_valid"]  # [N, M]
    video, slot = np.nonzero(valid)
    if not len(video):
        raise ValueError("no video of the split shows a lesion")
    segments = [reports.SEGMENTS[i] for i in out["lesion_segment"][video, slot]]
    target = out["lesion_box"][video, slot].astype(np.float64)  # [L, 4]
    target_frame = out["lesion_frame"][video, slot]
    predicted = np.full(target.shape, np.nan)
    predicted_frame = np.full(len(video), -1)
    for i, tokens in enumerate(out["aref_tokens"][video, slot]):
        read = vocab.read_box(tokens)
        if read is not None:
            predicted_frame[i], predicted[i] = read
    prior_boxes = np.stack([prior.box(s, views[v]) for s, v in zip(segments, video,
                                                                 strict=True)])
    metrics = {"num_lesions": float(len(video)),
               "aref_read_rate": float(np.mean(np.isfinite(predicted[:, 0]))),
               "aref_frame_accuracy": float(np.mean(predicted_frame == target_frame))}
    metrics.update(box_scores(predicted, target, "aref_"))
    metrics.update(box_scores(prior_boxes, target, "prior_aref_"))
    metrics["chance_aref_accuracy@0.5"] = chance_accuracy(prior.boxes, target)
    # The ceiling: every box exactly right, then written in the location bins.
    quantised = locations.tokens_to_box(
        locations.box_to_tokens(np.clip(target, 0, 1), vocab.num_bins), vocab.num_bins)
    metrics.update(box_scores(quantised, target, "oracle_aref_"))
    groups = np.array([GROUP_OF[s] for s in segments])
    for group in GROUPS:
        chosen = groups == group
        if chosen.any():
            for key, value in box_scores(predicted[chosen], target[chosen], "aref_").items():
                metrics[f"{key}/{group}"] = value
            metrics[f"prior_aref_accuracy@0.5/{group}"] = box_scores(
                prior_boxes[chosen], target[chosen], "")["accuracy@0.5"]

    # GCAP, once per video that shows a lesion.
    shown = np.flatnonzero(valid.any(axis=1))
    phrase_right, boxed_right, prior_right, texts = [], [], [], {}
    for v in shown:
        clip = [(reports.SEGMENTS[s], reports.severity_class(p), b) for s, p, b, ok in zip(
            out["lesion_segment"][v], out["lesion_percent"][v], out["lesion_box"][v],
            valid[v], strict=True) if ok]
        tokens = out["gcap_tokens"][v]
        read = vocab.read_box(tokens)
        text = tok.decode(tokens[locations.BOX_TOKENS:])
        phrase = locations.read_phrase(text)
        segment, severity = (None, None) if phrase is None else (
            phrase[0], reports.severity_class(phrase[1]))
        right = gcap_correct(segment, severity, None if read is None else read[1], clip)
        phrase_right.append(right[0])
        boxed_right.append(right[1])
        prior_right.append(gcap_correct(*prior.finding(views[v]), clip)[1])
        texts[v] = tok.decode(tokens)
    metrics["gcap_accuracy"] = float(np.mean(boxed_right))
    metrics["gcap_phrase_accuracy"] = float(np.mean(phrase_right))
    metrics["prior_gcap_accuracy"] = float(np.mean(prior_right))

    iou = np.where(np.isfinite(predicted[:, 0]),
                   locations.iou(np.nan_to_num(predicted), target), 0.0)
    prior_iou = locations.iou(prior_boxes, target)
    lines = [
        (int(out["row"][v]), segments[i], float(out["lesion_percent"][v, slot[i]]),
         int(target_frame[i]), *np.round(target[i], 4), int(predicted_frame[i]),
         *np.round(predicted[i], 4), round(float(iou[i]), 4), round(float(prior_iou[i]), 4),
         texts.get(v, ""))
        for i, v in enumerate(video)
    ]
    return metrics, lines


# ----------------------------------------------------------------------------- data


def read_lesions(data_dir: str, split: str, columns: Sequence[str]) -> dict[str, list]:
    """Every stored box of a split, without frames: segment, percent, box (of the stored
    frame), and the view (the values of the label `columns`) of its video."""
    from input_pipeline import dataset_format  # TensorFlow

    out: dict[str, list] = {"segment": [], "percent": [], "box": [], "view": []}
    for example in dataset_format.read_split(data_dir, split).as_numpy_iterator():
        lesions = example["lesions"]
        labels = example.get("labels", {})
        view = tuple(_text(labels[c]) for c in columns)
        for segment, percent, box in zip(
            lesions["segment"], lesions["severity"], lesions["box"], strict=True
        ):
            out["segment"].append(_text(segment))
            out["percent"].append(float(percent))
            out["box"].append(np.asarray(box, np.float64))
            out["view"].append(view)
    return out


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# ----------------------------------------------------------------------------- evaluator


@common.register("grounding")
class Evaluator(common.Evaluator):
    """AREF and GCAP on a split (module docstring). Options: ``max_lesions`` per video
    (the clip's first lesions in SEGMENTS order), ``prefix_len`` (room for a
    referring-expression prompt, in ids) and ``phrase_len`` (for GCAP's phrase and EOS;
    both default to the longest lesion phrase the tokenizer writes, plus one), and
    ``prior_split`` (where the priors come from)."""

    PREDICT = ("encode_video", "ground")
    HEADLINE = (
        "aref_accuracy@0.5",
        "oracle_aref_accuracy@0.5",
        "prior_aref_accuracy@0.5",
        "chance_aref_accuracy@0.5",
        "aref_mean_iou",
        "gcap_accuracy",
        "prior_gcap_accuracy",
    )

    def __init__(
        self,
        predict_fns: Mapping[str, common.PredictFn],
        spec: common.EvalSpec,
        *,
        max_lesions: int = 4,
        prefix_len: int | None = None,
        phrase_len: int | None = None,
        prior_split: str = "train",
        **base: Any,
    ):
        super().__init__(predict_fns, spec, **base)
        where = self.where
        if not spec.location_bins:
            raise common.DataLacks(
                "the model has no location tokens (config.model.location_bins is 0)")
        from input_pipeline import dataset_format  # TensorFlow

        if not dataset_format.load_meta(spec.data_dir).lesion_boxes:
            raise common.DataLacks(
                f"{spec.data_dir} holds no lesion boxes (prepare it with --boxes)")
        common.require_split(spec, self.split)
        common.require_split(spec, prior_split)
        tok = spec.caption_tokenizer
        longest = locations.longest_phrase(tok.base_tokenizer)
        prefix_len = longest + 1 if prefix_len is None else prefix_len  # <aref> + phrase
        phrase_len = longest + 1 if phrase_len is None else phrase_len  # phrase + EOS
        for name, value, low in (("max_lesions", max_lesions, 1), ("prefix_len", prefix_len, 2),
                                 ("phrase_len", phrase_len, 1)):
            if not (isinstance(value, int) and value >= low):
                raise ValueError(f"{where}.{name}={value!r} must be an int >= {low}")
        for what, length in (("prefix_len + 5 box tokens", prefix_len + locations.BOX_TOKENS),
                             ("<gcap> + 5 box tokens + phrase_len",
                              1 + locations.BOX_TOKENS + phrase_len)):
            if length > spec.max_decode_len:
                raise ValueError(
                    f"{where}: {what} = {length} exceeds the caption decoder's "
                    f"{spec.max_decode_len} positions (config.input.caption_max_len)")
        self.max_lesions, self.prefix_len, self.prior_split = max_lesions, prefix_len, prior_split
        self.tok, self.vocab = tok, tok.vocab
        ids = dict(bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
        box_masks = self.vocab.box_step_masks()
        gcap_masks = np.concatenate(
            [box_masks, np.repeat(self.vocab.allowed("text")[None], phrase_len, axis=0)])
        gcap_prefix = np.array([[[self.vocab.task_id("gcap")]]], np.int32)  # [1, 1, 1]
        encode_video, ground = (self.predict_fns[n] for n in self.PREDICT)

        def predict(params, batch):
            video = encode_video(params, {"video": batch["video"]})
            memory = {k: video[k] for k in ("video_tokens", "video_token_mask")}
            aref = ground(params, {**memory, "ground_prefix": batch["lesion_prefix"],
                                   "ground_prefix_len": batch["lesion_prefix_len"]},
                          box_masks, **ids)["ground_tokens"]  # [B, M, 5]
            size = batch["video"].shape[0]
            gcap = ground(params, {**memory,
                                   "ground_prefix": np.broadcast_to(gcap_prefix, (size, 1, 1)),
                                   "ground_prefix_len": np.ones((size, 1), np.int32)},
                          gcap_masks, **ids)["ground_tokens"]  # [B, 1, 5 + phrase_len]
            kept = {k: batch[k] for k in batch if k.startswith("lesion_")}
            return {"aref_tokens": aref, "gcap_tokens": gcap[:, 0], **kept}

        self._predict = common.make_predict(predict, spec.mesh)
        self._prior: BoxPrior | None = None

    def pp(self) -> str:
        spec = self.spec
        targets = (f"lesion_targets({self.max_lesions}, {self.prefix_len}, "
                   f"num_bins={spec.location_bins}, tokenizer='{spec.caption_tokenizer_spec}')")
        keys = ("video", common.ROW_KEY, "lesion_box", "lesion_frame", "lesion_segment",
                "lesion_percent", "lesion_valid", "lesion_count", "lesion_prefix",
                "lesion_prefix_len")
        return f"{spec.video_pp}|{targets}|keep({', '.join(repr(k) for k in keys)})"

    def _view_columns(self, facts: Mapping[str, np.ndarray]) -> list[str]:
        return [c for c in common.ANATOMY_COLUMNS if f"label/{c}" in facts]

    def prior(self, columns: Sequence[str]) -> BoxPrior:
        """The priors from `prior_split`'s stored boxes (read once)."""
        if self._prior is None:
            train = read_lesions(self.spec.data_dir, self.prior_split, columns)
            if not train["segment"]:
                raise ValueError(f"{self.where}: split {self.prior_split!r} holds no lesion boxes")
            self._prior = BoxPrior(train["segment"], train["view"], train["percent"],
                                   np.stack(train["box"]))
        return self._prior

    def run(self, params: Any, step: int) -> dict[str, float]:
        out = common.predict_split(self.spec, self._predict, params, split=self.split,
                                   pp=self.pp(), batch_size=self.batch_size)
        facts = common.join_rows(common.split_table(self.spec.data_dir, self.split), out["row"])
        columns = self._view_columns(facts)
        views = [tuple(str(facts[f"label/{c}"][i]) for c in columns)
                 for i in range(len(out["row"]))]
        prior = self.prior(columns)
        if not out["lesion_valid"].any():
            logging.warning("%s: no video of split %r shows an annotated lesion: nothing to "
                            "score", self.where, self.split)
            return {"num_lesions": 0.0}
        metrics, lines = score(out, views, prior, self.tok)
        if self.spec.is_main_process:
            self._write_csv(step, lines)
        return metrics

    def _write_csv(self, step: int, lines: Sequence[tuple]) -> None:
        folder = paths.Path(self.spec.workdir) / "grounding"
        folder.mkdir(parents=True, exist_ok=True)
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(lines)
        (folder / f"{self.name}_{step}.csv").write_text(text.getvalue(), encoding="utf-8")
