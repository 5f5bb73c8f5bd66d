//! Tap: while someone runs `tandem tap`, the control plane asks this
//! sidecar over its control stream for summaries of the requests that
//! match a filter (path prefix, method), at most so many a second; the
//! sidecar sends them back on the same stream. With no tap in force a
//! request pays one relaxed atomic load; taps end with the stream, so a
//! sidecar never taps for a control plane that is gone.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, Method};
use prometheus_client::metrics::gauge::Gauge;
use tandem_runtime::sync::Mutex;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::ctx::RequestCtx;
use crate::error::MeshError;
use crate::telemetry::metrics::Direction;
use crate::telemetry::record::Recording;

/// Summaries waiting for the control stream, at most; more are dropped.
const QUEUE: usize = 256;
/// Most taps in force at once.
const MAX_TAPS: usize = 16;
/// A tap's rate, at most (summaries a second, per sidecar).
pub(crate) const MAX_RATE: u32 = 1000;

/// Headers whose values a tap never shows.
const SECRET: [&str; 5] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "tandem-client-id",
];

/// What one tap asks for.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct TapFilter {
    pub(crate) id: u64,
    pub(crate) path_prefix: String,
    pub(crate) method: Option<Method>,
    pub(crate) per_second: u32,
    /// Show header values (never those of [`SECRET`]).
    pub(crate) reveal_headers: bool,
}

struct Tap {
    filter: TapFilter,
    /// Summaries left in the current second, and when it began.
    left: u32,
    second: Instant,
}

/// The taps in force in this sidecar.
pub(crate) struct Taps {
    active: AtomicBool,
    taps: Mutex<Vec<Tap>>,
    tx: mpsc::Sender<(u64, String)>,
    /// Who this sidecar is, in each summary.
    me: String,
    gauge: Gauge,
}

impl Taps {
    pub(crate) fn new(me: String, gauge: Gauge) -> (Self, mpsc::Receiver<(u64, String)>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (
            Taps {
                active: AtomicBool::new(false),
                taps: Mutex::new(Vec::new()),
                tx,
                me,
                gauge,
            },
            rx,
        )
    }

    pub(crate) fn start(&self, filter: TapFilter) -> Result<(), String> {
        let mut taps = self.taps.lock();
        taps.retain(|t| t.filter.id != filter.id);
        if taps.len() >= MAX_TAPS {
            return Err(format!("at most {MAX_TAPS} taps at once"));
        }
        let per_second = filter.per_second.clamp(1, MAX_RATE);
        taps.push(Tap {
            filter: TapFilter {
                per_second,
                ..filter
            },
            left: per_second,
            second: Instant::now(),
        });
        self.changed(&taps);
        Ok(())
    }

    pub(crate) fn stop(&self, id: u64) {
        let mut taps = self.taps.lock();
        taps.retain(|t| t.filter.id != id);
        self.changed(&taps);
    }

    /// Every tap ends (the control stream did).
    pub(crate) fn clear(&self) {
        let mut taps = self.taps.lock();
        taps.clear();
        self.changed(&taps);
    }

    fn changed(&self, taps: &[Tap]) {
        self.active.store(!taps.is_empty(), Ordering::Relaxed);
        self.gauge.set(taps.len() as i64);
    }

    /// Whether a tap in force wants this request (and its headers).
    pub(crate) fn wants(&self, method: &Method, path: &str) -> bool {
        if !self.active.load(Ordering::Relaxed) {
            return false;
        }
        self.taps
            .lock()
            .iter()
            .any(|t| matches(&t.filter, method, path))
    }

    /// At the end of a tapped request: a summary for each tap that wants
    /// it and has room in its rate.
    pub(crate) fn send(&self, ctx: &RequestCtx, rec: &Recording, now: Instant) {
        let ids: Vec<(u64, bool)> = {
            let mut taps = self.taps.lock();
            taps.iter_mut()
                .filter(|t| matches(&t.filter, &rec.method, &rec.path))
                .filter_map(|t| {
                    if now.saturating_duration_since(t.second) >= Duration::from_secs(1) {
                        t.second = now;
                        t.left = t.filter.per_second;
                    }
                    (t.left > 0).then(|| {
                        t.left -= 1;
                        (t.filter.id, t.filter.reveal_headers)
                    })
                })
                .collect()
        };
        for (id, reveal) in ids {
            // A full queue drops the summary: tapping never holds traffic up.
            let _ = self.tx.try_send((id, self.summary(ctx, rec, now, reveal)));
        }
    }

