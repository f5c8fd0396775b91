"""Overrides that shrink each shipped recipe to seconds on a CPU, for tests. Tests run every
recipe with them; a new recipe needs an entry here (test_recipes checks that)."""

from __future__ import annotations

from pathlib import Path

SHAPES_CLIP = [
    "data.num_train=256", "data.num_val=48", "data.num_test=48", "data.batch_size=32", "data.eval_batch_size=32",
    "trainer.max_epochs=1", "trainer.log_every_n_steps=2", "scheduler.warmup_steps=2",
]


def coco_overrides(coco: Path, minilm: Path) -> list[str]:
    return [
        "model.vision.img_size=32", "model.vision.model_kwargs={depth: 1, embed_dim: 32, num_heads: 2}",
        f"model.text.name=hf:{minilm}", "model.text.pretrained=false",
        "model.text.config={num_hidden_layers: 1, hidden_size: 32, num_attention_heads: 2, intermediate_size: 64}",
        "model.embed_dim=16",
        f"data.train_json={coco}/annotations/captions_train2017.json", f"data.train_images={coco}/train2017",
        f"data.val_json={coco}/annotations/captions_val2017.json", f"data.val_images={coco}/val2017",
        "data.batch_size=16", "data.eval_batch_size=8", "data.num_workers=0",
        "trainer.max_epochs=1", "trainer.log_every_n_steps=2", "scheduler.warmup_steps=2",
    ]


def tiny_overrides(recipe: str, coco: Path, minilm: Path) -> list[str]:
    table = {
        "clip-shapes": SHAPES_CLIP,
        "clip-coco": coco_overrides(coco, minilm),
    }
    return table[recipe]
