//! Authentication: ONE tower layer in front of gRPC and HTTP/JSON. User paths need a verified bearer JWT (its
//! `Identity` goes into the request extensions); internal paths need the internal API key. Ownership itself is
//! checked by the core (`Actor::User` must own the batch), so a service never reads a user from a request body.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::{header, Request, Response};
use futures::future::BoxFuture;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tower::{Layer, Service};

use super::auth_cache::{self, Verified, VerifiedTokens};
use crate::config::{JwtKey, Secret};
use crate::core::ids::{OrgId, UserId};

/// HS256 secret used when no key is configured (the embedded development default). Never for production.
pub const DEVELOPMENT_SECRET: &str = "bos-development-secret-do-not-use-in-production";

/// Header internal callers send.
pub const INTERNAL_KEY_HEADER: &str = "x-internal-api-key";

const USER_PREFIXES: [&str; 2] = ["/huleedu.bos.v1.BatchService/", "/v1/"];
const INTERNAL_PREFIXES: [&str; 2] = ["/huleedu.bos.v1.BatchInternalService/", "/internal/"];

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("BOS_JWT_PUBLIC_KEY is neither an RSA nor an EC public key in PEM form")]
    BadPublicKey,
    #[error(
        "tokens can only be minted with a shared secret (BOS_JWT_SECRET), not with a public key"
    )]
    CannotMint,
    #[error("invalid token claims: {0}")]
    Claims(String),
    #[error("signing failed: {0}")]
    Signing(#[from] jsonwebtoken::errors::Error),
}

/// The verified caller of a user RPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: UserId,
    pub org: Option<OrgId>,
}

/// Marks a request whose internal API key was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InternalCaller;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    org_id: Option<String>,
}

/// Verifies credentials; built once from the configuration.
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
    internal_key: Option<Vec<u8>>,
    /// Tokens that verified, so repeated calls with the same token skip the signature check.
    verified: VerifiedTokens,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("algorithms", &self.validation.algorithms)
            .field(
                "internal_key",
                &self.internal_key.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl Authenticator {
    pub fn new(jwt: &JwtKey, internal_api_key: Option<&Secret>) -> Result<Self, AuthError> {
        let (key, algorithm) = match jwt {
            JwtKey::Secret(secret) => (
                DecodingKey::from_secret(secret.expose().as_bytes()),
                Algorithm::HS256,
            ),
            JwtKey::Development => (
                DecodingKey::from_secret(DEVELOPMENT_SECRET.as_bytes()),
                Algorithm::HS256,
            ),
            JwtKey::PublicKeyPem(pem) => {
                if let Ok(key) = DecodingKey::from_rsa_pem(pem.as_bytes()) {
                    (key, Algorithm::RS256)
                } else if let Ok(key) = DecodingKey::from_ec_pem(pem.as_bytes()) {
                    (key, Algorithm::ES256)
                } else {
                    return Err(AuthError::BadPublicKey);
                }
            }
        };
        let mut validation = Validation::new(algorithm);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_exp = true;
        validation.leeway = 5;
        Ok(Self {
            key,
            validation,
            internal_key: internal_api_key.map(|k| k.expose().as_bytes().to_vec()),
            verified: VerifiedTokens::new(auth_cache::DEFAULT_CAPACITY),
        })
    }

    /// The identity a bearer token proves, or why it proves nothing (the reason is safe to show the caller).
    pub fn verify_bearer(&self, authorization: Option<&str>) -> Result<Identity, String> {
        let header = authorization.ok_or("missing authorization header")?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or("authorization must be 'Bearer <token>'")?
            .trim();
        let now = unix_now();
        if let Some(identity) = self.verified.get(token, now) {
            return Ok(identity);
        }
        let data =
            jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|e| {
                use jsonwebtoken::errors::ErrorKind;
                match e.kind() {
                    ErrorKind::ExpiredSignature => "token expired".to_owned(),
                    ErrorKind::InvalidSignature => "token signature is invalid".to_owned(),
                    ErrorKind::MissingRequiredClaim(claim) => {
                        format!("token lacks the '{claim}' claim")
                    }
                    _ => "token is invalid".to_owned(),
                }
            })?;
        let user = UserId::parse("sub", &data.claims.sub).map_err(|e| format!("token {e}"))?;
        let org = match data.claims.org_id.as_deref() {
            Some(raw) => Some(OrgId::parse("org_id", raw).map_err(|e| format!("token {e}"))?),
            None => None,
        };
        let identity = Identity { user, org };
        self.verified.insert(
            token,
            Verified {
                identity: identity.clone(),
                exp: data.claims.exp,
                nbf: data.claims.nbf,
            },
        );
        Ok(identity)
    }

    /// Whether `presented` is the configured internal key. Without a configured key nothing passes.
    pub fn verify_internal(&self, presented: Option<&[u8]>) -> bool {
        match (&self.internal_key, presented) {
            (Some(expected), Some(presented)) => bool::from(expected.as_slice().ct_eq(presented)),
            _ => false,
        }
    }
}

