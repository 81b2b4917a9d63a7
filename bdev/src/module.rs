//! `BdevModule`: the module shape (STYLE rule 14) and the module list.
//!
//! A module owns a kind of bdev (null, malloc, uring, later thin). `init`/`fini` run at
//! subsystem start/stop; `config_json` returns module-level options for save_config;
//! `examine` is offered every newly registered bdev so virtual-bdev modules can claim it.

use std::sync::{Arc, Mutex, OnceLock};

use serde_json::Value;

use crate::bdev::Bdev;
use crate::error::{BdevError, ErrorKind, Result};

/// A bdev module.
pub trait BdevModule: Send + Sync + 'static {
    /// Module name (e.g. "null", "malloc", "uring").
    fn name(&self) -> &'static str;

    /// Called once at subsystem start.
    fn init(&self) -> Result<()> {
        Ok(())
    }

    /// Called once at subsystem stop; delete remaining bdevs here.
    fn fini(&self) {}

    /// Module-level `{"method", "params"}` entries for save_config (before any bdev).
    fn config_json(&self) -> Vec<Value> {
        Vec::new()
    }

    /// Offered each newly registered bdev of other modules.
    fn examine(&self, _bdev: &Arc<dyn Bdev>) {}
}

fn list() -> &'static Mutex<Vec<Arc<dyn BdevModule>>> {
    static M: OnceLock<Mutex<Vec<Arc<dyn BdevModule>>>> = OnceLock::new();
    M.get_or_init(|| {
        let builtin: Vec<Arc<dyn BdevModule>> = vec![
            Arc::new(crate::null::NullModule),
            Arc::new(crate::malloc::MallocModule),
            Arc::new(crate::uring::UringModule),
        ];
        Mutex::new(builtin)
    })
}

/// Adds a module. Errors: `EEXIST` if one with that name exists.
pub fn register_module(module: Arc<dyn BdevModule>) -> Result<()> {
    let mut l = list().lock().unwrap_or_else(|e| e.into_inner());
    if l.iter().any(|m| m.name() == module.name()) {
        return Err(BdevError::new(
            ErrorKind::AlreadyExists,
            format!("bdev module '{}' already registered", module.name()),
        ));
    }
    l.push(module);
    Ok(())
}

/// All modules (built-in null, malloc, uring first).
pub fn modules() -> Vec<Arc<dyn BdevModule>> {
    list().lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Runs every module's `init`, stopping at the first error.
pub fn init_modules() -> Result<()> {
    for m in modules() {
        m.init()?;
    }
    Ok(())
}

/// Runs every module's `fini` in reverse order.
pub fn fini_modules() {
    for m in modules().iter().rev() {
        m.fini();
    }
}
