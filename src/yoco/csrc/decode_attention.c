/* Decode attention on the CPU: few queries (a decode step: the query heads of one K/V head) read a long
 * cache once, with an online softmax (flash-decoding), so no score array is materialised. Two kernels
 * share the softmax, the split into work units and their merge:
 *
 * - yoco_dense_attention: float32 or bfloat16 keys and values (widened as they are loaded: a bf16
 *   cache is read at half the bytes), one row of d values per position (a KV cache's, a ring buffer's,
 *   YOCO's global K/V).
 * - yoco_quantized_attention: KIVI-quantized keys and values (yoco/quantize.py). Codes are unpacked into
 *   vector registers and never written back as a full-precision cache. Scale folding (KIVI): a key
 *   group's per-channel scales multiply the queries once per group instead of every key, and its zero
 *   points give one bias per query.
 *
 * The work is split into (row, K/V head, token range) units over OpenMP threads, so both cores read
 * one sequence's long cache; the units' partial results are merged by their log-sum-exp.
 *
 * Layouts (strides in elements, given per buffer):
 *   q       [B, h, M, dk] float32, already multiplied by the softmax scale
 *   counts  [B] int64: the positions of each row to read (0..counts[b]-1)
 *   out     [B, h, M, dv] float32, lse [B, h, M] float32 (-inf and zeros for a row with no positions)
 * dense:
 *   k [B, h, S, dk], v [B, h, S, dv] float32 (bf16 = 0) or bfloat16 (bf16 = 1) with a stride per row,
 *   head and position; each position's row dense
 * quantized (what yoco.quantize.QuantizedKV holds):
 *   k_codes [B, h, S / G, dk, G * bits / 8] uint8: each channel's codes of a group's G tokens, packed
 *           planar: byte j holds tokens j, j + P, j + 2P, ... (P = G * bits / 8), the first in the low bits
 *   k_scale, k_zero [B, h, S / G, dk] float32 (per channel over G tokens)
 *   v_codes [B, h, S, dv * bits / 8] uint8: each token's channels, packed planar the same way
 *   v_scale, v_zero [B, h, S, dv / G] float32 (per token over G channels)
 * Written with GCC/Clang vector types of 16 floats, so it compiles to the machine's vectors (AVX-512,
 * AVX2, NEON or scalar code); the common shapes are specialised so that the accumulators live in
 * registers. Both take dk % 16 == 0 and dv % 16 == 0; the quantized one also G % 16 == 0 and packed
 * planes of 8 or a multiple of 16 bytes. Anything else returns -1 and the caller uses the PyTorch path.
 */
#include "vectors.h"

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define MAX_M 64
#define MAX_D 512
#define MAX_G 512
/* Keys a block of the dense kernel: its softmax reduces across lanes once per block, not per 16 keys. */
#define KEYS 64

/* 16 values of a cache row from element i on: float32, or bfloat16 widened (bf16, a constant where
 * inlined, so each specialisation loads one way). */
static inline __attribute__((always_inline)) f32x16 row16(const void *row, int64_t i, const int bf16) {
    return bf16 ? load16_bf16((const uint16_t *)row + i) : load16((const float *)row + i);
}

/* A query's dot product with a key row (element i on), as a vector of 16 partial sums. */
static inline __attribute__((always_inline)) f32x16 dot(const float *query, const void *keys, int64_t i,
                                                        const int64_t DK, const int bf16) {
    f32x16 d = load16(query) * row16(keys, i, bf16);
    for (int64_t c = 1; c < DK; c++) d += load16(query + c * L) * row16(keys, i + c * L, bf16);
    return d;
}

/* The query's dot products with 16 key rows (from element i on, stride apart), lane t row t's: sums16's
 * pairing done as the dots arrive, so that few vectors are live at once (all 16 dots held before pairing
 * spill). */
static inline __attribute__((always_inline)) f32x16 dots16(const float *query, const void *keys, int64_t i,
                                                           const int64_t stride, const int64_t DK, const int bf16) {
    f32x16 y[2];
    for (int h = 0; h < 2; h++) {
        f32x16 x[2];
        for (int r = 0; r < 2; r++) {
            f32x16 w[2];
            for (int j = 0; j < 2; j++) {
                const int64_t row = i + (8 * h + 4 * r + 2 * j) * stride;
                w[j] = PAIR1(vadd, dot(query, keys, row, DK, bf16), dot(query, keys, row + stride, DK, bf16));
            }
            x[r] = PAIR2(vadd, w[0], w[1]);
        }
        y[h] = PAIR3(vadd, x[0], x[1]);
    }
    return PAIR4(vadd, y[0], y[1]);
}

