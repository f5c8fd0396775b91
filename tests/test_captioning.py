"""Captioning: labels shifted exactly once, padding ignored, greedy = a hand-written argmax
loop = beam search with one beam, and captioning a folder of images from a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tiny import SHAPES_CAPTION

from mmlightning.cli import main
from mmlightning.encoders.decoder import load_decoder_tokenizer, small_decoder
from mmlightning.losses import CaptionLMLoss


def test_first_prediction_targets_first_real_token_and_padding_is_ignored() -> None:
    tok = load_decoder_tokenizer("shapes")
    batch = tok(["a red circle", "a small blue square left of a cross"], padding="longest", return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids[0, 0] == tok.bos_token_id and ids[0, 4] == tok.eos_token_id and mask[0, 5:].sum() == 0
    vocab = len(tok)
    # logits at position t that put all mass on token t+1: a correct single shift gives ~0 loss
    perfect = torch.full((2, ids.shape[1], vocab), -30.0)
    perfect[:, :-1].scatter_(2, ids[:, 1:, None], 30.0)
    loss_fn = CaptionLMLoss()
    assert float(loss_fn(perfect, ids, mask)) < 1e-6
    # the logits at BOS are scored against the first word ("a"), nothing else
    wrong_first = perfect.clone()
    wrong_first[0, 0] = 0.0
    expected = F.cross_entropy(wrong_first[0, 0:1], ids[0, 1:2]) / int(mask[:, 1:].sum())
    assert torch.allclose(loss_fn(wrong_first, ids, mask), expected, atol=1e-5)
    # anything at padded positions does not count
    noisy = perfect.clone()
    noisy[0, 4:] = torch.randn(noisy[0, 4:].shape) * 10
    assert float(loss_fn(noisy, ids, mask)) < 1e-6


def manual_greedy(decoder, visual: torch.Tensor, steps: int) -> list[list[int]]:
    """Argmax one token at a time over the whole prefix, no cache: the reference."""
    tok = decoder.tokenizer
    out = []
    for v in visual:
        seq = [tok.bos_token_id]
        for _ in range(steps):
            ids = torch.tensor([seq])
            logits = decoder(ids, torch.ones_like(ids), v[None])
            seq.append(int(logits[0, -1].argmax()))
            if seq[-1] == tok.eos_token_id:
                break
        out.append(seq[1:])
    return out


def test_one_beam_equals_greedy_equals_manual_loop() -> None:
    torch.manual_seed(0)
    decoder = small_decoder(width=32, layers=2, heads=2).eval()
    with torch.no_grad():  # a large random init, so that sequences differ between images
        for p in decoder.model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.5)
    visual = torch.randn(5, 9, 32) * 3
    manual = manual_greedy(decoder, visual, steps=8)
    greedy = decoder.generate(visual, num_beams=1, do_sample=False, max_new_tokens=8)
    beam_one = decoder.generate(visual, num_beams=1, do_sample=False, max_new_tokens=8, length_penalty=2.0)
    pad = decoder.tokenizer.pad_token_id
    as_lists = [[t for t in row.tolist() if t != pad] for row in greedy]
    assert as_lists == manual
    assert torch.equal(greedy, beam_one)
    assert len({tuple(s) for s in manual}) > 1  # the check means something only if images differ
    beams = decoder.generate(visual, num_beams=4, do_sample=False, max_new_tokens=8)
    assert beams.shape[0] == 5 and torch.equal(beams, decoder.generate(visual, num_beams=4, max_new_tokens=8))


def test_predict_captions_a_folder_from_a_run(tmp_path: Path, capsys) -> None:
    assert main(["fit", "caption-shapes", *SHAPES_CAPTION, "logger.name=none", "run.name=cap"]) == 0
    from mmlightning.data_modules import shapes_world as world

    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    split = world.generate("test", 3, seed=5)
    for i, img in enumerate(split.images):
        Image.fromarray(img).save(folder / ("sub" if i else "") / f"img{i}.png")
    capsys.readouterr()
    out_file = tmp_path / "captions.json"
    assert main(["predict", "caption-shapes", "--ckpt", str(tmp_path / "runs" / "cap"), "--images", str(folder),
                 "--out", str(out_file)]) == 0
    captions = json.loads(out_file.read_text())
    assert sorted(captions) == ["img0.png", "sub/img1.png", "sub/img2.png"]
    assert all(isinstance(c, str) for c in captions.values())
    assert "sub/img1.png\t" in capsys.readouterr().out
    assert main(["predict", "caption-shapes", "--ckpt", str(tmp_path / "runs" / "cap"), "--images",
                 str(tmp_path / "none")]) == 2
