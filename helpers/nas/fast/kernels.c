/* RLMedNAS child kernels (see helpers/nas/fast/kernels.py). AVX-512 F/BW/VL/DQ.

   Layouts: channels are processed in blocks of 16; "blocked" arrays of a batch of NTOT rows are
   (NB, NTOT, Q, 16) with NB = ceil(F / 16) and Q = S2 * S2 pooled positions (lanes beyond F are 0).

   nas_fwd: fused first layer of a child: conv (K x K, cin -> F, zero padding) + bias -> 2x2 max-pool
   (first maximum wins ties, NaN wins as in MaxPool2d) -> ReLU -> dropout, for batch rows [n0, n1).
   xpad: zero-padded images, cin*P*P floats each (plus slack after the last); row n is image idx[n];
   the conv output at (y, x) reads xpad[ci][y + off + dy][x + off + dx]. w: (T, F), T = cin*K*K in
   (ci, dy, dx) order. Dropout (drop != 0): the 16-bit uniforms of the activations in NHWC order
   (element e = (n*Q + q)*F + c) are the words ctr, ctr+1, ... of the splitmix64 stream `key` (see
   nas_uniform16); keep iff u >= thr, times scale. out (nullable): blocked activations; code
   (nullable): blocked winning window position 0..3, or 4 where the activation is 0 (no gradient).
   hw (nullable, nc <= NCMAX): head weights (NB, nc, Q, 16); then logits (NTOT, nc) += the
   activations times hw (the head bias is not added).

   nas_bwd: weight and bias gradients of that layer, ACCUMULATED into dW (T, F) and db (F), from
   the gradient of the activations: dA (blocked), or (dA NULL) dl (NTOT, nc) times hw. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define GOLDEN 0x9E3779B97F4A7C15ULL
#define MIX1 0xBF58476D1CE4E5B9ULL
#define MIX2 0x94D049BB133111EBULL
#define NCMAX 11

/* Denormals (|x| < 1.2e-38, e.g. the softmax of very wrong classes) are flushed to zero inside the
   kernels (FTZ/DAZ, as many BLAS kernels do): each would cost a ~100-cycle microcode assist, and
   their contribution is far below float rounding. The caller's floating-point mode is restored. */
static inline unsigned int ftz_begin(void) { const unsigned int old = _mm_getcsr(); _mm_setcsr(old | 0x8040); return old; }
static inline void ftz_end(unsigned int old) { _mm_setcsr(old); }

static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * MIX1;
    z = (z ^ (z >> 27)) * MIX2;
    return z ^ (z >> 31);
}

/* Dropout uniforms: word i of a stream with key k is mix64(k + (i + 1) * GOLDEN) (splitmix64);
   element e of a draw starting at word c is the 16-bit lane e % 4 of word c + e / 4. */
void nas_uniform16(uint64_t key, uint64_t ctr, int64_t nwords, uint64_t* out) {
    for (int64_t i = 0; i < nwords; i++) out[i] = mix64(key + (ctr + (uint64_t)i + 1) * GOLDEN);
}

static inline __m256i words4(uint64_t key, uint64_t w0) {
    const __m256i st = _mm256_add_epi64(_mm256_set1_epi64x((long long)(key + (w0 + 1) * GOLDEN)),
                                        _mm256_set_epi64x((long long)(3 * GOLDEN), (long long)(2 * GOLDEN), (long long)GOLDEN, 0));
    __m256i z = _mm256_mullo_epi64(_mm256_xor_si256(st, _mm256_srli_epi64(st, 30)), _mm256_set1_epi64x((long long)MIX1));
    z = _mm256_mullo_epi64(_mm256_xor_si256(z, _mm256_srli_epi64(z, 27)), _mm256_set1_epi64x((long long)MIX2));
    return _mm256_xor_si256(z, _mm256_srli_epi64(z, 31));
}

static inline __m256i uniforms16(uint64_t key, uint64_t ctr, int64_t e) {
    if ((e & 3) == 0) return words4(key, ctr + (uint64_t)(e >> 2));
    int16_t buf[16];
    for (int l = 0; l < 16; l++) {
        const int64_t el = e + l;
        buf[l] = (int16_t)(mix64(key + (ctr + (uint64_t)(el >> 2) + 1) * GOLDEN) >> (16 * (el & 3)));
    }
    return _mm256_loadu_si256((const __m256i*)buf);
}

