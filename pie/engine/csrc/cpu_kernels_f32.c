/* The kernels of pie.engine.cpu_kernels_f32 (x86-64 AVX2 + FMA, float32).
 *
 * Entry points, each one call where torch needs several ops:
 * `pie_f32_gemm` (weight matmul for any number of rows, with the RMSNorm before and the bias,
 * residual add or SwiGLU after, from float32 or GGUF Q4_1/Q8_0 weights; `pie_f32_gemm_rope` also
 * rotates q and k), `pie_f32_decode_attention` (one new token per sequence, straight from the
 * paged KV cache), `pie_f32_rope`, and `pie_f32_decode_layers` (a decode step's layers in one
 * call). Everything is float32 with the operations of HF's Llama in float32, so results match
 * torch's but for summation order.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PANEL 16 /* outputs per packed weight panel: two ymm of sums per row */

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* lane j of the result = the sum of the 8 lanes of v[j] */
static inline __m256 transpose_sum8(const __m256 *v) {
    const __m256 a0 = _mm256_hadd_ps(v[0], v[1]), a1 = _mm256_hadd_ps(v[2], v[3]);
    const __m256 a2 = _mm256_hadd_ps(v[4], v[5]), a3 = _mm256_hadd_ps(v[6], v[7]);
    const __m256 b0 = _mm256_hadd_ps(a0, a1), b1 = _mm256_hadd_ps(a2, a3);
    return _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

/* e^x for 8 floats (Cephes-style: 2^n * p(r), |r| <= ln2/2), ~1 ulp; x clamped to [-88, 88],
   so -inf gives exactly 0 (2^-127 is built as the bit pattern 0) */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i bits = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

static inline __m256 silu8(__m256 g) { /* g / (1 + e^-g), as torch computes silu */
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    return _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

static inline float silu1(float g) { return g / (1.0f + expf(-g)); }

/* ---- weight matmul --------------------------------------------------------------------------- */

/* Weights are packed [panels][k][16]: for input p, the 16 outputs of a panel lie side by side,
   so one broadcast input and two FMAs update 16 sums. Panels are contiguous, so a thread's
   share of a matrix is one sequential stream.

   Several rows (BLIS's scheme, sized for 32 KiB L1 / 512 KiB L2): the rows of a chunk are
   cut into tiles of at most 6 rows; for each panel and each slice of at most KC inputs
   (4 KiB of weights) every tile runs the micro-kernel, whose 2 x rows accumulators live in registers
   (named variables: GCC keeps an array of vectors in memory and stores it back every
   iteration, at half the speed). The micro-kernel broadcasts each row's inputs from the row
   itself (six sequential streams), so inputs are read in place, or from one normalized copy
   when an RMSNorm comes first: no transposed packing, which cost a serial ~30 us a call. */
#define KC 64           /* inputs per slice, at most; k is cut into equal slices (576: 9 x 64),
                           as a short last slice costs ~10% (measured). 64 rather than 256: a
                           slice of 32 rows' inputs and its weights (8 + 4 KiB) then stay in L1
                           together; measured on a 2-core AVX2 EPYC, 30 layers' matmuls at 32
                           rows 53-54 -> 48-50 ms, at 8 rows 32 -> 29 ms, 128 rows unchanged */
#define MAX_TILE 6      /* 12 accumulators + 2 weights + 1 input of the 16 ymm registers */
#define CHUNK_BYTES (192 * 1024) /* inputs of one row chunk, kept in L2 */
#define MAX_CHUNK 192   /* rows per chunk, at most (sums of a panel: 12 KiB on the stack) */
/* The micro-kernel fetches the weights one slice ahead into L2: while the first tile over a
   slice runs, the next slice is requested, and it arrives from memory while the other tiles
   reuse the current one; the hardware prefetcher alone leaves the first tile of every slice
   waiting (measured on a 2-core AVX2 EPYC, 32 rows, weights streamed from DRAM as in a decode
   step: ~90 -> ~105 GFLOP/s; into L2 rather than L1, where the inputs live: 6% more). It does
   so only where it reads the float32 packing itself (`fetch`): a slice decoded from blocks is
   already in L1, and gemm requests the records of the next one. */

#define ROW_ACC(i)                                                                 \
    __m256 c##i##0 = _mm256_setzero_ps(), c##i##1 = _mm256_setzero_ps();           \
    if (!first && mt > i) {                                                        \
        c##i##0 = _mm256_loadu_ps(c + i * PANEL);                                  \
        c##i##1 = _mm256_loadu_ps(c + i * PANEL + 8);                              \
    }
#define ROW_FMA(i)                                                                 \
    if (mt > i) {                                                                  \
        const __m256 b = _mm256_broadcast_ss(a + i * lda + p);                     \
        c##i##0 = _mm256_fmadd_ps(w0, b, c##i##0);                                 \
        c##i##1 = _mm256_fmadd_ps(w1, b, c##i##1);                                 \
    }
#define ROW_STORE(i)                                                               \
    if (mt > i) {                                                                  \
        _mm256_storeu_ps(c + i * PANEL, c##i##0);                                  \
        _mm256_storeu_ps(c + i * PANEL + 8, c##i##1);                              \
    }
/* c[MT][16] (+)= a[MT][kc] . w[kc][16], rows of a lda floats apart; `first` starts the sums
   at 0. Unrolled 4 inputs deep: a 64-input slice in L1 went 73 -> 80 GFLOP/s on one Zen 3 core
   (the loop's pointer and address arithmetic, not the FMAs, was the limit). */
#define DEFINE_MICRO(MT)                                                                        \
    static void micro_##MT(const float *w, const float *a, int64_t lda, int64_t kc, int first,  \
                           int fetch, float *c) {                                               \
        const int mt = MT; /* constant: the rows past it compile away */                         \
        ROW_ACC(0) ROW_ACC(1) ROW_ACC(2) ROW_ACC(3) ROW_ACC(4) ROW_ACC(5)                        \
        _Pragma("GCC unroll 4") for (int64_t p = 0; p < kc; ++p) {                             \
            if (fetch) _mm_prefetch((const char *)(w + p * PANEL + kc * PANEL), _MM_HINT_T1);  \
            const __m256 w0 = _mm256_loadu_ps(w + p * PANEL);                                   \
            const __m256 w1 = _mm256_loadu_ps(w + p * PANEL + 8);                               \
            ROW_FMA(0) ROW_FMA(1) ROW_FMA(2) ROW_FMA(3) ROW_FMA(4) ROW_FMA(5)                   \
        }                                                                                       \
        ROW_STORE(0) ROW_STORE(1) ROW_STORE(2) ROW_STORE(3) ROW_STORE(4) ROW_STORE(5)           \
    }

DEFINE_MICRO(1)
DEFINE_MICRO(2)
DEFINE_MICRO(3)
DEFINE_MICRO(4)
DEFINE_MICRO(5)
DEFINE_MICRO(6)

static void micro(const float *w, const float *a, int64_t lda, int64_t kc, int64_t mt, int first,
                  int fetch, float *c) {
    switch (mt) {
        case 6: micro_6(w, a, lda, kc, first, fetch, c); break;
        case 5: micro_5(w, a, lda, kc, first, fetch, c); break;
        case 4: micro_4(w, a, lda, kc, first, fetch, c); break;
        case 3: micro_3(w, a, lda, kc, first, fetch, c); break;
        case 2: micro_2(w, a, lda, kc, first, fetch, c); break;
        default: micro_1(w, a, lda, kc, first, fetch, c); break;
    }
}

/* One row, whole k: the sums of even and odd inputs apart, so four FMA chains hide the FMA
   latency while the weights stream from memory (decode at batch 1). */
static void row_dot(const float *w, const float *x, int64_t k, float *out) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
    int64_t p = 0;
    for (; p + 2 <= k; p += 2) {
        const float *wp = w + p * PANEL;
        const __m256 xa = _mm256_broadcast_ss(x + p), xb = _mm256_broadcast_ss(x + p + 1);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wp), xa, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(wp + 8), xa, a1);
        b0 = _mm256_fmadd_ps(_mm256_loadu_ps(wp + 16), xb, b0);
        b1 = _mm256_fmadd_ps(_mm256_loadu_ps(wp + 24), xb, b1);
    }
    if (p < k) {
        const __m256 xa = _mm256_broadcast_ss(x + p);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + p * PANEL), xa, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + p * PANEL + 8), xa, a1);
    }
    _mm256_storeu_ps(out, _mm256_add_ps(a0, b0));
    _mm256_storeu_ps(out + 8, _mm256_add_ps(a1, b1));
}

