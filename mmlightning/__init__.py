"""mmlightning: multimodal training on PyTorch Lightning, driven by named recipes.

Kept free of heavy imports so `mml ls` starts fast; import submodules directly:
`from mmlightning.losses import ClipLoss`.
"""

__version__ = "0.1.0"
