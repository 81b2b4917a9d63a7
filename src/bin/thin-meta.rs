//! `thin-meta`: offline dm-thin metadata tools over `pdata::thin`.
//!
//! - `thin-meta check META` — exit 0 when the metadata is consistent, else 1 with one line per
//!   problem on stderr (everything thin_check 0.9.0 checks, plus exact data reference counts,
//!   mappings past the data device, device details vs trees; see `pdata::thin::check`).
//! - `thin-meta dump META [-m [BLOCK]] [-o OUT]` — the same XML as thin_dump 0.9.0; `-m`
//!   dumps the held metadata snapshot (or the superblock copy at BLOCK).
//! - `thin-meta restore -i XML -o META` — writes the XML as fresh metadata into the existing
//!   file or device META.
//!
//! Bad input gives a one-line error and exit status 1.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use pdata::thin::check::{check, CheckOptions};
use pdata::thin::dump::{dump, DumpRoot};
use pdata::thin::restore::restore;
use pdata::thin::xml;
use pdata::FileBlockIo;

#[derive(Parser, Debug)]
#[command(
    name = "thin-meta",
    version,
    about = "Offline dm-thin pool metadata tools"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Check metadata consistency (exit 0 when clean, 1 with one line per problem).
    Check {
        /// Metadata file or device.
        meta: PathBuf,
        /// Also require nr_allocated of both space maps to be exact.
        #[arg(long)]
        exact: bool,
        /// Print nothing on success.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Print the metadata as thin_dump XML.
    Dump {
        /// Metadata file or device.
        meta: PathBuf,
        /// Dump the held metadata snapshot (or the superblock copy at BLOCK).
        #[arg(short = 'm', long = "metadata-snap", num_args = 0..=1, value_name = "BLOCK")]
        metadata_snap: Option<Option<u64>>,
        /// Write to this file instead of stdout.
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
    },
    /// Write thin_dump XML as fresh metadata into an existing file or device.
    Restore {
        /// Input XML.
        #[arg(short = 'i', long = "input")]
        input: PathBuf,
        /// Output metadata file or device (must exist; its size is the metadata size).
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
    },
}

fn open_read_only(path: &Path) -> Result<FileBlockIo> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    FileBlockIo::from_file(file).with_context(|| format!("cannot size {}", path.display()))
}

fn run_check(meta: &Path, exact: bool, quiet: bool) -> Result<bool> {
    let io = open_read_only(meta)?;
    let report = check(
        &io,
        &CheckOptions {
            exact_nr_allocated: exact,
        },
    );
    if report.is_clean() {
        if !quiet {
            println!(
                "{}: clean: transaction {}, {} devices, {} mappings, {} metadata blocks and {} \
                 data blocks in use",
                meta.display(),
                report.transaction_id,
                report.nr_devices,
                report.nr_mappings,
                report.nr_metadata_blocks_used,
                report.nr_data_blocks_used
            );
        }
        return Ok(true);
    }
    eprint!("{report}");
    Ok(false)
}

fn run_dump(meta: &Path, snap: Option<Option<u64>>, output: Option<&Path>) -> Result<()> {
    let io = open_read_only(meta)?;
    let root = match snap {
        None => DumpRoot::Live,
        Some(None) => DumpRoot::HeldRoot,
        Some(Some(b)) => DumpRoot::Block(b),
    };
    match output {
        Some(path) => {
            let f =
                File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
            dump(&io, root, f)?;
        }
        None => {
            let stdout = std::io::stdout();
            dump(&io, root, stdout.lock())?;
        }
    }
    Ok(())
}

fn run_restore(input: &Path, output: &Path) -> Result<()> {
    let text = std::fs::read_to_string(input)
        .with_context(|| format!("cannot read {}", input.display()))?;
    let pool = xml::parse(&text).with_context(|| format!("{}", input.display()))?;
    if !output.exists() {
        bail!(
            "{} does not exist (create it with the metadata device's size)",
            output.display()
        );
    }
    let io =
        FileBlockIo::open(output).with_context(|| format!("cannot open {}", output.display()))?;
    restore(&pool, &io).with_context(|| format!("restoring into {}", output.display()))?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Check { meta, exact, quiet } => run_check(&meta, exact, quiet),
        Cmd::Dump {
            meta,
            metadata_snap,
            output,
        } => run_dump(&meta, metadata_snap, output.as_deref()).map(|()| true),
        Cmd::Restore { input, output } => run_restore(&input, &output).map(|()| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            let _ = std::io::stdout().flush();
            eprintln!("thin-meta: {e:#}");
            ExitCode::FAILURE
        }
    }
}
