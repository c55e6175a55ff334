//! Token verification. Locally: HS256 with the local secret (`BSS_JWT_SECRET`
//! or the data directory's generated one, see [`super::local_secret`]), and
//! nothing else. With `AUTH_SERVICE_URL`: only the asymmetric algorithms of
//! the Auth Service's JWKS (fetched, cached, refreshed on an unknown `kid`),
//! so `alg: none` and algorithm confusion (an HS256 token "signed" with a
//! public key) are refused by construction. Either way, as RFC 8725 asks, a
//! token is refused when it is expired, not valid yet (`nbf`), issued in the
//! future (`iat`), each within `BSS_JWT_LEEWAY_SECS` of clock skew, or when
//! its header lists `crit` extensions (we implement none). Claim strings with
//! a NUL character are refused here too: PostgreSQL cannot store them, and
//! the subject ends up in schema history and events.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;

use super::local_secret::{self, LocalSecret, Origin};
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

/// What verification reads beyond [`Claims`].
#[derive(Debug, Deserialize)]
struct Verified {
    #[serde(flatten)]
    claims: Claims,
    /// Issued at (RFC 7519 NumericDate: seconds, maybe fractional).
    #[serde(default)]
    iat: Option<f64>,
}

/// What [`mint`] signs: the claims and when they were issued.
#[derive(Serialize)]
struct Minted<'a> {
    #[serde(flatten)]
    claims: &'a Claims,
    iat: u64,
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
    v.leeway = settings.jwt_leeway_secs;
    v.validate_nbf = true;
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
    /// Verification by the Auth Service's JWKS when `AUTH_SERVICE_URL` is
    /// set, else by the local secret (refused on a public address when it
    /// is the generated one or shorter than 256 bits).
    pub fn new(settings: &Settings) -> anyhow::Result<Self> {
        if let Some(url) = &settings.auth_service_url {
            return Ok(Self::Jwks {
                client: Arc::new(ServiceClient::new("auth", url, settings)?),
                path: settings.jwks_path.clone(),
                cache: RwLock::new(None),
                base: base_validation(settings, Algorithm::RS256),
            });
        }
        local_secret::refuse_public_address(settings)?;
        let secret = LocalSecret::resolve(settings)?;
        if let Origin::Generated(path) = &secret.origin {
            tracing::info!(
                path = %path.display(),
                "BSS_JWT_SECRET is not set: tokens are verified with this machine's generated secret (`bss token` mints them)"
            );
        }
        Ok(Self::Secret {
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation: base_validation(settings, Algorithm::HS256),
        })
    }

    /// The Auth Service's client, when tokens are verified by it.
    pub fn service(&self) -> Option<&Arc<ServiceClient>> {
        match self {
            Self::Jwks { client, .. } => Some(client),
            Self::Secret { .. } => None,
        }
    }

    pub async fn verify(&self, token: &str) -> Result<Claims, ApiError> {
        let header = jsonwebtoken::decode_header(token).map_err(invalid)?;
        refuse_critical(&header)?;
        let (verified, leeway) = match self {
            Self::Secret { key, validation } => (
                jsonwebtoken::decode::<Verified>(token, key, validation).map_err(invalid)?,
                validation.leeway,
            ),
            Self::Jwks { base, .. } => {
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
                    jsonwebtoken::decode::<Verified>(token, &key, &validation).map_err(invalid)?;
                (data, base.leeway)
            }
        };
        refuse_future_iat(verified.claims.iat, leeway)?;
        refuse_nul(&verified.claims.claims)?;
        Ok(verified.claims.claims)
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

fn invalid(e: jsonwebtoken::errors::Error) -> ApiError {
    ApiError::Unauthorized(format!("invalid token: {e}"))
}

/// RFC 7515 §4.1.11: a `crit` extension the recipient does not implement
/// makes the token invalid. This service implements none.
fn refuse_critical(header: &Header) -> Result<(), ApiError> {
    match header.crit.as_deref() {
        None => Ok(()),
        Some([]) => Err(ApiError::Unauthorized(
            "invalid token: the crit header must not be an empty list".into(),
        )),
        Some(names) => Err(ApiError::Unauthorized(format!(
            "invalid token: the crit header asks for extensions this service does not implement ({})",
            names.join(", ")
        ))),
    }
}

/// RFC 8725 §3.10 spirit: a token cannot have been issued in the future.
fn refuse_future_iat(iat: Option<f64>, leeway: u64) -> Result<(), ApiError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default();
    match iat {
        Some(iat) if iat > now + leeway as f64 => Err(ApiError::Unauthorized(
            "invalid token: it was issued in the future (iat); check the issuer's clock".into(),
        )),
        _ => Ok(()),
    }
}

/// Claim strings become SQL values (the subject is the recorded actor);
/// PostgreSQL cannot store U+0000.
fn refuse_nul(claims: &Claims) -> Result<(), ApiError> {
    let strings = [
        ("sub", Some(claims.sub.as_str())),
        ("tenant_id", claims.tenant_id.as_deref()),
        ("iss", claims.iss.as_deref()),
        ("aud", claims.aud.as_deref()),
    ]
    .into_iter()
    .chain(claims.roles.iter().map(|r| ("roles", Some(r.as_str()))));
    for (name, value) in strings {
        if value.is_some_and(|v| v.contains('\0')) {
            return Err(ApiError::Unauthorized(format!(
                "invalid token: the {name} claim contains a NUL character"
            )));
        }
    }
    Ok(())
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

/// Mints an HS256 token, issued now, with the local secret (the `bss
/// token` command and tests).
pub fn mint(secret: &str, claims: &Claims) -> anyhow::Result<String> {
    let iat = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &Minted { claims, iat },
        &EncodingKey::from_secret(secret.as_bytes()),
    )?)
}
