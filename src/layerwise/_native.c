/* layerwise's native CPU kernels, called through ctypes by _native.py (which says why they exist).

Built by setup.py beside the package when a C compiler is there, else by compile=True on first use.
On x86-64 the kernels are instantiated three times, for the baseline ISA, AVX2+FMA and AVX-512
(names ending in _avx2 and _avx512), so one library serves every CPU: _native.py calls the
instance of the ISA torch itself dispatches to. Built with -ffp-contract=off: no fused
multiply-add beyond the lerp's explicit ones, so every instance and compiler gives the same bits. */
#ifdef LAYERWISE_EXTENSION
/* setup.py builds this file as a Python extension module, empty, so that the file it installs beside
   the package is one Python can import (tools walking the package do); its kernels are for ctypes. */
#include <Python.h>
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native_kernels",
                                    "layerwise's native CPU kernels, called through ctypes by layerwise._native.", -1};
PyMODINIT_FUNC PyInit__native_kernels(void) { return PyModule_Create(&module); }
#endif
#ifdef LAYERWISE_SOURCE_SHA256  /* setup.py's build names its source: _native.py uses no other */
const char* layerwise_source_sha256 = LAYERWISE_SOURCE_SHA256;
#endif
#include <math.h>
#include <stdint.h>
#define LANES 32
#define BLOCK 4096
#define KERNEL(NAME, T, ACC, LOAD, ABS)                                                       \
void NAME(int64_t count, const void* const* ptrs, const int64_t* sizes, double* out) {     \
  for (int64_t t = 0; t < count; ++t) {                                                      \
    const T* restrict p = (const T*)ptrs[t];                                                 \
    int64_t n = sizes[t], i = 0;                                                             \
    double sumsq = 0, sum = 0, nonzero = 0;                                                  \
    ACC top[LANES] = {0};                                                                    \
    while (i + LANES <= n) {                                                                 \
      int64_t end = i + BLOCK <= n ? i + BLOCK : n - (n - i) % LANES;                        \
      ACC sq[LANES] = {0}, s[LANES] = {0}, nz[LANES] = {0};                                  \
      for (; i < end; i += LANES)                                                            \
        for (int l = 0; l < LANES; ++l) {                                                    \
          ACC v = LOAD(p[i + l]), a = ABS(v);                                                \
          sq[l] += v * v; s[l] += v; nz[l] += v != 0; top[l] = top[l] < a ? a : top[l];      \
        }                                                                                    \
      for (int l = 0; l < LANES; ++l) { sumsq += sq[l]; sum += s[l]; nonzero += nz[l]; }     \
    }                                                                                        \
    ACC m = 0;                                                                               \
    for (int l = 0; l < LANES; ++l) m = m < top[l] ? top[l] : m;                             \
    for (; i < n; ++i) {                                                                     \
      ACC v = LOAD(p[i]), a = ABS(v);                                                        \
      ACC square = v * v; /* squared as in the lanes, whatever the length */                 \
      sumsq += square; sum += v; nonzero += v != 0; m = m < a ? a : m;                       \
    }                                                                                        \
    out[4 * t] = sumsq; out[4 * t + 1] = sum; out[4 * t + 2] = nonzero;                      \
    out[4 * t + 3] = isnan(sumsq) ? NAN : m;                                                 \
  }                                                                                          \
}
/* Per pair of tensors a, b: Σb² alone (sumsq_, a norm request: a is b, never touched), Σb² while
   copying b into a (copy_), or Σ(b - a)² (distance_); STEP(k) does element k, gives the value to square. */
