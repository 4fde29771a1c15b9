//! Two things the binaries need from the build:
//!
//! - the libtorch directory the build used, baked into the run path, so `voxflow` finds
//!   libtorch without the user exporting anything. `LD_LIBRARY_PATH` still wins (it is
//!   searched before a run path), which is how a binary built here runs on another
//!   machine's libtorch;
//! - `VOXFLOW_CODE`, a hash of the stages' source and of `Cargo.lock`, which the volume cache
//!   puts in every key: a build whose stages (or dependencies) changed never reads entries
//!   another build wrote, even under the same version number.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-changed=build.rs");
    let mut files = Vec::new();
    for watched in ["stages/src", "stages/Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={watched}");
        collect(Path::new(watched), &mut files);
    }
    files.sort();
    // DefaultHasher's algorithm is fixed for a given Rust toolchain; another toolchain
    // gives another hash, which only costs a recomputation.
    let mut h = DefaultHasher::new();
    for path in &files {
        path.hash(&mut h);
        std::fs::read(path).unwrap_or_default().hash(&mut h);
    }
    println!("cargo:rustc-env=VOXFLOW_CODE={:016x}", h.finish());
}

/// Every file under `path` (or `path` itself).
fn collect(path: &Path, out: &mut Vec<PathBuf>) {
    match std::fs::read_dir(path) {
        Ok(entries) => {
            for entry in entries.flatten() {
                collect(&entry.path(), out);
            }
        }
        Err(_) if path.is_file() => out.push(path.to_path_buf()),
        Err(_) => {}
    }
}
