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


def _without_local_constants() -> None:
    """Make hypothesis' draws independent of which modules the process has imported.

    Hypothesis (6.131 and later) draws 5% of its integers, floats and strings from the constants in
    the source of every local module in sys.modules (here unroll's, found again whenever
    sys.modules grows). A derandomized run then drew other graphs after a test that imported more
    of unroll (test_native's bench models: `pytest tests/test_native.py tests/test_properties.py`
    drew SQRT in no graph of test_strategies_cover_every_op, which passes alone). No setting turns
    this off, so the pool is replaced by an empty one, and the cache of allowed constants cleared."""
    try:
        from hypothesis.internal.conjecture import providers
    except ImportError:  # pragma: no cover - hypothesis' internals moved: nothing to turn off
        return
    if not hasattr(providers, "_get_local_constants"):  # pragma: no cover - before 6.131
        return
    empty = providers.Constants()
    providers._get_local_constants = lambda: empty
    providers.CONSTANTS_CACHE.cache.clear()


_without_local_constants()


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
