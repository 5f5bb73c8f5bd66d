//! Progressive delivery through the real control plane and sidecars: a
//! healthy canary walks every step (across a control-plane restart), a
//! failing one is rolled back, people pause, resume and abort with the CLI.

mod common;

use std::time::Duration;

use tandem_e2e::*;

/// catalog split over catalog-v1 (stable) and catalog-v2 (canary), and a
/// Rollout of v2 with `hold`.
fn config(hold: &str) -> String {
    let mut s = common::config_with_split(100, 0);
    s.push_str(&format!(
        "apiVersion: tandem.dev/v1alpha1\nkind: Rollout\nmetadata: {{name: catalog}}\nspec:\n  service: catalog\n  stable: catalog-v1\n  canary: catalog-v2\n  steps: [20, 50, 100]\n  hold: {hold}\n  thresholds: {{successRate: 90, p99: 2s, minRequests: 10}}\n"
    ));
    s
}

/// `tandem rollout ARGS... --api --data` (JSON for `status`).
fn rollout_cli(mesh: &Mesh, args: &[&str]) -> std::process::Output {
    let data = mesh.data_dir().display().to_string();
    let api = mesh.api.to_string();
    let mut all = vec!["rollout"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--api", &api, "--data", &data]);
    std::process::Command::new(bin())
        .args(&all)
        .output()
        .expect("tandem rollout")
}

fn rollout_json(mesh: &Mesh) -> serde_json::Value {
    let out = rollout_cli(mesh, &["status", "catalog", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn phase_step(v: &serde_json::Value) -> (String, u64) {
    (
        v["state"]["phase"].as_str().unwrap_or("").to_string(),
        v["state"]["step"].as_u64().unwrap_or(0),
    )
}

fn actions(v: &serde_json::Value) -> Vec<String> {
    v["state"]["history"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| d["action"].as_str().unwrap_or("").to_string())
        .collect()
}

/// Waits until the rollout is in `phase` (at `step`, if given).
fn wait_phase(mesh: &Mesh, phase: &str, step: Option<u64>, timeout: Duration) -> serde_json::Value {
    wait_for(&format!("rollout {phase} {step:?}"), timeout, || {
        let v = rollout_json(mesh);
        let (p, s) = phase_step(&v);
        (p == phase && step.is_none_or(|want| want == s)).then_some(v)
    })
}

/// `n` requests to catalog through `client`: how many v2 answered.
fn v2_share(client: &Instance, n: usize) -> usize {
    let mut c = KeepAlive::connect(client.http_proxy).expect("connect");
    (0..n)
        .filter(|_| {
            let r = c.send("GET", "catalog", "/", &[], b"").expect("answer");
            assert_eq!(r.status, 200, "{r:?}");
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
            v["version"] == "v2"
        })
        .count()
}

fn catalog(mesh: &Mesh) -> (Instance, Instance, Instance) {
    let v1 = mesh.instance("catalog-v1", "catalog-v1-a", &["--version", "v1"], &[]);
    let v2 = mesh.instance("catalog-v2", "catalog-v2-a", &["--version", "v2"], &[]);
    let client = mesh.instance("client", "client-1", &[], &[]);
    (v1, v2, client)
}

#[test]
fn a_healthy_canary_goes_through_every_step_across_a_restart() {
    let mut mesh = Mesh::start(&config("2s"));
    let (_v1, _v2, client) = catalog(&mesh);
    let load = Load::start(
        client.http_proxy,
        "catalog",
        "/",
        4,
        Duration::from_millis(5),
    );

    // Step 2 (50 %): the split the files do not say (they say 100/0).
    wait_phase(&mesh, "progressing", Some(1), Duration::from_secs(60));
    // A restart mid-rollout: it goes on from where it was.
    if let Some(c) = mesh.control.as_mut() {
        c.kill();
    }
    mesh.start_control();
    let v = rollout_json(&mesh);
    assert!(phase_step(&v).1 >= 1, "restarted from the first step: {v}");
    let v = wait_phase(&mesh, "succeeded", None, Duration::from_secs(90));
    assert_eq!(
        actions(&v),
        ["start", "promote", "promote", "succeed"],
        "{v}"
    );
    // Each promotion names the numbers it was made on.
    for d in v["state"]["history"]
        .as_array()
        .expect("history")
        .iter()
        .skip(1)
    {
        let s = &d["signals"];
        assert!(s["requests"].as_u64().unwrap_or(0) >= 10, "{d}");
        assert!(s["success_rate"].as_f64().unwrap_or(0.0) >= 0.9, "{d}");
    }
    let (ok, failed) = load.finish();
    assert!(ok > 0);
    assert!(
        failed.is_empty(),
        "requests failed during the rollout: {failed:?}"
    );

    // All of catalog's traffic is on v2 now, though the files say v1.
    wait_for("every request on v2", Duration::from_secs(20), || {
        (v2_share(&client, 20) == 20).then_some(())
    });
    let status = std::process::Command::new(bin())
        .args([
            "status",
            "--api",
            &mesh.api.to_string(),
            "--data",
            &mesh.data_dir().display().to_string(),
        ])
        .output()
        .expect("status");
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains(
            "default/catalog: catalog: catalog-v1 0 % / catalog-v2 100 % (step 3 of 3, succeeded)"
        ),
        "{text}"
    );

    // Without the Rollout the route's own weights (all v1) are back, and
    // its state is forgotten.
    let stored = mesh.data_dir().join("rollouts/default/catalog");
    assert!(stored.exists());
    mesh.write_config("mesh.yaml", &common::config_with_split(100, 0));
    wait_for("every request on v1 again", Duration::from_secs(20), || {
        (v2_share(&client, 20) == 0).then_some(())
    });
    wait_for(
        "the rollout's state removed",
        Duration::from_secs(10),
        || (!stored.exists()).then_some(()),
    );
}

#[test]
fn a_failing_canary_is_rolled_back_and_people_steer_the_rest() {
    let mesh = Mesh::start(&config("30s"));
    let (_v1, v2, client) = catalog(&mesh);
    let load = Load::start(
        client.http_proxy,
        "catalog",
        "/",
        4,
        Duration::from_millis(5),
    );
    wait_phase(&mesh, "progressing", Some(0), Duration::from_secs(30));
    wait_for("the canary gets traffic", Duration::from_secs(20), || {
        (v2_share(&client, 50) > 0).then_some(())
    });

    // The canary starts failing half of its requests: rolled back well
    // before its 30 s hold is over, with the numbers that decided it.
    let knob = http_get(v2.app_addr, "app", "/knobs?failure_rate=0.5").expect("knob");
    assert_eq!(knob.0, 200, "{knob:?}");
    let v = wait_phase(&mesh, "rolled-back", None, Duration::from_secs(25));
    let last = v["state"]["history"]
        .as_array()
        .and_then(|h| h.last())
        .cloned()
        .expect("decision");
    assert_eq!(last["action"], "rollback", "{v}");
    assert!(
        last["reason"]
            .as_str()
            .unwrap_or("")
            .contains("success rate"),
        "{last}"
    );
    assert!(
        last["signals"]["success_rate"].as_f64().unwrap_or(1.0) < 0.9,
        "{last}"
    );
    // All traffic back on the stable backend.
    wait_for("no request on v2", Duration::from_secs(20), || {
        (v2_share(&client, 50) == 0).then_some(())
    });
    let _ = load.finish();

    // The canary is fixed; a person starts the rollout over, pauses it,
    // promotes it a step, and aborts it.
    http_get(v2.app_addr, "app", "/knobs?failure_rate=0").expect("knob");
    let out = rollout_cli(&mesh, &["resume", "catalog"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("phase: progressing, step 1 of 3"), "{text}");
    let out = rollout_cli(&mesh, &["pause", "catalog"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = rollout_cli(&mesh, &["promote", "catalog"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("phase: paused, step 2 of 3"), "{text}");
    assert!(
        text.contains("weights in force: catalog-v1 50 % / catalog-v2 50 %"),
        "{text}"
    );
    // The table view says the same.
    let out = rollout_cli(&mesh, &["status", "catalog"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("rollback"), "{text}");
    assert!(text.contains("(by a person)"), "{text}");
    let out = rollout_cli(&mesh, &["abort", "catalog"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = rollout_json(&mesh);
    assert_eq!(phase_step(&v).0, "aborted");
    wait_for(
        "no request on v2 after the abort",
        Duration::from_secs(20),
        || (v2_share(&client, 50) == 0).then_some(()),
    );
    // An action that does not apply is refused, and says why.
    let out = rollout_cli(&mesh, &["pause", "catalog"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot pause a rollout that is aborted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = rollout_cli(&mesh, &["status", "nope"]);
    assert!(!out.status.success());
}
