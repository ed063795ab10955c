// Just enough of CUDA for the kernels of cc_kernels.cuh to compile and run as host C++:
// the qualifiers, the built-in thread coordinates and a sequential launch. Used by
// emulation/cc_emulation.cpp to test those kernels on a machine without a GPU.
//
// The kernels are grid-stride loops with no shared memory, no __syncthreads and no atomics,
// and every output has one owner thread, so running the threads one after another computes
// what the GPU computes. A kernel that came to rely on any of these would need more here.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#error "cuda_emulation.h is for host compilers only; nvcc has the real CUDA"
#endif

#include <cstdint>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
// __restrict__ is a g++/clang keyword already; `#pragma unroll` is ignored (-Wno-unknown-pragmas).

// blockIdx, threadIdx (uint3) and blockDim, gridDim (dim3) of CUDA: unsigned x, y, z.
struct cc_dim3 {
  unsigned int x = 1, y = 1, z = 1;
};

// The coordinates of the thread being run; thread_local so concurrent host calls stay apart.
inline thread_local cc_dim3 blockIdx, threadIdx, blockDim, gridDim;

namespace ccnet_ops {
namespace emulation {

// kernel<<<blocks, threads>>>(args...): every thread of the 1-D grid, one after another.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), unsigned int blocks, unsigned int threads, Args... args) {
  gridDim = {blocks, 1, 1};
  blockDim = {threads, 1, 1};
  for (unsigned int b = 0; b < blocks; ++b) {
    for (unsigned int t = 0; t < threads; ++t) {
      blockIdx = {b, 0, 0};
      threadIdx = {t, 0, 0};
      kernel(args...);
    }
  }
}

}  // namespace emulation
}  // namespace ccnet_ops