/* The split of a call into (row, K/V head, token range) units and their partial results. */
typedef struct {
    const int64_t *counts;
    int64_t B, h, M, dv, chunk, chunks, units;
    float *part_m, *part_l, *part_acc; /* per unit: [M], [M], [M * dv] */
} Units;

typedef struct {
    Units u;
    const float *q; int64_t q_sb, q_sh;
    const void *k; int64_t k_sb, k_sh, k_st;
    const void *v; int64_t v_sb, v_sh, v_st;
    int64_t dk, bf16; /* bf16: keys and values are bfloat16, else float32 */
} DenseJob;

typedef struct {
    Units u;
    const float *q; int64_t q_sb, q_sh;
    const uint8_t *kc; int64_t kc_sb, kc_sh;
    const float *ks, *kz; int64_t ks_sb, ks_sh;
    const uint8_t *vc; int64_t vc_sb, vc_sh;
    const float *vs, *vz; int64_t vs_sb, vs_sh;
    int64_t dk, bits, G;
} QuantizedJob;

/* 16 bytes zero-extended to 16 ints (GCC 12 compiles __builtin_convertvector of bytes lane by lane). */
static inline i32x16 widen(const uint8_t *bytes) {
#if defined(__AVX512F__)
    return (i32x16)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)bytes));
#elif defined(__AVX2__)
    const __m128i raw = _mm_loadu_si128((const __m128i *)bytes);
    const __m256i low = _mm256_cvtepu8_epi32(raw), high = _mm256_cvtepu8_epi32(_mm_srli_si128(raw, 8));
    i32x16 out;
    memcpy(&out, &low, 32);
    memcpy((char *)&out + 32, &high, 32);
    return out;
#else
    i32x16 out;
    for (int i = 0; i < L; i++) out[i] = bytes[i];
    return out;
#endif
}

/* Codes 16v .. 16v+15 of a planar-packed run of codes whose planes are P bytes (P = 8 or P % 16 == 0),
 * as floats: code t lives in byte t % P, bits (t / P) * bits up. */
static inline f32x16 codes16(const uint8_t *bytes, int64_t v, int64_t P, int64_t bits) {
    i32x16 raw, shift;
    if (P >= L) {
        raw = widen(bytes + (L * v) % P);
        shift = (i32x16){0} + (int32_t)(bits * ((L * v) / P));
    } else { /* P == 8: both halves of the vector read the same 8 bytes, from two planes */
        uint8_t twice[L];
        memcpy(twice, bytes, 8);
        memcpy(twice + 8, bytes, 8);
        raw = widen(twice);
        const int32_t low = (int32_t)(bits * 2 * v), high = (int32_t)(bits * (2 * v + 1));
        shift = (i32x16){low, low, low, low, low, low, low, low, high, high, high, high, high, high, high, high};
    }
    const i32x16 codes = (raw >> shift) & ((1 << bits) - 1);
    return __builtin_convertvector(codes, f32x16);
}

/* One query's online-softmax step over a block of TV * 16 scores of which the first n are real: the
 * running maximum *top, sum of weights *total and weighted values acc[DV] are rescaled when a larger
 * score arrives; weights[TV * 16] receives e^(score - top) (0 past n). */
static inline __attribute__((always_inline)) void softmax_block(const f32x16 *scores, const int64_t TV, int64_t n,
                                                                float *top, float *total, f32x16 *acc,
                                                                const int64_t DV, float *weights) {
    float high = *top;
    if (n == TV * L) {
        f32x16 most = scores[0];
        for (int64_t v = 1; v < TV; v++) most = vmax(most, scores[v]);
        for (int i = 0; i < L; i++) high = most[i] > high ? most[i] : high;
    } else { /* a short last block: the scores of its n tokens only */
        for (int64_t v = 0; v < TV; v++) store16(weights + v * L, scores[v]);
        for (int64_t t = 0; t < n; t++) high = weights[t] > high ? weights[t] : high;
    }
    if (high > *top) {
        const float factor = exp_nonpositive(splat(*top - high))[0];
        *total *= factor;
        for (int64_t c = 0; c < DV; c++) acc[c] *= factor;
        *top = high;
    }
    f32x16 sum = splat(0.0f);
    for (int64_t v = 0; v < TV; v++) {
        f32x16 e = exp_nonpositive(scores[v] - high);
        if (n < TV * L)
            for (int64_t i = 0; i < L; i++) e[i] = v * L + i < n ? e[i] : 0.0f;
        store16(weights + v * L, e);
        sum += e;
    }
    *total += hsum(sum);
}

