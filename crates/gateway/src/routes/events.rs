//! The realtime event routes: `GET /v1/events/subscribe` (SSE) and `POST /v1/events/publish`.

use std::time::Instant;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use changegate_core::event::Dialect;
use changegate_core::{CollectionName, Feed, FeedKey, Filter, RawJson, SourceKind, Topic, TopicPattern};
use serde::Deserialize;
use serde_json::json;

use crate::auth::{Authenticated, Publish, Subscribe};
use crate::error::ApiError;
use crate::query::Query;
use crate::state::AppState;
use crate::stream::{Ids, Resume, invalid_last_event_id, open_stream, sse};

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

pub(super) async fn subscribe(
    State(app): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let query = SubscribeQuery::parse(raw.as_deref())?;
    let principal =
        Authenticated::<Subscribe>::check(&app, &headers, query.apikey.as_deref()).await?.principal;
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
                None => !app.sources.serves(SourceKind::Postgres) && app.sources.serves(SourceKind::Mongo),
            };
            if use_mongo {
                crate::mongo::check_collection(&name)?;
                (Feed::Collection { source: SourceKind::Mongo, name }, Filter::Everything)
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
    open_stream(
        &app,
        &principal,
        key,
        filter,
        resume,
        sse::Wire::new(Dialect::Realtime),
        app.limits.heartbeat,
    )
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    topic: String,
    data: RawJson,
}

pub(super) async fn publish(
    State(app): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    body: Body,
) -> Result<Response, ApiError> {
    let query = Query::parse(raw.as_deref())?;
    let principal = Authenticated::<Publish>::check(&app, &headers, query.get("apikey")?).await?.principal;
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
}
