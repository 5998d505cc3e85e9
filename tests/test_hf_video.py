"""Hugging Face VideoMAE and ViViT weights in and out (deepcoro_jax/models/hf_video.py).

Against ``transformers``' PyTorch models with random weights of small odd shapes
(3 heads, 2-3 layers), saved with ``save_pretrained``: our tokens and pooled
outputs equal PyTorch's ``last_hidden_state`` and pooled output, VideoMAE's
pretraining decoder equals ``VideoMAEForPreTraining``'s logits on the same mask,
and a folder we export loads in PyTorch with the same outputs. The position
table interpolation is checked against PyTorch's ``interpolate``, the sinusoid
against transformers' own table, and layer-wise lr decay against its formula.
"""

import json
import shutil

import evaltools
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file
from transformers.models.videomae import modeling_videomae

from deepcoro_jax.models import common, hf_video, mvm, vivit
from deepcoro_jax.tools import export_hf, inference
from deepcoro_jax.training import optim, train

torch.set_num_threads(1)
TOL = 1e-4

VIDEOMAE = dict(
    image_size=32, patch_size=16, num_channels=3, num_frames=4, tubelet_size=2, hidden_size=24,
    num_hidden_layers=3, num_attention_heads=3, intermediate_size=40, decoder_hidden_size=16,
    decoder_num_hidden_layers=2, decoder_num_attention_heads=2, decoder_intermediate_size=24,
)
VIVIT = dict(
    image_size=32, num_frames=4, tubelet_size=[2, 16, 16], num_channels=3, hidden_size=24,
    num_hidden_layers=2, num_attention_heads=3, intermediate_size=40,
)


def _randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """`model` with every weight random (no zero [CLS], position table or bias)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(0.3 * torch.randn_like(param))
    return model.eval()


def _saved(model: torch.nn.Module, folder) -> str:
    model.save_pretrained(folder)
    return str(folder)


def _video(seed: int, channels: int = 3, frames: int = 4, size: int = 32) -> np.ndarray:
    """[B, T, C, H, W] float32: PyTorch's pixel_values."""
    return np.random.default_rng(seed).normal(size=(2, frames, channels, size, size)).astype(
        np.float32
    )


def _ours(video: np.ndarray) -> jax.Array:
    return jnp.asarray(video.transpose(0, 1, 3, 4, 2))  # [B, T, H, W, C]


def _torch(model, video: np.ndarray, **kwargs):
    with torch.no_grad():
        return model(torch.from_numpy(video), **kwargs)


# ----------------------------------------------------------------------- import


