"""Tests for the BERT text tower: parity with Hugging Face BERT (PyTorch), import errors,
pooling, gradients and dropout."""

import copy
import json
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from safetensors import safe_open

from deepcoro_jax.models import text

HF_CONFIG = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=40,
    type_vocab_size=2,
)
LENGTHS = (12, 7, 3)  # real tokens per row; the rest of the 12 positions is padding


def _hf_model(model_class: type, seed: int) -> torch.nn.Module:
    """A randomly initialised HF model whose every weight (biases, LayerNorms too) is perturbed."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(**HF_CONFIG, attn_implementation="eager")
    model = model_class(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def _batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    seq_len = max(LENGTHS)
    attention_mask = (np.arange(seq_len)[None] < np.array(LENGTHS)[:, None]).astype(np.int32)
    input_ids = rng.integers(1, HF_CONFIG["vocab_size"], size=(len(LENGTHS), seq_len))
    input_ids = np.where(attention_mask, input_ids, 0).astype(np.int32)
    token_type_ids = (np.arange(seq_len)[None] >= np.array(LENGTHS)[:, None] // 2).astype(np.int32)
    token_type_ids = token_type_ids * attention_mask
    return dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)


def _hf_tokens(
    model: torch.nn.Module, batch: dict[str, np.ndarray], with_types: bool
) -> np.ndarray:
    inputs = {k: torch.from_numpy(v).long() for k, v in batch.items()}
    if not with_types:
        del inputs["token_type_ids"]
    with torch.no_grad():
        return model(**inputs).last_hidden_state.numpy()


def _dropout_key(seed: int) -> jax.Array:
    # RBG keys compile several times faster on CPU than threefry; the model code is the same.
    return jax.random.key(seed, impl="rbg")


def _encode(model: text.TextEncoder, params, batch, with_types: bool = True):
    token_types = batch["token_type_ids"] if with_types else None
    return model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], token_types)


@pytest.fixture(scope="module")
def hf_bert(tmp_path_factory):
    model = _hf_model(transformers.BertModel, seed=0)
    directory = tmp_path_factory.mktemp("bert")
    model.save_pretrained(directory)
    return model, directory


@pytest.fixture(scope="module")
def loaded(hf_bert):
    _, directory = hf_bert
    model, params = text.from_pretrained(directory)
    return model, params, jax.jit(_encode, static_argnums=(0, 3))


def _copy_with_weights(source_dir, target_dir, weights: dict[str, np.ndarray]):
    target_dir.mkdir()
    shutil.copy(source_dir / "config.json", target_dir / "config.json")
    safetensors.numpy.save_file(weights, target_dir / "model.safetensors")
    return target_dir


@pytest.mark.parametrize("with_types", [True, False])
def test_matches_hf_bert_on_padded_batch(hf_bert, loaded, with_types):
    hf_model, _ = hf_bert
    model, params, encode = loaded
    batch = _batch()
    embedding, aux = encode(model, params, batch, with_types)
    expected = _hf_tokens(hf_model, batch, with_types)
    # Padded positions attend only to real keys in both, so all positions agree.
    np.testing.assert_allclose(np.asarray(aux["tokens"]), expected, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.asarray(aux["pooled"]), np.asarray(aux["tokens"][:, 0]))
    np.testing.assert_array_equal(np.asarray(embedding), np.asarray(aux["pooled"]))


def test_token_types_matter(loaded):
    model, params, encode = loaded
    batch = _batch()
    _, with_types = encode(model, params, batch, True)
    _, without = encode(model, params, batch, False)
    assert np.abs(np.asarray(with_types["tokens"] - without["tokens"])).max() > 1e-2


@pytest.mark.parametrize(
    "model_class", [transformers.BertForMaskedLM, transformers.BertForPreTraining]
)
def test_loads_prefixed_checkpoints_and_ignores_heads(model_class, loaded, tmp_path, caplog):
    model, _, encode = loaded
    hf_model = _hf_model(model_class, seed=1)
    hf_model.save_pretrained(tmp_path)
    saved_names = safetensors.numpy.load_file(tmp_path / "model.safetensors").keys()
    assert all(n.startswith(("bert.", "cls.")) for n in saved_names)
    with caplog.at_level(logging.INFO, logger=text.__name__):
        loaded_model, params = text.from_pretrained(tmp_path)
    assert loaded_model == model
    assert "cls.predictions.bias" in caplog.text
    batch = _batch()
    _, aux = encode(model, params, batch, True)
    expected = _hf_tokens(hf_model.bert, batch, True)
    np.testing.assert_allclose(np.asarray(aux["tokens"]), expected, atol=1e-4, rtol=0)


def test_pytorch_bin_with_legacy_names_matches_safetensors(hf_bert, loaded, tmp_path):
    hf_model, directory = hf_bert
    _, params, _ = loaded
    state = {}
    for name, tensor in hf_model.state_dict().items():
        name = name.replace("LayerNorm.weight", "LayerNorm.gamma")
        state["bert." + name.replace("LayerNorm.bias", "LayerNorm.beta")] = tensor
    state["bert.embeddings.position_ids"] = torch.arange(HF_CONFIG["max_position_embeddings"])[None]
    shutil.copy(directory / "config.json", tmp_path / "config.json")
    torch.save(state, tmp_path / "pytorch_model.bin")
    _, bin_params = text.from_pretrained(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, bin_params, params)


def test_bfloat16_safetensors_checkpoint_loads_as_float32(hf_bert, loaded, tmp_path):
    hf_model, _ = hf_bert
    _, params, _ = loaded
    copy.deepcopy(hf_model).to(torch.bfloat16).save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="numpy") as saved:
        assert saved.get_slice("embeddings.word_embeddings.weight").get_dtype() == "BF16"
    _, bf16_params = text.from_pretrained(tmp_path)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(bf16_params))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-6), bf16_params, params
    )


def test_missing_or_renamed_weight_is_named(hf_bert, tmp_path):
    _, directory = hf_bert
    weights = safetensors.numpy.load_file(directory / "model.safetensors")
    weights["encoder.layer.1.output.dense.kernel"] = weights.pop(
        "encoder.layer.1.output.dense.weight"
    )
    del weights["embeddings.LayerNorm.bias"]
    _copy_with_weights(directory, tmp_path / "ckpt", weights)
    with pytest.raises(ValueError) as error:
        text.from_pretrained(tmp_path / "ckpt")
    message = str(error.value)
    assert "model.safetensors" in message
    assert "encoder.layer.1.output.dense.weight" in message  # missing
    assert "embeddings.LayerNorm.bias" in message  # missing
    assert "encoder.layer.1.output.dense.kernel" in message  # unused


def test_unknown_weight_is_named(hf_bert, tmp_path):
    _, directory = hf_bert
    weights = safetensors.numpy.load_file(directory / "model.safetensors")
    weights["encoder.layer.0.adapter.weight"] = np.zeros((4, 4), np.float32)
    weights["pooler.dense.bias"] = np.zeros((32,), np.float32)  # ignored, not an error
    _copy_with_weights(directory, tmp_path / "ckpt", weights)
    with pytest.raises(ValueError, match="unused weights") as error:
        text.from_pretrained(tmp_path / "ckpt")
    assert "encoder.layer.0.adapter.weight" in str(error.value)
    assert "pooler" not in str(error.value)


def test_shape_mismatch_is_named(hf_bert, tmp_path):
    _, directory = hf_bert
    weights = safetensors.numpy.load_file(directory / "model.safetensors")
    weights["embeddings.token_type_embeddings.weight"] = np.zeros((3, 32), np.float32)
    _copy_with_weights(directory, tmp_path / "ckpt", weights)
    with pytest.raises(ValueError, match="shape mismatches") as error:
        text.from_pretrained(tmp_path / "ckpt")
    assert "embeddings.token_type_embeddings.weight: (3, 32) (expected (2, 32))" in str(error.value)


def test_config_from_json_errors_and_defaults(hf_bert, tmp_path):
    _, directory = hf_bert
    hf_config = json.loads((directory / "config.json").read_text())

    def write(**changes):
        path = tmp_path / "config.json"
        path.write_text(json.dumps({**hf_config, **changes}))
        return path

    old_style = {k: v for k, v in hf_config.items() if k not in ("layer_norm_eps", "pad_token_id")}
    (tmp_path / "config.json").write_text(json.dumps(old_style))
    config = text.BertConfig.from_json(tmp_path / "config.json")
    assert (config.layer_norm_eps, config.pad_token_id, config.hidden_size) == (1e-12, 0, 32)

    (tmp_path / "config.json").write_text(
        json.dumps({k: v for k, v in hf_config.items() if k != "hidden_size"})
    )
    with pytest.raises(ValueError, match="hidden_size"):
        text.BertConfig.from_json(tmp_path / "config.json")
    with pytest.raises(ValueError, match="gelu_new"):
        text.BertConfig.from_json(write(hidden_act="gelu_new"))
    with pytest.raises(ValueError, match="relative_key"):
        text.BertConfig.from_json(write(position_embedding_type="relative_key"))
    with pytest.raises(
        ValueError, match="config.json: BertConfig: hidden_size=32 is not divisible"
    ):
        text.BertConfig.from_json(write(num_attention_heads=5))
    write()  # a valid config but no weights file
    with pytest.raises(FileNotFoundError, match="model.safetensors or pytorch_model.bin"):
        text.from_pretrained(tmp_path)


def test_projection_head_is_seeded(hf_bert, loaded):
    _, directory = hf_bert
    _, base_params, _ = loaded
    model, params = text.from_pretrained(directory, embed_dim=16, rng=0)
    _, same = text.from_pretrained(directory, embed_dim=16, rng=jax.random.key(0))
    _, other = text.from_pretrained(directory, embed_dim=16, rng=1)
    np.testing.assert_array_equal(params["head"]["kernel"], same["head"]["kernel"])
    assert not np.allclose(params["head"]["kernel"], other["head"]["kernel"])
    jax.tree.map(
        np.testing.assert_array_equal, {k: v for k, v in params.items() if k != "head"}, base_params
    )
    assert model.embed_dim == 16 and params["head"]["kernel"].shape == (32, 16)


# Masked mean pooling with a projection head, on the imported weights.


@pytest.fixture(scope="module")
def mean_pooled(hf_bert):
    _, directory = hf_bert
    model, params = text.from_pretrained(directory, embed_dim=16, pool_type="mean", rng=0)

    @jax.jit
    def apply(params, input_ids, attention_mask, token_type_ids):
        return model.apply({"params": params}, input_ids, attention_mask, token_type_ids)

    return model, params, apply


@pytest.fixture(scope="module")
def train_loss(mean_pooled):
    """Jitted (loss, grads) of the mean-pooled tower in training mode, for a dropout seed."""
    model, _, _ = mean_pooled
    batch = _batch()
    target = np.random.default_rng(1).normal(size=(len(LENGTHS), 16)).astype(np.float32)

    def loss_fn(params, dropout_rng):
        embedding, _ = model.apply(
            {"params": params},
            batch["input_ids"],
            batch["attention_mask"],
            batch["token_type_ids"],
            train=True,
            rngs={"dropout": dropout_rng},
        )
        return jnp.sum((embedding - target) ** 2)

    return jax.jit(jax.value_and_grad(loss_fn))


def test_mean_pooling_excludes_padding(mean_pooled):
    _, params, apply = mean_pooled
    batch = _batch()
    embedding, aux = apply(
        params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    )

    mask = batch["attention_mask"].astype(bool)
    tokens = np.asarray(aux["tokens"])
    expected_pooled = np.stack([tokens[i][mask[i]].mean(axis=0) for i in range(len(LENGTHS))])
    np.testing.assert_allclose(np.asarray(aux["pooled"]), expected_pooled, atol=1e-5)
    kernel, bias = np.asarray(params["head"]["kernel"]), np.asarray(params["head"]["bias"])
    np.testing.assert_allclose(np.asarray(embedding), expected_pooled @ kernel + bias, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(aux["embedding"]), np.asarray(embedding))

    rng = np.random.default_rng(1)
    other_ids = np.where(mask, batch["input_ids"], rng.integers(1, 100, size=mask.shape)).astype(
        np.int32
    )
    other_types = np.where(mask, batch["token_type_ids"], 1).astype(np.int32)
    embedding_repadded, _ = apply(params, other_ids, batch["attention_mask"], other_types)
    np.testing.assert_allclose(np.asarray(embedding_repadded), np.asarray(embedding), atol=1e-5)

    changed_ids = batch["input_ids"].copy()
    changed_ids[2, 1] = changed_ids[2, 1] % 99 + 1  # a real token of the shortest row
    embedding_changed, _ = apply(
        params, changed_ids, batch["attention_mask"], batch["token_type_ids"]
    )
    assert np.abs(np.asarray(embedding_changed[2] - embedding[2])).max() > 1e-3
    np.testing.assert_allclose(
        np.asarray(embedding_changed[:2]), np.asarray(embedding[:2]), atol=1e-6
    )


def test_gradient_reaches_every_parameter(mean_pooled, train_loss):
    _, params, _ = mean_pooled
    _, grads = train_loss(params, _dropout_key(2))
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    dead = [jax.tree_util.keystr(path) for path, g in flat if not np.any(np.asarray(g) != 0)]
    assert not dead, f"no gradient reaches {dead}"


def test_dropout_only_in_training(mean_pooled, train_loss):
    _, params, apply = mean_pooled
    batch = _batch()
    target = np.random.default_rng(1).normal(size=(len(LENGTHS), 16)).astype(np.float32)
    eval_embedding, _ = apply(
        params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    )
    eval_loss = float(jnp.sum((eval_embedding - target) ** 2))
    train_losses = [float(train_loss(params, _dropout_key(seed))[0]) for seed in (3, 3, 4)]
    assert train_losses[0] == train_losses[1]
    assert abs(train_losses[0] - train_losses[2]) > 1e-3
    assert abs(train_losses[0] - eval_loss) > 1e-3


def test_bfloat16_compute_keeps_float32_params(mean_pooled):
    model, params, apply = mean_pooled
    batch = _batch()
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    bf16_model = model.clone(dtype=jnp.bfloat16)
    embedding_bf16, aux = jax.jit(bf16_model.apply)({"params": params}, *args)
    embedding, _ = apply(params, *args)
    assert aux["tokens"].dtype == jnp.bfloat16
    shapes = jax.eval_shape(bf16_model.init, jax.random.key(0), *args[:2])["params"]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))
    np.testing.assert_allclose(
        np.asarray(embedding_bf16, np.float32), np.asarray(embedding), atol=0.1
    )


def test_bad_inputs_raise(mean_pooled):
    model, params, _ = mean_pooled
    too_long = jnp.ones((1, 41), jnp.int32)
    with pytest.raises(ValueError, match="max_position_embeddings=40"):
        model.apply({"params": params}, too_long, too_long)
    ids = jnp.ones((2, 5), jnp.int32)
    with pytest.raises(ValueError, match="attention_mask shape"):
        model.apply({"params": params}, ids, ids[:, :4])
    with pytest.raises(ValueError, match="pool_type='max'"):
        model.clone(pool_type="max").apply({"params": params}, ids, ids)


def test_from_size_shapes_and_pad_row():
    config = text.BertConfig.from_size("mu", vocab_size=100, pad_token_id=3)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 2)
    ids = jnp.ones((2, 5), jnp.int32)
    shapes = jax.eval_shape(text.TextEncoder(config, embed_dim=8).init, jax.random.key(0), ids, ids)
    assert shapes["params"]["embeddings"]["word_embeddings"]["embedding"].shape == (100, 64)
    assert shapes["params"]["layer_1"]["intermediate"]["kernel"].shape == (64, 256)
    assert shapes["params"]["head"]["kernel"].shape == (64, 8)
    assert "layer_2" not in shapes["params"]

    init = jax.jit(text.BertEmbeddings(config).init, static_argnums=3)
    word_table = np.asarray(
        init(jax.random.key(0), ids, ids, False)["params"]["word_embeddings"]["embedding"]
    )
    np.testing.assert_array_equal(word_table[3], 0.0)
    assert np.abs(np.delete(word_table, 3, axis=0)).min(axis=1).max() > 0
    with pytest.raises(ValueError, match="unknown text size 'huge'"):
        text.BertConfig.from_size("huge", vocab_size=100)