/* A unit's row, K/V head and token range [*t0, *t1) (empty past the row's count). */
static inline void unit_range(const Units *u, int64_t unit, int64_t *b, int64_t *head, int64_t *t0, int64_t *t1) {
    const int64_t bh = unit / u->chunks;
    *b = bh / u->h;
    *head = bh % u->h;
    *t0 = (unit % u->chunks) * u->chunk;
    *t1 = *t0 + u->chunk;
    if (*t1 > u->counts[*b]) *t1 = u->counts[*b];
}

static inline void unit_store(const Units *u, int64_t unit, const int64_t M, const int64_t DV, const float *top,
                              const float *total, const f32x16 *acc) {
    float *mx = u->part_m + unit * M, *l = u->part_l + unit * M, *out = u->part_acc + unit * M * u->dv;
    for (int64_t m = 0; m < M; m++) {
        mx[m] = top[m];
        l[m] = total[m];
        for (int64_t c = 0; c < DV; c++) store16(out + m * u->dv + c * L, acc[m * DV + c]);
    }
}

/* ---------------------------------------------------------------------- float32 keys and values */
/* One unit's work. Always inlined into the specialisations below, so that for the common shapes M and
 * the dims are constants: every loop over them unrolls and the accumulators stay in registers. */
static inline __attribute__((always_inline)) void dense_body(const DenseJob *job, int64_t unit, const int64_t M,
                                                             const int64_t dk, const int64_t dv, const int bf16) {
    const int64_t DK = dk / L, DV = dv / L;
    int64_t b, head, t0, t1;
    unit_range(&job->u, unit, &b, &head, &t0, &t1);
    const float *q = job->q + b * job->q_sb + head * job->q_sh;
    const int64_t k0 = b * job->k_sb + head * job->k_sh, v0 = b * job->v_sb + head * job->v_sh; /* elements */

    /* Two phases a block of KEYS keys: the scores, a query at a time (16 keys' dot products summed across
     * lanes as they arrive, dots16), then the values, each key's row loaded once for a group of 4
     * queries' accumulators, which are held in registers for the block and in memory between phases
     * (so that the score phase has the registers to itself). */
    f32x16 acc[M][DV];
    float top[M], total[M], weights[M][KEYS];
    for (int64_t m = 0; m < M; m++) {
        top[m] = -FLT_MAX;
        total[m] = 0.0f;
        for (int64_t c = 0; c < DV; c++) acc[m][c] = splat(0.0f);
    }
    const int64_t ks = job->k_st, vs = job->v_st;
    for (int64_t s0 = t0; s0 < t1; s0 += KEYS) {
        const int64_t n = s0 + KEYS <= t1 ? KEYS : t1 - s0;
        for (int64_t m = 0; m < M; m++) {
            const float *query = q + m * dk;
            f32x16 scores[KEYS / L];
            for (int64_t g = 0; g < KEYS / L; g++) {
                const int64_t rows = k0 + (s0 + g * L) * ks;
                if (g * L + L <= n) {
                    scores[g] = dots16(query, job->k, rows, ks, DK, bf16);
                } else { /* the last block's tail: keys past n score 0 (softmax_block ignores them) */
                    f32x16 dots[L];
                    for (int64_t t = 0; t < L; t++)
                        dots[t] = g * L + t < n ? dot(query, job->k, rows + t * ks, DK, bf16) : splat(0.0f);
                    scores[g] = sums16(dots);
                }
            }
            softmax_block(scores, KEYS / L, n, &top[m], &total[m], acc[m], DV, weights[m]);
        }
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int64_t group = M - m0 < 4 ? M - m0 : 4;
            f32x16 held[4][DV];
            for (int64_t m = 0; m < group; m++)
                for (int64_t c = 0; c < DV; c++) held[m][c] = acc[m0 + m][c];
            for (int64_t t = 0; t < n; t++) {
                const int64_t row = v0 + (s0 + t) * vs;
                for (int64_t c = 0; c < DV; c++) {
                    const f32x16 x = row16(job->v, row + c * L, bf16);
                    for (int64_t m = 0; m < group; m++) held[m][c] += weights[m0 + m][t] * x;
                }
            }
            for (int64_t m = 0; m < group; m++)
                for (int64_t c = 0; c < DV; c++) acc[m0 + m][c] = held[m][c];
        }
    }
    unit_store(&job->u, unit, M, DV, top, total, &acc[0][0]);
}

