/* The kernels of pie.engine.cpu_kernels (AVX512-BF16).
 *
 * Four entry points, each one call where torch needs several ops: `pie_gemv` (weight matmul for
 * up to PIE_MAX_ROWS rows with the RMSNorm before and the bias, residual add or SwiGLU after),
 * `pie_decode_attention` (one new token per sequence, straight from the paged KV cache),
 * `pie_rms_norm`, `pie_swiglu` and `pie_rope`. Every step rounds to bf16 where the torch ops of
 * HF's Llama round, so outputs match torch's to the last bit but for summation order.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16;

/* ---- bf16 helpers -------------------------------------------------------------------------- */

static inline __mmask16 tail_mask(int64_t n) { /* the first min(n, 16) lanes */
    return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1u);
}

static inline __m512 load16(const bf16 *p) { /* 16 bf16 -> 16 fp32, exact */
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)p)), 16));
}

static inline __m512 maskz_load16(__mmask16 m, const bf16 *p) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const void *)p)), 16));
}

static inline __m256i to_bf16_16(__m512 f) { /* round to nearest even as torch does; NaN stays */
    const __m512i b = _mm512_castps_si512(f);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
    r = _mm512_mask_or_epi32(r, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), b, _mm512_set1_epi32(0x400000));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

static inline __m512 round16(__m512 f) { /* what storing to bf16 and loading back gives */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16_16(f)), 16));
}

/* e^x for 16 floats (Cephes-style: 2^n * p(r), |r| <= ln2/2), ~1 ulp, x clamped to [-88, 88] */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-88.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

static inline __m512 silu16(__m512 g) { /* g / (1 + e^-g), as torch computes silu */
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
    return _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

/* y = w * (x.float() * rsqrt(mean(x^2) + eps)).to(bf16), one row of k */
static void norm_row(const bf16 *x, int64_t k, const bf16 *w, float eps, bf16 *y) {
    __m512 ss = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 16) {
        const __m512 v = maskz_load16(tail_mask(k - i), x + i);
        ss = _mm512_fmadd_ps(v, v, ss);
    }
    const __m512 r = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)k + eps));
    for (int64_t i = 0; i < k; i += 16) {
        const __mmask16 t = tail_mask(k - i);
        const __m512 h = round16(_mm512_mul_ps(maskz_load16(t, x + i), r));
        _mm256_mask_storeu_epi16((void *)(y + i), t, to_bf16_16(_mm512_mul_ps(maskz_load16(t, w + i), h)));
    }
}

/* ---- weight matmul --------------------------------------------------------------------------- */

#define BLOCK 64 /* outputs per packed block: four zmm of 16 fp32 sums */

/* Weights are packed [N/64][K/2][64][2]: for input pair p of block j, the 64 outputs' two
   weights lie side by side, so one broadcast input pair and four dpbf16 update 64 sums.
   MT rows at a time share each weight load; weights stream from memory once per call. */
#define DEFINE_BLOCK_DOT(MT)                                                                  \
    static void block_dot_##MT(const bf16 *w, const bf16 *h, int64_t h_stride, int64_t kp,   \
                               float *out) {                                                  \
        __m512 acc[MT][4];                                                                    \
        for (int i = 0; i < MT; ++i)                                                          \
            for (int c = 0; c < 4; ++c) acc[i][c] = _mm512_setzero_ps();                      \
        for (int64_t p = 0; p < kp; ++p) {                                                    \
            const bf16 *wp = w + p * 2 * BLOCK;                                               \
            /* 8 KB ahead: ~5% more bandwidth than the hardware prefetcher alone */           \
            for (int c = 0; c < 4; ++c)                                                       \
                _mm_prefetch((const char *)wp + 8192 + 64 * c, _MM_HINT_T0);                  \
            const __m512bh w0 = (__m512bh)_mm512_loadu_si512((const void *)wp);               \
            const __m512bh w1 = (__m512bh)_mm512_loadu_si512((const void *)(wp + 32));        \
            const __m512bh w2 = (__m512bh)_mm512_loadu_si512((const void *)(wp + 64));        \
            const __m512bh w3 = (__m512bh)_mm512_loadu_si512((const void *)(wp + 96));        \
            for (int i = 0; i < MT; ++i) {                                                    \
                int32_t pair;                                                                 \
                memcpy(&pair, h + i * h_stride + 2 * p, 4);                                   \
                const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);                        \
                acc[i][0] = _mm512_dpbf16_ps(acc[i][0], w0, xv);                              \
                acc[i][1] = _mm512_dpbf16_ps(acc[i][1], w1, xv);                              \
                acc[i][2] = _mm512_dpbf16_ps(acc[i][2], w2, xv);                              \
                acc[i][3] = _mm512_dpbf16_ps(acc[i][3], w3, xv);                              \
            }                                                                                 \
        }                                                                                     \
        for (int i = 0; i < MT; ++i)                                                          \
            for (int c = 0; c < 4; ++c) _mm512_storeu_ps(out + i * BLOCK + c * 16, acc[i][c]); \
    }

