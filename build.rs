//! Builds the XDP program (bpf/relay.bpf.c) when the `xdp` feature is on;
//! without it this does nothing, and the build needs no clang.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_XDP").is_none() {
        return;
    }
    println!("cargo:rerun-if-changed=bpf/relay.bpf.c");
    println!("cargo:rerun-if-env-changed=CLANG");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("relay.bpf.o");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    // The UAPI headers (asm/types.h) live under the multiarch directory.
    let multiarch = std::process::Command::new("gcc")
        .arg("-print-multiarch")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("{}-linux-gnu", std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default()));
    // -g: BTF, without which the loader cannot read the `.maps` section.
    let status = std::process::Command::new(&clang)
        .args(["-O2", "-g", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror"])
        .arg(format!("-I/usr/include/{multiarch}"))
        .arg("-c")
        .arg("bpf/relay.bpf.c")
        .arg("-o")
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{clang} failed to compile bpf/relay.bpf.c ({s}); the `xdp` feature needs clang and libbpf-dev"),
        Err(e) => panic!("cannot run {clang} ({e}); the `xdp` feature needs clang and libbpf-dev (apt-get install clang libbpf-dev)"),
    }
    // For tests/xdp.rs, which attaches a pass-through program to the far
    // ends of its veth pairs (native XDP on veth needs one there).
    println!("cargo:rustc-env=TURND_XDP_OBJECT={}", out.display());
}
