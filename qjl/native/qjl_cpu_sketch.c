/* CPU kernel of qjl::sketch_attention (--kv qjl): a chunk of R query rows per KV head (GQA group x L) over a
 * layer's compressed tokens (1-bit JL sketch keys, integer-coded values) and its exact ones.
 *
 * The torch op (qjl/ops/attention.py, sketch_key_scores and int_value_sum) is the specification; the tests hold
 * this to it (tests/test_native_sketch.py). Scores: <q,k> = c ||k_in|| <S q', sign(S k_in)> + <q, k_out> +
 * <q, mean>, with q' the query less its kept channels (per-head scope). The sign dot is a sum of m/8 entries of
 * a per-query table (one entry per byte of signs, 256 a byte), laid out [byte slot][byte value][row] so one
 * look-up adds every query row at once. Values: sum_t w_t v_tc = sum_t (w_t s_tg) code_tc + sum_t w_t z_tg.
 * Compressed tokens go in blocks of TOKEN_BLOCK (one task each), merged with the exact tokens at the end.
 */
#include "qjl_cpu.h"

enum { SCOPE_NONE = 0, SCOPE_HEAD_CODES = 1, SCOPE_HEAD_FP16 = 2, SCOPE_GROUP_FP16 = 3 };

typedef struct {
    int B, H, R, L, D, T, Ne, m;     /* R = query rows per KV head; m = sketch rows, a multiple of 8 */
    const float *q;                  /* [B,H,R,D] */
    const float *ke, *ve;            /* [B,H,Ne,D] exact tokens; row r's position is r % L */
    const uint8_t *signs;            /* [B,H,T,m/8] */
    const half_t *knorms;            /* [B,H,T] */
    const float *proj;               /* [m,D] */
    float sketch_scale;
    float penalty;                   /* > 0: each sketch logit less penalty * (|q'|^2 |k_in|^2 - est^2)+ */
    int r, scope;                    /* channels kept apart (0: none) and how (SCOPE_*) */
    const int64_t *channels;         /* [B,H,r]: per-head scopes */
    const uint8_t *ocodes;           /* SCOPE_HEAD_CODES: [B,H,NG*r,G*obits/8] */
    const half_t *oscales, *omins;   /* SCOPE_HEAD_CODES: [B,H,NG*r] */
    int obits, G;
    const half_t *ovalues;           /* SCOPE_HEAD_FP16, SCOPE_GROUP_FP16: [B,H,T,r] */
    const uint8_t *oindex;           /* SCOPE_GROUP_FP16: [B,H,NG,r] */
    const float *kmean;              /* [B,H,D] or NULL */
    const uint8_t *vcodes;           /* [B,H,T,D*vbits/8] */
    const half_t *vscales, *vmins;   /* [B,H,T,D/vgroup] */
    int vbits, vgroup;
    float scaling;
    float *out;                      /* [B,H,R,D] */
} sketch_args;

/* Per query row of head bh: its kept channels (qsel [R, r]), <q, mean> (qmean [R]), |q'|^2 (qn2 [R]), and the sign
 * tables tab [m/8][256][Rp]: entry (i, b, row) = sum_j (+1 if bit j of b else -1) (S q')_{8i+j}. */
static void sketch_prepare(const sketch_args *a, int64_t bh, float *tab, float *qsel, float *qmean, float *qn2) {
    const int R = a->R, D = a->D, m = a->m, r = a->r, Rp = padded_rows(R);
    const int per_head = a->scope == SCOPE_HEAD_CODES || a->scope == SCOPE_HEAD_FP16;
    float *qs = malloc(sizeof(float) * (D + m)), *p = qs + D;
    for (int row = 0; row < Rp; row++) {
        if (row >= R) {  /* padding rows: zeros */
            for (int e = 0; e < m / 8 * 256; e++) tab[(int64_t)e * Rp + row] = 0.f;
            continue;
        }
        const float *qv = a->q + (bh * R + row) * D;
        memcpy(qs, qv, sizeof(float) * D);
        for (int j = 0; per_head && j < r; j++) {
            const int64_t c = a->channels[bh * r + j];
            qsel[row * r + j] = qv[c];
            qs[c] = 0.f;
        }
        float x = 0.f;
        for (int d = 0; a->kmean && d < D; d++) x += qv[d] * a->kmean[bh * D + d];
        qmean[row] = x;
        float q2 = 0.f;
        for (int d = 0; d < D; d++) q2 += qs[d] * qs[d];
        qn2[row] = q2;
        for (int i = 0; i < m; i++) {
            const float *srow = a->proj + (int64_t)i * D;
            float acc = 0.f;
            for (int d = 0; d < D; d++) acc += qs[d] * srow[d];
            p[i] = acc;
        }
        for (int i = 0; i < m / 8; i++)
            for (int b = 0; b < 256; b++) {
                float t = 0.f;
                for (int j = 0; j < 8; j++) t += (b >> j & 1) ? p[8 * i + j] : -p[8 * i + j];
                tab[((int64_t)i * 256 + b) * Rp + row] = t;
            }
    }
    free(qs);
}

