"""Vision and text encoders ("towers"), projection heads and tokenizers.

Importing this package registers the built-in encoders: ``shapes_cnn`` and ``timm:<model>``
for images, ``small_transformer`` and ``hf:<config-or-dir>`` for text, ``small_decoder`` and
``hf:<causal LM>`` as captioning decoders; the towers of pretrained CLIPs
(``open_clip_vision:`` / ``open_clip_text:``, ``hf_clip_vision:`` / ``hf_clip_text:``) and the
whole models (``model.pretrained: open_clip:...`` or ``hf:...``).
"""

from mmlightning.encoders import decoder, hf_clip_towers, language_model, open_clip_towers, projection, temporal, text, vision  # noqa: F401
from mmlightning.encoders.outputs import ImageConfig, TextOutput, VisionOutput

__all__ = ["ImageConfig", "TextOutput", "VisionOutput"]
