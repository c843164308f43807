/* CPU kernels of qjl's ops (qjl/ops): the turbo attention of a chunk of queries over a layer's compressed
 * and exact tokens, and the nearest-codeword search of the 4-D value codes.
 *
 * Plain C with OpenMP, compiled at first use by qjl/native/__init__.py and called through ctypes with the
 * data pointers of contiguous torch tensors; the torch code in qjl/ops is the specification and the tests
 * hold these to it. Layouts: docs/ARCHITECTURE.md. Every index here is computed from the sizes passed in;
 * the Python wrapper checks shapes, dtypes and contiguity before calling.
 */
#include "qjl_cpu.h"

#define MAX_PARTS 2

#if defined(__FMA__)
#include <immintrin.h>
#endif

/* a * b + c rounded once, lane by lane (the fused multiply-add a matmul's inner loop does). */
static inline v8f fma8(float a, v8f b, v8f c) {
#if defined(__FMA__)
    return (v8f)_mm256_fmadd_ps(_mm256_set1_ps(a), (__m256)b, (__m256)c);
#else
    v8f r;
    for (int l = 0; l < 8; l++) r[l] = fmaf(a, b[l], c[l]);
    return r;
#endif
}

/* --- vq_nearest: argmax_c <g, c> - |c|^2 / 2 over K codewords of dimension C, for n groups -----------
 * half_norm[k] = |c_k|^2 / 2 comes from the caller (torch computes it, as the torch op does), and each dot
 * product is summed in coordinate order with fused multiply-adds, as a matmul's inner loop does, so the scores
 * round as the torch op's do and near-ties pick the same codeword. */
int qjl_vq_nearest(int64_t n, int C, int K, const float *y, const float *codebook, const float *half_norm,
                   void *out, int threads) {
    if (C <= 0 || C > 8 || K <= 0 || K > 512) return 1;
    /* out: uint8 codes for K <= 256, int16 above (the torch op's dtypes) */
    uint8_t *out8 = K <= 256 ? (uint8_t *)out : NULL;
    int16_t *out16 = K <= 256 ? NULL : (int16_t *)out;
    /* Transposed [C][Kp], K padded to a multiple of 8 with codewords that never win (a half norm of +inf), so
     * every codeword's score is computed by the same vector code: equal codewords tie exactly. */
    const int Kp = (K + 7) / 8 * 8;
    float *cbt = calloc((size_t)C * Kp + Kp, sizeof(float)), *hn = cbt + (size_t)C * Kp;
    if (!cbt) return 2;
    for (int k = 0; k < K; k++)
        for (int c = 0; c < C; c++) cbt[c * Kp + k] = codebook[k * C + c];
    for (int k = 0; k < Kp; k++) hn[k] = k < K ? half_norm[k] : INFINITY;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        /* Eight codewords at a time: their scores in a vector register (multiply-adds in coordinate order),
         * each lane keeping its own first best (compares and blends); then the best lane, the lowest index
         * among equal scores. */
        const float *g = y + i * C;
        v8f top = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
        v8i at = {K, K, K, K, K, K, K, K}, idx = {0, 1, 2, 3, 4, 5, 6, 7};
        const v8i eight = {8, 8, 8, 8, 8, 8, 8, 8};
        for (int k = 0; k < Kp; k += 8, idx += eight) {
            v8f dot = g[0] * *(const v8f *)(cbt + k);
            for (int c = 1; c < C; c++) dot = fma8(g[c], *(const v8f *)(cbt + c * Kp + k), dot);
            const v8f score = dot - *(const v8f *)(hn + k);
            const v8i gt = score > top;
            top = (v8f)(((v8i)score & gt) | ((v8i)top & ~gt));
            at = (idx & gt) | (at & ~gt);
        }
        int best = K;
        float best_score = -INFINITY;
        for (int l = 0; l < 8; l++)
            if (top[l] > best_score || (top[l] == best_score && at[l] < best)) { best_score = top[l]; best = at[l]; }
        if (out8) out8[i] = (uint8_t)(best < K ? best : 0);
        else out16[i] = (int16_t)(best < K ? best : 0);
    }
    free(cbt);
    return 0;
}

