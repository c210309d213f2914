//! The shared-memory region: what every process of the server must agree on.
//!
//! Protocol
//! --------
//! * The first master creates one memfd of `size_of::<Region>()` bytes, maps it shared and
//!   keeps the fd for its whole life (a binary upgrade hands the fd on). Workers inherit the
//!   mapping across `fork`; nothing is ever copied or serialised.
//! * `Region` is `repr(C)` and made only of atomics and write-once byte arrays, so the same
//!   memory is valid in every process. `Header::layout` holds `LAYOUT_VERSION`; a process that
//!   finds another value refuses the region.
//! * Writers: the master alone writes the header (restart counter, host table) and the slot
//!   bookkeeping (`owner_pid`, `worker_index`, `generation`). A worker writes only the
//!   counters of its own slot, with relaxed atomics: one writer per cache line, no locks.
//! * Readers: `/__metrics` in any worker sums every slot that was ever used. Slots are reused
//!   (a new worker takes a free slot of the same worker index) but never zeroed, so a counter
//!   summed over all slots never goes back — not on reload, crash or upgrade.
//! * The host table is append-only: host names are written before `host_count` is published
//!   with `Release`, and read only below the `Acquire`d count.

use std::cell::UnsafeCell;
use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::*};

pub const LAYOUT_VERSION: u64 = 2;
const MAGIC: u64 = 0x7a65_726f_636f_7079; // "zerocopy"

pub const MAX_SLOTS: usize = 256;
/// Host label 0 is `other`; configured hosts take 1..MAX_HOSTS.
pub const MAX_HOSTS: usize = 256;
pub const HOST_NAME_LEN: usize = 120;
const REQ_ENTRIES: usize = 1024;
/// Servers of all upstreams, over the server's life (append-only, like the host table).
pub const MAX_BACKENDS: usize = 256;
pub const BACKEND_KEY_LEN: usize = 248;
const RATE_ENTRIES: usize = 16 * 1024;
/// Entries looked at for one key before the limiter gives up (and lets the request pass).
const RATE_PROBES: usize = 16;
const DUR_ENTRIES: usize = 256;

/// Request-duration buckets, seconds (Prometheus' defaults).
pub const DURATION_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Body-size buckets, bytes.
pub const SIZE_BUCKETS: [f64; 11] = [
    64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0,
    67108864.0,
];
pub const NB: usize = 11;

pub const STATE_FREE: u64 = 0;
pub const STATE_STARTING: u64 = 1;
pub const STATE_SERVING: u64 = 2;
pub const STATE_DRAINING: u64 = 3;

/// Key of an entry that could not get a table entry of its own (table full).
pub const OVERFLOW_KEY: u64 = u64::MAX;
const NEVER_USED: u64 = u64::MAX;

#[repr(C)]
pub struct HostName {
    len: AtomicU64,
    bytes: UnsafeCell<[u8; HOST_NAME_LEN]>,
}

#[repr(C)]
pub struct Header {
    magic: AtomicU64,
    layout: AtomicU64,
    /// Workers re-forked after an unexpected death, over the server's life.
    pub restarts: AtomicU64,
    host_count: AtomicU64,
    hosts: [HostName; MAX_HOSTS],
    backend_count: AtomicU64,
    pub backends: [Backend; MAX_BACKENDS],
    /// Client connections open now, over all workers (`max_concurrent_connections`).
    pub connections: AtomicI64,
    /// Sliding-window request counts per (route, client address), for rate limits.
    rates: [RateEntry; RATE_ENTRIES],
}

/// One (route, client) of the rate limiter: this minute's count and the previous minute's.
#[repr(C)]
struct RateEntry {
    key: AtomicU64,
    /// Minutes since the epoch of `current`.
    minute: AtomicU64,
    previous: AtomicU64,
    current: AtomicU64,
}

/// One server of an upstream, keyed `upstream|url`.
#[repr(C)]
pub struct Backend {
    key_len: AtomicU64,
    key: UnsafeCell<[u8; BACKEND_KEY_LEN]>,
    /// Written by the health process; 1 until a health check says otherwise.
    pub unhealthy: AtomicU64,
    /// Connections to it in use now, over all workers (least_conn).
    pub active: AtomicI64,
    /// Connection attempts that failed (refused, timed out), over all workers.
    pub failures: AtomicU64,
}

