//! Kernel TLS: whether TLS records may be offloaded to the kernel, decided once per worker.
//!
//! The offload itself (handing rustls' traffic secrets to the socket with `SOL_TLS`) is not
//! built yet. What is built is the decision the spec describes: with `ktls_enabled`, a worker
//! probes the kernel (`setsockopt(TCP_ULP, "tls")` on a loopback connection) and, when kTLS
//! cannot be used, either keeps TLS in user space (`ktls_fallback_enabled = true`) or refuses
//! TLS connections (`false`), saying which and why in one log line.

use crate::shared::config::TlsConfig;

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
    match probe() {
        Ok(()) => "the kernel offers the TLS ULP, but record offload is not built yet".into(),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            "the kernel has no TLS ULP: setsockopt(TCP_ULP, \"tls\") gives ENOENT; `modprobe tls` or a kernel with CONFIG_TLS".into()
        }
        Err(e) => format!("setsockopt(TCP_ULP, \"tls\") failed: {e}"),
    }
}

/// Attaches the TLS ULP to a fresh loopback connection: the kernel's own answer.
#[cfg(feature = "ktls")]
fn probe() -> std::io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt::TcpUlp};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let client = std::net::TcpStream::connect(listener.local_addr()?)?;
    let _server = listener.accept()?;
    setsockopt(&client, TcpUlp::default(), b"tls")?;
    Ok(())
}
