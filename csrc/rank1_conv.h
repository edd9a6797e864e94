// Shared by csrc/cpu/rank1_conv.cpp and csrc/cuda/rank1_conv.cu: the dimensions and memory-safety
// checks of the rank-1 ensemble conv2d ops. hyperkern.ops validates every argument with readable
// errors before a kernel runs; these TORCH_CHECKs only stop a direct torch.ops.hyperkern call with
// inconsistent shapes from reading or writing out of bounds.
//
// Layout: x is (E*B, C, H, W), member-major (images k*B .. (k+1)*B-1 belong to member k), NCHW or
// channels-last; weight and delta are (O, C/groups, kh, kw); r, u are (E, C); s, v, bias and
// delta_bias are (E, O); e1, e2 are (E*B, O), one row per image. The output is (E*B, O, Ho, Wo) in
// x's memory format.
//
// Folded weights: member k's effective weight is W_k[o, c, :, :] = W[o, c, :, :] * s[k, o] *
// r[k, (o / Og) * cg + c] (Og = O / groups output and cg = C / groups input channels per group), so
// conv(x_k * r_k, W) * s_k == conv(x_k, W_k).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

namespace hyperkern {
namespace rank1_conv {

struct Dims {
  int64_t E, B, N;         // members, images per member, images
  int64_t C, O, G, cg, Og; // input / output channels, groups, channels per group (in / out)
  int64_t kh, kw, H, W, Ho, Wo;
};

struct Geometry {
  std::array<int64_t, 2> stride, padding, dilation;
  int64_t groups;
};

inline std::array<int64_t, 2> as_pair(at::IntArrayRef v, const char* name) {
  TORCH_CHECK(v.size() == 2, "hyperkern rank-1 conv2d: ", name, " must have 2 entries, got ", v);
  return {v[0], v[1]};
}

inline Geometry make_geometry(at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups) {
  Geometry g{as_pair(stride, "stride"), as_pair(padding, "padding"), as_pair(dilation, "dilation"), groups};
  TORCH_CHECK(g.stride[0] >= 1 && g.stride[1] >= 1, "hyperkern rank-1 conv2d: stride must be >= 1, got ", stride);
  TORCH_CHECK(g.padding[0] >= 0 && g.padding[1] >= 0, "hyperkern rank-1 conv2d: padding must be >= 0, got ",
              padding);
  TORCH_CHECK(g.dilation[0] >= 1 && g.dilation[1] >= 1, "hyperkern rank-1 conv2d: dilation must be >= 1, got ",
              dilation);
  TORCH_CHECK(groups >= 1, "hyperkern rank-1 conv2d: groups must be >= 1, got ", groups);
  return g;
}

inline void check_same_kind(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "hyperkern rank-1 conv2d: ", name, " has dtype ",
              t.scalar_type(), " but x has dtype ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "hyperkern rank-1 conv2d: ", name, " is on ", t.device(),
              " but x is on ", ref.device());
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name) {
  TORCH_CHECK(t.sizes() == expected, "hyperkern rank-1 conv2d: ", name, " must have shape ", expected, ", got ",
              t.sizes());
}

// Checks the inputs shared by both ops and returns the problem's dimensions.
inline Dims check_conv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& r, const at::Tensor& s,
                       const Geometry& geo) {
  TORCH_CHECK(x.dim() == 4, "hyperkern rank-1 conv2d: x must be 4-D (E*B, C, H, W), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 4, "hyperkern rank-1 conv2d: weight must be 4-D (O, C/groups, kh, kw), got ",
              weight.sizes());
  TORCH_CHECK(r.dim() == 2 && r.size(0) >= 1, "hyperkern rank-1 conv2d: r must be (E, C) with E >= 1, got ",
              r.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "hyperkern rank-1 conv2d: x must be floating point, got ",
              x.scalar_type());
  Dims d;
  d.E = r.size(0);
  d.N = x.size(0);
  TORCH_CHECK(d.N % d.E == 0, "hyperkern rank-1 conv2d: x.size(0) = ", d.N,
              " must be divisible by the ensemble size E = r.size(0) = ", d.E);
  d.B = d.N / d.E;
  d.G = geo.groups;
  d.O = weight.size(0);
  d.cg = weight.size(1);
  d.kh = weight.size(2);
  d.kw = weight.size(3);
  d.C = x.size(1);
  TORCH_CHECK(d.C == d.cg * d.G, "hyperkern rank-1 conv2d: x has ", d.C, " channels but weight ", weight.sizes(),
              " with groups = ", d.G, " expects ", d.cg * d.G);
  TORCH_CHECK(d.O % d.G == 0, "hyperkern rank-1 conv2d: ", d.O, " output channels are not divisible by groups = ",
              d.G);
  d.Og = d.O / d.G;
  d.H = x.size(2);
  d.W = x.size(3);
  const int64_t eff_h = d.H + 2 * geo.padding[0] - geo.dilation[0] * (d.kh - 1);
  const int64_t eff_w = d.W + 2 * geo.padding[1] - geo.dilation[1] * (d.kw - 1);
  TORCH_CHECK(eff_h >= 1 && eff_w >= 1, "hyperkern rank-1 conv2d: input ", x.sizes(), " with padding ",
              at::IntArrayRef(geo.padding), " is smaller than the dilated kernel");
  d.Ho = (eff_h - 1) / geo.stride[0] + 1;
  d.Wo = (eff_w - 1) / geo.stride[1] + 1;
  check_shape(r, {d.E, d.C}, "r");
  check_shape(s, {d.E, d.O}, "s");
  check_same_kind(x, weight, "weight");
  check_same_kind(x, r, "r");
  check_same_kind(x, s, "s");
  return d;
}