/* --- turbo attention -------------------------------------------------------------------------------- */
typedef struct {
    int B, H, R, L, D, dim, T, Ne;           /* R = query rows per KV head (GQA group x L) */
    const float *q;                          /* [B,H,R,D] */
    const float *ke, *ve;                    /* [B,H,Ne,D] exact tokens; the R rows' position is r % L */
    int nkp;                                 /* key code parts */
    int kbits[MAX_PARTS], knb[MAX_PARTS], klen[MAX_PARTS];
    const uint8_t *kcodes[MAX_PARTS];        /* [B,H,T,knb] */
    const float *kcent[MAX_PARTS];           /* [2^bits], or [64][2] for a 3-bit part with kpair */
    int kpair[MAX_PARTS];                    /* 1: a 2-D codebook names each pair index's 2 numbers */
    const half_t *knorms;                    /* [B,H,T] fp16 scales, or NULL with the next two: */
    const uint8_t *kncodes;                  /* [B,H,T] 8-bit scale codes, scale = code * step */
    const half_t *knsteps;                   /* [B,H,T/NG] fp16 steps */
    const float *krot;                       /* [dim,dim], y = x R^T */
    int r;                                   /* channels kept apart (0: none) */
    const int64_t *channels, *rest;          /* [B,H,r], [B,H,dim] */
    const uint8_t *ocodes;                   /* [B,H,NG*r,G*obits/8] */
    const half_t *oscales, *omins;           /* [B,H,NG*r] */
    int obits, G;
    int nvp;
    int vbits[MAX_PARTS], vnb[MAX_PARTS], vper[MAX_PARTS];
    const uint8_t *vcodes[MAX_PARTS];        /* [B,H,T,vnb] */
    const float *vtab[MAX_PARTS];            /* [256 or 8][vper], or [512][4] for 9-bit codes */
    const half_t *vnorms;                    /* [B,H,T], or NULL with vncodes + vnsteps as the keys' */
    const uint8_t *vncodes;
    const half_t *vnsteps;
    int NG;                                  /* tokens a norm step covers (with 8-bit scales) */
    const float *vrot;                       /* [D,D] */
    float scaling;
    float *out;                              /* [B,H,R,D] */
} turbo_args;

/* A token's scale: fp16, or an 8-bit code times its group's fp16 step (qjl.ops.attention.scales). */
static inline float token_scale(const half_t *f16, const uint8_t *codes, const half_t *steps, int NG, int64_t T,
                                int64_t bh, int64_t t) {
    if (f16) return h2f(f16[bh * T + t]);
    return (float)codes[bh * T + t] * h2f(steps[bh * (T / NG) + t / NG]);
}

/* Entries of a key part's per-row table: 64 per pair of 3-bit codes, 256 per byte otherwise. */
static int part_entries(int bits) { return bits == 3 ? 64 : 256; }
static int part_slots(int bits, int len) { return bits == 3 ? len / 2 : len * bits / 8; }

/* The key tables of one query row of a KV head, laid out [entry][Rp] (this row's column): for each part,
 * slots x entries, built from the rotated query. Entry index e = part offset + slot * entries + code. */