/// A histogram: per-bucket counts (not cumulative), count and sum in integer units
/// (microseconds or bytes) so concurrent readers see exact, monotonic values.
#[repr(C)]
pub struct Hist {
    pub count: AtomicU64,
    pub sum: AtomicU64,
    pub buckets: [AtomicU64; NB],
}

#[repr(C)]
pub struct CountEntry {
    pub key: AtomicU64,
    pub value: AtomicU64,
}

#[repr(C)]
pub struct HistEntry {
    pub key: AtomicU64,
    pub hist: Hist,
}

#[repr(C, align(64))]
pub struct Slot {
    pub owner_pid: AtomicI64,
    pub worker_index: AtomicU64,
    pub state: AtomicU64,
    pub generation: AtomicU64,
    pub requests: AtomicU64,
    /// Open client connections of this worker; zeroed by the master when the worker dies.
    pub connections: AtomicI64,
    /// This worker's share of each backend's `active`: what the master takes back from the
    /// totals when the worker dies, so that a crash leaks no connection count.
    pub backend_active: [AtomicI64; MAX_BACKENDS],
    pub req_counts: [CountEntry; REQ_ENTRIES],
    pub durations: [HistEntry; DUR_ENTRIES],
    pub request_sizes: Hist,
    pub response_sizes: Hist,
}

#[repr(C)]
pub struct Region {
    pub header: Header,
    pub slots: [Slot; MAX_SLOTS],
}

// Safety: every field is an atomic, except the host names, which follow the publish protocol
// described at the top of this file.
unsafe impl Sync for Region {}

/// The mapping and the memfd behind it.
pub struct Shm {
    region: &'static Region,
    /// Kept open for the master's life: the region is handed on by fd.
    _fd: OwnedFd,
}

impl Shm {
    /// Creates a fresh, zeroed region (the first master).
    pub fn create() -> std::io::Result<Shm> {
        let raw = unsafe { libc::memfd_create(c"zerocopy-shm".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let file = File::from(fd.try_clone()?);
        file.set_len(std::mem::size_of::<Region>() as u64)?;
        let shm = Self::map(fd)?;
        shm.region.header.magic.store(MAGIC, Relaxed);
        shm.region.header.layout.store(LAYOUT_VERSION, Relaxed);
        for slot in &shm.region.slots {
            slot.worker_index.store(NEVER_USED, Relaxed);
        }
        Ok(shm)
    }

    /// Maps a region handed over by a previous master (binary upgrade).
    pub fn open(fd: OwnedFd) -> std::io::Result<Shm> {
        let shm = Self::map(fd)?;
        let h = &shm.region.header;
        if h.magic.load(Relaxed) != MAGIC || h.layout.load(Relaxed) != LAYOUT_VERSION {
            return Err(std::io::Error::other(
                "the shared-memory region has another layout version",
            ));
        }
        Ok(shm)
    }

    /// The memfd, to hand the region on.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self._fd.as_raw_fd()
    }

    fn map(fd: OwnedFd) -> std::io::Result<Shm> {
        let file = File::from(fd.try_clone()?);
        if file.metadata()?.len() < std::mem::size_of::<Region>() as u64 {
            return Err(std::io::Error::other("shared memory region is too small"));
        }
        let map = unsafe {
            memmap2::MmapOptions::new()
                .len(std::mem::size_of::<Region>())
                .map_mut(&file)?
        };
        // The mapping lives as long as the process: leak it to get a 'static reference.
        let map = Box::leak(Box::new(map));
        let region = unsafe { &*(map.as_ptr() as *const Region) };
        Ok(Shm { region, _fd: fd })
    }

    pub fn region(&self) -> &'static Region {
        self.region
    }
}

impl Header {
    pub fn host_count(&self) -> usize {
        self.host_count.load(Acquire) as usize
    }

    /// Host name of label index `i` (1-based; 0 is `other`).
    pub fn host_name(&self, i: usize) -> Option<String> {
        if i == 0 || i > self.host_count() {
            return None;
        }
        let h = &self.hosts[i - 1];
        let len = h.len.load(Acquire) as usize;
        let bytes = unsafe { &*h.bytes.get() };
        Some(String::from_utf8_lossy(&bytes[..len.min(HOST_NAME_LEN)]).into_owned())
    }

