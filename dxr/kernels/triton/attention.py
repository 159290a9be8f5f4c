"""Flash attention in Triton: ``softmax(q @ kᵀ · scale) @ v``, forward and deterministic backward.

q is (B, H, Lq, D), k and v are (B, H, Lk, D); no mask, non-causal, any Lq and Lk. Every tensor is
addressed through its four strides, so views (a transpose or a slice of a fused qkv projection) run
without a copy; Triton specialises a stride equal to 1, so the unit-stride axis is known when compiling.

- **Forward** (FlashAttention-2): one program per (block of BLOCK_M queries, batch·head) walks the keys
  in blocks of BLOCK_N with an online softmax in base 2 (float32 running max and sum), and writes o and
  the natural-log log-sum-exp ``lse`` that the backward recomputes the probabilities from.
- **Backward**, with no atomics, so two runs give bitwise identical gradients: a preprocess writes
  ``delta = rowsum(dO · O)``; one kernel owns a block of keys and loops over all queries to build dk and
  dv; a second kernel owns a block of queries and loops over all keys to build dq. Each recomputes
  ``P = exp(q·kᵀ·scale − lse)`` rather than storing the (Lq, Lk) matrix, so memory is linear in L.

Head dims: the kernels work on a BLOCK_D = next power of two ≥ max(D, 16) tile; when D is not a power
of two the lanes past D are masked on every load (read as zero, exact in both products) and store, which
is the zero padding of q, k, v along D without a padded copy. Full key (or query) blocks of the loops run
without row masks, the ragged last block with them.

Precision: float16/bfloat16 operands go to tensor cores with float32 accumulation (the probabilities and
dS are rounded to the input dtype for their products, as in FlashAttention); float32 operands use
``input_precision="ieee"`` (exact float32 products, no TF32). As in FlashAttention, delta is taken from O
as stored (in the input dtype), so with a sharply peaked softmax the half-precision dq and dk carry the
rounding of O (about eps(dtype)·|dO|·|O|·scale·|k|) where an eager backward uses the exact probabilities.
Under Triton's interpreter, whose bfloat16 products are wrong, bfloat16 tiles are converted to float32
right after loading.

On a GPU, block sizes, warps and pipeline stages are autotuned per (Lq, Lk, head dim, dtype) among the
tiles that compile without register spills for that kernel, dtype, head dim and architecture
(``attention_tiles``, measured with ptxas) and fit the part's shared memory: pipelined tensor-core tiles
for float16/bfloat16, small FMA tiles for float32. Where no tile is spill-free (float32: the forward
beyond D = 128 and the backward beyond D = 64; half precision: the backward beyond D = 128, and on
sm_80-sm_89 the forward beyond D = 128 and the backward beyond D = 64) :func:`serves` says no, the
launch functions raise, and ``dxr.ops.attention`` runs PyTorch's ``scaled_dot_product_attention``
instead. The interpreter runs one configuration and serves every case.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from dxr.kernels import reference
from dxr.kernels.triton import attention_tiles, common

MAX_HEAD_DIM = reference.MAX_HEAD_DIM
# offsets inside one (batch, head) slice are 32-bit
_MAX_SLICE = 2**31 - 1
# programs on grid axis x
_MAX_PROGRAMS = 2**31 - 1
# the interpreter's cost is programs × operations: few, large blocks, but still several per test shape
_INTERPRETER_BLOCK = 32


def _block_d(head_dim: int) -> int:
    """The power-of-two tile width holding a head dim (16 at least: tl.dot needs K ≥ 16 on a GPU)."""
    return max(16, triton.next_power_of_2(head_dim))


# --------------------------------------------------------------------------------------------------
# autotuning


def _configs(row_block: str, loop_block: str):
    """Candidate configurations: ``row_block`` rows per program, ``loop_block`` rows per loop step.

    Two families, told apart by their row block: tiles of 64 or 128 rows for float16/bfloat16 on tensor
    cores, and tiles of 16 or 32 rows for float32, whose IEEE products run on the FMA units with the
    operands in registers (compiled for sm_90, float32 tiles of 64 rows spill hundreds of bytes)."""
    if common.interpreting():
        return [triton.Config({row_block: _INTERPRETER_BLOCK, loop_block: _INTERPRETER_BLOCK}, num_warps=4)]
    tensor_core = [
        triton.Config({row_block: rows, loop_block: step}, num_warps=warps, num_stages=stages)
        for rows in (64, 128)
        for step in (32, 64, 128)
        for warps in (4, 8)
        for stages in (2, 3, 4)
        # a program's resident block at least as tall as its streamed one: fewer, fuller programs
        if step <= rows
    ]
    fma = [
        triton.Config({row_block: rows, loop_block: step}, num_warps=warps, num_stages=2)
        for rows, step in ((16, 16), (32, 16), (32, 32))
        for warps in (4, 8)
    ]
    return tensor_core + fma


# dynamic shared memory one block may opt into, by compute capability (bytes); parts not listed get
# the smallest of them
_SHARED_LIMIT = {80: 166_912, 86: 101_376, 87: 166_912, 89: 101_376, 90: 232_448, 100: 232_448, 103: 232_448,
                 120: 101_376}


def shared_limit(capability: int) -> int:
    """The shared memory (bytes) one block may use on a GPU of compute capability ``capability`` (90 = 9.0)."""
    return _SHARED_LIMIT.get(capability, min(_SHARED_LIMIT.values()))


def target_capability() -> int:
    """The compute capability Triton compiles for now (90 for an H100), from its active driver."""
    return int(triton.runtime.driver.active.get_current_target().arch)


def serves(head_dim: int, element_size: int, backward: bool, capability: Optional[int] = None) -> bool:
    """Whether these kernels run attention at ``head_dim`` for inputs of ``element_size`` bytes (2 for
    float16/bfloat16, 4 for float32) on a GPU of ``capability`` (default: the current target), the
    backward too when ``backward``: every kernel needed has a tile that compiles without spills
    (``attention_tiles``). Under the interpreter every case is served."""
    if common.interpreting():
        return True
    capability = target_capability() if capability is None else capability
    block_d = _block_d(head_dim)
    needed = ("forward", "dkdv", "dq") if backward else ("forward",)
    return all(_kept_tiles(kernel, capability, element_size, block_d) for kernel in needed)


def _shared_bytes(rows: int, step: int, stages: int, block_d: int, operands: int, element_size: int) -> int:
    # two streamed (step × BLOCK_D) tiles per pipeline stage, plus the kept operand tiles
    return (2 * step * block_d * stages + operands * rows * block_d) * element_size


_OPERANDS = {"forward": 1, "dkdv": 2, "dq": 2}


@functools.lru_cache(maxsize=None)  # asked on every dxr.ops.attention call: once per case
def _kept_tiles(kernel: str, capability: int, element_size: int, block_d: int) -> frozenset:
    """The spill-free tiles of ``kernel`` whose shared memory fits the part (estimated for parts the table
    was not compiled for, such as sm_86 and sm_89 with 99 KB)."""
    limit = shared_limit(capability)
    return frozenset(tile for tile in attention_tiles.spill_free(kernel, capability, element_size, block_d)
                     if _shared_bytes(tile[0], tile[1], tile[3], block_d, _OPERANDS[kernel], element_size) <= limit)


def _prune(kernel: str, row_block: str, loop_block: str):
    """An ``early_config_prune``: the candidates that compile without spills for the input dtype, head dim
    and target (``attention_tiles``) and fit its shared memory. Raises RuntimeError when none does (the
    launch functions check :func:`serves` first)."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        block_d, elem = args["BLOCK_D"], args["q_ptr"].element_size()
        capability = target_capability()
        tiles = _kept_tiles(kernel, capability, elem, block_d)
        kept = [cfg for cfg in configs
                if (cfg.kwargs[row_block], cfg.kwargs[loop_block], cfg.num_warps, cfg.num_stages) in tiles]
        if not kept:
            raise RuntimeError(f"attention {kernel}: no tile compiles without spills for BLOCK_D={block_d}, "
                               f"{elem}-byte inputs on compute capability {capability}")
        return kept

    return prune


