//! Durable control-plane state behind a small key-value interface. The
//! default keeps files in the data directory; an etcd implementation can
//! slot in behind the same trait (keys are `/`-separated paths, values
//! opaque bytes, and `compare_and_put` gives the one atomic step a
//! replicated store needs).

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send + 'a>>;

pub trait Storage: Send + Sync + 'static {
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Vec<u8>>>;
    fn put<'a>(&'a self, key: &'a str, value: &'a [u8]) -> StoreFuture<'a, ()>;
    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()>;
    /// Writes `value` only if the key currently holds `expected` (`None`:
    /// absent). Returns whether it wrote.
    fn compare_and_put<'a>(
        &'a self,
        key: &'a str,
        expected: Option<&'a [u8]>,
        value: &'a [u8],
    ) -> StoreFuture<'a, bool>;
}

/// Files under a directory, one per key; writes are atomic (write to a
/// temporary file, then rename).
pub struct LocalDir {
    root: PathBuf,
    lock: tokio::sync::Mutex<()>,
}

impl LocalDir {
    pub fn open(root: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(root)?;
        Ok(Self {
            root: root.to_path_buf(),
            lock: tokio::sync::Mutex::new(()),
        })
    }

    fn path(&self, key: &str) -> io::Result<PathBuf> {
        let clean = key.trim_matches('/');
        if clean.is_empty()
            || clean
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == "..")
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad key `{key}`"),
            ));
        }
        Ok(self.root.join(clean))
    }

    async fn write(&self, path: &Path, value: &[u8]) -> io::Result<()> {
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        let tmp = path.with_extension("tmp");
        tokio::fs::write(&tmp, value).await?;
        tokio::fs::rename(&tmp, path).await
    }

    async fn read(path: &Path) -> io::Result<Option<Vec<u8>>> {
        match tokio::fs::read(path).await {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl Storage for LocalDir {
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Vec<u8>>> {
        Box::pin(async move { Self::read(&self.path(key)?).await })
    }

    fn put<'a>(&'a self, key: &'a str, value: &'a [u8]) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let _g = self.lock.lock().await;
            self.write(&self.path(key)?, value).await
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let _g = self.lock.lock().await;
            match tokio::fs::remove_file(self.path(key)?).await {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        })
    }

    fn compare_and_put<'a>(
        &'a self,
        key: &'a str,
        expected: Option<&'a [u8]>,
        value: &'a [u8],
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let _g = self.lock.lock().await;
            let path = self.path(key)?;
            let current = Self::read(&path).await?;
            if current.as_deref() != expected {
                return Ok(false);
            }
            self.write(&path, value).await?;
            Ok(true)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_dir_round_trip_and_cas() {
        let dir = std::env::temp_dir().join(format!(
            "tandem-store-{}-{}",
            std::process::id(),
            fastrand_seed()
        ));
        let s = LocalDir::open(&dir).expect("open");
        assert_eq!(s.get("a/b").await.expect("get"), None);
        assert!(s.compare_and_put("a/b", None, b"1").await.expect("cas"));
        assert!(!s.compare_and_put("a/b", None, b"2").await.expect("cas"));
        assert!(s
            .compare_and_put("a/b", Some(b"1"), b"3")
            .await
            .expect("cas"));
        assert_eq!(s.get("a/b").await.expect("get").as_deref(), Some(&b"3"[..]));
        s.delete("a/b").await.expect("delete");
        assert_eq!(s.get("a/b").await.expect("get"), None);
        assert!(s.get("../x").await.is_err());
        let _ = std::fs::remove_dir_all(dir);
    }

    fn fastrand_seed() -> u128 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    }
}
