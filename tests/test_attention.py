"""Triton flash attention (forward and deterministic backward) and dxr.nn.SelfAttention2d.

Every case runs the kernels (under the interpreter without a GPU) through ``dxr.ops.attention`` and holds
the output and dq, dk, dv against ``dxr.kernels.reference.attention`` run in float32 on the same inputs.
Block sizes under the interpreter are 32, so the lengths below give several blocks and ragged tails.
"""

import pytest
import torch
import torch.nn.functional as F

import dxr.nn as dnn
from dxr import ops
from dxr.kernels import reference
from dxr.kernels.triton import attention as triton_attention
from helpers import DEVICE, DTYPES, assert_close, randn

# (B, H, Lq, Lk, D): native head dims 16, 32, 64, 128 and padded 8, 40, 80; Lq ≠ Lk, ragged lengths,
# lengths that are a multiple of the block, lengths under one block, and B·H = 1
SHAPES = [
    (1, 1, 80, 48, 16),
    (1, 2, 33, 70, 32),
    (2, 1, 64, 64, 64),
    (1, 2, 17, 80, 128),
    (1, 1, 50, 31, 40),
    (2, 1, 45, 77, 80),
    (1, 1, 20, 9, 8),
]


def _inputs(shape, dtype, seed):
    b, h, lq, lk, d = shape
    q = randn(b, h, lq, d, dtype=dtype, seed=seed, requires_grad=True)
    k = randn(b, h, lk, d, dtype=dtype, seed=seed + 1, requires_grad=True)
    v = randn(b, h, lk, d, dtype=dtype, seed=seed + 2, requires_grad=True)
    do = randn(b, h, lq, d, dtype=dtype, seed=seed + 3)
    return q, k, v, do


def _reference(q, k, v, do, scale=None):
    """Output and (dq, dk, dv) of the float32 reference on the same (rounded) inputs."""
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = reference.attention(qf, kf, vf, scale)
    grads = torch.autograd.grad(out, (qf, kf, vf), do.float())
    return out.detach(), grads


def _check_against_reference(q, k, v, do, dtype, scale=None):
    out = ops.attention(q, k, v, scale, backend="triton")
    assert out.dtype == dtype and out.shape == (*q.shape[:3], v.shape[-1])
    grads = torch.autograd.grad(out, (q, k, v), do)
    expected_out, expected_grads = _reference(q, k, v, do, scale)
    assert_close(out, expected_out, dtype, msg="output")
    for name, grad, expected, inp in zip(("dq", "dk", "dv"), grads, expected_grads, (q, k, v)):
        assert grad.dtype == dtype and grad.shape == inp.shape
        assert_close(grad, expected, dtype, msg=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}_Lq{}_Lk{}_D{}".format(*s))
