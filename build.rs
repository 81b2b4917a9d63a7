//! Build script for `thind`.
//!
//! SPDK bindings are generated only with the optional `spdk` feature (it needs an SPDK build
//! tree named by `SPDK_DIR`); the default build is pure Rust and this script does nothing.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_SPDK").is_some() {
        println!("cargo:rerun-if-env-changed=SPDK_DIR");
        if std::env::var_os("SPDK_DIR").is_none() {
            println!("cargo:warning=feature `spdk` needs SPDK_DIR (an SPDK build tree); no bindings generated");
        }
    }
}
