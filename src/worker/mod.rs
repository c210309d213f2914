//! One worker process: pinned to a core, one single-threaded monoio runtime, unprivileged.
//! It serves the sockets it was handed until the master tells it to drain (SIGQUIT) or to
//! stop (SIGTERM/SIGINT).

mod access_log;
mod conn;
mod ctx;
mod dispatch;
mod exchange;
mod h2;
mod handlers;
mod http;
mod huge_pages;
mod idle;
mod ktls;
pub(crate) mod proxy;
mod recorder;
mod router;
mod server;
pub(crate) mod signals;
mod timed;

use crate::shared::child::{drop_privileges, exit, EXIT_STARTUP_FAILED};
use crate::shared::config::Config;
use crate::shared::{self, WorkerStart};
use monoio::{FusionDriver, RuntimeBuilder};
use std::rc::Rc;

/// io_uring submission-queue entries: ring memory counts against a small memlock budget
/// shared by every process of the user, so rings stay modest.
const RING_ENTRIES: u32 = 256;

/// The worker entry point (`shared::WorkerMain`), called in the child right after fork.
pub fn run(start: WorkerStart) -> ! {
    shared::log::set_role(&format!("worker {}", start.index));
    match serve(start) {
        Ok(()) => exit(0),
        Err(e) => {
            log::error!("{e}");
            exit(EXIT_STARTUP_FAILED)
        }
    }
}

fn serve(start: WorkerStart) -> Result<(), String> {
    let cores = shared::cpu_count();
    pin_to_core(start.index % cores);
    let huge = start.config.performance.huge_pages_enabled;
    if huge {
        huge_pages::enable();
    }
    let uring = monoio::utils::detect_uring();
    let (mut runtime, tuned) = build_runtime()?;
    let config: &Config = &start.config;
    let log_output = shared::log::open_output(&config.logging)
        .map_err(|e| format!("cannot open the log file: {e}"))?;
    let access_file = access_log::open(&config.logging)
        .map_err(|e| format!("cannot open the access log: {e}"))?;
    drop_privileges(&start)?;
    // Routes open files (memory routes read them whole) and CA files: with the worker's
    // rights, so a config cannot make a worker serve what only root may read.
    let router = router::Router::build(config, start.builtin, start.shm)
        .map_err(|e| format!("cannot build the routes: {e}"))?;
    let dispatch = Rc::new(dispatch::Dispatch {
        router,
        metrics: handlers::metrics::MetricsRoute::new(config, start.shm),
        backends: Default::default(),
    });
    shared::log::start_async(&config.logging, log_output)?;
    if !uring {
        log::warn!("io_uring is not available here: using the epoll driver");
    } else if !tuned {
        log::info!("io_uring without cooperative task running (kernel before 5.19)");
    }
    log_inactive_keys(config, start.index);
    let signals = signals::install().map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let mut ctx = ctx::Ctx::new(&start);
    if let Some(file) = access_file {
        let dropped = &ctx.slot.access_log_dropped;
        ctx.access_log = Some(
            access_log::AccessLog::start(file, &config.logging, dropped)
                .map_err(|e| format!("cannot start the access log: {e}"))?,
        );
    }
    let ctx = Rc::new(ctx);
    let tls = match (start.tls.clone(), config.tls.as_ref()) {
        (Some(server_config), Some(tls)) => Some(tls_for_worker(server_config, ktls::decide(tls))),
        _ => None,
    };
    runtime.block_on(async move {
        if huge {
            monoio::spawn(huge_pages::report(HUGE_PAGES_REPORT));
        }
        server::run(ctx, dispatch, start.listeners, signals, tls).await
    })
}

/// How long a worker serves before it says how much of its memory is in huge pages.
const HUGE_PAGES_REPORT: std::time::Duration = std::time::Duration::from_secs(10);

/// The master's TLS configuration as this worker uses it: handing connections to the kernel
/// needs rustls to keep the traffic secrets, which only a worker that offloads asks for
/// (the fallback keeps the master's configuration untouched).
fn tls_for_worker(
    server_config: std::sync::Arc<rustls::ServerConfig>,
    mode: ktls::Mode,
) -> (std::sync::Arc<rustls::ServerConfig>, ktls::Mode) {
    #[cfg(feature = "ktls")]
    if let ktls::Mode::Offload(_) = mode {
        // A clone shares the master's certificate resolver, session cache and ticketer.
        let mut with_secrets = (*server_config).clone();
        with_secrets.enable_secret_extraction = true;
        return (std::sync::Arc::new(with_secrets), mode);
    }
    (server_config, mode)
}

type Runtime = monoio::FusionRuntime<
    monoio::time::TimeDriver<monoio::IoUringDriver>,
    monoio::time::TimeDriver<monoio::LegacyDriver>,
>;

/// The worker's runtime. Its ring has a single issuer and completions are run when the
/// worker asks for them (`DEFER_TASKRUN`, 6.1+): no inter-processor interrupt and no task
/// work interrupting the worker for each completion, which on a busy worker cost more than
/// the I/O itself. Older kernels refuse these flags: then the ring is built plain. Returns
/// whether the flags took.
fn build_runtime() -> Result<(Runtime, bool), String> {
    let tuned = {
        let mut ring = io_uring::IoUring::builder();
        ring.setup_single_issuer().setup_defer_taskrun();
        RuntimeBuilder::<FusionDriver>::new()
            .with_entries(RING_ENTRIES)
            .uring_builder(ring)
            .enable_timer()
            .build()
    };
    if let Ok(runtime) = tuned {
        return Ok((runtime, true));
    }
    RuntimeBuilder::<FusionDriver>::new()
        .with_entries(RING_ENTRIES)
        .enable_timer()
        .build()
        .map(|runtime| (runtime, false))
        .map_err(|e| format!("cannot build the runtime: {e}"))
}

fn pin_to_core(core: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(core).is_ok() {
        if let Err(e) = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set) {
            log::warn!("cannot pin to core {core}: {e}");
        }
    }
}

/// Keys that are validated but change nothing here: say so once, from worker 0.
fn log_inactive_keys(c: &Config, index: usize) {
    if index != 0 {
        return;
    }
    let defaults = crate::shared::config::RouteSecurity::default();
    let polling = c
        .host_routes
        .values()
        .chain(c.path_routes.values().flat_map(|p| p.values()))
        .any(|r| {
            let s = &r.security;
            s.websocket_poll_mode != defaults.websocket_poll_mode
                || s.websocket_poll_timeout_ms != defaults.websocket_poll_timeout_ms
                || s.websocket_poll_max_timeout_ms != defaults.websocket_poll_max_timeout_ms
                || s.websocket_poll_backoff_multiplier != defaults.websocket_poll_backoff_multiplier
        });
    if polling {
        log::warn!("websocket_poll_* keys have no effect: WebSocket tunnels are driven by I/O completions, with no polling to tune");
    }
}
