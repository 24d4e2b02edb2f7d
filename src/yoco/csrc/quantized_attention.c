/* Decode attention straight from KIVI-quantized keys and values (yoco/quantize.py), on the CPU.
 *
 * Few queries (a decode step: the query heads of one K/V head) read a long quantized cache once:
 * codes are unpacked into vector registers and never written back as a full-precision cache, and the
 * softmax is online (flash-decoding), so no score array is materialised either. Scale folding (KIVI):
 * a key group's per-channel scales multiply the queries once per group instead of every key, and its
 * zero points give one bias per query. The work is split into (row, K/V head, token range) units over
 * OpenMP threads; the units' partial results are merged by their log-sum-exp.
 *
 * Layout (what yoco.quantize.QuantizedKV holds; strides in elements, given per buffer):
 *   q       [B, h, M, dk] float32, already multiplied by the softmax scale
 *   k_codes [B, h, S / G, dk, G * bits / 8] uint8: each channel's codes of a group's G tokens, packed
 *           planar: byte j holds tokens j, j + P, j + 2P, ... (P = G * bits / 8), the first in the low bits
 *   k_scale, k_zero [B, h, S / G, dk] float32 (per channel over G tokens)
 *   v_codes [B, h, S, dv * bits / 8] uint8: each token's channels, packed planar the same way
 *   v_scale, v_zero [B, h, S, dv / G] float32 (per token over G channels)
 *   counts  [B] int64: the positions of each row to read (0..counts[b]-1)
 *   out     [B, h, M, dv] float32, lse [B, h, M] float32 (-inf and zeros for a row with no positions)
 * Written with GCC/Clang vector types of 16 floats, so it compiles to the machine's vectors (AVX-512,
 * AVX2, NEON or scalar code); the common shapes are specialised so that the accumulators live in
 * registers. Takes G % 16 == 0, dk % 16 == 0, dv % 16 == 0 and packed planes of 8 or a multiple of 16
 * bytes; anything else returns -1 and the caller uses the PyTorch path.
 */
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
#define L 16 /* floats per vector */

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

typedef struct {
    const float *q; int64_t q_sb, q_sh;
    const uint8_t *kc; int64_t kc_sb, kc_sh;
    const float *ks, *kz; int64_t ks_sb, ks_sh;
    const uint8_t *vc; int64_t vc_sb, vc_sh;
    const float *vs, *vz; int64_t vs_sb, vs_sh;
    const int64_t *counts;
    int64_t B, h, M, dk, dv, bits, G, chunk, chunks;
    float *part_m, *part_l, *part_acc; /* per unit: [M], [M], [M * dv] */
} Job;

static inline f32x16 load16(const float *p) { f32x16 v; memcpy(&v, p, sizeof v); return v; }
static inline void store16(float *p, f32x16 v) { memcpy(p, &v, sizeof v); }
static inline f32x16 splat(float x) { return (f32x16){0} + x; }

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

/* e^x for x <= 0 (a score minus the running maximum) to float precision: 2^n e^r with
 * n = round(x / ln 2) and a degree-6 polynomial for e^r, |r| <= ln 2 / 2; 2^n built from its bits. */
static inline f32x16 exp_nonpositive(f32x16 x) {
    const i32x16 below = x < -87.0f;
    x = (f32x16)(((i32x16)x & ~below) | ((i32x16)splat(-87.0f) & below));
    const i32x16 n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, i32x16); /* toward zero */
    const f32x16 nf = __builtin_convertvector(n, f32x16);
    const f32x16 r = (x - nf * 0.693145751953125f) - nf * 1.428606765330187045e-6f;
    f32x16 p = r * (1.0f / 720.0f) + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return p * (f32x16)((n + 127) << 23);
}

static inline f32x16 vmax(f32x16 a, f32x16 b) {
    const i32x16 greater = a > b;
    return (f32x16)(((i32x16)a & greater) | ((i32x16)b & ~greater));
}
static inline float hsum(f32x16 v) { float s = 0.0f; for (int i = 0; i < L; i++) s += v[i]; return s; }

/* One unit's work. Always inlined into the specialisations below, so that for the common shapes M,
 * the dims, the group and the bit width are constants: every loop over them unrolls and the score and
 * output accumulators stay in registers. */
