//! Generations of workers. A generation is one config and one worker per index. At most one is
//! `Starting` (forked, not yet serving), one is `Active`, any number are `Draining`. A new
//! generation is promoted only once every worker of it serves; only then is the previous one
//! told to drain (SIGQUIT), and past its deadline it is killed.

use super::listeners::ListenGroup;
use crate::shared::config::Config;
use crate::shared::shm::{Region, STATE_SERVING};
use crate::shared::{self, WorkerMain, WorkerStart};
use anyhow::{anyhow, bail, Result};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::Ordering::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a new generation may take to report that it serves: long enough for workers to
/// read large `memory` routes on a busy machine. Meanwhile the previous generation serves.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// A worker that exits with this code failed to start; respawning it would fail again.
pub const EXIT_STARTUP_FAILED: i32 = 2;
/// After SIGTERM, how long workers get before SIGKILL.
const TERMINATE_GRACE: Duration = Duration::from_secs(3);
/// A child that dies sooner than this after its fork, twice or more in a row, is crash-looping:
/// it is re-forked after a delay that doubles with each such death, from `BACKOFF_FIRST` up
/// to `BACKOFF_MAX`, so a crash loop cannot keep the master forking. A death after a longer
/// life resets the delay.
const QUICK_DEATH: Duration = Duration::from_secs(1);
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// What forking a worker needs, fixed for the master's life.
pub struct SpawnEnv {
    pub groups: Vec<ListenGroup>,
    pub region: &'static Region,
    pub worker_main: WorkerMain,
    pub health_main: WorkerMain,
    pub builtin: bool,
}

struct Worker {
    pid: Pid,
    /// `None` for the health checker.
    slot: Option<usize>,
    forked: Instant,
}

/// Crash-loop state of one worker index (or the health checker) of a generation.
#[derive(Clone, Copy, Default)]
struct Backoff {
    /// Deaths in a row, each within `QUICK_DEATH` of its fork.
    quick_deaths: u32,
    /// When the next child is forked, while it waits.
    respawn_at: Option<Instant>,
}

impl Backoff {
    /// Records a death after `lived`; returns how long to wait before re-forking.
    fn on_death(&mut self, lived: Duration) -> Duration {
        if lived >= QUICK_DEATH {
            self.quick_deaths = 0;
            return Duration::ZERO;
        }
        self.quick_deaths = self.quick_deaths.saturating_add(1);
        // One early death is re-forked at once, like any other: a loop is two in a row.
        let Some(doublings) = self.quick_deaths.checked_sub(2) else {
            return Duration::ZERO;
        };
        BACKOFF_FIRST
            .saturating_mul(1 << doublings.min(16))
            .min(BACKOFF_MAX)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Starting(Instant),
    Active,
    Draining(Instant),
}

struct Generation {
    id: u64,
    config: Arc<Config>,
    tls: Option<Arc<rustls::ServerConfig>>,
    /// Who its children run as (`shared::worker_identity`).
    identity: Option<(u32, u32)>,
    /// One entry per worker index; the health checker, if any, is the last entry.
    workers: Vec<Option<Worker>>,
    /// Same indices as `workers`.
    backoff: Vec<Backoff>,
    /// How many of `workers` are workers (the rest is the health checker).
    count: usize,
    state: State,
}

impl Generation {
    fn live(&self) -> impl Iterator<Item = &Worker> {
        self.workers.iter().flatten()
    }

    fn is_health(&self, index: usize) -> bool {
        index >= self.count
    }

    fn what(&self, index: usize) -> String {
        if self.is_health(index) {
            "health checker".to_string()
        } else {
            format!("worker {index}")
        }
    }

    /// Still has a child, or one waiting to be re-forked, or is the one that serves.
    fn keep(&self) -> bool {
        self.live().next().is_some()
            || self.state == State::Active
            || self.backoff.iter().any(|b| b.respawn_at.is_some())
    }

