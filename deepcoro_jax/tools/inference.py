"""A trained run, loaded for inference: its config, model, parameters and tokenizers.

For: `load_run`, which rebuilds a run's model from its ``config.json`` and reads
only the parameters from its checkpoint (no optimizer state, no EMA teacher),
and the batched, jitted helpers that ``infer``, ``export`` and the attention
maps share: `embed_videos`, `embed_texts`, `generate_reports`. They take
preprocessed clips (NumPy, the eval pp's output) and report texts, pad the last
batch, spread each batch over every local device and return NumPy arrays.

Inference runs in one process (all its local devices); the parameters are
replicated. Everything else comes from the workdir: the tokenizers and the
training data's format are the run's own copies (``WORKDIR/assets``,
`run.write_assets`), so the prepared data may have moved or gone. (A run
written before runs kept them reads both from its data, as the trainer did.)

Not for: reading files or datasets (``infer.py``, ``export.py``), training,
evaluation schedules. No TensorFlow is imported, except by `load_run` for a run
without assets.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from deepcoro_jax import console, paths
from deepcoro_jax.domain import locations, tokenizers
from deepcoro_jax.models import multitask
from deepcoro_jax.training import checkpoint, sharding
from deepcoro_jax.training import run as run_lib

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


@dataclasses.dataclass(frozen=True)
class Run:
    """A trained run ready for inference (see `load_run`)."""

    workdir: str
    step: int  # the checkpoint's step
    config: ml_collections.ConfigDict
    model: multitask.MultitaskModel
    params: Any  # the 'params' collection, replicated on `mesh`
    caption_tokenizer: tokenizers.Tokenizer
    text_tokenizer: tokenizers.Tokenizer
    text_tokenizer_spec: str
    data_dir: str  # where the prepared dataset the run trained on was (it may have moved)
    dataset_meta: dict  # that dataset's format (`dataset_format.DatasetMeta.to_json`)
    mesh: Mesh
    predict: dict[str, Callable]  # `run.predict_fns` of the model on `mesh`

    @property
    def video_pp(self) -> str:
        """The deterministic eval clip pp of this run (`eval_video_pp`)."""
        return eval_video_pp(self.config)


class GeneratedReports(NamedTuple):
    """texts: one report per clip; tokens: int32 [N, caption_max_len] (EOS, then pad)."""

    texts: list[str]
    tokens: np.ndarray


def eval_video_pp(config: ml_collections.ConfigDict) -> str:
    """``config.input.eval_video_pp``; for older runs without it, the centred clip of
    ``model.num_frames`` frames 2 apart, resized to ``model.image_size``, in [-1, 1]."""
    pp = config.input.get("eval_video_pp")
    if pp:
        return pp
    size = config.model.image_size
    size = size if isinstance(size, int) else tuple(size)
    return (
        f"decode_sample_frames({config.model.num_frames}, stride=2)|resize({size})"
        "|value_range(-1, 1)"
    )


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The run's config, read from ``workdir/config.json`` (written by the trainer)."""
    path = paths.Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {workdir} is not a run's workdir (launch.py writes {CONFIG_FILE})"
        )
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def checkpoint_step(workdir: str, step: int | None) -> int:
    """`step` if ``workdir/checkpoints`` holds it, else (None) the latest complete one."""
    directory = paths.Path(workdir) / CHECKPOINT_DIR
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} not found: the run has no checkpoints")
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
    steps = sorted(manager.all_steps())
    manager.close()
    if not steps:
        raise FileNotFoundError(f"{directory} holds no complete checkpoint")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"--checkpoint {step}: not in {directory}; steps: {steps}")
    return step


def _abstract_params(model: multitask.MultitaskModel, config: ml_collections.ConfigDict):
    """Shapes and dtypes of the inference parameters (no MVM decoder): nothing is computed."""
    size = config.model.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    batch = {
        "video": jax.ShapeDtypeStruct((1, config.model.num_frames, height, width, 1), jnp.float32),
        "text_ids": jax.ShapeDtypeStruct((1, config.input.text_max_len), jnp.int32),
        "text_mask": jax.ShapeDtypeStruct((1, config.input.text_max_len), jnp.bool_),
        "caption_in": jax.ShapeDtypeStruct((1, config.input.caption_max_len), jnp.int32),
    }

    def init(rng, batch):
        return model.init({"params": rng}, batch, train=False, mvm=False)["params"]

    return jax.eval_shape(init, jax.random.key(0), batch)


