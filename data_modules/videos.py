"""Videos with captions, for video-text retrieval (the CLIP task with ``model.temporal``).

Batches hold ``video`` (B, F, 3, H, W) float, normalised for the image tower, and
``frame_mask`` (B, F) (False on padding: a video shorter than ``max_frames``), where image
batches hold ``image``; the rest is the image-text layout (common.py): training pairs with
``input_ids``, ``attention_mask``, ``image_id`` (the video's), ``caption_id``; evaluation
items each video once with all of its captions (``text_image_id``, ``caption_id``, ``text_id``).

Frames are chosen in the loader (``video_io.sample_indices``): the middle of each of
``max_frames`` segments for evaluation, a random frame of each for training, from the
sample's own seed (so a resumed run draws the same frames); ``fps`` resamples a file first.

Sources:

- ``shapes_videos``: the shapes world's videos (``shapes_video.py``), drawn frame by frame as
  sampled; ``mml data write shapes_videos`` writes the same videos as MP4 files in the
  MSR-VTT layout below.
- ``msrvtt``: MSR-VTT's own layout: ``train_json`` (``train_val_videodatainfo.json``: its
  ``videos`` with ``split`` train or validate, and its ``sentences``), ``test_json``
  (``test_videodatainfo.json``) and ``video_root`` holding ``<video_id>.mp4``.
- ``video_folder``: a folder of video files and a captions file per split
  (``train_captions``, ``val_captions``, ``test_captions``): CSV with ``video`` and
  ``caption`` columns, or JSON, a list of ``{"video": file, "caption": text}`` (or
  ``"captions": [...]``).

Bad files: before training every video file is opened and its first frame decoded; those
that fail (empty, corrupt, no video stream) are counted and left out, and more than
``max_bad_fraction`` of a split (default 1%; ``strict: true``: any) stops the run with the
counts and examples, as bad images in shards do. A captioned video with no file fails before
training, naming the captions file and the video.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mmlightning.data_modules import shapes_video
from mmlightning.data_modules.common import SampleIndex, SplitDataModule, normalize_uint8, string_ids
from mmlightning.data_modules.transforms import eval_transform
from mmlightning.data_modules.video_io import VideoError, check_decoder, decode, pad_clip, probe, read_clip, sample_indices
from mmlightning.encoders.outputs import ImageConfig
from mmlightning.encoders.tokenizers import tokenize
from mmlightning.errors import UserError
from mmlightning.registry import DATA_MODULES


class ShapesClips:
    """Clips of shapes-world videos, rendered at ``size`` as they are sampled."""

    def __init__(self, scenes: list[shapes_video.VideoScene], size: int, max_frames: int) -> None:
        self.scenes, self.size, self.max_frames = scenes, size, max_frames

    def __call__(self, i: int, train: bool, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        scene = self.scenes[i]
        indices = sample_indices(np.arange(scene.num_frames), self.max_frames, train, rng)
        return pad_clip(shapes_video.frames(scene, indices, self.size), self.max_frames)


class FileClips:
    """Clips decoded from video files, resized and centre-cropped for the image tower."""

    def __init__(self, paths: list[Path], image_config: ImageConfig, max_frames: int, fps: float | None,
                 decoder: str) -> None:
        self.paths, self.max_frames, self.fps, self.decoder = paths, max_frames, fps, decoder
        self.transform = eval_transform(image_config)

    def __call__(self, i: int, train: bool, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        from PIL import Image

        try:
            frames, mask = read_clip(self.paths[i], self.max_frames, train, rng, self.fps, self.decoder)
        except VideoError as err:  # it decoded when checked before training
            raise UserError(f"data: video {err} (it opened before training; the file changed or is damaged "
                              f"further in).") from None
        return torch.stack([self.transform(Image.fromarray(frame)) for frame in frames[mask]]), mask


def as_batch_frames(clips: list[tuple[Any, np.ndarray]], image_config: ImageConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, F, 3, H, W) normalised frames (zeros on padding) and (B, F) masks."""
    masks = torch.from_numpy(np.stack([m for _, m in clips]))
    first = clips[0][0]
    if isinstance(first, np.ndarray):  # uint8 (F, H, W, 3), padded
        frames = normalize_uint8(torch.from_numpy(np.stack([c for c, _ in clips])).flatten(0, 1), image_config)
        frames = frames.view(len(clips), -1, *frames.shape[1:]) * masks[:, :, None, None, None]
        return frames, masks
    real = [c for c, _ in clips]  # normalised real frames, (n_real, 3, h, w) each
    frames = torch.zeros(len(clips), masks.shape[1], *real[0].shape[1:])
    for row, (pixels, mask) in enumerate(zip(real, masks)):
        frames[row, mask] = pixels
    return frames, masks


