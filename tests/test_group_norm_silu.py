"""Triton GroupNorm(+SiLU) kernels, forward and backward, against the reference.

The reference runs in float64 on the same (already rounded) inputs, so the float32 rounding of an eager
implementation does not count against the kernels; every output is held to the tolerance of its dtype
(dx and y: x's dtype; the float32 statistics, dweight and dbias: float32).
"""

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dxr import ops
from dxr.kernels import reference
from dxr.kernels.triton import group_norm_silu as gn
from helpers import DEVICE, DTYPES, assert_close

EPS = 1e-5
LAYOUTS = ("contiguous", "channels_last")
# forced paths for the launch functions: the whole group in one tile, or small tiles shared among
# several programs per group (tiles < group, several splits, ragged last tile and channel block)
PATHS = {
    "onchip": dict(onchip_elements=1 << 20, target_programs=1),
    "split": dict(onchip_elements=0, tile_elements=256, target_programs=16),
}


def _random(shape, dtype=torch.float32, layout="contiguous", seed=0, offset=0.0):
    """Fresh normal values (+ offset) in ``dtype``, contiguous or channels-last (channels innermost)."""
    gen = torch.Generator().manual_seed(seed)
    t = (torch.randn(*shape, generator=gen, dtype=torch.float64) + offset).to(device=DEVICE, dtype=dtype)
    if layout == "channels_last":
        t = t.movedim(1, -1).contiguous().movedim(-1, 1)
    return t


def _params(channels, dtype=torch.float32, seed=100):
    """Weight around 1 and bias around 0, random per channel."""
    w = 1.0 + 0.5 * _random((channels,), dtype, seed=seed)
    return w, 0.5 * _random((channels,), dtype, seed=seed + 1)


def _reference(x, weight, bias, groups, silu, dy):
    """y, mean, rstd, dx, dweight, dbias in float64; ones/zeros stand in for a missing weight/bias."""
    n, c = x.shape[:2]
    x64 = x.detach().double().requires_grad_()
    w64 = (weight.detach().double() if weight is not None else torch.ones(c, dtype=torch.float64, device=x.device))
    b64 = (bias.detach().double() if bias is not None else torch.zeros(c, dtype=torch.float64, device=x.device))
    w64.requires_grad_()
    b64.requires_grad_()
    y = reference.group_norm_silu(x64, groups, w64, b64, EPS, silu=silu)
    y.backward(dy.double())
    var, mean = torch.var_mean(x64.detach().reshape(n, groups, -1), dim=-1, correction=0)
    return y.detach(), mean, torch.rsqrt(var + EPS), x64.grad, w64.grad, b64.grad


def _launch(x, weight, bias, groups, silu, dy, path=None, packed=False):
    """The launch functions, forward then backward, on the forced ``path`` (default: the chosen one);
    ``packed``: the plan for channels-last input, several narrow groups per tile."""
    n, c = x.shape[:2]
    s = x.numel() // (n * c)
    kw = dict(PATHS[path], channels_last=packed) if path else {}
    fwd_plan = gn.choose_plan(n, c, s, groups, **kw) if path else None
    bwd_plan = gn.choose_plan(n, c, s, groups, backward=True, **kw) if path else None
    y, mean, rstd = gn.group_norm_silu_fwd(x, weight, bias, groups, EPS, silu, plan=fwd_plan)
    dx, dw, db = gn.group_norm_silu_bwd(dy, x, weight, bias, mean, rstd, groups, silu, plan=bwd_plan)
    return y, mean, rstd, dx, dw, db


def _check_launch(x, weight, bias, groups, silu, dy, path=None, packed=False):
    """Forward, statistics and every gradient of the launch functions against the reference."""
    got = _launch(x, weight, bias, groups, silu, dy, path, packed)
    want = _reference(x, weight, bias, groups, silu, dy)
    for name, a, b in zip(("y", "mean", "rstd", "dx", "dweight", "dbias"), got, want):
        dtype = x.dtype if name in ("y", "dx") else torch.float32
        assert a.dtype == dtype, f"{name}: {a.dtype}"
        assert_close(a, b, dtype, msg=f"{name} ({path or 'chosen'} path)")
    for name, out in (("y", got[0]), ("dx", got[3])):
        assert out.shape == x.shape and out.stride() == torch.empty_like(x).stride(), f"{name} layout"
    return got


