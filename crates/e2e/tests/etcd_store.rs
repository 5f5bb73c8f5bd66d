//! The storage seams on real etcd: compare-and-swap values, the registry
//! shared by replicas (each with its own client and lease), leader
//! election, and a member that dies under them.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use tandem_e2e::etcd::EtcdCluster;
use tandem_e2e::{rt, wait_for};
use tandem_store::etcd::{Election, Etcd, EtcdKv, EtcdRegistry, EtcdUrl, Leadership, Lease};
use tandem_store::{Kv, Presence, Record, Registration, RegistryStore};
use tokio::sync::watch;

fn client(url: &str) -> Etcd {
    let url: EtcdUrl = url.parse().unwrap();
    Etcd::new(&url, None).unwrap()
}

/// A replica's view of the store: its client, lease and registry.
struct Replica {
    registry: EtcdRegistry,
    leadership: Leadership,
    stop: watch::Sender<bool>,
}

async fn replica(url: &str, name: &str) -> Replica {
    let etcd = client(url);
    let (stop, stopped) = watch::channel(false);
    let lease = Lease::start(etcd.clone(), stopped.clone()).await.unwrap();
    Replica {
        registry: EtcdRegistry::start(etcd.clone(), lease.clone(), stopped.clone()),
        leadership: Election::start(etcd, lease, name.into(), stopped),
        stop,
    }
}

fn reg(instance: &str, holder: &str, inbound: &str) -> Registration {
    Registration {
        namespace: "default".into(),
        service: "web".into(),
        instance: instance.into(),
        inbound: inbound.into(),
        presence: Presence::Connected,
        holder: holder.into(),
        roots: Vec::new(),
        zone: String::new(),
    }
}

async fn listed(r: &dyn RegistryStore) -> Vec<Registration> {
    let mut v = r.list().await.unwrap().1;
    v.sort_by(|a, b| a.instance.cmp(&b.instance));
    v
}

/// Polls `f` (async) until it returns `Some`.
async fn until<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    f: impl FnMut() -> F,
) -> T {
    until_within(what, Duration::from_secs(10), f).await
}

