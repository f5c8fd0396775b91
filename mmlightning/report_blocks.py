"""The building blocks of a report: a section is plain data, so the JSON, the Markdown, the
bar chart and the W&B run of ``mml eval`` are renderings of one dict. Tasks describe their
own metrics with these (``TaskModule.report_sections``); ``report.py`` measures and renders."""

from __future__ import annotations

from typing import Any


def table(columns: list[str], rows: list[list[Any]], caption: str = "") -> dict[str, Any]:
    return {"caption": caption, "columns": columns, "rows": rows}


def section(title: str, headline: dict[str, float], tables: list[dict[str, Any]] | None = None,
            notes: list[str] | None = None) -> dict[str, Any]:
    """``headline``: the few numbers that go into the bar chart and W&B summary."""
    return {"title": title, "headline": {k: float(v) for k, v in headline.items()}, "tables": tables or [],
            "notes": notes or []}
