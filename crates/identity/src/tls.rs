//! rustls configurations for the mesh: TLS 1.3 only, aws-lc-rs, both sides
//! authenticated by SPIFFE certificates. The certificate and the trust
//! bundle can change at any time (rotation): configs are built once and
//! read the current ones at every handshake, so established connections
//! are never dropped by a renewal.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::spiffe::{check_svid, valid_label, SpiffeId, SvidError};

/// Largest TLS record a sidecar sends to another (plaintext bytes). The
/// receiver buffers a record until it is whole; with TLS's 16 KiB records
/// that buffer grows to 32 KiB per connection, which a peer that stops
/// reading (stalled streams, one connection each) multiplies. 4 KiB keeps
/// it at 8 KiB, for one more record header and seal per 4 KiB of a large
/// body.
pub const SIDECAR_RECORD_SIZE: usize = 4096;
pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The certificate a proxy (or the control plane) presents.
pub struct Leaf {
    pub key: Arc<CertifiedKey>,
    pub id: SpiffeId,
    /// When it was issued (its notBefore, which the CA backdates).
    pub issued_at: SystemTime,
    pub not_after: SystemTime,
    pub serial: String,
    /// Root id that signed it.
    pub signer: String,
}

impl Leaf {
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.key.cert
    }

    pub fn not_after_unix(&self) -> u64 {
        self.not_after
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

struct Bundle {
    ders: Vec<CertificateDer<'static>>,
    roots: Arc<RootCertStore>,
    client_verifier: Arc<dyn ClientCertVerifier>,
}

/// A mesh identity: trust domain, trust bundle and (once issued) the
/// current certificate, all swappable.
pub struct TlsIdentity {
    trust_domain: String,
    provider: Arc<CryptoProvider>,
    bundle: ArcSwap<Bundle>,
    leaf: ArcSwapOption<Leaf>,
    /// Set when the certificate's lifetime is over and no new one came:
    /// handshakes and requests are refused (never plaintext).
    expired: AtomicBool,
    /// Whether a peer's chain may pass through intermediate CAs between
    /// its leaf and a root of the bundle (off unless configured: the mesh's
    /// CA signs leaves with a root directly).
    intermediates: AtomicBool,
    /// Lineages (join-token ids) whose certificates are refused.
    revoked: ArcSwap<Vec<String>>,
}

impl TlsIdentity {
    pub fn new(
        trust_domain: &str,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Arc<Self>, Error> {
        let provider = provider();
        let bundle = build_bundle(roots, &provider)?;
        Ok(Arc::new(TlsIdentity {
            trust_domain: trust_domain.to_string(),
            provider,
            bundle: ArcSwap::from_pointee(bundle),
            leaf: ArcSwapOption::empty(),
            expired: AtomicBool::new(false),
            intermediates: AtomicBool::new(false),
            revoked: ArcSwap::from_pointee(Vec::new()),
        }))
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn bundle(&self) -> Vec<CertificateDer<'static>> {
        self.bundle.load().ders.clone()
    }

    /// Replaces the trust bundle; returns whether it changed.
    pub fn set_bundle(&self, roots: Vec<CertificateDer<'static>>) -> Result<bool, Error> {
        if self.bundle.load().ders == roots {
            return Ok(false);
        }
        let b = build_bundle(roots, &self.provider)?;
        self.bundle.store(Arc::new(b));
        Ok(true)
    }

    /// Installs a new certificate (leaf first) and its private key. The
    /// certificate must be an SVID of this trust domain that chains to the
    /// bundle.
    pub fn set_cert(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        signer: String,
    ) -> Result<Arc<Leaf>, Error> {
        let leaf_der = chain
            .first()
            .ok_or(Error::General("empty certificate chain".into()))?;
        let id = check_svid(leaf_der, &self.trust_domain).map_err(svid_error)?;
        let parsed = ParsedCertificate::try_from(leaf_der)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.bundle.load().roots,
            &chain[1..],
            UnixTime::now(),
            self.provider.signature_verification_algorithms.all,
        )?;
        let (not_before, not_after) =
            validity(leaf_der).ok_or(Error::General("no validity".into()))?;
        let issued_at = not_before + crate::ca::BACKDATE;
        let serial = serial(leaf_der);
        let key = CertifiedKey::from_der(chain, key, &self.provider)?;
        let leaf = Arc::new(Leaf {
            key: Arc::new(key),
            id,
            issued_at,
            not_after,
            serial,
            signer,
        });
        self.leaf.store(Some(leaf.clone()));
        self.expired.store(false, Ordering::Release);
        Ok(leaf)
    }

    pub fn leaf(&self) -> Option<Arc<Leaf>> {
        self.leaf.load_full()
    }

    /// Allows (or refuses) peers whose chains pass through intermediates.
    pub fn set_allow_intermediates(&self, allow: bool) {
        self.intermediates.store(allow, Ordering::Release);
    }

    /// Refuses peers whose certificates descend from these join tokens.
    pub fn set_revoked(&self, lineages: Vec<String>) {
        if **self.revoked.load() != lineages {
            self.revoked.store(Arc::new(lineages));
        }
    }

    /// A peer's leaf against the revoked lineages (nothing to parse while
    /// none is revoked).
    fn check_revoked(&self, leaf: &CertificateDer<'_>) -> Result<(), Error> {
        let revoked = self.revoked.load();
        if revoked.is_empty() {
            return Ok(());
        }
        match crate::ca::lineage(leaf) {
            Some(l) if revoked.contains(&l) => Err(svid_error(SvidError::Revoked)),
            _ => Ok(()),
        }
    }

    fn check_intermediates(&self, intermediates: &[CertificateDer<'_>]) -> Result<(), Error> {
        if intermediates.is_empty() || self.intermediates.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(svid_error(SvidError::Intermediate))
        }
    }

    /// Marks the certificate expired (checked by the renewal task at the
    /// certificate's end of life).
    pub fn set_expired(&self, expired: bool) {
        self.expired.store(expired, Ordering::Release);
    }

    /// True once the certificate expired without a renewal (one atomic load:
    /// checked on every request).
    pub fn is_expired(&self) -> bool {
        self.expired.load(Ordering::Acquire)
    }

    /// True when there is a certificate within its lifetime.
    pub fn is_serving(&self) -> bool {
        !self.expired.load(Ordering::Acquire) && self.leaf.load().is_some()
    }

    fn current_key(&self) -> Option<Arc<CertifiedKey>> {
        if self.expired.load(Ordering::Acquire) {
            return None;
        }
        let leaf = self.leaf.load();
        let leaf = leaf.as_ref()?;
        if SystemTime::now() >= leaf.not_after {
            return None;
        }
        Some(leaf.key.clone())
    }

    /// Server side of a sidecar hop: requires a client SVID from the bundle.
    /// Records between sidecars are at most [`SIDECAR_RECORD_SIZE`].
    pub fn server_config(self: &Arc<Self>, alpn: &[&[u8]]) -> Arc<ServerConfig> {
        let verifier = Arc::new(SpiffeClientVerifier {
            identity: self.clone(),
            mandatory: true,
        });
        let mut cfg = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("aws-lc-rs supports TLS 1.3")
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        finish_server(&mut cfg, alpn);
        cfg.max_fragment_size = Some(SIDECAR_RECORD_SIZE);
        Arc::new(cfg)
    }

    /// A server where a client certificate is optional but, when sent, is
    /// verified like any SVID (the control plane's gRPC port: a proxy
    /// bootstraps with its join token, then uses its certificate).
    pub fn server_config_optional_client_auth(
        self: &Arc<Self>,
        alpn: &[&[u8]],
    ) -> Arc<ServerConfig> {
        let verifier = Arc::new(SpiffeClientVerifier {
            identity: self.clone(),
            mandatory: false,
        });
        let mut cfg = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("aws-lc-rs supports TLS 1.3")
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        finish_server(&mut cfg, alpn);
        Arc::new(cfg)
    }

    /// Client side: presents this identity and checks that the server is the
    /// identity named by the [`server_name`] the connection is made with.
    pub fn client_config(self: &Arc<Self>, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        let verifier = Arc::new(SpiffeServerVerifier(self.clone()));
        let mut cfg = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("aws-lc-rs supports TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(Resolver(self.clone())));
        finish_client(&mut cfg, alpn);
        cfg.max_fragment_size = Some(SIDECAR_RECORD_SIZE);
        Arc::new(cfg)
    }

    /// A client without a certificate of its own (the proxy's channel to
    /// the control plane).
    pub fn client_config_anonymous(self: &Arc<Self>, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        let verifier = Arc::new(SpiffeServerVerifier(self.clone()));
        let mut cfg = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("aws-lc-rs supports TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        finish_client(&mut cfg, alpn);
        Arc::new(cfg)
    }

    fn check_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<SpiffeId, Error> {
        // The SPIFFE rules first, so a certificate that breaks them is
        // refused (and counted) for that reason.
        let id = check_svid(end_entity, &self.trust_domain).map_err(svid_error)?;
        self.check_intermediates(intermediates)?;
        self.check_revoked(end_entity)?;
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.bundle.load().roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(id)
    }
}

fn finish_server(cfg: &mut ServerConfig, alpn: &[&[u8]]) {
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // Every connection is fully verified: no resumption.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
}

fn finish_client(cfg: &mut ClientConfig, alpn: &[&[u8]]) {
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg.resumption = rustls::client::Resumption::disabled();
}

fn build_bundle(
    roots: Vec<CertificateDer<'static>>,
    provider: &Arc<CryptoProvider>,
) -> Result<Bundle, Error> {
    let mut store = RootCertStore::empty();
    for r in &roots {
        store.add(r.clone())?;
    }
    let store = Arc::new(store);
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(store.clone(), provider.clone())
            .build()
            .map_err(|e| Error::General(e.to_string()))?;
    Ok(Bundle {
        ders: roots,
        roots: store,
        client_verifier,
    })
}

fn svid_error(e: SvidError) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// Suffix of the server names that carry an expected identity (it also
/// keeps names valid when a namespace is all digits).
const NAME_SUFFIX: &str = ".tandem";

/// The server name a connection to `namespace/service` is made with
/// (`service.namespace.tandem`): the verifier turns it back into the SPIFFE
/// ID the peer must present. It is also sent as SNI. A name that cannot be
/// encoded yields one that no peer can satisfy.
pub fn server_name(namespace: &str, service: &str) -> ServerName<'static> {
    ServerName::try_from(format!("{service}.{namespace}{NAME_SUFFIX}"))
        .unwrap_or_else(|_| ServerName::try_from("invalid.invalid").expect("valid name"))
}

/// The SPIFFE ID a [`server_name`] names (`None` for any other name).
pub fn expected_id(trust_domain: &str, name: &ServerName<'_>) -> Option<SpiffeId> {
    let ServerName::DnsName(d) = name else {
        return None;
    };
    let (svc, ns) = d.as_ref().strip_suffix(NAME_SUFFIX)?.split_once('.')?;
    (valid_label(svc) && valid_label(ns)).then(|| SpiffeId::new(trust_domain, ns, svc))
}

/// `(notBefore, notAfter)` of a certificate.
pub fn validity(der: &[u8]) -> Option<(SystemTime, SystemTime)> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, c) = X509Certificate::from_der(der).ok()?;
    let at = |t: i64| UNIX_EPOCH + std::time::Duration::from_secs(t.max(0) as u64);
    Some((
        at(c.validity().not_before.timestamp()),
        at(c.validity().not_after.timestamp()),
    ))
}

