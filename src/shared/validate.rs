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
    // In bytes: a span from the parser need not fall on a character boundary.
    let before = &text.as_bytes()[..at.min(text.len())];
    before.iter().filter(|&&b| b == b'\n').count() + 1
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
    let mut check = |path: Vec<Seg>, result: Result<(), toml::de::Error>| {
        let Err(e) = result else { return };
        let message = e.message().trim().to_string();
        let mut path = path;
        if let Some(field) = unknown_field(&message) {
            path.push(Seg::Key(field.to_string()));
        }
        let line = locate(&doc, &path).map(|at| line_at(text, at));
        let key = join_key(&path);
        let same = |old: &ConfigError| old.message == message;
        // The first error's key is read from the text around it; on the same line, the key
        // built from the document's structure is the better name (an inline table's key).
        if let Some(old) = errors.iter_mut().find(|o| same(o) && o.line == line) {
            old.key = key;
        } else if !errors.iter().any(|o| same(o) && o.key == key) {
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
                .map(|k| Seg::Key(k.to_string()))
                .collect::<Vec<_>>()
        };
        match section.as_str() {
            "server" => check(p(&[]), de::<ServerConfig>(value)),
            "logging" => check(p(&[]), de::<LoggingConfig>(value)),
            "security" => check(p(&[]), de::<GlobalSecurity>(value)),
            "performance" => check(p(&[]), de::<PerformanceConfig>(value)),
            "tls" => {
                // Each `[[tls.certificates]]` entry on its own, so an error names its index.
                let mut rest = value.clone();
                let entries = rest.as_table_mut().and_then(|t| t.remove("certificates"));
                check(p(&[]), de::<TlsConfig>(&rest));
                match entries {
                    Some(toml::Value::Array(list)) => {
                        for (i, item) in list.iter().enumerate() {
                            let mut path = p(&["certificates"]);
                            path.push(Seg::Index(i));
                            check(path, de::<CertificatePair>(item));
                        }
                    }
                    Some(other) => check(p(&["certificates"]), de::<Vec<CertificatePair>>(&other)),
                    None => {}
                }
            }
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
                vec![Seg::Key(section.clone())],
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

/// One step of a key path: a table key, or the index of an array element
/// (`tls.certificates[0].cert_path`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// Byte offset of the deepest part of `path` found in the document.
fn locate(doc: &toml_edit::ImDocument<&str>, path: &[Seg]) -> Option<usize> {
    let mut table: &dyn toml_edit::TableLike = doc.as_table();
    let mut best = None;
    let mut segs = path.iter().peekable();
    while let Some(seg) = segs.next() {
        let Seg::Key(key) = seg else { break };
        let Some(item) = table.get(key) else { break };
        let span = table
            .key(key)
            .and_then(|k| k.span())
            .or_else(|| item.span());
        best = span.map(|r| r.start).or(best);
        let inner = match segs.next_if(|s| matches!(s, Seg::Index(_))) {
            // An element of `[[key]]` sections or of an inline array of tables.
            Some(Seg::Index(i)) => match item {
                toml_edit::Item::ArrayOfTables(a) => a.get(*i).map(|t| {
                    best = t.span().map(|r| r.start).or(best);
                    t as &dyn toml_edit::TableLike
                }),
                toml_edit::Item::Value(toml_edit::Value::Array(a)) => {
                    a.get(*i).and_then(|v| v.as_inline_table()).map(|t| {
                        best = t.span().map(|r| r.start).or(best);
                        t as &dyn toml_edit::TableLike
                    })
                }
                _ => None,
            },
            _ => item.as_table_like(),
        };
        match inner {
            Some(t) => table = t,
            None => break,
        }
    }
    best
}

/// `path_routes."example.com"."/api/".url`, `tls.certificates[0].cert_path` → segments.
fn split_key(key: &str) -> Vec<Seg> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    // Whether `cur` is a key (`""` is one), not the gap between `]` and `.`.
    let mut open = true;
    let mut chars = key.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                open = true;
            }
            '.' if !quoted => {
                if open {
                    out.push(Seg::Key(std::mem::take(&mut cur)));
                }
                open = true;
            }
            '[' if !quoted => {
                let digits: String =
                    std::iter::from_fn(|| chars.next_if(char::is_ascii_digit)).collect();
                match (digits.parse(), chars.next_if_eq(&']')) {
                    (Ok(i), Some(_)) => {
                        if open {
                            out.push(Seg::Key(std::mem::take(&mut cur)));
                        }
                        out.push(Seg::Index(i));
                        open = false;
                    }
                    _ => {
                        cur.push('[');
                        cur.push_str(&digits);
                        open = true;
                    }
                }
            }
            c => {
                cur.push(c);
                open = true;
            }
        }
    }
    if open {
        out.push(Seg::Key(cur));
    }
    out
}

