// Just enough of CUDA for the kernels of cc_kernels.cuh to compile and run as host C++:
// the qualifiers, the built-in thread coordinates, shared memory, __syncthreads and two launches.
// Used by emulation/cc_emulation.cpp to test those kernels on a machine without a GPU.
//
// launch runs every thread of the grid one after another: for grid-stride kernels without shared
// memory or barriers, where every output has one owner thread, that computes what the GPU
// computes. launch_blocks runs the threads of a block as fibers (ucontext) on one host thread:
// each runs until it reaches __syncthreads or its end, and a barrier opens once every thread of
// the block waits at it, as on the GPU (the threads run in ascending and descending order by turns,
// from one phase and one block to the next: a thread that reads what another writes in the same
// phase sees it in one of the two orders and not in the other; the barrier is not told apart by
// call site, and other races are left to compute-sanitizer's racecheck). A
// kernel that reaches a barrier in some threads and ends in others (a divergent barrier,
// undefined on the GPU) is an error here, and so is an exception in a thread (rethrown). __shared__ variables
// are static, one instance per kernel for the block being run (thread_local: concurrent host
// calls stay apart); those declared with CC_SHARED are filled with NaN at the start of every
// block, as the GPU leaves shared memory undefined. There are no atomics and no warp-level
// primitives besides the WMMA fragments below.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#error "cuda_emulation.h is for host compilers only; nvcc has the real CUDA"
#endif

#include <c10/util/Exception.h>
#include <ucontext.h>

#include <algorithm>
#include <cstring>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)  // a register budget for nvcc; nothing to the host
#define __shared__ static thread_local
#define CC_SHARED(type, name) \
  static thread_local type name; \
  ::ccnet_ops::emulation::fresh_shared(name)
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

// The threads of the block being run by launch_blocks, as fibers.
struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  bool waiting = false;  // at __syncthreads
  bool done = false;     // returned from the kernel
};

// A WMMA call as a lane made it: which operation, on what memory, with what leading dimension
// and layout (the lanes of a warp must make the same calls).
struct WmmaCall {
  int op;
  const void* pointer;
  unsigned ldm;
  int layout;
  // spelled out: PyTorch 2.11 builds extensions as C++17 (seen on an H100 machine), where a
  // defaulted comparison is not allowed
  bool operator==(const WmmaCall& other) const {
    return op == other.op && pointer == other.pointer && ldm == other.ldm && layout == other.layout;
  }
};

struct Block {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;  // thrown in a fiber, rethrown by the scheduler
  std::vector<const void*> fresh;  // the shared variables filled with NaN for the block being run
  std::vector<std::vector<WmmaCall>> wmma;  // per thread, since the last barrier
};

inline thread_local Block* running_block = nullptr;

constexpr size_t kFiberStack = 64 * 1024;

// A fiber's entry: the kernel for the thread the scheduler set; an exception cannot unwind past
// a fiber, so it is kept for the scheduler to rethrow.
inline void fiber_main() {
  Block* block = running_block;
  try {
    (*block->body)();
  } catch (...) {
    block->error = std::current_exception();
  }
  block->current->done = true;  // uc_link returns to the scheduler
}

// running_block for the scope of a launch, cleared however it ends.
struct RunningBlock {
  explicit RunningBlock(Block* block) { running_block = block; }
  ~RunningBlock() { running_block = nullptr; }
  RunningBlock(const RunningBlock&) = delete;
  RunningBlock& operator=(const RunningBlock&) = delete;
};

// The lanes of each warp made the same WMMA calls since the last check (WMMA is warp-wide on the
// GPU: a call from some lanes only, or with arguments that differ between lanes, is undefined).
inline void check_wmma_calls(Block& block, unsigned int b) {
  const size_t threads = block.wmma.size();
  for (size_t t = 0; t < threads; ++t) {
    const size_t first = t / 32 * 32;
    TORCH_CHECK(block.wmma[t] == block.wmma[first], "emulation: the lanes of warp ", t / 32, " in block ", b,
                " differ in their WMMA calls (lane ", t % 32, ": ", block.wmma[t].size(), " calls, lane 0: ",
                block.wmma[first].size(), "); WMMA needs the whole warp, with the same arguments");
  }
  for (auto& calls : block.wmma) calls.clear();
}

// A variable in shared memory (cc_kernels.cuh's CC_SHARED): static, one per kernel for the block
// being run, its bytes set to 0xff (NaN in every floating dtype) when the block's first thread
// reaches its declaration, so that a read of what no thread of the block wrote shows.
template <typename T>
void fresh_shared(T& variable) {
  Block* block = running_block;
  TORCH_CHECK(block != nullptr, "emulation: shared memory in a kernel run by launch, not launch_blocks");
  if (std::find(block->fresh.begin(), block->fresh.end(), &variable) == block->fresh.end()) {
    block->fresh.push_back(&variable);
    std::memset(static_cast<void*>(&variable), 0xff, sizeof(T));
  }
}

