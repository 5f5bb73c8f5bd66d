//! Links the functions a sidecar runs at the start of the text segment, in a
//! release build for Linux, with the linker script that `scripts/link-order`
//! generates. An idle sidecar then maps ~3 MB of code instead of ~7 MB (see
//! docs/performance.md). `TANDEM_LINK_ORDER=0` links without it, for a
//! linker that does not read GNU linker scripts (mold).

use std::env;
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=link/order.ld");
    println!("cargo:rerun-if-env-changed=TANDEM_LINK_ORDER");
    let linux = env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux");
    let optimized = !matches!(env::var("OPT_LEVEL").as_deref(), Ok("0") | Ok("1"));
    let wanted = env::var("TANDEM_LINK_ORDER").as_deref() != Ok("0");
    let script =
        Path::new(&env::var("CARGO_MANIFEST_DIR").expect("set by cargo")).join("link/order.ld");
    if linux && optimized && wanted && script.exists() {
        println!(
            "cargo:rustc-link-arg-bin=tandem=-Wl,-T,{}",
            script.display()
        );
    }
}