static void build_tables(const turbo_args *a, const float *qr, float *tab, int Rp, int row) {
    int off = 0, coord = 0;
    for (int p = 0; p < a->nkp; p++) {
        const int bits = a->kbits[p], len = a->klen[p];
        const float *c = a->kcent[p];
        const float *x = qr + coord;
        if (bits == 3 && a->kpair[p]) {
            for (int i = 0; i < len / 2; i++)
                for (int w = 0; w < 64; w++)
                    tab[(int64_t)(off + i * 64 + w) * Rp + row] = x[2 * i] * c[2 * w] + x[2 * i + 1] * c[2 * w + 1];
        } else if (bits == 3) {
            for (int i = 0; i < len / 2; i++)
                for (int w = 0; w < 64; w++)
                    tab[(int64_t)(off + i * 64 + w) * Rp + row] = x[2 * i] * c[w & 7] + x[2 * i + 1] * c[w >> 3];
        } else {
            const int per = 8 / bits, mask = (1 << bits) - 1;
            for (int i = 0; i < len / per; i++)
                for (int byte = 0; byte < 256; byte++) {
                    float s = 0.f;
                    for (int k = 0; k < per; k++) s += x[i * per + k] * c[(byte >> (k * bits)) & mask];
                    tab[(int64_t)(off + i * 256 + byte) * Rp + row] = s;
                }
        }
        off += part_slots(bits, len) * part_entries(bits);
        coord += len;
    }
}

/* Table slots of a token: one per pair of 3-bit codes, one per byte otherwise. */
static int total_slots(const turbo_args *a) {
    int n = 0;
    for (int p = 0; p < a->nkp; p++) n += part_slots(a->kbits[p], a->klen[p]);
    return n;
}

static int table_entries(const turbo_args *a) {
    int n = 0;
    for (int p = 0; p < a->nkp; p++) n += part_slots(a->kbits[p], a->klen[p]) * part_entries(a->kbits[p]);
    return n;
}

/* The table slots a token's key codes pick: one per pair of 3-bit codes, one per byte otherwise. */
static inline int key_slots(const turbo_args *a, int64_t bh, int64_t t, int *slot) {
    int n = 0, off = 0;
    for (int p = 0; p < a->nkp; p++) {
        const int bits = a->kbits[p], nb = a->knb[p];
        const uint8_t *b = a->kcodes[p] + (bh * a->T + t) * nb;
        if (bits == 3) {
            for (int i = 0; i < nb / 3; i++) {
                const uint32_t word = b[3 * i] | (b[3 * i + 1] << 8) | (b[3 * i + 2] << 16);
                for (int s = 0; s < 4; s++) slot[n++] = off + (i * 4 + s) * 64 + ((word >> (6 * s)) & 63);
            }
        } else {
            for (int i = 0; i < nb; i++) slot[n++] = off + i * 256 + b[i];
        }
        off += part_slots(bits, a->klen[p]) * part_entries(bits);
    }
    return n;
}

/* The rotated, unit-scale value of token t: y_hat [D] from its codes. */
static inline void value_decode(const turbo_args *a, int64_t bh, int64_t t, float *y) {
    int coord = 0;
    for (int p = 0; p < a->nvp; p++) {
        const int nb = a->vnb[p], per = a->vper[p];
        const uint8_t *b = a->vcodes[p] + (bh * a->T + t) * nb;
        const float *tab = a->vtab[p];
        if (a->vbits[p] == 9) { /* n low bytes, then the ninth bits 8 a byte: 8 groups per byte of ninth bits */
            const int n = nb * 8 / 9;
            for (int j = 0; j < n / 8; j++) {
                const uint32_t hi = (uint32_t)b[n + j] << 8;
                for (int k = 0; k < 8; k++) {
                    const int i = 8 * j + k;
                    const float *e = tab + (b[i] | ((hi >> k) & 256u)) * 4;
                    float *o = y + coord + i * 4;
                    o[0] = e[0]; o[1] = e[1]; o[2] = e[2]; o[3] = e[3];
                }
            }
            coord += n * 4;
        } else if (a->vbits[p] == 3) {
            for (int i = 0; i < nb / 3; i++) {
                const uint32_t word = b[3 * i] | (b[3 * i + 1] << 8) | (b[3 * i + 2] << 16);
                for (int k = 0; k < 8; k++) y[coord + i * 8 + k] = tab[(word >> (3 * k)) & 7];
            }
            coord += nb / 3 * 8;
        } else {
            if (per == 4) {
                for (int i = 0; i < nb; i++) {
                    const float *e = tab + b[i] * 4;
                    float *o = y + coord + i * 4;
                    o[0] = e[0]; o[1] = e[1]; o[2] = e[2]; o[3] = e[3];
                }
            } else {
                for (int i = 0; i < nb; i++)
                    for (int k = 0; k < per; k++) y[coord + i * per + k] = tab[b[i] * per + k];
            }
            coord += nb * per;
        }
    }
}

