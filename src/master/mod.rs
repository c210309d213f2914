//! The master: binds the listeners, owns the shared-memory region and the pid file, forks
//! generations of workers and supervises them. It never reads a client byte and never starts
//! a thread (it forks again on every reload and respawn).
//!
//! The cycle, like nginx's `ngx_master_process_cycle`: wait up to a tick for a signal, turn it
//! into a flag, then act on the flags — reap, shut down, reload — and advance the generations
//! (promote a new one once it serves, kill a draining one past its deadline).

mod generation;
mod listeners;
mod notify;
mod pidfile;
mod signals;
mod upgrade;

use crate::shared::config::{Balancing, Config};
use crate::shared::shm::Shm;
use crate::shared::{self, validate, WorkerMain};
use anyhow::{bail, Context, Result};
use generation::{Generations, SpawnEnv};
use nix::sys::signal::Signal;
use notify::Notifier;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

pub use pidfile::read as read_pid_file;
pub use signals::queue_fast_stop;

const TICK: Duration = Duration::from_millis(100);

/// Where the master's config comes from.
pub enum ConfigSource {
    File(PathBuf),
    Builtin,
}

impl ConfigSource {
    fn load(&self) -> Result<Config, Vec<validate::ConfigError>> {
        match self {
            ConfigSource::File(p) => validate::load_file(p),
            ConfigSource::Builtin => Ok(shared::builtin_config()),
        }
    }
}

#[derive(Default)]
struct Flags {
    upgrade: bool,
    winch: bool,
    reopen: bool,
    reload: bool,
    quit: bool,
    terminate: bool,
    reap: bool,
}

