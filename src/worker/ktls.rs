//! Kernel TLS: whether TLS records may be offloaded to the kernel, decided once per worker,
//! and the offload itself (`offload`: rustls' traffic secrets handed to the socket).
//!
//! The decision the spec describes: with `ktls_enabled`, a worker probes the kernel (the TLS
//! ULP, then each cipher, on loopback connections of its own) and, when kTLS cannot be used,
//! either keeps TLS in user space (`ktls_fallback_enabled = true`) or refuses TLS connections
//! (`false`), saying which and why in one log line.
//!
//! Connections are not handed to the kernel yet: that waits for the TLS stream that owns the
//! handshake (issue 9, item 4). Until then a kernel that offers kTLS is reported as such and
//! TLS stays in rustls.

use crate::shared::config::TlsConfig;

// Built for tests in every build, so its unit tests run in the default suite; its callers in
// the connection path come with item 4.
#[cfg(any(test, feature = "ktls"))]
#[cfg_attr(not(test), allow(dead_code))]
pub mod offload;

/// What to do with TLS connections.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    /// rustls in user space.
    UserSpace,
    /// kTLS is required and unavailable: TLS connections are closed after accept.
    Refuse,
}

pub fn decide(tls: &TlsConfig) -> Mode {
    if !tls.ktls_enabled {
        return Mode::UserSpace;
    }
    let why = unavailable_reason();
    if tls.ktls_fallback_enabled {
        log::warn!("kTLS requested but not used ({why}): TLS stays in user space (rustls)");
        Mode::UserSpace
    } else {
        log::error!("kTLS required (tls.ktls_fallback_enabled = false) but not available ({why}): TLS connections are refused");
        Mode::Refuse
    }
}

#[cfg(not(feature = "ktls"))]
fn unavailable_reason() -> String {
    "this binary was built without `--features ktls`".into()
}

#[cfg(feature = "ktls")]
fn unavailable_reason() -> String {
    match offload::probe() {
        Ok(support) if support.is_empty() => {
            "the kernel has the TLS ULP but none of the ciphers rustls offers".into()
        }
        Ok(support) => format!(
            "the kernel offers kTLS ({}), but connections are not handed to it yet",
            support.describe()
        ),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            "the kernel has no TLS ULP: setsockopt(TCP_ULP, \"tls\") gives ENOENT; `modprobe tls` or a kernel with CONFIG_TLS".into()
        }
        Err(e) => format!("setsockopt(TCP_ULP, \"tls\") failed: {e}"),
    }
}
