"""Image classification: a vision tower and a linear head over the data's classes.

The tower is any vision encoder (``model.vision``), or the image tower of a CLIP
(``model.clip``: a CLIP run, or a pretrained CLIP as ``model.pretrained`` names one) with its
projection; then the head may start as the zero-shot classifier (``head_init: zero_shot``:
each class's prompt embedding times the logit scale, on normalised image embeddings), as
WiSE-FT and FLYP fine-tune, so step 0 scores exactly the zero-shot accuracy.

Cross-entropy with label smoothing, timm's Mixup/CutMix (``mixup:``), layer-wise learning-rate
decay (``layer_decay``); top-1, top-5 and per-class accuracy and the confusion matrix. Where the
data holds its images in memory, the test also fits scikit-learn's SVM on the raw pixels of the
same training split, the classic reference, and reports it beside the model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmlightning.encoders.weights import freeze_tower, layer_groups
from mmlightning.errors import UserError
from mmlightning.metrics import TopKAccuracy
from mmlightning.metrics.linear_probe import raw_pixel_svm
from mmlightning.registry import LOSSES, TASKS, VISION_ENCODERS
from mmlightning.report_blocks import section, table
from mmlightning.tasks.base import DataSpec, TaskModule, most_probable_classes
from mmlightning.tasks.clip import load_clip

HEAD_INITS = ("random", "zero_shot")
MIXUP_OPTIONS = ("mixup_alpha", "cutmix_alpha", "cutmix_minmax", "prob", "switch_prob", "mode")


def class_names(datamodule: Any, task: str) -> tuple[list[str], list[str]]:
    """The data's class names and prompt templates (its ``zero_shot`` classes)."""
    spec = getattr(datamodule, "zero_shot", None)
    if spec is None:
        raise UserError(f"task {task} needs data with classes (class names and prompt templates); data module "
                        f"{type(datamodule).__name__} has none. Data modules that have them: digits, "
                        f"shapes_objects, image_folder, image_table.")
    return list(spec.classnames), list(spec.templates)


