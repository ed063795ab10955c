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
// The CPU kernels are small register-tiled GEMMs whose SIMD lanes run along x, the
// contiguous dimension, so every load is a contiguous vector load.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>
#if defined(__AVX512VL__)
#include <immintrin.h>
#endif

#include "cc_checks.h"
#include "cc_index.h"

namespace ccnet_ops {
namespace {

// A 32-byte SIMD vector (GCC/Clang vector extension); the compiler lowers it to AVX, SSE or
// scalar code depending on the target.
template <typename T>
struct Vec {
  typedef T V __attribute__((vector_size(32)));
  static constexpr int64_t kLanes = 32 / sizeof(T);

  static inline V zero() { return V{}; }
  static inline V splat(T s) {
    V v;
    for (int64_t l = 0; l < kLanes; ++l) v[l] = s;  // compiles to one broadcast
    return v;
  }
  // Loads n <= kLanes elements, zero filling the rest; Full means n == kLanes. The partial
  // forms are masked loads and stores, so a tail never reads or writes past the tensor.
  template <bool Full>
  static inline V load(const T* p, int64_t n) {
    if constexpr (Full) {
      V v;
      std::memcpy(&v, p, sizeof(V));
      return v;
    } else {
      return load_part(p, n);
    }
  }
  template <bool Full>
  static inline void store(T* p, V v, int64_t n) {
    if constexpr (Full) {
      std::memcpy(p, &v, sizeof(V));
    } else {
      store_part(p, v, n);
    }
  }
  static inline V load_part(const T* p, int64_t n) {
#if defined(__AVX512VL__)
    const __mmask8 m = static_cast<__mmask8>((1u << n) - 1u);
    if constexpr (sizeof(T) == 4) return (V)_mm256_maskz_loadu_ps(m, p);
    else return (V)_mm256_maskz_loadu_pd(m, p);
#else
    V v = zero();
    for (int64_t l = 0; l < n; ++l) v[l] = p[l];
    return v;
#endif
  }
  static inline void store_part(T* p, V v, int64_t n) {
#if defined(__AVX512VL__)
    const __mmask8 m = static_cast<__mmask8>((1u << n) - 1u);
    if constexpr (sizeof(T) == 4) _mm256_mask_storeu_ps(p, m, (__m256)v);
    else _mm256_mask_storeu_pd(p, m, (__m256d)v);
#else
    for (int64_t l = 0; l < n; ++l) p[l] = v[l];
#endif
  }
  static inline T sum(V v) {
    T s = 0;
    for (int64_t l = 0; l < kLanes; ++l) s += v[l];
    return s;
  }
};

// Register tiles: AVX-512VL gives 32 vector registers, older targets 16.
#if defined(__AVX512VL__)
constexpr int kWide = 2;
#else
constexpr int kWide = 1;
#endif

// Runs f.template operator()<true>() for a full vector, <false>() for a tail.
template <typename F>
inline void dispatch_full(bool full, const F& f) {
  if (full) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// One image row as a GEMM with a scalar operand:
//   out[m, x] = sum_t vec[t, x] * sc[m, t]        (m < M, t < T, x < X; x contiguous)
// Serves the row part of cc_energy (m = key column i, t = channel) and of cc_aggregate
// (m = channel, t = key column i). Rows past M are clamped and not stored.
template <typename T>
void row_gemm(const T* vec, int64_t vec_t, const T* sc, int64_t sc_m, int64_t sc_t, T* out,
              int64_t out_m, int64_t M, int64_t Tn, int64_t X) {
  using VT = Vec<T>;
  using V = typename VT::V;
  constexpr int RM = 6 * kWide, RX = 2;
  constexpr int64_t VL = VT::kLanes;
  std::vector<V> pack(Tn * RX);  // vec[:, x0 : x0 + RX * VL], contiguous and zero padded
  for (int64_t x0 = 0; x0 < X; x0 += RX * VL) {
    int64_t nx[RX];
    for (int q = 0; q < RX; ++q) nx[q] = std::clamp<int64_t>(X - x0 - q * VL, 0, VL);
    for (int64_t t = 0; t < Tn; ++t)
      for (int q = 0; q < RX; ++q) pack[t * RX + q] = VT::load_part(vec + t * vec_t + x0 + q * VL, nx[q]);
    for (int64_t m0 = 0; m0 < M; m0 += RM) {
      const T* sc_row[RM];
      for (int r = 0; r < RM; ++r) sc_row[r] = sc + std::min<int64_t>(m0 + r, M - 1) * sc_m;
      V acc[RM][RX] = {};
      for (int64_t t = 0; t < Tn; ++t) {
        const V* xv = &pack[t * RX];
        for (int r = 0; r < RM; ++r) {
          const V s = VT::splat(sc_row[r][t * sc_t]);
          for (int q = 0; q < RX; ++q) acc[r][q] += xv[q] * s;
        }
      }
      const int64_t rows = std::min<int64_t>(RM, M - m0);
      for (int r = 0; r < rows; ++r)
        for (int q = 0; q < RX; ++q) VT::store_part(out + (m0 + r) * out_m + x0 + q * VL, acc[r][q], nx[q]);
    }
  }
}

// Column part of cc_aggregate (Scatter = false) and of cc_scatter (Scatter = true) for the
// channels [c_begin, c_end) and the SIMD columns [x0, x0 + nx) of one image:
//   out[c, m, x] += sum_{t != m} in[c, t, x] * weight(m, t)[x]
// where weight links query row m to key row t (aggregate) or key row m to query row t
// (scatter). The pair t == m has no column slot: it reads as zero.
template <typename T, bool Scatter, bool Full>
void column_mix_tile(const T* in, const T* attn, T* out, int64_t c_begin, int64_t c_end,
                     int64_t x0, int64_t nx, int64_t H, int64_t W) {
  using VT = Vec<T>;
  using V = typename VT::V;
  constexpr int RC = 4 * kWide, RM = 3;
  const int64_t plane = H * W;
  std::vector<V> pack(H * RM);  // the weights of RM rows m, gathered once for every channel
  for (int64_t m0 = 0; m0 < H; m0 += RM) {
    int64_t ms[RM];
    for (int j = 0; j < RM; ++j) ms[j] = std::min<int64_t>(m0 + j, H - 1);
    for (int64_t t = 0; t < H; ++t) {
      for (int j = 0; j < RM; ++j) {
        const int64_t m = ms[j];
        pack[t * RM + j] = t == m ? VT::zero()
                                  : VT::template load<Full>(
                                        attn + (Scatter ? column_weight_offset(m, t, x0, H, W)
                                                        : column_weight_offset(t, m, x0, H, W)),
                                        nx);
      }
    }
    for (int64_t c0 = c_begin; c0 < c_end; c0 += RC) {
      const T* in_c[RC];
      for (int r = 0; r < RC; ++r) in_c[r] = in + std::min<int64_t>(c0 + r, c_end - 1) * plane + x0;
      V acc[RC][RM] = {};
      for (int64_t t = 0; t < H; ++t) {
        const V* wv = &pack[t * RM];
        for (int r = 0; r < RC; ++r) {
          const V iv = VT::template load<Full>(in_c[r] + t * W, nx);
          for (int j = 0; j < RM; ++j) acc[r][j] += iv * wv[j];
        }
      }
      const int64_t rows = std::min<int64_t>(RC, c_end - c0), cols = std::min<int64_t>(RM, H - m0);
      for (int r = 0; r < rows; ++r) {
        for (int j = 0; j < cols; ++j) {
          T* o = out + (c0 + r) * plane + ms[j] * W + x0;
          VT::template store<Full>(o, VT::template load<Full>(o, nx) + acc[r][j], nx);
        }
      }
    }
  }
}

// Column part of cc_energy for query rows [y_begin, y_end) and SIMD columns [x0, x0 + nx):
//   e[W + column_slot(k, y), y, x] = sum_c a[c, y, x] * b[c, k, x]      (k != y)
// Both operands are packed channel-major first, so the inner loop reads contiguous memory.
template <typename T, bool Full>
void energy_column_tile(const T* a, const T* b, T* e, int64_t C, int64_t y_begin, int64_t y_end,
                        int64_t x0, int64_t nx, int64_t H, int64_t W) {
  using VT = Vec<T>;
  using V = typename VT::V;
  constexpr int RY = kWide == 2 ? 3 : 2, RK = kWide == 2 ? 6 : 4;
  const int64_t plane = H * W, y_blocks = (y_end - y_begin + RY - 1) / RY;
  std::vector<V> a_pack(y_blocks * C * RY), b_pack(C * RK);
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

// Row part of cc_scatter for image row y: a GEMM contracting over x, the SIMD dimension:
//   r[c, y, i] = sum_x w[i, y, x] * g[c, y, x]
template <typename T>
void scatter_row(const T* w, const T* g, T* r, int64_t C, int64_t y, int64_t H, int64_t W) {
  using VT = Vec<T>;
  using V = typename VT::V;
  constexpr int RC = 4, RI = 3;
  constexpr int64_t VL = VT::kLanes;
  const int64_t plane = H * W;
  for (int64_t c0 = 0; c0 < C; c0 += RC) {
    const T* g_c[RC];
    for (int q = 0; q < RC; ++q) g_c[q] = g + std::min<int64_t>(c0 + q, C - 1) * plane + y * W;
    for (int64_t i0 = 0; i0 < W; i0 += RI) {
      const T* w_i[RI];
      for (int j = 0; j < RI; ++j) w_i[j] = w + attn_offset(std::min<int64_t>(i0 + j, W - 1), y, 0, H, W);
      V acc[RC][RI] = {};
      for (int64_t x0 = 0; x0 < W; x0 += VL) {
        const int64_t nx = std::min<int64_t>(VL, W - x0);
        dispatch_full(nx == VL, [&](auto full) {
          constexpr bool Full = decltype(full)::value;
          V wv[RI];
          for (int j = 0; j < RI; ++j) wv[j] = VT::template load<Full>(w_i[j] + x0, nx);
          for (int q = 0; q < RC; ++q) {
            const V gv = VT::template load<Full>(g_c[q] + x0, nx);
            for (int j = 0; j < RI; ++j) acc[q][j] += gv * wv[j];
          }
        });
      }
      const int64_t rows = std::min<int64_t>(RC, C - c0), cols = std::min<int64_t>(RI, W - i0);
      for (int q = 0; q < rows; ++q)
        for (int j = 0; j < cols; ++j) r[(c0 + q) * plane + y * W + i0 + j] = VT::sum(acc[q][j]);
    }
  }
}

// Runs f(n, x0, nx, block) in parallel over images, SIMD columns and `blocks` blocks.
template <typename T, typename F>
void parallel_columns(int64_t N, int64_t W, int64_t blocks, const F& f) {
  constexpr int64_t VL = Vec<T>::kLanes;
  const int64_t tiles = (W + VL - 1) / VL;
  at::parallel_for(0, N * tiles * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t block = item % blocks, tile = (item / blocks) % tiles, n = item / (blocks * tiles);
      const int64_t x0 = tile * VL;
      f(n, x0, std::min<int64_t>(VL, W - x0), block);
    }
  });
}

// Runs f(n, y) in parallel over the image rows of all images.
template <typename F>
void parallel_rows(int64_t N, int64_t H, const F& f) {
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) f(item / H, item % H);
  });
}

