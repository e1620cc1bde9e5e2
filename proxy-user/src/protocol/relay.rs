//! The konduit relay preamble (konduit ⇄ konduit only): the fixed binary
//! header an agent writes on a relay socket before the socket becomes the raw
//! byte stream of exactly one tunnelled connection, and the server's verdict.
//!
//! ```text
//! offset  size  field
//! 0       4     magic "KDRL"
//! 4       1     version (1)
//! 5       16    session key (issued to the agent's session in its Connect headers)
//! 21      16    ticket (single use, from the DIAL_REQ)
//! ```
//! A warm relay socket sends the first 21 bytes when it is opened and the
//! ticket when a dial takes it. The server answers one verdict byte.

use std::fmt;

/// ALPN of a TLS relay socket (plaintext relays start with the magic instead of a handshake).
pub const ALPN_RELAY: &[u8] = b"konduit-relay/1";

/// Length of a session key and of a ticket.
pub const TOKEN_LEN: usize = 16;
/// The part a warm socket sends in advance.
pub const HELLO_LEN: usize = 4 + 1 + TOKEN_LEN;
/// The whole preamble.
pub const PREAMBLE_LEN: usize = HELLO_LEN + TOKEN_LEN;

const MAGIC: &[u8; 4] = b"KDRL";
const VERSION: u8 = 1;

/// A random 128-bit secret: a session key or a relay ticket.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token(pub [u8; TOKEN_LEN]);

impl Token {
    pub fn random() -> Self {
        use rand::RngCore;
        let mut bytes = [0u8; TOKEN_LEN];
        rand::rng().fill_bytes(&mut bytes);
        Token(bytes)
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Token)
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != TOKEN_LEN * 2 {
            return None;
        }
        let mut out = [0u8; TOKEN_LEN];
        for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
            let pair = std::str::from_utf8(chunk).ok()?;
            out[i] = u8::from_str_radix(pair, 16).ok()?;
        }
        Some(Token(out))
    }
}

impl fmt::Debug for Token {
    // Secrets stay out of logs; the first bytes suffice to correlate.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({:02x}{:02x}…)", self.0[0], self.0[1])
    }
}

/// The server's one-byte answer to a preamble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Verdict {
    /// The socket is now the tunnelled connection's byte stream.
    Accepted = 0,
    /// Unknown, expired or already used ticket.
    BadTicket = 1,
    /// The session key names no live session of this server.
    BadSession = 2,
}

impl Verdict {
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(Verdict::Accepted),
            1 => Some(Verdict::BadTicket),
            2 => Some(Verdict::BadSession),
            _ => None,
        }
    }
}

/// Why a hello could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PreambleError {
    #[error("relay preamble has bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    #[error("relay preamble version {0} is not supported (expected {VERSION})")]
    BadVersion(u8),
}

/// Encodes the hello (magic, version, session key).
pub fn encode_hello(session: &Token) -> [u8; HELLO_LEN] {
    let mut out = [0u8; HELLO_LEN];
    out[..4].copy_from_slice(MAGIC);
    out[4] = VERSION;
    out[5..].copy_from_slice(&session.0);
    out
}

/// Parses a hello; returns the session key.
pub fn parse_hello(bytes: &[u8; HELLO_LEN]) -> Result<Token, PreambleError> {
    let magic: [u8; 4] = [bytes[0], bytes[1], bytes[2], bytes[3]];
    if &magic != MAGIC {
        return Err(PreambleError::BadMagic(magic));
    }
    if bytes[4] != VERSION {
        return Err(PreambleError::BadVersion(bytes[4]));
    }
    let mut key = [0u8; TOKEN_LEN];
    key.copy_from_slice(&bytes[5..]);
    Ok(Token(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips_and_rejects_foreign_bytes() {
        let key = Token::random();
        assert_eq!(parse_hello(&encode_hello(&key)), Ok(key));
        let mut tls = encode_hello(&key);
        tls[..4].copy_from_slice(&[0x16, 0x03, 0x01, 0x00]);
        assert!(matches!(parse_hello(&tls), Err(PreambleError::BadMagic(_))));
        let mut future = encode_hello(&key);
        future[4] = 9;
        assert_eq!(parse_hello(&future), Err(PreambleError::BadVersion(9)));
    }

    #[test]
    fn tokens_print_without_their_secret_and_round_trip_as_hex() {
        let t = Token([0xab; TOKEN_LEN]);
        assert_eq!(format!("{t:?}"), "Token(abab…)");
        assert_eq!(Token::from_hex(&t.to_hex()), Some(t));
        assert_eq!(Token::from_hex("zz"), None);
        assert_eq!(Verdict::from_byte(Verdict::BadTicket as u8), Some(Verdict::BadTicket));
        assert_eq!(Verdict::from_byte(7), None);
    }
}
