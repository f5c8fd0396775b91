"""Video-text retrieval (CLIP4Clip): real video files through PyAV (and torchcodec where it
loads), frame sampling, the shapes videos and their time-reversed twins, MSR-VTT's layout,
bad files, and the rank metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import SHAPES_CLIP, SHAPES_VIDEO

from mmlightning.build import build_datamodule, build_task
from mmlightning.cli import main
from mmlightning.config import load_recipe, resolve
from mmlightning.data_modules import shapes_video
from mmlightning.data_modules import video_io as vio
from mmlightning.errors import UserError

def numbered_video(path: Path, n: int, lossless: bool = False) -> Path:
    """Frame i is a flat grey of value 10 * i: which frame came back is read off its pixels."""
    return vio.write_video(path, np.stack([np.full((32, 32, 3), 10 * i, np.uint8) for i in range(n)]), fps=10,
                           lossless=lossless)


def frame_numbers(frames: np.ndarray) -> list[int]:
    return [int(round(f.mean() / 10)) for f in frames]


def test_frames_come_back_in_order_at_the_indices_asked(tmp_path: Path) -> None:
    path = numbered_video(tmp_path / "n.mp4", 20)
    assert vio.probe(path) == (20, 10.0)
    for indices in ([0, 3, 5, 8, 19], [7], list(range(20))):
        assert frame_numbers(vio.decode(path, np.array(indices))) == indices
    # evaluation: the middle frame of each of 8 equal segments; training: one frame inside each
    assert vio.sample_indices(np.arange(20), 8, train=False).tolist() == [1, 3, 6, 8, 11, 13, 16, 18]
    edges = np.floor(np.linspace(0, 20, 9)).astype(int)
    for seed in range(5):
        picks = vio.sample_indices(np.arange(20), 8, train=True, rng=np.random.default_rng(seed))
        assert all(lo <= p < hi for p, lo, hi in zip(picks, edges[:-1], edges[1:])), picks
    # a fixed rate: 5 fps of a 10 fps video is every other frame
    assert vio.candidate_frames(20, 10.0, 5.0).tolist() == list(range(0, 20, 2))
    clip, mask = vio.read_clip(path, 8, train=False, fps=5.0)
    assert frame_numbers(clip) == [0, 2, 6, 8, 10, 12, 16, 18]
    # shorter than max_frames: every frame, then padding that the mask marks
    clip, mask = vio.read_clip(path, 24, train=False)
    assert mask.tolist() == [True] * 20 + [False] * 4 and frame_numbers(clip[:20]) == list(range(20))
    assert not clip[20:].any()


def test_decoders_agree_pixel_for_pixel_on_a_lossless_video(tmp_path: Path) -> None:
    scene = shapes_video.generate("test", 1, num_frames=12)[0]
    frames = shapes_video.frames(scene, range(12), 64)
    path = vio.write_video(tmp_path / "lossless.mp4", frames, lossless=True)
    np.testing.assert_array_equal(vio.decode(path, np.arange(12)), frames)  # PyAV gives back what was written
    try:
        vio.check_decoder("torchcodec")
    except UserError as err:
        pytest.skip(f"torchcodec is not usable here: {err}")
    np.testing.assert_array_equal(vio.decode(path, np.arange(12), "torchcodec"), frames)
    assert vio.probe(path, "torchcodec")[0] == 12


def test_every_event_has_its_time_reversed_twin() -> None:
    scenes = shapes_video.generate("train", 200, num_frames=12)
    assert {s.event for s in scenes} == set(shapes_video.EVENTS)
    twins = {"moves to the left": "moves to the right", "moves up": "moves down", "grows": "shrinks",
             "appears": "disappears"}
    twins.update({b: a for a, b in twins.items()})
    for scene in scenes:
        back = shapes_video.reverse(scene)
        np.testing.assert_array_equal(shapes_video.frames(back, range(12)), shapes_video.frames(scene, range(12))[::-1])
        assert back.caption != scene.caption
        if scene.event == "turns":
            assert back.caption == f"a {scene.size} {scene.to_colour} {scene.shape} turns {scene.colour}"
        else:
            assert back.event == twins[scene.event]
    # every frame holds the object in view, and the caption's words are the tokenizer's
    words = set(shapes_video.vocabulary())
    assert all(set(s.caption.split()) <= words for s in scenes)


def video_task(*overrides: str):
    cfg = resolve(load_recipe("video-clip-shapes", [*SHAPES_VIDEO, *overrides]))
    return cfg, build_task(cfg)


def test_mean_cannot_tell_a_video_from_its_reversal_and_the_transformer_can() -> None:
    """CLIP4Clip's meanP averages frames, so a video and its time-reversed copy (another
    caption) embed identically; seqTransf's frame positions tell them apart."""
    torch.manual_seed(0)
    scenes = [s for s in shapes_video.generate("test", 40) if s.event.startswith("moves")][:4]
    for spec, same in (("{name: mean, max_frames: 12}", True),
                       ("{name: transformer, max_frames: 12, layers: 1, init_positions: random}", False)):
        _, task = video_task(f"model.temporal={spec}")
        task.eval()
        mean, std = task.vision.image_config.mean, task.vision.image_config.std

        def clip(scene: shapes_video.VideoScene) -> torch.Tensor:
            frames = torch.from_numpy(shapes_video.frames(scene, range(12), task.vision.image_config.size)).float()
            return ((frames / 255 - torch.tensor(mean)) / torch.tensor(std)).permute(0, 3, 1, 2)

        video = torch.stack([clip(s) for s in scenes] + [clip(shapes_video.reverse(s)) for s in scenes])
        with torch.no_grad():
            embedded = task.encode_video(video, torch.ones(len(video), 12, dtype=torch.bool))
        forward, backward = embedded[:4], embedded[4:]
        assert torch.allclose(forward, backward, atol=1e-5) == same, spec