enum { MODE_PLAIN = 0, MODE_ADD = 1, MODE_SWIGLU = 2, MODE_GATED_PLAIN = 3 };

/* ---- weights kept in GGUF's block quantization ------------------------------------------------

   The embedded model ships Q4_1 weights (and a Q8_0 embedding, its tied LM head): float32
   dequantization of them is exact arithmetic on the stored values, so a kernel that reads the
   blocks and dequantizes them on the way computes with the very same float32 weights while
   streaming 5.3x (Q4_1) or 3.6x (Q8_0) fewer bytes than a float32 copy. A panel's blocks of
   32 inputs are repacked once (Python) as records of float32 scales for its 16 outputs and
   the 32 x 16 quantized values:
     Q4_1: d[16], m[16], then for each input p 8 bytes, byte j = output j (low nibble) and
           output j + 8 (high nibble): w = d * q + m          (384 bytes for 512 weights)
     Q8_0: d[16], then for each input p 16 int8, one per output: w = q * d   (576 bytes)
   with the operations of the float32 dequantization (pie.engine.gguf_tensors), so every weight
   is bit-identical to it, and decoded into 16 floats per input, the float32 panel layout. */
enum { QTYPE_F32 = 0, QTYPE_Q4_1 = 1, QTYPE_Q8_0 = 2 };
#define QBLOCK 32
#define Q4_1_RECORD 384
#define Q8_0_RECORD 576

/* d * q + m as one FMA: d * q is exact (an 11-bit float16 significand times a 4-bit value),
   so the FMA rounds once where the dequantization's multiply and add round once too */
static void decode_q4_1(const uint8_t *record, float *out) { /* out [32][16] */
    const float *d = (const float *)record, *m = d + PANEL;
    const uint8_t *q = record + 2 * PANEL * 4;
    const __m256 d0 = _mm256_loadu_ps(d), d1 = _mm256_loadu_ps(d + 8);
    const __m256 m0 = _mm256_loadu_ps(m), m1 = _mm256_loadu_ps(m + 8);
    const __m256i low = _mm256_set1_epi32(0x0F);
    for (int p = 0; p < QBLOCK; ++p) {
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + p * 8)));
        const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, low));
        const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
        _mm256_storeu_ps(out + p * PANEL, _mm256_fmadd_ps(d0, lo, m0));
        _mm256_storeu_ps(out + p * PANEL + 8, _mm256_fmadd_ps(d1, hi, m1));
    }
}

static void decode_q8_0(const uint8_t *record, float *out) { /* out [32][16] */
    const float *d = (const float *)record;
    const uint8_t *q = record + PANEL * 4;
    const __m256 d0 = _mm256_loadu_ps(d), d1 = _mm256_loadu_ps(d + 8);
    for (int p = 0; p < QBLOCK; ++p) {
        const __m128i v = _mm_loadu_si128((const __m128i *)(q + p * PANEL));
        const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
        const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
        _mm256_storeu_ps(out + p * PANEL, _mm256_mul_ps(lo, d0));
        _mm256_storeu_ps(out + p * PANEL + 8, _mm256_mul_ps(hi, d1));
    }
}

static int64_t record_bytes(int32_t qtype) {
    return qtype == QTYPE_Q4_1 ? Q4_1_RECORD : Q8_0_RECORD;
}

/* Inputs [p0, p0 + kc) (whole blocks) of the panel at `panel` (its records) as float32 [kc][16] */
static void decode_slice(int32_t qtype, const uint8_t *panel, int64_t p0, int64_t kc,
                         float *out) {
    const int64_t bytes = record_bytes(qtype);
    for (int64_t b = 0; b < kc / QBLOCK; ++b) {
        const uint8_t *record = panel + (p0 / QBLOCK + b) * bytes;
        if (qtype == QTYPE_Q4_1)
            decode_q4_1(record, out + b * QBLOCK * PANEL);
        else
            decode_q8_0(record, out + b * QBLOCK * PANEL);
    }
}

/* Input p of a Q4_1 record: its 16 weights, as decode_q4_1 makes them */
#define Q4_1_WEIGHTS(p, v, w0, w1)                                                            \
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + (p) * 8)));    \
    const __m256 w0 = _mm256_fmadd_ps(d0, _mm256_cvtepi32_ps(_mm256_and_si256(v, low)), m0);    \
    const __m256 w1 = _mm256_fmadd_ps(d1, _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), m1);

/* Input p of a Q8_0 record: its 16 weights, as decode_q8_0 makes them */
#define Q8_0_WEIGHTS(p, v, w0, w1)                                                           \
    const __m128i v = _mm_loadu_si128((const __m128i *)(q + (p) * PANEL));                     \
    const __m256 w0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), d0);         \
    const __m256 w1 =                                                                         \
        _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8))), d1);

/* Records are requested this far ahead of the one decoded: at one row the loop outruns what the
   hardware prefetcher keeps in flight from DRAM (measured, one thread over 135 MB of Q4_1
   records: 7.7 -> 10.0 G weights/s; two threads 15 -> 17.8) */
#define BLOCK_PREFETCH_BYTES 3072
static inline void prefetch_record(const uint8_t *record, int64_t bytes) {
    for (int64_t line = 0; line < bytes; line += 64)
        _mm_prefetch((const char *)(record + BLOCK_PREFETCH_BYTES + line), _MM_HINT_T0);
}

/* One row against a quantized panel, whole k, with the sums of row_dot (even and odd inputs
   apart; blocks are 32 inputs, so the split is row_dot's: the same sums in the same order,
   bit for bit), decoded in registers: no trip through memory, as batch-1 decode is bound by
   this loop rather than by the 4-5x smaller weight stream. */
#define ROW_DOT_BLOCK(WEIGHTS)                                                                \
    for (int p = 0; p < QBLOCK; p += 2) {                                                     \
        WEIGHTS(p, va, wa0, wa1)                                                              \
        WEIGHTS(p + 1, vb, wb0, wb1)                                                          \
        const __m256 xa = _mm256_broadcast_ss(xp + p), xb = _mm256_broadcast_ss(xp + p + 1);  \
        a0 = _mm256_fmadd_ps(wa0, xa, a0);                                                    \
        a1 = _mm256_fmadd_ps(wa1, xa, a1);                                                    \
        b0 = _mm256_fmadd_ps(wb0, xb, b0);                                                    \
        b1 = _mm256_fmadd_ps(wb1, xb, b1);                                                    \
    }
