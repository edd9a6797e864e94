// The one-convolution scheme of the rank-1 ensemble conv2d ops: every convolution runs once over all
// E*B images with the shared weight, and the members' fast weights become per-(member, channel) or
// per-(image, channel) scaling passes around it. Host code only, over a primitive set P:
//
//   P::scale_channels(in, f, add, aux, out, sum_in, sum_aux, B, channels_last)
//     out[n, c, p] = in[n, c, p] * f[n / B, c] + add[n / B, c]  (f, add: (N / B, C); either may be undefined)
//     sum_in[n, c] = sum_p in[n, c, p],  sum_aux[n, c] = sum_p in[n, c, p] * aux[n, c, p]  (opmath dtype)
//   Every tensor but `in` may be undefined (not computed); out may be `in` itself (the sums read `in`
//   before it is overwritten). Activations are contiguous in x's memory format. With B = 1, f and add
//   are per image: that is how the hyper op's per-row factors v_k * e1[n] go through the same pass.
//
// csrc/cuda/rank1_conv.cu instantiates it with its fused CUDA kernel (the ops' CUDA kernels);
// tests/one_conv_harness.cpp with ATen's elementwise ops on the CPU, so the host logic below (which
// tensors, which masks, which sums) is tested against the float64 reference without a GPU.
#pragma once
#include "rank1_conv.h"

