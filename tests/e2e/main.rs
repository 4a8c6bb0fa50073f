//! The end-to-end suite, one test binary (linking the harness, the drivers and the HTTP client once
//! instead of once per area): each module is one area, and starts the real `changegate` binary.

mod auth;
mod bad_input;
mod browser;
mod connections;
mod cors;
mod flags;
mod isolation;
mod mongo;
mod ofrep;
mod operability;
mod postgres_capture;
mod postgres_delivery;
mod postgres_replica;
mod resume;
mod sdks;
mod shutdown;
mod slow_consumer;
mod sse_wire;
