//! TLS for the control channel: the gateway's identity, the agent's trust decision, and the
//! channel-binding exporter.
//!
//! Everything here uses the `ring` crypto provider explicitly. A process-wide default provider
//! is never consulted, so linking another crate that installs one (or two crates that disagree)
//! can neither change our cipher suites nor make `builder()` panic at runtime.
//!
//! Both configurations speak TLS 1.3 only. The control channel's mutual password proof is bound
//! to an RFC 8446 exporter (see [`export_control_key`]); TLS 1.3 exporters are always bound to
//! the full handshake, which TLS 1.2 exporters without extended master secret are not.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::{
    CertificateError, ConnectionCommon, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};

use crate::settings::{GatewayTrust, IdentitySource};

/// ALPN protocol id of the control and data channels. Offering it on both sides means a
/// dialback agent that reaches some other TLS service (or a gateway that is reached by a
/// browser) fails the handshake instead of exchanging garbage.
pub const ALPN: &[u8] = b"dialback/1";

/// Label of the TLS exporter the control channel's password proof and session keys are bound
/// to. Versioned so that a future protocol revision derives unrelated keys.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-dialback-v1-control";

/// File name of the generated (or operator-placed) certificate inside `state_dir`.
const STATE_CERT: &str = "gateway.crt";
/// File name of the generated private key inside `state_dir`.
const STATE_KEY: &str = "gateway.key";
/// Validity of a generated certificate. Agents pin its fingerprint, so a short lifetime would
/// only force operators to re-pin; pinning, not expiry, is what makes it trustworthy.
const GENERATED_VALIDITY: Duration = Duration::from_secs(3653 * 24 * 60 * 60);
/// Backdating of a generated certificate, so peers with a slightly slow clock accept it.
const GENERATED_BACKDATE: Duration = Duration::from_secs(24 * 60 * 60);

