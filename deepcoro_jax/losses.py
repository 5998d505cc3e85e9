"""The multitask losses: contrastive (SigLIP sigmoid, CLIP softmax), captioning, MVM, distillation.

Pure JAX functions of arrays; each returns ``(loss, aux)`` where ``aux`` holds named diagnostics
(and, where a trainer must combine micro-batches exactly, the sums and counts behind the mean).
Every loss computes in float32 (or wider) whatever the input dtype.

Contrastive positives. Angiography reports are templated, so two videos in a batch often share
the exact same report text; treating such a pair as a negative teaches the encoder to separate
videos that the text says are the same. Reports are identified by *report ids*: an integer per
example ([B]) or the padded token-id rows of the report ([B, L]); two examples have the same
report when their id rows are exactly equal (no host work needed). ``contrastive_positives``
switches between ``'same_report'`` (identical reports are positives), ``'same_findings'``
(reports that state the same findings, in any words, are positives: the ids are the input
pipeline's ``findings_id``) and ``'diagonal'`` (only the paired report is).

``sigmoid_loss_sharded`` computes the SigLIP loss over a batch sharded on a mesh axis without
ever forming the global [B, B] logits: text chunks travel around a ring of devices.

Not here: loss weights and their schedules (training/optim.py), the model heads (and their
initial temperature and bias), the EMA teacher.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

POSITIVES_KINDS = ("diagonal", "same_report", "same_findings")

Aux = dict[str, Any]


def _as_float(x: jax.Array) -> jax.Array:
    """Casts to float32, keeping wider floats (float64 under x64) as they are."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _scalar(x: jax.Array | float, name: str) -> jax.Array:
    x = _as_float(x)
    if x.size != 1:
        raise ValueError(f"`{name}` must hold a single value, got shape {x.shape}.")
    return x.reshape(())


