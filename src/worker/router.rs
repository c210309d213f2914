//! Request routing: the host table first (`host_routes`, then `path_routes` of that host),
//! then the longest path prefix in a matchit tree. Built once per generation, in the worker.
//!
//! Host names match case-insensitively with any port removed. A host `"*"` catches requests
//! whose Host matches no configured host; without it they get 404.
//!
//! A route prefix `/p` (with or without a trailing slash) matches `/p`, `/p/` and `/p/...`, but
//! not `/px`; the part after the prefix (`rest`, starting with `/` or empty) goes to the
//! handler.

use super::handlers::diskfile::{self, Opened};
use super::proxy::backend::Target;
use super::proxy::upstream::Upstream;
use super::proxy::ProxyRoute;
use crate::shared::config::{
    backend_key, Config, FileMode, MetricsConfig, Route, RouteSecurity, RouteType,
};
use crate::shared::shm::Region;
use bytes::Bytes;
use ipnet::IpNet;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

pub struct RouteEntry {
    /// The route's key as configured, for logs.
    pub name: String,
    /// The prefix without its trailing slash (`""` for `/`): what routing strips.
    pub prefix: String,
    pub handler: Handler,
    pub security: RouteSecurity,
    pub allowed: Vec<IpNet>,
    pub denied: Vec<IpNet>,
}

pub enum Handler {
    File(FileRoute),
    Redirect(RedirectRoute),
    Proxy(ProxyRoute),
    /// The built-in welcome page.
    Welcome,
}

pub struct FileRoute {
    pub root: PathBuf,
    /// `root` with its symlinks resolved: what every file served must lie under.
    pub root_canon: PathBuf,
    /// The root directory, opened once (O_PATH), for `openat2(RESOLVE_BENEATH)`.
    pub root_fd: Option<std::os::fd::OwnedFd>,
    pub is_dir: bool,
    pub index: String,
    /// `mode = "memory"`: files by resolved path, read when the generation starts.
    pub cache: HashMap<PathBuf, Cached>,
}

/// A file of a memory route: its bytes and its metadata, both as they were when read.
pub struct Cached {
    pub bytes: Bytes,
    pub meta: std::fs::Metadata,
}

pub struct RedirectRoute {
    pub url: String,
    pub status: u16,
    pub preserve_path: bool,
}

enum HostRoutes {
    Whole(Rc<RouteEntry>),
    Paths(matchit::Router<Rc<RouteEntry>>),
}

pub struct Router {
    hosts: HashMap<String, HostRoutes>,
    wildcard: Option<HostRoutes>,
    pub metrics: MetricsAccess,
}

/// `[metrics]`: the metrics endpoint's path, answered before routing on every host, and the
/// addresses that may read it (empty: all).
pub struct MetricsAccess {
    pub path: String,
    allowed: Vec<IpNet>,
}

impl MetricsAccess {
    fn new(m: &MetricsConfig) -> MetricsAccess {
        MetricsAccess {
            path: m.path.clone(),
            allowed: parse_ips(&m.allowed_ips),
        }
    }

    pub fn allows(&self, ip: std::net::IpAddr) -> bool {
        self.allowed.is_empty() || self.allowed.iter().any(|n| n.contains(&ip))
    }
}

pub struct Matched<'a> {
    pub route: &'a RouteEntry,
    /// The path after the route's prefix: empty or starting with `/`.
    pub rest: String,
    /// The path is the prefix itself (`/` for the root route): what an exact-file route needs.
    pub exact: bool,
}

