"""Issue case 2 (and the disk-full part of 6): a damaged or incomplete checkpoint is named
file by file and never restored; the previous complete step is, and a rerun ends where an
uninterrupted run ends."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tinyconfigs import NO_EVAL, ROOT, cli, tiny_clip

from medvlp_jax import checkpoint_integrity, checkpointing, train

_COMMON = ("optim.schedule=constant", "train.checkpoint_every=2", "train.log_every=2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A 4-step run (checkpoints 2 and 4) and an uninterrupted 6-step run."""
    root = tmp_path_factory.mktemp("runs")
    train.run(tiny_clip(*_COMMON, "train.num_steps=4"), root / "four")
    train.run(tiny_clip(*_COMMON, "train.num_steps=6"), root / "six")
    return {"four": root / "four", "six": root / "six"}


def _copy(runs, tmp_path) -> Path:
    workdir = tmp_path / "run"
    shutil.copytree(runs["four"], workdir)
    return workdir


def _largest_state_file(step_dir: Path) -> Path:
    return max(
        (p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )


def _flip_bytes(path: Path, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, min(middle + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _state(workdir: Path, step: int) -> list[np.ndarray]:
    return jax.tree.leaves(
        ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    )


def test_every_saved_step_carries_checksums(runs):
    for step in (2, 4):
        step_dir = runs["four"] / "checkpoints" / str(step)
        manifest = json.loads((step_dir / checkpoint_integrity.MANIFEST).read_text())["files"]
        assert "state/_METADATA" in manifest and "_CHECKPOINT_METADATA" in manifest
        assert any(name.startswith("data/") for name in manifest)
        assert checkpoint_integrity.problems(step_dir) == []


def test_bit_rot_falls_back_to_the_previous_step_and_ends_like_an_uninterrupted_run(
    runs, tmp_path, capsys
):
    workdir = _copy(runs, tmp_path)
    rotten = _largest_state_file(workdir / "checkpoints" / "4")
    _flip_bytes(rotten)
    train.run(tiny_clip(*_COMMON, "train.num_steps=6"), workdir)
    out = capsys.readouterr().out
    assert f"{rotten}: contents changed since it was saved (SHA-256 mismatch)" in out
    assert "resuming from step 2" in out
    assert (
        workdir
        / "checkpoints"
        / "damaged"
        / "4"
        / rotten.relative_to(workdir / "checkpoints" / "4")
    ).exists()
    for a, b in zip(_state(workdir, 6), _state(runs["six"], 6), strict=True):
        np.testing.assert_array_equal(a, b)


def test_error_policy_stops_naming_the_file(runs, tmp_path):
    workdir = _copy(runs, tmp_path)
    rotten = _largest_state_file(workdir / "checkpoints" / "4")
    _flip_bytes(rotten)
    config = tiny_clip(*_COMMON, "train.num_steps=6", "train.on_bad_checkpoint=error")
    with pytest.raises(checkpointing.CheckpointDamagedError, match=str(rotten)):
        train.run(config, workdir)
    assert (workdir / "checkpoints" / "4").is_dir()  # nothing moved, nothing lost


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize(
    ("damage", "target", "expected"),
    [
        (_truncate, "largest", "{now} bytes, {size} when saved"),
        (Path.unlink, "largest", "missing"),
        (Path.unlink, "state/_METADATA", "missing"),
        (_empty, "data/process_0-of-1.json", "{now} bytes, {size} when saved"),
    ],
    ids=["truncated-array-file", "deleted-array-file", "no-_METADATA", "empty-iterator-state"],
)
@pytest.mark.parametrize("with_checksums", [True, False], ids=["checksums", "no-checksums"])
def test_damage_is_named_and_the_step_moved_aside(
    runs, tmp_path, damage, target, expected, with_checksums
):
    workdir = _copy(runs, tmp_path)
    step_dir = workdir / "checkpoints" / "4"
    if not with_checksums:  # e.g. killed between Orbax's commit and the checksums
        (step_dir / checkpoint_integrity.MANIFEST).unlink()
    path = _largest_state_file(step_dir) if target == "largest" else step_dir / target
    size = path.stat().st_size
    damage(path)
    now = path.stat().st_size if path.exists() else None
    ckpt = checkpointing.Checkpointer(workdir / "checkpoints")
    said = ckpt.discard_damaged("fallback")
    assert ckpt.latest_step() == 2 and len(said) == 1
    ckpt.close()
    if with_checksums:
        assert f"{path}: {expected.format(size=size, now=now)}" in said[0]
    elif target == "largest":  # without checksums, an array file's damage shows when read
        assert f"{step_dir / 'state'}: cannot be read" in said[0]
    else:
        assert f"\n  {path}: " in said[0]
    assert (workdir / "checkpoints" / "damaged" / "4").is_dir()


def test_loading_weights_from_a_damaged_run_names_the_file(runs, tmp_path):
    workdir = _copy(runs, tmp_path)
    rotten = _largest_state_file(workdir / "checkpoints" / "4")
    _flip_bytes(rotten)
    with pytest.raises(
        checkpointing.CheckpointDamagedError, match=r"(?s)init\.checkpoint.*SHA-256"
    ):
        checkpointing.find_state_dir(str(workdir), "init.checkpoint.source")


def _limit_file_size():
    """In the child: files may not grow past 256 KiB (writes past it fail with EFBIG, as on a
    full disk; Python ignores SIGXFSZ)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))


def test_a_save_that_cannot_be_written_names_the_cause_and_leaves_no_temporary_folder(
    tmp_path,
):
    args = cli(tmp_path, "train.num_steps=2", "train.checkpoint_every=1", *NO_EVAL)
    done = subprocess.run(
        args, cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size
    )
    assert done.returncode != 0
    # Orbax logs the failed write's traceback from its own thread; the run's last word names
    # the step, the file and the operating system's reason.
    message = f"error: saving the checkpoint of step 1 in {tmp_path / 'checkpoints'} failed writing"
    assert message in done.stderr
    assert "File too large; the steps saved before it are intact: []" in done.stderr
    assert not list((tmp_path / "checkpoints").glob("*orbax-checkpoint-tmp*"))