// kernel<<<blocks, threads>>>(args...) for kernels that use shared memory and __syncthreads: the
// threads of each block run as fibers, switched at every barrier; blocks one after another.
template <typename... Params, typename... Args>
void launch_blocks(void (*kernel)(Params...), unsigned int blocks, unsigned int threads, Args... args) {
  gridDim = {blocks, 1, 1};
  blockDim = {threads, 1, 1};
  const std::function<void()> body = [&] { kernel(args...); };
  Block block;
  block.body = &body;
  block.fibers.resize(threads);
  block.wmma.resize(threads);
  for (Fiber& f : block.fibers) f.stack.reset(new char[kFiberStack]);
  TORCH_CHECK(running_block == nullptr, "emulation: launch_blocks inside a running block");
  const RunningBlock scope(&block);
  for (unsigned int b = 0; b < blocks; ++b) {
    blockIdx = {b, 0, 0};
    block.fresh.clear();
    for (Fiber& f : block.fibers) {
      TORCH_INTERNAL_ASSERT(getcontext(&f.context) == 0, "emulation: getcontext failed");
      f.context.uc_stack.ss_sp = f.stack.get();
      f.context.uc_stack.ss_size = kFiberStack;
      f.context.uc_link = &block.scheduler;
      makecontext(&f.context, fiber_main, 0);
      f.waiting = f.done = false;
    }
    for (unsigned int round = 0;; ++round) {  // every live thread runs to its next barrier or its end
      unsigned int waiting = 0, done = 0;
      for (unsigned int i = 0; i < threads; ++i) {
        // thread 0 first in one round, last in the next: two of the GPU's orders within a phase
        const unsigned int t = (b + round) % 2 ? threads - 1 - i : i;
        Fiber& f = block.fibers[t];
        if (!f.done) {
          f.waiting = false;
          block.current = &f;
          threadIdx = {t, 0, 0};
          TORCH_INTERNAL_ASSERT(swapcontext(&block.scheduler, &f.context) == 0, "emulation: swapcontext failed");
          if (block.error) std::rethrow_exception(block.error);
        }
        waiting += f.waiting;
        done += f.done;
      }
      check_wmma_calls(block, b);
      if (done == threads) break;
      TORCH_CHECK(waiting == threads, "emulation: a divergent __syncthreads in block ", b, ": ", waiting, " of ",
                  threads, " threads wait at it, ", done, " have returned");
    }
  }
}

}  // namespace emulation
}  // namespace ccnet_ops

// nvcuda::wmma as the fused kernels use it (fragments of 16 x 16 x 16, loaded and stored through
// memory, never looked into). On the GPU a fragment is spread over the registers of a warp's 32
// threads in an unspecified layout and each operation is warp-wide; here every thread holds the
// whole fragment and does each operation in full, which gives the same results for code that
// calls them from whole warps with the same arguments. That, and WMMA's documented requirements,
// are checked: every lane of a warp makes the same calls between barriers (in launch_blocks), with
// a pointer aligned to 256 bits and a leading dimension of a multiple of 16 bytes. Products are
// summed in float32, in order along k.
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  float x[rows * cols];  // (i, j) at x[i * cols + j]; fp16 / bf16 elements are exact in float32
};

enum WmmaOp { kLoadA, kLoadB, kStore, kFill, kMma };

inline void record(WmmaOp op, const void* pointer = nullptr, unsigned ldm = 0, int layout = 0) {
  using ccnet_ops::emulation::running_block;
  TORCH_CHECK(running_block != nullptr, "emulation: WMMA in a kernel run by launch, not launch_blocks");
  running_block->wmma[threadIdx.x].push_back({int(op), pointer, ldm, layout});
}

template <typename T>
void check_operand(const T* p, unsigned ldm, const char* what) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(p) % 32 == 0, "emulation: wmma::", what, " pointer ",
              static_cast<const void*>(p), " is not 256-bit aligned");
  TORCH_CHECK(ldm * sizeof(T) % 16 == 0, "emulation: wmma::", what, " leading dimension ", ldm,
              " is not a multiple of 16 bytes");
}

// a row-major (i, j) at p[i * ldm + j], a column-major one at p[i + j * ldm]
template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(std::is_same_v<Layout, row_major> || std::is_same_v<Layout, col_major>);
  check_operand(p, ldm, "load_matrix_sync");
  record(std::is_same_v<Use, matrix_a> ? kLoadA : kLoadB, p, ldm, std::is_same_v<Layout, row_major>);
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int i = 0; i < F::rows; ++i)
    for (int j = 0; j < F::cols; ++j)
      f.x[i * F::cols + j] = std::is_same_v<Layout, row_major> ? p[i * ldm + j] : p[i + j * ldm];
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  check_operand(p, ldm, "store_matrix_sync");
  record(kStore, p, ldm, layout);
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) (layout == mem_row_major ? p[i * ldm + j] : p[i + j * ldm]) = f.x[i * N + j];
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const T& value) {
  record(kFill);
  for (float& e : f.x) e = static_cast<float>(value);
}

template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  record(kMma);
  float out[M * N];
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < N; ++j) {
      float sum = c.x[i * N + j];
      for (int k = 0; k < K; ++k) sum += a.x[i * K + k] * b.x[k * N + j];
      out[i * N + j] = sum;
    }
  }
  for (int e = 0; e < M * N; ++e) d.x[e] = out[e];
}

}  // namespace wmma
}  // namespace nvcuda

// The barrier of a block run by launch_blocks: back to the scheduler until every thread waits.
inline void __syncthreads() {
  using ccnet_ops::emulation::running_block;
  TORCH_CHECK(running_block != nullptr, "emulation: __syncthreads in a kernel run by launch, not launch_blocks");
  running_block->current->waiting = true;
  TORCH_INTERNAL_ASSERT(swapcontext(&running_block->current->context, &running_block->scheduler) == 0,
                        "emulation: swapcontext failed");
}