def test_forward_and_gradients_match_reference(shape, dtype):
    q, k, v, do = _inputs(shape, dtype, seed=sum(shape))
    _check_against_reference(q, k, v, do, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_explicit_scale(dtype):
    q, k, v, do = _inputs((1, 2, 40, 56, 32), dtype, seed=7)
    _check_against_reference(q, k, v, do, dtype, scale=0.3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_logits_stay_finite(dtype):
    """Scores beyond ±89 overflow exp() in float32 unless the running max is subtracted first."""
    q, k, v, _ = _inputs((1, 1, 40, 56, 16), dtype, seed=9)
    out, lse = torch.ops.dxr.attention_fwd(q.detach(), k.detach(), v.detach(), 12.0, "triton")
    scores = q.detach().float() @ k.detach().float().transpose(-1, -2) * 12.0
    assert scores.abs().max() > 100
    expected_out, _ = _reference(q, k, v, torch.zeros_like(q), 12.0)
    assert_close(out, expected_out, dtype)
    assert_close(lse, torch.logsumexp(scores, dim=-1), torch.float32)


@pytest.mark.parametrize("layout", ["fused_qkv_last_dim_strided", "fused_qkv_channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_views_run_without_copies(layout, dtype):
    """q, k, v as views into one qkv projection (as SelfAttention2d and SDPA callers make them)."""
    b, h, length, d = 2, 1, 45, 32
    if layout == "fused_qkv_last_dim_strided":
        # (B, 3·H·D, L) from a 1×1 conv: the head dim is the strided axis, positions are unit-stride
        qkv = randn(b, 3, h, d, length, dtype=dtype, seed=3).transpose(-1, -2)
        q, k, v = (t.detach().requires_grad_() for t in qkv.unbind(1))
        assert q.stride(-1) == length and q.stride(-2) == 1
    else:
        # (B, L, 3, H, D) from a linear layer: the head dim is unit-stride, positions stride 3·H·D
        qkv = randn(b, length, 3, h, d, dtype=dtype, seed=4).permute(2, 0, 3, 1, 4)
        q, k, v = (t.detach().requires_grad_() for t in qkv.unbind(0))
        assert q.stride(-1) == 1 and not q.is_contiguous()
    # a broadcast gradient: stride 0 on every axis
    do = randn(1, 1, 1, 1, dtype=dtype, seed=5).expand(b, h, length, d)
    _check_against_reference(q, k, v, do, dtype)


def test_log_sum_exp_saved_for_backward():
    q, k, v, _ = _inputs((1, 2, 37, 50, 40), torch.float32, seed=11)
    scale = 40 ** -0.5
    o, lse = torch.ops.dxr.attention_fwd(q.detach(), k.detach(), v.detach(), scale, "triton")
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 37) and o.is_contiguous()
    expected = torch.logsumexp(q.detach() @ k.detach().transpose(-1, -2) * scale, dim=-1)
    assert_close(lse, expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gradients_are_bitwise_deterministic(dtype):
    q, k, v, do = _inputs((1, 2, 70, 75, 64), dtype, seed=21)
    runs = [torch.autograd.grad(ops.attention(q, k, v, backend="triton"), (q, k, v), do) for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_empty_keys_give_zero_output_and_gradients():
    """Lk = 0: the softmax is over nothing, so the reference's output (and every gradient) is zero."""
    q = randn(1, 2, 5, 16, requires_grad=True)
    k = torch.empty(1, 2, 0, 16, device=DEVICE, requires_grad=True)
    v = torch.empty(1, 2, 0, 16, device=DEVICE, requires_grad=True)
    out = ops.attention(q, k, v, backend="triton")
    torch.testing.assert_close(out, reference.attention(q, k, v))
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.count_nonzero(dq) == 0 and dk.shape == k.shape and dv.shape == v.shape


def test_float64_takes_the_reference():
    q, k, v, do = _inputs((1, 1, 9, 11, 8), torch.float64, seed=2)
    torch.testing.assert_close(ops.attention(q, k, v, backend="triton"), reference.attention(q, k, v))


def test_opcheck():
    q, k, v, do = _inputs((1, 2, 33, 20, 40), torch.bfloat16, seed=13)
    torch.library.opcheck(torch.ops.dxr.attention_fwd.default, (q, k, v, 0.3, "triton"))
    o, lse = torch.ops.dxr.attention_fwd(q.detach(), k.detach(), v.detach(), 0.3, "triton")
    args = (do, q.detach(), k.detach(), v.detach(), o, lse, 0.3, "triton")
    torch.library.opcheck(torch.ops.dxr.attention_bwd.default, args)


@pytest.mark.parametrize(
    "q, k, v, error, words",
    [
        (torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8), ValueError,
         "q must have shape (B, H, L, D)"),
        (torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8, 1), torch.randn(1, 2, 4, 8), ValueError,
         "k must have shape (B, H, L, D)"),
        (torch.randn(2, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), ValueError, "k must have shape"),
        (torch.randn(1, 2, 4, 8), torch.randn(1, 3, 4, 8), torch.randn(1, 3, 4, 8), ValueError, "k must have shape"),
        (torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16), ValueError, "k must have shape"),
        (torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 4), ValueError, "v must have shape"),
        (torch.randn(1, 1, 4, 257), torch.randn(1, 1, 4, 257), torch.randn(1, 1, 4, 257), ValueError, "head dim D"),
        (torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8).bfloat16(), torch.randn(1, 1, 4, 8), TypeError,
         "share one dtype"),
        (torch.ones(1, 1, 4, 8, dtype=torch.int32), torch.ones(1, 1, 4, 8, dtype=torch.int32),
         torch.ones(1, 1, 4, 8, dtype=torch.int32), TypeError, "q must be a floating-point tensor"),
        (torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8, device="meta"), ValueError,
         "v is on meta but q is on cpu"),
    ],
)
def test_bad_input_is_a_clear_error(q, k, v, error, words):
    with pytest.raises(error) as info:
        ops.attention(q, k, v, backend="triton")
    assert words in str(info.value)


def test_launcher_checks_what_the_kernels_need():
    """Direct callers of the launch function get the same kind of errors as dxr.ops callers."""
    x = torch.randn(1, 1, 4, 8)
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        triton_attention.attention_fwd(x.double(), x.double(), x.double(), 1.0)
    with pytest.raises(ValueError, match=r"head dim D must lie in \[1, 256\]"):
        big = torch.randn(1, 1, 2, 300)
        triton_attention.attention_fwd(big, big, big, 1.0)
    with pytest.raises(ValueError, match="lse must be float32"):
        triton_attention.attention_bwd(x, x, x, x, x, torch.zeros(1, 1, 4, dtype=torch.float16), 1.0)