/// A signed HS256 token for `user` (and `org`), valid for `ttl_secs`. Development tooling (`bos token`).
pub fn mint_token(
    jwt: &JwtKey,
    user: &str,
    org: Option<&str>,
    ttl_secs: u64,
) -> Result<String, AuthError> {
    let secret = match jwt {
        JwtKey::Secret(secret) => secret.expose().to_owned(),
        JwtKey::Development => DEVELOPMENT_SECRET.to_owned(),
        JwtKey::PublicKeyPem(_) => return Err(AuthError::CannotMint),
    };
    let user = UserId::parse("user", user).map_err(|e| AuthError::Claims(e.to_string()))?;
    let org = org
        .map(|o| OrgId::parse("org", o).map_err(|e| AuthError::Claims(e.to_string())))
        .transpose()?;
    let now = unix_now();
    let claims = Claims {
        sub: user.to_string(),
        exp: now.saturating_add(ttl_secs),
        iat: Some(now),
        nbf: None,
        org_id: org.map(|o| o.to_string()),
    };
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What a path requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Guard {
    User,
    Internal,
    Open,
}

fn guard_for(path: &str) -> Guard {
    if USER_PREFIXES.iter().any(|p| path.starts_with(p)) {
        Guard::User
    } else if INTERNAL_PREFIXES.iter().any(|p| path.starts_with(p)) {
        Guard::Internal
    } else {
        Guard::Open
    }
}

/// The tower layer; wrap the whole router with it.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    auth: Arc<Authenticator>,
}

impl AuthLayer {
    pub fn new(auth: Arc<Authenticator>) -> Self {
        Self { auth }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            auth: Arc::clone(&self.auth),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Arc<Authenticator>,
}

impl<S> Service<Request<Body>> for AuthService<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let verdict = match guard_for(request.uri().path()) {
            Guard::Open => Ok(()),
            Guard::User => {
                let header = request
                    .headers()
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok());
                self.auth.verify_bearer(header).map(|identity| {
                    request.extensions_mut().insert(identity);
                })
            }
            Guard::Internal => {
                let presented = request
                    .headers()
                    .get(INTERNAL_KEY_HEADER)
                    .map(|v| v.as_bytes());
                if self.auth.verify_internal(presented) {
                    request.extensions_mut().insert(InternalCaller);
                    Ok(())
                } else {
                    Err("missing or wrong internal API key".to_owned())
                }
            }
        };
        match verdict {
            Ok(()) => {
                // The clone that was polled ready serves this call; the fresh clone stays for the next one.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(async move { inner.call(request).await })
            }
            Err(reason) => {
                let grpc = is_grpc(&request);
                Box::pin(async move { Ok(unauthenticated(grpc, reason)) })
            }
        }
    }
}