    /// Stops replacing children: what is left drains until `deadline`.
    fn set_draining(&mut self, deadline: Instant) {
        self.state = State::Draining(deadline);
        for b in &mut self.backoff {
            b.respawn_at = None;
        }
    }
}

pub struct Generations {
    env: SpawnEnv,
    list: Vec<Generation>,
    next_id: u64,
    /// Shutting down: workers that exit are not replaced.
    stopping: bool,
}

impl Generations {
    pub fn new(env: SpawnEnv) -> Self {
        Generations {
            env,
            list: Vec::new(),
            next_id: 1,
            stopping: false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn starting(&self) -> bool {
        self.list
            .iter()
            .any(|g| matches!(g.state, State::Starting(_)))
    }

    /// Forks a new generation with `config`; it is promoted by `advance` once it serves.
    pub fn start(&mut self, config: Arc<Config>) -> Result<()> {
        for host in config.host_routes.keys().chain(config.path_routes.keys()) {
            let name = host.to_ascii_lowercase();
            if host != "*" && self.env.region.header.register_host(&name).is_none() {
                log::warn!("host `{host}` is counted as `other` in metrics (host table full)");
            }
        }
        for (name, up) in &config.upstreams {
            for s in &up.servers {
                let key = crate::shared::config::backend_key(name, s.url());
                if self.env.region.header.register_backend(&key).is_none() {
                    log::warn!("upstream `{name}`: {} is not tracked in shared memory (table full); least_conn and health checks ignore it", s.url());
                }
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let count = self.env.groups[0].sockets.len();
        let health = config.upstreams.values().any(|u| u.health_check.is_some());
        // Keys are read here, by root, on every start and reload (certificates reload too).
        // Session tickets are sealed with the region's keys: any worker of any generation
        // opens them.
        let tls = match &config.tls {
            Some(t) => {
                let tickets = shared::tickets::SharedTicketer::new(
                    &self.env.region.header.tickets,
                    t.session_ticket_rotation_secs,
                );
                Some(
                    shared::tls::server_config(t, Some(Arc::new(tickets)))
                        .map_err(|(key, why)| anyhow!("`{key}`: {why}"))?,
                )
            }
            None => None,
        };
        let identity = shared::worker_identity(&config.security).map_err(|e| anyhow!(e))?;
        let mut generation = Generation {
            id,
            config,
            tls,
            identity,
            workers: (0..count + usize::from(health)).map(|_| None).collect(),
            backoff: vec![Backoff::default(); count + usize::from(health)],
            count,
            state: State::Starting(Instant::now()),
        };
        for index in 0..generation.workers.len() {
            let forked = if generation.is_health(index) {
                spawn_health(&self.env, &generation)
            } else {
                spawn(&self.env, &generation, index)
            };
            match forked {
                Ok(w) => generation.workers[index] = Some(w),
                Err(e) => {
                    self.list.push(generation);
                    self.abort_starting();
                    return Err(e);
                }
            }
        }
        log::info!(
            "generation {id}: {count} workers forked{}",
            if health { ", and a health checker" } else { "" }
        );
        self.list.push(generation);
        Ok(())
    }

    /// Collects exited workers; respawns those that died unexpectedly. Returns the other
    /// children that exited (a new master started by a binary upgrade).
    pub fn reap(&mut self) -> Vec<Pid> {
        let mut others = Vec::new();
        loop {
            let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return others,
                Ok(s) => s,
            };
            let (pid, how, code) = match status {
                WaitStatus::Exited(pid, code) => (pid, format!("exit code {code}"), Some(code)),
                WaitStatus::Signaled(pid, sig, _) => (pid, format!("signal {sig}"), None),
                _ => continue,
            };
            if self.find(pid).is_none() {
                others.push(pid);
            }
            self.on_exit(pid, &how, code);
        }
    }

    pub fn groups(&self) -> &[ListenGroup] {
        &self.env.groups
    }

    fn on_exit(&mut self, pid: Pid, how: &str, code: Option<i32>) {
        let Some((g, index)) = self.find(pid) else {
            return;
        };
        let generation = &mut self.list[g];
        let Some(worker) = generation.workers[index].take() else {
            return;
        };
        if let Some(slot) = worker.slot {
            self.env.region.release_slot(slot);
        }
        let id = generation.id;
        let what = generation.what(index);
        match generation.state {
            _ if self.stopping => log::info!("generation {id}: {what} (pid {pid}) done ({how})"),
            State::Draining(_) => log::info!("generation {id}: {what} (pid {pid}) done ({how})"),
            State::Starting(_) if code == Some(EXIT_STARTUP_FAILED) => {
                log::error!("generation {id}: {what} (pid {pid}) failed to start");
                self.abort_starting();
            }
            State::Active if code == Some(EXIT_STARTUP_FAILED) => {
                log::error!("generation {id}: {what} (pid {pid}) failed to start; not respawned")
            }
            State::Starting(_) | State::Active => {
                self.env.region.header.restarts.fetch_add(1, Relaxed);
                let lived = worker.forked.elapsed();
                let delay = generation.backoff[index].on_death(lived);
                if delay.is_zero() {
                    log::warn!("generation {id}: {what} (pid {pid}) died ({how}); respawning");
                    self.respawn(g, index);
                } else {
                    log::warn!(
                        "generation {id}: {what} (pid {pid}) died ({how}) {} ms after its start; respawning in {} ms",
                        lived.as_millis(),
                        delay.as_millis()
                    );
                    generation.backoff[index].respawn_at = Some(Instant::now() + delay);
                }
            }
        }
        if worker.slot.is_none() {
            self.clear_unwatched_backends();
        }
        self.list.retain(Generation::keep);
    }

    /// Forks a replacement for child `index` of generation `g`; if that fails, tries again
    /// later, as for a crash.
    fn respawn(&mut self, g: usize, index: usize) {
        let generation = &self.list[g];
        let forked = if generation.is_health(index) {
            spawn_health(&self.env, generation)
        } else {
            spawn(&self.env, generation, index)
        };
        let generation = &mut self.list[g];
        match forked {
            Ok(w) => generation.workers[index] = Some(w),
            Err(e) => {
                let delay = generation.backoff[index].on_death(Duration::ZERO);
                log::error!(
                    "generation {}: cannot respawn the {}: {e:#}; trying again in {} ms",
                    generation.id,
                    generation.what(index),
                    delay.as_millis()
                );
                generation.backoff[index].respawn_at = Some(Instant::now() + delay);
            }
        }
    }

    /// Forks the children whose backoff delay is over.
    fn respawn_due(&mut self, now: Instant) {
        for g in 0..self.list.len() {
            for index in 0..self.list[g].backoff.len() {
                let b = &mut self.list[g].backoff[index];
                if b.respawn_at.is_some_and(|t| t <= now) {
                    b.respawn_at = None;
                    if !self.stopping {
                        self.respawn(g, index);
                    }
                }
            }
        }
    }

    /// A health check that a reload removed must not leave its servers marked down: servers
    /// that the serving generation does not check are healthy. Called when a generation is
    /// promoted and when a health checker exits (after which it writes nothing more).
    fn clear_unwatched_backends(&self) {
        let Some(active) = self.list.iter().find(|g| g.state == State::Active) else {
            return;
        };
        let header = &self.env.region.header;
        for (name, up) in &active.config.upstreams {
            if up.health_check.is_some() {
                continue;
            }
            for s in &up.servers {
                let key = crate::shared::config::backend_key(name, s.url());
                if let Some(i) = header.find_backend(&key) {
                    header.backends[i].unhealthy.store(0, Relaxed);
                }
            }
        }
    }

    fn find(&self, pid: Pid) -> Option<(usize, usize)> {
        self.list.iter().enumerate().find_map(|(g, generation)| {
            generation
                .workers
                .iter()
                .position(|w| w.as_ref().is_some_and(|w| w.pid == pid))
                .map(|i| (g, i))
        })
    }

    /// Kills a generation that could not start; the active one, if any, keeps serving.
    fn abort_starting(&mut self) {
        let previous = self.list.iter().any(|g| g.state == State::Active);
        for g in self
            .list
            .iter_mut()
            .filter(|g| matches!(g.state, State::Starting(_)))
        {
            if previous {
                log::error!(
                    "generation {}: start aborted, the previous generation keeps serving",
                    g.id
                );
            } else {
                log::error!("generation {}: start aborted", g.id);
            }
            signal_all(g, Signal::SIGKILL);
            g.set_draining(Instant::now());
        }
    }

    /// Promotes a new generation that serves (draining the old), and kills overdue ones.
    /// `Ok(Some(id))`: generation `id` serves from this tick on.
    pub fn advance(&mut self, drain_timeout: Duration) -> Result<Option<u64>> {
        let now = Instant::now();
        self.respawn_due(now);
        let region = self.env.region;
        let mut result = Ok(None);
        if let Some(g) = self
            .list
            .iter()
            .position(|g| matches!(g.state, State::Starting(_)))
        {
            let generation = &self.list[g];
            let ready = generation.workers[..generation.count].iter().all(|w| {
                w.as_ref()
                    .and_then(|w| w.slot)
                    .is_some_and(|slot| region.slots[slot].state.load(Acquire) == STATE_SERVING)
            });
            if ready {
                let id = generation.id;
                for old in self.list.iter_mut().filter(|o| o.state == State::Active) {
                    log::info!(
                        "generation {}: draining (replaced by generation {id})",
                        old.id
                    );
                    old.set_draining(now + drain_timeout);
                    signal_all(old, Signal::SIGQUIT);
                }
                self.list[g].state = State::Active;
                log::info!("generation {id}: serving");
                self.clear_unwatched_backends();
                result = Ok(Some(id));
            } else if matches!(generation.state, State::Starting(t) if now.duration_since(t) > START_TIMEOUT)
            {
                result = Err(anyhow!(
                    "generation {}: workers did not start within {}s",
                    generation.id,
                    START_TIMEOUT.as_secs()
                ));
                self.abort_starting();
            }
        }
        for g in &mut self.list {
            if let State::Draining(deadline) = g.state {
                if now >= deadline && g.live().next().is_some() {
                    log::warn!("generation {}: drain timeout, killing what is left", g.id);
                    signal_all(g, Signal::SIGKILL);
                    g.state = State::Draining(now + Duration::from_secs(3600));
                }
            }
        }
        result
    }

    /// Sends `sig` to every child of every generation.
    pub fn signal_children(&self, sig: Signal) {
        for g in &self.list {
            signal_all(g, sig);
        }
    }

    /// Every generation drains: SIGQUIT (`last`: the master then exits) or WINCH (the master
    /// stays, and a reload starts workers again).
    pub fn drain_all(&mut self, timeout: Duration, last: bool) {
        self.stopping = last;
        let deadline = Instant::now() + timeout;
        for g in &mut self.list {
            if !matches!(g.state, State::Draining(_)) {
                signal_all(g, Signal::SIGQUIT);
                g.set_draining(deadline);
            }
        }
        self.list.retain(|g| g.live().next().is_some());
    }

    /// Fast stop: every worker closes at once. A worker reads TERM as "drain" unless it
    /// drains already, so it gets QUIT first (its handlers take pending signals lowest first,
    /// one at a time: QUIT, then TERM).
    pub fn terminate_all(&mut self) {
        self.stopping = true;
        for g in &self.list {
            signal_all(g, Signal::SIGQUIT);
            signal_all(g, Signal::SIGTERM);
        }
        let deadline = Instant::now() + TERMINATE_GRACE;
        while !self.list.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            self.reap();
            self.list.retain(|g| g.live().next().is_some());
        }
        for g in &self.list {
            signal_all(g, Signal::SIGKILL);
        }
        self.reap();
    }
}

fn signal_all(g: &Generation, sig: Signal) {
    for w in g.live() {
        let _ = kill(w.pid, sig);
    }
}

/// What a forked child is.
#[derive(Clone, Copy)]
enum Role {
    /// Worker `index`, with its shared-memory slot and socket `index` of each group.
    Worker { index: usize, slot: usize },
    /// The generation's health checker: no slot, no socket.
    Health,
}

/// Forks worker `index` of `generation`. The child never returns from here.
fn spawn(env: &SpawnEnv, generation: &Generation, index: usize) -> Result<Worker> {
    let Some(slot) = env.region.claim_slot(index, generation.id) else {
        bail!("no free shared-memory slot for a worker (too many draining generations)");
    };
    match fork_child(env, generation, Role::Worker { index, slot }) {
        Ok(pid) => {
            env.region.slots[slot]
                .owner_pid
                .store(i64::from(pid.as_raw()), Relaxed);
            Ok(Worker {
                pid,
                slot: Some(slot),
                forked: Instant::now(),
            })
        }
        Err(e) => {
            env.region.release_slot(slot);
            Err(e)
        }
    }
}

/// Forks the generation's health checker.
fn spawn_health(env: &SpawnEnv, generation: &Generation) -> Result<Worker> {
    let pid = fork_child(env, generation, Role::Health)?;
    Ok(Worker {
        pid,
        slot: None,
        forked: Instant::now(),
    })
}

fn fork_child(env: &SpawnEnv, generation: &Generation, role: Role) -> Result<Pid> {
    // SAFETY: the master is single-threaded (DESIGN: every thread starts after the fork, in
    // the process that uses it), so the child may run any code, not only async-signal-safe.
    match unsafe { fork() } {
        Err(e) => Err(anyhow!("fork: {e}")),
        Ok(ForkResult::Parent { child }) => Ok(child),
        Ok(ForkResult::Child) => {
            // The master's signal mask stays: a QUIT or USR1 sent while the child loads its
            // routes waits, pending, until its handlers are installed (`signals::install`
            // unblocks), rather than killing it with the default action.
            let (index, slot, main) = match role {
                Role::Worker { index, slot } => (Some(index), slot, env.worker_main),
                Role::Health => (None, usize::MAX, env.health_main),
            };
            // Keep only this worker's socket of each group. The master's copies of the other
            // structures are never dropped in the child (it never returns), so the raw fds
            // are closed here once and adopted once.
            let mut own = Vec::new();
            for g in &env.groups {
                for (i, s) in g.sockets.iter().enumerate() {
                    if Some(i) == index {
                        // SAFETY: adopted once; the master's `TcpListener` owning the same fd
                        // is never dropped in the child, which never returns.
                        own.push(unsafe { TcpListener::from_raw_fd(s.as_raw_fd()) });
                    } else {
                        let _ = nix::unistd::close(s.as_raw_fd());
                    }
                }
            }
            main(WorkerStart {
                index: index.unwrap_or(0),
                slot,
                config: generation.config.clone(),
                tls: generation.tls.clone(),
                builtin: env.builtin,
                listeners: own,
                shm: env.region,
                identity: generation.identity,
            })
        }
    }
}