static inline __attribute__((always_inline)) void unit_body(Job *job, int64_t unit, const int64_t M, const int64_t dk,
                                                            const int64_t dv, const int64_t G, const int64_t bits) {
    const int64_t chunks = job->chunks, per = 8 / bits;
    const int64_t kP = G / per, vP = dv / per, vgroups = dv / G, TV = G / L, DV = dv / L; /* P: bytes a plane */
    const int64_t bh = unit / chunks, b = bh / job->h, head = bh % job->h;
    const int64_t t0 = (unit % chunks) * job->chunk;
    int64_t t1 = t0 + job->chunk;
    if (t1 > job->counts[b]) t1 = job->counts[b];
    float *mx = job->part_m + unit * M, *l = job->part_l + unit * M, *out = job->part_acc + unit * M * dv;
    for (int64_t m = 0; m < M; m++) { mx[m] = -FLT_MAX; l[m] = 0.0f; }
    memset(out, 0, sizeof(float) * M * dv);
    if (t0 >= t1) return;

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
        /* online softmax: rescale what is accumulated when a larger score arrives */
        for (int64_t m = 0; m < M; m++) {
            float high = top[m];
            if (n == G) {
                f32x16 most = scores[m][0];
                for (int64_t v = 1; v < TV; v++) most = vmax(most, scores[m][v]);
                for (int i = 0; i < L; i++) high = most[i] > high ? most[i] : high;
            } else { /* a short last group: the scores of its n tokens only */
                for (int64_t v = 0; v < TV; v++) store16(&weights[m][v * L], scores[m][v]);
                for (int64_t t = 0; t < n; t++) high = weights[m][t] > high ? weights[m][t] : high;
            }
            if (high > top[m]) {
                const float factor = exp_nonpositive(splat(top[m] - high))[0];
                total[m] *= factor;
                for (int64_t c = 0; c < DV; c++) acc[m][c] *= factor;
                top[m] = high;
            }
            f32x16 sum = splat(0.0f);
            for (int64_t v = 0; v < TV; v++) {
                f32x16 e = exp_nonpositive(scores[m][v] - high);
                if (n < G)
                    for (int64_t i = 0; i < L; i++) e[i] = v * L + i < n ? e[i] : 0.0f;
                store16(&weights[m][v * L], e);
                sum += e;
            }
            total[m] += hsum(sum);
        }
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
    for (int64_t m = 0; m < M; m++) {
        mx[m] = top[m];
        l[m] = total[m];
        for (int64_t c = 0; c < DV; c++) store16(out + m * dv + c * L, acc[m][c]);
    }
}

#define SPECIALISE(QUERIES, D, BITS) \
    static void unit_##QUERIES##_##D##_##BITS(Job *job, int64_t unit) { unit_body(job, unit, QUERIES, D, D, 32, BITS); }
#define FOR_SHAPES(X) \
    X(1, 64, 8) X(1, 64, 4) X(1, 64, 2) X(2, 64, 8) X(2, 64, 4) X(2, 64, 2) \
    X(4, 64, 8) X(4, 64, 4) X(4, 64, 2) X(8, 64, 8) X(8, 64, 4) X(8, 64, 2) \
    X(1, 128, 8) X(1, 128, 4) X(1, 128, 2) X(2, 128, 8) X(2, 128, 4) X(2, 128, 2) \
    X(4, 128, 8) X(4, 128, 4) X(4, 128, 2) X(8, 128, 8) X(8, 128, 4) X(8, 128, 2)
FOR_SHAPES(SPECIALISE)

static void unit_any(Job *job, int64_t unit) { unit_body(job, unit, job->M, job->dk, job->dv, job->G, job->bits); }

typedef void (*UnitFn)(Job *, int64_t);

static UnitFn unit_for(const Job *job) {
#define CASE(QUERIES, D, BITS) \
    if (job->M == QUERIES && job->dk == D && job->dv == D && job->G == 32 && job->bits == BITS) \
        return unit_##QUERIES##_##D##_##BITS;
    FOR_SHAPES(CASE)
#undef CASE
    return unit_any;
}

static int planes_ok(int64_t P) { return P == 8 || (P > 0 && P % L == 0); }

/* Returns 0, or -1 for shapes it does not take (the caller then uses the PyTorch path). */
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
    int64_t longest = 0;
    for (int64_t b = 0; b < B; b++) longest = counts[b] > longest ? counts[b] : longest;
    if (threads < 1) threads = 1;
    /* units of whole key groups, a few per thread so that rows of unequal length balance */
    int64_t chunk = (longest + 4 * threads - 1) / (4 * threads);
    if (chunk < 1024) chunk = 1024;
    chunk = (chunk + G - 1) / G * G;
    const int64_t chunks = longest > 0 ? (longest + chunk - 1) / chunk : 1, units = B * h * chunks;

    Job job = {q, q_sb, q_sh, kc, kc_sb, kc_sh, ks, kz, ks_sb, ks_sh, vc, vc_sb, vc_sh, vs, vz, vs_sb, vs_sh,
               counts, B, h, M, dk, dv, bits, G, chunk, chunks, NULL, NULL, NULL};
    job.part_m = malloc(sizeof(float) * units * M);
    job.part_l = malloc(sizeof(float) * units * M);
    job.part_acc = malloc(sizeof(float) * units * M * dv);
    if (!job.part_m || !job.part_l || !job.part_acc) {
        free(job.part_m); free(job.part_l); free(job.part_acc);
        return -1;
    }
    if (threads > units) threads = units;
    const UnitFn run_unit = unit_for(&job);
    /* OpenMP in PyTorch's own runtime (the process already holds its libgomp): the same worker threads
     * as the matmuls around this call, instead of a second pool spinning against them */
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t unit = 0; unit < units; unit++) run_unit(&job, unit);

    /* merge each (row, head)'s units by log-sum-exp */
    for (int64_t bh = 0; bh < B * h; bh++) {
        for (int64_t m = 0; m < M; m++) {
            float high = -FLT_MAX, total = 0.0f;
            for (int64_t u = bh * chunks; u < (bh + 1) * chunks; u++)
                if (job.part_l[u * M + m] > 0.0f && job.part_m[u * M + m] > high) high = job.part_m[u * M + m];
            float *o = out + (bh * M + m) * dv;
            memset(o, 0, sizeof(float) * dv);
            for (int64_t u = bh * chunks; u < (bh + 1) * chunks; u++) {
                const float weight = job.part_l[u * M + m];
                if (weight <= 0.0f) continue;
                const float w = expf(job.part_m[u * M + m] - high);
                total += w * weight;
                const float *a = job.part_acc + (u * M + m) * dv;
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
    free(job.part_m); free(job.part_l); free(job.part_acc);
    return 0;
}
