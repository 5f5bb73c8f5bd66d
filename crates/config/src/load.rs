//! Reading a config directory: every `*.yaml` / `*.yml` file (recursively, in
//! sorted order), every `---`-separated document in it. Each document is
//! parsed on its own so that one broken document does not hide the problems
//! of the others.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_saphyr::Location;

use crate::diag::Diagnostic;
use crate::model::{
    AuthorizationPolicySpec, Document, FaultInjectionSpec, GrpcRouteSpec, Head, HttpRouteSpec,
    Loaded, MeshSpec, Pos, ResourceSet, RolloutSpec, ServiceSpec, TrafficPolicySpec,
    DEFAULT_NAMESPACE, GATEWAY_API, TANDEM_API,
};
use crate::validate;

/// Loads and validates a whole config directory. Returns the set, or every
/// problem found (sorted by file and position).
pub fn load_dir(dir: &Path) -> Result<ResourceSet, Vec<Diagnostic>> {
    let mut files = Vec::new();
    if let Err(e) = collect_files(dir, &mut files) {
        return Err(vec![Diagnostic::new(
            dir,
            0,
            0,
            format!("cannot read config directory: {e}"),
        )]);
    }
    files.sort();
    let mut set = ResourceSet::default();
    let mut diags = Vec::new();
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => parse_file(&file, &text, &mut set, &mut diags),
            Err(e) => diags.push(Diagnostic::new(
                &file,
                0,
                0,
                format!("cannot read file: {e}"),
            )),
        }
    }
    finish(set, diags)
}

/// Loads and validates config given as named texts (files pushed through
/// the control plane's API); problems name the files as given.
pub fn load_files<'a>(
    files: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<ResourceSet, Vec<Diagnostic>> {
    let mut set = ResourceSet::default();
    let mut diags = Vec::new();
    for (name, text) in files {
        parse_file(Path::new(name), text, &mut set, &mut diags);
    }
    finish(set, diags)
}

/// The config files under a directory (`*.yaml`, `*.yml`; hidden files
/// and editors' backups skipped), sorted.
pub fn config_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    collect_files(dir, &mut files)?;
    files.sort();
    Ok(files)
}

/// Loads and validates config given as text (one "file"); used by tests and
/// by `tandem up`'s built-in demo.
pub fn load_str(name: &str, text: &str) -> Result<ResourceSet, Vec<Diagnostic>> {
    let mut set = ResourceSet::default();
    let mut diags = Vec::new();
    parse_file(Path::new(name), text, &mut set, &mut diags);
    finish(set, diags)
}

fn finish(set: ResourceSet, mut diags: Vec<Diagnostic>) -> Result<ResourceSet, Vec<Diagnostic>> {
    validate::validate(&set, &mut diags);
    if diags.is_empty() {
        Ok(set)
    } else {
        diags.sort();
        diags.dedup();
        Err(diags)
    }
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // Editors' swap and backup files, and hidden files, are not config.
        if name.starts_with('.') || name.ends_with('~') {
            continue;
        }
        if entry.file_type()?.is_dir() {
            collect_files(&path, out)?;
        } else if name.ends_with(".yaml") || name.ends_with(".yml") {
            out.push(path);
        }
    }
    Ok(())
}

/// Splits a file into documents: (line offset of the document, its text).
fn split_documents(text: &str) -> Vec<(u64, String)> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut start = 0u64;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_end();
        if trimmed == "---" || trimmed.starts_with("--- ") || trimmed == "..." {
            docs.push((start, std::mem::take(&mut current)));
            start = i as u64 + 1;
            continue;
        }
        current.push_str(line);
        current.push('\n');
    }
    docs.push((start, current));
    docs.retain(|(_, d)| {
        d.lines().any(|l| {
            let t = l.trim();
            !t.is_empty() && !t.starts_with('#')
        })
    });
    docs
}

struct Ctx<'a> {
    file: &'a Arc<Path>,
    offset: u64,
}

impl Ctx<'_> {
    fn pos(&self, loc: Location) -> Pos {
        Pos {
            file: self.file.clone(),
            line: if loc.line() == 0 {
                0
            } else {
                loc.line() + self.offset
            },
            column: loc.column(),
        }
    }

    fn parse<T: DeserializeOwned>(&self, text: &str) -> Result<T, Diagnostic> {
        let options = serde_saphyr::options! { with_snippet: false };
        serde_saphyr::from_str_with_options(text, options).map_err(|e| {
            let (line, column) = e
                .location()
                .map(|l| (l.line() + self.offset, l.column()))
                .unwrap_or((self.offset + 1, 1));
            Diagnostic::new(
                self.file.as_ref(),
                line,
                column,
                clean_message(&e.to_string()),
            )
        })
    }
}

