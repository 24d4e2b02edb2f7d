/* Sliding-window and causal attention of a prefill chunk on the CPU (flash attention: an online softmax
 * over key blocks, so no score matrix beyond one tile is ever held).
 *
 * Query t of the chunk sits at key index E + t (E keys come before the chunk: a ring's earlier window,
 * or a cache's earlier keys) and sees the keys j with E + t - W < j <= E + t (W >= E + T: every earlier
 * key, plain causal attention). The work is split into tiles of (row, K/V head, QT positions); a tile's
 * rows are the G query heads of its K/V head at its QT positions, which all read the same W + QT - 1
 * keys, so each key block is read once for G * QT rows; only the blocks the tile's band reaches are
 * visited. A unit of work is GROUP consecutive tiles, which take the keys span by span (see window_unit).
 * Per key block and tile:
 *   scores S = Q K^T  (register tiles of 8 rows x 32 keys: one broadcast query value, two key vectors)
 *   the window's band masked (-inf, only on blocks the band cuts), online softmax per row
 *   O += P V          (register tiles of 4 rows x 64 dims: one broadcast weight, four value vectors)
 *
 * Layouts (strides in elements):
 *   q [B, H, T, d] and out [B, H, T, d] (each position's d floats dense; queries not scaled: scale is
 *   applied here), kt [B, h, Sp / KB, d, KB] the keys in blocks of KB positions, each block transposed
 *   (its d rows of KB positions dense, blocks kt_sblock apart; Sp >= S rounded up to KB, what lies past S
 *   never weighs): a block is one dense 8 KB piece, where rows of a whole transposed key matrix lay far
 *   apart (at 32K keys, 128 KB: a TLB miss per row), v [B, h, S, d] (each position's d floats dense);
 *   h divides H.
 *   d % 16 == 0 and d <= 128; anything else returns -1 and the caller takes the PyTorch path.
 */
#include "vectors.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QT 16          /* query positions per tile */
#define KB 32          /* keys per block */
#define MAX_ROWS 128   /* G * QT: query heads per K/V head times positions */
#define MAX_DW 128     /* head dim */
#define GROUP 4        /* tiles per unit: they visit each span of keys in turn */
#define SPAN 512       /* keys per span (K and V of 64 wide: 256 KB, in the core's L2) */

typedef struct {
    const float *q; int64_t q_sb, q_sh, q_st;
    const float *kt; int64_t kt_sb, kt_sh, kt_sblock;
    const float *v; int64_t v_sb, v_sh, v_st;
    float *out; int64_t o_sb, o_sh, o_st;
    int64_t H, h, G, T, S, d, E, W, tiles;
    float scale;
} WindowJob;

/* One tile's running state: its rows' scaled queries, weighted values, maxima and sums. */
typedef struct {
    float qs[MAX_ROWS * MAX_DW] __attribute__((aligned(64)));   /* rows' queries, scaled; row r = g * QT + p */
    float acc[MAX_ROWS * MAX_DW] __attribute__((aligned(64)));  /* rows' weighted values */
    float top[MAX_ROWS] __attribute__((aligned(64))), total[MAX_ROWS] __attribute__((aligned(64)));
} TileState;

static void tile_begin(const WindowJob *job, TileState *st, int64_t b, int64_t head, int64_t t0, int64_t n) {
    const int64_t d = job->d, G = job->G;
    for (int64_t g = 0; g < G; g++)
        for (int64_t i = 0; i < QT; i++) {
            const int64_t r = g * QT + i;
            st->top[r] = -INFINITY;
            st->total[r] = 0.0f;
            memset(st->acc + r * d, 0, sizeof(float) * d);
            if (i < n) {
                const float *src = job->q + b * job->q_sb + (head * G + g) * job->q_sh + (t0 + i) * job->q_st;
                for (int64_t c = 0; c < d; c++) st->qs[r * d + c] = src[c] * job->scale;
            } else {
                memset(st->qs + r * d, 0, sizeof(float) * d); /* past the chunk's end: computed, never written */
            }
        }
}

static void tile_end(const WindowJob *job, const TileState *st, int64_t b, int64_t head, int64_t t0, int64_t n) {
    const int64_t d = job->d, G = job->G;
    for (int64_t g = 0; g < G; g++)
        for (int64_t i = 0; i < n; i++) {
            const int64_t r = g * QT + i;
            float *dst = job->out + b * job->o_sb + (head * G + g) * job->o_sh + (t0 + i) * job->o_st;
            const float inv = 1.0f / st->total[r];
            for (int64_t c = 0; c < d; c++) dst[c] = st->acc[r * d + c] * inv;
        }
}

/* One tile (positions t0 .. t0 + n - 1 of K/V head `head` of row `b`) over its key blocks from j_from up
 * to (not including) j_to, both multiples of KB. */
