"""Throughput and MFU of the trainer's jitted, sharded train step, fed random in-memory batches.

For: how many videos per second one optimizer update processes, how long it
takes to compile, and what fraction of the device's matmul peak it uses (MFU),
with and without masked video modelling. The step is the trainer's own: the
model from ``run.build_model``, the optimizer from ``run.make_optimizer``,
the state from ``run.create_train_state`` placed by ``run.state_shardings``,
the step from ``run.make_train_step`` (``deepcoro_jax/training/run.py``), jitted
with the shardings and donation that the trainer uses. The batches are random
but valid (token ids in the vocabulary, padded masks), so nothing here imports
TensorFlow.

With ``--find_batch`` nothing is timed: per variant, the train step is only
compiled (from abstract arguments, so nothing is allocated) at batch sizes
that double from ``--batch_size`` until XLA's memory analysis exceeds the
memory there is (``deepcoro_jax/training/memory.py``: the allocator's limit
per device, or the host's available memory on CPU; ``--memory_gb`` sets it),
then bisected to a multiple of ``--batch_multiple``. It prints each try's
memory and ``largest_batch/<variant>``. XLA's estimate is what the trainer
checks before its first step; a batch at the very edge can still run out
(fragmentation).

Not for: the input pipeline's speed, evaluation, or multi-process runs.

Usage, from the repository root:

  python -m benchmarks.train_step                        # CPU: tiny defaults, 1-2 minutes
  python -m benchmarks.train_step --size base --batch_size 32 --num_frames 16 \\
      --image_size 224 --dtype bfloat16                   # the defaults on a GPU or TPU
  python -m benchmarks.train_step --nomvm --steps 20      # only without MVM
  python -m benchmarks.train_step --size base --num_frames 16 --image_size 224 \
      --dtype bfloat16 --find_batch                        # the largest batch that fits

Every measurement is printed as soon as it is taken, one JSON object per line:

  {"name": "train_step_videos_per_s/mvm", "value": 52.3, "unit": "videos/s"}

Per variant (``/mvm``: MVM weight 1, ``/nomvm``: MVM weight 0): compile
seconds, analytic and XLA FLOPs per example, the compiled step's memory per
device, seconds per step, videos/s, and MFU. MFU = analytic training FLOPs per
example (``multitask.training_flops_per_example``, as the trainer logs it) x
videos/s / (peak x devices), where the peak is the MEASURED rate of one device
on a large jitted matmul in the compute dtype (``matmul_peak_flops``); the MFU
against the nominal bf16 peak of ``run.PEAK_FLOPS`` is printed too where the
device is listed there. XLA's ``cost_analysis()`` FLOPs are printed for
comparison only: on GPUs they leave out the library (cuBLAS/cuDNN) calls that
do most of the work (about 1/30 of the analytic count for ViViT-B on an H100).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from configs import multitask as multitask_config
from deepcoro_jax.domain import locations
from deepcoro_jax.models import multitask, vivit
from deepcoro_jax.models.common import ATTENTION_IMPLEMENTATIONS
from deepcoro_jax.training import memory as memory_lib
from deepcoro_jax.training import run as run_lib
from deepcoro_jax.training import sharding

VARIANTS = ("mvm", "nomvm")
# Defaults where a flag is not given: a tiny model on CPU, the 'base' recipe elsewhere.
CPU_DEFAULTS = dict(
    size="mu", batch_size=4, num_frames=8, image_size=64, dtype="float32", steps=3, matmul_size=1024
)
ACCELERATOR_DEFAULTS = dict(
    size="base",
    batch_size=16,
    num_frames=16,
    image_size=224,
    dtype="bfloat16",
    steps=10,
    matmul_size=8192,
)
WARMUP_STEPS = 2  # untimed executions after compiling (allocation, first-run effects)
MATMUL_CALLS = 10  # matmuls per timed round; the best of MATMUL_ROUNDS rounds counts
MATMUL_ROUNDS = 3
# Special ids of the SentencePiece models that `prepare` trains (tokenizers.SP_*_ID).
PAD_ID, BOS_ID, EOS_ID = 0, 2, 3


def emit(name: str, value: float, unit: str) -> None:
    """Prints one measurement as a JSON line, at once."""
    print(json.dumps({"name": name, "value": value, "unit": unit}), flush=True)


def benchmark_config(
    size: str,
    batch_size: int,
    num_frames: int,
    image_size: int,
    dtype: str,
    contrastive_tokens: str,
    mvm: bool,
    stem: str = "linear",
    attention_impl: str = "auto",
    remat: str = "none",
) -> ml_collections.ConfigDict:
    """The recipe (configs/multitask.py) at this size and input, with or without MVM."""
    config = multitask_config.get_config(f"size={size}")
    config.input.batch_size = batch_size
    config.model.num_frames = num_frames
    config.model.image_size = image_size
    config.model.dtype = dtype
    config.model.contrastive_tokens = contrastive_tokens
    config.model.encoder_overrides.stem = stem
    config.model.attention_impl = attention_impl
    config.model.encoder_overrides.remat = remat
    config.loss.weights.mvm = 1.0 if mvm else 0.0
    return config


def random_batch(
    rng: np.random.Generator,
    batch_size: int,
    video_shape: Sequence[int],
    text_len: int,
    caption_len: int,
    vocab_size: int,
    task_weights: Mapping[int, float] | None = None,
    findings: bool = True,
) -> dict[str, np.ndarray]:
    """A training batch as the pipeline yields it, with random content.

    'video' float32 in [-1, 1]; 'text_ids' = BOS tokens EOS then padding, with
    'text_mask' True on the real positions; 'caption_in' = BOS tokens and
    'caption_out' = tokens EOS (padded), 'caption_mask' on the real targets.
    Lengths are uniform between half and all of each maximum. With `findings`,
    'findings_id': one of batch_size / 2 ids per example (some pairs positives); with
    `task_weights` ({LocCa task index: weight}), 'locca_task' drawn with them.
    """
    if vocab_size <= EOS_ID + 1:
        raise ValueError(
            f"--vocab_size must be above {EOS_ID + 1} (ids 0-3 are special), got {vocab_size}"
        )
    video = rng.uniform(-1.0, 1.0, (batch_size, *video_shape)).astype(np.float32)
    text_ids = np.full((batch_size, text_len), PAD_ID, np.int32)
    caption_in = np.full((batch_size, caption_len), PAD_ID, np.int32)
    caption_out = np.full((batch_size, caption_len), PAD_ID, np.int32)
    text_lengths = rng.integers(text_len // 2, text_len + 1, batch_size)  # BOS and EOS included
    caption_lengths = rng.integers(caption_len // 2, caption_len + 1, batch_size)  # EOS included
    for i in range(batch_size):
        tokens = rng.integers(EOS_ID + 1, vocab_size, text_lengths[i] - 2)
        text_ids[i, : text_lengths[i]] = [BOS_ID, *tokens, EOS_ID]
        tokens = rng.integers(EOS_ID + 1, vocab_size, caption_lengths[i] - 1)
        caption_in[i, : caption_lengths[i]] = [BOS_ID, *tokens]
        caption_out[i, : caption_lengths[i]] = [*tokens, EOS_ID]
    positions = np.arange(max(text_len, caption_len))
    extra = {}
    if findings:
        extra["findings_id"] = rng.integers(0, max(1, batch_size // 2), batch_size).astype(
            np.int32
        )
    if task_weights:
        tasks, weights = zip(*sorted(task_weights.items()), strict=True)
        p = np.asarray(weights, np.float64) / sum(weights)
        extra["locca_task"] = rng.choice(np.asarray(tasks, np.int32), batch_size, p=p)
    return {
        **extra,
        "video": video,
        "text_ids": text_ids,
        "text_mask": positions[None, :text_len] < text_lengths[:, None],
        "caption_in": caption_in,
        "caption_out": caption_out,
        "caption_mask": positions[None, :caption_len] < caption_lengths[:, None],
    }


def measure_matmul_peak(size: int, dtype: str) -> float:
    """FLOP/s of one device on a jitted [size, size] @ [size, size] matmul in `dtype`."""
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (size, size), dtype)
    b = jax.random.normal(key_b, (size, size), dtype)
    matmul = jax.jit(lambda x, y: x @ y).lower(a, b).compile()
    matmul(a, b).block_until_ready()
    best = math.inf
    for _ in range(MATMUL_ROUNDS):
        start = time.perf_counter()
        for _ in range(MATMUL_CALLS):
            out = matmul(a, b)
        out.block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 * MATMUL_CALLS / best


def largest_fitting(
    fits: Callable[[int], bool], start: int, multiple: int, max_batch: int
) -> int:
    """The largest multiple of `multiple` up to `max_batch` for which `fits` holds (0 when
    not even `multiple` fits), assuming that a batch fits when a larger one does.

    Doubles from `start` (rounded up to a multiple) until a batch does not fit, then
    bisects between the last that fit and the first that did not. Each batch is asked
    about at most once.
    """
    if multiple < 1 or start < 1 or max_batch < multiple:
        raise ValueError(
            f"largest_fitting: need multiple >= 1, start >= 1 and max_batch >= multiple; got "
            f"{multiple}, {start}, {max_batch}"
        )
    answers: dict[int, bool] = {}

    def ask(batch: int) -> bool:
        if batch not in answers:
            answers[batch] = fits(batch)
        return answers[batch]

    top = max_batch // multiple  # batches are counted in multiples from here on
    n = min(max(1, math.ceil(start / multiple)), top)
    if not ask(n * multiple):
        low, high = 0, n  # low fits (0 trivially), high does not
    else:
        while n < top and ask(min(2 * n, top) * multiple):
            n = min(2 * n, top)
        if n == top:
            return top * multiple
        low, high = n, min(2 * n, top)
    while high - low > 1:
        middle = (low + high) // 2
        if ask(middle * multiple):
            low = middle
        else:
            high = middle
    return low * multiple


def abstract_batch(
    example: Mapping[str, np.ndarray], batch_size: int
) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes and dtypes of a `random_batch` like `example` with `batch_size` rows,
    nothing allocated."""
    return {
        k: jax.ShapeDtypeStruct((batch_size, *v.shape[1:]), v.dtype) for k, v in example.items()
    }