#define DENSE(QUERIES, D)                                                                                  \
    static void dense_##QUERIES##_##D(const void *job, int64_t unit) { dense_body(job, unit, QUERIES, D, D, 0); } \
    static void dense_bf16_##QUERIES##_##D(const void *job, int64_t unit) { dense_body(job, unit, QUERIES, D, D, 1); }
#define DENSE_SHAPES(X) \
    X(1, 32) X(2, 32) X(4, 32) X(8, 32) X(1, 64) X(2, 64) X(4, 64) X(8, 64) X(1, 128) X(2, 128) X(4, 128) X(8, 128)
DENSE_SHAPES(DENSE)

static void dense_any(const void *job, int64_t unit) {
    const DenseJob *j = job;
    dense_body(j, unit, j->u.M, j->dk, j->u.dv, 0);
}

static void dense_bf16_any(const void *job, int64_t unit) {
    const DenseJob *j = job;
    dense_body(j, unit, j->u.M, j->dk, j->u.dv, 1);
}

/* ---------------------------------------------------------------------- quantized keys and values */
static inline __attribute__((always_inline)) void quantized_body(const QuantizedJob *job, int64_t unit,
                                                                 const int64_t M, const int64_t dk, const int64_t dv,
                                                                 const int64_t G, const int64_t bits) {
    const int64_t per = 8 / bits;
    const int64_t kP = G / per, vP = dv / per, vgroups = dv / G, TV = G / L, DV = dv / L; /* P: bytes a plane */
    int64_t b, head, t0, t1;
    unit_range(&job->u, unit, &b, &head, &t0, &t1);
    const float *q = job->q + b * job->q_sb + head * job->q_sh;
    const uint8_t *kc = job->kc + b * job->kc_sb + head * job->kc_sh;
    const float *ks = job->ks + b * job->ks_sb + head * job->ks_sh, *kz = job->kz + b * job->ks_sb + head * job->ks_sh;
    const uint8_t *vc = job->vc + b * job->vc_sb + head * job->vc_sh;
    const float *vs = job->vs + b * job->vs_sb + head * job->vs_sh, *vz = job->vz + b * job->vs_sb + head * job->vs_sh;

    f32x16 acc[M][DV];             /* each query's weighted values, scaled by e^-top */
    float top[M], total[M];        /* each query's running maximum and sum of weights */
    float folded[M][dk];           /* a key group's scales folded into the queries */
    float weights[M][G];           /* e^(score - top) of the group's tokens */
    for (int64_t m = 0; m < M; m++) {
        top[m] = -FLT_MAX;
        total[m] = 0.0f;
        for (int64_t c = 0; c < DV; c++) acc[m][c] = splat(0.0f);
    }
    for (int64_t g = t0 / G; g * G < t1; g++) {
        const int64_t s0 = g * G, n = (g + 1) * G < t1 ? G : t1 - s0; /* units start on a group */
        /* scores: q . (scale * code + zero) = (q * scale) . code + q . zero, 16 tokens a vector */
        const float *scale = ks + g * dk, *zero = kz + g * dk;
        f32x16 scores[M][TV];
        for (int64_t m = 0; m < M; m++) {
            float bias = 0.0f;
            for (int64_t i = 0; i < dk; i++) {
                folded[m][i] = q[m * dk + i] * scale[i];
                bias += q[m * dk + i] * zero[i];
            }
            for (int64_t v = 0; v < TV; v++) scores[m][v] = splat(bias);
        }
        const uint8_t *group = kc + g * dk * kP;
        for (int64_t i = 0; i < dk; i++)
            for (int64_t v = 0; v < TV; v++) {
                const f32x16 codes = codes16(group + i * kP, v, kP, bits);
                for (int64_t m = 0; m < M; m++) scores[m][v] += folded[m][i] * codes;
            }
        for (int64_t m = 0; m < M; m++) softmax_block(scores[m], TV, n, &top[m], &total[m], acc[m], DV, weights[m]);
        /* values: each token's row dequantized into registers once, added into every query's sum */
        for (int64_t t = 0; t < n; t++) {
            const int64_t s = s0 + t;
            const uint8_t *row = vc + s * vP;
            const float *vscale = vs + s * vgroups, *vzero = vz + s * vgroups;
            for (int64_t c = 0; c < DV; c++) {
                const int64_t grp = c * L / G;
                const f32x16 x = codes16(row, c, vP, bits) * vscale[grp] + vzero[grp];
                for (int64_t m = 0; m < M; m++) acc[m][c] += weights[m][t] * x;
            }
        }
    }
    unit_store(&job->u, unit, M, DV, top, total, &acc[0][0]);
}