#include <ATen/OpMathType.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace hyperkern {
namespace rank1_conv {
namespace one_conv {

using Grads5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Grads11 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                           at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// conv(in, weight) over all images at once (cuDNN / oneDNN through ATen), in `fmt`.
inline at::Tensor conv_all(const at::Tensor& in, const at::Tensor& weight, const Geometry& geo, at::MemoryFormat fmt) {
  return at::convolution(in, weight.contiguous(fmt), std::nullopt, geo.stride, geo.padding, geo.dilation, false,
                         {0, 0}, geo.groups)
      .contiguous(fmt);
}

// Host work counts on small layers (each ATen call is a dispatch, and on CUDA often a launch): no cast
// that would not change the dtype, no per-image copies of per-member rows (a broadcast over each
// member's B rows instead), one empty tensor for all the gradients a backward is not asked for.

// (N, C) opmath per-image sums -> (E, C) per-member sums in dtype.
inline at::Tensor member_sums(const at::Tensor& per_image, const Dims& d, at::ScalarType dtype) {
  const at::Tensor sums = per_image.view({d.E, d.B, per_image.size(1)}).sum(1);
  return sums.scalar_type() == dtype ? sums : sums.to(dtype);
}

// (N, C) per-image rows times (E, C) per-member values, row n by member n / B's (one broadcasting
// multiply; the result has the promoted dtype of the two, contiguous).
inline at::Tensor rows_times_members(const at::Tensor& rows, const at::Tensor& per_member, const Dims& d) {
  return (rows.view({d.E, d.B, rows.size(1)}) * per_member.unsqueeze(1)).view({d.N, rows.size(1)});
}

inline at::Tensor opmath_rows(const Dims& d, int64_t C, const at::Tensor& x) {
  return at::empty({d.N, C}, x.options().dtype(at::toOpMathType(x.scalar_type())));
}

// The output-scale pass of a conv backward, one pass over g: gs = g * s_k (when need_gs), the (N, O)
// opmath per-image sums sum_p g (when need_sum; bias gradients) and ds_k = sum g * act (when need_s,
// act the unscaled output: kept by the forward or recomputed).
template <class P>
std::tuple<at::Tensor, at::Tensor, at::Tensor> output_scale_backward(const at::Tensor& g, const at::Tensor& s,
                                                                     const at::Tensor& act, const Dims& d, bool need_gs,
                                                                     bool need_sum, bool need_s, bool channels_last) {
  const at::Tensor g_sum = need_sum ? opmath_rows(d, d.O, g) : at::Tensor();
  const at::Tensor g_act = need_s ? opmath_rows(d, d.O, g) : at::Tensor();
  const at::Tensor gs = need_gs ? at::empty_like(g) : at::Tensor();
  if (need_gs || need_sum || need_s) {
    P::scale_channels(g, s.contiguous(), std::nullopt, act, gs, g_sum, g_act, d.B, channels_last);
  }
  return {gs, g_sum, need_s ? member_sums(g_act, d, g.scalar_type()) : at::Tensor()};  // ds: only when need_s
}

// in * f_k, one pass (B rows per member).
template <class P>
at::Tensor scaled(const at::Tensor& in, const at::Tensor& f, int64_t B, at::MemoryFormat fmt) {
  at::Tensor out = empty_like_format(in.sizes(), in, fmt);
  P::scale_channels(in, f.contiguous(), std::nullopt, at::Tensor(), out, at::Tensor(), at::Tensor(), B,
                    fmt == at::MemoryFormat::ChannelsLast);
  return out;
}

// The input side of one branch y_branch = conv(x * f_k, weight): from gout = dL/dy_branch, one
// convolution backward at input xf = x * f_k (needed only for dW; xc stands in for its shape otherwise)
// gives dW and dxf; one pass turns dxf into dx_branch = dxf * f_k in place and sums dxf * x for df_k.
// Returns (dx_branch, dW, df): each undefined where not needed.
template <class P>
std::tuple<at::Tensor, at::Tensor, at::Tensor> branch_backward(const at::Tensor& gout, const at::Tensor& xc,
                                                               const at::Tensor& xf, const at::Tensor& weight,
                                                               const at::Tensor& f, const Geometry& geo,
                                                               const Dims& d, bool need_x, bool need_w, bool need_f) {
  const at::MemoryFormat fmt = activation_format(xc);
  at::Tensor dx_branch, dw, df;
  if (!(need_x || need_w || need_f)) return {dx_branch, dw, df};
  auto [gi, gw, unused] =
      at::convolution_backward(gout, need_w ? xf : xc, weight.contiguous(fmt), at::OptionalIntArrayRef(), geo.stride,
                               geo.padding, geo.dilation, false, {0, 0}, geo.groups, {need_x || need_f, need_w, false});
  if (need_w) dw = gw.contiguous();
  if (need_x || need_f) {
    const at::Tensor dxf = gi.contiguous(fmt);
    const at::Tensor sums = need_f ? opmath_rows(d, d.C, xc) : at::Tensor();
    // in place, with the sums read before each element is overwritten
    P::scale_channels(dxf, f.contiguous(), std::nullopt, need_f ? xc : at::Tensor(), need_x ? dxf : at::Tensor(),
                      at::Tensor(), sums, d.B, fmt == at::MemoryFormat::ChannelsLast);
    if (need_x) dx_branch = dxf;
    if (need_f) df = member_sums(sums, d, xc.scalar_type());
  }
  return {dx_branch, dw, df};
}

// ---- batch op: y = conv(x * r_k, W) * s_k + bias_k --------------------------------------------------

// (y, pre): pre = conv(x * r_k, W) when keep_pre (y gets its own buffer), else y overwrites it and pre is empty.
template <class P>
std::tuple<at::Tensor, at::Tensor> batch_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& r,
                                                 const at::Tensor& s, const std::optional<at::Tensor>& bias,
                                                 const Geometry& geo, const Dims& d, bool keep_pre) {
  const at::MemoryFormat fmt = activation_format(x);
  if (d.N == 0) {
    return {empty_like_format({d.N, d.O, d.Ho, d.Wo}, x, fmt),
            keep_pre ? empty_like_format({d.N, d.O, d.Ho, d.Wo}, x, fmt) : at::empty({0}, x.options())};
  }
  const at::Tensor pre = conv_all(scaled<P>(x.contiguous(fmt), r, d.B, fmt), weight, geo, fmt);
  at::Tensor y = keep_pre ? at::empty_like(pre) : pre;
  P::scale_channels(pre, s.contiguous(), contiguous_opt(bias), at::Tensor(), y, at::Tensor(), at::Tensor(), d.B,
                    fmt == at::MemoryFormat::ChannelsLast);
  if (keep_pre) return {y, pre};
  return {y, at::empty({0}, x.options())};
}

// With gc = g * s_k: db_k = sum g, ds_k = sum g * pre, (dxr, dW) = conv backward of gc at input xr (one
// call over all images), dx = dxr * r_k, dr_k = sum dxr * x (sums over member k's images and positions).
// pre absent (undefined or not 4-D): recomputed (one more convolution) when ds is needed.
template <class P>
Grads5 batch_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& r,
                      const at::Tensor& s, const std::optional<at::Tensor>& pre, const Geometry& geo, const Dims& d,
                      std::array<bool, 5> output_mask) {
  const bool need_x = output_mask[0], need_w = output_mask[1], need_r = output_mask[2], need_s = output_mask[3],
             need_b = output_mask[4];
  const bool need_conv = need_x || need_w || need_r;
  const at::MemoryFormat fmt = activation_format(x);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const auto opts = x.options();
  at::Tensor dx, dw, dr, ds, db;  // undefined until computed; fill_unused makes the others empty
  if (d.N == 0) {  // no images: every gradient is zero
    if (need_x) dx = empty_like_format(x.sizes(), x, fmt);
    if (need_w) dw = at::zeros(weight.sizes(), opts);
    if (need_r) dr = at::zeros({d.E, d.C}, opts);
    if (need_s) ds = at::zeros({d.E, d.O}, opts);
    if (need_b) db = at::zeros({d.E, d.O}, opts);
    fill_unused(opts, dx, dw, dr, ds, db);
    return {dx, dw, dr, ds, db};
  }
  const bool have_pre = is_kept(pre);
  const at::Tensor xc = x.contiguous(fmt), g = grad_y.contiguous(fmt);
  at::Tensor xr;
  if (need_w || (need_s && !have_pre)) xr = scaled<P>(xc, r, d.B, fmt);
  at::Tensor pre_used;
  if (need_s) pre_used = have_pre ? pre->contiguous(fmt) : conv_all(xr, weight, geo, fmt);
  const auto [gc, g_sum, ds_k] = output_scale_backward<P>(g, s, pre_used, d, need_conv, need_b, need_s, channels_last);
  if (need_s) ds = ds_k;
  if (need_b) db = member_sums(g_sum, d, x.scalar_type());
  std::tie(dx, dw, dr) = branch_backward<P>(gc, xc, xr, weight, r, geo, d, need_x, need_w, need_r);
  fill_unused(opts, dx, dw, dr, ds, db);
  return {dx, dw, dr, ds, db};
}

