"""What the benchmarks run: the cases, the backends, the timed callables and their traffic.

Shared by the pytest-benchmark suites (``bench/test_bench_*.py``) and ``bench/gpu_check.py``.

Each op is one :class:`OpWorkload` record in :data:`WORKLOADS`: its cases, how to make its inputs and call
it, its labels, traffic and arithmetic; a new op is one more record there. A :class:`Case` is one op at one
shape. :func:`cases` lists them: shapes taken from diffusion UNets (and the MUNIT decoder for AdaIN) on a
GPU, modest ones on a CPU, tiny ones for ``gpu_check --device cpu --quick``. :func:`runner` builds the
zero-argument callable that is timed, for one backend:

- "triton", "cuda": the fused kernels through the public ``dxr.ops`` API;
- "eager": the eager reference ``dxr.kernels.reference`` (the baseline);
- "compile": ``torch.compile`` of that reference;
- "sdpa_flash", "sdpa_efficient": PyTorch's ``scaled_dot_product_attention`` held to one backend
  (attention only).

Modes: "fwd" (inputs that need no gradient), "bwd" (the backward alone, of a forward made once) and
"fwd+bwd"; the noise-schedule ops (q_sample, ddpm_step, ddim_step) have "fwd" only. :func:`traffic_bytes`
and :func:`flops` give the minimal memory traffic and the arithmetic of a case, from which GB/s and TFLOP/s
follow.
"""

from __future__ import annotations

import functools
import math
import re
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from dxr import ops
from dxr.kernels import reference

KERNEL_BACKENDS = ("triton", "cuda")
SDPA_BACKENDS = ("sdpa_flash", "sdpa_efficient")
FWD, BWD, FWD_BWD = "fwd", "bwd", "fwd+bwd"
NUM_STEPS = 1000  # length of the noise schedule the q_sample, DDPM and DDIM cases use
SEED = 1234  # seed of the in-kernel (and the reference's) noise in the timed DDPM and DDIM steps
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the pytest suites run


class Unavailable(Exception):
    """A backend that cannot run a case on this machine; the message says why."""


@dataclass(frozen=True)
class Case:
    """One op at one shape.

    shape: x's (N, C, *spatial) for the norms and the noise-schedule ops, (B, H, Lq, Lk, D) for attention.
    options: the op's keyword arguments that shape the work (num_groups, eta), as (name, value) pairs.
    """

    op: str
    shape: tuple
    channels_last: bool = False
    options: tuple = ()

    @property
    def kwargs(self) -> dict:
        return dict(self.options)

    @property
    def id(self) -> str:
        """The label without spaces, for test ids."""
        return str(self).replace(" ", "_")

    def __str__(self) -> str:
        return WORKLOADS[self.op].label(self)


def _norm(op, *shapes, channels_last=(), **options):
    return [Case(op, s, False, tuple(options.items())) for s in shapes] + \
           [Case(op, s, True, tuple(options.items())) for s in channels_last]


def _steps(op, *shapes, **options):
    return [Case(op, s, False, tuple(options.items())) for s in shapes]


def _attention(*shapes):
    return [Case("attention", s) for s in shapes]


# --------------------------------------------------------------------------------------------------
# what each op needs: its inputs, its call, its labels, its traffic and arithmetic


def _shape_label(case: Case) -> str:
    """"8x128x64x64 channels_last num_groups=32"."""
    label = "x".join(map(str, case.shape))
    if case.channels_last:
        label += " channels_last"
    return " ".join([label, *(f"{name}={value}" for name, value in case.options)])


def _attention_label(case: Case) -> str:
    """"B4 H8 L1024 D64", or "... Lq40 Lk72 ..." when the lengths differ."""
    b, h, lq, lk, d = case.shape
    lengths = f"L{lq}" if lq == lk else f"Lq{lq} Lk{lk}"
    return f"B{b} H{h} {lengths} D{d}"


def _schedule(device) -> Tensor:
    """ᾱ_t of the linear β schedule of Ho et al. (β from 1e-4 to 0.02), float32."""
    betas = torch.linspace(1e-4, 0.02, NUM_STEPS, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).to(device=device, dtype=torch.float32)


# input makers: (case, normal(*shape, layout=False), generator, device) -> tensors by argument name


def _group_norm_inputs(case, normal, gen, device) -> dict:
    c = case.shape[1]
    return {"x": normal(*case.shape, layout=True), "weight": normal(c), "bias": normal(c),
            "dy": normal(*case.shape, layout=True)}