@pytest.mark.parametrize(
    "options",
    [
        dict(use_mean_pooling=False),  # pre-trained checkpoints: a final LayerNorm
        dict(use_mean_pooling=True, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
        dict(use_mean_pooling=False, qv_bias=False),
    ],
    ids=["final_norm", "mean_pooling_tanh_gelu", "no_qv_bias"],
)
def test_videomae_tokens_and_pooled_match_pytorch(options, tmp_path):
    config = transformers.VideoMAEConfig(**VIDEOMAE, **options)
    hf = _randomized(transformers.VideoMAEModel(config), seed=1)
    model, params = vivit.from_pretrained(_saved(hf, tmp_path))
    video = _video(0)
    expected = _torch(hf, video).last_hidden_state.numpy()
    pooled, aux = model.apply({"params": params}, _ours(video))
    np.testing.assert_allclose(np.asarray(aux["tokens"]), expected, atol=TOL)
    np.testing.assert_allclose(np.asarray(pooled), expected.mean(axis=1), atol=TOL)
    assert model.posemb == "sincos" and not model.cls_token
    assert model.final_norm == (not options["use_mean_pooling"])


def test_videomae_classifier_folder_pools_with_its_fc_norm(tmp_path):
    config = transformers.VideoMAEConfig(**VIDEOMAE, use_mean_pooling=True, num_labels=3)
    hf = _randomized(transformers.VideoMAEForVideoClassification(config), seed=2)
    model, params = vivit.from_pretrained(_saved(hf, tmp_path))
    video = _video(1)
    with torch.no_grad():
        tokens = hf.videomae(torch.from_numpy(video)).last_hidden_state
        expected = hf.fc_norm(tokens.mean(1)).numpy()
    pooled, aux = model.apply({"params": params}, _ours(video))
    assert model.pool_norm
    np.testing.assert_allclose(np.asarray(aux["tokens"]), tokens.numpy(), atol=TOL)
    np.testing.assert_allclose(np.asarray(pooled), expected, atol=TOL)


@pytest.mark.parametrize("pooler", [True, False])
def test_vivit_tokens_and_pooler_match_pytorch(pooler, tmp_path):
    config = transformers.VivitConfig(**VIVIT)
    hf = _randomized(transformers.VivitModel(config, add_pooling_layer=pooler), seed=3)
    model, params = vivit.from_pretrained(_saved(hf, tmp_path))
    video = _video(2)
    out = _torch(hf, video)
    pooled, aux = model.apply({"params": params}, _ours(video))
    np.testing.assert_allclose(np.asarray(aux["tokens"]), out.last_hidden_state.numpy(), atol=TOL)
    assert aux["num_prefix_tokens"] == 1
    if pooler:
        np.testing.assert_allclose(np.asarray(pooled), out.pooler_output.numpy(), atol=TOL)
    else:  # the [CLS] output
        np.testing.assert_allclose(
            np.asarray(pooled), out.last_hidden_state[:, 0].numpy(), atol=TOL
        )


def test_videomae_pretraining_decoder_matches_pytorch_on_the_same_mask(tmp_path):
    config = transformers.VideoMAEConfig(**VIDEOMAE, use_mean_pooling=False)
    hf = _randomized(transformers.VideoMAEForPreTraining(config), seed=4)
    folder = _saved(hf, tmp_path)
    video = _video(3)
    grid = (2, 2, 2)
    keep, masked = mvm.tube_mask(jax.random.key(0), 2, grid, mask_ratio=0.5)
    bool_masked = np.zeros((2, 8), bool)
    np.put_along_axis(bool_masked, np.asarray(masked), True, axis=1)
    expected = _torch(hf, video, bool_masked_pos=torch.from_numpy(bool_masked)).logits.numpy()

    ckpt = hf_video.read(folder)
    encoder, params = vivit.from_pretrained(folder)
    decoder = mvm.MVMDecoder(**hf_video.decoder_kwargs(ckpt.config, channels=3))
    decoder_params = hf_video.decoder_params(ckpt, decoder)
    _, aux = encoder.apply({"params": params}, _ours(video), keep_indices=keep)
    pred, _ = decoder.apply({"params": decoder_params}, aux["tokens"], keep, masked, grid)
    np.testing.assert_allclose(np.asarray(pred), expected, atol=TOL)


def test_current_module_names_load_like_saved_ones(tmp_path):
    """transformers 5 writes older names (q_bias, encoder.layer...); a file with its
    in-memory names (state_dict) imports to the same parameters."""
    for name, hf in (
        ("videomae", transformers.VideoMAEModel(transformers.VideoMAEConfig(**VIDEOMAE))),
        ("vivit", transformers.VivitModel(transformers.VivitConfig(**VIVIT))),
    ):
        hf = _randomized(hf, seed=5)
        saved = _saved(hf, tmp_path / name)
        current = tmp_path / f"{name}_current"
        current.mkdir()
        (current / "config.json").write_text((tmp_path / name / "config.json").read_text())
        save_file(
            {k: v.numpy() for k, v in hf.state_dict().items()}, str(current / "model.safetensors")
        )
        assert set(load_file(str(current / "model.safetensors"))) != set(
            load_file(f"{saved}/model.safetensors")
        )
        _, a = vivit.from_pretrained(saved)
        _, b = vivit.from_pretrained(current)
        jax.tree.map(np.testing.assert_array_equal, a, b)


def test_grayscale_video_gives_the_tokens_of_its_three_channel_copy(tmp_path):
    hf = _randomized(transformers.VideoMAEModel(transformers.VideoMAEConfig(**VIDEOMAE)), 6)
    folder = _saved(hf, tmp_path)
    model3, params3 = vivit.from_pretrained(folder)
    model1, params1 = vivit.from_pretrained(folder, channels=1)
    gray = _video(4, channels=1)
    _, aux1 = model1.apply({"params": params1}, _ours(gray))
    _, aux3 = model3.apply({"params": params3}, _ours(np.repeat(gray, 3, axis=2)))
    np.testing.assert_allclose(np.asarray(aux1["tokens"]), np.asarray(aux3["tokens"]), atol=TOL)
    assert params1["embedding"]["kernel"].shape[3] == 1


def test_a_checkpoint_that_does_not_fit_is_a_clear_error(tmp_path):
    hf = _randomized(transformers.VideoMAEModel(transformers.VideoMAEConfig(**VIDEOMAE)), 7)
    folder = _saved(hf, tmp_path / "videomae")
    ckpt = hf_video.read(folder)
    wrong = vivit.ViViT(**{**hf_video.encoder_kwargs(ckpt), "depth": 2, "posemb": "learned"})
    with pytest.raises(ValueError, match=r"depth=2 \(the checkpoint: 3\).*posemb='learned'"):
        hf_video.encoder_params(ckpt, wrong, channels=3)
    config = json.loads((tmp_path / "videomae" / "config.json").read_text())
    (tmp_path / "videomae" / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type='bert'"):
        hf_video.read(folder)
    with pytest.raises(ValueError, match="no pretraining decoder"):
        hf_video.decoder_params(ckpt, mvm.MVMDecoder(patch_dim=8))


# ----------------------------------------------------- positions at other sizes


def test_learned_table_interpolation_equals_pytorch_interpolate():
    table = np.random.default_rng(0).normal(size=(3, 4, 5, 6)).astype(np.float32)  # T, H, W, D
    new = (5, 7, 3)
    ours = np.asarray(common.interpolate_posemb_grid(jnp.asarray(table), new))
    x = torch.from_numpy(table).permute(3, 1, 2, 0)  # [D, H, W, T]: linear over T
    x = torch.nn.functional.interpolate(
        x.reshape(1, -1, table.shape[0]), size=new[0], mode="linear", align_corners=False
    ).reshape(table.shape[3], table.shape[1], table.shape[2], new[0])
    x = x.permute(3, 0, 1, 2)  # [T', D, H, W]: bicubic over H, W per frame
    x = torch.nn.functional.interpolate(x, size=new[1:], mode="bicubic", align_corners=False)
    np.testing.assert_allclose(ours, x.permute(0, 2, 3, 1).numpy(), atol=1e-5)
    same = jnp.asarray(table)
    assert common.interpolate_posemb_grid(same, table.shape[:3]) is same


def _numpy_resample(values: np.ndarray, size: int, cubic: bool) -> np.ndarray:
    """Resamples axis 0 of `values` to `size` points, written out point by point: half-pixel
    centres; linear (left of the first centre: the first value) or Keys cubic convolution
    with a = -0.75 and the border sample repeated."""
    old, a = values.shape[0], -0.75
    out = np.zeros((size, *values.shape[1:]))
    for i in range(size):
        x = (i + 0.5) * old / size - 0.5
        if not cubic:
            x = max(x, 0.0)
            left = min(int(np.floor(x)), old - 1)
            frac = x - left
            out[i] = (1 - frac) * values[left] + frac * values[min(left + 1, old - 1)]
            continue
        for tap in range(int(np.floor(x)) - 1, int(np.floor(x)) + 3):
            d = abs(x - tap)
            weight = ((a + 2) * d - (a + 3)) * d * d + 1 if d <= 1 else (
                ((a * d - 5 * a) * d + 8 * a) * d - 4 * a if d < 2 else 0.0)
            out[i] += weight * values[min(max(tap, 0), old - 1)]
    return out


def test_learned_table_interpolation_equals_a_numpy_reference():
    table = np.random.default_rng(1).normal(size=(4, 3, 6, 5))  # T, H, W, D
    new = (2, 5, 4)
    expected = _numpy_resample(table, new[0], cubic=False)  # time
    expected = np.swapaxes(_numpy_resample(np.swapaxes(expected, 0, 1), new[1], True), 0, 1)
    expected = np.swapaxes(_numpy_resample(np.swapaxes(expected, 0, 2), new[2], True), 0, 2)
    ours = common.interpolate_posemb_grid(jnp.asarray(table, jnp.float32), new)
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5)


def test_vivit_at_another_size_uses_the_interpolated_table(tmp_path):
    hf = _randomized(transformers.VivitModel(transformers.VivitConfig(**VIVIT)), seed=8)
    folder = _saved(hf, tmp_path)
    model, params = vivit.from_pretrained(folder, num_frames=8, image_size=48)
    table = hf.embeddings.position_embeddings.detach().numpy()[0]  # [1 + 8, D]
    grid_rows = table[1:].reshape(2, 2, 2, -1)
    expected = np.asarray(common.interpolate_posemb_grid(jnp.asarray(grid_rows), (4, 3, 3)))
    np.testing.assert_allclose(params["pos_embedding"][0], table[0])
    np.testing.assert_allclose(params["pos_embedding"][1:], expected.reshape(36, -1), atol=1e-6)
    _, aux = model.apply({"params": params}, _ours(_video(5, frames=8, size=48)))
    assert aux["tokens"].shape == (2, 1 + 36, 24)


def test_sinusoid_table_is_videomaes():
    expected = modeling_videomae.get_sinusoid_encoding_table(30, 10).numpy()[0]
    np.testing.assert_allclose(common.sincos_posemb(30, 10), expected, atol=1e-7)


# ------------------------------------------------------------------------ export


@pytest.mark.parametrize("family", ["videomae", "videomae_mean_pooling", "vivit"])
def test_exported_folder_loads_in_pytorch_with_the_same_tokens(family, tmp_path):
    """Random weights of our own (not an import): export -> from_pretrained -> equal."""
    kwargs = dict(hidden_size=24, depth=2, mlp_dim=40, num_heads=3, patch_size=(2, 8, 8),
                  num_frames=4, image_size=16)
    if family == "vivit":
        kwargs.update(posemb="learned", cls_token=True, pool_type="cls")
        cls = transformers.VivitModel
    else:
        kwargs.update(posemb="sincos", pool_type="mean", approximate_gelu=False,
                      final_norm=family == "videomae")
        cls = transformers.VideoMAEModel
    model = vivit.ViViT(**kwargs)
    video = _video(6, channels=1, size=16)
    params = model.init(jax.random.key(1), _ours(video))["params"]
    params = jax.tree.map(
        lambda p: p + 0.1 * jax.random.normal(jax.random.key(p.size), p.shape), params
    )
    hf_video.export(model, params, tmp_path, channels=1)
    hf = cls.from_pretrained(tmp_path).eval()
    _, aux = model.apply({"params": params}, _ours(video))
    expected = _torch(hf, video).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(aux["tokens"]), expected, atol=TOL)


