//! Business Store: a multi-tenant business data service. See ARCHITECTURE.md
//! for the map; `main.rs` only wires [`startup::Application`] to the process.

pub mod api;
pub mod app_state;
pub mod archive;
pub mod auth;
pub mod catalog;
pub mod config;
pub mod crypto;
pub mod dev_services;
pub mod domain;
pub mod error;
pub mod events;
pub mod plugin_cli;
pub mod plugins;
pub mod secret_file;
pub mod services;
pub mod startup;
pub mod storage;
pub mod tasks;
pub mod telemetry;
pub mod webhooks;
