//! The client's bytes on their way to the `h2` crate, counted frame by frame: the floods
//! HTTP/2 made possible (Rapid Reset, CVE-2023-44487; PING, SETTINGS and empty-frame floods,
//! CVE-2019-9512/9515/9518) are made of frames that the crate answers correctly, one by one,
//! without ever closing the connection.
//! Only the 9-byte frame headers are looked at (RFC 9113 §4.1): type and length, to count
//! the frame and skip its payload; the crate still does all the parsing.
//!
//! Past a limit the connection is marked (`Shared::trip`) and no more bytes are read from
//! it: the connection loop then closes it with GOAWAY `ENHANCE_YOUR_CALM`.

use super::Shared;
use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client connection preface (RFC 9113 §3.4), before the first frame.
const PREFACE_LEN: usize = 24;
const FRAME_HEADER: usize = 9;

const DATA: u8 = 0x0;
const END_STREAM: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;

/// Not a frame type on the wire (types are 0x0-0x9 and extensions): an empty DATA frame
/// that does not end its stream, counted apart.
const EMPTY_DATA: u8 = 0xFF;

/// Frames of a kind a client may send in one second. A browser sends a handful of SETTINGS
/// and PINGs in a connection's life and resets streams it no longer needs; a flood sends
/// thousands a second.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub resets: u32,
    pub pings: u32,
    pub settings: u32,
    pub priorities: u32,
    /// DATA frames with no byte that do not end their stream: they carry nothing.
    pub empty: u32,
}

impl Limits {
    /// `streams`: `http2_max_concurrent_streams`. A client may cancel every stream it may
    /// have open within a second (a page navigated away from), not more.
    pub fn new(streams: u32) -> Limits {
        Limits {
            resets: streams.max(100),
            pings: 50,
            settings: 50,
            priorities: 1000,
            empty: 100,
        }
    }
}

/// Counts frames per one-second window.
pub struct FrameCounter {
    limits: Limits,
    preface_left: usize,
    header: [u8; FRAME_HEADER],
    have: usize,
    /// Payload bytes of the current frame not seen yet.
    skip: usize,
    window: Instant,
    counts: [u32; 5],
}

impl FrameCounter {
    pub fn new(limits: Limits, now: Instant) -> FrameCounter {
        FrameCounter {
            limits,
            preface_left: PREFACE_LEN,
            header: [0; FRAME_HEADER],
            have: 0,
            skip: 0,
            window: now,
            counts: [0; 5],
        }
    }

    /// Takes the next bytes the client sent. `Some(why)`: a limit was passed.
    pub fn feed(&mut self, mut bytes: &[u8], now: Instant) -> Option<&'static str> {
        while !bytes.is_empty() {
            if self.preface_left > 0 {
                let n = self.preface_left.min(bytes.len());
                self.preface_left -= n;
                bytes = &bytes[n..];
            } else if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
            } else {
                let n = (FRAME_HEADER - self.have).min(bytes.len());
                self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
                self.have += n;
                bytes = &bytes[n..];
                if self.have == FRAME_HEADER {
                    self.have = 0;
                    let h = self.header;
                    self.skip =
                        usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                    let empty = h[3] == DATA && self.skip == 0 && h[4] & END_STREAM == 0;
                    let kind = if empty { EMPTY_DATA } else { h[3] };
                    if let Some(why) = self.count(kind, now) {
                        return Some(why);
                    }
                }
            }
        }
        None
    }

    fn count(&mut self, kind: u8, now: Instant) -> Option<&'static str> {
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.counts = [0; 5];
        }
        let l = self.limits;
        let (i, limit, why) = match kind {
            RST_STREAM => (0, l.resets, "RST_STREAM flood (rapid reset)"),
            PING => (1, l.pings, "PING flood"),
            SETTINGS => (2, l.settings, "SETTINGS flood"),
            PRIORITY => (3, l.priorities, "PRIORITY flood"),
            EMPTY_DATA => (4, l.empty, "empty DATA flood"),
            _ => return None,
        };
        self.counts[i] += 1;
        (self.counts[i] > limit).then_some(why)
    }
}

/// The connection's I/O as `h2` sees it: reads are counted, and stop once a limit is passed;
/// `early` holds plaintext read before the connection came here (kTLS takes over a stream
/// whose rustls had already decrypted some), given out first.
pub struct Guard<T> {
    /// Shared with the connection loop, which reads what a flooding client still sends
    /// once `h2` is done with it (see `linger`).
    io: Rc<RefCell<T>>,
    early: Vec<u8>,
    frames: FrameCounter,
    shared: Rc<Shared>,
}

