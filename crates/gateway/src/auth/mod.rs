//! Turning a request's credential into a [`Principal`], failing closed.
//!
//! Where a credential may come from, in order of precedence: `Authorization: Bearer <key or
//! JWT>` (or `Authorization: <key>` with no scheme, when it has our key syntax `flc_…`), `apikey`,
//! `X-API-Key`, and — on SSE GET routes only — the `apikey` query parameter. A header always
//! wins over the query parameter. Only read-only keys may travel in a URL.
//!
//! Routes learn their caller only through [`Authenticated`], typed by what the route lets the
//! caller do ([`Permission`]). [`keys`] loads key files, [`jwt`] verifies tokens, [`rate`]
//! keeps per-key budgets.

pub mod jwt;
pub mod keys;
pub mod rate;

use std::marker::PhantomData;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use changegate_core::auth::Action;
use changegate_core::{ApiKey, Principal, Role};

use crate::auth::jwt::{JwtError, JwtVerifier};
use crate::error::ApiError;
use crate::query::Query;
use crate::state::AppState;

/// What a route lets its caller do, as a type: a handler that takes
/// `Authenticated<Publish>` cannot run for a caller who may not publish.
pub trait Permission: Send + Sync + 'static {
    /// The action checked against the caller's scope.
    const ACTION: Action;
    /// Whether the credential may come from `?apikey=`.
    const QUERY_KEY: QueryKey;
}

macro_rules! permissions {
    ($($(#[$doc:meta])* $name:ident = $action:ident, $query:ident;)*) => {$(
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $name;
        impl Permission for $name {
            const ACTION: Action = Action::$action;
            const QUERY_KEY: QueryKey = QueryKey::$query;
        }
    )*};
}

permissions! {
    /// Open a realtime stream (an SSE GET: browsers may pass a read-only key in the URL).
    Subscribe = Subscribe, Allowed;
    /// Publish application messages.
    Publish = Publish, Refused;
    /// Open a flag stream (an SSE GET: a read-only key may come in the URL).
    StreamFlags = ReadFlags, Allowed;
    /// Read or evaluate flags (headers only).
    ReadFlags = ReadFlags, Refused;
    /// Manage environments, flags and segments (a service key or a JWT).
    ManageFlags = ManageFlags, Refused;
}

/// The caller of a request, authenticated and allowed `P` — the one way a route learns who
/// calls it. As an extractor it reads `apikey` from the query string by the one policy of
/// [`crate::query`]; routes that answer in their own error shape call [`Authenticated::check`].
#[derive(Debug)]
pub struct Authenticated<P: Permission> {
    /// Who it is.
    pub principal: Principal,
    permission: PhantomData<P>,
}

impl<P: Permission> Authenticated<P> {
    /// Authenticates a request with `headers` and, where `P` allows it, `apikey` from the URL.
    pub async fn check(app: &AppState, headers: &HeaderMap, apikey: Option<&str>) -> Result<Self, ApiError> {
        let principal = authenticate(app, headers, apikey, P::QUERY_KEY, P::ACTION).await?;
        Ok(Self { principal, permission: PhantomData })
    }
}

impl<P: Permission> FromRequestParts<AppState> for Authenticated<P> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, ApiError> {
        let query = Query::parse(parts.uri.query())?;
        Self::check(app, &parts.headers, query.get("apikey")?).await
    }
}

/// Whether the route accepts `?apikey=` (SSE GET routes, for browsers' `EventSource`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum QueryKey {
    /// Read-only keys may come from the query string.
    Allowed,
    /// Only headers count.
    Refused,
}

enum Presented<'a> {
    Header(&'a str),
    Query(&'a str),
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(value) => value.to_str().map(|v| Some(v.trim())).map_err(|_| ApiError::InvalidKey),
    }
}

/// The query-string policy, applied whether or not a header also carries a credential: a URL
/// ends up in proxy and browser logs, so a privileged key or a JWT in one is refused even when
/// the header would have won.
fn check_query(query: Option<&str>, query_key: QueryKey) -> Result<(), ApiError> {
    let Some(text) = query.map(str::trim) else { return Ok(()) };
    if query_key == QueryKey::Refused {
        return Err(ApiError::CredentialInQuery("a credential on this route"));
    }
    if looks_like_jwt(text) {
        return Err(ApiError::CredentialInQuery("a JWT"));
    }
    // Judged on the scope written in the key, before any lookup: the answer reveals nothing
    // about whether the key exists. (Anything else malformed is left to the normal path, where
    // a header wins over it.)
    match ApiKey::parse(text) {
        Ok(key) if !key.scope().is_read_only() => {
            Err(ApiError::CredentialInQuery(privileged_name(key.scope())))
        }
        _ => Ok(()),
    }
}

/// Three dot-separated base64url segments, the first a JSON object (`eyJ…`).
fn looks_like_jwt(text: &str) -> bool {
    text.starts_with("eyJ") && text.split('.').count() == 3
}

