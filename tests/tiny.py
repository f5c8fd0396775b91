"""Overrides that shrink each shipped recipe to seconds on a CPU, for tests. Tests run every
recipe with them; a new recipe needs an entry here (test_recipes checks that).

``fx`` maps fixture names to paths: coco, karpathy and vqav2 datasets in their official
layouts, minilm (a real BERT-style model directory), open_clip and hf_clip (tiny pretrained-format
CLIPs)."""

from __future__ import annotations

from pathlib import Path

SHAPES_CLIP = [
    "data.num_train=256", "data.num_val=48", "data.num_test=48", "data.batch_size=32", "data.eval_batch_size=32",
    "trainer.max_epochs=1", "trainer.log_every_n_steps=2", "scheduler.warmup_steps=2",
]
# classification data (digits, shapes objects): the test split stays whole-sized where it is fixed
CLASSIFY = ["data.batch_size=32", "data.eval_batch_size=64", "trainer.max_epochs=1", "trainer.log_every_n_steps=2",
            "scheduler.warmup_steps=2", "trainer.limit_train_batches=3"]
# one-object scenes: fewer than the recipes' thousands (each build renders them), 10 per class on average
SHAPES_OBJECTS = [*CLASSIFY, "data.num_train=480", "data.num_val=48", "data.num_test=96"]
SHAPES_VQA = [*SHAPES_CLIP, "data.num_train=96"]  # about 5 questions per image
SHAPES_CAPTION = [*SHAPES_CLIP, "data.num_train=128", "model.generation.max_new_tokens=8", "model.generation.num_beams=2"]
SHAPES_VLM = [*SHAPES_CLIP, "data.num_train=48", "data.num_val=16", "data.num_test=16", "data.batch_size=8", "data.eval_batch_size=64",
              "model.generation.max_new_tokens=6", "model.lm.width=32", "model.lm.mlp_width=64", "model.lm.layers=1"]
TINY_STEPS = ["trainer.max_epochs=1", "trainer.log_every_n_steps=2", "scheduler.warmup_steps=2", "data.num_workers=0"]
SHAPES_VIDEO = [*SHAPES_CLIP, "model.text.vocab=shapes_video", "model.temporal.layers=1", "data.num_train=48",
                "data.num_val=16", "data.num_test=16", "data.batch_size=8", "data.eval_batch_size=16", *TINY_STEPS]


def tiny_vit() -> list[str]:
    return ["model.vision.img_size=32", "model.vision.model_kwargs={depth: 1, embed_dim: 32, num_heads: 2}"]


def tiny_bert(minilm: Path) -> list[str]:
    return [f"model.text.name=hf:{minilm}", "model.text.pretrained=false",
            "model.text.config={num_hidden_layers: 1, hidden_size: 32, num_attention_heads: 2, intermediate_size: 64}"]


def coco_data(coco: Path) -> list[str]:
    return [
        f"data.train_json={coco}/annotations/captions_train2017.json", f"data.train_images={coco}/train2017",
        f"data.val_json={coco}/annotations/captions_val2017.json", f"data.val_images={coco}/val2017",
        "data.batch_size=16", "data.eval_batch_size=8", *TINY_STEPS,
    ]


def coco_overrides(coco: Path, minilm: Path) -> list[str]:
    return [*tiny_vit(), *tiny_bert(minilm), "model.embed_dim=16", *coco_data(coco)]


def vqav2_overrides(vqav2: Path, minilm: Path) -> list[str]:
    return [
        *tiny_vit(), *tiny_bert(minilm), "model.fusion={name: single_stream, width: 32, layers: 1, heads: 2, hidden_dim: 32}",
        "model.classifier_hidden=32", "data.num_answers=50",
        f"data.train_questions={vqav2}/v2_OpenEnded_mscoco_train2014_questions.json",
        f"data.train_annotations={vqav2}/v2_mscoco_train2014_annotations.json", f"data.train_images={vqav2}/train2014",
        f"data.val_questions={vqav2}/v2_OpenEnded_mscoco_val2014_questions.json",
        f"data.val_annotations={vqav2}/v2_mscoco_val2014_annotations.json", f"data.val_images={vqav2}/val2014",
        "data.batch_size=16", "data.eval_batch_size=16", *TINY_STEPS,
    ]


def karpathy_overrides(karpathy: Path, minilm: Path) -> list[str]:
    return [
        *tiny_vit(), "model.decoder.config={n_layer: 1, n_embd: 32, n_head: 2}",
        f"model.decoder.tokenizer={minilm}",  # a real WordPiece vocabulary, offline
        "model.generation.max_new_tokens=6", "model.generation.num_beams=2",
        f"data.json_path={karpathy}/dataset_coco.json", f"data.image_root={karpathy}",
        "data.batch_size=16", "data.eval_batch_size=8", *TINY_STEPS,
    ]


def templated_overrides(vqav2: Path, karpathy: Path) -> list[str]:
    """templated_conversations over the VQAv2 and Karpathy fixtures (their own file layouts)."""
    files = {f"{split}_{kind}": f"{vqav2}/{name}" for split, subtype in (("train", "train2014"), ("val", "val2014"))
             for kind, name in (("questions", f"v2_OpenEnded_mscoco_{subtype}_questions.json"),
                                ("annotations", f"v2_mscoco_{subtype}_annotations.json"), ("images", subtype))}
    vqa = ", ".join(f"{k}: '{v}'" for k, v in files.items())
    return ["data={name: templated_conversations, batch_size: 8, eval_batch_size: 8}", f"data.vqav2={{{vqa}}}",
            f"data.coco_karpathy={{json_path: '{karpathy}/dataset_coco.json', image_root: '{karpathy}'}}"]


