"""Vision and text encoders ("towers"), projection heads and tokenizers.

Importing this package registers the built-in encoders: ``shapes_cnn`` and ``timm:<model>``
for images, ``small_transformer`` and ``hf:<config-or-dir>`` for text, ``small_decoder`` and
``hf:<causal LM>`` as captioning decoders.
"""

from mmlightning.encoders import decoder, projection, text, vision  # noqa: F401  (registers names)
from mmlightning.encoders.outputs import ImageConfig, TextOutput, VisionOutput

__all__ = ["ImageConfig", "TextOutput", "VisionOutput"]
