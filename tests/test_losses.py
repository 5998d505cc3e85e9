"""Tests for deepcoro_jax.losses against NumPy references written here, independently."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.test_util import check_grads

from deepcoro_jax import losses
from deepcoro_jax.models import multitask

BATCH, DIM = 16, 8
# Duplicate reports on different devices (8 devices x 2 examples) and on the same device.
REPORT_IDS = np.array([0, 1, 2, 3, 0, 5, 6, 7, 1, 9, 10, 3, 12, 13, 14, 0])


# ---------------------------------------------------------------- NumPy references


def np_normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_log_softmax(x):
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def np_sigmoid_loss(video, text, log_temperature, bias, positives):
    logits = np.exp(log_temperature) * np_normalize(video) @ np_normalize(text).T + bias
    labels = np.where(positives, 1.0, -1.0)
    return np.logaddexp(0.0, -labels * logits).sum() / len(video)


def np_softmax_loss(video, text, log_temperature, positives):
    logits = np.exp(log_temperature) * np_normalize(video) @ np_normalize(text).T

    def one_direction(scores, pos):
        row_losses = []
        for row, row_pos in zip(scores, pos, strict=True):
            if row_pos.sum() == 0:
                continue
            target = row_pos / row_pos.sum()
            row_losses.append(-(target * np_log_softmax(row)).sum())
        return np.mean(row_losses)

    return (one_direction(logits, positives) + one_direction(logits.T, positives.T)) / 2


def np_caption_loss(logits, targets, mask, eps):
    vocab = logits.shape[-1]
    total, count = 0.0, 0.0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            smoothed = np.full(vocab, eps / vocab)
            smoothed[targets[b, t]] += 1.0 - eps
            total += mask[b, t] * -(smoothed * np_log_softmax(logits[b, t])).sum()
            count += mask[b, t]
    return total / count


def np_mvm_loss(pred, target, mask):
    per_tubelet = ((pred - target) ** 2).mean(axis=-1)
    return (per_tubelet * mask).sum() / mask.sum()


def np_distillation(student, teacher, temperature, mask):
    p_teacher = np.exp(np_log_softmax(teacher / temperature))
    kl = (p_teacher * (np_log_softmax(teacher / temperature)
                       - np_log_softmax(student / temperature))).sum(-1)
    return temperature**2 * (kl * mask).sum() / mask.sum()


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def embeddings():
    rng = np.random.default_rng(0)
    video = rng.normal(size=(BATCH, DIM)).astype(np.float32)
    text = (video + 0.5 * rng.normal(size=(BATCH, DIM))).astype(np.float32)
    return video, text


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((8,), ("data",))


def same_report_mask(ids):
    return np.array([[ids[i] == ids[j] for j in range(len(ids))] for i in range(len(ids))])


# ---------------------------------------------------------------- positives


def test_positives_from_ids_integer_and_token_rows():
    np.testing.assert_array_equal(
        losses.positives_from_ids(jnp.asarray(REPORT_IDS), jnp.asarray(REPORT_IDS)),
        same_report_mask(REPORT_IDS),
    )
    token_rows = np.array([[5, 7, 0], [5, 7, 0], [5, 8, 0], [5, 7, 1]])
    expected = np.array([[(a == b).all() for b in token_rows] for a in token_rows])
    got = losses.positives_from_ids(jnp.asarray(token_rows), jnp.asarray(token_rows[:2]))
    np.testing.assert_array_equal(got, expected[:, :2])
    np.testing.assert_array_equal(
        losses.contrastive_positives("diagonal", jnp.asarray(token_rows)), np.eye(4, dtype=bool)
    )
    np.testing.assert_array_equal(
        losses.contrastive_positives("same_report", jnp.asarray(token_rows)), expected
    )
    findings_ids = np.array([3, -7, 3, 3], np.int32)  # the pipeline's findings_id, [B]
    np.testing.assert_array_equal(
        losses.contrastive_positives("same_findings", jnp.asarray(findings_ids)),
        findings_ids[:, None] == findings_ids[None, :],
    )
    with pytest.raises(ValueError, match="kind"):
        losses.contrastive_positives("identical", jnp.asarray(token_rows))
    with pytest.raises(ValueError, match="report_ids_a"):
        losses.positives_from_ids(jnp.zeros((4, 3)), jnp.zeros((4, 2)))


# ---------------------------------------------------------------- sigmoid


@pytest.mark.parametrize("kind", ["diagonal", "same_report"])
def test_sigmoid_loss_matches_numpy(embeddings, kind):
    video, text = embeddings
    positives = np.eye(BATCH, dtype=bool) if kind == "diagonal" else same_report_mask(REPORT_IDS)
    loss, aux = losses.sigmoid_loss(
        video, text, np.float32(np.log(5.0)), np.float32(-2.0), jnp.asarray(positives)
    )
    expected = np_sigmoid_loss(video.astype(np.float64), text, np.log(5.0), -2.0, positives)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    expected_logits = 5.0 * np_normalize(video) @ np_normalize(text).T - 2.0
    np.testing.assert_allclose(aux["logits"], expected_logits, rtol=1e-5, atol=1e-5)
    assert aux["pair_accuracy"] == pytest.approx(np.mean((expected_logits > 0) == positives))


def test_sigmoid_default_is_diagonal_and_same_report_matters(embeddings):
    video, text = embeddings
    init = (multitask.INIT_LOG_TEMPERATURE, multitask.INIT_BIAS)
    args = (video, text, *(np.float32(x) for x in init))
    diagonal, _ = losses.sigmoid_loss(*args)
    explicit_diagonal, _ = losses.sigmoid_loss(*args, jnp.eye(BATCH, dtype=bool))
    np.testing.assert_allclose(diagonal, explicit_diagonal, rtol=1e-6)
    duplicated = losses.contrastive_positives("same_report", jnp.asarray(REPORT_IDS))
    same_report, _ = losses.sigmoid_loss(*args, duplicated)
    assert abs(float(same_report) - float(diagonal)) > 1e-3
    distinct = losses.contrastive_positives("same_report", jnp.arange(BATCH))
    all_distinct, _ = losses.sigmoid_loss(*args, distinct)
    np.testing.assert_allclose(all_distinct, diagonal, rtol=1e-6)


def test_sigmoid_loss_gradients_float64(embeddings):
    video, text = embeddings
    positives = jnp.asarray(same_report_mask(REPORT_IDS))
    with jax.enable_x64(True):
        args = tuple(jnp.asarray(x, jnp.float64) for x in (video, text, np.log(5.0), -2.0))
        loss_fn = jax.jit(lambda v, u, t, b: losses.sigmoid_loss(v, u, t, b, positives)[0])
        assert loss_fn(*args).dtype == jnp.float64
        check_grads(loss_fn, args, order=1, modes=("rev",))


def test_sigmoid_bfloat16_inputs_compute_in_float32(embeddings):
    video, text = (jnp.asarray(x, jnp.bfloat16) for x in embeddings)
    loss, aux = losses.sigmoid_loss(video, text, jnp.bfloat16(np.log(5.0)), jnp.bfloat16(-2.0))
    assert loss.dtype == jnp.float32 and aux["logits"].dtype == jnp.float32
    expected = np_sigmoid_loss(
        np.asarray(video, np.float64), np.asarray(text, np.float64),
        float(jnp.bfloat16(np.log(5.0))), -2.0, np.eye(BATCH, dtype=bool),
    )
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_sigmoid_loss_bad_shapes():
    with pytest.raises(ValueError, match="video_emb"):
        losses.sigmoid_loss(jnp.zeros((4, 3)), jnp.zeros((4, 2)), 0.0, 0.0)
    with pytest.raises(ValueError, match="positives"):
        losses.sigmoid_loss(jnp.ones((4, 3)), jnp.ones((4, 3)), 0.0, 0.0, jnp.eye(3))
    with pytest.raises(ValueError, match="log_temperature"):
        losses.sigmoid_loss(jnp.ones((4, 3)), jnp.ones((4, 3)), jnp.zeros(2), 0.0)


# ---------------------------------------------------------------- sharded sigmoid


def _plain_and_sharded(mesh, ids, axis_name="data"):
    positives = None if ids is None else losses.positives_from_ids(ids, ids)

    def plain(video, text, log_temperature, bias):
        return losses.sigmoid_loss(video, text, log_temperature, bias, positives)

    def sharded(video, text, log_temperature, bias):
        return losses.sigmoid_loss_sharded(
            video, text, log_temperature, bias,
            mesh=mesh, axis_name=axis_name, same_report_ids=ids,
        )

    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))
    return grad(plain), grad(sharded)


@pytest.mark.parametrize("ids_kind", ["diagonal", "integer_ids", "token_rows"])
def test_sigmoid_sharded_equals_plain_without_global_logits(embeddings, mesh, ids_kind):
    video, text = embeddings
    if ids_kind == "diagonal":
        ids = None
    elif ids_kind == "integer_ids":
        ids = jnp.asarray(REPORT_IDS)
    else:  # padded token rows [B, L]; equal rows exactly where REPORT_IDS are equal
        ids = jnp.asarray(np.stack([REPORT_IDS % 5, REPORT_IDS // 5, np.zeros(BATCH, int)], 1))
    args = (video, text, jnp.float32(np.log(5.0)), jnp.float32(-2.0))
    plain, sharded = (f.lower(*args).compile() for f in _plain_and_sharded(mesh, ids))
    (plain_loss, plain_aux), plain_grads = plain(*args)
    (sharded_loss, sharded_aux), sharded_grads = sharded(*args)
    np.testing.assert_allclose(sharded_loss, plain_loss, rtol=1e-5, atol=1e-5)
    for name, p, s in zip(("video", "text", "log_t", "bias"), plain_grads, sharded_grads,
                          strict=True):
        np.testing.assert_allclose(s, p, rtol=1e-5, atol=1e-5, err_msg=name)
    for key in ("pair_accuracy", "positives_per_video", "temperature", "bias"):
        np.testing.assert_allclose(sharded_aux[key], plain_aux[key], rtol=1e-6, err_msg=key)
    expected_positives = 1.0 if ids is None else same_report_mask(REPORT_IDS).sum() / BATCH
    assert float(sharded_aux["positives_per_video"]) == pytest.approx(expected_positives)

    # Memory: the per-device program holds [B_local, B_local] blocks, never [B, B] ones.
    global_block = re.compile(rf"\[{BATCH},{BATCH}\]")
    local = BATCH // 8
    assert global_block.search(plain.as_text())  # the check can fire
    sharded_hlo = sharded.as_text()
    assert not global_block.search(sharded_hlo)
    assert re.search(rf"f32\[{local},{local}\]", sharded_hlo)
    assert "collective-permute" in sharded_hlo


def test_sigmoid_sharded_over_two_auto_mesh_axes(embeddings):
    video, text = embeddings
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto, AxisType.Auto))
    args = (video, text, jnp.float32(np.log(5.0)), jnp.float32(-2.0))
    ids = jnp.asarray(REPORT_IDS)
    loss, _ = jax.jit(
        lambda *a: losses.sigmoid_loss_sharded(
            *a, mesh=mesh, axis_name=("data", "fsdp"), same_report_ids=ids
        )
    )(*args)
    expected = np_sigmoid_loss(video, text, np.log(5.0), -2.0, same_report_mask(REPORT_IDS))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_sigmoid_sharded_bad_arguments(embeddings, mesh):
    video, text = embeddings
    with pytest.raises(ValueError, match="divide evenly"):
        losses.sigmoid_loss_sharded(video[:12], text[:12], 0.0, 0.0, mesh=mesh)
    with pytest.raises(ValueError, match="axis_name"):
        losses.sigmoid_loss_sharded(video, text, 0.0, 0.0, mesh=mesh, axis_name="batch")
    with pytest.raises(ValueError, match="same_report_ids"):
        losses.sigmoid_loss_sharded(
            video, text, 0.0, 0.0, mesh=mesh, same_report_ids=jnp.arange(8)
        )
    mixed = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Explicit, AxisType.Auto))
    with pytest.raises(ValueError, match="mixes axis types"):
        losses.sigmoid_loss_sharded(video, text, 0.0, 0.0, mesh=mixed, axis_name=("data", "fsdp"))


# ---------------------------------------------------------------- softmax


@pytest.mark.parametrize("kind", ["diagonal", "same_report"])
def test_softmax_loss_matches_numpy(embeddings, kind):
    video, text = embeddings
    positives = np.eye(BATCH, dtype=bool) if kind == "diagonal" else same_report_mask(REPORT_IDS)
    loss, aux = losses.softmax_loss(video, text, np.float32(np.log(10.0)), jnp.asarray(positives))
    expected = np_softmax_loss(video.astype(np.float64), text, np.log(10.0), positives)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    best = np.argmax(10.0 * np_normalize(video) @ np_normalize(text).T, axis=-1)
    assert float(aux["top1_accuracy"]) == pytest.approx(positives[np.arange(BATCH), best].mean())


def test_softmax_loss_diagonal_is_clip_and_skips_rows_without_positive(embeddings):
    video, text = embeddings
    loss, _ = losses.softmax_loss(video, text, np.float32(np.log(10.0)))
    logits = 10.0 * np_normalize(video.astype(np.float64)) @ np_normalize(text).T
    labels = np.arange(BATCH)
    clip = -(np_log_softmax(logits)[labels, labels].mean()
             + np_log_softmax(logits.T)[labels, labels].mean()) / 2
    np.testing.assert_allclose(loss, clip, rtol=1e-5)
    positives = np.eye(BATCH, dtype=bool)
    positives[3, 3] = False  # video 3 and text 3 have no positive: both are skipped
    loss, _ = losses.softmax_loss(video, text, np.float32(np.log(10.0)), jnp.asarray(positives))
    np.testing.assert_allclose(loss, np_softmax_loss(video, text, np.log(10.0), positives),
                               rtol=1e-5)


def test_softmax_loss_gradients_float64(embeddings):
    video, text = embeddings
    positives = jnp.asarray(same_report_mask(REPORT_IDS))
    with jax.enable_x64(True):
        args = tuple(jnp.asarray(x, jnp.float64) for x in (video, text, np.log(10.0)))
        loss_fn = jax.jit(lambda v, u, t: losses.softmax_loss(v, u, t, positives)[0])
        check_grads(loss_fn, args, order=1, modes=("rev",))


# ---------------------------------------------------------------- captioning


@pytest.fixture(scope="module")
def caption_batch():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32)
    targets = rng.integers(0, 11, size=(3, 5))
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], np.float32)
    return logits, targets, mask


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_caption_loss_matches_numpy(caption_batch, eps):
    logits, targets, mask = caption_batch
    loss, aux = losses.caption_loss(logits, targets, mask, label_smoothing=eps)
    np.testing.assert_allclose(loss, np_caption_loss(logits, targets, mask, eps), rtol=1e-5)
    np.testing.assert_allclose(aux["nll"], np_caption_loss(logits, targets, mask, 0.0), rtol=1e-5)
    assert float(aux["num_tokens"]) == mask.sum()
    correct = (logits.argmax(-1) == targets) * mask
    assert float(aux["token_accuracy"]) == pytest.approx(correct.sum() / mask.sum())


def test_caption_label_smoothing_changes_the_optimum():
    # A confident correct prediction: smoothing penalises over-confidence, plain CE does not.
    logits = np.zeros((1, 1, 4), np.float32)
    logits[0, 0, 2] = 30.0
    targets, mask = np.array([[2]]), np.ones((1, 1))
    plain, _ = losses.caption_loss(logits, targets, mask)
    smoothed, _ = losses.caption_loss(logits, targets, mask, label_smoothing=0.2)
    assert float(plain) < 1e-6
    np.testing.assert_allclose(smoothed, 0.2 * 30.0 * 3 / 4, rtol=1e-4)


def test_caption_loss_ignores_padding(caption_batch):
    logits, targets, mask = caption_batch
    rng = np.random.default_rng(2)
    changed_logits = np.where(mask[..., None] > 0, logits, 100 * rng.normal(size=logits.shape))
    changed_targets = np.where(mask > 0, targets, 0)
    loss_and_grad = jax.jit(jax.value_and_grad(
        lambda lg, tg: losses.caption_loss(lg, tg, mask, label_smoothing=0.1)[0]
    ))
    loss, grads = loss_and_grad(logits, targets)
    changed_loss, changed_grads = loss_and_grad(changed_logits.astype(np.float32),
                                                changed_targets)
    np.testing.assert_allclose(changed_loss, loss, rtol=1e-6)
    np.testing.assert_allclose(changed_grads, grads, atol=1e-7)
    assert np.all(np.asarray(grads)[mask == 0] == 0)


def test_caption_loss_micro_batches_combine_exactly(caption_batch):
    logits, targets, mask = caption_batch
    full, _ = losses.caption_loss(logits, targets, mask, label_smoothing=0.1)
    parts = [losses.caption_loss(logits[s], targets[s], mask[s], label_smoothing=0.1)[1]
             for s in (slice(0, 1), slice(1, 3))]
    combined = sum(p["loss_sum"] for p in parts) / sum(p["num_tokens"] for p in parts)
    np.testing.assert_allclose(combined, full, rtol=1e-6)


def test_caption_loss_gradients_float64(caption_batch):
    logits, targets, mask = caption_batch
    with jax.enable_x64(True):
        check_grads(
            jax.jit(lambda lg: losses.caption_loss(lg, targets, mask, label_smoothing=0.1)[0]),
            (jnp.asarray(logits, jnp.float64),), order=1, modes=("rev",),
        )


def test_caption_loss_bad_arguments(caption_batch):
    logits, targets, mask = caption_batch
    with pytest.raises(ValueError, match="targets"):
        losses.caption_loss(logits, targets[:, :4], mask)
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.caption_loss(logits, targets, mask, label_smoothing=1.0)


# ---------------------------------------------------------------- MVM


@pytest.fixture(scope="module")
def mvm_batch():
    rng = np.random.default_rng(3)
    pred = rng.normal(size=(3, 4, 6)).astype(np.float32)
    target = rng.normal(size=(3, 4, 6)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]], np.float32)  # video 3: padding
    return pred, target, mask


def test_mvm_loss_matches_numpy_and_ignores_padded(mvm_batch):
    pred, target, mask = mvm_batch
    loss, aux = losses.mvm_loss(pred, target, mask)
    np.testing.assert_allclose(loss, np_mvm_loss(pred, target, mask), rtol=1e-6)
    assert float(aux["num_tubelets"]) == 8
    changed = pred.copy()
    changed[2] += 50.0
    np.testing.assert_allclose(losses.mvm_loss(changed, target, mask)[0], loss, rtol=1e-6)
    grads = jax.grad(lambda p: losses.mvm_loss(p, target, mask)[0])(pred)
    assert np.all(np.asarray(grads)[2] == 0)
    unweighted, _ = losses.mvm_loss(pred, target)
    np.testing.assert_allclose(unweighted, np_mvm_loss(pred, target, np.ones((3, 4))), rtol=1e-6)


def test_mvm_loss_gradients_float64(mvm_batch):
    pred, target, mask = mvm_batch
    with jax.enable_x64(True):
        target64 = jnp.asarray(target, jnp.float64)
        check_grads(jax.jit(lambda p: losses.mvm_loss(p, target64, mask)[0]),
                    (jnp.asarray(pred, jnp.float64),), order=1, modes=("rev",))


def test_mvm_loss_bad_arguments(mvm_batch):
    pred, target, mask = mvm_batch
    with pytest.raises(ValueError, match="target"):
        losses.mvm_loss(pred, target[:, :3])
    with pytest.raises(ValueError, match="mask"):
        losses.mvm_loss(pred, target, mask[:, :3])


# ---------------------------------------------------------------- distillation


@pytest.fixture(scope="module")
def distillation_batch():
    rng = np.random.default_rng(4)
    student = rng.normal(size=(2, 3, 7)).astype(np.float32)
    teacher = rng.normal(size=(2, 3, 7)).astype(np.float32)
    mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    return student, teacher, mask


def test_distillation_matches_numpy(distillation_batch):
    student, teacher, mask = distillation_batch
    loss, aux = losses.distillation_loss(student, teacher, 2.0, mask)
    np.testing.assert_allclose(loss, np_distillation(student, teacher, 2.0, mask), rtol=1e-5)
    np.testing.assert_allclose(aux["kl"] * 4.0, loss, rtol=1e-6)
    unmasked, _ = losses.distillation_loss(student, teacher, 2.0)
    np.testing.assert_allclose(
        unmasked, np_distillation(student, teacher, 2.0, np.ones((2, 3))), rtol=1e-5
    )


def test_distillation_zero_at_teacher_and_no_teacher_gradient(distillation_batch):
    student, teacher, mask = distillation_batch
    same, _ = losses.distillation_loss(teacher, teacher, 3.0, mask)
    assert abs(float(same)) < 1e-6
    teacher_grad = jax.grad(lambda t: losses.distillation_loss(student, t, 2.0, mask)[0])(teacher)
    np.testing.assert_array_equal(teacher_grad, np.zeros_like(teacher))
    student_grad = jax.grad(lambda s: losses.distillation_loss(s, teacher, 2.0, mask)[0])(student)
    assert np.abs(np.asarray(student_grad)).max() > 1e-3


def test_distillation_gradients_float64(distillation_batch):
    student, teacher, mask = distillation_batch
    with jax.enable_x64(True):
        teacher64 = jnp.asarray(teacher, jnp.float64)
        check_grads(
            jax.jit(lambda s: losses.distillation_loss(s, teacher64, 2.0, mask)[0]),
            (jnp.asarray(student, jnp.float64),), order=1, modes=("rev",),
        )


def test_distillation_bad_arguments(distillation_batch):
    student, teacher, mask = distillation_batch
    with pytest.raises(ValueError, match="teacher_logits"):
        losses.distillation_loss(student, teacher[..., :5], 1.0)
    with pytest.raises(ValueError, match="mask"):
        losses.distillation_loss(student, teacher, 1.0, mask[:, :2])
    with pytest.raises(ValueError, match="temperature"):
        losses.distillation_loss(student, teacher, 0.0)
