"""Downstream tasks: target geometry, dense losses and heads, the downstream method over every
method's encoder, and the runner (`python -m medvlp_jax.downstream`) on `:tiny` presets."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tinyconfigs import tiny

from medvlp_jax import config as config_lib
from medvlp_jax import optim, train
from medvlp_jax.data import pipeline, sources, tokenize
from medvlp_jax.data.records import FIVE_CLASSES
from medvlp_jax.data.synthcxr import BOXES_CSV, read_masks
from medvlp_jax.downstream import runner
from medvlp_jax.downstream.method import TASKS, Downstream
from medvlp_jax.downstream.targets import (
    BoxTargets,
    MaskTargets,
    draw_gaussian,
    gaussian_radius,
    read_boxes,
)
from medvlp_jax.evaluation import classification
from medvlp_jax.evaluation.dense_metrics import detection_map
from medvlp_jax.evaluation.detection import split_rows
from medvlp_jax.losses.dense import centernet_focal_loss, masked_l1, soft_dice_loss
from medvlp_jax.models import dense_heads
from medvlp_jax.parallel.sharding import strip_boxes

METHODS = ("clip", "mflag", "prior", "ptunifier", "mcpl")


def _tree_config():
    """The tiny SynthCXR data config (200 studies, 64 px tree) at the tree's own size."""
    data = tiny("clip").data
    data.image_size = 64
    data.augment.enabled = False
    return data


# --- targets --------------------------------------------------------------------------


def test_masks_are_the_tree_masks_at_the_tree_size():
    data = _tree_config()
    record = sources.load_records(data, "validate")[0]
    masks = MaskTargets(FIVE_CLASSES, 64)(record)["masks"]
    stem = record.image_path.rsplit(".", 1)[0]
    truth = read_masks(stem + "_mask.png")
    assert masks.shape == (64, 64, 5) and masks.dtype == np.uint8
    for k, name in enumerate(FIVE_CLASSES):
        want = truth.get(name, np.zeros((64, 64), bool))
        np.testing.assert_array_equal(masks[..., k], want.astype(np.uint8))
    half = MaskTargets(FIVE_CLASSES, 32)(record)["masks"]  # nearest at pixel centres
    np.testing.assert_array_equal(half, masks[1::2, 1::2])


def test_perfect_centernet_outputs_decode_to_the_true_boxes():
    """Targets -> the outputs a perfect head would give -> decode -> mAP 1 at every IoU
    threshold, and the decoded boxes are the csv's boxes (same pixels at the tree size)."""
    data = _tree_config()
    root = sources.synthcxr_root(data)
    boxes = read_boxes(str(root / BOXES_CSV), FIVE_CLASSES)
    hook = BoxTargets(boxes, 5, 64, out_stride=4, max_boxes=16)
    records = [r for r in sources.load_records(data, "train") if r.image_path]
    records = [r for r in records if boxes.get(r.image_path.rsplit("/", 1)[1][:-4])][:12]
    assert len(records) >= 8
    pairs = [(r, hook(r)) for r in records]
    pairs = [(r, x) for r, x in pairs if x["center_mask"].sum() == x["box_valid"].sum()]
    assert len(pairs) >= 6  # kept: no two boxes share a centre cell
    records, t = [r for r, _ in pairs], [x for _, x in pairs]
    batch = {k: jnp.asarray(np.stack([x[k] for x in t])) for k in t[0]}
    outputs = {
        "heatmap": jnp.where(batch["heatmap"] == 1.0, 30.0, -30.0),
        "size": batch["size"],
        "offset": batch["offset"],
    }
    dets = dense_heads.decode_centernet(outputs, top_k=16, out_stride=4)
    packed = np.concatenate(
        [dets["boxes"], dets["scores"][..., None], dets["classes"][..., None]], axis=-1
    )
    valid = np.asarray(batch["box_valid"], np.float32)[..., None]
    targets = np.concatenate([batch["boxes"], valid, batch["box_classes"][..., None]], -1)
    preds, truths = split_rows(np.asarray(packed), targets)
    for p in preds:  # keep the confident detections (the rest score sigmoid(-30))
        keep = p["scores"] > 0.5
        p.update(boxes=p["boxes"][keep], scores=p["scores"][keep], classes=p["classes"][keep])
    result = detection_map(preds, truths, 5, (0.5, 0.95))
    assert result["map@0.5"] == pytest.approx(1.0) and result["map@0.95"] == pytest.approx(1.0)
    first = records[0].image_path.rsplit("/", 1)[1][:-4]
    want = sorted(tuple(b[1:]) for b in boxes[first])
    got = sorted(tuple(np.round(b, 3)) for b in truths[0]["boxes"])
    np.testing.assert_allclose(got, want, atol=1e-3)


