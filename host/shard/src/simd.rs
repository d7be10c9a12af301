//! Inner loops of the `fused` weight format's matmul (see `kernel.rs`): plain `std` and
//! `std::arch`, no other dependency, so that `build.rs` can compile this file on its own with
//! optimizations for dev builds (the workspace's dev profile leaves workspace crates at
//! opt-level 0, where these loops run ~30x slower).

use std::ops::Range;
use std::sync::OnceLock;

/// Values per block (Q4_1 and Q8_0).
pub const QK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocks {
    /// `f16 d, f16 m, 16 bytes`: value `j` is `d * q + m` with `q` the low nibble of byte `j`
    /// (`j < 16`) or the high nibble of byte `j - 16`.
    Q4_1,
    /// `f16 d, 32 × i8`: value `j` is `d * q[j]`.
    Q8_0,
}

impl Blocks {
    pub const fn bytes(self) -> usize {
        match self {
            Blocks::Q4_1 => 20,
            Blocks::Q8_0 => 34,
        }
    }
}

/// Instruction set used by the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Scalar,
}

impl Isa {
    /// The best one this CPU has (`SWITCHYARD_KERNEL=avx512|avx2|scalar` caps it).
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let best = best_isa();
            match std::env::var("SWITCHYARD_KERNEL").as_deref() {
                Ok("scalar") => Isa::Scalar,
                Ok("avx2") if best != Isa::Scalar => Isa::Avx2,
                _ => best,
            }
        })
    }

    /// Whether this CPU can run `self`.
    pub fn available(self) -> bool {
        matches!(
            (self, best_isa()),
            (Isa::Scalar, _) | (Isa::Avx2, Isa::Avx2 | Isa::Avx512) | (Isa::Avx512, Isa::Avx512)
        )
    }

    /// Rows multiplied per pass over a weight row (bounded by the vector registers).
    pub fn rows(self) -> usize {
        match self {
            Isa::Avx512 => 8,
            Isa::Avx2 => 4,
            Isa::Scalar => 4,
        }
    }
}

/// Most rows one pass over the weights serves.
pub const MAX_ROWS: usize = 8;

fn best_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        let base =
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
        if base && is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if base {
            return Isa::Avx2;
        }
    }
    Isa::Scalar
}

/// One call: rows `rows` of `x` (`[m, k]`, at most `isa.rows()` rows) times weight rows
/// `cols` of `w` (`[n, k]` in blocks of `bytes` bytes), written to `y` (`[m, n]`).
pub struct Args<'a> {
    pub w: &'a [u8],
    pub bytes: usize,
    pub k: usize,
    pub n: usize,
    pub x: &'a [f32],
    pub rows: Range<usize>,
    pub cols: Range<usize>,
    pub y: *mut f32,
}

/// Runs one call of the kernel.
///
/// # Safety
/// `isa` must be available on this CPU; `w`, `x` and `y` must hold the blocks, rows and
/// outputs that `a` names, and no other thread may write the same elements of `y`.
pub unsafe fn run(isa: Isa, blocks: Blocks, a: &Args) {
    debug_assert!(a.rows.len() <= isa.rows() && a.k.is_multiple_of(QK));
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: forwarded from the caller.
        unsafe {
            match (isa, blocks) {
                (Isa::Avx512, Blocks::Q4_1) => return x86::avx512::<true>(a),
                (Isa::Avx512, Blocks::Q8_0) => return x86::avx512::<false>(a),
                (Isa::Avx2, Blocks::Q4_1) => return x86::avx2::<true>(a),
                (Isa::Avx2, Blocks::Q8_0) => return x86::avx2::<false>(a),
                _ => {}
            }
        }
    }
    let _ = isa;
    scalar(a, blocks)
}