/// Everything that can go wrong while loading identities and building TLS configurations.
///
/// Messages name the file involved and, where there is one, the way out, because they end up
/// in front of an operator at start-up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read (missing, permissions, ...).
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A file is not valid PEM.
    #[error("cannot parse {what} {} as PEM: {source}", path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    /// A certificate file holds no `CERTIFICATE` section.
    #[error("{} holds no certificates", path.display())]
    NoCertificates { path: PathBuf },
    /// A key file holds no PKCS#8, PKCS#1 or SEC1 private key.
    #[error("{} holds no private key", path.display())]
    NoPrivateKey { path: PathBuf },
    /// The key cannot be used by the crypto provider, or does not belong to the certificate.
    #[error("key {} does not fit certificate {}: {reason}", key.display(), cert.display())]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: rustls::Error,
    },
    /// Only one of `cert` and `key` was configured.
    #[error("cert and key must be given together (only {given} is set)")]
    CertKeyPair { given: &'static str },
    /// The state directory holds half an identity; guessing would risk replacing a pinned one.
    #[error(
        "{} exists but {} does not; restore it, or remove both to generate a new identity \
         (agents that pinned the old fingerprint must then be updated)",
        present.display(), missing.display()
    )]
    IncompleteState { present: PathBuf, missing: PathBuf },
    /// rcgen refused to generate the self-signed certificate.
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// The operating system provided no randomness for the certificate serial.
    #[error("cannot get randomness from the operating system: {0}")]
    Randomness(#[source] getrandom::Error),
    /// The state directory could not be created.
    #[error("cannot create state directory {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A generated file could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A pinned fingerprint is malformed.
    #[error("fingerprint must look like sha256:<64 hex digits> (colons between byte pairs allowed), got {input:?}")]
    BadFingerprint { input: String },
    /// The CA file parsed but holds no certificates at all.
    #[error("ca_file {} holds no certificates", path.display())]
    NoCaCertificates { path: PathBuf },
    /// The CA file holds certificates, but none is usable as a trust anchor.
    #[error("ca_file {} holds no usable CA certificate ({ignored} rejected)", path.display())]
    UnusableCaCertificates { path: PathBuf, ignored: usize },
    /// The operating system's root store yielded nothing.
    #[error("no usable system root certificates{detail}; set ca_file or a fingerprint instead")]
    NoSystemRoots { detail: String },
    /// The name to verify is neither a DNS name nor an IP address.
    #[error("invalid server name {name:?}: {reason}")]
    ServerName { name: String, reason: String },
    /// rustls rejected a configuration (should not happen with the fixed choices made here).
    #[error("cannot build TLS configuration: {0}")]
    Config(#[source] rustls::Error),
    /// The exporter could not be computed, e.g. the handshake is not complete.
    #[error("cannot export the control channel key: {0}")]
    Exporter(#[source] rustls::Error),
}

/// The gateway's certificate chain (end-entity first) and its private key.
pub struct GatewayIdentity {
    pub certs: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl GatewayIdentity {
    /// SHA-256 over the DER of the end-entity certificate: what agents pin, and what
    /// `dialback fingerprint` prints. An identity always has at least one certificate
    /// ([`load_identity`] refuses empty files); an empty chain yields the hash of nothing.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.certs
            .first()
            .map(|c| sha256(c.as_ref()))
            .unwrap_or_else(|| sha256(&[]))
    }
}

impl Clone for GatewayIdentity {
    fn clone(&self) -> Self {
        GatewayIdentity {
            certs: self.certs.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// Never prints the key.
impl fmt::Debug for GatewayIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewayIdentity")
            .field("fingerprint", &format_fingerprint(&self.fingerprint()))
            .field("chain_len", &self.certs.len())
            .finish_non_exhaustive()
    }
}

/// Where [`load_identity`] found the identity, so the caller can log something useful (and
/// print the fingerprint loudly when it was just generated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityOrigin {
    /// The operator's `cert` and `key` files.
    Files,
    /// Reused from the state directory; the path is the certificate file there.
    StateDir(PathBuf),
    /// Generated just now into the state directory; the path is the new certificate file.
    Generated(PathBuf),
}

/// Loads the gateway's identity: the operator's `cert`/`key` if given, otherwise the state
/// directory's `gateway.crt`/`gateway.key`, generating a self-signed pair there on first start.
///
/// Generation is deliberate about persistence: the fingerprint agents pin must survive
/// restarts, so the key is written once (mode 0600, atomically, so a crash never leaves a
/// truncated key behind) and reused afterwards.
pub fn load_identity(src: &IdentitySource) -> Result<(GatewayIdentity, IdentityOrigin), TlsError> {
    match (&src.cert, &src.key) {
        (Some(cert), Some(key)) => Ok((load_pair(cert, key)?, IdentityOrigin::Files)),
        (Some(_), None) => Err(TlsError::CertKeyPair { given: "cert" }),
        (None, Some(_)) => Err(TlsError::CertKeyPair { given: "key" }),
        (None, None) => {
            let cert = src.state_dir.join(STATE_CERT);
            let key = src.state_dir.join(STATE_KEY);
            match (exists(&cert)?, exists(&key)?) {
                (true, true) => Ok((load_pair(&cert, &key)?, IdentityOrigin::StateDir(cert))),
                (true, false) => Err(TlsError::IncompleteState {
                    present: cert,
                    missing: key,
                }),
                // The key is renamed into place before the certificate, so a key without a
                // certificate is an interrupted generation whose fingerprint nobody has seen:
                // generating afresh is safe.
                (false, _) => {
                    let id = generate_into(&src.state_dir, &cert, &key)?;
                    Ok((id, IdentityOrigin::Generated(cert)))
                }
            }
        }
    }
}

/// `"sha256:"` followed by 64 lowercase hex digits: the one form we print.
pub fn format_fingerprint(fp: &[u8; 32]) -> String {
    format!("sha256:{}", hex::encode(fp))
}

/// Parses a pinned fingerprint as operators paste it: our own `sha256:<hex>`, or openssl's
/// colon-separated upper-case pairs (`openssl x509 -fingerprint -sha256`), with or without
/// the `sha256:` prefix (any case), surrounding whitespace ignored.
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], TlsError> {
    let bad = || TlsError::BadFingerprint {
        input: s.to_owned(),
    };
    let t = s.trim();
    let body = match t.get(..7) {
        Some(p) if p.eq_ignore_ascii_case("sha256:") => &t[7..],
        _ => t,
    };
    let digits: String = if body.contains(':') {
        let pairs: Vec<&str> = body.split(':').collect();
        if pairs.len() != 32 || pairs.iter().any(|p| p.len() != 2) {
            return Err(bad());
        }
        pairs.concat()
    } else {
        body.to_owned()
    };
    if digits.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(&digits, &mut out).map_err(|_| bad())?;
    Ok(out)
}

/// The gateway's server configuration: TLS 1.3 only, ALPN [`ALPN`], no client certificates
/// (agents authenticate per service with the password proof over the exporter).
pub fn server_config(id: &GatewayIdentity) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_single_cert(id.certs.clone(), id.key.clone_key())
        .map_err(TlsError::Config)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(cfg))
}