static void row_dot_blocks(int32_t qtype, const uint8_t *panel, const float *x, int64_t k,
                           float *out) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
    const __m256i low = _mm256_set1_epi32(0x0F);
    if (qtype == QTYPE_Q4_1) {
        for (int64_t p0 = 0; p0 < k; p0 += QBLOCK) {
            const uint8_t *record = panel + p0 / QBLOCK * Q4_1_RECORD, *q = record + 8 * PANEL;
            prefetch_record(record, Q4_1_RECORD);
            const float *d = (const float *)record, *xp = x + p0;
            const __m256 d0 = _mm256_loadu_ps(d), d1 = _mm256_loadu_ps(d + 8);
            const __m256 m0 = _mm256_loadu_ps(d + PANEL), m1 = _mm256_loadu_ps(d + PANEL + 8);
            ROW_DOT_BLOCK(Q4_1_WEIGHTS)
        }
    } else {
        for (int64_t p0 = 0; p0 < k; p0 += QBLOCK) {
            const uint8_t *record = panel + p0 / QBLOCK * Q8_0_RECORD, *q = record + 4 * PANEL;
            prefetch_record(record, Q8_0_RECORD);
            const float *d = (const float *)record, *xp = x + p0;
            const __m256 d0 = _mm256_loadu_ps(d), d1 = _mm256_loadu_ps(d + 8);
            ROW_DOT_BLOCK(Q8_0_WEIGHTS)
        }
    }
    _mm256_storeu_ps(out, _mm256_add_ps(a0, b0));
    _mm256_storeu_ps(out + 8, _mm256_add_ps(a1, b1));
}

typedef struct { /* one packed weight matrix; filled once from Python */
    const float *w;    /* [panels][k][16]; gated: gate panel j at 2j, up panel j at 2j + 1 */
    const float *bias; /* [n_out] or NULL */
    int64_t panels;
    int64_t k;     /* input width */
    int64_t n_out; /* outputs (gated: of one half) */
    int32_t mode;  /* gated matrices: MODE_SWIGLU, or MODE_GATED_PLAIN for [x.gate | x.up] */
    /* RoPE layout: outputs [0, rope_cols) are heads of head_dim (a multiple of 16), and each of
       their panels holds 8 outputs of a head's first half and, after them, their 8 partners of
       its second half, so RoPE can rotate a panel's sums on their own (0: no such outputs) */
    int64_t rope_cols;
    int64_t head_dim;
    int32_t qtype; /* QTYPE_F32: w is float [panels][k][16]; else w holds the panels' block
                      records, [panels][k / 32][record] */
} PackedF32;

typedef struct { /* where one call's results go, and what is folded into them */
    const float *residual; /* [rows][res_stride], MODE_ADD */
    int64_t res_stride;
    const int64_t *positions; /* [rows]: RoPE of the rope_cols outputs at these positions, */
    const float *cos, *sin;   /* [max_position][head_dim] tables (sin's first half negated); */
                              /* positions NULL: no rotation */
    float *y;
    int64_t y_stride;
} Output;

/* A panel of RoPE-layout outputs from n0: the first 8 sums go to the head's columns lo..lo+8,
   the last 8 to their partners half further, + bias, rotated where positions are given with
   the operations of pie_f32_rope: y[i] = x[i] cos[i] + x[partner] sin[i]. */
static void rope_epilogue(const PackedF32 *pw, const float *acc, int64_t m0, int64_t rows,
                          int64_t n0, const Output *out) {
    const int64_t dim = pw->head_dim, half = dim / 2, at = (n0 % dim) / 2; /* at: lo in head */
    const int64_t lo = n0 - n0 % dim + at, hi = lo + half;
    for (int64_t i = 0; i < rows; ++i) {
        __m256 a = _mm256_loadu_ps(acc + i * PANEL), b = _mm256_loadu_ps(acc + i * PANEL + 8);
        if (pw->bias != NULL) {
            a = _mm256_add_ps(a, _mm256_loadu_ps(pw->bias + lo));
            b = _mm256_add_ps(b, _mm256_loadu_ps(pw->bias + hi));
        }
        if (out->positions != NULL) {
            const float *c = out->cos + out->positions[m0 + i] * dim + at;
            const float *s = out->sin + out->positions[m0 + i] * dim + at;
            const __m256 ra = _mm256_add_ps(_mm256_mul_ps(a, _mm256_loadu_ps(c)),
                                            _mm256_mul_ps(b, _mm256_loadu_ps(s)));
            const __m256 rb = _mm256_add_ps(_mm256_mul_ps(b, _mm256_loadu_ps(c + half)),
                                            _mm256_mul_ps(a, _mm256_loadu_ps(s + half)));
            a = ra;
            b = rb;
        }
        float *yi = out->y + (m0 + i) * out->y_stride;
        _mm256_storeu_ps(yi + lo, a);
        _mm256_storeu_ps(yi + hi, b);
    }
}

/* y[m, n0:n0+16] for `rows` rows from m0, from the panel's sums acc[row][16] (and up[row][16]
   for SwiGLU): + bias, + residual (MODE_ADD) or silu(gate) * up */
static void epilogue(const PackedF32 *pw, const float *acc, const float *up, int64_t m0,
                     int64_t rows, int64_t n0, const Output *out) {
    if (n0 < pw->rope_cols) {
        rope_epilogue(pw, acc, m0, rows, n0, out);
        return;
    }
    const int64_t n1 = min64(n0 + PANEL, pw->n_out);
    for (int64_t i = 0; i < rows; ++i) {
        float *yi = out->y + (m0 + i) * out->y_stride;
        const float *ri =
            out->residual == NULL ? NULL : out->residual + (m0 + i) * out->res_stride;
        const float *ai = acc + i * PANEL, *ui = up + i * PANEL;
        if (n1 - n0 == PANEL) {
            for (int h = 0; h < PANEL; h += 8) {
                __m256 v = _mm256_loadu_ps(ai + h);
                if (pw->bias != NULL) v = _mm256_add_ps(v, _mm256_loadu_ps(pw->bias + n0 + h));
                if (pw->mode == MODE_ADD) v = _mm256_add_ps(_mm256_loadu_ps(ri + n0 + h), v);
                if (pw->mode == MODE_SWIGLU) v = _mm256_mul_ps(silu8(v), _mm256_loadu_ps(ui + h));
                _mm256_storeu_ps(yi + n0 + h, v);
            }
        } else {
            for (int64_t n = n0; n < n1; ++n) {
                float v = ai[n - n0];
                if (pw->bias != NULL) v += pw->bias[n];
                if (pw->mode == MODE_ADD) v = ri[n] + v;
                if (pw->mode == MODE_SWIGLU) v = silu1(v) * ui[n - n0];
                yi[n] = v;
            }
        }
    }
}

/* A gated matrix's sums: silu(gate) * up into y, or (MODE_GATED_PLAIN) gate into columns
   [0, n_out) and up into [n_out, 2 n_out) of y; any other matrix: `epilogue`. */
static void finish(const PackedF32 *pw, const float *acc, const float *up, int64_t m0,
                   int64_t rows, int64_t n0, const Output *out) {
    if (pw->mode != MODE_GATED_PLAIN) {
        epilogue(pw, acc, up, m0, rows, n0, out);
        return;
    }
    PackedF32 plain = *pw;
    plain.mode = MODE_PLAIN;
    Output ups = *out;
    ups.y += pw->n_out;
    epilogue(&plain, acc, NULL, m0, rows, n0, out);
    epilogue(&plain, up, NULL, m0, rows, n0, &ups);
}

