// The CUDA path of ../cc_kernels.cuh compiled as host C++: its kernels run one thread at a time
// over their real launch configuration (kThreads per block, num_blocks or tile_blocks; the
// threads of a block as fibers where the kernel has barriers), and its GEMM plans run
// with cuBLAS's semantics (column-major operands, op(X), leading dimensions and batch strides,
// accumulating in float32 / float64), registered as CPU ops of torch.ops.ccnet_ops_emu with the
// grid cap as an argument. Built by ops/emulation.py for the tests; never part of the real op
// library (ops/extension.py compiles ops/csrc/*.cpp only).
//
//   cc_energy(query, key, max_blocks)            like ccnet_ops::cc_energy
//   cc_aggregate(attention, value, max_blocks)   like ccnet_ops::cc_aggregate
//   cc_scatter(attention, feature, max_blocks)   like ccnet_ops::cc_scatter
//   cc_attention(query, key, value, max_blocks)  like ccnet_ops::cc_attention (CUDA only there)
//   cc_attention_backward(grad, query, key, value, attention, max_blocks)
//   cc_attention_fused(query, key, value, max_blocks, tensor_cores=True)   like ccnet_ops::cc_attention_fused
//                                                (CUDA only there); tensor_cores False keeps fp16 / bf16
//                                                on the CUDA-core tiles (the path of a build for sm_7x)
//   cc_attention_fused_backward(grad, query, key, value, out, lse, max_blocks, tensor_cores=True)
//   cc_reverse_blocks(x, mode)                   a probe of the emulated barriers (below)
//   cc_wmma_probe(a, b, a_layout, b_layout, offset, ldm, lanes=32)   a probe of the emulated WMMA (below)
//   cc_launch_config(kernel, N, C, H, W, max_blocks) [tiles or items, blocks, threads] of a layout
//                                                kernel ("pack", "unpack", "transpose", "combine",
//                                                "softmax", "line rows", "line columns", "stats rows",
//                                                "stats columns" or "delta")
// A small max_blocks makes every thread run its grid-stride loop many times.
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include <ATen/OpMathType.h>
#include <ATen/ops/zeros.h>

#include "../cc_gemm.h"
#include "../cuda_emulation.h"

#define CC_EMULATED 1  // cc_fused.cuh: fp16 / bf16 may take the CUDA-core tiles too, to compare the paths

#define CC_DEVICE_GUARD(device) (void)(device)  // one host "device"
#define CC_LAUNCH(kernel, blocks, threads, ...) \
  ::ccnet_ops::emulation::launch(kernel, (blocks), (threads), __VA_ARGS__)
#define CC_LAUNCH_BLOCKS(kernel, blocks, threads, ...) \
  ::ccnet_ops::emulation::launch_blocks(kernel, (blocks), (threads), __VA_ARGS__)

namespace ccnet_ops {

// cublasGemmStridedBatchedEx as the plan states it: C[b] = op(A[b]) op(B[b]), column-major
// X(i, j) = X[i + j * ldx], op(X)(i, j) = X(j, i) when transposed; products summed in float32
// (float64 for float64) and rounded once to Out.
template <typename In, typename Out>
void run_gemm(const GemmPlan& p, const In* a, const In* b, Out* c) {
  using acc_t = at::opmath_type<In>;
  for (int64_t batch = 0; batch < p.batch; ++batch) {
    const In* A = a + batch * p.stride_a;
    const In* B = b + batch * p.stride_b;
    Out* C = c + batch * p.stride_c;
    for (int64_t j = 0; j < p.n; ++j) {
      for (int64_t i = 0; i < p.m; ++i) {
        acc_t acc = 0;
        for (int64_t l = 0; l < p.k; ++l) {
          const acc_t x = static_cast<acc_t>(p.trans_a ? A[l + i * p.lda] : A[i + l * p.lda]);
          const acc_t y = static_cast<acc_t>(p.trans_b ? B[j + l * p.ldb] : B[l + j * p.ldb]);
          acc += x * y;
        }
        C[i + j * p.ldc] = static_cast<Out>(acc);
      }
    }
  }
}

// The element type of nvcuda::wmma for a dtype: the emulated fragments take PyTorch's own.
template <typename T>
struct MmaElement {
  using type = T;
};

}  // namespace ccnet_ops

