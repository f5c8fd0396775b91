"""CLIP-style contrastive pretraining: two towers, two projections, one contrastive loss.

Evaluation embeds the whole split once and reports image<->text recall@K and zero-shot
classification from the data module's class prompts.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmlightning.data_modules.base import TaskData, ZeroShotSpec
from mmlightning.encoders.tokenizers import tokenize
from mmlightning.encoders.weights import freeze_tower
from mmlightning.errors import UserError
from mmlightning.metrics import RetrievalRecall, TopKAccuracy
from mmlightning.registry import LOSSES, PRETRAINED_CLIPS, PROJECTIONS, TASKS, TEMPORAL_AGGREGATORS, TEXT_ENCODERS, VISION_ENCODERS
from mmlightning.report_blocks import section, table
from mmlightning.tasks.base import DataSpec, TaskModule, most_probable_classes, read_run_checkpoint

MAX_LOGIT_SCALE = math.log(100.0)  # temperature never below 1/100, as in CLIP


def towers_and_loss(source: Any, vision: dict[str, Any] | None, text: dict[str, Any] | None,
                    loss: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The tower and loss specs, with ``model.pretrained``'s filled in: a tower spec with a
    ``name`` replaces the source's tower (LiT on a CLIP image tower: a new ``model.text``),
    one without adds its settings to it (``model.vision.pretrained: false``); the loss is the
    source's kind (sigmoid where the source has a bias) unless ``loss.name`` says otherwise."""
    if source is None:
        missing = [key for key, spec in (("model.vision", vision), ("model.text", text)) if not (spec or {}).get("name")]
        if missing:
            raise UserError(f"{' and '.join(missing)}: missing; give the towers, or model.pretrained for a whole "
                            f"pretrained CLIP (open_clip:<arch>@<tag or file>, hf:<dir or hub id>).")
        return vision, text, loss
    vision = dict(vision) if vision and "name" in vision else {**source.vision, **(vision or {})}
    text = dict(text) if text and "name" in text else {**source.text, **(text or {})}
    if "name" not in loss:
        loss = {"name": "siglip" if source.logit_bias is not None else "clip", **loss}
    return vision, text, loss


