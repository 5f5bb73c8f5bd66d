//! The etcd client: the members, one channel each, and calls that move to
//! the next member when one is unreachable.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};

use super::pb::etcdserverpb as rpc;
use super::pb::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use super::pb::mvccpb::KeyValue;

/// `etcd://host:port[,host:port...][/prefix]`: the members a replica may
/// talk to, and the prefix of the mesh's keys (`/tandem` by default).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdUrl {
    pub endpoints: Vec<String>,
    pub prefix: String,
}

pub const DEFAULT_PREFIX: &str = "/tandem";

impl std::str::FromStr for EtcdUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let form = "etcd://host:port[,host:port...][/prefix]";
        let rest = s
            .strip_prefix("etcd://")
            .ok_or_else(|| format!("`{s}` is not an etcd URL ({form})"))?;
        let (hosts, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let mut endpoints = Vec::new();
        for h in hosts.split(',').map(str::trim).filter(|h| !h.is_empty()) {
            let port = h
                .rsplit_once(':')
                .and_then(|(host, p)| (!host.is_empty()).then_some(p))
                .and_then(|p| p.parse::<u16>().ok())
                .filter(|p| *p > 0);
            if port.is_none() {
                return Err(format!("etcd member `{h}` needs host:port ({form})"));
            }
            endpoints.push(h.to_string());
        }
        if endpoints.is_empty() {
            return Err(format!("`{s}` names no etcd member ({form})"));
        }
        if prefix.contains("//") || prefix.chars().any(|c| c.is_control() || c == ' ') {
            return Err(format!("`{prefix}` is not a usable key prefix ({form})"));
        }
        let prefix = if prefix.is_empty() {
            DEFAULT_PREFIX.to_string()
        } else {
            prefix.to_string()
        };
        Ok(EtcdUrl { endpoints, prefix })
    }
}

impl std::fmt::Display for EtcdUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "etcd://{}{}", self.endpoints.join(","), self.prefix)
    }
}

/// TLS towards etcd: the CA that signed the members' certificates, and the
/// client certificate when the members require one.
#[derive(Clone, Debug, Default)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl EtcdTls {
    fn client_config(&self) -> io::Result<Arc<rustls::ClientConfig>> {
        let bad = |what: &str, p: &PathBuf, e: &dyn std::fmt::Display| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("etcd {what} {}: {e}", p.display()),
            )
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&self.ca).map_err(|e| bad("CA", &self.ca, &e))? {
            let c = c.map_err(|e| bad("CA", &self.ca, &e))?;
            roots.add(c).map_err(|e| bad("CA", &self.ca, &e))?;
        }
        if roots.is_empty() {
            return Err(bad("CA", &self.ca, &"no certificate in the file"));
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(io::Error::other)?
            .with_root_certificates(roots);
        let mut cfg = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .map_err(|e| bad("certificate", cert, &e))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| bad("certificate", cert, &e))?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| bad("key", key, &e))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| bad("certificate", cert, &e))?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "an etcd client certificate needs its key, and a key its certificate",
                ))
            }
        };
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// How long one call to one member may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a call goes round the members while they answer without a
/// leader (an election takes about one election timeout, 1 s by default).
const RETRY_FOR: Duration = Duration::from_secs(5);
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// A client of one etcd cluster. Cheap to clone.
#[derive(Clone)]
pub struct Etcd {
    inner: Arc<Inner>,
}

struct Inner {
    url: EtcdUrl,
    members: Vec<Channel>,
    /// The member the next call goes to first.
    current: AtomicUsize,
}

/// One member's answer to a status call.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MemberStatus {
    pub endpoint: String,
    /// `None` when the member did not answer.
    pub version: Option<String>,
    pub leader: bool,
    pub db_size: i64,
    pub error: Option<String>,
}

