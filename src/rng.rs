//! Bit-exact reproduction of torch's CPU generator for `torch.randn`.
//!
//! `TorchRng::new(seed)` + repeated `randn(numel)` yields the same float32
//! values as `g = torch.Generator('cpu').manual_seed(seed)` followed by
//! repeated `torch.randn(shape, generator=g)` (C order), as produced by the
//! Linux x86-64 torch wheel on AVX2/AVX-512 CPUs (verified against torch 2.15).
//! Other builds (scalar kernel, ARM, MSVC) differ in the last bits of some
//! values, never in the stream layout.
//!
//! Two paths, as in torch:
//! * `numel >= 16`: float32 Box-Muller over 16-value blocks, using the Cephes
//!   log/sincos of torch's AVX2 kernel with the FMAs GCC emitted. Rust never
//!   contracts `a * b + c` on its own, so every FMA is an explicit `mul_add`
//!   and every other step is a plain, separately rounded operation.
//! * `numel < 16`: one element at a time, double-precision Box-Muller with
//!   the second value cached in the generator across calls.

/// MT19937 parameters (standard 32-bit Mersenne Twister).
const N: usize = 624;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_B0DF;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7FFF_FFFF;

// Float constants of torch's AVX2 kernel, taken from their bit patterns so
// no decimal literal can round differently.
const ONE: f32 = f32::from_bits(0x3F80_0000);
const HALF: f32 = f32::from_bits(0x3F00_0000);
const MIN_NORM: f32 = f32::from_bits(0x0080_0000);
const SQRTHF: f32 = f32::from_bits(0x3F35_04F3);
const LOG_P: [f32; 9] = [
    f32::from_bits(0x3D90_21BB),
    f32::from_bits(0xBDEB_D1B8),
    f32::from_bits(0x3DEF_251A),
    f32::from_bits(0xBDFE_5D4F),
    f32::from_bits(0x3E11_E9BF),
    f32::from_bits(0xBE2A_AE50),
    f32::from_bits(0x3E4C_CEAC),
    f32::from_bits(0xBE7F_FFFC),
    f32::from_bits(0x3EAA_AAAA),
];
const LOG_Q1: f32 = f32::from_bits(0xB95E_8083);
const LOG_Q2: f32 = f32::from_bits(0x3F31_8000);
const MINUS_TWO: f32 = f32::from_bits(0xC000_0000);
const TWO_PI: f32 = f32::from_bits(0x40C9_0FDB);
const FOPI: f32 = f32::from_bits(0x3FA2_F983);
// Cody-Waite split of pi/4, already negated.
const MINUS_DP1: f32 = f32::from_bits(0xBF49_0000);
const MINUS_DP2: f32 = f32::from_bits(0xB97D_A000);
const MINUS_DP3: f32 = f32::from_bits(0xB322_2169);
const COS_P: [f32; 3] = [f32::from_bits(0x37CC_F5CE), f32::from_bits(0xBAB6_061A), f32::from_bits(0x3D2A_AAA5)];
const SIN_P: [f32; 3] = [f32::from_bits(0xB94C_A1F9), f32::from_bits(0x3C08_839E), f32::from_bits(0xBE2A_AAA3)];
const SIGN_BIT: u32 = 0x8000_0000;

/// The Mersenne Twister engine inside torch's CPU generator.
#[derive(Clone, Debug)]
struct Mt19937 {
    state: [u32; N],
    /// Next unread state word; `N` means the state must be twisted first.
    index: usize,
}

impl Mt19937 {
    fn new(seed: u32) -> Self {
        let mut state = [0u32; N];
        state[0] = seed;
        for i in 1..N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32.wrapping_mul(prev ^ (prev >> 30)).wrapping_add(i as u32);
        }
        // Twisting lazily on the first draw is what every MT19937 does.
        Self { state, index: N }
    }

    fn twist(&mut self) {
        // In place: once `i + M` wraps, it reads words already updated in
        // this pass, exactly as the reference algorithm requires.
        for i in 0..N {
            let y = (self.state[i] & UPPER_MASK) | (self.state[(i + 1) % N] & LOWER_MASK);
            let mag = if y & 1 == 0 { 0 } else { MATRIX_A };
            self.state[i] = self.state[(i + M) % N] ^ (y >> 1) ^ mag;
        }
        self.index = 0;
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9D2C_5680;
        y ^= (y << 15) & 0xEFC6_0000;
        y ^ (y >> 18)
    }

    /// torch's 64-bit draw: the first 32-bit output is the high word.
    fn next_u64(&mut self) -> u64 {
        let hi = u64::from(self.next_u32());
        (hi << 32) | u64::from(self.next_u32())
    }
}

