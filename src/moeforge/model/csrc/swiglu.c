/* Fused SwiGLU for the host (float32), loaded by moeforge.model.cpu_kernels through ctypes.
 *
 * h holds n rows of [gate | up] (f columns each, rows ld_h floats apart). The forward writes
 * a = silu(gate) * up; the backward, given dL/da, writes dL/dgate and dL/dup side by side, recomputing
 * the sigmoid from h instead of reading a saved silu. One pass over memory each way, where the
 * composed ATen ops make two (forward) and three (backward) and allocate in between.
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