/* Rows of the turbo key tables: padded to 4 for a decode step of up to 4 rows (tables half the size of 8-row
 * ones, so a head's stay in L1), else to a multiple of 8. */
typedef float v4f __attribute__((vector_size(16), aligned(4)));
static inline int table_rows(int R) { return R <= 4 ? 4 : padded_rows(R); }

/* The key part of the scores of n tokens, times their norms: logit[row * TOKEN_BLOCK + k]. slot [n][ns]: the
 * entries each token picks; tab [entries][Rp]: one look-up adds a column of W rows (vector type V), four tokens
 * at a time so four independent sums hide the latency of each add. lt: room for n x Rp floats. */
#define KEY_LOGITS(NAME, V, W)                                                                                    \
    static void NAME(const float *tab, int Rp, const int32_t *slot, int ns, int n, float *lt) {                \
        for (int c = 0; c < Rp; c += W) {                                                                         \
            const float *tc = tab + c;                                                                            \
            int k = 0;                                                                                            \
            for (; k + 4 <= n; k += 4) {                                                                          \
                const int32_t *s0 = slot + (int64_t)k * ns, *s1 = s0 + ns, *s2 = s1 + ns, *s3 = s2 + ns;          \
                V x0 = {0}, x1 = {0}, x2 = {0}, x3 = {0};                                                         \
                for (int i = 0; i < ns; i++) {                                                                    \
                    x0 += *(const V *)(tc + (int64_t)s0[i] * Rp);                                                 \
                    x1 += *(const V *)(tc + (int64_t)s1[i] * Rp);                                                 \
                    x2 += *(const V *)(tc + (int64_t)s2[i] * Rp);                                                 \
                    x3 += *(const V *)(tc + (int64_t)s3[i] * Rp);                                                 \
                }                                                                                                 \
                *(V *)(lt + (int64_t)k * Rp + c) = x0;                                                            \
                *(V *)(lt + (int64_t)(k + 1) * Rp + c) = x1;                                                      \
                *(V *)(lt + (int64_t)(k + 2) * Rp + c) = x2;                                                      \
                *(V *)(lt + (int64_t)(k + 3) * Rp + c) = x3;                                                      \
            }                                                                                                     \
            for (; k < n; k++) {                                                                                  \
                const int32_t *sk = slot + (int64_t)k * ns;                                                       \
                V x = {0};                                                                                        \
                for (int i = 0; i < ns; i++) x += *(const V *)(tc + (int64_t)sk[i] * Rp);                         \
                *(V *)(lt + (int64_t)k * Rp + c) = x;                                                             \
            }                                                                                                     \
        }                                                                                                         \
    }
KEY_LOGITS(key_sums4, v4f, 4)
KEY_LOGITS(key_sums8, v8f, 8)

static void key_logits(const float *tab, int Rp, int R, const int32_t *slot, int ns, int n, const float *norm,
                       float *lt, float *logit) {
    if (Rp == 4)
        key_sums4(tab, Rp, slot, ns, n, lt);
    else
        key_sums8(tab, Rp, slot, ns, n, lt);
    for (int k = 0; k < n; k++)
        for (int row = 0; row < R; row++) logit[row * TOKEN_BLOCK + k] = lt[(int64_t)k * Rp + row] * norm[k];
}

/* One block of compressed tokens of one KV head: (max, sum, acc) per row, acc in rotated space. Each token's
 * codes are decoded once (its key table slots; its value into a [tokens, D] tile), then every row reads them. */
