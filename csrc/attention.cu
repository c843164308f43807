// Fused split-K attention over a layer's compressed tokens and its exact ones, for L query tokens
// (L = 1: a decode step). The CUDA implementations of qjl::turbo_attention and qjl::sketch_attention;
// the torch code in qjl/ops/attention.py is the specification. Layouts and launch geometry: csrc/README.md.
//
// Three launches:
//   prep   one block per query row: the query rotated (turbo) or sketched (qjl), its outlier channels picked,
//          as float32 rows in a workspace;
//   attn   grid (splits, B*H, row chunks): each block reads one KV head's codes (or exact tokens) of one
//          token range once for up to NR query rows of that head's GQA group (row = head_in_group * L + pos),
//          tile by tile with an online softmax; writes unnormalised partial sums and (max, sum) per row;
//   merge  one block per query row: log-sum-exp merge of the splits; turbo applies the value rotation once
//          to the compressed part's sum (which is in rotated space), then adds the exact part.
#include <type_traits>

#include "common.cuh"

namespace qjl {
namespace {

constexpr int THREADS = 128;
constexpr int NR = 8;                 // query rows per block at most
constexpr int TPT = 2;                // compressed tokens per thread when scoring
constexpr int CTILE = THREADS * TPT;  // compressed tokens per tile
constexpr int ETILE = THREADS;        // exact tokens per tile
constexpr int MAX_R = 64;             // outlier channels at most

enum KeyKind { KEY_TURBO3 = 0, KEY_SIGNS = 1 };
// Value codes: TAB4/TAB2: a byte -> 4 or 2 numbers through a [256, PER] table (turbo vq4 / 2-bit, 4-bit);
// TAB3: 3-bit codes, 8 in 3 bytes, through an [8] table (turbo); INT: integer codes with an fp16 scale and
// minimum per group of channels (qjl mode), PER = 8 / bits codes a byte; TAB9: 9-bit indices into a [512, 4]
// table (turbo vq4 at 2.25 bits), a row of n = D/4 low bytes then n/8 bytes of ninth bits.
enum ValKind { VAL_TAB4 = 0, VAL_TAB2 = 1, VAL_TAB3 = 2, VAL_INT = 3, VAL_TAB9 = 4 };

struct Params {
  int B, H, g, L, rows, D;
  int qtype;  // the query's (and exact parts') dtype: 0 float32, 1 float16, 2 bfloat16
  float scaling;
  // the query [B, H*g, L, D] in its dtype, strides in elements (last dim contiguous)
  const void* q;
  int64_t q_sb, q_sh, q_sl;
  // prepared rows: float32 [B*H*rows, qp_stride] = [qr (n) | qsel (r)] (turbo) or [sq (m) | qsel (r)] (qjl)
  const float* qp;
  int qp_stride;
  const float* qconst;  // [B*H*rows]: <q, key_mean> (qjl), or nullptr
  const float* qnorm2;  // [B*H*rows]: |q'|^2, q less its kept channels (qjl), or nullptr
  float penalty;        // qjl: each sketch logit less penalty * (|q'|^2 |k_in|^2 - est^2)+ (0: none); turbo: 0
  // compressed keys
  int Tc;
  const uint8_t* kcodes;  // [B*H, Tc, kbytes]
  int kbytes;
  // scales: fp16 [B*H, Tc] when ksteps is null, else uint8 codes [B*H, Tc] times fp16 steps [B*H, Tc / kgroup]
  const void* knorms;
  const __half* ksteps;
  int kgroup;
  int n;                 // turbo: rotated coordinates; qjl: sketch rows m
  float kscale;          // qjl: the sign estimator's constant; turbo: 1
  // turbo: the 3-bit keys' code book: 8 Lloyd-Max centroids (a pair index w of coordinates (2i, 2i+1) names
  // (c[w & 7], c[w >> 3])), or with pair_book a [64, 2] codebook of points (w names (c[2w], c[2w + 1]))
  const float* centroids;
  bool pair_book;
  // outlier channels: r of them; obits 16: fp16 values [B*H, Tc, r]; else codes [B*H, NG*r, G*obits/8] with
  // fp16 scales and minimums [B*H, NG*r], rows ordered (token group, channel)
  int r, obits, G, NGr;
  const uint8_t* ocodes;
  const __half* oscales;
  const __half* omins;
  const __half* ovalues;
  // compressed values
  const uint8_t* vcodes;  // [B*H, Tc, vbytes]
  int vbytes;
  const void* vnorms;  // turbo: as knorms (with vsteps, vngroup); qjl: nullptr
  const __half* vsteps;
  int vngroup;
  const float* vtable;  // turbo: [256 * PER], [8] or [512 * 4]
  int vtable_len;
  const __half* vscales;  // qjl: [B*H, Tc, D / vgroup]
  const __half* vmins;
  int vgroup;
  // exact tokens: up to 3 parts (sink, window, tail), each [B, H, n_p, D] in the query's dtype
  int nparts;
  const void* ek[3];
  const void* ev[3];
  int64_t ek_sb[3], ek_sh[3], ek_st[3], ev_sb[3], ev_sh[3], ev_st[3];
  int en[3];
  int Ne;
  // splits
  int nsplit_c, nsplit_e, split_c, split_e;
  float* ws_o;   // [B*H, nsplits, rows, D]
  float* ws_ml;  // [B*H, nsplits, rows, 2]
};

__host__ __device__ inline int align16(int x) { return (x + 15) & ~15; }

struct Layout {
  int qtab, qsel, pc, vtab, ogq, ogz, kbuf, vbuf, knorm, vnorm, logit, stats, out, total;
};

__host__ __device__ inline int groups_per_tile(const Params& p) {
  return (p.r > 0 && p.obits < 16) ? CTILE / p.G + 2 : 0;
}

// Shared memory of a block on the compressed tokens (bytes, each region 16-byte aligned).
__host__ __device__ inline Layout layout_c(const Params& p, int key) {
  Layout l{};
  int o = 0;
  l.qtab = o;
  o += align16(4 * NR * (key == KEY_TURBO3 ? p.n : (p.n / 4) * 16));
  l.qsel = o;
  o += align16(4 * NR * p.r);
  l.pc = o;
  o += key == KEY_TURBO3 ? 64 * 8 : 0;
  l.vtab = o;
  o += align16(4 * p.vtable_len);
  const int ngt = groups_per_tile(p);
  l.ogq = o;
  o += align16(4 * NR * ngt * p.r);
  l.ogz = o;
  o += align16(4 * NR * ngt);
  l.kbuf = o;
  o += align16(CTILE * p.kbytes + 16);
  l.vbuf = o;
  o += align16(CTILE * p.vbytes + 16);
  l.knorm = o;
  o += 4 * CTILE;
  l.vnorm = o;
  o += 4 * CTILE;
  l.logit = o;
  o += 4 * NR * CTILE;
  l.stats = o;
  o += align16(4 * 3 * NR);
  l.out = o;
  o += 4 * NR * p.D;
  l.total = o;
  return l;
}

// Shared memory of a block on the exact tokens.
__host__ __device__ inline Layout layout_e(const Params& p) {
  Layout l{};
  int o = 0;
  l.qtab = o;  // the query rows, float32 [NR, D]
  o += 4 * NR * p.D;
  l.logit = o;
  o += 4 * NR * ETILE;
  l.stats = o;
  o += align16(4 * 3 * NR);
  l.out = o;
  o += 4 * NR * p.D;
  l.total = o;
  return l;
}

// One tile of the online softmax: rows j < nr of logit ([NR, tile] floats, tile_n valid) become
// exp(x - m_new) (times wscale[i] when given: the value scale, which the denominator leaves out);
// stats = [m (NR), l (NR), alpha (NR)] are updated, alpha = exp(m_old - m_new) rescales older sums.
__device__ void softmax_tile(float* logit, int tile, int tile_n, int nr, float* stats, const float* wscale) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  for (int j = warp; j < nr; j += nwarps) {
    float* x = logit + j * tile;
    float mx = -INFINITY;
    for (int i = lane; i < tile_n; i += 32) mx = fmaxf(mx, x[i]);
    mx = warp_max(mx);
    const float m_old = stats[j];
    const float m_new = fmaxf(m_old, mx);
    float sum = 0.f, alpha = 1.f;
    if (m_new == -INFINITY) {
      for (int i = lane; i < tile_n; i += 32) x[i] = 0.f;
    } else {
      for (int i = lane; i < tile_n; i += 32) {
        const float e = expf(x[i] - m_new);
        sum += e;
        x[i] = wscale ? e * wscale[i] : e;
      }
      alpha = expf(m_old - m_new);
    }
    sum = warp_sum(sum);
    if (lane == 0) {
      stats[j] = m_new;
      stats[NR + j] = stats[NR + j] * alpha + sum;
      stats[2 * NR + j] = alpha;
    }
  }
}

template <int PER>
__device__ __forceinline__ void flush_partial(const Params& p, float* out_s, const float (&acc)[NR][PER],
                                              int nr, int col0, bool active) {
  if (active) {
#pragma unroll
    for (int j = 0; j < NR; ++j) {
      if (j < nr) {
#pragma unroll
        for (int k = 0; k < PER; ++k) atomicAdd(out_s + j * p.D + col0 + k, acc[j][k]);
      }
    }
  }
}

__device__ void write_partial(const Params& p, const float* out_s, const float* stats, int bh, int r0, int nr,
                              int split) {
  const int nsplits = p.nsplit_c + p.nsplit_e;
  const int64_t base = (static_cast<int64_t>(bh) * nsplits + split) * p.rows + r0;
  for (int i = threadIdx.x; i < nr * p.D; i += blockDim.x) p.ws_o[base * p.D + i] = out_s[i];
  for (int j = threadIdx.x; j < nr; j += blockDim.x) {
    p.ws_ml[(base + j) * 2] = stats[j];
    p.ws_ml[(base + j) * 2 + 1] = stats[NR + j];
  }
}

// The scale of token t of head bh: an fp16 norm, or an 8-bit code times its group's fp16 step, the float32
// product qjl.ops.attention.scales forms.
__device__ __forceinline__ float token_scale(const void* norms, const __half* steps, int group, int Tc, int bh,
                                             int t) {
  const int64_t at = static_cast<int64_t>(bh) * Tc + t;
  if (steps == nullptr) return __half2float(static_cast<const __half*>(norms)[at]);
  const float step = __half2float(steps[static_cast<int64_t>(bh) * (Tc / group) + t / group]);
  return __fmul_rn(static_cast<float>(static_cast<const uint8_t*>(norms)[at]), step);
}

// --- compressed tokens ---------------------------------------------------------------------------------
template <int D, int KEY, int VK, int PER>
__device__ void compressed_split(const Params& p, uint8_t* smem, int bh, int r0, int nr, int split) {
  const Layout Lc = layout_c(p, KEY);
  float* qtab = reinterpret_cast<float*>(smem + Lc.qtab);
  float* qsel = reinterpret_cast<float*>(smem + Lc.qsel);
  float2* pc = reinterpret_cast<float2*>(smem + Lc.pc);
  float* vtab = reinterpret_cast<float*>(smem + Lc.vtab);
  float* ogq = reinterpret_cast<float*>(smem + Lc.ogq);
  float* ogz = reinterpret_cast<float*>(smem + Lc.ogz);
  float* knorm = reinterpret_cast<float*>(smem + Lc.knorm);
  float* vnorm = reinterpret_cast<float*>(smem + Lc.vnorm);
  float* logit = reinterpret_cast<float*>(smem + Lc.logit);
  float* stats = reinterpret_cast<float*>(smem + Lc.stats);
  float* out_s = reinterpret_cast<float*>(smem + Lc.out);
  const int tid = threadIdx.x;
  const int n = p.n, r = p.r;
  const float* qp = p.qp + (static_cast<int64_t>(bh) * p.rows + r0) * p.qp_stride;

  // Per-block tables: the query rows (turbo) or their nibble sign tables (qjl), outlier query channels,
  // the key pair table, the value table; softmax state and the output accumulator.
  if constexpr (KEY == KEY_TURBO3) {
    for (int i = tid; i < nr * n; i += THREADS) qtab[i] = qp[(i / n) * p.qp_stride + i % n];
    // pc[w]: what pair index w decodes to, so scoring is the same look-up for scalar and pair codebooks
    for (int w = tid; w < 64; w += THREADS)
      pc[w] = p.pair_book ? make_float2(p.centroids[2 * w], p.centroids[2 * w + 1])
                          : make_float2(p.centroids[w & 7], p.centroids[w >> 3]);
  } else {
    const int nib = n / 4;
    for (int i = tid; i < nr * nib * 16; i += THREADS) {
      const int j = i / (nib * 16), rem = i % (nib * 16), c = rem >> 4, v = rem & 15;
      const float* sq = qp + j * p.qp_stride + 4 * c;
      float s = 0.f;
#pragma unroll
      for (int b = 0; b < 4; ++b) s += ((v >> b) & 1) ? sq[b] : -sq[b];
      qtab[i] = s;
    }
  }
  for (int i = tid; i < nr * r; i += THREADS) qsel[i] = qp[(i / r) * p.qp_stride + n + i % r];
  for (int i = tid; i < p.vtable_len; i += THREADS) vtab[i] = p.vtable[i];
  for (int i = tid; i < NR * p.D; i += THREADS) out_s[i] = 0.f;
  if (tid < NR) {
    stats[tid] = -INFINITY;
    stats[NR + tid] = 0.f;
    stats[2 * NR + tid] = 1.f;
  }
  float qc[NR], qn[NR];
#pragma unroll
  for (int j = 0; j < NR; ++j) {
    qc[j] = (p.qconst != nullptr && j < nr) ? p.qconst[static_cast<int64_t>(bh) * p.rows + r0 + j] : 0.f;
    qn[j] = (p.qnorm2 != nullptr && j < nr) ? p.qnorm2[static_cast<int64_t>(bh) * p.rows + r0 + j] : 0.f;
  }
  __syncthreads();

  constexpr int U = (VK == VAL_TAB3 ? D / 8 : D / PER);  // value units a token: PER numbers each
  constexpr int TP = THREADS / U;                         // tokens in flight in the value phase
  static_assert(THREADS % U == 0, "value units must divide the block");
  const int u = tid % U, tr = tid / U;
  float acc[NR][PER];
#pragma unroll
  for (int j = 0; j < NR; ++j)
#pragma unroll
    for (int k = 0; k < PER; ++k) acc[j][k] = 0.f;

  const int t_begin = split * p.split_c;
  const int t_end = min(p.Tc, t_begin + p.split_c);
  const int64_t row0 = static_cast<int64_t>(bh) * p.Tc;
  const int ngt = groups_per_tile(p);
  const int ngroups_v = (VK == VAL_INT) ? D / p.vgroup : 1;

  for (int tile0 = t_begin; tile0 < t_end; tile0 += CTILE) {
    const int tile_n = min(CTILE, t_end - tile0);
    // Stage the tile's key and value code rows (contiguous), the norms, the outlier group factors.
    const uint8_t* kt = stage_bytes(smem + Lc.kbuf, p.kcodes + (row0 + tile0) * p.kbytes, tile_n * p.kbytes);
    const uint8_t* vt = stage_bytes(smem + Lc.vbuf, p.vcodes + (row0 + tile0) * p.vbytes, tile_n * p.vbytes);
    for (int i = tid; i < tile_n; i += THREADS) {
      knorm[i] = token_scale(p.knorms, p.ksteps, p.kgroup, p.Tc, bh, tile0 + i);
      vnorm[i] = p.vnorms ? token_scale(p.vnorms, p.vsteps, p.vngroup, p.Tc, bh, tile0 + i) : 1.f;
    }
    int ng0 = 0;
    if (ngt > 0) {
      ng0 = tile0 / p.G;
      const int ngc = (tile0 + tile_n - 1) / p.G - ng0 + 1;  // <= ngt
      const int64_t ob = static_cast<int64_t>(bh) * p.NGr + static_cast<int64_t>(ng0) * r;
      for (int i = tid; i < nr * ngc * r; i += THREADS) {
        const int j = i / (ngc * r), rem = i % (ngc * r), gi = rem / r, c = rem % r;
        ogq[(j * ngt + gi) * r + c] = qsel[j * r + c] * __half2float(p.oscales[ob + gi * r + c]);
      }
      for (int i = tid; i < nr * ngc; i += THREADS) {
        const int j = i / ngc, gi = i % ngc;
        float s = 0.f;
        for (int c = 0; c < r; ++c) s += qsel[j * r + c] * __half2float(p.omins[ob + gi * r + c]);
        ogz[j * ngt + gi] = s;
      }
    }
    __syncthreads();

    // Scores: each thread TPT tokens, every row of the block.
#pragma unroll
    for (int tt = 0; tt < TPT; ++tt) {
      const int i = tid + tt * THREADS;
      if (i >= tile_n) continue;
      const uint8_t* krow = kt + i * p.kbytes;
      float dot[NR];
#pragma unroll
      for (int j = 0; j < NR; ++j) dot[j] = 0.f;
      if constexpr (KEY == KEY_TURBO3) {
        // 8 codes in 3 bytes; 4 six-bit pair indices a word; pc[w] = (coord 2i, coord 2i+1) of index w.
        const int nw = n / 8;
        for (int w = 0; w < nw; ++w) {
          const uint32_t word = static_cast<uint32_t>(krow[3 * w]) | (static_cast<uint32_t>(krow[3 * w + 1]) << 8) |
                                (static_cast<uint32_t>(krow[3 * w + 2]) << 16);
#pragma unroll
          for (int s = 0; s < 4; ++s) {
            const float2 c = pc[(word >> (6 * s)) & 63];
            const int coord = 8 * w + 2 * s;
#pragma unroll
            for (int j = 0; j < NR; ++j) {
              if (j < nr) {
                const float2 qv = *reinterpret_cast<const float2*>(qtab + j * n + coord);
                dot[j] = fmaf(qv.x, c.x, fmaf(qv.y, c.y, dot[j]));
              }
            }
          }
        }
      } else {
        // Signs: bit b of byte k is row 8k + b; nibble tables of 16 entries per 4 rows.
        const int nbytes = n / 8;
        for (int k = 0; k < nbytes; ++k) {
          const int byte = krow[k];
          const int lo = (2 * k) * 16 + (byte & 15), hi = (2 * k + 1) * 16 + (byte >> 4);
#pragma unroll
          for (int j = 0; j < NR; ++j) {
            if (j < nr) dot[j] += qtab[j * (n / 4) * 16 + lo] + qtab[j * (n / 4) * 16 + hi];
          }
        }
      }
      const int t = tile0 + i;
      float ex[NR];
#pragma unroll
      for (int j = 0; j < NR; ++j) ex[j] = 0.f;
      if (r > 0) {
        if (p.obits >= 16) {
          const __half* ov = p.ovalues + (row0 + t) * r;
          for (int c = 0; c < r; ++c) {
            const float v = __half2float(ov[c]);
#pragma unroll
            for (int j = 0; j < NR; ++j)
              if (j < nr) ex[j] = fmaf(qsel[j * r + c], v, ex[j]);
          }
        } else {
          const int ng = t / p.G, gi = ng - ng0, within = t - ng * p.G;
          const int rb = p.G * p.obits / 8;  // bytes a row (one channel of one group)
          const int shift = (within * p.obits) & 7, mask = (1 << p.obits) - 1;
          const uint8_t* oc = p.ocodes + (static_cast<int64_t>(bh) * p.NGr + static_cast<int64_t>(ng) * r) * rb +
                              ((within * p.obits) >> 3);
          for (int c = 0; c < r; ++c) {
            const float code = static_cast<float>((__ldg(oc + c * rb) >> shift) & mask);
#pragma unroll
            for (int j = 0; j < NR; ++j)
              if (j < nr) ex[j] = fmaf(ogq[(j * ngt + gi) * r + c], code, ex[j]);
          }
#pragma unroll
          for (int j = 0; j < NR; ++j)
            if (j < nr) ex[j] += ogz[j * ngt + gi];
        }
      }
      const float kn = knorm[i] * p.kscale;
#pragma unroll
      for (int j = 0; j < NR; ++j) {
        if (j >= nr) continue;
        float est = dot[j] * kn;
        if constexpr (KEY == KEY_SIGNS) {  // the softmax correction: half the sign estimate's variance
          const float spread = qn[j] * knorm[i] * knorm[i] - est * est;
          if (p.penalty > 0.f && spread > 0.f) est -= p.penalty * spread;
        }
        logit[j * CTILE + i] = (est + ex[j] + qc[j]) * p.scaling;
      }
    }
    __syncthreads();
    softmax_tile(logit, CTILE, tile_n, nr, stats, VK == VAL_INT ? nullptr : vnorm);
    __syncthreads();

    // Values: thread (tr, u) adds unit u (PER numbers) of tokens tr, tr + TP, ... weighted per row.
#pragma unroll
    for (int j = 0; j < NR; ++j) {
      const float a = stats[2 * NR + j];
#pragma unroll
      for (int k = 0; k < PER; ++k) acc[j][k] *= a;
    }
    for (int i = tr; i < tile_n; i += TP) {
      float v[PER];
      if constexpr (VK == VAL_TAB4) {
        const float4 x = reinterpret_cast<const float4*>(vtab)[vt[i * p.vbytes + u]];
        v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w;
      } else if constexpr (VK == VAL_TAB9) {
        // group u's index: low 8 bits in byte u, the ninth in bit u % 8 of byte U + u / 8 (pack_codes, 9 bits)
        const uint8_t* b = vt + i * p.vbytes;
        const int idx = b[u] | (((b[U + (u >> 3)] >> (u & 7)) & 1) << 8);
        const float4 x = reinterpret_cast<const float4*>(vtab)[idx];
        v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w;
      } else if constexpr (VK == VAL_TAB2) {
        const float2 x = reinterpret_cast<const float2*>(vtab)[vt[i * p.vbytes + u]];
        v[0] = x.x; v[1] = x.y;
      } else if constexpr (VK == VAL_TAB3) {
        const uint8_t* b = vt + i * p.vbytes + 3 * u;
        const uint32_t word = static_cast<uint32_t>(b[0]) | (static_cast<uint32_t>(b[1]) << 8) |
                              (static_cast<uint32_t>(b[2]) << 16);
#pragma unroll
        for (int k = 0; k < PER; ++k) v[k] = vtab[(word >> (3 * k)) & 7];
      } else {  // VAL_INT: PER codes of 8 / PER bits in byte u
        constexpr int bits = 8 / PER;
        const int byte = vt[i * p.vbytes + u];
        const int64_t sb = (row0 + tile0 + i) * ngroups_v;
#pragma unroll
        for (int k = 0; k < PER; ++k) {
          const int gidx = (u * PER + k) / p.vgroup;
          const float code = static_cast<float>((byte >> (k * bits)) & ((1 << bits) - 1));
          v[k] = fmaf(__half2float(p.vscales[sb + gidx]), code, __half2float(p.vmins[sb + gidx]));
        }
      }
#pragma unroll
      for (int j = 0; j < NR; ++j) {
        if (j < nr) {
          const float w = logit[j * CTILE + i];
#pragma unroll
          for (int k = 0; k < PER; ++k) acc[j][k] = fmaf(w, v[k], acc[j][k]);
        }
      }
    }
    __syncthreads();
  }
  flush_partial<PER>(p, out_s, acc, nr, u * PER, tr < TP);
  __syncthreads();
  write_partial(p, out_s, stats, bh, r0, nr, split);
}

// --- exact tokens ----------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void load8(const T* src, float (&v)[8]);
template <>
__device__ __forceinline__ void load8<float>(const float* src, float (&v)[8]) {
  const float4 a = reinterpret_cast<const float4*>(src)[0], b = reinterpret_cast<const float4*>(src)[1];
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
template <>
__device__ __forceinline__ void load8<__half>(const __half* src, float (&v)[8]) {
  const int4 x = *reinterpret_cast<const int4*>(src);
  const __half2* h = reinterpret_cast<const __half2*>(&x);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 f = __half22float2(h[k]);
    v[2 * k] = f.x;
    v[2 * k + 1] = f.y;
  }
}
template <>
__device__ __forceinline__ void load8<__nv_bfloat16>(const __nv_bfloat16* src, float (&v)[8]) {
  const int4 x = *reinterpret_cast<const int4*>(src);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&x);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 f = __bfloat1622float2(h[k]);
    v[2 * k] = f.x;
    v[2 * k + 1] = f.y;
  }
}

