//! Progressive delivery: the control plane walks each `Rollout` of the
//! config through its steps. At each step the canary gets the step's share
//! of the driven rules' traffic (a [`Split`] compiled into the snapshots in
//! place of the weights written in the routes, so the files stay as
//! written); the canary's golden signals, as the callers' sidecars
//! measured them since the step began, decide what happens next:
//!
//! - once the canary has answered `minRequests` in the step and its
//!   success rate or p99 is past a threshold, the rollout rolls back: all
//!   traffic to the stable backend, at once, whatever the hold;
//! - once the hold is over with `minRequests` answered and the thresholds
//!   kept, it moves to the next step, and after the last one it has
//!   succeeded (all traffic to the canary);
//! - with fewer requests it waits: no step is promoted without evidence.
//!
//! Every decision is recorded with its numbers. The state lives in the
//! store (`rollouts/<namespace>/<name>`), so a restarted control plane goes
//! on where it was; a changed spec starts the rollout over, and a rollout
//! removed from the config is forgotten (its rules get their own weights
//! back). People can
//! pause, resume, abort or promote a rollout through the API. The rules
//! ([`decide`]) are pure; [`Rollouts`] runs them once a second.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tandem_config::rollout::{plans, Plan, Split, Splits};
use tandem_runtime::sync::Mutex;
use tandem_store::{Kv, Record};

use crate::mesh::Mesh;
use crate::stats::{Signals, Stats};

/// How often rollouts are looked at.
pub const TICK: Duration = Duration::from_secs(1);
/// Most decisions kept in a rollout's history.
const HISTORY: usize = 200;
/// The stats keep five minutes; a step is judged on at most that.
const MAX_WINDOW: Duration = Duration::from_secs(300);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Progressing,
    Paused,
    Succeeded,
    RolledBack,
    Aborted,
}

/// One decision, with the numbers it was made on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Unix milliseconds.
    pub at_ms: u64,
    /// `start`, `promote`, `succeed`, `rollback`, `pause`, `resume`,
    /// `abort`, `promote` (by a person: `manual` says so).
    pub action: String,
    /// The step it led to, and the canary's share there (percent).
    pub step: usize,
    pub canary_percent: f64,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signals: Option<Signals>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub manual: bool,
}

/// A rollout's course, as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// The plan it runs ([`Plan::describe`]); another spec starts over.
    pub spec: String,
    pub phase: Phase,
    pub step: usize,
    pub canary_permille: u32,
    /// When the current step began, Unix milliseconds.
    pub step_started_ms: u64,
    /// The canary's signals in the current step, last measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured: Option<Signals>,
    pub history: Vec<Decision>,
}

/// What [`decide`] says to do.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// Go to this step.
    Promote(usize),
    Succeed,
    RollBack(String),
    /// Keep the step: why (for the status).
    Wait(String),
}

fn percent(permille: u32) -> f64 {
    f64::from(permille) / 10.0
}

/// The rules: what to do with a progressing rollout at step `state.step`
/// whose canary showed `s` since the step began, `elapsed_ms` ago.
pub fn decide(plan: &Plan, state: &State, s: &Signals, elapsed_ms: u64) -> Verdict {
    if s.requests >= plan.min_requests {
        if s.success_rate < plan.min_success {
            return Verdict::RollBack(format!(
                "success rate {:.2} % is below {:.2} % over {} requests",
                s.success_rate * 100.0,
                plan.min_success * 100.0,
                s.requests
            ));
        }
        if let Some(max) = plan.max_p99_ms.filter(|max| s.p99_ms > *max) {
            return Verdict::RollBack(format!(
                "p99 {:.1} ms is above {max:.1} ms over {} requests",
                s.p99_ms, s.requests
            ));
        }
    }
    if elapsed_ms < plan.hold_ms {
        return Verdict::Wait(format!(
            "holding step {} for {} s more",
            state.step + 1,
            (plan.hold_ms - elapsed_ms).div_ceil(1000)
        ));
    }
    if s.requests < plan.min_requests {
        return Verdict::Wait(format!(
            "waiting for {} requests to the canary (has {})",
            plan.min_requests, s.requests
        ));
    }
    if state.step + 1 < plan.steps.len() {
        Verdict::Promote(state.step + 1)
    } else {
        Verdict::Succeed
    }
}

