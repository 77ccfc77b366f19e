//! Admission tokens: ES256 JWTs with a `kid`, signed by a key ring that rotates.
//!
//! Keys are P-256 pairs generated with `ring`, persisted (PKCS#8) in the store's meta table and
//! published as JWKS. After a rotation the previous keys stay in the JWKS (up to
//! [`KEYS_KEPT`]) so tokens signed before it keep verifying until they expire.
//! Verification accepts ES256 only: `alg: none`, HS*/RS* and unknown `kid`s are refused before
//! any signature work. Expiry is checked against the injected [`Clock`].

use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use parking_lot::{Mutex, RwLock};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde::{Deserialize, Serialize};

use crate::clock::Clock;
use crate::fast_map::FastMap;
use crate::store::{Store, StoreError, Table};

const META_KEY: &str = "signing_keys";
/// Current key plus this many minus one predecessors stay published.
pub const KEYS_KEPT: usize = 3;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    pub room: String,
    pub ticket: u64,
    pub iat: i64,
    pub exp: i64,
}

/// Why a token was refused; the wire form is the snake_case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rejection {
    Malformed,
    UnsupportedAlgorithm,
    UnknownKey,
    BadSignature,
    WrongIssuer,
    Expired,
    WrongRoom,
}

impl Rejection {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed",
            Rejection::UnsupportedAlgorithm => "unsupported_algorithm",
            Rejection::UnknownKey => "unknown_key",
            Rejection::BadSignature => "bad_signature",
            Rejection::WrongIssuer => "wrong_issuer",
            Rejection::Expired => "expired",
            Rejection::WrongRoom => "wrong_room",
        }
    }
}

#[derive(Clone, Serialize, Deserialize)]
struct StoredKey {
    kid: String,
    pkcs8: String,
    created_at: i64,
}

struct SigningKey {
    kid: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    x: String,
    y: String,
    stored: StoredKey,
}

impl SigningKey {
    fn from_stored(stored: StoredKey) -> Result<Self, StoreError> {
        let der = B64.decode(&stored.pkcs8).map_err(|e| StoreError::Corrupt(format!("signing key: {e}")))?;
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der, &SystemRandom::new())
            .map_err(|e| StoreError::Corrupt(format!("signing key: {e}")))?;
        // Uncompressed SEC1 point: 0x04 || x (32 bytes) || y (32 bytes).
        let point = pair.public_key().as_ref();
        if point.len() != 65 {
            return Err(StoreError::Corrupt("signing key: unexpected public key length".into()));
        }
        let x = B64.encode(&point[1..33]);
        let y = B64.encode(&point[33..65]);
        let decoding = DecodingKey::from_ec_components(&x, &y)
            .map_err(|e| StoreError::Corrupt(format!("signing key: {e}")))?;
        Ok(SigningKey { kid: stored.kid.clone(), encoding: EncodingKey::from_ec_der(&der), decoding, x, y, stored })
    }

    fn generate(now_secs: i64) -> Result<Self, StoreError> {
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
            .map_err(|e| StoreError::Backend(format!("generating a signing key: {e}")))?;
        let kid = crate::secrets::random_token(9);
        Self::from_stored(StoredKey { kid, pkcs8: B64.encode(doc.as_ref()), created_at: now_secs })
    }
}

/// Tokens remembered as verified (forward auth sees the same token on every request a visitor
/// makes) and as issued (a waiting page polls its status); beyond this the cache starts over.
/// ~16 K tokens of ~500 bytes: about 8 MiB at most for each.
const TOKEN_CACHE_ENTRIES: usize = 16 * 1024;

pub struct KeyRing {
    /// Newest last.
    keys: RwLock<Vec<Arc<SigningKey>>>,
    /// Token → its claims, for tokens whose signature has been checked. A hit still checks
    /// expiry and room; cleared whenever the key set changes.
    verified: RwLock<FastMap<String, Arc<Claims>>>,
    /// `room|origin|visitor|ticket` → (token, iat): an admitted visitor asking again within
    /// half the token lifetime gets the same token instead of a fresh ECDSA signature.
    issued: Mutex<FastMap<String, (String, i64)>>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    issuer: String,
    ttl_seconds: i64,
}

