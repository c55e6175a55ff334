//! Token verification. Locally: HS256 with `BSS_JWT_SECRET`, and nothing
//! else. With `AUTH_SERVICE_URL`: only the asymmetric algorithms of the
//! Auth Service's JWKS (fetched, cached, refreshed on an unknown `kid`), so
//! `alg: none` and algorithm confusion (an HS256 token "signed" with a public
//! key) are refused by construction.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;

use crate::config::Settings;
use crate::error::ApiError;
use crate::services::ServiceClient;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    #[serde(default)]
    pub roles: Vec<String>,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

const JWKS_TTL: Duration = Duration::from_secs(300);
const JWKS_MIN_REFRESH: Duration = Duration::from_secs(10);
const ASYMMETRIC: [Algorithm; 7] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

#[derive(Debug)]
pub struct CachedJwks {
    set: JwkSet,
    fetched: Instant,
}

#[derive(Debug)]
pub enum Authenticator {
    Secret {
        key: DecodingKey,
        validation: Validation,
    },
    Jwks {
        client: Arc<ServiceClient>,
        path: String,
        cache: RwLock<Option<CachedJwks>>,
        base: Validation,
    },
}

fn base_validation(settings: &Settings, alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = 30;
    let mut required = vec!["exp", "sub"];
    if let Some(iss) = &settings.jwt_issuer {
        v.set_issuer(&[iss]);
        required.push("iss");
    }
    match &settings.jwt_audience {
        Some(aud) => {
            v.set_audience(&[aud]);
            required.push("aud");
        }
        None => v.validate_aud = false,
    }
    v.set_required_spec_claims(&required);
    v
}

impl Authenticator {
    pub fn new(settings: &Settings, auth_client: Option<Arc<ServiceClient>>) -> Self {
        match auth_client {
            Some(client) => Self::Jwks {
                client,
                path: settings.jwks_path.clone(),
                cache: RwLock::new(None),
                base: base_validation(settings, Algorithm::RS256),
            },
            None => Self::Secret {
                key: DecodingKey::from_secret(settings.jwt_secret.as_bytes()),
                validation: base_validation(settings, Algorithm::HS256),
            },
        }
    }

    pub async fn verify(&self, token: &str) -> Result<Claims, ApiError> {
        let invalid =
            |e: jsonwebtoken::errors::Error| ApiError::Unauthorized(format!("invalid token: {e}"));
        match self {
            Self::Secret { key, validation } => {
                let data =
                    jsonwebtoken::decode::<Claims>(token, key, validation).map_err(invalid)?;
                Ok(data.claims)
            }
            Self::Jwks { base, .. } => {
                let header = jsonwebtoken::decode_header(token).map_err(invalid)?;
                if !ASYMMETRIC.contains(&header.alg) {
                    return Err(ApiError::Unauthorized(format!(
                        "invalid token: algorithm {:?} is not accepted",
                        header.alg
                    )));
                }
                let key = self.key_for(header.kid.as_deref(), header.alg).await?;
                let mut validation = base.clone();
                validation.algorithms = vec![header.alg];
                let data =
                    jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(invalid)?;
                Ok(data.claims)
            }
        }
    }

    async fn key_for(&self, kid: Option<&str>, alg: Algorithm) -> Result<DecodingKey, ApiError> {
        let Self::Jwks {
            client,
            path,
            cache,
            ..
        } = self
        else {
            return Err(ApiError::Unauthorized("no key set configured".into()));
        };
        if let Some(key) = find_key(cache.read().await.as_ref(), kid, alg, false) {
            return key;
        }
        let mut guard = cache.write().await;
        let stale = guard
            .as_ref()
            .is_none_or(|c| c.fetched.elapsed() > JWKS_MIN_REFRESH);
        if stale {
            let answer = client
                .call(path, None)
                .await
                .map_err(|e| ApiError::Unavailable {
                    detail: format!("cannot verify tokens right now: {e}"),
                    retry_after_secs: 5,
                })?;
            let set: JwkSet = serde_json::from_value(answer).map_err(|e| {
                ApiError::Internal(anyhow::anyhow!(
                    "the Auth Service's JWKS is unreadable: {e}"
                ))
            })?;
            *guard = Some(CachedJwks {
                set,
                fetched: Instant::now(),
            });
        }
        find_key(guard.as_ref(), kid, alg, true).unwrap_or_else(|| {
            Err(ApiError::Unauthorized(
                "invalid token: unknown signing key".into(),
            ))
        })
    }
}

/// Looks a key up in the cached set; `None` means "refresh and try again".
fn find_key(
    cache: Option<&CachedJwks>,
    kid: Option<&str>,
    alg: Algorithm,
    final_try: bool,
) -> Option<Result<DecodingKey, ApiError>> {
    let cache = cache?;
    if !final_try && cache.fetched.elapsed() > JWKS_TTL {
        return None;
    }
    let jwk = match kid {
        Some(kid) => cache.set.find(kid),
        None => cache.set.keys.first(),
    }?;
    if let Some(key_alg) = jwk.common.key_algorithm
        && format!("{key_alg:?}") != format!("{alg:?}")
    {
        return Some(Err(ApiError::Unauthorized(
            "invalid token: algorithm does not match the key".into(),
        )));
    }
    Some(
        DecodingKey::from_jwk(jwk)
            .map_err(|e| ApiError::Unauthorized(format!("invalid token: {e}"))),
    )
}

/// Mints an HS256 token with the local secret (the `bss token` command and tests).
pub fn mint(secret: &str, claims: &Claims) -> anyhow::Result<String> {
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )?)
}