/// What a person asks of a rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Pause,
    /// Goes on after a pause; starts over after the rollout ended.
    Resume,
    /// All traffic back to the stable backend, and stop.
    Abort,
    /// The next step now, without waiting for the hold.
    Promote,
}

impl Action {
    pub fn parse(s: &str) -> Option<Action> {
        Some(match s {
            "pause" => Action::Pause,
            "resume" => Action::Resume,
            "abort" => Action::Abort,
            "promote" => Action::Promote,
            _ => return None,
        })
    }
}

/// A fresh start of `plan`.
fn start(plan: &Plan, now_ms: u64, action: &str, reason: String, manual: bool) -> State {
    let mut st = State {
        spec: plan.describe(),
        phase: Phase::Progressing,
        step: 0,
        canary_permille: plan.steps.first().copied().unwrap_or(0),
        step_started_ms: now_ms,
        measured: None,
        history: Vec::new(),
    };
    st.record(action, reason, None, manual, now_ms);
    st
}

impl State {
    fn record(
        &mut self,
        action: &str,
        reason: String,
        signals: Option<Signals>,
        manual: bool,
        now_ms: u64,
    ) {
        self.history.push(Decision {
            at_ms: now_ms,
            action: action.to_string(),
            step: self.step,
            canary_percent: percent(self.canary_permille),
            reason,
            signals,
            manual,
        });
        if self.history.len() > HISTORY {
            let extra = self.history.len() - HISTORY;
            self.history.drain(..extra);
        }
    }

    fn go_to(&mut self, plan: &Plan, step: usize, now_ms: u64) {
        self.step = step;
        self.canary_permille = plan.steps.get(step).copied().unwrap_or(1000);
        self.step_started_ms = now_ms;
        self.measured = None;
    }

    /// Applies a verdict; whether anything changed that must be stored.
    fn apply(&mut self, plan: &Plan, v: Verdict, s: Signals, now_ms: u64) -> bool {
        match v {
            Verdict::Promote(step) => {
                self.go_to(plan, step, now_ms);
                let why = format!(
                    "the canary kept the thresholds: success {:.2} %, p99 {:.1} ms over {} requests",
                    s.success_rate * 100.0,
                    s.p99_ms,
                    s.requests
                );
                self.record("promote", why, Some(s), false, now_ms);
            }
            Verdict::Succeed => {
                self.phase = Phase::Succeeded;
                self.canary_permille = 1000;
                let why = format!(
                    "the last step held: success {:.2} %, p99 {:.1} ms over {} requests",
                    s.success_rate * 100.0,
                    s.p99_ms,
                    s.requests
                );
                self.record("succeed", why, Some(s), false, now_ms);
            }
            Verdict::RollBack(why) => {
                self.phase = Phase::RolledBack;
                self.canary_permille = 0;
                self.record("rollback", why, Some(s), false, now_ms);
            }
            Verdict::Wait(_) => {
                // Measured again each tick; kept in memory, not stored.
                self.measured = Some(s);
                return false;
            }
        }
        true
    }

