//! The proxy's identity: bootstrap (trust bundle, first certificate),
//! renewal at about 70 % of the certificate's life, and the TLS channel to
//! the control plane.
//!
//! Bootstrap with a join token and nothing else:
//! 1. Connect to the control plane over TLS without verifying it, and send
//!    only the token's claims (never the whole token). It answers with the
//!    trust bundle and an HMAC of it keyed by the token's MAC, which only
//!    the CA that minted the token can compute. The proxy checks that proof
//!    and pins the bundle. (With `--ca-bundle FILE` this step is skipped.)
//! 2. From then on every connection to the control plane verifies its
//!    certificate against the bundle and its SPIFFE ID.
//! 3. The proxy makes a key pair, sends a CSR with the token, and gets its
//!    certificate. The private key never leaves the process. A single-use
//!    token is spent on that key: retries send the same CSR.
//! 4. From then on the proxy presents its certificate on every connection
//!    to the control plane: its stream registers with it, and renewals are
//!    authenticated by it (the token is sent again only if the certificate
//!    expired, which a single-use token cannot cure).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tandem_api::v1::identity_client::IdentityClient;
use tandem_api::v1::{BundleRequest, CertifyRequest};
use tandem_identity::ca::new_csr;
use tandem_identity::spiffe::SYSTEM_NAMESPACE;
use tandem_identity::tls::{self, TlsIdentity, ALPN_H2};
use tandem_identity::token::{self, Claims};
use tandem_identity::SpiffeId;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tonic::transport::{Channel, Endpoint};

use crate::telemetry::metrics::{ConfigLabels, Metrics};

const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// What the proxy knows about itself.
pub(crate) struct Identity {
    pub(crate) tls: Arc<TlsIdentity>,
    pub(crate) claims: Claims,
    token: String,
    /// The control plane's replicas (`host:port` of their gRPC ports).
    control: Replicas,
    /// Renew now (a new signing root was announced).
    pub(crate) renew_now: Notify,
}

/// `http://host:port`, `https://host:port` or `host:port` → `host:port`.
pub(crate) fn control_addr(url: &str) -> String {
    let s = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .unwrap_or(url);
    s.trim_end_matches('/').to_string()
}

/// The control plane's replicas, from `--control a,b,c` (each a URL or
/// `host:port`; a host name with several addresses is tried address by
/// address when connecting). A proxy stays with the replica that answered
/// last and moves to the next one when it stops answering.
pub(crate) struct Replicas {
    addrs: Vec<String>,
    current: std::sync::atomic::AtomicUsize,
}

impl Replicas {
    pub(crate) fn parse(urls: &str) -> Replicas {
        Replicas {
            addrs: urls
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(control_addr)
                .collect(),
            current: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// A channel to the first replica that answers, from the current one
    /// on.
    async fn channel(&self, cfg: &Arc<rustls::ClientConfig>) -> anyhow::Result<(Channel, &str)> {
        use std::sync::atomic::Ordering;
        let n = self.addrs.len();
        if n == 0 {
            bail!("no control plane address given (--control)");
        }
        let start = self.current.load(Ordering::Relaxed);
        let mut errors = Vec::new();
        for i in 0..n {
            let k = (start + i) % n;
            match channel(&self.addrs[k], cfg.clone()).await {
                Ok(ch) => {
                    if k != start {
                        self.current.store(k, Ordering::Relaxed);
                        tracing::info!(control = %self.addrs[k], "moving to another control-plane replica");
                    }
                    return Ok((ch, &self.addrs[k]));
                }
                Err(e) => errors.push(format!("{}: {e:#}", self.addrs[k])),
            }
        }
        bail!("no control-plane replica answers ({})", errors.join("; "))
    }
}

/// A gRPC channel to the control plane over TLS with `cfg`, verifying the
/// server as the control plane of the trust domain.
pub async fn channel(control: &str, cfg: Arc<rustls::ClientConfig>) -> anyhow::Result<Channel> {
    let addr = control.to_string();
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let (addr, cfg) = (addr.clone(), cfg.clone());
        async move {
            let tcp = TcpStream::connect(&addr).await?;
            let _ = tcp.set_nodelay(true);
            let name: ServerName<'static> = tls::server_name(SYSTEM_NAMESPACE, "control");
            let s = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(TokioIo::new(s))
        }
    });
    let endpoint = Endpoint::from_shared(format!("http://{control}"))?
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    Ok(endpoint.connect_with_connector(connector).await?)
}

