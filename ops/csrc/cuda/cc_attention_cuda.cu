// Criss-cross attention: the CUDA build of cc_kernels.cuh (see ../cc_attention.cpp).
//
// The kernels, the GEMM plans and their wrappers live in cc_kernels.cuh and cc_gemm.h, which
// emulation/cc_emulation.cpp also compiles as host C++ to test them without a GPU; this file
// supplies the real launch (on the current stream, with the launch error checked), runs each
// GEMM plan with cublasGemmStridedBatchedEx on PyTorch's cuBLAS handle (its stream, workspace
// and math mode), and registers the CUDA implementations.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#define CC_DEVICE_GUARD(device) const c10::cuda::CUDAGuard cc_device_guard(device)
#define CC_LAUNCH(kernel, blocks, threads, ...)                                     \
  do {                                                                              \
    kernel<<<(blocks), (threads), 0, at::cuda::getCurrentCUDAStream()>>>(__VA_ARGS__); \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                 \
  } while (0)
// kernels with static shared memory and __syncthreads: the same launch on the GPU
#define CC_LAUNCH_BLOCKS(kernel, blocks, threads, ...) CC_LAUNCH(kernel, blocks, threads, __VA_ARGS__)

#include <climits>
#include <type_traits>

#include "cc_gemm.h"

namespace ccnet_ops {

template <typename T>
constexpr cudaDataType_t cuda_data_type() {
  if constexpr (std::is_same_v<T, double>) return CUDA_R_64F;
  else if constexpr (std::is_same_v<T, float>) return CUDA_R_32F;
  else if constexpr (std::is_same_v<T, at::Half>) return CUDA_R_16F;
  else return CUDA_R_16BF;
}

// One strided-batched GEMM on the tensor cores: fp16/bf16 operands with float32 accumulation,
// float32 as FP32 FMA (TF32 when PyTorch allows it), float64 in float64.
template <typename In, typename Out>
void run_gemm(const GemmPlan& p, const In* a, const In* b, Out* c) {
  static_assert(std::is_same_v<Out, In> || std::is_same_v<Out, at::opmath_type<In>>);
  for (int64_t v : {p.m, p.n, p.k, p.lda, p.ldb, p.ldc, p.batch})
    TORCH_CHECK(v <= INT_MAX, "cc_gemm: a dimension of ", v, " is beyond cuBLAS's 32-bit arguments");
  using scale_t = at::opmath_type<In>;
  const scale_t alpha = 1, beta = 0;
  const cublasComputeType_t compute = std::is_same_v<In, double> ? CUBLAS_COMPUTE_64F : CUBLAS_COMPUTE_32F;
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  // reductions (split-K) in the compute type, never in a 16-bit output type; PyTorch's mode after
  cublasMath_t mode;
  TORCH_CUDABLAS_CHECK(cublasGetMathMode(handle, &mode));
  TORCH_CUDABLAS_CHECK(cublasSetMathMode(
      handle, static_cast<cublasMath_t>(mode | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)));
  const cublasStatus_t status = cublasGemmStridedBatchedEx(
      handle, p.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
      p.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, int(p.m), int(p.n), int(p.k), &alpha, a, cuda_data_type<In>(),
      int(p.lda), p.stride_a, b, cuda_data_type<In>(), int(p.ldb), p.stride_b, &beta, c, cuda_data_type<Out>(),
      int(p.ldc), p.stride_c, int(p.batch), compute, CUBLAS_GEMM_DEFAULT);
  TORCH_CUDABLAS_CHECK(cublasSetMathMode(handle, mode));
  TORCH_CUDABLAS_CHECK(status);
}

// The element type of nvcuda::wmma for a dtype (the fused kernels' tensor-core tiles).
template <typename T>
struct MmaElement {
  using type = T;
};
template <>
struct MmaElement<at::Half> {
  using type = __half;
};
template <>
struct MmaElement<at::BFloat16> {
  using type = __nv_bfloat16;
};

}  // namespace ccnet_ops

#include "cc_kernels.cuh"
#include "cc_fused.cuh"

namespace ccnet_ops {
namespace {

at::Tensor energy_cuda(const at::Tensor& query, const at::Tensor& key) {
  return launch_energy(query, key, kMaxBlocks);
}

at::Tensor aggregate_cuda(const at::Tensor& attn, const at::Tensor& value) {
  return launch_aggregate(attn, value, kMaxBlocks);
}

at::Tensor scatter_cuda(const at::Tensor& attn, const at::Tensor& feature) {
  return launch_scatter(attn, feature, kMaxBlocks);
}

std::tuple<at::Tensor, at::Tensor> attention_cuda(const at::Tensor& query, const at::Tensor& key,
                                                  const at::Tensor& value) {
  return launch_attention(query, key, value, kMaxBlocks);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(const at::Tensor& grad,
                                                                       const at::Tensor& query,
                                                                       const at::Tensor& key,
                                                                       const at::Tensor& value,
                                                                       const at::Tensor& attn) {
  return launch_attention_backward(grad, query, key, value, attn, kMaxBlocks);
}

std::tuple<at::Tensor, at::Tensor> attention_fused_cuda(const at::Tensor& query, const at::Tensor& key,
                                                        const at::Tensor& value) {
  return launch_fused_attention(query, key, value, kMaxBlocks);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fused_backward_cuda(
    const at::Tensor& grad, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& lse) {
  return launch_fused_attention_backward(grad, query, key, value, out, lse, kMaxBlocks);
}

}  // namespace

TORCH_LIBRARY_IMPL(ccnet_ops, CUDA, m) {
  m.impl("cc_energy", &energy_cuda);
  m.impl("cc_aggregate", &aggregate_cuda);
  m.impl("cc_scatter", &scatter_cuda);
  m.impl("cc_attention", &attention_cuda);
  m.impl("cc_attention_backward", &attention_backward_cuda);
  m.impl("cc_attention_fused", &attention_fused_cuda);
  m.impl("cc_attention_fused_backward", &attention_fused_backward_cuda);
}

}  // namespace ccnet_ops
