// Criss-cross attention: operator schemas and CPU kernels.
//
// Three primitives carry the whole operator and its derivatives of any order. With
// p_s(y, x) the key pixel of slot s of query pixel (y, x) (cc_index.h):
//   cc_energy(a, b)[n, s, y, x]    = sum_c a[n, c, y, x] * b[n, c, p_s(y, x)]
//   cc_aggregate(w, v)[n, c, y, x] = sum_s w[n, s, y, x] * v[n, c, p_s(y, x)]
//   cc_scatter(w, g)[n, c, p]      = sum_{(s, y, x): p_s(y, x) = p} w[n, s, y, x] * g[n, c, y, x]
// The energy of the paper is cc_energy(Q, K), its output cc_aggregate(softmax(E), V); the
// gradients are again primitives (d cc_energy: cc_aggregate and cc_scatter, and so on), so
// the backward is built from registered ops (ops/criss_cross.py).
//
// On the CPU the row slots are BLAS GEMMs, one per image row; the column slots are
// register-tiled kernels whose SIMD lanes run along x, the contiguous dimension, each lane a
// small GEMM of its own over packed operands.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cc_checks.h"
#include "cc_index.h"

namespace ccnet_ops {
namespace {

// A vector of E of Bytes bytes (GCC/Clang vector extension); E is a template parameter because
// GCC drops vector_size from a non-dependent type that a class template declares.
template <typename E, int Bytes>
struct Simd {
  typedef E V __attribute__((vector_size(Bytes)));
};

// A SIMD vector of Bytes bytes (GCC/Clang vector extension); the compiler lowers it to
// AVX-512, AVX, SSE or scalar code depending on the target.
template <typename T, int Bytes>
struct Vec {
  using Scalar = T;
  typedef T V __attribute__((vector_size(Bytes)));
  static constexpr int64_t kLanes = Bytes / sizeof(T);

  static inline V zero() { return V{}; }
  // Loads n <= kLanes elements, zero filling the rest; Full means n == kLanes. The partial
  // forms are masked loads and stores, so a tail never reads or writes past the tensor. A
  // float vector also loads bfloat16 storage (S), widened exactly, and stores to it rounded to
  // nearest even, as c10::BFloat16 rounds.
  template <bool Full, typename S>
  static inline V load(const S* p, int64_t n) {
    if constexpr (!std::is_same_v<S, T>) {
      return widen(load_bits<Full>(p, n));
    } else if constexpr (Full) {
      V v;
      std::memcpy(&v, p, sizeof(V));
      return v;
    } else {
      return load_part(p, n);
    }
  }
  template <bool Full, typename S>
  static inline void store(S* p, V v, int64_t n) {
    if constexpr (!std::is_same_v<S, T>) {
      store_bits<Full>(p, narrow(v), n);
    } else if constexpr (Full) {
      std::memcpy(p, &v, sizeof(V));
    } else {
      store_part(p, v, n);
    }
  }

