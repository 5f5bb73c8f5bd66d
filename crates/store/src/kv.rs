//! Durable values with revisions. Keys are `/`-separated paths; values are
//! opaque bytes. Every value has a revision, and writers that can race
//! (two control planes, or the CLI next to a running control plane) write
//! with [`Kv::put_if`]: the write happens only if the key is still at the
//! revision the writer read.

use std::collections::HashMap;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tandem_runtime::sync::Mutex;

use crate::StoreFuture;

/// A value and the revision it was read at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned {
    pub value: Vec<u8>,
    pub revision: u64,
}

pub trait Kv: Send + Sync + 'static {
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Versioned>>;
    /// Writes `value` if the key is at revision `expected` (`None`: the key
    /// is absent). Returns the new revision, or `None` when the key moved
    /// on (nothing was written).
    fn put_if<'a>(
        &'a self,
        key: &'a str,
        expected: Option<u64>,
        value: &'a [u8],
    ) -> StoreFuture<'a, Option<u64>>;
    /// Writes `value` whatever the key holds (for values that never
    /// change once written, such as a root certificate named by its hash).
    fn put<'a>(&'a self, key: &'a str, value: &'a [u8]) -> StoreFuture<'a, u64>;
    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()>;
    /// The keys under `prefix` (a path: `rollouts` lists `rollouts/...`).
    fn list<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Vec<String>>;
}

/// FNV-1a of a value: a file's revision is its content (a write of the
/// same bytes changes nothing a reader could tell apart).
fn revision_of(value: &[u8]) -> u64 {
    value
        .iter()
        .fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
        })
        .max(1)
}

/// Values as files under a directory, one per key, readable by the owner
/// only (files 0600, directories 0700: the directory holds the CA's private
/// keys and the admin credential). Writes are
/// atomic (a temporary file, synced, then renamed); compare-and-swap holds
/// an advisory lock on `<dir>/.lock`, so the CLI and a running control
/// plane never interleave.
pub struct LocalDir {
    root: PathBuf,
}

impl LocalDir {
    pub fn open(root: &Path) -> io::Result<Self> {
        private_dirs(root)?;
        Ok(LocalDir {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Checks that nobody but the owner can read what lies under `prefix`:
    /// its directory is not open to group or others, and no file in it is
    /// readable or writable by them. Refuses with the offending path and the
    /// command that fixes it.
    pub fn check_private(&self, prefix: &str) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.path(prefix)?;
        let mut stack = vec![dir];
        while let Some(d) = stack.pop() {
            let meta = match std::fs::metadata(&d) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                let (what, fix) = if meta.is_dir() {
                    ("directory", "700")
                } else {
                    ("file", "600")
                };
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "{what} {} is open to other users (mode {mode:o}); it holds private keys: `chmod {fix} {}`",
                        d.display(),
                        d.display()
                    ),
                ));
            }
            if meta.is_dir() {
                for e in std::fs::read_dir(&d)?.flatten() {
                    stack.push(e.path());
                }
            }
        }
        Ok(())
    }

    fn path(&self, key: &str) -> io::Result<PathBuf> {
        let clean = key.trim_matches('/');
        if clean.is_empty()
            || clean
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == ".." || p.starts_with('.'))
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad key `{key}`"),
            ));
        }
        Ok(self.root.join(clean))
    }

    fn read(path: &Path) -> io::Result<Option<Versioned>> {
        match std::fs::read(path) {
            Ok(value) => Ok(Some(Versioned {
                revision: revision_of(&value),
                value,
            })),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn write(path: &Path, value: &[u8]) -> io::Result<u64> {
        if let Some(parent) = path.parent() {
            private_dirs(parent)?;
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}.tmp", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(value)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(revision_of(value))
    }

    /// Runs `f` holding the directory's lock (blocking; called off the
    /// async runtime).
    fn locked<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(self.root.join(".lock"))?;
        lock.lock()?;
        let result = f();
        let _ = lock.unlock();
        result
    }

    fn blocking<T: Send + 'static>(
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> StoreFuture<'static, T> {
        Box::pin(async move {
            tokio::task::spawn_blocking(f)
                .await
                .map_err(io::Error::other)?
        })
    }
}

impl Kv for LocalDir {
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Versioned>> {
        let path = self.path(key);
        Self::blocking(move || Self::read(&path?))
    }

