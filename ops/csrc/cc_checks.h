// Argument checks shared by the CPU and CUDA entry points: one place, one wording.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "cc_index.h"

namespace ccnet_ops {

// Every kernel, CPU and CUDA, takes float64, float32, float16 and bfloat16; the reduced
// precisions accumulate in float32 (ops/criss_cross.py has the dtype contract).
inline void check_dtype_for_device(const at::Tensor& t, const char* op, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                       dtype == at::kBFloat16,
                   op, ": ", name, " has dtype ", dtype, "; the ", t.is_cuda() ? "CUDA" : "CPU",
                   " kernels support float32, float64, float16 and bfloat16");
}

// A feature map (N, C, H, W) with no empty dimension.
inline void check_feature(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK_VALUE(t.dim() == 4, op, ": ", name, " must be 4-D (N, C, H, W), got shape ",
              t.sizes());
  TORCH_CHECK_VALUE(t.numel() > 0, op, ": ", name, " is empty (shape ", t.sizes(),
              "); every dimension must be at least 1");
  check_dtype_for_device(t, op, name);
}

inline void check_same_kind(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                            const char* b_name, const char* op) {
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", a_name, " is on ", a.device(), " but ",
              b_name, " is on ", b.device(), "; put them on one device");
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), op, ": ", a_name, " has dtype ",
              a.scalar_type(), " but ", b_name, " has dtype ", b.scalar_type(),
              "; cast them to one dtype");
}

// query and key of the energy: equal shapes (N, C', H, W).
inline void check_energy_args(const at::Tensor& q, const at::Tensor& k, const char* op) {
  check_feature(q, op, "query");
  check_feature(k, op, "key");
  check_same_kind(q, "query", k, "key", op);
  TORCH_CHECK_VALUE(q.sizes() == k.sizes(), op, ": query ", q.sizes(), " and key ", k.sizes(),
              " must have the same shape (N, C', H, W)");
}

// attention (N, H + W - 1, H, W) and value (N, C, H, W).
inline void check_aggregate_args(const at::Tensor& attn, const at::Tensor& v, const char* op) {
  check_feature(v, op, "value");
  check_feature(attn, op, "attention");
  check_same_kind(attn, "attention", v, "value", op);
  const int64_t N = v.size(0), H = v.size(2), W = v.size(3);
  TORCH_CHECK_VALUE(attn.size(0) == N && attn.size(1) == num_slots(H, W) && attn.size(2) == H &&
                  attn.size(3) == W,
              op, ": attention has shape ", attn.sizes(), " but value ", v.sizes(),
              " needs (N, H + W - 1, H, W) = (", N, ", ", num_slots(H, W), ", ", H, ", ", W,
              ")");
}

}  // namespace ccnet_ops
