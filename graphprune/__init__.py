"""graphprune: make trained residual networks faster with a tiny set of images.

Python API (each step is also a pass in :mod:`graphprune.passes`)::

    import graphprune as gp
    model = gp.load("model.onnx")            # or an nn.Module, a .pt2, "torchvision:resnet50"
    blocks = gp.find_blocks(model)           # analysis: never changes the model
    smaller = gp.drop_blocks(model, ["layer2.1"])   # transform: returns a new model
    gp.save(smaller, "model.small.onnx")     # verified with onnxruntime, written atomically

    steps = gp.default_pipeline(config)      # the PRACTISE pipeline as an editable list of passes
    result = gp.optimize(model, tiny, config, pipeline=steps)
"""

from . import interrupts as _interrupts

_interrupts.quiet_while_starting()  # the command's Ctrl-C during the imports below: one line, no traceback

from .errors import GraphpruneError  # noqa: E402
from .model import InputSpec, Model  # noqa: E402
from .formats.model_io import load, save, to_onnx  # noqa: E402
from .optimize import OptimizeConfig, default_pipeline, optimize  # noqa: E402
from .passes import Block, Pipeline, drop_blocks, find_blocks  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Block", "GraphpruneError", "InputSpec", "Model", "OptimizeConfig", "Pipeline", "default_pipeline",
    "drop_blocks", "find_blocks", "load", "optimize", "save", "to_onnx", "__version__",
]
