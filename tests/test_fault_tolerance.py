"""Runs that survive: signals, exact mid-epoch resume, atomic and unreadable checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from tiny import SHAPES_CLIP
from wandb_offline import find_run_files, read_run

from mmlightning.build import build_datamodule, build_task, build_trainer
from mmlightning.cli import main
from mmlightning.config import load_recipe, resolve
from mmlightning.fault_tolerance import AtomicCheckpointIO, readable_checkpoint

# 512 images / 32 per batch = 16 steps an epoch; 2 epochs with warm-up + cosine
RESUMABLE = [*SHAPES_CLIP, "data.num_train=512", "trainer.max_epochs=2", "trainer.log_every_n_steps=1",
             "scheduler.warmup_steps=4", "logger.name=wandb", "imports=[signalling.py]",
             "model.vision.name=signalling_cnn"]

SIGNALLING_CNN = '''
import os, signal
from mmlightning.encoders.vision import SmallCNN
from mmlightning.registry import VISION_ENCODERS

SIGNAL_AT = int(os.environ.get("SIGNAL_AT_FORWARD", "0"))

@VISION_ENCODERS.register("signalling_cnn")
class SignallingCNN(SmallCNN):
    """The shapes CNN, which sends its own process a signal on its N-th training forward."""
    forwards = 0

    def forward(self, images):
        if self.training:
            SignallingCNN.forwards += 1
            if SignallingCNN.forwards == SIGNAL_AT:
                os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL"]))
        return super().forward(images)
'''


def mml(cwd: Path, *args: str, signal_at: int = 0, signal_name: str = "SIGTERM") -> subprocess.CompletedProcess:
    env = {**os.environ, "SIGNAL_AT_FORWARD": str(signal_at), "SIGNAL": signal_name, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "mmlightning.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def losses_by_step(run_dir: Path) -> dict[int, float]:
    losses: dict[int, float] = {}
    for path in find_run_files(run_dir / "wandb"):
        for row in read_run(path).history:
            if "train/loss" in row:
                step = int(row["trainer/global_step"])
                assert step not in losses, f"step {step} trained twice"
                losses[step] = row["train/loss"]
    return losses


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 32  # last.ckpt is the end of training, improved metric or not
    return checkpoint["state_dict"]


@pytest.mark.slow
def test_signals_then_resume_reproduce_the_uninterrupted_run(tmp_path: Path) -> None:
    (tmp_path / "signalling.py").write_text(SIGNALLING_CNN)
    reference = mml(tmp_path, "fit", "clip-shapes", *RESUMABLE, "run.name=straight")
    assert reference.returncode == 0, reference.stderr[-3000:]

    run = tmp_path / "runs" / "cut"
    first = mml(tmp_path, "fit", "clip-shapes", *RESUMABLE, "run.name=cut", signal_at=5)
    assert first.returncode == 143, first.stderr[-3000:]
    assert "stopped by SIGTERM" in first.stderr and "--resume runs/cut" in first.stderr
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 5
    # a second interruption in the same epoch, by Ctrl-C this time
    second = mml(tmp_path, "fit", "clip-shapes", "--resume", str(run), signal_at=4, signal_name="SIGINT")
    assert second.returncode == 130, second.stderr[-3000:]
    third = mml(tmp_path, "fit", "clip-shapes", "--resume", str(run))
    assert third.returncode == 0, third.stderr[-3000:]

    legs = [read_run(path) for path in find_run_files(run / "wandb")]
    assert len(legs) == 3 and len({leg.run_id for leg in legs}) == 1  # one W&B run, continued twice
    steps = [row["trainer/global_step"] for leg in legs for row in leg.history if "trainer/global_step" in row]
    assert steps == sorted(steps)
    straight, cut = losses_by_step(tmp_path / "runs" / "straight"), losses_by_step(run)
    assert sorted(cut) == sorted(straight) == list(range(32))
    assert cut == straight  # same batches in the same order, same schedule, same numbers
    expected = final_weights(tmp_path / "runs" / "straight")
    for name, value in final_weights(run).items():
        assert torch.equal(value, expected[name]), name


def test_schedule_length_matches_lightning_without_asking_it(tmp_path: Path) -> None:
    """The task sizes its cosine schedule from the data module, not from
    ``trainer.estimated_stepping_batches`` (which drops a resumed loader's position)."""
    seen = []

    class Compare(L.Callback):
        def on_train_start(self, trainer: L.Trainer, task: L.LightningModule) -> None:
            seen.append((task.total_training_steps(), trainer.estimated_stepping_batches))
            trainer.should_stop = True

    cases = (["trainer.max_epochs=3"], ["trainer.max_epochs=2", "trainer.limit_train_batches=5"],
             ["trainer.max_epochs=2", "trainer.limit_train_batches=0.5"],
             ["trainer.max_epochs=5", "trainer.max_steps=7"], ["trainer.max_epochs=-1", "trainer.max_steps=9"],
             ["trainer.max_epochs=3", "model.accumulate_batches=3"])
    for extra in cases:
        cfg = resolve(load_recipe("clip-shapes", [*SHAPES_CLIP, "data.num_train=300", "logger.name=none", *extra]))
        task = build_task(cfg)
        datamodule = build_datamodule(cfg, task)
        trainer = build_trainer(cfg, None, task=task)
        trainer.callbacks.append(Compare())
        trainer.fit(task, datamodule=datamodule)
    # 300 samples, 32 a batch, last one dropped: 9 batches an epoch
    assert [ours for ours, _ in seen] == [27, 10, 8, 7, 9, 9]
    # Lightning counts batches, not the task's own accumulation groups, so compare all but the last
    assert [ours for ours, _ in seen[:-1]] == [int(lightning) for _, lightning in seen[:-1]]


def test_truncated_newest_checkpoint_is_skipped_on_resume(tmp_path: Path) -> None:
    base = ["fit", "clip-shapes", *SHAPES_CLIP, "logger.name=none", "run.name=r"]
    assert main(base) == 0  # one epoch of 8 steps: best-step=8.ckpt and last.ckpt
    checkpoints = tmp_path / "runs" / "r" / "checkpoints"
    last = checkpoints / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a disk that filled up mid-write
    os.utime(last, (time.time() + 10, time.time() + 10))
    assert not readable_checkpoint(last) and readable_checkpoint(checkpoints / "best-step=8.ckpt")
    with pytest.warns(UserWarning, match=r"skipping .*last.ckpt: not a readable checkpoint"):
        assert main(["fit", "clip-shapes", "--resume", str(tmp_path / "runs" / "r"), "trainer.max_epochs=2"]) == 0
    assert json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())["global_step"] == 16


