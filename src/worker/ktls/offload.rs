//! The offload: rustls' traffic secrets handed to a TCP socket (`TCP_ULP "tls"`, then
//! `SOL_TLS` `TLS_TX` and `TLS_RX`), after which the kernel encrypts what is written and
//! decrypts what is read, so plain `write`, `sendfile` and `read` carry TLS records.
//!
//! What the caller must guarantee before `offload`:
//! - the handshake is complete and rustls has sent every record it queued (TLS 1.3 session
//!   tickets among them): `dangerous_extract_secrets` refuses otherwise;
//! - rustls holds no part of a record past the handshake: ciphertext it buffered but did not
//!   decrypt is dropped on extraction, and the kernel would start reading in the middle of a
//!   record, so the handshake must read whole records only (a TLS 1.3 client's first request
//!   often follows its Finished in the same segment); plaintext rustls did decrypt must be
//!   taken from it first and served before the first read from the socket.
//!
//! After it, a record that is not application data (an alert, a TLS 1.3 `KeyUpdate`) makes a
//! plain read fail with `EIO`; `recv` reads it with its record type (`TLS_GET_RECORD_TYPE`) and
//! `control` decides what it means. It never reaches the caller as data.
//!
//! Only the three AEADs the kernel and rustls share are offloaded: AES-GCM-128, AES-GCM-256
//! and ChaCha20-Poly1305, in TLS 1.2 and 1.3. Which of them this kernel takes is probed once
//! (`probe`), so a connection whose suite the kernel lacks stays in rustls.

use rustls::kernel::KernelConnection;
use rustls::{CipherSuite, ConnectionTrafficSecrets, ExtractedSecrets, ProtocolVersion};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// TLS record content types (RFC 8446 §5.1).
#[cfg_attr(not(test), allow(dead_code))]
pub const CHANGE_CIPHER_SPEC: u8 = 20;
pub const ALERT: u8 = 21;
pub const HANDSHAKE: u8 = 22;
pub const APPLICATION_DATA: u8 = 23;

/// Handshake message types that may arrive after the handshake (RFC 8446 §4).
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;

const CLOSE_NOTIFY: u8 = 0;
const USER_CANCELED: u8 = 90;
const WARNING: u8 = 1;

/// `TCP_ULP_NAME_MAX` in the kernel.
const ULP_NAME_MAX: usize = 16;

/// The AEADs both rustls and the kernel implement.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Cipher {
    AesGcm128,
    AesGcm256,
    Chacha20Poly1305,
}

impl Cipher {
    pub const ALL: [Cipher; 3] = [
        Cipher::AesGcm128,
        Cipher::AesGcm256,
        Cipher::Chacha20Poly1305,
    ];

    /// The AEAD of a negotiated suite; `None` for one the kernel cannot take.
    pub fn of_suite(suite: CipherSuite) -> Option<Cipher> {
        use CipherSuite::*;
        match suite {
            TLS13_AES_128_GCM_SHA256
            | TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => Some(Cipher::AesGcm128),
            TLS13_AES_256_GCM_SHA384
            | TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
            | TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => Some(Cipher::AesGcm256),
            TLS13_CHACHA20_POLY1305_SHA256
            | TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
            | TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => Some(Cipher::Chacha20Poly1305),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Cipher::AesGcm128 => "AES-GCM-128",
            Cipher::AesGcm256 => "AES-GCM-256",
            Cipher::Chacha20Poly1305 => "ChaCha20-Poly1305",
        }
    }
}

/// The kernel's number for a protocol version (`TLS_1_2_VERSION`, `TLS_1_3_VERSION`).
fn kernel_version(version: ProtocolVersion) -> io::Result<u16> {
    match version {
        ProtocolVersion::TLSv1_2 => Ok(libc::TLS_1_2_VERSION),
        ProtocolVersion::TLSv1_3 => Ok(libc::TLS_1_3_VERSION),
        v => Err(unsupported(format!("kTLS does not take {v:?}"))),
    }
}

fn unsupported(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, why)
}

