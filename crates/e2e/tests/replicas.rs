//! Control-plane replicas sharing a real 3-member etcd cluster: a proxy
//! whose replica dies moves to another with traffic flowing, a dead etcd
//! member changes nothing, registrations cross replicas, an unreachable
//! etcd leaves the replicas serving their cached view (and refusing
//! writes with a clear error), and a restart of everything keeps the CA
//! and rollout state.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use tandem_e2e::etcd::EtcdCluster;
use tandem_e2e::*;

fn config() -> String {
    let mut s = common::config();
    // A rollout whose state must survive the restarts.
    s.push_str(
        r#"
---
apiVersion: tandem.dev/v1alpha1
kind: Rollout
metadata: {name: catalog}
spec:
  service: catalog
  stable: catalog-v1
  canary: catalog-v2
  steps: [20, 50, 100]
  hold: 1h
"#,
    );
    s
}

/// The names of the proxies a replica holds, connected.
fn held_by(mesh: &Mesh, replica: usize) -> Vec<String> {
    let mut v: Vec<String> = mesh
        .replica_json(replica, "/api/v1/proxies")
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter(|p| p["connected"] == true)
        .filter_map(|p| p["instance"].as_str().map(str::to_string))
        .collect();
    v.sort();
    v
}

/// A replica of `mesh` on `store` with `extra` arguments, which must refuse
/// to start: its log.
fn refused_replica(mesh: &Mesh, store: &str, extra: &[&str]) -> String {
    let dir = TempDir::new("refused");
    let mut args: Vec<String> = [
        "control",
        "--config",
        &mesh.config_dir.display().to_string(),
        "--data",
        &dir.0.join("data").display().to_string(),
        "--listen",
        &free_port().to_string(),
        "--api",
        &free_port().to_string(),
        "--store",
        store,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut r = Proc::spawn("refused", &args, &dir.0);
    let status = r
        .wait_exit(patience(Duration::from_secs(30)))
        .expect("refused to start");
    assert!(!status.success());
    r.log_text()
}

#[test]
fn replicas_share_etcd_and_survive_failures() {
    let mut etcd = EtcdCluster::start(3);
    let url = etcd.url("/mesh");
    let mut mesh = Mesh::replicated(&config(), &url, 2);
    // web's sidecar talks to r0 first, catalog's to r1: a registration
    // through r1 must reach a proxy on r0.
    let web = mesh.instance_with_upstreams(
        "client",
        "client-1",
        &[],
        &["--control", &mesh.control_urls(0)],
        &["catalog-v1"],
    );
    let catalog = mesh.instance(
        "catalog-v1",
        "catalog-1",
        &[],
        &["--control", &mesh.control_urls(1)],
    );
    wait_for("each proxy on its replica", Duration::from_secs(10), || {
        (held_by(&mesh, 0) == ["client-1"] && held_by(&mesh, 1) == ["catalog-1"]).then_some(())
    });
    wait_for(
        "catalog's endpoint at client",
        Duration::from_secs(10),
        || (web.endpoints("catalog-v1", "catalog-v1")? == ["catalog-1"]).then_some(()),
    );
    let up = web.upstream("catalog-v1");
    assert_eq!(http_get(up, "catalog-v1", "/").map(|r| r.0), Some(200));
    // One CA for both replicas, one leader.
    let ca0 = mesh.replica_json(0, "/api/v1/ca").expect("ca");
    let ca1 = mesh.replica_json(1, "/api/v1/ca").expect("ca");
    assert_eq!(ca0["roots"], ca1["roots"]);
    let store = mesh.replica_json(0, "/api/v1/store").expect("store");
    assert_eq!(store["kind"], "etcd", "{store}");
    assert_eq!(
        store["replicas"].as_array().map(Vec::len),
        Some(2),
        "{store}"
    );
    assert_eq!(
        store["members"].as_array().map(Vec::len),
        Some(3),
        "{store}"
    );
    assert!(store["leader"].is_string(), "{store}");
    let api = mesh.replicas[0].api.to_string();
    let data = mesh.data_dir().display().to_string();
    let status = tandem_ok(&["status", "--api", &api, "--data", &data]);
    assert!(status.contains(&format!("STORE {url}")), "{status}");
    assert!(
        status.contains("REPLICAS") && status.contains("r1"),
        "{status}"
    );
    assert_eq!(
        status.matches("3.4.").count(),
        3,
        "three members up: {status}"
    );

    // Traffic flows all along what follows.
    let load = Load::start(up, "catalog-v1", "/", 2, Duration::from_millis(5));
    load.wait_progress(50, Duration::from_secs(10));

    // The replica client-1 uses dies: it moves to r1, traffic goes on.
    mesh.kill_replica(0);
    wait_for("client-1 on r1", Duration::from_secs(15), || {
        held_by(&mesh, 1)
            .contains(&"client-1".to_string())
            .then_some(())
    });
    load.wait_progress(50, Duration::from_secs(10));

    // An etcd member dies: everything goes on, and a new instance
    // registered through r1 reaches client-1.
    etcd.kill_member(0);
    let catalog2 = mesh.instance(
        "catalog-v1",
        "catalog-2",
        &[],
        &["--control", &mesh.control_urls(1)],
    );
    wait_for("catalog-2 at client-1", Duration::from_secs(10), || {
        (web.endpoints("catalog-v1", "catalog-v1")?.len() == 2).then_some(())
    });
    load.wait_progress(50, Duration::from_secs(10));
    etcd.start_member(0);
    etcd.wait_healthy();
    mesh.start_replica(0);

    // etcd unreachable: the replicas serve their cached view and refuse
    // writes with a clear error.
    etcd.kill_all();
    load.wait_progress(50, Duration::from_secs(10));
    let (status, body) = mesh.api_call("POST", "/api/v1/ca/rotate").expect("answer");
    assert_ne!(status, 200, "{body}");
    assert!(body.contains("etcd is unreachable"), "{status} {body}");
    let (ok, failed) = load.finish();
    assert!(
        failed.is_empty(),
        "{} failed of {}: {:?}",
        failed.len(),
        ok + failed.len() as u64,
        &failed[..failed.len().min(5)]
    );

    // etcd back: a new registration works again.
    etcd.start_all();
    let _catalog3 = mesh.instance(
        "catalog-v1",
        "catalog-3",
        &[],
        &["--control", &mesh.control_urls(0)],
    );
    wait_for("catalog-3 at client-1", Duration::from_secs(15), || {
        (web.endpoints("catalog-v1", "catalog-v1")?.len() == 3).then_some(())
    });

    // Everything restarts: CA and rollout state are as they were; the
    // proxies register again.
    let rollout = |mesh: &Mesh| {
        mesh.api_json("/api/v1/rollouts/default/catalog")
            .map(|v| v["state"]["history"][0]["at_ms"].clone())
    };
    let started = wait_for("the rollout started", Duration::from_secs(10), || {
        rollout(&mesh).filter(|v| v.is_u64())
    });
    mesh.kill_replica(0);
    mesh.kill_replica(1);
    etcd.kill_all();
    etcd.start_all();
    mesh.start_replica(0);
    mesh.start_replica(1);
    let after = mesh.replica_json(1, "/api/v1/ca").expect("ca");
    assert_eq!(after["roots"], ca0["roots"], "the CA survived the restart");
    assert_eq!(
        rollout(&mesh),
        Some(started),
        "the rollout goes on where it was"
    );
    wait_for("proxies registered again", Duration::from_secs(20), || {
        let mut all = held_by(&mesh, 0);
        all.extend(held_by(&mesh, 1));
        all.sort();
        (all == ["catalog-1", "catalog-2", "catalog-3", "client-1"]).then_some(())
    });
    wait_for("traffic after the restart", Duration::from_secs(10), || {
        http_get(up, "catalog-v1", "/").filter(|r| r.0 == 200)
    });
    drop((catalog, catalog2));
}

#[test]
fn a_root_rotation_waits_for_the_proxies_of_every_replica() {
    let etcd = EtcdCluster::start(1);
    let mesh = Mesh::replicated(&common::config(), &etcd.url("/rot"), 2);
    let client = mesh.instance_with_upstreams(
        "client",
        "client-1",
        &[],
        &["--control", &mesh.control_urls(0)],
        &["catalog-v1"],
    );
    let _catalog = mesh.instance(
        "catalog-v1",
        "catalog-1",
        &[],
        &["--control", &mesh.control_urls(1)],
    );
    let up = client.upstream("catalog-v1");
    wait_for("traffic", Duration::from_secs(10), || {
        http_get(up, "catalog-v1", "/").filter(|r| r.0 == 200)
    });
    let old = mesh.replica_json(0, "/api/v1/ca").expect("ca")["signer"].clone();
    // Started through r1, whichever replica leads.
    let api = mesh.replicas[1].api.to_string();
    let data = mesh.replicas[1].data.display().to_string();
    tandem_ok(&["ca", "rotate", "--api", &api, "--data", &data]);
    // Both replicas see the new root sign, and both proxies, one on each
    // replica, renew under it.
    let new = wait_for(
        "the new root signs everywhere",
        Duration::from_secs(20),
        || {
            let a = mesh.replica_json(0, "/api/v1/ca")?;
            let b = mesh.replica_json(1, "/api/v1/ca")?;
            (a["signer"] != old && a["signer"] == b["signer"]).then(|| a["signer"].clone())
        },
    );
    let new = new.as_str().expect("root id").to_string();
    wait_for(
        "proxies renewed under the new root",
        Duration::from_secs(20),
        || {
            let signers: Vec<serde_json::Value> = (0..2)
                .flat_map(|i| {
                    mesh.replica_json(i, "/api/v1/proxies")
                        .and_then(|v| v.as_array().cloned())
                        .unwrap_or_default()
                })
                .filter(|p| p["connected"] == true)
                .map(|p| p["cert_signer"].clone())
                .collect();
            (signers.len() == 2 && signers.iter().all(|s| s == new.as_str())).then_some(())
        },
    );
    assert_eq!(http_get(up, "catalog-v1", "/").map(|r| r.0), Some(200));
    // The promotion counted acknowledgements: nobody was left pending.
    let logs: String = mesh
        .replicas
        .iter()
        .filter_map(|r| r.proc.as_ref())
        .map(|p| p.log_text())
        .collect();
    assert!(!logs.contains("promoting anyway"), "{logs}");
}

#[test]
fn config_pushed_through_one_replica_reaches_the_proxies_of_all() {
    let etcd = EtcdCluster::start(1);
    let mesh = Mesh::replicated("", &etcd.url("/push"), 2);
    let dir = TempDir::new("apply");
    let apply = |via: usize| {
        let api = mesh.replicas[via].api.to_string();
        let data = mesh.replicas[via].data.display().to_string();
        std::process::Command::new(bin())
            .args([
                "apply",
                &dir.0.display().to_string(),
                "--api",
                &api,
                "--data",
                &data,
            ])
            .output()
            .expect("tandem apply")
    };
    // A broken set is refused before it leaves, with its position.
    std::fs::write(dir.0.join("mesh.yaml"), "apiVersion: tandem.dev/v1alpha1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{name: http, port: 0, protocol: http}]\n").expect("write");
    let out = apply(0);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("mesh.yaml:5:"), "{err}");
    assert_eq!(
        mesh.replica_json(1, "/api/v1/config").expect("config")["services"],
        0
    );

    // A good set pushed through r0 reaches a proxy on r1.
    std::fs::write(dir.0.join("mesh.yaml"), common::config()).expect("write");
    let out = apply(0);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let client = mesh.instance_with_upstreams(
        "client",
        "client-1",
        &[],
        &["--control", &mesh.control_urls(1)],
        &["catalog-v1"],
    );
    let _catalog = mesh.instance(
        "catalog-v1",
        "catalog-1",
        &[],
        &["--control", &mesh.control_urls(0)],
    );
    let up = client.upstream("catalog-v1");
    wait_for("traffic", Duration::from_secs(10), || {
        http_get(up, "catalog-v1", "/").filter(|r| r.0 == 200)
    });
    // A change pushed through r1 reaches r0 too.
    std::fs::write(
        dir.0.join("mesh.yaml"),
        common::config() + &tandem_e2e::service_yaml("extra", "http"),
    )
    .expect("write");
    let before = mesh.replica_json(0, "/api/v1/config").expect("config")["services"]
        .as_u64()
        .expect("count");
    let out = apply(1);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(
        "r0 to follow the push through r1",
        Duration::from_secs(5),
        || {
            (mesh.replica_json(0, "/api/v1/config")?["services"].as_u64()? == before + 1)
                .then_some(())
        },
    );

    // A control plane that follows a directory refuses pushes.
    let gitops = Mesh::start(&common::config());
    let (status, body) = gitops.api_call("PUT", "/api/v1/config").expect("answer");
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("follows the config directory"), "{body}");
}