  // bfloat16 is the upper half of a float32: kLanes of them fill half a vector.
  using Bits = typename Simd<uint16_t, Bytes / 2>::V;
  using Words = typename Simd<uint32_t, Bytes>::V;
  template <bool Full>
  static inline Bits load_bits(const c10::BFloat16* p, int64_t n) {
    static_assert(std::is_same_v<T, float>, "bfloat16 storage widens to float vectors");
    Bits b{};
    std::memcpy(&b, p, (Full ? kLanes : n) * sizeof(uint16_t));
    return b;
  }
  template <bool Full>
  static inline void store_bits(c10::BFloat16* p, Bits b, int64_t n) {
    std::memcpy(p, &b, (Full ? kLanes : n) * sizeof(uint16_t));
  }
  static inline V widen(Bits b) {
    const Words w = __builtin_convertvector(b, Words) << 16;
    V v;
    std::memcpy(&v, &w, sizeof(V));
    return v;
  }
  // c10::BFloat16's rounding: to nearest, ties to even; NaN to the quiet NaN 0x7FC0.
  static inline Bits narrow(V v) {
    Words w;
    std::memcpy(&w, &v, sizeof(V));
    const Words nan = reinterpret_cast<Words>(v != v);
    w = (w + 0x7FFFu + ((w >> 16) & 1u)) >> 16;
    w = (w & ~nan) | (Words{} + 0x7FC0u & nan);
    return __builtin_convertvector(w, Bits);
  }
  static inline V load_part(const T* p, int64_t n) {
#if defined(__AVX512F__)
    if constexpr (Bytes == 64) {
      const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
      if constexpr (sizeof(T) == 4) return (V)_mm512_maskz_loadu_ps(m, p);
      else return (V)_mm512_maskz_loadu_pd(static_cast<__mmask8>(m), p);
    }
#endif
#if defined(__AVX512VL__)
    if constexpr (Bytes == 32) {
      const __mmask8 m = static_cast<__mmask8>((1u << n) - 1u);
      if constexpr (sizeof(T) == 4) return (V)_mm256_maskz_loadu_ps(m, p);
      else return (V)_mm256_maskz_loadu_pd(m, p);
    }
#endif
    V v = zero();
    for (int64_t l = 0; l < n; ++l) v[l] = p[l];
    return v;
  }
  static inline void store_part(T* p, V v, int64_t n) {
#if defined(__AVX512F__)
    if constexpr (Bytes == 64) {
      const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
      if constexpr (sizeof(T) == 4) _mm512_mask_storeu_ps(p, m, (__m512)v);
      else _mm512_mask_storeu_pd(p, static_cast<__mmask8>(m), (__m512d)v);
      return;
    }
#endif
#if defined(__AVX512VL__)
    if constexpr (Bytes == 32) {
      const __mmask8 m = static_cast<__mmask8>((1u << n) - 1u);
      if constexpr (sizeof(T) == 4) _mm256_mask_storeu_ps(p, m, (__m256)v);
      else _mm256_mask_storeu_pd(p, m, (__m256d)v);
      return;
    }
#endif
    for (int64_t l = 0; l < n; ++l) p[l] = v[l];
  }
};

// AVX-512 gives 32 vector registers of 64 bytes, so tiles of 16 float lanes along x and twice
// the register tile; older targets 16 registers of 32 bytes.
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
constexpr int kWide = 2;
#else
constexpr int kVecBytes = 32;
constexpr int kWide = 1;
#endif

template <typename T>
using WideVec = Vec<T, kVecBytes>;  // the vector of a column tile
template <typename T>
using NarrowVec = Vec<T, 32>;       // the vector of a tail tile that half a wide one holds

// Calls f(VT{}, std::bool_constant<Full>{}) with the vector type for a column tile of nx lanes:
// the wide vector for a full tile; for a tail, the narrow one where it holds the tail (a wide
// tile that is mostly padding would do twice the work), else the wide one with masks.
template <typename T, typename F>
inline void dispatch_tile(int64_t nx, const F& f) {
  using Wide = WideVec<T>;
  using Narrow = NarrowVec<T>;
  if (nx == Wide::kLanes) {
    f(Wide{}, std::true_type{});
  } else if (Narrow::kLanes < Wide::kLanes && nx <= Narrow::kLanes) {
    if (nx == Narrow::kLanes) {
      f(Narrow{}, std::true_type{});
    } else {
      f(Narrow{}, std::false_type{});
    }
  } else {
    f(Wide{}, std::false_type{});
  }
}

// Per-thread scratch memory for the packed operands of one work item, kept between calls and
// never zero filled: a fresh buffer per item would cost page faults and a memset as large as the
// pack. Slot tells apart the buffers one thread holds at once. Each vector type (wide, narrow;
// float, double) has its own, which only grows: for the column energy about 3.6 KB per channel
// with AVX-512 (1.9 MB at C = 512), less for the column passes.
template <typename V, int Slot>
V* scratch(int64_t n) {
  thread_local std::unique_ptr<V[]> buffer;
  thread_local int64_t size = 0;
  if (size < n) {
    buffer.reset(new V[n]);
    size = n;
  }
  return buffer.get();
}

// Column passes of cc_aggregate (Scatter = false) and cc_scatter (Scatter = true):
//   out[c, m, x] += sum_{t != m} in[c, t, x] * weight(m, t)[x]
// where weight links query row m to key row t (aggregate) or key row m to query row t
// (scatter); the pair t == m has no column slot and reads as zero. Every lane x is a small
// GEMM of its own. The weights of one SIMD column tile are gathered once into a packed
// (m block, t, m in block) buffer shared by all channels; the input is packed RC channels at
// a time; so the inner loop reads only contiguous, aligned memory that stays in cache.
constexpr int kMixRows = 3;  // RM: output rows per register tile

// Reads the column slots of one SIMD column tile plane by plane, in memory order, into the
// pack: entry (m / RM, t, m % RM) holds weight(m, t); the entries without a slot (t == m, and
// the rows m >= H that pad the last block) hold zero.
template <typename VT, bool Scatter, bool Full, typename S>
void pack_column_weights(const S* attn, typename VT::V* pack, int64_t x0, int64_t nx, int64_t H, int64_t W) {
  constexpr int RM = kMixRows;
  for (int64_t m = 0; m < H; ++m) pack[(m / RM * H + m) * RM + m % RM] = VT::zero();
  for (int64_t m = H; m < (H + RM - 1) / RM * RM; ++m)
    for (int64_t t = 0; t < H; ++t) pack[(m / RM * H + t) * RM + m % RM] = VT::zero();
  for (int64_t j = 0; j < H - 1; ++j)
    for (int64_t y = 0; y < H; ++y) {
      const int64_t k = column_pixel(j, y);  // query row y reads key row k
      const int64_t m = Scatter ? k : y, t = Scatter ? y : k;
      pack[(m / RM * H + t) * RM + m % RM] = VT::template load<Full>(attn + attn_offset(W + j, y, x0, H, W), nx);
    }
}

// out = sums + the column sums, rounded once to S; sums holds the row pass's (it may be out).
template <typename VT, bool Full, typename S>
void column_mix_tile(const S* in, const typename VT::V* w_pack, const typename VT::Scalar* sums, S* out,
                     int64_t c_begin, int64_t c_end, int64_t x0, int64_t nx, int64_t H, int64_t W) {
  using V = typename VT::V;
  constexpr int RC = 4 * kWide, RM = kMixRows;
  const int64_t plane = H * W;
  V* in_pack = scratch<V, 4>(H * RC);
  for (int64_t c0 = c_begin; c0 < c_end; c0 += RC) {
    for (int64_t t = 0; t < H; ++t)
      for (int r = 0; r < RC; ++r)
        in_pack[t * RC + r] = VT::template load<Full>(
            in + std::min<int64_t>(c0 + r, c_end - 1) * plane + t * W + x0, nx);
    const int64_t rows = std::min<int64_t>(RC, c_end - c0);
    for (int64_t m0 = 0; m0 < H; m0 += RM) {
      V acc[RC][RM] = {};
      const V* wv = w_pack + m0 * H;
      const V* iv = in_pack;
      for (int64_t t = 0; t < H; ++t, wv += RM, iv += RC)
        for (int r = 0; r < RC; ++r)
          for (int j = 0; j < RM; ++j) acc[r][j] += iv[r] * wv[j];
      const int64_t cols = std::min<int64_t>(RM, H - m0);
      for (int r = 0; r < rows; ++r)
        for (int j = 0; j < cols; ++j) {
          const int64_t at = (c0 + r) * plane + (m0 + j) * W + x0;
          VT::template store<Full>(out + at, VT::template load<Full>(sums + at, nx) + acc[r][j], nx);
        }
    }
  }
}

// Column part of cc_energy for query rows [y_begin, y_end) and SIMD columns [x0, x0 + nx):
//   e[W + column_slot(k, y), y, x] = sum_c a[c, y, x] * b[c, k, x]      (k != y)
// Both operands are packed channel-major first, so the inner loop reads contiguous memory. The
// key pack of RK rows is gathered from every channel plane once per call, so the more query rows
// a call takes, the less that gathering costs each (energy_cpu chooses how many).
template <typename VT, bool Full, typename S>
void energy_column_tile(const S* a, const S* b, S* e, int64_t C, int64_t y_begin, int64_t y_end, int64_t x0,
                        int64_t nx, int64_t H, int64_t W) {
  using V = typename VT::V;
  constexpr int RY = kWide == 2 ? 3 : 2, RK = kWide == 2 ? 6 : 4;
  const int64_t plane = H * W, y_blocks = (y_end - y_begin + RY - 1) / RY;
  V* a_pack = scratch<V, 0>(y_blocks * C * RY);
  V* b_pack = scratch<V, 1>(C * RK);
  for (int64_t yb = 0; yb < y_blocks; ++yb)
    for (int64_t c = 0; c < C; ++c)
      for (int j = 0; j < RY; ++j) {
        const int64_t y = std::min<int64_t>(y_begin + yb * RY + j, y_end - 1);
        a_pack[(yb * C + c) * RY + j] = VT::template load<Full>(a + c * plane + y * W + x0, nx);
      }
  for (int64_t k0 = 0; k0 < H; k0 += RK) {
    int64_t ks[RK];
    for (int r = 0; r < RK; ++r) ks[r] = std::min<int64_t>(k0 + r, H - 1);
    for (int64_t c = 0; c < C; ++c)
      for (int r = 0; r < RK; ++r) b_pack[c * RK + r] = VT::template load<Full>(b + c * plane + ks[r] * W + x0, nx);
    for (int64_t yb = 0; yb < y_blocks; ++yb) {
      V acc[RY][RK] = {};
      for (int64_t c = 0; c < C; ++c) {
        const V* av = &a_pack[(yb * C + c) * RY];
        const V* bv = &b_pack[c * RK];
        for (int j = 0; j < RY; ++j)
          for (int r = 0; r < RK; ++r) acc[j][r] += av[j] * bv[r];
      }
      const int64_t y0 = y_begin + yb * RY;
      const int64_t rows = std::min<int64_t>(RY, y_end - y0), cols = std::min<int64_t>(RK, H - k0);
      for (int j = 0; j < rows; ++j)
        for (int r = 0; r < cols; ++r)
          if (ks[r] != y0 + j)
            VT::template store<Full>(e + column_weight_offset(ks[r], y0 + j, x0, H, W), acc[j][r], nx);
    }
  }
}

// Runs f(n, x0, nx, block) in parallel over images, `blocks` blocks and SIMD column tiles,
// tiles innermost: a thread's consecutive items then share the cache lines of their rows.
template <typename T, typename F>
void parallel_columns(int64_t N, int64_t W, int64_t blocks, const F& f) {
  constexpr int64_t VL = WideVec<T>::kLanes;
  const int64_t tiles = (W + VL - 1) / VL;
  at::parallel_for(0, N * tiles * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t tile = item % tiles, block = (item / tiles) % blocks, n = item / (blocks * tiles);
      const int64_t x0 = tile * VL;
      f(n, x0, std::min<int64_t>(VL, W - x0), block);
    }
  });
}

