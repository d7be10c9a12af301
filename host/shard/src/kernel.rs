//! The `fused` weight format's matmul: `y = x · Wᵀ` with `W` kept in its GGML blocks as
//! stored in the file (Q4_1 or Q8_0, 32 values per block), dequantized in registers, and `x`
//! in f32 (ggml's and candle's quantized kernels round `x` to 8 bits instead).
//!
//! A decode step reads every weight once whatever the number of rows: the kernel unpacks a
//! block of one weight row once and multiplies it into up to [`MAX_ROWS`] activation rows.
//! One row is memory bound (Q4_1 moves 0.625 bytes per weight; f32 would move 4); each
//! further row adds only its multiply-adds (on the 2-core AVX-512 machine of bench/README.md,
//! 8 rows cost about 2.7 times one row; candle's quantized kernels cost 8 times).
//!
//! Each output element is a dot product accumulated in a fixed order (two vector accumulators
//! over the blocks, then one horizontal sum), whatever the number of rows, the row's position
//! in the batch and the thread: batched results equal unbatched ones exactly. The order does
//! differ between the AVX-512, AVX2 and scalar paths (picked once per process at run time).
//! Weights are dequantized as candle does (`q * d + m`, two roundings), so this is the exact
//! f32 product of the activations with candle's dequantized weights up to summation order.

use std::ops::Range;

use anyhow::{Result, bail, ensure};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape};

// The inner loops: an ordinary module, or in dev builds the same file precompiled with
// optimizations by build.rs.
#[cfg(not(switchyard_prebuilt_simd))]
#[path = "simd.rs"]
mod simd;
#[cfg(switchyard_prebuilt_simd)]
extern crate switchyard_shard_simd as simd;

use simd::{Args, QK, TILE, TileArgs, Tiles, dequantize, dequantize_tiled};
pub use simd::{Blocks, Isa, MAX_ROWS, QActs, attend, exp, has_vnni, silu_mul};

/// A weight matrix `[n, k]` (`n` output features, `k` inputs) as GGML blocks: row-major as
/// stored (the `fused` format, f32 activations), or repacked in tiles of 16 features (the
/// `fused-q8` format, activations rounded to 8 bits; see [`simd::Tiles`]).
pub struct BlockMatrix {
    blocks: Blocks,
    data: Vec<u8>,
    n: usize,
    k: usize,
    tiled: bool,
}

impl BlockMatrix {
    /// `None` when the tensor is not Q4_1 or Q8_0 (or not a CPU matrix).
    pub fn from_qtensor(qt: &QTensor) -> Result<Option<Self>> {
        let blocks = match qt.dtype() {
            GgmlDType::Q4_1 => Blocks::Q4_1,
            GgmlDType::Q8_0 => Blocks::Q8_0,
            _ => return Ok(None),
        };
        if !qt.device().is_cpu() {
            return Ok(None);
        }
        let (n, k) = qt.shape().dims2()?;
        ensure!(k.is_multiple_of(QK), "rows of {k} values are not whole blocks");
        let data = qt.data()?.into_owned();
        ensure!(data.len() == n * (k / QK) * blocks.bytes(), "unexpected size of the block data");
        Ok(Some(Self { blocks, data, n, k, tiled: false }))
    }

    /// As [`Self::from_qtensor`], repacked for the `fused-q8` kernel; `None` also when `n` is
    /// not a multiple of 16.
    pub fn from_qtensor_tiled(qt: &QTensor) -> Result<Option<Self>> {
        let Some(rows) = Self::from_qtensor(qt)? else { return Ok(None) };
        if !rows.n.is_multiple_of(TILE) {
            return Ok(None);
        }
        let data = simd::repack(rows.blocks, &rows.data, rows.n, rows.k);
        Ok(Some(Self { data, tiled: true, ..rows }))
    }