/// serde-saphyr appends its own position to messages; ours is in front.
fn clean_message(msg: &str) -> String {
    let first = msg.lines().next().unwrap_or(msg);
    match first.find(" at line ") {
        Some(i) => first[..i].to_string(),
        None => first.to_string(),
    }
}

fn parse_file(file: &Path, text: &str, set: &mut ResourceSet, diags: &mut Vec<Diagnostic>) {
    let file: Arc<Path> = Arc::from(file);
    for (offset, doc) in split_documents(text) {
        let ctx = Ctx {
            file: &file,
            offset,
        };
        if let Err(d) = parse_document(&ctx, &doc, set) {
            diags.push(d);
        }
    }
}

fn parse_document(ctx: &Ctx<'_>, doc: &str, set: &mut ResourceSet) -> Result<(), Diagnostic> {
    let head: Head = ctx.parse(doc)?;
    let start = Pos {
        file: ctx.file.clone(),
        line: ctx.offset + 1,
        column: 1,
    };
    let Some(kind) = head.kind else {
        return Err(Diagnostic::at(&start, "missing field `kind`"));
    };
    let Some(api) = head.api_version else {
        return Err(Diagnostic::at(&start, "missing field `apiVersion`"));
    };
    let expect_api = |wanted: &str| -> Result<(), Diagnostic> {
        if api.value != wanted {
            return Err(Diagnostic::at(
                &ctx.pos(api.referenced),
                format!(
                    "apiVersion `{}` is not supported for kind {}; use `{wanted}`",
                    api.value, kind.value
                ),
            ));
        }
        Ok(())
    };
    match kind.value.as_str() {
        "Service" => {
            expect_api(TANDEM_API)?;
            let d: Document<ServiceSpec> = ctx.parse(doc)?;
            set.services.push(loaded(ctx, d));
        }
        "HTTPRoute" => {
            expect_api(GATEWAY_API)?;
            let d: Document<HttpRouteSpec> = ctx.parse(doc)?;
            set.http_routes.push(loaded(ctx, d));
        }
        "GRPCRoute" => {
            expect_api(GATEWAY_API)?;
            let d: Document<GrpcRouteSpec> = ctx.parse(doc)?;
            set.grpc_routes.push(loaded(ctx, d));
        }
        "TrafficPolicy" => {
            expect_api(TANDEM_API)?;
            let d: Document<TrafficPolicySpec> = ctx.parse(doc)?;
            set.traffic_policies.push(loaded(ctx, d));
        }
        "AuthorizationPolicy" => {
            expect_api(TANDEM_API)?;
            let d: Document<AuthorizationPolicySpec> = ctx.parse(doc)?;
            set.authorization_policies.push(loaded(ctx, d));
        }
        "FaultInjection" => {
            expect_api(TANDEM_API)?;
            let d: Document<FaultInjectionSpec> = ctx.parse(doc)?;
            set.fault_injections.push(loaded(ctx, d));
        }
        "Rollout" => {
            expect_api(TANDEM_API)?;
            let d: Document<RolloutSpec> = ctx.parse(doc)?;
            set.rollouts.push(loaded(ctx, d));
        }
        "Mesh" => {
            expect_api(TANDEM_API)?;
            let d: Document<MeshSpec> = ctx.parse(doc)?;
            set.meshes.push(loaded(ctx, d));
        }
        "ExternalService" => {
            expect_api(TANDEM_API)?;
            let d: Document<crate::model::ExternalServiceSpec> = ctx.parse(doc)?;
            set.external_services.push(loaded(ctx, d));
        }
        "RemoteCluster" => {
            expect_api(TANDEM_API)?;
            let d: Document<crate::model::RemoteClusterSpec> = ctx.parse(doc)?;
            set.remote_clusters.push(loaded(ctx, d));
        }
        other => {
            return Err(Diagnostic::at(
                &ctx.pos(kind.referenced),
                format!("unknown kind `{other}`; supported kinds: Service, TrafficPolicy, AuthorizationPolicy, FaultInjection, Rollout, Mesh, ExternalService and RemoteCluster ({TANDEM_API}), HTTPRoute and GRPCRoute ({GATEWAY_API})"),
            ))
        }
    }
    Ok(())
}

fn loaded<S>(ctx: &Ctx<'_>, d: Document<S>) -> Loaded<S> {
    let (namespace, namespace_pos) = match d.metadata.namespace {
        Some(n) => (n.value, ctx.pos(n.referenced)),
        None => (
            DEFAULT_NAMESPACE.to_string(),
            ctx.pos(d.metadata.name.referenced),
        ),
    };
    Loaded {
        name: d.metadata.name.value,
        namespace,
        pos: ctx.pos(d.kind.referenced),
        name_pos: ctx.pos(d.metadata.name.referenced),
        namespace_pos,
        file: ctx.file.clone(),
        line_offset: ctx.offset,
        spec: d.spec,
    }
}