/// IEEE half to single precision (exact).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: normalise.
            let shift = man.leading_zeros() - 21;
            let man = (man << shift) & 0x3ff;
            sign | ((127 - 15 + 1 - shift) << 23) | (man << 13)
        }
        (0x1f, _) => sign | 0x7f80_0000 | (man << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// Dequantizes one block as candle does.
pub fn dequantize(blocks: Blocks, b: &[u8], out: &mut [f32; QK]) {
    let d = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
    match blocks {
        Blocks::Q4_1 => {
            let m = f16_to_f32(u16::from_le_bytes([b[2], b[3]]));
            for j in 0..16 {
                out[j] = (b[4 + j] & 0x0f) as f32 * d + m;
                out[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
            }
        }
        Blocks::Q8_0 => {
            for j in 0..QK {
                out[j] = (b[2 + j] as i8) as f32 * d;
            }
        }
    }
}

fn scalar(a: &Args, blocks: Blocks) {
    let nb = a.k / QK;
    let mut w = [0f32; QK];
    for j in a.cols.clone() {
        let mut acc = [[0f32; 8]; 4];
        let rows = a.rows.len();
        for b in 0..nb {
            let off = (j * nb + b) * a.bytes;
            dequantize(blocks, &a.w[off..off + a.bytes], &mut w);
            for (r, acc) in acc.iter_mut().enumerate().take(rows) {
                let x = &a.x[(a.rows.start + r) * a.k + b * QK..][..QK];
                for (l, acc) in acc.iter_mut().enumerate() {
                    for q in 0..4 {
                        *acc += w[q * 8 + l] * x[q * 8 + l];
                    }
                }
            }
        }
        for (r, acc) in acc.iter().enumerate().take(rows) {
            // SAFETY: (row, j) is inside `y` and written by this thread only.
            unsafe { *a.y.add((a.rows.start + r) * a.n + j) = acc.iter().sum() };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Args, QK, TILE, TileArgs};

    /// `d` (and for Q4_1 `m`) of the block at `p`, broadcast.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scales(p: *const u8) -> (__m128, __m128) {
        unsafe {
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32)));
            (_mm_broadcastss_ps(dm), _mm_broadcastss_ps(_mm_movehdup_ps(dm)))
        }
    }

    /// Dispatches on the number of rows (a constant inside the kernels).
    pub(super) unsafe fn avx512<const Q4: bool>(a: &Args) {
        unsafe {
            match a.rows.len() {
                1 => avx512_rows::<Q4, 1>(a),
                2 => avx512_rows::<Q4, 2>(a),
                3 => avx512_rows::<Q4, 3>(a),
                4 => avx512_rows::<Q4, 4>(a),
                5 => avx512_rows::<Q4, 5>(a),
                6 => avx512_rows::<Q4, 6>(a),
                7 => avx512_rows::<Q4, 7>(a),
                8 => avx512_rows::<Q4, 8>(a),
                r => unreachable!("{r} rows"),
            }
        }
    }

    pub(super) unsafe fn avx2<const Q4: bool>(a: &Args) {
        unsafe {
            match a.rows.len() {
                1 => avx2_rows::<Q4, 1>(a),
                2 => avx2_rows::<Q4, 2>(a),
                3 => avx2_rows::<Q4, 3>(a),
                4 => avx2_rows::<Q4, 4>(a),
                r => unreachable!("{r} rows"),
            }
        }
    }

    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn avx512_rows<const Q4: bool, const R: usize>(a: &Args) {
        unsafe {
            let nb = a.k / QK;
            let xs: [*const f32; R] = std::array::from_fn(|r| a.x.as_ptr().add((a.rows.start + r) * a.k));
            let mask = _mm512_set1_epi32(0x0f);
            for j in a.cols.clone() {
                // Two accumulators per row (the first and second half of each block): shorter
                // dependency chains when there are few rows.
                let mut lo = [_mm512_setzero_ps(); R];
                let mut hi = [_mm512_setzero_ps(); R];
                let wrow = a.w.as_ptr().add(j * nb * a.bytes);
                for b in 0..nb {
                    let p = wrow.add(b * a.bytes);
                    let (d, m) = scales(p);
                    let d = _mm512_broadcastss_ps(d);
                    let (w0, w1) = if Q4 {
                        let m = _mm512_broadcastss_ps(m);
                        let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(p.add(4) as *const __m128i));
                        let q0 = _mm512_cvtepi32_ps(_mm512_and_si512(q, mask));
                        let q1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4));
                        (_mm512_add_ps(_mm512_mul_ps(q0, d), m), _mm512_add_ps(_mm512_mul_ps(q1, d), m))
                    } else {
                        let q0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(2) as *const __m128i));
                        let q1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(18) as *const __m128i));
                        (_mm512_mul_ps(_mm512_cvtepi32_ps(q0), d), _mm512_mul_ps(_mm512_cvtepi32_ps(q1), d))
                    };
                    for r in 0..R {
                        let x = xs[r].add(b * QK);
                        lo[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x), lo[r]);
                        hi[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x.add(16)), hi[r]);
                    }
                }
                for r in 0..R {
                    *a.y.add((a.rows.start + r) * a.n + j) = _mm512_reduce_add_ps(_mm512_add_ps(lo[r], hi[r]));
                }
            }
        }
    }

    /// The tiled kernel with AVX-512 VNNI: up to 8 rows per pass over a tile's weights.
    pub(super) unsafe fn tiles_vnni<const Q4: bool>(a: &TileArgs) {
        unsafe {
            match a.rows.len() {
                1 => tiles_vnni_rows::<Q4, 1>(a),
                2 => tiles_vnni_rows::<Q4, 2>(a),
                3 => tiles_vnni_rows::<Q4, 3>(a),
                4 => tiles_vnni_rows::<Q4, 4>(a),
                5 => tiles_vnni_rows::<Q4, 5>(a),
                6 => tiles_vnni_rows::<Q4, 6>(a),
                7 => tiles_vnni_rows::<Q4, 7>(a),
                8 => tiles_vnni_rows::<Q4, 8>(a),
                r => unreachable!("{r} rows"),
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    unsafe fn tiles_vnni_rows<const Q4: bool, const R: usize>(a: &TileArgs) {
        unsafe {
            let (k, tb) = (a.x.k, a.tiles.bytes());
            let nb = k / QK;
            let mask = _mm512_set1_epi8(0x0f);
            let r0 = a.rows.start;
            for t in a.tile_range.clone() {
                let mut f = [_mm512_setzero_ps(); R];
                let tile = a.w.as_ptr().add(t * nb * tb);
                for b in 0..nb {
                    let p = tile.add(b * tb);
                    let d = _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i));
                    // Weight vectors, one per group of 4 inputs of the block.
                    let mut w = [_mm512_setzero_si512(); 8];
                    if Q4 {
                        for j in 0..4 {
                            let v = _mm512_loadu_si512(p.add(64 + 64 * j) as *const _);
                            w[j] = _mm512_and_si512(v, mask);
                            w[j + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
                        }
                    } else {
                        for (g, w) in w.iter_mut().enumerate() {
                            *w = _mm512_loadu_si512(p.add(32 + 64 * g) as *const _);
                        }
                    }
                    let m = if Q4 { _mm512_cvtph_ps(_mm256_loadu_si256(p.add(32) as *const __m256i)) } else { d };
                    // One row; expanded once per row index below (constant indices keep the
                    // accumulators in registers, where a loop over `r` spilled them).
                    macro_rules! row {
                        ($r:literal) => {
                            if $r < R {
                                let row = r0 + $r;
                                let xq = a.x.q.as_ptr().add(row * k + b * QK) as *const i32;
                                let x = |g: usize| _mm512_set1_epi32(std::ptr::read_unaligned(xq.add(g)));
                                let mut s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], x(0));
                                let mut s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[1], x(1));
                                s0 = _mm512_dpbusd_epi32(s0, w[2], x(2));
                                s1 = _mm512_dpbusd_epi32(s1, w[3], x(3));
                                s0 = _mm512_dpbusd_epi32(s0, w[4], x(4));
                                s1 = _mm512_dpbusd_epi32(s1, w[5], x(5));
                                s0 = _mm512_dpbusd_epi32(s0, w[6], x(6));
                                s1 = _mm512_dpbusd_epi32(s1, w[7], x(7));
                                let mut s = _mm512_add_epi32(s0, s1);
                                if !Q4 {
                                    s = _mm512_sub_epi32(s, _mm512_set1_epi32(128 * a.x.qs[row * nb + b]));
                                }
                                let scale = _mm512_mul_ps(d, _mm512_set1_ps(a.x.d[row * nb + b]));
                                f[$r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, f[$r]);
                                if Q4 {
                                    f[$r] = _mm512_fmadd_ps(m, _mm512_set1_ps(a.x.s[row * nb + b]), f[$r]);
                                }
                            }
                        };
                    }
                    row!(0);
                    row!(1);
                    row!(2);
                    row!(3);
                    row!(4);
                    row!(5);
                    row!(6);
                    row!(7);
                }
                for (r, f) in f.iter().enumerate() {
                    _mm512_storeu_ps(a.y.add((r0 + r) * a.n + t * TILE), *f);
                }
            }
        }
    }

    pub(super) unsafe fn tiles_avx2<const Q4: bool>(a: &TileArgs) {
        unsafe {
            match a.rows.len() {
                1 => tiles_avx2_rows::<Q4, 1>(a),
                2 => tiles_avx2_rows::<Q4, 2>(a),
                3 => tiles_avx2_rows::<Q4, 3>(a),
                4 => tiles_avx2_rows::<Q4, 4>(a),
                r => unreachable!("{r} rows"),
            }
        }
    }

    /// `vpdpbusd` on one 256-bit half (8 features): `maddubs` then `madd` by ones, exact
    /// for unsigned nibbles (Q8_0 bytes go through here as two nibbles).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot4(w: __m256i, x: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1))
    }

    /// The tiled kernel with AVX2, one half-tile (8 features) at a time.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tiles_avx2_rows<const Q4: bool, const R: usize>(a: &TileArgs) {
        unsafe {
            let (k, tb) = (a.x.k, a.tiles.bytes());
            let nb = k / QK;
            let mask = _mm256_set1_epi8(0x0f);
            let r0 = a.rows.start;
            for t in a.tile_range.clone() {
                let tile = a.w.as_ptr().add(t * nb * tb);
                for h in 0..2 {
                    let mut f = [_mm256_setzero_ps(); R];
                    for b in 0..nb {
                        let p = tile.add(b * tb);
                        let d = _mm256_cvtph_ps(_mm_loadu_si128(p.add(16 * h) as *const __m128i));
                        let chunk = |c: usize| _mm256_loadu_si256(p.add(c + 32 * h) as *const __m256i);
                        for r in 0..R {
                            let row = r0 + r;
                            let xq = a.x.q.as_ptr().add(row * k + b * QK) as *const i32;
                            let x = |g: usize| _mm256_set1_epi32(std::ptr::read_unaligned(xq.add(g)));
                            let mut s = _mm256_setzero_si256();
                            if Q4 {
                                for j in 0..4 {
                                    let v = chunk(64 + 64 * j);
                                    s = _mm256_add_epi32(s, dot4(_mm256_and_si256(v, mask), x(j)));
                                    let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                                    s = _mm256_add_epi32(s, dot4(hi, x(j + 4)));
                                }
                            } else {
                                for g in 0..8 {
                                    let v = chunk(32 + 64 * g);
                                    let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                                    let lo = _mm256_and_si256(v, mask);
                                    let part = _mm256_add_epi32(_mm256_slli_epi32(dot4(hi, x(g)), 4), dot4(lo, x(g)));
                                    s = _mm256_add_epi32(s, part);
                                }
                                s = _mm256_sub_epi32(s, _mm256_set1_epi32(128 * a.x.qs[row * nb + b]));
                            }
                            let scale = _mm256_mul_ps(d, _mm256_set1_ps(a.x.d[row * nb + b]));
                            f[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, f[r]);
                            if Q4 {
                                let m = _mm256_cvtph_ps(_mm_loadu_si128(p.add(32 + 16 * h) as *const __m128i));
                                f[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(a.x.s[row * nb + b]), f[r]);
                            }
                        }
                    }
                    for (r, f) in f.iter().enumerate() {
                        _mm256_storeu_ps(a.y.add((r0 + r) * a.n + t * TILE + 8 * h), *f);
                    }
                }
            }
        }
    }

    /// One block of [`super::QActs::quantize_isa`]: (scale, sum of the rounded values).
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    pub(super) unsafe fn quantize_block_avx512(x: &[f32], q: &mut [i8]) -> (f32, i32) {
        unsafe {
            debug_assert!(x.len() == QK && q.len() == QK);
            let a = _mm512_loadu_ps(x.as_ptr());
            let b = _mm512_loadu_ps(x.as_ptr().add(16));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
            let d = amax / 127.0;
            let id = _mm512_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
            let half = _mm512_set1_ps(0.5);
            let one = _mm512_set1_epi32(1);
            let round = |v: __m512| {
                let v = _mm512_mul_ps(v, id);
                let t = _mm512_cvttps_epi32(v);
                let frac = _mm512_sub_ps(v, _mm512_cvtepi32_ps(t));
                let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(frac, half);
                let down = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(frac, _mm512_set1_ps(-0.5));
                _mm512_mask_sub_epi32(
                    _mm512_mask_add_epi32(t, up, t, one),
                    down,
                    _mm512_mask_add_epi32(t, up, t, one),
                    one,
                )
            };
            let (qa, qb) = (round(a), round(b));
            _mm_storeu_si128(q.as_mut_ptr() as *mut __m128i, _mm512_cvtsepi32_epi8(qa));
            _mm_storeu_si128(q.as_mut_ptr().add(16) as *mut __m128i, _mm512_cvtsepi32_epi8(qb));
            (d, _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)))
        }
    }

    /// [`super::dot`] with AVX-512.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
        unsafe {
            let n = a.len() / 16 * 16;
            debug_assert!(b.len() >= a.len());
            let mut acc = _mm512_setzero_ps();
            let mut i = 0;
            while i < n {
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(a.as_ptr().add(i)), _mm512_loadu_ps(b.as_ptr().add(i)), acc);
                i += 16;
            }
            let v = _mm256_add_ps(
                _mm512_castps512_ps256(acc),
                _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1)),
            );
            let mut s = tree8(v);
            for j in n..a.len() {
                s = a[j].mul_add(b[j], s);
            }
            s
        }
    }

    /// [`super::dot`] with AVX2 (lanes 0..8 and 8..16 in two registers).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        unsafe {
            let n = a.len() / 16 * 16;
            debug_assert!(b.len() >= a.len());
            let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut i = 0;
            while i < n {
                let (pa, pb) = (a.as_ptr().add(i), b.as_ptr().add(i));
                lo = _mm256_fmadd_ps(_mm256_loadu_ps(pa), _mm256_loadu_ps(pb), lo);
                hi = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(8)), _mm256_loadu_ps(pb.add(8)), hi);
                i += 16;
            }
            let mut s = tree8(_mm256_add_ps(lo, hi));
            for j in n..a.len() {
                s = a[j].mul_add(b[j], s);
            }
            s
        }
    }

    /// Lanes 0..8 summed as the tree of [`super::dot`] (w = 4, 2, 1).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tree8(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn avx2_rows<const Q4: bool, const R: usize>(a: &Args) {
        unsafe {
            let nb = a.k / QK;
            let xs: [*const f32; R] = std::array::from_fn(|r| a.x.as_ptr().add((a.rows.start + r) * a.k));
            let mask = _mm256_set1_epi32(0x0f);
            for j in a.cols.clone() {
                let mut lo = [_mm256_setzero_ps(); R];
                let mut hi = [_mm256_setzero_ps(); R];
                let wrow = a.w.as_ptr().add(j * nb * a.bytes);
                for b in 0..nb {
                    let p = wrow.add(b * a.bytes);
                    let (d, m) = scales(p);
                    let d = _mm256_broadcastss_ps(d);
                    // Values 0..8, 8..16, 16..24, 24..32.
                    let w: [__m256; 4] = if Q4 {
                        let m = _mm256_broadcastss_ps(m);
                        let qa = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(4) as *const __m128i));
                        let qb = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(12) as *const __m128i));
                        let f = |q: __m256i| _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q), d), m);
                        [
                            f(_mm256_and_si256(qa, mask)),
                            f(_mm256_and_si256(qb, mask)),
                            f(_mm256_srli_epi32(qa, 4)),
                            f(_mm256_srli_epi32(qb, 4)),
                        ]
                    } else {
                        let f = |o: usize| {
                            let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(2 + o) as *const __m128i));
                            _mm256_mul_ps(_mm256_cvtepi32_ps(q), d)
                        };
                        [f(0), f(8), f(16), f(24)]
                    };
                    for r in 0..R {
                        let x = xs[r].add(b * QK);
                        lo[r] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(x), lo[r]);
                        hi[r] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(x.add(16)), hi[r]);
                        lo[r] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(x.add(8)), lo[r]);
                        hi[r] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(x.add(24)), hi[r]);
                    }
                }
                for r in 0..R {
                    *a.y.add((a.rows.start + r) * a.n + j) = hsum256(_mm256_add_ps(lo[r], hi[r]));
                }
            }
        }
    }
}

