"""Vision encoders: any timm model by name, and a small CNN for 64 px CPU training.

Each returns ``VisionOutput(pooled, tokens)`` and exposes ``output_dim`` (pooled width),
``token_dim`` and ``image_config`` (size, mean, std the data pipeline must use).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from mmlightning.encoders.outputs import ImageConfig, VisionOutput
from mmlightning.encoders.weights import local_path
from mmlightning.errors import UserError
from mmlightning.registry import VISION_ENCODERS, WEIGHT_REMAPS, did_you_mean


@VISION_ENCODERS.register("shapes_cnn")
class SmallCNN(nn.Module):
    """Four strided convolutions to an 8x8 grid. The pooled vector is a linear map of the
    whole grid rather than an average, because captions say which shape is left of which:
    average pooling would throw position away."""

    def __init__(self, width: int = 32, image_size: int = 64, output_dim: int = 256) -> None:
        super().__init__()
        if image_size % 8:
            raise UserError(f"shapes_cnn: image_size must be a multiple of 8, got {image_size}")

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.features = nn.Sequential(
            block(3, width, 2), block(width, 2 * width, 2), block(2 * width, 4 * width, 2), block(4 * width, 4 * width, 1)
        )
        grid = (image_size // 8) ** 2
        self.token_dim = 4 * width
        self.output_dim = output_dim
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, self.token_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.pool = nn.Sequential(nn.Flatten(), nn.Linear(grid * self.token_dim, output_dim))
        self.image_config = ImageConfig(size=image_size)
        self.features.to(memory_format=torch.channels_last)  # about 1.5x faster convolutions on CPU

    def forward(self, images: torch.Tensor) -> VisionOutput:
        images = images.contiguous(memory_format=torch.channels_last)
        tokens = self.features(images).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, C)
        return VisionOutput(pooled=self.pool(tokens), tokens=tokens)


@VISION_ENCODERS.register("timm:")
class TimmEncoder(nn.Module):
    """``timm:<model name>``: any timm model, classifier removed.

    ``pretrained=True`` downloads through timm (needs the hub); ``checkpoint_path`` loads a
    local state dict instead (a path, or ``pkg:<package>/<file>`` inside an installed package),
    dropping the classifier. ``checkpoint_remap`` names a ``WEIGHT_REMAPS`` entry for a
    checkpoint saved in another codebase's layout (``in_order``). ``crop_pct``: evaluation
    resizes the short side to ``size / crop_pct`` before the centre crop (default: timm's
    value for the model, e.g. 0.875; 1 as CLIP and open_clip evaluate).
    """

    def __init__(self, model_name: str, pretrained: bool = False, checkpoint_path: str | None = None,
                 checkpoint_remap: str | None = None, img_size: int | None = None, grad_checkpointing: bool = False,
                 model_kwargs: dict[str, Any] | None = None, crop_pct: float | None = None,
                 where: str = "model.vision") -> None:
        super().__init__()
        kwargs = dict(model_kwargs or {})
        if model_name not in timm.list_models() and model_name.split(".")[0] not in timm.list_models():
            raise UserError(f"{where}.name: timm has no model {model_name!r}.{did_you_mean(model_name, timm.list_models())} "
                              f"`python -c 'import timm; print(timm.list_models(\"vit*\"))'` lists them.")
        try:
            self.model = self._create(model_name, pretrained, img_size, kwargs)
        except TypeError as err:
            raise UserError(f"{where}.name: timm:{model_name}: {err}") from None
        if checkpoint_path:
            reference = None
            if checkpoint_remap:
                with torch.device("meta"):  # the layout with its classifier, as checkpoints are saved
                    full = self._create(model_name, False, img_size, {**kwargs, "num_classes": None})
                reference = {k: v.shape for k, v in full.state_dict().items()}
            load_vision_checkpoint(self.model, local_path(checkpoint_path, f"{where}.checkpoint_path"),
                                   checkpoint_remap, reference, where)
        elif checkpoint_remap:
            raise UserError(f"{where}.checkpoint_remap needs a checkpoint_path.")
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        data_cfg = timm.data.resolve_model_data_config(self.model)
        if crop_pct is not None and not 0 < crop_pct <= 1:
            raise UserError(f"{where}.crop_pct must be in (0, 1], got {crop_pct}.")
        if crop_pct is not None:
            data_cfg["crop_pct"] = crop_pct
        self.image_config = ImageConfig(
            size=int(img_size or data_cfg["input_size"][-1]), mean=tuple(data_cfg["mean"]), std=tuple(data_cfg["std"]),
            interpolation=data_cfg.get("interpolation", "bicubic"), crop_pct=float(data_cfg.get("crop_pct", 1.0)),
        )
        self.output_dim = self.model.num_features
        self.token_dim = getattr(self.model, "embed_dim", self.model.num_features)

    @staticmethod
    def _create(name: str, pretrained: bool, img_size: int | None, kwargs: dict[str, Any]) -> nn.Module:
        """Without a classifier (``num_classes: None`` in kwargs keeps the model's own)."""
        kwargs = {"num_classes": 0, **kwargs}
        if kwargs["num_classes"] is None:
            del kwargs["num_classes"]
        if img_size is None:
            return timm.create_model(name, pretrained=pretrained, **kwargs)
        try:  # transformers bake the size into position embeddings
            return timm.create_model(name, pretrained=pretrained, img_size=img_size, **kwargs)
        except TypeError as err:
            if "img_size" not in str(err):
                raise
            # convolutional nets take any size: only the data pipeline needs to know it
            return timm.create_model(name, pretrained=pretrained, **kwargs)

    def forward(self, images: torch.Tensor) -> VisionOutput:
        features = self.model.forward_features(images)
        pooled = self.model.forward_head(features, pre_logits=True)
        tokens = features.flatten(2).transpose(1, 2) if features.ndim == 4 else features  # CNN grid -> tokens
        return VisionOutput(pooled=pooled, tokens=tokens)


def load_vision_checkpoint(model: nn.Module, path: str | Path, remap: str | None = None,
                           reference: dict[str, torch.Size] | None = None, where: str = "model.vision") -> None:
    """Load a local state dict, first through the ``remap`` named (onto the ``reference``
    layout); keys of the (removed) classifier are dropped, any other mismatch is an error that
    names the keys."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{where}.checkpoint_path: {str(path)!r} does not exist.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    if remap:
        state = WEIGHT_REMAPS.build({"name": remap}, f"{where}.checkpoint_remap", state=state,
                                    reference=reference, source=str(path))
    head = getattr(model, "default_cfg", {}).get("classifier", "head")
    heads = (head,) if isinstance(head, str) else tuple(head)
    state = {k: v for k, v in state.items() if not k.startswith(tuple(h + "." for h in heads))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{path}: does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
                          f" ({len(missing)} missing, {len(unexpected)} unexpected keys).")
