//! `tandem authz`: what the access policy of a config directory decides,
//! offline, with the decision code the sidecars run
//! (`tandem_config::authz`).

use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;
use tandem_config::authz::{normalize_path, AuthzRequest, Caller, Verdict};
use tandem_config::compile::resolve_name;
use tandem_config::model::DEFAULT_NAMESPACE;
use tandem_config::ResourceSet;
use tandem_identity::ca::DEFAULT_TRUST_DOMAIN;
use tandem_identity::SpiffeId;

#[derive(Subcommand)]
pub(crate) enum AuthzCommand {
    /// The verdict for one request and the rule that decided it. Exits 0
    /// when the request is allowed, 1 when it is denied.
    Check {
        /// The config directory.
        #[arg(long)]
        config: std::path::PathBuf,
        /// The calling service (`name` or `name.namespace`); without it, a
        /// plaintext caller with no identity.
        #[arg(long)]
        from: Option<String>,
        /// The service called (`name` or `name.namespace`).
        #[arg(long)]
        to: String,
        /// The port called (default: the service's first port).
        #[arg(long)]
        port: Option<u16>,
        /// A request header, `name: value` (repeatable).
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        /// The mesh's trust domain, for identity patterns.
        #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        method: String,
        path: String,
    },
    /// Who may reach a service: its policies in the order they apply, and
    /// for every service of the config whether its identity lets it in.
    List {
        #[arg(long)]
        config: std::path::PathBuf,
        #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// The service (`name` or `name.namespace`).
        service: String,
    },
}

pub(crate) fn run(cmd: AuthzCommand) -> ExitCode {
    match cmd {
        AuthzCommand::Check {
            config,
            from,
            to,
            port,
            headers,
            trust_domain,
            method,
            path,
        } => {
            let Some(set) = load(&config) else {
                return ExitCode::from(2);
            };
            check(
                &set,
                from.as_deref(),
                &to,
                port,
                &headers,
                &trust_domain,
                &method,
                &path,
            )
        }
        AuthzCommand::List {
            config,
            trust_domain,
            service,
        } => {
            let Some(set) = load(&config) else {
                return ExitCode::from(2);
            };
            list(&set, &trust_domain, &service)
        }
    }
}

fn load(dir: &Path) -> Option<ResourceSet> {
    match tandem_config::load_dir(dir) {
        Ok(set) => Some(set),
        Err(diags) => {
            for d in &diags {
                eprintln!("{d}");
            }
            eprintln!("{} problem(s) found in {}", diags.len(), dir.display());
            None
        }
    }
}

/// A service of the set, by `name` or `name.namespace`.
fn service<'a>(set: &ResourceSet, name: &'a str) -> Option<(&'a str, &'a str)> {
    let (ns, svc) = resolve_name(name, DEFAULT_NAMESPACE);
    set.service(ns, svc).map(|_| (ns, svc))
}

