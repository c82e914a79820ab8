"""graphprune: make trained residual networks faster with a tiny set of images.

Python API (each step is also a pass in :mod:`graphprune.passes`)::

    import graphprune as gp
    model = gp.load("model.onnx")            # or an nn.Module, a .pt2, "torchvision:resnet50"
    blocks = gp.find_blocks(model)           # analysis: never changes the model
    smaller = gp.drop_blocks(model, ["layer2.1"])   # transform: returns a new model
    gp.save(smaller, "model.small.onnx")     # verified with onnxruntime, written atomically
"""

from .errors import GraphpruneError
from .model import InputSpec, Model
from .formats.model_io import load, save, to_onnx
from .passes import Block, drop_blocks, find_blocks

__version__ = "0.1.0"

__all__ = [
    "Block", "GraphpruneError", "InputSpec", "Model", "drop_blocks", "find_blocks", "load", "save",
    "to_onnx", "__version__",
]