    fn summary(&self, ctx: &RequestCtx, rec: &Recording, now: Instant, reveal: bool) -> String {
        let headers = rec.headers.as_ref().map(|h| headers_json(h, reveal));
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        serde_json::json!({
            "time": crate::telemetry::access::rfc3339(SystemTime::now()),
            "proxy": self.me,
            "direction": if ctx.direction == Direction::inbound { "inbound" } else { "outbound" },
            "src_service": &*ctx.src.0,
            "dst_service": &*ctx.dst.0,
            "method": rec.method.as_str(),
            "authority": rec.host.as_ref().and_then(|h| h.to_str().ok()),
            "path": &*rec.path,
            "status": ctx.status,
            "flag": ctx.flag.or(ctx.upstream_flag).map(MeshError::reason),
            "duration_ms": ms(now.saturating_duration_since(ctx.timings.accepted)),
            "proxy_ms": ctx.timings.own.map(ms),
            "trace_id": ctx.span.map(|s| s.trace_id_hex()),
            "request_id": rec.request_id.as_ref().and_then(|v| v.to_str().ok()),
            "headers": headers,
        })
        .to_string()
    }
}

fn matches(f: &TapFilter, method: &Method, path: &str) -> bool {
    f.method.as_ref().is_none_or(|m| m == method)
        && tandem_config::matching::prefix_matches(&f.path_prefix, path)
}

/// Request headers by name; values `redacted` unless revealed (and always
/// for credentials).
fn headers_json(h: &HeaderMap, reveal: bool) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for name in h.keys() {
        let secret = SECRET.contains(&name.as_str());
        let v: Vec<String> = h
            .get_all(name)
            .iter()
            .map(|v| {
                if reveal && !secret {
                    String::from_utf8_lossy(v.as_bytes()).into_owned()
                } else {
                    "redacted".to_string()
                }
            })
            .collect();
        m.insert(name.as_str().to_string(), v.join(", ").into());
    }
    serde_json::Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(prefix: &str, method: Option<Method>) -> TapFilter {
        TapFilter {
            id: 1,
            path_prefix: prefix.into(),
            method,
            per_second: 10,
            reveal_headers: false,
        }
    }

    #[test]
    fn filters_and_redaction() {
        let f = filter("/api", Some(Method::GET));
        assert!(matches(&f, &Method::GET, "/api/x"));
        assert!(matches(&f, &Method::GET, "/api"));
        assert!(!matches(&f, &Method::GET, "/apix"));
        assert!(!matches(&f, &Method::POST, "/api/x"));
        assert!(matches(&filter("/", None), &Method::DELETE, "/anything"));
        let mut h = HeaderMap::new();
        h.insert("x-env", "prod".parse().expect("value"));
        h.insert("authorization", "Bearer x".parse().expect("value"));
        let hidden = headers_json(&h, false);
        assert_eq!(hidden["x-env"], "redacted");
        let shown = headers_json(&h, true);
        assert_eq!(shown["x-env"], "prod");
        assert_eq!(shown["authorization"], "redacted");
    }

    #[test]
    fn taps_come_and_go() {
        let (taps, _rx) = Taps::new("default/web/web-1".into(), Gauge::default());
        assert!(!taps.wants(&Method::GET, "/"));
        taps.start(filter("/api", None)).expect("start");
        assert!(taps.wants(&Method::GET, "/api/1"));
        assert!(!taps.wants(&Method::GET, "/other"));
        taps.stop(1);
        assert!(!taps.wants(&Method::GET, "/api/1"));
        for id in 0..MAX_TAPS as u64 {
            taps.start(TapFilter {
                id,
                ..filter("/", None)
            })
            .expect("room");
        }
        assert!(taps
            .start(TapFilter {
                id: 99,
                ..filter("/", None)
            })
            .is_err());
        taps.clear();
        assert!(!taps.wants(&Method::GET, "/"));
    }
}
