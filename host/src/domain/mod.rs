//! Domain types that can only hold valid values: parse at the edge, and every
//! SQL identifier the service ever builds comes from one of these.

pub mod ids;

pub use ids::{RecordId, ResourceName, TenantId};
