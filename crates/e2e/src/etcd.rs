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
        let dir = TempDir::new("etcd");
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
        let child = Command::new("etcd")
            .args([
                "--name",
                &m.name,
                "--data-dir",
                &m.data.display().to_string(),
                "--listen-client-urls",
                &format!("http://{}", m.client),
                "--advertise-client-urls",
                &format!("http://{}", m.client),
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

    /// Waits until every running member reports healthy.
    pub fn wait_healthy(&self) {
        let running: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| format!("http://{}", m.client))
            .collect();
        wait_for("etcd healthy", Duration::from_secs(20), || {
            let out = Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", &running.join(","), "--dial-timeout", "1s"])
                .args(["endpoint", "health"])
                .output()
                .ok()?;
            out.status.success().then_some(())
        });
    }

    /// `etcdctl get --prefix KEY`: the keys found.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let running: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| format!("http://{}", m.client))
            .collect();
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &running.join(",")])
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
