//! The deterministic byte stream every bulk transfer carries, so the receiver
//! can check each byte where it arrives (no hashing pass, no copy kept).
//!
//! The stream is a 64 KiB pseudo-random block, rotated by a different amount
//! in each 64 KiB window of the stream: a lost, duplicated or reordered window
//! shows up as a mismatch, and filling and checking are plain `memcpy` /
//! `memcmp`, fast even in an unoptimised build.

/// Length of the pseudo-random block and of one window of the stream.
const BLOCK: usize = 64 * 1024;
/// Rotation added per window; odd and coprime with `BLOCK`, so windows repeat
/// only every `BLOCK` windows (4 GiB).
const STRIDE: usize = 4099;

/// One seeded stream.
#[derive(Clone)]
pub struct Pattern {
    /// The block twice over, so any rotated window is one contiguous slice.
    doubled: Vec<u8>,
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Pattern {
    pub fn new(seed: u64) -> Self {
        let mut state = seed;
        let mut doubled = Vec::with_capacity(2 * BLOCK);
        while doubled.len() < BLOCK {
            doubled.extend_from_slice(&splitmix64(&mut state).to_le_bytes());
        }
        doubled.extend_from_within(..BLOCK);
        Pattern { doubled }
    }

    /// The expected bytes at stream offset `offset`, up to the end of its window.
    fn window(&self, offset: u64, max: usize) -> &[u8] {
        let window = (offset / BLOCK as u64) as usize;
        let within = (offset % BLOCK as u64) as usize;
        let start = (window % BLOCK * STRIDE + within) % BLOCK;
        let len = max.min(BLOCK - within);
        &self.doubled[start..start + len]
    }

    /// Writes the stream's bytes `offset .. offset + out.len()` into `out`.
    pub fn fill(&self, mut offset: u64, mut out: &mut [u8]) {
        while !out.is_empty() {
            let src = self.window(offset, out.len());
            let (head, tail) = out.split_at_mut(src.len());
            head.copy_from_slice(src);
            offset += src.len() as u64;
            out = tail;
        }
    }

    /// Checks received bytes that start at stream offset `offset`; on a
    /// mismatch, returns the stream offset of the first wrong byte.
    pub fn verify(&self, mut offset: u64, mut data: &[u8]) -> Result<(), u64> {
        while !data.is_empty() {
            let expected = self.window(offset, data.len());
            let (head, tail) = data.split_at(expected.len());
            if head != expected {
                let at = head.iter().zip(expected).position(|(a, b)| a != b).unwrap_or(0);
                return Err(offset + at as u64);
            }
            offset += head.len() as u64;
            data = tail;
        }
        Ok(())
    }
}

/// A run of received bytes and the stream offset they hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// Where the run was received (stream offset it should have held).
    pub received_at: u64,
    pub len: u64,
    /// The stream offset its bytes come from, if they are the stream's at all.
    pub from: Option<u64>,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (at, end) = (self.received_at, self.received_at + self.len);
        match self.from {
            Some(from) if from == at => write!(f, "{at}..{end} in place"),
            Some(from) => write!(f, "{at}..{end} = stream {from}.. ({:+})", from as i128 - at as i128),
            None => write!(f, "{at}..{end} not from the stream"),
        }
    }
}

/// Windows searched on either side of where a run was received (±32 MiB).
const SEARCH_WINDOWS: u64 = 512;
/// Bytes that identify a position within the block.
const PROBE: usize = 32;

impl Pattern {
    /// Bytes of `data` (received at stream offset `at`) that equal the
    /// stream from offset `from`.
    fn matching_len(&self, from: u64, data: &[u8]) -> usize {
        let mut matched = 0;
        while matched < data.len() {
            let expected = self.window(from + matched as u64, data.len() - matched);
            let got = &data[matched..matched + expected.len()];
            match got.iter().zip(expected).position(|(a, b)| a != b) {
                Some(i) => return matched + i,
                None => matched += expected.len(),
            }
        }
        matched
    }

    /// The stream offset near `near` whose bytes `data` starts with, and how
    /// many bytes match from there; `None` if its first bytes are nowhere in
    /// the block.
    fn locate(&self, near: u64, data: &[u8]) -> Option<(u64, usize)> {
        let probe = data.get(..PROBE)?;
        let finder = memchr::memmem::Finder::new(probe);
        let mut best: Option<(u64, usize)> = None;
        for p in finder.find_iter(&self.doubled).filter(|&p| p < BLOCK) {
            let first = (near / BLOCK as u64).saturating_sub(SEARCH_WINDOWS);
            for window in first..=near / BLOCK as u64 + SEARCH_WINDOWS {
                let start = (window as usize % BLOCK) * STRIDE % BLOCK;
                let within = (p + BLOCK - start) % BLOCK;
                let from = window * BLOCK as u64 + within as u64;
                let len = self.matching_len(from, data);
                let better = match best {
                    None => true,
                    Some((b, blen)) => len > blen || (len == blen && from.abs_diff(near) < b.abs_diff(near)),
                };
                if better {
                    best = Some((from, len));
                }
            }
        }
        best
    }

