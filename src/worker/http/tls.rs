//! A TLS stream of our own: rustls' connection state over a `Timed` socket, holding no I/O
//! buffer between operations. A connection that waits for its next request then costs
//! rustls' state only (its deframer keeps 4 KiB once empty), where a stream with buffers of
//! its own (monoio-rustls: 16 KiB each way) would pin them for the connection's life.
//!
//! - A read takes its buffer from the caller: the ciphertext lands in it, rustls takes it,
//!   and the plaintext is copied back over what rustls has already taken. Taking plaintext
//!   out as it comes keeps rustls' plaintext buffer (16 KiB) from filling up; should it fill
//!   all the same, the ciphertext it refuses is kept until the next read.
//! - A write encrypts into a `Vec` that is dropped once on the wire.
//!
//! Both sides of a proxy use it: `ServerConnection` for clients, `ClientConnection` for
//! backends. It also owns the handshake, so the traffic secrets can later be handed to the
//! kernel (kTLS) from here.

use crate::worker::timed::Timed;
use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut, RawBuf};
use monoio::io::{AsyncReadRent, AsyncReadRentExt, AsyncWriteRent, AsyncWriteRentExt, Split};
use monoio::BufResult;
use rustls::{ConnectionCommon, SideData};
use std::io::{self, BufRead, Write};
use std::ops::DerefMut;

/// How much one handshake read takes: a ClientHello, or a server's first flight, whole.
const HANDSHAKE_READ: usize = 8 * 1024;

pub struct TlsStream<C> {
    io: Timed,
    /// Boxed: over a kilobyte, and every future the stream passes through would hold it.
    conn: Box<C>,
    /// Ciphertext rustls refused for now (see above): empty and unallocated otherwise.
    pending: Vec<u8>,
    /// rustls failed (a bad record, an alert from the peer): no more reads or writes.
    failed: bool,
    /// A socket write is in flight: a split stream's read side must not write meanwhile.
    writing: bool,
    /// Why the stream failed, until the read or handshake that met it reports it.
    error: Option<io::Error>,
}

/// A TLS record header: type, version, length.
const RECORD_HEADER: usize = 5;
/// The largest record body a peer may send (RFC 8446 §5.2: 2^14 + 256 of ciphertext).
const MAX_RECORD: usize = 16 * 1024 + 256;

fn closed_in_handshake() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the peer closed the connection during the TLS handshake",
    )
}

fn eof_in_handshake(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        closed_in_handshake()
    } else {
        e
    }
}

fn failed_before() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "the TLS connection failed")
}

/// Clears the in-flight flag when the write ends, or when its future is dropped.
struct Writing<'a>(&'a mut bool);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        *self.0 = false;
    }
}