def test_an_encoder_outside_both_families_is_named():
    with pytest.raises(ValueError, match=r"posemb='factorized'.*stem='conv'|stem='conv'.*posemb"):
        hf_video.family_of(vivit.ViViT(stem="conv", stem_features=(8, 8, 8, 8)))


# --------------------------------------------------------------- layer-wise decay


def test_layer_decay_scales_each_blocks_updates():
    params = {
        "encoder": {
            "embedding": {"kernel": jnp.ones(2)},
            "pos_embedding": jnp.ones(2),
            "encoderblock_0": {"w": jnp.ones(2)},
            "encoderblock_1": {"w": jnp.ones(2)},
            "encoder_norm": {"scale": jnp.ones(2)},
        },
        "text": {"w": jnp.ones(2)},
    }
    multipliers = optim.layer_multipliers(params, 0.5)
    assert multipliers["encoder"]["embedding"]["kernel"] == 0.5**3
    assert multipliers["encoder"]["pos_embedding"] == 0.5**3
    assert multipliers["encoder"]["encoderblock_0"]["w"] == 0.5**2
    assert multipliers["encoder"]["encoderblock_1"]["w"] == 0.5
    assert multipliers["encoder"]["encoder_norm"]["scale"] == 1.0
    assert multipliers["text"]["w"] == 1.0
    components = {"all": dict(pattern=".*")}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 2.0), params)

    def first_update(decay):
        tx, _ = optim.make_optimizer(
            params, total_steps=10, lr=0.1, wd=0.0, components=components,
            schedule=dict(decay_type="constant"), optimizer="sgd", grad_clip_norm=None,
            layer_decay=decay,
        )
        updates, _ = tx.update(grads, tx.init(params), params)
        return updates

    plain, decayed = first_update(1.0), first_update(0.5)
    jax.tree.map(
        lambda p, d, m: np.testing.assert_allclose(d, p * m, rtol=1e-6), plain, decayed,
        multipliers,
    )
    with pytest.raises(ValueError, match="layer_decay=0"):
        optim.layer_multipliers(params, 0.0)


