//! The trace a request belongs to, from the W3C `traceparent` header the
//! caller sent. It rides in the request's context; spans will be made from
//! it by the tracing layer.

use http::header::HeaderName;
use http::HeaderMap;

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// `traceparent`: `00-<trace id>-<parent span id>-<flags>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TraceContext {
    pub(crate) trace_id: u128,
    pub(crate) parent_id: u64,
    pub(crate) sampled: bool,
}

impl TraceContext {
    /// The caller's trace, if it sent a well-formed `traceparent`.
    pub(crate) fn of(headers: &HeaderMap) -> Option<Self> {
        Self::parse(headers.get(&TRACEPARENT)?.as_bytes())
    }

    fn parse(v: &[u8]) -> Option<Self> {
        // Version 00 is exactly 55 bytes; later versions may append fields.
        if v.len() < 55 || (v.len() > 55 && v.get(55) != Some(&b'-')) {
            return None;
        }
        let field = |from: usize, to: usize| {
            let s = std::str::from_utf8(v.get(from..to)?).ok()?;
            s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                .then_some(s)
        };
        let version = u8::from_str_radix(field(0, 2)?, 16).ok()?;
        if version == 0xff || (version == 0 && v.len() != 55) {
            return None;
        }
        if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
            return None;
        }
        let trace_id = u128::from_str_radix(field(3, 35)?, 16).ok()?;
        let parent_id = u64::from_str_radix(field(36, 52)?, 16).ok()?;
        let flags = u8::from_str_radix(field(53, 55)?, 16).ok()?;
        if trace_id == 0 || parent_id == 0 {
            return None;
        }
        Some(TraceContext {
            trace_id,
            parent_id,
            sampled: flags & 1 == 1,
        })
    }

    pub(crate) fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_w3c_traceparent() {
        let t = TraceContext::parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .expect("valid");
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.parent_id, 0x00f067aa0ba902b7);
        assert!(t.sampled);
        for bad in [
            &b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"[..],
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736",
        ] {
            assert_eq!(
                TraceContext::parse(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // A later version may carry more fields after the four known ones.
        assert!(TraceContext::parse(
            b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-more"
        )
        .is_some_and(|t| !t.sampled));
    }
}
