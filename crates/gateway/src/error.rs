//! The gateway's error type and its one wire form: `{"error":{"code":"…","message":"…"}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Everything a request can fail with. Messages name the problem and what to do; they never
/// contain a key, a token or another tenant's data.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No credential in any accepted place.
    #[error(
        "no credentials: send an API key in the `apikey`, `X-API-Key` or `Authorization: Bearer` header{0}"
    )]
    MissingCredentials(&'static str),
    /// A key that is malformed or unknown.
    #[error("invalid API key")]
    InvalidKey,
    /// A key that was revoked.
    #[error("this API key was revoked")]
    RevokedKey,
    /// A JWT that does not verify.
    #[error("invalid token: {0}")]
    InvalidToken(#[from] crate::auth::jwt::JwtError),
    /// An `Authorization` header that is not `Bearer <credential>`.
    #[error("the Authorization header must be `Bearer <key or JWT>`")]
    BadAuthorization,
    /// `/metrics` without the configured metrics token.
    #[error("/metrics needs `Authorization: Bearer <metrics token>` (see --metrics-token)")]
    MetricsToken,
    /// A privileged credential in a URL.
    #[error(
        "{0} must not be sent in the query string, where URLs end up in logs; send it in the `apikey`, `X-API-Key` or `Authorization: Bearer` header"
    )]
    CredentialInQuery(&'static str),
    /// Authenticated, but the scope does not allow the route.
    #[error("{0}")]
    Forbidden(String),
    /// The request is malformed; the message says how.
    #[error("{message}")]
    BadRequest {
        /// Machine-readable code.
        code: &'static str,
        /// Human-readable explanation.
        message: String,
    },
    /// The body is larger than allowed.
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// Collections need a database engine.
    #[error(
        "collections need a database: start changegate with DATABASE_URL (PostgreSQL) to subscribe to `{0}`"
    )]
    CollectionsNeedDatabase(String),
    /// The table exists (or not) but is not realtime-enabled.
    #[error("collection `{0}` does not exist or is not realtime-enabled (see `changegate realtime enable`)")]
    CollectionNotEnabled(String),
    /// The requested source is not configured on this gateway.
    #[error("{0}")]
    SourceNotConfigured(String),
    /// No such flag, rule, segment or environment.
    #[error("{0}")]
    Missing(String),
    /// It exists already, or is still in use.
    #[error("{0}")]
    Conflict(String),
    /// `If-Match` named a version that is not the current one.
    #[error("{0}")]
    VersionMismatch(String),
    /// No such route.
    #[error("no route for {0}")]
    NotFound(String),
    /// The route exists, the method does not.
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    /// The gateway is shutting down or a dependency is down.
    #[error("{0}")]
    Unavailable(String),
    /// A write reached a gateway that follows a read replica; the message names the primary.
    #[error("{0}")]
    ReadOnly(String),
    /// Something that should not happen did (corrupt stored data, say). The details went to the
    /// log under `id`; the client gets only the id, to quote when it reports the problem.
    #[error("an internal error occurred; it was logged as {id}")]
    Internal {
        /// Correlates this answer with its log line.
        id: String,
    },
}

impl ApiError {
    /// An internal error: logs `what` and `error` (never sent to the client) under a fresh id.
    pub fn internal(what: &str, error: &dyn std::fmt::Display) -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("err-{:x}-{n}", changegate_core::Timestamp::now().as_millis());
        tracing::error!(error_id = %id, %error, "{what}");
        Self::Internal { id }
    }

    /// A 400 with a code and message.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest { code, message: message.into() }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MissingCredentials(_)
            | Self::InvalidKey
            | Self::RevokedKey
            | Self::InvalidToken(_)
            | Self::BadAuthorization
            | Self::MetricsToken
            | Self::CredentialInQuery(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::CollectionsNeedDatabase(_) | Self::SourceNotConfigured(_) => StatusCode::NOT_IMPLEMENTED,
            Self::CollectionNotEnabled(_) | Self::Missing(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::VersionMismatch(_) => StatusCode::PRECONDITION_FAILED,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unavailable(_) | Self::ReadOnly(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MissingCredentials(_) => "missing_credentials",
            Self::InvalidKey => "invalid_api_key",
            Self::RevokedKey => "revoked_api_key",
            Self::InvalidToken(_) | Self::BadAuthorization | Self::MetricsToken => "invalid_token",
            Self::CredentialInQuery(_) => "credential_in_query",
            Self::Forbidden(_) => "forbidden",
            Self::BadRequest { code, .. } => code,
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::CollectionsNeedDatabase(_) => "collections_need_database",
            Self::SourceNotConfigured(_) => "source_not_configured",
            Self::CollectionNotEnabled(_) => "collection_not_enabled",
            Self::Missing(_) => "not_found",
            Self::Conflict(_) => "conflict",
            Self::VersionMismatch(_) => "version_mismatch",
            Self::NotFound(_) => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Unavailable(_) => "unavailable",
            Self::ReadOnly(_) => "read_only_replica",
            Self::Internal { .. } => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code(), "message": self.to_string() } });
        let mut response = (self.status(), axum::Json(body)).into_response();
        if self.status() == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"changegate\""),
            );
        }
        response
    }
}