static void compressed_block(const turbo_args *a, int64_t bh, const float *tab, const float *qsel, int64_t t0,
                             int64_t t1, float *m, float *s, float *acc) {
    const int R = a->R, D = a->D, r = a->r, n = (int)(t1 - t0), TB = TOKEN_BLOCK, Rp = table_rows(R);
    const int ns = total_slots(a);
    int32_t *slot = malloc(sizeof(int32_t) * ns * TB);
    float *code = malloc(sizeof(float) * (r ? r : 1) * TB);
    float *logit = malloc(sizeof(float) * R * TB), *lt = malloc(sizeof(float) * TB * Rp);
    float *vdec = malloc(sizeof(float) * TB * D);
    float norm[TOKEN_BLOCK], vn[TOKEN_BLOCK];
    for (int k = 0; k < n; k++) {
        const int64_t t = t0 + k;
        key_slots(a, bh, t, slot + (int64_t)k * ns);
        norm[k] = token_scale(a->knorms, a->kncodes, a->knsteps, a->NG, a->T, bh, t);
        vn[k] = token_scale(a->vnorms, a->vncodes, a->vnsteps, a->NG, a->T, bh, t);
        value_decode(a, bh, t, vdec + (int64_t)k * D);
    }
    key_logits(tab, Rp, R, slot, ns, n, norm, lt, logit);
    if (r) {
        const outlier_rows o = {a->ocodes, a->oscales, a->omins, r, a->obits, a->G, a->T};
        outlier_codes(&o, bh, t0, n, code);
        outlier_logits(&o, bh, R, qsel, t0, n, code, logit);
    }
    for (int row = 0; row < R; row++) {
        float *l = logit + row * TB;
        block_softmax(l, n, a->scaling, m + row, s + row);
        float *o = acc + (int64_t)row * D;
        memset(o, 0, sizeof(float) * D);
        for (int k = 0; k < n; k++) {
            const float w = l[k] * vn[k];
            const float *y = vdec + (int64_t)k * D;
            for (int d = 0; d < D; d++) o[d] += w * y[d];
        }
    }
    free(slot); free(code); free(logit); free(lt); free(vdec);
}

/* Merge the blocks, rotate back, add the exact tokens: out rows of one KV head. */
static void finish_head(const turbo_args *a, int64_t bh, int nblocks, const float *m, const float *s,
                        const float *acc) {
    const int R = a->R, D = a->D, Ne = a->Ne, L = a->L;
    float *rot = malloc(sizeof(float) * D * 2);
    float *logit = malloc(sizeof(float) * (Ne > 0 ? Ne : 1));
    for (int r = 0; r < R; r++) {
        float mc, sc, *u = rot, *v = rot + D;
        merge_blocks(nblocks, R, r, D, m, s, acc, &mc, &sc, u);
        memset(v, 0, sizeof(float) * D); /* u R: back from the rotated space */
        for (int i = 0; i < D; i++) {
            const float ui = u[i];
            const float *row = a->vrot + (int64_t)i * D;
            for (int d = 0; d < D; d++) v[d] += ui * row[d];
        }
        exact_finish(a->q + (bh * R + r) * D, a->ke + bh * Ne * D, a->ve + bh * Ne * D, Ne - L + (r % L) + 1, D,
                     a->scaling, mc, sc, v, logit, a->out + (bh * R + r) * D);
    }
    free(rot);
    free(logit);
}

/* The rotated query rows of a head (and their channels kept apart), then its key tables [entries][Rp]. */
static void prepare_head(const turbo_args *a, int64_t bh, float *tab, int entries, float *qsel) {
    const int R = a->R, D = a->D, dim = a->dim, Rp = table_rows(R);
    float *x = malloc(sizeof(float) * dim), *qr = malloc(sizeof(float) * dim);
    for (int e = 0; e < entries; e++)  /* the padding rows: zeros */
        for (int r = R; r < Rp; r++) tab[(int64_t)e * Rp + r] = 0.f;
    for (int r = 0; r < R; r++) {
        const float *qv = a->q + (bh * R + r) * D;
        for (int i = 0; i < dim; i++) x[i] = a->r ? qv[a->rest[bh * dim + i]] : qv[i];
        for (int j = 0; j < a->r; j++) qsel[r * a->r + j] = qv[a->channels[bh * a->r + j]];
        for (int i = 0; i < dim; i++) {
            float acc = 0.f;
            const float *row = a->krot + (int64_t)i * dim;
            for (int k = 0; k < dim; k++) acc += x[k] * row[k];
            qr[i] = acc;
        }
        build_tables(a, qr, tab, Rp, r);
    }
    free(x);
    free(qr);
}