constexpr int64_t kChannelBlock = 32;  // channels per parallel work item of the column passes

at::Tensor energy_cpu(const at::Tensor& a_in, const at::Tensor& b_in) {
  check_energy_args(a_in, b_in, "cc_energy");
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t N = a.size(0), C = a.size(1), H = a.size(2), W = a.size(3), L = num_slots(H, W);
  at::Tensor e = at::empty({N, L, H, W}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "cc_energy_cpu", [&] {
    const scalar_t *pa = a.const_data_ptr<scalar_t>(), *pb = b.const_data_ptr<scalar_t>();
    scalar_t* pe = e.mutable_data_ptr<scalar_t>();
    const int64_t feat = C * H * W, map = L * H * W;
    // Row slots: e[i, y, x] = sum_c a[c, y, x] * b[c, y, i].
    parallel_rows(N, H, [&](int64_t n, int64_t y) {
      row_gemm<scalar_t>(pa + n * feat + y * W, H * W, pb + n * feat + y * W, 1, H * W,
                         pe + n * map + y * W, H * W, W, C, W);
    });
    if (H == 1) return;  // a single row has no column slots
    constexpr int64_t kRowsPerItem = 12;
    parallel_columns<scalar_t>(N, W, (H + kRowsPerItem - 1) / kRowsPerItem,
                               [&](int64_t n, int64_t x0, int64_t nx, int64_t block) {
      const int64_t y0 = block * kRowsPerItem, y1 = std::min(H, y0 + kRowsPerItem);
      dispatch_full(nx == Vec<scalar_t>::kLanes, [&](auto full) {
        energy_column_tile<scalar_t, decltype(full)::value>(pa + n * feat, pb + n * feat, pe + n * map,
                                                            C, y0, y1, x0, nx, H, W);
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
  const at::Tensor w = w_in.contiguous(), f = f_in.contiguous();
  const int64_t N = f.size(0), C = f.size(1), H = f.size(2), W = f.size(3), L = num_slots(H, W);
  at::Tensor out = at::empty_like(f);
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "cc_mix_cpu", [&] {
    const scalar_t *pw = w.const_data_ptr<scalar_t>(), *pf = f.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    const int64_t feat = C * H * W, map = L * H * W;
    parallel_rows(N, H, [&](int64_t n, int64_t y) {
      if (Scatter) {
        scatter_row<scalar_t>(pw + n * map, pf + n * feat, po + n * feat, C, y, H, W);
      } else {  // out[c, y, x] = sum_i w[i, y, x] * f[c, y, i]
        row_gemm<scalar_t>(pw + n * map + y * W, H * W, pf + n * feat + y * W, H * W, 1,
                           po + n * feat + y * W, H * W, C, W, W);
      }
    });
    if (H == 1) return;
    parallel_columns<scalar_t>(N, W, (C + kChannelBlock - 1) / kChannelBlock,
                               [&](int64_t n, int64_t x0, int64_t nx, int64_t block) {
      const int64_t c0 = block * kChannelBlock, c1 = std::min(C, c0 + kChannelBlock);
      dispatch_full(nx == Vec<scalar_t>::kLanes, [&](auto full) {
        column_mix_tile<scalar_t, Scatter, decltype(full)::value>(pf + n * feat, pw + n * map,
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
}

TORCH_LIBRARY_IMPL(ccnet_ops, CPU, m) {
  m.impl("cc_energy", &energy_cpu);
  m.impl("cc_aggregate", &aggregate_cpu);
  m.impl("cc_scatter", &scatter_cpu);
}

}  // namespace ccnet_ops
