//! The trace a request belongs to: read from the caller's headers (W3C
//! `traceparent`, or B3 in its single or multi-header form; W3C wins when
//! both come), the sampling decision (parent-based with a ratio, as
//! OpenTelemetry defines `OTEL_TRACES_SAMPLER`), and the headers that pass
//! this sidecar's span on to the next hop.

use http::header::HeaderName;
use http::{HeaderMap, HeaderValue};

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const B3: HeaderName = HeaderName::from_static("b3");
const B3_TRACE: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_PARENT: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// How the caller sent its trace; the next hop gets the same (and W3C).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    W3c,
    B3Single,
    B3Multi,
}

/// What the caller's headers say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Parent {
    pub(crate) trace_id: u128,
    pub(crate) span_id: u64,
    /// The caller's decision; `None` when it deferred it (B3 without a
    /// sampling state).
    pub(crate) sampled: Option<bool>,
    pub(crate) format: Format,
}

impl Parent {
    /// The caller's trace, if it sent a well-formed one.
    pub(crate) fn of(headers: &HeaderMap) -> Option<Self> {
        if let Some(p) = headers.get(&TRACEPARENT).and_then(|v| w3c(v.as_bytes())) {
            return Some(p);
        }
        if let Some(p) = headers.get(&B3).and_then(|v| b3_single(v.as_bytes())) {
            return Some(p);
        }
        b3_multi(headers)
    }
}

/// The trace of one request as this sidecar carries it on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TraceContext {
    pub(crate) trace_id: u128,
    /// The caller's span; `None` when this sidecar started the trace.
    pub(crate) parent_id: Option<u64>,
    /// This sidecar's span for the request.
    pub(crate) span_id: u64,
    pub(crate) sampled: bool,
    pub(crate) format: Format,
    /// This sidecar makes spans and passes its own on; without an
    /// exporter it only reads the caller's trace (for logs).
    pub(crate) ours: bool,
}

impl TraceContext {
    /// Joins the caller's trace, or starts one; `sampler` decides.
    pub(crate) fn start(parent: Option<Parent>, sampler: &Sampler) -> Self {
        let trace_id = match parent {
            Some(p) => p.trace_id,
            None => loop {
                let id = fastrand::u128(..);
                if id != 0 {
                    break id;
                }
            },
        };
        TraceContext {
            trace_id,
            parent_id: parent.map(|p| p.span_id),
            span_id: new_span_id(),
            sampled: sampler.sample(trace_id, parent.map(|p| p.sampled)),
            format: parent.map_or(Format::W3c, |p| p.format),
            ours: true,
        }
    }

    pub(crate) fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// Tells the next hop that `span_id` (this sidecar's span, or a try's)
    /// is its parent: `traceparent`, and the caller's B3 headers in the
    /// form it used. `tracestate` passes through untouched.
    pub(crate) fn inject(&self, headers: &mut HeaderMap, span_id: u64) {
        let mut tp = [0u8; 55];
        tp[..3].copy_from_slice(b"00-");
        hex(&mut tp[3..35], self.trace_id.to_be_bytes().as_slice());
        tp[35] = b'-';
        hex(&mut tp[36..52], span_id.to_be_bytes().as_slice());
        tp[52..].copy_from_slice(if self.sampled { b"-01" } else { b"-00" });
        if let Ok(v) = HeaderValue::from_bytes(&tp) {
            headers.insert(TRACEPARENT, v);
        }
        match self.format {
            Format::W3c => {}
            Format::B3Single => {
                // `{trace}-{span}-{sampled}`.
                let mut b = [0u8; 51];
                hex(&mut b[..32], self.trace_id.to_be_bytes().as_slice());
                b[32] = b'-';
                hex(&mut b[33..49], span_id.to_be_bytes().as_slice());
                b[49..].copy_from_slice(if self.sampled { b"-1" } else { b"-0" });
                if let Ok(v) = HeaderValue::from_bytes(&b) {
                    headers.insert(B3, v);
                }
            }
            Format::B3Multi => {
                let mut t = [0u8; 32];
                hex(&mut t, self.trace_id.to_be_bytes().as_slice());
                let mut s = [0u8; 16];
                hex(&mut s, span_id.to_be_bytes().as_slice());
                if let (Ok(t), Ok(s)) = (HeaderValue::from_bytes(&t), HeaderValue::from_bytes(&s)) {
                    headers.insert(B3_TRACE, t);
                    headers.insert(B3_SPAN, s);
                }
                headers.remove(B3_PARENT);
                headers.remove(B3_FLAGS);
                headers.insert(
                    B3_SAMPLED,
                    HeaderValue::from_static(if self.sampled { "1" } else { "0" }),
                );
            }
        }
    }
}

