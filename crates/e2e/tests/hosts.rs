//! Sidecars and the control plane on separate hosts: network namespaces
//! joined by veth pairs and a bridge. Nothing may assume loopback between
//! them: each proxy advertises the address the others reach it at.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use tandem_e2e::netns::Network;
use tandem_e2e::*;

#[test]
fn a_call_between_hosts_crosses_the_link_as_verified_mtls() {
    let net = Network::new(3);
    let dir = TempDir::new("hosts");
    let config = dir.0.join("config");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(config.join("mesh.yaml"), common::config()).unwrap();
    let data = dir.0.join("data");
    let s = |v: &str| v.to_string();
    let (h0, h1, h2) = (&net.hosts[0].ip, &net.hosts[1].ip, &net.hosts[2].ip);

    // Host 0: the control plane, reachable on the link only.
    let _control = net.spawn(
        0,
        "control",
        &[
            s("control"),
            s("--config"),
            config.display().to_string(),
            s("--data"),
            data.display().to_string(),
            s("--listen"),
            format!("{h0}:7700"),
            s("--api"),
            format!("{h0}:7701"),
        ],
        &dir.0,
    );
    wait_for(
        "the control plane on host 0",
        Duration::from_secs(20),
        || {
            net.curl(1, &[&format!("http://{h0}:7701/healthz")])
                .filter(|r| r.0 == 200)
        },
    );
    let token = |svc: &str| {
        tandem_ok(&[
            "token",
            "create",
            "--service",
            svc,
            "--data",
            &data.display().to_string(),
        ])
    };
    let control = format!("http://{h0}:7700");

    // Host 2: catalog-v1, its sidecar listening on every address and
    // advertising the one on the link.
    let _app = net.spawn(
        2,
        "catalog-app",
        &[
            s("demo-app"),
            s("--listen"),
            s("127.0.0.1:8080"),
            s("--service"),
            s("catalog-v1"),
        ],
        &dir.0,
    );
    let _catalog = net.spawn(
        2,
        "catalog-proxy",
        &[
            s("proxy"),
            s("--control"),
            control.clone(),
            s("--service"),
            s("catalog-v1"),
            s("--instance"),
            s("catalog-1"),
            s("--inbound"),
            s("0.0.0.0:8443"),
            s("--advertise"),
            format!("{h2}:8443"),
            s("--app"),
            s("127.0.0.1:8080"),
            s("--admin"),
            s("127.0.0.1:9901"),
            s("--token"),
            token("catalog-v1"),
        ],
        &dir.0,
    );
    // Host 1: the client's sidecar, with a local port for catalog-v1.
    let _client = net.spawn(
        1,
        "client-proxy",
        &[
            s("proxy"),
            s("--control"),
            control.clone(),
            s("--service"),
            s("client"),
            s("--instance"),
            s("client-1"),
            s("--inbound"),
            format!("{h1}:8443"),
            s("--app"),
            s("127.0.0.1:8080"),
            s("--admin"),
            s("127.0.0.1:9901"),
            s("--upstream"),
            s("catalog-v1=127.0.0.1:9001"),
            s("--token"),
            token("client"),
        ],
        &dir.0,
    );
    for host in [1, 2] {
        wait_for("sidecar ready", Duration::from_secs(20), || {
            net.curl(host, &["http://127.0.0.1:9901/ready"])
                .filter(|r| r.0 == 200)
        });
    }

    // Everything that crosses host 2's link to the sidecar, captured there.
    let pcap = dir.0.join("link.pcap");
    let err = dir.0.join("tcpdump.err");
    let mut tcpdump = Command::new("ip")
        .args(["netns", "exec", &net.hosts[2].ns])
        .args([
            "tcpdump",
            "--immediate-mode",
            "-i",
            "eth0",
            "-U",
            "-s",
            "0",
            "-w",
        ])
        .arg(&pcap)
        .arg("tcp port 8443")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("tcpdump is installed (the test command installs it)");
    wait_for("tcpdump listening", Duration::from_secs(10), || {
        std::fs::read_to_string(&err)
            .ok()
            .filter(|s| s.contains("listening on"))
    });

    let marker = "tandem-marker-3c1f-across-the-link";
    let (status, body) = wait_for(
        "a call from host 1 to host 2",
        Duration::from_secs(10),
        || {
            net.curl(
                1,
                &[
                    "-H",
                    &format!("x-marker: {marker}"),
                    "http://127.0.0.1:9001/headers",
                ],
            )
            .filter(|r| r.0 == 200)
        },
    );
    assert_eq!(status, 200);
    // The catalog app got the request, with the caller's identity as its
    // sidecar verified it from the client's certificate.
    assert!(body.contains(marker), "{body}");
    assert!(
        body.contains("spiffe://tandem.local/ns/default/svc/client"),
        "{body}"
    );
    // The registry lists the advertised address, not the wildcard.
    let (_, endpoints) = net
        .curl(1, &["http://127.0.0.1:9901/config"])
        .expect("client's config");
    assert!(endpoints.contains(&format!("{h2}:8443")), "{endpoints}");
    assert!(!endpoints.contains("0.0.0.0"), "{endpoints}");

    let _ = Command::new("kill")
        .args(["-INT", &tcpdump.id().to_string()])
        .status();
    let _ = tcpdump.wait();
    let bytes = std::fs::read(&pcap).unwrap_or_default();
    let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    assert!(bytes.len() > 1000, "only {} bytes captured", bytes.len());
    assert!(
        !has(marker.as_bytes()),
        "the marker crossed the link in clear"
    );
    // TLS 1.3 records (handshake, then application data) on the link.
    assert!(
        has(&[0x16, 0x03, 0x01]) || has(&[0x16, 0x03, 0x03]),
        "no TLS handshake captured"
    );
    assert!(has(&[0x17, 0x03, 0x03]), "no TLS application data captured");
}

#[test]
fn a_sidecar_listening_everywhere_must_say_where_it_is_reached() {
    let dir = TempDir::new("advertise");
    let out = Command::new(bin())
        .args([
            "proxy",
            "--service",
            "web",
            "--instance",
            "web-1",
            "--inbound",
            "0.0.0.0:0",
            "--app",
            "127.0.0.1:1",
            "--admin",
            "127.0.0.1:0",
            "--token",
            "x.y",
        ])
        .current_dir(&dir.0)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("--advertise"), "{err}");
}