# --------------------------------------------------------------------------------------------------
# SelfAttention2d


def _plain_self_attention(m: dnn.SelfAttention2d, x, num_groups, head_dim):
    """The same block written with torch.nn.functional only: the weights of ``m``, SDPA for attention."""
    n, c, h, w = x.shape
    hidden = F.group_norm(x, num_groups, m.norm.weight, m.norm.bias, m.norm.eps)
    q, k, v = F.conv2d(hidden, m.qkv.weight, m.qkv.bias).chunk(3, dim=1)
    heads = [t.reshape(n, c // head_dim, head_dim, h * w).transpose(-1, -2) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*heads)
    return x + F.conv2d(out.transpose(-1, -2).reshape(n, c, h, w), m.proj.weight, m.proj.bias)


def _self_attention(channels=64, head_dim=32, groups=8):
    torch.manual_seed(0)
    m = dnn.SelfAttention2d(channels, head_dim, groups, backend="triton").to(DEVICE)
    with torch.no_grad():
        m.proj.weight.normal_(std=0.2), m.proj.bias.normal_(std=0.2)
        m.norm.weight.normal_(1.0, 0.2), m.norm.bias.normal_(std=0.2)
    return m


def test_self_attention_starts_as_identity_and_validates():
    m = dnn.SelfAttention2d(64, 32, 8)
    x = randn(1, 64, 3, 5)
    torch.testing.assert_close(m.to(DEVICE)(x), x)
    assert m.num_heads == 2 and "num_heads=2" in repr(m)
    with pytest.raises(ValueError, match=r"num_head_channels \(48\) must be positive and divide channels \(64\)"):
        dnn.SelfAttention2d(64, 48)
    with pytest.raises(ValueError, match=r"num_groups \(24\) must be positive and divide channels \(64\)"):
        dnn.SelfAttention2d(64, 32, 24)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 64, H, W\)"):
        m(randn(1, 32, 3, 5))


def test_self_attention_matches_plain_torch():
    m = _self_attention()
    x = randn(2, 64, 5, 9, requires_grad=True)
    out = m(x)
    expected = _plain_self_attention(m, x, 8, 32)
    assert_close(out, expected, torch.float32)
    params = (x, m.qkv.weight, m.norm.weight)
    grads = torch.autograd.grad(out.square().sum(), params)
    expected_grads = torch.autograd.grad(expected.square().sum(), params)
    for grad, expected_grad in zip(grads, expected_grads):
        assert_close(grad, expected_grad, torch.float32)


def test_self_attention_bfloat16():
    m = _self_attention(channels=32, head_dim=16, groups=4)
    x = randn(1, 32, 6, 7)
    expected = _plain_self_attention(m, x, 4, 16)
    m = m.to(torch.bfloat16)
    assert_close(m(x.bfloat16()), expected, torch.bfloat16)


def test_self_attention_compiles_with_no_graph_break():
    """fullgraph=True fails on any graph break; forward and input gradient match eager."""
    m = _self_attention(channels=32, head_dim=16, groups=4)
    x = randn(2, 32, 4, 6, requires_grad=True)
    eager = m(x)
    (gx_eager,) = torch.autograd.grad(eager.square().sum(), x)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True)
    out = compiled(x)
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    assert_close(out, eager, torch.float32)
    assert_close(gx, gx_eager, torch.float32)


