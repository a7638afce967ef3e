"""Orbax checkpoints of the train state together with the Grain iterator state.

Layout: `WORKDIR/checkpoints/<step>/{state,data}`. Saves are asynchronous; the newest
`keep` checkpoints are kept, plus the best one by `keep_best_metric` when set. Restores always
target the abstract, sharded state of the *current* mesh, so a checkpoint written on 8
devices restores on 4, or on another split of the axes.

Data-iterator policy: its state is restored only when the process count matches the one that
saved it (Grain stores one file per process); otherwise training goes on with a fresh iterator
at the restored step and a warning says why.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from medvlp_jax.state import TrainState


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model being restored; the message lists the keys."""


def _structure_diff(expected, found) -> str:
    """Human-readable list of paths in one tree and not the other."""
    want = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(expected)[0]}
    have = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(found)[0]}
    missing, extra = sorted(want - have), sorted(have - want)
    return f"missing from checkpoint: {missing[:20]}; unexpected in checkpoint: {extra[:20]}"


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
        self._manager = ocp.CheckpointManager(
            Path(directory).absolute(),
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
        if self.best_metric and metrics is not None and self.best_metric not in metrics:
            metrics = None
        items = dict(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
        )
        if meta is not None:
            items["meta"] = ocp.args.JsonSave(meta)
        self._manager.save(
            step,
            args=ocp.args.Composite(**items),
            metrics=metrics,
            force=True,
        )

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
        except (ValueError, KeyError) as e:
            metadata = self._manager.item_metadata(step)
            found = metadata["state"] if metadata is not None else None
            diff = _structure_diff(abstract_state, found) if found is not None else ""
            raise CheckpointMismatchError(
                f"checkpoint {self._manager.directory / str(step)} does not match this model: "
                f"{diff or e}"
            ) from e
        return restored["state"]

    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
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
    return state_dir


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
            abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)
            out[name] = _read_subtree(state_dir, item, abstract)
    return out


def _read_subtree(state_dir: Path, item: tuple[str, ...], abstract) -> object:
    """Only the subtree at `item` of a saved train state, as host numpy arrays, whatever device
    layout saved it (another process or device count: the saved shardings are not used)."""
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
