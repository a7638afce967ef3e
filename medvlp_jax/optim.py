"""Optimisers and learning-rate schedules from `config.optim`, and the parameter-group table.

Parameters are grouped by ONE ordered table of rows over their '/'-joined paths
(`param_paths`), first match wins (big_vision's `config.schedule`):

    "REGEX -> frozen"            no update, no optimizer state (`optax.set_to_zero()`)
    "REGEX -> lr=F"              the schedule times F
    "REGEX -> lr=F wd=G"         ... and the weight decay times G (either may be left out: 1)

REGEX fullmatches the path. The method's rows (`Method.group_rules()`: what defines the method,
e.g. M-FLAG's frozen language model) come first, then `config.optim.groups`; parameters no row
matches train at lr x1, wd x1. `optim.no_decay` (biases, norm scales) is applied on top. A
config row that takes no parameter is an error, so a misspelt regex cannot silently do nothing.

Steps: `num_steps` counts train steps; with `optim.grad_accum_steps = k` the optimizer updates
every k of them, and the schedule (including `warmup_steps` and `restart_period`) counts those
`num_updates` optimizer updates.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np
import optax

from medvlp_jax.config import ConfigError

FROZEN = "frozen"
ARROW = "->"


@dataclasses.dataclass(frozen=True)
class Group:
    """How one parameter trains: frozen, or lr / weight-decay multipliers of the base values.

    `rule` is the text of the row that matched it (None: no row did, lr x1 wd x1).
    """

    frozen: bool = False
    lr: float = 1.0
    wd: float = 1.0
    rule: str | None = None

    def describe(self) -> str:
        return FROZEN if self.frozen else f"lr x{self.lr:g} wd x{self.wd:g}"


DEFAULT_GROUP = Group()


@dataclasses.dataclass(frozen=True)
class Rule:
    """One parsed row: parameters whose path fullmatches `pattern` get `group`.

    `where` names the row in messages ('optim.groups[1]', 'method row 0'); `required`
    (config rows) means taking no parameter is an error.
    """

    pattern: re.Pattern
    group: Group
    where: str
    required: bool


def param_paths(params) -> object:
    """A tree like `params` whose leaves are the '/'-joined key paths ('img/blocks_0/kernel').

    Attribute keys (the `.value` of a Flax `Partitioned` box) are left out, so boxed and
    unboxed trees have the same paths.
    """

    def join(path, _) -> str:
        keys = [k for k in path if not isinstance(k, jax.tree_util.GetAttrKey)]
        return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys)

    return jax.tree_util.tree_map_with_path(join, params)


def _multiplier(option: str, value: str, fail: Callable[[str], ConfigError]) -> float:
    try:
        factor = float(value)
    except ValueError:
        raise fail(f"{option}={value!r} is not a number") from None
    if not math.isfinite(factor) or factor < 0:
        raise fail(f"{option}={value!r} must be a finite number >= 0")
    return factor


def _parse_options(options: list[str], text: str, fail) -> Group:
    """The options after the arrow -> Group; 'frozen' stands alone, lr= / wd= at most once."""
    if options == [FROZEN]:
        return Group(frozen=True, rule=text)
    if not options:
        raise fail("expected 'frozen', 'lr=F' and/or 'wd=G' after '->'")
    factors = {}
    for option in options:
        name, sep, value = option.partition("=")
        if not sep or name not in ("lr", "wd"):
            raise fail(f"unknown option {option!r}; expected 'frozen', 'lr=F' or 'wd=G'")
        if name in factors:
            raise fail(f"{name} is given twice")
        factors[name] = _multiplier(name, value, fail)
    return Group(lr=factors.get("lr", 1.0), wd=factors.get("wd", 1.0), rule=text)


def parse_rule(text: str, where: str, required: bool) -> Rule:
    """Parses one row "REGEX -> frozen | lr=F [wd=G]"; ConfigError names `where` and `text`."""

    def fail(why: str) -> ConfigError:
        return ConfigError(f"{where} = {text!r}: {why}")

    if not isinstance(text, str):
        raise fail("a row must be a string 'REGEX -> frozen' or 'REGEX -> lr=F wd=G'")
    regex, sep, options = text.rpartition(ARROW)
    regex = regex.strip()
    if not sep or not regex:
        raise fail("expected 'REGEX -> frozen' or 'REGEX -> lr=F wd=G'")
    try:
        pattern = re.compile(regex)
    except re.error as e:
        raise fail(f"bad regex {regex!r}: {e}") from None
    return Rule(pattern, _parse_options(options.split(), text, fail), where, required)


def group_rules(optim_cfg: ml_collections.ConfigDict, method_rules: Sequence[str]) -> list[Rule]:
    """The ordered table: the method's rows, then `optim_cfg.groups`, parsed and validated."""
    rules = [parse_rule(t, f"method row {i}", required=False) for i, t in enumerate(method_rules)]
    rules += [
        parse_rule(t, f"optim.groups[{i}]", required=True) for i, t in enumerate(optim_cfg.groups)
    ]
    return rules


