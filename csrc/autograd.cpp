// Autograd of the four rank-1 ensemble ops, in C++ and device-agnostic: each forward and backward
// op dispatches to the CPU or CUDA kernel of its inputs. Registered at the Autograd key, these
// replace Python autograd wrappers (torch.library.register_autograd), which cost ~20 us of host time
// per forward+backward (docs/benchmark-history.md) — the time small layers and GPU launches are bound by. The
// fake kernels stay in Python (hyperkern/ops/_cpp_linear.py, _cpp_conv.py). Gradients are first
// order: the backward ops have no autograd of their own.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <initializer_list>
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

// Whether autograd will take a gradient of this call: grad mode on and a (present) input requires grad.
bool taking_grad(std::initializer_list<Tensor> tensors, std::initializer_list<OptTensor> optional) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor& t : tensors) {
    if (t.requires_grad()) return true;
  }
  for (const OptTensor& t : optional) {
    if (present(t) && t->requires_grad()) return true;
  }
  return false;
}

// A tensor a train op kept for the backward: 4-D where the device's backward reads it (CUDA), else an empty
// or absent one (CPU, or a forward without gradients).
OptTensor kept_activation(const variable_list& saved, size_t i) {
  return saved.size() > i && saved[i].defined() && saved[i].dim() == 4 ? OptTensor(saved[i]) : std::nullopt;
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

// The hyper ops save the same tensors (x, weight, delta, r, s, u, v, e1, delta_bias, e2 and the
// Delta-branch output the forward kept) and flags; both backward ops read them back the same way.
// `extra`: more tensors for the backward (the conv train op's branches), saved after `kept` (t[11], ...).
void save_hyper(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& delta, const Tensor& r,
                const Tensor& s, const Tensor& u, const Tensor& v, const Tensor& e1, const OptTensor& bias,
                const OptTensor& delta_bias, const OptTensor& e2, const Tensor& kept,
                const std::vector<Tensor>& extra = {}) {
  variable_list saved{x, weight, delta, r, s, u, v, e1, delta_bias.value_or(Tensor()), e2.value_or(Tensor()), kept};
  saved.insert(saved.end(), extra.begin(), extra.end());
  ctx->save_for_backward(saved);
  ctx->saved_data["has_bias"] = present(bias);
  ctx->saved_data["has_delta_bias"] = present(delta_bias);
  ctx->mark_non_differentiable({kept});
}

struct HyperSaved {
  variable_list t;       // as saved by save_hyper: t[0..7] = x .. e1, t[10] = the kept Delta-branch output
  OptTensor delta_bias, e2;
  bool has_bias;
  std::vector<bool> mask;  // which of the 11 tensor inputs need a gradient
};

HyperSaved load_hyper(AutogradContext* ctx) {
  HyperSaved h;
  h.t = ctx->get_saved_variables();
  h.has_bias = ctx->saved_data["has_bias"].toBool();
  const bool has_delta_bias = ctx->saved_data["has_delta_bias"].toBool();
  h.delta_bias = has_delta_bias ? OptTensor(h.t[8]) : std::nullopt;
  h.e2 = has_delta_bias ? OptTensor(h.t[9]) : std::nullopt;
  h.mask = needs(ctx, {true, true, true, true, true, true, true, true, h.has_bias, has_delta_bias, has_delta_bias});
  return h;
}

// Conv geometry, kept for the backward op.
void save_geometry(AutogradContext* ctx, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                   int64_t groups) {
  ctx->saved_data["stride"] = stride.vec();
  ctx->saved_data["padding"] = padding.vec();
  ctx->saved_data["dilation"] = dilation.vec();
  ctx->saved_data["groups"] = groups;
}

struct SavedGeometry {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;
};

SavedGeometry load_geometry(AutogradContext* ctx) {
  return {ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
          ctx->saved_data["dilation"].toIntVector(), ctx->saved_data["groups"].toInt()};
}

template <size_t N>
std::array<bool, N> as_array(const std::vector<bool>& mask) {
  std::array<bool, N> out{};
  for (size_t i = 0; i < N; ++i) out[i] = mask[i];
  return out;
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
    save_hyper(ctx, x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, delta_out);
    return {y, delta_out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        find_op<Grads11(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                        const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const Tensor&,
                        bool, bool)>("hyperkern::hyper_batch_ensemble_linear_backward");
    check_first_order("hyper_batch_ensemble_linear");
    const HyperSaved h = load_hyper(ctx);
    const variable_list& t = h.t;
    const Grads11 out = op.call(grads[0], t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], h.delta_bias, h.e2, t[10],
                                h.has_bias, h.mask[0]);
    return to_list(out, h.mask, 11);
  }
};

// ---- batch_ensemble_conv2d ------------------------------------------------------------------------

