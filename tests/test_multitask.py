"""Tests for the composite multitask model (deepcoro_jax/models/multitask.py).

Semantics, not only shapes: MVM targets against a NumPy patchify + normalise,
the inference entry points against the training call, the FLIP-style 'masked'
option against pixel edits of masked tubelets, study padding end to end,
gradients of the summed losses reaching every parameter, generation against a
NumPy greedy loop over teacher-forced logits, and the analytic FLOP counter
against the matmuls counted in the traced program. Tiny 'mu' sizes on
4x32x32 videos; every jitted function is built once per module.
"""

import functools
import math

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from deepcoro_jax import losses
from deepcoro_jax.models import multitask
from deepcoro_jax.models.multitask import MultitaskModel

VOCAB, TEXT_LEN, CAPTION_LEN = 40, 6, 8
BOS, EOS, PAD = 1, 2, 0
PATCH = (2, 8, 8)
VIDEO_SHAPE = (2, 4, 32, 32, 1)  # [B, T, H, W, C] -> grid (2, 4, 4), N = 32 tubelets
GRID = (2, 4, 4)
MASK_RATIO = 0.75  # tube mask: 4 of 16 spatial positions visible, K = 8, M = 24
NUM_KEEP, NUM_MASKED = 8, 24


def build(**overrides) -> MultitaskModel:
    options = dict(
        vocab_size=VOCAB,
        num_frames=4,
        image_size=32,
        patch_size=PATCH,
        text_max_len=16,
        caption_max_len=CAPTION_LEN,
        pad_id=PAD,
        mask_ratio=MASK_RATIO,
    )
    return multitask.make_model(**{**options, **overrides})


def make_batch(seed: int, video_shape: tuple[int, ...] = VIDEO_SHAPE) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    batch = video_shape[0]
    text_mask = np.ones((batch, TEXT_LEN), np.int32)
    text_mask[0, 4:] = 0
    return {
        "video": rng.normal(size=video_shape).astype(np.float32),
        "text_ids": rng.integers(3, VOCAB, (batch, TEXT_LEN)).astype(np.int32) * text_mask,
        "text_mask": text_mask,
        "caption_in": rng.integers(3, VOCAB, (batch, CAPTION_LEN)).astype(np.int32),
    }


def make_study_batch(seed: int) -> dict[str, np.ndarray]:
    """Two studies of two video slots; the second study's second slot is padding.

    The texts, captions and first videos are those of ``make_batch(seed)``.
    """
    batch = make_batch(seed)
    second = np.random.default_rng(seed + 100).normal(size=VIDEO_SHAPE).astype(np.float32)
    batch["video"] = np.stack([batch["video"], second], axis=1)  # [B, V, T, H, W, C]
    batch["video_mask"] = np.array([[True, True], [True, False]])
    return batch


def np_tubelet_targets(video: np.ndarray) -> np.ndarray:
    """[B, T, H, W, C] -> per-tubelet standardised pixels [B, N, pt*ph*pw*C], in (t, h, w) order."""
    pt, ph, pw = PATCH
    rows = []
    for t in range(GRID[0]):
        for h in range(GRID[1]):
            for w in range(GRID[2]):
                tube = video[:, t * pt : (t + 1) * pt, h * ph : (h + 1) * ph, w * pw : (w + 1) * pw]
                rows.append(tube.reshape(video.shape[0], -1).astype(np.float64))
    patches = np.stack(rows, axis=1)
    mean = patches.mean(-1, keepdims=True)
    return (patches - mean) / np.sqrt(patches.var(-1, keepdims=True) + 1e-6)


def pixels_of_tubelets(indices: np.ndarray) -> np.ndarray:
    """[B, T, H, W, 1] bool: the pixel lies in one of the tubelets ``indices`` [B, M]."""
    t = np.arange(VIDEO_SHAPE[1])[:, None, None] // PATCH[0]
    h = np.arange(VIDEO_SHAPE[2])[None, :, None] // PATCH[1]
    w = np.arange(VIDEO_SHAPE[3])[None, None, :] // PATCH[2]
    token_of_pixel = (t * GRID[1] + h) * GRID[2] + w  # [T, H, W]
    return np.stack([np.isin(token_of_pixel, row) for row in indices])[..., None]