def _l2_normalize(x: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


def _check_embeddings(video_emb: jax.Array, text_emb: jax.Array) -> None:
    if video_emb.ndim != 2 or video_emb.shape != text_emb.shape:
        raise ValueError(
            "`video_emb` and `text_emb` must both be [B, D] with the same shape, got "
            f"{video_emb.shape} and {text_emb.shape}."
        )


def _check_positives(positives: jax.Array, batch_size: int) -> jax.Array:
    if positives.shape != (batch_size, batch_size):
        raise ValueError(
            f"`positives` must be [B, B] = {(batch_size, batch_size)}, got {positives.shape}."
        )
    return positives.astype(bool)


def positives_from_ids(report_ids_a: jax.Array, report_ids_b: jax.Array) -> jax.Array:
    """Pairs with the same report: [Ba, Bb] bool, True where the id rows are exactly equal.

    Report ids are [B] integers (a hash of the text) or [B, ...] rows (padded token ids).
    """
    if report_ids_a.shape[1:] != report_ids_b.shape[1:] or report_ids_a.ndim == 0:
        raise ValueError(
            "`report_ids_a` and `report_ids_b` must be [B] or [B, L] with matching trailing "
            f"shape, got {report_ids_a.shape} and {report_ids_b.shape}."
        )
    rows_a = report_ids_a.reshape(report_ids_a.shape[0], -1)  # [Ba, L]
    rows_b = report_ids_b.reshape(report_ids_b.shape[0], -1)  # [Bb, L]
    return jnp.all(rows_a[:, None, :] == rows_b[None, :, :], axis=-1)  # [Ba, Bb]


def contrastive_positives(kind: str, report_ids: jax.Array) -> jax.Array:
    """The [B, B] positive-pair mask: 'same_report' / 'same_findings' (equal report ids:
    token rows or findings ids) or 'diagonal'."""
    if kind in ("same_report", "same_findings"):
        return positives_from_ids(report_ids, report_ids)
    if kind == "diagonal":
        return jnp.eye(report_ids.shape[0], dtype=bool)
    raise ValueError(f"`kind` must be one of {POSITIVES_KINDS}, got {kind!r}.")


def sigmoid_loss(
    video_emb: jax.Array,
    text_emb: jax.Array,
    log_temperature: jax.Array,
    bias: jax.Array,
    positives: jax.Array | None = None,
) -> tuple[jax.Array, Aux]:
    """SigLIP: sum over all video-report pairs of -log sigmoid(label * logit), over B videos.

    Embeddings [B, D] are L2-normalised; logit = exp(log_temperature) * <v, u> + bias; the label
    is +1 where `positives` [B, B] is True (the diagonal when None) and -1 elsewhere.
    aux: logits [B, B], temperature, bias, pair_accuracy (sign of the logit agrees with the
    label), positives_per_video.
    """
    _check_embeddings(video_emb, text_emb)
    batch_size = video_emb.shape[0]
    if positives is None:
        positives = jnp.eye(batch_size, dtype=bool)
    positives = _check_positives(positives, batch_size)
    temperature = jnp.exp(_scalar(log_temperature, "log_temperature"))
    bias = _scalar(bias, "bias")
    video = _l2_normalize(_as_float(video_emb))
    text = _l2_normalize(_as_float(text_emb))
    logits = temperature * (video @ text.T) + bias  # [B, B]
    labels = jnp.where(positives, 1.0, -1.0).astype(logits.dtype)
    loss = -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / batch_size
    aux = {
        "logits": logits,
        "temperature": temperature,
        "bias": bias,
        "pair_accuracy": jnp.mean((logits > 0) == positives),
        "positives_per_video": jnp.sum(positives) / batch_size,
    }
    return loss, aux


def _ring_shift(x: jax.Array, axis_name: str | tuple[str, ...], num_shards: int) -> jax.Array:
    """Sends each shard's block to the next device on the ring (i -> i + 1)."""
    return jax.lax.ppermute(
        x, axis_name, perm=[(i, (i + 1) % num_shards) for i in range(num_shards)]
    )


def _shard_batch(x: jax.Array, mesh: Mesh, axes: tuple[str, ...], spec: P) -> jax.Array:
    """Lays out x with its batch split over `axes`, for Explicit or Auto mesh axes."""
    sharding = NamedSharding(mesh, spec)
    if set(axes) <= set(mesh.explicit_axes):
        return jax.reshard(x, sharding)
    if set(axes) <= set(mesh.auto_axes):
        return jax.lax.with_sharding_constraint(x, sharding)
    raise ValueError(
        f"`axis_name` {axes} mixes axis types {mesh.axis_types}; use all Explicit or all Auto."
    )


def _sigmoid_chunk(video, text_chunk, ids_local, ids_chunk, temperature, bias):
    """Logits and +-1 labels of the local videos against one text chunk, both [b, b]."""
    similarity = video @ text_chunk.T  # [b, b]
    logits = temperature * similarity + bias
    same = positives_from_ids(ids_local, ids_chunk)
    labels = jnp.where(same, 1.0, -1.0).astype(logits.dtype)
    return similarity, logits, labels


def sigmoid_loss_sharded(
    video_emb: jax.Array,
    text_emb: jax.Array,
    log_temperature: jax.Array,
    bias: jax.Array,
    *,
    mesh: Mesh,
    axis_name: str | tuple[str, ...] = "data",
    same_report_ids: jax.Array | None = None,
) -> tuple[jax.Array, Aux]:
    """`sigmoid_loss` over a batch sharded on `axis_name`, with [B_local, B_local] peak logits.

    Each device keeps its videos; the text chunks (and their report ids) go around the ring of
    devices with `ppermute`, and each device adds the loss of its videos against the chunk it
    holds. The backward pass (custom VJP) runs the ring again, carrying the text gradient with
    its chunk until it returns home, so a device holds one [B_local, B_local] block of logits
    and a few [B_local, D] blocks at a time, in the forward and the backward pass. Positives
    are the diagonal, or pairs with equal `same_report_ids` ([B] or [B, L], see
    `positives_from_ids`) when given.
    Equal to `sigmoid_loss` (value and gradients); aux as there, without the logits.
    """
    _check_embeddings(video_emb, text_emb)
    axes = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
    unknown = [a for a in axes if a not in mesh.shape]
    if unknown:
        raise ValueError(f"`axis_name` {unknown} not in the mesh axes {tuple(mesh.shape)}.")
    num_shards = math.prod(mesh.shape[a] for a in axes)
    batch_size = video_emb.shape[0]
    if batch_size % num_shards:
        raise ValueError(
            f"The batch ({batch_size}) must divide evenly over the {num_shards} devices of "
            f"`axis_name` {axes}."
        )
    if same_report_ids is None:
        same_report_ids = jnp.arange(batch_size)
    if same_report_ids.shape[0] != batch_size:
        raise ValueError(
            f"`same_report_ids` must have the batch ({batch_size}) first, got "
            f"{same_report_ids.shape}."
        )
    ring_axes = axes[0] if len(axes) == 1 else axes
    batch_spec = P(ring_axes)
    shift = lambda x: _ring_shift(x, ring_axes, num_shards)

    def forward_shard(video, text, temperature, bias, ids):
        def chunk_stats(text_chunk, ids_chunk):
            _, logits, labels = _sigmoid_chunk(video, text_chunk, ids, ids_chunk, temperature, bias)
            return jnp.stack([
                -jnp.sum(jax.nn.log_sigmoid(labels * logits)),
                jnp.sum((logits > 0) == (labels > 0)),
                jnp.sum(labels > 0),
            ])  # [loss sum, correct pairs, positive pairs]

        def step(_, carry):
            text_chunk, ids_chunk, stats = carry
            text_chunk, ids_chunk = shift(text_chunk), shift(ids_chunk)
            return text_chunk, ids_chunk, stats + chunk_stats(text_chunk, ids_chunk)

        carry = (text, ids, chunk_stats(text, ids))
        _, _, stats = jax.lax.fori_loop(1, num_shards, step, carry)
        return jax.lax.psum(stats, ring_axes)

    def backward_shard(video, text, temperature, bias, ids, loss_cotangent):
        def chunk_grads(text_chunk, ids_chunk):
            similarity, logits, labels = _sigmoid_chunk(
                video, text_chunk, ids, ids_chunk, temperature, bias
            )
            logit_grad = -labels * jax.nn.sigmoid(-labels * logits)  # d loss / d logit, [b, b]
            return (
                temperature * logit_grad @ text_chunk,  # d / d video, [b, D]
                temperature * logit_grad.T @ video,  # d / d text_chunk, [b, D]
                jnp.sum(logit_grad * similarity),  # d / d temperature
                jnp.sum(logit_grad),  # d / d bias
            )

        def step(_, carry):
            text_chunk, ids_chunk, text_chunk_grad, grads = carry
            text_chunk, ids_chunk = shift(text_chunk), shift(ids_chunk)
            text_chunk_grad = shift(text_chunk_grad)
            video_g, text_g, temperature_g, bias_g = chunk_grads(text_chunk, ids_chunk)
            grads = (grads[0] + video_g, grads[1] + temperature_g, grads[2] + bias_g)
            return text_chunk, ids_chunk, text_chunk_grad + text_g, grads

        video_g, text_g, temperature_g, bias_g = chunk_grads(text, ids)
        carry = (text, ids, text_g, (video_g, temperature_g, bias_g))
        _, _, text_grad, (video_grad, temperature_grad, bias_grad) = jax.lax.fori_loop(
            1, num_shards, step, carry
        )
        # After the last step device i holds the text chunk of device i + 1 with its summed
        # gradient; one more shift brings every text gradient home.
        text_grad = shift(text_grad)
        return (
            loss_cotangent * video_grad,
            loss_cotangent * text_grad,
            loss_cotangent * jax.lax.psum(temperature_grad, ring_axes),
            loss_cotangent * jax.lax.psum(bias_grad, ring_axes),
        )

    specs = (batch_spec, batch_spec, P(), P(), batch_spec)
    forward = jax.shard_map(forward_shard, mesh=mesh, in_specs=specs, out_specs=P())
    backward = jax.shard_map(
        backward_shard,
        mesh=mesh,
        in_specs=(*specs, P()),
        out_specs=(batch_spec, batch_spec, P(), P()),
    )

    @jax.custom_vjp
    def ring_stats(video, text, temperature, bias, ids):
        return forward(video, text, temperature, bias, ids)

    def ring_stats_fwd(video, text, temperature, bias, ids):
        return forward(video, text, temperature, bias, ids), (video, text, temperature, bias, ids)

    def ring_stats_bwd(residuals, stats_cotangent):
        # Only the loss sum (stats[0]) is differentiable; the counts are piecewise constant.
        return (*backward(*residuals, stats_cotangent[0]), None)

    ring_stats.defvjp(ring_stats_fwd, ring_stats_bwd)

    temperature = jnp.exp(_scalar(log_temperature, "log_temperature"))
    bias = _scalar(bias, "bias")
    video = _l2_normalize(_as_float(video_emb))
    text = _l2_normalize(_as_float(text_emb))
    video, text, same_report_ids = (
        _shard_batch(x, mesh, axes, batch_spec) for x in (video, text, same_report_ids)
    )
    stats = ring_stats(video, text, temperature, bias, same_report_ids)
    aux = {
        "temperature": temperature,
        "bias": bias,
        "pair_accuracy": stats[1] / batch_size**2,
        "positives_per_video": stats[2] / batch_size,
    }
    return stats[0] / batch_size, aux


def _soft_cross_entropy(logits: jax.Array, positives: jax.Array) -> jax.Array:
    """Mean over rows with a positive of the CE against the uniform distribution on positives."""
    num_positives = jnp.sum(positives, axis=-1)  # [B]
    targets = positives / jnp.maximum(num_positives, 1)[:, None]  # [B, B]
    row_losses = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)  # [B]
    has_positive = num_positives > 0
    return jnp.sum(jnp.where(has_positive, row_losses, 0.0)) / jnp.maximum(
        jnp.sum(has_positive), 1
    )


