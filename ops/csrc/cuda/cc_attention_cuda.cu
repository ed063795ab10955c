// Criss-cross attention: the CUDA build of the kernels in cc_kernels.cuh (see ../cc_attention.cpp).
//
// The kernels and their wrappers live in cc_kernels.cuh, which emulation/cc_emulation.cpp also
// compiles as host C++ to test them without a GPU; this file supplies the real launch (on the
// current stream, with the launch error checked) and registers the CUDA implementations.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#define CC_DEVICE_GUARD(device) const c10::cuda::CUDAGuard cc_device_guard(device)
#define CC_LAUNCH(kernel, blocks, threads, ...)                                     \
  do {                                                                              \
    kernel<<<(blocks), (threads), 0, at::cuda::getCurrentCUDAStream()>>>(__VA_ARGS__); \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                 \
  } while (0)

#include "cc_kernels.cuh"

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

}  // namespace

TORCH_LIBRARY_IMPL(ccnet_ops, CUDA, m) {
  m.impl("cc_energy", &energy_cuda);
  m.impl("cc_aggregate", &aggregate_cuda);
  m.impl("cc_scatter", &scatter_cuda);
}

}  // namespace ccnet_ops