/* Bias, 2x2 max (first maximum; NaN wins), ReLU, dropout, stores and head update of one window. */
static inline __attribute__((always_inline)) void window_out(
    __m512 a0, __m512 a1, __m512 a2, __m512 a3, __m512 vb, __mmask16 cm, int64_t o, int64_t e,
    const float* hwb, int64_t hstride,
    uint64_t key, uint64_t ctr, int drop, __m256i vthr, __m512 vscale, float* out, uint8_t* code,
    int nc, __m512* lacc)
{
    const __m512 zero = _mm512_setzero_ps();
    a0 = _mm512_add_ps(a0, vb); a1 = _mm512_add_ps(a1, vb);
    a2 = _mm512_add_ps(a2, vb); a3 = _mm512_add_ps(a3, vb);
    __m512 m = a0;
    __m128i c = _mm_setzero_si128();
    __mmask16 g;
    g = _mm512_cmp_ps_mask(a1, m, _CMP_GT_OQ) | _mm512_cmp_ps_mask(a1, a1, _CMP_UNORD_Q);
    m = _mm512_mask_mov_ps(m, g, a1); c = _mm_mask_mov_epi8(c, g, _mm_set1_epi8(1));
    g = _mm512_cmp_ps_mask(a2, m, _CMP_GT_OQ) | _mm512_cmp_ps_mask(a2, a2, _CMP_UNORD_Q);
    m = _mm512_mask_mov_ps(m, g, a2); c = _mm_mask_mov_epi8(c, g, _mm_set1_epi8(2));
    g = _mm512_cmp_ps_mask(a3, m, _CMP_GT_OQ) | _mm512_cmp_ps_mask(a3, a3, _CMP_UNORD_Q);
    m = _mm512_mask_mov_ps(m, g, a3); c = _mm_mask_mov_epi8(c, g, _mm_set1_epi8(3));
    __mmask16 keep = _mm512_cmp_ps_mask(m, zero, _CMP_GT_OQ) & cm;
    __m512 av;
    if (drop) {
        keep &= _mm256_cmpge_epi16_mask(uniforms16(key, ctr, e), vthr);
        av = _mm512_maskz_mul_ps(keep, m, vscale);
    } else {
        av = _mm512_maskz_mov_ps(keep, m);
    }
    if (out) _mm512_storeu_ps(out + o, av);
    if (code) _mm_storeu_si128((__m128i*)(code + o), _mm_mask_mov_epi8(_mm_set1_epi8(4), keep, c));
    if (hwb) {
#pragma GCC unroll 11
        for (int oc = 0; oc < NCMAX; oc++)
            if (oc < nc)
                lacc[oc] = _mm512_fmadd_ps(av, _mm512_loadu_ps(hwb + oc * hstride), lacc[oc]);
    }
}

