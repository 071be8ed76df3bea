//! Interoperability of `dialback_core::ntlm` with an independent NTLM acceptor: pyspnego's
//! pure-Python NTLM server side, driven through `tests/support/ntlm_verify.py`.
//!
//! The acceptor parses our NEGOTIATE_MESSAGE, answers with its own CHALLENGE_MESSAGE (random
//! server challenge, TargetInfo with MsvAvTimestamp), then recomputes the NTLMv2 response from
//! the password in its user file and compares it with the one in our AUTHENTICATE_MESSAGE. It
//! runs with LM_COMPAT_LEVEL=5, so it accepts NTLMv2 only.
//!
//! Needs python3 with pyspnego (`python3 -m pip install pyspnego`; scripts/test.sh installs it).
//! Without them these tests fail, saying so; they never pass silently.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dialback_core::ntlm::{
    authenticate_message, flags, negotiate_message, ntlmv2_temp, ntowfv2, ntproof_str,
    parse_challenge, session_base_key, unix_ms_to_filetime, Challenge, NtlmCredentials,
};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/ntlm_verify.py");
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
const INSTALL_HINT: &str =
    "this test needs python3 with pyspnego as an independent NTLM implementation: \
     run `python3 -m pip install pyspnego` (scripts/test.sh does)";

/// A running `ntlm_verify.py` with its own user file.
struct Acceptor {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    _users: tempfile::NamedTempFile,
}

impl Acceptor {
    /// Starts the acceptor with `users` (lines of `DOMAIN:USER:PASSWORD`) as NTLM_USER_FILE.
    fn start(users: &[&str]) -> Acceptor {
        let mut file = tempfile::NamedTempFile::new().expect("temp user file");
        for u in users {
            writeln!(file, "{u}").expect("write user file");
        }
        file.flush().expect("flush user file");
        let mut child = Command::new("python3")
            .arg(SCRIPT)
            .env("NTLM_USER_FILE", file.path())
            .env("LM_COMPAT_LEVEL", "5")
            .env("PYTHONIOENCODING", "utf-8")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run python3 ({e}); {INSTALL_HINT}"));
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut acc = Acceptor {
            child,
            stdin,
            lines,
            _users: file,
        };
        let ready = acc.read_line("start-up");
        assert!(
            ready.starts_with("READY ") && ready.ends_with(" NTLMProxy"),
            "ntlm_verify.py did not start: {ready:?}; {INSTALL_HINT}"
        );
        acc
    }

    fn read_line(&mut self, what: &str) -> String {
        match self.lines.recv_timeout(REPLY_TIMEOUT) {
            Ok(line) => line,
            Err(e) => {
                let status = self.child.try_wait().ok().flatten();
                panic!(
                    "no reply from ntlm_verify.py to {what} ({e}; exit status {status:?}); \
                     {INSTALL_HINT}"
                )
            }
        }
    }

    /// Sends one message; returns the reply line.
    fn send(&mut self, msg: &[u8], what: &str) -> String {
        writeln!(self.stdin, "{}", b64_encode(msg)).expect("write to ntlm_verify.py");
        self.stdin.flush().expect("flush to ntlm_verify.py");
        self.read_line(what)
    }

    /// NEGOTIATE -> CHALLENGE: returns the raw challenge and our parse of it.
    fn negotiate(&mut self) -> (Vec<u8>, Challenge) {
        let reply = self.send(&negotiate_message(), "NEGOTIATE");
        let b64 = reply
            .strip_prefix("CHALLENGE ")
            .unwrap_or_else(|| panic!("pyspnego refused our NEGOTIATE_MESSAGE: {reply}"));
        let raw = b64_decode(b64);
        let ch = parse_challenge(&raw)
            .unwrap_or_else(|e| panic!("cannot parse pyspnego's challenge {b64}: {e}"));
        (raw, ch)
    }

