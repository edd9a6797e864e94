// Shared by csrc/autograd.cpp and csrc/composite.cpp: what the Autograd-key kernels ask of a call.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <initializer_list>
#include <optional>
#include <tuple>

namespace hyperkern {

using OptTensor = std::optional<at::Tensor>;
// what the batch (x, weight, r, s, bias) and hyper (11 inputs) backward ops return
using Grads5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Grads11 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                           at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The typed handle of a hyperkern:: op (schemas live in csrc/ops.cpp).
template <class Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Whether autograd will record this call: grad mode on and a (present) input requires grad.
inline bool taking_grad(std::initializer_list<at::Tensor> tensors,
                        std::initializer_list<std::optional<at::Tensor>> optional = {}) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor& t : tensors) {
    if (t.defined() && t.requires_grad()) return true;
  }
  for (const std::optional<at::Tensor>& t : optional) {
    if (present(t) && t->requires_grad()) return true;
  }
  return false;
}

}  // namespace hyperkern
