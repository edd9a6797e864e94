// The one-convolution scheme of the rank-1 ensemble conv2d ops: every convolution runs once over all
// E*B images with the shared weight, and the members' fast weights (and the hyper op's per-image
// factors) become scaling passes around it. Host code only, over a primitive set P:
//
//   P::empty(sizes, like, dtype, memory_format)
//     an uninitialised tensor on like's device, allocated without a dispatcher call (as ATen's structured
//     kernels allocate their outputs): every scratch buffer and output below comes from it, so the host
//     cost of a layer is its convolutions plus these passes.
//
//   P::scale_channels(pass)   (Pass below: one pass over the activation pass.in, N images of C channels)
//     out[n, c, p] = in[n, c, p] * scale[n, c] + shift[n, c]  (+ out[n, c, p] itself when accumulate)
//     with the coefficients scale, shift (Coef) the product of a per-member factor member[n / B, c] and a
//     per-image factor rows[n, c], either optional; and, for each requested Sum, one reduction of the
//     per-image sums S[n, c] = sum_p in[n, c, p] (or sum_p in[n, c, p] * aux[n, c, p]):
//       sum.out[j, c] = sum over the images n of group j of weight[n, c] * S[n, c]
//     (group = B: per member; 1: per image; weight a Coef, optional), accumulated in in's opmath type and
//     written once in sum.out's dtype (in's, or its opmath type). The caller gets every gradient in its
//     final shape and dtype from the pass: no view / sum / cast afterwards.
//   out may be undefined (sums only) or `in` itself (the sums read `in` before it is overwritten; not with
//   accumulate). Activations are contiguous in x's memory format, sums contiguous; a coefficient's
//   factors have unit stride along channels and any row stride (P reads stride(0)).
//   P::embed(hparams, embedding, e1, e2)   (the hp ops: e(lambda) inside the op)
//     e1[n, o] = sum_j hparams[n, j] * embedding[o, j] and, when e2 is defined, e2[n, o] = sum_j hparams[n, j] *
//     embedding[O + o, j], accumulated in opmath; hparams and embedding with any strides, e1 and e2 (N, O)
//     contiguous buffers from P::empty.
//   P::embed_backward(de1, de2, hparams, embedding, dhparams, dembedding)
//     with de = [de1 | de2] (de2 undefined: de = de1; any strides): dembedding = de^T hparams and dhparams =
//     de @ embedding, each skipped when undefined, accumulated in opmath and written in their final shape
//     and dtype (contiguous buffers from P::empty).
//   The hyper op's uses: per-member factors (r_k, s_k, ...) and per-image ones (v_k * e1[n], the scale of
//   its delta branch; delta_bias_k * e2[n]); sums per member (ds, dr, db, dv = sum e1 * S, ...) and per
//   image (de1 = v_k * S, de2 = delta_bias_k * S).
//
// csrc/cuda/rank1_conv.cu instantiates it with its fused CUDA kernels (the ops' CUDA kernels: the pass
// writes (N, C) opmath per-image sums into a scratch buffer from P::empty and one small reduction kernel
// per Sum makes it, deterministically: one thread per output, images in order); csrc/cpu/rank1_conv.cpp
// with its CPU pass (the CPU ops where they run this scheme; the same scratch and reduction, on the
// host); tests/harness/one_conv_harness.cpp with ATen's ops on the CPU, the specification of both, so
// the host logic below (which tensors, which masks, which sums) is tested against the float64 reference
// without a GPU.
#pragma once
#include "rank1_conv.h"