fn presented<'a>(
    headers: &'a HeaderMap,
    query: Option<&'a str>,
    query_key: QueryKey,
) -> Result<Presented<'a>, ApiError> {
    check_query(query, query_key)?;
    if let Some(authorization) = header(headers, AUTHORIZATION.as_str())? {
        // Featureflip's SDK sends its key with no scheme: a value with our key syntax is a key.
        if authorization.starts_with("flc_") && !authorization.contains(' ') {
            return Ok(Presented::Header(authorization));
        }
        let (scheme, value) = authorization.split_once(' ').unwrap_or((authorization, ""));
        if !scheme.eq_ignore_ascii_case("bearer") || value.trim().is_empty() {
            return Err(ApiError::BadAuthorization);
        }
        return Ok(Presented::Header(value.trim()));
    }
    for name in ["apikey", "x-api-key"] {
        if let Some(value) = header(headers, name)? {
            return Ok(Presented::Header(value));
        }
    }
    match (query, query_key) {
        (Some(value), QueryKey::Allowed) => Ok(Presented::Query(value)),
        (Some(_), QueryKey::Refused) => Err(ApiError::CredentialInQuery("a credential on this route")),
        (None, _) => Err(ApiError::MissingCredentials("")),
    }
}

tokio::task_local! {
    /// The tenant the request being served authenticated as, for its access-log line.
    static AUTHENTICATED: std::cell::RefCell<Option<changegate_core::TenantId>>;
}

/// Runs `request` (a handler, inside the access log) and says which tenant it authenticated
/// as, however and wherever it did: authentication notes it here.
pub async fn logging_tenant<F: std::future::Future>(
    request: F,
) -> (F::Output, Option<changegate_core::TenantId>) {
    AUTHENTICATED
        .scope(std::cell::RefCell::new(None), async {
            let output = request.await;
            (output, AUTHENTICATED.with(|t| t.borrow_mut().take()))
        })
        .await
}

/// Authenticates a request and checks that it may perform `action`; failures are counted by
/// reason.
async fn authenticate(
    app: &AppState,
    headers: &HeaderMap,
    query: Option<&str>,
    query_key: QueryKey,
    action: Action,
) -> Result<Principal, ApiError> {
    let result = authenticate_inner(app, headers, query, query_key, action).await;
    match &result {
        Err(error) => {
            metrics::counter!("changegate_auth_failures_total", "reason" => error.code()).increment(1);
        }
        // Outside a request (a test calling this directly) there is no log line to fill.
        Ok(principal) => {
            let _ = AUTHENTICATED.try_with(|t| *t.borrow_mut() = Some(principal.tenant.clone()));
        }
    }
    result
}

async fn authenticate_inner(
    app: &AppState,
    headers: &HeaderMap,
    query: Option<&str>,
    query_key: QueryKey,
    action: Action,
) -> Result<Principal, ApiError> {
    let (text, from_query) = match presented(headers, query, query_key)? {
        Presented::Header(text) => (text, false),
        Presented::Query(text) => (text, true),
    };
    let principal = if text.starts_with("flc_") {
        let key = ApiKey::parse(text).map_err(|_| ApiError::InvalidKey)?;
        // Judged on the scope written in the key, before any lookup: a privileged key in a URL
        // is refused whether or not it exists, and the answer reveals nothing about it.
        if from_query && !key.scope().is_read_only() {
            return Err(ApiError::CredentialInQuery(privileged_name(key.scope())));
        }
        let record = app.engine.find_key(&key).await?.ok_or(ApiError::InvalidKey)?;
        if record.revoked {
            return Err(ApiError::RevokedKey);
        }
        Principal {
            tenant: record.tenant,
            environment: record.environment,
            role: Role::Key(record.scope),
            key_id: Some(record.id),
        }
    } else {
        if from_query {
            return Err(ApiError::CredentialInQuery("a JWT"));
        }
        let verifier: &JwtVerifier = app.jwt.as_ref().ok_or(JwtError::NotConfigured)?;
        let tenant = verifier.verify(text, unix_now())?;
        Principal { tenant, environment: None, role: Role::Token, key_id: None }
    };
    if !principal.may(action) {
        let who = match principal.role {
            Role::Key(scope) => format!("a `{scope}` key"),
            Role::Token => "this token".to_owned(),
        };
        let what = match action {
            Action::Subscribe => "subscribe to collections or topics",
            Action::Publish => "publish messages",
            Action::ReadFlags => "read flag streams",
            Action::ManageFlags => "manage flags (use a `service` key or a JWT)",
        };
        return Err(ApiError::Forbidden(format!("{who} cannot {what}")));
    }
    Ok(principal)
}

fn privileged_name(scope: changegate_core::Scope) -> &'static str {
    match scope {
        changegate_core::Scope::Publish => "a `publish` key",
        _ => "a `service` key",
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
