//! `bench-stall`: memory of a sidecar pair under stalled clients. A mesh
//! (the real `tandem` binary, `TANDEM_BIN` or a debug build) with a
//! `client` sidecar and a `web` sidecar in front of the demo app; N HTTP/2
//! streams (h2c to the client sidecar's upstream port) ask for a 1 MiB body
//! each and never open their flow-control window, so nothing of any body
//! can reach them. It prints each sidecar's RSS idle, once the streams
//! stalled (the most, once it stopped growing), and how long after they
//! close it takes to come back within 5 MiB of idle (up to 30 s, sampled
//! every 250 ms: that time is the measurement).
//!
//! ```text
//! bench-stall [--streams 1000] [--hold SECONDS] [--markdown FILE]
//! ```
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use tandem_e2e::{service_yaml, settled_rss, Mesh, Stalled};

fn main() {
    let mut streams = 1000usize;
    let mut markdown = None;
    // How long the streams stay stalled after the peak is measured (for a
    // heap profiler to look at them).
    let mut hold = 0u64;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--streams" => streams = v.parse().expect("--streams: a number"),
            "--markdown" => markdown = Some(v),
            "--hold" => hold = v.parse().expect("--hold: seconds"),
            other => panic!("unknown flag {other}"),
        }
    }
    let config = format!(
        "{}{}",
        service_yaml("client", "http"),
        service_yaml("web", "http")
    );
    let mesh = Mesh::start(&config);
    let web = mesh.instance("web", "web-1", &[], &[]);
    let client = mesh.instance_with_upstreams("client", "client-1", &[], &[], &["web"]);
    let up = client.upstream("web");
    tandem_e2e::wait_for(
        "web through the client sidecar",
        Duration::from_secs(20),
        || {
            let (s, _) = tandem_e2e::http_get(up, "web", "/bytes?n=10")?;
            (s == 200).then_some(())
        },
    );
    let mib = |kib: u64| kib as f64 / 1024.0;
    let rss = || (client.proxy().rss_kib(), web.proxy().rss_kib());
    let idle = settled_rss(&client, &web);
    let rt = tandem_e2e::rt();
    let stalled = rt.block_on(Stalled::open(up, "web", "/bytes?n=1048576", streams, 100));
    // The buffers fill as far as the caps let them: the most once it stops
    // growing.
    let peak = settled_rss(&client, &web);
    let heads = stalled.heads;
    eprintln!("{heads} streams stalled; holding them {hold} s");
    std::thread::sleep(Duration::from_secs(hold));
    drop(stalled);
    let closed = Instant::now();
    let mut back = (None::<f64>, None::<f64>);
    let mut last = rss();
    while closed.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(250));
        last = rss();
        let t = closed.elapsed().as_secs_f64();
        if back.0.is_none() && last.0 <= idle.0 + 5 * 1024 {
            back.0 = Some(t);
        }
        if back.1.is_none() && last.1 <= idle.1 + 5 * 1024 {
            back.1 = Some(t);
        }
    }
    let when = |b: Option<f64>| b.map_or("not within 30 s".to_string(), |t| format!("{t:.1} s"));
    let mut table = String::from(
        "| sidecar | streams stalled | RSS idle | RSS stalled (most) | per stream | RSS 30 s after close | back within 5 MiB of idle after |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for (name, i, p, l, b) in [
        ("client (h2 from the app)", idle.0, peak.0, last.0, back.0),
        ("web (h1 to the app)", idle.1, peak.1, last.1, back.1),
    ] {
        table.push_str(&format!(
            "| {name} | {heads} | {:.1} MiB | {:.1} MiB | {:.1} KiB | {:.1} MiB | {} |\n",
            mib(i),
            mib(p),
            (p.saturating_sub(i)) as f64 / heads.max(1) as f64,
            mib(l),
            when(b)
        ));
    }
    println!("{table}");
    if let Some(path) = markdown {
        std::fs::write(path, &table).unwrap();
    }
}