def combined_loss(out: dict, batch: dict) -> jax.Array:
    """The three objectives summed, from losses.py (caption targets: the inputs shifted left)."""
    contrastive, _ = losses.sigmoid_loss(
        out["video_emb"], out["text_emb"], out["log_temperature"], out["bias"]
    )
    targets = jnp.roll(batch["caption_in"], -1, axis=1)
    caption, _ = losses.caption_loss(out["caption_logits"], targets, jnp.ones(targets.shape))
    reconstruction, _ = losses.mvm_loss(out["mvm_pred"], out["mvm_target"], out["mvm_mask"])
    return contrastive + caption + reconstruction


# ----------------------------------------------------------------------------- fixtures

# Every test program is compiled without LLVM's expensive passes: the shapes are
# tiny and compilation, not execution, dominates on CPU. Programs are few and
# each serves several tests.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
fast_jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)
SEED = 1  # the batches: make_batch(SEED) and make_study_batch(SEED) share texts and first videos
MASK_RNG = jax.random.key(5)


def init_contrastive_scalars(module: MultitaskModel) -> tuple[jax.Array, jax.Array]:
    return module.log_temperature, module.bias


def random_params(model: MultitaskModel, seed: int) -> dict:
    """Random parameters of the model's shapes without compiling ``init`` (slow on CPU).

    The contrastive scalars come from the model's own initialisers.
    """
    rngs = {"params": jax.random.key(0), "mask": jax.random.key(1)}
    shapes = jax.eval_shape(functools.partial(model.init, train=False), rngs, make_batch(0))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        noise = rng.normal(size=leaf.shape).astype(np.float32)
        name = path[-1].key
        if name == "kernel":
            return jnp.asarray(noise / np.sqrt(math.prod(leaf.shape[:-1])))
        return jnp.asarray(1.0 + 0.1 * noise if name == "scale" else 0.1 * noise)

    params = jax.tree_util.tree_map_with_path(fill, shapes["params"])
    scalars = model.init(jax.random.key(0), method=init_contrastive_scalars)["params"]
    return {**params, **scalars}


@pytest.fixture(scope="module")
def model() -> MultitaskModel:
    return build()


@pytest.fixture(scope="module")
def params(model):
    return random_params(model, seed=0)


@functools.cache
def jitted_training_step(model: MultitaskModel):
    """(params, batch) -> (loss, (out, aux)), grads: the training call with train=True and MVM."""

    @fast_jit
    def step(params, batch):
        def loss(params):
            rngs = {"mask": MASK_RNG, "dropout": jax.random.key(3)}
            out, aux = model.apply({"params": params}, batch, train=True, rngs=rngs)
            return combined_loss(out, batch), (out, aux)

        return jax.value_and_grad(loss, has_aux=True)(params)

    return step


@pytest.fixture(scope="module")
def training_step(model, params):
    """The training call on make_batch(SEED): batch, out, aux, grads (dropout is 0 in 'mu')."""
    batch = make_batch(SEED)
    (_, (out, aux)), grads = jitted_training_step(model)(params, batch)
    return batch, out, aux, grads


@functools.cache
def jitted_evaluation(model: MultitaskModel):
    """(params, study batch) -> every inference-side call, from one program.

    The study calls with and without MVM; on the studies' first videos alone, the
    training call without MVM, the inference entry points and reconstruct().
    """

    @fast_jit
    def evaluate(params, study):
        def apply(*args, **kwargs):
            return model.apply({"params": params}, *args, **kwargs)

        single = {key: value for key, value in study.items() if key != "video_mask"}
        single["video"] = study["video"][:, 0]
        video_emb, video_aux = apply(single["video"], method=MultitaskModel.encode_video)
        return {
            "study_mvm": apply(study, train=False, rngs={"mask": MASK_RNG}),
            "study_no_mvm": apply(study, train=False, mvm=False),
            "single_no_mvm": apply(single, train=False, mvm=False),
            "encode_video": (video_emb, video_aux),
            "encode_text": apply(
                single["text_ids"], single["text_mask"], method=MultitaskModel.encode_text
            ),
            "caption_logits": apply(
                video_aux["video_tokens"],
                video_aux["video_token_mask"],
                single["caption_in"],
                method=MultitaskModel.caption_logits,
            ),
            "reconstruct": apply(
                single["video"], method=MultitaskModel.reconstruct, rngs={"mask": MASK_RNG}
            ),
        }

    return evaluate


