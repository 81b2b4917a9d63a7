//! `thind`: the thinbdev daemon, run the way `spdk_tgt` is run.
//!
//! Start-up: parse flags, block SIGINT/SIGTERM in every thread (the main thread takes them
//! with `sigtimedwait`), build the RPC registry, bind the RPC socket (refusing a live one,
//! reclaiming a stale one), start one reactor per core of the mask with the RPC server polled
//! on the first, then either load `--json CONFIG` or (with `--wait-for-rpc`) wait for
//! `framework_start_init`.
//!
//! Shutdown on SIGINT/SIGTERM: stop serving RPC (the socket is removed), stop the exports
//! (NVMe/TCP listeners and queue pairs, vhost controllers), finish the bdev modules (which
//! close bdevs; pools commit), stop the reactors, exit 0.

mod log;
mod methods;
mod nvme_methods;
mod nvmf_methods;
mod vhost_methods;

use std::cell::RefCell;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use reactor::{CoreMask, PollStatus, ReactorId, Runtime, RuntimeOptions};
use rpc::config::Subsystems;
use rpc::framework::Framework;
use rpc::notify::Notifier;
use rpc::{Registry, RpcError, RpcServer, StateMask};

/// thinbdev daemon: thin pools with dm-thin metadata, served SPDK-style.
#[derive(Parser, Debug)]
#[command(name = "thind", version, about, long_about = None)]
struct Args {
    /// Reactor core mask: hex (0x3) or list ([0,1] or [0-3]); one pinned reactor per core.
    #[arg(short = 'm', long = "cpumask", default_value = "0x1")]
    cpumask: String,

    /// JSON-RPC Unix socket (mode 0600); `spdk-rpc` uses this path by default.
    #[arg(short = 'r', long = "rpc-socket", default_value = "/var/tmp/spdk.sock")]
    rpc_socket: PathBuf,

    /// JSON config to load at start (the format `spdk-rpc save_config` writes).
    #[arg(short = 'c', long = "json")]
    json: Option<PathBuf>,

    /// Start only the RPC server; create the rest after the `framework_start_init` RPC.
    #[arg(long = "wait-for-rpc")]
    wait_for_rpc: bool,

    /// Idle reactors sleep until work arrives instead of busy-polling (shared machines, tests).
    #[arg(long = "interrupt-mode")]
    interrupt_mode: bool,

    /// Directory for vhost-user sockets (vhost_create_blk_controller).
    #[arg(short = 'S', long = "vhost-sock-dir", default_value = ".")]
    vhost_sock_dir: PathBuf,

    /// Log level: ERROR, WARN, NOTICE, INFO or DEBUG.
    #[arg(
        long = "log-level",
        value_enum,
        default_value = "NOTICE",
        ignore_case = true
    )]
    log_level: log::Level,
}

thread_local! {
    /// The RPC server, owned by the first reactor's poller.
    static RPC_SERVER: RefCell<Option<RpcServer>> = const { RefCell::new(None) };
}

/// How often the RPC server is polled (SPDK polls its server every 4 ms).
const RPC_POLL_PERIOD: Duration = Duration::from_millis(1);