// Exact token e (0 <= e < Ne, in the order sink | window | tail) of head (b, h): its key and value rows.
template <typename T>
__device__ __forceinline__ void exact_rows(const Params& p, int b, int h, int e, const T*& k, const T*& v) {
  int part = 0, idx = e;
  if (idx >= p.en[0]) {
    idx -= p.en[0];
    part = 1;
    if (idx >= p.en[1]) {
      idx -= p.en[1];
      part = 2;
    }
  }
  k = static_cast<const T*>(p.ek[part]) + b * p.ek_sb[part] + h * p.ek_sh[part] + idx * p.ek_st[part];
  v = static_cast<const T*>(p.ev[part]) + b * p.ev_sb[part] + h * p.ev_sh[part] + idx * p.ev_st[part];
}

template <typename T, int D>
__device__ void exact_split(const Params& p, uint8_t* smem, int bh, int r0, int nr, int split_e) {
  const Layout Le = layout_e(p);
  float* qf = reinterpret_cast<float*>(smem + Le.qtab);
  float* logit = reinterpret_cast<float*>(smem + Le.logit);
  float* stats = reinterpret_cast<float*>(smem + Le.stats);
  float* out_s = reinterpret_cast<float*>(smem + Le.out);
  const int tid = threadIdx.x;
  const int b = bh / p.H, h = bh % p.H;
  const T* q = static_cast<const T*>(p.q);
  for (int i = tid; i < nr * D; i += THREADS) {
    const int row = r0 + i / D, d = i % D;
    qf[i] = to_f(q[b * p.q_sb + (h * p.g + row / p.L) * p.q_sh + (row % p.L) * p.q_sl + d]);
  }
  for (int i = tid; i < NR * D; i += THREADS) out_s[i] = 0.f;
  if (tid < NR) {
    stats[tid] = -INFINITY;
    stats[NR + tid] = 0.f;
    stats[2 * NR + tid] = 1.f;
  }
  __syncthreads();

  constexpr int U = D / 8, TP = THREADS / U;
  const int u = tid % U, tr = tid / U;
  float acc[NR][8];
#pragma unroll
  for (int j = 0; j < NR; ++j)
#pragma unroll
    for (int k = 0; k < 8; ++k) acc[j][k] = 0.f;

  const int e_begin = split_e * p.split_e;
  const int e_end = min(p.Ne, e_begin + p.split_e);
  for (int tile0 = e_begin; tile0 < e_end; tile0 += ETILE) {
    const int tile_n = min(ETILE, e_end - tile0);
    if (tid < tile_n) {
      const int e = tile0 + tid;
      const T *krow, *vrow;
      exact_rows<T>(p, b, h, e, krow, vrow);
      float dot[NR];
#pragma unroll
      for (int j = 0; j < NR; ++j) dot[j] = 0.f;
#pragma unroll 4
      for (int d = 0; d < D; d += 8) {
        float kv[8];
        load8<T>(krow + d, kv);
#pragma unroll
        for (int j = 0; j < NR; ++j) {
          if (j < nr) {
            const float4 qa = *reinterpret_cast<const float4*>(qf + j * D + d);
            const float4 qb = *reinterpret_cast<const float4*>(qf + j * D + d + 4);
            dot[j] += qa.x * kv[0] + qa.y * kv[1] + qa.z * kv[2] + qa.w * kv[3] + qb.x * kv[4] + qb.y * kv[5] +
                      qb.z * kv[6] + qb.w * kv[7];
          }
        }
      }
#pragma unroll
      for (int j = 0; j < NR; ++j) {
        if (j < nr) {
          const int pos = (r0 + j) % p.L;  // causal: query pos sees exact tokens e <= Ne - L + pos
          logit[j * ETILE + tid] = (e <= p.Ne - p.L + pos) ? dot[j] * p.scaling : -INFINITY;
        }
      }
    }
    __syncthreads();
    softmax_tile(logit, ETILE, tile_n, nr, stats, nullptr);
    __syncthreads();
#pragma unroll
    for (int j = 0; j < NR; ++j) {
      const float a = stats[2 * NR + j];
#pragma unroll
      for (int k = 0; k < 8; ++k) acc[j][k] *= a;
    }
    for (int i = tr; i < tile_n; i += TP) {
      const T *krow, *vrow;
      exact_rows<T>(p, b, h, tile0 + i, krow, vrow);
      float v[8];
      load8<T>(vrow + 8 * u, v);
#pragma unroll
      for (int j = 0; j < NR; ++j) {
        if (j < nr) {
          const float w = logit[j * ETILE + i];
#pragma unroll
          for (int k = 0; k < 8; ++k) acc[j][k] = fmaf(w, v[k], acc[j][k]);
        }
      }
    }
    __syncthreads();
  }
  flush_partial<8>(p, out_s, acc, nr, u * 8, tr < TP);
  __syncthreads();
  write_partial(p, out_s, stats, bh, r0, nr, p.nsplit_c + split_e);
}

