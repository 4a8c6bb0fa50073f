//! The HTTP routes: subscribe (SSE), publish, health and readiness, and JSON fallbacks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::mongo::{MongoSource, ResumeToken};
use axum::Router;
use axum::body::Body;
use axum::extract::{RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use changegate_core::auth::Action;
use changegate_core::{
    CollectionName, Feed, FeedKey, Filter, PAGE, Position, Replay, Start, Topic, TopicPattern,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::auth::{QueryKey, authenticate};
use crate::engine::Engine;
use crate::error::ApiError;
use crate::flag_routes as fr;
use crate::jwt::JwtVerifier;
use crate::query::Query;
use crate::sse;

/// Tunables the routes read.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Heartbeat comment interval on realtime streams.
    pub heartbeat: Duration,
    /// Reconnect delay announced with `retry:`.
    pub retry: Duration,
    /// Largest accepted publish body, in bytes.
    pub max_body: usize,
    /// Heartbeat intervals of the flag dialects A, B and C.
    pub flags_heartbeat: [Duration; 3],
    /// Origins browsers may call from (`*`: any).
    pub cors_origins: Vec<String>,
    /// Label stream metrics with the tenant (opt-in: one series per tenant).
    pub metrics_tenants: bool,
    /// Longest catch-up served: a client further behind gets `reset` instead.
    pub replay_max: u64,
    /// Largest accepted JSON body on every route but publish (flags, segments, OFREP), in bytes.
    pub max_json_body: usize,
    /// When set, `/metrics` answers only `Authorization: Bearer <this token>`.
    pub metrics_token: Option<String>,
}

/// Shared state of every route.
#[derive(Clone, Debug)]
pub struct AppState {
    /// Storage and fan-out.
    pub engine: Arc<Engine>,
    /// JWT verification, if a secret is configured.
    pub jwt: Option<JwtVerifier>,
    /// Route tunables.
    pub limits: Limits,
    /// Cancelled when the gateway shuts down: every stream then ends with a `retry:` hint.
    pub closing: CancellationToken,
    /// Streams by key, to close them when their key is revoked.
    pub revocations: Revocations,
    /// Per-key request budget of the OFREP evaluation routes.
    pub ofrep_rate: crate::ofrep::RateLimiter,
    /// The MongoDB source, when `MONGODB_URL` is configured.
    pub mongo: Option<Arc<MongoSource>>,
    /// The Prometheus recorder's handle, when one is installed (the binary installs one).
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

/// One cancellation token per key with open streams: revoking the key cancels them all.
#[derive(Clone, Debug, Default)]
pub struct Revocations {
    tokens: Arc<Mutex<HashMap<String, CancellationToken>>>,
}

impl Revocations {
    /// The token a new stream of `key_id` is closed with (a child of `closing`).
    pub fn token(&self, key_id: Option<&str>, closing: &CancellationToken) -> CancellationToken {
        let Some(key_id) = key_id else { return closing.child_token() };
        let mut tokens = self.tokens.lock().unwrap_or_else(PoisonError::into_inner);
        tokens.retain(|_, token| !token.is_cancelled());
        tokens.entry(key_id.to_owned()).or_insert_with(|| closing.child_token()).child_token()
    }

    /// Closes every stream opened with a key (they reconnect and authenticate again).
    pub fn revoke_all(&self) {
        let tokens = std::mem::take(&mut *self.tokens.lock().unwrap_or_else(PoisonError::into_inner));
        tokens.values().for_each(CancellationToken::cancel);
    }

    /// Closes every open stream of `key_id` at `at` (now, if that has passed), unless the
    /// gateway shuts down first.
    pub fn revoke_at(&self, key_id: &str, at: changegate_core::Timestamp, closing: &CancellationToken) {
        let wait = at.as_millis().saturating_sub(changegate_core::Timestamp::now().as_millis());
        let (revocations, key_id, closing) = (self.clone(), key_id.to_owned(), closing.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = closing.cancelled() => {}
                () = tokio::time::sleep(Duration::from_millis(wait)) => revocations.revoke(&key_id),
            }
        });
    }

    /// Closes every open stream of `key_id`.
    pub fn revoke(&self, key_id: &str) {
        let token = self.tokens.lock().unwrap_or_else(PoisonError::into_inner).remove(key_id);
        if let Some(token) = token {
            tracing::info!(key_id, "key revoked: closing its streams");
            token.cancel();
        }
    }
}

