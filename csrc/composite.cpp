// The backward ops of the rank-1 ensemble ops, made differentiable: their Autograd-key kernels.
//
// A backward op called with nothing to differentiate (grad mode off, as autograd runs a first-order
// backward, or no input requiring grad) runs its fused kernel. Called while autograd records (a
// backward with create_graph=True, i.e. double backward for gradient penalties or Hessian-vector
// products; or a direct call with inputs that require grad), it computes the same gradients as a
// composition of differentiable ATen ops instead, so the graph of the gradients is recorded and can
// be differentiated again, to any order. The kept activations (delta_out, hd, pre, h, hr) are not
// read there: the composition recomputes what it needs from the inputs.
//
// One composition serves all four ops: a linear layer is a 1x1 convolution of 1x1 images. For member
// k (rows k*B .. (k+1)*B-1), with x_r = x * r_k, x_u = x * u_k (per input channel) and * per output
// channel elsewhere:
//   y    = s_k * conv(x_r, W) + (v_k * e1) * conv(x_u, D) + bias_k + delta_bias_k * e2
//   dx   = r_k * conv_input_grad(g * s_k, W) + u_k * conv_input_grad(g * v_k * e1, D)
//   dW   = conv_weight_grad(g * s_k, x_r),       dD = conv_weight_grad(g * v_k * e1, x_u)
//   dr_k = sum over k's rows and pixels of x * conv_input_grad(g * s_k, W)      (du_k alike with D)
//   ds_k = sum g * conv(x_r, W),  dv_k = sum g * e1 * conv(x_u, D),  de1 = sum_pixels g * v_k * conv(x_u, D)
//   dbias_k = sum g,  ddelta_bias_k = sum g * e2,  de2 = delta_bias_k * sum_pixels g
// at::convolution_backward is itself differentiable (its derivative is _convolution_double_backward).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "autograd_util.h"

