//! Release builds of the `strait` binary link the functions it runs first in `.text`, in the
//! order `benches/symbol-order.txt` lists them (lld's `--symbol-ordering-file`): the kernel maps
//! executable pages 64 KiB around each page touched, so grouping what runs keeps the mapped,
//! resident part of the binary small (BENCHMARKS.md, "Memory: symbol ordering").

use std::path::Path;
use std::process::Command;

fn main() {
    let order = Path::new("benches/symbol-order.txt");
    println!("cargo:rerun-if-changed={}", order.display());
    println!("cargo:rerun-if-env-changed=STRAIT_NO_SYMBOL_ORDER");
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    if !release || !order.exists() || std::env::var_os("STRAIT_NO_SYMBOL_ORDER").is_some() {
        return;
    }
    if !links_with_lld() {
        println!("cargo:warning=symbol ordering skipped: the linker may not be lld");
        return;
    }
    let Ok(abs) = order.canonicalize() else {
        return;
    };
    println!(
        "cargo:rustc-link-arg-bin=strait=-Wl,--symbol-ordering-file={}",
        abs.display()
    );
    // Names the current code no longer has are expected in a list made from an older build.
    println!("cargo:rustc-link-arg-bin=strait=-Wl,--no-warn-symbol-ordering");
}

/// rustc links x86_64-unknown-linux-gnu with its bundled lld from 1.90 on, unless told to use
/// another linker.
fn links_with_lld() -> bool {
    if std::env::var("TARGET").ok().as_deref() != Some("x86_64-unknown-linux-gnu") {
        return false;
    }
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if flags.contains("linker") || flags.contains("fuse-ld") {
        return flags.contains("lld");
    }
    if std::env::vars().any(|(k, _)| k.starts_with("CARGO_TARGET_") && k.ends_with("_LINKER")) {
        return false;
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let Ok(out) = Command::new(rustc).arg("-vV").output() else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let minor = text
        .lines()
        .find_map(|l| l.strip_prefix("release: 1."))
        .and_then(|r| r.split('.').next())
        .and_then(|m| m.parse::<u32>().ok());
    minor.is_some_and(|m| m >= 90)
}
