"""Test-split accuracy of a shapes VQA run by question family and direction word ("left" /
"right"): the run's summary reports relational families as a whole, and on the shapes world
the two directions are learnt at different times (docs/experiments/relational-vqa.md, "Seeds,
the learning rate and its floor"). Reads the run's own config and the checkpoint `mml fit`
tested (its best, else its last), batches the test split as the run's test did, and prints a
Markdown table whose family totals match the run's summary when the precision matches the
one it tested at.

    python benchmarks/vqa_directions.py runs/vqa-shapes-...
    python benchmarks/vqa_directions.py runs/x --ckpt runs/x/checkpoints/last.ckpt --precision 32-true
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch

from mmlightning.build import build_datamodule, build_task, resolve_precision
from mmlightning.config import load_recipe, resolve
from mmlightning.data_modules.shapes_world import direction_word
from mmlightning.runs import CONFIG_FILE, eval_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a shapes VQA run directory")
    parser.add_argument("--ckpt", type=Path, help="default: the run's best checkpoint, else its last")
    parser.add_argument("--precision", choices=["bf16-mixed", "32-true"],
                        help="CPU autocast; default: the run's trainer.precision as resolved on this machine")
    args = parser.parse_args()
    cfg = resolve(load_recipe(args.run / CONFIG_FILE))
    task = build_task(cfg, load_pretrained=False)  # the checkpoint holds every weight
    data = build_datamodule(cfg, task)
    data.setup("test")
    ckpt = eval_checkpoint(args.ckpt or args.run)
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    task.on_load_checkpoint(checkpoint)  # refuses a checkpoint whose answer vocabulary differs
    task.load_state_dict(checkpoint["state_dict"])
    task.eval()
    precision = args.precision or str(resolve_precision(cfg["trainer"]["precision"]))
    bf16 = precision.startswith("bf16")
    correct, seen = Counter(), Counter()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for batch in data.test_dataloader():
            predicted = task(batch["image"], batch["input_ids"], batch["attention_mask"]).argmax(-1).tolist()
            for k, question in enumerate(batch["question"]):
                key = (data.question_types[int(batch["question_type"][k])], direction_word(question))
                seen[key] += 1
                correct[key] += task.answers[predicted[k]] == batch["answer"][k]
    print(f"checkpoint: {ckpt}")
    print(f"precision: {'bf16-mixed' if bf16 else '32-true'}")
    print("| question family | direction | accuracy | questions |")
    print("|---|---|---|---|")
    for family, word in sorted(seen):
        n = seen[family, word]
        print(f"| {family} | {word} | {correct[family, word] / n:.3f} | {n} |")


if __name__ == "__main__":
    main()
