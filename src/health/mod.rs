//! The health process: one per generation, forked by the master like a worker, unprivileged,
//! holding no listener. It checks every server of every upstream that has a `health_check`,
//! and writes each server's state into shared memory, where every worker reads it.
//!
//! Each server has its own task: check, then sleep `interval_secs`. A check is an HTTP(S)
//! `GET path` (with SNI for HTTPS) that must answer one of `healthy_statuses` within
//! `timeout_secs`. `unhealthy_threshold` failures in a row mark the server down,
//! `healthy_threshold` successes in a row mark it up again; each change is logged.

use crate::shared::config::{backend_key, HealthCheck};
use crate::shared::shm::Region;
use crate::shared::{self, WorkerStart};
use crate::worker::proxy::backend::{self, Target};
use crate::worker::proxy::relay;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::{FusionDriver, RuntimeBuilder};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

/// The health process entry point (`shared::WorkerMain`), called right after fork.
pub fn run(start: WorkerStart) -> ! {
    shared::log::set_role("health");
    let code = match serve(start) {
        Ok(()) => 0,
        Err(e) => {
            log::error!("{e}");
            shared::child::EXIT_STARTUP_FAILED
        }
    };
    shared::child::exit(code)
}

fn serve(start: WorkerStart) -> Result<(), String> {
    let mut runtime = RuntimeBuilder::<FusionDriver>::new()
        .with_entries(64)
        .enable_timer()
        .build()
        .map_err(|e| format!("cannot build the runtime: {e}"))?;
    let config = start.config.clone();
    let log_output = shared::log::open_output(&config.logging)
        .map_err(|e| format!("cannot open the log file: {e}"))?;
    shared::child::drop_privileges(&start)?;
    shared::log::start_async(&config.logging, log_output)?;
    let signals = crate::worker::signals::install()
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let mut checks = Vec::new();
    for (name, up) in &config.upstreams {
        let Some(hc) = &up.health_check else { continue };
        for s in &up.servers {
            let (url, sni) = (s.url(), s.sni_name());
            let Some(index) = start.shm.header.find_backend(&backend_key(name, url)) else {
                continue;
            };
            let target = Target::new(url, sni, up.ca_file.as_deref(), Some(index))
                .map_err(|e| format!("upstream `{name}`: {e}"))?;
            checks.push((name.clone(), Rc::new(target), hc.clone(), index));
        }
    }
    log::info!("checking {} servers", checks.len());
    log::logger().flush();
    let region = start.shm;
    runtime.block_on(async move {
        for (name, target, hc, index) in checks {
            monoio::spawn(watch(region, name, target, hc, index));
        }
        wait_for_stop(signals).await;
    });
    Ok(())
}

/// Returns on QUIT, TERM or INT: a health process has nothing to drain. USR1 reopens the log.
async fn wait_for_stop(signals: std::os::unix::net::UnixStream) {
    let Ok(mut signals) = monoio::net::UnixStream::from_std(signals) else {
        return;
    };
    loop {
        let (res, buf) = signals.read(vec![0u8; 16]).await;
        let n = match res {
            Ok(n) if n > 0 => n,
            _ => return,
        };
        if buf[..n].iter().any(|&s| i32::from(s) != libc::SIGUSR1) {
            return;
        }
        if let Err(e) = shared::log::reopen() {
            log::error!("cannot reopen the log file: {e}");
        }
    }
}

async fn watch(
    region: &'static Region,
    upstream: String,
    target: Rc<Target>,
    hc: HealthCheck,
    index: usize,
) {
    let state = &region.header.backends[index].unhealthy;
    let (mut successes, mut failures) = (0u32, 0u32);
    loop {
        let ok = check(&target, &hc).await;
        let unhealthy = state.load(Relaxed) != 0;
        if ok {
            failures = 0;
            successes += 1;
            if unhealthy && successes >= hc.healthy_threshold {
                state.store(0, Relaxed);
                log::info!(
                    "Upstream {} is now healthy (upstream `{upstream}`)",
                    target.label()
                );
            }
        } else {
            successes = 0;
            failures += 1;
            if !unhealthy && failures >= hc.unhealthy_threshold {
                state.store(1, Relaxed);
                log::info!(
                    "Upstream {} is now unhealthy (upstream `{upstream}`)",
                    target.label()
                );
            }
        }
        monoio::time::sleep(Duration::from_secs(hc.interval_secs)).await;
    }
}

async fn check(target: &Target, hc: &HealthCheck) -> bool {
    let timeout = Duration::from_secs(hc.timeout_secs);
    let probe = async {
        let mut conn = backend::connect(target, timeout).await.ok()?;
        let head = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: zerocopy-server health check\r\nConnection: close\r\n\r\n",
            hc.path,
            target.url.authority()
        );
        let (res, _) = conn.stream.write_all(head.into_bytes()).await;
        res.ok()?;
        relay::read_head(&mut conn).await.ok().map(|r| r.status)
    };
    match monoio::time::timeout(timeout, probe).await {
        Ok(Some(status)) => hc.healthy_statuses.contains(&status),
        _ => false,
    }
}