class BatchEnsembleConv2d : public torch::autograd::Function<BatchEnsembleConv2d> {
 public:
  // train: a gradient will be taken (grad mode on and an input requires grad), so the forward runs the
  // train op, which also returns what the device's backward reads (pre); otherwise the plain op.
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& r,
                        const Tensor& s, const OptTensor& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, int64_t groups, bool train) {
    static const auto op =
        find_op<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, at::IntArrayRef,
                       at::IntArrayRef, at::IntArrayRef, int64_t)>("hyperkern::batch_ensemble_conv2d");
    static const auto train_op =
        find_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                           at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t)>(
            "hyperkern::batch_ensemble_conv2d_train");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["has_bias"] = present(bias);
    save_geometry(ctx, stride, padding, dilation, groups);
    if (!train) {
      ctx->save_for_backward({x, weight, r, s, Tensor()});
      return op.call(x, weight, r, s, bias, stride, padding, dilation, groups);
    }
    auto [y, pre] = train_op.call(x, weight, r, s, bias, stride, padding, dilation, groups);
    ctx->save_for_backward({x, weight, r, s, pre});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        find_op<Grads5(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, at::IntArrayRef,
                       at::IntArrayRef, at::IntArrayRef, int64_t, std::array<bool, 5>, const OptTensor&)>(
            "hyperkern::batch_ensemble_conv2d_backward");
    check_first_order("batch_ensemble_conv2d");
    const variable_list saved = ctx->get_saved_variables();
    const std::vector<bool> mask = needs(ctx, {true, true, true, true, ctx->saved_data["has_bias"].toBool()});
    const SavedGeometry g = load_geometry(ctx);
    const Grads5 out = op.call(grads[0], saved[0], saved[1], saved[2], saved[3], g.stride, g.padding, g.dilation,
                               g.groups, as_array<5>(mask), kept_activation(saved, 4));
    return to_list(out, mask, 10);
  }
};

// ---- hyper_batch_ensemble_conv2d: (y, hd); hd = conv(x * u_k, delta) * v_k when save_hd ------------

class HyperBatchEnsembleConv2d : public torch::autograd::Function<HyperBatchEnsembleConv2d> {
 public:
  // train: a gradient will be taken, so the forward runs the train op, which also returns what the
  // device's backward reads (CPU: hd; CUDA: the branches h and hr); otherwise the plain op.
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& delta,
                               const Tensor& r, const Tensor& s, const Tensor& u, const Tensor& v, const Tensor& e1,
                               const OptTensor& bias, const OptTensor& delta_bias, const OptTensor& e2,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups, bool save_hd, bool train) {
    static const auto op = find_op<std::tuple<Tensor, Tensor>(
        const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
        const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, at::IntArrayRef, at::IntArrayRef,
        at::IntArrayRef, int64_t, bool)>("hyperkern::hyper_batch_ensemble_conv2d");
    static const auto train_op = find_op<std::tuple<Tensor, Tensor, Tensor, Tensor>(
        const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
        const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, at::IntArrayRef, at::IntArrayRef,
        at::IntArrayRef, int64_t, bool)>("hyperkern::hyper_batch_ensemble_conv2d_train");
    at::AutoDispatchBelowADInplaceOrView guard;
    save_geometry(ctx, stride, padding, dilation, groups);
    if (!train) {
      auto [y, hd] =
          op.call(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, stride, padding, dilation, groups, save_hd);
      save_hyper(ctx, x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, hd);
      return {y, hd};
    }
    auto [y, hd, h, hr] =
        train_op.call(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, stride, padding, dilation, groups, save_hd);
    save_hyper(ctx, x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, hd, {h, hr});
    return {y, hd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<Grads11(
        const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
        const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const Tensor&, at::IntArrayRef,
        at::IntArrayRef, at::IntArrayRef, int64_t, std::array<bool, 11>, const OptTensor&, const OptTensor&)>(
        "hyperkern::hyper_batch_ensemble_conv2d_backward");
    check_first_order("hyper_batch_ensemble_conv2d");
    const HyperSaved h = load_hyper(ctx);
    const variable_list& t = h.t;
    const SavedGeometry g = load_geometry(ctx);
    const Grads11 out = op.call(grads[0], t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], h.delta_bias, h.e2, t[10],
                                g.stride, g.padding, g.dilation, g.groups, as_array<11>(h.mask), kept_activation(t, 11),
                                kept_activation(t, 12));
    return to_list(out, h.mask, 17);
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
  const bool train = taking_grad({x, weight, r, s}, {bias});
  return BatchEnsembleConv2d::apply(x, weight, r, s, bias, stride, padding, dilation, groups, train);
}

std::tuple<Tensor, Tensor> hyper_batch_ensemble_conv2d_autograd(
    const Tensor& x, const Tensor& weight, const Tensor& delta, const Tensor& r, const Tensor& s, const Tensor& u,
    const Tensor& v, const Tensor& e1, const OptTensor& bias, const OptTensor& delta_bias, const OptTensor& e2,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool save_hd) {
  const bool train = taking_grad({x, weight, delta, r, s, u, v, e1}, {bias, delta_bias, e2});
  const variable_list out = HyperBatchEnsembleConv2d::apply(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2,
                                                            stride, padding, dilation, groups, save_hd, train);
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