/* The sign part of the scores, times c ||k_in||: logit[row * TOKEN_BLOCK + k] for the n tokens from t0, less
 * the penalty (q2[row] = |q'|^2). Four tokens at a time, so four independent sums hide the latency of each add.
 * lt: room for n x Rp floats. */
static void sign_logits(const sketch_args *a, int64_t bh, const float *tab, const float *q2, int64_t t0, int n,
                        float *lt, float *logit) {
    const int nb = a->m / 8, Rp = padded_rows(a->R);
    const uint8_t *sg = a->signs + (bh * a->T + t0) * nb;
    for (int c = 0; c < Rp; c += 8) {
        const float *tc = tab + c;
        int k = 0;
        for (; k + 4 <= n; k += 4) {
            const uint8_t *s0 = sg + (int64_t)k * nb, *s1 = s0 + nb, *s2 = s1 + nb, *s3 = s2 + nb;
            v8f x0 = {0}, x1 = {0}, x2 = {0}, x3 = {0};
            for (int i = 0; i < nb; i++) {
                const float *ti = tc + (int64_t)i * 256 * Rp;
                x0 += *(const v8f *)(ti + s0[i] * Rp);
                x1 += *(const v8f *)(ti + s1[i] * Rp);
                x2 += *(const v8f *)(ti + s2[i] * Rp);
                x3 += *(const v8f *)(ti + s3[i] * Rp);
            }
            *(v8f *)(lt + (int64_t)k * Rp + c) = x0;
            *(v8f *)(lt + (int64_t)(k + 1) * Rp + c) = x1;
            *(v8f *)(lt + (int64_t)(k + 2) * Rp + c) = x2;
            *(v8f *)(lt + (int64_t)(k + 3) * Rp + c) = x3;
        }
        for (; k < n; k++) {
            v8f x = {0};
            for (int i = 0; i < nb; i++) x += *(const v8f *)(tc + ((int64_t)i * 256 + sg[(int64_t)k * nb + i]) * Rp);
            *(v8f *)(lt + (int64_t)k * Rp + c) = x;
        }
    }
    for (int k = 0; k < n; k++) {
        const float kn = h2f(a->knorms[bh * a->T + t0 + k]), sn = a->sketch_scale * kn;
        for (int row = 0; row < a->R; row++) {
            const float est = lt[(int64_t)k * Rp + row] * sn, spread = q2[row] * kn * kn - est * est;
            logit[row * TOKEN_BLOCK + k] = spread > 0.f ? est - a->penalty * spread : est;
        }
    }
}

/* The kept channels in fp16 (per head: qsel; per token group: the query at the group's indices). */
static void fp16_outlier_logits(const sketch_args *a, int64_t bh, const float *qsel, int64_t t0, int n,
                                float *logit) {
    const int r = a->r, R = a->R, D = a->D;
    float qg[64];
    for (int k = 0; k < n; k++) {
        const int64_t t = t0 + k;
        const half_t *v = a->ovalues + (bh * a->T + t) * r;
        for (int row = 0; row < R; row++) {
            const float *qr = qsel + row * r;
            if (a->scope == SCOPE_GROUP_FP16) {
                const uint8_t *idx = a->oindex + (bh * (a->T / a->G) + t / a->G) * r;
                const float *qv = a->q + (bh * R + row) * D;
                for (int j = 0; j < r; j++) qg[j] = qv[idx[j]];
                qr = qg;
            }
            float x = 0.f;
            for (int j = 0; j < r; j++) x += qr[j] * h2f(v[j]);
            logit[row * TOKEN_BLOCK + k] += x;
        }
    }
}