@TASKS.register("classify")
class ClassificationTask(TaskModule):
    """Image classification: any vision tower (or a CLIP's, head from its zero-shot classifier) and a linear head; top-1/5, per-class accuracy, confusion matrix."""

    epoch_line_metrics = ("top1", "top5")

    def __init__(self, loss: dict[str, Any], optimizer: dict[str, Any], scheduler: dict[str, Any] | None = None,
                 vision: dict[str, Any] | None = None, clip: str | None = None, head_init: str = "random",
                 freeze_vision: bool = False, unfrozen_vision_groups: int = 0, dropout: float = 0.0,
                 mixup: dict[str, Any] | None = None, layer_decay: float | None = None) -> None:
        super().__init__(optimizer, scheduler)
        if (vision is None or "name" not in vision) == (clip is None):
            raise UserError("model.vision or model.clip: give one: a vision tower (model.vision.name), or a CLIP "
                            "whose image tower to fine-tune (model.clip: a clip run, or open_clip:/hf: as "
                            "model.pretrained takes).")
        if head_init not in HEAD_INITS:
            raise UserError(f"model.head_init must be one of {', '.join(HEAD_INITS)}, got {head_init!r}.")
        if head_init == "zero_shot" and clip is None:
            raise UserError("model.head_init=zero_shot needs model.clip: the zero-shot classifier comes from a CLIP's "
                            "text tower.")
        if layer_decay is not None and not 0 < layer_decay <= 1:
            raise UserError(f"model.layer_decay must be in (0, 1] (each earlier layer group's lr is multiplied by it), "
                            f"got {layer_decay}.")
        unknown = sorted(set(mixup or {}) - set(MIXUP_OPTIONS))
        if unknown:
            raise UserError(f"model.mixup.{unknown[0]}: unknown option of timm's Mixup; valid: {', '.join(MIXUP_OPTIONS)}.")
        self.source = None  # the CLIP, until the zero-shot head has been read from it (bind_data)
        if clip is not None:
            source = load_clip(clip, "model.clip")
            self.vision, self.vision_proj = source.vision, source.vision_proj
            self.feature_dim, self.normalize = source.embed_dim, True
            self.source = [source] if head_init == "zero_shot" else None  # a list: not a submodule of this task
        else:
            self.vision = VISION_ENCODERS.build(vision, "model.vision")
            self.vision_proj = nn.Identity()
            self.feature_dim, self.normalize = self.vision.output_dim, False
        freeze_tower(self.vision, freeze_vision, unfrozen_vision_groups, "model.freeze_vision")
        self.head_init, self.dropout, self.layer_decay = head_init, nn.Dropout(dropout), layer_decay
        self.mixup_options = dict(mixup) if mixup else None
        self.mixup = None
        self.loss_fn = LOSSES.build(loss, "loss")
        self.head: nn.Linear | None = None
        self.classnames: list[str] = []
        self.accuracy = nn.ModuleDict()
        self.pixel_data: Any = None  # the data module, where it holds raw pixels (svm_reference)

    def data_spec(self) -> DataSpec:
        # no text in classification data; a tokenizer is still part of the contract
        return DataSpec(None, 0, self.vision.image_config)

    def bind_data(self, datamodule: Any) -> None:
        self.classnames, templates = class_names(datamodule, "classify")
        k = len(self.classnames)
        self.head = nn.Linear(self.feature_dim, k)
        if self.head_init == "zero_shot" and self.source:
            from mmlightning.data_modules.base import ZeroShotSpec

            clip = self.source[0]
            with torch.no_grad():
                weights = clip.zero_shot_classifier(ZeroShotSpec(self.classnames, templates))
                self.head.weight.copy_(weights * clip.temperature_scale())
                self.head.bias.zero_()
        self.source = None
        self.accuracy = nn.ModuleDict({s: TopKAccuracy(k, top_k=(1, min(5, k))) for s in ("val", "test")})
        if self.mixup_options is not None:
            from timm.data import Mixup

            # smoothing is the loss's (loss.label_smoothing), applied to the mixed targets
            self.mixup = Mixup(**self.mixup_options, label_smoothing=0.0, num_classes=k)
        self.pixel_data = datamodule if hasattr(datamodule, "raw_pixels") else None

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.vision_proj(self.vision(images).pooled)
        return F.normalize(x, dim=-1) if self.normalize else x

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """What the head reads, normalised (a CLIP's embedding; a tower's pooled output), for
        ``mml eval``'s linear probes."""
        return F.normalize(self.features(images).float(), dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise RuntimeError("ClassificationTask.bind_data(datamodule) must run before forward: it sizes the head")
        return self.head(self.dropout(self.features(images)))

    def mixed(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and soft targets: one-hot, or mixed by Mixup/CutMix (timm mixes pairs, so an
        odd batch's last image stays as it is)."""
        targets = F.one_hot(labels, len(self.classnames)).float()
        if self.mixup is None or len(images) < 2:
            return images, targets
        n = len(images) - len(images) % 2
        images, targets = images.clone(), targets.clone()
        images[:n], targets[:n] = self.mixup(images[:n], labels[:n])
        return images, targets

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, targets = self.mixed(batch["image"], batch["label"])
        loss = self.loss_fn(self(images), targets)
        self.log("train/loss", loss)
        return loss

    def parameter_groups(self) -> list[dict[str, Any]]:
        """As every task (no weight decay on gains and biases); with ``layer_decay``, each
        layer group of the tower (input first) at ``lr * layer_decay ** (groups after it)``
        and the projection and head at the full rate, as BEiT and timm fine-tune."""
        if self.layer_decay is None:
            return super().parameter_groups()
        lr = float(self.optimizer_spec.get("lr", 1e-3))
        groups = layer_groups(self.vision, "model.layer_decay")
        params = dict(self.vision.named_parameters())
        out: list[dict[str, Any]] = []

        def add(tensors: list[nn.Parameter], scale: float) -> None:
            live = [p for p in tensors if p.requires_grad]
            for decay in (True, False):
                chosen = [p for p in live if (p.ndim >= 2) == decay]
                if chosen:
                    out.append({"params": chosen, "lr": lr * scale, **({} if decay else {"weight_decay": 0.0})})

        for depth, names in enumerate(groups):
            add([params[n] for n in names], self.layer_decay ** (len(groups) - depth))
        add([*self.vision_proj.parameters(), *self.head.parameters()], 1.0)
        return out

    # ------------------------------------------------------------------ evaluation
    def evaluate_step(self, batch: dict[str, torch.Tensor], batch_idx: int, stage: str) -> None:
        self.accuracy[stage].update(self(batch["image"]), batch["label"], batch["sample_id"])

    def evaluate_epoch_end(self, stage: str) -> None:
        metric = self.accuracy[stage]
        metrics = {f"{stage}/{k}": v for k, v in metric.compute().items()}
        if stage == "test":
            self.confusion = metric.confusion().cpu()
            self.class_accuracy = metric.per_class()[1][:, 0].cpu()
            metrics.update({f"test/top1_class_{i}": float(a) for i, a in enumerate(self.class_accuracy)})
            self.log_confusion_matrix()
            reference = self.svm_reference()
            if reference is not None:
                metrics["test/svm_raw_pixels_top1"] = reference
        metric.reset()
        self.log_dict(metrics)

    def svm_reference(self) -> float | None:
        """scikit-learn's SVM (RBF kernel) on the raw pixels of this run's training split,
        scored on its test split: the classic reference on image data held in memory."""
        data = self.pixel_data
        train, test = (data.raw_pixels("train"), data.raw_pixels("test")) if data is not None else (None, None)
        if train is None or test is None:
            return None
        return raw_pixel_svm(*train, *test)

    def log_confusion_matrix(self) -> None:
        from lightning.pytorch.loggers import WandbLogger

        loggers = [lg for lg in self.loggers if isinstance(lg, WandbLogger)]
        if not loggers or not self.trainer.is_global_zero:
            return
        import wandb

        k = len(self.classnames)
        true = [t for t in range(k) for p in range(k) for _ in range(int(self.confusion[t, p]))]
        predicted = [p for t in range(k) for p in range(k) for _ in range(int(self.confusion[t, p]))]
        loggers[0].experiment.log({"test/confusion_matrix": wandb.plot.confusion_matrix(
            y_true=true, preds=predicted, class_names=self.classnames)})

    def summary_rows(self, test_metrics: dict[str, float]) -> tuple[list[str], list[list[str]]]:
        """Top-1 and top-5, and the SVM on raw pixels where it was measured."""
        names = {"top1": "top-1 accuracy", "top5": "top-5 accuracy",
                 "svm_raw_pixels_top1": "top-1, scikit-learn SVM on raw pixels (same split)"}
        rows = [[label, f"{test_metrics[f'test/{key}']:.4f}"] for key, label in names.items()
                if f"test/{key}" in test_metrics]
        return ["metric", "value"], rows

    def report_sections(self, test_metrics: dict[str, float]) -> list[dict[str, Any]]:
        m = test_metrics
        headline = {"top-1": m["top1"], "top-5": m.get("top5", float("nan"))}
        if "svm_raw_pixels_top1" in m:
            headline["SVM on raw pixels, top-1"] = m["svm_raw_pixels_top1"]
        per_class = [[name, m.get(f"top1_class_{i}", float("nan"))] for i, name in enumerate(self.classnames)]
        confusion = getattr(self, "confusion", None)
        tables = [table(["class", "top-1"], per_class)]
        if confusion is not None and len(self.classnames) <= 20:
            tables.append(table(["true \\ predicted", *self.classnames],
                                [[name, *map(int, confusion[i])] for i, name in enumerate(self.classnames)]))
        return [section("Classification (test split)", headline, tables)]

    def predict_images(self, images: torch.Tensor, datamodule: Any) -> list[str]:
        """The most probable class of each image, with its probability."""
        return most_probable_classes(self(images.to(self.device)), self.classnames)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["classnames"] = self.classnames

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("classnames")
        if saved is not None and saved != self.classnames:
            raise UserError(f"the checkpoint's classes ({len(saved)}, first {saved[:5]}) differ from this data's "
                            f"({len(self.classnames)}, first {self.classnames[:5]}): the head's rows would mean "
                            f"other classes. Use the data the checkpoint was trained on.")

