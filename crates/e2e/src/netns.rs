//! Hosts for the tests: network namespaces joined by veth pairs to a
//! bridge that lives in a namespace of its own, so nothing of the
//! machine's own network is touched. Host `i` is `10.77.0.(i+1)/24` on its
//! `eth0`; everything is removed on drop.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::{bin, Proc};

pub struct Network {
    switch: String,
    pub hosts: Vec<Host>,
}

pub struct Host {
    /// The namespace's name.
    pub ns: String,
    /// Its address on the shared link.
    pub ip: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2) is installed");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Network {
    /// `n` hosts on one link.
    pub fn new(n: usize) -> Network {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let tag = format!(
            "{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let switch = format!("tdm-sw-{tag}");
        ip(&["netns", "add", &switch]);
        let mut net = Network {
            switch: switch.clone(),
            hosts: Vec::new(),
        };
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &switch, "link", "set", "br0", "up"]);
        for i in 0..n {
            let ns = format!("tdm-h{i}-{tag}");
            ip(&["netns", "add", &ns]);
            net.hosts.push(Host {
                ns: ns.clone(),
                ip: format!("10.77.0.{}", i + 1),
            });
            let port = format!("p{i}");
            ip(&[
                "link", "add", "name", &port, "netns", &switch, "type", "veth", "peer", "name",
                "eth0", "netns", &ns,
            ]);
            ip(&["-n", &switch, "link", "set", &port, "master", "br0"]);
            ip(&["-n", &switch, "link", "set", &port, "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.77.0.{}/24", i + 1),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        net
    }

    /// Runs a command on host `i` and waits for it.
    pub fn exec(&self, i: usize, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.hosts[i].ns])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("ip netns exec")
    }

    /// `tandem ARGS` on host `i`, as a test process (see [`Proc`]).
    pub fn spawn(&self, i: usize, name: &str, args: &[String], dir: &Path) -> Proc {
        let mut all = vec![
            "netns".to_string(),
            "exec".into(),
            self.hosts[i].ns.clone(),
            bin().display().to_string(),
        ];
        all.extend(args.iter().cloned());
        Proc::spawn_program("ip", name, &all, dir)
    }

    /// `curl -s ARGS` on host `i`: (HTTP status, body).
    pub fn curl(&self, i: usize, args: &[&str]) -> Option<(u16, String)> {
        let mut all = vec!["curl", "-s", "-m", "10", "-w", "\n%{http_code}"];
        all.extend_from_slice(args);
        let out = self.exec(i, &all);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n')?;
        Some((code.trim().parse().ok()?, body.to_string()))
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", &h.ns]).status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.switch])
            .status();
    }
}
