// Attention forward on tensor cores: o = softmax(q·kᵀ·scale)·v and the natural-log log-sum-exp of each
// row, for float16/bfloat16, no mask, non-causal, any Lq and Lk, head dims up to 128 (a multiple of 8).
//
// FlashAttention-2 scheme with warp-level mma.sync.m16n8k16 (sm_80+, float32 accumulation): a block of
// four warps owns 64 queries of one (batch, head), each warp 16 of them, and walks the keys in blocks
// of 64. q is loaded once into registers (ldmatrix); k and v tiles are double-buffered in shared memory
// with cp.async, so the next block streams in while the current one is multiplied. The scores stay in
// registers: their accumulator layout is the A-operand layout of the P·V product, so the probabilities
// go from the softmax straight into the second mma, rounded to the input dtype (as in FlashAttention).
// Softmax runs online in base 2 with a float32 running max and a per-thread partial row sum.
//
// Head dims are padded to HEAD = 32, 64 or 128 in shared memory: the columns past D are zero-filled by
// cp.async (zeros add nothing to q·kᵀ and give zero output columns, which are not stored). Rows past
// Lq or Lk are zero-filled too; the scores of keys past Lk are set to -inf before the softmax.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with 16-bit operands), lane = 4·group + quad:
//   A 16×16: a0 (row group, cols 2·quad, +1), a1 (row group+8, same cols), a2, a3 (cols + 8)
//   B 16×8:  b0 (rows 2·quad, +1, col group), b1 (rows + 8)
//   C 16×8:  c0, c1 (row group, cols 2·quad, +1), c2, c3 (row group+8)
#include <cfloat>

#include "common.cuh"