/* rsqrt(mean(x^2) + eps) of one row, as HF's float32 RMSNorm computes it */
static float norm_scale(const float *x, int64_t k, float eps) {
    __m256 ss = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        ss = _mm256_fmadd_ps(v, v, ss);
    }
    float sum = hsum8(ss);
    for (; i < k; ++i) sum += x[i] * x[i];
    return 1.0f / sqrtf(sum / (float)k + eps);
}

/* Rows are split into tiles of at most MAX_TILE rows, as even as possible (32 -> 6,6,6,6,4,4),
   so no tile runs with a handful of accumulators. Tile t starts at row tile_start(n, t). */
static int64_t tile_count(int64_t n) { return (n + MAX_TILE - 1) / MAX_TILE; }
static int64_t tile_start(int64_t n, int64_t t) {
    const int64_t tiles = tile_count(n), base = n / tiles, extra = n % tiles;
    return t * base + (t < extra ? t : extra);
}

/* Row m of x, RMS-normalized, into a (rows k floats apart), as HF's float32 RMSNorm rounds:
   w * (x * r). */
static void normalize_row(const float *x, int64_t x_stride, int64_t m, int64_t k,
                          const float *norm_w, float eps, float *a) {
    const float *xm = x + m * x_stride;
    float *am = a + m * k;
    const float r = norm_scale(xm, k, eps);
    const __m256 rv = _mm256_set1_ps(r);
    int64_t p = 0;
    for (; p + 8 <= k; p += 8)
        _mm256_storeu_ps(am + p, _mm256_mul_ps(_mm256_loadu_ps(norm_w + p),
                                               _mm256_mul_ps(_mm256_loadu_ps(xm + p), rv)));
    for (; p < k; ++p) am[p] = norm_w[p] * (xm[p] * r);
}

/* Rows [0, rows) of x normalized into a, by the team that runs it (see gemm_team); a few rows
   by one thread, as splitting them cost more than it saved (measured, 2-core EPYC: decode
   steps at 4-6 sequences 3-4% slower with the rows split) */
static void normalize_rows(const float *x, int64_t x_stride, int64_t rows, int64_t k,
                           const float *norm_w, float eps, float *a) {
    if (rows < 64) {
#pragma omp single
        for (int64_t m = 0; m < rows; ++m) normalize_row(x, x_stride, m, k, norm_w, eps, a);
        return;
    }
#pragma omp for schedule(static)
    for (int64_t m = 0; m < rows; ++m) normalize_row(x, x_stride, m, k, norm_w, eps, a);
}

/* What gemm_team would refuse: 0, or the error code pie_f32_gemm returns. */
static int gemm_check(const PackedF32 *pw, int64_t rows) {
    if (rows < 1) return -1;
    if (pw->qtype != QTYPE_F32 && pw->k % QBLOCK) return -4;
    return 0;
}

/* Floats of the normalized copy of `rows` inputs gemm_team needs (0: none). */
static int64_t gemm_scratch(const PackedF32 *pw, int64_t rows, const float *norm_w) {
    return norm_w == NULL ? 0 : rows * pw->k;
}

/* y[m, :] for m < rows: (rms_norm(x[m]) if norm_w) @ W^T, then + bias, + residual (MODE_ADD)
   or silu(gate) * up (MODE_SWIGLU), RoPE where out->positions. Run by every thread of a team:
   its loops are OpenMP worksharing loops (each ends in a barrier), so a whole decode step can
   run in one parallel region (see pie_f32_decode_layers) rather than one per matmul. The
   threads split the panels; `normed` (gemm_scratch floats) is shared by the team. Arguments
   must have passed gemm_check. */
static void gemm_team(const PackedF32 *pw, const float *x, int64_t x_stride, int64_t rows,
                      const float *norm_w, float eps, const Output *out, float *normed) {
    const int64_t k = pw->k;
    const int swiglu = pw->mode == MODE_SWIGLU || pw->mode == MODE_GATED_PLAIN; /* two halves */
    const int64_t units = swiglu ? pw->panels / 2 : pw->panels;
    const int32_t qtype = pw->qtype;
    /* bytes of one panel, and of a unit (a panel, or a gate panel and its up panel) */
    const int64_t rbytes = qtype == QTYPE_F32 ? 0 : record_bytes(qtype);
    const int64_t panel_bytes = qtype == QTYPE_F32 ? k * PANEL * 4 : k / QBLOCK * rbytes;
    const int64_t unit_bytes = (swiglu ? 2 : 1) * panel_bytes;
    const uint8_t *weights = (const uint8_t *)pw->w;
    int64_t chunk = CHUNK_BYTES / (k * 4);
    chunk = chunk < MAX_TILE ? MAX_TILE : chunk > MAX_CHUNK ? MAX_CHUNK : chunk;
    /* equal slices of at most KC inputs; whole blocks where the weights are quantized */
    const int64_t step = qtype == QTYPE_F32 ? 1 : QBLOCK, steps = k / step;
    const int64_t slices = (k + KC - 1) / KC, slice = (steps + slices - 1) / slices * step;
    const float *a = x; /* the inputs the kernel reads: x, or its normalized copy */
    int64_t lda = x_stride;
    if (norm_w != NULL) {
        normalize_rows(x, x_stride, rows, k, norm_w, eps, normed);
        a = normed;
        lda = k;
    }
    if (rows == 1) { /* streaming: one row against whole panels */
#pragma omp for schedule(static)
        for (int64_t u = 0; u < units; ++u) {
            float acc[PANEL], up[PANEL];
            const uint8_t *wu = weights + u * unit_bytes;
            for (int64_t half = 0; half <= swiglu; ++half) {
                const uint8_t *panel = wu + half * panel_bytes;
                float *sums = half ? up : acc;
                if (qtype == QTYPE_F32)
                    row_dot((const float *)panel, a, k, sums);
                else
                    row_dot_blocks(qtype, panel, a, k, sums);
            }
            finish(pw, acc, up, 0, 1, u * PANEL, out);
        }
        return;
    }
    for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
        const int64_t n = min64(chunk, rows - r0), tiles = tile_count(n);
        const float *ac = a + r0 * lda;
#pragma omp for schedule(static)
        for (int64_t u = 0; u < units; ++u) {
            float acc[MAX_CHUNK * PANEL], up[MAX_CHUNK * PANEL];
            float decoded[KC * PANEL]; /* a quantized slice as float32, shared by the tiles */
            const uint8_t *wu = weights + u * unit_bytes;
            for (int64_t p0 = 0; p0 < k; p0 += slice) {
                const int64_t kc = min64(slice, k - p0);
                for (int64_t half = 0; half <= swiglu; ++half) {
                    const uint8_t *panel = wu + half * panel_bytes;
                    const float *ws = (const float *)panel + p0 * PANEL;
                    if (qtype != QTYPE_F32) {
                        /* the records the next slice decodes (after a panel's last slice, the
                           next panel's first; past the matrix's end the hints fetch nothing,
                           prefetches never fault), requested now: the tiles below run while they
                           arrive. Without it every slice's decode waited on memory, and blocks
                           lost to float32 from 8 rows on (measured on a 2-core AVX2 EPYC,
                           SmolLM2's layers at 32 rows: 66 -> 62 ms, float32 60 ms). */
                        const uint8_t *next = p0 + kc < k ? panel + (p0 + kc) / QBLOCK * rbytes
                                                          : panel + panel_bytes;
                        for (int64_t line = 0; line < kc / QBLOCK * rbytes; line += 64)
                            _mm_prefetch((const char *)(next + line), _MM_HINT_T0);
                        decode_slice(qtype, panel, p0, kc, decoded);
                        ws = decoded;
                    }
                    float *sums = half ? up : acc;
                    for (int64_t t = 0; t < tiles; ++t) {
                        const int64_t s = tile_start(n, t), mt = tile_start(n, t + 1) - s;
                        micro(ws, ac + s * lda + p0, lda, kc, mt, p0 == 0, ws != decoded,
                              sums + s * PANEL);
                    }
                }
            }
            finish(pw, acc, up, r0, n, u * PANEL, out);
        }
    }
}