impl<C, D> TlsStream<C>
where
    C: DerefMut<Target = ConnectionCommon<D>>,
    D: SideData,
{
    /// Runs the handshake over `io` (bounded by its deadlines); on failure the alert rustls
    /// queued, if any, is sent first.
    ///
    /// `whole_records`: read one TLS record at a time (its 5-byte header, then exactly its
    /// body), so that when the handshake ends nothing past its last record has left the
    /// socket: the kernel can then take the connection over (kTLS) at a record boundary.
    /// Otherwise a read takes whatever has come (fewer system calls).
    pub async fn handshake(io: Timed, conn: C, whole_records: bool) -> io::Result<Self> {
        let mut s = TlsStream {
            io,
            conn: Box::new(conn),
            pending: Vec::new(),
            failed: false,
            writing: false,
            error: None,
        };
        loop {
            s.send_queued().await?;
            if !s.conn.is_handshaking() {
                return Ok(s);
            }
            if !s.pending.is_empty() {
                let wire = std::mem::take(&mut s.pending);
                s.feed_vec(wire);
            } else if whole_records {
                let wire = s.read_record().await?;
                s.feed_vec(wire);
            } else {
                let (res, wire) = s.io.read(Vec::with_capacity(HANDSHAKE_READ)).await;
                if res? == 0 {
                    return Err(closed_in_handshake());
                }
                s.feed_vec(wire);
            }
            if let Some(e) = s.take_failure() {
                let _ = s.send_queued().await;
                return Err(failed_in(e, s.conn.protocol_version()));
            }
            if s.conn.is_handshaking() && !s.conn.wants_read() && !s.conn.wants_write() {
                // A close_notify before the handshake ended: nothing more will come.
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the TLS session during its handshake",
                ));
            }
        }
    }

    /// One whole TLS record from the socket, header included.
    async fn read_record(&mut self) -> io::Result<Vec<u8>> {
        let (res, header) = self.io.read_exact(vec![0u8; RECORD_HEADER]).await;
        res.map_err(eof_in_handshake)?;
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len > MAX_RECORD {
            // rustls would refuse it too; reading it whole first would cost memory.
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a TLS record of {len} bytes during the handshake"),
            ));
        }
        let mut record = header;
        record.resize(RECORD_HEADER + len, 0);
        let body = record.slice_mut(RECORD_HEADER..RECORD_HEADER + len);
        let (res, body) = self.io.read_exact(body).await;
        res.map_err(eof_in_handshake)?;
        Ok(body.into_inner())
    }

    /// The socket to wait on for the next bytes, when nothing received is left unread:
    /// no plaintext and no ciphertext rustls has not decoded (a partial record needs more
    /// bytes anyway), and the session goes on.
    pub fn idle_socket(&self) -> Option<&Timed> {
        let quiet = !self.failed && self.pending.is_empty() && self.conn.wants_read();
        quiet.then_some(&self.io)
    }

    /// Gives rustls what it takes of `wire` now (up to 4 KiB) and decodes it. Returns how
    /// many bytes it took. None only when rustls has something to say first (unread
    /// plaintext, or the peer's close_notify: what follows it is ignored) or on a failure
    /// (kept for the caller, see `take_failure`): so a read loop always moves on.
    fn feed(&mut self, wire: &[u8]) -> usize {
        if wire.is_empty() || self.failed {
            return 0;
        }
        let took = match self.conn.read_tls(&mut &*wire) {
            Ok(n) => n,
            // Held back while its plaintext is unread (past 16 KiB): that is read first.
            Err(_) if !self.conn.wants_read() => return 0,
            Err(e) => {
                self.fail(e);
                return 0;
            }
        };
        if took == 0 {
            if self.conn.wants_read() {
                self.fail(io::Error::other("rustls took no ciphertext"));
            }
            return 0;
        }
        if let Err(e) = self.conn.process_new_packets() {
            self.fail(io::Error::new(io::ErrorKind::InvalidData, e));
        }
        took
    }

    fn feed_all(&mut self, wire: &[u8]) -> usize {
        let mut fed = 0;
        loop {
            let took = self.feed(&wire[fed..]);
            if took == 0 {
                return fed;
            }
            fed += took;
        }
    }

    /// Whether ciphertext rustls did not take (its plaintext buffer was full) is kept for
    /// the next read: not after a failure or the peer's close_notify.
    fn keeps_rest(&mut self) -> bool {
        !self.failed && !self.peer_closed()
    }

    /// Feeds `wire` whole, keeping what rustls does not take yet.
    fn feed_vec(&mut self, mut wire: Vec<u8>) {
        let fed = self.feed_all(&wire);
        if fed < wire.len() && self.keeps_rest() {
            wire.drain(..fed);
            self.pending = wire;
        }
    }

    /// The peer sent close_notify.
    fn peer_closed(&mut self) -> bool {
        matches!(self.conn.reader().fill_buf(), Ok([]))
    }

    fn fail(&mut self, e: io::Error) {
        self.failed = true;
        self.error.get_or_insert(e);
    }

    /// The error that made the stream fail, once; later calls say it failed before.
    fn take_failure(&mut self) -> Option<io::Error> {
        self.failed
            .then(|| self.error.take().unwrap_or_else(failed_before))
    }

    /// Copies decrypted bytes to `dst`, at most `room`; returns how many.
    ///
    /// # Safety
    /// `dst` must be valid for writes of `room` bytes, and not overlap rustls' buffers.
    unsafe fn copy_out(&mut self, dst: *mut u8, room: usize) -> usize {
        let mut done = 0;
        let mut reader = self.conn.reader();
        while done < room {
            let n = match reader.fill_buf() {
                Ok(chunk) if !chunk.is_empty() => {
                    let n = chunk.len().min(room - done);
                    // SAFETY: the caller vouches for `dst[..room]`; `chunk` is rustls' own
                    // memory, so the two do not overlap.
                    unsafe { std::ptr::copy_nonoverlapping(chunk.as_ptr(), dst.add(done), n) };
                    n
                }
                _ => break,
            };
            reader.consume(n);
            done += n;
        }
        done
    }

    /// With no plaintext left: `Some(Ok(0))` once the peer closed cleanly, `Some(Err)` if
    /// the connection ended otherwise, `None` if more ciphertext is needed.
    fn ended(&mut self) -> Option<io::Result<usize>> {
        if self.failed {
            return Some(Err(failed_before()));
        }
        match self.conn.reader().fill_buf() {
            Ok([]) => Some(Ok(0)),
            Ok(_) => None,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => Some(Err(e)),
        }
    }

    /// Writes out every record rustls has queued (data, alerts, handshake messages).
    async fn send_queued(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            let mut wire = Vec::new();
            while self.conn.wants_write() {
                self.conn.write_tls(&mut wire)?;
            }
            let TlsStream { io, writing, .. } = self;
            *writing = true;
            let _writing = Writing(writing);
            io.write_all(wire).await.0?;
        }
        Ok(())
    }

    /// After a failure on the read side: the alert rustls queued goes out, unless the write
    /// side has a write in flight (it sends the alert when that write is done).
    async fn failed_read(&mut self) -> io::Error {
        let e = self.take_failure().unwrap_or_else(failed_before);
        if !self.writing {
            let _ = self.send_queued().await;
        }
        e
    }

    /// Plaintext into `buf`, reading the socket into `buf` itself when rustls has none.
    async fn read_into<T: IoBufMut>(&mut self, mut buf: T) -> BufResult<usize, T> {
        let room = buf.bytes_total();
        if room == 0 {
            return (Ok(0), buf);
        }
        loop {
            // SAFETY: `write_ptr` is valid for `bytes_total` bytes, and is not rustls'.
            let n = unsafe { self.copy_out(buf.write_ptr(), room) };
            if n > 0 {
                // SAFETY: `copy_out` wrote the first `n` bytes.
                unsafe { buf.set_init(n) };
                return (Ok(n), buf);
            }
            if let Some(end) = self.ended() {
                return (end, buf);
            }
            if !self.pending.is_empty() {
                let wire = std::mem::take(&mut self.pending);
                self.feed_vec(wire);
                if self.failed {
                    return (Err(self.failed_read().await), buf);
                }
                continue;
            }
            let (res, back) = self.io.read(buf).await;
            buf = back;
            let got = match res {
                Ok(n) => n,
                Err(e) => return (Err(e), buf),
            };
            if got == 0 {
                // The peer closed TCP: rustls tells a clean close from a truncation.
                let _ = self.conn.read_tls(&mut io::empty());
                continue;
            }
            let n = self.decode_in_place(&mut buf, got);
            // SAFETY: `decode_in_place` wrote plaintext over the first `n` bytes.
            unsafe { buf.set_init(n) };
            if self.failed {
                return (Err(self.failed_read().await), buf);
            }
            if n > 0 {
                return (Ok(n), buf);
            }
        }
    }

    /// `buf` holds `got` bytes of ciphertext: rustls takes them, and the plaintext is
    /// copied back over the ones it has already taken, never over those it has not.
    /// Returns the plaintext length.
    fn decode_in_place<T: IoBufMut>(&mut self, buf: &mut T, got: usize) -> usize {
        let room = buf.bytes_total();
        let p = buf.write_ptr();
        let (mut fed, mut out) = (0, 0);
        while fed < got {
            // SAFETY: the kernel wrote `got` bytes at `p`; `[fed, got)` is not written to
            // while this slice lives.
            let wire = unsafe { std::slice::from_raw_parts(p.add(fed), got - fed) };
            let took = self.feed(wire);
            fed += took;
            // SAFETY: `[out, fed)` holds ciphertext rustls has already copied.
            out += unsafe { self.copy_out(p.add(out), fed - out) };
            if took == 0 {
                break;
            }
        }
        if fed < got && self.keeps_rest() {
            // SAFETY: as above; `pending` is a separate allocation.
            let rest = unsafe { std::slice::from_raw_parts(p.add(fed), got - fed) };
            self.pending.extend_from_slice(rest);
        }
        // SAFETY: all ciphertext is out of `buf` now: the whole of it may take plaintext.
        out + unsafe { self.copy_out(p.add(out), room - out) }
    }
}

