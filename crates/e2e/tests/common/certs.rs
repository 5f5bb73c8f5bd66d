//! Certificates for tests that speak mTLS to a sidecar themselves: leaves
//! signed by the mesh's own CA (read from the control plane's data
//! directory) or by a CA of the test's own.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use tandem_e2e::Mesh;

pub const TD: &str = "tandem.local";

pub fn spiffe(ns: &str, svc: &str) -> String {
    format!("spiffe://{TD}/ns/{ns}/svc/{svc}")
}

/// The mesh CA's signing root: (certificate PEM path, key PEM path).
pub fn mesh_ca(mesh: &Mesh) -> (PathBuf, PathBuf) {
    let ca = mesh.data_dir().join("ca");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ca.join("state.json")).unwrap()).unwrap();
    let id = state["signer"].as_str().unwrap();
    (ca.join(format!("{id}.crt")), ca.join(format!("{id}.key")))
}

/// A CA of our own, unknown to the mesh.
pub fn other_ca(dir: &Path) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, "Other CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = p.self_signed(&key).unwrap();
    let (c, k) = (dir.join("other-ca.crt"), dir.join("other-ca.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

/// What a test certificate looks like.
pub struct Leaf<'a> {
    pub uris: Vec<String>,
    /// Validity relative to now, in seconds.
    pub from: i64,
    pub to: i64,
    pub ca_flag: bool,
    pub issuer: (&'a Path, &'a Path),
    /// The join token it descends from (`OU=join-token <id>`), as the
    /// mesh CA's leaves name theirs.
    pub lineage: Option<&'a str>,
}

/// Writes `<name>.crt` and `<name>.key`; returns their paths.
pub fn leaf(dir: &Path, name: &str, l: Leaf<'_>) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, name);
    if let Some(lineage) = l.lineage {
        p.distinguished_name.push(
            DnType::OrganizationalUnitName,
            format!("join-token {lineage}"),
        );
    }
    p.subject_alt_names = l
        .uris
        .iter()
        .map(|u| SanType::URI(u.clone().try_into().unwrap()))
        .collect();
    if l.ca_flag {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
        ];
    } else {
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    }
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now + time::Duration::seconds(l.from);
    p.not_after = now + time::Duration::seconds(l.to);
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(l.issuer.1).unwrap()).unwrap();
    let issuer =
        Issuer::from_ca_cert_pem(&std::fs::read_to_string(l.issuer.0).unwrap(), ca_key).unwrap();
    let cert = p.signed_by(&key, &issuer).unwrap();
    let (c, k) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c.display().to_string(), k.display().to_string())
}

/// A leaf for `spiffe://tandem.local/ns/default/svc/NAME` from the mesh's
/// CA, valid for ten minutes, written into `dir`: (certificate, key) paths.
pub fn mesh_leaf(mesh: &Mesh, dir: &Path, name: &str) -> (String, String) {
    let (ca_crt, ca_key) = mesh_ca(mesh);
    leaf(
        dir,
        name,
        Leaf {
            uris: vec![spiffe("default", name)],
            from: -60,
            to: 600,
            ca_flag: false,
            issuer: (ca_crt.as_path(), ca_key.as_path()),
            lineage: None,
        },
    )
}
