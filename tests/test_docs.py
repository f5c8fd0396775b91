"""The documentation says what the code does: docs/components.md is what `mml ls --components
--markdown` prints, the README's component table names registered components, and the README's
links into docs/ reach pages of the site. `make docs` (mkdocs build --strict) checks the site's
own links and anchors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from mmlightning import registry
from mmlightning.build import import_components

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()

# the README table's config key -> the registries its names come from
TABLE_REGISTRIES = {
    "model.vision": [registry.VISION_ENCODERS],
    "model.text": [registry.TEXT_ENCODERS],
    "model.projection": [registry.PROJECTIONS],
    "model.fusion": [registry.FUSION_HEADS],
    "model.prompt": [registry.PROMPT_LEARNERS],
    "model.decoder": [registry.TEXT_DECODERS],
    "model.lm": [registry.LANGUAGE_MODELS],
    "model.temporal": [registry.TEMPORAL_AGGREGATORS],
    "loss": [registry.LOSSES],
    "data": [registry.DATA_MODULES],
    "optimizer / schedule": [registry.OPTIMIZERS, registry.SCHEDULERS],
}


def test_components_page_is_the_commands_output() -> None:
    # a process of its own: other tests register components of their own in this one
    out = subprocess.run([sys.executable, "-m", "mmlightning.cli", "ls", "--components", "--markdown"],
                         capture_output=True, text=True, check=True, cwd=REPO)
    page = (REPO / "docs" / "components.md").read_text()
    assert page == out.stdout, (
        "docs/components.md is out of date; regenerate it with\n"
        "    .venv/bin/mml ls --components --markdown > docs/components.md")


def component_table() -> list[tuple[str, list[str]]]:
    """(kind cell, backticked names) for each row of the README's `| kind | names |` table."""
    table = re.search(r"^\| kind \| names \|\n\|[-|]+\|\n((?:\|.*\|\n)+)", README, flags=re.M)
    if table is None:
        return []
    rows = []
    for line in table.group(1).splitlines():
        kind, names = [c.strip() for c in line.strip().strip("|").split("|")][:2]
        rows.append((kind, re.findall(r"`([^`]+)`", names)))
    return rows


def registries_of(kind: str) -> list[registry.Registry]:
    key = re.search(r"\(`([^`]+)`\)", kind)
    return TABLE_REGISTRIES[key.group(1) if key else kind]


def test_readme_component_table_names_registered_components() -> None:
    import_components()
    rows = component_table()
    if not rows:  # the README has no component table: nothing to check
        return
    for kind, names in rows:
        registered = {n for reg in registries_of(kind) for n in reg.names()}
        for name in names:
            # `timm:<any timm model>` stands for the registered prefix `timm:<name>`
            canonical = re.sub(r":<[^>]*>$", ":<name>", name)
            assert canonical in registered, (
                f"README's component table, row {kind!r}: {name!r} is not a registered name; "
                f"registered: {', '.join(sorted(registered))}")


def test_readme_links_into_docs_reach_pages_of_the_site() -> None:
    nav = (REPO / "mkdocs.yml").read_text()
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#[^)]*)?\)", README)
    assert links, "the README links to no page of docs/"
    for link in links:
        page = link.removeprefix("docs/")
        assert (REPO / link).is_file(), f"README links to {link}, which does not exist"
        if page.endswith(".md"):
            assert re.search(rf":\s*{re.escape(page)}\s*$", nav, flags=re.M), f"{link} is not in mkdocs.yml's nav"
