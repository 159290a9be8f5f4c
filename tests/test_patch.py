"""Drop-in use of dxr in other diffusion code: dxr.nn.patch / unpatch, and the torch.compile graph rewrite.

The model is a small UNet written the way common open-source diffusion libraries write theirs: residual
blocks with ``nn.Sequential(GroupNorm, SiLU, conv)`` (guided-diffusion style) and with ``norm1`` and a
shared ``nonlinearity`` module (diffusers style), a block with ``F.silu(F.group_norm(...))`` inline, and
an attention block calling ``F.scaled_dot_product_attention`` for self- and cross-attention.
"""

import copy as copy_module
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dxr.nn as dnn
from dxr import ops
from helpers import DEVICE, assert_close, randn


class SequentialResBlock(nn.Module):
    """guided-diffusion's ResBlock: in_layers and out_layers are Sequential(GroupNorm, SiLU, ..., conv)."""

    def __init__(self, channels, out_channels, emb_channels, groups):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class ResnetBlock2D(nn.Module):
    """diffusers' ResnetBlock2D: norm modules and one SiLU module applied in forward, outside any Sequential."""

    def __init__(self, channels, out_channels, emb_channels, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels, eps=1e-6)
        self.conv1 = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(emb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nonlinearity = nn.SiLU()
        self.conv_shortcut = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        h = h + self.time_emb_proj(self.nonlinearity(emb))[:, :, None, None]
        h = self.conv2(self.nonlinearity(self.norm2(h)))
        return self.conv_shortcut(x) + h


class FunctionalNormBlock(nn.Module):
    """GroupNorm and SiLU written inline as functions: no module for patch() to swap."""

    def __init__(self, channels, groups):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(channels))
        self.bias = nn.Parameter(0.1 * torch.randn(channels))
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv(F.silu(F.group_norm(x, self.groups, self.weight, self.bias)))


