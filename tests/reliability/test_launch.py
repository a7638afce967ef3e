"""Issue cases 6 and 7: the run's surroundings are checked before any work.

Case 6: a workdir whose `checkpoints` is a file (or that cannot be written) fails at start,
naming the path, instead of hanging at the first save. Case 7: `launch/slurm_submit.py`
refuses values that would inject lines into the `#SBATCH` header, naming the flag.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
from tinyconfigs import ROOT, cli

from medvlp_jax import preflight


def test_checkpoints_file_fails_naming_the_path(tmp_path):
    (tmp_path / "checkpoints").write_text("not a folder")
    with pytest.raises(preflight.WorkdirError) as caught:
        preflight.check_workdir(tmp_path)
    assert str(caught.value) == (
        f"{tmp_path / 'checkpoints'} is a file, not a folder: move it away or choose "
        "another --workdir"
    )


def test_workdir_is_created_and_probed_leaving_nothing_behind(tmp_path):
    workdir = tmp_path / "a" / "run"
    preflight.check_workdir(workdir)
    assert workdir.is_dir() and not list(workdir.iterdir())
    (workdir / "checkpoints").mkdir()
    preflight.check_workdir(str(workdir))
    assert not list((workdir / "checkpoints").iterdir())


def test_workdir_blocked_by_a_file_or_a_broken_link(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(preflight.WorkdirError, match=r"file is a file, not a folder"):
        preflight.check_workdir(tmp_path / "file")
    with pytest.raises(preflight.WorkdirError) as caught:
        preflight.check_workdir(tmp_path / "file" / "run")
    assert str(caught.value) == (
        f"cannot create {tmp_path / 'file' / 'run'}: {tmp_path / 'file'} is a file, not a folder"
    )
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to(tmp_path / "gone")
    with pytest.raises(preflight.WorkdirError, match=r"checkpoints is a broken symbolic link"):
        preflight.check_workdir(run)


def test_unwritable_workdir_names_the_folder(tmp_path, monkeypatch):
    def refuse(path, *args):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(preflight.os, "open", refuse)  # as root, chmod would not stop us
    with pytest.raises(preflight.WorkdirError) as caught:
        preflight.check_workdir(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path} is not writable: Permission denied")


def test_cli_with_checkpoints_file_fails_at_start(tmp_path):
    (tmp_path / "checkpoints").write_text("")
    result = subprocess.run(
        cli(tmp_path),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert f"workdir error: {tmp_path / 'checkpoints'} is a file, not a folder" in result.stderr
    assert not (tmp_path / "config.json").exists()  # stopped before writing anything


# --- case 7: launch/slurm_submit.py ---------------------------------------------------------

SUBMIT = ROOT / "launch" / "slurm_submit.py"
REQUIRED = ["--config=configs/clip.py", "--workdir=/scratch/run"]


def _slurm_submit():
    spec = importlib.util.spec_from_file_location("slurm_submit", SUBMIT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("flag", "value", "bad"),
    [
        ("job_name", "x\nrm -rf ~", "\\n"),
        ("time", "1:00:00\r", "\\r"),
        ("partition", "gpu;id", ";"),
        ("account", "lab$(id)", "$"),
        ("job_name", "../escape", "/"),
        ("time", "1:00 #", " "),
    ],
)
def test_sbatch_values_refuse_injection_naming_flag_and_character(flag, value, bad):
    submit = _slurm_submit()
    args, _ = submit.parse_args([*REQUIRED, f"--{flag}={value}"])
    with pytest.raises(SystemExit) as caught:
        submit.render(args, [], submit.TEMPLATE.read_text())
    message = str(caught.value)
    assert message.startswith(f"slurm_submit.py: --{flag}={value!r}: character '{bad}' is not")
    assert "allowed in an #SBATCH line" in message


def test_sbatch_values_that_are_safe_render_and_empty_ones_are_refused():
    submit = _slurm_submit()
    args, _ = submit.parse_args(
        [*REQUIRED, "--partition=gpu-a100,gpu_h100", "--account=lab.x", "--time=1-12:00:00"]
    )
    lines = submit.render(args, [], submit.TEMPLATE.read_text()).splitlines()
    assert "#SBATCH --partition=gpu-a100,gpu_h100" in lines
    assert "#SBATCH --account=lab.x" in lines and "#SBATCH --time=1-12:00:00" in lines
    args, _ = submit.parse_args([*REQUIRED, "--time="])
    with pytest.raises(SystemExit, match="--time must not be empty"):
        submit.render(args, [], submit.TEMPLATE.read_text())


def test_injected_job_name_writes_and_submits_nothing(tmp_path):
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "HOME": str(tmp_path)}
    marker = tmp_path / "sbatch_called"
    (tmp_path / "sbatch").write_text(f"#!/bin/sh\ntouch {marker}\n")
    os.chmod(tmp_path / "sbatch", 0o755)
    result = subprocess.run(
        [sys.executable, str(SUBMIT), *REQUIRED, "--job_name=run\ntouch /tmp/pwned"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "--job_name='run\\ntouch /tmp/pwned': character '\\n' is not allowed" in result.stderr
    assert not marker.exists() and not (tmp_path / "slurm_jobs").exists()