#include <ATen/OpMathType.h>
#include <c10/util/SmallVector.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace hyperkern {
namespace rank1_conv {
namespace one_conv {

// A per-(image, channel) coefficient c[n, ch] = member[n / B, ch] * rows[n, ch]. Either factor may be
// undefined (1); with both undefined the coefficient is absent (scale: 1, shift: 0, weight: 1).
struct Coef {
  at::Tensor member;  // (N / B, C), unit stride along C (unit_inner)
  at::Tensor rows;    // (N, C), unit stride along C (e1, e2 may be column slices of one embedding)
  bool defined() const { return member.defined() || rows.defined(); }
};

// One reduction of a pass's per-image sums (see P::scale_channels above).
struct Sum {
  at::Tensor out;  // (N / group, C), contiguous, in's dtype or its opmath type
  bool of_aux;     // S = sum_p in * aux (else sum_p in)
  int64_t group;   // images per row of out: B (per member) or 1 (per image)
  Coef weight;
};

struct Pass {
  at::Tensor in;   // (N, C, H, W)
  at::Tensor aux;  // like in; needed by the sums of_aux
  at::Tensor out;  // like in, or in itself, or undefined
  Coef scale, shift;
  bool accumulate = false;  // out += in * scale + shift
  c10::SmallVector<Sum, 4> sums;
  int64_t B;  // images per member (the Coefs' member factors)
  bool channels_last;
};

using Grads5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Grads11 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                           at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Host work counts on small layers (each ATen call is a dispatch, and on CUDA often a launch): outside the
// convolutions no ATen call at all on the usual paths; the buffers come from P::empty, the gradients of the
// fast weights, biases and per-image factors from the passes' sums.

// conv(in, weight) over all images at once (cuDNN / oneDNN through ATen), in `fmt`.
inline at::Tensor conv_all(const at::Tensor& in, const at::Tensor& weight, const Geometry& geo, at::MemoryFormat fmt) {
  return at::convolution(in, weight.contiguous(fmt), std::nullopt, geo.stride, geo.padding, geo.dilation, false,
                         {0, 0}, geo.groups)
      .contiguous(fmt);
}

// An activation-sized buffer like x (dtype, device) in `fmt`.
template <class P>
at::Tensor activation(at::IntArrayRef sizes, const at::Tensor& x, at::MemoryFormat fmt) {
  return P::empty(sizes, x, x.scalar_type(), fmt);
}

// A (rows, C) buffer in x's dtype: a Sum's output.
template <class P>
at::Tensor rows_of(int64_t rows, int64_t C, const at::Tensor& x) {
  return P::empty({rows, C}, x, x.scalar_type(), at::MemoryFormat::Contiguous);
}

// fill_unused (rank1_conv.h) with P::empty: the (0,)-shaped outputs an op is not asked for.
template <class P, class... T>
void fill_unused_p(const at::Tensor& x, T&... outputs) {
  ((outputs = outputs.defined() ? outputs : P::empty({0}, x, x.scalar_type(), at::MemoryFormat::Contiguous)), ...);
}

// t itself when its channels (dim 1) have unit stride, else a contiguous copy: what a Coef factor takes.
inline at::Tensor unit_inner(const at::Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous(); }

inline at::Tensor unit_inner_or_undefined(const std::optional<at::Tensor>& t) {
  return defined(t) ? unit_inner(*t) : at::Tensor();
}

// A Sum per member ((E, C), group B) or per image ((N, C), group 1) in x's dtype.
template <class P>
Sum per_member(const at::Tensor& x, const Dims& d, int64_t C, bool of_aux, Coef weight = {}) {
  return {rows_of<P>(d.E, C, x), of_aux, d.B, std::move(weight)};
}
template <class P>
Sum per_image(const at::Tensor& x, const Dims& d, int64_t C, bool of_aux, Coef weight = {}) {
  return {rows_of<P>(d.N, C, x), of_aux, 1, std::move(weight)};
}

// Adds a sum to the pass and returns its output.
inline at::Tensor add_sum(Pass& pass, Sum sum) {
  pass.sums.push_back(std::move(sum));
  return pass.sums.back().out;
}

// Runs the pass unless it has nothing to write.
template <class P>
void run(const Pass& pass) {
  if (pass.out.defined() || !pass.sums.empty()) P::scale_channels(pass);
}

// in * f_k, one pass, into a new buffer in `fmt`.
template <class P>
at::Tensor scaled(const at::Tensor& in, const at::Tensor& f, const Dims& d, at::MemoryFormat fmt) {
  const Pass pass{.in = in, .out = activation<P>(in.sizes(), in, fmt), .scale = {unit_inner(f)}, .B = d.B,
                  .channels_last = fmt == at::MemoryFormat::ChannelsLast};
  P::scale_channels(pass);
  return pass.out;
}

// The input side of one branch y_branch = conv(x * f_k, weight): from gout = dL/dy_branch, one
// convolution backward at input xf = x * f_k (needed only for dW; xc stands in for its shape otherwise)
// gives dW and dxf; one pass turns dxf into dx_branch = dxf * f_k (in place, or added into `into` when
// that is defined: the hyper op's second branch) and sums dxf * x for df_k.
// Returns (dx_branch, dW, df): each undefined where not needed.
template <class P>
std::tuple<at::Tensor, at::Tensor, at::Tensor> branch_backward(const at::Tensor& gout, const at::Tensor& xc,
                                                               const at::Tensor& xf, const at::Tensor& weight,
                                                               const at::Tensor& f, const Geometry& geo,
                                                               const Dims& d, bool need_x, bool need_w, bool need_f,
                                                               const at::Tensor& into) {
  const at::MemoryFormat fmt = activation_format(xc);
  at::Tensor dx_branch, dw, df;
  if (!(need_x || need_w || need_f)) return {dx_branch, dw, df};
  auto [gi, gw, unused] =
      at::convolution_backward(gout, need_w ? xf : xc, weight.contiguous(fmt), at::OptionalIntArrayRef(), geo.stride,
                               geo.padding, geo.dilation, false, {0, 0}, geo.groups, {need_x || need_f, need_w, false});
  if (need_w) dw = gw.contiguous();
  if (need_x || need_f) {
    const at::Tensor dxf = gi.contiguous(fmt);
    const bool accumulate = need_x && into.defined();
    Pass pass{.in = dxf,
              .aux = need_f ? xc : at::Tensor(),
              .out = need_x ? (accumulate ? into : dxf) : at::Tensor(),  // in place: the sums read dxf first
              .scale = {unit_inner(f)},
              .accumulate = accumulate,
              .B = d.B,
              .channels_last = fmt == at::MemoryFormat::ChannelsLast};
    if (need_f) df = add_sum(pass, per_member<P>(xc, d, d.C, true));
    P::scale_channels(pass);
    if (need_x) dx_branch = pass.out;
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
  const at::Tensor pre = conv_all(scaled<P>(x.contiguous(fmt), r, d, fmt), weight, geo, fmt);
  const Pass pass{.in = pre,
                  .out = keep_pre ? activation<P>(pre.sizes(), x, fmt) : pre,
                  .scale = {unit_inner(s)},
                  .shift = {unit_inner_or_undefined(bias)},
                  .B = d.B,
                  .channels_last = fmt == at::MemoryFormat::ChannelsLast};
  P::scale_channels(pass);
  if (keep_pre) return {pass.out, pre};
  at::Tensor none;
  fill_unused_p<P>(x, none);
  return {pass.out, none};
}

// With gc = g * s_k: db_k = sum g, ds_k = sum g * pre (one pass over g), (dxr, dW) = conv backward of gc at
// input xr (one call over all images), dx = dxr * r_k, dr_k = sum dxr * x (one pass over dxr; the sums run
// over member k's images and positions).
// pre absent (undefined or not 4-D): recomputed (one more convolution) when ds is needed.
template <class P>
Grads5 batch_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& r,
                      const at::Tensor& s, const std::optional<at::Tensor>& pre, const Geometry& geo, const Dims& d,
                      std::array<bool, 5> output_mask) {
  const bool need_x = output_mask[0], need_w = output_mask[1], need_r = output_mask[2], need_s = output_mask[3],
             need_b = output_mask[4];
  const bool need_conv = need_x || need_w || need_r;
  const at::MemoryFormat fmt = activation_format(x);
  const auto opts = x.options();
  at::Tensor dx, dw, dr, ds, db;  // undefined until computed; fill_unused_p makes the others empty
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
  if (need_w || (need_s && !have_pre)) xr = scaled<P>(xc, r, d, fmt);
  // the output-scale pass over g: gc = g * s_k (the convolution backward's input), ds_k, db_k
  Pass pass{.in = g,
            .out = need_conv ? activation<P>(g.sizes(), x, fmt) : at::Tensor(),
            .scale = {unit_inner(s)},
            .B = d.B,
            .channels_last = fmt == at::MemoryFormat::ChannelsLast};
  if (need_s) {
    pass.aux = have_pre ? pre->contiguous(fmt) : conv_all(xr, weight, geo, fmt);
    ds = add_sum(pass, per_member<P>(x, d, d.O, true));
  }
  if (need_b) db = add_sum(pass, per_member<P>(x, d, d.O, false));
  run<P>(pass);
  std::tie(dx, dw, dr) = branch_backward<P>(pass.out, xc, xr, weight, r, geo, d, need_x, need_w, need_r, at::Tensor());
  fill_unused_p<P>(x, dx, dw, dr, ds, db);
  return {dx, dw, dr, ds, db};
}

// ---- the hp ops: [e1 | e2] = hparams @ embedding^T inside the op ------------------------------------

// e1 (and e2 when two_parts) of the hp ops, transient (N, O) buffers from P::empty.
template <class P>
std::tuple<at::Tensor, std::optional<at::Tensor>> embed(const at::Tensor& hparams, const at::Tensor& embedding,
                                                        const at::Tensor& x, const Dims& d, bool two_parts) {
  const at::Tensor e1 = P::empty({d.N, d.O}, x, x.scalar_type(), at::MemoryFormat::Contiguous);
  const at::Tensor e2 =
      two_parts ? P::empty({d.N, d.O}, x, x.scalar_type(), at::MemoryFormat::Contiguous) : at::Tensor();
  P::embed(hparams, embedding, e1, e2);
  return {e1, two_parts ? std::optional<at::Tensor>(e2) : std::nullopt};
}

// (dhparams, dembedding) from de1, de2 (de2 undefined without delta_bias), each undefined where not needed.
template <class P>
std::tuple<at::Tensor, at::Tensor> embed_backward(const at::Tensor& de1, const at::Tensor& de2,
                                                  const at::Tensor& hparams, const at::Tensor& embedding,
                                                  const at::Tensor& x, bool need_hparams, bool need_embedding) {
  at::Tensor dhp, demb;
  if (!(need_hparams || need_embedding)) return {dhp, demb};
  if (need_hparams) dhp = P::empty(hparams.sizes(), x, x.scalar_type(), at::MemoryFormat::Contiguous);
  if (need_embedding) demb = P::empty(embedding.sizes(), x, x.scalar_type(), at::MemoryFormat::Contiguous);
  P::embed_backward(de1, de2, hparams, embedding, dhp, demb);
  return {dhp, demb};
}

// The hyper backward's output_mask for the hp backward's mask over (x, weight, delta, r, s, u, v, hparams,
// embedding, bias, delta_bias): de1 (and de2) wherever hparams or embedding need a gradient.
inline std::array<bool, 11> hyper_mask_of_hp(const std::array<bool, 11>& mask, bool has_delta_bias) {
  std::array<bool, 11> m = mask;
  const bool need_e = mask[7] || mask[8];
  m[7] = need_e;
  m[8] = mask[9];
  m[9] = mask[10] && has_delta_bias;
  m[10] = need_e && has_delta_bias;
  return m;
}

// The hp backward's gradients from the hyper backward's (de1, de2 turned into dhparams, dembedding).
template <class P>
Grads11 hp_grads(const Grads11& g, const at::Tensor& hparams, const at::Tensor& embedding, const at::Tensor& x,
                 const std::array<bool, 11>& mask, bool has_delta_bias) {
  auto [dx, dw, ddelta, dr, ds, du, dv, de1, db, ddb, de2] = g;
  auto [dhp, demb] = embed_backward<P>(de1, has_delta_bias ? de2 : at::Tensor(), hparams, embedding, x, mask[7],
                                       mask[8]);
  fill_unused_p<P>(x, dhp, demb);
  return {dx, dw, ddelta, dr, ds, du, dv, dhp, demb, db, ddb};
}

// ---- hyper op: y = s_k * h + e1 * (v_k * hr) + bias_k + delta_bias_k * e2 ------------------------------
// with h = conv(x * r_k, W) and hr = conv(x * u_k, delta) (the delta branch before v_k; the op's
// documented hd = v_k * hr).

// (y, hd, h, hr): hd = v_k * hr when save_hd (the op's documented output), else empty; h and hr when
// keep_branches (what the backward reads), else empty. Two passes: y = h * s_k + bias_k (per member), then
// y += hr * (v_k * e1) + delta_bias_k * e2 (per image).
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
  const at::Tensor h = conv_all(scaled<P>(xc, r, d, fmt), weight, geo, fmt);
  const at::Tensor hr = conv_all(scaled<P>(xc, u, d, fmt), delta, geo, fmt);
  const Pass shared{.in = h,
                    .out = activation<P>(h.sizes(), x, fmt),
                    .scale = {unit_inner(s)},
                    .shift = {unit_inner_or_undefined(bias)},
                    .B = d.B,
                    .channels_last = channels_last};
  P::scale_channels(shared);
  const Pass per_image_terms{.in = hr,
                             .out = shared.out,
                             .scale = {unit_inner(v), unit_inner(e1)},
                             .shift = {unit_inner_or_undefined(delta_bias), unit_inner_or_undefined(e2)},
                             .accumulate = true,
                             .B = d.B,
                             .channels_last = channels_last};
  P::scale_channels(per_image_terms);
  at::Tensor hd, h_kept, hr_kept;
  if (save_hd) hd = scaled<P>(hr, v, d, fmt);
  if (keep_branches) h_kept = h, hr_kept = hr;
  fill_unused_p<P>(x, hd, h_kept, hr_kept);
  return {shared.out, hd, h_kept, hr_kept};
}

// Gradients for (x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2) where output_mask says so, from
// the forward's h and hr (absent: recomputed where needed, one convolution each). One pass over g for each
// branch: gh = g * s_k with ds_k = sum g * h and the bias gradients (db_k = sum g, ddelta_bias_k = sum e2 * g,
// de2 = delta_bias_k * sum_p g); gd = g * (v_k * e1) with de1 = v_k * sum_p g * hr and
// dv_k = sum e1 * (sum_p g * hr). Then one convolution backward per branch and dx = dxr * r_k + dxu * u_k
// (the second branch's pass adds into the first's) with dr_k = sum dxr * x and du_k = sum dxu * x.
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
  const bool need_g_hr = need_e1 || need_v;
  const at::MemoryFormat fmt = activation_format(x);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const auto opts = x.options();
  at::Tensor dx, dw, ddelta, dr, ds, du, dv, de1, db, ddb, de2;  // undefined until computed (fill_unused_p)
  if (d.N == 0) {  // no images: every gradient is zero
    if (need_x) dx = empty_like_format(x.sizes(), x, fmt);
    if (need_w) dw = at::zeros(weight.sizes(), opts);
    if (need_delta) ddelta = at::zeros(delta.sizes(), opts);
    if (need_r) dr = at::zeros({d.E, d.C}, opts);
    if (need_s) ds = at::zeros({d.E, d.O}, opts);
    if (need_u) du = at::zeros({d.E, d.C}, opts);
    if (need_v) dv = at::zeros({d.E, d.O}, opts);
    if (need_e1) de1 = at::zeros({d.N, d.O}, opts);
    std::tie(db, ddb, de2) = hyper_bias_grads(at::zeros({0, d.O}, opts), delta_bias, e2, d, need_b, need_db, need_e2,
                                              x.scalar_type());
    fill_unused(opts, dx, dw, ddelta, dr, ds, du, dv, de1, db, ddb, de2);
    return {dx, dw, ddelta, dr, ds, du, dv, de1, db, ddb, de2};
  }
  const at::Tensor xc = x.contiguous(fmt), g = grad_y.contiguous(fmt);
  const bool have_h = is_kept(h_saved), have_hr = is_kept(hr_saved);
  at::Tensor xr, xu;
  if (need_w || (need_s && !have_h)) xr = scaled<P>(xc, r, d, fmt);
  if (need_delta || (need_g_hr && !have_hr)) xu = scaled<P>(xc, u, d, fmt);