#[test]
fn the_cas_private_keys_reach_etcd_sealed() {
    let etcd = EtcdCluster::start(1);
    let url = etcd.url("/sealed");
    let dir = TempDir::new("seal");
    let seal = dir.0.join("seal.key");
    std::fs::write(&seal, "0f".repeat(32)).unwrap();
    let seal_arg = seal.display().to_string();
    let mesh = Mesh::replicated_with(&common::config(), &url, 1, &["--seal-key", &seal_arg]);
    // Proxies bootstrap as ever (tokens minted with the seal key).
    let client = mesh.instance_with_upstreams("client", "client-1", &[], &[], &["catalog-v1"]);
    let _catalog = mesh.instance("catalog-v1", "catalog-1", &[], &[]);
    wait_for("traffic", Duration::from_secs(10), || {
        http_get(client.upstream("catalog-v1"), "catalog-v1", "/").filter(|r| r.0 == 200)
    });
    // In etcd: ciphertext for every private key, certificates as they are.
    let get = |key: &str| {
        let out = std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &format!("http://{}", etcd.members[0].client)])
            .args(["get", "--print-value-only", key])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let keys = etcd.keys("/sealed/kv/ca/");
    let private: Vec<&String> = keys.iter().filter(|k| k.ends_with(".key")).collect();
    assert!(private.len() >= 2, "a root key and the token key: {keys:?}");
    for k in private {
        let v = get(k);
        assert!(v.starts_with("tandem-sealed-v1:"), "{k}: {v}");
        assert!(!v.contains("PRIVATE KEY"), "{k}");
    }
    assert!(
        keys.iter()
            .any(|k| k.ends_with(".crt") && get(k).contains("BEGIN CERTIFICATE")),
        "{keys:?}"
    );
    // Without the seal key, neither the CLI nor a replica can use the CA.
    let out = std::process::Command::new(bin())
        .args(["token", "create", "--service", "web", "--store", &url])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--seal-key"), "{err}");
    let log = refused_replica(&mesh, &url, &[]);
    assert!(log.contains("--seal-key"), "{log}");
}

