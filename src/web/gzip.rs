//! Gzip without compressing on every request. Every browser offers gzip, and compressing a
//! 2.5 KB waiting page costs more CPU than issuing its durable ticket and rendering it (see
//! BENCHMARKS.md). So the fixed text of a page is compressed once, when its skeleton is built,
//! and each response is stitched together: the pre-compressed pieces as they are, the few
//! per-visitor values as stored (uncompressed) deflate blocks, and a gzip header and trailer.
//!
//! This works because a deflate stream is a sequence of blocks, and a sync flush ends a piece on
//! a byte boundary with every block non-final: pieces compressed on their own can follow each
//! other in one stream (back-references never reach before their own piece, which is allowed).

use axum::http::{header, HeaderMap};
use flate2::{Compress, Compression, FlushCompress};

/// Gzip member header (RFC 1952): deflate, no name or time, unknown OS.
const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
/// A final, empty stored block: ends the deflate stream.
const LAST_BLOCK: [u8; 5] = [0x01, 0x00, 0x00, 0xff, 0xff];
/// Largest stored block (its length is 16 bits).
const MAX_STORED: usize = u16::MAX as usize;

/// Whether the client takes `Content-Encoding: gzip` (`gzip` or `x-gzip` listed without `q=0`).
pub fn accepts_gzip(headers: &HeaderMap) -> bool {
    // Bytes, not `str`: asked on every new visitor's page, and a coding other than gzip needs
    // no further look.
    headers.get_all(header::ACCEPT_ENCODING).iter().any(|v| v.as_bytes().split(|b| *b == b',').any(item_accepts_gzip))
}

/// One `Accept-Encoding` item: gzip (or x-gzip) not refused with `q=0`.
fn item_accepts_gzip(item: &[u8]) -> bool {
    let mut params = item.split(|b| *b == b';');
    let coding = params.next().unwrap_or_default().trim_ascii();
    if !(coding.eq_ignore_ascii_case(b"gzip") || coding.eq_ignore_ascii_case(b"x-gzip")) {
        return false;
    }
    !params.any(|p| {
        let (name, value) = p.split_at(p.iter().position(|b| *b == b'=').unwrap_or(p.len()));
        let value = value.strip_prefix(b"=").unwrap_or_default().trim_ascii();
        name.trim_ascii().eq_ignore_ascii_case(b"q")
            && std::str::from_utf8(value).ok().and_then(|v| v.parse::<f32>().ok()).is_none_or(|q| q <= 0.0)
    })
}

/// A text compressed once by [`deflate_piece`].
pub struct Deflated {
    bytes: Box<[u8]>,
    /// The text's CRC-32 from a fresh start: a page's first piece is the same for every visitor,
    /// so its share of the trailer's checksum is computed once, not on every response.
    crc: crc32fast::Hasher,
}

impl Deflated {
    pub fn compressed_len(&self) -> usize {
        self.bytes.len()
    }
}

/// `text` as raw deflate blocks ending in a sync flush: byte-aligned and not final, ready to be
/// followed by more blocks. `None` only if the compressor fails (then callers send plain text).
pub fn deflate_piece(text: &[u8]) -> Option<Deflated> {
    let mut compress = Compress::new(Compression::best(), false);
    let mut out = Vec::with_capacity(text.len() / 2 + 64);
    loop {
        out.reserve(text.len() / 4 + 64);
        let consumed = usize::try_from(compress.total_in()).ok()?;
        compress.compress_vec(&text[consumed..], &mut out, FlushCompress::Sync).ok()?;
        // The flush is complete once the compressor stops short of the room it was given.
        if usize::try_from(compress.total_in()).ok()? == text.len() && out.len() < out.capacity() {
            let mut crc = crc32fast::Hasher::new();
            crc.update(text);
            return Some(Deflated { bytes: out.into_boxed_slice(), crc });
        }
    }
}

/// A gzip response body being put together from pre-compressed and plain pieces.
pub struct GzipWriter {
    out: Vec<u8>,
    crc: crc32fast::Hasher,
    len: u32,
    /// Where the stored block being written starts (its header, patched when the block ends).
    open_block: Option<usize>,
}

impl GzipWriter {
    pub fn with_capacity(capacity: usize) -> Self {
        let mut capacity = capacity + HEADER.len() + LAST_BLOCK.len() + 8;
        // A buffer over 1 KiB whose size is not a power of two takes mimalloc's slower
        // over-allocating path (the `mimalloc` crate asks for every block aligned); a page is
        // 1-4 KiB, so round it up.
        if capacity <= 4096 {
            capacity = capacity.next_power_of_two();
        }
        let mut out = Vec::with_capacity(capacity);
        out.extend_from_slice(&HEADER);
        Self { out, crc: crc32fast::Hasher::new(), len: 0, open_block: None }
    }

    /// Text whose [`deflate_piece`] is `deflated`.
    pub fn precompressed(&mut self, plain: &[u8], deflated: &Deflated) {
        self.end_stored_block();
        self.out.extend_from_slice(&deflated.bytes);
        if self.len == 0 {
            // Nothing counted yet: the piece's own checksum state is the member's so far.
            self.crc = deflated.crc.clone();
            self.len = plain.len() as u32;
        } else {
            self.count(plain);
        }
    }

