//! `Redirect` routes.

use crate::shared::config::Route;
use crate::worker::http::respond::{Body, Response};
use crate::worker::http::{self, Request, ResponseHead};
use bytes::Bytes;

pub struct RedirectRoute {
    pub url: String,
    pub status: u16,
    pub preserve_path: bool,
}

impl RedirectRoute {
    pub fn new(route: &Route) -> RedirectRoute {
        RedirectRoute {
            url: route.redirect_url.clone().unwrap_or_default(),
            status: route.redirect_status.unwrap_or(301),
            preserve_path: route.preserve_path.unwrap_or(false),
        }
    }

    /// `rest`: the normalized path after the route's prefix. `$request_uri` is the target
    /// as sent; `$path` and a preserved path are re-encoded.
    pub fn answer(&self, req: &Request, rest: &str) -> Response {
        let head = ResponseHead::new(self.status)
            .header("Location", self.location(req, rest))
            .header("Content-Type", "text/plain; charset=utf-8");
        let body = format!("{} {}\n", self.status, http::reason(self.status));
        Response::new(head, Body::Bytes(Bytes::from(body)))
    }

    fn location(&self, req: &Request, rest: &str) -> String {
        let path_var = if rest.is_empty() { "/" } else { rest };
        let mut location = self
            .url
            .replace("$request_uri", &req.target)
            .replace("$path", &http::encode_path(path_var));
        if self.preserve_path {
            location.push_str(&http::encode_path(rest));
            if let Some(q) = req.target.find('?') {
                location.push_str(&req.target[q..]);
            }
        }
        location
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(target: &str) -> Request {
        Request {
            method: "GET".into(),
            target: target.into(),
            version: 1,
            headers: vec![],
        }
    }

    fn route(url: &str, preserve_path: bool) -> RedirectRoute {
        RedirectRoute {
            url: url.into(),
            status: 308,
            preserve_path,
        }
    }

    #[test]
    fn variables_are_replaced_and_paths_re_encoded() {
        let req = get("/old/a%20b?x=1");
        let r = route("https://new.test$path", false);
        assert_eq!(r.location(&req, "/a b"), "https://new.test/a%20b");
        let r = route("https://new.test$request_uri", false);
        assert_eq!(r.location(&req, "/a b"), "https://new.test/old/a%20b?x=1");
        let r = route("https://new.test$path", false);
        assert_eq!(
            r.location(&req, ""),
            "https://new.test/",
            "$path is never empty"
        );
    }

    #[test]
    fn a_preserved_path_keeps_the_query() {
        let req = get("/old/d\u{e9}j\u{e0}?q=1");
        let r = route("https://new.test/base", true);
        assert_eq!(
            r.location(&req, "/d\u{e9}j\u{e0}"),
            "https://new.test/base/d%C3%A9j%C3%A0?q=1"
        );
    }

    #[test]
    fn the_answer_has_its_status_and_a_short_body() {
        let r = route("https://x.test/", false).answer(&get("/"), "/");
        assert_eq!(r.status(), 308);
        match r.body {
            Body::Bytes(b) => assert_eq!(&b[..], b"308 Permanent Redirect\n"),
            _ => panic!("a text body"),
        }
    }
}
