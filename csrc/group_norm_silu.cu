// GroupNorm (+ SiLU) and AdaIN, forward and backward: one set of kernels for both.
//
// x (N, C, S) is normalised over (sample, group) rows: GroupNorm has C / G channels per group and a
// per-channel affine (C,); AdaIN is one channel per group with a per-sample affine (N, C). NCHW
// (element (n, c, s) at n·C·S + c·S + s) and channels_last (n·C·S + s·C + c) run in place.
//
// Tiles. A block works on a tile of whole groups of one sample — `width` consecutive channels — over a
// range of `chunk` positions; `splits` blocks share a tile's positions. Its threads walk the tile along
// the contiguous axis with 16-byte vectors where the sizes allow: on NCHW `tpr` threads per channel row,
// on channels_last `tpr` = width / vec threads per position row (tiles at least 128 bytes wide, so the
// groups that share a cache line share a block). Every reduction first forms per-channel sums (shuffles
// within a row's threads on NCHW, a fixed-order pass over shared memory on channels_last), then sums a
// group's channels: fixed order everywhere, so one plan gives bitwise the same result run after run.
//
// Paths, chosen by norm_plan from the shapes and the device:
// - on-chip: the block keeps its part of the tile in shared memory (copied with cp.async): one read of
//   x (and dy), one write of y (dx). With `splits` > 1 the blocks form a thread-block cluster (sm_90)
//   and add their group partials through distributed shared memory, so a group too large for one
//   block, or a batch too small to fill the GPU, still takes one read and one write.
// - split: two launches; the first writes per-(tile, split) group partials to a float32 workspace, the
//   second merges them in a fixed order and re-reads x (and dy) to write y (dx), its blocks in the
//   reverse of the first's order so that the re-read starts with what L2 still holds.
//
// Statistics. The on-chip forward takes the mean of x minus the group's first element (its pivot), then
// the variance as the mean squared deviation from that mean; the split forward sums (x - pivot) and
// (x - pivot)² per split (the shifted-data formula: with a pivot from the data, no large offset is left
// to cancel). The backward, with z = xhat·w + b, dz = dy·silu'(z) (or dy) and g = dz·w:
// dx = rstd·(g - mean(g) - xhat·mean(g·xhat)); dweight, dbias come out as per-(sample, split) rows of
// Σ dz·xhat and Σ dz that the caller sums (no atomics).
#include <cooperative_groups.h>

#include <algorithm>

#include "common.cuh"

namespace cg = cooperative_groups;