    /// Applies a person's action; `Err` says why it does not apply.
    fn act(&mut self, plan: &Plan, a: Action, now_ms: u64) -> Result<(), String> {
        match (a, self.phase) {
            (Action::Pause, Phase::Progressing) => {
                self.phase = Phase::Paused;
                self.record("pause", "paused by a person".into(), None, true, now_ms);
            }
            (Action::Resume, Phase::Paused) => {
                self.phase = Phase::Progressing;
                // The hold of the step starts again.
                self.step_started_ms = now_ms;
                self.measured = None;
                self.record("resume", "resumed by a person".into(), None, true, now_ms);
            }
            (Action::Resume, Phase::Succeeded | Phase::RolledBack | Phase::Aborted) => {
                let history = std::mem::take(&mut self.history);
                *self = start(
                    plan,
                    now_ms,
                    "start",
                    "started over by a person".into(),
                    true,
                );
                let mut all = history;
                all.append(&mut self.history);
                self.history = all;
            }
            (Action::Abort, Phase::Progressing | Phase::Paused) => {
                self.phase = Phase::Aborted;
                self.canary_permille = 0;
                self.record(
                    "abort",
                    "aborted by a person: all traffic to the stable backend".into(),
                    None,
                    true,
                    now_ms,
                );
            }
            (Action::Promote, Phase::Progressing | Phase::Paused) => {
                let signals = self.measured.clone();
                if self.step + 1 < plan.steps.len() {
                    self.go_to(plan, self.step + 1, now_ms);
                    self.record(
                        "promote",
                        "promoted by a person".into(),
                        signals,
                        true,
                        now_ms,
                    );
                } else {
                    self.phase = Phase::Succeeded;
                    self.canary_permille = 1000;
                    self.record(
                        "succeed",
                        "promoted by a person".into(),
                        signals,
                        true,
                        now_ms,
                    );
                }
            }
            (a, phase) => {
                return Err(format!("cannot {a:?} a rollout that is {phase:?}").to_lowercase())
            }
        }
        Ok(())
    }
}

/// One rollout as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct View {
    pub namespace: String,
    pub name: String,
    pub service: String,
    pub stable: String,
    pub canary: String,
    /// Steps in percent.
    pub steps: Vec<f64>,
    pub hold_ms: u64,
    pub min_success_rate: f64,
    pub max_p99_ms: Option<f64>,
    pub min_requests: u64,
    pub state: Option<State>,
    /// What the rollout waits for now, if anything.
    #[serde(default)]
    pub waiting: Option<String>,
}

/// The rollouts this control plane runs.
pub struct Rollouts {
    mesh: Arc<Mesh>,
    stats: Arc<Stats>,
    kv: Arc<dyn Kv>,
    /// Only the leader decides; every replica puts the stored splits in
    /// force.
    leadership: tandem_store::etcd::Leadership,
    /// The other replicas, whose proxies report to them: the leader adds
    /// their figures to its own.
    peers: Option<Peers>,
    /// The last known state of each rollout in the config, by key, and
    /// what it waits for.
    known: Mutex<BTreeMap<String, (State, Option<String>)>>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn record(kv: &Arc<dyn Kv>, plan: &Plan) -> Record<State> {
    Record::new(
        kv.clone(),
        format!("rollouts/{}/{}", plan.namespace, plan.name),
    )
}

/// The other replicas sharing the store, asked for their proxies' figures.
pub struct Peers {
    pub shared: Arc<crate::store::Shared>,
    /// The admin credential (shared by the replicas).
    pub credential: String,
}

impl Peers {
    /// Every other live replica's sums for calls to `destination` over the
    /// last `age`; the name of one that did not answer (deciding on part
    /// of the traffic could promote a canary its callers see failing).
    async fn counters(
        &self,
        destination: &str,
        age: Duration,
    ) -> Result<Vec<crate::stats::PairCounters>, String> {
        use http_body_util::BodyExt;
        let peers = self
            .shared
            .peers()
            .await
            .map_err(|e| format!("cannot list the other replicas: {e}"))?;
        let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let mut out = Vec::new();
        for (name, api) in peers {
            let uri = format!(
                "http://{api}/api/v1/stats/destination?service={destination}&since_ms={}",
                age.as_millis()
            );
            let req = hyper::Request::get(uri)
                .header(hyper::header::HOST, api.as_str())
                .header(
                    hyper::header::AUTHORIZATION,
                    format!("Bearer {}", self.credential),
                )
                .body(http_body_util::Empty::new())
                .map_err(|e| e.to_string())?;
            let answer = tokio::time::timeout(Duration::from_secs(2), async {
                let resp = client.request(req).await.map_err(|e| e.to_string())?;
                if !resp.status().is_success() {
                    return Err(resp.status().to_string());
                }
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?
                    .to_bytes();
                serde_json::from_slice::<crate::stats::PairCounters>(&body)
                    .map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|_| Err("no answer in 2s".into()));
            match answer {
                Ok(c) => out.push(c),
                Err(e) => {
                    return Err(format!(
                        "waiting for the figures of replica {name} ({api}): {e}"
                    ))
                }
            }
        }
        Ok(out)
    }
}

impl Rollouts {
    pub fn new(
        mesh: Arc<Mesh>,
        stats: Arc<Stats>,
        kv: Arc<dyn Kv>,
        leadership: tandem_store::etcd::Leadership,
        peers: Option<Peers>,
    ) -> Arc<Self> {
        Arc::new(Rollouts {
            mesh,
            stats,
            kv,
            leadership,
            peers,
            known: Mutex::new(BTreeMap::new()),
        })
    }

