//! Private keys sealed at rest: a [`Kv`] layer that encrypts the values of
//! the CA's private keys (`ca/*.key`: the roots' signing keys and the
//! join-token key) with AES-256-GCM under a key the control plane holds in
//! a local file (`--seal-key`), so the store (etcd, its backups) holds only
//! ciphertext. Everything else passes through untouched, revisions and
//! compare-and-swap included.
//!
//! A sealed value is `tandem-sealed-v1:` then the 12-byte nonce and the
//! ciphertext with its tag; the store key is the associated data, so a
//! sealed value moved to another key does not open.

use std::io;
use std::path::Path;
use std::sync::Arc;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};

use crate::{Kv, StoreFuture, Versioned};

const MAGIC: &[u8] = b"tandem-sealed-v1:";

pub struct Sealed {
    inner: Arc<dyn Kv>,
    /// `None`: nothing is sealed, and a sealed value is refused with the
    /// reason instead of being taken for a key.
    key: Option<LessSafeKey>,
}

/// Whether the value at `key` is a private key that must be sealed.
pub fn is_private(key: &str) -> bool {
    let k = key.trim_matches('/');
    k.starts_with("ca/") && k.ends_with(".key")
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl Sealed {
    /// Seals `inner`'s private keys with the key in `file`: 32 bytes as 64
    /// hex digits (`openssl rand -hex 32`).
    pub fn open(inner: Arc<dyn Kv>, file: &Path) -> io::Result<Sealed> {
        Ok(Sealed {
            inner,
            key: Some(read_key(file)?),
        })
    }

    /// `inner` with nothing sealed (sealed values are refused clearly).
    pub fn clear(inner: Arc<dyn Kv>) -> Sealed {
        Sealed { inner, key: None }
    }

    fn seal(&self, key: &str, value: &[u8]) -> io::Result<Vec<u8>> {
        let Some(k) = &self.key else {
            return Ok(value.to_vec());
        };
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| io::Error::other("no randomness"))?;
        let mut data = value.to_vec();
        k.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(key.as_bytes()),
            &mut data,
        )
        .map_err(|_| io::Error::other("sealing failed"))?;
        let mut out = Vec::with_capacity(MAGIC.len() + NONCE_LEN + data.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&data);
        Ok(out)
    }

    fn unseal(&self, key: &str, value: &[u8]) -> io::Result<Vec<u8>> {
        let Some(k) = &self.key else {
            if value.starts_with(MAGIC) {
                return Err(invalid(format!(
                    "{key} is sealed: start the control plane (or the CLI) with its --seal-key"
                )));
            }
            return Ok(value.to_vec());
        };
        let Some(rest) = value.strip_prefix(MAGIC) else {
            return Err(invalid(format!(
                "{key} is stored in the clear, but a seal key is set: it was written without --seal-key"
            )));
        };
        if rest.len() < NONCE_LEN {
            return Err(invalid(format!("{key}: sealed value too short")));
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| invalid(format!("{key}: bad nonce")))?;
        let mut data = sealed.to_vec();
        let plain = k
            .open_in_place(nonce, Aad::from(key.as_bytes()), &mut data)
            .map_err(|_| {
                invalid(format!(
                    "{key} does not open with this seal key (another key sealed it, or it was altered)"
                ))
            })?;
        Ok(plain.to_vec())
    }
}

/// The seal key in `file`: 32 bytes as 64 hex digits.
fn read_key(file: &Path) -> io::Result<LessSafeKey> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| io::Error::new(e.kind(), format!("seal key {}: {e}", file.display())))?;
    let text = text.trim();
    let bytes: Option<Vec<u8>> = (text.len() == 64)
        .then(|| {
            (0..32)
                .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok())
                .collect()
        })
        .flatten();
    let bytes = bytes.ok_or_else(|| {
        invalid(format!(
            "seal key {}: 64 hex digits expected (`openssl rand -hex 32`)",
            file.display()
        ))
    })?;
    let key = UnboundKey::new(&AES_256_GCM, &bytes)
        .map_err(|_| invalid("seal key: not an AES-256 key".into()))?;
    Ok(LessSafeKey::new(key))
}