/// Segments → the key as the config file spells it, quoting where TOML needs quotes.
fn join_key(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                let bare = !k.is_empty()
                    && k.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                if bare {
                    out.push_str(k);
                } else {
                    out.push_str(&format!("\"{k}\""));
                }
            }
        }
    }
    out
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

/// The table in force at byte offset `at`, to name the section of a parse error: the header
/// before it (`a.b`, or `a.b[n]` for the n-th `[[a.b]]` section); or, when `at` is inside a
/// header (an unknown key named there), the part of that header before it.
fn enclosing_table(text: &str, at: usize) -> String {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    if line.trim_start().starts_with('[') {
        let parent = text[line_start..at]
            .trim()
            .trim_start_matches('[')
            .trim()
            .trim_end_matches('.')
            .trim_end();
        if !parent.is_empty() {
            return parent.to_string();
        }
        return header_name(text, line_start);
    }
    let mut start = line_start;
    while start > 0 {
        let prev = text[..start - 1].rfind('\n').map_or(0, |i| i + 1);
        if text[prev..start].trim_start().starts_with('[') {
            return header_name(text, prev);
        }
        start = prev;
    }
    String::new()
}

/// The name of the header on the line at `start`: `[a.b]` → `a.b`, and the n-th `[[a.b]]` of
/// the file (counting from 0) → `a.b[n]`.
fn header_name(text: &str, start: usize) -> String {
    let Some((array, name)) = parse_header(text[start..].lines().next().unwrap_or("")) else {
        return String::new();
    };
    if !array {
        return name.to_string();
    }
    let n = text[..start]
        .lines()
        .filter(|l| parse_header(l) == Some((true, name)))
        .count();
    format!("{name}[{n}]")
}

/// `[[a."b]".c]] # x` → `(true, "a.\"b]\".c")`: whether it is an array-of-tables header, and
/// the name between the brackets (a `]` inside quotes does not close it).
fn parse_header(line: &str) -> Option<(bool, &str)> {
    let line = line.trim_start();
    let array = line.starts_with("[[");
    let inner = line.strip_prefix(if array { "[[" } else { "[" })?;
    let mut quote = None;
    for (i, c) in inner.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, ']') => return Some((array, inner[..i].trim())),
            _ => {}
        }
    }
    None
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
        validate_tls(tls, &mut e);
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

fn validate_tls(tls: &TlsConfig, e: &mut Errors) {
    let before = e.list.len();
    let pairs = std::iter::once(("tls".to_string(), &tls.cert_path, &tls.key_path)).chain(
        tls.certificates
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("tls.certificates[{i}]"), &p.cert_path, &p.key_path)),
    );
    for (at, cert, key) in pairs {
        check_file(cert, &format!("{at}.cert_path"), "TLS certificate file", e);
        check_file(key, &format!("{at}.key_path"), "TLS private key file", e);
    }
    // Read them only when they all exist: one error per missing file is enough.
    if e.list.len() == before {
        if let Err((key, why)) = super::tls::Certificates::load(tls) {
            e.add(key, why);
        }
    }
    if tls.session_ticket_rotation_secs == 0 {
        e.add("tls.session_ticket_rotation_secs", "must be at least 1");
    }
    check_duration(
        "tls.session_ticket_rotation_secs",
        tls.session_ticket_rotation_secs,
        e,
    );
}

