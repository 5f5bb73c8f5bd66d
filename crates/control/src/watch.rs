//! The config directory as a [`ConfigSource`]: every change reloads and
//! validates the whole set. inotify events (debounced, so an editor or
//! `git checkout` can finish writing) and a periodic rescan (for file
//! systems without events) trigger a reload when the content fingerprint
//! changed.

use std::path::PathBuf;
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tandem_config::{Diagnostic, ResourceSet};
use tokio::sync::mpsc;

use crate::config::{Change, ConfigSource};

/// Changes arriving within this window are applied together.
const DEBOUNCE: Duration = Duration::from_millis(150);
/// A periodic re-read as a safety net for file systems without events.
const RESCAN: Duration = Duration::from_secs(5);

pub struct DirSource {
    dir: PathBuf,
    events: mpsc::UnboundedReceiver<()>,
    _watcher: RecommendedWatcher,
    last: u64,
}

impl DirSource {
    /// Loads the directory and starts watching it; a directory whose
    /// config has problems is refused with them.
    pub async fn open(
        dir: PathBuf,
    ) -> anyhow::Result<Result<(DirSource, ResourceSet), Vec<Diagnostic>>> {
        let (tx, events) = mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                // Reading the files (ours included) produces access events;
                // only changes matter.
                if let Ok(e) = res {
                    if !matches!(e.kind, notify::EventKind::Access(_)) {
                        let _ = tx.send(());
                    }
                }
            })?;
        watcher.watch(&dir, RecursiveMode::Recursive)?;
        let last = fingerprint_async(&dir).await;
        let d = dir.clone();
        let loaded = tokio::task::spawn_blocking(move || tandem_config::load_dir(&d)).await?;
        Ok(loaded.map(|set| {
            (
                DirSource {
                    dir,
                    events,
                    _watcher: watcher,
                    last,
                },
                set,
            )
        }))
    }
}

impl ConfigSource for DirSource {
    async fn next(&mut self) -> Option<Change> {
        loop {
            let event = tokio::time::timeout(RESCAN, self.events.recv()).await;
            if let Ok(None) = event {
                return None;
            }
            tokio::time::sleep(DEBOUNCE).await;
            while self.events.try_recv().is_ok() {}
            let now = fingerprint_async(&self.dir).await;
            if now == self.last {
                continue;
            }
            self.last = now;
            let d = self.dir.clone();
            match tokio::task::spawn_blocking(move || tandem_config::load_dir(&d)).await {
                Ok(Ok(set)) => return Some(Ok(set)),
                Ok(Err(diags)) => return Some(Err(diags.iter().map(|d| d.to_string()).collect())),
                Err(e) => tracing::error!(error = %e, "config reload failed"),
            }
        }
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