pub fn run(source: ConfigSource, worker_main: WorkerMain, health_main: WorkerMain) -> Result<()> {
    let config = match source.load() {
        Ok(c) => Arc::new(c),
        Err(errors) => {
            for e in &errors {
                eprintln!("error: {e}");
            }
            bail!("invalid configuration ({} error(s))", errors.len());
        }
    };
    shared::log::init_direct(&config.logging, "master").context("cannot open the log file")?;
    signals::block().context("cannot block signals")?;
    if matches!(source, ConfigSource::Builtin) {
        log::info!(
            "no config file: serving the built-in default on http://{}/ (welcome page and /__metrics)",
            config.server.listen
        );
    }
    let (shm, groups) = match upgrade::receive().context("binary upgrade")? {
        Some((shm, groups)) => {
            log::info!(
                "binary upgrade: took over {} listen groups and the shared memory",
                groups.len()
            );
            let configured =
                std::iter::once(&config.server.listen).chain(config.server.http_listen.as_ref());
            for (want, group) in configured.zip(&groups) {
                if want.parse::<SocketAddr>().ok() != Some(group.addr) {
                    log::warn!(
                        "binary upgrade: the config listens on {want}, the inherited socket on {}; \
                         the inherited one is kept (restart to change it)",
                        group.addr
                    );
                }
            }
            (shm, groups)
        }
        None => {
            let workers = shared::worker_count(&config);
            let shm = Shm::create().context("cannot create the shared-memory region")?;
            (shm, bind_listeners(&config, workers)?)
        }
    };
    let workers = groups[0].sockets.len();
    let pid_file = match &config.server.pid_file {
        Some(p) => Some(pidfile::PidFile::write(Path::new(p))?),
        None => None,
    };
    log_worker_identity(&config);
    log::info!(
        "master {} started: {} workers on {}",
        std::process::id(),
        workers,
        groups
            .iter()
            .map(|g| g.addr.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );

    let env = SpawnEnv {
        groups,
        region: shm.region(),
        worker_main,
        health_main,
        builtin: matches!(source, ConfigSource::Builtin),
    };
    let mut gens = Generations::new(env);
    rotate_ticket_keys(&shm, &config);
    // Before any worker answers a scrape: the first start is no reload, but its time is
    // the configuration's (a failed start ends the master anyway).
    config_in_service(&shm);
    gens.start(config.clone())
        .context("cannot start the first generation")?;
    let mut up = Upgrade {
        exe: std::env::current_exe().ok(),
        args: std::env::args_os().skip(1).collect(),
        shm,
        pid_file,
        child: None,
    };
    let mut notify = Notifier::from_env();
    let result = cycle(&source, config, &mut gens, &mut up, &mut notify);
    if let Some(p) = up.pid_file {
        p.remove();
    }
    log::info!("master {} exits", std::process::id());
    log::logger().flush();
    result
}

/// What a binary upgrade needs: the binary's path and arguments as started (the file on disk
/// may since be a new version), the region, the pid file, the new master once started.
struct Upgrade {
    exe: Option<std::path::PathBuf>,
    args: Vec<std::ffi::OsString>,
    shm: Shm,
    pid_file: Option<pidfile::PidFile>,
    child: Option<nix::unistd::Pid>,
}

fn cycle(
    source: &ConfigSource,
    mut config: Arc<Config>,
    gens: &mut Generations,
    up: &mut Upgrade,
    notify: &mut Notifier,
) -> Result<()> {
    let mut flags = Flags::default();
    let mut quitting = false;
    // systemd hears READY=1 once the first generation serves, then once per reload.
    let mut serving = false;
    let mut reloading = false;
    // After WINCH: no workers, on purpose, until a HUP.
    let mut parked = false;
    loop {
        // Take every pending signal before acting, so a burst becomes one set of flags.
        let mut timeout = TICK;
        while let Some(got) = signals::next(timeout) {
            timeout = Duration::ZERO;
            match got.signal {
                Signal::SIGHUP => flags.reload = true,
                // The spec: TERM and INT (Ctrl+C) are graceful, as QUIT; one while a graceful
                // stop is under way, or `-s stop`, makes it fast.
                Signal::SIGTERM | Signal::SIGINT if got.fast_stop || quitting || flags.quit => {
                    flags.terminate = true
                }
                Signal::SIGQUIT | Signal::SIGTERM | Signal::SIGINT => flags.quit = true,
                Signal::SIGCHLD => flags.reap = true,
                Signal::SIGUSR1 => flags.reopen = true,
                Signal::SIGUSR2 => flags.upgrade = true,
                Signal::SIGWINCH => flags.winch = true,
                other => log::warn!("{other} received: ignored"),
            }
        }

        rotate_ticket_keys(&up.shm, &config);
        if std::mem::take(&mut flags.reap) {
            for pid in gens.reap() {
                if up.child == Some(pid) {
                    up.child = None;
                    log::error!(
                        "binary upgrade: the new master (pid {pid}) exited; this master stays"
                    );
                    restore_pid_file(up, config.server.pid_file.as_deref());
                }
            }
        }
        if std::mem::take(&mut flags.upgrade) && !quitting {
            start_upgrade(up, gens, config.server.pid_file.as_deref());
        }
        if std::mem::take(&mut flags.winch) && !quitting {
            log::info!(
                "WINCH: draining this master's workers; the master stays (HUP starts them again)"
            );
            gens.drain_all(
                Duration::from_secs(config.server.shutdown_timeout_secs),
                false,
            );
            parked = true;
        }
        if std::mem::take(&mut flags.reopen) {
            reopen_logs(&config, gens);
        }
        let rotated = shared::log::rotate_full(&config.logging);
        if !rotated.is_empty() {
            for (from, to) in &rotated {
                log::info!("max_log_size: {from} renamed to {to}");
            }
            reopen_logs(&config, gens);
        }
        if (flags.terminate || flags.quit) && !quitting && up.child.is_none() {
            // After an upgrade this master stops, not the service: the new master is MAINPID.
            notify.stopping("stopping: draining the workers");
        }
        if flags.terminate {
            log::info!("fast shutdown");
            gens.terminate_all();
            return Ok(());
        }
        if std::mem::take(&mut flags.quit) && !quitting {
            log::info!(
                "graceful shutdown: draining every worker (TERM or INT again: stop at once)"
            );
            quitting = true;
            gens.drain_all(
                Duration::from_secs(config.server.shutdown_timeout_secs),
                true,
            );
        }
        if flags.reload && !quitting && !gens.starting() {
            flags.reload = false;
            notify.reloading();
            reloading = true;
            let started = reload(source, &config).and_then(|new| {
                rotate_ticket_keys(&up.shm, &new);
                gens.start(new.clone())
                    .map(|()| new)
                    .map_err(|e| format!("{e:#}"))
            });
            match started {
                Ok(new) => {
                    config = new;
                    parked = false;
                }
                Err(e) => {
                    log::error!("reload failed, the running generation keeps serving: {e}");
                    count_reload(&up.shm, false);
                    reloading = false;
                    notify.reloaded(&notify::one_line(&format!(
                        "reload failed, the running generation keeps serving: {e}"
                    )));
                }
            }
        }
        match gens.advance(Duration::from_secs(config.server.shutdown_timeout_secs)) {
            Ok(Some(id)) => {
                let status = format!("serving: generation {id}");
                if !serving {
                    serving = true;
                    notify.ready(&status);
                } else if std::mem::take(&mut reloading) {
                    count_reload(&up.shm, true);
                    notify.reloaded(&status);
                }
            }
            Ok(None) => {}
            Err(e) if gens.is_empty() => return Err(e),
            Err(e) => {
                log::error!("{e:#}");
                if std::mem::take(&mut reloading) {
                    count_reload(&up.shm, false);
                    notify.reloaded(&notify::one_line(&format!(
                        "reload failed, the running generation keeps serving: {e:#}"
                    )));
                }
            }
        }
        if quitting && gens.is_empty() {
            return Ok(());
        }
        if gens.is_empty() && !parked {
            // The first generation could not start: a master without workers serves nobody.
            bail!("no generation of workers is left to serve (see the errors above)");
        }
    }
}

/// `zerocopy_proxy_reloads_total` and, for a configuration that went into service, its
/// timestamp. In shared memory, so they survive a binary upgrade like every counter.
fn count_reload(shm: &Shm, ok: bool) {
    let h = &shm.region().header;
    if ok {
        h.reloads_ok.fetch_add(1, Relaxed);
        config_in_service(shm);
    } else {
        h.reloads_failed.fetch_add(1, Relaxed);
    }
}

fn config_in_service(shm: &Shm) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    shm.region().header.last_reload_success.store(now, Relaxed);
}