/// [`until`], giving up after `timeout` (times the harness's patience).
async fn until_within<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> F,
) -> T {
    let end = tokio::time::Instant::now() + tandem_e2e::patience(timeout);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn values_compare_and_swap_on_etcd() {
    let cluster = EtcdCluster::start(1);
    rt().block_on(async {
        let kv = EtcdKv::new(client(&cluster.url("/t1")));
        assert_eq!(kv.get("a/b").await.unwrap(), None);
        let r1 = kv
            .put_if("a/b", None, b"1")
            .await
            .unwrap()
            .expect("created");
        // Absent was expected: refused.
        assert_eq!(kv.put_if("a/b", None, b"2").await.unwrap(), None);
        let r2 = kv
            .put_if("a/b", Some(r1), b"3")
            .await
            .unwrap()
            .expect("swapped");
        assert!(r2 > r1);
        // A stale revision writes nothing.
        assert_eq!(kv.put_if("a/b", Some(r1), b"4").await.unwrap(), None);
        let v = kv.get("a/b").await.unwrap().unwrap();
        assert_eq!((v.value.as_slice(), v.revision), (&b"3"[..], r2));
        kv.put("a/c/d", b"x").await.unwrap();
        kv.put("ab", b"not under a/").await.unwrap();
        assert_eq!(kv.list("a").await.unwrap(), ["a/b", "a/c/d"]);
        kv.delete("a/b").await.unwrap();
        assert_eq!(kv.get("a/b").await.unwrap(), None);
        assert!(kv.get("../x").await.is_err());

        // Eight writers racing on one record: every update is kept.
        let kv: Arc<dyn Kv> = Arc::new(kv);
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let rec: Record<Vec<u32>> = Record::new(kv.clone(), "list");
                tokio::spawn(async move {
                    rec.update(|cur| {
                        let mut v = cur.unwrap_or_default();
                        v.push(i);
                        Ok::<_, ()>((v, ()))
                    })
                    .await
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap().unwrap();
        }
        let (mut all, _) = Record::<Vec<u32>>::new(kv, "list")
            .get()
            .await
            .unwrap()
            .unwrap();
        all.sort();
        assert_eq!(all, (0..8).collect::<Vec<_>>());
    });
    // Under the mesh's prefix, and nowhere else.
    let keys = cluster.keys("/");
    assert!(keys.iter().all(|k| k.starts_with("/t1/kv/")), "{keys:?}");
}

#[test]
fn replicas_share_registrations_and_hand_them_over() {
    let cluster = EtcdCluster::start(1);
    let url = cluster.url("/t2");
    rt().block_on(async {
        let a = replica(&url, "a").await;
        let b = replica(&url, "b").await;
        // Registered through a: b sees it.
        a.registry
            .put(reg("w1", "a/1", "10.0.0.1:80"))
            .await
            .unwrap();
        until("b to see w1", || async {
            (listed(&b.registry).await == [reg("w1", "a/1", "10.0.0.1:80")]).then_some(())
        })
        .await;
        // The proxy reconnects to b, which takes the registration over;
        // a's stream-end bookkeeping then changes nothing.
        b.registry
            .put(reg("w1", "b/7", "10.0.0.1:80"))
            .await
            .unwrap();
        let key = reg("w1", "", "").key();
        until("a to let w1 go", || async {
            let l = listed(&a.registry).await;
            (l == [reg("w1", "b/7", "10.0.0.1:80")]).then_some(())
        })
        .await;
        assert!(!a
            .registry
            .set_presence(&key, "a/1", Presence::Disconnected)
            .await
            .unwrap());
        assert!(!a.registry.remove(&key, "a/1").await.unwrap());
        // The holder's presence change reaches a.
        assert!(b
            .registry
            .set_presence(&key, "b/7", Presence::Leaving)
            .await
            .unwrap());
        until("a to see w1 leaving", || async {
            let l = listed(&a.registry).await;
            (l.len() == 1 && l[0].presence == Presence::Leaving).then_some(())
        })
        .await;
        assert!(b.registry.remove(&key, "b/7").await.unwrap());
        until("w1 gone everywhere", || async {
            (listed(&a.registry).await.is_empty() && listed(&b.registry).await.is_empty())
                .then_some(())
        })
        .await;

        // Exactly one leader; when it stops, the other takes over.
        let (leader, other) = until("a leader", || async {
            match (a.leadership.is_leader(), b.leadership.is_leader()) {
                (true, false) => Some((&a, &b)),
                (false, true) => Some((&b, &a)),
                _ => None,
            }
        })
        .await;
        let _ = leader.stop.send(true);
        let mut l = other.leadership.clone();
        tokio::time::timeout(
            tandem_e2e::patience(Duration::from_secs(5)),
            l.until_leader(),
        )
        .await
        .expect("the other replica leads once the leader stepped down");
    });
}

#[test]
fn a_dead_replicas_registrations_expire_with_its_lease() {
    let cluster = EtcdCluster::start(1);
    let url = cluster.url("/t3");
    rt().block_on(async {
        let a = replica(&url, "a").await;
        let b = replica(&url, "b").await;
        a.registry
            .put(reg("w1", "a/1", "10.0.0.1:80"))
            .await
            .unwrap();
        b.registry
            .put(reg("w2", "b/1", "10.0.0.2:80"))
            .await
            .unwrap();
        until("both registered", || async {
            (listed(&b.registry).await.len() == 2).then_some(())
        })
        .await;
        // a stops keeping its lease alive (as if killed): once the lease
        // runs out, its registration is gone and b's stays.
        let _ = a.stop.send(true);
        until_within(
            "a's registration to expire with its lease",
            Duration::from_secs(20),
            || async {
                (listed(&b.registry).await == [reg("w2", "b/1", "10.0.0.2:80")]).then_some(())
            },
        )
        .await;
    });
}

#[test]
fn a_member_dies_and_the_store_goes_on() {
    let mut cluster = EtcdCluster::start(3);
    let url = cluster.url("/t4");
    let runtime = rt();
    let (a, b) = runtime.block_on(async {
        let a = replica(&url, "a").await;
        let b = replica(&url, "b").await;
        a.registry
            .put(reg("w1", "a/1", "10.0.0.1:80"))
            .await
            .unwrap();
        until("b sees w1", || async {
            (listed(&b.registry).await.len() == 1).then_some(())
        })
        .await;
        (a, b)
    });
    // Both clients talk to the first member first: kill it.
    cluster.kill_member(0);
    runtime.block_on(async {
        let kv = EtcdKv::new(client(&url));
        let r = kv.put_if("after", None, b"x").await.unwrap();
        assert!(r.is_some(), "a write goes to a live member");
        a.registry
            .put(reg("w2", "a/2", "10.0.0.2:80"))
            .await
            .unwrap();
        until("b sees w2 through another member", || async {
            (listed(&b.registry).await.len() == 2).then_some(())
        })
        .await;
    });
    cluster.start_member(0);
    cluster.wait_healthy();
    wait_for("w2 in etcd", Duration::from_secs(5), || {
        cluster
            .keys("/t4/registry/")
            .iter()
            .any(|k| k.ends_with("/w2"))
            .then_some(())
    });
}