/// The agent's client configuration: TLS 1.3 only, ALPN [`ALPN`], server verification as
/// chosen by `trust`.
///
/// With [`GatewayTrust::Fingerprint`] the end-entity certificate must hash to the pin; name and
/// validity dates are ignored, because the pin already names exactly one certificate (and a
/// generated certificate's name is not the gateway's address). Handshake signatures are still
/// verified in every mode, including [`GatewayTrust::Insecure`], so the peer at least has to
/// hold the key of the certificate it shows.
pub fn client_config(trust: &GatewayTrust) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = provider();
    let algs = provider.signature_verification_algorithms;
    let verifier: Arc<dyn ServerCertVerifier> = match trust {
        GatewayTrust::Fingerprint(pin) => Arc::new(LeafVerifier {
            pin: Some(*pin),
            algs,
        }),
        GatewayTrust::Insecure => {
            tracing::warn!(
                "gateway certificate verification is DISABLED (insecure = true): \
                 anyone on the path can impersonate the gateway"
            );
            Arc::new(LeafVerifier { pin: None, algs })
        }
        GatewayTrust::CaFile(path) => webpki_verifier(load_ca_file(path)?, &provider)?,
        GatewayTrust::System => webpki_verifier(load_system_roots()?, &provider)?,
    };
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(cfg))
}

/// Turns a host (from `host:port` or `server_name`) into the name rustls verifies and sends as
/// SNI. IP addresses (IPv6 with or without brackets) become IP names, anything else must be a
/// valid DNS name.
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    let trimmed = host.trim();
    let unbracketed = trimmed
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(trimmed);
    ServerName::try_from(unbracketed.to_owned()).map_err(|e| TlsError::ServerName {
        name: host.to_owned(),
        reason: e.to_string(),
    })
}

/// 32 bytes from the TLS exporter with [`EXPORTER_LABEL`] and no context. Client and server of
/// one connection get the same value, and no other connection does, so a password proof bound
/// to it cannot be relayed by a man in the middle. Fails before the handshake is complete.
///
/// Works for both sides: pass `&ClientConnection` or `&ServerConnection` (they deref to
/// `ConnectionCommon`), e.g. `export_control_key(stream.get_ref().1)` on a tokio-rustls stream.
pub fn export_control_key<C>(conn: &ConnectionCommon<C>) -> Result<[u8; 32], TlsError> {
    conn.export_keying_material([0u8; 32], EXPORTER_LABEL, None)
        .map_err(TlsError::Exporter)
}

/// Same as [`export_control_key`], under the name the session code uses for it.
pub fn export_keying_material<C>(conn: &ConnectionCommon<C>) -> Result<[u8; 32], TlsError> {
    export_control_key(conn)
}

/// The ring provider, explicitly: see the module documentation.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Compares without an early exit, so timing does not reveal how much of a guess matched.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