/// torch's CPU generator: MT19937 plus the cached second value of the
/// double-precision Box-Muller used for tensors under 16 elements.
#[derive(Clone, Debug)]
pub struct TorchRng {
    mt: Mt19937,
    cached_normal: Option<f64>,
}

impl TorchRng {
    /// Like `torch.Generator('cpu').manual_seed(seed)`. torch keeps all 64
    /// bits for `initial_seed()` but only the low 32 bits seed the state, so
    /// `2^32 + 5` draws the same noise as `5`. Negative Python seeds map to
    /// their two's-complement `u64` (torch wraps them mod 2^64).
    pub fn new(seed: u64) -> Self {
        Self { mt: Mt19937::new(seed as u32), cached_normal: None }
    }

    /// The next `torch.randn(shape, generator=g, dtype=torch.float32)` for
    /// any contiguous shape with `numel` elements, in C order. The stream
    /// continues across calls, like successive `randn` calls on one generator.
    pub fn randn(&mut self, numel: usize) -> Vec<f32> {
        if numel < 16 {
            return (0..numel).map(|_| self.normal_f64() as f32).collect();
        }
        let mut out: Vec<f32> = (0..numel).map(|_| self.uniform_f32()).collect();
        let full = numel - numel % 16;
        out[..full].chunks_exact_mut(16).for_each(box_muller16);
        if full != numel {
            // torch draws 16 fresh uniforms for a ragged tail and overwrites
            // the last 16 outputs with them; the `numel % 16` uniforms drawn
            // above for the partial block are simply discarded.
            let mut tail = [0f32; 16];
            tail.iter_mut().for_each(|u| *u = self.uniform_f32());
            box_muller16(&mut tail);
            out[numel - 16..].copy_from_slice(&tail);
        }
        out
    }

