"""Files newer than onnx2torch's converters (torch's dynamo exporter: opset 18+, batch fixed at 1)
load, run the tiny set in batches, and are written back at their own opset and batch."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import graphprune as gp
from graphprune.formats.batch_axis import free_fixed_batch
from graphprune.formats.onnx_opset import _downgrade_node, default_opset
from graphprune.zoo import CifarResNet
from onnx_builders import residual_onnx


@pytest.fixture(scope="module")
def dynamo_resnet20(tmp_path_factory):
    torch.manual_seed(0)
    module = CifarResNet(20).eval()
    path = tmp_path_factory.mktemp("dynamo") / "r20.onnx"
    torch.onnx.export(module, (torch.randn(1, 3, 32, 32),), str(path), dynamo=True, verbose=False)
    return module, path


def test_dynamo_export_loads_runs_batches_and_writes_back_its_own_form(dynamo_resnet20, tmp_path):
    module, path = dynamo_resnet20
    source = onnx.load(str(path))
    assert default_opset(source) >= 18  # what the exporter writes by default: newer than the converters
    model = gp.load(path)
    assert [b.name for b in gp.find_blocks(model)] == [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)]

    batch = torch.randn(4, 3, 32, 32)  # numerical: the baked-in batch of 1 no longer limits the fx graph
    with torch.no_grad():
        assert torch.allclose(model.run(batch), module(batch), atol=1e-4)

    dropped = gp.drop_blocks(model, ["layer3.2"])
    out = tmp_path / "dropped.onnx"
    gp.save(dropped, out)
    written = onnx.load(str(out))  # structural: same opset, same fixed batch, one block fewer
    assert default_opset(written) == default_opset(source)
    assert [d.dim_value for d in written.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 32, 32]
    assert sum(n.op_type == "Conv" for n in written.graph.node) == sum(n.op_type == "Conv" for n in source.graph.node) - 2
    x = torch.randn(1, 3, 32, 32)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.allclose(got, dropped.run(x).numpy(), atol=1e-4)


def _schema_node(op, inputs, **attrs):
    return helper.make_node(op, inputs, ["y"], **attrs)


def test_reduce_axes_input_becomes_the_attribute():
    axes = numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes")
    node = _downgrade_node(_schema_node("ReduceMean", ["x", "axes"], keepdims=1), 20, 17, {"axes": axes})
    assert list(node.input) == ["x"]
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute} == {"keepdims": 1, "axes": [2, 3]}


@pytest.mark.parametrize("node,why", [
    (_schema_node("ReduceMean", ["x"], noop_with_empty_axes=1), "identity when no axes: no older form"),
    (_schema_node("ReduceMean", ["x", "dynamic_axes"]), "axes computed at run time"),
    (_schema_node("Split", ["x"], num_outputs=2), "num_outputs did not exist before opset 18"),
    (_schema_node("Pad", ["x", "pads", "", "axes"]), "the axes input did not exist before opset 18"),
])
def test_nodes_whose_meaning_has_no_older_form_are_refused(node, why):
    assert _downgrade_node(node, 20, 17, {}) is None, why


def test_nodes_that_only_gained_types_are_kept():
    pad = _schema_node("Pad", ["x", "pads"], mode="reflect")
    assert _downgrade_node(pad, 21, 17, {}) is pad
    flatten = _schema_node("Flatten", ["x"], axis=1)
    assert _downgrade_node(flatten, 21, 17, {}) is flatten


def _transposed_reshape_model(tmp_path):
    """X (1,4,2,2) -> Transpose -> Reshape([1, -1]) -> Y: the leading 1 is *not* the batch here."""
    shape = numpy_helper.from_array(np.array([1, -1], dtype=np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["X"], ["t"], perm=[1, 0, 2, 3]),
         helper.make_node("Reshape", ["t", "shape"], ["Y"])],
        "t", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4, 2, 2])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 16])], initializer=[shape])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 7
    onnx.save(proto, str(tmp_path / "t.onnx"))
    return gp.load(tmp_path / "t.onnx")


def test_a_leading_one_that_is_not_the_batch_is_left_alone(tmp_path):
    model = _transposed_reshape_model(tmp_path)  # loading already tried (and undid) the rewrite
    assert not free_fixed_batch(model)
    x = torch.randn(1, 4, 2, 2)
    assert torch.equal(model.run(x), x.transpose(0, 1).reshape(1, -1))


def test_a_graph_whose_batch_no_rewrite_frees_is_refused_by_optimize_in_one_line(tmp_path):
    from graphprune.data import TinySet
    from graphprune.optimize import OptimizeConfig, optimize

    model = _transposed_reshape_model(tmp_path)
    assert model.meta["batches_run"] is False
    with pytest.raises(gp.GraphpruneError, match="fixes its batch at 1"):
        optimize(model, TinySet(torch.zeros(8, 4, 2, 2), torch.full((8,), -1)), OptimizeConfig(latency_cut=0.2))


def test_a_resize_to_constant_sizes_with_the_batch_baked_in_runs_batches(tmp_path):
    """Conv -> Resize(sizes=[1, 4, 8, 8]) on a (1, 3, 4, 4) input: what a segmentation head exported
    with a fixed batch becomes once the shape arithmetic is folded."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([1, 4, 8, 8], dtype=np.int64), "sizes")]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["X", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Resize", ["c", "", "", "sizes"], ["Y"], mode="linear")],
        "seg", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4, 8, 8])], initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 7
    onnx.save(proto, str(tmp_path / "seg.onnx"))
    model = gp.load(tmp_path / "seg.onnx")
    assert model.meta["batches_run"] is True
    x = torch.randn(3, 3, 4, 4)
    together = model.run(x)
    assert together.shape == (3, 4, 8, 8)
    session = ort.InferenceSession(str(tmp_path / "seg.onnx"), providers=["CPUExecutionProvider"])
    for i in range(3):
        (alone,) = session.run(None, {"X": x[i:i + 1].numpy()})
        np.testing.assert_allclose(together[i:i + 1].numpy(), alone, rtol=1e-4, atol=1e-5)


