//! The gateway's one door to the MongoDB source, so that a build without the default `mongo`
//! cargo feature (PostgreSQL and memory only) leaves the driver out entirely: there, the types
//! below are uninhabited, every MongoDB id is refused as foreign, and `--mongodb-url` is an error
//! at start.

use changegate_core::{CollectionName, FeedKey, Hub};

use crate::error::ApiError;
use crate::sse;

#[cfg(feature = "mongo")]
pub use changegate_mongo::ResumeToken;
#[cfg(feature = "mongo")]
pub use changegate_mongo::source::{MongoConfig, MongoSource};

/// A MongoDB resume token (never constructed without the `mongo` feature).
#[cfg(not(feature = "mongo"))]
#[derive(Debug)]
pub enum ResumeToken {}

#[cfg(not(feature = "mongo"))]
impl ResumeToken {
    /// Always refused: this build cannot have sent a MongoDB id.
    pub fn decode(_text: &str) -> Result<Self, changegate_core::PositionError> {
        Err(changegate_core::PositionError)
    }
}

/// The MongoDB source (never constructed without the `mongo` feature).
#[cfg(not(feature = "mongo"))]
#[derive(Debug)]
pub enum MongoSource {}

#[cfg(not(feature = "mongo"))]
impl MongoSource {
    /// The hub of its feeds.
    pub fn hub(&self) -> &Hub {
        match *self {}
    }

    async fn ping(&self) -> Result<(), String> {
        match *self {}
    }
}

/// Whether MongoDB answers.
pub async fn ping(source: &MongoSource) -> bool {
    source.ping().await.is_ok()
}

/// The hub Mongo subscribers attach to.
pub fn hub(source: &MongoSource) -> &Hub {
    source.hub()
}

/// Checks a collection name for MongoDB.
pub fn check_collection(name: &CollectionName) -> Result<(), ApiError> {
    #[cfg(feature = "mongo")]
    return changegate_mongo::collection(name)
        .map(|_| ())
        .map_err(|e| ApiError::bad_request("invalid_collection", e.to_string()));
    #[cfg(not(feature = "mongo"))]
    {
        let _ = name;
        Err(ApiError::SourceNotConfigured("this build of changegate has no MongoDB support".into()))
    }
}

/// A resuming client's catch-up, as the stream writer reads it; more than `cap` changes end in
/// a `reset`.
pub async fn backlog(
    source: &MongoSource,
    key: &FeedKey,
    token: &ResumeToken,
    cap: u64,
) -> Result<sse::Backlog, ApiError> {
    #[cfg(feature = "mongo")]
    {
        use changegate_mongo::source::CatchUp;
        let pages = source.catch_up(key, token, cap).await.map_err(|e| {
            tracing::warn!(tenant = %key.tenant, error = %e, "MongoDB catch-up failed");
            ApiError::Unavailable("MongoDB is unavailable; try again".into())
        })?;
        Ok(Box::pin(futures_util::StreamExt::map(pages, |page| match page {
            Ok(CatchUp::Events(frames)) => sse::Caught::Page(frames),
            Ok(CatchUp::Lost) => sse::Caught::Reset { bytes: expired(), after: None },
            Err(error) => {
                tracing::warn!(%error, "MongoDB catch-up failed mid-way; the client resumes");
                sse::Caught::Failed
            }
        })))
    }
    #[cfg(not(feature = "mongo"))]
    {
        let _ = (key, token, cap);
        match *source {}
    }
}

/// The `reset` of a MongoDB stream: its position is a resume token, so none is named.
pub fn expired() -> bytes::Bytes {
    sse::message(None, Some("reset"), r#"{"reason":"position-expired"}"#)
}
