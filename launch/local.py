"""Run N local processes x K simulated CPU devices as one JAX job on 127.0.0.1.

    python launch/local.py --num_processes=2 --devices_per_process=4 -- \\
        --config=configs/clip.py:tiny --workdir=/tmp/run [--config.a.b=v ...]
    python launch/local.py --module=launch.selftest          # distributed smoke test

Process i runs `python -m MODULE ARGS --config.distributed.coordinator_address=127.0.0.1:PORT
--config.distributed.num_processes=N --config.distributed.process_id=i
--config.distributed.local_device_count=K` with `XLA_FLAGS=--xla_force_host_platform_device_count=K`
and `JAX_PLATFORMS=cpu`, in the current directory. Every output line of process i is printed as
`[pI] line` (and also written to `--log_dir/process_I.log` if given).

If a process exits non-zero, the others get SIGTERM and, `--grace_s` later, SIGKILL (a process
that called jax.distributed.initialize ignores SIGTERM); the launcher then exits with that
process's exit code and names it. Exit 124 after `--timeout_s`. Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

PEER_FAILURE_EXIT_CODE = 75  # medvlp_jax.parallel.distributed.PEER_FAILURE_EXIT_CODE
_POLL_S = 0.05


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def xla_flags_with_device_count(xla_flags: str, count: int) -> str:
    """`xla_flags` with --xla_force_host_platform_device_count set to `count` (replaced)."""
    kept = re.sub(r"--xla_force_host_platform_device_count=\S*", "", xla_flags).split()
    return " ".join([*kept, f"--xla_force_host_platform_device_count={count}"])


def child_command(args: argparse.Namespace, passthrough: list[str], port: int, i: int) -> list[str]:
    """The command line of process `i`."""
    prefix = f"--{args.config_flag}.distributed"
    return [
        args.python,
        "-m",
        args.module,
        *passthrough,
        f"{prefix}.coordinator_address=127.0.0.1:{port}",
        f"{prefix}.num_processes={args.num_processes}",
        f"{prefix}.process_id={i}",
        f"{prefix}.local_device_count={args.devices_per_process}",
    ]


def child_env(args: argparse.Namespace, environ: dict[str, str]) -> dict[str, str]:
    """Environment of every process: K CPU devices, unbuffered output, no stale MEDVLP_* vars."""
    env = {
        k: v for k, v in environ.items() if not k.startswith("MEDVLP_") or k == "MEDVLP_JAX_CACHE"
    }
    env["XLA_FLAGS"] = xla_flags_with_device_count(
        env.get("XLA_FLAGS", ""), args.devices_per_process
    )
    env["PYTHONUNBUFFERED"] = "1"
    if args.platform:
        env["JAX_PLATFORMS"] = args.platform
    return env


def _pump(i: int, stream, log_path: Path | None, lock: threading.Lock) -> None:
    """Copies a child's output to ours, one prefixed line at a time."""
    log = open(log_path, "w") if log_path else None  # noqa: SIM115
    try:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with lock:
                sys.stdout.write(f"[p{i}] {line}\n")
                sys.stdout.flush()
            if log:
                log.write(line + "\n")
                log.flush()
    finally:
        stream.close()
        if log:
            log.close()


