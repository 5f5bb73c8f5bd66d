//! `tandem explain` against a running control plane: it reads the config
//! in force (and follows its changes), and what it predicts is what the
//! sidecars then do with the same request.

mod common;

use std::time::Duration;

use tandem_e2e::*;

const POLICY: &str = "apiVersion: tandem.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: web}\nspec:\n  targetRef: {kind: Service, name: web}\n  rules: [{to: [{paths: [/public], methods: [GET]}]}]\n---\n";

/// `tandem explain ARGS... -o json` through the mesh's API.
fn explain(mesh: &Mesh, args: &[&str]) -> serde_json::Value {
    let data = mesh.data_dir().display().to_string();
    let api = mesh.api.to_string();
    let mut all = vec!["explain", "-o", "json", "--api", &api, "--data", &data];
    all.extend_from_slice(args);
    let out = std::process::Command::new(bin())
        .args(&all)
        .output()
        .expect("tandem explain");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn shares(v: &serde_json::Value) -> Vec<(String, f64)> {
    v["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            (
                b["service"].as_str().unwrap_or("").to_string(),
                b["percent"].as_f64().unwrap_or(-1.0),
            )
        })
        .collect()
}

#[test]
fn explain_follows_the_config_in_force_and_matches_the_sidecars() {
    let mesh = Mesh::start(&format!("{}{POLICY}", common::config()));
    let _v1 = mesh.instance("catalog-v1", "catalog-v1-1", &[], &[]);
    let _v2 = mesh.instance("catalog-v2", "catalog-v2-1", &[], &[]);
    let _web = mesh.instance("web", "web-1", &[], &[]);
    let client = mesh.instance("client", "client-1", &[], &[]);

    let e = explain(&mesh, &["--from", "client", "http://catalog:8080/items"]);
    assert_eq!(e["destination"], "default/catalog", "{e}");
    assert_eq!(
        shares(&e),
        [
            ("default/catalog-v1".to_string(), 90.0),
            ("default/catalog-v2".to_string(), 10.0)
        ],
        "{e}"
    );

    // The file changes; explain follows the control plane's config.
    mesh.write_config(
        "mesh.yaml",
        &format!("{}{POLICY}", common::config_with_split(0, 100)),
    );
    wait_for(
        "explain to see the new weights",
        Duration::from_secs(20),
        || {
            let e = explain(&mesh, &["--from", "client", "catalog:8080/items"]);
            let want = [
                ("default/catalog-v1".to_string(), 0.0),
                ("default/catalog-v2".to_string(), 100.0),
            ];
            (shares(&e) == want).then_some(())
        },
    );
    // ... and the sidecar does what it says.
    wait_for(
        "the sidecar to send everything to v2",
        Duration::from_secs(20),
        || {
            let mut c = KeepAlive::connect(client.http_proxy)?;
            let all_v2 = (0..10).all(|_| {
                c.send("GET", "catalog:8080", "/items", &[], b"")
                    .is_some_and(|r| {
                        let v: serde_json::Value =
                            serde_json::from_slice(&r.body).unwrap_or_default();
                        r.status == 200 && v["instance"] == "catalog-v2-1"
                    })
            });
            all_v2.then_some(())
        },
    );

    // The access verdict, with the rule, agrees with the destination's
    // sidecar: GET /public is let in, POST /public is not.
    let e = explain(&mesh, &["--from", "client", "web:8080/public"]);
    assert_eq!(e["backends"][0]["verdict"], "allow", "{e}");
    assert!(
        e["backends"][0]["decided_by"]
            .as_str()
            .is_some_and(|d| d.contains("default/web") && d.contains("rule 0")),
        "{e}"
    );
    let e = explain(
        &mesh,
        &["--from", "client", "-X", "POST", "web:8080/public"],
    );
    assert_eq!(e["backends"][0]["verdict"], "deny", "{e}");
    let mut c = KeepAlive::connect(client.http_proxy).expect("connect");
    let r = c.send("GET", "web:8080", "/public", &[], b"").expect("GET");
    assert_eq!(r.status, 200, "{r:?}");
    let r = c
        .send("POST", "web:8080", "/public", &[], b"")
        .expect("POST");
    assert_eq!(
        (r.status, r.header("tandem-error")),
        (403, Some("forbidden")),
        "{r:?}"
    );

    // What the caller's own sidecar answers.
    let e = explain(&mesh, &["--from", "client", "nowhere:8080/"]);
    assert!(
        e["answer"]
            .as_str()
            .is_some_and(|a| a.starts_with("404 unknown-service")),
        "{e}"
    );
    let r = c.send("GET", "nowhere:8080", "/", &[], b"").expect("GET");
    assert_eq!(
        (r.status, r.header("tandem-error")),
        (404, Some("unknown-service"))
    );

    // Offline, from the directory, the same answer; the table for people.
    let dir = &mesh.config_dir;
    let out = std::process::Command::new(bin())
        .args([
            "explain",
            "--config",
            &dir.display().to_string(),
            "--from",
            "client",
            "catalog:8080/x",
        ])
        .output()
        .expect("tandem explain --config");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("backend         default/catalog-v2 weight 100 (100%)"),
        "{text}"
    );
    // An unknown caller is refused with a clear error.
    let out = std::process::Command::new(bin())
        .args([
            "explain",
            "--config",
            &dir.display().to_string(),
            "--from",
            "ghost",
            "web/",
        ])
        .output()
        .expect("tandem explain");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no Service `ghost`"));
}
