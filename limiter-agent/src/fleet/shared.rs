//! Where the fleet's entries live: Redis (every host reads the same hashes,
//! a version counter says when they changed) or, with the in-memory store,
//! a local file rewritten whole on each change.

use std::{
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
    time::Duration,
};

use redis::Script;

use super::record::{Change, Kind, Shared, json};
use crate::limit::{RedisSettings, redis::Backend};

/// Why the shared entries could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("shared store: {0}")]
    Redis(String),
    #[error("shared store timed out")]
    Timeout,
    #[error("state file {path}: {error}")]
    File { path: PathBuf, error: String },
}

/// Longest a read or a change waits for Redis.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// One change, atomically. `KEYS`: the kind's hash, the version, the change
/// list. `ARGV`: the field; its JSON (`''` deletes); the change's JSON
/// (`''`: none recorded); the JSON the field must hold for the change to
/// apply (`''`: any). Returns 1 if the field was there, 0 if not, -1 when
/// it did not hold what was expected (nothing changed). Removing what is
/// not there changes nothing, not even the version.
const WRITE_LUA: &str = r"
if ARGV[4] ~= '' and redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[4] then return -1 end
local existed = redis.call('HEXISTS', KEYS[1], ARGV[1])
if ARGV[2] == '' and existed == 0 then return 0 end
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
if ARGV[3] ~= '' then
  redis.call('LPUSH', KEYS[3], ARGV[3])
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[5]) - 1)
end
redis.call('INCR', KEYS[2])
return existed
";

/// Everything at one version. `KEYS`: version, bans, overrides, allow, changes.
const READ_LUA: &str = r"
return {
  redis.call('GET', KEYS[1]) or '0',
  redis.call('HGETALL', KEYS[2]),
  redis.call('HGETALL', KEYS[3]),
  redis.call('HGETALL', KEYS[4]),
  redis.call('LRANGE', KEYS[5], 0, -1),
}
";

/// The shared entries' home.
pub enum SharedStore {
    Redis(Box<RedisShared>),
    File(FileShared),
}

pub struct RedisShared {
    backend: Backend,
    prefix: String,
    write: Script,
    read: Script,
}

pub struct FileShared {
    path: PathBuf,
    state: Mutex<(u64, Shared)>,
}

/// Read at one version.
pub type Snapshot = (u64, Shared);

impl SharedStore {
    /// The fleet's hashes on the Redis of `settings` (connected lazily).
    ///
    /// # Errors
    /// The URL or the cluster nodes are not usable.
    pub fn redis(settings: &RedisSettings) -> Result<Self, SharedError> {
        Ok(Self::Redis(Box::new(RedisShared {
            backend: Backend::new(settings).map_err(|e| SharedError::Redis(e.to_string()))?,
            prefix: settings.key_prefix.clone(),
            write: Script::new(WRITE_LUA),
            read: Script::new(READ_LUA),
        })))
    }

    /// The entries kept in `path`, read now if it exists.
    ///
    /// # Errors
    /// The file exists but cannot be read or parsed.
    pub fn file(path: &Path) -> Result<Self, SharedError> {
        let file_error = |error: String| SharedError::File {
            path: path.to_owned(),
            error,
        };
        let shared = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| file_error(e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Shared::default(),
            Err(e) => return Err(file_error(e.to_string())),
        };
        Ok(Self::File(FileShared {
            path: path.to_owned(),
            state: Mutex::new((1, shared)),
        }))
    }

    /// Whether other hosts share these entries.
    #[must_use]
    pub fn is_shared(&self) -> bool {
        matches!(self, Self::Redis(_))
    }

    /// The version: it changes with every change.
    ///
    /// # Errors
    /// Redis failed or timed out.
    pub async fn version(&self) -> Result<u64, SharedError> {
        match self {
            Self::Redis(redis) => {
                let key = redis.key("version");
                let version: Option<u64> =
                    timed(redis.backend.query(redis::cmd("GET").arg(&key))).await?;
                Ok(version.unwrap_or(0))
            }
            Self::File(file) => Ok(file.lock().0),
        }
    }

    /// Everything, at one version.
    ///
    /// # Errors
    /// Redis failed or timed out.
    pub async fn read(&self) -> Result<Snapshot, SharedError> {
        match self {
            Self::Redis(redis) => {
                let mut invocation = redis.read.prepare_invoke();
                for name in ["version", "bans", "overrides", "allow", "changes"] {
                    invocation.key(redis.key(name));
                }
                let (version, bans, overrides, allow, changes): (
                    String,
                    Vec<String>,
                    Vec<String>,
                    Vec<String>,
                    Vec<String>,
                ) = timed(redis.backend.run(&invocation)).await?;
                let mut shared = Shared::default();
                for (kind, fields) in [
                    (Kind::Bans, bans),
                    (Kind::Overrides, overrides),
                    (Kind::Allow, allow),
                ] {
                    for pair in fields.chunks_exact(2) {
                        shared.set(kind, &pair[0], Some(&pair[1]));
                    }
                }
                shared.changes = changes
                    .iter()
                    .filter_map(|c| serde_json::from_str::<Change>(c).ok())
                    .collect();
                Ok((version.parse().unwrap_or(0), shared))
            }
            Self::File(file) => Ok(file.lock().clone()),
        }
    }

