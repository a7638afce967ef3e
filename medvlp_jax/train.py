"""The one generic training loop: stages -> init or restore -> steps -> eval -> save.

It knows methods only through `methods.base.Method`, and never branches on a method's name.
A run is a list of stages (`medvlp_jax.stages`; one stage unless `train.stages` names more).
Each stage builds its method from its own config, a fresh optimizer and a compiled step; the
step counter runs on across stages, and checkpoints record the stage they were written in.
"""

from __future__ import annotations

import dataclasses
import json
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
from jax.experimental import multihost_utils

from medvlp_jax import (
    batch_stats,
    checkpointing,
    console,
    evaluate,
    nonfinite,
    optim,
    preflight,
    prerequisites,
    stages,
    throughput,
    weights,
)
from medvlp_jax import config as config_lib
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

PROFILE_STEPS = 3  # steps traced by `train.profile`, after the compiling step and a warm one
STAGE_HEADER = "# stage "  # parameters.txt: one section per stage


def _peek(iterator) -> dict:
    """The next batch of a checkpointable iterator, leaving its position unchanged."""
    position = iterator.get_state()
    batch = next(iterator)
    iterator.set_state(position)
    return batch


def batch_shardings(mesh, batch: dict) -> dict:
    return {k: mesh_lib.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}


def _abstract(state, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )


def abstract_state(
    config: ml_collections.ConfigDict, method: Method, mesh, example: dict
) -> tuple[TrainState, TrainState, optax.GradientTransformation, object, object]:
    """The train state as sharded `jax.ShapeDtypeStruct`s, allocating nothing (memory
    planning, AOT compilation, restore targets). `example` may be abstract too.

    Returns (abstract state, shardings, tx, lr_fn, trainable).
    """
    rng = jax.eval_shape(jax.random.PRNGKey, config.seed)
    boxed = jax.eval_shape(method.init, rng, example)
    var_shardings = variable_shardings(boxed, mesh)
    variables = strip_boxes(boxed)
    params = variables["params"]
    rules = optim.group_rules(config.optim, method.group_rules())
    trainable = optim.trainable_mask(rules, params)
    tx, lr_fn = optim.build(config.optim, params, rules, config.train.num_steps)
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
    return _abstract(state, shardings), shardings, tx, lr_fn, trainable


def _init_keys(config) -> tuple[jax.Array, jax.Array]:
    """(parameter init key, the state's rng)."""
    return tuple(jax.random.split(jax.random.PRNGKey(config.seed)))


def _fresh_variables(method, shardings: TrainState, example, rng) -> dict:
    var_shardings = {"params": shardings.params, **shardings.model_state}
    return jax.jit(
        lambda rng, batch: strip_boxes(method.init(rng, batch)), out_shardings=var_shardings
    )(rng, example)


def _apply_loads(config, method, variables: dict, shardings: TrainState, names) -> dict:
    """`variables` with the `config.init` loads `names` applied (placed like `shardings`)."""
    loaded, summary = weights.loaded_leaves(
        config.init, weights.flatten(variables), method, weights.run_resolver(config), names
    )
    for line in summary:
        console.say(line)
    if not loaded:
        return variables
    var_shardings = {"params": shardings.params, **shardings.model_state}
    return jax.device_put(weights.overwrite(variables, loaded), var_shardings)


def _state_from_variables(variables, tx, shardings: TrainState, step, rng) -> TrainState:
    state = TrainState(
        step=step,
        params=variables["params"],
        opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(variables["params"]),
        model_state={k: v for k, v in variables.items() if k != "params"},
        rng=rng,
    )
    return jax.device_put(state, shardings)


def create_state(
    config: ml_collections.ConfigDict, method: Method, mesh, example: dict
) -> tuple[TrainState, TrainState, optax.GradientTransformation, object, object]:
    """Initialises a sharded train state and runs every `config.init` load.
    Returns (state, shardings, tx, lr_fn, trainable)."""
    _, shardings, tx, lr_fn, trainable = abstract_state(config, method, mesh, example)
    init_rng, state_rng = _init_keys(config)
    variables = _fresh_variables(method, shardings, example, init_rng)
    variables = _apply_loads(config, method, variables, shardings, None)
    state = _state_from_variables(variables, tx, shardings, jnp.zeros((), jnp.int32), state_rng)
    return state, shardings, tx, lr_fn, trainable


