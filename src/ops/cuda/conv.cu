// The parts of a convolution or linear layer around cuBLAS's GEMM: the
// GEMM's initial value (bias, per-image channel offsets, residual), which it
// accumulates onto with beta = 1, and the column gather of a k×k
// convolution. Every kernel's grid rows are output rows, so the channel of
// an element is known per block and no element divides its index.

// A pack of V elements moved as one aligned load or store (16 bytes when the
// host finds the row length and the buffers' offsets divisible).
template <typename T, int V> struct alignas(sizeof(T) * V) Pack {
    T v[V];
};

// out[r, i] = bias[channel] + offset[r] + residual[r, i] for rows r of `len`
// elements. `per_row`: the bias is indexed by the row's channel (r mod
// channels; NCHW convolution outputs), else by the element (row-major linear
// outputs, where channels == len). bias, offset and residual may be null.
// Grid (≤ ⌈len / (V·threads)⌉, ≤ rows): blocks loop over rows beyond the grid's.
template <typename T, int V>
__device__ void fill_initial(T *out, const T *bias, const T *offset, const T *residual, long rows, int channels,
                             long len, int per_row) {
    typedef Pack<T, V> P;
    const P *bv = (!per_row && bias) ? (const P *)bias : 0;
    for (long row = blockIdx.y; row < rows; row += gridDim.y) {
        float row_add = offset ? to_f32(offset[row]) : 0.f;
        if (per_row && bias) row_add += to_f32(bias[row % channels]);
        P *dst = (P *)(out + row * len);
        const P *res = residual ? (const P *)(residual + row * len) : 0;
        FOR_EACH(i, len / V) {
            P o, r, b;
            if (res) r = res[i];
            if (bv) b = bv[i];
#pragma unroll
            for (int j = 0; j < V; ++j) {
                float v = row_add;
                if (res) v += to_f32(r.v[j]);
                if (bv) v += to_f32(b.v[j]);
                o.v[j] = from_f32<T>(v);
            }
            dst[i] = o;
        }
    }
}

// col[image][k][pixel] for k = (ci, ky, kx) and output pixels of rows
// y0 .. y0 + gridDim.x: the input (B, C, hs, ws) shifted by the tap, zero
// outside the (h, w) image. With row_map/col_map the image is the stored
// one nearest-resized to (h, w) (upsamplers): maps give each convolved row
// and column its stored one. Grid (output rows, C·k², images), threads over
// the row's output pixels.
template <typename T>
__device__ void im2col(const T *x, T *col, const int *row_map, const int *col_map, int channels, int h, int w,
                       int hs, int ws, int k, int stride, int pad_top, int pad_left, int y0, int wo) {
    int oy = y0 + blockIdx.x, kk = blockIdx.y, image = blockIdx.z;
    int ci = kk / (k * k), tap = kk % (k * k);
    int iy = oy * stride - pad_top + tap / k;
    int kx = tap % k;
    long kdim = (long)channels * k * k, pixels = (long)gridDim.x * wo;
    T *dst = col + ((long)image * kdim + kk) * pixels + (long)blockIdx.x * wo;
    bool row_in = iy >= 0 && iy < h;
    const T *src = x + ((long)image * channels + ci) * hs * ws + (row_in ? (long)(row_map ? row_map[iy] : iy) * ws : 0);
    for (int ox = threadIdx.x; ox < wo; ox += blockDim.x) {
        int ix = ox * stride - pad_left + kx;
        dst[ox] = (row_in && ix >= 0 && ix < w) ? src[col_map ? col_map[ix] : ix] : from_f32<T>(0.f);
    }
}

#define CONV(T, S, V)                                                                                             \
    extern "C" __global__ void fill_initial_##S(T *out, const T *bias, const T *offset, const T *residual,         \
                                                long rows, int channels, long len, int per_row) {                \
        fill_initial<T, 1>(out, bias, offset, residual, rows, channels, len, per_row);                                  \
    }                                                                                                             \
    extern "C" __global__ void fill_initial_vec_##S(T *out, const T *bias, const T *offset, const T *residual,    \
                                                    long rows, int channels, long len, int per_row) {            \
        fill_initial<T, V>(out, bias, offset, residual, rows, channels, len, per_row);                                  \
    }                                                                                                             \
    extern "C" __global__ void im2col_##S(const T *x, T *col, const int *row_map, const int *col_map,             \
                                          int channels, int h, int w, int hs, int ws, int k, int stride,          \
                                          int pad_top, int pad_left, int y0, int wo) {                            \
        im2col<T>(x, col, row_map, col_map, channels, h, w, hs, ws, k, stride, pad_top, pad_left, y0, wo);        \
    }
CONV(float, f32, 4)
CONV(f16, f16, 8)
