//! The bdev registry: unique names, aliases and UUIDs; register/unregister; lookup.
//!
//! Control path only, usable from any thread: one mutex guards the maps and is never taken
//! on the data path (channels hold their `Arc<dyn Bdev>`). Unregistering a bdev frees its
//! names at once, sends [`BdevEvent::Remove`] to every open descriptor and destructs the
//! bdev when the last descriptor closes (SPDK's hot-remove).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use serde_json::{json, Value};

use crate::bdev::{bdev_info_json, Bdev, BdevEvent, Uuid};
use crate::error::{BdevError, ErrorKind, Result};
use crate::iostat::{tick_rate, ticks};
use crate::module::modules;

#[derive(Default)]
struct Maps {
    /// Registration order.
    bdevs: Vec<Arc<dyn Bdev>>,
    /// Names and aliases → bdev.
    names: HashMap<String, Arc<dyn Bdev>>,
    uuids: HashMap<Uuid, Arc<dyn Bdev>>,
}

/// The process-wide bdev registry; get it with [`registry`].
pub struct BdevRegistry {
    maps: Mutex<Maps>,
    listeners: Mutex<Vec<Listener>>,
}

/// Called with (`"bdev_register"` | `"bdev_unregister"`, bdev name) after each change.
type Listener = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// The process-wide registry.
pub fn registry() -> &'static BdevRegistry {
    static R: OnceLock<BdevRegistry> = OnceLock::new();
    R.get_or_init(|| BdevRegistry {
        maps: Mutex::new(Maps::default()),
        listeners: Mutex::new(Vec::new()),
    })
}

fn not_found(name: &str) -> BdevError {
    BdevError::new(ErrorKind::NotFound, format!("no bdev named '{name}'"))
}

impl BdevRegistry {
    fn lock(&self) -> MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Subscribes `f` to registrations: it is called with `"bdev_register"` or
    /// `"bdev_unregister"` and the bdev's name after every change, on the thread that made it
    /// (control path; never under the registry lock).
    pub fn subscribe(&self, f: impl Fn(&str, &str) + Send + Sync + 'static) {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::new(f));
    }

    fn notify(&self, event: &str, name: &str) {
        let listeners = self
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for l in listeners {
            l(event, name);
        }
    }

    /// Registers `bdev` under its name, aliases and UUID, then lets every module examine it.
    ///
    /// Errors: `EEXIST` if the name, an alias or the UUID is taken.
    pub fn register(&self, bdev: Arc<dyn Bdev>) -> Result<()> {
        {
            let mut m = self.lock();
            let core = bdev.core();
            let mut names = vec![core.name().to_string()];
            names.extend(core.aliases());
            for (i, n) in names.iter().enumerate() {
                if m.names.contains_key(n) || names[..i].contains(n) {
                    return Err(BdevError::new(
                        ErrorKind::AlreadyExists,
                        format!("bdev name or alias '{n}' already exists"),
                    ));
                }
            }
            if m.uuids.contains_key(&core.uuid()) {
                return Err(BdevError::new(
                    ErrorKind::AlreadyExists,
                    format!("a bdev with UUID {} already exists", core.uuid()),
                ));
            }
            for n in names {
                m.names.insert(n, bdev.clone());
            }
            m.uuids.insert(core.uuid(), bdev.clone());
            m.bdevs.push(bdev.clone());
            core.lock().registered = true;
        }
        self.notify("bdev_register", bdev.core().name());
        for module in modules() {
            if module.name() != bdev.core().module_name() {
                module.examine(&bdev);
            }
        }
        Ok(())
    }

