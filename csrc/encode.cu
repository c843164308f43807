// Encode kernels: the CUDA implementations of qjl::sign_bits, qjl::scalar_quantize, qjl::vq_nearest,
// qjl::int_quantize and the code stage of qjl::turbo_encode (the rotation itself is a cuBLAS matmul done by
// the Python wrapper, exactly as the torch op does it, so both see the same rotated numbers).
// The torch code in qjl/ops/encode.py and qjl/turbo.py is the specification. Layouts: csrc/README.md.
#include "common.cuh"

namespace qjl {
namespace {

constexpr int MAXP = 2;  // code parts (fractional bits: floor(bits) and one more)

// --- sign_bits: x > 0 packed 8 to a byte (bit j of byte i is x[8i + j]) by a warp ballot -------------------
template <typename T>
__global__ void sign_bits_kernel(const T* __restrict__ x, uint8_t* __restrict__ out, int64_t n) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  for (int64_t w = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; w * 32 < n; w += warps) {
    const int64_t i = w * 32 + lane;
    const bool pos = i < n && to_f(x[i]) > 0.f;
    const unsigned bits = __ballot_sync(0xffffffffu, pos);
    if ((lane & 7) == 0 && i < n) out[i >> 3] = static_cast<uint8_t>((bits >> lane) & 0xffu);
  }
}

// --- scalar (Lloyd-Max), vq4 and pair codes of rows, with the least-squares fit ------------------------------
constexpr int MAXK = 512;  // codebook points at most (9-bit indices)
constexpr int MAXK2 = 64;  // points of a 2-D (pair) codebook at most: a 6-bit index, two 3-bit codes

// How vq codes are written: a byte each (K <= 256), int16 each (vq_nearest, K > 256), 9-bit packed
// (turbo_encode, K > 256: pack_codes(codes, 9), the low bytes of a row's n codes then n/8 bytes of ninth bits),
// or, for a 2-D codebook in turbo_encode, as 3-bit codes (index w of coordinates (2i, 2i+1) as the codes w & 7
// and w >> 3: pack_codes(codes, 3), 8 codes in a 3-byte little-endian word, code s at bits 3s).
enum VqOut { VQ_U8 = 0, VQ_I16 = 1, VQ_PACK9 = 2, VQ_PACK3 = 3 };

struct CodeParams {
  int64_t rows;
  int dim;
  int nparts;
  int start[MAXP], len[MAXP], bits[MAXP];
  const float* bounds[MAXP];     // [2^b - 1] sorted
  const float* centroids[MAXP];  // [2^b] or nullptr (no fit)
  uint8_t* out[MAXP];            // [rows, len * bits / 8]
  const float* book;             // vq: [K, C] or nullptr
  int K;
  int C;                         // numbers a codebook point: 4, or 2 (pair codebook)
  int vq_out;                    // VqOut
  int16_t* out16;                // VQ_I16: [rows, dim / 4]
  float* fit;                    // [rows] or nullptr
  bool unbiased;                 // fit 1 / <y, y_hat> instead of the least-squares <y, y_hat> / |y_hat|^2
};

// <g, c> for a point c of C numbers. C = 2 rounds as a float32 matmul with an inner dimension of 2 does
// (g0 c0 rounded, then one fused multiply-add), so that near-ties break as torch's more often; not guaranteed.
template <int C>
__device__ __forceinline__ float point_dot(const float* g, const float* c) {
  if constexpr (C == 2) return fmaf(g[1], c[1], __fmul_rn(g[0], c[0]));
  else return g[0] * c[0] + g[1] * c[1] + g[2] * c[2] + g[3] * c[3];
}

// The nearest point of g (C numbers): the argmax of <g, c> - |c|^2 / 2 (hn = |c|^2 / 2), the first of equal
// scores as torch's argmax; adds <c, g> and |c|^2 to the fit's sums.
template <int C>
__device__ __forceinline__ int vq_nearest_point(const float* g, const float* book, const float* hn, int K, float& dot,
                                                float& nn) {
  int best = 0;
  float bs = -INFINITY;
  for (int k = 0; k < K; ++k) {
    const float s = __fsub_rn(point_dot<C>(g, book + C * k), hn[k]);
    if (s > bs) { bs = s; best = k; }  // strict: a later equal score never replaces an earlier one
  }
  const float* c = book + C * best;
#pragma unroll
  for (int s = 0; s < C; ++s) { dot += c[s] * g[s]; nn += c[s] * c[s]; }
  return best;
}

// One row's vq codes by one warp. A lane takes UNIT groups of C numbers at a time, so that each lane writes
// whole bytes and no lane shares a byte with another: C = 4, 2 groups (8 numbers) for byte or int16 codes, 8
// (32 numbers) for the 9-bit layout, its byte of 8 ninth bits included; C = 2, 4 pairs (8 numbers), which in
// the 3-bit layout are one 3-byte word (pair j's index at bits 6j: codes 2j, 2j + 1 at bits 3(2j), 3(2j + 1)).
template <int C, int UNIT>
__device__ void vq_row(const float* yr, const CodeParams& p, const float* book, const float* hn, int64_t row,
                       int lane, float& dot, float& nn) {
  const int n = p.dim / C;  // groups a row
  for (int u = lane; u < n / UNIT; u += 32) {
    uint32_t acc = 0;  // VQ_PACK9: the UNIT ninth bits; VQ_PACK3: the 24-bit word
#pragma unroll
    for (int j = 0; j < UNIT; ++j) {
      const int gi = u * UNIT + j;
      float g[C];
#pragma unroll
      for (int s = 0; s < C; ++s) g[s] = yr[C * gi + s];
      const int best = vq_nearest_point<C>(g, book, hn, p.K, dot, nn);
      if (p.vq_out == VQ_I16) {
        p.out16[row * n + gi] = static_cast<int16_t>(best);
      } else if (p.vq_out == VQ_U8) {
        p.out[0][row * n + gi] = static_cast<uint8_t>(best);
      } else if (p.vq_out == VQ_PACK9) {  // row of n + n/8 bytes
        p.out[0][row * (n + n / 8) + gi] = static_cast<uint8_t>(best & 0xff);
        acc |= static_cast<uint32_t>((best >> 8) & 1) << j;
      } else {  // VQ_PACK3: best < 64
        acc |= static_cast<uint32_t>(best) << (6 * j);
      }
    }
    if (p.vq_out == VQ_PACK9) p.out[0][row * (n + n / 8) + n + u] = static_cast<uint8_t>(acc);
    if (p.vq_out == VQ_PACK3) {  // row of 3n/4 bytes (3 * dim / 8), word u at byte 3u
      uint8_t* dst = p.out[0] + row * (3 * n / 4) + 3 * u;
      for (int k = 0; k < 3; ++k) dst[k] = static_cast<uint8_t>((acc >> (8 * k)) & 0xffu);
    }
  }
}

// One row's Lloyd-Max codes by one warp; a lane takes octets (8 coordinates: b bytes of b-bit codes).
__device__ void scalar_row(const float* yr, const CodeParams& p, const float (*sb)[16], const float (*sc)[16],
                           int64_t row, int lane, float& dot, float& nn) {
  for (int o = lane; o < p.dim / 8; o += 32) {
    float v[8];
#pragma unroll
    for (int s = 0; s < 8; ++s) v[s] = yr[8 * o + s];
    int q = 0;
    while (q + 1 < p.nparts && 8 * o >= p.start[q + 1]) ++q;
    const int b = p.bits[q], nb = (1 << b) - 1;
    uint32_t word = 0;
#pragma unroll
    for (int s = 0; s < 8; ++s) {
      int code = 0;
      for (int i = 0; i < nb; ++i) code += sb[q][i] < v[s] ? 1 : 0;  // torch.bucketize(right=False)
      word |= static_cast<uint32_t>(code) << (s * b);
      if (p.centroids[q]) { const float c = sc[q][code]; dot += c * v[s]; nn += c * c; }
    }
    uint8_t* dst = p.out[q] + row * (p.len[q] * b / 8) + ((8 * o - p.start[q]) / 8) * b;
    for (int k = 0; k < b; ++k) dst[k] = static_cast<uint8_t>((word >> (8 * k)) & 0xffu);
  }
}

// One warp a row. Shared: the boundaries and centroids of each part (nparts = 0 for vq), or the codebook and
// its half norms (10 KB for K = 512 points of 4; a pair codebook uses 768 bytes of it).
__global__ void codes_kernel(const float* __restrict__ y, const CodeParams p) {
  __shared__ float sb[MAXP][16], sc[MAXP][16];
  __shared__ __align__(16) float book[MAXK * 4];
  __shared__ float hn[MAXK];
  for (int q = 0; q < p.nparts; ++q) {
    const int nb = (1 << p.bits[q]) - 1;
    for (int i = threadIdx.x; i < nb; i += blockDim.x) sb[q][i] = p.bounds[q][i];
    if (p.centroids[q])
      for (int i = threadIdx.x; i <= nb; i += blockDim.x) sc[q][i] = p.centroids[q][i];
  }
  if (p.book) {
    for (int i = threadIdx.x; i < p.K * p.C; i += blockDim.x) book[i] = p.book[i];
    __syncthreads();
    for (int k = threadIdx.x; k < p.K; k += blockDim.x) {
      const float* c = book + p.C * k;
      // C = 2 without contraction: torch's 0.5 * (c * c).sum(-1) exactly (two rounded squares, one add)
      hn[k] = p.C == 2 ? 0.5f * __fadd_rn(__fmul_rn(c[0], c[0]), __fmul_rn(c[1], c[1]))
                       : 0.5f * (c[0] * c[0] + c[1] * c[1] + c[2] * c[2] + c[3] * c[3]);
    }
  }
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  for (int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; row < p.rows; row += warps) {
    const float* yr = y + row * p.dim;
    float dot = 0.f, nn = 0.f;
    if (!p.book) scalar_row(yr, p, sb, sc, row, lane, dot, nn);
    else if (p.C == 2) vq_row<2, 4>(yr, p, book, hn, row, lane, dot, nn);
    else if (p.vq_out == VQ_PACK9) vq_row<4, 8>(yr, p, book, hn, row, lane, dot, nn);
    else vq_row<4, 2>(yr, p, book, hn, row, lane, dot, nn);
    if (p.fit) {
      dot = warp_sum(dot);
      nn = warp_sum(nn);
      if (lane == 0) p.fit[row] = p.unbiased ? 1.f / fmaxf(dot, 1e-30f) : dot / fmaxf(nn, 1e-30f);
    }
  }
}

// --- int_quantize: asymmetric integer codes per group ----------------------------------------------------------
// Without fit: scale and minimum from the group's range, rounded to fp16 first, codes chosen against the rounded
// ones. With fit (qjl/ops/encode.py int_quantize, the specification): kFitRounds rounds of nearest codes and the
// least-squares line for them, then the last codes on the line through their mean whose slope keeps the group's
// projection on itself (scale = |x - m|^2 / cov); codes kept, scale and minimum rounded to fp16 at the end.
constexpr int kFitRounds = 6;  // qjl.ops.encode.FIT_ROUNDS

// The nearest code of x on the line (lo, safe) among 0..levels (safe: a scale > 0).
__device__ __forceinline__ float code_at(float x, float lo, float safe, int levels) {
  return fminf(fmaxf(rintf((x - lo) / safe), 0.f), static_cast<float>(levels));
}

__device__ __forceinline__ void store_codes(const float* x, uint8_t* out, float lo, float sc, int group, int bits) {
  const int levels = (1 << bits) - 1, per = 8 / bits;
  const float safe = sc > 0.f ? sc : 1.f;
  for (int byte = 0; byte < group / per; ++byte) {
    uint32_t w = 0;
    for (int k = 0; k < per; ++k)
      w |= static_cast<uint32_t>(code_at(x[byte * per + k], lo, safe, levels)) << (k * bits);
    out[byte] = static_cast<uint8_t>(w);
  }
}

// The fit of one group, from its min/max line (lo, sc): the line its codes are rounded against (code_lo, code_sc)
// and the scale and minimum stored (out_lo, out_sc, before fp16 rounding).
__device__ void fit_line(const float* x, int group, int levels, float lo, float sc, float& code_lo, float& code_sc,
                         float& out_lo, float& out_sc) {
  float xm = 0.f;
  for (int i = 0; i < group; ++i) xm += x[i];
  xm /= static_cast<float>(group);
  float cm = 0.f, cov = 0.f;
  for (int round = 0; round <= kFitRounds; ++round) {
    code_lo = lo;
    code_sc = sc;
    const float safe = sc > 0.f ? sc : 1.f;
    float sum_c = 0.f;  // two passes over the codes (their mean first), as the torch op centres them
    for (int i = 0; i < group; ++i) sum_c += code_at(x[i], lo, safe, levels);
    cm = sum_c / static_cast<float>(group);
    float var = 0.f;
    cov = 0.f;
    for (int i = 0; i < group; ++i) {
      const float c = code_at(x[i], lo, safe, levels) - cm;
      var += c * c;
      cov += c * (x[i] - xm);
    }
    if (var > 0.f) {
      sc = cov / var;
      lo = xm - sc * cm;
    }
  }
  if (cov > 0.f) {
    float ss = 0.f;
    for (int i = 0; i < group; ++i) ss += (x[i] - xm) * (x[i] - xm);
    sc = ss / cov;
  }
  out_sc = sc;
  out_lo = xm - sc * cm;
}

__global__ void int_quantize_kernel(const float* __restrict__ v, uint8_t* __restrict__ codes, __half* __restrict__ scales,
                                    __half* __restrict__ mins, int64_t ngroups, int group, int bits, bool fit) {
  const int levels = (1 << bits) - 1;
  for (int64_t gi = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; gi < ngroups;
       gi += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float* x = v + gi * group;
    float lo = x[0], hi = x[0];
    for (int i = 1; i < group; ++i) { lo = fminf(lo, x[i]); hi = fmaxf(hi, x[i]); }
    uint8_t* out = codes + gi * (group * bits / 8);
    if (fit) {
      float code_lo, code_sc, out_lo, out_sc;
      fit_line(x, group, levels, lo, (hi - lo) / static_cast<float>(levels), code_lo, code_sc, out_lo, out_sc);
      store_codes(x, out, code_lo, code_sc, group, bits);
      scales[gi] = __float2half_rn(out_sc);
      mins[gi] = __float2half_rn(out_lo);
      continue;
    }
    const __half lo_h = __float2half_rn(lo);
    const float lo_f = __half2float(lo_h);
    const __half sc_h = __float2half_rn((hi - lo_f) / static_cast<float>(levels));
    scales[gi] = sc_h;
    mins[gi] = lo_h;
    store_codes(x, out, lo_f, __half2float(sc_h), group, bits);
  }
}

int grid_for(int64_t work, int threads) {
  const int64_t want = (work + threads - 1) / threads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, 32LL * num_sms())));
}

}  // namespace