/// CORS for browsers on other origins: the SSE routes, publish and the flag API. Credentials
/// travel in headers or `?apikey=`, never cookies, so no `Allow-Credentials`.
fn cors(origins: &[String]) -> CorsLayer {
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE])
        .allow_headers([
            HeaderName::from_static("apikey"),
            HeaderName::from_static("x-api-key"),
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("last-event-id"),
            header::IF_MATCH,
            // The OpenFeature web provider re-evaluates conditionally once it holds an ETag.
            header::IF_NONE_MATCH,
            // EventSource polyfills send these.
            header::CACHE_CONTROL,
            HeaderName::from_static("x-requested-with"),
        ])
        .expose_headers([header::ETAG])
        .max_age(Duration::from_secs(600))
}

/// Prometheus text exposition; with `--metrics-token`, only for `Authorization: Bearer <token>`
/// (compared in constant time).
async fn metrics_text(State(app): State<AppState>, headers: HeaderMap) -> Response {
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
async fn console() -> Response {
    let mut response = axum::response::Html(include_str!("../static/console.html")).into_response();
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src *",
        ),
    );
    response
}

/// Declares every route once: the router is built from this list, and [`PATHS`] (checked
/// against the OpenAPI document in a test) is the same list.
macro_rules! api {
    ($($path:literal => $route:expr,)*) => {
        /// Every path the router serves.
        pub const PATHS: &[&str] = &[$($path),*];

        fn api() -> Router<AppState> {
            Router::new()$(.route($path, $route))*
        }
    };
}

api! {
    "/v1/events/subscribe" => get(subscribe),
    "/v1/events/publish" => post(publish),
    "/healthz" => get(healthz),
    "/readyz" => get(readyz),
    "/metrics" => get(metrics_text),
    "/console" => get(console),
    "/openapi.json" => get(openapi),
    "/v1/environments" => get(fr::list_environments).post(fr::create_environment),
    "/v1/flags" => get(fr::list_flags).post(fr::create_flag),
    "/v1/flags/{key}" => get(fr::get_flag).put(fr::replace_flag).patch(fr::patch_flag).delete(fr::delete_flag),
    "/v1/flags/{key}/rules" => post(fr::add_rule),
    "/v1/flags/{key}/rules/{id}" => put(fr::replace_rule).delete(fr::delete_rule),
    "/v1/segments" => get(fr::list_segments).post(fr::create_segment),
    "/v1/segments/{key}" => get(fr::get_segment).put(fr::replace_segment).delete(fr::delete_segment),
    "/v1/keys/{id}/rotate" => post(fr::rotate_key),
    "/api/v1/stream" => get(fr::stream_a),
    "/stream" => get(fr::stream_b),
    "/api/v1/flags/events" => get(fr::stream_c),
    "/ofrep/v1/evaluate/flags/{key}" => post(crate::ofrep::evaluate_one),
    "/ofrep/v1/evaluate/flags" => post(crate::ofrep::evaluate_bulk),
    "/ofrep/v1/events" => get(crate::ofrep::events),
    "/api/v1/evaluate" => post(crate::togul::evaluate),
    "/v1/sdk/flags" => get(crate::featureflip::flags),
    "/v1/sdk/flags/{key}" => get(crate::featureflip::flag),
    "/v1/sdk/stream" => get(crate::featureflip::stream),
    "/v1/sdk/events" => post(crate::featureflip::events),
}