namespace dxr {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBlockM = 16 * kWarps;  // queries per block
constexpr int kBlockN = 64;           // keys per step

template <int HEAD>
constexpr int kRowStride = HEAD + 8;  // elements per shared-memory row: 16 bytes of padding against bank conflicts

template <int HEAD>
constexpr size_t smem_bytes() {
  // q, two k buffers, two v buffers
  return static_cast<size_t>(kBlockM + 4 * kBlockN) * kRowStride<HEAD> * 2;
}

struct AttentionKernelArgs {
  const void* q;
  const void* k;
  const void* v;
  void* o;      // (B, H, Lq, D) contiguous
  float* lse;   // (B, H, Lq)
  int H, Lq, Lk, D;
  int64_t qs_b, qs_h, qs_l, ks_b, ks_h, ks_l, vs_b, vs_h, vs_l;
  int m_blocks;
  float scale_log2;  // scale · log2(e)
};

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a·b on a 16×8×16 tile
template <typename T>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// two floats as one 32-bit register of two 16-bit values, the first in the low half
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// rows [0, rows) of a kBlockN (or kBlockM) × HEAD tile from global rows `stride` elements apart; the
// rest, and the columns past D, zero
template <typename T, int HEAD, int ROWS>
__device__ __forceinline__ void load_tile(T* smem, const T* g, int64_t stride, int rows, int D) {
  constexpr int kChunks = HEAD / 8;  // 16-byte chunks per row
  for (int idx = threadIdx.x; idx < ROWS * kChunks; idx += kThreads) {
    const int r = idx / kChunks, c = idx % kChunks;
    const bool valid = r < rows && c * 8 < D;
    copy16_or_zero(smem + r * kRowStride<HEAD> + c * 8, valid ? g + r * stride + c * 8 : g, valid);
  }
}

template <typename T, int HEAD>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(AttentionKernelArgs a) {
  constexpr int LDS = kRowStride<HEAD>;
  constexpr int KD = HEAD / 16;  // k-steps over the head dim
  constexpr int ND = HEAD / 8;   // output column tiles
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sq = reinterpret_cast<T*>(smem_raw);
  T* sk = sq + kBlockM * LDS;          // two buffers of kBlockN rows
  T* sv = sk + 2 * kBlockN * LDS;      // two buffers

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / 4, quad = lane % 4;
  const int m_block = static_cast<int>(blockIdx.x % a.m_blocks);
  const int64_t bh = blockIdx.x / a.m_blocks;
  const int64_t b = bh / a.H, h = bh % a.H;
  const int m0 = m_block * kBlockM;

  const T* q = static_cast<const T*>(a.q) + b * a.qs_b + h * a.qs_h + static_cast<int64_t>(m0) * a.qs_l;
  const T* k = static_cast<const T*>(a.k) + b * a.ks_b + h * a.ks_h;
  const T* v = static_cast<const T*>(a.v) + b * a.vs_b + h * a.vs_h;
  const int n_blocks = (a.Lk + kBlockN - 1) / kBlockN;

  load_tile<T, HEAD, kBlockM>(sq, q, a.qs_l, min(kBlockM, a.Lq - m0), a.D);
  load_tile<T, HEAD, kBlockN>(sk, k, a.ks_l, min(kBlockN, a.Lk), a.D);
  load_tile<T, HEAD, kBlockN>(sv, v, a.vs_l, min(kBlockN, a.Lk), a.D);
  cp_async_commit();

  float acc[ND][4];
#pragma unroll
  for (int i = 0; i < ND; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // rows group and group + 8, in log2 units
  float row_sum[2] = {0.f, 0.f};              // this thread's share
  uint32_t qf[KD][4];

  for (int j = 0; j < n_blocks; ++j) {
    if (j + 1 < n_blocks) {
      const int next = (j + 1) * kBlockN, buf = (j + 1) & 1;
      load_tile<T, HEAD, kBlockN>(sk + buf * kBlockN * LDS, k + static_cast<int64_t>(next) * a.ks_l, a.ks_l,
                                  min(kBlockN, a.Lk - next), a.D);
      load_tile<T, HEAD, kBlockN>(sv + buf * kBlockN * LDS, v + static_cast<int64_t>(next) * a.vs_l, a.vs_l,
                                  min(kBlockN, a.Lk - next), a.D);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (j == 0) {
#pragma unroll
      for (int kk = 0; kk < KD; ++kk)
        ldmatrix_x4(qf[kk], sq + (warp * 16 + lane % 16) * LDS + kk * 16 + (lane / 16) * 8);
    }
    const T* kb = sk + (j & 1) * kBlockN * LDS;
    const T* vb = sv + (j & 1) * kBlockN * LDS;

    // scores of this warp's 16 queries against 64 keys: 8 tiles of 16×8
    float s[kBlockN / 8][4];
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
#pragma unroll
      for (int np = 0; np < kBlockN / 16; ++np) {
        uint32_t kf[4];
        ldmatrix_x4(kf, kb + (np * 16 + (lane / 16) * 8 + lane % 8) * LDS + kk * 16 + ((lane / 8) % 2) * 8);
        mma<T>(s[2 * np], qf[kk], kf[0], kf[1]);
        mma<T>(s[2 * np + 1], qf[kk], kf[2], kf[3]);
      }
    }

    const int key0 = j * kBlockN;
    const bool ragged = key0 + kBlockN > a.Lk;
    float block_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[nt][e] * a.scale_log2;
        if (ragged && key0 + nt * 8 + 2 * quad + (e & 1) >= a.Lk) x = -INFINITY;
        s[nt][e] = x;
        block_max[e / 2] = fmaxf(block_max[e / 2], x);
      }
    }
    float rescale[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = block_max[r];
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
      const float new_max = fmaxf(row_max[r], mx);  // finite: every key block holds a valid key
      rescale[r] = exp2f(row_max[r] - new_max);
      row_max[r] = new_max;
      row_sum[r] *= rescale[r];
    }
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = exp2f(s[nt][e] - row_max[e / 2]);
        s[nt][e] = p;
        row_sum[e / 2] += p;
      }
    }
#pragma unroll
    for (int nd = 0; nd < ND; ++nd) {
      acc[nd][0] *= rescale[0];
      acc[nd][1] *= rescale[0];
      acc[nd][2] *= rescale[1];
      acc[nd][3] *= rescale[1];
    }

    // acc += P·V: the score tiles 2kk, 2kk+1 are the A fragment of keys kk·16 .. kk·16 + 15
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t pf[4];
      pf[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      pf[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      pf[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pf[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < HEAD / 16; ++dp) {
        uint32_t vf[4];
        ldmatrix_x4_trans(vf, vb + (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * LDS + dp * 16 + (lane / 16) * 8);
        mma<T>(acc[2 * dp], pf, vf[0], vf[1]);
        mma<T>(acc[2 * dp + 1], pf, vf[2], vf[3]);
      }
    }
    __syncthreads();  // the buffer read here is refilled by the next step's prefetch
  }

  T* o = static_cast<T*>(a.o) + bh * a.Lq * a.D;
  float* lse = a.lse + bh * a.Lq;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float total = row_sum[r];
    total += __shfl_xor_sync(kFullMask, total, 1);
    total += __shfl_xor_sync(kFullMask, total, 2);
    const int row = m0 + warp * 16 + group + 8 * r;
    if (row >= a.Lq) continue;
    const float inv = 1.f / total;
#pragma unroll
    for (int nd = 0; nd < ND; ++nd) {
      const int col = nd * 8 + 2 * quad;
      if (col < a.D)
        *reinterpret_cast<uint32_t*>(o + static_cast<int64_t>(row) * a.D + col) =
            pack2<T>(acc[nd][2 * r] * inv, acc[nd][2 * r + 1] * inv);
    }
    if (quad == 0) lse[row] = (row_max[r] + log2f(total)) * 0.6931471805599453f;
  }
}

