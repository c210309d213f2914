//! An incremental decoder for `Transfer-Encoding: chunked` request bodies (RFC 9112 §7.1).
//!
//! It is fed whatever bytes have arrived, in pieces of any size, and never looks back: each
//! byte moves the state machine one step. It accepts chunk extensions (skipped) and trailer
//! fields (checked and dropped), and refuses — so that the connection is closed — a size that
//! is not hex or overflows, a chunk not followed by CRLF, a bare LF, control bytes in an
//! extension or trailer, and a body whose decoded size passes the configured limit.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkError {
    /// Malformed framing: answer 400 and close.
    Invalid(&'static str),
    /// The decoded body passed `max_chunked_body_size`: answer 413 and close.
    TooLarge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading hex digits of a chunk size; `digits` seen so far.
    Size {
        digits: u8,
    },
    /// After the size: optional whitespace, then `;ext` or CRLF.
    SizeTail,
    /// Inside a chunk extension, until CR.
    Ext,
    /// Expecting the LF of the size line.
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    /// Inside a trailer field line, until CR.
    Trailer,
    TrailerLf,
    /// Expecting the LF of the final empty line.
    EndLf,
    Done,
}

pub struct ChunkedDecoder {
    state: State,
    /// Size of the current chunk, then what is left of it.
    size: u64,
    total: u64,
    limit: u64,
    trailer_bytes: usize,
}

/// Trailers are dropped, but their size is still bounded.
const MAX_TRAILER: usize = 16 * 1024;

impl ChunkedDecoder {
    pub fn new(limit: u64) -> Self {
        ChunkedDecoder {
            state: State::Size { digits: 0 },
            size: 0,
            total: 0,
            limit,
            trailer_bytes: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decodes from `input`, appending body bytes to `out`. Returns how many input bytes were
    /// consumed: all of them, or fewer once the body has ended (the rest belongs to the next
    /// request).
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < input.len() && self.state != State::Done {
            if self.state == State::Data {
                let n = (input.len() - i).min(self.size as usize);
                out.extend_from_slice(&input[i..i + n]);
                self.size -= n as u64;
                i += n;
                if self.size == 0 {
                    self.state = State::DataCr;
                }
                continue;
            }
            self.step(input[i])?;
            i += 1;
        }
        Ok(i)
    }

    fn step(&mut self, b: u8) -> Result<(), ChunkError> {
        use State::*;
        self.state = match (self.state, b) {
            (Size { digits }, _) if b.is_ascii_hexdigit() => {
                if digits >= 16 {
                    return Err(ChunkError::Invalid("chunk size overflows"));
                }
                let v = (b as char).to_digit(16).unwrap_or(0) as u64;
                self.size = self.size << 4 | v;
                Size { digits: digits + 1 }
            }
            (Size { digits: 0 }, _) => return Err(ChunkError::Invalid("chunk size is not hex")),
            (Size { .. } | SizeTail, b' ' | b'\t') => SizeTail,
            (Size { .. } | SizeTail, b';') => Ext,
            (Size { .. } | SizeTail, b'\r') => SizeLf,
            (Size { .. } | SizeTail, _) => return Err(ChunkError::Invalid("bad chunk size line")),
            (Ext, b'\r') => SizeLf,
            (Ext, b) if b == b'\t' || (b >= 0x20 && b != 0x7f) => Ext,
            (Ext, _) => return Err(ChunkError::Invalid("control byte in chunk extension")),
            (SizeLf, b'\n') => self.chunk_started()?,
            (SizeLf, _) => return Err(ChunkError::Invalid("chunk size line without CRLF")),
            (DataCr, b'\r') => DataLf,
            (DataLf, b'\n') => Size { digits: 0 },
            (DataCr | DataLf, _) => return Err(ChunkError::Invalid("chunk data without CRLF")),
            (TrailerStart, b'\r') => EndLf,
            (TrailerStart | Trailer, _) if b == b'\t' || (b >= 0x20 && b != 0x7f) => {
                self.trailer_bytes += 1;
                if self.trailer_bytes > MAX_TRAILER {
                    return Err(ChunkError::Invalid("trailer section too large"));
                }
                if self.state == TrailerStart && (b == b' ' || b == b'\t') {
                    return Err(ChunkError::Invalid("obsolete line folding in trailer"));
                }
                Trailer
            }
            (Trailer, b'\r') => TrailerLf,
            (TrailerLf, b'\n') => TrailerStart,
            (EndLf, b'\n') => Done,
            (TrailerStart | Trailer | TrailerLf | EndLf, _) => {
                return Err(ChunkError::Invalid("malformed trailer section"))
            }
            (Data | Done, _) => unreachable!("handled by decode"),
        };
        Ok(())
    }

    fn chunk_started(&mut self) -> Result<State, ChunkError> {
        if self.size == 0 {
            return Ok(State::TrailerStart);
        }
        self.total = self.total.saturating_add(self.size);
        if self.total > self.limit {
            return Err(ChunkError::TooLarge);
        }
        Ok(State::Data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8], piece: usize, limit: u64) -> Result<(Vec<u8>, usize), ChunkError> {
        let mut d = ChunkedDecoder::new(limit);
        let mut out = Vec::new();
        let mut used = 0;
        for part in input.chunks(piece.max(1)) {
            used += d.decode(part, &mut out)?;
            if d.is_done() {
                return Ok((out, used));
            }
        }
        Err(ChunkError::Invalid("incomplete"))
    }

    #[test]
    fn decodes_in_pieces_of_any_size() {
        let body = b"5\r\nhello\r\n7;name=value\r\n, world\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        for piece in 1..body.len() {
            let (out, used) = decode_all(body, piece, 1 << 20).unwrap();
            assert_eq!(out, b"hello, world");
            assert_eq!(&body[used..], b"NEXT", "piece {piece}");
        }
    }

    #[test]
    fn uppercase_hex_and_leading_zeros() {
        let (out, _) = decode_all(b"000A\r\n0123456789\r\n0\r\n\r\n", 64, 100).unwrap();
        assert_eq!(out.len(), 10);
    }

    #[test]
    fn rejects_malformed_framing() {
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"11111111111111111\r\n",
            b"5 x\r\n",
            b"-5\r\n",
            b"5;ext\x00\r\n",
            b"0\r\n bad: fold\r\n\r\n",
            b"0\r\nTrailer: x\n\r\n",
            b"0\r\n\r\r",
        ] {
            assert!(
                matches!(decode_all(bad, 3, 1 << 20), Err(ChunkError::Invalid(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn cumulative_limit() {
        assert_eq!(
            decode_all(b"4\r\nabcd\r\n4\r\nefgh\r\n0\r\n\r\n", 5, 7),
            Err(ChunkError::TooLarge)
        );
        assert!(decode_all(b"4\r\nabcd\r\n3\r\nefg\r\n0\r\n\r\n", 5, 7).is_ok());
    }
}