@pytest.mark.parametrize("h, w", [(10.0, 10.0), (4.0, 20.0), (33.0, 7.5)])
def test_gaussian_radius_keeps_the_overlap_in_all_three_cases(h, w):
    r = gaussian_radius(h, w, 0.7)
    shrunk = (h - 2 * r) * (w - 2 * r) / (h * w)
    grown = h * w / ((h + 2 * r) * (w + 2 * r))
    inter = (h - r) * (w - r)
    shifted = inter / (2 * h * w - inter)
    assert min(shrunk, grown, shifted) >= 0.7 - 1e-9
    assert math.isclose(min(shrunk, grown, shifted), 0.7, rel_tol=1e-6)  # the tightest case


def test_draw_gaussian_peaks_at_one_and_clips_at_the_border():
    heat = np.zeros((6, 6), np.float32)
    draw_gaussian(heat, 0, 5, 2)
    assert heat[5, 0] == 1.0 and heat.max() == 1.0
    sigma = 5 / 6
    assert heat[5, 1] == pytest.approx(math.exp(-1 / (2 * sigma**2)))
    assert heat[2, 0] == 0.0  # beyond the radius
    draw_gaussian(heat, 0, 5, 2)  # max-blend: unchanged
    assert heat[5, 0] == 1.0


def test_too_many_boxes_names_the_field():
    data = _tree_config()
    record = sources.load_records(data, "train")[0]
    stem = record.image_path.rsplit("/", 1)[1][:-4]
    hook = BoxTargets({stem: [(0, 1, 1, 5, 5)] * 3}, 5, 64, 4, max_boxes=2)
    with pytest.raises(ValueError, match=re.escape("downstream.max_boxes")):
        hook(record)


# --- losses and heads -------------------------------------------------------------------


def test_dense_losses_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 5, 3)).astype(np.float32)
    masks = (rng.random((2, 5, 5, 3)) > 0.6).astype(np.float32)
    p = 1 / (1 + np.exp(-logits))
    axes = (0, 1, 2)  # batch Dice: per class over every image's pixels
    dice = (2 * (p * masks).sum(axes) + 1) / (p.sum(axes) + masks.sum(axes) + 1)
    assert float(soft_dice_loss(logits, masks)) == pytest.approx(1 - dice.mean(), rel=1e-5)

    heat = rng.random((2, 5, 5, 3)).astype(np.float32) * 0.9
    heat[0, 1, 2, 0] = heat[1, 4, 4, 2] = 1.0
    want = 0.0
    for idx in np.ndindex(heat.shape):
        q, y = p[idx], heat[idx]
        want += -((1 - q) ** 2) * np.log(q) if y == 1 else -((1 - y) ** 4) * q**2 * np.log(1 - q)
    got = float(centernet_focal_loss(logits, heat))
    assert got == pytest.approx(want / 2, rel=1e-4)

    pred, target = rng.normal(size=(2, 5, 5, 2)), rng.normal(size=(2, 5, 5, 2))
    mask = np.zeros((2, 5, 5))
    mask[0, 1, 2] = mask[1, 3, 3] = 1
    want = (np.abs(pred - target)[mask > 0]).sum() / 2
    assert float(masked_l1(pred, target, mask)) == pytest.approx(want, rel=1e-5)


