//! Black-box tests: the real service over HTTP against real PostgreSQL.

// Tests fail by panicking: unwrap is the assertion here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod archive;
mod audit;
mod auth;
mod binary;
mod crash;
mod dev_services;
mod encryption;
mod events;
mod gate;
mod hostile;
mod hostile_input;
mod identity;
mod isolation;
mod json_schema_suite;
mod kafka;
mod listing;
mod noisy_neighbours;
mod operations;
mod peers;
mod plugin_author;
mod plugin_bounds;
mod plugin_trials;
mod plugins;
mod records;
mod schemas;
mod server;
mod standards;
mod tasks;
mod tenants;
mod tokens;
mod webhooks;
mod wit;
