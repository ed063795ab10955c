// The CUDA kernels of ../cc_kernels.cuh compiled as host C++ and run one thread at a time over
// their real launch configuration (kThreads per block, num_blocks), registered as CPU ops of
// torch.ops.ccnet_ops_emu with the grid cap as an argument. Built by ops/emulation.py for the
// tests; never part of the real op library (ops/extension.py compiles ops/csrc/*.cpp only).
//
//   cc_energy(query, key, max_blocks)            like ccnet_ops::cc_energy
//   cc_aggregate(attention, value, max_blocks)   like ccnet_ops::cc_aggregate
//   cc_scatter(attention, feature, max_blocks)   like ccnet_ops::cc_scatter
//   cc_launch_config(op, N, C, H, W, max_blocks) [items, blocks, threads] that op launches
// A small max_blocks makes every thread run its grid-stride loop many times.
#include <torch/library.h>

#include <string>
#include <vector>

#include "../cuda_emulation.h"

#define CC_DEVICE_GUARD(device) (void)(device)  // one host "device"
#define CC_LAUNCH(kernel, blocks, threads, ...) \
  ::ccnet_ops::emulation::launch(kernel, (blocks), (threads), __VA_ARGS__)

#include "../cc_kernels.cuh"

namespace ccnet_ops {
namespace {

// A CUDA grid has at most 2^31 - 1 blocks along x.
void check_max_blocks(int64_t max_blocks, const char* op) {
  TORCH_CHECK_VALUE(max_blocks >= 1 && max_blocks <= INT32_MAX, op,
                    ": max_blocks must be in [1, 2^31 - 1], got ", max_blocks);
}

at::Tensor energy_emu(const at::Tensor& query, const at::Tensor& key, int64_t max_blocks) {
  check_max_blocks(max_blocks, "cc_energy");
  return launch_energy(query, key, max_blocks);
}

at::Tensor aggregate_emu(const at::Tensor& attn, const at::Tensor& value, int64_t max_blocks) {
  check_max_blocks(max_blocks, "cc_aggregate");
  return launch_aggregate(attn, value, max_blocks);
}

at::Tensor scatter_emu(const at::Tensor& attn, const at::Tensor& feature, int64_t max_blocks) {
  check_max_blocks(max_blocks, "cc_scatter");
  return launch_scatter(attn, feature, max_blocks);
}

// What op launches for a feature map (N, C, H, W) (query for cc_energy, value/feature else).
std::vector<int64_t> launch_config(const std::string& op, int64_t N, int64_t C, int64_t H, int64_t W,
                                   int64_t max_blocks) {
  check_max_blocks(max_blocks, "cc_launch_config");
  TORCH_CHECK_VALUE(op == "cc_energy" || op == "cc_aggregate" || op == "cc_scatter",
                    "cc_launch_config: unknown op '", op, "'");
  const int64_t items = op == "cc_energy" ? energy_items(N, H, W) : mix_items(N, C, H, W);
  return {items, num_blocks(items, max_blocks), kThreads};
}

}  // namespace

TORCH_LIBRARY(ccnet_ops_emu, m) {
  m.def("cc_energy(Tensor query, Tensor key, int max_blocks) -> Tensor");
  m.def("cc_aggregate(Tensor attention, Tensor value, int max_blocks) -> Tensor");
  m.def("cc_scatter(Tensor attention, Tensor feature, int max_blocks) -> Tensor");
  m.def("cc_launch_config(str op, int N, int C, int H, int W, int max_blocks) -> int[]",
        &launch_config);
}

TORCH_LIBRARY_IMPL(ccnet_ops_emu, CPU, m) {
  m.impl("cc_energy", &energy_emu);
  m.impl("cc_aggregate", &aggregate_emu);
  m.impl("cc_scatter", &scatter_emu);
}

}  // namespace ccnet_ops
