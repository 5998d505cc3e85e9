"""Model benchmarks: training-step time, masked-encoder savings, KV-cache decoding, FLOPs.

Prints one JSON object per line, ``{"name", "value", "unit"}``, as soon as each
number is measured. Every measured function is compiled once (ahead of time),
run ``--warmup`` times, then timed over ``--iters`` runs with
``block_until_ready``. Parameters are random (drawn on the host from the
shapes of ``init``), since only speed is measured. Parts (``--parts``):

  step     forward+backward time of the full recipe loss (SigLIP + caption CE +
           MVM MSE, 90% tube masking, contrastive_tokens='full') per size in
           ``--sizes``, on a small batch of 16x112x112 grayscale clips.
  masking  the ViViT encoder's forward+backward with 90% tube masking vs on
           all tokens, same size and input: ``masked_vs_full_encoder_cost``
           (ratio of times, target <= 0.2).
  stem     the ViViT encoder's forward+backward (all tokens) with the linear
           tubelet embedding vs the convolutional stem (``stem='conv'``,
           ``--stem_features``), same size and input as 'masking':
           ``conv_vs_linear_stem_encoder_cost`` (ratio of times).
  decode   greedy decoding of 128 tokens on the KV cache (``decode.greedy``)
           vs recomputing the whole prefix every step
           (``greedy_uncached``, below), with the reference decoder's size
           (6 layers, width 512, FFN 2048, vocab 30522, 393 memory tokens of
           width 512, batch 8): ``kv_cache_decode_speedup`` (target >= 10).
           Tokens/s count every sequence of the batch (8 x 128 per run).
  flops    training FLOPs per example of the recipe at 16x224x224 for each
           size in ``--flops_sizes``: ``multitask.training_flops_per_example``
           (analytic matmuls, x3 for forward+backward) next to XLA's
           ``cost_analysis()`` of the compiled step (which also counts
           elementwise work); nothing is run.

Usage (CPU)::

    python -m benchmarks.models --parts step,masking,stem,decode,flops --sizes tiny,small

Not here: input-pipeline and multi-device throughput.
"""

import argparse
import functools
import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deepcoro_jax import losses
from deepcoro_jax.models import decode, multitask
from deepcoro_jax.models.locca import CaptionDecoder, shift_right
from deepcoro_jax.models.mvm import tube_mask, tubelet_grid
from deepcoro_jax.models.vivit import ViViT

PARTS = ("step", "masking", "stem", "decode", "flops")
VOCAB = 30522  # BERT / PubMedBERT WordPiece
PYTORCH_REFERENCE_TOKENS_PER_S = 15.8  # the reference decoder on the 2-core CPU machine


def emit(name: str, value: float, unit: str) -> None:
    print(json.dumps({"name": name, "value": value, "unit": unit}), flush=True)