fn invalid(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// One direction's keys as the kernel takes them (`struct tls12_crypto_info_*`: the 1.2 in
/// the name is historical, `info.version` says which version). The key is wiped on drop.
pub enum CryptoInfo {
    AesGcm128(libc::tls12_crypto_info_aes_gcm_128),
    AesGcm256(libc::tls12_crypto_info_aes_gcm_256),
    Chacha20Poly1305(libc::tls12_crypto_info_chacha20_poly1305),
}

impl CryptoInfo {
    /// From rustls' secrets for one direction and the sequence number of its next record.
    pub fn new(
        version: ProtocolVersion,
        seq: u64,
        secrets: &ConnectionTrafficSecrets,
    ) -> io::Result<CryptoInfo> {
        let (cipher, key, iv) = match secrets {
            // The AES variant rustls names has not always matched the key (rustls#1833): the
            // key's length decides.
            ConnectionTrafficSecrets::Aes128Gcm { key, iv }
            | ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
                let cipher = match key.as_ref().len() {
                    16 => Cipher::AesGcm128,
                    32 => Cipher::AesGcm256,
                    n => return Err(invalid(format!("an AES-GCM key of {n} bytes"))),
                };
                (cipher, key.as_ref(), iv.as_ref())
            }
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (Cipher::Chacha20Poly1305, key.as_ref(), iv.as_ref())
            }
            _ => return Err(unsupported("a cipher kTLS does not take".into())),
        };
        Self::from_parts(version, cipher, key, iv, seq)
    }

    /// `iv` is the 12-byte nonce base rustls holds: for AES-GCM the kernel takes its first 4
    /// bytes as the salt and the other 8 as the IV; for ChaCha20-Poly1305 all 12 are the IV.
    pub fn from_parts(
        version: ProtocolVersion,
        cipher: Cipher,
        key: &[u8],
        iv: &[u8],
        seq: u64,
    ) -> io::Result<CryptoInfo> {
        let version = kernel_version(version)?;
        let rec_seq = seq.to_be_bytes();
        let wrong = |what: &str| invalid(format!("{} {what} of the wrong length", cipher.name()));
        Ok(match cipher {
            Cipher::AesGcm128 | Cipher::AesGcm256 => {
                if iv.len() != 12 {
                    return Err(wrong("nonce"));
                }
                let (salt, iv) = iv.split_at(4);
                let salt: [u8; 4] = salt.try_into().map_err(|_| wrong("salt"))?;
                let iv: [u8; 8] = iv.try_into().map_err(|_| wrong("IV"))?;
                if cipher == Cipher::AesGcm128 {
                    CryptoInfo::AesGcm128(libc::tls12_crypto_info_aes_gcm_128 {
                        info: libc::tls_crypto_info {
                            version,
                            cipher_type: libc::TLS_CIPHER_AES_GCM_128,
                        },
                        iv,
                        key: key.try_into().map_err(|_| wrong("key"))?,
                        salt,
                        rec_seq,
                    })
                } else {
                    CryptoInfo::AesGcm256(libc::tls12_crypto_info_aes_gcm_256 {
                        info: libc::tls_crypto_info {
                            version,
                            cipher_type: libc::TLS_CIPHER_AES_GCM_256,
                        },
                        iv,
                        key: key.try_into().map_err(|_| wrong("key"))?,
                        salt,
                        rec_seq,
                    })
                }
            }
            Cipher::Chacha20Poly1305 => {
                CryptoInfo::Chacha20Poly1305(libc::tls12_crypto_info_chacha20_poly1305 {
                    info: libc::tls_crypto_info {
                        version,
                        cipher_type: libc::TLS_CIPHER_CHACHA20_POLY1305,
                    },
                    iv: iv.try_into().map_err(|_| wrong("IV"))?,
                    key: key.try_into().map_err(|_| wrong("key"))?,
                    salt: [],
                    rec_seq,
                })
            }
        })
    }

    pub fn cipher(&self) -> Cipher {
        match self {
            CryptoInfo::AesGcm128(_) => Cipher::AesGcm128,
            CryptoInfo::AesGcm256(_) => Cipher::AesGcm256,
            CryptoInfo::Chacha20Poly1305(_) => Cipher::Chacha20Poly1305,
        }
    }

    /// The bytes `setsockopt` hands the kernel.
    fn as_bytes(&self) -> &[u8] {
        fn bytes<T>(v: &T) -> &[u8] {
            // SAFETY: `T` is one of libc's crypto-info structs: plain bytes and u16s with no
            // padding (their sizes are checked against the kernel's in the tests), all
            // initialised; the slice borrows `v` and lives no longer.
            unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
        }
        match self {
            CryptoInfo::AesGcm128(i) => bytes(i),
            CryptoInfo::AesGcm256(i) => bytes(i),
            CryptoInfo::Chacha20Poly1305(i) => bytes(i),
        }
    }

    /// Hands these keys to the kernel for one direction (`libc::TLS_TX` or `libc::TLS_RX`);
    /// the socket must have the TLS ULP.
    pub fn install(&self, fd: BorrowedFd<'_>, direction: libc::c_int) -> io::Result<()> {
        setsockopt(fd, libc::SOL_TLS, direction, self.as_bytes())
    }
}

