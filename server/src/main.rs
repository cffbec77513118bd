//! `cloudfunc`: the server, its command-line client, a token minter and a local runner (see
//! [`cloudfunc_server::cli`]).

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use cloudfunc_server::cli::{self, Cli};

/// mimalloc instead of glibc's malloc: a warm call allocates and frees from several threads
/// (HTTP, pool, recorder), and glibc's arenas spent about 11 % of the server's CPU on it
/// under 16 clients.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    cloudfunc_server::logging::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.runtime_threads())
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cloudfunc: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        // As a tool killed by SIGPIPE ends (128 + 13), without a word: its reader has gone.
        Err(e) if cli::reader_gone(&e) => ExitCode::from(141),
        Err(e) => {
            eprintln!("cloudfunc: {e:#}");
            ExitCode::from(2)
        }
    }
}