/// Output features per tile of the `fused-q8` layout.
pub const TILE: usize = 16;

/// The `fused-q8` layout: a weight matrix repacked in tiles of [`TILE`] output features, so
/// that one 64-byte vector holds 4 consecutive inputs of each of the 16 features and an 8-bit
/// dot-product instruction (`vpdpbusd`) adds 4 products into each feature's lane: no
/// horizontal sums, and one pass over a tile's weights serves every activation row. Tile `t`
/// holds its blocks in order (`k / 32` of them), each of [`Tiles::bytes`] bytes:
///
/// - `Q4_1`: `d` of the 16 features (f16), `m` (f16), then 4 chunks of 64 bytes; byte
///   `4c + i` of chunk `j` is feature `c`'s stored byte `4j + i` unchanged (low nibble: input
///   `4j + i`, high nibble: input `16 + 4j + i`).
/// - `Q8_0`: `d` (f16), then 8 chunks of 64 bytes; byte `4c + i` of chunk `g` is feature
///   `c`'s value `4g + i` plus 128 (an unsigned byte, as `vpdpbusd` wants; the kernel takes
///   `128 · Σx` back off in integers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tiles {
    Q4_1,
    Q8_0,
}

impl Tiles {
    /// Bytes of one block of one tile (16 features × 32 inputs).
    pub const fn bytes(self) -> usize {
        match self {
            Tiles::Q4_1 => 64 + 4 * 64,
            Tiles::Q8_0 => 32 + 8 * 64,
        }
    }