static inline __attribute__((always_inline)) void fwd_impl(
    const float* xpad, const int64_t* idx, int64_t NTOT, int64_t n0, int64_t n1, int cin, int P, int off,
    const int K, int S2, const float* wp, const float* b, int F,
    uint64_t key, uint64_t ctr, int drop, int16_t thr, float scale,
    float* out, uint8_t* code, const float* hw, int nc, float* logits)
{
    const int Q = S2 * S2;
    const __m512 vscale = _mm512_set1_ps(scale), zero = _mm512_setzero_ps();
    const __m256i vthr = _mm256_set1_epi16(thr);
    /* channel blocks outermost: the block's head weights (nc*Q*16 floats) stay in L2 over the images */
    for (int cb = 0; cb < F; cb += 16) {
        const __mmask16 cm = (F - cb >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (F - cb)) - 1);
        const __m512 vb = _mm512_maskz_loadu_ps(cm, b + cb);
        const float* wb = wp + (int64_t)(cb / 16) * cin * K * K * 16;   /* this block's taps, 16 floats each */
        const int64_t hstride = (int64_t)Q * 16;
        const float* hwc = hw ? hw + (int64_t)(cb / 16) * nc * Q * 16 : 0;   /* head block (nc, Q, 16) */
        for (int64_t n = n0; n < n1; n++) {
            const int64_t ob = ((int64_t)(cb / 16) * NTOT + n) * Q * 16;   /* blocked (nb, N, Q, 16) */
            const float* img = xpad + idx[n] * (int64_t)cin * P * P;
            __m512 lacc[NCMAX];
#pragma GCC unroll 11
            for (int o = 0; o < NCMAX; o++) lacc[o] = zero;
            for (int i = 0; i < S2; i++) {
                int j = 0;
                /* two windows at a time: 8 independent accumulator chains, shared weight loads */
                for (; j + 1 < S2; j += 2) {
                    __m512 a0 = zero, a1 = zero, a2 = zero, a3 = zero;
                    __m512 e0 = zero, e1 = zero, e2 = zero, e3 = zero;
                    int t = 0;
                    for (int ci = 0; ci < cin; ci++) {
                        const float* base = img + (int64_t)ci * P * P + (2 * i + off) * P + (2 * j + off);
#pragma GCC unroll 8
                        for (int dy = 0; dy < K; dy++) {
                            const float* r0 = base + dy * P;
                            const float* r1 = r0 + P;
#pragma GCC unroll 8
                            for (int dx = 0; dx < K; dx++) {
                                const __m512 wv = _mm512_load_ps(wb + (t + dy * K + dx) * 16);
                                a0 = _mm512_fmadd_ps(_mm512_set1_ps(r0[dx]), wv, a0);
                                a1 = _mm512_fmadd_ps(_mm512_set1_ps(r0[dx + 1]), wv, a1);
                                a2 = _mm512_fmadd_ps(_mm512_set1_ps(r1[dx]), wv, a2);
                                a3 = _mm512_fmadd_ps(_mm512_set1_ps(r1[dx + 1]), wv, a3);
                                e0 = _mm512_fmadd_ps(_mm512_set1_ps(r0[dx + 2]), wv, e0);
                                e1 = _mm512_fmadd_ps(_mm512_set1_ps(r0[dx + 3]), wv, e1);
                                e2 = _mm512_fmadd_ps(_mm512_set1_ps(r1[dx + 2]), wv, e2);
                                e3 = _mm512_fmadd_ps(_mm512_set1_ps(r1[dx + 3]), wv, e3);
                            }
                        }
                        t += K * K;
                    }
                    const int q = i * S2 + j;
                    const int64_t e = (n * Q + q) * (int64_t)F + cb;   /* NHWC element index: dropout stream */
                    window_out(a0, a1, a2, a3, vb, cm, ob + q * 16, e, hwc ? hwc + q * 16 : 0, hstride, key, ctr, drop,
                               vthr, vscale, out, code, nc, lacc);
                    window_out(e0, e1, e2, e3, vb, cm, ob + (q + 1) * 16, e + F, hwc ? hwc + (q + 1) * 16 : 0, hstride,
                               key, ctr, drop, vthr, vscale, out, code, nc, lacc);
                }
                for (; j < S2; j++) {
                    __m512 a0 = zero, a1 = zero, a2 = zero, a3 = zero;
                    int t = 0;
                    for (int ci = 0; ci < cin; ci++) {
                        const float* base = img + (int64_t)ci * P * P + (2 * i + off) * P + (2 * j + off);
#pragma GCC unroll 8
                        for (int dy = 0; dy < K; dy++) {
                            const float* r0 = base + dy * P;
                            const float* r1 = r0 + P;
#pragma GCC unroll 8
                            for (int dx = 0; dx < K; dx++) {
                                const __m512 wv = _mm512_load_ps(wb + (t + dy * K + dx) * 16);
                                a0 = _mm512_fmadd_ps(_mm512_set1_ps(r0[dx]), wv, a0);
                                a1 = _mm512_fmadd_ps(_mm512_set1_ps(r0[dx + 1]), wv, a1);
                                a2 = _mm512_fmadd_ps(_mm512_set1_ps(r1[dx]), wv, a2);
                                a3 = _mm512_fmadd_ps(_mm512_set1_ps(r1[dx + 1]), wv, a3);
                            }
                        }
                        t += K * K;
                    }
                    const int q = i * S2 + j;
                    window_out(a0, a1, a2, a3, vb, cm, ob + q * 16, (n * Q + q) * (int64_t)F + cb,
                               hwc ? hwc + q * 16 : 0, hstride, key, ctr, drop, vthr, vscale, out, code, nc, lacc);
                }
            }
            if (hwc) {
#pragma GCC unroll 11
                for (int oc = 0; oc < NCMAX; oc++)
                    if (oc < nc) logits[n * nc + oc] += _mm512_reduce_add_ps(lacc[oc]);
            }
        }
    }
}

