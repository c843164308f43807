/* What the CPU kernels of both modes share (qjl_cpu.c: turbo, qjl_cpu_sketch.c: qjl): fp16 reads, the key
 * channels kept apart and quantised over token groups (qjl/outliers.py), the per-block softmax, the merge of
 * blocks and the exact tokens. Every function is static: each translation unit has its own copy. */
#ifndef QJL_CPU_H
#define QJL_CPU_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__aarch64__)
typedef __fp16 half_t;
#else
typedef _Float16 half_t;
#endif

#define TOKEN_BLOCK 256

static inline float h2f(half_t h) { return (float)h; }

/* Eight floats at any address (GCC/Clang vector extension): one look-up in a [entry][row] table adds 8 query
 * rows. Tables hold the rows padded to a multiple of 8 (the padding rows are zeros). */
typedef float v8f __attribute__((vector_size(32), aligned(4)));
typedef int32_t v8i __attribute__((vector_size(32), aligned(4)));
static inline int padded_rows(int R) { return (R + 7) / 8 * 8; }

/* Channels kept apart, as rows [B,H,NG*r] of G codes at `bits` bits (ordered by token group, then channel),
 * with an fp16 scale and minimum per row. */
typedef struct {
    const uint8_t *codes;
    const half_t *scales, *mins;
    int r, bits, G;
    int64_t T;  /* compressed tokens of a head */
} outlier_rows;

/* The codes of tokens t0 .. t0+n-1 of head bh as floats, channel-major: code[j * TOKEN_BLOCK + k]. */
static void outlier_codes(const outlier_rows *o, int64_t bh, int64_t t0, int n, float *code) {
    const int per = 8 / o->bits, per_log2 = per == 1 ? 0 : per == 2 ? 1 : per == 4 ? 2 : 3;
    const int mask = (1 << o->bits) - 1, row_bytes = o->G * o->bits / 8;
    const int64_t rows = (o->T / o->G) * o->r;
    int64_t g = t0 / o->G, u = t0 % o->G;  /* the token's group and place in it, without a division per token */
    for (int k = 0; k < n; k++) {
        if (k && ++u == o->G) { u = 0; g++; }
        const uint8_t *c = o->codes + (bh * rows + g * o->r) * row_bytes + (u >> per_log2);
        const int shift = (int)(u & (per - 1)) * o->bits;
        for (int j = 0; j < o->r; j++) code[j * TOKEN_BLOCK + k] = (float)((c[j * row_bytes] >> shift) & mask);
    }
}

/* logit[row * TOKEN_BLOCK + k] += sum_j q_j (s_gj code_jk + z_gj): the kept channels' part of the scores of R
 * query rows (qsel [R, r]: each row's values at the kept channels) for the tokens t0 .. t0+n-1. */
static void outlier_logits(const outlier_rows *o, int64_t bh, int R, const float *qsel, int64_t t0, int n,
                           const float *code, float *logit) {
    const int r = o->r;
    const int64_t rows = (o->T / o->G) * r;
    for (int k0 = 0; k0 < n;) {  /* one token group at a time: its scales and minimums */
        const int64_t g = (t0 + k0) / o->G;
        int k1 = (int)((g + 1) * o->G - t0);
        if (k1 > n) k1 = n;
        for (int row = 0; row < R; row++) {
            float *l = logit + row * TOKEN_BLOCK, bias = 0.f;
            for (int j = 0; j < r; j++) bias += qsel[row * r + j] * h2f(o->mins[bh * rows + g * r + j]);
            for (int k = k0; k < k1; k++) l[k] += bias;
            for (int j = 0; j < r; j++) {
                const float c = qsel[row * r + j] * h2f(o->scales[bh * rows + g * r + j]);
                const float *cj = code + j * TOKEN_BLOCK;
                for (int k = k0; k < k1; k++) l[k] += c * cj[k];
            }
        }
        k0 = k1;
    }
}

/* A block's softmax numerators in place: l[k] <- exp(scaling l[k] - max); *m = max, *s = their sum. */
static inline void block_softmax(float *l, int n, float scaling, float *m, float *s) {
    float top = -INFINITY, sum = 0.f;
    for (int k = 0; k < n; k++) { l[k] *= scaling; top = fmaxf(top, l[k]); }
    for (int k = 0; k < n; k++) { l[k] = expf(l[k] - top); sum += l[k]; }
    *m = top;
    *s = sum;
}

/* Row `row` of nblocks blocks of R rows, each (max, sum, acc [W]): their common max, sum and acc in u [W]. */
static void merge_blocks(int nblocks, int R, int row, int W, const float *m, const float *s, const float *acc,
                         float *mc, float *sc, float *u) {
    float top = -INFINITY, sum = 0.f;
    for (int b = 0; b < nblocks; b++) top = fmaxf(top, m[(int64_t)b * R + row]);
    memset(u, 0, sizeof(float) * W);
    for (int b = 0; b < nblocks; b++) {
        const float f = expf(m[(int64_t)b * R + row] - top);
        sum += s[(int64_t)b * R + row] * f;
        const float *ab = acc + ((int64_t)b * R + row) * W;
        for (int d = 0; d < W; d++) u[d] += f * ab[d];
    }
    *mc = top;
    *sc = sum;
}

/* One output row: the compressed part (sum sc and weighted value sum vc [D], both at max mc) and the first
 * `visible` exact tokens (ke, ve [.., D]) under one softmax. logit: room for `visible` floats. */
static void exact_finish(const float *qv, const float *ke, const float *ve, int visible, int D, float scaling,
                         float mc, float sc, const float *vc, float *logit, float *o) {
    float me = -INFINITY;
    for (int j = 0; j < visible; j++) {
        const float *k = ke + (int64_t)j * D;
        float x = 0.f;
        for (int d = 0; d < D; d++) x += qv[d] * k[d];
        logit[j] = x * scaling;
        me = fmaxf(me, logit[j]);
    }
    const float mx = fmaxf(mc, me), fc = expf(mc - mx);
    float total = sc * fc;
    for (int d = 0; d < D; d++) o[d] = vc[d] * fc;
    for (int j = 0; j < visible; j++) {
        const float p = expf(logit[j] - mx);
        total += p;
        const float *vv = ve + (int64_t)j * D;
        for (int d = 0; d < D; d++) o[d] += p * vv[d];
    }
    for (int d = 0; d < D; d++) o[d] /= total;
}

#endif
