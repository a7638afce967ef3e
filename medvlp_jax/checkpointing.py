"""Orbax checkpoints of the train state together with the Grain iterator state.

Layout: `WORKDIR/checkpoints/<step>/{state,data}`. Saves are asynchronous; the newest
`keep` checkpoints are kept, plus the best one by `keep_best_metric` when set. Restores always
target the abstract, sharded state of the *current* mesh, so a checkpoint written on 8
devices restores on 4, or on another split of the axes.

Data-iterator policy: its state is restored only when the process count matches the one that
saved it (Grain stores one file per process); otherwise training goes on with a fresh iterator
at the restored step and a warning says why.

Integrity (`medvlp_jax.checkpoint_integrity`): once a save is on disk, its files' checksums
are written into the step folder. Before a run resumes, `discard_damaged` checks the newest
steps against them: a damaged or incomplete step is named file by file and moved aside to
`checkpoints/damaged/<step>` (policy "fallback"), so the previous complete step restores,
or the run stops (policy "error"). A save that fails (a full disk) is reported with its
cause, and its temporary folder removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from medvlp_jax import checkpoint_integrity as integrity
from medvlp_jax.state import TrainState

BAD_CHECKPOINT_POLICIES = ("fallback", "error")
DAMAGED = "damaged"  # checkpoints/damaged/<step>: steps moved aside by `discard_damaged`


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model being restored; the message lists the keys."""


class CheckpointDamagedError(OSError):
    """A checkpoint step is damaged or incomplete; the message names its files."""


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed (e.g. a full disk); the message names the cause."""


def _write_failure(exc: BaseException) -> tuple[int | None, str, str] | None:
    """(errno, reason, file) of the operating-system error behind a failed save, from the
    first OSError in `exc`'s chain or the `os_error_code` TensorStore puts in its messages;
    None when the failure is not the file system's."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError):
            return exc.errno, exc.strerror or str(exc), exc.filename or ""
        code = re.search(r"os_error_code='?(\d+)", str(exc))
        if code:
            file = re.search(r'Failed writing: "([^"]+)"', str(exc)) or re.search(
                r'local file "([^"]+)"', str(exc)
            )
            number = int(code.group(1))
            return number, os.strerror(number), file.group(1) if file else ""
        exc = exc.__cause__ or exc.__context__
    return None


def _structure_diff(expected, found) -> str:
    """The paths in one tree and not the other, and the shapes that differ ('' if none)."""

    def shapes(tree):
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(p): tuple(getattr(x, "shape", ())) for p, x in leaves}

    want, have = shapes(expected), shapes(found)
    missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    reshaped = [
        f"{k} {have[k]} (model {want[k]})" for k in sorted(want) if have.get(k, want[k]) != want[k]
    ]
    parts = [
        f"{what}: {items[:20]}"
        for what, items in (
            ("missing from checkpoint", missing),
            ("unexpected in checkpoint", extra),
            ("other shapes in checkpoint", reshaped),
        )
        if items
    ]
    return "; ".join(parts)


