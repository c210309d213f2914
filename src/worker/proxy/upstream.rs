//! Choosing a backend server: the route's single `url`, or a server of an upstream by
//! `round_robin`, `least_conn` (connections counted over all workers in shared memory) or
//! `ip_hash` (the same client address reaches the same server from any worker). Servers
//! that the health checker marks unhealthy are skipped; the others, in order, are the
//! candidates a request fails over through.

use super::backend::{Target, Targets};
use crate::shared::config::{backend_key, Algorithm, Config};
use crate::shared::shm::Region;
use std::cell::Cell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;

pub struct Upstream {
    pub name: String,
    pub algorithm: Algorithm,
    pub servers: Targets,
    next: Cell<usize>,
}

impl Upstream {
    pub fn new(name: String, algorithm: Algorithm, servers: Targets) -> Upstream {
        Upstream {
            name,
            algorithm,
            servers,
            next: Cell::new(0),
        }
    }

    /// Every upstream of the config, its servers resolved, to be shared by the routes that
    /// name it.
    pub fn build_all(
        config: &Config,
        region: &Region,
    ) -> Result<HashMap<String, Rc<Upstream>>, String> {
        let mut out = HashMap::new();
        for (name, up) in &config.upstreams {
            let mut servers = Vec::new();
            for s in &up.servers {
                let (url, sni) = (s.url(), s.sni_name());
                let backend = region.header.find_backend(&backend_key(name, url));
                let target = Target::new(url, sni, up.ca_file.as_deref(), backend)
                    .map_err(|e| format!("upstream `{name}`: {e}"))?;
                servers.push(Rc::new(target));
            }
            let upstream = Upstream::new(name.clone(), up.algorithm, servers);
            out.insert(name.clone(), Rc::new(upstream));
        }
        Ok(out)
    }

    /// The healthy servers in the order to try them; empty when none is healthy.
    pub fn candidates(&self, region: &Region, client: IpAddr) -> Vec<Rc<Target>> {
        let n = self.servers.len();
        let healthy = |t: &Target| {
            t.backend
                .is_none_or(|i| region.header.backends[i].unhealthy.load(Relaxed) == 0)
        };
        let start = match self.algorithm {
            Algorithm::IpHash => (hash_ip(client) % n as u64) as usize,
            _ => {
                let s = self.next.get();
                self.next.set(s.wrapping_add(1));
                s % n
            }
        };
        let mut order: Vec<Rc<Target>> = (0..n)
            .map(|k| self.servers[(start + k) % n].clone())
            .filter(|t| healthy(t))
            .collect();
        if self.algorithm == Algorithm::LeastConn {
            // Stable: among equals, the round-robin order above decides.
            let active = |t: &Target| {
                t.backend
                    .map_or(0, |i| region.header.backends[i].active.load(Relaxed))
            };
            order.sort_by_key(|t| active(t));
        }
        order
    }
}

/// Stable across processes and restarts. `client` is already normalized (IPv4-mapped
/// addresses as IPv4, `Client::ip`).
fn hash_ip(ip: IpAddr) -> u64 {
    crate::shared::fnv1a(crate::shared::ip_octets(ip))
}
