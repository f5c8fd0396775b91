"""Recipes: load by name or path, compose a base, apply command-line overrides strictly.

A recipe is an OmegaConf YAML file. ``defaults: [_base/clip]`` merges other recipe files
first (paths relative to the recipe, then to the packaged recipes folder). The composed
recipe *is* the schema: an override may only change a key that exists (``key=value``), add
one on purpose (``+key=value``) or remove one (``~key``). Keyword arguments of a component
(a node with a ``name:``) are checked against that component's signature when it is built.

This module must not import torch: ``mml ls`` and ``mml show`` start in well under a second.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from mmlightning.errors import UserError
from mmlightning.registry import did_you_mean

# Sections a recipe may have. Anything else at the top level is a typo.
TOP_LEVEL_KEYS = {
    "description", "recipe", "imports", "compile", "compile_options", "seed", "run", "task", "model", "loss", "data",
    "optimizer", "scheduler", "trainer", "checkpoint", "logger", "summary",
}


def recipes_dir() -> Path:
    return Path(str(importlib.resources.files("mmlightning.recipes")))


def list_recipes(filter: str = "") -> list[tuple[str, str]]:
    """(name, description) of every packaged recipe whose name contains ``filter``."""
    out = []
    for path in sorted(recipes_dir().glob("*.yaml")):
        if filter in path.stem:
            desc = (yaml.safe_load(path.read_text()) or {}).get("description", "")
            out.append((path.stem, str(desc)))
    return out


def recipe_path(name_or_path: str | Path) -> Path:
    """A packaged recipe's name, or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"recipe file {str(path)!r} does not exist.")
        return path
    packaged = recipes_dir() / f"{name_or_path}.yaml"
    if packaged.is_file():
        return packaged
    names = [n for n, _ in list_recipes()]
    raise UserError(
        f"unknown recipe {str(name_or_path)!r}.{did_you_mean(str(name_or_path), names)} "
        f"Recipes: {', '.join(names)} (or give a path to a .yaml file; `mml ls` lists them)."
    )


def _load_file(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    if path.resolve() in seen:
        raise UserError(f"{path}: `defaults` include themselves in a cycle.")
    try:
        raw = OmegaConf.load(path)
    except Exception as err:  # yaml errors carry line numbers; keep them
        raise UserError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, DictConfig):
        raise UserError(f"{path}: a recipe must be a mapping of keys, got {type(raw).__name__}.")
    defaults = raw.pop("defaults", [])
    if isinstance(defaults, str):
        defaults = [defaults]
    composed = OmegaConf.create({})
    for entry in defaults:
        composed = merge_recipes(composed, _load_file(_find_default(str(entry), path), seen + (path.resolve(),)))
    return merge_recipes(composed, raw)


def _find_default(entry: str, parent: Path) -> Path:
    name = entry if entry.endswith((".yaml", ".yml")) else f"{entry}.yaml"
    for base in (parent.parent, recipes_dir()):
        if (base / name).is_file():
            return base / name
    raise UserError(f"{parent}: defaults entry {entry!r} not found next to it or in {recipes_dir()}.")


def merge_recipes(base: DictConfig, top: DictConfig) -> DictConfig:
    """Deep merge, except that a component node whose ``name`` changes is replaced whole:
    the keyword arguments of a CNN mean nothing to a ViT."""
    base = base.copy()
    for key, value in top.items():
        old = base.get(key) if key in base else None
        if isinstance(value, DictConfig) and isinstance(old, DictConfig):
            if "name" in value and "name" in old and value.name != old.name:
                base[key] = value
            else:
                base[key] = merge_recipes(old, value)
        else:
            base[key] = value
    return base


def load_recipe(name_or_path: str | Path, overrides: list[str] = ()) -> DictConfig:
    """Compose a recipe and apply overrides; returns an unresolved DictConfig."""
    path = recipe_path(name_or_path)
    cfg = _load_file(path)
    if "recipe" not in cfg:
        cfg.recipe = path.stem
    apply_overrides(cfg, list(overrides))
    unknown = [k for k in cfg if k not in TOP_LEVEL_KEYS]
    for key in unknown:
        raise UserError(
            f"{path}: unknown top-level key {key!r}.{did_you_mean(str(key), sorted(TOP_LEVEL_KEYS))} "
            f"Valid: {', '.join(sorted(TOP_LEVEL_KEYS))}."
        )
    return cfg


def resolve(cfg: DictConfig) -> dict[str, Any]:
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except Exception as err:
        raise UserError(f"cannot resolve an interpolation in the recipe: {err}") from None


