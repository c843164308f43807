// Shared helpers of the qjl kernels: element conversions, checks, warp reductions, staging bytes into
// shared memory. Layouts: csrc/README.md.
#pragma once

#include <cstdint>
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/extension.h>

namespace qjl {

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Copy len bytes from global g into shared memory so that the copy's bytes keep g's alignment modulo 16:
// `buf` is 16-byte aligned with room for len + 16 bytes; returns where byte 0 of the copy lies. Bytes before
// the first 16-byte boundary and after the last are copied one by one, the rest as 16-byte vectors, so no
// byte outside [g, g + len) is read. All threads of the block call it; the caller synchronises after.
__device__ __forceinline__ uint8_t* stage_bytes(uint8_t* buf, const uint8_t* g, int len) {
  const int mis = static_cast<int>(reinterpret_cast<uintptr_t>(g) & 15);
  uint8_t* s = buf + mis;
  int head = (16 - mis) & 15;
  if (head > len) head = len;
  const int nvec = (len - head) >> 4;
  const int body_end = head + (nvec << 4);
  for (int i = threadIdx.x; i < head; i += blockDim.x) s[i] = g[i];
  const int4* gv = reinterpret_cast<const int4*>(g + head);
  int4* sv = reinterpret_cast<int4*>(s + head);
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) sv[i] = __ldg(gv + i);
  for (int i = body_end + threadIdx.x; i < len; i += blockDim.x) s[i] = g[i];
  return s;
}

inline int num_sms() {
  static int n = 0;
  if (n == 0) n = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return n;
}

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace qjl

#define QJL_CHECK_CUDA_TENSOR(t, name) \
  TORCH_CHECK((t).is_cuda(), "qjl kernels: ", name, " must be a CUDA tensor")
#define QJL_CHECK_CONTIGUOUS(t, name) \
  TORCH_CHECK((t).is_contiguous(), "qjl kernels: ", name, " must be contiguous")
#define QJL_CHECK_DTYPE(t, dt, name) \
  TORCH_CHECK((t).scalar_type() == (dt), "qjl kernels: ", name, " must be ", #dt, ", got ", (t).scalar_type())
