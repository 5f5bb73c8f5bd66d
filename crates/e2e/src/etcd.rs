//! Real etcd clusters for the tests: `etcd` processes (Debian's
//! etcd-server) on free loopback ports, each member with its own data
//! directory, stopped and started again at will.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{free_port, wait_for, TempDir};

pub struct EtcdCluster {
    pub dir: TempDir,
    pub members: Vec<Member>,
    token: String,
    /// Client TLS, when the members require it.
    pub tls: Option<Tls>,
}

/// PEM files of a TLS etcd: its CA, the members' certificate (for
/// 127.0.0.1) and a client certificate the members require.
#[derive(Clone)]
pub struct Tls {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Tls {
    /// A CA and certificates made for the test, under `dir`.
    pub fn generate(dir: &std::path::Path) -> Tls {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let ca_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::CommonName, "test etcd CA");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = p.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(p, ca_key);
        let leaf = |name: &str, sans: Vec<String>, client: bool| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(sans).unwrap();
            p.distinguished_name.push(DnType::CommonName, name);
            p.extended_key_usages = if client {
                vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth]
            } else {
                vec![
                    rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                    rcgen::ExtendedKeyUsagePurpose::ClientAuth,
                ]
            };
            let cert = p.signed_by(&key, &issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let (sc, sk) = leaf("etcd", vec!["127.0.0.1".into(), "localhost".into()], false);
        let (cc, ck) = leaf("tandem", vec![], true);
        Tls {
            ca: write("etcd-ca.pem", &ca.pem()),
            server_cert: write("etcd-server.pem", &sc),
            server_key: write("etcd-server.key", &sk),
            client_cert: write("etcd-client.pem", &cc),
            client_key: write("etcd-client.key", &ck),
        }
    }
}

pub struct Member {
    pub name: String,
    pub client: SocketAddr,
    pub peer: SocketAddr,
    pub data: PathBuf,
    child: Option<Child>,
}

impl EtcdCluster {
    /// A cluster of `n` members, started and healthy.
    pub fn start(n: usize) -> EtcdCluster {
        Self::start_with(n, false)
    }

    /// A cluster whose members serve clients over TLS only and require a
    /// client certificate.
    pub fn start_tls(n: usize) -> EtcdCluster {
        Self::start_with(n, true)
    }

    fn start_with(n: usize, tls: bool) -> EtcdCluster {
        let dir = TempDir::new("etcd");
        let tls = tls.then(|| Tls::generate(&dir.0));
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_port(),
                peer: free_port(),
                data: dir.0.join(format!("m{i}")),
                child: None,
            })
            .collect();
        let token = format!(
            "tandem-e2e-{}-{}",
            std::process::id(),
            members[0].client.port()
        );
        let mut c = EtcdCluster {
            dir,
            members,
            token,
            tls,
        };
        for i in 0..n {
            c.start_member(i);
        }
        c.wait_healthy();
        c
    }

    /// `etcd://a,b,c` with the members' client addresses (and `prefix`).
    pub fn url(&self, prefix: &str) -> String {
        let hosts: Vec<String> = self.members.iter().map(|m| m.client.to_string()).collect();
        format!("etcd://{}{prefix}", hosts.join(","))
    }

    pub fn start_member(&mut self, i: usize) {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer))
            .collect();
        let m = &self.members[i];
        let log = std::fs::File::create(self.dir.0.join(format!("{}.log", m.name))).unwrap();
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut cmd = Command::new("etcd");
        if let Some(t) = &self.tls {
            cmd.args(["--cert-file", &t.server_cert.display().to_string()])
                .args(["--key-file", &t.server_key.display().to_string()])
                .args(["--trusted-ca-file", &t.ca.display().to_string()])
                .arg("--client-cert-auth");
        }
        let child = cmd
            .args([
                "--name",
                &m.name,
                "--data-dir",
                &m.data.display().to_string(),
                "--listen-client-urls",
                &format!("{scheme}://{}", m.client),
                "--advertise-client-urls",
                &format!("{scheme}://{}", m.client),
                "--listen-peer-urls",
                &format!("http://{}", m.peer),
                "--initial-advertise-peer-urls",
                &format!("http://{}", m.peer),
                "--initial-cluster",
                &initial.join(","),
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                &self.token,
                "--heartbeat-interval",
                "100",
                "--election-timeout",
                "1000",
                "--log-level",
                "warn",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("etcd (Debian's etcd-server) must be installed; scripts/test installs it");
        self.members[i].child = Some(child);
    }

    /// Kills a member (SIGKILL: no goodbye to the others).
    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills every member.
    pub fn kill_all(&mut self) {
        for i in 0..self.members.len() {
            self.kill_member(i);
        }
    }

    /// Starts every stopped member again and waits for the cluster.
    pub fn start_all(&mut self) {
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                self.start_member(i);
            }
        }
        self.wait_healthy();
    }

    /// `etcdctl` against the running members (with the client
    /// certificate, over TLS).
    pub fn etcdctl(&self) -> Command {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let running: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| format!("{scheme}://{}", m.client))
            .collect();
        let mut c = Command::new("etcdctl");
        c.env("ETCDCTL_API", "3")
            .args(["--endpoints", &running.join(","), "--dial-timeout", "1s"]);
        if let Some(t) = &self.tls {
            c.args(["--cacert", &t.ca.display().to_string()])
                .args(["--cert", &t.client_cert.display().to_string()])
                .args(["--key", &t.client_key.display().to_string()]);
        }
        c
    }

    /// Waits until every running member reports healthy.
    pub fn wait_healthy(&self) {
        wait_for("etcd healthy", Duration::from_secs(20), || {
            let out = self.etcdctl().args(["endpoint", "health"]).output().ok()?;
            out.status.success().then_some(())
        });
    }

    /// `etcdctl get --prefix KEY`: the keys found.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let out = self
            .etcdctl()
            .args(["get", "--prefix", "--keys-only", prefix])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for m in &self.members {
                let log = std::fs::read_to_string(self.dir.0.join(format!("{}.log", m.name)))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                eprintln!("---- etcd {} ----", m.name);
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        self.kill_all();
    }
}
