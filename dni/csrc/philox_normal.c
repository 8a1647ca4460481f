/* Counter-based Gaussian noise and fused noisy recurrent steps for dni (CPU).
 *
 * Noise: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
 * SC 2011; the generator of Random123, cuRAND and JAX) followed by the Box-Muller
 * transform. Output i of stream `key` comes from Philox block (counter + i / 4), lane
 * i % 4; lanes (0, 1) and (2, 3) of a block are the two uniforms of one Box-Muller pair.
 * A stream is reproducible from (key, counter) alone, and different keys give
 * independent streams. A second stream, ARS (below), is chosen by the `stream` argument
 * of the functions that draw (STREAM_PHILOX or STREAM_ARS).
 *
 * Uniforms: u1 = (x + 0.5) / 2^32 in (0, 1), u2 = x / 2^32 in [0, 1); normals:
 * sqrt(-2 ln u1) * (cos, sin)(2 pi u2). The smallest u1 bounds |z| < 6.78
 * (P(|z| > 6.78) = 1.2e-11 for a true normal).
 *
 * The math functions are inline polynomial approximations (Cephes' single-precision
 * minimax polynomials, relative error ~1e-7) so that gcc vectorises every loop without
 * calling libm, and without -ffast-math (which would change the process's
 * floating-point mode). The fused steps compute exactly what dni/models.py computes
 * (pre-activation + noise, then the gates), to within float rounding.
 *
 * The whole-recurrence loops at the end run every step of a row block of the batch (GEMM
 * through the BLAS sgemm that dni/kernels.py hands over, then the fused step), the blocks
 * in parallel on OpenMP threads where the library is built with -fopenmp.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u
#define CHUNK 256
#define PREFETCH_ROWS 16 /* rows ahead at which the fused LSTM step prefetches xp */

#define PHILOX_ROUND                                            \
    {                                                           \
        uint64_t p0 = (uint64_t)PHILOX_M0 * c0;                 \
        uint64_t p1 = (uint64_t)PHILOX_M1 * c2;                 \
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;           \
        uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;           \
        c0 = n0; c1 = (uint32_t)p1; c2 = n2; c3 = (uint32_t)p0; \
        k0 += PHILOX_W0; k1 += PHILOX_W1;                       \
    }

static inline float as_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t as_uint(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* Natural logarithm for x > 0 (normal floats). */
static inline float ln_f(float x) {
    uint32_t u = as_uint(x);
    int e = (int)((u >> 23) & 0xff) - 126;
    float m = as_float((u & 0x007fffffu) | 0x3f000000u); /* m in [0.5, 1) */
    int small = m < 0.70710678f;
    e -= small;
    m = small ? m + m - 1.0f : m - 1.0f;
    float z = m * m;
    float y = 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    y += -2.12194440e-4f * (float)e;
    y += -0.5f * z;
    return m + y + 0.693359375f * (float)e;
}

/* The bound of exp_f's clamp, 87, read once per call of a gate loop (exp_bound) and passed
 * down as a value. With the literal in exp_f, gcc folds the clamp into the multiply by
 * log2(e) that follows and vectorises it as four compares and six blends per exp; with a
 * run-time value it emits one vmaxps and one vminps, and the gate loops run ~16% faster.
 * Checked over all 2^32 inputs of the vectorised sigmoid_f and tanh_f: the same bits for
 * every input but NaN, which still gives NaN (its sign bit may differ). */
static volatile float exp_clamp = 87.0f;
static inline float exp_bound(void) { return exp_clamp; }

/* exp(x), x clamped to [-hi, hi], hi = exp_bound() = 87. */
static inline float exp_f(float x, float hi) {
    x = x < -hi ? -hi : x;
    x = x > hi ? hi : x;
    float n = __builtin_rintf(x * 1.44269504088896341f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    return y * as_float((uint32_t)((int)n + 127) << 23);
}

static inline float sigmoid_f(float x, float hi) { return 1.0f / (1.0f + exp_f(-x, hi)); }
static inline float tanh_f(float x, float hi) { return 2.0f / (1.0f + exp_f(-2.0f * x, hi)) - 1.0f; } /* 2 sigmoid(2x) - 1 */

/* (cos, sin)(2 pi v) for v in [0, 1): quadrant from 4v, polynomials on [-pi/4, pi/4]. */
static inline void sincos_2pi(float v, float *c, float *s) {
    float q4 = v * 4.0f;
    float qn = __builtin_rintf(q4); /* 0..4 */
    float a = (q4 - qn) * 1.5707963267948966f; /* in [-pi/4, pi/4] */
    float a2 = a * a;
    float sp = ((-1.9515295891e-4f * a2 + 8.3321608736e-3f) * a2 - 1.6666654611e-1f) * a2 * a + a;
    float cp = ((2.443315711809948e-5f * a2 - 1.388731625493765e-3f) * a2 + 4.166664568298827e-2f) * a2 * a2 - 0.5f * a2 + 1.0f;
    uint32_t q = (uint32_t)(int)qn;
    /* quadrant q: (cos, sin) = (cp, sp), (-sp, cp), (-cp, -sp), (sp, -cp); q = 4 (v near 1) is 0 */
    float x = (q & 1) ? sp : cp, y = (q & 1) ? cp : sp;
    *c = as_float(as_uint(x) ^ (((q + 1) & 2) << 30));
    *s = as_float(as_uint(y) ^ ((q & 2) << 30));
}

#ifdef __AVX512F__
/* Philox4x32-10 of the 8 v blocks counter .. counter + 8 v - 1, v vectors of 8 blocks with
 * each 32-bit word in the low half of a 64-bit lane: one _mm512_mul_epu32 then gives a whole
 * 32 x 32 -> 64-bit product (hi and lo words) without shuffles, and the upper halves, which
 * collect garbage, are never read (the multiply reads low halves, the stores truncate).
 * The v vectors are independent chains of ten rounds: v = 4 keeps the multiplier busy
 * while each round waits for the last one's products (~10% faster than v = 2 here).
 * Integer maths only: the same bits as the portable loop below, which gcc vectorises
 * less well. */
static inline __attribute__((always_inline)) void philox_vectors(uint32_t *r0, uint32_t *r1, uint32_t *r2,
                                                                 uint32_t *r3, uint64_t counter, uint32_t key0,
                                                                 uint32_t key1, const int v_count) {
    const __m512i m0 = _mm512_set1_epi64(PHILOX_M0), m1 = _mm512_set1_epi64(PHILOX_M1);
    __m512i c0[4], c1[4], c2[4], c3[4];
    for (int v = 0; v < v_count; v++) {
        const __m512i cnt = _mm512_add_epi64(_mm512_set1_epi64((long long)counter),
                                             _mm512_setr_epi64(8 * v, 8 * v + 1, 8 * v + 2, 8 * v + 3, 8 * v + 4,
                                                               8 * v + 5, 8 * v + 6, 8 * v + 7));
        c0[v] = cnt; /* low word of the 64-bit counter */
        c1[v] = _mm512_srli_epi64(cnt, 32); /* high word */
        c2[v] = _mm512_setzero_si512();
        c3[v] = _mm512_setzero_si512();
    }
    uint32_t k0 = key0, k1 = key1;
    for (int r = 0; r < 10; r++) {
        const __m512i kk0 = _mm512_set1_epi64(k0), kk1 = _mm512_set1_epi64(k1);
        for (int v = 0; v < v_count; v++) {
            const __m512i p0 = _mm512_mul_epu32(c0[v], m0), p1 = _mm512_mul_epu32(c2[v], m1);
            /* 0x96: a ^ b ^ c */
            c0[v] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p1, 32), c1[v], kk0, 0x96);
            c2[v] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p0, 32), c3[v], kk1, 0x96);
            c1[v] = p1; /* lo word of the product in the low half */
            c3[v] = p0;
        }
        k0 += PHILOX_W0; k1 += PHILOX_W1;
    }
    for (int v = 0; v < v_count; v++) {
        _mm256_storeu_si256((__m256i *)(r0 + 8 * v), _mm512_cvtepi64_epi32(c0[v]));
        _mm256_storeu_si256((__m256i *)(r1 + 8 * v), _mm512_cvtepi64_epi32(c1[v]));
        _mm256_storeu_si256((__m256i *)(r2 + 8 * v), _mm512_cvtepi64_epi32(c2[v]));
        _mm256_storeu_si256((__m256i *)(r3 + 8 * v), _mm512_cvtepi64_epi32(c3[v]));
    }
}
#elif defined(__AVX2__)
/* The same on AVX2 (no AVX-512): v vectors of 4 blocks, each 32-bit word in the low half of
 * a 64-bit lane, _mm256_mul_epu32 giving whole 32 x 32 -> 64-bit products, two XORs where
 * AVX-512 has one ternary-logic op. gcc vectorises the portable loop below badly without
 * AVX-512's 64-bit multiplies: with this the whole stream (Box-Muller included) runs ~1.9x
 * faster on an AMD Zen 3 (0.55 against 0.29 G samples/s on one core). Integer maths
 * only: the same bits. */
