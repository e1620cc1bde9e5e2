//! TLS configuration (rustls with the ring provider) for every listener and
//! for the agent's connection to the server: loading PEM files, client
//! certificate verification, and the operator's version and cipher policy.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedProtocolVersion};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsFlags;
use crate::error::{Error, Result};

/// ALPN for gRPC.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN for the HTTP-CONNECT frontend.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

pub fn load_certs(path: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| Error::config(format!("read certificates from {path}")).because(e))?;
    if certs.is_empty() {
        return Err(Error::config(format!("{path} holds no PEM certificate")));
    }
    Ok(certs)
}

pub fn load_key(path: &str) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| Error::config(format!("read private key from {path}")).because(e))
}

fn load_roots(path: &str) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| Error::config(format!("CA certificate in {path} is unusable")).because(e))?;
    }
    Ok(Arc::new(roots))
}

/// The crypto provider and protocol versions the operator allowed.
fn policy(flags: &TlsFlags) -> Result<(Arc<CryptoProvider>, Vec<&'static SupportedProtocolVersion>)> {
    let mut provider = rustls::crypto::ring::default_provider();
    if !flags.cipher_suites.is_empty() {
        let wanted: Vec<String> = flags.cipher_suites.iter().map(|s| s.trim().to_owned()).collect();
        for name in &wanted {
            let known = provider.cipher_suites.iter().any(|s| format!("{:?}", s.suite()) == *name);
            if !known {
                return Err(Error::config(format!(
                    "--cipher-suites: {name} is not a supported suite (supported TLS 1.2 suites: {})",
                    provider
                        .cipher_suites
                        .iter()
                        .filter(|s| s.version() == &rustls::version::TLS12)
                        .map(|s| format!("{:?}", s.suite()))
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        // Go's flag selects TLS 1.2 suites only; TLS 1.3 suites stay on.
        provider
            .cipher_suites
            .retain(|s| s.version() == &rustls::version::TLS13 || wanted.contains(&format!("{:?}", s.suite())));
    }
    let versions: Vec<&'static SupportedProtocolVersion> = match flags.tls_min_version.as_str() {
        "" | "VersionTLS10" | "VersionTLS11" | "VersionTLS12" => {
            vec![&rustls::version::TLS13, &rustls::version::TLS12]
        }
        "VersionTLS13" => vec![&rustls::version::TLS13],
        other => {
            return Err(Error::config(format!("--tls-min-version={other}: expected VersionTLS12 or VersionTLS13")));
        }
    };
    if matches!(flags.tls_min_version.as_str(), "VersionTLS10" | "VersionTLS11") {
        tracing::warn!(version = %flags.tls_min_version, "TLS below 1.2 is not supported; using TLS 1.2 as the minimum");
    }
    Ok((Arc::new(provider), versions))
}

/// A listener's config; with `client_ca`, clients must present a certificate it signed.
pub fn server_config(
    cert: &str,
    key: &str,
    client_ca: Option<&str>,
    alpn: &[&[u8]],
    flags: &TlsFlags,
) -> Result<Arc<ServerConfig>> {
    let (provider, versions) = policy(flags)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| Error::config("TLS policy").because(e))?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(load_roots(ca)?, provider)
                .build()
                .map_err(|e| Error::config(format!("client CA {ca}")).because(e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| Error::config(format!("certificate {cert} with key {key}")).because(e))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The agent's config: the server must be signed by `ca`; `identity` is the optional client pair.
pub fn client_config(
    ca: &str,
    identity: Option<(&str, &str)>,
    extra_alpn: &[String],
    flags: &TlsFlags,
) -> Result<Arc<ClientConfig>> {
    let (provider, versions) = policy(flags)?;
    let verifier = WebPkiServerVerifier::builder_with_provider(load_roots(ca)?, provider.clone())
        .build()
        .map_err(|e| Error::config(format!("CA {ca}")).because(e))?;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&versions)
        .map_err(|e| Error::config("TLS policy").because(e))?
        .with_webpki_verifier(verifier);
    let mut config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|e| Error::config(format!("client certificate {cert}")).because(e))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols =
        std::iter::once(ALPN_H2.to_vec()).chain(extra_alpn.iter().map(|p| p.as_bytes().to_vec())).collect();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(suites: &[&str], min: &str) -> TlsFlags {
        TlsFlags { cipher_suites: suites.iter().map(|s| s.to_string()).collect(), tls_min_version: min.into() }
    }

    #[test]
    fn cipher_policy_accepts_go_names_and_rejects_unknown_ones() {
        let (provider, _) = policy(&flags(&["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"], "")).expect("known suite");
        let tls12: Vec<_> = provider.cipher_suites.iter().filter(|s| s.version() == &rustls::version::TLS12).collect();
        assert_eq!(tls12.len(), 1);
        let err = policy(&flags(&["TLS_RSA_WITH_RC4_128_SHA"], "")).expect_err("insecure suite");
        assert!(err.to_string().contains("cipher-suites"));
        let (_, versions) = policy(&flags(&[], "VersionTLS13")).expect("tls13");
        assert_eq!(versions.len(), 1);
        assert!(policy(&flags(&[], "VersionSSL3")).is_err());
    }

    #[test]
    fn missing_files_are_config_errors_naming_the_path() {
        let err = load_certs("/nonexistent/ca.crt").expect_err("missing");
        assert_eq!(err.kind, crate::ErrorKind::Config);
        assert!(err.to_string().contains("/nonexistent/ca.crt"));
    }
}
