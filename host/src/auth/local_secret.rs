//! The HS256 secret of a service without an Auth Service. A secret written
//! in the source would let anyone who read it mint tokens, so when
//! `BSS_JWT_SECRET` is unset the first start generates 256 random bits into
//! `<data dir>/jwt-secret` (mode 0600, created atomically so two processes
//! starting at once agree on one), and `bss token` reads the same file (it
//! never creates one: a secret it made up would sign tokens the service
//! refuses). Such a secret is for one machine: on a non-loopback address the
//! service refuses to start until a secret of at least 256 bits (or an Auth
//! Service) is configured, since a short or empty HMAC key is guessable.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use base64::Engine;
use rand::RngCore;

use crate::config::Settings;
use crate::secret_file;

/// Name of the generated secret's file in the data directory.
pub const FILE_NAME: &str = "jwt-secret";
/// RFC 7518 §3.2: an HS256 key has at least 256 bits.
const MIN_BYTES: usize = 32;

/// Where the signing secret came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// `BSS_JWT_SECRET` (or `jwt_secret` in the config file).
    Configured,
    /// Generated into (or read back from) this file.
    Generated(PathBuf),
}

/// The local signing secret.
#[derive(Clone)]
pub struct LocalSecret {
    value: String,
    pub origin: Origin,
}

impl std::fmt::Debug for LocalSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalSecret")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl LocalSecret {
    /// The configured secret, else the data directory's (generated if missing).
    pub fn resolve(settings: &Settings) -> anyhow::Result<Self> {
        if let Some(secret) = Self::configured(settings) {
            if secret.value.len() < MIN_BYTES {
                tracing::warn!(
                    "BSS_JWT_SECRET is shorter than {MIN_BYTES} bytes: tokens are easier to forge"
                );
            }
            return Ok(secret);
        }
        let path = settings.data_dir.join(FILE_NAME);
        let value = read_or_create(&path)?;
        Ok(Self {
            value,
            origin: Origin::Generated(path),
        })
    }

    /// The configured secret, else the one the service generated; never
    /// creates one (for `bss token`, which must sign with the service's).
    pub fn existing(settings: &Settings) -> anyhow::Result<Self> {
        if let Some(secret) = Self::configured(settings) {
            return Ok(secret);
        }
        let path = settings.data_dir.join(FILE_NAME);
        let exists = path
            .try_exists()
            .with_context(|| format!("looking for {}", path.display()))?;
        if !exists {
            bail!(
                "no token secret: BSS_JWT_SECRET is unset and {} does not exist. Start the \
                 service first (`bss serve` generates it there), or set BSS_JWT_SECRET / \
                 BSS_DATA_DIR to what the service uses",
                std::path::absolute(&path).unwrap_or(path).display()
            );
        }
        let value = read(&path)?;
        Ok(Self {
            value,
            origin: Origin::Generated(path),
        })
    }

    fn configured(settings: &Settings) -> Option<Self> {
        settings.jwt_secret.as_ref().map(|value| Self {
            value: value.clone(),
            origin: Origin::Configured,
        })
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.value.as_bytes()
    }

    pub fn as_str(&self) -> &str {
        &self.value
    }
}

/// Refuses a generated secret, or a configured one under [`MIN_BYTES`], on
/// an address other machines can reach.
pub fn refuse_public_address(settings: &Settings) -> anyhow::Result<()> {
    let addr = settings.http_addr;
    if settings.auth_service_url.is_some() || addr.ip().is_loopback() {
        return Ok(());
    }
    match &settings.jwt_secret {
        Some(secret) if secret.len() >= MIN_BYTES => Ok(()),
        Some(secret) => bail!(
            "refusing to listen on {addr}: BSS_JWT_SECRET is {} bytes, and on an address \
             that is not loopback it must be at least {MIN_BYTES} random bytes (a shorter \
             HS256 key can be guessed, an empty one lets anyone forge tokens). Set a longer \
             one, the same on every replica (e.g. `openssl rand -base64 48`), or \
             AUTH_SERVICE_URL (the Auth Service whose JWKS verifies tokens), or listen on \
             127.0.0.1",
            secret.len()
        ),
        None => bail!(
            "refusing to listen on {addr}: BSS_HTTP_ADDR is not a loopback address and no \
             token verification is configured, so tokens would be signed with the secret \
             generated for this machine in {}. Set BSS_JWT_SECRET (a random string of at \
             least {MIN_BYTES} bytes, the same on every replica; e.g. `openssl rand -base64 48`) \
             or AUTH_SERVICE_URL (the Auth Service whose JWKS verifies tokens), or listen \
             on 127.0.0.1",
            settings.data_dir.join(FILE_NAME).display()
        ),
    }
}

fn read_or_create(path: &Path) -> anyhow::Result<String> {
    let value =
        secret_file::read_or_create(path, "token signing secret", "BSS_JWT_SECRET", generate)?;
    usable(path, value)
}

fn read(path: &Path) -> anyhow::Result<String> {
    usable(path, secret_file::read(path, "BSS_JWT_SECRET")?)
}