def sample_seed(index: Any) -> int:
    return int(getattr(index, "seed", int(index)))


def sample_rng(index: Any) -> np.random.Generator:
    """The training sample's own seed (``SampleIndex.seed``), so a resumed run draws the same frames."""
    return np.random.default_rng(sample_seed(index))


class VideoPairs(Dataset):
    """Training pairs: each (video, caption), frames drawn one per segment at random.
    ``partner[i]``: a pair that comes into every batch with pair i (the shapes videos'
    time-reversed twin, a negative only the order of the frames tells apart); the dataset's
    length counts the pairs without partners."""

    def __init__(self, clips: Any, owner: list[int], captions: list[str], tokenizer: Any, max_length: int,
                 image_config: ImageConfig, partner: list[int] | None = None) -> None:
        self.clips, self.owner, self.image_config = clips, torch.tensor(owner), image_config
        self.text = tokenize(tokenizer, captions, max_length)
        self.caption_id = string_ids(captions)
        self.partner = partner
        self.length = len(owner) if partner is None else len(owner) // 2

    def __len__(self) -> int:
        return self.length

    def __getitems__(self, indices: list[Any]) -> dict[str, torch.Tensor]:
        if self.partner is not None:  # each pair and its partner, the partner's frames from its own draw
            indices = [j for i in indices for j in (i, SampleIndex(self.partner[int(i)], sample_seed(i) + 1))]
        idx = torch.as_tensor([int(i) for i in indices])
        video, mask = as_batch_frames([self.clips(int(self.owner[i]), True, sample_rng(i)) for i in indices],
                                      self.image_config)
        return {"video": video, "frame_mask": mask, "input_ids": self.text["input_ids"][idx],
                "attention_mask": self.text["attention_mask"][idx], "image_id": self.owner[idx],
                "caption_id": self.caption_id[idx]}


class VideoEval(Dataset):
    """Evaluation items: each video once (the middle frame of each segment) with all its captions."""

    def __init__(self, clips: Any, captions: list[list[str]], tokenizer: Any, max_length: int,
                 image_config: ImageConfig) -> None:
        self.clips, self.image_config = clips, image_config
        flat = [c for caps in captions for c in caps]
        self.owner = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
        self.captions = captions
        self.text = tokenize(tokenizer, flat, max_length)
        self.caption_id = string_ids(flat)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor([int(i) for i in indices])
        video, mask = as_batch_frames([self.clips(int(i), False, sample_rng(0)) for i in indices], self.image_config)
        text_idx = torch.nonzero(torch.isin(self.owner, idx)).squeeze(1)
        return {"video": video, "frame_mask": mask, "image_id": idx,
                "input_ids": self.text["input_ids"][text_idx], "attention_mask": self.text["attention_mask"][text_idx],
                "text_image_id": self.owner[text_idx], "caption_id": self.caption_id[text_idx], "text_id": text_idx}


def need_frames(max_frames: int | None, name: str) -> int:
    if max_frames is None:
        raise UserError(f"data {name} holds videos: the task needs model.temporal (e.g. {{name: transformer, "
                          f"max_frames: 12}}) to turn their frames into one embedding.")
    return int(max_frames)


