// Autograd of the four rank-1 ensemble ops, in C++ and device-agnostic: each forward and backward
// op dispatches to the CPU or CUDA kernel of its inputs. Registered at the Autograd key, these
// replace Python autograd wrappers (torch.library.register_autograd), which cost ~20 us of host time
// per forward+backward (docs/benchmark-history.md) — the time small layers and GPU launches are bound by. The
// fake kernels stay in Python (hyperkern/ops/_cpp_linear.py, _cpp_conv.py).
//
// Higher order: each backward calls its backward op through the dispatcher, whose own Autograd kernel
// (csrc/composite.cpp) runs the fused kernel for a first-order backward and a differentiable ATen
// composition when the backward is itself recorded (create_graph=True), so double backward works.
// The conv train ops, which return what a backward keeps, get Autograd kernels here too: their
// outputs' y is differentiable as the plain op's, the kept activations are not.
//
// The conv ops' Autograd kernels take the dispatch key set of their call and reach the kernel below
// autograd (the train op's or the plain op's) with Dispatcher::redispatch on it, as ATen's own autograd
// kernels do: no second dispatch from scratch and no second profiler event (RecordFunction runs on a
// call, not on a redispatch) per layer, so a conv layer's forward is one hyperkern:: event like
// conv2d's one aten:: event. The key set keeps what was above the kernel (Python modes, fake tensors,
// functionalization), so torch.compile and the fake kernels see the same calls as before.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <vector>

#include "autograd_util.h"

namespace hyperkern {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

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

// A tensor a train op kept for the backward: 4-D where the device's backward reads it (CUDA), else an empty
// or absent one (CPU, or a forward without gradients).
OptTensor kept_activation(const variable_list& saved, size_t i) {
  return saved.size() > i && saved[i].defined() && saved[i].dim() == 4 ? OptTensor(saved[i]) : std::nullopt;
}

// no_zero_gradients: the ops with kept, non-differentiable outputs (the hyper ops' delta branch, the conv
// train ops' activations) call ctx->set_materialize_grads(false). Otherwise autograd fills a tensor of
// zeros shaped like each of those outputs on every backward (for the conv train ops activation-sized: an
// allocation and a memset per layer and step, a kernel launch each on CUDA) that the backward never reads.
// Their backward then sees an undefined gradient of y only when y itself is unused, and returns none.

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
// `kept` and `extra` are outputs of the forward too, marked non-differentiable.
void save_hyper(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& delta, const Tensor& r,
                const Tensor& s, const Tensor& u, const Tensor& v, const Tensor& e1, const OptTensor& bias,
                const OptTensor& delta_bias, const OptTensor& e2, const Tensor& kept,
                const std::vector<Tensor>& extra = {}) {
  variable_list saved{x, weight, delta, r, s, u, v, e1, delta_bias.value_or(Tensor()), e2.value_or(Tensor()), kept};
  saved.insert(saved.end(), extra.begin(), extra.end());
  ctx->save_for_backward(saved);
  ctx->saved_data["has_bias"] = present(bias);
  ctx->saved_data["has_delta_bias"] = present(delta_bias);
  variable_list kept_outputs{kept};
  kept_outputs.insert(kept_outputs.end(), extra.begin(), extra.end());
  ctx->mark_non_differentiable(kept_outputs);
  ctx->set_materialize_grads(false);  // see no_zero_gradients
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

// The key set an Autograd kernel's redispatch uses to reach the kernel below autograd (with
// at::AutoDispatchBelowADInplaceOrView held, for what that kernel calls).
c10::DispatchKeySet below_autograd(c10::DispatchKeySet ks) { return ks & c10::after_ADInplaceOrView_keyset; }

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
    if (!grads[0].defined()) return variable_list(11);  // y unused: no gradient flows anywhere
    const HyperSaved h = load_hyper(ctx);
    const variable_list& t = h.t;
    const Grads11 out = op.call(grads[0], t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], h.delta_bias, h.e2, t[10],
                                h.has_bias, h.mask[0]);
    return to_list(out, h.mask, 11);
  }
};

// ---- hyper_batch_ensemble_linear_hp: (y, delta_out); e(lambda) is computed inside the op -------------
// Saves x, the parameters, hparams and embedding (tiny), and delta_out; never e1 / e2 (the backward
// recomputes them per row from hparams).