// The query dtype is a run-time switch on the (small) exact path, so the compressed path, the bulk of the
// code, is compiled once per (D, key kind, value kind) rather than once per dtype too.
template <int D, int KEY, int VK, int PER>
__global__ void __launch_bounds__(THREADS) attn_kernel(const Params p) {
  extern __shared__ __align__(16) uint8_t smem[];
  const int bh = blockIdx.y, r0 = blockIdx.z * NR;
  const int nr = min(NR, p.rows - r0);
  if (static_cast<int>(blockIdx.x) < p.nsplit_c) {
    compressed_split<D, KEY, VK, PER>(p, smem, bh, r0, nr, blockIdx.x);
  } else {
    const int s = blockIdx.x - p.nsplit_c;
    if (p.qtype == 0) exact_split<float, D>(p, smem, bh, r0, nr, s);
    else if (p.qtype == 1) exact_split<__half, D>(p, smem, bh, r0, nr, s);
    else exact_split<__nv_bfloat16, D>(p, smem, bh, r0, nr, s);
  }
}

// --- prep: rotate / sketch the query rows ------------------------------------------------------------
// turbo: out row = [q_rest R^T (n) | q at the outlier channels (r)]; qjl: [(q, outlier channels zeroed) S^T (m) |
// q at the outlier channels (r)], qconst = <q, key_mean> and qnorm2 = |q'|^2. One block of THREADS per (b, h, row).
template <typename T, int KEY>
__global__ void __launch_bounds__(THREADS) prep_kernel(const Params p, const float* mat, const int64_t* channels,
                                                       const int64_t* rest, const float* key_mean, float* qp,
                                                       float* qconst, float* qnorm2) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  float* qf = reinterpret_cast<float*>(smem_raw);  // [D]
  float* qv = qf + p.D;                            // [D]: what the matrix multiplies
  __shared__ float red[2 * (THREADS / 32)];
  const int row = blockIdx.x % p.rows, bh = blockIdx.x / p.rows;
  const int b = bh / p.H, h = bh % p.H;
  const int D = p.D, r = p.r, n = p.n;
  const T* q = static_cast<const T*>(p.q) + b * p.q_sb + (h * p.g + row / p.L) * p.q_sh + (row % p.L) * p.q_sl;
  float* out = qp + static_cast<int64_t>(blockIdx.x) * p.qp_stride;
  for (int d = threadIdx.x; d < D; d += blockDim.x) qf[d] = to_f(q[d]);
  __syncthreads();
  for (int c = threadIdx.x; c < r; c += blockDim.x) {
    const int64_t ch = channels[static_cast<int64_t>(bh) * r + c];
    out[n + c] = (ch >= 0 && ch < D) ? qf[ch] : NAN;
  }
  if (KEY == KEY_TURBO3) {
    const int nin = D - r;  // == n
    for (int i = threadIdx.x; i < nin; i += blockDim.x) {
      if (rest == nullptr) {
        qv[i] = qf[i];
      } else {
        const int64_t ch = rest[static_cast<int64_t>(bh) * nin + i];
        qv[i] = (ch >= 0 && ch < D) ? qf[ch] : NAN;
      }
    }
  } else {
    for (int d = threadIdx.x; d < D; d += blockDim.x) qv[d] = qf[d];
    __syncthreads();
    for (int c = threadIdx.x; c < r; c += blockDim.x) {
      const int64_t ch = channels[static_cast<int64_t>(bh) * r + c];
      if (ch >= 0 && ch < D) qv[ch] = 0.f;
    }
  }
  __syncthreads();
  const int kin = (KEY == KEY_TURBO3) ? D - r : D;  // matrix [n, kin]
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float* m = mat + static_cast<int64_t>(i) * kin;
    float s = 0.f;
    for (int k = 0; k < kin; ++k) s = fmaf(m[k], qv[k], s);
    out[i] = s;
  }
  if (KEY == KEY_SIGNS) {  // <q, key_mean> and |q'|^2 (q' = qv: the outlier channels zeroed), one reduction
    float s = 0.f, s2 = 0.f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
      if (key_mean != nullptr) s += qf[d] * key_mean[static_cast<int64_t>(bh) * D + d];
      s2 += qv[d] * qv[d];
    }
    s = warp_sum(s);
    s2 = warp_sum(s2);
    if ((threadIdx.x & 31) == 0) {
      red[threadIdx.x >> 5] = s;
      red[THREADS / 32 + (threadIdx.x >> 5)] = s2;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      float t = 0.f, t2 = 0.f;
      for (int w = 0; w < THREADS / 32; ++w) {
        t += red[w];
        t2 += red[THREADS / 32 + w];
      }
      if (qconst != nullptr) qconst[blockIdx.x] = t;
      if (qnorm2 != nullptr) qnorm2[blockIdx.x] = t2;
    }
  }
}

