"""Image classification and prompt learning: the data sources, the zero-shot head, Mixup,
layer-wise lr decay, CoOp/CoCoOp training only their context, text towers fed embeddings."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from tiny import CLASSIFY, SHAPES_OBJECTS

from mmlightning import config as C
from mmlightning.build import build_datamodule, build_task
from mmlightning.cli import main
from mmlightning.data_modules.classification import DIGIT_NAMES
from mmlightning.metrics.samples import few_shot_draw
from mmlightning.encoders.text import token_embeddings_replaced
from mmlightning.encoders.tokenizers import tokenize
from mmlightning.errors import UserError
from mmlightning.metrics import TopKAccuracy
from mmlightning.tasks.clip import load_clip


def built(recipe: str, overrides: list[str]):
    cfg = C.resolve(C.load_recipe(recipe, overrides))
    task = build_task(cfg)
    datamodule = build_datamodule(cfg, task)
    return cfg, task, datamodule


def write_folder(root: Path, classes: dict[str, int], size: int = 20) -> Path:
    rng = np.random.default_rng(0)
    for k, (name, n) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = np.full((size, size, 3), 40 * k, dtype=np.uint8) + rng.integers(0, 20, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


# ---------------------------------------------------------------------- data
def test_digits_hold_out_a_fifth_of_each_class() -> None:
    from sklearn.datasets import load_digits

    _, _, data = built("classify-digits", CLASSIFY)
    labels = load_digits().target
    sizes = {s: len(data.splits[s].labels) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == 1797
    for c in range(10):  # stratified: a fifth of each class in test
        assert abs((data.splits["test"].labels == c).sum() - (labels == c).sum() / 5) <= 1
    data.setup("fit")
    batch = data.train_dataloader().dataset.__getitems__([0, 1, 2])
    assert batch["image"].shape == (3, 3, 64, 64) and batch["label"].dtype == torch.long


def test_few_shot_draws_what_the_linear_probe_draws() -> None:
    _, _, full = built("classify-digits", CLASSIFY)
    _, _, few = built("classify-digits", [*CLASSIFY, "data.shots=4", "data.shot_seed=2"])
    chosen, _ = few_shot_draw(full.splits["train"].labels, 4, 2)
    assert np.array_equal(np.bincount(few.splits["train"].labels), [4] * 10)
    assert torch.equal(few.splits["train"].pixels, full.splits["train"].pixels[np.sort(chosen)])


def test_base_and_new_classes_partition_the_classes() -> None:
    _, _, base = built("classify-digits", [*CLASSIFY, "data.class_subset=base"])
    _, _, new = built("classify-digits", [*CLASSIFY, "data.class_subset=new"])
    assert base.classnames == ["zero", "one", "two", "three", "four"] and new.classnames[0] == "five"
    assert set(new.splits["test"].labels) == set(range(5))  # relabelled from 0


def test_image_folder_layouts_and_tables(tmp_path: Path) -> None:
    flat = write_folder(tmp_path / "flat", {"cat": 10, "golden_retriever": 10})
    given = tmp_path / "given"
    write_folder(given / "train", {"cat": 4, "dog": 4})
    write_folder(given / "test", {"cat": 2, "dog": 2})
    common = [*CLASSIFY, "model.vision.img_size=32"]
    _, _, data = built("classify-digits", [*common, "data.name=image_folder", f"data.root={flat}"])
    assert data.classnames == ["cat", "golden retriever"]
    assert {s: len(p.labels) for s, p in data.splits.items()} == {"train": 14, "test": 4, "val": 2}
    _, _, data = built("classify-digits", [*common, "data.name=image_folder", f"data.root={given}"])
    assert len(data.splits["train"].labels) == 8 and data.splits["val"].files == data.splits["test"].files
    data.setup("fit")
    assert data.train_dataloader().dataset.__getitems__([0])["image"].shape == (1, 3, 32, 32)
    rows = [{"filepath": f"flat/{name}/{i}.png", "label": name, "split": "train" if i < 7 else "test"}
            for name in ("cat", "golden_retriever") for i in range(10)]
    with (tmp_path / "labels.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["filepath", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    _, _, data = built("classify-digits", [*common, "data.name=image_table", f"data.table={tmp_path / 'labels.csv'}",
                                           "data.image_key=filepath", "data.split_key=split"])
    assert data.classnames == ["cat", "golden_retriever"] and len(data.splits["test"].labels) == 6
    # the same images as bytes in Parquet, labels as class indices (as datasets' ClassLabel stores them)
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"img": [(tmp_path / r["filepath"]).read_bytes() for r in rows],
                      "y": [int(r["label"] != "cat") for r in rows], "split": [r["split"] for r in rows]})
    pq.write_table(table, tmp_path / "labels.parquet")
    _, _, data = built("classify-digits", [*common, "data.name=image_table", f"data.table={tmp_path / 'labels.parquet'}",
                                           "data.image_key=img", "data.label_key=y", "data.split_key=split",
                                           "data.classes=[cat, golden retriever]"])
    assert data.classnames == ["cat", "golden retriever"] and data.splits["train"].labels.tolist() == [0] * 7 + [1] * 7
    data.setup("fit")
    from_bytes = data.train_dataloader().dataset.__getitems__([0, 13])
    assert from_bytes["image"].shape == (2, 3, 32, 32) and from_bytes["label"].tolist() == [0, 1]


# ---------------------------------------------------------------------- classify task
def test_zero_shot_head_scores_the_zero_shot_accuracy_before_any_step(clip_checkpoint: Path) -> None:
    _, task, data = built("classify-shapes", [*SHAPES_OBJECTS, f"model.clip={clip_checkpoint}"])
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False, accelerator="cpu")
    top1 = trainer.test(task, datamodule=data, verbose=False)[0]["test/top1"]
    clip = load_clip(str(clip_checkpoint))
    classifier = clip.zero_shot_classifier(data.zero_shot)
    metric = TopKAccuracy(len(data.classnames), sync_on_compute=False)
    with torch.no_grad():
        for batch in data.test_dataloader():
            metric.update(clip.encode_image(batch["image"]) @ classifier.T, batch["label"], batch["sample_id"])
    assert top1 == pytest.approx(float(metric.compute()["top1"]), abs=1e-6)
    assert 1 / 48 / 3 < top1  # and the comparison means something: not every image wrong


def test_mixup_targets_sum_to_one() -> None:
    _, task, data = built("classify-digits", [*CLASSIFY, "model.mixup={mixup_alpha: 0.8, cutmix_alpha: 1.0}"])
    data.setup("fit")
    batch = data.train_dataloader().dataset.__getitems__(list(range(7)))  # odd: the last one stays unmixed
    np.random.seed(0)
    images, targets = task.mixed(batch["image"], batch["label"])
    assert torch.allclose(targets.sum(1), torch.ones(7))
    assert (targets[:6].max(1).values < 1).any() and targets[6].max() == 1
    assert not torch.equal(images[:6], batch["image"][:6]) and torch.equal(images[6], batch["image"][6])


def test_layer_decay_scales_each_layer_group() -> None:
    _, task, _ = built("classify-digits", [*CLASSIFY, "model.layer_decay=0.5", "optimizer.lr=0.01"])
    groups = task.parameter_groups()
    lrs = sorted({g["lr"] for g in groups})
    assert max(lrs) == pytest.approx(0.01) and min(lrs) < 0.01 * 0.5 ** 5  # the stem, many groups down
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in task.parameters() if p.requires_grad)


def test_predict_classifies_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["fit", "classify-digits", *CLASSIFY, "model.vision.img_size=32", "run.name=digits",
                 "logger.name=none"]) == 0
    images = write_folder(tmp_path / "images", {"a": 2})
    capsys.readouterr()
    assert main(["predict", "runs/digits", "--images", str(images / "a")]) == 0
    out = capsys.readouterr().out
    assert out.count("(") == 2 and all(line.split("\t")[1].split(" ")[0] in DIGIT_NAMES for line in out.splitlines())


# ---------------------------------------------------------------------- prompt learning
@pytest.mark.parametrize("learner", ["{name: coop, n_ctx: 3}", "{name: coop, n_ctx: 2, class_specific: true}",
                                     "{name: cocoop, n_ctx: 2}"])
def test_prompt_learning_trains_only_the_prompt(learner: str, clip_checkpoint: Path) -> None:
    overrides = [*SHAPES_OBJECTS, f"model.clip={clip_checkpoint}", "data.shots=2", f"model.prompt={learner}",
                 "optimizer.lr=0.5", "run.name=coop", "logger.name=none"]
    L.seed_everything(0, workers=True, verbose=False)  # as mml fit seeds before it builds: the same start
    _, task, data = built("coop-shapes", overrides)
    data.setup("fit")
    batch = data.train_dataloader().dataset.__getitems__(list(range(8)))
    task.train()
    task.training_step(batch, 0).backward()
    with_grad = {n for n, p in task.named_parameters() if p.grad is not None}
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    assert with_grad == trainable and all(n.startswith("prompt.") for n in trainable)
    assert ("prompt.meta_net.0.weight" in trainable) == ("cocoop" in learner)
    start = {k: v.clone() for k, v in task.state_dict().items()}

    assert main(["fit", "coop-shapes", *overrides]) == 0
    trained = torch.load("runs/coop/checkpoints/last.ckpt", weights_only=False)["state_dict"]
    clip_state = torch.load(clip_checkpoint, weights_only=False)["state_dict"]
    frozen = [k for k in trained if not k.startswith("prompt.")]
    changed = [k for k in frozen if k in clip_state and not torch.equal(trained[k], clip_state[k])]
    assert frozen and not changed, changed
    assert not torch.equal(trained["prompt.context"], start["prompt.context"])


def test_prompt_trained_on_base_classes_tests_on_new(clip_checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    overrides = [*SHAPES_OBJECTS, f"model.clip={clip_checkpoint}", "data.shots=1", "logger.name=none"]
    assert main(["fit", "coop-shapes", *overrides, "data.class_subset=base", "run.name=base"]) == 0
    capsys.readouterr()
    assert main(["test", "coop-shapes", "--ckpt", "runs/base", *overrides, "data.class_subset=new"]) == 0
    assert "test/top1" in capsys.readouterr().out


def text_towers(fixtures: dict[str, Path], clip_checkpoint: Path) -> dict[str, torch.nn.Module]:
    from mmlightning.registry import TEXT_ENCODERS

    return {"small_transformer": load_clip(str(clip_checkpoint)).text,
            "hf (MiniLM)": TEXT_ENCODERS.build({"name": f"hf:{fixtures['minilm']}", "pretrained": True}),
            "open_clip": TEXT_ENCODERS.build({"name": f"open_clip_text:local-dir:{fixtures['open_clip']}",
                                              "pretrained": True}),
            "hf CLIP": TEXT_ENCODERS.build({"name": f"hf_clip_text:{fixtures['hf_clip']}", "pretrained": True}),
            "hf SigLIP": TEXT_ENCODERS.build({"name": f"hf_clip_text:{fixtures['hf_siglip']}", "pretrained": True})}


def test_text_towers_fed_a_prompts_embeddings_match_its_tokens(fixtures: dict[str, Path],
                                                               clip_checkpoint: Path) -> None:
    from mmlightning.prompts import CoOp

    for name, tower in text_towers(fixtures, clip_checkpoint).items():
        tower.eval()
        phrase, classname = ("a", "small red circle") if name == "small_transformer" else ("a photo of a", "cat")
        tokens = tokenize(tower.tokenizer, [f"{phrase} {classname}."], tower.max_length)
        with torch.no_grad():
            from_tokens = tower(tokens["input_ids"], tokens["attention_mask"]).pooled
            # CoOp started from the hand-written phrase: its context is that phrase's embeddings
            coop = CoOp([classname], tower, init=phrase)
            assert torch.equal(coop.input_ids, tokens["input_ids"]), name
            with token_embeddings_replaced(tower, coop()):
                from_embeddings = tower(coop.input_ids, coop.attention_mask).pooled
            moved = coop() + 0.5 * torch.randn(coop().shape, generator=torch.Generator().manual_seed(0))
            with token_embeddings_replaced(tower, moved):
                from_moved = tower(coop.input_ids, coop.attention_mask).pooled
        assert torch.allclose(from_tokens, from_embeddings, atol=1e-5), name
        assert not torch.allclose(from_tokens, from_moved, atol=1e-3), name  # the embeddings are what it read


def test_coop_context_options_fail_clearly(clip_checkpoint: Path) -> None:
    with pytest.raises(UserError, match="give n_ctx or init, not both"):
        built("coop-shapes", [*SHAPES_OBJECTS, f"model.clip={clip_checkpoint}", "data.shots=2",
                              "model.prompt={name: coop, n_ctx: 2, init: a}"])
    with pytest.raises(UserError, match="model.prompt.name: unknown prompt learner 'coopp'"):
        built("coop-shapes", [*SHAPES_OBJECTS, f"model.clip={clip_checkpoint}", "data.shots=2", "model.prompt.name=coopp"])
    with pytest.raises(UserError, match="is a 'vqa' run, not a CLIP one|not a CLIP"):
        ckpt = torch.load(clip_checkpoint, weights_only=False)
        ckpt["mmlightning_recipe"] = {**ckpt["mmlightning_recipe"], "task": "vqa"}
        torch.save(ckpt, "vqa.ckpt")
        built("coop-shapes", [*SHAPES_OBJECTS, "data.shots=2", "model.clip=vqa.ckpt"])


def test_eval_reports_a_classifier(capsys: pytest.CaptureFixture) -> None:
    assert main(["fit", "classify-digits", *CLASSIFY, "model.vision.img_size=32", "run.name=digits",
                 "logger.name=none"]) == 0
    capsys.readouterr()
    assert main(["eval", "runs/digits", "--shots", "1", "--seeds", "1", "logger.name=none"]) == 0
    out = capsys.readouterr().out
    assert "Classification (test split)" in out and "true \\ predicted" in out  # the confusion matrix
    assert "Linear probe: digits" in out  # the data's images probe the tower's features
    report = json.loads(next(Path("runs/digits/checkpoints").glob("best-*.report.json")).read_text())
    assert 0 < report["headline"]["SVM on raw pixels, top-1"] <= 1


def test_a_clip_run_that_locked_a_tower_comes_back_trainable(clip_checkpoint: Path) -> None:
    ckpt = torch.load(clip_checkpoint, weights_only=False)
    ckpt["mmlightning_recipe"]["model"]["freeze_vision"] = True  # as lit-shapes-pretrained trains
    torch.save(ckpt, "lit.ckpt")
    _, task, _ = built("classify-shapes", [*SHAPES_OBJECTS, "model.clip=lit.ckpt"])
    assert all(p.requires_grad for p in task.vision.parameters()) and not task.frozen_modules()
    _, locked, _ = built("classify-shapes", [*SHAPES_OBJECTS, "model.clip=lit.ckpt", "model.freeze_vision=true"])
    assert not any(p.requires_grad for p in locked.vision.parameters())