impl Etcd {
    /// A client of the members in `url`; connects on first use.
    pub fn new(url: &EtcdUrl, tls: Option<&EtcdTls>) -> io::Result<Etcd> {
        let tls = tls.map(EtcdTls::client_config).transpose()?;
        let mut members = Vec::new();
        for addr in &url.endpoints {
            let endpoint = Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?
                .connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(3))
                .keep_alive_while_idle(true);
            let channel = match &tls {
                None => endpoint.connect_lazy(),
                Some(cfg) => {
                    let (addr, cfg) = (addr.clone(), cfg.clone());
                    endpoint.connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
                        let (addr, cfg) = (addr.clone(), cfg.clone());
                        async move {
                            let host = addr.rsplit_once(':').map_or(addr.as_str(), |h| h.0);
                            let host = host.trim_start_matches('[').trim_end_matches(']');
                            let name = ServerName::try_from(host.to_string())
                                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                            let tcp = tokio::net::TcpStream::connect(&addr).await?;
                            let _ = tcp.set_nodelay(true);
                            let tls = tokio_rustls::TlsConnector::from(cfg)
                                .connect(name, tcp)
                                .await?;
                            Ok::<_, io::Error>(TokioIo::new(tls))
                        }
                    }))
                }
            };
            members.push(channel);
        }
        Ok(Etcd {
            inner: Arc::new(Inner {
                url: url.clone(),
                members,
                current: AtomicUsize::new(0),
            }),
        })
    }

    pub fn url(&self) -> &EtcdUrl {
        &self.inner.url
    }

    /// The full key of `path` under the mesh's prefix.
    pub(crate) fn key(&self, path: &str) -> Vec<u8> {
        format!("{}/{}", self.inner.url.prefix, path.trim_start_matches('/')).into_bytes()
    }

    /// `key` without the mesh's prefix and `under/`.
    pub(crate) fn strip<'k>(&self, key: &'k [u8], under: &str) -> Option<&'k str> {
        let p = format!("{}/{}/", self.inner.url.prefix, under.trim_matches('/'));
        std::str::from_utf8(key.strip_prefix(p.as_bytes())?).ok()
    }

    /// Runs `call` on a member: the current one first, then each other,
    /// while they are unreachable, time out or have no leader; the members
    /// are gone round again (every 200 ms, for up to [`RETRY_FOR`]) so that
    /// a call made while the members elect a new leader waits for it.
    /// Members that all refuse connections fail the call at once.
    pub(crate) async fn call<T, F, Fut>(&self, what: &str, mut call: F) -> io::Result<T>
    where
        F: FnMut(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let n = self.inner.members.len();
        let began = tokio::time::Instant::now();
        let mut last = String::new();
        loop {
            let start = self.inner.current.load(Ordering::Relaxed);
            // Whether a member answered at all (with no leader, say).
            let mut answered = false;
            for i in 0..n {
                let m = (start + i) % n;
                let channel = self.inner.members[m].clone();
                match tokio::time::timeout(CALL_TIMEOUT, call(channel)).await {
                    Ok(Ok(t)) => {
                        if i > 0 {
                            self.inner.current.store(m, Ordering::Relaxed);
                            tracing::info!(member = %self.inner.url.endpoints[m], "etcd: now using this member");
                        }
                        return Ok(t);
                    }
                    Ok(Err(s)) if !retryable(&s) => {
                        return Err(io::Error::other(format!(
                            "etcd {what}: {}: {}",
                            self.inner.url.endpoints[m],
                            s.message()
                        )))
                    }
                    Ok(Err(s)) => {
                        answered |= s.code() != tonic::Code::Unavailable || !unreachable(&s);
                        last = format!("{}: {}", self.inner.url.endpoints[m], status_text(&s))
                    }
                    Err(_) => {
                        last = format!(
                            "{}: no answer in {}s",
                            self.inner.url.endpoints[m],
                            CALL_TIMEOUT.as_secs()
                        )
                    }
                }
            }
            if !answered || began.elapsed() + RETRY_PAUSE > RETRY_FOR {
                return Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    format!("etcd is unreachable ({what}; last: {last})"),
                ));
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// The keys at `key` (or under it, with `prefix`), and the store's
    /// revision when read.
    pub(crate) async fn range(
        &self,
        key: Vec<u8>,
        prefix: bool,
    ) -> io::Result<(i64, Vec<KeyValue>)> {
        let range_end = if prefix { prefix_end(&key) } else { Vec::new() };
        let req = rpc::RangeRequest {
            key,
            range_end,
            ..Default::default()
        };
        let resp = self
            .call("read", |ch| {
                let req = req.clone();
                async move { rpc::kv_client::KvClient::new(ch).range(req).await }
            })
            .await?
            .into_inner();
        Ok((revision(&resp.header), resp.kvs))
    }

    pub(crate) async fn put(&self, key: Vec<u8>, value: Vec<u8>, lease: i64) -> io::Result<i64> {
        let req = rpc::PutRequest {
            key,
            value,
            lease,
            prev_kv: false,
        };
        let resp = self
            .call("write", |ch| {
                let req = req.clone();
                async move { rpc::kv_client::KvClient::new(ch).put(req).await }
            })
            .await?
            .into_inner();
        Ok(revision(&resp.header))
    }

    pub(crate) async fn delete(&self, key: Vec<u8>, prefix: bool) -> io::Result<i64> {
        let range_end = if prefix { prefix_end(&key) } else { Vec::new() };
        let req = rpc::DeleteRangeRequest {
            key,
            range_end,
            prev_kv: false,
        };
        let resp = self
            .call("delete", |ch| {
                let req = req.clone();
                async move { rpc::kv_client::KvClient::new(ch).delete_range(req).await }
            })
            .await?
            .into_inner();
        Ok(resp.deleted)
    }

    /// A transaction: `success` if every compare holds, else `failure`.
    pub(crate) async fn txn(&self, req: rpc::TxnRequest) -> io::Result<rpc::TxnResponse> {
        Ok(self
            .call("write", |ch| {
                let req = req.clone();
                async move { rpc::kv_client::KvClient::new(ch).txn(req).await }
            })
            .await?
            .into_inner())
    }

    /// Writes `value` at `key` (under `lease`, 0: none) if `when` holds;
    /// the revision written, or `None` when it did not hold.
    pub(crate) async fn put_when(
        &self,
        key: Vec<u8>,
        when: When,
        value: Vec<u8>,
        lease: i64,
    ) -> io::Result<Option<i64>> {
        let req = rpc::TxnRequest {
            compare: vec![when.compare(key.clone())],
            success: vec![rpc::RequestOp {
                request: Some(rpc::request_op::Request::RequestPut(rpc::PutRequest {
                    key,
                    value,
                    lease,
                    prev_kv: false,
                })),
            }],
            failure: vec![],
        };
        let resp = self.txn(req).await?;
        Ok(resp.succeeded.then(|| revision(&resp.header)))
    }

    /// Deletes `key` if `when` holds; whether it did.
    pub(crate) async fn delete_when(&self, key: Vec<u8>, when: When) -> io::Result<bool> {
        let req = rpc::TxnRequest {
            compare: vec![when.compare(key.clone())],
            success: vec![rpc::RequestOp {
                request: Some(rpc::request_op::Request::RequestDeleteRange(
                    rpc::DeleteRangeRequest {
                        key,
                        range_end: Vec::new(),
                        prev_kv: false,
                    },
                )),
            }],
            failure: vec![],
        };
        Ok(self.txn(req).await?.succeeded)
    }

    /// A lease of `ttl` seconds.
    pub(crate) async fn grant(&self, ttl: i64) -> io::Result<i64> {
        let resp = self
            .call("lease grant", |ch| async move {
                rpc::lease_client::LeaseClient::new(ch)
                    .lease_grant(rpc::LeaseGrantRequest { ttl, id: 0 })
                    .await
            })
            .await?
            .into_inner();
        if !resp.error.is_empty() {
            return Err(io::Error::other(format!(
                "etcd lease grant: {}",
                resp.error
            )));
        }
        Ok(resp.id)
    }

    /// Keeps `id` alive once; the seconds it has left (0: it is gone).
    pub(crate) async fn keep_alive_once(&self, id: i64) -> io::Result<i64> {
        let resp = self
            .call("lease keep-alive", |ch| async move {
                let mut stream = rpc::lease_client::LeaseClient::new(ch)
                    .lease_keep_alive(tokio_stream::once(rpc::LeaseKeepAliveRequest { id }))
                    .await?
                    .into_inner();
                stream
                    .message()
                    .await?
                    .ok_or_else(|| tonic::Status::unavailable("keep-alive stream ended"))
            })
            .await?;
        Ok(resp.ttl)
    }

    /// A watch of the keys under `key` from `start` (a revision), on the
    /// current member.
    pub(crate) async fn watch(
        &self,
        key: Vec<u8>,
        start: i64,
    ) -> io::Result<tonic::Streaming<rpc::WatchResponse>> {
        let range_end = prefix_end(&key);
        self.call("watch", |ch| {
            let create = rpc::WatchRequest {
                request_union: Some(rpc::watch_request::RequestUnion::CreateRequest(
                    rpc::WatchCreateRequest {
                        key: key.clone(),
                        range_end: range_end.clone(),
                        start_revision: start,
                        progress_notify: true,
                        prev_kv: false,
                    },
                )),
            };
            async move {
                // The request stream stays open for as long as the watch
                // (closing it would end the watch).
                let requests = tokio_stream::once(create).chain(tokio_stream::pending());
                let mut stream = rpc::watch_client::WatchClient::new(ch)
                    .watch(requests)
                    .await?
                    .into_inner();
                // The first answer confirms the watch.
                match stream.message().await? {
                    Some(r) if r.created && !r.canceled => Ok(stream),
                    Some(r) => Err(tonic::Status::failed_precondition(format!(
                        "watch refused: {}",
                        r.cancel_reason
                    ))),
                    None => Err(tonic::Status::unavailable("watch stream ended")),
                }
            }
        })
        .await
    }

    /// Every member's status, each asked on its own.
    pub async fn members(&self) -> Vec<MemberStatus> {
        let mut out = Vec::new();
        for (i, ch) in self.inner.members.iter().enumerate() {
            let endpoint = self.inner.url.endpoints[i].clone();
            let resp = tokio::time::timeout(
                Duration::from_secs(1),
                rpc::maintenance_client::MaintenanceClient::new(ch.clone())
                    .status(rpc::StatusRequest {}),
            )
            .await;
            out.push(match resp {
                Ok(Ok(r)) => {
                    let r = r.into_inner();
                    let me = r.header.as_ref().map_or(0, |h| h.member_id);
                    MemberStatus {
                        endpoint,
                        version: Some(r.version),
                        leader: me != 0 && r.leader == me,
                        db_size: r.db_size,
                        error: r.errors.first().cloned(),
                    }
                }
                Ok(Err(s)) => MemberStatus {
                    endpoint,
                    version: None,
                    leader: false,
                    db_size: 0,
                    error: Some(status_text(&s)),
                },
                Err(_) => MemberStatus {
                    endpoint,
                    version: None,
                    leader: false,
                    db_size: 0,
                    error: Some("no answer in 1s".into()),
                },
            });
        }
        out
    }
}

