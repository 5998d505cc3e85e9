"""Command line: a trained run's encoders as Hugging Face folders, for PyTorch users.

Usage:
  python -m deepcoro_jax.tools.export_hf --workdir DIR --out FOLDER [--checkpoint STEP]

Writes ``FOLDER/video_encoder``: the video encoder as a ``transformers``
VideoMAE or ViViT folder (config.json, model.safetensors,
preprocessor_config.json and a README.md with the input the encoder expects),
which ``VideoMAEModel.from_pretrained`` / ``VivitModel.from_pretrained`` load
with the same token outputs as the run's encoder; and ``FOLDER/text_encoder``:
the report tower as a ``BertModel`` folder, with the run's text tokenizer's
files when it is a WordPiece vocabulary. The encoder must be one of the two
families (``hf_video.family_of``): a run started from ``video_init``, or
trained with ``encoder_overrides`` posemb='sincos' (VideoMAE) or
posemb='learned' and cls_token=True (ViViT); otherwise the error names what
differs. Our pooling head (MAP) and contrastive projections have no place in
those classes and are not written. Not for: embeddings of a dataset
(``export.py``).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from deepcoro_jax import console, paths
from deepcoro_jax.models import hf_video
from deepcoro_jax.models import text as text_lib
from deepcoro_jax.tools import inference

CHANNELS = 1  # the input pipeline's clips are grayscale


def value_range(pp: str) -> tuple[float, float]:
    """The (low, high) of a pp's ``value_range(low, high)`` op, which maps uint8 0..255
    linearly onto it; an error when the pp has none."""
    match = re.search(r"value_range\(\s*([-+.\deE]+)\s*,\s*([-+.\deE]+)\s*\)", pp)
    if not match:
        raise ValueError(f"the run's eval pp has no value_range(low, high): {pp!r}")
    return float(match[1]), float(match[2])


def preprocessing(family: str, size: int, low: float, high: float) -> dict:
    """The Hugging Face image processor config that turns uint8 frames into the values
    the encoder was trained on: x * (high - low) / 255 + low."""
    resize_and_crop = {
        "do_resize": True,
        "size": {"shortest_edge": size},
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "resample": 2,
        "do_rescale": True,
        "do_normalize": True,
    }
    if family == "videomae":  # x / 255, then (x - mean) / std
        std = 1.0 / (high - low)
        return {
            "image_processor_type": "VideoMAEImageProcessor",
            **resize_and_crop,
            "rescale_factor": 1 / 255,
            "image_mean": [-low * std] * CHANNELS,
            "image_std": [std] * CHANNELS,
        }
    return {  # ViViT: x * rescale_factor (no offset), then (x - mean) / std
        "image_processor_type": "VivitImageProcessor",
        **resize_and_crop,
        "rescale_factor": (high - low) / 255,
        "offset": False,
        "image_mean": [-low] * CHANNELS,
        "image_std": [1.0] * CHANNELS,
    }


README = """# {family} video encoder from DeepCORO-JAX

Trained in run `{workdir}` (checkpoint {step}). Load it with

```python
from transformers import {cls}
model = {cls}.from_pretrained("{folder}")
out = model(pixel_values)  # [B, {frames}, {channels}, {size}, {size}] float32
```

Input: {frames} grayscale frames ({channels} channel) of {size}x{size} pixels, each
uint8 value x mapped to x * {scale:.6g} + {low:g} (values in [{low:g}, {high:g}]);
the clip the run evaluated on is `{pp}`.
`last_hidden_state` equals the run's encoder tokens{cls_note}.
"""


def export(run: inference.Run, out: str) -> dict[str, Path]:
    """Writes the folders of the module docstring; returns them by name."""
    encoder = run.model.encoder
    family = hf_video.family_of(encoder)
    size = run.config.model.image_size
    if not isinstance(size, int):
        height, width = size
        if height != width:
            raise ValueError(f"the run's image_size {tuple(size)} is not square")
        size = height
    pp = inference.eval_video_pp(run.config)
    low, high = value_range(pp)
    video_folder = Path(out) / "video_encoder"
    cls = "VideoMAEModel" if family == "videomae" else "VivitModel"
    readme = README.format(
        family="VideoMAE" if family == "videomae" else "ViViT",
        workdir=run.workdir,
        step=run.step,
        cls=cls,
        folder=video_folder,
        frames=encoder.num_frames,
        channels=CHANNELS,
        size=size,
        scale=(high - low) / 255,
        low=low,
        high=high,
        pp=pp,
        cls_note=" ([CLS] first)" if family == "vivit" else "",
    )
    hf_video.export(
        encoder,
        run.params["encoder"],
        video_folder,
        channels=CHANNELS,
        preprocessing=preprocessing(family, size, low, high),
        readme=readme,
    )
    text_folder = Path(out) / "text_encoder"
    text_folder.mkdir(parents=True, exist_ok=True)
    bert = run.model.text.config
    (text_folder / "config.json").write_text(json.dumps(text_lib.hf_config(bert), indent=2))
    from safetensors.numpy import save_file

    save_file(
        text_lib.hf_weights(run.params["text"]),
        str(text_folder / "model.safetensors"),
        {"format": "pt"},
    )
    kind, _, tokenizer_path = run.text_tokenizer_spec.partition(":")
    if kind == "wordpiece":
        for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
                     "tokenizer.json"):
            if (Path(tokenizer_path) / name).exists():
                shutil.copy(Path(tokenizer_path) / name, text_folder / name)
    else:
        shutil.copy(tokenizer_path, text_folder / Path(tokenizer_path).name)
    return {"video_encoder": video_folder, "text_encoder": text_folder}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deepcoro_jax.tools.export_hf",
        description="A trained run's video and text encoders as Hugging Face folders.",
    )
    inference.add_run_arguments(parser)
    parser.add_argument("--out", required=True, help="the folder to write them into")
    args = parser.parse_args(argv)
    args.workdir, args.out = paths.resolve(args.workdir), paths.resolve(args.out)
    inference.start_tool(args, command_line=argv is None)
    try:
        run = inference.load_run(args.workdir, args.checkpoint)
        written = export(run, args.out)
    except (OSError, ValueError) as e:
        print(f"{parser.prog}: error: {e}", file=console.terminal())
        return 2
    for name, folder in written.items():
        print(f"{name}: {folder}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
