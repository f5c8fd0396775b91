"""The README's commands work, and the package installs with recipes inside it."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from tiny import tiny_overrides

from mmlightning.cli import main

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    lines = [line.split(" #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith("mml ")]


def test_readme_mentions_the_two_commands_first() -> None:
    text = (REPO / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    assert "make demo" in first_block and "make test" in first_block
    assert "make test" in (REPO / ".ci" / "run").read_text()


GPU_SIZED = {"clip-coco", "clip-wds", "vqa-vqav2", "caption-coco", "clip-finetune-coco", "itm-mlm-coco",
             "llava-coco", "llava-coco-lora"}


def run_of(root: Path, recipe: str) -> Path:
    """The first run directory of ``recipe`` (what the README's runs/<...> placeholders mean)."""
    runs = sorted((d for d in root.iterdir() if (d / "run.json").is_file()), key=lambda d: d.stat().st_mtime)
    return next(d for d in runs if json.loads((d / "run.json").read_text())["recipe"] == recipe)


@pytest.mark.slow
def test_readme_mml_commands_run(tmp_path: Path, fixtures: dict[str, Path]) -> None:
    """Each `mml` line of the README runs; fits get the tiny overrides appended, and the
    GPU-sized recipes' lines are resolved with `show` (their keys and values must exist)."""
    from PIL import Image

    from mmlightning.data_modules import shapes_world as world

    (tmp_path / "my_towers.py").write_text(re.search(r"```python\n(# my_towers.py.*?)```",
                                                     (REPO / "README.md").read_text(), flags=re.S).group(1))
    (tmp_path / "my_images").mkdir()
    Image.fromarray(world.generate("test", 1).images[0]).save(tmp_path / "my_images" / "scene.png")
    scenes = world.generate("test", 8, max_objects=1, heldout=())
    for i, (image, scene) in enumerate(zip(scenes.images, scenes.scenes)):  # `--image-folder my_classes/`
        folder = tmp_path / "my_classes" / ("round" if scene[0].shape == "circle" else "angular")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.png")
    ran = 0
    for line in readme_commands():
        args = shlex.split(line.replace("path/to/all-MiniLM-L6-v2", str(fixtures["minilm"])))[1:]
        command, recipe = args[0], args[1] if len(args) > 1 else ""
        placeholders = {"runs/<run>": "clip-shapes", "runs/<caption-run>": "caption-shapes",
                        "runs/<lit-run>": "lit-shapes-pretrained"}
        for placeholder, source in placeholders.items():
            if placeholder in line:
                args = [a.replace(placeholder, str(run_of(tmp_path / "runs", source))) for a in args]
        if recipe in GPU_SIZED:
            args[0] = "show"
            args = [a for a in args if not a.startswith("--")]
        elif command in ("fit", "check"):
            args += tiny_overrides(recipe, fixtures) + ["logger.name=none"]
        elif command == "test":
            args += tiny_overrides(recipe, fixtures)
        elif command == "eval":
            args += tiny_overrides(recipe, fixtures) + ["data.num_labelled_train=192", "data.num_labelled_test=96",
                                                        "--seeds", "1"]
        assert main(args) == 0, line
        ran += 1
    assert ran >= 12
    assert json.loads((tmp_path / "captions.json").read_text())["scene.png"]


def test_wheel_installs_recipes_inside_the_package(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("mmlightning-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "mmlightning/recipes/clip-shapes.yaml" in names and "mmlightning/recipes/_base/common.yaml" in names
    assert "mmlightning/data_modules/shapes_world.py" in names
    tops = {n.split("/")[0] for n in names}
    assert tops <= {"mmlightning", *(t for t in tops if t.endswith(".dist-info"))}
    # a plain (non-editable) install lists recipes from anywhere
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True)
    out = subprocess.run([sys.executable, "-c", "from mmlightning.cli import main; main(['ls'])"],
                         cwd="/", env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True)
    assert "clip-shapes" in out.stdout, out.stderr
