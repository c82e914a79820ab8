"""PyTorch inputs a user brings: programs exported with dynamic image sizes, modules the load must
leave as it found them, and the forms in between (``ExportedProgram.module()``)."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

import graphprune as gp
from tests.conftest import StemBlockHead


def _dynamic_size_program(tmp_path):
    torch.manual_seed(0)
    module = StemBlockHead().eval()
    height, width = torch.export.Dim("height", min=8, max=64), torch.export.Dim("width", min=8, max=64)
    program = torch.export.export(module, (torch.randn(2, 3, 16, 16),),
                                  dynamic_shapes=({0: torch.export.Dim("batch"), 2: height, 3: width},))
    path = tmp_path / "dynamic.pt2"
    torch.export.save(program, path)
    return module, path


def test_a_program_with_dynamic_image_size_stays_dynamic(tmp_path):
    """Its height and width were read as the example's and the written file pinned to them (a
    guard failed at any other size), and --input-shape was refused as 'fixed at 16'."""
    module, path = _dynamic_size_program(tmp_path)
    model = gp.load(path)
    assert model.inputs[0].shape == (None, 3, None, None) and model.input_shape == (1, 3, 16, 16)
    assert model.meta["input_shape_source"] == "example"
    model = gp.load(path, input_shape=(1, 3, 32, 32))
    assert model.analysis_shape() == (1, 3, 32, 32)
    smaller = gp.drop_blocks(model, ["block"])
    x = torch.randn(2, 3, 24, 40)
    reference = smaller.run(x)
    gp.save(smaller, tmp_path / "small.pt2")
    assert torch.allclose(torch.export.load(str(tmp_path / "small.pt2")).module()(x), reference, atol=1e-5)
    gp.save(smaller, tmp_path / "small.onnx")
    session = ort.InferenceSession(str(tmp_path / "small.onnx"), providers=["CPUExecutionProvider"])
    assert np.allclose(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], reference.numpy(),
                       atol=1e-5)


def test_an_input_shape_outside_the_exported_range_is_one_line(tmp_path, cli):
    _, path = _dynamic_size_program(tmp_path)
    code, _, err = cli("inspect", path, "--input-shape", "1,3,128,128")
    assert code == 1 and err.count("\n") == 1
    assert "input-shape 1,3,128,128 is not one dynamic was exported for" in err and "<= 64" in err


def test_the_module_of_an_exported_program_loads():
    """gp.load(program.module()) raised NotImplementedError: that module's eval() is not supported."""
    torch.manual_seed(0)
    module = StemBlockHead().eval()
    program = torch.export.export(module, (torch.randn(2, 3, 8, 8),), dynamic_shapes=({0: torch.export.Dim("b")},))
    model = gp.load(program.module())
    x = torch.randn(3, 3, 8, 8)
    assert [b.name for b in gp.find_blocks(model)] == ["block"] and torch.allclose(model.run(x), module(x), atol=1e-5)


class _Counting(StemBlockHead):
    """Its forward keeps a running mean in a buffer: each run is another model."""

    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros(8))

    def between(self, y):
        self.seen.mul_(0.9).add_(0.1 * y.mean((0, 2, 3)).detach())
        return y - self.seen[None, :, None, None]


def test_loading_a_module_leaves_it_as_it_was():
    """gp.load put the caller's module in eval mode and ran its forward on the module itself."""
    module = StemBlockHead().train()
    gp.load(module, input_shape=(1, 3, 8, 8))
    assert module.training and module.block.training
    counting = _Counting().eval()
    with pytest.raises(gp.GraphpruneError, match=r"_Counting's forward updates its buffers \(seen"):
        gp.load(counting, input_shape=(1, 3, 8, 8))  # optimize stopped with a RuntimeError
    assert torch.equal(counting.seen, torch.zeros(8))


