//! Flag management (`/v1/environments`, `/v1/flags…`, `/v1/segments…`) and the three flag-stream
//! dialects (`/api/v1/stream`, `/stream`, `/api/v1/flags/events`), all on the shared event model.

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use changegate_core::event::Dialect;
use changegate_core::{EnvironmentId, Feed, FeedKey, Filter, Principal, Start};
use changegate_flags::{FlagSpec, NewFlag, Rule, SegmentSpec};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::auth::{Authenticated, ManageFlags, StreamFlags};
use crate::error::ApiError;
use crate::query::Query;
use crate::state::AppState;
use crate::stream::sse::Wire;
use crate::stream::{Ids, Resume, open_stream};

/// One query parameter, by the one query-string policy ([`crate::query`]).
pub(crate) fn query_param(raw: Option<&str>, name: &str) -> Result<Option<String>, ApiError> {
    Ok(Query::parse(raw)?.get(name)?.map(str::to_owned))
}

/// An authenticated flag manager (service key or JWT).
type Manager = Authenticated<ManageFlags>;

/// A management request on one environment, with its `If-Match` version.
pub(crate) struct Scoped {
    principal: Principal,
    env: EnvironmentId,
    expected: Option<u64>,
}

impl FromRequestParts<AppState> for Scoped {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, ApiError> {
        let principal = Manager::from_request_parts(parts, app).await?.principal;
        let env = environment(&principal, parts.uri.query())?;
        let expected = if_match(&parts.headers)?;
        Ok(Self { principal, env, expected })
    }
}

/// The environment a management request acts on: `?environment=`, or the key's own; a key
/// limited to one environment cannot act on another.
pub(crate) fn environment(principal: &Principal, raw: Option<&str>) -> Result<EnvironmentId, ApiError> {
    let asked = query_param(raw, "environment")?;
    let asked = asked
        .as_deref()
        .map(EnvironmentId::parse)
        .transpose()
        .map_err(|e| ApiError::bad_request("invalid_environment", e.to_string()))?;
    match (asked, &principal.environment) {
        (Some(asked), Some(own)) if asked != *own => {
            Err(ApiError::Forbidden(format!("this key is limited to environment `{own}`")))
        }
        (Some(asked), _) => Ok(asked),
        (None, Some(own)) => Ok(own.clone()),
        (None, None) => {
            Err(ApiError::bad_request("invalid_query", "say which environment: `?environment=production`"))
        }
    }
}

fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else { return Ok(None) };
    let text = value.to_str().unwrap_or_default().trim();
    let text = text.strip_prefix("W/").unwrap_or(text).trim_matches('"');
    text.parse().map(Some).map_err(|_| {
        ApiError::bad_request(
            "invalid_if_match",
            "If-Match must be the version you read (the ETag), e.g. \"3\"",
        )
    })
}

fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("the body is not valid: {e}")))
}

fn versioned(status: StatusCode, value: &impl serde::Serialize, version: u64) -> Response {
    let mut response = (status, axum::Json(value)).into_response();
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{version}\"")) {
        response.headers_mut().insert(header::ETAG, etag);
    }
    response
}

pub(crate) async fn list_environments(
    State(app): State<AppState>,
    manager: Manager,
) -> Result<Response, ApiError> {
    let principal = manager.principal;
    let environments = app.engine.environments(&principal.tenant).await?;
    Ok(axum::Json(json!({ "environments": environments })).into_response())
}

pub(crate) async fn create_environment(
    State(app): State<AppState>,
    manager: Manager,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let principal = manager.principal;
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct NewEnvironment {
        name: String,
    }
    let new: NewEnvironment = body(&bytes)?;
    let name = EnvironmentId::parse(&new.name)
        .map_err(|e| ApiError::bad_request("invalid_environment", e.to_string()))?;
    if principal.environment.is_some() {
        return Err(ApiError::Forbidden(
            "a key limited to one environment cannot create environments".into(),
        ));
    }
    if !app.engine.create_environment(&principal.tenant, &name).await? {
        return Err(ApiError::Conflict(format!("environment `{name}` already exists")));
    }
    Ok((StatusCode::CREATED, axum::Json(json!({ "name": name }))).into_response())
}

pub(crate) async fn list_flags(State(app): State<AppState>, scope: Scoped) -> Result<Response, ApiError> {
    let Scoped { principal, env, .. } = scope;
    let state = app.engine.flags(&principal.tenant, &env).await?;
    Ok(axum::Json(json!({ "flags": state.flags.values().collect::<Vec<_>>() })).into_response())
}

pub(crate) async fn create_flag(
    State(app): State<AppState>,
    scope: Scoped,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let Scoped { principal, env, .. } = scope;
    let new = NewFlag::from_value(body(&bytes)?)
        .map_err(|e| ApiError::bad_request("invalid_json", e.to_string()))?;
    let name = env.to_string();
    let flag = app
        .engine
        .write_flags(&principal.tenant, &env, move |state, now| state.create_flag(&name, new, now))
        .await?;
    Ok(versioned(StatusCode::CREATED, &flag, flag.version))
}

