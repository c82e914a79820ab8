"""Property tests: on randomly generated residual networks (widths, depths, branch shapes, nesting,
strided and projection shortcuts) the block finder never crashes, finds every residual it should,
and dropping any block it finds equals zeroing that block's branch."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

import graphprune as gp
from graphprune.passes import zero_branch


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, branch_depth: int, shortcut: str, act_after: bool,
                 inner=None):
        super().__init__()
        layers, c = [], cin
        for i in range(branch_depth):
            layers += [nn.Conv2d(c, cout, 3, stride if i == 0 else 1, 1), nn.BatchNorm2d(cout)]
            if i < branch_depth - 1:
                layers.append(nn.ReLU())
            c = cout
        self.branch = nn.Sequential(*layers)
        self.inner = inner  # a nested residual block inside the branch
        if shortcut == "projection" or (shortcut == "identity" and (stride != 1 or cin != cout)):
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride), nn.BatchNorm2d(cout))
        elif shortcut == "pool":
            self.shortcut = nn.Sequential(nn.AvgPool2d(stride) if stride > 1 else nn.Identity(),
                                          nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity())
        else:
            self.shortcut = nn.Identity()
        self.act_after = act_after

    def forward(self, x):
        y = self.branch(x)
        if self.inner is not None:
            y = self.inner(y)
        y = self.shortcut(x) + y  # SwappedBlock adds in the other order
        return torch.relu(y) if self.act_after else y


class SwappedBlock(Block):
    def forward(self, x):  # branch first, shortcut second
        y = self.branch(x)
        if self.inner is not None:
            y = self.inner(y)
        y = y + self.shortcut(x)
        return torch.relu(y) if self.act_after else y


block_spec = st.fixed_dictionaries({
    "cout": st.sampled_from([4, 8, 12]),
    "stride": st.sampled_from([1, 1, 2]),
    "branch_depth": st.integers(1, 3),
    "shortcut": st.sampled_from(["identity", "identity", "projection", "pool"]),
    "act_after": st.booleans(),
    "swapped": st.booleans(),
    "nested": st.booleans(),
})


def build(specs, cin: int = 3):
    layers, c, expected = [nn.Conv2d(cin, 8, 3, padding=1)], 8, 0
    for spec in specs:
        inner = None
        if spec["nested"]:
            inner = Block(spec["cout"], spec["cout"], 1, 1, "identity", False)
            expected += 1
        cls = SwappedBlock if spec["swapped"] else Block
        layers.append(cls(c, spec["cout"], spec["stride"], spec["branch_depth"], spec["shortcut"], spec["act_after"],
                          inner))
        resized = spec["stride"] != 1 or c != spec["cout"]
        projected = spec["shortcut"] == "projection" or (spec["shortcut"] == "identity" and resized) or \
            (spec["shortcut"] == "pool" and c != spec["cout"])  # the shortcut holds a conv
        # one conv beside a projection (the nested block inside it linear too) is RepVGG's training
        # form, one conv once reparameterised: no block (find_blocks, rule 5)
        expected += not (projected and spec["branch_depth"] == 1)
        c = spec["cout"]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 3)]
    net = nn.Sequential(*layers).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return net, expected


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(block_spec, min_size=1, max_size=4), st.integers(0, 1000))
# the branch an average pool and a conv, beside one conv: linear both ways, no block (rule 5)
@example([{"cout": 4, "stride": 2, "branch_depth": 1, "shortcut": "pool", "act_after": False, "swapped": True,
           "nested": False}], 0)
def test_random_residual_networks(specs, seed):
    torch.manual_seed(seed)
    net, expected = build(specs)
    model = gp.load(net, input_shape=(1, 3, 16, 16))
    blocks = gp.find_blocks(model)
    assert len(blocks) == expected
    assert len({b.name for b in blocks}) == len(blocks)
    x = torch.randn(2, 3, 16, 16)
    for block in blocks:
        dropped = gp.drop_blocks(model, [block.name], blocks)
        assert torch.allclose(dropped.run(x), zero_branch(model, block).run(x), atol=1e-5), block.name
