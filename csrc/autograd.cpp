// Autograd of the four rank-1 ensemble ops, in C++ and device-agnostic: each forward and backward
// op dispatches to the CPU or CUDA kernel of its inputs. Registered at the Autograd key, these
// replace Python autograd wrappers (torch.library.register_autograd), which cost ~20 us of host time
// per forward+backward (bench/RESULTS.md) — the time small layers and GPU launches are bound by. The
// fake kernels stay in Python (hyperkern/ops/_cpp_linear.py, _cpp_conv.py). Gradients are first
// order: the backward ops have no autograd of their own.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace hyperkern {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;
using Grads5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using Grads11 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

template <class Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

// The gradients a backward op returns, as the variable_list autograd expects: one entry per forward
// argument, undefined where the input needs none (or is not a tensor).
template <class Tuple, size_t... I>
variable_list to_list(const Tuple& grads, const std::vector<bool>& mask, size_t num_args,
                      std::index_sequence<I...>) {
  variable_list out{(mask[I] ? std::get<I>(grads) : Tensor())...};
  out.resize(num_args);
  return out;
}
template <class Tuple>
variable_list to_list(const Tuple& grads, const std::vector<bool>& mask, size_t num_args) {
  return to_list(grads, mask, num_args, std::make_index_sequence<std::tuple_size_v<Tuple>>{});
}

// The backward ops have no autograd of their own: a backward that records a graph (create_graph=True,
// double backward) gets a clear error instead of a wrong or missing second derivative.
void check_first_order(const char* op) {
  TORCH_CHECK(!at::GradMode::is_enabled(), "hyperkern::", op,
              ": gradients are first order only; double backward (create_graph=True) is not supported");
}

// Which of the forward's first tensor arguments need a gradient. `present` says which of them were
// given (an absent optional tensor has no autograd edge, so the edges count only the present ones).
std::vector<bool> needs(AutogradContext* ctx, const std::vector<bool>& present) {
  std::vector<bool> mask(present.size(), false);
  size_t edge = 0;
  for (size_t i = 0; i < present.size(); ++i) {
    if (present[i]) mask[i] = ctx->needs_input_grad(edge++);
  }
  return mask;
}

// ---- batch_ensemble_linear ------------------------------------------------------------------------

class BatchEnsembleLinear : public torch::autograd::Function<BatchEnsembleLinear> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& r,
                        const Tensor& s, const OptTensor& bias) {
    static const auto op = find_op<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                          const OptTensor&)>("hyperkern::batch_ensemble_linear");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, weight, r, s});
    ctx->saved_data["has_bias"] = present(bias);
    return op.call(x, weight, r, s, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<Grads5(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                          bool, bool)>("hyperkern::batch_ensemble_linear_backward");
    check_first_order("batch_ensemble_linear");
    const variable_list saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const std::vector<bool> mask = needs(ctx, {true, true, true, true, has_bias});
    const Grads5 out = op.call(grads[0], saved[0], saved[1], saved[2], saved[3], has_bias, mask[0]);
    return to_list(out, mask, 5);
  }
};

// ---- hyper_batch_ensemble_linear: (y, delta_out); delta_out is kept for the backward ----------------

class HyperBatchEnsembleLinear : public torch::autograd::Function<HyperBatchEnsembleLinear> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& delta,
                               const Tensor& r, const Tensor& s, const Tensor& u, const Tensor& v, const Tensor& e1,
                               const OptTensor& bias, const OptTensor& delta_bias, const OptTensor& e2) {
    static const auto op =
        find_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                           const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                           const OptTensor&, const OptTensor&)>(
            "hyperkern::hyper_batch_ensemble_linear");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, delta_out] = op.call(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2);
    ctx->save_for_backward({x, weight, delta, r, s, u, v, e1, delta_bias.value_or(Tensor()), e2.value_or(Tensor()),
                            delta_out});
    ctx->saved_data["has_bias"] = present(bias);
    ctx->saved_data["has_delta_bias"] = present(delta_bias);
    ctx->mark_non_differentiable({delta_out});
    return {y, delta_out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        find_op<Grads11(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                        const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const Tensor&,
                        bool, bool)>("hyperkern::hyper_batch_ensemble_linear_backward");
    check_first_order("hyper_batch_ensemble_linear");
    const variable_list saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool has_delta_bias = ctx->saved_data["has_delta_bias"].toBool();
    const std::vector<bool> mask = needs(ctx, {true, true, true, true, true, true, true, true, has_bias,
                                               has_delta_bias, has_delta_bias});
    const OptTensor delta_bias = has_delta_bias ? OptTensor(saved[8]) : std::nullopt;
    const OptTensor e2 = has_delta_bias ? OptTensor(saved[9]) : std::nullopt;
    const Grads11 out = op.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], saved[6],
                                saved[7], delta_bias, e2, saved[10], has_bias, mask[0]);
    return to_list(out, mask, 11);
  }
};

// ---- batch_ensemble_conv2d ------------------------------------------------------------------------

