"""Paths as users type them (deepcoro_jax/paths.py), and workdir files under a URL.

The URL tests serve ``gs://bucket/...`` from a local folder by mocking etils'
file backend (no network): what the trainer, the tools and the tokenizers read
and write there must go through epath, never `open()` on the raw string, or it
lands in a folder literally named ``gs:`` and the test fails.
"""

import contextlib
import json
import os
import shutil

import ml_collections
import pytest
from etils import epath
from etils.epath import gpath
from etils.epath import testing as epath_testing

from deepcoro_jax import paths
from deepcoro_jax.domain import tokenizers
from deepcoro_jax.tools import inference, plot
from deepcoro_jax.training import train
from input_pipeline import dataset_format

BUCKET = "gs://bucket"


def test_resolve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert paths.resolve("runs/demo") == str(tmp_path / "runs/demo")
    assert paths.resolve("./runs/../runs/demo") == str(tmp_path / "runs/demo")
    assert paths.resolve("~/data") == str(tmp_path / "home/data")
    assert paths.resolve("/abs/x") == "/abs/x"
    assert paths.resolve("gs://bucket/run") == "gs://bucket/run"
    assert paths.resolve("") == ""
    assert paths.is_url("s3://b/x") and not paths.is_url("runs/gs://x")


def test_resolve_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = ml_collections.ConfigDict(
        dict(
            input=dict(
                data_dir="data/prepared",
                synthetic=dict(cache_dir="cache"),
                text_tokenizer="sp:models/spm.model",
                caption_tokenizer="dataset",
            ),
            init=dict(workdir="gs://bucket/run"),
            text_init="",
        )
    )
    paths.resolve_config(config)
    assert config.input.data_dir == str(tmp_path / "data/prepared")
    assert config.input.synthetic.cache_dir == str(tmp_path / "cache")
    assert config.input.text_tokenizer == f"sp:{tmp_path / 'models/spm.model'}"
    assert config.input.caption_tokenizer == "dataset"
    assert config.init.workdir == "gs://bucket/run"
    assert config.text_init == ""


@contextlib.contextmanager
def fake_bucket(root):
    """``gs://bucket/x`` served from ``root/x`` through etils' mockable backend."""

    def local(path):
        text = os.fspath(path)
        assert text.startswith(f"{BUCKET}/") or text == BUCKET, text
        return os.path.join(root, text[len(BUCKET) :].lstrip("/"))

    def one(original, path, *args, **kwargs):
        return original(local(path), *args, **kwargs)

    def two(original, path, dst, *args, **kwargs):
        return original(local(path), local(dst), *args, **kwargs)

    def glob(original, pattern):
        return [p.replace(str(root), BUCKET, 1) for p in original(local(pattern))]

    with (
        pytest.MonkeyPatch.context() as patch,
        epath_testing.mock_epath(
            open=one,
            exists=one,
            isdir=one,
            listdir=one,
            makedirs=one,
            mkdir=one,
            remove=one,
            rmtree=one,
            stat=one,
            glob=glob,
            rename=two,
            replace=two,
        ),
    ):
        patch.setattr(gpath, "_is_tf_installed", lambda: False)  # else gs:// uses tf.io.gfile
        yield


def test_metrics_config_and_plots_under_a_url(tmp_path):
    with fake_bucket(tmp_path):
        paths.Path(f"{BUCKET}/run").mkdir(parents=True)  # as train.main does
        writer = train.JsonlWriter(f"{BUCKET}/run/metrics.jsonl", 0)
        for step in (1, 2, 3):
            writer.write(step, {"loss": 1.0 / step, "loss/caption": 0.5 / step})
        writer.close()
        # A restart from step 2 drops step 3.
        train.JsonlWriter(f"{BUCKET}/run/metrics.jsonl", 2).close()
        (epath.Path(BUCKET) / "run" / "config.json").write_text(json.dumps({"seed": 3}))
        assert inference.load_config(f"{BUCKET}/run").seed == 3
        out = plot.plot_run(f"{BUCKET}/run")
    assert out == f"{BUCKET}/run/plots/training_curves.png"
    lines = (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert (tmp_path / "run/plots/training_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "gs:").exists()


def test_a_prepared_dataset_and_its_tokenizer_under_a_url(synthetic_data, tmp_path):
    local_spec = dataset_format.tokenizer_spec(synthetic_data)
    shutil.copytree(synthetic_data, tmp_path / "data")
    with fake_bucket(tmp_path):
        meta = dataset_format.load_meta(f"{BUCKET}/data")
        spec = dataset_format.tokenizer_spec(f"{BUCKET}/data")
        tokenizer = tokenizers.SentencePieceTokenizer(spec.partition(":")[2])
    assert meta == dataset_format.load_meta(synthetic_data)
    assert spec == f"sp:{BUCKET}/data/{meta.tokenizer}"
    text = "Right dominant. 70% stenosis of the proximal LAD."
    assert tokenizer.encode(text) == tokenizers.get_tokenizer(local_spec).encode(text)