void nas_fwd(const float* xpad, const int64_t* idx, int64_t NTOT, int64_t n0, int64_t n1, int cin, int P, int off,
             int K, int S2, const float* w, const float* b, int F, uint64_t key, uint64_t ctr, int drop,
             int thr, float scale, float* out, uint8_t* code, const float* hw, int nc, float* logits)
{
    /* weights packed per block of 16 channels: (F/16, T, 16), zero-padded, 64-byte aligned */
    const int T = cin * K * K, nb = (F + 15) / 16;
    float* wp = (float*)aligned_alloc(64, (size_t)nb * T * 16 * sizeof(float));
    if (!wp) return;
    const unsigned int csr = ftz_begin();
    for (int bb = 0; bb < nb; bb++)
        for (int t = 0; t < T; t++)
            for (int l = 0; l < 16; l++) {
                const int c = bb * 16 + l;
                wp[((int64_t)bb * T + t) * 16 + l] = c < F ? w[(int64_t)t * F + c] : 0.0f;
            }
#define FWD(KK) fwd_impl(xpad, idx, NTOT, n0, n1, cin, P, off, KK, S2, wp, b, F, key, ctr, drop, (int16_t)thr, scale, out, code, hw, nc, logits)
    switch (K) {
    case 1: FWD(1); break;
    case 3: FWD(3); break;
    case 5: FWD(5); break;
    case 7: FWD(7); break;
    default: FWD(K); break;
    }
#undef FWD
    ftz_end(csr);
    free(wp);
}

static inline __attribute__((always_inline)) void bwd_impl(
    const float* xpad, const int64_t* idx, int64_t NTOT, int64_t n0, int64_t n1, int cin, int P, int off,
    const int K, int S2, const float* dA, const float* dl, const float* hw, int nc,
    const uint8_t* code, float scale, int F, float* dW, float* db)
{
    const int Q = S2 * S2;
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int cb = 0; cb < F; cb += 16) {
        const __mmask16 cm = (F - cb >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (F - cb)) - 1);
        for (int ci = 0; ci < cin; ci++) {
            __m512 acc[K * K];
#pragma GCC unroll 64
            for (int t = 0; t < K * K; t++) acc[t] = _mm512_setzero_ps();
            __m512 accb = _mm512_setzero_ps();
            for (int64_t n = n0; n < n1; n++) {
                const float* img = xpad + idx[n] * (int64_t)cin * P * P + (int64_t)ci * P * P;
                for (int i = 0; i < S2; i++) {
                    for (int j = 0; j < S2; j++) {
                        const int q = i * S2 + j;
                        const int64_t o = (((int64_t)(cb / 16) * NTOT + n) * Q + q) * 16;   /* blocked */
                        const __m128i c8 = _mm_maskz_loadu_epi8(cm, code + o);
                        const __mmask16 act = _mm_cmplt_epu8_mask(c8, _mm_set1_epi8(4)) & cm;
                        if (!act) continue;
                        __m512 d;
                        if (dA) {
                            d = _mm512_maskz_loadu_ps(act, dA + o);
                        } else {
                            d = _mm512_setzero_ps();
                            for (int oc = 0; oc < nc; oc++)
                                d = _mm512_fmadd_ps(_mm512_set1_ps(dl[n * nc + oc]),
                                                    _mm512_maskz_loadu_ps(act, hw + (((int64_t)(cb / 16) * nc + oc) * Q + q) * 16), d);
                        }
                        const __m512 g = _mm512_maskz_mul_ps(act, d, vscale);
                        if (ci == 0) accb = _mm512_add_ps(accb, g);
                        /* the winning pixel of tap (dy, dx): row a, column b + dx of the two rows
                           (2i+off+dy, 2i+off+dy+1) loaded from column 2j+off: a 2-source permute */
                        const __m512i c32 = _mm512_cvtepu8_epi32(c8);
                        const __m512i sel = _mm512_or_si512(_mm512_and_si512(c32, _mm512_set1_epi32(1)),
                                                            _mm512_slli_epi32(_mm512_and_si512(c32, _mm512_set1_epi32(2)), 3));
                        const float* base = img + (2 * i + off) * P + (2 * j + off);
#pragma GCC unroll 8
                        for (int dx = 0; dx < K; dx++) {
                            const __m512i sdx = _mm512_add_epi32(sel, _mm512_set1_epi32(dx));
#pragma GCC unroll 8
                            for (int dy = 0; dy < K; dy++) {
                                const __m512 ra = _mm512_loadu_ps(base + dy * P);
                                const __m512 rb = _mm512_loadu_ps(base + (dy + 1) * P);
                                const __m512 v = _mm512_permutex2var_ps(ra, sdx, rb);
                                acc[dy * K + dx] = _mm512_fmadd_ps(g, v, acc[dy * K + dx]);
                            }
                        }
                    }
                }
            }
#pragma GCC unroll 64
            for (int t = 0; t < K * K; t++) {
                float* dd = dW + (int64_t)(ci * K * K + t) * F + cb;
                _mm512_mask_storeu_ps(dd, cm, _mm512_add_ps(_mm512_maskz_loadu_ps(cm, dd), acc[t]));
            }
            if (ci == 0)
                _mm512_mask_storeu_ps(db + cb, cm, _mm512_add_ps(_mm512_maskz_loadu_ps(cm, db + cb), accb));
        }
    }
}

