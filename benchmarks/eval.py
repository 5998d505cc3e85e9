"""Evaluation benchmarks: retrieval ranking at scale and caption generation throughput.

Prints one JSON object per line, ``{"name", "value", "unit"}``, as soon as each
number is measured. Parts (``--parts``):

  retrieval  ``evaluators.retrieval.retrieval_metrics`` (Recall@1/5/10/50,
             nDCG, MRR, ranks) on a random float32 similarity matrix of
             ``--queries`` x ``--candidates`` (1k x 100k by default) with 1 to
             ``--max_relevant`` relevant candidates per query:
             ``retrieval_100k_seconds`` (mean over ``--iters`` runs; at other
             sizes ``retrieval_<Q>x<C>_seconds``).
  caption    report generation with the runlocal model
             (``configs/multitask.py:runlocal``: size mu, 8 x 64 x 64 clips,
             128 caption tokens), random parameters, a batch of
             ``--batch_size`` clips: encoding plus greedy decoding, and plus
             beam search with ``--beam_size`` beams, each one jitted program
             compiled ahead of time (``caption_compile_s/<strategy>``, not in
             the rates) and timed over ``--iters`` runs after ``--warmup``.
             EOS is set to an id never emitted, so every report runs the full
             128 tokens: the rates are for the longest reports the model
             writes, a lower bound for real (shorter) ones.

Usage (from the repository root; the CPU numbers are in docs/running.md)::

    python -m benchmarks.eval
    python -m benchmarks.eval --parts caption --batch_size 32 --beam_size 8

Not here: the models' training and decoding kernels (``benchmarks.models``),
the train step (``benchmarks.train_step``), text and clinical metric costs.
"""

import argparse
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.models import param_shapes, random_like, time_compiled
from benchmarks.train_step import BOS_ID, PAD_ID, emit, random_batch
from configs import multitask as multitask_config
from deepcoro_jax.models import multitask
from deepcoro_jax.training import run
from evaluators.retrieval import retrieval_metrics

PARTS = ("retrieval", "caption")
NEVER_EMITTED_EOS = -1  # no token has this id, so decoding always runs max_len steps


def random_retrieval(
    num_queries: int, num_candidates: int, max_relevant: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """A random [Q, C] float32 similarity and a bool relevance with 1..max_relevant per row."""
    rng = np.random.default_rng(seed)
    sim = rng.standard_normal((num_queries, num_candidates), np.float32)
    relevant = np.zeros((num_queries, num_candidates), bool)
    counts = rng.integers(1, max_relevant + 1, num_queries)
    for query, count in enumerate(counts):
        relevant[query, rng.choice(num_candidates, count, replace=False)] = True
    return sim, relevant


def bench_retrieval(args: argparse.Namespace) -> None:
    sim, relevant = random_retrieval(args.queries, args.candidates, args.max_relevant, seed=0)
    start = time.perf_counter()
    for _ in range(args.iters):
        retrieval_metrics(sim, relevant)
    seconds = (time.perf_counter() - start) / args.iters
    at_default_size = (args.queries, args.candidates) == (1000, 100_000)
    name = "100k" if at_default_size else f"{args.queries}x{args.candidates}"
    emit(f"retrieval_{name}_seconds", seconds, "s")


def bench_caption(args: argparse.Namespace) -> None:
    config = multitask_config.get_config("runlocal")
    model = run.build_model(config, args.vocab_size, PAD_ID)
    m = config.model
    video_shape = (m.num_frames, m.image_size, m.image_size, 1)
    rng = np.random.default_rng(1)
    example = random_batch(
        rng,
        1,
        video_shape,
        config.input.text_max_len,
        config.input.caption_max_len,
        args.vocab_size,
    )
    params = random_like(param_shapes(model, example), seed=0)
    video = jnp.asarray(rng.uniform(-1.0, 1.0, (args.batch_size, *video_shape)), jnp.float32)
    max_len = config.input.caption_max_len
    strategies = (
        ("greedy", "greedy", {}),
        (f"beam{args.beam_size}", "beam", dict(beam_size=args.beam_size)),
    )
    for name, strategy, options in strategies:
        generate = jax.jit(
            functools.partial(
                multitask.generate,
                model,
                bos_id=BOS_ID,
                eos_id=NEVER_EMITTED_EOS,
                pad_id=PAD_ID,
                max_len=max_len,
                strategy=strategy,
                **options,
            )
        )
        start = time.perf_counter()
        compiled = generate.lower(params, video).compile()
        emit(f"caption_compile_s/{name}", time.perf_counter() - start, "s")
        seconds = time_compiled(compiled, (params, video), args.warmup, args.iters)
        emit(f"caption_batch_s/{name}", seconds, f"s per batch of {args.batch_size}")
        emit(f"caption_reports_per_s/{name}", args.batch_size / seconds, "reports/s")
        emit(f"caption_tokens_per_s/{name}", args.batch_size * max_len / seconds, "tokens/s")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.eval", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated of {PARTS}")
    parser.add_argument("--queries", type=int, default=1000, help="retrieval queries")
    parser.add_argument("--candidates", type=int, default=100_000, help="retrieval candidates")
    parser.add_argument(
        "--max_relevant", type=int, default=5, help="most relevant candidates per query"
    )
    parser.add_argument("--batch_size", type=int, default=16, help="clips per generation batch")
    parser.add_argument("--beam_size", type=int, default=4, help="beams of the beam search")
    parser.add_argument(
        "--vocab_size", type=int, default=1000, help="caption vocabulary (prepare's default)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--iters", type=int, default=3, help="timed runs")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {PARTS}")
    for flag in ("queries", "candidates", "max_relevant", "batch_size", "beam_size", "iters"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.max_relevant > args.candidates:
        parser.error(f"--max_relevant={args.max_relevant} exceeds --candidates={args.candidates}")
    emit(f"devices_{jax.devices()[0].platform}", jax.device_count(), "devices")
    benches = {"retrieval": bench_retrieval, "caption": bench_caption}
    for part in PARTS:
        if part in parts:
            benches[part](args)


if __name__ == "__main__":
    main()