def test_a_clip_shorter_than_max_frames_is_padded_and_masked() -> None:
    cfg, task = video_task("data.num_frames=5")  # 5-frame videos into an 8-frame model
    data = build_datamodule(cfg, task)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["video"].shape[1:3] == (8, 3) and batch["frame_mask"].sum(1).tolist() == [5] * len(batch["video"])
    assert not batch["video"][:, 5:].any()
    task.eval()
    with torch.no_grad():  # the padding changes nothing: the same as the 5 real frames alone
        torch.testing.assert_close(task.encode_video(batch["video"], batch["frame_mask"]),
                                   task.encode_video(batch["video"][:, :5], batch["frame_mask"][:, :5]))


def test_training_frames_follow_the_sample_seed() -> None:
    """A resumed run draws the frames it drew before: they depend on the sample's seed alone."""
    cfg, task = video_task("data.num_frames=24")  # 12 of 24 frames: one of two in each segment
    data = build_datamodule(cfg, task)
    data.setup("fit")
    train = data.datasets["train"]
    first = [batch["video"] for batch, _ in zip(data.train_dataloader(), range(2))]
    again = [batch["video"] for batch, _ in zip(data.train_dataloader(), range(2))]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    from mmlightning.data_modules.common import SampleIndex

    a = train.__getitems__([SampleIndex(3, 11)])["video"]
    b = train.__getitems__([SampleIndex(3, 12)])["video"]
    assert torch.equal(a, train.__getitems__([SampleIndex(3, 11)])["video"]) and not torch.equal(a, b)


def test_rank_metrics_match_a_direct_count() -> None:
    from mmlightning.metrics.retrieval import RetrievalRecall

    g = torch.Generator().manual_seed(0)
    videos = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=-1)
    owner = torch.arange(60) % 30  # two captions per video
    texts = torch.nn.functional.normalize(videos[owner] + 0.8 * torch.randn(60, 8, generator=g), dim=-1)
    metric = RetrievalRecall(directions=("v2t", "t2v"))
    metric.update(videos, torch.arange(30), texts, owner, torch.arange(60), torch.arange(60))
    out = metric.compute()
    scores = (videos @ texts.T).numpy()
    v2t = [1 + int((scores[i] > scores[i][owner.numpy() == i].max()).sum()) for i in range(30)]
    t2v = [1 + int((scores[:, j] > scores[owner[j], j]).sum()) for j in range(60)]
    assert out["v2t_MdR"] == pytest.approx(np.median(v2t)) and out["v2t_MnR"] == pytest.approx(np.mean(v2t))
    assert out["t2v_MdR"] == pytest.approx(np.median(t2v)) and out["t2v_MnR"] == pytest.approx(np.mean(t2v))
    assert out["v2t_R@1"] == pytest.approx(np.mean(np.array(v2t) == 1))