// ---- hyper op: y = s_k * h + e1 * (v_k * hr) + bias_k + delta_bias_k * e2 ------------------------------
// with h = conv(x * r_k, W) and hr = conv(x * u_k, delta) (the delta branch before v_k; the op's
// documented hd = v_k * hr).

// (y, hd, h, hr): hd = v_k * hr when save_hd (the op's documented output), else empty; h and hr when
// keep_branches (what the backward reads), else empty. y = h * s_k + bias_k in one pass (per member),
// then y += hr * (e1 * v_k) (per image) and, with delta_bias, y += delta_bias_k * e2.
template <class P>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> hyper_forward(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& delta, const at::Tensor& r, const at::Tensor& s,
    const at::Tensor& u, const at::Tensor& v, const at::Tensor& e1, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& delta_bias, const std::optional<at::Tensor>& e2, const Geometry& geo,
    const Dims& d, bool save_hd, bool keep_branches) {
  const at::MemoryFormat fmt = activation_format(x);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const std::vector<int64_t> out_sizes{d.N, d.O, d.Ho, d.Wo};
  if (d.N == 0) {
    at::Tensor y = empty_like_format(out_sizes, x, fmt), hd, h, hr;
    if (save_hd) hd = empty_like_format(out_sizes, x, fmt);
    if (keep_branches) h = empty_like_format(out_sizes, x, fmt), hr = empty_like_format(out_sizes, x, fmt);
    fill_unused(x.options(), hd, h, hr);
    return {y, hd, h, hr};
  }
  const at::Tensor xc = x.contiguous(fmt);
  const at::Tensor h = conv_all(scaled<P>(xc, r, d.B, fmt), weight, geo, fmt);
  const at::Tensor hr = conv_all(scaled<P>(xc, u, d.B, fmt), delta, geo, fmt);
  at::Tensor y = at::empty_like(h);
  P::scale_channels(h, s.contiguous(), contiguous_opt(bias), at::Tensor(), y, at::Tensor(), at::Tensor(), d.B,
                    channels_last);
  y.addcmul_(hr, rows_times_members(e1, v, d).view({d.N, d.O, 1, 1}));
  if (defined(delta_bias)) y.add_(rows_times_members(*e2, *delta_bias, d).view({d.N, d.O, 1, 1}));
  at::Tensor hd, h_kept, hr_kept;
  if (save_hd) hd = scaled<P>(hr, v, d.B, fmt);
  if (keep_branches) h_kept = h, hr_kept = hr;
  fill_unused(x.options(), hd, h_kept, hr_kept);
  return {y, hd, h_kept, hr_kept};
}