  // the s branch: gh = g * s_k; ds from sum_p g * h, the bias gradients from sum_p g
  Pass s_pass{.in = g,
              .out = need_h_conv ? activation<P>(g.sizes(), x, fmt) : at::Tensor(),
              .scale = {unit_inner(s)},
              .B = d.B,
              .channels_last = channels_last};
  if (need_s) {
    s_pass.aux = have_h ? h_saved->contiguous(fmt) : conv_all(xr, weight, geo, fmt);
    ds = add_sum(s_pass, per_member<P>(x, d, d.O, true));
  }
  if (need_b) db = add_sum(s_pass, per_member<P>(x, d, d.O, false));
  if (need_db) ddb = add_sum(s_pass, per_member<P>(x, d, d.O, false, {at::Tensor(), unit_inner(*e2)}));
  if (need_e2) de2 = add_sum(s_pass, per_image<P>(x, d, d.O, false, {unit_inner(*delta_bias)}));
  run<P>(s_pass);
  // the delta branch, per image: gd = g * (v_k * e1); de1 and dv from sum_p g * hr
  Pass d_pass{.in = g,
              .out = need_d_conv ? activation<P>(g.sizes(), x, fmt) : at::Tensor(),
              .scale = {unit_inner(v), unit_inner(e1)},
              .B = d.B,
              .channels_last = channels_last};
  if (need_g_hr) {
    d_pass.aux = have_hr ? hr_saved->contiguous(fmt) : conv_all(xu, delta, geo, fmt);
    if (need_e1) de1 = add_sum(d_pass, per_image<P>(x, d, d.O, true, {unit_inner(v)}));
    if (need_v) dv = add_sum(d_pass, per_member<P>(x, d, d.O, true, {at::Tensor(), unit_inner(e1)}));
  }
  run<P>(d_pass);

  // one convolution backward per branch; the second branch's input side adds into the first's (dx)
  at::Tensor dxr;
  std::tie(dxr, dw, dr) = branch_backward<P>(s_pass.out, xc, xr, weight, r, geo, d, need_x, need_w, need_r,
                                             at::Tensor());
  std::tie(dx, ddelta, du) = branch_backward<P>(d_pass.out, xc, xu, delta, u, geo, d, need_x, need_delta, need_u, dxr);
  fill_unused_p<P>(x, dx, dw, ddelta, dr, ds, du, dv, de1, db, ddb, de2);
  return {dx, dw, ddelta, dr, ds, du, dv, de1, db, ddb, de2};
}

}  // namespace one_conv
}  // namespace rank1_conv
}  // namespace hyperkern