fn usable(path: &Path, value: String) -> anyhow::Result<String> {
    if value.len() < MIN_BYTES {
        bail!(
            "{} holds no usable secret (under {MIN_BYTES} bytes); delete it to generate a \
             new one, or set BSS_JWT_SECRET",
            path.display()
        );
    }
    Ok(value)
}

fn generate() -> String {
    let mut bytes = [0u8; 48];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    fn settings_in(dir: &Path) -> Settings {
        Settings {
            data_dir: dir.to_path_buf(),
            ..Settings::default()
        }
    }

    fn temp_dir() -> PathBuf {
        std::env::temp_dir().join(format!("bss-secret-unit-{}", uuid::Uuid::new_v4().simple()))
    }

    #[test]
    fn a_generated_secret_is_private_and_stable() -> anyhow::Result<()> {
        let dir = temp_dir();
        let first = LocalSecret::resolve(&settings_in(&dir))?;
        let again = LocalSecret::resolve(&settings_in(&dir))?;
        assert_eq!(first.as_str(), again.as_str());
        assert_eq!(first.as_str().len(), 64);
        let mode = fs::metadata(dir.join(FILE_NAME))?.permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let leftovers = fs::read_dir(&dir)?.count();
        assert_eq!(leftovers, 1, "no temporary file is left behind");
        fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn processes_starting_at_once_agree_on_one_secret() -> anyhow::Result<()> {
        let dir = temp_dir();
        let starts: Vec<_> = (0..8)
            .map(|_| {
                let settings = settings_in(&dir);
                std::thread::spawn(move || {
                    LocalSecret::resolve(&settings).map(|s| s.as_str().to_owned())
                })
            })
            .collect();
        let mut secrets = Vec::new();
        for start in starts {
            let secret = start
                .join()
                .map_err(|_| anyhow::anyhow!("a start panicked"))??;
            secrets.push(secret);
        }
        secrets.dedup();
        assert_eq!(secrets.len(), 1, "{secrets:?}");
        assert_eq!(fs::read_dir(&dir)?.count(), 1);
        fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn a_secret_readable_by_others_is_refused() -> anyhow::Result<()> {
        let dir = temp_dir();
        LocalSecret::resolve(&settings_in(&dir))?;
        fs::set_permissions(dir.join(FILE_NAME), fs::Permissions::from_mode(0o644))?;
        let err = LocalSecret::resolve(&settings_in(&dir))
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("chmod 600")));
        fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn only_loopback_addresses_may_use_a_generated_secret() {
        let mut s = Settings::default();
        assert!(refuse_public_address(&s).is_ok());
        s.http_addr = "[::1]:8080".parse().unwrap_or(s.http_addr);
        assert!(refuse_public_address(&s).is_ok());
        s.http_addr = "0.0.0.0:8080".parse().unwrap_or(s.http_addr);
        let err = refuse_public_address(&s).err().map(|e| e.to_string());
        assert!(
            err.is_some_and(|e| e.contains("BSS_JWT_SECRET") && e.contains("AUTH_SERVICE_URL"))
        );
        s.jwt_secret = Some("x".repeat(MIN_BYTES));
        assert!(refuse_public_address(&s).is_ok());
    }

    #[test]
    fn a_short_configured_secret_is_refused_on_a_public_address_only() {
        let mut s = Settings::default();
        let almost = "x".repeat(MIN_BYTES - 1);
        for short in ["", "secret", almost.as_str()] {
            s.jwt_secret = Some(short.to_owned());
            s.http_addr = "127.0.0.1:8080".parse().unwrap_or(s.http_addr);
            assert!(refuse_public_address(&s).is_ok(), "{short:?} on loopback");
            s.http_addr = "0.0.0.0:8080".parse().unwrap_or(s.http_addr);
            let err = refuse_public_address(&s).err().map(|e| e.to_string());
            assert!(
                err.as_ref()
                    .is_some_and(|e| e.contains("BSS_JWT_SECRET") && e.contains("at least 32")),
                "{short:?}: {err:?}"
            );
            assert!(err.is_some_and(|e| short.is_empty() || !e.contains(short)));
        }
        s.auth_service_url = Some("http://auth.internal".into());
        assert!(
            refuse_public_address(&s).is_ok(),
            "the JWKS verifies tokens"
        );
    }

    #[test]
    fn reading_the_secret_never_creates_one() -> anyhow::Result<()> {
        let dir = temp_dir();
        let err = LocalSecret::existing(&settings_in(&dir)).err();
        let err = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("Start the service first"), "{err}");
        assert!(
            err.contains("BSS_DATA_DIR") && err.contains(FILE_NAME),
            "{err}"
        );
        assert!(!dir.exists(), "nothing was written");

        let generated = LocalSecret::resolve(&settings_in(&dir))?;
        let read = LocalSecret::existing(&settings_in(&dir))?;
        assert_eq!(generated.as_str(), read.as_str());
        let mut configured = settings_in(&dir);
        configured.jwt_secret = Some("configured".into());
        assert_eq!(LocalSecret::existing(&configured)?.as_str(), "configured");
        fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
