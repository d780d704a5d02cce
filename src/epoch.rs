//! Draw epochs: the secret every draw's randomness is derived from, and its commitment.
//!
//! A draw's randomness is a pure function of the epoch secret and the request ID, never of
//! process history, so anyone holding the secret can re-derive every outcome (`audit`, the
//! independent verifier in examples/verify). The stream of one request (docs/audit.md):
//!
//! ```text
//! block_j = HMAC-SHA256(key = secret, msg = request_id as u64 LE || j as u64 LE),  j = 0, 1, ..
//! word_k  = bytes 8k..8k+8 of the concatenated blocks, as u64 LE
//! ```
//!
//! The draws of one request (count > 1) consume that one stream in order; each takes one or
//! (rarely) more words through Lemire's multiply-and-reject in `pool::uniform_below`.
//! HMAC-SHA256 rather than a ChaCha stream keyed by a hash: one keyed primitive, standard
//! (RFC 2104), in Python's standard library (so the verifier is a few lines), and with the
//! HMAC's inner and outer key blocks computed once per epoch, a request costs two SHA-256
//! compressions (SHA-NI where the CPU has it).
//!
//! An epoch is a fresh 256-bit secret from the OS at every engine start and every
//! `storage.seed_epoch_records` draws. Its `Epoch` WAL record (number, secret,
//! sha256(secret)) is written before the first draw that uses it; snapshots keep the current
//! epoch so `audit` can start from one. `storage.rng_seed` (tests) derives the secrets:
//! `sha256("rewardpool-test-epoch" || rng_seed LE || number LE)`.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::convert::Infallible;
use std::fmt;

/// An epoch secret: 256 bits.
pub type Secret = [u8; 32];

/// sha256(secret): published while the epoch runs, checked against the secret afterwards.
pub fn commitment(secret: &Secret) -> [u8; 32] {
    Sha256::digest(secret).into()
}

/// A fresh secret from the operating system's generator.
pub fn os_secret() -> Secret {
    use rand::TryRng;
    let mut secret = [0u8; 32];
    rand::rngs::SysRng
        .try_fill_bytes(&mut secret)
        .expect("the operating system's random generator failed");
    secret
}

/// The secret of epoch `number` under the test-only `storage.rng_seed`.
pub fn test_secret(rng_seed: u64, number: u64) -> Secret {
    let mut h = Sha256::new();
    h.update(b"rewardpool-test-epoch");
    h.update(rng_seed.to_le_bytes());
    h.update(number.to_le_bytes());
    h.finalize().into()
}

/// The HMAC keyed with an epoch secret, its key blocks computed once.
#[derive(Clone)]
pub struct DrawKey {
    mac: Hmac<Sha256>,
}

impl DrawKey {
    pub fn new(secret: &Secret) -> DrawKey {
        DrawKey {
            mac: Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length"),
        }
    }

    /// The random stream of one request.
    #[inline]
    pub fn stream(&self, request_id: u64) -> DrawRng {
        DrawRng {
            mac: self.mac.clone(),
            request_id,
            block: 0,
            words: [0; 4],
            next: 4,
        }
    }
}

impl fmt::Debug for DrawKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DrawKey(..)")
    }
}

/// The random stream of one request: HMAC-SHA256 in counter mode (see the module comment).
/// It is also a seedable generator (`SeedableRng`: the stream of request 0 under the seed as
/// secret) for tests and benchmarks that draw without requests.
#[derive(Clone)]
pub struct DrawRng {
    mac: Hmac<Sha256>,
    request_id: u64,
    block: u64,
    words: [u64; 4],
    next: usize,
}

impl DrawRng {
    #[inline]
    fn refill(&mut self) {
        let mut mac = self.mac.clone();
        let mut msg = [0u8; 16];
        msg[..8].copy_from_slice(&self.request_id.to_le_bytes());
        msg[8..].copy_from_slice(&self.block.to_le_bytes());
        mac.update(&msg);
        let out = mac.finalize().into_bytes();
        for (k, word) in self.words.iter_mut().enumerate() {
            *word = u64::from_le_bytes(out[8 * k..8 * k + 8].try_into().expect("8 bytes"));
        }
        self.block += 1;
        self.next = 0;
    }

