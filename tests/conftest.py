"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere, and a persistent
compilation cache so identical train steps compile once per session (and across sessions).

By default tests compile with XLA's optimisations mostly off (below). `MEDVLP_TEST_XLA_DEFAULT=1`
keeps XLA's default optimisations instead, the path users run: tests/test_optimised_path.py
reruns a few numerics tests that way.
"""

import os

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
_LEVEL_0 = "--xla_backend_optimization_level=0"
XLA_DEFAULT = os.environ.get("MEDVLP_TEST_XLA_DEFAULT", "") == "1"

_flags = os.environ.get("XLA_FLAGS", "").split()
if XLA_DEFAULT:
    # Inherited from a level-0 parent session: drop its optimisation switches.
    _flags = [f for f in _flags if not f.startswith("--xla_backend_optimization_level")]
    os.environ.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)
else:
    # Backend optimisation level 0: tests run tiny models, whose time is all XLA:CPU
    # compilation (about 3.5x faster at level 0, measured); numerics are unchanged.
    _flags.append(_LEVEL_0)
    # Likewise skip most XLA HLO optimisation passes (halves compile time again, measured).
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
if "--xla_force_host_platform_device_count=8" not in _flags:
    _flags.append("--xla_force_host_platform_device_count=8")
os.environ["XLA_FLAGS"] = " ".join(_flags)
os.environ.setdefault("MEDVLP_JAX_CACHE", os.path.join(_ROOT, ".cache"))
# Inherited by the subprocesses tests start, too. The cache key covers XLA_FLAGS and the
# compile options, so optimised and level-0 programs cannot be confused; tests/
# test_optimised_path.py still gives its session a folder of its own.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_ROOT, ".cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