class AttentionBlock(nn.Module):
    """diffusers' Attention with AttnProcessor2_0: GroupNorm, linear q/k/v, heads, SDPA, linear out."""

    def __init__(self, channels, heads, groups, context_dim=None):
        super().__init__()
        self.heads = heads
        self.group_norm = nn.GroupNorm(groups, channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(context_dim or channels, channels)
        self.to_v = nn.Linear(context_dim or channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x, context=None):
        b, c, h, w = x.shape
        hidden = self.group_norm(x).view(b, c, h * w).transpose(1, 2)
        context = hidden if context is None else context
        q, k, v = self.to_q(hidden), self.to_k(context), self.to_v(context)
        q, k, v = (t.view(b, -1, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
        out = self.to_out(out.transpose(1, 2).reshape(b, h * w, c))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class TinyUNet(nn.Module):
    def __init__(self, channels=16, emb=32, context_dim=12, groups=4):
        super().__init__()
        self.channels = channels
        self.time_embed = nn.Sequential(nn.Linear(channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.conv_in = nn.Conv2d(3, channels, 3, padding=1)
        self.down = SequentialResBlock(channels, channels, emb, groups)
        self.downsample = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.mid = ResnetBlock2D(channels, 2 * channels, emb, groups)
        self.self_attention = AttentionBlock(2 * channels, 2, groups)
        self.cross_attention = AttentionBlock(2 * channels, 2, groups, context_dim)
        self.mid_functional = FunctionalNormBlock(2 * channels, groups)
        self.up = SequentialResBlock(3 * channels, channels, emb, groups)
        self.out = nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, 3, 3, padding=1))

    def forward(self, x, t, context):
        half = self.channels // 2
        freqs = torch.exp(-torch.arange(half, device=x.device, dtype=torch.float32) * (9.2 / half))
        angles = t.float()[:, None] * freqs[None]
        emb = self.time_embed(torch.cat([angles.cos(), angles.sin()], dim=1).to(x.dtype))
        skip = self.down(self.conv_in(x), emb)
        h = self.mid(self.downsample(skip), emb)
        h = self.mid_functional(self.cross_attention(self.self_attention(h), context))
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        return self.out(self.up(torch.cat([h, skip], dim=1), emb))


def _unet():
    torch.manual_seed(0)
    model = TinyUNet().to(DEVICE)
    # non-trivial affine parameters, so a lost or mixed-up parameter shows in the output
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.normal_(1.0, 0.2), m.bias.normal_(0.0, 0.2)
    return model


def _unet_inputs(dtype=torch.float32):
    x = randn(2, 3, 12, 12, dtype=dtype, seed=1, requires_grad=True)
    t = torch.tensor([3, 517], device=DEVICE)
    context = randn(2, 7, 12, dtype=dtype, seed=2)
    return x, t, context


@pytest.fixture
def attention_calls(monkeypatch):
    """Counts the calls that reach dxr.ops.attention."""
    calls = []
    original = ops.attention

    def counting(q, k, v, scale=None, *, backend=None):
        calls.append((tuple(q.shape), tuple(k.shape), backend))
        return original(q, k, v, scale, backend=backend)

    monkeypatch.setattr(ops, "attention", counting)
    return calls


# --------------------------------------------------------------------------------------------------
# patch / unpatch


def test_patch_swaps_norms_keeps_parameters_and_unpatch_restores():
    model = _unet()
    before = dict(model.named_modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert dnn.patch(model) is model

    # Sequential(GroupNorm, SiLU, ...) → GroupNormSiLU + Identity
    for seq in (model.down.in_layers, model.down.out_layers, model.up.in_layers, model.up.out_layers, model.out):
        assert type(seq[0]) is dnn.GroupNormSiLU and type(seq[1]) is nn.Identity
    # a norm whose SiLU is applied in forward, or that no SiLU follows → plain dxr GroupNorm
    for norm in (model.mid.norm1, model.mid.norm2, model.self_attention.group_norm):
        assert type(norm) is dnn.GroupNorm
    assert model.mid.norm1.eps == 1e-6
    # a SiLU after a Linear, and the shared SiLU module of the diffusers block, stay
    assert type(model.time_embed[1]) is nn.SiLU and type(model.mid.nonlinearity) is nn.SiLU
    # the same Parameter objects (an optimizer built before patching keeps working), the same state_dict
    assert model.down.in_layers[0].weight is before["down.in_layers.0"].weight
    assert model.mid.norm1.bias is before["mid.norm1"].bias
    assert list(model.state_dict()) == list(state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])
    assert dnn.patch(model) is model and type(model.out[0]) is dnn.GroupNormSiLU

    assert dnn.unpatch(model) is model
    after = dict(model.named_modules())
    assert list(after) == list(before)
    for name, module in after.items():
        assert module is before[name], name
    assert "forward" not in model.__dict__
    with pytest.raises(ValueError, match="not patched"):
        dnn.unpatch(model)


def test_unpatch_returns_the_parameters_the_model_holds_now():
    model = _unet()
    dnn.patch(model)
    trained = nn.Parameter(torch.randn_like(model.out[0].weight))
    model.out[0].weight = trained
    dnn.unpatch(model)
    assert type(model.out[0]) is nn.GroupNorm and model.out[0].weight is trained


def test_deepcopy_of_a_patched_model_runs_its_own_weights(attention_calls):
    """EMA copies are made with deepcopy: the copy must route attention and use the copy's parameters."""
    model = dnn.patch(_unet())
    copy = copy_module.deepcopy(model)
    with torch.no_grad():
        for p in copy.parameters():
            p.mul_(0.5)
    x, t, context = _unet_inputs()
    assert not torch.allclose(copy(x, t, context), model(x, t, context))
    assert len(attention_calls) == 4
    assert inspect.signature(model.forward) == inspect.signature(TinyUNet(1, 1, 1, 1).forward)
    dnn.unpatch(copy)
    assert type(copy.out[0]) is nn.GroupNorm and copy.out[0].weight is copy.state_dict(keep_vars=True)["out.0.weight"]


def test_modules_with_hooks_are_left_alone():
    model = _unet()
    seen = []
    model.out[0].register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    dnn.patch(model, attention=False)
    assert type(model.out[0]) is nn.GroupNorm and type(model.out[1]) is nn.SiLU
    assert "forward" not in model.__dict__
    model(*_unet_inputs())
    assert seen == [(2, 16, 12, 12)]
    dnn.unpatch(model)


def _forward_and_grads(model, x, t, context):
    out = model(x, t, context)
    return (out, *torch.autograd.grad(out.float().square().sum(), (x, model.self_attention.to_q.weight)))


@pytest.mark.slow
def test_patched_unet_matches_unpatched(attention_calls):
    """Forward and gradients of the patched model (fused kernels) against the original, in float32."""
    model = _unet()
    x, t, context = _unet_inputs()
    expected = _forward_and_grads(model, x, t, context)
    assert attention_calls == []

    dnn.patch(model, backend="triton")
    results = _forward_and_grads(model, x, t, context)
    # one self-attention over the 6×6 pixels and one cross-attention to the 7 context tokens
    assert attention_calls == [((2, 2, 36, 16), (2, 2, 36, 16), "triton"), ((2, 2, 36, 16), (2, 2, 7, 16), "triton")]
    for name, result, reference in zip(("output", "dx", "dW_q"), results, expected):
        assert_close(result, reference, torch.float32, msg=name)

    dnn.unpatch(model)
    torch.testing.assert_close(model(x, t, context), expected[0], rtol=0, atol=0)
    assert len(attention_calls) == 2


@pytest.mark.slow
def test_patched_bfloat16_unet_is_as_accurate_as_pytorch():
    """In bfloat16 both runs round every layer differently (the fused GroupNorm+SiLU rounds once where
    PyTorch rounds twice), so they are held against the float32 model: the patched run must stay as
    close to it as PyTorch's own bfloat16 run (within half again its relative error)."""
    model = _unet()
    x, t, context = _unet_inputs()
    exact = _forward_and_grads(model, x, t, context)
    model = model.to(torch.bfloat16)
    x, t, context = _unet_inputs(torch.bfloat16)
    pytorch = _forward_and_grads(model, x, t, context)
    patched = _forward_and_grads(dnn.patch(model, backend="triton"), x, t, context)
    for name, ours, theirs, reference in zip(("output", "dx", "dW_q"), patched, pytorch, exact):
        ours_error = (ours.float() - reference).norm() / reference.norm()
        pytorch_error = (theirs.float() - reference).norm() / reference.norm()
        assert pytorch_error < 0.05 and ours_error <= 1.5 * pytorch_error, (name, ours_error, pytorch_error)


class _SDPACalls(nn.Module):
    """SDPA calls dxr does not take: each must run as PyTorch's own."""

    def forward(self, q, k, v, mask):
        return [
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
            F.scaled_dot_product_attention(q, k, v, is_causal=True),
            F.scaled_dot_product_attention(q, k[:, :1], v[:, :1], enable_gqa=True),
            F.scaled_dot_product_attention(q[0], k[0], v[0]),
            F.scaled_dot_product_attention(q, k, v[..., :8]),
            F.scaled_dot_product_attention(q.double(), k.double(), v.double()),
            F.scaled_dot_product_attention(q, k, v, dropout_p=0.5),
        ]


def test_unsupported_sdpa_calls_go_to_pytorch(attention_calls):
    q, k, v = (randn(1, 2, 6, 16, seed=s) for s in (1, 2, 3))
    mask = torch.rand(6, 6, device=DEVICE) > 0.3
    module = dnn.patch(_SDPACalls(), backend="triton")
    torch.manual_seed(5)
    outs = module(q, k, v, mask)
    assert attention_calls == []
    dnn.unpatch(module)
    torch.manual_seed(5)
    for out, expected in zip(outs, module(q, k, v, mask)):
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_routing_is_scoped_to_the_patched_model(attention_calls):
    q, k, v = (randn(1, 2, 6, 16, seed=s) for s in (1, 2, 3))
    patched = dnn.patch(AttentionBlock(16, 2, 4).to(DEVICE), backend="triton")
    other = AttentionBlock(16, 2, 4).to(DEVICE)
    x = randn(1, 16, 3, 3)
    F.scaled_dot_product_attention(q, k, v)
    other(x)
    assert attention_calls == []
    patched(x)
    assert len(attention_calls) == 1
    dnn.unpatch(patched)
    patched(x)
    assert len(attention_calls) == 1


def _recording(inner, seen):
    """A compile backend that notes the ops of each captured graph, then hands it to ``inner``."""

    def backend(gm, example_inputs):
        seen.extend(node.target for node in gm.graph.nodes if node.op == "call_function")
        return torch._dynamo.lookup_backend(inner)(gm, example_inputs)

    return backend


@pytest.mark.slow
def test_compiled_patched_unet_has_no_graph_break():
    """torch.compile(fullgraph=True) of the patched UNet fails on any graph break; the captured graph
    calls dxr's attention op and matches eager. aot_eager runs Dynamo and AOTAutograd as Inductor gets
    them, without Inductor's C++ code generation (compiled SelfAttention2d and CompileBackend tests
    cover Inductor)."""
    model = _unet()
    x, t, context = _unet_inputs()
    expected = model(x, t, context)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
    dnn.patch(model, backend="triton")
    seen = []
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=_recording("aot_eager", seen), fullgraph=True)
    out = compiled(x, t, context)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    assert seen.count(torch.ops.dxr.attention_fwd.default) == 2 and F.scaled_dot_product_attention not in seen
    assert_close(out, expected, torch.float32)
    assert_close(grad, expected_grad, torch.float32)


# --------------------------------------------------------------------------------------------------
# torch.compile graph rewrite


@pytest.mark.slow
def test_fuse_graph_rewrites_module_and_functional_patterns():
    """On the unpatched UNet: every GroupNorm → SiLU pair (Sequential, diffusers-style and inline
    functional) becomes one group_norm_silu, the attention blocks' norms plain GroupNorm, both SDPA
    calls dxr attention; the rewritten graph computes what the model does."""
    model = _unet()
    x, t, context = _unet_inputs()
    counts = []

    def rewrite_and_run(gm, example_inputs):
        counts.append(dnn.fuse_graph(gm, backend="triton"))
        targets = {node.target for node in gm.graph.nodes if node.op == "call_function"}
        assert F.group_norm not in targets and F.scaled_dot_product_attention not in targets
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(model, backend=rewrite_and_run, fullgraph=True)(x, t, context)
    # down: 2, mid (norm1, norm2 → nonlinearity): 2, functional: 1, up: 2, out: 1
    assert counts == [{"group_norm_silu": 8, "group_norm": 2, "attention": 2}]
    assert_close(out, model(x, t, context), torch.float32)


def test_fuse_graph_leaves_unsupported_calls():
    counts = []

    def rewrite(gm, example_inputs):
        counts.append(dnn.fuse_graph(gm))
        return gm.forward

    q, k, v = (randn(1, 2, 6, 16, seed=s) for s in (1, 2, 3))
    mask = torch.rand(6, 6, device=DEVICE) > 0.3
    module = _SDPACalls()
    torch._dynamo.reset()
    torch.compile(module, backend=rewrite, fullgraph=True)(q, k, v, mask)
    assert counts == [{"group_norm_silu": 0, "group_norm": 0, "attention": 0}]


class _InlineBlock(nn.Module):
    """The inline-functional GroupNorm + SiLU and an SDPA attention block."""

    def __init__(self):
        super().__init__()
        self.norm_act = FunctionalNormBlock(16, 4)
        self.attention = AttentionBlock(16, 2, 4)

    def forward(self, x):
        return self.attention(self.norm_act(x))


def test_compile_backend_fuses_inline_code():
    """dxr.nn.CompileBackend: no graph break, dxr ops in the graph the inner backend gets, the model's
    result. The inner backend is aot_eager (AOTAutograd as Inductor runs it, without the C++ code
    generation); the compiled SelfAttention2d test runs the dxr ops through Inductor itself."""
    torch.manual_seed(0)
    model = _InlineBlock().to(DEVICE)
    x = randn(2, 16, 5, 5, requires_grad=True)
    expected = model(x)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
    seen = []
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=dnn.CompileBackend("triton", inner=_recording("aot_eager", seen)),
                             fullgraph=True)
    out = compiled(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    # neither the norm, the SiLU nor SDPA is left: they became dxr ops
    assert seen and not {F.group_norm, F.silu, F.scaled_dot_product_attention} & set(seen)
    assert_close(out, expected, torch.float32)
    assert_close(grad, expected_grad, torch.float32)
    assert repr(dnn.compile_backend) == "CompileBackend(backend=None, inner='inductor')"
