"""Inference on a tiny run: load_run, infer on raw files, export of a prepared split.

The run is the test run's shared micro run (conftest.py: the evaluator tests'
micro config trained 2 steps on the session's tiny synthetic set). The checks
compare with computations made here independently: the dataset's own clips
through the pipeline ops, ``model.apply`` on single examples, the pipeline's
tokenize op.
"""

import contextlib
import csv
import functools
import io
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from deepcoro_jax.domain import reports
from deepcoro_jax.models import multitask
from deepcoro_jax.tools import attention_maps, export, infer, inference
from deepcoro_jax.training import run as run_lib

STEP = 2
SPLIT = "train"


@pytest.fixture(scope="module")
def tiny_run(micro_run):
    """(workdir, the parameters saved at STEP) of the test run's shared micro run."""
    workdir = micro_run[0]
    path = workdir / "checkpoints" / str(STEP) / "state"
    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.metadata(path).item_metadata.tree
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        state = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    return str(workdir), state["params"]


@pytest.fixture(scope="module")
def run(tiny_run):
    return inference.load_run(tiny_run[0])


@pytest.fixture(scope="module")
def split_examples(synthetic_data):
    """The train split's examples (frames still encoded), in written order."""
    from input_pipeline import dataset_format

    return list(dataset_format.read_split(synthetic_data, SPLIT).as_numpy_iterator())


def _source_file(synthetic_data: str, example: dict) -> str:
    """The raw file a prepared example came from (paths are relative to the manifest)."""
    return os.path.join(os.path.dirname(synthetic_data), "source", example["path"].decode())


def _dataset_clip(run, example: dict) -> np.ndarray:
    from input_pipeline import ops

    preprocess = ops.get_preprocess_fn(f"{run.video_pp}|keep('video')", train=False)
    return preprocess(_tensors(example))["video"].numpy()


def _tensors(example: dict) -> dict:
    """A NumPy example of ``read_split`` as the TF tensors the pp ops take."""
    import tensorflow as tf

    return {k: tf.constant(v) for k, v in example.items() if k not in ("labels", "lesions")}


# ------------------------------------------------------------------------------ load_run


def test_load_run_restores_the_saved_parameters(run, tiny_run):
    _, saved = tiny_run
    assert run.step == STEP
    assert "mvm_decoder" not in run.params  # inference never reads the MVM decoder
    restored = jax.tree_util.tree_flatten_with_path(run.params)[0]
    assert len(restored) > 10
    for path, leaf in restored:
        expected = saved
        for key in path:
            expected = expected[key.key]
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(expected))
        assert leaf.sharding.is_fully_replicated


def test_a_run_with_assets_loads_without_its_data(run, tiny_run, synthetic_data, tmp_path):
    """The run's copies of its tokenizers and data format (run.write_assets) replace the
    data: with them, a workdir whose data is gone loads the same run."""
    import shutil

    from input_pipeline import dataset_format

    workdir = tmp_path / "run"
    shutil.copytree(tiny_run[0], workdir)
    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    spec = dataset_format.tokenizer_spec(str(data))
    meta = dataset_format.load_meta(str(data)).to_json()
    run_lib.write_assets(
        str(workdir), caption_spec=spec, text_spec=spec, data_dir=str(data), dataset_meta=meta
    )
    shutil.rmtree(data)
    kept = run_lib.read_assets(str(workdir))
    assert kept["caption_tokenizer"] == f"sp:{workdir}/assets/caption_tokenizer/spm.model"
    assert kept["dataset_meta"] == meta and kept["data_dir"] == str(data)
    loaded = inference.load_run(str(workdir))
    assert loaded.dataset_meta == meta
    text = "Right dominant. 70% stenosis of the proximal LAD."
    assert loaded.caption_tokenizer.encode(text) == run.caption_tokenizer.encode(text)
    assert loaded.text_tokenizer.encode(text) == run.text_tokenizer.encode(text)
    np.testing.assert_array_equal(
        inference.embed_texts(loaded, [text]), inference.embed_texts(run, [text])
    )


