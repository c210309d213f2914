//! Records each answered request into this worker's own shared-memory slot.

use crate::shared::config::Config;
use crate::shared::metrics::method_index;
use crate::shared::shm::{self, Region, Slot, DURATION_BUCKETS, SIZE_BUCKETS};
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

pub struct Recorder {
    slot: &'static Slot,
    /// Configured host (lower-case) → its label index in the shared host table.
    hosts: HashMap<String, u16>,
}

pub struct Outcome<'a> {
    pub method: &'a str,
    pub host: &'a str,
    pub status: u16,
    pub duration: Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

impl Recorder {
    pub fn new(region: &'static Region, slot: &'static Slot, config: &Config) -> Recorder {
        let hosts = config
            .host_routes
            .keys()
            .chain(config.path_routes.keys())
            .filter_map(|h| {
                let h = h.to_ascii_lowercase();
                region.header.find_host(&h).map(|i| (h, i))
            })
            .collect();
        Recorder { slot, hosts }
    }

    pub fn record(&self, o: &Outcome) {
        let method = method_index(o.method);
        let host = self.hosts.get(o.host).copied().unwrap_or(0);
        let status = o.status.min(999);
        self.slot
            .count(shm::count_key(method, host, status))
            .fetch_add(1, Relaxed);
        let micros = o.duration.as_micros() as u64;
        self.slot.duration(shm::duration_key(method, host)).observe(
            &DURATION_BUCKETS,
            o.duration.as_secs_f64(),
            micros,
        );
        self.slot
            .request_sizes
            .observe(&SIZE_BUCKETS, o.request_bytes as f64, o.request_bytes);
        self.slot
            .response_sizes
            .observe(&SIZE_BUCKETS, o.response_bytes as f64, o.response_bytes);
        self.slot.requests.fetch_add(1, Relaxed);
    }
}
