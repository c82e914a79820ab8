"""ONNX ``LSTM`` and ``GRU`` as torch modules, which onnx2torch has no converter for.

A recogniser of the CRNN family (convolutions, then a bidirectional LSTM or GRU over the columns,
then a classifier: ddddocr's ``common.onnx``, EasyOCR's, PaddleOCR's older recognisers) was
refused whole ("unsupported ONNX ops: LSTM"). :class:`OnnxRecurrent` computes the node as ONNX
defines it with torch's own kernels (``torch.lstm``/``torch.gru``), one layer per node:

* weights are held in the node's own layout, ``W`` (D, G*H, I), ``R`` (D, G*H, H) and ``B``
  (D, 2*G*H) with D directions and G gates, so they link back to their initializers unchanged and
  recovery trains them; the gates are reordered on the fly (ONNX i, o, f, c -> torch i, f, c, o for
  an LSTM; z, r, h -> r, z, h for a GRU);
* ``direction`` forward, reverse (the sequence flipped in and out: ONNX writes each step's state
  at its own position) or bidirectional; ``layout`` 0 (sequence first) or 1 (batch first);
  ``initial_h``/``initial_c`` given or zero; outputs ``Y`` (T, D, N, H), ``Y_h``, ``Y_c``;
* what torch's kernels do not compute is refused in one line, not approximated: ``sequence_lens``,
  peepholes, an LSTM's coupled input-forget gate, activations other than the defaults, ``clip``,
  and a GRU with ``linear_before_reset`` 0 (torch applies the reset gate after the recurrent
  product, ONNX's 1).
"""

from __future__ import annotations

import torch
from torch import nn

GATES = {"LSTM": 4, "GRU": 3}
TORCH_ORDER = {"LSTM": (0, 2, 3, 1), "GRU": (1, 0, 2)}  # ONNX gate index of each of torch's gates
DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"]}
VERSIONS = {"LSTM": (1, 7, 14, 22), "GRU": (1, 3, 7, 14, 22)}  # the ops' since-versions


class OnnxRecurrent(nn.Module):
    """One ONNX ``LSTM`` or ``GRU`` node (see the module docstring)."""

    def __init__(self, kind: str, weights: torch.Tensor, recurrence: torch.Tensor, bias: torch.Tensor | None,
                 direction: str, batch_first: bool, outputs: int):
        super().__init__()
        self.kind, self.direction, self.batch_first, self.outputs = kind, direction, batch_first, outputs
        self.hidden = recurrence.shape[-1]
        self.W, self.R = nn.Parameter(weights), nn.Parameter(recurrence)
        self.B = nn.Parameter(bias) if bias is not None else None

    def _torch_weights(self) -> list[torch.Tensor]:
        """torch's flat weights, per direction w_ih, w_hh[, b_ih, b_hh], gates in its order."""
        order, gates, hidden = list(TORCH_ORDER[self.kind]), GATES[self.kind], self.hidden
        flat = []
        for d in range(self.W.shape[0]):
            flat += [self.W[d].reshape(gates, hidden, -1)[order].reshape(gates * hidden, -1),
                     self.R[d].reshape(gates, hidden, hidden)[order].reshape(gates * hidden, hidden)]
            if self.B is not None:
                flat += list(self.B[d].reshape(2, gates, hidden)[:, order].reshape(2, gates * hidden))
        return flat

    def forward(self, x, initial_h=None, initial_c=None):
        if self.batch_first:  # layout 1: (N, T, I), states (N, D, H)
            x = x.transpose(0, 1)
            initial_h = None if initial_h is None else initial_h.transpose(0, 1)
            initial_c = None if initial_c is None else initial_c.transpose(0, 1)
        if x.shape[-1] != self.W.shape[-1]:  # torch.lstm and torch.gru do not check, and ran on (a resize's input)
            raise RuntimeError(f"{self.kind} takes {self.W.shape[-1]} input features, given {x.shape[-1]}")
        directions, steps, batch = self.W.shape[0], x.shape[0], x.shape[1]
        zeros = x.new_zeros(directions, batch, self.hidden)
        for state in (initial_h, initial_c):  # torch's kernels do not check either, and corrupted memory
            if state is not None and tuple(state.shape) != tuple(zeros.shape):
                raise RuntimeError(f"{self.kind} state of shape {tuple(state.shape)} for a batch of {batch}: "
                                   f"({directions}, {batch}, {self.hidden}) expected")
        initial_h = zeros if initial_h is None else initial_h
        reverse = self.direction == "reverse"
        if reverse:
            x = x.flip(0)
        bidirectional = directions == 2
        if self.kind == "LSTM":
            state = (initial_h, zeros if initial_c is None else initial_c)
            y, last_h, last_c = torch.lstm(x, state, self._torch_weights(), self.B is not None, 1, 0.0, False,
                                           bidirectional, False)
        else:
            y, last_h = torch.gru(x, initial_h, self._torch_weights(), self.B is not None, 1, 0.0, False,
                                  bidirectional, False)
            last_c = None
        if reverse:
            y = y.flip(0)
        y = y.reshape(steps, batch, directions, self.hidden).transpose(1, 2)  # (T, D, N, H)
        if self.batch_first:
            y, last_h = y.permute(2, 0, 1, 3), last_h.transpose(0, 1)
            last_c = None if last_c is None else last_c.transpose(0, 1)
        results = (y, last_h, last_c)[:self.outputs]
        return results[0] if self.outputs == 1 else results