def to_yaml(cfg: DictConfig | dict) -> str:
    return OmegaConf.to_yaml(cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg))


# ----------------------------------------------------------------------------- overrides

def parse_override(text: str) -> tuple[str, str, Any]:
    """'a.b=1' -> ('set', 'a.b', 1); '+a.b=1' -> ('add', ...); '~a.b' -> ('remove', ...)."""
    if text.startswith("~"):
        return "remove", text[1:].split("=")[0], None
    op = "add" if text.startswith("+") else "set"
    key, sep, value = text.lstrip("+").partition("=")
    if not sep or not key:
        raise UserError(f"override {text!r} is not of the form key=value, +key=value or ~key.")
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    return op, key.strip(), parsed


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> None:
    parsed = [parse_override(o) for o in overrides]
    # A component's name first: changing it resets that node's keyword arguments, which the
    # other overrides in the same command may then set, in any order.
    parsed.sort(key=lambda p: 0 if p[1].endswith(".name") else 1)
    for op, key, value in parsed:
        parent_key, _, leaf = key.rpartition(".")
        parent = _node(cfg, parent_key, key) if parent_key else cfg
        if op == "remove":
            if leaf not in parent:
                raise UserError(f"~{key}: no such key to remove.{_suggest(parent, leaf, parent_key)}")
            parent.pop(leaf)
        elif op == "add":
            if leaf in parent:
                raise UserError(f"+{key}: the key already exists; set it with {key}=... instead.")
            parent[leaf] = value
        elif leaf not in parent:
            if "name" in parent and leaf != "name":
                parent[leaf] = value  # a component kwarg: checked against its signature at build
            else:
                raise UserError(
                    f"{key}: unknown key.{_suggest(parent, leaf, parent_key)} "
                    f"Use +{key}=... to add a new key on purpose."
                )
        elif leaf == "name" and isinstance(parent, DictConfig) and parent.get("name") != value:
            for k in [k for k in parent if k != "name"]:
                parent.pop(k)
            parent.name = value
        else:
            parent[leaf] = _check_type(key, parent[leaf] if not OmegaConf.is_missing(parent, leaf) else None, value)


def _node(cfg: DictConfig, path: str, full_key: str) -> DictConfig:
    node: Any = cfg
    walked = []
    for part in path.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            here = ".".join(walked)
            raise UserError(f"{full_key}: unknown key {'.'.join(walked + [part])!r}.{_suggest(node, part, here)}")
        node = node[part]
        walked.append(part)
    if not isinstance(node, DictConfig):
        raise UserError(f"{full_key}: {path!r} is a value ({node!r}), not a section with keys.")
    return node


def _suggest(node: Any, leaf: str, parent_key: str) -> str:
    if not isinstance(node, DictConfig):
        return ""
    choices = [str(k) for k in node]
    prefix = f"{parent_key}." if parent_key else ""
    hint = did_you_mean(leaf, choices)
    if hint:
        close = [c.strip("'") for c in hint[len(" Did you mean "):-1].split(" or ")]
        hint = " Did you mean " + " or ".join(f"{prefix}{c}" for c in close) + "?"
    listing = f" Keys here: {', '.join(prefix + c for c in choices)}." if choices else ""
    return hint + listing


def _type_name(value: Any) -> str:
    if isinstance(value, (DictConfig, dict)):
        return "mapping"
    if isinstance(value, (ListConfig, list)):
        return "list"
    return type(value).__name__


def _check_type(key: str, old: Any, new: Any) -> Any:
    """The new value must have the old value's type (ints widen to float)."""
    if old is None or new is None or (isinstance(old, str) and old.startswith("${")):
        return new
    if isinstance(new, str) and isinstance(old, (int, float)) and not isinstance(old, bool):
        try:  # YAML reads '1e-3' as a string
            new = float(new) if isinstance(old, float) else int(new)
        except ValueError:
            pass
    if isinstance(old, bool) or isinstance(new, bool):
        if isinstance(old, bool) and isinstance(new, bool):
            return new
    elif isinstance(old, float) and isinstance(new, (int, float)):
        return float(new)
    elif isinstance(old, int) and isinstance(new, int):
        return new
    elif isinstance(old, str) and isinstance(new, (str, int, float)):
        return str(new)
    elif _type_name(old) == _type_name(new) and not isinstance(new, (int, float, str)):
        return new
    raise UserError(f"{key}: expected {_type_name(old)} (like {old!r}), got {new!r} ({_type_name(new)}).")