/// The OpenAPI 3.1 document of every route.
pub const OPENAPI: &str = include_str!("../static/openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// The full router.
pub fn router(state: AppState) -> Router {
    let cors = cors(&state.limits.cors_origins);
    let max_json_body = state.limits.max_json_body;
    api()
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Publish reads its body itself, against `--max-body`; every other JSON body is held
        // to this one (the framework's default would be 2 MB).
        .layer(axum::extract::DefaultBodyLimit::max(state.limits.max_json_body))
        .layer(middleware::from_fn(move |request, next| json_errors(request, next, max_json_body)))
        .layer(cors)
        .layer(middleware::from_fn(access_log))
        .with_state(state)
}

/// The one place framework rejections (a path parameter that is not UTF-8, a body over the
/// limit, a missing or wrong content type, an unreadable body) become our error shape: every
/// error response is `{"error":{"code","message"}}`, whoever produced it.
async fn json_errors(request: Request, next: Next, max_json_body: usize) -> Response {
    // Togul's SDK reads its errors as top-level `{"code","message"}`.
    let togul = request.uri().path() == "/api/v1/evaluate";
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    // The framework's texts are short and name the problem (never a credential).
    let text = match axum::body::to_bytes(response.into_body(), 4096).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().chars().take(300).collect::<String>(),
        Err(_) => String::new(),
    };
    if togul {
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(max_json_body).to_string()
        } else {
            text
        };
        return crate::togul::error(status, "invalid_request", &message);
    }
    let error = match status {
        StatusCode::PAYLOAD_TOO_LARGE => return ApiError::PayloadTooLarge(max_json_body).into_response(),
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid_json",
        s if s.is_server_error() => "internal",
        _ => "invalid_request",
    };
    let message =
        if text.is_empty() { status.canonical_reason().unwrap_or("error").to_owned() } else { text };
    (status, axum::Json(json!({"error": {"code": error, "message": message}}))).into_response()
}

/// One line per request: method, path (never the query string, which may hold a key), status,
/// time to the response head, and the tenant the request authenticated as (`-` if none) —
/// on every route, whichever way it authenticated (see [`crate::auth::logging_tenant`]).
async fn access_log(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let started = Instant::now();
    let (response, tenant) = crate::auth::logging_tenant(next.run(request)).await;
    tracing::info!(
        target: "changegate::access",
        %method,
        path,
        status = response.status().as_u16(),
        ms = started.elapsed().as_millis() as u64,
        tenant = tenant.as_ref().map_or("-", |t| t.as_str()),
    );
    response
}

async fn not_found(request: Request) -> ApiError {
    ApiError::NotFound(request.uri().path().chars().take(200).collect())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

async fn healthz() -> impl IntoResponse {
    axum::Json(json!({ "status": "ok" }))
}

async fn readyz(State(app): State<AppState>) -> Response {
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

/// The query of `/v1/events/subscribe`, read by the one policy of [`crate::query`].
#[derive(Default, Debug)]
struct SubscribeQuery {
    topic: Option<String>,
    collection: Option<String>,
    source: Option<String>,
    apikey: Option<String>,
    last_event_id: Option<String>,
}

impl SubscribeQuery {
    fn parse(raw: Option<&str>) -> Result<Self, ApiError> {
        let query = Query::parse(raw)?;
        let get = |name| query.get(name).map(|v| v.map(str::to_owned));
        Ok(Self {
            topic: get("topic")?,
            collection: get("collection")?,
            source: get("source")?,
            apikey: get("apikey")?,
            last_event_id: get("lastEventId")?,
        })
    }
}

fn invalid_last_event_id() -> ApiError {
    ApiError::bad_request("invalid_last_event_id", ForeignId(Ids::PositionsOrTokens).message())
}

async fn subscribe(
    State(app): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let query = SubscribeQuery::parse(raw.as_deref())?;
    let principal = authenticate(
        &app.engine,
        app.jwt.as_ref(),
        &headers,
        query.apikey.as_deref(),
        QueryKey::Allowed,
        Action::Subscribe,
    )
    .await?;
    let (feed, filter) = match (&query.topic, &query.collection) {
        (Some(topic), None) => {
            let pattern = TopicPattern::parse(topic)
                .map_err(|e| ApiError::bad_request("invalid_topic", e.to_string()))?;
            (Feed::Messages, Filter::Topics(pattern))
        }
        (None, Some(collection)) => {
            let name = CollectionName::parse(collection)
                .map_err(|e| ApiError::bad_request("invalid_collection", e.to_string()))?;
            let use_mongo = match query.source.as_deref() {
                Some("mongo") => true,
                Some("postgres") => false,
                Some(_) => {
                    return Err(ApiError::bad_request(
                        "invalid_source",
                        "`source` must be `postgres` or `mongo`",
                    ));
                }
                // Postgres when it is configured, else MongoDB when it is.
                None => !matches!(*app.engine, Engine::Postgres(_)) && app.mongo.is_some(),
            };
            if use_mongo {
                crate::mongo::check_collection(&name)?;
                (Feed::Collection { source: changegate_core::SourceKind::Mongo, name }, Filter::Everything)
            } else {
                let key =
                    app.engine.collection_feed(principal.tenant.clone(), &name, Some("postgres")).await?;
                (key.feed, Filter::Everything)
            }
        }
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                "give either `topic` or `collection`, not both",
            ));
        }
        (None, None) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                "say what to subscribe to: `?topic=order.created`, `?topic=order.*` or `?collection=todos`",
            ));
        }
    };
    let key = FeedKey { tenant: principal.tenant.clone(), feed };
    let resume = Resume::from_last_event_id(&headers, query.last_event_id.as_deref(), Ids::PositionsOrTokens)
        .map_err(|_| invalid_last_event_id())?;
    open_stream(&app, &principal, key, filter, resume, sse::Wire::Realtime, app.limits.heartbeat).await
}

