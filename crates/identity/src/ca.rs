//! The certificate authority: its roots (the trust bundle), the one root
//! that signs, issuance of SVIDs from CSRs, root rotation, and the join-token
//! key. Its material lives in a [`Kv`] store (the data directory by
//! default, where every file is mode 0600):
//!
//! ```text
//! ca/state.json      trust domain, bundle order, signing root
//! ca/<id>.crt|.key   one root (PEM)
//! ca/token.key       the HMAC key of join tokens
//! ca/revoked-tokens  one revoked token id per line
//! ca/used-tokens     single-use tokens spent: id and the key they certified
//! ```
//!
//! Every leaf names the join token it descends from (its *lineage*) in an
//! `OU=join-token <id>` attribute of its subject. A renewal keeps the
//! lineage, so revoking a token reaches every certificate issued under it.
//!
//! An [`Authority`] is what was read from the store; every change (a new
//! root, a promotion, a retirement, a revocation) is written with
//! compare-and-swap on what it read, so two writers (two control planes,
//! or the CLI beside one) never lose each other's change, and returns the
//! authority as the store now has it.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tandem_store::Kv;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use crate::spiffe::{valid_label, valid_trust_domain, SpiffeId, SYSTEM_NAMESPACE};
use crate::token::{Claims, TokenError, TokenKey};

pub const DEFAULT_TRUST_DOMAIN: &str = "tandem.local";
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Leaves start a minute in the past, for clocks that are slightly behind.
pub const BACKDATE: Duration = Duration::from_secs(60);

/// The key of the CA's state (roots, signer, trust domain): it moves with
/// every change of the CA.
pub const STATE: &str = "ca/state.json";
const TOKEN_KEY: &str = "ca/token.key";
const REVOKED: &str = "ca/revoked-tokens";
const USED: &str = "ca/used-tokens";
/// The longest lifetime of an issued certificate.
pub const MAX_CERT_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// The lineage of the control plane's own certificate.
pub const CONTROL_LINEAGE: &str = "control-plane";
const LINEAGE_PREFIX: &str = "join-token ";

fn cert_key(id: &str) -> String {
    format!("ca/{id}.crt")
}

