//! Kernel TLS: whether TLS records may be offloaded to the kernel, decided once per worker,
//! and the offload itself (`offload`: rustls' traffic secrets handed to the socket).
//!
//! The decision the spec describes: with `ktls_enabled`, a worker probes the kernel (the TLS
//! ULP, then each cipher, on loopback connections of its own) and, when kTLS cannot be used,
//! either keeps TLS in user space (`ktls_fallback_enabled = true`) or refuses TLS connections
//! (`false`), saying which and why in one log line.
//!
//! When the kernel takes at least one (version, cipher) pair, each TLS connection is handed
//! to it after its rustls handshake (`stream::KtlsStream`); a connection whose suite the
//! kernel lacks stays in rustls.

use crate::shared::config::TlsConfig;

// Built for tests in every build, so its unit tests run in the default suite.
#[cfg(any(test, feature = "ktls"))]
#[cfg_attr(not(feature = "ktls"), allow(dead_code))]
pub mod offload;
#[cfg(feature = "ktls")]
pub mod stream;

/// What to do with TLS connections.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    /// rustls in user space.
    UserSpace,
    /// kTLS is required and unavailable: TLS connections are closed after accept.
    Refuse,
    /// The kernel takes these (version, cipher) pairs: connections using one are offloaded
    /// after their handshake, the others stay in rustls.
    #[cfg(feature = "ktls")]
    Offload(offload::Support),
}

pub fn decide(tls: &TlsConfig) -> Mode {
    if !tls.ktls_enabled {
        return Mode::UserSpace;
    }
    #[cfg(feature = "ktls")]
    if let Ok(support) = offload::probe() {
        if !support.is_empty() {
            log::info!(
                "kTLS: TLS connections are handed to the kernel after their handshake ({})",
                support.describe()
            );
            return Mode::Offload(support);
        }
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
        Ok(support) => format!("the kernel offers kTLS ({})", support.describe()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            "the kernel has no TLS ULP: setsockopt(TCP_ULP, \"tls\") gives ENOENT; `modprobe tls` or a kernel with CONFIG_TLS".into()
        }
        Err(e) => format!("setsockopt(TCP_ULP, \"tls\") failed: {e}"),
    }
}