/// Where a stream starts.
pub enum Resume {
    /// After this position (`Last-Event-ID`).
    After(Position),
    /// At this time, in epoch milliseconds (dialect C's ids); replayed events may repeat the
    /// one the client saw last.
    Since(u64),
    /// After this MongoDB resume token.
    Token(ResumeToken),
    /// From now, after a snapshot of the state: the future is awaited only once the stream
    /// is subscribed, so every change is in the snapshot, the live stream, or both.
    Snapshot(futures_util::future::BoxFuture<'static, Result<axum::body::Bytes, ApiError>>),
}

/// The ids a stream sends, so the `Last-Event-ID`s it takes back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ids {
    /// Positions (`<epoch>-<seq>`).
    Positions,
    /// Positions, or MongoDB resume tokens (`m.…`).
    PositionsOrTokens,
    /// Epoch milliseconds (dialect C).
    EpochMillis,
}

/// A `Last-Event-ID` that is not an id of the stream's kind (or not text).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForeignId(pub Ids);

impl ForeignId {
    /// What the client is told (each dialect puts it in its own error shape).
    pub const fn message(self) -> &'static str {
        match self.0 {
            Ids::EpochMillis => "Last-Event-ID must be the epoch-millisecond id of an event",
            Ids::Positions | Ids::PositionsOrTokens => {
                "Last-Event-ID is not an id this service sent; reconnect without it to start live"
            }
        }
    }
}

impl Resume {
    /// The one reading of `Last-Event-ID`, for every stream: the header, else `query` (the
    /// `lastEventId` parameter, where a route takes one); absent or blank starts live; anything
    /// else must be an id of the stream's kind.
    pub fn from_last_event_id(
        headers: &HeaderMap,
        query: Option<&str>,
        ids: Ids,
    ) -> Result<Option<Self>, ForeignId> {
        let header = match headers.get("last-event-id") {
            Some(value) => Some(value.to_str().map_err(|_| ForeignId(ids))?),
            None => None,
        };
        let text = match header.or(query).map(str::trim) {
            None | Some("") => return Ok(None),
            Some(text) => text,
        };
        let resume = match ids {
            Ids::PositionsOrTokens if text.starts_with("m.") => {
                ResumeToken::decode(text).map(Self::Token).ok()
            }
            Ids::Positions | Ids::PositionsOrTokens => text.parse().map(Self::After).ok(),
            Ids::EpochMillis => text.parse().map(Self::Since).ok(),
        };
        resume.map(Some).ok_or(ForeignId(ids))
    }
}