#define QUANTIZED(QUERIES, D, BITS) \
    static void quantized_##QUERIES##_##D##_##BITS(const void *job, int64_t unit) { \
        quantized_body(job, unit, QUERIES, D, D, 32, BITS); \
    }
#define QUANTIZED_SHAPES(X) \
    X(1, 64, 8) X(1, 64, 4) X(1, 64, 2) X(2, 64, 8) X(2, 64, 4) X(2, 64, 2) \
    X(4, 64, 8) X(4, 64, 4) X(4, 64, 2) X(8, 64, 8) X(8, 64, 4) X(8, 64, 2) \
    X(1, 128, 8) X(1, 128, 4) X(1, 128, 2) X(2, 128, 8) X(2, 128, 4) X(2, 128, 2) \
    X(4, 128, 8) X(4, 128, 4) X(4, 128, 2) X(8, 128, 8) X(8, 128, 4) X(8, 128, 2)
QUANTIZED_SHAPES(QUANTIZED)

static void quantized_any(const void *job, int64_t unit) {
    const QuantizedJob *j = job;
    quantized_body(j, unit, j->u.M, j->dk, j->u.dv, j->G, j->bits);
}

/* ---------------------------------------------------------------------- the split and the merge */
typedef void (*UnitFn)(const void *, int64_t);

/* Units of ``align``-token multiples, a few per thread so that rows of unequal length balance; returns
 * -1 when the partial results cannot be allocated. */
static int units_plan(Units *u, const int64_t *counts, int64_t B, int64_t h, int64_t M, int64_t dv, int64_t threads,
                      int64_t align) {
    int64_t longest = 0;
    for (int64_t b = 0; b < B; b++) longest = counts[b] > longest ? counts[b] : longest;
    int64_t chunk = (longest + 4 * threads - 1) / (4 * threads);
    if (chunk < 1024) chunk = 1024;
    chunk = (chunk + align - 1) / align * align;
    *u = (Units){counts, B, h, M, dv, chunk, longest > 0 ? (longest + chunk - 1) / chunk : 1, 0, NULL, NULL, NULL};
    u->units = B * h * u->chunks;
    u->part_m = malloc(sizeof(float) * u->units * M);
    u->part_l = malloc(sizeof(float) * u->units * M);
    u->part_acc = malloc(sizeof(float) * u->units * M * dv);
    if (!u->part_m || !u->part_l || !u->part_acc) {
        free(u->part_m); free(u->part_l); free(u->part_acc);
        return -1;
    }
    return 0;
}

static void units_run(const Units *u, const void *job, UnitFn run_unit, int64_t threads) {
    if (threads > u->units) threads = u->units;
    /* OpenMP in PyTorch's own runtime (the process already holds its libgomp): the same worker threads
     * as the matmuls around this call, instead of a second pool spinning against them */
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t unit = 0; unit < u->units; unit++) {
        int64_t b, head, t0, t1;
        unit_range(u, unit, &b, &head, &t0, &t1);
        if (t0 < t1) {
            run_unit(job, unit);
        } else { /* past the row's end: weighs nothing in the merge */
            for (int64_t m = 0; m < u->M; m++) { u->part_m[unit * u->M + m] = -FLT_MAX; u->part_l[unit * u->M + m] = 0.0f; }
        }
    }
}