    /// A whole exchange; returns the verdict line and what we sent.
    fn login(&mut self, creds: &NtlmCredentials, cc: [u8; 8]) -> Exchange {
        let (raw, challenge) = self.negotiate();
        let auth = authenticate_message(creds, &challenge, &raw, &negotiate_message(), cc, now());
        let verdict = self.send(&auth, "AUTHENTICATE");
        Exchange {
            challenge,
            auth,
            verdict,
        }
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Exchange {
    challenge: Challenge,
    auth: Vec<u8>,
    verdict: String,
}

impl Exchange {
    /// Asserts an OK verdict; returns (session key hex, principal).
    fn ok(&self) -> (String, String) {
        let rest = self
            .verdict
            .strip_prefix("OK ")
            .unwrap_or_else(|| panic!("pyspnego rejected our AUTHENTICATE: {}", self.verdict));
        let (key, principal) = rest.split_once(' ').unwrap_or((rest, ""));
        (key.to_owned(), principal.to_owned())
    }

    /// Asserts that pyspnego refused the AUTHENTICATE_MESSAGE (not an earlier step) with a
    /// reason containing `why`.
    fn assert_fail(&self, what: &str, why: &str) {
        assert_refused(&self.verdict, what, why);
    }
}

/// pyspnego's reason when the NTLMv2 response does not match the password it knows.
const BAD_RESPONSE: &str = "Invalid NTLM response";
/// Its reason when no user file line matches DOMAIN and USER.
const NO_SUCH_USER: &str = "matching credential";

/// Asserts a verdict refusing the AUTHENTICATE_MESSAGE (not an earlier step) for `why`.
fn assert_refused(verdict: &str, what: &str, why: &str) {
    assert!(
        verdict.starts_with("FAIL authenticate rejected: ") && verdict.contains(why),
        "{what}: expected a FAIL verdict containing {why:?}, got {verdict:?}"
    );
}

fn now() -> u64 {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    unix_ms_to_filetime(ms)
}

fn creds(domain: &str, user: &str, password: &str) -> NtlmCredentials {
    NtlmCredentials {
        domain: domain.into(),
        user: user.into(),
        password: password.into(),
        workstation: "AGENT-1".into(),
    }
}

fn client_challenge(i: u64) -> [u8; 8] {
    (i.wrapping_add(1))
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .to_le_bytes()
}

/// The session key we expect pyspnego to derive: HMAC_MD5(NTOWFv2, NTProofStr).
fn our_session_key(c: &NtlmCredentials, ch: &Challenge, cc: [u8; 8]) -> String {
    let key = ntowfv2(&c.password, &c.user, &c.domain);
    let time = ch
        .timestamp
        .expect("pyspnego's challenge carries MsvAvTimestamp");
    let temp = ntlmv2_temp(time, &cc, &ch.target_info);
    hex::encode(session_base_key(
        &key,
        &ntproof_str(&key, &ch.server_challenge, &temp),
    ))
}

#[test]
fn right_password_is_accepted() {
    let mut acc = Acceptor::start(&["Domain:User:Password"]);
    let c = creds("Domain", "User", "Password");
    let cc = client_challenge(0);
    let ex = acc.login(&c, cc);
    let (key, principal) = ex.ok();
    assert_eq!(principal, "Domain\\User");
    assert_eq!(
        key,
        our_session_key(&c, &ex.challenge, cc),
        "session key differs"
    );

    // What pyspnego's challenge looked like, and that we answered NTLMv2 (LM = Z(24)).
    let ch = &ex.challenge;
    assert_ne!(ch.flags & flags::NEGOTIATE_UNICODE, 0);
    assert_ne!(ch.flags & flags::NEGOTIATE_TARGET_INFO, 0);
    assert!(!ch.target_info.is_empty() && ch.timestamp.is_some());
    let lm_len = u16::from_le_bytes([ex.auth[12], ex.auth[13]]);
    assert_eq!(lm_len, 24);
    assert_eq!(&ex.auth[64..88], &[0u8; 24][..]);
}

#[test]
fn wrong_password_is_rejected() {
    let mut acc = Acceptor::start(&["Domain:User:Password"]);
    for (i, pw) in ["password", "Password ", "", "Passwort"]
        .into_iter()
        .enumerate()
    {
        acc.login(&creds("Domain", "User", pw), client_challenge(i as u64))
            .assert_fail(&format!("password {pw:?}"), BAD_RESPONSE);
    }
    // The right one still works afterwards on the same acceptor.
    acc.login(&creds("Domain", "User", "Password"), client_challenge(9))
        .ok();
}

#[test]
fn unknown_user_or_wrong_domain_is_rejected() {
    let mut acc = Acceptor::start(&["Domain:User:Password"]);
    acc.login(&creds("Domain", "Someone", "Password"), client_challenge(1))
        .assert_fail("unknown user", NO_SUCH_USER);
    acc.login(&creds("Other", "User", "Password"), client_challenge(2))
        .assert_fail("wrong domain", NO_SUCH_USER);
    acc.login(&creds("", "User", "Password"), client_challenge(3))
        .assert_fail("missing domain", NO_SUCH_USER);
}

#[test]
fn domain_less_user_is_accepted() {
    // Login written `\carol`: empty domain in the message and in NTOWFv2.
    let mut acc = Acceptor::start(&[":carol:pw-two"]);
    let c = creds("", "carol", "pw-two");
    let cc = client_challenge(4);
    let ex = acc.login(&c, cc);
    let (key, principal) = ex.ok();
    assert_eq!(principal, "carol");
    assert_eq!(key, our_session_key(&c, &ex.challenge, cc));
    // Domain field empty.
    assert_eq!(u16::from_le_bytes([ex.auth[28], ex.auth[29]]), 0);
    acc.login(&creds("", "carol", "pw-one"), client_challenge(5))
        .assert_fail("domain-less user, wrong password", BAD_RESPONSE);
}

#[test]
fn non_ascii_credentials_are_accepted() {
    let mut acc = Acceptor::start(&["EXAMPLE:jürgen.müller:Pässwörd-€-\u{1F511}"]);
    let c = creds("EXAMPLE", "jürgen.müller", "Pässwörd-€-\u{1F511}");
    let cc = client_challenge(6);
    let ex = acc.login(&c, cc);
    let (key, principal) = ex.ok();
    assert_eq!(principal, "EXAMPLE\\jürgen.müller");
    assert_eq!(key, our_session_key(&c, &ex.challenge, cc));
    // The user name is case-insensitive (NTOWFv2 uppercases it, ü -> Ü included).
    acc.login(
        &creds("EXAMPLE", "JÜRGEN.MÜLLER", "Pässwörd-€-\u{1F511}"),
        client_challenge(7),
    )
    .ok();
    acc.login(
        &creds("EXAMPLE", "jürgen.müller", "Passwörd-€-\u{1F511}"),
        client_challenge(8),
    )
    .assert_fail("non-ASCII password with one letter changed", BAD_RESPONSE);
}

#[test]
fn tampered_or_replayed_authenticate_is_rejected() {
    let mut acc = Acceptor::start(&["Domain:User:Password"]);
    let c = creds("Domain", "User", "Password");

    // One bit of NTProofStr flipped.
    let (raw, ch) = acc.negotiate();
    let mut auth = authenticate_message(&c, &ch, &raw, &negotiate_message(), [7; 8], now());
    let nt_off = u32::from_le_bytes([auth[24], auth[25], auth[26], auth[27]]) as usize;
    auth[nt_off] ^= 1;
    let verdict = acc.send(&auth, "tampered AUTHENTICATE");
    assert!(
        verdict.starts_with("FAIL "),
        "tampered NTProofStr: {verdict}"
    );

    // A valid AUTHENTICATE, replayed against the next (fresh) challenge.
    let first = acc.login(&c, [8; 8]);
    first.ok();
    let (_raw, second) = acc.negotiate();
    assert_ne!(second.server_challenge, first.challenge.server_challenge);
    let verdict = acc.send(&first.auth, "replayed AUTHENTICATE");
    assert_refused(&verdict, "replay", BAD_RESPONSE);
}

#[test]
fn many_exchanges_with_fresh_client_challenges() {
    let mut acc = Acceptor::start(&["Domain:User:Password", ":carol:pw-two"]);
    for i in 0..16u64 {
        let c = if i % 2 == 0 {
            creds("Domain", "User", "Password")
        } else {
            creds("", "carol", "pw-two")
        };
        let cc = client_challenge(100 + i);
        let ex = acc.login(&c, cc);
        let (key, _) = ex.ok();
        assert_eq!(key, our_session_key(&c, &ex.challenge, cc), "exchange {i}");
    }
}

// ---------------------------------------------------------------------------------------------
// Base64 (RFC 4648, standard alphabet, padded), as in HTTP NTLM headers.
// ---------------------------------------------------------------------------------------------

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn b64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn b64_decode(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.trim_end_matches('=').bytes() {
        let v = B64
            .iter()
            .position(|&x| x == c)
            .unwrap_or_else(|| panic!("bad base64 {s:?}")) as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

#[test]
fn base64_helpers_round_trip() {
    for n in 0..10 {
        let data: Vec<u8> = (0..n as u8).map(|i| i.wrapping_mul(37)).collect();
        assert_eq!(b64_decode(&b64_encode(&data)), data);
    }
    assert_eq!(b64_encode(b"NTLMSSP"), "TlRMTVNTUA==");
}