    fn put_if<'a>(
        &'a self,
        key: &'a str,
        expected: Option<u64>,
        value: &'a [u8],
    ) -> StoreFuture<'a, Option<u64>> {
        let path = self.path(key);
        let value = value.to_vec();
        let me = LocalDir {
            root: self.root.clone(),
        };
        Self::blocking(move || {
            let path = path?;
            me.locked(|| {
                let current = Self::read(&path)?.map(|v| v.revision);
                if current != expected {
                    return Ok(None);
                }
                Self::write(&path, &value).map(Some)
            })
        })
    }

    fn put<'a>(&'a self, key: &'a str, value: &'a [u8]) -> StoreFuture<'a, u64> {
        let path = self.path(key);
        let value = value.to_vec();
        Self::blocking(move || Self::write(&path?, &value))
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()> {
        let path = self.path(key);
        Self::blocking(move || match std::fs::remove_file(path?) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Vec<String>> {
        let dir = self.path(prefix);
        let prefix = prefix.trim_matches('/').to_string();
        Self::blocking(move || {
            let dir = dir?;
            let mut keys = Vec::new();
            let mut stack = vec![(dir, prefix)];
            while let Some((d, p)) = stack.pop() {
                let entries = match std::fs::read_dir(&d) {
                    Ok(e) => e,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                };
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if name.starts_with('.') || name.ends_with(".tmp") {
                        continue;
                    }
                    let key = format!("{p}/{name}");
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push((e.path(), key));
                    } else {
                        keys.push(key);
                    }
                }
            }
            keys.sort();
            Ok(keys)
        })
    }
}

/// Creates `dir` and its missing parents with mode 0700.
fn private_dirs(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Values in the process, for tests and for state that a restart may
/// lose.
#[derive(Default)]
pub struct Memory {
    values: Mutex<(u64, HashMap<String, Versioned>)>,
}

impl Memory {
    fn write(&self, key: &str, expected: Option<Option<u64>>, value: &[u8]) -> Option<u64> {
        let mut g = self.values.lock();
        let (rev, map) = &mut *g;
        if let Some(expected) = expected {
            if map.get(key).map(|v| v.revision) != expected {
                return None;
            }
        }
        *rev += 1;
        map.insert(
            key.to_string(),
            Versioned {
                value: value.to_vec(),
                revision: *rev,
            },
        );
        Some(*rev)
    }
}

impl Kv for Memory {
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Versioned>> {
        let v = self.values.lock().1.get(key).cloned();
        Box::pin(async move { Ok(v) })
    }

    fn put_if<'a>(
        &'a self,
        key: &'a str,
        expected: Option<u64>,
        value: &'a [u8],
    ) -> StoreFuture<'a, Option<u64>> {
        let r = self.write(key, Some(expected), value);
        Box::pin(async move { Ok(r) })
    }

    fn put<'a>(&'a self, key: &'a str, value: &'a [u8]) -> StoreFuture<'a, u64> {
        let r = self.write(key, None, value).unwrap_or(0);
        Box::pin(async move { Ok(r) })
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()> {
        self.values.lock().1.remove(key);
        Box::pin(async move { Ok(()) })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Vec<String>> {
        let p = format!("{}/", prefix.trim_matches('/'));
        let mut keys: Vec<String> = self
            .values
            .lock()
            .1
            .keys()
            .filter(|k| k.starts_with(&p))
            .cloned()
            .collect();
        keys.sort();
        Box::pin(async move { Ok(keys) })
    }
}

/// A JSON value at one key, changed by read-modify-write with
/// compare-and-swap: an update that raced another writer is made again on
/// what that writer left.
pub struct Record<T> {
    kv: Arc<dyn Kv>,
    key: String,
    _t: std::marker::PhantomData<fn() -> T>,
}

impl<T: Serialize + DeserializeOwned> Record<T> {
    pub fn new(kv: Arc<dyn Kv>, key: impl Into<String>) -> Self {
        Record {
            kv,
            key: key.into(),
            _t: std::marker::PhantomData,
        }
    }