namespace dxr {
namespace {

// the kernels declare at least one block of kMaxThreads per SM (__launch_bounds__(kMaxThreads, 1)): without the
// minimum, ptxas spilled a few bytes of the apply kernels at 32 registers
constexpr int kMaxThreads = 256;
constexpr int kParams = 6;            // per-channel float arrays in shared memory
constexpr int64_t kMaxWidth = 2048;   // channels per tile
constexpr int kMaxCluster = 8;        // portable cluster size
constexpr int kMinRowBytes = 128;     // channels_last tiles are at least one cache line wide

struct NormArgs {
  const void* x;
  void* y;
  const void* dy;
  void* dx;
  const float* w;        // float32 (C,) or (N, C); nullptr: ones
  const float* b;        // float32 (C,) or (N, C); nullptr: zeros
  float* mean;           // float32 (N, G)
  float* rstd;           // float32 (N, G)
  float* partial;        // split path: float32 (tiles · splits, groups per tile, 2)
  float* dw_rows;        // backward: float32 (N · splits, C)
  float* db_rows;
  int C, S, G, CPG;
  int W;                 // channels per tile
  int GT;                // groups per tile
  int tiles_per_sample;  // C / W
  int splits;            // blocks per tile
  int chunk;             // positions per block
  int tpr;               // threads per tile row
  int nrg;               // row groups: threads / tpr, rounded down
  int rows_per_thread;   // row slots per thread
  int cols_per_thread;   // column slots per thread and row (NCHW; 1 on channels_last)
  float eps;
  bool per_sample_affine;
  bool silu;
};

// This block's tile and its thread's place in it.
struct Ctx {
  int64_t base;   // element offset of the sample
  int64_t tile;
  int n, c0, g0, split, s0, s1;
  int rg, lane;
  bool active;
};

// `reversed`: the split path's apply kernels, which take the blocks in the reverse of the statistics
// kernels' order (see norm_fwd_apply)
__device__ __forceinline__ Ctx make_ctx(const NormArgs& a, bool reversed = false) {
  Ctx t;
  const int64_t block = reversed ? static_cast<int64_t>(gridDim.x) - 1 - blockIdx.x : blockIdx.x;
  t.tile = block / a.splits;
  t.split = static_cast<int>(block % a.splits);
  t.n = static_cast<int>(t.tile / a.tiles_per_sample);
  t.c0 = static_cast<int>(t.tile % a.tiles_per_sample) * a.W;
  t.g0 = t.c0 / a.CPG;
  t.base = static_cast<int64_t>(t.n) * a.C * a.S;
  const int64_t s0 = static_cast<int64_t>(t.split) * a.chunk;
  t.s0 = static_cast<int>(min(s0, static_cast<int64_t>(a.S)));
  t.s1 = static_cast<int>(min(s0 + a.chunk, static_cast<int64_t>(a.S)));
  t.rg = threadIdx.x / a.tpr;
  t.lane = threadIdx.x % a.tpr;
  t.active = t.rg < a.nrg;
  return t;
}

// Shared memory: per-channel parameters, per-channel sums, a reduction scratch, group partials, data.
struct Smem {
  float* prm[kParams];  // W floats each
  float* chan;          // 2·W: per-channel sums
  float* scratch;       // threads · vec
  float* mine;          // 2·GT: this block's group partials, first exchange
  float* mine2;         // 2·GT: second exchange
  float* total;         // 2·GT: the cluster's sums
  unsigned char* data;  // 16-byte aligned tile data
};

__host__ __device__ inline size_t smem_fixed_bytes(int64_t W, int threads, int vec, int64_t GT) {
  const size_t floats = static_cast<size_t>(kParams * W + 2 * W + static_cast<int64_t>(threads) * vec + 6 * GT);
  return (floats * sizeof(float) + 15) / 16 * 16;
}

__device__ __forceinline__ Smem carve(unsigned char* raw, const NormArgs& a, int vec) {
  Smem s;
  float* f = reinterpret_cast<float*>(raw);
  for (int i = 0; i < kParams; ++i) s.prm[i] = f + i * a.W;
  s.chan = f + kParams * a.W;
  s.scratch = s.chan + 2 * a.W;
  s.mine = s.scratch + static_cast<int>(blockDim.x) * vec;
  s.mine2 = s.mine + 2 * a.GT;
  s.total = s.mine2 + 2 * a.GT;
  s.data = raw + smem_fixed_bytes(a.W, blockDim.x, vec, a.GT);
  return s;
}

// The element index of a tile's data slot in shared memory (each thread reads back what it copied).
template <int VEC>
__device__ __forceinline__ int slot_index(int slot) {
  return (slot * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x)) * VEC;
}

// Calls f(slot, offset, ch) for each vector of this thread: `offset` the element offset in x, `ch` the
// tile channel of its first lane (lanes are channels ch.. on channels_last, all channel ch on NCHW).
// On NCHW row_end(r, ok) is called after each row slot by every thread (a collective point).
template <int VEC, bool CL, typename F, typename RowEnd>
__device__ __forceinline__ void visit(const NormArgs& a, const Ctx& t, F&& f, RowEnd&& row_end) {
  if constexpr (!CL) {
    for (int kr = 0; kr < a.rows_per_thread; ++kr) {
      const int r = t.rg + kr * a.nrg;
      const bool ok = t.active && r < a.W;
      if (ok) {
        const int64_t row = t.base + static_cast<int64_t>(t.c0 + r) * a.S;
        for (int kc = 0; kc < a.cols_per_thread; ++kc) {
          const int s = t.s0 + (kc * a.tpr + t.lane) * VEC;
          if (s < t.s1) f(kr * a.cols_per_thread + kc, row + s, r);
        }
      }
      row_end(r, ok);
    }
  } else {
    if (t.active) {
      const int col = t.lane * VEC;
      for (int kr = 0; kr < a.rows_per_thread; ++kr) {
        const int s = t.s0 + t.rg + kr * a.nrg;
        if (s < t.s1) f(kr, t.base + static_cast<int64_t>(s) * a.C + t.c0 + col, col);
      }
    }
  }
}

template <int VEC, bool CL, typename F>
__device__ __forceinline__ void visit(const NormArgs& a, const Ctx& t, F&& f) {
  visit<VEC, CL>(a, t, f, [](int, bool) {});
}

// Per-channel sums of NS quantities: f(slot, offset, ch, acc) adds each lane's into acc[q][lane];
// the tile's sums land in chan[q·W + ch], visible to every thread on return.
template <int NS, int VEC, bool CL, typename F>
__device__ __forceinline__ void channel_sums(const NormArgs& a, const Ctx& t, const Smem& sm, F&& f) {
  float acc[NS][VEC];
#pragma unroll
  for (int q = 0; q < NS; ++q)
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[q][i] = 0.f;
  auto add = [&](int slot, int64_t off, int ch) { f(slot, off, ch, acc); };
  if constexpr (!CL) {
    visit<VEC, CL>(a, t, add, [&](int r, bool ok) {
#pragma unroll
      for (int q = 0; q < NS; ++q) {
        float v = 0.f;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          v += acc[q][i];
          acc[q][i] = 0.f;
        }
        v = segment_sum(v, a.tpr);
        if (ok && t.lane == 0) sm.chan[q * a.W + r] = v;
      }
    });
    __syncthreads();
  } else {
    visit<VEC, CL>(a, t, add);
#pragma unroll
    for (int q = 0; q < NS; ++q) {
      if (t.active) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) sm.scratch[t.rg * a.W + t.lane * VEC + i] = acc[q][i];
      }
      __syncthreads();
      for (int ch = threadIdx.x; ch < a.W; ch += blockDim.x) {
        float v = 0.f;
        for (int g = 0; g < a.nrg; ++g) v += sm.scratch[g * a.W + ch];
        sm.chan[q * a.W + ch] = v;
      }
      __syncthreads();
    }
  }
}

// total[i] = Σ over the cluster's blocks of mine[i] (rank order), for i < count; a lone block copies.
__device__ __forceinline__ void cluster_total(float* mine, float* total, int count, int splits) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (splits > 1) {
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();
    for (int i = threadIdx.x; i < count; i += blockDim.x) {
      float v = 0.f;
      for (int r = 0; r < splits; ++r) v += cluster.map_shared_rank(mine, r)[i];
      total[i] = v;
    }
    __syncthreads();
    return;
  }
