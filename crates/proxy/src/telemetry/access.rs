//! The access log: one JSON line per sampled request, written by a thread
//! of its own from a bounded queue; a full queue (a slow disk) drops lines
//! and counts them, and never holds a request up.

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;

use crate::ctx::RequestCtx;
use crate::error::MeshError;
use crate::telemetry::metrics::Direction;
use crate::telemetry::record::Recording;

/// Lines waiting for the writer, at most.
const QUEUE: usize = 4096;

/// What of the request's path a line shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Redact {
    /// Path and query as received.
    None,
    /// The path; the query's values become `redacted` (its names stay).
    Query,
    /// Neither: the route and the method say what was called.
    Path,
}

/// Access log settings of a sidecar.
#[derive(Clone, Debug)]
pub struct AccessLogConfig {
    /// A file (appended to), `-` for standard output; `None`: no log.
    pub path: Option<PathBuf>,
    /// The share of requests logged, 0 to 1 (by trace id when the
    /// request has one, so sampled traces and lines go together).
    pub sample: f64,
    pub redact: Redact,
}

/// The log's queue and writer, and what every line needs.
pub(crate) struct AccessLog {
    tx: SyncSender<String>,
    bound: u64,
    redact: Redact,
    /// This sidecar's own SPIFFE ID.
    me: String,
    trust_domain: String,
    dropped: Counter,
}

impl AccessLog {
    /// Opens the log and starts its writer thread; `None` without a path.
    pub(crate) fn open(
        cfg: &AccessLogConfig,
        me: String,
        trust_domain: String,
        dropped: Counter,
    ) -> anyhow::Result<Option<Self>> {
        let Some(path) = &cfg.path else {
            return Ok(None);
        };
        let mut out: Box<dyn Write + Send> = if path.as_os_str() == "-" {
            Box::new(std::io::stdout())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| anyhow::anyhow!("access log {}: {e}", path.display()))?,
            )
        };
        let (tx, rx) = sync_channel::<String>(QUEUE);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let mut buf = Vec::with_capacity(64 << 10);
                while let Ok(line) = rx.recv() {
                    buf.extend_from_slice(line.as_bytes());
                    buf.push(b'\n');
                    // Whatever else is waiting goes in the same write.
                    while let Ok(more) = rx.try_recv() {
                        buf.extend_from_slice(more.as_bytes());
                        buf.push(b'\n');
                        if buf.len() > 60 << 10 {
                            break;
                        }
                    }
                    if out.write_all(&buf).and_then(|()| out.flush()).is_err() {
                        // The disk is full or gone: nothing to do but go on.
                    }
                    buf.clear();
                }
            })?;
        let sample = cfg.sample.clamp(0.0, 1.0);
        Ok(Some(AccessLog {
            tx,
            bound: if sample >= 1.0 {
                u64::MAX
            } else {
                (sample * 18_446_744_073_709_551_616.0) as u64
            },
            redact: cfg.redact,
            me,
            trust_domain,
            dropped,
        }))
    }

    /// Whether a request of this trace is logged.
    pub(crate) fn sample(&self, trace_id: Option<u128>) -> bool {
        if self.bound == u64::MAX {
            return true;
        }
        let x = trace_id.map_or_else(|| fastrand::u64(..), |t| t as u64);
        x < self.bound
    }

    pub(crate) fn write(&self, ctx: &RequestCtx, rec: &Recording, now: Instant) {
        let line = self.line(ctx, rec, now);
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.tx.try_send(line) {
            self.dropped.inc();
        }
    }

    fn line(&self, ctx: &RequestCtx, rec: &Recording, now: Instant) -> String {
        let inbound = ctx.direction == Direction::inbound;
        let ms = |d: std::time::Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        let path = match self.redact {
            Redact::None => Some(match &rec.query {
                Some(q) => format!("{}?{q}", rec.path),
                None => rec.path.to_string(),
            }),
            Redact::Query => Some(match &rec.query {
                Some(q) => format!("{}?{}", rec.path, redact_query(q)),
                None => rec.path.to_string(),
            }),
            Redact::Path => None,
        };
        let peer_id = |server_name: Option<rustls_pki_types::ServerName<'static>>| {
            tandem_identity::tls::expected_id(&self.trust_domain, &server_name?).map(|id| id.uri())
        };
        let (caller, callee) = if inbound {
            (
                ctx.caller.as_ref().map(|c| c.id.to_string()),
                Some(self.me.clone()),
            )
        } else {
            (Some(self.me.clone()), peer_id(ctx.endpoint_server_name()))
        };
        let t = &ctx.timings;
        let total = now.saturating_duration_since(t.accepted);
        let route = ctx
            .dest
            .as_ref()
            .zip(ctx.rule)
            .and_then(|(d, i)| d.route_names.get(i))
            .map(|r| r.0.to_string());
        let v = serde_json::json!({
            "time": rfc3339(rec.started),
            "direction": if inbound { "inbound" } else { "outbound" },
            "trace_id": ctx.span.map(|s| s.trace_id_hex()),
            "span_id": ctx.span.filter(|s| s.ours).map(|s| format!("{:016x}", s.span_id)),
            "request_id": rec.request_id.as_ref().and_then(|v| v.to_str().ok()),
            "src_service": &*ctx.src.0,
            "dst_service": &*ctx.dst.0,
            "caller": caller,
            "callee": callee,
            "method": rec.method.as_str(),
            "authority": rec.host.as_ref().and_then(|h| h.to_str().ok()),
            "path": path,
            "route": route,
            "protocol": match rec.version {
                http::Version::HTTP_2 => "HTTP/2",
                http::Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            "status": ctx.status,
            "flag": ctx.flag.or(ctx.upstream_flag).map(MeshError::reason),
            "endpoint": ctx.endpoint_addr().map(|a| a.to_string()),
            "tries": ctx.tries,
            "request_bytes": rec.request_bytes,
            "response_bytes": ctx.response_bytes,
            "duration_ms": ms(total),
            "upstream_ms": ms(t.waited),
            "proxy_ms": t.own.map(ms),
        });
        v.to_string()
    }
}

/// `a=1&b=2` → `a=redacted&b=redacted`.
fn redact_query(q: &str) -> String {
    q.split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) => format!("{k}=redacted"),
            None => kv.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// `2026-11-30T13:36:38.123Z`.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days to a civil date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn times_and_queries() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_796_045_798_123);
        assert_eq!(rfc3339(t), "2026-11-30T13:36:38.123Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
        assert_eq!(redact_query("a=1&b=&flag"), "a=redacted&b=redacted&flag");
    }
}
