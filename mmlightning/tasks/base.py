"""What every task module shares: optimizer and schedule from the recipe, the resolved recipe
inside each checkpoint, and the contract with data modules (``data_spec``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L

from mmlightning.encoders.outputs import ImageConfig
from mmlightning.registry import OPTIMIZERS, SCHEDULERS


@dataclass
class DataSpec:
    """What a task needs from its data: how to tokenize and how to prepare images. The build
    step passes these to the data module as keyword arguments."""

    tokenizer: Any
    max_length: int
    image_config: ImageConfig

    def as_kwargs(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer, "max_length": self.max_length, "image_config": self.image_config}


class TaskModule(L.LightningModule):
    def __init__(self, optimizer: dict[str, Any], scheduler: dict[str, Any] | None = None) -> None:
        super().__init__()
        OPTIMIZERS.check(optimizer, "optimizer")
        if scheduler:
            SCHEDULERS.check(scheduler, "scheduler")
        self.optimizer_spec = dict(optimizer)
        self.scheduler_spec = dict(scheduler) if scheduler else None
        self.recipe: dict[str, Any] | None = None  # the resolved recipe; set by build, saved in checkpoints

    def data_spec(self) -> DataSpec:
        raise NotImplementedError

    def parameter_groups(self) -> list[dict[str, Any]]:
        """No weight decay on biases, norm gains and the temperature (as CLIP and open_clip)."""
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def configure_optimizers(self) -> Any:
        optimizer = OPTIMIZERS.build(self.optimizer_spec, "optimizer", params=self.parameter_groups())
        if not self.scheduler_spec:
            return optimizer
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = SCHEDULERS.build(self.scheduler_spec, "scheduler", optimizer=optimizer, total_steps=total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mmlightning_recipe"] = self.recipe