pub(crate) async fn get_flag(
    State(app): State<AppState>,
    Path(key): Path<String>,
    scope: Scoped,
) -> Result<Response, ApiError> {
    let Scoped { principal, env, .. } = scope;
    let state = app.engine.flags(&principal.tenant, &env).await?;
    let flag = state.flags.get(&key).ok_or_else(|| ApiError::Missing(format!("flag `{key}` not found")))?;
    Ok(versioned(StatusCode::OK, flag, flag.version))
}

pub(crate) async fn replace_flag(
    State(app): State<AppState>,
    Path(key): Path<String>,
    scope: Scoped,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let Scoped { principal, env, expected } = scope;
    let spec: FlagSpec = body(&bytes)?;
    let flag = app
        .engine
        .write_flags(&principal.tenant, &env, move |state, now| state.replace_flag(&key, spec, expected, now))
        .await?;
    Ok(versioned(StatusCode::OK, &flag, flag.version))
}

pub(crate) async fn patch_flag(
    State(app): State<AppState>,
    Path(key): Path<String>,
    scope: Scoped,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let Scoped { principal, env, expected } = scope;
    let patch: Value = body(&bytes)?;
    let flag = app
        .engine
        .write_flags(&principal.tenant, &env, move |state, now| state.patch_flag(&key, &patch, expected, now))
        .await?;
    Ok(versioned(StatusCode::OK, &flag, flag.version))
}