    /// Unregisters the bdev named `name` (name or alias): frees its names, sends
    /// [`BdevEvent::Remove`] to open descriptors, and destructs it now if none are open
    /// (otherwise when the last closes). Returns the bdev.
    ///
    /// Errors: `ENODEV` if there is no such bdev.
    pub fn unregister(&self, name: &str) -> Result<Arc<dyn Bdev>> {
        let bdev = {
            let mut m = self.lock();
            let bdev = m.names.get(name).cloned().ok_or_else(|| not_found(name))?;
            m.names.retain(|_, b| !Arc::ptr_eq(b, &bdev));
            m.uuids.retain(|_, b| !Arc::ptr_eq(b, &bdev));
            m.bdevs.retain(|b| !Arc::ptr_eq(b, &bdev));
            bdev
        };
        let (callbacks, destruct) = {
            let mut st = bdev.core().lock();
            st.registered = false;
            st.removed = true;
            let cbs: Vec<_> = st.descs.iter().map(|d| d.event_cb.clone()).collect();
            let destruct = cbs.is_empty() && !st.destructed;
            if destruct {
                st.destructed = true;
            }
            (cbs, destruct)
        };
        self.notify("bdev_unregister", bdev.core().name());
        for cb in callbacks {
            cb.deliver(BdevEvent::Remove);
        }
        if destruct {
            bdev.destruct();
        }
        Ok(bdev)
    }

    /// The bdev with this name, alias or UUID string.
    pub fn lookup(&self, name: &str) -> Option<Arc<dyn Bdev>> {
        let m = self.lock();
        if let Some(b) = m.names.get(name) {
            return Some(b.clone());
        }
        let uuid = Uuid::parse(name).ok()?;
        m.uuids.get(&uuid).cloned()
    }

    /// Adds `alias` to the bdev named `name`. Errors: `ENODEV`, `EEXIST`.
    pub fn add_alias(&self, name: &str, alias: &str) -> Result<()> {
        let mut m = self.lock();
        let bdev = m.names.get(name).cloned().ok_or_else(|| not_found(name))?;
        if alias.is_empty() {
            return Err(BdevError::invalid("alias must not be empty"));
        }
        if m.names.contains_key(alias) {
            return Err(BdevError::new(
                ErrorKind::AlreadyExists,
                format!("bdev name or alias '{alias}' already exists"),
            ));
        }
        m.names.insert(alias.to_string(), bdev.clone());
        bdev.core().lock().aliases.push(alias.to_string());
        Ok(())
    }

    /// Removes `alias` from whichever bdev has it. Errors: `ENODEV`, `EINVAL` for a name.
    pub fn remove_alias(&self, alias: &str) -> Result<()> {
        let mut m = self.lock();
        let bdev = m
            .names
            .get(alias)
            .cloned()
            .ok_or_else(|| not_found(alias))?;
        if bdev.name() == alias {
            return Err(BdevError::invalid(format!(
                "'{alias}' is a bdev name, not an alias"
            )));
        }
        m.names.remove(alias);
        bdev.core().lock().aliases.retain(|a| a != alias);
        Ok(())
    }

    /// All registered bdevs in registration order.
    pub fn list(&self) -> Vec<Arc<dyn Bdev>> {
        self.lock().bdevs.clone()
    }

    /// `bdev_get_bdevs`: every bdev, or only `name` (`ENODEV` if unknown).
    pub fn get_bdevs_json(&self, name: Option<&str>) -> Result<Value> {
        let bdevs = match name {
            Some(n) => vec![self.lookup(n).ok_or_else(|| not_found(n))?],
            None => self.list(),
        };
        Ok(Value::Array(
            bdevs.iter().map(|b| bdev_info_json(b.as_ref())).collect(),
        ))
    }

    /// `bdev_get_iostat`: `{tick_rate, ticks, bdevs: [...]}` for every bdev or only `name`.
    pub fn iostat_json(&self, names: &[String]) -> Result<Value> {
        let bdevs = if names.is_empty() {
            self.list()
        } else {
            names
                .iter()
                .map(|n| self.lookup(n).ok_or_else(|| not_found(n)))
                .collect::<Result<Vec<_>>>()?
        };
        let entries: Vec<Value> = bdevs
            .iter()
            .map(|b| b.core().iostat().to_json(b.name()))
            .collect();
        Ok(json!({ "tick_rate": tick_rate(), "ticks": ticks(), "bdevs": entries }))
    }

    /// The `bdev` subsystem's save_config entries: module options, then one create call per
    /// bdev that has one (base bdevs before the bdevs registered after them).
    pub fn config_json(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for m in modules() {
            out.extend(m.config_json());
        }
        for b in self.list() {
            out.extend(b.write_config_json());
        }
        out
    }
}
