"""Issue case 1: a non-finite loss or gradient is never applied, never saved, never scored.

The step-level guard is checked on a one-parameter model against hand-computed updates; the
policies end to end on the tiny CLIP config, whose loss goes NaN within a few steps at
`optim.lr=1e9`."""

from __future__ import annotations

import json
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from tinyconfigs import tiny_clip

from medvlp_jax import checkpointing, evaluate, nonfinite, train
from medvlp_jax.state import TrainState


class _Quadratic:
    """loss = sum(x * w^2): NaN whenever the batch holds a NaN."""

    def loss(self, variables, batch, rng, train):
        return jnp.sum(batch["x"] * variables["params"]["w"] ** 2), {}, {}


def _step_and_state():
    tx = optax.sgd(0.1)
    params = {"w": jnp.array([1.0, 2.0])}
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        model_state={},
        rng=jax.random.PRNGKey(0),
    )
    optim_cfg = ml_collections.ConfigDict({"grad_accum_steps": 1})
    step = train.make_step_fn(_Quadratic(), tx, lambda s: 0.1, {"w": True}, optim_cfg)
    return jax.jit(step), state


def test_a_nonfinite_step_leaves_the_state_as_it_was():
    step, state = _step_and_state()
    state, metrics = step(state, {"x": jnp.array([1.0, 1.0])})
    # d/dw sum(w^2) = 2w; sgd(0.1): w - 0.2 w = 0.8 w.
    np.testing.assert_allclose(state.params["w"], [0.8, 1.6], rtol=1e-6)
    assert int(metrics["nonfinite"]) == 0
    np.testing.assert_allclose(metrics["grad_norm"], np.hypot(2.0, 4.0), rtol=1e-6)
    after, metrics = step(state, {"x": jnp.array([np.nan, 1.0])})
    assert int(metrics["nonfinite"]) == 1
    assert int(after.step) == 2  # the counter moves on: the next batch is a new one
    np.testing.assert_array_equal(after.params["w"], state.params["w"])
    after, metrics = step(after, {"x": jnp.array([np.inf, 1.0])})  # inf loss, nan gradient
    assert int(metrics["nonfinite"]) == 1
    np.testing.assert_array_equal(after.params["w"], state.params["w"])


def _flag(value: int) -> dict:
    return {
        "nonfinite": np.int32(value),
        "loss": np.float32("nan" if value else 1.0),
        "grad_norm": 1.0,
    }


def test_skip_counts_and_stops_after_too_many_in_a_row():
    guard = nonfinite.NonfiniteGuard("skip", 2, lambda: "the last good checkpoint is step 3")
    for step, value in enumerate([0, 1, 1, 0, 1, 1], start=1):
        guard.dispatched(step, _flag(value))
    guard.flush()
    assert guard.skipped == 4 and guard.in_row == 2
    assert guard.metrics() == {"train/nonfinite_skipped": 4}
    guard.dispatched(7, _flag(1))
    with pytest.raises(nonfinite.NonFiniteError, match=r"3 steps in a row .* at step 7"):
        guard.flush()


def test_stop_names_the_step_the_metric_and_the_last_checkpoint():
    guard = nonfinite.NonfiniteGuard("stop", 10, lambda: "the last good checkpoint is step 3")
    guard.dispatched(4, _flag(0))
    guard.dispatched(5, _flag(1))  # step 4 is read here, step 5 is not yet
    with pytest.raises(
        nonfinite.NonFiniteError,
        match=r"at step 5 the training loss is nan .*the last good checkpoint is step 3",
    ):
        guard.flush()


def _saved_leaves(workdir: Path) -> dict[int, list[np.ndarray]]:
    root = workdir / "checkpoints"
    return {
        int(p.name): jax.tree.leaves(ocp.StandardCheckpointer().restore(p / "state"))
        for p in root.iterdir()
        if p.name.isdigit()
    }


_DIVERGES = ("optim.lr=1e9", "optim.clip_grad_norm=0", "optim.schedule=constant")


def test_stop_policy_exits_naming_the_step_and_saves_nothing_nonfinite(tmp_path):
    config = tiny_clip(*_DIVERGES, "train.num_steps=30", "train.checkpoint_every=1")
    with pytest.raises(nonfinite.NonFiniteError) as raised:
        train.run(config, tmp_path)
    message = str(raised.value)
    bad_step = int(message.split("at step ")[1].split()[0])
    assert "nothing non-finite was saved" in message
    saved = _saved_leaves(tmp_path)
    assert saved and max(saved) <= bad_step
    assert f"step {max(saved)} (" in message
    for leaves in saved.values():
        assert all(np.isfinite(x).all() for x in leaves if np.issubdtype(x.dtype, np.floating))


def test_skip_policy_drops_steps_and_stops_after_n_in_a_row(tmp_path):
    config = tiny_clip(
        *_DIVERGES,
        "train.num_steps=40",
        "train.checkpoint_every=1",
        "train.log_every=1",
        "train.on_nonfinite=skip",
        "train.max_nonfinite_in_row=3",
    )
    with pytest.raises(nonfinite.NonFiniteError, match=r"4 steps in a row"):
        train.run(config, tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line) for line in lines]
    skipped = [m["train/nonfinite_skipped"] for m in logged if "train/nonfinite_skipped" in m]
    assert skipped[-1] == 3  # the step that ends the run is not logged
    for leaves in _saved_leaves(tmp_path).values():
        assert all(np.isfinite(x).all() for x in leaves if np.issubdtype(x.dtype, np.floating))


def test_keep_best_never_keeps_a_nonfinite_metric(tmp_path):
    ckpt = checkpointing.Checkpointer(tmp_path, keep=1, best_metric="eval/x", best_mode="max")
    iterator = iter(grain.MapDataset.range(4).to_iter_dataset())
    for step, value in ((1, 0.5), (2, float("nan")), (3, 0.1)):
        state = TrainState(
            step=jnp.array(step, jnp.int32),
            params={"w": jnp.ones(2)},
            opt_state=(),
            model_state={},
            rng=jax.random.PRNGKey(0),
        )
        ckpt.save(state, iterator, {"eval/x": value})
    ckpt.wait()
    assert ckpt.all_steps() == [1, 3]  # the best (0.5) and the latest; never the NaN one
    ckpt.close()


def test_evaluation_refuses_nonfinite_predictions():
    out = {"image": np.array([[1.0, 0.0], [np.nan, 1.0]]), "labels": np.full((2, 14), np.nan)}
    with pytest.raises(
        nonfinite.NonFiniteError,
        match=r"'image' predictions hold 1 non-finite values \(rows \[1\] of 2\)",
    ):
        evaluate._check_finite(out, {"image": None, "labels": None})
    out["image"][1, 0] = 0.5
    assert evaluate._check_finite(out, {"image": None, "labels": None}) is out