DEFINE_BLOCK_DOT(1)
DEFINE_BLOCK_DOT(2)
DEFINE_BLOCK_DOT(3)
DEFINE_BLOCK_DOT(4)
DEFINE_BLOCK_DOT(5)
DEFINE_BLOCK_DOT(6)

/* out[m][0..63] = one packed block . h[m], for m < rows */
static void block_dot(const bf16 *w, const bf16 *h, int64_t h_stride, int64_t kp, int64_t rows,
                      float *out) {
    int64_t m = 0;
    for (; m + 6 <= rows; m += 6) block_dot_6(w, h + m * h_stride, h_stride, kp, out + m * BLOCK);
    const bf16 *hm = h + m * h_stride;
    float *om = out + m * BLOCK;
    switch (rows - m) {
        case 5: block_dot_5(w, hm, h_stride, kp, om); break;
        case 4: block_dot_4(w, hm, h_stride, kp, om); break;
        case 3: block_dot_3(w, hm, h_stride, kp, om); break;
        case 2: block_dot_2(w, hm, h_stride, kp, om); break;
        case 1: block_dot_1(w, hm, h_stride, kp, om); break;
        default: break;
    }
}

enum { MODE_PLAIN = 0, MODE_ADD = 1, MODE_SWIGLU = 2 };

typedef struct { /* one packed weight matrix; filled once from Python */
    const bf16 *w;    /* [n_blocks][k_pairs][64][2]; SwiGLU: the gate blocks, then the up blocks */
    const bf16 *bias; /* [n_out] or NULL */
    int64_t n_blocks;
    int64_t k_pairs;
    int64_t k;     /* input width */
    int64_t n_out; /* outputs (SwiGLU: of one half) */
    int32_t mode;
} PackedWeight;

/* y[m, :] for m < rows: (rms_norm(x[m]) if norm_w) @ W^T, then + bias, + residual (MODE_ADD)
   or silu(gate) * up (MODE_SWIGLU). Threads split the output blocks. */