static float *alloc_floats(int64_t n) { /* 64-byte aligned, NULL for n == 0 or no memory */
    return n == 0 ? NULL : (float *)aligned_alloc(64, (size_t)((n * 4 + 63) / 64 * 64));
}

/* gemm_team in a parallel region of its own: one matmul called from Python. */
static int gemm(const PackedF32 *pw, const float *x, int64_t x_stride, int64_t rows,
                const float *norm_w, float eps, const Output *out, int32_t threads) {
    const int rc = gemm_check(pw, rows);
    if (rc != 0) return rc;
    const int64_t scratch = gemm_scratch(pw, rows, norm_w);
    float *normed = alloc_floats(scratch);
    if (scratch > 0 && normed == NULL) return -2;
#pragma omp parallel num_threads(threads)
    gemm_team(pw, x, x_stride, rows, norm_w, eps, out, normed);
    free(normed);
    return 0;
}

int pie_f32_gemm(const PackedF32 *pw, const float *x, int64_t x_stride, int64_t rows,
                 const float *norm_w, float eps, const float *residual, int64_t res_stride,
                 float *y, int64_t y_stride, int32_t threads) {
    const Output out = {residual, res_stride, NULL, NULL, NULL, y, y_stride};
    return gemm(pw, x, x_stride, rows, norm_w, eps, &out, threads);
}

/* pie_f32_gemm of a matrix with a RoPE layout, its q/k outputs rotated at `positions` (the
   rope pass of a layer folded into its qkv matmul); -3 for a matrix without that layout */
int pie_f32_gemm_rope(const PackedF32 *pw, const float *x, int64_t x_stride, int64_t rows,
                      const float *norm_w, float eps, const int64_t *positions, const float *cos,
                      const float *sin, float *y, int64_t y_stride, int32_t threads) {
    if (pw->rope_cols <= 0) return -3;
    const Output out = {NULL, 0, positions, cos, sin, y, y_stride};
    return gemm(pw, x, x_stride, rows, norm_w, eps, &out, threads);
}

/* ---- decode attention over paged KV ---------------------------------------------------------- */

/* One head's scores s[0, padded) -> e^(s - max) in place, masked (mask[l] == 0) and padding
   (l >= len) slots exactly 0; returns 1 / sum (0 when nothing is attended). Where `stats` is
   given, stats[0] = the max (0 when nothing is attended) and stats[1] = the sum. */
static float softmax_exp(float *s, int64_t len, int64_t padded, const uint8_t *mask,
                         float *stats) {
    for (int64_t l = len; l < padded; ++l) s[l] = -INFINITY;
    if (mask != NULL)
        for (int64_t l = 0; l < len; ++l)
            if (!mask[l]) s[l] = -INFINITY;
    __m256 best = _mm256_set1_ps(-INFINITY);
    for (int64_t l = 0; l < padded; l += 8) best = _mm256_max_ps(best, _mm256_loadu_ps(s + l));
    float top = hmax8(best);
    if (top == -INFINITY) top = 0.0f; /* nothing to attend: all weights 0, output 0 */
    __m256 sum = _mm256_setzero_ps();
    for (int64_t l = 0; l < padded; l += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + l), _mm256_set1_ps(top)));
        _mm256_storeu_ps(s + l, e);
        sum = _mm256_add_ps(sum, e);
    }
    const float total = hsum8(sum);
    if (stats != NULL) {
        stats[0] = top;
        stats[1] = total;
    }
    return total > 0.0f ? 1.0f / total : 0.0f;
}

/* One (sequence, KV head): scores of the `group` query heads that share it, softmax, then the
   probability-weighted sum of V rows. Cache rows are row_stride floats apart, and k/v point at
   this KV head's column; rows[l] is the cache row of slot l. scores: group * padded floats. */
static void attend(const float *q, int64_t q_stride_h, const float *k_cache,
                   const float *v_cache, int64_t row_stride, const int64_t *rows,
                   const uint8_t *mask, int64_t len, int64_t group, int64_t dim, float scale,
                   float *scores, float *out) {
    const int64_t padded = (len + 7) / 8 * 8, chunks = dim / 8;
    for (int64_t l0 = 0; l0 < len; l0 += 8) { /* 8 keys: 8 partial dots, one transpose-sum */
        const int64_t n = min64(8, len - l0);
        const float *kr[8];
        for (int64_t j = 0; j < 8; ++j) kr[j] = k_cache + rows[l0 + (j < n ? j : 0)] * row_stride;
        for (int64_t g = 0; g < group; ++g) {
            const float *qg = q + g * q_stride_h;
            __m256 part[8];
            for (int j = 0; j < 8; ++j) part[j] = _mm256_setzero_ps();
            for (int64_t c = 0; c < chunks; ++c) {
                const __m256 qv = _mm256_loadu_ps(qg + 8 * c);
                for (int j = 0; j < 8; ++j)
                    part[j] = _mm256_fmadd_ps(_mm256_loadu_ps(kr[j] + 8 * c), qv, part[j]);
            }
            _mm256_storeu_ps(scores + g * padded + l0,
                             _mm256_mul_ps(transpose_sum8(part), _mm256_set1_ps(scale)));
        }
    }
    for (int64_t g = 0; g < group; ++g) {
        float *sg = scores + g * padded;
        const __m256 inv = _mm256_set1_ps(softmax_exp(sg, len, padded, mask, NULL));
        for (int64_t c0 = 0; c0 < chunks; c0 += 8) { /* 64 outputs at a time stay in registers */
            const int64_t cn = min64(8, chunks - c0);
            __m256 acc[8];
            for (int c = 0; c < 8; ++c) acc[c] = _mm256_setzero_ps();
            for (int64_t l = 0; l < len; ++l) {
                if (sg[l] == 0.0f) continue; /* masked */
                const float *vr = v_cache + rows[l] * row_stride + 8 * c0;
                const __m256 p = _mm256_set1_ps(sg[l]);
                for (int c = 0; c < cn; ++c) acc[c] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 8 * c), acc[c]);
            }
            for (int c = 0; c < cn; ++c)
                _mm256_storeu_ps(out + g * dim + 8 * (c0 + c), _mm256_mul_ps(acc[c], inv));
        }
    }
}

/* Accumulators of attend_rows's V pass: row i (a query head) has 4 vectors of 8 outputs,
   starting from 0 on the first span of rows and from the sums in `out` on the others. */
#define ROW_ACC4(i)                                                                \
    __m256 v##i##0 = _mm256_setzero_ps(), v##i##1 = _mm256_setzero_ps();           \
    __m256 v##i##2 = _mm256_setzero_ps(), v##i##3 = _mm256_setzero_ps();           \
    if (s0 > 0 && gn > i) {                                                        \
        const float *o = out + (kh * group + g0 + i) * dim + d0;                   \
        v##i##0 = _mm256_loadu_ps(o);                                              \
        if (dn > 8) v##i##1 = _mm256_loadu_ps(o + 8);                              \
        if (dn > 16) v##i##2 = _mm256_loadu_ps(o + 16);                            \
        if (dn > 24) v##i##3 = _mm256_loadu_ps(o + 24);                            \
    }
