//! The metrics endpoint (`[metrics]`): answered before routing on every host, to the addresses
//! that may read it.

use super::access::IpList;
use crate::shared::config::{backend_key, Config};
use crate::shared::metrics::UpstreamServerLabel;
use crate::shared::shm::Region;
use crate::worker::http::respond::{Body, Response};
use crate::worker::http::ResponseHead;
use bytes::Bytes;
use std::net::IpAddr;

pub struct MetricsRoute {
    pub path: String,
    /// Empty: everyone may read the metrics.
    allowed: IpList,
    /// Upstream servers of this generation's config, as the metrics name them.
    servers: Vec<UpstreamServerLabel>,
}

impl MetricsRoute {
    pub fn new(config: &Config, region: &Region) -> MetricsRoute {
        MetricsRoute {
            path: config.metrics.path.clone(),
            allowed: IpList::parse(&config.metrics.allowed_ips),
            servers: upstream_labels(config, region),
        }
    }

    /// `None`: `path` is not the metrics path, route as usual. For an address that may not
    /// read them, the plain 404 of an unknown path (no route takes the request over).
    pub fn answer(&self, region: &Region, path: &str, ip: IpAddr) -> Option<Response> {
        if path != self.path {
            return None;
        }
        if !self.allowed.allows(ip) {
            return Some(Response::error(404));
        }
        let text = crate::shared::metrics::render(region, &self.servers);
        let head = ResponseHead::new(200)
            .header("Content-Type", "text/plain; version=0.0.4; charset=utf-8");
        Some(Response::new(head, Body::Bytes(Bytes::from(text))))
    }
}

fn upstream_labels(c: &Config, region: &Region) -> Vec<UpstreamServerLabel> {
    let mut out = Vec::new();
    for (name, up) in &c.upstreams {
        for s in &up.servers {
            if let Some(index) = region.header.find_backend(&backend_key(name, s.url())) {
                out.push(UpstreamServerLabel {
                    upstream: name.clone(),
                    server: s.url().to_string(),
                    index,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::shared::shm::test_region as region;

    #[test]
    fn answers_only_its_path_and_only_to_allowed_addresses() {
        let mut config = Config::default();
        config.metrics.allowed_ips = vec!["127.0.0.0/8".into()];
        let m = MetricsRoute::new(&config, region());
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        let far: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(m.answer(region(), "/other", local).is_none());
        let r = m
            .answer(region(), &m.path, local)
            .expect("the metrics path");
        assert_eq!(r.status(), 200);
        match r.body {
            Body::Bytes(b) => assert!(String::from_utf8_lossy(&b).contains("# TYPE")),
            _ => panic!("a text body"),
        }
        let r = m.answer(region(), &m.path, far).expect("the metrics path");
        assert_eq!(r.status(), 404);
    }
}