/// Whether the caller speaks gRPC (and so wants errors as a gRPC status).
pub fn is_grpc<B>(request: &Request<B>) -> bool {
    request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

fn unauthenticated(grpc: bool, reason: String) -> Response<Body> {
    let status = tonic::Status::unauthenticated(reason);
    if grpc {
        // A trailers-only response: HTTP 200 with grpc-status in the headers.
        status.into_http::<Body>()
    } else {
        use axum::response::IntoResponse;
        super::errors::http_response(&status).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authenticator() -> Authenticator {
        Authenticator::new(
            &JwtKey::Secret(Secret::new("s3cret-s3cret-s3cret")),
            Some(&Secret::new("k".repeat(32))),
        )
        .unwrap()
    }

    #[test]
    fn minted_tokens_verify_and_carry_user_and_org() {
        let jwt = JwtKey::Secret(Secret::new("s3cret-s3cret-s3cret"));
        let token = mint_token(&jwt, "alice", Some("org-1"), 60).unwrap();
        let identity = authenticator()
            .verify_bearer(Some(&format!("Bearer {token}")))
            .unwrap();
        assert_eq!(identity.user.as_str(), "alice");
        assert_eq!(
            identity.org.map(|o| o.to_string()),
            Some("org-1".to_owned())
        );
    }

    #[test]
    fn wrong_secret_expired_and_missing_tokens_are_refused() {
        let other = mint_token(
            &JwtKey::Secret(Secret::new("another-secret-value")),
            "alice",
            None,
            60,
        )
        .unwrap();
        assert_eq!(
            authenticator().verify_bearer(Some(&format!("Bearer {other}"))),
            Err("token signature is invalid".to_owned())
        );
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Claims {
                sub: "alice".into(),
                exp: now - 600,
                iat: None,
                nbf: None,
                org_id: None,
            },
            &EncodingKey::from_secret(b"s3cret-s3cret-s3cret"),
        )
        .unwrap();
        assert_eq!(
            authenticator().verify_bearer(Some(&format!("Bearer {expired}"))),
            Err("token expired".to_owned())
        );
        assert!(authenticator().verify_bearer(None).is_err());
        assert!(authenticator().verify_bearer(Some("Basic abc")).is_err());
    }

    #[test]
    fn a_cached_token_hits_but_a_token_with_one_byte_changed_is_verified_in_full() {
        let auth = authenticator();
        let jwt = JwtKey::Secret(Secret::new("s3cret-s3cret-s3cret"));
        let token = mint_token(&jwt, "alice", None, 60).unwrap();
        let bearer = format!("Bearer {token}");
        assert!(auth.verify_bearer(Some(&bearer)).is_ok());
        assert_eq!(auth.verified.len(), 1);
        assert!(auth.verify_bearer(Some(&bearer)).is_ok());
        assert_eq!(auth.verified.len(), 1);
        // One byte of the signature changed, and one of the payload (the user claim).
        let (rest, signature) = token.rsplit_once('.').unwrap();
        let mid = signature.len() / 2;
        let flipped = if &signature[mid..=mid] == "A" {
            "B"
        } else {
            "A"
        };
        let forged = format!(
            "{rest}.{}{flipped}{}",
            &signature[..mid],
            &signature[mid + 1..]
        );
        assert_eq!(
            auth.verify_bearer(Some(&format!("Bearer {forged}"))),
            Err("token signature is invalid".to_owned())
        );
        let mallory = mint_token(&jwt, "mallory", None, 60).unwrap();
        let (_, mallory_payload, _) = split3(&mallory);
        let (header, _, signature) = split3(&token);
        let swapped = format!("{header}.{mallory_payload}.{signature}");
        assert!(auth
            .verify_bearer(Some(&format!("Bearer {swapped}")))
            .is_err());
        assert_eq!(auth.verified.len(), 1);
    }

    fn split3(token: &str) -> (&str, &str, &str) {
        let mut parts = token.splitn(3, '.');
        (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        )
    }

    #[test]
    fn internal_key_must_match_and_must_be_configured() {
        let auth = authenticator();
        assert!(auth.verify_internal(Some("k".repeat(32).as_bytes())));
        assert!(!auth.verify_internal(Some(b"kkk")));
        assert!(!auth.verify_internal(None));
        let none = Authenticator::new(&JwtKey::Development, None).unwrap();
        assert!(!none.verify_internal(Some(b"anything")));
    }

    #[test]
    fn paths_choose_their_guard() {
        assert_eq!(
            guard_for("/huleedu.bos.v1.BatchService/GetBatchStatus"),
            Guard::User
        );
        assert_eq!(guard_for("/v1/batches/x/status"), Guard::User);
        assert_eq!(
            guard_for("/huleedu.bos.v1.BatchInternalService/GetPipelineState"),
            Guard::Internal
        );
        assert_eq!(
            guard_for("/internal/v1/batches/x/pipeline-state"),
            Guard::Internal
        );
        assert_eq!(guard_for("/grpc.health.v1.Health/Check"), Guard::Open);
        assert_eq!(guard_for("/healthz"), Guard::Open);
        assert_eq!(guard_for("/openapi.json"), Guard::Open);
    }
}