def task_weights(config: ml_collections.ConfigDict) -> dict[int, float]:
    """{LocCa task index: weight} when the recipe draws location tasks (the pipeline then
    adds 'locca_task' to each batch), else {}."""
    tasks = run_lib.location_tasks(config)
    if set(tasks) == {"cap"}:
        return {}
    return {locations.TASKS.index(task): weight for task, weight in tasks.items()}


def jitted_step(
    config: ml_collections.ConfigDict,
    model: multitask.MultitaskModel,
    tx: optax.GradientTransformation,
    schedules: Mapping[str, Callable],
    mesh: Mesh,
    shardings: run_lib.TrainState,
):
    """The trainer's train step, jitted with its shardings and donation."""
    return jax.jit(
        run_lib.make_train_step(model, tx, config, mesh, schedules),
        in_shardings=(shardings, sharding.batch_sharding(mesh)),
        out_shardings=(shardings, NamedSharding(mesh, P())),
        donate_argnums=(0,),
    )


def find_batch(
    name: str,
    config: ml_collections.ConfigDict,
    model: multitask.MultitaskModel,
    tx: optax.GradientTransformation,
    schedules: Mapping[str, Callable],
    abstract_state: run_lib.TrainState,
    example: Mapping[str, np.ndarray],
    *,
    mesh: Mesh,
    shardings: run_lib.TrainState,
    start: int,
    multiple: int,
    max_batch: int,
    memory_bytes: int | None,
) -> int:
    """`largest_fitting` for the train step of `config` on batches like `example` (a
    `random_batch`), by compiling it; emits each try's memory and the answer."""
    devices = jax.local_devices()
    scope, available = memory_lib.available_bytes(devices)
    if memory_bytes is not None:
        available = memory_bytes
    if available is None:
        raise ValueError(
            f"--find_batch: {devices[0].platform} gives no memory limit; give --memory_gb"
        )
    step = jitted_step(config, model, tx, schedules, mesh, shardings)

    def fits(batch_size: int) -> bool:
        batch = abstract_batch(example, batch_size)
        start_time = time.perf_counter()
        compiled = step.lower(abstract_state, batch).compile()
        sizes = memory_lib.step_bytes(compiled)
        if sizes is None:
            raise ValueError(f"--find_batch: XLA gives no memory analysis on {devices[0].platform}")
        needed = sizes["peak_bytes"] * (len(devices) if scope == "host" else 1)
        emit(f"find_batch_memory_gb/{name}/{batch_size}", needed / 1e9, f"GB {scope}")
        emit(f"find_batch_compile_s/{name}/{batch_size}", time.perf_counter() - start_time, "s")
        return needed <= available

    emit(f"find_batch_available_gb/{name}", available / 1e9, f"GB {scope}")
    largest = largest_fitting(fits, start, multiple, max_batch)
    emit(f"largest_batch/{name}", largest, "videos per step")
    return largest