@pytest.fixture(scope="module")
def msrvtt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shapes videos written by `mml data write` in MSR-VTT's own layout."""
    out = tmp_path_factory.mktemp("msrvtt")
    assert main(["data", "write", "shapes", str(out), "--format", "msrvtt", "--num", "40", "--image-size", "32"]) == 0
    return out


def msrvtt_data(root: Path) -> list[str]:
    return ["data={name: msrvtt, batch_size: 8, eval_batch_size: 8}", f"data.train_json={root}/train_val_videodatainfo.json",
            f"data.test_json={root}/test_videodatainfo.json", f"data.video_root={root}/videos"]


def test_msrvtt_layout_fits_end_to_end(msrvtt: Path, tmp_path: Path) -> None:
    info = json.loads((msrvtt / "train_val_videodatainfo.json").read_text())
    assert {v["split"] for v in info["videos"]} == {"train", "validate"}
    assert all((msrvtt / "videos" / f"{v['video_id']}.mp4").is_file() for v in info["videos"])
    assert main(["fit", "video-clip-shapes", *SHAPES_VIDEO, *msrvtt_data(msrvtt), "logger.name=none", "run.name=m"]) == 0
    summary = json.loads((tmp_path / "runs" / "m" / "summary.json").read_text())
    assert summary["global_step"] == 5  # 40 videos, batches of 8, the last kept
    for key in ("test/v2t_R@1", "test/t2v_R@1", "test/v2t_MdR", "test/t2v_MnR"):
        assert key in summary["test"], sorted(summary["test"])