int pie_gemv(const PackedWeight *pw, const bf16 *x, int64_t x_stride, int64_t rows,
             const bf16 *norm_w, float eps, const bf16 *residual, int64_t res_stride, bf16 *y,
             int64_t y_stride, int32_t threads) {
    if (rows < 1 || rows > PIE_MAX_ROWS) return -1;
    const int64_t k = pw->k, kp = pw->k_pairs, width = 2 * kp;
    bf16 *h = (bf16 *)aligned_alloc(64, (size_t)((rows * width * 2 + 63) / 64 * 64));
    if (h == NULL) return -2;
    for (int64_t m = 0; m < rows; ++m) { /* the (normalized) inputs, zero-padded to pairs */
        bf16 *hm = h + m * width;
        if (norm_w != NULL)
            norm_row(x + m * x_stride, k, norm_w, eps, hm);
        else
            memcpy(hm, x + m * x_stride, (size_t)k * 2);
        for (int64_t i = k; i < width; ++i) hm[i] = 0;
    }
    const int64_t units = pw->mode == MODE_SWIGLU ? pw->n_blocks / 2 : pw->n_blocks;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t j = 0; j < units; ++j) {
        float acc[PIE_MAX_ROWS * BLOCK];
        float up[PIE_MAX_ROWS * BLOCK];
        block_dot(pw->w + j * kp * 2 * BLOCK, h, width, kp, rows, acc);
        if (pw->mode == MODE_SWIGLU)
            block_dot(pw->w + (j + units) * kp * 2 * BLOCK, h, width, kp, rows, up);
        const int64_t n0 = j * BLOCK;
        const int64_t n1 = n0 + BLOCK < pw->n_out ? n0 + BLOCK : pw->n_out;
        for (int64_t m = 0; m < rows; ++m) {
            bf16 *ym = y + m * y_stride;
            for (int64_t n = n0; n < n1; n += 16) {
                const __mmask16 t = tail_mask(n1 - n);
                __m512 v = _mm512_loadu_ps(acc + m * BLOCK + n - n0);
                if (pw->bias != NULL) v = _mm512_add_ps(v, maskz_load16(t, pw->bias + n));
                if (pw->mode == MODE_ADD) { /* residual + round(x @ W^T) */
                    v = _mm512_add_ps(maskz_load16(t, residual + m * res_stride + n), round16(v));
                } else if (pw->mode == MODE_SWIGLU) { /* round(silu(round(gate))) * round(up) */
                    const __m512 u = round16(_mm512_loadu_ps(up + m * BLOCK + n - n0));
                    v = _mm512_mul_ps(round16(silu16(round16(v))), u);
                }
                _mm256_mask_storeu_epi16((void *)(ym + n), t, to_bf16_16(v));
            }
        }
    }
    free(h);
    return 0;
}

/* ---- decode attention over paged KV ---------------------------------------------------------- */

