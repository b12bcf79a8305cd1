// GEGLU, h ⊙ gelu_erf(g) for [h, g] the halves of each row of a contiguous
// (rows, 2·F) projection. Grid (≤ ⌈F / threads⌉, ≤ rows): blocks loop over
// rows beyond the grid's.

template <typename T> __device__ void geglu(const T *x, T *y, long rows, long features) {
    for (long row = blockIdx.y; row < rows; row += gridDim.y) {
        const T *h = x + row * 2 * features, *g = h + features;
        T *dst = y + row * features;
        FOR_EACH(i, features) {
            float gv = to_f32(g[i]);
            dst[i] = from_f32<T>(to_f32(h[i]) * 0.5f * gv * (1.f + erff(gv * 0.70710678118654752f)));
        }
    }
}

extern "C" __global__ void geglu_f32(const float *x, float *y, long rows, long features) {
    geglu<float>(x, y, rows, features);
}
extern "C" __global__ void geglu_f16(const f16 *x, f16 *y, long rows, long features) {
    geglu<f16>(x, y, rows, features);
}
