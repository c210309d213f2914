//! The built-in default configuration's welcome page.

use crate::worker::http::respond::{Body, Response};
use crate::worker::http::ResponseHead;
use bytes::Bytes;

const WELCOME: &str = "<!DOCTYPE html>\n<html><head><title>zerocopy-server</title></head>\n<body><h1>zerocopy-server is running</h1>\n<p>This is the built-in default configuration. Write a <code>config.toml</code> and run <code>zerocopy-server -c config.toml</code>.</p>\n<p>Metrics: <a href=\"/__metrics\">/__metrics</a></p></body></html>\n";

/// `path`: the normalized request path.
pub fn answer(path: &str) -> Response {
    if path != "/" {
        return Response::error(404);
    }
    let head = ResponseHead::new(200).header("Content-Type", "text/html; charset=utf-8");
    Response::new(head, Body::Bytes(Bytes::from_static(WELCOME.as_bytes())))
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_the_root_is_welcome() {
        assert_eq!(super::answer("/").status(), 200);
        assert_eq!(super::answer("/x").status(), 404);
    }
}