@DATA_MODULES.register("shapes_videos")
class ShapesVideoData(SplitDataModule):
    """Shapes-world videos (one object, one event: moving, growing, shrinking, turning a colour, appearing, disappearing) with captions."""

    def __init__(self, tokenizer: Any, max_length: int, image_config: ImageConfig, max_frames: int | None = None,
                 num_train: int = 6000, num_val: int = 500, num_test: int = 1000, num_frames: int = 12, seed: int = 0,
                 reversed_twins: bool = False, batch_size: int = 64, eval_batch_size: int = 250, num_workers: int = 0,
                 shuffle_seed: int = 0) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, shuffle_seed)
        self.max_frames = need_frames(max_frames, "shapes_videos")
        self.reversed_twins = reversed_twins
        self.tokenizer, self.max_length, self.image_config = tokenizer, max_length, image_config
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.num_frames, self.seed = num_frames, seed
        self.zero_shot = None

    def scenes(self, split: str) -> list[shapes_video.VideoScene]:
        return shapes_video.generate(split, self.sizes[split], seed=self.seed, num_frames=self.num_frames)

    def build_split(self, split: str) -> Dataset:
        scenes = self.scenes(split)
        clips = ShapesClips(scenes, self.image_config.size, self.max_frames)
        if split == "train" and self.reversed_twins:  # each video's time-reversed copy in its batch, as a negative
            n = len(scenes)
            clips.scenes = scenes + [shapes_video.reverse(s) for s in scenes]
            partner = list(range(n, 2 * n)) + list(range(n))
            return VideoPairs(clips, list(range(2 * n)), [s.caption for s in clips.scenes], self.tokenizer,
                              self.max_length, self.image_config, partner)
        if split == "train":
            return VideoPairs(clips, list(range(len(scenes))), [s.caption for s in scenes], self.tokenizer,
                              self.max_length, self.image_config)
        return VideoEval(clips, [[s.caption] for s in scenes], self.tokenizer, self.max_length, self.image_config)


class VideoFileData(SplitDataModule):
    """What the file-backed video data modules share: the split's (file, captions) list in,
    bad files counted and left out before training, clips decoded in the loader."""

    drop_last_train = False

    def __init__(self, tokenizer: Any, max_length: int, image_config: ImageConfig, max_frames: int | None,
                 name: str, fps: float | None = None, video_decoder: str = "pyav", max_bad_fraction: float = 0.01,
                 strict: bool = False, batch_size: int = 32, eval_batch_size: int = 64, num_workers: int = 0,
                 shuffle_seed: int = 0) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, shuffle_seed)
        self.max_frames = need_frames(max_frames, name)
        self.tokenizer, self.max_length, self.image_config = tokenizer, max_length, image_config
        self.fps, self.decoder = fps, check_decoder(video_decoder)
        if not 0 <= max_bad_fraction <= 1:
            raise UserError(f"data.max_bad_fraction must be in [0, 1], got {max_bad_fraction}.")
        self.max_bad_fraction, self.strict = max_bad_fraction, strict
        self.zero_shot = None
        self.skipped: dict[str, list[str]] = {}

    def videos(self, split: str) -> tuple[list[Path], list[list[str]], str]:
        """The split's video files, each one's captions, and where they were listed."""
        raise NotImplementedError

    def usable(self, split: str) -> tuple[list[Path], list[list[str]]]:
        paths, captions, listed = self.videos(split)
        keep, bad = [], []
        for k, path in enumerate(paths):
            try:
                probe(path, self.decoder)
                decode(path, np.array([0]), self.decoder)
                keep.append(k)
            except VideoError as err:
                if self.strict:
                    raise UserError(f"data (strict): {listed}: bad video {err}") from None
                bad.append(str(err))
        self.skipped[split] = bad
        if len(bad) > self.max_bad_fraction * len(paths):
            raise UserError(f"data: {len(bad)} of {len(paths)} {split} videos listed in {listed} cannot be decoded, "
                              f"more than data.max_bad_fraction={self.max_bad_fraction}; e.g. {bad[0]}")
        return [paths[k] for k in keep], [captions[k] for k in keep]

    def build_split(self, split: str) -> Dataset:
        paths, captions = self.usable(split)
        clips = FileClips(paths, self.image_config, self.max_frames, self.fps, self.decoder)
        if split == "train":
            owner = [i for i, caps in enumerate(captions) for _ in caps]
            return VideoPairs(clips, owner, [c for caps in captions for c in caps], self.tokenizer, self.max_length,
                              self.image_config)
        return VideoEval(clips, captions, self.tokenizer, self.max_length, self.image_config)