    /// The next word of the stream.
    #[inline]
    pub fn word(&mut self) -> u64 {
        if self.next == 4 {
            self.refill();
        }
        let word = self.words[self.next];
        self.next += 1;
        word
    }
}

impl fmt::Debug for DrawRng {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "DrawRng(request {}, block {})",
            self.request_id, self.block
        )
    }
}

impl rand::TryRng for DrawRng {
    type Error = Infallible;

    #[inline]
    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok(self.word() as u32)
    }

    #[inline]
    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        Ok(self.word())
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        for chunk in dst.chunks_mut(8) {
            let word = self.word().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
        Ok(())
    }
}

impl rand::SeedableRng for DrawRng {
    type Seed = Secret;

    fn from_seed(seed: Secret) -> DrawRng {
        DrawKey::new(&seed).stream(0)
    }
}

/// The epoch the state is in: the last `Epoch` record applied, and the draws made under it.
#[derive(Clone)]
pub struct EpochState {
    pub number: u64,
    pub secret: Secret,
    pub commitment: [u8; 32],
    pub draws: u64,
    pub key: DrawKey,
}

impl EpochState {
    pub fn new(number: u64, secret: Secret, commitment: [u8; 32], draws: u64) -> EpochState {
        EpochState {
            number,
            key: DrawKey::new(&secret),
            secret,
            commitment,
            draws,
        }
    }

    /// Whether the recorded commitment is sha256 of the recorded secret.
    pub fn commitment_holds(&self) -> bool {
        commitment(&self.secret) == self.commitment
    }
}

/// Never prints the secret (no secrets in logs).
impl fmt::Debug for EpochState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EpochState")
            .field("number", &self.number)
            .field("commitment", &to_hex(&self.commitment))
            .field("draws", &self.draws)
            .finish_non_exhaustive()
    }
}

pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

/// 64 hex digits to 32 bytes.
pub fn from_hex32(text: &str) -> Option<[u8; 32]> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn the_stream_is_hmac_sha256_in_counter_mode() {
        let secret = [7u8; 32];
        let mut rng = DrawKey::new(&secret).stream(42);
        let words: Vec<u64> = (0..8).map(|_| rng.next_u64()).collect();
        for block in 0..2u64 {
            let mut mac = Hmac::<Sha256>::new_from_slice(&secret).unwrap();
            mac.update(&42u64.to_le_bytes());
            mac.update(&block.to_le_bytes());
            let out = mac.finalize().into_bytes();
            for k in 0..4 {
                let want = u64::from_le_bytes(out[8 * k..8 * k + 8].try_into().unwrap());
                assert_eq!(words[block as usize * 4 + k], want);
            }
        }
    }

    #[test]
    fn streams_depend_on_secret_and_request_only() {
        let a = DrawKey::new(&[1; 32]);
        let b = DrawKey::new(&[2; 32]);
        assert_eq!(a.stream(5).next_u64(), a.clone().stream(5).next_u64());
        assert_ne!(a.stream(5).next_u64(), a.stream(6).next_u64());
        assert_ne!(a.stream(5).next_u64(), b.stream(5).next_u64());
    }

    #[test]
    fn secrets_commitments_and_hex() {
        assert_eq!(test_secret(7, 1), test_secret(7, 1));
        assert_ne!(test_secret(7, 1), test_secret(7, 2));
        assert_ne!(os_secret(), os_secret());
        // sha256("") is well known; commitment is plain sha256 of the 32 bytes.
        assert_eq!(
            to_hex(&Sha256::digest(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let secret = test_secret(1, 1);
        assert_eq!(
            to_hex(&commitment(&secret)),
            to_hex(&Sha256::digest(secret))
        );
        assert_eq!(from_hex32(&to_hex(&secret)), Some(secret));
        assert_eq!(from_hex32("zz"), None);
        let epoch = EpochState::new(3, secret, commitment(&secret), 0);
        assert!(epoch.commitment_holds());
        assert!(!format!("{epoch:?}").contains(&to_hex(&secret)));
    }
}
