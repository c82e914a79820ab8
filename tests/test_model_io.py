"""Loading every supported format, and writing verified files atomically."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import graphprune as gp
from conftest import StemBlockHead, data_path
from graphprune.formats import model_io
from graphprune.zoo import CifarResNet
from onnx_builders import channels_last_residual, residual_onnx, save


def _ort(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("opset", [9, 11, 13, 17, 21, 24])
@pytest.mark.parametrize("weights_as", ["initializer", "constant", "input"])
def test_onnx_variants_load_find_and_drop(tmp_path, opset, weights_as):
    path = save(residual_onnx(opset, weights_as), tmp_path / "m.onnx")
    model = gp.load(path)
    (block,) = gp.find_blocks(model)
    assert block.name == "block" and block.kind == "identity"
    out = tmp_path / "dropped.onnx"
    gp.save(gp.drop_blocks(model, ["block"]), out)
    x = torch.randn(3, 4, 8, 8)
    assert np.allclose(_ort(out, x), gp.drop_blocks(model, ["block"]).run(x).numpy(), atol=1e-5)
    written = onnx.load(str(out))
    assert [n.op_type for n in written.graph.node].count("Conv") == 0
    if opset >= 13:  # a newer opset than onnx2torch covers is converted down to load, and back up to write
        assert [(o.domain, o.version) for o in written.opset_import] == [("", opset)]


def test_onnx_interface_is_preserved(tmp_path, torchvision_onnx):
    src = torchvision_onnx("resnet18")
    model = gp.load(src)
    out = tmp_path / "r18.onnx"
    gp.save(gp.drop_blocks(model, ["layer1.1", "layer3.0"]), out)
    written, original = onnx.load(str(out)), onnx.load(str(src))
    assert [i.name for i in written.graph.input] == [i.name for i in original.graph.input] == ["input"]
    assert [o.name for o in written.graph.output] == ["logits"]
    assert written.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    x = torch.randn(5, 3, 64, 64)
    assert _ort(out, x).shape == (5, 1000)


def test_weights_written_back_into_onnx(tmp_path):
    model = gp.load(save(residual_onnx(), tmp_path / "m.onnx"))
    with torch.no_grad():
        for p in model.graph_module.parameters():
            p.mul_(1.5)
    out = tmp_path / "scaled.onnx"
    gp.save(model, out)
    x = torch.randn(2, 4, 8, 8)
    assert np.allclose(_ort(out, x), model.run(x).numpy(), atol=1e-5)



def test_equal_tensors_of_one_node_are_written_back_separately(tmp_path):
    """Fresh BatchNorms (scale = var = 1, bias = mean = 0) in a pre-activation net stay ONNX
    BatchNormalization nodes, and the exporter shares their equal tensors; once each tensor has a
    value of its own (recovery trains the scale and bias and updates the statistics), every one
    must reach its own initializer."""
    from torch import nn

    class PreActivation(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.blocks = nn.ModuleList(nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
                                        for _ in range(2))
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            x = self.stem(x)
            for block in self.blocks:
                x = x + block(x)
            return self.head(x.mean((2, 3)))

    path = tmp_path / "preact.onnx"
    torch.onnx.export(PreActivation().eval(), torch.randn(1, 3, 8, 8), path, opset_version=13, dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {0: "N"}})
    model = gp.load(path)
    batchnorms = [m for m in model.graph_module.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(batchnorms) == 2
    with torch.no_grad():
        for k, bn in enumerate(batchnorms):
            for j, tensor in enumerate([bn.weight, bn.bias, bn.running_mean, bn.running_var]):
                tensor.copy_(torch.full_like(tensor, 0.5 + k + 0.25 * j))
    out = tmp_path / "written.onnx"
    gp.save(model, out)
    x = torch.randn(2, 3, 8, 8)
    assert np.allclose(_ort(out, x), model.run(x).numpy(), atol=1e-5)


def _as_float16(proto: onnx.ModelProto) -> onnx.ModelProto:
    for i, tensor in enumerate(proto.graph.initializer):
        if tensor.data_type == onnx.TensorProto.FLOAT:
            half = onnx.numpy_helper.to_array(tensor).astype(np.float16)
            proto.graph.initializer[i].CopyFrom(onnx.numpy_helper.from_array(half, tensor.name))
    for value in [*proto.graph.input, *proto.graph.output]:
        value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    onnx.checker.check_model(proto, full_check=True)
    return proto


def test_half_precision_file_is_computed_in_float32_and_written_back_in_half(tmp_path):
    src = save(_as_float16(residual_onnx()), tmp_path / "half.onnx")
    model = gp.load(src)
    assert model.inputs[0].dtype == torch.float32  # the tiny set is float32: so is the graph
    assert {p.dtype for p in model.graph_module.parameters()} == {torch.float32}
    x = torch.randn(2, 4, 8, 8)
    reference = _ort(src, x.half()).astype(np.float32)
    assert np.allclose(model.run(x).numpy(), reference, atol=2e-2 * max(1.0, np.abs(reference).max()))
    from graphprune.backends.base import LatencySettings, get_backend
    get_backend("onnxruntime").prepare(model, LatencySettings(batch_size=2, min_time_s=0.0))()  # fed in half
    with torch.no_grad():  # a "trained" weight change must reach the file, in the file's dtype
        for p in model.graph_module.parameters():
            p.mul_(1.5)
    out = tmp_path / "out.onnx"
    gp.save(model, out)
    written = onnx.load(str(out))
    assert written.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert {t.data_type for t in written.graph.initializer} == {onnx.TensorProto.FLOAT16}
    got = _ort(out, x.half()).astype(np.float32)
    assert np.allclose(got, model.run(x).numpy(), atol=2e-2 * max(1.0, np.abs(got).max()))


def test_channels_last_file_is_seen_channels_first_and_written_channels_last(tmp_path):
    src = save(channels_last_residual(), tmp_path / "nhwc.onnx")
    model = gp.load(src)
    assert model.inputs[0].shape == (None, 3, 8, 8)  # what the tiny set, crops and synthesis produce
    x = torch.randn(2, 3, 8, 8)
    assert np.allclose(model.run(x).numpy(), _ort(src, x.permute(0, 2, 3, 1).contiguous()), atol=1e-5)
    dropped = gp.drop_blocks(model, ["block"])
    out = tmp_path / "out.onnx"
    gp.save(dropped, out)
    written = onnx.load(str(out))
    assert [d.dim_value or d.dim_param for d in written.graph.input[0].type.tensor_type.shape.dim] == ["batch", 8, 8, 3]
    assert written.graph.node[0].op_type == "Transpose"  # the file's own first node, not a second permute
    assert np.allclose(_ort(out, x.permute(0, 2, 3, 1).contiguous()), dropped.run(x).numpy(), atol=1e-5)


def test_torch_module_to_onnx_and_pt2(tmp_path):
    model = gp.load("zoo:cifar10_resnet20")
    smaller = gp.drop_blocks(model, ["layer2.2"])
    x = torch.randn(2, 3, 32, 32)
    gp.save(smaller, tmp_path / "r20.onnx")
    assert np.allclose(_ort(tmp_path / "r20.onnx", x), smaller.run(x).numpy(), atol=1e-4)
    gp.save(smaller, tmp_path / "r20.pt2")
    reloaded = gp.load(tmp_path / "r20.pt2")
    assert torch.allclose(reloaded.run(x), smaller.run(x), atol=1e-5)
    assert len(gp.find_blocks(reloaded)) == 8
    gp.save(gp.drop_blocks(reloaded, [gp.find_blocks(reloaded)[0].name]), tmp_path / "again.pt2")
    assert (tmp_path / "again.pt2").stat().st_size > 0


def test_module_that_fx_cannot_trace_falls_back_to_torch_export():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.head = torch.nn.Linear(3, 2)  # a layer outside the block: it is not the whole network

        def forward(self, x):
            if x.shape[-1] > 4:  # control flow on a shape: fx symbolic tracing cannot follow it
                x = x + self.conv(x)
            return self.head(x.mean((2, 3)))

    model = gp.load(Branchy(), input_shape=(1, 3, 8, 8))
    assert len(gp.find_blocks(model)) == 1
    assert model.run(torch.randn(3, 3, 8, 8)).shape == (3, 2)  # exported with any batch, not the example's


def test_a_module_with_keyword_arguments_runs_batches():
    """fx cannot trace keyword arguments with defaults; the torch.export fallback exported the
    example's batch of 1, and every batch of the tiny set failed its guard (an AssertionError)."""
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.Linear(3, 2)

        def forward(self, x, scale: float = 1.0, features: bool = False):
            y = (x + self.conv(x)).mean((2, 3)) * scale
            return y if features else self.head(y)

    module = Scaled().eval()
    model = gp.load(module, input_shape=(1, 3, 8, 8))
    x = torch.randn(3, 3, 8, 8)
    assert len(gp.find_blocks(model)) == 1 and torch.allclose(model.run(x), module(x), atol=1e-6)