def convert_recurrent(node, graph):
    """onnx2torch converter of an ``LSTM``/``GRU`` node (registered by ``onnx_converters.register``)."""
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

    kind, attributes, inputs = node.operation_type, node.attributes, list(node.input_values)
    inputs += [""] * (8 - len(inputs))

    def refuse(what: str):
        raise NotImplementedError(f"{kind} with {what} is not converted (torch's {kind.lower()} kernel has no such "
                                  "form)")

    if inputs[4]:
        refuse("sequence_lens")
    if kind == "LSTM" and inputs[7]:
        refuse("peepholes (P)")
    if kind == "LSTM" and attributes.get("input_forget", 0):
        refuse("input_forget")
    if kind == "GRU" and not attributes.get("linear_before_reset", 0):
        refuse("linear_before_reset 0")
    if "clip" in attributes:
        refuse("clip")
    activations = [_text(a) for a in attributes.get("activations", [])]
    directions = 2 if _text(attributes.get("direction", "forward")) == "bidirectional" else 1
    if activations and activations != DEFAULT_ACTIVATIONS[kind] * directions:
        refuse(f"activations {activations}")
    for name, index in (("W", 1), ("R", 2)) + ((("B", 3),) if inputs[3] else ()):
        if inputs[index] not in graph.initializers:
            refuse(f"{name} computed in the graph")
    weights, recurrence, bias = (graph.initializers[inputs[i]].to_torch() if inputs[i] else None for i in (1, 2, 3))
    _check_shapes(kind, weights, recurrence, bias, directions, attributes.get("hidden_size"))
    module = OnnxRecurrent(kind, weights, recurrence, bias,
                           _text(attributes.get("direction", "forward")), bool(attributes.get("layout", 0)),
                           len(node.output_values))
    states = (inputs[5], inputs[6]) if kind == "LSTM" else (inputs[5],)
    mapping = OnnxMapping(inputs=(inputs[0],) + states, outputs=node.output_values)
    return OperationConverterResult(torch_module=module, onnx_mapping=mapping)


def _check_shapes(kind: str, weights, recurrence, bias, directions: int, hidden_size) -> None:
    """``W`` (D, G*H, I), ``R`` (D, G*H, H), ``B`` (D, 2*G*H) as the node's ``direction`` and
    ``hidden_size`` say, else a malformed node: torch's kernels read whatever memory such shapes
    point at."""
    hidden = recurrence.shape[-1] if recurrence.dim() == 3 else -1
    rows = GATES[kind] * hidden
    expected = [(weights, (directions, rows, weights.shape[-1] if weights.dim() == 3 else -1)),
                (recurrence, (directions, rows, hidden))] + ([(bias, (directions, 2 * rows))] if bias is not None else [])
    if (hidden < 1 or (hidden_size is not None and int(hidden_size) != hidden)
            or any(tuple(tensor.shape) != shape for tensor, shape in expected)):
        raise ValueError(f"{kind} weights of shapes {[tuple(t.shape) for t, _ in expected]} do not fit {directions} "
                         f"direction(s) and hidden_size {hidden_size if hidden_size is not None else hidden}")


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