// The row slots are plain GEMMs, one per image row y, on strided views (no copies):
//   energy:    e[n, i, y, x] = sum_c b[n, c, y, i] * a[n, c, y, x]    E_y = B_y^T A_y
//   aggregate: o[n, c, y, x] = sum_i v[n, c, y, i] * w[n, i, y, x]    O_y = V_y W_y
//   scatter:   o[n, c, y, i] = sum_x g[n, c, y, x] * w[n, i, y, x]    O_y = G_y W_y^T
// Every matrix is row-major with leading dimension H * W. They run on the BLAS that PyTorch
// links (MKL, OpenBLAS), one sequential GEMM per row in parallel over rows, bfloat16 operands
// with float32 sums through MKL's gemm_bf16bf16f32; where PyTorch exports no such BLAS, or
// CCNET_OPS_CPU_BLAS=0 asks for it, ATen's bmm runs them (bfloat16 into float32 on widened
// copies), and a product stored in bfloat16 always runs there (oneDNN's bfloat16 GEMM).
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
            const int*, const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) __attribute__((weak));
void gemm_bf16bf16f32_(const char*, const char*, const int*, const int*, const int*, const float*,
                       const uint16_t*, const int*, const uint16_t*, const int*, const float*, float*,
                       const int*) __attribute__((weak));
}

