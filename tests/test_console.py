"""What `mml` prints: its own lines, not other libraries' notices (unless -v), and never fewer
of the project's own warnings; `mml ls --components` lists the registries."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import SHAPES_CLIP

from mmlightning.build import import_components
from mmlightning.cli import components_listing
from mmlightning.registry import all_registries

THIRD_PARTY_NOTICES = ("GPU available", "litlogger", "anonymous setting", "Using bfloat16", "wandb: ", "FLOPs",
                       "Restoring states")


def fit(tmp_path: Path, *extra: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    env.pop("WANDB_SILENT", None)  # conftest silences W&B for in-process tests; the CLI must do it itself
    out = subprocess.run([sys.executable, "-m", "mmlightning.cli", "fit", "clip-shapes", *SHAPES_CLIP,
                          f"run.root={tmp_path}/runs", *extra], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


@pytest.mark.slow
def test_fit_prints_its_own_lines_and_minus_v_brings_the_rest_back(tmp_path: Path) -> None:
    quiet = fit(tmp_path)
    assert [notice for notice in THIRD_PARTY_NOTICES if notice in quiet] == []
    assert "clip-shapes: 1.26M parameters" in quiet and "precision" in quiet  # the one-line model summary
    assert quiet.count("test/i2t_R@1 ") == 1  # one table of test metrics, not Lightning's and W&B's as well
    assert "best checkpoint:" in quiet and "W&B run:" in quiet
    verbose = fit(tmp_path, "-v")
    assert "GPU available" in verbose and "wandb: " in verbose


def test_quiet_mode_keeps_the_projects_own_warnings() -> None:
    code = ("import warnings; from mmlightning.console import quiet_third_party; quiet_third_party(); "
            "warnings.warn_explicit('ours', DeprecationWarning, 'x.py', 1, module='mmlightning.tasks.clip'); "
            "warnings.warn_explicit('theirs', DeprecationWarning, 'y.py', 1, module='somelib.core')")
    out = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, check=True)
    assert "ours" in out.stderr and "theirs" not in out.stderr


def test_components_listing_names_every_registered_component() -> None:
    import_components()
    text = components_listing()
    for registry in all_registries():
        assert f"{registry.kind} ({registry.key})" in text
        for name in registry.names():
            assert f"  {name} " in text or text.rstrip().endswith(f"  {name}"), name
    assert "co_attention" in components_listing("fusion")  # a filter matches the kind too
    assert "shapes_cnn" not in components_listing("fusion")


def test_every_command_helps_with_a_line_per_argument_and_examples_that_parse() -> None:
    import argparse
    import shlex

    from mmlightning.cli import EXAMPLES, build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        for action in command._actions:
            assert action.help, f"mml {name}: argument {action.dest} has no help line"
        assert "examples:" in command.format_help(), f"mml {name} --help shows no examples"
        for line in EXAMPLES[name]:
            args = shlex.split(line, comments=True)[1:]
            parsed, extra = parser.parse_known_args(args)  # as main parses: overrides may follow options
            assert parsed.command == name and not any(e.startswith("-") for e in extra), line
