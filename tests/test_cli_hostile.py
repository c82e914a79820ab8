"""Hostile values a user can give the command line, each refused in one line before any work (or,
for the valid ones, handled): found by a sweep of some 300 cases through the CLI."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_builders import residual_onnx, save, with_metadata
from test_cli import _assert_clean_failure


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    images = np.random.default_rng(0).integers(0, 256, (24, 8, 8, 4), dtype=np.uint8)  # RGBA, as the model takes
    np.savez(folder / "tiny.npz", images=images)
    np.savez(folder / "huge_labels.npz", images=images, labels=np.full(24, 2**63 + 5, dtype=np.uint64))
    (folder / "cut.toml").write_text("latency-cut = [0.2]\n")
    (folder / "path.toml").write_text("eval-data = 5\n")
    return folder, Path(save(residual_onnx(), folder / "m.onnx"))


def _optimize(cli, inputs, tmp_path, *extra, data="tiny.npz"):
    folder, model = inputs
    out = tmp_path / "o.onnx"
    argv = ["optimize", model, "--latency-cut", "0.2", "--data", folder / data, "-o", out, "--no-cache", "--quiet"]
    four_channels = ("--mean", "0,0,0,0", "--std", "1,1,1,1")
    return cli(*argv, *(extra if "--mean" in extra or "--std" in extra else (*extra, *four_channels))), out


@pytest.mark.parametrize("extra, expected", [
    (("--recovery-lr", "nan"), "--recovery-lr: must be above 0 and at most 10, got 'nan'"),  # nan passed x > 0
    (("--min-time", "nan"), "--min-time: must be a positive number"),  # timed 100000 runs, or hung
    (("--margin", "inf"), "--margin: must be 0 or more"),
    (("--mean", "nan,nan,nan"), "--mean: must be finite numbers"),
    (("--std", "inf,inf,inf"), "--std: must be finite numbers"),
    (("--seed", "-1"), "--seed: must be an integer from 0 to 2**32 - 1"),  # was numpy's ValueError
    (("--seed", "99999999999999999999999"), "--seed: must be an integer from 0 to 2**32 - 1"),
    (("--threads", "100000"), "--threads: must be an integer from 1 to 256"),  # ran past 5 minutes
])
def test_non_finite_and_out_of_range_numbers_are_usage_errors(cli, inputs, tmp_path, extra, expected):
    result, out = _optimize(cli, inputs, tmp_path, *extra)
    _assert_clean_failure(result, expected, out, exit_code=2)


@pytest.mark.parametrize("extra, expected", [
    (("--train-device", "cuda:7"), "--train-device 'cuda:7' is not here"),  # was torch's RuntimeError
    (("--train-device", "bogus"), "unknown --train-device 'bogus'"),
    (("--feature-node", ","), "--feature-node ',' names no node"),  # was ZeroDivisionError
])
def test_bad_devices_and_node_lists_are_one_line(cli, inputs, tmp_path, extra, expected):
    result, out = _optimize(cli, inputs, tmp_path, *extra)
    _assert_clean_failure(result, expected, out)


def test_labels_beyond_any_class_index_are_one_line(cli, inputs, tmp_path):
    result, out = _optimize(cli, inputs, tmp_path, data="huge_labels.npz")  # was an OverflowError in torch
    _assert_clean_failure(result, "labels are class indices up to 2147483647, got 9223372036854775813", out)


@pytest.mark.parametrize("config, expected", [
    ("cut.toml", "'latency-cut' must be a number, got list [0.2]"),
    ("path.toml", "'eval-data' must be a string, got int 5"),  # was a TypeError from click.Path
])
def test_config_values_of_the_wrong_type_are_usage_errors(cli, inputs, tmp_path, config, expected):
    folder, model = inputs
    out = tmp_path / "o.onnx"
    result = cli("optimize", model, "--config", folder / config, "--data", folder / "tiny.npz", "-o", out)
    _assert_clean_failure(result, expected, out)


@pytest.mark.parametrize("flag", ["--report", "--plot"])
def test_a_report_or_plot_never_overwrites_the_input_or_the_output(cli, inputs, tmp_path, flag):
    folder, model = inputs
    copy = tmp_path / "in.onnx"
    copy.write_bytes(model.read_bytes())
    out = tmp_path / "o.onnx"
    result = cli("optimize", copy, "--latency-cut", "0.2", "--data", folder / "tiny.npz", "-o", out, flag, copy)
    _assert_clean_failure(result, "refusing to overwrite the input model", out)
    assert copy.read_bytes() == model.read_bytes()
    result = cli("optimize", copy, "--latency-cut", "0.2", "--data", folder / "tiny.npz", "-o", out, flag, out)
    _assert_clean_failure(result, f"-o, {flag} must be different files", out)


def test_int8_to_a_pt2_output_is_refused_before_the_run(cli, inputs, tmp_path):
    folder, model = inputs
    out = tmp_path / "o.pt2"  # an int8 model is ONNX: the run wrote o.onnx and said so only at the end
    result = cli("optimize", model, "--latency-cut", "0.2", "--data", folder / "tiny.npz", "-o", out,
                 "--quantize", "int8")
    _assert_clean_failure(result, "--quantize int8 writes ONNX", out, exit_code=2)
    assert not (tmp_path / "o.onnx").exists()


def test_a_truncated_pt2_is_one_line(cli, tmp_path):
    import torch

    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(torch.nn.Conv2d(3, 4, 3).eval(), (torch.randn(1, 3, 8, 8),)), str(path))
    path.write_bytes(path.read_bytes()[:2000])  # torch logged the archive's traceback (12 lines) as a warning first
    _assert_clean_failure(cli("inspect", path), "not a readable torch.export program")


def test_int8_for_a_model_whose_input_is_not_float_is_one_line(cli, inputs, tmp_path):
    """Calibration feeds images as floats: an int64 input was onnxruntime's INVALID_ARGUMENT."""
    import onnx
    from onnx import TensorProto, helper

    folder, _ = inputs
    model = residual_onnx()
    image = model.graph.input[0].name
    model.graph.node.insert(0, helper.make_node("Cast", ["ids"], [image], to=TensorProto.FLOAT))
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("ids", TensorProto.INT64, dims))
    onnx.checker.check_model(model)
    out = tmp_path / "o.onnx"
    result = cli("optimize", save(model, tmp_path / "ids.onnx"), "--latency-cut", "0.2", "--data", folder / "tiny.npz",
                 "-o", out, "--quantize", "int8", "--mean", "0,0,0,0", "--std", "1,1,1,1", "--no-cache", "--quiet")
    _assert_clean_failure(result, "this model's input is int64", out)