class Checkpointer:
    """Saves and restores (TrainState, data iterator) pairs in `directory`."""

    def __init__(
        self,
        directory: Path,
        *,
        keep: int = 3,
        best_metric: str = "",
        best_mode: str = "max",
    ):
        policies = [ocp.checkpoint_managers.LatestN(keep)]
        if best_metric:
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=lambda metrics: metrics[best_metric],
                    reverse=best_mode == "min",
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        self.best_metric = best_metric
        self.directory = Path(directory).absolute()
        self._unsealed: list[int] = []  # saved steps whose checksums are not written yet
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
                enable_async_checkpointing=True,
                create=True,
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(
        self,
        state: TrainState,
        data_iterator,
        metrics: dict | None = None,
        meta: dict | None = None,
    ) -> None:
        """Starts an async save of `state`, the iterator's position at `state.step` and `meta`
        (a small JSON dict: the training stage)."""
        step = int(jax.device_get(state.step))
        if self.best_metric and metrics is not None:
            value = metrics.get(self.best_metric)
            if value is None or not np.isfinite(value):
                metrics = None  # never a candidate for the best checkpoint
        items = dict(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
        )
        if meta is not None:
            items["meta"] = ocp.args.JsonSave(meta)
        with self._reporting_save_errors(step):
            # Orbax finishes the save before this one first: seal those steps.
            self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
        self._seal(self._unsealed)
        self._unsealed = [step]

    def poll(self) -> None:
        """Writes the checksums of a save that has finished in the background (cheap)."""
        if self._unsealed and not self._manager.is_saving_in_progress():
            self.wait()

    def _seal(self, steps: list[int]) -> None:
        """Writes the checksums of `steps` (saved and on disk) that are still there."""
        if jax.process_index() != 0:
            return
        for step in steps:
            step_dir = self.directory / str(step)
            if step_dir.is_dir() and not integrity.has_manifest(step_dir):
                integrity.write_manifest(step_dir)

    @contextlib.contextmanager
    def _reporting_save_errors(self, step: int):
        """Turns a failed write into a `CheckpointSaveError` naming its cause, and removes the
        half-written temporary folders (a full disk, a read-only or vanished folder)."""
        try:
            yield
        except Exception as e:
            failure = _write_failure(e)
            if failure is None:
                raise
            for tmp in self.directory.glob("*.orbax-checkpoint-tmp*"):
                shutil.rmtree(tmp, ignore_errors=True)
            number, reason, file = failure
            hint = " (free some space)" if number in (errno.ENOSPC, errno.EDQUOT) else ""
            where = f" writing {file}" if file else ""
            failed = re.search(r"/(\d+)\.orbax-checkpoint-tmp", file)  # an earlier async save
            step = int(failed.group(1)) if failed else step
            raise CheckpointSaveError(
                f"saving the checkpoint of step {step} in {self.directory} failed{where}: "
                f"{reason}{hint}; the steps saved before it are intact: {self.all_steps()}"
            ) from e

    def last_good(self) -> str:
        """Where the newest complete checkpoint is, in words (waits for pending saves)."""
        self.wait()
        step = self.latest_step()
        if step is None:
            return f"no checkpoint was saved yet in {self.directory}"
        return f"the last good checkpoint is step {step} ({self.directory / str(step)})"

    def discard_damaged(self, policy: str) -> list[str]:
        """Checks the newest steps, newest first, until one is whole. A damaged one raises
        `CheckpointDamagedError` (policy "error") or is moved to `checkpoints/damaged/<step>`
        ("fallback"). Returns one console line per step moved aside."""
        if policy not in BAD_CHECKPOINT_POLICIES:
            raise ValueError(
                f"config.train.on_bad_checkpoint={policy!r}; expected one of "
                f"{BAD_CHECKPOINT_POLICIES}"
            )
        said = []
        for step in reversed(self.all_steps()):
            step_dir = self.directory / str(step)
            found = integrity.problems(step_dir)
            if not found and not integrity.has_manifest(step_dir):
                found = _read_problems(step_dir)  # no checksums: read it to know
            if not found:
                break
            if policy == "error":
                raise CheckpointDamagedError(
                    _damage_report(self.directory / str(step), found)
                    + "\n(train.on_bad_checkpoint=fallback restores the previous complete step)"
                )
            said.append(self._move_aside(step, found))
        if said:
            self._manager.reload()
        return said

    def _move_aside(self, step: int, found: list[str]) -> str:
        source = self.directory / str(step)
        target = self.directory / DAMAGED / str(step)
        if jax.process_index() == 0:
            target.parent.mkdir(exist_ok=True)
            n = 1
            while target.exists():
                target, n = self.directory / DAMAGED / f"{step}.{n}", n + 1
            shutil.move(source, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
        return (
            f"{_damage_report(source, found)}\n  moved to {target}; resuming from the step before"
        )

    def verify(self, step: int) -> None:
        """Raises `CheckpointDamagedError` naming the files when `step` is not whole."""
        found = integrity.problems(self.directory / str(step))
        if found:
            raise CheckpointDamagedError(_damage_report(self.directory / str(step), found))

    def read_meta(self, step: int) -> dict | None:
        """The `meta` dict saved with `step` (None for checkpoints written without one)."""
        if not (self._manager.directory / str(step) / "meta").is_dir():
            return None
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def restore(self, abstract_state: TrainState, data_iterator, step: int | None = None):
        """Restores the train state (sharded like `abstract_state`) and, when the process count
        matches, the data iterator in place. Returns the state."""
        step = self.latest_step() if step is None else step
        data_dir = self._manager.directory / str(step) / "data"
        wanted = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if (data_dir / wanted).exists():
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        else:
            saved = sorted(p.name for p in data_dir.glob("process_*.json"))
            logging.warning(
                "data iterator state not restored: the checkpoint at step %d holds %s, this run "
                "has %d process(es); continuing with a fresh iterator",
                step,
                saved,
                jax.process_count(),
            )
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            raise self._restore_error(step, abstract_state, e) from e
        return restored["state"]

    def _restore_error(self, step: int, abstract_state, error: Exception) -> Exception:
        """Why restoring `step` failed: another model's checkpoint (the paths that differ),
        or a step whose files cannot be read."""
        step_dir = self.directory / str(step)
        try:
            found = self._manager.item_metadata(step)["state"]
        except Exception:  # unreadable metadata: the step is damaged, not another model's
            found = None
        diff = _structure_diff(abstract_state, found) if found is not None else ""
        if diff:
            return CheckpointMismatchError(
                f"checkpoint {step_dir} does not match this model: {diff}"
            )
        return CheckpointDamagedError(
            f"checkpoint {step_dir} cannot be read: {type(error).__name__}: {_first_line(error)}"
        )

    def wait(self) -> None:
        """Blocks until pending async saves are on disk, then writes their checksums."""
        step = self._unsealed[-1] if self._unsealed else -1
        with self._reporting_save_errors(step):
            self._manager.wait_until_finished()
        self._seal(self._unsealed)
        self._unsealed = []

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()


def find_state_dir(path: str, what: str) -> Path:
    """The `state/` folder of the latest step under `path` (a workdir, its `checkpoints/`
    folder or one step's folder); `what` names the config field in errors."""
    root = Path(path).expanduser().absolute()
    for candidate in (root / "checkpoints", root):
        steps = [p for p in candidate.iterdir() if p.name.isdigit()] if candidate.is_dir() else []
        if steps:
            root = max(steps, key=lambda p: int(p.name))
            break
    state_dir = root / "state"
    if not state_dir.is_dir():
        raise FileNotFoundError(f"{what}: no checkpoint state under {root}")
    found = integrity.problems(root)
    if found:
        raise CheckpointDamagedError(f"{what}: {_damage_report(root, found)}")
    return state_dir


def _read_problems(step_dir: Path) -> list[str]:
    """Reads every array of a step's saved state (to host memory, then drops them): one line
    naming the folder and the error when it cannot be read, else none."""
    state_dir = step_dir / "state"
    try:
        with _absl_errors_only():
            saved = ocp.StandardCheckpointer().metadata(state_dir).item_metadata
            _read_subtree(state_dir, (), _abstract(saved))
    except Exception as e:  # whatever TensorStore raises for a damaged file
        return [f"{state_dir}: cannot be read ({type(e).__name__}: {_first_line(e)})"]
    return []


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else ""


def _damage_report(step_dir: Path, found: list[str]) -> str:
    lines = "\n  ".join(found[:10]) + (f"\n  ... {len(found) - 10} more" if len(found) > 10 else "")
    return f"checkpoint {step_dir} is damaged or incomplete:\n  {lines}"


# Where each loadable Flax variable collection lives in a saved train state.
VARIABLE_ITEMS = {"params": ("params",), "batch_stats": ("model_state", "batch_stats")}


@contextlib.contextmanager
def _absl_errors_only():
    """Keeps absl log lines below ERROR (Orbax's) quiet while active."""
    previous = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        logging.set_verbosity(previous)


def read_variables(state_dir: Path) -> dict:
    """The loadable collections ('params', 'batch_stats') of a saved train state, as host
    numpy arrays, whatever device layout saved them."""
    with _absl_errors_only():  # Orbax warns that an item folder has no step metadata
        saved = ocp.StandardCheckpointer().metadata(state_dir).item_metadata
    out = {}
    for name, item in VARIABLE_ITEMS.items():
        tree = saved
        for key in item:
            tree = tree[key] if tree is not None and key in tree else None
        if tree:
            out[name] = _read_subtree(state_dir, item, _abstract(tree))
    return out


def _abstract(saved) -> object:
    """Orbax array metadata -> `jax.ShapeDtypeStruct`s of the same tree."""
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved)


def _read_subtree(state_dir: Path, item: tuple[str, ...], abstract) -> object:
    """Only the subtree at `item` (() for all of it) of a saved train state, as host numpy
    arrays, whatever device layout saved it (another process or device count: the saved
    shardings are not used)."""
    tree = abstract
    for key in reversed(item):
        tree = {key: tree}
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = ocp.PyTreeCheckpointer().restore(
        state_dir,
        args=ocp.args.PyTreeRestore(item=tree, restore_args=as_numpy, partial_restore=True),
    )
    for key in item:
        restored = restored[key]
    return restored