#else
  if (splits > 1) __trap();  // the planner never clusters below sm_90
#endif
  __syncthreads();
  for (int i = threadIdx.x; i < count; i += blockDim.x) total[i] = mine[i];
  __syncthreads();
}

// a block's shared memory must outlive the other blocks' reads of it
__device__ __forceinline__ void cluster_finish(int splits) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (splits > 1) cg::this_cluster().sync();
#endif
}

__device__ __forceinline__ float silu_or_identity(float z, bool silu) {
  return silu ? z / (1.f + __expf(-z)) : z;
}

// dy·silu'(z) at z = xhat·w + b, or dy
__device__ __forceinline__ float grad_pre(float dy, float xhat, float w, float b, bool silu) {
  if (!silu) return dy;
  const float z = xhat * w + b;
  const float sig = 1.f / (1.f + __expf(-z));
  return dy * sig * (1.f + z * (1.f - sig));
}

__device__ __forceinline__ int64_t affine_index(const NormArgs& a, const Ctx& t, int ch) {
  const int64_t c = t.c0 + ch;
  return a.per_sample_affine ? static_cast<int64_t>(t.n) * a.C + c : c;
}

// prm[i0][ch] = w, prm[i1][ch] = b of the tile's channels
__device__ __forceinline__ void load_affine(const NormArgs& a, const Ctx& t, const Smem& sm, int iw, int ib) {
  for (int ch = threadIdx.x; ch < a.W; ch += blockDim.x) {
    const int64_t i = affine_index(a, t, ch);
    sm.prm[iw][ch] = a.w ? a.w[i] : 1.f;
    sm.prm[ib][ch] = a.b ? a.b[i] : 0.f;
  }
}

// prm[ip][ch] = the first element of the channel's group (the pivot the forward sums around)
template <typename T, bool CL>
__device__ __forceinline__ void load_pivots(const NormArgs& a, const Ctx& t, const Smem& sm, int ip) {
  const T* x = static_cast<const T*>(a.x);
  for (int ch = threadIdx.x; ch < a.W; ch += blockDim.x) {
    const int64_t first = t.c0 + (ch / a.CPG) * a.CPG;
    sm.prm[ip][ch] = to_float(x[t.base + (CL ? first : first * a.S)]);
  }
}

__device__ __forceinline__ float group_count(const NormArgs& a) {
  return static_cast<float>(static_cast<int64_t>(a.CPG) * a.S);
}

// ---------------------------------------------------------------------------------------------
// forward

// prm: 0 pivot, 1 w, 2 b, 3 mean - pivot, 4 rstd·w
template <typename T, int VEC, bool CL>
__device__ __forceinline__ void write_y(const NormArgs& a, const Ctx& t, const Smem& sm, const T* src, bool from_smem) {
  T* y = static_cast<T*>(a.y);
  visit<VEC, CL>(a, t, [&](int slot, int64_t off, int ch) {
    float v[VEC];
    load_vec<T, VEC>(from_smem ? src + slot_index<VEC>(slot) : src + off, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const int c = CL ? ch + i : ch;
      const float z = ((v[i] - sm.prm[0][c]) - sm.prm[3][c]) * sm.prm[4][c] + sm.prm[2][c];
      v[i] = silu_or_identity(z, a.silu);
    }
    store_vec<T, VEC>(y + off, v);
  });
}

