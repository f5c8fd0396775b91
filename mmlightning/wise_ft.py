"""WiSE-FT (Wortsman et al., 2022, "Robust fine-tuning of zero-shot models"): interpolate a
run's starting weights and its fine-tuned weights, ``theta = (1 - a) * theta_start + a *
theta_finetuned``, every float tensor of the state dict (BatchNorm statistics included), as
the paper's code does.

``mml eval <run> --wise-ft 0 0.25 0.5 0.75 1`` measures the task's headline metrics at each
``a`` (a table and a line chart in the report); ``mml wise-ft <run> --alpha 0.5`` writes the
chosen point as a checkpoint in the run, which every command takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmlightning.build import build_task
from mmlightning.errors import UserError
from mmlightning.fault_tolerance import load_checkpoint
from mmlightning.report_blocks import section, table


def check_alphas(alphas: list[float]) -> list[float]:
    bad = [a for a in alphas if not 0.0 <= a <= 1.0]
    if bad or not alphas:
        raise UserError(f"WiSE-FT mixing coefficients must lie in [0, 1] (0: the starting weights, 1: the "
                        f"fine-tuned ones); got {alphas}.")
    return sorted(set(alphas))


def starting_weights(cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights the run started from: the model built from its recipe, which loads
    ``model.pretrained`` (or ``model.init_from``) as training did."""
    model = cfg.get("model") or {}
    if not (model.get("pretrained") or model.get("init_from")):
        raise UserError(f"WiSE-FT interpolates between the weights a run started from and its fine-tuned ones; "
                        f"recipe {cfg.get('recipe')!r} starts from fresh weights (no model.pretrained or "
                        f"model.init_from), so there is no zero-shot model to go back to.")
    return build_task(cfg, load_pretrained=True).state_dict()  # the model is not kept: no copy needed


def interpolate(start: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    if start.keys() != finetuned.keys():
        only = sorted(set(start) ^ set(finetuned))
        raise UserError(f"WiSE-FT: the starting and fine-tuned models hold different weights ({only[:5]}).")
    return {k: torch.lerp(start[k].to(v), v, alpha) if v.is_floating_point() else v for k, v in finetuned.items()}


def measure(task: Any, trainer: Any, datamodule: Any, start: dict[str, torch.Tensor], alphas: list[float]) \
        -> list[tuple[float, dict[str, float]]]:
    """The test metrics at each ``alpha``; the task holds its fine-tuned weights again after."""
    finetuned = {k: v.detach().clone() for k, v in task.state_dict().items()}
    points = []
    try:
        for alpha in alphas:
            task.load_state_dict(interpolate(start, finetuned, alpha))
            results = trainer.test(task, datamodule=datamodule, verbose=False)
            points.append((alpha, {k.removeprefix("test/"): float(v) for k, v in (results[0] if results else {}).items()}))
    finally:
        task.load_state_dict(finetuned)
    return points


def shown_metrics(points: list[tuple[float, dict[str, float]]], metrics: tuple[str, ...]) -> list[str]:
    """The task's headline metrics that every point has, else every metric measured."""
    return [m for m in metrics if all(m in p for _, p in points)] or sorted(points[0][1])


def report_section(points: list[tuple[float, dict[str, float]]], metrics: tuple[str, ...]) -> dict[str, Any]:
    shown = shown_metrics(points, metrics)
    best = {m: max(points, key=lambda p: p[1][m])[0] for m in shown}
    rows = [[f"{alpha:g}", *[round(p[m], 4) for m in shown]] for alpha, p in points]
    return section("WiSE-FT: starting weights to fine-tuned", {},
                   [table(["alpha", *shown], rows, "theta = (1 - alpha) * theta_start + alpha * theta_finetuned")],
                   ["alpha 0 is the model the run started from (model.pretrained / model.init_from), 1 the "
                    "checkpoint. Best alpha per metric: " + ", ".join(f"{m} {a:g}" for m, a in best.items()) + ". "
                    "`mml wise-ft <run> --alpha A` writes that point as a checkpoint."])


def line_chart(points: list[tuple[float, dict[str, float]]], metrics: tuple[str, ...], title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = shown_metrics(points, metrics)
    fig, ax = plt.subplots(figsize=(6, 4))
    alphas = [a for a, _ in points]
    for m in shown:
        ax.plot(alphas, [p[m] for _, p in points], marker="o", label=m)
    ax.set_xlabel("alpha (0: starting weights, 1: fine-tuned)")
    ax.set_ylabel("test metric")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_checkpoint(cfg: dict[str, Any], checkpoint: Path, alpha: float) -> Path:
    """``wise-ft-<alpha>.ckpt`` beside ``checkpoint``: its recipe and Lightning metadata, the
    interpolated weights, and no optimizer state (moments of other weights would mislead)."""
    alpha = check_alphas([alpha])[0]
    saved = load_checkpoint(checkpoint)
    start = starting_weights(cfg)
    ours = {k: v for k, v in saved["state_dict"].items() if k in start}
    merged = interpolate(start, ours, alpha)
    saved["state_dict"] = {**saved["state_dict"], **merged}
    saved["optimizer_states"], saved["lr_schedulers"] = [], []
    saved["wise_ft"] = {"alpha": alpha, "fine_tuned": str(checkpoint)}
    out = checkpoint.with_name(f"wise-ft-{alpha:g}.ckpt")
    tmp = out.with_suffix(".tmp")
    torch.save(saved, tmp)
    tmp.replace(out)  # never a half-written checkpoint under the final name
    return out
