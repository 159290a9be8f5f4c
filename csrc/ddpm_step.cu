// Noise-schedule kernels: forward diffusion (q_sample), one DDPM step and one DDIM step, one launch each.
//
// Every tensor is N runs of S elements (sample n from element n·S). A block covers kBlockElements of one
// sample: it reads t (and t_prev) for that sample on the device, forms the per-sample coefficients once,
// then each thread streams groups of four consecutive elements in float32 and writes x's dtype. No value
// goes back to the host, so a sampling loop of these launches can be captured in a CUDA graph.
//
// Coefficients are formed in the schedule's precision (double for a float64 schedule, else float with
// IEEE division and square root) and rounded to float32 once, as dxr.kernels.triton.ddpm_step does.
//
// In-kernel noise (no noise tensor): Philox4x32-10 keyed by the 64-bit seed, counter (lo, hi, 0, 0) =
// n·⌈S/4⌉ + ⌊i/4⌋ for element i of sample n, its four 32-bit outputs turned into four normals by
// Box–Muller (pairs (0, 1) and (2, 3): r = √(-2 ln max(u₀, 1e-7)), r·cos 2πu₁, r·sin 2πu₁, u = the
// word as int32 folded to [0, 2³¹) times 2⁻³¹): the stream of the Triton kernels, a function of the
// seed, S and the element's position only, so the same seed gives bitwise the same result. The sine and
// cosine are the hardware's (__sincosf, absolute error below 1e-6 on [-π, π]).
//
// Seed in device memory (seed_state set): the kernel reads the key from seed_state[0] and an offset from
// seed_state[1] into the upper counter words, (lo, hi, offset lo, offset hi); offset 0 is the int seed's
// stream bit for bit. Nothing comes from the host, so a CUDA graph advancing the offset draws fresh noise.
#include "common.cuh"

namespace dxr {
namespace {

constexpr int kThreads = 256;
constexpr int kGroupsPerThread = 4;  // groups of four elements per thread
constexpr int kBlockElements = kThreads * 4 * kGroupsPerThread;

struct StepKernelArgs {
  void* out;
  const void* x;       // x_t, or x0 for q_sample
  const void* model;   // model output (eps or v)
  const void* noise;   // z of the step, or x0's noise for q_sample; unused when drawn
  const int64_t* t;
  const int64_t* t_prev;
  int64_t t_stride, t_prev_stride;
  const void* schedule;
  int64_t schedule_stride;
  int64_t num_steps;
  int64_t S;
  int64_t chunks;      // blocks per sample
  bool pred_v, clip, large_var, add_noise;
  float clip_value, eta;
  uint64_t seed;
  const int64_t* seed_state;  // null, or (key, offset) on the device, read in place of seed
};

// per-sample coefficients, float32 (see the step kernels for their meaning)
struct Coef {
  float sqrt_ab, sqrt_1m_ab, inv_sqrt_ab, inv_sqrt_1m_ab, c_x0, c_xt, c_eps, sigma;
};

__device__ __forceinline__ int64_t clamp_step(int64_t t, int64_t steps) { return t < 0 ? 0 : (t >= steps ? steps - 1 : t); }

template <typename A>
__device__ __forceinline__ A alpha_bar(const StepKernelArgs& a, int64_t t) {
  return static_cast<const A*>(a.schedule)[clamp_step(t, a.num_steps) * a.schedule_stride];
}

template <int KIND, typename A>
__device__ Coef coefficients(const StepKernelArgs& a, int64_t n) {
  Coef c = {};
  const int64_t t = a.t[n * a.t_stride];
  const A one = 1;
  const A ab = alpha_bar<A>(a, t);
  const A sqrt_ab = sqrt(ab), sqrt_1m_ab = sqrt(one - ab);
  c.sqrt_ab = static_cast<float>(sqrt_ab);
  c.sqrt_1m_ab = static_cast<float>(sqrt_1m_ab);
  c.inv_sqrt_ab = static_cast<float>(one / sqrt_ab);
  c.inv_sqrt_1m_ab = static_cast<float>(one / sqrt_1m_ab);
  if constexpr (KIND == kDdpm) {
    const A ab_prev = t > 0 ? alpha_bar<A>(a, t - 1) : one;
    const A beta = one - ab / ab_prev;
    c.c_x0 = static_cast<float>(beta * sqrt(ab_prev) / (one - ab));
    c.c_xt = static_cast<float>((one - ab_prev) * sqrt(one - beta) / (one - ab));
    const A var = a.large_var ? beta : beta * (one - ab_prev) / (one - ab);
    c.sigma = t > 0 ? static_cast<float>(sqrt(var)) : 0.f;
  } else if constexpr (KIND == kDdim) {
    const int64_t t_prev = a.t_prev[n * a.t_prev_stride];
    const A ab_prev = t_prev >= 0 ? alpha_bar<A>(a, t_prev) : one;
    const A ratio = (one - ab_prev) / (one - ab) * (one - ab / ab_prev);
    const A sigma = static_cast<A>(a.eta) * sqrt(ratio > 0 ? ratio : A(0));
    const A rest = one - ab_prev - sigma * sigma;
    c.sigma = static_cast<float>(sigma);
    c.c_eps = static_cast<float>(sqrt(rest > 0 ? rest : A(0)));
    c.c_x0 = static_cast<float>(sqrt(ab_prev));
  }
  return c;
}

// Philox4x32-10 (Salmon et al., SC'11)
__device__ __forceinline__ uint4 philox(uint4 ctr, uint2 key) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = __umulhi(0xD2511F53u, ctr.x), lo0 = 0xD2511F53u * ctr.x;
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, ctr.z), lo1 = 0xCD9E8D57u * ctr.z;
    ctr = make_uint4(hi1 ^ ctr.y ^ key.x, lo1, hi0 ^ ctr.w ^ key.y, lo0);
    key.x += 0x9E3779B9u;
    key.y += 0xBB67AE85u;
  }
  return ctr;
}

