"""VQA: every fusion head learns, init_from really loads the CLIP towers, frozen towers stay
put, and the answer losses are the textbook formulas."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny import SHAPES_CLIP

import mmlightning.fusion  # noqa: F401  (registers the heads, whichever tests run first)
from mmlightning.build import build_datamodule, build_task
from mmlightning.cli import main
from mmlightning.config import load_recipe, resolve
from mmlightning.errors import UserError
from mmlightning.losses import SoftCrossEntropy, SoftScoreBCE
from mmlightning.registry import FUSION_HEADS

HEADS = {
    "concat": {},
    "product": {},
    "bilinear": {"rank": 128},
    "film": {"channels": 32, "blocks": 2, "question_dim": 64},
    "single_stream": {"width": 64, "layers": 1, "heads": 2},
    "stacked_attention": {"glimpses": 2, "attention_dim": 64},
    "relation_network": {"pair_dim": 64, "pair_layers": 2},
    "co_attention": {"width": 32, "heads": 2, "question_dim": 64},
}
SMALL_VQA = ["data.num_train=64", "data.num_val=16", "data.num_test=16", "data.batch_size=64"]


def vqa_cfg(*overrides: str) -> dict:
    return resolve(load_recipe("vqa-shapes", [*SMALL_VQA, *overrides]))


def test_every_registered_head_is_covered() -> None:
    assert set(HEADS) == set(FUSION_HEADS.names())


@pytest.mark.parametrize("head", sorted(HEADS))
def test_fusion_head_trains_with_falling_loss(head: str) -> None:
    torch.manual_seed(0)
    spec = "{" + ", ".join([f"name: {head}", "hidden_dim: 64", *(f"{k}: {v}" for k, v in HEADS[head].items())]) + "}"
    cfg = vqa_cfg(f"model.fusion={spec}", "model.classifier_hidden=64")
    task = build_task(cfg)
    datamodule = build_datamodule(cfg, task)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    optimizer = torch.optim.AdamW(task.parameters(), lr=2e-3)
    task.train()
    losses = []
    for _ in range(40):  # one fixed batch: any head that learns at all must fit it
        loss = task.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses


def test_unknown_fusion_head_lists_choices() -> None:
    with pytest.raises(UserError, match=r"unknown fusion head 'flim'.*Did you mean 'film'.*single_stream"):
        build_task(vqa_cfg("model.fusion={name: flim}"))


def test_fusion_head_option_typo_is_named() -> None:
    with pytest.raises(UserError, match=r"model.fusion.chanels: unknown option.*Did you mean 'channels'"):
        build_task(vqa_cfg("model.fusion={name: film, chanels: 8}"))


@pytest.fixture
def clip_run(tmp_path: Path) -> Path:
    assert main(["fit", "clip-shapes", *SHAPES_CLIP, "logger.name=none", "run.name=clip"]) == 0
    return tmp_path / "runs" / "clip"


def test_init_from_loads_clip_towers_and_freezes(clip_run: Path) -> None:
    ckpt = torch.load(clip_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    task = build_task(vqa_cfg(f"model.init_from={clip_run}", "model.freeze_vision=true"))
    for name, tensor in task.state_dict().items():
        if name.startswith(("vision.", "text.")):
            assert torch.equal(tensor, ckpt[name]), name
    fresh = build_task(vqa_cfg())
    assert not torch.equal(fresh.text.embed.weight, task.text.embed.weight)
    # a frozen tower: no gradients, and its BatchNorm statistics do not move in a real fit
    import lightning as L

    datamodule = build_datamodule(vqa_cfg("data.batch_size=16"), task)
    before = {k: v.clone() for k, v in task.vision.state_dict().items()}
    text_before = task.text.embed.weight.clone()
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    trainer.fit(task, datamodule=datamodule)
    assert all(p.grad is None for p in task.vision.parameters())
    assert all(torch.equal(before[k], v) for k, v in task.vision.state_dict().items())
    assert not torch.equal(text_before, task.text.embed.weight)  # the unfrozen tower trained


def test_init_from_reads_compiled_tower_keys(clip_run: Path, tmp_path: Path) -> None:
    ckpt = torch.load(clip_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    compiled = {k.replace("vision.", "vision._orig_mod.", 1): v for k, v in ckpt["state_dict"].items()}
    torch.save({**ckpt, "state_dict": compiled}, tmp_path / "compiled.ckpt")
    task = build_task(vqa_cfg(f"model.init_from={tmp_path / 'compiled.ckpt'}"))
    assert torch.equal(task.vision.pos_embed, ckpt["state_dict"]["vision.pos_embed"])


def test_init_from_with_other_towers_names_the_spec(clip_run: Path) -> None:
    with pytest.raises(UserError, match=r"does not fit this recipe's model.vision; that run built it as .*width.*16"):
        build_task(vqa_cfg(f"model.init_from={clip_run}", "model.vision.width=8"))
    with pytest.raises(UserError, match="no such file or run directory"):
        build_task(vqa_cfg("model.init_from=runs/nowhere"))


def test_soft_bce_and_cross_entropy_are_the_textbook_losses() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 6)
    soft = torch.tensor([[1, 0.3, 0, 0, 0, 0], [0, 0, 0.6, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1.0]])
    expected = -(soft * F.logsigmoid(logits) + (1 - soft) * F.logsigmoid(-logits)).sum() / 4
    assert torch.allclose(SoftScoreBCE()(logits, soft), expected, atol=1e-6)
    one_hot = F.one_hot(torch.tensor([2, 0, 5, 1]), 6).float()
    assert torch.allclose(SoftCrossEntropy()(logits, one_hot), F.cross_entropy(logits, torch.tensor([2, 0, 5, 1])))
    # a question whose answers are all outside the vocabulary (zero row) is left out
    kept = SoftCrossEntropy()(logits, soft)
    rows = [0, 1, 3]
    manual = -(soft[rows] / soft[rows].sum(1, keepdim=True) * F.log_softmax(logits[rows], 1)).sum(1).mean()
    assert torch.allclose(kept, manual, atol=1e-6)


def test_question_reader_equals_a_packed_bidirectional_gru() -> None:
    """The sync-free reader gives the final states a packed bidirectional GRU gives."""
    from mmlightning.encoders.outputs import TextOutput
    from mmlightning.fusion import QuestionReader

    torch.manual_seed(0)
    reader = QuestionReader(text_token_dim=8, question_dim=12)
    reference = torch.nn.GRU(8, 6, batch_first=True, bidirectional=True)
    for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
        getattr(reference, name).data.copy_(getattr(reader.forward_gru, name))
        getattr(reference, name + "_reverse").data.copy_(getattr(reader.backward_gru, name))
    lengths = torch.tensor([5, 2, 7, 1])
    mask = torch.arange(7)[None] < lengths[:, None]
    tokens = torch.randn(4, 7, 8) * mask[..., None] + 3.0 * ~mask[..., None]  # padding that would show if read
    packed = torch.nn.utils.rnn.pack_padded_sequence(tokens, lengths, batch_first=True, enforce_sorted=False)
    _, last = reference(packed)
    expected = torch.cat([last[0], last[1]], dim=-1)
    torch.testing.assert_close(reader(TextOutput(pooled=tokens[:, 0], tokens=tokens, mask=mask)), expected)


@pytest.mark.parametrize("mirror_right", [[0.8], [0.8, 0.0]])
def test_mirror_right_asks_right_questions_as_left_about_the_mirrored_image(mirror_right) -> None:
    """data.mirror_right: that fraction of the training questions saying "right" come as "left"
    with the image mirrored (the same answer), per epoch when it is a list; nothing else
    changes, nor the validation split. Read through the real training loader, epoch by epoch,
    against the same data unmirrored."""
    data = {}
    for name, fraction in (("plain", [0.0]), ("tilted", mirror_right)):
        cfg = vqa_cfg(f"data.mirror_right={fraction}", "data.relational_questions=3", "data.num_train=200",
                      "data.batch_size=50", f"data.num_workers={int(name == 'tilted')}")  # a worker's copy too
        task = build_task(cfg)
        data[name] = build_datamodule(cfg, task)
        data[name].setup("fit")
    plain = data["plain"].datasets["train"]
    loader = data["tilted"].train_dataloader()
    mean, std = torch.tensor(task.vision.image_config.mean), torch.tensor(task.vision.image_config.std)
    fractions = mirror_right * 2 if len(mirror_right) == 1 else mirror_right  # the last one repeats
    asked = []
    for epoch, fraction in enumerate(fractions):
        loader.sampler.set_epoch(epoch)
        says_right = mirrored = seen = 0
        asked.append([])
        for batch in loader:
            asked[-1].append(batch["question"])
            images = (batch["image"].permute(0, 2, 3, 1) * std + mean) * 255
            for i, qid in enumerate(batch["question_id"].tolist()):
                seen += 1
                original = plain.questions[qid]
                stored = plain.images[plain.owner[qid]].float()
                assert batch["answer"][i] == plain.answer_text[qid]
                says_right += "right" in original.split()
                if batch["question"][i] == original:
                    torch.testing.assert_close(images[i], stored, atol=1e-3, rtol=0)
                else:
                    mirrored += 1
                    assert batch["question"][i] == original.replace("right", "left") != original
                    torch.testing.assert_close(images[i], stored.flip(1), atol=1e-3, rtol=0)
        assert seen > 0.9 * len(plain) and says_right > 100
        assert (0.65 < mirrored / says_right < 0.95) if fraction else mirrored == 0
    resumed = data["tilted"].train_dataloader()  # a run resumed after epoch 0's first batch
    resumed.load_state_dict({"epoch": 0, "batches_done": 1})
    assert [batch["question"] for batch in resumed] == asked[0][1:]
    assert data["tilted"].datasets["val"].questions == data["plain"].datasets["val"].questions
    assert data["tilted"].datasets["val"].mirror_right == [0.0]


def test_mirror_right_outside_zero_to_one_is_refused() -> None:
    for bad in ("[1.5]", "[0.5, -0.1]", "[]", "[true]"):
        cfg = vqa_cfg(f"data.mirror_right={bad}")
        with pytest.raises(UserError, match="data.mirror_right must be a fraction"):
            build_datamodule(cfg, build_task(cfg))