def carry_over(
    previous: TrainState,
    stage: stages.Stage,
    prior: ml_collections.ConfigDict,
    method,
    mesh,
    example,
) -> tuple[TrainState, TrainState, optax.GradientTransformation, object, object]:
    """The first state of `stage` from the last state of the one before (config `prior`):
    parameters and mutable collections carry over by path, those new in this stage are
    initialised, the loads this stage adds or changes run, the optimizer state is fresh."""
    config = stage.config
    _, shardings, tx, lr_fn, trainable = abstract_state(config, method, mesh, example)
    init_rng, _ = _init_keys(config)
    fresh = _fresh_variables(method, shardings, example, jax.random.fold_in(init_rng, stage.index))
    kept = weights.flatten(previous.variables())
    carried, new = 0, []
    for collection, leaves in weights.flatten(fresh).items():
        for path, leaf in leaves.items():
            old = kept.get(collection, {}).get(path)
            if old is None:
                new.append(f"{collection}/{path}")
            elif old.shape != leaf.shape:
                raise checkpointing.CheckpointMismatchError(
                    f"stage '{stage.name}' changes the shape of {collection}/{path} from "
                    f"{old.shape} to {leaf.shape}; a stage may add parameters, not reshape them"
                )
            else:
                carried += 1
    variables = jax.device_put(
        weights.overwrite(fresh, kept), {"params": shardings.params, **shardings.model_state}
    )
    variables = _apply_loads(
        config, method, variables, shardings, weights.changed_loads(prior.init, config.init)
    )
    logging.info("stage %s: %d arrays carried over, new: %s", stage.name, carried, new[:20])
    if new:
        console.say(f"stage '{stage.name}': {len(new)} new arrays initialised")
    state = _state_from_variables(variables, tx, shardings, previous.step, previous.rng)
    return state, shardings, tx, lr_fn, trainable


def make_step_fn(method: Method, tx, lr_fn, trainable, optim_cfg, stage_start: int = 0):
    """The pure train step `(state, batch) -> (state, metrics)`. Frozen parameters are passed
    through untouched, so they stay bit-identical. A step whose loss or gradient norm is not
    finite leaves the state as it was but for the step counter (`medvlp_jax.nonfinite`); its
    metrics say so (`nonfinite`, `grad_norm`). The logged `lr` is the base lr the step's
    optimizer update applies (`stage_start`: the global step the stage began at)."""

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
        stage_step = state.step - stage_start
        lr = optim.applied_lr(optim_cfg, lr_fn, stage_step)
        grad_norm = optax.tree.norm(grads)
        finite = nonfinite.step_is_finite(loss, grad_norm)
        updated = (params, opt_state, {**state.model_state, **model_state})
        params, opt_state, model_state = nonfinite.keep_if_finite(
            finite, updated, (state.params, state.opt_state, state.model_state)
        )
        metrics = {
            **metrics,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "nonfinite": (~finite).astype(jnp.int32),
        }
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state
        )
        return new_state, metrics

    return step


def jit_step(
    method: Method,
    tx,
    lr_fn,
    trainable,
    shardings: TrainState,
    example: dict,
    optim_cfg: ml_collections.ConfigDict,
    stage_start: int = 0,
):
    """The jitted train step (state donated) of `make_step_fn`, sharded like `shardings` and
    batches like `example` (arrays or `ShapeDtypeStruct`s): the one builder that training,
    the benchmarks and ahead-of-time compilation share."""
    mesh = shardings.step.mesh
    return jax.jit(
        make_step_fn(method, tx, lr_fn, trainable, optim_cfg, stage_start),
        in_shardings=(shardings, batch_shardings(mesh, example)),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=(0,),
    )


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


@dataclasses.dataclass
class RunContext:
    """What every stage of a run shares."""

    config: ml_collections.ConfigDict
    workdir: Path
    mesh: jax.sharding.Mesh
    tokenizer: object
    records: list
    ckpt: checkpointing.Checkpointer
    writer: MetricWriter
    plan: list[stages.Stage]
    stop: _StopFlag | None  # set while training (mode=eval installs no SIGTERM handler)


@dataclasses.dataclass
class StageRun:
    """Everything built once per stage: its method, compiled step, evaluator and refresher."""

    stage: stages.Stage
    method: Method
    data_iter: object
    step_fn: object
    throughput: throughput.Throughput
    evaluator: evaluate.Evaluator
    refresher: batch_stats.BatchStatsRefresher | None


def _train_iterator(ctx: RunContext, hooks, seed: int):
    return pipeline.train_iterator(
        ctx.config.data,
        ctx.records,
        ctx.tokenizer,
        seed=seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        hooks=hooks,
    )


