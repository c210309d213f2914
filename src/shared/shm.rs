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
//! * Writers: the masters alone write the header (restart counter, host and backend tables)
//!   and the slot bookkeeping (`owner_pid`, `worker_index`, `generation`). During a binary
//!   upgrade two masters share the region, so every claim is a compare-and-swap: a slot goes
//!   from `STATE_FREE` to `STATE_STARTING`, a table entry's length from 0 to `WRITING`. A
//!   worker writes only the counters of its own slot, with relaxed atomics: one writer per
//!   cache line, no locks.
//! * Readers: `/__metrics` in any worker sums every slot that was ever used. Slots are reused
//!   (a new worker takes a free slot of the same worker index) but never zeroed, so a counter
//!   summed over all slots never goes back — not on reload, crash or upgrade.
//! * The host and backend tables are append-only. An entry is claimed by swapping its length
//!   from 0 to `WRITING`, written, then published by storing its real length (`Release`) and
//!   raising the count; readers look only below the `Acquire`d count, at published entries.
//!   A master scans entries in order and waits for one being written, so two masters that
//!   register the same name concurrently find the same entry.
//! * Session-ticket keys (`TicketKeys`) are the one thing a master rewrites: a ring of entries,
//!   each behind a sequence lock. A master claims the entry of the next key by moving its
//!   sequence from even to odd (a compare-and-swap, so of two masters one writes), writes it,
//!   makes the sequence even again, and only then publishes the key's number in `current`.
//!   Readers copy an entry and keep the copy only if the sequence was the same even value
//!   before and after; they use only `current` and the key before it, never the entry being
//!   written (the ring has room for both and the next).

use std::cell::UnsafeCell;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::*};

pub const LAYOUT_VERSION: u64 = 7;
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
/// Entries looked at for one key; when all are taken, the least recently used is evicted.
const RATE_PROBES: usize = 16;
/// The length of a table entry that a master is writing (claimed, not yet published).
const WRITING: u64 = u64::MAX;
/// How long a master waits for an entry another master is writing (a few stores; only a
/// master killed mid-write leaves one behind, and it is then skipped).
const WRITING_WAIT: std::time::Duration = std::time::Duration::from_millis(100);
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
    /// TLS session-ticket keys, shared by every worker of every generation and master.
    pub tickets: TicketKeys,
    // --- Issue 10 metrics (layout 6): written by the masters only.
    /// Reloads (HUP) that put a new generation in service, over the server's life.
    pub reloads_ok: AtomicU64,
    /// Reloads that failed (bad configuration, or the new generation did not start).
    pub reloads_failed: AtomicU64,
    /// Seconds since the epoch of the last configuration that went into service (the first
    /// start counts, as Prometheus' own `config_last_reload_success_timestamp_seconds`).
    pub last_reload_success: AtomicU64,
}

/// Entries of the ticket-key ring: the current key, the previous one, the next one being
/// written, and one spare.
const TICKET_KEYS: usize = 4;
/// A key's name (sent in clear at the front of each ticket) and its AES-256 key.
pub const TICKET_NAME_LEN: usize = 16;
pub const TICKET_KEY_LEN: usize = 32;
const TICKET_WORDS: usize = (TICKET_NAME_LEN + TICKET_KEY_LEN) / 8;

/// The session-ticket keys (see the protocol at the top).
#[repr(C)]
pub struct TicketKeys {
    /// Number of the key that encrypts now; 0 until a master made the first one.
    current: AtomicU64,
    /// When the current key was made, in the unit of `rotate`'s `now` (the masters use
    /// milliseconds of `CLOCK_BOOTTIME`: the same clock in every process of the machine).
    made_at: AtomicU64,
    entries: [TicketKeyEntry; TICKET_KEYS],
}

#[repr(C)]
struct TicketKeyEntry {
    /// Odd while a master writes the entry.
    seq: AtomicU64,
    /// Which key the entry holds (its number), 0 for none.
    number: AtomicU64,
    /// Name, then key, as native-endian words.
    material: [AtomicU64; TICKET_WORDS],
}

/// A ticket key as read from the region.
#[derive(Clone, PartialEq, Eq)]
pub struct TicketKey {
    pub number: u64,
    pub name: [u8; TICKET_NAME_LEN],
    pub key: [u8; TICKET_KEY_LEN],
}

