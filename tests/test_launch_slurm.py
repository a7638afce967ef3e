"""launch/slurm_submit.py + slurm_gpu.sbatch: rendering, dry run, and the srun line it runs."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_bin(tmp_path):
    """`sbatch` that records and fails, `srun` that prints its argv one per line; returns env."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "sbatch_calls"
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(record))}\nexit 1\n')
    (bin_dir / "srun").write_text('#!/bin/sh\nfor a in "$@"; do echo "SRUN_ARG $a"; done\n')
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    return env, record


ARGS = [
    "--nodes=2",
    "--gpus_per_node=4",
    "--partition=gpu-a100",
    "--time=02:00:00",
    "--config=configs/clip.py",
    "--workdir=/scratch/runs/clip",
]


def _submit(env, tmp_path, *args):
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / "slurm_submit.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=30,
    )


def test_dry_run_renders_script_and_submits_nothing(fake_bin, tmp_path):
    env, record = fake_bin
    proc = _submit(env, tmp_path, *ARGS, "--dry_run", "--", "--config.train.num_steps=7")
    assert proc.returncode == 0, proc.stderr
    assert not record.exists(), "dry run must not call sbatch"
    assert not (tmp_path / "slurm_jobs").exists(), "dry run must not write the script"
    lines = proc.stdout.splitlines()
    for directive in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gres=gpu:4",
        "#SBATCH --partition=gpu-a100",
        "#SBATCH --time=02:00:00",
    ):
        assert lines.count(directive) == 1, directive
    assert not any(line.startswith("#SBATCH --nodes=1") for line in lines)
    assert "set -- configs/clip.py /scratch/runs/clip --config.train.num_steps=7" in lines
    assert any(
        line.strip().startswith('"$PYTHON" -m medvlp_jax.main --config="$CONFIG"') for line in lines
    )
    assert any(line.startswith("srun --kill-on-bad-exit=1") for line in lines)
    assert lines[-1].startswith("# dry run: would write slurm_jobs/medvlp-")
    assert " and run: sbatch slurm_jobs/medvlp-" in lines[-1]


def test_rendered_script_runs_srun_with_config_workdir_and_overrides(fake_bin, tmp_path):
    env, record = fake_bin
    proc = _submit(env, tmp_path, *ARGS, "--dry_run", "--", "--config.x=a b")
    script = tmp_path / "job.sbatch"
    script.write_text(proc.stdout.rsplit("# dry run:", 1)[0])
    run = subprocess.run(
        ["bash", str(script)],
        capture_output=True,
        text=True,
        env={**env, "SLURM_CPUS_PER_TASK": "8"},
        timeout=30,
    )
    assert run.returncode == 0, run.stderr
    argv = [
        line.removeprefix("SRUN_ARG ") for line in run.stdout.splitlines() if "SRUN_ARG" in line
    ]
    assert argv == [
        "--kill-on-bad-exit=1",
        "--label",
        "--cpus-per-task=8",
        "python",
        "-m",
        "medvlp_jax.main",
        "--config=configs/clip.py",
        "--workdir=/scratch/runs/clip",
        "--config.x=a b",
    ]
    assert not record.exists()


def test_submit_writes_script_and_calls_sbatch(fake_bin, tmp_path):
    env, record = fake_bin
    proc = _submit(env, tmp_path, *ARGS)
    assert proc.returncode == 1  # the fake sbatch fails; its exit code is passed on
    written = list((tmp_path / "slurm_jobs").glob("medvlp-*.sbatch"))
    assert len(written) == 1
    assert record.read_text().strip() == f"slurm_jobs/{written[0].name}"
    assert "#SBATCH --gres=gpu:4" in written[0].read_text()


def test_template_is_valid_bash_and_needs_arguments(fake_bin):
    env, _ = fake_bin
    template = REPO / "launch" / "slurm_gpu.sbatch"
    assert subprocess.run(["bash", "-n", str(template)], timeout=30).returncode == 0
    run = subprocess.run(["bash", str(template)], capture_output=True, text=True, env=env)
    assert run.returncode == 2 and "usage: sbatch launch/slurm_gpu.sbatch" in run.stderr