def _write_parameter_table(ctx: RunContext, stage, method, params, trainable) -> None:
    """Writes the stage's group table to WORKDIR/parameters.txt (after the tables of the
    stages before it; a resumed stage replaces its own) and prints its totals (`trainable`:
    the stage's bool mask)."""
    rules = optim.group_rules(stage.config.optim, method.group_rules())
    path = ctx.workdir / "parameters.txt"
    if jax.process_index() == 0:
        earlier = path.read_text().split(STAGE_HEADER)[1:] if path.exists() else []
        header = f"{stage.index + 1}/{len(ctx.plan)} '{stage.name}'\n"
        sections = [*earlier[: stage.index], header + optim.group_table(rules, params)]
        path.write_text("".join(STAGE_HEADER + section for section in sections))
    total, n_trainable = optim.count_params(params, trainable)
    console.say(console.parameter_line(stage, len(ctx.plan), total, n_trainable, path))


def _check_stage_meta(ctx: RunContext, stage: stages.Stage, step: int) -> None:
    meta = ctx.ckpt.read_meta(step)
    if meta is not None and meta.get("stage") != stage.name:
        raise checkpointing.CheckpointMismatchError(
            f"the checkpoint at step {step} in {ctx.workdir / 'checkpoints'} was written in stage "
            f"{meta.get('stage')!r}, but with this config step {step} belongs to stage "
            f"{stage.name!r} (config.train.stages / config.stages.*.num_steps changed?)"
        )


def _stage_method(ctx: RunContext, config, data_state=None):
    """The stage's method (set up), its data hooks, its training iterator (at `data_state`
    when given) and an example global batch. Returns (method, hooks, iterator, example)."""
    method = get_method(config)
    method.setup(SetupContext(config, ctx.workdir, ctx.mesh, ctx.tokenizer, ctx.records))
    hooks = method.data_hooks(ctx.tokenizer)  # read-only; shared by training and refresh data
    data_iter = _train_iterator(ctx, hooks, config.seed)
    if data_state is not None:
        data_iter.set_state(data_state)
    return method, hooks, data_iter, mesh_lib.global_batch(ctx.mesh, _peek(data_iter))


def _restore(ctx: RunContext, stage, method, example, data_iter, step: int):
    """The checkpoint at `step`, written in `stage`, and the data iterator's position in place.
    Returns (state, shardings, tx, lr_fn, trainable)."""
    abstract, shardings, tx, lr_fn, trainable = abstract_state(
        stage.config, method, ctx.mesh, example
    )
    _check_stage_meta(ctx, stage, step)
    state = ctx.ckpt.restore(abstract, data_iter, step=step)
    return state, shardings, tx, lr_fn, trainable


def _start_stage(ctx: RunContext, stage, previous: TrainState | None, prior, data_state):
    """Builds the stage's method and step; returns (StageRun, its first state)."""
    config, mesh = stage.config, ctx.mesh
    method, hooks, data_iter, example = _stage_method(ctx, config, data_state)
    restore_step = ctx.ckpt.latest_step() if previous is None else None
    if previous is not None:
        state, shardings, tx, lr_fn, trainable = carry_over(
            previous, stage, prior, method, mesh, example
        )
    elif restore_step:
        state, shardings, tx, lr_fn, trainable = _restore(
            ctx, stage, method, example, data_iter, restore_step
        )
        console.say(f"resuming from step {int(state.step)} (stage '{stage.name}')")
    else:
        state, shardings, tx, lr_fn, trainable = create_state(config, method, mesh, example)
    _write_parameter_table(ctx, stage, method, state.params, trainable)
    step_jit = jit_step(method, tx, lr_fn, trainable, shardings, example, config.optim, stage.start)
    compiled = step_jit.lower(_abstract(state, shardings), example).compile()
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
            lambda: _train_iterator(ctx, hooks, config.seed + 1),
            config.train.refresh_batch_stats,
            mesh,
        )
    run = StageRun(
        stage=stage,
        method=method,
        data_iter=data_iter,
        step_fn=compiled,
        throughput=throughput.Throughput(throughput.step_flops(compiled), list(mesh.devices.flat)),
        evaluator=evaluate.Evaluator(config, method, mesh, ctx.tokenizer),
        refresher=refresher,
    )
    return run, state