KILLED_SAVE = '''
import sys, torch
from mmlightning.fault_tolerance import AtomicCheckpointIO
AtomicCheckpointIO().save_checkpoint({"weights": torch.zeros(400_000_000, dtype=torch.uint8)}, sys.argv[1])
'''


@pytest.mark.slow
def test_killed_save_leaves_the_previous_checkpoint_whole(tmp_path: Path) -> None:
    target = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)
    before = target.read_bytes()
    saver = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(target)])
    deadline = time.time() + 60
    while not any(p.name.startswith(".last.ckpt.partial-") and p.stat().st_size > 0 for p in target.parent.iterdir()):
        assert time.time() < deadline and saver.poll() is None, "the save finished before it could be killed"
        time.sleep(0.01)
    saver.send_signal(signal.SIGKILL)
    saver.wait()
    assert target.read_bytes() == before and readable_checkpoint(target)
    assert [p.name for p in target.parent.glob("*.ckpt")] == ["last.ckpt"]  # resume never sees the partial file


NAN_CNN = '''
import os
from mmlightning.encoders.vision import SmallCNN
from mmlightning.registry import VISION_ENCODERS

NAN_AT = int(os.environ.get("NAN_AT_FORWARD", "0"))
NAN_RANK = os.environ.get("NAN_RANK", "0")

@VISION_ENCODERS.register("nan_cnn")
class NaNCNN(SmallCNN):
    """The shapes CNN, whose N-th training forward (on one rank) returns NaN features."""
    forwards = 0

    def forward(self, images):
        out = super().forward(images)
        if self.training:
            NaNCNN.forwards += 1
            if NaNCNN.forwards == NAN_AT and os.environ.get("LOCAL_RANK", "0") == NAN_RANK:
                out.pooled = out.pooled * float("nan")
        return out
'''


