"""Test setup: 8 fake CPU devices (for sharding tests) and quiet TensorFlow.

The flags must be set before JAX or TensorFlow is imported anywhere, which is
why they live here and not in the tests.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402  (after the environment above)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> str:
    """A tiny prepared synthetic set (8 studies; tests/evaltools.py), made once per session."""
    from evaltools import prepared_synthetic

    return prepared_synthetic(tmp_path_factory.mktemp("synthetic_cache"))
