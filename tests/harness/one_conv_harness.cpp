// Test harness: csrc/one_conv.h (the host logic of the CUDA conv kernels) instantiated with ATen's
// ops on the CPU, so tests/test_one_conv_host.py can check it against the float64 reference without a
// GPU. AtenPrims is the specification of the primitive set (one_conv.h's header comment): the CUDA
// kernels of csrc/cuda/rank1_conv.cu and the CPU pass of csrc/cpu/rank1_conv.cpp take the same
// arguments and give the same results.
#include <torch/extension.h>

#include <vector>

#include "one_conv.h"

namespace {

using namespace hyperkern::rank1_conv;
using OptTensor = std::optional<at::Tensor>;

struct AtenPrims {
  static at::Tensor empty(at::IntArrayRef sizes, const at::Tensor& like, at::ScalarType dtype, at::MemoryFormat fmt) {
    return at::empty(sizes, like.options().dtype(dtype).memory_format(fmt));
  }

  // The coefficient c[n, ch] = member[n / B, ch] * rows[n, ch] as an (N, C) tensor in `acc`, or undefined.
  static at::Tensor coef(const one_conv::Coef& c, int64_t B, at::ScalarType acc) {
    at::Tensor out;
    if (c.member.defined()) out = c.member.to(acc).repeat_interleave(B, 0);
    if (c.rows.defined()) out = out.defined() ? out * c.rows.to(acc) : c.rows.to(acc);
    return out;
  }

  static void scale_channels(const one_conv::Pass& p) {
    const int64_t N = p.in.size(0), C = p.in.size(1);
    const at::ScalarType acc = at::toOpMathType(p.in.scalar_type());
    const at::Tensor v = p.in.to(acc);
    // every sum reads `in` (and aux) before out, which may be `in`, is written
    const at::Tensor sum_in = v.sum({2, 3});
    const at::Tensor sum_aux = p.aux.defined() ? (v * p.aux.to(acc)).sum({2, 3}) : at::Tensor();
    for (const one_conv::Sum& s : p.sums) {
      TORCH_CHECK(s.out.size(0) * s.group == N && s.out.size(1) == C, "harness: sum shape");
      at::Tensor per_image = s.of_aux ? sum_aux : sum_in;
      const at::Tensor w = coef(s.weight, p.B, acc);
      if (w.defined()) per_image = per_image * w;
      s.out.copy_(per_image.view({N / s.group, s.group, C}).sum(1));
    }
    if (p.out.defined()) {
      at::Tensor o = v;
      const at::Tensor scale = coef(p.scale, p.B, acc), shift = coef(p.shift, p.B, acc);
      if (scale.defined()) o = o * scale.view({N, C, 1, 1});
      if (shift.defined()) o = o + shift.view({N, C, 1, 1});
      if (p.accumulate) o = o + p.out.to(acc);
      p.out.copy_(o);
    }
  }

  // [e1 | e2] = hparams @ embedding^T (rows [0, O) of embedding give e1, [O, 2*O) e2), in opmath
  static void embed(const at::Tensor& hparams, const at::Tensor& embedding, const at::Tensor& e1,
                    const at::Tensor& e2) {
    const at::ScalarType acc = at::toOpMathType(hparams.scalar_type());
    const int64_t O = e1.size(1);
    const at::Tensor e = at::mm(hparams.to(acc), embedding.to(acc).t());
    e1.copy_(e.narrow(1, 0, O));
    if (e2.defined()) e2.copy_(e.narrow(1, O, O));
  }

  // de = [de1 | de2]: dembedding = de^T hparams, dhparams = de @ embedding, in opmath
  static void embed_backward(const at::Tensor& de1, const at::Tensor& de2, const at::Tensor& hparams,
                             const at::Tensor& embedding, const at::Tensor& dhparams, const at::Tensor& dembedding) {
    const at::ScalarType acc = at::toOpMathType(hparams.scalar_type());
    const at::Tensor de = (de2.defined() ? at::cat({de1, de2}, 1) : de1).to(acc);
    if (dembedding.defined()) dembedding.copy_(at::mm(de.t(), hparams.to(acc)));
    if (dhparams.defined()) dhparams.copy_(at::mm(de, embedding.to(acc)));
  }
};

template <size_t K>
std::array<bool, K> mask_of(const std::vector<bool>& m) {
  TORCH_CHECK(m.size() == K, "mask must have ", K, " entries");
  std::array<bool, K> out{};
  for (size_t i = 0; i < K; ++i) out[i] = m[i];
  return out;
}

std::tuple<at::Tensor, at::Tensor> batch_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& r,
                                                 const at::Tensor& s, const OptTensor& bias,
                                                 std::vector<int64_t> stride, std::vector<int64_t> padding,
                                                 std::vector<int64_t> dilation, int64_t groups, bool keep_pre) {
  const Geometry geo = make_geometry(stride, padding, dilation, groups);
  const Dims d = check_conv(x, w, r, s, geo);
  return one_conv::batch_forward<AtenPrims>(x, w, r, s, bias, geo, d, keep_pre);
}