int qjl_turbo_attention(turbo_args *a, int threads) {
    const int64_t heads = (int64_t)a->B * a->H;
    const int R = a->R, D = a->D;
    if (a->nkp < 1 || a->nkp > MAX_PARTS || a->nvp < 1 || a->nvp > MAX_PARTS || a->T < 1 || R < 1) return 1;
    const int entries = table_entries(a);
    const int64_t tab_size = (int64_t)entries * table_rows(R);
    const int nblocks = (int)((a->T + TOKEN_BLOCK - 1) / TOKEN_BLOCK);
    float *tabs = malloc(sizeof(float) * heads * tab_size);
    float *qsel = malloc(sizeof(float) * heads * R * (a->r ? a->r : 1));
    float *m = malloc(sizeof(float) * heads * nblocks * R);
    float *s = malloc(sizeof(float) * heads * nblocks * R);
    float *acc = malloc(sizeof(float) * heads * nblocks * R * D);
    if (!tabs || !qsel || !m || !s || !acc) {
        free(tabs); free(qsel); free(m); free(s); free(acc);
        return 2;
    }
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < heads; bh++)
            prepare_head(a, bh, tabs + bh * tab_size, entries, qsel + bh * R * (a->r ? a->r : 1));
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < heads * nblocks; task++) {
            const int64_t bh = task / nblocks, blk = task % nblocks;
            const int64_t t0 = blk * TOKEN_BLOCK, t1 = t0 + TOKEN_BLOCK < a->T ? t0 + TOKEN_BLOCK : a->T;
            compressed_block(a, bh, tabs + bh * tab_size, qsel + bh * R * (a->r ? a->r : 1), t0, t1, m + task * R,
                             s + task * R, acc + task * R * D);
        }
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < heads; bh++)
            finish_head(a, bh, nblocks, m + bh * nblocks * R, s + bh * nblocks * R, acc + bh * nblocks * R * D);
    }
    free(tabs); free(qsel); free(m); free(s); free(acc);
    return 0;
}

/* --- pack_codes: n codes of `bits` bits a row -> bytes (1/2/4/8 bits: 8/bits a byte, code s at bits s*bits;
 * 3 bits: 8 codes in 3 bytes, a little-endian 24-bit word, code s at bits 3s) ------------------------- */
int qjl_pack_codes(int64_t rows, int64_t n, int bits, const uint8_t *codes, uint8_t *out, int threads) {
    if (bits == 3) {
        if (n % 8) return 1;
        const int64_t words = rows * (n / 8);
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t w = 0; w < words; w++) {
            const uint8_t *c = codes + w * 8;
            uint32_t word = 0;
            for (int s = 0; s < 8; s++) word |= (uint32_t)(c[s] & 7) << (3 * s);
            out[w * 3] = word & 255;
            out[w * 3 + 1] = (word >> 8) & 255;
            out[w * 3 + 2] = (word >> 16) & 255;
        }
        return 0;
    }
    if (bits != 1 && bits != 2 && bits != 4 && bits != 8) return 1;
    const int per = 8 / bits;
    if (n % per) return 1;
    const int64_t nbytes = rows * (n / per);
    const int mask = (1 << bits) - 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < nbytes; b++) {
        const uint8_t *c = codes + b * per;
        unsigned v = 0;
        for (int s = 0; s < per; s++) v |= (unsigned)(c[s] & mask) << (s * bits);
        out[b] = (uint8_t)v;
    }
    return 0;
}