def _winner(rules: Sequence[Rule], path: str) -> Rule | None:
    return next((r for r in rules if r.pattern.fullmatch(path)), None)


def _check_required(rules: Sequence[Rule], paths: list[str], winners: list[Rule | None]) -> None:
    """Fails on a config row that takes no parameter: it matches none, or only ones that
    earlier rows took."""
    for rule in rules:
        if not rule.required or any(w is rule for w in winners):
            continue
        shadowing = {
            w.where for p, w in zip(paths, winners, strict=True) if rule.pattern.fullmatch(p)
        }
        earlier = ", ".join(sorted(shadowing))
        why = (
            f"every parameter it matches is taken by an earlier row ({earlier})"
            if shadowing
            else "it matches no parameter path (paths look like 'img/blocks_0/kernel')"
        )
        raise ConfigError(f"{rule.where} = {rule.group.rule!r} takes no parameter: {why}")


def param_groups(rules: Sequence[Rule], params) -> object:
    """A tree like `params` of `Group`s: each parameter's first matching row (else lr x1 wd x1).

    Raises ConfigError when a config row takes no parameter.
    """
    paths_tree = param_paths(params)
    paths, treedef = jax.tree.flatten(paths_tree)
    winners = [_winner(rules, p) for p in paths]
    _check_required(rules, paths, winners)
    return jax.tree.unflatten(treedef, [DEFAULT_GROUP if w is None else w.group for w in winners])


def trainable_mask(rules: Sequence[Rule], params) -> object:
    """Bool tree like `params`: False where a row freezes the parameter."""
    return jax.tree.map(lambda g: not g.frozen, param_groups(rules, params))


def _size(x) -> int:
    return int(np.prod(getattr(x, "shape", ())))


def count_params(params, trainable) -> tuple[int, int]:
    """(total, trainable) element counts of `params`; `trainable` is a bool tree like it."""
    sizes = [_size(x) for x in jax.tree.leaves(params)]
    flags = jax.tree.leaves(trainable)
    return sum(sizes), sum(s for s, t in zip(sizes, flags, strict=True) if t)


def group_table(rules: Sequence[Rule], params) -> str:
    """One line per parameter (path, shape, size, group, matching row), then the totals."""
    groups = jax.tree.leaves(param_groups(rules, params))
    paths = jax.tree.leaves(param_paths(params))
    leaves = jax.tree.leaves(params)
    rows = [("path", "shape", "size", "group", "row")]
    for path, leaf, group in zip(paths, leaves, groups, strict=True):
        shape = str(tuple(getattr(leaf, "shape", ())))
        rows.append((path, shape, f"{_size(leaf):,}", group.describe(), group.rule or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4] for r in rows]
    total, trainable = count_params(params, trainable_mask(rules, params))
    frozen = total - trainable
    lines.append(
        f"trainable {total - frozen:,} of {total:,} parameters "
        f"({100.0 * (total - frozen) / max(total, 1):.1f}%); frozen {frozen:,}"
    )
    return "\n".join(lines) + "\n"


