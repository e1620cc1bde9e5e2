//! Deterministic payloads and digests for byte-exact transfer checks: the
//! same `(seed, offset)` always yields the same bytes, so a receiver can check
//! any slice of a multi-GiB stream without storing it. Pure functions only.

use sha2::{Digest, Sha256};

/// The seed the [`crate::backends::Backend::source`] backend uses for what it sends.
pub const SOURCE_SEED: u64 = 0x6b6f_6e64_7569_7421;

/// One step of the splitmix64 generator (also a good 64-bit mixer).
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn word(seed: u64, index: u64) -> [u8; 8] {
    splitmix64(seed ^ index.wrapping_mul(0xd6e8_feb8_6659_fd93)).to_le_bytes()
}

/// Fills `buf` with the pattern bytes `[offset, offset + buf.len())` of stream `seed`.
pub fn pattern_fill(seed: u64, offset: u64, buf: &mut [u8]) {
    // Unaligned head, then whole 8-byte words (the hot path), then the tail.
    let head = ((8 - offset % 8) % 8).min(buf.len() as u64) as usize;
    if head > 0 {
        let w = word(seed, offset / 8);
        let skip = (offset % 8) as usize;
        buf[..head].copy_from_slice(&w[skip..skip + head]);
    }
    let mut index = (offset + head as u64) / 8;
    let mut words = buf[head..].chunks_exact_mut(8);
    for chunk in &mut words {
        chunk.copy_from_slice(&word(seed, index));
        index += 1;
    }
    let tail = words.into_remainder();
    if !tail.is_empty() {
        let n = tail.len();
        tail.copy_from_slice(&word(seed, index)[..n]);
    }
}

/// The first `len` pattern bytes of stream `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    pattern_fill(seed, 0, &mut buf);
    buf
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// SHA-256 of the first `len` pattern bytes of `seed`, computed in chunks.
pub fn pattern_sha256(seed: u64, len: u64) -> [u8; 32] {
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 1 << 20];
    let mut offset = 0;
    while offset < len {
        let n = (len - offset).min(buf.len() as u64) as usize;
        pattern_fill(seed, offset, &mut buf[..n]);
        hasher.update(&buf[..n]);
        offset += n as u64;
    }
    hasher.finalize().into()
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks a received stream against pattern `seed` chunk by chunk, remembering the
/// first mismatch. Cheap enough for GiB transfers.
#[derive(Debug)]
pub struct PatternCheck {
    seed: u64,
    received: u64,
    first_mismatch: Option<u64>,
    /// Up to [`EVIDENCE`] bytes received from the first mismatch on, to tell a shift
    /// (bytes lost, repeated or reordered) from damaged bytes.
    evidence: Vec<u8>,
    scratch: Vec<u8>,
}

/// Bytes kept from the first mismatch on.
const EVIDENCE: usize = 64;
/// How far around the first mismatch [`PatternCheck::finish`] looks for the bytes found there.
const SEARCH_RADIUS: u64 = 32 << 20;

impl PatternCheck {
    /// Expects pattern `seed` from offset 0.
    pub fn new(seed: u64) -> Self {
        PatternCheck { seed, received: 0, first_mismatch: None, evidence: Vec::new(), scratch: Vec::new() }
    }

    /// Feeds the next received bytes.
    pub fn update(&mut self, chunk: &[u8]) {
        if self.first_mismatch.is_none() {
            self.scratch.resize(chunk.len(), 0);
            pattern_fill(self.seed, self.received, &mut self.scratch);
            if let Some(i) = chunk.iter().zip(&self.scratch).position(|(a, b)| a != b) {
                self.first_mismatch = Some(self.received + i as u64);
                self.evidence = chunk[i..].iter().take(EVIDENCE).copied().collect();
            }
        } else if self.evidence.len() < EVIDENCE {
            let more = (EVIDENCE - self.evidence.len()).min(chunk.len());
            self.evidence.extend_from_slice(&chunk[..more]);
        }
        self.received += chunk.len() as u64;
    }

    /// Bytes fed so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// `Ok` if exactly `len` bytes arrived and all matched, else a description.
    pub fn finish(&self, len: u64) -> Result<(), String> {
        if let Some(at) = self.first_mismatch {
            return Err(format!("byte {at} differs from the pattern{}", self.where_from(at)));
        }
        if self.received != len {
            return Err(format!("received {} bytes, expected {len}", self.received));
        }
        Ok(())
    }

    /// Where in the pattern the bytes received at `at` come from, if from near it.
    fn where_from(&self, at: u64) -> String {
        if self.evidence.len() < 16 {
            return String::new();
        }
        let start = at.saturating_sub(SEARCH_RADIUS);
        let mut window = vec![0; (at + SEARCH_RADIUS - start) as usize];
        pattern_fill(self.seed, start, &mut window);
        match window.windows(self.evidence.len()).position(|w| w == self.evidence.as_slice()) {
            Some(i) => {
                let from = start + i as u64;
                let shift = from as i64 - at as i64;
                format!(
                    " (received {} bytes are the pattern's from offset {from}: {} by {} bytes)",
                    self.evidence.len(),
                    if shift < 0 { "repeated or late" } else { "skipped ahead" },
                    shift.unsigned_abs()
                )
            }
            None => format!(" (the {} bytes received there are from no offset within 32 MiB)", self.evidence.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_fill_is_offset_consistent() {
        let whole = pattern(7, 1000);
        for offset in 0..40 {
            for len in 0..40 {
                let mut part = vec![0; len];
                pattern_fill(7, offset as u64, &mut part);
                assert_eq!(part, whole[offset..offset + len], "offset {offset} len {len}");
            }
        }
        assert_ne!(pattern(7, 64), pattern(8, 64));
    }

    #[test]
    fn pattern_check_finds_the_first_bad_byte() {
        let mut data = pattern(1, 100);
        let mut ok = PatternCheck::new(1);
        ok.update(&data[..40]);
        ok.update(&data[40..]);
        assert_eq!(ok.finish(100), Ok(()));
        data[57] ^= 1;
        let mut bad = PatternCheck::new(1);
        bad.update(&data[..50]);
        bad.update(&data[50..]);
        assert_eq!(
            bad.finish(100),
            Err("byte 57 differs from the pattern (the 43 bytes received there are from no offset within 32 MiB)"
                .into()),
            "a damaged byte is from nowhere"
        );
        let mut shifted = pattern(2, 4096);
        shifted.drain(1000..1100);
        let mut skipped = PatternCheck::new(2);
        skipped.update(&shifted);
        assert_eq!(
            skipped.finish(4096),
            Err("byte 1000 differs from the pattern (received 64 bytes are the pattern's from offset 1100: skipped ahead by 100 bytes)".into())
        );
        assert_eq!(pattern_sha256(1, 100), sha256(&pattern(1, 100)));
    }
}
