"""launch/tpu_vm.sh: --dry-run prints the gcloud commands and runs none."""

import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "tpu_vm.sh"


@pytest.fixture
def fake_gcloud(tmp_path):
    """A `gcloud` first on PATH that records its call and fails; returns (env, record file)."""
    record = tmp_path / "gcloud_calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(record))}\nexit 1\n')
    gcloud.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    return env, record


def _run(env, *args):
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=30
    )


def _commands(stdout: str) -> list[list[str]]:
    """The printed `+ cmd` lines (multi-line quoted words included), split into words."""
    text = "\n".join(line for line in stdout.splitlines() if not line.startswith("# "))
    return [shlex.split(chunk) for chunk in text.split("\n+ ") if chunk.strip()]


COMMON = ["--project=my-proj", "--zone=us-west4-a"]
FLAGS = [
    "--dry-run",
    "--project", "my-proj",
    "--zone", "us-west4-a",
    "--name", "medvlp-test",
    "--accelerator-type", "v5litepod-16",
    "--version", "v2-alpha-tpuv5-lite",
    "--config", "configs/clip.py",
    "--workdir", "gs://bucket/runs/clip",
]  # fmt: skip


def test_dry_run_prints_create_copy_install_run_delete(fake_gcloud):
    env, record = fake_gcloud
    proc = _run(env, *FLAGS, "--delete", "--", "--config.train.num_steps=10", "--config.x=a b")
    assert proc.returncode == 0, proc.stderr
    assert not record.exists(), "dry run must not call gcloud"
    cmds = _commands(proc.stdout.removeprefix("+ "))
    gcloud = [c for c in cmds if c[0] == "gcloud"]
    assert [c[1:5] for c in gcloud] == [
        ["compute", "tpus", "tpu-vm", "create"],
        ["compute", "tpus", "tpu-vm", "scp"],
        ["compute", "tpus", "tpu-vm", "ssh"],
        ["compute", "tpus", "tpu-vm", "ssh"],
        ["compute", "tpus", "tpu-vm", "delete"],
    ]
    create, scp, install, train, delete = gcloud
    assert create[5:] == [
        "medvlp-test",
        "--accelerator-type=v5litepod-16",
        "--version=v2-alpha-tpuv5-lite",
        *COMMON,
    ]
    assert scp[-4:] == ["medvlp-test:medvlp_jax.tar.gz", "--worker=all", *COMMON]
    install_cmd = install[-1].removeprefix("--command=")
    assert "--worker=all" in install and "pip install" in install_cmd
    assert "'jax[tpu]'" in install_cmd and "-e ./medvlp_jax" in install_cmd
    assert "--worker=all" in train
    run_cmd = train[-1].removeprefix("--command=")
    assert (
        "python -m medvlp_jax.main --config=configs/clip.py --workdir=gs://bucket/runs/clip "
        "--config.train.num_steps=10 '--config.x=a b'"
    ) in run_cmd
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "medvlp-test", "--quiet",
                      *COMMON]  # fmt: skip
    assert any(c[0] == "tar" for c in cmds)


def test_queued_resource_and_existing_vm(fake_gcloud):
    env, record = fake_gcloud
    proc = _run(env, *FLAGS, "--queued", "--spot", "--delete")
    assert proc.returncode == 0, proc.stderr
    assert "+ gcloud compute tpus queued-resources create medvlp-test --node-id=medvlp-test" in (
        proc.stdout
    )
    assert "--runtime-version=v2-alpha-tpuv5-lite --spot" in proc.stdout
    assert "queued-resources delete medvlp-test --force --quiet" in proc.stdout
    proc = _run(env, *FLAGS, "--skip-create", "--skip-install")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("+ ")]
    assert len(lines) == 1 and "tpu-vm ssh medvlp-test --worker=all" in lines[0]
    assert not record.exists()


def test_without_dry_run_gcloud_is_really_called(fake_gcloud):
    env, record = fake_gcloud
    args = [a for a in FLAGS if a != "--dry-run"]
    proc = _run(env, *args, "--skip-create", "--skip-install")
    assert proc.returncode != 0
    assert record.read_text().startswith("compute tpus tpu-vm ssh medvlp-test --worker=all")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--dry-run", "--config", "c.py", "--workdir", "w"], "--name is required"),
        (["--dry-run", "--name", "n", "--workdir", "w"], "--config is required"),
        (["--dry-run", "--name", "n", "--config", "c.py", "--bogus"], "unknown argument '--bogus'"),
    ],
)
def test_bad_flags_fail_with_usage(fake_gcloud, args, needle):
    env, _ = fake_gcloud
    proc = _run(env, *args)
    assert proc.returncode == 2
    assert needle in proc.stderr