fn exists(path: &Path) -> Result<bool, TlsError> {
    path.try_exists().map_err(|source| TlsError::Read {
        what: "state file",
        path: path.to_owned(),
        source,
    })
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(what, path)?;
    CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            what,
            path: path.to_owned(),
            source,
        })
}

/// Loads a PEM chain and key and checks that they belong together, so a mismatch is reported
/// at start-up with both file names rather than as a failed handshake later.
pub(crate) fn load_pair(cert: &Path, key: &Path) -> Result<GatewayIdentity, TlsError> {
    let certs = read_certs("certificate", cert)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificates {
            path: cert.to_owned(),
        });
    }
    let key_pem = read_file("private key", key)?;
    let key_der = match PrivateKeyDer::from_pem_slice(&key_pem) {
        Ok(k) => k,
        Err(pem::Error::NoItemsFound) => {
            return Err(TlsError::NoPrivateKey {
                path: key.to_owned(),
            })
        }
        Err(source) => {
            return Err(TlsError::Pem {
                what: "private key",
                path: key.to_owned(),
                source,
            })
        }
    };
    warn_if_key_readable_by_others(key);
    rustls::sign::CertifiedKey::from_der(certs.clone(), key_der.clone_key(), &provider()).map_err(
        |reason| TlsError::KeyMismatch {
            cert: cert.to_owned(),
            key: key.to_owned(),
            reason,
        },
    )?;
    Ok(GatewayIdentity {
        certs,
        key: key_der,
    })
}

#[cfg(unix)]
fn warn_if_key_readable_by_others(key: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = fs::metadata(key) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                "private key {} has mode {:o}; it should be readable by its owner only (chmod 600)",
                key.display(),
                mode
            );
        }
    }
}

#[cfg(not(unix))]
fn warn_if_key_readable_by_others(_key: &Path) {}

/// Generates an ECDSA P-256 self-signed certificate and writes it (key first) into `dir`.
fn generate_into(
    dir: &Path,
    cert_path: &Path,
    key_path: &Path,
) -> Result<GatewayIdentity, TlsError> {
    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params =
        rcgen::CertificateParams::new(vec!["dialback-gateway".to_owned(), "localhost".to_owned()])?;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, "dialback gateway");
    params.distinguished_name = dn;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let not_before = rcgen::date_time_ymd(1970, 1, 1) + now.saturating_sub(GENERATED_BACKDATE);
    params.not_before = not_before;
    params.not_after = not_before + GENERATED_BACKDATE + GENERATED_VALIDITY;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&random_serial()?));
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.self_signed(&key_pair)?;

    create_state_dir(dir)?;
    write_atomic(key_path, key_pair.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(cert_path, cert.pem().as_bytes(), 0o644)?;
    sync_dir(dir);

    Ok(GatewayIdentity {
        certs: vec![cert.der().clone()],
        key: PrivateKeyDer::from(key_pair),
    })
}

/// 16 random bytes: positive as a DER INTEGER (top bit clear) and without a leading zero
/// byte (second-highest bit set), so it encodes to exactly 16 bytes.
fn random_serial() -> Result<[u8; 16], TlsError> {
    let mut serial = [0u8; 16];
    getrandom::fill(&mut serial).map_err(TlsError::Randomness)?;
    serial[0] = (serial[0] & 0x7f) | 0x40;
    Ok(serial)
}

/// Creates the state directory readable by its owner only: it holds the gateway's key.
fn create_state_dir(dir: &Path) -> Result<(), TlsError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|source| TlsError::CreateDir {
        path: dir.to_owned(),
        source,
    })
}

/// Writes `data` to a fresh temporary file next to `path` (created with `mode`, so the key is
/// never readable by others, not even briefly), syncs it and renames it over `path`.
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    let err = |source| TlsError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut tag = [0u8; 8];
    getrandom::fill(&mut tag).map_err(|e| err(io::Error::other(e.to_string())))?;
    let tmp = dir.join(format!(".{name}.tmp-{}", hex::encode(tag)));

    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let result = opts.open(&tmp).and_then(|mut f| {
        f.write_all(data)?;
        f.sync_all()
    });
    let result = result.and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok(())
}