template <typename T, int VEC, bool CL>
__global__ void __launch_bounds__(kMaxThreads, 1) norm_fwd_onchip(NormArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Ctx t = make_ctx(a);
  const Smem sm = carve(smem_raw, a, VEC);
  const T* x = static_cast<const T*>(a.x);
  T* data = reinterpret_cast<T*>(sm.data);

  load_pivots<T, CL>(a, t, sm, 0);
  load_affine(a, t, sm, 1, 2);
  visit<VEC, CL>(a, t, [&](int slot, int64_t off, int) { copy_to_shared<T, VEC>(data + slot_index<VEC>(slot), x + off); });
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  const float count = group_count(a);
  // mean, around the pivot
  channel_sums<1, VEC, CL>(a, t, sm, [&](int slot, int64_t, int ch, float (&acc)[1][VEC]) {
    float v[VEC];
    load_vec<T, VEC>(data + slot_index<VEC>(slot), v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[0][i] += v[i] - sm.prm[0][CL ? ch + i : ch];
  });
  for (int gi = threadIdx.x; gi < a.GT; gi += blockDim.x) {
    float sum = 0.f;
    for (int j = 0; j < a.CPG; ++j) sum += sm.chan[gi * a.CPG + j];
    sm.mine[gi] = sum;
  }
  cluster_total(sm.mine, sm.total, a.GT, a.splits);
  for (int ch = threadIdx.x; ch < a.W; ch += blockDim.x) sm.prm[3][ch] = sm.total[ch / a.CPG] / count;
  __syncthreads();

  // variance: mean squared deviation from that mean
  channel_sums<1, VEC, CL>(a, t, sm, [&](int slot, int64_t, int ch, float (&acc)[1][VEC]) {
    float v[VEC];
    load_vec<T, VEC>(data + slot_index<VEC>(slot), v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const int c = CL ? ch + i : ch;
      const float d = (v[i] - sm.prm[0][c]) - sm.prm[3][c];
      acc[0][i] += d * d;
    }
  });
  for (int gi = threadIdx.x; gi < a.GT; gi += blockDim.x) {
    float sum = 0.f;
    for (int j = 0; j < a.CPG; ++j) sum += sm.chan[gi * a.CPG + j];
    sm.mine2[gi] = sum;
  }
  cluster_total(sm.mine2, sm.total, a.GT, a.splits);
  for (int ch = threadIdx.x; ch < a.W; ch += blockDim.x)
    sm.prm[4][ch] = rsqrtf(sm.total[ch / a.CPG] / count + a.eps) * sm.prm[1][ch];
  if (t.split == 0) {
    for (int gi = threadIdx.x; gi < a.GT; gi += blockDim.x) {
      const int64_t row = static_cast<int64_t>(t.n) * a.G + t.g0 + gi;
      a.mean[row] = sm.prm[0][gi * a.CPG] + sm.prm[3][gi * a.CPG];
      a.rstd[row] = rsqrtf(sm.total[gi] / count + a.eps);
    }
  }
  __syncthreads();

  write_y<T, VEC, CL>(a, t, sm, data, true);
  cluster_finish(a.splits);
}

// split path, first launch: Σ (x - pivot) and Σ (x - pivot)² per group of the block's positions
template <typename T, int VEC, bool CL>
__global__ void __launch_bounds__(kMaxThreads, 1) norm_fwd_partial(NormArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Ctx t = make_ctx(a);
  const Smem sm = carve(smem_raw, a, VEC);
  const T* x = static_cast<const T*>(a.x);
  load_pivots<T, CL>(a, t, sm, 0);
  __syncthreads();
  channel_sums<2, VEC, CL>(a, t, sm, [&](int, int64_t off, int ch, float (&acc)[2][VEC]) {
    float v[VEC];
    load_vec<T, VEC>(x + off, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float d = v[i] - sm.prm[0][CL ? ch + i : ch];
      acc[0][i] += d;
      acc[1][i] += d * d;
    }
  });
  // the statistics blocks run in index order: blockIdx.x is (tile · splits + split), what the apply reads
  float* out = a.partial + static_cast<int64_t>(blockIdx.x) * a.GT * 2;
  for (int gi = threadIdx.x; gi < a.GT; gi += blockDim.x) {
    float s1 = 0.f, s2 = 0.f;
    for (int j = 0; j < a.CPG; ++j) {
      s1 += sm.chan[gi * a.CPG + j];
      s2 += sm.chan[a.W + gi * a.CPG + j];
    }
    out[gi * 2] = s1;
    out[gi * 2 + 1] = s2;
  }
}

// split path, second launch: merge the tile's partials (split order), normalise the block's positions.
// Blocks start in the order of their index, wave after wave, so the chunks the statistics launch read
// last (its highest blocks) are the ones L2 still holds when this launch starts. Its blocks take the
// chunks in the reverse order, the last one first, so the second read of x comes from L2 for as much
// of x as L2 holds instead of evicting it just ahead of the blocks that need it.
template <typename T, int VEC, bool CL>
__global__ void __launch_bounds__(kMaxThreads, 1) norm_fwd_apply(NormArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Ctx t = make_ctx(a, true);
  const Smem sm = carve(smem_raw, a, VEC);
  load_pivots<T, CL>(a, t, sm, 0);
  load_affine(a, t, sm, 1, 2);
  const float count = group_count(a);
  for (int gi = threadIdx.x; gi < a.GT; gi += blockDim.x) {
    float s1 = 0.f, s2 = 0.f;
    for (int k = 0; k < a.splits; ++k) {
      const float* part = a.partial + ((t.tile * a.splits + k) * a.GT + gi) * 2;
      s1 += part[0];
      s2 += part[1];
    }
    const float shifted_mean = s1 / count;
    const float rstd = rsqrtf(fmaxf(s2 / count - shifted_mean * shifted_mean, 0.f) + a.eps);
    sm.total[gi * 2] = shifted_mean;
    sm.total[gi * 2 + 1] = rstd;
  }
  __syncthreads();
  for (int ch = threadIdx.x; ch < a.W; ch += blockDim.x) {
    sm.prm[3][ch] = sm.total[(ch / a.CPG) * 2];
    sm.prm[4][ch] = sm.total[(ch / a.CPG) * 2 + 1] * sm.prm[1][ch];
  }
  if (t.split == 0) {
    for (int gi = threadIdx.x; gi < a.GT; gi += blockDim.x) {
      const int64_t row = static_cast<int64_t>(t.n) * a.G + t.g0 + gi;
      a.mean[row] = sm.prm[0][gi * a.CPG] + sm.total[gi * 2];
      a.rstd[row] = sm.total[gi * 2 + 1];
    }
  }
  __syncthreads();
  write_y<T, VEC, CL>(a, t, sm, static_cast<const T*>(a.x), false);
}

// ---------------------------------------------------------------------------------------------
// backward

// prm: 0 mean, 1 rstd, 2 w, 3 b, 4 rstd·mean(g), 5 rstd·mean(g·xhat)
__device__ __forceinline__ void load_saved_stats(const NormArgs& a, const Ctx& t, const Smem& sm) {
  for (int ch = threadIdx.x; ch < a.W; ch += blockDim.x) {
    const int64_t row = static_cast<int64_t>(t.n) * a.G + t.g0 + ch / a.CPG;
    sm.prm[0][ch] = a.mean[row];
    sm.prm[1][ch] = a.rstd[row];
  }
  load_affine(a, t, sm, 2, 3);
}

// Σ dz·xhat and Σ dz per channel, from x and dy at (slot, offset)
template <typename T, int VEC, bool CL>
__device__ __forceinline__ void grad_sums(const NormArgs& a, const Ctx& t, const Smem& sm, const T* xs, const T* dys,
                                          bool from_smem) {
  channel_sums<2, VEC, CL>(a, t, sm, [&](int slot, int64_t off, int ch, float (&acc)[2][VEC]) {
    const int at = from_smem ? slot_index<VEC>(slot) : 0;
    float xv[VEC], dyv[VEC];
    load_vec<T, VEC>(from_smem ? xs + at : xs + off, xv);
    load_vec<T, VEC>(from_smem ? dys + at : dys + off, dyv);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const int c = CL ? ch + i : ch;
      const float xhat = (xv[i] - sm.prm[0][c]) * sm.prm[1][c];
      const float dz = grad_pre(dyv[i], xhat, sm.prm[2][c], sm.prm[3][c], a.silu);
      acc[0][i] += dz * xhat;
      acc[1][i] += dz;
    }
  });
}

