//! The built-in keyring's master key: `BSS_MASTER_KEY` (base64 of 32
//! bytes), else 32 random bytes generated into `<data dir>/master-key` on
//! first start (mode 0600, created atomically the way
//! `auth::local_secret` creates the token secret, so two processes starting
//! at once agree on one key). Losing this file loses every encrypted value.

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rand::RngCore;

use crate::config::Settings;
use crate::secret_file;

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
    let generate = || {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        STANDARD.encode(key)
    };
    let text = secret_file::read_or_create(
        &path,
        "master key for field encryption",
        "BSS_MASTER_KEY",
        generate,
    )?;
    decode(&text).with_context(|| format!("{} holds no usable master key", path.display()))
}

fn decode(text: &str) -> anyhow::Result<[u8; 32]> {
    let bytes = STANDARD.decode(text.trim())?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| anyhow::anyhow!("not 32 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

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