impl Identity {
    /// Gets the trust bundle and a first certificate, retrying until the
    /// control plane answers. Errors only on what retrying cannot fix.
    pub(crate) async fn bootstrap(
        control_url: &str,
        namespace: &str,
        service: &str,
        instance: &str,
        token: &str,
        pinned: Option<Vec<CertificateDer<'static>>>,
        metrics: &Metrics,
    ) -> anyhow::Result<Arc<Identity>> {
        let (claims, claims_part, mac) =
            token::inspect(token).context("the join token is malformed")?;
        if claims.ns != namespace || claims.svc != service {
            bail!(
                "the join token is for {}/{}, this proxy is {namespace}/{service}",
                claims.ns,
                claims.svc
            );
        }
        let control = Replicas::parse(control_url);
        let roots = match pinned {
            Some(r) => r,
            None => {
                let mut wait = RETRY_MIN;
                loop {
                    match fetch_bundle(&control, &claims_part, &mac).await {
                        Ok(r) => break r,
                        Err(e) if e.is::<Refused>() => return Err(e),
                        Err(e) => {
                            tracing::warn!(error = %e, control = %control_url, "cannot get the trust bundle yet; retrying");
                            tokio::time::sleep(wait).await;
                            wait = (wait * 2).min(RETRY_MAX);
                        }
                    }
                }
            }
        };
        let tls = TlsIdentity::new(&claims.td, roots).context("the trust bundle is not usable")?;
        let identity = Arc::new(Identity {
            tls,
            claims,
            token: token.to_string(),
            control,
            renew_now: Notify::new(),
        });
        // One key for every attempt: a single-use token is bound to the
        // first key it certifies, and an answer lost on the way must not
        // spend it for nothing.
        let (csr, key) = new_csr(&identity.spiffe_id())?;
        let mut wait = RETRY_MIN;
        loop {
            match identity
                .certify(instance, (csr.clone(), key.clone_key()), metrics)
                .await
            {
                Ok(()) => break,
                Err(e) if e.is::<Refused>() => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot get a certificate yet; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(RETRY_MAX);
                }
            }
        }
        Ok(identity)
    }

    pub(crate) fn spiffe_id(&self) -> SpiffeId {
        SpiffeId::new(&self.claims.td, &self.claims.ns, &self.claims.svc)
    }

    /// A channel to the control plane, verified against the bundle, on
    /// which this proxy presents its certificate (once it has one).
    pub(crate) async fn control_channel(&self) -> anyhow::Result<Channel> {
        let cfg = self.tls.client_config(&[ALPN_H2]);
        Ok(self.control.channel(&cfg).await?.0)
    }

    /// One certificate request with a new key.
    pub(crate) async fn renew(&self, instance: &str, metrics: &Metrics) -> anyhow::Result<()> {
        let csr = new_csr(&self.spiffe_id())?;
        self.certify(instance, csr, metrics).await
    }

    async fn certify(
        &self,
        instance: &str,
        csr: (Vec<u8>, PrivateKeyDer<'static>),
        metrics: &Metrics,
    ) -> anyhow::Result<()> {
        let result = self.certify_once(instance, csr).await;
        let label = if result.is_ok() { "issued" } else { "failed" };
        metrics
            .renewals
            .get_or_create(&ConfigLabels { result: label })
            .inc();
        result
    }

    async fn certify_once(
        &self,
        instance: &str,
        (csr, key): (Vec<u8>, PrivateKeyDer<'static>),
    ) -> anyhow::Result<()> {
        // With a current certificate, that is the credential; the token
        // only without one.
        let token = if self.tls.is_serving()
            && self
                .tls
                .leaf()
                .is_some_and(|l| l.not_after > SystemTime::now())
        {
            String::new()
        } else {
            self.token.clone()
        };
        let mut client = IdentityClient::new(self.control_channel().await?);
        let resp = client
            .certify(CertifyRequest {
                token,
                csr,
                instance: instance.to_string(),
            })
            .await
            .map_err(refused)?
            .into_inner();
        let roots: Vec<CertificateDer<'static>> =
            resp.roots.into_iter().map(CertificateDer::from).collect();
        self.tls.set_bundle(roots)?;
        let chain = resp.chain.into_iter().map(CertificateDer::from).collect();
        let leaf = self
            .tls
            .set_cert(chain, key, resp.signer)
            .context("the issued certificate does not verify")?;
        tracing::info!(identity = %leaf.id, signer = %leaf.signer, not_after = leaf.not_after_unix(), "certificate installed");
        Ok(())
    }
}

/// An answer that retrying cannot change (the token is refused).
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

fn refused(s: tonic::Status) -> anyhow::Error {
    match s.code() {
        tonic::Code::Unauthenticated
        | tonic::Code::PermissionDenied
        | tonic::Code::InvalidArgument => anyhow::Error::new(Refused(s.message().to_string())),
        _ => anyhow::anyhow!("{}: {}", s.code(), s.message()),
    }
}

async fn fetch_bundle(
    replicas: &Replicas,
    claims_part: &str,
    mac: &[u8],
) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let (ch, control) = replicas
        .channel(&tls::bootstrap_client_config(&[ALPN_H2]))
        .await?;
    let resp = IdentityClient::new(ch)
        .bundle(BundleRequest {
            claims: claims_part.to_string(),
        })
        .await
        .map_err(refused)?
        .into_inner();
    let roots: Vec<CertificateDer<'static>> =
        resp.roots.into_iter().map(CertificateDer::from).collect();
    if roots.is_empty() || !token::check_bundle_proof(mac, &roots, &resp.proof) {
        return Err(anyhow::Error::new(Refused(format!(
            "the server at {control} could not prove it minted this join token: it is not this mesh's control plane (or the token was minted by another one)"
        ))));
    }
    Ok(roots)
}

