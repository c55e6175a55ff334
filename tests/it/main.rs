//! Black-box tests: the real service over HTTP against real PostgreSQL.

// Tests fail by panicking: unwrap is the assertion here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod auth;
mod binary;
mod crash;
mod events;
mod hostile;
mod isolation;
mod kafka;
mod listing;
mod operations;
mod plugins;
mod records;
mod schemas;
mod tenants;
mod wit;