def load_run(workdir: str, step: int | None = None) -> Run:
    """The run in `workdir` at checkpoint `step` (default: the latest), ready for inference.

    The model is rebuilt from ``config.json``; the parameters it needs for
    inference (all but the MVM decoder's) are read from the checkpoint's
    ``params`` into a target made with ``jax.eval_shape``, replicated over a
    mesh of every device. Raises naming the missing file, step or weight.
    """
    if jax.process_count() > 1:
        raise RuntimeError(
            f"inference runs in one process; this is process {jax.process_index()} of "
            f"{jax.process_count()}"
        )
    workdir = paths.resolve(workdir)
    config = load_config(workdir)
    step = checkpoint_step(workdir, step)
    kept = run_lib.read_assets(workdir)
    if kept:  # the run's own copies: no prepared data needed
        caption_spec, text_spec = kept["caption_tokenizer"], kept["text_tokenizer"]
        data_dir, dataset_meta = kept["data_dir"], kept["dataset_meta"]
    else:  # a run written before runs kept their assets: read them from its data
        from input_pipeline import data_cache, dataset_format

        data_dir = data_cache.resolve_data_dir(config.input)
        caption_spec = run_lib.tokenizer_spec(config.input.caption_tokenizer, data_dir)
        text_spec = run_lib.tokenizer_spec(config.input.text_tokenizer, data_dir, config.text_init)
        dataset_meta = dataset_format.load_meta(data_dir).to_json()
    caption_tokenizer = run_lib.caption_tokenizer(config, caption_spec)
    model = run_lib.build_model(config, caption_tokenizer.vocab_size, caption_tokenizer.pad_id)
    mesh = sharding.make_mesh()
    replicated = sharding.replicated(mesh)
    target = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
        _abstract_params(model, config),
    )
    params = checkpoint.load_subset(workdir, step, target, include=".*")
    return Run(
        workdir=workdir,
        step=step,
        config=config,
        model=model,
        params=params,
        caption_tokenizer=caption_tokenizer,
        text_tokenizer=tokenizers.get_tokenizer(text_spec),
        text_tokenizer_spec=text_spec,
        data_dir=data_dir,
        dataset_meta=dataset_meta,
        mesh=mesh,
        predict=run_lib.predict_fns(model, mesh),
    )


# ------------------------------------------------------------------------------ batching


def _padded_batch_size(batch_size: int) -> int:
    """`batch_size` rounded up to a multiple of the device count (each device gets a slice)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    devices = jax.device_count()
    return -(-batch_size // devices) * devices


def _device_batches(run: Run, arrays: Sequence[np.ndarray], batch_size: int):
    """Yields (device arrays, number of real rows) over `arrays`' leading axis.

    Every batch has `batch_size` rows (rounded up to the device count; the last
    one padded with copies of its first row) and is split over the mesh.
    """
    batch_size = _padded_batch_size(batch_size)
    total = len(arrays[0])
    batch_sharding = sharding.batch_sharding(run.mesh)
    for start in range(0, total, batch_size):
        real = min(batch_size, total - start)
        chunk = []
        for array in arrays:
            part = np.asarray(array[start : start + real])
            if real < batch_size:
                filler = np.repeat(part[:1], batch_size - real, axis=0)
                part = np.concatenate([part, filler])
            chunk.append(jax.device_put(part, batch_sharding))
        yield chunk, real


def _check_clips(
    videos: np.ndarray, where: str, video_mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Float32 clips [N, T, H, W, C], or studies [N, V, T, H, W, C] with `video_mask`
    [N, V] (True for real videos)."""
    videos = np.asarray(videos)
    ndim = 5 if video_mask is None else 6
    shape = "[N, T, H, W, C]" if video_mask is None else "[N, V, T, H, W, C]"
    if videos.ndim != ndim or not np.issubdtype(videos.dtype, np.floating):
        raise ValueError(
            f"{where}: videos must be float clips {shape} (the eval pp's output), "
            f"got {videos.dtype} {videos.shape}"
        )
    if len(videos) == 0:
        raise ValueError(f"{where}: no videos")
    if video_mask is not None:
        video_mask = np.asarray(video_mask, bool)
        if video_mask.shape != videos.shape[:2] or not video_mask.any(axis=1).all():
            raise ValueError(
                f"{where}: video_mask must be [N, V] = {videos.shape[:2]} with a real video "
                f"in every study, got {video_mask.shape}"
            )
    return videos.astype(np.float32, copy=False), video_mask