/* Merges each (row, head)'s units by log-sum-exp into out and lse, and frees the partial results. */
static void units_merge(Units *u, float *out, float *lse) {
    const int64_t M = u->M, dv = u->dv;
    for (int64_t bh = 0; bh < u->B * u->h; bh++) {
        for (int64_t m = 0; m < M; m++) {
            float high = -FLT_MAX, total = 0.0f;
            for (int64_t x = bh * u->chunks; x < (bh + 1) * u->chunks; x++)
                if (u->part_l[x * M + m] > 0.0f && u->part_m[x * M + m] > high) high = u->part_m[x * M + m];
            float *o = out + (bh * M + m) * dv;
            memset(o, 0, sizeof(float) * dv);
            for (int64_t x = bh * u->chunks; x < (bh + 1) * u->chunks; x++) {
                const float weight = u->part_l[x * M + m];
                if (weight <= 0.0f) continue;
                const float w = expf(u->part_m[x * M + m] - high);
                total += w * weight;
                const float *a = u->part_acc + (x * M + m) * dv;
                for (int64_t c = 0; c < dv; c++) o[c] += w * a[c];
            }
            if (total > 0.0f) {
                for (int64_t c = 0; c < dv; c++) o[c] /= total;
                lse[bh * M + m] = high + logf(total);
            } else {
                lse[bh * M + m] = -INFINITY;
            }
        }
    }
    free(u->part_m); free(u->part_l); free(u->part_acc);
}

/* ---------------------------------------------------------------------- entry points */
/* Each returns 0, or -1 for shapes it does not take (the caller then uses the PyTorch path). */
int yoco_dense_attention(const float *q, int64_t q_sb, int64_t q_sh,
                         const void *k, int64_t k_sb, int64_t k_sh, int64_t k_st,
                         const void *v, int64_t v_sb, int64_t v_sh, int64_t v_st,
                         const int64_t *counts, int64_t B, int64_t h, int64_t M, int64_t dk, int64_t dv,
                         int64_t bf16, int64_t threads, float *out, float *lse) {
    if (M < 1 || M > MAX_M || dk < L || dk > MAX_D || dv < L || dv > MAX_D || dk % L || dv % L) return -1;
    if (threads < 1) threads = 1;
    DenseJob job = {{0}, q, q_sb, q_sh, k, k_sb, k_sh, k_st, v, v_sb, v_sh, v_st, dk, bf16 != 0};
    if (units_plan(&job.u, counts, B, h, M, dv, threads, L)) return -1;
    UnitFn run_unit = bf16 ? dense_bf16_any : dense_any;
#define CASE(QUERIES, D) \
    if (M == QUERIES && dk == D && dv == D) run_unit = bf16 ? dense_bf16_##QUERIES##_##D : dense_##QUERIES##_##D;
    DENSE_SHAPES(CASE)
#undef CASE
    units_run(&job.u, &job, run_unit, threads);
    units_merge(&job.u, out, lse);
    return 0;
}

static int planes_ok(int64_t P) { return P == 8 || (P > 0 && P % L == 0); }

int yoco_quantized_attention(
    const float *q, int64_t q_sb, int64_t q_sh,
    const uint8_t *kc, int64_t kc_sb, int64_t kc_sh, const float *ks, const float *kz, int64_t ks_sb, int64_t ks_sh,
    const uint8_t *vc, int64_t vc_sb, int64_t vc_sh, const float *vs, const float *vz, int64_t vs_sb, int64_t vs_sh,
    const int64_t *counts, int64_t B, int64_t h, int64_t M, int64_t dk, int64_t dv, int64_t bits, int64_t G,
    int64_t threads, float *out, float *lse) {
    if (bits != 2 && bits != 4 && bits != 8) return -1;
    const int64_t per = 8 / bits;
    if (M < 1 || M > MAX_M || dk < L || dk > MAX_D || dv < L || dv > MAX_D || G < L || G > MAX_G || G % L
        || dk % L || dv % L || dv % G || !planes_ok(G / per) || !planes_ok(dv / per))
        return -1;
    if (threads < 1) threads = 1;
    QuantizedJob job = {{0}, q, q_sb, q_sh, kc, kc_sb, kc_sh, ks, kz, ks_sb, ks_sh, vc, vc_sb, vc_sh, vs, vz,
                        vs_sb, vs_sh, dk, bits, G};
    if (units_plan(&job.u, counts, B, h, M, dv, threads, G)) return -1; /* units start on a key group */
    UnitFn run_unit = quantized_any;
#define CASE(QUERIES, D, BITS) \
    if (M == QUERIES && dk == D && dv == D && G == 32 && bits == BITS) run_unit = quantized_##QUERIES##_##D##_##BITS;
    QUANTIZED_SHAPES(CASE)
#undef CASE
    units_run(&job.u, &job, run_unit, threads);
    units_merge(&job.u, out, lse);
    return 0;
}