# --------------------------------------------------------------------------------------------------
# through dxr.ops and autograd


@pytest.mark.parametrize("silu", (True, False))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_op_matches_reference(dtype, layout, silu):
    # 4 channels per group, H·W = 35: ragged against every block; bf16 gradients with few channels per group
    x = _random((2, 8, 5, 7), dtype, layout).requires_grad_()
    w, b = (p.requires_grad_() for p in _params(8))
    dy = _random(x.shape, dtype, layout, seed=1)
    y = ops.group_norm_silu(x, 2, w, b, EPS, silu=silu, backend="triton")
    y.backward(dy)
    y_ref, _, _, dx_ref, dw_ref, db_ref = _reference(x, w, b, 2, silu, dy)
    assert y.dtype == dtype and y.stride() == x.stride()
    assert x.grad.dtype == dtype and x.grad.stride() == x.stride()
    assert_close(y, y_ref, dtype, msg="y")
    assert_close(x.grad, dx_ref, dtype, msg="dx")
    assert_close(w.grad, dw_ref, torch.float32, msg="dweight")
    assert_close(b.grad, db_ref, torch.float32, msg="dbias")


@pytest.mark.parametrize("affine", ("none", "weight", "bias"))
@pytest.mark.parametrize("silu", (True, False))
def test_op_without_weight_or_bias(affine, silu):
    x = _random((2, 6, 4, 5), torch.float16, "channels_last").requires_grad_()
    w, b = _params(6)
    w = w.requires_grad_() if affine == "weight" else None
    b = b.requires_grad_() if affine == "bias" else None
    dy = _random(x.shape, torch.float16, seed=2)
    y = ops.group_norm_silu(x, 3, w, b, EPS, silu=silu, backend="triton")
    y.backward(dy)
    y_ref, _, _, dx_ref, dw_ref, db_ref = _reference(x, w, b, 3, silu, dy)
    assert_close(y, y_ref, torch.float16, msg="y")
    assert_close(x.grad, dx_ref, torch.float16, msg="dx")
    if w is not None:
        assert_close(w.grad, dw_ref, torch.float32, msg="dweight")
    if b is not None:
        assert_close(b.grad, db_ref, torch.float32, msg="dbias")


def test_op_batch_one_takes_the_split_path():
    # one sample, one group of 4 × 61·67 elements: too big for one tile, so several programs share it
    x = _random((1, 4, 61, 67), torch.bfloat16).requires_grad_()
    plan = gn.choose_plan(1, 4, 61 * 67, 1)
    assert not plan.onchip and plan.splits > 1
    w, b = (p.requires_grad_() for p in _params(4))
    dy = _random(x.shape, torch.bfloat16, seed=3)
    y = ops.group_norm_silu(x, 1, w, b, EPS, backend="triton")
    y.backward(dy)
    y_ref, _, _, dx_ref, dw_ref, db_ref = _reference(x, w, b, 1, True, dy)
    assert_close(y, y_ref, torch.bfloat16, msg="y")
    assert_close(x.grad, dx_ref, torch.bfloat16, msg="dx")
    assert_close(w.grad, dw_ref, torch.float32, msg="dweight")
    assert_close(b.grad, db_ref, torch.float32, msg="dbias")


def test_opcheck():
    x = _random((2, 6, 3, 5), torch.float32, "channels_last").requires_grad_()
    w, b = (p.requires_grad_() for p in _params(6))
    torch.library.opcheck(torch.ops.dxr.group_norm_silu_fwd.default, (x, w, b, 3, EPS, True, "triton"))
    _, mean, rstd = torch.ops.dxr.group_norm_silu_fwd(x.detach(), w.detach(), None, 3, EPS, False, "triton")
    dy = _random(x.shape, seed=4)
    torch.library.opcheck(torch.ops.dxr.group_norm_silu_bwd.default,
                          (dy, x.detach(), w.detach(), None, mean, rstd, 3, False, "triton"))


# --------------------------------------------------------------------------------------------------
# launch functions: both paths, layouts, ranks, ragged sizes


