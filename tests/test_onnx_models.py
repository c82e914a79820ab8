"""Well-formed ONNX files a deployment pipeline holds: weights computed by constant subgraphs
(onnx's light_* models), norms and pools whose input rank shape inference cannot give (PaddleOCR's
SVTR recogniser), and dynamic spatial sizes taken from the file's own record (ultralytics' imgsz)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import graphprune as gp
from graphprune.errors import GraphpruneError
from graphprune.formats.onnx_converters import AnyRankBatchNorm
from graphprune.formats.onnx_fold import fold_constants
from conftest import StemBlockHead
from onnx_builders import residual_onnx, save, unknown_rank_norm, with_metadata


def _ort(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _onnx_light_model(name: str) -> Path:
    path = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"light_{name}.onnx"
    if not path.is_file():
        pytest.skip(f"this onnx wheel does not ship {path.name}")
    return path


def _rapidocr_model(name: str) -> Path:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or spec.origin is None:
        pytest.skip("rapidocr-onnxruntime is not installed (it ships PaddleOCR's PP-OCRv4 ONNX models)")
    path = Path(spec.origin).parent / "models" / name
    if not path.is_file():
        pytest.skip(f"this rapidocr-onnxruntime does not ship {name}")
    return path


# --- weights made by constant subgraphs ------------------------------------------------------

def test_computed_weights_are_folded_into_initializers(tmp_path):
    source = residual_onnx(opset=9, weights_as="computed")
    path = save(source, tmp_path / "computed.onnx")
    model = gp.load(path)
    folded = model.onnx.proto
    assert not {"ConstantOfShape", "Mul"} & {n.op_type for n in folded.graph.node}
    assert {"w1", "w2", "fc", "fcb"} <= {t.name for t in folded.graph.initializer}
    assert folded.ir_version >= 4  # an IR-3 file without its initializer inputs is raised, so checks pass
    assert [b.name for b in gp.find_blocks(model)] == ["block"]
    x = torch.randn(2, 4, 8, 8)
    assert np.allclose(_ort(path, x), model.run(x).numpy(), atol=1e-5)  # the file's own values
    out = tmp_path / "dropped.onnx"
    dropped = gp.drop_blocks(model, ["block"])
    gp.save(dropped, out)
    assert np.allclose(_ort(out, x), dropped.run(x).numpy(), atol=1e-5)


def test_folding_leaves_what_it_cannot_bound():
    proto = residual_onnx(opset=9, weights_as="computed")
    shape = next(t for t in proto.graph.initializer if t.name == "w1_shape")
    shape.CopyFrom(onnx.numpy_helper.from_array(np.array([2**20, 2**20, 3, 3], np.int64), "w1_shape"))
    assert fold_constants(proto) == 6  # the other three weights' ConstantOfShape and Mul
    assert [n.op_type for n in proto.graph.node if "w1" in n.output[0]] == ["ConstantOfShape", "Mul"]


def test_load_fails_in_one_line_where_a_weight_stays_computed(tmp_path):
    proto = residual_onnx(opset=9, weights_as="computed")
    next(n for n in proto.graph.node if n.op_type == "ConstantOfShape").input[0] = "X"  # not constant
    with pytest.raises(GraphpruneError) as error:
        gp.load(save(proto, tmp_path / "bad.onnx"))
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_onnx_light_resnet50_loads_with_its_blocks():
    model = gp.load(_onnx_light_model("resnet50"))  # converted and checked against onnxruntime
    assert not any(n.op_type == "ConstantOfShape" for n in model.onnx.proto.graph.node)
    blocks = gp.find_blocks(model)
    assert len(blocks) == 16 and [b.kind for b in blocks].count("projection") == 4


# --- norms and pools of unknown input rank ---------------------------------------------------

def test_batch_norm_of_unknown_rank_converts_and_its_weights_are_written_back(tmp_path):
    path = save(unknown_rank_norm("BatchNormalization"), tmp_path / "bn.onnx")
    model = gp.load(path)
    (norm,) = [m for m in model.graph_module.modules() if isinstance(m, AnyRankBatchNorm)]
    x = torch.randn(3, 4, 8, 8)
    assert np.allclose(_ort(path, x), model.run(x).numpy(), atol=1e-5)
    with torch.no_grad():
        norm.weight.mul_(1.5)
        norm.running_mean.add_(0.25)
    out = tmp_path / "scaled.onnx"
    gp.save(model, out)
    assert np.allclose(_ort(out, x), model.run(x).numpy(), atol=1e-5)
    assert not np.allclose(_ort(out, x), _ort(path, x), atol=1e-3)


def test_pool_of_unknown_rank_takes_it_from_its_kernel(tmp_path):
    path = save(unknown_rank_norm("MaxPool"), tmp_path / "pool.onnx")
    model = gp.load(path)
    x = torch.randn(2, 4, 8, 8)
    assert tuple(model.run(x).shape) == (2, 4, 16, 2)
    assert np.allclose(_ort(path, x), model.run(x).numpy(), atol=1e-6)


@pytest.mark.slow
def test_ppocr_recogniser_loads_and_a_transformer_block_drops(tmp_path):
    path = _rapidocr_model("ch_PP-OCRv4_rec_infer.onnx")
    model = gp.load(path, input_shape=(1, 3, 48, 320))
    blocks = gp.find_blocks(model)
    assert len(blocks) == 4 and all(b.output_shape == (1, 40, 120) for b in blocks)  # 2 layers: attention, MLP
    dropped = gp.drop_blocks(model, [blocks[1].name], blocks)
    out = tmp_path / "rec.small.onnx"
    gp.save(dropped, out)
    x = torch.rand(1, 3, 48, 320)
    assert np.allclose(_ort(out, x), dropped.run(x).numpy(), atol=1e-4)
    assert _ort(out, torch.rand(2, 3, 48, 200)).shape[:2] == (2, 25)  # width stays dynamic


# --- where the input shape comes from ---------------------------------------------------------

def test_an_ultralytics_file_is_read_with_inputs_in_0_1_unless_mean_and_std_are_given(tmp_path, caplog):
    from graphprune.data import Preprocessing
    from graphprune.optimize import image_input_shape, with_recorded_normalisation

    model = gp.load(save(with_metadata(residual_onnx(), author="Ultralytics"), tmp_path / "u.onnx"))
    assert model.meta["recorded_normalisation"]["source"] == "metadata:author Ultralytics"
    prep = Preprocessing(image_input_shape(model))
    with caplog.at_level(logging.WARNING, logger="graphprune"):
        read = with_recorded_normalisation(prep, model, given=False)
    channels = prep.size[0]
    assert read.mean == (0.0,) * channels and read.std == (1.0,) * channels and read.size == prep.size
    assert any("mean 0, std 1" in r.getMessage() and "--mean" in r.getMessage() for r in caplog.records)
    assert with_recorded_normalisation(prep, model, given=True) is prep  # the user's --mean/--std win
    plain = gp.load(save(with_metadata(residual_onnx(), author="someone"), tmp_path / "p.onnx"))
    assert plain.meta["recorded_normalisation"] is None and with_recorded_normalisation(prep, plain, False) is prep


def test_imgsz_metadata_gives_the_input_shape(tmp_path, caplog):
    path = save(with_metadata(residual_onnx(dynamic_spatial=True), imgsz="[12, 10]"), tmp_path / "m.onnx")
    with caplog.at_level(logging.INFO, logger="graphprune"):
        model = gp.load(path)
    assert model.input_shape == (1, 4, 12, 10) and model.meta["input_shape_source"] == "metadata:imgsz"
    assert [r.levelname for r in caplog.records if "imgsz" in r.getMessage()] == ["WARNING"]
    (block,) = gp.find_blocks(model)
    assert block.input_shape == (1, 4, 12, 10)
    x = torch.randn(2, 4, 12, 10)
    assert np.allclose(_ort(path, x), model.run(x).numpy(), atol=1e-5)


def test_given_input_shape_wins_over_the_metadata(tmp_path):
    path = save(with_metadata(residual_onnx(dynamic_spatial=True), imgsz="640"), tmp_path / "m.onnx")
    model = gp.load(path, input_shape=(1, 4, 16, 16))
    assert model.input_shape == (1, 4, 16, 16) and model.meta["input_shape_source"] == "input_shape"
    assert gp.load(save(residual_onnx(), tmp_path / "static.onnx")).meta["input_shape_source"] == "declared"


@pytest.mark.parametrize("imgsz", [None, "[640, 'x']", "oops(", "[0, 640]", "[1, 2, 3]"])
def test_without_a_usable_shape_the_one_line_error_stays(tmp_path, imgsz):
    proto = residual_onnx(dynamic_spatial=True)
    model = gp.load(save(with_metadata(proto, imgsz=imgsz) if imgsz else proto, tmp_path / "m.onnx"))
    assert model.input_shape is None and model.meta["input_shape_source"] is None
    with pytest.raises(GraphpruneError, match="pass input_shape") as error:
        gp.find_blocks(model)
    assert error.value.parameter == "input_shape"  # the CLI writes it as --input-shape
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("bound_as", ["initializer", "constant"])
@pytest.mark.parametrize("absent", ["min", "max"])
def test_a_clip_with_one_bound_converts_and_is_written_back(tmp_path, bound_as, absent):
    """Both torch exporters write clamp(max=c) as Clip(x, "", c): onnx2torch looked the absent
    bound up as a tensor and refused the whole model ("Dynamic value of min/max")."""
    proto = residual_onnx()
    graph = proto.graph
    graph.node[-1].output[0] = "logits"
    bound = np.array(0.0, np.float32)  # min 0 converts to a ReLU, max 0 to a clamp
    if bound_as == "initializer":
        graph.initializer.append(onnx.numpy_helper.from_array(bound, "bound"))
    else:
        graph.node.append(onnx.helper.make_node("Constant", [], ["bound"], value=onnx.numpy_helper.from_array(bound)))
    inputs = ["logits", "", "bound"] if absent == "min" else ["logits", "bound"]
    graph.node.append(onnx.helper.make_node("Clip", inputs, ["Y"], name="/clip"))
    path = save(proto, tmp_path / "clip.onnx")
    model = gp.load(path)
    x = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = _ort(path, x)
    assert (expected == 0).any() and (expected != 0).any()  # the bound bites
    assert np.allclose(model.run(x).numpy(), expected, atol=1e-5)
    smaller = gp.drop_blocks(model, ["block"], gp.find_blocks(model))
    gp.save(smaller, tmp_path / "smaller.onnx")
    assert np.allclose(_ort(tmp_path / "smaller.onnx", x), smaller.run(x).numpy(), atol=1e-5)


class _Uint8Input(StemBlockHead):
    """Takes uint8 pixels (N, 3, H, W) and scales them itself, as camera and edge exports do."""

    def before(self, x):
        return x.float() / 255


def test_a_uint8_input_takes_pixels_and_its_file_is_fed_them_rounded(tmp_path, caplog):
    """ImageNet-normalised values (-2.1 to 2.6) reached a graph that divides by 255; a uint8 input
    now reads pixels 0 to 255 unless --mean/--std say otherwise, and onnxruntime gets them as uint8."""
    import io

    from PIL import Image

    from graphprune.data import Preprocessing, load_tiny_set
    from graphprune.evaluate import evaluate, evaluate_onnx
    from graphprune.optimize import image_input_shape, with_recorded_normalisation

    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.onnx.export(_Uint8Input().eval(), (torch.zeros(1, 3, 16, 16, dtype=torch.uint8),), buffer, dynamo=False,
                      input_names=["pixels"], dynamic_axes={"pixels": {0: "batch"}}, opset_version=17)
    path = save(onnx.load_from_string(buffer.getvalue()), tmp_path / "u8.onnx")
    model = gp.load(path)
    assert model.meta["recorded_normalisation"]["source"] == "input type uint8"
    with caplog.at_level(logging.WARNING, logger="graphprune"):
        prep = with_recorded_normalisation(Preprocessing(image_input_shape(model)), model, given=False)
    assert prep.mean == (0.0,) * 3 and prep.std == (1 / 255,) * 3
    assert any("std 1/255 (inputs in [0, 255]) from the file's input type uint8" in r.getMessage()
               for r in caplog.records)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):
        pixels = np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    tiny = load_tiny_set(folder, prep)
    assert float(tiny.images.min()) >= 0 and float(tiny.images.max()) > 200  # pixels, not normalised values
    smaller = gp.drop_blocks(model, ["block"], gp.find_blocks(model))
    gp.save(smaller, tmp_path / "smaller.onnx")
    fx, written = evaluate(smaller, tiny, model), evaluate_onnx(onnx.load(str(tmp_path / "smaller.onnx")), tiny, model)
    (name,) = fx["outputs"]
    assert fx["outputs"][name]["relative_error"] > 0.01  # the block mattered on these pixels
    assert written["outputs"][name]["relative_error"] == pytest.approx(fx["outputs"][name]["relative_error"], rel=1e-4)


def test_an_already_quantised_file_is_named_as_such(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = save(residual_onnx(), tmp_path / "float.onnx")
    quantize_dynamic(source, str(tmp_path / "dyn.onnx"), weight_type=QuantType.QUInt8, op_types_to_quantize=["Conv"])
    with pytest.raises(GraphpruneError, match=r"dyn.onnx is already quantised \(.*ConvInteger.*\): give graphprune "
                                              r"the float model"):
        gp.load(tmp_path / "dyn.onnx")


@pytest.mark.parametrize("condition", [True, False])
def test_an_if_with_a_constant_condition_is_its_branch(tmp_path, condition):
    """onnx2torch converts no control flow: a file holding an If was refused whole. With a constant
    condition the branch it always takes replaces it (here: Softmax or Identity after the head)."""
    from onnx import TensorProto, helper, numpy_helper

    proto = residual_onnx()
    graph = proto.graph
    graph.node[-1].output[0] = "scores"
    graph.initializer.append(numpy_helper.from_array(np.array(condition), "use_softmax"))
    branch = lambda op, out, **kw: helper.make_graph(  # noqa: E731
        [helper.make_node(op, ["scores"], [out], **kw)], op, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])
    graph.node.append(helper.make_node("If", ["use_softmax"], ["Y"], name="/head/If",
                                       then_branch=branch("Softmax", "p_then", axis=1),
                                       else_branch=branch("Identity", "p_else")))
    path = save(proto, tmp_path / "if.onnx")
    model = gp.load(path)
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = _ort(path, x)
    assert np.allclose(expected.sum(1), 1, atol=1e-5) == condition  # the branch it takes
    assert np.allclose(model.run(x).numpy(), expected, atol=1e-5)
    smaller = gp.drop_blocks(model, ["block"], gp.find_blocks(model))
    gp.save(smaller, tmp_path / "smaller.onnx")
    assert np.allclose(_ort(tmp_path / "smaller.onnx", x), smaller.run(x).numpy(), atol=1e-5)
    computed = onnx.load(path)  # a condition computed from the input stays refused, in one line
    computed.graph.node.insert(0, helper.make_node("ReduceMax", ["X"], ["peak"], keepdims=0))
    computed.graph.node.insert(1, helper.make_node("Greater", ["peak", "zero"], ["computed"]))
    computed.graph.initializer.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
    computed.graph.node[-1].input[0] = "computed"
    with pytest.raises(GraphpruneError, match="unsupported ONNX ops in .*If"):
        gp.load(save(computed, tmp_path / "computed.onnx"))


def test_a_training_mode_export_is_named_as_such(tmp_path):
    """onnx2torch said "BatchNorm operation with mean/var output is not implemented"."""
    import io

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).train()
    buffer = io.BytesIO()
    torch.onnx.export(net, (torch.randn(2, 3, 8, 8),), buffer, dynamo=False, opset_version=13,
                      training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False)
    with pytest.raises(GraphpruneError, match="was exported in training mode .*: export it after model.eval"):
        gp.load(save(onnx.load_from_string(buffer.getvalue()), tmp_path / "train.onnx"))
