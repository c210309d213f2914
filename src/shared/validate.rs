//! Loading and validating a config file. Every error names the file and the key; syntax and
//! type errors carry toml's line number. Everything that can be checked is checked in one pass
//! and all errors are returned together, so `-t` shows them all at once.

use super::config::*;
use super::url::BackendUrl;
use ipnet::IpNet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

#[derive(Debug, Clone)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: ", self.file, line)?,
            None => write!(f, "{}: ", self.file)?,
        }
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "`{}`: {}", self.key, self.message)
        }
    }
}

/// Collects errors for one file.
struct Errors {
    file: String,
    list: Vec<ConfigError>,
}

impl Errors {
    fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.list.push(ConfigError {
            file: self.file.clone(),
            line: None,
            key: key.into(),
            message: message.into(),
        });
    }
}

/// Reads, parses and validates `path`.
pub fn load_file(path: &Path) -> Result<Config, Vec<ConfigError>> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![ConfigError {
            file: file.clone(),
            line: None,
            key: String::new(),
            message: format!("cannot read config file: {e}"),
        }]
    })?;
    load_str(&text, &file)
}

/// Parses and validates config text; `file` names it in errors.
pub fn load_str(text: &str, file: &str) -> Result<Config, Vec<ConfigError>> {
    let config: Config = match toml::from_str(text) {
        Ok(c) => c,
        Err(first) => return Err(schema_errors(text, file, &first)),
    };
    validate(&config, file).map_err(|mut errors| {
        if let Ok(doc) = toml_edit::ImDocument::parse(text) {
            for e in &mut errors {
                e.line = locate(&doc, &split_key(&e.key)).map(|at| line_at(text, at));
            }
        }
        errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
        errors
    })?;
    Ok(config)
}

fn line_at(text: &str, at: usize) -> usize {
    text[..at.min(text.len())].matches('\n').count() + 1
}

/// serde stops at the first schema error (unknown key, wrong type); to report them all, each
/// section and each route is deserialized again on its own, and each error located by key.
fn schema_errors(text: &str, file: &str, first: &toml::de::Error) -> Vec<ConfigError> {
    let mut errors = vec![toml_error(text, file, first)];
    let (Ok(table), Ok(doc)) = (
        toml::from_str::<toml::Table>(text),
        toml_edit::ImDocument::parse(text),
    ) else {
        return errors;
    };
    let mut check = |path: Vec<String>, result: Result<(), toml::de::Error>| {
        let Err(e) = result else { return };
        let message = e.message().trim().to_string();
        let mut path = path;
        if let Some(field) = unknown_field(&message) {
            path.push(field.to_string());
        }
        let line = locate(&doc, &path).map(|at| line_at(text, at));
        let key = join_key(&path);
        let duplicate = errors
            .iter()
            .any(|old| old.message == message && (old.line == line || old.key == key));
        if !duplicate {
            errors.push(ConfigError {
                file: file.to_string(),
                line,
                key,
                message,
            });
        }
    };
    fn de<T: serde::de::DeserializeOwned>(v: &toml::Value) -> Result<(), toml::de::Error> {
        T::deserialize(v.clone()).map(|_| ())
    }
    for (section, value) in &table {
        let p = |rest: &[&str]| {
            std::iter::once(section.as_str())
                .chain(rest.iter().copied())
                .map(String::from)
                .collect::<Vec<_>>()
        };
        match section.as_str() {
            "server" => check(p(&[]), de::<ServerConfig>(value)),
            "logging" => check(p(&[]), de::<LoggingConfig>(value)),
            "security" => check(p(&[]), de::<GlobalSecurity>(value)),
            "performance" => check(p(&[]), de::<PerformanceConfig>(value)),
            "tls" => check(p(&[]), de::<TlsConfig>(value)),
            "metrics" => check(p(&[]), de::<MetricsConfig>(value)),
            "host_routes" | "upstreams" => {
                for (name, item) in value.as_table().into_iter().flatten() {
                    let r = if section == "host_routes" {
                        de::<Route>(item)
                    } else {
                        de::<Upstream>(item)
                    };
                    check(p(&[name]), r);
                }
            }
            "path_routes" => {
                for (host, paths) in value.as_table().into_iter().flatten() {
                    for (prefix, item) in paths.as_table().into_iter().flatten() {
                        check(p(&[host, prefix]), de::<Route>(item));
                    }
                }
            }
            _ => check(
                vec![section.clone()],
                Err(serde::de::Error::custom(format!(
                    "unknown section `{section}` (server, logging, security, performance, tls, metrics, host_routes, path_routes, upstreams)"
                ))),
            ),
        }
    }
    errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
    errors
}