# ------------------------------------------- a run from a VideoMAE, and back out


@pytest.fixture(scope="module")
def videomae_run(synthetic_data, tmp_path_factory):
    """A micro run whose encoder and MVM decoder start from a random VideoMAE (made for
    8 x 64 x 64 RGB clips; the run's are 4 x 32 x 32 gray), encoder frozen: 2 steps,
    then, with the VideoMAE folder moved away, resumed to 3. (root, the PyTorch model,
    the folder it is at now, what train.main returned.)"""
    root = tmp_path_factory.mktemp("video_init")
    config = transformers.VideoMAEConfig(
        **{**VIDEOMAE, "image_size": 64, "num_frames": 8, "num_hidden_layers": 2},
        use_mean_pooling=False,
    )
    hf = _randomized(transformers.VideoMAEForPreTraining(config), seed=9)
    folder = _saved(hf, root / "videomae")
    run_config = evaltools.micro_config()
    run_config.input.data_dir = synthetic_data
    run_config.update(total_steps=2, ckpt_steps=2, log_training_steps=1)
    run_config.evals = {}
    run_config.optim.schedule.warmup_steps = 1
    run_config.video_init = folder
    run_config.video_init_include = "encoder+decoder"
    run_config.optim.components.video_encoder.frozen = True
    train.main(run_config, str(root / "run"))
    moved = shutil.move(folder, root / "moved")
    run_config.total_steps = 3
    returned = train.main(run_config, str(root / "run"))
    return root, hf, moved, returned, inference.load_run(str(root / "run"))


