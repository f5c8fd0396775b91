"""The end-of-run summary: test metrics, where the checkpoint and the W&B run are."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mmlightning.runs import SUMMARY_FILE


def wandb_run_dir(trainer: Any) -> str | None:
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            return str(Path(logger.experiment.dir).parent)
    return None


def print_summary(cfg: dict[str, Any], run_dir: Path, trainer: Any, test_metrics: dict[str, float],
                  fit_seconds: float, best_checkpoint: str | None) -> dict[str, Any]:
    summary = {
        "recipe": cfg["recipe"],
        "run_dir": str(run_dir.resolve()),
        "global_step": trainer.global_step,
        "fit_seconds": round(fit_seconds, 1),
        "test": {k: float(v) for k, v in sorted(test_metrics.items())},
        "best_checkpoint": best_checkpoint,
        "last_checkpoint": str((run_dir / "checkpoints" / "last.ckpt").resolve()),
        "wandb_run": wandb_run_dir(trainer),
    }
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    table = Table(title=f"{cfg['recipe']}: test split, {trainer.global_step} steps in {fit_seconds:.0f}s")
    table.add_column("metric")
    table.add_column("value", justify="right")
    blind = {k.replace("/blind_", "/", 1): v for k, v in summary["test"].items() if "/blind_" in k}
    if blind:  # VQA: what the model scores next to what a model blind to the image scores
        table.add_column("blind baseline", justify="right")
    for key, value in summary["test"].items():
        if "/blind_" in key:
            continue
        row = [key, f"{value:.4f}"] + ([f"{blind[key]:.4f}" if key in blind else ""] if blind else [])
        table.add_row(*row)
    console = Console()
    console.print(table)
    console.print(f"run directory:   {run_dir}")
    console.print(f"best checkpoint: {best_checkpoint or '(none: no monitored metric)'}")
    console.print(f"last checkpoint: {summary['last_checkpoint']}")
    console.print(f"W&B run:         {summary['wandb_run'] or '(W&B logger off)'}")
    return summary