fn key_key(id: &str) -> String {
    format!("ca/{id}.key")
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("certificate error: {0}")]
    Cert(#[from] rcgen::Error),
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> CaError {
    move |source| CaError::Io {
        what: what.to_string(),
        source,
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct State {
    trust_domain: String,
    /// Root ids in bundle order.
    roots: Vec<String>,
    /// The root that signs new certificates.
    signer: String,
}

struct Root {
    id: String,
    der: CertificateDer<'static>,
    key: KeyPair,
}

/// A certificate issued for an identity.
pub struct Issued {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    pub not_after: SystemTime,
    /// Id of the root that signed it.
    pub signer: String,
}

pub struct Authority {
    state: State,
    roots: Vec<Root>,
    token_key: TokenKey,
}

/// Short, stable id of a root: the first 16 hex digits of its SHA-256.
pub fn root_id(der: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn new_root(trust_domain: &str) -> Result<(CertificateDer<'static>, KeyPair), CaError> {
    root_for(trust_domain, ROOT_LIFETIME)
}

fn root_for(
    trust_domain: &str,
    lifetime: Duration,
) -> Result<(CertificateDer<'static>, KeyPair), CaError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Tandem");
    dn.push(
        DnType::CommonName,
        format!("Tandem root CA {trust_domain} {}", unix_now()),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + lifetime).into();
    params.serial_number = Some(random_serial()?);
    let cert = params.self_signed(&key)?;
    Ok((cert.der().clone(), key))
}

/// Bytes from the operating system's CSPRNG (through aws-lc). Keys, token
/// ids and serials must never come from a seeded, guessable generator.
fn random_bytes<const N: usize>() -> Result<[u8; N], CaError> {
    let mut b = [0u8; N];
    aws_lc_rs::rand::fill(&mut b)
        .map_err(|_| CaError::Invalid("the system random generator failed".into()))?;
    Ok(b)
}

/// A secret of 32 random bytes, as 64 hex digits (the admin credential).
pub fn random_secret() -> Result<String, CaError> {
    Ok(hex(&random_bytes::<32>()?))
}

fn random_serial() -> Result<SerialNumber, CaError> {
    let mut b: [u8; 16] = random_bytes()?;
    b[0] &= 0x7f;
    b[0] |= 0x01;
    Ok(SerialNumber::from_slice(&b))
}

impl Authority {
    /// Opens the CA in `kv`, creating a root on first use (or importing
    /// `import`, a PEM certificate and key, as the root). `trust_domain`
    /// must match the stored one when given.
    pub async fn open(
        kv: &dyn Kv,
        trust_domain: Option<&str>,
        import: Option<(&Path, &Path)>,
    ) -> Result<Authority, CaError> {
        if let Some(td) = trust_domain {
            if !valid_trust_domain(td) {
                return Err(CaError::Invalid(format!(
                    "`{td}` is not a valid trust domain (lower-case letters, digits, `.`, `-`, `_`)"
                )));
            }
        }
        if kv.get(STATE).await.map_err(io(STATE))?.is_none() {
            let td = trust_domain.unwrap_or(DEFAULT_TRUST_DOMAIN);
            let (der, key) = match import {
                Some((cert, key)) => import_root(cert, key)?,
                None => new_root(td)?,
            };
            let id = root_id(&der);
            save_root(kv, &id, &der, &key).await?;
            let secret: [u8; 32] = random_bytes()?;
            // Another creator may have made the key already: theirs stays.
            kv.put_if(TOKEN_KEY, None, hex(&secret).as_bytes())
                .await
                .map_err(io(TOKEN_KEY))?;
            let state = State {
                trust_domain: td.to_string(),
                roots: vec![id.clone()],
                signer: id,
            };
            // Two processes creating the CA at once: the first state wins
            // and both load it.
            kv.put_if(STATE, None, &state_json(&state))
                .await
                .map_err(io(STATE))?;
        }
        let ca = Self::load(kv).await?;
        if let Some(td) = trust_domain {
            if td != ca.state.trust_domain {
                return Err(CaError::Invalid(format!(
                    "the CA is for trust domain `{}`, not `{td}`; every identity would change (use another data directory)",
                    ca.state.trust_domain
                )));
            }
        }
        if let Some((cert, _)) = import {
            let pem = std::fs::read(cert).map_err(io(cert.display()))?;
            let der = CertificateDer::from_pem_slice(&pem)
                .map_err(|e| CaError::Invalid(format!("{}: {e}", cert.display())))?;
            if !ca.roots.iter().any(|r| r.der == der) {
                return Err(CaError::Invalid(format!(
                    "the data directory already holds a CA that does not include {}; use a new data directory to change CAs, or `tandem ca rotate`",
                    cert.display()
                )));
            }
        }
        Ok(ca)
    }

    /// Reads the CA from `kv`.
    pub async fn load(kv: &dyn Kv) -> Result<Authority, CaError> {
        let text = kv
            .get(STATE)
            .await
            .map_err(io(STATE))?
            .ok_or_else(|| CaError::Invalid(format!("{STATE}: no CA here")))?;
        let state: State = serde_json::from_slice(&text.value)
            .map_err(|e| CaError::Invalid(format!("{STATE}: {e}")))?;
        let mut roots = Vec::new();
        for id in &state.roots {
            let (ck, kk) = (cert_key(id), key_key(id));
            let read = |k: String| async move {
                kv.get(&k)
                    .await
                    .map_err(io(&k))?
                    .map(|v| v.value)
                    .ok_or_else(|| CaError::Invalid(format!("{k}: missing")))
            };
            let cert = read(ck.clone()).await?;
            let der = CertificateDer::from_pem_slice(&cert)
                .map_err(|e| CaError::Invalid(format!("{ck}: {e}")))?;
            let key = String::from_utf8(read(kk.clone()).await?)
                .map_err(|e| CaError::Invalid(format!("{kk}: {e}")))?;
            let key =
                KeyPair::from_pem(&key).map_err(|e| CaError::Invalid(format!("{kk}: {e}")))?;
            roots.push(Root {
                id: id.clone(),
                der,
                key,
            });
        }
        if !roots.iter().any(|r| r.id == state.signer) {
            return Err(CaError::Invalid(format!(
                "{STATE}: the signing root {} is not in the bundle",
                state.signer
            )));
        }
        let secret = kv
            .get(TOKEN_KEY)
            .await
            .map_err(io(TOKEN_KEY))?
            .ok_or_else(|| CaError::Invalid(format!("{TOKEN_KEY}: missing")))?;
        Ok(Authority {
            state,
            roots,
            token_key: TokenKey::from_bytes(
                String::from_utf8_lossy(&secret.value).trim().as_bytes(),
            ),
        })
    }

    /// Changes the stored state with compare-and-swap (again on what
    /// another writer left, if one came between); returns the authority as
    /// stored after the change.
    async fn change(
        kv: &dyn Kv,
        mut f: impl FnMut(&mut State) -> Result<(), CaError>,
    ) -> Result<Authority, CaError> {
        for _ in 0..100 {
            let current = kv
                .get(STATE)
                .await
                .map_err(io(STATE))?
                .ok_or_else(|| CaError::Invalid(format!("{STATE}: no CA here")))?;
            let mut state: State = serde_json::from_slice(&current.value)
                .map_err(|e| CaError::Invalid(format!("{STATE}: {e}")))?;
            f(&mut state)?;
            let written = kv
                .put_if(STATE, Some(current.revision), &state_json(&state))
                .await
                .map_err(io(STATE))?;
            if written.is_some() {
                return Self::load(kv).await;
            }
        }
        Err(CaError::Invalid(format!(
            "{STATE}: too many writers at once"
        )))
    }

    pub fn trust_domain(&self) -> &str {
        &self.state.trust_domain
    }

    pub fn bundle(&self) -> Vec<CertificateDer<'static>> {
        self.roots.iter().map(|r| r.der.clone()).collect()
    }

    pub fn bundle_pem(&self) -> String {
        self.roots
            .iter()
            .map(|r| pem("CERTIFICATE", &r.der))
            .collect()
    }

    pub fn root_ids(&self) -> Vec<String> {
        self.roots.iter().map(|r| r.id.clone()).collect()
    }

    pub fn signer_id(&self) -> &str {
        &self.state.signer
    }

    fn signer(&self) -> &Root {
        self.roots
            .iter()
            .find(|r| r.id == self.state.signer)
            .unwrap_or(&self.roots[0])
    }

    /// Signs a certificate for `id` over the public key of `csr`. The CSR's
    /// signature is checked; what it asks for is not: the identity comes
    /// from the caller's proof (a join token), never from the request.
    pub fn issue_csr(
        &self,
        csr: &[u8],
        id: &SpiffeId,
        lineage: &str,
        lifetime: Duration,
    ) -> Result<Issued, CaError> {
        {
            use x509_parser::certification_request::X509CertificationRequest;
            use x509_parser::prelude::FromDer;
            let (_, req) = X509CertificationRequest::from_der(csr)
                .map_err(|e| CaError::Invalid(format!("the CSR is not valid: {e}")))?;
            if !crate::spiffe::is_p256(&req.certification_request_info.subject_pki) {
                return Err(CaError::Invalid(
                    "the CSR's key is not ECDSA P-256, the mesh's one key type".into(),
                ));
            }
        }
        let csr = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(
            csr.to_vec(),
        ))
        .map_err(|e| CaError::Invalid(format!("the CSR is not valid: {e}")))?;
        self.issue_with(self.signer(), &csr.public_key, id, lineage, lifetime)
    }

    /// Issues a certificate and key for `id` here: the control plane's own.
    /// It is signed by the *oldest* root of the bundle, not the signing one:
    /// every proxy that holds any bundle since that root joined trusts it,
    /// including one that missed a rotation and must reach the control
    /// plane to catch up.
    pub fn issue_local(
        &self,
        id: &SpiffeId,
        lifetime: Duration,
    ) -> Result<(Issued, PrivateKeyDer<'static>), CaError> {
        let key = KeyPair::generate()?;
        let issued = self.issue_with(&self.roots[0], &key, id, CONTROL_LINEAGE, lifetime)?;
        let der = PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| CaError::Invalid(e.to_string()))?;
        Ok((issued, der))
    }

    /// Signs a leaf: at most [`MAX_CERT_LIFETIME`], and never past the
    /// signing root's own end.
    fn issue_with(
        &self,
        signer: &Root,
        public_key: &impl rcgen::PublicKeyData,
        id: &SpiffeId,
        lineage: &str,
        lifetime: Duration,
    ) -> Result<Issued, CaError> {
        let issuer = Issuer::from_ca_cert_der(&signer.der, &signer.key)?;
        let now = SystemTime::now();
        let root_end = crate::tls::validity(&signer.der)
            .map(|(_, end)| end)
            .ok_or_else(|| CaError::Invalid(format!("root {}: no validity", signer.id)))?;
        let not_after = (now + lifetime.min(MAX_CERT_LIFETIME)).min(root_end);
        if not_after <= now {
            return Err(CaError::Invalid(format!(
                "root {} has expired: rotate the root (`tandem ca rotate`)",
                signer.id
            )));
        }
        let mut params = leaf_params(id, Duration::ZERO)?;
        params.distinguished_name.push(
            DnType::OrganizationalUnitName,
            format!("{LINEAGE_PREFIX}{lineage}"),
        );
        params.not_after = not_after.into();
        let cert = params.signed_by(public_key, &issuer)?;
        Ok(Issued {
            chain: vec![cert.der().clone()],
            not_after,
            signer: signer.id.clone(),
        })
    }

    /// Adds a new root to the bundle; it does not sign until
    /// [`Authority::promote`]. Returns the CA with it, and its id.
    pub async fn add_root(&self, kv: &dyn Kv) -> Result<(Authority, String), CaError> {
        let (der, key) = new_root(&self.state.trust_domain)?;
        let id = root_id(&der);
        save_root(kv, &id, &der, &key).await?;
        let ca = Self::change(kv, |state| {
            if !state.roots.contains(&id) {
                state.roots.push(id.clone());
            }
            Ok(())
        })
        .await?;
        Ok((ca, id))
    }

    /// Makes `id` the signing root.
    pub async fn promote(kv: &dyn Kv, id: &str) -> Result<Authority, CaError> {
        Self::change(kv, |state| {
            if !state.roots.iter().any(|r| r == id) {
                return Err(CaError::Invalid(format!("no root {id} in the bundle")));
            }
            state.signer = id.to_string();
            Ok(())
        })
        .await
    }

    /// Removes every root but the signing one; returns the CA without them
    /// and the removed ids. Their keys are deleted; their certificates are
    /// kept as `ca/<id>.crt.retired`.
    pub async fn retire_others(kv: &dyn Kv) -> Result<(Authority, Vec<String>), CaError> {
        let mut retired = Vec::new();
        let ca = Self::change(kv, |state| {
            let signer = state.signer.clone();
            retired = state
                .roots
                .iter()
                .filter(|r| **r != signer)
                .cloned()
                .collect();
            state.roots.retain(|r| *r == signer);
            Ok(())
        })
        .await?;
        for id in &retired {
            let _ = kv.delete(&key_key(id)).await;
            if let Ok(Some(c)) = kv.get(&cert_key(id)).await {
                let _ = kv.put(&format!("{}.retired", cert_key(id)), &c.value).await;
                let _ = kv.delete(&cert_key(id)).await;
            }
        }
        Ok((ca, retired))
    }

    /// Mints a join token for one service identity, valid for `ttl`. The
    /// mesh's own namespace is refused.
    pub fn mint_token(
        &self,
        namespace: &str,
        service: &str,
        ttl: Duration,
        reusable: bool,
    ) -> Result<(Claims, String), CaError> {
        if namespace == SYSTEM_NAMESPACE {
            return Err(CaError::Invalid(format!(
                "namespace `{SYSTEM_NAMESPACE}` is reserved for the mesh itself"
            )));
        }
        if !valid_label(namespace) || !valid_label(service) {
            return Err(CaError::Invalid(format!(
                "`{service}` in `{namespace}`: service and namespace names are lower-case letters, digits and `-`"
            )));
        }
        let id = hex(&random_bytes::<8>()?);
        let claims = Claims {
            id,
            td: self.state.trust_domain.clone(),
            ns: namespace.to_string(),
            svc: service.to_string(),
            exp: unix_now() + ttl.as_secs(),
            reusable,
        };
        let t = self.token_key.mint(&claims);
        Ok((claims, t))
    }

    /// Checks a token: signature, expiry, revocation (`revoked`: the ids
    /// from [`Authority::revoked`]), and that it names an identity a token
    /// may grant (never the mesh's own namespace).
    pub fn verify_token(&self, token: &str, revoked: &[String]) -> Result<Claims, TokenError> {
        let claims = self.token_key.verify(token, unix_now())?;
        if revoked.contains(&claims.id) {
            return Err(TokenError::Revoked);
        }
        if claims.ns == SYSTEM_NAMESPACE
            || claims.td != self.state.trust_domain
            || !valid_label(&claims.ns)
            || !valid_label(&claims.svc)
        {
            return Err(TokenError::Malformed);
        }
        Ok(claims)
    }

    pub fn token_key(&self) -> &TokenKey {
        &self.token_key
    }

    /// The ids of revoked tokens.
    pub async fn revoked(kv: &dyn Kv) -> Result<Vec<String>, CaError> {
        let v = kv.get(REVOKED).await.map_err(io(REVOKED))?;
        Ok(v.map(|v| revoked_ids(&v.value)).unwrap_or_default())
    }

    /// Revokes a token by id: it can no longer register a proxy or obtain a
    /// certificate.
    pub async fn revoke(kv: &dyn Kv, id: &str) -> Result<(), CaError> {
        for _ in 0..100 {
            let current = kv.get(REVOKED).await.map_err(io(REVOKED))?;
            let mut ids = current
                .as_ref()
                .map(|v| revoked_ids(&v.value))
                .unwrap_or_default();
            if ids.iter().any(|r| r == id) {
                return Ok(());
            }
            ids.push(id.to_string());
            let text: String = ids.iter().map(|i| format!("{i}\n")).collect();
            let written = kv
                .put_if(REVOKED, current.map(|v| v.revision), text.as_bytes())
                .await
                .map_err(io(REVOKED))?;
            if written.is_some() {
                return Ok(());
            }
        }
        Err(CaError::Invalid(format!(
            "{REVOKED}: too many writers at once"
        )))
    }
}

impl Authority {
    /// Spends a single-use token on the key it certifies (`key`: a digest
    /// of the CSR's public key). The same key again is a retry and passes;
    /// any other key is a replay and is refused.
    pub async fn spend(kv: &dyn Kv, id: &str, key: &str) -> Result<(), SpendError> {
        for _ in 0..100 {
            let current = kv.get(USED).await.map_err(io(USED))?;
            let text = current
                .as_ref()
                .map(|v| String::from_utf8_lossy(&v.value).into_owned())
                .unwrap_or_default();
            for line in text.lines() {
                if let Some((used, with)) = line.split_once(' ') {
                    if used == id {
                        return if with == key {
                            Ok(())
                        } else {
                            Err(SpendError::Spent)
                        };
                    }
                }
            }
            let text = format!("{text}{id} {key}\n");
            let written = kv
                .put_if(USED, current.map(|v| v.revision), text.as_bytes())
                .await
                .map_err(io(USED))?;
            if written.is_some() {
                return Ok(());
            }
        }
        Err(CaError::Invalid(format!("{USED}: too many writers at once")).into())
    }
}

/// Why a single-use token could not be spent.
#[derive(Debug, thiserror::Error)]
pub enum SpendError {
    #[error("the token was already used (it is single-use: mint another, or a reusable one with `tandem token create --reusable`)")]
    Spent,
    #[error(transparent)]
    Store(#[from] CaError),
}

/// The lineage of a leaf: the join token it descends from
/// ([`CONTROL_LINEAGE`] for the control plane's own), read from its
/// subject. Only meaningful on a certificate whose chain was verified.
pub fn lineage(leaf: &[u8]) -> Option<String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, c) = X509Certificate::from_der(leaf).ok()?;
    let ou = c.subject().iter_organizational_unit().next()?;
    ou.as_str()
        .ok()?
        .strip_prefix(LINEAGE_PREFIX)
        .map(String::from)
}