impl<C> TlsStream<C> {
    /// The rustls connection, for what the handshake settled (version, suite).
    pub fn session(&self) -> &C {
        &self.conn
    }
}

impl TlsStream<rustls::ServerConnection> {
    /// Takes the stream apart so the kernel can take the connection over: the socket, the
    /// rustls connection (for its secrets) and the plaintext rustls has decrypted and nobody
    /// read yet, which comes before anything the socket gives from now on. The stream is
    /// given back when bytes past a record boundary may have left the socket (ciphertext
    /// kept for later, or a failure): then it cannot be handed over and stays in rustls.
    /// Only a handshake run with `whole_records` leaves a stream that can be taken apart.
    #[cfg_attr(not(any(test, feature = "ktls")), allow(dead_code))]
    // The stream comes back by value once a connection, on the way to rustls: boxing it
    // would cost an allocation on that path for nothing.
    #[allow(clippy::result_large_err)]
    pub fn into_parts(mut self) -> Result<(Timed, rustls::ServerConnection, Vec<u8>), Self> {
        if self.failed || !self.pending.is_empty() || self.conn.wants_write() {
            return Err(self);
        }
        let mut plain = Vec::new();
        let mut reader = self.conn.reader();
        while let Ok(chunk) = reader.fill_buf() {
            if chunk.is_empty() {
                break;
            }
            let n = chunk.len();
            plain.extend_from_slice(chunk);
            reader.consume(n);
        }
        Ok((self.io, *self.conn, plain))
    }
}

