"""The command line: tables, JSON, and one clear line (no traceback, no file) for bad input."""

from __future__ import annotations

import json

import onnx
import pytest

from onnx_builders import channels_last_residual, residual_onnx, save


def test_inspect_table_and_json(cli):
    code, out, err = cli("inspect", "zoo:cifar10_resnet20")
    assert code == 0 and "layer2.0" in out and "shortcut" in out and "9 residual blocks" in out
    code, out, err = cli("inspect", "zoo:cifar10_resnet20", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["model"] == "zoo:cifar10_resnet20" and len(doc["blocks"]) == 9
    first = doc["blocks"][0]
    assert set(first) == {"name", "kind", "input_shape", "output_shape", "params", "macs"}
    assert first["input_shape"] == [1, 16, 32, 32] and first["params"] == 4672


def test_drop_writes_a_model_that_inspect_reads(cli, tmp_path):
    src = save(residual_onnx(), tmp_path / "m.onnx")
    out = tmp_path / "small.onnx"
    code, stdout, err = cli("drop", src, "--blocks", "block", "-o", out)
    assert code == 0 and out.exists(), err
    code, stdout, err = cli("inspect", out)
    assert code == 0 and "no residual blocks" in stdout


def _assert_clean_failure(result, expected: str, output=None, exit_code=None):
    code, out, err = result
    assert code != 0 if exit_code is None else code == exit_code
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    assert "Traceback" not in err and expected in lines[0], lines[0]
    if output is not None:
        assert not output.exists()
        assert not [p for p in output.parent.iterdir() if p.name.startswith("." + output.name)]


def test_missing_file(cli, tmp_path):
    _assert_clean_failure(cli("inspect", tmp_path / "nope.onnx"), "not found")


def test_empty_file(cli, tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    _assert_clean_failure(cli("inspect", tmp_path / "empty.onnx"), "empty")


def test_truncated_file(cli, tmp_path):
    data = residual_onnx().SerializeToString()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    out = tmp_path / "o.onnx"
    _assert_clean_failure(cli("drop", tmp_path / "cut.onnx", "--blocks", "block", "-o", out), "ONNX", out)


def test_not_onnx(cli, tmp_path):
    (tmp_path / "text.onnx").write_text("hello, I am not a model\n" * 10)
    _assert_clean_failure(cli("inspect", tmp_path / "text.onnx"), "ONNX")


def test_unsupported_op_is_named(cli, tmp_path):
    model = residual_onnx(extra_op="Relu")
    model.graph.node[-2].op_type = "FancyUnknownOp"
    model.graph.node[-2].domain = "com.example"
    model.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    path = tmp_path / "odd.onnx"
    onnx.save(model, str(path))
    _assert_clean_failure(cli("inspect", path), "FancyUnknownOp")


def test_unknown_block_lists_available(cli, tmp_path):
    src = save(residual_onnx(), tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    _assert_clean_failure(cli("drop", src, "--blocks", "nope", "-o", out), "available: block", out)


def test_no_residual_blocks_on_drop(cli, tmp_path):
    out = tmp_path / "o.onnx"
    _assert_clean_failure(cli("drop", "torchvision:squeezenet1_1", "--input-shape", "1,3,64,64", "--blocks", "x", "-o", out),
                          "no residual blocks", out)


def test_dynamic_spatial_dims_need_input_shape(cli, tmp_path):
    src = save(residual_onnx(dynamic_spatial=True), tmp_path / "dyn.onnx")
    _assert_clean_failure(cli("inspect", src), "--input-shape")
    code, out, err = cli("inspect", src, "--input-shape", "1,4,16,16")
    assert code == 0 and "block" in out and "1x4x16x16" in out


def test_output_folder_must_exist(cli, tmp_path):
    src = save(residual_onnx(), tmp_path / "m.onnx")
    _assert_clean_failure(cli("drop", src, "--blocks", "block", "-o", tmp_path / "no" / "o.onnx"), "does not exist")


def test_nan_weights(cli, tmp_path):
    model = residual_onnx()
    import numpy as np
    from onnx import numpy_helper

    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[0, 0, 0, 0] = np.nan
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, model.graph.initializer[0].name))
    path = save(model, tmp_path / "nan.onnx")
    _assert_clean_failure(cli("inspect", path), "NaN")


@pytest.mark.parametrize("argv,expected", [
    (("drop", "zoo:cifar10_resnet20", "-o", "x.onnx"), "--blocks"),
    (("inspect", "zoo:cifar10_resnet20", "--input-shape", "a,b"), "--input-shape"),
    (("frobnicate",), "invalid choice"),
])
def test_usage_errors_exit_2(cli, argv, expected):
    _assert_clean_failure(cli(*argv), expected, exit_code=2)


def test_external_data_outside_the_model_folder_is_refused(cli, tmp_path):
    from onnx.external_data_helper import convert_model_to_external_data

    model = residual_onnx()
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../secret/weights.bin"
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.onnx").write_bytes(model.SerializeToString())  # onnx.save would refuse it
    _assert_clean_failure(cli("inspect", tmp_path / "models" / "m.onnx"), "outside the model's folder")


def test_external_data_inside_the_folder_loads(cli, tmp_path):
    model = residual_onnx()
    onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.weights", size_threshold=0)
    code, out, err = cli("inspect", tmp_path / "m.onnx")
    assert code == 0 and "block" in out, err


def test_export_and_profile_bad_input(cli, tmp_path):
    _assert_clean_failure(cli("export", tmp_path / "none.onnx", "-o", tmp_path / "x.onnx"), "not found",
                          tmp_path / "x.onnx")
    _assert_clean_failure(cli("export", "zoo:cifar10_resnet20", "-o", tmp_path / "x.txt"), ".onnx or .pt2",
                          tmp_path / "x.txt")
    _assert_clean_failure(cli("profile", tmp_path / "none.onnx"), "not found")


def test_channels_last_input_is_optimised_and_kept(cli, tmp_path):
    src = save(channels_last_residual(), tmp_path / "nhwc.onnx")
    out = tmp_path / "o.onnx"
    code, _, err = cli("optimize", src, "--latency-cut", "0.05", "--quantize", "none", "--data-free",
                       "--synthetic", "procedural",
                       "--num-samples", "16", "--score-iterations", "2", "--recovery-iterations", "2",
                       "--min-time", "0.01", "--no-cache", "--quiet", "-o", out)
    assert code == 0, err
    written = onnx.load(str(out))
    assert [d.dim_value or d.dim_param for d in written.graph.input[0].type.tensor_type.shape.dim] == ["batch", 8, 8, 3]


def test_an_input_too_large_to_allocate_is_refused(cli, tmp_path):
    proto = residual_onnx()
    for dim, value in zip(proto.graph.input[0].type.tensor_type.shape.dim[2:], (100_000, 100_000)):
        dim.Clear()
        dim.dim_value = value
    src = save(proto, tmp_path / "huge.onnx")
    _assert_clean_failure(cli("inspect", src), "elements")


def test_optimize_refuses_a_second_input(cli, tmp_path):
    proto = residual_onnx()
    proto.graph.input.append(onnx.helper.make_tensor_value_info("scale", onnx.TensorProto.FLOAT, [1]))
    proto.graph.node.append(onnx.helper.make_node("Mul", ["Y", "scale"], ["Z"], name="/scale/Mul"))
    proto.graph.output[0].CopyFrom(onnx.helper.make_tensor_value_info("Z", onnx.TensorProto.FLOAT, ["batch", 3]))
    src = save(proto, tmp_path / "two.onnx")
    out = tmp_path / "o.onnx"
    _assert_clean_failure(cli("optimize", src, "--latency-cut", "0.1", "--data-free", "-o", out), "one image input", out)


@pytest.fixture(scope="module")
def eval_inputs(tmp_path_factory):
    """A classifier (10 classes, 3 x 32 x 32) and a detector (3 x 64 x 64), a tiny set, and
    evaluation sets neither can be scored on."""
    import numpy as np
    from PIL import Image

    from yolo_like import tiny_yolo_onnx

    folder = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    np.savez(folder / "tiny.npz", images=images)
    np.savez(folder / "two_channels.npz", images=images[..., :2])
    np.savez(folder / "labelled.npz", images=images, labels=np.arange(16) % 13)  # up to 12
    (folder / "broken").mkdir()
    for i in range(4):
        Image.fromarray(images[i]).save(folder / "broken" / f"{i}.png")
    (folder / "broken" / "labels.csv").write_text("file,class\n0.png,cat\n1.png,dog\n2.png,cat\n3.png,dog\n")
    for i, name in enumerate(("cat", "dog", "ship")):  # 3 of CIFAR-10's classes, by name: read as 0, 1, 2
        (folder / "named" / name).mkdir(parents=True)
        Image.fromarray(images[i]).save(folder / "named" / name / f"{i}.png")
    return folder, save(tiny_yolo_onnx(), folder / "yolo.onnx")


@pytest.mark.parametrize("model, eval_data, expected", [
    ("zoo:cifar10_resnet20", "two_channels.npz", "two_channels.npz: images have 2 channels; the model takes 3"),
    ("yolo", "labelled.npz", "labels cannot be scored against a detector; give the images without labels"),
    ("zoo:cifar10_resnet20", "broken", "labels.csv line 2: label 'cat' is not a non-negative integer"),
    ("zoo:cifar10_resnet20", "labelled.npz", "has labels up to 12, but the model's class scores have 10 classes"),
    ("zoo:cifar10_resnet20", "named", "3 class folders (cat, dog, ship) are read in sorted order as classes 0..2, "
                                      "but the model has 10 classes: name each folder by its class index"),
])
def test_eval_data_the_model_cannot_be_scored_on_fails_before_the_run(cli, eval_inputs, tmp_path, model,
                                                                      eval_data, expected):
    folder, yolo = eval_inputs
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    result = cli("optimize", yolo if model == "yolo" else model, "--latency-cut", "0.1", "--data", folder / "tiny.npz",
                 "--eval-data", folder / eval_data, "-o", out, "--report", report, "--no-cache", "--quiet")
    _assert_clean_failure(result, expected, out)
    assert not report.exists() and "block" not in result[1]  # nothing measured, no summary
