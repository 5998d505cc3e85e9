#!/usr/bin/env bash
# Train-step throughput and MFU of the 'base' recipe on one GPU, in under 8 minutes.
#
# Runs benchmarks/train_step.py once (one Python process, each step function
# compiled once): ViViT-B, 16 x 224 x 224 videos, bf16, global batch 16 (32
# does not fit one H200 with MVM), with and without MVM, plus the measured bf16
# matmul peak (8192^3), then prints a table. Compilation is included and
# reported (ViViT-B's first GPU compile takes minutes); the whole benchmark is
# time-boxed by `timeout`, and whatever was measured before a time-out is still
# tabulated.
#
#   bash benchmarks/gpu.sh                                   # from anywhere
#   SIZE=mu BATCH=4 FRAMES=8 IMAGE=64 DTYPE=float32 MATMUL=1024 STEPS=3 \
#       bash benchmarks/gpu.sh                               # a quick check on CPU
#
# Settings (environment): SIZE (base), BATCH (16), FRAMES (16), IMAGE (224),
# DTYPE (bfloat16), STEPS (10 timed steps per variant), MATMUL (8192), STEM (linear;
# 'conv' for the convolutional tubelet stem), ATTENTION (auto: cuDNN's fused attention
# on a GPU in bf16; 'xla' for XLA's), REMAT (none; dots_no_batch, dots or full),
# TIME_LIMIT (450 s for the benchmark), PYTHON (python3), WHEELS (shared/wheels).
#
# Needs JAX with its GPU plugin, flax, optax and orbax-checkpoint; not
# TensorFlow, clu or a network. The trainer imports ml_collections: where it is
# missing, this script installs it (pure Python; its own needs absl-py and
# PyYAML come with flax/orbax) from a wheel in $WHEELS, into a folder under
# /tmp put on PYTHONPATH. To carry that wheel to an offline machine, before
# copying the repository there:
#
#   pip download ml-collections==1.1.0 --no-deps -d shared/wheels
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
SIZE=${SIZE:-base}
BATCH=${BATCH:-16}
FRAMES=${FRAMES:-16}
IMAGE=${IMAGE:-224}
DTYPE=${DTYPE:-bfloat16}
STEPS=${STEPS:-10}
MATMUL=${MATMUL:-8192}
STEM=${STEM:-linear}
ATTENTION=${ATTENTION:-auto}
REMAT=${REMAT:-none}
TIME_LIMIT=${TIME_LIMIT:-450}
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-shared/wheels}

echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname); repository $(pwd)"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi
else
  echo "nvidia-smi: not found (no NVIDIA driver on this machine)"
fi

if ! "$PYTHON" -c "import ml_collections" 2>/dev/null; then
  shopt -s nullglob
  wheels=("$WHEELS"/ml_collections-*.whl)
  shopt -u nullglob
  if [ "${#wheels[@]}" -eq 0 ]; then
    echo "error: ml_collections is not installed and $WHEELS holds no ml_collections-*.whl;" \
      "run 'pip download ml-collections==1.1.0 --no-deps -d $WHEELS' where pip works" >&2
    exit 1
  fi
  site=$(mktemp -d /tmp/deepcoro_site.XXXXXX)
  PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip install --quiet --no-index --no-deps \
    --target "$site" "${wheels[0]}"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  echo "installed ${wheels[0]} into $site"
fi

"$PYTHON" - <<'EOF'
import importlib.metadata
import sys

print("python", sys.version.split()[0])
for name in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "optax",
             "orbax-checkpoint", "ml-collections", "numpy"):
    try:
        print(f"{name} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
        pass
import jax

print("devices:", jax.devices())
EOF

log=$(mktemp /tmp/deepcoro_train_step.XXXXXX)
trap 'rm -f "$log"' EXIT
status=0
timeout --kill-after=20 "$TIME_LIMIT" "$PYTHON" -u -m benchmarks.train_step \
  --size "$SIZE" --batch_size "$BATCH" --num_frames "$FRAMES" --image_size "$IMAGE" \
  --dtype "$DTYPE" --steps "$STEPS" --matmul_size "$MATMUL" --stem "$STEM" \
  --attention_impl "$ATTENTION" --remat "$REMAT" | tee "$log" || status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
  echo "benchmark stopped after TIME_LIMIT=${TIME_LIMIT}s; the table shows what it measured" >&2
fi

"$PYTHON" - "$log" "$SIZE" "$BATCH" "$FRAMES" "$IMAGE" "$DTYPE" "$STEM" "$ATTENTION" "$REMAT" <<'EOF'
import json
import sys

path, size, batch, frames, image, dtype, stem, attention, remat = sys.argv[1:]
values = {}
with open(path) as f:
    for line in f:
        if line.startswith("{"):
            record = json.loads(line)
            values[record["name"]] = record["value"]

print(f"\n{size}, batch {batch}, {frames}x{image}x{image}, {dtype}, {stem} stem, "
      f"attention {attention}, remat {remat}")
peak = values.get("matmul_peak_flops")
print("measured matmul peak:", f"{peak / 1e12:.3g} TFLOP/s per device" if peak else "-")
columns = [  # (header, metric, scale, format)
    ("compile s", "train_step_compile_s", 1, "{:.0f}"),
    ("step s", "train_step_time_s", 1, "{:.3f}"),
    ("videos/s", "train_step_videos_per_s", 1, "{:.1f}"),
    ("MFU", "train_step_mfu", 100, "{:.1f}%"),
    ("MFU nominal", "train_step_mfu_nominal", 100, "{:.1f}%"),
    ("GFLOP/video", "train_step_flops_per_example", 1e-9, "{:.3g}"),
    ("XLA GFLOP/video", "train_step_xla_flops_per_example", 1e-9, "{:.3g}"),
    ("memory GB", "train_step_memory_gb", 1, "{:.3g}"),
]
rows = [["variant"] + [header for header, *_ in columns]]
for variant in ("mvm", "nomvm"):
    row = [variant]
    for _, metric, scale, fmt in columns:
        value = values.get(f"{metric}/{variant}")
        row.append("-" if value is None else fmt.format(value * scale))
    rows.append(row)
widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
for row in rows:
    print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
EOF
exit "$status"