/// Each open stream holds a task and its buffers: more than this on one connection is no
/// longer a browser's page but a way to make one worker hold a great deal.
const MAX_H2_STREAMS: u32 = 10_000;

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
    if c.server.keepalive_timeout_secs == 0 {
        e.add("server.keepalive_timeout_secs", "must be at least 1");
    }
    if c.server.client_header_timeout_secs == 0 {
        e.add("server.client_header_timeout_secs", "must be at least 1");
    }
    // RFC 9113 §6.5.2 recommends no fewer than 100; 1 still lets a client make progress.
    if !(1..=MAX_H2_STREAMS).contains(&c.server.http2_max_concurrent_streams) {
        e.add(
            "server.http2_max_concurrent_streams",
            format!("must be between 1 and {MAX_H2_STREAMS}"),
        );
    }
    for (key, v) in [
        (
            "server.shutdown_timeout_secs",
            c.server.shutdown_timeout_secs,
        ),
        (
            "server.keepalive_timeout_secs",
            c.server.keepalive_timeout_secs,
        ),
        (
            "server.client_header_timeout_secs",
            c.server.client_header_timeout_secs,
        ),
    ] {
        check_duration(key, v, e);
    }
    if let Some(pid) = &c.server.pid_file {
        check_parent_dir(pid, "server.pid_file", e);
    }
}

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
    check_duration("logging.flush_interval_ms", l.flush_interval_ms, e);
    if let Some(p) = &l.file_path {
        check_parent_dir(p, "logging.file_path", e);
    }
    if l.access_format().is_none() {
        e.add(
            "logging.access_log_format",
            format!(
                "invalid access log format `{}` (combined, json)",
                l.access_log_format
            ),
        );
    }
    if let Some(p) = &l.access_log {
        check_parent_dir(p, "logging.access_log", e);
        if l.file_path.as_deref() == Some(p.as_str()) {
            e.add(
                "logging.access_log",
                "must not be the error log's file (`logging.file_path`)",
            );
        }
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
        }
        check_duration(&format!("{key}.{name}"), v, e);
    }
    check_duration(
        &format!("{key}.websocket_poll_max_timeout_ms"),
        s.websocket_poll_max_timeout_ms,
        e,
    );
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
        check_duration(&format!("{hk}.interval_secs"), h.interval_secs, e);
        check_duration(&format!("{hk}.timeout_secs"), h.timeout_secs, e);
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

/// Longest timeout a `*_secs` / `*_ms` key takes. Timeouts become deadlines, and
/// `Instant + Duration` panics past the clock's range (`i64::MAX` seconds would kill every
/// worker at its first slow request); a year is longer than any timeout needs.
pub const MAX_TIMEOUT_SECS: u64 = 365 * 24 * 3600;