static inline __attribute__((always_inline)) void philox_vectors(uint32_t *r0, uint32_t *r1, uint32_t *r2,
                                                                 uint32_t *r3, uint64_t counter, uint32_t key0,
                                                                 uint32_t key1, const int v_count) {
    const __m256i m0 = _mm256_set1_epi64x(PHILOX_M0), m1 = _mm256_set1_epi64x(PHILOX_M1);
    __m256i c0[4], c1[4], c2[4], c3[4];
    for (int v = 0; v < v_count; v++) {
        const __m256i cnt = _mm256_add_epi64(_mm256_set1_epi64x((long long)counter),
                                             _mm256_setr_epi64x(4 * v, 4 * v + 1, 4 * v + 2, 4 * v + 3));
        c0[v] = cnt;
        c1[v] = _mm256_srli_epi64(cnt, 32);
        c2[v] = _mm256_setzero_si256();
        c3[v] = _mm256_setzero_si256();
    }
    uint32_t k0 = key0, k1 = key1;
    for (int r = 0; r < 10; r++) {
        const __m256i kk0 = _mm256_set1_epi64x(k0), kk1 = _mm256_set1_epi64x(k1);
        for (int v = 0; v < v_count; v++) {
            const __m256i p0 = _mm256_mul_epu32(c0[v], m0), p1 = _mm256_mul_epu32(c2[v], m1);
            c0[v] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), c1[v]), kk0);
            c2[v] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), c3[v]), kk1);
            c1[v] = p1;
            c3[v] = p0;
        }
        k0 += PHILOX_W0; k1 += PHILOX_W1;
    }
    const __m256i low = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    for (int v = 0; v < v_count; v++) {
        _mm_storeu_si128((__m128i *)(r0 + 4 * v), _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(c0[v], low)));
        _mm_storeu_si128((__m128i *)(r1 + 4 * v), _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(c1[v], low)));
        _mm_storeu_si128((__m128i *)(r2 + 4 * v), _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(c2[v], low)));
        _mm_storeu_si128((__m128i *)(r3 + 4 * v), _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(c3[v], low)));
    }
}
#endif

/* m <= CHUNK Philox blocks starting at `counter`, as 4m normals (times scale) in z,
 * in stream order: z[4j + lane]. */
static inline void philox_normal_blocks(float *restrict z, int m, uint64_t key, uint64_t counter, float scale) {
    const uint32_t key0 = (uint32_t)key, key1 = (uint32_t)(key >> 32);
    uint32_t r0[CHUNK], r1[CHUNK], r2[CHUNK], r3[CHUNK];
    float z0[CHUNK], z1[CHUNK], z2[CHUNK], z3[CHUNK];
    int first = 0;
#ifdef __AVX512F__
    for (; first + 32 <= m; first += 32)
        philox_vectors(r0 + first, r1 + first, r2 + first, r3 + first, counter + (uint64_t)first, key0, key1, 4);
    for (; first + 8 <= m; first += 8)
        philox_vectors(r0 + first, r1 + first, r2 + first, r3 + first, counter + (uint64_t)first, key0, key1, 1);
#elif defined(__AVX2__)
    /* v = 2: AVX2's 16 registers hold two chains; more spill and gain nothing on Zen 3 */
    for (; first + 8 <= m; first += 8)
        philox_vectors(r0 + first, r1 + first, r2 + first, r3 + first, counter + (uint64_t)first, key0, key1, 2);
    for (; first + 4 <= m; first += 4)
        philox_vectors(r0 + first, r1 + first, r2 + first, r3 + first, counter + (uint64_t)first, key0, key1, 1);
#endif
#pragma omp simd
    for (int j = first; j < m; j++) {
        uint64_t cnt = counter + (uint64_t)j;
        uint32_t c0 = (uint32_t)cnt, c1 = (uint32_t)(cnt >> 32), c2 = 0, c3 = 0;
        uint32_t k0 = key0, k1 = key1;
        /* ten rounds, written out so that gcc vectorises the loop over blocks */
        PHILOX_ROUND PHILOX_ROUND PHILOX_ROUND PHILOX_ROUND PHILOX_ROUND
        PHILOX_ROUND PHILOX_ROUND PHILOX_ROUND PHILOX_ROUND PHILOX_ROUND
        r0[j] = c0; r1[j] = c1; r2[j] = c2; r3[j] = c3;
    }
    const float inv32 = 2.3283064365386963e-10f; /* 2^-32 */
#pragma omp simd
    for (int j = 0; j < m; j++) {
        float ua = ((float)r0[j] + 0.5f) * inv32, va = (float)r1[j] * inv32;
        float ub = ((float)r2[j] + 0.5f) * inv32, vb = (float)r3[j] * inv32;
        float ra = __builtin_sqrtf(-2.0f * ln_f(ua)) * scale, rb = __builtin_sqrtf(-2.0f * ln_f(ub)) * scale;
        float ca, sa, cb, sb;
        sincos_2pi(va, &ca, &sa);
        sincos_2pi(vb, &cb, &sb);
        z0[j] = ra * ca; z1[j] = ra * sa; z2[j] = rb * cb; z3[j] = rb * sb;
    }
    for (int j = 0; j < m; j++) {
        z[4 * j] = z0[j]; z[4 * j + 1] = z1[j]; z[4 * j + 2] = z2[j]; z[4 * j + 3] = z3[j];
    }
}