def benchmark_variant(
    name: str,
    config: ml_collections.ConfigDict,
    model: multitask.MultitaskModel,
    tx: optax.GradientTransformation,
    schedules: Mapping[str, Callable],
    state: run_lib.TrainState,
    batches: list[dict[str, jax.Array]],
    *,
    mesh: Mesh,
    shardings: run_lib.TrainState,
    steps: int,
    peak: float,
    nominal_peak: float | None,
) -> None:
    """Compiles and times the train step of `config` from `state`; emits its measurements.

    `shardings` is the state's NamedSharding tree (``run.state_shardings``);
    `state` is donated to the first step.
    """
    batch_size = config.input.batch_size
    num_devices = mesh.size
    train_step = jitted_step(config, model, tx, schedules, mesh, shardings)
    start = time.perf_counter()
    compiled = train_step.lower(state, batches[0]).compile()
    emit(f"train_step_compile_s/{name}", time.perf_counter() - start, "s")

    video_shape = batches[0]["video"].shape[1:]
    flops = multitask.training_flops_per_example(
        model,
        video_shape,
        config.input.text_max_len,
        config.input.caption_max_len,
        mvm=run_lib.uses_mvm(config),
    )["training"]
    emit(f"train_step_flops_per_example/{name}", float(flops), "FLOP")
    xla_flops = (compiled.cost_analysis() or {}).get("flops")
    if xla_flops is not None:
        # cost_analysis() describes the per-device program of the partitioned step.
        per_example = xla_flops * num_devices / batch_size
        emit(f"train_step_xla_flops_per_example/{name}", per_example, "FLOP")
        emit(f"train_step_xla_to_analytic_flops/{name}", per_example / flops, "ratio")
    sizes = memory_lib.step_bytes(compiled)
    if sizes is not None:
        emit(f"train_step_memory_gb/{name}", sizes["peak_bytes"] / 1e9, "GB per device")

    for i in range(WARMUP_STEPS):
        state, metrics = compiled(state, batches[i % len(batches)])
    jax.block_until_ready(state)
    start = time.perf_counter()
    for i in range(steps):
        state, metrics = compiled(state, batches[i % len(batches)])
    jax.block_until_ready((state, metrics))
    step_time = (time.perf_counter() - start) / steps
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    run_lib.check_finite(values, int(jax.device_get(state.step)))

    videos_per_s = batch_size / step_time
    emit(f"train_step_time_s/{name}", step_time, "s")
    emit(f"train_step_videos_per_s/{name}", videos_per_s, "videos/s")
    emit(f"train_step_mfu/{name}", flops * videos_per_s / (peak * num_devices), "fraction")
    if nominal_peak is not None:
        mfu = flops * videos_per_s / (nominal_peak * num_devices)
        emit(f"train_step_mfu_nominal/{name}", mfu, "fraction")