def test_load_run_errors_name_what_is_missing(tiny_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        inference.load_run(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"--checkpoint 7: .*steps: \[2\]"):
        inference.load_run(tiny_run[0], step=7)


def test_eval_video_pp_falls_back_for_older_configs(run):
    config = run.config.copy_and_resolve_references()
    assert inference.eval_video_pp(config) == config.input.eval_video_pp
    del config.input["eval_video_pp"]
    assert inference.eval_video_pp(config) == (
        "decode_sample_frames(4, stride=2)|resize(32)|value_range(-1, 1)"
    )


# ------------------------------------------------------------------------------ infer


def test_raw_file_gives_the_prepared_clip(run, synthetic_data, split_examples):
    """infer decodes a raw file exactly as prepare + the eval pp did (bit for bit)."""
    load_clip = infer.make_clip_loader(run)
    for example in split_examples[:3]:
        clip = load_clip(_source_file(synthetic_data, example))
        np.testing.assert_array_equal(clip, _dataset_clip(run, example))


@pytest.fixture(scope="module")
def infer_output(tiny_run, synthetic_data, split_examples, tmp_path_factory):
    """infer --json on two good files, a corrupt one and a missing one: (code, stdout, files)."""
    folder = tmp_path_factory.mktemp("infer")
    corrupt = folder / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)))
    good = [_source_file(synthetic_data, e) for e in split_examples[:2]]
    files = [good[0], str(corrupt), str(folder / "missing.avi"), good[1]]
    flags = ["--workdir", tiny_run[0], "--json", "--top_k", "3"]
    flags += ["--attention", str(folder / "attention"), "--ground"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = infer.main(flags + files)
    return code, stdout.getvalue(), files, split_examples[:2]


def test_infer_reports_bad_files_and_processes_the_others(infer_output):
    code, stdout, files, _ = infer_output
    assert code == 0
    records = [json.loads(line) for line in stdout.splitlines()]
    assert [r["file"] for r in records] == files
    assert "error" not in records[0] and "error" not in records[3]
    assert records[1]["error"].startswith("unreadable or truncated video") or records[1][
        "error"
    ].startswith("not a video")
    assert files[1] in records[1]["error"]
    assert records[2]["error"].startswith("missing file") and files[2] in records[2]["error"]


def test_infer_results_are_the_models(run, infer_output, split_examples):
    _, stdout, _, examples = infer_output
    records = [json.loads(line) for line in stdout.splitlines()]
    good = [records[0], records[3]]
    bank = list(dict.fromkeys(e["report"].decode() for e in split_examples))
    bank_emb = inference.embed_texts(run, bank)
    video_embs, _ = _reference(run, examples)
    for record, example, video_emb in zip(good, examples, video_embs, strict=True):
        assert record["checkpoint"] == STEP
        # The findings are what reports.parse reads from the generated text.
        parsed = reports.parse_result(record["report"])
        assert record["findings"] == reports.to_json(parsed.findings)
        assert reports.from_json(record["findings"]) == parsed.findings
        assert record["parse_ok"] == parsed.ok
        # The generated report is the greedy decode of the dataset's clip.
        clip = _dataset_clip(run, example)
        assert record["report"] == inference.generate_reports(run, clip[None]).texts[0]
        # --ground: each lesion of the report, where ground_lesions puts it on the clip.
        named = infer.report_lesions(record["report"])
        assert [(g["segment"], g["percent"]) for g in record["grounding"]] == named
        (grounded,) = inference.ground_lesions(run, clip[None], [named])
        for entry, lesion in zip(record["grounding"], grounded, strict=True):
            assert entry["frame"] == lesion.frame
            expected = None if lesion.box is None else np.round(lesion.box, 4).tolist()
            assert entry["box"] == expected
        # Top-k: the bank's best cosine similarities, in order.
        similarities = bank_emb @ video_emb
        best = np.argsort(-similarities, kind="stable")[:3]
        assert [m["report"] for m in record["top_k"]] == [bank[i] for i in best]
        np.testing.assert_allclose(
            [m["similarity"] for m in record["top_k"]], similarities[best], atol=1e-5
        )


def test_infer_writes_attention_maps(run, infer_output, split_examples):
    _, stdout, _, examples = infer_output
    records = [json.loads(line) for line in stdout.splitlines()]
    for record, example in zip([records[0], records[3]], examples, strict=True):
        clip = _dataset_clip(run, example)
        tokens = inference.generate_reports(run, clip[None]).tokens[0]
        sentences = attention_maps.report_attention(run, clip, tokens)
        if not sentences:
            assert record["attention_error"]
            continue
        tubelet_pixels = np.prod(run.model.encoder.patch_size)
        for sentence in sentences:
            # Normalised attention over the memory tokens, spread on each tubelet's pixels.
            assert sentence.heat.shape == clip.shape[:3]
            assert np.all(sentence.heat >= 0)
            np.testing.assert_allclose(sentence.heat.sum(), tubelet_pixels, rtol=1e-4)
        png = Image.open(record["attention_png"])
        assert png.height > len(sentences) * attention_maps.MIN_PANEL_SIZE
        gif = Image.open(record["attention_gif"])
        assert gif.n_frames == clip.shape[0]


def test_infer_with_a_csv_bank_and_text_output(
    tiny_run, synthetic_data, split_examples, tmp_path, capsys
):
    bank_file = tmp_path / "bank.csv"
    with open(bank_file, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "Report"])
        writer.writerows(
            [
                [1, "Left dominant circulation."],
                [2, ""],
                [3, "Severe 80% stenosis of the mid LAD."],
                [4, "Left dominant circulation."],
            ]
        )
    source = _source_file(synthetic_data, split_examples[0])
    code = infer.main(["--workdir", tiny_run[0], "--bank", str(bank_file), source])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("Left dominant circulation.") == 1  # the duplicate is one candidate
    assert "Severe 80% stenosis of the mid LAD." in out and "findings:" in out