// Row-major out (m x n) = op(lhs) (m x k) * op(rhs) (k x n), every leading dimension ld; BLAS
// is column-major, so it computes out^T = op(rhs)^T op(lhs)^T.
template <typename T, typename Out>
void blas_gemm(bool t_lhs, bool t_rhs, int m, int n, int k, const T* lhs, const T* rhs, Out* out, int ld) {
  const char ta = t_rhs ? 'T' : 'N', tb = t_lhs ? 'T' : 'N';
  const Out one = 1, zero = 0;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    gemm_bf16bf16f32_(&ta, &tb, &n, &m, &k, &one, reinterpret_cast<const uint16_t*>(rhs), &ld,
                      reinterpret_cast<const uint16_t*>(lhs), &ld, &zero, out, &ld);
  } else if constexpr (std::is_same_v<T, float>) {
    sgemm_(&ta, &tb, &n, &m, &k, &one, rhs, &ld, lhs, &ld, &zero, out, &ld);
  } else {
    dgemm_(&ta, &tb, &n, &m, &k, &one, rhs, &ld, lhs, &ld, &zero, out, &ld);
  }
}

// Whether the BLAS that PyTorch exports has a GEMM from `in` operands to an `out` product.
bool have_blas_gemm(at::ScalarType in, at::ScalarType out) {
  if (in == at::kFloat && out == at::kFloat) return sgemm_ != nullptr;
  if (in == at::kDouble && out == at::kDouble) return dgemm_ != nullptr;
  if (in == at::kBFloat16 && out == at::kFloat) return gemm_bf16bf16f32_ != nullptr;
  return false;
}

