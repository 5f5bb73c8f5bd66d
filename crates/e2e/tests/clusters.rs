//! Two clusters on two hosts (network namespaces): `orders` in cluster a
//! calls `payments`, which both clusters run; b exports it and a imports
//! it. Calls stay in a while a's own instance is up, fail over to b's when
//! it stops, and come back when it returns; the cross-cluster hop is
//! mTLS with verified identities (the clusters share a root CA).

#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tandem_e2e::netns::Network;
use tandem_e2e::*;

fn s(v: &str) -> String {
    v.to_string()
}

/// A control plane of cluster `name` on host `host`.
fn control(
    net: &Network,
    host: usize,
    name: &str,
    dir: &std::path::Path,
    ca: &(std::path::PathBuf, std::path::PathBuf),
) -> Proc {
    let ip = &net.hosts[host].ip;
    net.spawn(
        host,
        &format!("control-{name}"),
        &[
            s("control"),
            s("--cluster"),
            s(name),
            s("--config"),
            dir.join(format!("config-{name}")).display().to_string(),
            s("--data"),
            dir.join(format!("data-{name}")).display().to_string(),
            s("--listen"),
            format!("{ip}:7700"),
            s("--api"),
            format!("{ip}:7701"),
            s("--ca-cert"),
            ca.0.display().to_string(),
            s("--ca-key"),
            ca.1.display().to_string(),
        ],
        dir,
    )
}

/// A sidecar of `service` on `host`, with `extra` arguments.
#[allow(clippy::too_many_arguments)]
fn proxy(
    net: &Network,
    host: usize,
    service: &str,
    instance: &str,
    inbound_port: u16,
    admin_port: u16,
    app_port: u16,
    token: String,
    extra: &[String],
    dir: &std::path::Path,
) -> Proc {
    let ip = &net.hosts[host].ip;
    let mut args = vec![
        s("proxy"),
        s("--control"),
        format!("http://{ip}:7700"),
        s("--service"),
        s(service),
        s("--instance"),
        s(instance),
        s("--inbound"),
        format!("{ip}:{inbound_port}"),
        s("--app"),
        format!("127.0.0.1:{app_port}"),
        s("--admin"),
        format!("127.0.0.1:{admin_port}"),
        s("--token"),
        token,
    ];
    args.extend(extra.iter().cloned());
    let p = net.spawn(host, &format!("{instance}-proxy"), &args, dir);
    wait_for(
        &format!("{instance} ready"),
        Duration::from_secs(20),
        || {
            net.curl(host, &[&format!("http://127.0.0.1:{admin_port}/ready")])
                .filter(|r| r.0 == 200)
        },
    );
    p
}

