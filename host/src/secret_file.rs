//! Secrets the service keeps in its data directory (the token secret, the
//! master key of field encryption): created once, atomically and private
//! (0600), and refused when others can read them.

use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, bail};

/// The file's trimmed text, creating it with `generate()` first when it
/// does not exist. `what` names the secret in errors and logs; `env` the
/// variable that replaces the file.
pub fn read_or_create(
    path: &Path,
    what: &str,
    env: &str,
    generate: impl FnOnce() -> String,
) -> anyhow::Result<String> {
    let exists = path
        .try_exists()
        .with_context(|| format!("looking for {}", path.display()))?;
    if !exists {
        create(path, what, &generate())?;
    }
    read(path, env)
}

/// The file's trimmed text, refused if other users can read it.
pub fn read(path: &Path, env: &str) -> anyhow::Result<String> {
    let meta = fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "{} is readable by other users; run `chmod 600 {}` (or set {env})",
            path.display(),
            path.display()
        );
    }
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text.trim().to_owned())
}

/// Writes `value` to a private temporary file, then links it into place:
/// it appears complete or not at all, and a file another process linked
/// first is kept (`hard_link` never replaces).
fn create(path: &Path, what: &str, value: &str) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
    let written = write_private(&tmp, value);
    let linked = written.and_then(|()| match fs::hard_link(&tmp, path) {
        Err(e) if e.kind() != ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    });
    let _ = fs::remove_file(&tmp);
    linked.with_context(|| format!("writing the generated {what} to {}", path.display()))?;
    tracing::info!(path = %path.display(), "generated a {what}");
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