// the block's per-channel rows of dweight/dbias, and its group partials Σ g, Σ g·xhat into `out`
__device__ __forceinline__ void write_grad_partials(const NormArgs& a, const Ctx& t, const Smem& sm, float* out) {
  const int64_t row = (static_cast<int64_t>(t.n) * a.splits + t.split) * a.C + t.c0;
  for (int ch = threadIdx.x; ch < a.W; ch += blockDim.x) {
    a.dw_rows[row + ch] = sm.chan[ch];
    a.db_rows[row + ch] = sm.chan[a.W + ch];
  }
  for (int gi = threadIdx.x; gi < a.GT; gi += blockDim.x) {
    float sg = 0.f, sgx = 0.f;
    for (int j = 0; j < a.CPG; ++j) {
      const int ch = gi * a.CPG + j;
      sg += sm.prm[2][ch] * sm.chan[a.W + ch];
      sgx += sm.prm[2][ch] * sm.chan[ch];
    }
    out[gi * 2] = sg;
    out[gi * 2 + 1] = sgx;
  }
}

// prm[4], prm[5] from the group sums in `sums` (Σ g, Σ g·xhat per group)
__device__ __forceinline__ void set_grad_terms(const NormArgs& a, const Smem& sm, const float* sums) {
  const float count = group_count(a);
  for (int ch = threadIdx.x; ch < a.W; ch += blockDim.x) {
    const int gi = ch / a.CPG;
    sm.prm[4][ch] = sm.prm[1][ch] * (sums[gi * 2] / count);
    sm.prm[5][ch] = sm.prm[1][ch] * (sums[gi * 2 + 1] / count);
  }
}

template <typename T, int VEC, bool CL>
__device__ __forceinline__ void write_dx(const NormArgs& a, const Ctx& t, const Smem& sm, const T* xs, const T* dys,
                                         bool from_smem) {
  T* dx = static_cast<T*>(a.dx);
  visit<VEC, CL>(a, t, [&](int slot, int64_t off, int ch) {
    const int at = from_smem ? slot_index<VEC>(slot) : 0;
    float xv[VEC], dyv[VEC];
    load_vec<T, VEC>(from_smem ? xs + at : xs + off, xv);
    load_vec<T, VEC>(from_smem ? dys + at : dys + off, dyv);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const int c = CL ? ch + i : ch;
      const float rstd = sm.prm[1][c], w = sm.prm[2][c];
      const float xhat = (xv[i] - sm.prm[0][c]) * rstd;
      const float dz = grad_pre(dyv[i], xhat, w, sm.prm[3][c], a.silu);
      xv[i] = rstd * w * dz - sm.prm[4][c] - xhat * sm.prm[5][c];
    }
    store_vec<T, VEC>(dx + off, xv);
  });
}

template <typename T, int VEC, bool CL>
__global__ void __launch_bounds__(kMaxThreads, 1) norm_bwd_onchip(NormArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Ctx t = make_ctx(a);
  const Smem sm = carve(smem_raw, a, VEC);
  const T* x = static_cast<const T*>(a.x);
  const T* dy = static_cast<const T*>(a.dy);
  T* xs = reinterpret_cast<T*>(sm.data);
  T* dys = xs + static_cast<int64_t>(a.rows_per_thread) * a.cols_per_thread * blockDim.x * VEC;

  load_saved_stats(a, t, sm);
  visit<VEC, CL>(a, t, [&](int slot, int64_t off, int) {
    copy_to_shared<T, VEC>(xs + slot_index<VEC>(slot), x + off);
    copy_to_shared<T, VEC>(dys + slot_index<VEC>(slot), dy + off);
  });
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  grad_sums<T, VEC, CL>(a, t, sm, xs, dys, true);
  write_grad_partials(a, t, sm, sm.mine);
  cluster_total(sm.mine, sm.total, 2 * a.GT, a.splits);
  set_grad_terms(a, sm, sm.total);
  __syncthreads();
  write_dx<T, VEC, CL>(a, t, sm, xs, dys, true);
  cluster_finish(a.splits);
}

