//! The control plane's certificate authority at work: the `Identity` gRPC
//! service (trust bundle with proof, CSR signing against join tokens), the
//! control plane's own serving certificate, the trust bundle pushed in every
//! snapshot, and root rotation:
//!
//! 1. `rotate` adds a new root to the bundle; the old root still signs.
//! 2. Once every connected proxy has acknowledged a snapshot carrying the
//!    new bundle (or after [`PROMOTE_WAIT`]), the new root starts signing
//!    and the snapshots say so; each proxy renews under it.
//! 3. `retire` removes the old root once no proxy still uses a certificate
//!    it signed.
//!
//! The rules of each step are [`crate::rotation`]'s; the CA's material and
//! its changes go through the store (`tandem_store::Kv`), and the phase is
//! read off the stored roots, so a restart in the middle of a rotation
//! resumes it.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tandem_api::v1::identity_server::Identity;
use tandem_api::v1::{BundleRequest, BundleResponse, Certificate, CertifyRequest, CertifyResponse};
use tandem_config::snapshot::Trust;
use tandem_identity::ca::{csr_requested_uris, pem, unix_now, Authority, SpendError};
use tandem_identity::tls::TlsIdentity;
use tandem_identity::token;
use tandem_identity::SpiffeId;
use tandem_runtime::sync::{Mutex, MutexGuard};
use tandem_store::etcd::Leadership;
use tandem_store::Kv;
use tonic::{Request, Response, Status};

use crate::mesh::Mesh;
use crate::rotation::{Phase, Rotation, Step};

/// Longest wait for every proxy to learn a new root before it signs.
pub const PROMOTE_WAIT: Duration = Duration::from_secs(30);

pub struct Ca {
    /// The CA as last read from the store; replaced after each change.
    authority: Mutex<Authority>,
    kv: Arc<dyn Kv>,
    /// Lifetime of the certificates issued.
    pub lifetime: Duration,
    /// The control plane's own identity, for its gRPC port.
    pub tls: Arc<TlsIdentity>,
    mesh: Arc<Mesh>,
    rotation: Mutex<Rotation>,
    /// Held through each rotation step (rotate, promote, retire), so they
    /// never interleave.
    steps: tokio::sync::Mutex<()>,
    /// Peers' chains may pass through intermediate CAs (told to proxies in
    /// every snapshot's trust).
    intermediates: bool,
    /// Revoked join tokens, as last read (told to proxies too: they refuse
    /// certificates issued under them).
    revoked_tokens: Mutex<Vec<String>>,
    /// Promotion is the leader's step (with replicas sharing a store).
    leadership: Leadership,
    /// The root this control plane waits to promote, if any.
    promoting: Mutex<Option<String>>,
}

#[derive(Debug, Serialize)]
pub struct CaInfo {
    pub trust_domain: String,
    pub roots: Vec<String>,
    pub signer: String,
    pub cert_lifetime_seconds: u64,
    pub rotation: Rotation,
    pub bundle_pem: String,
}

impl Ca {
    pub fn new(
        authority: Authority,
        kv: Arc<dyn Kv>,
        lifetime: Duration,
        intermediates: bool,
        mesh: Arc<Mesh>,
        leadership: Leadership,
    ) -> anyhow::Result<Arc<Ca>> {
        let tls = TlsIdentity::new(authority.trust_domain(), authority.bundle())?;
        tls.set_allow_intermediates(intermediates);
        let rotation = Rotation::of(&authority.root_ids(), authority.signer_id());
        let ca = Arc::new(Ca {
            authority: Mutex::new(authority),
            kv,
            lifetime,
            tls,
            mesh,
            rotation: Mutex::new(rotation),
            steps: tokio::sync::Mutex::new(()),
            intermediates,
            revoked_tokens: Mutex::new(Vec::new()),
            leadership,
            promoting: Mutex::new(None),
        });
        ca.issue_own()?;
        Ok(ca)
    }

    /// Carries on with a rotation in progress: one a restart interrupted,
    /// or one another replica started.
    pub fn resume(self: &Arc<Self>) {
        let r = self.rotation().clone();
        if let (Phase::Distributing, Some(root)) = (r.phase, r.new_root) {
            {
                let mut p = self.promoting.lock();
                if p.as_deref() == Some(root.as_str()) {
                    return;
                }
                *p = Some(root.clone());
            }
            tracing::info!(root = %root, "root rotation in progress: waiting for proxies to acknowledge the new bundle");
            let me = self.clone();
            tokio::spawn(async move { me.promote_when_distributed(root).await });
        }
    }

