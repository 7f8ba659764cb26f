/* The MoE layer's elementwise and row-indexing work on the host (float32), loaded by
 * moeforge.model.cpu_kernels through ctypes.
 *
 * SwiGLU: h holds n rows of [gate | up] (f columns each, rows ld_h floats apart). The forward writes
 * a = silu(gate) * up; the backward, given dL/da, writes dL/dgate and dL/dup side by side, recomputing
 * the sigmoid from h instead of reading a saved silu. One pass over memory each way, where the
 * composed ATen ops make two (forward) and three (backward) and allocate in between.
 *
 * Combine and gather: a token's k rows (sorted by expert) are found through pos, the inverse of the sort
 * (assignment j*N + n, the token's j-th choice, sits at row pos[j*N + n]). Summing a token's rows is then
 * a gather over tokens, in parallel and in a fixed order (the token's choices in rank order), instead of
 * a scatter-add into zeros; the combine's backward is one pass over the rows.
 *
 * Built with the system compiler at first use (-O3, -march of the machine, OpenMP). With MOEFORGE_LIBMVEC
 * (x86-64 glibc) expf is declared with glibc's vector variants, so the loops vectorize without
 * -ffast-math: IEEE semantics stay (no reassociation), only errno is not set. */
#include <math.h>
#include <stdint.h>

#ifdef MOEFORGE_LIBMVEC
__attribute__((__simd__("notinbranch"))) float expf(float);
#endif

/* below this many elements one thread does the work (thread start-up would cost more) */
#define MOEFORGE_PARALLEL_MIN 32768

static inline float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

void moeforge_swiglu_forward(const float *h, float *a, int64_t n, int64_t f, int64_t ld_h, int64_t ld_a,
                             int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (n * f >= MOEFORGE_PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) {
        const float *g = h + i * ld_h, *u = g + f;
        float *o = a + i * ld_a;
#pragma omp simd
        for (int64_t j = 0; j < f; j++) {
            float x = g[j];
            o[j] = x * sigmoid(x) * u[j];
        }
    }
}

/* dL/dup = dL/da * silu(g); dL/dgate = dL/da * up * silu'(g), silu'(g) = sig + silu(g) * (1 - sig) */
void moeforge_swiglu_backward(const float *h, const float *ga, float *gh, int64_t n, int64_t f, int64_t ld_h,
                              int64_t ld_ga, int64_t ld_gh, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (n * f >= MOEFORGE_PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) {
        const float *g = h + i * ld_h, *u = g + f, *d = ga + i * ld_ga;
        float *og = gh + i * ld_gh, *ou = og + f;
#pragma omp simd
        for (int64_t j = 0; j < f; j++) {
            float x = g[j], sig = sigmoid(x), s = x * sig;
            ou[j] = d[j] * s;
            og[j] = d[j] * u[j] * (sig + s * (1.0f - sig));
        }
    }
}

/* out[n] = sum over j < k of w[r] * src[r], r = pos[j*n_tok + n] (w NULL: weight 1), j in rank order */
void moeforge_gather_sum(const float *src, const float *w, const int64_t *pos, float *out, int64_t n_tok,
                         int64_t k, int64_t d, int64_t ld_src, int64_t ld_out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (n_tok * k * d >= MOEFORGE_PARALLEL_MIN)
    for (int64_t n = 0; n < n_tok; n++) {
        float *o = out + n * ld_out;
        for (int64_t j = 0; j < k; j++) {
            const int64_t r = pos[j * n_tok + n];
            const float *x = src + r * ld_src;
            const float c = w ? w[r] : 1.0f;
            if (j == 0) {
#pragma omp simd
                for (int64_t i = 0; i < d; i++) o[i] = c * x[i];
            } else {
#pragma omp simd
                for (int64_t i = 0; i < d; i++) o[i] += c * x[i];
            }
        }
    }
}

/* For each row r: gy[r] = w[r] * g[tok[r]] and (gw not NULL) gw[r] = <g[tok[r]], y[r]> */
void moeforge_combine_backward(const float *g, const float *y, const float *w, const int64_t *tok, float *gy,
                               float *gw, int64_t rows, int64_t d, int64_t ld_g, int64_t ld_y, int64_t ld_gy,
                               int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * d >= MOEFORGE_PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const float *gt = g + tok[r] * ld_g, *yr = y + r * ld_y;
        float *o = gy + r * ld_gy;
        const float c = w[r];
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < d; i++) {
            o[i] = c * gt[i];
            dot += gt[i] * yr[i];
        }
        if (gw) gw[r] = dot;
    }
}