/// Renews at about 70 % of each certificate's life (with jitter, so a
/// fleet does not renew in lockstep), retries with backoff while the control
/// plane is unreachable, warns as expiry nears, and stops serving (never
/// plaintext) when the certificate expires.
pub(crate) async fn keep_fresh(
    identity: Arc<Identity>,
    instance: String,
    metrics: Arc<Metrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let (instance, metrics) = (&instance, &*metrics);
    loop {
        let Some(leaf) = identity.tls.leaf() else {
            return;
        };
        metrics.cert_expiry.set(leaf.not_after_unix() as i64);
        let now = SystemTime::now();
        let life = leaf
            .not_after
            .duration_since(leaf.issued_at)
            .unwrap_or(Duration::from_secs(60));
        let renew_at = leaf.issued_at + life.mul_f64(0.65 + fastrand::f64() * 0.1);
        let wait = renew_at.duration_since(now).unwrap_or(Duration::ZERO);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = identity.renew_now.notified() => {
                // Spread a fleet's renewals over a moment.
                tokio::time::sleep(Duration::from_millis(fastrand::u64(0..1500))).await;
            }
            _ = stop.changed() => return,
        }
        let mut backoff = Duration::from_secs(1);
        loop {
            match identity.renew(instance, metrics).await {
                Ok(()) => break,
                Err(e) => {
                    let left = leaf
                        .not_after
                        .duration_since(SystemTime::now())
                        .unwrap_or(Duration::ZERO);
                    if left.is_zero() {
                        if identity.tls.is_serving() {
                            tracing::error!(identity = %leaf.id, error = %e, "certificate expired and cannot be renewed: refusing mesh traffic until a new one is issued");
                        }
                        identity.tls.set_expired(true);
                    } else if left < life.mul_f64(0.3) {
                        tracing::warn!(identity = %leaf.id, expires_in = ?left, error = %e, "certificate expires soon and cannot be renewed");
                    } else {
                        tracing::info!(error = %e, "certificate renewal failed; retrying");
                    }
                    // Wake at expiry to stop serving on time.
                    let nap = if left.is_zero() {
                        backoff
                    } else {
                        backoff.min(left)
                    };
                    tokio::select! {
                        _ = tokio::time::sleep(nap) => {}
                        _ = stop.changed() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
}