def softmax_loss(
    video_emb: jax.Array,
    text_emb: jax.Array,
    log_temperature: jax.Array,
    positives: jax.Array | None = None,
) -> tuple[jax.Array, Aux]:
    """CLIP symmetric cross-entropy, aware of several positives per row.

    logits = exp(log_temperature) * <v, u> on L2-normalised [B, D] embeddings. The video->text
    target of row i is uniform over the texts j with positives[i, j] (one-hot on the diagonal
    when `positives` is None); text->video uses the columns likewise. Rows without any positive
    are skipped. loss = (video->text + text->video) / 2.
    aux: logits [B, B], temperature, video_to_text and text_to_video losses, and the top-1
    accuracy (the arg-max text is a positive).
    """
    _check_embeddings(video_emb, text_emb)
    batch_size = video_emb.shape[0]
    if positives is None:
        positives = jnp.eye(batch_size, dtype=bool)
    positives = _check_positives(positives, batch_size)
    temperature = jnp.exp(_scalar(log_temperature, "log_temperature"))
    video = _l2_normalize(_as_float(video_emb))
    text = _l2_normalize(_as_float(text_emb))
    logits = temperature * (video @ text.T)  # [B videos, B texts]
    video_to_text = _soft_cross_entropy(logits, positives)
    text_to_video = _soft_cross_entropy(logits.T, positives.T)
    best_text = jnp.argmax(logits, axis=-1)  # [B]
    aux = {
        "logits": logits,
        "temperature": temperature,
        "video_to_text": video_to_text,
        "text_to_video": text_to_video,
        "top1_accuracy": jnp.mean(positives[jnp.arange(batch_size), best_text]),
    }
    return (video_to_text + text_to_video) / 2, aux