at::Tensor sign_bits(const at::Tensor& x) {
  QJL_CHECK_CUDA_TENSOR(x, "x");
  QJL_CHECK_CONTIGUOUS(x, "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 8 == 0, "qjl kernels: sign_bits needs a last dim that is a multiple of 8");
  auto sizes = x.sizes().vec();
  sizes.back() /= 8;
  at::Tensor out = at::empty(sizes, x.options().dtype(at::kByte));
  const int64_t n = x.numel();
  if (n == 0) return out;
  const int threads = 256;
  const int grid = grid_for((n + 31) / 32 * 32, threads);
  auto stream = at::cuda::getCurrentCUDAStream();
  switch (x.scalar_type()) {
    case at::kFloat: sign_bits_kernel<float><<<grid, threads, 0, stream>>>(x.data_ptr<float>(), out.data_ptr<uint8_t>(), n); break;
    case at::kHalf: sign_bits_kernel<__half><<<grid, threads, 0, stream>>>(reinterpret_cast<const __half*>(x.data_ptr()), out.data_ptr<uint8_t>(), n); break;
    case at::kBFloat16: sign_bits_kernel<__nv_bfloat16><<<grid, threads, 0, stream>>>(reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), out.data_ptr<uint8_t>(), n); break;
    default: TORCH_CHECK(false, "qjl-unsupported: sign_bits of ", x.scalar_type());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// y float32 [..., dim] contiguous. Scalar: parts (bits, len, boundaries, centroids or empty) covering dim in
// order -> packed codes of each part [..., len*bits/8]. vq: book float32 [K <= 512, 4] -> codes [..., dim/4],
// uint8 for K <= 256; for K > 256 int16 codes, or with `pack` (turbo_encode) one uint8 [..., n + n/8] of 9-bit
// codes (n = dim/4, a multiple of 8). Pair codebook: book float32 [K <= 64, 2] -> uint8 indices [..., dim/2],
// or with `pack` the 3-bit layout [..., 3*dim/8] (index w as codes w & 7, w >> 3). want_fit: also
// <y, y_hat> / max(|y_hat|^2, 1e-30) per row (float32 [...]), or with `unbiased` 1 / max(<y, y_hat>, 1e-30)
// (turbo_encode's two scale rules), else an empty tensor.
std::tuple<std::vector<at::Tensor>, at::Tensor> encode_codes(const at::Tensor& y, const std::vector<int64_t>& bits,
                                                             const std::vector<int64_t>& lengths,
                                                             const std::vector<at::Tensor>& boundaries,
                                                             const std::vector<at::Tensor>& centroids,
                                                             const c10::optional<at::Tensor>& book, bool want_fit,
                                                             bool pack, bool unbiased) {
  QJL_CHECK_CUDA_TENSOR(y, "y");
  QJL_CHECK_DTYPE(y, at::kFloat, "y");
  QJL_CHECK_CONTIGUOUS(y, "y");
  TORCH_CHECK(y.dim() >= 1, "qjl kernels: y needs a last dim");
  CodeParams p{};
  p.dim = static_cast<int>(y.size(-1));
  p.rows = p.dim ? y.numel() / p.dim : 0;
  TORCH_CHECK(p.dim % 8 == 0, "qjl-unsupported: ", p.dim, " coordinates (a multiple of 8)");
  auto lead = y.sizes().vec();
  lead.pop_back();
  std::vector<at::Tensor> outs;
  if (book.has_value()) {
    const at::Tensor& b = *book;
    QJL_CHECK_CUDA_TENSOR(b, "codebook");
    QJL_CHECK_DTYPE(b, at::kFloat, "codebook");
    QJL_CHECK_CONTIGUOUS(b, "codebook");
    TORCH_CHECK(b.dim() == 2 && b.size(0) >= 1 &&
                    ((b.size(1) == 4 && b.size(0) <= MAXK) || (b.size(1) == 2 && b.size(0) <= MAXK2)),
                "qjl-unsupported: codebook of shape ", b.sizes(), " (kernels: [K <= 512, 4] or [K <= 64, 2])");
    p.book = b.data_ptr<float>();
    p.K = static_cast<int>(b.size(0));
    p.C = static_cast<int>(b.size(1));
    p.nparts = 0;  // no scalar parts: the kernel loads no boundaries
    const int n = p.dim / p.C;
    auto s = lead;
    if (p.C == 2 && pack) {  // dim % 8 == 0 (checked above): whole 3-byte words
      p.vq_out = VQ_PACK3;
      s.push_back(3 * p.dim / 8);
      outs.push_back(at::empty(s, y.options().dtype(at::kByte)));
      p.out[0] = outs[0].data_ptr<uint8_t>();
    } else if (p.K <= 256) {
      p.vq_out = VQ_U8;
      s.push_back(n);
      outs.push_back(at::empty(s, y.options().dtype(at::kByte)));
      p.out[0] = outs[0].data_ptr<uint8_t>();
    } else if (!pack) {
      p.vq_out = VQ_I16;
      s.push_back(n);
      outs.push_back(at::empty(s, y.options().dtype(at::kShort)));
      p.out16 = outs[0].data_ptr<int16_t>();
    } else {
      TORCH_CHECK(n % 8 == 0, "qjl-unsupported: 9-bit codes of ", p.dim, " coordinates (a multiple of 32)");
      p.vq_out = VQ_PACK9;
      s.push_back(n + n / 8);
      outs.push_back(at::empty(s, y.options().dtype(at::kByte)));
      p.out[0] = outs[0].data_ptr<uint8_t>();
    }
  } else {
    const int np = static_cast<int>(bits.size());
    TORCH_CHECK(np >= 1 && np <= MAXP && lengths.size() == bits.size() && boundaries.size() == bits.size() &&
                (centroids.empty() || centroids.size() == bits.size()),
                "qjl-unsupported: ", np, " code parts");
    p.nparts = np;
    int a = 0;
    for (int q = 0; q < np; ++q) {
      TORCH_CHECK(bits[q] >= 1 && bits[q] <= 4, "qjl-unsupported: ", bits[q], "-bit codes");
      TORCH_CHECK(lengths[q] % 8 == 0, "qjl kernels: part lengths must be multiples of 8");
      const at::Tensor& bd = boundaries[q];
      QJL_CHECK_CUDA_TENSOR(bd, "boundaries");
      QJL_CHECK_DTYPE(bd, at::kFloat, "boundaries");
      QJL_CHECK_CONTIGUOUS(bd, "boundaries");
      TORCH_CHECK(bd.numel() == (1 << bits[q]) - 1, "qjl kernels: ", bits[q], "-bit codes need ", (1 << bits[q]) - 1,
                  " boundaries");
      p.bits[q] = static_cast<int>(bits[q]);
      p.start[q] = a;
      p.len[q] = static_cast<int>(lengths[q]);
      p.bounds[q] = bd.data_ptr<float>();
      p.centroids[q] = nullptr;
      if (!centroids.empty()) {
        const at::Tensor& c = centroids[q];
        QJL_CHECK_CUDA_TENSOR(c, "centroids");
        QJL_CHECK_DTYPE(c, at::kFloat, "centroids");
        QJL_CHECK_CONTIGUOUS(c, "centroids");
        TORCH_CHECK(c.numel() == (1 << bits[q]), "qjl kernels: centroids of part ", q);
        p.centroids[q] = c.data_ptr<float>();
      }
      auto s = lead;
      s.push_back(lengths[q] * bits[q] / 8);
      outs.push_back(at::empty(s, y.options().dtype(at::kByte)));
      p.out[q] = outs.back().data_ptr<uint8_t>();
      a += static_cast<int>(lengths[q]);
    }
    TORCH_CHECK(a == p.dim, "qjl kernels: parts cover ", a, " of ", p.dim, " coordinates");
    TORCH_CHECK(!want_fit || !centroids.empty(), "qjl kernels: the fit needs the centroids");
  }
  at::Tensor fit = want_fit ? at::empty(lead, y.options()) : at::Tensor();
  p.fit = want_fit ? fit.data_ptr<float>() : nullptr;
  p.unbiased = unbiased;
  if (p.rows > 0) {
    const int threads = 256;
    codes_kernel<<<grid_for(p.rows * 32, threads), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        y.data_ptr<float>(), p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {outs, fit};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> int_quantize(const at::Tensor& v, int64_t bits, int64_t group,
                                                             bool fit) {
  QJL_CHECK_CUDA_TENSOR(v, "v");
  QJL_CHECK_DTYPE(v, at::kFloat, "v");
  QJL_CHECK_CONTIGUOUS(v, "v");
  TORCH_CHECK(v.dim() == 4, "qjl kernels: int_quantize takes [B, H, T, D]");
  TORCH_CHECK(bits == 1 || bits == 2 || bits == 4 || bits == 8, "qjl-unsupported: ", bits, "-bit integer codes");
  const int64_t D = v.size(3);
  TORCH_CHECK(group >= 1 && D % group == 0 && (group * bits) % 8 == 0,
              "qjl-unsupported: group ", group, " of ", bits, "-bit codes in ", D, " channels");
  auto s = v.sizes().vec();
  s[3] = D * bits / 8;
  at::Tensor codes = at::empty(s, v.options().dtype(at::kByte));
  s[3] = D / group;
  at::Tensor scales = at::empty(s, v.options().dtype(at::kHalf));
  at::Tensor mins = at::empty(s, v.options().dtype(at::kHalf));
  const int64_t ngroups = v.numel() / group;
  if (ngroups > 0) {
    const int threads = 128;
    int_quantize_kernel<<<grid_for(ngroups, threads), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        v.data_ptr<float>(), codes.data_ptr<uint8_t>(), reinterpret_cast<__half*>(scales.data_ptr()),
        reinterpret_cast<__half*>(mins.data_ptr()), ngroups, static_cast<int>(group), static_cast<int>(bits), fit);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {codes, scales, mins};
}

}  // namespace qjl