def _adain_inputs(case, normal, gen, device) -> dict:
    n, c = case.shape[:2]
    return {"x": normal(*case.shape, layout=True), "scale": normal(n, c), "shift": normal(n, c),
            "dy": normal(*case.shape, layout=True)}


def _step_inputs(case, normal, gen, device) -> dict:
    t = torch.randint(1, NUM_STEPS, (case.shape[0],), generator=gen, device=device)
    return {"x": normal(*case.shape), "other": normal(*case.shape), "noise": normal(*case.shape), "t": t,
            "alphas_cumprod": _schedule(device)}


def _ddim_inputs(case, normal, gen, device) -> dict:
    inputs = _step_inputs(case, normal, gen, device)
    inputs["t_prev"] = (inputs["t"] - NUM_STEPS // 50).clamp(min=-1)
    return inputs


def _attention_inputs(case, normal, gen, device) -> dict:
    b, h, lq, lk, d = case.shape
    return {"q": normal(b, h, lq, d), "k": normal(b, h, lk, d), "v": normal(b, h, lk, d), "dy": normal(b, h, lq, d)}


# calls: (fn, case, inputs, draw_noise) -> output, where fn is dxr.ops.<op> (with its backend bound), the
# reference or its compiled copy


def _noise(inputs: dict, draw_noise: bool) -> dict:
    """The steps' noise argument: drawn by the op from SEED, or the inputs' explicit z."""
    return {"seed": SEED} if draw_noise else {"noise": inputs["noise"]}


def _group_norm_call(fn, case, inputs, draw_noise):
    return fn(inputs["x"], case.kwargs["num_groups"], inputs["weight"], inputs["bias"])


def _adain_call(fn, case, inputs, draw_noise):
    return fn(inputs["x"], inputs["scale"], inputs["shift"])


def _q_sample_call(fn, case, inputs, draw_noise):
    return fn(inputs["x"], inputs["noise"], inputs["t"], inputs["alphas_cumprod"])


def _ddpm_call(fn, case, inputs, draw_noise):
    return fn(inputs["x"], inputs["other"], inputs["t"], inputs["alphas_cumprod"], **_noise(inputs, draw_noise))


def _ddim_call(fn, case, inputs, draw_noise):
    return fn(inputs["x"], inputs["other"], inputs["t"], inputs["t_prev"], inputs["alphas_cumprod"],
              eta=case.kwargs["eta"], **_noise(inputs, draw_noise))


def _attention_call(fn, case, inputs, draw_noise):
    return fn(inputs["q"], inputs["k"], inputs["v"])


# minimal traffic: (case, element size, mode) -> bytes


def _norm_traffic(params: Callable[[Case], int]) -> Callable[[Case, int, str], int]:
    """Forward reads x and writes y; backward reads x and dy and writes dx; the per-channel (per-sample)
    parameters and their gradients are counted too, the float32 statistics are not."""
    def traffic(case: Case, e: int, mode: str) -> int:
        n, p = math.prod(case.shape), params(case)
        fwd, bwd = (2 * n + 2 * p) * e, (3 * n + 4 * p) * e
        return {FWD: fwd, BWD: bwd, FWD_BWD: fwd + bwd}[mode]

    return traffic


def _step_traffic(case: Case, e: int, mode: str) -> int:
    """Two tensors read (x0 and the noise, or x_t and the model output, the noise drawn in-kernel), one written."""
    return 3 * math.prod(case.shape) * e


def _no_count(*args) -> None:
    return None


# the Triton plans: (case, device, backward) -> whether the launch code picks the split path, which reads x
# (and dy) a second time


def _group_norm_splits(case: Case, device, backward: bool) -> bool:
    from dxr.kernels.triton import group_norm_silu as kernels

    n, c, s = case.shape[0], case.shape[1], math.prod(case.shape[2:])
    return not kernels.choose_plan(n, c, s, case.kwargs["num_groups"], backward=backward,
                                   channels_last=case.channels_last, device=device).onchip


def _adain_splits(case: Case, device, backward: bool) -> bool:
    from dxr.kernels.triton import adain as kernels

    n, c, s = case.shape[0], case.shape[1], math.prod(case.shape[2:])
    return kernels.choose_config(n, c, s, case.channels_last, device, backward=backward).split


def _attention_flops(case: Case, mode: str) -> int:
    """4·B·H·Lq·Lk·D forward (two matmuls), 2.5× that backward."""
    b, h, lq, lk, d = case.shape
    fwd = 4 * b * h * lq * lk * d
    return {FWD: fwd, BWD: fwd * 5 // 2, FWD_BWD: fwd * 7 // 2}[mode]


@dataclass(frozen=True)
class OpWorkload:
    """Everything the benchmarks know of one op; one record per op in :data:`WORKLOADS`."""

    name: str
    grad_inputs: tuple  # the inputs that get gradients; () for an op timed forward only
    lead: str  # the input whose device decides whether a backend can run
    make_inputs: Callable[..., dict]  # (case, normal, generator, device) -> tensors by argument name
    call: Callable[..., Tensor]  # (fn, case, inputs, draw_noise) -> the output of fn on inputs
    cases: dict  # (device type, quick) -> the cases: "cuda" or "cpu", quick ones fewer (tiny on a CPU)
    label: Callable[[Case], str] = _shape_label
    traffic: Callable[[Case, int, str], Optional[int]] = _no_count  # minimal bytes, for an element size
    splits: Optional[Callable[[Case, torch.device, bool], bool]] = None  # the Triton plan reads its inputs twice
    second_read_in_l2: bool = False  # the split path's second pass starts with what the first left in L2
    flops: Callable[[Case, str], Optional[int]] = _no_count
    extra_backends: tuple = ()  # baselines beyond eager and compile


# shapes from diffusion UNets (and the MUNIT decoder for AdaIN) on a GPU, modest ones on a CPU, and for the CPU's
# quick run ones small enough for the Triton interpreter (4 channels per group, ragged attention lengths)
WORKLOADS = {w.name: w for w in (
    OpWorkload(
        "group_norm_silu", ("x", "weight", "bias"), "x", _group_norm_inputs, _group_norm_call,
        cases={("cuda", False): _norm("group_norm_silu", (8, 128, 64, 64), (1, 512, 32, 32), (16, 256, 32, 32),
                                      channels_last=[(8, 128, 64, 64)], num_groups=32),
               ("cuda", True): _norm("group_norm_silu", (1, 512, 32, 32), (16, 256, 32, 32), num_groups=32),
               ("cpu", False): _norm("group_norm_silu", (1, 512, 32, 32), num_groups=32),
               ("cpu", True): _norm("group_norm_silu", (2, 32, 8, 8), channels_last=[(2, 32, 8, 8)], num_groups=8)},
        traffic=_norm_traffic(lambda case: case.shape[1]), splits=_group_norm_splits, second_read_in_l2=True),
    OpWorkload(
        "adain", ("x", "scale", "shift"), "x", _adain_inputs, _adain_call,
        cases={("cuda", False): _norm("adain", (1, 256, 64, 64), (8, 256, 64, 64), channels_last=[(8, 256, 64, 64)]),
               ("cuda", True): _norm("adain", (8, 256, 64, 64)),
               ("cpu", False): _norm("adain", (1, 256, 64, 64)),
               ("cpu", True): _norm("adain", (2, 16, 8, 8))},
        traffic=_norm_traffic(lambda case: case.shape[0] * case.shape[1]), splits=_adain_splits,
        second_read_in_l2=True),
    OpWorkload(
        "q_sample", (), "x", _step_inputs, _q_sample_call,
        cases={("cuda", False): _steps("q_sample", (16, 3, 256, 256), (8, 1, 256, 256)),
               ("cuda", True): _steps("q_sample", (16, 3, 256, 256)),
               ("cpu", False): _steps("q_sample", (8, 1, 256, 256)),
               ("cpu", True): _steps("q_sample", (2, 3, 16, 16))},
        traffic=_step_traffic),
    OpWorkload(
        "ddpm_step", (), "x", _step_inputs, _ddpm_call,
        cases={("cuda", False): _steps("ddpm_step", (16, 3, 256, 256), (8, 1, 256, 256)),
               ("cuda", True): _steps("ddpm_step", (16, 3, 256, 256)),
               ("cpu", False): _steps("ddpm_step", (8, 1, 256, 256)),
               ("cpu", True): _steps("ddpm_step", (2, 3, 16, 16))},
        traffic=_step_traffic),
    OpWorkload(
        "ddim_step", (), "x", _ddim_inputs, _ddim_call,
        cases={("cuda", False): _steps("ddim_step", (16, 3, 256, 256), (8, 1, 256, 256), eta=0.0)
                                + _steps("ddim_step", (16, 3, 256, 256), eta=1.0),
               ("cuda", True): _steps("ddim_step", (16, 3, 256, 256), eta=0.0),
               ("cpu", False): _steps("ddim_step", (8, 1, 256, 256), eta=0.0),
               ("cpu", True): _steps("ddim_step", (2, 3, 16, 16), eta=1.0)},
        traffic=_step_traffic),
    OpWorkload(
        "attention", ("q", "k", "v"), "q", _attention_inputs, _attention_call,
        cases={("cuda", False): _attention((8, 8, 256, 256, 64), (4, 8, 1024, 1024, 64), (1, 16, 4096, 4096, 64),
                                           (4, 8, 1024, 1024, 128), (1, 16, 4096, 4096, 128)),
               ("cuda", True): _attention((4, 8, 1024, 1024, 64), (1, 16, 4096, 4096, 128)),
               ("cpu", False): _attention((2, 8, 256, 256, 64)),
               ("cpu", True): _attention((1, 2, 40, 72, 32))},
        label=_attention_label, flops=_attention_flops, extra_backends=SDPA_BACKENDS),
)}
OPS = tuple(WORKLOADS)
GRAD_INPUTS = {name: w.grad_inputs for name, w in WORKLOADS.items()}  # the inputs that get gradients, per op


def cases(op: str, device_type: str, quick: bool = False) -> list:
    """The cases of ``op`` for a device type ("cuda" or "cpu"); ``quick`` gives fewer (tiny on a CPU)."""
    return WORKLOADS[op].cases[("cuda" if device_type == "cuda" else "cpu", quick)]


def modes(op: str) -> tuple:
    """The modes timed for ``op``: the noise-schedule ops run forward only."""
    return (FWD, BWD, FWD_BWD) if GRAD_INPUTS[op] else (FWD,)


def backends(op: str) -> tuple:
    """Every backend that can run ``op``, baselines first."""
    return ("eager", "compile", *WORKLOADS[op].extra_backends, *KERNEL_BACKENDS)


# --------------------------------------------------------------------------------------------------
# inputs


def make_inputs(case: Case, dtype: torch.dtype, device, seed: int = 0) -> dict:
    """Fresh random inputs of ``case`` (standard normal, never zeros) in ``dtype`` on ``device``.

    Holds the op's tensors by argument name, plus "dy" (the output gradient, in x's layout) for the
    ops with a backward and "noise" (an explicit z) for the noise-schedule ops, whose timesteps are drawn
    in [1, NUM_STEPS) so every sample takes a noisy step.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)

    def normal(*shape, layout=False):
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
        return t.to(memory_format=torch.channels_last) if layout and case.channels_last else t

    return WORKLOADS[case.op].make_inputs(case, normal, gen, device)


# --------------------------------------------------------------------------------------------------
# backends


@functools.lru_cache(maxsize=None)
def _compiled(op: str):
    """torch.compile of the reference of ``op``, one per op; shapes are specialised (dynamic=False)."""
    # every case is a recompile of the same function: keep them all compiled rather than fall back to eager
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit, max(getattr(config, limit), 64))
    return torch.compile(getattr(reference, op), dynamic=False)


def _sdpa(backend: str, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = SDPBackend.FLASH_ATTENTION if backend == "sdpa_flash" else SDPBackend.EFFICIENT_ATTENTION
    with sdpa_kernel(chosen):
        return F.scaled_dot_product_attention(q, k, v)


def forward(case: Case, backend: str, inputs: dict, *, draw_noise: bool = True) -> Tensor:
    """The output of ``case`` on ``inputs`` computed by ``backend``.

    The DDPM and DDIM steps draw their noise from ``SEED`` when ``draw_noise`` (the reference with
    ``torch.randn``, the kernels in-kernel), else take ``inputs["noise"]``.
    """
    op, workload = case.op, WORKLOADS[case.op]
    if backend in KERNEL_BACKENDS:
        fn = functools.partial(getattr(ops, op), backend=backend)
    elif backend in ("eager", "compile"):
        fn = getattr(reference, op) if backend == "eager" else _compiled(op)
    elif backend in SDPA_BACKENDS and backend in workload.extra_backends:
        return _sdpa(backend, inputs["q"], inputs["k"], inputs["v"])
    else:
        raise ValueError(f"no backend {backend!r} for {op}")
    return workload.call(fn, case, inputs, draw_noise)


def probe(case: Case, backend: str, inputs: dict) -> None:
    """Raise :class:`Unavailable` when ``backend`` cannot run ``case`` on these inputs' device."""
    lead = inputs[WORKLOADS[case.op].lead]
    if backend in KERNEL_BACKENDS:
        try:
            ops.resolve_backend(backend, case.op, lead)
        except RuntimeError as err:
            raise Unavailable(str(err)) from None


# what scaled_dot_product_attention says when the chosen backend cannot take the inputs (CUDA, CPU)
_SDPA_REFUSALS = ("No available kernel", "No viable backend")


def call_once(fn: Callable, backend: str):
    """Call ``fn`` once (compile, autotune), turning a kernel module that is not there yet or an SDPA
    backend that refuses the inputs into :class:`Unavailable`."""
    try:
        return fn()
    except ModuleNotFoundError as err:
        if backend in KERNEL_BACKENDS and (err.name or "").startswith("dxr."):
            raise Unavailable(f"the kernel module {err.name} is not in this tree") from None
        raise
    except RuntimeError as err:
        if backend in SDPA_BACKENDS and any(refusal in str(err) for refusal in _SDPA_REFUSALS):
            raise Unavailable(str(err).splitlines()[0]) from None
        raise


def runner(case: Case, backend: str, mode: str, inputs: dict) -> Callable[[], object]:
    """The zero-argument callable that runs ``case`` in ``mode`` on ``backend``, called once already.

    "fwd" runs on inputs that need no gradient; "bwd" differentiates one forward made here
    (retain_graph), "fwd+bwd" does both each call. Raises :class:`Unavailable` when the backend
    cannot run here.
    """
    probe(case, backend, inputs)
    names = GRAD_INPUTS[case.op]
    if mode == FWD:
        plain = {k: (v.detach() if k in names else v) for k, v in inputs.items()}
        fn = functools.partial(forward, case, backend, plain)
        call_once(fn, backend)
        return fn
    if mode not in (BWD, FWD_BWD) or not names:
        raise ValueError(f"mode {mode!r} is not timed for {case.op}")
    leaves = {k: (v.detach().requires_grad_() if k in names else v) for k, v in inputs.items()}
    wrt, dy = [leaves[k] for k in names], inputs["dy"]

    def forward_backward():
        return torch.autograd.grad(forward(case, backend, leaves), wrt, dy)

    if mode == FWD_BWD:
        call_once(forward_backward, backend)
        return forward_backward
    out = call_once(functools.partial(forward, case, backend, leaves), backend)

    def backward():
        return torch.autograd.grad(out, wrt, dy, retain_graph=True)

    backward()
    return backward


# --------------------------------------------------------------------------------------------------
# traffic and arithmetic


def traffic_bytes(case: Case, dtype: torch.dtype, mode: str) -> Optional[int]:
    """Minimal bytes a perfect kernel moves for ``case`` in ``mode`` (None for attention).

    Norms: forward reads x and writes y; backward reads x and dy and writes dx; the per-channel
    (per-sample) parameters and their gradients are counted too, the float32 statistics are not.
    Noise-schedule ops: q_sample reads x0 and the noise, the steps read x_t and the model output and draw their
    noise in-kernel (no traffic); each writes its result.
    """
    return WORKLOADS[case.op].traffic(case, torch.empty((), dtype=dtype).element_size(), mode)


def planned_bytes(case: Case, dtype: torch.dtype, mode: str, device) -> Optional[int]:
    """Bytes the Triton kernels move for ``case`` on ``device`` with the plan their launch code picks, counted from the
    code as if nothing were served from L2 (None for attention).

    The norms' on-chip paths move the minimum (:func:`traffic_bytes`); their split paths read x (and dy)
    a second time: forward 3 tensor passes instead of 2, backward 5 instead of 3. The steps draw their
    noise in-kernel, so they move the minimum. Set beside a measured time, this says how much of the gap
    to the copy bandwidth is the plan's second read (which L2 may serve) and how much the kernel's.
    """
    minimal = traffic_bytes(case, dtype, mode)
    splits = WORKLOADS[case.op].splits
    if minimal is None or splits is None:
        return minimal
    tensor = math.prod(case.shape) * torch.empty((), dtype=dtype).element_size()
    device = torch.device(device)
    extra = {FWD: splits(case, device, False) * tensor, BWD: splits(case, device, True) * 2 * tensor}
    extra[FWD_BWD] = extra[FWD] + extra[BWD]
    return minimal + extra[mode]


_SASS_LINE = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+\S", re.MULTILINE)


def count_sass(listing: str) -> int:
    """Instructions in a ``cuobjdump -sass`` listing (one ``/*offset*/ OPCODE ...`` line each)."""
    return len(_SASS_LINE.findall(listing))


# the L2 of the GPU the defaults are planned for (an H100, 50 MiB), used for CPU devices
DEFAULT_L2_BYTES = 50 << 20


def l2_bytes(device) -> int:
    """The L2 cache of ``device`` in bytes (:data:`DEFAULT_L2_BYTES` for a CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or DEFAULT_L2_BYTES)
    return DEFAULT_L2_BYTES


def expected_bytes(case: Case, dtype: torch.dtype, mode: str, device) -> Optional[int]:
    """DRAM bytes the Triton kernels should move for ``case``: :func:`planned_bytes` less the part of the
    split path's second read that L2 can serve (None for attention).

    GroupNorm's tile pass takes its tiles in the reverse of the order the statistics pass read them, so
    its second read finds in L2 whatever of x (backward: x and dy) L2 holds, up to the whole of it. The
    count credits L2 with all of its capacity, so it is the floor of what the plan can reach; a kernel
    whose other accesses evict more lands between this and :func:`planned_bytes`. Ops without that order
    are counted as planned.
    """
    planned = planned_bytes(case, dtype, mode, device)
    workload = WORKLOADS[case.op]
    if planned is None or not workload.second_read_in_l2:
        return planned
    device = torch.device(device)
    tensor = math.prod(case.shape) * torch.empty((), dtype=dtype).element_size()
    cache = l2_bytes(device)
    served = {FWD: workload.splits(case, device, False) * min(tensor, cache),
              BWD: workload.splits(case, device, True) * min(2 * tensor, cache)}
    served[FWD_BWD] = served[FWD] + served[BWD]
    return planned - served[mode]


def flops(case: Case, mode: str) -> Optional[int]:
    """Floating-point operations of attention: 4·B·H·Lq·Lk·D forward, 2.5× that backward (None otherwise)."""
    return WORKLOADS[case.op].flops(case, mode)


# --------------------------------------------------------------------------------------------------
# timing


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class L2Flush:
    """Writes a buffer larger than the GPU's L2 cache, so the next kernel starts from DRAM."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.buffer = None
        if self.device.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 0) or 128 << 20
            self.buffer = torch.empty(2 * l2, dtype=torch.int8, device=self.device)

    def __call__(self) -> None:
        if self.buffer is not None:
            self.buffer.zero_()


def estimate_seconds(fn: Callable, device, calls: int = 1) -> float:
    """Wall-clock seconds of one synchronised call of ``fn`` (the least of ``calls`` calls)."""
    best = math.inf
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def repetitions(seconds_per_call: float, budget_s: float, low: int, high: int) -> int:
    """How many calls fit ``budget_s``, within [low, high]."""
    return int(min(high, max(low, budget_s // max(seconds_per_call, 1e-9))))


def median_ms(fn: Callable, device, *, budget_s: float = 0.25, warmup_s: float = 0.05, min_reps: int = 5,
              max_reps: int = 200, flush: Optional[L2Flush] = None) -> float:
    """Median milliseconds of ``fn()`` over ``min_reps`` to ``max_reps`` calls filling about ``budget_s``,
    after one call to estimate and ``warmup_s`` more of warm-up (the first call, which compiles or
    autotunes, is the caller's).

    On a GPU each call is timed with CUDA events after an L2 flush (DRAM-resident inputs); on a CPU
    with the wall clock.
    """
    device = torch.device(device)
    once = estimate_seconds(fn, device)
    for _ in range(repetitions(once, warmup_s, 0, 50)):
        fn()
    reps = repetitions(once, budget_s, min_reps, max_reps)
    times = []
    if device.type == "cuda":
        flush = flush or L2Flush(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            flush()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_memory_mib(fn: Callable, device) -> Optional[float]:
    """Peak CUDA memory one call of ``fn`` allocates beyond what was allocated before (None on a CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20