impl KeyRing {
    pub async fn load(store: Arc<dyn Store>, clock: Arc<dyn Clock>, issuer: String, ttl_seconds: u64) -> Result<Self, StoreError> {
        let ring = KeyRing {
            keys: RwLock::new(Vec::new()),
            verified: RwLock::new(FastMap::default()),
            issued: Mutex::new(FastMap::default()),
            store,
            clock,
            issuer,
            ttl_seconds: ttl_seconds as i64,
        };
        ring.reload().await?;
        if ring.keys.read().is_empty() {
            // Nodes of a cluster starting together: the first key stored is everyone's.
            let key = SigningKey::generate(ring.clock.now_secs())?;
            let bytes = serde_json::to_vec(&[&key.stored]).map_err(|e| StoreError::Backend(e.to_string()))?;
            if ring.store.insert_new(Table::Meta, META_KEY, bytes).await? {
                *ring.keys.write() = vec![Arc::new(key)];
            } else {
                ring.reload().await?;
            }
        }
        Ok(ring)
    }

    /// Re-reads the keys from the store (another node may have rotated).
    pub async fn reload(&self) -> Result<(), StoreError> {
        let stored: Vec<StoredKey> = match self.store.get(Table::Meta, META_KEY).await? {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt(format!("signing keys: {e}")))?,
            None => Vec::new(),
        };
        if stored.is_empty() && !self.keys.read().is_empty() {
            // A store that lost its keys (a Redis restarted without persistence) gets this node's
            // back, or another node's if it was first: tokens already issued stay verifiable.
            let mine: Vec<StoredKey> = self.keys.read().iter().map(|k| k.stored.clone()).collect();
            let bytes = serde_json::to_vec(&mine).map_err(|e| StoreError::Backend(e.to_string()))?;
            if self.store.insert_new(Table::Meta, META_KEY, bytes).await? {
                return Ok(());
            }
            return Box::pin(self.reload()).await;
        }
        let keys = stored.into_iter().map(|k| SigningKey::from_stored(k).map(Arc::new)).collect::<Result<Vec<_>, _>>()?;
        *self.keys.write() = keys;
        self.forget_cached();
        Ok(())
    }

    /// Generates a new current key, keeps the newest [`KEYS_KEPT`], persists; returns the new kid.
    pub async fn rotate(&self) -> Result<String, StoreError> {
        let key = Arc::new(SigningKey::generate(self.clock.now_secs())?);
        let kid = key.kid.clone();
        let mut next: Vec<Arc<SigningKey>> = self.keys.read().clone();
        next.push(key);
        let excess = next.len().saturating_sub(KEYS_KEPT);
        next.drain(..excess);
        let stored: Vec<&StoredKey> = next.iter().map(|k| &k.stored).collect();
        let bytes = serde_json::to_vec(&stored).map_err(|e| StoreError::Backend(e.to_string()))?;
        self.store.put(Table::Meta, META_KEY, bytes).await?;
        *self.keys.write() = next;
        self.forget_cached();
        Ok(kid)
    }

    fn forget_cached(&self) {
        self.verified.write().clear();
        self.issued.lock().clear();
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn current_kid(&self) -> String {
        self.keys.read().last().map(|k| k.kid.clone()).unwrap_or_default()
    }

    /// Signs a token for a visitor admitted to `room` (whose origin is the audience).
    pub fn issue(&self, room: &str, origin: &str, visitor: &str, ticket: u64) -> String {
        let now = self.clock.now_secs();
        let cache_key = format!("{room}|{origin}|{visitor}|{ticket}");
        if let Some((token, iat)) = self.issued.lock().get(&cache_key) {
            if now - iat < self.ttl_seconds / 2 {
                return token.clone();
            }
        }
        let token = self.sign(room, origin, visitor, ticket, now);
        let mut issued = self.issued.lock();
        if issued.len() >= TOKEN_CACHE_ENTRIES {
            issued.clear();
        }
        issued.insert(cache_key, (token.clone(), now));
        token
    }

    fn sign(&self, room: &str, origin: &str, visitor: &str, ticket: u64, now: i64) -> String {
        let key = self.keys.read().last().cloned().expect("the key ring always holds a key after load");
        let claims = Claims {
            iss: self.issuer.clone(),
            aud: origin.to_string(),
            sub: visitor.to_string(),
            room: room.to_string(),
            ticket,
            iat: now,
            exp: now + self.ttl_seconds,
        };
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, &claims, &key.encoding).expect("ES256 signing with a valid key cannot fail")
    }

    /// Checks algorithm, key, signature, issuer, expiry and (when given) room.
    /// Claims are shared with the cache: forward auth asks on every request of a visitor.
    pub fn verify(&self, token: &str, room: Option<&str>) -> Result<Arc<Claims>, Rejection> {
        if token.len() > 4096 {
            return Err(Rejection::Malformed);
        }
        let cached = self.verified.read().get(token).cloned();
        let claims = match cached {
            Some(claims) => claims,
            None => {
                let claims = Arc::new(self.verify_signature(token)?);
                let mut verified = self.verified.write();
                if verified.len() >= TOKEN_CACHE_ENTRIES {
                    verified.clear();
                }
                verified.insert(token.to_string(), claims.clone());
                claims
            }
        };
        if claims.exp <= self.clock.now_secs() {
            return Err(Rejection::Expired);
        }
        if room.is_some_and(|r| r != claims.room) {
            return Err(Rejection::WrongRoom);
        }
        Ok(claims)
    }

    /// Algorithm, key, signature and issuer: everything about a token that never changes.
    fn verify_signature(&self, token: &str) -> Result<Claims, Rejection> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| {
            // An algorithm jsonwebtoken doesn't know (e.g. "none") fails header parsing.
            if header_alg(token).is_some_and(|alg| alg != "ES256") {
                Rejection::UnsupportedAlgorithm
            } else {
                Rejection::Malformed
            }
        })?;
        if header.alg != Algorithm::ES256 {
            return Err(Rejection::UnsupportedAlgorithm);
        }
        let kid = header.kid.ok_or(Rejection::UnknownKey)?;
        let key = self.keys.read().iter().find(|k| k.kid == kid).cloned().ok_or(Rejection::UnknownKey)?;
        let mut validation = Validation::new(Algorithm::ES256);
        validation.validate_exp = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let data = jsonwebtoken::decode::<Claims>(token, &key.decoding, &validation).map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::InvalidSignature => Rejection::BadSignature,
            _ => Rejection::Malformed,
        })?;
        let claims = data.claims;
        if claims.iss != self.issuer {
            return Err(Rejection::WrongIssuer);
        }
        Ok(claims)
    }

    /// The public keys as a JWKS document.
    pub fn jwks(&self) -> serde_json::Value {
        let keys: Vec<serde_json::Value> = self
            .keys
            .read()
            .iter()
            .rev()
            .map(|k| {
                serde_json::json!({
                    "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig",
                    "kid": k.kid, "x": k.x, "y": k.y,
                })
            })
            .collect();
        serde_json::json!({ "keys": keys })
    }
}