namespace hyperkern {
namespace {

using at::Tensor;

struct Geometry {
  std::vector<int64_t> stride{1, 1}, padding{0, 0}, dilation{1, 1};
  int64_t groups = 1;
};

// The hyper op's extra inputs (all absent for the batch ops).
struct HyperInputs {
  OptTensor delta, u, v, e1, delta_bias, e2;
};

// Indices into the gradients, in the hyper ops' argument order.
enum Grad : int { kX = 0, kW, kDelta, kR, kS, kU, kV, kE1, kBias, kDeltaBias, kE2, kNumGrads };

// Gradients of y (4-D activations) with respect to every input need[] asks for, undefined elsewhere.
std::array<Tensor, kNumGrads> composite_grads(const Tensor& g, const Tensor& x, const Tensor& w, const Tensor& r,
                                              const Tensor& s, const HyperInputs& hyper, const Geometry& geo,
                                              const std::array<bool, kNumGrads>& need) {
  // A raw call with inconsistent shapes must raise, never crash: the divisions below need these; the
  // ATen ops raise for every other mismatch.
  TORCH_CHECK(x.dim() == 4 && g.dim() == 4, "hyperkern backward: x and the output gradient must be ",
              "(E*B, C) or (E*B, C, H, W), got ", x.sizes(), " and ", g.sizes());
  TORCH_CHECK(r.dim() == 2 && s.dim() == 2 && r.size(0) >= 1 && s.size(0) == r.size(0),
              "hyperkern backward: r and s must be (E, C_in) and (E, C_out) with E >= 1, got ", r.sizes(), " and ",
              s.sizes());
  TORCH_CHECK(x.size(0) % r.size(0) == 0 && g.size(0) == x.size(0), "hyperkern backward: x has ", x.size(0),
              " rows and the output gradient ", g.size(0), "; both must be E*B with E = r.size(0) = ", r.size(0));
  const int64_t N = x.size(0), E = r.size(0), B = N / E;
  // (E, C) per-member vectors as (N, C) per-row values, and per-row values summed per member.
  auto per_row = [&](const Tensor& t) { return t.unsqueeze(1).expand({E, B, t.size(1)}).reshape({N, t.size(1)}); };
  auto channels = [](const Tensor& t) { return t.unsqueeze(-1).unsqueeze(-1); };  // (N, C) -> (N, C, 1, 1)
  auto pixel_sum = [](const Tensor& t) { return t.sum(at::IntArrayRef{2, 3}); };
  auto member_sum = [&](const Tensor& rows) { return rows.reshape({E, B, rows.size(1)}).sum(1); };
  auto conv = [&](const Tensor& in, const Tensor& weight) {
    return at::convolution(in, weight, std::nullopt, geo.stride, geo.padding, geo.dilation, false, {0, 0},
                           geo.groups);
  };
  auto conv_backward = [&](const Tensor& grad, const Tensor& in, const Tensor& weight, bool need_in,
                           bool need_w) -> std::tuple<Tensor, Tensor> {
    if (!need_in && !need_w) return {};
    auto [gi, gw, gb] = at::convolution_backward(grad, in, weight, std::nullopt, geo.stride, geo.padding,
                                                 geo.dilation, false, {0, 0}, geo.groups, {need_in, need_w, false});
    return {gi, gw};
  };

  std::array<Tensor, kNumGrads> out;
  const Tensor R = channels(per_row(r));
  const Tensor xr = x * R;
  auto [dxr, dw] = conv_backward(g * channels(per_row(s)), xr, w, need[kX] || need[kR], need[kW]);
  if (need[kX]) out[kX] = dxr * R;
  out[kW] = dw;
  if (need[kR]) out[kR] = member_sum(pixel_sum(dxr * x));
  if (need[kS]) out[kS] = member_sum(pixel_sum(g * conv(xr, w)));
  if (need[kBias]) out[kBias] = member_sum(pixel_sum(g));
  if (!present(hyper.delta)) return out;

  const Tensor U = channels(per_row(*hyper.u)), V = channels(per_row(*hyper.v)), E1 = channels(*hyper.e1);
  const Tensor xu = x * U;
  auto [dxu, dd] = conv_backward(g * V * E1, xu, *hyper.delta, need[kX] || need[kU], need[kDelta]);
  if (need[kX]) out[kX] = out[kX] + dxu * U;
  out[kDelta] = dd;
  if (need[kU]) out[kU] = member_sum(pixel_sum(dxu * x));
  if (need[kV] || need[kE1]) {
    const Tensor hd = conv(xu, *hyper.delta);
    if (need[kV]) out[kV] = member_sum(pixel_sum(g * E1 * hd));
    if (need[kE1]) out[kE1] = pixel_sum(g * V * hd);
  }
  if (present(hyper.delta_bias)) {
    if (need[kDeltaBias]) out[kDeltaBias] = member_sum(pixel_sum(g * channels(*hyper.e2)));
    if (need[kE2]) out[kE2] = pixel_sum(g) * per_row(*hyper.delta_bias);
  }
  return out;
}

// A linear layer as a 1x1 convolution: (N, C) -> (N, C, 1, 1) and back.
Tensor as_image(const Tensor& t) { return t.unsqueeze(-1).unsqueeze(-1); }
Tensor as_rows(const Tensor& t) { return t.flatten(1); }
Tensor empty_like_flag(const Tensor& like) { return like.new_empty({0}); }

// What a fused kernel returns for a gradient it was not asked for.
Tensor or_empty(const Tensor& grad, bool wanted, const Tensor& like) { return wanted ? grad : empty_like_flag(like); }

// ---- batch_ensemble_linear_backward ---------------------------------------------------------------

Grads5 batch_ensemble_linear_backward_autograd(const Tensor& g, const Tensor& x, const Tensor& w, const Tensor& r,
                                               const Tensor& s, bool has_bias, bool compute_grad_x) {
  if (!taking_grad({g, x, w, r, s})) {
    static const auto op = find_op<Grads5(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                          bool, bool)>("hyperkern::batch_ensemble_linear_backward");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(g, x, w, r, s, has_bias, compute_grad_x);
  }
  std::array<bool, kNumGrads> need{};
  need[kX] = compute_grad_x;
  need[kW] = need[kR] = need[kS] = true;
  need[kBias] = has_bias;
  const auto d = composite_grads(as_image(g), as_image(x), as_image(w), r, s, {}, {}, need);
  return {compute_grad_x ? as_rows(d[kX]) : empty_like_flag(x), as_rows(d[kW]), d[kR], d[kS],
          or_empty(d[kBias], has_bias, s)};
}


// The hyper linear ops' differentiable composition (rows as 1x1 images): every gradient composite_grads
// gives, x's only when compute_grad_x, the biases' only when present.
std::array<Tensor, kNumGrads> hyper_linear_composite(const Tensor& g, const Tensor& x, const Tensor& w,
                                                     const Tensor& delta, const Tensor& r, const Tensor& s,
                                                     const Tensor& u, const Tensor& v, const Tensor& e1,
                                                     const OptTensor& delta_bias, const OptTensor& e2, bool has_bias,
                                                     bool compute_grad_x) {
  std::array<bool, kNumGrads> need;
  need.fill(true);
  need[kX] = compute_grad_x;
  need[kBias] = has_bias;
  need[kDeltaBias] = need[kE2] = present(delta_bias);
  return composite_grads(as_image(g), as_image(x), as_image(w), r, s, {as_image(delta), u, v, e1, delta_bias, e2}, {},
                         need);
}
// ---- hyper_batch_ensemble_linear_backward ---------------------------------------------------------

Grads11 hyper_batch_ensemble_linear_backward_autograd(const Tensor& g, const Tensor& x, const Tensor& w,
                                                      const Tensor& delta, const Tensor& r, const Tensor& s,
                                                      const Tensor& u, const Tensor& v, const Tensor& e1,
                                                      const OptTensor& delta_bias, const OptTensor& e2,
                                                      const Tensor& delta_out, bool has_bias, bool compute_grad_x) {
  if (!taking_grad({g, x, w, delta, r, s, u, v, e1}, {delta_bias, e2})) {
    static const auto op =
        find_op<Grads11(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                        const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const Tensor&,
                        bool, bool)>("hyperkern::hyper_batch_ensemble_linear_backward");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(g, x, w, delta, r, s, u, v, e1, delta_bias, e2, delta_out, has_bias, compute_grad_x);
  }
  const bool has_delta_bias = present(delta_bias);
  const auto d = hyper_linear_composite(g, x, w, delta, r, s, u, v, e1, delta_bias, e2, has_bias, compute_grad_x);
  return {compute_grad_x ? as_rows(d[kX]) : empty_like_flag(x),
          as_rows(d[kW]),
          as_rows(d[kDelta]),
          d[kR],
          d[kS],
          d[kU],
          d[kV],
          d[kE1],
          or_empty(d[kBias], has_bias, s),
          or_empty(d[kDeltaBias], has_delta_bias, s),
          or_empty(d[kE2], has_delta_bias, e1)};
}

// The hp backward compositions' embeddings, differentiable: [e1 | e2] = hparams @ embedding^T (e2 only
// with delta_bias), after checking hparams (E*B, m) and embedding (out, m) or (2*out, m) against x and
// the weight w (weight_dim-D, out = w.size(0): features or channels).
std::pair<Tensor, OptTensor> embed_rows(const Tensor& x, const Tensor& w, int64_t weight_dim, const Tensor& hparams,
                                        const Tensor& embedding, bool has_delta_bias) {
  TORCH_CHECK(w.dim() == weight_dim && hparams.dim() == 2 && embedding.dim() == 2 && hparams.size(0) == x.size(0) &&
                  embedding.size(1) == hparams.size(1) && embedding.size(0) == (has_delta_bias ? 2 : 1) * w.size(0),
              "hyperkern backward: hparams must be (E*B, m) and embedding (out, m), or (2*out, m) with delta_bias; got "
              "hparams ", hparams.sizes(), ", embedding ", embedding.sizes(), " for weight ", w.sizes());
  const int64_t out = w.size(0);
  const Tensor e = at::mm(hparams, embedding.t());
  OptTensor e2;
  if (has_delta_bias) e2 = e.narrow(1, out, out);
  return {e.narrow(1, 0, out), e2};
}

// [de1 | de2] (E*B, out or 2*out) from a composition's gradients: what d(hparams) = de @ embedding and
// d(embedding) = de^T hparams reduce.
template <class Grads>
Tensor joined_de(const Grads& d, bool has_delta_bias) {
  return has_delta_bias ? at::cat({d[kE1], d[kE2]}, 1) : d[kE1];
}

// ---- hyper_batch_ensemble_linear_hp_backward ------------------------------------------------------
// The composition recomputes [e1 | e2] = hparams @ embedding^T (differentiably), takes the hyper op's
// gradients for e1, e2, and chains them: d(embedding) = [de1 | de2]^T hparams, d(hparams) = [de1 | de2] @ embedding.

Grads11 hyper_batch_ensemble_linear_hp_backward_autograd(const Tensor& g, const Tensor& x, const Tensor& w,
                                                         const Tensor& delta, const Tensor& r, const Tensor& s,
                                                         const Tensor& u, const Tensor& v, const Tensor& hparams,
                                                         const Tensor& embedding, const OptTensor& delta_bias,
                                                         const Tensor& delta_out, bool has_bias, bool compute_grad_x,
                                                         bool compute_grad_hparams) {
  if (!taking_grad({g, x, w, delta, r, s, u, v, hparams, embedding}, {delta_bias})) {
    static const auto op =
        find_op<Grads11(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                        const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const Tensor&,
                        bool, bool, bool)>("hyperkern::hyper_batch_ensemble_linear_hp_backward");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(g, x, w, delta, r, s, u, v, hparams, embedding, delta_bias, delta_out, has_bias, compute_grad_x,
                   compute_grad_hparams);
  }
  const bool has_delta_bias = present(delta_bias);
  const auto [e1, e2] = embed_rows(x, w, 2, hparams, embedding, has_delta_bias);
  const auto d = hyper_linear_composite(g, x, w, delta, r, s, u, v, e1, delta_bias, e2, has_bias, compute_grad_x);
  const Tensor de = joined_de(d, has_delta_bias);
  return {compute_grad_x ? as_rows(d[kX]) : empty_like_flag(x),
          as_rows(d[kW]),
          as_rows(d[kDelta]),
          d[kR],
          d[kS],
          d[kU],
          d[kV],
          compute_grad_hparams ? at::mm(de, embedding) : empty_like_flag(hparams),
          at::mm(de.t(), hparams),
          or_empty(d[kBias], has_bias, s),
          or_empty(d[kDeltaBias], has_delta_bias, s)};
}

// ---- batch_ensemble_conv2d_backward ---------------------------------------------------------------

Grads5 batch_ensemble_conv2d_backward_autograd(const Tensor& g, const Tensor& x, const Tensor& w, const Tensor& r,
                                               const Tensor& s, at::IntArrayRef stride, at::IntArrayRef padding,
                                               at::IntArrayRef dilation, int64_t groups, std::array<bool, 5> mask,
                                               const OptTensor& pre) {
  if (!taking_grad({g, x, w, r, s})) {
    static const auto op =
        find_op<Grads5(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, at::IntArrayRef,
                       at::IntArrayRef, at::IntArrayRef, int64_t, std::array<bool, 5>, const OptTensor&)>(
            "hyperkern::batch_ensemble_conv2d_backward");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(g, x, w, r, s, stride, padding, dilation, groups, mask, pre);
  }
  std::array<bool, kNumGrads> need{};
  need[kX] = mask[0];
  need[kW] = mask[1];
  need[kR] = mask[2];
  need[kS] = mask[3];
  need[kBias] = mask[4];
  const Geometry geo{stride.vec(), padding.vec(), dilation.vec(), groups};
  const auto d = composite_grads(g, x, w, r, s, {}, geo, need);
  return {or_empty(d[kX], mask[0], x), or_empty(d[kW], mask[1], x), or_empty(d[kR], mask[2], x),
          or_empty(d[kS], mask[3], x), or_empty(d[kBias], mask[4], x)};
}

// ---- hyper_batch_ensemble_conv2d_backward ---------------------------------------------------------

Grads11 hyper_batch_ensemble_conv2d_backward_autograd(
    const Tensor& g, const Tensor& x, const Tensor& w, const Tensor& delta, const Tensor& r, const Tensor& s,
    const Tensor& u, const Tensor& v, const Tensor& e1, const OptTensor& delta_bias, const OptTensor& e2,
    const Tensor& hd, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 11> mask, const OptTensor& h, const OptTensor& hr) {
  if (!taking_grad({g, x, w, delta, r, s, u, v, e1}, {delta_bias, e2})) {
    static const auto op = find_op<Grads11(
        const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
        const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const Tensor&, at::IntArrayRef,
        at::IntArrayRef, at::IntArrayRef, int64_t, std::array<bool, 11>, const OptTensor&, const OptTensor&)>(
        "hyperkern::hyper_batch_ensemble_conv2d_backward");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(g, x, w, delta, r, s, u, v, e1, delta_bias, e2, hd, stride, padding, dilation, groups, mask, h, hr);
  }
  const bool has_delta_bias = present(delta_bias);
  std::array<bool, kNumGrads> need;
  for (int i = 0; i < kNumGrads; ++i) need[i] = mask[i] && (i < kDeltaBias || has_delta_bias);
  const Geometry geo{stride.vec(), padding.vec(), dilation.vec(), groups};
  const auto d = composite_grads(g, x, w, r, s, {delta, u, v, e1, delta_bias, e2}, geo, need);
  return {or_empty(d[kX], need[kX], x),     or_empty(d[kW], need[kW], x),
          or_empty(d[kDelta], need[kDelta], x), or_empty(d[kR], need[kR], x),
          or_empty(d[kS], need[kS], x),     or_empty(d[kU], need[kU], x),
          or_empty(d[kV], need[kV], x),     or_empty(d[kE1], need[kE1], x),
          or_empty(d[kBias], need[kBias], x), or_empty(d[kDeltaBias], need[kDeltaBias], x),
          or_empty(d[kE2], need[kE2], x)};
}

// ---- hyper_batch_ensemble_conv2d_hp_backward -----------------------------------------------------
// As the linear hp op's: recomputes [e1 | e2] = hparams @ embedding^T differentiably, takes the hyper
// composition's de1, de2 and chains them into d(hparams) = de @ embedding, d(embedding) = de^T hparams.

Grads11 hyper_batch_ensemble_conv2d_hp_backward_autograd(
    const Tensor& g, const Tensor& x, const Tensor& w, const Tensor& delta, const Tensor& r, const Tensor& s,
    const Tensor& u, const Tensor& v, const Tensor& hparams, const Tensor& embedding, const OptTensor& delta_bias,
    const Tensor& hd, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 11> mask, const OptTensor& h, const OptTensor& hr) {
  if (!taking_grad({g, x, w, delta, r, s, u, v, hparams, embedding}, {delta_bias})) {
    static const auto op = find_op<Grads11(
        const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
        const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const Tensor&, at::IntArrayRef,
        at::IntArrayRef, at::IntArrayRef, int64_t, std::array<bool, 11>, const OptTensor&, const OptTensor&)>(
        "hyperkern::hyper_batch_ensemble_conv2d_hp_backward");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(g, x, w, delta, r, s, u, v, hparams, embedding, delta_bias, hd, stride, padding, dilation, groups,
                   mask, h, hr);
  }
  const bool has_delta_bias = present(delta_bias);
  const auto [e1, e2] = embed_rows(x, w, 4, hparams, embedding, has_delta_bias);
  const bool need_e = mask[7] || mask[8];
  std::array<bool, kNumGrads> need{};
  for (int i = 0; i < kE1; ++i) need[i] = mask[i];
  need[kE1] = need_e;
  need[kBias] = mask[9];
  need[kDeltaBias] = mask[10] && has_delta_bias;
  need[kE2] = need_e && has_delta_bias;
  const Geometry geo{stride.vec(), padding.vec(), dilation.vec(), groups};
  const auto d = composite_grads(g, x, w, r, s, {delta, u, v, e1, delta_bias, e2}, geo, need);
  Tensor dhp, demb;
  if (need_e) {
    const Tensor de = joined_de(d, has_delta_bias);
    if (mask[7]) dhp = at::mm(de, embedding);
    if (mask[8]) demb = at::mm(de.t(), hparams);
  }
  return {or_empty(d[kX], need[kX], x),     or_empty(d[kW], need[kW], x),
          or_empty(d[kDelta], need[kDelta], x), or_empty(d[kR], need[kR], x),
          or_empty(d[kS], need[kS], x),     or_empty(d[kU], need[kU], x),
          or_empty(d[kV], need[kV], x),     or_empty(dhp, mask[7], x),
          or_empty(demb, mask[8], x),       or_empty(d[kBias], need[kBias], x),
          or_empty(d[kDeltaBias], need[kDeltaBias], x)};
}

}  // namespace

TORCH_LIBRARY_IMPL(hyperkern, Autograd, m) {
  m.impl("batch_ensemble_linear_backward", &batch_ensemble_linear_backward_autograd);
  m.impl("hyper_batch_ensemble_linear_backward", &hyper_batch_ensemble_linear_backward_autograd);
  m.impl("hyper_batch_ensemble_linear_hp_backward", &hyper_batch_ensemble_linear_hp_backward_autograd);
  m.impl("batch_ensemble_conv2d_backward", &batch_ensemble_conv2d_backward_autograd);
  m.impl("hyper_batch_ensemble_conv2d_backward", &hyper_batch_ensemble_conv2d_backward_autograd);
  m.impl("hyper_batch_ensemble_conv2d_hp_backward", &hyper_batch_ensemble_conv2d_hp_backward_autograd);
}

}  // namespace hyperkern