def test_writing_float64_to_onnx_says_why_it_fails(tmp_path):
    """onnxruntime's NOT_IMPLEMENTED alone did not say that the weights' type is the cause."""
    module = StemBlockHead().double().eval()
    model = gp.load(torch.export.export(module, (torch.randn(1, 3, 8, 8, dtype=torch.float64),)))
    with pytest.raises(gp.GraphpruneError, match=r"NOT_IMPLEMENTED.*\(the weights are float64: write a \.pt2"):
        gp.save(model, tmp_path / "f64.onnx")
    assert not (tmp_path / "f64.onnx").exists()


class _FoldsTheBatch(StemBlockHead):
    """Its head folds the batch-1 example into a size no leading 1 holds (as attention's reshapes do)."""

    def forward(self, x):
        y = self.stem(x)
        y = torch.relu(y + self.block(y))
        return self.fc(y.mean((2, 3)).reshape(8, 1).t())


def test_a_program_whose_graph_fixes_the_batch_runs_image_by_image(tmp_path, cli):
    """It was refused at load: not even inspect or drop ran. Now only optimize, which runs batches,
    refuses it (no size list holds its batch: the transpose moves it; a ViT's or Swin's folded
    batch is found by formats/batch_trace.py, tests/test_batch_trace.py)."""
    module = _FoldsTheBatch().eval()
    path = tmp_path / "fixed.pt2"
    torch.export.save(torch.export.export(module, (torch.randn(1, 3, 8, 8),)), path)
    model = gp.load(path)
    x = torch.randn(1, 3, 8, 8)
    assert model.inputs[0].shape[0] == 1 and torch.allclose(model.run(x), module(x), atol=1e-5)
    code, out, _ = cli("drop", path, "--blocks", "block", "-o", tmp_path / "small.pt2")
    assert code == 0 and torch.export.load(str(tmp_path / "small.pt2")).module()(x).shape == (1, 4)
    data = tmp_path / "tiny.npz"
    np.savez(data, images=np.zeros((20, 8, 8, 3), np.uint8))
    code, _, err = cli("optimize", path, "--latency-cut", "0.1", "--data", data, "-o", tmp_path / "o.pt2", "--no-cache")
    assert code == 1 and "the model's graph fixes its batch at 1" in err and err.count("\n") == 1


def test_a_windowed_attention_program_is_written_to_onnx_as_it_computes(tmp_path):
    """A Swin .pt2 whose windows need padding: the TorchScript exporter wrote a file that computes
    otherwise (torchvision's swin_t: 0.034 off; this one 0.003), and the write was refused; the
    dynamo exporter, tried next, writes it right."""
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    net = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=[3, 3],
                          num_classes=5).eval()
    program = torch.export.export(net, (torch.randn(2, 3, 32, 32),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    model = gp.load(program)
    gp.save(model, tmp_path / "swin.onnx")
    x = torch.randn(3, 3, 32, 32)
    session = ort.InferenceSession(str(tmp_path / "swin.onnx"), providers=["CPUExecutionProvider"])
    assert np.allclose(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], net(x).detach().numpy(),
                       atol=1e-4)


class _TwoHeads(StemBlockHead):
    def forward(self, x):
        y = self.stem(x)
        y = torch.relu(y + self.block(y))
        return self.fc(y.mean((2, 3))), y.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("source", ["module", "program"])
def test_each_output_of_a_two_output_model_is_named_with_its_batch(tmp_path, source):
    """With one name for two outputs the exporter called the second '83' and gave it no batch axis."""
    module = _TwoHeads().eval()
    x = torch.randn(2, 3, 8, 8)
    loaded = gp.load(module, input_shape=(1, 3, 8, 8)) if source == "module" else \
        gp.load(torch.export.export(module, (x,), dynamic_shapes=({0: torch.export.Dim("b")},)))
    gp.save(loaded, tmp_path / "two.onnx")
    session = ort.InferenceSession(str(tmp_path / "two.onnx"), providers=["CPUExecutionProvider"])
    assert [(o.name, o.shape) for o in session.get_outputs()] == [("output0", ["batch", 4]),
                                                                   ("output1", ["batch", 64, 8])]
    ours = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert all(np.allclose(a, b.detach().numpy(), atol=1e-5) for a, b in zip(ours, module(x)))