#[test]
fn replicas_reach_etcd_over_tls_with_a_client_certificate() {
    let etcd = EtcdCluster::start_tls(1);
    let tls = etcd.tls.clone().expect("tls");
    let url = etcd.url("/tls");
    let (ca, cert, key) = (
        tls.ca.display().to_string(),
        tls.client_cert.display().to_string(),
        tls.client_key.display().to_string(),
    );
    let mesh = Mesh::replicated_with(
        &common::config(),
        &url,
        2,
        &["--etcd-ca", &ca, "--etcd-cert", &cert, "--etcd-key", &key],
    );
    let client = mesh.instance_with_upstreams(
        "client",
        "client-1",
        &[],
        &["--control", &mesh.control_urls(0)],
        &["catalog-v1"],
    );
    let _catalog = mesh.instance(
        "catalog-v1",
        "catalog-1",
        &[],
        &["--control", &mesh.control_urls(1)],
    );
    wait_for("traffic across replicas", Duration::from_secs(10), || {
        http_get(client.upstream("catalog-v1"), "catalog-v1", "/").filter(|r| r.0 == 200)
    });
    let store = mesh.replica_json(1, "/api/v1/store").expect("store");
    assert!(store["members"][0]["error"].is_null(), "{store}");
    assert!(
        store["members"][0]["version"]
            .as_str()
            .is_some_and(|v| v.starts_with('3')),
        "{store}"
    );
    assert!(etcd.keys("/tls/registry/").len() >= 2);
    // Without a client certificate the members refuse the replica, which
    // says so instead of starting.
    let log = refused_replica(&mesh, &url, &["--etcd-ca", &ca]);
    assert!(log.contains("cannot reach the store at etcd://"), "{log}");
}