    /// Label index of `name`, if it is in the table.
    pub fn find_host(&self, name: &str) -> Option<u16> {
        (1..=self.host_count())
            .find(|&i| self.host_name(i).as_deref() == Some(name))
            .map(|i| i as u16)
    }

    /// Adds `name` to the host table (master only). `None` when the table is full or the name
    /// too long: such a host is counted as `other`.
    pub fn register_host(&self, name: &str) -> Option<u16> {
        if let Some(i) = self.find_host(name) {
            return Some(i);
        }
        let n = self.host_count();
        if n >= MAX_HOSTS - 1 || name.len() > HOST_NAME_LEN {
            return None;
        }
        let h = &self.hosts[n];
        unsafe { (&mut *h.bytes.get())[..name.len()].copy_from_slice(name.as_bytes()) };
        h.len.store(name.len() as u64, Release);
        self.host_count.store(n as u64 + 1, Release);
        Some(n as u16 + 1)
    }
}

impl Header {
    pub fn backend_key(&self, i: usize) -> Option<String> {
        if i >= self.backend_count.load(Acquire) as usize {
            return None;
        }
        let b = &self.backends[i];
        let len = b.key_len.load(Acquire) as usize;
        let bytes = unsafe { &*b.key.get() };
        Some(String::from_utf8_lossy(&bytes[..len.min(BACKEND_KEY_LEN)]).into_owned())
    }

    pub fn find_backend(&self, key: &str) -> Option<usize> {
        let n = self.backend_count.load(Acquire) as usize;
        (0..n).find(|&i| self.backend_key(i).as_deref() == Some(key))
    }

    /// Adds a backend key (master only); `None` when the table is full or the key too long.
    pub fn register_backend(&self, key: &str) -> Option<usize> {
        if let Some(i) = self.find_backend(key) {
            return Some(i);
        }
        let n = self.backend_count.load(Acquire) as usize;
        if n >= MAX_BACKENDS || key.len() > BACKEND_KEY_LEN {
            return None;
        }
        let b = &self.backends[n];
        unsafe { (&mut *b.key.get())[..key.len()].copy_from_slice(key.as_bytes()) };
        b.key_len.store(key.len() as u64, Release);
        self.backend_count.store(n as u64 + 1, Release);
        Some(n)
    }
}

impl Header {
    /// Counts a request of `key` (a route and a client address, hashed; never 0) at `now`
    /// (seconds since the epoch) if the sliding-window rate stays within `limit` per minute.
    /// Every worker updates the same entries, so the limit holds over all of them. Returns
    /// whether the request may pass; when the table has no room, it passes.
    pub fn rate_admit(&self, key: u64, now: u64, limit: u64) -> bool {
        let minute = now / 60;
        let Some(e) = self.rate_entry(key, minute) else {
            return true;
        };
        let seen = e.minute.load(Acquire);
        if seen != minute
            && e.minute
                .compare_exchange(seen, minute, AcqRel, Acquire)
                .is_ok()
        {
            // The first request of a new minute turns `current` into `previous`.
            let last = e.current.swap(0, AcqRel);
            e.previous
                .store(if seen + 1 == minute { last } else { 0 }, Release);
        }
        let count = e.current.fetch_add(1, AcqRel) + 1;
        let weight = 1.0 - (now % 60) as f64 / 60.0;
        let estimate = e.previous.load(Acquire) as f64 * weight + count as f64;
        if estimate > limit as f64 {
            // A refused request does not count against the client.
            e.current.fetch_sub(1, AcqRel);
            return false;
        }
        true
    }

