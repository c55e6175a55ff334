//! The manifest a plugin is uploaded with, its limits, and the ceilings
//! that cap them.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::domain::ResourceName;
use crate::error::FieldError;
use crate::services::platform::SERVICES;

/// The world a plugin implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    ValidationHook,
    EventEnricher,
    WebhookTransformer,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ValidationHook => "validation-hook",
            Self::EventEnricher => "event-enricher",
            Self::WebhookTransformer => "webhook-transformer",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::ValidationHook,
            Self::EventEnricher,
            Self::WebhookTransformer,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// Limits a manifest asks for; absent ones take the defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitsRequest {
    /// Wall-clock deadline per call, in ms (default 50).
    pub deadline_ms: Option<u64>,
    /// Instruction budget per call; absent means no fuel metering.
    pub fuel: Option<u64>,
    /// Linear memory per call, in MiB (default 16).
    pub memory_mib: Option<u64>,
    /// Largest returned payload, in bytes (default and most 1 MiB).
    pub output_bytes: Option<u64>,
}

/// The limits a plugin runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    pub deadline_ms: u64,
    pub fuel: Option<u64>,
    pub memory_mib: u64,
    pub output_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            deadline_ms: 50,
            fuel: None,
            memory_mib: 16,
            output_bytes: 1024 * 1024,
        }
    }
}

impl Limits {
    pub fn deadline(&self) -> Duration {
        Duration::from_millis(self.deadline_ms)
    }

    pub fn memory_bytes(&self) -> usize {
        (self.memory_mib as usize) << 20
    }
}

/// The most any plugin may ask for (the spec's ceilings by default).
#[derive(Debug, Clone, Copy)]
pub struct Ceilings {
    pub deadline_ms: u64,
    pub fuel: u64,
    pub memory_mib: u64,
    pub output_bytes: usize,
}

impl Default for Ceilings {
    fn default() -> Self {
        Self {
            deadline_ms: 1000,
            fuel: 100_000_000,
            memory_mib: 64,
            output_bytes: 1024 * 1024,
        }
    }
}

/// A tenant's own ceilings, as a platform admin sets them; absent ones are
/// the installation's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TenantCeilings {
    pub deadline_ms: Option<u64>,
    pub fuel: Option<u64>,
    pub memory_mib: Option<u64>,
}

impl Ceilings {
    /// No ceilings: for re-reading a manifest stored when it was checked;
    /// the ceilings that apply now cap its limits after (`cap`).
    pub const NONE: Self = Self {
        deadline_ms: u64::MAX,
        fuel: u64::MAX,
        memory_mib: u64::MAX,
        output_bytes: usize::MAX,
    };

    /// These ceilings lowered to a tenant's own.
    pub fn for_tenant(&self, t: &TenantCeilings) -> Self {
        Self {
            deadline_ms: t
                .deadline_ms
                .map_or(self.deadline_ms, |v| v.min(self.deadline_ms)),
            fuel: t.fuel.map_or(self.fuel, |v| v.min(self.fuel)),
            memory_mib: t
                .memory_mib
                .map_or(self.memory_mib, |v| v.min(self.memory_mib)),
            output_bytes: self.output_bytes,
        }
    }

    /// Limits lowered to these ceilings (when ceilings drop after an upload).
    pub fn cap(&self, l: Limits) -> Limits {
        Limits {
            deadline_ms: l.deadline_ms.min(self.deadline_ms),
            fuel: l.fuel.map(|f| f.min(self.fuel)),
            memory_mib: l.memory_mib.min(self.memory_mib),
            output_bytes: l.output_bytes.min(self.output_bytes),
        }
    }