#[test]
fn the_leader_judges_a_rollout_on_traffic_reported_to_another_replica() {
    let etcd = EtcdCluster::start(1);
    let mut config = common::config_with_split(100, 0);
    config.push_str("apiVersion: tandem.dev/v1alpha1\nkind: Rollout\nmetadata: {name: catalog}\nspec:\n  service: catalog\n  stable: catalog-v1\n  canary: catalog-v2\n  steps: [20, 100]\n  hold: 1s\n  thresholds: {successRate: 90, p99: 2s, minRequests: 10}\n");
    let mesh = Mesh::replicated(&config, &etcd.url("/roll"), 2);
    let leader = wait_for("a leader", Duration::from_secs(10), || {
        mesh.replica_json(0, "/api/v1/store")?["leader"]
            .as_str()
            .map(str::to_string)
    });
    // Every proxy on the replica that does not lead: only its reports see
    // the canary's traffic.
    let other = if leader == "r0" { 1 } else { 0 };
    let control = mesh.control_urls(other);
    let _v1 = mesh.instance(
        "catalog-v1",
        "v1",
        &["--version", "v1"],
        &["--control", &control],
    );
    let _v2 = mesh.instance(
        "catalog-v2",
        "v2",
        &["--version", "v2"],
        &["--control", &control],
    );
    let client = mesh.instance("client", "client-1", &[], &["--control", &control]);
    let load = Load::start(
        client.http_proxy,
        "catalog",
        "/",
        2,
        Duration::from_millis(5),
    );
    let mut last = String::new();
    let v = wait_for("the rollout to succeed", Duration::from_secs(60), || {
        let v = mesh.replica_json(other, "/api/v1/rollouts/default/catalog")?;
        let l = mesh.replica_json(1 - other, "/api/v1/rollouts/default/catalog")?;
        let now = format!(
            "{} {} / leader: {}",
            v["state"]["phase"], v["waiting"], l["waiting"]
        );
        if now != last {
            eprintln!("rollout: {now}");
            last = now;
        }
        (v["state"]["phase"] == "succeeded").then_some(v)
    });
    for d in v["state"]["history"]
        .as_array()
        .expect("history")
        .iter()
        .skip(1)
    {
        assert!(d["signals"]["requests"].as_u64().unwrap_or(0) >= 10, "{d}");
    }
    let (_, failed) = load.finish();
    assert!(failed.is_empty(), "{failed:?}");
}