def test_decode_suppresses_a_neighbouring_weaker_peak():
    heat = np.full((1, 8, 8, 2), -10.0, np.float32)
    heat[0, 3, 3, 1], heat[0, 3, 4, 1], heat[0, 6, 1, 0] = 3.0, 2.0, 1.0
    outputs = {
        "heatmap": heat,
        "size": np.full((1, 8, 8, 2), 2.0),
        "offset": np.zeros((1, 8, 8, 2)),
    }
    dets = dense_heads.decode_centernet(outputs, top_k=2, out_stride=4)
    np.testing.assert_array_equal(dets["classes"][0], [1, 0])
    np.testing.assert_allclose(dets["boxes"][0, 0], [8, 8, 16, 16])  # centre (3, 3) * 4 +- 4
    assert float(dets["scores"][0, 1]) == pytest.approx(1 / (1 + math.exp(-1.0)))


@pytest.mark.parametrize(
    "shapes", [[(16, 16, 8), (8, 8, 16), (4, 4, 32), (2, 2, 64)], [(4, 4, 32)]]
)
def test_heads_reach_the_output_stride_from_any_pyramid(shapes):
    pyramid = tuple(jnp.ones((2, *s)) for s in shapes)
    seg = dense_heads.SegmentationHead(3, width=8)
    out = jax.eval_shape(lambda: seg.init_with_output(jax.random.PRNGKey(0), pyramid, 64)[0])
    assert out.shape == (2, 64, 64, 3)
    det = dense_heads.CenterNetHead(3, width=8)
    out = jax.eval_shape(lambda: det.init_with_output(jax.random.PRNGKey(0), pyramid, 64)[0])
    assert {k: v.shape for k, v in out.items()} == {
        "heatmap": (2, 16, 16, 3),
        "size": (2, 16, 16, 2),
        "offset": (2, 16, 16, 2),
    }


# --- evaluator metrics ------------------------------------------------------------------


def test_classification_metrics_multiclass_and_binary_by_hand():
    names = ["a", "b", "c"]
    labels = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 0, 1]], np.float32)
    mask = np.ones_like(labels)
    mask[4, 0] = 0  # row 4: a class unknown -> left out
    logits = np.array([[3, 0, 0], [0, 2, 0], [2, 0, 1], [0, 0, 0], [0, 0, 5]], np.float32)
    out = classification.metrics(logits, labels, mask, names, "multiclass")
    # rows 0-2 are used (row 3 has two positives): predicted a, b, a vs a, b, c
    assert out["rows"] == 3 and out["accuracy"] == pytest.approx(2 / 3)
    # F1: a = 2*1/(2+1) = 2/3, b = 1, c = 0 -> mean 5/9
    assert out["f1"] == pytest.approx(5 / 9)

    logits = np.array([[2.0], [-1.0], [0.5], [-3.0]])
    labels = np.array([[1.0], [1.0], [0.0], [0.0]])
    out = classification.metrics(logits, labels, np.ones_like(labels), ["x"], "multilabel")
    assert out["accuracy"] == pytest.approx(0.5) and out["f1"] == pytest.approx(0.5)
    assert out["auroc"] == pytest.approx(0.75) and out["auroc/x"] == pytest.approx(0.75)


