//! The [`Kv`] seam on etcd: a key's revision is its `mod_revision`, a
//! compare-and-swap one transaction. Keys live under `<prefix>/kv/`.
//!
//! A write whose answer was lost (the member died mid-call) is tried again
//! on another member; a compare-and-swap that had in fact been applied
//! then reports the key as moved on, and the caller ([`crate::Record`])
//! reads it again and makes its change on what it finds.

use std::io;

use super::client::When;
use super::Etcd;
use crate::{Kv, StoreFuture, Versioned};

const UNDER: &str = "kv";

pub struct EtcdKv {
    etcd: Etcd,
}

impl EtcdKv {
    pub fn new(etcd: Etcd) -> Self {
        EtcdKv { etcd }
    }

    fn key(&self, key: &str) -> io::Result<Vec<u8>> {
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
        Ok(self.etcd.key(&format!("{UNDER}/{clean}")))
    }
}

impl Kv for EtcdKv {
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Versioned>> {
        Box::pin(async move {
            let (_, kvs) = self.etcd.range(self.key(key)?, false).await?;
            Ok(kvs.into_iter().next().map(|kv| Versioned {
                value: kv.value,
                revision: kv.mod_revision as u64,
            }))
        })
    }

    fn put_if<'a>(
        &'a self,
        key: &'a str,
        expected: Option<u64>,
        value: &'a [u8],
    ) -> StoreFuture<'a, Option<u64>> {
        Box::pin(async move {
            let when = match expected {
                None => When::Absent,
                Some(r) => When::ModRevision(r as i64),
            };
            let written = self
                .etcd
                .put_when(self.key(key)?, when, value.to_vec(), 0)
                .await?;
            Ok(written.map(|r| r as u64))
        })
    }

    fn put<'a>(&'a self, key: &'a str, value: &'a [u8]) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            let r = self.etcd.put(self.key(key)?, value.to_vec(), 0).await?;
            Ok(r as u64)
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.etcd.delete(self.key(key)?, false).await?;
            Ok(())
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Vec<String>> {
        Box::pin(async move {
            let mut under = self.key(prefix)?;
            under.push(b'/');
            let (_, kvs) = self.etcd.range(under, true).await?;
            let mut keys: Vec<String> = kvs
                .iter()
                .filter_map(|kv| self.etcd.strip(&kv.key, UNDER).map(str::to_string))
                .collect();
            keys.sort();
            Ok(keys)
        })
    }
}