impl Kv for Sealed {
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Versioned>> {
        Box::pin(async move {
            let v = self.inner.get(key).await?;
            match v {
                Some(v) if is_private(key) => Ok(Some(Versioned {
                    value: self.unseal(key, &v.value)?,
                    revision: v.revision,
                })),
                other => Ok(other),
            }
        })
    }

    fn put_if<'a>(
        &'a self,
        key: &'a str,
        expected: Option<u64>,
        value: &'a [u8],
    ) -> StoreFuture<'a, Option<u64>> {
        Box::pin(async move {
            if is_private(key) {
                let sealed = self.seal(key, value)?;
                self.inner.put_if(key, expected, &sealed).await
            } else {
                self.inner.put_if(key, expected, value).await
            }
        })
    }

    fn put<'a>(&'a self, key: &'a str, value: &'a [u8]) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            if is_private(key) {
                let sealed = self.seal(key, value)?;
                self.inner.put(key, &sealed).await
            } else {
                self.inner.put(key, value).await
            }
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()> {
        self.inner.delete(key)
    }

    fn list<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Vec<String>> {
        self.inner.list(prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_file(tag: &str, hex: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("tandem-seal-{tag}-{}", std::process::id()));
        std::fs::write(&p, hex).expect("write");
        p
    }

    #[tokio::test]
    async fn private_keys_are_sealed_and_nothing_else() {
        let raw: Arc<dyn Kv> = Arc::new(crate::Memory::default());
        let file = key_file("a", &"ab".repeat(32));
        let kv = Sealed::open(raw.clone(), &file).expect("key");
        let secret = b"-----BEGIN PRIVATE KEY-----\nxyz\n";
        let r = kv
            .put_if("ca/r1.key", None, secret)
            .await
            .expect("io")
            .expect("written");
        kv.put("ca/r1.crt", b"cert").await.expect("io");
        // The store holds ciphertext for the key, the certificate as is.
        let stored = raw.get("ca/r1.key").await.expect("io").expect("set");
        assert!(stored.value.starts_with(MAGIC));
        assert!(!stored.value.windows(11).any(|w| w == b"PRIVATE KEY"));
        assert_eq!(
            raw.get("ca/r1.crt").await.expect("io").expect("set").value,
            b"cert"
        );
        // Read back whole, with the store's revision (CAS goes on working).
        let v = kv.get("ca/r1.key").await.expect("io").expect("set");
        assert_eq!((v.value.as_slice(), v.revision), (&secret[..], r));
        assert!(kv
            .put_if("ca/r1.key", Some(r), b"new")
            .await
            .expect("io")
            .is_some());
        // Moved to another key, or opened with another seal key: refused.
        let moved = raw.get("ca/r1.key").await.expect("io").expect("set").value;
        raw.put("ca/r2.key", &moved).await.expect("io");
        assert!(kv.get("ca/r2.key").await.is_err());
        let other = Sealed::open(raw.clone(), &key_file("b", &"cd".repeat(32))).expect("key");
        let e = other
            .get("ca/r1.key")
            .await
            .expect_err("wrong key")
            .to_string();
        assert!(e.contains("does not open"), "{e}");
        // A key written in the clear is refused rather than used.
        raw.put("ca/token.key", b"plain").await.expect("io");
        let e = kv.get("ca/token.key").await.expect_err("clear").to_string();
        assert!(e.contains("in the clear"), "{e}");
        // Without the seal key, a sealed value is refused with the reason.
        let e = Sealed::clear(raw.clone())
            .get("ca/r1.key")
            .await
            .expect_err("sealed")
            .to_string();
        assert!(e.contains("--seal-key"), "{e}");
        // A malformed seal key file.
        assert!(Sealed::open(raw, &key_file("c", "short")).is_err());
    }
}