    /// Looks at every rollout once per `tick`, for good.
    pub async fn run(self: Arc<Self>, tick: Duration) {
        loop {
            if let Err(e) = self.step_all().await {
                tracing::warn!(error = %e, "rollouts: the store failed; trying again");
            }
            tokio::time::sleep(tick).await;
        }
    }

    /// One look at every rollout of the config in force.
    pub async fn step_all(&self) -> std::io::Result<()> {
        let plans = plans(&self.mesh.config());
        let mut splits = Splits::new();
        let mut known = BTreeMap::new();
        for plan in &plans {
            let (state, waiting) = self.step_one(plan).await?;
            splits.insert(
                format!("{}/{}", plan.namespace, plan.service),
                Split {
                    stable: plan.stable.clone(),
                    canary: plan.canary.clone(),
                    canary_permille: state.canary_permille,
                },
            );
            known.insert(plan.key(), (state, waiting));
        }
        *self.known.lock() = known;
        self.mesh.set_splits(splits);
        if !self.leadership.is_leader() {
            return Ok(());
        }
        // A rollout gone from the config is forgotten: the same spec added
        // again later is a new rollout, not the end of the old one.
        let keep: Vec<String> = plans
            .iter()
            .map(|p| format!("rollouts/{}/{}", p.namespace, p.name))
            .collect();
        for key in self.kv.list("rollouts").await? {
            if !keep.contains(&key) {
                self.kv.delete(&key).await?;
                tracing::info!(%key, "rollout no longer in the config; its state is removed");
            }
        }
        Ok(())
    }