def test_failed_write_leaves_no_file_and_keeps_existing(tmp_path, monkeypatch):
    model = gp.load(save(residual_onnx(), tmp_path / "m.onnx"))
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous")

    def boom(*args, **kwargs):
        raise gp.GraphpruneError("verification failed")

    monkeypatch.setattr(model_io.io_onnx, "verify_against_onnxruntime", boom)
    with pytest.raises(gp.GraphpruneError):
        gp.save(model, target)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_interrupted_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "x.onnx"

    def write(tmp):
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        model_io.atomic_write(target, write)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_input(tmp_path):
    path = save(residual_onnx(), tmp_path / "m.onnx")
    with pytest.raises(gp.GraphpruneError, match="overwrite the input"):
        gp.save(gp.load(path), path)


def test_pickles_are_never_unpickled(tmp_path):
    path = tmp_path / "model.pth"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(gp.GraphpruneError, match="never unpickled"):
        gp.load(path)


def _cifar_test_set():
    data = np.load(data_path("cifar10", "test_lossless_1000.npz"))
    x = torch.tensor(data["images"]).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std, torch.tensor(data["labels"])


@pytest.mark.parametrize("depth,weights,accuracy", [(20, "resnet20-12fca82f.th", 0.915), (56, "resnet56-4bfd9763.th", 0.926)])
def test_pretrained_cifar_resnets_reach_reported_accuracy(depth, weights, accuracy):
    path = data_path("cifar10-resnet-akamaster", weights)
    model = gp.load(f"zoo:cifar10_resnet{depth}", weights=str(path))
    x, y = _cifar_test_set()
    top1 = (model.run(x).argmax(1) == y).float().mean().item()
    assert abs(top1 - accuracy) < 0.0015  # the data README's figure on the exact-pixel set


