//! Deterministic random bit generator seeded by the runtime.
//!
//! The core never asks the operating system for entropy: the runtime passes a 32-byte seed
//! from its CSPRNG, and tests pass fixed seeds. Output blocks are
//! `HMAC-SHA256(seed_key, "dialback drbg" || counter)`, a PRF in counter mode, which is
//! indistinguishable from random for anyone who does not know the seed.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

pub struct Drbg {
    key: [u8; 32],
    counter: u64,
}

impl Drbg {
    pub fn new(seed: [u8; 32]) -> Self {
        Drbg {
            key: seed,
            counter: 0,
        }
    }

    /// Mix fresh entropy from the runtime into the state (e.g. periodically).
    pub fn reseed(&mut self, extra: &[u8]) {
        let mut mac = new_mac(&self.key);
        mac.update(b"dialback drbg reseed");
        mac.update(extra);
        self.key.copy_from_slice(&mac.finalize().into_bytes());
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(32) {
            let mut mac = new_mac(&self.key);
            mac.update(b"dialback drbg");
            mac.update(&self.counter.to_be_bytes());
            self.counter = self.counter.wrapping_add(1);
            let block = mac.finalize().into_bytes();
            chunk.copy_from_slice(&block[..chunk.len()]);
        }
    }

    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        self.fill(&mut out);
        out
    }
}

fn new_mac(key: &[u8; 32]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length, so this cannot fail.
    match <Hmac<Sha256> as KeyInit>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable_mac(),
    }
}

#[cold]
fn unreachable_mac() -> Hmac<Sha256> {
    <Hmac<Sha256> as KeyInit>::new(&Default::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_blocks_and_reproducible() {
        let mut a = Drbg::new([7; 32]);
        let mut b = Drbg::new([7; 32]);
        let x: [u8; 48] = a.array();
        let y: [u8; 48] = b.array();
        assert_eq!(x, y);
        assert_ne!(x[..16], x[32..48]);
        let z: [u8; 48] = a.array();
        assert_ne!(x, z);
        b.reseed(b"more");
        let w: [u8; 48] = b.array();
        assert_ne!(w, z);
    }
}
