//! The end-to-end test harness: starts the real `tandem` binary (control
//! plane, sidecars, demo apps) on loopback with free ports, waits for
//! readiness, and cleans every process up on drop. Tests read like stories:
//!
//! ```text
//! let mesh = Mesh::start(CONFIG);
//! let web = mesh.service("web").app(&[]).proxy(&[]).start();
//! assert_eq!(curl(&["-s", &format!("http://{}/", web.http_proxy)]).status, 0);
//! ```
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub mod etcd;
pub mod netns;

/// Runs `tandem ARGS`, which must succeed; its output, trimmed.
pub fn tandem_ok(args: &[&str]) -> String {
    let out = Command::new(bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "tandem {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The `tandem` binary, built once per test run.
pub fn bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("TANDEM_BIN") {
            return PathBuf::from(p);
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "tandem", "--bin", "tandem"])
            .current_dir(&root)
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build of the tandem binary failed");
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root.join("target"));
        let bin = target.join("debug/tandem");
        assert!(bin.exists(), "{} missing", bin.display());
        bin
    })
}

/// A free loopback port, never the same one twice in a test run (the
/// kernel may hand a just-released port out again).
pub fn free_port() -> SocketAddr {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if !given.contains(&addr.port()) {
            given.push(addr.port());
            return addr;
        }
    }
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("tandem-e2e-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A child process of the test. Its stdin is a pipe: the `tandem`
/// processes exit when it closes, so nothing outlives a crashed test.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, args: &[String], dir: &Path) -> Proc {
        Self::spawn_program(bin(), name, args, dir)
    }

    /// `program ARGS --exit-on-stdin-close` (a `tandem` command behind a
    /// wrapper such as `ip netns exec`).
    pub fn spawn_program(
        program: impl AsRef<std::ffi::OsStr>,
        name: &str,
        args: &[String],
        dir: &Path,
    ) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new(program)
            .args(args)
            .arg("--exit-on-stdin-close")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::piped())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        Proc {
            name: name.to_string(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(ok.success(), "kill -{sig} {}", self.pid());
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for exit; `None` if it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        wait_child(&mut self.child, timeout)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Resident memory in KiB, from /proc (the process must be alive).
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    /// The most resident memory the process has had, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    fn status_kib(&self, field: &str) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_else(|e| panic!("{} (pid {}): {e}", self.name, self.pid()));
        s.lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{}: no {field} in /proc status", self.name))
    }

    /// Waits until the log has a line containing `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        wait_for(
            &format!("`{needle}` in {}'s log", self.name),
            timeout,
            || self.log_text().contains(needle).then_some(()),
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- log of {} ({}) ----\n{}",
                self.name,
                self.log.display(),
                tail(&self.log_text(), 60)
            );
        }
        self.kill();
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Waits for `child` to exit; `None` if it is still running after
/// `timeout`.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let end = Instant::now() + timeout;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// PIDs of the direct children of `pid` (from /proc).
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        // Fields after the command name: state, ppid, ...
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let ppid = after
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(p);
        }
    }
    out
}

/// Whether `pid` runs (a zombie, dead but not yet reaped, does not).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
                .unwrap_or(true)
        })
        .unwrap_or(false)
}

/// The arguments `pid` was started with (empty once it is gone).
pub fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// The live processes started with all of `args` among their arguments.
pub fn pids_with_args(args: &[&str]) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|p| {
            let have = cmdline(*p);
            args.iter().all(|a| have.iter().any(|h| h == a)) && alive(*p)
        })
        .collect()
}

/// How much longer than written a test waits before it fails: a busy
/// machine (CI, a CPU hog beside the suite) slows everything down, and a
/// longer wait only costs time when the test is failing anyway.
/// `TANDEM_E2E_PATIENCE` sets the factor (3 by default).
pub fn patience(d: Duration) -> Duration {
    static FACTOR: OnceLock<f64> = OnceLock::new();
    let f = *FACTOR.get_or_init(|| {
        std::env::var("TANDEM_E2E_PATIENCE")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|f: &f64| *f >= 1.0)
            .unwrap_or(3.0)
    });
    d.mul_f64(f)
}

