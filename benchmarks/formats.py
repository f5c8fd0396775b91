"""The same shapes-world data through every reader: `mml fit clip-shapes` by data override
from webdataset shards, Parquet, CSV and COCO JSON (all written by `mml data write` from the
same seed), beside the recipe's own in-memory `shapes_clip`, with the test retrieval metrics
of each run side by side.

    python benchmarks/formats.py --epochs 5

Each run is the recipe as it is (towers, loss, optimizer, seed) with only ``data`` replaced
and ``trainer.max_epochs`` set; the file readers use ``--workers`` loader workers. A stream
reader's epoch is one caption per image; ``coco_captions`` trains on every caption once per
epoch, so its epoch has more steps (the table shows them).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine_line  # noqa: E402

METRICS = ("test/i2t_R@1", "test/t2i_R@1", "test/mean_recall")


def write_data(root: Path, num: dict[str, int], formats: list[str]) -> None:
    from mmlightning.cli import main

    for fmt in formats:
        for split, n in num.items():
            out = root / fmt / split
            if not out.exists():
                assert main(["data", "write", "shapes", str(out), "--format", fmt, "--split", split, "--num", str(n),
                             "--image-format", "png", "--shard-size", "1000"]) == 0


def data_override(root: Path, fmt: str, batch: int, workers: int) -> str:
    common = f"batch_size: {batch}, num_workers: {workers}"
    if fmt == "wds":
        return (f"data={{name: wds_captions, train_shards: {root}/wds/train, val_shards: {root}/wds/val, "
                f"test_shards: {root}/wds/test, {common}, eval_batch_size: 500}}")
    if fmt in ("parquet", "csv"):
        spec = (lambda s: f"{root}/{fmt}/{s}") if fmt == "parquet" else (lambda s: f"{root}/csv/{s}/captions.csv")
        return (f"data={{name: table_captions, train_data: {spec('train')}, val_data: {spec('val')}, "
                f"test_data: {spec('test')}, {common}, eval_batch_size: 500}}")
    paths = {s: (f"{root}/coco/{s}/annotations/captions_{s}2017.json", f"{root}/coco/{s}/{s}2017")
             for s in ("train", "val", "test")}
    return (f"data={{name: coco_captions, train_json: {paths['train'][0]}, train_images: {paths['train'][1]}, "
            f"val_json: {paths['val'][0]}, val_images: {paths['val'][1]}, test_json: {paths['test'][0]}, "
            f"test_images: {paths['test'][1]}, {common}, eval_batch_size: 500}}")


def fit(fmt: str, root: Path, args: argparse.Namespace) -> dict[str, float]:
    from mmlightning.cli import main

    data = [data_override(root, fmt, args.batch_size, args.workers)]
    if fmt == "shapes":  # the recipe's own data, at the same sizes
        data = [f"data.num_train={args.num_train}", f"data.num_val={args.num_val}", f"data.num_test={args.num_test}",
                f"data.batch_size={args.batch_size}"]
    name = f"formats-{fmt}"
    start = time.perf_counter()
    assert main(["fit", "clip-shapes", *data, f"trainer.max_epochs={args.epochs}", "logger.name=none",
                 f"run.name={name}", f"run.root={root / 'runs'}", *args.overrides]) == 0
    seconds = time.perf_counter() - start
    summary = json.loads((root / "runs" / name / "summary.json").read_text())
    return {**{m: summary["test"][m] for m in METRICS}, "steps": summary["global_step"], "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-train", type=int, default=20000)
    parser.add_argument("--num-val", type=int, default=1000)
    parser.add_argument("--num-test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--formats", nargs="+", default=["shapes", "wds", "parquet", "csv", "coco"])
    parser.add_argument("--out", default="runs/formats", help="data and runs go here (data is reused)")
    parser.add_argument("--overrides", nargs="*", default=[], help="more recipe overrides for every run")
    args = parser.parse_args()
    root = Path(args.out).resolve()
    write_data(root, {"train": args.num_train, "val": args.num_val, "test": args.num_test},
               [f for f in args.formats if f != "shapes"])
    results = {fmt: fit(fmt, root, args) for fmt in args.formats}
    print(machine_line())
    print(f"clip-shapes, {args.epochs} epochs, {args.num_train} / {args.num_val} / {args.num_test} images, "
          f"batch {args.batch_size}, {args.workers} loader workers for the file readers")
    print(f"{'data':<10} {'i2t R@1':>8} {'t2i R@1':>8} {'mean R':>8} {'steps':>6} {'seconds':>8}")
    for fmt, r in results.items():
        print(f"{fmt:<10} {r['test/i2t_R@1']:8.3f} {r['test/t2i_R@1']:8.3f} {r['test/mean_recall']:8.3f} "
              f"{r['steps']:6d} {r['seconds']:8.0f}")


if __name__ == "__main__":
    main()