def _prepare(config: ml_collections.ConfigDict, workdir: Path, announce: bool = True) -> RunContext:
    """Stages, prerequisites (trained first when `announce`, i.e. for training), mesh, data,
    metric writer and checkpointer of a run."""
    config_lib.validate(config)
    preflight.check_workdir(workdir)
    plan = stages.resolve(config)
    if announce:
        for name in _needed_prerequisites(plan):
            prerequisites.ensure(config, name)
    mesh = mesh_lib.make_mesh(config.mesh)
    mesh_lib.check_batch_divides(mesh, config.data.batch_size, "data.batch_size")
    mesh_lib.check_batch_divides(mesh, config.data.eval_batch_size, "data.eval_batch_size")
    tokenizer = tokenize.load_tokenizer(config.data.tokenizer)
    tokenize.check_vocab_fits(tokenizer, config.model)
    bad_records = BadRecordReport()
    records = sources.load_records(config.data, "train", bad_records)
    writer = MetricWriter(workdir)
    ckpt = checkpointing.Checkpointer(
        workdir / "checkpoints",
        keep=config.train.keep_checkpoints,
        best_metric=config.train.keep_best_metric,
        best_mode=config.train.keep_best_mode,
    )
    if announce:
        for line in ckpt.discard_damaged(config.train.on_bad_checkpoint):
            console.say(line)
    if announce and ckpt.latest_step() is None:  # once per run, not again on every resume
        writer.write(0, bad_records.metrics("data/train/"))
    ctx = RunContext(config, workdir, mesh, tokenizer, records, ckpt, writer, plan, None)
    if announce:
        console.say(console.startup_summary(config, mesh, plan, len(records), workdir))
    return ctx


def _needed_prerequisites(plan: list[stages.Stage]) -> list[str]:
    """The prerequisite runs some stage's `init` loads read ('run:<name>' sources)."""
    names = {
        spec.source[len(weights.RUN_PREFIX) :]
        for s in plan
        for spec in s.config.init.values()
        if spec.source.startswith(weights.RUN_PREFIX)
    }
    return sorted(names)


