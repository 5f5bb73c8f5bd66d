//! Join tokens: `tdm1.<claims>.<mac>`, where the claims (base64url JSON)
//! name one service identity and an expiry, and the MAC is HMAC-SHA256 of
//! the claims under a key only the control plane's data directory holds.
//!
//! A token lets a proxy obtain certificates for exactly the service it
//! names. Its MAC also bootstraps trust in the other direction: the control
//! plane proves it is the one that minted the token by returning the trust
//! bundle with an HMAC keyed by the token's MAC ([`bundle_proof`]), which
//! only a holder of the token key (or of the token) can compute.

use aws_lc_rs::hmac;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

const PREFIX: &str = "tdm1";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Token id, for revocation.
    pub id: String,
    /// Trust domain, namespace and service of the identity it grants.
    pub td: String,
    pub ns: String,
    pub svc: String,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Usable for any number of bootstraps until it expires; otherwise
    /// (the default) it certifies one key, once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reusable: bool,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is malformed")]
    Malformed,
    #[error("the token's signature is invalid (forged or altered)")]
    BadSignature,
    #[error("the token expired")]
    Expired,
    #[error("the token was revoked")]
    Revoked,
    #[error("the token is for {token_for}, not {asked}")]
    WrongIdentity { token_for: String, asked: String },
}

/// The secret that signs tokens.
pub struct TokenKey(hmac::Key);

impl TokenKey {
    pub fn from_bytes(secret: &[u8]) -> Self {
        TokenKey(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }

    pub fn mint(&self, claims: &Claims) -> String {
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default());
        let tag = hmac::sign(&self.0, body.as_bytes());
        format!("{PREFIX}.{body}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    /// Checks the signature and expiry (`now` in Unix seconds); revocation
    /// is the caller's list.
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, TokenError> {
        let (body, mac) = split(token)?;
        hmac::verify(&self.0, body.as_bytes(), &mac).map_err(|_| TokenError::BadSignature)?;
        let claims = decode_claims(body)?;
        if claims.exp <= now {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }

    /// The MAC this key gives the claims part of a token.
    pub fn mac_for(&self, claims_part: &str) -> Vec<u8> {
        hmac::sign(&self.0, claims_part.as_bytes())
            .as_ref()
            .to_vec()
    }
}

fn split(token: &str) -> Result<(&str, Vec<u8>), TokenError> {
    let mut parts = token.trim().split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(PREFIX), Some(body), Some(mac), None) => {
            let mac = URL_SAFE_NO_PAD
                .decode(mac)
                .map_err(|_| TokenError::Malformed)?;
            Ok((body, mac))
        }
        _ => Err(TokenError::Malformed),
    }
}

/// Decodes the claims part of a token (unchecked).
pub fn decode_claims(body: &str) -> Result<Claims, TokenError> {
    let json = URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| TokenError::Malformed)?;
    serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)
}

/// What a token claims, without checking it (the proxy cannot: it does not
/// hold the key). Returns the claims, the claims part and the MAC.
pub fn inspect(token: &str) -> Result<(Claims, String, Vec<u8>), TokenError> {
    let (body, mac) = split(token)?;
    Ok((decode_claims(body)?, body.to_string(), mac))
}

/// The proof that comes with a trust bundle: HMAC-SHA256, keyed by the
/// token's MAC, over the bundle's certificates.
pub fn bundle_proof(token_mac: &[u8], roots: &[CertificateDer<'_>]) -> Vec<u8> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, token_mac);
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(b"tandem-bundle-v1");
    for r in roots {
        ctx.update(&(r.len() as u32).to_be_bytes());
        ctx.update(r.as_ref());
    }
    ctx.sign().as_ref().to_vec()
}

/// Checks a bundle's proof against the token the proxy holds.
pub fn check_bundle_proof(token_mac: &[u8], roots: &[CertificateDer<'_>], proof: &[u8]) -> bool {
    let key = hmac::Key::new(hmac::HMAC_SHA256, token_mac);
    let mut msg = b"tandem-bundle-v1".to_vec();
    for r in roots {
        msg.extend_from_slice(&(r.len() as u32).to_be_bytes());
        msg.extend_from_slice(r.as_ref());
    }
    hmac::verify(&key, &msg, proof).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: u64) -> Claims {
        Claims {
            id: "abc".into(),
            td: "tandem.local".into(),
            ns: "default".into(),
            svc: "orders".into(),
            exp,
            reusable: false,
        }
    }

    #[test]
    fn mint_verify_and_misuse() {
        let key = TokenKey::from_bytes(b"k1");
        let t = key.mint(&claims(100));
        assert_eq!(key.verify(&t, 50), Ok(claims(100)));
        assert_eq!(key.verify(&t, 100), Err(TokenError::Expired));
        // Another key (a forged token) and an altered claim are refused.
        assert_eq!(
            TokenKey::from_bytes(b"k2").verify(&t, 50),
            Err(TokenError::BadSignature)
        );
        let (_, _, mac) = inspect(&t).expect("inspect");
        let forged_body = URL_SAFE_NO_PAD.encode(
            serde_json::to_vec(&Claims {
                svc: "payments".into(),
                ..claims(100)
            })
            .expect("json"),
        );
        let tampered = format!("tdm1.{forged_body}.{}", URL_SAFE_NO_PAD.encode(&mac));
        assert_eq!(key.verify(&tampered, 50), Err(TokenError::BadSignature));
        assert_eq!(key.verify("tdm1.x", 50), Err(TokenError::Malformed));
    }

    #[test]
    fn bundle_proof_binds_token_and_roots() {
        let key = TokenKey::from_bytes(b"k1");
        let t = key.mint(&claims(100));
        let (_, body, mac) = inspect(&t).expect("inspect");
        assert_eq!(key.mac_for(&body), mac);
        let roots = vec![CertificateDer::from(vec![1u8, 2, 3])];
        let proof = bundle_proof(&mac, &roots);
        assert!(check_bundle_proof(&mac, &roots, &proof));
        let other = vec![CertificateDer::from(vec![1u8, 2, 4])];
        assert!(!check_bundle_proof(&mac, &other, &proof));
        assert!(!check_bundle_proof(b"other", &roots, &proof));
    }
}