def caption_loss(
    logits: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, Aux]:
    """Token cross-entropy with label smoothing, averaged over the real (mask) tokens.

    logits [B, L, V], targets [B, L] int, mask [B, L] (1 real, 0 padding). The smoothed target
    is (1 - eps) * one_hot + eps / V. loss = sum over real tokens / number of real tokens; a
    trainer accumulating micro-batches adds aux['loss_sum'] and aux['num_tokens'] instead.
    aux also holds nll (unsmoothed, for perplexity), num_correct, token_accuracy, and per
    example the loss summed over its real tokens (example_loss_sum [B]) and their number
    (example_tokens [B]).
    """
    if logits.ndim != 3 or targets.shape != logits.shape[:2] or mask.shape != targets.shape:
        raise ValueError(
            "`logits` must be [B, L, V] with `targets` and `mask` [B, L], got "
            f"{logits.shape}, {targets.shape} and {mask.shape}."
        )
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"`label_smoothing` must be in [0, 1), got {label_smoothing}.")
    log_probs = jax.nn.log_softmax(_as_float(logits), axis=-1)  # [B, L, V]
    weights = mask.astype(log_probs.dtype)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]  # [B, L]
    uniform_ce = -jnp.mean(log_probs, axis=-1)  # [B, L]
    token_losses = (1.0 - label_smoothing) * nll + label_smoothing * uniform_ce
    loss_sum = jnp.sum(token_losses * weights)
    num_tokens = jnp.sum(weights)
    denominator = jnp.maximum(num_tokens, 1.0)
    num_correct = jnp.sum((jnp.argmax(log_probs, axis=-1) == targets) * weights)
    aux = {
        "loss_sum": loss_sum,
        "num_tokens": num_tokens,
        "nll": jnp.sum(nll * weights) / denominator,
        "num_correct": num_correct,
        "token_accuracy": num_correct / denominator,
        "example_loss_sum": jnp.sum(token_losses * weights, axis=1),
        "example_tokens": jnp.sum(weights, axis=1),
    }
    return loss_sum / denominator, aux