def _video_batches(run: Run, videos: np.ndarray, video_mask, batch_size: int):
    """(batch dict, real rows) of clips, or of studies with their 'video_mask'."""
    arrays = [videos] if video_mask is None else [videos, video_mask]
    for chunk, real in _device_batches(run, arrays, batch_size):
        batch = {"video": chunk[0]}
        if video_mask is not None:
            batch["video_mask"] = chunk[1]
        yield batch, real


# ------------------------------------------------------------------------------ helpers


def embed_videos(
    run: Run, videos: np.ndarray, batch_size: int = 32, *, video_mask: np.ndarray | None = None
) -> np.ndarray:
    """L2-normalised video embeddings float32 [N, E] of clips [N, T, H, W, C], or of
    studies [N, V, T, H, W, C] with `video_mask` [N, V] (the model's study pooling)."""
    videos, video_mask = _check_clips(videos, "embed_videos", video_mask)
    out = []
    for batch, real in _video_batches(run, videos, video_mask, batch_size):
        emb = run.predict["encode_video"](run.params, batch)["video_emb"]
        out.append(np.asarray(jax.device_get(emb))[:real])
    return np.concatenate(out)


def tokenize_texts(run: Run, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Text-encoder ids int32 and mask bool, [N, text_max_len], as the pipeline's ``tokenize``."""
    max_len = run.config.input.text_max_len
    ids = np.zeros([len(texts), max_len], np.int32)
    mask = np.zeros([len(texts), max_len], bool)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(text)}")
        ids[i], length = tokenizers.encode_padded(run.text_tokenizer, text, max_len)
        mask[i, :length] = True
    return ids, mask