TINY_QWEN2 = "{num_hidden_layers: 1, hidden_size: 32, num_attention_heads: 2, num_key_value_heads: 1, " \
             "intermediate_size: 64, max_position_embeddings: 256}"


def llava_overrides(fx: dict[str, Path]) -> list[str]:
    """llava-coco's layout in miniature: a tiny HF CLIP's penultimate patch tokens, a tiny Qwen2."""
    return [f"model.vision.name=hf_clip_vision:{fx['hf_clip']}", f"model.lm={{name: 'hf:qwen2', tokenizer: "
            f"'{fx['minilm']}', config: {TINY_QWEN2}}}", "model.max_length=128", "model.generation.max_new_tokens=6",
            *templated_overrides(fx["vqav2"], fx["karpathy"]), *TINY_STEPS, "trainer.limit_val_batches=null"]


def shards_overrides(shards: Path, minilm: Path) -> list[str]:
    return [
        *tiny_vit(), *tiny_bert(minilm), "model.embed_dim=16", f"data.train_shards={shards}/train",
        f"data.val_shards={shards}/val", f"data.test_shards={shards}/val/val-{{0000..0000}}.tar",
        "data.batch_size=8", "data.eval_batch_size=8", "data.shuffle_buffer=16", *TINY_STEPS,
    ]


def tiny_overrides(recipe: str, fx: dict[str, Path]) -> list[str]:
    table = {
        "clip-shapes": lambda: SHAPES_CLIP,
        "clip-coco": lambda: coco_overrides(fx["coco"], fx["minilm"]),
        "clip-wds": lambda: shards_overrides(fx["shards"], fx["minilm"]),
        "vqa-shapes": lambda: SHAPES_VQA,
        "vqa-shapes-fusion": lambda: SHAPES_VQA,
        "itm-mlm-coco": lambda: [*coco_overrides(fx["coco"], fx["minilm"]), "model.fusion={name: single_stream, "
                                 "width: 32, layers: 1, heads: 2, hidden_dim: 32}", "data.batch_size=8"],
        "itm-mlm-shapes": lambda: [*SHAPES_CLIP, "model.fusion={name: single_stream, width: 32, layers: 1, heads: 2, "
                                                 "hidden_dim: 32}"],
        "vqa-vqav2": lambda: vqav2_overrides(fx["vqav2"], fx["minilm"]),
        "caption-shapes": lambda: SHAPES_CAPTION,
        "vlm-shapes": lambda: SHAPES_VLM,
        "video-clip-shapes": lambda: SHAPES_VIDEO,
        "llava-coco": lambda: llava_overrides(fx),
        "llava-coco-lora": lambda: [*llava_overrides(fx), "model.lora.r=4", "model.lora.alpha=8"],
        "caption-coco": lambda: karpathy_overrides(fx["karpathy"], fx["minilm"]),
        "lit-shapes-pretrained": lambda: [*SHAPES_CLIP, "model.vision.img_size=32"],  # the real packaged weights
        # tiny pretrained-format models, as open_clip and transformers save them (tests/clip_sources.py)
        "clip-finetune-shapes": lambda: [*SHAPES_CLIP, f"model.pretrained=open_clip:local-dir:{fx['open_clip']}"],
        "clip-finetune-coco": lambda: [f"model.pretrained=hf:{fx['hf_clip']}", *coco_data(fx["coco"])],
        "classify-digits": lambda: [*CLASSIFY, "model.vision.img_size=32"],  # the real packaged weights
        "classify-shapes": lambda: [*SHAPES_OBJECTS, f"model.clip={fx['clip_ckpt']}"],
        "coop-digits": lambda: [*CLASSIFY, f"model.clip={fx['clip_ckpt']}", "data.shots=4", "data.train_repeats=1"],
        "coop-shapes": lambda: [*SHAPES_OBJECTS, f"model.clip={fx['clip_ckpt']}", "data.shots=2", "data.train_repeats=1"],
    }
    return table[recipe]()


# what each task (or recipe, where it differs from its task's) logs, and the test metric a summary must carry
LOGGED = {
    "video-clip-shapes": ({"train/loss", "val/mean_recall", "test/v2t_R@1", "test/t2v_MdR"}, "test/v2t_R@1"),
    "clip": ({"train/loss", "val/mean_recall", "test/i2t_R@1"}, "test/i2t_R@1"),
    "vqa": ({"train/loss", "val/acc", "test/acc", "test/blind_acc"}, "test/acc"),
    "fusion_pretrain": ({"train/loss", "train/itm_loss", "train/mlm_loss", "val/itm_acc", "test/mlm_acc_no_image"},
                        "test/itm_acc"),
    "caption": ({"train/loss", "val/CIDEr-D", "test/BLEU-4", "test/exact_match"}, "test/CIDEr-D"),
    "vlm": ({"train/loss", "val/acc", "val/CIDEr-D", "test/blind_acc", "test/zeroed_image_acc"},
            "test/acc"),
    "classify": ({"train/loss", "val/top1", "test/top1", "test/top5"}, "test/top1"),
    "prompt_learning": ({"train/loss", "val/top1", "test/top1"}, "test/top1"),
}