// a 32-bit word to [0, 1): as int32, negatives folded by ~v (= -v - 1), times 2⁻³¹
__device__ __forceinline__ float uniform(uint32_t bits) {
  int32_t v = static_cast<int32_t>(bits);
  v = v < 0 ? ~v : v;
  return static_cast<float>(v) * 4.6566127342e-10f;
}

__device__ __forceinline__ void box_muller(uint32_t b0, uint32_t b1, float& z0, float& z1) {
  const float r = sqrtf(-2.f * logf(fmaxf(uniform(b0), 1.0e-7f)));
  // 2πu = π + 2π(u - ½): the hardware sine is accurate on [-π, π]
  float s, c;
  __sincosf(6.283185307179586f * (uniform(b1) - 0.5f), &s, &c);
  z0 = -r * c;
  z1 = -r * s;
}

// the four normals of counter (counter, offset)
__device__ __forceinline__ void gaussian4(uint64_t seed, uint64_t offset, uint64_t counter, float (&z)[4]) {
  const uint4 bits = philox(make_uint4(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32),
                                       static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)),
                            make_uint2(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)));
  box_muller(bits.x, bits.y, z[0], z[1]);
  box_muller(bits.z, bits.w, z[2], z[3]);
}

// four consecutive elements from `p`: one vector access when WIDE, else masked scalars (lanes ≥ valid are 0)
template <typename T, bool WIDE>
__device__ __forceinline__ void load4(const void* base, int64_t at, int valid, float (&v)[4]) {
  const T* p = static_cast<const T*>(base) + at;
  if constexpr (WIDE) {
    load_vec<T, 4>(p, v);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = i < valid ? to_float(p[i]) : 0.f;
  }
}

template <typename T, bool WIDE>
__device__ __forceinline__ void store4(void* base, int64_t at, int valid, const float (&v)[4]) {
  T* p = static_cast<T*>(base) + at;
  if constexpr (WIDE) {
    store_vec<T, 4>(p, v);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (i < valid) p[i] = from_float<T>(v[i]);
  }
}

