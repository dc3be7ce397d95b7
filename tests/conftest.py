"""Shared test setup: hypothesis profiles (no deadline: first calls JIT-compile), single-threaded BLAS.

HYPOTHESIS_PROFILE selects a profile: "unroll" (the default) or "explore", which test_properties.py
reads as "search with random seeds and hypothesis' example database, and shrink failures" (its
runs are otherwise derandomized; see its docstring for the default and slow example counts).
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("unroll", deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("explore", settings.get_profile("unroll"))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "unroll"))