class HyperBatchEnsembleLinearHp : public torch::autograd::Function<HyperBatchEnsembleLinearHp> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& delta,
                               const Tensor& r, const Tensor& s, const Tensor& u, const Tensor& v,
                               const Tensor& hparams, const Tensor& embedding, const OptTensor& bias,
                               const OptTensor& delta_bias) {
    static const auto op =
        find_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                           const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                           const OptTensor&, const OptTensor&)>(
            "hyperkern::hyper_batch_ensemble_linear_hp");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, delta_out] = op.call(x, weight, delta, r, s, u, v, hparams, embedding, bias, delta_bias);
    ctx->save_for_backward(
        {x, weight, delta, r, s, u, v, hparams, embedding, delta_bias.value_or(Tensor()), delta_out});
    ctx->saved_data["has_bias"] = present(bias);
    ctx->saved_data["has_delta_bias"] = present(delta_bias);
    ctx->mark_non_differentiable({delta_out});
    // delta_out never gets a gradient: without this, autograd would fill an (E*B, out) tensor of zeros
    // for it on every backward (measured: ~3 % of a forward+backward at E=4, B=256, 512 wide).
    ctx->set_materialize_grads(false);
    return {y, delta_out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        find_op<Grads11(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                        const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const Tensor&,
                        bool, bool, bool)>("hyperkern::hyper_batch_ensemble_linear_hp_backward");
    if (!grads[0].defined()) return variable_list(11);  // y unused: no gradient flows anywhere
    const variable_list t = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool has_delta_bias = ctx->saved_data["has_delta_bias"].toBool();
    const OptTensor delta_bias = has_delta_bias ? OptTensor(t[9]) : std::nullopt;
    const std::vector<bool> mask =
        needs(ctx, {true, true, true, true, true, true, true, true, true, has_bias, has_delta_bias});
    const Grads11 out = op.call(grads[0], t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8], delta_bias, t[10],
                                has_bias, mask[0], mask[7]);
    return to_list(out, mask, 11);
  }
};

// ---- batch_ensemble_conv2d ------------------------------------------------------------------------

class BatchEnsembleConv2d : public torch::autograd::Function<BatchEnsembleConv2d> {
 public:
  // train: a gradient will be taken (grad mode on and an input requires grad), so the forward runs the
  // train op, which also returns what the device's backward reads (pre); otherwise the plain op.
  // Returns {y, pre}: pre (non-differentiable) is the train op's, an empty tensor from the plain op.
  // below: the key set to redispatch on (below_autograd of the public op's call).
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& r,
                               const Tensor& s, const OptTensor& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool train,
                               c10::DispatchKeySet below) {
    static const auto op =
        find_op<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, at::IntArrayRef,
                       at::IntArrayRef, at::IntArrayRef, int64_t)>("hyperkern::batch_ensemble_conv2d");
    static const auto train_op =
        find_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                           at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t)>(
            "hyperkern::batch_ensemble_conv2d_train");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["has_bias"] = present(bias);
    ctx->set_materialize_grads(false);  // see no_zero_gradients
    save_geometry(ctx, stride, padding, dilation, groups);
    if (!train) {
      ctx->save_for_backward({x, weight, r, s, Tensor()});
      const Tensor none = at::empty({0}, x.options());
      ctx->mark_non_differentiable({none});
      return {op.redispatch(below, x, weight, r, s, bias, stride, padding, dilation, groups), none};
    }
    auto [y, pre] = train_op.redispatch(below, x, weight, r, s, bias, stride, padding, dilation, groups);
    ctx->save_for_backward({x, weight, r, s, pre});
    ctx->mark_non_differentiable({pre});
    return {y, pre};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        find_op<Grads5(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, at::IntArrayRef,
                       at::IntArrayRef, at::IntArrayRef, int64_t, std::array<bool, 5>, const OptTensor&)>(
            "hyperkern::batch_ensemble_conv2d_backward");
    if (!grads[0].defined()) return variable_list(11);  // y unused: no gradient flows anywhere
    const variable_list saved = ctx->get_saved_variables();
    const std::vector<bool> mask = needs(ctx, {true, true, true, true, ctx->saved_data["has_bias"].toBool()});
    const SavedGeometry g = load_geometry(ctx);
    const Grads5 out = op.call(grads[0], saved[0], saved[1], saved[2], saved[3], g.stride, g.padding, g.dilation,
                               g.groups, as_array<5>(mask), kept_activation(saved, 4));
    return to_list(out, mask, 11);  // 10 arguments and the key set
  }
};

