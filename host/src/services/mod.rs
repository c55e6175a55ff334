//! Clients of the platform's peer services. Each call has one deadline that
//! covers its bounded, jittered retries, reads at most a bounded answer, and
//! goes through its tenant's circuit breaker; failures are counted. No peer
//! body or address reaches a tenant. Unset URLs mean the built-in local
//! implementation.

pub mod circuit_breaker;
pub mod http_client;
pub mod identity;
pub mod platform;
pub mod validation;

pub use circuit_breaker::{BreakerState, CircuitBreaker, TenantBreakers};
pub use http_client::{CallError, ServiceClient};
pub use platform::PlatformServices;
pub use validation::{SchemaCheck, ValidationService};