impl Router {
    pub fn build(config: &Config, builtin: bool, region: &Region) -> Result<Router, String> {
        let upstreams = build_upstreams(config, region)?;
        let handler = |route: &Route, name: &str| handler(route, name, &upstreams);
        let mut hosts = HashMap::new();
        let mut wildcard = None;
        if builtin {
            let entry = Rc::new(entry(
                "welcome".into(),
                "",
                Handler::Welcome,
                &Route::default(),
            ));
            wildcard = Some(HostRoutes::Whole(entry));
        }
        for (host, route) in &config.host_routes {
            let e = Rc::new(entry(
                format!("host_routes.{host}"),
                "",
                handler(route, host)?,
                route,
            ));
            insert(&mut hosts, &mut wildcard, host, HostRoutes::Whole(e));
        }
        for (host, paths) in &config.path_routes {
            if config.host_routes.contains_key(host) {
                log::warn!("path_routes.\"{host}\" is shadowed: host_routes.\"{host}\" takes every request of that host");
                continue;
            }
            let mut tree = matchit::Router::new();
            for (prefix, route) in paths {
                let e = Rc::new(entry(
                    format!("path_routes.{host}.{prefix}"),
                    prefix,
                    handler(route, prefix)?,
                    route,
                ));
                let base = escape(prefix.trim_end_matches('/'));
                // `/p`, `/p/` and `/p/...` (a catch-all never matches the empty string).
                for pattern in [
                    base.clone(),
                    format!("{base}/"),
                    format!("{base}/{{*rest}}"),
                ] {
                    if pattern.is_empty() {
                        continue;
                    }
                    // `/docs` and `/docs/` are one route: their second insert is a duplicate.
                    let _ = tree.insert(pattern, e.clone());
                }
            }
            insert(&mut hosts, &mut wildcard, host, HostRoutes::Paths(tree));
        }
        let metrics = MetricsAccess::new(&config.metrics);
        Ok(Router {
            hosts,
            wildcard,
            metrics,
        })
    }

    /// `host` is the Host header's name, already lower-cased and without port.
    pub fn route<'a>(&'a self, host: &str, path: &str) -> Option<Matched<'a>> {
        let routes = self.hosts.get(host).or(self.wildcard.as_ref())?;
        match routes {
            HostRoutes::Whole(e) => Some(Matched {
                route: e,
                rest: path.to_string(),
                exact: path == "/",
            }),
            HostRoutes::Paths(tree) => {
                let route = tree.at(path).ok()?.value;
                let rest = path.get(route.prefix.len()..).unwrap_or_default();
                Some(Matched {
                    route,
                    rest: rest.to_string(),
                    exact: rest.is_empty() || (route.prefix.is_empty() && rest == "/"),
                })
            }
        }
    }
}

fn insert(
    hosts: &mut HashMap<String, HostRoutes>,
    wildcard: &mut Option<HostRoutes>,
    host: &str,
    routes: HostRoutes,
) {
    if host == "*" {
        *wildcard = Some(routes);
    } else {
        hosts.insert(host.to_ascii_lowercase(), routes);
    }
}

/// matchit gives `{` and `}` a meaning; a literal one is doubled.
fn escape(prefix: &str) -> String {
    prefix.replace('{', "{{").replace('}', "}}")
}

/// Validation refused every entry that does not parse.
fn parse_ips(list: &[String]) -> Vec<IpNet> {
    list.iter()
        .filter_map(|s| crate::shared::validate::parse_cidr(s))
        .collect()
}

fn entry(name: String, prefix: &str, handler: Handler, route: &Route) -> RouteEntry {
    RouteEntry {
        name,
        prefix: prefix.trim_end_matches('/').to_string(),
        handler,
        security: route.security.clone(),
        allowed: parse_ips(&route.security.allowed_ips),
        denied: parse_ips(&route.security.denied_ips),
    }
}

/// Every upstream, its servers resolved, shared by the routes that name it.
fn build_upstreams(
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
        out.insert(
            name.clone(),
            Rc::new(Upstream::new(name.clone(), up.algorithm, servers)),
        );
    }
    Ok(out)
}

