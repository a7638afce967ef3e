"""The one generic training loop: init -> restore -> steps -> eval -> save.

It knows methods only through `methods.base.Method`, and never branches on a method's name.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import parameter_overview
from jax.experimental import multihost_utils

from medvlp_jax import batch_stats, checkpointing, evaluate, optim
from medvlp_jax.data import pipeline, sources, tokenize
from medvlp_jax.data.bad_records import BadRecordReport
from medvlp_jax.methods.base import Method, SetupContext, get_method
from medvlp_jax.metric_writer import MetricWriter
from medvlp_jax.parallel import distributed
from medvlp_jax.parallel import mesh as mesh_lib
from medvlp_jax.parallel.sharding import (
    ACTIVATION_RULES,
    replicated,
    shardings_like_params,
    strip_boxes,
    variable_shardings,
)
from medvlp_jax.state import TrainState


@dataclasses.dataclass
class Trainer:
    """Everything built once per run: the state, its shardings and the compiled step."""

    state: TrainState
    shardings: TrainState
    step_fn: object
    lr_fn: object


def _peek(iterator) -> dict:
    """The next batch of a checkpointable iterator, leaving its position unchanged."""
    position = iterator.get_state()
    batch = next(iterator)
    iterator.set_state(position)
    return batch


def batch_shardings(mesh, batch: dict) -> dict:
    return {k: mesh_lib.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}


def abstract_state(
    config: ml_collections.ConfigDict, method: Method, mesh, example: dict
) -> tuple[TrainState, TrainState, optax.GradientTransformation, object, object]:
    """The train state as sharded `jax.ShapeDtypeStruct`s, allocating nothing (memory
    planning, AOT compilation). `example` may be abstract too.

    Returns (abstract state, shardings, tx, lr_fn, trainable).
    """
    rng = jax.eval_shape(jax.random.PRNGKey, config.seed)
    boxed = jax.eval_shape(method.init, rng, example)
    var_shardings = variable_shardings(boxed, mesh)
    variables = strip_boxes(boxed)
    params = variables["params"]
    trainable = optim.trainable_mask(config.optim, params, method.trainable(params))
    tx, lr_fn = optim.build(config.optim, params, trainable, config.train.num_steps)
    opt_state = jax.eval_shape(tx.init, params)
    shardings = TrainState(
        step=replicated(mesh),
        params=var_shardings["params"],
        opt_state=shardings_like_params(opt_state, params, var_shardings["params"], mesh),
        model_state={k: var_shardings[k] for k in variables if k != "params"},
        rng=replicated(mesh),
    )
    state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params,
        opt_state=opt_state,
        model_state={k: v for k, v in variables.items() if k != "params"},
        rng=rng,
    )
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )
    return abstract, shardings, tx, lr_fn, trainable


def create_state(
    config: ml_collections.ConfigDict, method: Method, mesh, example: dict
) -> tuple[TrainState, TrainState, optax.GradientTransformation, object, object]:
    """Initialises a sharded train state. Returns (state, shardings, tx, lr_fn, trainable)."""
    _, shardings, tx, lr_fn, trainable = abstract_state(config, method, mesh, example)
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    var_shardings = {"params": shardings.params, **shardings.model_state}
    variables = jax.jit(
        lambda rng, batch: strip_boxes(method.init(rng, batch)), out_shardings=var_shardings
    )(init_rng, example)
    variables = jax.device_put(method.load_pretrained(variables), var_shardings)
    if config.init.checkpoint:
        # Weights, and the running statistics of batch norms when the model has them.
        loaded = checkpointing.load_variables(config.init.checkpoint, variables)
        variables = {**variables, **jax.device_put(loaded, {k: var_shardings[k] for k in loaded})}
        logging.info("loaded weights from %s", config.init.checkpoint)

    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(variables["params"]),
        model_state={k: v for k, v in variables.items() if k != "params"},
        rng=state_rng,
    )
    return jax.device_put(state, shardings), shardings, tx, lr_fn, trainable


def make_step_fn(method: Method, tx, lr_fn, trainable):
    """The pure train step `(state, batch) -> (state, metrics)`. Frozen parameters are passed
    through untouched, so they stay bit-identical."""

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            variables = {"params": params, **state.model_state}
            loss, metrics, new_model_state = method.loss(variables, batch, rng, train=True)
            return loss, (metrics, new_model_state)

        (loss, (metrics, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = jax.tree.map(
            lambda p, u, t: optax.apply_updates(p, u) if t else p, state.params, updates, trainable
        )
        metrics = {**metrics, "loss": loss, "lr": lr_fn(state.step)}
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            model_state={**state.model_state, **model_state},
        )
        return new_state, metrics

    return step


class _StopFlag:
    """SIGTERM: the loop saves a checkpoint after the current step and returns.

    In a `jax.distributed` job JAX's preemption notifier owns SIGTERM, and
    `reached_preemption_sync_point` returns True on every process at the same step, so all of
    them save that step together (a per-process flag could send one process into the
    checkpoint's collectives while another runs the next step). Otherwise a signal handler
    sets a flag. Call `should_stop(step)` once per step, on every process.
    """

    def __init__(self):
        self._raised = False
        self._distributed = distributed.is_initialized()
        if not self._distributed:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM: saving a checkpoint after this step, then stopping")
        self._raised = True

    def should_stop(self, step: int) -> bool:
        if self._distributed and multihost_utils.reached_preemption_sync_point(step):
            logging.warning(
                "preemption notice: saving a checkpoint at step %d, then stopping", step
            )
            return True
        return self._raised

    def restore(self):
        if not self._distributed:
            signal.signal(signal.SIGTERM, self._previous)


def _log_overview(params, trainable) -> None:
    total = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    n_train = sum(
        int(np.prod(p.shape))
        for p, t in zip(jax.tree.leaves(params), jax.tree.leaves(trainable), strict=True)
        if t
    )
    logging.info("parameters:\n%s", parameter_overview.get_parameter_overview(params))
    logging.info(
        "trainable %d of %d parameters (%.1f%%); frozen %d",
        n_train,
        total,
        100.0 * n_train / max(total, 1),
        total - n_train,
    )


def run(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    """Trains `config` in `workdir` (resuming if it holds checkpoints); returns the last eval
    metrics."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = mesh_lib.make_mesh(config.mesh)
    mesh_lib.check_batch_divides(mesh, config.data.batch_size, "data.batch_size")
    mesh_lib.check_batch_divides(mesh, config.data.eval_batch_size, "data.eval_batch_size")
    method = get_method(config)
    tokenizer = tokenize.load_tokenizer(config.data.tokenizer)
    bad_records = BadRecordReport()
    records = sources.load_records(config.data, "train", bad_records)
    method.setup(SetupContext(config, workdir, mesh, tokenizer, records))
    hooks = method.data_hooks(tokenizer)  # read-only; shared by the training and refresh data

    def make_train_iterator(seed: int):
        return pipeline.train_iterator(
            config.data,
            records,
            tokenizer,
            seed=seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            hooks=hooks,
        )

    data_iter = make_train_iterator(config.seed)
    writer = MetricWriter(workdir)
    writer.write(0, bad_records.metrics("data/train/"))
    ckpt = checkpointing.Checkpointer(
        workdir / "checkpoints",
        keep=config.train.keep_checkpoints,
        best_metric=config.train.keep_best_metric,
    )
    evaluator = evaluate.Evaluator(config, method, mesh, tokenizer)
    with jax.set_mesh(mesh), nn.logical_axis_rules(ACTIVATION_RULES):
        example = _peek(data_iter)
        example = mesh_lib.global_batch(mesh, example)
        state, shardings, tx, lr_fn, trainable = create_state(config, method, mesh, example)
        _log_overview(state.params, trainable)
        if ckpt.latest_step() is not None:
            abstract = jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
            )
            state = ckpt.restore(abstract, data_iter)
            logging.info("resumed from step %d (%s)", int(state.step), ckpt.latest_step())
            print(f"resuming from step {int(state.step)}", flush=True)
        step_fn = jax.jit(
            make_step_fn(method, tx, lr_fn, trainable),
            in_shardings=(shardings, batch_shardings(mesh, example)),
            out_shardings=(shardings, replicated(mesh)),
            donate_argnums=(0,),
        )
        refresher = None
        if config.train.refresh_batch_stats and state.model_state.get("batch_stats"):
            refresh_step = jax.jit(
                batch_stats.make_refresh_step(method),
                in_shardings=(shardings, batch_shardings(mesh, example)),
                out_shardings=shardings,
                donate_argnums=(0,),
            )
            refresher = batch_stats.BatchStatsRefresher(
                refresh_step,
                lambda: make_train_iterator(config.seed + 1),
                config.train.refresh_batch_stats,
                mesh,
            )
        metrics = _loop(config, state, step_fn, data_iter, mesh, ckpt, writer, evaluator, refresher)
    ckpt.close()
    writer.close()
    return metrics