@pytest.fixture(scope="module")
def evaluation(model, params):
    """The study batch, its evaluation calls, and the same with the padded video made noise."""
    study = make_study_batch(SEED)
    noisy = dict(study)
    noisy["video"] = study["video"].copy()
    noisy["video"][1, 1] = np.random.default_rng(3).normal(size=VIDEO_SHAPE[1:]) * 100.0
    evaluate = jitted_evaluation(model)
    return study, evaluate(params, study), noisy, evaluate(params, noisy)


@functools.cache
def jitted_forward(model: MultitaskModel):
    @fast_jit
    def forward(params, batch):
        return model.apply({"params": params}, batch, train=False, rngs={"mask": MASK_RNG})

    return forward


@functools.cache
def jitted_caption_logits(model: MultitaskModel):
    method = MultitaskModel.caption_logits
    return fast_jit(lambda params, *args: model.apply({"params": params}, *args, method=method))


# -------------------------------------------------------------------------------- tests


def test_init_constants_are_siglips():
    assert math.exp(multitask.INIT_LOG_TEMPERATURE) == pytest.approx(10.0)
    assert multitask.INIT_BIAS == -10.0


def test_training_call_outputs(model, params, training_step):
    batch, out, aux, _ = training_step
    embed_dim = model.encoder.hidden_size
    assert out["video_emb"].shape == out["text_emb"].shape == (2, embed_dim)
    for name in ("video_emb", "text_emb"):
        assert out[name].dtype == jnp.float32
        np.testing.assert_allclose(np.linalg.norm(out[name], axis=-1), 1.0, rtol=1e-5)
    assert float(out["log_temperature"]) == pytest.approx(multitask.INIT_LOG_TEMPERATURE)
    assert float(out["bias"]) == multitask.INIT_BIAS
    assert out["caption_logits"].shape == (2, CAPTION_LEN, VOCAB)
    assert out["mvm_pred"].shape == out["mvm_target"].shape == (2, NUM_MASKED, math.prod(PATCH))
    assert out["mvm_mask"].shape == (2, NUM_MASKED) and bool(np.all(out["mvm_mask"]))
    assert aux["video_tokens"].shape == (2, math.prod(GRID), embed_dim)
    assert aux["mvm_visible_tokens"].shape == (2, NUM_KEEP, embed_dim)
    assert aux["text_tokens"].shape == (2, TEXT_LEN, model.text.config.hidden_size)
    keep, masked = np.asarray(aux["mvm_keep_indices"]), np.asarray(aux["mvm_masked_indices"])
    for row_keep, row_masked in zip(keep, masked, strict=True):
        np.testing.assert_array_equal(np.sort(np.r_[row_keep, row_masked]), np.arange(32))
        spatial = row_keep.reshape(GRID[0], -1) % 16  # tube: same positions in every frame
        np.testing.assert_array_equal(spatial[0], spatial[1])
    assert set(params) == {
        "encoder",
        "text",
        "caption_decoder",
        "mvm_decoder",
        "video_projection",
        "text_projection",
        "log_temperature",
        "bias",
    }


def test_mvm_target_is_numpy_patchify_normalise_at_masked_indices(training_step):
    batch, out, aux, _ = training_step
    targets = np_tubelet_targets(batch["video"])  # [B, N, P]
    masked = np.asarray(aux["mvm_masked_indices"])
    expected = np.take_along_axis(targets, masked[:, :, None], axis=1)
    np.testing.assert_allclose(out["mvm_target"], expected, rtol=1e-4, atol=1e-4)