def test_best_step_is_chosen_on_the_validate_metric_only(tmp_path):
    rows = [
        {"step": 2, "eval/synthcxr/auroc": float("nan")},
        {"step": 4, "eval/synthcxr/auroc": 0.7, "test/auroc": 0.1},
        {"step": 6, "eval/synthcxr/auroc": 0.9},
        {"step": 8, "eval/synthcxr/auroc": 0.9},
        {"step": 10, "eval/synthcxr/auroc": 0.95},  # deleted checkpoint
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert runner.best_step(tmp_path, "eval/synthcxr/auroc", [2, 4, 6, 8]) == 6
    assert runner.best_step(tmp_path, "eval/synthcxr/auroc", [2, 4]) == 4
    assert runner.best_step(tmp_path, "eval/synthcxr/auroc", [2, 4, 6, 8], "min") == 4
    with pytest.raises(RuntimeError, match="no eval/synthcxr/dice"):
        runner.best_step(tmp_path, "eval/synthcxr/dice", [2])


# --- the method over every encoder --------------------------------------------------------


def _downstream(method: str, task: str, *overrides: str):
    config = config_lib.load_config_file(f"{runner.CONFIGS}/{task}.py:tiny")
    encoder = tiny(method)
    for key in ("image_size", "channels", "mean", "std", "max_text_len", "synthcxr", "cache_dir"):
        config.data[key] = encoder.data[key]
    config.downstream.encoder = encoder
    return config_lib.apply_overrides(config, list(overrides))


def _example(config, method):
    tokenizer = tokenize.load_tokenizer(config.data.tokenizer)
    records = sources.load_records(config.data, "validate")[:2]
    batch = next(
        pipeline.eval_batches(
            config.data, records, tokenizer, batch_size=2, hooks=method.data_hooks(tokenizer)
        )
    )
    return {k: jnp.asarray(v) for k, v in batch.items() if k != "valid"}


@pytest.mark.parametrize("name", METHODS)
def test_every_encoder_feeds_every_task(name):
    """Shapes only (traced, not compiled): init, loss and predict functions of each task on
    each method's tiny encoder, including MCPL's and PTUnifier's prompted encoders."""
    from medvlp_jax.methods.base import SetupContext

    for task in TASKS:
        config = _downstream(name, task)
        method = Downstream(config)
        tokenizer = tokenize.load_tokenizer(config.data.tokenizer)
        method.setup(SetupContext(config, None, None, tokenizer, []))
        batch = _example(config, method)
        variables = strip_boxes(jax.eval_shape(method.init, jax.random.PRNGKey(0), batch))
        assert set(variables["params"]) == {"encoder", "head"}
        loss_fn = functools.partial(method.loss, rng=jax.random.PRNGKey(1), train=True)
        loss, _, _ = jax.eval_shape(loss_fn, variables, batch)
        assert loss.shape == ()
        fns = method.predict_fns()
        shapes = {k: jax.eval_shape(f, variables, batch).shape for k, f in fns.items()}
        if task == "classification":
            assert shapes == {"logits": (2, 14)}
        elif task == "segmentation":
            assert shapes == {"segment_counts": (2, 3, 5)}
        else:
            assert shapes == {"detections": (2, 10, 6), "box_targets": (2, 16, 6)}


def test_finetune_keeps_what_the_encoder_method_froze():
    linear = Downstream(_downstream("mflag", "classification"))
    assert linear.group_rules() == ("encoder/.* -> frozen",)
    full = Downstream(_downstream("mflag", "classification", "downstream.finetune=true"))
    rules = optim.group_rules(full.config.optim, full.group_rules())
    params = {"encoder": {"text": {"k": jnp.zeros(2)}, "image": {"k": jnp.zeros(2)}}, "head": {}}
    mask = optim.trainable_mask(rules, params)
    assert mask["encoder"]["text"]["k"] is False or not mask["encoder"]["text"]["k"]
    assert mask["encoder"]["image"]["k"]


def test_dense_tasks_refuse_augmentation():
    with pytest.raises(config_lib.ConfigError, match=re.escape("data.augment.enabled=False")):
        Downstream(_downstream("clip", "segmentation", "data.augment.enabled=true"))


# --- the runner ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny CLIP pre-training run (2 steps), as `main` leaves it."""
    workdir = tmp_path_factory.mktemp("pretrained")
    config = tiny("clip", "train.num_steps=2", "train.checkpoint_every=2")
    (workdir / "config.json").write_text(config_lib.to_json(config))
    with contextlib.redirect_stdout(io.StringIO()):
        train.run(config, workdir)
    return workdir


def _run(pretrained, workdir, task, *overrides, fraction=0.1):
    config = runner.build_config(f"{task}:tiny", pretrained, fraction, list(overrides))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = runner.run(config, workdir)
    return result, out.getvalue()


@pytest.fixture
def split_log(monkeypatch):
    """The splits loaded, in order, with 'final' where the final test evaluation starts."""
    events = []
    load, evaluate = sources.load_records, train.evaluate_checkpoint

    def logged_load(data_cfg, split, *args, **kwargs):
        events.append(split)
        return load(data_cfg, split, *args, **kwargs)

    def logged_evaluate(*args, **kwargs):
        events.append("final")
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(sources, "load_records", logged_load)
    monkeypatch.setattr(train, "evaluate_checkpoint", logged_evaluate)
    return events


@pytest.mark.parametrize("task", TASKS)
def test_runner_reads_the_test_split_once_at_the_end(pretrained, tmp_path, split_log, task):
    result, out = _run(pretrained, tmp_path, task, "train.num_steps=2")
    assert "init.encoder:" in out and "test evaluation at step 2" in out
    assert split_log.count("final") == 1 and split_log.count("test") == 1
    assert split_log.index("test") > split_log.index("final")
    metric = runner.SELECTION_METRIC[task]
    assert 0.0 <= result[f"eval/synthcxr/{metric}"] <= 1.0
    assert json.loads((tmp_path / runner.TEST_FILE).read_text()) == result


def test_runner_resumes_and_reuses_its_test_result(pretrained, tmp_path, split_log):
    _run(pretrained, tmp_path, "classification", "train.num_steps=2")
    split_log.clear()
    result, out = _run(pretrained, tmp_path, "classification")  # 4 steps: resumes from 2
    assert "resuming from step 2" in out
    assert split_log.index("test") > split_log.index("final")
    saved = json.loads((tmp_path / runner.TEST_FILE).read_text())
    assert saved["step"] == result["step"] in (2, 4)
    split_log.clear()
    again, out = _run(pretrained, tmp_path, "classification")  # finished: nothing re-read
    assert "final" not in split_log and "test" not in split_log
    assert again == saved and "(from" in out


def test_a_stopped_run_is_not_evaluated_on_the_test_split(
    pretrained, tmp_path, split_log, monkeypatch
):
    """As after SIGTERM: training returns before its last step, so no test evaluation runs
    (a rerun resumes and evaluates then)."""
    real_run = train.run
    stopped = lambda config, workdir: real_run(
        config_lib.apply_overrides(config, ["train.num_steps=2"]), workdir
    )
    monkeypatch.setattr(train, "run", stopped)
    result, out = _run(pretrained, tmp_path, "classification", "train.num_steps=4")
    assert result is None and "rerun to resume" in out
    assert "test" not in split_log and not (tmp_path / runner.TEST_FILE).exists()


def test_runner_trains_on_the_label_fraction(pretrained, tmp_path):
    result, out = _run(pretrained, tmp_path, "classification", "train.num_steps=2")
    listed = (sources.synthcxr_root(tiny("clip").data) / "splits" / "train_10.txt").read_text()
    assert f"data: synthcxr, {len(listed.split())} training records" in out
    assert result["step"] == 2


def test_runner_errors_name_the_flag(pretrained, tmp_path):
    with pytest.raises(config_lib.ConfigError, match=re.escape("--task=segmentatoin")):
        runner.build_config("segmentatoin", pretrained, 1.0, [])
    with pytest.raises(config_lib.ConfigError, match=re.escape("--fraction=1.5")):
        runner.build_config("segmentation", pretrained, 1.5, [])
    with pytest.raises(config_lib.ConfigError, match=re.escape("no config.json")):
        runner.build_config("segmentation", tmp_path, 1.0, [])
    with pytest.raises(
        config_lib.ConfigError, match=re.escape("did you mean --config.downstream.top_k")
    ):
        runner.build_config("detection", pretrained, 1.0, ["downstream.top_kk=3"])


def test_bench_suite_writes_the_results_page_and_plot(pretrained, tmp_path, monkeypatch):
    from medvlp_jax.bench import suite

    monkeypatch.setattr(suite, "pretrain", lambda config, workdir, prerequisite="": pretrained)
    page = tmp_path / "docs" / "results.md"
    argv = ["--methods=clip", "--tasks=classification", "--fractions=0.1,1", "--preset=tiny"]
    argv += [f"--workdir={tmp_path / 'suite'}", f"--results={page}", "--set=train.num_steps=2"]
    with contextlib.redirect_stdout(io.StringIO()):
        suite.main(argv)
    record = json.loads((tmp_path / "suite" / "suite.json").read_text())
    results = record["clip"]["classification"]
    assert set(results) == {"0.1", "1"}
    text = page.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| clip |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:3] == [f"{results[f]['eval/synthcxr/auroc']:.3f}" for f in ("0.1", "1")]
    assert "## classification (auroc)" in text and "## segmentation" not in text
    assert page.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A second run reuses every downstream result and keeps their first wall times.
    with contextlib.redirect_stdout(io.StringIO()):
        suite.main(argv)
    assert json.loads((tmp_path / "suite" / "suite.json").read_text()) == record


