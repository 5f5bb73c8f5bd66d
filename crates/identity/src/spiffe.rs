//! SPIFFE IDs and the X509-SVID rules every certificate in the mesh obeys:
//! exactly one URI SAN `spiffe://<trust-domain>/ns/<namespace>/svc/<service>`,
//! not a CA, key usage `digitalSignature` and never `keyCertSign`.

use std::fmt;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Namespace reserved for the mesh's own components (the control plane).
pub const SYSTEM_NAMESPACE: &str = "tandem-system";

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service: String,
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service: &str) -> Self {
        SpiffeId {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service: service.to_string(),
        }
    }

    /// The control plane's own identity in a trust domain.
    pub fn control(trust_domain: &str) -> Self {
        Self::new(trust_domain, SYSTEM_NAMESPACE, "control")
    }

    pub fn uri(&self) -> String {
        self.to_string()
    }

    /// Parses `spiffe://<td>/ns/<ns>/svc/<svc>`; any other shape is refused.
    pub fn parse(uri: &str) -> Result<Self, SvidError> {
        let rest = uri.strip_prefix("spiffe://").ok_or(SvidError::NotSpiffe)?;
        let (td, path) = rest.split_once('/').ok_or(SvidError::BadPath)?;
        if !valid_trust_domain(td) {
            return Err(SvidError::BadTrustDomain);
        }
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["ns", ns, "svc", svc] if valid_label(ns) && valid_label(svc) => {
                Ok(Self::new(td, ns, svc))
            }
            _ => Err(SvidError::BadPath),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/svc/{}",
            self.trust_domain, self.namespace, self.service
        )
    }
}

/// A DNS label: what service and namespace names are.
pub fn valid_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// SPIFFE trust domains: lower-case letters, digits, `.`, `-`, `_`.
pub fn valid_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-' || b == b'_'
        })
}

/// Why a certificate is not a valid SVID of the expected trust domain.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    #[error("the certificate does not parse")]
    Malformed,
    #[error("the certificate has no URI SAN")]
    NoUriSan,
    #[error("the certificate has more than one URI SAN")]
    SeveralUriSans,
    #[error("the URI SAN is not a spiffe:// ID")]
    NotSpiffe,
    #[error("the SPIFFE ID's trust domain is malformed")]
    BadTrustDomain,
    #[error("the SPIFFE ID's path is not /ns/<namespace>/svc/<service>")]
    BadPath,
    #[error("the SPIFFE ID belongs to trust domain `{0}`")]
    OtherTrustDomain(String),
    #[error("the leaf certificate is a CA (cA=true)")]
    CaLeaf,
    #[error("the leaf certificate may sign certificates (keyCertSign)")]
    KeyCertSign,
    #[error("the leaf certificate lacks key usage digitalSignature")]
    NoDigitalSignature,
    #[error("the peer is {found}, expected {expected}")]
    Unexpected { expected: String, found: String },
    #[error("the certificate's key is not ECDSA P-256")]
    KeyType,
    #[error("the certificate was issued under a revoked join token")]
    Revoked,
    #[error("the certificate chains through an intermediate CA, and intermediates are not allowed (`tandem control --allow-intermediates`)")]
    Intermediate,
}

impl SvidError {
    /// The label value counted in handshake-failure metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            SvidError::Malformed => "bad-certificate",
            SvidError::NoUriSan
            | SvidError::NotSpiffe
            | SvidError::BadTrustDomain
            | SvidError::BadPath => "not-an-svid",
            SvidError::SeveralUriSans => "several-uri-sans",
            SvidError::OtherTrustDomain(_) => "other-trust-domain",
            SvidError::CaLeaf | SvidError::KeyCertSign | SvidError::NoDigitalSignature => {
                "ca-as-leaf"
            }
            SvidError::Unexpected { .. } => "unexpected-identity",
            SvidError::Intermediate => "intermediate",
            SvidError::KeyType => "bad-key-type",
            SvidError::Revoked => "revoked",
        }
    }
}

/// Checks a leaf certificate (DER) against the X509-SVID rules and returns
/// the identity it carries, which must be in `trust_domain`.
pub fn check_svid(der: &[u8], trust_domain: &str) -> Result<SpiffeId, SvidError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| SvidError::Malformed)?;
    let mut uris = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(u) = name {
                uris.push(*u);
            }
        }
    }
    let uri = match uris.as_slice() {
        [] => return Err(SvidError::NoUriSan),
        [one] => *one,
        _ => return Err(SvidError::SeveralUriSans),
    };
    if let Ok(Some(bc)) = cert.basic_constraints() {
        if bc.value.ca {
            return Err(SvidError::CaLeaf);
        }
    }
    match cert.key_usage() {
        Ok(Some(ku)) => {
            if ku.value.key_cert_sign() {
                return Err(SvidError::KeyCertSign);
            }
            if !ku.value.digital_signature() {
                return Err(SvidError::NoDigitalSignature);
            }
        }
        _ => return Err(SvidError::NoDigitalSignature),
    }
    if !is_p256(cert.public_key()) {
        return Err(SvidError::KeyType);
    }
    let id = SpiffeId::parse(uri)?;
    if id.trust_domain != trust_domain {
        return Err(SvidError::OtherTrustDomain(id.trust_domain));
    }
    Ok(id)
}

/// Whether a public key is ECDSA P-256, the one key type of the mesh's
/// certificates (checked when a CSR is signed and when a peer shows one).
pub fn is_p256(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> bool {
    use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
    spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY
        && spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .is_some_and(|curve| curve == OID_EC_P256)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        let id = SpiffeId::parse("spiffe://tandem.local/ns/default/svc/web").expect("valid");
        assert_eq!(id, SpiffeId::new("tandem.local", "default", "web"));
        assert_eq!(id.uri(), "spiffe://tandem.local/ns/default/svc/web");
        for bad in [
            "https://tandem.local/ns/default/svc/web",
            "spiffe://tandem.local/ns/default/svc",
            "spiffe://tandem.local/ns/default/svc/web/x",
            "spiffe://Tandem/ns/default/svc/web",
            "spiffe:///ns/default/svc/web",
            "spiffe://tandem.local/ns/Default/svc/web",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn leaves_must_hold_p256_keys() {
        use rcgen::{CertificateParams, KeyPair, KeyUsagePurpose, SanType};
        let svid = |alg: &'static rcgen::SignatureAlgorithm| {
            let key = KeyPair::generate_for(alg).expect("key");
            let mut p = CertificateParams::default();
            p.subject_alt_names = vec![SanType::URI(
                "spiffe://tandem.local/ns/default/svc/web"
                    .try_into()
                    .expect("uri"),
            )];
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.self_signed(&key).expect("cert").der().to_vec()
        };
        assert!(check_svid(&svid(&rcgen::PKCS_ECDSA_P256_SHA256), "tandem.local").is_ok());
        for alg in [&rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
            assert_eq!(
                check_svid(&svid(alg), "tandem.local"),
                Err(SvidError::KeyType)
            );
        }
    }
}