template <typename T, int VEC, bool CL>
__global__ void __launch_bounds__(kMaxThreads, 1) norm_bwd_partial(NormArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Ctx t = make_ctx(a);
  const Smem sm = carve(smem_raw, a, VEC);
  load_saved_stats(a, t, sm);
  __syncthreads();
  grad_sums<T, VEC, CL>(a, t, sm, static_cast<const T*>(a.x), static_cast<const T*>(a.dy), false);
  write_grad_partials(a, t, sm, a.partial + static_cast<int64_t>(blockIdx.x) * a.GT * 2);  // as norm_fwd_partial
}

// as norm_fwd_apply: the chunks in the reverse of the statistics launch's order (x and dy from L2 first)
template <typename T, int VEC, bool CL>
__global__ void __launch_bounds__(kMaxThreads, 1) norm_bwd_apply(NormArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Ctx t = make_ctx(a, true);
  const Smem sm = carve(smem_raw, a, VEC);
  load_saved_stats(a, t, sm);
  for (int gi = threadIdx.x; gi < a.GT; gi += blockDim.x) {
    float sg = 0.f, sgx = 0.f;
    for (int k = 0; k < a.splits; ++k) {
      const float* part = a.partial + ((t.tile * a.splits + k) * a.GT + gi) * 2;
      sg += part[0];
      sgx += part[1];
    }
    sm.total[gi * 2] = sg;
    sm.total[gi * 2 + 1] = sgx;
  }
  __syncthreads();
  set_grad_terms(a, sm, sm.total);
  __syncthreads();
  write_dx<T, VEC, CL>(a, t, sm, static_cast<const T*>(a.x), static_cast<const T*>(a.dy), false);
}

// ---------------------------------------------------------------------------------------------
// host: planning and launching

template <typename T_, int VEC_, bool CL_>
struct Variant {
  using T = T_;
  static constexpr int vec = VEC_;
  static constexpr bool cl = CL_;
};

// Calls f(Variant<T, vec, channels_last>{}) for the problem's dtype, vector width and layout.
template <typename F>
void dispatch_variant(int dtype, int vec, bool channels_last, const char* op, F&& f) {
  dispatch_float(dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int wide = kVec16<T>;
    if (vec == wide) {
      if (channels_last) f(Variant<T, wide, true>{});
      else f(Variant<T, wide, false>{});
    } else {
      if (channels_last) f(Variant<T, 1, true>{});
      else f(Variant<T, 1, false>{});
    }
  });
}

int dtype_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

int64_t pow2_at_least(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

inline cudaLaunchConfig_t cluster_config(cudaLaunchAttribute* attr, int64_t grid, int threads, size_t smem, int splits,
                                  cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(grid));
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = splits;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

// Whether the code of `kernel` the device runs was compiled for sm_90 or newer. Below that the cluster
// exchange is compiled out (cluster_total traps), and that is the code a GPU newer than the built
// architectures runs: the default build's compute_80 PTX, JIT-compiled by the driver (the sm_90a
// cubin loads on sm_90 only). Clustering by the device's capability alone would launch it there.
template <typename Kernel>
bool compiled_for_clusters(Kernel kernel) {
  cudaFuncAttributes attr = {};
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return attr.ptxVersion >= 90;
}

// Whether a cluster of `splits` blocks of the on-chip kernel fits on the device at all.
template <typename Kernel>
bool cluster_fits(Kernel kernel, int64_t tiles, int threads, size_t smem, int splits, int device, const char* op) {
  allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem, device, op);
  cudaLaunchAttribute attr[1];
  cudaLaunchConfig_t cfg = cluster_config(attr, tiles * splits, threads, smem, splits, nullptr);
  int clusters = 0;
  const cudaError_t err = cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return clusters > 0;
}

NormPlan unsupported(NormPlan plan, const std::string& reason) {
  plan.supported = false;
  plan.reason = reason;
  return plan;
}

}  // namespace