def files_for(ids: list[str], root: Path, listed: str, suffixes: tuple[str, ...] = ("", ".mp4")) -> list[Path]:
    """Each id's file under ``root`` (as named, or with ``.mp4``); a missing one fails naming both."""
    paths = []
    for video_id in ids:
        found = next((root / f"{video_id}{s}" for s in suffixes if (root / f"{video_id}{s}").is_file()), None)
        if found is None:
            raise UserError(f"{listed}: video {video_id!r} has captions but no file under {root} "
                              f"(looked for {', '.join(str(root / (video_id + s)) for s in suffixes)}).")
        paths.append(found)
    return paths


@DATA_MODULES.register("msrvtt")
class MSRVTTData(VideoFileData):
    """MSR-VTT in its own layout: ``train_json`` (train_val_videodatainfo.json; split train/validate), ``test_json`` (test_videodatainfo.json), ``video_root`` of ``<video_id>.mp4``."""

    def __init__(self, tokenizer: Any, max_length: int, image_config: ImageConfig, train_json: str, test_json: str,
                 video_root: str, max_frames: int | None = None, **kwargs: Any) -> None:
        super().__init__(tokenizer, max_length, image_config, max_frames, "msrvtt", **kwargs)
        self.files = {"train": Path(train_json), "val": Path(train_json), "test": Path(test_json)}
        self.root = Path(video_root)
        for key, path in (("train_json", Path(train_json)), ("test_json", Path(test_json))):
            if not path.is_file():
                raise UserError(f"data.{key}: {str(path)!r} does not exist.")
        if not self.root.is_dir():
            raise UserError(f"data.video_root: folder {video_root!r} does not exist.")

    def videos(self, split: str) -> tuple[list[Path], list[list[str]], str]:
        path = self.files[split]
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"data.{'test' if split == 'test' else 'train'}_json: {path}: not valid JSON ({err}).") from None
        if not isinstance(data, dict) or not isinstance(data.get("videos"), list) or \
                not isinstance(data.get("sentences"), list):
            raise UserError(f"{path}: expected MSR-VTT's layout, an object with 'videos' and 'sentences' lists.")
        wanted = {"train": "train", "val": "validate", "test": "test"}[split]
        ids = [v["video_id"] for v in data["videos"] if v.get("split", wanted) == wanted]
        if not ids:
            raise UserError(f"{path}: no videos with split {wanted!r}.")
        captions: dict[str, list[str]] = {i: [] for i in ids}
        for k, s in enumerate(data["sentences"]):
            if not isinstance(s, dict) or not isinstance(s.get("caption"), str) or "video_id" not in s:
                raise UserError(f"{path}: sentences[{k}] needs 'video_id' and a string 'caption'.")
            if s["video_id"] in captions:
                captions[s["video_id"]].append(s["caption"].strip())
        ids = [i for i in ids if captions[i]]
        return files_for(ids, self.root, str(path)), [captions[i] for i in ids], str(path)