// ---- hyper_batch_ensemble_conv2d: (y, hd); hd = conv(x * u_k, delta) * v_k when save_hd ------------
// (the train op's forward returns (y, hd, h, hr), the kept branches too)

class HyperBatchEnsembleConv2d : public torch::autograd::Function<HyperBatchEnsembleConv2d> {
 public:
  // train: a gradient will be taken, so the forward runs the train op, which also returns what the
  // device's backward reads (CPU: hd; CUDA: the branches h and hr); otherwise the plain op.
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& delta,
                               const Tensor& r, const Tensor& s, const Tensor& u, const Tensor& v, const Tensor& e1,
                               const OptTensor& bias, const OptTensor& delta_bias, const OptTensor& e2,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups, bool save_hd, bool train, c10::DispatchKeySet below) {
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
      auto [y, hd] = op.redispatch(below, x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, stride, padding,
                                   dilation, groups, save_hd);
      save_hyper(ctx, x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, hd);
      return {y, hd};
    }
    auto [y, hd, h, hr] = train_op.redispatch(below, x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, stride,
                                              padding, dilation, groups, save_hd);
    save_hyper(ctx, x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, hd, {h, hr});
    return {y, hd, h, hr};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<Grads11(
        const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
        const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const Tensor&, at::IntArrayRef,
        at::IntArrayRef, at::IntArrayRef, int64_t, std::array<bool, 11>, const OptTensor&, const OptTensor&)>(
        "hyperkern::hyper_batch_ensemble_conv2d_backward");
    if (!grads[0].defined()) return variable_list(18);  // y unused: no gradient flows anywhere
    const HyperSaved h = load_hyper(ctx);
    const variable_list& t = h.t;
    const SavedGeometry g = load_geometry(ctx);
    const Grads11 out = op.call(grads[0], t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], h.delta_bias, h.e2, t[10],
                                g.stride, g.padding, g.dilation, g.groups, as_array<11>(h.mask), kept_activation(t, 11),
                                kept_activation(t, 12));
    return to_list(out, h.mask, 18);  // 17 arguments and the key set
  }
};

// ---- hyper_batch_ensemble_conv2d_hp: the hyper conv op with e(lambda) inside the op ------------------
// As HyperBatchEnsembleConv2d with (hparams, embedding) in place of (e1, e2): saves x, the parameters,
// hparams and embedding (tiny) and what the train op kept; never e1 / e2 (the backward op recomputes them).

class HyperBatchEnsembleConv2dHp : public torch::autograd::Function<HyperBatchEnsembleConv2dHp> {
 public:
  using Forward = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                             const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                             const Tensor&, const OptTensor&, const OptTensor&, at::IntArrayRef,
                                             at::IntArrayRef, at::IntArrayRef, int64_t, bool);
  using TrainForward = std::tuple<Tensor, Tensor, Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
      const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, at::IntArrayRef, at::IntArrayRef,
      at::IntArrayRef, int64_t, bool);

  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& delta,
                               const Tensor& r, const Tensor& s, const Tensor& u, const Tensor& v,
                               const Tensor& hparams, const Tensor& embedding, const OptTensor& bias,
                               const OptTensor& delta_bias, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups, bool save_hd, bool train,
                               c10::DispatchKeySet below) {
    static const auto op = find_op<Forward>("hyperkern::hyper_batch_ensemble_conv2d_hp");
    static const auto train_op = find_op<TrainForward>("hyperkern::hyper_batch_ensemble_conv2d_hp_train");
    at::AutoDispatchBelowADInplaceOrView guard;
    save_geometry(ctx, stride, padding, dilation, groups);
    ctx->saved_data["has_bias"] = present(bias);
    ctx->saved_data["has_delta_bias"] = present(delta_bias);
    ctx->set_materialize_grads(false);  // see no_zero_gradients
    variable_list saved{x, weight, delta, r, s, u, v, hparams, embedding, delta_bias.value_or(Tensor())};
    if (!train) {
      auto [y, hd] = op.redispatch(below, x, weight, delta, r, s, u, v, hparams, embedding, bias, delta_bias, stride,
                                   padding, dilation, groups, save_hd);
      saved.push_back(hd);
      ctx->save_for_backward(saved);
      ctx->mark_non_differentiable({hd});
      return {y, hd};
    }
    auto [y, hd, h, hr] = train_op.redispatch(below, x, weight, delta, r, s, u, v, hparams, embedding, bias,
                                              delta_bias, stride, padding, dilation, groups, save_hd);
    saved.insert(saved.end(), {hd, h, hr});
    ctx->save_for_backward(saved);
    ctx->mark_non_differentiable({hd, h, hr});
    return {y, hd, h, hr};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<Grads11(
        const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
        const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const Tensor&, at::IntArrayRef,
        at::IntArrayRef, at::IntArrayRef, int64_t, std::array<bool, 11>, const OptTensor&, const OptTensor&)>(
        "hyperkern::hyper_batch_ensemble_conv2d_hp_backward");
    if (!grads[0].defined()) return variable_list(18);  // y unused: no gradient flows anywhere
    const variable_list t = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool has_delta_bias = ctx->saved_data["has_delta_bias"].toBool();
    const OptTensor delta_bias = has_delta_bias ? OptTensor(t[9]) : std::nullopt;
    const std::vector<bool> mask =
        needs(ctx, {true, true, true, true, true, true, true, true, true, has_bias, has_delta_bias});
    const SavedGeometry g = load_geometry(ctx);
    const Grads11 out = op.call(grads[0], t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8], delta_bias, t[10],
                                g.stride, g.padding, g.dilation, g.groups, as_array<11>(mask),
                                kept_activation(t, 11), kept_activation(t, 12));
    return to_list(out, mask, 18);  // 17 arguments and the key set
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