/* lane j of the result = the sum of the 16 lanes of v[j] */
static inline __m512 hsum16(const __m512 *v) {
    __m512 a[8], b[4];
    for (int i = 0; i < 8; ++i)
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                             _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; ++i) {
        const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
        b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    const __m512 d01 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_f32x4(b[0], b[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 d23 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_f32x4(b[2], b[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(d01, d23, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(d01, d23, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* One (sequence, KV head): scores of the `group` query heads that share it, softmax, then the
   probability-weighted sum of V rows. DIM is a compile-time head size so accumulators stay in
   registers. rows: cache row of each slot; row_stride: elements between cache rows;
   scores: scratch of group * round_up(len, 16) floats. */
#define DEFINE_ATTEND(DIM)                                                                        \
    static void attend_##DIM(const bf16 *q, int64_t q_stride_h, const bf16 *k_cache,              \
                             const bf16 *v_cache, int64_t row_stride, const int64_t *rows,        \
                             const uint8_t *mask, int64_t len, int64_t group, float scale,         \
                             float *scores, bf16 *out) {                                          \
        enum { DC = DIM / 32, DV = DIM / 16 };                                                     \
        const int64_t padded = (len + 15) / 16 * 16;                                              \
        for (int64_t g = 0; g < group; ++g) {                                                      \
            __m512bh qv[DC];                                                                      \
            for (int c = 0; c < DC; ++c)                                                          \
                qv[c] = (__m512bh)_mm512_loadu_si512((const void *)(q + g * q_stride_h + 32 * c)); \
            float *sg = scores + g * padded;                                                      \
            __m512 best = _mm512_set1_ps(-INFINITY);                                               \
            for (int64_t l0 = 0; l0 < len; l0 += 16) { /* 16 keys: 16 partial dots, one hsum */ \
                const int64_t n = len - l0 < 16 ? len - l0 : 16;                                   \
                for (int64_t j = l0 + 64; j < l0 + 80 && j < len; ++j)                             \
                    for (int c = 0; c < DC; ++c)                                                  \
                        _mm_prefetch((const char *)(k_cache + rows[j] * row_stride) + 64 * c,     \
                                     _MM_HINT_T0);                                                \
                __m512 part[16];                                                                  \
                for (int64_t j = 0; j < 16; ++j) {                                                 \
                    __m512 acc = _mm512_setzero_ps();                                             \
                    if (j < n) {                                                                  \
                        const bf16 *kr = k_cache + rows[l0 + j] * row_stride;                     \
                        for (int c = 0; c < DC; ++c)                                              \
                            acc = _mm512_dpbf16_ps(                                               \
                                acc, (__m512bh)_mm512_loadu_si512((const void *)(kr + 32 * c)),   \
                                qv[c]);                                                           \
                    }                                                                             \
                    part[j] = acc;                                                                \
                }                                                                                 \
                __m512 s = _mm512_mul_ps(hsum16(part), _mm512_set1_ps(scale));                     \
                __mmask16 keep = tail_mask(n);                                                    \
                if (mask != NULL)                                                                 \
                    for (int64_t j = 0; j < n; ++j)                                                \
                        if (!mask[l0 + j]) keep &= (__mmask16)~(1u << j);                         \
                s = _mm512_mask_blend_ps(keep, _mm512_set1_ps(-INFINITY), s);                      \
                best = _mm512_max_ps(best, s);                                                    \
                _mm512_storeu_ps(sg + l0, s);                                                     \
            }                                                                                     \
            const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(best));                          \
            __m512 sum = _mm512_setzero_ps();                                                     \
            for (int64_t l = 0; l < padded; l += 16) { /* -inf (masked, padding) -> exactly 0 */  \
                const __m512 v = _mm512_loadu_ps(sg + l);                                         \
                const __mmask16 live = _mm512_cmp_ps_mask(v, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ); \
                const __m512 e = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(v, mx)));           \
                _mm512_storeu_ps(sg + l, e);                                                      \
                sum = _mm512_add_ps(sum, e);                                                      \
            }                                                                                     \
            const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));                   \
            __m512 acc[DV];                                                                       \
            for (int c = 0; c < DV; ++c) acc[c] = _mm512_setzero_ps();                             \
            for (int64_t l = 0; l < len; ++l) {                                                    \
                if (l + 32 < len)                                                                 \
                    for (int c = 0; c < DC; ++c)                                                  \
                        _mm_prefetch((const char *)(v_cache + rows[l + 32] * row_stride) + 64 * c, \
                                     _MM_HINT_T0);                                                \
                const bf16 *vr = v_cache + rows[l] * row_stride;                                   \
                const __m512 p = _mm512_set1_ps(sg[l]);                                            \
                for (int c = 0; c < DV; ++c)                                                      \
                    acc[c] = _mm512_fmadd_ps(p, load16(vr + 16 * c), acc[c]);                      \
            }                                                                                     \
            for (int c = 0; c < DV; ++c)                                                          \
                _mm256_storeu_si256((void *)(out + g * DIM + 16 * c),                              \
                                    to_bf16_16(_mm512_mul_ps(acc[c], inv)));                       \
        }                                                                                         \
    }

DEFINE_ATTEND(64)
DEFINE_ATTEND(128)

/* out[b, h] = softmax(scale * q[b, h] . K_b^T) V_b for one new token per sequence b, where
   slot l of sequence b lives in cache row kv_rows[b, l] (cache rows are [KH, D]); only slots
   l < kv_lens[b] with mask[b, l] != 0 (no mask: all) are attended. float32 math, bf16 out.
   With k_new, first writes k_new[b] / v_new[b] ([KH, D] rows) to cache row slot_rows[b] for
   every b, then attends: what index_copy_ calls before it would do. */
int pie_decode_attention(const bf16 *q, int64_t q_stride_b, int64_t q_stride_h, bf16 *k_cache,
                         bf16 *v_cache, const int64_t *kv_rows, const int64_t *kv_lens,
                         const uint8_t *mask, int64_t batch, int64_t heads, int64_t kv_heads,
                         int64_t dim, int64_t l_max, float scale, bf16 *out, const bf16 *k_new,
                         int64_t k_new_stride, const bf16 *v_new, int64_t v_new_stride,
                         const int64_t *slot_rows, int32_t threads) {
    if ((dim != 64 && dim != 128) || heads % kv_heads != 0) return -1;
    const int64_t group = heads / kv_heads, row = kv_heads * dim;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        if (k_new != NULL) {
#pragma omp for schedule(static)
            for (int64_t b = 0; b < batch; ++b) {
                memcpy(k_cache + slot_rows[b] * row, k_new + b * k_new_stride, (size_t)row * 2);
                memcpy(v_cache + slot_rows[b] * row, v_new + b * v_new_stride, (size_t)row * 2);
            }
        } /* the for's implicit barrier: every write lands before any read */
#pragma omp for schedule(dynamic, 1)
        for (int64_t unit = 0; unit < batch * kv_heads; ++unit) {
            const int64_t b = unit / kv_heads, kh = unit % kv_heads, len = kv_lens[b];
            float *scores = (float *)malloc((size_t)(group * ((len + 15) / 16 * 16)) * sizeof(float));
            if (scores == NULL) {
#pragma omp atomic write
                failed = 1;
                continue;
            }
            const bf16 *qb = q + b * q_stride_b + kh * group * q_stride_h;
            const uint8_t *mrow = mask == NULL ? NULL : mask + b * l_max;
            bf16 *ob = out + (b * heads + kh * group) * dim;
            if (dim == 64)
                attend_64(qb, q_stride_h, k_cache + kh * dim, v_cache + kh * dim, row,
                          kv_rows + b * l_max, mrow, len, group, scale, scores, ob);
            else
                attend_128(qb, q_stride_h, k_cache + kh * dim, v_cache + kh * dim, row,
                           kv_rows + b * l_max, mrow, len, group, scale, scores, ob);
            free(scores);
        }
    }
    return failed ? -2 : 0;
}

