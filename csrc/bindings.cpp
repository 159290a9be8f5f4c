// dxr._C: the CUDA kernels of dxr, bound with pybind11. Every function takes raw device pointers (ints),
// sizes, strides, a device index and a stream handle (torch.cuda.current_stream().cuda_stream); the
// module links the CUDA runtime statically and never PyTorch, so one build serves every torch.
// dxr/kernels/cuda.py wraps these functions with tensors. CUDA errors raise RuntimeError naming the op
// and the error; arguments the kernels cannot take raise ValueError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include "launch.h"

namespace py = pybind11;

namespace dxr {

DeviceInfo device_info(int device, const char* op) {
  static std::mutex lock;
  static std::map<int, DeviceInfo> known;
  std::lock_guard<std::mutex> guard(lock);
  auto found = known.find(device);
  if (found != known.end()) return found->second;
  DeviceInfo info = {};
  int clusters = 0;
  check_cuda(cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, device), op, "cudaDeviceGetAttribute");
  check_cuda(cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, device), op,
             "cudaDeviceGetAttribute");
  check_cuda(cudaDeviceGetAttribute(&info.minor, cudaDevAttrComputeCapabilityMinor, device), op,
             "cudaDeviceGetAttribute");
  check_cuda(cudaDeviceGetAttribute(&info.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), op,
             "cudaDeviceGetAttribute");
  check_cuda(cudaDeviceGetAttribute(&clusters, cudaDevAttrClusterLaunch, device), op, "cudaDeviceGetAttribute");
  info.clusters = clusters != 0 && info.major >= 9;
  known[device] = info;
  return info;
}

void allow_dynamic_smem(const void* kernel, size_t bytes, int device, const char* op) {
  if (bytes <= 48 * 1024) return;
  static std::mutex lock;
  static std::map<std::pair<const void*, int>, size_t> allowed;
  std::lock_guard<std::mutex> guard(lock);
  size_t& done = allowed[{kernel, device}];
  if (done >= bytes) return;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)), op,
             "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  done = bytes;
}

}  // namespace dxr

