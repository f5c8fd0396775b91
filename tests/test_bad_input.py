"""Every row of the bad-input table (docs/reliability.md): the command, run through the `mml`
entry point's main(), fails with exit code 2 and the message shown there, and no traceback.
(test_console runs real `mml` processes for what a terminal shows.)"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from PIL import Image
from tiny import SHAPES_CLIP, tiny_bert, tiny_vit

from mmlightning.cli import main

TABLE = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"


def table_rows() -> list[tuple[str, str, str]]:
    section = TABLE.read_text().split("## Bad input", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[1].startswith("`mml "):
            rows.append((cells[0], cells[1].strip("`"), cells[2].strip("`")))
    return rows


ROWS = table_rows()


def test_the_table_is_there() -> None:
    assert len(ROWS) >= 15


def write_bad_files(root: Path) -> None:
    """What the data rows point at: a broken JSON, COCO captions naming a missing image, an image
    folder with an empty class and a CSV with a label outside its class list."""
    (root / "broken.json").write_text('{"images": [')
    (root / "images").mkdir()
    images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in range(3)]
    for image in images[:2]:
        Image.new("RGB", (40, 40), (200, 10, 10)).save(root / "images" / image["file_name"])
    annotations = [{"id": i, "image_id": i, "caption": "a red square"} for i in range(3)]
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    (root / "truncated.ckpt").write_bytes(b"PK\x03\x04" + bytes(100))  # a zip's first bytes, then nothing
    karpathy = [{"filename": image["file_name"], "imgid": image["id"], "split": split,
                 "sentences": [{"raw": "a red square"}]} for image, split in zip(images[:2], ("train", "val"))]
    (root / "karpathy_no_test.json").write_text(json.dumps({"images": karpathy}))
    (root / "classes" / "cat").mkdir(parents=True)  # an image folder whose "dog" class is empty
    (root / "classes" / "dog").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (20, 20), (10, 200, 10)).save(root / "classes" / "cat" / name)
    (root / "labels.csv").write_text("filepath,label\nclasses/cat/a.png,cat\nclasses/cat/b.png,bird\n")


@pytest.mark.parametrize("what, command, message", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_row(what: str, command: str, message: str, tmp_path: Path, minilm_dir: Path,
                       capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    write_bad_files(tmp_path)
    (tmp_path / "minilm").symlink_to(minilm_dir)
    if "runs/narrow" in command:
        assert main(["fit", "clip-shapes", *SHAPES_CLIP, "model.vision.width=8", "run.name=narrow",
                     "logger.name=none"]) == 0
        capsys.readouterr()
    words = shlex.split(command)[1:]  # drop "mml"
    recipe_at = next(i for i, w in enumerate(words) if not w.startswith("-") and i > 0)
    shrink = {"clip-coco": [*tiny_vit(), *tiny_bert(minilm_dir)],
              "caption-coco": [*tiny_vit(), "model.decoder.config={n_layer: 1, n_embd: 32, n_head: 2}",
                               f"model.decoder.tokenizer={minilm_dir}"]}.get(words[recipe_at], [])
    args = [*words[:recipe_at + 1], *shrink, *words[recipe_at + 1:], "logger.name=none"]
    if "--resume" in words or words[0] in ("export", "wise-ft", "data"):
        args = words  # a resumed run takes its recipe from the run; export, wise-ft and data take no overrides
    # in this process (a fresh one per row would spend ~10 s importing torch and friends):
    # main() is what the `mml` entry point runs, exit code and stderr included
    monkeypatch.chdir(tmp_path)
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, f"{what}: {err[-2000:]}"
    assert message in err, f"{what}: {err[-2000:]}"
    assert "Traceback" not in err and len(re.findall(r"error:", err)) == 1


def test_loader_options_fail_before_the_towers_load(capsys: pytest.CaptureFixture) -> None:
    """clip-coco's towers name hub models, which cannot load offline: the worker count is
    refused first, from the recipe alone."""
    assert main(["fit", "clip-coco", "data.num_workers=-1", "logger.name=none"]) == 2
    err = capsys.readouterr().err
    assert "data.num_workers must be >= 0" in err and "bert" not in err
