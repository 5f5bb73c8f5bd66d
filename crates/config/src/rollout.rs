//! `Rollout`: checked with positions and compiled into the [`Plan`] the
//! control plane walks, and the [`Split`]s it applies to the driven route
//! rules instead of the weights written in them.
//!
//! A rollout drives every rule of its Service's HTTPRoutes and GRPCRoutes
//! whose backendRefs are exactly its stable and canary Services: those
//! rules get the split's weights, in thousandths. Other rules (a header
//! match that always sends testers to the canary, say) keep their own.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

use crate::diag::Diagnostic;
use crate::model::{BackendRef, Loaded, ResourceSet, RolloutSpec};

pub const DEFAULT_HOLD: Duration = Duration::from_secs(30);
pub const DEFAULT_SUCCESS_RATE: f64 = 99.0;
pub const DEFAULT_MIN_REQUESTS: u32 = 20;

/// What a rollout does, compiled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub namespace: String,
    pub name: String,
    pub service: String,
    pub stable: String,
    pub canary: String,
    /// The canary's share at each step, in thousandths.
    pub steps: Vec<u32>,
    pub hold_ms: u64,
    /// Least success rate, as a fraction (0.99).
    pub min_success: f64,
    pub max_p99_ms: Option<f64>,
    pub min_requests: u64,
}

impl Plan {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Everything that decides the rollout's course, as one string: a
    /// stored rollout whose description differs was made for another spec
    /// and starts over.
    pub fn describe(&self) -> String {
        format!(
            "{} {} -> {} steps {:?} hold {}ms success {} p99 {:?} min {}",
            self.service,
            self.stable,
            self.canary,
            self.steps,
            self.hold_ms,
            self.min_success,
            self.max_p99_ms,
            self.min_requests
        )
    }
}

/// The weights a rollout puts on the rules it drives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    pub stable: String,
    pub canary: String,
    /// The canary's share in thousandths; the stable gets the rest.
    pub canary_permille: u32,
}

/// Splits in force, by the `namespace/service` they drive.
pub type Splits = BTreeMap<String, Split>;

/// The rollouts of a config, compiled (a valid config has no problems).
pub fn plans(set: &ResourceSet) -> Vec<Plan> {
    set.rollouts
        .iter()
        .map(|r| plan(set, r, &mut Vec::new()))
        .collect()
}

/// Checks one Rollout and compiles it.
pub fn plan(set: &ResourceSet, r: &Loaded<RolloutSpec>, diags: &mut Vec<Diagnostic>) -> Plan {
    let problems_before = diags.len();
    let spec = &r.spec;
    for name in [&spec.service, &spec.stable, &spec.canary] {
        if set.service(&r.namespace, &name.value).is_none() {
            diags.push(Diagnostic::at(
                &r.at(name),
                format!("Service `{}/{}` does not exist", r.namespace, name.value),
            ));
        }
    }
    if spec.stable.value == spec.canary.value {
        diags.push(Diagnostic::at(
            &r.at(&spec.canary),
            "the canary must be another Service than the stable one",
        ));
    }
    let mut steps = Vec::new();
    for s in &spec.steps.value {
        let permille = (s.value * 10.0).round();
        if !(s.value > 0.0 && s.value <= 100.0) || (s.value * 10.0 - permille).abs() > 1e-6 {
            diags.push(Diagnostic::at(
                &r.at(s),
                format!(
                    "step {} must be a share above 0 and at most 100, in steps of 0.1",
                    s.value
                ),
            ));
            continue;
        }
        let permille = permille as u32;
        if steps.last().is_some_and(|&last| permille <= last) {
            diags.push(Diagnostic::at(&r.at(s), "steps must rise"));
        }
        steps.push(permille);
    }
    if steps.last() != Some(&1000) && !spec.steps.value.is_empty() {
        diags.push(Diagnostic::at(
            &r.at(&spec.steps),
            "the last step must be 100 (all traffic on the canary)",
        ));
    }
    if spec.steps.value.is_empty() {
        diags.push(Diagnostic::at(&r.at(&spec.steps), "a Rollout needs steps"));
    }
    let duration =
        |v: &Spanned<String>, min: Duration, max: Duration, diags: &mut Vec<Diagnostic>| {
            match crate::duration::parse_within(&v.value, min, max) {
                Ok(d) => Some(d),
                Err(e) => {
                    diags.push(Diagnostic::at(&r.at(v), e));
                    None
                }
            }
        };
    let hold = spec
        .hold
        .as_ref()
        .and_then(|h| {
            duration(
                h,
                Duration::from_secs(1),
                Duration::from_secs(24 * 3600),
                diags,
            )
        })
        .unwrap_or(DEFAULT_HOLD);
    let t = spec.thresholds.as_ref();
    let success = t.and_then(|t| t.success_rate.as_ref());
    if let Some(s) = success.filter(|s| !(0.0..=100.0).contains(&s.value)) {
        diags.push(Diagnostic::at(
            &r.at(s),
            "successRate must be 0-100 (percent)",
        ));
    }
    let max_p99 = t.and_then(|t| t.p99.as_ref()).and_then(|p| {
        duration(
            p,
            Duration::from_millis(1),
            Duration::from_secs(3600),
            diags,
        )
    });
    let min_requests = t
        .and_then(|t| t.min_requests.as_ref())
        .map_or(DEFAULT_MIN_REQUESTS, |m| m.value);
    if let Some(m) = t
        .and_then(|t| t.min_requests.as_ref())
        .filter(|m| m.value == 0)
    {
        diags.push(Diagnostic::at(
            &r.at(m),
            "minRequests must be at least 1: a step is judged on requests",
        ));
    }
    let p = Plan {
        namespace: r.namespace.clone(),
        name: r.name.clone(),
        service: spec.service.value.clone(),
        stable: spec.stable.value.clone(),
        canary: spec.canary.value.clone(),
        steps,
        hold_ms: hold.as_millis() as u64,
        min_success: success.map_or(DEFAULT_SUCCESS_RATE, |s| s.value) / 100.0,
        max_p99_ms: max_p99.map(|d| d.as_secs_f64() * 1e3),
        min_requests: u64::from(min_requests),
    };
    if diags.len() == problems_before && driven_rules(set, &p) == 0 {
        diags.push(Diagnostic::at(
            &r.at(&spec.service),
            format!(
                "no HTTPRoute or GRPCRoute rule of Service `{}` has exactly `{}` and `{}` as its backendRefs; write one for the Rollout to drive",
                p.service, p.stable, p.canary
            ),
        ));
    }
    p
}

