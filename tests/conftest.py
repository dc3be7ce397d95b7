"""Shared test setup: hypothesis profiles (no deadline: first calls JIT-compile), single-threaded BLAS.

HYPOTHESIS_PROFILE selects a profile: "unroll" (the default) or "explore", which test_properties.py
reads as "search with random seeds and hypothesis' example database, and shrink failures" (its
runs are otherwise derandomized; see its docstring for the default and slow example counts).
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("unroll", deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("explore", settings.get_profile("unroll"))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "unroll"))


@pytest.fixture(scope="module")
def fresh_cache_dir(tmp_path_factory):
    """UNROLL_CACHE_DIR set to a fresh directory for one test module, restored afterwards."""
    old = os.environ.get("UNROLL_CACHE_DIR")
    os.environ["UNROLL_CACHE_DIR"] = str(tmp_path_factory.mktemp("unroll_cache"))
    yield
    if old is None:
        os.environ.pop("UNROLL_CACHE_DIR", None)
    else:
        os.environ["UNROLL_CACHE_DIR"] = old
