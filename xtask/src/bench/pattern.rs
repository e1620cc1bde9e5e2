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
}