def test_suite_rows_put_mcpl_beside_its_prompt_learning_baselines():
    from medvlp_jax.bench import suite

    rows = suite.pretrain_rows(["clip", "mcpl"], "tiny")
    assert [r[0] for r in rows] == ["clip", "mcpl:backbone", "coop", "maple", "mcpl"]
    assert rows[1][2] == "backbone" and all(not r[2] for r in rows[2:])
    by_name = {r[0]: r[1].model for r in rows}
    assert not by_name["coop"].image_prompts and by_name["maple"].image_prompts
    assert by_name["mcpl"].ap_prompt and by_name["mcpl"].prompt_config == "qk_v"


def test_suite_stops_when_a_pre_training_stops_before_its_last_step(tmp_path, monkeypatch):
    """A pre-training stopped by a signal leaves no final checkpoint: the suite must not run
    the downstream tasks on its intermediate weights."""
    from medvlp_jax import train
    from medvlp_jax.bench import suite

    monkeypatch.setattr(train, "run", lambda config, workdir: {})  # stopped at once
    config = suite.pretrain_rows(["clip"], "tiny")[0][1]
    with pytest.raises(SystemExit, match="stopped before its last step"):
        suite.pretrain(config, tmp_path / "clip")
    assert (tmp_path / "clip" / "config.json").exists()


def test_tower_pyramids_fine_to_coarse():
    from medvlp_jax.models.builders import build_image_tower, tower_config

    images = jnp.zeros((2, 64, 64, 3))
    shapes = {}
    resnet = tower_config("resnet50")
    hybrid = tower_config("vit", "tiny")
    hybrid.update(width=32, num_layers=1, num_heads=2, mlp_dim=64, patch_size=16, stem="resnet")
    for name, cfg in (("resnet", resnet), ("hybrid", hybrid)):
        tower = build_image_tower(cfg)
        out = jax.eval_shape(lambda t=tower: t.init_with_output(jax.random.PRNGKey(0), images)[0])
        shapes[name] = [m.shape for m in out["pyramid"]]
    assert shapes["resnet"] == [(2, 16, 16, 256), (2, 8, 8, 512), (2, 4, 4, 1024), (2, 2, 2, 2048)]
    assert shapes["hybrid"] == [(2, 16, 16, 256), (2, 8, 8, 512), (2, 4, 4, 32)]
