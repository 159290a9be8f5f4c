"""The denoising UNet and MUNIT: shapes, dtypes, layouts, gradients, errors, and the fused backends.

The cross-backend tests need the Triton kernels dxr/kernels/triton/{group_norm,attention,adain}.py; they
run under the interpreter on a CPU (tests/conftest.py sets TRITON_INTERPRET=1), so the inputs are tiny.
"""

import importlib.util
import math

import pytest
import torch

from helpers import DEVICE, DTYPES, assert_close, randn
from dxr.models import MUNIT, UNet
from dxr.models.unet import timestep_embedding

TINY_UNET = dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), image_size=8,
                 num_head_channels=8, num_groups=8)
TINY_MUNIT = dict(dim=8, mlp_dim=16, n_downsample=1, n_res=1, dis_dim=8, dis_layers=2, dis_scales=2)


def _randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere: the zero-initialised output convolutions and attention projections
    would otherwise hide every difference."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            scale = 1 / math.sqrt(p[0].numel()) if p.dim() > 1 else 0.3
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return module


def _triton_modules_present(*names: str) -> bool:
    return all(importlib.util.find_spec(f"dxr.kernels.triton.{n}") is not None for n in names)


# --------------------------------------------------------------------------------------------------
# UNet


def test_timestep_embedding_is_cosines_then_sines():
    t = torch.tensor([0, 3, 999])
    emb = timestep_embedding(t, 9)
    assert emb.shape == (3, 9) and emb.dtype == torch.float32
    freqs = torch.exp(-math.log(10000.0) * torch.arange(4) / 4)
    torch.testing.assert_close(emb[:, :4], torch.cos(t[:, None] * freqs))
    torch.testing.assert_close(emb[:, 4:8], torch.sin(t[:, None] * freqs))
    assert (emb[:, 8] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cond_channels", [0, 1])
def test_unet_forward_backward_shapes_and_dtypes(dtype, cond_channels):
    model = _randomise(UNet(**TINY_UNET, cond_channels=cond_channels, dropout=0.1)).to(DEVICE, dtype)
    x = randn(3, 1, 8, 12, dtype=dtype, requires_grad=True, seed=1)  # not square
    cond = randn(3, 1, 8, 12, dtype=dtype, seed=2) if cond_channels else None
    out = model(x, torch.tensor([0, 17, 999], device=DEVICE), cond)
    assert out.shape == x.shape and out.dtype == dtype and torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_unet_channels_last_matches_contiguous():
    model = _randomise(UNet(**TINY_UNET)).to(DEVICE)
    x = randn(2, 1, 8, 8, seed=3)
    t = torch.tensor([5, 50], device=DEVICE)
    expected = model(x, t)
    got = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t)
    assert_close(got, expected, torch.float32)


def test_untrained_unet_predicts_zero():
    model = UNet(**TINY_UNET).to(DEVICE)
    out = model(randn(2, 1, 8, 8), torch.tensor([1, 2], device=DEVICE))
    assert (out == 0).all()


def test_unet_bad_inputs_are_clear_errors():
    model = UNet(**TINY_UNET, cond_channels=1)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="cond must have shape"):
        model(x, t)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 1, H, W\)"):
        model(torch.randn(2, 3, 8, 8), t, x)
    with pytest.raises(ValueError, match="multiples of 2"):
        model(torch.randn(2, 1, 7, 8), t, torch.randn(2, 1, 7, 8))
    with pytest.raises(ValueError, match="unconditional"):
        UNet(**TINY_UNET)(x, t, x)
    with pytest.raises(ValueError, match="num_groups"):
        UNet(**{**TINY_UNET, "base_channels": 12})


@pytest.mark.skipif(not _triton_modules_present("group_norm_silu", "attention"),
                    reason="needs dxr/kernels/triton/group_norm_silu.py and attention.py")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.slow