fn check_duration(key: &str, v: u64, e: &mut Errors) {
    let secs = if key.ends_with("_ms") { v / 1000 } else { v };
    if secs > MAX_TIMEOUT_SECS {
        e.add(
            key,
            format!("must be at most one year ({MAX_TIMEOUT_SECS} seconds)"),
        );
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the config property test: a timeout of i64::MAX seconds validated, and then
    /// `Instant + Duration` panicked in a worker (the head deadline of a request that arrives
    /// in two reads: `conn.rs`) or in the master (the drain deadline).
    #[test]
    fn timeouts_past_a_year_are_errors_naming_the_key() {
        let text = "[server]\nlisten = \"127.0.0.1:1\"\nclient_header_timeout_secs = 9223372036854775807\n\n[host_routes.\"*\"]\ntype = \"Redirect\"\nredirect_url = \"https://x/\"\n[host_routes.\"*\".security]\nwebsocket_poll_max_timeout_ms = 31536001000\nclient_body_timeout_secs = 31536000\n";
        let errors = load_str(text, "t.toml").unwrap_err();
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "server.client_header_timeout_secs",
                "host_routes.\"*\".security.websocket_poll_max_timeout_ms"
            ]
        );
        assert_eq!(errors[0].line, Some(3));
        assert!(
            errors[0].to_string().contains("at most one year"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn key_paths_keep_indices_and_quotes() {
        use Seg::*;
        let k = |s: &str| Key(s.to_string());
        for (key, segs) in [
            (
                "tls.certificates[1].key_path",
                vec![k("tls"), k("certificates"), Index(1), k("key_path")],
            ),
            (
                "path_routes.\"a.b\".\"/x\".url",
                vec![k("path_routes"), k("a.b"), k("/x"), k("url")],
            ),
            // Inside quotes, `[0]` is part of the name.
            ("host_routes.\"a[0]\"", vec![k("host_routes"), k("a[0]")]),
            ("path_routes.\"\".x", vec![k("path_routes"), k(""), k("x")]),
        ] {
            assert_eq!(split_key(key), segs, "{key}");
            assert_eq!(join_key(&segs), key);
        }
    }

    #[test]
    fn the_table_of_an_error_names_array_entries_and_header_parents() {
        let text = "[tls]\na = 1\n[[tls.certificates]]\nx = 1\n[[tls.certificates]]\ny = 2\n[path_routes.\"a]b\".\"/\"]\nz = 3\n";
        let at = |needle: &str| text.find(needle).unwrap();
        assert_eq!(enclosing_table(text, at("a = 1")), "tls");
        assert_eq!(enclosing_table(text, at("x = 1")), "tls.certificates[0]");
        assert_eq!(enclosing_table(text, at("y = 2")), "tls.certificates[1]");
        assert_eq!(
            enclosing_table(text, at("z = 3")),
            "path_routes.\"a]b\".\"/\""
        );
        // Inside a header: the part before the error (an unknown table's parent).
        assert_eq!(enclosing_table(text, at("certificates")), "tls");
        assert_eq!(enclosing_table(text, at("[tls]")), "tls");
    }

    /// Nesting deep enough to overflow a recursive parser's stack is a syntax error.
    #[test]
    fn deeply_nested_values_are_errors() {
        for text in [
            format!("a = {}", "[".repeat(100_000)),
            format!("a = {}", "{ b = ".repeat(100_000)),
        ] {
            assert!(load_str(&text, "t.toml").is_err());
        }
    }
}

/// Property tests: no text makes the loader panic; errors always name the file; and a config
/// that loads prints (`-T`) to text that loads back to the same config, with every duration
/// usable as a deadline.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::select;
    use toml::{Table, Value};

    const FILE: &str = "prop.toml";

    /// What a key holds; a generated value has that type nine times in ten.
    #[derive(Debug, Clone, Copy)]
    enum Kind {
        Str(&'static [&'static str]),
        Int,
        Bool,
        Float,
        List(&'static [&'static str]),
        Map,
    }
    use Kind::*;

    const ADDRS: &[&str] = &[
        "127.0.0.1:18080",
        "[::1]:18443",
        "0.0.0.0:0",
        "localhost:80",
    ];
    const DIRS: &[&str] = &["/tmp", "/", "/nonexistent/x", "/tmp/zcs.pid", ""];
    const URLS: &[&str] = &[
        "http://127.0.0.1:9",
        "https://localhost",
        "http://[::1]:80/app/",
        "https://127.0.0.1/x",
        "ftp://x",
        "http://",
        "http://h:0",
        "http://a b",
    ];
    const IPS: &[&str] = &[
        "10.0.0.0/8",
        "::1",
        "127.0.0.1",
        "2001:db8::/32",
        "300.1.1.1",
        "x",
    ];
    const METHODS: &[&str] = &["GET", "POST", "get", "", "X-Y"];
    const HEADERS: &[&str] = &["X-Test", "Server", "bad header", "X-Ip"];

    const SERVER: &[(&str, Kind)] = &[
        ("listen", Str(ADDRS)),
        ("http_listen", Str(ADDRS)),
        ("threads", Int),
        ("pid_file", Str(DIRS)),
        ("shutdown_timeout_secs", Int),
        ("keepalive_timeout_secs", Int),
        ("client_header_timeout_secs", Int),
        ("http2_cleartext", Bool),
        ("http2_max_concurrent_streams", Int),
        ("bogus", Int),
    ];
    const LOGGING: &[(&str, Kind)] = &[
        ("level", Str(&["info", "debug", "warn", "loud"])),
        ("channel_size", Int),
        ("flush_interval_ms", Int),
        ("max_log_size", Int),
        ("file_path", Str(DIRS)),
        ("access_log", Str(DIRS)),
        ("access_log_format", Str(&["combined", "json", "main"])),
    ];
    const SECURITY: &[(&str, Kind)] = &[
        (
            "drop_privileges_user",
            Str(&["nobody", "root", "no-such-user"]),
        ),
        (
            "drop_privileges_group",
            Str(&["nogroup", "root", "no-such-group"]),
        ),
        ("max_concurrent_connections", Int),
    ];
    const PERFORMANCE: &[(&str, Kind)] = &[
        ("reuseport_balancing", Str(&["kernel", "cbpf", "fast"])),
        ("huge_pages_enabled", Bool),
    ];
    const TLS: &[(&str, Kind)] = &[
        ("cert_path", Str(DIRS)),
        ("key_path", Str(DIRS)),
        ("ktls_enabled", Bool),
        ("http2", Bool),
        ("session_ticket_rotation_secs", Int),
    ];
    const FILE_ROUTE: &[(&str, Kind)] = &[
        ("path", Str(&["/tmp", "/etc/hostname", "/nonexistent"])),
        ("mode", Str(&["sendfile", "memory", "mmap"])),
        ("index", Str(&["index.html", "a/b", "..", ""])),
    ];
    const PROXY_ROUTE: &[(&str, Kind)] = &[
        ("url", Str(URLS)),
        ("upstream", Str(&["backend", "missing"])),
        ("sni_name", Str(&["localhost"])),
        ("ca_file", Str(DIRS)),
    ];
    const REDIRECT_ROUTE: &[(&str, Kind)] = &[
        (
            "redirect_url",
            Str(&["https://example.com$request_uri", "", "a b"]),
        ),
        ("redirect_status", Int),
        ("preserve_path", Bool),
    ];
    const ROUTE_SECURITY: &[(&str, Kind)] = &[
        ("max_request_body_size", Int),
        ("max_chunked_body_size", Int),
        ("max_request_header_size", Int),
        ("client_header_timeout_secs", Int),
        ("client_body_timeout_secs", Int),
        ("backend_connect_timeout_secs", Int),
        ("allowed_methods", List(METHODS)),
        ("rate_limit_requests_per_min", Int),
        ("allowed_ips", List(IPS)),
        ("denied_ips", List(IPS)),
        ("max_idle_connections_per_host", Int),
        ("idle_connection_timeout_secs", Int),
        ("add_request_headers", Map),
        ("add_response_headers", Map),
        ("remove_response_headers", List(HEADERS)),
        ("websocket_poll_mode", Str(&["fixed", "adaptive", "busy"])),
        ("websocket_poll_timeout_ms", Int),
        ("websocket_poll_max_timeout_ms", Int),
        ("websocket_poll_backoff_multiplier", Float),
    ];
    const UPSTREAM: &[(&str, Kind)] = &[
        (
            "algorithm",
            Str(&["round_robin", "least_conn", "ip_hash", "random"]),
        ),
        ("ca_file", Str(DIRS)),
    ];
    const HEALTH: &[(&str, Kind)] = &[
        ("interval_secs", Int),
        ("path", Str(&["/", "/health", "health"])),
        ("timeout_secs", Int),
        ("healthy_statuses", List(&[])),
        ("unhealthy_threshold", Int),
        ("healthy_threshold", Int),
    ];

    fn int() -> impl Strategy<Value = i64> {
        prop_oneof![
            4 => select(vec![1i64, 2, 30, 60, 301, 1024, 8192]),
            2 => select(vec![0i64, -1, 999_999_999_999, i64::MAX, i64::MIN, 31_536_001]),
            1 => any::<i64>(),
        ]
    }

    fn pick(pool: &'static [&'static str]) -> BoxedStrategy<String> {
        if pool.is_empty() {
            return "\\PC{0,8}".boxed();
        }
        prop_oneof![9 => select(pool).prop_map(String::from), 1 => "\\PC{0,8}"].boxed()
    }

    /// Any value at all: the wrong type for most keys.
    fn any_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            "\\PC{0,8}".prop_map(Value::String),
            int().prop_map(Value::Integer),
            any::<bool>().prop_map(Value::Boolean),
            select(vec![0.5f64, 1e300, -1.0, f64::NAN, f64::INFINITY]).prop_map(Value::Float),
            Just(Value::Array(vec![])),
        ]
    }

    fn value(kind: Kind) -> BoxedStrategy<Value> {
        let right = match kind {
            Str(pool) => pick(pool).prop_map(Value::String).boxed(),
            Int => int().prop_map(Value::Integer).boxed(),
            Bool => any::<bool>().prop_map(Value::Boolean).boxed(),
            Float => select(vec![1.0f64, 2.0, 1.5, 100.0, 0.5, f64::NAN])
                .prop_map(Value::Float)
                .boxed(),
            List(&[]) => prop::collection::vec((100i64..700).prop_map(Value::Integer), 0..3)
                .prop_map(Value::Array)
                .boxed(),
            List(pool) => prop::collection::vec(pick(pool).prop_map(Value::String), 0..3)
                .prop_map(Value::Array)
                .boxed(),
            Map => prop::collection::btree_map(pick(HEADERS), pick(&["$client_ip", "v\r\n"]), 0..2)
                .prop_map(|m| {
                    Value::Table(m.into_iter().map(|(k, v)| (k, Value::String(v))).collect())
                })
                .boxed(),
        };
        prop_oneof![9 => right, 1 => any_value()].boxed()
    }

    fn fields(keys: &'static [(&'static str, Kind)]) -> BoxedStrategy<Table> {
        prop::collection::vec(
            select(keys).prop_flat_map(|(k, kind)| (Just(k), value(kind))),
            0..4,
        )
        .prop_map(|kv| kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
        .boxed()
    }

    fn route() -> impl Strategy<Value = Value> {
        let kind = select(vec![
            ("File", FILE_ROUTE),
            ("Proxy", PROXY_ROUTE),
            ("Redirect", REDIRECT_ROUTE),
        ]);
        (kind, prop::option::of(fields(ROUTE_SECURITY)), 0u8..10)
            .prop_flat_map(|((name, keys), sec, foreign)| {
                // Now and then a key of another route type.
                let extra = if foreign == 0 {
                    fields(PROXY_ROUTE)
                } else {
                    Just(Table::new()).boxed()
                };
                (Just(name), fields(keys), Just(sec), extra)
            })
            .prop_map(|(name, mut r, sec, extra)| {
                r.insert("type".into(), Value::String(name.into()));
                r.extend(extra);
                if let Some(s) = sec {
                    r.insert("security".into(), Value::Table(s));
                }
                Value::Table(r)
            })
    }

    fn upstream() -> impl Strategy<Value = Value> {
        (
            fields(UPSTREAM),
            prop::collection::vec(pick(URLS).prop_map(Value::String), 0..3),
            prop::option::of(fields(HEALTH)),
        )
            .prop_map(|(mut u, servers, health)| {
                u.insert("servers".into(), Value::Array(servers));
                if let Some(h) = health {
                    u.insert("health_check".into(), Value::Table(h));
                }
                Value::Table(u)
            })
    }

    fn named<T: std::fmt::Debug>(
        names: Vec<&'static str>,
        item: impl Strategy<Value = T>,
    ) -> impl Strategy<Value = Vec<(String, T)>> {
        prop::collection::vec((select(names).prop_map(String::from), item), 0..3)
    }

    /// A config as an operator might write one: known sections and keys, mostly of the right
    /// type, mostly valid values.
    fn plausible() -> impl Strategy<Value = Table> {
        let sections = (
            prop::option::of(fields(SERVER)),
            prop::option::of(fields(LOGGING)),
            prop::option::of(fields(SECURITY)),
            prop::option::of(fields(PERFORMANCE)),
            prop::option::weighted(0.1, fields(TLS)),
        );
        let hosts = vec!["*", "example.com", "a.test:8080", "example.com", "bad host"];
        let routes = (
            named(hosts.clone(), route()),
            named(
                hosts,
                named(vec!["/", "/api/", "/{x}", "/a*b", "docs"], route()),
            ),
            named(vec!["backend", "b2"], upstream()),
        );
        (sections, routes).prop_map(|((server, logging, security, perf, tls), (hr, pr, up))| {
            let mut t = Table::new();
            for (name, s) in [
                ("server", server),
                ("logging", logging),
                ("security", security),
                ("performance", perf),
                ("tls", tls),
            ] {
                if let Some(s) = s {
                    t.insert(name.into(), Value::Table(s));
                }
            }
            let table = |v: Vec<(String, Value)>| Value::Table(v.into_iter().collect());
            t.insert("host_routes".into(), table(hr));
            let pr = pr.into_iter().map(|(h, paths)| (h, table(paths))).collect();
            t.insert("path_routes".into(), table(pr));
            t.insert("upstreams".into(), table(up));
            t
        })
    }

    fn positive() -> impl Strategy<Value = i64> {
        prop_oneof![
            3 => 1i64..100,
            1 => 1i64..=i64::MAX,
            1 => select(vec![31_536_000i64, 31_536_001, i64::MAX, 1024, 1_048_576]),
        ]
    }

    /// Numbers of a route's `security` table, every other key left valid.
    fn numbers(keys: &'static [&'static str]) -> impl Strategy<Value = Table> {
        prop::collection::btree_map(select(keys).prop_map(String::from), positive(), 0..5)
            .prop_map(|m| m.into_iter().map(|(k, v)| (k, Value::Integer(v))).collect())
    }

    const SECURITY_NUMBERS: &[&str] = &[
        "max_request_body_size",
        "max_chunked_body_size",
        "max_request_header_size",
        "client_header_timeout_secs",
        "client_body_timeout_secs",
        "backend_connect_timeout_secs",
        "rate_limit_requests_per_min",
        "max_idle_connections_per_host",
        "idle_connection_timeout_secs",
        "websocket_poll_timeout_ms",
        "websocket_poll_max_timeout_ms",
    ];

    /// A valid config of each route type whose numbers (timeouts, sizes, counts) are any
    /// positive integer: where the loader must draw the line.
    fn valid_but_for_numbers() -> impl Strategy<Value = Table> {
        (
            numbers(&[
                "shutdown_timeout_secs",
                "keepalive_timeout_secs",
                "client_header_timeout_secs",
                "threads",
            ]),
            numbers(&["flush_interval_ms", "channel_size", "max_log_size"]),
            (
                numbers(SECURITY_NUMBERS),
                numbers(SECURITY_NUMBERS),
                numbers(SECURITY_NUMBERS),
            ),
            numbers(&[
                "interval_secs",
                "timeout_secs",
                "unhealthy_threshold",
                "healthy_threshold",
            ]),
        )
            .prop_map(|(mut server, logging, (s1, s2, s3), health)| {
                server.insert("listen".into(), Value::String("127.0.0.1:18080".into()));
                let text = |s: &str| Value::String(s.into());
                let route = |pairs: &[(&str, &str)], sec: Table| {
                    let mut r: Table = pairs
                        .iter()
                        .map(|(k, v)| (k.to_string(), text(v)))
                        .collect();
                    r.insert("security".into(), Value::Table(sec));
                    Value::Table(r)
                };
                let mut paths = Table::new();
                paths.insert(
                    "/api/".into(),
                    route(&[("type", "Proxy"), ("upstream", "backend")], s2),
                );
                paths.insert(
                    "/r".into(),
                    route(
                        &[("type", "Redirect"), ("redirect_url", "https://127.0.0.1/")],
                        s3,
                    ),
                );
                let mut upstream = Table::new();
                upstream.insert(
                    "servers".into(),
                    Value::Array(vec![text("http://127.0.0.1:9")]),
                );
                upstream.insert("health_check".into(), Value::Table(health));
                let mut t = Table::new();
                t.insert("server".into(), Value::Table(server));
                t.insert("logging".into(), Value::Table(logging));
                let mut hosts = Table::new();
                hosts.insert(
                    "example.com".into(),
                    route(&[("type", "File"), ("path", "/tmp")], s1),
                );
                t.insert("host_routes".into(), Value::Table(hosts));
                let mut pr = Table::new();
                pr.insert("*".into(), Value::Table(paths));
                t.insert("path_routes".into(), Value::Table(pr));
                let mut ups = Table::new();
                ups.insert("backend".into(), Value::Table(upstream));
                t.insert("upstreams".into(), Value::Table(ups));
                t
            })
    }

    /// Every duration of a config that loaded: each must be usable as a deadline from now.
    fn durations(c: &Config) -> Vec<(String, std::time::Duration)> {
        use std::time::Duration;
        let secs = Duration::from_secs;
        let ms = Duration::from_millis;
        let mut out = vec![
            ("shutdown".to_string(), secs(c.server.shutdown_timeout_secs)),
            ("keepalive".into(), secs(c.server.keepalive_timeout_secs)),
            ("header".into(), secs(c.server.client_header_timeout_secs)),
            ("flush".into(), ms(c.logging.flush_interval_ms)),
        ];
        let routes = c
            .host_routes
            .values()
            .chain(c.path_routes.values().flat_map(|p| p.values()));
        for r in routes {
            let s = &r.security;
            for (name, d) in [
                ("route header", secs(s.client_header_timeout_secs)),
                ("body", secs(s.client_body_timeout_secs)),
                ("connect", secs(s.backend_connect_timeout_secs)),
                ("idle", secs(s.idle_connection_timeout_secs)),
                ("poll", ms(s.websocket_poll_timeout_ms)),
                ("poll max", ms(s.websocket_poll_max_timeout_ms)),
            ] {
                out.push((name.into(), d));
            }
        }
        for u in c.upstreams.values() {
            if let Some(h) = &u.health_check {
                out.push(("interval".into(), secs(h.interval_secs)));
                out.push(("health timeout".into(), secs(h.timeout_secs)));
            }
        }
        out
    }

    fn check_loaded(text: &str) -> Result<(), TestCaseError> {
        match load_str(text, FILE) {
            Ok(c) => {
                let now = std::time::Instant::now();
                for (name, d) in durations(&c) {
                    prop_assert!(now.checked_add(d).is_some(), "{name}: {d:?}");
                }
                // What `-T` prints is a config file that loads to the same config.
                let printed =
                    toml::to_string_pretty(&c).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let again = load_str(&printed, FILE)
                    .map_err(|e| TestCaseError::fail(format!("{e:?}\n{printed}")))?;
                prop_assert_eq!(toml::to_string_pretty(&again).ok(), Some(printed));
            }
            Err(errors) => {
                prop_assert!(!errors.is_empty());
                let lines = text.lines().count() + 1;
                for e in &errors {
                    prop_assert_eq!(&e.file, FILE);
                    prop_assert!(e.line.is_none_or(|l| l >= 1 && l <= lines), "{e}");
                    prop_assert!(e.to_string().starts_with(FILE));
                }
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(crate::shared::prop::config(256))]

        #[test]
        fn arbitrary_text_never_panics(
            text in prop_oneof![
                "\\PC{0,120}",
                "([\\[\\]=\"'.,{}#\n ]|[a-z_]{1,8}|[0-9]{1,3}|\\PC){0,40}",
                prop::collection::vec(any::<u8>(), 0..200)
                    .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
            ]
        ) {
            check_loaded(&text)?;
        }

        #[test]
        fn plausible_configs_load_or_say_why(t in prop_oneof![plausible(), valid_but_for_numbers()]) {
            let text = toml::to_string(&t).map_err(|e| TestCaseError::fail(e.to_string()))?;
            check_loaded(&text)?;
        }

        /// Syntax errors in a plausible file: still no panic, still the file's name.
        #[test]
        fn edited_configs_never_panic(
            t in plausible(),
            edits in prop::collection::vec((any::<prop::sample::Index>(), "\\PC|[\\[\\]=\"\n]"), 1..4),
        ) {
            let mut text = toml::to_string(&t).map_err(|e| TestCaseError::fail(e.to_string()))?;
            for (at, s) in edits {
                let mut i = at.index(text.len() + 1);
                while !text.is_char_boundary(i) {
                    i -= 1;
                }
                text.insert_str(i, &s);
            }
            check_loaded(&text)?;
        }
    }
}