template <typename T, int HEAD>
void launch_attention(const AttentionKernelArgs& k, int64_t grid, int device, cudaStream_t stream, const char* op) {
  constexpr size_t smem = smem_bytes<HEAD>();
  allow_dynamic_smem(reinterpret_cast<const void*>(attention_fwd_kernel<T, HEAD>), smem, device, op);
  attention_fwd_kernel<T, HEAD><<<static_cast<unsigned>(grid), kThreads, smem, stream>>>(k);
}

}  // namespace

size_t attention_smem_bytes(int64_t d) { return d <= 32 ? smem_bytes<32>() : d <= 64 ? smem_bytes<64>() : smem_bytes<128>(); }

void attention_fwd(const AttentionArgs& a, int device, uintptr_t stream) {
  const char* op = "attention_fwd";
  require(a.d > 0 && a.d <= 128 && a.d % 8 == 0, op, "head dim D must be a multiple of 8 in [8, 128], got " +
                                                          std::to_string(a.d));
  require(a.dtype == kFloat16 || a.dtype == kBFloat16, op,
          "dtype code must be 1 (float16) or 2 (bfloat16), got " + std::to_string(a.dtype));
  require(a.b > 0 && a.h > 0 && a.lq > 0 && a.lk > 0, op, "need B, H, Lq, Lk > 0");
  require(a.lq <= INT32_MAX && a.lk <= INT32_MAX, op, "sequence lengths must fit in 32 bits");
  require(a.q % 16 == 0 && a.k % 16 == 0 && a.v % 16 == 0 && a.o % 4 == 0, op,
          "q, k, v must be 16-byte aligned");
  for (const int64_t* st : {a.q_strides, a.k_strides, a.v_strides})
    require(st[0] % 8 == 0 && st[1] % 8 == 0 && st[2] % 8 == 0, op,
            "strides of q, k, v must be multiples of 8 elements (16-byte aligned rows)");
  const int64_t m_blocks = ceil_div(a.lq, kBlockM);
  const int64_t grid = m_blocks * a.b * a.h;
  require(grid <= INT32_MAX, op, "more blocks than one grid holds");
  DeviceGuard guard(device, op);

  AttentionKernelArgs k = {};
  k.q = reinterpret_cast<const void*>(a.q);
  k.k = reinterpret_cast<const void*>(a.k);
  k.v = reinterpret_cast<const void*>(a.v);
  k.o = reinterpret_cast<void*>(a.o);
  k.lse = reinterpret_cast<float*>(a.lse);
  k.H = static_cast<int>(a.h);
  k.Lq = static_cast<int>(a.lq);
  k.Lk = static_cast<int>(a.lk);
  k.D = static_cast<int>(a.d);
  k.qs_b = a.q_strides[0], k.qs_h = a.q_strides[1], k.qs_l = a.q_strides[2];
  k.ks_b = a.k_strides[0], k.ks_h = a.k_strides[1], k.ks_l = a.k_strides[2];
  k.vs_b = a.v_strides[0], k.vs_h = a.v_strides[1], k.vs_l = a.v_strides[2];
  k.m_blocks = static_cast<int>(m_blocks);
  k.scale_log2 = a.scale * 1.4426950408889634f;
  const cudaStream_t s = as_stream(stream);
  dispatch_half(a.dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (a.d <= 32) launch_attention<T, 32>(k, grid, device, s, op);
    else if (a.d <= 64) launch_attention<T, 64>(k, grid, device, s, op);
    else launch_attention<T, 128>(k, grid, device, s, op);
  });
  check_launch(op);
}

}  // namespace dxr