    async fn step_one(&self, plan: &Plan) -> std::io::Result<(State, Option<String>)> {
        let now = now_ms();
        if !self.leadership.is_leader() {
            // Another replica decides: follow what it stored.
            let stored = record(&self.kv, plan).get().await?.map(|(st, _)| st);
            let state = match stored {
                Some(st) if st.spec == plan.describe() => st,
                _ => start(plan, now, "start", "new rollout".into(), false),
            };
            return Ok((state, Some("decided by the leading replica".into())));
        }
        // The other replicas' figures for the canary over the current
        // step (as stored now; the update below decides on the same step
        // unless a person acted in between).
        let mut remote = Vec::new();
        if let Some(peers) = &self.peers {
            let stored = record(&self.kv, plan).get().await?;
            if let Some((st, _)) = stored.filter(|(st, _)| st.phase == Phase::Progressing) {
                let age =
                    Duration::from_millis(now.saturating_sub(st.step_started_ms)).min(MAX_WINDOW);
                match peers.counters(&plan.canary, age).await {
                    Ok(r) => remote = r,
                    Err(why) => return Ok((st, Some(why))),
                }
            }
        }
        let stats = self.stats.clone();
        let mut waiting = None;
        let out = record(&self.kv, plan)
            .update(|current: Option<State>| {
                let mut st = match current {
                    Some(st) if st.spec == plan.describe() => st,
                    Some(_) => start(
                        plan,
                        now,
                        "start",
                        "the spec changed; starting over".into(),
                        false,
                    ),
                    None => start(plan, now, "start", "new rollout".into(), false),
                };
                let fresh = st.history.len() == 1 && st.history[0].at_ms == now;
                if st.phase != Phase::Progressing {
                    return if fresh { Ok((st.clone(), st)) } else { Err(st) };
                }
                let elapsed = now.saturating_sub(st.step_started_ms);
                let since = tokio::time::Instant::now()
                    .checked_sub(Duration::from_millis(elapsed).min(MAX_WINDOW))
                    .unwrap_or_else(tokio::time::Instant::now);
                let mut sums = stats.destination_counters(&plan.canary, since);
                for r in &remote {
                    crate::stats::merge(&mut sums, r);
                }
                let signals = crate::stats::signals(&sums);
                let verdict = decide(plan, &st, &signals, elapsed);
                if let Verdict::Wait(why) = &verdict {
                    waiting = Some(why.clone());
                }
                let changed = st.apply(plan, verdict, signals, now) || fresh;
                if changed {
                    Ok((st.clone(), st))
                } else {
                    Err(st)
                }
            })
            .await?;
        let state = match out {
            Ok(st) => {
                if let Some(d) = st.history.last().filter(|d| d.at_ms == now) {
                    tracing::info!(
                        rollout = %plan.key(),
                        action = %d.action,
                        step = st.step + 1,
                        canary_percent = d.canary_percent,
                        reason = %d.reason,
                        "rollout"
                    );
                }
                st
            }
            // Nothing to store.
            Err(st) => st,
        };
        Ok((state, waiting))
    }

    /// Applies a person's action to rollout `namespace/name`.
    pub async fn act(&self, namespace: &str, name: &str, a: Action) -> Result<View, ActError> {
        let plans = plans(&self.mesh.config());
        let Some(plan) = plans
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
        else {
            return Err(ActError::NotFound);
        };
        let now = now_ms();
        let done = record(&self.kv, plan)
            .update(|current: Option<State>| {
                let mut st = match current {
                    Some(st) if st.spec == plan.describe() => st,
                    _ => start(plan, now, "start", "new rollout".into(), false),
                };
                st.act(plan, a, now)?;
                Ok((st.clone(), st))
            })
            .await
            .map_err(|e| ActError::Store(e.to_string()))?
            .map_err(ActError::Refused)?;
        tracing::info!(rollout = %plan.key(), action = ?a, step = done.step + 1, canary_percent = percent(done.canary_permille), "rollout changed by a person");
        self.step_all()
            .await
            .map_err(|e| ActError::Store(e.to_string()))?;
        Ok(self.view(plan))
    }

    fn view(&self, plan: &Plan) -> View {
        let known = self.known.lock().get(&plan.key()).cloned();
        View {
            namespace: plan.namespace.clone(),
            name: plan.name.clone(),
            service: plan.service.clone(),
            stable: plan.stable.clone(),
            canary: plan.canary.clone(),
            steps: plan.steps.iter().map(|s| percent(*s)).collect(),
            hold_ms: plan.hold_ms,
            min_success_rate: plan.min_success,
            max_p99_ms: plan.max_p99_ms,
            min_requests: plan.min_requests,
            waiting: known.as_ref().and_then(|k| k.1.clone()),
            state: known.map(|k| k.0),
        }
    }

    /// Every rollout of the config in force, with its state.
    pub fn list(&self) -> Vec<View> {
        plans(&self.mesh.config())
            .iter()
            .map(|p| self.view(p))
            .collect()
    }
}

/// Why a person's action was not applied.
#[derive(Debug)]
pub enum ActError {
    NotFound,
    Refused(String),
    Store(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan {
            namespace: "default".into(),
            name: "catalog".into(),
            service: "catalog".into(),
            stable: "catalog-v1".into(),
            canary: "catalog-v2".into(),
            steps: vec![10, 250, 1000],
            hold_ms: 10_000,
            min_success: 0.99,
            max_p99_ms: Some(200.0),
            min_requests: 50,
        }
    }