/// The condition of a conditional write.
#[derive(Clone, Copy, Debug)]
pub(crate) enum When {
    /// The key does not exist.
    Absent,
    /// The key was last written at this revision.
    ModRevision(i64),
}

impl When {
    fn compare(self, key: Vec<u8>) -> rpc::Compare {
        let (target, union) = match self {
            When::Absent => (CompareTarget::Create, TargetUnion::CreateRevision(0)),
            When::ModRevision(r) => (CompareTarget::Mod, TargetUnion::ModRevision(r)),
        };
        rpc::Compare {
            result: CompareResult::Equal as i32,
            target: target as i32,
            key,
            target_union: Some(union),
        }
    }
}

/// The end of the range of every key that starts with `key`.
pub(crate) fn prefix_end(key: &[u8]) -> Vec<u8> {
    let mut end = key.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

pub(crate) fn revision(h: &Option<rpc::ResponseHeader>) -> i64 {
    h.as_ref().map_or(0, |h| h.revision)
}

/// Worth trying another member: unreachable, timed out, no leader.
fn retryable(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::Internal
    )
}

/// The member could not be reached at all (connection refused, reset,
/// TLS refused), as opposed to answering without a leader.
fn unreachable(s: &tonic::Status) -> bool {
    use std::error::Error;
    s.source().is_some() || s.message().contains("transport error")
}

fn status_text(s: &tonic::Status) -> String {
    use std::error::Error;
    let mut text = s.message().to_string();
    let mut source = s.source();
    while let Some(e) = source {
        text = format!("{text}: {e}");
        source = e.source();
    }
    if text.is_empty() {
        format!("{:?}", s.code())
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u: EtcdUrl = "etcd://10.0.0.1:2379,etcd-2:2379/meshes/a"
            .parse()
            .expect("url");
        assert_eq!(u.endpoints, ["10.0.0.1:2379", "etcd-2:2379"]);
        assert_eq!(u.prefix, "/meshes/a");
        let d: EtcdUrl = "etcd://127.0.0.1:2379".parse().expect("url");
        assert_eq!(d.prefix, DEFAULT_PREFIX);
        assert_eq!(d.to_string(), "etcd://127.0.0.1:2379/tandem");
        for bad in [
            "http://x:1",
            "etcd://",
            "etcd://host",
            "etcd://host:0",
            "etcd://:2379",
            "etcd://h:1//x",
        ] {
            assert!(bad.parse::<EtcdUrl>().is_err(), "{bad}");
        }
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"a/"), b"a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), b"\0");
    }
}