std::tuple<Tensor, Tensor> hyper_batch_ensemble_linear_hp_autograd(
    const Tensor& x, const Tensor& weight, const Tensor& delta, const Tensor& r, const Tensor& s, const Tensor& u,
    const Tensor& v, const Tensor& hparams, const Tensor& embedding, const OptTensor& bias,
    const OptTensor& delta_bias) {
  const variable_list out =
      HyperBatchEnsembleLinearHp::apply(x, weight, delta, r, s, u, v, hparams, embedding, bias, delta_bias);
  return {out[0], out[1]};
}

Tensor batch_ensemble_conv2d_autograd(c10::DispatchKeySet ks, const Tensor& x, const Tensor& weight, const Tensor& r,
                                      const Tensor& s, const OptTensor& bias, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const bool train = taking_grad({x, weight, r, s}, {bias});
  return BatchEnsembleConv2d::apply(x, weight, r, s, bias, stride, padding, dilation, groups, train,
                                    below_autograd(ks))[0];
}

// The train op as an op of its own (e.g. under opcheck): with a gradient to take, the autograd function above
// runs it and returns its y differentiable and its pre non-differentiable; otherwise the kernel below autograd.
std::tuple<Tensor, Tensor> batch_ensemble_conv2d_train_autograd(c10::DispatchKeySet ks, const Tensor& x,
                                                                const Tensor& weight, const Tensor& r,
                                                                const Tensor& s, const OptTensor& bias,
                                                                at::IntArrayRef stride, at::IntArrayRef padding,
                                                                at::IntArrayRef dilation, int64_t groups) {
  if (!taking_grad({x, weight, r, s}, {bias})) {
    static const auto train_op =
        find_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                           at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t)>(
            "hyperkern::batch_ensemble_conv2d_train");
    at::AutoDispatchBelowADInplaceOrView guard;
    return train_op.redispatch(below_autograd(ks), x, weight, r, s, bias, stride, padding, dilation, groups);
  }
  const variable_list out =
      BatchEnsembleConv2d::apply(x, weight, r, s, bias, stride, padding, dilation, groups, true, below_autograd(ks));
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor> hyper_batch_ensemble_conv2d_autograd(
    c10::DispatchKeySet ks, const Tensor& x, const Tensor& weight, const Tensor& delta, const Tensor& r, const Tensor& s, const Tensor& u,
    const Tensor& v, const Tensor& e1, const OptTensor& bias, const OptTensor& delta_bias, const OptTensor& e2,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool save_hd) {
  const bool train = taking_grad({x, weight, delta, r, s, u, v, e1}, {bias, delta_bias, e2});
  const variable_list out = HyperBatchEnsembleConv2d::apply(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2,
                                                            stride, padding, dilation, groups, save_hd, train,
                                                            below_autograd(ks));
  return {out[0], out[1]};
}