/// A demo `payments` app on `host`, listening on 127.0.0.1:8081.
fn payments_app(net: &Network, host: usize, instance: &str, dir: &std::path::Path) -> Proc {
    let args: Vec<String> = [
        "demo-app",
        "--listen",
        "127.0.0.1:8081",
        "--service",
        "payments",
        "--instance",
        instance,
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    net.spawn(host, &format!("{instance}-app"), &args, dir)
}

/// The instance that answered `orders`' call to payments.
fn answered_by(net: &Network) -> Option<String> {
    let (code, body) = net.curl(0, &["http://127.0.0.1:9001/"])?;
    if code != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["instance"].as_str().map(str::to_string)
}

#[test]
fn calls_fail_over_to_the_remote_cluster_and_come_back() {
    let net = Network::new(2);
    let dir = TempDir::new("clusters");
    let ca = common::certs::other_ca(&dir.0);
    let (ip_a, ip_b) = (net.hosts[0].ip.clone(), net.hosts[1].ip.clone());
    let credential = dir.0.join("b-export.token");
    // Cluster a runs orders and payments, and imports b's exports.
    std::fs::create_dir_all(dir.0.join("config-a")).unwrap();
    std::fs::write(
        dir.0.join("config-a/mesh.yaml"),
        format!(
            "{}{}apiVersion: tandem.dev/v1alpha1\nkind: RemoteCluster\nmetadata: {{name: b}}\nspec:\n  api: [\"{ip_b}:7701\"]\n  credentialFile: {}\n",
            service_yaml("orders", "http"),
            service_yaml("payments", "http"),
            credential.display()
        ),
    )
    .unwrap();
    // Cluster b runs payments and exports it.
    std::fs::create_dir_all(dir.0.join("config-b")).unwrap();
    std::fs::write(
        dir.0.join("config-b/mesh.yaml"),
        "apiVersion: tandem.dev/v1alpha1\nkind: Service\nmetadata: {name: payments}\nspec:\n  ports: [{name: main, port: 8080, protocol: http}]\n  export: true\n",
    )
    .unwrap();
    let token = |cluster: &str, svc: &str| {
        tandem_ok(&[
            "token",
            "create",
            "--service",
            svc,
            "--data",
            &dir.0.join(format!("data-{cluster}")).display().to_string(),
        ])
    };

    let _cb = control(&net, 1, "b", &dir.0, &ca);
    wait_for("cluster b's control plane", Duration::from_secs(20), || {
        net.curl(1, &[&format!("http://{ip_b}:7701/healthz")])
            .filter(|r| r.0 == 200)
    });
    let _app_b = payments_app(&net, 1, "payments-b", &dir.0);
    let _pb = proxy(
        &net,
        1,
        "payments",
        "payments-b",
        8444,
        9902,
        8081,
        token("b", "payments"),
        &[],
        &dir.0,
    );
    // a reads b's exports with b's export credential.
    let exported = std::fs::read_to_string(dir.0.join("data-b/export.token")).unwrap();
    std::fs::write(&credential, exported).unwrap();

    let _ca = control(&net, 0, "a", &dir.0, &ca);
    wait_for("cluster a's control plane", Duration::from_secs(20), || {
        net.curl(0, &[&format!("http://{ip_a}:7701/healthz")])
            .filter(|r| r.0 == 200)
    });
    let _app_a = payments_app(&net, 0, "payments-a", &dir.0);
    let payments_a_token = token("a", "payments");
    let mut pa = proxy(
        &net,
        0,
        "payments",
        "payments-a",
        8444,
        9902,
        8081,
        payments_a_token.clone(),
        &[],
        &dir.0,
    );
    let _orders = proxy(
        &net,
        0,
        "orders",
        "orders-1",
        8443,
        9901,
        8080,
        token("a", "orders"),
        &[s("--upstream"), s("payments=127.0.0.1:9001")],
        &dir.0,
    );

    // orders knows both instances, b's marked with its cluster.
    wait_for(
        "both payments endpoints at orders",
        Duration::from_secs(15),
        || {
            let (_, body) = net.curl(0, &["http://127.0.0.1:9901/config"])?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            let eps: Vec<(String, String)> = v["snapshot"]["destinations"]
                .as_array()?
                .iter()
                .find(|d| d["name"] == "payments")?["backends"][0]["endpoints"]
                .as_array()?
                .iter()
                .map(|e| {
                    (
                        e["address"].as_str().unwrap_or("").to_string(),
                        e["cluster"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect();
            let want = vec![
                (format!("{ip_a}:8444"), String::new()),
                (format!("{ip_b}:8444"), "b".to_string()),
            ];
            if eps != want {
                eprintln!("payments at orders: {eps:?}");
            }
            (eps == want).then_some(())
        },
    );
    // While a's own instance is up, every call stays in a.
    for _ in 0..20 {
        assert_eq!(answered_by(&net).as_deref(), Some("payments-a"));
    }

    // Calls run all along from here (bounded: the loop ends when the test
    // kills it; every answer's status is written down).
    let codes = dir.0.join("codes.txt");
    let mut load: Child = Command::new("ip")
        .args(["netns", "exec", &net.hosts[0].ns, "sh", "-c"])
        .arg(format!(
            "while :; do curl -s -o /dev/null -m 10 -w '%{{http_code}}\\n' http://127.0.0.1:9001/ >> {}; sleep 0.01; done",
            codes.display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let answered = || {
        std::fs::read_to_string(&codes)
            .unwrap_or_default()
            .lines()
            .count()
    };
    let wait_more = |n: usize| {
        let target = answered() + n;
        wait_for("calls answered", Duration::from_secs(20), || {
            (answered() >= target).then_some(())
        });
    };
    wait_more(20);

    // a's instance stops (its sidecar leaves the mesh and drains): calls
    // go to b's, across the link, verified both ways.
    pa.signal("TERM");
    pa.wait_exit(patience(Duration::from_secs(20)))
        .expect("payments-a's sidecar stopped");
    wait_for(
        "calls answered by cluster b",
        Duration::from_secs(15),
        || (answered_by(&net)? == "payments-b").then_some(()),
    );
    wait_more(20);
    let (_, headers) = net
        .curl(0, &["http://127.0.0.1:9001/headers"])
        .expect("headers");
    assert!(
        headers.contains("spiffe://tandem.local/ns/default/svc/orders"),
        "{headers}"
    );
    let status_a = net.exec(
        0,
        &[
            &bin().display().to_string(),
            "status",
            "--api",
            &format!("{ip_a}:7701"),
            "--data",
            &dir.0.join("data-a").display().to_string(),
        ],
    );
    let status_a = String::from_utf8_lossy(&status_a.stdout).into_owned();
    assert!(
        status_a.contains("remote b")
            && status_a.contains("imports default/payments (1 endpoints)"),
        "{status_a}"
    );

    // a's instance comes back: calls return to a.
    pa = proxy(
        &net,
        0,
        "payments",
        "payments-a",
        8444,
        9902,
        8081,
        token("a", "payments"),
        &[],
        &dir.0,
    );
    wait_for("calls back in cluster a", Duration::from_secs(15), || {
        (answered_by(&net)? == "payments-a").then_some(())
    });
    wait_more(20);
    for _ in 0..20 {
        assert_eq!(answered_by(&net).as_deref(), Some("payments-a"));
    }
    let _ = load.kill();
    let _ = load.wait();
    let all = std::fs::read_to_string(&codes).unwrap_or_default();
    let failed: Vec<&str> = all.lines().filter(|l| l.trim() != "200").collect();
    // The loop's last curl may have been cut by the kill mid-line.
    let cut = all
        .lines()
        .last()
        .filter(|l| l.trim() != "200")
        .map_or(0, |_| 1);
    assert!(
        failed.len() <= cut,
        "{} of {} calls failed: {:?}",
        failed.len(),
        all.lines().count(),
        failed
    );
    drop((pa, payments_a_token));
}

#[test]
fn calls_prefer_the_callers_zone_while_it_has_an_instance() {
    let mesh = Mesh::start(&common::config());
    let mut near = mesh.instance("catalog-v1", "near", &[], &["--zone", "z1"]);
    let _far = mesh.instance("catalog-v1", "far", &[], &["--zone", "z2"]);
    let client = mesh.instance_with_upstreams(
        "client",
        "client-1",
        &[],
        &["--zone", "z1"],
        &["catalog-v1"],
    );
    let up = client.upstream("catalog-v1");
    wait_for("both endpoints", Duration::from_secs(10), || {
        (client.endpoints("catalog-v1", "catalog-v1")?.len() == 2).then_some(())
    });
    let answered = || {
        let (status, body) = http_get(up, "catalog-v1", "/")?;
        (status == 200).then_some(())?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["instance"].as_str().map(str::to_string)
    };
    // Every call stays in the caller's zone.
    for _ in 0..30 {
        assert_eq!(answered().as_deref(), Some("near"));
    }
    // Its instance leaves: the other zone's takes the calls.
    near.proxy().signal("TERM");
    near.proxy_mut()
        .wait_exit(patience(Duration::from_secs(20)))
        .expect("near's sidecar stopped");
    wait_for("calls in the other zone", Duration::from_secs(10), || {
        (answered()? == "far").then_some(())
    });
    for _ in 0..10 {
        assert_eq!(answered().as_deref(), Some("far"));
    }
}
