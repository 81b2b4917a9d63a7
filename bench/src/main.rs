//! `bdevperf`: SPDK's bdevperf, on thinbdev's reactors and bdevs.
//!
//! Exit status: 0 when every job finished without error, 1 on bad input (one line on stderr)
//! or when any I/O failed or a verify read-back did not match (the table is still printed,
//! and each job's error is repeated on stderr).

use std::io::Write as _;
use std::process::ExitCode;

use bench::cli::{self, Command};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match cli::parse_args(&args) {
        Ok(Command::Help) => {
            println!("{}", cli::USAGE);
            return ExitCode::SUCCESS;
        }
        Ok(Command::Run(opts)) => opts,
        Err(e) => return fail(&e.to_string()),
    };
    if opts.rw_read_percent.is_some() && !opts.workload.is_mixed() {
        eprintln!(
            "bdevperf: note: -M applies to rw and randrw only; ignored for -w {}",
            opts.workload
        );
    }
    match bench::run::run(&opts) {
        Ok(output) => {
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(output.text.as_bytes());
            let _ = stdout.flush();
            if output.failed {
                for e in &output.errors {
                    eprintln!("bdevperf: {e}");
                }
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("bdevperf: {msg}");
    ExitCode::FAILURE
}
