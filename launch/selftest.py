"""Distributed smoke test: every process joins, builds one global array, and sums it.

    python launch/local.py --module=launch.selftest --num_processes=2 --devices_per_process=4
    srun python -m launch.selftest          # on Slurm / a TPU VM: auto-detected

Process p contributes the values `p * L + [0, L)` (L = its local device count) to a global
array of length D = jax.device_count(), sharded over a 1-D mesh of all devices. Each process
prints one line

    SELFTEST process=P/N devices=D local=L sum=S psum=D

where S = sum(range(D)) (a jitted global reduction) and psum = D (a `jax.shard_map` psum of
ones). `--config.selftest.fail_process=P --config.selftest.fail_code=C` makes process P fail
after the first collective (fail_mode 'exit': sys.exit(C); 'raise': uncaught exception;
'kill': SIGKILL itself) while the others wait in a second collective, to exercise failure
handling; `--config.selftest.guard=False` leaves an exception to sys.excepthook instead of
`distributed.exit_on_failure()`.
"""

from __future__ import annotations

import os
import signal
import sys

import ml_collections
from absl import app, logging
from ml_collections import config_flags

from medvlp_jax.parallel import distributed


def _default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.distributed = distributed.default_distributed_config()
    c.selftest = ml_collections.ConfigDict()
    c.selftest.fail_process = -1
    c.selftest.fail_code = 3
    c.selftest.fail_mode = "exit"  # 'exit' | 'raise' | 'kill'
    c.selftest.guard = True  # run inside distributed.exit_on_failure() (else: sys.excepthook)
    return c


_CONFIG = config_flags.DEFINE_config_dict("config", _default_config(), lock_config=True)


def _fail(mode: str, code: int) -> None:
    if mode == "exit":
        sys.exit(code)
    if mode == "raise":
        raise RuntimeError(f"selftest failure (code {code})")
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise ValueError(f"config.selftest.fail_mode={mode!r}; expected exit, raise or kill")


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    distributed.setup_logging()
    distributed.initialize(config.distributed)
    if config.selftest.guard:
        with distributed.exit_on_failure():
            _run(config.selftest)
    else:
        _run(config.selftest)


def _run(cfg: ml_collections.ConfigDict) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    pid, num = jax.process_index(), jax.process_count()
    n_global, n_local = jax.device_count(), jax.local_device_count()
    logging.info("devices: %d global, %d local", n_global, n_local)
    mesh = jax.make_mesh((n_global,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P("data"))
    local = np.arange(pid * n_local, (pid + 1) * n_local, dtype=np.float32)
    x = jax.make_array_from_process_local_data(sharding, local, (n_global,))
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
    psum = jax.jit(
        jax.shard_map(
            lambda b: jax.lax.psum(jnp.ones((), jnp.int32), "data"),
            mesh=mesh,
            in_specs=P("data"),
            out_specs=P(),
        )
    )(x)
    print(
        f"SELFTEST process={pid}/{num} devices={n_global} local={n_local} "
        f"sum={float(total):g} psum={int(psum)}",
        flush=True,
    )
    if cfg.fail_process >= 0:
        if pid == cfg.fail_process:
            _fail(cfg.fail_mode, cfg.fail_code)
        # The other processes block here: the failed process never joins this collective.
        second = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x * 2)
        print(f"SELFTEST unexpected second sum {float(second):g}", flush=True)


if __name__ == "__main__":
    app.run(main)