/* Values of the n tokens from t0: codes as floats vdec [n, D], scales and minimums vs, vz [n, ng]. */
static void value_block(const sketch_args *a, int64_t bh, const float *lut, int64_t t0, int n, float *vdec,
                        float *vs, float *vz) {
    const int D = a->D, per = 8 / a->vbits, nbytes = D / per, ng = D / a->vgroup;
    for (int k = 0; k < n; k++) {
        const uint8_t *b = a->vcodes + (bh * a->T + t0 + k) * nbytes;
        float *y = vdec + (int64_t)k * D;
        if (per == 4) {  /* 2 bits: the default */
            for (int i = 0; i < nbytes; i++) memcpy(y + i * 4, lut + b[i] * 4, sizeof(float) * 4);
        } else {
            for (int i = 0; i < nbytes; i++)
                for (int u = 0; u < per; u++) y[i * per + u] = lut[b[i] * per + u];
        }
        for (int g = 0; g < ng; g++) {
            vs[k * ng + g] = h2f(a->vscales[(bh * a->T + t0 + k) * ng + g]);
            vz[k * ng + g] = h2f(a->vmins[(bh * a->T + t0 + k) * ng + g]);
        }
    }
}

/* A group of 64 channels (the default): o[d] = sum_k w_k s_k y_kd and *z = sum_k w_k z_k over n tokens, the
 * 64 sums in registers. s, z: every `stride`-th number; y: rows of `ld` floats. */
static void weighted_codes64(const float *w, const float *s, const float *z, int stride, const float *y, int ld,
                             int n, float *o, float *zo) {
    v8f x[8] = {{0}};
    float zs = 0.f;
    for (int k = 0; k < n; k++) {
        const float ws = w[k] * s[k * stride];
        const float *yk = y + (int64_t)k * ld;
        for (int j = 0; j < 8; j++) x[j] += ws * *(const v8f *)(yk + 8 * j);
        zs += w[k] * z[k * stride];
    }
    for (int j = 0; j < 8; j++) *(v8f *)(o + 8 * j) = x[j];
    *zo = zs;
}

/* One block of compressed tokens of one KV head: (max, sum, acc [D + ng]) per row; acc holds
 * sum_k w_k s_kg code_kd in its first D numbers and sum_k w_k z_kg in the last ng. */
static void sketch_block(const sketch_args *a, int64_t bh, const float *tab, const float *qsel, const float *qmean,
                         const float *qn2, const float *lut, int64_t t0, int n, float *m, float *s, float *acc) {
    const int R = a->R, D = a->D, ng = D / a->vgroup, W = D + ng, TB = TOKEN_BLOCK, vg = a->vgroup;
    float *logit = malloc(sizeof(float) * R * TB), *lt = malloc(sizeof(float) * TB * padded_rows(R));
    float *vdec = malloc(sizeof(float) * TB * D), *vs = malloc(sizeof(float) * TB * ng * 2), *vz = vs + TB * ng;
    float *code = malloc(sizeof(float) * TB * (a->r ? a->r : 1));
    sign_logits(a, bh, tab, qn2, t0, n, lt, logit);
    if (a->scope == SCOPE_HEAD_CODES) {
        const outlier_rows o = {a->ocodes, a->oscales, a->omins, a->r, a->obits, a->G, a->T};
        outlier_codes(&o, bh, t0, n, code);
        outlier_logits(&o, bh, R, qsel, t0, n, code, logit);
    } else if (a->scope != SCOPE_NONE) {
        fp16_outlier_logits(a, bh, qsel, t0, n, logit);
    }
    value_block(a, bh, lut, t0, n, vdec, vs, vz);
    for (int row = 0; row < R; row++) {
        float *l = logit + row * TB, *o = acc + (int64_t)row * W;
        if (a->kmean)
            for (int k = 0; k < n; k++) l[k] += qmean[row];
        block_softmax(l, n, a->scaling, m + row, s + row);
        memset(o, 0, sizeof(float) * W);
        for (int g = 0; g < ng; g++) {
            if (vg == 64) {
                weighted_codes64(l, vs + g, vz + g, ng, vdec + g * 64, D, n, o + g * 64, o + D + g);
                continue;
            }
            for (int k = 0; k < n; k++) {
                const float ws = l[k] * vs[k * ng + g], *y = vdec + (int64_t)k * D;
                for (int d = g * vg; d < (g + 1) * vg; d++) o[d] += ws * y[d];
                o[D + g] += l[k] * vz[k * ng + g];
            }
        }
    }
    free(logit); free(lt); free(vdec); free(vs); free(code);
}

