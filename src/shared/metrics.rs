//! Metric labels and the Prometheus text rendering of the shared-memory counters.
//!
//! Workers record into their own slot (`shm.rs`); any worker renders `/__metrics` by summing
//! every slot ever used. Labels are bounded: methods are a fixed set plus `OTHER`, hosts the
//! configured ones plus `other`, statuses three digits.

use super::shm::{
    self, Hist, Region, TlsMode, TlsVersion, DURATION_BUCKETS, NB, OVERFLOW_KEY, SIZE_BUCKETS,
    STATE_FREE, STATUS_CLASSES,
};
use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType,
};
use prometheus::{Encoder, TextEncoder};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering::*;

pub const METHODS: [&str; 10] = [
    "OTHER", "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
];

pub fn method_index(method: &str) -> u8 {
    METHODS
        .iter()
        .skip(1)
        .position(|m| *m == method)
        .map_or(0, |i| i as u8 + 1)
}

fn label(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.to_string());
    l.set_value(value.to_string());
    l
}

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_string());
    f.set_help(help.to_string());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

fn counter(labels: Vec<LabelPair>, value: u64) -> Metric {
    let mut c = Counter::default();
    c.set_value(value as f64);
    let mut m = Metric::default();
    m.set_label(labels);
    m.set_counter(c);
    m
}

/// A histogram summed over slots, in f64 units after scaling the integer sum.
#[derive(Default, Clone)]
struct HistSum {
    count: u64,
    sum: u64,
    buckets: [u64; NB],
}

impl HistSum {
    fn add(&mut self, h: &Hist) {
        self.count += h.count.load(Relaxed);
        self.sum += h.sum.load(Relaxed);
        for (b, v) in self.buckets.iter_mut().zip(&h.buckets) {
            *b += v.load(Relaxed);
        }
    }

    fn metric(&self, labels: Vec<LabelPair>, bounds: &[f64; NB], scale: f64) -> Metric {
        let mut cumulative = 0;
        let buckets = bounds
            .iter()
            .zip(self.buckets)
            .map(|(bound, n)| {
                cumulative += n;
                let mut b = Bucket::default();
                b.set_upper_bound(*bound);
                // Never above the count: a reader may see a bucket before its count.
                b.set_cumulative_count(cumulative.min(self.count));
                b
            })
            .collect();
        let mut h = Histogram::default();
        h.set_sample_count(self.count);
        h.set_sample_sum(self.sum as f64 * scale);
        h.set_bucket(buckets);
        let mut m = Metric::default();
        m.set_label(labels);
        m.set_histogram(h);
        m
    }
}

fn host_label(region: &Region, i: u16) -> String {
    region
        .header
        .host_name(i as usize)
        .unwrap_or_else(|| "other".into())
}

fn method_label(key: u64, m: u8) -> &'static str {
    if key == OVERFLOW_KEY {
        "OTHER"
    } else {
        METHODS.get(m as usize).copied().unwrap_or("OTHER")
    }
}

/// An upstream's server as the metrics name it, and its index in the shared backend table.
pub struct UpstreamServerLabel {
    pub upstream: String,
    pub server: String,
    pub index: usize,
}

fn gauge(labels: Vec<LabelPair>, value: f64) -> Metric {
    let mut g = Gauge::default();
    g.set_value(value);
    let mut m = Metric::default();
    m.set_label(labels);
    m.set_gauge(g);
    m
}

