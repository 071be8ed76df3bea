//! Key derivation, mutual password proofs and one-time data tokens
//! (`spec/protocol.md`, "Authentication" and "Data tokens").
//!
//! The password never crosses the wire. Both ends stretch it into a [`PasswordKey`] once, then
//! per control connection mix it with the TLS exporter value (channel binding) so that a proof
//! is worthless on any other TLS connection.

use std::fmt;

use hkdf::Hkdf;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// PBKDF2 rounds for stretching service passwords; raises the cost of guessing offline.
pub const PBKDF2_ROUNDS: u32 = 100_000;
pub const PASSWORD_SALT_PREFIX: &[u8] = b"dialback v1 password|";
pub const LABEL_AGENT_PROOF_KEY: &[u8] = b"dialback v1 agent proof";
pub const LABEL_GATEWAY_PROOF_KEY: &[u8] = b"dialback v1 gateway proof";
pub const LABEL_SESSION_KEY: &[u8] = b"dialback v1 session";
pub const LABEL_HELLO: &[u8] = b"dialback v1 hello";
pub const LABEL_WELCOME: &[u8] = b"dialback v1 welcome";
pub const LABEL_TOKEN: &[u8] = b"dialback v1 token";

/// The stretched service password. Never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct PasswordKey([u8; 32]);

impl fmt::Debug for PasswordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PasswordKey(***)")
    }
}

impl PasswordKey {
    /// PBKDF2-HMAC-SHA256(password, "dialback v1 password|" || service, 100000 rounds, 32 bytes).
    /// Costs tens of milliseconds: derive once per service at start-up, not per connection.
    pub fn derive(service: &str, password: &str) -> Self {
        let mut salt = Vec::with_capacity(PASSWORD_SALT_PREFIX.len() + service.len());
        salt.extend_from_slice(PASSWORD_SALT_PREFIX);
        salt.extend_from_slice(service.as_bytes());
        let mut out = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), &salt, PBKDF2_ROUNDS, &mut out);
        PasswordKey(out)
    }

    pub fn from_bytes(b: [u8; 32]) -> Self {
        PasswordKey(b)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// Keys of one control session, bound to its TLS connection through the exporter value.
#[derive(Clone)]
pub struct SessionKeys {
    pub agent_proof_key: [u8; 32],
    pub gateway_proof_key: [u8; 32],
    pub session_key: [u8; 32],
}

impl fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionKeys(***)")
    }
}

impl SessionKeys {
    /// PRK = HKDF-Extract(salt = exporter, IKM = password key); each key is
    /// HKDF-Expand(PRK, label, 32).
    pub fn derive(password: &PasswordKey, exporter: &[u8; 32]) -> Self {
        let hk = Hkdf::<Sha256>::new(Some(exporter), &password.0);
        let expand = |label: &[u8]| {
            let mut k = [0u8; 32];
            // 32 bytes is far below HKDF-SHA256's 8160-byte limit, so expand cannot fail.
            let _ = hk.expand(label, &mut k);
            k
        };
        SessionKeys {
            agent_proof_key: expand(LABEL_AGENT_PROOF_KEY),
            gateway_proof_key: expand(LABEL_GATEWAY_PROOF_KEY),
            session_key: expand(LABEL_SESSION_KEY),
        }
    }

    /// HMAC(agent_proof_key, "dialback v1 hello" || str8(service) || agent_nonce).
    pub fn agent_proof(&self, service: &str, agent_nonce: &[u8; 32]) -> [u8; 32] {
        hmac(
            &self.agent_proof_key,
            &[LABEL_HELLO, &str8(service), agent_nonce],
        )
    }

    /// HMAC(gateway_proof_key, "dialback v1 welcome" || str8(service) || agent_nonce ||
    /// gateway_nonce || agent_proof || session_id).
    pub fn gateway_proof(
        &self,
        service: &str,
        agent_nonce: &[u8; 32],
        gateway_nonce: &[u8; 32],
        agent_proof: &[u8; 32],
        session_id: u64,
    ) -> [u8; 32] {
        hmac(
            &self.gateway_proof_key,
            &[
                LABEL_WELCOME,
                &str8(service),
                agent_nonce,
                gateway_nonce,
                agent_proof,
                &session_id.to_be_bytes(),
            ],
        )
    }

    /// HMAC(session_key, "dialback v1 token" || session_id || request_id || str8(service) ||
    /// random16): a token is only ever valid for the session, request and service it names.
    pub fn data_token(
        &self,
        session_id: u64,
        request_id: u64,
        service: &str,
        random: &[u8; 16],
    ) -> [u8; 32] {
        hmac(
            &self.session_key,
            &[
                LABEL_TOKEN,
                &session_id.to_be_bytes(),
                &request_id.to_be_bytes(),
                &str8(service),
                random,
            ],
        )
    }
}

/// Constant-time equality for proofs and tokens.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// The wire's `str8` encoding of `s`, as the proofs hash it.
fn str8(s: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(s.len().min(255) + 1);
    crate::wire::put_str8(&mut v, s);
    v
}

fn hmac(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = match <Hmac<Sha256> as KeyInit>::new_from_slice(key) {
        Ok(m) => m,
        // HMAC takes keys of any length; this arm exists only to avoid a panic path.
        Err(_) => return [0; 32],
    };
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_depend_on_every_input() {
        let pw = PasswordKey::from_bytes([9; 32]);
        let k1 = SessionKeys::derive(&pw, &[1; 32]);
        let k2 = SessionKeys::derive(&pw, &[2; 32]);
        let other = SessionKeys::derive(&PasswordKey::from_bytes([8; 32]), &[1; 32]);
        let p = k1.agent_proof("web", &[0; 32]);
        assert_ne!(
            p,
            k2.agent_proof("web", &[0; 32]),
            "exporter binds the proof"
        );
        assert_ne!(
            p,
            other.agent_proof("web", &[0; 32]),
            "password binds the proof"
        );
        assert_ne!(p, k1.agent_proof("web2", &[0; 32]));
        assert_ne!(p, k1.agent_proof("web", &[1; 32]));
        assert_ne!(k1.agent_proof_key, k1.gateway_proof_key);
        let t = k1.data_token(1, 2, "web", &[0; 16]);
        assert_ne!(t, k1.data_token(1, 3, "web", &[0; 16]));
        assert_ne!(t, k1.data_token(2, 2, "web", &[0; 16]));
        assert_ne!(t, k1.data_token(1, 2, "web2", &[0; 16]));
    }

    #[test]
    fn ct_eq_works() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}