    fn signals(requests: u64, success_rate: f64, p99_ms: f64) -> Signals {
        Signals {
            requests,
            success_rate,
            p99_ms,
        }
    }

    #[test]
    fn a_step_is_promoted_after_its_hold_with_enough_good_requests() {
        let p = plan();
        let st = start(&p, 0, "start", String::new(), false);
        assert_eq!(st.canary_permille, 10);
        let good = signals(80, 1.0, 20.0);
        assert!(matches!(decide(&p, &st, &good, 5_000), Verdict::Wait(_)));
        assert_eq!(decide(&p, &st, &good, 10_000), Verdict::Promote(1));
        // Not enough requests: no promotion, whatever the time.
        let few = signals(10, 1.0, 20.0);
        assert!(
            matches!(decide(&p, &st, &few, 60_000), Verdict::Wait(w) if w.contains("50 requests"))
        );
        // The last step held: done.
        let mut last = st.clone();
        last.go_to(&p, 2, 0);
        assert_eq!(decide(&p, &last, &good, 10_000), Verdict::Succeed);
    }

    #[test]
    fn a_failing_canary_is_rolled_back_at_once_with_its_numbers() {
        let p = plan();
        let mut st = start(&p, 0, "start", String::new(), false);
        let bad = signals(60, 0.9, 20.0);
        let v = decide(&p, &st, &bad, 1_000);
        assert!(
            matches!(&v, Verdict::RollBack(w) if w.contains("90.00 %") && w.contains("60 requests")),
            "{v:?}"
        );
        assert!(st.apply(&p, v, bad.clone(), 1_000));
        assert_eq!((st.phase, st.canary_permille), (Phase::RolledBack, 0));
        let d = st.history.last().expect("decision");
        assert_eq!(d.action, "rollback");
        assert_eq!(d.signals.as_ref(), Some(&bad));
        let slow = signals(60, 1.0, 450.0);
        assert!(
            matches!(decide(&p, &start(&p, 0, "start", String::new(), false), &slow, 1_000), Verdict::RollBack(w) if w.contains("p99 450.0 ms"))
        );
        // Too few requests to judge: no rollback yet.
        let early = signals(5, 0.0, 900.0);
        assert!(matches!(
            decide(
                &p,
                &start(&p, 0, "start", String::new(), false),
                &early,
                1_000
            ),
            Verdict::Wait(_)
        ));
    }

    #[test]
    fn people_pause_resume_abort_and_promote() {
        let p = plan();
        let mut st = start(&p, 0, "start", String::new(), false);
        st.act(&p, Action::Pause, 1).expect("pause");
        assert_eq!(st.phase, Phase::Paused);
        assert!(st.act(&p, Action::Pause, 2).is_err());
        st.act(&p, Action::Promote, 3).expect("promote");
        assert_eq!((st.step, st.canary_permille), (1, 250));
        st.act(&p, Action::Resume, 4).expect("resume");
        assert_eq!((st.phase, st.step_started_ms), (Phase::Progressing, 4));
        st.act(&p, Action::Abort, 5).expect("abort");
        assert_eq!((st.phase, st.canary_permille), (Phase::Aborted, 0));
        assert!(st.act(&p, Action::Promote, 6).is_err());
        // Resume after the end starts over, keeping the history.
        st.act(&p, Action::Resume, 7).expect("start over");
        assert_eq!(
            (st.phase, st.step, st.canary_permille),
            (Phase::Progressing, 0, 10)
        );
        let actions: Vec<&str> = st.history.iter().map(|d| d.action.as_str()).collect();
        assert_eq!(
            actions,
            ["start", "pause", "promote", "resume", "abort", "start"]
        );
        assert!(st.history[1..].iter().all(|d| d.manual));
    }
}
