//! What the master and the workers both use: the config schema and its validation, the
//! shared-memory layout, metric rendering, logging, and the hand-over from master to worker.

pub mod child;
pub mod config;
pub mod log;
pub mod metrics;
#[cfg(test)]
pub mod prop;
pub mod shm;
pub mod tickets;
pub mod tls;
pub mod url;
pub mod validate;

use config::Config;
use std::net::TcpListener;
use std::sync::Arc;

/// Everything a freshly forked worker receives from the master.
pub struct WorkerStart {
    /// Worker index within its generation: it serves socket `index` of every listen group.
    pub index: usize,
    /// Its slot in the shared-memory region.
    pub slot: usize,
    pub config: Arc<Config>,
    /// Whether `config` is the built-in default (no config file).
    pub builtin: bool,
    /// This worker's own socket of each listen group (`server.listen`, then `http_listen`).
    pub listeners: Vec<TcpListener>,
    pub shm: &'static shm::Region,
    /// TLS termination for `server.listen` (the first listener), when `[tls]` is set.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// uid and gid to switch to (`worker_identity`); `None`: the master is not root.
    pub identity: Option<(u32, u32)>,
}

/// The worker entry point, handed to the master by `main` so that `master` never depends on
/// `worker`. It never returns.
pub type WorkerMain = fn(WorkerStart) -> !;

/// uid and primary gid of `name`.
pub fn resolve_user(name: &str) -> Option<(u32, u32)> {
    let u = nix::unistd::User::from_name(name).ok().flatten()?;
    Some((u.uid.as_raw(), u.gid.as_raw()))
}

pub fn resolve_group(name: &str) -> Option<u32> {
    let g = nix::unistd::Group::from_name(name).ok().flatten()?;
    Some(g.gid.as_raw())
}

/// Who workers and health checkers run as when started as root without
/// `security.drop_privileges_user`: nginx's default.
pub const DEFAULT_WORKER_USER: &str = "nobody";

/// The uid and gid that workers and health checkers switch to. `None` when the master is not
/// root: it cannot switch (the spec: dropping privileges applies to a start as root), and
/// its children already run unprivileged. As root, the configured user, else `nobody`, so
/// that no process that parses client or backend bytes ever runs as root.
pub fn worker_identity(s: &config::GlobalSecurity) -> Result<Option<(u32, u32)>, String> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let name = s
        .drop_privileges_user
        .as_deref()
        .unwrap_or(DEFAULT_WORKER_USER);
    let (uid, primary) = resolve_user(name).ok_or_else(|| match &s.drop_privileges_user {
        Some(_) => format!("`security.drop_privileges_user`: unknown user `{name}`"),
        None => format!(
            "no `security.drop_privileges_user` and no user `{name}`: set one, workers never run as root"
        ),
    })?;
    if uid == 0 {
        return Err(format!(
            "`security.drop_privileges_user`: `{name}` is root; workers never run as root"
        ));
    }
    let gid = match s.drop_privileges_group.as_deref() {
        Some(g) => resolve_group(g)
            .ok_or_else(|| format!("`security.drop_privileges_group`: unknown group `{g}`"))?,
        None => primary,
    };
    Ok(Some((uid, gid)))
}

/// The configuration used when no config file is given and `./config.toml` does not exist:
/// plain HTTP on 127.0.0.1:8080 with a welcome page and `/__metrics`.
pub fn builtin_config() -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:8080".into();
    c
}

/// Number of online CPUs.
pub fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Workers per generation: `server.threads`, or one per core when 0.
pub fn worker_count(c: &Config) -> usize {
    if c.server.threads == 0 {
        cpu_count()
    } else {
        c.server.threads
    }
}

/// FNV-1a: a hash that is the same in every process and across restarts (balancing and
/// rate-limit keys in shared memory must agree between workers).
pub fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The octets of an address, as hashed for client keys.
pub fn ip_octets(ip: std::net::IpAddr) -> Vec<u8> {
    match ip {
        std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
        std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}