def read_captions_file(path: Path, key: str) -> tuple[list[str], list[list[str]]]:
    """Video names in first-seen order and each one's captions, from a CSV or JSON file."""
    if not path.is_file():
        raise UserError(f"data.{key}: {str(path)!r} does not exist.")
    rows: list[tuple[str, str]] = []
    if path.suffix.lower() == ".json":
        try:
            records = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"data.{key}: {path}: not valid JSON ({err}).") from None
        if not isinstance(records, list):
            raise UserError(f"data.{key}: {path}: expected a list of {{video, caption}} records.")
        for k, r in enumerate(records):
            texts = r.get("captions", [r.get("caption")]) if isinstance(r, dict) else None
            if not isinstance(r, dict) or not isinstance(r.get("video"), str) or not isinstance(texts, list) \
                    or not all(isinstance(t, str) for t in texts):
                raise UserError(f"data.{key}: {path}: record {k} needs 'video' (a file name) and 'caption' (text) or "
                                  f"'captions' (a list of texts).")
            rows += [(r["video"], t) for t in texts]
    else:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in ("video", "caption") if c not in (reader.fieldnames or [])]
            if missing:
                raise UserError(f"data.{key}: {path} has no {', '.join(missing)} column; its columns: "
                                  f"{', '.join(reader.fieldnames or [])}.")
            rows = [(r["video"], r["caption"]) for r in reader]
    grouped: dict[str, list[str]] = {}
    for video, caption in rows:
        grouped.setdefault(video, []).append(caption.strip())
    if not grouped:
        raise UserError(f"data.{key}: {path} lists no videos.")
    return list(grouped), list(grouped.values())


@DATA_MODULES.register("video_folder")
class VideoFolderData(VideoFileData):
    """A folder of video files with a captions file (CSV: video, caption; or JSON) per split."""

    def __init__(self, tokenizer: Any, max_length: int, image_config: ImageConfig, video_root: str,
                 train_captions: str, val_captions: str, test_captions: str | None = None,
                 max_frames: int | None = None, **kwargs: Any) -> None:
        super().__init__(tokenizer, max_length, image_config, max_frames, "video_folder", **kwargs)
        self.root = Path(video_root)
        if not self.root.is_dir():
            raise UserError(f"data.video_root: folder {video_root!r} does not exist.")
        self.files = {"train": ("train_captions", train_captions), "val": ("val_captions", val_captions),
                      "test": ("test_captions", test_captions) if test_captions else ("val_captions", val_captions)}

    def videos(self, split: str) -> tuple[list[Path], list[list[str]], str]:
        key, name = self.files[split]
        names, captions = read_captions_file(Path(name), key)
        return files_for(names, self.root, f"data.{key}: {name}", suffixes=("",)), captions, f"data.{key}: {name}"


def write_shapes_videos(out: Path, num: dict[str, int], seed: int = 0, num_frames: int = 12, size: int = 64,
                        fps: int = 8) -> dict[str, Any]:
    """The shapes videos as MP4 files in MSR-VTT's layout: ``videos/<video_id>.mp4``,
    ``train_val_videodatainfo.json`` (train and validate) and ``test_videodatainfo.json``."""
    from mmlightning.data_modules.video_io import write_video

    out = Path(out)
    files = {"train_val_videodatainfo.json": [("train", "train"), ("val", "validate")],
             "test_videodatainfo.json": [("test", "test")]}
    for filename, splits in files.items():
        videos, sentences = [], []
        for split, name in splits:
            for k, scene in enumerate(shapes_video.generate(split, num[split], seed=seed, num_frames=num_frames)):
                video_id = f"{split}{k}"
                write_video(out / "videos" / f"{video_id}.mp4", shapes_video.frames(scene, range(num_frames), size), fps)
                videos.append({"video_id": video_id, "split": name, "id": len(videos)})
                sentences.append({"video_id": video_id, "caption": scene.caption, "sen_id": len(sentences)})
        (out / filename).write_text(json.dumps({"info": {"description": "shapes-world videos"}, "videos": videos,
                                                "sentences": sentences}))
    return {"format": "msrvtt", "out": str(out), "videos": dict(num), "frames": num_frames, "fps": fps,
            "files": ["train_val_videodatainfo.json", "test_videodatainfo.json", "videos/"]}