/// With `[tls]`: makes the first session-ticket key, or the next one when the current one is
/// due (two atomic loads when it is not).
fn rotate_ticket_keys(shm: &Shm, config: &Config) {
    if let Some(tls) = &config.tls {
        shared::tickets::rotate_if_due(
            &shm.region().header.tickets,
            tls.session_ticket_rotation_secs,
        );
    }
}

/// Re-reads and validates the config. `Err` (errors logged; the first one returned) keeps the
/// running generation.
fn reload(source: &ConfigSource, running: &Config) -> std::result::Result<Arc<Config>, String> {
    log::info!("SIGHUP: reloading the configuration");
    let mut new = match source.load() {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors {
                log::error!("reload: {e}");
            }
            log::error!(
                "reload aborted ({} error(s)): the running configuration keeps serving",
                errors.len()
            );
            let first = errors.first().map(|e| e.to_string()).unwrap_or_default();
            return Err(format!("{} config error(s): {first}", errors.len()));
        }
    };
    // Listeners and the worker count are fixed for the master's life (spec: restart needed).
    let fixed = [
        ("server.listen", running.server.listen != new.server.listen),
        (
            "server.http_listen",
            running.server.http_listen != new.server.http_listen,
        ),
        (
            "server.threads",
            running.server.threads != new.server.threads,
        ),
    ];
    for (key, changed) in fixed {
        if changed {
            log::warn!("reload: `{key}` changed; it takes effect only after a restart");
        }
    }
    new.server.listen = running.server.listen.clone();
    new.server.http_listen = running.server.http_listen.clone();
    new.server.threads = running.server.threads;
    if let Err(e) = shared::log::init_direct(&new.logging, "master") {
        log::error!("reload: cannot open the new log file, keeping the old one: {e}");
    }
    Ok(Arc::new(new))
}