inline void check_optional(const std::optional<at::Tensor>& t, const at::Tensor& x, at::IntArrayRef expected,
                           const char* name) {
  if (t.has_value() && t->defined()) {
    check_shape(*t, expected, name);
    check_same_kind(x, *t, name);
  }
}

inline bool defined(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Checks the hyper op's extra inputs (delta, u, v, e1 and the optional delta_bias with e2).
inline void check_hyper(const Dims& d, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& delta,
                        const at::Tensor& u, const at::Tensor& v, const at::Tensor& e1,
                        const std::optional<at::Tensor>& delta_bias, const std::optional<at::Tensor>& e2) {
  check_shape(delta, weight.sizes(), "delta");
  check_shape(u, {d.E, d.C}, "u");
  check_shape(v, {d.E, d.O}, "v");
  check_shape(e1, {d.N, d.O}, "e1");
  check_same_kind(x, delta, "delta");
  check_same_kind(x, u, "u");
  check_same_kind(x, v, "v");
  check_same_kind(x, e1, "e1");
  check_optional(delta_bias, x, {d.E, d.O}, "delta_bias");
  check_optional(e2, x, {d.N, d.O}, "e2");
  TORCH_CHECK(defined(delta_bias) == defined(e2),
              "hyperkern rank-1 conv2d: delta_bias and e2 must be given together");
}

// Checks the hp ops' hparams (N, m) and embedding (O, m), or (2*O, m) with delta_bias.
inline void check_hp(const Dims& d, const at::Tensor& x, const at::Tensor& hparams, const at::Tensor& embedding,
                     bool has_delta_bias) {
  TORCH_CHECK(hparams.dim() == 2 && hparams.size(0) == d.N, "hyperkern rank-1 conv2d: hparams must be (", d.N,
              ", m), got ", hparams.sizes());
  check_shape(embedding, {(has_delta_bias ? 2 : 1) * d.O, hparams.size(1)}, "embedding");
  check_same_kind(x, hparams, "hparams");
  check_same_kind(x, embedding, "embedding");
}

// The memory format every output follows: x's (NCHW or channels-last).
inline at::MemoryFormat activation_format(const at::Tensor& x) { return x.suggest_memory_format(); }

inline at::Tensor empty_like_format(at::IntArrayRef sizes, const at::Tensor& x, at::MemoryFormat fmt) {
  return at::empty(sizes, x.options().memory_format(fmt));
}

inline std::optional<at::Tensor> contiguous_opt(const std::optional<at::Tensor>& t) {
  return defined(t) ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

// An activation a forward kept for its backward (hd, pre, h, hr): present when 4-D (an empty 1-D tensor or
// an absent one means "not kept"), and then checked to be an output-shaped tensor of x's kind.
inline bool is_kept(const std::optional<at::Tensor>& t) { return defined(t) && t->dim() == 4; }

inline bool check_kept(const std::optional<at::Tensor>& t, const at::Tensor& x, const Dims& d, const char* name) {
  if (!is_kept(t)) return false;
  check_shape(*t, {d.N, d.O, d.Ho, d.Wo}, name);
  check_same_kind(x, *t, name);
  return true;
}

// Per-member weight-sized buffers (the folded weights and their gradients) are (E, parts * O, cg, kh, kw):
// output-channel group g holds [part 0's Og rows | part 1's Og rows | ...] (parts = 2 stacks W_k and
// D_k for the hyper op), and each member's 4-D slice is contiguous in x's memory format, so ATen's
// convolutions take it (and return its gradient) without a layout copy.
inline at::Tensor member_weight_buffer(const Dims& d, int64_t parts, bool channels_last, const at::TensorOptions& opts) {
  if (channels_last) return at::empty({d.E, parts * d.O, d.kh, d.kw, d.cg}, opts).permute({0, 1, 4, 2, 3});
  return at::empty({d.E, parts * d.O, d.cg, d.kh, d.kw}, opts);
}

// Addressing of part `part` inside such a buffer: member k's row for output channel o starts at
// offset + k * member_stride + (o / Og) * group_stride + (o % Og) * row_stride, and its element
// (input channel c, kernel tap i) sits c * c_stride + i * i_stride further.
struct WeightRows {
  int64_t member_stride, group_stride, row_stride, offset, c_stride, i_stride;
};

inline WeightRows member_weight_rows(const Dims& d, int64_t parts, int64_t part, bool channels_last) {
  const int64_t K = d.kh * d.kw, row = d.cg * K;
  return {parts * d.O * row, parts * d.Og * row, row, part * d.Og * row, channels_last ? 1 : K,
          channels_last ? d.cg : 1};
}

// The outputs an op is not asked for (gradients outside output_mask, activations not kept) are (0,)-shaped
// tensors, each its own (the outputs of an op must not alias each other); made only for those, so a
// backward asked for every gradient allocates none.
template <class... T>
inline void fill_unused(const at::TensorOptions& opts, T&... outputs) {
  ((outputs = outputs.defined() ? outputs : at::empty({0}, opts)), ...);
}

// Gradients of bias, delta_bias and e2 of the hyper op from g_sum[n, o] = sum over positions of the
// output gradient (accumulation dtype): db_k = sum_n g_sum, ddelta_bias_k = sum_n g_sum * e2,
// de2[n] = g_sum[n] * delta_bias_k. Undefined where not needed (fill_unused). Device-agnostic ATen code.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> hyper_bias_grads(
    const at::Tensor& g_sum, const std::optional<at::Tensor>& delta_bias, const std::optional<at::Tensor>& e2,
    const Dims& d, bool need_b, bool need_db, bool need_e2, at::ScalarType out_type) {
  at::Tensor db, ddb, de2;
  if (!(need_b || need_db || need_e2)) return {db, ddb, de2};
  // the products promote to g_sum's op-math dtype (a float sum times a bfloat16 row is float)
  const auto as_out = [&](const at::Tensor& t) { return t.scalar_type() == out_type ? t : t.to(out_type); };
  const at::Tensor sums = g_sum.view({d.E, d.B, d.O});
  if (need_b) db = as_out(sums.sum(1));
  if (need_db) ddb = as_out((sums * e2->view({d.E, d.B, d.O})).sum(1));
  if (need_e2) de2 = as_out((sums * delta_bias->unsqueeze(1)).view({d.N, d.O}));
  return {db, ddb, de2};
}

}  // namespace rank1_conv
}  // namespace hyperkern