/// Subscribes, replays what the client missed, and streams the rest in `wire`'s dialect.
pub async fn open_stream(
    app: &AppState,
    principal: &changegate_core::Principal,
    key: FeedKey,
    filter: Filter,
    resume: Option<Resume>,
    wire: sse::Wire,
    heartbeat: Duration,
) -> Result<Response, ApiError> {
    let mongo = match (&key.feed, &app.mongo) {
        (Feed::Collection { source: changegate_core::SourceKind::Mongo, .. }, Some(mongo)) => {
            Some(mongo.clone())
        }
        (Feed::Collection { source: changegate_core::SourceKind::Mongo, .. }, None) => {
            return Err(ApiError::SourceNotConfigured("MongoDB collections need MONGODB_URL".into()));
        }
        _ => None,
    };
    let hub = mongo.as_deref().map_or_else(|| app.engine.hub(), crate::mongo::hub);
    // Subscribe before reading the log: every event is then in the replay, the live stream,
    // or both (and the duplicates are skipped by position).
    let subscription = hub.subscribe(key.clone(), filter.clone()).await.map_err(|e| {
        // The reason may hold database or driver text: logged, not sent.
        tracing::warn!(tenant = %key.tenant, error = %e, "could not open an upstream");
        ApiError::Unavailable("the event source is unavailable; retry shortly".into())
    })?;
    let mut prelude = vec![sse::hello(app.limits.retry)];
    let mut after = None;
    let mut backlog = None;
    let mut labels = vec![("route", wire.route().to_owned())];
    if app.limits.metrics_tenants {
        labels.push(("tenant", key.tenant.to_string()));
    }
    let cap = app.limits.replay_max;
    match resume {
        None => {}
        Some(Resume::Snapshot(snapshot)) => prelude.push(snapshot.await?),
        // A MongoDB change stream is its own log: catch up from the token with a stream of
        // its own; live events up to the last caught-up one are then skipped.
        Some(Resume::Token(token)) => match mongo.as_ref() {
            Some(mongo) => backlog = Some(crate::mongo::backlog(mongo, &key, &token, cap).await?),
            None => return Err(invalid_last_event_id()),
        },
        Some(Resume::After(_)) if mongo.is_some() => {
            // Not a token: nothing to resume from on a MongoDB collection.
            metrics::counter!("changegate_resets_total", &labels).increment(1);
            prelude.push(crate::mongo::expired());
        }
        Some(Resume::After(position)) => {
            if app.engine.backlog_exceeds(&key, position, cap).await? {
                metrics::counter!("changegate_resets_total", &labels).increment(1);
                let head = app.engine.head(&key).await?;
                prelude.push(sse::reset(head));
                after = Some(head);
            } else {
                after = Some(position);
                backlog = Some(logged_backlog(app, &key, &filter, Start::After(position)));
            }
        }
        Some(Resume::Since(ms)) => {
            let since = changegate_core::Timestamp::from_millis(ms);
            backlog = Some(logged_backlog(app, &key, &filter, Start::Since(since)));
        }
    }
    let tenant = key.tenant.clone();
    Ok(sse::response(sse::Connection {
        prelude,
        backlog,
        subscription,
        after,
        heartbeat,
        retry: app.limits.retry,
        closing: app.revocations.token(principal.key_id.as_deref(), &app.closing),
        wire,
        labels,
        tenant,
    }))
}