#define PAIRWISE(NAME, T, ACC, A, STEP)                                                      \
void NAME(int64_t count, void* const* ptrs_a, const void* const* ptrs_b, const int64_t* sizes, \
          double* out) {                                                                     \
  for (int64_t t = 0; t < count; ++t) {                                                      \
    A* restrict a = (A*)ptrs_a[t];                                                           \
    const T* restrict b = (const T*)ptrs_b[t];                                               \
    int64_t n = sizes[t], i = 0;                                                             \
    double total = 0;                                                                        \
    while (i + LANES <= n) {                                                                 \
      int64_t end = i + BLOCK <= n ? i + BLOCK : n - (n - i) % LANES;                        \
      ACC sq[LANES] = {0};                                                                   \
      for (; i < end; i += LANES)                                                            \
        for (int l = 0; l < LANES; ++l) { ACC v = STEP(i + l); sq[l] += v * v; }             \
      for (int l = 0; l < LANES; ++l) total += sq[l];                                        \
    }                                                                                        \
    for (; i < n; ++i) { ACC v = STEP(i), square = v * v; total += square; }                 \
    out[t] = total;                                                                          \
  }                                                                                          \
}
static inline float bf16(uint16_t h) { union { uint32_t u; float f; } x = { (uint32_t)h << 16 }; return x.f; }
#define SAME(x) (x)
#define READ_F(k) (b[k])
#define READ_BF(k) bf16(b[k])
/* STEP(k) is a comma expression: the copy stores element k of b into a, then yields it. */
#define COPY_F(k) (a[k] = b[k], b[k])
#define COPY_BF(k) (a[k] = b[k], bf16(b[k]))
#define DIFF_F(k) (b[k] - a[k])
#define DIFF_BF(k) (bf16(b[k]) - bf16(a[k]))
/* torch's lerp_ bit for bit: fma(w, b - a, a) for |w| < 0.5, else fma(w - 1, b - a, b), as its vector kernel. */
#define LERP(NAME, T, FMA)                                                                   \
void NAME(int64_t count, void* const* ptrs_a, const void* const* ptrs_b, const int64_t* sizes, \
          double weight) {                                                                   \
  T w = (T)weight; /* torch converts the weight to the tensors' type, then picks the formula */ \
  int small = fabs((double)w) < 0.5;                                                         \
  T coeff = small ? w : w - (T)1;                                                            \
  for (int64_t t = 0; t < count; ++t) {                                                      \
    T* restrict a = (T*)ptrs_a[t];                                                           \
    const T* restrict b = (const T*)ptrs_b[t];                                               \
    int64_t n = sizes[t];                                                                    \
    if (small) for (int64_t i = 0; i < n; ++i) a[i] = FMA(coeff, b[i] - a[i], a[i]);         \
    else for (int64_t i = 0; i < n; ++i) a[i] = FMA(coeff, b[i] - a[i], b[i]);               \
  }                                                                                          \
}
/* Every kernel, each name ending in S: instantiated once per vector ISA below. */
#define KERNELS(S) \
  KERNEL(primitives_float32##S, float, float, SAME, fabsf) \
  KERNEL(primitives_float64##S, double, double, SAME, fabs) \
  KERNEL(primitives_bfloat16##S, uint16_t, float, bf16, fabsf) \
  PAIRWISE(sumsq_float32##S, float, float, const float, READ_F) \
  PAIRWISE(sumsq_float64##S, double, double, const double, READ_F) \
  PAIRWISE(sumsq_bfloat16##S, uint16_t, float, const uint16_t, READ_BF) \
  PAIRWISE(copy_float32##S, float, float, float, COPY_F) \
  PAIRWISE(copy_float64##S, double, double, double, COPY_F) \
  PAIRWISE(copy_bfloat16##S, uint16_t, float, uint16_t, COPY_BF) \
  PAIRWISE(distance_float32##S, float, float, const float, DIFF_F) \
  PAIRWISE(distance_float64##S, double, double, const double, DIFF_F) \
  PAIRWISE(distance_bfloat16##S, uint16_t, float, const uint16_t, DIFF_BF) \
  LERP(lerp_float32##S, float, fmaf) \
  LERP(lerp_float64##S, double, fma)

KERNELS()
#if defined(__x86_64__) && defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
KERNELS(_avx2)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma"))), apply_to = function)
KERNELS(_avx512)
#pragma clang attribute pop
#elif defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
KERNELS(_avx2)
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,prefer-vector-width=512")
KERNELS(_avx512)
#pragma GCC pop_options
#endif
