//! An incremental decoder for `Transfer-Encoding: chunked` request bodies (RFC 9112 §7.1).
//!
//! It is fed whatever bytes have arrived, in pieces of any size, and never looks back: each
//! byte moves the state machine one step. It accepts chunk extensions (skipped) and trailer
//! fields (checked and dropped), and refuses — so that the connection is closed — a size that
//! is not hex or overflows, a chunk not followed by CRLF, a bare LF, control bytes in an
//! extension or trailer, a trailer line that is not `name: value`, more than
//! [`MAX_EXTENSIONS`] bytes of extensions, and a body whose decoded size passes the limit.

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
    /// Inside a trailer field's name, until its colon.
    TrailerName,
    /// Inside a trailer field's value, until CR.
    TrailerValue,
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
    /// Bytes of size lines after the digits (whitespace, extensions), over the whole body.
    ext_bytes: usize,
}

/// Trailers are dropped, but their size is still bounded.
const MAX_TRAILER: usize = 16 * 1024;
/// Chunk extensions are skipped, but they still cost reading: at most this many bytes of them
/// (and of whitespace after a size) in one body, as Node.js bounds them
/// (`kMaxChunkExtensionsSize`, after CVE-2024-22019). Without a bound, a 2-byte body could
/// carry gigabytes that no body size limit counts.
pub const MAX_EXTENSIONS: usize = 16 * 1024;

impl ChunkedDecoder {
    pub fn new(limit: u64) -> Self {
        ChunkedDecoder {
            state: State::Size { digits: 0 },
            size: 0,
            total: 0,
            limit,
            trailer_bytes: 0,
            ext_bytes: 0,
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
        let next = match (self.state, b) {
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
            (TrailerStart, b' ' | b'\t') => {
                return Err(ChunkError::Invalid("obsolete line folding in trailer"))
            }
            (TrailerStart | TrailerName, _) if is_tchar(b) => TrailerName,
            (TrailerName, b':') => TrailerValue,
            // RFC 9112 §5: a field line is `name ":" value`; no colon, an empty name or
            // whitespace before the colon is a bad request, in a trailer as in the head.
            (TrailerStart | TrailerName, _) => {
                return Err(ChunkError::Invalid("trailer line is not `name: value`"))
            }
            (TrailerValue, b'\r') => TrailerLf,
            (TrailerValue, b) if b == b'\t' || (b >= 0x20 && b != 0x7f) => TrailerValue,
            (TrailerLf, b'\n') => TrailerStart,
            (EndLf, b'\n') => Done,
            (TrailerValue | TrailerLf | EndLf, _) => {
                return Err(ChunkError::Invalid("malformed trailer section"))
            }
            // `decode` never steps in these; answering 400 beats a panic if it ever did.
            (Data | Done, _) => return Err(ChunkError::Invalid("decoder out of step")),
        };
        self.count(next)?;
        self.state = next;
        Ok(())
    }

    /// Bounds the bytes that are read but never delivered: extensions and trailers.
    fn count(&mut self, next: State) -> Result<(), ChunkError> {
        use State::*;
        if matches!(next, SizeTail | Ext) {
            self.ext_bytes += 1;
            if self.ext_bytes > MAX_EXTENSIONS {
                return Err(ChunkError::Invalid("chunk extensions too long"));
            }
        }
        if matches!(next, TrailerName | TrailerValue) {
            self.trailer_bytes += 1;
            if self.trailer_bytes > MAX_TRAILER {
                return Err(ChunkError::Invalid("trailer section too large"));
            }
        }
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

/// An RFC 9110 token character (field names).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
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
            b"0\r\nno colon\r\n\r\n",
            b"0\r\nnocolon\r\n\r\n",
            b"0\r\n: empty name\r\n\r\n",
            b"0\r\nName : space before colon\r\n\r\n",
            b"0\r\nA: ok\r\nsecond line without colon\r\n\r\n",
            b"0\r\nA: bad\x01value\r\n\r\n",
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

    #[test]
    fn trailer_fields_with_a_colon_pass() {
        let body = b"3\r\nabc\r\n0\r\nA: 1\r\nB-c:\r\nD:\tx y \xff\r\n\r\nNEXT";
        for piece in 1..body.len() {
            let (out, used) = decode_all(body, piece, 100).unwrap();
            assert_eq!(out, b"abc");
            assert_eq!(&body[used..], b"NEXT", "piece {piece}");
        }
    }

    #[test]
    fn chunk_extensions_are_bounded_over_the_whole_body() {
        let ext = |n: usize| format!("1;{}\r\nx\r\n", "e".repeat(n));
        // One extension up to the bound is skipped.
        let ok = format!("{}0\r\n\r\n", ext(MAX_EXTENSIONS - 1));
        assert_eq!(decode_all(ok.as_bytes(), 4096, 100).unwrap().0, b"x");
        // One past it, or many small ones adding up past it, are refused.
        let long = format!("{}0\r\n\r\n", ext(MAX_EXTENSIONS));
        let many = format!("{}0\r\n\r\n", ext(1023).repeat(17));
        for bad in [long, many] {
            assert_eq!(
                decode_all(bad.as_bytes(), 4096, 1 << 20),
                Err(ChunkError::Invalid("chunk extensions too long"))
            );
        }
        // Whitespace after the size counts too: it cannot run forever.
        let spaces = format!("1{}\r\n", " ".repeat(MAX_EXTENSIONS + 1));
        assert_eq!(
            decode_all(spaces.as_bytes(), 4096, 100),
            Err(ChunkError::Invalid("chunk extensions too long"))
        );
    }
}
