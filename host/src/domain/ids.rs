//! Identifiers that reach SQL. Each newtype validates on construction, so an
//! invalid tenant id or resource name cannot exist past the HTTP edge, and SQL
//! identifiers are only ever derived from these (and always quoted).

use std::fmt;
use std::sync::LazyLock;

use regex::Regex;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// What a tenant id looks like (also in the OpenAPI document).
pub const TENANT_PATTERN: &str = r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$";
/// What a resource name looks like.
pub const RESOURCE_PATTERN: &str = r"^[a-z][a-z0-9_]{0,62}$";
/// What a record id looks like.
pub const RECORD_PATTERN: &str = r"^[A-Za-z0-9][A-Za-z0-9._~:-]{0,127}$";

static TENANT_RE: LazyLock<Regex> = LazyLock::new(|| {
    #[allow(clippy::expect_used)] // a constant pattern, checked by the tests
    Regex::new(TENANT_PATTERN).expect("tenant id pattern")
});
static RESOURCE_RE: LazyLock<Regex> = LazyLock::new(|| {
    #[allow(clippy::expect_used)]
    Regex::new(RESOURCE_PATTERN).expect("resource name pattern")
});
static RECORD_RE: LazyLock<Regex> = LazyLock::new(|| {
    #[allow(clippy::expect_used)]
    Regex::new(RECORD_PATTERN).expect("record id pattern")
});

/// Why an identifier was refused; the message says what a valid one looks like.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidId(pub String);

/// A tenant id: `^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct TenantId(String);

impl TenantId {
    pub fn parse(s: &str) -> Result<Self, InvalidId> {
        if TENANT_RE.is_match(s) {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidId(format!(
                "invalid tenant id {s:?}: use 1-63 lowercase letters, digits and '-', \
                 starting and ending with a letter or digit"
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Why no new tenant may have this id, if none may: `import` is the
    /// path `POST /v1/tenants/import`, where a tenant's own path would be.
    pub fn reserved(&self) -> Option<String> {
        (self.0 == "import").then(|| {
            format!(
                "tenant id {} is reserved: /v1/tenants/{} is the import",
                self.0, self.0
            )
        })
    }

    /// The Postgres schema that holds this tenant's data.
    ///
    /// Injective by construction: ids of up to 61 characters map to
    /// `t_<id with '-' as '_'>` (tenant ids contain no '_', so the mapping is
    /// reversible); longer ids, which would not fit Postgres' 63-byte limit,
    /// map to `h_<first 44 chars>_<64-bit sha256 prefix>`. The two forms have
    /// different prefixes, so they never meet, and `bss.tenants.schema_name`
    /// is unique, so even a hash collision could only refuse a tenant, never
    /// share a schema.
    pub fn schema_name(&self) -> String {
        let id = self.0.replace('-', "_");
        if id.len() <= 61 {
            format!("t_{id}")
        } else {
            let digest = Sha256::digest(self.0.as_bytes());
            let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
            format!("h_{}_{hex}", &id[..44])
        }
    }

    /// The schema name, quoted for SQL.
    pub fn schema_ident(&self) -> String {
        quote_ident(&self.schema_name())
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A resource (record type) name: `^[a-z][a-z0-9_]{0,62}$`. It names the
/// table holding the resource's records inside the tenant schema; the
/// service's own tables there start with `_`, which a resource name cannot.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ResourceName(String);

impl ResourceName {
    pub fn parse(s: &str) -> Result<Self, InvalidId> {
        if RESOURCE_RE.is_match(s) {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidId(format!(
                "invalid resource name {s:?}: use 1-63 lowercase letters, digits and '_', \
                 starting with a letter"
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `"<tenant schema>"."<resource>"`, the resource's table.
    pub fn table_in(&self, tenant: &TenantId) -> String {
        format!("{}.{}", tenant.schema_ident(), quote_ident(&self.0))
    }
}

impl fmt::Display for ResourceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A record id: 1-128 URL-safe characters. Server-made ids are UUIDv7.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct RecordId(String);

impl RecordId {
    pub fn parse(s: &str) -> Result<Self, InvalidId> {
        if RECORD_RE.is_match(s) {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidId(format!(
                "invalid record id {s:?}: use 1-128 characters from A-Z a-z 0-9 . _ ~ : -, \
                 starting with a letter or digit"
            )))
        }
    }

    /// A new, time-ordered id.
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Quotes an SQL identifier (doubling any `"`), the only way identifiers are
/// spliced into SQL text.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_ids_follow_the_pattern() {
        for ok in ["a", "abc-123", "0", &"a".repeat(63)] {
            assert!(TenantId::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"a".repeat(64), "a\"b"] {
            assert!(TenantId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn schema_names_fit_postgres_and_never_collide_across_forms() {
        let short = TenantId::parse(&"a".repeat(61)).unwrap_or_else(|e| panic!("{e}"));
        let long = TenantId::parse(&"a".repeat(62)).unwrap_or_else(|e| panic!("{e}"));
        assert!(short.schema_name().starts_with("t_"));
        assert!(long.schema_name().starts_with("h_"));
        assert!(short.schema_name().len() <= 63 && long.schema_name().len() <= 63);
        let a = TenantId::parse("a-b").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.schema_name(), "t_a_b");
    }

    #[test]
    fn resource_names_follow_the_pattern() {
        assert!(ResourceName::parse("invoices").is_ok());
        assert!(ResourceName::parse("line_items2").is_ok());
        for bad in ["_x", "1x", "Invoices", "a-b", "", &"a".repeat(64)] {
            assert!(ResourceName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
