"""The numerics tests once more with XLA's default optimisations, the path users run.

The rest of the suite compiles at backend optimisation level 0 with most HLO passes off
(tests/conftest.py), which is fast but not what a user's run executes. Here a child pytest
session with `MEDVLP_TEST_XLA_DEFAULT=1` reruns the import parity tests, exact resume and
the one-vs-eight-devices loss equality with the default optimisations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# All of tests/test_train.py::test_same_losses_on_one_and_eight_devices compiles 5 meshes
# (about 105-155 s at the default optimisations on 2 cores); the two hardest meshes against
# one device cost 40% of that.
SAME_LOSSES = "tests/test_train.py::test_same_losses_on_one_and_eight_devices"
NODES = (
    "tests/test_models_parity.py",
    "tests/test_train.py::test_resume_is_exact",
    f"{SAME_LOSSES}[data2_fsdp2_tensor2]",
    f"{SAME_LOSSES}[memory_light]",
)


def _default_env() -> dict:
    env = dict(os.environ)
    env["MEDVLP_TEST_XLA_DEFAULT"] = "1"
    # Optimised programs in a cache folder of their own (the key also covers the flags).
    env["JAX_COMPILATION_CACHE_DIR"] = str(ROOT / ".cache" / "jax-xla-default")
    return env


def test_conftest_honours_xla_default():
    """With the variable set, conftest drops both optimisation switches (also when inherited
    from this level-0 session) and keeps the 8 simulated devices."""
    probe = "\n".join(
        [
            "import json, os, sys",
            "sys.path.insert(0, 'tests')",
            "import conftest",
            "import jax",
            "from medvlp_jax.models import testing",
            "with testing.fast_compile():",
            "    inside = jax.config.read('jax_disable_most_optimizations')",
            "print(json.dumps([os.environ['XLA_FLAGS'],",
            "    os.environ.get('JAX_DISABLE_MOST_OPTIMIZATIONS'), inside]))",
        ]
    )
    assert "--xla_backend_optimization_level=0" in os.environ["XLA_FLAGS"]  # this session
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env=_default_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    xla_flags, disable_most, fast_compile_off = json.loads(out.stdout.strip().splitlines()[-1])
    assert "xla_backend_optimization_level" not in xla_flags
    assert "--xla_force_host_platform_device_count=8" in xla_flags.split()
    assert disable_most is None
    assert fast_compile_off is False  # fast_compile() leaves XLA's optimisations on


def test_numerics_with_default_xla_optimisations():
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:xdist",
            "-p",
            "no:cacheprovider",
            *NODES,
        ],
        cwd=ROOT,
        env=_default_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "skipped" not in done.stdout.splitlines()[-1], done.stdout[-2000:]