/// Makes the renames durable. Best effort: not every platform can open a directory.
fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

fn load_ca_file(path: &Path) -> Result<RootCertStore, TlsError> {
    let certs = read_certs("ca_file", path)?;
    if certs.is_empty() {
        return Err(TlsError::NoCaCertificates {
            path: path.to_owned(),
        });
    }
    let mut roots = RootCertStore::empty();
    let (_added, ignored) = roots.add_parsable_certificates(certs);
    if roots.is_empty() {
        return Err(TlsError::UnusableCaCertificates {
            path: path.to_owned(),
            ignored,
        });
    }
    Ok(roots)
}

fn load_system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::debug!("while loading system root certificates: {e}");
    }
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let detail = match found.errors.first() {
            Some(e) => format!(" ({e})"),
            None => String::new(),
        };
        return Err(TlsError::NoSystemRoots { detail });
    }
    Ok(roots)
}

fn webpki_verifier(
    roots: RootCertStore,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ServerCertVerifier>, TlsError> {
    let v = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))?;
    Ok(v)
}

/// Verifies the end-entity certificate by its SHA-256 only (`pin: Some`), or not at all
/// (`pin: None`, insecure mode). Handshake signatures are always checked.
#[derive(Debug)]
struct LeafVerifier {
    pin: Option<[u8; 32]>,
    algs: WebPkiSupportedAlgorithms,
}

/// The reason a pinned handshake failed; its `Debug` is the sentence, because rustls prints
/// `CertificateError::Other` through `Debug`.
struct PinMismatch {
    expected: [u8; 32],
    presented: [u8; 32],
}

impl fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "gateway certificate fingerprint is {} but {} is pinned",
            format_fingerprint(&self.presented),
            format_fingerprint(&self.expected)
        )
    }
}

impl fmt::Debug for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for PinMismatch {}

