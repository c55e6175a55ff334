//! The built-in keyring's master key: `BSS_MASTER_KEY` (base64 of 32
//! bytes), else 32 random bytes generated into `<data dir>/master-key` on
//! first start (mode 0600, created atomically the way
//! `auth::local_secret` creates the token secret, so two processes starting
//! at once agree on one key). Losing this file loses every encrypted value.

use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rand::RngCore;

use crate::config::Settings;

pub const FILE_NAME: &str = "master-key";

/// The configured master key, else the data directory's (generated if missing).
pub fn resolve(settings: &Settings) -> anyhow::Result<[u8; 32]> {
    if let Some(text) = &settings.master_key {
        return decode(text).context("BSS_MASTER_KEY must be base64 of exactly 32 bytes");
    }
    let path = settings.data_dir.join(FILE_NAME);
    if !settings.http_addr.ip().is_loopback() {
        bail!(
            "refusing to listen on {}: x-encrypted fields would be sealed with a master key \
             generated into this replica's data directory ({}), which other replicas do not \
             share; set BSS_MASTER_KEY (base64 of 32 random bytes, the same on every replica) \
             or AUTH_SERVICE_URL",
            settings.http_addr,
            path.display()
        );
    }
    let exists = path
        .try_exists()
        .with_context(|| format!("looking for {}", path.display()))?;
    if !exists {
        create(&path)?;
    }
    read(&path)
}

fn decode(text: &str) -> anyhow::Result<[u8; 32]> {
    let bytes = STANDARD.decode(text.trim())?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| anyhow::anyhow!("not 32 bytes"))
}

fn read(path: &Path) -> anyhow::Result<[u8; 32]> {
    let meta = fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "{} is readable by other users; run `chmod 600 {}` (or set BSS_MASTER_KEY)",
            path.display(),
            path.display()
        );
    }
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    decode(&text).with_context(|| format!("{} holds no usable master key", path.display()))
}

/// Writes a fresh key to a private temporary file, then links it into
/// place: it appears complete or not at all, and a key another process
/// linked first is kept (`hard_link` never replaces).
fn create(path: &Path) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{FILE_NAME}.{}.tmp",
        uuid::Uuid::new_v4().simple()
    ));
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    let written = write_private(&tmp, &STANDARD.encode(key));
    let linked = written.and_then(|()| match fs::hard_link(&tmp, path) {
        Err(e) if e.kind() != ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    });
    let _ = fs::remove_file(&tmp);
    linked.with_context(|| format!("writing the generated master key to {}", path.display()))?;
    tracing::info!(path = %path.display(), "generated a master key for field encryption");
    Ok(())
}

fn write_private(path: &Path, value: &str) -> std::io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(value.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_is_private_and_stable() {
        let dir = std::env::temp_dir().join(format!("bss-mk-{}", uuid::Uuid::new_v4().simple()));
        let settings = Settings {
            data_dir: dir.clone(),
            ..Settings::default()
        };
        let first = resolve(&settings).ok();
        let second = resolve(&settings).ok();
        assert!(first.is_some());
        assert_eq!(first, second);
        let mode = fs::metadata(dir.join(FILE_NAME)).map(|m| m.permissions().mode() & 0o777);
        assert_eq!(mode.ok(), Some(0o600));
        let _ = fs::remove_dir_all(dir);
    }
}