impl Drop for CryptoInfo {
    fn drop(&mut self) {
        // Volatile, so that the wipe of a value about to die is not optimised away.
        fn wipe<const N: usize>(key: &mut [u8; N]) {
            // SAFETY: `key` is a valid, exclusive reference to an initialised array.
            unsafe { std::ptr::write_volatile(key, [0; N]) }
        }
        match self {
            CryptoInfo::AesGcm128(i) => wipe(&mut i.key),
            CryptoInfo::AesGcm256(i) => wipe(&mut i.key),
            CryptoInfo::Chacha20Poly1305(i) => wipe(&mut i.key),
        }
    }
}

fn setsockopt(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: &[u8],
) -> io::Result<()> {
    // SAFETY: `value` is valid for reads of `value.len()` bytes for the call; the kernel copies
    // it and keeps no pointer to it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Attaches the kernel's TLS layer to a connected TCP socket: `ENOENT` when the kernel has
/// no `tls` module. Until keys are installed the socket behaves as plain TCP.
pub fn attach_ulp(fd: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt(fd, libc::SOL_TCP, libc::TCP_ULP, b"tls")
}

/// The upper-layer protocol on a TCP socket (`getsockopt(TCP_ULP)`): `"tls"` once offloaded,
/// empty for plain TCP.
pub fn ulp(fd: BorrowedFd<'_>) -> io::Result<String> {
    let mut name = [0u8; ULP_NAME_MAX];
    let mut len = name.len() as libc::socklen_t;
    // SAFETY: `name` is writable for `len` bytes and `len` is a valid socklen_t the kernel
    // updates with what it wrote.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_ULP,
            name.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let name = &name[..(len as usize).min(ULP_NAME_MAX)];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Ok(String::from_utf8_lossy(&name[..end]).into_owned())
}

/// Hands both directions of a connection to the kernel. `version` is the negotiated one
/// (rustls' secrets do not say). On an error the socket may be half configured (the ULP
/// attached, one direction keyed): the connection must be closed, not used with rustls.
pub fn offload(
    fd: BorrowedFd<'_>,
    version: ProtocolVersion,
    secrets: &ExtractedSecrets,
) -> io::Result<Cipher> {
    let tx = CryptoInfo::new(version, secrets.tx.0, &secrets.tx.1)?;
    let rx = CryptoInfo::new(version, secrets.rx.0, &secrets.rx.1)?;
    attach_ulp(fd)?;
    tx.install(fd, libc::TLS_TX)?;
    rx.install(fd, libc::TLS_RX)?;
    Ok(tx.cipher())
}

/// What one `recv` got.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Record {
    /// Application data: this many bytes (0: the peer closed TCP).
    Data(usize),
    /// A record of another type (alert, handshake): its payload, `len` bytes, is in the
    /// buffer; hand it to `control`.
    Control { content_type: u8, len: usize },
}

/// `CMSG_SPACE(1)`: room for the one-byte record type, kept aligned for `cmsghdr`.
type RecordTypeSpace = [u64; 4];

/// Reads from an offloaded socket with room for the record type, so a control record
/// arrives as such instead of failing the read with `EIO`. One call never mixes record
/// types: the kernel stops at a change. Blocking or not as the socket is.
#[cfg_attr(not(test), allow(dead_code))] // the server reads with `recv_flags`
pub fn recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Record> {
    recv_flags(fd, buf, 0)
}

/// `recv` with `recvmsg` flags (`MSG_DONTWAIT`: never blocks, whatever the socket).
pub fn recv_flags(fd: BorrowedFd<'_>, buf: &mut [u8], flags: libc::c_int) -> io::Result<Record> {
    if buf.is_empty() {
        // Data(0) would read as the end of the stream.
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "recv into an empty buffer",
        ));
    }
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut space: RecordTypeSpace = [0; 4];
    // SAFETY: all zeroes is a valid msghdr (null pointers, zero lengths); the fields that
    // matter are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = space.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<RecordTypeSpace>() as _;
    // SAFETY: `msg` points at `iov` (into `buf`, writable for its length) and `space`
    // (writable for `msg_controllen` bytes), all alive for the call.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let len = n as usize;
    match record_type(&msg) {
        Some(content_type) if content_type != APPLICATION_DATA => {
            Ok(Record::Control { content_type, len })
        }
        _ => Ok(Record::Data(len)),
    }
}

