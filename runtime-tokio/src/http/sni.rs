//! The HTTPS port's certificates, chosen by the name the client asks for (SNI).

use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::config_error;
use crate::gateway::GatewayError;
use crate::settings::HttpCert;
use crate::tls;

/// Certificates chosen by SNI: an exact name first, then the most specific `*.domain`, then
/// the first certificate.
#[derive(Debug)]
struct SniResolver {
    certs: Vec<(Vec<String>, Arc<CertifiedKey>)>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name().map(str::to_ascii_lowercase);
        let chosen = name.as_deref().and_then(|name| {
            let exact = self
                .certs
                .iter()
                .find(|(names, _)| names.iter().any(|n| n == name));
            exact
                .or_else(|| {
                    self.certs
                        .iter()
                        .flat_map(|c| c.0.iter().map(move |n| (c, n)))
                        .filter_map(|(c, n)| {
                            let suffix = n.strip_prefix("*.")?;
                            let under = name.strip_suffix(suffix)?.strip_suffix('.')?;
                            // A wildcard covers one label, as in certificates.
                            (!under.is_empty() && !under.contains('.')).then_some((c, suffix.len()))
                        })
                        .max_by_key(|(_, len)| *len)
                        .map(|(c, _)| c)
                })
                .map(|(_, k)| k.clone())
        });
        chosen.or_else(|| self.certs.first().map(|(_, k)| k.clone()))
    }
}

pub(super) fn server_config(certs: &[HttpCert]) -> Result<Arc<rustls::ServerConfig>, GatewayError> {
    if certs.is_empty() {
        return Err(config_error(
            "[http] tls_listen needs a certificate: set cert and key, or [[http.certs]]",
        ));
    }
    let provider = tls::provider();
    let mut loaded = Vec::new();
    for c in certs {
        let id = tls::load_pair(&c.cert, &c.key)?;
        let key = CertifiedKey::from_der(id.certs, id.key, &provider).map_err(|e| {
            config_error(format!(
                "certificate {} with key {}: {e}",
                c.cert.display(),
                c.key.display()
            ))
        })?;
        let names = c.names.iter().map(|n| n.to_ascii_lowercase()).collect();
        loaded.push((names, Arc::new(key)));
    }
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(config_error)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver { certs: loaded }));
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