@pytest.mark.slow  # an interpreter sweep: make test runs it, make test-quick leaves it out
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", PATHS)
def test_paths_match_reference(path, dtype, layout):
    # split: 72 channels make two channel blocks (the second ragged), 5·7 positions nine spatial
    # tiles (the last ragged) shared by five programs, two tiles each (the last program's second
    # tile lies past the end)
    x = _random((1, 72, 5, 7), dtype, layout)
    w, b = _params(72, dtype)
    dy = _random(x.shape, dtype, layout, seed=5)
    _check_launch(x, w, b, 1, True, dy, path)


@pytest.mark.parametrize("path", PATHS)
def test_paths_with_samples_groups_and_channel_blocks(path):
    x = _random((2, 144, 3, 5), torch.bfloat16, "channels_last")
    w, b = _params(144)
    dy = _random(x.shape, torch.bfloat16, "channels_last", seed=5)
    _check_launch(x, w, b, 2, True, dy, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n, groups, s", [(1, 1, 5 * 7), (2, 2, 3 * 5)])
def test_split_plan_shares_groups(path, n, groups, s):
    plan = gn.choose_plan(n, 72 * groups, s, groups, **PATHS[path])
    if path == "onchip":
        assert plan.onchip
    else:
        assert not plan.onchip and plan.block_c < 72 and plan.splits > 1 and plan.tiles > 1


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(3, 4, 9), (2, 4, 3, 4, 5)], ids=["3d", "5d"])
def test_spatial_ranks(shape, path, layout):
    x = _random(shape, torch.float32, layout)
    w, b = _params(4, torch.float16)
    dy = _random(shape, torch.float32, layout, seed=6)
    _check_launch(x, w, b, 2, True, dy, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape, groups", [
    ((1, 6, 7, 9), 3),  # batch 1
    ((2, 5, 3, 7), 1),  # one group
    ((2, 6, 4, 9), 6),  # one channel per group
    ((3, 8, 1, 1), 4),  # H·W = 1
    ((3, 8), 2),  # no spatial dims
    ((2, 2, 31, 37), 2),  # H·W = 1147, not a multiple of any block
], ids=["batch1", "one-group", "one-channel-per-group", "hw1", "2d", "odd-hw"])
def test_ragged_sizes(shape, groups, path):
    x = _random(shape, torch.bfloat16)
    w, b = _params(shape[1])
    dy = _random(shape, torch.bfloat16, seed=7)
    _check_launch(x, w, b, groups, True, dy, path)


@pytest.mark.parametrize("path", PATHS)
def test_large_mean(path):
    # 100 + noise: E[x²] - E[x]² in float32 would lose the variance; y, mean and rstd stay accurate
    x = _random((2, 8, 9, 11), torch.float32, offset=100.0)
    w, b = _params(8)
    n, c = x.shape[:2]
    plan = gn.choose_plan(n, c, 99, 2, **PATHS[path])
    y, mean, rstd = gn.group_norm_silu_fwd(x, w, b, 2, EPS, True, plan=plan)
    y_ref, mean_ref, rstd_ref, *_ = _reference(x, w, b, 2, True, torch.ones_like(x))
    assert_close(y, y_ref, torch.float32, msg="y")
    assert_close(mean, mean_ref, torch.float32, msg="mean")
    assert_close(rstd, rstd_ref, torch.float32, msg="rstd")


@pytest.mark.parametrize("path", PATHS)
def test_dy_in_another_layout(path):
    x = _random((2, 6, 5, 6), torch.float16, "channels_last")
    w, b = _params(6)
    dy = _random(x.shape, torch.float16, "contiguous", seed=8)
    _check_launch(x, w, b, 3, False, dy, path)
    _check_launch(x.contiguous(), w, b, 3, True, dy.to(memory_format=torch.channels_last), path)


def test_other_layouts_are_copied_and_keep_their_format():
    base = _random((2, 6, 5, 8), torch.float32, seed=9)
    dy = _random((2, 6, 5, 4), torch.float32, seed=10)
    w, b = _params(6)
    sliced = base[..., ::2]  # not dense: the output takes the suggested (contiguous) format
    permuted = _random((5, 2, 6, 4), seed=11).permute(1, 2, 0, 3)  # dense, H outermost: kept
    for x in (sliced, permuted):
        got = _check_launch(x, w, b, 3, True, dy)
        assert got[0].stride() == torch.empty_like(x).stride()