impl std::fmt::Debug for TicketKey {
    // Never the key itself: this may end up in a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TicketKey #{}", self.number)
    }
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
    /// TLS connections past their handshake, by `TlsMode`.
    pub tls_connections: [AtomicU64; TlsMode::ALL.len()],
    /// Access log lines this worker dropped because its writer was behind.
    pub access_log_dropped: AtomicU64,
    // --- Issue 10 metrics (layout 6): written by the slot's worker only.
    /// TLS handshakes by `TlsVersion` and result (`[version][0]` ok, `[version][1]` failed).
    pub tls_handshakes: [[AtomicU64; 2]; TlsVersion::ALL.len()],
    /// Backend response heads by backend-table index and status class (1xx..5xx).
    pub upstream_requests: [[AtomicU64; STATUS_CLASSES]; MAX_BACKENDS],
    /// Requests sent again after a backend closed before answering (a replay on a fresh
    /// connection, or a failover to the next server).
    pub upstream_retries: AtomicU64,
    // --- Issue 11 (layout 7): written by the slot's worker only.
    /// HTTP/2 streams that carried a request (`zerocopy_proxy_http2_streams_total`).
    pub http2_streams: AtomicU64,
}

/// 1xx..5xx: the `status_class` label of `zerocopy_proxy_upstream_requests_total`.
pub const STATUS_CLASSES: usize = 5;

/// The `version` label of `zerocopy_proxy_tls_handshakes_total`. A handshake that failed
/// before a version was agreed (a client that sent no or a bad ClientHello) is `unknown`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TlsVersion {
    V12 = 0,
    V13 = 1,
    Unknown = 2,
}

impl TlsVersion {
    pub const ALL: [TlsVersion; 3] = [TlsVersion::V12, TlsVersion::V13, TlsVersion::Unknown];

    pub fn label(self) -> &'static str {
        match self {
            TlsVersion::V12 => "1.2",
            TlsVersion::V13 => "1.3",
            TlsVersion::Unknown => "unknown",
        }
    }
}

/// Who processes a TLS connection's records: the `mode` label of
/// `zerocopy_proxy_tls_connections_total`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TlsMode {
    /// rustls, in the worker.
    Rustls = 0,
    /// The kernel (kTLS), after rustls' handshake.
    Ktls = 1,
}

impl TlsMode {
    pub const ALL: [TlsMode; 2] = [TlsMode::Rustls, TlsMode::Ktls];

    pub fn label(self) -> &'static str {
        match self {
            TlsMode::Rustls => "rustls",
            TlsMode::Ktls => "ktls",
        }
    }
}

impl Slot {
    pub fn count_tls_handshake(&self, version: TlsVersion, ok: bool) {
        self.tls_handshakes[version as usize][usize::from(!ok)].fetch_add(1, Relaxed);
    }

    /// Counts a backend's response head of `status` (anything outside 100..=599 is not
    /// counted: the relay refuses such a head).
    pub fn count_upstream_response(&self, backend: usize, status: u16) {
        let class = usize::from(status / 100);
        if let (Some(row), 1..=5) = (self.upstream_requests.get(backend), class) {
            row[class - 1].fetch_add(1, Relaxed);
        }
    }

    /// Counts a TLS connection whose handshake completed, in the mode it is served in.
    // Called from the TLS accept path once it is merged with the offload (issue 9, item 4).
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn count_tls_connection(&self, mode: TlsMode) {
        self.tls_connections[mode as usize].fetch_add(1, Relaxed);
    }
}

#[repr(C)]
pub struct Region {
    pub header: Header,
    pub slots: [Slot; MAX_SLOTS],
}

// SAFETY: every field is an atomic, except the host names, which follow the publish protocol
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
        use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
        let fd = memfd_create(c"zerocopy-shm", MemFdCreateFlag::MFD_CLOEXEC)?;
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
        // SAFETY: a shared mapping of our own memfd: its size was checked above and it is
        // never truncated; other processes change it only through the atomics of `Region`.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .len(std::mem::size_of::<Region>())
                .map_mut(&file)?
        };
        // The mapping lives as long as the process: leak it to get a 'static reference.
        let map = Box::leak(Box::new(map));
        // SAFETY: the mapping is page-aligned, at least `size_of::<Region>()` long, leaked (so
        // 'static), and all zeroes is a valid `Region` (atomics and byte arrays).
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
        published(&h.len, &h.bytes, HOST_NAME_LEN)
    }

    /// Label index of `name`, if it is in the table.
    pub fn find_host(&self, name: &str) -> Option<u16> {
        (1..=self.host_count())
            .find(|&i| self.host_name(i).as_deref() == Some(name))
            .map(|i| i as u16)
    }

    /// Adds `name` to the host table (masters only). `None` when the table is full or the name
    /// too long: such a host is counted as `other`.
    pub fn register_host(&self, name: &str) -> Option<u16> {
        if name.len() > HOST_NAME_LEN {
            return None;
        }
        let entries = self.hosts[..MAX_HOSTS - 1]
            .iter()
            .map(|h| (&h.len, &h.bytes));
        let i = register(entries, &self.host_count, name, HOST_NAME_LEN)?;
        Some(i as u16 + 1)
    }
}

