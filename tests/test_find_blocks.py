"""Block discovery on real architectures, traced from PyTorch and through their ONNX export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphprune as gp
from conftest import TORCHVISION_MODELS, models_with_slow, torchvision_module

EXPECTED_FIRST = {
    "resnet18": ("layer1.0", "identity"), "resnet50": ("layer1.0", "projection"),
    "mobilenet_v2": ("features.3", "identity"), "mobilenet_v3_large": ("features.1", "identity"),
    "efficientnet_b0": ("features.2.1", "identity"), "regnet_x_400mf": ("trunk_output.block1.block1-0", "projection"),
    "convnext_tiny": ("features.1.0", "identity"), "shufflenet_v2_x0_5": ("stage2.1", "split"),
    "vit_b_16": ("encoder.layers.encoder_layer_0.self_attention", "identity"),
    "swin_t": ("features.1.0.attn", "identity"),
}


@pytest.mark.parametrize("name", models_with_slow("vit_b_16", "swin_t"))
def test_torchvision_blocks_match_between_pytorch_and_onnx(name, torchvision_onnx):
    shape, count = TORCHVISION_MODELS[name]
    traced = gp.load(torchvision_module(name), input_shape=(1, *shape[1:]))
    from_onnx = gp.load(torchvision_onnx(name))
    torch_blocks = gp.find_blocks(traced)
    onnx_blocks = gp.find_blocks(from_onnx)
    assert len(torch_blocks) == count
    assert [b.name for b in torch_blocks] == [b.name for b in onnx_blocks]
    assert [b.kind for b in torch_blocks] == [b.kind for b in onnx_blocks]
    assert (torch_blocks[0].name, torch_blocks[0].kind) == EXPECTED_FIRST[name]
    for block in torch_blocks:
        assert block.macs > 0 and block.params > 0
        assert block.input_shape is not None and block.output_shape is not None


def test_vit_has_attention_and_mlp_blocks_and_no_positional_embedding_block():
    blocks = gp.find_blocks(gp.load(torchvision_module("vit_b_16")))
    names = [b.name for b in blocks]
    assert "encoder.layers.encoder_layer_4.mlp" in names
    assert "encoder.layers.encoder_layer_4.self_attention" in names
    assert not any(n == "encoder" or n.startswith("encoder.pos") for n in names)


@pytest.mark.parametrize("depth,count", [(20, 9), (56, 27)])
def test_cifar_resnets_have_option_a_shortcuts(depth, count):
    blocks = gp.find_blocks(gp.load(f"zoo:cifar10_resnet{depth}"))
    assert len(blocks) == count
    kinds = {b.name: b.kind for b in blocks}
    assert kinds["layer2.0"] == kinds["layer3.0"] == "shortcut"
    assert sum(k == "identity" for k in kinds.values()) == count - 2
    assert blocks[0].input_shape == (1, 16, 32, 32) and blocks[-1].output_shape == (1, 64, 8, 8)


def test_a_plain_network_drops_its_shape_keeping_layers():
    blocks = gp.find_blocks(gp.load("torchvision:vgg11", input_shape=(1, 3, 64, 64)))
    assert [(b.name, b.kind) for b in blocks] == [(f"features.{i}", "layer") for i in (8, 13, 16, 18)] + \
        [("classifier.3", "layer")]  # the 3x3 convs that keep their channels, the 4096 -> 4096 Linear


@pytest.mark.parametrize("name", ["squeezenet1_1"])
def test_networks_without_residual_blocks(name, cli):
    model = gp.load(f"torchvision:{name}", input_shape=(1, 3, 64, 64))
    assert gp.find_blocks(model) == []
    with pytest.raises(gp.GraphpruneError, match="no residual blocks"):
        gp.find_blocks(model, require=True)
    code, out, err = cli("inspect", f"torchvision:{name}", "--input-shape", "1,3,64,64")
    assert code == 0 and "no residual blocks" in out


def test_bias_adds_and_two_long_computations_are_not_blocks():
    import torch
    from torch import nn

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
            self.b = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
            self.bias = nn.Parameter(torch.randn(1, 8, 1, 1))

        def forward(self, x):
            return self.a(x) + self.b(x) + self.bias.reshape(1, 8, 1, 1)

    blocks = gp.find_blocks(gp.load(Head(), input_shape=(1, 3, 16, 16)))
    assert [(b.name, b.kind) for b in blocks] == [("a.2", "layer"), ("b.2", "layer")]  # no residual: its layers


class _Res(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x):
        return x + self.body(x)


class _Denoiser(nn.Module):
    """DnCNN-style: clean = x + net(x), every weight inside the global residual."""

    def __init__(self, upscale: int = 1):
        super().__init__()
        self.upscale = upscale
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), _Res(8), _Res(8),
                                 nn.Conv2d(8, 3 * upscale ** 2, 3, padding=1))

    def forward(self, x):
        if self.upscale == 1:
            return x + self.net(x)
        skip = nn.functional.interpolate(x, scale_factor=self.upscale, mode="nearest")
        return skip + nn.functional.pixel_shuffle(self.net(x), self.upscale)


class _Edsr(nn.Module):
    """EDSR-style: a head conv outside the body's long skip, which is then a block like any other."""

    def __init__(self):
        super().__init__()
        self.head, self.body, self.tail = nn.Conv2d(3, 8, 3, padding=1), nn.Sequential(_Res(8), _Res(8)), \
            nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        y = self.head(x)
        return self.tail(y + self.body(y))