def num_updates(optim_cfg: ml_collections.ConfigDict, num_steps: int) -> int:
    """Optimizer updates in `num_steps` train steps: `num_steps // optim.grad_accum_steps`."""
    k = optim_cfg.grad_accum_steps
    if k < 1:
        raise ConfigError(f"optim.grad_accum_steps={k}; must be >= 1")
    if num_steps % k:
        raise ConfigError(
            f"optim.grad_accum_steps={k} does not divide the {num_steps} train steps "
            "(an unfinished accumulation would never be applied)"
        )
    return num_steps // k


def applied_lr(optim_cfg: ml_collections.ConfigDict, lr_fn: optax.Schedule, step) -> jax.Array:
    """The base lr that the update accumulated at train step `step` (0-based count of train
    steps already taken) applies: `lr_fn(step // grad_accum_steps)`. Works on traced steps."""
    return lr_fn(step // optim_cfg.grad_accum_steps)


def schedule(optim_cfg: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Warm-up (linear from `warmup_init_lr`) then constant / cosine / linear / restarts, over
    `num_steps` optimizer updates."""
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
    optim_cfg: ml_collections.ConfigDict, lr: optax.Schedule, weight_decay: float, decay_mask
) -> optax.GradientTransformation:
    if optim_cfg.name == "adamw":
        return optax.adamw(
            lr,
            b1=optim_cfg.b1,
            b2=optim_cfg.b2,
            eps=optim_cfg.eps,
            weight_decay=weight_decay,
            mask=decay_mask,
        )
    if optim_cfg.name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(weight_decay, mask=decay_mask),
            optax.sgd(lr, momentum=optim_cfg.momentum, nesterov=optim_cfg.nesterov),
        )
    raise ValueError(f"optim.name={optim_cfg.name!r}; expected 'adamw' or 'sgd'")


def _label(group: Group) -> str:
    """The `optax.partition` label of a group: groups with equal multipliers share one."""
    if group.frozen:
        return FROZEN
    return f"lr_x{group.lr:g}" + ("" if group.wd == 1.0 else f"_wd_x{group.wd:g}")


def build(
    optim_cfg: ml_collections.ConfigDict, params, rules: Sequence[Rule], num_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns (optimizer, base learning-rate schedule) for `params` grouped by `rules`.

    `num_steps` counts the train steps of the run (or stage); the schedule `lr_fn(u)` is the
    base lr at optimizer update u, over `num_updates(optim_cfg, num_steps)` updates (log
    `applied_lr` per train step). Frozen parameters hold no optimizer state.
    """
    base_lr = schedule(optim_cfg, num_updates(optim_cfg, num_steps))
    no_decay = [re.compile(p) for p in optim_cfg.no_decay]
    decay_mask = jax.tree.map(
        lambda path: not any(p.fullmatch(path) for p in no_decay), param_paths(params)
    )
    groups = param_groups(rules, params)
    labels = jax.tree.map(_label, groups)
    transforms = {FROZEN: optax.set_to_zero()}
    for group in jax.tree.leaves(groups):
        label = _label(group)
        if label not in transforms:
            lr = lambda step, f=group.lr: f * base_lr(step)
            wd = optim_cfg.weight_decay * group.wd
            transforms[label] = _base_optimizer(optim_cfg, lr, wd, decay_mask)
    tx = optax.partition(transforms, labels)
    if optim_cfg.clip_grad_norm > 0:
        # Zero frozen gradients first: they must not count in the norm, and unused they are
        # never computed (XLA drops the frozen tower's backward pass).
        frozen = jax.tree.map(lambda g: g.frozen, groups)
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
