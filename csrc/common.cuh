// What the kernels of dxr._C share: dtype dispatch, 16-byte vector loads, warp/block reductions,
// cp.async copies into shared memory, and the error checks that turn CUDA errors into exceptions.
//
// Every launch function takes raw device pointers, sizes, strides and a stream; nothing here links
// PyTorch. Errors are thrown as std::runtime_error (RuntimeError in Python) naming the op, the CUDA
// error and its code; bad arguments as std::invalid_argument (ValueError).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "launch.h"

namespace dxr {

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with T the C++ type of `dtype`.
template <typename F>
void dispatch_float(int dtype, const char* op, F&& f) {
  switch (dtype) {
    case kFloat32: f(TypeTag<float>{}); break;
    case kFloat16: f(TypeTag<__half>{}); break;
    case kBFloat16: f(TypeTag<__nv_bfloat16>{}); break;
    default: require(false, op, "dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                                    std::to_string(dtype));
  }
}

// Calls f(TypeTag<T>{}) for the two half types only (the tensor-core kernels).
template <typename F>
void dispatch_half(int dtype, const char* op, F&& f) {
  switch (dtype) {
    case kFloat16: f(TypeTag<__half>{}); break;
    case kBFloat16: f(TypeTag<__nv_bfloat16>{}); break;
    default: require(false, op, "dtype code must be 1 (float16) or 2 (bfloat16), got " + std::to_string(dtype));
  }
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// ---------------------------------------------------------------------------------------------
// vector loads and stores: VEC consecutive elements in one access (16 bytes at the widest)

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// elements of T in one 16-byte access
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[VEC]) {
  const Vec<T, VEC> r = *reinterpret_cast<const Vec<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_float(r.v[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[VEC]) {
  Vec<T, VEC> r;
#pragma unroll
  for (int i = 0; i < VEC; ++i) r.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Vec<T, VEC>*>(p) = r;
}

// global -> shared without staging in registers (cp.async, sm_80+); 2-byte copies use plain accesses
template <typename T, int VEC>
__device__ __forceinline__ void copy_to_shared(T* dst, const T* src) {
  constexpr int bytes = static_cast<int>(sizeof(T)) * VEC;
  if constexpr (bytes == 16 || bytes == 8 || bytes == 4) {
    const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
    if constexpr (bytes == 16) {
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
    } else {
      asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(d), "l"(src), "n"(bytes));
    }
  } else {
    *reinterpret_cast<Vec<T, VEC>*>(dst) = *reinterpret_cast<const Vec<T, VEC>*>(src);
  }
}

// 16 bytes global -> shared, or 16 zero bytes when !valid (src is then not read)
__device__ __forceinline__ void copy16_or_zero(void* dst, const void* src, bool valid) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(src_bytes));
}

// copies issued since the last commit form a group; wait_group<N> waits until at most N groups are pending
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
}

// ---------------------------------------------------------------------------------------------
// reductions (fixed order: the same input gives bitwise the same sum)

constexpr unsigned kFullMask = 0xffffffffu;

// sum over aligned groups of `width` lanes (a power of two ≤ 32); every lane of the warp must call it
__device__ __forceinline__ float segment_sum(float v, int width) {
  for (int offset = width >> 1; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__device__ __forceinline__ float warp_sum(float v) { return segment_sum(v, 32); }

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// sum over the block, returned to every thread; `scratch` holds one float per warp (32 at most)
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < warps; ++w) total += scratch[w];
  return total;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace dxr
