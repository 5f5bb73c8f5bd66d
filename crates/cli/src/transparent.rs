//! `tandem run --transparent`: the app runs in a network namespace of its
//! own, joined to this host's by a veth pair, and every TCP connection it
//! makes is redirected to its sidecar.
//!
//! ```text
//!   app netns                         host netns
//!   app ──► 169.254.N.2 ══ veth ══ 169.254.N.1 ──► PREROUTING -i veth -p tcp
//!   resolv.conf: nameserver 169.254.N.1            -j REDIRECT → sidecar's
//!                                                  --transparent port
//!                                  sidecar --dns 169.254.N.1:53
//!                                  sidecar --app 169.254.N.2:PORT ──► app
//! ```
//!
//! The sidecar runs in the host's namespace: its own connections (to other
//! sidecars, to outside hosts, to the app) never pass the redirect, which
//! matches only what enters from the app's veth. The app has a default
//! route through its sidecar's side and nothing else, so only TCP and DNS
//! leave its namespace. Everything is undone when `tandem run` ends (the
//! namespace, the veth pair, the rule, `/etc/netns/<name>`).
//!
//! Needs root (or `CAP_NET_ADMIN` and `CAP_SYS_ADMIN`) and the `ip`
//! (iproute2) and `iptables` commands.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use anyhow::Context;

