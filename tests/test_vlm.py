"""The generative vision-language task (LLaVA-style): conversations to labels, generation,
what trains in each stage, LoRA adapters through peft, LLaVA's JSON format, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import SHAPES_VLM, TINY_QWEN2, templated_overrides

from mmlightning.build import build_datamodule, build_task
from mmlightning.cli import main
from mmlightning.config import load_recipe, resolve
from mmlightning.encoders.chat import IGNORE_INDEX, IMAGE_PLACEHOLDER
from mmlightning.errors import UserError
from mmlightning.tasks.base import read_run_checkpoint

# Qwen2's ChatML layout, set on a real WordPiece tokenizer: a tokenizer with a template of its own
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_task(*overrides: str):
    cfg = resolve(load_recipe("vlm-shapes", [*SHAPES_VLM, *overrides]))
    return cfg, build_task(cfg)


@pytest.fixture(scope="module")
def chatml_tokenizer(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.eos_token, tok.chat_template = "<|im_end|>", CHATML
    folder = tmp_path_factory.mktemp("chatml-tokenizer")
    tok.save_pretrained(folder)
    return folder


def qwen2_overrides(tokenizer: Path) -> list[str]:
    return [f"model.lm={{name: 'hf:qwen2', tokenizer: '{tokenizer}', config: {TINY_QWEN2}}}"]


def conversation() -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\nwhat colour is the circle"},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "what shape is the red object"},
            {"role": "assistant", "content": "circle"}]


@pytest.mark.parametrize("template", ["default", "tokenizer's own (ChatML)"])
def test_labels_are_the_assistant_tokens_only(template: str, chatml_tokenizer: Path) -> None:
    _, task = tiny_task(*([] if template == "default" else qwen2_overrides(chatml_tokenizer)))
    chat, tok = task.chat, task.lm.tokenizer
    ids, labels = chat.encode(conversation(), "test")
    image = [k for k, t in enumerate(ids) if t == chat.image_token_id]
    assert len(image) == chat.image_tokens == 64 and image == list(range(image[0], image[0] + 64))
    assert all(labels[k] == IGNORE_INDEX for k in image)
    answered = [k for k, lab in enumerate(labels) if lab != IGNORE_INDEX]
    assert all(labels[k] == ids[k] for k in answered)
    # the labelled tokens are the two answers, each with its end-of-turn token, and nothing else
    assert tok.convert_ids_to_tokens([ids[k] for k in answered]) == ["red", tok.eos_token, "circle", tok.eos_token]
    prompt = tok.decode([t for k, t in enumerate(ids) if k < answered[0] and t != chat.image_token_id])
    assert "what colour is the circle" in prompt and "red" not in prompt
    # the generation prompt is the conversation's text up to where the first answer starts
    first = chat.encode_prompt(conversation()[:1], "test")
    assert first == ids[:answered[0]]


def test_truncation_cuts_the_answer_never_the_image() -> None:
    _, task = tiny_task("model.max_length=70")
    ids, labels = task.chat.encode(conversation(), "record 3")
    assert len(ids) == 70 and ids.count(task.chat.image_token_id) == 64
    _, task = tiny_task("model.max_length=60")
    with pytest.raises(UserError, match=r"record 3: the image's 64 tokens end at position 66, past max_length 60"):
        task.chat.encode(conversation(), "record 3")


@pytest.mark.parametrize("lm", ["llama", "qwen2"])
def test_left_padded_batch_generates_as_one_prompt_at_a_time(lm: str, chatml_tokenizer: Path) -> None:
    torch.manual_seed(0)
    _, task = tiny_task(*([] if lm == "llama" else qwen2_overrides(chatml_tokenizer)))
    task.eval()
    questions = ["what colour is the circle", "is there a cross", "what colour is the object left of the large square"]
    images = torch.randn(3, 3, 64, 64)
    batch = task.prompts(questions)
    assert (batch["attention_mask"][:, 0] == 0).any() and (batch["attention_mask"][:, -1] == 1).all()  # left-padded
    together = task.answer(images, **batch, max_new_tokens=6, min_new_tokens=6)
    alone = [task.answer(images[k:k + 1], **task.prompts([q]), max_new_tokens=6, min_new_tokens=6)[0]
             for k, q in enumerate(questions)]
    assert together == alone and all(len(a.split()) >= 3 for a in together)


def run_state(run: Path) -> dict[str, torch.Tensor]:
    return read_run_checkpoint(run / "checkpoints" / "last.ckpt", "test")[2]


def test_stages_train_what_they_say(tmp_path: Path) -> None:
    """A full run, then stage 1 from it (the projector alone changes), then stage 2 with LoRA
    (the projector and the adapters change; every base LM weight stays bit-identical)."""
    steps = ["trainer.max_steps=3", "trainer.limit_val_batches=1", "logger.name=none"]
    assert main(["fit", "vlm-shapes", *SHAPES_VLM, *steps, "run.name=full"]) == 0
    assert main(["fit", "vlm-shapes", *SHAPES_VLM, *steps, "run.name=stage1", "model.freeze_lm=true",
                 f"model.init_from={tmp_path / 'runs' / 'full'}"]) == 0
    assert main(["fit", "vlm-shapes", *SHAPES_VLM, *steps, "run.name=stage2", "optimizer.lr=0.01",
                 "model.lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj]}",
                 f"model.init_from={tmp_path / 'runs' / 'stage1'}"]) == 0
    full, stage1, stage2 = (run_state(tmp_path / "runs" / name) for name in ("full", "stage1", "stage2"))
    changed = {k for k in full if not torch.equal(full[k], stage1[k])}
    assert changed and all(k.startswith("projector.") for k in changed), changed
    base = {k.replace("lm.model.base_model.model.", "lm.model.").replace(".base_layer.", "."): v
            for k, v in stage2.items() if "lora_" not in k}
    assert set(base) == set(stage1)
    assert all(torch.equal(base[k], stage1[k]) for k in base if not k.startswith("projector.")), \
        [k for k in base if not k.startswith("projector.") and not torch.equal(base[k], stage1[k])]
    assert any(not torch.equal(base[k], stage1[k]) for k in base if k.startswith("projector."))
    lora_b = [v for k, v in stage2.items() if "lora_B" in k]
    assert len(lora_b) == 2 * 1 and all(v.abs().sum() > 0 for v in lora_b)  # q and v of the one layer; B starts at 0


def test_adapter_reloads_and_merges_to_the_same_logits(tmp_path: Path) -> None:
    from peft import PeftModel

    torch.manual_seed(0)
    _, task = tiny_task("model.lora={r: 4, target_modules: [q_proj, v_proj]}")
    with torch.no_grad():  # B starts at zero: give the adapter something to carry
        for name, p in task.lm.model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    task.eval()
    images, batch = torch.randn(2, 3, 64, 64), task.prompts(["what colour is the circle", "is there a cross"])
    logits = task(images, batch["input_ids"], batch["attention_mask"])
    folder = task.save_adapter(tmp_path / "adapter")
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()

    torch.manual_seed(1)  # another projector and other adapters, the same base LM
    _, again = tiny_task("model.lora={r: 4, target_modules: [q_proj, v_proj]}")
    again.vision.load_state_dict(task.vision.state_dict())
    again.lm.model.base_model.model.load_state_dict(
        {k: v for k, v in task.lm.model.base_model.model.state_dict().items() if "lora_" not in k}, strict=False)
    again.eval()
    assert not torch.allclose(again(images, batch["input_ids"], batch["attention_mask"]), logits)
    again.load_adapter(folder)
    torch.testing.assert_close(again(images, batch["input_ids"], batch["attention_mask"]), logits, rtol=0, atol=0)

    # peft's own loader puts the folder's adapter on the plain base model: the same logits
    import copy

    embeds, mask = task.embed(images, batch["input_ids"]), batch["attention_mask"]
    base = copy.deepcopy(task.lm.model).unload()  # the adapters taken out, nothing merged
    assert not torch.allclose(base(inputs_embeds=embeds, attention_mask=mask).logits, logits)
    reloaded = PeftModel.from_pretrained(base, str(folder)).eval()
    torch.testing.assert_close(reloaded(inputs_embeds=embeds, attention_mask=mask).logits, logits, rtol=0, atol=0)
    # merged for export: the LoRA updates folded into the weights give the same logits
    merged = task.lm.merged()
    assert not any("lora_" in k for k in merged.state_dict())
    torch.testing.assert_close(merged(inputs_embeds=embeds, attention_mask=mask).logits, logits, rtol=0, atol=1e-5)


def write_llava(root: Path, n_train: int = 24, n_eval: int = 8) -> dict[str, Path]:
    """Shapes scenes as PNG files and LLaVA-format JSON: multi-turn training records, and
    evaluation records that are VQA (with human answers) or captions."""
    from PIL import Image

    from mmlightning.data_modules import shapes_world as world

    (root / "images").mkdir(parents=True)
    files = {}
    for split, n in (("train", n_train), ("val", n_eval), ("test", n_eval)):
        scenes = world.generate(split, n, seed=5, image_size=64, with_questions=True)
        records = []
        for i in range(n):
            name = f"{split}_{i:03d}.png"
            Image.fromarray(scenes.images[i]).save(root / "images" / name)
            q = scenes.questions[i][0]
            if split == "train":
                turns = [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{q.question}"}, {"from": "gpt", "value": q.answer},
                         {"from": "human", "value": "what objects are there"}, {"from": "gpt", "value": scenes.captions[i][0]}]
                records.append({"id": f"{split}-{i}", "image": name, "conversations": turns})
            else:
                records.append({"id": f"{split}-{i}-q", "image": name, "answers": [q.answer] * 10,
                                "question_type": q.family,
                                "conversations": [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{q.question}"},
                                                  {"from": "gpt", "value": q.answer}]})
                records.append({"id": f"{split}-{i}-c", "image": name, "references": scenes.captions[i],
                                "conversations": [{"from": "human", "value": f"what objects are there\n{IMAGE_PLACEHOLDER}"},
                                                  {"from": "gpt", "value": scenes.captions[i][0]}]})
        files[split] = root / f"{split}.json"
        files[split].write_text(json.dumps(records))
    return files


def llava_overrides(files: dict[str, Path], root: Path) -> list[str]:
    return ["data={name: llava_json, batch_size: 8, eval_batch_size: 8}", f"data.train_json={files['train']}",
            f"data.val_json={files['val']}", f"data.test_json={files['test']}", f"data.image_root={root / 'images'}"]


def test_llava_json_trains_and_scores_vqa_and_captions(tmp_path: Path) -> None:
    files = write_llava(tmp_path / "llava")
    assert main(["fit", "vlm-shapes", *SHAPES_VLM, *llava_overrides(files, tmp_path / "llava"), "run.name=llava",
                 "logger.name=none"]) == 0
    summary = json.loads((tmp_path / "runs" / "llava" / "summary.json").read_text())
    test = summary["test"]
    assert summary["global_step"] == 3  # 24 records, batches of 8, the last kept
    for key in ("test/acc", "test/blind_acc", "test/zeroed_image_acc", "test/CIDEr-D", "test/BLEU-4"):
        assert key in test, sorted(test)
    assert any(k.startswith("test/acc_") for k in test)  # per question type


@pytest.mark.parametrize("content, what", [("what colour is the circle", "missing"),
                                           (f"{IMAGE_PLACEHOLDER} what colour {IMAGE_PLACEHOLDER}", r"repeated \(2 times\)")])
def test_a_record_without_its_image_or_with_two_fails_naming_it(tmp_path: Path, content: str, what: str) -> None:
    files = write_llava(tmp_path / "llava")
    records = json.loads(files["train"].read_text())
    records[5]["conversations"][0]["value"] = content
    files["train"].write_text(json.dumps(records))
    cfg = resolve(load_recipe("vlm-shapes", [*SHAPES_VLM, *llava_overrides(files, tmp_path / "llava")]))
    dm = build_datamodule(cfg, build_task(cfg))
    with pytest.raises(UserError, match=rf"train.json: record 5 \(id 'train-5'\): the image placeholder <image> is {what}"):
        dm.setup("fit")


@pytest.mark.parametrize("override, message", [
    ("model.lora={r: 4, target_modules: [q_prj]}", r"model.lora.target_modules: \['q_prj'\] name no layer of "
                                                    r"LlamaForCausalLM; its linear layers: .*q_proj"),
    ("model.lora={r: 4, rank: 8}", r"model.lora.rank: unknown LoRA option"),
    ("model.lr_scale={visoin: 0.1}", r"model.lr_scale.visoin: not a part of this model. Did you mean 'vision'"),
    ("model.freeze_lm=true|model.lora={r: 4}", r"model.lora with model.freeze_lm=true"),
    ("model.max_length=1024", r"model.max_length=1024 exceeds the language model's 256 positions"),
    ("model.lm={name: 'hf:llama', tokenizer: shapes, chat_template: chatml}", r"model.lm.chat_template: 'chatml'; "
                                                                            r"valid: null .* or 'default'"),
    ("model.vision={name: 'timm:vit_tiny_patch16_224', img_size: 32, model_kwargs: {depth: 1, embed_dim: 32, "
     "num_heads: 2}}|model.image_coordinates=true", r"model.image_coordinates: the vision tower gives 5 tokens, not a "
                                                    r"square grid"),
])
def test_bad_model_settings_name_the_key(override: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        tiny_task(*override.split("|"))


def test_data_without_conversations_names_the_data_modules_that_fit() -> None:
    from mmlightning.data_modules.shapes import ShapesCaptionData

    _, task = tiny_task()
    data = ShapesCaptionData(**task.data_spec().as_kwargs(), num_train=8)
    with pytest.raises(UserError, match="task vlm needs conversation data .* shapes_vlm, templated_conversations, llava_json"):
        task.bind_data(data)


def test_export_folder_loads_in_transformers_and_peft(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmlightning.export import load_task

    lora = "model.lora={r: 4, target_modules: [q_proj, v_proj]}"
    assert main(["fit", "vlm-shapes", *SHAPES_VLM, lora, "optimizer.lr=0.01", "trainer.max_steps=3",
                 "trainer.limit_val_batches=1", "logger.name=none", "run.name=lora"]) == 0
    run = tmp_path / "runs" / "lora"
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "out")]) == 0
    task, _ = load_task(run)
    images, batch = torch.randn(2, 3, 64, 64), task.prompts(["what colour is the circle", "is there a cross"])
    with torch.no_grad():
        embeds, mask = task.embed(images, batch["input_ids"]), batch["attention_mask"]
        logits = task(images, batch["input_ids"], mask)
        lm = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "lm").eval()
        torch.testing.assert_close(lm(inputs_embeds=embeds, attention_mask=mask).logits, logits, rtol=0, atol=1e-5)
        import copy

        base = copy.deepcopy(task.lm.model).unload()
        adapted = PeftModel.from_pretrained(base, str(tmp_path / "out" / "adapter")).eval()
        torch.testing.assert_close(adapted(inputs_embeds=embeds, attention_mask=mask).logits, logits, rtol=0, atol=0)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out" / "lm")
    info = json.loads((tmp_path / "out" / "mmlightning_vlm.json").read_text())
    assert tok.convert_tokens_to_ids(info["image_token"]) == info["image_token_id"] and info["image_tokens"] == 64
    assert tok.apply_chat_template([{"role": "user", "content": "<image>\nis there a cross"}], tokenize=False,
                                   add_generation_prompt=True).endswith("<|assistant|>")
    # mml predict asks each image the question
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.fromarray((torch.rand(64, 64, 3) * 255).byte().numpy()).save(tmp_path / "imgs" / "a.png")
    assert main(["predict", str(run), "--images", str(tmp_path / "imgs"), "--question", "is there a cross",
                 "--out", str(tmp_path / "answers.json")]) == 0
    assert isinstance(json.loads((tmp_path / "answers.json").read_text())["a.png"], str)


@pytest.mark.slow
def test_the_answers_read_the_image(tmp_path: Path) -> None:
    """Trained a little on one-object scenes, the model answers far above the blind baseline,
    and with its image tokens zeroed it falls back to about that baseline."""
    assert main(["fit", "vlm-shapes", *SHAPES_VLM, "data.max_objects=1", "data.num_train=1200", "data.num_test=64",
                 "data.relational_questions=0", "data.batch_size=16", "model.freeze_vision=false", "optimizer.lr=3e-3",
                 "model.lm.width=64", "model.lm.mlp_width=128", "trainer.max_epochs=4",
                 "trainer.limit_val_batches=1", "trainer.precision=32-true",
                 # the settings this small run was calibrated with: with the recipe's image
                 # coordinates and lr floor, its image-zeroed accuracy fell to 0.21 against a blind 0.42
                 "model.image_coordinates=false", "scheduler.min_lr_ratio=0.0",
                 "logger.name=none", "run.name=read"]) == 0
    test = json.loads((tmp_path / "runs" / "read" / "summary.json").read_text())["test"]
    assert test["test/acc"] > test["test/blind_acc"] + 0.1, test
    assert abs(test["test/zeroed_image_acc"] - test["test/blind_acc"]) < 0.15, test


def test_packed_conversations_get_the_logits_they_get_alone() -> None:
    from mmlightning.encoders.chat import block_attention

    torch.manual_seed(0)
    _, task = tiny_task()
    task.eval()
    qa = [("what colour is the circle", "red"), ("is there a cross", "no"),
          ("what objects are there", "a small red circle left of a large blue square")]
    conversations = [[{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{q}"}, {"role": "assistant", "content": a}]
                     for q, a in qa]
    ids, labels, positions, segments = task.chat.pack(conversations, "test")
    assert ids.count(task.chat.image_token_id) == 64 and segments.count(0) == 66  # BOS, <|user|>, the image
    image = torch.randn(1, 3, 64, 64)
    batch = task.chat.collate([ids, ids[:80]], [labels, labels[:80]], positions=[positions, positions[:80]],
                              segments=[segments, segments[:80]])  # a second, shorter row: padding
    embeds = task.embed(image.repeat(2, 1, 1, 1), batch["input_ids"])
    packed = task.lm(embeds, block_attention(batch["segments"], embeds.dtype), batch["position_ids"])[0]
    for k, messages in enumerate(conversations, start=1):
        alone_ids, alone_labels = task.chat.encode(messages, "test")
        alone = task(image, torch.tensor([alone_ids]), torch.ones(1, len(alone_ids), dtype=torch.long))[0]
        block = [t for t, s in enumerate(segments) if s == k]
        assert [ids[t] for t in block] == alone_ids[66:] and [labels[t] for t in block] == alone_labels[66:]
        torch.testing.assert_close(packed[block], alone[66:], rtol=0, atol=1e-5)
    torch.testing.assert_close(packed[:66], alone[:66], rtol=0, atol=1e-5)  # the shared start, as each saw it


def test_mirror_right_asks_right_turns_as_left_about_the_mirrored_image() -> None:
    """shapes_vlm's data.mirror_right: in an epoch, that fraction of the turns saying "right"
    come as "left" in a second sequence about the mirrored image, the rest of the pack as it
    was; an epoch whose fraction is 0 is the data without it. Read through the real training
    loader against the same data unmirrored."""
    data = {}
    for name, fraction in (("plain", [0.0]), ("tilted", [0.8, 0.0])):
        cfg, task = tiny_task(f"data.mirror_right={fraction}", "data.pack_per_image=12", "data.num_train=120",
                              "data.relational_questions=3", "data.batch_size=20")
        data[name] = build_datamodule(cfg, task)
        data[name].setup("fit")
    plain = data["plain"].datasets["train"]

    def blocks(batch: dict, row: int) -> list[str]:
        segments = batch["segments"][row]
        return [task.chat.tokenizer.decode(batch["input_ids"][row][segments == k], skip_special_tokens=True)
                for k in range(1, int(segments.max()) + 1)]

    loader = data["tilted"].train_dataloader()
    for epoch, fraction in enumerate([0.8, 0.0]):
        loader.sampler.set_epoch(epoch)
        says_right = mirrored = 0
        for batch in loader:
            for item in batch["sample_id"].unique().tolist():
                rows = (batch["sample_id"] == item).nonzero().squeeze(1).tolist()
                alone = plain.__getitems__([item])
                expected, image = blocks(alone, 0), alone["image"][0]
                says_right += sum("right" in b.split() for b in expected)
                torch.testing.assert_close(batch["image"][rows[0]], image, rtol=0, atol=0)
                got = blocks(batch, rows[0])
                if len(rows) == 2:  # the turns asked about the mirrored image
                    torch.testing.assert_close(batch["image"][rows[1]], image.flip(-1), rtol=0, atol=0)
                    flipped = blocks(batch, rows[1])
                    assert all("left" in b.split() and "right" not in b.split() for b in flipped), flipped
                    mirrored += len(flipped)
                    got += [b.replace("left", "right") for b in flipped]
                assert sorted(got) == sorted(expected)
        assert says_right > 100
        assert (0.65 < mirrored / says_right < 0.95) if fraction else mirrored == 0


def test_vqav2_and_coco_captions_become_conversations_by_template(vqav2_fixture: Path, karpathy_fixture: Path,
                                                                   chatml_tokenizer: Path, tmp_path: Path) -> None:
    """One model trains on VQAv2's and Karpathy-COCO's own files through data.templates: every
    question and caption one conversation, VQA scored against the ten raw human answers per
    answer type, captions against all of the image's captions."""
    overrides = [*SHAPES_VLM, *qwen2_overrides(chatml_tokenizer), *templated_overrides(vqav2_fixture, karpathy_fixture)]
    cfg, task = tiny_task(*overrides[len(SHAPES_VLM):], "data.templates={vqa: 'Q: {question} short answer:'}")
    data = build_datamodule(cfg, task)
    data.setup("fit")
    annotations = json.loads((vqav2_fixture / "v2_mscoco_val2014_annotations.json").read_text())["annotations"]
    questions = json.loads((vqav2_fixture / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())["questions"]
    karpathy = json.loads((karpathy_fixture / "dataset_coco.json").read_text())["images"]
    train_captions = sum(len(i["sentences"]) for i in karpathy if i["split"] in ("train", "restval"))
    train_questions = len(json.loads((vqav2_fixture / "v2_mscoco_train2014_annotations.json").read_text())["annotations"])
    assert len(data.datasets["train"]) == train_questions + train_captions
    val = data.datasets["val"]
    assert val.kind == ["vqa"] * len(annotations) + ["caption"] * sum(i["split"] == "val" for i in karpathy)
    by_id = {q["question_id"]: q["question"] for q in questions}
    for k, ann in enumerate(annotations):
        assert val.prompt[k] == f"Q: {by_id[ann['question_id']]} short answer:"
        assert val.references[k] == [a["answer"] for a in ann["answers"]]  # raw: the metric normalises them
        assert data.question_types[val.question_type[k]] == ann["answer_type"]
    captions = [[s["raw"].strip() for s in i["sentences"]] for i in karpathy if i["split"] == "val"]
    assert val.references[len(annotations):] == captions
    assert val.prompt[-1] == "Describe the image briefly."

    assert main(["fit", "vlm-shapes", *overrides, "run.name=templated", "logger.name=none"]) == 0
    test = json.loads((tmp_path / "runs" / "templated" / "summary.json").read_text())["test"]
    for key in ("test/acc", "test/acc_yes/no", "test/blind_acc", "test/CIDEr-D"):
        assert key in test, sorted(test)


def test_templated_data_needs_a_source_and_names_a_missing_file(vqav2_fixture: Path, karpathy_fixture: Path) -> None:
    with pytest.raises(UserError, match="needs data.vqav2 .* or data.coco_karpathy"):
        build_datamodule(*tiny_task("data={name: templated_conversations}"))
    overrides = templated_overrides(vqav2_fixture, karpathy_fixture)
    overrides[1] = overrides[1].replace("v2_mscoco_val2014_annotations.json", "nothing.json")
    with pytest.raises(UserError, match="data.vqav2.val_annotations: .*nothing.json' does not exist"):
        build_datamodule(*tiny_task(*overrides))


def test_image_coordinates_tell_the_lm_where_each_token_is() -> None:
    """model.image_coordinates: token k of the 8x8 grid (row-major, as the tower flattens it)
    reaches the projector with its features and its cell's (x, y) in [-1, 1]."""
    torch.manual_seed(0)
    _, task = tiny_task("model.image_coordinates=true")
    task.eval()
    image = torch.randn(1, 3, 64, 64)
    ids = torch.tensor([task.chat.encode_prompt([{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\nhi"}], "t")])
    k = torch.arange(64)
    xy = torch.stack([-1 + 2 * (k % 8) / 7, -1 + 2 * (k // 8) / 7], dim=1)
    with torch.no_grad():
        got = task.embed(image, ids)[0][ids[0] == task.chat.image_token_id]
        expected = task.projector(torch.cat([task.vision(image).tokens[0], xy], dim=1))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
