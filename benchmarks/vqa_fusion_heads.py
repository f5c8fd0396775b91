"""What each fusion head reaches on the shapes world: `mml fit vqa-shapes` once per head, from
the same CLIP run, same data, same budget; prints a Markdown table of test accuracy (overall,
relational, non-relational, per family) with the blind baseline and the wall time.

    python benchmarks/vqa_fusion_heads.py --init-from runs/clip data.num_train=10000 trainer.max_epochs=3

Extra arguments are overrides for every run. Runs go to runs/heads-<head>/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HEADS = {
    "concat": "{name: concat, hidden_dim: 256}",
    "product": "{name: product, hidden_dim: 256}",
    "bilinear": "{name: bilinear, rank: 512, hidden_dim: 256}",
    "film": "{name: film, channels: 64, blocks: 4, directional: false, hidden_dim: 256}",
    "stacked_attention": "{name: stacked_attention, glimpses: 3, attention_dim: 256, hidden_dim: 256}",
    "co_attention": "{name: co_attention, width: 128, heads: 4, hidden_dim: 256}",
    "relation_network": "{name: relation_network, pool: 2, pair_dim: 128, pair_layers: 3, hidden_dim: 256}",
    "single_stream": "{name: single_stream, width: 128, layers: 2, heads: 4, hidden_dim: 256}",
}
COLUMNS = ["acc", "acc_relational", "acc_relative_position", "acc_neighbour_colour", "acc_non_relational",
           "acc_colour", "acc_shape", "acc_size", "acc_count", "acc_exist"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init-from", required=True, help="a clip-shapes run directory")
    parser.add_argument("--heads", nargs="*", default=list(HEADS))
    parser.add_argument("--root", default="runs")
    args, overrides = parser.parse_known_args()
    rows = []
    for head in args.heads:
        run = Path(args.root) / f"heads-{head}"
        cmd = [sys.executable, "-m", "mmlightning.cli", "fit", "vqa-shapes", f"model.init_from={args.init_from}",
               f"model.fusion={HEADS[head]}", f"run.root={args.root}", f"run.name=heads-{head}",
               "logger.name=csv", *overrides]
        start = time.time()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        test = json.loads((run / "summary.json").read_text())["test"]
        rows.append((head, test, time.time() - start))
        print(f"{head}: acc {test['test/acc']:.3f}, relational {test.get('test/acc_relational', float('nan')):.3f}",
              file=sys.stderr)
    print(f"command: {' '.join(['python', *sys.argv])}")
    print("| head | " + " | ".join(c.removeprefix("acc_") if c != "acc" else "overall" for c in COLUMNS) + " | wall |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    blind = rows[0][1]
    print("| blind baseline | " + " | ".join(f"{blind.get('test/blind_' + c, float('nan')):.3f}" for c in COLUMNS)
          + " | |")
    for head, test, seconds in rows:
        print(f"| `{head}` | " + " | ".join(f"{test.get('test/' + c, float('nan')):.3f}" for c in COLUMNS)
              + f" | {seconds / 60:.1f} min |")


if __name__ == "__main__":
    main()
