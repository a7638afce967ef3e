"""The generic trainer: exact resume, mesh independence, restore on another mesh, freezing,
weights-only init, and the resume-after-kill path of the command line."""

from __future__ import annotations

import functools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest
from tinyconfigs import NO_EVAL, ROOT, tiny_clip

from medvlp_jax import checkpointing, train
from medvlp_jax import config as config_lib
from medvlp_jax.data import pipeline, sources, tokenize
from medvlp_jax.methods.base import SetupContext, get_method
from medvlp_jax.parallel import mesh as mesh_lib
from medvlp_jax.parallel.sharding import ACTIVATION_RULES


def _params(workdir: Path) -> dict:
    ckpt = checkpointing.Checkpointer(workdir / "checkpoints")
    step = ckpt.latest_step()
    ckpt.close()
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")


def test_resume_is_exact(tmp_path):
    """N steps, stop, resume, N more == 2N uninterrupted, bitwise."""
    common = ("optim.schedule=constant", "train.checkpoint_every=3", "train.log_every=3")
    train.run(tiny_clip(*common, "train.num_steps=6"), tmp_path / "straight")
    train.run(tiny_clip(*common, "train.num_steps=3"), tmp_path / "resumed")
    train.run(tiny_clip(*common, "train.num_steps=6"), tmp_path / "resumed")
    straight, resumed = _params(tmp_path / "straight"), _params(tmp_path / "resumed")
    assert int(straight["step"]) == int(resumed["step"]) == 6
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)


def _first_losses(config, devices, batches) -> list[float]:
    mesh = jax.make_mesh(
        mesh_lib.mesh_shape(config.mesh, len(devices)),
        mesh_lib.MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * 3,
        devices=devices,
    )
    method = get_method(config)
    method.setup(SetupContext(config, Path("/nonexistent"), mesh, None, []))
    with jax.set_mesh(mesh), nn.logical_axis_rules(ACTIVATION_RULES):
        example = mesh_lib.global_batch(mesh, batches[0])
        state, shardings, tx, lr_fn, trainable = train.create_state(config, method, mesh, example)
        step = jax.jit(
            train.make_step_fn(method, tx, lr_fn, trainable, config.optim),
            in_shardings=(shardings, train.batch_shardings(mesh, example)),
        )
        losses = []
        for batch in batches:
            state, metrics = step(state, mesh_lib.global_batch(mesh, batch))
            losses.append(float(metrics["loss"]))
    return losses


@functools.cache
def one_device_reference() -> tuple:
    """(tiny CLIP config without dropout, 3 training batches, their losses on 1 device)."""
    config = tiny_clip("mesh.data=1", "model.text.dropout_rate=0.0")
    records = sources.load_records(config.data, "train")
    tokenizer = tokenize.load_tokenizer(config.data.tokenizer)
    it = pipeline.train_iterator(config.data, records, tokenizer, seed=0)
    batches = [next(it) for _ in range(3)]
    return config, batches, _first_losses(config, jax.devices()[:1], batches)


# 8 devices as data=8, data=2 x fsdp=4, data=2 x fsdp=2 x tensor=2, and the memory-light
# (shard_map) contrastive loss on data=2 x fsdp=4.
MESHES = {
    "data8": ("mesh.data=8",),
    "data2_fsdp4": ("mesh.data=2", "mesh.fsdp=4"),
    "data2_fsdp2_tensor2": ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"),
    "memory_light": ("mesh.data=2", "mesh.fsdp=4", "model.memory_light=true"),
}


@pytest.mark.parametrize("mesh", MESHES)
def test_same_losses_on_one_and_eight_devices(mesh):
    """The first 3 losses on 8 devices laid out as `mesh` equal those on 1 device."""
    config, batches, reference = one_device_reference()
    losses = _first_losses(config_lib.apply_overrides(config, MESHES[mesh]), jax.devices(), batches)
    np.testing.assert_allclose(losses, reference, rtol=0, atol=1e-5, err_msg=mesh)
    assert len(set(reference)) == 3  # the loss moves: the steps really train


