//! Request routing: the host table first (`host_routes`, then `path_routes` of that host),
//! then the longest path prefix in a matchit tree. Built once per generation, in the worker,
//! over the route types that the handlers and the proxy own.
//!
//! Host names match case-insensitively with any port removed. A host `"*"` catches requests
//! whose Host matches no configured host; without it they get 404.
//!
//! A route prefix `/p` (with or without a trailing slash) matches `/p`, `/p/` and `/p/...`, but
//! not `/px`; the part after the prefix (`rest`, starting with `/` or empty) goes to the
//! handler.

use super::handlers::access::Access;
use super::handlers::files::FileRoute;
use super::handlers::redirect::RedirectRoute;
use super::proxy::upstream::Upstream;
use super::proxy::ProxyRoute;
use crate::shared::config::{Config, Route, RouteSecurity, RouteType};
use crate::shared::shm::Region;
use std::collections::HashMap;
use std::rc::Rc;

pub struct RouteEntry {
    /// The route's key as configured, for logs.
    pub name: String,
    /// The prefix without its trailing slash (`""` for `/`): what routing strips.
    pub prefix: String,
    pub handler: Handler,
    pub security: RouteSecurity,
    pub access: Access,
    /// The route's requests go to the access log (`access_log = false` silences them).
    pub logged: bool,
}

pub enum Handler {
    File(FileRoute),
    Redirect(RedirectRoute),
    Proxy(ProxyRoute),
    /// The built-in welcome page.
    Welcome,
}

enum HostRoutes {
    Whole(Rc<RouteEntry>),
    Paths(matchit::Router<Rc<RouteEntry>>),
}

pub struct Router {
    hosts: HashMap<String, HostRoutes>,
    wildcard: Option<HostRoutes>,
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
        let upstreams = Upstream::build_all(config, region)?;
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
        Ok(Router { hosts, wildcard })
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

fn entry(name: String, prefix: &str, handler: Handler, route: &Route) -> RouteEntry {
    RouteEntry {
        access: Access::new(&name, &route.security),
        name,
        prefix: prefix.trim_end_matches('/').to_string(),
        handler,
        security: route.security.clone(),
        logged: route.access_log != Some(false),
    }
}

fn handler(
    route: &Route,
    name: &str,
    upstreams: &HashMap<String, Rc<Upstream>>,
) -> Result<Handler, String> {
    Ok(match route.kind {
        RouteType::File => Handler::File(FileRoute::new(route)?),
        RouteType::Redirect => Handler::Redirect(RedirectRoute::new(route)),
        RouteType::Proxy => Handler::Proxy(ProxyRoute::new(route, name, upstreams)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use crate::shared::shm::test_region as region;

    fn redirect(to: &str) -> Route {
        Route {
            kind: RouteType::Redirect,
            redirect_url: Some(to.into()),
            ..Route::default()
        }
    }

    fn name_of(router: &Router, host: &str, path: &str) -> Option<String> {
        router.route(host, path).map(|m| m.route.name.clone())
    }

    #[test]
    fn hosts_match_exactly_then_the_wildcard_takes_the_rest() {
        let mut config = Config::default();
        config
            .host_routes
            .insert("A.test".into(), redirect("https://a/"));
        config
            .host_routes
            .insert("*".into(), redirect("https://any/"));
        let paths = BTreeMap::from([("/api".to_string(), redirect("https://api/"))]);
        config.path_routes.insert("b.test".into(), paths);
        let router = Router::build(&config, false, region()).unwrap();
        assert_eq!(
            name_of(&router, "a.test", "/x").as_deref(),
            Some("host_routes.A.test")
        );
        assert_eq!(
            name_of(&router, "c.test", "/").as_deref(),
            Some("host_routes.*")
        );
        assert_eq!(
            name_of(&router, "b.test", "/api/v1").as_deref(),
            Some("path_routes.b.test./api")
        );
        assert_eq!(
            name_of(&router, "b.test", "/apix"),
            None,
            "no route of b.test"
        );
        let m = router.route("b.test", "/api").unwrap();
        assert!(m.exact);
        assert_eq!(m.rest, "");
    }

    #[test]
    fn a_host_route_shadows_path_routes_of_the_same_host() {
        let mut config = Config::default();
        config
            .host_routes
            .insert("a.test".into(), redirect("https://a/"));
        let paths = BTreeMap::from([("/p".to_string(), redirect("https://p/"))]);
        config.path_routes.insert("a.test".into(), paths);
        let router = Router::build(&config, false, region()).unwrap();
        assert_eq!(
            name_of(&router, "a.test", "/p").as_deref(),
            Some("host_routes.a.test")
        );
    }

    #[test]
    fn the_builtin_config_welcomes_every_host() {
        let router = Router::build(&Config::default(), true, region()).unwrap();
        let m = router.route("whatever.test", "/").unwrap();
        assert!(matches!(m.route.handler, Handler::Welcome));
    }

    #[test]
    fn a_proxy_route_to_an_unknown_upstream_is_an_error() {
        let mut config = Config::default();
        let route = Route {
            kind: RouteType::Proxy,
            upstream: Some("nowhere".into()),
            ..Route::default()
        };
        config.host_routes.insert("a.test".into(), route);
        let err = Router::build(&config, false, region()).err().unwrap();
        assert!(err.contains("nowhere"), "{err}");
    }
}

/// Property test: whatever the configured prefixes (matchit's `{`, `}` and `*` included), a
/// path goes to the route with the longest prefix that matches it at a segment boundary.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    use crate::shared::shm::test_region as region;

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
