"""launch/local.py: N local processes x K CPU devices as one JAX job, and failure handling."""

import importlib.util
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("launch_local", REPO / "launch" / "local.py")
local = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local)


def _launch(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "launch/local.py", "--module=launch.selftest", "--timeout_s=90", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc, time.monotonic() - start


def test_xla_flags_device_count_is_replaced_not_duplicated():
    flags = "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=8"
    assert local.xla_flags_with_device_count(flags, 4) == (
        "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=4"
    )
    assert local.xla_flags_with_device_count("", 2) == "--xla_force_host_platform_device_count=2"


def test_child_command_and_passthrough():
    args, rest = local.parse_args(
        ["-n", "3", "-k", "2", "--", "--config=configs/clip.py", "--workdir=/tmp/w"]
    )
    assert rest == ["--config=configs/clip.py", "--workdir=/tmp/w"]
    cmd = local.child_command(args, rest, 1234, 2)
    assert cmd[1:5] == ["-m", "medvlp_jax.main", "--config=configs/clip.py", "--workdir=/tmp/w"]
    assert cmd[5:] == [
        "--config.distributed.coordinator_address=127.0.0.1:1234",
        "--config.distributed.num_processes=3",
        "--config.distributed.process_id=2",
        "--config.distributed.local_device_count=2",
    ]
    env = local.child_env(args, {"MEDVLP_PROCESS_ID": "7", "XLA_FLAGS": "", "HOME": "/h"})
    assert "MEDVLP_PROCESS_ID" not in env and env["HOME"] == "/h"
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
    assert env["JAX_PLATFORMS"] == "cpu"


def test_two_processes_four_devices_agree_on_global_sum():
    proc, _ = _launch("--num_processes=2", "--devices_per_process=4")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    results = re.findall(
        r"^\[p(\d)\] SELFTEST process=(\d)/2 devices=(\d+) local=(\d+) "
        r"sum=(\S+) psum=(\d+)$",
        proc.stdout,
        re.M,
    )
    assert sorted(r[:2] for r in results) == [("0", "0"), ("1", "1")], out
    expected_sum = float(sum(range(8)))  # each global device holds its own index
    for _, _, devices, local_count, total, psum in results:
        assert (int(devices), int(local_count), int(psum)) == (8, 4, 8)
        assert float(total) == expected_sum
    # absl log lines carry the in-process prefix, launcher lines the process id.
    assert re.search(r"^\[p1\] \[process 1/2\] I.*devices: 8 global, 4 local", proc.stdout, re.M)
    assert "all 2 processes finished" in proc.stderr


def test_failing_process_stops_the_job_and_is_named():
    proc, elapsed = _launch("--config.selftest.fail_process=1", "--config.selftest.fail_code=3")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out
    assert "FAILED: process 1 of 2 exited with code 3" in proc.stderr, out
    # Process 0 was blocked in a collective; it stopped because of the failure, not a timeout.
    assert re.search(r"process 0: (exited with code 75|was killed by SIGKILL)", proc.stderr), out
    assert elapsed < 45, f"took {elapsed:.1f} s"


def test_uncaught_exception_is_reported_to_the_other_processes():
    proc, elapsed = _launch(
        "--config.selftest.fail_process=0",
        "--config.selftest.fail_mode=raise",
        "--config.selftest.guard=False",
        "-n",
        "3",
        "-k",
        "1",
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "FAILED: process 0 of 3 exited with code 1" in proc.stderr, out
    assert re.search(r"^\[p0\] RuntimeError: selftest failure", proc.stdout, re.M), out
    assert elapsed < 45, f"took {elapsed:.1f} s"