    /// Sets (`value` is the entry's JSON) or removes `name` in `kind`'s list,
    /// recording `change`; with `expected`, only if the entry is still that
    /// JSON. Whether the entry was there (`None`: not as expected).
    ///
    /// # Errors
    /// Redis failed or timed out, or the file could not be written (then
    /// nothing changed).
    pub async fn write(
        &self,
        kind: Kind,
        name: &str,
        value: Option<&str>,
        change: Option<&Change>,
        expected: Option<&str>,
    ) -> Result<Option<bool>, SharedError> {
        match self {
            Self::Redis(redis) => {
                let mut invocation = redis.write.prepare_invoke();
                invocation
                    .key(redis.key(kind.name()))
                    .key(redis.key("version"))
                    .key(redis.key("changes"))
                    .arg(name)
                    .arg(value.unwrap_or(""))
                    .arg(change.map(json).unwrap_or_default())
                    .arg(expected.unwrap_or(""))
                    .arg(super::record::CHANGES_KEPT);
                let existed: i64 = timed(redis.backend.run(&invocation)).await?;
                Ok(match existed {
                    -1 => None,
                    n => Some(n == 1),
                })
            }
            Self::File(file) => file.write(kind, name, value, change, expected),
        }
    }
}

impl RedisShared {
    /// Every fleet key shares one hash tag: one Cluster slot, so the
    /// scripts may name them all.
    fn key(&self, name: &str) -> String {
        format!("{}{{limiter-fleet}}:{name}", self.prefix)
    }
}

impl FileShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, Shared)> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(
        &self,
        kind: Kind,
        name: &str,
        value: Option<&str>,
        change: Option<&Change>,
        expected: Option<&str>,
    ) -> Result<Option<bool>, SharedError> {
        let mut state = self.lock();
        if let Some(expected) = expected
            && state.1.get_json(kind, name).as_deref() != Some(expected)
        {
            return Ok(None);
        }
        if value.is_none() && state.1.get_json(kind, name).is_none() {
            return Ok(Some(false));
        }
        let mut next = state.1.clone();
        let existed = next.set(kind, name, value);
        if let Some(change) = change {
            next.record(change.clone());
        }
        self.persist(&next).map_err(|error| SharedError::File {
            path: self.path.clone(),
            error,
        })?;
        state.0 += 1;
        state.1 = next;
        Ok(Some(existed))
    }

    /// Writes `shared` beside the file and renames it over, so a crash
    /// leaves the old file or the new one.
    fn persist(&self, shared: &Shared) -> Result<(), String> {
        use std::io::Write as _;
        if let Some(dir) = self.path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        }
        let aside = self.path.with_extension("tmp");
        let bytes = serde_json::to_vec_pretty(shared).map_err(|e| e.to_string())?;
        let mut file = std::fs::File::create(&aside).map_err(|e| e.to_string())?;
        file.write_all(&bytes).map_err(|e| e.to_string())?;
        file.sync_all().map_err(|e| e.to_string())?;
        std::fs::rename(&aside, &self.path).map_err(|e| e.to_string())
    }
}

async fn timed<T>(call: impl Future<Output = redis::RedisResult<T>>) -> Result<T, SharedError> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(SharedError::Redis(e.to_string())),
        Err(_) => Err(SharedError::Timeout),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::record::Allow;

    #[tokio::test]
    async fn a_file_keeps_changes_across_a_restart_and_refuses_stale_removals() {
        let dir = std::env::temp_dir().join(format!("limiter-fleet-file-{}", std::process::id()));
        let path = dir.join("sub/runtime.json");
        let _ = std::fs::remove_dir_all(&dir);
        let store = SharedStore::file(&path).unwrap();
        let v0 = store.version().await.unwrap();
        let entry = json(&Allow {
            until_ms: None,
            reason: "office".into(),
            origin: "a".into(),
            by: "ops".into(),
            at_ms: 5,
        });
        let change = Change {
            at_ms: 5,
            origin: "a".into(),
            by: "ops".into(),
            action: "put".into(),
            kind: Kind::Allow,
            target: "192.0.2.0/24".into(),
        };
        assert_eq!(
            store
                .write(
                    Kind::Allow,
                    "192.0.2.0/24",
                    Some(&entry),
                    Some(&change),
                    None
                )
                .await
                .unwrap(),
            Some(false)
        );
        assert!(store.version().await.unwrap() > v0);
        assert_eq!(
            store
                .write(Kind::Allow, "192.0.2.0/24", None, None, Some("{}"))
                .await
                .unwrap(),
            None,
            "a removal of what is no longer there changes nothing"
        );
        let again = SharedStore::file(&path).unwrap();
        let (_, shared) = again.read().await.unwrap();
        assert_eq!(shared.allow["192.0.2.0/24"].reason, "office");
        assert_eq!(shared.changes, vec![change]);
        std::fs::write(&path, "{ not json").unwrap();
        assert!(
            SharedStore::file(&path).is_err(),
            "a damaged file is refused"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
