//! Featureflip's SDK API, `/v1/sdk/*`, as its published SDK (PyPI `featureflip` 2.10) calls it:
//! the key in `Authorization` with no scheme, a snapshot `GET /v1/sdk/flags` →
//! `{"flags","segments"}`, one flag `GET /v1/sdk/flags/{key}`, a stream `GET /v1/sdk/stream`
//! (`sync` with the snapshot first, then `flag.created|updated|deleted` `{"key"}` and `ping`),
//! and analytics `POST /v1/sdk/events` (counted, then dropped: changegate keeps no analytics).
//!
//! The SDK evaluates locally, so its flags are a translation of ours
//! ([`changegate_flags::featureflip`]) built so it serves what our evaluator serves. The SDK
//! reads only the status of an error, so errors keep our shape.

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use changegate_core::event::Dialect;
use changegate_core::sse::message;
use changegate_core::{EnvironmentId, Feed, FeedKey, Filter, Principal};
use changegate_flags::featureflip;
use serde_json::Value;

use super::flags::{environment, query_param};
use crate::auth::{Authenticated, Permission, ReadFlags, StreamFlags};
use crate::error::ApiError;
use crate::state::AppState;
use crate::stream::sse::Wire;
use crate::stream::{Resume, open_stream};

/// The SDK's caller: an environment-bound key (or a JWT / service key with `?environment=`).
async fn caller<P: Permission>(
    app: &AppState,
    headers: &HeaderMap,
    raw: Option<&str>,
) -> Result<(Principal, EnvironmentId), ApiError> {
    let apikey = query_param(raw, "apikey")?;
    let principal = Authenticated::<P>::check(app, headers, apikey.as_deref()).await?.principal;
    let environment = environment(&principal, raw)?;
    Ok((principal, environment))
}

/// The snapshot of one environment, in the SDK's shape.
async fn snapshot(
    app: &AppState,
    principal: &Principal,
    environment: &EnvironmentId,
) -> Result<Value, ApiError> {
    let state = app.engine.flags(&principal.tenant, environment).await?;
    Ok(featureflip::snapshot(state.flags.values(), &state.segments))
}

/// `GET /v1/sdk/flags`.
pub(crate) async fn flags(
    State(app): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let (principal, environment) = caller::<ReadFlags>(&app, &headers, raw.as_deref()).await?;
    Ok(axum::Json(snapshot(&app, &principal, &environment).await?).into_response())
}

/// `GET /v1/sdk/flags/{key}`.
pub(crate) async fn flag(
    State(app): State<AppState>,
    Path(key): Path<String>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let (principal, environment) = caller::<ReadFlags>(&app, &headers, raw.as_deref()).await?;
    let state = app.engine.flags(&principal.tenant, &environment).await?;
    let flag = state.flags.get(&key).ok_or_else(|| ApiError::Missing(format!("flag `{key}` not found")))?;
    Ok(axum::Json(featureflip::flag(flag, &state.segments)).into_response())
}

/// `GET /v1/sdk/stream`: the SDK replaces its whole store on every `sync`, so a reconnect
/// needs no `Last-Event-ID` — each connection starts with a fresh snapshot.
pub(crate) async fn stream(
    State(app): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let (principal, environment) = caller::<StreamFlags>(&app, &headers, raw.as_deref()).await?;
    let key = FeedKey { tenant: principal.tenant.clone(), feed: Feed::Flags };
    let filter = Filter::Environment(Some(environment.clone()));
    let sync = {
        let (app, principal) = (app.clone(), principal.clone());
        Box::pin(async move {
            let body = snapshot(&app, &principal, &environment).await?;
            Ok(message(None, Some("sync"), &body.to_string()))
        })
    };
    let heartbeat = app.limits.flags_heartbeat[1];
    open_stream(
        &app,
        &principal,
        key,
        filter,
        Some(Resume::Snapshot(sync)),
        Wire::new(Dialect::Featureflip),
        heartbeat,
    )
    .await
}

/// The kinds of analytics event the SDK sends, as a bounded metric label.
fn kind(event: &Value) -> &'static str {
    match event.get("type").and_then(Value::as_str).map(str::to_ascii_lowercase).as_deref() {
        Some("evaluation") => "evaluation",
        Some("custom") => "custom",
        Some("identify") => "identify",
        _ => "other",
    }
}

/// `POST /v1/sdk/events`: `{"events":[{…}, …]}` (the body limit is `--max-json-body`).
pub(crate) async fn events(
    State(app): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    caller::<ReadFlags>(&app, &headers, raw.as_deref()).await?;
    let body: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("the body is not JSON: {e}")))?;
    let Some(events) = body.get("events").and_then(Value::as_array) else {
        return Err(ApiError::bad_request("invalid_request", "the body must be {\"events\": [ … ]}"));
    };
    if !events.iter().all(Value::is_object) {
        return Err(ApiError::bad_request("invalid_request", "every event must be a JSON object"));
    }
    for event in events {
        metrics::counter!("changegate_sdk_events_total", "kind" => kind(event)).increment(1);
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn analytics_kinds_are_a_bounded_label() {
        let kinds: Vec<_> = [
            json!({"type": "Evaluation"}),
            json!({"type": "Custom"}),
            json!({"type": "Identify"}),
            json!({"type": "anything else"}),
            json!({}),
        ]
        .iter()
        .map(kind)
        .collect();
        assert_eq!(kinds, ["evaluation", "custom", "identify", "other", "other"]);
    }
}
