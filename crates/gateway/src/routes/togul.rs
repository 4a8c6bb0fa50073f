//! Togul's evaluate API, `POST /api/v1/evaluate`, as its published SDK (PyPI `togul` 0.2) calls
//! it: `X-API-Key`, a body `{"flag_key","environment_key","context":{…}}`, and an answer
//! `{"flag_key","enabled","value_type","value","reason"}` — evaluated by the same engine as
//! OFREP. Its errors are in the shape that SDK parses, top-level `{"code","message"}`; the rest
//! of the API keeps ours.
//!
//! Translation, where the models differ: Togul's reasons are `disabled`, `rule_match` (ours:
//! a rule served a variant or a rollout share) and `default` (no rules, or none matched);
//! `prerequisite_failed` never occurs (changegate flags have no prerequisites). Togul's SDK sends
//! the user as `context.user_id`: it is the rollout key when `targetingKey` is absent.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use changegate_core::EnvironmentId;
use changegate_flags::eval::{EvalError, Reason, evaluate as evaluate_flag};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::auth::{Authenticated, ReadFlags};
use crate::error::ApiError;
use crate::state::AppState;

/// A Togul-shaped error.
pub(crate) fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, axum::Json(json!({ "code": code, "message": message }))).into_response()
}

fn from_api(failure: &ApiError) -> Response {
    error(failure.status(), failure.code(), &failure.to_string())
}

#[derive(Deserialize)]
struct EvaluateRequest {
    flag_key: String,
    #[serde(default)]
    environment_key: Option<String>,
    #[serde(default)]
    context: Map<String, Value>,
}

/// The wire name of a value's type.
fn value_type(value: &Value) -> &'static str {
    match value {
        Value::Bool(_) => "boolean",
        Value::String(_) => "string",
        Value::Number(_) => "number",
        Value::Null | Value::Array(_) | Value::Object(_) => "json",
    }
}

/// Togul's reason for ours.
fn reason(reason: Reason) -> &'static str {
    match reason {
        Reason::Disabled => "disabled",
        Reason::TargetingMatch | Reason::Split => "rule_match",
        Reason::Static | Reason::Default => "default",
    }
}

/// `POST /api/v1/evaluate`.
pub(crate) async fn evaluate(State(app): State<AppState>, headers: HeaderMap, bytes: Bytes) -> Response {
    let principal = match Authenticated::<ReadFlags>::check(&app, &headers, None).await {
        Ok(authenticated) => authenticated.principal,
        Err(error) => return from_api(&error),
    };
    let request: EvaluateRequest = match serde_json::from_slice(&bytes) {
        Ok(request) => request,
        Err(e) => {
            let message = format!("the body must be {{\"flag_key\", \"environment_key\", \"context\"}}: {e}");
            return error(StatusCode::BAD_REQUEST, "invalid_request", &message);
        }
    };
    let asked = match request.environment_key.as_deref().map(EnvironmentId::parse).transpose() {
        Ok(asked) => asked,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_environment", &e.to_string()),
    };
    // A key bound to an environment evaluates there only; a JWT names its environment.
    let environment = match (&principal.environment, asked) {
        (Some(own), Some(asked)) if *own != asked => {
            return error(StatusCode::FORBIDDEN, "forbidden", "this key belongs to another environment");
        }
        (Some(own), _) => own.clone(),
        (None, Some(asked)) => asked,
        (None, None) => {
            return error(StatusCode::BAD_REQUEST, "invalid_request", "`environment_key` is required");
        }
    };
    let state = match app.engine.flags(&principal.tenant, &environment).await {
        Ok(state) => state,
        Err(ApiError::Missing(message)) => {
            return error(StatusCode::NOT_FOUND, "environment_not_found", &message);
        }
        Err(other) => return from_api(&other),
    };
    let Some(flag) = state.flags.get(&request.flag_key) else {
        let message = format!("flag `{}` not found", request.flag_key);
        return error(StatusCode::NOT_FOUND, "flag_not_found", &message);
    };
    let mut context = request.context;
    if !context.contains_key("targetingKey")
        && let Some(user) = context.get("user_id").cloned()
    {
        context.insert("targetingKey".into(), user);
    }
    match evaluate_flag(flag, &state.segments, &context) {
        Ok(resolution) => axum::Json(json!({
            "flag_key": request.flag_key,
            "enabled": resolution.reason != Reason::Disabled,
            "value_type": value_type(&resolution.value),
            "value": resolution.value,
            "reason": reason(resolution.reason),
        }))
        .into_response(),
        Err(EvalError::TargetingKeyMissing) => error(
            StatusCode::BAD_REQUEST,
            "targeting_key_missing",
            "a percentage rollout needs `context.user_id` (or `targetingKey`)",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_and_value_maps_to_a_togul_name() {
        assert_eq!(reason(Reason::Disabled), "disabled");
        assert_eq!((reason(Reason::TargetingMatch), reason(Reason::Split)), ("rule_match", "rule_match"));
        assert_eq!((reason(Reason::Static), reason(Reason::Default)), ("default", "default"));
        let types: Vec<_> = [json!(true), json!("s"), json!(1.5), json!({"a": 1}), json!([1])]
            .iter()
            .map(value_type)
            .collect();
        assert_eq!(types, ["boolean", "string", "number", "json", "json"]);
    }
}
