"""`mml eval`: the perception report of a checkpoint, from real short training runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny import SHAPES_CAPTION, SHAPES_CLIP, SHAPES_VLM, SHAPES_VQA
from wandb_offline import find_run_files, read_run

from mmlightning.cli import main
from mmlightning.data_modules import shapes_world as world
from mmlightning.data_modules.image_folder import read_image_folder
from mmlightning.encoders.outputs import ImageConfig
from mmlightning.metrics.linear_probe import linear_probe
from mmlightning.runs import eval_checkpoint

LABELLED = ["data.num_labelled_train=192", "data.num_labelled_test=96"]


def write_image_folder(root: Path, per_class: int, split_dirs: bool = False) -> Path:
    """Class-named subfolders of PNGs: one-shape scenes of three shapes-world classes."""
    wanted = [("large", "red", "circle"), ("large", "blue", "square"), ("small", "green", "cross")]
    scenes = world.generate("val", 600, seed=5, max_objects=1, heldout=())
    count = dict.fromkeys(wanted, 0)
    for image, scene in zip(scenes.images, scenes.scenes):
        obj = scene[0].combo
        if obj in count and count[obj] < per_class:
            split = ("train" if count[obj] % 2 else "test") if split_dirs else ""
            folder = root / split / "_".join(obj)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{count[obj]}.png")
            count[obj] += 1
    assert min(count.values()) == per_class
    return root


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clip-eval")
    assert main(["fit", "clip-shapes", *SHAPES_CLIP, "trainer.max_steps=4", "logger.name=none",
                 f"run.root={root}", "run.name=r"]) == 0
    return root / "r"


def test_clip_report_has_every_section(clip_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = write_image_folder(tmp_path / "my_classes", per_class=8)
    capsys.readouterr()
    assert main(["eval", "clip-shapes", f"ckpt={clip_run}", *SHAPES_CLIP, *LABELLED, "--image-folder", str(folder),
                 "--template", "a {}", "--template", "the {}", "--shots", "1", "4", "--seeds", "2"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    # progress while the probes fit, on stderr (stdout is the report)
    assert "eval: my_classes: fitting linear probes (1-shot, 4-shot x 2 draws" in captured.err
    ckpt = eval_checkpoint(clip_run)
    report = json.loads(ckpt.with_name(f"{ckpt.stem}.report.json").read_text())
    assert report["checkpoint"] == str(ckpt)
    sections = {s["title"]: s for s in report["sections"]}
    assert list(sections) == ["Retrieval (test split)", "Zero-shot classification: shapes", "Linear probe: shapes",
                              "Zero-shot classification: my_classes", "Linear probe: my_classes"]
    retrieval = sections["Retrieval (test split)"]["tables"][0]
    assert retrieval["columns"] == ["direction", "R@1", "R@5", "R@10", "MdR", "MnR"]
    assert retrieval["rows"][1][4] == pytest.approx(report["test_metrics"]["test/t2i_MdR"])
    assert [r[0] for r in retrieval["rows"]][:2] == ["image→text", "text→image"]
    assert retrieval["rows"][0][1] == pytest.approx(report["test_metrics"]["test/i2t_R@1"])
    assert report["headline"]["mean recall"] == pytest.approx(report["test_metrics"]["test/mean_recall"])
    groups, per_class = sections["Zero-shot classification: shapes"]["tables"]
    assert [r[0] for r in groups["rows"]] == ["all", "heldout", "seen"] and groups["columns"][1:] == ["top-1", "top-5"]
    assert len(per_class["rows"]) == 48 and sum(r[1] for r in per_class["rows"]) == 96
    assert all(0 <= r[2] <= r[3] <= 1 for r in per_class["rows"])  # top-1 never above top-5
    probe = sections["Linear probe: shapes"]["tables"][0]
    # 192 labelled images over 48 classes: some class has fewer than 4, so there is no 4-shot row, and it says so
    assert [r[0] for r in probe["rows"]] == ["1-shot", "full"]
    assert any(n.startswith("Skipped 4-shot: the smallest class has ") for n in sections["Linear probe: shapes"]["notes"])
    folder_probe = sections["Linear probe: my_classes"]["tables"][0]  # 4 training images in each class
    assert [r[0] for r in folder_probe["rows"]] == ["1-shot", "4-shot", "full"]
    folder_classes = sections["Zero-shot classification: my_classes"]["tables"][1]
    assert [r[0] for r in folder_classes["rows"]] == ["large blue square", "large red circle", "small green cross"]
    assert sum(r[1] for r in folder_classes["rows"]) == 12  # half of each class's 8 images are test images
    assert "'a {}', 'the {}'" in " ".join(sections["Zero-shot classification: my_classes"]["notes"])
    markdown = ckpt.with_name(f"{ckpt.stem}.report.md").read_text()
    assert "## Retrieval (test split)" in markdown and "| small red circle |" in markdown and "| 4-shot |" in markdown
    assert markdown.split("\n", 1)[0] in printed
    assert ckpt.with_name(f"{ckpt.stem}.report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the recipe's W&B logger: one eval run in the training run's directory, headline in its summary
    (wandb_file,) = [p for p in find_run_files(clip_run / "wandb") if "offline-run" in str(p)]
    logged = read_run(wandb_file)
    assert logged.name == "r-eval" and logged.group == "r"
    assert logged.summary["eval/my_classes probe full"] == pytest.approx(report["headline"]["my_classes probe full"])
    assert any(k.startswith("eval/Zero-shot classification: shapes") for k in logged.summary)


@pytest.mark.parametrize("recipe,overrides,title,row", [
    ("vqa-shapes", SHAPES_VQA, "VQA accuracy (test split)", "relational"),
    ("caption-shapes", SHAPES_CAPTION, "Captioning (test split)", "CIDEr-D"),
    ("vlm-shapes", SHAPES_VLM, "Generative VQA and captioning (test split)", "relational"),
])
def test_task_heads_get_their_section(recipe: str, overrides: list[str], title: str, row: str, tmp_path: Path) -> None:
    assert main(["fit", recipe, *overrides, "trainer.max_steps=2", "logger.name=none", "run.name=h"]) == 0
    assert main(["eval", recipe, "--ckpt", "runs/h", *overrides, *LABELLED, "logger.name=none", "--shots", "1",
                 "--seeds", "1"]) == 0
    ckpt = eval_checkpoint("runs/h")
    report = json.loads(ckpt.with_name(f"{ckpt.stem}.report.json").read_text())
    sections = {s["title"]: s for s in report["sections"]}
    # no text embedding to compare with: the probe, but no zero-shot section
    assert list(sections) == [title, "Linear probe: shapes"]
    assert row in [r[0] for r in sections[title]["tables"][0]["rows"]]
    if recipe == "vqa-shapes":
        assert sections[title]["tables"][0]["columns"] == ["question type", "model", "blind baseline"]


def test_linear_probe_on_separable_features() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16)) * 1.5

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 5, n)
        return centres[y] + rng.normal(size=(n, 16)), y

    (train_x, train_y), (test_x, test_y) = draw(400), draw(200)
    result = linear_probe(train_x, train_y, test_x, test_y, shots=(1, 4), seeds=3)
    assert list(result) == ["1-shot", "4-shot", "full"]
    small = linear_probe(train_x[:50], np.r_[np.zeros(47, int), np.ones(3, int)], test_x, test_y, shots=(1, 4))
    assert list(small) == ["1-shot", "full"]  # the smaller class has 3 images: no 4-shot probe
    assert result["full"]["top1"] > 0.98 and result["full"]["images"] == 400
    assert result["1-shot"]["seeds"] == 3 and result["1-shot"]["std"] > 0  # three different draws
    assert result["1-shot"]["top1"] < result["4-shot"]["top1"]  # more examples, better probe
    shuffled = linear_probe(train_x, rng.permutation(train_y), test_x, test_y, shots=(4,), seeds=1)
    assert shuffled["full"]["top1"] < 0.4  # labels carry the signal, not the probe


def test_image_folder_layouts_and_errors(tmp_path: Path) -> None:
    config = ImageConfig(size=32)
    flat = read_image_folder(write_image_folder(tmp_path / "flat", per_class=4), config, ["a {}"])
    assert flat.classes.classnames == ["large blue square", "large red circle", "small green cross"]
    assert (len(flat.train), len(flat.test)) == (6, 6)
    batch = flat.test.__getitems__([0, 1])
    assert batch["image"].shape == (2, 3, 32, 32) and batch["label"].tolist() == [0, 0]
    given = read_image_folder(write_image_folder(tmp_path / "given", per_class=6, split_dirs=True), config, ["a {}"])
    assert (len(given.train), len(given.test)) == (9, 9)
    from mmlightning.errors import UserError

    with pytest.raises(UserError, match="exactly one '{}'"):
        read_image_folder(tmp_path / "flat", config, ["a photo"])
    (tmp_path / "one" / "cat").mkdir(parents=True)
    with pytest.raises(UserError, match="at least 2 class subfolders"):
        read_image_folder(tmp_path / "one", config, ["a {}"])
    with pytest.raises(UserError, match="is not a folder"):
        read_image_folder(tmp_path / "missing", config, ["a {}"])


def test_unspellable_classes_and_undecodable_files_are_reported(tmp_path: Path) -> None:
    """The shapes tokenizer cannot spell "astronaut": a warning, in the console and the report;
    a file that is no image is left out and counted, and the report goes on."""
    from mmlightning import report
    from mmlightning.build import build_task
    from mmlightning.config import load_recipe, resolve

    task = build_task(resolve(load_recipe("clip-shapes")))
    folder = write_image_folder(tmp_path / "classes", per_class=4)
    (folder / "large_red_circle").rename(folder / "astronaut")
    (folder / "astronaut" / "broken.png").write_bytes(b"not a png")
    data = read_image_folder(folder, task.data_spec().image_config, ["a {}"])
    assert data.skipped == [str(folder / "astronaut" / "broken.png")]
    with pytest.warns(UserWarning) as warned:
        sections = report.classification_sections(task, data, shots=(1,), seeds=1)
    messages = " ".join(str(w.message) for w in warned)
    assert "cannot spell 1 of 3 class names (astronaut)" in messages and "do not decode" in messages
    zero_shot_notes = " ".join(sections[0]["notes"])
    assert "1 of 3 class names tokenize to unknown tokens (astronaut)" in zero_shot_notes
    assert "Skipped 1 file(s) that do not decode as images" in zero_shot_notes


def test_eval_without_checkpoint_is_a_clear_error(capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", "clip-shapes"]) == 2
    assert "mml eval needs trained weights: give a run directory" in capsys.readouterr().err