// out_y = op(lhs_y) op(rhs_y) for every image and row y, where out, lhs and rhs are (N, *, H, W)
// tensors (possibly narrowed along dim 1) whose dims 2 and 3 are contiguous, and the matrices
// of row y are their (dim 1, dim 3) slices at row y, transposed as asked. lhs and rhs share a
// dtype; out has it too, or is float32 for bfloat16 operands.
void row_gemms(const at::Tensor& out, const at::Tensor& lhs, bool t_lhs, const at::Tensor& rhs,
               bool t_rhs) {
  const int64_t N = out.size(0), H = out.size(2), W = out.size(3);
  const int64_t m = t_lhs ? lhs.size(3) : lhs.size(1), k = t_lhs ? lhs.size(1) : lhs.size(3);
  const int64_t n = t_rhs ? rhs.size(1) : rhs.size(3);
  const char* env = std::getenv("CCNET_OPS_CPU_BLAS");
  const bool blas = !(env && std::string_view(env) == "0") && have_blas_gemm(lhs.scalar_type(), out.scalar_type()) &&
                    std::max({m, n, k, H * W}) <= std::numeric_limits<int>::max();
  if (!blas && lhs.scalar_type() != out.scalar_type()) {
    row_gemms(out, lhs.to(out.scalar_type()), t_lhs, rhs.to(out.scalar_type()), t_rhs);
    return;
  }
  if (!blas) {
    const auto view = [](const at::Tensor& t, bool trans) {  // (N, H, rows, cols) per image row
      const at::Tensor r = t.transpose(1, 2);
      return trans ? r.transpose(2, 3) : r;
    };
    const at::Tensor l = view(lhs, t_lhs), r = view(rhs, t_rhs);
    for (int64_t i = 0; i < N; ++i) {
      at::Tensor o = out[i].transpose(0, 1);
      at::bmm_out(o, l[i], r[i]);
    }
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, lhs.scalar_type(), "cc_row_gemms", [&] {
    using out_t = at::opmath_type<scalar_t>;
    const scalar_t *pl = lhs.const_data_ptr<scalar_t>(), *pr = rhs.const_data_ptr<scalar_t>();
    out_t* po = out.mutable_data_ptr<out_t>();
    const int64_t sl = lhs.stride(0), sr = rhs.stride(0), so = out.stride(0);
    at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t i = item / H, y = item % H;
        blas_gemm<scalar_t, out_t>(t_lhs, t_rhs, m, n, k, pl + i * sl + y * W, pr + i * sr + y * W,
                                   po + i * so + y * W, H * W);
      }
    });
  });
}

