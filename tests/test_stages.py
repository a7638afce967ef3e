"""Training stages: config checks, and a two-stage tiny run stopped at the boundary and
mid-stage that resumes into the right stage with a fresh optimizer state, carries the shared
parameters over bit-identically, initialises the new ones, and ends where an uninterrupted run
ends, bitwise."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tinyconfigs import NO_EVAL, ROOT

from medvlp_jax import checkpointing, stages, train
from medvlp_jax import config as config_lib
from medvlp_jax.config import ConfigError


def two_stage_clip(*overrides: str):
    """Stage 'a' (4 steps): text tower frozen. Stage 'b' (4 steps): SigLIP's loss, which adds
    the learnable logit bias (a parameter new in 'b'), image tower frozen, another lr."""
    config = config_lib.load_config_file(str(ROOT / "configs/clip.py:tiny"))
    config.train.stages = ("a", "b")
    config.train.num_steps = 0
    config.stages.a = stages.stage(4, optim=dict(groups=("text/.* -> frozen",), lr=1e-3))
    config.stages.b = stages.stage(
        4,
        optim=dict(groups=("image/.* -> frozen",), lr=5e-4, schedule="constant"),
        model=dict(loss="siglip"),
    )
    return config_lib.apply_overrides(
        config,
        [*NO_EVAL, "train.checkpoint_every=100", "train.log_every=2", *overrides],
    )


def _saved(workdir: Path, step: int) -> dict:
    return ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")


def _stop_at(monkeypatch, step: int) -> None:
    """The next `train.run` stops (saving a checkpoint) after `step`, as on SIGTERM."""
    monkeypatch.setattr(train._StopFlag, "should_stop", lambda self, s: s == step)


def _assert_equal_trees(a, b) -> None:
    for (path, x), y in zip(
        jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def test_resolve_lays_stages_end_to_end():
    plan = stages.resolve(two_stage_clip())
    assert [(s.name, s.start, s.end) for s in plan] == [("a", 0, 4), ("b", 4, 8)]
    assert plan[0].config.optim.lr == 1e-3 and plan[1].config.optim.lr == 5e-4
    assert plan[1].config.model.loss == "siglip" and plan[0].config.model.loss == "clip"
    assert plan[1].config.optim.groups == ("image/.* -> frozen",)
    assert [stages.stage_of(plan, s).name for s in (0, 1, 4, 5, 8)] == ["a", "a", "a", "b", "b"]


def test_one_stage_configs_are_one_stage_named_main():
    config = config_lib.load_config_file(str(ROOT / "configs/clip.py:tiny"))
    (only,) = stages.resolve(config)
    assert (only.name, only.start, only.end) == ("main", 0, config.train.num_steps)
    assert only.config is config


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: setattr(c.train, "stages", ("a", "c")), "config.stages lacks"),
        (lambda c: setattr(c.train, "num_steps", 7), "add up to 8"),
        (lambda c: setattr(c.stages.a, "num_steps", 0), r"config.stages.a.num_steps=0"),
        (lambda c: c.stages.a.set.update({"data": {"batch_size": 8}}), "cannot change data"),
        (lambda c: c.stages.b.set.optim.update({"lrr": 1.0}), r"optim.lrr.*did you mean"),
    ],
)
def test_bad_stage_configs_fail_naming_the_field(edit, message):
    config = two_stage_clip()
    edit(config)
    with pytest.raises(ConfigError, match=message):
        stages.resolve(config)


def test_stopped_at_the_boundary_and_mid_stage_resumes_exactly(tmp_path, monkeypatch):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.run(two_stage_clip(), straight)

    _stop_at(monkeypatch, 4)  # the last step of stage 'a'
    train.run(two_stage_clip(), resumed)
    assert checkpointing.Checkpointer(resumed / "checkpoints").latest_step() == 4
    boundary = _saved(resumed, 4)
    _stop_at(monkeypatch, 6)  # mid-way through stage 'b'
    train.run(two_stage_clip(), resumed)
    monkeypatch.undo()
    train.run(two_stage_clip(), resumed)

    # The checkpoints say which stage wrote them.
    ckpt = checkpointing.Checkpointer(resumed / "checkpoints")
    assert ckpt.read_meta(4)["stage"] == "a"
    assert ckpt.read_meta(6)["stage"] == "b"
    assert ckpt.read_meta(8) == {"stage": "b", "stage_index": 1, "stage_start": 4}
    ckpt.close()

    # One group table per stage, however often the run resumed.
    table = (resumed / "parameters.txt").read_text()
    assert table.count("# stage ") == 2
    assert table.index("# stage 1/2 'a'") < table.index("# stage 2/2 'b'")
    assert "text/.* -> frozen" in table and "image/.* -> frozen" in table

    final = _saved(resumed, 8)
    _assert_equal_trees(_saved(straight, 8), final)
    # Stage 'b' adds SigLIP's bias; stage 'a' had none.
    assert "bias" not in boundary["params"] and "bias" in final["params"]
    # Shared parameters carried over bit-identically: the image tower, frozen in 'b', is
    # exactly what stage 'a' ended with.
    _assert_equal_trees(boundary["params"]["image"], final["params"]["image"])
    assert not np.array_equal(
        boundary["params"]["text"]["encoder"]["layer_0"]["mlp"]["fc1"]["kernel"],
        final["params"]["text"]["encoder"]["layer_0"]["mlp"]["fc1"]["kernel"],
    )
    # A fresh optimizer state in 'b': Adam has counted its 4 updates, not 8, and holds moments
    # for the text tower (frozen in 'a') but none for the image tower (frozen in 'b').
    counts = {
        int(x)
        for path, x in jax.tree_util.tree_flatten_with_path(final["opt_state"])[0]
        if "count" in jax.tree_util.keystr(path)
    }
    assert counts == {4}, counts
    n_text = sum(x.size for x in jax.tree.leaves(final["params"]["text"]))
    n_image = sum(x.size for x in jax.tree.leaves(final["params"]["image"]))
    n_opt_a = sum(x.size for x in jax.tree.leaves(boundary["opt_state"]))
    n_opt_b = sum(x.size for x in jax.tree.leaves(final["opt_state"]))
    assert n_opt_b - n_opt_a == pytest.approx(2 * (n_text - n_image), abs=64)


def test_resume_refuses_a_checkpoint_from_another_stage_plan(tmp_path, monkeypatch):
    _stop_at(monkeypatch, 4)
    train.run(two_stage_clip(), tmp_path)
    monkeypatch.undo()
    # Now step 4 falls in stage 'b': the checkpoint, written in 'a', must not load as 'b'.
    changed = two_stage_clip("stages.a.num_steps=3", "stages.b.num_steps=5")
    with pytest.raises(checkpointing.CheckpointMismatchError, match="written in stage 'a'"):
        train.run(changed, tmp_path)
