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

/// `text` as raw deflate blocks ending in a sync flush: byte-aligned and not final, ready to be
/// followed by more blocks. `None` only if the compressor fails (then callers send plain text).
pub fn deflate_piece(text: &[u8]) -> Option<Box<[u8]>> {
    let mut compress = Compress::new(Compression::best(), false);
    let mut out = Vec::with_capacity(text.len() / 2 + 64);
    loop {
        out.reserve(text.len() / 4 + 64);
        let consumed = usize::try_from(compress.total_in()).ok()?;
        compress.compress_vec(&text[consumed..], &mut out, FlushCompress::Sync).ok()?;
        // The flush is complete once the compressor stops short of the room it was given.
        if usize::try_from(compress.total_in()).ok()? == text.len() && out.len() < out.capacity() {
            return Some(out.into_boxed_slice());
        }
    }
}

/// A gzip response body being put together from pre-compressed and plain pieces.
pub struct GzipWriter {
    out: Vec<u8>,
    crc: crc32fast::Hasher,
    len: u32,
}

impl GzipWriter {
    pub fn with_capacity(capacity: usize) -> Self {
        let mut out = Vec::with_capacity(capacity + HEADER.len() + LAST_BLOCK.len() + 8);
        out.extend_from_slice(&HEADER);
        Self { out, crc: crc32fast::Hasher::new(), len: 0 }
    }

    /// Text whose [`deflate_piece`] is `deflated`.
    pub fn precompressed(&mut self, plain: &[u8], deflated: &[u8]) {
        self.out.extend_from_slice(deflated);
        self.count(plain);
    }

    /// Text sent as it is, in stored blocks: for values a few bytes long, cheaper than
    /// compressing them and hardly larger.
    pub fn stored(&mut self, plain: &[u8]) {
        // Nothing to store, no block (`chunks` yields nothing for an empty slice).
        for chunk in plain.chunks(MAX_STORED) {
            let len = chunk.len() as u16;
            self.out.push(0);
            self.out.extend_from_slice(&len.to_le_bytes());
            self.out.extend_from_slice(&(!len).to_le_bytes());
            self.out.extend_from_slice(chunk);
        }
        self.count(plain);
    }

    fn count(&mut self, plain: &[u8]) {
        self.crc.update(plain);
        // ISIZE is the length modulo 2^32.
        self.len = self.len.wrapping_add(plain.len() as u32);
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.out.extend_from_slice(&LAST_BLOCK);
        self.out.extend_from_slice(&self.crc.finalize().to_le_bytes());
        self.out.extend_from_slice(&self.len.to_le_bytes());
        self.out
    }
}

/// `text` as a whole gzip member, compressed once (for static assets).
pub fn compress(text: &[u8]) -> Option<Vec<u8>> {
    let deflated = deflate_piece(text)?;
    let mut gzip = GzipWriter::with_capacity(deflated.len());
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
        let body = gzip.finish();
        assert_eq!(gunzip(&body), [head.as_str(), "12345", &tail, &long_value].concat().into_bytes());
        assert!(body.len() < head.len() / 4 + tail.len() / 4 + long_value.len() + 200, "the fixed text is compressed");
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