    /// The value and its revision, if the key is set.
    pub async fn get(&self) -> io::Result<Option<(T, u64)>> {
        let Some(v) = self.kv.get(&self.key).await? else {
            return Ok(None);
        };
        let t = serde_json::from_slice(&v.value).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", self.key))
        })?;
        Ok(Some((t, v.revision)))
    }

    /// Applies `change` to the current value (`None` if unset) and writes
    /// the result, again and again until no other writer came between
    /// (at most 100 times). `change` returns the new value and what to
    /// hand back, or an error to write nothing.
    pub async fn update<R, E>(
        &self,
        mut change: impl FnMut(Option<T>) -> Result<(T, R), E>,
    ) -> io::Result<Result<R, E>> {
        for _ in 0..100 {
            let (current, revision) = match self.get().await? {
                Some((t, r)) => (Some(t), Some(r)),
                None => (None, None),
            };
            let (next, out) = match change(current) {
                Ok(x) => x,
                Err(e) => return Ok(Err(e)),
            };
            let bytes = serde_json::to_vec_pretty(&next).map_err(io::Error::other)?;
            if self.kv.put_if(&self.key, revision, &bytes).await?.is_some() {
                return Ok(Ok(out));
            }
        }
        Err(io::Error::other(format!(
            "{}: too many writers at once",
            self.key
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tandem-kv-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    async fn compare_and_swap(kv: &dyn Kv) {
        assert_eq!(kv.get("a/b").await.expect("get"), None);
        let r1 = kv
            .put_if("a/b", None, b"1")
            .await
            .expect("cas")
            .expect("written");
        assert_eq!(kv.put_if("a/b", None, b"2").await.expect("cas"), None);
        let r2 = kv
            .put_if("a/b", Some(r1), b"3")
            .await
            .expect("cas")
            .expect("written");
        assert_ne!(r1, r2);
        // The old revision no longer writes.
        assert_eq!(kv.put_if("a/b", Some(r1), b"4").await.expect("cas"), None);
        let v = kv.get("a/b").await.expect("get").expect("set");
        assert_eq!((v.value.as_slice(), v.revision), (&b"3"[..], r2));
        kv.put("a/c/d", b"x").await.expect("put");
        assert_eq!(kv.list("a").await.expect("list"), ["a/b", "a/c/d"]);
        kv.delete("a/b").await.expect("delete");
        assert_eq!(kv.get("a/b").await.expect("get"), None);
    }

    #[tokio::test]
    async fn local_dir_compare_and_swap() {
        let dir = scratch("cas");
        let kv = LocalDir::open(&dir).expect("open");
        compare_and_swap(&kv).await;
        assert!(kv.get("../x").await.is_err());
        assert!(kv.get(".lock").await.is_err());
        let mode = std::fs::metadata(dir.join("a/c/d"))
            .expect("file")
            .permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o600);
        let dir_mode = |p: &str| {
            std::fs::metadata(dir.join(p))
                .expect("dir")
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!((dir_mode("a"), dir_mode("a/c")), (0o700, 0o700));
        kv.check_private("a").expect("private");
        // A key file someone made readable, then a directory opened up.
        let set = |p: &str, m: u32| {
            std::fs::set_permissions(dir.join(p), std::fs::Permissions::from_mode(m))
                .expect("chmod")
        };
        set("a/c/d", 0o644);
        let e = kv.check_private("a").expect_err("readable key").to_string();
        assert!(e.contains("a/c/d") && e.contains("chmod 600"), "{e}");
        set("a/c/d", 0o600);
        set("a/c", 0o755);
        let e = kv.check_private("a").expect_err("open dir").to_string();
        assert!(e.contains("chmod 700"), "{e}");
        // Nothing there yet is nothing to leak.
        kv.check_private("none").expect("absent");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn memory_compare_and_swap() {
        compare_and_swap(&Memory::default()).await;
    }

    #[tokio::test]
    async fn racing_updates_are_all_kept() {
        let dir = scratch("race");
        let kv: Arc<dyn Kv> = Arc::new(LocalDir::open(&dir).expect("open"));
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let rec: Record<Vec<u32>> = Record::new(kv.clone(), "list");
                tokio::spawn(async move {
                    rec.update(|cur| {
                        let mut v = cur.unwrap_or_default();
                        v.push(i);
                        Ok::<_, ()>((v, ()))
                    })
                    .await
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("task").expect("io").expect("written");
        }
        let rec: Record<Vec<u32>> = Record::new(kv, "list");
        let (mut all, _) = rec.get().await.expect("io").expect("set");
        all.sort();
        assert_eq!(all, (0..8).collect::<Vec<_>>());
        let _ = std::fs::remove_dir_all(dir);
    }
}
