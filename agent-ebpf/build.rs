//! The eBPF binary is linked by `bpf-linker`, which cargo does not know about: rebuild when it
//! changes (for example after `cargo xtask setup` rebuilt it for a new nightly LLVM).

fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => println!(
            "cargo:warning=bpf-linker not found ({err}); run `cargo xtask setup` to build it"
        ),
    }
}
