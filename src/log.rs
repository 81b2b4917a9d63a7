//! Minimal leveled logging to stderr with SPDK's level names (`--log-level`).

use std::sync::atomic::{AtomicU8, Ordering};

/// Log levels, most severe first (SPDK: ERROR, WARN, NOTICE, INFO, DEBUG).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
#[clap(rename_all = "UPPER")]
pub enum Level {
    /// Errors only.
    Error = 0,
    /// Errors and warnings.
    Warn = 1,
    /// Plus notable events (default).
    Notice = 2,
    /// Plus informational messages.
    Info = 3,
    /// Everything.
    Debug = 4,
}

static LEVEL: AtomicU8 = AtomicU8::new(Level::Notice as u8);

/// Sets the level.
pub fn set_level(level: Level) {
    LEVEL.store(level as u8, Ordering::Relaxed);
}

/// True if messages at `level` are printed.
pub fn enabled(level: Level) -> bool {
    level as u8 <= LEVEL.load(Ordering::Relaxed)
}

/// Logs at a level: `log!(Notice, "...", args)`.
#[macro_export]
macro_rules! log {
    ($lvl:ident, $($arg:tt)*) => {
        if $crate::log::enabled($crate::log::Level::$lvl) {
            eprintln!("[thind] {}: {}", stringify!($lvl).to_uppercase(), format_args!($($arg)*));
        }
    };
}