constexpr int64_t kChannelBlock = 32;  // channels per parallel work item of the column passes
// The column energy's work items: at most kMaxEnergyRows query rows each (measured with C = 512 on
// 2 threads: cc_energy took 18.2 ms at 12 rows an item, 13.2 ms at 49), and about kItemsPerThread
// items a thread where the rows allow, so that many cores still share the work (unmeasured there).
constexpr int64_t kMaxEnergyRows = 49;
constexpr int64_t kItemsPerThread = 4;

// Every sum accumulates in float32 (float64 for float64) and is rounded once, as on the GPU.
// bfloat16 runs natively: the column kernels widen it in registers and round their stores; the
// row GEMMs are MKL's bfloat16 GEMM with float32 products where the aggregation needs them, and
// oneDNN's for the energies where the CPU has bfloat16 dot products (AVX512_BF16, at several
// times the float32 rate), else MKL's into float32, rounded after. float16 runs the float32
// kernels on widened copies and rounds the result, a pass over memory each way.
#if defined(__AVX512BF16__)
constexpr bool kBFloat16Dot = true;
#else
constexpr bool kBFloat16Dot = false;
#endif

bool widened(const at::Tensor& t) { return t.scalar_type() == at::kHalf; }

at::Tensor energy_cpu(const at::Tensor& a_in, const at::Tensor& b_in) {
  check_energy_args(a_in, b_in, "cc_energy");
  if (widened(a_in)) return energy_cpu(a_in.to(at::kFloat), b_in.to(at::kFloat)).to(a_in.scalar_type());
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t N = a.size(0), C = a.size(1), H = a.size(2), W = a.size(3), L = num_slots(H, W);
  at::Tensor e = at::empty({N, L, H, W}, a.options());
  const at::Tensor rows = e.narrow(1, 0, W);
  if (a.scalar_type() == at::kBFloat16 && !kBFloat16Dot) {
    const at::Tensor sums = at::empty(rows.sizes(), a.options().dtype(at::kFloat));
    row_gemms(sums, b, /*t_lhs=*/true, a, /*t_rhs=*/false);
    rows.copy_(sums);
  } else {
    row_gemms(rows, b, /*t_lhs=*/true, a, /*t_rhs=*/false);
  }
  if (H == 1) return e;  // a single row has no column slots
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, a.scalar_type(), "cc_energy_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *pa = a.const_data_ptr<scalar_t>(), *pb = b.const_data_ptr<scalar_t>();
    scalar_t* pe = e.mutable_data_ptr<scalar_t>();
    const int64_t feat = C * H * W, map = L * H * W;
    // Query rows per work item: at most kMaxEnergyRows (fewer items gather the key packs fewer
    // times), fewer where that leaves under kItemsPerThread items a thread; blocks of H / blocks
    // rows, give or take one.
    const int64_t tiles = (W + WideVec<acc_t>::kLanes - 1) / WideVec<acc_t>::kLanes;
    const int64_t wanted = (kItemsPerThread * at::get_num_threads() + N * tiles - 1) / (N * tiles);
    const int64_t blocks = std::max((H + kMaxEnergyRows - 1) / kMaxEnergyRows, std::min(H, wanted));
    parallel_columns<acc_t>(N, W, blocks, [&](int64_t n, int64_t x0, int64_t nx, int64_t block) {
      const int64_t y0 = block * H / blocks, y1 = (block + 1) * H / blocks;
      dispatch_tile<acc_t>(nx, [&](auto vt, auto full) {
        energy_column_tile<decltype(vt), decltype(full)::value>(pa + n * feat, pb + n * feat, pe + n * map, C, y0,
                                                                y1, x0, nx, H, W);
      });
    });
  });
  return e;
}