impl ServerCertVerifier for LeafVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(expected) = self.pin else {
            return Ok(ServerCertVerified::assertion());
        };
        let presented = sha256(end_entity.as_ref());
        if ct_eq(&expected, &presented) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(PinMismatch {
                    expected,
                    presented,
                })),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    fn state_source(dir: &Path) -> IdentitySource {
        IdentitySource {
            cert: None,
            key: None,
            state_dir: dir.to_owned(),
        }
    }

    fn generated(dir: &Path) -> GatewayIdentity {
        load_identity(&state_source(dir))
            .expect("generate identity")
            .0
    }

    type Client = tokio_rustls::client::TlsStream<tokio::io::DuplexStream>;
    type Server = tokio_rustls::server::TlsStream<tokio::io::DuplexStream>;

    /// Runs one handshake over an in-memory pipe and returns both sides' outcomes.
    async fn handshake(
        id: &GatewayIdentity,
        trust: &GatewayTrust,
        name: &str,
    ) -> (io::Result<Client>, io::Result<Server>) {
        let acceptor = TlsAcceptor::from(server_config(id).expect("server config"));
        let connector = TlsConnector::from(client_config(trust).expect("client config"));
        let name = server_name(name).expect("server name");
        let (c, s) = tokio::io::duplex(64 * 1024);
        let both = async { tokio::join!(connector.connect(name, c), acceptor.accept(s)) };
        tokio::time::timeout(Duration::from_secs(10), both)
            .await
            .expect("handshake hung")
    }

    #[test]
    fn generated_identity_is_reused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("nested").join("state");
        let (first, origin) = load_identity(&state_source(&dir)).expect("first load");
        let cert = dir.join("gateway.crt");
        let key = dir.join("gateway.key");
        assert_eq!(origin, IdentityOrigin::Generated(cert.clone()));
        assert!(cert.is_file() && key.is_file());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| fs::metadata(p).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode(&key), 0o600);
            assert_eq!(mode(&dir), 0o700);
        }
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(&dir).expect("read_dir").count(), 2);

        let (second, origin) = load_identity(&state_source(&dir)).expect("second load");
        assert_eq!(origin, IdentityOrigin::StateDir(cert.clone()));
        assert_eq!(first.fingerprint(), second.fingerprint());
        assert_eq!(first.certs, second.certs);
        assert_ne!(first.fingerprint(), [0u8; 32]);

        // A fresh directory gets a different identity.
        let other = generated(&tmp.path().join("other"));
        assert_ne!(other.fingerprint(), first.fingerprint());

        // A certificate without its key is not silently replaced.
        fs::remove_file(&key).expect("rm key");
        let err = load_identity(&state_source(&dir)).expect_err("half state");
        assert!(err.to_string().contains("gateway.key"), "{err}");
        // A key without a certificate is an interrupted generation: start over.
        let dir2 = tmp.path().join("half");
        fs::create_dir(&dir2).expect("mkdir");
        fs::write(dir2.join("gateway.key"), "junk").expect("write");
        let (_, origin) = load_identity(&state_source(&dir2)).expect("regenerate");
        assert!(matches!(origin, IdentityOrigin::Generated(_)));
    }

    #[tokio::test]
    async fn pinned_handshake_and_exporters_match() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let id = generated(tmp.path());
        let trust = GatewayTrust::Fingerprint(id.fingerprint());
        // The name is irrelevant when pinning: an address is what agents usually have.
        let (client, server) = handshake(&id, &trust, "192.0.2.7").await;
        let mut client = client.expect("client handshake");
        let mut server = server.expect("server handshake");

        let (_, cc) = client.get_ref();
        let (_, sc) = server.get_ref();
        assert_eq!(cc.alpn_protocol(), Some(ALPN));
        assert_eq!(sc.alpn_protocol(), Some(ALPN));
        assert_eq!(
            cc.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        let ck = export_control_key(cc).expect("client exporter");
        let sk = export_control_key(sc).expect("server exporter");
        assert_eq!(ck, sk);
        assert_ne!(ck, [0u8; 32]);

        // Another connection gets another key.
        let (client2, server2) = handshake(&id, &trust, "localhost").await;
        let client2 = client2.expect("client handshake 2");
        server2.expect("server handshake 2");
        assert_ne!(
            export_control_key(client2.get_ref().1).expect("exporter"),
            ck
        );

        client.write_all(b"ping").await.expect("write");
        client.flush().await.expect("flush");
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"ping");
    }

    #[tokio::test]
    async fn wrong_pin_fails_naming_both_fingerprints() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let id = generated(tmp.path());
        let pin = [0xabu8; 32];
        let (client, server) = handshake(&id, &GatewayTrust::Fingerprint(pin), "localhost").await;
        let err = client.expect_err("must fail").to_string();
        assert!(err.contains("sha256:"), "{err}");
        assert!(err.contains(&format_fingerprint(&pin)), "{err}");
        assert!(
            err.contains(&format_fingerprint(&id.fingerprint())),
            "{err}"
        );
        assert!(server.is_err());
    }

    #[tokio::test]
    async fn ca_trust_checks_chain_and_name() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("ca");

        let leaf_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let leaf_params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        let leaf = leaf_params.signed_by(&leaf_key, &ca).expect("leaf");

        let cert_path = tmp.path().join("gw.crt");
        let key_path = tmp.path().join("gw.key");
        let ca_path = tmp.path().join("ca.pem");
        fs::write(&cert_path, leaf.pem()).expect("write cert");
        fs::write(&key_path, leaf_key.serialize_pem()).expect("write key");
        fs::write(&ca_path, ca.pem()).expect("write ca");

        let src = IdentitySource {
            cert: Some(cert_path),
            key: Some(key_path),
            state_dir: tmp.path().join("unused"),
        };
        let (id, origin) = load_identity(&src).expect("load files");
        assert_eq!(origin, IdentityOrigin::Files);
        assert!(!tmp.path().join("unused").exists());

        let trust = GatewayTrust::CaFile(ca_path);
        let (client, server) = handshake(&id, &trust, "localhost").await;
        let client = client.expect("CA-verified handshake");
        server.expect("server side");
        let ck = export_control_key(client.get_ref().1).expect("exporter");
        assert_ne!(ck, [0u8; 32]);

        let (client, _server) = handshake(&id, &trust, "gateway.example.com").await;
        let err = client.expect_err("wrong name must fail").to_string();
        assert!(err.to_lowercase().contains("name"), "{err}");

        // A self-signed gateway is not trusted through an unrelated CA.
        let other = generated(&tmp.path().join("state"));
        let (client, _server) = handshake(&other, &trust, "localhost").await;
        assert!(client.is_err());
    }

    #[tokio::test]
    async fn insecure_accepts_any_certificate() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let id = generated(tmp.path());
        let (client, server) =
            handshake(&id, &GatewayTrust::Insecure, "not-the-name.invalid").await;
        let client = client.expect("insecure handshake");
        let server = server.expect("server side");
        assert_eq!(
            export_control_key(client.get_ref().1).expect("client"),
            export_control_key(server.get_ref().1).expect("server")
        );
    }

    #[tokio::test]
    async fn loopback_tcp_handshake() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let id = generated(tmp.path());
        let acceptor = TlsAcceptor::from(server_config(&id).expect("server config"));
        let connector = TlsConnector::from(
            client_config(&GatewayTrust::Fingerprint(id.fingerprint())).expect("client config"),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let tls = acceptor.accept(tcp).await.expect("server handshake");
            export_control_key(tls.get_ref().1).expect("server exporter")
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let tls = connector
            .connect(server_name("127.0.0.1").expect("name"), tcp)
            .await
            .expect("client handshake");
        let ck = export_control_key(tls.get_ref().1).expect("client exporter");
        assert_eq!(ck, server.await.expect("join"));
    }

    #[test]
    fn exporter_fails_before_handshake() {
        let cfg = client_config(&GatewayTrust::Insecure).expect("config");
        let conn = rustls::ClientConnection::new(cfg, server_name("localhost").expect("name"))
            .expect("conn");
        assert!(matches!(
            export_control_key(&conn),
            Err(TlsError::Exporter(_))
        ));
    }

    #[test]
    fn fingerprint_forms() {
        let fp: [u8; 32] = core::array::from_fn(|i| (i * 7 + 0xa0) as u8);
        let lower = format_fingerprint(&fp);
        assert!(lower.starts_with("sha256:"));
        assert_eq!(lower.len(), 7 + 64);
        assert_eq!(lower, lower.to_lowercase());
        assert_eq!(parse_fingerprint(&lower).expect("own form"), fp);

        let hexs = hex::encode_upper(fp);
        let upper = format!("SHA256:{hexs}");
        assert_eq!(parse_fingerprint(&upper).expect("upper"), fp);
        let pairs: Vec<String> = fp.iter().map(|b| format!("{b:02X}")).collect();
        let openssl = format!("sha256:{}", pairs.join(":"));
        assert_eq!(parse_fingerprint(&openssl).expect("openssl"), fp);
        assert_eq!(parse_fingerprint(&pairs.join(":")).expect("bare pairs"), fp);
        assert_eq!(parse_fingerprint(&hexs).expect("bare hex"), fp);
        assert_eq!(
            parse_fingerprint(&format!("  {lower}\n")).expect("spaces"),
            fp
        );

        let bad = [
            "",
            "sha256:",
            "sha256:abcd",
            &lower[..lower.len() - 1],
            &format!("{lower}0"),
            &format!("sha256:{}", "zz".repeat(32)),
            &format!("md5:{}", hex::encode(fp)),
            &format!("sha256:{}:", pairs.join(":")),
            &format!("sha256:{}", pairs.join("::")),
            &format!("sha256:{}", hex::encode(fp).replace("a", "-")),
            "sha256 ab",
            "garbage",
        ];
        for s in bad {
            let err = parse_fingerprint(s).expect_err(s);
            assert!(err.to_string().contains("sha256:<64 hex digits>"), "{err}");
        }
    }

    #[test]
    fn file_errors_name_the_path() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let missing = tmp.path().join("nope").join("gw.crt");
        let key = tmp.path().join("gw.key");
        let src = IdentitySource {
            cert: Some(missing.clone()),
            key: Some(key.clone()),
            state_dir: tmp.path().to_owned(),
        };
        let err = load_identity(&src).expect_err("missing cert").to_string();
        assert!(err.contains(&missing.display().to_string()), "{err}");
        assert!(err.starts_with("cannot read certificate"), "{err}");

        let only_cert = IdentitySource {
            key: None,
            ..src.clone()
        };
        let err = load_identity(&only_cert).expect_err("cert without key");
        assert!(matches!(err, TlsError::CertKeyPair { given: "cert" }));
        assert!(err.to_string().contains("together"));
        let only_key = IdentitySource {
            cert: None,
            ..src.clone()
        };
        assert!(load_identity(&only_key).is_err());

        // A certificate file with a certificate but a key file without a key.
        let state = tmp.path().join("state");
        let id = generated(&state);
        let cert = state.join("gateway.crt");
        fs::write(&key, "not a key\n").expect("write");
        let src = IdentitySource {
            cert: Some(cert.clone()),
            key: Some(key.clone()),
            state_dir: state.clone(),
        };
        let err = load_identity(&src).expect_err("no key").to_string();
        assert_eq!(err, format!("{} holds no private key", key.display()));

        // A certificate file without certificates.
        let empty = tmp.path().join("empty.pem");
        fs::write(&empty, "").expect("write");
        let src2 = IdentitySource {
            cert: Some(empty.clone()),
            ..src.clone()
        };
        let err = load_identity(&src2).expect_err("no certs").to_string();
        assert_eq!(err, format!("{} holds no certificates", empty.display()));

        // A key that belongs to another certificate.
        let other = generated(&tmp.path().join("other"));
        assert_ne!(other.fingerprint(), id.fingerprint());
        let src3 = IdentitySource {
            key: Some(tmp.path().join("other").join("gateway.key")),
            ..src.clone()
        };
        let err = load_identity(&src3).expect_err("mismatch").to_string();
        assert!(err.contains("does not fit certificate"), "{err}");

        // CA files.
        let err = client_config(&GatewayTrust::CaFile(empty.clone()))
            .expect_err("empty ca")
            .to_string();
        assert_eq!(
            err,
            format!("ca_file {} holds no certificates", empty.display())
        );
        let err = client_config(&GatewayTrust::CaFile(missing.clone()))
            .expect_err("missing ca")
            .to_string();
        assert!(err.contains(&missing.display().to_string()), "{err}");
    }

    #[test]
    fn server_names() {
        assert!(matches!(
            server_name("127.0.0.1"),
            Ok(ServerName::IpAddress(_))
        ));
        assert!(matches!(server_name("[::1]"), Ok(ServerName::IpAddress(_))));
        assert!(matches!(server_name("::1"), Ok(ServerName::IpAddress(_))));
        assert!(matches!(
            server_name("gw.example.com"),
            Ok(ServerName::DnsName(_))
        ));
        assert!(server_name("").is_err());
        assert!(server_name("bad name!").is_err());
    }

    #[test]
    fn identity_clone_and_debug() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let id = generated(tmp.path());
        let copy = id.clone();
        assert_eq!(copy.fingerprint(), id.fingerprint());
        assert_eq!(copy.key.secret_der(), id.key.secret_der());
        let dbg = format!("{id:?}");
        assert!(
            dbg.contains(&format_fingerprint(&id.fingerprint())),
            "{dbg}"
        );
        server_config(&copy).expect("clone is usable");
    }
}
