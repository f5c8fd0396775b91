"""Few-shot adaptation of one CLIP, every method side by side: zero-shot, linear probe, CoOp,
CoCoOp and full fine-tuning at k shots per class (several draws: mean and spread), and
CoCoOp's base-to-new protocol (prompts learnt on the first half of the classes, tested on
them and on the other half; the harmonic mean of the two).

    python benchmarks/few_shot.py --data digits --clip runs/lit      # mml fit lit-shapes-pretrained run.name=lit
    python benchmarks/few_shot.py --data shapes --clip runs/clip     # mml fit clip-shapes run.name=clip

Every method runs through the framework's own recipes (``coop-shapes`` / ``classify-shapes``
with the data swapped) and the same k-shot draws (``data.shot_seed`` = the draw, as the
linear probe of ``mml eval`` draws them). Each training run takes ``--steps`` optimizer
steps whatever k is (a small training set is repeated), with no validation; the test split
is the data's whole test split. Prints Markdown tables for docs/tasks/classification.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine_line  # noqa: E402

DATA = {"digits": ["data.name=digits"], "shapes": ["data.name=shapes_objects"]}
CLASSES = {"digits": 10, "shapes": 48}


def quiet_main(argv: list[str]) -> None:
    from mmlightning.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(argv)
    if code != 0:
        raise RuntimeError(f"mml {' '.join(argv)} failed:\n{err.getvalue()[-3000:]}")


def fit(recipe: str, overrides: list[str], root: Path) -> tuple[dict[str, float], str]:
    """Test metrics of one training run, and its checkpoint."""
    name = f"run{len(list(root.iterdir()))}"
    quiet_main(["fit", recipe, *overrides, f"run.root={root}", f"run.name={name}", "logger.name=none"])
    summary = json.loads((root / name / "summary.json").read_text())
    return summary["test"], summary["best_checkpoint"] or summary["last_checkpoint"]


def test_only(recipe: str, overrides: list[str], ckpt: str | None = None) -> dict[str, float]:
    """Test metrics of a recipe's model as built (or from ``ckpt``), without training."""
    from mmlightning import config as C
    from mmlightning.build import build_datamodule, build_task, resolve_precision

    cfg = C.resolve(C.load_recipe(recipe, overrides))
    task = build_task(cfg)
    datamodule = build_datamodule(cfg, task)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False, accelerator="cpu",
                        precision=resolve_precision(cfg["trainer"]["precision"]))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return trainer.test(task, datamodule=datamodule, ckpt_path=ckpt, verbose=False)[0]


def schedule(k: int, classes: int, steps: int, batch: int) -> list[str]:
    repeats = max(1, math.ceil(steps * batch / (k * classes)))
    return [f"data.batch_size={batch}", f"data.train_repeats={repeats}", "trainer.max_epochs=1",
            f"trainer.limit_train_batches={steps}", "trainer.limit_val_batches=0", "checkpoint.monitor=null",
            f"scheduler.warmup_steps={max(1, steps // 10)}"]


def cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.pstdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=sorted(DATA), required=True)
    parser.add_argument("--clip", required=True, help="a clip run directory or checkpoint (or open_clip:/hf:)")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of CoOp and fine-tuning runs")
    parser.add_argument("--cocoop-steps", type=int, default=40)
    parser.add_argument("--cocoop-batch", type=int, default=8, help="CoCoOp runs the text tower once per image")
    parser.add_argument("--methods", nargs="+", default=["zero-shot", "linear probe", "CoOp", "CoCoOp", "fine-tune"])
    parser.add_argument("--no-base-to-new", action="store_true")
    parser.add_argument("--overrides", nargs="*", default=[], help="recipe overrides for every run, e.g. data sizes")
    args = parser.parse_args()
    start = time.time()
    classes = CLASSES[args.data]
    data = [*DATA[args.data], f"model.clip={args.clip}", *args.overrides]
    coop = ["model.prompt={name: coop, n_ctx: 4}", "optimizer.lr=0.02"]
    cocoop = ["model.prompt={name: cocoop, n_ctx: 4}", "optimizer.lr=0.02"]
    finetune = ["model.head_init=zero_shot", "optimizer.lr=1.0e-4"]
    methods = {"CoOp": ("coop-shapes", coop, args.steps, 32), "CoCoOp": ("coop-shapes", cocoop, args.cocoop_steps,
                                                                         args.cocoop_batch),
               "fine-tune": ("classify-shapes", finetune, args.steps, 32)}
    print(f"# few-shot on {args.data} from {args.clip}; {machine_line()}", flush=True)
    cells: dict[str, dict[int, str]] = {m: {} for m in args.methods}  # "mean ± spread" per method and k
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        zero_shot = test_only("classify-shapes", [*data, "model.head_init=zero_shot"])["test/top1"]
        if "linear probe" in args.methods:
            from mmlightning import config as C
            from mmlightning.build import build_datamodule, build_task
            from mmlightning.metrics.linear_probe import linear_probe
            from mmlightning.report import image_features

            cfg = C.resolve(C.load_recipe("classify-shapes", data))
            task = build_task(cfg)
            labelled = build_datamodule(cfg, task).labelled_images()
            train_x, train_y = image_features(task, labelled.train)
            test_x, test_y = image_features(task, labelled.test)
            probe = linear_probe(train_x.numpy(), train_y.numpy(), test_x.numpy(), test_y.numpy(),
                                 shots=tuple(args.shots), seeds=args.draws)
        for k in args.shots:
            for method in args.methods:
                if method == "zero-shot":
                    cells[method][k] = cell([zero_shot])
                elif method == "linear probe":
                    row = probe.get(f"{k}-shot")  # absent where k exceeds the smallest class
                    cells[method][k] = f"{row['top1']:.3f} ± {row['std']:.3f}" if row else "-"
                else:
                    recipe, extra, steps, batch = methods[method]
                    cells[method][k] = cell([fit(recipe, [*data, *extra, *schedule(k, classes, steps, batch),
                                                         f"data.shots={k}", f"data.shot_seed={d}"], root)[0]["test/top1"]
                                             for d in range(args.draws)])
            print(f"k={k}: " + ", ".join(f"{m} {cells[m][k]}" for m in args.methods), file=sys.stderr, flush=True)
        print(f"\n| method | {' | '.join(f'{k}-shot' for k in args.shots)} |")
        print("|---|" + "---|" * len(args.shots))
        for method in args.methods:
            print(f"| {method} | " + " | ".join(cells[method][k] for k in args.shots) + " |")
        if not args.no_base_to_new:
            k = max(args.shots)
            rows = {"zero-shot": ([test_only("classify-shapes", [*data, "model.head_init=zero_shot",
                                                                 f"data.class_subset={s}"])["test/top1"]]
                                  for s in ("base", "new"))}
            for method in ("CoOp", "CoCoOp"):
                recipe, extra, steps, batch = methods[method]
                base, new = [], []
                for d in range(args.draws):
                    overrides = [*data, *extra, *schedule(k, math.ceil(classes / 2), steps, batch), f"data.shots={k}",
                                 f"data.shot_seed={d}"]
                    metrics, ckpt = fit(recipe, [*overrides, "data.class_subset=base"], root)
                    base.append(metrics["test/top1"])
                    new.append(test_only(recipe, [*overrides, "data.class_subset=new"], ckpt)["test/top1"])
                rows[method] = (base, new)
            print(f"\nBase-to-new ({k} shots per base class, {args.draws} draws):\n")
            print("| method | base | new | harmonic mean |\n|---|---|---|---|")
            for method, (base, new) in rows.items():
                harmonic = [2 * b * n / (b + n) if b + n else 0.0 for b, n in zip(base, new)]
                print(f"| {method} | {cell(base)} | {cell(new)} | {cell(harmonic)} |")
    print(f"\n{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
