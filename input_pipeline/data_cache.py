"""Where the trainer's data comes from: a prepared folder, or the synthetic set.

With ``config.input.data_dir`` set, that prepared dataset is used as is. Left
empty, the trainer uses synthetic studies generated and prepared once into a
cache folder (``config.input.synthetic``), so a fresh checkout trains with no
data of its own; the synthetic path runs through the real `prepare`, lesion
boxes included (``--boxes``).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping
from typing import Any

from input_pipeline import dataset_format, prepare, synthetic

# Label columns carried into the shards: the study's, then what each video shows
# (synthetic.MANIFEST_COLUMNS says what each is).
SYNTHETIC_LABELS = (
    "left_significant",
    "right_significant",
    "left_max_stenosis",
    "right_max_stenosis",
    "system",
    "magnification",
    "landmark",
    "right_dominant",
    "view_cto",
    "view_severe",
    "view_max_stenosis",
)
# Options of config.input.synthetic that may be left out (tests pass bare dicts).
OPTIONAL = dict(magnified_fraction=0.0, magnifications=(2,), report_scope="study")
REPORT_COLUMNS = {"study": "Report", "view": "ViewReport"}


def _options(options: Mapping[str, Any]) -> dict[str, Any]:
    merged = {**OPTIONAL, **options}
    if merged["report_scope"] not in REPORT_COLUMNS:
        raise ValueError(
            f"config.input.synthetic.report_scope={merged['report_scope']!r}: choose one of "
            f"{sorted(REPORT_COLUMNS)} (each video paired with its study's report, or with "
            "what its view shows)"
        )
    return merged


def synthetic_dir(options: Mapping[str, Any]) -> str:
    """The cache folder of one synthetic configuration (its options and the renderer's
    version are in the name, so a changed renderer never reuses an old set)."""
    options = _options(options)
    low, high = options["num_frames"]
    magnified = ""
    if options["magnified_fraction"]:
        zooms = "_".join(str(m) for m in options["magnifications"])
        magnified = f"-m{options['magnified_fraction']:g}x{zooms}"
    name = (
        f"synthetic-r{synthetic.RENDERER_VERSION}-n{options['num_studies']}"
        f"-s{options['size']}-f{low}_{high}{magnified}-{options['report_scope']}"
        f"-seed{options['seed']}"
    )
    return os.path.join(os.path.expanduser(options["cache_dir"]), name)


def ensure_synthetic(
    options: Mapping[str, Any], *, process_index: int = 0, timeout_s: float = 3600
) -> str:
    """The prepared synthetic dataset of `options`, generated and prepared if missing.

    Process 0 builds it; other processes wait until it is complete (prepare
    renames its folder into place only at the end, so "exists" means "done"),
    which needs `options['cache_dir']` on a filesystem all processes share.
    Options: cache_dir, num_studies, size, num_frames, seed (synthetic.generate's),
    and optionally magnified_fraction, magnifications (default: none) and
    report_scope ('study': each video with its study's report, the default; 'view':
    with its own report of what its view shows).
    """
    options = _options(options)
    root = synthetic_dir(options)
    prepared = os.path.join(root, "prepared")
    marker = os.path.join(prepared, dataset_format.META_FILE)
    if os.path.exists(marker):
        return prepared
    if process_index != 0:
        deadline = time.monotonic() + timeout_s
        while not os.path.exists(marker):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"waited {timeout_s:.0f} s for process 0 to prepare {prepared}; the "
                    "synthetic cache_dir must be on a filesystem that every process shares"
                )
            time.sleep(2)
        return prepared
    source = os.path.join(root, "source")
    shutil.rmtree(source, ignore_errors=True)  # a run interrupted while generating
    print(
        f"generating {options['num_studies']} synthetic studies into {source} "
        "(once: later runs reuse them)",
        flush=True,
    )
    workers = max(1, os.cpu_count() or 1)
    manifest = synthetic.generate(
        source,
        options["num_studies"],
        options["seed"],
        size=options["size"],
        num_frames=tuple(options["num_frames"]),
        workers=workers,
        magnified_fraction=options["magnified_fraction"],
        magnifications=tuple(options["magnifications"]),
    )
    report = prepare.prepare(
        str(manifest),
        prepared,
        size=options["size"],
        workers=workers,
        label_columns=SYNTHETIC_LABELS,
        report_column=REPORT_COLUMNS[options["report_scope"]],
        boxes=os.path.join(source, "boxes.jsonl"),
        frame_format="png",  # lossless, as the demo's documented numbers were measured
        overwrite=True,
    )
    if not os.path.exists(marker):
        raise RuntimeError(f"preparing the synthetic set wrote nothing: {report['failed'][:5]}")
    return prepared


def resolve_data_dir(input_config: Mapping[str, Any], *, process_index: int = 0) -> str:
    """``input_config.data_dir`` if set (and prepared), else the synthetic set."""
    data_dir = input_config["data_dir"]
    if data_dir:
        dataset_format.load_meta(data_dir)  # a clear error if it is not a prepared dataset
        return data_dir
    return ensure_synthetic(input_config["synthetic"], process_index=process_index)