// --- merge: log-sum-exp over the splits, the value rotation once, the exact part added -----------------------
template <typename T, bool ROTATE>
__global__ void merge_kernel(const Params p, const float* rot, T* out) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  float* racc = reinterpret_cast<float*>(smem_raw);  // [D]
  const int row = blockIdx.x % p.rows, bh = blockIdx.x / p.rows;
  const int b = bh / p.H, h = bh % p.H;
  const int nsplits = p.nsplit_c + p.nsplit_e, D = p.D;
  const int64_t base = static_cast<int64_t>(bh) * nsplits * p.rows + row;  // split s: base + s * rows
  float M = -INFINITY;
  for (int s = 0; s < nsplits; ++s) M = fmaxf(M, p.ws_ml[(base + static_cast<int64_t>(s) * p.rows) * 2]);
  float Lsum = 0.f;
  for (int s = 0; s < nsplits; ++s) {
    const float m = p.ws_ml[(base + static_cast<int64_t>(s) * p.rows) * 2];
    if (m != -INFINITY) Lsum += expf(m - M) * p.ws_ml[(base + static_cast<int64_t>(s) * p.rows) * 2 + 1];
  }
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float cs = 0.f, es = 0.f;
    for (int s = 0; s < nsplits; ++s) {
      const int64_t at = base + static_cast<int64_t>(s) * p.rows;
      const float m = p.ws_ml[at * 2];
      if (m == -INFINITY) continue;
      const float w = expf(m - M) * p.ws_o[at * D + d];
      if (s < p.nsplit_c) cs += w; else es += w;
    }
    racc[d] = cs;
    if (!ROTATE) racc[d] = cs + es;
    else racc[D + d] = es;
  }
  __syncthreads();
  T* o = out + ((static_cast<int64_t>(b) * p.H * p.g + h * p.g + row / p.L) * p.L + row % p.L) * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float y;
    if (ROTATE) {
      y = racc[D + d];
      float s = 0.f;
      for (int k = 0; k < D; ++k) s = fmaf(racc[k], rot[static_cast<int64_t>(k) * D + d], s);
      y += s;
    } else {
      y = racc[d];
    }
    o[d] = from_f<T>(y / Lsum);
  }
}

