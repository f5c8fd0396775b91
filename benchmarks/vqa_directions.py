"""Test-split accuracy of a shapes VQA run by question family and direction word ("left" /
"right"): the run's summary reports relational families as a whole, and on the shapes world
the two directions are learnt at different times (README, "Why relational questions sat at
chance"). Prints a Markdown table.

    python benchmarks/vqa_directions.py runs/vqa-shapes-...          # the run's last.ckpt
    python benchmarks/vqa_directions.py runs/x --ckpt runs/x/checkpoints/best-step=1302.ckpt
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch

from mmlightning.build import build_datamodule, build_task, resolve_precision
from mmlightning.config import load_recipe, resolve
from mmlightning.runs import CONFIG_FILE


def direction(question: str) -> str:
    words = question.split()
    return "left" if "left" in words else "right" if "right" in words else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a vqa-shapes run directory")
    parser.add_argument("--ckpt", type=Path, help="default: the run's checkpoints/last.ckpt")
    parser.add_argument("--batch-size", type=int, default=512)
    args = parser.parse_args()
    # the run's own resolved config; its towers come from the checkpoint, not from init_from
    cfg = resolve(load_recipe(args.run / CONFIG_FILE, ["logger.name=none", "model.init_from=null"]))
    task = build_task(cfg)
    data = build_datamodule(cfg, task)
    data.setup("test")
    checkpoint = torch.load(args.ckpt or args.run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    task.load_state_dict(checkpoint["state_dict"])
    task.eval()
    dataset = data.datasets["test"]
    right, seen = Counter(), Counter()
    # the precision the run's own test used, so the totals match its summary
    bf16 = str(resolve_precision(cfg["trainer"]["precision"])).startswith("bf16")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, len(dataset), args.batch_size):
            batch = dataset.__getitems__(list(range(start, min(start + args.batch_size, len(dataset)))))
            predicted = task(batch["image"], batch["input_ids"], batch["attention_mask"]).argmax(-1).tolist()
            for k, question in enumerate(batch["question"]):
                key = (data.question_types[int(batch["question_type"][k])], direction(question))
                seen[key] += 1
                right[key] += task.answers[predicted[k]] == batch["answer"][k]
    print(f"run: {args.run}")
    print("| question family | direction | accuracy | questions |")
    print("|---|---|---|---|")
    for family, word in sorted(seen):
        n = seen[family, word]
        print(f"| {family} | {word} | {right[family, word] / n:.3f} | {n} |")


if __name__ == "__main__":
    main()
