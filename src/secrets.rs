//! Secrets generated on first start and persisted: the admin key (a file in the data directory
//! unless `WEIR_ADMIN_KEY`/config sets one) and the visitor-cookie HMAC key (in the store).
//! Token signing keys are managed by `room::token`.

use std::io::Write;
use std::path::PathBuf;

use base64::Engine;
use rand::RngCore;

use crate::config::Config;
use crate::store::{Store, Table};
use crate::RunError;

const COOKIE_KEY: &str = "cookie_key";

pub struct Secrets {
    pub admin_key: String,
    /// The key as generated on this start (to print once); `None` when it existed or was configured.
    pub generated_admin_key: Option<String>,
    pub admin_key_path: PathBuf,
    pub cookie_key: [u8; 32],
}

pub fn random_token(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

impl Secrets {
    pub async fn load_or_generate(config: &Config, store: &dyn Store) -> Result<Secrets, RunError> {
        let admin_key_path = config.data_dir.join("admin.key");
        let (admin_key, generated_admin_key) = match &config.admin_key {
            Some(k) => (k.clone(), None),
            None => match std::fs::read_to_string(&admin_key_path) {
                Ok(k) if !k.trim().is_empty() => (k.trim().to_string(), None),
                _ => {
                    let key = random_token(32);
                    write_private(&admin_key_path, key.as_bytes())
                        .map_err(|e| RunError::Secrets(format!("{}: {e}", admin_key_path.display())))?;
                    (key.clone(), Some(key))
                }
            },
        };
        let cookie_key = match store.get(Table::Meta, COOKIE_KEY).await? {
            Some(k) if k.len() == 32 => {
                let mut key = [0u8; 32];
                key.copy_from_slice(&k);
                key
            }
            _ => {
                let mut key = [0u8; 32];
                rand::rng().fill_bytes(&mut key);
                // Nodes of a cluster starting together: the first key stored is everyone's.
                if !store.insert_new(Table::Meta, COOKIE_KEY, key.to_vec()).await? {
                    match store.get(Table::Meta, COOKIE_KEY).await? {
                        Some(k) if k.len() == 32 => key.copy_from_slice(&k),
                        _ => store.put(Table::Meta, COOKIE_KEY, key.to_vec()).await?,
                    }
                }
                key
            }
        };
        Ok(Secrets { admin_key, generated_admin_key, admin_key_path, cookie_key })
    }
}

fn write_private(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(data)?;
    file.sync_all()
}