/// The catch-up of a logged feed (memory or PostgreSQL), one keyset page at a time.
fn logged_backlog(app: &AppState, key: &FeedKey, filter: &Filter, start: Start) -> sse::Backlog {
    let (engine, key, filter) = (app.engine.clone(), key.clone(), filter.clone());
    Box::pin(futures_util::stream::unfold(Some(start), move |start| {
        let (engine, key, filter) = (engine.clone(), key.clone(), filter.clone());
        async move {
            let caught = match engine.replay(&key, &filter, start?, PAGE).await {
                Ok(Replay::Page { frames, next }) => {
                    return Some((sse::Caught::Page(frames), next.map(Start::After)));
                }
                // Retention passed the client (before or during its catch-up).
                Ok(Replay::Reset) => match engine.head(&key).await {
                    Ok(head) => sse::Caught::Reset { bytes: sse::reset(head), after: Some(head) },
                    Err(_) => sse::Caught::Failed,
                },
                Err(_) => sse::Caught::Failed,
            };
            Some((caught, None))
        }
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    topic: String,
    data: Value,
}

async fn publish(
    State(app): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    body: Body,
) -> Result<Response, ApiError> {
    let query = Query::parse(raw.as_deref())?;
    let principal = authenticate(
        &app.engine,
        app.jwt.as_ref(),
        &headers,
        query.get("apikey")?,
        QueryKey::Refused,
        Action::Publish,
    )
    .await?;
    let max = app.limits.max_body;
    let bytes = axum::body::to_bytes(body, max).await.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
            || e.into_inner().is::<http_body_util::LengthLimitError>();
        if too_large {
            ApiError::PayloadTooLarge(max)
        } else {
            ApiError::bad_request("invalid_body", "the request body could not be read")
        }
    })?;
    let body: PublishBody = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::bad_request(
            "invalid_json",
            format!("the body must be JSON `{{\"topic\": \"…\", \"data\": …}}`: {e}"),
        )
    })?;
    let topic =
        Topic::parse(&body.topic).map_err(|e| ApiError::bad_request("invalid_topic", e.to_string()))?;
    let started = Instant::now();
    let position = app.engine.publish(&principal.tenant, topic, body.data).await?;
    metrics::histogram!("changegate_publish_seconds").record(started.elapsed().as_secs_f64());
    let response = (StatusCode::ACCEPTED, axum::Json(json!({ "id": position.to_string() }))).into_response();
    Ok(response)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn any_query_string_parses_or_is_refused_without_panicking(raw in "\\PC{0,200}") {
            let _ = SubscribeQuery::parse(Some(&raw));
        }

        #[test]
        fn any_publish_body_parses_or_is_refused_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(body) = serde_json::from_slice::<PublishBody>(&bytes) {
                let _ = Topic::parse(&body.topic);
            }
        }
    }

    #[test]
    fn the_openapi_document_lists_exactly_the_routed_paths() {
        let doc: Value = serde_json::from_str(OPENAPI).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        let mut documented: Vec<&str> =
            doc["paths"].as_object().unwrap().keys().map(String::as_str).collect();
        let mut routed = PATHS.to_vec();
        documented.sort_unstable();
        routed.sort_unstable();
        assert_eq!(documented, routed);
    }

    #[test]
    fn every_stream_reads_last_event_id_one_way() {
        let with = |value: &[u8]| {
            let mut headers = HeaderMap::new();
            headers.insert("last-event-id", HeaderValue::from_bytes(value).unwrap());
            headers
        };
        let none = HeaderMap::new();
        let read = |headers: &HeaderMap, query, ids| Resume::from_last_event_id(headers, query, ids);
        // Absent or blank: live.
        assert!(matches!(read(&none, None, Ids::Positions), Ok(None)));
        assert!(matches!(read(&with(b"  "), None, Ids::EpochMillis), Ok(None)));
        // Each kind takes its own ids, the header before the query parameter.
        let position = "0000abcd-42";
        assert!(matches!(read(&with(position.as_bytes()), None, Ids::Positions), Ok(Some(Resume::After(_)))));
        assert!(matches!(read(&none, Some(position), Ids::PositionsOrTokens), Ok(Some(Resume::After(_)))));
        assert!(matches!(
            read(&with(b"1705844445123"), None, Ids::EpochMillis),
            Ok(Some(Resume::Since(1_705_844_445_123)))
        ));
        assert!(matches!(read(&with(b"7"), Some("garbage"), Ids::EpochMillis), Ok(Some(Resume::Since(7)))));
        // Anything else — another kind's id, garbage, bytes that are not text — is refused.
        for (headers, ids) in [
            (with(b"1705844445123"), Ids::Positions),
            (with(position.as_bytes()), Ids::EpochMillis),
            (with(b"m.not-a-token"), Ids::PositionsOrTokens),
            (with(b"m.whatever"), Ids::Positions),
            (with(b"\xff\xfe"), Ids::Positions),
        ] {
            assert_eq!(read(&headers, None, ids).err(), Some(ForeignId(ids)));
        }
    }
}