def _loop(config, state, step_fn, data_iter, mesh, ckpt, writer, evaluator, refresher=None) -> dict:
    """Steps from the state's step to `train.num_steps`; evaluates (after refreshing batch-norm
    statistics when `refresher` is given) and checkpoints on schedule."""
    train_cfg = config.train
    num_steps = train_cfg.num_steps
    first = int(state.step)
    stop = _StopFlag()
    eval_metrics: dict = {}
    tick, tick_step = time.time(), first
    try:
        for step in range(first + 1, num_steps + 1):
            batch = mesh_lib.global_batch(mesh, next(data_iter))
            state, metrics = step_fn(state, batch)
            if step % train_cfg.log_every == 0 or step == num_steps:
                metrics = jax.device_get(metrics)
                elapsed = time.time() - tick
                per_step = elapsed / max(step - tick_step, 1)
                metrics = {f"train/{k}": v for k, v in metrics.items()}
                metrics["train/examples_per_s"] = config.data.batch_size / max(per_step, 1e-9)
                writer.write(step, metrics)
                print(
                    f"step {step}/{num_steps} loss {float(metrics['train/loss']):.4f} "
                    f"{metrics['train/examples_per_s']:.1f} ex/s "
                    f"ETA {per_step * (num_steps - step):.0f}s",
                    flush=True,
                )
                tick, tick_step = time.time(), step
            last = step == num_steps
            evaluated = step % train_cfg.eval_every == 0 or last
            if evaluated:
                if refresher is not None:
                    state = refresher(state)
                eval_metrics = evaluator.run(state)
                writer.write(step, eval_metrics)
            stopping = stop.should_stop(step)
            if step % train_cfg.checkpoint_every == 0 or last or stopping:
                ckpt.save(state, data_iter, eval_metrics if evaluated else None)
            if stopping:
                break
    finally:
        stop.restore()
        ckpt.wait()
    if first == num_steps:
        eval_metrics = evaluator.run(state)
    return eval_metrics
