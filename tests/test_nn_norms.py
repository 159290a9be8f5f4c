"""dxr.nn norm modules: drop-in for torch.nn.GroupNorm, and torch.compile with no graph break."""

import pytest
import torch
from torch import nn

import dxr.nn as dnn
from helpers import assert_close, randn


def test_group_norm_state_dict_loads_both_ways():
    ours, theirs = dnn.GroupNorm(4, 8), nn.GroupNorm(4, 8)
    with torch.no_grad():
        theirs.weight.normal_(), theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = randn(2, 8, 5, 5)
    torch.testing.assert_close(ours(x), theirs(x))
    back = nn.GroupNorm(4, 8)
    back.load_state_dict(ours.state_dict())
    torch.testing.assert_close(back.weight, theirs.weight)


def test_model_checkpoint_swaps_module_classes():
    def model(norm):
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm(4, 8), nn.SiLU(), nn.Conv2d(8, 3, 1))

    eager = model(nn.GroupNorm)
    fused = nn.Sequential(eager[0], dnn.GroupNormSiLU(4, 8), nn.Identity(), eager[3])
    fused.load_state_dict(eager.state_dict())
    x = randn(2, 3, 6, 6)
    torch.testing.assert_close(fused(x), eager(x))


def test_group_norm_silu_without_affine_and_repr():
    m = dnn.GroupNormSiLU(2, 6, affine=False, backend="torch")
    assert m.weight is None and "backend='torch'" in repr(m)
    x = randn(3, 6, 4)
    torch.testing.assert_close(m(x), nn.functional.silu(nn.functional.group_norm(x, 2)))


def test_adain_module_checks_channels():
    m = dnn.AdaIN(5)
    with pytest.raises(ValueError, match="x has 4 channels but this AdaIN was built for 5"):
        m(randn(2, 4, 3, 3), randn(2, 4), randn(2, 4))


class _ConvNormAdaIN(nn.Module):
    """A small conv + GroupNormSiLU + AdaIN block, the shape of a UNet/MUNIT decoder layer."""

    def __init__(self, backend):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = dnn.GroupNormSiLU(4, 16, backend=backend)
        self.style = nn.Linear(8, 32)
        self.adain = dnn.AdaIN(16, backend=backend)
        self.conv2 = nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x, style):
        h = self.norm(self.conv1(x))
        scale, shift = self.style(style).chunk(2, dim=1)
        return self.conv2(torch.relu(self.adain(h, 1 + scale, shift)))


@pytest.mark.slow
def test_compiled_model_has_no_graph_break_and_matches_eager():
    """Inductor around the fused Triton ops: fullgraph=True fails on any graph break."""
    torch.manual_seed(0)
    model = _ConvNormAdaIN("triton")
    x, style = randn(2, 3, 12, 12, requires_grad=True), randn(2, 8)
    eager = model(x, style)
    (gx_eager,) = torch.autograd.grad(eager.square().sum(), x)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x, style)
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    assert_close(out, eager, torch.float32)
    assert_close(gx, gx_eager, torch.float32)
