//! Control-plane replicas sharing a real 3-member etcd cluster: a proxy
//! whose replica dies moves to another with traffic flowing, a dead etcd
//! member changes nothing, registrations cross replicas, an unreachable
//! etcd leaves the replicas serving their cached view (and refusing
//! writes with a clear error), and a restart of everything keeps the CA
//! and rollout state.

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
