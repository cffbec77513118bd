//! `cloudfunc-shim`: owns one libcontainer container for the cloudfunc host process.
//! Started by the sandbox library with its control channel on stdin; not meant for people.

fn main() {
    if let Err(e) = cloudfunc_sandbox::seal::ensure_sealed() {
        eprintln!("cloudfunc-shim: refusing to run from a writable binary: {e}");
        std::process::exit(1);
    }
    let args = match cloudfunc_sandbox::shim::ShimArgs::parse(std::env::args_os().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("cloudfunc-shim: {e}");
            std::process::exit(2);
        }
    };
    std::process::exit(cloudfunc_sandbox::shim::run(args));
}