namespace {

dxr::NormProblem norm_problem(int64_t n, int64_t c, int64_t s, int64_t groups, bool channels_last, int dtype,
                              bool aligned, bool per_sample_affine) {
  return dxr::NormProblem{n, c, s, groups, channels_last, dtype, aligned, per_sample_affine};
}

py::dict plan_dict(const dxr::NormPlan& p) {
  py::dict d;
  d["supported"] = p.supported;
  d["reason"] = p.reason;
  d["onchip"] = p.onchip;
  d["cluster"] = p.cluster;
  d["vec"] = p.vec;
  d["threads"] = p.threads;
  d["width"] = p.width;
  d["tiles"] = p.tiles;
  d["splits"] = p.splits;
  d["chunk"] = p.chunk;
  d["partial_floats"] = p.partial_floats;
  d["smem"] = p.smem;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dxr's CUDA kernels (GroupNorm+SiLU, AdaIN, sampler steps, attention forward) on raw device pointers";
  m.attr("OPS") = py::make_tuple("group_norm_silu", "adain", "attention", "q_sample", "ddpm_step", "ddim_step");
  m.attr("CUDA_VERSION") = CUDART_VERSION;

  m.def(
      "device_count",
      []() {
        int count = 0;
        if (cudaGetDeviceCount(&count) != cudaSuccess) {
          cudaGetLastError();
          return 0;
        }
        return count;
      },
      "CUDA devices the extension's runtime sees (0 without a driver or GPU); never raises");

  m.def("attention_smem", &dxr::attention_smem_bytes, py::arg("head_dim"),
        "dynamic shared memory per block of attention_fwd for a head dim (bytes)");

  m.def(
      "norm_plan",
      [](int64_t n, int64_t c, int64_t s, int64_t groups, bool channels_last, int dtype, bool aligned,
         bool per_sample_affine, bool backward, int device) {
        return plan_dict(
            dxr::norm_plan(norm_problem(n, c, s, groups, channels_last, dtype, aligned, per_sample_affine), backward,
                           device));
      },
      py::arg("n"), py::arg("c"), py::arg("s"), py::arg("groups"), py::arg("channels_last"), py::arg("dtype"),
      py::arg("aligned"), py::arg("per_sample_affine"), py::arg("backward"), py::arg("device"),
      "How norm_fwd / norm_bwd cover an (N, C, S) problem: path, blocks per tile (`splits`, the rows per "
      "sample of the backward's per-channel sums) and the float32 workspace (`partial_floats`)");

  m.def(
      "norm_fwd",
      [](int64_t n, int64_t c, int64_t s, int64_t groups, bool channels_last, int dtype, bool aligned,
         bool per_sample_affine, uintptr_t x, uintptr_t y, uintptr_t weight, uintptr_t bias, uintptr_t mean,
         uintptr_t rstd, uintptr_t partial, float eps, bool silu, int device, uintptr_t stream) {
        dxr::norm_fwd(norm_problem(n, c, s, groups, channels_last, dtype, aligned, per_sample_affine), x, y, weight,
                      bias, mean, rstd, partial, eps, silu, device, stream);
      },
      py::arg("n"), py::arg("c"), py::arg("s"), py::arg("groups"), py::arg("channels_last"), py::arg("dtype"),
      py::arg("aligned"), py::arg("per_sample_affine"), py::arg("x"), py::arg("y"), py::arg("weight"),
      py::arg("bias"), py::arg("mean"), py::arg("rstd"), py::arg("partial"), py::arg("eps"), py::arg("silu"),
      py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());

  m.def(
      "norm_bwd",
      [](int64_t n, int64_t c, int64_t s, int64_t groups, bool channels_last, int dtype, bool aligned,
         bool per_sample_affine, uintptr_t dy, uintptr_t x, uintptr_t dx, uintptr_t weight, uintptr_t bias,
         uintptr_t mean, uintptr_t rstd, uintptr_t dw_rows, uintptr_t db_rows, uintptr_t partial, bool silu,
         int device, uintptr_t stream) {
        dxr::norm_bwd(norm_problem(n, c, s, groups, channels_last, dtype, aligned, per_sample_affine), dy, x, dx,
                      weight, bias, mean, rstd, dw_rows, db_rows, partial, silu, device, stream);
      },
      py::arg("n"), py::arg("c"), py::arg("s"), py::arg("groups"), py::arg("channels_last"), py::arg("dtype"),
      py::arg("aligned"), py::arg("per_sample_affine"), py::arg("dy"), py::arg("x"), py::arg("dx"),
      py::arg("weight"), py::arg("bias"), py::arg("mean"), py::arg("rstd"), py::arg("dw_rows"), py::arg("db_rows"),
      py::arg("partial"), py::arg("silu"), py::arg("device"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "sampler_step",
      [](int kind, int64_t n, int64_t s, int dtype, bool aligned, uintptr_t out, uintptr_t x, uintptr_t model,
         uintptr_t noise, uintptr_t t, int64_t t_stride, uintptr_t t_prev, int64_t t_prev_stride, uintptr_t schedule,
         int64_t schedule_stride, bool schedule64, int64_t num_steps, bool pred_v, bool clip, float clip_value,
         bool large_var, float eta, uint64_t seed, uintptr_t seed_state, int device, uintptr_t stream) {
        dxr::StepArgs a{};
        a.kind = kind;
        a.n = n;
        a.s = s;
        a.dtype = dtype;
        a.aligned = aligned;
        a.out = out;
        a.x = x;
        a.model = model;
        a.noise = noise;
        a.t = t;
        a.t_stride = t_stride;
        a.t_prev = t_prev;
        a.t_prev_stride = t_prev_stride;
        a.schedule = schedule;
        a.schedule_stride = schedule_stride;
        a.schedule64 = schedule64;
        a.num_steps = num_steps;
        a.pred_v = pred_v;
        a.clip = clip;
        a.clip_value = clip_value;
        a.large_var = large_var;
        a.eta = eta;
        a.seed = seed;
        a.seed_state = seed_state;
        dxr::sampler_step(a, device, stream);
      },
      py::arg("kind"), py::arg("n"), py::arg("s"), py::arg("dtype"), py::arg("aligned"), py::arg("out"), py::arg("x"),
      py::arg("model"), py::arg("noise"), py::arg("t"), py::arg("t_stride"), py::arg("t_prev"),
      py::arg("t_prev_stride"), py::arg("schedule"), py::arg("schedule_stride"), py::arg("schedule64"),
      py::arg("num_steps"), py::arg("pred_v"), py::arg("clip"), py::arg("clip_value"), py::arg("large_var"),
      py::arg("eta"), py::arg("seed"), py::arg("seed_state"), py::arg("device"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(),
      "kind: 0 q_sample, 1 ddpm_step, 2 ddim_step; noise 0 draws z in-kernel from seed, or from the int64 "
      "(key, offset) at seed_state when that is not 0");

  m.def(
      "attention_fwd",
      [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t o, uintptr_t lse, int64_t b, int64_t h, int64_t lq,
         int64_t lk, int64_t d, std::tuple<int64_t, int64_t, int64_t> qs, std::tuple<int64_t, int64_t, int64_t> ks,
         std::tuple<int64_t, int64_t, int64_t> vs, float scale, int dtype, int device, uintptr_t stream) {
        dxr::AttentionArgs a{};
        a.q = q;
        a.k = k;
        a.v = v;
        a.o = o;
        a.lse = lse;
        a.b = b;
        a.h = h;
        a.lq = lq;
        a.lk = lk;
        a.d = d;
        a.q_strides[0] = std::get<0>(qs), a.q_strides[1] = std::get<1>(qs), a.q_strides[2] = std::get<2>(qs);
        a.k_strides[0] = std::get<0>(ks), a.k_strides[1] = std::get<1>(ks), a.k_strides[2] = std::get<2>(ks);
        a.v_strides[0] = std::get<0>(vs), a.v_strides[1] = std::get<1>(vs), a.v_strides[2] = std::get<2>(vs);
        a.scale = scale;
        a.dtype = dtype;
        dxr::attention_fwd(a, device, stream);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"), py::arg("lse"), py::arg("b"), py::arg("h"),
      py::arg("lq"), py::arg("lk"), py::arg("d"), py::arg("q_strides"), py::arg("k_strides"), py::arg("v_strides"),
      py::arg("scale"), py::arg("dtype"), py::arg("device"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(),
      "o (B, H, Lq, D) contiguous and float32 lse (B, H, Lq) of float16/bfloat16 q, k, v with unit stride along D; "
      "strides are (batch, head, position)");
}