/// `x-request-id`: set on a request that comes without one, so every hop
/// and access log line of it shares one id.
pub(crate) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A random (version 4) UUID.
pub(crate) fn request_id() -> HeaderValue {
    let mut b = fastrand::u128(..).to_be_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut out = [b'-'; 36];
    let mut at = 0;
    for (i, chunk) in [&b[0..4], &b[4..6], &b[6..8], &b[8..10], &b[10..16]]
        .into_iter()
        .enumerate()
    {
        if i > 0 {
            at += 1;
        }
        hex(&mut out[at..at + 2 * chunk.len()], chunk);
        at += 2 * chunk.len();
    }
    HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

pub(crate) fn new_span_id() -> u64 {
    loop {
        let id = fastrand::u64(..);
        if id != 0 {
            return id;
        }
    }
}

fn hex(out: &mut [u8], bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
    }
}

fn lower_hex(v: &[u8]) -> Option<&str> {
    v.iter()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        .then(|| std::str::from_utf8(v).ok())
        .flatten()
}

/// `traceparent`: `00-<trace id>-<parent span id>-<flags>`.
fn w3c(v: &[u8]) -> Option<Parent> {
    // Version 00 is exactly 55 bytes; later versions may append fields.
    if v.len() < 55 || (v.len() > 55 && v.get(55) != Some(&b'-')) {
        return None;
    }
    let version = u8::from_str_radix(lower_hex(&v[0..2])?, 16).ok()?;
    if version == 0xff || (version == 0 && v.len() != 55) {
        return None;
    }
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let trace_id = u128::from_str_radix(lower_hex(&v[3..35])?, 16).ok()?;
    let span_id = u64::from_str_radix(lower_hex(&v[36..52])?, 16).ok()?;
    let flags = u8::from_str_radix(lower_hex(&v[53..55])?, 16).ok()?;
    if trace_id == 0 || span_id == 0 {
        return None;
    }
    Some(Parent {
        trace_id,
        span_id,
        sampled: Some(flags & 1 == 1),
        format: Format::W3c,
    })
}

/// A B3 trace id: 16 or 32 lower-case hex digits, not all zero.
fn b3_trace_id(v: &[u8]) -> Option<u128> {
    if v.len() != 16 && v.len() != 32 {
        return None;
    }
    u128::from_str_radix(lower_hex(v)?, 16)
        .ok()
        .filter(|t| *t != 0)
}

fn b3_span_id(v: &[u8]) -> Option<u64> {
    if v.len() != 16 {
        return None;
    }
    u64::from_str_radix(lower_hex(v)?, 16)
        .ok()
        .filter(|s| *s != 0)
}

/// `b3: {trace}-{span}[-{1|0|d}[-{parent}]]`. A bare `0` (or `1`, `d`)
/// carries no ids and joins nothing.
fn b3_single(v: &[u8]) -> Option<Parent> {
    let mut parts = v.split(|b| *b == b'-');
    let trace_id = b3_trace_id(parts.next()?)?;
    let span_id = b3_span_id(parts.next()?)?;
    let sampled = match parts.next() {
        None => None,
        Some(b"1" | b"d") => Some(true),
        Some(b"0") => Some(false),
        Some(_) => return None,
    };
    if let Some(p) = parts.next() {
        b3_span_id(p)?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Parent {
        trace_id,
        span_id,
        sampled,
        format: Format::B3Single,
    })
}