@TASKS.register("clip")
class CLIPTask(TaskModule):
    """Contrastive image-text pretraining (CLIP, SigLIP, LiT): two towers, projections and a temperature; retrieval and zero-shot metrics."""

    epoch_line_metrics = ("i2t_R@1", "t2i_R@1", "mean_recall", "zs_top1")

    def __init__(self, loss: dict[str, Any], optimizer: dict[str, Any], vision: dict[str, Any] | None = None,
                 text: dict[str, Any] | None = None, pretrained: str | None = None,
                 scheduler: dict[str, Any] | None = None, embed_dim: int | None = None,
                 projection: dict[str, Any] | None = None, freeze_vision: bool = False,
                 unfrozen_vision_groups: int = 0, freeze_text: bool = False, unfrozen_text_groups: int = 0,
                 accumulate_batches: int = 1, temporal: dict[str, Any] | None = None,
                 lr_scale: dict[str, float] | None = None, init_from: str | None = None,
                 init_towers: tuple[str, ...] | list[str] = ("vision", "text")) -> None:
        super().__init__(optimizer, scheduler)
        if accumulate_batches < 1:
            raise UserError(f"model.accumulate_batches must be >= 1, got {accumulate_batches}.")
        # k batches per optimizer step with negatives across all of them (see accumulating_step)
        self.accumulate_batches = accumulate_batches
        self.automatic_optimization = accumulate_batches == 1
        self._cached: list[tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]] = []
        if pretrained and vision and "name" in vision and text and "name" in text:
            raise UserError(f"model.pretrained ({pretrained}) fills the towers, and the recipe names both of its own "
                            f"(model.vision.name {vision['name']!r}, model.text.name {text['name']!r}): drop "
                            f"model.pretrained, or the tower names (start from a clip-finetune-* recipe, whose base "
                            f"has none).")
        source = PRETRAINED_CLIPS.build({"name": pretrained}, "model.pretrained") if pretrained else None
        vision, text, loss = towers_and_loss(source, vision, text, loss)
        self.vision = VISION_ENCODERS.build(vision, "model.vision")
        self.text = TEXT_ENCODERS.build(text, "model.text")
        # LiT ("locked-image tuning") freezes the image tower; unfrozen groups leave its last layers trainable
        freeze_tower(self.vision, freeze_vision, unfrozen_vision_groups, "model.freeze_vision")
        freeze_tower(self.text, freeze_text, unfrozen_text_groups, "model.freeze_text")
        # a tower that ends in its own projection (a pretrained CLIP's) keeps it: no second one on top
        projected = [t.output_dim for t in (self.vision, self.text) if getattr(t, "projected", False)]
        embed_dim = embed_dim or (projected[0] if projected else 256)
        projection = projection or {"name": "linear"}
        self.vision_proj, self.text_proj = (
            nn.Identity() if getattr(tower, "projected", False) and tower.output_dim == embed_dim else
            PROJECTIONS.build(projection, "model.projection", in_dim=tower.output_dim, out_dim=embed_dim)
            for tower in (self.vision, self.text))
        self.embed_dim = embed_dim
        self.loss_fn = LOSSES.build(loss, "loss")
        scale = source.logit_scale if source else self.loss_fn.logit_scale_init
        self.logit_scale = nn.Parameter(torch.tensor(float(scale)))
        bias = getattr(self.loss_fn, "logit_bias_init", None)
        if bias is not None and source is not None and source.logit_bias is not None:
            bias = source.logit_bias
        self.logit_bias = nn.Parameter(torch.tensor(float(bias))) if bias is not None else None
        if init_from:  # another CLIP run's towers with their projections (an image CLIP for a video one)
            towers = list(init_towers)
            if not towers or any(t not in ("vision", "text") for t in towers):
                raise UserError(f"model.init_towers: {towers}; give vision, text or both (each comes with its "
                                  f"projection; both bring the temperature too).")
            parts = {f"{t}{suffix}": getattr(self, f"{t}{suffix}") for t in towers for suffix in ("", "_proj")}
            state = self.init_towers_from(init_from, parts)
            if len(towers) == 2:
                with torch.no_grad():
                    self.logit_scale.copy_(state["logit_scale"])
        # videos (CLIP4Clip): each frame through the image tower and projection, then a
        # temporal aggregation by name into one embedding per video
        self.temporal = TEMPORAL_AGGREGATORS.build(temporal, "model.temporal", dim=embed_dim) if temporal else None
        if self.temporal is not None and hasattr(self.temporal, "init_positions"):
            table = self.text.position_table() if hasattr(self.text, "position_table") else None
            self.temporal.init_positions(None if table is None else table.detach(), "model.text")
        directions = ("v2t", "t2v") if self.temporal is not None else ("i2t", "t2i")
        if self.temporal is not None:  # many videos share a caption: the caption-string match is the one to watch
            self.epoch_line_metrics = ("v2t_R@1_str", "t2v_R@1_str", "mean_recall")
        self.retrieval = nn.ModuleDict({stage: RetrievalRecall(directions=directions) for stage in ("val", "test")})
        self.zero_shot: dict[str, TopKAccuracy] = {}
        self.classifier: torch.Tensor | None = None
        self.set_lr_scale(lr_scale)  # CLIP4Clip: the pretrained towers slower than the new temporal module

    def data_spec(self) -> DataSpec:
        max_frames = self.temporal.max_frames if self.temporal is not None else None
        return DataSpec(self.text.tokenizer, self.text.max_length, self.vision.image_config, max_frames)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision_proj(self.vision(images).pooled), dim=-1)

    def encode_video(self, video: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """(B, F, 3, H, W) frames and their mask (B, F) -> (B, D) normalised video embeddings:
        each real frame through the image tower and projection, then ``model.temporal``."""
        b, f = frame_mask.shape
        real = frame_mask.reshape(-1).bool()
        features = self.vision_proj(self.vision(video.reshape(b * f, *video.shape[2:])[real]).pooled)
        frames = features.new_zeros(b * f, features.shape[-1]).masked_scatter(real[:, None], features)
        return F.normalize(self.temporal(frames.view(b, f, -1), frame_mask), dim=-1)

    def encode_visual(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """A batch's images or videos as normalised embeddings (a video batch holds ``video``
        and ``frame_mask`` where an image batch holds ``image``)."""
        if "video" in batch:
            if self.temporal is None:
                raise UserError("the data are videos, and this CLIP has no model.temporal to aggregate their frames: "
                                  "set model.temporal={name: transformer, max_frames: N} (or mean).")
            return self.encode_video(batch["video"], batch["frame_mask"])
        return self.encode_image(batch["image"])

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text(input_ids, attention_mask).pooled), dim=-1)

    def used_logit_scale(self) -> torch.Tensor:
        """The log-scale the model uses: capped at log(100) for the softmax loss as CLIP
        trains; uncapped for the sigmoid loss (SigLIP's ends above 100, and HF's logits use it
        as it is). Exports store this value."""
        cap = getattr(self.loss_fn, "max_logit_scale", MAX_LOGIT_SCALE)
        return self.logit_scale if cap is None else self.logit_scale.clamp(max=cap)

    def temperature_scale(self) -> torch.Tensor:
        return self.used_logit_scale().exp()

    def batch_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The contrastive loss of one batch, its own negatives only."""
        image = self.encode_visual(batch)
        text = self.encode_text(batch["input_ids"], batch["attention_mask"])
        return self.loss_fn(image, text, self.temperature_scale(), caption_ids=batch.get("caption_id"),
                            logit_bias=self.logit_bias)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        if self.accumulate_batches > 1:
            return self.accumulating_step(batch)
        loss = self.batch_loss(batch)
        self.log("train/loss", loss)
        self.log("train/logit_scale", self.temperature_scale())
        return loss

    @property
    def mid_accumulation(self) -> bool:
        """Batches wait in the cache: a checkpoint now would lose them (StopOnSignal waits)."""
        return bool(self._cached)  # Lightning's own accumulation is refused for this task

    def accumulating_step(self, batch: dict[str, torch.Tensor]) -> None:
        """Contrastive accumulation that keeps the negatives (open_clip's ``--accum-freq``,
        GradCache): embed each of k batches without gradients and cache the features; at the
        k-th, embed each batch again with gradients and take the loss over all k batches'
        features, its own live and the others cached. The k backward passes sum to the
        gradient of one k-times larger batch (the temperature's counted once), where plain
        gradient accumulation would score each batch only against itself. Each re-embedding
        replays its batch's RNG state, so dropout draws the same masks twice. BatchNorm layers
        still see one batch at a time."""
        rng = self._rng_state()
        with torch.no_grad():
            features = (self.encode_visual(batch), self.encode_text(batch["input_ids"], batch["attention_mask"]))
        self._cached.append((batch, rng, *features))
        if len(self._cached) < self.accumulate_batches:
            return None
        cached, self._cached = self._cached, []
        resume_rng = self._rng_state()
        images, texts = [c[2] for c in cached], [c[3] for c in cached]
        caption_ids = (torch.cat([c[0]["caption_id"] for c in cached]) if "caption_id" in cached[0][0] else None)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        scale = self.temperature_scale()
        last = len(cached) - 1
        for j, (micro, state, _, _) in enumerate(cached):
            self._set_rng_state(state)
            # DDP all-reduces once, in the last pass, which is also the one that gives the
            # temperature and bias their gradient: every parameter is then in that reduction
            sync = j == last
            no_sync = getattr(self.trainer.strategy, "block_backward_sync", None)  # parallel strategies only
            with contextlib.nullcontext() if sync or no_sync is None else no_sync():
                image = self.encode_visual(micro)
                text = self.encode_text(micro["input_ids"], micro["attention_mask"])
                loss = self.loss_fn(torch.cat([*images[:j], image, *images[j + 1:]]),
                                    torch.cat([*texts[:j], text, *texts[j + 1:]]),
                                    scale if sync else scale.detach(), caption_ids=caption_ids,
                                    logit_bias=None if self.logit_bias is None else
                                    (self.logit_bias if sync else self.logit_bias.detach()))
                self.manual_backward(loss)
        self._set_rng_state(resume_rng)
        optimizer.step()  # clipped and checked on the way (fault_tolerance.NonFiniteGuard)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        self.log("train/loss", loss.detach())
        self.log("train/logit_scale", scale.detach())
        return None

    def configure_trainer(self, trainer_kwargs: dict[str, Any]) -> dict[str, Any]:
        """Lightning's own accumulation is refused: it would score each batch only against its
        own negatives (``model.accumulate_batches`` keeps them)."""
        trainer_kwargs = super().configure_trainer(trainer_kwargs)
        if (trainer_kwargs.get("accumulate_grad_batches") or 1) > 1:
            if self.accumulate_batches > 1:
                raise UserError("set model.accumulate_batches or trainer.accumulate_grad_batches, not both: the "
                                "task accumulates itself, keeping every batch's negatives.")
            raise UserError("trainer.accumulate_grad_batches would score each batch only against itself (fewer "
                            "negatives than the accumulated batch). Use model.accumulate_batches instead: the same "
                            "loss and gradients as one batch that many times larger.")
        return trainer_kwargs

    def optimizer_steps_per_epoch(self, batches: int) -> int:
        if self.accumulate_batches > 1:  # the task accumulates itself and drops a short last group
            return batches // self.accumulate_batches
        return super().optimizer_steps_per_epoch(batches)

    def _rng_state(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """CPU and (on a GPU) this device's generator: dropout draws from the latter."""
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def _set_rng_state(self, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.device)

    def on_train_epoch_end(self) -> None:
        self._cached = []  # an epoch's last batches that do not fill a group are dropped, as drop_last

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def zero_shot_classifier(self, classes: ZeroShotSpec) -> torch.Tensor:
        """(classes, dim): each class the normalised mean of its prompts' text embeddings."""
        prompts = classes.prompts()  # classes x templates
        flat = [p for per_class in prompts for p in per_class]
        embeddings = []
        for chunk in range(0, len(flat), 512):
            tokens = tokenize(self.text.tokenizer, flat[chunk:chunk + 512], self.text.max_length)
            embeddings.append(self.encode_text(tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)))
        per_class = torch.cat(embeddings).view(len(prompts), len(classes.templates), -1).mean(1)
        return F.normalize(per_class, dim=-1)

    def build_zero_shot_classifier(self) -> None:
        datamodule = self.trainer.datamodule
        spec = datamodule.zero_shot if isinstance(datamodule, TaskData) else None
        self.classifier = None if spec is None else self.zero_shot_classifier(spec)
        if spec is not None:
            for stage in ("val", "test"):
                self.zero_shot[stage] = TopKAccuracy(len(spec.classnames), spec.groups).to(self.device)

    def on_validation_epoch_start(self) -> None:
        self.build_zero_shot_classifier()

    def on_test_epoch_start(self) -> None:
        self.build_zero_shot_classifier()

    def evaluate_step(self, batch: dict[str, torch.Tensor], batch_idx: int, stage: str) -> None:
        image = self.encode_visual(batch)
        text = self.encode_text(batch["input_ids"], batch["attention_mask"])
        self.score_embeddings(batch, stage, image, text)

    def score_embeddings(self, batch: dict[str, torch.Tensor], stage: str, image: torch.Tensor,
                         text: torch.Tensor) -> None:
        """Retrieval (and zero-shot, where the data has classes) from a batch's normalised embeddings."""
        self.retrieval[stage].update(image, batch["image_id"], text, batch["text_image_id"], batch["caption_id"], batch["text_id"])
        if self.classifier is not None and "label" in batch:
            self.zero_shot[stage].update(image @ self.classifier.T, batch["label"], batch["image_id"])

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_image(images).float()

    def predict_images(self, images: torch.Tensor, datamodule: TaskData) -> list[str]:
        """The zero-shot class of each image among the data's classes, with its probability."""
        if datamodule.zero_shot is None:
            raise UserError(f"mml predict classifies images among the data's zero-shot classes; data module "
                            f"{type(datamodule).__name__} has none.")
        classes = datamodule.zero_shot
        logits = self.encode_image(images.to(self.device)) @ self.zero_shot_classifier(classes).T
        return most_probable_classes(logits * self.temperature_scale(), classes.classnames)

    def report_sections(self, test_metrics: dict[str, float]) -> list[dict[str, Any]]:
        m, ks = test_metrics, self.retrieval["test"].ks
        i2t, t2i = self.retrieval["test"].directions
        thing = "video" if self.temporal is not None else "image"
        rows = [[name] + [m[f"{key}_R@{k}{suffix}"] for k in ks] +
                [(None if suffix else m.get(f"{key}_{rank}")) for rank in ("MdR", "MnR")]
                for name, key, suffix in ((f"{thing}→text", i2t, ""), (f"text→{thing}", t2i, ""),
                                          (f"{thing}→text, caption-string match", i2t, "_str"),
                                          (f"text→{thing}, caption-string match", t2i, "_str"))]
        return [section("Retrieval (test split)",
                        {f"{thing}→text R@1": m[f"{i2t}_R@1"], f"text→{thing} R@1": m[f"{t2i}_R@1"],
                         "mean recall": m["mean_recall"]},
                        [table(["direction"] + [f"R@{k}" for k in ks] + ["MdR", "MnR"], rows,
                               f"mean recall {m['mean_recall']:.4f}")],
                        [f"An {thing} query hits at K if any of its captions is among the K nearest texts; a text "
                         f"query if its own {thing} is among the K nearest. Caption-string match also counts "
                         f"another {thing}'s identical caption. MdR / MnR: median / mean rank of the own match."])]

    def evaluate_epoch_end(self, stage: str) -> None:
        metrics = dict(self.retrieval[stage].compute())
        self.retrieval[stage].reset()
        if self.classifier is not None:
            metrics.update({f"zs_{k}": v for k, v in self.zero_shot[stage].compute().items()})
            self.zero_shot[stage].reset()
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()})


