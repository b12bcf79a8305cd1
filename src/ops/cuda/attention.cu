// Fused attention for f16 q, k, v in their (B, L, H·d) layouts, flash-style:
// a block owns 64 query rows of one (image, head), 16 per warp, and loops
// over tiles of 64 keys; scores and the output accumulate in f32 on the
// tensor cores (mma.m16n8k16), the softmax runs online in f32 in the log2
// domain, and no score matrix is ever written out. The head dimension d is
// zero-padded to the instance's DP (a multiple of 16); rows beyond the
// sequence are masked (and causal ones past the query, for CLIP).

__device__ __forceinline__ void mma16816(float *c, const unsigned *a, unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    return (unsigned)from_f32<f16>(lo) | ((unsigned)from_f32<f16>(hi) << 16);
}

// Strides are in elements; every offset of a pair load is even (checked by
// the host), so two halves load as one 32-bit word. Grid (⌈lq/64⌉, B·H), 128 threads.
template <int DP>
__device__ void flash_attention(const f16 *q, const f16 *k, const f16 *v, f16 *out, int lq, int lk, int heads,
                                int d, long q_sb, long q_sl, long k_sb, long k_sl, long v_sb, long v_sl,
                                float scale_log2, int causal) {
    const int BN = 64, LDK = DP + 8, LDV = BN + 8;  // +8: rows start on distinct banks
    __shared__ __align__(16) f16 ks[BN * LDK];
    __shared__ __align__(16) f16 vt[DP * LDV];  // the value tile transposed: (d, key)
    int image = blockIdx.y / heads, h = blockIdx.y % heads;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int r0 = blockIdx.x * 64 + warp * 16;

    // This warp's 16 query rows as mma A fragments, one per 16 features.
    unsigned qa[DP / 16][4];
    const f16 *qh = q + image * q_sb + (long)h * d;
#pragma unroll
    for (int kc = 0; kc < DP / 16; ++kc)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            int row = r0 + g + (i & 1) * 8, col = kc * 16 + t * 2 + (i >> 1) * 8;
            qa[kc][i] = (row < lq && col < d) ? *(const unsigned *)(qh + row * q_sl + col) : 0u;
        }

    float o[DP / 8][4];
#pragma unroll
    for (int j = 0; j < DP / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    // Running maxima (log2 domain) and partial sums of rows g and g + 8.
    float m[2] = {neg_inf(), neg_inf()}, l[2] = {0.f, 0.f};

    const f16 *kh = k + image * k_sb + (long)h * d, *vh = v + image * v_sb + (long)h * d;
    int kend = causal ? min(lk, (int)(blockIdx.x + 1) * 64) : lk;
    for (int n0 = 0; n0 < kend; n0 += BN) {
        __syncthreads();  // the previous tile is consumed
        for (int idx = threadIdx.x; idx < BN * DP / 2; idx += blockDim.x) {
            int r = idx / (DP / 2), c = idx % (DP / 2) * 2;
            unsigned kv = 0u, vv = 0u;
            if (n0 + r < lk && c < d) {
                kv = *(const unsigned *)(kh + (n0 + r) * k_sl + c);
                vv = *(const unsigned *)(vh + (n0 + r) * v_sl + c);
            }
            *(unsigned *)(ks + r * LDK + c) = kv;
            vt[c * LDV + r] = (f16)(vv & 0xffffu);
            vt[(c + 1) * LDV + r] = (f16)(vv >> 16);
        }
        __syncthreads();

        float s[BN / 8][4];
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
            for (int kc = 0; kc < DP / 16; ++kc) {
                const f16 *kp = ks + (j * 8 + g) * LDK + kc * 16 + t * 2;
                mma16816(s[j], qa[kc], *(const unsigned *)kp, *(const unsigned *)(kp + 8));
            }
        }

        // Online softmax: scale, mask, new row maxima over the 4 lanes of a row.
        float mx[2] = {neg_inf(), neg_inf()};
#pragma unroll
        for (int j = 0; j < BN / 8; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                int row = r0 + g + (i >> 1) * 8, key = n0 + j * 8 + t * 2 + (i & 1);
                bool masked = key >= lk || (causal && key > row);
                s[j][i] = masked ? neg_inf() : s[j][i] * scale_log2;
                mx[i >> 1] = fmaxf(mx[i >> 1], s[j][i]);
            }
        float base[2], corr[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            float mnew = fmaxf(m[r], mx[r]);
            base[r] = mnew == neg_inf() ? 0.f : mnew;  // a fully masked row so far: no inf - inf
            corr[r] = exp2f(m[r] - base[r]);
            m[r] = mnew;
            l[r] *= corr[r];
        }
#pragma unroll
        for (int j = 0; j < DP / 8; ++j) {
            o[j][0] *= corr[0];
            o[j][1] *= corr[0];
            o[j][2] *= corr[1];
            o[j][3] *= corr[1];
        }
        // Probabilities, straight from the score accumulators' layout into
        // the A fragments of the value product.
        unsigned pa[BN / 16][4];
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
            float p0 = exp2f(s[j][0] - base[0]), p1 = exp2f(s[j][1] - base[0]);
            float p2 = exp2f(s[j][2] - base[1]), p3 = exp2f(s[j][3] - base[1]);
            l[0] += p0 + p1;
            l[1] += p2 + p3;
            pa[j / 2][(j & 1) * 2] = pack2(p0, p1);
            pa[j / 2][(j & 1) * 2 + 1] = pack2(p2, p3);
        }
#pragma unroll
        for (int j = 0; j < DP / 8; ++j)
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                const f16 *vp = vt + (j * 8 + g) * LDV + kk * 16 + t * 2;
                mma16816(o[j], pa[kk], *(const unsigned *)vp, *(const unsigned *)(vp + 8));
            }
    }

    // Each lane summed its own columns: the row sums add the 4 lanes of a row.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
    long inner = (long)heads * d;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        int row = r0 + g + r * 8;
        if (row >= lq) continue;
        f16 *dst = out + ((long)image * lq + row) * inner + (long)h * d;
        float inv = 1.f / l[r];
#pragma unroll
        for (int j = 0; j < DP / 8; ++j) {
            int col = j * 8 + t * 2;
            if (col < d) *(unsigned *)(dst + col) = pack2(o[j][2 * r] * inv, o[j][2 * r + 1] * inv);
        }
    }
}

#define ATTENTION(DP)                                                                                            \
    extern "C" __global__ void __launch_bounds__(128)                                                           \
        flash_attention_d##DP(const f16 *q, const f16 *k, const f16 *v, f16 *out, int lq, int lk, int heads, \
                              int d, long q_sb, long q_sl, long k_sb, long k_sl, long v_sb, long v_sl,         \
                              float scale_log2, int causal) {                                                  \
        flash_attention<DP>(q, k, v, out, lq, lk, heads, d, q_sb, q_sl, k_sb, k_sl, v_sb, v_sl, scale_log2,    \
                            causal);                                                                           \
    }
ATTENTION(32)
ATTENTION(48)
ATTENTION(64)
ATTENTION(80)
ATTENTION(96)
ATTENTION(128)
ATTENTION(160)