def test_weight_dtype_may_differ_from_x():
    x = _random((2, 4, 6, 5), torch.float32, "channels_last")
    w, b = _params(4, torch.bfloat16)
    dy = _random(x.shape, seed=12)
    _check_launch(x, w, b, 2, True, dy, "split")


@pytest.mark.parametrize("path", PATHS)
def test_backward_is_deterministic(path):
    x = _random((2, 12, 7, 9), torch.bfloat16, "channels_last")
    w, b = _params(12)
    dy = _random(x.shape, torch.bfloat16, seed=13)
    first = _launch(x, w, b, 3, True, dy, path)
    second = _launch(x, w, b, 3, True, dy, path)
    for name, a, b_ in zip(("y", "mean", "rstd", "dx", "dweight", "dbias"), first, second):
        assert torch.equal(a, b_), name


def test_plan_fills_the_gpu_at_batch_one():
    # a UNet GroupNorm at 64×64 with 320 channels: 32 groups alone would leave most of 132 SMs idle
    plan = gn.choose_plan(1, 320, 64 * 64, 32)
    blocks = -(-10 // plan.block_c)
    assert not plan.onchip
    assert 32 * blocks * plan.splits >= 3 * gn.DEFAULT_SMS
    assert plan.splits * plan.tiles * plan.block_s >= 64 * 64 > (plan.splits - 1) * plan.tiles * plan.block_s
    # a group that fits in one tile stays there, one program per group
    assert gn.choose_plan(1, 1280, 8 * 8, 32).onchip
    # at a large batch the groups alone fill the GPU: no split
    assert gn.choose_plan(64, 320, 64 * 64, 32).splits == 1


def test_launch_rejects_bad_input():
    x = _random((2, 6, 3))
    with pytest.raises(ValueError, match="num_groups"):
        gn.group_norm_silu_fwd(x, None, None, 4, EPS, True)
    with pytest.raises(ValueError, match="non-empty"):
        gn.group_norm_silu_fwd(x[:0], None, None, 3, EPS, True)
    with pytest.raises(TypeError, match="float32"):
        gn.group_norm_silu_fwd(x.double(), None, None, 3, EPS, True)
    _, mean, rstd = gn.group_norm_silu_fwd(x, None, None, 3, EPS, True)
    with pytest.raises(ValueError, match="dy"):
        gn.group_norm_silu_bwd(x[:1], x, None, None, mean, rstd, 3, True)
    with pytest.raises(ValueError, match="mean"):
        gn.group_norm_silu_bwd(x, x, None, None, mean[:1], rstd, 3, True)
    with pytest.raises(ValueError, match="does not cover"):
        gn.group_norm_silu_fwd(x, None, None, 3, EPS, True, plan=gn.Plan(True, 2, 2, 1, 1))
    with pytest.raises(ValueError, match="does not cover"):
        gn.group_norm_silu_bwd(x, x, None, None, mean, rstd, 3, True, plan=gn.Plan(False, 2, 1, 1, 2))


@pytest.mark.slow  # an interpreter sweep: make test runs it, make test-quick leaves it out
@settings(max_examples=10, deadline=None)
@given(
    n=st.integers(1, 2),
    groups=st.integers(1, 3),
    per_group=st.integers(1, 5),
    spatial=st.lists(st.integers(1, 6), min_size=0, max_size=3),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS),
    silu=st.booleans(),
    path=st.sampled_from(sorted(PATHS)),
    packed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fuzz_shapes(n, groups, per_group, spatial, dtype, layout, silu, path, packed, seed):
    # the reference (torch) refuses a group of one element
    assume(per_group * math.prod(spatial) > 1)
    shape = (n, groups * per_group, *spatial)
    x = _random(shape, dtype, layout, seed=seed)
    w, b = _params(shape[1], seed=seed + 1)
    dy = _random(shape, dtype, layout, seed=seed + 2)
    _check_launch(x, w, b, groups, silu, dy, path, packed)


# (shape, groups): several narrow groups share a tile: G not a multiple of the groups per tile, three
# channels per group (lanes padded within each group), every lane a channel, and one channel per group
PACKED = [((2, 20, 5, 7), 5), ((2, 12, 6, 7), 4), ((1, 64, 5, 7), 16), ((3, 8, 4, 9), 8)]


@pytest.mark.slow  # an interpreter sweep: make test runs it, make test-quick leaves it out
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape, groups", PACKED, ids=["ragged-G", "cpg3", "even", "cpg1"])
def test_several_groups_per_tile(shape, groups, path, dtype, layout):
    n, c = shape[:2]
    s = math.prod(shape[2:])
    for backward in (False, True):
        plan = gn.choose_plan(n, c, s, groups, backward=backward, channels_last=True, **PATHS[path])
        assert plan.block_g > 1 and plan.block_c >= c // groups
    x = _random(shape, dtype, layout, seed=14)
    w, b = _params(c, dtype)
    dy = _random(shape, dtype, layout, seed=15)
    _check_launch(x, w, b, groups, True, dy, path, packed=True)


def test_channels_last_plans_pack_narrow_groups():
    # the UNet's first level, 128 channels in 32 groups: 4 channels (8 bytes of fp16) per group and pixel;
    # a channels-last tile takes 16 whole groups, 64 neighbouring channels
    plan = gn.choose_plan(8, 128, 64 * 64, 32, channels_last=True)
    assert not plan.onchip and plan.block_g == 16 and plan.block_c == 4
    assert plan.block_g * plan.block_c * plan.block_s <= gn.TILE_ELEMENTS
    assert 8 * 2 * plan.splits >= 3 * gn.DEFAULT_SMS
    # wide groups take a tile of their own, and contiguous input never packs
    assert gn.choose_plan(8, 512, 32 * 32, 8, channels_last=True).block_g == 1
    assert gn.choose_plan(8, 128, 64 * 64, 32).block_g == 1
    # on-chip, packing stops where it would leave SMs without a program
    assert gn.choose_plan(1, 128, 8 * 8, 32, channels_last=True).block_g == 1
    assert gn.choose_plan(64, 128, 8 * 8, 32, channels_last=True).block_g == 8  # 64 · 4 programs
    assert gn.choose_plan(128, 128, 8 * 8, 32, channels_last=True).block_g == 16


def test_plans_with_several_groups_per_tile_are_checked():
    x = _random((2, 12, 7))
    with pytest.raises(ValueError, match="block_c must cover a group of 4 channels"):
        gn.group_norm_silu_fwd(x, None, None, 3, EPS, True, plan=gn.Plan(True, 2, 8, 1, 1, block_g=2))
    with pytest.raises(ValueError, match="block_g must be a power of two"):
        gn.group_norm_silu_fwd(x, None, None, 3, EPS, True, plan=gn.Plan(True, 4, 8, 1, 1, block_g=3))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_split_plan_with_more_tile_slots_than_tiles(layout):
    # 5 spatial tiles of 16 in 3 splits of 2: the last split's second slot lies past S, and the apply
    # pass (which takes the splits' tiles last step first) must leave it masked and cover the rest once
    x = _random((2, 12, 70), layout=layout, seed=7)
    if layout == "channels_last":  # an (N, L, C) tensor seen as (N, C, L)
        x = _random((2, 70, 12), seed=7).transpose(1, 2)
    w, b = _params(12, seed=8)
    dy = _random(tuple(x.shape), seed=9)
    plan = gn.Plan(False, 4, 16, 3, 2)
    want = _reference(x, w, b, 3, True, dy)
    y, mean, rstd = gn.group_norm_silu_fwd(x, w, b, 3, EPS, True, plan=plan)
    dx, dw, db = gn.group_norm_silu_bwd(dy, x, w, b, mean, rstd, 3, True, plan=plan)
    for name, a, ref in zip(("y", "mean", "rstd", "dx", "dweight", "dbias"), (y, mean, rstd, dx, dw, db), want):
        assert_close(a, ref, torch.float32, msg=name)


def test_register_cap_leaves_room_for_two_programs_per_sm():
    from dxr.kernels.triton import common

    assert [common.register_cap(w) for w in (1, 4, 8, 16, 32)] == [255, 255, 128, 64, 32]
    assert common.register_cap(8, programs_per_sm=3) == 80  # 65536 / (256 · 3) = 85.3, down to a multiple of 8
    for warps in (4, 8, 16):
        assert common.register_cap(warps) * 32 * warps * 2 <= common.REGISTERS_PER_SM
    with pytest.raises(ValueError, match="num_warps"):
        common.register_cap(0)