#define ROW_FMA4(i, probs)                                                         \
    {                                                                              \
        const __m256 pb = _mm256_set1_ps(probs[l]);                                \
        v##i##0 = _mm256_fmadd_ps(pb, v0, v##i##0);                                \
        v##i##1 = _mm256_fmadd_ps(pb, v1, v##i##1);                                \
        v##i##2 = _mm256_fmadd_ps(pb, v2, v##i##2);                                \
        v##i##3 = _mm256_fmadd_ps(pb, v3, v##i##3);                                \
    }
#define ROW_OUT4(i)                                                                \
    if (gn > i) {                                                                  \
        float *o = out + (kh * group + g0 + i) * dim + d0;                         \
        _mm256_storeu_ps(o, v##i##0);                                              \
        if (dn > 8) _mm256_storeu_ps(o + 8, v##i##1);                              \
        if (dn > 16) _mm256_storeu_ps(o + 16, v##i##2);                            \
        if (dn > 24) _mm256_storeu_ps(o + 24, v##i##3);                            \
    }

/* Reads every 64-byte line of rows[0, n) (row_stride floats each) once, in order, with loads
   that do nothing else; returns a sum only so that the loads are kept. */
static float read_rows(const float *cache, int64_t row_stride, const int64_t *rows, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (int64_t l = 0; l < n; ++l) {
        const float *r = cache + rows[l] * row_stride;
        int64_t c = 0;
        for (; c + 32 <= row_stride; c += 32) {
            s0 = _mm256_add_ps(s0, _mm256_loadu_ps(r + c));
            s1 = _mm256_add_ps(s1, _mm256_loadu_ps(r + c + 16));
        }
        for (; c < row_stride; c += 16) s0 = _mm256_add_ps(s0, _mm256_loadu_ps(r + c));
    }
    return hsum8(_mm256_add_ps(s0, s1));
}

#define SPAN_BYTES (96 * 1024) /* rows read ahead of the compute at a time: they stay in L2 */

/* One sequence, every head: the same results as `attend` for each KV head, but the cache rows
   (all KV heads, contiguous) are taken in spans of ~96 KiB: each span is first read in a
   plain loop that only loads, and then computed on from L2 (K: scores of every head; V: 32
   outputs of up to 3 query heads at a time, 12 accumulators in registers). Measured (batch 32,
   3 KV heads, 176 slots, 2 cores): computing as it reads keeps too few lines in flight, so
   the rows moved at ~8 GB/s where a plain read of them runs at 12-16; software prefetch at
   any distance did not close that gap, the plain read ahead does (30 layers: 30-34 -> 24-25
   ms; 1000 slots: 210 -> 141 ms, where V no longer fits L2 between its six passes).
   scores: heads * padded floats; stats (or NULL): each head's softmax max and sum. */
static void attend_rows(const float *q, int64_t q_stride_h, const float *k_cache,
                        const float *v_cache, int64_t row_stride, const int64_t *rows,
                        const uint8_t *mask, int64_t len, int64_t heads, int64_t group,
                        int64_t dim, float scale, float *scores, float *out, float *stats) {
    const int64_t padded = (len + 7) / 8 * 8, chunks = dim / 8;
    int64_t span = SPAN_BYTES / (row_stride * 4) / 8 * 8;
    if (span < 8) span = 8;
    volatile float sink; /* keeps read_rows's loads; one per thread, so no shared write */
    for (int64_t s0 = 0; s0 < len; s0 += span) {
        const int64_t s1 = min64(s0 + span, len);
        sink = read_rows(k_cache, row_stride, rows + s0, s1 - s0);
        for (int64_t l0 = s0; l0 < s1; l0 += 8) { /* span is a multiple of 8 */
            const int64_t n = min64(8, len - l0);
            const float *kr[8];
            for (int64_t j = 0; j < 8; ++j)
                kr[j] = k_cache + rows[l0 + (j < n ? j : 0)] * row_stride;
            for (int64_t h = 0; h < heads; ++h) {
                const float *qh = q + h * q_stride_h;
                const int64_t at = (h / group) * dim;
                __m256 part[8];
                for (int j = 0; j < 8; ++j) part[j] = _mm256_setzero_ps();
                for (int64_t c = 0; c < chunks; ++c) {
                    const __m256 qv = _mm256_loadu_ps(qh + 8 * c);
                    for (int j = 0; j < 8; ++j)
                        part[j] = _mm256_fmadd_ps(_mm256_loadu_ps(kr[j] + at + 8 * c), qv, part[j]);
                }
                _mm256_storeu_ps(scores + h * padded + l0,
                                 _mm256_mul_ps(transpose_sum8(part), _mm256_set1_ps(scale)));
            }
        }
    }
    for (int64_t h = 0; h < heads; ++h) { /* probabilities, as torch divides first */
        float *sh = scores + h * padded;
        const float inv = softmax_exp(sh, len, padded, mask, stats == NULL ? NULL : stats + 2 * h);
        for (int64_t l = 0; l < padded; ++l) sh[l] *= inv;
    }
    const int64_t kv_heads = heads / group;
    for (int64_t s0 = 0; s0 < len; s0 += span) {
        const int64_t s1 = min64(s0 + span, len);
        sink = read_rows(v_cache, row_stride, rows + s0, s1 - s0);
        for (int64_t kh = 0; kh < kv_heads; ++kh)
            for (int64_t g0 = 0; g0 < group; g0 += 3) {
                const int64_t gn = min64(3, group - g0);
                const float *p0 = scores + (kh * group + g0) * padded;
                const float *p1 = gn > 1 ? p0 + padded : p0, *p2 = gn > 2 ? p0 + 2 * padded : p0;
                for (int64_t d0 = 0; d0 < dim; d0 += 32) {
                    const int64_t dn = min64(32, dim - d0);
                    ROW_ACC4(0) ROW_ACC4(1) ROW_ACC4(2)
                    for (int64_t l = s0; l < s1; ++l) {
                        const float *vr = v_cache + rows[l] * row_stride + kh * dim + d0;
                        const __m256 v0 = _mm256_loadu_ps(vr);
                        const __m256 v1 = dn > 8 ? _mm256_loadu_ps(vr + 8) : v0;
                        const __m256 v2 = dn > 16 ? _mm256_loadu_ps(vr + 16) : v0;
                        const __m256 v3 = dn > 24 ? _mm256_loadu_ps(vr + 24) : v0;
                        ROW_FMA4(0, p0) ROW_FMA4(1, p1) ROW_FMA4(2, p2)
                    }
                    ROW_OUT4(0) ROW_OUT4(1) ROW_OUT4(2)
                }
            }
    }
    (void)sink;
}

#define SPLIT_MIN_SLOTS 128 /* slots of one run of a split sequence, at least */
#define SPLIT_MAX_PARTS 64 /* runs of one sequence, at most */

/* Few sequences: every sequence's slots are cut into `parts` runs; each (sequence, run) is one
   task of attend_rows, which leaves that run's attention output and each head's softmax max
   and sum, and the runs are then merged with their sums rescaled to a common max (as split-K
   decoding does on GPUs). Tasks per KV head (`attend`) left one of 2 threads idle half the
   time at batch 1 (3 tasks) and read each row's head at a stride. Measured, 30 layers, 2
   cores: 2000 slots, batch 1: 13.3-14.7 -> 8.8-10.7 ms, batch 2: 24-25 -> 17-23 ms; 512
   slots, batch 1: 4.4-5.8 -> 2.8-3.8 ms; at 256 slots no difference, and below that runs
   of fewer than SPLIT_MIN_SLOTS slots cost more than they save, so short sequences stay
   on `attend`. */
static void attend_split(const float *q, int64_t q_stride_b, int64_t q_stride_h,
                         const float *k_cache, const float *v_cache, int64_t row_stride,
                         const int64_t *kv_rows, const int64_t *kv_lens, const uint8_t *mask,
                         int64_t batch, int64_t heads, int64_t group, int64_t dim, int64_t l_max,
                         float scale, float *out, int64_t parts, float *scratch,
                         int64_t per_thread, float *partial) {
    const int64_t tasks = batch * parts;
    float *stats = partial + tasks * heads * dim; /* [tasks][heads][max, sum] */
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
        const int64_t b = t / parts, part = t % parts, len = kv_lens[b];
        const int64_t lo = len * part / parts, hi = len * (part + 1) / parts;
        float *st = stats + t * heads * 2;
        if (hi == lo) { /* a short sequence: this run is empty */
            for (int64_t h = 0; h < heads; ++h) st[2 * h] = 0.0f, st[2 * h + 1] = 0.0f;
            continue;
        }
        float *scores = scratch + (int64_t)omp_get_thread_num() * per_thread;
        attend_rows(q + b * q_stride_b, q_stride_h, k_cache, v_cache, row_stride,
                    kv_rows + b * l_max + lo, mask == NULL ? NULL : mask + b * l_max + lo,
                    hi - lo, heads, group, dim, scale, scores, partial + t * heads * dim, st);
    }
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < batch * heads; ++bh) {
        const int64_t b = bh / heads, h = bh % heads;
        float top = -INFINITY, total = 0.0f;
        for (int64_t part = 0; part < parts; ++part) {
            const float *st = stats + ((b * parts + part) * heads + h) * 2;
            if (st[1] > 0.0f && st[0] > top) top = st[0];
        }
        float weight[SPLIT_MAX_PARTS];
        for (int64_t part = 0; part < parts; ++part) {
            const float *st = stats + ((b * parts + part) * heads + h) * 2;
            weight[part] = st[1] > 0.0f ? st[1] * expf(st[0] - top) : 0.0f;
            total += weight[part];
        }
        float *o = out + (b * heads + h) * dim;
        for (int64_t d = 0; d < dim; ++d) o[d] = 0.0f;
        if (total <= 0.0f) continue; /* nothing attended: output 0, as unsplit */
        for (int64_t part = 0; part < parts; ++part) {
            if (weight[part] == 0.0f) continue;
            const float w = weight[part] / total;
            const float *po = partial + ((b * parts + part) * heads + h) * dim;
            for (int64_t d = 0; d < dim; ++d) o[d] += w * po[d];
        }
    }
}

typedef struct { /* how a decode attention call shares its work among `team` threads */
    int64_t team;
    int by_sequence; /* one task per sequence */
    int64_t parts;   /* else: > 1, every sequence cut in this many runs (attend_split); */
                     /* 1, one task per (sequence, KV head) */
    int64_t per_thread; /* floats of scores per thread */
    int64_t scratch;    /* floats of scratch in all: scores, then attend_split's partials */
} AttentionPlan;

static AttentionPlan plan_attention(int64_t batch, int64_t heads, int64_t kv_heads, int64_t dim,
                                    int64_t l_max, int32_t threads) {
    AttentionPlan plan;
    const int64_t padded = (l_max + 7) / 8 * 8, group = heads / kv_heads;
    const int64_t team = threads < 1 ? 1 : threads;
    plan.team = team;
    plan.by_sequence = batch >= 2 * team; /* enough sequences for every thread */
    /* Fewer sequences: each is cut into `parts` runs of at least SPLIT_MIN_SLOTS slots. */
    int64_t parts = plan.by_sequence ? 1 : (2 * team + batch - 1) / batch;
    parts = min64(min64(parts, SPLIT_MAX_PARTS), l_max / SPLIT_MIN_SLOTS);
    if (parts > 1 && (batch * parts) % team != 0 && batch * parts > team)
        parts = (batch * parts) / team * team / batch; /* whole rounds of tasks per thread */
    plan.parts = parts < 1 ? 1 : parts;
    plan.per_thread = (plan.by_sequence || plan.parts > 1 ? heads : group) * padded;
    plan.scratch = team * plan.per_thread;
    if (!plan.by_sequence && plan.parts > 1) plan.scratch += batch * plan.parts * heads * (dim + 2);
    return plan;
}

/* What attention_team would refuse: 0, or the error code pie_f32_decode_attention returns. */
static int attention_check(const int64_t *kv_lens, int64_t batch, int64_t heads,
                           int64_t kv_heads, int64_t dim, int64_t l_max) {
    if (dim % 8 != 0 || kv_heads < 1 || heads % kv_heads != 0) return -1;
    for (int64_t b = 0; b < batch; ++b)
        if (kv_lens[b] < 1 || kv_lens[b] > l_max) return -3;
    return 0;
}

/* pie_f32_decode_attention's work, run by every thread of a team of plan->team threads (as
   gemm_team: worksharing loops, each ending in a barrier); scratch: plan->scratch floats. */
static void attention_team(const float *q, int64_t q_stride_b, int64_t q_stride_h,
                           float *k_cache, float *v_cache, const int64_t *kv_rows,
                           const int64_t *kv_lens, const uint8_t *mask, int64_t batch,
                           int64_t heads, int64_t kv_heads, int64_t dim, int64_t l_max,
                           float scale, float *out, const float *k_new, int64_t k_new_stride,
                           const float *v_new, int64_t v_new_stride, const int64_t *slot_rows,
                           const AttentionPlan *plan, float *scratch) {
    const int64_t row_stride = kv_heads * dim, group = heads / kv_heads;
    const int64_t per_thread = plan->per_thread;
    if (k_new != NULL) {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < batch; ++b) {
            memcpy(k_cache + slot_rows[b] * row_stride, k_new + b * k_new_stride, (size_t)row_stride * 4);
            memcpy(v_cache + slot_rows[b] * row_stride, v_new + b * v_new_stride, (size_t)row_stride * 4);
        }
    }
    if (plan->by_sequence) {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < batch; ++b) {
            float *scores = scratch + (int64_t)omp_get_thread_num() * per_thread;
            attend_rows(q + b * q_stride_b, q_stride_h, k_cache, v_cache, row_stride,
                        kv_rows + b * l_max, mask == NULL ? NULL : mask + b * l_max, kv_lens[b],
                        heads, group, dim, scale, scores, out + b * heads * dim, NULL);
        }
        return;
    }
    if (plan->parts > 1) {
        attend_split(q, q_stride_b, q_stride_h, k_cache, v_cache, row_stride, kv_rows, kv_lens,
                     mask, batch, heads, group, dim, l_max, scale, out, plan->parts, scratch,
                     per_thread, scratch + plan->team * per_thread);
        return;
    }
    const int64_t tasks = batch * kv_heads;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
        const int64_t b = t / kv_heads, kh = t % kv_heads;
        float *scores = scratch + (int64_t)omp_get_thread_num() * per_thread;
        attend(q + b * q_stride_b + kh * group * q_stride_h, q_stride_h, k_cache + kh * dim,
               v_cache + kh * dim, row_stride, kv_rows + b * l_max,
               mask == NULL ? NULL : mask + b * l_max, kv_lens[b], group, dim, scale, scores,
               out + (b * heads + kh * group) * dim);
    }
}