NormPlan norm_plan(const NormProblem& p, bool backward, int device) {
  const char* op = backward ? "norm_bwd" : "norm_fwd";
  NormPlan plan{};
  plan.supported = true;
  require(p.n > 0 && p.c > 0 && p.s > 0 && p.groups > 0 && p.c % p.groups == 0, op,
          "need positive N, C, S, groups with groups dividing C");
  require(p.dtype == kFloat32 || p.dtype == kFloat16 || p.dtype == kBFloat16, op,
          "dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got " + std::to_string(p.dtype));
  if (p.c * p.s > INT32_MAX) return unsupported(plan, "one sample holds 2**31 elements or more");
  // cudaFuncSetAttribute, cudaFuncGetAttributes and the cluster occupancy query below act on the current
  // device: called from Python (dxr._C.norm_plan) it need not be `device`, whose opt-in would then be
  // recorded as done and its launch refused for its shared memory
  DeviceGuard guard(device, op);
  const DeviceInfo dev = device_info(device, op);
  const int size = dtype_size(p.dtype);
  const int64_t cpg = p.c / p.groups;
  const int ntensors = backward ? 2 : 1;
  int vec = p.aligned ? 16 / size : 1;
  int64_t gt = 0, tpr = 1;
  int threads = kMaxThreads;
  if (!p.channels_last) {
    if (p.s % vec) vec = 1;
    tpr = std::min<int64_t>(32, pow2_at_least(ceil_div(p.s, vec)));
    // groups per tile: enough channel rows for the block's threads, while ≥ 2 tiles per SM remain
    gt = 1;
    for (int64_t d = 2; d <= p.groups; ++d) {
      if (p.groups % d) continue;
      if (cpg * d * tpr > kMaxThreads || p.n * (p.groups / d) < 2 * dev.sms) break;
      gt = d;
    }
    threads = static_cast<int>(std::min<int64_t>(kMaxThreads, ceil_div(cpg * gt * tpr, 32) * 32));
  } else {
    // whole groups spanning at least one cache line, a multiple of the vector width
    for (int pass = 0; pass < 2 && gt == 0; ++pass) {
      if (pass == 1) vec = 1;
      for (int64_t d = 1; d <= p.groups; ++d) {
        if (p.groups % d || (cpg * d) % vec) continue;
        if (cpg * d * size >= kMinRowBytes || d == p.groups) {
          gt = d;
          break;
        }
      }
    }
    tpr = cpg * gt / vec;
    if (tpr > kMaxThreads) return unsupported(plan, "channels_last with more channels per group than one block spans");
  }
  const int64_t width = cpg * gt;
  if (width > kMaxWidth) return unsupported(plan, "more than 2048 channels per group");
  const int64_t nrg = threads / tpr;
  plan.vec = vec;
  plan.threads = threads;
  plan.tpr = static_cast<int>(tpr);
  plan.width = width;
  plan.tiles = p.n * (p.c / width);

  auto chunk_for = [&](int64_t splits) {
    const int64_t chunk = ceil_div(p.s, splits);
    return p.channels_last ? chunk : ceil_div(chunk, vec) * vec;
  };
  auto slots = [&](int64_t chunk, int* rows, int* cols) {
    if (p.channels_last) {
      *rows = static_cast<int>(ceil_div(chunk, nrg));
      *cols = 1;
    } else {
      *rows = static_cast<int>(ceil_div(width, nrg));
      *cols = static_cast<int>(ceil_div(ceil_div(chunk, vec), tpr));
    }
  };
  const size_t fixed = smem_fixed_bytes(width, threads, vec, gt);
  auto onchip_bytes = [&](int64_t chunk) {
    int rows, cols;
    slots(chunk, &rows, &cols);
    return fixed + static_cast<size_t>(rows) * cols * threads * vec * size * ntensors;
  };
  // blocks of fewer positions than one pass of the threads would idle
  const int64_t useful = std::max<int64_t>(1, ceil_div(p.s, p.channels_last ? nrg : tpr * vec));
  const int64_t wanted = std::min(useful, std::max<int64_t>(1, ceil_div(2 * dev.sms, plan.tiles)));
  const size_t limit = static_cast<size_t>(dev.smem_optin);

  int64_t splits = 0;
  bool cluster = false;
  bool clusters = dev.clusters;
  if (clusters) {
    dispatch_variant(p.dtype, vec, p.channels_last, op, [&](auto v) {
      using V = decltype(v);
      clusters = backward ? compiled_for_clusters(norm_bwd_onchip<typename V::T, V::vec, V::cl>)
                          : compiled_for_clusters(norm_fwd_onchip<typename V::T, V::vec, V::cl>);
    });
  }
  if (clusters) {
    for (int64_t k = std::min<int64_t>(wanted, kMaxCluster); k <= kMaxCluster && k <= p.s; ++k) {
      if (onchip_bytes(chunk_for(k)) > limit) continue;
      const int64_t chunk = chunk_for(k), used = ceil_div(p.s, chunk);
      bool fits = used == 1;
      if (!fits) {
        dispatch_variant(p.dtype, vec, p.channels_last, op, [&](auto v) {
          using V = decltype(v);
          const size_t bytes = onchip_bytes(chunk);
          fits = backward ? cluster_fits(norm_bwd_onchip<typename V::T, V::vec, V::cl>, plan.tiles, threads, bytes,
                                         static_cast<int>(used), device, op)
                          : cluster_fits(norm_fwd_onchip<typename V::T, V::vec, V::cl>, plan.tiles, threads, bytes,
                                         static_cast<int>(used), device, op);
        });
      }
      if (fits) {
        splits = used;
        cluster = used > 1;
        break;
      }
    }
  } else if (plan.tiles >= dev.sms && onchip_bytes(p.s) <= limit) {
    splits = 1;
  }
  if (splits > 0) {
    plan.onchip = true;
    plan.cluster = cluster;
    plan.chunk = chunk_for(splits);
    plan.smem = onchip_bytes(plan.chunk);
  } else {
    const int64_t k = std::min(useful, std::max<int64_t>(1, ceil_div(4 * dev.sms, plan.tiles)));
    plan.chunk = chunk_for(k);
    splits = ceil_div(p.s, plan.chunk);
    plan.smem = fixed;
    plan.partial_floats = plan.tiles * splits * gt * 2;
  }
  plan.splits = splits;
  int rows, cols;
  slots(plan.chunk, &rows, &cols);
  plan.rows_per_thread = rows;
  plan.cols_per_thread = cols;
  if (plan.tiles * plan.splits > INT32_MAX) return unsupported(plan, "more blocks than one grid holds");
  if (plan.smem > limit) return unsupported(plan, "the per-channel tables exceed shared memory");
  return plan;
}