def test_bad_videos_are_counted_and_left_out_and_a_missing_one_named(msrvtt: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(msrvtt, root)
    (root / "videos" / "train0.mp4").write_bytes(b"")  # empty
    (root / "videos" / "train1.mp4").write_bytes((root / "videos" / "train2.mp4").read_bytes()[:200])  # cut short
    cfg, task = video_task(*msrvtt_data(root), "data.max_bad_fraction=0.1")
    data = build_datamodule(cfg, task)
    data.setup("fit")
    assert len(data.skipped["train"]) == 2 and "train0.mp4" in data.skipped["train"][0]
    assert len(data.datasets["train"]) == 38
    with pytest.raises(UserError, match=r"data \(strict\): .*train_val_videodatainfo.json: bad video .*train0.mp4"):
        build_datamodule(*video_task(*msrvtt_data(root), "data.strict=true")).setup("fit")
    with pytest.raises(UserError, match=r"2 of 40 train videos .* more than data.max_bad_fraction=0.01"):
        build_datamodule(*video_task(*msrvtt_data(root))).setup("fit")
    (root / "videos" / "train5.mp4").unlink()
    with pytest.raises(UserError, match=r"train_val_videodatainfo.json: video 'train5' has captions but no file"):
        build_datamodule(*video_task(*msrvtt_data(root))).setup("fit")


def test_video_folder_reads_a_captions_csv(msrvtt: Path, tmp_path: Path) -> None:
    rows = ["video,caption"] + [f"train{k}.mp4,a small red circle moves up" for k in range(12)]
    (tmp_path / "train.csv").write_text("\n".join(rows))
    (tmp_path / "val.json").write_text(json.dumps([{"video": "val0.mp4", "captions": ["a", "b"]},
                                                   {"video": "val1.mp4", "caption": "c"}]))
    cfg, task = video_task("data={name: video_folder, batch_size: 4}", f"data.video_root={msrvtt}/videos",
                           f"data.train_captions={tmp_path / 'train.csv'}", f"data.val_captions={tmp_path / 'val.json'}")
    data = build_datamodule(cfg, task)
    data.setup("fit")
    assert len(data.datasets["train"]) == 12 and data.datasets["val"].captions == [["a", "b"], ["c"]]
    (tmp_path / "bad.csv").write_text("file,text\nx.mp4,y\n")
    with pytest.raises(UserError, match=r"data.train_captions: .*bad.csv has no video, caption column; its columns: "
                                        r"file, text"):
        build_datamodule(*video_task("data={name: video_folder}", f"data.video_root={msrvtt}/videos",
                                     f"data.train_captions={tmp_path / 'bad.csv'}",
                                     f"data.val_captions={tmp_path / 'val.json'}")).setup("fit")


def test_video_settings_that_do_not_fit_name_the_key() -> None:
    with pytest.raises(UserError, match="model.temporal.init_positions=text copies 8 rows of width 128 .* Set "
                                        "model.temporal.init_positions=random"):
        video_task("model.temporal.init_positions=text")  # the shapes text tower is 64 wide, the embedding 128
    with pytest.raises(UserError, match="data shapes_videos holds videos: the task needs model.temporal"):
        cfg = resolve(load_recipe("clip-shapes", [*SHAPES_CLIP, "data={name: shapes_videos}",
                                                  "model.text.vocab=shapes_video"]))
        build_datamodule(cfg, build_task(cfg))
    with pytest.raises(UserError, match="model.temporal reads videos; data module shapes_clip has images"):
        cfg = resolve(load_recipe("video-clip-shapes", [*SHAPES_VIDEO, "data={name: shapes_clip}"]))
        build_datamodule(cfg, build_task(cfg))
    with pytest.raises(UserError, match="data.video_decoder: 'decord' is not a video decoder; valid: pyav, torchcodec"):
        vio.check_decoder("decord")


DDP_SCRIPT = '''
import os, sys
import torch
sys.path.insert(0, os.environ["TESTS"])
from ddp_parity import compare
from tiny import SHAPES_VIDEO
from mmlightning.build import build_datamodule, build_task
from mmlightning import config as C

def batch_and_task():
    cfg = C.resolve(C.load_recipe("video-clip-shapes", [*SHAPES_VIDEO, "data.num_frames=12"]))
    torch.manual_seed(0)
    task = build_task(cfg)
    data = build_datamodule(cfg, task)
    data.setup("fit")
    batch = data.datasets["train"].__getitems__(list(range(16)))  # 16 videos and their twins, frames from each seed
    return task.eval(), batch  # eval: no dropout, BatchNorm on its running statistics

compare(batch_and_task)
'''


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_with_the_doubled_batch(tmp_path: Path) -> None:
    """Video retrieval under DDP: each rank's videos against all the captions (the gathered
    features), so loss and gradients equal one process's over the whole batch."""
    from ddp_parity import run

    a, b = run(tmp_path, DDP_SCRIPT, port=29541)
    assert abs(a["loss"] - b["loss"]) < 1e-4, (a["loss"], b["loss"])
    assert set(a["grads"]) == set(b["grads"]) and any("temporal" in name for name in a["grads"])
    for name, grad in a["grads"].items():
        assert torch.allclose(grad, b["grads"][name], atol=1e-5, rtol=1e-3), name


def test_reversed_twins_come_into_the_batch_with_their_videos() -> None:
    """data.reversed_twins: every training video's time-reversed copy, with its own caption,
    in the same batch: the negative that only the order of the frames tells apart."""
    cfg, task = video_task("data.reversed_twins=true", "data.num_frames=8")  # 8 of 8 frames: all, in order
    data = build_datamodule(cfg, task)
    data.setup("fit")
    assert len(data.datasets["train"]) == 48
    batch = next(iter(data.train_dataloader()))
    assert len(batch["video"]) == 16  # 8 pairs and their twins
    scenes = data.scenes("train")
    words = task.text.tokenizer
    for k in range(0, 16, 2):
        video, twin = batch["video"][k], batch["video"][k + 1]
        torch.testing.assert_close(twin, video.flip(0))  # the same frames, backwards
        first = scenes[int(batch["image_id"][k])]
        caption = words.decode(batch["input_ids"][k + 1], skip_special_tokens=True)
        assert caption == shapes_video.reverse(first).caption != first.caption
