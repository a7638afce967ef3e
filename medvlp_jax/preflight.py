"""Checks of a run's surroundings made before any work: can the workdir hold the run?

Without them a workdir whose `checkpoints` is a file, or one this process cannot write,
shows only at the first checkpoint save, after compilation and the first steps (Orbax then
waits minutes and times out naming nothing). Config values are checked by
`medvlp_jax.config.validate`.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

CHECKPOINTS = "checkpoints"


class WorkdirError(RuntimeError):
    """The workdir or its checkpoints folder cannot hold the run; the message names the path."""


def check_workdir(workdir: str | os.PathLike) -> None:
    """Creates `workdir` if missing, then fails unless it and `workdir/checkpoints` (where it
    exists; else the workdir's check covers creating it) are folders this process can write.

    Every process of a run calls it (each writes its checkpoint shards), with a probe file
    named after the host and process, so that the calls do not race.

    Raises:
      WorkdirError: naming the path and what is wrong with it.
    """
    workdir = Path(workdir)
    _make_folder(workdir)
    _probe(workdir)
    checkpoints = workdir / CHECKPOINTS
    if checkpoints.exists() or checkpoints.is_symlink():
        _require_folder(checkpoints)
        _probe(checkpoints)


def _require_folder(path: Path) -> None:
    """Fails unless `path` is a folder (or a link to one)."""
    if path.is_symlink() and not path.exists():
        raise WorkdirError(f"{path} is a broken symbolic link (to {os.readlink(path)})")
    if not path.is_dir():
        raise WorkdirError(
            f"{path} is a file, not a folder: move it away or choose another --workdir"
        )


def _make_folder(path: Path) -> None:
    """Creates the folder `path` (and its parents) unless it exists; fails naming what blocks it."""
    if path.exists() or path.is_symlink():
        _require_folder(path)
        return
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise WorkdirError(f"cannot create {path}: {blocker} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"cannot create {path}: {e.strerror or e}") from None


def _probe(folder: Path) -> None:
    """Fails unless a file can be created, written and deleted in `folder`."""
    probe = folder / f".write_probe.{socket.gethostname()}.{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as e:
        raise WorkdirError(f"{folder} is not writable: {e.strerror or e} ({probe.name})") from None
