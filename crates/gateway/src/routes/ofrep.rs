//! The OpenFeature Remote Evaluation Protocol (OFREP): single and bulk evaluation, the bulk
//! ETag, per-key rate limits, and the SSE change notifications of the protocol's event-stream
//! decision (`eventStreams` in the bulk response; `refetchEvaluation` events).

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use changegate_core::event::Dialect;
use changegate_core::{EnvironmentId, Feed, FeedKey, Filter, Principal, Role};
use changegate_flags::Environment as FlagEnvironment;
use changegate_flags::eval::{EvalError, Resolution, evaluate};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::auth::{Authenticated, Permission, ReadFlags, StreamFlags};
use crate::error::ApiError;
use crate::query::Query;
use crate::state::AppState;
use crate::stream::sse::Wire;
use crate::stream::{Ids, Resume, open_stream};

/// How long an idle client may keep the notification stream (advertised as
/// `inactivityDelaySec`).
const INACTIVITY_DELAY_SEC: u64 = 120;

/// An OFREP error body, in the protocol's shape, with its status.
fn failure(status: StatusCode, key: Option<&str>, code: &str, details: &str) -> Response {
    let mut body = Map::new();
    if let Some(key) = key {
        body.insert("key".into(), json!(key));
    }
    body.insert("errorCode".into(), json!(code));
    body.insert("errorDetails".into(), json!(details));
    (status, axum::Json(Value::Object(body))).into_response()
}

fn success(key: &str, resolution: Resolution) -> Value {
    json!({
        "key": key,
        "value": resolution.value,
        "reason": resolution.reason.as_str(),
        "variant": resolution.variant,
        "metadata": {},
    })
}

/// Authenticates an evaluation (JWT or `sdk`/`stream`/`service` key), applies the rate limit,
/// and finds the environment: the key's own, or `?environment=`.
async fn caller<P: Permission>(
    app: &AppState,
    headers: &HeaderMap,
    raw: Option<&str>,
) -> Result<(Principal, EnvironmentId), Response> {
    // A malformed query is answered in the protocol's shape, like the rest of its 400s.
    let bad_query = |e: ApiError| failure(StatusCode::BAD_REQUEST, None, "GENERAL", &e.to_string());
    let query = Query::parse(raw).map_err(bad_query)?;
    let read = |name: &str| query.get(name).map(|v| v.map(str::to_owned));
    let (apikey, asked) = match (read("apikey"), read("environment")) {
        (Ok(apikey), Ok(asked)) => (apikey, asked),
        (Err(e), _) | (_, Err(e)) => return Err(bad_query(e)),
    };
    let principal = Authenticated::<P>::check(app, headers, apikey.as_deref())
        .await
        .map_err(IntoResponse::into_response)?
        .principal;
    let who = principal.key_id.clone().unwrap_or_else(|| format!("jwt:{}", principal.tenant));
    if let Err(wait) = app.ofrep_rate.check(&who) {
        let seconds = wait.as_secs() + 1;
        let mut response = failure(StatusCode::TOO_MANY_REQUESTS, None, "GENERAL", "rate limit reached");
        if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        return Err(response);
    }
    let environment = match (&principal.environment, asked) {
        (Some(own), _) => own.clone(),
        (None, Some(asked)) => EnvironmentId::parse(&asked)
            .map_err(|e| failure(StatusCode::BAD_REQUEST, None, "GENERAL", &e.to_string()))?,
        (None, None) => {
            return Err(failure(
                StatusCode::BAD_REQUEST,
                None,
                "GENERAL",
                "this credential is not bound to an environment: add `?environment=`",
            ));
        }
    };
    Ok((principal, environment))
}

/// The evaluation context of a request body (`{"context": {...}}`; an empty body is an empty
/// context). `Err` is the OFREP error code and details.
fn context(bytes: &Bytes) -> Result<Map<String, Value>, (&'static str, String)> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    let body: Value =
        serde_json::from_slice(bytes).map_err(|e| ("PARSE_ERROR", format!("the body is not JSON: {e}")))?;
    let Value::Object(body) = body else {
        return Err(("PARSE_ERROR", "the body must be a JSON object `{\"context\": {…}}`".to_owned()));
    };
    // As the protocol's schema says: an object, or absent — `null` is neither.
    match body.get("context") {
        None => Ok(Map::new()),
        Some(Value::Object(context)) => Ok(context.clone()),
        Some(_) => Err(("INVALID_CONTEXT", "`context` must be an object".to_owned())),
    }
}

/// What both evaluation routes start with: the caller, its context, and its environment's
/// flags — or the protocol-shaped error response (naming `key` when there is one).
async fn load(
    app: &AppState,
    headers: &HeaderMap,
    raw: Option<&str>,
    bytes: &Bytes,
    key: Option<&str>,
) -> Result<(Principal, EnvironmentId, Map<String, Value>, FlagEnvironment), Response> {
    let (principal, environment) = caller::<ReadFlags>(app, headers, raw).await?;
    let context =
        context(bytes).map_err(|(code, details)| failure(StatusCode::BAD_REQUEST, key, code, &details))?;
    let state =
        app.engine.flags(&principal.tenant, &environment).await.map_err(|error| match (error, key) {
            (ApiError::Missing(details), Some(_)) => {
                failure(StatusCode::NOT_FOUND, key, "FLAG_NOT_FOUND", &details)
            }
            (ApiError::Missing(details), None) => failure(StatusCode::BAD_REQUEST, None, "GENERAL", &details),
            // Our messages for these are safe (internal details are logged, not in the text).
            (error, _) => failure(error.status(), None, "GENERAL", &error.to_string()),
        })?;
    Ok((principal, environment, context, state))
}