// --- host ----------------------------------------------------------------------------------------------------
template <typename T>
struct CudaType { using type = T; };
template <>
struct CudaType<at::Half> { using type = __half; };
template <>
struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };

void fill_exact(Params& p, const at::Tensor& q, const std::vector<at::Tensor>& ek, const std::vector<at::Tensor>& ev) {
  TORCH_CHECK(!ek.empty() && ek.size() <= 3 && ek.size() == ev.size(),
              "qjl kernels: 1 to 3 exact key parts with as many value parts, got ", ek.size(), " and ", ev.size());
  p.nparts = static_cast<int>(ek.size());
  p.Ne = 0;
  for (int i = 0; i < 3; ++i) {
    const bool has = i < p.nparts;
    const at::Tensor& k = has ? ek[i] : ek[0];
    const at::Tensor& v = has ? ev[i] : ev[0];
    if (has) {
      QJL_CHECK_CUDA_TENSOR(k, "exact keys");
      QJL_CHECK_CUDA_TENSOR(v, "exact values");
      TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                  "qjl kernels: exact keys and values must have the query's dtype");
      TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.size(0) == p.B && k.size(1) == p.H && k.size(3) == p.D,
                  "qjl kernels: exact keys and values must be [B, H, n, D] alike");
      TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "qjl kernels: exact rows must be contiguous");
      TORCH_CHECK(reinterpret_cast<uintptr_t>(k.data_ptr()) % 16 == 0 && reinterpret_cast<uintptr_t>(v.data_ptr()) % 16 == 0 &&
                  k.stride(0) % 8 == 0 && k.stride(1) % 8 == 0 && k.stride(2) % 8 == 0 &&
                  v.stride(0) % 8 == 0 && v.stride(1) % 8 == 0 && v.stride(2) % 8 == 0,
                  "qjl kernels: exact rows must be 16-byte aligned");
    }
    p.ek[i] = k.data_ptr();
    p.ev[i] = v.data_ptr();
    p.ek_sb[i] = k.stride(0); p.ek_sh[i] = k.stride(1); p.ek_st[i] = k.stride(2);
    p.ev_sb[i] = v.stride(0); p.ev_sh[i] = v.stride(1); p.ev_st[i] = v.stride(2);
    p.en[i] = has ? static_cast<int>(k.size(2)) : 0;
    p.Ne += p.en[i];
  }
  TORCH_CHECK(p.Ne >= p.L, "qjl kernels: the L queries must be the last L of the exact tokens");
}

