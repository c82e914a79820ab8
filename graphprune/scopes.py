"""Module paths ("layer2.1", "features.3.conv") for fx nodes, whatever the front end.

* fx symbolic tracing: a ``call_module`` node's target is its path; other nodes carry
  ``meta["nn_module_stack"]``, whose last entry is the innermost module.
* torch.export: the same ``nn_module_stack`` metadata.
* ONNX exported by PyTorch's TorchScript exporter: node names such as
  ``/layer2/layer2.1/conv1/Conv`` (:func:`scope_from_onnx_name`).
* ONNX exported by the dynamo exporter: ``pkg.torch.onnx.name_scopes`` metadata.

Blocks are named from these paths (:func:`common_prefix`), so ``inspect``, ``drop`` and reports
agree on names for the same model.
"""

from __future__ import annotations

import ast

from torch import fx


def scope_from_onnx_name(name: str) -> str:
    """``/layer2/layer2.1/conv1/Conv`` -> ``layer2.1.conv1``; ``""`` for names without scopes.

    The exporter writes one component per module on the stack; a component either repeats its
    parent's path with a suffix (``layer2`` then ``layer2.1``) or is a child attribute name
    (``conv1``), and components of Sequential children are written as ``mlp.0`` under ``mlp``.
    """
    if not name.startswith("/"):
        return ""
    parts = [p for p in name.strip("/").split("/")][:-1]  # the last component is the op
    path: list[str] = []
    for comp in parts:
        pieces = comp.split(".")
        # Longest overlap between the end of the current path and the start of this component.
        overlap = 0
        for k in range(min(len(path), len(pieces) - 1), 0, -1):
            if path[-k:] == pieces[:k]:
                overlap = k
                break
        if overlap == 0 and len(pieces) > 1 and path[: len(pieces) - 1] == pieces[:-1]:
            path = pieces  # a full path from the root ("layer2.1" under "layer2")
            continue
        path.extend(pieces[overlap:])
    return ".".join(path)


def scope_from_onnx_metadata(props: dict[str, str]) -> str | None:
    """The module path recorded by the dynamo exporter, if any."""
    raw = props.get("pkg.torch.onnx.name_scopes")
    if not raw:
        return None
    try:
        scopes = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return None
    modules = [s for s in scopes[:-1] if s]  # drop the root "" and the op itself
    return modules[-1] if modules else ""


def node_scope(node: fx.Node) -> str:
    """The path of the innermost module that computed ``node`` ("" when unknown)."""
    if "scope" in node.meta:
        return node.meta["scope"]
    if node.op == "call_module":
        return str(node.target)
    if node.op == "get_attr":
        return str(node.target).rsplit(".", 1)[0] if "." in str(node.target) else ""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return _normalise_export_path(path)
    return ""


def _normalise_export_path(path: str) -> str:
    # torch.export may record "L['self'].layer1[0]" style paths in some versions.
    if "L['self']" in path or "[" in path:
        path = path.replace("L['self'].", "").replace("L['self']", "")
        path = path.replace("._modules['", ".").replace("']", "").replace("[", ".").replace("]", "")
    return path.strip(".")


def common_prefix(paths: list[str]) -> str:
    """The longest common dotted prefix of ``paths`` (component-wise)."""
    split = [p.split(".") for p in paths if p]
    if not split:
        return ""
    prefix = split[0]
    for parts in split[1:]:
        n = 0
        while n < min(len(prefix), len(parts)) and prefix[n] == parts[n]:
            n += 1
        prefix = prefix[:n]
    return ".".join(prefix)
