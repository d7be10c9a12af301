//! Dev builds: precompile the `fused` kernel's inner loops with optimizations.
//!
//! The workspace's dev profile optimizes dependencies but leaves workspace crates at
//! opt-level 0, where `src/simd.rs` (SIMD intrinsics in tight loops) runs about 30 times
//! slower than optimized; the shard's tests and the router's end-to-end suite run debug
//! binaries with the default weight format, which is `fused`. So when this crate is built at
//! opt-level 0, this script compiles `src/simd.rs` (plain `std`, no dependencies) on its own
//! with `-C opt-level=3` into OUT_DIR, and `kernel.rs` links that instead of compiling the
//! file as a module. In optimized builds, or if that compilation fails, nothing changes:
//! `src/simd.rs` is an ordinary module.

use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=src/simd.rs");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rustc-check-cfg=cfg(switchyard_prebuilt_simd)");
    if std::env::var("OPT_LEVEL").as_deref() != Ok("0") {
        return;
    }
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let out = var("OUT_DIR");
    let mut cmd = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()));
    cmd.args(["--edition=2024", "--crate-type=rlib", "--crate-name=switchyard_shard_simd"])
        .args(["-C", "opt-level=3", "-C", "debug-assertions=off", "-C", "overflow-checks=off"])
        .args(["--cap-lints=warn", "--target", &var("TARGET"), "--out-dir", &out, "src/simd.rs"]);
    // RUSTFLAGS (say -C target-cpu) apply to the kernel as to the rest of the crate.
    for flag in var("CARGO_ENCODED_RUSTFLAGS").split('\x1f').filter(|f| !f.is_empty()) {
        cmd.arg(flag);
    }
    match cmd.status() {
        Ok(s) if s.success() => {
            println!("cargo::rustc-link-search=all={out}");
            println!("cargo::rustc-cfg=switchyard_prebuilt_simd");
        }
        other => println!("cargo::warning=could not precompile src/simd.rs ({other:?}); it runs unoptimized"),
    }
}