/* ------------------------------------------------------------------ the ARS stream
 *
 * A second stream (dni's rng "ars"): ARS-7 (Salmon et al. 2011, the AES-based generator
 * of Random123, its default seven rounds) followed by Box-Muller, laid out for vectors.
 * Block p of stream `key` is ars1xm128i_R(7, ctr = p, key) with the 128-bit counter and
 * key (p, 0) and (key, 0) (low 64 bits first); its four 32-bit words are lanes 0-3. The
 * samples come in chunks of 8 blocks: in chunk q, the 16 words of blocks 8q .. 8q + 3 are
 * the uniforms u_j and those of blocks 8q + 4 .. 8q + 7 the v_j (j = 0..15), and samples
 * 32q + j and 32q + 16 + j are sqrt(-2 ln u1_j) (cos, sin)(2 pi v_j), with u1 and v as
 * for Philox above. So the stream is cut into blocks of 4 samples as Philox's is (a draw
 * of n samples takes ceil(n / 4) blocks), and each sample depends only on its position.
 * On x86 with AES instructions one instruction runs a round of four blocks (VAES on
 * AVX-512), of two (VAES on AVX2: 2.6x AES-NI's words on a Zen 3) or of one (AES-NI):
 * ~5x faster than Philox's multiplies, and with no interleaving of the pairs the whole
 * stream is ~1.7x faster (1.6x on a Zen 3, 0.89 against 0.56 G samples/s on one core).
 * Without AES instructions the library has no ARS (dni_has_ars() == 0) and dni draws the
 * stream with torch ops (dni/kernels.py). */
#define STREAM_PHILOX 0
#define STREAM_ARS 1
#define ARS_ROUNDS 7
#define ARS_WEYL_LO 0x9E3779B97F4A7C15ull
#define ARS_WEYL_HI 0xBB67AE8584CAA73Bull
#define ARS_CHUNKS (CHUNK / 8 + 1) /* chunks that m <= CHUNK blocks at any offset touch */

#if defined(__AES__)
#include <wmmintrin.h>
#define DNI_HAS_ARS 1

/* The round keys of ARS: key, then key + W, key + 2 W, ... (W the Weyl constants, added
 * to each 64-bit half). */
static inline void ars_round_keys(__m128i key, __m128i k[ARS_ROUNDS + 1]) {
    const __m128i weyl = _mm_set_epi64x((long long)ARS_WEYL_HI, (long long)ARS_WEYL_LO);
    k[0] = key;
    for (int r = 1; r <= ARS_ROUNDS; r++) k[r] = _mm_add_epi64(k[r - 1], weyl);
}

/* One ARS block, ars1xm128i_R(ARS_ROUNDS, ctr, key), from the key's round keys k. */
static inline __m128i ars_block(__m128i ctr, const __m128i k[ARS_ROUNDS + 1]) {
    __m128i v = _mm_xor_si128(ctr, k[0]);
    for (int r = 1; r < ARS_ROUNDS; r++) v = _mm_aesenc_si128(v, k[r]);
    return _mm_aesenclast_si128(v, k[ARS_ROUNDS]);
}

/* The words of chunks q0 .. q0 + n - 1 (32 each) into w. */
static inline void ars_chunk_words(uint32_t *restrict w, int n, uint64_t key, uint64_t q0) {
    __m128i k[ARS_ROUNDS + 1];
    ars_round_keys(_mm_set_epi64x(0, (long long)key), k);
#if defined(__VAES__) && defined(__AVX512F__)
    __m512i kz[ARS_ROUNDS + 1];
    for (int r = 0; r <= ARS_ROUNDS; r++) kz[r] = _mm512_broadcast_i32x4(k[r]);
    const __m512i four = _mm512_setr_epi64(4, 0, 4, 0, 4, 0, 4, 0);
    __m512i ctr = _mm512_add_epi64(_mm512_setr_epi64(0, 0, 1, 0, 2, 0, 3, 0), _mm512_setr_epi64(
        (long long)(8 * q0), 0, (long long)(8 * q0), 0, (long long)(8 * q0), 0, (long long)(8 * q0), 0));
    for (int c = 0; c < n; c++) {
        __m512i a = _mm512_xor_si512(ctr, kz[0]), b = _mm512_xor_si512(_mm512_add_epi64(ctr, four), kz[0]);
        ctr = _mm512_add_epi64(ctr, _mm512_add_epi64(four, four));
        for (int r = 1; r < ARS_ROUNDS; r++) {
            a = _mm512_aesenc_epi128(a, kz[r]);
            b = _mm512_aesenc_epi128(b, kz[r]);
        }
        _mm512_storeu_si512(w + 32 * c, _mm512_aesenclast_epi128(a, kz[ARS_ROUNDS]));
        _mm512_storeu_si512(w + 32 * c + 16, _mm512_aesenclast_epi128(b, kz[ARS_ROUNDS]));
    }
#elif defined(__VAES__) && defined(__AVX2__)
    /* VAES on 256-bit vectors (AMD Zen 3, Intel without AVX-512): two blocks an instruction */
    __m256i ky[ARS_ROUNDS + 1];
    for (int r = 0; r <= ARS_ROUNDS; r++) ky[r] = _mm256_broadcastsi128_si256(k[r]);
    const __m256i two = _mm256_setr_epi64x(2, 0, 2, 0);
    __m256i ctr = _mm256_setr_epi64x((long long)(8 * q0), 0, (long long)(8 * q0 + 1), 0);
    for (int c = 0; c < n; c++) {
        __m256i a[4];
        for (int i = 0; i < 4; i++) {
            a[i] = _mm256_xor_si256(ctr, ky[0]);
            ctr = _mm256_add_epi64(ctr, two);
        }
        for (int r = 1; r < ARS_ROUNDS; r++)
            for (int i = 0; i < 4; i++) a[i] = _mm256_aesenc_epi128(a[i], ky[r]);
        for (int i = 0; i < 4; i++)
            _mm256_storeu_si256((__m256i *)(w + 32 * c + 8 * i), _mm256_aesenclast_epi128(a[i], ky[ARS_ROUNDS]));
    }
#else
    for (int64_t i = 0; i < 8 * (int64_t)n; i++)
        _mm_storeu_si128((__m128i *)(w + 4 * i), ars_block(_mm_set_epi64x(0, (long long)(8 * q0 + (uint64_t)i)), k));
#endif
}

/* m <= CHUNK blocks of the ARS stream starting at block `counter`: 4m samples (times
 * scale) in z, in stream order. */