static inline __attribute__((always_inline)) void tile_blocks(const WindowJob *job, TileState *st, int64_t b,
                                                               int64_t head, int64_t t0, int64_t n,
                                                               int64_t j_from, int64_t j_to, const int64_t d) {
    const int64_t D = d / L, G = job->G, W = job->W, E = job->E, R = G * QT, last = E + t0 + n - 1;
    float *qs = st->qs, *acc = st->acc, *top = st->top, *total = st->total;
    float p[MAX_ROWS * KB] __attribute__((aligned(64)));          /* scores, then weights */
    const float *kt = job->kt + b * job->kt_sb + head * job->kt_sh, *v = job->v + b * job->v_sb + head * job->v_sh;
    const int64_t PR = D <= 4 ? 4 : 2; /* rows of a weighted-values tile: its accumulators fit the registers */
    for (int64_t j0 = j_from; j0 < j_to; j0 += KB) {
        const int64_t nk = j0 + KB <= last + 1 ? KB : last + 1 - j0;
        const float *kb = kt + (j0 / KB) * job->kt_sblock; /* this block's keys: d rows of KB */
        /* scores: tiles of 8 rows x 32 keys */
        for (int64_t r0 = 0; r0 < R; r0 += 8) {
            f32x16 s[8][2];
            for (int r = 0; r < 8; r++) s[r][0] = s[r][1] = splat(0.0f);
            for (int64_t c = 0; c < d; c++) {
                const f32x16 k0 = load16(kb + c * KB), k1 = load16(kb + c * KB + L);
                for (int r = 0; r < 8; r++) {
                    const f32x16 x = splat(qs[(r0 + r) * d + c]);
                    s[r][0] += x * k0;
                    s[r][1] += x * k1;
                }
            }
            for (int r = 0; r < 8; r++) {
                store16(p + (r0 + r) * KB, s[r][0]);
                store16(p + (r0 + r) * KB + L, s[r][1]);
            }
        }
        /* the band: position i sees keys E + t0 + i - W < j <= E + t0 + i; masked only where it cuts */
        const int band_cuts = j0 <= E + t0 + (n - 1) - W || j0 + KB - 1 > E + t0;
        if (band_cuts || nk < KB)
            for (int64_t r = 0; r < R; r++) {
                const int64_t i = r % QT, hi = E + t0 + i, lo = hi - W + 1;
                float *row = p + r * KB;
                for (int64_t j = 0; j < KB; j++)
                    if (j >= nk || j0 + j < lo || j0 + j > hi) row[j] = -INFINITY;
            }
        /* online softmax, 16 rows at a time (R = G * QT is a multiple of 16): their maxima and sums are
         * reduced across lanes together (maxes16, sums16), not row by row */
        for (int64_t r0 = 0; r0 < R; r0 += L) {
            f32x16 part[L];
            for (int r = 0; r < L; r++) part[r] = vmax(load16(p + (r0 + r) * KB), load16(p + (r0 + r) * KB + L));
            const f32x16 before = load16(top + r0), high = vmax(maxes16(part), before);
            /* the earlier weights' factor: e^(before - high), 0 before any key was seen (-inf) */
            const f32x16 factor = (f32x16)((i32x16)exp_nonpositive(before - high) & (before != -INFINITY));
            store16(top + r0, high);
            store16(total + r0, load16(total + r0) * factor);
            for (int r = 0; r < L; r++) {
                float *row = p + (r0 + r) * KB;
                if (high[r] == -INFINITY) { /* sees none of this block (past the chunk's end, or the band) */
                    memset(row, 0, sizeof(float) * KB);
                    part[r] = splat(0.0f);
                    continue;
                }
                if (high[r] > before[r]) /* the maximum rose: what was summed so far weighs less */
                    for (int64_t c = 0; c < D; c++)
                        store16(acc + (r0 + r) * d + c * L, load16(acc + (r0 + r) * d + c * L) * factor[r]);
                f32x16 sum = splat(0.0f);
                for (int64_t x = 0; x < KB; x += L) {
                    const f32x16 sc = load16(row + x);
                    /* a masked score weighs 0 */
                    const f32x16 e = (f32x16)((i32x16)exp_nonpositive(sc - high[r]) & (sc != -INFINITY));
                    store16(row + x, e);
                    sum += e;
                }
                part[r] = sum;
            }
            store16(total + r0, load16(total + r0) + sums16(part));
        }
        /* weighted values: tiles of PR rows x d */
        for (int64_t r0 = 0; r0 < R; r0 += PR) {
            f32x16 o[4][MAX_DW / L];
            for (int64_t r = 0; r < PR; r++)
                for (int64_t c = 0; c < D; c++) o[r][c] = load16(acc + (r0 + r) * d + c * L);
            for (int64_t j = 0; j < nk; j++) {
                const float *vr = v + (j0 + j) * job->v_st;
                f32x16 x[MAX_DW / L];
                for (int64_t c = 0; c < D; c++) x[c] = load16(vr + c * L);
                for (int64_t r = 0; r < PR; r++) {
                    const f32x16 w = splat(p[(r0 + r) * KB + j]);
                    for (int64_t c = 0; c < D; c++) o[r][c] += w * x[c];
                }
            }
            for (int64_t r = 0; r < PR; r++)
                for (int64_t c = 0; c < D; c++) store16(acc + (r0 + r) * d + c * L, o[r][c]);
        }
    }
}