def test_unet_triton_backend_matches_torch(dtype):
    """The whole UNet, forward and every gradient, on the fused kernels against the reference ops."""
    reference = _randomise(UNet(**TINY_UNET, cond_channels=1, backend="torch")).to(DEVICE, dtype)
    fused = UNet(**TINY_UNET, cond_channels=1, backend="triton").to(DEVICE, dtype)
    fused.load_state_dict(reference.state_dict())
    x, cond = randn(2, 1, 8, 8, dtype=dtype, seed=4), randn(2, 1, 8, 8, dtype=dtype, seed=5)
    t = torch.tensor([3, 700], device=DEVICE)
    outs = []
    for model in (reference, fused):
        xr = x.clone().requires_grad_(True)
        out = model(xr, t, cond)
        out.float().mul(torch.linspace(-1, 1, out.numel(), device=DEVICE).view(out.shape)).sum().backward()
        outs.append((out, xr.grad, {n: p.grad for n, p in model.named_parameters()}))
    (out_r, dx_r, grads_r), (out_f, dx_f, grads_f) = outs
    assert_close(out_f, out_r.float(), dtype)
    assert_close(dx_f, dx_r.float(), dtype)
    for name, grad in grads_r.items():
        # a weight gradient sums over the batch and every pixel
        assert_close(grads_f[name], grad.float(), dtype, scale=4, msg=name)


# --------------------------------------------------------------------------------------------------
# MUNIT


@pytest.mark.parametrize("dtype", DTYPES)
def test_munit_translation_shapes_and_finite_losses(dtype):
    torch.manual_seed(0)
    model = MUNIT(**TINY_MUNIT).to(DEVICE, dtype)
    lq, hq = randn(2, 1, 16, 16, dtype=dtype, seed=6).tanh(), randn(2, 1, 16, 16, dtype=dtype, seed=7).tanh()
    content, style = model.gen_hq.encode(hq)
    assert content.shape == (2, 16, 8, 8) and style.shape == (2, 8)
    for out in (model.hq_to_lq(hq), model.hq_to_lq(hq, lq[:1]), model.hq_to_lq(hq, lq), model.lq_to_hq(lq)):
        assert out.shape == hq.shape and out.dtype == dtype and out.abs().max() <= 1
    model.config.recon_x_cyc_w = 10.0
    gen_loss, parts = model(lq, hq, "gen")
    assert set(parts) == {"gan", "recon_x", "recon_s", "recon_c", "recon_cyc"}
    assert all(torch.isfinite(v) and v > 0 for v in parts.values()) and torch.isfinite(gen_loss)
    weighted = parts["gan"] + 10 * parts["recon_x"] + parts["recon_s"] + parts["recon_c"] + 10 * parts["recon_cyc"]
    torch.testing.assert_close(gen_loss, weighted)
    dis_loss, dis_parts = model(lq, hq, "dis")
    assert torch.isfinite(dis_loss) and set(dis_parts) == {"lq", "hq"}
    torch.testing.assert_close(dis_loss, dis_parts["lq"] + dis_parts["hq"])


def test_munit_updates_reach_only_their_own_networks():
    torch.manual_seed(0)
    model = MUNIT(**TINY_MUNIT).to(DEVICE)
    lq, hq = randn(2, 1, 16, 16, seed=8).tanh(), randn(2, 1, 16, 16, seed=9).tanh()
    model(lq, hq, "dis")[0].backward()
    assert all(p.grad is not None for p in model.discriminator_parameters())
    assert all(p.grad is None for p in model.generator_parameters())
    model.zero_grad(set_to_none=True)
    model(lq, hq, "gen")[0].backward()
    assert all(p.grad is not None for p in model.generator_parameters())
    with pytest.raises(ValueError, match="part"):
        model(lq, hq, "both")


def test_munit_defaults_are_nvlabs_weights():
    c = MUNIT(**TINY_MUNIT).config
    assert (c.gan_w, c.recon_x_w, c.recon_s_w, c.recon_c_w, c.recon_x_cyc_w, c.style_dim) == (1, 10, 1, 1, 0, 8)
    assert (c.lr, c.beta1, c.beta2, c.weight_decay) == (1e-4, 0.5, 0.999, 1e-4)


@pytest.mark.skipif(not _triton_modules_present("group_norm_silu", "adain"),
                    reason="needs dxr/kernels/triton/group_norm_silu.py and adain.py")
def test_munit_generator_triton_backend_matches_torch():
    torch.manual_seed(0)
    reference = MUNIT(**TINY_MUNIT, backend="torch").to(DEVICE)
    fused = MUNIT(**TINY_MUNIT, backend="triton").to(DEVICE)
    fused.load_state_dict(reference.state_dict())
    hq, lq = randn(2, 1, 16, 16, seed=10).tanh(), randn(2, 1, 16, 16, seed=11).tanh()
    expected = reference.hq_to_lq(hq, lq)
    assert_close(fused.hq_to_lq(hq, lq), expected, torch.float32)