def test_an_op_without_converter_is_expanded_into_its_onnx_function(tmp_path):
    onnx.save(residual_onnx(opset=20, branch_activation="Gelu"), str(tmp_path / "gelu.onnx"))
    model = gp.load(tmp_path / "gelu.onnx")  # loading verifies the expansion against onnxruntime's Gelu
    (block,) = gp.find_blocks(model)
    assert block.name == "block" and block.kind == "identity"  # expanded nodes keep the Gelu's scope
    ops = {n.meta.get("onnx_op") for n in model.graph_module.graph.nodes}
    assert "Gelu" not in ops and "Erf" in ops
    x = torch.randn(2, 4, 8, 8)
    session = ort.InferenceSession(str(tmp_path / "gelu.onnx"), providers=["CPUExecutionProvider"])
    assert np.allclose(model.run(x).numpy(), session.run(None, {"X": x.numpy()})[0], atol=1e-5)
    gp.save(gp.drop_blocks(model, ["block"]), tmp_path / "out.onnx")
    assert default_opset(onnx.load(str(tmp_path / "out.onnx"))) == 20


def test_simplifying_keeps_the_exporters_node_metadata():
    from graphprune.formats.onnx_read import simplify

    proto = residual_onnx(opset=20, branch_activation="Gelu")
    shape = numpy_helper.from_array(np.array([2, 2], dtype=np.int64), "two")  # foldable: onnxsim changes the graph
    proto.graph.initializer.append(shape)
    proto.graph.node.insert(0, helper.make_node("Add", ["two", "two"], ["four"], name="/fold/Add"))
    proto.graph.output.append(helper.make_tensor_value_info("four", TensorProto.INT64, [2]))
    for node in proto.graph.node:
        onnx.helper.set_metadata_props(node, {"pkg.torch.onnx.name_scopes": f"['', '{node.name}']"})
    simplified = simplify(proto, fuse=False)
    assert len(simplified.graph.node) < len(proto.graph.node)
    for node in simplified.graph.node:
        assert {p.key: p.value for p in node.metadata_props} == {"pkg.torch.onnx.name_scopes": f"['', '{node.name}']"}


