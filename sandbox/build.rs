//! Links `cloudfunc-shim` as a fixed-address executable. Every sandbox starts a shim, and as a
//! position-independent executable the dynamic loader applied some 20,000 relocations at each
//! start, copying the pages they touch: about 1.2 ms of CPU and 100 page faults per shim,
//! private memory in each of them. The shim takes no input from the function it contains, so
//! a fixed address for its own code gives a hostile function nothing to aim at.

fn main() {
    println!("cargo:rustc-link-arg-bin=cloudfunc-shim=-no-pie");
}
