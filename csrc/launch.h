// The host-side interface of dxr._C: error handling, the device guard, and the launch functions of
// each op (defined in the .cu files, bound to Python in bindings.cpp). Host-only: no device code.
//
// Launch functions take raw device pointers (as uintptr_t), sizes, strides and a stream. They throw
// std::runtime_error (RuntimeError in Python) naming the op, the CUDA error and its code, and
// std::invalid_argument (ValueError) for arguments they cannot run.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace dxr {

// ---------------------------------------------------------------------------------------------
// errors

inline void check_cuda(cudaError_t err, const char* op, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so the next call starts clean
    throw std::runtime_error(std::string("dxr._C.") + op + ": " + what + " failed with " +
                             cudaGetErrorName(err) + " (" + std::to_string(static_cast<int>(err)) +
                             "): " + cudaGetErrorString(err));
  }
}

// after every <<<...>>> or cudaLaunchKernelEx
inline void check_launch(const char* op) { check_cuda(cudaGetLastError(), op, "kernel launch"); }

inline void require(bool ok, const char* op, const std::string& message) {
  if (!ok) throw std::invalid_argument(std::string("dxr._C.") + op + ": " + message);
}

// Makes `device` current for the launches of one call and restores the caller's device after, so the
// extension's runtime never leaves another current device behind for PyTorch's.
class DeviceGuard {
 public:
  DeviceGuard(int device, const char* op) {
    check_cuda(cudaGetDevice(&previous_), op, "cudaGetDevice");
    if (previous_ != device) check_cuda(cudaSetDevice(device), op, "cudaSetDevice");
  }
  ~DeviceGuard() {
    int now = previous_;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

// What the planners need to know about a device, read once per device.
struct DeviceInfo {
  int sms;              // multiprocessors
  int major;            // compute capability
  int minor;
  int smem_optin;       // dynamic shared memory a block may opt into, bytes
  bool clusters;        // thread-block clusters (sm_90+)
};

DeviceInfo device_info(int device, const char* op);

// Opts `kernel` into `bytes` of dynamic shared memory on `device` (remembered per kernel and device).
void allow_dynamic_smem(const void* kernel, size_t bytes, int device, const char* op);

inline cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// ---------------------------------------------------------------------------------------------
// dtypes: codes shared with dxr/kernels/cuda.py

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ---------------------------------------------------------------------------------------------
// GroupNorm (+ SiLU) and AdaIN: one normalisation over (sample, group) rows of an (N, C, S) tensor.
// AdaIN is the case of one channel per group with a per-sample affine (scale, shift of shape (N, C)).

struct NormProblem {
  int64_t n;                 // samples
  int64_t c;                 // channels
  int64_t s;                 // spatial positions per channel
  int64_t groups;            // groups (C for AdaIN)
  bool channels_last;        // element (n, c, s) at n·C·S + s·C + c, else n·C·S + c·S + s
  int dtype;                 // DType of x, y, dy, dx
  bool aligned;              // every tensor pointer is 16-byte aligned
  bool per_sample_affine;    // weight/bias are (N, C) (AdaIN), else (C,)
};

// How a launch covers the problem; the wrapper allocates the workspaces it names.
struct NormPlan {
  bool supported;            // false: a shape these kernels do not take (see `reason`)
  std::string reason;
  bool onchip;               // the tile is kept in shared memory: one read of x (and dy), one write
  bool cluster;              // onchip with `splits` blocks of one thread-block cluster sharing a tile
  int vec;                   // elements per vector access
  int threads;               // threads per block
  int tpr;                   // threads per tile row
  int rows_per_thread;       // row slots per thread
  int cols_per_thread;       // column slots per thread and row
  int64_t width;             // channels per tile (whole groups)
  int64_t tiles;             // tiles (N · C / width)
  int64_t splits;            // blocks per tile, each taking `chunk` positions
  int64_t chunk;             // positions per block
  int64_t partial_floats;    // float32 workspace of the split path
  size_t smem;               // dynamic shared memory per block, bytes
};

NormPlan norm_plan(const NormProblem& p, bool backward, int device);

// y = act((x - mean)·rstd·w + b); writes y and float32 (N, groups) mean, rstd
void norm_fwd(const NormProblem& p, uintptr_t x, uintptr_t y, uintptr_t weight, uintptr_t bias, uintptr_t mean,
              uintptr_t rstd, uintptr_t partial, float eps, bool silu, int device, uintptr_t stream);

// dx, and float32 per-channel partial sums dw_rows = Σ dz·xhat, db_rows = Σ dz of shape (N·splits, C)
// (row n·splits + split), dz the gradient at the pre-activation
void norm_bwd(const NormProblem& p, uintptr_t dy, uintptr_t x, uintptr_t dx, uintptr_t weight, uintptr_t bias,
              uintptr_t mean, uintptr_t rstd, uintptr_t dw_rows, uintptr_t db_rows, uintptr_t partial, bool silu,
              int device, uintptr_t stream);

// ---------------------------------------------------------------------------------------------
// sampler steps: x and every other tensor stored as N runs of S elements (sample n at n·S)

enum StepKind : int { kQSample = 0, kDdpm = 1, kDdim = 2 };

struct StepArgs {
  int kind;                  // StepKind
  int64_t n, s;              // samples, elements per sample
  int dtype;                 // DType of out, x, model_out and noise
  bool aligned;              // every tensor pointer is 16-byte aligned
  uintptr_t out, x, model, noise;  // q_sample: x = x0, model unused; noise 0 = draw in-kernel
  uintptr_t t, t_prev;       // int64 timesteps (t_prev: DDIM, -1 = final step)
  int64_t t_stride, t_prev_stride;
  uintptr_t schedule;        // ᾱ per timestep, float32 or float64
  int64_t schedule_stride;
  bool schedule64;
  int64_t num_steps;         // length of the schedule (timesteps are clamped into it)
  bool pred_v;               // model_out is v (else eps)
  bool clip;                 // clamp x0 to [-clip_value, clip_value]
  float clip_value;
  bool large_var;            // DDPM σ² = β_t (else β̃_t)
  float eta;                 // DDIM η
  uint64_t seed;             // Philox key of the in-kernel noise
  uintptr_t seed_state;      // 0, or int64 (key, offset) on the device, read by the kernel in place of seed
};

void sampler_step(const StepArgs& a, int device, uintptr_t stream);

// ---------------------------------------------------------------------------------------------
// attention forward on tensor cores (float16/bfloat16, head dim ≤ 128, multiple of 8)

struct AttentionArgs {
  uintptr_t q, k, v, o, lse;
  int64_t b, h, lq, lk, d;
  int64_t q_strides[3], k_strides[3], v_strides[3];  // batch, head, position (unit stride along d)
  float scale;
  int dtype;
};

void attention_fwd(const AttentionArgs& a, int device, uintptr_t stream);

// dynamic shared memory per block of attention_fwd for head dim d (bytes)
size_t attention_smem_bytes(int64_t d);

}  // namespace dxr
