"""Issue case 5: config values are checked before any work, and the error names the field.

`config.validate` is the one entry (main and the downstream CLI call it before the
distributed start-up, mesh, data or compilation); its tables must match the modules that read
the fields, and every pattern must name a field some config has.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from tinyconfigs import ROOT, tiny, tiny_clip

from medvlp_jax import config as config_lib

CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.py") if p.stem != "replay")


def _error(config, *overrides: str) -> str:
    """The ConfigError message `validate` gives `config` with `overrides` applied."""
    with pytest.raises(config_lib.ConfigError) as caught:
        config_lib.validate(config_lib.apply_overrides(config, list(overrides)))
    return str(caught.value)


def test_misspelt_bad_record_policy_is_rejected():
    message = _error(tiny_clip(), "data.on_bad_record=skipp")
    assert message == "config.data.on_bad_record='skipp'; expected one of ('skip', 'error')"


@pytest.mark.parametrize(
    "field", ["log_every", "eval_every", "checkpoint_every", "keep_checkpoints"]
)
def test_zero_interval_is_rejected(field):
    assert _error(tiny_clip(), f"train.{field}=0") == f"config.train.{field}=0; expected >= 1"


def test_negative_num_steps_is_rejected_and_zero_means_evaluate_only():
    message = _error(tiny_clip(), "train.num_steps=-3")
    assert message.startswith("config.train.num_steps=-3; expected >= 0 (0: train nothing")
    config_lib.validate(tiny_clip("train.num_steps=0"))


@pytest.mark.parametrize("field", ["batch_size", "eval_batch_size"])
def test_negative_batch_size_names_the_field(field):
    assert _error(tiny_clip(), f"data.{field}=-4") == f"config.data.{field}=-4; expected >= 1"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.lr=0.0", "config.optim.lr=0.0; expected > 0"),
        ("optim.b2=1.0", "config.optim.b2=1.0; expected a number in [0, 1)"),
        ("data.label_fraction=0.0", "config.data.label_fraction=0.0; expected a number in (0, 1]"),
        ("data.num_workers=-1", "config.data.num_workers=-1; expected >= 0"),
        ("mesh.fsdp=0", "config.mesh.fsdp=0; expected -1 or >= 1"),
        ("data.source=mimic_cxr", "config.data.source='mimic_cxr'; expected one of"),
        ("evals.retrieval.max_examples=0", "config.evals.retrieval.max_examples=0; expected"),
        ("model.loss=siglpi", "config.model.loss='siglpi'; expected one of ('clip', 'siglip')"),
    ],
)
def test_other_bounds_and_choices(override, expected):
    assert _error(tiny_clip(), override).startswith(expected)


def test_stage_sets_and_prerequisite_runs_are_checked_with_their_path():
    prior = tiny("prior")
    first = prior.train.stages[0]
    message = _error(prior, f"stages.{first}.set.optim.lr=-1.0")
    assert message == f"config.stages.{first}.set.optim.lr=-1.0; expected > 0"
    assert _error(prior, f"stages.{first}.num_steps=0").startswith(
        f"config.stages.{first}.num_steps=0; expected >= 1"
    )
    mcpl = tiny("mcpl")
    message = _error(mcpl, "prerequisites.backbone.data.on_bad_record=skipp")
    assert message.startswith("config.prerequisites.backbone.data.on_bad_record='skipp'")


def test_method_fields_are_checked_where_the_method_has_them():
    assert "orth_batch" not in tiny_clip().model  # skipped, not a KeyError
    config_lib.validate(tiny_clip())
    message = _error(tiny("mflag"), "model.orth_batch=per_gpu")
    assert message == "config.model.orth_batch='per_gpu'; expected one of ('global', 'per_device')"


def test_choices_match_the_modules_that_read_them():
    from medvlp_jax import checkpointing, nonfinite
    from medvlp_jax.data import bad_records, images, sources, tables, transforms
    from medvlp_jax.downstream.method import TASKS
    from medvlp_jax.evaluation.classification import LABEL_MODES, SPLITS
    from medvlp_jax.methods import clip, mflag
    from medvlp_jax.methods.mcpl.model import KEYWORD_SOURCES, PROMPT_CONFIGS
    from medvlp_jax.models import batch_norm, builders, layers, prompt_pool, two_tower, vit
    from medvlp_jax.parallel import mesh

    owners = {
        "data.source": sources.SOURCES,
        "data.uncertain_policy": transforms.UNCERTAIN_POLICIES,
        "data.on_bad_record": bad_records.POLICIES,
        "data.image_check": images.IMAGE_CHECKS,
        "data.on_bad_csv": tables.CSV_POLICIES,
        "mesh.strategy": ("", *mesh.STRATEGIES),
        "evals.*.split": SPLITS,
        "evals.*.label_mode": LABEL_MODES,
        "downstream.task": TASKS,
        "downstream.label_mode": LABEL_MODES,
        "train.compute_dtype": builders.DTYPES,
        "model.image.name": builders.IMAGE_TOWERS,
        "model.text.name": builders.TEXT_TOWERS,
        "model.*.layout": vit.LAYOUTS,
        "model.*.stem": vit.STEMS,
        "model.*.activation": layers.ACTIVATIONS,
        "model.*.dtype": (builders.FOLLOW, *builders.DTYPES),
        "model.*.param_dtype": builders.DTYPES,
        "model.*.bn_stats": batch_norm.BN_STATS,
        "model.bn_stats": batch_norm.BN_STATS,
        "model.loss": clip.LOSSES,
        "model.text_pooling": two_tower.TEXT_POOLING,
        "model.orth_batch": mflag.ORTH_BATCH,
        "model.prompt_config": PROMPT_CONFIGS,
        "model.eval_image_keywords": KEYWORD_SOURCES,
        "model.prompt_similarity": prompt_pool.SIMILARITIES,
        "train.on_nonfinite": nonfinite.POLICIES,
        "train.on_bad_checkpoint": checkpointing.BAD_CHECKPOINT_POLICIES,
    }
    for path, owned in owners.items():
        assert set(config_lib.CHOICES[path]) == set(owned), path


def _pattern(path: str) -> re.Pattern:
    """A CHOICES/RANGES path as a regex (`*`: any one key)."""
    parts = ("[^.]+" if part == "*" else re.escape(part) for part in path.split("."))
    return re.compile(r"\.".join(parts))


def test_every_config_validates_and_every_pattern_names_a_field():
    unused = {path: _pattern(path) for path in (*config_lib.CHOICES, *config_lib.RANGES)}
    for file in CONFIGS:
        for spec in (str(file), f"{file}:tiny"):
            config = config_lib.load_config_file(spec)
            config_lib.validate(config)
            for leaf in config_lib.leaf_paths(config):
                unused = {p: r for p, r in unused.items() if not r.fullmatch(leaf)}
    assert not unused, f"CHOICES/RANGES paths that no config has: {sorted(unused)}"


def test_downstream_cli_config_is_validated(tmp_path):
    from medvlp_jax.downstream import runner

    (tmp_path / "config.json").write_text(config_lib.to_json(tiny_clip()))
    with pytest.raises(config_lib.ConfigError, match=re.escape("config.data.batch_size=-2")):
        runner.build_config("classification:tiny", tmp_path, 1.0, ["data.batch_size=-2"])


def test_cli_fails_before_any_work_naming_the_field(tmp_path):
    workdir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "medvlp_jax.main",
            "--config=configs/clip.py:tiny",
            f"--workdir={workdir}",
            "--config.data.batch_size=-4",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert "config error: config.data.batch_size=-4; expected >= 1" in result.stderr
    assert not workdir.exists()  # nothing ran: no workdir, no config.json
