//! `tandem apply DIR`: pushes a config directory through the control
//! plane's API into the store its replicas share. Checked here first, so
//! a broken set is refused with `file:line:col` before it leaves.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;

use crate::api::{block_on, send_json, ApiArgs};

pub fn apply(dir: &Path, api: &ApiArgs) -> anyhow::Result<()> {
    if let Err(diags) = tandem_config::load_dir(dir) {
        for d in &diags {
            eprintln!("{d}");
        }
        anyhow::bail!(
            "{} has {} problem(s); nothing pushed",
            dir.display(),
            diags.len()
        );
    }
    let mut files = BTreeMap::new();
    for f in tandem_config::config_files(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
    {
        let name = f.strip_prefix(dir).unwrap_or(&f).display().to_string();
        let text =
            std::fs::read_to_string(&f).with_context(|| format!("cannot read {}", f.display()))?;
        files.insert(name, text);
    }
    let target = api.target()?;
    let n = files.len();
    let body = serde_json::json!({ "files": files });
    let answer = block_on(async {
        send_json(&target, hyper::Method::PUT, "/api/v1/config", Some(&body)).await
    })?;
    println!(
        "pushed {n} file(s) from {} (store revision {})",
        dir.display(),
        answer["revision"]
    );
    Ok(())
}
