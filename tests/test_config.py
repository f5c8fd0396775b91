"""Recipes: composition, strict overrides, errors that name the key and the choices."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mmlightning.cli import main
from mmlightning.config import list_recipes, load_recipe, resolve
from mmlightning.errors import UserError


def test_every_recipe_has_a_description_and_composes() -> None:
    recipes = list_recipes()
    assert {"clip-shapes", "clip-coco"} <= {n for n, _ in recipes}
    for name, description in recipes:
        assert description and "\n" not in description
        cfg = resolve(load_recipe(name))
        assert cfg["recipe"] == name
        assert cfg["trainer"]["max_epochs"] > 0  # from the shared base


def test_overrides_set_add_remove() -> None:
    cfg = resolve(load_recipe("clip-shapes", ["trainer.max_epochs=3", "optimizer.lr=1e-4", "+trainer.benchmark=true",
                                              "~scheduler.min_lr_ratio", "seed=0"]))
    assert cfg["trainer"]["max_epochs"] == 3
    assert cfg["optimizer"]["lr"] == pytest.approx(1e-4)  # '1e-4' is a string to YAML; the key is a float
    assert cfg["trainer"]["benchmark"] is True
    assert "min_lr_ratio" not in cfg["scheduler"]
    assert cfg["seed"] == 0


@pytest.mark.parametrize("override, message", [
    ("trainer.max_epoch=3", "trainer.max_epoch: unknown key. Did you mean trainer.max_epochs"),
    ("trainr.max_epochs=3", "unknown key 'trainr'. Did you mean trainer"),
    ("trainer.max_epochs=2.5", "trainer.max_epochs: expected int (like 15), got 2.5 (float)"),
    ("optimizer.lr=fast", "optimizer.lr: expected float"),
    ("loss.local_loss=maybe", "loss.local_loss: expected bool"),
    ("+trainer.max_epochs=3", "+trainer.max_epochs: the key already exists"),
    ("~trainer.nope", "~trainer.nope: no such key"),
    ("trainer.max_epochs", "is not of the form key=value"),
    ("trainer.max_epochs.x=1", "'trainer.max_epochs' is a value"),
])
def test_bad_overrides_fail_with_the_key(override: str, message: str) -> None:
    with pytest.raises(UserError) as err:
        load_recipe("clip-shapes", [override])
    assert message in str(err.value)


def test_component_name_change_resets_its_arguments() -> None:
    cfg = resolve(load_recipe("clip-shapes", ["model.vision.img_size=32", "model.vision.name=timm:resnet18"]))
    assert cfg["model"]["vision"] == {"name": "timm:resnet18", "img_size": 32}


def test_unknown_recipe_suggests(capsys: pytest.CaptureFixture) -> None:
    assert main(["show", "clip-shape"]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'clip-shape'. Did you mean 'clip-shapes'" in err
    assert "Traceback" not in err


def test_recipe_from_path_and_cp(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["cp", "clip-shapes", "mine/my-clip.yaml"]) == 0
    path = tmp_path / "mine" / "my-clip.yaml"
    path.write_text(path.read_text().replace("max_epochs: 15", "max_epochs: 7"))
    cfg = resolve(load_recipe(str(path)))  # defaults still resolve to the packaged base
    assert cfg["trainer"]["max_epochs"] == 7 and cfg["recipe"] == "my-clip"
    assert main(["cp", "clip-shapes", str(path)]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("defaults: [_base/clip]\ntrainr: {max_epochs: 1}\n")
    with pytest.raises(UserError, match="unknown top-level key 'trainr'. Did you mean 'trainer'"):
        load_recipe(path)


def test_ls_and_show_do_not_import_torch() -> None:
    code = ("import sys; from mmlightning.cli import main; main(['ls']); main(['show', 'clip-shapes']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "clip-shapes" in out.stdout and "max_epochs" in out.stdout