fn header_alg(token: &str) -> Option<String> {
    let head = token.split('.').next()?;
    let bytes = B64.decode(head.trim_end_matches('=')).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("alg")?.as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::store::redb::RedbStore;

    async fn ring(dir: &std::path::Path, clock: ManualClock) -> KeyRing {
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(dir).unwrap());
        KeyRing::load(store, Arc::new(clock), "http://weir.test".into(), 60).await.unwrap()
    }

    #[tokio::test]
    async fn issue_verify_expire_and_rotate() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::at(1_000_000_000_000);
        let ring = ring(dir.path(), clock.clone()).await;
        let token = ring.issue("sale", "https://shop.example", "v1", 7);
        let claims = ring.verify(&token, Some("sale")).unwrap();
        assert_eq!((claims.ticket, claims.sub.as_str(), claims.aud.as_str()), (7, "v1", "https://shop.example"));
        assert_eq!(ring.verify(&token, Some("other")), Err(Rejection::WrongRoom));

        let old_kid = ring.current_kid();
        let new_kid = ring.rotate().await.unwrap();
        assert_ne!(old_kid, new_kid);
        assert!(ring.verify(&token, None).is_ok(), "tokens from before a rotation keep verifying");
        assert_eq!(ring.jwks()["keys"].as_array().unwrap().len(), 2);

        clock.advance_ms(61_000);
        assert_eq!(ring.verify(&token, None), Err(Rejection::Expired));
    }

    #[tokio::test]
    async fn refuses_forged_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let ring = ring(dir.path(), ManualClock::at(1_000_000_000_000)).await;
        let token = ring.issue("sale", "https://o", "v", 1);
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        // alg: none with the same claims.
        let none = format!("{}.{}.", B64.encode(br#"{"alg":"none","typ":"JWT"}"#), parts[1]);
        assert_eq!(ring.verify(&none, None), Err(Rejection::UnsupportedAlgorithm));
        // HS256 signed with the public x coordinate as secret (the classic confusion attack).
        let hs = jsonwebtoken::encode(
            &Header { kid: Some(ring.current_kid()), ..Header::new(Algorithm::HS256) },
            &*ring.verify(&token, None).unwrap(),
            &EncodingKey::from_secret(b"public"),
        )
        .unwrap();
        assert_eq!(ring.verify(&hs, None), Err(Rejection::UnsupportedAlgorithm));
        // A flipped signature byte.
        let mut sig = B64.decode(&parts[2]).unwrap();
        sig[5] ^= 1;
        parts[2] = B64.encode(sig);
        assert_eq!(ring.verify(&parts.join("."), None), Err(Rejection::BadSignature));
        // Unknown kid.
        let other = jsonwebtoken::encode(
            &Header { kid: Some("nope".into()), ..Header::new(Algorithm::ES256) },
            &*ring.verify(&token, None).unwrap(),
            &ring.keys.read()[0].encoding,
        )
        .unwrap();
        assert_eq!(ring.verify(&other, None), Err(Rejection::UnknownKey));
        assert_eq!(ring.verify("garbage", None), Err(Rejection::Malformed));
    }

    #[tokio::test]
    async fn caches_never_outlive_expiry_or_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::at(1_000_000_000_000);
        let ring = ring(dir.path(), clock.clone()).await;
        let t1 = ring.issue("a", "https://o", "v", 3);
        assert_eq!(ring.issue("a", "https://o", "v", 3), t1, "re-asking within half the lifetime reuses the token");
        assert_ne!(ring.issue("a", "https://o", "w", 3), t1, "another visitor gets its own");
        assert!(ring.verify(&t1, Some("a")).is_ok());
        assert!(ring.verify(&t1, Some("a")).is_ok(), "cached verification");
        assert_eq!(ring.verify(&t1, Some("b")), Err(Rejection::WrongRoom), "room is checked on a hit");
        clock.advance_ms(31_000);
        let t2 = ring.issue("a", "https://o", "v", 3);
        assert_ne!(t2, t1, "past half its life a token is re-signed");
        clock.advance_ms(30_000);
        assert_eq!(ring.verify(&t1, None), Err(Rejection::Expired), "expiry is checked on a hit");
        let before = ring.issue("a", "https://o", "v", 3);
        let kid = ring.rotate().await.unwrap();
        let after = ring.issue("a", "https://o", "v", 3);
        assert_ne!(before, after, "rotation signs anew");
        let header = jsonwebtoken::decode_header(&after).unwrap();
        assert_eq!(header.kid.as_deref(), Some(kid.as_str()));
    }

    #[tokio::test]
    async fn keys_survive_reload() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::at(1_000_000_000_000);
        let token = {
            let r = ring(dir.path(), clock.clone()).await;
            let t = r.issue("a", "https://o", "v", 1);
            r.store.close().await.unwrap();
            t
        };
        let r = ring(dir.path(), clock).await;
        assert!(r.verify(&token, Some("a")).is_ok());
    }
}