static inline void ars_normal_blocks(float *restrict z, int m, uint64_t key, uint64_t counter, float scale) {
    uint32_t w[32 * ARS_CHUNKS];
    float part[32 * ARS_CHUNKS];
    const int skip = 4 * (int)(counter % 8), n = (skip + 4 * m + 31) / 32;
    float *o = (skip == 0 && m % 8 == 0) ? z : part; /* whole chunks go straight to z */
    ars_chunk_words(w, n, key, counter / 8);
    const float inv32 = 2.3283064365386963e-10f; /* 2^-32 */
    for (int c = 0; c < n; c++) {
        const uint32_t *u = w + 32 * c, *v = u + 16;
        float *oc = o + 32 * c;
#pragma omp simd
        for (int j = 0; j < 16; j++) {
            const float r = __builtin_sqrtf(-2.0f * ln_f(((float)u[j] + 0.5f) * inv32)) * scale;
            float cs, sn;
            sincos_2pi((float)v[j] * inv32, &cs, &sn);
            oc[j] = r * cs;
            oc[16 + j] = r * sn;
        }
    }
    if (o != z) memcpy(z, part + skip, (size_t)(4 * m) * sizeof(float));
}

/* Raw ARS-7 block ars1xm128i_R(7, ctr, key) for known-answer tests: ctr, key, out as four
 * 32-bit words, least significant first. */
void dni_ars4x32_7(const uint32_t ctr_in[4], const uint32_t key_in[4], uint32_t out[4]) {
    __m128i k[ARS_ROUNDS + 1];
    ars_round_keys(_mm_loadu_si128((const __m128i *)key_in), k);
    _mm_storeu_si128((__m128i *)out, ars_block(_mm_loadu_si128((const __m128i *)ctr_in), k));
}
#else
#define DNI_HAS_ARS 0
static inline void ars_normal_blocks(float *restrict z, int m, uint64_t key, uint64_t counter, float scale) {
    (void)key; (void)counter; (void)scale;
    for (int i = 0; i < 4 * m; i++) z[i] = __builtin_nanf(""); /* never called: dni checks dni_has_ars() */
}
void dni_ars4x32_7(const uint32_t ctr_in[4], const uint32_t key_in[4], uint32_t out[4]) {
    (void)ctr_in; (void)key_in;
    out[0] = out[1] = out[2] = out[3] = 0;
}
#endif

/* 1 where this library draws the ARS stream (x86 with AES instructions), else 0. */
int dni_has_ars(void) { return DNI_HAS_ARS; }

/* m <= CHUNK blocks of stream `key` of kind `stream` (STREAM_PHILOX or STREAM_ARS) from
 * block `counter`: 4m samples times scale, in stream order. */
static inline void normal_blocks(float *restrict z, int m, uint64_t key, int stream, uint64_t counter, float scale) {
    if (stream == STREAM_ARS)
        ars_normal_blocks(z, m, key, counter, scale);
    else
        philox_normal_blocks(z, m, key, counter, scale);
}