/* out[b, h] = softmax(scale * q[b, h] . K_b^T) V_b for one new token per sequence b, where
   slot l of sequence b lives in cache row kv_rows[b, l] (cache rows are [KH, D]); only slots
   l < kv_lens[b] with mask[b, l] (when a mask is given) are attended. With k_new, the new
   K/V rows are first written to cache rows slot_rows[b]. */
int pie_f32_decode_attention(const float *q, int64_t q_stride_b, int64_t q_stride_h,
                             float *k_cache, float *v_cache, const int64_t *kv_rows,
                             const int64_t *kv_lens, const uint8_t *mask, int64_t batch,
                             int64_t heads, int64_t kv_heads, int64_t dim, int64_t l_max,
                             float scale, float *out, const float *k_new, int64_t k_new_stride,
                             const float *v_new, int64_t v_new_stride, const int64_t *slot_rows,
                             int32_t threads) {
    const int rc = attention_check(kv_lens, batch, heads, kv_heads, dim, l_max);
    if (rc != 0) return rc;
    const AttentionPlan plan = plan_attention(batch, heads, kv_heads, dim, l_max, threads);
    float *scratch = alloc_floats(plan.scratch);
    if (scratch == NULL) return -2;
#pragma omp parallel num_threads(plan.team)
    attention_team(q, q_stride_b, q_stride_h, k_cache, v_cache, kv_rows, kv_lens, mask, batch,
                   heads, kv_heads, dim, l_max, scale, out, k_new, k_new_stride, v_new,
                   v_new_stride, slot_rows, &plan, scratch);
    free(scratch);
    return 0;
}