/// A certificate's serial number, as `aa:bb:...` (empty if it does not
/// parse).
pub fn serial(der: &[u8]) -> String {
    use x509_parser::prelude::{FromDer, X509Certificate};
    X509Certificate::from_der(der)
        .map(|(_, c)| c.raw_serial_as_string())
        .unwrap_or_default()
}

// The handshake-signature part of every verifier here: TLS 1.3 only.
fn tls12_refused() -> Result<HandshakeSignatureValid, Error> {
    Err(Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls12NotOffered,
    ))
}

fn tls13_signature(
    provider: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, Error> {
    rustls::crypto::verify_tls13_signature(
        message,
        cert,
        dss,
        &provider.signature_verification_algorithms,
    )
}

fn schemes(provider: &CryptoProvider) -> Vec<SignatureScheme> {
    provider
        .signature_verification_algorithms
        .supported_schemes()
}

struct Resolver(Arc<TlsIdentity>);

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.current_key()
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.current_key()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

struct SpiffeServerVerifier(Arc<TlsIdentity>);

impl std::fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SpiffeServerVerifier")
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let id = self.0.check_chain(end_entity, intermediates, now)?;
        let expected = expected_id(&self.0.trust_domain, server_name)
            .ok_or_else(|| Error::General("no expected identity for this connection".into()))?;
        if id != expected {
            return Err(svid_error(SvidError::Unexpected {
                expected: expected.uri(),
                found: id.uri(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls13_signature(&self.0.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes(&self.0.provider)
    }
}

struct SpiffeClientVerifier {
    identity: Arc<TlsIdentity>,
    /// A client without a certificate is refused (sidecar hops) or let in
    /// to authenticate otherwise (the control plane's port).
    mandatory: bool,
}

impl std::fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SpiffeClientVerifier")
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        check_svid(end_entity, &self.identity.trust_domain).map_err(svid_error)?;
        self.identity.check_intermediates(intermediates)?;
        self.identity.check_revoked(end_entity)?;
        let bundle = self.identity.bundle.load();
        bundle
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls13_signature(&self.identity.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes(&self.identity.provider)
    }
}

/// The SPIFFE ID in a verified peer certificate.
pub fn peer_id(certs: Option<&[CertificateDer<'_>]>, trust_domain: &str) -> Option<SpiffeId> {
    let leaf = certs?.first()?;
    check_svid(leaf, trust_domain).ok()
}

/// Why a handshake failed, as a short label for metrics.
pub fn failure_reason(e: &std::io::Error) -> &'static str {
    if e.kind() == std::io::ErrorKind::TimedOut {
        return "timeout";
    }
    match e.get_ref().and_then(|i| i.downcast_ref::<Error>()) {
        Some(err) => rustls_reason(err),
        None => "io",
    }
}

pub fn rustls_reason(err: &Error) -> &'static str {
    match err {
        Error::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not-yet-valid"
            }
            CertificateError::UnknownIssuer | CertificateError::BadSignature => "unknown-ca",
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "bad-usage"
            }
            CertificateError::Other(OtherError(o)) => {
                if let Some(s) = o.downcast_ref::<SvidError>() {
                    s.reason()
                } else if o.to_string().contains("CaUsedAsEndEntity") {
                    "ca-as-leaf"
                } else {
                    "bad-certificate"
                }
            }
            _ => "bad-certificate",
        },
        Error::NoCertificatesPresented => "no-client-cert",
        Error::AlertReceived(_) => "refused-by-peer",
        Error::PeerIncompatible(_) | Error::NoApplicationProtocol => "incompatible",
        Error::InappropriateMessage { .. }
        | Error::InappropriateHandshakeMessage { .. }
        | Error::InvalidMessage(_)
        | Error::PeerMisbehaved(_) => "protocol",
        _ => "other",
    }
}

/// A client for the one call made before any trust exists: fetching the
/// trust bundle, whose authenticity is then proved by the join token (see
/// [`crate::token::bundle_proof`]). It accepts any server certificate, so
/// nothing secret may be sent over it.
pub fn bootstrap_client_config(alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let provider = provider();
    let mut cfg = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("aws-lc-rs supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    finish_client(&mut cfg, alpn);
    Arc::new(cfg)
}

struct AnyServer(Arc<CryptoProvider>);

impl std::fmt::Debug for AnyServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AnyServer")
    }
}

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls13_signature(&self.0, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_carry_the_expected_identity() {
        let n = server_name("2024", "orders");
        assert_eq!(
            expected_id("tandem.local", &n),
            Some(SpiffeId::new("tandem.local", "2024", "orders"))
        );
        // Names that do not encode an identity expect none: verification fails.
        for raw in ["invalid.invalid", "orders.default", "a.b.c.tandem"] {
            let n = ServerName::try_from(raw).expect("name");
            assert_eq!(expected_id("tandem.local", &n), None, "{raw}");
        }
    }
}