def mvm_loss(
    pred: jax.Array, target: jax.Array, mask: jax.Array | None = None
) -> tuple[jax.Array, Aux]:
    """Masked video modelling: MSE over the masked tubelets.

    pred and target [B, M, P] hold only the masked tubelets (P pixels each); `mask` [B, M]
    weights them (0 for tubelets of padded videos). loss = mean over valid tubelets of the mean
    over pixels. aux: loss_sum and num_tubelets, for exact micro-batch accumulation.
    """
    if pred.ndim != 3 or pred.shape != target.shape:
        raise ValueError(
            f"`pred` and `target` must both be [B, M, P], got {pred.shape} and {target.shape}."
        )
    if mask is not None and mask.shape != pred.shape[:2]:
        raise ValueError(f"`mask` must be [B, M] = {pred.shape[:2]}, got {mask.shape}.")
    tubelet_losses = jnp.mean(jnp.square(_as_float(pred) - _as_float(target)), axis=-1)  # [B, M]
    weights = jnp.ones_like(tubelet_losses) if mask is None else mask.astype(tubelet_losses.dtype)
    loss_sum = jnp.sum(tubelet_losses * weights)
    num_tubelets = jnp.sum(weights)
    aux = {"loss_sum": loss_sum, "num_tubelets": num_tubelets}
    return loss_sum / jnp.maximum(num_tubelets, 1.0), aux


def distillation_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    temperature: float,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, Aux]:
    """Hinton distillation: temperature^2 * KL(teacher || student) on softened distributions.

    For self-distillation from an EMA teacher of the contrastive logits ([B, B], each row a
    distribution over the batch's reports) or the caption logits ([B, L, V], each position a
    distribution over the vocabulary, `mask` [B, L] excluding padding). The distribution is over
    the last axis; the teacher is under stop_gradient; the KL is averaged over all leading
    positions (weighted by `mask`). aux: kl (without the temperature^2) and num_examples.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.ndim < 2:
        raise ValueError(
            "`student_logits` and `teacher_logits` must have the same shape [..., C], got "
            f"{student_logits.shape} and {teacher_logits.shape}."
        )
    if mask is not None and mask.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"`mask` must be {student_logits.shape[:-1]} (the logits without the last axis), "
            f"got {mask.shape}."
        )
    if isinstance(temperature, int | float) and temperature <= 0:
        raise ValueError(f"`temperature` must be positive, got {temperature}.")
    teacher_log_probs = jax.nn.log_softmax(
        jax.lax.stop_gradient(_as_float(teacher_logits)) / temperature, axis=-1
    )
    student_log_probs = jax.nn.log_softmax(_as_float(student_logits) / temperature, axis=-1)
    kl = jnp.sum(
        jnp.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs), axis=-1
    )  # [...]
    weights = jnp.ones_like(kl) if mask is None else mask.astype(kl.dtype)
    num_examples = jnp.sum(weights)
    mean_kl = jnp.sum(kl * weights) / jnp.maximum(num_examples, 1.0)
    return temperature**2 * mean_kl, {"kl": mean_kl, "num_examples": num_examples}
