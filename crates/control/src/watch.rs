//! Watching the config directory. Every change reloads and validates the
//! whole set; a set with problems is refused (logged with its
//! `file:line:col` messages) and the last good config stays in force.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::mesh::Mesh;

/// Changes arriving within this window are applied together.
const DEBOUNCE: Duration = Duration::from_millis(150);
/// A periodic re-read as a safety net for file systems without events.
const RESCAN: Duration = Duration::from_secs(5);

pub async fn run(dir: PathBuf, mesh: Arc<Mesh>) -> anyhow::Result<()> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        // Reading the files (ours included) produces access events; only
        // changes matter.
        if let Ok(e) = res {
            if !matches!(e.kind, notify::EventKind::Access(_)) {
                let _ = tx.send(());
            }
        }
    })?;
    watcher.watch(&dir, RecursiveMode::Recursive)?;
    let mut last = fingerprint_async(&dir).await;
    loop {
        let event = tokio::time::timeout(RESCAN, rx.recv()).await;
        if let Ok(None) = event {
            return Ok(());
        }
        // Let an editor or `git checkout` finish writing.
        tokio::time::sleep(DEBOUNCE).await;
        while rx.try_recv().is_ok() {}
        let now = fingerprint_async(&dir).await;
        if now == last {
            continue;
        }
        last = now;
        reload(&dir, &mesh).await;
    }
}

pub async fn reload(dir: &std::path::Path, mesh: &Arc<Mesh>) {
    let d = dir.to_path_buf();
    let loaded = tokio::task::spawn_blocking(move || tandem_config::load_dir(&d)).await;
    match loaded {
        Ok(Ok(set)) => {
            tracing::info!(
                services = set.services.len(),
                routes = set.http_routes.len(),
                "config reloaded"
            );
            mesh.set_config(set).await;
        }
        Ok(Err(diags)) => {
            let msgs: Vec<String> = diags.iter().map(|d| d.to_string()).collect();
            for m in &msgs {
                tracing::error!("config refused: {m}");
            }
            tracing::error!(
                problems = msgs.len(),
                "config change refused; the last good config stays in force"
            );
            mesh.config_refused(msgs);
        }
        Err(e) => tracing::error!(error = %e, "config reload failed"),
    }
}

async fn fingerprint_async(dir: &std::path::Path) -> u64 {
    let d = dir.to_path_buf();
    tokio::task::spawn_blocking(move || fingerprint(&d))
        .await
        .unwrap_or(0)
}

/// A hash of the names and contents of the files the loader reads (hidden
/// files and directories, such as `.git`, are skipped as the loader skips
/// them; symbolic links to directories are not followed).
fn fingerprint(dir: &std::path::Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut stack = vec![dir.to_path_buf()];
    let mut files = Vec::new();
    while let Some(d) = stack.pop() {
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with('.') {
                    continue;
                }
                let p = e.path();
                match e.file_type() {
                    Ok(t) if t.is_dir() => stack.push(p),
                    Ok(_) => files.push(p),
                    Err(_) => {}
                }
            }
        }
    }
    files.sort();
    for f in files {
        f.hash(&mut h);
        if let Ok(bytes) = std::fs::read(&f) {
            bytes.hash(&mut h);
        }
    }
    h.finish()
}
