//! A throwaway PKI for one test or demo run, written as PEM files into a
//! directory the caller owns: one CA that signs the server, agent and
//! frontend certificates, and an unrelated "rogue" CA with a client
//! certificate that konduit must refuse. Also builds rustls configs from
//! them for in-process clients and backends. Never touches system trust stores.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

/// What a leaf certificate is for (its extended key usage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// A TLS server (listener) certificate.
    Server,
    /// A TLS client certificate.
    Client,
}

/// A certificate and its key, on disk and in memory.
#[derive(Debug, Clone)]
pub struct Identity {
    /// PEM certificate file.
    pub cert: PathBuf,
    /// PEM (PKCS#8) private key file.
    pub key: PathBuf,
    /// The certificate, DER.
    pub cert_der: CertificateDer<'static>,
    /// The private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
}

impl Identity {
    /// The private key as rustls wants it.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// `(cert, key)` paths as strings, for command-line flags.
    pub fn paths(&self) -> (String, String) {
        (self.cert.display().to_string(), self.key.display().to_string())
    }
}

/// The run's certificates. Every path is inside [`Pki::dir`].
pub struct Pki {
    /// Where the PEM files live.
    pub dir: PathBuf,
    /// The CA certificate (PEM) that signs every identity below except `rogue_client`.
    pub ca: PathBuf,
    /// The CA certificate, DER.
    pub ca_der: CertificateDer<'static>,
    /// Listener certificate for the server's frontend and agent ports and for HTTPS
    /// backends; SANs 127.0.0.1, ::1, localhost and the caller's extras.
    pub server: Identity,
    /// Client certificate of the agents (`--agent-cert`).
    pub agent: Identity,
    /// Client certificate of frontends (kube-apiserver's role) on the TCP frontend.
    pub frontend: Identity,
    /// An unrelated CA (PEM), for "wrong CA" tests.
    pub rogue_ca: PathBuf,
    /// A client certificate signed by the rogue CA: konduit must refuse it.
    pub rogue_client: Identity,
    issuer: Issuer<'static, KeyPair>,
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("empty SAN list");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params
}

fn write(path: &Path, contents: &str) {
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn new_ca(dir: &Path, file: &str, name: &str) -> (PathBuf, CertificateDer<'static>, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().expect("generate CA key");
    let params = ca_params(name);
    let cert = params.self_signed(&key).expect("self-sign CA");
    let path = dir.join(format!("{file}.crt"));
    write(&path, &cert.pem());
    write(&dir.join(format!("{file}.key")), &key.serialize_pem());
    (path, cert.der().clone(), Issuer::new(params, key))
}

fn issue_with(
    issuer: &Issuer<'static, KeyPair>,
    dir: &Path,
    file: &str,
    common_name: &str,
    sans: &[String],
    usage: Usage,
) -> Identity {
    let key = KeyPair::generate().expect("generate key");
    let mut params = CertificateParams::new(sans.to_vec()).unwrap_or_else(|e| panic!("SANs {sans:?} for {file}: {e}"));
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![match usage {
        Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
        Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
    }];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, issuer).expect("sign leaf");
    let identity = Identity {
        cert: dir.join(format!("{file}.crt")),
        key: dir.join(format!("{file}.key")),
        cert_der: cert.der().clone(),
        key_der: key.serialize_der(),
    };
    write(&identity.cert, &cert.pem());
    write(&identity.key, &key.serialize_pem());
    identity
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Pki {
    /// Generates the whole PKI into `dir` (which must exist). `extra_server_sans` are
    /// added to the server certificate (IP addresses or DNS names, e.g. a netns address).
    pub fn generate(dir: &Path, extra_server_sans: &[&str]) -> Pki {
        let (ca, ca_der, issuer) = new_ca(dir, "ca", "konduit test CA");
        let mut sans: Vec<String> = ["127.0.0.1", "::1", "localhost"].map(String::from).to_vec();
        sans.extend(extra_server_sans.iter().map(|s| s.to_string()));
        let server = issue_with(&issuer, dir, "server", "konduit-server", &sans, Usage::Server);
        let agent = issue_with(&issuer, dir, "agent", "konduit-agent", &[], Usage::Client);
        let frontend = issue_with(&issuer, dir, "frontend", "kube-apiserver", &[], Usage::Client);
        let (rogue_ca, _, rogue_issuer) = new_ca(dir, "rogue-ca", "unrelated CA");
        let rogue_client = issue_with(&rogue_issuer, dir, "rogue-client", "kube-apiserver", &[], Usage::Client);
        Pki { dir: dir.to_path_buf(), ca, ca_der, server, agent, frontend, rogue_ca, rogue_client, issuer }
    }

    /// Issues another certificate from the run's CA, written as `<file>.crt`/`<file>.key`.
    pub fn issue(&self, file: &str, common_name: &str, sans: &[&str], usage: Usage) -> Identity {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        issue_with(&self.issuer, &self.dir, file, common_name, &sans, usage)
    }

    /// A client config that trusts the run's CA, presents `identity` if given, and
    /// offers `alpn` (e.g. `[b"h2"]` for gRPC).
    pub fn client_config(&self, identity: Option<&Identity>, alpn: &[&[u8]]) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).expect("CA certificate is valid");
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_root_certificates(roots);
        let mut config = match identity {
            Some(id) => builder
                .with_client_auth_cert(vec![id.cert_der.clone()], id.private_key())
                .expect("client identity is valid"),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config
    }

    /// A server config presenting `identity`, without client authentication
    /// (what an HTTPS backend such as a kubelet stand-in needs).
    pub fn server_config(&self, identity: &Identity) -> rustls::ServerConfig {
        rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_no_client_auth()
            .with_single_cert(vec![identity.cert_der.clone()], identity.private_key())
            .expect("server identity is valid")
    }
}

impl Pki {
    /// A server config presenting `identity` that requires a client certificate signed by
    /// the run's CA (what konduit's TCP frontend and agent listener do).
    pub fn mtls_server_config(&self, identity: &Identity) -> rustls::ServerConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).expect("CA certificate is valid");
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .expect("client verifier");
        rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![identity.cert_der.clone()], identity.private_key())
            .expect("server identity is valid")
    }
}

/// The TLS server name for connecting to `ip` (certificates here carry IP SANs).
pub fn server_name(ip: IpAddr) -> ServerName<'static> {
    ServerName::IpAddress(ip.into())
}