impl Header {
    pub fn backend_key(&self, i: usize) -> Option<String> {
        if i >= self.backend_count.load(Acquire) as usize {
            return None;
        }
        let b = &self.backends[i];
        published(&b.key_len, &b.key, BACKEND_KEY_LEN)
    }

    pub fn find_backend(&self, key: &str) -> Option<usize> {
        let n = self.backend_count.load(Acquire) as usize;
        (0..n).find(|&i| self.backend_key(i).as_deref() == Some(key))
    }

    /// Adds a backend key (masters only); `None` when the table is full or the key too long.
    pub fn register_backend(&self, key: &str) -> Option<usize> {
        if key.len() > BACKEND_KEY_LEN {
            return None;
        }
        let entries = self.backends.iter().map(|b| (&b.key_len, &b.key));
        register(entries, &self.backend_count, key, BACKEND_KEY_LEN)
    }
}

/// The text of a published table entry; `None` while it is free or being written.
fn published<const N: usize>(
    len: &AtomicU64,
    bytes: &UnsafeCell<[u8; N]>,
    max: usize,
) -> Option<String> {
    let len = len.load(Acquire);
    if len == 0 || len > max as u64 {
        return None;
    }
    // SAFETY: a published entry (len set with Release after its bytes) is never written
    // again (see the protocol at the top).
    let bytes = unsafe { &*bytes.get() };
    Some(String::from_utf8_lossy(&bytes[..len as usize]).into_owned())
}

/// Finds `name` in an append-only table or claims the first free entry for it (see the
/// protocol at the top). Returns its index.
fn register<'a, const N: usize>(
    entries: impl Iterator<Item = (&'a AtomicU64, &'a UnsafeCell<[u8; N]>)>,
    count: &AtomicU64,
    name: &str,
    max: usize,
) -> Option<usize> {
    if name.is_empty() {
        return None;
    }
    for (i, (len, bytes)) in entries.enumerate() {
        if len.compare_exchange(0, WRITING, AcqRel, Acquire).is_ok() {
            // SAFETY: winning the 0 → WRITING exchange makes this process the entry's only
            // writer, and no reader looks at it until `len` is published below.
            unsafe { (&mut *bytes.get())[..name.len()].copy_from_slice(name.as_bytes()) };
            len.store(name.len() as u64, Release);
            count.fetch_max(i as u64 + 1, AcqRel);
            return Some(i);
        }
        let deadline = std::time::Instant::now() + WRITING_WAIT;
        while len.load(Acquire) == WRITING && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        if published(len, bytes, max).as_deref() == Some(name) {
            // Published by another master whose count update may still be on its way.
            count.fetch_max(i as u64 + 1, AcqRel);
            return Some(i);
        }
    }
    None
}

impl TicketKeys {
    /// The key to encrypt with; `None` before the first one is made.
    pub fn current(&self) -> Option<TicketKey> {
        let number = self.current.load(Acquire);
        self.read(number)
    }

    /// The current or the previous key whose name is `name`: a ticket made with any other key
    /// does not decrypt.
    pub fn named(&self, name: &[u8]) -> Option<TicketKey> {
        let number = self.current.load(Acquire);
        [number, number.saturating_sub(1)]
            .into_iter()
            .filter_map(|n| self.read(n))
            .find(|k| k.name[..] == *name)
    }

    /// Key `number`, if its entry holds it and is not being written.
    fn read(&self, number: u64) -> Option<TicketKey> {
        if number == 0 {
            return None;
        }
        let e = &self.entries[(number % TICKET_KEYS as u64) as usize];
        // A copy torn by a writer is retried; a master killed mid-write leaves the sequence
        // odd for good, and then this key is unreadable (no tickets until the next one).
        for _ in 0..16 {
            let before = e.seq.load(Acquire);
            if before % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let n = e.number.load(Relaxed);
            let words: [u64; TICKET_WORDS] = std::array::from_fn(|i| e.material[i].load(Relaxed));
            std::sync::atomic::fence(Acquire);
            if e.seq.load(Relaxed) != before {
                continue;
            }
            if n != number {
                return None;
            }
            let mut bytes = [0u8; TICKET_NAME_LEN + TICKET_KEY_LEN];
            for (chunk, w) in bytes.chunks_exact_mut(8).zip(words) {
                chunk.copy_from_slice(&w.to_ne_bytes());
            }
            let mut key = TicketKey {
                number,
                name: [0; TICKET_NAME_LEN],
                key: [0; TICKET_KEY_LEN],
            };
            key.name.copy_from_slice(&bytes[..TICKET_NAME_LEN]);
            key.key.copy_from_slice(&bytes[TICKET_NAME_LEN..]);
            return Some(key);
        }
        None
    }