def run(args: argparse.Namespace) -> None:
    device = jax.devices()[0]
    defaults = CPU_DEFAULTS if device.platform == "cpu" else ACCELERATOR_DEFAULTS
    options: dict[str, Any] = {
        k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()
    }
    for flag in ("batch_size", "num_frames", "image_size", "steps", "matmul_size"):
        if options[flag] < 1:
            raise ValueError(f"--{flag} must be at least 1, got {options[flag]}")
    variants = [args.only] if args.only else list(VARIANTS)
    print(
        f"# jax {jax.__version__}, {jax.device_count()} x {device.device_kind}; {options}, "
        f"contrastive_tokens={args.contrastive_tokens}, stem={args.stem}, "
        f"attention_impl={args.attention_impl}, remat={args.remat}, "
        f"vocab_size={args.vocab_size}",
        file=sys.stderr,
        flush=True,
    )
    emit("device_count", jax.device_count(), "devices")

    configs = {
        name: benchmark_config(
            options["size"],
            options["batch_size"],
            options["num_frames"],
            options["image_size"],
            options["dtype"],
            args.contrastive_tokens,
            mvm=name == "mvm",
            stem=args.stem,
            attention_impl=args.attention_impl,
            remat=args.remat,
        )
        for name in variants
    }
    # The variants differ only in the MVM loss weight: one model, optimizer and initial state.
    config = configs[variants[0]]
    mesh = sharding.make_mesh(tuple(tuple(axis) for axis in config.mesh))
    if options["batch_size"] % mesh.size:
        raise ValueError(
            f"--batch_size={options['batch_size']} must divide by the device count ({mesh.size})"
        )
    model = run_lib.build_model(config, args.vocab_size, PAD_ID)
    rng = np.random.default_rng(0)
    video_shape = (options["num_frames"], options["image_size"], options["image_size"], 1)
    host_batches = [
        random_batch(
            rng,
            options["batch_size"],
            video_shape,
            config.input.text_max_len,
            config.input.caption_max_len,
            args.vocab_size,
            task_weights(config),
            findings=run_lib.positive_ids_key(config) == "findings_id",
        )
        for _ in range(2)
    ]
    # Parameter shapes do not depend on the batch size: initialise on one example.
    example = {k: v[:1] for k, v in host_batches[0].items()}
    params_shape = jax.eval_shape(
        lambda r: model.init(
            {"params": r, "dropout": r, "mask": r, "parallel": r}, example, train=False, mvm=True
        )["params"],
        jax.random.key(0),
    )
    total_steps = WARMUP_STEPS + options["steps"]
    tx, schedules = run_lib.make_optimizer(config, params_shape, total_steps, 0)
    with_teacher = run_lib.uses_teacher(config)
    init_fn = run_lib.create_train_state(model, tx, example, with_teacher=with_teacher)
    abstract_state = jax.eval_shape(init_fn, jax.random.PRNGKey(config.seed))
    shardings = run_lib.state_shardings(abstract_state, config, mesh)
    if args.find_batch:
        multiple = args.batch_multiple or mesh.size * (1 if device.platform == "cpu" else 8)
        if multiple % mesh.size:
            raise ValueError(
                f"--batch_multiple={multiple} must divide by the device count ({mesh.size})"
            )
        memory_bytes = None if args.memory_gb is None else int(args.memory_gb * 1e9)
        for name in variants:
            find_batch(
                name,
                configs[name],
                model,
                tx,
                schedules,
                abstract_state,
                example,
                mesh=mesh,
                shardings=shardings,
                start=options["batch_size"],
                multiple=multiple,
                max_batch=args.max_batch,
                memory_bytes=memory_bytes,
            )
        return

    peak = measure_matmul_peak(options["matmul_size"], options["dtype"])
    emit("matmul_peak_flops", peak, "FLOP/s per device")
    nominal_peak = run_lib.peak_flops(device)
    if nominal_peak is not None:
        emit("nominal_peak_flops", nominal_peak, "FLOP/s per device")
    batches = [jax.device_put(b, sharding.batch_sharding(mesh)) for b in host_batches]

    init_state = jax.jit(init_fn, out_shardings=shardings)
    for name in variants:  # each from the same fresh state
        benchmark_variant(
            name,
            configs[name],
            model,
            tx,
            schedules,
            init_state(jax.random.PRNGKey(config.seed)),
            batches,
            mesh=mesh,
            shardings=shardings,
            steps=options["steps"],
            peak=peak,
            nominal_peak=nominal_peak,
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.train_step",
        description="Videos/s, compile time and MFU of the trainer's train step.",
        epilog="Flags left out take the CPU defaults "
        f"{CPU_DEFAULTS} or, on a GPU/TPU, {ACCELERATOR_DEFAULTS}.",
    )
    parser.add_argument("--size", choices=multitask_config.SIZES, help="model size")
    parser.add_argument("--batch_size", type=int, help="global batch (divisible by devices)")
    parser.add_argument("--num_frames", type=int, help="frames per video")
    parser.add_argument("--image_size", type=int, help="frame side in pixels")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype")
    parser.add_argument("--steps", type=int, help="timed steps per variant")
    parser.add_argument("--matmul_size", type=int, help="side of the peak-measuring matmul")
    parser.add_argument(
        "--contrastive_tokens",
        choices=multitask.CONTRASTIVE_TOKENS,
        default="full",
        help="what the contrastive and caption heads see with MVM (model.contrastive_tokens)",
    )
    parser.add_argument(
        "--stem",
        choices=("linear", "conv"),
        default="linear",
        help="the encoder's tubelet embedding (model.encoder_overrides.stem)",
    )
    parser.add_argument(
        "--attention_impl",
        choices=ATTENTION_IMPLEMENTATIONS,
        default="auto",
        help="the attention kernel (model.attention_impl; 'auto': cuDNN on GPUs in bf16)",
    )
    parser.add_argument(
        "--remat",
        choices=tuple(vivit.REMAT_POLICIES),
        default="none",
        help="what each encoder block keeps for the backward pass "
        "(model.encoder_overrides.remat)",
    )
    parser.add_argument(
        "--vocab_size", type=int, default=1000, help="caption tokenizer vocabulary size"
    )
    parser.add_argument(
        "--find_batch",
        action="store_true",
        help="report the largest batch whose compiled step fits in memory (times nothing)",
    )
    parser.add_argument(
        "--batch_multiple",
        type=int,
        help="--find_batch: batches tried are multiples of this (default: the device count, "
        "x8 on GPU/TPU)",
    )
    parser.add_argument(
        "--max_batch", type=int, default=4096, help="--find_batch: the largest batch tried"
    )
    parser.add_argument(
        "--memory_gb",
        type=float,
        help="--find_batch: the memory to fit in, GB per device (default: the allocator's "
        "limit, or the host's available memory on CPU)",
    )
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--mvm", dest="only", action="store_const", const="mvm", help="only with MVM")
    only.add_argument(
        "--nomvm", dest="only", action="store_const", const="nomvm", help="only without MVM"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