def _tuned(kernel: str, row_block: str, loop_block: str):
    configs = _configs(row_block, loop_block)
    prune = None if common.interpreting() else _prune(kernel, row_block, loop_block)
    return common.autotune(configs, ["Lq", "Lk", "HEAD_DIM"], prune)


# --------------------------------------------------------------------------------------------------
# shared device helpers


@triton.jit
def _load_tile(ptrs, rows, n_rows, d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr, UPCAST: tl.constexpr):
    """A (rows, BLOCK_D) tile; rows ≥ n_rows (when CHECK_ROWS) and lanes ≥ HEAD_DIM read as zero."""
    if CHECK_ROWS:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows < n_rows)[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=(d < HEAD_DIM)[None, :], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _store_tile(ptrs, value, rows, n_rows, d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store a (rows, BLOCK_D) float32 tile in the pointers' dtype, rows < n_rows and lanes < HEAD_DIM."""
    if HEAD_DIM == BLOCK_D:
        mask = (rows < n_rows)[:, None]
    else:
        mask = (rows < n_rows)[:, None] & (d < HEAD_DIM)[None, :]
    tl.store(ptrs, value.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """``a @ b (+ acc)`` in float32; IEEE keeps float32 operands exact instead of rounding them to TF32."""
    if IEEE:
        out = tl.dot(a, b, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _program(L, BLOCK: tl.constexpr):
    """(row block, batch · head) of this program on the 1-D grid of :func:`launch_grid`: the blocks of one
    (batch, head) slice are consecutive programs, so they run side by side and share its tiles in L2."""
    pid = tl.program_id(0)
    blocks = tl.cdiv(L, BLOCK)
    return pid % blocks, pid // blocks


@triton.jit
def _slice_base(ptr, bh, H, stride_b, stride_h):
    """Pointer to the (batch, head) slice ``bh`` = batch · H + head; 64-bit so large batches do not wrap."""
    b = bh // H
    h = bh % H
    return ptr + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h


# --------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_key_block(acc, m_i, l_i, q, k_ptrs, v_ptrs, cols, Lk, d, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_KEYS: tl.constexpr, UPCAST: tl.constexpr,
                   IEEE: tl.constexpr):
    """One online-softmax step over a block of keys; scores, running max and sum are in base 2."""
    k = _load_tile(k_ptrs, cols, Lk, d, HEAD_DIM, BLOCK_D, CHECK_KEYS, UPCAST)
    v = _load_tile(v_ptrs, cols, Lk, d, HEAD_DIM, BLOCK_D, CHECK_KEYS, UPCAST)
    s = _dot(q, tl.trans(k), None, IEEE) * qk_scale
    if CHECK_KEYS:
        s = tl.where((cols < Lk)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # every block holds at least one real key, so m_new is finite and alpha is 0 on the first step
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
    return acc, m_new, l_i


@triton.jit
def _attention_fwd_kernel(
    q_ptr,  # (B, H, Lq, D) queries, through the strides below
    k_ptr,  # (B, H, Lk, D) keys
    v_ptr,  # (B, H, Lk, D) values
    o_ptr,  # (B, H, Lq, D) out: attention output, q's dtype
    lse_ptr,  # float32 (B, H, Lq) contiguous out: natural-log log-sum-exp of each row of scores
    stride_qb, stride_qh, stride_ql, stride_qd,  # q strides (batch, head, position, channel)
    stride_kb, stride_kh, stride_kl, stride_kd,  # k strides
    stride_vb, stride_vh, stride_vl, stride_vd,  # v strides
    stride_ob, stride_oh, stride_ol, stride_od,  # o strides
    H,  # heads: a program's slice is batch · H + head
    Lq,  # query length
    Lk,  # key length, at least 1
    qk_scale,  # softmax scale · log2(e): scores in base 2
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # power of two ≥ D, at least 16
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per loop step
    UPCAST: tl.constexpr,  # convert loaded tiles to float32 (bfloat16 under the interpreter)
    IEEE: tl.constexpr,  # float32 operands: exact products, not TF32
):
    block, bh = _program(Lq, BLOCK_M)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    q_base = _slice_base(q_ptr, bh, H, stride_qb, stride_qh)
    k_base = _slice_base(k_ptr, bh, H, stride_kb, stride_kh)
    v_base = _slice_base(v_ptr, bh, H, stride_vb, stride_vh)
    q = _load_tile(q_base + rows[:, None] * stride_ql + d[None, :] * stride_qd, rows, Lq, d,
                   HEAD_DIM, BLOCK_D, True, UPCAST)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_blocks = Lk // BLOCK_N
    for block in range(0, full_blocks):
        n = block * BLOCK_N + cols
        acc, m_i, l_i = _fwd_key_block(acc, m_i, l_i, q,
                                       k_base + n[:, None] * stride_kl + d[None, :] * stride_kd,
                                       v_base + n[:, None] * stride_vl + d[None, :] * stride_vd,
                                       n, Lk, d, qk_scale, HEAD_DIM, BLOCK_D, False, UPCAST, IEEE)
    if full_blocks * BLOCK_N < Lk:
        n = full_blocks * BLOCK_N + cols
        acc, m_i, l_i = _fwd_key_block(acc, m_i, l_i, q,
                                       k_base + n[:, None] * stride_kl + d[None, :] * stride_kd,
                                       v_base + n[:, None] * stride_vl + d[None, :] * stride_vd,
                                       n, Lk, d, qk_scale, HEAD_DIM, BLOCK_D, True, UPCAST, IEEE)
    o_base = _slice_base(o_ptr, bh, H, stride_ob, stride_oh)
    _store_tile(o_base + rows[:, None] * stride_ol + d[None, :] * stride_od, acc / l_i[:, None], rows, Lq, d,
                HEAD_DIM, BLOCK_D)
    lse = (m_i + tl.log2(l_i)) * common.LN2
    tl.store(lse_ptr + bh.to(tl.int64) * Lq + rows, lse, mask=rows < Lq)


_attention_fwd = _tuned("forward", "BLOCK_M", "BLOCK_N")(_attention_fwd_kernel)


# --------------------------------------------------------------------------------------------------
# backward


@triton.jit
def _attention_bwd_delta_kernel(
    o_ptr,  # (B, H, Lq, D) forward output
    do_ptr,  # (B, H, Lq, D) gradient of the output
    delta_ptr,  # float32 (B, H, Lq) contiguous out: rowsum(dO · O)
    stride_ob, stride_oh, stride_ol, stride_od,  # o strides (batch, head, position, channel)
    stride_dob, stride_doh, stride_dol, stride_dod,  # dO strides
    H,  # heads: a program's slice is batch · H + head
    Lq,  # query length
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # power of two ≥ D, at least 16
    BLOCK_M: tl.constexpr,  # rows per program
):
    block, bh = _program(Lq, BLOCK_M)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    o_base = _slice_base(o_ptr, bh, H, stride_ob, stride_oh)
    do_base = _slice_base(do_ptr, bh, H, stride_dob, stride_doh)
    o = _load_tile(o_base + rows[:, None] * stride_ol + d[None, :] * stride_od, rows, Lq, d,
                   HEAD_DIM, BLOCK_D, True, True)
    do = _load_tile(do_base + rows[:, None] * stride_dol + d[None, :] * stride_dod, rows, Lq, d,
                    HEAD_DIM, BLOCK_D, True, True)
    tl.store(delta_ptr + bh.to(tl.int64) * Lq + rows, tl.sum(o * do, axis=1), mask=rows < Lq)


@triton.jit
def _bwd_query_block(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, rows, Lq, d, qk_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr,
                     UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """Add one block of queries' share to dk (still unscaled) and dv of this program's keys."""
    q = _load_tile(q_ptrs, rows, Lq, d, HEAD_DIM, BLOCK_D, CHECK_ROWS, UPCAST)
    do = _load_tile(do_ptrs, rows, Lq, d, HEAD_DIM, BLOCK_D, CHECK_ROWS, UPCAST)
    if CHECK_ROWS:
        lse = tl.load(lse_ptrs, mask=rows < Lq, other=0.0)
        delta = tl.load(delta_ptrs, mask=rows < Lq, other=0.0)
    else:
        lse = tl.load(lse_ptrs)
        delta = tl.load(delta_ptrs)
    # Pᵀ (keys × queries), recomputed in base 2: exp2(s·log2e − lse·log2e)
    p_t = tl.exp2(_dot(k, tl.trans(q), None, IEEE) * qk_scale - lse[None, :] * common.LOG2E)
    if CHECK_ROWS:
        p_t = tl.where((rows < Lq)[None, :], p_t, 0.0)
    dv = _dot(p_t.to(do.dtype), do, dv, IEEE)
    dp_t = _dot(v, tl.trans(do), None, IEEE)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = _dot(ds_t.to(q.dtype), q, dk, IEEE)
    return dk, dv


@triton.jit
def _attention_bwd_dkdv_kernel(
    q_ptr,  # (B, H, Lq, D) queries
    k_ptr,  # (B, H, Lk, D) keys
    v_ptr,  # (B, H, Lk, D) values
    do_ptr,  # (B, H, Lq, D) gradient of the output
    lse_ptr,  # float32 (B, H, Lq) contiguous: natural-log log-sum-exp from the forward
    delta_ptr,  # float32 (B, H, Lq) contiguous: rowsum(dO · O)
    dk_ptr,  # (B, H, Lk, D) out: gradient of k, k's dtype
    dv_ptr,  # (B, H, Lk, D) out: gradient of v, v's dtype
    stride_qb, stride_qh, stride_ql, stride_qd,  # q strides (batch, head, position, channel)
    stride_kb, stride_kh, stride_kl, stride_kd,  # k strides
    stride_vb, stride_vh, stride_vl, stride_vd,  # v strides
    stride_dob, stride_doh, stride_dol, stride_dod,  # dO strides
    stride_dkb, stride_dkh, stride_dkl, stride_dkd,  # dk strides
    stride_dvb, stride_dvh, stride_dvl, stride_dvd,  # dv strides
    H,  # heads: a program's slice is batch · H + head
    Lq,  # query length
    Lk,  # key length
    sm_scale,  # softmax scale
    qk_scale,  # softmax scale · log2(e)
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # power of two ≥ D, at least 16
    BLOCK_N: tl.constexpr,  # keys per program
    BLOCK_M: tl.constexpr,  # queries per loop step
    UPCAST: tl.constexpr,  # convert loaded tiles to float32 (bfloat16 under the interpreter)
    IEEE: tl.constexpr,  # float32 operands: exact products, not TF32
):
    block, bh = _program(Lk, BLOCK_N)
    keys = block * BLOCK_N + tl.arange(0, BLOCK_N)
    rows0 = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    q_base = _slice_base(q_ptr, bh, H, stride_qb, stride_qh)
    do_base = _slice_base(do_ptr, bh, H, stride_dob, stride_doh)
    k_base = _slice_base(k_ptr, bh, H, stride_kb, stride_kh)
    v_base = _slice_base(v_ptr, bh, H, stride_vb, stride_vh)
    k = _load_tile(k_base + keys[:, None] * stride_kl + d[None, :] * stride_kd, keys, Lk, d,
                   HEAD_DIM, BLOCK_D, True, UPCAST)
    v = _load_tile(v_base + keys[:, None] * stride_vl + d[None, :] * stride_vd, keys, Lk, d,
                   HEAD_DIM, BLOCK_D, True, UPCAST)
    stats = bh.to(tl.int64) * Lq
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    full_blocks = Lq // BLOCK_M
    for block in range(0, full_blocks):
        rows = block * BLOCK_M + rows0
        dk, dv = _bwd_query_block(dk, dv, k, v,
                                  q_base + rows[:, None] * stride_ql + d[None, :] * stride_qd,
                                  do_base + rows[:, None] * stride_dol + d[None, :] * stride_dod,
                                  lse_ptr + stats + rows, delta_ptr + stats + rows,
                                  rows, Lq, d, qk_scale, HEAD_DIM, BLOCK_D, False, UPCAST, IEEE)
    if full_blocks * BLOCK_M < Lq:
        rows = full_blocks * BLOCK_M + rows0
        dk, dv = _bwd_query_block(dk, dv, k, v,
                                  q_base + rows[:, None] * stride_ql + d[None, :] * stride_qd,
                                  do_base + rows[:, None] * stride_dol + d[None, :] * stride_dod,
                                  lse_ptr + stats + rows, delta_ptr + stats + rows,
                                  rows, Lq, d, qk_scale, HEAD_DIM, BLOCK_D, True, UPCAST, IEEE)
    dk_base = _slice_base(dk_ptr, bh, H, stride_dkb, stride_dkh)
    dv_base = _slice_base(dv_ptr, bh, H, stride_dvb, stride_dvh)
    _store_tile(dk_base + keys[:, None] * stride_dkl + d[None, :] * stride_dkd, dk * sm_scale, keys, Lk, d,
                HEAD_DIM, BLOCK_D)
    _store_tile(dv_base + keys[:, None] * stride_dvl + d[None, :] * stride_dvd, dv, keys, Lk, d,
                HEAD_DIM, BLOCK_D)


@triton.jit
def _bwd_key_block(dq, q, do, lse2, delta, k_ptrs, v_ptrs, cols, Lk, d, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_KEYS: tl.constexpr,
                   UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """Add one block of keys' share to dq (still unscaled) of this program's queries."""
    k = _load_tile(k_ptrs, cols, Lk, d, HEAD_DIM, BLOCK_D, CHECK_KEYS, UPCAST)
    v = _load_tile(v_ptrs, cols, Lk, d, HEAD_DIM, BLOCK_D, CHECK_KEYS, UPCAST)
    p = tl.exp2(_dot(q, tl.trans(k), None, IEEE) * qk_scale - lse2[:, None])
    if CHECK_KEYS:
        p = tl.where((cols < Lk)[None, :], p, 0.0)
    dp = _dot(do, tl.trans(v), None, IEEE)
    ds = p * (dp - delta[:, None])
    return _dot(ds.to(k.dtype), k, dq, IEEE)


@triton.jit
def _attention_bwd_dq_kernel(
    q_ptr,  # (B, H, Lq, D) queries
    k_ptr,  # (B, H, Lk, D) keys
    v_ptr,  # (B, H, Lk, D) values
    do_ptr,  # (B, H, Lq, D) gradient of the output
    lse_ptr,  # float32 (B, H, Lq) contiguous: natural-log log-sum-exp from the forward
    delta_ptr,  # float32 (B, H, Lq) contiguous: rowsum(dO · O)
    dq_ptr,  # (B, H, Lq, D) out: gradient of q, q's dtype
    stride_qb, stride_qh, stride_ql, stride_qd,  # q strides (batch, head, position, channel)
    stride_kb, stride_kh, stride_kl, stride_kd,  # k strides
    stride_vb, stride_vh, stride_vl, stride_vd,  # v strides
    stride_dob, stride_doh, stride_dol, stride_dod,  # dO strides
    stride_dqb, stride_dqh, stride_dql, stride_dqd,  # dq strides
    H,  # heads: a program's slice is batch · H + head
    Lq,  # query length
    Lk,  # key length, at least 1
    sm_scale,  # softmax scale
    qk_scale,  # softmax scale · log2(e)
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # power of two ≥ D, at least 16
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per loop step
    UPCAST: tl.constexpr,  # convert loaded tiles to float32 (bfloat16 under the interpreter)
    IEEE: tl.constexpr,  # float32 operands: exact products, not TF32
):
    block, bh = _program(Lq, BLOCK_M)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    q_base = _slice_base(q_ptr, bh, H, stride_qb, stride_qh)
    do_base = _slice_base(do_ptr, bh, H, stride_dob, stride_doh)
    k_base = _slice_base(k_ptr, bh, H, stride_kb, stride_kh)
    v_base = _slice_base(v_ptr, bh, H, stride_vb, stride_vh)
    q = _load_tile(q_base + rows[:, None] * stride_ql + d[None, :] * stride_qd, rows, Lq, d,
                   HEAD_DIM, BLOCK_D, True, UPCAST)
    do = _load_tile(do_base + rows[:, None] * stride_dol + d[None, :] * stride_dod, rows, Lq, d,
                    HEAD_DIM, BLOCK_D, True, UPCAST)
    stats = bh.to(tl.int64) * Lq + rows
    lse2 = tl.load(lse_ptr + stats, mask=rows < Lq, other=0.0) * common.LOG2E
    delta = tl.load(delta_ptr + stats, mask=rows < Lq, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_blocks = Lk // BLOCK_N
    for block in range(0, full_blocks):
        n = block * BLOCK_N + cols
        dq = _bwd_key_block(dq, q, do, lse2, delta,
                            k_base + n[:, None] * stride_kl + d[None, :] * stride_kd,
                            v_base + n[:, None] * stride_vl + d[None, :] * stride_vd,
                            n, Lk, d, qk_scale, HEAD_DIM, BLOCK_D, False, UPCAST, IEEE)
    if full_blocks * BLOCK_N < Lk:
        n = full_blocks * BLOCK_N + cols
        dq = _bwd_key_block(dq, q, do, lse2, delta,
                            k_base + n[:, None] * stride_kl + d[None, :] * stride_kd,
                            v_base + n[:, None] * stride_vl + d[None, :] * stride_vd,
                            n, Lk, d, qk_scale, HEAD_DIM, BLOCK_D, True, UPCAST, IEEE)
    dq_base = _slice_base(dq_ptr, bh, H, stride_dqb, stride_dqh)
    _store_tile(dq_base + rows[:, None] * stride_dql + d[None, :] * stride_dqd, dq * sm_scale, rows, Lq, d,
                HEAD_DIM, BLOCK_D)


# the dk/dv pass accumulates dk and dv over kept k and v; the dq pass dq over kept q and dO
_attention_bwd_dkdv = _tuned("dkdv", "BLOCK_N", "BLOCK_M")(_attention_bwd_dkdv_kernel)
_attention_bwd_dq = _tuned("dq", "BLOCK_M", "BLOCK_N")(_attention_bwd_dq_kernel)
# rows per program of the delta preprocess: one (32, BLOCK_D) tile of O and dO (64 rows spilled on
# sm_90 at float16 D = 40)
_DELTA_BLOCK = 32


# --------------------------------------------------------------------------------------------------
# launch functions


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    """What the kernels need beyond ``dxr.ops.attention``'s validation, for direct callers."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, L, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one of float32/float16/bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, h, _, d = q.shape
    if tuple(k.shape[:2]) != (b, h) or k.shape[3] != d or tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"k and v must be (B, H, Lk, D) matching q {tuple(q.shape)}, got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not 0 < d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D must lie in [1, {MAX_HEAD_DIM}], got {d}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        span = sum((size - 1) * abs(stride) for size, stride in zip(t.shape[2:], t.stride()[2:]))
        if span > _MAX_SLICE:
            raise ValueError(f"{name}: one (batch, head) slice spans {span} elements, more than 32-bit offsets hold")


def launch_grid(length: int, batch_heads: int, block: int) -> tuple[int]:
    """The 1-D grid of ``cdiv(length, block)`` row blocks for each of ``batch_heads`` slices.

    One axis because CUDA caps grid axes y and z at 65,535 while x takes 2³¹ - 1 programs: B·H of a
    large batch of heads would not fit on y. Raises ValueError beyond that."""
    programs = triton.cdiv(length, block) * batch_heads
    if programs > _MAX_PROGRAMS:
        raise ValueError(f"attention needs {programs} programs ({batch_heads} batch·heads × "
                         f"{triton.cdiv(length, block)} blocks of {block}), more than a CUDA grid holds ({_MAX_PROGRAMS})")
    return (programs,)


def attention_supports(head_dim: int, element_size: int, backward: bool) -> bool:
    """:func:`serves` on the current GPU (the backend interface ``dxr.ops`` calls)."""
    return serves(head_dim, element_size, backward)


def _require_served(d: int, q: Tensor, backward: bool) -> None:
    if not serves(d, q.element_size(), backward):
        raise RuntimeError(
            f"the Triton attention {'backward' if backward else 'forward'} has no spill-free tile for head dim {d} "
            f"in {q.dtype} on compute capability {target_capability()} (see dxr.kernels.triton.attention_tiles); "
            "dxr.ops.attention runs PyTorch's scaled_dot_product_attention there")


def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and common.interpreting()


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Flash attention forward.

    q: (B, H, Lq, D), k and v: (B, H, Lk, D), one dtype of float32/float16/bfloat16, any strides, D ≤ 256.
    Returns o (B, H, Lq, D) contiguous in q's dtype and lse, float32 (B, H, Lq), the natural-log
    log-sum-exp of each row of ``scale · q @ kᵀ`` (−inf when Lk is 0, where o is zero).
    Raises ValueError for bad shapes and TypeError for unsupported or mixed dtypes.
    """
    _check(q, k, v)
    b, h, lq, d = q.shape
    lk = k.shape[2]
    o = q.new_empty((b, h, lq, d))
    lse = q.new_empty((b, h, lq), dtype=torch.float32)
    if lk == 0:
        return o.zero_(), lse.fill_(float("-inf"))
    if o.numel() == 0:
        return o, lse
    _require_served(d, q, backward=False)

    def grid(meta):
        return launch_grid(lq, b * h, meta["BLOCK_M"])

    _attention_fwd[grid](
        q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        h, lq, lk, scale / common.LN2.value,
        HEAD_DIM=d, BLOCK_D=_block_d(d), UPCAST=_upcast(q.dtype), IEEE=q.dtype == torch.float32,
    )
    return o, lse


def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                  scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Flash attention backward, deterministic (no atomics: separate dk/dv and dq passes).

    do, o: (B, H, Lq, D); q, k, v as in :func:`attention_fwd`; lse: float32 (B, H, Lq) from it.
    Returns (dq, dk, dv) with the shapes and dtypes of q, k, v.
    """
    _check(q, k, v)
    b, h, lq, d = q.shape
    lk = k.shape[2]
    for name, t in (("do", do), ("o", o)):
        if tuple(t.shape) != (b, h, lq, d):
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
    if tuple(lse.shape) != (b, h, lq) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32 of shape {(b, h, lq)}, got {lse.dtype} {tuple(lse.shape)}")
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if lq == 0 or lk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if q.numel() == 0:
        return dq, dk, dv
    _require_served(d, q, backward=True)
    lse = lse.contiguous()
    block_d, upcast, ieee = _block_d(d), _upcast(q.dtype), q.dtype == torch.float32
    delta = torch.empty_like(lse)
    _attention_bwd_delta_kernel[launch_grid(lq, b * h, _DELTA_BLOCK)](
        o, do, delta, *o.stride(), *do.stride(), h, lq,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=_DELTA_BLOCK,
    )
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    qk_scale = scale / common.LN2.value

    def key_grid(meta):
        return launch_grid(lk, b * h, meta["BLOCK_N"])

    def query_grid(meta):
        return launch_grid(lq, b * h, meta["BLOCK_M"])

    _attention_bwd_dkdv[key_grid](
        q, k, v, do, lse, delta, dk, dv, *strides, *dk.stride(), *dv.stride(),
        h, lq, lk, scale, qk_scale,
        HEAD_DIM=d, BLOCK_D=block_d, UPCAST=upcast, IEEE=ieee,
    )
    _attention_bwd_dq[query_grid](
        q, k, v, do, lse, delta, dq, *strides, *dq.stride(),
        h, lq, lk, scale, qk_scale,
        HEAD_DIM=d, BLOCK_D=block_d, UPCAST=upcast, IEEE=ieee,
    )
    return dq, dk, dv


__all__ = ["attention_fwd", "attention_bwd", "launch_grid", "serves", "attention_supports", "MAX_HEAD_DIM"]