def test_launch_grid_keeps_batch_heads_above_65535_on_the_x_axis():
    # CUDA caps grid axes y and z at 65,535: every program sits on x, blocks of one slice consecutive
    from dxr.kernels.triton.attention import launch_grid

    for length, bh, block in ((1024, 70_000, 64), (77, 65_536, 32), (1, 1, 16), (4096, 2**20, 128)):
        grid = launch_grid(length, bh, block)
        assert len(grid) == 1 and grid[0] == -(-length // block) * bh and grid[0] <= 2**31 - 1
    with pytest.raises(ValueError, match="more than a CUDA grid holds"):
        launch_grid(2**20, 2**20, 16)


def test_many_heads_run_through_the_one_axis_grid():
    # the same code path at a size the interpreter runs: slices and blocks decoded from one program id
    q, k, v = (randn(3, 7, length, 16, seed=seed) for seed, length in ((1, 40), (2, 33), (3, 33)))
    out = ops.attention(q, k, v, backend="triton")
    assert_close(out, reference.attention(q, k, v), torch.float32)


# --------------------------------------------------------------------------------------------------
# tiles for the hardware: the pruning, the cases without a spill-free tile, and the fallback


def test_tile_table_covers_every_kernel_dtype_and_width():
    from dxr.kernels.triton import attention_tiles

    for kernel in attention_tiles.KERNELS:
        for capability in (80, 86, 90, 100):
            for element_size in (2, 4):
                for block_d in (16, 32, 64, 128, 256):
                    for rows, step, warps, stages in attention_tiles.spill_free(kernel, capability, element_size,
                                                                                block_d):
                        # half precision on tensor-core tiles of 64+ rows, float32 on small FMA tiles
                        assert (rows >= 64) == (element_size == 2) and step <= rows
                        assert warps in (4, 8) and stages in (2, 3, 4)
    with pytest.raises(ValueError, match="kernel"):
        attention_tiles.spill_free("backward", 90, 2, 64)
    with pytest.raises(ValueError, match="BLOCK_D"):
        attention_tiles.spill_free("dq", 90, 2, 48)


def test_served_cases_follow_the_tile_table(monkeypatch):
    monkeypatch.setattr(triton_attention.common, "interpreting", lambda: False)
    serves = triton_attention.serves
    # measured: every half-precision case on sm_90 but the D=256 backward; float32 backward only to D=64
    assert serves(64, 2, True, capability=90) and serves(128, 2, True, capability=90)
    assert serves(256, 2, False, capability=90) and not serves(256, 2, True, capability=90)
    assert serves(100, 4, False, capability=90) and not serves(100, 4, True, capability=90)
    assert not serves(256, 4, False, capability=90)
    assert not serves(256, 2, False, capability=80) and not serves(128, 2, True, capability=80)
    assert serves(40, 2, True, capability=80)


@pytest.mark.parametrize("capability", [80, 86, 90])
@pytest.mark.parametrize("kernel, rows, step", [("forward", "BLOCK_M", "BLOCK_N"), ("dkdv", "BLOCK_N", "BLOCK_M"),
                                                ("dq", "BLOCK_M", "BLOCK_N")])
def test_pruning_keeps_only_spill_free_tiles_that_fit_shared_memory(monkeypatch, capability, kernel, rows, step):
    from dxr.kernels.triton import attention_tiles

    monkeypatch.setattr(triton_attention.common, "interpreting", lambda: False)
    monkeypatch.setattr(triton_attention, "target_capability", lambda: capability)
    configs = triton_attention._configs(rows, step)
    prune = triton_attention._prune(kernel, rows, step)
    operands = {"forward": 1, "dkdv": 2, "dq": 2}[kernel]
    for dtype, block_d in ((torch.bfloat16, 64), (torch.float16, 32), (torch.float32, 32), (torch.float32, 64)):
        elem = torch.empty((), dtype=dtype).element_size()
        table = attention_tiles.spill_free(kernel, capability, elem, block_d)
        kept = prune(configs, {"BLOCK_D": block_d, "q_ptr": torch.empty(1, dtype=dtype)})
        assert kept
        for cfg in kept:
            tile = (cfg.kwargs[rows], cfg.kwargs[step], cfg.num_warps, cfg.num_stages)
            assert tile in table
            shared = (2 * tile[1] * block_d * tile[3] + operands * tile[0] * block_d) * elem
            assert shared <= triton_attention.shared_limit(capability)
    # a case with no spill-free tile is refused rather than compiled with spills
    with pytest.raises(RuntimeError, match="no tile compiles without spills"):
        prune(configs, {"BLOCK_D": 256, "q_ptr": torch.empty(1, dtype=torch.float32)})


def test_smaller_shared_memory_parts_drop_the_deep_pipelines():
    # sm_86/sm_89 give a block 99 KB: the 4-stage 128-row D=128 forward tiles of sm_80 (163 KB) do not fit
    assert triton_attention.shared_limit(86) < triton_attention.shared_limit(80) < triton_attention.shared_limit(90)
    a100 = triton_attention._kept_tiles("forward", 80, 2, 128)
    rtx = triton_attention._kept_tiles("forward", 86, 2, 128)
    assert rtx < a100


def test_unserved_attention_falls_back_to_sdpa_or_names_the_backend(monkeypatch):
    q, k, v = (randn(1, 2, 9, 16) for _ in range(3))
    monkeypatch.setattr(triton_attention, "attention_supports", lambda head_dim, element_size, backward: False)
    with pytest.raises(RuntimeError, match="backend='triton' does not run attention with head dim 16"):
        ops.attention(q, k, v, backend="triton")
    monkeypatch.setattr(ops, "resolve_backend", lambda backend, op, *tensors: "triton")
    assert_close(ops.attention(q, k, v), reference.attention(q, k, v))