def _describe(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    if code == PEER_FAILURE_EXIT_CODE:
        return f"exited with code {code} (stopped after another process failed)"
    return f"exited with code {code}"


def _blame_rank(code: int) -> int:
    """Orders failures seen at once: root causes first, then processes that only stopped
    because of another one (JAX aborts with SIGABRT when a peer dies; medvlp exits 75)."""
    if code == PEER_FAILURE_EXIT_CODE:
        return 3
    if code == -signal.SIGABRT:
        return 2
    return 1 if code < 0 else 0


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def _stop_all(procs: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM every running child's process group; SIGKILL what is left after `grace_s`."""
    for p in procs:
        if p.poll() is None:
            _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(_POLL_S)
    for p in procs:
        if p.poll() is None:
            _signal_group(p, signal.SIGKILL)
    for p in procs:
        p.wait()


def run(args: argparse.Namespace, passthrough: list[str]) -> int:
    """Starts the processes, supervises them, returns the launcher's exit code."""
    n = args.num_processes
    port = args.port or free_port()
    env = child_env(args, dict(os.environ))
    log_dir = Path(args.log_dir) if args.log_dir else None
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
    say = lambda msg: print(f"[launch] {msg}", file=sys.stderr, flush=True)
    say(f"{n} processes x {args.devices_per_process} CPU devices, coordinator 127.0.0.1:{port}")

    lock = threading.Lock()
    procs, pumps = [], []
    for i in range(n):
        proc = subprocess.Popen(
            child_command(args, passthrough, port, i),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: we can stop it and its children
        )
        procs.append(proc)
        log_path = log_dir / f"process_{i}.log" if log_dir else None
        pump = threading.Thread(target=_pump, args=(i, proc.stdout, log_path, lock), daemon=True)
        pump.start()
        pumps.append(pump)

    interrupted: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _f: interrupted.append(s))

    start = time.monotonic()
    failed: tuple[int, int] | None = None  # (process, code) of the first failure seen
    timed_out = False
    while True:
        codes = [p.poll() for p in procs]
        bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if bad:
            failed = min(bad, key=lambda ic: _blame_rank(ic[1]))
            break
        if all(c == 0 for c in codes) or interrupted:
            break
        if args.timeout_s and time.monotonic() - start > args.timeout_s:
            timed_out = True
            break
        time.sleep(_POLL_S)

    if failed is not None:
        i, code = failed
        say(f"process {i} of {n} {_describe(code)}; stopping the other processes")
    elif timed_out:
        say(f"timed out after {args.timeout_s:g} s; stopping all processes")
    elif interrupted:
        say(f"received {signal.Signals(interrupted[0]).name}; stopping all processes")
    _stop_all(procs, args.grace_s)
    for pump in pumps:
        pump.join(timeout=5)

    elapsed = time.monotonic() - start
    if failed is not None:
        i, code = failed
        others = ", ".join(
            f"process {j}: {_describe(p.returncode)}"
            for j, p in enumerate(procs)
            if j != i and p.returncode != 0
        )
        say(
            f"FAILED: process {i} of {n} {_describe(code)} after {elapsed:.1f} s"
            + (f" ({others})" if others else "")
        )
        return code if code > 0 else 128 - code
    if timed_out:
        return 124
    if interrupted:
        return 128 + interrupted[0]
    say(f"all {n} processes finished in {elapsed:.1f} s")
    return 0


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Launcher options; everything else (after an optional `--`) goes to the module."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], allow_abbrev=False, add_help=True
    )
    parser.add_argument("--num_processes", "-n", type=int, default=2)
    parser.add_argument("--devices_per_process", "-k", type=int, default=4)
    parser.add_argument("--module", default="medvlp_jax.main", help="run as `python -m MODULE`")
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0 = a free one)")
    parser.add_argument("--grace_s", type=float, default=3.0, help="SIGTERM -> SIGKILL delay")
    parser.add_argument("--timeout_s", type=float, default=0.0, help="stop all after (0 = never)")
    parser.add_argument("--log_dir", default="", help="also write process_I.log files here")
    parser.add_argument("--platform", default="cpu", help="JAX_PLATFORMS for the processes")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the processes")
    parser.add_argument("--config_flag", default="config", help="name of the module's config flag")
    args, rest = parser.parse_known_args(argv)
    if rest and rest[0] == "--":
        rest = rest[1:]
    if args.num_processes < 1:
        parser.error(f"--num_processes={args.num_processes} must be >= 1")
    if args.devices_per_process < 1:
        parser.error(f"--devices_per_process={args.devices_per_process} must be >= 1")
    return args, rest


def main(argv: list[str] | None = None) -> int:
    args, passthrough = parse_args(sys.argv[1:] if argv is None else argv)
    return run(args, passthrough)


if __name__ == "__main__":
    sys.exit(main())