impl<C, D> AsyncReadRent for TlsStream<C>
where
    C: DerefMut<Target = ConnectionCommon<D>>,
    D: SideData,
{
    async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        self.read_into(buf).await
    }

    async fn readv<T: IoVecBufMut>(&mut self, mut buf: T) -> BufResult<usize, T> {
        // SAFETY: the first iovec of `buf` stays valid while `buf` is held here, and the
        // read is awaited before `buf` is given back.
        let Some(first) = (unsafe { RawBuf::new_from_iovec_mut(&mut buf) }) else {
            return (Ok(0), buf);
        };
        let (res, _) = self.read_into(first).await;
        if let Ok(n) = res {
            // SAFETY: the read wrote `n` bytes at the start of the first iovec.
            unsafe { buf.set_init(n) };
        }
        (res, buf)
    }
}

impl<C, D> AsyncWriteRent for TlsStream<C>
where
    C: DerefMut<Target = ConnectionCommon<D>>,
    D: SideData,
{
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        if self.failed {
            return (Err(failed_before()), buf);
        }
        // SAFETY: an `IoBuf` is readable for `bytes_init` bytes while it is held.
        let data = unsafe { std::slice::from_raw_parts(buf.read_ptr(), buf.bytes_init()) };
        let n = match self.conn.writer().write(data) {
            Ok(n) => n,
            Err(e) => return (Err(e), buf),
        };
        match self.send_queued().await {
            Ok(()) => (Ok(n), buf),
            Err(e) => (Err(e), buf),
        }
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        if self.failed {
            return (Err(failed_before()), buf);
        }
        let n = {
            let (ptr, len) = (buf.read_iovec_ptr(), buf.read_iovec_len());
            // SAFETY: an `IoVecBuf` holds `len` valid iovecs, each readable, while it is
            // held; the slices are dropped before any await. An empty one may have a null
            // base, which no slice may have: it is skipped.
            let slices: Vec<io::IoSlice<'_>> = unsafe {
                std::slice::from_raw_parts(ptr, len)
                    .iter()
                    .filter(|v| v.iov_len > 0)
                    .map(|v| {
                        io::IoSlice::new(std::slice::from_raw_parts(
                            v.iov_base as *const u8,
                            v.iov_len,
                        ))
                    })
                    .collect()
            };
            self.conn.writer().write_vectored(&slices)
        };
        let n = match n {
            Ok(n) => n,
            Err(e) => return (Err(e), buf),
        };
        match self.send_queued().await {
            Ok(()) => (Ok(n), buf),
            Err(e) => (Err(e), buf),
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        if self.failed {
            return Err(failed_before());
        }
        self.send_queued().await?;
        self.io.flush().await
    }

    /// close_notify, then the socket's write side.
    async fn shutdown(&mut self) -> io::Result<()> {
        if !self.failed {
            self.conn.send_close_notify();
            self.send_queued().await?;
        }
        self.io.shutdown().await
    }
}