int nas_bwd(const float* xpad, const int64_t* idx, int64_t NTOT, int64_t n0, int64_t n1, int cin, int P, int off,
            int K, int S2, const float* dA, const float* dl, const float* hw, int nc,
            const uint8_t* code, float scale, int F, float* dW, float* db)
{
#define BWD(KK) bwd_impl(xpad, idx, NTOT, n0, n1, cin, P, off, KK, S2, dA, dl, hw, nc, code, scale, F, dW, db)
    const unsigned int csr = ftz_begin();
    int bad = 0;
    switch (K) {
    case 1: BWD(1); break;
    case 3: BWD(3); break;
    case 5: BWD(5); break;
    case 7: BWD(7); break;
    default: bad = 1;
    }
    ftz_end(csr);
    return bad;
#undef BWD
}

/* Head weight gradient dhw (NB, nc, QJ) = dl^T (nc, NTOT) @ acts (NB, NTOT, QJ) for blocks
   [b0, b1) and columns [j0, j1) (multiples of 16); sums over the batch rows in order. */
void nas_head_grad(const float* dl, const float* acts, int64_t NTOT, int nc, int64_t QJ,
                   int64_t b0, int64_t b1, int64_t j0, int64_t j1, float* dhw)
{
    const unsigned int csr = ftz_begin();
    for (int64_t b = b0; b < b1; b++) {
        for (int64_t j = j0; j < j1; j += 16) {
            __m512 acc[NCMAX];
#pragma GCC unroll 11
            for (int o = 0; o < NCMAX; o++) acc[o] = _mm512_setzero_ps();
            const float* a = acts + b * NTOT * QJ + j;
            for (int64_t n = 0; n < NTOT; n++) {
                const __m512 v = _mm512_loadu_ps(a + n * QJ);
#pragma GCC unroll 11
                for (int o = 0; o < NCMAX; o++)
                    if (o < nc) acc[o] = _mm512_fmadd_ps(_mm512_set1_ps(dl[n * nc + o]), v, acc[o]);
            }
#pragma GCC unroll 11
            for (int o = 0; o < NCMAX; o++)
                if (o < nc) _mm512_storeu_ps(dhw + (b * nc + o) * QJ + j, acc[o]);
        }
    }
    ftz_end(csr);
}

/* Mean cross-entropy of logits (n, nc) + bias (added in place) and labels y: returns the loss;
   dl = (softmax - onehot) / n (the gradient of the mean loss); db = column sums of dl. */
double nas_cross_entropy(float* logits, const float* bias, const int64_t* y, int64_t n, int nc, float* dl, float* db)
{
    const unsigned int csr = ftz_begin();
    double total = 0.0;
    for (int o = 0; o < nc; o++) db[o] = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        float* z = logits + i * nc;
        for (int o = 0; o < nc; o++) z[o] += bias[o];
        float mx = z[0];
        for (int o = 1; o < nc; o++) mx = z[o] > mx ? z[o] : mx;
        double se = 0.0;
        for (int o = 0; o < nc; o++) se += exp((double)(z[o] - mx));
        const double lse = mx + log(se);
        total += lse - z[y[i]];
        for (int o = 0; o < nc; o++) {
            const float g = (float)((exp((double)z[o] - lse) - (o == y[i] ? 1.0 : 0.0)) / (double)n);
            dl[i * nc + o] = g;
            db[o] += g;
        }
    }
    ftz_end(csr);
    return total / (double)n;
}

/* Adam (as torch.optim.Adam, no weight decay) on n elements; the gradient is g0 (+ g1 if not NULL):
   m += (1-b1)(g-m); v = b2 v + (1-b2) g^2; p -= step_size * m / (sqrt(v) / bc2_sqrt + eps). */
void nas_adam(float* p, const float* g0, const float* g1, float* m, float* v, int64_t n,
              float b1, float b2, float eps, float step_size, float bc2_sqrt)
{
    const unsigned int csr = ftz_begin();
    const float w1 = 1.0f - b1, w2 = 1.0f - b2;
    for (int64_t i = 0; i < n; i++) {
        const float g = g1 ? g0[i] + g1[i] : g0[i];
        const float mi = m[i] + w1 * (g - m[i]);
        const float vi = v[i] * b2 + w2 * g * g;
        m[i] = mi;
        v[i] = vi;
        p[i] -= step_size * (mi / (sqrtf(vi) / bc2_sqrt + eps));
    }
    ftz_end(csr);
}