    pub fn of(blocks: Blocks) -> Tiles {
        match blocks {
            Blocks::Q4_1 => Tiles::Q4_1,
            Blocks::Q8_0 => Tiles::Q8_0,
        }
    }
}

/// Repacks `n × k` values stored as GGML `blocks` (row-major) into tiles; `n` must be a
/// multiple of [`TILE`] and `k` of [`QK`].
pub fn repack(blocks: Blocks, data: &[u8], n: usize, k: usize) -> Vec<u8> {
    let (nb, bytes, tiles) = (k / QK, blocks.bytes(), Tiles::of(blocks));
    let tb = tiles.bytes();
    let mut out = vec![0u8; n / TILE * nb * tb];
    for t in 0..n / TILE {
        for b in 0..nb {
            let o = &mut out[(t * nb + b) * tb..][..tb];
            for c in 0..TILE {
                let src = &data[((t * TILE + c) * nb + b) * bytes..][..bytes];
                o[2 * c..2 * c + 2].copy_from_slice(&src[..2]);
                match tiles {
                    Tiles::Q4_1 => {
                        o[32 + 2 * c..34 + 2 * c].copy_from_slice(&src[2..4]);
                        for j in 0..4 {
                            o[64 + 64 * j + 4 * c..][..4].copy_from_slice(&src[4 + 4 * j..][..4]);
                        }
                    }
                    Tiles::Q8_0 => {
                        for g in 0..8 {
                            for i in 0..4 {
                                o[32 + 64 * g + 4 * c + i] = src[2 + 4 * g + i] ^ 0x80;
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// Feature `j`'s values of block `b` from the tiled layout, dequantized as candle does.
pub fn dequantize_tiled(tiles: Tiles, w: &[u8], nb: usize, j: usize, b: usize, out: &mut [f32; QK]) {
    let (t, c) = (j / TILE, j % TILE);
    let p = &w[(t * nb + b) * tiles.bytes()..][..tiles.bytes()];
    let d = f16_to_f32(u16::from_le_bytes([p[2 * c], p[2 * c + 1]]));
    match tiles {
        Tiles::Q4_1 => {
            let m = f16_to_f32(u16::from_le_bytes([p[32 + 2 * c], p[33 + 2 * c]]));
            for j in 0..4 {
                for i in 0..4 {
                    let q = p[64 + 64 * j + 4 * c + i];
                    out[4 * j + i] = (q & 0x0f) as f32 * d + m;
                    out[16 + 4 * j + i] = (q >> 4) as f32 * d + m;
                }
            }
        }
        Tiles::Q8_0 => {
            for (v, o) in out.iter_mut().enumerate() {
                *o = ((p[32 + 64 * (v / 4) + 4 * c + v % 4] ^ 0x80) as i8) as f32 * d;
            }
        }
    }
}

/// Activation rows rounded to 8 bits per block of 32 (as ggml's `q8_0`, with the scale
/// kept in f32): value `i` of block `b` of row `r` is about `d[r·nb + b] · q[r·k + 32b + i]`.
#[derive(Default)]
pub struct QActs {
    pub k: usize,
    pub q: Vec<i8>,
    /// Scale per block.
    pub d: Vec<f32>,
    /// Sum of the block's rounded values, scaled (`d · Σq`: the `m` term of Q4_1 weights;
    /// the exact sum would leave the rounding errors weighted by `w - m` instead of `w`,
    /// about twice as large for Q4_1's blocks).
    pub s: Vec<f32>,
    /// Sum of the block's rounded values (takes the Q8_0 tiles' +128 back off).
    pub qs: Vec<i32>,
}

impl QActs {
    /// Rounds `x` (rows of `k` values) in place of what `self` held, with the best
    /// instruction set of this CPU.
    pub fn quantize(&mut self, x: &[f32], k: usize) {
        self.quantize_isa(Isa::detect(), x, k)
    }

    /// As [`Self::quantize`] with a given instruction set. Every step is exact or rounds
    /// once in the same way (`|x|` maxima, one division, one product, rounding to the
    /// nearest integer), so every instruction set gives the same values.
    pub fn quantize_isa(&mut self, isa: Isa, x: &[f32], k: usize) {
        let nb = x.len() / QK;
        self.k = k;
        self.q.resize(x.len(), 0);
        self.d.resize(nb, 0.0);
        self.s.resize(nb, 0.0);
        self.qs.resize(nb, 0);
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512 && isa.available() {
            for (b, xb) in x.chunks_exact(QK).enumerate() {
                // SAFETY: AVX-512 is available; `xb` and the output block hold 32 values.
                let (d, qs) = unsafe { x86::quantize_block_avx512(xb, &mut self.q[b * QK..][..QK]) };
                (self.d[b], self.s[b], self.qs[b]) = (d, d * qs as f32, qs);
            }
            return;
        }
        let _ = isa;
        for (b, xb) in x.chunks_exact(QK).enumerate() {
            // Lane-wise maxima (vectorizes; `f32::max`'s NaN rules would not), then theirs.
            let mut lanes = [0f32; 8];
            for c in xb.chunks_exact(8) {
                for (l, v) in lanes.iter_mut().zip(c) {
                    let a = v.abs();
                    *l = if a > *l { a } else { *l };
                }
            }
            let amax = lanes.iter().fold(0f32, |m, &a| if a > m { a } else { m });
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut q = [0i32; QK];
            for (q, &v) in q.iter_mut().zip(xb) {
                *q = round_half_away(v * id);
            }
            let mut qs = 0i32;
            for (o, &q) in self.q[b * QK..][..QK].iter_mut().zip(&q) {
                *o = q as i8;
                qs += q;
            }
            (self.d[b], self.s[b], self.qs[b]) = (d, d * qs as f32, qs);
        }
    }
}

/// `v.round()` (halves away from zero) for `|v| < 2^23`, without the libm call that
/// `f32::round` is on baseline x86-64: truncation is a plain conversion, and `v - trunc(v)`
/// is exact in that range.
#[inline(always)]
fn round_half_away(v: f32) -> i32 {
    let t = v as i32;
    let frac = v - t as f32;
    t + (frac >= 0.5) as i32 - (frac <= -0.5) as i32
}

/// One call of the tiled kernel: rows `rows` of `x` (at most [`Isa::rows`]) times tiles
/// `tiles_range` of `w`, written to `y` (`[m, n]`).
pub struct TileArgs<'a> {
    pub w: &'a [u8],
    pub tiles: Tiles,
    pub n: usize,
    pub x: &'a QActs,
    pub rows: Range<usize>,
    pub tile_range: Range<usize>,
    pub y: *mut f32,
}

/// Whether this CPU has the 8-bit dot product of AVX-512 (`vpdpbusd`); without it the
/// `Avx512` instruction set runs the tiled kernel's AVX2 code (the same numbers).
pub fn has_vnni() -> bool {
    static VNNI: OnceLock<bool> = OnceLock::new();
    *VNNI.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// Runs one call of the tiled kernel. Every instruction set computes, per feature and row,
/// exact integer block sums, then `f = fma(Σ, d·dx, f)` (and `f = fma(m, s, f)` for Q4_1)
/// block after block: the results are identical across instruction sets, batch sizes and
/// threads.
///
/// # Safety
/// As [`run`]: `isa` available, `w`, `x` and `y` holding what `a` names, no other thread
/// writing the same elements of `y`.
pub unsafe fn run_tiles(isa: Isa, a: &TileArgs) {
    debug_assert!(a.rows.len() <= isa.rows() && a.x.k.is_multiple_of(QK));
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: forwarded from the caller; the AVX-512 path only where VNNI is present.
        unsafe {
            match (isa, a.tiles) {
                (Isa::Avx512, Tiles::Q4_1) if has_vnni() => return x86::tiles_vnni::<true>(a),
                (Isa::Avx512, Tiles::Q8_0) if has_vnni() => return x86::tiles_vnni::<false>(a),
                (Isa::Avx512 | Isa::Avx2, _) => {
                    for r0 in a.rows.clone().step_by(Isa::Avx2.rows()) {
                        let rows = r0..(r0 + Isa::Avx2.rows()).min(a.rows.end);
                        let sub = TileArgs { rows, tile_range: a.tile_range.clone(), ..*a };
                        match a.tiles {
                            Tiles::Q4_1 => x86::tiles_avx2::<true>(&sub),
                            Tiles::Q8_0 => x86::tiles_avx2::<false>(&sub),
                        }
                    }
                    return;
                }
                _ => {}
            }
        }
    }
    let _ = isa;
    tiles_scalar(a)
}

fn tiles_scalar(a: &TileArgs) {
    let (k, tb) = (a.x.k, a.tiles.bytes());
    let nb = k / QK;
    for t in a.tile_range.clone() {
        for r in a.rows.clone() {
            let mut f = [0f32; TILE];
            for b in 0..nb {
                let p = &a.w[(t * nb + b) * tb..][..tb];
                let xq = &a.x.q[r * k + b * QK..][..QK];
                let dx = a.x.d[r * nb + b];
                for (c, f) in f.iter_mut().enumerate() {
                    let d = f16_to_f32(u16::from_le_bytes([p[2 * c], p[2 * c + 1]]));
                    let mut acc = 0i32;
                    match a.tiles {
                        Tiles::Q4_1 => {
                            for j in 0..4 {
                                for i in 0..4 {
                                    let q = p[64 + 64 * j + 4 * c + i];
                                    acc += (q & 0x0f) as i32 * xq[4 * j + i] as i32;
                                    acc += (q >> 4) as i32 * xq[16 + 4 * j + i] as i32;
                                }
                            }
                        }
                        Tiles::Q8_0 => {
                            for g in 0..8 {
                                for i in 0..4 {
                                    acc += p[32 + 64 * g + 4 * c + i] as i32 * xq[4 * g + i] as i32;
                                }
                            }
                            acc -= 128 * a.x.qs[r * nb + b];
                        }
                    }
                    *f = (acc as f32).mul_add(d * dx, *f);
                    if a.tiles == Tiles::Q4_1 {
                        let m = f16_to_f32(u16::from_le_bytes([p[32 + 2 * c], p[33 + 2 * c]]));
                        *f = m.mul_add(a.x.s[r * nb + b], *f);
                    }
                }
            }
            for (c, f) in f.iter().enumerate() {
                // SAFETY: (r, feature) is inside `y` and written by this thread only.
                unsafe { *a.y.add(r * a.n + t * TILE + c) = *f };
            }
        }
    }
}

/// Attention of the query heads that share one key/value head (`q`: `n` heads of `hd`
/// values, RoPE applied; `out` the same shape) over the first `len` positions of a cache:
/// `keys` and `values` are `[position][stride]`, this head's `hd` values at `off` of each
/// position. `scores` is scratch of at least `n * len` values. Every query head is computed
/// on its own, in the same order whatever `n`, and with the same arithmetic on every
/// instruction set (lane-wise sums in a fixed order, fused multiply-adds), so results depend
/// neither on the CPU nor on how heads are grouped.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    isa: Isa,
    q: &[f32],
    hd: usize,
    len: usize,
    keys: &[f32],
    values: &[f32],
    stride: usize,
    off: usize,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let a = Attn { q, hd, len, keys, values, stride, off };
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `isa` is only ever one this CPU has (`Isa::detect`, `Isa::available`).
        unsafe {
            match isa {
                Isa::Avx512 => return attend_avx512(&a, scores, out),
                Isa::Avx2 => return attend_avx2(&a, scores, out),
                Isa::Scalar => {}
            }
        }
    }
    let _ = isa;
    attend_body(&a, scores, out, dot)
}

struct Attn<'a> {
    q: &'a [f32],
    hd: usize,
    len: usize,
    keys: &'a [f32],
    values: &'a [f32],
    stride: usize,
    off: usize,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn attend_avx512(a: &Attn, scores: &mut [f32], out: &mut [f32]) {
    // SAFETY: this function's target features are `dot_avx512`'s.
    attend_body(a, scores, out, |x, y| unsafe { x86::dot_avx512(x, y) })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(a: &Attn, scores: &mut [f32], out: &mut [f32]) {
    // SAFETY: this function's target features are `dot_avx2`'s.
    attend_body(a, scores, out, |x, y| unsafe { x86::dot_avx2(x, y) })
}

/// `Σ a[i]·b[i]` over 16 lanes (fused multiply-adds), then a fixed reduction tree (lane
/// `l` += lane `l + w` for w = 8, 4, 2, 1), then the tail beyond a multiple of 16. The SIMD
/// versions in `x86` compute exactly this.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let n = a.len() / 16 * 16;
    for (x, y) in a[..n].chunks_exact(16).zip(b[..n].chunks_exact(16)) {
        for l in 0..16 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    for w in [8, 4, 2, 1] {
        for l in 0..w {
            acc[l] += acc[l + w];
        }
    }
    let mut s = acc[0];
    for (x, y) in a[n..].iter().zip(&b[n..]) {
        s = x.mul_add(*y, s);
    }
    s
}

#[inline(always)]
fn attend_body(a: &Attn, scores: &mut [f32], out: &mut [f32], dot: impl Fn(&[f32], &[f32]) -> f32) {
    let (hd, len) = (a.hd, a.len);
    let heads = a.q.len() / hd;
    let scale = (hd as f32).sqrt();
    let scores = &mut scores[..heads * len];
    for t in 0..len {
        let k = &a.keys[t * a.stride + a.off..][..hd];
        for h in 0..heads {
            scores[h * len + t] = dot(&a.q[h * hd..][..hd], k) / scale;
        }
    }
    for s in scores.chunks_exact_mut(len) {
        let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for x in s.iter_mut() {
            *x = exp(*x - max);
        }
        let mut sum = 0f32;
        for x in s.iter() {
            sum += *x;
        }
        for x in s.iter_mut() {
            *x /= sum;
        }
    }
    out.fill(0.0);
    for t in 0..len {
        let v = &a.values[t * a.stride + a.off..][..hd];
        for h in 0..heads {
            let p = scores[h * len + t];
            for (o, v) in out[h * hd..][..hd].iter_mut().zip(v) {
                *o = p.mul_add(*v, *o);
            }
        }
    }
}

/// `e^x` without libm, in operations that vectorize: `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`
/// (ln 2 split in two parts for an exact reduction), a degree-7 polynomial for `e^r` (the
/// classic single-precision minimax coefficients), then `2^n` put into the exponent bits.
/// Within 2 ulp of the exact value over the clamped range `[-87, 88]` (outside it the
/// result is that of the bound: `e^-87 ≈ 1.6e-38`, `e^88 ≈ 1.7e38`; the callers take
/// `e^-v` of activations and `e^(s - max)` of attention scores, nowhere near either).
/// Every instruction set computes the same value: fused multiply-adds everywhere.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding and subtracting it rounds to the nearest integer (|t| < 2^22).
    const ROUND: f32 = 12_582_912.0;
    let x = if x < -87.0 {
        -87.0
    } else if x > 88.0 {
        88.0
    } else {
        x
    };
    let n = x.mul_add(LOG2E, ROUND) - ROUND;
    let r = n.mul_add(-LN2_HI, x);
    let r = n.mul_add(-LN2_LO, r);
    let p = 1.987_569_1e-4f32
        .mul_add(r, 1.398_2e-3)
        .mul_add(r, 8.333_452e-3)
        .mul_add(r, 4.166_579_6e-2)
        .mul_add(r, 0.166_666_65)
        .mul_add(r, 0.5);
    let p = (p * r).mul_add(r, r) + 1.0;
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `out[i] = silu(a[i]) · b[i]`, `silu(v) = v / (1 + e^-v)`: the MLP's gate.
pub fn silu_mul(a: &[f32], b: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the target features are checked at run time.
        unsafe {
            match Isa::detect() {
                Isa::Avx512 => return silu_mul_avx512(a, b, out),
                Isa::Avx2 => return silu_mul_avx2(a, b, out),
                Isa::Scalar => {}
            }
        }
    }
    silu_mul_body(a, b, out)
}

#[inline(always)]
fn silu_mul_body(a: &[f32], b: &[f32], out: &mut [f32]) {
    for ((o, &v), &g) in out.iter_mut().zip(a).zip(b) {
        *o = v / (1.0 + exp(-v)) * g;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn silu_mul_avx512(a: &[f32], b: &[f32], out: &mut [f32]) {
    silu_mul_body(a, b, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(a: &[f32], b: &[f32], out: &mut [f32]) {
    silu_mul_body(a, b, out)
}