/// The `TLS_GET_RECORD_TYPE` control message of a `recvmsg`, if there is one.
fn record_type(msg: &libc::msghdr) -> Option<u8> {
    // SAFETY: `msg` was filled by `recvmsg`: its control buffer holds `msg_controllen` bytes
    // of well-formed control messages, which the CMSG macros walk without leaving it.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_TLS && (*c).cmsg_type == libc::TLS_GET_RECORD_TYPE {
                return Some(*libc::CMSG_DATA(c));
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    None
}

/// Sends one record of `content_type` (not application data) through the kernel's TLS.
pub fn send_record(fd: BorrowedFd<'_>, content_type: u8, payload: &[u8]) -> io::Result<()> {
    send_record_flags(fd, content_type, payload, 0)
}

fn send_record_flags(
    fd: BorrowedFd<'_>,
    content_type: u8,
    payload: &[u8],
    flags: libc::c_int,
) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    let mut space: RecordTypeSpace = [0; 4];
    // SAFETY: as in `recv`.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = space.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE and CMSG_LEN only compute sizes.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(1) } as _;
    // SAFETY: the control buffer is aligned and holds CMSG_SPACE(1) bytes (checked by the
    // size of `RecordTypeSpace` in the tests), so the first header and its one data byte are
    // inside it. The kernel only reads `payload` (`iov_base` is `*mut` by C's signature).
    let n = unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        if c.is_null() {
            return Err(io::Error::other("no room for the record type"));
        }
        (*c).cmsg_level = libc::SOL_TLS;
        (*c).cmsg_type = libc::TLS_SET_RECORD_TYPE;
        (*c).cmsg_len = libc::CMSG_LEN(1) as _;
        *libc::CMSG_DATA(c) = content_type;
        libc::sendmsg(fd.as_raw_fd(), &msg, flags)
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != payload.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "a control record was cut short",
        ));
    }
    Ok(())
}

/// Tells the peer we are done writing (a `close_notify` alert), so it can tell a complete
/// response from a truncated one.
#[cfg_attr(not(test), allow(dead_code))] // the server uses `send_close_notify_now`
pub fn send_close_notify(fd: BorrowedFd<'_>) -> io::Result<()> {
    send_record(fd, ALERT, &[WARNING, CLOSE_NOTIFY])
}

/// `send_close_notify` that never blocks: a socket whose send buffer is full (a peer that
/// does not read) gets `EAGAIN` and no alert, rather than stalling the worker.
pub fn send_close_notify_now(fd: BorrowedFd<'_>) -> io::Result<()> {
    send_record_flags(fd, ALERT, &[WARNING, CLOSE_NOTIFY], libc::MSG_DONTWAIT)
}

/// What a control record meant, when it was not an error.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Control {
    /// `close_notify`: the client sends nothing more (read it as the end of the stream).
    CloseNotify,
    /// Nothing to do (a TLS 1.2 warning, `user_canceled`): read on.
    Ignored,
    /// The client's TLS 1.3 `KeyUpdate` was followed: the kernel has the new keys; read on.
    Rekeyed,
}

/// Handles a control record from a client (`Record::Control`): `payload` is what `recv`
/// put in the buffer. An error means the connection is over (a fatal alert, a message a
/// client may not send, a key update that cannot be followed) and must be closed; nothing
/// of it is ever data.
///
/// A TLS 1.3 `KeyUpdate` is followed when rustls' key schedule was kept (`keys`, from an
/// unbuffered connection's `dangerous_into_kernel_connection`) and the kernel can re-key
/// (Linux 6.14 and later: before it, `TLS_RX` cannot be set twice); else the error says so
/// and the connection closes cleanly rather than misreading what follows. When the client
/// asks for our update too, our `KeyUpdate` is sent and TX re-keyed: no write may be in
/// flight on the socket meanwhile.
pub fn control<D>(
    fd: BorrowedFd<'_>,
    version: ProtocolVersion,
    content_type: u8,
    payload: &[u8],
    keys: Option<&mut KernelConnection<D>>,
) -> io::Result<Control> {
    match content_type {
        ALERT => alert(version, payload),
        HANDSHAKE => {
            let (request_update, rest) = match payload {
                [KEY_UPDATE, 0, 0, 1, request, rest @ ..] => (*request, rest),
                [KEY_UPDATE, ..] => return Err(invalid("a malformed KeyUpdate".into())),
                [NEW_SESSION_TICKET, ..] => {
                    return Err(invalid("a client sent a NewSessionTicket".into()))
                }
                [t, ..] => {
                    return Err(invalid(format!(
                        "handshake message {t} after the handshake (renegotiation is not offered)"
                    )))
                }
                [] => return Err(invalid("an empty handshake record".into())),
            };
            if version != ProtocolVersion::TLSv1_3 || request_update > 1 || !rest.is_empty() {
                return Err(invalid("a malformed KeyUpdate".into()));
            }
            let Some(keys) = keys else {
                return Err(unsupported(
                    "the client updated its TLS 1.3 keys and the new ones are not known here (rustls' key schedule was not kept): closing".into(),
                ));
            };
            let failed = |e: rustls::Error| io::Error::other(format!("key update: {e}"));
            let (seq, secrets) = keys.update_rx_secret().map_err(failed)?;
            CryptoInfo::new(version, seq, &secrets)?
                .install(fd, libc::TLS_RX)
                .map_err(|e| {
                    unsupported(format!(
                        "the kernel cannot re-key a TLS 1.3 connection ({e}; Linux 6.14 and later can): closing"
                    ))
                })?;
            if request_update == 1 {
                send_record(fd, HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0])?;
                let (seq, secrets) = keys.update_tx_secret().map_err(failed)?;
                CryptoInfo::new(version, seq, &secrets)?.install(fd, libc::TLS_TX)?;
            }
            Ok(Control::Rekeyed)
        }
        t => Err(invalid(format!("a record of type {t} after the handshake"))),
    }
}