fn handler(
    route: &Route,
    name: &str,
    upstreams: &HashMap<String, Rc<Upstream>>,
) -> Result<Handler, String> {
    Ok(match route.kind {
        RouteType::File => {
            let root = PathBuf::from(route.path.clone().unwrap_or_default());
            let meta = std::fs::metadata(&root).map_err(|e| format!("{}: {e}", root.display()))?;
            let mode = route.mode.unwrap_or_default();
            let cache = if mode == FileMode::Memory {
                load_memory(&root)?
            } else {
                HashMap::new()
            };
            let root_canon = root
                .canonicalize()
                .map_err(|e| format!("{}: {e}", root.display()))?;
            let root_fd = if meta.is_dir() {
                open_dir(&root_canon)
            } else {
                None
            };
            Handler::File(FileRoute {
                is_dir: meta.is_dir(),
                root,
                root_canon,
                root_fd,
                index: route.index.clone().unwrap_or_else(|| "index.html".into()),
                cache,
            })
        }
        RouteType::Redirect => Handler::Redirect(RedirectRoute {
            url: route.redirect_url.clone().unwrap_or_default(),
            status: route.redirect_status.unwrap_or(301),
            preserve_path: route.preserve_path.unwrap_or(false),
        }),
        RouteType::Proxy => {
            let upstream = match (&route.upstream, &route.url) {
                (Some(u), _) => upstreams
                    .get(u)
                    .cloned()
                    .ok_or_else(|| format!("upstream `{u}` not found"))?,
                (None, Some(url)) => {
                    let target = Target::new(
                        url,
                        route.sni_name.as_deref(),
                        route.ca_file.as_deref(),
                        None,
                    )?;
                    let algorithm = crate::shared::config::Algorithm::RoundRobin;
                    Rc::new(Upstream::new(
                        name.to_string(),
                        algorithm,
                        vec![Rc::new(target)],
                    ))
                }
                (None, None) => {
                    return Err(format!("{name}: a Proxy route needs `url` or `upstream`"))
                }
            };
            Handler::Proxy(ProxyRoute { upstream })
        }
    })
}

/// Total bytes one `memory` directory route may hold; files past it are served from disk.
const MEMORY_ROUTE_MAX: u64 = 256 * 1024 * 1024;

/// Reads a `memory` route's file, or every file under its directory, keyed by resolved path.
/// Only the root itself must load: an entry below it that vanished, may not be read or is not
/// a regular file is left out (with a warning) and served from disk like a new file, where
/// such a file gets its 403 or 404.
fn load_memory(root: &Path) -> Result<HashMap<PathBuf, Cached>, String> {
    let mut cache = HashMap::new();
    let mut total = 0u64;
    let root = root
        .canonicalize()
        .map_err(|e| format!("{}: {e}", root.display()))?;
    let mut pending = vec![root.clone()];
    let mut seen = std::collections::HashSet::new();
    while let Some(path) = pending.pop() {
        // Only what the route can serve (under its root), each once: symlink loops end here.
        if !path.starts_with(&root) || !seen.insert(path.clone()) {
            continue;
        }
        let is_root = path == root;
        let failed = |why: String| {
            let msg = format!("{}: {why}", path.display());
            if is_root {
                return Err(msg);
            }
            log::warn!("{msg}; not held in memory");
            Ok(())
        };
        let opened = match diskfile::open(&path) {
            Ok(opened) => opened,
            Err(e) => {
                failed(e.to_string())?;
                continue;
            }
        };
        match opened {
            Opened::Dir => match std::fs::read_dir(&path) {
                Ok(entries) => pending.extend(
                    entries
                        .flatten()
                        .filter_map(|entry| entry.path().canonicalize().ok()),
                ),
                Err(e) => failed(e.to_string())?,
            },
            Opened::Special => failed("not a regular file or directory".into())?,
            Opened::File(file, meta) => {
                // A single-file route holds its file whatever its size: that is what it asks for.
                if !is_root && total + meta.len() > MEMORY_ROUTE_MAX {
                    log::warn!(
                        "{}: memory route over {} MiB; served from disk",
                        path.display(),
                        MEMORY_ROUTE_MAX >> 20
                    );
                    continue;
                }
                match read_cached(file, meta) {
                    Ok(cached) => {
                        total += cached.bytes.len() as u64;
                        cache.insert(path, cached);
                    }
                    Err(e) => failed(e.to_string())?,
                }
            }
        }
    }
    Ok(cache)
}

/// Reads at most the `meta.len()` bytes that the memory budget admitted: a file that grows
/// while read is held as its first `len` bytes, one that shrinks as what was there. Handlers
/// take the length from the bytes, so what is served is always self-consistent.
fn read_cached(file: std::fs::File, meta: std::fs::Metadata) -> std::io::Result<Cached> {
    use std::io::Read;
    let mut data = Vec::with_capacity(meta.len() as usize);
    let mut file = file.take(meta.len());
    file.read_to_end(&mut data)?;
    // The validators then name the version read (a change during the read moves mtime).
    let meta = file.get_ref().metadata().unwrap_or(meta);
    Ok(Cached {
        bytes: Bytes::from(data),
        meta,
    })
}

