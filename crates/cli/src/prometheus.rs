//! A Prometheus set-up for `tandem up`: a config file whose scrape job finds
//! the sidecars through a file of targets (`file_sd_configs`), and that
//! file, rewritten whenever the proxies the control plane lists change, so
//! Prometheus follows proxies as they come and go.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// How often Prometheus scrapes the sidecars (its default, a minute, is too
/// slow to watch a demo).
const SCRAPE_INTERVAL: &str = "5s";

pub struct Scrape {
    dir: PathBuf,
    /// The targets file as last written.
    written: String,
}

impl Scrape {
    /// Writes `<state>/prometheus/prometheus.yml` and an empty targets file.
    pub fn create(state: &Path) -> anyhow::Result<Self> {
        let dir = state.join("prometheus");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let targets = dir.join("targets.json");
        let config = format!(
            "# Written by `tandem up`: prometheus --config.file={config}\n\
             # The targets file lists every connected sidecar's admin endpoint\n\
             # and is rewritten as proxies come and go.\n\
             global:\n  scrape_interval: {SCRAPE_INTERVAL}\n  evaluation_interval: {SCRAPE_INTERVAL}\n\
             scrape_configs:\n  - job_name: tandem-proxies\n    file_sd_configs:\n      - files: [{targets:?}]\n        refresh_interval: {SCRAPE_INTERVAL}\n",
            config = dir.join("prometheus.yml").display(),
            targets = targets.display().to_string(),
        );
        write_atomically(&dir.join("prometheus.yml"), &config)?;
        let mut s = Scrape {
            dir,
            written: String::new(),
        };
        s.write_targets("[]\n")?;
        Ok(s)
    }

    pub fn config_file(&self) -> PathBuf {
        self.dir.join("prometheus.yml")
    }

    /// Rewrites the targets file from `GET /api/v1/proxies` if it changed.
    pub fn update(&mut self, proxies: &serde_json::Value) -> anyhow::Result<()> {
        let text = targets(proxies);
        if text != self.written {
            self.write_targets(&text)?;
        }
        Ok(())
    }

    fn write_targets(&mut self, text: &str) -> anyhow::Result<()> {
        write_atomically(&self.dir.join("targets.json"), text)?;
        self.written = text.to_string();
        Ok(())
    }
}

/// Prometheus reads a whole file or none: the new one is renamed over.
fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// The file-based service discovery document: one target group per
/// connected proxy, labelled with its namespace, service and instance
/// (`tandem_instance`, since Prometheus' own `instance` is the address).
pub fn targets(proxies: &serde_json::Value) -> String {
    let mut groups: Vec<serde_json::Value> = proxies
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|p| p["connected"] == true)
        .filter_map(|p| {
            let admin = p["admin"].as_str().filter(|a| !a.is_empty())?;
            Some(serde_json::json!({
                "targets": [admin],
                "labels": {
                    "namespace": p["namespace"],
                    "service": p["service"],
                    "tandem_instance": p["instance"],
                },
            }))
        })
        .collect();
    groups.sort_by_key(|g| g["targets"][0].as_str().unwrap_or_default().to_string());
    let mut text = serde_json::to_string_pretty(&groups).unwrap_or_default();
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_list_connected_proxies_with_labels() {
        let proxies = serde_json::json!([
            {"namespace": "default", "service": "web", "instance": "web-1",
             "admin": "127.0.0.1:4191", "connected": true},
            {"namespace": "default", "service": "orders", "instance": "orders-1",
             "admin": "127.0.0.1:4190", "connected": true},
            {"namespace": "default", "service": "gone", "instance": "gone-1",
             "admin": "127.0.0.1:4192", "connected": false},
        ]);
        let v: serde_json::Value = serde_json::from_str(&targets(&proxies)).expect("JSON");
        assert_eq!(
            v,
            serde_json::json!([
                {"targets": ["127.0.0.1:4190"], "labels": {"namespace": "default",
                 "service": "orders", "tandem_instance": "orders-1"}},
                {"targets": ["127.0.0.1:4191"], "labels": {"namespace": "default",
                 "service": "web", "tandem_instance": "web-1"}},
            ])
        );
        assert_eq!(targets(&serde_json::json!([])), "[]\n");
    }

    #[test]
    fn the_config_points_at_the_targets_file() {
        let dir = std::env::temp_dir().join(format!("tandem-prom-{}", std::process::id()));
        let mut s = Scrape::create(&dir).expect("create");
        let config = std::fs::read_to_string(s.config_file()).expect("config");
        let targets = dir.join("prometheus/targets.json");
        assert!(
            config.contains(&format!("files: [{:?}]", targets.display().to_string())),
            "{config}"
        );
        s.update(
            &serde_json::json!([{"namespace": "default", "service": "web",
            "instance": "web-1", "admin": "127.0.0.1:4191", "connected": true}]),
        )
        .expect("update");
        assert!(std::fs::read_to_string(&targets)
            .expect("targets")
            .contains("127.0.0.1:4191"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