def test_state_dict_that_does_not_fit(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(CifarResNet(20).state_dict(), path)
    with pytest.raises(gp.GraphpruneError, match="do not fit"):
        gp.load("zoo:cifar10_resnet56", weights=str(path))


def test_optimize_refuses_a_graph_still_in_half_precision():
    from graphprune.data import TinySet
    from graphprune.errors import GraphpruneError
    from graphprune.optimize import OptimizeConfig, optimize

    model = gp.load("zoo:cifar10_resnet20")
    model.graph_module.half()  # what a file that casts to half inside is left as
    tiny = TinySet(torch.zeros(8, 3, 32, 32), torch.full((8,), -1))
    with pytest.raises(GraphpruneError, match="float32"):
        optimize(model, tiny, OptimizeConfig(latency_cut=0.2))


class _Shuffle(StemBlockHead):
    """A channel shuffle (ShuffleNet's: ``view(batch, groups, c, h, w)``) before the residual block."""

    def between(self, y):
        b, c, h, w = y.shape
        return y.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


@pytest.mark.parametrize("batch", ["fixed", "dynamic"])
def test_a_program_whose_sizes_carry_the_batch_runs_batches_and_is_written_batched(tmp_path, batch):
    """torch.export without dynamic_shapes writes the channel shuffle's view as view(1, 2, 4, h, w):
    such a .pt2 was refused ("exported with a fixed batch its graph depends on"); the leading 1 now
    reads the input's batch. Either program was written to ONNX with the example's batch baked in
    (TorchScript turned its sizes into constants: onnxruntime refused a batch of two), and a
    program with a bounded batch (Dim(max=512)) could not be written back as .pt2 with a dynamic one."""
    torch.manual_seed(0)
    module = _Shuffle().eval()
    if batch == "fixed":
        program = torch.export.export(module, (torch.randn(1, 3, 8, 8),))
    else:
        program = torch.export.export(module, (torch.randn(2, 3, 8, 8),),
                                      dynamic_shapes=({0: torch.export.Dim("batch", max=512)},))
    torch.export.save(program, tmp_path / "shuffle.pt2")
    model = gp.load(tmp_path / "shuffle.pt2")
    x = torch.randn(3, 3, 8, 8)
    assert torch.allclose(model.run(x), module(x), atol=1e-5)
    smaller = gp.drop_blocks(model, ["block"])
    gp.save(smaller, tmp_path / "small.onnx")
    session = ort.InferenceSession(str(tmp_path / "small.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.allclose(out, smaller.run(x).numpy(), atol=1e-5)
    gp.save(smaller, tmp_path / "small.pt2")
    assert torch.allclose(torch.export.load(str(tmp_path / "small.pt2")).module()(x), smaller.run(x), atol=1e-5)


def test_a_two_input_program_with_a_fixed_batch_loads(tmp_path, cli):
    """Checking whether its batch could be freed unpacked one input and raised an internal error."""
    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.head = torch.nn.Linear(3, 2)

        def forward(self, x, y):
            z = x + y
            return self.head((z + self.conv(z)).mean((2, 3)))

    path = tmp_path / "two.pt2"
    torch.export.save(torch.export.export(TwoInputs().eval(), (torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8))), path)
    model = gp.load(path)
    assert len(model.inputs) == 2 and len(gp.find_blocks(model)) == 1
    data = tmp_path / "tiny.npz"
    np.savez(data, images=np.zeros((20, 8, 8, 3), np.uint8))
    code, _, err = cli("optimize", path, "--latency-cut", "0.1", "--data", data, "-o", tmp_path / "o.pt2", "--no-cache")
    assert code == 1 and err.strip() == "graphprune: error: optimize needs a model with one image input; this one has 2 (x, y)"


def test_optimize_refuses_float64_weights_in_one_line(tmp_path, cli):
    """onnxruntime has no double convolution: the run failed later with its NOT_IMPLEMENTED."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU()).double().eval()
    path = tmp_path / "f64.pt2"
    torch.export.save(torch.export.export(net, (torch.randn(1, 3, 8, 8, dtype=torch.float64),)), path)
    data = tmp_path / "tiny.npz"
    np.savez(data, images=np.zeros((20, 8, 8, 3), np.uint8))
    code, _, err = cli("optimize", path, "--latency-cut", "0.1", "--data", data, "-o", tmp_path / "o.pt2", "--no-cache")
    assert code == 1 and "this model's are float64; export it after model.float()" in err and err.count("\n") == 1


class _Attention(torch.nn.Module):
    """Patches -> pre-norm attention and MLP blocks, as a small ViT."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 4, 4)
        self.n1, self.att = torch.nn.LayerNorm(16), torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.n2, self.mlp = torch.nn.LayerNorm(16), torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(),
                                                                        torch.nn.Linear(32, 16))
        self.fc = torch.nn.Linear(16, 3)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)
        h = self.n1(t)
        t = t + self.att(h, h, h, need_weights=False)[0]
        t = t + self.mlp(self.n2(t))
        return self.fc(t.mean(1))


