// Test harness: csrc/one_conv.h (the host logic of the CUDA conv kernels) instantiated with ATen's
// elementwise ops on the CPU, so tests/test_one_conv_host.py can check it against the float64
// reference without a GPU. AtenPrims::scale_channels is the specification of the CUDA kernel
// scale_channels (csrc/cuda/rank1_conv.cu): same arguments, same results.
#include <torch/extension.h>

#include <vector>

#include "one_conv.h"

namespace {

using namespace hyperkern::rank1_conv;
using OptTensor = std::optional<at::Tensor>;

struct AtenPrims {
  static void scale_channels(const at::Tensor& in, const at::Tensor& f, const OptTensor& add, const at::Tensor& aux,
                             const at::Tensor& out, const at::Tensor& sum_in, const at::Tensor& sum_aux, int64_t B,
                             bool /*channels_last*/) {
    const int64_t N = in.size(0), C = in.size(1);
    const at::ScalarType acc = at::toOpMathType(in.scalar_type());
    const at::Tensor v = in.to(acc);
    if (sum_in.defined()) sum_in.copy_(v.sum({2, 3}));
    if (sum_aux.defined()) sum_aux.copy_((v * aux.to(acc)).sum({2, 3}));
    if (out.defined()) {
      at::Tensor o = v;
      if (f.defined()) o = o * f.to(acc).repeat_interleave(B, 0).view({N, C, 1, 1});
      if (add.has_value() && add->defined()) o = o + add->to(acc).repeat_interleave(B, 0).view({N, C, 1, 1});
      out.copy_(o);
    }
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("batch_forward", &batch_forward);
  m.def("batch_backward", &batch_backward);
  m.def("hyper_forward", &hyper_forward);
  m.def("hyper_backward", &hyper_backward);
}