__device__ __forceinline__ float predict_x0(float x, float m, const Coef& c, bool pred_v) {
  return pred_v ? c.sqrt_ab * x - c.sqrt_1m_ab * m : (x - c.sqrt_1m_ab * m) * c.inv_sqrt_ab;
}

// KIND: StepKind; T: dtype of every tensor; A: the schedule's (float or double); WIDE: S % 4 == 0 and
// aligned pointers; DRAW: the noise is drawn in-kernel
template <int KIND, typename T, typename A, bool WIDE, bool DRAW>
__global__ void __launch_bounds__(kThreads) step_kernel(StepKernelArgs a) {
  __shared__ Coef shared_coef;
  __shared__ uint64_t shared_seed[2];  // Philox key and counter offset of the in-kernel noise
  const int64_t n = blockIdx.x / a.chunks;
  const int64_t start = (blockIdx.x % a.chunks) * kBlockElements;
  if (threadIdx.x == 0) {
    shared_coef = coefficients<KIND, A>(a, n);
    if constexpr (DRAW) {
      shared_seed[0] = a.seed_state ? static_cast<uint64_t>(a.seed_state[0]) : a.seed;
      shared_seed[1] = a.seed_state ? static_cast<uint64_t>(a.seed_state[1]) : 0u;
    }
  }
  __syncthreads();
  const Coef c = shared_coef;
  const int64_t sample = n * a.S;
  const uint64_t counter0 = static_cast<uint64_t>(n) * static_cast<uint64_t>((a.S + 3) / 4);
#pragma unroll
  for (int k = 0; k < kGroupsPerThread; ++k) {
    const int64_t i = start + (static_cast<int64_t>(k) * kThreads + threadIdx.x) * 4;
    if (i >= a.S) break;
    const int valid = a.S - i < 4 ? static_cast<int>(a.S - i) : 4;
    float x[4], out[4];
    load4<T, WIDE>(a.x, sample + i, valid, x);
    if constexpr (KIND == kQSample) {
      float z[4];
      load4<T, WIDE>(a.noise, sample + i, valid, z);
#pragma unroll
      for (int j = 0; j < 4; ++j) out[j] = c.sqrt_ab * x[j] + c.sqrt_1m_ab * z[j];
    } else {
      float m[4], z[4] = {0.f, 0.f, 0.f, 0.f};
      load4<T, WIDE>(a.model, sample + i, valid, m);
      if (a.add_noise) {
        if constexpr (DRAW) gaussian4(shared_seed[0], shared_seed[1], counter0 + static_cast<uint64_t>(i / 4), z);
        else load4<T, WIDE>(a.noise, sample + i, valid, z);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float x0 = predict_x0(x[j], m[j], c, a.pred_v);
        if (a.clip) x0 = fminf(fmaxf(x0, -a.clip_value), a.clip_value);
        if constexpr (KIND == kDdpm) {
          out[j] = c.c_x0 * x0 + c.c_xt * x[j] + c.sigma * z[j];
        } else {
          // with a clamped x0, eps is recomputed from it to keep the step on its trajectory
          const float eps = a.clip ? (x[j] - c.sqrt_ab * x0) * c.inv_sqrt_1m_ab
                                   : (a.pred_v ? c.sqrt_1m_ab * x[j] + c.sqrt_ab * m[j] : m[j]);
          out[j] = c.c_x0 * x0 + c.c_eps * eps + (a.add_noise ? c.sigma * z[j] : 0.f);
        }
      }
    }
    store4<T, WIDE>(a.out, sample + i, valid, out);
  }
}

template <int KIND, typename T, typename A, bool DRAW>
void launch_step(const StepKernelArgs& k, bool wide, int64_t grid, cudaStream_t stream) {
  if (wide) step_kernel<KIND, T, A, true, DRAW><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(k);
  else step_kernel<KIND, T, A, false, DRAW><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(k);
}