#include "../cc_kernels.cuh"
#include "../cc_fused.cuh"

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

std::tuple<at::Tensor, at::Tensor> attention_emu(const at::Tensor& query, const at::Tensor& key,
                                                 const at::Tensor& value, int64_t max_blocks) {
  check_max_blocks(max_blocks, "cc_attention");
  return launch_attention(query, key, value, max_blocks);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_emu(const at::Tensor& grad, const at::Tensor& query,
                                                                      const at::Tensor& key, const at::Tensor& value,
                                                                      const at::Tensor& attn, int64_t max_blocks) {
  check_max_blocks(max_blocks, "cc_attention_backward");
  return launch_attention_backward(grad, query, key, value, attn, max_blocks);
}

std::tuple<at::Tensor, at::Tensor> attention_fused_emu(const at::Tensor& query, const at::Tensor& key,
                                                       const at::Tensor& value, int64_t max_blocks, bool tensor_cores) {
  check_max_blocks(max_blocks, "cc_attention_fused");
  return launch_fused_attention(query, key, value, max_blocks, tensor_cores);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fused_backward_emu(
    const at::Tensor& grad, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& lse, int64_t max_blocks, bool tensor_cores) {
  check_max_blocks(max_blocks, "cc_attention_fused_backward");
  return launch_fused_attention_backward(grad, query, key, value, out, lse, max_blocks, tensor_cores);
}

// A probe of the emulation itself: each block of kThreads reverses its slice of x through shared
// memory, every thread writing its element before the barrier and reading its mirror's after it.
// mode "blocks": launched as the tiled kernels are; "diverge": the odd threads skip the barrier
// (undefined on a GPU, an error here); "sequential": launched as the kernels without barriers
// are (an error: __syncthreads needs launch_blocks); "halves unsynced": thread t reads element
// t / 2 of the slice with no barrier between the writes and the reads (a race: right only where
// every thread runs after the ones below it).
__global__ void reverse_kernel(const float* x, float* out, bool diverge, bool unsynced) {
  __shared__ float slice[kThreads];
  const int64_t base = int64_t(blockIdx.x) * blockDim.x;
  slice[threadIdx.x] = x[base + threadIdx.x];
  if (unsynced) {
    out[base + threadIdx.x] = slice[threadIdx.x / 2];
    return;
  }
  if (!diverge || threadIdx.x % 2 == 0) __syncthreads();
  out[base + threadIdx.x] = slice[blockDim.x - 1 - threadIdx.x];
}

at::Tensor reverse_blocks(const at::Tensor& x_in, const std::string& mode) {
  TORCH_CHECK_VALUE(mode == "blocks" || mode == "diverge" || mode == "sequential" || mode == "halves unsynced",
                    "cc_reverse_blocks: unknown mode '", mode, "'");
  const at::Tensor x = x_in.contiguous().to(at::kFloat);
  TORCH_CHECK_VALUE(x.numel() > 0 && x.numel() % kThreads == 0, "cc_reverse_blocks: x needs whole blocks of ",
                    kThreads, " elements");
  at::Tensor out = at::empty_like(x);
  const auto blocks = static_cast<unsigned int>(x.numel() / kThreads);
  if (mode == "sequential") {
    CC_LAUNCH(reverse_kernel, blocks, kThreads, x.const_data_ptr<float>(), out.mutable_data_ptr<float>(), false,
              false);
  } else {
    CC_LAUNCH_BLOCKS(reverse_kernel, blocks, kThreads, x.const_data_ptr<float>(), out.mutable_data_ptr<float>(),
                     mode == "diverge", mode == "halves unsynced");
  }
  return out;
}

// A probe of the emulated WMMA: one warp multiplies a (16 x 16) and b (16 x 16), each given as it
// lies in memory (row-major, or column-major: "col"), copied `offset` elements into a 256-bit
// aligned buffer with a leading dimension of `ldm`, and stores the float32 product row-major; only
// the first `lanes` lanes of the warp make the calls (fewer than 32: undefined on a GPU, an error).
template <typename A, typename B>
__global__ void wmma_probe_kernel(const at::BFloat16* a, const at::BFloat16* b, float* out, unsigned ldm,
                                  unsigned lanes) {
  namespace wmma = nvcuda::wmma;
  if (threadIdx.x >= lanes) return;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, at::BFloat16, A> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, at::BFloat16, B> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> sum;
  wmma::fill_fragment(sum, 0.0f);
  wmma::load_matrix_sync(fa, a, ldm);
  wmma::load_matrix_sync(fb, b, ldm);
  wmma::mma_sync(sum, fa, fb, sum);
  wmma::store_matrix_sync(out, sum, 16, wmma::mem_row_major);
}

at::Tensor wmma_probe(const at::Tensor& a_in, const at::Tensor& b_in, const std::string& a_layout,
                      const std::string& b_layout, int64_t offset, int64_t ldm, int64_t lanes) {
  TORCH_CHECK_VALUE(lanes >= 1 && lanes <= 32, "cc_wmma_probe: lanes in [1, 32]");
  TORCH_CHECK_VALUE(a_in.sizes() == b_in.sizes() && a_in.sizes() == at::IntArrayRef({16, 16}),
                    "cc_wmma_probe: a and b must be 16 x 16");
  TORCH_CHECK_VALUE(offset >= 0 && ldm >= 16, "cc_wmma_probe: offset >= 0 and ldm >= 16");
  const auto copy = [&](const at::Tensor& t) {  // 16 rows of ldm elements, 256-bit aligned, from `offset`
    at::Tensor buffer = at::zeros({offset + 16 * ldm + 32}, t.options().dtype(at::kBFloat16));
    const auto base = reinterpret_cast<uintptr_t>(buffer.data_ptr());
    const int64_t align = int64_t((32 - base % 32) % 32) / 2;
    buffer.narrow(0, align + offset, 16 * ldm).view({16, ldm}).narrow(1, 0, 16).copy_(t);
    return std::make_pair(buffer, buffer.const_data_ptr<at::BFloat16>() + align + offset);
  };
  const auto [a_buffer, a] = copy(a_in);
  const auto [b_buffer, b] = copy(b_in);
  at::Tensor out = at::empty({16, 16}, a_in.options().dtype(at::kFloat));
  float* o = out.mutable_data_ptr<float>();
  namespace wmma = nvcuda::wmma;
  const bool a_row = a_layout == "row", b_row = b_layout == "row";
  TORCH_CHECK_VALUE((a_row || a_layout == "col") && (b_row || b_layout == "col"), "cc_wmma_probe: layouts are row or col");
  const auto u = static_cast<unsigned>(ldm), n = static_cast<unsigned>(lanes);
  if (a_row && b_row) CC_LAUNCH_BLOCKS((wmma_probe_kernel<wmma::row_major, wmma::row_major>), 1, 32, a, b, o, u, n);
  if (a_row && !b_row) CC_LAUNCH_BLOCKS((wmma_probe_kernel<wmma::row_major, wmma::col_major>), 1, 32, a, b, o, u, n);
  if (!a_row && b_row) CC_LAUNCH_BLOCKS((wmma_probe_kernel<wmma::col_major, wmma::row_major>), 1, 32, a, b, o, u, n);
  if (!a_row && !b_row) CC_LAUNCH_BLOCKS((wmma_probe_kernel<wmma::col_major, wmma::col_major>), 1, 32, a, b, o, u, n);
  return out;
}

// What a layout kernel launches for a feature map (N, C, H, W): [work, blocks, threads]. The
// tiled kernels take a block per kTile x kTile tile (work = tiles): "pack" (cc_energy,
// cc_attention and its backward; none for a single row), "unpack" (cc_aggregate,
// cc_scatter, cc_attention and its backward) and transpose (of a C-channel map); the others a
// thread per item (work = items): combine (one per output element, in whole tiles of x, y) and
// softmax (one per pixel, cc_attention and its backward); and the fused mode's line passes, a
// block per (image, line, tile of kSpan pixels, chunk of the float32 output channels) (work =
// those items): "line rows" and "line columns"; the forward's statistics passes, a block per
// (image, line, tile of kSpan pixels): "stats rows" and "stats columns"; and the backward's D, a
// block per tile of kSpan pixels (work = tiles): "delta".
std::vector<int64_t> launch_config(const std::string& kernel, int64_t N, int64_t C, int64_t H, int64_t W,
                                   int64_t max_blocks) {
  check_max_blocks(max_blocks, "cc_launch_config");
  if (kernel == "pack" || kernel == "unpack" || kernel == "transpose") {
    const int64_t tiles = kernel == "transpose" ? transpose_tiles(N * C, H, W)
                          : kernel == "pack" && H == 1 ? 0
                                                        : column_tiles(N, H, W);
    return {tiles, tiles ? tile_blocks(tiles, max_blocks) : 0, kThreads};
  }
  if (kernel == "line rows" || kernel == "line columns") {  // the fused mode's passes, float32, C output channels
    const int64_t items = kernel == "line rows" ? line_pass_items<float>(N, H, W, C) : line_pass_items<float>(N, W, H, C);
    return {items, tile_blocks(items, max_blocks), kThreads};
  }
  if (kernel == "stats rows" || kernel == "stats columns") {  // the fused forward's statistics passes
    const int64_t items = kernel == "stats rows" ? stats_pass_items(N, H, W) : stats_pass_items(N, W, H);
    return {items, tile_blocks(items, max_blocks), kThreads};
  }
  if (kernel == "delta") {
    const int64_t tiles = delta_tiles(N, H * W);
    return {tiles, tile_blocks(tiles, max_blocks), kThreads};
  }
  TORCH_CHECK_VALUE(kernel == "combine" || kernel == "softmax", "cc_launch_config: unknown kernel '", kernel, "'");
  const int64_t items = kernel == "softmax" ? N * H * W : combine_items(N, C, H, W);
  return {items, num_blocks(items, max_blocks), kThreads};
}

}  // namespace

TORCH_LIBRARY(ccnet_ops_emu, m) {
  m.def("cc_energy(Tensor query, Tensor key, int max_blocks) -> Tensor");
  m.def("cc_aggregate(Tensor attention, Tensor value, int max_blocks) -> Tensor");
  m.def("cc_scatter(Tensor attention, Tensor feature, int max_blocks) -> Tensor");
  m.def("cc_attention(Tensor query, Tensor key, Tensor value, int max_blocks) -> (Tensor, Tensor)");
  m.def("cc_attention_backward(Tensor grad, Tensor query, Tensor key, Tensor value, Tensor attn, "
        "int max_blocks) -> (Tensor, Tensor, Tensor)");
  m.def("cc_attention_fused(Tensor query, Tensor key, Tensor value, int max_blocks, bool tensor_cores=True) -> "
        "(Tensor, Tensor)");
  m.def("cc_attention_fused_backward(Tensor grad, Tensor query, Tensor key, Tensor value, Tensor out, Tensor lse, "
        "int max_blocks, bool tensor_cores=True) -> (Tensor, Tensor, Tensor)");
  m.def("cc_launch_config(str kernel, int N, int C, int H, int W, int max_blocks) -> int[]",
        &launch_config);
  m.def("cc_reverse_blocks(Tensor x, str mode) -> Tensor", &reverse_blocks);
  m.def("cc_wmma_probe(Tensor a, Tensor b, str a_layout, str b_layout, int offset, int ldm, int lanes=32) -> Tensor",
        &wmma_probe);
}

TORCH_LIBRARY_IMPL(ccnet_ops_emu, CPU, m) {
  m.impl("cc_energy", &energy_emu);
  m.impl("cc_aggregate", &aggregate_emu);
  m.impl("cc_scatter", &scatter_emu);
  m.impl("cc_attention", &attention_emu);
  m.impl("cc_attention_backward", &attention_backward_emu);
  m.impl("cc_attention_fused", &attention_fused_emu);
  m.impl("cc_attention_fused_backward", &attention_fused_backward_emu);
}

}  // namespace ccnet_ops
