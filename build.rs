//! Bakes the libtorch directory the build used into the binaries' run path, so `voxflow` finds
//! libtorch without the user exporting anything. `LD_LIBRARY_PATH` still wins (it is searched
//! before a run path), which is how a binary built here runs on another machine's libtorch.

fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
