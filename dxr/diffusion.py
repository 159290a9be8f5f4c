"""Noise schedules, the training loss, DDPM/DDIM samplers and SDEdit/ILVR translation, on ``dxr.ops``.

Notation (Ho et al. 2020): ᾱ_t = ∏_{s≤t} (1 - β_s) for t = 0 … T-1 (``alphas_cumprod``), and the forward
process q(x_t | x_0) = N(√ᾱ_t x_0, (1 - ᾱ_t) I). A model is called as ``model(x_t, t, cond)`` and
returns ε (``prediction="eps"``) or v = √ᾱ_t ε - √(1-ᾱ_t) x_0 (``prediction="v"``).

The samplers keep their whole state on the device: the timesteps in one int64 table sent before the
loop, and the noise seed as an int64 (key, offset) tensor (:func:`seed_state`) that every step reads and
then advances. Step i (from 0) reads its timestep at table[offset] and draws its noise inside
``dxr.ops.ddpm_step`` / ``ddim_step`` from Philox keyed by the call's ``seed`` at counter offset i. Nothing
is read back to the host, so a loop never waits for the device, the same ``seed`` gives the same samples,
and the step can be captured once in a CUDA graph and replayed (``cuda_graph=True``): each replay reads
the offset the previous one left, so it steps to the next timestep and draws fresh noise.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dxr import ops, profiling

Model = Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]
# applied after each step: (x_{t_prev}, t_prev) → x_{t_prev}; t_prev = -1 after the last step
Guide = Callable[[Tensor, int], Tensor]

SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("eps", "v")


def linear_schedule(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2) -> torch.Tensor:
    """ᾱ_t (float64, (num_steps,)) of the linear β schedule of Ho et al. 2020."""
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def cosine_schedule(num_steps: int = 1000, s: float = 8e-3, max_beta: float = 0.999) -> torch.Tensor:
    """ᾱ_t (float64, (num_steps,)) of the cosine schedule of Nichol & Dhariwal 2021, β clipped at max_beta."""
    steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    return torch.cumprod(1 - betas, 0)


def make_schedule(name: str, num_steps: int) -> Tensor:
    """ᾱ_t (float64) of the schedule ``name`` ("linear" or "cosine"); raises ValueError otherwise."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return linear_schedule(num_steps) if name == "linear" else cosine_schedule(num_steps)


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def step_seeds(seed: int, count: int) -> list[int]:
    """``count`` independent seeds drawn on the host from ``seed`` (SDEdit's: its forward noise, its guide's
    noise and its sampler's key)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**62, (count,), generator=generator, dtype=torch.int64).tolist()


# --------------------------------------------------------------------------------------------------
# training


def training_loss(model: Model, x0: Tensor, alphas_cumprod: Tensor, *, cond: Optional[Tensor] = None,
                  prediction: str = "eps", backend: Optional[str] = None) -> Tensor:
    """The simple loss of Ho et al. 2020 (Algorithm 1), with an ε or v target (Salimans & Ho 2022).

    x0: (N, C, H, W) clean images; alphas_cumprod: (T,) on x0's device; cond: passed to the model.
    t and ε are drawn from torch's global generator. Returns the float32 scalar mean squared error.
    """
    _check_prediction(prediction)
    t = torch.randint(0, alphas_cumprod.numel(), (x0.shape[0],), device=x0.device)   # t ~ U{0, …, T-1}
    eps = torch.randn_like(x0)                                                       # ε ~ N(0, I)
    x_t = ops.q_sample(x0, eps, t, alphas_cumprod, backend=backend)                  # √ᾱ_t x0 + √(1-ᾱ_t) ε
    if prediction == "eps":
        target = eps
    else:
        ab = alphas_cumprod[t].float().view(-1, *[1] * (x0.dim() - 1))
        target = ab.sqrt() * eps - (1 - ab).sqrt() * x0                               # v
    return F.mse_loss(model(x_t, t, cond).float(), target.float())


# --------------------------------------------------------------------------------------------------
# samplers


def seed_state(seed: int, device) -> Tensor:
    """A sampler's noise seed on ``device``: int64 (key, offset) = (seed mod 2**63, 0). Step i of a sampler
    draws with offset i (``dxr.ops.ddpm_step`` reads both on the device), and offset 0 is the noise of the
    int seed ``key``."""
    return torch.tensor([seed % 2**63, 0], dtype=torch.int64, device=device)


def cuda_graphs_available(x: Tensor) -> bool:
    """Whether a sampling loop on x can be captured in a CUDA graph (x on a CUDA device)."""
    return x.device.type == "cuda" and torch.cuda.is_available()


# one step of a chain: (x_t, state) → x_{t_prev}; it reads its timestep through state[1] and advances it
Step = Callable[[Tensor, Tensor], Tensor]


def _run_chain(step: Step, x: Tensor, state: Tensor, guide_steps: list[int], guide: Optional[Guide],
               cuda_graph: bool) -> Tensor:
    """x after one ``step`` per entry of ``guide_steps``, each followed by ``guide(x, guide_steps[i])``:
    eagerly, or (``cuda_graph`` and x on a GPU) one step captured in a CUDA graph and replayed per step,
    the guide (which takes host timesteps) running eagerly between replays. Same result either way."""
    if cuda_graph and cuda_graphs_available(x):
        return _replay_chain(step, x, state, guide_steps, guide)
    for t_next in guide_steps:
        with profiling.region("sample.step"):
            x = step(x, state)
            if guide is not None:
                x = guide(x, t_next)
    return x


def _replay_chain(step: Step, x: Tensor, state: Tensor, guide_steps: list[int], guide: Optional[Guide]) -> Tensor:
    """:func:`_run_chain` on a CUDA graph: the step runs once outside the capture on a copy of the state
    (Triton autotuning, kernel compilation and cuDNN's algorithm choice happen there, not in the graph),
    is captured reading and writing one static x, and each replay advances ``state`` on the device."""
    device = x.device
    static_x = x.clone()
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        step(static_x, state.clone())
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_x.copy_(step(static_x, state))
    for t_next in guide_steps:
        with profiling.region("sample.step"):
            graph.replay()
            if guide is not None:
                static_x.copy_(guide(static_x, t_next))
    return static_x


@torch.no_grad()
def ddpm_sample(model: Model, x_T: Tensor, alphas_cumprod: Tensor, *, cond: Optional[Tensor] = None,
                seed: int = 0, t_start: Optional[int] = None, prediction: str = "eps",
                clip_x0: Optional[float] = 1.0, variance: str = "small", guide: Optional[Guide] = None,
                backend: Optional[str] = None, cuda_graph: bool = False) -> Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) from x_T down to x_0.

    x_T: (N, C, H, W) the start, at timestep ``t_start`` (default T-1: pure noise); alphas_cumprod:
    (T,) on x_T's device. Each step is ``dxr.ops.ddpm_step`` (x0 clamped to ±clip_x0, σ_t² the
    posterior variance for "small", β_t for "large"); step i draws its noise in-kernel from the
    device seed (``seed``, i) (:func:`seed_state`). ``cuda_graph`` on a GPU captures one step (model and
    fused step) in a CUDA graph after a warm-up step and replays it once per timestep; on a CPU it runs
    the plain loop. Both give the same x_0. Returns x_0 in x_T's dtype.
    """
    _check_prediction(prediction)
    t_start = alphas_cumprod.numel() - 1 if t_start is None else t_start
    sequence = list(range(t_start, -1, -1))                       # t = t_start, …, 1, 0
    table = torch.tensor(sequence, dtype=torch.int64, device=x_T.device)
    batch = x_T.shape[0]

    def step(x: Tensor, state: Tensor) -> Tensor:
        t = table.index_select(0, state[1:]).expand(batch)         # t_i, read on the device
        model_out = model(x, t, cond)                              # ε_θ(x_t, t) or v_θ(x_t, t)
        x = ops.ddpm_step(x, model_out, t, alphas_cumprod, prediction=prediction, clip_x0=clip_x0,
                          variance=variance, seed=state, backend=backend)      # x_{t-1} = μ̃_t + σ_t z
        state[1:].add_(1)
        return x

    return _run_chain(step, x_T, seed_state(seed, x_T.device), [t - 1 for t in sequence], guide, cuda_graph)


def ddim_timesteps(t_start: int, steps: int) -> list[int]:
    """``steps`` timesteps evenly spaced from t_start down to 0 (both included, no repeats)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    steps = min(steps, t_start + 1)
    if steps == 1:
        return [t_start]
    return [round(t_start - i * t_start / (steps - 1)) for i in range(steps)]


@torch.no_grad()
def ddim_sample(model: Model, x_T: Tensor, alphas_cumprod: Tensor, *, steps: int = 50, eta: float = 0.0,
                cond: Optional[Tensor] = None, seed: int = 0, t_start: Optional[int] = None,
                prediction: str = "eps", clip_x0: Optional[float] = 1.0, guide: Optional[Guide] = None,
                backend: Optional[str] = None, cuda_graph: bool = False) -> Tensor:
    """DDIM sampling (Song et al. 2021, eq. 12) over ``steps`` timesteps from ``t_start`` (default T-1) to 0.

    Each step τ_i → τ_{i+1} is ``dxr.ops.ddim_step``: x_{τ'} = √ᾱ_{τ'} x̂0 + √(1-ᾱ_{τ'}-σ²) ε̂ + σ z, with
    σ = η √((1-ᾱ_{τ'})/(1-ᾱ_τ)) √(1-ᾱ_τ/ᾱ_{τ'}); the last step goes to τ' = -1 (ᾱ = 1), i.e. x̂0.
    eta = 0 is deterministic; for eta > 0 step i draws z in-kernel from the device seed (``seed``, i).
    ``cuda_graph`` as in :func:`ddpm_sample`: one step captured and replayed per step on a GPU, the plain
    loop on a CPU, the same result.
    """
    _check_prediction(prediction)
    t_start = alphas_cumprod.numel() - 1 if t_start is None else t_start
    sequence = ddim_timesteps(t_start, steps) + [-1]               # τ_1 > … > τ_S, then -1
    table = torch.tensor(sequence, dtype=torch.int64, device=x_T.device)
    batch = x_T.shape[0]

    def step(x: Tensor, state: Tensor) -> Tensor:
        tau = table.index_select(0, state[1:]).expand(batch)       # τ_i and τ_{i+1}, read on the device
        tau_next = table.index_select(0, state[1:] + 1).expand(batch)
        model_out = model(x, tau, cond)
        x = ops.ddim_step(x, model_out, tau, tau_next, alphas_cumprod, eta=eta, prediction=prediction,
                          clip_x0=clip_x0, seed=state, backend=backend)
        state[1:].add_(1)
        return x

    return _run_chain(step, x_T, seed_state(seed, x_T.device), sequence[1:], guide, cuda_graph)


# --------------------------------------------------------------------------------------------------
# translation


def low_pass(x: Tensor, factor: int) -> Tensor:
    """φ_N of ILVR: average-pool by ``factor`` then bilinear back to x's size (H, W multiples of factor)."""
    if factor == 1:
        return x
    return F.interpolate(F.avg_pool2d(x, factor), size=x.shape[-2:], mode="bilinear", align_corners=False)


def ilvr_guide(reference: Tensor, alphas_cumprod: Tensor, factor: int, *, seed: int = 0,
               backend: Optional[str] = None) -> Guide:
    """ILVR (Choi et al. 2021, Algorithm 1): after each step to t, x_t ← x_t + φ_N(y_t) - φ_N(x_t),
    with y_t ~ q(y_t | y) the reference diffused to t (y itself after the last step).

    reference: (N, C, H, W) with H and W multiples of ``factor``; its noise comes from a generator on
    its device seeded with ``seed``.
    """
    if factor < 1 or reference.shape[-1] % factor or reference.shape[-2] % factor:
        raise ValueError(f"the ILVR factor ({factor}) must be >= 1 and divide the image size "
                         f"{tuple(reference.shape[-2:])}")
    generator = torch.Generator(device=reference.device).manual_seed(seed)

    def guide(x: Tensor, t: int) -> Tensor:
        if t < 0:
            y_t = reference
        else:
            noise = torch.randn(reference.shape, generator=generator, device=reference.device, dtype=reference.dtype)
            y_t = ops.q_sample(reference, noise, t, alphas_cumprod, backend=backend)
        return x + low_pass(y_t, factor).to(x.dtype) - low_pass(x, factor)

    return guide


@torch.no_grad()
def sdedit(model: Model, x: Tensor, alphas_cumprod: Tensor, t0: int, *, steps: Optional[int] = None,
           eta: float = 0.0, cond: Optional[Tensor] = None, seed: int = 0, ilvr_factor: Optional[int] = None,
           prediction: str = "eps", clip_x0: Optional[float] = 1.0, backend: Optional[str] = None,
           cuda_graph: bool = False) -> Tensor:
    """SDEdit (Meng et al. 2022): diffuse x for t0 steps, then denoise it with ``model``.

    This is how DDPM-LQ (a model of LQ images) turns an HQ image into an LQ-looking one:
    x_{t0} = √ᾱ x + √(1-ᾱ) ε at timestep t0 - 1 (``dxr.ops.q_sample``), then the reverse chain back to
    x_0 — every DDPM step when ``steps`` is None, else ``steps`` DDIM steps with ``eta``. t0 ∈ [0, T]
    counts the diffusion steps: the larger, the more of x is replaced; t0 = 0 returns x unchanged.
    ``ilvr_factor`` N adds ILVR guidance that keeps φ_N (the 1/N low-pass) of x. Same seed → same result.
    ``cuda_graph`` replays the reverse chain's step from a CUDA graph on a GPU (the ILVR guide runs between
    replays), as in :func:`ddpm_sample`. Raises ValueError for t0 outside [0, T].
    """
    num_steps = alphas_cumprod.numel()
    if not 0 <= t0 <= num_steps:
        raise ValueError(f"t0 must lie in [0, {num_steps}] (diffusion steps), got {t0}")
    if t0 == 0:
        return x.clone()
    seeds = step_seeds(seed, 3)
    generator = torch.Generator(device=x.device).manual_seed(seeds[0])
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x_t0 = ops.q_sample(x, eps, t0 - 1, alphas_cumprod, backend=backend)
    guide = ilvr_guide(x, alphas_cumprod, ilvr_factor, seed=seeds[1], backend=backend) if ilvr_factor else None
    common = dict(cond=cond, seed=seeds[2], t_start=t0 - 1, prediction=prediction, clip_x0=clip_x0, guide=guide,
                  backend=backend, cuda_graph=cuda_graph)
    if steps is None:
        return ddpm_sample(model, x_t0, alphas_cumprod, **common)
    return ddim_sample(model, x_t0, alphas_cumprod, steps=steps, eta=eta, **common)


# --------------------------------------------------------------------------------------------------
# a denoiser with its schedule


class GaussianDiffusion(nn.Module):
    """A denoiser ``model(x_t, t, cond)`` with its noise schedule: the unit that is trained and sampled.

    A conditional model with ``residual`` diffuses the residual x0 − cond instead of x0 (SRDiff's
    formulation of restoration: the network learns only what the condition lacks); :meth:`sample`
    adds cond back (:meth:`to_image`).

    ``forward(x0, cond=None, part="loss")`` returns ``(loss, {})`` — the :func:`training_loss` — in the
    (loss, parts) form the training loop shares with MUNIT. :meth:`sample` and :meth:`sdedit` run the
    samplers with this model's prediction type and backend. The schedule ᾱ (float64) is neither a
    parameter nor a buffer, so casting the module to half precision never rounds it; it moves to the
    device of the images on first use.
    """

    def __init__(self, denoiser: nn.Module, alphas_cumprod: Tensor, *, prediction: str = "eps",
                 backend: Optional[str] = None, residual: bool = False):
        super().__init__()
        _check_prediction(prediction)
        self.denoiser, self.prediction, self.backend, self.residual = denoiser, prediction, backend, residual
        self._alphas_cumprod = alphas_cumprod.detach().to(torch.float64)

    @property
    def num_steps(self) -> int:
        return self._alphas_cumprod.numel()

    def alphas_cumprod(self, device) -> Tensor:
        """ᾱ (T,) float64 on ``device``."""
        if self._alphas_cumprod.device != device:
            self._alphas_cumprod = self._alphas_cumprod.to(device)
        return self._alphas_cumprod

    def forward(self, x0: Tensor, cond: Optional[Tensor] = None, part: str = "loss") -> tuple[Tensor, dict]:
        if part != "loss":
            raise ValueError(f"a diffusion model has one training objective, part='loss'; got {part!r}")
        target = x0 - cond if self.residual and cond is not None else x0
        loss = training_loss(self.denoiser, target, self.alphas_cumprod(x0.device), cond=cond,
                             prediction=self.prediction, backend=self.backend)
        return loss, {}

    def to_image(self, sample: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        """A sample of the diffused variable as an image: ``cond + sample`` for a residual model
        (clamped to [-1, 1]), else the sample itself."""
        if self.residual and cond is not None:
            return (cond.to(sample.dtype) + sample).clamp(-1, 1)
        return sample

    @torch.no_grad()
    def sample(self, shape: tuple, *, cond: Optional[Tensor] = None, steps: Optional[int] = None, eta: float = 0.0,
               seed: int = 0, device=None, dtype=torch.float32, cuda_graph: bool = False) -> Tensor:
        """Images of ``shape`` from x_T ~ N(0, I) drawn with ``seed``: every DDPM step when ``steps`` is
        None, else ``steps`` DDIM steps with ``eta``. ``device`` defaults to the model's. ``cuda_graph``
        replays each step from a CUDA graph on a GPU (see :func:`ddpm_sample`), the same images."""
        device = device or next(self.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)
        x_T = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        common = dict(cond=cond, seed=seed + 1, prediction=self.prediction, backend=self.backend,
                      cuda_graph=cuda_graph)
        if steps is None:
            out = ddpm_sample(self.denoiser, x_T, self.alphas_cumprod(device), **common)
        else:
            out = ddim_sample(self.denoiser, x_T, self.alphas_cumprod(device), steps=steps, eta=eta, **common)
        return self.to_image(out, cond)

    @torch.no_grad()
    def sdedit(self, x: Tensor, t0: int, *, steps: Optional[int] = None, eta: float = 0.0,
               cond: Optional[Tensor] = None, seed: int = 0, ilvr_factor: Optional[int] = None,
               cuda_graph: bool = False) -> Tensor:
        """:func:`sdedit` with this model."""
        return sdedit(self.denoiser, x, self.alphas_cumprod(x.device), t0, steps=steps, eta=eta, cond=cond,
                      seed=seed, ilvr_factor=ilvr_factor, prediction=self.prediction, backend=self.backend,
                      cuda_graph=cuda_graph)


__all__ = [
    "GaussianDiffusion", "linear_schedule", "cosine_schedule", "make_schedule", "step_seeds", "seed_state",
    "cuda_graphs_available", "training_loss", "ddpm_sample", "ddim_timesteps", "ddim_sample", "low_pass",
    "ilvr_guide", "sdedit",
]
