//! The connection layer under the routes: the accept loop and its limits ([`server`]), the
//! direct path that holds an idle SSE connection in a few KiB ([`direct`]), and the write
//! deadline that frees a stalled reader's socket ([`stall`]).

pub mod direct;
pub mod server;
pub mod stall;