    /// Whether a tenant's ceilings fit under these; the errors otherwise.
    pub fn admit(&self, t: &TenantCeilings) -> Result<(), Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut check = |path: &str, asked: Option<u64>, most: u64| {
            if let Some(v) = asked
                && (v == 0 || v > most)
            {
                errors.push(FieldError::request(
                    path,
                    format!("{v} is not between 1 and the installation's ceiling of {most}"),
                ));
            }
        };
        check("/deadlineMs", t.deadline_ms, self.deadline_ms);
        check("/fuel", t.fuel, self.fuel);
        check("/memoryMib", t.memory_mib, self.memory_mib);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

/// A manifest as uploaded.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Manifest {
    /// 1-63 lowercase letters, digits and dashes, starting with a letter.
    pub name: String,
    pub kind: Kind,
    /// Resources the plugin runs for; `["*"]` for all.
    #[serde(default)]
    pub resources: Vec<String>,
    /// The plugin's own configuration, given to every call.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub config: Option<Value>,
    #[serde(default)]
    pub limits: LimitsRequest,
    /// Platform services `forward` may reach (`validation`, `task`).
    #[serde(default)]
    pub services: Vec<String>,
    /// Validation hooks only: also run before deletes.
    #[serde(default)]
    pub on_delete: bool,
    /// Accept `resources` that have no schema yet (for schemas created
    /// later); without it, such a binding is refused, since it would never run.
    #[serde(default)]
    pub allow_missing_resources: bool,
    /// Which calls to record for `GET /v1/plugins/{name}/calls` (and
    /// `bss plugin replay`): `"failures"`, `"all"`, or a share of calls
    /// (0 < rate ≤ 1; failures always). Absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<super::calls::RecordPolicy>,
}

/// Largest `config`, serialized.
const CONFIG_MAX: usize = 64 * 1024;

/// A manifest checked against the rules and ceilings.
#[derive(Debug, Clone)]
pub struct Checked {
    pub manifest: Manifest,
    pub limits: Limits,
    /// The config as the JSON text plugins receive.
    pub config: String,
}

impl Manifest {
    /// Checks everything about the manifest; every problem is reported.
    pub fn check(self, ceilings: &Ceilings) -> Result<Checked, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut err = |path: &str, message: String| {
            errors.push(FieldError::request(format!("/manifest{path}"), message));
        };
        if !valid_name(&self.name) {
            err(
                "/name",
                "a plugin name is 1-63 lowercase letters, digits and dashes, starting with a letter"
                    .into(),
            );
        }
        if self.resources.is_empty() && self.kind != Kind::WebhookTransformer {
            err(
                "/resources",
                "name the resources the plugin runs for, or [\"*\"] for all".into(),
            );
        }
        for (i, r) in self.resources.iter().enumerate() {
            if r != "*" && ResourceName::parse(r).is_err() {
                err(
                    &format!("/resources/{i}"),
                    format!("{r:?} is not a resource name"),
                );
            }
        }
        for (i, s) in self.services.iter().enumerate() {
            if !SERVICES.contains(&s.as_str()) {
                err(
                    &format!("/services/{i}"),
                    format!("no platform service named {s:?}; known: validation, task"),
                );
            }
        }
        if let Ok(whole) = serde_json::to_value(&self) {
            for path in nul_paths(&whole, String::new()) {
                err(
                    &path,
                    "contains a NUL character (\\u0000), which cannot be stored; remove it".into(),
                );
            }
        }
        if self.record.is_some_and(|r| !r.valid()) {
            err(
                "/record",
                "record is \"failures\", \"all\" or a share of calls above 0 and at most 1".into(),
            );
        }
        if self.on_delete && self.kind != Kind::ValidationHook {
            err(
                "/onDelete",
                "only validation hooks run before deletes".into(),
            );
        }
        let config = self
            .config
            .clone()
            .unwrap_or_else(|| Value::Object(Default::default()));
        if !config.is_object() {
            err("/config", "config must be a JSON object".into());
        }
        let config_text = config.to_string();
        if config_text.len() > CONFIG_MAX {
            err(
                "/config",
                format!("config is larger than {CONFIG_MAX} bytes"),
            );
        }
        let d = Limits::default();
        let asked = &self.limits;
        let limits = Limits {
            deadline_ms: asked.deadline_ms.unwrap_or(d.deadline_ms),
            fuel: asked.fuel,
            memory_mib: asked.memory_mib.unwrap_or(d.memory_mib),
            output_bytes: asked.output_bytes.map_or(d.output_bytes, |b| b as usize),
        };
        let over = |name: &str, asked: String, ceiling: String| {
            format!("{name} {asked} is above this tenant's ceiling of {ceiling}")
        };
        if limits.deadline_ms == 0 || limits.deadline_ms > ceilings.deadline_ms {
            err(
                "/limits/deadlineMs",
                over(
                    "deadlineMs",
                    limits.deadline_ms.to_string(),
                    format!("{} ms", ceilings.deadline_ms),
                ),
            );
        }
        if let Some(f) = limits.fuel
            && (f == 0 || f > ceilings.fuel)
        {
            err(
                "/limits/fuel",
                over("fuel", f.to_string(), ceilings.fuel.to_string()),
            );
        }
        if limits.memory_mib == 0 || limits.memory_mib > ceilings.memory_mib {
            err(
                "/limits/memoryMib",
                over(
                    "memoryMib",
                    limits.memory_mib.to_string(),
                    format!("{} MiB", ceilings.memory_mib),
                ),
            );
        }
        if limits.output_bytes == 0 || limits.output_bytes > ceilings.output_bytes {
            err(
                "/limits/outputBytes",
                over(
                    "outputBytes",
                    limits.output_bytes.to_string(),
                    ceilings.output_bytes.to_string(),
                ),
            );
        }
        if errors.is_empty() {
            Ok(Checked {
                manifest: self,
                limits,
                config: config_text,
            })
        } else {
            Err(errors)
        }
    }

    /// Whether the plugin runs for this resource.
    pub fn binds(&self, resource: &str) -> bool {
        self.resources.iter().any(|r| r == "*" || r == resource)
    }
}

