"""Multi-process start-up: `jax.distributed` with timeouts, clear errors and failure handling.

`initialize(config.distributed)` must run before anything touches a JAX device. It decides
between three modes (see `resolve`):

- **single**: no coordinator and no cluster detected -> nothing to initialize.
- **explicit**: a coordinator address plus process count and id, from the config or from the
  environment variables below (local multi-process and CPU runs; `launch/local.py`).
- **cluster**: no coordinator given, but the environment is a Slurm step (`SLURM_*`), a Cloud TPU
  VM or an Open MPI job -> `jax.distributed.initialize()` auto-detects everything itself.

Environment variables override the config (so a launcher can set them per process):

    MEDVLP_COORDINATOR    -> coordinator_address   ("host:port")
    MEDVLP_NUM_PROCESSES  -> num_processes
    MEDVLP_PROCESS_ID     -> process_id

Failure handling (measured with jax 0.12 on CPU, 2 local processes, 2 shared cores):

- A process that is SIGKILLed (or segfaults, or is OOM-killed) is noticed by JAX's coordination
  service after `heartbeat_timeout_s` (measured 9.2-10.8 s at 10 s, 60.4 s at 60 s, 99.9 s at
  100 s), also when the survivors are blocked in a collective; every other process then aborts
  (SIGABRT, exit 134) with "The following tasks are unhealthy (stopped sending heartbeats)".
  If the dead process is process 0 (it hosts the service) the others abort within 0.1-0.2 s.
- A process that *exits* with an error the ordinary way (exception, `sys.exit(3)`) is worse:
  its interpreter shutdown waits in JAX's shutdown barrier for the others, which never come,
  and every process hangs for `shutdown_timeout_s` (measured 301 s at JAX's default 300 s)
  before aborting, losing the exit code. So after a multi-process `initialize`, an uncaught
  exception (sys.excepthook) or a failure inside `exit_on_failure()` publishes a message in the
  coordination service's key-value store and leaves at once with `os._exit(code)`; a watchdog
  thread in every other process polls that store every `peer_failure_poll_s` and exits with
  `PEER_FAILURE_EXIT_CODE`, naming the process that failed (measured: 0.8-0.9 s after the
  failure at a 1 s poll, also from inside a blocked collective).
- SIGTERM does not stop a process after `initialize`: JAX's preemption notifier catches it (so
  a trainer can save at `multihost_utils.reached_preemption_sync_point`). Launchers must follow
  a SIGTERM with SIGKILL after a grace period (launch/local.py does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Mapping

import ml_collections

ENV_COORDINATOR = "MEDVLP_COORDINATOR"
ENV_NUM_PROCESSES = "MEDVLP_NUM_PROCESSES"
ENV_PROCESS_ID = "MEDVLP_PROCESS_ID"

# Exit code of a process that stops because another process of the job failed.
PEER_FAILURE_EXIT_CODE = 75

# Values of `auto_detect` besides 'auto'/'off': forwarded to JAX as `cluster_detection_method`.
JAX_CLUSTER_METHODS = ("slurm", "gcetpu", "gketpu", "ompi", "mpi4py", "k8s")
_SLURM_VARS = (
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
)
_TPU_VARS = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")
_FAILURE_KEY_DIR = "medvlp_jax/failed/"


class DistributedInitError(RuntimeError):
    """`jax.distributed` could not be set up (bad settings, coordinator unreachable, timeout)."""


def default_distributed_config() -> ml_collections.ConfigDict:
    """Defaults of `config.distributed`.

    coordinator_address: "host:port" of process 0's coordinator; '' = none (single process,
        unless a cluster is auto-detected).
    num_processes / process_id: -1 = unset (auto-detected in cluster mode).
    local_device_count: CPU only: simulated CPU devices in this process (`jax_num_cpu_devices`);
        0 = leave JAX's setting (XLA_FLAGS --xla_force_host_platform_device_count).
    initialization_timeout_s: how long to wait for the coordinator and all processes to join.
    heartbeat_timeout_s: a process silent this long is declared dead; the others then abort.
    shutdown_timeout_s: how long a finishing process waits for the others at exit.
    auto_detect: 'auto' (Slurm / Cloud TPU VM / Open MPI from the environment), 'off', or one
        of JAX's cluster_detection_method names (slurm, gcetpu, gketpu, ompi, mpi4py, k8s).
    cpu_collectives: cross-process collectives on CPU: 'gloo' (jax 0.12's default) or 'mpi'.
    peer_failure_poll_s: period of the watchdog that stops this process when another one
        reports a failure; 0 = off (then only the heartbeat detects failures).
    """
    c = ml_collections.ConfigDict()
    c.coordinator_address = ""
    c.num_processes = -1
    c.process_id = -1
    c.local_device_count = 0
    c.initialization_timeout_s = 120.0
    c.heartbeat_timeout_s = 60.0
    c.shutdown_timeout_s = 300.0
    c.auto_detect = "auto"
    c.cpu_collectives = "gloo"
    c.peer_failure_poll_s = 1.0
    return c


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `initialize` will do, resolved from config + environment (see `resolve`)."""

    mode: str  # 'single' | 'explicit' | 'cluster'
    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    cluster_method: str | None  # JAX cluster_detection_method (None = JAX scans all)
    detected: str  # what the environment looked like: 'slurm', 'tpu', 'ompi', ''

    def describe(self) -> str:
        if self.mode == "single":
            return "single process"
        if self.mode == "explicit":
            return (
                f"process {self.process_id} of {self.num_processes}, "
                f"coordinator {self.coordinator_address}"
            )
        return f"cluster auto-detection ({self.cluster_method or self.detected or 'jax'})"


_state = {"process_id": 0, "num_processes": 1}
_stop_watchdog = threading.Event()


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise DistributedInitError(
            f"environment variable {name}={raw!r} is not an integer"
        ) from None


def detect_cluster(environ: Mapping[str, str], on_tpu_vm: bool) -> str:
    """Names the cluster environment JAX can auto-detect: 'slurm', 'tpu', 'ompi' or ''."""
    if all(v in environ for v in _SLURM_VARS):
        return "slurm"
    if on_tpu_vm or any(v in environ for v in _TPU_VARS):
        return "tpu"
    if "OMPI_MCA_orte_hnp_uri" in environ or "OMPI_COMM_WORLD_SIZE" in environ:
        return "ompi"
    return ""


def resolve(dist_cfg, environ: Mapping[str, str], on_tpu_vm: bool = False) -> Plan:
    """Decides the start-up mode from `config.distributed` and the environment (no side effects).

    Raises:
      DistributedInitError: inconsistent or invalid settings, naming the field or variable.
    """
    auto = dist_cfg.auto_detect
    if auto not in ("auto", "off", *JAX_CLUSTER_METHODS):
        raise DistributedInitError(
            f"config.distributed.auto_detect={auto!r}; expected 'auto', 'off' or one of "
            f"{', '.join(JAX_CLUSTER_METHODS)}"
        )
    for field in ("initialization_timeout_s", "heartbeat_timeout_s", "shutdown_timeout_s"):
        if not dist_cfg[field] > 0:
            raise DistributedInitError(f"config.distributed.{field} must be > 0")
    if dist_cfg.local_device_count < 0:
        raise DistributedInitError("config.distributed.local_device_count must be >= 0")
    if dist_cfg.cpu_collectives not in ("gloo", "mpi"):
        raise DistributedInitError(
            f"config.distributed.cpu_collectives={dist_cfg.cpu_collectives!r}; "
            "expected 'gloo' or 'mpi'"
        )

    coordinator = environ.get(ENV_COORDINATOR, "").strip() or dist_cfg.coordinator_address
    num = _env_int(environ, ENV_NUM_PROCESSES)
    num = dist_cfg.num_processes if num is None else num
    pid = _env_int(environ, ENV_PROCESS_ID)
    pid = dist_cfg.process_id if pid is None else pid
    num = None if num == -1 else num
    pid = None if pid == -1 else pid
    if num is not None and num < 1:
        raise DistributedInitError(
            f"num_processes={num} (config or {ENV_NUM_PROCESSES}) must be >= 1"
        )
    if pid is not None and num is not None and not 0 <= pid < num:
        raise DistributedInitError(
            f"process_id={pid} is not in [0, {num}) (config.distributed.process_id / "
            f"{ENV_PROCESS_ID} vs num_processes / {ENV_NUM_PROCESSES})"
        )
    if coordinator and (":" not in coordinator or not coordinator.rsplit(":", 1)[1].isdigit()):
        raise DistributedInitError(
            f"coordinator address {coordinator!r} (config.distributed.coordinator_address / "
            f"{ENV_COORDINATOR}) must look like host:port"
        )

    detected = detect_cluster(environ, on_tpu_vm) if auto == "auto" else ""
    method = auto if auto in JAX_CLUSTER_METHODS else None
    if coordinator and num is not None and pid is not None:
        return Plan("explicit", coordinator, num, pid, None, detected)
    if method or detected:
        return Plan("cluster", coordinator or None, num, pid, method, detected)
    if coordinator or (num or 1) > 1:
        raise DistributedInitError(
            "multi-process settings are incomplete and no cluster environment was detected: "
            f"coordinator_address={coordinator!r}, num_processes={num}, process_id={pid}; set all "
            f"three (config.distributed.* or {ENV_COORDINATOR}/{ENV_NUM_PROCESSES}/"
            f"{ENV_PROCESS_ID})"
        )
    return Plan("single", None, 1, 0, None, "")


def _on_tpu_vm() -> bool:
    """True on a Cloud TPU VM (decided by JAX at import from the PCI devices)."""
    try:
        from jax._src import cloud_tpu_init
    except ImportError:
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def _wait_for_port(address: str, deadline: float) -> bool:
    """Retries a TCP connection to `host:port` until `deadline` (time.monotonic)."""
    host, port = address.rsplit(":", 1)
    host = host.strip("[]")
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


def _call_with_deadline(fn, timeout_s: float):
    """Runs `fn()` in a daemon thread; returns (done, exception). JAX's connect blocks in C++."""
    outcome: dict = {}

    def target():
        try:
            fn()
        except BaseException as e:  # re-raised in the caller's thread
            outcome["error"] = e

    thread = threading.Thread(target=target, name="jax-distributed-init", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return not thread.is_alive(), outcome.get("error")


def initialize(dist_cfg) -> None:
    """Sets up JAX for this process from `config.distributed` (see module docstring).

    Must be called before any JAX computation or device query.

    Raises:
      DistributedInitError: invalid settings, coordinator unreachable, or not all processes
        joined within `initialization_timeout_s` (the message names the coordinator address
        and this process's id).
    """
    import jax
    from jax._src import xla_bridge

    plan = resolve(dist_cfg, os.environ, _on_tpu_vm())
    if xla_bridge.backends_are_initialized():
        raise DistributedInitError(
            "initialize() must run before any JAX computation or device query "
            "(the JAX backend is already initialized)"
        )
    if dist_cfg.local_device_count:
        jax.config.update("jax_num_cpu_devices", dist_cfg.local_device_count)
    if plan.mode == "single":
        return
    jax.config.update("jax_cpu_collectives_implementation", dist_cfg.cpu_collectives)

    if plan.mode == "explicit":
        _state.update(process_id=plan.process_id, num_processes=plan.num_processes)
    timeout = float(dist_cfg.initialization_timeout_s)
    who = (
        f"process {plan.process_id} of {plan.num_processes}"
        if plan.mode == "explicit"
        else plan.describe()
    )
    deadline = time.monotonic() + timeout
    reachable = (
        plan.mode != "explicit"
        or plan.process_id == 0
        or _wait_for_port(plan.coordinator_address, deadline)
    )
    if not reachable:
        raise DistributedInitError(
            f"could not reach coordinator {plan.coordinator_address} within {timeout:g} s "
            f"({who}); is process 0 running, and is that host:port reachable from here?"
        )

    def connect():
        jax.distributed.initialize(
            coordinator_address=plan.coordinator_address,
            num_processes=plan.num_processes,
            process_id=plan.process_id,
            cluster_detection_method=plan.cluster_method,
            # JAX aborts the process when its own timeout expires: give ours time to report.
            initialization_timeout=math.ceil(timeout) + 30,
            heartbeat_timeout_seconds=math.ceil(dist_cfg.heartbeat_timeout_s),
            shutdown_timeout_seconds=math.ceil(dist_cfg.shutdown_timeout_s),
        )

    done, error = _call_with_deadline(connect, max(deadline - time.monotonic(), 0.1))
    if error is not None:
        raise DistributedInitError(f"jax.distributed.initialize failed ({who}): {error}") from error
    if not done:
        address = plan.coordinator_address or "(auto-detected)"
        raise DistributedInitError(
            f"not all processes joined coordinator {address} within {timeout:g} s ({who}); "
            "check that every process was started with the same coordinator and process count"
        )

    from jax._src import distributed as jax_distributed

    _state["process_id"] = jax_distributed.global_state.process_id
    _state["num_processes"] = jax_distributed.global_state.num_processes
    if _state["num_processes"] > 1:
        _install_failure_handling(float(dist_cfg.peer_failure_poll_s))


def is_initialized() -> bool:
    """True once `jax.distributed` is set up in this process (by `initialize` or directly)."""
    return _client() is not None


def process_index_and_count() -> tuple[int, int]:
    """(process id, process count) as set up by `initialize`; (0, 1) before or when single."""
    return _state["process_id"], _state["num_processes"]


def process_log_prefix() -> str:
    """E.g. "[process 1/2]": this process's id and the process count."""
    pid, num = process_index_and_count()
    return f"[process {pid}/{num}]"


class _PrefixFormatter(logging.Formatter):
    """Prefixes every line of another formatter's output with `process_log_prefix()`."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        prefix = process_log_prefix()
        return "\n".join(f"{prefix} {line}" for line in self.inner.format(record).split("\n"))


def setup_logging() -> None:
    """Makes absl and Python logging prefix every line with `process_log_prefix()`.

    Idempotent; the prefix is read at format time, so calling this before `initialize` works.
    """
    from absl import logging as absl_logging

    absl_logging.use_absl_handler()
    absl_handler = absl_logging.get_absl_handler()
    handlers = [absl_handler.python_handler]
    handlers += [h for h in logging.root.handlers if h is not absl_handler]
    for handler in handlers:
        if not isinstance(handler.formatter, _PrefixFormatter):
            handler.setFormatter(_PrefixFormatter(handler.formatter))


def _client():
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.client


def report_failure_and_exit(code: int, reason: str) -> None:
    """Tells the other processes that this one failed, then exits at once with `code`.

    Skips JAX's shutdown barrier, which would otherwise hold every process for
    `shutdown_timeout_s`.
    """
    pid, num = process_index_and_count()
    message = f"process {pid} of {num} failed with exit code {code}: {reason}"
    print(f"{process_log_prefix()} {message}", file=sys.stderr)
    client = _client()
    if client is not None:
        with contextlib.suppress(Exception):
            client.key_value_set(f"{_FAILURE_KEY_DIR}{pid}", message)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_code(exc: BaseException) -> int | None:
    """Exit code a failure stands for; None for a successful SystemExit."""
    if isinstance(exc, SystemExit):
        if exc.code is None or exc.code == 0:
            return None
        return exc.code if isinstance(exc.code, int) else 1
    if isinstance(exc, KeyboardInterrupt):
        return 130
    return 1


@contextlib.contextmanager
def exit_on_failure() -> Iterator[None]:
    """Wrap the body of a multi-process run: any failure (exception, non-zero `sys.exit`)
    prints the traceback, notifies the other processes and exits this one at once.

    Does nothing special in a single-process run (the exception propagates).
    """
    try:
        yield
    except BaseException as exc:
        code = _exit_code(exc)
        if code is None or process_index_and_count()[1] == 1:
            raise
        if not isinstance(exc, SystemExit):
            traceback.print_exc()
        reason = f"{type(exc).__name__}: {exc.code if isinstance(exc, SystemExit) else exc}"
        report_failure_and_exit(code, reason)


def _excepthook(exc_type, exc, tb) -> None:
    """sys.excepthook after a multi-process initialize: print, notify the others, exit."""
    traceback.print_exception(exc_type, exc, tb)
    report_failure_and_exit(_exit_code(exc) or 1, f"{exc_type.__name__}: {exc}")


def _watch_peers(poll_s: float) -> None:
    """Exits this process when another process has reported a failure."""
    own = f"{_FAILURE_KEY_DIR}{_state['process_id']}"
    while not _stop_watchdog.wait(poll_s):
        client = _client()
        if client is None:
            return
        try:
            entries = client.key_value_dir_get(_FAILURE_KEY_DIR)
        except Exception:  # service going away: JAX's own error handling takes over
            continue
        failures = [value for key, value in entries if key != own]
        if failures:
            print(
                f"{process_log_prefix()} stopping (exit code {PEER_FAILURE_EXIT_CODE}) because "
                f"{failures[0]}",
                file=sys.stderr,
            )
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(PEER_FAILURE_EXIT_CODE)


def _install_failure_handling(poll_s: float) -> None:
    import atexit

    sys.excepthook = _excepthook
    if poll_s > 0:
        watchdog = threading.Thread(
            target=_watch_peers, args=(poll_s,), name="peer-failure-watchdog", daemon=True
        )
        watchdog.start()

        def stop():
            _stop_watchdog.set()
            watchdog.join(timeout=poll_s + 5)

        atexit.register(stop)
