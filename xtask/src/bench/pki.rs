//! A throwaway PKI for one bench run: a CA, a listener certificate (SANs
//! 127.0.0.1 and localhost) for the server's frontend and agent ports, and a
//! client certificate for the mTLS frontend. PEM files in the run's scratch
//! directory; never touches a system trust store.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

/// A certificate and key, as files and as DER.
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub cert_der: Vec<u8>,
    pub key_der: Vec<u8>,
}

pub struct Pki {
    pub ca: PathBuf,
    pub ca_der: Vec<u8>,
    pub server: Identity,
    pub client: Identity,
}

impl Pki {
    pub fn generate(dir: &Path) -> anyhow::Result<Self> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.distinguished_name.push(DnType::CommonName, "konduit bench CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let ca = dir.join("ca.crt");
        std::fs::write(&ca, ca_cert.pem()).context("write ca.crt")?;
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf = |file: &str, usage: ExtendedKeyUsagePurpose| -> anyhow::Result<Identity> {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
            params.distinguished_name.push(DnType::CommonName, file);
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
            params.extended_key_usages = vec![usage];
            params.use_authority_key_identifier_extension = true;
            let cert = params.signed_by(&key, &issuer)?;
            let identity = Identity {
                cert: dir.join(format!("{file}.crt")),
                key: dir.join(format!("{file}.key")),
                cert_der: cert.der().to_vec(),
                key_der: key.serialize_der(),
            };
            std::fs::write(&identity.cert, cert.pem())?;
            std::fs::write(&identity.key, key.serialize_pem())?;
            Ok(identity)
        };
        Ok(Pki {
            ca,
            ca_der: ca_cert.der().to_vec(),
            server: leaf("server", ExtendedKeyUsagePurpose::ServerAuth)?,
            client: leaf("frontend-client", ExtendedKeyUsagePurpose::ClientAuth)?,
        })
    }
}
