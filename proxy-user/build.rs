//! Compiles the wire protocol with protox (pure Rust), so no system `protoc` is
//! needed, and puts the eBPF object konduit embeds in `OUT_DIR`.

use std::path::{Path, PathBuf};

use anyhow::Context;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/konnectivity.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // The generated `connect` constructor would clash with the `Connect` RPC.
        .build_transport(false)
        // Zero-copy payloads: DATA bytes are sliced from the HTTP/2 frame buffer.
        .bytes(".")
        .compile_fds(descriptors)?;
    if let Err(e) = ebpf_object() {
        // The chain ends with the failed command's own output; print it as it is.
        eprintln!("error: konduit's eBPF object: {e}");
        e.chain().skip(1).for_each(|cause| eprintln!("caused by: {cause}"));
        std::process::exit(1);
    }
    Ok(())
}

/// `OUT_DIR/konduit-ebpf.o`: the prebuilt object named by `KONDUIT_EBPF_OBJECT`
/// if set, else `proxy-ebpf/` built here with the nightly (setting up its
/// toolchain under the target directory the first time), like aya-template's
/// build script. No stub: without an object the build fails and says why.
fn ebpf_object() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let embedded = out_dir.join("konduit-ebpf.o");
    println!("cargo:rerun-if-env-changed=KONDUIT_EBPF_OBJECT");
    let object = match std::env::var_os("KONDUIT_EBPF_OBJECT") {
        Some(prebuilt) => {
            println!("cargo:rerun-if-changed={}", Path::new(&prebuilt).display());
            PathBuf::from(prebuilt)
        }
        None => {
            let workspace = manifest_dir.parent().expect("proxy-user sits in the workspace");
            let crate_dir = workspace.join("proxy-ebpf");
            let layout = konduit_ebpf_build::Layout::from_out_dir(&out_dir, &workspace.join("target"));
            // Rebuild on any change to the eBPF crate, or when its toolchain was (re)installed.
            println!("cargo:rerun-if-changed={}", crate_dir.display());
            println!("cargo:rerun-if-changed={}", workspace.join("proxy-common").display());
            println!("cargo:rerun-if-changed={}", layout.tools().join("bpf-linker.stamp").display());
            konduit_ebpf_build::build(&layout, &crate_dir, konduit_ebpf_build::Console::BuildScript)?
        }
    };
    std::fs::copy(&object, &embedded)
        .with_context(|| format!("copying {} to {}", object.display(), embedded.display()))?;
    Ok(())
}
