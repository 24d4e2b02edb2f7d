/* What yoco's native kernels share: vectors of 16 floats (GCC/Clang vector types, compiled to the
 * machine's AVX-512, AVX2, NEON or scalar code) and the few operations on them they all use. */
#ifndef YOCO_VECTORS_H
#define YOCO_VECTORS_H

#include <stdint.h>
#include <string.h>

#define L 16 /* floats per vector */

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

typedef uint16_t u16x16 __attribute__((vector_size(32)));

static inline f32x16 load16(const float *p) { f32x16 v; memcpy(&v, p, sizeof v); return v; }
/* 16 bfloat16 values widened to float32 (exactly: a bfloat16 is a float32's upper half). */
static inline f32x16 load16_bf16(const uint16_t *p) {
    u16x16 h;
    memcpy(&h, p, sizeof h);
    return (f32x16)(__builtin_convertvector(h, i32x16) << 16);
}
static inline void store16(float *p, f32x16 v) { memcpy(p, &v, sizeof v); }
static inline f32x16 splat(float x) { return (f32x16){0} + x; }

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

/* Lanes of a and b (b's numbered 16..31) picked by constant indices. */
#if defined(__clang__)
#define PICK(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define PICK(a, b, ...) __builtin_shuffle(a, b, (i32x16){__VA_ARGS__})
#endif

/* The four rounds of pairing two vectors' lane halves with a lane-wise COMBINE (a + b, max), so that a
 * pair's partial results share one vector: round r keeps 16 / 2^r results of each of its two inputs. */
#define PAIR1(COMBINE, a, b) \
    COMBINE(PICK(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23), \
            PICK(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31))
#define PAIR2(COMBINE, a, b) \
    COMBINE(PICK(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27), \
            PICK(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31))
#define PAIR3(COMBINE, a, b) \
    COMBINE(PICK(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29), \
            PICK(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31))
#define PAIR4(COMBINE, a, b) \
    COMBINE(PICK(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30), \
            PICK(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31))

/* The sums of 16 vectors, as one vector: lane t = the sum of v[t]'s lanes. Four rounds of pairing: 15
 * additions and 30 shuffles for what 16 horizontal sums would take 16 x 4 rounds of. REDUCE16(COMBINE)
 * is that body for any lane-wise COMBINE (v: the 16 vectors). */
#define REDUCE16(COMBINE)                                                        \
    f32x16 w[8], x[4], y[2];                                                     \
    for (int i = 0; i < 8; i++) w[i] = PAIR1(COMBINE, v[2 * i], v[2 * i + 1]); \
    for (int i = 0; i < 4; i++) x[i] = PAIR2(COMBINE, w[2 * i], w[2 * i + 1]); \
    for (int i = 0; i < 2; i++) y[i] = PAIR3(COMBINE, x[2 * i], x[2 * i + 1]); \
    return PAIR4(COMBINE, y[0], y[1])

static inline f32x16 vadd(f32x16 a, f32x16 b) { return a + b; }
static inline f32x16 sums16(const f32x16 *v) { REDUCE16(vadd); }
/* The maxima of 16 vectors, as one vector (lane t = the largest of v[t]'s lanes), the same way. */
static inline f32x16 maxes16(const f32x16 *v) { REDUCE16(vmax); }

#endif
