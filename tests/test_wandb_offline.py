"""Round-trip check of the offline .wandb reader against a real wandb run."""

from __future__ import annotations

from pathlib import Path

import pytest
from wandb_offline import BLOCK_LEN, find_run_files, read_records, read_run

STEPS = 1500  # enough records to fill many 32 KiB blocks, so some span two


@pytest.fixture
def offline_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # Keep every wandb file inside tmp_path and make sure nothing goes online.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path))
    return tmp_path


def test_reads_back_offline_run(offline_env: Path) -> None:
    wandb = pytest.importorskip("wandb")

    run = wandb.init(
        dir=str(offline_env),  # wandb keeps the WANDB_DIR it saw first in this process: be explicit
        project="p",
        name="n",
        group="g",
        tags=["a"],
        config={"model": {"lr": 0.1}, "x": 1},
    )
    logged = []
    for i in range(STEPS):
        row = {"loss": 1.0 / (i + 1), "nested": {"a": i}, "tag": f"s{i}"}
        run.log(row)
        logged.append({"loss": row["loss"], "nested.a": i, "tag": f"s{i}", "_step": i})
    run.finish()

    (path,) = find_run_files(offline_env)
    assert path.stat().st_size > 3 * BLOCK_LEN

    got = read_run(path)
    assert (got.run_id, got.project, got.name, got.group, got.tags) == (
        run.id,
        "p",
        "n",
        "g",
        ["a"],
    )
    assert got.config == {"model": {"lr": 0.1}, "x": 1}
    assert [{key: row[key] for key in logged[0]} for row in got.history] == logged
    assert {key: got.summary[key] for key in logged[-1]} == logged[-1]

    # A copy cut mid-chunk, as when wandb is still writing, yields exactly
    # the complete records before the cut and no error.
    records = [r.SerializeToString() for r in read_records(path)]
    data = path.read_bytes()
    cut = offline_env / "cut.wandb"
    for size in (2 * BLOCK_LEN + 3, len(data) // 2, len(data) - 1):
        cut.write_bytes(data[:size])
        partial = [r.SerializeToString() for r in read_records(cut)]
        assert 0 < len(partial) < len(records)
        assert partial == records[: len(partial)]

    partial_run = read_run(cut)
    assert partial_run.history == got.history[: len(partial_run.history)]