def test_nonfinite_loss_stops_before_the_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "nan_cnn.py").write_text(NAN_CNN)
    monkeypatch.setenv("NAN_AT_FORWARD", "12")  # step 11, in the second epoch
    args = ["fit", "clip-shapes", *SHAPES_CLIP, "trainer.max_epochs=2", "logger.name=none", "imports=[nan_cnn.py]",
            "model.vision.name=nan_cnn", "run.name=n"]
    assert main(args) == 1
    err = capsys.readouterr().err
    last = tmp_path / "runs" / "n" / "checkpoints" / "last.ckpt"
    assert "non-finite loss or gradients at step 11" in err and f"Last good checkpoint: {last}" in err
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 8  # the end of epoch 1, never overwritten
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


def test_nonfinite_skip_mode_counts_and_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "nan_cnn.py").write_text(NAN_CNN)
    monkeypatch.setenv("NAN_AT_FORWARD", "3")
    args = ["fit", "clip-shapes", *SHAPES_CLIP, "logger.name=csv", "imports=[nan_cnn.py]", "model.vision.name=nan_cnn",
            "run.name=s", "run.on_nonfinite=skip"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "runs" / "s" / "summary.json").read_text())
    assert summary["global_step"] == 8 and all(map(lambda v: v == v, summary["test"].values()))
    metrics = (tmp_path / "runs" / "s" / "csv" / "metrics.csv").read_text()
    assert "train/nonfinite_skipped" in metrics.splitlines()[0]


@pytest.mark.slow
def test_nonfinite_on_one_rank_stops_both(tmp_path: Path) -> None:
    (tmp_path / "nan_cnn.py").write_text(NAN_CNN)
    env = {**os.environ, "NAN_AT_FORWARD": "2", "NAN_RANK": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "mmlightning.cli", "fit", "clip-shapes", *SHAPES_CLIP, "logger.name=none",
           "imports=[nan_cnn.py]", "model.vision.name=nan_cnn", "run.name=ddp", "trainer.accelerator=cpu",
           "trainer.devices=2", "trainer.strategy=ddp"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "non-finite loss or gradients at step 1" in out.stderr


class NaNAtStep(L.LightningModule):
    """A linear model whose loss is NaN at one step: the smallest case of the guard's work."""

    def __init__(self, nan_step: int, fused: bool) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 4)
        self.nan_step, self.fused = nan_step, fused

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean() * 50
        return loss * float("nan") if self.global_step == self.nan_step else loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.05, weight_decay=0.1, fused=self.fused)