/* Raw Philox4x32-10 block, for known-answer tests. */
void dni_philox4x32_10(const uint32_t ctr_in[4], const uint32_t key_in[2], uint32_t out[4]) {
    uint32_t c0 = ctr_in[0], c1 = ctr_in[1], c2 = ctr_in[2], c3 = ctr_in[3];
    uint32_t k0 = key_in[0], k1 = key_in[1];
    for (int r = 0; r < 10; r++) PHILOX_ROUND
    out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

/* Fill (add == 0) or add to (add != 0) out[0..n) the samples scale * z_i, i = 0..n-1, of
 * stream `key` of kind `stream` starting at block `counter`. */
void dni_normal(float *out, int64_t n, uint64_t key, int stream, uint64_t counter, float scale, int add) {
    float z[4 * CHUNK];
    const int64_t nblocks = (n + 3) / 4;
    for (int64_t b0 = 0; b0 < nblocks; b0 += CHUNK) {
        const int m = (int)((nblocks - b0) < CHUNK ? (nblocks - b0) : CHUNK);
        normal_blocks(z, m, key, stream, counter + (uint64_t)b0, scale);
        const int64_t count = (n - 4 * b0) < 4 * (int64_t)m ? (n - 4 * b0) : 4 * (int64_t)m;
        float *dst = out + 4 * b0;
        if (add) {
#pragma omp simd
            for (int64_t i = 0; i < count; i++) dst[i] += z[i];
        } else {
            memcpy(dst, z, (size_t)count * sizeof(float));
        }
    }
}

/* The input projection W_x x + b of a layer with two inputs, as torch.addmm computes it
 * with the BLAS of torch's x86 wheels: x0 w0, then fused x1 w1 +, then + b.
 * dni/kernels.py checks it against torch's projection, bit for bit, before every use. */
static inline float projection2(float x0, float x1, float w0, float w1, float b) {
    return __builtin_fmaf(x1, w1, x0 * w0) + b;
}

/* Gates of one LSTM row: pre-activation (mm + xp) + z, as the generic path computes
 * addmm(xp, h, W_h^T) + z (mm + xp rounds like addmm: a test checks it). xp may be NULL:
 * then with x2 (the row's two inputs) the projection is computed here from w2 = [W_x[:, 0]
 * | W_x[:, 1] | b], (3, 4H), else the pre-activations are given whole in mm. c_prev and c
 * may alias. The activated gates go to act (kept for the backward) or, where act is NULL,
 * to the scratch g, (4H). Two loops, not one: in one, each unit's chain of dependent
 * operations (the gates, then the cell, then tanh of it) is longer than the processor's
 * window of instructions in flight reaches, and the loop ran ~25% slower; split, each
 * loop's chains overlap across units. Each loop does the same operations in the same
 * order as before, so the bits are the same. */
static inline __attribute__((always_inline)) void lstm_row_gates(
    const float *mm, const float *xp, const float *x2, const float *w2, const float *c_prev, float *c, float *h,
    float *act, float *g, int64_t H, const float *zi, const float *zf, const float *zg, const float *zo) {
    const float hi = exp_bound(), x0 = x2 ? x2[0] : 0.0f, x1 = x2 ? x2[1] : 0.0f;
    const float *w0 = w2, *w1 = w2 ? w2 + 4 * H : NULL, *bb = w2 ? w2 + 8 * H : NULL;
    float *a = act ? act : g;
#pragma omp simd
    for (int64_t u = 0; u < H; u++) {
        float pi = mm[u], pf = mm[H + u], pg = mm[2 * H + u], po = mm[3 * H + u];
        if (xp) { pi += xp[u]; pf += xp[H + u]; pg += xp[2 * H + u]; po += xp[3 * H + u]; }
        if (x2) {
            pi += projection2(x0, x1, w0[u], w1[u], bb[u]);
            pf += projection2(x0, x1, w0[H + u], w1[H + u], bb[H + u]);
            pg += projection2(x0, x1, w0[2 * H + u], w1[2 * H + u], bb[2 * H + u]);
            po += projection2(x0, x1, w0[3 * H + u], w1[3 * H + u], bb[3 * H + u]);
        }
        a[u] = sigmoid_f(pi + zi[u], hi);
        a[H + u] = sigmoid_f(pf + zf[u], hi);
        a[2 * H + u] = tanh_f(pg + zg[u], hi);
        a[3 * H + u] = sigmoid_f(po + zo[u], hi);
    }
#pragma omp simd
    for (int64_t u = 0; u < H; u++) {
        float cn = a[H + u] * c_prev[u] + a[u] * a[2 * H + u];
        c[u] = cn;
        h[u] = a[3 * H + u] * tanh_f(cn, hi);
    }
}

/* The rows of one noisy LSTM step: inlined into both entry points below, so that each is
 * specialised for its own c_prev/act (act == NULL: inference). Row b's 4H samples are
 * blocks counter + b H .. counter + (b + 1) H - 1 of the stream, drawn in one go. Without
 * xp, x2 (B, 2) and w2 give the projections (see lstm_row_gates), or mm holds them. */
static inline __attribute__((always_inline)) void lstm_forward(
    const float *mm, const float *xp, const float *x2, const float *w2, const float *c_prev, float *c, float *h,
    float *act, int64_t B, int64_t H, uint64_t key, int stream, uint64_t counter, float sigma) {
    float z[4 * H]; /* the row's noise, gate q at z + q H */
    float g[4 * H]; /* the row's activated gates, where act is NULL */
    if (sigma == 0.0f) memset(z, 0, sizeof z);
    for (int64_t b = 0; b < B; b++) {
        const float *m = mm + b * 4 * H, *x = xp ? xp + b * 4 * H : NULL;
        const float *cp = c_prev + b * H;
        float *cb = c + b * H, *hb = h + b * H, *ab = act ? act + b * 4 * H : NULL;
        if (x && b + PREFETCH_ROWS < B) { /* the input projections stream from memory: fetch ahead into L2 */
            const char *ahead = (const char *)(x + PREFETCH_ROWS * 4 * H);
            for (int64_t off = 0; off < 4 * H * (int64_t)sizeof(float); off += 64) __builtin_prefetch(ahead + off, 0, 2);
        }
        if (sigma != 0.0f)
            for (int64_t j = 0; j < H; j += CHUNK)
                normal_blocks(z + 4 * j, (int)((H - j) < CHUNK ? (H - j) : CHUNK), key, stream, counter + (uint64_t)(b * H + j), sigma);
        if (x)
            lstm_row_gates(m, x, NULL, NULL, cp, cb, hb, ab, g, H, z, z + H, z + 2 * H, z + 3 * H);
        else if (x2)
            lstm_row_gates(m, NULL, x2 + 2 * b, w2, cp, cb, hb, ab, g, H, z, z + H, z + 2 * H, z + 3 * H);
        else
            lstm_row_gates(m, NULL, NULL, NULL, cp, cb, hb, ab, g, H, z, z + H, z + 2 * H, z + 3 * H);
    }
}

/* One noisy LSTM step for a batch. mm: (B, 4H) recurrent products h_{t-1} W_h^T, xp: (B, 4H)
 * input projections W_x x_t + b or NULL, gate order (i, f, g, o), read only; c: (B, H)
 * cell state, updated; h: (B, H) output state, written. Row b draws its 4H noise samples
 * from blocks counter + b * H of stream `key`, exactly the samples dni_normal would add to
 * the whole (B, 4H) tensor. sigma == 0: no noise. */
void dni_lstm_step(const float *mm, const float *xp, float *c, float *h, int64_t B, int64_t H, uint64_t key, int stream,
                   uint64_t counter, float sigma) {
    lstm_forward(mm, xp, NULL, NULL, c, c, h, NULL, B, H, key, stream, counter, sigma);
}

/* One noisy vanilla-RNN step: h = tanh((mm + xp) + z), mm and xp (B, H), xp may be NULL.
 * Noise as in dni_normal. */
void dni_rnn_step(const float *mm, const float *xp, float *h, int64_t B, int64_t H, uint64_t key, int stream, uint64_t counter,
                  float sigma) {
    float z[4 * CHUNK];
    const float hi = exp_bound();
    const int64_t n = B * H;
    for (int64_t i0 = 0; i0 < n; i0 += 4 * CHUNK) {
        const int64_t w = (n - i0) < 4 * CHUNK ? (n - i0) : 4 * CHUNK;
        if (sigma != 0.0f) {
            normal_blocks(z, (int)((w + 3) / 4), key, stream, counter + (uint64_t)(i0 / 4), sigma);
        } else {
            memset(z, 0, sizeof z);
        }
        if (xp) {
#pragma omp simd
            for (int64_t i = 0; i < w; i++) h[i0 + i] = tanh_f((mm[i0 + i] + xp[i0 + i]) + z[i], hi);
        } else {
#pragma omp simd
            for (int64_t i = 0; i < w; i++) h[i0 + i] = tanh_f(mm[i0 + i] + z[i], hi);
        }
    }
}

/* ------------------------------------------------------------------ training (autograd) */

/* Forward of one noisy LSTM step for training: as dni_lstm_step, but reading c_prev and
 * writing c, h: (B, H) and act: (B, 4H), the activated gates (i, f, g, o) that the
 * backward step needs. */
void dni_lstm_train_fwd(const float *mm, const float *xp, const float *c_prev, float *c, float *h, float *act,
                        int64_t B, int64_t H, uint64_t key, int stream, uint64_t counter, float sigma) {
    lstm_forward(mm, xp, NULL, NULL, c_prev, c, h, act, B, H, key, stream, counter, sigma);
}

/* Backward of one LSTM step. act: (B, 4H) activated gates, c_prev and c: (B, H) cell states
 * before and after the step, dh: (B, H) gradient of h_t; dc: (B, H) gradient of c_t on
 * entry, of c_{t-1} on return; writes dpre: (B, 4H), the gradient of the pre-activations
 * (the noise is additive, so it is also the gradient of the noisy pre-activations). */
void dni_lstm_train_bwd(const float *act, const float *c_prev, const float *c, const float *dh,
                        float *dc, float *dpre, int64_t B, int64_t H) {
    const float hi = exp_bound();
    for (int64_t b = 0; b < B; b++) {
        const float *a = act + b * 4 * H, *cp = c_prev + b * H, *cb = c + b * H, *dhb = dh + b * H;
        float *dcb = dc + b * H, *d = dpre + b * 4 * H;
#pragma omp simd
        for (int64_t k = 0; k < H; k++) {
            float gi = a[k], gf = a[H + k], gg = a[2 * H + k], go = a[3 * H + k];
            float tc = tanh_f(cb[k], hi);
            float dct = dcb[k] + dhb[k] * go * (1.0f - tc * tc);
            d[k] = dct * gg * gi * (1.0f - gi);
            d[H + k] = dct * cp[k] * gf * (1.0f - gf);
            d[2 * H + k] = dct * gi * (1.0f - gg * gg);
            d[3 * H + k] = dhb[k] * tc * go * (1.0f - go);
            dcb[k] = dct * gf;
        }
    }
}

/* ------------------------------------------------------- whole recurrences (BLAS GEMM) */

/* The Fortran-BLAS sgemm that torch itself calls for torch.mm on this CPU (MKL's, found in
 * torch's library by dni/kernels.py and handed over once). Called with the arguments
 * torch.mm passes, it gives the same bits; the loops below then run all steps of a row
 * block without returning to Python between steps. */
typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *, const float *,
                         const float *, const int *, const float *, const int *, const float *, float *, const int *);