@pytest.mark.parametrize("upscale", [1, 2])
def test_a_global_residual_around_the_whole_network_is_not_a_block(upscale, tmp_path):
    """Dropping x + net(x) would leave no network (and took the mimicked tensor with it); the
    blocks inside it are found, dropped, and the output, which the last conv's residual reaches, is
    what recovery mimics."""
    from graphprune.features import describe_targets

    torch.manual_seed(0)
    model = gp.load(_Denoiser(upscale).eval(), input_shape=(1, 3, 16, 16))
    blocks = gp.find_blocks(model)
    assert [b.name for b in blocks] == ["net.2", "net.3"]
    (target,) = describe_targets(model)
    assert target["read_by"] is None  # the graph output itself
    x = torch.randn(2, 3, 16, 16)
    smaller = gp.drop_blocks(model, ["net.3"], blocks)
    assert smaller.run(x).shape == (2, 3, 16 * upscale, 16 * upscale)
    assert not torch.allclose(smaller.run(x), model.run(x))
    edsr = gp.find_blocks(gp.load(_Edsr().eval(), input_shape=(1, 3, 16, 16)))
    assert [b.name for b in edsr] == ["body.0", "body.1", "body"]  # the long skip: head and tail lie outside


class _RepVggBlock(nn.Module):
    """RepVGG/MobileOne training form: conv3x3-bn + conv1x1-bn (+ bn of the input), then ReLU."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.kxk = nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out))
        self.scale = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        self.identity = nn.BatchNorm2d(c_out) if stride == 1 and c_in == c_out else None

    def forward(self, x):
        y = self.scale(x) + self.kxk(x)
        return torch.relu(y if self.identity is None else y + self.identity(x))


@pytest.mark.parametrize("source", ["torch", "onnx"])
def test_reparameterisable_parallel_convs_are_not_blocks(source, tmp_path):
    """conv3x3(x) + conv1x1(x) is one conv once reparameterised: a linear branch beside a projection
    is no block (mobileone_s0 read 183 of them); the identity branch around the sum is one."""
    torch.manual_seed(0)
    net = nn.Sequential(_RepVggBlock(3, 8, 2), _RepVggBlock(8, 8), _RepVggBlock(8, 16, 2),
                        _RepVggBlock(16, 16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()
    model = net
    if source == "onnx":
        model = str(tmp_path / "rep.onnx")
        torch.onnx.export(net, (torch.randn(1, 3, 32, 32),), model, dynamo=False, opset_version=17)
    blocks = gp.find_blocks(gp.load(model, input_shape=(1, 3, 32, 32)))
    assert [b.kind for b in blocks] == ["shortcut", "shortcut"]
    assert [b.input_shape for b in blocks] == [(1, 8, 16, 16), (1, 16, 8, 8)]
