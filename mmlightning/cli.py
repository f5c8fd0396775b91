"""``mml``: list, show, copy, check and run recipes.

    mml ls [filter]                      recipes and their descriptions
    mml ls --components [--markdown]     every registered component name, by kind
    mml show RECIPE [key=value ...]      the resolved config
    mml cp RECIPE PATH                   copy a recipe to edit
    mml check RECIPE [key=value ...]     build everything, one forward pass, no training
    mml fit RECIPE [key=value ...] [--resume RUN_DIR|auto]
    mml validate|test RUN_DIR|CKPT [key=value ...]       (or RECIPE --ckpt CKPT_OR_RUN_DIR)
    mml eval RUN_DIR|CKPT [--image-folder DIR --template T ...]   perception report
    mml predict RUN_DIR|CKPT --images DIR [--out FILE] [--question TEXT]   caption, classify or answer
    mml export CKPT_OR_RUN_DIR --format open_clip|hf --out DIR
    mml data write shapes|coco OUT [--format wds|parquet|csv|coco|vqav2]  |  mml data convert IN OUT --format F
    mml data inspect IN

RECIPE is a packaged recipe's name or a path to a YAML file; a run directory (or a checkpoint
in one) stands for the recipe it was trained with, its own config.yaml. Overrides: ``key=value`` changes
a key, ``+key=value`` adds one, ``~key`` removes one. ``ls`` (without --components),
``show`` and ``cp`` never import torch. ``-v`` shows what other libraries print.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from mmlightning import config as C
from mmlightning.console import quiet_third_party
from mmlightning.errors import UserError


RECIPE_HELP = "a recipe name (mml ls lists them) or a path to a recipe YAML file"
OVERRIDES_HELP = "key=value changes (+key=value adds a key, ~key removes one), e.g. trainer.max_epochs=3"
EXAMPLES = {
    "ls": ["mml ls", "mml ls vqa", "mml ls --components timm"],
    "show": ["mml show clip-shapes trainer.max_epochs=3"],
    "check": ["mml check clip-shapes model.vision.width=16"],
    "cp": ["mml cp clip-shapes my-clip.yaml    # then: mml fit my-clip.yaml"],
    "fit": ["mml fit clip-shapes", "mml fit clip-shapes trainer.max_epochs=3 data.batch_size=128",
            "mml fit vqa-shapes model.init_from=runs/<clip-run>",
            "mml fit clip-finetune-coco model.pretrained=hf:/models/clip-vit-base-patch32",
            "mml fit clip-shapes --resume auto"],
    "validate": ["mml validate runs/<run>"],
    "test": ["mml test runs/<run>", "mml test clip-shapes --ckpt runs/<run>/checkpoints/last.ckpt"],
    "eval": ["mml eval runs/<run>", "mml eval runs/<run> --image-folder my_classes/ --template 'a photo of a {}.'",
             "mml eval runs/<run> --wise-ft 0 0.25 0.5 0.75 1"],
    "predict": ["mml predict runs/<run> --images my_images/ --out predictions.json"],
    "export": ["mml export runs/<run> --format open_clip --out exported/",
               "mml export runs/<run> --format hf --out exported-hf/"],
    "wise-ft": ["mml wise-ft runs/<run> --alpha 0.5"],
    "data": ["mml data write shapes shards/train --num 1000", "mml data write shapes coco/ --format coco",
             "mml data convert shards/train table/train --format parquet", "mml data inspect table/train"],
}
"""What each command's --help ends with."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mml", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traceback", action="store_true", help="show Python tracebacks for errors")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show what other libraries print (hardware lines, W&B banners, deprecation warnings)")
    # -v works after the command too: `mml fit clip-shapes -v`
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser = sub.add_parser

    def with_examples(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        examples = "\n".join(f"  {line}" for line in EXAMPLES.get(name, []))
        return add_parser(name, parents=[verbose], description=kwargs.get("help"),
                          epilog=f"examples:\n{examples}" if examples else None,
                          formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    sub.add_parser = with_examples  # type: ignore[method-assign]
    p = sub.add_parser("ls", help="list recipes, or with --components every registered component name")
    p.add_argument("filter", nargs="?", default="", help="only names that contain this")
    p.add_argument("--components", action="store_true", help="list the names a recipe can use, by kind")
    p.add_argument("--markdown", action="store_true", help="with --components: as the docs page docs/components.md")
    for name, text in (("show", "print the resolved config"), ("check", "build and run one forward pass")):
        p = sub.add_parser(name, help=text)
        p.add_argument("recipe", help=RECIPE_HELP)
        p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p = sub.add_parser("cp", help="copy a recipe to a file you can edit")
    p.add_argument("recipe", help=RECIPE_HELP)
    p.add_argument("path", help="the YAML file to write")
    p = sub.add_parser("fit", help="train, then test the best checkpoint")
    p.add_argument("recipe", help=RECIPE_HELP)
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--resume", help="a run directory, or 'auto' for the newest run of this recipe")
    for name in ("validate", "test"):
        p = sub.add_parser(name, help=f"evaluate on the {'validation' if name == 'validate' else 'test'} split")
        p.add_argument("recipe", help="a run directory or a checkpoint in one (built from the run's config), or a "
                       "recipe with --ckpt")
        p.add_argument("overrides", nargs="*", help="key=value changes on top, e.g. another test split")
        p.add_argument("--ckpt", help="checkpoint file or run directory (its best checkpoint)")
    p = sub.add_parser("eval", help="the perception report of a checkpoint: JSON, Markdown and a chart beside it")
    p.add_argument("recipe", help="a run directory or a checkpoint in one, or a recipe with --ckpt")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--ckpt", help="checkpoint file or run directory (its best checkpoint); `ckpt=...` works too")
    p.add_argument("--image-folder", help="also classify this folder of class-named subfolders (zero-shot, probes)")
    p.add_argument("--template", action="append", help="prompt template for --image-folder classes, with {} for the "
                   "class name; repeat for several (default: the recipe's, else 'a photo of a {}.')")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 4, 16], help="few-shot probe sizes, images per class")
    p.add_argument("--seeds", type=int, default=3, help="draws per few-shot probe")
    p.add_argument("--wise-ft", type=float, nargs="+", metavar="ALPHA",
                   help="also test the WiSE-FT interpolations (1 - a) * start + a * fine-tuned at these a in [0, 1], "
                        "e.g. --wise-ft 0 0.25 0.5 0.75 1: a table and a chart in the report")
    p = sub.add_parser("wise-ft", help="write a WiSE-FT interpolation of a run's starting and fine-tuned weights as a "
                                       "checkpoint in the run (choose alpha with mml eval --wise-ft)")
    p.add_argument("recipe", help="a run directory or a checkpoint in one, or a recipe with --ckpt")
    p.add_argument("--ckpt", help="checkpoint file or run directory (its best checkpoint)")
    p.add_argument("--alpha", type=float, required=True, help="0: the starting weights, 1: the fine-tuned ones")
    p = sub.add_parser("predict", help="what a trained model says of each image in a folder: a caption (captioning) "
                       "or the zero-shot class (CLIP)")
    p.add_argument("recipe", help="a run directory or a checkpoint in one, or a recipe with --ckpt")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--ckpt", help="checkpoint file or run directory (its best checkpoint)")
    p.add_argument("--images", required=True, help="folder of images (jpg, png, webp), searched recursively")
    p.add_argument("--out", help="write {file: caption} JSON here (default: print only)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--question", help="ask each image this (generative vision-language models, task vlm)")
    p = sub.add_parser("export", help="write a CLIP or vlm checkpoint in another library's format")
    p.add_argument("ckpt", help="checkpoint file or run directory (its best checkpoint)")
    p.add_argument("--format", required=True, choices=["open_clip", "hf"],
                   help="open_clip: a local-dir folder open_clip loads; hf: a transformers folder")
    p.add_argument("--out", required=True, help="folder to write")
    p = sub.add_parser("data", help="write, convert and inspect datasets: webdataset, Parquet, CSV, COCO/VQAv2 JSON")
    data = p.add_subparsers(dest="action", required=True, help="write, convert or inspect")
    w = data.add_parser("write", help="write the shapes world or a COCO-captions dataset")
    w.add_argument("source", choices=["shapes", "coco"], help="the shapes world, or a COCO-captions dataset")
    w.add_argument("out", help="folder to write")
    w.add_argument("--format", choices=["wds", "parquet", "csv", "coco", "vqav2", "msrvtt"], default="wds",
                   help="webdataset shards, Parquet, CSV + images, COCO captions JSON, VQAv2 JSON (shapes only), or "
                        "the shapes videos as MP4 in MSR-VTT's layout (--num training videos, a fifth as many for "
                        "validate and test)")
    w.add_argument("--shard-size", type=int, default=1000, help="samples per shard (wds) or row group (parquet)")
    w.add_argument("--split", choices=["train", "val", "test"], default="train", help="shapes world split")
    w.add_argument("--num", type=int, default=1000, help="shapes world images")
    w.add_argument("--image-size", type=int, default=64, help="shapes world image size")
    w.add_argument("--image-format", choices=["png", "jpg", "webp"], default="jpg", help="shapes world images")
    w.add_argument("--seed", type=int, default=0, help="shapes world seed")
    w.add_argument("--json", help="COCO captions JSON (source coco)")
    w.add_argument("--images", help="its image folder (source coco)")
    c = data.add_parser("convert", help="convert shards, a table (CSV, Parquet, datasets folder) or COCO JSON")
    c.add_argument("input", help="shards (folder or pattern), a table, or a COCO captions .json (with --images)")
    c.add_argument("out", help="folder to write")
    c.add_argument("--format", required=True, choices=["wds", "parquet", "csv", "coco"], help="what to write")
    c.add_argument("--shard-size", type=int, default=1000, help="samples per shard (wds) or row group (parquet)")
    c.add_argument("--split", default="train", help="split name in COCO file names (--format coco)")
    c.add_argument("--images", help="image folder of a COCO captions JSON input")
    i = data.add_parser("inspect", help="count the samples of shards or a table and show a few")
    i.add_argument("input", help="shards (folder, brace pattern shard-{000000..000009}.tar, URL) or a table")
    i.add_argument("--show", type=int, default=3, help="captions to print")
    for q in (c, i):  # tables name their columns as the table_captions data module's keys do
        q.add_argument("--image-key", default=None, help="table column of images (bytes or paths); default image")
        q.add_argument("--caption-key", default=None, help="table column of captions; default caption")
        q.add_argument("--image-root", default=None, help="folder that image paths are relative to")
        q.add_argument("--sep", default=None, help="CSV delimiter (default: by suffix, , or tab)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # overrides may come before or after options: `mml fit R a=1 --resume auto b=2`
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra
    if not args.verbose:
        quiet_third_party()
    try:
        return COMMANDS[args.command](args)
    except UserError as err:
        if args.traceback or os.environ.get("MML_TRACEBACK"):
            raise
        print(f"mml {args.command}: error: {err}", file=sys.stderr)
        return 2


def cmd_ls(args: argparse.Namespace) -> int:
    if args.components:
        print(components_listing(args.filter, args.markdown), end="")
        return 0
    rows = C.list_recipes(args.filter)
    width = max((len(n) for n, _ in rows), default=0)
    for name, desc in rows:
        print(f"{name:<{width}}  {desc}")
    return 0


def escape_cell(text: str) -> str:
    """A docstring line as a Markdown table cell: rST ``code`` as `code`, and a pipe that
    does not end the cell (inside code spans too)."""
    return text.replace("``", "`").replace("|", "&#124;")


def components_listing(filter_text: str = "", markdown: bool = False) -> str:
    """Every registered name by kind, with the first line of its docstring."""
    from mmlightning.build import import_components
    from mmlightning.registry import all_registries

    import_components()

    def summary(obj: Any) -> str:
        """The docstring's first paragraph, cut after the first sentence that ends at least 40
        characters in (so "Glimpses." keeps its explanation and "et al." does not end one)."""
        paragraph = " ".join((obj.__doc__ or "").strip().split("\n\n")[0].split())
        end = next((m.end() for m in re.finditer(r"(?<!\bal)(?<!e\.g)\.(?= [A-Z(])", paragraph) if m.end() >= 40),
                   None)
        return paragraph[:end] if end else paragraph

    lines = ["# Components", "",
             "Every name a recipe can use, by kind, with the recipe key that takes it. This page is the output of",
             "`mml ls --components --markdown` (a test keeps them equal); `mml ls --components` prints it as text.",
             "Register your own with `@REGISTRY.register(\"name\")` in a module listed under `imports:`",
             "(see [Extending](extending.md)).", ""] if markdown else []
    for registry in all_registries():
        entries = [(n, summary(obj)) for n, obj in registry.entries() if filter_text in n or filter_text in registry.kind]
        if not entries:
            continue
        if markdown:
            lines += [f"## {registry.kind}", "", f"Recipe key: `{registry.key}`", "", "| name | what it is |", "|---|---|"]
            lines += [f"| `{name}` | {escape_cell(text)} |" for name, text in entries]
        else:
            width = max(len(n) for n, _ in entries)
            lines.append(f"{registry.kind} ({registry.key})")
            lines += [f"  {name:<{width}}  {text[:100]}" for name, text in entries]
        lines.append("")
    return "\n".join(lines)


def cmd_show(args: argparse.Namespace) -> int:
    print(C.to_yaml(C.resolve(C.load_recipe(args.recipe, args.overrides))), end="")
    return 0


def cmd_cp(args: argparse.Namespace) -> int:
    src, dst = C.recipe_path(args.recipe), Path(args.path)
    if dst.exists():
        raise UserError(f"{dst} already exists; not overwriting it.")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    print(f"copied {src.name} to {dst}; run it with `mml fit {dst}`")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    import torch

    from mmlightning.build import build_datamodule, build_task

    cfg = C.resolve(C.load_recipe(args.recipe, args.overrides))
    task = build_task(cfg)
    datamodule = build_datamodule(cfg, task)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    batch = {k: v[:4] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    task.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer here, by design
        loss = task.batch_loss(batch)
    n_params = sum(p.numel() for p in task.parameters())
    print(f"ok: {cfg['recipe']} builds; {n_params / 1e6:.2f}M parameters; "
          f"one batch of {len(batch['video' if 'video' in batch else 'image'])} -> loss {float(loss):.4f}")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    import lightning as L

    from mmlightning import runs
    from mmlightning.build import build_datamodule, build_task, check_data

    cfg = C.resolve(C.load_recipe(args.recipe, args.overrides))
    resume = args.resume or (cfg.get("run") or {}).get("resume")
    run_root = Path((cfg.get("run") or {}).get("root") or "runs")
    ckpt_path, run_dir = None, None
    if resume:
        run_dir = runs.find_latest_run(run_root, cfg["recipe"]) if resume == "auto" else Path(resume)
        ckpt_path = runs.resume_checkpoint(run_dir)
        saved_cfg = run_dir / runs.CONFIG_FILE
        if not saved_cfg.is_file():
            raise UserError(f"--resume {run_dir}: not a run directory (no {runs.CONFIG_FILE}).")
        saved = C.resolve(C.load_recipe(saved_cfg, args.overrides))
        if saved["recipe"] != cfg["recipe"]:  # the run's own overrides (a task= too) come back with it
            raise UserError(f"--resume {run_dir}: that run is recipe {saved['recipe']!r} (task {saved['task']!r}), not "
                            f"{cfg['recipe']!r} (task {cfg['task']!r}). Resume it with `mml fit {saved['recipe']} "
                            f"--resume {run_dir}`.")
        summary = run_dir / runs.SUMMARY_FILE
        longer = any(o.lstrip("+").split("=")[0] in ("trainer.max_epochs", "trainer.max_steps") for o in args.overrides)
        if summary.is_file() and not longer:
            print(f"{run_dir} finished already (its test metrics are in {summary}); nothing to resume. To train it "
                  f"longer, resume with trainer.max_epochs=N.")
            return 0
        cfg = saved
        wandb_id = runs.read_meta(run_dir).get("wandb_id") or runs.new_wandb_id()
    # everything that can fail is built and checked before the run directory exists
    L.seed_everything(cfg["seed"], workers=True, verbose=False)
    task = build_task(cfg, load_pretrained=ckpt_path is None)
    datamodule = build_datamodule(cfg, task)
    check_data(datamodule)
    if run_dir is None:
        chosen = (cfg.get("run") or {}).get("name")
        run_dir = runs.new_run_dir(run_root, chosen or runs.default_run_name(cfg["recipe"]), numbered=not chosen)
        wandb_id = runs.new_wandb_id()
    else:
        print(f"resuming {run_dir} from {ckpt_path.name}")
    cfg.setdefault("run", {})["name"] = run_dir.name
    runs.write_run_files(run_dir, C.to_yaml(cfg), cfg["recipe"], wandb_id)
    return _fit(cfg, run_dir, ckpt_path, wandb_id, task, datamodule)


def _fit(cfg: dict[str, Any], run_dir: Path, ckpt_path: Path | None, wandb_id: str, task: Any, datamodule: Any) -> int:
    from mmlightning import runs
    from mmlightning.build import build_trainer
    from mmlightning.fault_tolerance import Interrupted, NonFiniteLoss
    from mmlightning.loggers import finish_loggers
    from mmlightning.summary import print_summary

    trainer = None
    start = time.time()
    try:
        trainer = build_trainer(cfg, run_dir, wandb_id, task=task, datamodule=datamodule)
        trainer.fit(task, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
        fit_seconds = time.time() - start
        checkpoint = trainer.checkpoint_callback
        best = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
        results = trainer.test(task, datamodule=datamodule, ckpt_path=best, verbose=False)
    except Interrupted as stop:
        print(f"{stop}; continue with `mml fit {cfg['recipe']} --resume {run_dir}`", file=sys.stderr)
        finish_loggers(trainer, "failed")
        return stop.exit_code
    except NonFiniteLoss as err:
        print(f"mml fit: stopped: {err}", file=sys.stderr)
        finish_loggers(trainer, "failed")
        return 1
    except BaseException:
        if trainer is not None:
            finish_loggers(trainer, "failed")
        if ckpt_path is None and (trainer is None or trainer.global_step == 0) and runs.is_global_zero():
            shutil.rmtree(run_dir, ignore_errors=True)  # failed before its first step: the name stays free
        raise
    if trainer.is_global_zero:
        print_summary(cfg, run_dir, trainer, results[0] if results else {}, fit_seconds, best)
    finish_loggers(trainer)
    return 0


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_for_checkpoint(recipe: str, ckpt: str | None, overrides: list[str], command: str) -> tuple[dict[str, Any], Path]:
    """The config and checkpoint ``mml test|validate|eval|predict`` use. RECIPE may be a run
    directory or a checkpoint in one: the run's own config builds the model (overrides apply
    on top). A recipe given with ``--ckpt`` from a run must build the same model as that run
    (its task and model keys), and then is used as given."""
    from mmlightning import runs

    path = Path(recipe)
    if path.suffix == ".ckpt" or path.is_dir():
        ckpt_path = runs.eval_checkpoint(ckpt or path)
        run_dir = runs.run_dir_of(path) or runs.run_dir_of(ckpt_path)
        if run_dir is None:
            raise UserError(f"{recipe}: not a run directory or a checkpoint in one (no {runs.CONFIG_FILE} beside "
                            f"it); give the recipe it was trained with: `mml {command} RECIPE --ckpt {recipe}`.")
        return C.resolve(C.load_recipe(run_dir / runs.CONFIG_FILE, overrides)), ckpt_path
    typed = C.resolve(C.load_recipe(recipe, overrides))
    if not ckpt:
        raise UserError(f"mml {command} needs trained weights: give a run directory (`mml {command} runs/<run>`) or "
                        f"--ckpt CHECKPOINT_OR_RUN_DIR.")
    ckpt_path = runs.eval_checkpoint(ckpt)
    run_dir = runs.run_dir_of(ckpt_path)
    if run_dir is None:
        return typed, ckpt_path
    saved = C.resolve(C.load_recipe(run_dir / runs.CONFIG_FILE, overrides))
    mine, theirs = flatten({"task": typed["task"], "model": typed.get("model")}), \
        flatten({"task": saved["task"], "model": saved.get("model")})
    # where the weights started and how captions are generated do not change the weights
    ignored = ("model.init_from", "model.generation.")
    differing = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k) and not k.startswith(ignored))
    if differing:
        shown = "; ".join(f"{k}: run {theirs.get(k)!r}, recipe {mine.get(k)!r}" for k in differing[:4])
        raise UserError(f"--ckpt {ckpt} is from run {run_dir}, which was built otherwise than recipe {recipe!r} "
                        f"({shown}{'; ...' if len(differing) > 4 else ''}). Give the run alone: "
                        f"`mml {command} {run_dir}`.")
    return typed, ckpt_path  # the same model; the data, logger and trainer are the recipe's as given


def cmd_evaluate(args: argparse.Namespace) -> int:
    import lightning as L

    from mmlightning.build import build_datamodule, build_task, build_trainer

    cfg, ckpt = config_for_checkpoint(args.recipe, args.ckpt, args.overrides, args.command)
    L.seed_everything(cfg["seed"], workers=True, verbose=False)
    task = build_task(cfg, load_pretrained=False)  # the checkpoint holds every weight
    datamodule = build_datamodule(cfg, task)
    trainer = build_trainer(cfg, run_dir=None, enable_checkpointing=False, task=task, datamodule=datamodule)
    run = trainer.validate if args.command == "validate" else trainer.test
    results = run(task, datamodule=datamodule, ckpt_path=str(ckpt), verbose=False)
    for key, value in sorted((results[0] if results else {}).items()):
        print(f"{key:<28} {value:.4f}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import lightning as L

    from mmlightning import report, wise_ft
    from mmlightning.build import build_datamodule, build_task, build_trainer
    from mmlightning.data_modules.image_folder import read_image_folder

    given = [o.split("=", 1)[1] for o in args.overrides if o.startswith("ckpt=")]
    overrides = [o for o in args.overrides if not o.startswith("ckpt=")]
    if args.ckpt and given and args.ckpt != given[-1]:
        raise UserError(f"two checkpoints given: --ckpt {args.ckpt} and ckpt={given[-1]}; give one.")
    if any(k < 1 for k in args.shots) or args.seeds < 1:
        raise UserError(f"--shots and --seeds must be >= 1, got {args.shots} and {args.seeds}.")
    alphas = wise_ft.check_alphas(args.wise_ft) if args.wise_ft else []
    cfg, ckpt = config_for_checkpoint(args.recipe, args.ckpt or (given[-1] if given else None), overrides, "eval")
    start = wise_ft.starting_weights(cfg) if alphas else None  # refuses a run from fresh weights before testing
    L.seed_everything(cfg["seed"], workers=True, verbose=False)
    task = build_task(cfg, load_pretrained=False)  # the checkpoint holds every weight
    datamodule = build_datamodule(cfg, task)
    labelled = [images for images in [datamodule.labelled_images()] if images is not None]
    if args.image_folder:
        recipe_templates = labelled[0].classes.templates if labelled else None
        templates = args.template or recipe_templates or ["a photo of a {}."]
        labelled.append(read_image_folder(args.image_folder, task.data_spec().image_config, templates, seed=cfg["seed"]))
    trainer = build_trainer(cfg, run_dir=None, enable_checkpointing=False, task=task, datamodule=datamodule)
    results = trainer.test(task, datamodule=datamodule, ckpt_path=str(ckpt), verbose=False)
    if not results or not results[0]:
        raise UserError(f"recipe {cfg['recipe']!r} has no test split to evaluate (its data module gave no test "
                          f"batches): set the data's test split (e.g. data.test_shards).")
    points = wise_ft.measure(task, trainer, datamodule, start, alphas) if alphas else []
    if not trainer.is_global_zero:  # the rest is one process's work: features, probes, files
        return 0
    task.to(trainer.strategy.root_device)  # the Trainer hands the model back on the CPU
    built = report.build_report(task, cfg["recipe"], ckpt, results[0], labelled, shots=tuple(args.shots),
                                seeds=args.seeds)
    if points:
        built["sections"].append(wise_ft.report_section(points, task.epoch_line_metrics))
        built["wise_ft"] = [{"alpha": a, **m} for a, m in points]
    paths = report.write_report(built, ckpt)
    if points:
        paths["wise-ft"] = wise_ft.line_chart(points, task.epoch_line_metrics, f"{cfg['recipe']}: WiSE-FT",
                                              ckpt.with_name(f"{ckpt.stem}.wise-ft.png"))
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    wandb_run = report.log_to_wandb(built, paths, cfg, run_dir)
    print(report.to_markdown(built))
    for kind, path in paths.items():
        print(f"{kind + ':':<10} {path}")
    print(f"W&B run:   {wandb_run or '(W&B logger off)'}")
    return 0


def cmd_wise_ft(args: argparse.Namespace) -> int:
    from mmlightning import wise_ft

    cfg, ckpt = config_for_checkpoint(args.recipe, args.ckpt, [], "wise-ft")
    out = wise_ft.write_checkpoint(cfg, ckpt, args.alpha)
    print(f"wrote {out} (alpha {args.alpha:g}); it goes wherever a checkpoint does, e.g. mml eval {out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import json

    import torch

    from mmlightning.build import build_datamodule, build_task, inference_device
    from mmlightning.data_modules.coco import load_image
    from mmlightning.data_modules.image_folder import IMAGE_SUFFIXES, image_files
    from mmlightning.data_modules.transforms import eval_transform
    from mmlightning.fault_tolerance import load_checkpoint

    cfg, ckpt = config_for_checkpoint(args.recipe, args.ckpt, args.overrides, "predict")
    task = build_task(cfg, load_pretrained=False)  # the checkpoint below holds every weight
    datamodule = build_datamodule(cfg, task)  # its classes, for tasks that name one per image
    folder = Path(args.images)
    if not folder.is_dir():
        raise UserError(f"--images {str(folder)!r} is not a folder.")
    files = image_files(folder)
    if not files:
        raise UserError(f"--images {str(folder)!r} holds no {'/'.join(sorted(IMAGE_SUFFIXES))} files.")
    state = load_checkpoint(ckpt)["state_dict"]
    missing, unexpected = task.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{ckpt} does not fit recipe {cfg['recipe']!r}: missing {missing[:4]}, unexpected "
                          f"{unexpected[:4]}. Give the recipe (or run directory config.yaml) it was trained with.")
    if args.question and not task.answers_questions:
        raise UserError(f"--question: a {cfg.get('task')!r} task does not answer questions; a vlm task does.")
    asked = {"question": args.question} if args.question else {}
    task.to(inference_device(cfg.get("trainer") or {})).eval()  # the GPU where the recipe's accelerator has one
    transform = eval_transform(task.data_spec().image_config)
    answers: dict[str, str] = {}
    with torch.no_grad():
        for start in range(0, len(files), args.batch_size):
            chunk = files[start:start + args.batch_size]
            images = torch.stack([transform(load_image(p)) for p in chunk])
            for path, text in zip(chunk, task.predict_images(images, datamodule, **asked)):
                answers[str(path.relative_to(folder))] = text
                print(f"{path.relative_to(folder)}\t{text}")
    if args.out:
        Path(args.out).write_text(json.dumps(answers, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from mmlightning.export import FORMATS, load_task

    out_dir = Path(args.out)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"--out {str(out_dir)!r} exists and is not an empty folder; give a new one.")
    task, path = load_task(args.ckpt)
    out, how_to_load = FORMATS[args.format](task, Path(args.out))
    print(f"wrote {out}: load it with {how_to_load}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    import json

    from mmlightning.data_modules import write

    if args.action in ("inspect", "convert"):
        keys = {"image_key": args.image_key, "caption_key": args.caption_key, "image_root": args.image_root,
                "sep": args.sep}
        if args.action == "inspect":
            summary = write.inspect(args.input, args.show, **keys)
        else:
            summary = write.convert(args.input, args.out, args.format, args.shard_size, args.split,
                                    images=args.images, **keys)
    elif args.source == "coco":
        if args.format not in write.WRITERS[:3] or not (args.json and args.images):
            raise UserError("mml data write coco writes wds, parquet or csv and needs --json FILE --images DIR.")
        summary = write.write_pairs(write.coco_pairs(args.json, args.images), args.out, args.format, args.shard_size,
                                    args.split)
    elif args.format == "vqav2":
        summary = write.write_vqav2(args.split, args.num, args.seed, args.image_size, args.out)
    elif args.format == "msrvtt":
        from mmlightning.data_modules.videos import write_shapes_videos

        sizes = {"train": args.num, "val": max(args.num // 5, 1), "test": max(args.num // 5, 1)}
        summary = write_shapes_videos(Path(args.out), sizes, seed=args.seed, size=args.image_size)
    else:
        pairs = write.shapes_pairs(args.split, args.num, args.seed, args.image_size, args.image_format)
        summary = write.write_pairs(pairs, args.out, args.format, args.shard_size, args.split)
    print(json.dumps(summary, indent=2))
    if summary.get("problems") and args.action == "inspect":  # scripts and CI see damaged data by the exit code
        print(f"mml data inspect: {len(summary['problems'])} problem(s) found", file=sys.stderr)
        return 1
    return 0


COMMANDS = {"ls": cmd_ls, "show": cmd_show, "cp": cmd_cp, "check": cmd_check, "fit": cmd_fit,
            "validate": cmd_evaluate, "test": cmd_evaluate, "eval": cmd_eval,
            "predict": cmd_predict, "export": cmd_export, "wise-ft": cmd_wise_ft, "data": cmd_data}

if __name__ == "__main__":
    sys.exit(main())
