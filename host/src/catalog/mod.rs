//! Resource schemas as the write and query paths use them: compiled once per
//! tenant, resource and version, and cached, so no request parses or compiles
//! a JSON Schema.

pub mod cache;
pub mod compiled;
pub mod remotes;

pub use cache::SchemaCache;
pub use compiled::{CompiledSchema, FieldInfo, FieldType};