/// Polls `f` until it returns `Some` or `timeout` (times [`patience`])
/// passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let timeout = patience(timeout);
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Result of one curl run.
pub struct CurlOut {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn curl(args: &[&str]) -> CurlOut {
    let out = Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "20"])
        .args(args)
        .output()
        .expect("curl is installed (the test command installs it)");
    CurlOut {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `GET http://ADDR/PATH` over a fresh connection; status and body.
pub fn http_get(addr: SocketAddr, host: &str, path: &str) -> Option<(u16, String)> {
    http_request(addr, "GET", path, &[("Host", host)])
}

/// `METHOD http://ADDR/PATH` with these headers (Host among them) over a
/// fresh connection; status and body.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, patience(Duration::from_secs(2))).ok()?;
    s.set_read_timeout(Some(patience(Duration::from_secs(20))))
        .ok()?;
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if method == "POST" || method == "PUT" {
        head.push_str("Content-Length: 0\r\n");
    }
    head.push_str("Connection: close\r\n\r\n");
    s.write_all(head.as_bytes()).ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// One HTTP/1.1 response: status, headers (names lower-case) and body.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// An HTTP/1.1 client on one keep-alive connection: reads each response
/// whole, by its framing (`Content-Length` or chunked), so a body written
/// in several pieces is never taken for the next response.
pub struct KeepAlive {
    stream: std::io::BufReader<std::net::TcpStream>,
}

impl KeepAlive {
    pub fn connect(addr: SocketAddr) -> Option<KeepAlive> {
        let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
        s.set_read_timeout(Some(patience(Duration::from_secs(20))))
            .ok()?;
        Some(KeepAlive {
            stream: std::io::BufReader::new(s),
        })
    }

    /// Sends one request; the response, or `None` if the connection broke.
    pub fn send(
        &mut self,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Option<Resp> {
        use std::io::{BufRead, Read, Write};
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() || method == "POST" || method == "PUT" {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let s = self.stream.get_mut();
        s.write_all(head.as_bytes()).ok()?;
        s.write_all(body).ok()?;
        let r = &mut self.stream;
        let mut line = String::new();
        r.read_line(&mut line).ok()?;
        let status: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
        let mut headers = Vec::new();
        loop {
            line.clear();
            r.read_line(&mut line).ok()?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':')?;
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let mut body = Vec::new();
        if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            loop {
                line.clear();
                r.read_line(&mut line).ok()?;
                let size = usize::from_str_radix(line.trim().split(';').next()?, 16).ok()?;
                if size == 0 {
                    // Trailers, then the final empty line.
                    loop {
                        line.clear();
                        r.read_line(&mut line).ok()?;
                        if line.trim_end().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                let mut chunk = vec![0; size + 2];
                r.read_exact(&mut chunk).ok()?;
                body.extend_from_slice(&chunk[..size]);
            }
        } else if let Some(n) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
            body.resize(n, 0);
            r.read_exact(&mut body).ok()?;
        } else if status >= 200 && status != 204 && status != 304 && method != "HEAD" {
            r.read_to_end(&mut body).ok()?;
        }
        Some(Resp {
            status,
            headers,
            body,
        })
    }
}

/// `GET` an open endpoint of the control plane's API (`/healthz`).
fn api_open(api: SocketAddr, path: &str) -> Option<serde_json::Value> {
    let (status, body) = http_get(api, &api.to_string(), path)?;
    if status != 200 {
        return None;
    }
    serde_json::from_str(&body).ok()
}

/// A control plane with its config directory.
pub struct Mesh {
    pub dir: TempDir,
    pub config_dir: PathBuf,
    pub grpc: SocketAddr,
    pub api: SocketAddr,
    pub control: Option<Proc>,
    /// Extra arguments of `tandem control`.
    pub control_args: Vec<String>,
    /// Replicas sharing etcd ([`Mesh::replicated`]); `control` is then
    /// unused, and `grpc`, `api` are the first replica's.
    pub replicas: Vec<Replica>,
    /// The etcd URL the replicas share (tokens are minted there).
    pub store: Option<String>,
    /// The replicas take config pushed with `tandem apply`, not from
    /// `config_dir`.
    pub pushed: bool,
}

/// One control-plane replica of a [`Mesh::replicated`].
pub struct Replica {
    pub name: String,
    pub grpc: SocketAddr,
    pub api: SocketAddr,
    pub data: PathBuf,
    pub proc: Option<Proc>,
}

/// One service instance: a demo app and its sidecar.
pub struct Instance {
    pub service: String,
    pub instance: String,
    pub app_addr: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    pub http_proxy: SocketAddr,
    pub upstreams: Vec<(String, SocketAddr)>,
    pub tcp_echo: Option<SocketAddr>,
    pub app: Option<Proc>,
    pub proxy: Option<Proc>,
}

impl Mesh {
    pub fn start(config: &str) -> Mesh {
        Self::start_with(config, &[])
    }

    /// A mesh whose control plane gets `control_args` too.
    pub fn start_with(config: &str, control_args: &[&str]) -> Mesh {
        let dir = TempDir::new("mesh");
        let config_dir = dir.0.join("config");
        std::fs::create_dir_all(&config_dir).unwrap();
        std::fs::write(config_dir.join("mesh.yaml"), config).unwrap();
        let mut mesh = Mesh {
            config_dir,
            grpc: free_port(),
            api: free_port(),
            control: None,
            control_args: control_args.iter().map(|s| s.to_string()).collect(),
            replicas: Vec::new(),
            store: None,
            pushed: false,
            dir,
        };
        mesh.start_control();
        mesh
    }

    /// `n` control-plane replicas sharing the etcd at `store`, each with
    /// its own data directory (the first one's is [`Mesh::data_dir`]).
    /// With an empty `config` they follow no directory: config is pushed
    /// with `tandem apply`.
    pub fn replicated(config: &str, store: &str, n: usize) -> Mesh {
        Self::replicated_with(config, store, n, &[])
    }

    /// [`Mesh::replicated`], each replica with `control_args` too.
    pub fn replicated_with(config: &str, store: &str, n: usize, control_args: &[&str]) -> Mesh {
        let dir = TempDir::new("mesh");
        let config_dir = dir.0.join("config");
        std::fs::create_dir_all(&config_dir).unwrap();
        std::fs::write(config_dir.join("mesh.yaml"), config).unwrap();
        let replicas: Vec<Replica> = (0..n)
            .map(|i| Replica {
                name: format!("r{i}"),
                grpc: free_port(),
                api: free_port(),
                data: dir.0.join(if i == 0 {
                    "data".into()
                } else {
                    format!("data-{i}")
                }),
                proc: None,
            })
            .collect();
        let mut mesh = Mesh {
            config_dir,
            grpc: replicas[0].grpc,
            api: replicas[0].api,
            control: None,
            control_args: control_args.iter().map(|s| s.to_string()).collect(),
            replicas,
            store: Some(store.to_string()),
            pushed: config.is_empty(),
            dir,
        };
        for i in 0..n {
            mesh.start_replica(i);
        }
        mesh
    }

    /// Starts (or starts again) replica `i`.
    pub fn start_replica(&mut self, i: usize) {
        let r = &self.replicas[i];
        let mut args = vec!["control".to_string()];
        if !self.pushed {
            args.push("--config".into());
            args.push(self.config_dir.display().to_string());
        }
        args.extend([
            "--data".to_string(),
            r.data.display().to_string(),
            "--listen".into(),
            r.grpc.to_string(),
            "--api".into(),
            r.api.to_string(),
            "--name".into(),
            r.name.clone(),
            "--report-interval".into(),
            "500ms".into(),
            "--store".into(),
            self.store.clone().expect("a replicated mesh"),
        ]);
        args.extend(self.control_args.iter().cloned());
        let n = std::fs::read_dir(&self.dir.0)
            .map(|d| d.count())
            .unwrap_or(0);
        let proc = Proc::spawn(&format!("{}-{n}", r.name), &args, &self.dir.0);
        let api = r.api;
        self.replicas[i].proc = Some(proc);
        wait_for(
            &format!("replica r{i}'s API"),
            Duration::from_secs(20),
            || api_open(api, "/healthz"),
        );
    }

    /// Kills replica `i` (SIGKILL: its proxies' streams just break).
    pub fn kill_replica(&mut self, i: usize) {
        if let Some(mut p) = self.replicas[i].proc.take() {
            p.kill();
        }
    }

    /// `--control` for a proxy: every replica, `first` first.
    pub fn control_urls(&self, first: usize) -> String {
        let n = self.replicas.len();
        (0..n)
            .map(|k| format!("http://{}", self.replicas[(first + k) % n].grpc))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `GET path` on replica `i`'s API, as JSON (`None` unless 200).
    pub fn replica_json(&self, i: usize, path: &str) -> Option<serde_json::Value> {
        let api = self.replicas[i].api;
        let host = api.to_string();
        let auth = format!("Bearer {}", self.credential());
        let (status, body) = http_request(
            api,
            "GET",
            path,
            &[("Host", host.as_str()), ("Authorization", auth.as_str())],
        )?;
        if status != 200 {
            return None;
        }
        serde_json::from_str(&body).ok()
    }

    pub fn start_control(&mut self) {
        let args = vec![
            "control".to_string(),
            "--config".into(),
            self.config_dir.display().to_string(),
            "--data".into(),
            self.dir.0.join("data").display().to_string(),
            "--listen".into(),
            self.grpc.to_string(),
            "--api".into(),
            self.api.to_string(),
            "--report-interval".into(),
            "500ms".into(),
        ];
        let mut args = args;
        args.extend(self.control_args.iter().cloned());
        let n = std::fs::read_dir(&self.dir.0)
            .map(|d| d.count())
            .unwrap_or(0);
        self.control = Some(Proc::spawn(&format!("control-{n}"), &args, &self.dir.0));
        let api = self.api;
        wait_for("control plane API", Duration::from_secs(20), || {
            api_open(api, "/healthz")
        });
    }

    /// The admin credential of the control plane (`<data>/admin.token`).
    pub fn credential(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("admin.token"))
            .expect("admin credential")
            .trim()
            .to_string()
    }

    /// The trust domain and the roots of the mesh's CA, as stored.
    pub fn trust(&self) -> (String, Vec<rustls_pki_types::CertificateDer<'static>>) {
        use rustls_pki_types::pem::PemObject;
        if self.store.is_some() {
            // Replicas keep the CA in etcd: its bundle from the API.
            let ca = self.api_json("/api/v1/ca").expect("CA from the API");
            let pem = ca["bundle_pem"]
                .as_str()
                .expect("bundle")
                .as_bytes()
                .to_vec();
            let roots = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .expect("bundle PEM");
            return (ca["trust_domain"].as_str().expect("td").to_string(), roots);
        }
        let ca = self.data_dir().join("ca");
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(ca.join("state.json")).expect("CA state"))
                .expect("CA state JSON");
        let roots = state["roots"]
            .as_array()
            .expect("roots")
            .iter()
            .map(|r| {
                let f = ca.join(format!("{}.crt", r.as_str().expect("root id")));
                rustls_pki_types::CertificateDer::from_pem_file(f).expect("root")
            })
            .collect();
        let td = state["trust_domain"].as_str().expect("td").to_string();
        (td, roots)
    }

    /// A TLS identity with the mesh's bundle and no certificate yet (what
    /// a proxy has before its first `Certify`).
    pub fn bare_identity(&self) -> std::sync::Arc<tandem_identity::tls::TlsIdentity> {
        let (td, roots) = self.trust();
        tandem_identity::tls::TlsIdentity::new(&td, roots).expect("bundle")
    }

    /// One `Identity/Certify` call over TLS with `cfg` (a client
    /// certificate or none).
    pub fn certify(
        &self,
        cfg: std::sync::Arc<rustls::ClientConfig>,
        token: &str,
        csr: Vec<u8>,
    ) -> Result<tandem_api::v1::CertifyResponse, tonic::Status> {
        use tandem_api::v1::identity_client::IdentityClient;
        use tandem_api::v1::CertifyRequest;
        let grpc = self.grpc.to_string();
        let token = token.to_string();
        rt().block_on(async move {
            let ch = tandem_proxy::control_channel(&grpc, cfg)
                .await
                .expect("TLS channel to the control plane");
            IdentityClient::new(ch)
                .certify(CertifyRequest {
                    token,
                    csr,
                    instance: String::new(),
                })
                .await
                .map(|r| r.into_inner())
        })
    }

    /// What a proxy of `service` holds after bootstrap: the bundle, and a
    /// certificate obtained with a fresh join token.
    pub fn identity_for(&self, service: &str) -> std::sync::Arc<tandem_identity::tls::TlsIdentity> {
        let tls = self.bare_identity();
        let id = tandem_identity::SpiffeId::new(tls.trust_domain(), "default", service);
        let (csr, key) = tandem_identity::ca::new_csr(&id).expect("csr");
        let cfg = tls.client_config(&[tandem_identity::tls::ALPN_H2]);
        let resp = self
            .certify(cfg, &self.token(service), csr)
            .expect("certificate");
        let chain = resp
            .chain
            .into_iter()
            .map(rustls_pki_types::CertificateDer::from)
            .collect();
        tls.set_cert(chain, key, resp.signer).expect("install");
        tls
    }

    /// `METHOD path` on the control plane's API with the admin credential.
    pub fn api_call(&self, method: &str, path: &str) -> Option<(u16, String)> {
        let host = self.api.to_string();
        let auth = format!("Bearer {}", self.credential());
        http_request(
            self.api,
            method,
            path,
            &[("Host", host.as_str()), ("Authorization", auth.as_str())],
        )
    }

    /// `GET path` on the control plane's API, as JSON (`None` unless 200).
    pub fn api_json(&self, path: &str) -> Option<serde_json::Value> {
        let (status, body) = self.api_call("GET", path)?;
        if status != 200 {
            return None;
        }
        serde_json::from_str(&body).ok()
    }

    /// The control plane's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.0.join("data")
    }

    /// Mints a join token for `service` with `tandem token create`.
    pub fn token(&self, service: &str) -> String {
        self.token_with(&["--service", service])
    }

    /// `tandem token create` with these arguments (plus `--data`, or
    /// `--store` for replicas).
    pub fn token_with(&self, args: &[&str]) -> String {
        let data = self.data_dir().display().to_string();
        let mut all = match &self.store {
            Some(url) => vec!["token", "create", "--store", url.as_str()],
            None => vec!["token", "create", "--data", data.as_str()],
        };
        // The store as the replicas reach it: its TLS, the seal key of
        // the CA's private keys.
        for flag in ["--seal-key", "--etcd-ca", "--etcd-cert", "--etcd-key"] {
            if let Some(i) = self.control_args.iter().position(|a| a == flag) {
                all.push(flag);
                all.push(self.control_args[i + 1].as_str());
            }
        }
        all.extend_from_slice(args);
        tandem_ok(&all)
    }

    pub fn write_config(&self, file: &str, text: &str) {
        // Write then rename, as editors and `git checkout` do.
        let tmp = self.dir.0.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.config_dir.join(file)).unwrap();
    }

    /// Starts a demo app (with `app_args`) and its sidecar (with `proxy_args`).
    pub fn instance(
        &self,
        service: &str,
        instance: &str,
        app_args: &[&str],
        proxy_args: &[&str],
    ) -> Instance {
        self.instance_with_upstreams(service, instance, app_args, proxy_args, &[])
    }

    pub fn instance_with_upstreams(
        &self,
        service: &str,
        instance: &str,
        app_args: &[&str],
        proxy_args: &[&str],
        upstreams: &[&str],
    ) -> Instance {
        let app_addr = free_port();
        let http_proxy = free_port();
        let mut app = vec![
            "demo-app".to_string(),
            "--listen".into(),
            app_addr.to_string(),
            "--service".into(),
            service.into(),
            "--instance".into(),
            instance.into(),
            "--proxy".into(),
            http_proxy.to_string(),
        ];
        app.extend(app_args.iter().map(|s| s.to_string()));
        let app_proc = Proc::spawn(&format!("{instance}-app"), &app, &self.dir.0);
        let mut inst = Instance {
            service: service.into(),
            instance: instance.into(),
            app_addr,
            inbound: free_port(),
            admin: free_port(),
            http_proxy,
            upstreams: upstreams
                .iter()
                .map(|u| (u.to_string(), free_port()))
                .collect(),
            tcp_echo: app_args
                .iter()
                .position(|a| *a == "--tcp-echo")
                .and_then(|i| app_args.get(i + 1))
                .and_then(|a| a.parse().ok()),
            app: Some(app_proc),
            proxy: None,
        };
        self.start_proxy(&mut inst, proxy_args);
        inst
    }

    /// Starts (or restarts) an instance's sidecar. When the app was started
    /// with `--tcp-echo ADDR`, the sidecar's app is that TCP echo server.
    pub fn start_proxy(&self, inst: &mut Instance, extra: &[&str]) {
        let app_target = inst.tcp_echo.unwrap_or(inst.app_addr);
        let mut args = vec!["proxy".to_string()];
        // A test may say which replicas, in which order.
        if !extra.contains(&"--control") {
            args.push("--control".into());
            args.push(if self.replicas.is_empty() {
                format!("http://{}", self.grpc)
            } else {
                self.control_urls(0)
            });
        }
        args.extend([
            "--service".to_string(),
            inst.service.clone(),
            "--instance".into(),
            inst.instance.clone(),
            "--inbound".into(),
            inst.inbound.to_string(),
            "--app".into(),
            app_target.to_string(),
            "--admin".into(),
            inst.admin.to_string(),
            "--http-proxy".into(),
            inst.http_proxy.to_string(),
        ]);
        // A test may bring its own credentials.
        if !extra
            .iter()
            .any(|a| *a == "--token" || *a == "--token-file")
        {
            args.push("--token".into());
            args.push(self.token(&inst.service));
        }
        for (name, addr) in &inst.upstreams {
            args.push("--upstream".into());
            args.push(format!("{name}={addr}"));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        inst.proxy = Some(Proc::spawn(
            &format!("{}-proxy", inst.instance),
            &args,
            &self.dir.0,
        ));
        let admin = inst.admin;
        wait_for(
            &format!("{} sidecar ready", inst.instance),
            Duration::from_secs(20),
            || http_get(admin, "admin", "/ready").filter(|(s, _)| *s == 200),
        );
    }

    /// Proxy rows from `/api/v1/proxies`.
    pub fn proxies(&self) -> Vec<serde_json::Value> {
        self.api_json("/api/v1/proxies")
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }

    /// Waits until every connected proxy has acknowledged the newest
    /// snapshot it was sent, and `n` proxies are connected.
    pub fn wait_converged(&self, n: usize) {
        wait_for("proxies to converge", Duration::from_secs(20), || {
            let ps = self.proxies();
            let ok = ps.len() == n
                && ps
                    .iter()
                    .all(|p| p["connected"] == true && p["config_acked"] == true);
            ok.then_some(())
        });
    }
}

impl Instance {
    pub fn upstream(&self, name: &str) -> SocketAddr {
        self.upstreams
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .unwrap()
    }

    pub fn proxy(&self) -> &Proc {
        self.proxy.as_ref().unwrap()
    }

    pub fn proxy_mut(&mut self) -> &mut Proc {
        self.proxy.as_mut().unwrap()
    }

    /// The sidecar's `/metrics` text, whole, in OpenMetrics as Prometheus
    /// asks for it (it must answer 200 and end with the `# EOF` line, or
    /// the test fails: an empty text would make every "this count is 0"
    /// check pass).
    pub fn metrics(&self) -> String {
        let (status, body) = http_request(
            self.admin,
            "GET",
            "/metrics",
            &[
                ("Host", "admin"),
                (
                    "Accept",
                    "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
                ),
            ],
        )
        .unwrap_or_else(|| panic!("{}: no answer from /metrics", self.instance));
        assert!(
            status == 200 && body.ends_with("# EOF\n"),
            "{}: /metrics answered {status} with an incomplete text",
            self.instance
        );
        body
    }

    /// Waits until the value of `series` satisfies `ok`; returns it (a
    /// missing series counts as 0).
    pub fn wait_metric(&self, series: &str, timeout: Duration, ok: impl Fn(f64) -> bool) -> f64 {
        wait_for(&format!("{series} on {}", self.instance), timeout, || {
            let v = metric(&self.metrics(), series).unwrap_or(0.0);
            ok(v).then_some(v)
        })
    }

    /// The app's gate `key` (`/held`): arrived, waiting, released,
    /// cancelled, max_waiting.
    pub fn held(&self, key: &str) -> serde_json::Value {
        app_json(self.app_addr, &format!("/held?key={key}"))
    }

    /// Waits until `n` requests wait at the app's gate `key`.
    pub fn wait_held(&self, key: &str, n: u64, timeout: Duration) {
        wait_for(
            &format!("{n} requests held at {key} on {}", self.instance),
            timeout,
            || (self.held(key)["waiting"].as_u64() == Some(n)).then_some(()),
        );
    }

    /// Opens the app's gate `key`: the requests held there go on.
    pub fn open(&self, key: &str) {
        app_json(self.app_addr, &format!("/open?key={key}"));
    }

    /// The app's counters for requests with `key=KEY` in their query
    /// (every request for the empty key): started, completed, cancelled,
    /// in_flight, max_in_flight.
    pub fn counters(&self, key: &str) -> serde_json::Value {
        app_json(self.app_addr, &format!("/counters?key={key}"))
    }

    /// Waits until no request of `key` is in progress at the app; its
    /// counters then.
    pub fn wait_settled(&self, key: &str, timeout: Duration) -> serde_json::Value {
        wait_for(
            &format!("requests of {key:?} to end at {}", self.instance),
            timeout,
            || {
                let c = self.counters(key);
                (c["in_flight"] == 0).then_some(c)
            },
        )
    }

    /// Instance names of the endpoints this sidecar's snapshot lists for
    /// `backend` of `destination`; `None` while it has no such destination.
    pub fn endpoints(&self, destination: &str, backend: &str) -> Option<Vec<String>> {
        let (_, body) = http_get(self.admin, "admin", "/config")?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let d = v["snapshot"]["destinations"]
            .as_array()?
            .iter()
            .find(|d| d["name"] == destination)?;
        let b = d["backends"]
            .as_array()?
            .iter()
            .find(|b| b["name"] == backend)?;
        let eps = b["endpoints"].as_array()?;
        Some(
            eps.iter()
                .map(|e| e["instance"].as_str().unwrap_or("").to_string())
                .collect(),
        )
    }

    pub fn config_version(&self) -> u64 {
        http_get(self.admin, "admin", "/config")
            .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
            .and_then(|v| v["version"].as_u64())
            .unwrap_or(0)
    }
}

/// A JSON answer of a demo app, asked directly (not through a sidecar).
fn app_json(app: SocketAddr, path: &str) -> serde_json::Value {
    let (status, body) =
        http_get(app, "app", path).unwrap_or_else(|| panic!("no answer from the app at {app}"));
    assert_eq!(status, 200, "app {app}{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// Waits until both RSS stop growing: the most of both is the same over
/// the last 40 samples (2 s of `wait_for`'s polls), up to 60 s.
pub fn settled_rss(a: &Instance, b: &Instance) -> (u64, u64) {
    const QUIET: usize = 40;
    let mut samples: Vec<(u64, u64)> = Vec::new();
    wait_for("RSS to stop growing", Duration::from_secs(60), || {
        samples.push((a.proxy().rss_kib(), b.proxy().rss_kib()));
        let n = samples.len();
        if n <= QUIET {
            return None;
        }
        let before = samples[..n - QUIET]
            .iter()
            .fold((0, 0), |m, s| (m.0.max(s.0), m.1.max(s.1)));
        let all = samples
            .iter()
            .fold((0, 0), |m, s| (m.0.max(s.0), m.1.max(s.1)));
        (before == all).then_some(all)
    })
}

/// A Service resource.
pub fn service_yaml(name: &str, protocol: &str) -> String {
    format!(
        "apiVersion: tandem.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  ports: [{{name: main, port: 8080, protocol: {protocol}}}]\n---\n"
    )
}

/// An HTTPRoute splitting `parent` over weighted backends.
pub fn split_yaml(parent: &str, backends: &[(&str, u32)]) -> String {
    let mut s = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {parent}}}\nspec:\n  parentRefs: [{{kind: Service, name: {parent}, port: 8080}}]\n  rules:\n    - matches: [{{headers: [{{name: x-canary, value: \"1\"}}]}}]\n      backendRefs: [{{name: {}, port: 8080}}]\n    - backendRefs:\n",
        backends.last().map(|b| b.0).unwrap_or(parent)
    );
    for (name, w) in backends {
        s.push_str(&format!(
            "        - {{name: {name}, port: 8080, weight: {w}}}\n"
        ));
    }
    s.push_str("---\n");
    s
}

/// Steady HTTP load in background threads: each sends `GET path` with
/// `Host: host` to `addr` over fresh connections, one after the other.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ok: std::sync::Arc<std::sync::atomic::AtomicU64>,
    threads: Vec<std::thread::JoinHandle<(u64, Vec<String>)>>,
}

impl Load {
    pub fn start(
        addr: SocketAddr,
        host: &str,
        path: &str,
        threads: usize,
        pause: Duration,
    ) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let total = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let threads = (0..threads)
            .map(|_| {
                let (stop, host, path) = (stop.clone(), host.to_string(), path.to_string());
                let total = total.clone();
                std::thread::spawn(move || {
                    let (mut ok, mut failed) = (0u64, Vec::new());
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        match http_get(addr, &host, &path) {
                            Some((200, _)) => {
                                ok += 1;
                                total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            other => failed.push(format!("{other:?}")),
                        }
                        std::thread::sleep(pause);
                    }
                    (ok, failed)
                })
            })
            .collect();
        Load {
            stop,
            ok: total,
            threads,
        }
    }

    /// Requests answered 200 so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until `more` further requests have been answered 200.
    pub fn wait_progress(&self, more: u64, timeout: Duration) {
        let target = self.ok() + more;
        wait_for(&format!("{more} more requests answered"), timeout, || {
            (self.ok() >= target).then_some(())
        });
    }

    /// Stops; returns (answered 200, descriptions of the failures).
    pub fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (mut ok, mut failed) = (0, Vec::new());
        for t in self.threads {
            let (o, f) = t.join().unwrap();
            ok += o;
            failed.extend(f);
        }
        (ok, failed)
    }
}

/// The value of a counter or gauge line (`name{labels} value`) in metrics text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The sum of every series of metric `name` whose labels include all of
/// `labels` (each `(label, value)`).
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (set, value) = match rest.strip_prefix('{') {
                Some(r) => {
                    let (set, v) = r.split_once("} ")?;
                    (set, v)
                }
                None => ("", rest.strip_prefix(' ')?),
            };
            let has = |k: &str, v: &str| set.split(',').any(|kv| kv == format!("{k}=\"{v}\""));
            labels
                .iter()
                .all(|(k, v)| has(k, v))
                .then(|| value.trim().parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// A small multi-threaded runtime for async clients inside a test.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// HTTP/2 streams whose client never opens its flow-control window: the
/// server can send their response heads but no byte of their bodies.
/// Dropping it closes every connection.
pub struct Stalled {
    /// Streams that got their response head.
    pub heads: usize,
    _clients: Vec<h2::client::SendRequest<bytes::Bytes>>,
    _bodies: Vec<h2::RecvStream>,
    conns: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Stalled {
    fn drop(&mut self) {
        for c in &self.conns {
            c.abort();
        }
    }
}

impl Stalled {
    /// Opens `n` streams `GET path` (`Host: host`) to `addr` over h2c,
    /// at most `per_conn` per connection, each advertising a stream window
    /// of 0; returns once each has its response head or failed.
    pub async fn open(
        addr: SocketAddr,
        host: &str,
        path: &str,
        n: usize,
        per_conn: usize,
    ) -> Stalled {
        let mut s = Stalled {
            heads: 0,
            _clients: Vec::new(),
            _bodies: Vec::new(),
            conns: Vec::new(),
        };
        let mut pending = Vec::new();
        let mut left = n;
        while left > 0 {
            let k = left.min(per_conn.max(1));
            left -= k;
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut client, conn) = h2::client::Builder::new()
                .initial_window_size(0)
                .handshake::<_, bytes::Bytes>(tcp)
                .await
                .unwrap();
            s.conns.push(tokio::spawn(async move {
                let _ = conn.await;
            }));
            for _ in 0..k {
                client = client.ready().await.unwrap();
                let req = http::Request::get(format!("http://{host}{path}"))
                    .body(())
                    .unwrap();
                let (resp, _) = client.send_request(req, true).unwrap();
                pending.push(resp);
            }
            s._clients.push(client);
        }
        for resp in pending {
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(60), resp).await {
                s.heads += 1;
                s._bodies.push(r.into_body());
            }
        }
        s
    }
}

/// A Python with the official OpenTelemetry protos and grpcio: the venv
/// `scripts/test` makes (`target/e2e-venv`), made here if it is missing.
pub fn otlp_python() -> &'static Path {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let venv = std::env::var("TANDEM_E2E_VENV")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root.join("target/e2e-venv"));
        let python = venv.join("bin/python");
        let ready = |p: &Path| {
            Command::new(p)
                .args([
                    "-c",
                    "import grpc, opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc",
                ])
                .status()
                .is_ok_and(|s| s.success())
        };
        if !ready(&python) {
            let ok = Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv)
                .status()
                .is_ok_and(|s| s.success())
                && Command::new(venv.join("bin/pip"))
                    .args(["install", "--quiet", "grpcio", "opentelemetry-proto"])
                    .status()
                    .is_ok_and(|s| s.success());
            assert!(ok && ready(&python), "cannot make {}", venv.display());
        }
        python
    })
}

