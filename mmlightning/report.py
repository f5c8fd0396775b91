"""The perception report of ``mml eval``: what a checkpoint can do, measured as papers do.

Sections: the task's own test metrics (retrieval R@1/5/10 both ways for CLIP, VQA accuracy
by question type beside a blind baseline, captioning BLEU/ROUGE-L/CIDEr-D), then, for
each labelled image set (the recipe's, and any ``--image-folder``), zero-shot
classification (CLIP only: top-1/top-5 over the prompt templates, with a per-class table)
and linear probes on frozen image features (k = 1, 4, 16 images per class, and all).
Measured in one process (rank 0) after the Trainer's test run.

A section is plain data (``section``/``table``), so the JSON, the Markdown, the bar chart
and the W&B run are four renderings of one dict. Tasks describe their own metrics by
overriding ``TaskModule.report_sections``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from mmlightning.data_modules.base import LabelledImages
from mmlightning.data_modules.common import already_batched
from mmlightning.encoders.tokenizers import tokenize
from mmlightning.loggers import wandb_mode
from mmlightning.metrics import TopKAccuracy
from mmlightning.metrics.linear_probe import linear_probe
from mmlightning.report_blocks import section, table


# ---------------------------------------------------------------------- measuring
@torch.no_grad()
def image_features(task: Any, dataset: Dataset, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features (``task.image_features``) and labels of every image in ``dataset``."""
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=already_batched)
    features, labels = [], []
    for batch in loader:
        features.append(task.image_features(batch["image"].to(task.device)).float().cpu())
        labels.append(batch["label"])
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def classification_sections(task: Any, data: LabelledImages, shots: tuple[int, ...], seeds: int) -> list[dict[str, Any]]:
    """Zero-shot (when the task embeds text) and linear probes on one labelled image set."""
    classes = data.classes
    progress(f"{data.name}: embedding {len(data.test)} test and {len(data.train)} training images")
    test_x, test_y = image_features(task, data.test)
    out = []
    n_classes = len(classes.classnames)
    skipped = ([f"Skipped {len(data.skipped)} file(s) that do not decode as images, e.g. {data.skipped[0]}."]
               if data.skipped else [])
    if skipped:
        warnings.warn(f"{data.name}: {skipped[0]}", stacklevel=2)
    if hasattr(task, "zero_shot_classifier"):
        unknown = unspellable(task.data_spec().tokenizer, classes.classnames, task.data_spec().max_length)
        if unknown:
            warnings.warn(f"zero-shot on {data.name}: the text tower's tokenizer cannot spell {len(unknown)} of "
                          f"{n_classes} class names ({', '.join(unknown[:5])}): they become unknown tokens, and "
                          f"the score says little.", stacklevel=2)
        metric = TopKAccuracy(n_classes, classes.groups, sync_on_compute=False)  # one process computes the report
        metric.update(test_x @ task.zero_shot_classifier(classes).float().cpu().T, test_y, torch.arange(len(test_y)))
        scores = {k: float(v) for k, v in metric.compute().items()}
        images, accuracy = metric.per_class()  # columns: top-1, top-5
        rows = [[name, int(images[i]), round(float(accuracy[i, 0]), 4), round(float(accuracy[i, 1]), 4)]
                for i, name in enumerate(classes.classnames)]
        group_rows = [[g or "all", round(scores[f"top1{s}"], 4), round(scores[f"top5{s}"], 4)]
                      for g, s in [("", ""), *((g, f"_{g}") for g in classes.groups)]]
        templates = ", ".join(f"'{t}'" for t in classes.templates)
        out.append(section(
            f"Zero-shot classification: {data.name}",
            {f"{data.name} zero-shot top-1": scores["top1"]},
            [table(["classes", "top-1", "top-5"], group_rows, f"{len(test_y)} test images, {n_classes} classes"),
             table(["class", "images", "top-1", "top-5"], rows, "per class")],
            [f"Class embedding: the mean of the normalised text embeddings of {len(classes.templates)} "
             f"template(s): {templates}.",
             *([f"Warning: {len(unknown)} of {n_classes} class names tokenize to unknown tokens "
                f"({', '.join(unknown[:10])}): the text tower cannot tell them apart."] if unknown else []),
             *skipped]))
    train_x, train_y = image_features(task, data.train)
    progress(f"{data.name}: fitting linear probes ({', '.join(f'{k}-shot' for k in shots)} x {seeds} draws, and all "
             f"{len(train_y)} images)")
    probe = linear_probe(train_x.numpy(), train_y.numpy(), test_x.numpy(), test_y.numpy(), shots=shots, seeds=seeds)
    rows = [[k, round(v["top1"], 4), round(v["std"], 4), v["seeds"], f"{v['C']:g}"] for k, v in probe.items()]
    out.append(section(
        f"Linear probe: {data.name}",
        {f"{data.name} probe {k}": v["top1"] for k, v in probe.items()},
        [table(["training images", "top-1", "std over draws", "draws", "C"], rows,
               f"{len(train_y)} training / {len(test_y)} test images, {n_classes} classes")],
        ["Logistic regression (scikit-learn, L-BFGS) on frozen image features, standardised; C from "
         "{0.01, 0.1, 1, 10, 100} by accuracy on held-out training images, never the test set.",
         *skipped_shots(shots, probe, train_y), *skipped]))
    return out