/* ---- elementwise --------------------------------------------------------------------------- */

/* y[m] = rms_norm(x[m]) for m < rows */
int pie_rms_norm(const bf16 *x, int64_t x_stride, int64_t rows, int64_t k, const bf16 *w,
                 float eps, bf16 *y, int64_t y_stride, int32_t threads) {
#pragma omp parallel for num_threads(rows * k >= 65536 ? threads : 1) schedule(static)
    for (int64_t m = 0; m < rows; ++m) norm_row(x + m * x_stride, k, w, eps, y + m * y_stride);
    return 0;
}

/* y = silu(gate) * up for rows [gate | up] of width 2 * half */
int pie_swiglu(const bf16 *gu, int64_t gu_stride, int64_t rows, int64_t half, bf16 *y,
               int64_t y_stride, int32_t threads) {
#pragma omp parallel for num_threads(rows * half >= 65536 ? threads : 1) schedule(static)
    for (int64_t m = 0; m < rows; ++m) {
        const bf16 *g = gu + m * gu_stride, *u = g + half;
        bf16 *ym = y + m * y_stride;
        for (int64_t i = 0; i < half; i += 16) {
            const __mmask16 t = tail_mask(half - i);
            const __m512 s = round16(silu16(maskz_load16(t, g + i)));
            _mm256_mask_storeu_epi16((void *)(ym + i), t, to_bf16_16(_mm512_mul_ps(s, maskz_load16(t, u + i))));
        }
    }
    return 0;
}

/* y[t, h] = x[t, h] * cos[pos_t] + rotate_half(x[t, h]) * sin[pos_t], where sin has its first
   half negated, so rotate_half is a swap of halves. x: [T, heads, dim], rows x_stride apart and
   heads dim apart; y: contiguous [T, heads, dim]. */
int pie_rope(const bf16 *x, int64_t x_stride, int64_t tokens, int64_t heads, int64_t dim,
             const int64_t *positions, const bf16 *cos, const bf16 *sin, bf16 *y, int32_t threads) {
    if (dim % 32 != 0) return -1;
    const int64_t half = dim / 2;
#pragma omp parallel for num_threads(tokens * heads * dim >= 65536 ? threads : 1) schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
        const bf16 *c = cos + positions[t] * dim, *s = sin + positions[t] * dim;
        for (int64_t h = 0; h < heads; ++h) {
            const bf16 *xh = x + t * x_stride + h * dim;
            bf16 *yh = y + (t * heads + h) * dim;
            for (int64_t i = 0; i < dim; i += 16) {
                const int64_t j = i < half ? i + half : i - half; /* rotate_half's partner */
                const __m512 a = round16(_mm512_mul_ps(load16(xh + i), load16(c + i)));
                const __m512 b = round16(_mm512_mul_ps(load16(xh + j), load16(s + i)));
                _mm256_storeu_si256((void *)(yh + i), to_bf16_16(_mm512_add_ps(a, b)));
            }
        }
    }
    return 0;
}