/* One unit: K/V head `head` of row `b`, tiles GROUP * grp .. (at most GROUP of them). The unit walks the
 * keys in spans of SPAN; each tile takes the blocks of a span that its band reaches, so a span is read
 * from memory once for all the unit's tiles and stays in the core's cache while they take it (one tile
 * at a time read each of its keys from memory: at 32K keys, 4x the traffic, and slower than PyTorch's
 * flash attention). */
static inline __attribute__((always_inline)) void window_unit(const WindowJob *job, TileState *states, int64_t b,
                                                               int64_t head, int64_t grp, const int64_t d) {
    const int64_t W = job->W, E = job->E, first_tile = grp * GROUP;
    const int64_t tiles = first_tile + GROUP <= job->tiles ? GROUP : job->tiles - first_tile;
    int64_t t0[GROUP], n[GROUP], from[GROUP], to[GROUP], lo = INT64_MAX, hi = 0;
    for (int64_t u = 0; u < tiles; u++) {
        t0[u] = (first_tile + u) * QT;
        n[u] = t0[u] + QT <= job->T ? QT : job->T - t0[u];
        tile_begin(job, states + u, b, head, t0[u], n[u]);
        /* the blocks holding the keys any row sees (keys come in blocks; the last may be partial) */
        const int64_t seen = E + t0[u] - W + 1 > 0 ? E + t0[u] - W + 1 : 0;
        from[u] = seen - seen % KB;
        to[u] = (E + t0[u] + n[u] + KB - 1) / KB * KB;
        lo = from[u] < lo ? from[u] : lo;
        hi = to[u] > hi ? to[u] : hi;
    }
    for (int64_t s0 = lo - lo % SPAN; s0 < hi; s0 += SPAN)
        for (int64_t u = 0; u < tiles; u++) {
            const int64_t a = from[u] > s0 ? from[u] : s0, z = to[u] < s0 + SPAN ? to[u] : s0 + SPAN;
            if (a < z) tile_blocks(job, states + u, b, head, t0[u], n[u], a, z, d);
        }
    for (int64_t u = 0; u < tiles; u++) tile_end(job, states + u, b, head, t0[u], n[u]);
}

/* The common head dims as constants, so the tiles' loops over d unroll. */
static void window_unit_64(const WindowJob *job, TileState *s, int64_t b, int64_t head, int64_t grp) {
    window_unit(job, s, b, head, grp, 64);
}
static void window_unit_128(const WindowJob *job, TileState *s, int64_t b, int64_t head, int64_t grp) {
    window_unit(job, s, b, head, grp, 128);
}
static void window_unit_any(const WindowJob *job, TileState *s, int64_t b, int64_t head, int64_t grp) {
    window_unit(job, s, b, head, grp, job->d);
}

int yoco_window_attention(const float *q, int64_t q_sb, int64_t q_sh, int64_t q_st,
                          const float *kt, int64_t kt_sb, int64_t kt_sh, int64_t kt_sblock,
                          const float *v, int64_t v_sb, int64_t v_sh, int64_t v_st,
                          int64_t B, int64_t H, int64_t h, int64_t T, int64_t S, int64_t d, int64_t E, int64_t W,
                          float scale, int64_t threads, float *out, int64_t o_sb, int64_t o_sh, int64_t o_st) {
    if (d < L || d > MAX_DW || d % L || h < 1 || H % h || (H / h) * QT > MAX_ROWS || W < 1 || E < 0 || T < 1
        || S < E + T)
        return -1;
    if (threads < 1) threads = 1;
    const int64_t tiles = (T + QT - 1) / QT, groups = (tiles + GROUP - 1) / GROUP;
    const WindowJob job = {q, q_sb, q_sh, q_st, kt, kt_sb, kt_sh, kt_sblock, v, v_sb, v_sh, v_st, out, o_sb, o_sh, o_st,
                           H, h, H / h, T, S, d, E, W, tiles, scale};
    void (*unit)(const WindowJob *, TileState *, int64_t, int64_t, int64_t) =
        d == 64 ? window_unit_64 : d == 128 ? window_unit_128 : window_unit_any;
    const int64_t units = B * h * groups;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        TileState *states = aligned_alloc(64, sizeof(TileState) * GROUP);
        if (!states) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t x = 0; x < units; x++) {
            if (!states) continue;
            const int64_t bh = x / groups;
            unit(&job, states, bh / h, bh % h, x % groups);
        }
        free(states);
    }
    return failed ? -1 : 0;
}