    fn authority(&self) -> MutexGuard<'_, Authority> {
        self.authority.lock()
    }

    fn rotation(&self) -> MutexGuard<'_, Rotation> {
        self.rotation.lock()
    }

    pub fn trust(&self) -> Trust {
        let a = self.authority();
        Trust {
            roots: a.bundle().iter().map(|d| pem("CERTIFICATE", d)).collect(),
            signer: a.signer_id().to_string(),
            intermediates: self.intermediates,
            revoked: self.revoked_tokens.lock().clone(),
        }
    }

    /// Pushes the current bundle to every proxy; returns its generation.
    pub fn publish(&self) -> u64 {
        let trust = self.trust();
        let ids = self.authority().root_ids();
        self.mesh.set_trust(trust, ids)
    }

    /// Takes in a change of the CA made elsewhere (another replica, the
    /// CLI): the new state is loaded, published and, mid-rotation, its
    /// next step awaited.
    async fn reload(self: &Arc<Self>) -> Result<(), String> {
        let _step = self.steps.lock().await;
        let authority = Authority::load(&*self.kv)
            .await
            .map_err(|e| e.to_string())?;
        let same = {
            let a = self.authority();
            a.root_ids() == authority.root_ids() && a.signer_id() == authority.signer_id()
        };
        if same {
            return Ok(());
        }
        tracing::info!(roots = ?authority.root_ids(), signer = %authority.signer_id(), "certificate authority changed in the store");
        *self.rotation() = Rotation::of(&authority.root_ids(), authority.signer_id());
        let _ = self.tls.set_bundle(authority.bundle());
        *self.authority() = authority;
        if let Err(e) = self.issue_own() {
            tracing::error!(error = %e, "cannot re-issue the control plane's certificate");
        }
        self.publish();
        drop(_step);
        self.resume();
        Ok(())
    }

    /// (Re-)issues the control plane's own serving certificate.
    fn issue_own(&self) -> anyhow::Result<()> {
        let (issued, key) = {
            let a = self.authority();
            self.tls.set_bundle(a.bundle())?;
            a.issue_local(&SpiffeId::control(a.trust_domain()), self.lifetime)?
        };
        self.tls.set_cert(issued.chain, key, issued.signer)?;
        Ok(())
    }

    /// Keeps the control plane's own certificate fresh: renewed at 70 % of
    /// its life (and by `retire`, when its root changes).
    pub async fn renew_own(self: Arc<Self>) {
        loop {
            let wait = self
                .tls
                .leaf()
                .and_then(|l| {
                    let total = self.lifetime.mul_f64(0.7);
                    let left = l.not_after.duration_since(SystemTime::now()).ok()?;
                    Some(total.min(left.mul_f64(0.7)))
                })
                .unwrap_or(Duration::from_secs(1));
            tokio::time::sleep(wait).await;
            if let Err(e) = self.issue_own() {
                tracing::error!(error = %e, "cannot renew the control plane's certificate");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }

    pub fn info(&self) -> CaInfo {
        // Lock order: rotation before authority (as in `rotate`), never both
        // the other way round.
        let rotation = self.rotation().clone();
        let a = self.authority();
        CaInfo {
            trust_domain: a.trust_domain().to_string(),
            roots: a.root_ids(),
            signer: a.signer_id().to_string(),
            cert_lifetime_seconds: self.lifetime.as_secs(),
            rotation,
            bundle_pem: a.bundle_pem(),
        }
    }

    /// The ids of revoked tokens (the CLI may add some at any time).
    async fn revoked(&self) -> Result<Vec<String>, Status> {
        Authority::revoked(&*self.kv)
            .await
            .map_err(|e| Status::unavailable(format!("cannot read revocations: {e}")))
    }

    /// Checks that the join token a certificate descends from is not
    /// revoked (the control plane's own lineage never registers).
    pub async fn check_lineage(&self, lineage: &str) -> Result<(), Status> {
        if lineage == tandem_identity::ca::CONTROL_LINEAGE {
            return Err(Status::permission_denied(
                "the control plane's certificate does not register proxies",
            ));
        }
        if self.revoked().await?.iter().any(|r| r == lineage) {
            return Err(Status::unauthenticated(
                "certificate refused: the join token it was issued under was revoked",
            ));
        }
        Ok(())
    }

    /// Follows the revocation list (the CLI writes it, beside a running
    /// control plane): proxies whose join token is revoked are expelled
    /// within `every`, and every proxy is told to refuse their
    /// certificates (the list travels with the trust bundle).
    pub async fn follow_revocations(self: Arc<Self>, every: Duration) {
        let mut seen: Vec<String> = Vec::new();
        let mut state: Option<Vec<u8>> = None;
        loop {
            match self.kv.get(tandem_identity::ca::STATE).await {
                Ok(Some(v)) if state.as_ref() != Some(&v.value) => {
                    if state.is_some() {
                        if let Err(e) = self.reload().await {
                            tracing::warn!(error = %e, "cannot load the changed certificate authority");
                        }
                    }
                    state = Some(v.value);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the certificate authority's state")
                }
            }
            match self.revoked().await {
                Ok(revoked) if revoked != seen => {
                    self.mesh.expel(&revoked).await;
                    *self.revoked_tokens.lock() = revoked.clone();
                    self.publish();
                    seen = revoked;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e.message(), "cannot read revocations"),
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Step 1 of a root rotation; step 2 follows by itself.
    pub async fn rotate(self: &Arc<Self>) -> Result<Rotation, String> {
        let _step = self.steps.lock().await;
        self.rotation().can_start()?;
        let current = Authority::load(&*self.kv)
            .await
            .map_err(|e| e.to_string())?;
        let (authority, new_root) = current
            .add_root(&*self.kv)
            .await
            .map_err(|e| e.to_string())?;
        *self.rotation() = Rotation::of(&authority.root_ids(), authority.signer_id());
        let _ = self.tls.set_bundle(authority.bundle());
        *self.authority() = authority;
        tracing::info!(root = %new_root, "root rotation: new root added to the trust bundle");
        self.publish();
        drop(_step);
        self.resume();
        Ok(self.rotation().clone())
    }

    async fn promote_when_distributed(self: Arc<Self>, root: String) {
        let mut leadership = self.leadership.clone();
        let mut start = Instant::now();
        loop {
            // Promoted (or started over) meanwhile, here or elsewhere.
            let r = self.rotation().clone();
            if r.phase != Phase::Distributing || r.new_root.as_deref() != Some(root.as_str()) {
                *self.promoting.lock() = None;
                return;
            }
            if !leadership.is_leader() {
                tokio::select! {
                    _ = leadership.until_leader() => start = Instant::now(),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
            let pending = match self.mesh.trust_pending(&root).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "root rotation: cannot read the registry");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let step = self.rotation().step(pending, start.elapsed(), PROMOTE_WAIT);
            match step {
                Step::Wait => tokio::time::sleep(Duration::from_millis(200)).await,
                Step::Promote => break,
                Step::PromoteAnyway(pending) => {
                    tracing::warn!(?pending, "root rotation: proxies did not acknowledge the new bundle in time; promoting anyway");
                    break;
                }
            }
        }
        let _step = self.steps.lock().await;
        match Authority::promote(&*self.kv, &root).await {
            Ok(authority) => {
                // The control plane's own certificate stays under the
                // oldest root until that one is retired, so proxies that
                // missed the new bundle can still reach it and catch up.
                *self.rotation() = Rotation::of(&authority.root_ids(), authority.signer_id());
                *self.authority() = authority;
            }
            Err(e) => {
                tracing::error!(error = %e, "root rotation: cannot promote the new root");
                self.rotation().phase = Phase::Failed;
                return;
            }
        }
        tracing::info!(root = %root, "root rotation: new root signs; proxies renew under it");
        self.publish();
    }

    /// Step 3: removes every root but the signing one.
    pub async fn retire(&self, force: bool) -> Result<Vec<String>, String> {
        let _step = self.steps.lock().await;
        let others: Vec<String> = {
            let a = self.authority();
            let signer = a.signer_id().to_string();
            a.root_ids().into_iter().filter(|r| *r != signer).collect()
        };
        if others.is_empty() {
            return Ok(Vec::new());
        }
        let users = self.mesh.certificates_signed_by(&others);
        self.rotation().can_retire(&users, force)?;
        let (authority, retired) = Authority::retire_others(&*self.kv)
            .await
            .map_err(|e| e.to_string())?;
        *self.rotation() = Rotation::of(&authority.root_ids(), authority.signer_id());
        *self.authority() = authority;
        tracing::info!(?retired, "roots retired");
        // The oldest root is now the signing one: the control plane's own
        // certificate moves under it.
        if let Err(e) = self.issue_own() {
            tracing::error!(error = %e, "cannot re-issue the control plane's certificate");
        }
        self.publish();
        Ok(retired)
    }
}

/// A CSR may ask for nothing but the identity it gets (a clear refusal;
/// the certificate never carries what it asks anyway).
fn check_asks(csr: &[u8], id: &SpiffeId, what: &str) -> Result<(), Status> {
    let asked = csr_requested_uris(csr).map_err(|e| Status::invalid_argument(e.to_string()))?;
    if let Some(other) = asked.iter().find(|u| **u != id.uri()) {
        return Err(Status::permission_denied(format!(
            "{what} is for {id}, the CSR asks for {other}"
        )));
    }
    Ok(())
}

pub struct IdentityService {
    pub ca: Arc<Ca>,
    pub mesh: Arc<Mesh>,
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn bundle(
        &self,
        request: Request<BundleRequest>,
    ) -> Result<Response<BundleResponse>, Status> {
        let claims_part = request.into_inner().claims;
        let revoked = self.ca.revoked().await?;
        let (roots, mac, td) = {
            let a = self.ca.authority();
            // Only the claims travel here: the channel is not yet verified
            // by the caller, so it must not see the token itself.
            let claims = token::decode_claims(&claims_part)
                .map_err(|_| Status::invalid_argument("the token's claims do not parse"))?;
            if claims.exp <= unix_now() {
                return Err(Status::unauthenticated(
                    "join token refused: the token expired",
                ));
            }
            if revoked.contains(&claims.id) {
                return Err(Status::unauthenticated(
                    "join token refused: the token was revoked",
                ));
            }
            (
                a.bundle(),
                a.token_key().mac_for(&claims_part),
                a.trust_domain().to_string(),
            )
        };
        let proof = token::bundle_proof(&mac, &roots);
        Ok(Response::new(BundleResponse {
            roots: roots.into_iter().map(|r| r.to_vec()).collect(),
            proof,
            trust_domain: td,
        }))
    }

    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let peer = crate::discovery::peer_of(&request);
        let req = request.into_inner();
        // Who the certificate is for, and the token it descends from: a
        // join token on first use, the current certificate afterwards.
        // A single-use token is spent only once the CSR proved good.
        let (id, lineage, single_use) = if !req.token.is_empty() {
            let revoked = self.ca.revoked().await?;
            let claims = {
                let a = self.ca.authority();
                a.verify_token(&req.token, &revoked)
                    .map_err(|e| Status::unauthenticated(format!("join token refused: {e}")))?
            };
            let id = SpiffeId::new(&claims.td, &claims.ns, &claims.svc);
            check_asks(&req.csr, &id, "join token refused: it")?;
            (id, claims.id, !claims.reusable)
        } else if let Some(peer) = peer {
            self.ca.check_lineage(&peer.lineage).await?;
            check_asks(
                &req.csr,
                &peer.id,
                "refused: the certificate on this connection",
            )?;
            (peer.id, peer.lineage, false)
        } else {
            return Err(Status::unauthenticated(
                "a join token or a current certificate is needed",
            ));
        };
        let (issued, roots) = {
            let a = self.ca.authority();
            let issued = a
                .issue_csr(&req.csr, &id, &lineage, self.ca.lifetime)
                .map_err(|e| match e {
                    // A CSR that does not parse or verify: the caller's fault.
                    tandem_identity::ca::CaError::Invalid(m) => Status::invalid_argument(m),
                    other => Status::internal(format!("cannot sign: {other}")),
                })?;
            (issued, a.bundle())
        };
        if single_use {
            let key = tandem_identity::ca::csr_key_digest(&req.csr)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            Authority::spend(&*self.ca.kv, &lineage, &key)
                .await
                .map_err(|e| match e {
                    SpendError::Spent => {
                        tracing::warn!(token = %lineage, "a spent single-use join token was presented again");
                        Status::unauthenticated(format!("join token refused: {e}"))
                    }
                    SpendError::Store(e) => Status::unavailable(e.to_string()),
                })?;
        }
        let leaf = &issued.chain[0];
        let serial = tandem_identity::tls::serial(leaf);
        if !req.instance.is_empty() {
            self.mesh.set_certificate(
                &id.namespace,
                &id.service,
                &req.instance,
                Certificate {
                    spiffe_id: id.uri(),
                    not_after: issued
                        .not_after
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0),
                    signer: issued.signer.clone(),
                    serial,
                },
            );
        }
        tracing::info!(identity = %id, instance = %req.instance, signer = %issued.signer, "certificate issued");
        Ok(Response::new(CertifyResponse {
            chain: issued.chain.into_iter().map(|c| c.to_vec()).collect(),
            roots: roots.into_iter().map(|r| r.to_vec()).collect(),
            signer: issued.signer,
        }))
    }
}
