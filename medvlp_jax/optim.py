"""Optimisers and learning-rate schedules from `config.optim`.

Parameters are grouped by regexes over their '/'-joined paths:
- `optim.freeze`: frozen. They get `optax.set_to_zero()` inside `optax.partition`, which holds
  no optimizer state, so a frozen tower costs no Adam moments.
- `optim.lr_multipliers`: ("regex=factor", ...) scale the schedule for matching parameters.
- `optim.no_decay`: no weight decay (biases and norm scales by default).
A method may also freeze by returning False from its `trainable` mask; both are honoured.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import jax
import ml_collections
import optax

FROZEN = "frozen"


def param_paths(params) -> object:
    """A tree like `params` whose leaves are the '/'-joined key paths ('img/blocks_0/kernel')."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path),
        params,
    )


def schedule(optim_cfg: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Warm-up (linear from `warmup_init_lr`) then constant / cosine / linear / restarts."""
    lr, warmup = optim_cfg.lr, optim_cfg.warmup_steps
    decay_steps = max(num_steps - warmup, 1)
    if optim_cfg.schedule == "constant":
        main = optax.constant_schedule(lr)
    elif optim_cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps, alpha=optim_cfg.end_lr / lr)
    elif optim_cfg.schedule == "linear":
        main = optax.linear_schedule(lr, optim_cfg.end_lr, decay_steps)
    elif optim_cfg.schedule == "cosine_restarts":
        period = optim_cfg.restart_period
        main = optax.join_schedules(
            [
                optax.cosine_decay_schedule(lr, period, alpha=optim_cfg.end_lr / lr)
                for _ in range(-(-decay_steps // period))
            ],
            boundaries=[period * (i + 1) for i in range(-(-decay_steps // period) - 1)],
        )
    else:
        raise ValueError(f"optim.schedule={optim_cfg.schedule!r} is not a known schedule")
    if warmup == 0:
        return main
    ramp = optax.linear_schedule(optim_cfg.warmup_init_lr, lr, warmup)
    return optax.join_schedules([ramp, main], [warmup])


def _base_optimizer(
    optim_cfg: ml_collections.ConfigDict, lr: optax.Schedule, decay_mask
) -> optax.GradientTransformation:
    if optim_cfg.name == "adamw":
        return optax.adamw(
            lr,
            b1=optim_cfg.b1,
            b2=optim_cfg.b2,
            eps=optim_cfg.eps,
            weight_decay=optim_cfg.weight_decay,
            mask=decay_mask,
        )
    if optim_cfg.name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(optim_cfg.weight_decay, mask=decay_mask),
            optax.sgd(lr, momentum=optim_cfg.momentum, nesterov=optim_cfg.nesterov),
        )
    raise ValueError(f"optim.name={optim_cfg.name!r}; expected 'adamw' or 'sgd'")


def _multipliers(optim_cfg) -> list[tuple[re.Pattern, float]]:
    out = []
    for item in optim_cfg.lr_multipliers:
        pattern, sep, factor = item.rpartition("=")
        if not sep:
            raise ValueError(f"optim.lr_multipliers entry {item!r} must look like 'regex=factor'")
        out.append((re.compile(pattern), float(factor)))
    return out


def param_groups(optim_cfg, params, trainable) -> object:
    """Labels every parameter: 'frozen' or 'lr_x<factor>' (first matching multiplier, else 1)."""
    freeze = [re.compile(p) for p in optim_cfg.freeze]
    multipliers = _multipliers(optim_cfg)

    def label(path: str, is_trainable: bool) -> str:
        if not is_trainable or any(p.fullmatch(path) for p in freeze):
            return FROZEN
        factor = next((f for p, f in multipliers if p.fullmatch(path)), 1.0)
        return f"lr_x{factor:g}"

    return jax.tree.map(label, param_paths(params), trainable)


def trainable_mask(optim_cfg, params, trainable) -> object:
    """The method's bool mask with the `optim.freeze` patterns applied: what really trains."""
    return jax.tree.map(lambda g: g != FROZEN, param_groups(optim_cfg, params, trainable))


def build(
    optim_cfg: ml_collections.ConfigDict, params, trainable, num_steps: int
) -> tuple[optax.GradientTransformation, Callable[[int], float]]:
    """Returns (optimizer, base learning-rate schedule) for `params`.

    `trainable` is a bool tree like `params` (the method's mask).
    """
    base_lr = schedule(optim_cfg, num_steps)
    no_decay = [re.compile(p) for p in optim_cfg.no_decay]
    decay_mask = jax.tree.map(
        lambda path: not any(p.fullmatch(path) for p in no_decay), param_paths(params)
    )
    groups = param_groups(optim_cfg, params, trainable)
    transforms = {FROZEN: optax.set_to_zero()}
    for group in set(jax.tree.leaves(groups)) - {FROZEN}:
        factor = float(group.removeprefix("lr_x"))
        transforms[group] = _base_optimizer(
            optim_cfg, lambda step, f=factor: f * base_lr(step), decay_mask
        )
    tx = optax.partition(transforms, groups)
    if optim_cfg.clip_grad_norm > 0:
        # Zero frozen gradients first: they must not count in the norm, and unused they are
        # never computed (XLA drops the frozen tower's backward pass).
        frozen = jax.tree.map(lambda group: group == FROZEN, groups)
        tx = optax.chain(
            optax.masked(optax.set_to_zero(), frozen),
            optax.clip_by_global_norm(optim_cfg.clip_grad_norm),
            tx,
        )
    if optim_cfg.grad_accum_steps > 1:
        tx = optax.MultiSteps(
            tx, every_k_schedule=optim_cfg.grad_accum_steps
        ).gradient_transformation()
    return tx, base_lr