fn alert(version: ProtocolVersion, payload: &[u8]) -> io::Result<Control> {
    let &[level, description] = payload else {
        return Err(invalid("a malformed alert".into()));
    };
    match description {
        CLOSE_NOTIFY => Ok(Control::CloseNotify),
        // TLS 1.3: sent before close_notify by a client that gives up (RFC 8446 §6.1).
        USER_CANCELED => Ok(Control::Ignored),
        _ if level == WARNING && version == ProtocolVersion::TLSv1_2 => Ok(Control::Ignored),
        d => Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            format!("the client sent alert {d}"),
        )),
    }
}

/// Which (version, cipher) pairs this kernel offloads.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct Support(u8);

impl Support {
    fn bit(version: ProtocolVersion, cipher: Cipher) -> u8 {
        let v = if version == ProtocolVersion::TLSv1_3 {
            3
        } else {
            0
        };
        1 << (v + cipher as u8)
    }

    pub fn has(self, version: ProtocolVersion, cipher: Cipher) -> bool {
        self.0 & Self::bit(version, cipher) != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// For the log: `TLS 1.2: AES-GCM-128, …; TLS 1.3: …`.
    pub fn describe(self) -> String {
        let per_version = |v: ProtocolVersion, name: &str| {
            let ciphers: Vec<_> = Cipher::ALL
                .iter()
                .filter(|&&c| self.has(v, c))
                .map(|c| c.name())
                .collect();
            let list = if ciphers.is_empty() {
                "none".to_string()
            } else {
                ciphers.join(", ")
            };
            format!("{name}: {list}")
        };
        format!(
            "{}; {}",
            per_version(ProtocolVersion::TLSv1_2, "TLS 1.2"),
            per_version(ProtocolVersion::TLSv1_3, "TLS 1.3")
        )
    }
}

/// Asks the kernel, on loopback connections of our own: the TLS ULP (an error, `ENOENT`,
/// without the `tls` module), then each version and cipher, by keying TX with a zero key (the
/// kernel loads the cipher then, or says it has none).
pub fn probe() -> io::Result<Support> {
    use std::net::TcpStream;
    use std::os::fd::AsFd;
    // The ULP attaches to established connections only: the peer stays open.
    let pair = || -> io::Result<(TcpStream, TcpStream)> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let client = TcpStream::connect(listener.local_addr()?)?;
        let (server, _) = listener.accept()?;
        Ok((client, server))
    };
    attach_ulp(pair()?.0.as_fd())?;
    let mut support = Support::default();
    for version in [ProtocolVersion::TLSv1_2, ProtocolVersion::TLSv1_3] {
        for cipher in Cipher::ALL {
            let (socket, _peer) = pair()?;
            let key = [0u8; 32];
            let key_len = if cipher == Cipher::AesGcm128 { 16 } else { 32 };
            let info = CryptoInfo::from_parts(version, cipher, &key[..key_len], &[0; 12], 0)?;
            attach_ulp(socket.as_fd())?;
            if info.install(socket.as_fd(), libc::TLS_TX).is_ok() {
                support.0 |= Support::bit(version, cipher);
            }
        }
    }
    Ok(support)
}

#[cfg(test)]
mod tests;
