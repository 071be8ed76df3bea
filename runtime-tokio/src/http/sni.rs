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
        let names: Vec<&[String]> = self.certs.iter().map(|(n, _)| n.as_slice()).collect();
        let i = choose(&names, hello.server_name())?;
        self.certs.get(i).map(|(_, k)| k.clone())
    }
}

/// The index of the certificate for `sni` among certificates for `names`: an exact name
/// first, then the most specific `*.domain` (one label, as in certificates), then the first.
fn choose(names: &[&[String]], sni: Option<&str>) -> Option<usize> {
    if names.is_empty() {
        return None;
    }
    let Some(sni) = sni.map(str::to_ascii_lowercase) else {
        return Some(0);
    };
    let exact = names.iter().position(|n| n.contains(&sni));
    let wildcard = || {
        names
            .iter()
            .enumerate()
            .flat_map(|(i, n)| n.iter().map(move |n| (i, n)))
            .filter_map(|(i, n)| {
                let suffix = n.strip_prefix("*.")?;
                let under = sni.strip_suffix(suffix)?.strip_suffix('.')?;
                (!under.is_empty() && !under.contains('.')).then_some((i, suffix.len()))
            })
            .max_by_key(|(_, len)| *len)
            .map(|(i, _)| i)
    };
    Some(exact.or_else(wildcard).unwrap_or(0))
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

#[cfg(test)]
mod tests {
    use super::choose;

    #[test]
    fn exact_then_most_specific_wildcard_then_the_first() {
        let owned: Vec<Vec<String>> = [
            vec![],
            vec!["one.test"],
            vec!["*.example.com"],
            vec!["*.apps.example.com", "two.test"],
        ]
        .iter()
        .map(|v| v.iter().map(|s| s.to_string()).collect())
        .collect();
        let names: Vec<&[String]> = owned.iter().map(Vec::as_slice).collect();
        assert_eq!(choose(&names, Some("ONE.test")), Some(1));
        assert_eq!(choose(&names, Some("two.test")), Some(3));
        assert_eq!(choose(&names, Some("a.example.com")), Some(2));
        assert_eq!(choose(&names, Some("x.apps.example.com")), Some(3));
        // One label only, as in certificates.
        assert_eq!(choose(&names, Some("a.b.example.com")), Some(0));
        assert_eq!(choose(&names, Some("example.com")), Some(0));
        assert_eq!(choose(&names, None), Some(0));
        assert_eq!(choose(&[], Some("one.test")), None);
    }
}