def test_inference_entry_points_equal_the_training_call(training_step, evaluation):
    _, mvm_out, mvm_aux, _ = training_step
    _, calls, _, _ = evaluation
    out, aux = calls["single_no_mvm"]
    assert "mvm_pred" not in out and "mvm_keep_indices" not in aux
    video_emb, _ = calls["encode_video"]
    text_emb, _ = calls["encode_text"]
    np.testing.assert_allclose(video_emb, out["video_emb"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(text_emb, out["text_emb"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(calls["caption_logits"], out["caption_logits"], atol=1e-5)

    # contrastive_tokens='full' with MVM: the heads see the full pass, same as without MVM.
    np.testing.assert_allclose(mvm_out["video_emb"], out["video_emb"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mvm_out["text_emb"], out["text_emb"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mvm_out["caption_logits"], out["caption_logits"], atol=1e-5)

    # reconstruct() is the training call's MVM part, for the same 'mask' rng.
    recon_out, recon_aux = calls["reconstruct"]
    for name in ("mvm_keep_indices", "mvm_masked_indices"):
        np.testing.assert_array_equal(recon_aux[name], mvm_aux[name])
    for name in ("mvm_pred", "mvm_target", "mvm_mask"):
        np.testing.assert_allclose(recon_out[name], mvm_out[name], rtol=1e-5, atol=1e-5)


def test_masked_contrastive_tokens_see_only_visible_tubelets(model, params, training_step):
    batch, full_out, aux, _ = training_step
    edited = dict(batch)
    hidden = pixels_of_tubelets(np.asarray(aux["mvm_masked_indices"]))
    noise = np.random.default_rng(8).normal(size=VIDEO_SHAPE).astype(np.float32)
    edited["video"] = np.where(hidden, 3.0 * noise, batch["video"])

    masked_forward = jitted_forward(model.clone(contrastive_tokens="masked"))
    before, before_aux = masked_forward(params, batch)
    after, _ = masked_forward(params, edited)
    np.testing.assert_array_equal(before_aux["mvm_masked_indices"], aux["mvm_masked_indices"])
    # FLIP-style: one pass on the visible tokens feeds every head.
    assert before_aux["video_tokens"].shape[1] == NUM_KEEP
    np.testing.assert_allclose(before["video_emb"], after["video_emb"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(before["caption_logits"], after["caption_logits"], atol=1e-5)
    np.testing.assert_allclose(before["mvm_pred"], after["mvm_pred"], atol=1e-5)
    np.testing.assert_allclose(before["mvm_pred"], full_out["mvm_pred"], atol=1e-5)
    assert not np.allclose(before["video_emb"], full_out["video_emb"], atol=1e-4)
    # ... while the targets, and the 'full' model's embedding, do change.
    assert not np.allclose(before["mvm_target"], after["mvm_target"], atol=1e-3)
    (_, (full_after, _)), _ = jitted_training_step(model)(params, edited)
    assert not np.allclose(full_after["video_emb"], full_out["video_emb"], atol=1e-4)
    np.testing.assert_allclose(full_after["mvm_pred"], full_out["mvm_pred"], atol=1e-5)


def test_study_padding_never_changes_any_output(evaluation):
    study, clean, noisy, noisy_calls = evaluation
    for mode in ("study_no_mvm", "study_mvm"):
        out, aux = clean[mode]
        noisy_out, _ = noisy_calls[mode]
        for name in ("video_emb", "text_emb", "caption_logits"):
            np.testing.assert_allclose(
                out[name], noisy_out[name], rtol=1e-5, atol=1e-5, err_msg=f"{mode} {name}"
            )
        assert aux["video_token_mask"].shape == (2, 2 * math.prod(GRID))

    out, aux = clean["study_mvm"]
    noisy_out, _ = noisy_calls["study_mvm"]
    assert aux["mvm_keep_indices"].shape == (2, 2, NUM_KEEP)
    valid = np.asarray(out["mvm_mask"])
    np.testing.assert_array_equal(valid[0], True)
    np.testing.assert_array_equal(valid[1], np.arange(2 * NUM_MASKED) < NUM_MASKED)
    assert np.all(np.asarray(out["mvm_target"])[1, NUM_MASKED:] == 0)
    for name in ("mvm_pred", "mvm_target"):
        np.testing.assert_allclose(
            np.asarray(out[name])[valid], np.asarray(noisy_out[name])[valid], atol=1e-5
        )
    loss = fast_jit(combined_loss)
    np.testing.assert_allclose(loss(out, study), loss(noisy_out, noisy), rtol=1e-5)
    # Study 0's second video: the NumPy targets at its masked indices.
    masked = np.asarray(aux["mvm_masked_indices"])[0, 1]
    expected = np_tubelet_targets(study["video"][:1, 1])[0, masked]
    np.testing.assert_allclose(np.asarray(out["mvm_target"])[0, NUM_MASKED:], expected, atol=1e-4)

    # A study with one real video is that video alone, for every head.
    out, _ = clean["study_no_mvm"]
    alone, _ = clean["single_no_mvm"]
    np.testing.assert_allclose(out["video_emb"][1], alone["video_emb"][1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["caption_logits"][1], alone["caption_logits"][1], atol=1e-4)
    assert not np.allclose(out["video_emb"][0], alone["video_emb"][0], atol=1e-4)


def test_combined_loss_reaches_every_parameter(training_step):
    *_, grads = training_step
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    dead = [jax.tree_util.keystr(path) for path, g in flat if not np.any(np.asarray(g) != 0)]
    assert dead == [], dead
    assert all(np.all(np.isfinite(g)) for _, g in flat)
    names = {jax.tree_util.keystr(path) for path, _ in flat}
    assert "['log_temperature']" in names and "['bias']" in names


def reference_greedy(model, params, memory, memory_mask, eos_id):
    """Greedy decoding in NumPy over teacher-forced logits of the whole prefix (no cache)."""
    logits_fn = jitted_caption_logits(model)
    batch = memory.shape[0]
    tokens = np.full((batch, CAPTION_LEN), PAD, np.int32)
    finished = np.zeros(batch, bool)
    for step in range(CAPTION_LEN):
        prefix = np.concatenate([np.full((batch, 1), BOS, np.int32), tokens[:, :-1]], axis=1)
        logits = np.asarray(logits_fn(params, memory, memory_mask, prefix))
        next_tokens = np.where(finished, PAD, logits[:, step].argmax(-1))
        tokens[:, step] = next_tokens
        finished |= next_tokens == eos_id
    return tokens


def test_generate_equals_greedy_decoding(model, params, evaluation):
    study, calls, _, _ = evaluation
    _, aux = calls["study_no_mvm"]
    memory, memory_mask = aux["video_tokens"], aux["video_token_mask"]
    # An EOS that the first study really emits, so that pads must follow it.
    no_eos = reference_greedy(model, params, memory, memory_mask, eos_id=-1)[0]
    eos_step = max(i for i in range(CAPTION_LEN) if no_eos[i] not in no_eos[:i])
    eos = int(no_eos[eos_step])
    reference = reference_greedy(model, params, memory, memory_mask, eos)

    generated = multitask.generate(
        model, params, study["video"], study["video_mask"], bos_id=BOS, eos_id=eos, pad_id=PAD
    )
    np.testing.assert_array_equal(generated.tokens, reference)
    assert generated.tokens[0, eos_step] == eos
    assert np.all(generated.tokens[0, eos_step + 1 :] == PAD)
    video = study["video"][:, 0]
    with pytest.raises(ValueError, match="rng"):
        multitask.generate(model, params, video, bos_id=BOS, eos_id=EOS, pad_id=PAD, rng=0)
    with pytest.raises(ValueError, match="strategy"):
        multitask.generate(model, params, video, bos_id=BOS, eos_id=EOS, pad_id=PAD, strategy="x")


def test_bfloat16_compute_with_float32_params(params, training_step):
    bf16_model = build(dtype="bfloat16")
    shapes = jax.eval_shape(
        functools.partial(bf16_model.init, train=False),
        {"params": jax.random.key(0), "mask": jax.random.key(1)},
        make_batch(0),
    )["params"]
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    assert jax.tree.structure(shapes) == jax.tree.structure(params)
    batch, reference, _, _ = training_step
    out, aux = jitted_forward(bf16_model)(params, batch)
    assert aux["video_tokens"].dtype == aux["text_tokens"].dtype == jnp.bfloat16
    for name in ("video_emb", "text_emb", "caption_logits", "mvm_pred"):
        assert out[name].dtype == jnp.float32
        assert np.all(np.isfinite(out[name]))
    cosine = np.sum(np.asarray(out["video_emb"]) * np.asarray(reference["video_emb"]), axis=-1)
    assert np.all(cosine > 0.99), cosine


# ------------------------------------------------------------------------------- FLOPs


def matmul_flops(jaxpr: jax.extend.core.Jaxpr) -> int:
    """2 x multiply-accumulates of every dot_general and convolution, sub-programs included."""
    total = 0
    for eqn in jaxpr.eqns:
        out = eqn.outvars[0].aval
        if eqn.primitive.name == "dot_general":
            (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval
            total += 2 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in lhs_contracting)
        elif eqn.primitive.name == "conv_general_dilated":
            kernel = eqn.invars[1].aval
            out_features = kernel.shape[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += 2 * math.prod(out.shape) * math.prod(kernel.shape) // out_features
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    total += matmul_flops(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    total += matmul_flops(sub)
    return total


@pytest.mark.parametrize(
    "overrides, study, mvm",
    [
        ({}, False, True),
        ({}, False, False),
        ({"contrastive_tokens": "masked", "mask_type": "random"}, True, True),
        (
            {"encoder_overrides": {"stem": "conv", "stem_features": (4, 8, 8), "pool_type": "max"}},
            False,
            True,
        ),
        (
            {
                "contrastive_tokens": "masked",
                "encoder_overrides": {
                    "attention_type": "factorized_encoder",
                    "temporal_depth": 1,
                    "pool_type": "mean",
                },
                "caption_decoder_overrides": {"hidden_size": 32, "tie_embeddings": False},
                "text_overrides": {"intermediate_size": 96},
                "embed_dim": 24,
            },
            False,
            True,
        ),
    ],
)
def test_analytic_flops_equal_the_traced_matmuls(overrides, study, mvm):
    model = build(**overrides)
    batch = make_study_batch(0) if study else make_batch(0)
    rngs = {"params": jax.random.key(0), "mask": jax.random.key(1)}
    shapes = jax.eval_shape(functools.partial(model.init, train=False), rngs, batch)
    jaxpr = jax.make_jaxpr(
        lambda variables: model.apply(
            variables, batch, train=False, mvm=mvm, rngs={"mask": jax.random.key(1)}
        )
    )(shapes)
    counted = matmul_flops(jaxpr.jaxpr)
    flops = multitask.training_flops_per_example(
        model, batch["video"].shape[1:], TEXT_LEN, CAPTION_LEN, mvm=mvm
    )
    batch_size = batch["video"].shape[0]
    assert flops["forward"] * batch_size == counted
    assert flops["training"] == 3 * flops["forward"]
    assert (flops["mvm_decoder"] > 0) == mvm


# ------------------------------------------------------------------------- bad inputs


def test_bad_configuration_and_inputs_raise_clear_errors(model, params):
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        build(encoder_size="huge")
    with pytest.raises(ValueError, match="caption decoder size"):
        build(caption_decoder_size="huge")
    with pytest.raises(ValueError, match="encoder_overrides.*depht"):
        build(encoder_overrides={"depht": 3})
    # A config read back from JSON holds lists; the model must stay hashable for jit.
    from_json = build(encoder_overrides={"stem": "conv", "stem_features": [4, 8, 8]})
    assert from_json.encoder.stem_features == (4, 8, 8)
    hash(from_json)
    with pytest.raises(ValueError, match="text_size or text_hf_config"):
        build(text_size="mu", text_hf_config="/nonexistent")
    with pytest.raises(FileNotFoundError, match="config"):
        build(text_hf_config="/nonexistent")
    batch = make_batch(0)
    rngs = {"mask": jax.random.key(0)}

    def run(model, batch):
        return jax.eval_shape(
            lambda: model.apply({"params": params}, batch, train=False, rngs=rngs)
        )

    with pytest.raises(KeyError, match="text_ids"):
        run(model, {k: v for k, v in batch.items() if k != "text_ids"})
    with pytest.raises(ValueError, match="contrastive_tokens"):
        run(model.clone(contrastive_tokens="half"), batch)
    with pytest.raises(ValueError, match="mask_type='tube'"):
        run(
            build(encoder_overrides={"attention_type": "factorized_encoder"}, mask_type="random"),
            batch,
        )
    with pytest.raises(ValueError, match="patch_dim=64"):
        jax.eval_shape(
            functools.partial(build(mvm_decoder_overrides={"patch_dim": 64}).init, train=False),
            {"params": jax.random.key(0), "mask": jax.random.key(1)},
            batch,
        )
    with pytest.raises(ValueError, match="video_mask"):
        run(model, make_study_batch(0) | {"video_mask": np.ones((2, 3), bool)})