def test_a_run_from_videomae_trains_resumes_and_keeps_where_it_started(videomae_run):
    root, _, moved, returned, run = videomae_run
    assert np.isfinite(returned["loss/mvm"]) and "lr/video_encoder" not in returned, returned
    assert 3 in {int(p.name) for p in (root / "run" / "checkpoints").iterdir()}
    saved = json.loads((root / "run" / "config.json").read_text())
    assert saved["model"]["encoder_overrides"]["posemb"] == "sincos"
    assert saved["model"]["mvm_decoder_overrides"]["embed_bias"] is False
    record = json.loads((root / "run" / "assets" / "run.json").read_text())["initial_weights"]
    assert record["video_init"]["model_type"] == "videomae"
    assert record["video_init"]["include"] == "encoder+decoder"
    import hashlib

    digest = hashlib.sha256((moved / "model.safetensors").read_bytes()).hexdigest()
    assert record["video_init"]["sha256"] == digest
    # The frozen encoder is still exactly the import (the kernel summed to one channel).
    imported = hf_video.encoder_params(
        hf_video.read(moved), run.model.encoder, channels=1, only_present=True
    )
    jax.tree.map(
        np.testing.assert_array_equal,
        imported,
        {k: run.params["encoder"][k] for k in imported},
    )


def test_the_run_exports_back_to_pytorch(videomae_run, tmp_path):
    root, hf, _, _, run = videomae_run
    assert export_hf.main(["--workdir", str(root / "run"), "--out", str(tmp_path)]) == 0
    exported = transformers.VideoMAEModel.from_pretrained(tmp_path / "video_encoder").eval()
    video = _video(7, channels=1)  # the run's clip: 4 x 32 x 32, gray
    _, aux = run.model.encoder.apply({"params": run.params["encoder"]}, _ours(video))
    tokens = _torch(exported, video).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(aux["tokens"]), tokens, atol=TOL)
    # Frozen: PyTorch gets back the weights it gave, the kernel summed over RGB.
    original = hf.videomae.state_dict()
    back = exported.state_dict()
    for name in ("encoder.layer.1.attention.attention.query.weight", "layernorm.weight"):
        np.testing.assert_allclose(back[name].numpy(), original[name].numpy(), atol=1e-6)
    kernel = original["embeddings.patch_embeddings.projection.weight"].sum(1, keepdim=True)
    np.testing.assert_allclose(
        back["embeddings.patch_embeddings.projection.weight"].numpy(), kernel.numpy(), atol=1e-6
    )
    preprocessor = json.loads((tmp_path / "video_encoder" / "preprocessor_config.json").read_text())
    assert preprocessor["image_mean"] == [0.5] and preprocessor["image_std"] == [0.5]
    # The report tower, as a BertModel.
    bert = transformers.BertModel.from_pretrained(tmp_path / "text_encoder").eval()
    ids = np.array([[2, 5, 7, 9, 3]], np.int32)
    _, text_aux = run.model.text.apply(
        {"params": run.params["text"]}, jnp.asarray(ids), jnp.ones_like(jnp.asarray(ids))
    )
    with torch.no_grad():
        expected = bert(input_ids=torch.from_numpy(ids).long()).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(text_aux["tokens"]), expected, atol=TOL)


def test_bad_video_init_settings_are_named(tmp_path):
    config = evaltools.micro_config()
    config.video_init_include = "all"
    with pytest.raises(ValueError, match="video_init_include='all'"):
        train.check_config(config, "train")
    config = evaltools.micro_config()
    config.video_init = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="video_init=.*missing.*no config.json"):
        train.run.resolve_video_init(config)
    hf = _randomized(transformers.VivitModel(transformers.VivitConfig(**VIVIT)), seed=10)
    config.video_init = _saved(hf, tmp_path / "vivit")
    config.video_init_include = "encoder+decoder"
    with pytest.raises(ValueError, match="vivit checkpoint; only VideoMAE has a pretraining"):
        train.run.resolve_video_init(config)
    config.video_init_include = "encoder"
    changes = train.run.resolve_video_init(config)
    assert "model.patch_size: (2, 8, 8) -> (2, 16, 16)" in changes
    assert config.model.encoder_overrides.cls_token is True
    assert config.model.encoder_overrides.pool_type == "max"  # the recipe's pooling stays
    assert train.run.resolve_video_init(config) == []  # already resolved
