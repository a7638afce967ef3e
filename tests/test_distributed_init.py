"""`distributed.initialize` fails fast and clearly when the coordinator does not answer.

Each case runs in a fresh interpreter: jax.distributed can only be set up once per process and
must precede any JAX computation.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

from medvlp_jax.parallel import distributed

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import os, sys, time
from medvlp_jax.parallel import distributed
cfg = distributed.default_distributed_config()
cfg.coordinator_address = sys.argv[1]
cfg.num_processes = 2
cfg.process_id = int(sys.argv[2])
cfg.initialization_timeout_s = float(sys.argv[3])
start = time.monotonic()
try:
    distributed.initialize(cfg)
except distributed.DistributedInitError as e:
    print(f"ELAPSED {time.monotonic() - start:.2f}")
    print(f"ERROR {e}", flush=True)
    os._exit(7)  # skip JAX's teardown of the half-started service
print("UNEXPECTED: initialized", flush=True)
"""


# The 1 s timeout is honoured when the child gives up well before the default (120 s); the
# slack covers JAX's start-up on a loaded machine (7 s measured with 4 jobs on 2 cores).
SLACK_S = 30.0


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env() -> dict[str, str]:
    """os.environ without the MEDVLP_* variables that would override the test's settings."""
    names = (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID)
    return {k: v for k, v in os.environ.items() if k not in names}


def _run(process_id: int, timeout_s: float) -> tuple[str, float, str]:
    address = f"127.0.0.1:{_unused_port()}"
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, address, str(process_id), str(timeout_s)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**_clean_env(), "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 7, proc.stdout + proc.stderr
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    return address, float(lines["ELAPSED"]), lines["ERROR"]


def test_unreachable_coordinator_times_out_naming_the_address():
    address, elapsed, error = _run(process_id=1, timeout_s=1.0)
    assert 1.0 <= elapsed < SLACK_S
    assert f"could not reach coordinator {address} within 1 s (process 1 of 2)" in error


def test_coordinator_waits_for_missing_processes_then_fails():
    address, elapsed, error = _run(process_id=0, timeout_s=1.0)
    assert 1.0 <= elapsed < SLACK_S
    assert f"not all processes joined coordinator {address} within 1 s (process 0 of 2)" in error
