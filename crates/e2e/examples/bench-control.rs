//! `bench-control`: how the control plane scales with the number of
//! proxies. It starts the real `tandem control` (the binary of
//! `TANDEM_BIN`, or a debug build), then N simulated proxies in this
//! process: each holds a real Discovery stream over TLS (verifying the
//! control plane's SPIFFE ID), registers with a certificate of its service,
//! and acknowledges every snapshot, as a sidecar does. It measures
//!
//! 1. the time from starting all N at once until every one has
//!    acknowledged its first snapshot;
//! 2. after a route edit (the config file rewritten, as `git checkout`
//!    would), the time until each proxy acknowledged a snapshot with the
//!    edit: p50, p99, max;
//! 3. the control plane's resident memory with N proxies connected;
//! 4. how long one proxy's bootstrap takes (its first certificate, with a
//!    single-use join token, then its Hello and first snapshot) with no
//!    other connection and with 300 silent TCP connections held open on the
//!    gRPC port.
//!
//! With `--replicas R` (R ≥ 1) the control plane is R replicas sharing a
//! 3-member etcd (`etcd` on the PATH), proxy `i` connects to replica
//! `i mod R`, and it also measures
//!
//! 5. how long a registration made through one replica takes to reach a
//!    proxy on another: from a new instance's Hello on replica 1 until a
//!    proxy on replica 0 that calls its service acknowledged a snapshot
//!    listing it (9 times: min, median, max).
//!
//! ```text
//! bench-control [--proxies 100,250,500,1000] [--services 50] [--replicas R] [--markdown FILE]
//! ```
//!
//! Proxy `i` is an instance of service `svc-(i mod S)` and calls the next
//! two services, so each service's snapshot lists two destinations with
//! N/S endpoints each; every service has an HTTPRoute, and the edit
//! changes all of them.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_api::v1::discovery_client::DiscoveryClient;
use tandem_api::v1::{control_message, proxy_message, Ack, Hello, ProxyMessage};
use tandem_e2e::etcd::EtcdCluster;
use tandem_e2e::Mesh;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

struct Args {
    proxies: Vec<usize>,
    services: usize,
    /// 0: one control plane on its data directory.
    replicas: usize,
    markdown: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        proxies: vec![100, 250, 500, 1000],
        services: 50,
        replicas: 0,
        markdown: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--proxies" => {
                a.proxies = value
                    .split(',')
                    .map(|n| n.trim().parse().expect("--proxies: numbers"))
                    .collect()
            }
            "--services" => a.services = value.parse().expect("--services: a number"),
            "--replicas" => a.replicas = value.parse().expect("--replicas: a number"),
            "--markdown" => a.markdown = Some(value),
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

