//! The rate limits a tenant is held to: the installation's settings, each
//! replaceable per tenant by a platform admin (a tenant that needs more, or
//! one that must be slowed down), stored with the tenant.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::token_bucket::Rate;
use crate::config::Settings;
use crate::error::FieldError;

/// The largest value a platform admin can set for any of the limits.
const MAX_LIMIT: u32 = 1_000_000;

/// A tenant's own limits; an absent one is the installation's. A rate of 0
/// means no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_burst: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugin_uploads_per_minute: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugin_upload_burst: Option<u32>,
}

/// The limits as they apply.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimits {
    /// Requests per second, steady (0: no limit).
    pub requests_per_second: u32,
    /// Requests allowed at once above the steady rate.
    pub request_burst: u32,
    /// Plugin uploads per minute, steady (0: no limit).
    pub plugin_uploads_per_minute: u32,
    pub plugin_upload_burst: u32,
}

impl RateLimits {
    pub fn from_settings(s: &Settings) -> Self {
        Self {
            requests_per_second: s.rate_limit_rps,
            request_burst: s.rate_limit_burst,
            plugin_uploads_per_minute: s.plugin_uploads_per_minute,
            plugin_upload_burst: s.plugin_upload_burst,
        }
    }

    /// These limits with a tenant's own in place of the installation's.
    pub fn with(self, own: &RateLimitOverrides) -> Self {
        Self {
            requests_per_second: own.requests_per_second.unwrap_or(self.requests_per_second),
            request_burst: own.request_burst.unwrap_or(self.request_burst),
            plugin_uploads_per_minute: own
                .plugin_uploads_per_minute
                .unwrap_or(self.plugin_uploads_per_minute),
            plugin_upload_burst: own.plugin_upload_burst.unwrap_or(self.plugin_upload_burst),
        }
    }

    pub fn requests(&self) -> Rate {
        Rate {
            per_sec: f64::from(self.requests_per_second),
            burst: self.request_burst,
        }
    }

    pub fn uploads(&self) -> Rate {
        Rate {
            per_sec: f64::from(self.plugin_uploads_per_minute) / 60.0,
            burst: self.plugin_upload_burst,
        }
    }
}

/// Whether `own`, over `defaults`, is a usable set of limits: each at most
/// [`MAX_LIMIT`], and a burst of at least 1 wherever there is a limit.
pub fn check(defaults: RateLimits, own: &RateLimitOverrides) -> Result<(), Vec<FieldError>> {
    let mut errors = Vec::new();
    let given = [
        ("requestsPerSecond", own.requests_per_second),
        ("requestBurst", own.request_burst),
        ("pluginUploadsPerMinute", own.plugin_uploads_per_minute),
        ("pluginUploadBurst", own.plugin_upload_burst),
    ];
    for (name, value) in given {
        if value.is_some_and(|v| v > MAX_LIMIT) {
            errors.push(FieldError::request(
                format!("/{name}"),
                format!("at most {MAX_LIMIT}"),
            ));
        }
    }
    let applied = defaults.with(own);
    if applied.requests_per_second > 0 && applied.request_burst == 0 {
        errors.push(FieldError::request(
            "/requestBurst",
            "must be at least 1 while requests are limited (set requestsPerSecond to 0 for no limit)",
        ));
    }
    if applied.plugin_uploads_per_minute > 0 && applied.plugin_upload_burst == 0 {
        errors.push(FieldError::request(
            "/pluginUploadBurst",
            "must be at least 1 while uploads are limited (set pluginUploadsPerMinute to 0 for no limit)",
        ));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}