def load_clip(source: str, where: str = "model.clip") -> CLIPTask:
    """A trained CLIP to build on (classification heads, prompt learning), in eval mode: a
    run directory or checkpoint of a ``clip`` recipe, or a pretrained CLIP as
    ``model.pretrained`` names one (``open_clip:<arch>@<tag or file>``, ``hf:<dir or hub id>``)."""
    source = str(source)
    if source.partition(":")[0] in ("open_clip", "hf"):
        clip = CLIPTask(loss={}, optimizer={"name": "adamw"}, pretrained=source)
        return clip.eval()
    path, ckpt, state = read_run_checkpoint(source, where)
    recipe = ckpt.get("mmlightning_recipe") or {}
    if recipe.get("task") != "clip":
        raise UserError(f"{where}: {path} is a {recipe.get('task', 'unknown')!r} run, not a CLIP one: give a run of a "
                        f"clip recipe (mml ls), or a pretrained CLIP (open_clip:..., hf:...).")
    # how that run trained (which towers it locked, its accumulation) is not part of the
    # model: every weight comes back trainable, and the task building on it decides
    training_only = ("accumulate_batches", "init_from", "init_towers", "lr_scale", "freeze_vision", "unfrozen_vision_groups", "freeze_text",
                     "unfrozen_text_groups")
    model = {k: v for k, v in (recipe.get("model") or {}).items() if k not in training_only}
    clip = CLIPTask(**model, loss=recipe["loss"], optimizer=recipe["optimizer"], scheduler=recipe.get("scheduler"))
    mine = clip.state_dict()
    clip.load_state_dict({k: v for k, v in state.items() if k in mine}, strict=True)
    return clip.eval()