static sgemm_fn blas_sgemm = NULL;

void dni_set_sgemm(void *fn) { blas_sgemm = (sgemm_fn)fn; }

/* The BLAS's bf16 GEMM with fp32 accumulation and output (MKL's gemm_bf16bf16f32, AMX
 * where the CPU has it), same argument order as sgemm; for inference in bf16 precision. */
typedef void (*gemm_bf16_fn)(const char *, const char *, const int *, const int *, const int *, const float *,
                             const uint16_t *, const int *, const uint16_t *, const int *, const float *, float *,
                             const int *);
static gemm_bf16_fn blas_gemm_bf16 = NULL;

void dni_set_gemm_bf16(void *fn) { blas_gemm_bf16 = (gemm_bf16_fn)fn; }

/* MKL's packed GEMM (cblas_sgemm_pack_get_size, cblas_sgemm_pack, cblas_sgemm_compute; LP64,
 * found in torch's library like sgemm). Packing W_h once for a row block, instead of on
 * every call as sgemm does, makes each step's product of the LSTM's shapes faster (here
 * (256, 128) x (128, 512): ~4-7%). dni/kernels.py uses it only on shapes where it gives
 * sgemm's bits. */
typedef size_t (*pack_size_fn)(int, int, int, int);
typedef void (*pack_fn)(int, int, int, int, int, int, float, const float *, int, float *);
typedef void (*compute_fn)(int, int, int, int, int, int, const float *, int, const float *, int, float, float *, int);
static pack_size_fn blas_pack_size = NULL;
static pack_fn blas_pack = NULL;
static compute_fn blas_compute = NULL;
enum { CBLAS_ROW_MAJOR = 101, CBLAS_NO_TRANS = 111, CBLAS_TRANS = 112, CBLAS_PACKED = 151, CBLAS_B_MATRIX = 162 };

void dni_set_sgemm_packed(void *size, void *pack, void *compute) {
    blas_pack_size = (pack_size_fn)size;
    blas_pack = (pack_fn)pack;
    blas_compute = (compute_fn)compute;
}

/* W^T packed as the B operand of products a (M, K) @ W^T, W (N, K) row-major, or NULL where
 * no packed GEMM is attached or memory ran out (the caller then calls sgemm). Free with
 * free(). */
static float *pack_wt(const float *w, int64_t M, int64_t N, int64_t K) {
    if (!blas_pack_size || !blas_pack || !blas_compute) return NULL;
    const size_t bytes = blas_pack_size(CBLAS_B_MATRIX, (int)M, (int)N, (int)K);
    float *dest = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (dest) blas_pack(CBLAS_ROW_MAJOR, CBLAS_B_MATRIX, CBLAS_TRANS, (int)M, (int)N, (int)K, 1.0f, w, (int)K, dest);
    return dest;
}

/* out (M, N) = a (M, K) @ W^T with W^T packed by pack_wt for these M, N, K. */
static void mm_wt_packed(const float *a, const float *wp, float *out, int64_t M, int64_t N, int64_t K) {
    blas_compute(CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_PACKED, (int)M, (int)N, (int)K, a, (int)K, wp, (int)K, 0.0f, out,
                 (int)N);
}