// SAFETY: a split stream's halves run their futures at once on one thread. Each touches the
// rustls connection only between awaits, never across one, so neither sees the other's
// changes half done; each has its own in-flight socket operation (its own buffer, and
// `Timed` reads and writes are independent). The read side writes to the socket only to
// send an alert after a failure, when no write is in flight (`writing`), and having set
// `failed` first, so that the write side starts none meanwhile.
unsafe impl<C> Split for TlsStream<C> {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::timed::{Deadlines, Limit};
    use monoio::io::AsyncReadRentExt;
    use rustls::{ClientConnection, ServerConnection, StreamOwned};
    use std::future::Future;
    use std::io::Read;
    use std::net::TcpStream;
    use std::sync::Arc;
    use std::time::Duration;

    type Client = StreamOwned<ClientConnection, TcpStream>;

    fn configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let key =
            rustls::pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![ck.cert.der().clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ck.cert.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// Runs `client` (blocking rustls, on a thread) against `server`, given the server side
    /// of the connection once its handshake is done; returns what `client` returns.
    fn with_tls<R, F>(
        client: impl FnOnce(Client) -> R + Send + 'static,
        server: impl FnOnce(TlsStream<ServerConnection>) -> F,
    ) -> R
    where
        R: Send + 'static,
        F: Future<Output = ()>,
    {
        let (server_config, client_config) = configs();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let client = std::thread::spawn(move || {
            let tcp = TcpStream::connect(addr).unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let name = "localhost".try_into().unwrap();
            let mut c = StreamOwned::new(ClientConnection::new(client_config, name).unwrap(), tcp);
            while c.conn.is_handshaking() {
                c.conn.complete_io(&mut c.sock).unwrap();
            }
            client(c)
        });
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = monoio::net::TcpListener::from_std(listener).unwrap();
            let (tcp, _) = listener.accept().await.unwrap();
            let each = Limit::Each(Duration::from_secs(10));
            let io = Timed::new(tcp, Deadlines::new(each, each));
            let session = ServerConnection::new(server_config).unwrap();
            server(TlsStream::handshake(io, session, false).await.unwrap()).await
        });
        client.join().unwrap()
    }

    /// A TLS 1.3 client whose first request leaves with its Finished, in one write; the
    /// server's handshake with `whole_records`. Returns the plaintext rustls had decoded by
    /// then and the bytes left on the socket.
    fn first_request_after_handshake(whole_records: bool) -> (Vec<u8>, Vec<u8>) {
        const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n";
        let (server_config, client_config) = configs();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let client = std::thread::spawn(move || {
            let tcp = TcpStream::connect(addr).unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let name = "localhost".try_into().unwrap();
            let mut c = StreamOwned::new(ClientConnection::new(client_config, name).unwrap(), tcp);
            // Held by rustls until the handshake is done, then sent with the Finished.
            c.conn.writer().write_all(REQUEST).unwrap();
            while c.conn.is_handshaking() || c.conn.wants_write() {
                c.conn.complete_io(&mut c.sock).unwrap();
            }
            // Open until the server is done.
            let _ = c.sock.read(&mut [0u8; 1]);
        });
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        let got = rt.block_on(async move {
            let listener = monoio::net::TcpListener::from_std(listener).unwrap();
            let (tcp, _) = listener.accept().await.unwrap();
            let each = Limit::Each(Duration::from_secs(10));
            let io = Timed::new(tcp, Deadlines::new(each, each));
            let session = ServerConnection::new(server_config).unwrap();
            let tls = TlsStream::handshake(io, session, whole_records)
                .await
                .unwrap();
            let Ok((mut io, _session, plain)) = tls.into_parts() else {
                panic!("the stream could not be taken apart");
            };
            // What is on the socket now: the request's record, unless rustls took it.
            io.limits()
                .set_read(Limit::Each(Duration::from_millis(300)));
            let (res, rest) = io.read(Vec::with_capacity(4096)).await;
            let rest = if res.is_ok() { rest } else { Vec::new() };
            let _ = io.shutdown().await;
            (plain, rest)
        });
        client.join().unwrap();
        got
    }

    #[test]
    fn a_handshake_for_the_kernel_leaves_the_first_request_on_the_socket() {
        let (plain, rest) = first_request_after_handshake(true);
        assert!(plain.is_empty(), "rustls decoded {} bytes", plain.len());
        assert!(rest.len() > 5, "{} bytes on the socket", rest.len());
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        // One whole application-data record, from its first byte: the kernel can read it.
        assert_eq!(&rest[..3], &[0x17, 0x03, 0x03][..], "{rest:?}");
        assert_eq!(rest.len(), 5 + len, "{rest:?}");
    }

    #[test]
    fn plaintext_decoded_during_the_handshake_is_handed_out() {
        // A greedy handshake read takes the request with the Finished: rustls decodes it,
        // and taking the stream apart must give it back rather than lose it.
        let (plain, rest) = first_request_after_handshake(false);
        assert!(rest.is_empty(), "{rest:?}");
        assert_eq!(plain, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n");
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn reads_of_any_size_get_the_bytes_in_order_then_0_at_close_notify() {
        const LEN: usize = 1 << 20;
        with_tls(
            |mut c| {
                // Writes of many sizes: records small and full, several to a socket read.
                for piece in pattern(LEN).chunks(40_000) {
                    c.write_all(piece).unwrap();
                }
                c.conn.send_close_notify();
                c.flush().unwrap();
                // Open until the server is done: a close with unread bytes would reset.
                let _ = c.read_to_end(&mut Vec::new());
            },
            |mut tls| async move {
                let mut got = Vec::new();
                for size in [1, 7, 100, 4096, 65536].into_iter().cycle() {
                    let (res, buf) = tls.read(Vec::with_capacity(size)).await;
                    match res.unwrap() {
                        0 => break,
                        n => got.extend_from_slice(&buf[..n]),
                    }
                }
                assert!(got == pattern(LEN), "{} bytes, not as sent", got.len());
                let _ = tls.shutdown().await;
            },
        );
    }

    #[test]
    fn a_connection_cut_without_close_notify_fails_after_its_bytes() {
        with_tls(
            |mut c| {
                c.write_all(b"hello").unwrap();
                c.sock.shutdown(std::net::Shutdown::Write).unwrap();
                std::thread::sleep(Duration::from_millis(200));
            },
            |mut tls| async move {
                let (res, buf) = tls.read_exact(vec![0u8; 5]).await;
                assert_eq!((res.unwrap(), &buf[..]), (5, &b"hello"[..]));
                let (res, _) = tls.read(Vec::with_capacity(100)).await;
                let e = res.expect_err("a truncation is not a clean end");
                assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
            },
        );
    }

    #[test]
    fn the_socket_is_waited_on_only_when_nothing_is_left_to_read() {
        with_tls(
            |mut c| {
                c.write_all(&pattern(3000)).unwrap();
                // Until the server is done.
                let _ = c.read(&mut [0u8; 1]);
            },
            |mut tls| async move {
                let (res, _) = tls.read(Vec::with_capacity(100)).await;
                assert_eq!(res.unwrap(), 100);
                assert!(
                    tls.idle_socket().is_none(),
                    "2900 decrypted bytes are unread"
                );
                let (res, _) = tls.read_exact(vec![0u8; 2900]).await;
                res.unwrap();
                assert!(tls.idle_socket().is_some(), "all read");
                let _ = tls.shutdown().await;
            },
        );
    }

    #[test]
    fn a_corrupt_record_fails_the_read_and_the_peer_hears_why() {
        let heard = with_tls(
            |mut c| {
                // An application-data record whose bytes no key made.
                let mut record = vec![0x17, 0x03, 0x03, 0x00, 0x20];
                record.extend_from_slice(&[0x5a; 32]);
                c.sock.write_all(&record).unwrap();
                let mut buf = [0u8; 64];
                loop {
                    match c.read(&mut buf) {
                        Ok(0) => return "closed without an alert".to_string(),
                        Ok(_) => continue,
                        Err(e) => return e.to_string(),
                    }
                }
            },
            |mut tls| async move {
                let (res, _) = tls.read(Vec::with_capacity(100)).await;
                let e = res.expect_err("a record that does not decrypt");
                assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
                let (res, _) = tls.write(b"late".to_vec()).await;
                assert!(res.is_err(), "nothing is sent after a failure");
            },
        );
        assert!(heard.contains("BadRecordMac"), "{heard}");
    }

    #[test]
    fn writes_and_gathered_writes_arrive_whole_then_close_notify() {
        const LEN: usize = 1 << 20;
        let got = with_tls(
            |mut c| {
                let mut got = Vec::new();
                c.read_to_end(&mut got).unwrap();
                got
            },
            |mut tls| async move {
                let (res, _) = tls.write_all(pattern(LEN)).await;
                res.unwrap();
                let parts = monoio::buf::VecBuf::from(vec![b"head ".to_vec(), b"tail".to_vec()]);
                let (res, _) = tls.writev(parts).await;
                assert_eq!(res.unwrap(), 9);
                tls.shutdown().await.unwrap();
            },
        );
        assert!(got[..LEN] == pattern(LEN), "the large write differs");
        assert_eq!(&got[LEN..], b"head tail");
    }
}

/// A handshake that failed after a version was agreed (a certificate the client refused, a
/// bad Finished): the error, with that version for `zerocopy_proxy_tls_handshakes_total`.
#[derive(Debug)]
struct FailedIn {
    version: rustls::ProtocolVersion,
    source: io::Error,
}

impl std::fmt::Display for FailedIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.source.fmt(f)
    }
}

impl std::error::Error for FailedIn {}

fn failed_in(e: io::Error, version: Option<rustls::ProtocolVersion>) -> io::Error {
    match version {
        Some(version) => io::Error::new(e.kind(), FailedIn { version, source: e }),
        None => e,
    }
}

/// The version a failed handshake had agreed on, if it got that far.
pub fn failed_version(e: &io::Error) -> Option<rustls::ProtocolVersion> {
    e.get_ref()?.downcast_ref::<FailedIn>().map(|f| f.version)
}
