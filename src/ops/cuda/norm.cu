// GroupNorm (+SiLU) over a contiguous (B, C, S) tensor in two kernels: partial
// statistics of chunks of each group (Welford in f32, so f16 inputs lose
// nothing to cancellation), then one pass per (image, channel) row that
// combines its group's partials and writes the normalised, scaled, shifted
// and optionally SiLU'd values.

struct Stat {
    float n, mean, m2;
};

__device__ __forceinline__ Stat combine(Stat a, Stat b) {
    float n = a.n + b.n;
    if (n == 0.f) return a;
    float d = b.mean - a.mean, fb = b.n / n;
    Stat r = {n, a.mean + d * fb, a.m2 + b.m2 + d * d * a.n * fb};
    return r;
}

// Grid (chunks, B·groups), any multiple of 32 threads up to 1024. Writes
// partial[(group · chunks + chunk) · 3 + {0, 1, 2}] = (count, mean, M2).
template <typename T>
__device__ void group_stats(const T *x, float *partial, long group_len, int chunks) {
    long per_chunk = (group_len + chunks - 1) / chunks;
    long start = blockIdx.x * per_chunk;
    long end = min(start + per_chunk, group_len);
    const T *p = x + (long)blockIdx.y * group_len;
    Stat s = {0.f, 0.f, 0.f};
    for (long i = start + threadIdx.x; i < end; i += blockDim.x) {
        float v = to_f32(p[i]);
        s.n += 1.f;
        float d = v - s.mean;
        s.mean += d / s.n;
        s.m2 += d * (v - s.mean);
    }
    for (int o = 16; o > 0; o >>= 1) {
        Stat t = {__shfl_xor_sync(0xffffffffu, s.n, o), __shfl_xor_sync(0xffffffffu, s.mean, o),
                  __shfl_xor_sync(0xffffffffu, s.m2, o)};
        s = combine(s, t);
    }
    __shared__ Stat warps[32];
    if ((threadIdx.x & 31) == 0) warps[threadIdx.x >> 5] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        Stat t = warps[0];
        for (int w = 1; w < (int)(blockDim.x >> 5); ++w) t = combine(t, warps[w]);
        float *out = partial + ((long)blockIdx.y * chunks + blockIdx.x) * 3;
        out[0] = t.n;
        out[1] = t.mean;
        out[2] = t.m2;
    }
}

// Grid (⌈S / threads⌉ or fewer, B·C).
template <typename T>
__device__ void group_apply(const T *x, const float *partial, const T *weight, const T *bias, T *y,
                            int channels, int groups, long spatial, int chunks, float eps, int silu) {
    int row = blockIdx.y;
    int c = row % channels;
    __shared__ float ab[2];
    if (threadIdx.x == 0) {
        int g = row / channels * groups + c / (channels / groups);
        const float *p = partial + (long)g * chunks * 3;
        Stat t = {p[0], p[1], p[2]};
        for (int i = 1; i < chunks; ++i) {
            Stat u = {p[3 * i], p[3 * i + 1], p[3 * i + 2]};
            t = combine(t, u);
        }
        float a = to_f32(weight[c]) / sqrtf(t.m2 / t.n + eps);
        ab[0] = a;
        ab[1] = to_f32(bias[c]) - t.mean * a;
    }
    __syncthreads();
    float a = ab[0], b = ab[1];
    const T *src = x + (long)row * spatial;
    T *dst = y + (long)row * spatial;
    FOR_EACH(i, spatial) {
        float v = to_f32(src[i]) * a + b;
        if (silu) v = v / (1.f + expf(-v));
        dst[i] = from_f32<T>(v);
    }
}

#define NORM(T, S)                                                                                          \
    extern "C" __global__ void group_stats_##S(const T *x, float *partial, long group_len, int chunks) {   \
        group_stats<T>(x, partial, group_len, chunks);                                                       \
    }                                                                                                        \
    extern "C" __global__ void group_apply_##S(const T *x, const float *partial, const T *weight,           \
                                               const T *bias, T *y, int channels, int groups, long spatial, \
                                               int chunks, float eps, int silu) {                           \
        group_apply<T>(x, partial, weight, bias, y, channels, groups, spatial, chunks, eps, silu);          \
    }
NORM(float, f32)
NORM(f16, f16)
