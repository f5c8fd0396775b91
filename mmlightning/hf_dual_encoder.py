"""A CLIP-style dual encoder as HF transformers code, for ``mml export --format hf``.

The exporter copies this file next to the weights (``config.json``'s ``auto_map`` names it),
so ``transformers.AutoModel.from_pretrained(folder, trust_remote_code=True)`` builds the model
without mmlightning installed: it must import nothing but torch and transformers.

Why not ``VisionTextDualEncoderModel``: it projects each tower's ``pooler_output``, which for
BERT-style text models is the BERT pooler (dense + tanh over [CLS]), while mmlightning pools
the last hidden state (mean over real tokens, or [CLS] as is) and has no pooler; and it sizes
the image projection from ``vision_config.hidden_size``, which a timm tower's config
(``TimmWrapperConfig``) does not have. Here the towers are the stock ``AutoModel`` classes
(``TimmWrapperModel`` for the image, whose ``pooler_output`` is timm's ``forward_head`` without a
classifier), the text tower pooled as it was trained.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.clip.modeling_clip import CLIPOutput

TEXT_POOLINGS = ("mean", "cls")


def _sub_config(config, default_model_type: str) -> PretrainedConfig:
    if isinstance(config, PretrainedConfig):
        return config
    if not config:  # a default instance, which transformers makes to save only what differs from it
        return CONFIG_MAPPING[default_model_type]()
    # from_dict, not the constructor: TimmWrapperConfig reads its label fields there
    return CONFIG_MAPPING[config["model_type"]].from_dict(dict(config))


class MMLDualEncoderConfig(PretrainedConfig):
    """An image tower config (``timm_wrapper``), a text tower config (any encoder), how the
    text tower is pooled, and the two bias-free projections' sizes.

    An ``__init__`` rather than transformers 5's dataclass fields, as remote-code configs are
    written: transformers 4 (4.57 checked) loads the folder too."""

    model_type = "mml_dual_encoder"
    sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig}

    def __init__(self, vision_config=None, text_config=None, text_pooling: str = "mean", vision_embed_dim: int = 512,
                 projection_dim: int = 512, logit_scale_init_value: float = 2.6592, has_logit_bias: bool = False,
                 **kwargs) -> None:
        if text_pooling not in TEXT_POOLINGS:
            raise ValueError(f"text_pooling must be one of {TEXT_POOLINGS}, got {text_pooling!r}")
        self.vision_config = _sub_config(vision_config, "timm_wrapper")
        self.text_config = _sub_config(text_config, "bert")
        self.text_pooling = text_pooling
        self.vision_embed_dim = vision_embed_dim
        self.projection_dim = projection_dim
        self.logit_scale_init_value = logit_scale_init_value
        self.has_logit_bias = has_logit_bias  # SigLIP: logits = scale * cosine + bias
        super().__init__(**kwargs)


class MMLDualEncoderModel(PreTrainedModel):
    """Image and text towers with linear projections into one embedding space.

    ``get_image_features(pixel_values)`` and ``get_text_features(input_ids, attention_mask)``
    return L2-normalized embeddings as tensors; ``forward`` returns a ``CLIPOutput`` with both
    and ``logits_per_image`` / ``logits_per_text``."""

    config_class = MMLDualEncoderConfig
    base_model_prefix = "mml_dual_encoder"

    def __init__(self, config: MMLDualEncoderConfig) -> None:
        super().__init__(config)
        self.vision_model = AutoModel.from_config(config.vision_config)
        self.text_model = AutoModel.from_config(config.text_config)
        if getattr(self.text_model, "pooler", None) is not None:  # never trained: the last hidden state is pooled here
            self.text_model.pooler = None
        self.visual_projection = nn.Linear(config.vision_embed_dim, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        self.logit_bias = nn.Parameter(torch.tensor(0.0)) if config.has_logit_bias else None
        self.post_init()

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.vision_model(pixel_values=pixel_values, return_dict=True).pooler_output
        return F.normalize(self.visual_projection(pooled), dim=-1)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``get_text_features(**tokenizer(texts, return_tensors="pt"))`` works: a BERT-style
        tokenizer's ``token_type_ids`` go to the text model (all zeros, as in training)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        tokens = self.text_model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True,
                                 **extra).last_hidden_state
        if self.config.text_pooling == "cls":
            pooled = tokens[:, 0]
        else:  # the mean over real tokens: padding must not move the embedding
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1)
        return F.normalize(self.text_projection(pooled), dim=-1)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                **kwargs) -> CLIPOutput:
        image_embeds = self.get_image_features(pixel_values)
        text_embeds = self.get_text_features(input_ids, attention_mask, token_type_ids)
        logits_per_text = text_embeds @ image_embeds.T * self.logit_scale.exp()
        if self.logit_bias is not None:
            logits_per_text = logits_per_text + self.logit_bias
        return CLIPOutput(logits_per_image=logits_per_text.T, logits_per_text=logits_per_text,
                          text_embeds=text_embeds, image_embeds=image_embeds)
