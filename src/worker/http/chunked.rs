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

/// Property tests: any body, cut into any chunks and delivered in any pieces, decodes to
/// itself and ends exactly where its encoding ends; random bytes never panic and never
/// exceed the limit; how input is split never changes the outcome.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::Index;

    /// How one chunk's size line is written.
    #[derive(Debug, Clone)]
    struct SizeLine {
        upper: bool,
        zeros: usize,
        ext: Option<String>,
    }

    fn size_line() -> impl Strategy<Value = SizeLine> {
        (
            any::<bool>(),
            0usize..3,
            // At most 22 bytes: with chunks of 8 bytes or more, a 3000-byte body stays under
            // MAX_EXTENSIONS, which counts over the whole body.
            prop::option::of("( |\\t){0,4};[a-z]{1,8}(=[a-z0-9\"]{0,8})?"),
        )
            .prop_map(|(upper, zeros, ext)| SizeLine { upper, zeros, ext })
    }

    fn write_size(out: &mut Vec<u8>, n: usize, line: &SizeLine) {
        let hex = if line.upper {
            format!("{n:X}")
        } else {
            format!("{n:x}")
        };
        out.extend(std::iter::repeat_n(b'0', line.zeros));
        out.extend_from_slice(hex.as_bytes());
        if let Some(ext) = &line.ext {
            out.extend_from_slice(ext.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    }

    /// `body` in chunks of the given sizes (cycled), then the last chunk and trailers.
    fn encode(body: &[u8], sizes: &[usize], lines: &[SizeLine], trailers: &[String]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut at = 0;
        let mut k = 0;
        while at < body.len() {
            let n = sizes[k % sizes.len()].clamp(1, body.len() - at);
            write_size(&mut out, n, &lines[k % lines.len()]);
            out.extend_from_slice(&body[at..at + n]);
            out.extend_from_slice(b"\r\n");
            at += n;
            k += 1;
        }
        write_size(&mut out, 0, &lines[k % lines.len()]);
        for t in trailers {
            out.extend_from_slice(t.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    /// Feeds `input` cut at `cuts`, as a connection does: every byte not consumed by a
    /// finished decoder is left over. Ok: (body, consumed, done).
    fn feed(
        input: &[u8],
        cuts: &[usize],
        limit: u64,
    ) -> Result<(Vec<u8>, usize, bool), ChunkError> {
        let mut d = ChunkedDecoder::new(limit);
        let mut out = Vec::new();
        let mut used = 0;
        let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        bounds.push(input.len());
        bounds.sort_unstable();
        let mut from = 0;
        for to in bounds {
            if to <= from {
                continue;
            }
            let n = d.decode(&input[from..to], &mut out)?;
            assert!(n <= to - from);
            used += n;
            if d.is_done() {
                break;
            }
            assert_eq!(n, to - from, "an unfinished decoder consumes everything");
            from = to;
        }
        Ok((out, used, d.is_done()))
    }

    fn body_and_framing() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
        (
            prop::collection::vec(any::<u8>(), 0..3000),
            prop::collection::vec(8usize..600, 1..6),
            prop::collection::vec(size_line(), 1..4),
            prop::collection::vec("[A-Za-z-]{1,12}: [ -~]{0,20}", 0..3),
        )
            .prop_map(|(body, sizes, lines, trailers)| {
                let wire = encode(&body, &sizes, &lines, &trailers);
                (body, wire)
            })
    }

    proptest! {
        #![proptest_config(crate::shared::prop::config(512))]

        #[test]
        fn round_trips_in_any_split(
            (body, wire) in body_and_framing(),
            next in prop::collection::vec(any::<u8>(), 0..16),
            cuts in prop::collection::vec(any::<usize>(), 0..12),
        ) {
            let mut input = wire.clone();
            input.extend_from_slice(&next);
            let (out, used, done) = feed(&input, &cuts, u64::MAX).map_err(|e| {
                TestCaseError::fail(format!("{e:?} on {:?}", String::from_utf8_lossy(&wire)))
            })?;
            prop_assert!(done);
            prop_assert_eq!(used, wire.len());
            prop_assert_eq!(out, body);
        }

        /// The limit counts decoded bytes: a body of exactly `limit` passes, one more is 413.
        #[test]
        fn limit_is_exact((body, wire) in body_and_framing(), slack in 0u64..3, cut in any::<usize>()) {
            let len = body.len() as u64;
            let limit = len.saturating_sub(slack);
            match feed(&wire, &[cut], limit) {
                Ok((out, _, true)) => prop_assert!(out.len() as u64 <= limit && len <= limit),
                Ok(_) => prop_assert!(false, "unfinished"),
                Err(e) => prop_assert!(e == ChunkError::TooLarge && len > limit, "{:?}", e),
            }
        }

        /// Random bytes: no panic, never more than the limit out, and the outcome does not
        /// depend on how the bytes arrive.
        #[test]
        fn arbitrary_input_is_split_invariant(
            input in prop_oneof![
                prop::collection::vec(any::<u8>(), 0..200),
                prop::collection::vec(prop::sample::select(b"0123456789aAfF;= \t\r\nxX:".to_vec()), 0..200),
            ],
            cuts in prop::collection::vec(any::<usize>(), 0..8),
            limit in 0u64..64,
        ) {
            let whole = feed(&input, &[], limit);
            let split = feed(&input, &cuts, limit);
            if let Ok((out, used, _)) = &whole {
                prop_assert!(out.len() as u64 <= limit);
                prop_assert!(*used <= input.len());
            }
            match (whole, split) {
                (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
                (Err(_), Err(_)) => {}
                (a, b) => prop_assert!(false, "whole {:?} vs split {:?}", a, b),
            }
        }

        /// Edits of a valid encoding: no panic, and the body never grows past what was sent.
        #[test]
        fn edited_encodings_never_panic(
            (_, wire) in body_and_framing(),
            edits in prop::collection::vec((any::<Index>(), any::<u8>()), 1..4),
        ) {
            let mut wire = wire;
            for (at, b) in edits {
                let i = at.index(wire.len());
                wire[i] = b;
            }
            if let Ok((out, used, _)) = feed(&wire, &[], u64::MAX) {
                prop_assert!(out.len() <= used);
            }
        }
    }
}