@pytest.mark.parametrize("fused", [True, False])
def test_guard_skips_the_bad_step_and_clips_as_torch_does(fused: bool) -> None:
    """Skip mode against a hand-written loop: clip_grad_norm_ at 0.5 and AdamW, with the NaN
    step left out entirely. Fused AdamW skips it on the device (found_inf); unfused falls back
    to a host-side check; both must leave the weights, moments and step count untouched."""
    from mmlightning.fault_tolerance import NonFiniteGuard

    torch.manual_seed(0)
    data = [torch.randn(16, 8) for _ in range(6)]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat(data)), batch_size=16)
    model = NaNAtStep(nan_step=2, fused=fused)
    reference = torch.nn.Linear(8, 4)
    reference.load_state_dict(model.layer.state_dict())
    guard = NonFiniteGuard("skip", clip_value=0.5)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", callbacks=[guard], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader)

    optimizer = torch.optim.AdamW(reference.parameters(), lr=0.05, weight_decay=0.1)
    for step, x in enumerate(data):
        if step == 2:
            continue
        optimizer.zero_grad()
        (reference(x).pow(2).mean() * 50).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        optimizer.step()
    assert guard.skipped == 1
    for ours, theirs in zip(model.layer.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    state = trainer.optimizers[0].state[model.layer.weight]
    assert int(state["step"]) == 5  # the skipped step is not counted (bias correction stays right)


def _sharded_norm_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from mmlightning.fault_tolerance import global_grad_norm

    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    norms = []
    for poison in (None, float("inf")):
        full = torch.arange(10.0).reshape(5, 2)
        if poison is not None:
            full[4, 1] = poison  # on the last rank's shard only
        shard = torch.nn.Parameter(full.chunk(world)[rank].clone())  # FSDP-style: each rank one part
        shard.grad = full.chunk(world)[rank].clone()
        norms.append(global_grad_norm([shard], sharded=True))
    torch.save(torch.stack(norms), f"{out}.{rank}")
    dist.destroy_process_group()


def test_sharded_gradients_norm_summed_over_ranks(tmp_path: Path) -> None:
    """Under FSDP each rank holds a shard of the gradients; every rank must see the norm of the
    whole (and a non-finite value on another rank's shard), or the ranks would disagree on a skip."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_sharded_norm_worker, args=(2, port, str(tmp_path / "norm")), nprocs=2, start_method="spawn")
    expected = torch.stack([torch.arange(10.0).norm(), torch.tensor(float("inf"))])
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"norm.{rank}"), expected)


RECORDING_CNN = '''
import json, os, signal
import torch
from mmlightning.encoders.vision import SmallCNN
from mmlightning.registry import VISION_ENCODERS

@VISION_ENCODERS.register("recording_cnn")
class RecordingCNN(SmallCNN):
    """The shapes CNN with dropout on its output, which writes down on each training forward
    what it was given (the augmented crops) and a number from its rank's random stream, and
    on rank 0 sends its process a signal on the N-th forward."""
    forwards = 0

    def forward(self, images):
        out = super().forward(images)
        if self.training:
            RecordingCNN.forwards += 1
            rank = os.environ.get("LOCAL_RANK", "0")
            with open(os.path.join(os.environ["RECORD_DIR"], f"rank{rank}.jsonl"), "a") as f:
                f.write(json.dumps([images.double().sum().item(), torch.rand(()).item()]) + "\\n")
            if rank == "0" and RecordingCNN.forwards == int(os.environ.get("SIGNAL_AT_FORWARD", "0")):
                os.kill(os.getpid(), signal.SIGTERM)
            out.pooled = torch.nn.functional.dropout(out.pooled, 0.5, training=True)
        return out
'''


@pytest.mark.slow
def test_interrupted_ddp_run_resumes_exactly_on_both_ranks(tmp_path: Path, fixtures: dict[str, Path]) -> None:
    """Two gloo ranks on COCO-format JPEGs with random crops in a loader worker, dropout in both towers and two
    epochs: stopped by SIGTERM mid-epoch and resumed, every rank sees the same crops and draws
    the same random numbers at every step as in the uninterrupted run, and the weights match."""
    from tiny import coco_overrides

    (tmp_path / "recording.py").write_text(RECORDING_CNN)
    args = ["fit", "clip-coco", *coco_overrides(fixtures["coco"], fixtures["minilm"]), "data.batch_size=8",
            "trainer.max_epochs=2", "model.vision={name: recording_cnn, image_size: 32, width: 8, output_dim: 32}",
            "imports=[recording.py]", "logger.name=none", "trainer.accelerator=cpu", "trainer.devices=2",
            "trainer.strategy=ddp", "trainer.precision=32-true", "data.crop_scale=[0.3, 1.0]", "data.num_workers=1"]

    def fit(name: str, *extra: str, signal_at: int = 0) -> subprocess.CompletedProcess:
        (tmp_path / name).mkdir(exist_ok=True)
        env = {**os.environ, "RECORD_DIR": str(tmp_path / name), "SIGNAL_AT_FORWARD": str(signal_at),
               "PYTHONUNBUFFERED": "1"}
        return subprocess.run([sys.executable, "-m", "mmlightning.cli", *extra], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)

    straight = fit("straight", *args, "run.name=straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    cut = fit("cut", *args, "run.name=cut", signal_at=3)
    assert cut.returncode == 143, cut.stderr[-3000:]
    saved = torch.load(tmp_path / "runs" / "cut" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    stopped_at = saved["global_step"]
    assert 3 <= stopped_at < 6  # mid-epoch: 6 steps an epoch per rank
    resumed = fit("cut", "fit", "clip-coco", "--resume", str(tmp_path / "runs" / "cut"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    for rank in (0, 1):
        expected = (tmp_path / "straight" / f"rank{rank}.jsonl").read_text().splitlines()
        legs = (tmp_path / "cut" / f"rank{rank}.jsonl").read_text().splitlines()
        # the interrupted leg may have run steps past its checkpoint before stopping: drop those
        first_leg_extra = len(legs) - len(expected)
        got = legs[:stopped_at] + legs[stopped_at + first_leg_extra:]
        assert len(expected) == 12 and got == expected, f"rank {rank}"
    weights = {name: torch.load(tmp_path / "runs" / name / "checkpoints" / "last.ckpt", map_location="cpu",
                                weights_only=True)["state_dict"] for name in ("straight", "cut")}
    for key, value in weights["straight"].items():
        assert torch.equal(value, weights["cut"][key]), key


@pytest.mark.slow
def test_signal_mid_accumulation_waits_for_the_optimizer_step(tmp_path: Path) -> None:
    """With trainer.accumulate_grad_batches=2, a SIGTERM after the 5th batch (half-way
    through the 3rd step's window) saves at the end of that window, not mid-way: the
    checkpoint holds no half-accumulated gradients, and the resumed run ends with the
    uninterrupted run's weights."""
    from tiny import SHAPES_VQA

    (tmp_path / "signalling.py").write_text(SIGNALLING_CNN)
    args = ["fit", "vqa-shapes", *SHAPES_VQA, "trainer.accumulate_grad_batches=2", "logger.name=none",
            "imports=[signalling.py]", "model.vision.name=signalling_cnn", "trainer.precision=32-true"]
    straight = mml(tmp_path, *args, "run.name=straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    cut = mml(tmp_path, *args, "run.name=cut", signal_at=5)
    assert cut.returncode == 143, cut.stderr[-3000:]
    run = tmp_path / "runs" / "cut"
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3 and saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 6
    resumed = mml(tmp_path, "fit", "vqa-shapes", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    weights = {name: torch.load(tmp_path / "runs" / name / "checkpoints" / "last.ckpt", map_location="cpu",
                                weights_only=True)["state_dict"] for name in ("straight", "cut")}
    for key, value in weights["straight"].items():
        assert torch.equal(value, weights["cut"][key]), key


def test_clipping_under_a_grad_scaler_clips_the_unscaled_gradients() -> None:
    """16-mixed with a fused optimizer: Lightning leaves the gradients scaled (the kernel
    unscales them), so the guard unscales before clipping, as open_clip does; the result
    equals the hand-written GradScaler loop (unscale_, clip_grad_norm_, step, update)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    from mmlightning.fault_tolerance import NonFiniteGuard

    torch.manual_seed(0)
    data = [torch.randn(16, 8) for _ in range(4)]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat(data)), batch_size=16)
    model = NaNAtStep(nan_step=-1, fused=True)
    reference = torch.nn.Linear(8, 4)
    reference.load_state_dict(model.layer.state_dict())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", callbacks=[NonFiniteGuard("stop", clip_value=0.5)],
                        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader)

    optimizer = torch.optim.AdamW(reference.parameters(), lr=0.05, weight_decay=0.1, fused=True)
    reference_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for x in data:
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = reference(x).pow(2).mean() * 50
        reference_scaler.scale(loss).backward()
        reference_scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        reference_scaler.step(optimizer)
        reference_scaler.update()
    for ours, theirs in zip(model.layer.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