    /// Says where the bytes of `data`, received at stream offset `at`, come
    /// from: runs in place, repeated or skipped ahead, or foreign.
    pub fn origins(&self, at: u64, data: &[u8]) -> Vec<Origin> {
        let mut runs: Vec<Origin> = Vec::new();
        let mut pos = 0usize;
        while pos < data.len() {
            let here = at + pos as u64;
            let (from, len) = match self.locate(here, &data[pos..]) {
                Some((from, len)) if len >= PROBE => (Some(from), len),
                _ => (None, 1),
            };
            match runs.last_mut() {
                Some(last) if last.from.is_none() && from.is_none() => last.len += 1,
                _ => runs.push(Origin { received_at: here, len: len as u64, from }),
            }
            pos += len;
        }
        runs
    }
}

/// [`Pattern::origins`] as one line, at most `max` runs.
pub fn describe_origins(runs: &[Origin], max: usize) -> String {
    let mut parts: Vec<String> = runs.iter().take(max).map(ToString::to_string).collect();
    if runs.len() > max {
        parts.push(format!("… {} more runs", runs.len() - max));
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filled_bytes_verify_at_any_split() {
        let p = Pattern::new(7);
        let mut stream = vec![0u8; 3 * BLOCK + 123];
        p.fill(0, &mut stream);
        for split in [0, 1, BLOCK - 1, BLOCK, BLOCK + 5, 2 * BLOCK + 77] {
            let (a, b) = stream.split_at(split);
            assert_eq!(p.verify(0, a), Ok(()));
            assert_eq!(p.verify(split as u64, b), Ok(()));
        }
    }

    #[test]
    fn a_wrong_byte_is_located() {
        let p = Pattern::new(1);
        let mut stream = vec![0u8; 2 * BLOCK];
        p.fill(0, &mut stream);
        stream[BLOCK + 10] ^= 0x40;
        assert_eq!(p.verify(0, &stream), Err(BLOCK as u64 + 10));
    }

    #[test]
    fn a_lost_or_repeated_window_is_caught() {
        let p = Pattern::new(3);
        let mut stream = vec![0u8; 3 * BLOCK];
        p.fill(0, &mut stream);
        // Window 2 arrives where window 1 belongs (window 1 was lost).
        assert!(p.verify(BLOCK as u64, &stream[2 * BLOCK..]).is_err());
        // Window 0 arrives twice.
        assert!(p.verify(BLOCK as u64, &stream[..BLOCK]).is_err());
    }

    #[test]
    fn seeds_give_different_streams() {
        let (mut a, mut b) = (vec![0u8; 64], vec![0u8; 64]);
        Pattern::new(1).fill(0, &mut a);
        Pattern::new(2).fill(0, &mut b);
        assert_ne!(a, b);
    }

    #[test]
    fn origins_tell_a_repeated_segment_from_a_foreign_one() {
        let p = Pattern::new(9);
        let mut stream = vec![0u8; 8 * BLOCK];
        p.fill(0, &mut stream);
        let good = stream.clone();
        // Bytes 200_000.. arrive again where 265_483.. belong (a 65,483-byte repeat).
        let (at, len) = (265_483usize, 70_000usize);
        stream.copy_within(200_000..200_000 + len, at);
        // And 100 foreign bytes further on.
        stream[400_000..400_100].fill(0xAB);
        let runs = p.origins(200_000, &stream[200_000..420_000]);
        assert_eq!(runs[0], Origin { received_at: 200_000, len: 65_483, from: Some(200_000) });
        assert_eq!(runs[1], Origin { received_at: 265_483, len: len as u64, from: Some(200_000) });
        assert_eq!(runs[2].from, Some(265_483 + len as u64), "then in place again");
        assert!(runs.iter().any(|r| r.from.is_none() && r.received_at == 400_000 && r.len >= 100));
        assert_eq!(runs.last().map(|r| r.received_at + r.len), Some(420_000));
        assert_eq!(
            p.origins(0, &good[..3 * BLOCK]),
            vec![Origin { received_at: 0, len: 3 * BLOCK as u64, from: Some(0) }]
        );
        assert!(describe_origins(&runs, 2).contains("(-65483)"));
    }
}
