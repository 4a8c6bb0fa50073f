//! Operations routes: liveness, readiness, Prometheus metrics, the live console and the
//! OpenAPI document.

use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::error::ApiError;
use crate::state::AppState;

/// Prometheus text exposition; with `--metrics-token`, only for `Authorization: Bearer <token>`
/// (compared in constant time).
pub(super) async fn metrics_text(State(app): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(token) = &app.limits.metrics_token {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .unwrap_or_default();
        let matches: bool =
            subtle::ConstantTimeEq::ct_eq(presented.trim().as_bytes(), token.as_bytes()).into();
        if !matches {
            return ApiError::MetricsToken.into_response();
        }
    }
    match &app.metrics {
        Some(handle) => {
            handle.run_upkeep();
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response()
        }
        None => ApiError::NotFound("/metrics (no metrics recorder is installed)".into()).into_response(),
    }
}

/// The console page: a static, dependency-free live view of a collection or topic.
pub(super) async fn console() -> Response {
    let mut response = axum::response::Html(include_str!("../../static/console.html")).into_response();
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src *",
        ),
    );
    response
}

pub(super) async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], super::OPENAPI).into_response()
}

pub(super) async fn healthz() -> impl IntoResponse {
    axum::Json(json!({ "status": "ok" }))
}

pub(super) async fn readyz(State(app): State<AppState>) -> Response {
    if app.closing.is_cancelled() {
        return ApiError::Unavailable("shutting down".into()).into_response();
    }
    if let Err(reason) = app.engine.readiness().await {
        return ApiError::Unavailable(reason).into_response();
    }
    // Bounded: readiness must answer quickly even while the driver waits for a server.
    if let Some(mongo) = &app.mongo
        && !matches!(tokio::time::timeout(Duration::from_secs(2), crate::mongo::ping(mongo)).await, Ok(true))
    {
        return ApiError::Unavailable("MongoDB is unreachable".into()).into_response();
    }
    axum::Json(json!({ "status": "ready" })).into_response()
}
