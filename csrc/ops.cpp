// hyperkern._C: where the hyperkern op schemas are defined (the L2 penalty's two: csrc/penalty.cpp).
// Implementations register per dispatch key in csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA);
// fake (meta) kernels are registered from Python (hyperkern/ops/_cpp_*.py), autograd in csrc/autograd.cpp
// (the forward and train ops) and csrc/composite.cpp (the backward ops: differentiable, for double backward).
// Inputs reaching these kernels were validated by hyperkern.ops (shapes, dtypes, devices); the
// kernels only TORCH_CHECK what would otherwise be memory-unsafe.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing hyperkern._C runs the static registrations below; the module itself holds nothing.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(hyperkern, m) {
  // ---- rank-1 linear (csrc/cpu/rank1_linear.cpp, csrc/cuda/rank1_linear.cu) ----
  // Rows of x (and e1, e2, the outputs) are member-major: rows k*B .. (k+1)*B-1 belong to member k.
  // hyper_batch_ensemble_linear also returns delta_out = (x * u_k) @ delta^T, kept for its backward.
  // The backward ops return an empty tensor in place of grad_x when compute_grad_x is false and in
  // place of the bias / delta_bias / e2 gradients when those inputs are absent.
  m.def("batch_ensemble_linear(Tensor x, Tensor weight, Tensor r, Tensor s, Tensor? bias) -> Tensor");
  m.def("batch_ensemble_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor r, Tensor s, "
        "bool has_bias, bool compute_grad_x) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("hyper_batch_ensemble_linear(Tensor x, Tensor weight, Tensor delta, Tensor r, Tensor s, Tensor u, "
        "Tensor v, Tensor e1, Tensor? bias, Tensor? delta_bias, Tensor? e2) -> (Tensor, Tensor)");
  m.def("hyper_batch_ensemble_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor delta, "
        "Tensor r, Tensor s, Tensor u, Tensor v, Tensor e1, Tensor? delta_bias, Tensor? e2, Tensor delta_out, "
        "bool has_bias, bool compute_grad_x) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
        "Tensor, Tensor, Tensor)");
  // hyper_batch_ensemble_linear with e(lambda) inside the op: hparams (E*B, m) are the rows' normalised
  // hyperparameters and embedding the embedding weight, (out, m), or (2*out, m) with delta_bias (rows out ..
  // 2*out-1 give e2): [e1 | e2] = hparams @ embedding^T, never saved (recomputed in the backward).
  // Returns (y, delta_out) like hyper_batch_ensemble_linear.
  m.def("hyper_batch_ensemble_linear_hp(Tensor x, Tensor weight, Tensor delta, Tensor r, Tensor s, Tensor u, "
        "Tensor v, Tensor hparams, Tensor embedding, Tensor? bias, Tensor? delta_bias) -> (Tensor, Tensor)");
  // Gradients for (x, weight, delta, r, s, u, v, hparams, embedding, bias, delta_bias); empty tensors for
  // grad_x (compute_grad_x false), grad_hparams (compute_grad_hparams false), bias / delta_bias (absent).
  m.def("hyper_batch_ensemble_linear_hp_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor delta, "
        "Tensor r, Tensor s, Tensor u, Tensor v, Tensor hparams, Tensor embedding, Tensor? delta_bias, "
        "Tensor delta_out, bool has_bias, bool compute_grad_x, bool compute_grad_hparams) -> (Tensor, Tensor, "
        "Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // ---- rank-1 conv2d (csrc/cpu/rank1_conv.cpp, csrc/cuda/rank1_conv.cu) ----
  // x (E*B, C, H, W) member-major, NCHW or channels-last (outputs follow x's format); weight, delta
  // (O, C/groups, kh, kw); r, u (E, C); s, v, bias, delta_bias (E, O); e1, e2 (E*B, O).
  m.def("batch_ensemble_conv2d(Tensor x, Tensor weight, Tensor r, Tensor s, Tensor? bias, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups) -> Tensor");
  // The forward as autograd runs it: (y, pre) with pre = conv(x * r_k, weight), the unscaled convolution,
  // where the device's backward reads it (CUDA: ds without a second convolution), else an empty tensor.
  m.def("batch_ensemble_conv2d_train(Tensor x, Tensor weight, Tensor r, Tensor s, Tensor? bias, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups) -> (Tensor, Tensor)");
  // Gradients for (x, weight, r, s, bias) where output_mask is true, else empty tensors. pre: the
  // train op's (absent or empty: recomputed where the device needs it).
  m.def("batch_ensemble_conv2d_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor r, Tensor s, "
        "int[2] stride, int[2] padding, int[2] dilation, int groups, bool[5] output_mask, Tensor? pre=None) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Returns (y, hd) with hd = conv(x * u_k, delta) * v_k when save_hd, else empty. Under autograd the
  // forward is the train op below, whose hd is empty on CUDA (that backward keeps the branches instead).
  m.def("hyper_batch_ensemble_conv2d(Tensor x, Tensor weight, Tensor delta, Tensor r, Tensor s, Tensor u, "
        "Tensor v, Tensor e1, Tensor? bias, Tensor? delta_bias, Tensor? e2, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups, bool save_hd) -> (Tensor, Tensor)");
  // The forward as autograd runs it: (y, hd, h, hr), each kept where the device's backward reads it, else
  // empty: the CPU keeps hd (when save_hd); CUDA keeps h = conv(x * r_k, weight) and
  // hr = conv(x * u_k, delta), the two branches before s_k and v_k.
  m.def("hyper_batch_ensemble_conv2d_train(Tensor x, Tensor weight, Tensor delta, Tensor r, Tensor s, Tensor u, "
        "Tensor v, Tensor e1, Tensor? bias, Tensor? delta_bias, Tensor? e2, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups, bool save_hd) -> (Tensor, Tensor, Tensor, Tensor)");
  // Gradients for (x, weight, delta, r, s, u, v, e1, bias, delta_bias, e2) where output_mask is true,
  // else empty tensors; hd, h, hr are the forward's (empty or absent: recomputed where the device needs them).
  m.def("hyper_batch_ensemble_conv2d_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor delta, Tensor r, "
        "Tensor s, Tensor u, Tensor v, Tensor e1, Tensor? delta_bias, Tensor? e2, Tensor hd, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups, bool[11] output_mask, Tensor? h=None, Tensor? hr=None) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // hyper_batch_ensemble_conv2d with e(lambda) inside the op, as hyper_batch_ensemble_linear_hp: hparams
  // (E*B, m) per image, embedding (O, m), or (2*O, m) with delta_bias (rows O .. 2*O-1 give e2):
  // [e1 | e2] = hparams @ embedding^T, a transient (E*B, O) buffer per part, never saved (the backward
  // recomputes it). Outputs as hyper_batch_ensemble_conv2d's and its train op's.
  m.def("hyper_batch_ensemble_conv2d_hp(Tensor x, Tensor weight, Tensor delta, Tensor r, Tensor s, Tensor u, "
        "Tensor v, Tensor hparams, Tensor embedding, Tensor? bias, Tensor? delta_bias, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups, bool save_hd) -> (Tensor, Tensor)");
  m.def("hyper_batch_ensemble_conv2d_hp_train(Tensor x, Tensor weight, Tensor delta, Tensor r, Tensor s, "
        "Tensor u, Tensor v, Tensor hparams, Tensor embedding, Tensor? bias, Tensor? delta_bias, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups, bool save_hd) -> (Tensor, Tensor, Tensor, Tensor)");
  // Gradients for (x, weight, delta, r, s, u, v, hparams, embedding, bias, delta_bias) where output_mask is
  // true (delta_bias's only when present), else empty tensors.
  m.def("hyper_batch_ensemble_conv2d_hp_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor delta, Tensor r, "
        "Tensor s, Tensor u, Tensor v, Tensor hparams, Tensor embedding, Tensor? delta_bias, Tensor hd, "
        "int[2] stride, int[2] padding, int[2] dilation, int groups, bool[11] output_mask, Tensor? h=None, "
        "Tensor? hr=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
        "Tensor)");
}