fn bind_listeners(config: &Config, workers: usize) -> Result<Vec<listeners::ListenGroup>> {
    let mut addrs: Vec<SocketAddr> = vec![config.server.listen.parse()?];
    if let Some(http) = &config.server.http_listen {
        addrs.push(http.parse()?);
    }
    let mut groups = Vec::new();
    for addr in addrs {
        let group = listeners::bind_group(addr, workers)?;
        if config.performance.reuseport_balancing == Balancing::Cbpf {
            match listeners::attach_cbpf(&group) {
                Ok(()) => log::info!("{addr}: client-IP steering (cbpf) over {workers} workers"),
                Err(e) => log::warn!(
                    "{addr}: cannot attach the cbpf steering program ({e}); using the kernel's hash"
                ),
            }
        }
        groups.push(group);
    }
    Ok(groups)
}

/// USR1 (logrotate): the master reopens the log file, hands it to the workers' user (who
/// cannot create files where root keeps logs), then tells every child to reopen it too.
fn reopen_logs(config: &Config, gens: &Generations) {
    let owner = shared::worker_identity(&config.security).unwrap_or_else(|e| {
        log::warn!("USR1: the log file stays root's: {e}");
        None
    });
    if let Err(e) = shared::log::init_direct_owned(&config.logging, "master", owner) {
        log::error!("USR1: cannot reopen the log file: {e}");
        return;
    }
    log::info!("USR1: log file reopened; workers reopen theirs");
    gens.signal_children(Signal::SIGUSR1);
}

/// Says once, at start, who the workers run as when the config does not say it.
fn log_worker_identity(config: &Config) {
    let user = config.security.drop_privileges_user.as_deref();
    match (shared::worker_identity(&config.security), user) {
        (Ok(Some((uid, gid))), None) => log::info!(
            "no `security.drop_privileges_user`: workers and health checkers run as `{}` (uid {uid}, gid {gid})",
            shared::DEFAULT_WORKER_USER
        ),
        (Ok(None), Some(user)) => log::warn!(
            "`security.drop_privileges_user = \"{user}\"` has no effect: not started as root"
        ),
        _ => {}
    }
}

/// USR2: start the binary on disk as a new master that takes the listeners and the region.
fn start_upgrade(up: &mut Upgrade, gens: &Generations, pid_path: Option<&str>) {
    if let Some(pid) = up.child {
        log::warn!("USR2: a new master (pid {pid}) is already running");
        return;
    }
    let Some(exe) = up.exe.clone() else {
        log::error!("USR2: the path of this binary is unknown; no upgrade");
        return;
    };
    if let Some(p) = up.pid_file.as_mut() {
        p.rename_oldbin();
    }
    match upgrade::spawn_new_master(&exe, &up.args, &up.shm, gens.groups()) {
        Ok(pid) => {
            log::info!("USR2: new master {pid} started from {}; WINCH then QUIT this one ({}) when it serves", exe.display(), std::process::id());
            up.child = Some(pid);
        }
        Err(e) => {
            log::error!("USR2: binary upgrade failed, this master keeps serving: {e:#}");
            restore_pid_file(up, pid_path);
        }
    }
}

/// The upgrade is over without a new master: `.oldbin` takes back the plain name.
fn restore_pid_file(up: &mut Upgrade, pid_path: Option<&str>) {
    if let (Some(p), Some(path)) = (up.pid_file.as_mut(), pid_path) {
        p.restore_name(Path::new(path));
    }
}
