"""Evaluation protocols: pure metrics on arrays, and the evaluators `config.evals` names.

An evaluator is a module of this package, named by `config.evals.<name>.type`, with:

- `PRED: dict[str, str]`: its roles -> the predict function each uses by default ('' = the
  role is unused unless `config.evals.<name>.pred` names one); a method's predict functions
  are listed in `medvlp_jax.methods.base.Method.predict_fns`.
- `FIELDS: tuple[str, ...]`: its own config fields (all required in `config.evals.<name>`,
  besides `type`, `enabled` and the optional `pred`).
- `run(ctx, preds, cfg) -> {metric: float}`: `ctx` is the `medvlp_jax.evaluate.Evaluator`
  (records, sharded prediction helpers, `config`, `mesh`, `seed`); `preds` maps each used role
  to `batch -> jax.Array` (the method's predict function bound to the current variables);
  `cfg` is `config.evals.<name>` with `pred` resolved.
- optionally `check(cfg) -> None`, raising ValueError on a bad combination of roles/fields;
  called when the evaluators are built, before any training.

Adding an evaluator is adding a module here; nothing in the trainer changes.
"""