/// `POST /ofrep/v1/evaluate/flags/{key}`.
pub(crate) async fn evaluate_one(
    State(app): State<AppState>,
    Path(key): Path<String>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    bytes: Bytes,
) -> Response {
    let (_, _, context, state) = match load(&app, &headers, raw.as_deref(), &bytes, Some(&key)).await {
        Ok(loaded) => loaded,
        Err(response) => return response,
    };
    let Some(flag) = state.flags.get(&key) else {
        return failure(
            StatusCode::NOT_FOUND,
            Some(&key),
            "FLAG_NOT_FOUND",
            &format!("flag `{key}` not found"),
        );
    };
    match evaluate(flag, &state.segments, &context) {
        Ok(resolution) => axum::Json(success(&key, resolution)).into_response(),
        Err(EvalError::TargetingKeyMissing) => failure(
            StatusCode::BAD_REQUEST,
            Some(&key),
            "TARGETING_KEY_MISSING",
            "a percentage rollout needs `targetingKey` in the context",
        ),
    }
}

/// `POST /ofrep/v1/evaluate/flags`: every flag of the environment, an `ETag` over the results,
/// `304` for a matching `If-None-Match`, and the change-notification stream in `eventStreams`.
pub(crate) async fn evaluate_bulk(
    State(app): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    bytes: Bytes,
) -> Response {
    let (principal, environment, context, state) =
        match load(&app, &headers, raw.as_deref(), &bytes, None).await {
            Ok(loaded) => loaded,
            Err(response) => return response,
        };
    let flags: Vec<Value> = state
        .flags
        .values()
        .map(|flag| match evaluate(flag, &state.segments, &context) {
            Ok(resolution) => success(&flag.key, resolution),
            Err(EvalError::TargetingKeyMissing) => json!({
                "key": flag.key,
                "errorCode": "TARGETING_KEY_MISSING",
                "errorDetails": "a percentage rollout needs `targetingKey` in the context",
            }),
        })
        .collect();
    let digest = Sha256::digest(Value::Array(flags.clone()).to_string().as_bytes());
    let etag = format!("\"{}\"", digest[..12].iter().map(|b| format!("{b:02x}")).collect::<String>());
    let etag_value = HeaderValue::from_str(&etag).unwrap_or(HeaderValue::from_static("\"\""));
    let unchanged = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|list| list.split(',').any(|tag| tag.trim().trim_start_matches("W/") == etag));
    if unchanged {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag_value)]).into_response();
    }
    let mut body = json!({ "flags": flags });
    if let Some(url) = event_stream_url(&headers, &principal, &environment) {
        body["eventStreams"] =
            json!([{ "type": "sse", "url": url, "inactivityDelaySec": INACTIVITY_DELAY_SEC }]);
    }
    (StatusCode::OK, [(header::ETAG, etag_value)], axum::Json(body)).into_response()
}

/// Where a client listens for changes: this gateway's `/ofrep/v1/events`, with the caller's key
/// in the URL when it is a read-only key (browsers' `EventSource` cannot send headers). A JWT
/// or a privileged key never goes into a URL, so those callers get no stream and keep polling.
fn event_stream_url(
    headers: &HeaderMap,
    principal: &Principal,
    environment: &EnvironmentId,
) -> Option<String> {
    let Role::Key(scope) = principal.role else { return None };
    if !scope.is_read_only() {
        return None;
    }
    let key = ["x-api-key", "apikey", "authorization"]
        .iter()
        .filter_map(|name| headers.get(*name)?.to_str().ok())
        .map(|v| v.strip_prefix("Bearer ").unwrap_or(v).trim())
        .find(|v| v.starts_with("flc_"))?;
    let host = headers.get(header::HOST)?.to_str().ok()?;
    let scheme = headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()).unwrap_or("http");
    let query = serde_urlencoded::to_string([("apikey", key), ("environment", environment.as_str())]).ok()?;
    Some(format!("{scheme}://{host}/ofrep/v1/events?{query}"))
}

/// `GET /ofrep/v1/events`: `data: {"type":"refetchEvaluation","etag":"…","lastModified":…}` with
/// `id:` whenever a flag, rule or segment of the environment changes; bursts coalesced.
pub(crate) async fn events(
    State(app): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let (principal, environment) = match caller::<StreamFlags>(&app, &headers, raw.as_deref()).await {
        Ok(found) => found,
        Err(response) => return Ok(response),
    };
    let key = FeedKey { tenant: principal.tenant.clone(), feed: Feed::Flags };
    let filter = Filter::Environment(Some(environment));
    // Every answer of the OFREP routes is in the protocol's error shape.
    let resume = match Resume::from_last_event_id(&headers, None, Ids::Positions) {
        Ok(resume) => resume,
        Err(foreign) => return Ok(failure(StatusCode::BAD_REQUEST, None, "GENERAL", foreign.message())),
    };
    open_stream(
        &app,
        &principal,
        key,
        filter,
        resume,
        Wire::new(Dialect::Ofrep),
        app.limits.flags_heartbeat[0],
    )
    .await
}