/* ---- RoPE -------------------------------------------------------------------------------------- */

/* y[t, h] = x[t, h] * cos[pos_t] + rotate_half(x[t, h]) * sin[pos_t], where sin has its first
   half negated, so rotate_half is a swap of halves. x: [T, heads, dim], rows x_stride apart and
   heads dim apart; y: contiguous [T, heads, dim]. */
int pie_f32_rope(const float *x, int64_t x_stride, int64_t tokens, int64_t heads, int64_t dim,
                 const int64_t *positions, const float *cos, const float *sin, float *y,
                 int32_t threads) {
    if (dim % 16 != 0) return -1;
    const int64_t half = dim / 2;
#pragma omp parallel for num_threads(tokens * heads * dim >= 65536 ? threads : 1) schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
        const float *c = cos + positions[t] * dim, *s = sin + positions[t] * dim;
        for (int64_t h = 0; h < heads; ++h) {
            const float *xh = x + t * x_stride + h * dim;
            float *yh = y + (t * heads + h) * dim;
            for (int64_t i = 0; i < dim; i += 8) {
                const int64_t j = i < half ? i + half : i - half; /* rotate_half's partner */
                const __m256 a = _mm256_mul_ps(_mm256_loadu_ps(xh + i), _mm256_loadu_ps(c + i));
                const __m256 b = _mm256_mul_ps(_mm256_loadu_ps(xh + j), _mm256_loadu_ps(s + i));
                _mm256_storeu_ps(yh + i, _mm256_add_ps(a, b));
            }
        }
    }
    return 0;
}

/* ---- a whole decode step's layers in one call ------------------------------------------------ */

typedef struct { /* one layer, as pie_f32_decode_layers runs it; filled once from Python */
    const PackedF32 *qkv;     /* MODE_PLAIN, RoPE layout for the q and k heads */
    const PackedF32 *o;       /* MODE_ADD */
    const PackedF32 *gate_up; /* MODE_SWIGLU */
    const PackedF32 *down;    /* MODE_ADD */
    const float *attn_norm, *mlp_norm;
    float *k_cache, *v_cache; /* [cache rows][kv_heads][dim] */
} DecodeLayerF32;

/* Every layer of a batch of one-token decodes: x [batch][hidden] (the residual stream, updated
   in place) through rms_norm -> qkv + RoPE -> attention (new K/V written first) -> o + x ->
   rms_norm -> gate/up + SwiGLU -> down + x, the calls the model makes one by one, with the
   same kernels and so the same results; from Python that was ~5 ms of a 20 ms batch-1 step
   in argument checks and ctypes calls (measured: 150 calls). qkv, attn, h: scratch rows of
   the qkv, attention and MLP widths. Every argument is checked before anything runs (an error
   changes nothing), and the whole step is one parallel region: the threads meet at a barrier
   after each loop instead of being started and joined ~150 times a step (measured on a 2-core
   EPYC with libgomp: a region costs 1.9-3.1 us, a barrier 0.7). */
int pie_f32_decode_layers(const DecodeLayerF32 *layers, int64_t n_layers, float *x,
                          int64_t batch, int64_t hidden, int64_t mlp, float eps,
                          const int64_t *positions, const float *cos, const float *sin,
                          const int64_t *kv_rows, const int64_t *kv_lens, const uint8_t *mask,
                          int64_t l_max, const int64_t *slot_rows, int64_t heads,
                          int64_t kv_heads, int64_t dim, float scale, float *qkv, float *attn,
                          float *h, int32_t threads) {
    const int64_t q_size = heads * dim, kv_size = kv_heads * dim;
    const int64_t qkv_width = q_size + 2 * kv_size;
    int rc = attention_check(kv_lens, batch, heads, kv_heads, dim, l_max);
    int64_t normed_floats = 0;
    for (int64_t l = 0; l < n_layers && rc == 0; ++l) {
        const DecodeLayerF32 *layer = layers + l;
        const PackedF32 *matrices[4] = {layer->qkv, layer->o, layer->gate_up, layer->down};
        for (int i = 0; i < 4 && rc == 0; ++i) rc = gemm_check(matrices[i], batch);
        normed_floats = max64(normed_floats, gemm_scratch(layer->qkv, batch, layer->attn_norm));
        normed_floats = max64(normed_floats, gemm_scratch(layer->gate_up, batch, layer->mlp_norm));
    }
    if (rc != 0) return rc;
    const AttentionPlan plan = plan_attention(batch, heads, kv_heads, dim, l_max, threads);
    float *normed = alloc_floats(normed_floats), *scratch = alloc_floats(plan.scratch);
    if ((normed_floats > 0 && normed == NULL) || scratch == NULL) {
        free(normed);
        free(scratch);
        return -2;
    }
#pragma omp parallel num_threads(plan.team)
    for (int64_t l = 0; l < n_layers; ++l) {
        const DecodeLayerF32 *layer = layers + l;
        const Output to_qkv = {NULL, 0, positions, cos, sin, qkv, qkv_width};
        gemm_team(layer->qkv, x, hidden, batch, layer->attn_norm, eps, &to_qkv, normed);
        attention_team(qkv, qkv_width, dim, layer->k_cache, layer->v_cache, kv_rows, kv_lens,
                       mask, batch, heads, kv_heads, dim, l_max, scale, attn, qkv + q_size,
                       qkv_width, qkv + q_size + kv_size, qkv_width, slot_rows, &plan, scratch);
        /* x + o(attn) and x + down(h) into x itself: each element is read and then written
           by the one thread that owns its panel, and neither matmul reads x */
        const Output to_x = {x, hidden, NULL, NULL, NULL, x, hidden};
        gemm_team(layer->o, attn, q_size, batch, NULL, 0.0f, &to_x, normed);
        const Output to_h = {NULL, 0, NULL, NULL, NULL, h, mlp};
        gemm_team(layer->gate_up, x, hidden, batch, layer->mlp_norm, eps, &to_h, normed);
        gemm_team(layer->down, h, mlp, batch, NULL, 0.0f, &to_x, normed);
    }
    free(normed);
    free(scratch);
    return 0;
}