class BatchEnsembleConv2d : public torch::autograd::Function<BatchEnsembleConv2d> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& r,
                        const Tensor& s, const OptTensor& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, int64_t groups) {
    static const auto op =
        find_op<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, at::IntArrayRef,
                       at::IntArrayRef, at::IntArrayRef, int64_t)>("hyperkern::batch_ensemble_conv2d");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, weight, r, s});
    ctx->saved_data["has_bias"] = present(bias);
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    return op.call(x, weight, r, s, bias, stride, padding, dilation, groups);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        find_op<Grads5(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, at::IntArrayRef,
                       at::IntArrayRef, at::IntArrayRef, int64_t, std::array<bool, 5>)>(
            "hyperkern::batch_ensemble_conv2d_backward");
    check_first_order("batch_ensemble_conv2d");
    const variable_list saved = ctx->get_saved_variables();
    const std::vector<bool> mask = needs(ctx, {true, true, true, true, ctx->saved_data["has_bias"].toBool()});
    const Grads5 out = op.call(grads[0], saved[0], saved[1], saved[2], saved[3],
                               ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
                               ctx->saved_data["dilation"].toIntVector(), ctx->saved_data["groups"].toInt(),
                               {mask[0], mask[1], mask[2], mask[3], mask[4]});
    return to_list(out, mask, 9);
  }
};

// ---- hyper_batch_ensemble_conv2d: (y, hd); hd = conv(x * u_k, delta) * v_k when save_hd ------------

class HyperBatchEnsembleConv2d : public torch::autograd::Function<HyperBatchEnsembleConv2d> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& delta,
                               const Tensor& r, const Tensor& s, const Tensor& u, const Tensor& v, const Tensor& e1,
                               const OptTensor& bias, const OptTensor& delta_bias, const OptTensor& e2,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups, bool save_hd) {
    static const auto op = find_op<std::tuple<Tensor, Tensor>(
        const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
        const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, at::IntArrayRef, at::IntArrayRef,
        at::IntArrayRef, int64_t, bool)>("hyperkern::hyper_batch_ensemble_conv2d");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, hd] =
        op.call(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, stride, padding, dilation, groups, save_hd);
    ctx->save_for_backward({x, weight, delta, r, s, u, v, e1, delta_bias.value_or(Tensor()), e2.value_or(Tensor()),
                            hd});
    ctx->saved_data["has_bias"] = present(bias);
    ctx->saved_data["has_delta_bias"] = present(delta_bias);
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    ctx->mark_non_differentiable({hd});
    return {y, hd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<Grads11(
        const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
        const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const Tensor&, at::IntArrayRef,
        at::IntArrayRef, at::IntArrayRef, int64_t, std::array<bool, 11>)>("hyperkern::hyper_batch_ensemble_conv2d_backward");
    check_first_order("hyper_batch_ensemble_conv2d");
    const variable_list saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool has_delta_bias = ctx->saved_data["has_delta_bias"].toBool();
    const std::vector<bool> mask = needs(ctx, {true, true, true, true, true, true, true, true, has_bias,
                                               has_delta_bias, has_delta_bias});
    std::array<bool, 11> output_mask;
    for (size_t i = 0; i < 11; ++i) output_mask[i] = mask[i];
    const OptTensor delta_bias = has_delta_bias ? OptTensor(saved[8]) : std::nullopt;
    const OptTensor e2 = has_delta_bias ? OptTensor(saved[9]) : std::nullopt;
    const Grads11 out = op.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], saved[6],
                                saved[7], delta_bias, e2, saved[10], ctx->saved_data["stride"].toIntVector(),
                                ctx->saved_data["padding"].toIntVector(), ctx->saved_data["dilation"].toIntVector(),
                                ctx->saved_data["groups"].toInt(), output_mask);
    return to_list(out, mask, 16);
  }
};

Tensor batch_ensemble_linear_autograd(const Tensor& x, const Tensor& weight, const Tensor& r, const Tensor& s,
                                      const OptTensor& bias) {
  return BatchEnsembleLinear::apply(x, weight, r, s, bias);
}

std::tuple<Tensor, Tensor> hyper_batch_ensemble_linear_autograd(
    const Tensor& x, const Tensor& weight, const Tensor& delta, const Tensor& r, const Tensor& s, const Tensor& u,
    const Tensor& v, const Tensor& e1, const OptTensor& bias, const OptTensor& delta_bias, const OptTensor& e2) {
  const variable_list out = HyperBatchEnsembleLinear::apply(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2);
  return {out[0], out[1]};
}

Tensor batch_ensemble_conv2d_autograd(const Tensor& x, const Tensor& weight, const Tensor& r, const Tensor& s,
                                      const OptTensor& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                                      at::IntArrayRef dilation, int64_t groups) {
  return BatchEnsembleConv2d::apply(x, weight, r, s, bias, stride, padding, dilation, groups);
}

std::tuple<Tensor, Tensor> hyper_batch_ensemble_conv2d_autograd(
    const Tensor& x, const Tensor& weight, const Tensor& delta, const Tensor& r, const Tensor& s, const Tensor& u,
    const Tensor& v, const Tensor& e1, const OptTensor& bias, const OptTensor& delta_bias, const OptTensor& e2,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool save_hd) {
  const variable_list out = HyperBatchEnsembleConv2d::apply(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2,
                                                            stride, padding, dilation, groups, save_hd);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(hyperkern, Autograd, m) {
  m.impl("batch_ensemble_linear", &batch_ensemble_linear_autograd);
  m.impl("hyper_batch_ensemble_linear", &hyper_batch_ensemble_linear_autograd);
  m.impl("batch_ensemble_conv2d", &batch_ensemble_conv2d_autograd);
  m.impl("hyper_batch_ensemble_conv2d", &hyper_batch_ensemble_conv2d_autograd);
}

}  // namespace hyperkern