void fill_query(Params& p, const at::Tensor& q, int H) {
  QJL_CHECK_CUDA_TENSOR(q, "q");
  TORCH_CHECK(q.dim() == 4 && q.stride(3) == 1, "qjl kernels: q must be [B, Hq, L, D] with contiguous rows");
  p.B = static_cast<int>(q.size(0));
  p.D = static_cast<int>(q.size(3));
  p.L = static_cast<int>(q.size(2));
  p.H = H;
  TORCH_CHECK(H > 0 && q.size(1) % H == 0, "qjl kernels: query heads ", q.size(1), " not a multiple of KV heads ", H);
  p.g = static_cast<int>(q.size(1) / H);
  p.rows = p.g * p.L;
  p.q = q.data_ptr();
  p.q_sb = q.stride(0); p.q_sh = q.stride(1); p.q_sl = q.stride(2);
}

void choose_splits(Params& p) {
  const int nchunks = ceil_div(p.rows, NR);
  const int64_t units = static_cast<int64_t>(p.B) * p.H * nchunks;
  const int want = std::max<int64_t>(1, (2 * num_sms() + units - 1) / units);
  if (p.Tc > 0) {
    p.split_c = ceil_div(ceil_div(p.Tc, want), CTILE) * CTILE;
    p.nsplit_c = ceil_div(p.Tc, p.split_c);
  } else {
    p.split_c = CTILE;
    p.nsplit_c = 0;
  }
  p.split_e = std::max(ETILE, ceil_div(ceil_div(p.Ne, want), ETILE) * ETILE);
  p.nsplit_e = ceil_div(p.Ne, p.split_e);
}

