//! Backend URLs as the config writes them: `http://host[:port][/path]` or `https://...`.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendUrl {
    pub tls: bool,
    /// Host as written (IPv6 literals keep their brackets).
    pub host: String,
    pub port: u16,
    /// Path prefix, always starting with `/`.
    pub path: String,
}

impl BackendUrl {
    pub fn parse(s: &str) -> Result<BackendUrl, String> {
        let (tls, rest) = if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else {
            return Err("scheme must be http:// or https://".into());
        };
        let (authority, path) = match rest.find(['/', '?', '#']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], &rest[i..]),
            Some(_) => return Err("query strings and fragments are not allowed".into()),
            None => (rest, "/"),
        };
        if path.contains(['?', '#']) {
            return Err("query strings and fragments are not allowed".into());
        }
        if authority.contains('@') {
            return Err("user information is not allowed".into());
        }
        let (host, port) = split_host_port(authority, if tls { 443 } else { 80 })?;
        if host.is_empty() {
            return Err("missing host".into());
        }
        Ok(BackendUrl {
            tls,
            host: host.to_string(),
            port,
            path: path.to_string(),
        })
    }
}

fn split_host_port(authority: &str, default_port: u16) -> Result<(&str, u16), String> {
    let (host, port) = if authority.starts_with('[') {
        let end = authority.find(']').ok_or("unclosed `[` in IPv6 address")?;
        let host = &authority[..=end];
        host[1..end]
            .parse::<std::net::Ipv6Addr>()
            .map_err(|_| "invalid IPv6 address")?;
        match &authority[end + 1..] {
            "" => (host, None),
            p if p.starts_with(':') => (host, Some(&p[1..])),
            _ => return Err("junk after IPv6 address".into()),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if !host.starts_with('[')
        && !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        return Err(format!("invalid host `{host}`"));
    }
    let port = match port {
        None => default_port,
        // Digits only: `parse` would also take `+80`.
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|n| *n != 0 && p.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| format!("invalid port `{p}`"))?,
    };
    Ok((host, port))
}

impl BackendUrl {
    /// The addresses of the host (a literal, or a name through the system resolver).
    pub fn addrs(&self) -> std::io::Result<Vec<std::net::SocketAddr>> {
        use std::net::ToSocketAddrs;
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        let addrs: Vec<_> = (host, self.port).to_socket_addrs()?.collect();
        if addrs.is_empty() {
            return Err(std::io::ErrorKind::NotFound.into());
        }
        Ok(addrs)
    }

    /// `host[:port]`, the port only when it is not the scheme's default: the Host header.
    pub fn authority(&self) -> String {
        let default = if self.tls { 443 } else { 80 };
        if self.port == default {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The name the TLS client sends and verifies: `sni_name`, else the host.
    pub fn server_name(&self, sni: Option<&str>) -> String {
        sni.map(str::to_string).unwrap_or_else(|| {
            self.host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string()
        })
    }
}

impl fmt::Display for BackendUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}:{}{}", self.host, self.port, self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_the_spec_uses() {
        let u = BackendUrl::parse("http://localhost:8080/app/").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.path.as_str()),
            (false, "localhost", 8080, "/app/")
        );
        let u = BackendUrl::parse("https://192.168.1.100").unwrap();
        assert_eq!((u.tls, u.port, u.path.as_str()), (true, 443, "/"));
        let u = BackendUrl::parse("http://[::1]:3000").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("[::1]", 3000));
        for bad in [
            "invalid-url",
            "ftp://x",
            "http://",
            "http://h:0",
            "http://h:99999",
            "http://h:+80",
            "http://a b",
            "http://h/?q",
        ] {
            assert!(BackendUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