/* Merge the blocks of a head, add the exact tokens: its R output rows. */
static void sketch_finish(const sketch_args *a, int64_t bh, int nblocks, const float *m, const float *s,
                          const float *acc) {
    const int R = a->R, D = a->D, Ne = a->Ne, L = a->L, ng = D / a->vgroup, W = D + ng;
    float *u = malloc(sizeof(float) * (W + D + (Ne > 0 ? Ne : 1))), *vc = u + W, *logit = vc + D;
    for (int row = 0; row < R; row++) {
        float mc, sc;
        merge_blocks(nblocks, R, row, W, m, s, acc, &mc, &sc, u);
        for (int d = 0; d < D; d++) vc[d] = u[D + d / a->vgroup] + u[d];
        exact_finish(a->q + (bh * R + row) * D, a->ke + bh * Ne * D, a->ve + bh * Ne * D, Ne - L + (row % L) + 1,
                     D, a->scaling, mc, sc, vc, logit, a->out + (bh * R + row) * D);
    }
    free(u);
}

int qjl_sketch_attention(const sketch_args *a, int threads) {
    const int64_t heads = (int64_t)a->B * a->H;
    const int R = a->R, D = a->D, Rp = padded_rows(R), r = a->r ? a->r : 1;
    if (a->T < 1 || R < 1 || a->m % 8 || a->r > 64 || (a->vbits != 2 && a->vbits != 4 && a->vbits != 8)
        || a->vgroup < 1 || D % a->vgroup || (a->scope == SCOPE_HEAD_CODES && 8 % a->obits))
        return 1;
    const int64_t tab_size = (int64_t)a->m / 8 * 256 * Rp, W = D + D / a->vgroup;
    const int nblocks = (int)((a->T + TOKEN_BLOCK - 1) / TOKEN_BLOCK), per = 8 / a->vbits;
    float *tabs = malloc(sizeof(float) * heads * tab_size), *qsel = malloc(sizeof(float) * heads * R * r);
    float *qmean = malloc(sizeof(float) * heads * R), *qn2 = malloc(sizeof(float) * heads * R);
    float *lut = malloc(sizeof(float) * 256 * per);
    float *m = malloc(sizeof(float) * heads * nblocks * R), *s = malloc(sizeof(float) * heads * nblocks * R);
    float *acc = malloc(sizeof(float) * heads * nblocks * R * W);
    int status = 0;
    if (!tabs || !qsel || !qmean || !qn2 || !lut || !m || !s || !acc) {
        status = 2;
        goto done;
    }
    for (int b = 0; b < 256; b++)  /* the codes of every byte value */
        for (int u = 0; u < per; u++) lut[b * per + u] = (float)((b >> (u * a->vbits)) & ((1 << a->vbits) - 1));
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < heads; bh++)
            sketch_prepare(a, bh, tabs + bh * tab_size, qsel + bh * R * r, qmean + bh * R, qn2 + bh * R);
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < heads * nblocks; task++) {
            const int64_t bh = task / nblocks, t0 = task % nblocks * TOKEN_BLOCK;
            const int n = (int)(t0 + TOKEN_BLOCK < a->T ? TOKEN_BLOCK : a->T - t0);
            sketch_block(a, bh, tabs + bh * tab_size, qsel + bh * R * r, qmean + bh * R, qn2 + bh * R, lut, t0, n,
                         m + task * R, s + task * R, acc + task * R * W);
        }
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < heads; bh++)
            sketch_finish(a, bh, nblocks, m + bh * nblocks * R, s + bh * nblocks * R, acc + bh * nblocks * R * W);
    }
done:
    free(tabs); free(qsel); free(qmean); free(qn2); free(lut); free(m); free(s); free(acc);
    return status;
}
