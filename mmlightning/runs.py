"""Run directories: ``runs/<name>/`` holds the resolved config, checkpoints, logs, the W&B run
and the summary. A run directory is never reused unless resuming it."""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from mmlightning.errors import UserError
from mmlightning.fault_tolerance import newest_readable, readable_checkpoint, sharded_checkpoint_kind

CONFIG_FILE = "config.yaml"
META_FILE = "run.json"
SUMMARY_FILE = "summary.json"
# Lightning re-runs the command line for each extra local rank; the first picks the run
# directory and hands it to the others through this variable.
RUN_DIR_ENV = "MML_RUN_DIR"


def is_global_zero() -> bool:
    return all(int(os.environ.get(v, "0")) == 0 for v in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "NODE_RANK"))


def default_run_name(recipe: str) -> str:
    # under SLURM or torchrun every rank starts alone: a job id names the run the same everywhere
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID", "none")
    return f"{recipe}-{job if job != 'none' else time.strftime('%Y%m%d-%H%M%S')}"


def new_run_dir(root: str | Path, name: str, numbered: bool = False) -> Path:
    """A fresh run directory; an existing one is an error, never silently overwritten.
    ``numbered`` (for default names): two runs started in the same second get -2, -3, ..."""
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited and not is_global_zero():
        return Path(inherited)
    run_dir = Path(root) / name
    if numbered and is_global_zero():
        suffix = 2
        while run_dir.exists():
            run_dir, suffix = Path(root) / f"{name}-{suffix}", suffix + 1
    if is_global_zero():
        if run_dir.exists() and any(run_dir.iterdir()):
            raise UserError(
                f"run directory {str(run_dir)!r} already exists. Continue it with `--resume {run_dir}`, "
                f"or pick another name with run.name=..."
            )
        run_dir.mkdir(parents=True, exist_ok=True)
    os.environ[RUN_DIR_ENV] = str(run_dir)
    return run_dir


def find_latest_run(root: str | Path, recipe: str) -> Path:
    """The newest run of ``recipe`` under ``root`` that has a last checkpoint (``--resume auto``)."""
    candidates = []
    for meta in Path(root).glob(f"*/{META_FILE}"):
        info = json.loads(meta.read_text())
        if info.get("recipe") == recipe and (meta.parent / "checkpoints" / "last.ckpt").is_file():
            candidates.append((meta.stat().st_mtime, meta.parent))
    if not candidates:
        raise UserError(f"--resume auto: no run of recipe {recipe!r} with checkpoints/last.ckpt under {str(root)!r}.")
    return max(candidates)[1]


def resume_checkpoint(run_dir: Path) -> Path:
    """The run's newest readable checkpoint (normally ``last.ckpt``); a truncated or corrupt
    newer one is skipped with a warning."""
    folder = run_dir / "checkpoints"
    candidates = list(folder.glob("*.ckpt")) if folder.is_dir() else []
    if not candidates:
        raise UserError(f"cannot resume {str(run_dir)!r}: no checkpoint in {folder}.")
    chosen = newest_readable(candidates)
    if chosen is None:
        raise UserError(f"cannot resume {str(run_dir)!r}: none of its checkpoints is readable "
                          f"({', '.join(sorted(p.name for p in candidates))}).")
    return chosen


def eval_checkpoint(path: str | Path) -> Path:
    """A checkpoint (a file, or a folder of FSDP/DeepSpeed shards), or a run directory (its
    best checkpoint, else its last)."""
    path = Path(path)
    if path.is_file() or sharded_checkpoint_kind(path):
        if not readable_checkpoint(path):
            raise UserError(f"checkpoint {str(path)!r} cannot be read: truncated, or not a checkpoint.")
        return path
    if path.is_dir():
        best = sorted((path / "checkpoints").glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime)
        if best:
            return best[-1]
        return resume_checkpoint(path)
    raise UserError(f"checkpoint {str(path)!r}: no such file or run directory.")


def run_dir_of(path: str | Path) -> Path | None:
    """The run directory ``path`` is, or the one a checkpoint in it belongs to
    (``runs/<run>/checkpoints/best-step=100.ckpt``); None outside a run."""
    path = Path(path)
    is_checkpoint = path.is_file() or (path.is_dir() and sharded_checkpoint_kind(path) is not None)
    for candidate in ([path.parent, path.parent.parent] if is_checkpoint else [path]):
        if (candidate / CONFIG_FILE).is_file() and (candidate / META_FILE).is_file():
            return candidate
    return None


def write_run_files(run_dir: Path, config_yaml: str, recipe: str, wandb_id: str) -> None:
    if is_global_zero():
        (run_dir / CONFIG_FILE).write_text(config_yaml)
        (run_dir / META_FILE).write_text(json.dumps({"recipe": recipe, "wandb_id": wandb_id}, indent=2))


def read_meta(run_dir: Path) -> dict[str, Any]:
    meta = run_dir / META_FILE
    return json.loads(meta.read_text()) if meta.is_file() else {}


def new_wandb_id() -> str:
    return secrets.token_hex(4)