template <int D, int KEY, int VK, int PER>
void launch_attn(const Params& p, int smem) {
  auto kernel = attn_kernel<D, KEY, VK, PER>;
  if (smem > 48 * 1024) C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid(p.nsplit_c + p.nsplit_e, p.B * p.H, ceil_div(p.rows, NR));
  kernel<<<grid, THREADS, smem, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int KEY, int VK, int PER>
void launch_attn_d(const Params& p, int smem) {
  if (p.D == 64) launch_attn<64, KEY, VK, PER>(p, smem);
  else launch_attn<128, KEY, VK, PER>(p, smem);
}

// Everything after the checks: workspace, prep, attention, merge.
template <typename T, int KEY>
at::Tensor run(Params& p, const at::Tensor& q, int vkind, int per, const float* mat, const int64_t* channels,
               const int64_t* rest, const float* key_mean, const float* value_rotation) {
  const auto f32 = q.options().dtype(at::kFloat);
  choose_splits(p);
  const int smem = std::max(layout_c(p, KEY).total, layout_e(p).total);
  const int optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK(smem <= optin, "qjl-unsupported: the attention kernel needs ", smem,
              " bytes of shared memory, the device allows ", optin);
  const int nsplits = p.nsplit_c + p.nsplit_e;
  at::Tensor qp = at::empty({static_cast<int64_t>(p.B) * p.H * p.rows, p.qp_stride}, f32);
  at::Tensor qconst = KEY == KEY_SIGNS ? at::empty({static_cast<int64_t>(p.B) * p.H * p.rows}, f32) : at::Tensor();
  at::Tensor qnorm2 = KEY == KEY_SIGNS ? at::empty({static_cast<int64_t>(p.B) * p.H * p.rows}, f32) : at::Tensor();
  at::Tensor ws_o = at::empty({static_cast<int64_t>(p.B) * p.H * nsplits * p.rows * p.D}, f32);
  at::Tensor ws_ml = at::empty({static_cast<int64_t>(p.B) * p.H * nsplits * p.rows * 2}, f32);
  at::Tensor out = at::empty({p.B, p.H * p.g, p.L, p.D}, q.options());
  p.qp = qp.data_ptr<float>();
  p.qconst = KEY == KEY_SIGNS ? qconst.data_ptr<float>() : nullptr;
  p.qnorm2 = KEY == KEY_SIGNS ? qnorm2.data_ptr<float>() : nullptr;
  p.ws_o = ws_o.data_ptr<float>();
  p.ws_ml = ws_ml.data_ptr<float>();
  auto stream = at::cuda::getCurrentCUDAStream();
  using CT = typename CudaType<T>::type;
  p.qtype = std::is_same<CT, float>::value ? 0 : std::is_same<CT, __half>::value ? 1 : 2;
  const int nrows = p.B * p.H * p.rows;
  prep_kernel<CT, KEY><<<nrows, THREADS, 2 * p.D * sizeof(float), stream>>>(
      p, mat, channels, rest, key_mean, qp.data_ptr<float>(), p.qconst ? qconst.data_ptr<float>() : nullptr,
      p.qnorm2 ? qnorm2.data_ptr<float>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // constexpr: each mode instantiates only its own value kinds (12 attention kernels, not 24)
  if constexpr (KEY == KEY_TURBO3) {
    if (vkind == VAL_TAB4) launch_attn_d<KEY, VAL_TAB4, 4>(p, smem);
    else if (vkind == VAL_TAB9) launch_attn_d<KEY, VAL_TAB9, 4>(p, smem);
    else if (vkind == VAL_TAB2) launch_attn_d<KEY, VAL_TAB2, 2>(p, smem);
    else launch_attn_d<KEY, VAL_TAB3, 8>(p, smem);
  } else {
    if (per == 4) launch_attn_d<KEY, VAL_INT, 4>(p, smem);
    else launch_attn_d<KEY, VAL_INT, 2>(p, smem);
  }
  if (KEY == KEY_TURBO3)
    merge_kernel<CT, true><<<nrows, p.D, 2 * p.D * sizeof(float), stream>>>(p, value_rotation,
                                                                             reinterpret_cast<CT*>(out.data_ptr()));
  else
    merge_kernel<CT, false><<<nrows, p.D, 2 * p.D * sizeof(float), stream>>>(p, nullptr,
                                                                              reinterpret_cast<CT*>(out.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void check_u8(const at::Tensor& t, const char* name) {
  QJL_CHECK_CUDA_TENSOR(t, name);
  QJL_CHECK_DTYPE(t, at::kByte, name);
  QJL_CHECK_CONTIGUOUS(t, name);
}
void check_f16(const at::Tensor& t, const char* name) {
  QJL_CHECK_CUDA_TENSOR(t, name);
  QJL_CHECK_DTYPE(t, at::kHalf, name);
  QJL_CHECK_CONTIGUOUS(t, name);
}
void check_f32(const at::Tensor& t, const char* name) {
  QJL_CHECK_CUDA_TENSOR(t, name);
  QJL_CHECK_DTYPE(t, at::kFloat, name);
  QJL_CHECK_CONTIGUOUS(t, name);
}

// A turbo scale tensor: fp16 [B, H, T] (steps none), or uint8 codes [B, H, T] with fp16 steps [B, H, T/G]
// (qjl.ops.encode.norm_codes). Sets the pointers and G (1 for fp16).
void fill_norms(const Params& p, const at::Tensor& norms, const c10::optional<at::Tensor>& steps, const char* name,
                const void*& out, const __half*& out_steps, int& group) {
  const int64_t numel = static_cast<int64_t>(p.B) * p.H * p.Tc;
  out_steps = nullptr;
  group = 1;
  if (!steps.has_value()) {
    check_f16(norms, name);
  } else {
    check_u8(norms, name);
    check_f16(*steps, "norm steps");
    TORCH_CHECK(steps->dim() == 3 && steps->size(0) == p.B && steps->size(1) == p.H,
                "qjl kernels: the steps of ", name, " must be [B, H, T/G]");
    const int64_t ns = steps->size(2);
    TORCH_CHECK(p.Tc == 0 || (ns > 0 && p.Tc % ns == 0), "qjl kernels: ", ns, " steps of ", name, " for ", p.Tc,
                " tokens (T must be whole groups)");
    group = ns > 0 ? static_cast<int>(p.Tc / ns) : 1;
    out_steps = reinterpret_cast<const __half*>(steps->data_ptr());
  }
  TORCH_CHECK(norms.numel() == numel, "qjl kernels: ", name, " must be [B, H, T]");
  out = norms.data_ptr();
}

void fill_outliers(Params& p, const c10::optional<at::Tensor>& channels, const c10::optional<at::Tensor>& ovalues,
                   const c10::optional<at::Tensor>& oscales, const c10::optional<at::Tensor>& omins, int64_t obits,
                   int64_t G) {
  p.r = 0; p.obits = 16; p.G = 1; p.NGr = 0;
  p.ocodes = nullptr; p.oscales = nullptr; p.omins = nullptr; p.ovalues = nullptr;
  if (!channels.has_value()) return;
  const at::Tensor& ch = *channels;
  QJL_CHECK_CUDA_TENSOR(ch, "channels");
  QJL_CHECK_DTYPE(ch, at::kLong, "channels");
  QJL_CHECK_CONTIGUOUS(ch, "channels");
  TORCH_CHECK(ch.dim() == 3 && ch.size(0) == p.B && ch.size(1) == p.H, "qjl kernels: channels must be [B, H, r]");
  p.r = static_cast<int>(ch.size(2));
  TORCH_CHECK(p.r <= MAX_R, "qjl-unsupported: more than ", MAX_R, " outlier channels");
  TORCH_CHECK(ovalues.has_value(), "qjl kernels: outlier channels without their values");
  p.obits = static_cast<int>(obits);
  p.G = static_cast<int>(G);
  if (obits >= 16) {
    check_f16(*ovalues, "outlier_values");
    TORCH_CHECK(ovalues->numel() == static_cast<int64_t>(p.B) * p.H * p.Tc * p.r,
                "qjl kernels: fp16 outlier values must be [B, H, T, r]");
    p.ovalues = reinterpret_cast<const __half*>(ovalues->data_ptr());
  } else {
    TORCH_CHECK(obits == 2 || obits == 4 || obits == 8, "qjl-unsupported: outlier bits ", obits);
    TORCH_CHECK(G >= 16 && (G * obits) % 8 == 0, "qjl-unsupported: outlier group size ", G, " (kernels: >= 16)");
    check_u8(*ovalues, "outlier_values");
    TORCH_CHECK(oscales.has_value() && omins.has_value(), "qjl kernels: outlier codes without scales and minimums");
    check_f16(*oscales, "outlier_scales");
    check_f16(*omins, "outlier_mins");
    TORCH_CHECK(p.Tc % G == 0, "qjl kernels: ", p.Tc, " compressed tokens are not whole groups of ", G);
    p.NGr = static_cast<int>(p.Tc / G * p.r);
    TORCH_CHECK(ovalues->dim() == 4 && ovalues->size(2) == p.NGr && ovalues->size(3) == G * obits / 8 &&
                oscales->numel() == static_cast<int64_t>(p.B) * p.H * p.NGr && omins->numel() == oscales->numel(),
                "qjl kernels: outlier codes must be [B, H, NG*r, G*bits/8] with [B, H, NG*r, 1] scales and minimums");
    p.ocodes = ovalues->data_ptr<uint8_t>();
    p.oscales = reinterpret_cast<const __half*>(oscales->data_ptr());
    p.omins = reinterpret_cast<const __half*>(omins->data_ptr());
  }
}

}  // namespace

// q [B, Hq, L, D]; exact parts [B, H, n, D] in q's dtype; key_codes uint8 [B, H, T, 3n/8] (3-bit);
// centroids float32 [8] (Lloyd-Max) or [64, 2] (pair codebook: pair index w of coordinates 2i, 2i+1 is row w);
// key_norms fp16 [B, H, T], or uint8 [B, H, T] with key_norm_steps fp16 [B, H, T/Gn];
// key_rotation float32 [n, n]; channels/rest int64 [B, H, r] / [B, H, n] or none; outliers as
// qjl/ops/attention.py; value_codes uint8 [B, H, T, vbytes]; value_kind VAL_TAB4 / VAL_TAB2 / VAL_TAB3 /
// VAL_TAB9 with value_table float32 [256*4] / [256*2] / [8] / [512*4]; value_norms (and value_norm_steps) as
// the keys'; value_rotation float32 [D, D].
at::Tensor turbo_attention(const at::Tensor& q, const std::vector<at::Tensor>& exact_k,
                           const std::vector<at::Tensor>& exact_v, const at::Tensor& key_codes,
                           const at::Tensor& centroids, const at::Tensor& key_norms,
                           const c10::optional<at::Tensor>& key_norm_steps, const at::Tensor& key_rotation,
                           const c10::optional<at::Tensor>& channels, const c10::optional<at::Tensor>& rest,
                           const c10::optional<at::Tensor>& ovalues, const c10::optional<at::Tensor>& oscales,
                           const c10::optional<at::Tensor>& omins, int64_t obits, int64_t G,
                           const at::Tensor& value_codes, int64_t value_kind, const at::Tensor& value_table,
                           const at::Tensor& value_norms, const c10::optional<at::Tensor>& value_norm_steps,
                           const at::Tensor& value_rotation, double scaling) {
  Params p{};
  check_u8(key_codes, "key_codes");
  TORCH_CHECK(key_codes.dim() == 4, "qjl kernels: key_codes must be [B, H, T, bytes]");
  fill_query(p, q, static_cast<int>(key_codes.size(1)));
  TORCH_CHECK(p.D == 64 || p.D == 128, "qjl-unsupported: head_dim ", p.D);
  TORCH_CHECK(key_codes.size(0) == p.B, "qjl kernels: batch of key_codes");
  p.Tc = static_cast<int>(key_codes.size(2));
  p.kbytes = static_cast<int>(key_codes.size(3));
  p.n = p.kbytes * 8 / 3;
  TORCH_CHECK(p.kbytes % 3 == 0 && p.n <= p.D, "qjl kernels: 3-bit key codes of ", p.kbytes, " bytes");
  p.kcodes = key_codes.data_ptr<uint8_t>();
  check_f32(centroids, "centroids");
  // [8]: one Lloyd-Max centroid a 3-bit code; [64, 2]: the 2-D codebook, one point a 6-bit pair index
  const bool scalar_book = centroids.dim() == 1 && centroids.size(0) == 8;
  p.pair_book = centroids.dim() == 2 && centroids.size(0) == 64 && centroids.size(1) == 2;
  TORCH_CHECK(scalar_book || p.pair_book, "qjl-unsupported: 3-bit key centroids of shape ", centroids.sizes(),
              " (kernels: [8] Lloyd-Max centroids or a [64, 2] pair codebook)");
  p.centroids = centroids.data_ptr<float>();
  fill_norms(p, key_norms, key_norm_steps, "key_norms", p.knorms, p.ksteps, p.kgroup);
  check_f32(key_rotation, "key_rotation");
  TORCH_CHECK(key_rotation.dim() == 2 && key_rotation.size(0) == p.n && key_rotation.size(1) == p.n,
              "qjl kernels: key_rotation must be [n, n] for the n = ", p.n, " coded coordinates");
  p.kscale = 1.f;
  fill_outliers(p, channels, ovalues, oscales, omins, obits, G);
  TORCH_CHECK(p.n + p.r == p.D, "qjl kernels: ", p.n, " coded and ", p.r, " outlier channels do not make head_dim ", p.D);
  if (rest.has_value()) {
    QJL_CHECK_CUDA_TENSOR(*rest, "rest");
    QJL_CHECK_DTYPE(*rest, at::kLong, "rest");
    QJL_CHECK_CONTIGUOUS(*rest, "rest");
    TORCH_CHECK(rest->numel() == static_cast<int64_t>(p.B) * p.H * p.n, "qjl kernels: rest must be [B, H, n]");
  }
  TORCH_CHECK(channels.has_value() == rest.has_value(), "qjl kernels: channels and rest come together");
  check_u8(value_codes, "value_codes");
  TORCH_CHECK(value_codes.dim() == 4 && value_codes.size(2) == p.Tc, "qjl kernels: value_codes must be [B, H, T, bytes]");
  p.vcodes = value_codes.data_ptr<uint8_t>();
  p.vbytes = static_cast<int>(value_codes.size(3));
  int want_bytes = -1, want_len = -1;  // a row's code bytes and the table's numbers, per value kind
  switch (value_kind) {
    case VAL_TAB4: want_bytes = p.D / 4; want_len = 256 * 4; break;
    case VAL_TAB2: want_bytes = p.D / 2; want_len = 256 * 2; break;
    case VAL_TAB3: want_bytes = 3 * p.D / 8; want_len = 8; break;
    case VAL_TAB9: want_bytes = p.D / 4 + p.D / 32; want_len = 512 * 4; break;
    default: TORCH_CHECK(false, "qjl kernels: value kind ", value_kind);
  }
  TORCH_CHECK(p.vbytes == want_bytes, "qjl kernels: value codes of ", p.vbytes, " bytes for value kind ", value_kind);
  check_f32(value_table, "value_table");
  p.vtable = value_table.data_ptr<float>();
  p.vtable_len = static_cast<int>(value_table.numel());
  TORCH_CHECK(p.vtable_len == want_len, "qjl kernels: value table of ", p.vtable_len, " numbers");
  fill_norms(p, value_norms, value_norm_steps, "value_norms", p.vnorms, p.vsteps, p.vngroup);
  check_f32(value_rotation, "value_rotation");
  TORCH_CHECK(value_rotation.dim() == 2 && value_rotation.size(0) == p.D && value_rotation.size(1) == p.D,
              "qjl kernels: value_rotation must be [D, D]");
  fill_exact(p, q, exact_k, exact_v);
  p.scaling = static_cast<float>(scaling);
  p.qp_stride = p.n + p.r;
  p.vscales = nullptr; p.vmins = nullptr; p.vgroup = 1;
  const float* mat = key_rotation.data_ptr<float>();
  const int64_t* ch = channels.has_value() ? channels->data_ptr<int64_t>() : nullptr;
  const int64_t* rs = rest.has_value() ? rest->data_ptr<int64_t>() : nullptr;
  const float* vr = value_rotation.data_ptr<float>();
  switch (q.scalar_type()) {
    case at::kFloat: return run<float, KEY_TURBO3>(p, q, value_kind, 0, mat, ch, rs, nullptr, vr);
    case at::kHalf: return run<at::Half, KEY_TURBO3>(p, q, value_kind, 0, mat, ch, rs, nullptr, vr);
    case at::kBFloat16: return run<at::BFloat16, KEY_TURBO3>(p, q, value_kind, 0, mat, ch, rs, nullptr, vr);
    default: TORCH_CHECK(false, "qjl-unsupported: query dtype ", q.scalar_type());
  }
}

// The qjl mode: signs uint8 [B, H, T, m/8], key_norms fp16, projection float32 [m, D]; per-head outlier
// channels (codes or fp16) as above; key_mean float32 [B, H, D] or none; integer values of value_bits (2, 4)
// with fp16 scales and minimums [B, H, T, D/value_group].
at::Tensor sketch_attention(const at::Tensor& q, const std::vector<at::Tensor>& exact_k,
                            const std::vector<at::Tensor>& exact_v, const at::Tensor& signs,
                            const at::Tensor& key_norms, const at::Tensor& projection, double sketch_scale,
                            const c10::optional<at::Tensor>& channels, const c10::optional<at::Tensor>& ovalues,
                            const c10::optional<at::Tensor>& oscales, const c10::optional<at::Tensor>& omins,
                            int64_t obits, int64_t G, const c10::optional<at::Tensor>& key_mean,
                            double sketch_variance, const at::Tensor& value_codes, const at::Tensor& value_scales,
                            const at::Tensor& value_mins, int64_t value_bits, int64_t value_group, double scaling) {
  Params p{};
  check_u8(signs, "signs");
  TORCH_CHECK(signs.dim() == 4, "qjl kernels: signs must be [B, H, T, m/8]");
  fill_query(p, q, static_cast<int>(signs.size(1)));
  TORCH_CHECK(p.D == 64 || p.D == 128, "qjl-unsupported: head_dim ", p.D);
  p.Tc = static_cast<int>(signs.size(2));
  p.kbytes = static_cast<int>(signs.size(3));
  p.n = p.kbytes * 8;
  p.kcodes = signs.data_ptr<uint8_t>();
  fill_norms(p, key_norms, c10::nullopt, "key_norms", p.knorms, p.ksteps, p.kgroup);  // fp16 only
  check_f32(projection, "projection");
  TORCH_CHECK(projection.dim() == 2 && projection.size(0) == p.n && projection.size(1) == p.D,
              "qjl kernels: projection must be [m, D]");
  p.kscale = static_cast<float>(sketch_scale);
  p.penalty = static_cast<float>(0.5 * scaling * sketch_variance);
  TORCH_CHECK(p.penalty >= 0.f, "qjl kernels: sketch_variance must be >= 0");
  p.centroids = nullptr;
  p.pair_book = false;
  fill_outliers(p, channels, ovalues, oscales, omins, obits, G);
  const float* mean = nullptr;
  if (key_mean.has_value()) {
    check_f32(*key_mean, "key_mean");
    TORCH_CHECK(key_mean->numel() == static_cast<int64_t>(p.B) * p.H * p.D, "qjl kernels: key_mean must be [B, H, D]");
    mean = key_mean->data_ptr<float>();
  }
  TORCH_CHECK(value_bits == 2 || value_bits == 4, "qjl-unsupported: value bits ", value_bits);
  check_u8(value_codes, "value_codes");
  TORCH_CHECK(value_codes.dim() == 4 && value_codes.size(2) == p.Tc && value_codes.size(3) == p.D * value_bits / 8,
              "qjl kernels: value_codes must be [B, H, T, D*bits/8]");
  TORCH_CHECK(value_group >= 1 && p.D % value_group == 0, "qjl kernels: value group ", value_group);
  check_f16(value_scales, "value_scales");
  check_f16(value_mins, "value_mins");
  TORCH_CHECK(value_scales.numel() == static_cast<int64_t>(p.B) * p.H * p.Tc * (p.D / value_group) &&
              value_mins.numel() == value_scales.numel(), "qjl kernels: value scales must be [B, H, T, D/group]");
  p.vcodes = value_codes.data_ptr<uint8_t>();
  p.vbytes = static_cast<int>(value_codes.size(3));
  p.vnorms = nullptr;
  p.vsteps = nullptr;
  p.vngroup = 1;
  p.vtable = nullptr;
  p.vtable_len = 0;
  p.vscales = reinterpret_cast<const __half*>(value_scales.data_ptr());
  p.vmins = reinterpret_cast<const __half*>(value_mins.data_ptr());
  p.vgroup = static_cast<int>(value_group);
  fill_exact(p, q, exact_k, exact_v);
  p.scaling = static_cast<float>(scaling);
  p.qp_stride = p.n + p.r;
  const int per = static_cast<int>(8 / value_bits);
  const float* mat = projection.data_ptr<float>();
  const int64_t* ch = channels.has_value() ? channels->data_ptr<int64_t>() : nullptr;
  switch (q.scalar_type()) {
    case at::kFloat: return run<float, KEY_SIGNS>(p, q, VAL_INT, per, mat, ch, nullptr, mean, nullptr);
    case at::kHalf: return run<at::Half, KEY_SIGNS>(p, q, VAL_INT, per, mat, ch, nullptr, mean, nullptr);
    case at::kBFloat16: return run<at::BFloat16, KEY_SIGNS>(p, q, VAL_INT, per, mat, ch, nullptr, mean, nullptr);
    default: TORCH_CHECK(false, "qjl-unsupported: query dtype ", q.scalar_type());
  }
}

}  // namespace qjl