// Gradients for (x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2) where output_mask says so, from
// the forward's h and hr (absent: recomputed where needed, one convolution each). With gh = g * s_k and
// gd = g * e1 * v_k: ds_k = sum g * h, de1 = v_k * sum_p g * hr, dv_k = sum e1 * (sum_p g * hr), the bias
// gradients from sum_p g, then one convolution backward per branch and dx = dxr * r_k + dxu * u_k with
// dr_k = sum dxr * x and du_k = sum dxu * x.
template <class P>
Grads11 hyper_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                       const at::Tensor& delta, const at::Tensor& r, const at::Tensor& s, const at::Tensor& u,
                       const at::Tensor& v, const at::Tensor& e1, const std::optional<at::Tensor>& delta_bias,
                       const std::optional<at::Tensor>& e2, const std::optional<at::Tensor>& h_saved,
                       const std::optional<at::Tensor>& hr_saved, const Geometry& geo, const Dims& d,
                       std::array<bool, 11> output_mask) {
  const bool need_x = output_mask[0], need_w = output_mask[1], need_delta = output_mask[2], need_r = output_mask[3],
             need_s = output_mask[4], need_u = output_mask[5], need_v = output_mask[6], need_e1 = output_mask[7],
             need_b = output_mask[8];
  const bool has_db = defined(delta_bias);
  const bool need_db = output_mask[9] && has_db, need_e2 = output_mask[10] && has_db;
  const bool need_h_conv = need_x || need_w || need_r, need_d_conv = need_x || need_delta || need_u;
  const bool need_g_sum = need_b || need_db || need_e2, need_g_hr = need_e1 || need_v;
  const at::MemoryFormat fmt = activation_format(x);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const auto opts = x.options();
  const at::ScalarType dtype = x.scalar_type();
  at::Tensor dx, dw, ddelta, dr, ds, du, dv, de1;  // undefined until computed; fill_unused makes the others empty
  if (d.N == 0) {  // no images: every gradient is zero
    if (need_x) dx = empty_like_format(x.sizes(), x, fmt);
    if (need_w) dw = at::zeros(weight.sizes(), opts);
    if (need_delta) ddelta = at::zeros(delta.sizes(), opts);
    if (need_r) dr = at::zeros({d.E, d.C}, opts);
    if (need_s) ds = at::zeros({d.E, d.O}, opts);
    if (need_u) du = at::zeros({d.E, d.C}, opts);
    if (need_v) dv = at::zeros({d.E, d.O}, opts);
    if (need_e1) de1 = at::zeros({d.N, d.O}, opts);
    auto [db, ddb, de2] = hyper_bias_grads(at::zeros({0, d.O}, opts), delta_bias, e2, d, need_b, need_db, need_e2,
                                           dtype);
    fill_unused(opts, dx, dw, ddelta, dr, ds, du, dv, de1, db, ddb, de2);
    return {dx, dw, ddelta, dr, ds, du, dv, de1, db, ddb, de2};
  }
  const at::Tensor xc = x.contiguous(fmt), g = grad_y.contiguous(fmt);
  const bool have_h = is_kept(h_saved), have_hr = is_kept(hr_saved);
  at::Tensor xr, xu;
  if (need_w || (need_s && !have_h)) xr = scaled<P>(xc, r, d.B, fmt);
  if (need_delta || (need_g_hr && !have_hr)) xu = scaled<P>(xc, u, d.B, fmt);
  at::Tensor h, hr;
  if (need_s) h = have_h ? h_saved->contiguous(fmt) : conv_all(xr, weight, geo, fmt);
  if (need_g_hr) hr = have_hr ? hr_saved->contiguous(fmt) : conv_all(xu, delta, geo, fmt);

  // the s branch: gh = g * s_k, sum_p g (bias gradients), sum_p g * h (ds)
  const auto [gh, g_sum, ds_k] = output_scale_backward<P>(g, s, h, d, need_h_conv, need_g_sum, need_s, channels_last);
  if (need_s) ds = ds_k;
  // the delta branch, per image: gd = g * (e1 * v_k), sum_p g * hr (de1, dv)
  const at::Tensor g_hr = need_g_hr ? opmath_rows(d, d.O, x) : at::Tensor();
  const at::Tensor gd = need_d_conv ? at::empty_like(g) : at::Tensor();
  if (need_d_conv || need_g_hr) {
    P::scale_channels(g, rows_times_members(e1, v, d), std::nullopt, hr, gd, at::Tensor(), g_hr, 1, channels_last);
  }
  if (need_e1) {  // g_hr (op-math) * v_k promotes to op-math
    const at::Tensor rows = rows_times_members(g_hr, v, d);
    de1 = rows.scalar_type() == dtype ? rows : rows.to(dtype);
  }
  if (need_v) dv = member_sums(g_hr * e1, d, dtype);
  at::Tensor db, ddb, de2;
  if (need_g_sum) std::tie(db, ddb, de2) = hyper_bias_grads(g_sum, delta_bias, e2, d, need_b, need_db, need_e2, dtype);

  // one convolution backward per branch; dx is the sum of the branches' input sides
  at::Tensor dxr, dxu;
  std::tie(dxr, dw, dr) = branch_backward<P>(gh, xc, xr, weight, r, geo, d, need_x, need_w, need_r);
  std::tie(dxu, ddelta, du) = branch_backward<P>(gd, xc, xu, delta, u, geo, d, need_x, need_delta, need_u);
  if (need_x) dx = dxr.add_(dxu);
  fill_unused(opts, dx, dw, ddelta, dr, ds, du, dv, de1, db, ddb, de2);
  return {dx, dw, ddelta, dr, ds, du, dv, de1, db, ddb, de2};
}

}  // namespace one_conv
}  // namespace rank1_conv
}  // namespace hyperkern