def random_like(shapes: Any, seed: int) -> Any:
    """Host-drawn random arrays for a tree of ShapeDtypeStructs (LayerNorm scales = 1)."""
    rng = np.random.default_rng(seed)

    def draw(path: Sequence[Any], leaf: jax.ShapeDtypeStruct) -> jax.Array:
        if getattr(path[-1], "key", None) == "scale":
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.asarray(0.02 * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def time_compiled(compiled: Callable, args: Sequence[Any], warmup: int, iters: int) -> float:
    """Mean seconds per call of an ahead-of-time compiled function."""
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    start = time.perf_counter()
    for _ in range(iters):
        jax.block_until_ready(compiled(*args))
    return (time.perf_counter() - start) / iters


def recipe_model(size: str, frames: int, image_size: int, text_len: int, caption_len: int):
    return multitask.make_model(
        vocab_size=VOCAB,
        size=size,
        num_frames=frames,
        image_size=image_size,
        text_max_len=text_len,
        caption_max_len=caption_len,
    )


def recipe_batch(batch_size: int, frames: int, image_size: int, text_len: int, caption_len: int):
    rng = np.random.default_rng(0)
    return {
        "video": jnp.asarray(
            rng.standard_normal((batch_size, frames, image_size, image_size, 1)), jnp.float32
        ),
        "text_ids": jnp.asarray(rng.integers(0, VOCAB, (batch_size, text_len)), jnp.int32),
        "text_mask": jnp.ones((batch_size, text_len), jnp.int32),
        "caption_in": jnp.asarray(rng.integers(0, VOCAB, (batch_size, caption_len)), jnp.int32),
        "caption_out": jnp.asarray(rng.integers(0, VOCAB, (batch_size, caption_len)), jnp.int32),
        "caption_mask": jnp.ones((batch_size, caption_len), jnp.float32),
    }


def recipe_grad_fn(model: multitask.MultitaskModel) -> Callable:
    """params, batch, rng -> (loss, grads) of the summed recipe losses (weights 1)."""

    def loss_fn(params, batch, rng):
        mask_rng, dropout_rng = jax.random.split(rng)
        out, _ = model.apply(
            {"params": params}, batch, train=True, rngs={"mask": mask_rng, "dropout": dropout_rng}
        )
        contrastive, _ = losses.sigmoid_loss(
            out["video_emb"], out["text_emb"], out["log_temperature"], out["bias"]
        )
        caption, _ = losses.caption_loss(
            out["caption_logits"], batch["caption_out"], batch["caption_mask"]
        )
        reconstruction, _ = losses.mvm_loss(out["mvm_pred"], out["mvm_target"], out["mvm_mask"])
        return contrastive + caption + reconstruction

    return jax.jit(jax.value_and_grad(loss_fn))


def param_shapes(model: multitask.MultitaskModel, batch: dict[str, Any]) -> Any:
    rngs = {"params": jax.random.key(0), "mask": jax.random.key(1)}
    return jax.eval_shape(functools.partial(model.init, train=False), rngs, batch)["params"]


def bench_step(args: argparse.Namespace) -> None:
    shape = f"{args.frames}x{args.image_size}x{args.image_size}"
    for size in args.sizes:
        model = recipe_model(size, args.frames, args.image_size, args.text_len, args.caption_len)
        batch = recipe_batch(
            args.batch_size, args.frames, args.image_size, args.text_len, args.caption_len
        )
        params = random_like(param_shapes(model, batch), seed=0)
        rng = jax.random.key(0)
        start = time.perf_counter()
        compiled = recipe_grad_fn(model).lower(params, batch, rng).compile()
        emit(f"train_step_compile_{size}_{shape}", time.perf_counter() - start, "s")
        seconds = time_compiled(compiled, (params, batch, rng), args.warmup, args.iters)
        emit(f"train_step_fwd_bwd_{size}_b{args.batch_size}_{shape}", seconds, "s/step")
        emit(f"train_step_examples_per_s_{size}_{shape}", args.batch_size / seconds, "examples/s")


def bench_masking(args: argparse.Namespace) -> None:
    size = args.masking_size
    shape = f"{args.frames}x{args.image_size}x{args.image_size}"
    encoder = ViViT.from_size(size, num_frames=args.frames, image_size=args.image_size)
    video = recipe_batch(args.batch_size, args.frames, args.image_size, 1, 1)["video"]
    grid = tubelet_grid(video.shape, encoder.patch_size)
    keep, _ = tube_mask(jax.random.key(0), args.batch_size, grid, mask_ratio=0.9)
    shapes = jax.eval_shape(encoder.init, jax.random.key(0), video)["params"]
    params = random_like(shapes, seed=1)

    def loss_fn(params, video, keep_indices):
        pooled, aux = encoder.apply({"params": params}, video, keep_indices=keep_indices)
        return jnp.mean(jnp.square(aux["tokens"])) + jnp.mean(jnp.square(pooled))

    grad_fn = jax.jit(jax.grad(loss_fn))
    times = {}
    for name, keep_indices in (("full", None), ("masked90_tube", keep)):
        compiled = grad_fn.lower(params, video, keep_indices).compile()
        times[name] = time_compiled(
            compiled, (params, video, keep_indices), args.warmup, args.iters
        )
        emit(f"encoder_fwd_bwd_{name}_{size}_b{args.batch_size}_{shape}", times[name], "s/step")
    emit("masked_vs_full_encoder_cost", times["masked90_tube"] / times["full"], "x")
    emit(f"masked_encoder_visible_tokens_{shape}", keep.shape[1] / math.prod(grid), "fraction")


def bench_stem(args: argparse.Namespace) -> None:
    size = args.masking_size
    shape = f"{args.frames}x{args.image_size}x{args.image_size}"
    video = recipe_batch(args.batch_size, args.frames, args.image_size, 1, 1)["video"]
    times = {}
    for stem in ("linear", "conv"):
        encoder = ViViT.from_size(
            size,
            num_frames=args.frames,
            image_size=args.image_size,
            stem=stem,
            stem_features=args.stem_features,
        )
        shapes = jax.eval_shape(encoder.init, jax.random.key(0), video)["params"]
        params = random_like(shapes, seed=1)

        def loss_fn(params, video, encoder=encoder):
            pooled, aux = encoder.apply({"params": params}, video)
            return jnp.mean(jnp.square(aux["tokens"])) + jnp.mean(jnp.square(pooled))

        compiled = jax.jit(jax.grad(loss_fn)).lower(params, video).compile()
        times[stem] = time_compiled(compiled, (params, video), args.warmup, args.iters)
        name = f"encoder_fwd_bwd_{stem}_stem_{size}_b{args.batch_size}_{shape}"
        emit(name, times[stem], "s/step")
    emit("conv_vs_linear_stem_encoder_cost", times["conv"] / times["linear"], "x")


@functools.partial(jax.jit, static_argnames=("decoder", "max_len"))
def greedy_uncached(
    decoder: CaptionDecoder,
    params: Any,
    memory: jax.Array,
    memory_mask: jax.Array | None = None,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_len: int | None = None,
) -> decode.DecodeOutput:
    """Greedy decoding without a cache: every step re-runs the teacher-forced decoder.

    The baseline for the decoding benchmark (the PyTorch reference decodes this
    way). Each step feeds the fixed-shape [B, max_len] prefix (BOS, the tokens so
    far, then pads that the causal mask hides) through the whole decoder, memory
    cross-attention included, and reads the logits at the current position.
    Same arguments and result as ``decode.greedy``, for a ``CaptionDecoder``.
    """
    max_len = decode.resolve_max_len(decoder, max_len)
    batch = memory.shape[0]

    def keep_going(state: tuple) -> jax.Array:
        step, _, finished, _ = state
        return (step < max_len) & ~jnp.all(finished)

    def one_step(state: tuple) -> tuple:
        step, tokens, finished, log_probs = state
        logits, _ = decoder.apply(
            {"params": params}, shift_right(tokens, bos_id), memory, memory_mask
        )  # [B, max_len, V]
        step_log_probs = jax.nn.log_softmax(
            jax.lax.dynamic_index_in_dim(logits, step, axis=1, keepdims=False)
        )  # [B, V]
        next_tokens = jnp.argmax(step_log_probs, axis=-1).astype(jnp.int32)  # [B]
        token_log_probs = jnp.take_along_axis(step_log_probs, next_tokens[:, None], axis=1)[:, 0]
        next_tokens = jnp.where(finished, pad_id, next_tokens)
        log_probs = log_probs + jnp.where(finished, 0.0, token_log_probs)
        tokens = tokens.at[:, step].set(next_tokens)
        return step + 1, tokens, finished | (next_tokens == eos_id), log_probs

    init_state = (
        jnp.zeros((), jnp.int32),
        jnp.full((batch, max_len), pad_id, jnp.int32),
        jnp.zeros((batch,), bool),
        jnp.zeros((batch,), jnp.float32),
    )
    _, tokens, _, log_probs = jax.lax.while_loop(keep_going, one_step, init_state)
    return decode.DecodeOutput(tokens, log_probs)


def bench_decode(args: argparse.Namespace) -> None:
    batch_size, memory_tokens, width, new_tokens = 8, 393, 512, args.decode_tokens
    decoder = CaptionDecoder(
        vocab_size=VOCAB,
        num_layers=6,
        hidden_size=width,
        mlp_dim=2048,
        num_heads=8,
        max_len=new_tokens,
    )
    memory = jnp.asarray(
        np.random.default_rng(2).standard_normal((batch_size, memory_tokens, width)), jnp.float32
    )
    tokens = jnp.zeros((batch_size, new_tokens), jnp.int32)
    params = random_like(jax.eval_shape(decoder.init, jax.random.key(0), tokens, memory), 3)
    params = params["params"]
    # eos_id -1 is never emitted, so every run writes exactly `new_tokens` tokens.
    ids = dict(bos_id=1, eos_id=-1, pad_id=0, max_len=new_tokens)
    emit(
        "kv_cache_decode_reference_pytorch_tokens_per_s", PYTORCH_REFERENCE_TOKENS_PER_S, "tokens/s"
    )
    rates = {}
    for name, loop, iters in (
        ("cached", decode.greedy, args.iters),
        ("uncached", greedy_uncached, args.uncached_iters),
    ):
        run = jax.jit(functools.partial(loop, decoder, memory_mask=None, **ids))
        compiled = run.lower(params, memory).compile()
        warmup = args.warmup if name == "cached" else 0
        seconds = time_compiled(compiled, (params, memory), warmup, iters)
        rates[name] = batch_size * new_tokens / seconds
        emit(
            f"greedy_{name}_decode_tokens_per_s_b{batch_size}_{new_tokens}new",
            rates[name],
            "tokens/s",
        )
    emit("kv_cache_decode_speedup", rates["cached"] / rates["uncached"], "x")
    emit(
        "kv_cache_decode_vs_pytorch_reference",
        rates["cached"] / PYTORCH_REFERENCE_TOKENS_PER_S,
        "x",
    )


def bench_flops(args: argparse.Namespace) -> None:
    frames, image_size, text_len, caption_len = 16, 224, args.text_len, args.caption_len
    shape = f"{frames}x{image_size}x{image_size}"
    fast_compile = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    for size in args.flops_sizes:
        model = recipe_model(size, frames, image_size, text_len, caption_len)
        analytic = multitask.training_flops_per_example(
            model, (frames, image_size, image_size, 1), text_len, caption_len, mvm=True
        )["training"]
        emit(f"analytic_training_flops_per_example_{size}_{shape}", float(analytic), "FLOPs")
        batch = jax.eval_shape(lambda: recipe_batch(1, frames, image_size, text_len, caption_len))
        params = param_shapes(model, batch)
        compiled = (
            recipe_grad_fn(model)
            .lower(params, batch, jax.random.key(0))
            .compile(compiler_options=fast_compile)
        )
        xla_flops = compiled.cost_analysis()["flops"]
        emit(f"xla_training_flops_per_example_{size}_{shape}", float(xla_flops), "FLOPs")
        emit(f"xla_over_analytic_flops_{size}", float(xla_flops) / analytic, "x")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated of {PARTS}")
    parser.add_argument("--sizes", default="tiny,small", help="model sizes for 'step'")
    parser.add_argument(
        "--masking_size", default="small", help="encoder size for 'masking' and 'stem'"
    )
    parser.add_argument(
        "--stem_features", default="16,32,64,64", help="the conv stem's stage widths for 'stem'"
    )
    parser.add_argument(
        "--flops_sizes", default="mu,tiny,small,base,large", help="model sizes for 'flops'"
    )
    parser.add_argument("--batch_size", type=int, default=2, help="'step' and 'masking' batch")
    parser.add_argument("--frames", type=int, default=16, help="'step'/'masking' clip length")
    parser.add_argument("--image_size", type=int, default=112, help="'step'/'masking' frame size")
    parser.add_argument("--text_len", type=int, default=128, help="report tokens (text tower)")
    parser.add_argument("--caption_len", type=int, default=128, help="caption decoder tokens")
    parser.add_argument("--decode_tokens", type=int, default=128, help="new tokens for 'decode'")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--iters", type=int, default=3, help="timed runs")
    parser.add_argument(
        "--uncached_iters", type=int, default=1, help="timed runs of the (slow) uncached decoding"
    )
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {PARTS}")
    args.sizes = args.sizes.split(",")
    args.flops_sizes = args.flops_sizes.split(",")
    args.stem_features = tuple(int(f) for f in args.stem_features.split(","))
    emit(f"devices_{jax.devices()[0].platform}", jax.device_count(), "devices")
    benches = {
        "step": bench_step,
        "masking": bench_masking,
        "stem": bench_stem,
        "decode": bench_decode,
        "flops": bench_flops,
    }
    for part in PARTS:
        if part in parts:
            benches[part](args)


if __name__ == "__main__":
    main()
