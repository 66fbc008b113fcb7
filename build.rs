//! Release builds of the `strait` binary link the functions it runs first in `.text`, in the
//! order `benches/symbol-order.txt` lists them (lld's `--symbol-ordering-file`): the kernel maps
//! executable pages 64 KiB around each page touched, so grouping what runs keeps the mapped,
//! resident part of the binary small (BENCHMARKS.md, "Memory: symbol ordering"). They also pack
//! their relative relocations (`-z pack-relative-relocs`, DT_RELR) where the linker and the C
//! library take them: 378 KiB of `.rela.dyn`, read whole at every start, become 7 KiB.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const LINK_ARGS: [&str; 2] = ["--symbol-ordering-file", "--no-warn-symbol-ordering"];
const RELR: [&str; 2] = ["-z", "pack-relative-relocs"];

fn main() {
    let order = Path::new("benches/symbol-order.txt");
    println!("cargo:rerun-if-changed={}", order.display());
    println!("cargo:rerun-if-env-changed=STRAIT_NO_SYMBOL_ORDER");
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    if !release {
        return;
    }
    pack_relocations();
    if std::env::var_os("STRAIT_NO_SYMBOL_ORDER").is_some() {
        return;
    }
    let Ok(order) = order.canonicalize() else {
        return;
    };
    let args = linker_args(&order);
    // Only a linker that takes the options gets them: GNU ld, or lld behind a driver that
    // does not pass them on, would fail the build. A one-line program linked with them decides.
    if !links(&args, false) {
        println!("cargo:warning=symbol ordering skipped: the linker does not take {LINK_ARGS:?}");
        return;
    }
    for a in args {
        println!("cargo:rustc-link-arg-bin=strait={a}");
    }
}

/// DT_RELR needs the linker (lld, GNU ld 2.38+) and the dynamic loader (glibc 2.36+) to know it:
/// a binary whose loader does not refuses to start, so the probe program must also run.
/// Cross builds (target other than host) cannot run it and keep plain relocations.
fn pack_relocations() {
    let native = std::env::var("TARGET").ok() == std::env::var("HOST").ok();
    let args: Vec<String> = RELR
        .iter()
        .flat_map(|a| ["-Xlinker".to_string(), a.to_string()])
        .collect();
    if !native || !links(&args, true) {
        println!("cargo:warning=relocations not packed: the linker or C library lacks DT_RELR");
        return;
    }
    for a in args {
        println!("cargo:rustc-link-arg-bin=strait={a}");
    }
}

/// The options as the C compiler driver passes them on (`-Xlinker`, one argument each, so a
/// path with commas or spaces stays whole).
fn linker_args(order: &Path) -> Vec<String> {
    let mut v = Vec::new();
    for a in [LINK_ARGS[0], &order.display().to_string(), LINK_ARGS[1]] {
        v.push("-Xlinker".to_string());
        v.push(a.to_string());
    }
    v
}

/// Whether rustc, as cargo runs it for this build (target, flags, linker), links a program
/// with `args` (and, with `run`, whether that program then runs here).
fn links(args: &[String], run: bool) -> bool {
    let Some(out) = std::env::var_os("OUT_DIR").map(PathBuf::from) else {
        return false;
    };
    let src = out.join("link_probe.rs");
    if std::fs::write(&src, "fn main() {}\n").is_err() {
        return false;
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let mut cmd = Command::new(rustc);
    cmd.arg(&src).arg("-o").arg(out.join("link_probe"));
    if let Ok(target) = std::env::var("TARGET") {
        cmd.arg("--target").arg(target);
    }
    if let Ok(flags) = std::env::var("CARGO_ENCODED_RUSTFLAGS") {
        cmd.args(flags.split('\x1f').filter(|f| !f.is_empty()));
    }
    if let Ok(linker) = std::env::var("RUSTC_LINKER") {
        cmd.arg(format!("-Clinker={linker}"));
    }
    for a in args {
        cmd.arg(format!("-Clink-arg={a}"));
    }
    let ok = |cmd: &mut Command| {
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    ok(&mut cmd) && (!run || ok(&mut Command::new(out.join("link_probe"))))
}