template <int KIND, typename T>
void dispatch_step(const StepKernelArgs& k, bool wide, bool schedule64, bool draw, int64_t grid, cudaStream_t stream) {
  if constexpr (KIND == kQSample) {
    if (schedule64) launch_step<KIND, T, double, false>(k, wide, grid, stream);
    else launch_step<KIND, T, float, false>(k, wide, grid, stream);
  } else {
    if (schedule64) {
      if (draw) launch_step<KIND, T, double, true>(k, wide, grid, stream);
      else launch_step<KIND, T, double, false>(k, wide, grid, stream);
    } else {
      if (draw) launch_step<KIND, T, float, true>(k, wide, grid, stream);
      else launch_step<KIND, T, float, false>(k, wide, grid, stream);
    }
  }
}

const char* step_name(int kind) {
  return kind == kQSample ? "q_sample" : kind == kDdpm ? "ddpm_step" : "ddim_step";
}

}  // namespace

void sampler_step(const StepArgs& a, int device, uintptr_t stream) {
  const char* op = step_name(a.kind);
  require(a.kind == kQSample || a.kind == kDdpm || a.kind == kDdim, op, "unknown step kind");
  require(a.n > 0 && a.s > 0, op, "need at least one sample of at least one element");
  require(a.num_steps > 0, op, "the schedule must not be empty");
  require(a.x && a.out && a.t && a.schedule, op, "a required pointer is null");
  require(a.kind == kQSample || a.model, op, "model_out is null");
  require(a.kind != kDdim || a.t_prev, op, "t_prev is null");
  require(a.kind != kQSample || a.noise != 0, op, "q_sample needs a noise tensor");
  require(a.dtype == kFloat32 || a.dtype == kFloat16 || a.dtype == kBFloat16, op,
          "dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got " + std::to_string(a.dtype));
  const int64_t chunks = ceil_div(a.s, kBlockElements);
  const int64_t grid = a.n * chunks;
  require(grid <= INT32_MAX, op, "more blocks than one grid holds");
  DeviceGuard guard(device, op);

  StepKernelArgs k = {};
  k.out = reinterpret_cast<void*>(a.out);
  k.x = reinterpret_cast<const void*>(a.x);
  k.model = reinterpret_cast<const void*>(a.model);
  k.noise = reinterpret_cast<const void*>(a.noise);
  k.t = reinterpret_cast<const int64_t*>(a.t);
  k.t_prev = reinterpret_cast<const int64_t*>(a.t_prev);
  k.t_stride = a.t_stride;
  k.t_prev_stride = a.t_prev_stride;
  k.schedule = reinterpret_cast<const void*>(a.schedule);
  k.schedule_stride = a.schedule_stride;
  k.num_steps = a.num_steps;
  k.S = a.s;
  k.chunks = chunks;
  k.pred_v = a.pred_v;
  k.clip = a.clip;
  k.clip_value = a.clip_value;
  k.large_var = a.large_var;
  k.eta = a.eta;
  k.seed = a.seed;
  k.seed_state = reinterpret_cast<const int64_t*>(a.seed_state);
  // DDPM always adds σ·z (σ = 0 at t = 0); DDIM only when η > 0
  k.add_noise = a.kind == kDdpm || (a.kind == kDdim && a.eta != 0.f);
  const bool draw = k.add_noise && a.noise == 0;
  const bool wide = a.aligned && a.s % 4 == 0;
  const cudaStream_t s = as_stream(stream);
  dispatch_float(a.dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (a.kind == kQSample) dispatch_step<kQSample, T>(k, wide, a.schedule64, false, grid, s);
    else if (a.kind == kDdpm) dispatch_step<kDdpm, T>(k, wide, a.schedule64, draw, grid, s);
    else dispatch_step<kDdim, T>(k, wide, a.schedule64, draw, grid, s);
  });
  check_launch(op);
}

}  // namespace dxr
