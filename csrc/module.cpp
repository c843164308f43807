// The Python module of the qjl CUDA kernels (built by qjl/kernels.py or csrc/sources.py). Each function checks
// its inputs and raises RuntimeError naming the constraint; a message starting "qjl-unsupported:" means a
// configuration without a kernel (the Python wrapper then falls back to the torch op with a warning).
#include <torch/extension.h>

#include <tuple>
#include <vector>

namespace qjl {
at::Tensor turbo_attention(const at::Tensor& q, const std::vector<at::Tensor>& exact_k,
                           const std::vector<at::Tensor>& exact_v, const at::Tensor& key_codes,
                           const at::Tensor& centroids, const at::Tensor& key_norms,
                           const c10::optional<at::Tensor>& key_norm_steps, const at::Tensor& key_rotation,
                           const c10::optional<at::Tensor>& channels, const c10::optional<at::Tensor>& rest,
                           const c10::optional<at::Tensor>& ovalues, const c10::optional<at::Tensor>& oscales,
                           const c10::optional<at::Tensor>& omins, int64_t obits, int64_t G,
                           const at::Tensor& value_codes, int64_t value_kind, const at::Tensor& value_table,
                           const at::Tensor& value_norms, const c10::optional<at::Tensor>& value_norm_steps,
                           const at::Tensor& value_rotation, double scaling);
at::Tensor sketch_attention(const at::Tensor& q, const std::vector<at::Tensor>& exact_k,
                            const std::vector<at::Tensor>& exact_v, const at::Tensor& signs,
                            const at::Tensor& key_norms, const at::Tensor& projection, double sketch_scale,
                            const c10::optional<at::Tensor>& channels, const c10::optional<at::Tensor>& ovalues,
                            const c10::optional<at::Tensor>& oscales, const c10::optional<at::Tensor>& omins,
                            int64_t obits, int64_t G, const c10::optional<at::Tensor>& key_mean,
                            double sketch_variance, const at::Tensor& value_codes, const at::Tensor& value_scales,
                            const at::Tensor& value_mins, int64_t value_bits, int64_t value_group, double scaling);
at::Tensor sign_bits(const at::Tensor& x);
std::tuple<std::vector<at::Tensor>, at::Tensor> encode_codes(const at::Tensor& y, const std::vector<int64_t>& bits,
                                                             const std::vector<int64_t>& lengths,
                                                             const std::vector<at::Tensor>& boundaries,
                                                             const std::vector<at::Tensor>& centroids,
                                                             const c10::optional<at::Tensor>& book, bool want_fit,
                                                             bool pack, bool unbiased);
std::tuple<at::Tensor, at::Tensor, at::Tensor> int_quantize(const at::Tensor& v, int64_t bits, int64_t group,
                                                             bool fit);
}  // namespace qjl

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "qjl CUDA kernels (csrc/README.md)";
  m.def("turbo_attention", &qjl::turbo_attention, "fused turbo attention (prep, split-K, merge)");
  m.def("sketch_attention", &qjl::sketch_attention, "fused qjl-mode attention (prep, split-K, merge)");
  m.def("sign_bits", &qjl::sign_bits, "x > 0 packed 8 to a byte");
  m.def("encode_codes", &qjl::encode_codes,
        "Lloyd-Max, vq4 (K > 256: 9-bit packed or int16) or pair codes (3-bit packed) of rows, with the "
        "least-squares or the unbiased fit");
  m.def("int_quantize", &qjl::int_quantize, "asymmetric integer codes with fp16 scales and minimums");
}