/// How many route rules attached to the plan's Service it drives.
fn driven_rules(set: &ResourceSet, p: &Plan) -> usize {
    let attached = |refs: &[crate::model::ParentRef], ns: &str| {
        refs.iter().any(|x| {
            x.name.value == p.service
                && x.namespace.as_ref().map_or(ns, |n| n.value.as_str()) == p.namespace
        })
    };
    let http = set
        .http_routes
        .iter()
        .filter(|r| attached(&r.spec.parent_refs, &r.namespace))
        .flat_map(|r| r.spec.rules.iter().map(move |x| (r, &x.value.backend_refs)));
    let grpc = set
        .grpc_routes
        .iter()
        .filter(|r| attached(&r.spec.parent_refs, &r.namespace))
        .flat_map(|r| r.spec.rules.iter().map(move |x| (r, &x.value.backend_refs)));
    let mut n = 0;
    for (ns, refs) in http
        .map(|(r, b)| (r.namespace.as_str(), b))
        .chain(grpc.map(|(r, b)| (r.namespace.as_str(), b)))
    {
        fn names<'b>(b: &'b BackendRef, ns: &str, p: &Plan) -> (bool, &'b str) {
            (
                b.namespace.as_ref().map_or(ns, |n| n.value.as_str()) == p.namespace,
                b.name.value.as_str(),
            )
        }
        let names = |b| names(b, ns, p);
        let driven = refs.iter().all(|b| {
            let (same_ns, name) = names(b);
            same_ns && (name == p.stable || name == p.canary)
        }) && refs.iter().any(|b| names(b).1 == p.stable)
            && refs.iter().any(|b| names(b).1 == p.canary);
        if driven {
            n += 1;
        }
    }
    n
}

/// One Rollout per Service: two would fight over its weights.
pub(crate) fn validate(set: &ResourceSet, diags: &mut Vec<Diagnostic>) {
    let mut seen: BTreeMap<(String, String), &Loaded<RolloutSpec>> = BTreeMap::new();
    for r in &set.rollouts {
        plan(set, r, diags);
        let key = (r.namespace.clone(), r.spec.service.value.clone());
        if let Some(first) = seen.insert(key, r) {
            diags.push(Diagnostic::at(
                &r.at(&r.spec.service),
                format!(
                    "Service `{}/{}` already has Rollout `{}`; one Rollout per Service",
                    r.namespace, r.spec.service.value, first.name
                ),
            ));
        }
    }
}