fn config(services: usize, edition: &str) -> String {
    let mut s = String::new();
    for k in 0..services {
        s.push_str(&tandem_e2e::service_yaml(&format!("svc-{k}"), "http"));
        s.push_str(&format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: svc-{k}}}\nspec:\n  parentRefs: [{{kind: Service, name: svc-{k}, port: 8080}}]\n  rules:\n    - matches: [{{headers: [{{name: x-edition, value: \"{edition}\"}}]}}]\n      backendRefs: [{{name: svc-{k}, port: 8080}}]\n    - backendRefs: [{{name: svc-{k}, port: 8080}}]\n---\n"
        ));
    }
    s
}

/// What the simulated proxies report.
enum Event {
    /// Proxy `i` acknowledged a snapshot; whether it had the edit.
    Acked(usize, bool, Instant),
    /// A connection attempt failed and was made again.
    Retried(String),
    Failed(usize, String),
}

struct Row {
    proxies: usize,
    retried: usize,
    services: usize,
    connect: Duration,
    edit: [Duration; 3],
    rss_mib: f64,
    rounds: u64,
    compiles: u64,
    /// A registration through replica 1 reaching a proxy on replica 0:
    /// min, median, max.
    crossing: Option<[Duration; 3]>,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

async fn simulated_proxy(
    i: usize,
    grpc: String,
    tls: Arc<rustls::ClientConfig>,
    hello: Hello,
    events: mpsc::UnboundedSender<Event>,
) {
    let mut tries = 0;
    let channel = loop {
        match tandem_proxy::control_channel(&grpc, tls.clone()).await {
            Ok(c) => break c,
            Err(e) if tries < 20 => {
                tries += 1;
                let _ = events.send(Event::Retried(e.to_string()));
                tokio::time::sleep(Duration::from_millis(100 + fastrand_ms(i))).await;
            }
            Err(e) => {
                let _ = events.send(Event::Failed(i, e.to_string()));
                return;
            }
        }
    };
    let (tx, rx) = mpsc::channel::<ProxyMessage>(8);
    let msg = |k| ProxyMessage { kind: Some(k) };
    let _ = tx.send(msg(proxy_message::Kind::Hello(hello))).await;
    let mut stream = match DiscoveryClient::new(channel)
        .stream(ReceiverStream::new(rx))
        .await
    {
        Ok(s) => s.into_inner(),
        Err(e) => {
            let _ = events.send(Event::Failed(i, e.to_string()));
            return;
        }
    };
    while let Ok(Some(m)) = stream.message().await {
        let Some(control_message::Kind::Snapshot(s)) = m.kind else {
            continue;
        };
        let edited = s.body.windows(9).any(|w| w == b"edition-2");
        let _ = tx
            .send(msg(proxy_message::Kind::Ack(Ack { version: s.version })))
            .await;
        let _ = events.send(Event::Acked(i, edited, Instant::now()));
    }
}

/// A little spread for retries (no shared random state needed).
fn fastrand_ms(i: usize) -> u64 {
    (i as u64 * 7919) % 200
}

fn rss_mib(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// When each of the `n` proxies first acknowledged a snapshot that `wanted`
/// (given whether it had the edit), and how many connection attempts were
/// made again meanwhile. Panics if one fails, or if `patience` passes with
/// no news while some have not acknowledged.
async fn first_acks(
    rx: &mut mpsc::UnboundedReceiver<Event>,
    n: usize,
    patience: Duration,
    what: &str,
    wanted: impl Fn(bool) -> bool,
) -> (Vec<Instant>, usize) {
    let mut first = vec![None::<Instant>; n];
    let (mut acked, mut retried) = (0, 0);
    while acked < n {
        match tokio::time::timeout(patience, rx.recv()).await {
            Ok(Some(Event::Acked(i, edited, at))) => {
                if wanted(edited) && first[i].is_none() {
                    first[i] = Some(at);
                    acked += 1;
                }
            }
            Ok(Some(Event::Retried(why))) => {
                if retried == 0 {
                    eprintln!("a connection attempt failed and is made again: {why}");
                }
                retried += 1;
            }
            Ok(Some(Event::Failed(i, e))) => panic!("proxy {i}: {e}"),
            _ => panic!("only {acked} of {n} proxies acknowledged {what} within {patience:?}"),
        }
    }
    (first.into_iter().flatten().collect(), retried)
}

/// The control plane: one on its data directory, or `replicas` sharing a
/// 3-member etcd (kept alive by the returned cluster).
fn control(services: usize, replicas: usize) -> (Mesh, Option<EtcdCluster>) {
    if replicas == 0 {
        return (Mesh::start(&config(services, "edition-1")), None);
    }
    let etcd = EtcdCluster::start(3);
    let mesh = Mesh::replicated(
        &config(services, "edition-1"),
        &etcd.url("/bench"),
        replicas,
    );
    (mesh, Some(etcd))
}

fn run(n: usize, services: usize, replicas: usize) -> Row {
    let (mesh, _etcd) = control(services, replicas);
    // One certificate per service, as its proxies hold after bootstrap:
    // the stream registers with it.
    let tls: Vec<_> = (0..services)
        .map(|k| {
            mesh.identity_for(&format!("svc-{k}"))
                .client_config(&[tandem_identity::tls::ALPN_H2])
        })
        .collect();
    let pid = match &mesh.control {
        Some(c) => c.pid(),
        None => mesh.replicas[0].proc.as_ref().unwrap().pid(),
    };
    let rt = tandem_e2e::rt();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let grpcs: Vec<String> = if mesh.replicas.is_empty() {
        vec![mesh.grpc.to_string()]
    } else {
        mesh.replicas.iter().map(|r| r.grpc.to_string()).collect()
    };
    let start = Instant::now();
    for i in 0..n {
        let grpc = &grpcs[i % grpcs.len()];
        let k = i % services;
        let hello = Hello {
            service: format!("svc-{k}"),
            instance: format!("p{i}"),
            namespace: "default".into(),
            inbound_addr: format!("10.{}.{}.{}:8080", i / 65536, (i / 256) % 256, i % 256),
            interest: vec![
                format!("svc-{}", (k + 1) % services),
                format!("svc-{}", (k + 2) % services),
            ],
            proxy_version: "bench".into(),
            ..Hello::default()
        };
        rt.spawn(simulated_proxy(
            i,
            grpc.clone(),
            tls[k].clone(),
            hello,
            tx.clone(),
        ));
    }
    // 1. Everyone connected and acknowledged.
    let (first, retried) = rt.block_on(first_acks(
        &mut rx,
        n,
        Duration::from_secs(60),
        "a snapshot",
        |_| true,
    ));
    let connect = first.iter().max().map_or(Duration::ZERO, |t| *t - start);
    // Settle (late endpoint updates), then measure memory.
    rt.block_on(async {
        let quiet = Duration::from_millis(500);
        while let Ok(Some(_)) = tokio::time::timeout(quiet, rx.recv()).await {}
    });
    let rss = rss_mib(pid);
    // 2. A route edit reaches everyone.
    let edit_at = Instant::now();
    mesh.write_config("mesh.yaml", &config(services, "edition-2"));
    let (edited, _) = rt.block_on(first_acks(
        &mut rx,
        n,
        Duration::from_secs(30),
        "the edit",
        |edited| edited,
    ));
    let mut lat: Vec<Duration> = edited.iter().map(|t| *t - edit_at).collect();
    lat.sort();
    let push = mesh.api_json("/api/v1/push").unwrap_or_default();
    let crossing = (replicas >= 2).then(|| {
        let mut t: Vec<Duration> = (0..9)
            .map(|j| rt.block_on(registration_crossing(&mesh, &tls, services, j)))
            .collect();
        t.sort();
        [t[0], t[4], t[8]]
    });
    let row = Row {
        proxies: n,
        retried,
        services,
        connect,
        edit: [
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            *lat.last().unwrap_or(&Duration::ZERO),
        ],
        rss_mib: rss,
        rounds: push["rounds"].as_u64().unwrap_or(0),
        compiles: push["compiles"].as_u64().unwrap_or(0),
        crossing,
    };
    rt.shutdown_timeout(Duration::from_secs(1));
    row
}

/// From a new instance of `svc-0` saying Hello to replica 1 until a proxy
/// on replica 0 that calls `svc-0` acknowledged a snapshot listing it.
async fn registration_crossing(
    mesh: &Mesh,
    tls: &[Arc<rustls::ClientConfig>],
    services: usize,
    j: usize,
) -> Duration {
    let watcher_svc = services - 1; // calls svc-0 (its next service)
    let (wtx, mut wrx) = mpsc::unbounded_channel();
    let addr = format!("10.200.0.{}:8080", j + 1);
    let watcher = Hello {
        service: format!("svc-{watcher_svc}"),
        instance: format!("watch-{j}"),
        namespace: "default".into(),
        inbound_addr: format!("10.201.0.{}:8080", j + 1),
        interest: vec!["svc-0".into()],
        proxy_version: "bench".into(),
        ..Hello::default()
    };
    let r0 = mesh.replicas[0].grpc.to_string();
    let r1 = mesh.replicas[1].grpc.to_string();
    let (stx, srx) = mpsc::unbounded_channel();
    tokio::spawn(watching_proxy(
        r0,
        tls[watcher_svc].clone(),
        watcher,
        addr.clone(),
        wtx,
        srx,
    ));
    // The watcher is in place (its first snapshot acknowledged).
    wrx.recv().await.expect("watcher up");
    let newcomer = Hello {
        service: "svc-0".into(),
        instance: format!("new-{j}"),
        namespace: "default".into(),
        inbound_addr: addr,
        proxy_version: "bench".into(),
        ..Hello::default()
    };
    let (ntx, _nrx) = mpsc::unbounded_channel();
    let start = Instant::now();
    let newcomer_task = tokio::spawn(simulated_proxy(
        usize::MAX,
        r1,
        tls[0].clone(),
        newcomer,
        ntx,
    ));
    let seen_at = tokio::time::timeout(Duration::from_secs(30), wrx.recv())
        .await
        .expect("the registration reached replica 0's proxy")
        .expect("watcher");
    newcomer_task.abort();
    let _ = stx.send(());
    seen_at - start
}

/// A proxy on `grpc` that reports when it first acknowledged a snapshot,
/// then when it acknowledged one listing `addr`; ends on `stop`.
async fn watching_proxy(
    grpc: String,
    tls: Arc<rustls::ClientConfig>,
    hello: Hello,
    addr: String,
    seen: mpsc::UnboundedSender<Instant>,
    mut stop: mpsc::UnboundedReceiver<()>,
) {
    let channel = tandem_proxy::control_channel(&grpc, tls).await.unwrap();
    let (tx, rx) = mpsc::channel::<ProxyMessage>(8);
    let msg = |k| ProxyMessage { kind: Some(k) };
    let _ = tx.send(msg(proxy_message::Kind::Hello(hello))).await;
    let mut stream = DiscoveryClient::new(channel)
        .stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let (mut first, mut found) = (true, false);
    loop {
        tokio::select! {
            m = stream.message() => {
                let Ok(Some(m)) = m else { return };
                let Some(control_message::Kind::Snapshot(s)) = m.kind else { continue };
                let _ = tx.send(msg(proxy_message::Kind::Ack(Ack { version: s.version }))).await;
                let listed = s.body.windows(addr.len()).any(|w| w == addr.as_bytes());
                if first || (listed && !found) {
                    found |= listed && !first;
                    first = false;
                    let _ = seen.send(Instant::now());
                }
            }
            _ = stop.recv() => return,
        }
    }
}

/// One bootstrap as a proxy makes it (the trust bundle is read from the
/// data directory instead of fetched): certificate with `token`, then the
/// stream's first snapshot.
async fn bootstrap(mesh: &Mesh, token: String, instance: &str) -> Duration {
    use tandem_api::v1::identity_client::IdentityClient;
    use tandem_api::v1::CertifyRequest;
    let (td, roots) = mesh.trust();
    let tls = tandem_identity::tls::TlsIdentity::new(&td, roots).unwrap();
    let id = tandem_identity::SpiffeId::new(&td, "default", "svc-0");
    let grpc = mesh.grpc.to_string();
    let alpn = [tandem_identity::tls::ALPN_H2];
    let start = Instant::now();
    let (csr, key) = tandem_identity::ca::new_csr(&id).unwrap();
    let ch = tandem_proxy::control_channel(&grpc, tls.client_config(&alpn))
        .await
        .unwrap();
    let resp = IdentityClient::new(ch)
        .certify(CertifyRequest {
            token,
            csr,
            instance: instance.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    let chain = resp
        .chain
        .into_iter()
        .map(rustls_pki_types::CertificateDer::from)
        .collect();
    tls.set_cert(chain, key, resp.signer).unwrap();
    let ch = tandem_proxy::control_channel(&grpc, tls.client_config(&alpn))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel::<ProxyMessage>(8);
    let hello = Hello {
        service: "svc-0".into(),
        instance: instance.into(),
        namespace: "default".into(),
        proxy_version: "bench".into(),
        ..Hello::default()
    };
    tx.send(ProxyMessage {
        kind: Some(proxy_message::Kind::Hello(hello)),
    })
    .await
    .unwrap();
    let mut stream = DiscoveryClient::new(ch)
        .stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    while let Some(m) = stream.message().await.unwrap() {
        if matches!(m.kind, Some(control_message::Kind::Snapshot(_))) {
            break;
        }
    }
    start.elapsed()
}

/// Bootstrap times (min, median, max of `rounds`) with `idle` silent
/// sockets held open on the gRPC port.
fn bootstrap_beside(idle: usize, rounds: usize) -> [Duration; 3] {
    let mesh = Mesh::start(&config(2, "edition-1"));
    let held: Vec<std::net::TcpStream> = (0..idle)
        .map(|_| std::net::TcpStream::connect(mesh.grpc).unwrap())
        .collect();
    let tokens: Vec<String> = (0..rounds).map(|_| mesh.token("svc-0")).collect();
    let rt = tandem_e2e::rt();
    let mut times: Vec<Duration> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| rt.block_on(bootstrap(&mesh, t, &format!("b{i}"))))
        .collect();
    times.sort();
    drop(held);
    [times[0], times[rounds / 2], times[rounds - 1]]
}

fn main() {
    let a = args();
    let mut table = String::from(
        "| proxies | services | all connected and acked | connects made again | edit acked p50 | edit p99 | edit max | control-plane RSS | push rounds | compiles |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3);
    let mut crossings = String::new();
    for &n in &a.proxies {
        let r = run(n, a.services, a.replicas);
        let line = format!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.1} MiB | {} | {} |\n",
            r.proxies,
            r.services,
            ms(r.connect),
            r.retried,
            ms(r.edit[0]),
            ms(r.edit[1]),
            ms(r.edit[2]),
            r.rss_mib,
            r.rounds,
            r.compiles
        );
        eprint!("{line}");
        table.push_str(&line);
        if let Some([min, med, max]) = r.crossing {
            crossings.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                r.proxies,
                ms(min),
                ms(med),
                ms(max)
            ));
        }
    }
    if !crossings.is_empty() {
        table.push_str("\n| proxies | registration via replica 1 seen by a proxy on replica 0: min | median | max |\n|---:|---:|---:|---:|\n");
        table.push_str(&crossings);
    }
    if a.replicas > 0 {
        println!("{table}");
        if let Some(path) = a.markdown {
            std::fs::write(&path, &table).unwrap();
        }
        return;
    }
    table.push_str(
        "\n| silent sockets held on the gRPC port | bootstrap min | median | max |\n|---:|---:|---:|---:|\n",
    );
    for idle in [0, 300] {
        let [min, med, max] = bootstrap_beside(idle, 9);
        let line = format!("| {idle} | {} | {} | {} |\n", ms(min), ms(med), ms(max));
        eprint!("{line}");
        table.push_str(&line);
    }
    println!("{table}");
    if let Some(path) = a.markdown {
        std::fs::write(&path, &table).unwrap();
    }
}