def test_attention_with_layer_norms_is_written_to_onnx(tmp_path):
    """Written back by the TorchScript exporter, a LayerNorm reading an attention's output has no
    input rank shape inference can give: onnx2torch made its normalised shape empty, and saving
    failed with torch's RuntimeError instead of writing the file."""
    torch.manual_seed(0)
    model = gp.load(_Attention().eval(), input_shape=(1, 3, 16, 16))
    smaller = gp.drop_blocks(model, [gp.find_blocks(model)[-1].name])
    gp.save(smaller, tmp_path / "att.onnx")
    x = torch.randn(2, 3, 16, 16)
    session = ort.InferenceSession(str(tmp_path / "att.onnx"), providers=["CPUExecutionProvider"])
    assert np.allclose(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], smaller.run(x).numpy(),
                       atol=1e-5)


def test_an_exported_program_in_python_loads_as_its_pt2_would():
    """gp.load(torch.export.export(...)) raised torch's OSError: it took the program for a path."""
    module = CifarResNet(20).eval()
    program = torch.export.export(module, (torch.randn(1, 3, 32, 32),))
    model = gp.load(program)
    x = torch.randn(2, 3, 32, 32)
    assert len(gp.find_blocks(model)) == 9 and torch.allclose(model.run(x), module(x), atol=1e-5)


def test_a_program_exported_in_training_mode_is_refused_in_one_line(tmp_path):
    """Its BatchNorm updates the running statistics on every run: the analyses (which must leave
    the model as they found it) stopped with an internal error."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).train()
    path = tmp_path / "train.pt2"
    torch.export.save(torch.export.export(net, (torch.randn(2, 3, 8, 8),),
                                          dynamic_shapes=({0: torch.export.Dim("batch")},)), path)
    with pytest.raises(gp.GraphpruneError, match=r"train's forward updates its buffers \(1.running_mean, "
                                                 r"1.running_var, 1.num_batches_tracked\): every run would be another "
                                                 r"model \(exported in training mode"):
        gp.load(path)


def test_a_torchscript_archive_is_named_as_one(tmp_path):
    """torch.jit.save writes a .pt too; the refusal says what it is and what graphprune reads."""
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.trace(torch.nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8)), path)
    with pytest.raises(gp.GraphpruneError, match="TorchScript archive.*torch.export.save"):
        gp.load(path)
