"""Triton AdaIN (forward and backward) against the eager reference, on both kernel paths and layouts."""

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from dxr import ops
from dxr.kernels import reference
from dxr.kernels.triton import adain as kernels
from dxr.kernels.triton.adain import AdainConfig
from helpers import DEVICE, DTYPES, assert_close, randn

EPS = 1e-5
LAYOUTS = ("nchw", "channels_last")
# small tiles so that C and S are ragged against them: several row blocks, loop steps and chunks
ON_CHIP = AdainConfig(split=False, block_c=4, block_s=64)
SPLIT = AdainConfig(split=True, block_c=2, block_s=8, splits=3)
PATHS = {"on_chip": ON_CHIP, "split": SPLIT}


def _inputs(shape, dtype, layout="nchw", seed=0, offset=0.0):
    """x (in ``layout``), scale, shift and dy, all random, in ``dtype``."""
    x = randn(*shape, seed=seed) + offset
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    scale = randn(*shape[:2], dtype=dtype, seed=seed + 1)
    shift = randn(*shape[:2], dtype=dtype, seed=seed + 2)
    dy = randn(*shape, dtype=dtype, seed=seed + 3)
    return x, scale, shift, dy


def _reference(x, scale, shift, dy, dtype=torch.float32):
    """Reference output and gradients (dx, dscale, dshift), computed in ``dtype`` from the same inputs."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, scale, shift)]
    y = reference.adain(*leaves, EPS)
    y.backward(dy.to(dtype))
    return (y.detach(), *(t.grad for t in leaves))


def _same_format(a, b):
    return a.stride() == b.stride()


def _check_launch(x, scale, shift, dy, config):
    """Launch functions with ``config`` against the float32 reference: y, mean, rstd and every gradient."""
    dtype = x.dtype
    y, mean, rstd = kernels.adain_fwd(x, scale, shift, EPS, config)
    dx, dscale, dshift = kernels.adain_bwd(dy, x, scale, mean, rstd, config)
    y_ref, dx_ref, dscale_ref, dshift_ref = _reference(x, scale, shift, dy)
    var_ref, mean_ref = torch.var_mean(x.float().flatten(2), dim=2, correction=0)
    assert y.dtype == dtype and dx.dtype == dtype and _same_format(y, x) and _same_format(dx, x)
    assert mean.dtype == rstd.dtype == dscale.dtype == dshift.dtype == torch.float32
    assert_close(y, y_ref, dtype, msg="y")
    assert_close(mean, mean_ref, torch.float32, msg="mean")
    assert_close(rstd, torch.rsqrt(var_ref + EPS), torch.float32, msg="rstd")
    assert_close(dx, dx_ref, dtype, msg="dx")
    assert_close(dscale, dscale_ref, torch.float32, msg="dscale")
    assert_close(dshift, dshift_ref, torch.float32, msg="dshift")
    return y, dx


# --------------------------------------------------------------------------------------------------
# the op, through dxr.ops and autograd


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_op_matches_reference(dtype, layout):
    x, scale, shift, dy = _inputs((2, 5, 6, 7), dtype, layout)
    leaves = [t.clone().requires_grad_() for t in (x, scale, shift)]
    y = ops.adain(*leaves, EPS, backend="triton")
    y.backward(dy)
    y_ref, dx_ref, dscale_ref, dshift_ref = _reference(x, scale, shift, dy)
    assert y.dtype == dtype and _same_format(y, x) and _same_format(leaves[0].grad, x)
    assert_close(y, y_ref, dtype, msg="y")
    for name, got, want in zip(("dx", "dscale", "dshift"), (t.grad for t in leaves), (dx_ref, dscale_ref, dshift_ref)):
        assert got.dtype == dtype
        assert_close(got, want, dtype, msg=name)


@pytest.mark.parametrize(
    "shape, layout",
    [((3, 4, 37), "nchw"), ((2, 3, 3, 4, 5), "nchw"), ((2, 3, 3, 4, 5), "channels_last"), ((1, 2, 150, 150), "nchw")],
    ids=["3d", "5d", "5d-channels_last", "long-rows"],
)
def test_op_other_ranks_and_long_rows(shape, layout):
    """(N, C, L) and (N, C, D, H, W) inputs; rows too long to keep on chip take the split path by default."""
    x, scale, shift, dy = _inputs(shape, torch.float32, layout)
    leaves = [t.clone().requires_grad_() for t in (x, scale, shift)]
    y = ops.adain(*leaves, EPS, backend="triton")
    y.backward(dy)
    y_ref, *grads_ref = _reference(x, scale, shift, dy)
    assert _same_format(y, x)
    assert_close(y, y_ref, msg="y")
    for name, leaf, want in zip(("dx", "dscale", "dshift"), leaves, grads_ref):
        assert_close(leaf.grad, want, torch.float32, msg=name)


# --------------------------------------------------------------------------------------------------
# both kernel paths, forced


@pytest.mark.slow  # an interpreter sweep: make test runs it, make test-quick leaves it out
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_paths_match_reference(dtype, layout, path):
    _check_launch(*_inputs((2, 5, 6, 7), dtype, layout, seed=4), PATHS[path])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape, layout", [
    ((1, 1, 1), "nchw"), ((1, 3, 1, 1), "channels_last"), ((3, 1, 5, 5), "channels_last"),
    ((1, 1, 50), "nchw"), ((4, 2, 1), "nchw"), ((1, 6, 3, 3), "channels_last"),
])
def test_ragged_and_degenerate_sizes(shape, layout, path):
    x, scale, shift, dy = _inputs(shape, torch.float32, layout, seed=5)
    y, dx = _check_launch(x, scale, shift, dy, PATHS[path])
    if x[0, 0].numel() == 1:
        # var = 0: x̂ = 0, so y is the shift and only dshift = dy is non-zero
        assert torch.equal(y.flatten(2)[..., 0], shift)
        assert torch.equal(dx, torch.zeros_like(dx))


def test_dy_in_another_layout_and_non_dense_x():
    x, scale, shift, dy = _inputs((2, 5, 4, 6), torch.float32, "channels_last", seed=6)
    y_ref, dx_ref, dscale_ref, dshift_ref = _reference(x, scale, shift, dy)
    y, mean, rstd = kernels.adain_fwd(x, scale, shift, EPS)
    for dy_layout in (dy.contiguous(), dy.to(memory_format=torch.channels_last), dy.transpose(2, 3).contiguous().transpose(2, 3)):
        dx, dscale, dshift = kernels.adain_bwd(dy_layout, x, scale, mean, rstd)
        assert _same_format(dx, x)
        assert_close(dx, dx_ref, msg="dx")
        assert_close(dscale, dscale_ref, torch.float32, msg="dscale")
        assert_close(dshift, dshift_ref, torch.float32, msg="dshift")
    # a channel slice is neither layout: it runs on a contiguous copy
    wide = randn(2, 9, 4, 6, seed=7)
    sliced = wide[:, 2:7]
    y, mean, rstd = kernels.adain_fwd(sliced, scale, shift, EPS)
    assert_close(y, reference.adain(sliced, scale, shift, EPS), msg="y of a slice")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_large_mean_keeps_float32_accuracy(offset, path):
    """Statistics of x - (a value of the row): y is as exact as for a zero-mean input, where one float32
    pass of E[x²] - E[x]² would lose the variance entirely (offset²·2⁻²⁴ ≫ var = 1)."""
    shape = (2, 3, 50)
    x, scale, shift, dy = _inputs(shape, torch.float32, seed=8, offset=offset)
    config = PATHS[path]
    y, mean, rstd = kernels.adain_fwd(x, scale, shift, EPS, config)
    x64 = x.double()
    var64, mean64 = torch.var_mean(x64, dim=2, correction=0)
    assert_close(y, reference.adain(x64, scale.double(), shift.double(), EPS), torch.float32, msg="y")
    # the stored mean is the float32 nearest the true mean, within half an ulp
    assert torch.all((mean.double() - mean64).abs() <= 2.0**-24 * mean64.abs())
    assert_close(rstd, torch.rsqrt(var64 + EPS), torch.float32, msg="rstd")
    # the backward, in float64 from the same stored mean and rstd, is its contract
    dx, dscale, dshift = kernels.adain_bwd(dy, x, scale, mean, rstd, config)
    xhat = (x64 - mean.double()[..., None]) * rstd.double()[..., None]
    dy64 = dy.double()
    dscale64, dshift64 = (dy64 * xhat).sum(2), dy64.sum(2)
    dx64 = (rstd.double() * scale.double())[..., None] * (dy64 - dshift64[..., None] / 50 - xhat * dscale64[..., None] / 50)
    assert_close(dx, dx64, torch.float32, msg="dx")
    assert_close(dscale, dscale64, torch.float32, msg="dscale")
    assert_close(dshift, dshift64, torch.float32, msg="dshift")


@pytest.mark.parametrize("path", PATHS)
def test_deterministic(path):
    x, scale, shift, dy = _inputs((2, 5, 6, 7), torch.bfloat16, "channels_last", seed=9)
    first = kernels.adain_fwd(x, scale, shift, EPS, PATHS[path])
    again = kernels.adain_fwd(x, scale, shift, EPS, PATHS[path])
    grads = kernels.adain_bwd(dy, x, scale, first[1], first[2], PATHS[path])
    grads_again = kernels.adain_bwd(dy, x, scale, first[1], first[2], PATHS[path])
    for a, b in zip(first + grads, again + grads_again):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# configuration


def test_config_is_validated():
    x, scale, shift, _ = _inputs((1, 2, 70), torch.float32)
    with pytest.raises(ValueError, match="block_s >= S = 70"):
        kernels.adain_fwd(x, scale, shift, EPS, AdainConfig(split=False, block_c=2, block_s=64))
    with pytest.raises(ValueError, match="block_c must be a power of two"):
        kernels.adain_fwd(x, scale, shift, EPS, AdainConfig(split=True, block_c=3, block_s=64))
    with pytest.raises(ValueError, match="splits must be >= 1"):
        kernels.adain_fwd(x, scale, shift, EPS, AdainConfig(split=True, block_c=2, block_s=64, splits=0))


def test_config_fills_a_gpu(monkeypatch):
    """With 132 multiprocessors: many short rows stay on chip; few long rows are split; long rows that do
    not fit loop; channels_last tiles take 64 contiguous channels."""
    monkeypatch.setattr(kernels, "_multiprocessors", lambda device: 132)
    cpu = torch.device("cpu")
    many = kernels.choose_config(8, 256, 32 * 32, False, cpu)
    assert not many.split and many.block_s == 1024
    few = kernels.choose_config(1, 32, 128 * 128, False, cpu)
    assert few.split and 32 * kernels._chunking(128 * 128, few)[1] >= 132
    huge = kernels.choose_config(16, 512, 256 * 256, False, cpu)
    assert huge.split and huge.splits == 1
    nhwc = kernels.choose_config(4, 256, 64 * 64, True, cpu, backward=True)
    assert nhwc.split and nhwc.block_c == 64 and nhwc.block_c * nhwc.block_s <= 4096
    assert 4 * (256 // 64) * kernels._chunking(64 * 64, nhwc)[1] >= 132


def test_channels_last_rows_too_long_for_64_channels_take_fewer_on_chip(monkeypatch):
    """The on-chip tile stays within GroupNorm's limits (its kernels compile spill-free there): 16×16 rows
    in channels_last take 32 channels per program rather than 64; rows that fit no 16 channels split."""
    monkeypatch.setattr(kernels, "_multiprocessors", lambda device: 132)
    cpu = torch.device("cpu")
    rows = kernels.choose_config(8, 512, 16 * 16, True, cpu)
    assert not rows.split and rows.block_c == 32 and rows.block_c * rows.block_s <= 8192
    assert kernels.choose_config(8, 512, 16 * 16, True, cpu, backward=True).block_c == 16
    assert kernels.choose_config(8, 512, 32 * 32, True, cpu, backward=True).split


# --------------------------------------------------------------------------------------------------
# registration and a shape fuzz


@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(layout):
    x, scale, shift, _ = _inputs((2, 3, 4, 5), torch.float32, layout, seed=10)
    args = (x.requires_grad_(), scale.requires_grad_(), shift.requires_grad_(), EPS, "triton")
    torch.library.opcheck(torch.ops.dxr.adain_fwd.default, args)


@pytest.mark.slow  # an interpreter sweep: make test runs it, make test-quick leaves it out
@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 6),
    spatial=st.lists(st.integers(1, 9), min_size=1, max_size=2),
    dtype=st.sampled_from(DTYPES),
    channels_last=st.booleans(),
    path=st.sampled_from([None, "on_chip", "split"]),
    seed=st.integers(0, 2**16),
)
def test_shape_fuzz(n, c, spatial, dtype, channels_last, path, seed):
    shape = (n, c, *spatial)
    layout = "channels_last" if channels_last and len(shape) == 4 else "nchw"
    x, scale, shift, dy = _inputs(shape, dtype, layout, seed=seed)
    config = {"on_chip": AdainConfig(split=False, block_c=2, block_s=128), "split": SPLIT}.get(path)
    _check_launch(x, scale, shift, dy, config)


@triton.jit
def _offsets_table(out_ptr, c0, s0, stride_c, stride_s, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                   CHANNELS_LAST: tl.constexpr):
    c = c0 + tl.arange(0, BLOCK_C)
    s = s0 + tl.arange(0, BLOCK_S)
    offs = kernels._tile_offsets(c, s, stride_c, stride_s, CHANNELS_LAST)
    tl.store(out_ptr + tl.arange(0, BLOCK_C)[:, None] * BLOCK_S + tl.arange(0, BLOCK_S)[None, :], offs)


@pytest.mark.parametrize("channels_last", [False, True])
def test_tile_offsets_are_64_bit_where_a_stride_product_passes_2_31(channels_last):
    # x = (C, N, S) transposed to (N, C, S) is read in place with a channel stride of N·S: with C = 40,000,
    # N = 8, S = 10,000 one sample holds 4e8 elements, but c · stride_c reaches 3.2e9 > 2³¹
    n, c, s = 8, 40_000, 10_000
    if channels_last:
        stride_c, stride_s, c0, s0 = 1, n * c, 0, s - 16  # x = (S, N, C) transposed: s · N·C passes 2³¹
    else:
        stride_c, stride_s, c0, s0 = n * s, 1, c - 16, 0
    out = torch.empty((16, 16), dtype=torch.int64, device=DEVICE)
    _offsets_table[(1,)](out, c0, s0, stride_c, stride_s, BLOCK_C=16, BLOCK_S=16, CHANNELS_LAST=channels_last)
    cs = torch.arange(c0, c0 + 16, dtype=torch.int64)[:, None]
    ss = torch.arange(s0, s0 + 16, dtype=torch.int64)[None, :]
    expected = cs * stride_c + ss * stride_s
    assert expected.max() > 2**31
    assert torch.equal(out.cpu(), expected)
