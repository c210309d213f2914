//! The configuration schema: every section and key of the spec as typed serde structs, with the
//! spec's defaults. Unknown keys are errors (`deny_unknown_fields`). Semantic checks live in
//! `validate.rs`; this module only says what a key is and what it defaults to.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub logging: LoggingConfig,
    #[serde(default)]
    pub security: GlobalSecurity,
    #[serde(default)]
    pub performance: PerformanceConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub host_routes: BTreeMap<String, Route>,
    #[serde(default)]
    pub path_routes: BTreeMap<String, BTreeMap<String, Route>>,
    #[serde(default)]
    pub upstreams: BTreeMap<String, Upstream>,
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// `[metrics]`: where the Prometheus endpoint answers, and to whom.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    #[serde(default = "default_metrics_path")]
    pub path: String,
    /// IPs and CIDRs that may read the metrics; empty: every address (the spec's default).
    #[serde(default)]
    pub allowed_ips: Vec<String>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            path: default_metrics_path(),
            allowed_ips: Vec::new(),
        }
    }
}

fn default_metrics_path() -> String {
    "/__metrics".into()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Plain-HTTP listener beside the TLS one (only meaningful with `[tls]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_listen: Option<String>,
    /// Worker processes; 0 or absent = number of cores.
    #[serde(default)]
    pub threads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_file: Option<String>,
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout_secs: u64,
    /// How long an idle keep-alive connection is kept (nginx's `keepalive_timeout`).
    #[serde(default = "default_keepalive")]
    pub keepalive_timeout_secs: u64,
    /// How long a request head may take before its route (and the route's own limit) is
    /// known: the spec's 30 s default.
    #[serde(default = "thirty")]
    pub client_header_timeout_secs: u64,
    /// HTTP/2 with prior knowledge (h2c) on the plain-HTTP listeners, beside HTTP/1.1.
    #[serde(default)]
    pub http2_cleartext: bool,
    /// Streams one HTTP/2 connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS).
    #[serde(default = "default_h2_streams")]
    pub http2_max_concurrent_streams: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            http_listen: None,
            threads: 0,
            pid_file: None,
            shutdown_timeout_secs: default_shutdown_timeout(),
            keepalive_timeout_secs: default_keepalive(),
            client_header_timeout_secs: thirty(),
            http2_cleartext: false,
            http2_max_concurrent_streams: default_h2_streams(),
        }
    }
}

fn default_h2_streams() -> u32 {
    128
}

fn default_listen() -> String {
    "0.0.0.0:443".into()
}
fn default_shutdown_timeout() -> u64 {
    30
}
fn default_keepalive() -> u64 {
    60
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingConfig {
    #[serde(default = "default_level")]
    pub level: String,
    #[serde(default = "default_channel_size")]
    pub channel_size: usize,
    #[serde(default = "default_flush_interval")]
    pub flush_interval_ms: u64,
    #[serde(default = "default_max_log_size")]
    pub max_log_size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_path: Option<String>,
    /// One line per request, written by each worker; off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<String>,
    /// `combined` or `json` (`access_format`): a string, so that a wrong value is reported
    /// under its own key.
    #[serde(default = "default_access_log_format")]
    pub access_log_format: String,
}

fn default_access_log_format() -> String {
    "combined".into()
}

impl LoggingConfig {
    pub fn access_format(&self) -> Option<AccessLogFormat> {
        match self.access_log_format.as_str() {
            "combined" => Some(AccessLogFormat::Combined),
            "json" => Some(AccessLogFormat::Json),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccessLogFormat {
    /// nginx's `combined`, then `$request_time $upstream_addr $upstream_response_time`.
    #[default]
    Combined,
    /// One JSON object a line, with the same fields.
    Json,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            level: default_level(),
            channel_size: default_channel_size(),
            flush_interval_ms: default_flush_interval(),
            max_log_size: default_max_log_size(),
            file_path: None,
            access_log: None,
            access_log_format: default_access_log_format(),
        }
    }
}

fn default_level() -> String {
    "info".into()
}
fn default_channel_size() -> usize {
    100_000
}
fn default_flush_interval() -> u64 {
    1000
}
fn default_max_log_size() -> u64 {
    104_857_600
}

#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct GlobalSecurity {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_privileges_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_privileges_group: Option<String>,
    #[serde(default)]
    pub max_concurrent_connections: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Balancing {
    Kernel,
    Cbpf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PerformanceConfig {
    #[serde(default = "default_balancing")]
    pub reuseport_balancing: Balancing,
    #[serde(default)]
    pub huge_pages_enabled: bool,
}

impl Default for PerformanceConfig {
    fn default() -> Self {
        PerformanceConfig {
            reuseport_balancing: default_balancing(),
            huge_pages_enabled: false,
        }
    }
}

fn default_balancing() -> Balancing {
    Balancing::Kernel
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The default pair: for clients that send no SNI or a name no other certificate has.
    pub cert_path: String,
    pub key_path: String,
    #[serde(default)]
    pub ktls_enabled: bool,
    #[serde(default = "yes")]
    pub ktls_fallback_enabled: bool,
    /// How often the master makes a new session-ticket key (the previous one still decrypts
    /// for one more period).
    #[serde(default = "twelve_hours")]
    pub session_ticket_rotation_secs: u64,
    /// ALPN offers `h2` before `http/1.1`: clients that speak HTTP/2 get it.
    #[serde(default = "yes")]
    pub http2: bool,
    /// `[[tls.certificates]]`: more pairs, each chosen by SNI against its SAN DNS names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<CertificatePair>,
}

/// One `[[tls.certificates]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CertificatePair {
    pub cert_path: String,
    pub key_path: String,
}

fn twelve_hours() -> u64 {
    12 * 3600
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
pub enum RouteType {
    #[default]
    File,
    Proxy,
    Redirect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FileMode {
    #[default]
    Sendfile,
    Memory,
}

/// One route, as written under `host_routes` or `path_routes`. Which keys apply depends on
/// `type`; `validate.rs` rejects keys that do not belong to the route's type.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Route {
    #[serde(default, rename = "type")]
    pub kind: RouteType,
    // File
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<FileMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<String>,
    // Proxy
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni_name: Option<String>,
    /// PEM file of CA certificates that an `https://` backend's certificate may chain to,
    /// besides the system roots (for private backends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    // Redirect
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preserve_path: Option<bool>,
    /// `false`: this route's requests are not written to the access log (health checks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<bool>,
    #[serde(default)]
    pub security: RouteSecurity,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PollMode {
    Fixed,
    #[default]
    Adaptive,
}

/// Per-route `security` table, with the spec's defaults.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSecurity {
    #[serde(default = "ten_mib")]
    pub max_request_body_size: u64,
    #[serde(default = "ten_mib")]
    pub max_chunked_body_size: u64,
    #[serde(default = "eight_kib")]
    pub max_request_header_size: u64,
    #[serde(default = "thirty")]
    pub client_header_timeout_secs: u64,
    #[serde(default = "thirty")]
    pub client_body_timeout_secs: u64,
    #[serde(default = "ten")]
    pub backend_connect_timeout_secs: u64,
    /// Between two successful writes to the client (nginx's `send_timeout`).
    #[serde(default = "sixty")]
    pub send_timeout_secs: u64,
    /// Between two reads from the backend, the response head included
    /// (`proxy_read_timeout`).
    #[serde(default = "sixty")]
    pub backend_read_timeout_secs: u64,
    /// Between two writes to the backend (`proxy_send_timeout`).
    #[serde(default = "sixty")]
    pub backend_send_timeout_secs: u64,
    /// A WebSocket tunnel with no byte in either direction for this long is closed.
    #[serde(default = "hour")]
    pub websocket_idle_timeout_secs: u64,
    #[serde(default)]
    pub allowed_methods: Vec<String>,
    #[serde(default)]
    pub rate_limit_requests_per_min: u64,
    #[serde(default)]
    pub allowed_ips: Vec<String>,
    #[serde(default)]
    pub denied_ips: Vec<String>,
    #[serde(default = "eight")]
    pub max_idle_connections_per_host: usize,
    #[serde(default = "thirty")]
    pub idle_connection_timeout_secs: u64,
    #[serde(default)]
    pub add_request_headers: BTreeMap<String, String>,
    #[serde(default)]
    pub remove_request_headers: Vec<String>,
    #[serde(default)]
    pub add_response_headers: BTreeMap<String, String>,
    #[serde(default)]
    pub remove_response_headers: Vec<String>,
    #[serde(default)]
    pub websocket_poll_mode: PollMode,
    #[serde(default = "one")]
    pub websocket_poll_timeout_ms: u64,
    #[serde(default = "hundred")]
    pub websocket_poll_max_timeout_ms: u64,
    #[serde(default = "two")]
    pub websocket_poll_backoff_multiplier: f64,
}

impl Default for RouteSecurity {
    fn default() -> Self {
        toml::from_str("").expect("defaults of RouteSecurity")
    }
}

fn ten_mib() -> u64 {
    10 * 1024 * 1024
}
fn eight_kib() -> u64 {
    8 * 1024
}
fn thirty() -> u64 {
    30
}
fn ten() -> u64 {
    10
}
fn sixty() -> u64 {
    60
}
fn hour() -> u64 {
    3600
}
fn eight() -> usize {
    8
}
fn one() -> u64 {
    1
}
fn hundred() -> u64 {
    100
}
fn two() -> f64 {
    2.0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    #[default]
    RoundRobin,
    LeastConn,
    IpHash,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    #[serde(default)]
    pub algorithm: Algorithm,
    pub servers: Vec<UpstreamServer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// As a Proxy route's `ca_file`, for every `https://` server of the upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

/// A server of an upstream: `"https://host:443"` or `{ url = "...", sni_name = "..." }`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum UpstreamServer {
    Url(String),
    Detailed(UpstreamServerDetail),
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamServerDetail {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni_name: Option<String>,
}

impl UpstreamServer {
    pub fn url(&self) -> &str {
        match self {
            UpstreamServer::Url(u) => u,
            UpstreamServer::Detailed(d) => &d.url,
        }
    }

    pub fn sni_name(&self) -> Option<&str> {
        match self {
            UpstreamServer::Url(_) => None,
            UpstreamServer::Detailed(d) => d.sni_name.as_deref(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    #[serde(default = "ten")]
    pub interval_secs: u64,
    #[serde(default = "slash")]
    pub path: String,
    #[serde(default = "five")]
    pub timeout_secs: u64,
    #[serde(default = "healthy_statuses")]
    pub healthy_statuses: Vec<u16>,
    #[serde(default = "three")]
    pub unhealthy_threshold: u32,
    #[serde(default = "two_u32")]
    pub healthy_threshold: u32,
}

fn slash() -> String {
    "/".into()
}
fn five() -> u64 {
    5
}
fn three() -> u32 {
    3
}
fn two_u32() -> u32 {
    2
}
fn healthy_statuses() -> Vec<u16> {
    vec![200, 201, 202, 204, 301, 302, 304]
}

/// The shared-memory key of an upstream's server: `upstream|url`.
pub fn backend_key(upstream: &str, url: &str) -> String {
    format!("{upstream}|{url}")
}