one_conv::Grads5 batch_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w, const at::Tensor& r,
                                const at::Tensor& s, const OptTensor& pre, std::vector<int64_t> stride,
                                std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
                                const std::vector<bool>& mask) {
  const Geometry geo = make_geometry(stride, padding, dilation, groups);
  const Dims d = check_conv(x, w, r, s, geo);
  return one_conv::batch_backward<AtenPrims>(g, x, w, r, s, pre, geo, d, mask_of<5>(mask));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> hyper_forward(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& delta, const at::Tensor& r, const at::Tensor& s,
    const at::Tensor& u, const at::Tensor& v, const at::Tensor& e1, const OptTensor& bias, const OptTensor& db,
    const OptTensor& e2, std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
    int64_t groups, bool save_hd, bool keep_branches) {
  const Geometry geo = make_geometry(stride, padding, dilation, groups);
  const Dims d = check_conv(x, w, r, s, geo);
  check_hyper(d, x, w, delta, u, v, e1, db, e2);
  return one_conv::hyper_forward<AtenPrims>(x, w, delta, r, s, u, v, e1, bias, db, e2, geo, d, save_hd,
                                            keep_branches);
}

one_conv::Grads11 hyper_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                                 const at::Tensor& delta, const at::Tensor& r, const at::Tensor& s,
                                 const at::Tensor& u, const at::Tensor& v, const at::Tensor& e1, const OptTensor& db,
                                 const OptTensor& e2, const OptTensor& h, const OptTensor& hr,
                                 std::vector<int64_t> stride, std::vector<int64_t> padding,
                                 std::vector<int64_t> dilation, int64_t groups, const std::vector<bool>& mask) {
  const Geometry geo = make_geometry(stride, padding, dilation, groups);
  const Dims d = check_conv(x, w, r, s, geo);
  check_hyper(d, x, w, delta, u, v, e1, db, e2);
  return one_conv::hyper_backward<AtenPrims>(g, x, w, delta, r, s, u, v, e1, db, e2, h, hr, geo, d, mask_of<11>(mask));
}

// The hp ops' host code: e from the embed primitive, then the hyper op's; de1 / de2 into dhparams, dembedding.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> hp_forward(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& delta, const at::Tensor& r, const at::Tensor& s,
    const at::Tensor& u, const at::Tensor& v, const at::Tensor& hparams, const at::Tensor& embedding,
    const OptTensor& bias, const OptTensor& db, std::vector<int64_t> stride, std::vector<int64_t> padding,
    std::vector<int64_t> dilation, int64_t groups, bool keep_branches) {
  const Geometry geo = make_geometry(stride, padding, dilation, groups);
  const Dims d = check_conv(x, w, r, s, geo);
  check_hp(d, x, hparams, embedding, defined(db));
  const auto [e1, e2] = one_conv::embed<AtenPrims>(hparams, embedding, x, d, defined(db));
  check_hyper(d, x, w, delta, u, v, e1, db, e2);
  return one_conv::hyper_forward<AtenPrims>(x, w, delta, r, s, u, v, e1, bias, db, e2, geo, d, false, keep_branches);
}

one_conv::Grads11 hp_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w, const at::Tensor& delta,
                              const at::Tensor& r, const at::Tensor& s, const at::Tensor& u, const at::Tensor& v,
                              const at::Tensor& hparams, const at::Tensor& embedding, const OptTensor& db,
                              const OptTensor& h, const OptTensor& hr, std::vector<int64_t> stride,
                              std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
                              const std::vector<bool>& mask) {
  const Geometry geo = make_geometry(stride, padding, dilation, groups);
  const Dims d = check_conv(x, w, r, s, geo);
  check_hp(d, x, hparams, embedding, defined(db));
  const auto [e1, e2] = one_conv::embed<AtenPrims>(hparams, embedding, x, d, defined(db));
  check_hyper(d, x, w, delta, u, v, e1, db, e2);
  const auto hp_mask = mask_of<11>(mask);
  const one_conv::Grads11 grads = one_conv::hyper_backward<AtenPrims>(
      g, x, w, delta, r, s, u, v, e1, db, e2, h, hr, geo, d, one_conv::hyper_mask_of_hp(hp_mask, defined(db)));
  return one_conv::hp_grads<AtenPrims>(grads, hparams, embedding, x, hp_mask, defined(db));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("batch_forward", &batch_forward);
  m.def("batch_backward", &batch_backward);
  m.def("hyper_forward", &hyper_forward);
  m.def("hyper_backward", &hyper_backward);
  m.def("hp_forward", &hp_forward);
  m.def("hp_backward", &hp_backward);
}
