//! Where a schema's remote `$ref`s may come from: nowhere, unless the
//! operator maps a URL prefix to a local directory (`BSS_SCHEMA_REMOTES`,
//! meant for conformance testing: the JSON Schema Test Suite's `remotes/`
//! under `http://localhost:1234/`). Nothing is ever fetched over the network:
//! a tenant's schema cannot make the service reach an address.

use std::path::{Component, Path, PathBuf};
use std::sync::RwLock;

use serde_json::Value;

/// The mappings of this process (set at start-up; tests start several
/// services in one process, so they accumulate).
static REMOTES: RwLock<Vec<(String, PathBuf)>> = RwLock::new(Vec::new());

/// Parses `<url prefix>=<directory>` (several separated by `;`).
pub fn parse(setting: &str) -> anyhow::Result<Vec<(String, PathBuf)>> {
    setting
        .split(';')
        .filter(|s| !s.trim().is_empty())
        .map(|pair| {
            let (prefix, dir) = pair.split_once('=').ok_or_else(|| {
                anyhow::anyhow!("BSS_SCHEMA_REMOTES: {pair:?} is not <url prefix>=<directory>")
            })?;
            Ok((prefix.trim().to_owned(), PathBuf::from(dir.trim())))
        })
        .collect()
}

/// Allows `$ref`s under each prefix, read from its directory.
pub fn allow(mappings: &[(String, PathBuf)]) {
    let mut remotes = REMOTES.write().unwrap_or_else(|p| p.into_inner());
    for m in mappings {
        if !remotes.contains(m) {
            remotes.push(m.clone());
        }
    }
}

/// The retriever every schema compiles with.
pub struct LocalRemotes;

impl jsonschema::Retrieve for LocalRemotes {
    fn retrieve(
        &self,
        uri: &jsonschema::Uri<String>,
    ) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        let uri = uri.as_str();
        let remotes = REMOTES.read().unwrap_or_else(|p| p.into_inner());
        let found = remotes
            .iter()
            .find_map(|(prefix, dir)| Some((dir, uri.strip_prefix(prefix.as_str())?)));
        let Some((dir, rest)) = found else {
            return Err(format!(
                "{uri} cannot be fetched: a schema may refer only to itself and its own $defs"
            )
            .into());
        };
        let rest = rest.split(['#', '?']).next().unwrap_or_default();
        let relative = Path::new(rest);
        // Only plain names below the directory.
        if relative
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
        {
            return Err(format!("{uri} is outside the allowed remotes").into());
        }
        let text = std::fs::read_to_string(dir.join(relative))?;
        Ok(serde_json::from_str(&text)?)
    }
}