/// Renders every metric in Prometheus' text format. `servers`: the upstream servers of the
/// configuration in force.
pub fn render(region: &Region, servers: &[UpstreamServerLabel]) -> String {
    let mut requests: BTreeMap<u64, u64> = BTreeMap::default();
    let mut durations: BTreeMap<u64, HistSum> = BTreeMap::default();
    let mut req_sizes = HistSum::default();
    let mut resp_sizes = HistSum::default();
    let mut per_worker: BTreeMap<u64, u64> = BTreeMap::default();
    let mut tls = [0u64; TlsMode::ALL.len()];
    let mut access_log_dropped = 0u64;
    let mut handshakes = [[0u64; 2]; TlsVersion::ALL.len()];
    let mut upstream: BTreeMap<usize, [u64; STATUS_CLASSES]> = BTreeMap::default();
    let mut retries = 0u64;
    let mut h2_streams = 0u64;
    // Open now, by worker index: a draining slot of the old generation and the new one's
    // share an index, and both hold connections.
    let mut open_by_worker: BTreeMap<u64, i64> = BTreeMap::default();
    let connections = region.header.connections.load(Relaxed).max(0);
    for slot in region.used_slots() {
        for e in &slot.req_counts {
            let key = e.key.load(Acquire);
            if key != 0 {
                *requests.entry(key).or_default() += e.value.load(Relaxed);
            }
        }
        for e in &slot.durations {
            let key = e.key.load(Acquire);
            if key != 0 {
                durations.entry(key).or_default().add(&e.hist);
            }
        }
        req_sizes.add(&slot.request_sizes);
        for (sum, n) in tls.iter_mut().zip(&slot.tls_connections) {
            *sum += n.load(Relaxed);
        }
        resp_sizes.add(&slot.response_sizes);
        access_log_dropped += slot.access_log_dropped.load(Relaxed);
        for (sum, row) in handshakes.iter_mut().zip(&slot.tls_handshakes) {
            for (s, n) in sum.iter_mut().zip(row) {
                *s += n.load(Relaxed);
            }
        }
        for s in servers {
            let classes = upstream.entry(s.index).or_default();
            if let Some(row) = slot.upstream_requests.get(s.index) {
                for (c, n) in classes.iter_mut().zip(row) {
                    *c += n.load(Relaxed);
                }
            }
        }
        retries += slot.upstream_retries.load(Relaxed);
        h2_streams += slot.http2_streams.load(Relaxed);
        let open = open_by_worker
            .entry(slot.worker_index.load(Relaxed))
            .or_default();
        if slot.state.load(Acquire) != STATE_FREE {
            *open += slot.connections.load(Relaxed).max(0);
        }
        *per_worker
            .entry(slot.worker_index.load(Relaxed))
            .or_default() += slot.requests.load(Relaxed);
    }

    let request_metrics = requests
        .iter()
        .map(|(&key, &n)| {
            let (m, h, s) = shm::split_key(key);
            let status = if key == OVERFLOW_KEY {
                "other".to_string()
            } else {
                s.to_string()
            };
            counter(
                vec![
                    label("host", &host_label(region, h)),
                    label("method", method_label(key, m)),
                    label("status", &status),
                ],
                n,
            )
        })
        .collect();
    let duration_metrics = durations
        .iter()
        .map(|(&key, hist)| {
            let (m, h, _) = shm::split_key(key);
            hist.metric(
                vec![
                    label("host", &host_label(region, h)),
                    label("method", method_label(key, m)),
                ],
                &DURATION_BUCKETS,
                1e-6,
            )
        })
        .collect();
    let worker_metrics = per_worker
        .iter()
        .map(|(w, n)| counter(vec![label("worker", &w.to_string())], *n))
        .collect();
    let conn_metric = gauge(vec![], connections as f64);
    // Both modes always, so a dashboard sees kTLS at 0 rather than no series.
    let tls_metrics = TlsMode::ALL
        .iter()
        .map(|&m| counter(vec![label("mode", m.label())], tls[m as usize]))
        .collect();

    let handshake_metrics = TlsVersion::ALL
        .iter()
        .flat_map(|&v| {
            [("ok", 0), ("failed", 1)].map(|(result, i)| {
                counter(
                    vec![label("result", result), label("version", v.label())],
                    handshakes[v as usize][i],
                )
            })
        })
        .collect();
    let open_metrics = open_by_worker
        .iter()
        .map(|(w, n)| gauge(vec![label("worker", &w.to_string())], *n as f64))
        .collect();
    let upstream_metrics = servers
        .iter()
        .flat_map(|s| {
            let classes = upstream.get(&s.index).copied().unwrap_or_default();
            (0..STATUS_CLASSES).map(move |c| {
                counter(
                    vec![
                        label("server", &s.server),
                        label("status_class", &format!("{}xx", c + 1)),
                        label("upstream", &s.upstream),
                    ],
                    classes[c],
                )
            })
        })
        .collect();
    let header = &region.header;
    let reload_metrics = vec![
        counter(vec![label("result", "ok")], header.reloads_ok.load(Relaxed)),
        counter(
            vec![label("result", "failed")],
            header.reloads_failed.load(Relaxed),
        ),
    ];
    let server_labels =
        |s: &UpstreamServerLabel| vec![label("server", &s.server), label("upstream", &s.upstream)];
    let backend = |s: &UpstreamServerLabel| &region.header.backends[s.index];
    let healthy = servers
        .iter()
        .map(|s| {
            gauge(
                server_labels(s),
                (backend(s).unhealthy.load(Relaxed) == 0) as u8 as f64,
            )
        })
        .collect();
    let active = servers
        .iter()
        .map(|s| {
            gauge(
                server_labels(s),
                backend(s).active.load(Relaxed).max(0) as f64,
            )
        })
        .collect();
    let failures = servers
        .iter()
        .map(|s| counter(server_labels(s), backend(s).failures.load(Relaxed)))
        .collect();
    let families = vec![
        family(
            "zerocopy_proxy_http_requests_total",
            "HTTP requests answered, by method, status and host.",
            MetricType::COUNTER,
            request_metrics,
        ),
        family(
            "zerocopy_proxy_http_request_duration_seconds",
            "Time from request head to the end of the response, by method and host.",
            MetricType::HISTOGRAM,
            duration_metrics,
        ),
        family(
            "zerocopy_proxy_http_request_size_bytes",
            "Request body sizes.",
            MetricType::HISTOGRAM,
            vec![req_sizes.metric(vec![], &SIZE_BUCKETS, 1.0)],
        ),
        family(
            "zerocopy_proxy_http_response_size_bytes",
            "Response body sizes.",
            MetricType::HISTOGRAM,
            vec![resp_sizes.metric(vec![], &SIZE_BUCKETS, 1.0)],
        ),
        family(
            "zerocopy_proxy_worker_requests_total",
            "Requests answered by each worker index, over every generation.",
            MetricType::COUNTER,
            worker_metrics,
        ),
        family(
            "zerocopy_proxy_worker_restarts_total",
            "Workers re-forked after an unexpected exit.",
            MetricType::COUNTER,
            vec![counter(vec![], region.header.restarts.load(Relaxed))],
        ),
        family(
            "zerocopy_proxy_active_connections",
            "Client connections open now, over all workers.",
            MetricType::GAUGE,
            vec![conn_metric],
        ),
        family(
            "zerocopy_proxy_tls_connections_total",
            "TLS connections past their handshake, by who processes their records: rustls in the worker, or the kernel (kTLS).",
            MetricType::COUNTER,
            tls_metrics,
        ),
        family(
            "zerocopy_proxy_access_log_dropped_total",
            "Access log lines dropped because a worker's log writer was behind (never blocks a worker).",
            MetricType::COUNTER,
            vec![counter(vec![], access_log_dropped)],
        ),
        family(
            "zerocopy_proxy_connections",
            "Client connections open now, by worker index (its old and new generation together during a reload).",
            MetricType::GAUGE,
            open_metrics,
        ),
        family(
            "zerocopy_proxy_tls_handshakes_total",
            "TLS handshakes by negotiated version and result (unknown: failed before a version was agreed).",
            MetricType::COUNTER,
            handshake_metrics,
        ),
        family(
            "zerocopy_proxy_reloads_total",
            "Configuration reloads (HUP) by result: ok once the new generation serves, failed if the configuration or its workers were refused.",
            MetricType::COUNTER,
            reload_metrics,
        ),
        family(
            "zerocopy_proxy_config_last_reload_success_timestamp_seconds",
            "When the configuration in service went into service (the first start or the last successful reload), seconds since the epoch.",
            MetricType::GAUGE,
            vec![gauge(vec![], header.last_reload_success.load(Relaxed) as f64)],
        ),
        family(
            "zerocopy_proxy_build_info",
            "Always 1; the version of the running binary is a label.",
            MetricType::GAUGE,
            vec![gauge(
                vec![label("version", env!("CARGO_PKG_VERSION"))],
                1.0,
            )],
        ),
        family(
            "zerocopy_proxy_upstream_requests_total",
            "Response heads received from the upstream server, by status class.",
            MetricType::COUNTER,
            upstream_metrics,
        ),
        family(
            "zerocopy_proxy_upstream_retries_total",
            "Requests sent again after a backend closed before answering: a replay on a fresh connection (stale pooled one) or a failover to the next server.",
            MetricType::COUNTER,
            vec![counter(vec![], retries)],
        ),
        family(
            "zerocopy_proxy_http2_streams_total",
            "HTTP/2 streams that carried a request (each is also counted in the request metrics).",
            MetricType::COUNTER,
            vec![counter(vec![], h2_streams)],
        ),
        family(
            "zerocopy_proxy_upstream_healthy",
            "1 if the upstream server is healthy (health checks), else 0.",
            MetricType::GAUGE,
            healthy,
        ),
        family(
            "zerocopy_proxy_upstream_active_connections",
            "Backend connections in use now, over all workers.",
            MetricType::GAUGE,
            active,
        ),
        family(
            "zerocopy_proxy_upstream_connect_failures_total",
            "Failed connection attempts to the server (each one fails over to the next server).",
            MetricType::COUNTER,
            failures,
        ),
    ];
    // The encoder refuses a family without samples (none yet after a fresh start).
    let families: Vec<_> = families
        .into_iter()
        .filter(|f| !f.get_metric().is_empty())
        .collect();
    let mut out = Vec::with_capacity(16 * 1024);
    let encoded = TextEncoder::new().encode(&families, &mut out);
    debug_assert!(encoded.is_ok());
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::shm::Shm;

    #[test]
    fn tls_connections_are_summed_over_slots_by_mode() {
        let shm = Shm::create().unwrap();
        let region = shm.region();
        let fresh = render(region, &[]);
        assert!(fresh.contains("zerocopy_proxy_tls_connections_total{mode=\"ktls\"} 0\n"));
        assert!(fresh.contains("zerocopy_proxy_tls_connections_total{mode=\"rustls\"} 0\n"));
        let (a, b) = (
            region.claim_slot(0, 1).unwrap(),
            region.claim_slot(1, 1).unwrap(),
        );
        region.slots[a].count_tls_connection(TlsMode::Ktls);
        region.slots[b].count_tls_connection(TlsMode::Ktls);
        region.slots[b].count_tls_connection(TlsMode::Rustls);
        let text = render(region, &[]);
        assert!(
            text.contains("zerocopy_proxy_tls_connections_total{mode=\"ktls\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("zerocopy_proxy_tls_connections_total{mode=\"rustls\"} 1\n"),
            "{text}"
        );
    }
}