/// JSON Pointers to every string (or object key) under `value` that holds a
/// NUL character: PostgreSQL's jsonb cannot store one.
fn nul_paths(value: &Value, at: String) -> Vec<String> {
    let escape = |key: &str| key.replace('~', "~0").replace('/', "~1");
    match value {
        Value::String(s) if s.contains('\0') => vec![at],
        Value::Array(items) => items
            .iter()
            .enumerate()
            .flat_map(|(i, v)| nul_paths(v, format!("{at}/{i}")))
            .collect(),
        Value::Object(map) => map
            .iter()
            .flat_map(|(k, v)| {
                let path = format!("{at}/{}", escape(k).replace('\0', "\\u0000"));
                let mut found = nul_paths(v, path.clone());
                if k.contains('\0') {
                    found.insert(0, path);
                }
                found
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// What `valid_name` accepts, as a regular expression (for the OpenAPI
/// document).
pub const NAME_PATTERN: &str = "^[a-z][a-z0-9-]{0,62}$";

pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn manifest(v: Value) -> Manifest {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn defaults_apply_and_ceilings_cap() {
        let ok = manifest(json!({"name": "n", "kind": "validation-hook", "resources": ["*"]}))
            .check(&Ceilings::default())
            .unwrap();
        assert_eq!(ok.limits, Limits::default());
        assert_eq!(ok.config, "{}");
        let errors = manifest(
            json!({"name": "n", "kind": "validation-hook", "resources": ["*"],
            "limits": {"deadlineMs": 5000, "memoryMib": 65, "fuel": 200000000}}),
        )
        .check(&Ceilings::default())
        .unwrap_err();
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/manifest/limits/deadlineMs",
                "/manifest/limits/fuel",
                "/manifest/limits/memoryMib"
            ]
        );
        assert!(errors[0].message.contains("ceiling of 1000 ms"));
    }

    #[test]
    fn nul_characters_anywhere_are_refused_with_their_path() {
        let errors = manifest(
            json!({"name": "n", "kind": "validation-hook", "resources": ["*"],
            "config": {"a": ["ok", "bad\u{0}"], "k\u{0}": 1}}),
        )
        .check(&Ceilings::default())
        .unwrap_err();
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["/manifest/config/a/1", "/manifest/config/k\\u0000"]);
    }

    #[test]
    fn names_resources_and_services_are_checked() {
        let errors = manifest(json!({"name": "Bad Name", "kind": "event-enricher",
            "resources": ["ok", "no way"], "services": ["smtp"], "onDelete": true}))
        .check(&Ceilings::default())
        .unwrap_err();
        assert_eq!(errors.len(), 4);
    }
}