/* x rounded to bfloat16, to nearest even (torch's rounding for finite x). */
static inline uint16_t bf16_round(float x) {
    const uint32_t u = as_uint(x);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* out (M, N) = a (M, K) @ w^T, w (N, K) row-major: torch.mm(a, w.t()). */
static void mm_wt(const float *a, const float *w, float *out, int64_t M, int64_t N, int64_t K) {
    const int m = (int)M, n = (int)N, k = (int)K;
    const float one = 1.0f, zero = 0.0f;
    blas_sgemm("T", "N", &n, &m, &k, &one, w, &k, a, &k, &zero, out, &n);
}

/* out (M, N) = bf16(a) (M, K) @ w16^T in fp32, w16 (N, K) row-major bfloat16; a16: (M, K)
 * scratch for the rounded a. */
static void mm_wt_bf16(const float *a, const uint16_t *w16, uint16_t *a16, float *out, int64_t M, int64_t N,
                       int64_t K) {
#pragma omp simd
    for (int64_t i = 0; i < M * K; i++) a16[i] = bf16_round(a[i]);
    const int m = (int)M, n = (int)N, k = (int)K;
    const float one = 1.0f, zero = 0.0f;
    blas_gemm_bf16("T", "N", &n, &m, &k, &one, w16, &k, a16, &k, &zero, out, &n);
}

/* out (M, N) = a (M, K) @ w, w (K, N) row-major: torch.mm(a, w). */
static void mm_w(const float *a, const float *w, float *out, int64_t M, int64_t N, int64_t K) {
    const int m = (int)M, n = (int)N, k = (int)K;
    const float one = 1.0f, zero = 0.0f;
    blas_sgemm("N", "N", &n, &m, &k, &one, w, &n, a, &k, &zero, out, &n);
}

/* Whether x[0..n) are all zeros (either sign). A zero initial state makes the first step's
 * recurrent product zero: the GEMM would give +-0 in every element, and +0 instead can at
 * most flip the sign of a pre-activation that is exactly zero, which every gate maps to the
 * same value (exp_f(+-0, hi) = 1). So skipping the GEMM changes no bit of h, c or the gates. */
static inline int all_zero(const float *x, int64_t n) {
    uint32_t bits = 0;
#pragma omp simd reduction(|: bits)
    for (int64_t i = 0; i < n; i++) bits |= as_uint(x[i]) & 0x7fffffffu;
    return bits == 0;
}

/* First row of block k of `parts` near-equal contiguous blocks of the batch. */
static inline int64_t block_start(int64_t batch, int k, int parts) { return batch * k / parts; }

/* Rows r0 .. r0 + m - 1 of the batch through every step: per step mm = h_{t-1} W_h^T, then
 * the fused step. The input projections come from xp, (steps, batch, R), or where xin is
 * given (LSTM with two inputs) are computed from xin, (steps, batch, 2), and w2 (see
 * lstm_row_gates). hs, cs point at row r0 of the states of step 0; step t's states are
 * sstride floats further (sstride == 0: updated in place, for inference). w_h16: NULL (fp32),
 * or W_h in bfloat16, (R, H): each step's product then takes h rounded to bf16 (into a16,
 * (m, H) scratch) and accumulates in fp32 (mm_wt_bf16). w_packed: NULL, or (fp32) W_h^T packed
 * by pack_wt for m rows, then used instead of w_h. acts: NULL, or
 * the activated LSTM gates, (steps, batch, 4H), kept for the backward. Inlined into both
 * callers, so that each is specialised for its own sstride and acts. */
static inline __attribute__((always_inline)) void rows_through_steps(
    int lstm, const float *xp, const float *xin, const float *w2, const float *w_h, const float *w_packed,
    const uint16_t *w_h16, uint16_t *a16, float *hs, float *cs, float *acts, float *mm, int64_t steps, int64_t batch, int64_t r0, int64_t m, int64_t H, int64_t sstride, uint64_t key, int stream,
    const uint64_t *starts, float sigma) {
    const int64_t R = lstm ? 4 * H : H, per_row = lstm ? H : H / 4; /* stream blocks per row and step */
    for (int64_t t = 0; t < steps; t++) {
        float *h = hs + (t + 1) * sstride;
        if (t == 0 && all_zero(hs, m * H))
            memset(mm, 0, (size_t)(m * R) * sizeof(float)); /* h_0 = 0: the product is zero, skip the GEMM */
        else if (w_h16)
            mm_wt_bf16(hs + t * sstride, w_h16, a16, mm, m, R, H);
        else if (w_packed)
            mm_wt_packed(hs + t * sstride, w_packed, mm, m, R, H);
        else
            mm_wt(hs + t * sstride, w_h, mm, m, R, H);
        const int inline_x = lstm && xin; /* the RNN always reads xp */
        const float *x = inline_x ? NULL : xp + (t * batch + r0) * R, *x2 = inline_x ? xin + (t * batch + r0) * 2 : NULL;
        const uint64_t start = starts[t] + (uint64_t)(r0 * per_row);
        if (lstm)
            lstm_forward(mm, x, x2, w2, cs + t * sstride, cs + (t + 1) * sstride, h, acts ? acts + (t * batch + r0) * R : NULL, m,
                         H, key, stream, start, sigma);
        else
            dni_rnn_step(mm, x, h, m, H, key, stream, start, sigma);
    }
}

/* Rows r0..r1 of a noisy inference pass through all steps, in sub-blocks of `cache_rows`
 * rows (their GEMM output, h and c stay in cache). c is NULL for the RNN. packed: the
 * products use W_h^T packed once per sub-block size (pack_wt), else sgemm. */
static void recurrence_rows(int lstm, const float *xp, const float *xin, const float *w2, const float *w_h, int packed,
                            const uint16_t *w_h16, uint16_t *a16, float *h, float *c, float *mm,
                            int64_t steps, int64_t batch, int64_t r0, int64_t r1, int64_t H, uint64_t key, int stream,
                            const uint64_t *starts, float sigma, int64_t cache_rows) {
    const int64_t R = lstm ? 4 * H : H;
    float *wp = NULL;
    int64_t wp_rows = 0;
    for (int64_t b0 = r0; b0 < r1; b0 += cache_rows) {
        const int64_t m = (r1 - b0) < cache_rows ? (r1 - b0) : cache_rows;
        if (packed && !w_h16 && m != wp_rows) {
            free(wp);
            wp = pack_wt(w_h, m, R, H);
            wp_rows = m;
        }
        rows_through_steps(lstm, xp, xin, w2, w_h, wp, w_h16, a16, h + b0 * H, lstm ? c + b0 * H : NULL, NULL, mm, steps,
                           batch, b0, m, H, 0, key, stream, starts, sigma);
    }
    free(wp);
}

/* A whole noisy inference pass. xp: (steps, batch, R) with R = 4H (LSTM) or H (RNN), or
 * (LSTM with two inputs) xin: (steps, batch, 2) and w2: (3, 4H), see lstm_row_gates;
 * w_h: (R, H); packed: the products use MKL's packed GEMM (see recurrence_rows); w_h16: NULL, or W_h in bfloat16 for bf16 products (needs dni_set_gemm_bf16); h, c: (batch, H), updated (c unused for the RNN); starts[t]: the stream
 * block of step t's (batch, R) noise. The batch is cut into `parts` row blocks, and this
 * runs blocks k0..k1-1, each through every step, in parallel (OpenMP: the thread team that
 * torch itself uses; without OpenMP, in turn, and the caller runs blocks on threads of its
 * own). The BLAS must be single-threaded meanwhile. Each row draws its own stream
 * positions, so the result does not depend on the blocks. Returns 0, or -1 if scratch
 * memory ran out. */
int dni_recurrence(int lstm, const float *xp, const float *xin, const float *w2, const float *w_h, int packed,
                   const uint16_t *w_h16, float *h, float *c, int64_t steps, int64_t batch,
                   int64_t H, uint64_t key, int stream, const uint64_t *starts, float sigma, int64_t cache_rows, int k0, int k1,
                   int parts) {
    const int64_t R = lstm ? 4 * H : H;
    int failed = 0;
#pragma omp parallel for num_threads(k1 - k0) schedule(static, 1) reduction(|: failed)
    for (int k = k0; k < k1; k++) {
        float *mm = malloc((size_t)(cache_rows * R) * sizeof(float));
        uint16_t *a16 = w_h16 ? malloc((size_t)(cache_rows * H) * sizeof(uint16_t)) : NULL;
        if (!mm || (w_h16 && !a16)) { free(mm); free(a16); failed = 1; continue; }
        recurrence_rows(lstm, xp, xin, w2, w_h, packed, w_h16, a16, h, c, mm, steps, batch, block_start(batch, k, parts),
                        block_start(batch, k + 1, parts), H, key, stream, starts, sigma, cache_rows);
        free(mm);
        free(a16);
    }
    return failed ? -1 : 0;
}

/* Forward of the compiled training path: hs, cs (steps + 1, batch, H) hold the states (row
 * 0 zeros), acts (steps, batch, 4H) the activated LSTM gates; the input projections come
 * from xp, or (LSTM with two inputs, xin and w2 given) are computed in the loop, as in
 * dni_recurrence; row blocks as there. Returns 0, or -1 if scratch memory ran out. */
int dni_train_forward(int lstm, const float *xp, const float *xin, const float *w2, const float *w_h, float *hs,
                      float *cs, float *acts, int64_t steps, int64_t batch, int64_t H, uint64_t key, int stream,
                      const uint64_t *starts, float sigma, int k0, int k1, int parts) {
    const int64_t R = lstm ? 4 * H : H;
    int failed = 0;
#pragma omp parallel for num_threads(k1 - k0) schedule(static, 1) reduction(|: failed)
    for (int k = k0; k < k1; k++) {
        const int64_t r0 = block_start(batch, k, parts), m = block_start(batch, k + 1, parts) - r0;
        float *mm = malloc((size_t)(m * R) * sizeof(float));
        if (!mm) { failed = 1; continue; }
        rows_through_steps(lstm, xp, xin, w2, w_h, NULL, NULL, NULL, hs + r0 * H, lstm ? cs + r0 * H : NULL, acts, mm, steps, batch, r0,
                           m, H, batch * H, key, stream, starts, sigma);
        free(mm);
    }
    return failed ? -1 : 0;
}

/* Backward of the compiled training path: from dh (batch, H), the gradient of h_T
 * (overwritten), writes dpre (steps, batch, R), the gradients of the pre-activations; dc:
 * (batch, H) scratch, zeros on entry (LSTM). Row blocks as in dni_recurrence. */
void dni_train_backward(int lstm, const float *w_h, const float *hs, const float *cs, const float *acts, float *dh,
                        float *dc, float *dpre, int64_t steps, int64_t batch, int64_t H, int k0, int k1, int parts) {
    const int64_t R = lstm ? 4 * H : H;
#pragma omp parallel for num_threads(k1 - k0) schedule(static, 1)
    for (int k = k0; k < k1; k++) {
        const int64_t r0 = block_start(batch, k, parts), m = block_start(batch, k + 1, parts) - r0;
        float *dhb = dh + r0 * H;
        for (int64_t t = steps - 1; t >= 0; t--) {
            float *d = dpre + (t * batch + r0) * R;
            if (lstm) {
                dni_lstm_train_bwd(acts + (t * batch + r0) * R, cs + (t * batch + r0) * H,
                                   cs + ((t + 1) * batch + r0) * H, dhb, dc + r0 * H, d, m, H);
            } else {
                const float *h = hs + ((t + 1) * batch + r0) * H;
                for (int64_t i = 0; i < m * H; i++) {
                    const float hh = h[i] * h[i];
                    d[i] = dhb[i] * (1.0f - hh);
                }
            }
            if (t) mm_w(d, w_h, dhb, m, H, R);
        }
    }
}

/* 1 where this library was built with OpenMP (row blocks in parallel), else 0 (in turn). */
int dni_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* out = a @ w^T (w_transposed != 0, w (N, K)) or a @ w (w (K, N)): for the check that the
 * BLAS handed over gives torch.mm's bits. */
void dni_blas_mm(int w_transposed, const float *a, const float *w, float *out, int64_t M, int64_t N, int64_t K) {
    if (w_transposed)
        mm_wt(a, w, out, M, N, K);
    else
        mm_w(a, w, out, M, N, K);
}

/* out = a @ w^T, w (N, K), through the packed GEMM as the loops call it: for the check that
 * it gives sgemm's bits on a shape. Returns -1 if it is not attached or memory ran out. */
int dni_blas_mm_packed(const float *a, const float *w, float *out, int64_t M, int64_t N, int64_t K) {
    float *wp = pack_wt(w, M, N, K);
    if (!wp) return -1;
    mm_wt_packed(a, wp, out, M, N, K);
    free(wp);
    return 0;
}

/* out = bf16(a) @ w16^T, as the bf16 loops compute it: for the check of the bf16 GEMM
 * handed over. Returns -1 if scratch memory ran out, else 0. */
int dni_blas_mm_bf16(const float *a, const uint16_t *w16, float *out, int64_t M, int64_t N, int64_t K) {
    uint16_t *a16 = malloc((size_t)(M * K) * sizeof(uint16_t));
    if (!a16) return -1;
    mm_wt_bf16(a, w16, a16, out, M, N, K);
    free(a16);
    return 0;
}

/* Elements of xp, (n, 4H), that projection2 does not reproduce bit for bit from x, (n, 2),
 * and w2 = [W_x[:, 0] | W_x[:, 1] | b], (3, 4H). */
int64_t dni_projection2_mismatches(const float *x, const float *w2, const float *xp, int64_t n, int64_t R) {
    int64_t bad = 0;
    for (int64_t i = 0; i < n; i++) {
        const float x0 = x[2 * i], x1 = x[2 * i + 1];
        const float *row = xp + i * R;
#pragma omp simd reduction(+: bad)
        for (int64_t u = 0; u < R; u++) bad += as_uint(projection2(x0, x1, w2[u], w2[R + u], w2[2 * R + u])) != as_uint(row[u]);
    }
    return bad;
}

/* ---------------------------------------------------------------- optimizer step
 *
 * Gradient-norm clipping and one Adam step of one parameter tensor in two passes over
 * memory, with the bits of torch 2.x's CPU ops that torch.nn.utils.clip_grad_norm_ and
 * torch.optim.Adam (single-tensor, no weight decay, no amsgrad) run:
 *   g *= coef                                  (_foreach_mul_ by the clamped clip coefficient)
 *   m = fma(w1, g - m, m)                      (exp_avg.lerp_(g, 1 - beta1), weight < 0.5)
 *   v = fma((1 - beta2) * g, g, v * beta2)     (exp_avg_sq.mul_(beta2).addcmul_(g, g, 1 - beta2))
 *   d = sqrt(v) / bc2sqrt + eps                (sqrt is the BLAS library's vsSqrt, as torch.sqrt's)
 *   p = p + (neg_step * m) / d                 (param.addcdiv_(m, d, value=-step_size))
 * Each line is the rounding of torch's kernel, so the compiler must not contract or
 * reorder anything here: fp-contract is off and the one fused multiply-add is explicit.
 * dni/optim.py checks the result against torch's step before it uses this. */
typedef void (*vs_sqrt_fn)(int n, const float *a, float *r); /* MKL's C interface (LP64) */
static vs_sqrt_fn vs_sqrt = 0;
void dni_set_vs_sqrt(void *fn) { vs_sqrt = (vs_sqrt_fn)fn; }

#define ADAM_CHUNK 2048 /* elements per vsSqrt call: the chunk stays in L1 between the passes */

__attribute__((optimize("fp-contract=off")))
int dni_adam_step(float *restrict p, float *restrict g, float *restrict m, float *restrict v, int64_t n, float coef,
                  float w1, float beta2, float one_m_beta2, float bc2sqrt, float eps, float neg_step) {
    if (!vs_sqrt) return -1;
    float root[ADAM_CHUNK];
    for (int64_t i0 = 0; i0 < n; i0 += ADAM_CHUNK) {
        const int len = (int)(n - i0 < ADAM_CHUNK ? n - i0 : ADAM_CHUNK);
        float *pc = p + i0, *gc = g + i0, *mc = m + i0, *vc = v + i0;
#pragma omp simd
        for (int i = 0; i < len; i++) {
            const float gi = gc[i] * coef;
            gc[i] = gi;
            mc[i] = __builtin_fmaf(w1, gi - mc[i], mc[i]);
            const float vi = vc[i] * beta2;
            vc[i] = __builtin_fmaf(one_m_beta2 * gi, gi, vi);
        }
        vs_sqrt(len, vc, root);
#pragma omp simd
        for (int i = 0; i < len; i++) {
            const float d = root[i] / bc2sqrt + eps;
            pc[i] = pc[i] + (neg_step * mc[i]) / d;
        }
    }
    return 0;
}