#[allow(clippy::too_many_arguments)]
fn check(
    set: &ResourceSet,
    from: Option<&str>,
    to: &str,
    port: Option<u16>,
    headers: &[String],
    trust_domain: &str,
    method: &str,
    path: &str,
) -> ExitCode {
    let Some((ns, name)) = service(set, to) else {
        eprintln!("no Service `{to}` in the config");
        return ExitCode::from(2);
    };
    let caller_id;
    let caller = match from {
        None => None,
        Some(f) => {
            let (cns, cname) = resolve_name(f, DEFAULT_NAMESPACE);
            caller_id = SpiffeId::new(trust_domain, cns, cname).uri();
            Some(Caller {
                id: &caller_id,
                namespace: cns,
                service: cname,
            })
        }
    };
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    let path = match normalize_path(path) {
        Ok(p) => p,
        Err(e) => {
            println!("deny (400 bad-request): the path has {}", e.describe());
            return ExitCode::from(1);
        }
    };
    let mut parsed = Vec::new();
    for h in headers {
        let Some((k, v)) = h.split_once(':') else {
            eprintln!("--header `{h}`: write `name: value`");
            return ExitCode::from(2);
        };
        parsed.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let header = |n: &str| -> Vec<&str> {
        parsed
            .iter()
            .filter(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let authz = tandem_config::authz::compile(set, ns, name);
    let first_port = set
        .service(ns, name)
        .and_then(|s| s.spec.ports.first())
        .map_or(0, |p| p.port.value);
    let req = AuthzRequest {
        caller,
        port: port.unwrap_or(first_port),
        method,
        path: &path,
        query,
        header: &header,
    };
    let d = authz.decide(&req);
    let who = from.unwrap_or("(plaintext)");
    let verdict = match d.verdict {
        Verdict::Allow => "allow",
        Verdict::Deny => "deny",
    };
    println!("{verdict}: {who} → {ns}/{name} {method} {path}");
    println!("  decided by {}", d.by.describe(authz.permissive));
    for (p, i) in &d.audited {
        println!("  audit {}, rule {i} would deny: {}", p.name, p.rules[*i]);
    }
    match d.verdict {
        Verdict::Allow => ExitCode::SUCCESS,
        Verdict::Deny => ExitCode::from(1),
    }
}

fn default_name(d: tandem_config::authz::AuthzDefault, permissive: bool) -> &'static str {
    use tandem_config::authz::AuthzDefault::*;
    match (d, permissive) {
        (AllowAuthenticated, false) => "allow-authenticated",
        (AllowAuthenticated, true) => {
            "allow-authenticated; the service is permissive, so plaintext too"
        }
        (Deny, _) => "deny",
    }
}

fn list(set: &ResourceSet, trust_domain: &str, target: &str) -> ExitCode {
    let Some((ns, name)) = service(set, target) else {
        eprintln!("no Service `{target}` in the config");
        return ExitCode::from(2);
    };
    let authz = tandem_config::authz::compile(set, ns, name);
    println!(
        "{ns}/{name}: mesh default {}; {} polic{}",
        default_name(authz.default, authz.permissive),
        authz.policies.len(),
        if authz.policies.len() == 1 {
            "y"
        } else {
            "ies"
        }
    );
    use tandem_config::authz::AuthzAction::*;
    for action in [Deny, Audit, Allow] {
        for p in authz.policies.iter().filter(|p| p.action == action) {
            let scope = p.scope();
            for (i, r) in p.rules.iter().enumerate() {
                println!("  {:5} {}{scope}, rule {i}: {r}", action.as_str(), p.name);
            }
        }
    }
    println!("callers:");
    let mut callers: Vec<(String, Option<String>)> = set
        .services
        .iter()
        .map(|s| {
            (
                format!("{}/{}", s.namespace, s.name),
                Some(s.namespace.clone()),
            )
        })
        .collect();
    callers.push(("(plaintext)".to_string(), None));
    for (label, cns) in &callers {
        let id;
        let caller = match cns {
            None => None,
            Some(cns) => {
                let cname = label.rsplit('/').next().unwrap_or_default();
                id = SpiffeId::new(trust_domain, cns, cname).uri();
                Some(Caller {
                    id: &id,
                    namespace: cns,
                    service: cname,
                })
            }
        };
        let reach = authz.reach(caller);
        let rules = |v: &[(&tandem_config::authz::AuthzPolicy, usize)]| {
            v.iter()
                .map(|(p, i)| format!("{} rule {i}", p.name))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let line = match &reach.allowed_by {
            None => "may not call".to_string(),
            Some(v) if v.is_empty() => "may call (mesh default)".to_string(),
            Some(v) => format!("may call through {}", rules(v)),
        };
        let narrowed = if reach.allowed_by.is_some() && !reach.denied_by.is_empty() {
            format!("; denied where {} match", rules(&reach.denied_by))
        } else {
            String::new()
        };
        let mut scoped = String::new();
        if reach.allowed_by.is_some() {
            for (p, rules) in &reach.scoped {
                let within = p.scope();
                let within = within
                    .trim_start()
                    .trim_start_matches('(')
                    .trim_end_matches(')');
                if rules.is_empty() {
                    scoped.push_str(&format!("; on {within}: no request"));
                } else {
                    let r: Vec<String> = rules
                        .iter()
                        .map(|i| format!("{} rule {i}", p.name))
                        .collect();
                    scoped.push_str(&format!("; on {within}: only through {}", r.join(", ")));
                }
            }
        }
        println!("  {label:30} {line}{narrowed}{scoped}");
    }
    ExitCode::SUCCESS
}
