"""`distributed.resolve`: how config.distributed + environment pick the start-up mode."""

import pytest

from medvlp_jax.parallel import distributed as dist

SLURM_ENV = {
    "SLURM_JOB_ID": "1234",
    "SLURM_STEP_NODELIST": "gpu[001-002]",
    "SLURM_NTASKS": "16",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "5",
}


def _cfg(**kw):
    cfg = dist.default_distributed_config()
    cfg.update(kw)
    return cfg


def test_defaults_are_single_process():
    cfg = dist.default_distributed_config()
    assert cfg.coordinator_address == ""
    assert (cfg.num_processes, cfg.process_id, cfg.local_device_count) == (-1, -1, 0)
    assert cfg.auto_detect == "auto"
    plan = dist.resolve(cfg, {})
    assert (plan.mode, plan.num_processes, plan.process_id) == ("single", 1, 0)


def test_explicit_from_config():
    plan = dist.resolve(
        _cfg(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3), {}
    )
    assert plan.mode == "explicit"
    assert (plan.coordinator_address, plan.num_processes, plan.process_id) == (
        "10.0.0.1:1234",
        4,
        3,
    )
    assert plan.describe() == "process 3 of 4, coordinator 10.0.0.1:1234"


def test_environment_overrides_config():
    cfg = _cfg(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)
    env = {
        dist.ENV_COORDINATOR: "127.0.0.1:999",
        dist.ENV_NUM_PROCESSES: "2",
        dist.ENV_PROCESS_ID: "1",
    }
    plan = dist.resolve(cfg, env)
    assert (plan.coordinator_address, plan.num_processes, plan.process_id) == (
        "127.0.0.1:999",
        2,
        1,
    )
    # Environment alone (config at defaults) is enough too.
    assert dist.resolve(dist.default_distributed_config(), env).mode == "explicit"


def test_slurm_is_auto_detected_and_deferred_to_jax():
    plan = dist.resolve(dist.default_distributed_config(), SLURM_ENV)
    assert (plan.mode, plan.detected, plan.cluster_method) == ("cluster", "slurm", None)
    # JAX fills in what is unset: nothing is passed explicitly.
    assert (plan.coordinator_address, plan.num_processes, plan.process_id) == (None, None, None)
    # Incomplete Slurm environment (not inside an srun step) is not a cluster.
    partial = {k: v for k, v in SLURM_ENV.items() if k != "SLURM_STEP_NODELIST"}
    assert dist.resolve(dist.default_distributed_config(), partial).mode == "single"
    assert dist.resolve(_cfg(auto_detect="off"), SLURM_ENV).mode == "single"


def test_tpu_vm_and_named_methods():
    plan = dist.resolve(dist.default_distributed_config(), {}, on_tpu_vm=True)
    assert (plan.mode, plan.detected) == ("cluster", "tpu")
    assert dist.resolve(
        dist.default_distributed_config(), {"TPU_WORKER_HOSTNAMES": "a,b"}
    ).mode == ("cluster")
    plan = dist.resolve(_cfg(auto_detect="mpi4py"), {})
    assert (plan.mode, plan.cluster_method) == ("cluster", "mpi4py")


def test_coordinator_with_cluster_fills_in_the_rest():
    plan = dist.resolve(_cfg(coordinator_address="head:5000"), SLURM_ENV)
    assert (plan.mode, plan.coordinator_address, plan.num_processes) == (
        "cluster",
        "head:5000",
        None,
    )


@pytest.mark.parametrize(
    ("overrides", "env", "needle"),
    [
        ({}, {dist.ENV_NUM_PROCESSES: "two"}, "MEDVLP_NUM_PROCESSES='two'"),
        ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, {}, "not in [0, 2)"),
        ({"coordinator_address": "hostonly", "num_processes": 2, "process_id": 0}, {}, "host:port"),
        ({"coordinator_address": "h:1"}, {}, "MEDVLP_NUM_PROCESSES"),
        ({"num_processes": 2, "process_id": 0}, {}, "coordinator_address=''"),
        ({"auto_detect": "yes"}, {}, "config.distributed.auto_detect='yes'"),
        ({"initialization_timeout_s": 0.0}, {}, "initialization_timeout_s must be > 0"),
        ({"cpu_collectives": "nccl"}, {}, "cpu_collectives='nccl'"),
        ({"num_processes": 0}, {}, "num_processes=0"),
    ],
)
def test_bad_settings_name_the_field(overrides, env, needle):
    with pytest.raises(dist.DistributedInitError) as info:
        dist.resolve(_cfg(**overrides), env)
    assert needle in str(info.value)


def test_log_prefix_before_initialize():
    assert dist.process_index_and_count() == (0, 1)
    assert dist.process_log_prefix() == "[process 0/1]"
