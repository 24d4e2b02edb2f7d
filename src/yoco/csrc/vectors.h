/* What yoco's native kernels share: vectors of 16 floats (GCC/Clang vector types, compiled to the
 * machine's AVX-512, AVX2, NEON or scalar code) and the few operations on them they all use. */
#ifndef YOCO_VECTORS_H
#define YOCO_VECTORS_H

#include <stdint.h>
#include <string.h>

#define L 16 /* floats per vector */

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

static inline f32x16 load16(const float *p) { f32x16 v; memcpy(&v, p, sizeof v); return v; }
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

#endif