def test_restore_on_a_different_mesh(tmp_path):
    config = tiny_clip(
        "train.num_steps=2", "train.checkpoint_every=2", "mesh.data=2", "mesh.fsdp=4"
    )
    train.run(config, tmp_path)
    saved = _params(tmp_path)
    four = jax.devices()[:4]
    mesh = jax.make_mesh(
        (1, 4, 1), mesh_lib.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=four
    )
    method = get_method(config)
    method.setup(SetupContext(config, tmp_path, mesh, None, []))
    records = sources.load_records(config.data, "train")
    tokenizer = tokenize.load_tokenizer(config.data.tokenizer)
    it = pipeline.train_iterator(config.data, records, tokenizer, seed=0)
    with jax.set_mesh(mesh), nn.logical_axis_rules(ACTIVATION_RULES):
        example = mesh_lib.global_batch(mesh, train._peek(it))
        state, shardings, *_ = train.create_state(config, method, mesh, example)
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
        )
        ckpt = checkpointing.Checkpointer(tmp_path / "checkpoints")
        restored = ckpt.restore(abstract, it)
        ckpt.close()
    assert int(restored.step) == 2
    kernel = restored.params["image"]["encoder"]["layer_0"]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding.mesh.devices.size == 4
    for a, b in zip(
        jax.tree.leaves(saved["params"]), jax.tree.leaves(restored.params), strict=True
    ):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_frozen_tower_is_bit_identical_and_has_no_optimizer_state(tmp_path):
    config = tiny_clip(
        "train.num_steps=3", "train.checkpoint_every=3", "optim.groups=text/.* -> frozen"
    )
    method = get_method(config)
    train.run(config, tmp_path)
    saved = _params(tmp_path)
    # The same init (same seed) gives the starting text tower; it must not have moved.
    records = sources.load_records(config.data, "train")
    tokenizer = tokenize.load_tokenizer(config.data.tokenizer)
    it = pipeline.train_iterator(config.data, records, tokenizer, seed=0)
    mesh = mesh_lib.make_mesh(config.mesh)
    method.setup(SetupContext(config, tmp_path, mesh, tokenizer, records))
    with jax.set_mesh(mesh), nn.logical_axis_rules(ACTIVATION_RULES):
        example = mesh_lib.global_batch(mesh, train._peek(it))
        initial, *_ = train.create_state(config, method, mesh, example)
    for a, b in zip(
        jax.tree.leaves(initial.params["text"]),
        jax.tree.leaves(saved["params"]["text"]),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), b)
    moved = [
        not np.array_equal(np.asarray(a), b)
        for a, b in zip(
            jax.tree.leaves(initial.params["image"]),
            jax.tree.leaves(saved["params"]["image"]),
            strict=True,
        )
    ]
    assert any(moved)
    text_size = sum(x.size for x in jax.tree.leaves(initial.params["text"]))
    opt_size = sum(x.size for x in jax.tree.leaves(saved["opt_state"]))
    param_size = sum(x.size for x in jax.tree.leaves(initial.params))
    assert opt_size <= 2 * (param_size - text_size) + 16


def test_init_checkpoint_with_other_structure_lists_keys(tmp_path):
    train.run(tiny_clip("train.num_steps=1", "train.checkpoint_every=1"), tmp_path / "a")
    other = tiny_clip(
        "train.num_steps=1", "model.image.num_layers=3", f"init.checkpoint.source={tmp_path / 'a'}"
    )
    with pytest.raises(checkpointing.CheckpointMismatchError, match="layer_2"):
        train.run(other, tmp_path / "b")


def test_cli_writes_outputs_and_resumes_after_kill(tmp_path):
    """kill -9 mid-run, rerun: resumes from the last completed checkpoint and finishes."""
    args = [
        sys.executable,
        "-m",
        "medvlp_jax.main",
        "--config=configs/clip.py:tiny",
        f"--workdir={tmp_path}",
        "--config.train.num_steps=400",
        "--config.train.checkpoint_every=5",
        "--config.train.eval_every=1000",
        *[f"--config.{o}" for o in NO_EVAL],
    ]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not any(
        p.name.isdigit() and int(p.name) >= 10 for p in ckpts.glob("*")
    ):
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "config.json").exists()
    done = subprocess.run(
        [*args[:5], "--config.train.num_steps=30", *args[6:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    resumed_from = int(done.stdout.split("resuming from step ")[1].split()[0])
    assert resumed_from >= 10
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 30
    assert json.loads((tmp_path / "config.json").read_text())["method"] == "clip"
