//! Proof-of-work against scripted floods. The server hands out a signed challenge
//! `{room}.{difficulty}.{issued_s}.{nonce}.{mac}`; the page finds a `solution` such that
//! SHA-256(`challenge` + ":" + `solution`) starts with `difficulty` zero bits. Verifying is one
//! HMAC and one hash. Each challenge is accepted once (replays refused) within its lifetime.

use std::collections::HashMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use parking_lot::Mutex;
use ring::{digest, hmac};

/// A challenge is valid this long: enough to solve at the highest difficulty on a slow phone.
pub const CHALLENGE_TTL_S: i64 = 600;
/// Remembered spent challenges; beyond it new solutions are refused until old ones expire.
pub const MAX_SPENT: usize = 1_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowError {
    Malformed,
    BadSignature,
    Expired,
    TooEasy,
    WrongAnswer,
    Replayed,
    Busy,
}

impl PowError {
    pub fn as_str(self) -> &'static str {
        match self {
            PowError::Malformed => "malformed",
            PowError::BadSignature => "bad_signature",
            PowError::Expired => "expired",
            PowError::TooEasy => "too_easy",
            PowError::WrongAnswer => "wrong_answer",
            PowError::Replayed => "replayed",
            PowError::Busy => "busy",
        }
    }
}

pub struct Pow {
    key: hmac::Key,
    /// challenge nonce → issued_s, for replay refusal.
    spent: Mutex<HashMap<String, i64>>,
}

pub fn leading_zero_bits(bytes: &[u8]) -> u32 {
    let mut n = 0;
    for b in bytes {
        if *b == 0 {
            n += 8;
        } else {
            return n + b.leading_zeros();
        }
    }
    n
}

pub fn hash(challenge: &str, solution: &str) -> digest::Digest {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(challenge.as_bytes());
    ctx.update(b":");
    ctx.update(solution.as_bytes());
    ctx.finish()
}

impl Pow {
    pub fn new(secret: &[u8; 32]) -> Self {
        // Domain-separated from the cookie key.
        let derived = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), b"weir-pow-v1");
        Self { key: hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()), spent: Mutex::new(HashMap::new()) }
    }

    pub fn challenge(&self, room: &str, difficulty: u8, now_s: i64) -> String {
        let nonce = crate::secrets::random_token(12);
        let body = format!("{room}.{difficulty}.{now_s}.{nonce}");
        let mac = hmac::sign(&self.key, body.as_bytes());
        format!("{body}.{}", B64.encode(mac.as_ref()))
    }

    /// Checks a solution for `room` at the room's current `difficulty`.
    pub fn verify(&self, room: &str, difficulty: u8, proof: &str, now_s: i64) -> Result<(), PowError> {
        if proof.len() > 512 {
            return Err(PowError::Malformed);
        }
        let (challenge, solution) = proof.rsplit_once(':').ok_or(PowError::Malformed)?;
        let (body, mac) = challenge.rsplit_once('.').ok_or(PowError::Malformed)?;
        let mac = B64.decode(mac).map_err(|_| PowError::Malformed)?;
        hmac::verify(&self.key, body.as_bytes(), &mac).map_err(|_| PowError::BadSignature)?;
        let mut parts = body.split('.');
        let (r, d, issued, nonce) = (parts.next(), parts.next(), parts.next(), parts.next());
        let (Some(r), Some(d), Some(issued), Some(nonce)) = (r, d, issued, nonce) else { return Err(PowError::Malformed) };
        if r != room {
            return Err(PowError::BadSignature);
        }
        let d: u8 = d.parse().map_err(|_| PowError::Malformed)?;
        let issued: i64 = issued.parse().map_err(|_| PowError::Malformed)?;
        if now_s - issued > CHALLENGE_TTL_S || issued > now_s + 60 {
            return Err(PowError::Expired);
        }
        // A challenge issued before the difficulty was raised is not enough any more.
        if d < difficulty {
            return Err(PowError::TooEasy);
        }
        if leading_zero_bits(hash(challenge, solution).as_ref()) < d as u32 {
            return Err(PowError::WrongAnswer);
        }
        let mut spent = self.spent.lock();
        if spent.len() >= MAX_SPENT {
            spent.retain(|_, t| now_s - *t <= CHALLENGE_TTL_S);
            if spent.len() >= MAX_SPENT {
                return Err(PowError::Busy);
            }
        }
        if spent.insert(nonce.to_string(), issued).is_some() {
            return Err(PowError::Replayed);
        }
        metrics::gauge!("weir_pow_spent_challenges").set(spent.len() as f64);
        Ok(())
    }
}

/// Brute-forces a solution (tests and the benchmark client; the page does the same in JS).
pub fn solve(challenge: &str, difficulty: u8) -> String {
    (0u64..)
        .map(|n| n.to_string())
        .find(|s| leading_zero_bits(hash(challenge, s).as_ref()) >= difficulty as u32)
        .expect("a solution exists for difficulty <= 24")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_invalid_replayed_too_easy() {
        let pow = Pow::new(&[3; 32]);
        let c = pow.challenge("r", 8, 1000);
        let s = solve(&c, 8);
        assert_eq!(pow.verify("r", 8, &format!("{c}:{s}"), 1001), Ok(()));
        assert_eq!(pow.verify("r", 8, &format!("{c}:{s}"), 1002), Err(PowError::Replayed));
        let c2 = pow.challenge("r", 8, 1000);
        let wrong = (0..).map(|n: u32| n.to_string()).find(|x| leading_zero_bits(hash(&c2, x).as_ref()) < 8).unwrap();
        assert_eq!(pow.verify("r", 8, &format!("{c2}:{wrong}"), 1001), Err(PowError::WrongAnswer));
        let easy = pow.challenge("r", 2, 1000);
        assert_eq!(pow.verify("r", 8, &format!("{easy}:{}", solve(&easy, 2)), 1001), Err(PowError::TooEasy));
        assert_eq!(pow.verify("other", 8, &format!("{c2}:{}", solve(&c2, 8)), 1001), Err(PowError::BadSignature));
        assert_eq!(pow.verify("r", 8, &format!("{c2}:{}", solve(&c2, 8)), 1000 + CHALLENGE_TTL_S + 1), Err(PowError::Expired));
        let forged = c2.replacen(".8.", ".1.", 1);
        assert_eq!(pow.verify("r", 1, &format!("{forged}:0"), 1001), Err(PowError::BadSignature));
        assert_eq!(pow.verify("r", 8, "junk", 1001), Err(PowError::Malformed));
    }
}