def progress(message: str) -> None:
    """A line on stderr while the report is measured (probes can take minutes); stdout keeps
    the report itself."""
    print(f"[{time.strftime('%H:%M:%S')}] eval: {message}", file=sys.stderr, flush=True)


def unspellable(tokenizer: Any, names: list[str], max_length: int) -> list[str]:
    """The names that tokenize to the tokenizer's unknown token (a closed vocabulary, such as
    the shapes world's, cannot spell "astronaut")."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not names:
        return []
    ids = tokenize(tokenizer, list(names), max_length)["input_ids"]
    return [name for name, row in zip(names, ids) if bool((row == unk).any())]


def skipped_shots(shots: tuple[int, ...], probe: dict[str, Any], train_y: torch.Tensor) -> list[str]:
    skipped = [str(k) for k in shots if f"{k}-shot" not in probe]
    if not skipped:
        return []
    smallest = int(torch.bincount(train_y).min())
    return [f"Skipped {', '.join(skipped)}-shot: the smallest class has {smallest} training image(s)."]


def build_report(task: Any, recipe: str, checkpoint: Path, test_metrics: dict[str, float],
                 labelled: list[LabelledImages], shots: tuple[int, ...] = (1, 4, 16), seeds: int = 3) -> dict[str, Any]:
    task.eval()
    sections = task.report_sections({k.removeprefix("test/"): float(v) for k, v in test_metrics.items()})
    for data in labelled:
        sections += classification_sections(task, data, shots, seeds)
    return {"recipe": recipe, "task": (task.recipe or {}).get("task"), "checkpoint": str(checkpoint),
            "created": time.strftime("%Y-%m-%d %H:%M:%S"), "sections": sections,
            "headline": {k: v for s in sections for k, v in s["headline"].items()},
            "test_metrics": {k: float(v) for k, v in sorted(test_metrics.items())}}


# ---------------------------------------------------------------------- rendering
def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "" if value is None else str(value)


def to_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Perception report: {report['recipe']}", "",
             f"Checkpoint `{report['checkpoint']}`, {report['created']}.", ""]
    for sec in report["sections"]:
        lines += [f"## {sec['title']}", ""]
        for tab in sec["tables"]:
            if tab["caption"]:
                lines += [f"*{tab['caption']}*", ""]
            lines += ["| " + " | ".join(tab["columns"]) + " |", "|" + "---|" * len(tab["columns"])]
            lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in tab["rows"]]
            lines.append("")
        lines += [*sec["notes"], ""] if sec["notes"] else []
    return "\n".join(lines)


def bar_chart(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    labels, values = list(report["headline"]), list(report["headline"].values())
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(labels) + 1.2))
    bars = ax.barh(labels[::-1], values[::-1], color="#4C72B0")
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in values[::-1]], padding=3, fontsize=8)
    ax.set_xlim(0, max(1.0, max(values, default=1.0) * 1.15))  # CIDEr can pass 1
    ax.set_title(f"{report['recipe']}: {Path(report['checkpoint']).name}", fontsize=10)
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], checkpoint: Path) -> dict[str, Path]:
    """``<checkpoint>.report.{json,md,png}`` beside the checkpoint."""
    paths = {kind: checkpoint.with_name(f"{checkpoint.stem}.report.{suffix}")
             for kind, suffix in (("json", "json"), ("markdown", "md"), ("chart", "png"))}
    paths["json"].write_text(json.dumps(report, indent=2))
    paths["markdown"].write_text(to_markdown(report))
    bar_chart(report, paths["chart"])
    return paths


def log_to_wandb(report: dict[str, Any], paths: dict[str, Path], cfg: dict[str, Any], run_dir: Path) -> str | None:
    """A W&B run of its own (job type ``eval``, grouped with the training run): headline
    numbers in its summary, each table as a W&B table, the chart as an image. Returns the
    run's local directory, or None when the recipe's logger is not W&B."""
    spec = dict(cfg.get("logger") or {})
    if spec.get("name") != "wandb":
        return None
    import wandb

    os.environ["WANDB_DIR"] = str(run_dir.resolve())
    run = wandb.init(project=spec.get("project") or "mmlightning", entity=spec.get("entity"), dir=str(run_dir.resolve()),
                     group=spec.get("group") or run_dir.name, job_type="eval", name=f"{run_dir.name}-eval",
                     mode=wandb_mode(str(spec.get("mode", "auto"))), tags=list(spec.get("tags") or []),
                     config={"checkpoint": report["checkpoint"], "recipe": report["recipe"]}, reinit="create_new")
    run.summary.update({f"eval/{k}": v for k, v in report["headline"].items()})
    logged: dict[str, Any] = {"eval/chart": wandb.Image(str(paths["chart"]))}
    for sec in report["sections"]:
        for tab in sec["tables"]:
            key = f"eval/{sec['title']}" + (f" ({tab['caption']})" if len(sec["tables"]) > 1 and tab["caption"] else "")
            logged[key] = wandb.Table(columns=tab["columns"], data=tab["rows"])
    run.log(logged)
    directory = str(Path(run.dir).parent)
    run.finish()
    return directory