namespace {

NormArgs make_args(const NormProblem& p, const NormPlan& plan) {
  NormArgs a = {};
  a.C = static_cast<int>(p.c);
  a.S = static_cast<int>(p.s);
  a.G = static_cast<int>(p.groups);
  a.CPG = static_cast<int>(p.c / p.groups);
  a.W = static_cast<int>(plan.width);
  a.GT = static_cast<int>(plan.width / a.CPG);
  a.tiles_per_sample = static_cast<int>(p.c / plan.width);
  a.splits = static_cast<int>(plan.splits);
  a.chunk = static_cast<int>(plan.chunk);
  a.tpr = plan.tpr;
  a.nrg = plan.threads / plan.tpr;
  a.rows_per_thread = plan.rows_per_thread;
  a.cols_per_thread = plan.cols_per_thread;
  a.per_sample_affine = p.per_sample_affine;
  return a;
}

template <typename Kernel>
void launch(Kernel kernel, const NormArgs& a, const NormPlan& plan, bool as_cluster, int device, cudaStream_t stream,
            const char* op) {
  allow_dynamic_smem(reinterpret_cast<const void*>(kernel), plan.smem, device, op);
  const int64_t grid = plan.tiles * plan.splits;
  if (as_cluster) {
    cudaLaunchAttribute attr[1];
    cudaLaunchConfig_t cfg =
        cluster_config(attr, grid, plan.threads, plan.smem, static_cast<int>(plan.splits), stream);
    check_cuda(cudaLaunchKernelEx(&cfg, kernel, a), op, "cudaLaunchKernelEx (cluster)");
  } else {
    kernel<<<static_cast<unsigned>(grid), plan.threads, plan.smem, stream>>>(a);
  }
  check_launch(op);
}

}  // namespace

void norm_fwd(const NormProblem& p, uintptr_t x, uintptr_t y, uintptr_t weight, uintptr_t bias, uintptr_t mean,
              uintptr_t rstd, uintptr_t partial, float eps, bool silu, int device, uintptr_t stream) {
  const char* op = "norm_fwd";
  DeviceGuard guard(device, op);
  const NormPlan plan = norm_plan(p, false, device);
  require(plan.supported, op, plan.reason);
  require(plan.onchip || partial != 0, op, "the split path needs a partial workspace");
  NormArgs a = make_args(p, plan);
  a.x = reinterpret_cast<const void*>(x);
  a.y = reinterpret_cast<void*>(y);
  a.w = reinterpret_cast<const float*>(weight);
  a.b = reinterpret_cast<const float*>(bias);
  a.mean = reinterpret_cast<float*>(mean);
  a.rstd = reinterpret_cast<float*>(rstd);
  a.partial = reinterpret_cast<float*>(partial);
  a.eps = eps;
  a.silu = silu;
  dispatch_variant(p.dtype, plan.vec, p.channels_last, op, [&](auto v) {
    using V = decltype(v);
    using T = typename V::T;
    if (plan.onchip) {
      launch(norm_fwd_onchip<T, V::vec, V::cl>, a, plan, plan.cluster, device, as_stream(stream), op);
    } else {
      launch(norm_fwd_partial<T, V::vec, V::cl>, a, plan, false, device, as_stream(stream), op);
      launch(norm_fwd_apply<T, V::vec, V::cl>, a, plan, false, device, as_stream(stream), op);
    }
  });
}

void norm_bwd(const NormProblem& p, uintptr_t dy, uintptr_t x, uintptr_t dx, uintptr_t weight, uintptr_t bias,
              uintptr_t mean, uintptr_t rstd, uintptr_t dw_rows, uintptr_t db_rows, uintptr_t partial, bool silu,
              int device, uintptr_t stream) {
  const char* op = "norm_bwd";
  DeviceGuard guard(device, op);
  const NormPlan plan = norm_plan(p, true, device);
  require(plan.supported, op, plan.reason);
  require(plan.onchip || partial != 0, op, "the split path needs a partial workspace");
  NormArgs a = make_args(p, plan);
  a.x = reinterpret_cast<const void*>(x);
  a.dy = reinterpret_cast<const void*>(dy);
  a.dx = reinterpret_cast<void*>(dx);
  a.w = reinterpret_cast<const float*>(weight);
  a.b = reinterpret_cast<const float*>(bias);
  a.mean = reinterpret_cast<float*>(mean);
  a.rstd = reinterpret_cast<float*>(rstd);
  a.dw_rows = reinterpret_cast<float*>(dw_rows);
  a.db_rows = reinterpret_cast<float*>(db_rows);
  a.partial = reinterpret_cast<float*>(partial);
  a.silu = silu;
  dispatch_variant(p.dtype, plan.vec, p.channels_last, op, [&](auto v) {
    using V = decltype(v);
    using T = typename V::T;
    if (plan.onchip) {
      launch(norm_bwd_onchip<T, V::vec, V::cl>, a, plan, plan.cluster, device, as_stream(stream), op);
    } else {
      launch(norm_bwd_partial<T, V::vec, V::cl>, a, plan, false, device, as_stream(stream), op);
      launch(norm_bwd_apply<T, V::vec, V::cl>, a, plan, false, device, as_stream(stream), op);
    }
  });
}

}  // namespace dxr