    /// The entry of `key`, claiming a free or stale one (unused for two minutes).
    fn rate_entry(&self, key: u64, minute: u64) -> Option<&RateEntry> {
        let start = (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize % RATE_ENTRIES;
        for probe in 0..RATE_PROBES {
            let e = &self.rates[(start + probe) % RATE_ENTRIES];
            let k = e.key.load(Acquire);
            if k == key {
                return Some(e);
            }
            let stale = e.minute.load(Acquire) + 1 < minute;
            if (k == 0 || stale) && e.key.compare_exchange(k, key, AcqRel, Acquire).is_ok() {
                e.previous.store(0, Release);
                e.current.store(0, Release);
                e.minute.store(minute, Release);
                return Some(e);
            }
        }
        None
    }
}

impl Region {
    /// Picks a slot for a new worker of index `worker_index` (master only): a free slot that
    /// this index used before, else one never used. Counters in it are kept, not reset.
    pub fn claim_slot(&self, worker_index: usize, generation: u64) -> Option<usize> {
        let wi = worker_index as u64;
        let free = |s: &Slot| s.state.load(Acquire) == STATE_FREE;
        let pick = self
            .slots
            .iter()
            .position(|s| free(s) && s.worker_index.load(Relaxed) == wi)
            .or_else(|| {
                self.slots
                    .iter()
                    .position(|s| free(s) && s.worker_index.load(Relaxed) == NEVER_USED)
            })?;
        let s = &self.slots[pick];
        s.worker_index.store(wi, Relaxed);
        s.generation.store(generation, Relaxed);
        s.owner_pid.store(0, Relaxed);
        s.connections.store(0, Relaxed);
        s.state.store(STATE_STARTING, Release);
        Some(pick)
    }

    /// Returns a dead worker's slot to the pool (master only).
    pub fn release_slot(&self, slot: usize) {
        let s = &self.slots[slot];
        for (i, own) in s.backend_active.iter().enumerate() {
            let n = own.swap(0, Relaxed);
            if n != 0 {
                self.header.backends[i].active.fetch_sub(n, Relaxed);
            }
        }
        // A dead worker's connections are gone: take them out of the total.
        let open = s.connections.swap(0, Relaxed);
        self.header.connections.fetch_sub(open, Relaxed);
        s.owner_pid.store(0, Relaxed);
        s.state.store(STATE_FREE, Release);
    }

    /// Every slot that has ever been used: the ones whose counters must be summed.
    pub fn used_slots(&self) -> impl Iterator<Item = &Slot> {
        self.slots
            .iter()
            .filter(|s| s.worker_index.load(Relaxed) != NEVER_USED)
    }
}

impl Hist {
    pub fn observe(&self, buckets: &[f64; NB], value: f64, units: u64) {
        if let Some(i) = buckets.iter().position(|b| value <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.sum.fetch_add(units, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }
}

impl Slot {
    /// The request counter for `key` (method, host, status), claiming an entry on first use.
    /// Only the slot's own worker calls this, so claiming needs no compare-and-swap.
    pub fn count(&self, key: u64) -> &AtomicU64 {
        &self.req_counts[find_entry(&self.req_counts, key, |e| &e.key)].value
    }

    pub fn duration(&self, key: u64) -> &Hist {
        &self.durations[find_entry(&self.durations, key, |e| &e.key)].hist
    }
}

/// Open addressing with linear probing; the last entry is reserved for overflow.
fn find_entry<E>(table: &[E], key: u64, key_of: impl Fn(&E) -> &AtomicU64) -> usize {
    let usable = table.len() - 1;
    let start = (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as usize % usable;
    for probe in 0..usable {
        let i = (start + probe) % usable;
        let k = key_of(&table[i]).load(Acquire);
        if k == key {
            return i;
        }
        if k == 0 {
            key_of(&table[i]).store(key, Release);
            return i;
        }
    }
    key_of(&table[usable]).store(OVERFLOW_KEY, Release);
    usable
}

/// Label key of a request counter: method index, host index, status code.
pub fn count_key(method: u8, host: u16, status: u16) -> u64 {
    (1 << 48) | (u64::from(method) << 32) | (u64::from(host) << 16) | u64::from(status)
}

pub fn duration_key(method: u8, host: u16) -> u64 {
    (1 << 48) | (u64::from(method) << 32) | (u64::from(host) << 16)
}

/// (method, host, status) of a label key.
pub fn split_key(key: u64) -> (u8, u16, u16) {
    (
        ((key >> 32) & 0xff) as u8,
        ((key >> 16) & 0xffff) as u16,
        (key & 0xffff) as u16,
    )
}