/// The app's namespace and what was set up for it; what this run made is
/// undone on drop, and only that.
pub(crate) struct Jail {
    pub(crate) name: String,
    /// This side's address: the sidecar's transparent port and DNS.
    pub(crate) host_ip: Ipv4Addr,
    /// The app's address in its namespace.
    pub(crate) app_ip: Ipv4Addr,
    veth: String,
    netns: bool,
    link: bool,
    /// The rules added, as `iptables` arguments after `-A`/`-D`.
    rules: Vec<Vec<String>>,
    etc: Option<PathBuf>,
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| {
        format!("cannot run `{program}`: --transparent needs the `ip` (iproute2) and `iptables` commands")
    })?;
    if !out.status.success() {
        anyhow::bail!(
            "`{program} {}` failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim(),
            if permission_hint(&out.stderr) {
                " (--transparent needs root, or CAP_NET_ADMIN and CAP_SYS_ADMIN)"
            } else {
                ""
            }
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn permission_hint(stderr: &[u8]) -> bool {
    let s = String::from_utf8_lossy(stderr);
    s.contains("Operation not permitted") || s.contains("Permission denied")
}

impl Jail {
    /// Creates the namespace and the redirect to `transparent_port`, for
    /// the app of `tandem run` process `pid`.
    pub(crate) fn create(pid: u32, transparent_port: u16) -> anyhow::Result<Jail> {
        let name = format!("tandem-{pid}");
        // Interface names have at most 15 characters.
        let veth = format!("tdm{pid}h");
        let peer = format!("tdm{pid}a");
        let used = run("ip", &["-4", "-o", "addr", "show"])?;
        // Searched from a place that depends on the pid, so that two
        // `tandem run` starting at once rarely pick the same one (169 is
        // left out: 169.254.169.254 is a cloud's metadata service).
        let start = (pid % 254) as usize;
        let n = (1..=254u8)
            .cycle()
            .skip(start)
            .take(254)
            .filter(|n| *n != 169)
            .find(|n| !used.contains(&format!("169.254.{n}.")))
            .context("no free 169.254.N.0/30 network for the app's namespace")?;
        let host_ip = Ipv4Addr::new(169, 254, n, 1);
        let app_ip = Ipv4Addr::new(169, 254, n, 2);
        let mut jail = Jail {
            name: name.clone(),
            host_ip,
            app_ip,
            veth: veth.clone(),
            netns: false,
            link: false,
            rules: Vec::new(),
            etc: None,
        };
        run("ip", &["netns", "add", &name])?;
        jail.netns = true;
        let (h, a) = (format!("{host_ip}/30"), format!("{app_ip}/30"));
        let gw = host_ip.to_string();
        let inside = |args: &[&str]| -> anyhow::Result<String> {
            let mut all = vec!["netns", "exec", &name];
            all.extend_from_slice(args);
            run("ip", &all)
        };
        run(
            "ip",
            &[
                "link", "add", &veth, "type", "veth", "peer", "name", &peer, "netns", &name,
            ],
        )?;
        jail.link = true;
        run("ip", &["addr", "add", &h, "dev", &veth])?;
        run("ip", &["link", "set", &veth, "up"])?;
        // IPv4 only: no IPv6 link-local way around the sidecar.
        inside(&[
            "sh",
            "-c",
            "d=/proc/sys/net/ipv6/conf; [ ! -d $d ] || { echo 1 > $d/all/disable_ipv6 && echo 1 > $d/default/disable_ipv6; }",
        ])?;
        inside(&["ip", "addr", "add", &a, "dev", &peer])?;
        inside(&["ip", "link", "set", &peer, "up"])?;
        inside(&["ip", "link", "set", "lo", "up"])?;
        inside(&["ip", "route", "add", "default", "via", &gw])?;
        // A rule left by an earlier run with this pid (killed with -9)
        // would match this veth first: removed.
        for table in ["filter", "nat"] {
            let listed = run("iptables", &["-t", table, "-S"])?;
            for line in listed.lines() {
                let words: Vec<&str> = line.split_whitespace().collect();
                if words.first() == Some(&"-A") && words.windows(2).any(|w| w == ["-i", &*veth]) {
                    let mut del = vec!["-t", table, "-D"];
                    del.extend(&words[1..]);
                    run("iptables", &del)?;
                }
            }
        }
        let port = transparent_port.to_string();
        let rules: [&[&str]; 2] = [
            // Every TCP connection of the app goes to the sidecar.
            &[
                "-t",
                "nat",
                "PREROUTING",
                "-i",
                &veth,
                "-p",
                "tcp",
                "-j",
                "REDIRECT",
                "--to-ports",
                &port,
            ],
            // Nothing of the app's is routed on by this host (UDP other
            // than the sidecar's DNS goes nowhere).
            &["-t", "filter", "FORWARD", "-i", &veth, "-j", "DROP"],
        ];
        for rule in rules {
            let rule: Vec<String> = rule.iter().map(|s| s.to_string()).collect();
            let mut add = vec![rule[0].as_str(), rule[1].as_str(), "-A"];
            add.extend(rule[2..].iter().map(String::as_str));
            run("iptables", &add)?;
            jail.rules.push(rule);
        }
        // `ip netns exec` puts /etc/netns/<name>/resolv.conf in place of
        // /etc/resolv.conf for the app.
        let etc = PathBuf::from("/etc/netns").join(&name);
        std::fs::create_dir_all(&etc)
            .with_context(|| format!("cannot create {}", etc.display()))?;
        jail.etc = Some(etc.clone());
        std::fs::write(
            etc.join("resolv.conf"),
            format!(
                "# written by tandem run --transparent\nnameserver {host_ip}\noptions ndots:1\n"
            ),
        )
        .with_context(|| format!("cannot write {}/resolv.conf", etc.display()))?;
        Ok(jail)
    }

    /// What runs a command inside the namespace: `ip netns exec NAME`
    /// (which becomes the command: same pid).
    pub(crate) fn exec_prefix(&self) -> [String; 4] {
        ["ip", "netns", "exec", &self.name].map(str::to_string)
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        for rule in self.rules.drain(..) {
            let mut del = vec![rule[0].as_str(), rule[1].as_str(), "-D"];
            del.extend(rule[2..].iter().map(String::as_str));
            if let Err(e) = run("iptables", &del) {
                eprintln!("tandem run: {e:#}");
            }
        }
        // Deleting the namespace deletes the app's end of the veth pair,
        // and with it this end.
        if self.netns {
            if let Err(e) = run("ip", &["netns", "del", &self.name]) {
                eprintln!("tandem run: {e:#}");
            }
        }
        if self.link {
            let _ = run("ip", &["link", "del", &self.veth]);
        }
        if let Some(etc) = self.etc.take() {
            let _ = std::fs::remove_dir_all(etc);
        }
    }
}