    /// Makes the next key if there is none yet or the current one is `interval` old at `now`
    /// (masters only; both in one unit). `fresh` gives the new name and key (from the OS RNG). Returns the
    /// new key's number when this call made it: `None` when none was due, when another master
    /// got there first, or when `fresh` failed.
    pub fn rotate(
        &self,
        now: u64,
        interval: u64,
        fresh: impl FnOnce() -> Option<[u8; TICKET_NAME_LEN + TICKET_KEY_LEN]>,
    ) -> Option<u64> {
        let current = self.current.load(Acquire);
        let made_at = self.made_at.load(Acquire);
        if current != 0 && now.saturating_sub(made_at) < interval {
            return None;
        }
        let next = current + 1;
        let e = &self.entries[(next % TICKET_KEYS as u64) as usize];
        let seq = e.seq.load(Acquire);
        if seq % 2 == 1
            || e.seq
                .compare_exchange(seq, seq + 1, AcqRel, Acquire)
                .is_err()
        {
            return None;
        }
        // No reader that sees one of the words below may miss the odd sequence.
        std::sync::atomic::fence(Release);
        // This process alone writes the entry now; another master may have written key
        // `next` already, and then it stays.
        let made = e.number.load(Relaxed) < next;
        if made {
            match fresh() {
                Some(bytes) => {
                    for (w, chunk) in e.material.iter().zip(bytes.chunks_exact(8)) {
                        let mut word = [0u8; 8];
                        word.copy_from_slice(chunk);
                        w.store(u64::from_ne_bytes(word), Relaxed);
                    }
                    e.number.store(next, Relaxed);
                }
                None => {
                    e.seq.store(seq + 2, Release);
                    return None;
                }
            }
        }
        e.seq.store(seq + 2, Release);
        if !made {
            return None;
        }
        self.made_at.store(now, Release);
        self.current.fetch_max(next, AcqRel);
        Some(next)
    }
}

