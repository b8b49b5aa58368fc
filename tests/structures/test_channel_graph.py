"""Coupled-channel pruning: residual additions, concatenations and depthwise convs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimsearch.structures.channels import prunable_layers, prune_channels
from slimsearch.structures._channel_graph import analyse


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


class Net(nn.Module):
    """Stem, two residual blocks, a two-branch concatenation, a depthwise conv, a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.r1, self.r2 = Block(16), Block(16)
        self.a = nn.Conv2d(16, 8, 1)
        self.b = nn.Conv2d(16, 8, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc = nn.Linear(16 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.r2(self.r1(x))
        y = self.dw(torch.cat([self.a(x), self.b(x)], dim=1))
        y = nn.functional.adaptive_avg_pool2d(y, 2)
        return self.fc(torch.flatten(y, 1))


def _net() -> Net:
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net


X = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_layers_added_together_form_one_group():
    groups = analyse(_net(), X).groups()
    assert groups["stem"] == ["stem", "r1.c2", "r2.c2"]
    assert prunable_layers(_net(), X) == ["stem", "r1.c1", "r2.c1", "a", "b"]


def test_pruning_a_residual_group_keeps_the_addition_consistent():
    net = _net()
    pruned = prune_channels(net, X, {"stem": 0.5})
    assert pruned.stem.out_channels == pruned.r1.c2.out_channels == pruned.r2.c2.out_channels == 8
    assert pruned.r1.c1.in_channels == pruned.r2.c1.in_channels == 8
    assert pruned.a.in_channels == pruned.b.in_channels == 8
    assert pruned.r1.b2.num_features == pruned.bn.num_features == 8
    assert pruned(X).shape == net(X).shape
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in net.parameters())


def test_pruning_through_a_concatenation_and_a_depthwise_conv():
    pruned = prune_channels(_net(), X, {"a": 0.75, "b": 0.5})
    assert (pruned.a.out_channels, pruned.b.out_channels) == (2, 4)
    assert pruned.dw.in_channels == pruned.dw.out_channels == pruned.dw.groups == 6
    assert pruned.fc.in_features == 6 * 4
    assert pruned(X).shape == (2, 10)


def test_removing_channels_that_carry_nothing_leaves_outputs_unchanged():
    net = _net()
    with torch.no_grad():
        for block in (net.r1, net.r2):  # channels 4.. of each block's inner conv are dead
            block.c1.weight[4:] = 0
            block.b1.running_mean[4:] = 0
            block.b1.bias[4:] = 0
        net.a.weight[2:] = 0  # branch a: channels 2.. are zero, and so is what dw makes of them
        net.a.bias[2:] = 0
        net.dw.bias[2:8] = 0
    pruned = prune_channels(net, X, {"r1.c1": 0.75, "r2.c1": 0.75, "a": 0.75})
    assert pruned.r1.c1.out_channels == 4 and pruned.a.out_channels == 2
    assert torch.allclose(pruned(X), net(X), atol=1e-6)


def test_analysis_does_not_touch_the_models_batchnorm_statistics():
    net = _net().train()
    before = net.bn.running_mean.clone()
    prunable_layers(net, X)
    assert torch.equal(net.bn.running_mean, before) and net.training


class Gate(nn.Module):
    """Channels multiplied by a per-channel statistic: an operation the analysis does not know."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = self.c1(x)
        y = y * torch.softmax(y.amax(dim=(2, 3), keepdim=True), dim=1)
        return self.fc(self.c2(y).mean((2, 3)))


@pytest.mark.parametrize("ratio", [0.5])
def test_unknown_operations_freeze_their_channels_instead_of_guessing(ratio):
    model = Gate().eval()
    assert prunable_layers(model, X) == ["c2"]
    pruned = prune_channels(model, X, ratio)
    assert pruned.c1.out_channels == 8 and pruned.c2.out_channels == 4
    assert pruned(X).shape == (2, 3)


def test_residual_blocks_with_an_identity_path_can_be_dropped_whole():
    from slimsearch.structures.channels import drop_blocks, droppable_blocks

    net = _net()
    assert droppable_blocks(net) == ["r1", "r2"]
    dropped = drop_blocks(net, ["r2"])
    assert isinstance(dropped.r2, nn.ReLU)  # x -> relu(x): what the block leaves without its branch
    h = torch.relu(net.bn(net.stem(X)))
    assert torch.allclose(dropped.r2(net.r1(h)), torch.relu(net.r1(h)))
    assert dropped(X).shape == net(X).shape
    with pytest.raises(Exception, match=r"cannot drop 'a'; droppable blocks: \['r1', 'r2'\]"):
        drop_blocks(net, ["a"])


def test_taylor_importance_keeps_the_channels_the_loss_depends_on():
    net = _net()
    with torch.no_grad():  # make channels 0..3 of branch a large but irrelevant: the head ignores them
        net.a.weight[:4] *= 50
    with torch.no_grad():
        net.fc.weight.view(10, 16, 4)[:, :4] = 0
    y = torch.tensor([1, 2])
    by_norm = prune_channels(net, X, {"a": 0.5}, importance="l1")
    by_taylor = prune_channels(net, X, {"a": 0.5}, importance="taylor", batch=(X, y))
    # l1 keeps the big dead channels; taylor keeps the ones that reach the loss
    assert torch.equal(by_norm.a.weight, net.a.weight[:4])
    assert torch.equal(by_taylor.a.weight, net.a.weight[4:])
    with pytest.raises(Exception, match="needs a batch"):
        prune_channels(net, X, {"a": 0.5}, importance="taylor")


class ScaledConv(nn.Conv2d):
    """A conv with a per-output-channel buffer of its own: a tensor whose meaning pruning cannot know."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, self.out_channels))

    def forward(self, x):
        return super().forward(x) * self.scale.view(1, -1, 1, 1)


def test_a_layer_holding_tensors_pruning_does_not_know_keeps_its_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), ScaledConv(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 8 * 8, 3)).eval()
    # neither what ScaledConv reads (layer 0) nor what it gives can shrink: its buffer would not follow
    assert prunable_layers(model, X) == ["4"]
    pruned = prune_channels(model, X, 0.5)
    assert type(pruned[2]) is ScaledConv and (pruned[2].in_channels, pruned[2].out_channels) == (8, 8)
    assert torch.equal(pruned[2].scale, model[2].scale)
    assert (pruned[0].out_channels, pruned[4].out_channels, pruned[6].in_features) == (8, 4, 4 * 8 * 8)
    assert pruned(X).shape == (2, 3)


class ShuffleConv(nn.Conv2d):
    """A conv whose forward then trades channels for resolution: it gives out_channels / 4 channels."""

    def forward(self, x):
        return F.pixel_shuffle(super().forward(x), 2)


def test_a_conv_whose_output_is_not_its_out_channels_is_an_unknown_operation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), ShuffleConv(8, 8, 3, padding=1),
                          nn.Conv2d(2, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 16 * 16, 3)).eval()
    assert prunable_layers(model, X) == ["3"]
    pruned = prune_channels(model, X, 0.5)
    assert (pruned[2].in_channels, pruned[2].out_channels, pruned[3].in_channels, pruned[3].out_channels) == (
        8, 8, 2, 2)
    assert pruned(X).shape == (2, 3)
