//! Compiles the listener-events BPF program (`bpf/listeners.bpf.c`) with clang. Without clang
//! the crate still builds and listener discovery polls instead (the agent says so at start);
//! `./dev.sh setup` installs clang.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(hostnet_bpf)");
    println!("cargo::rerun-if-changed=bpf/listeners.bpf.c");
    println!("cargo::rerun-if-env-changed=CLANG");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default()).join("listeners.bpf.o");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let built = Command::new(&clang)
        .args(["-target", "bpfel", "-O2", "-g", "-Wall", "-Werror", "-c", "bpf/listeners.bpf.c", "-o"])
        .arg(&out)
        .status();
    match built {
        Ok(s) if s.success() => println!("cargo::rustc-cfg=hostnet_bpf"),
        Ok(s) => panic!("{clang} failed to compile bpf/listeners.bpf.c ({s})"),
        Err(e) => println!(
            "cargo::warning=listener events disabled: cannot run {clang} ({e}); discovery will poll. Install clang (./dev.sh setup does)."
        ),
    }
}