def test_infer_fails_only_when_no_file_worked(tiny_run, tmp_path, capsys):
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    code = infer.main(["--workdir", tiny_run[0], str(empty), str(tmp_path / "none.mp4")])
    captured = capsys.readouterr()
    assert code == 1
    assert "zero-byte file" in captured.err and "missing file" in captured.err


def test_infer_study_writes_one_report_from_all_the_files(
    run, tiny_run, synthetic_data, split_examples, tmp_path, capsys
):
    """--study: the files are encoded as one study (the model's study input with every
    video real), a bad file reported and left out."""
    study_id = split_examples[0]["study_id"]
    examples = [e for e in split_examples if e["study_id"] == study_id]
    sources = [_source_file(synthetic_data, e) for e in examples]
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    code = infer.main(["--workdir", tiny_run[0], "--json", "--study", sources[0], str(bad),
                       *sources[1:]])
    captured = capsys.readouterr()
    assert code == 0
    lines = [json.loads(line) for line in captured.out.splitlines()]
    errors, results = lines[:-1], lines[-1:]
    assert [e["file"] for e in errors] == [str(bad)]
    (record,) = results
    assert record["files"] == sources
    clips = np.stack([_dataset_clip(run, e) for e in examples])[None]  # [1, V, T, H, W, C]
    mask = np.ones(clips.shape[:2], bool)
    expected = inference.generate_reports(run, clips, video_mask=mask).texts[0]
    assert record["report"] == expected
    study_emb = inference.embed_videos(run, clips, video_mask=mask)[0]
    bank = list(dict.fromkeys(e["report"].decode() for e in split_examples))
    similarities = inference.embed_texts(run, bank) @ study_emb
    best = np.argsort(-similarities, kind="stable")[: len(record["top_k"])]
    assert [m["report"] for m in record["top_k"]] == [bank[i] for i in best]
    # The decoder read the tokens of every video of the study at once.
    _, study_aux = run.model.apply({"params": run.params}, clips, mask, method="encode_video")
    _, video_aux = run.model.apply({"params": run.params}, clips[0, :1], method="encode_video")
    assert study_aux["video_tokens"].shape[1] == len(examples) * video_aux["video_tokens"].shape[1]
    with pytest.raises(SystemExit):
        infer.main(["--workdir", tiny_run[0], "--study", "--attention", str(tmp_path), sources[0]])


# ------------------------------------------------------------------------------ export


REFERENCE_BATCH = 4  # the examples a test checks, padded: one compile for all


@functools.partial(jax.jit, static_argnames="model")
def _reference_embeddings(model, params, video, text_ids, text_mask):
    video_emb, _ = model.apply(
        {"params": params}, video, method=multitask.MultitaskModel.encode_video
    )
    text_emb, _ = model.apply(
        {"params": params}, text_ids, text_mask, method=multitask.MultitaskModel.encode_text
    )
    return video_emb, text_emb