    /// Text sent as it is, in stored blocks: for values a few bytes long, cheaper than
    /// compressing them and hardly larger. Consecutive calls share a block, written in place:
    /// the values between two pre-compressed pieces cost one block header and one CRC pass.
    pub fn stored(&mut self, plain: &[u8]) {
        let mut rest = plain;
        while !rest.is_empty() {
            let start = *self.open_block.get_or_insert_with(|| {
                let start = self.out.len();
                self.out.extend_from_slice(&[0; 5]);
                start
            });
            let room = MAX_STORED - (self.out.len() - start - 5);
            if room == 0 {
                self.end_stored_block();
                continue;
            }
            let (now, later) = rest.split_at(rest.len().min(room));
            self.out.extend_from_slice(now);
            rest = later;
        }
    }

    /// Writes the open stored block's header (BFINAL 0, BTYPE 00, LEN, NLEN) and counts its text.
    fn end_stored_block(&mut self) {
        let Some(start) = self.open_block.take() else { return };
        let stored = self.out.len() - start - 5;
        let len = u16::try_from(stored).expect("`stored` ends a block at MAX_STORED bytes");
        self.out[start + 1..start + 3].copy_from_slice(&len.to_le_bytes());
        self.out[start + 3..start + 5].copy_from_slice(&(!len).to_le_bytes());
        let Self { out, crc, len: total, .. } = self;
        crc.update(&out[start + 5..]);
        *total = total.wrapping_add(stored as u32);
    }

    fn count(&mut self, plain: &[u8]) {
        self.crc.update(plain);
        // ISIZE is the length modulo 2^32.
        self.len = self.len.wrapping_add(plain.len() as u32);
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.end_stored_block();
        self.out.extend_from_slice(&LAST_BLOCK);
        self.out.extend_from_slice(&self.crc.finalize().to_le_bytes());
        self.out.extend_from_slice(&self.len.to_le_bytes());
        self.out
    }
}

/// `text` as a whole gzip member, compressed once (for static assets).
pub fn compress(text: &[u8]) -> Option<Vec<u8>> {
    let deflated = deflate_piece(text)?;
    let mut gzip = GzipWriter::with_capacity(deflated.compressed_len());
    gzip.precompressed(text, &deflated);
    Some(gzip.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use std::io::Read;

    fn gunzip(bytes: &[u8]) -> Vec<u8> {
        let mut plain = Vec::new();
        flate2::read::GzDecoder::new(bytes).read_to_end(&mut plain).expect("a valid gzip member");
        plain
    }

    #[test]
    fn stitched_pieces_decompress_to_the_whole_text() {
        let head = "<html><head><title>Waiting room</title></head><body>".repeat(20);
        let tail = "</body></html>\n".repeat(30);
        let long_value = "é".repeat(40_000); // 80,000 bytes: more than one stored block
        let mut gzip = GzipWriter::with_capacity(0);
        gzip.precompressed(head.as_bytes(), &deflate_piece(head.as_bytes()).unwrap());
        gzip.stored(b"12345");
        gzip.stored(b"");
        gzip.precompressed(tail.as_bytes(), &deflate_piece(tail.as_bytes()).unwrap());
        gzip.stored(long_value.as_bytes());
        gzip.precompressed(b"", &deflate_piece(b"").unwrap());
        // Consecutive values share a block, and past 65,535 bytes go on in the next one.
        let values: Vec<String> = (0..3).map(|i| char::from(b'a' + i).to_string().repeat(30_000)).collect();
        for value in &values {
            gzip.stored(value.as_bytes());
        }
        let body = gzip.finish();
        assert_eq!(gunzip(&body), [head.as_str(), "12345", &tail, &long_value, &values.concat()].concat().into_bytes());
        assert!(body.len() < head.len() / 4 + tail.len() / 4 + long_value.len() + 90_000 + 200, "the fixed text is compressed");
    }

    #[test]
    fn a_piece_checksummed_once_counts_only_at_the_start() {
        let text = "<p>the same for every visitor</p>".repeat(10);
        let piece = deflate_piece(text.as_bytes()).unwrap();
        for lead in ["", "42"] {
            let mut gzip = GzipWriter::with_capacity(0);
            gzip.stored(lead.as_bytes());
            gzip.precompressed(text.as_bytes(), &piece);
            gzip.stored(b"7");
            gzip.precompressed(text.as_bytes(), &piece);
            assert_eq!(gunzip(&gzip.finish()), format!("{lead}{text}7{text}").into_bytes());
        }
    }

    #[test]
    fn a_static_text_compresses_once_into_a_valid_member() {
        let text = include_str!("static/room.js");
        let body = compress(text.as_bytes()).unwrap();
        assert_eq!(gunzip(&body), text.as_bytes());
        assert!(body.len() < text.len() / 2);
    }

    #[test]
    fn gzip_is_taken_only_when_offered_without_q_zero() {
        let accepts = |value: Option<&str>| {
            let mut headers = HeaderMap::new();
            if let Some(v) = value {
                headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
            }
            accepts_gzip(&headers)
        };
        assert!(accepts(Some("gzip, deflate, br, zstd")));
        assert!(accepts(Some("br;q=1.0, GZIP;q=0.5")));
        assert!(accepts(Some("x-gzip")));
        assert!(!accepts(None));
        assert!(!accepts(Some("identity")));
        assert!(!accepts(Some("br, gzip;q=0")));
        assert!(!accepts(Some("gzip;q=0.000")));
        assert!(!accepts(Some("gzip;q=nonsense")));
        assert!(!accepts(Some("gzipped")));
    }
}