pub(crate) async fn delete_flag(
    State(app): State<AppState>,
    Path(key): Path<String>,
    scope: Scoped,
) -> Result<Response, ApiError> {
    let Scoped { principal, env, expected } = scope;
    app.engine
        .write_flags(&principal.tenant, &env, move |state, _| Ok(((), state.delete_flag(&key, expected)?)))
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(crate) async fn add_rule(
    State(app): State<AppState>,
    Path(key): Path<String>,
    scope: Scoped,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let Scoped { principal, env, expected } = scope;
    let rule: Rule = body(&bytes)?;
    let flag = app
        .engine
        .write_flags(&principal.tenant, &env, move |state, now| state.add_rule(&key, rule, expected, now))
        .await?;
    Ok(versioned(StatusCode::CREATED, &flag, flag.version))
}

pub(crate) async fn replace_rule(
    State(app): State<AppState>,
    Path((key, id)): Path<(String, String)>,
    scope: Scoped,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let Scoped { principal, env, expected } = scope;
    let mut rule: Value = body(&bytes)?;
    // The id comes from the path; a body may omit it.
    if let Some(object) = rule.as_object_mut() {
        object.insert("id".into(), Value::String(id.clone()));
    }
    let rule: Rule =
        serde_json::from_value(rule).map_err(|e| ApiError::bad_request("invalid_json", e.to_string()))?;
    let flag = app
        .engine
        .write_flags(&principal.tenant, &env, move |state, now| {
            state.replace_rule(&key, &id, rule, expected, now)
        })
        .await?;
    Ok(versioned(StatusCode::OK, &flag, flag.version))
}

pub(crate) async fn delete_rule(
    State(app): State<AppState>,
    Path((key, id)): Path<(String, String)>,
    scope: Scoped,
) -> Result<Response, ApiError> {
    let Scoped { principal, env, expected } = scope;
    let flag = app
        .engine
        .write_flags(&principal.tenant, &env, move |state, now| state.delete_rule(&key, &id, expected, now))
        .await?;
    Ok(versioned(StatusCode::OK, &flag, flag.version))
}

pub(crate) async fn list_segments(State(app): State<AppState>, scope: Scoped) -> Result<Response, ApiError> {
    let Scoped { principal, env, .. } = scope;
    let state = app.engine.flags(&principal.tenant, &env).await?;
    Ok(axum::Json(json!({ "segments": state.segments.values().collect::<Vec<_>>() })).into_response())
}

pub(crate) async fn create_segment(
    State(app): State<AppState>,
    scope: Scoped,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let Scoped { principal, env, .. } = scope;
    let spec: SegmentSpec = body(&bytes)?;
    let key =
        spec.key.clone().ok_or_else(|| ApiError::bad_request("invalid_json", "a segment needs a `key`"))?;
    let name = env.to_string();
    let segment = app
        .engine
        .write_flags(&principal.tenant, &env, move |state, now| {
            state.put_segment(&name, &key, spec, None, true, now)
        })
        .await?;
    Ok(versioned(StatusCode::CREATED, &segment, segment.version))
}

pub(crate) async fn get_segment(
    State(app): State<AppState>,
    Path(key): Path<String>,
    scope: Scoped,
) -> Result<Response, ApiError> {
    let Scoped { principal, env, .. } = scope;
    let state = app.engine.flags(&principal.tenant, &env).await?;
    let segment =
        state.segments.get(&key).ok_or_else(|| ApiError::Missing(format!("segment `{key}` not found")))?;
    Ok(versioned(StatusCode::OK, segment, segment.version))
}

pub(crate) async fn replace_segment(
    State(app): State<AppState>,
    Path(key): Path<String>,
    scope: Scoped,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let Scoped { principal, env, expected } = scope;
    let spec: SegmentSpec = body(&bytes)?;
    let name = env.to_string();
    let segment = app
        .engine
        .write_flags(&principal.tenant, &env, move |state, now| {
            state.put_segment(&name, &key, spec, expected, false, now)
        })
        .await?;
    Ok(versioned(StatusCode::OK, &segment, segment.version))
}

pub(crate) async fn delete_segment(
    State(app): State<AppState>,
    Path(key): Path<String>,
    scope: Scoped,
) -> Result<Response, ApiError> {
    let Scoped { principal, env, expected } = scope;
    app.engine
        .write_flags(&principal.tenant, &env, move |state, _| Ok(((), state.delete_segment(&key, expected)?)))
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /v1/keys/{id}/rotate` with `{"grace": "10m"}` (optional; default `0s`).
pub(crate) async fn rotate_key(
    State(app): State<AppState>,
    Path(id): Path<String>,
    manager: Manager,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let principal = manager.principal;
    #[derive(serde::Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct RotateBody {
        grace: Option<String>,
    }
    let request: RotateBody = if bytes.is_empty() { RotateBody::default() } else { body(&bytes)? };
    let grace = match request.grace.as_deref() {
        None => std::time::Duration::ZERO,
        Some(text) => humantime::parse_duration(text).map_err(|e| {
            ApiError::bad_request("invalid_grace", format!("`grace` must be a duration like \"10m\": {e}"))
        })?,
    };
    let rotation = app.engine.rotate_key(&principal.tenant, &id, grace).await?;
    // On PostgreSQL every instance (this one included) learns of it through NOTIFY; scheduling
    // here as well is harmless and covers the memory engine.
    app.revocations.revoke_at(&id, rotation.expires, &app.closing);
    let body = json!({"id": rotation.id, "key": rotation.key.expose(), "previousKeyExpiresAt": rotation.expires.rfc3339()});
    Ok((StatusCode::CREATED, axum::Json(body)).into_response())
}

/// A flag-stream reader: JWT (every environment) or an `sdk`/`stream` key (its environment).
async fn reader(
    app: &AppState,
    headers: &HeaderMap,
    raw: Option<&str>,
) -> Result<(Principal, FeedKey, Filter), ApiError> {
    let apikey = query_param(raw, "apikey")?;
    let principal = Authenticated::<StreamFlags>::check(app, headers, apikey.as_deref()).await?.principal;
    let key = FeedKey { tenant: principal.tenant.clone(), feed: Feed::Flags };
    let filter = Filter::Environment(principal.environment.clone());
    Ok((principal, key, filter))
}

/// A flag stream's `Last-Event-ID`, as every stream reads it ([`Resume::from_last_event_id`]).
fn last_event_id(headers: &HeaderMap, ids: Ids) -> Result<Option<Resume>, ApiError> {
    Resume::from_last_event_id(headers, None, ids)
        .map_err(|foreign| ApiError::bad_request("invalid_last_event_id", foreign.message()))
}

/// Opens a flag stream of the reader's environment(s) in one of the three dialects: the same
/// auth, filter and resume for all, only the wire and heartbeat differ.
async fn flag_stream(
    app: &AppState,
    headers: &HeaderMap,
    raw: Option<&str>,
    dialect: Dialect,
) -> Result<Response, ApiError> {
    let (principal, key, filter) = reader(app, headers, raw).await?;
    let ids = if dialect == Dialect::FlagsC { Ids::EpochMillis } else { Ids::Positions };
    let resume = last_event_id(headers, ids)?;
    let (wire, heartbeat) = match (dialect, &resume) {
        (Dialect::FlagsC, Some(Resume::From(Start::Since(at)))) => (Wire::flags_c(at.as_millis()), 2),
        (Dialect::FlagsC, _) => (Wire::flags_c(0), 2),
        (Dialect::FlagsB, _) => (Wire::new(dialect), 1),
        _ => (Wire::new(dialect), 0),
    };
    open_stream(app, &principal, key, filter, resume, wire, app.limits.flags_heartbeat[heartbeat]).await
}

/// `GET /api/v1/stream` (dialect A).
pub(crate) async fn stream_a(
    State(app): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    flag_stream(&app, &headers, raw.as_deref(), Dialect::FlagsA).await
}

/// `GET /stream` (dialect B).
pub(crate) async fn stream_b(
    State(app): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    flag_stream(&app, &headers, raw.as_deref(), Dialect::FlagsB).await
}

/// `GET /api/v1/flags/events` (dialect C: ids are epoch milliseconds).
pub(crate) async fn stream_c(
    State(app): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    flag_stream(&app, &headers, raw.as_deref(), Dialect::FlagsC).await
}