    /// Whether the matrix is in the `fused-q8` tiled layout.
    pub fn tiled(&self) -> bool {
        self.tiled
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    pub fn blocks(&self) -> Blocks {
        self.blocks
    }

    /// Row `j` of `W`, dequantized (an embedding lookup).
    pub fn row(&self, j: usize, out: &mut [f32]) {
        let nb = self.k / QK;
        let bytes = self.blocks.bytes();
        let mut w = [0f32; QK];
        for (b, out) in out.chunks_exact_mut(QK).enumerate().take(nb) {
            if self.tiled {
                dequantize_tiled(Tiles::of(self.blocks), &self.data, nb, j, b, &mut w);
            } else {
                let off = (j * nb + b) * bytes;
                dequantize(self.blocks, &self.data[off..off + bytes], &mut w);
            }
            out.copy_from_slice(&w);
        }
    }

    /// `y[m, n] = x[m, k] · Wᵀ` on candle's CPU thread pool.
    pub fn matmul(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        self.matmul_isa(Isa::detect(), x, y)
    }

    /// As [`Self::matmul`], with a given instruction set (tests compare them).
    pub fn matmul_isa(&self, isa: Isa, x: &[f32], y: &mut [f32]) -> Result<()> {
        ensure!(isa.available(), "this CPU cannot run the {isa:?} kernel");
        ensure!(x.len().is_multiple_of(self.k), "activations of {} values are not rows of {}", x.len(), self.k);
        let m = x.len() / self.k;
        ensure!(y.len() == m * self.n, "output has {} values, want {}x{}", y.len(), m, self.n);
        if m == 0 {
            return Ok(());
        }
        if self.tiled {
            self.matmul_tiled(isa, x, y);
            return Ok(());
        }
        with_aligned(x, |x| self.matmul_rows(isa, x, y));
        Ok(())
    }

    /// The `fused` product proper, `x` 64-byte aligned.
    fn matmul_rows(&self, isa: Isa, x: &[f32], y: &mut [f32]) {
        let m = x.len() / self.k;
        let out = OutPtr(y.as_mut_ptr());
        let run = |cols: Range<usize>| {
            let out = &out;
            for r0 in (0..m).step_by(isa.rows()) {
                let rows = r0..(r0 + isa.rows()).min(m);
                let a = Args {
                    w: &self.data,
                    bytes: self.blocks.bytes(),
                    k: self.k,
                    n: self.n,
                    x,
                    rows,
                    cols: cols.clone(),
                    y: out.0,
                };
                // SAFETY: `isa` is available (checked above); `x`, `y` and the weights match
                // `a`; the threads write disjoint columns of `y`, which outlives this call.
                unsafe { simd::run(isa, self.blocks, &a) };
            }
        };
        // Small products are not worth waking the pool for.
        if m * self.n * self.k < 1 << 16 {
            run(0..self.n);
        } else {
            candle_core::utils::barrier_pool().execute_chunked(self.n, run);
        }
    }
}

impl BlockMatrix {
    /// The `fused-q8` product: `x` rounded to 8 bits per block once, then integer dot
    /// products per tile of 16 features (checked by `matmul_isa`).
    fn matmul_tiled(&self, isa: Isa, x: &[f32], y: &mut [f32]) {
        let m = x.len() / self.k;
        let mut acts = QActs::default();
        acts.quantize(x, self.k);
        let out = OutPtr(y.as_mut_ptr());
        let run = |tiles: Range<usize>| {
            let out = &out;
            for r0 in (0..m).step_by(isa.rows()) {
                let a = TileArgs {
                    w: &self.data,
                    tiles: Tiles::of(self.blocks),
                    n: self.n,
                    x: &acts,
                    rows: r0..(r0 + isa.rows()).min(m),
                    tile_range: tiles.clone(),
                    y: out.0,
                };
                // SAFETY: as in `matmul_isa`: `isa` available, buffers match `a`, and the
                // threads write disjoint tiles of `y`.
                unsafe { simd::run_tiles(isa, &a) };
            }
        };
        if m * self.n * self.k < 1 << 16 {
            run(0..self.n / TILE);
        } else {
            candle_core::utils::barrier_pool().execute_chunked(self.n / TILE, run);
        }
    }
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

thread_local! {
    /// This thread's aligned copy of misaligned activations, reused: a step makes one per
    /// projection.
    static ALIGNED: std::cell::RefCell<Vec<Line>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Calls `f` with `x` in 64-byte aligned storage. The `fused` kernel loads every activation
/// once per output feature, and a 64-byte load that straddles two cache lines costs about
/// twice an aligned one; the allocator only promises 16. So rows that are not aligned are
/// copied to a buffer that is (each row is `k` values, a multiple of 32: every row starts
/// aligned too).
fn with_aligned<R>(x: &[f32], f: impl FnOnce(&[f32]) -> R) -> R {
    if (x.as_ptr() as usize).is_multiple_of(64) {
        return f(x);
    }
    ALIGNED.with_borrow_mut(|lines| {
        lines.clear();
        lines.resize(x.len().div_ceil(16), Line([0.0; 16]));
        for (line, src) in lines.iter_mut().zip(x.chunks(16)) {
            line.0[..src.len()].copy_from_slice(src);
        }
        // SAFETY: `Line` is 16 f32 and nothing else (`repr(C)`, 64 bytes, no padding), so
        // the lines are `16 · lines.len() >= x.len()` contiguous initialised f32.
        f(unsafe { std::slice::from_raw_parts(lines.as_ptr() as *const f32, x.len()) })
    })
}

struct OutPtr(*mut f32);
// SAFETY: shared only to write disjoint elements (see `matmul_isa`).
unsafe impl Sync for OutPtr {}
unsafe impl Send for OutPtr {}

/// `x.apply_op1_no_bwd(&matrix)`: `[.., k]` to `[.., n]`, f32 on the CPU.
impl CustomOp1 for BlockMatrix {
    fn name(&self) -> &'static str {
        "switchyard-block-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("{}: activations must be f32", self.name());
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("{}: activations must be contiguous", self.name());
        };
        let mut dims = layout.shape().dims().to_vec();
        if dims.last() != Some(&self.k) {
            candle_core::bail!("{}: activations {:?} do not have {} columns", self.name(), dims, self.k);
        }
        *dims.last_mut().unwrap() = self.n;
        let x = &data[start..end];
        let mut y = vec![0f32; x.len() / self.k * self.n];
        self.matmul(x, &mut y).map_err(candle_core::Error::wrap)?;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }
}

/// `silu(a) · b` element by element (the MLP's gate), spread over candle's thread pool;
/// the same arithmetic as candle's `silu` then `mul`, in one pass instead of two single-
/// threaded ones with a temporary.
pub struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "switchyard-silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(a), CpuStorage::F32(b)) = (s1, s2) else {
            candle_core::bail!("{}: operands must be f32", self.name());
        };
        let (Some((a0, a1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("{}: operands must be contiguous", self.name());
        };
        if l1.shape() != l2.shape() {
            candle_core::bail!("{}: shapes {:?} and {:?} differ", self.name(), l1.shape(), l2.shape());
        }
        let (a, b) = (&a[a0..a1], &b[b0..b1]);
        let mut y = vec![0f32; a.len()];
        let out = OutPtr(y.as_mut_ptr());
        let run = |r: Range<usize>| {
            let out = &out;
            // SAFETY: `r` is inside `y`; the threads write disjoint ranges of it.
            let y = unsafe { std::slice::from_raw_parts_mut(out.0.add(r.start), r.len()) };
            simd::silu_mul(&a[r.clone()], &b[r], y);
        };
        if a.len() < 1 << 13 {
            run(0..a.len());
        } else {
            candle_core::utils::barrier_pool().execute_chunked(a.len(), run);
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
}

/// Reference for tests: the same product through candle's dequantization and f32 matmul.
pub fn reference_matmul(qt: &QTensor, x: &[f32]) -> Result<Vec<f32>> {
    let (n, k) = qt.shape().dims2()?;
    if !x.len().is_multiple_of(k) {
        bail!("bad activations");
    }
    let w = qt.dequantize(&candle_core::Device::Cpu)?;
    let x = candle_core::Tensor::from_slice(x, (x.len() / k, k), &candle_core::Device::Cpu)?;
    let y = x.matmul(&w.t()?)?;
    debug_assert_eq!(y.dims2()?.1, n);
    Ok(y.flatten_all()?.to_vec1()?)
}
