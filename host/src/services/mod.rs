//! Clients of the platform's peer services. Each call has a timeout, bounded
//! retries with jittered backoff and a circuit breaker; failures are counted.
//! Unset URLs mean the built-in local implementation.

pub mod circuit_breaker;
pub mod http_client;
pub mod platform;
pub mod validation;

pub use circuit_breaker::{BreakerState, CircuitBreaker};
pub use http_client::{CallError, ServiceClient};
pub use platform::PlatformServices;
pub use validation::{SchemaCheck, ValidationService};
