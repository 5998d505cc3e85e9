"""Paths as users type them, resolved once where they enter; URLs left as they are.

Every path a user gives (a flag, a config field, a config argument) goes
through `resolve` at the entry point (`launch.py`, `training/train.main`, the tools'
``main``), so nothing below it sees a relative path or a ``~``: a run started
from another folder, a subprocess or a background thread (orbax's) reads the
same files. A URL such as ``gs://bucket/run`` is kept as it is, and the files
under it are read and written through `etils.epath` (`Path`), which serves
local folders and cloud storage alike.

Not here: what the files hold (each module that writes one says).
"""

from __future__ import annotations

import os
import re

import ml_collections
from etils import epath

# The path fields of a run's config, resolved by `resolve_config`.
CONFIG_PATHS = (
    "input.data_dir", "input.synthetic.cache_dir", "init.workdir", "text_init", "video_init"
)
TOKENIZER_FIELDS = ("input.text_tokenizer", "input.caption_tokenizer")
TOKENIZER_KINDS = ("sp", "wordpiece")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path: str) -> bool:
    """Whether `path` names a location by URL (``gs://...``, ``s3://...``), not a local path."""
    return bool(_URL.match(os.fspath(path)))


def resolve(path: str | os.PathLike) -> str:
    """`path` absolute with ``~`` expanded; a URL, and '' (unset), as they are."""
    path = os.fspath(path)
    if not path or is_url(path):
        return path
    return os.path.abspath(os.path.expanduser(path))


def Path(path: str | os.PathLike) -> epath.Path:  # noqa: N802  (a constructor, like epath.Path)
    """An `epath.Path` of the resolved `path`: local folders and URLs behind one API."""
    return epath.Path(resolve(path))


def resolve_tokenizer_spec(spec: str) -> str:
    """A tokenizer spec (``sp:FILE``, ``wordpiece:DIR``) with its path resolved.

    Specs without a path ('dataset') are returned as they are.
    """
    kind, sep, path = spec.partition(":")
    if sep and kind in TOKENIZER_KINDS:
        return f"{kind}:{resolve(path)}"
    return spec


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with every path field (`CONFIG_PATHS`, tokenizer specs) resolved, in place."""
    for dotted in CONFIG_PATHS + TOKENIZER_FIELDS:
        *parents, name = dotted.split(".")
        section = config
        for parent in parents:
            section = section.get(parent) if section is not None else None
        if section is None or not isinstance(section.get(name), str):
            continue
        value = section[name]
        section[name] = (
            resolve_tokenizer_spec(value) if dotted in TOKENIZER_FIELDS else resolve(value)
        )
    return config


# --------------------------------------------------------------- compiled programs

# Where launch.py and the tools keep compiled XLA programs, unless told otherwise.
COMPILATION_CACHE = "~/.cache/deepcoro_jax/xla"
CACHE_DIR_ENV = "JAX_COMPILATION_CACHE_DIR"


def use_compilation_cache(directory: str | None = None) -> str:
    """Turns on JAX's persistent compilation cache in `directory`; None: the folder
    that $JAX_COMPILATION_CACHE_DIR names, else COMPILATION_CACHE. A restarted run, a
    second `infer` or `export`, load their programs instead of compiling them again.
    Returns the folder (resolved)."""
    import jax

    if directory is None:
        directory = os.environ.get(CACHE_DIR_ENV) or COMPILATION_CACHE
    directory = resolve(directory)
    jax.config.update("jax_compilation_cache_dir", directory)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        # Programs that compile in under a second are not worth a file.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return directory