/// An O_PATH descriptor of a route's root directory.
fn open_dir(path: &Path) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    (fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn stat_then_change(before: &[u8], after: &[u8]) -> Cached {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        std::fs::write(&path, before).unwrap();
        let Ok(Opened::File(file, meta)) = diskfile::open(&path) else {
            panic!("a regular file");
        };
        let mut w = std::fs::File::create(&path).unwrap();
        w.write_all(after).unwrap();
        read_cached(file, meta).unwrap()
    }

    #[test]
    fn a_file_that_changes_between_stat_and_read_is_held_as_read() {
        // Shrunk: what is there; grown: no more than was stat'ed (the budget counted that).
        assert_eq!(&stat_then_change(b"0123456789", b"abc").bytes[..], b"abc");
        assert_eq!(&stat_then_change(b"0123", b"abcdefghij").bytes[..], b"abcd");
        // The validators describe the version read.
        let c = stat_then_change(b"0123456789", b"abc");
        assert_eq!(c.meta.len(), 3);
    }
}

/// Property test: whatever the configured prefixes (matchit's `{`, `}` and `*` included), a
/// path goes to the route with the longest prefix that matches it at a segment boundary.
#[cfg(test)]
mod props {
    use super::*;
    use crate::shared::config::Route;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn region() -> &'static Region {
        static SHM: std::sync::OnceLock<crate::shared::shm::Shm> = std::sync::OnceLock::new();
        SHM.get_or_init(|| crate::shared::shm::Shm::create().expect("memfd"))
            .region()
    }

    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => "[a-c]{1,2}",
            1 => "[a-c{}*:.-]{1,3}",
        ]
    }

    fn prefix() -> impl Strategy<Value = String> {
        (prop::collection::vec(segment(), 0..3), any::<bool>()).prop_map(|(segs, slash)| {
            let mut p = format!("/{}", segs.join("/"));
            if slash && !p.ends_with('/') {
                p.push('/');
            }
            p
        })
    }

    /// The routes' bases (prefixes without their trailing slash), one route per base.
    fn prefixes() -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec(prefix(), 1..6).prop_map(|ps| {
            let mut seen = std::collections::HashSet::new();
            ps.into_iter()
                .filter(|p| seen.insert(p.trim_end_matches('/').to_string()))
                .collect()
        })
    }

    fn longest<'a>(bases: impl Iterator<Item = &'a str>, path: &str) -> Option<&'a str> {
        bases
            .filter(|b| path == *b || path.starts_with(&format!("{b}/")) || b.is_empty())
            .max_by_key(|b| b.len())
    }

    proptest! {
        #![proptest_config(crate::shared::prop::config(256))]

        #[test]
        fn the_longest_matching_prefix_wins(
            prefixes in prefixes(),
            paths in prop::collection::vec((any::<prop::sample::Index>(), prop::collection::vec(segment(), 0..3), any::<bool>()), 1..8),
        ) {
            let mut routes = BTreeMap::new();
            for (i, p) in prefixes.iter().enumerate() {
                let route = Route {
                    kind: RouteType::Redirect,
                    redirect_url: Some(format!("https://x/{i}")),
                    ..Route::default()
                };
                routes.insert(p.clone(), route);
            }
            let mut config = Config::default();
            config.path_routes.insert("a.test".into(), routes);
            let router = Router::build(&config, false, region()).map_err(TestCaseError::fail)?;
            let bases: Vec<String> = prefixes.iter().map(|p| p.trim_end_matches('/').to_string()).collect();
            for (at, tail, slash) in paths {
                // Under some route's prefix, or anywhere.
                let mut path = at.get(&bases).clone();
                for s in tail {
                    path.push('/');
                    path.push_str(&s);
                }
                if slash || path.is_empty() {
                    path.push('/');
                }
                let want = longest(bases.iter().map(String::as_str), &path);
                let got = router.route("a.test", &path);
                prop_assert_eq!(got.as_ref().map(|m| m.route.prefix.as_str()), want, "{}", path);
                if let (Some(m), Some(b)) = (got, want) {
                    prop_assert_eq!(m.rest.as_str(), &path[b.len()..]);
                }
            }
        }
    }
}