impl<T> Guard<T> {
    pub fn new(io: Rc<RefCell<T>>, early: Vec<u8>, limits: Limits, shared: Rc<Shared>) -> Self {
        Guard {
            io,
            early,
            frames: FrameCounter::new(limits, Instant::now()),
            shared,
        }
    }
}

/// Feeds what the client sent to the counter; past a limit, trips the connection.
fn count(frames: &mut FrameCounter, shared: &Shared, new: &[u8]) {
    if let Some(why) = frames.feed(new, Instant::now()) {
        shared.trip(why);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guard<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.shared.tripped().is_some() {
            // Not another byte of a flood: the connection loop closes the connection (and
            // is woken by the trip, not by this read).
            return Poll::Pending;
        }
        if !this.early.is_empty() {
            let n = this.early.len().min(buf.remaining());
            let early: Vec<u8> = this.early.drain(..n).collect();
            buf.put_slice(&early);
            count(&mut this.frames, &this.shared, &early);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut *this.io.borrow_mut()).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            count(&mut this.frames, &this.shared, &buf.filled()[before..]);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guard<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.io.borrow_mut()).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io.borrow_mut()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io.borrow_mut()).poll_shutdown(cx)
    }
}

/// After a flood's GOAWAY: reads and drops what the client still sends, until it closes or
/// `within` passes. Closing with its flood unread would make the kernel answer with a reset,
/// which can destroy the GOAWAY before the client reads it (HTTP/1.1's lingering close).
pub async fn linger<T: AsyncRead + Unpin>(io: &RefCell<T>, within: Duration) {
    let mut scratch = vec![0u8; 16 * 1024];
    let drain = std::future::poll_fn(|cx| loop {
        let mut buf = ReadBuf::new(&mut scratch);
        match Pin::new(&mut *io.borrow_mut()).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) if !buf.filled().is_empty() => continue,
            Poll::Ready(_) => return Poll::Ready(()),
            Poll::Pending => return Poll::Pending,
        }
    });
    let _ = monoio::time::timeout(within, drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, payload: usize) -> Vec<u8> {
        let mut f = vec![
            (payload >> 16) as u8,
            (payload >> 8) as u8,
            payload as u8,
            kind,
        ];
        f.extend_from_slice(&[0, 0, 0, 0, 1]);
        f.extend(std::iter::repeat_n(0xAA, payload));
        f
    }

    #[test]
    fn frames_are_counted_however_the_bytes_are_split() {
        let now = Instant::now();
        let limits = Limits {
            resets: 3,
            pings: 2,
            settings: 2,
            priorities: 2,
            empty: 2,
        };
        let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // DATA frames whose payload looks like PING headers must not count.
        wire.extend(frame(0x0, 9));
        wire.extend(frame(PING, 8));
        wire.extend(frame(PING, 8));
        for split in [1, 2, 7, 9, 1000] {
            let mut c = FrameCounter::new(limits, now);
            for piece in wire.chunks(split) {
                assert_eq!(c.feed(piece, now), None, "split {split}");
            }
            assert_eq!(c.feed(&frame(PING, 8), now), Some("PING flood"));
        }
        // Empty DATA frames count; the one that ends a stream does not.
        let mut c = FrameCounter::new(limits, now);
        c.feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", now);
        let mut end = frame(DATA, 0);
        end[4] = END_STREAM;
        for _ in 0..10 {
            assert_eq!(c.feed(&end, now), None);
        }
        assert_eq!(c.feed(&frame(DATA, 0), now), None);
        assert_eq!(c.feed(&frame(DATA, 0), now), None);
        assert_eq!(c.feed(&frame(DATA, 0), now), Some("empty DATA flood"));
    }

    #[test]
    fn the_count_starts_again_each_second() {
        let now = Instant::now();
        let mut c = FrameCounter::new(Limits::new(1), now);
        c.feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", now);
        for _ in 0..100 {
            assert_eq!(c.feed(&frame(RST_STREAM, 4), now), None);
        }
        let later = now + Duration::from_millis(1100);
        assert_eq!(c.feed(&frame(RST_STREAM, 4), later), None);
        let flood: Vec<u8> = (0..100).flat_map(|_| frame(RST_STREAM, 4)).collect();
        assert_eq!(
            c.feed(&flood, later),
            Some("RST_STREAM flood (rapid reset)")
        );
    }
}