// cc_aggregate (Scatter = false) and cc_scatter (Scatter = true) share checks, shapes and the
// column pass; they differ in the row pass.
template <bool Scatter>
at::Tensor mix_cpu(const at::Tensor& w_in, const at::Tensor& f_in, const char* op) {
  check_aggregate_args(w_in, f_in, op);
  if (widened(f_in)) return mix_cpu<Scatter>(w_in.to(at::kFloat), f_in.to(at::kFloat), op).to(f_in.scalar_type());
  const at::Tensor w = w_in.contiguous(), f = f_in.contiguous();
  const int64_t N = f.size(0), C = f.size(1), H = f.size(2), W = f.size(3), L = num_slots(H, W);
  at::Tensor out = at::empty_like(f);
  // the row pass's sums in float32 (float64), straight into out when out is that dtype
  const at::ScalarType acc_type = at::toOpMathType(f.scalar_type());
  const at::Tensor rows = acc_type == f.scalar_type() ? out : at::empty(f.sizes(), f.options().dtype(acc_type));
  row_gemms(rows, f, /*t_lhs=*/false, w.narrow(1, 0, W), /*t_rhs=*/Scatter);
  if (H == 1) return rows.is_same(out) ? out : out.copy_(rows);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, f.scalar_type(), "cc_mix_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *pw = w.const_data_ptr<scalar_t>(), *pf = f.const_data_ptr<scalar_t>();
    const acc_t* pr = rows.const_data_ptr<acc_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    const int64_t feat = C * H * W, map = L * H * W;
    using Wide = WideVec<acc_t>;
    const int64_t tiles = (W + Wide::kLanes - 1) / Wide::kLanes;
    const int64_t tile_pack = (H + kMixRows - 1) / kMixRows * kMixRows * H;  // vectors
    // one wide pack per tile, about the size of the map's column part, so allocated per call
    // (not zero filled: the packing writes every entry); a tail tile of narrow vectors uses the
    // first half of its own
    const std::unique_ptr<typename Wide::V[]> packs(new typename Wide::V[N * tiles * tile_pack]);
    typename Wide::V* w_pack = packs.get();
    const auto pack_of = [&](auto vt, int64_t n, int64_t x0) {
      return reinterpret_cast<typename decltype(vt)::V*>(&w_pack[(n * tiles + x0 / Wide::kLanes) * tile_pack]);
    };
    parallel_columns<acc_t>(N, W, 1, [&](int64_t n, int64_t x0, int64_t nx, int64_t) {
      dispatch_tile<acc_t>(nx, [&](auto vt, auto full) {
        pack_column_weights<decltype(vt), Scatter, decltype(full)::value>(pw + n * map, pack_of(vt, n, x0), x0,
                                                                         nx, H, W);
      });
    });
    parallel_columns<acc_t>(N, W, (C + kChannelBlock - 1) / kChannelBlock,
                            [&](int64_t n, int64_t x0, int64_t nx, int64_t block) {
      const int64_t c0 = block * kChannelBlock, c1 = std::min(C, c0 + kChannelBlock);
      dispatch_tile<acc_t>(nx, [&](auto vt, auto full) {
        column_mix_tile<decltype(vt), decltype(full)::value>(pf + n * feat, pack_of(vt, n, x0), pr + n * feat,
                                                             po + n * feat, c0, c1, x0, nx, H, W);
      });
    });
  });
  return out;
}

at::Tensor aggregate_cpu(const at::Tensor& attn, const at::Tensor& value) {
  return mix_cpu<false>(attn, value, "cc_aggregate");
}

at::Tensor scatter_cpu(const at::Tensor& attn, const at::Tensor& feature) {
  return mix_cpu<true>(attn, feature, "cc_scatter");
}

}  // namespace

TORCH_LIBRARY(ccnet_ops, m) {
  m.def("cc_energy(Tensor query, Tensor key) -> Tensor");
  m.def("cc_aggregate(Tensor attn, Tensor value) -> Tensor");
  m.def("cc_scatter(Tensor attn, Tensor feature) -> Tensor");
  // the whole attention each way, CUDA only (cuda/cc_kernels.cuh): (out, attention map) and
  // (dq, dk, dv) from the output's gradient, the inputs and that map
  m.def("cc_attention(Tensor query, Tensor key, Tensor value) -> (Tensor, Tensor)");
  m.def("cc_attention_backward(Tensor grad, Tensor query, Tensor key, Tensor value, Tensor attn) -> "
        "(Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ccnet_ops, CPU, m) {
  m.impl("cc_energy", &energy_cpu);
  m.impl("cc_aggregate", &aggregate_cpu);
  m.impl("cc_scatter", &scatter_cpu);
}

}  // namespace ccnet_ops
