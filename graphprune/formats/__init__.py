"""Reading and writing models: ONNX files, ``.pt2`` programs and ``nn.Module`` objects.

``load`` turns any of them into a :class:`~graphprune.model.Model` (an fx graph plus what is needed to
write it back); ``save`` writes a model as ONNX (lowered onto the input file where there is one) or
``.pt2``, verified against onnxruntime and written atomically. The other modules are the steps in
between: safe reading and normalising (``onnx_read``), opset conversion (``onnx_opset``), conversion
to fx (``io_onnx``, ``io_torch``), layout and batch rewrites (``input_layout``, ``batch_axis``) and
the writer (``onnx_lower``).
"""

from .model_io import atomic_write, load, save, to_onnx

__all__ = ["atomic_write", "load", "save", "to_onnx"]
