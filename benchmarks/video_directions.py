"""What reading time adds, on a video CLIP run of the shapes videos: every test video against
its own caption and its time-reversed twin's ("moves to the left" / "moves to the right",
"grows" / "shrinks", "turns red" / "turns blue" from the other colour, "appears" /
"disappears"). A model that averages frames (``model.temporal.name: mean``) embeds a video and
its reversal alike, so it can only guess between the two; one that reads the frames in order
can tell them apart.

Prints, per event and in all: the two-way accuracy (own caption scored above the twin's), and
video->text R@1 against every distinct caption of the test videos and their twins, with its
misses split into "picked the twin" (a direction error) and the rest.

    python benchmarks/video_directions.py runs/video-clip-shapes-...
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch

from mmlightning.build import build_datamodule, build_task, resolve_precision
from mmlightning.config import load_recipe, resolve
from mmlightning.data_modules import shapes_video
from mmlightning.encoders.tokenizers import tokenize
from mmlightning.runs import CONFIG_FILE, eval_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a video-clip-shapes run directory")
    parser.add_argument("--ckpt", type=Path, help="default: the run's best checkpoint, else its last")
    args = parser.parse_args()
    cfg = resolve(load_recipe(args.run / CONFIG_FILE))
    task = build_task(cfg, load_pretrained=False)  # the checkpoint holds every weight
    data = build_datamodule(cfg, task)
    data.setup("test")
    ckpt = eval_checkpoint(args.ckpt or args.run)
    task.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"])
    task.eval()
    scenes = data.scenes("test")
    twins = [shapes_video.reverse(s).caption for s in scenes]
    gallery = sorted({s.caption for s in scenes} | set(twins))
    bf16 = str(resolve_precision(cfg["trainer"]["precision"])).startswith("bf16")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        videos = torch.cat([task.encode_video(b["video"], b["frame_mask"]) for b in data.test_dataloader()]).float()
        text = tokenize(task.text.tokenizer, gallery, task.text.max_length)
        captions = task.encode_text(text["input_ids"], text["attention_mask"]).float()
    index = {c: k for k, c in enumerate(gallery)}
    scores = videos @ captions.T
    top = scores.argmax(1).tolist()
    counts: dict[str, Counter] = {}
    for k, scene in enumerate(scenes):
        own, twin = index[scene.caption], index[twins[k]]
        for key in (scene.event, "all"):
            c = counts.setdefault(key, Counter())
            c["videos"] += 1
            c["two_way"] += bool(scores[k, own] > scores[k, twin])
            c["hit"] += top[k] == own
            c["twin"] += top[k] == twin
    print(f"checkpoint: {ckpt}")
    print(f"temporal: {cfg['model'].get('temporal')}")
    print(f"gallery: {len(gallery)} distinct captions (the test videos' and their twins')")
    print("| event | videos | own vs twin | v2t R@1 | misses: the twin | misses: other |")
    print("|---|---|---|---|---|---|")
    for key in [*shapes_video.EVENTS, "all"]:
        c = counts.get(key)
        if c:
            n = c["videos"]
            print(f"| {key} | {n} | {c['two_way'] / n:.3f} | {c['hit'] / n:.3f} | {c['twin'] / n:.3f} | "
                  f"{(n - c['hit'] - c['twin']) / n:.3f} |")


if __name__ == "__main__":
    main()