def test_an_input_shape_the_file_fixes_otherwise_is_named(cli, inputs):
    _, model = inputs  # (batch, 4, 8, 8): onnxruntime's refusal was cut before the indices it named
    _assert_clean_failure(cli("inspect", model, "--input-shape", "1,4,16,16"),
                          "does not fit input 'X' (?, 4, 8, 8): its dimension 2 is fixed at 8")


def test_messages_that_go_on_after_a_line_break_are_kept_whole(cli, tmp_path):
    model = residual_onnx()
    model.graph.node[1].input[0] = "does_not_exist"  # onnx's checker names the node on the next lines
    result = cli("inspect", save(model, tmp_path / "dangling.onnx"))
    _assert_clean_failure(result, "is not output of any previous nodes")


@pytest.mark.parametrize("command", ["drop", "export", "optimize"])
def test_an_output_of_another_kind_is_a_usage_error_in_every_command(cli, inputs, tmp_path, command):
    folder, model = inputs  # drop and export said so with exit 1, optimize with 2
    extra = {"drop": ("--blocks", "block"), "export": (),
             "optimize": ("--latency-cut", "0.2", "--data", folder / "tiny.npz")}
    result = cli(command, model, *extra[command], "-o", tmp_path / "o.txt")
    _assert_clean_failure(result, "must end in .onnx or .pt2, got", tmp_path / "o.txt", exit_code=2)