fn b3_multi(headers: &HeaderMap) -> Option<Parent> {
    let trace_id = b3_trace_id(headers.get(&B3_TRACE)?.as_bytes())?;
    let span_id = b3_span_id(headers.get(&B3_SPAN)?.as_bytes())?;
    let debug = headers.get(&B3_FLAGS).is_some_and(|v| v == "1");
    let sampled = match headers.get(&B3_SAMPLED).map(HeaderValue::as_bytes) {
        _ if debug => Some(true),
        Some(b"1" | b"true") => Some(true),
        Some(b"0" | b"false") => Some(false),
        Some(_) => return None,
        None => None,
    };
    Some(Parent {
        trace_id,
        span_id,
        sampled,
        format: Format::B3Multi,
    })
}

/// Which traces are recorded (`OTEL_TRACES_SAMPLER`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampler {
    AlwaysOn,
    AlwaysOff,
    /// A trace id whose low 64 bits are below the bound (`ratio × 2⁶⁴`).
    Ratio(u64),
    /// The caller's decision when it made one; else the root sampler's.
    ParentBased(Root),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Root {
    AlwaysOn,
    AlwaysOff,
    Ratio(u64),
}

impl Sampler {
    /// From the names OpenTelemetry defines (`parentbased_traceidratio`
    /// and `0.01`, ...); the ratio defaults to 1.
    pub fn parse(name: &str, arg: Option<&str>) -> Result<Sampler, String> {
        let ratio = || -> Result<u64, String> {
            let r: f64 = match arg {
                None | Some("") => 1.0,
                Some(a) => a
                    .trim()
                    .parse()
                    .map_err(|_| format!("sampler argument `{a}` is not a number"))?,
            };
            if !(0.0..=1.0).contains(&r) {
                return Err(format!("sampler ratio {r} is not between 0 and 1"));
            }
            // 2^64 × r, saturating at the top.
            Ok(if r >= 1.0 {
                u64::MAX
            } else {
                (r * 18_446_744_073_709_551_616.0) as u64
            })
        };
        Ok(match name.trim() {
            "always_on" => Sampler::AlwaysOn,
            "always_off" => Sampler::AlwaysOff,
            "traceidratio" => Sampler::Ratio(ratio()?),
            "parentbased_always_on" | "" => Sampler::ParentBased(Root::AlwaysOn),
            "parentbased_always_off" => Sampler::ParentBased(Root::AlwaysOff),
            "parentbased_traceidratio" => Sampler::ParentBased(Root::Ratio(ratio()?)),
            other => {
                return Err(format!(
                    "unknown sampler `{other}`: use always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off or parentbased_traceidratio"
                ))
            }
        })
    }

    /// `parent`: the caller's decision (`Some(None)`: it deferred).
    pub(crate) fn sample(&self, trace_id: u128, parent: Option<Option<bool>>) -> bool {
        let ratio = |bound: u64| bound == u64::MAX || (trace_id as u64) < bound;
        match *self {
            Sampler::AlwaysOn => true,
            Sampler::AlwaysOff => false,
            Sampler::Ratio(b) => ratio(b),
            Sampler::ParentBased(root) => match parent.flatten() {
                Some(decided) => decided,
                None => match root {
                    Root::AlwaysOn => true,
                    Root::AlwaysOff => false,
                    Root::Ratio(b) => ratio(b),
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).expect("value"));
        }
        h
    }