/// A real OTLP receiver (`tools/otlp_receiver.py`: the official protos
/// over gRPC and HTTP/protobuf); every span it gets is a JSON line.
pub struct Collector {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    out: PathBuf,
    child: Child,
    _dir: TempDir,
}

impl Collector {
    pub fn start() -> Collector {
        use std::io::BufRead;
        let dir = TempDir::new("otlp");
        let (grpc, http) = (free_port(), free_port());
        let out = dir.0.join("spans.jsonl");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/otlp_receiver.py");
        let mut child = Command::new(otlp_python())
            .arg(script)
            .args([grpc.port().to_string(), http.port().to_string()])
            .arg(&out)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("OTLP receiver");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("receiver output");
        assert_eq!(line.trim(), "ready", "the OTLP receiver did not start");
        Collector {
            grpc,
            http,
            out,
            child,
            _dir: dir,
        }
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A process killed (and reaped) when the test ends, however it ends.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `tandem up --plain --rps 20` with its state in `dir/state` and its API on
/// `api`, its output in `dir/up.out`, with `env` added to its environment.
pub fn start_up(dir: &TempDir, api: SocketAddr, env: &[(&str, String)]) -> Child {
    let log = std::fs::File::create(dir.0.join("up.out")).expect("log");
    Command::new(bin())
        .args(["up", "--plain", "--rps", "20", "--state-dir"])
        .arg(dir.0.join("state"))
        .args([
            "--api",
            &api.to_string(),
            "--listen",
            &free_port().to_string(),
        ])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("tandem up")
}

/// A capture of loopback traffic on `port`, until stopped.
pub struct Capture {
    child: Child,
    file: PathBuf,
    /// A port of the test's own: a write to it marks the end of the
    /// capture, so stopping waits for the mark instead of a guessed time.
    mark: std::net::TcpListener,
}

const END_MARK: &[u8] = b"tandem-capture-ends-here";

impl Capture {
    pub fn start(dir: &Path, port: u16) -> Capture {
        let file = dir.join(format!("cap-{port}.pcap"));
        let err = dir.join(format!("cap-{port}.err"));
        let mark = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mark_port = mark.local_addr().unwrap().port();
        let child = Command::new("tcpdump")
            // Immediate mode: packets reach the file as they are seen, not
            // in blocks that an interrupt would lose.
            .args(["--immediate-mode", "-i", "lo", "-U", "-s", "0", "-w"])
            .arg(&file)
            .arg(format!("tcp port {port} or tcp port {mark_port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("tcpdump is installed (the test command installs it)");
        wait_for("tcpdump listening", Duration::from_secs(10), || {
            std::fs::read_to_string(&err)
                .ok()
                .filter(|s| s.contains("listening on"))
        });
        Capture { child, file, mark }
    }

    /// Stops the capture once everything sent before the call is in the
    /// file (tcpdump writes packets in the order it sees them, so the end
    /// mark is last); the captured bytes.
    pub fn stop(mut self) -> Vec<u8> {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(self.mark.local_addr().unwrap()).unwrap();
        s.write_all(END_MARK).unwrap();
        wait_for(
            "the end mark in the capture",
            Duration::from_secs(10),
            || {
                let bytes = std::fs::read(&self.file).ok()?;
                contains(&bytes, END_MARK).then_some(())
            },
        );
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        std::fs::read(&self.file).unwrap()
    }
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
