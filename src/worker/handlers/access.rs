//! Access checks of a route's `security` table, in the spec's order: IP (deny first), then
//! method, then the rate limit.

use crate::shared::config::RouteSecurity;
use crate::shared::shm::Region;
use crate::worker::http::respond::Response;
use ipnet::IpNet;
use std::net::IpAddr;

/// A list of networks from the config (`allowed_ips`, `denied_ips`).
#[derive(Default)]
pub struct IpList(Vec<IpNet>);

impl IpList {
    /// Validation refused every entry that does not parse.
    pub fn parse(list: &[String]) -> IpList {
        IpList(
            list.iter()
                .filter_map(|s| crate::shared::validate::parse_cidr(s))
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(&ip))
    }

    /// An empty allow-list allows everyone.
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.is_empty() || self.contains(ip)
    }
}

/// A route's access rules.
pub struct Access {
    /// The route's config key: the rate limiter keys by it, so limits survive reloads.
    key: String,
    allowed: IpList,
    denied: IpList,
    methods: Vec<String>,
    rate_per_min: u64,
}

impl Access {
    pub fn new(key: &str, sec: &RouteSecurity) -> Access {
        Access {
            key: key.to_string(),
            allowed: IpList::parse(&sec.allowed_ips),
            denied: IpList::parse(&sec.denied_ips),
            methods: sec.allowed_methods.clone(),
            rate_per_min: sec.rate_limit_requests_per_min,
        }
    }

    /// `None`: allowed. `now`: seconds since the epoch, the rate limit's clock (read only
    /// for a route with a rate limit).
    pub fn refuse(
        &self,
        method: &str,
        ip: IpAddr,
        region: &Region,
        now: impl FnOnce() -> u64,
    ) -> Option<Response> {
        if self.denied.contains(ip) || !self.allowed.allows(ip) {
            return Some(Response::error(403));
        }
        if !self.methods.is_empty() && !self.methods.iter().any(|m| m == method) {
            let mut r = Response::error(405);
            r.head.set("Allow", self.methods.join(", "));
            return Some(r);
        }
        if self.rate_per_min == 0 {
            return None;
        }
        let now = now();
        if !region
            .header
            .rate_admit(rate_key(&self.key, ip), now, self.rate_per_min)
        {
            let mut r = Response::error(429);
            r.head.set("Retry-After", (60 - now % 60).to_string());
            return Some(r);
        }
        None
    }
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The rate limiter's key: the route and the client. An IPv6 client is its /64: one host is
/// routinely given a whole /64, and keying by full address would give it 2^64 separate
/// limits.
fn rate_key(route: &str, ip: IpAddr) -> u64 {
    let client = match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets()[..8].to_vec(),
    };
    let bytes = route.bytes().chain([0u8]).chain(client);
    crate::shared::fnv1a(bytes) | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(route: &str, ip: &str) -> u64 {
        rate_key(route, ip.parse::<IpAddr>().unwrap())
    }

    use crate::shared::shm::test_region as region;

    fn status(r: Option<Response>) -> Option<u16> {
        r.map(|r| r.status())
    }

    #[test]
    fn ipv6_clients_share_a_rate_key_per_64_bit_prefix() {
        let a = key("r", "2001:db8:1:2::1");
        assert_eq!(a, key("r", "2001:db8:1:2:ffff:ffff:ffff:ffff"));
        assert_ne!(a, key("r", "2001:db8:1:3::1"), "another /64");
        assert_ne!(a, key("other", "2001:db8:1:2::1"), "another route");
        assert_ne!(key("r", "192.0.2.1"), key("r", "192.0.2.2"));
    }

    #[test]
    fn deny_wins_over_allow_then_methods_are_checked() {
        let sec = RouteSecurity {
            allowed_ips: vec!["10.0.0.0/8".into()],
            denied_ips: vec!["10.0.0.66/32".into()],
            allowed_methods: vec!["GET".into(), "HEAD".into()],
            ..RouteSecurity::default()
        };
        let access = Access::new("acl-test", &sec);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let now = unix_now();
        assert_eq!(
            status(access.refuse("GET", ip("10.1.2.3"), region(), || now)),
            None
        );
        assert_eq!(
            status(access.refuse("GET", ip("10.0.0.66"), region(), || now)),
            Some(403)
        );
        assert_eq!(
            status(access.refuse("GET", ip("192.0.2.1"), region(), || now)),
            Some(403)
        );
        let r = access
            .refuse("POST", ip("10.1.2.3"), region(), || now)
            .unwrap();
        assert_eq!(r.status(), 405);
        let allow = r.head.headers.iter().find(|(n, _)| n == "Allow");
        assert_eq!(allow.map(|(_, v)| v.as_slice()), Some(&b"GET, HEAD"[..]));
    }

    #[test]
    fn the_rate_limit_admits_its_count_per_minute_then_says_when_to_retry() {
        let sec = RouteSecurity {
            rate_limit_requests_per_min: 3,
            ..RouteSecurity::default()
        };
        let access = Access::new("rate-test-unique-route", &sec);
        let ip: IpAddr = "198.51.100.9".parse().unwrap();
        // The start of a minute, so that the window does not roll over mid-test.
        let now = unix_now() / 60 * 60 + 10;
        for _ in 0..3 {
            assert_eq!(status(access.refuse("GET", ip, region(), || now)), None);
        }
        let r = access.refuse("GET", ip, region(), || now).unwrap();
        assert_eq!(r.status(), 429);
        let retry = r.head.headers.iter().find(|(n, _)| n == "Retry-After");
        assert_eq!(retry.map(|(_, v)| v.as_slice()), Some(&b"50"[..]));
        let other: IpAddr = "198.51.100.10".parse().unwrap();
        assert_eq!(status(access.refuse("GET", other, region(), || now)), None);
    }
}
