//! A request body as DATA frames bring it: read with the route's body timeout and size limit,
//! its flow-control window given back as it is read, so the client sends only as fast as the
//! body is taken (by the backend, or by nobody when it is dropped).

use crate::worker::http::body::BodyError;
use crate::worker::http::Framing;
use crate::worker::proxy::{Failure, RequestBody};
use h2::RecvStream;
use std::task::Poll;
use std::time::Duration;

/// A piece handed on is this large at most (the HTTP/1.1 path's piece size).
const PIECE: usize = 64 * 1024;
/// How much of a body still coming is read and dropped after an early answer, and for how
/// long (see `linger`).
const LINGER_BYTES: u64 = 1024 * 1024;
const LINGER_TIME: Duration = Duration::from_secs(2);

pub struct StreamBody {
    recv: RecvStream,
    /// Bytes a body of unknown length may have (`max_chunked_body_size`); a declared length
    /// was checked against the route's limit before, and `h2` holds the DATA to it.
    max: u64,
    read: u64,
    /// Between two DATA frames (`client_body_timeout_secs`).
    timeout: Duration,
}

impl StreamBody {
    pub fn new(recv: RecvStream, framing: Framing, max_unknown: u64, timeout: Duration) -> Self {
        StreamBody {
            recv,
            max: if framing == Framing::Chunked {
                max_unknown
            } else {
                u64::MAX
            },
            read: 0,
            timeout,
        }
    }

    /// One DATA frame's bytes, its window given back. `Ok(None)` at the end.
    async fn frame(&mut self) -> Result<Option<bytes::Bytes>, BodyError> {
        let data = match monoio::time::timeout(self.timeout, self.recv.data()).await {
            Err(_) => return Err(BodyError::Timeout),
            Ok(None) => return Ok(None),
            // A reset stream, a content-length the DATA disagreed with, a closed connection.
            Ok(Some(Err(_))) => return Err(BodyError::Closed),
            Ok(Some(Ok(data))) => data,
        };
        self.took(data).map(Some)
    }

    fn took(&mut self, data: bytes::Bytes) -> Result<bytes::Bytes, BodyError> {
        // Given back at once: what bounds the buffered body is that the next frame is read
        // only when this one has been handed on.
        let _ = self.recv.flow_control().release_capacity(data.len());
        self.read += data.len() as u64;
        if self.read > self.max {
            return Err(BodyError::TooLarge);
        }
        Ok(data)
    }

    /// A frame that is already here, without waiting.
    fn ready_frame(&mut self) -> Option<Result<bytes::Bytes, BodyError>> {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        match self.recv.poll_data(&mut cx) {
            Poll::Ready(Some(Ok(data))) => Some(self.took(data)),
            Poll::Ready(Some(Err(_))) => Some(Err(BodyError::Closed)),
            Poll::Ready(None) | Poll::Pending => None,
        }
    }

    /// After an answer sent before the body's end (an error, a refusal): reads and drops what
    /// the client still sends, up to `LINGER_BYTES` within `LINGER_TIME`. The stream then
    /// ends as it should, or with RST_STREAM NO_ERROR; sent at once, that reset arrives with
    /// the answer, and some clients (curl 7.88) take the answer for failed. HTTP/1.1's
    /// lingering close, for one stream.
    pub async fn linger(mut self) {
        self.max = self.read + LINGER_BYTES;
        let drain = async { while let Ok(Some(_)) = self.frame().await {} };
        let _ = monoio::time::timeout(LINGER_TIME, drain).await;
    }

    /// Reads the rest of the body and drops it; returns the bytes read in all.
    pub async fn discard(&mut self) -> Result<u64, BodyError> {
        while self.frame().await?.is_some() {}
        Ok(self.read)
    }
}

impl RequestBody for StreamBody {
    /// HTTP/2 needs no `100 Continue`: the flow-control window is the client's go-ahead.
    async fn start(&mut self) -> Result<(), Failure> {
        Ok(())
    }

    /// Frames as they come, several at once when they are already here (a DATA frame is
    /// 16 KiB at most: one backend write each would cost a write per frame).
    async fn next(&mut self, piece: &mut Vec<u8>) -> Result<bool, BodyError> {
        piece.clear();
        // An empty DATA frame is no piece: an empty chunk would end a chunked body.
        while piece.is_empty() {
            let Some(data) = self.frame().await? else {
                return Ok(false);
            };
            piece.extend_from_slice(&data);
        }
        while piece.len() < PIECE {
            match self.ready_frame() {
                Some(data) => piece.extend_from_slice(&data?),
                None => break,
            }
        }
        Ok(true)
    }
}