    /// Uniform on [0, 1) from the low 24 bits of one draw (exact).
    fn uniform_f32(&mut self) -> f32 {
        (self.mt.next_u32() & 0x00FF_FFFF) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// Uniform on [0, 1) from the low 53 bits of a 64-bit draw (exact).
    fn uniform_f64(&mut self) -> f64 {
        (self.mt.next_u64() & ((1u64 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// One value of torch's element-wise `normal_distribution<double>`.
    fn normal_f64(&mut self) -> f64 {
        // `+ 0.0` is torch's `* std + mean` with mean 0; it maps -0.0 to +0.0.
        if let Some(cached) = self.cached_normal.take() {
            return cached + 0.0;
        }
        // The angle uniform is drawn before the radius uniform.
        let u_angle = self.uniform_f64();
        let u_radius = self.uniform_f64();
        let r = (-2.0 * (-u_radius).ln_1p()).sqrt();
        let theta = std::f64::consts::TAU * u_angle;
        self.cached_normal = Some(r * theta.sin());
        r * theta.cos() + 0.0
    }
}

/// torch's AVX2 `normal_fill_16` in place: lane j pairs the radius input
/// `block[j]` with the angle input `block[j + 8]` and writes r·cos θ to the
/// first half and r·sin θ to the second.
fn box_muller16(block: &mut [f32]) {
    let (radii, angles) = block.split_at_mut(8);
    for (u1, u2) in radii.iter_mut().zip(angles.iter_mut()) {
        let r = (MINUS_TWO * ln_cephes(ONE - *u1)).sqrt();
        let (sin, cos) = sincos_cephes(TWO_PI * *u2);
        // torch ends with fma(n, std = 1, mean = 0): exact, but -0.0 -> +0.0.
        *u1 = r * cos + 0.0;
        *u2 = r * sin + 0.0;
    }
}

/// Cephes `logf` as compiled into torch's AVX2 kernel (`log256_ps`).
fn ln_cephes(a: f32) -> f32 {
    let a = a.max(MIN_NORM);
    let bits = a.to_bits();
    let expo = (bits >> 23) as i32 - 127;
    let m = f32::from_bits((bits & 0x807F_FFFF) | 0x3F00_0000); // in [0.5, 1)
    let mut e = expo as f32 + ONE;
    let small = m < SQRTHF;
    if small {
        e -= ONE;
    }
    // Two separate adds, as in the SIMD code (both exact here).
    let x = (m - ONE) + if small { m } else { 0.0 };
    let z = x * x;
    let y = LOG_P[1..].iter().fold(LOG_P[0], |y, &p| y.mul_add(x, p));
    let y = y * x;
    let y = y.mul_add(z, e * LOG_Q1);
    let y = y - HALF * z;
    let x = x + y;
    e.mul_add(LOG_Q2, x)
}

/// Cephes `sincosf` as compiled into torch's AVX2 kernel (`sincos256_ps`),
/// for theta >= 0 (so the input sign handling drops out). Returns (sin, cos).
fn sincos_cephes(theta: f32) -> (f32, f32) {
    // `as i32` truncates toward zero like cvttps2dq; theta < 2π, no overflow.
    let j = ((theta * FOPI) as i32 + 1) & !1;
    let yf = j as f32;
    let flip_sin = j & 4 != 0;
    let cos_poly_gives_cos = j & 2 == 0;
    let flip_cos = !(j - 2) & 4 != 0;

    let x = yf.mul_add(MINUS_DP1, theta);
    let x = MINUS_DP2.mul_add(yf, x);
    let x = yf.mul_add(MINUS_DP3, x);
    let z = x * x;
    let h = z * HALF;

    let pc = COS_P[0].mul_add(z, COS_P[1]);
    let pc = pc.mul_add(z, COS_P[2]);
    let pc = z * pc;
    let pc = z.mul_add(pc, -h);
    let pc = pc + ONE;

    let ps = SIN_P[0].mul_add(z, SIN_P[1]);
    let ps = ps.mul_add(z, SIN_P[2]);
    let ps = z * ps;
    let ps = x.mul_add(ps, x);

    let (sin, cos) = if cos_poly_gives_cos { (ps, pc) } else { (pc, ps) };
    // The SIMD blend adds +0.0 (turning -0.0 into +0.0) before the sign flip.
    let flip = |v: f32, on: bool| f32::from_bits((v + 0.0).to_bits() ^ if on { SIGN_BIT } else { 0 });
    (flip(sin, flip_sin), flip(cos, flip_cos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_check_values() {
        let mut mt = Mt19937::new(5489);
        let v10000 = (0..10_000).map(|_| mt.next_u32()).last();
        assert_eq!(v10000, Some(4_123_659_995));

        for (seed, expected) in [
            (0, [2_357_136_044, 2_546_248_239, 3_071_714_933, 3_626_093_760]),
            (42, [1_608_637_542, 3_421_126_067, 4_083_286_876, 787_846_414]),
        ] {
            let mut mt = Mt19937::new(seed);
            assert_eq!(expected.map(|_| mt.next_u32()), expected, "seed {seed}");
        }
    }

    #[test]
    fn only_low_32_seed_bits_matter() {
        let a = TorchRng::new((1 << 32) + 5).randn(20);
        let b = TorchRng::new(5).randn(20);
        assert_eq!(a, b);
    }

    #[test]
    fn torch_rand_uniforms() {
        // torch.rand(2) after manual_seed(0): 0.49625659, 0.76822180.
        let mut g = TorchRng::new(0);
        let u = [g.uniform_f32(), g.uniform_f32()];
        assert!((u[0] - 0.496_256_6).abs() < 1e-7 && (u[1] - 0.768_221_8).abs() < 1e-7);
    }

    #[test]
    fn element_cache_survives_calls_and_block_draws() {
        let four = TorchRng::new(7).randn(4);
        let mut g = TorchRng::new(7);
        let mut split = g.randn(3);
        // A block-path call consumes the stream but leaves the cache alone.
        g.randn(16);
        split.extend(g.randn(1));
        assert_eq!(split, four);
    }
}