def embed_texts(run: Run, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """L2-normalised report embeddings float32 [N, E] of `texts`."""
    if isinstance(texts, str):
        raise TypeError("embed_texts: texts must be a sequence of str, got one str")
    if not texts:
        raise ValueError("embed_texts: no texts")
    ids, mask = tokenize_texts(run, texts)
    out = []
    for (batch_ids, batch_mask), real in _device_batches(run, [ids, mask], batch_size):
        batch = {"text_ids": batch_ids, "text_mask": batch_mask}
        emb = run.predict["encode_text"](run.params, batch)["text_emb"]
        out.append(np.asarray(jax.device_get(emb))[:real])
    return np.concatenate(out)


def generate_reports(
    run: Run,
    videos: np.ndarray,
    *,
    beam_size: int = 1,
    batch_size: int = 16,
    video_mask: np.ndarray | None = None,
) -> GeneratedReports:
    """Reports written by the caption decoder for clips [N, T, H, W, C], or one per study
    [N, V, T, H, W, C] with `video_mask` [N, V] (the decoder reads the tokens of all the
    study's videos).

    `beam_size` 1 decodes greedily, more runs beam search (``decode.beam_search``
    with its default length penalty). Decoding stops at EOS or ``caption_max_len``.
    """
    if beam_size < 1:
        raise ValueError(f"generate_reports: beam_size must be at least 1, got {beam_size}")
    videos, video_mask = _check_clips(videos, "generate_reports", video_mask)
    tok = run.caption_tokenizer
    options = dict(
        bos_id=tok.bos_id,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        max_len=run.model.caption_decoder.max_len,
        strategy="greedy" if beam_size == 1 else "beam",
        beam_size=beam_size,
    )
    tokens = []
    for batch, real in _video_batches(run, videos, video_mask, batch_size):
        memory = run.predict["encode_video"](run.params, batch)
        out = run.predict["generate"](run.params, memory, **options)["tokens"]
        tokens.append(np.asarray(jax.device_get(out))[:real])
    all_tokens = np.concatenate(tokens).astype(np.int32)
    return GeneratedReports([tok.decode(row.tolist()) for row in all_tokens], all_tokens)


class GroundedLesion(NamedTuple):
    """Where the model puts one named lesion (``ground_lesions``): its box on a clip frame,
    or None where the decoder wrote no readable box."""

    segment: str
    percent: float
    phrase: str
    frame: int | None
    box: np.ndarray | None  # float32 [4] (y0, x0, y1, x1) in [0, 1] of the clip's frame


def ground_lesions(
    run: Run,
    videos: np.ndarray,
    lesions: Sequence[Sequence[tuple[str, float]]],
    *,
    batch_size: int = 16,
) -> list[list[GroundedLesion]]:
    """LocCa's referring expressions: for each clip [N, T, H, W, C] and each of its
    lesions [(segment, percent)], the box the decoder writes after "<aref>" and the
    lesion's phrase (``locations.lesion_phrase``), decoding only a frame-time token and
    four coordinate tokens. Needs a run trained with ``config.model.location_bins``."""
    tok = run.caption_tokenizer
    if not isinstance(tok, locations.LocationTokenizer):
        raise ValueError(
            "this run has no location tokens (config.model.location_bins was 0): it was "
            "not trained to locate lesions"
        )
    videos, _ = _check_clips(videos, "ground_lesions")
    if len(lesions) != len(videos):
        raise ValueError(f"ground_lesions: {len(videos)} clips but {len(lesions)} lesion lists")
    vocab = tok.vocab
    prompts = max(1, max(len(named) for named in lesions))
    phrases = [[locations.lesion_phrase(s, p) for s, p in named] for named in lesions]
    encoded = [[locations.referring_prefix(vocab, tok, s, p) for s, p in named]
               for named in lesions]
    width = max([len(ids) for row in encoded for ids in row] + [1])
    prefix = np.full((len(videos), prompts, width), tok.pad_id, np.int32)
    prefix_len = np.ones((len(videos), prompts), np.int32)  # unused slots: <aref> alone
    prefix[:, :, 0] = vocab.task_id("aref")
    for i, row in enumerate(encoded):
        for m, ids in enumerate(row):
            prefix[i, m, : len(ids)] = ids
            prefix_len[i, m] = len(ids)
    masks = vocab.box_step_masks()
    ids = dict(bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    tokens = []
    for (clips, batch_prefix, batch_len), real in _device_batches(
        run, [videos, prefix, prefix_len], batch_size
    ):
        memory = run.predict["encode_video"](run.params, {"video": clips})
        batch = {"video_tokens": memory["video_tokens"],
                 "video_token_mask": memory["video_token_mask"],
                 "ground_prefix": batch_prefix, "ground_prefix_len": batch_len}
        out = run.predict["ground"](run.params, batch, masks, **ids)["ground_tokens"]
        tokens.append(np.asarray(jax.device_get(out))[:real])
    tokens = np.concatenate(tokens)  # [N, M, 5]
    results = []
    for i, named in enumerate(lesions):
        row = []
        for m, (segment, percent) in enumerate(named):
            read = vocab.read_box(tokens[i, m])
            frame, box = (None, None) if read is None else read
            row.append(GroundedLesion(segment, float(percent), phrases[i][m], frame, box))
        results.append(row)
    return results


def positive_int(value: str) -> int:
    """An argparse type for the command-line tools: an int of at least 1."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every tool that reads a trained run takes: --workdir, --checkpoint,
    --verbose and --compilation_cache_dir."""
    parser.add_argument("--workdir", required=True, help="the trained run's workdir")
    parser.add_argument("--checkpoint", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--verbose", action="store_true", help="library log lines too")
    parser.add_argument(
        "--compilation_cache_dir",
        help="compiled programs (default: $JAX_COMPILATION_CACHE_DIR, else "
        f"{paths.COMPILATION_CACHE})",
    )


def start_tool(args: argparse.Namespace, command_line: bool) -> None:
    """From the command line: library log lines to the run's log.txt and launch.py's
    compilation cache; called as a function (tests): warnings to stderr, JAX untouched."""
    if command_line:
        console.start_for_run(args.workdir, verbose=args.verbose)
        paths.use_compilation_cache(args.compilation_cache_dir)
    else:
        logging.basicConfig(level=logging.WARNING)