def test_a_simplification_onnxruntime_does_not_run_alike_is_not_used(monkeypatch):
    """PP-OCRv4's recogniser (width fixed at 320): onnx's shape inference makes 39 of its 40
    positions, and onnxsim wrote a Concat onnxruntime refused and a Reshape to 39 that fails at run
    time. A simplification onnxruntime refuses, or that computes otherwise, is not used."""
    import onnxsim

    from graphprune.formats.onnx_read import simplify

    proto = residual_onnx(opset=17)

    def contradicting(model, **_):
        broken = onnx.ModelProto()
        broken.CopyFrom(model)
        broken.graph.node[0].op_type = "Conv2dThatIsNot"  # any graph onnxruntime cannot make a session of
        return broken, True

    def computing_otherwise(model, **_):
        changed = onnx.ModelProto()
        changed.CopyFrom(model)
        weight = changed.graph.initializer[0]
        weight.CopyFrom(numpy_helper.from_array(1.5 * numpy_helper.to_array(weight), weight.name))
        return changed, True

    for broken in (contradicting, computing_otherwise):
        monkeypatch.setattr(onnxsim, "simplify", broken)
        assert simplify(proto, fuse=False) is proto
    monkeypatch.setattr(onnxsim, "simplify", lambda model, **_: (model, True))
    assert simplify(proto, fuse=False) is not proto  # one onnxruntime takes is used


def test_default_valued_new_attributes_and_split_outputs_lower_to_opset_17(tmp_path):
    """What the dynamo exporter writes for a segmentation head and ShuffleNet's channel split:
    Resize-19 with antialias=0 and keep_aspect_ratio_policy='stretch' (their defaults; refused as
    new attributes) and Split-18 with num_outputs (refused: Split-13 takes sizes). Structural: the
    node keeps no default-only attribute, the Split gets sizes; numerical: onnxruntime's values."""
    resize = _schema_node("Resize", ["x", "", "scales"], mode="linear", antialias=0, keep_aspect_ratio_policy="stretch")
    lowered = _downgrade_node(resize, 20, 17, {})
    assert {a.name for a in lowered.attribute} == {"mode"}
    assert _downgrade_node(_schema_node("Resize", ["x", "", "scales"], antialias=1), 20, 17, {}) is None
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], dtype=np.float32), "scales")
    graph = helper.make_graph(
        [helper.make_node("Split", ["X"], ["a", "b"], axis=1, num_outputs=2),
         helper.make_node("Resize", ["a", "", "scales"], ["up"], mode="linear", antialias=0,
                          keep_aspect_ratio_policy="stretch"),
         helper.make_node("Resize", ["b", "", "scales"], ["up_b"], mode="nearest"),
         helper.make_node("Sub", ["up", "up_b"], ["Y"])],
        "split_resize", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 6, 8, 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 3, 16, 16])], initializer=[scales])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    proto.ir_version = 9
    onnx.save(proto, str(tmp_path / "m.onnx"))
    model = gp.load(tmp_path / "m.onnx")
    x = torch.randn(1, 6, 8, 8)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(model.run(x).numpy(), session.run(None, {"X": x.numpy()})[0], rtol=1e-5, atol=1e-5)


def test_the_refusal_names_only_the_ops_with_no_older_form(tmp_path, cli):
    """A Pad with an axes input (no form before opset 18) next to a ReduceMean-18 (which lowers):
    the message named both ('ReduceMean-20, Pad-20'), as it named ReduceMean-20 for LR-ASPP."""
    inits = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
             (("axes", [2, 3]), ("pads", [1, 1]), ("pad_axes", [3]))]
    graph = helper.make_graph(
        [helper.make_node("Pad", ["X", "pads", "", "pad_axes"], ["p"]),
         helper.make_node("ReduceMean", ["p", "axes"], ["Y"], keepdims=1)],
        "pad", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 3, 1, 1])], initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    proto.ir_version = 9
    onnx.save(proto, str(tmp_path / "pad.onnx"))
    code, _, err = cli("inspect", tmp_path / "pad.onnx")
    assert code == 1 and err.strip().endswith("unsupported ONNX ops in " + str(tmp_path / "pad.onnx") + ": Pad-20")