@pytest.mark.parametrize("opset", [8, 99])
def test_an_opset_out_of_range_is_named(cli, tmp_path, opset):
    model = residual_onnx()
    model.opset_import[0].version = opset  # 99: onnx's checker called it an unrecognized attribute
    _assert_clean_failure(cli("inspect", save(model, tmp_path / "m.onnx")), f"ONNX opset {opset} is not supported")


def test_weights_for_a_file_that_holds_its_own_are_refused(cli, inputs, tmp_path):
    _, model = inputs  # they were ignored without a word
    _assert_clean_failure(cli("export", model, "--weights", model, "-o", tmp_path / "o.onnx"),
                          "are for torchvision:/zoo: architectures", tmp_path / "o.onnx")


def test_written_files_get_the_mode_the_umask_gives(tmp_path):
    from graphprune.formats.model_io import atomic_write

    previous = os.umask(0o027)
    try:
        atomic_write(tmp_path / "a.bin", lambda path: path.write_bytes(b"x"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o640  # mkstemp's 0600 before


# Found by the second hostile sweep: each was an internal error, a late failure that left files
# behind, or an allocation no machine makes.

def test_a_hostile_model_file_is_one_line(cli, tmp_path):
    from onnx.external_data_helper import convert_model_to_external_data

    negative = residual_onnx()  # was numpy's "negative dimensions are not allowed"
    negative.graph.input[0].type.tensor_type.shape.dim[1].dim_value = -3
    _assert_clean_failure(cli("inspect", save(negative, tmp_path / "neg.onnx")), "declares a negative size")
    external = residual_onnx()  # a length that is not a number: was int()'s ValueError
    convert_model_to_external_data(external, location="w.bin", size_threshold=0)
    for tensor in external.graph.initializer:
        tensor.external_data.add(key="length", value="abc")
    (tmp_path / "ext.onnx").write_bytes(external.SerializeToString())  # onnx.save itself refuses the length
    (tmp_path / "w.bin").write_bytes(b"\0" * 64)
    _assert_clean_failure(cli("inspect", tmp_path / "ext.onnx"), "has a length that is not a size: 'abc'")
    huge = with_metadata(residual_onnx(dynamic_spatial=True), imgsz="[99999, 99999]")  # a warning, then the error
    _assert_clean_failure(cli("inspect", save(huge, tmp_path / "huge.onnx")), "the file's metadata (imgsz) gives")


@pytest.mark.parametrize("extra, expected", [
    (("--crop", "1e-9"), "--crop 1e-09 resizes each image to 8,000,000,000 pixels"),  # overflowed in torch
    (("--data-free", "--num-samples", "1000000000"), "lower --num-samples to at most"),  # 2.8 TiB
    (("--score-lr", "1e300"), "--score-lr: must be above 0 and at most 10"),  # float32 overflow in the optimizer
    (("--data-free", "--cache-dir", "FILE"), "cannot create cache folder"),  # was NotADirectoryError
    (("--report", "/proc/graphprune.json"), "--report: cannot write /proc/graphprune.json"),  # after the whole run
    (("--plot", "p" * 250 + ".png"), "--plot: cannot write"),  # a name too long: after the run, with -o left
])
def test_impossible_sizes_and_unwritable_places_are_one_line_before_the_run(cli, inputs, tmp_path, extra, expected):
    folder, model = inputs
    extra = [str(folder / "tiny.npz" / "cache") if e == "FILE" else e for e in extra]
    if "--plot" in extra:
        extra[extra.index("--plot") + 1] = str(tmp_path / extra[extra.index("--plot") + 1])
    if "/proc/graphprune.json" in extra and not Path("/proc").is_dir():
        pytest.skip("needs Linux's /proc: a folder no file can be made in")
    out = tmp_path / "o.onnx"
    argv = ["optimize", model, "--latency-cut", "0.2", "-o", out, "--no-cache", "--quiet", "--mean", "0,0,0,0",
            "--std", "1,1,1,1", *([] if "--data-free" in extra else ["--data", folder / "tiny.npz"]), *extra]
    if "--cache-dir" in extra:
        argv.remove("--no-cache")
    _assert_clean_failure(cli(*argv), expected, out)
    assert not list(tmp_path.iterdir())


def test_a_size_of_minus_one_is_read_as_dynamic(cli, tmp_path):
    """Paddle2ONNX writes a dynamic size as dim_value -1 (PaddleOCR's direction classifier in
    rapidocr-onnxruntime: x [-1, 3, ?, ?]); it was refused as a negative size."""
    model = residual_onnx()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    code, stdout, stderr = cli("inspect", save(model, tmp_path / "paddle.onnx"))
    assert code == 0 and "residual blocks" in stdout, stderr


def test_staged_writes_appear_together_or_not_at_all(tmp_path):
    """optimize writes the model, the report and the plot in one block: a report that failed after
    the model was written left the model behind (and a plot before a failing model)."""
    from graphprune.formats.model_io import atomic_write, staged_writes

    model, report = tmp_path / "m.onnx", tmp_path / "r.json"
    with pytest.raises(RuntimeError):
        with staged_writes():
            atomic_write(model, lambda tmp: tmp.write_bytes(b"model"))
            assert not model.exists()  # still under its temporary name
            raise RuntimeError("the report failed")
    assert not list(tmp_path.iterdir())
    with staged_writes():
        atomic_write(model, lambda tmp: tmp.write_bytes(b"model"))
        atomic_write(report, lambda tmp: tmp.write_text("{}"))
    assert model.read_bytes() == b"model" and report.read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "r.json"]


# ---- --config files ------------------------------------------------------------------------------

def _config_failure(cli, path, expected):
    _assert_clean_failure(cli("optimize", "m.onnx", "-o", "o.onnx", "--config", path), expected, exit_code=2)


def test_a_config_that_is_not_a_regular_file_is_refused_unread(cli, tmp_path):
    import threading

    fifo = tmp_path / "run.toml"
    os.mkfifo(fifo)  # reading it waited forever for a writer: this one comes after 10 s, if still needed

    def unblock():
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader waiting: nothing to unblock
            pass
    writer = threading.Timer(10, unblock)
    writer.start()
    try:
        _config_failure(cli, fifo, "run.toml: not a regular file")
    finally:
        writer.cancel()
    device = tmp_path / "dev.yaml"
    device.symlink_to(os.devnull)  # /dev/zero or /dev/urandom: 4.7 GB read, then a MemoryError
    _config_failure(cli, device, "dev.yaml: not a regular file")


def test_a_config_larger_than_a_mebibyte_is_refused(cli, tmp_path):
    path = tmp_path / "big.toml"
    path.write_text("# padding\n" * 110_000)  # 1.1 MB of comments: valid TOML, but no config is that big
    _config_failure(cli, path, "big.toml: larger than 1 MiB")


@pytest.mark.parametrize("name, text", [
    ("deep.toml", "latency-cut = " + "[" * 100_000 + "]" * 100_000 + "\n"),
    ("deep_table.toml", "latency-cut = " + "{a=" * 30_000 + "1" + "}" * 30_000 + "\n"),
    ("deep.yaml", "latency-cut: " + "[" * 100_000 + "]" * 100_000 + "\n"),
])
def test_a_config_nested_too_deeply_is_one_line(cli, tmp_path, name, text):
    (tmp_path / name).write_text(text)  # the parsers recurse: it was an internal RecursionError
    _config_failure(cli, tmp_path / name, f"{name}: nested too deeply to read")


@pytest.mark.parametrize("name, text", [("long.toml", "seed = 9"), ("long.yaml", "seed: 9")])
def test_a_config_integer_of_too_many_digits_is_one_line(cli, tmp_path, name, text):
    (tmp_path / name).write_text(text + "9" * 5000 + "\n")  # Python's int() refuses it: was an internal ValueError
    _config_failure(cli, tmp_path / name, "Exceeds the limit (4300 digits)")


def _alias_bomb(levels: int, key: str = "latency-cut") -> str:
    """YAML of a few hundred bytes whose value, aliases written out, is 10**levels strings."""
    inner = '&a0 ["lol"]'
    for level in range(1, levels):
        inner = f"&a{level} [{inner}" + f", *a{level - 1}" * 9 + "]"
    return f"{key}: {inner}\n"


@pytest.mark.parametrize("key", ["latency-cut", "mean"])
def test_a_yaml_alias_bomb_is_refused_before_it_is_built(cli, tmp_path, key):
    path = tmp_path / "bomb.yaml"  # 9 levels: a 922 MB error line (latency-cut) or a MemoryError (mean)
    path.write_text(_alias_bomb(5, key))
    _config_failure(cli, path, "bomb.yaml: its aliases make more than 10000 values")
    path.write_text("a: &a [*a]\n")
    _config_failure(cli, path, "bomb.yaml: a value contains itself (through an alias)")


def test_a_yaml_alias_may_share_a_value(cli, tmp_path):
    path = tmp_path / "share.yaml"
    path.write_text("mean: &m [0.5, 0.5, 0.5]\nstd: *m\nlatency-cut: 0.2\n")  # read: the error is the next option's
    _assert_clean_failure(cli("optimize", "m.onnx", "-o", "o.onnx", "--config", path, "--threads", "0"),
                          "argument --threads: must be", exit_code=2)


LONG = "x" * 100_000


@pytest.mark.parametrize("extra, expected", [
    (("--seed", LONG), "argument --seed: must be an integer from 0 to 2**32 - 1, got 'xxx"),
    (("--mean", LONG), "argument --mean: must be comma-separated numbers, got 'xxx"),
    (("-o", LONG + ".txt"), "argument --output: must end in .onnx or .pt2, got 'xxx"),
    (("--data", LONG), "argument --data: Path 'xxx"),  # click's own message
    (("--data-free", "--passes", LONG), "unknown pass 'xxx"),  # a library message
])
def test_a_long_value_is_quoted_cut_short(cli, extra, expected):
    result = cli("optimize", "m.onnx", "--latency-cut", "0.2", "-o", "o.onnx", *extra)
    _assert_clean_failure(result, expected)
    assert len(result[2]) < 1100 and "..." in result[2]


def test_a_long_config_value_is_quoted_cut_short(cli, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(f"latency-cut = [{', '.join(['0.1'] * 100_000)}]\n")
    _config_failure(cli, path, "'latency-cut' must be a number, got list [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, ...]")
    assert len(cli("optimize", "m.onnx", "-o", "o.onnx", "--config", path)[2]) < 300


@pytest.mark.parametrize("text, expected", [
    ("latency-cut: 0.2\nlatency-cut: 0.3\n", "key 'latency-cut' is given twice (line 2)"),  # took the last
    ("recovery:\n  recovery-lr: 0.1\n  recovery-lr: 0.2\n", "key 'recovery-lr' is given twice (line 3)"),
])
def test_a_yaml_key_given_twice_is_refused_as_toml_refuses_it(cli, tmp_path, text, expected):
    (tmp_path / "twice.yaml").write_text(text)
    _config_failure(cli, tmp_path / "twice.yaml", expected)


def test_a_yaml_merge_key_may_repeat_a_key(cli, tmp_path):
    path = tmp_path / "merge.yaml"  # YAML's merge: the mapping's own key wins over the merged one
    path.write_text("recovery: {<<: {recovery-lr: 0.1}, recovery-lr: 0.2}\nlatency-cut: 0.2\n")
    _assert_clean_failure(cli("optimize", "m.onnx", "-o", "o.onnx", "--config", path, "--threads", "0"),
                          "argument --threads: must be", exit_code=2)


def test_an_uncomputed_output_and_an_unfed_input_type_are_named(cli, tmp_path):
    """An output that is the input itself or a weight was onnx2torch's "KeyError: 'X'"; a string or
    int8 input was "unsupported element type 8"."""
    echo = residual_onnx()
    echo.graph.output.append(echo.graph.input[0])
    _assert_clean_failure(cli("inspect", save(echo, tmp_path / "echo.onnx")),
                          f"output '{echo.graph.input[0].name}' of {tmp_path / 'echo.onnx'} is not computed by the graph")
    text = residual_onnx()
    text.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.STRING
    _assert_clean_failure(cli("inspect", save(text, tmp_path / "text.onnx")), "is of element type STRING")