/// A digest of a CSR's public key (hex SHA-256), what a single-use token is
/// bound to.
pub fn csr_key_digest(csr: &[u8]) -> Result<String, CaError> {
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::prelude::FromDer;
    let (_, req) = X509CertificationRequest::from_der(csr)
        .map_err(|e| CaError::Invalid(format!("the CSR is not valid: {e}")))?;
    let spki = req.certification_request_info.subject_pki.raw;
    Ok(hex(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        spki,
    )
    .as_ref()))
}

fn revoked_ids(text: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(text)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

fn state_json(state: &State) -> Vec<u8> {
    serde_json::to_vec_pretty(state).unwrap_or_default()
}

fn leaf_params(id: &SpiffeId, lifetime: Duration) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Tandem");
    dn.push(DnType::CommonName, id.service.clone());
    params.distinguished_name = dn;
    params.subject_alt_names =
        vec![SanType::URI(id.uri().try_into().map_err(|_| {
            CaError::Invalid(format!("`{id}` is not a valid URI"))
        })?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + lifetime).into();
    params.serial_number = Some(random_serial()?);
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// A key pair and CSR made by the side that will hold the key; only the CSR
/// leaves it.
pub fn new_csr(id: &SpiffeId) -> Result<(Vec<u8>, PrivateKeyDer<'static>), CaError> {
    let key = KeyPair::generate()?;
    let params = leaf_params(id, Duration::from_secs(3600))?;
    let mut req = CertificateParams::default();
    req.distinguished_name = params.distinguished_name;
    req.subject_alt_names = params.subject_alt_names;
    let csr = req.serialize_request(&key)?;
    let der = PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| CaError::Invalid(e.to_string()))?;
    Ok((csr.der().to_vec(), der))
}

fn import_root(cert: &Path, key: &Path) -> Result<(CertificateDer<'static>, KeyPair), CaError> {
    let pem = std::fs::read(cert).map_err(io(cert.display()))?;
    let der = CertificateDer::from_pem_slice(&pem)
        .map_err(|e| CaError::Invalid(format!("{}: {e}", cert.display())))?;
    let k = std::fs::read_to_string(key).map_err(io(key.display()))?;
    let kp =
        KeyPair::from_pem(&k).map_err(|e| CaError::Invalid(format!("{}: {e}", key.display())))?;
    // Issuing with it must work: check now rather than at the first CSR.
    Issuer::from_ca_cert_der(&der, &kp).map_err(|e| {
        CaError::Invalid(format!(
            "{}: not a usable CA certificate: {e}",
            cert.display()
        ))
    })?;
    Ok((der, kp))
}

async fn save_root(
    kv: &dyn Kv,
    id: &str,
    der: &CertificateDer<'_>,
    key: &KeyPair,
) -> Result<(), CaError> {
    let (kk, ck) = (key_key(id), cert_key(id));
    kv.put(&kk, key.serialize_pem().as_bytes())
        .await
        .map_err(io(&kk))?;
    kv.put(&ck, pem("CERTIFICATE", der).as_bytes())
        .await
        .map_err(io(&ck))?;
    Ok(())
}

pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The URI SANs a CSR asks for (used to refuse a request for another
/// identity with a clear error; the certificate never carries them anyway).
pub fn csr_requested_uris(csr: &[u8]) -> Result<Vec<String>, CaError> {
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::prelude::FromDer;
    let (_, req) = X509CertificationRequest::from_der(csr)
        .map_err(|_| CaError::Invalid("the CSR does not parse".into()))?;
    let mut out = Vec::new();
    if let Some(exts) = req.requested_extensions() {
        for e in exts {
            if let ParsedExtension::SubjectAlternativeName(san) = e {
                for n in &san.general_names {
                    if let GeneralName::URI(u) = n {
                        out.push(u.to_string());
                    }
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spiffe::check_svid;
    use tandem_store::{LocalDir, Memory};

    fn scratch(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("tandem-ca-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[tokio::test]
    async fn issued_certificates_are_svids() {
        let dir = scratch("svid");
        let kv = LocalDir::open(&dir).expect("dir");
        let ca = Authority::open(&kv, None, None).await.expect("create");
        let id = SpiffeId::new(DEFAULT_TRUST_DOMAIN, "default", "orders");
        let (csr, _key) = new_csr(&id).expect("csr");
        let issued = ca
            .issue_csr(&csr, &id, "t1", Duration::from_secs(60))
            .expect("issue");
        assert_eq!(check_svid(&issued.chain[0], DEFAULT_TRUST_DOMAIN), Ok(id));
        // Keys are private to the owner, where they always were.
        let meta = std::fs::metadata(dir.join("ca").join(format!("{}.key", ca.signer_id())))
            .expect("key file");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // A second open loads the same CA; another trust domain is refused.
        let again = Authority::open(&kv, Some(DEFAULT_TRUST_DOMAIN), None)
            .await
            .expect("reopen");
        assert_eq!(again.signer_id(), ca.signer_id());
        assert!(Authority::open(&kv, Some("other.org"), None).await.is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn reserved_namespace_and_oldest_root_for_the_control_plane() {
        let kv = Memory::default();
        let ca = Authority::open(&kv, None, None).await.expect("create");
        // No token for the mesh's own namespace, minted or forged with the key.
        assert!(ca
            .mint_token(SYSTEM_NAMESPACE, "control", Duration::from_secs(60), false)
            .is_err());
        let forged = ca.token_key().mint(&Claims {
            id: "x".into(),
            td: DEFAULT_TRUST_DOMAIN.into(),
            ns: SYSTEM_NAMESPACE.into(),
            svc: "control".into(),
            exp: unix_now() + 60,
            reusable: false,
        });
        assert_eq!(ca.verify_token(&forged, &[]), Err(TokenError::Malformed));
        let (claims, ok) = ca
            .mint_token("default", "web", Duration::from_secs(60), false)
            .expect("mint");
        assert_eq!(ca.verify_token(&ok, &[]).expect("valid").svc, "web");
        // Revoked: refused.
        Authority::revoke(&kv, &claims.id).await.expect("revoke");
        Authority::revoke(&kv, &claims.id).await.expect("again");
        let revoked = Authority::revoked(&kv).await.expect("list");
        assert_eq!(revoked, vec![claims.id.clone()]);
        assert_eq!(ca.verify_token(&ok, &revoked), Err(TokenError::Revoked));
        // After a rotation the new root signs proxies' certificates, while
        // the control plane's own stays under the oldest root until retire.
        let old = ca.signer_id().to_string();
        let (ca, new) = ca.add_root(&kv).await.expect("add");
        assert_eq!(ca.signer_id(), old, "a new root does not sign yet");
        let ca = Authority::promote(&kv, &new).await.expect("promote");
        let id = SpiffeId::new(DEFAULT_TRUST_DOMAIN, "default", "web");
        let (csr, _) = new_csr(&id).expect("csr");
        assert_eq!(
            ca.issue_csr(&csr, &id, "t1", Duration::from_secs(60))
                .expect("issue")
                .signer,
            new
        );
        let control = SpiffeId::control(DEFAULT_TRUST_DOMAIN);
        let (own, _) = ca
            .issue_local(&control, Duration::from_secs(60))
            .expect("own");
        assert_eq!(own.signer, old);
        let (ca, retired) = Authority::retire_others(&kv).await.expect("retire");
        assert_eq!(retired, vec![old.clone()]);
        let (own, _) = ca
            .issue_local(&control, Duration::from_secs(60))
            .expect("own");
        assert_eq!(own.signer, new);
        assert!(kv.get(&key_key(&old)).await.expect("io").is_none());
        assert!(kv
            .get(&format!("{}.retired", cert_key(&old)))
            .await
            .expect("io")
            .is_some());
    }

    #[tokio::test]
    async fn leaves_carry_their_lineage_and_a_capped_lifetime() {
        let kv = Memory::default();
        let ca = Authority::open(&kv, None, None).await.expect("create");
        let id = SpiffeId::new(DEFAULT_TRUST_DOMAIN, "default", "web");
        let (csr, _) = new_csr(&id).expect("csr");
        let week = MAX_CERT_LIFETIME.as_secs();
        let issued = ca
            .issue_csr(&csr, &id, "abc123", Duration::from_secs(30 * 86400))
            .expect("issue");
        assert_eq!(lineage(&issued.chain[0]).as_deref(), Some("abc123"));
        let (from, to) = crate::tls::validity(&issued.chain[0]).expect("validity");
        let life = to.duration_since(from).expect("order").as_secs();
        assert!(life <= week + BACKDATE.as_secs(), "{life}");
        let (own, _) = ca
            .issue_local(
                &SpiffeId::control(DEFAULT_TRUST_DOMAIN),
                Duration::from_secs(60),
            )
            .expect("own");
        assert_eq!(lineage(&own.chain[0]).as_deref(), Some(CONTROL_LINEAGE));
        // Never past the root: an imported root with two hours left.
        let dir = scratch("short-root");
        std::fs::create_dir_all(&dir).expect("dir");
        let (der, key) = root_for("short.org", Duration::from_secs(7200)).expect("root");
        let (cp, kp) = (dir.join("r.crt"), dir.join("r.key"));
        std::fs::write(&cp, pem("CERTIFICATE", &der)).expect("write");
        std::fs::write(&kp, key.serialize_pem()).expect("write");
        let kv = LocalDir::open(&dir.join("data")).expect("dir");
        let ca = Authority::open(&kv, Some("short.org"), Some((&cp, &kp)))
            .await
            .expect("import");
        let id = SpiffeId::new("short.org", "default", "web");
        let (csr, _) = new_csr(&id).expect("csr");
        let issued = ca
            .issue_csr(&csr, &id, "t", Duration::from_secs(86400))
            .expect("issue");
        let (_, root_end) = crate::tls::validity(&der).expect("root validity");
        let (_, leaf_end) = crate::tls::validity(&issued.chain[0]).expect("leaf validity");
        assert!(leaf_end <= root_end, "{leaf_end:?} > {root_end:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn only_p256_keys_are_certified() {
        let kv = Memory::default();
        let ca = Authority::open(&kv, None, None).await.expect("create");
        let id = SpiffeId::new(DEFAULT_TRUST_DOMAIN, "default", "web");
        for alg in [&rcgen::PKCS_ED25519, &rcgen::PKCS_ECDSA_P384_SHA384] {
            let key = KeyPair::generate_for(alg).expect("key");
            let csr = CertificateParams::default()
                .serialize_request(&key)
                .expect("csr");
            let e = ca
                .issue_csr(csr.der(), &id, "t", Duration::from_secs(60))
                .err()
                .expect("refused");
            assert!(e.to_string().contains("P-256"), "{e}");
        }
    }

    #[tokio::test]
    async fn a_single_use_token_certifies_one_key() {
        let kv = Memory::default();
        Authority::spend(&kv, "t1", "key-a")
            .await
            .expect("first use");
        // The same key again is the proxy retrying after a lost answer.
        Authority::spend(&kv, "t1", "key-a").await.expect("retry");
        assert!(matches!(
            Authority::spend(&kv, "t1", "key-b").await,
            Err(SpendError::Spent)
        ));
        Authority::spend(&kv, "t2", "key-b")
            .await
            .expect("another token");
        let id = SpiffeId::new(DEFAULT_TRUST_DOMAIN, "default", "web");
        let (c1, _) = new_csr(&id).expect("csr");
        let (c2, _) = new_csr(&id).expect("csr");
        assert_eq!(
            csr_key_digest(&c1).expect("digest"),
            csr_key_digest(&c1).expect("digest")
        );
        assert_ne!(
            csr_key_digest(&c1).expect("digest"),
            csr_key_digest(&c2).expect("digest")
        );
    }

    #[tokio::test]
    async fn two_writers_adding_roots_keep_both() {
        let kv = Memory::default();
        let a = Authority::open(&kv, None, None).await.expect("create");
        let b = Authority::load(&kv).await.expect("load");
        // Both read the same state; each adds a root.
        let (_, r1) = a.add_root(&kv).await.expect("a");
        let (ca, r2) = b.add_root(&kv).await.expect("b");
        let ids = ca.root_ids();
        assert!(ids.contains(&r1) && ids.contains(&r2), "{ids:?}");
        assert_eq!(ids.len(), 3);
    }

    #[tokio::test]
    async fn an_imported_root_signs() {
        let dir = scratch("import");
        std::fs::create_dir_all(&dir).expect("dir");
        let (der, key) = new_root("example.org").expect("root");
        let (cp, kp) = (dir.join("given.crt"), dir.join("given.key"));
        std::fs::write(&cp, pem("CERTIFICATE", &der)).expect("write");
        std::fs::write(&kp, key.serialize_pem()).expect("write");
        let kv = LocalDir::open(&dir.join("data")).expect("dir");
        let ca = Authority::open(&kv, Some("example.org"), Some((&cp, &kp)))
            .await
            .expect("import");
        assert_eq!(ca.bundle(), vec![der.clone()]);
        let id = SpiffeId::new("example.org", "default", "web");
        let (csr, _) = new_csr(&id).expect("csr");
        let issued = ca
            .issue_csr(&csr, &id, "t1", Duration::from_secs(60))
            .expect("issue");
        assert_eq!(issued.signer, root_id(&der));
        // Reopening with the same pair is fine; with another CA it is refused.
        assert!(Authority::open(&kv, None, Some((&cp, &kp))).await.is_ok());
        let (other, okey) = new_root("example.org").expect("root");
        std::fs::write(&cp, pem("CERTIFICATE", &other)).expect("write");
        std::fs::write(&kp, okey.serialize_pem()).expect("write");
        assert!(Authority::open(&kv, None, Some((&cp, &kp))).await.is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
