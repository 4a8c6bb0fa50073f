//! The HTTP routes, one module per area, and what every route shares: the route table, CORS,
//! JSON error bodies for framework rejections, the access log, and the JSON fallbacks.
//!
//! Nothing outside this module imports it but the crate root, which builds the router; a
//! route reaches streams through [`crate::stream`] and callers through [`crate::auth`].

mod events;
mod featureflip;
mod flags;
mod ofrep;
mod ops;
mod togul;

use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde_json::json;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::error::ApiError;
use crate::state::AppState;

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
    "/v1/events/subscribe" => get(events::subscribe),
    "/v1/events/publish" => post(events::publish),
    "/healthz" => get(ops::healthz),
    "/readyz" => get(ops::readyz),
    "/metrics" => get(ops::metrics_text),
    "/console" => get(ops::console),
    "/openapi.json" => get(ops::openapi),
    "/v1/environments" => get(flags::list_environments).post(flags::create_environment),
    "/v1/flags" => get(flags::list_flags).post(flags::create_flag),
    "/v1/flags/{key}" => get(flags::get_flag).put(flags::replace_flag).patch(flags::patch_flag).delete(flags::delete_flag),
    "/v1/flags/{key}/rules" => post(flags::add_rule),
    "/v1/flags/{key}/rules/{id}" => put(flags::replace_rule).delete(flags::delete_rule),
    "/v1/segments" => get(flags::list_segments).post(flags::create_segment),
    "/v1/segments/{key}" => get(flags::get_segment).put(flags::replace_segment).delete(flags::delete_segment),
    "/v1/keys/{id}/rotate" => post(flags::rotate_key),
    "/api/v1/stream" => get(flags::stream_a),
    "/stream" => get(flags::stream_b),
    "/api/v1/flags/events" => get(flags::stream_c),
    "/ofrep/v1/evaluate/flags/{key}" => post(ofrep::evaluate_one),
    "/ofrep/v1/evaluate/flags" => post(ofrep::evaluate_bulk),
    "/ofrep/v1/events" => get(ofrep::events),
    "/api/v1/evaluate" => post(togul::evaluate),
    "/v1/sdk/flags" => get(featureflip::flags),
    "/v1/sdk/flags/{key}" => get(featureflip::flag),
    "/v1/sdk/stream" => get(featureflip::stream),
    "/v1/sdk/events" => post(featureflip::events),
}

/// The OpenAPI 3.1 document of every route.
pub const OPENAPI: &str = include_str!("../../static/openapi.json");

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
///
/// A `413` also says `Connection: close`: the rest of that body was never read, so the server
/// closes the connection after the answer, and a client that pooled it would send its next
/// request into a closed socket.
async fn json_errors(request: Request, next: Next, max_json_body: usize) -> Response {
    let mut response = error_body(request, next, max_json_body).await;
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

async fn error_body(request: Request, next: Next, max_json_body: usize) -> Response {
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
        return togul::error(status, "invalid_request", &message);
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

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

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
}