// The hyper train op as an op of its own: (y, hd, h, hr), y differentiable, the kept tensors not.
std::tuple<Tensor, Tensor, Tensor, Tensor> hyper_batch_ensemble_conv2d_train_autograd(
    c10::DispatchKeySet ks, const Tensor& x, const Tensor& weight, const Tensor& delta, const Tensor& r, const Tensor& s, const Tensor& u,
    const Tensor& v, const Tensor& e1, const OptTensor& bias, const OptTensor& delta_bias, const OptTensor& e2,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool save_hd) {
  if (!taking_grad({x, weight, delta, r, s, u, v, e1}, {bias, delta_bias, e2})) {
    static const auto train_op = find_op<std::tuple<Tensor, Tensor, Tensor, Tensor>(
        const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
        const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, at::IntArrayRef, at::IntArrayRef,
        at::IntArrayRef, int64_t, bool)>("hyperkern::hyper_batch_ensemble_conv2d_train");
    at::AutoDispatchBelowADInplaceOrView guard;
    return train_op.redispatch(below_autograd(ks), x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2, stride,
                               padding, dilation, groups, save_hd);
  }
  const variable_list out = HyperBatchEnsembleConv2d::apply(x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2,
                                                            stride, padding, dilation, groups, save_hd, true,
                                                            below_autograd(ks));
  return {out[0], out[1], out[2], out[3]};
}

std::tuple<Tensor, Tensor> hyper_batch_ensemble_conv2d_hp_autograd(
    c10::DispatchKeySet ks, const Tensor& x, const Tensor& weight, const Tensor& delta, const Tensor& r,
    const Tensor& s, const Tensor& u, const Tensor& v, const Tensor& hparams, const Tensor& embedding,
    const OptTensor& bias, const OptTensor& delta_bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool save_hd) {
  const bool train = taking_grad({x, weight, delta, r, s, u, v, hparams, embedding}, {bias, delta_bias});
  const variable_list out = HyperBatchEnsembleConv2dHp::apply(x, weight, delta, r, s, u, v, hparams, embedding, bias,
                                                              delta_bias, stride, padding, dilation, groups, save_hd,
                                                              train, below_autograd(ks));
  return {out[0], out[1]};
}

// The hp train op as an op of its own: (y, hd, h, hr), y differentiable, the kept tensors not.
std::tuple<Tensor, Tensor, Tensor, Tensor> hyper_batch_ensemble_conv2d_hp_train_autograd(
    c10::DispatchKeySet ks, const Tensor& x, const Tensor& weight, const Tensor& delta, const Tensor& r,
    const Tensor& s, const Tensor& u, const Tensor& v, const Tensor& hparams, const Tensor& embedding,
    const OptTensor& bias, const OptTensor& delta_bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool save_hd) {
  if (!taking_grad({x, weight, delta, r, s, u, v, hparams, embedding}, {bias, delta_bias})) {
    static const auto train_op =
        find_op<HyperBatchEnsembleConv2dHp::TrainForward>("hyperkern::hyper_batch_ensemble_conv2d_hp_train");
    at::AutoDispatchBelowADInplaceOrView guard;
    return train_op.redispatch(below_autograd(ks), x, weight, delta, r, s, u, v, hparams, embedding, bias,
                               delta_bias, stride, padding, dilation, groups, save_hd);
  }
  const variable_list out = HyperBatchEnsembleConv2dHp::apply(x, weight, delta, r, s, u, v, hparams, embedding, bias,
                                                              delta_bias, stride, padding, dilation, groups, save_hd,
                                                              true, below_autograd(ks));
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(hyperkern, Autograd, m) {
  m.impl("batch_ensemble_linear", &batch_ensemble_linear_autograd);
  m.impl("hyper_batch_ensemble_linear", &hyper_batch_ensemble_linear_autograd);
  m.impl("hyper_batch_ensemble_linear_hp", &hyper_batch_ensemble_linear_hp_autograd);
  m.impl("batch_ensemble_conv2d", &batch_ensemble_conv2d_autograd);
  m.impl("hyper_batch_ensemble_conv2d", &hyper_batch_ensemble_conv2d_autograd);
  m.impl("batch_ensemble_conv2d_train", &batch_ensemble_conv2d_train_autograd);
  m.impl("hyper_batch_ensemble_conv2d_train", &hyper_batch_ensemble_conv2d_train_autograd);
  m.impl("hyper_batch_ensemble_conv2d_hp", &hyper_batch_ensemble_conv2d_hp_autograd);
  m.impl("hyper_batch_ensemble_conv2d_hp_train", &hyper_batch_ensemble_conv2d_hp_train_autograd);
}

}  // namespace hyperkern