    #[test]
    fn reads_w3c_traceparent() {
        let t = w3c(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").expect("valid");
        assert_eq!(t.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(t.span_id, 0x00f067aa0ba902b7);
        assert_eq!(t.sampled, Some(true));
        for bad in [
            &b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"[..],
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736",
        ] {
            assert_eq!(w3c(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        // A later version may carry more fields after the four known ones.
        assert!(
            w3c(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-more")
                .is_some_and(|t| t.sampled == Some(false))
        );
    }

    #[test]
    fn reads_b3_both_forms_and_w3c_wins() {
        let single = Parent::of(&headers(&[(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
        )]))
        .expect("b3");
        assert_eq!(single.trace_id, 0x80f198ee56343ba864fe8b2a57d3eff7);
        assert_eq!(single.span_id, 0xe457b5a2e4d86bd1);
        assert_eq!(
            (single.sampled, single.format),
            (Some(true), Format::B3Single)
        );
        // 64-bit trace ids and a deferred decision.
        let short =
            Parent::of(&headers(&[("b3", "64fe8b2a57d3eff7-e457b5a2e4d86bd1")])).expect("b3");
        assert_eq!((short.trace_id, short.sampled), (0x64fe8b2a57d3eff7, None));
        assert_eq!(Parent::of(&headers(&[("b3", "0")])), None);
        assert_eq!(Parent::of(&headers(&[("b3", "abc-def")])), None);
        let multi = Parent::of(&headers(&[
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-sampled", "0"),
        ]))
        .expect("multi");
        assert_eq!(
            (multi.sampled, multi.format),
            (Some(false), Format::B3Multi)
        );
        let both = Parent::of(&headers(&[
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        ]))
        .expect("both");
        assert_eq!(both.format, Format::W3c);
        assert_eq!(both.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
    }

    #[test]
    fn injects_the_callers_format_and_w3c() {
        let sampler = Sampler::ParentBased(Root::AlwaysOn);
        let parent = Parent::of(&headers(&[
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-sampled", "1"),
        ]));
        let t = TraceContext::start(parent, &sampler);
        assert_eq!(t.parent_id, Some(0xe457b5a2e4d86bd1));
        let mut h = HeaderMap::new();
        t.inject(&mut h, 0x1122334455667788);
        assert_eq!(
            h["traceparent"],
            "00-80f198ee56343ba864fe8b2a57d3eff7-1122334455667788-01"
        );
        assert_eq!(h["x-b3-traceid"], "80f198ee56343ba864fe8b2a57d3eff7");
        assert_eq!(h["x-b3-spanid"], "1122334455667788");
        assert_eq!(h["x-b3-sampled"], "1");
        // What was injected is read back as the same trace.
        let next = Parent::of(&h).expect("parent");
        assert_eq!(
            (next.trace_id, next.span_id),
            (t.trace_id, 0x1122334455667788)
        );
        let single = TraceContext {
            format: Format::B3Single,
            ..t
        };
        let mut h = HeaderMap::new();
        single.inject(&mut h, 7);
        assert_eq!(
            h["b3"],
            "80f198ee56343ba864fe8b2a57d3eff7-0000000000000007-1"
        );
        // A new trace has a fresh id and no parent.
        let root = TraceContext::start(None, &sampler);
        assert!(root.trace_id != 0 && root.parent_id.is_none() && root.sampled);
    }

    #[test]
    fn request_ids_are_uuids() {
        let a = request_id();
        let s = a.to_str().expect("ascii");
        assert_eq!(s.len(), 36);
        let parts: Vec<&str> = s.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('4'), "{s}");
        assert!(matches!(&parts[3][..1], "8" | "9" | "a" | "b"), "{s}");
        assert_ne!(a, request_id());
    }

    #[test]
    fn samplers_follow_the_parent_then_the_ratio() {
        let s = Sampler::parse("parentbased_traceidratio", Some("0.25")).expect("valid");
        assert!(s.sample(1, Some(Some(true))));
        assert!(!s.sample(1, Some(Some(false))));
        // No parent decision: a quarter of the id space.
        let quarter = u128::from(u64::MAX / 4);
        assert!(s.sample(quarter - 1, None));
        assert!(!s.sample(quarter + 1, Some(None)));
        let sampled = (0..10_000u128)
            .filter(|_| s.sample(fastrand::u128(..), None))
            .count();
        // 2500 ± 5 standard deviations (43).
        assert!((2285..=2715).contains(&sampled), "{sampled}");
        assert_eq!(Sampler::parse("always_off", None), Ok(Sampler::AlwaysOff));
        assert!(!Sampler::AlwaysOff.sample(1, Some(Some(true))));
        assert!(Sampler::parse("traceidratio", Some("2")).is_err());
        assert!(Sampler::parse("sometimes", None).is_err());
        assert_eq!(
            Sampler::parse("traceidratio", Some("1")),
            Ok(Sampler::Ratio(u64::MAX))
        );
    }
}