def run(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    """Trains `config` in `workdir` (resuming if it holds checkpoints); returns the last eval
    metrics."""
    ctx = _prepare(config, Path(workdir))
    ctx.stop = _StopFlag()
    eval_metrics: dict = {}
    try:
        with jax.set_mesh(ctx.mesh), nn.logical_axis_rules(ACTIVATION_RULES):
            eval_metrics = _run_stages(ctx)
    finally:
        ctx.stop.restore()
        ctx.ckpt.close()
        ctx.writer.close()
    return eval_metrics


def _run_stages(ctx: RunContext) -> dict:
    latest = ctx.ckpt.latest_step() or 0
    first = stages.stage_of(ctx.plan, latest)
    state, prior, data_state = None, None, None
    eval_metrics: dict = {}
    for stage in ctx.plan[first.index :]:
        run_, state = _start_stage(ctx, stage, state, prior, data_state)
        state, eval_metrics, stopped = _loop(ctx, run_, state)
        if stopped:
            break
        prior, data_state = stage.config, run_.data_iter.get_state()
    return eval_metrics


def _evaluate(
    ctx: RunContext, run_: StageRun, state, step: int, write: bool = True
) -> tuple[TrainState, dict]:
    """Refreshes batch-norm statistics if configured, runs the evaluators, prints the table
    and (when `write`) appends the metrics to metrics.jsonl."""
    if run_.refresher is not None:
        state = run_.refresher(state)
    metrics = run_.evaluator.run(state)
    if write:
        ctx.writer.write(step, metrics)
    console.say(console.metrics_table(f"evaluation at step {step}", metrics))
    return state, metrics


def _profile_window(config, step: int, first: int) -> str | None:
    """'start' before / 'stop' after the steps `train.profile` traces (PROFILE_STEPS of them,
    after the compiling step and one warm step), else None."""
    if not config.train.profile:
        return None
    if step == first + 2:
        return "start"
    if step == first + 1 + PROFILE_STEPS:
        return "stop"
    return None


def _loop(ctx: RunContext, run_: StageRun, state: TrainState) -> tuple[TrainState, dict, bool]:
    """Steps the stage from the state's step to its end; evaluates (after refreshing
    batch-norm statistics when configured) and checkpoints on schedule. Returns (the last
    state, the last eval metrics, whether a stop signal ended it)."""
    config, stage = run_.stage.config, run_.stage
    train_cfg, total = config.train, stages.total_steps(ctx.plan)
    is_last_stage = stage.index == len(ctx.plan) - 1
    first = int(state.step)
    eval_metrics: dict = {}
    tick, tick_step = time.time(), first
    stopped = False
    profiling = False
    guard = nonfinite.NonfiniteGuard(
        train_cfg.on_nonfinite, train_cfg.max_nonfinite_in_row, ctx.ckpt.last_good
    )
    for step in range(first + 1, stage.end + 1):
        window = _profile_window(config, step, first)
        if window == "start":
            jax.profiler.start_trace(str(ctx.workdir / "profile"))
            profiling = True
        batch = mesh_lib.global_batch(ctx.mesh, next(run_.data_iter))
        state, metrics = run_.step_fn(state, batch)
        guard.dispatched(step, metrics)
        if window == "stop" or (profiling and step == stage.end):
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            profiling = False
            console.say(f"profile of steps {first + 2}-{step} written to {ctx.workdir / 'profile'}")
        last = step == stage.end
        logged = step % train_cfg.log_every == 0 or last
        evaluated = step % train_cfg.eval_every == 0 or (last and is_last_stage)
        stopped = ctx.stop.should_stop(step)
        saved = step % train_cfg.checkpoint_every == 0 or last or stopped
        if logged or evaluated or saved:
            guard.flush()  # a step that is logged, evaluated or saved is checked first
        if logged:
            metrics = {f"train/{k}": v for k, v in jax.device_get(metrics).items()}
            per_step = (time.time() - tick) / max(step - tick_step, 1)
            metrics.update(run_.throughput.metrics(config.data.batch_size, per_step))
            metrics.update(guard.metrics())
            metrics.update(
                run_.data_iter.bad_record_metrics("data/train/", gather=jax.process_count() > 1)
            )
            ctx.writer.write(step, metrics)
            ctx.ckpt.poll()
            console.say(console.step_line(step, total, metrics, per_step))
            tick, tick_step = time.time(), step
        if evaluated:
            try:
                state, eval_metrics = _evaluate(ctx, run_, state, step)
            except Exception:
                if saved:  # the step's checkpoint is not lost to a failed evaluation
                    ctx.ckpt.save(state, run_.data_iter, None, stage.meta())
                raise
        if saved:
            ctx.ckpt.save(state, run_.data_iter, eval_metrics if evaluated else None, stage.meta())
        if stopped:
            break
    ctx.ckpt.wait()
    if first == stage.end and is_last_stage:
        # Nothing to train: a finished run (evaluate, log nothing new), or a 0-step one.
        fresh = ctx.ckpt.latest_step() is None
        state, eval_metrics = _evaluate(ctx, run_, state, first, write=fresh)
    return state, eval_metrics, stopped


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: Path, step: int = -1, output: str = ""
) -> dict:
    """`mode=eval`: evaluates the checkpoint of `workdir` at `step` (-1: the latest) with the
    config of the stage that wrote it; prints the metrics, appends them to metrics.jsonl and
    writes `eval_<step>.json`. With `output` (a file name) the metrics go to WORKDIR/output
    instead, and metrics.jsonl is left alone (a downstream run's final test evaluation).
    Trains nothing."""
    ctx = _prepare(config, Path(workdir), announce=False)
    try:
        if step == -1:
            for line in ctx.ckpt.discard_damaged(config.train.on_bad_checkpoint):
                console.say(line)
        available = ctx.ckpt.all_steps()
        step = ctx.ckpt.latest_step() if step == -1 else step
        if step is None or step not in available:
            raise FileNotFoundError(
                f"mode=eval: no checkpoint at step {step} in {ctx.workdir / 'checkpoints'} "
                f"(has {available}); set --config.eval_step to one of them"
            )
        ctx.ckpt.verify(step)
        stage = stages.stage_of(ctx.plan, step)
        with jax.set_mesh(ctx.mesh), nn.logical_axis_rules(ACTIVATION_RULES):
            method, _, data_iter, example = _stage_method(ctx, stage.config)
            state, *_ = _restore(ctx, stage, method, example, data_iter, step)
            console.say(f"evaluating the checkpoint at step {step} (stage '{stage.name}')")
            evaluator = evaluate.Evaluator(stage.config, method, ctx.mesh, ctx.tokenizer)
            metrics = evaluator.run(state)
        if not output:
            ctx.writer.write(step, metrics)
        if jax.process_index() == 0:
            target = ctx.workdir / (output or f"eval_{step}.json")
            target.write_text(
                json.dumps({"step": step, **metrics} if output else metrics, indent=2)
            )
        title = f"{'test ' if output else ''}evaluation at step {step}"
        console.say(console.metrics_table(title, metrics))
        return metrics
    finally:
        ctx.ckpt.close()
        ctx.writer.close()
