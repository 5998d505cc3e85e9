"""Test setup: 8 fake CPU devices (for sharding tests), fast compilation, one
compilation cache for the whole run (tests/testenv.py), quiet TensorFlow; and what
the test run makes once and shares: the tiny synthetic set and a trained micro run.

The environment must be set before JAX or TensorFlow is imported anywhere, which
is why it is set here and not in the tests. The pytest workers (``-n 2``, as
``make test`` runs them) inherit it from the process that started them.
"""

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

import testenv

if testenv.CACHE_ENV not in os.environ:  # the first process of the run: it owns the cache
    os.environ[testenv.CACHE_ENV] = tempfile.mkdtemp(prefix="deepcoro-test-xla-")
    _OWNED_CACHE = os.environ[testenv.CACHE_ENV]
else:
    _OWNED_CACHE = None
os.environ.setdefault("XLA_FLAGS", testenv.xla_flags(8))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", testenv.cache_dir())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", testenv.WORKER_CACHE_MIN_SECS)

import pytest  # noqa: E402

# How `make test` spreads the modules over its two workers (--dist loadscope
# --no-loadscope-reorder): each module is one unit; the two longest start first, one
# on each worker, and each worker's next unit is one of the two that read the shared
# micro run, so the second of them finds it trained instead of waiting for the other
# worker to train it. The rest follow as workers free up.
FIRST = (
    "test_train.py",
    "test_first_hour.py",
    "test_eval_wiring.py",
    "test_inference.py",
    "test_config.py",
    "test_multitask.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return FIRST.index(name) if name in FIRST else len(FIRST)

    items.sort(key=rank)  # stable: file order within each rank


def pytest_unconfigure(config):
    if _OWNED_CACHE:
        shutil.rmtree(_OWNED_CACHE, ignore_errors=True)


def shared_folder(tmp_path_factory) -> Path:
    """A folder of this test run that every pytest worker sees (each worker's own
    temporary folders are under it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def first_one_makes(path: Path):
    """Holds an exclusive lock for `path`: the first worker to ask makes what is there,
    the others wait and then find it made."""
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session")
def synthetic_cache(tmp_path_factory) -> Path:
    """The synthetic cache folder holding the tiny prepared set (tests/evaltools.py),
    generated once per test run; launch.py runs take it as
    ``--config.input.synthetic.cache_dir``."""
    from evaltools import prepared_synthetic

    folder = shared_folder(tmp_path_factory) / "synthetic_cache"
    with first_one_makes(folder):
        prepared_synthetic(folder)
    return folder


@pytest.fixture(scope="session")
def synthetic_data(synthetic_cache) -> str:
    """The tiny prepared synthetic set (8 studies): its prepared folder."""
    from evaltools import prepared_synthetic

    return prepared_synthetic(synthetic_cache)


@pytest.fixture(scope="session")
def micro_run(synthetic_data, tmp_path_factory):
    """One trained micro run for the whole test run (evaltools.micro_run_config: 2 steps
    on 8 devices, retrieval on the train split at step 0 and at the end): (its workdir,
    what train.main returned). Tests read it; one that writes there works on a copy."""
    from evaltools import micro_run_config

    from deepcoro_jax.training import train

    workdir = shared_folder(tmp_path_factory) / "micro_run"
    returned_file = workdir.with_suffix(".returned.json")
    with first_one_makes(workdir):
        if not returned_file.exists():
            returned = train.main(micro_run_config(synthetic_data), str(workdir))
            returned_file.write_text(json.dumps(returned))
    return workdir, json.loads(returned_file.read_text())