fn main() -> ExitCode {
    let args = Args::parse();
    log::set_level(args.log_level);
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("thind: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it before use, and
    // pthread_sigmask only changes this thread's mask (inherited by threads spawned later).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Waits up to `timeout` for SIGINT/SIGTERM; returns the signal number.
fn wait_signal(set: &libc::sigset_t, timeout: Duration) -> Option<i32> {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(1),
        tv_nsec: libc::c_long::from(timeout.subsec_nanos()),
    };
    // SAFETY: `set` is an initialised sigset_t, `ts` a valid timespec; a null siginfo is
    // allowed.
    let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    (sig > 0).then_some(sig)
}

fn run(args: Args) -> Result<(), String> {
    let mask = CoreMask::parse(&args.cpumask).map_err(|e| format!("-m {}: {e}", args.cpumask))?;
    let config = match &args.json {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--json {}: {e}", path.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| format!("--json {}: not valid JSON: {e}", path.display()))?;
            rpc::config::parse_config(&v).map_err(|e| format!("--json {}: {e}", path.display()))?;
            Some(v)
        }
        None => None,
    };
    let signals = block_signals();

    let registry = Arc::new(Registry::new(StateMask::STARTUP));
    let notifier = Arc::new(Notifier::new());
    for t in methods::NOTIFY_TYPES {
        notifier.register_type(t);
    }
    let subsystems = Arc::new(Subsystems::new());
    methods::register_subsystems(&subsystems);
    vhost::set_socket_dir(&args.vhost_sock_dir);
    vhost_methods::register_subsystem(&subsystems);
    let start_init: rpc::framework::StartInit = Box::new(|| {
        bdev::init_modules().map_err(|e| RpcError::errno(e.errno(), format!("bdev modules: {e}")))
    });
    let subsystems_for_nvmf = subsystems.clone();
    let framework = Framework::install(registry.clone(), subsystems, notifier.clone(), start_init);
    methods::register_bdev(&registry, &notifier);
    methods::register_thin(&registry, &notifier);

    let server = RpcServer::listen(&args.rpc_socket, registry.clone())
        .map_err(|e| format!("RPC socket {}: {e}", args.rpc_socket.display()))?;

    let mut opts = RuntimeOptions::new(mask.clone());
    opts.interrupt_mode = args.interrupt_mode;
    let runtime = Runtime::start(opts, move || {
        RPC_SERVER.with(|s| *s.borrow_mut() = Some(server));
        reactor::register_periodic_poller("rpc", RPC_POLL_PERIOD, || {
            let busy = RPC_SERVER.with(|s| s.borrow_mut().as_mut().is_some_and(RpcServer::poll));
            PollStatus::from_busy(busy)
        });
    })
    .map_err(|e| format!("starting reactors on {}: {e}", args.cpumask))?;
    let handle = runtime.handle();
    methods::register_framework(&registry, handle.clone());
    bdev::thin::set_runtime(handle.clone());
    nvme_methods::register_nvme(&registry, handle.clone());
    nvmf_methods::register_nvmf(&registry, &subsystems_for_nvmf, handle.clone());
    vhost_methods::register_vhost(&registry, handle.clone());

    let init = if args.wait_for_rpc {
        log!(
            Notice,
            "waiting for framework_start_init on {}",
            args.rpc_socket.display()
        );
        Ok(())
    } else {
        match &config {
            Some(cfg) => rpc::config::load_config(&registry, cfg, || {
                framework.start().map_err(|e| e.message)
            }),
            None => framework.start().map_err(|e| e.message),
        }
    };
    if let Err(e) = init {
        shutdown(&runtime);
        runtime.join().map_err(|e| format!("reactors: {e}"))?;
        return Err(e);
    }
    log!(
        Notice,
        "thind ready: {} reactor(s) on cores {}{}; RPC on {} (try: spdk-rpc -s {} bdev_get_bdevs)",
        handle.nr_reactors(),
        mask,
        if args.interrupt_mode {
            " (interrupt mode)"
        } else {
            ""
        },
        args.rpc_socket.display(),
        args.rpc_socket.display()
    );

    loop {
        if let Some(sig) = wait_signal(&signals, Duration::from_millis(200)) {
            log!(Notice, "signal {sig}: shutting down");
            break;
        }
        if handle.is_stopping() {
            log!(Warn, "reactors stopped: shutting down");
            break;
        }
    }
    shutdown(&runtime);
    runtime.join().map_err(|e| format!("reactors: {e}"))?;
    log!(Notice, "thind stopped");
    Ok(())
}

/// Stops serving RPC (removing the socket), finishes the bdev modules, stops the reactors.
fn shutdown(runtime: &Runtime) {
    let handle = runtime.handle();
    if !handle.is_stopping() {
        let _ = handle.call(ReactorId::new(0), || {
            RPC_SERVER.with(|s| s.borrow_mut().take());
        });
        // Exports first (no new I/O), then the pools' final commits, then the remote
        // controllers a pool may sit on, then the base modules.
        nvmf::shutdown();
        vhost::shutdown();
        for pool in bdev::thin::pool_names() {
            if let Err(e) = bdev::thin::delete_pool_blocking(&pool) {
                log!(Warn, "closing thin pool '{pool}' at shutdown: {e}");
            }
        }
        nvme::shutdown();
        bdev::fini_modules();
    }
    handle.stop();
}