def _reference(run, examples: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """model.apply's video and report embeddings [n, E] of dataset examples: the eval clip
    and the pipeline's own tokenize op."""
    from input_pipeline import ops

    assert len(examples) <= REFERENCE_BATCH
    pp = f"tokenize({run.config.input.text_max_len}, tokenizer='{run.text_tokenizer_spec}')"
    tokenize = ops.get_preprocess_fn(pp + "|keep('text_ids', 'text_mask')")
    texts = [tokenize(_tensors(e)) for e in examples]
    pad = REFERENCE_BATCH - len(examples)
    clips = np.stack([_dataset_clip(run, e) for e in examples])
    video = np.concatenate([clips, np.zeros((pad, *clips.shape[1:]), np.float32)])
    ids = np.stack([t["text_ids"].numpy() for t in texts] + [texts[0]["text_ids"].numpy()] * pad)
    mask = np.stack([t["text_mask"].numpy() for t in texts] + [texts[0]["text_mask"].numpy()] * pad)
    video_emb, text_emb = _reference_embeddings(run.model, run.params, video, ids, mask)
    return np.asarray(video_emb)[: len(examples)], np.asarray(text_emb)[: len(examples)]


@pytest.fixture(scope="module")
def exported(tiny_run, synthetic_data, tmp_path_factory):
    """The arrays export writes for the train split, in batches of 16 (the last one padded)."""
    path = str(tmp_path_factory.mktemp("export") / "train.npz")
    args = ["--workdir", tiny_run[0], "--data", synthetic_data, "--split", SPLIT, "--out", path]
    assert export.main(args + ["--batch_size", str(infer.FILES_PER_CHUNK)]) == 0
    return dict(np.load(path))


def test_export_covers_every_row_once_in_row_order(exported, split_examples):
    arrays = exported
    rows = sorted(int(e["row"]) for e in split_examples)
    np.testing.assert_array_equal(arrays["row"], rows)
    by_row = {int(e["row"]): e for e in split_examples}
    for i, row in enumerate(arrays["row"]):
        example = by_row[int(row)]
        assert arrays["study_id"][i] == example["study_id"].decode()
        assert arrays["path"][i] == example["path"].decode()
        assert arrays["report"][i] == example["report"].decode()
        for name, value in example["labels"].items():  # text labels come back as str
            value = value.decode() if isinstance(value, bytes) else value
            np.testing.assert_array_equal(arrays[f"label/{name}"][i], value)
    assert int(arrays["checkpoint"]) == STEP


def test_export_embeddings_are_the_models(run, exported, split_examples):
    arrays = exported
    assert arrays["video_emb"].shape == (len(split_examples), run.model.embed_dim)
    by_row = {int(e["row"]): e for e in split_examples}
    checked = [0, len(arrays["row"]) // 2, len(arrays["row"]) - 1]
    video_emb, text_emb = _reference(run, [by_row[int(arrays["row"][i])] for i in checked])
    np.testing.assert_allclose(arrays["video_emb"][checked], video_emb, atol=1e-5)
    np.testing.assert_allclose(arrays["text_emb"][checked], text_emb, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(arrays["video_emb"], axis=1), 1.0, atol=1e-5)


def test_raw_files_are_decoded_with_the_datasets_frame_limit_and_jpeg_quality(
    run, synthetic_data, tmp_path
):
    """prepare records --max_frames and --jpeg_quality; infer decodes raw files with them."""
    import dataclasses

    from input_pipeline import dataset_format, prepare

    source = os.path.join(os.path.dirname(synthetic_data), "source")
    out = str(tmp_path / "prepared")
    size = dataset_format.load_meta(synthetic_data).size
    prepare.prepare(
        os.path.join(source, "manifest.csv"), out, size=size, workers=1, max_frames=5,
        frame_format="jpeg", jpeg_quality=60,
    )
    meta = dataset_format.load_meta(out)
    assert (meta.max_frames, meta.frame_format, meta.jpeg_quality) == (5, "jpeg", 60)
    load_clip = infer.make_clip_loader(dataclasses.replace(run, dataset_meta=meta.to_json()))
    for example in list(dataset_format.read_split(out, "train").as_numpy_iterator())[:2]:
        assert len(example["frames"]) == 5
        clip = load_clip(os.path.join(source, example["path"].decode()))
        np.testing.assert_array_equal(clip, _dataset_clip(run, example))