impl Header {
    /// Counts a request of `key` (a route and a client address, hashed; never 0) at `now`
    /// (seconds since the epoch) if the sliding-window rate stays within `limit` per minute.
    /// Every worker updates the same entries, so the limit holds over all of them. Returns
    /// whether the request may pass. A full table evicts its least recently used entry: it
    /// never fails open.
    pub fn rate_admit(&self, key: u64, now: u64, limit: u64) -> bool {
        let minute = now / 60;
        let Some(e) = self.rate_entry(key, minute) else {
            return false;
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

    /// The entry of `key`: its own, else a free or stale one (unused for two minutes), else
    /// the least recently used of those probed, evicted. A full table never lets a client
    /// through unlimited; `None` only if other processes keep winning the same entries.
    fn rate_entry(&self, key: u64, minute: u64) -> Option<&RateEntry> {
        let start = (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize % RATE_ENTRIES;
        let probed = || (0..RATE_PROBES).map(|p| &self.rates[(start + p) % RATE_ENTRIES]);
        for _attempt in 0..4 {
            let mut oldest: Option<(&RateEntry, u64, u64)> = None;
            for e in probed() {
                let k = e.key.load(Acquire);
                if k == key {
                    return Some(e);
                }
                let used = e.minute.load(Acquire);
                if k == 0 || used + 1 < minute {
                    if let Some(e) = Self::take_rate_entry(e, k, key, minute) {
                        return Some(e);
                    }
                    continue;
                }
                if oldest.is_none_or(|(_, _, m)| used < m) {
                    oldest = Some((e, k, used));
                }
            }
            if let Some((e, k, _)) = oldest {
                if let Some(e) = Self::take_rate_entry(e, k, key, minute) {
                    return Some(e);
                }
            }
        }
        None
    }

    /// Gives entry `e`, holding `old`, to `key`, with empty counts.
    fn take_rate_entry(e: &RateEntry, old: u64, key: u64, minute: u64) -> Option<&RateEntry> {
        e.key.compare_exchange(old, key, AcqRel, Acquire).ok()?;
        e.previous.store(0, Release);
        e.current.store(0, Release);
        e.minute.store(minute, Release);
        Some(e)
    }
}

impl Region {
    /// Picks a slot for a new worker of index `worker_index` (master only): a free slot that
    /// this index used before, else one never used. Counters in it are kept, not reset.
    pub fn claim_slot(&self, worker_index: usize, generation: u64) -> Option<usize> {
        let wi = worker_index as u64;
        let used_by = |s: &Slot, who: u64| s.worker_index.load(Acquire) == who;
        let free = |s: &Slot| s.state.load(Acquire) == STATE_FREE;
        let mut candidates = (0..MAX_SLOTS)
            .filter(|&i| used_by(&self.slots[i], wi))
            .chain((0..MAX_SLOTS).filter(|&i| used_by(&self.slots[i], NEVER_USED)));
        // Another master (binary upgrade) may claim the same slot at the same time: only the
        // one whose swap from FREE succeeds has it.
        let pick = candidates.find(|&i| {
            let s = &self.slots[i];
            free(s)
                && s.state
                    .compare_exchange(STATE_FREE, STATE_STARTING, AcqRel, Acquire)
                    .is_ok()
        })?;
        let s = &self.slots[pick];
        s.worker_index.store(wi, Release);
        s.generation.store(generation, Relaxed);
        s.owner_pid.store(0, Relaxed);
        s.connections.store(0, Relaxed);
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

/// One region for a test process, shared by every unit test that needs one.
#[cfg(test)]
pub fn test_region() -> &'static Region {
    static SHM: std::sync::OnceLock<Shm> = std::sync::OnceLock::new();
    SHM.get_or_init(|| Shm::create().expect("memfd")).region()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys whose entries all start probing at the same place as `first`'s.
    fn colliding_keys(n: usize) -> Vec<u64> {
        let start = |k: u64| (k.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize % RATE_ENTRIES;
        let target = start(1);
        (1..).filter(|&k| start(k) == target).take(n).collect()
    }

    #[test]
    fn a_full_rate_table_evicts_the_least_recently_used_entry_and_never_fails_open() {
        let shm = Shm::create().unwrap();
        let h = &shm.region().header;
        let keys = colliding_keys(RATE_PROBES + 1);
        let now = 100 * 60;
        // The first key is the oldest: last seen a minute before the others.
        assert!(h.rate_admit(keys[0], now - 60, 1));
        for &k in &keys[1..RATE_PROBES] {
            assert!(h.rate_admit(k, now, 1));
        }
        let newcomer = keys[RATE_PROBES];
        assert!(h.rate_admit(newcomer, now, 1), "gets an entry");
        assert!(
            !h.rate_admit(newcomer, now, 1),
            "and is limited: not failing open"
        );
        for &k in &keys[1..RATE_PROBES] {
            assert!(!h.rate_admit(k, now, 1), "recent entries are kept");
        }
        let taken = h.rates.iter().filter(|e| e.key.load(Relaxed) == keys[0]);
        assert_eq!(taken.count(), 0, "the oldest entry was the one evicted");
    }

    #[test]
    fn two_masters_claiming_slots_at_once_never_share_one() {
        let shm = Shm::create().unwrap();
        let region = shm.region();
        let claim = || {
            (0..MAX_SLOTS / 2)
                .filter_map(|i| region.claim_slot(i % 4, 1))
                .collect::<Vec<_>>()
        };
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(claim);
            let b = s.spawn(claim);
            (a.join().unwrap(), b.join().unwrap())
        });
        let mut all: Vec<usize> = a.iter().chain(&b).copied().collect();
        assert_eq!(all.len(), MAX_SLOTS, "every slot claimed once");
        all.sort();
        all.dedup();
        assert_eq!(all.len(), MAX_SLOTS, "a slot was claimed twice");
    }

    #[test]
    fn two_masters_registering_the_same_names_at_once_agree() {
        let shm = Shm::create().unwrap();
        let region = shm.region();
        let h = &region.header;
        let names: Vec<String> = (0..100).map(|i| format!("host{i}.test")).collect();
        let register = || {
            names
                .iter()
                .map(|n| {
                    (
                        region.header.register_host(n),
                        region.header.register_backend(n),
                    )
                })
                .collect::<Vec<_>>()
        };
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(register);
            let b = s.spawn(register);
            (a.join().unwrap(), b.join().unwrap())
        });
        assert_eq!(a, b, "both masters got the same indices");
        assert_eq!(h.host_count(), names.len());
        assert_eq!(h.backend_count.load(Relaxed) as usize, names.len());
        for (n, (host, backend)) in names.iter().zip(&a) {
            assert_eq!(
                h.host_name(usize::from(host.unwrap())).as_deref(),
                Some(n.as_str())
            );
            assert_eq!(h.backend_key(backend.unwrap()).as_deref(), Some(n.as_str()));
        }
    }
}
