"""Checkpoints saved in shards (FSDP's ``state_dict_type="sharded"``) read like single files:
``mml test``, ``mml export``'s reader and ``model.init_from`` on one device."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from tiny import SHAPES_CLIP

from mmlightning.cli import main
from mmlightning.fault_tolerance import load_checkpoint, readable_checkpoint


def _save_sharded(rank: int, world: int, port: int, source: str, target: str) -> None:
    """What Lightning's FSDPStrategy.save_checkpoint writes for a sharded state dict: each
    rank's shards through torch.distributed.checkpoint (here DTensors sharded on dim 0 over a
    gloo mesh, as FSDP2 holds them), and the rest of the checkpoint in meta.pt from rank 0."""
    import torch.distributed as dist
    from lightning.fabric.strategies.fsdp import _distributed_checkpoint_save
    from lightning.fabric.utilities.load import _METADATA_FILENAME
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    mesh = init_device_mesh("cpu", (world,))
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    state = {k: distribute_tensor(v, mesh, [Shard(0)] if v.ndim and v.shape[0] >= world else [Replicate()])
             for k, v in checkpoint.pop("state_dict").items()}
    checkpoint.pop("optimizer_states")  # FSDP saves its own optimizer layout; not needed to read weights
    _distributed_checkpoint_save({"model": state}, Path(target))
    if rank == 0:
        torch.save(checkpoint, Path(target) / _METADATA_FILENAME)
    dist.barrier()
    dist.destroy_process_group()


def test_sharded_checkpoint_tests_exports_and_initialises_like_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "clip-shapes", *SHAPES_CLIP, "logger.name=none", "run.name=r"]) == 0
    folder = tmp_path / "runs" / "r" / "checkpoints"
    whole, sharded = folder / "last.ckpt", folder / "sharded.ckpt"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_save_sharded, args=(2, port, str(whole), str(sharded)), nprocs=2, start_method="spawn")
    assert sharded.is_dir() and len(list(sharded.glob("*.distcp"))) == 2 and readable_checkpoint(sharded)

    expected = torch.load(whole, map_location="cpu", weights_only=True)
    got = load_checkpoint(sharded)
    assert got["global_step"] == expected["global_step"] and got["mmlightning_recipe"] == expected["mmlightning_recipe"]
    assert got["state_dict"].keys() == expected["state_dict"].keys()
    for key, value in expected["state_dict"].items():
        assert torch.equal(got["state_dict"][key], value), key

    capsys.readouterr()
    printed = {}
    for ckpt in (whole, sharded):
        assert main(["test", str(ckpt), "logger.name=none"]) == 0
        printed[ckpt.name] = capsys.readouterr().out
    assert "test/i2t_R@1" in printed["last.ckpt"] and printed["sharded.ckpt"] == printed["last.ckpt"]

    from mmlightning.export import load_task

    exported, _ = load_task(sharded)  # what mml export reads
    for name, value in exported.state_dict().items():
        assert torch.equal(value, expected["state_dict"][name]), name

    from mmlightning.build import build_task
    from mmlightning.config import load_recipe, resolve

    task = build_task(resolve(load_recipe("vqa-shapes", [f"model.init_from={sharded}"])))
    for name, value in task.vision.state_dict().items():
        assert torch.equal(value, expected["state_dict"][f"vision.{name}"]), name


def test_deepspeed_folder_without_deepspeed_says_what_reads_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    try:
        import deepspeed  # noqa: F401
        pytest.skip("deepspeed is installed here: the folder would be read, not refused")
    except ImportError:
        pass
    folder = tmp_path / "last.ckpt"
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "latest").write_text("checkpoint")  # DeepSpeed's tag file, as save_checkpoint writes it
    assert main(["test", "clip-shapes", "--ckpt", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"{folder} is a DeepSpeed checkpoint: reading it needs the deepspeed package" in err
