//! The gateway's one door to the MongoDB source, so that a build without the default `mongo`
//! cargo feature (PostgreSQL and memory only) leaves the driver out entirely: there, the source
//! type below is uninhabited and `--mongodb-url` is an error at start. Everything else — feeds,
//! catch-ups, resume tokens — goes through [`changegate_core::Source`].

use std::sync::Arc;

use changegate_core::{CollectionName, Source};

use crate::error::ApiError;

#[cfg(feature = "mongo")]
pub use changegate_mongo::source::{MongoConfig, MongoSource};

/// The MongoDB source (never constructed without the `mongo` feature).
#[cfg(not(feature = "mongo"))]
#[derive(Debug)]
pub enum MongoSource {}

#[cfg(not(feature = "mongo"))]
impl MongoSource {
    async fn ping(&self) -> Result<(), String> {
        match *self {}
    }
}

#[cfg(not(feature = "mongo"))]
impl Source for MongoSource {
    fn open(&self, _key: &changegate_core::FeedKey) -> changegate_core::source::OpenFuture {
        match *self {}
    }

    fn close(&self, _key: &changegate_core::FeedKey) {
        match *self {}
    }

    fn accepts(&self, _start: &changegate_core::Start) -> bool {
        match *self {}
    }

    fn replay(
        self: Arc<Self>,
        _key: changegate_core::FeedKey,
        _filter: changegate_core::Filter,
        _start: changegate_core::Start,
        _cap: u64,
    ) -> changegate_core::source::BoxFuture<
        'static,
        Result<changegate_core::CatchUp, changegate_core::SourceError>,
    > {
        match *self {}
    }
}

/// Whether MongoDB answers.
pub async fn ping(source: &MongoSource) -> bool {
    source.ping().await.is_ok()
}

/// The source, as the registry holds it.
pub fn source(mongo: &Arc<MongoSource>) -> Arc<dyn Source> {
    mongo.clone()
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