fn unknown_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("unknown field `")
        .and_then(|r| r.split('`').next())
}

/// Byte offset of the deepest part of `path` found in the document.
fn locate(doc: &toml_edit::ImDocument<&str>, path: &[String]) -> Option<usize> {
    let mut table: &dyn toml_edit::TableLike = doc.as_table();
    let mut best = None;
    for seg in path {
        let Some(item) = table.get(seg) else { break };
        let span = table
            .key(seg)
            .and_then(|k| k.span())
            .or_else(|| item.span());
        best = span.map(|r| r.start).or(best);
        match item.as_table_like() {
            Some(t) => table = t,
            None => break,
        }
    }
    best
}

/// `path_routes."example.com"."/api/".url` → its segments.
fn split_key(key: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in key.chars() {
        match c {
            '"' => quoted = !quoted,
            '.' if !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// Segments → the key as the config file spells it, quoting where TOML needs quotes.
fn join_key(path: &[String]) -> String {
    path.iter()
        .map(|seg| {
            let bare = !seg.is_empty()
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if bare {
                seg.clone()
            } else {
                format!("\"{seg}\"")
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

fn toml_error(text: &str, file: &str, e: &toml::de::Error) -> ConfigError {
    let line = e.span().map(|s| line_at(text, s.start));
    let message = e.message().trim().to_string();
    let mut key = e
        .span()
        .map(|s| enclosing_table(text, s.start))
        .unwrap_or_default();
    if let Some(field) = unknown_field(&message) {
        key = if key.is_empty() {
            field.to_string()
        } else {
            format!("{key}.{field}")
        };
    }
    ConfigError {
        file: file.to_string(),
        line,
        key,
        message,
    }
}

/// The `[table]` header in force at byte offset `at`, to name the section of a parse error.
fn enclosing_table(text: &str, at: usize) -> String {
    text[..at.min(text.len())]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').to_string())
        .unwrap_or_default()
}

pub fn validate(c: &Config, file: &str) -> Result<(), Vec<ConfigError>> {
    let mut e = Errors {
        file: file.to_string(),
        list: Vec::new(),
    };
    validate_server(c, &mut e);
    validate_logging(&c.logging, &mut e);
    validate_security(&c.security, &mut e);
    validate_metrics(&c.metrics, &mut e);
    if let Some(tls) = &c.tls {
        let before = e.list.len();
        check_file(
            &tls.cert_path,
            "tls.cert_path",
            "TLS certificate file",
            &mut e,
        );
        check_file(
            &tls.key_path,
            "tls.key_path",
            "TLS private key file",
            &mut e,
        );
        if e.list.len() == before {
            if let Err((key, why)) = super::tls::server_config(tls) {
                e.add(key, why);
            }
        }
    }
    for (host, route) in &c.host_routes {
        check_host(host, &format!("host_routes.\"{host}\""), &mut e);
        validate_route(c, route, &format!("host_routes.\"{host}\""), &mut e);
    }
    for (host, paths) in &c.path_routes {
        check_host(host, &format!("path_routes.\"{host}\""), &mut e);
        for (prefix, route) in paths {
            let key = format!("path_routes.\"{host}\".\"{prefix}\"");
            if !prefix.starts_with('/') {
                e.add(&key, "a route path must start with `/`");
            }
            validate_route(c, route, &key, &mut e);
        }
    }
    for (name, up) in &c.upstreams {
        validate_upstream(up, &format!("upstreams.\"{name}\""), &mut e);
    }
    if e.list.is_empty() {
        Ok(())
    } else {
        Err(e.list)
    }
}

fn validate_server(c: &Config, e: &mut Errors) {
    if c.server.listen.parse::<SocketAddr>().is_err() {
        e.add(
            "server.listen",
            format!("invalid socket address: {}", c.server.listen),
        );
    }
    if let Some(http) = &c.server.http_listen {
        if http.parse::<SocketAddr>().is_err() {
            e.add(
                "server.http_listen",
                format!("invalid socket address: {http}"),
            );
        } else if *http == c.server.listen {
            e.add("server.http_listen", "must differ from server.listen");
        }
    }
    // Two generations must fit in the shared slots at once (one drains while one starts).
    let max_workers = super::shm::MAX_SLOTS / 2;
    if c.server.threads > max_workers {
        e.add("server.threads", format!("at most {max_workers} workers"));
    }
    for (name, v) in [
        ("keepalive_timeout_secs", c.server.keepalive_timeout_secs),
        (
            "client_header_timeout_secs",
            c.server.client_header_timeout_secs,
        ),
        ("shutdown_timeout_secs", c.server.shutdown_timeout_secs),
    ] {
        if v == 0 && name != "shutdown_timeout_secs" {
            e.add(format!("server.{name}"), "must be at least 1");
        } else if v > MAX_TIMEOUT {
            e.add(
                format!("server.{name}"),
                format!("must be at most {MAX_TIMEOUT} (a year)"),
            );
        }
    }
    if let Some(pid) = &c.server.pid_file {
        check_parent_dir(pid, "server.pid_file", e);
    }
}

/// Timeouts become deadlines (`Instant + Duration`): a bound keeps them from overflowing.
const MAX_TIMEOUT: u64 = 365 * 24 * 3600;

fn validate_logging(l: &LoggingConfig, e: &mut Errors) {
    if super::log::parse_level(&l.level).is_none() {
        e.add(
            "logging.level",
            format!(
                "invalid log level `{}` (trace, debug, info, warn, error, off)",
                l.level
            ),
        );
    }
    if l.channel_size == 0 {
        e.add("logging.channel_size", "must be at least 1");
    }
    if l.flush_interval_ms == 0 {
        e.add("logging.flush_interval_ms", "must be at least 1");
    }
    if let Some(p) = &l.file_path {
        check_parent_dir(p, "logging.file_path", e);
    }
}

fn validate_security(s: &GlobalSecurity, e: &mut Errors) {
    if let Some(user) = &s.drop_privileges_user {
        match nix::unistd::User::from_name(user) {
            Ok(Some(u)) if u.uid.is_root() => e.add(
                "security.drop_privileges_user",
                format!("`{user}` is root: workers never run as root"),
            ),
            Ok(Some(_)) => {}
            _ => e.add(
                "security.drop_privileges_user",
                format!("unknown user `{user}`"),
            ),
        }
    }
    if let Some(group) = &s.drop_privileges_group {
        match nix::unistd::Group::from_name(group) {
            Ok(Some(_)) => {}
            _ => e.add(
                "security.drop_privileges_group",
                format!("unknown group `{group}`"),
            ),
        }
    }
}

fn validate_metrics(m: &MetricsConfig, e: &mut Errors) {
    // Compared with the normalized request path: only a path that normalizes to itself can
    // ever match.
    let normal = m.path.starts_with('/')
        && !m.path.contains("//")
        && m.path.split('/').all(|seg| seg != "." && seg != "..")
        && m.path
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"?#%\\".contains(&b));
    if !normal {
        e.add(
            "metrics.path",
            format!(
                "`{}` is not a plain absolute path such as /__metrics (no query, `%`, `//` or dot-segments)",
                m.path
            ),
        );
    }
    check_ip_list(&m.allowed_ips, "metrics.allowed_ips", e);
}

fn check_ip_list(list: &[String], key: &str, e: &mut Errors) {
    for ip in list {
        if parse_cidr(ip).is_none() {
            e.add(key, format!("invalid IP address or CIDR `{ip}`"));
        }
    }
}

fn check_host(host: &str, key: &str, e: &mut Errors) {
    let valid = host == "*"
        || (!host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._:[]".contains(&b)));
    if !valid {
        e.add(key, format!("invalid host name `{host}`"));
    }
}

fn validate_route(c: &Config, r: &Route, key: &str, e: &mut Errors) {
    let mut not_for = |present: bool, name: &str| {
        if present {
            e.add(
                format!("{key}.{name}"),
                format!("does not apply to a route of type {:?}", r.kind),
            );
        }
    };
    let file_keys = [
        (r.path.is_some(), "path"),
        (r.mode.is_some(), "mode"),
        (r.index.is_some(), "index"),
    ];
    let proxy_keys = [
        (r.url.is_some(), "url"),
        (r.upstream.is_some(), "upstream"),
        (r.sni_name.is_some(), "sni_name"),
        (r.ca_file.is_some(), "ca_file"),
    ];
    let redirect_keys = [
        (r.redirect_url.is_some(), "redirect_url"),
        (r.redirect_status.is_some(), "redirect_status"),
        (r.preserve_path.is_some(), "preserve_path"),
    ];
    let foreign: Vec<_> = match r.kind {
        RouteType::File => proxy_keys.iter().chain(&redirect_keys).collect(),
        RouteType::Proxy => file_keys.iter().chain(&redirect_keys).collect(),
        RouteType::Redirect => file_keys.iter().chain(&proxy_keys).collect(),
    };
    for (present, name) in foreign {
        not_for(*present, name);
    }
    match r.kind {
        RouteType::File => validate_file_route(r, key, e),
        RouteType::Proxy => validate_proxy_route(c, r, key, e),
        RouteType::Redirect => validate_redirect_route(r, key, e),
    }
    validate_route_security(&r.security, &format!("{key}.security"), e);
}

/// A backend's host name must resolve now, as nginx requires of its upstreams: workers
/// resolve once per generation, never on the request path.
fn check_resolves(u: &BackendUrl, key: &str, e: &mut Errors) {
    if u.addrs().is_err() {
        e.add(key, format!("host not found: {}", u.host));
    }
}

fn validate_file_route(r: &Route, key: &str, e: &mut Errors) {
    match &r.path {
        None => e.add(format!("{key}.path"), "a File route needs `path`"),
        Some(p) => match std::fs::metadata(p) {
            Err(_) => e.add(
                format!("{key}.path"),
                format!("file or directory not found: {p}"),
            ),
            // A FIFO or device would be refused on every request: say so now.
            Ok(m) if !m.is_file() && !m.is_dir() => e.add(
                format!("{key}.path"),
                format!("not a regular file or directory: {p}"),
            ),
            Ok(_) => {}
        },
    }
    if let Some(index) = &r.index {
        if index.is_empty() || index.contains('/') || index == ".." {
            e.add(
                format!("{key}.index"),
                "must be a plain file name such as `index.html`",
            );
        }
    }
}

fn validate_proxy_route(c: &Config, r: &Route, key: &str, e: &mut Errors) {
    if let Some(ca) = &r.ca_file {
        check_file(ca, &format!("{key}.ca_file"), "CA file", e);
    }
    match (&r.url, &r.upstream) {
        (Some(_), Some(_)) => e.add(key, "a Proxy route takes `url` or `upstream`, not both"),
        (None, None) => e.add(key, "a Proxy route needs `url` or `upstream`"),
        (Some(url), None) => match BackendUrl::parse(url) {
            Ok(u) => {
                if r.sni_name.is_some() && !u.tls {
                    e.add(format!("{key}.sni_name"), "applies only to an https:// url");
                }
                if r.ca_file.is_some() && !u.tls {
                    e.add(format!("{key}.ca_file"), "applies only to an https:// url");
                }
                check_resolves(&u, &format!("{key}.url"), e);
            }
            Err(why) => e.add(
                format!("{key}.url"),
                format!("invalid proxy URL `{url}`: {why}"),
            ),
        },
        (None, Some(name)) => {
            if !c.upstreams.contains_key(name) {
                e.add(
                    format!("{key}.upstream"),
                    format!("upstream `{name}` not found"),
                );
            }
            if r.sni_name.is_some() {
                e.add(
                    format!("{key}.sni_name"),
                    "set sni_name on the upstream's servers, not on a route that uses `upstream`",
                );
            }
            if r.ca_file.is_some() {
                e.add(
                    format!("{key}.ca_file"),
                    "set ca_file on the upstream, not on a route that uses `upstream`",
                );
            }
        }
    }
}

fn validate_redirect_route(r: &Route, key: &str, e: &mut Errors) {
    match &r.redirect_url {
        None => e.add(
            format!("{key}.redirect_url"),
            "a Redirect route needs `redirect_url`",
        ),
        Some(u) if u.is_empty() || u.bytes().any(|b| b.is_ascii_control() || b == b' ') => e.add(
            format!("{key}.redirect_url"),
            "must be a non-empty URL without spaces or control characters",
        ),
        Some(_) => {}
    }
    if let Some(s) = r.redirect_status {
        if ![301, 302, 303, 307, 308].contains(&s) {
            e.add(
                format!("{key}.redirect_status"),
                format!("{s} is not one of 301, 302, 303, 307, 308"),
            );
        }
    }
}

fn validate_route_security(s: &RouteSecurity, key: &str, e: &mut Errors) {
    for m in &s.allowed_methods {
        if m.is_empty()
            || !m
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
        {
            e.add(
                format!("{key}.allowed_methods"),
                format!("invalid HTTP method `{m}` (methods are upper-case tokens such as GET)"),
            );
        }
    }
    for (name, list) in [
        ("allowed_ips", &s.allowed_ips),
        ("denied_ips", &s.denied_ips),
    ] {
        check_ip_list(list, &format!("{key}.{name}"), e);
    }
    if s.max_request_header_size < 1024 || s.max_request_header_size > 1024 * 1024 {
        e.add(
            format!("{key}.max_request_header_size"),
            "must be between 1024 and 1048576 bytes",
        );
    }
    for (name, v) in [
        ("client_header_timeout_secs", s.client_header_timeout_secs),
        ("client_body_timeout_secs", s.client_body_timeout_secs),
        (
            "backend_connect_timeout_secs",
            s.backend_connect_timeout_secs,
        ),
        (
            "idle_connection_timeout_secs",
            s.idle_connection_timeout_secs,
        ),
        ("send_timeout_secs", s.send_timeout_secs),
        ("backend_read_timeout_secs", s.backend_read_timeout_secs),
        ("backend_send_timeout_secs", s.backend_send_timeout_secs),
        ("websocket_idle_timeout_secs", s.websocket_idle_timeout_secs),
        ("websocket_poll_timeout_ms", s.websocket_poll_timeout_ms),
    ] {
        if v == 0 {
            e.add(format!("{key}.{name}"), "must be at least 1");
        } else if v > MAX_TIMEOUT {
            e.add(
                format!("{key}.{name}"),
                format!("must be at most {MAX_TIMEOUT} (a year)"),
            );
        }
    }
    if s.websocket_poll_max_timeout_ms < s.websocket_poll_timeout_ms {
        e.add(
            format!("{key}.websocket_poll_max_timeout_ms"),
            "must not be smaller than websocket_poll_timeout_ms",
        );
    }
    if !(s.websocket_poll_backoff_multiplier >= 1.0 && s.websocket_poll_backoff_multiplier <= 100.0)
    {
        e.add(
            format!("{key}.websocket_poll_backoff_multiplier"),
            "must be between 1.0 and 100.0",
        );
    }
    let headers = [
        (
            "add_request_headers",
            s.add_request_headers.keys().collect::<Vec<_>>(),
        ),
        (
            "add_response_headers",
            s.add_response_headers.keys().collect(),
        ),
        (
            "remove_request_headers",
            s.remove_request_headers.iter().collect(),
        ),
        (
            "remove_response_headers",
            s.remove_response_headers.iter().collect(),
        ),
    ];
    for (name, list) in headers {
        for h in list {
            if !is_token(h) {
                e.add(
                    format!("{key}.{name}"),
                    format!("invalid header name `{h}`"),
                );
            }
        }
    }
    for (name, map) in [
        ("add_request_headers", &s.add_request_headers),
        ("add_response_headers", &s.add_response_headers),
    ] {
        for (h, v) in map {
            if v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                e.add(
                    format!("{key}.{name}.{h}"),
                    "header values cannot contain CR, LF or NUL",
                );
            }
        }
    }
}

fn validate_upstream(u: &Upstream, key: &str, e: &mut Errors) {
    if u.servers.is_empty() {
        e.add(
            format!("{key}.servers"),
            "an upstream needs at least one server",
        );
    }
    if let Some(ca) = &u.ca_file {
        check_file(ca, &format!("{key}.ca_file"), "CA file", e);
    }
    for s in &u.servers {
        match BackendUrl::parse(s.url()) {
            Ok(parsed) => {
                check_resolves(&parsed, &format!("{key}.servers"), e);
                if let UpstreamServer::Detailed(d) = s {
                    if d.sni_name.is_some() && !parsed.tls {
                        e.add(
                            format!("{key}.servers"),
                            format!("sni_name applies only to an https:// url ({})", d.url),
                        );
                    }
                }
            }
            Err(why) => e.add(
                format!("{key}.servers"),
                format!("invalid upstream URL `{}`: {why}", s.url()),
            ),
        }
    }
    if let Some(h) = &u.health_check {
        let hk = format!("{key}.health_check");
        if h.interval_secs == 0 {
            e.add(format!("{hk}.interval_secs"), "must be at least 1");
        }
        if h.timeout_secs == 0 {
            e.add(format!("{hk}.timeout_secs"), "must be at least 1");
        }
        if !h.path.starts_with('/') {
            e.add(format!("{hk}.path"), "must start with `/`");
        }
        if h.healthy_statuses.is_empty()
            || h.healthy_statuses.iter().any(|s| !(100..=599).contains(s))
        {
            e.add(
                format!("{hk}.healthy_statuses"),
                "must list status codes between 100 and 599",
            );
        }
        if h.unhealthy_threshold == 0 {
            e.add(format!("{hk}.unhealthy_threshold"), "must be at least 1");
        }
        if h.healthy_threshold == 0 {
            e.add(format!("{hk}.healthy_threshold"), "must be at least 1");
        }
    }
}

fn check_file(path: &str, key: &str, what: &str, e: &mut Errors) {
    if !Path::new(path).is_file() {
        e.add(key, format!("{what} not found: {path}"));
    }
}

fn check_parent_dir(path: &str, key: &str, e: &mut Errors) {
    let parent = Path::new(path)
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        e.add(
            key,
            format!("directory does not exist: {}", parent.display()),
        );
    }
}

/// `192.168.0.0/16`, `10.1.2.3`, `::1`, `2001:db8::/32`.
pub fn parse_cidr(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

/// An RFC 9110 token (header names, methods).
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}
