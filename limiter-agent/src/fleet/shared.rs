//! Where the fleet's entries live: Redis (every host reads the same hashes;
//! a version counter says when they changed and a log of the last changes
//! lets a host read only what changed since its version) or, with the
//! in-memory store, a local file rewritten whole on each change.

use std::{
    fs::File,
    path::{Path, PathBuf},
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use redis::{Script, Value};

use super::record::{CHANGES_KEPT, Change, Kind, Shared, json};
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
/// Changes the log keeps: a host more than this many changes behind reads
/// everything.
const LOG_KEPT: usize = 65_536;
/// Log entries one delta call returns at most (a host further behind pages).
const DELTA_PAGE: usize = 4096;
/// Entries one `HSCAN` step asks for in a full read.
const SCAN_PAGE: usize = 2048;
/// Room kept in the ban list for operators: escalations stop short of it.
const OPERATOR_HEADROOM: usize = 4096;

/// Entries one list may hold: bans as many as the kernel's ban map,
/// overrides and allow entries bounded so a full read stays small.
#[must_use]
pub fn capacity(kind: Kind) -> usize {
    match kind {
        Kind::Bans => limiter_common::BANS_CAPACITY as usize,
        Kind::Overrides => 100_000,
        Kind::Allow => 4096,
    }
}

/// Records a change (a write or a lapse) in the version, the nonce and the
/// log. Shared by the scripts below: `KEYS[2]` version, `KEYS[4]` log,
/// `KEYS[5]` the last change's nonce.
const RECORD_LUA: &str = r"
local function record(kind, field, nonce, kept)
  local version = redis.call('INCR', KEYS[2])
  redis.call('SET', KEYS[5], nonce)
  redis.call('ZADD', KEYS[4], version, version .. '\t' .. nonce .. '\t' .. kind .. '\t' .. field)
  redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -(tonumber(kept) + 1))
end
";

/// One change, atomically. `KEYS`: the kind's hash, the version, the change
/// list, the log, the last nonce. `ARGV`: the field; its JSON (`''`
/// deletes); the change's JSON (`''`: none recorded); the JSON the field
/// must hold for the change to apply (`''`: any); changes kept; the list's
/// capacity for a new field; `max` for an escalation (an entry lasting as
/// long or longer, or an operator's as recent or more, is kept); the kind's
/// name; log entries kept; this change's nonce. Returns 1 if the field was
/// there, 0 if not (a removal of what is not there changes nothing, not even
/// the version), -1 when it did not hold what was expected, -2 when the list
/// is full, -3 when the entry there was kept.
const WRITE_BODY_LUA: &str = r"
local current = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[4] ~= '' and current ~= ARGV[4] then return -1 end
if ARGV[2] == '' and not current then return 0 end
if ARGV[2] ~= '' and not current and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[6]) then
  return -2
end
if ARGV[7] == 'max' and current then
  local ok_old, old = pcall(cjson.decode, current)
  local ok_new, new = pcall(cjson.decode, ARGV[2])
  if ok_old and ok_new and type(old) == 'table' and type(new) == 'table' then
    local old_until, new_until = tonumber(old.until_ms), tonumber(new.until_ms)
    local old_at, new_at = tonumber(old.at_ms), tonumber(new.at_ms)
    if old_until and new_until and old_until >= new_until then return -3 end
    if old.by ~= 'escalation' and old_at and new_at and old_at >= new_at then return -3 end
  end
end
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
if ARGV[3] ~= '' then
  redis.call('LPUSH', KEYS[3], ARGV[3])
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[5]) - 1)
end
record(ARGV[8], ARGV[1], ARGV[10], ARGV[9])
if current then return 1 end
return 0
";

/// Removes an entry that lapsed, by Redis's clock: its maker's at once,
/// another host's `ARGV[3]` ms later (the maker may be gone), an entry
/// that is not one at once; a lasting one never. `KEYS` as for a write;
/// `ARGV`: the field; this host's name; the grace; the kind's name; log
/// entries kept; the nonce. Returns 1 if it removed it.
const LAPSE_BODY_LUA: &str = r"
pcall(redis.replicate_commands)
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then return 0 end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local ok, entry = pcall(cjson.decode, current)
local lapse = 0
if ok and type(entry) == 'table' then
  local deadline = tonumber(entry.until_ms)
  if not deadline then return 0 end
  lapse = deadline
  if entry.origin ~= ARGV[2] then lapse = deadline + tonumber(ARGV[3]) end
end
if now < lapse then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
record(ARGV[4], ARGV[1], ARGV[6], ARGV[5])
return 1
";

/// What changed since `ARGV[1]`, the version this host applied, whose
/// change had nonce `ARGV[2]`. `KEYS`: version, last nonce, log, bans,
/// overrides, allow, changes. Returns `{version, 'none'}` when nothing did;
/// `{version, 'full'}` when the log does not reach back that far or the
/// store's history is not the one this host applied (writes lost, an
/// emptied Redis); else `{upto, 'delta', {kind, field, JSON or ''}…,
/// changes, nonce}`: the entries changed after `since` up to version
/// `upto` (at most `ARGV[3]` log entries; ask again from `upto`), at their
/// current values.
const DELTA_LUA: &str = r"
local version = tonumber(redis.call('GET', KEYS[1]) or '0')
local last = redis.call('GET', KEYS[2]) or ''
local since = tonumber(ARGV[1])
if version == since and last == ARGV[2] then return {version, 'none'} end
if version <= since or since == 0 then return {version, 'full'} end
local at = redis.call('ZRANGEBYSCORE', KEYS[3], since, since)
if #at == 0 then return {version, 'full'} end
local first = string.find(at[1], '\t', 1, true)
if not first then return {version, 'full'} end
local rest = string.sub(at[1], first + 1)
local second = string.find(rest, '\t', 1, true)
if not second or string.sub(rest, 1, second - 1) ~= ARGV[2] then
  return {version, 'full'}
end
local entries = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. since, '+inf', 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[3]))
local changed = {}
local seen = {}
local upto = since
local nonce = ARGV[2]
for i = 1, #entries, 2 do
  local entry = entries[i]
  upto = tonumber(entries[i + 1])
  local tab1 = string.find(entry, '\t', 1, true)
  if not tab1 then return {version, 'full'} end
  local after_version = string.sub(entry, tab1 + 1)
  local tab2 = string.find(after_version, '\t', 1, true)
  if not tab2 then return {version, 'full'} end
  nonce = string.sub(after_version, 1, tab2 - 1)
  local key = string.sub(after_version, tab2 + 1)
  local tab3 = string.find(key, '\t', 1, true)
  if not tab3 then return {version, 'full'} end
  if not seen[key] then
    seen[key] = true
    local kind = string.sub(key, 1, tab3 - 1)
    local field = string.sub(key, tab3 + 1)
    local hash = KEYS[6]
    if kind == 'bans' then hash = KEYS[4] elseif kind == 'overrides' then hash = KEYS[5] end
    table.insert(changed, kind)
    table.insert(changed, field)
    table.insert(changed, redis.call('HGET', hash, field) or '')
  end
end
return {upto, 'delta', changed, redis.call('LRANGE', KEYS[7], 0, -1), nonce}
";

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Done; whether the entry was there before.
    Done { existed: bool },
    /// The entry was not what the write expected: nothing changed.
    NotAsExpected,
    /// The list is at its [`capacity`]: nothing changed.
    Full,
    /// An entry lasting longer was kept (`keep_later`).
    KeptLater,
}

/// What changed since a version.
#[derive(Debug)]
pub enum Delta {
    /// Nothing.
    None,
    /// Entries to set (`Some` JSON) or remove, and the change list, at
    /// `version` (whose change had `nonce`; maybe not the store's newest:
    /// ask again from it).
    Changes {
        version: u64,
        nonce: String,
        entries: Vec<(Kind, String, Option<String>)>,
        changes: Vec<Change>,
    },
    /// Too far behind (or the store went back): read everything.
    Full,
}

/// The shared entries' home.
pub enum SharedStore {
    Redis(Box<RedisShared>),
    File(std::sync::Arc<FileShared>),
}

pub struct RedisShared {
    backend: Backend,
    prefix: String,
    write: Script,
    lapse: Script,
    delta: Script,
    /// Names each change (with the version, its place in the history).
    nonces: std::collections::hash_map::RandomState,
    changes_made: AtomicU64,
}

pub struct FileShared {
    path: PathBuf,
    state: Mutex<FileState>,
    /// Names the file written aside before each rename.
    writes: AtomicU64,
}

/// The file as last read or written.
struct FileState {
    /// Counts the contents seen: it moves when the file changed.
    version: u64,
    shared: Shared,
    /// The file's modification time, length and inode then (`None`: no file).
    stamp: Option<Stamp>,
}

/// Everything, as of a version and its change's nonce.
pub struct Snapshot {
    pub version: u64,
    pub nonce: String,
    pub shared: Shared,
}

impl SharedStore {
    /// The fleet's hashes on the Redis of `settings` (connected lazily).
    ///
    /// # Errors
    /// The URL or the cluster nodes are not usable.
    pub fn redis(settings: &RedisSettings) -> Result<Self, SharedError> {
        // A connection of its own, with time for a list of tens of
        // thousands of entries (the decisions' budget is far shorter).
        let settings = RedisSettings {
            timeout: CALL_TIMEOUT,
            ..settings.clone()
        };
        Ok(Self::Redis(Box::new(RedisShared {
            backend: Backend::new(&settings).map_err(|e| SharedError::Redis(e.to_string()))?,
            prefix: settings.key_prefix.clone(),
            write: Script::new(&format!("{RECORD_LUA}{WRITE_BODY_LUA}")),
            lapse: Script::new(&format!("{RECORD_LUA}{LAPSE_BODY_LUA}")),
            delta: Script::new(DELTA_LUA),
            nonces: std::collections::hash_map::RandomState::new(),
            changes_made: AtomicU64::new(0),
        })))
    }

    /// The entries kept in `path`, read now if it exists (nothing is
    /// created until the first change). Agents on one host may share the
    /// file: each change is made under a lock on `<path>.lock` on what the
    /// file holds then, and each agent reads it again when it changed.
    ///
    /// # Errors
    /// The file exists but cannot be read or parsed.
    pub fn file(path: &Path) -> Result<Self, SharedError> {
        let file = FileShared {
            path: path.to_owned(),
            state: Mutex::new(FileState {
                version: 1,
                shared: Shared::default(),
                stamp: None,
            }),
            writes: AtomicU64::new(0),
        };
        file.reload(true)?;
        Ok(Self::File(std::sync::Arc::new(file)))
    }

    /// Whether other hosts share these entries.
    #[must_use]
    pub fn is_shared(&self) -> bool {
        matches!(self, Self::Redis(_))
    }

    /// Everything, as of the version read first: each list read in pages
    /// (never one long call); what changes meanwhile is in the next delta.
    ///
    /// # Errors
    /// Redis failed or timed out.
    pub async fn read(&self) -> Result<Snapshot, SharedError> {
        match self {
            Self::Redis(redis) => {
                let (version, nonce): (Option<u64>, Option<String>) = timed(
                    redis.backend.query(
                        redis::cmd("MGET")
                            .arg(redis.key("version"))
                            .arg(redis.key("last")),
                    ),
                )
                .await?;
                let mut shared = Shared::default();
                for kind in [Kind::Bans, Kind::Overrides, Kind::Allow] {
                    let key = redis.key(kind.name());
                    let mut cursor = 0u64;
                    loop {
                        let (next, fields): (u64, Vec<Vec<u8>>) = timed(
                            redis.backend.query(
                                redis::cmd("HSCAN")
                                    .arg(&key)
                                    .arg(cursor)
                                    .arg("COUNT")
                                    .arg(SCAN_PAGE),
                            ),
                        )
                        .await?;
                        // An entry that is not text is skipped, not fatal.
                        for pair in fields.chunks_exact(2) {
                            if let (Ok(name), Ok(value)) =
                                (std::str::from_utf8(&pair[0]), std::str::from_utf8(&pair[1]))
                            {
                                shared.set(kind, name, Some(value));
                            }
                        }
                        if next == 0 {
                            break;
                        }
                        cursor = next;
                    }
                }
                let changes: Vec<Vec<u8>> = timed(
                    redis.backend.query(
                        redis::cmd("LRANGE")
                            .arg(redis.key("changes"))
                            .arg(0)
                            .arg(-1),
                    ),
                )
                .await?;
                let changes: Vec<String> = changes
                    .iter()
                    .map(|c| String::from_utf8_lossy(c).into_owned())
                    .collect();
                shared.changes = parse_changes(&changes);
                Ok(Snapshot {
                    version: version.unwrap_or(0),
                    nonce: nonce.unwrap_or_default(),
                    shared,
                })
            }
            Self::File(file) => {
                let file = file.clone();
                blocking(move || {
                    // A full read reads the file whatever its stamp says.
                    file.reload(true)?;
                    let state = file.lock();
                    Ok(Snapshot {
                        version: state.version,
                        nonce: String::new(),
                        shared: state.shared.clone(),
                    })
                })
                .await
            }
        }
    }

    /// What changed since `version`: one `GET`-sized call when nothing did.
    ///
    /// # Errors
    /// Redis failed or timed out.
    pub async fn delta(&self, since: u64, nonce: &str) -> Result<Delta, SharedError> {
        match self {
            Self::Redis(redis) => {
                let mut invocation = redis.delta.prepare_invoke();
                for name in [
                    "version",
                    "last",
                    "log",
                    "bans",
                    "overrides",
                    "allow",
                    "changes",
                ] {
                    invocation.key(redis.key(name));
                }
                invocation.arg(since).arg(nonce).arg(DELTA_PAGE);
                let answer: Vec<Value> = timed(redis.backend.run(&invocation)).await?;
                Ok(parse_delta(&answer))
            }
            // One file: read again whole when it changed.
            Self::File(file) => {
                let state = file.lock();
                Ok(
                    if state.version == since
                        && nonce.is_empty()
                        && stamp(&file.path) == state.stamp
                    {
                        Delta::None
                    } else {
                        Delta::Full
                    },
                )
            }
        }
    }

    /// Sets (`value` is the entry's JSON) or removes `name` in `kind`'s list,
    /// recording `change`; with `expected`, only if the entry is still that
    /// JSON; with `keep_later`, not over an entry whose `until_ms` is later.
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
        keep_later: bool,
    ) -> Result<Written, SharedError> {
        match self {
            Self::Redis(redis) => {
                let mut invocation = redis.write.prepare_invoke();
                redis.keys(&mut invocation, kind);
                invocation
                    .arg(name)
                    .arg(value.unwrap_or(""))
                    .arg(change.map(json).unwrap_or_default())
                    .arg(expected.unwrap_or(""))
                    .arg(CHANGES_KEPT)
                    .arg(capacity_for(kind, keep_later))
                    .arg(if keep_later { "max" } else { "" })
                    .arg(kind.name())
                    .arg(LOG_KEPT)
                    .arg(redis.nonce());
                let outcome: i64 = timed(redis.backend.run(&invocation)).await?;
                Ok(match outcome {
                    -1 => Written::NotAsExpected,
                    -2 => Written::Full,
                    -3 => Written::KeptLater,
                    n => Written::Done { existed: n == 1 },
                })
            }
            Self::File(file) => {
                let file = file.clone();
                let (name, value) = (name.to_owned(), value.map(str::to_owned));
                let (change, expected) = (change.cloned(), expected.map(str::to_owned));
                blocking(move || {
                    file.write(
                        kind,
                        &name,
                        value.as_deref(),
                        change.as_ref(),
                        expected.as_deref(),
                        keep_later,
                    )
                })
                .await
            }
        }
    }

    /// Removes `name` from `kind`'s list if it lapsed, by the store's clock
    /// (the file's: this host's): at once if `node` made it, `grace_ms`
    /// later if another host did. Whether it removed it.
    ///
    /// # Errors
    /// Redis failed or timed out, or the file could not be written.
    pub async fn lapse(
        &self,
        kind: Kind,
        name: &str,
        node: &str,
        grace_ms: u64,
    ) -> Result<bool, SharedError> {
        match self {
            Self::Redis(redis) => {
                let mut invocation = redis.lapse.prepare_invoke();
                redis.keys(&mut invocation, kind);
                invocation
                    .arg(name)
                    .arg(node)
                    .arg(grace_ms)
                    .arg(kind.name())
                    .arg(LOG_KEPT)
                    .arg(redis.nonce());
                let removed: i64 = timed(redis.backend.run(&invocation)).await?;
                Ok(removed == 1)
            }
            Self::File(file) => {
                let file = file.clone();
                let (name, node) = (name.to_owned(), node.to_owned());
                blocking(move || file.lapse(kind, &name, &node, grace_ms)).await
            }
        }
    }
}

/// A list's capacity for a new entry: escalations leave operators room.
fn capacity_for(kind: Kind, escalation: bool) -> usize {
    if escalation {
        capacity(kind).saturating_sub(OPERATOR_HEADROOM)
    } else {
        capacity(kind)
    }
}

fn parse_changes(changes: &[String]) -> Vec<Change> {
    changes
        .iter()
        .filter_map(|c| serde_json::from_str::<Change>(c).ok())
        .collect()
}

fn parse_delta(answer: &[Value]) -> Delta {
    let text = |value: &Value| -> Option<String> {
        match value {
            Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
            Value::SimpleString(s) => Some(s.clone()),
            Value::Int(n) => Some(n.to_string()),
            _ => None,
        }
    };
    let version = answer
        .first()
        .and_then(text)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    match answer.get(1).and_then(text).as_deref() {
        Some("delta") => {
            let list = |at: usize| match answer.get(at) {
                Some(Value::Array(items)) => {
                    items.iter().map(|v| text(v).unwrap_or_default()).collect()
                }
                _ => Vec::new(),
            };
            let entries = list(2)
                .chunks_exact(3)
                .filter_map(|c| {
                    let kind = match c[0].as_str() {
                        "bans" => Kind::Bans,
                        "overrides" => Kind::Overrides,
                        "allow" => Kind::Allow,
                        _ => return None,
                    };
                    Some((kind, c[1].clone(), (!c[2].is_empty()).then(|| c[2].clone())))
                })
                .collect();
            Delta::Changes {
                version,
                nonce: answer.get(4).and_then(text).unwrap_or_default(),
                entries,
                changes: parse_changes(&list(3)),
            }
        }
        Some("none") | None => Delta::None,
        Some(_) => Delta::Full,
    }
}

impl RedisShared {
    /// Every fleet key shares one hash tag: one Cluster slot, so the
    /// scripts may name them all.
    fn key(&self, name: &str) -> String {
        format!("{}{{limiter-fleet}}:{name}", self.prefix)
    }

    /// The keys a write or a lapse of `kind` names.
    fn keys(&self, invocation: &mut redis::ScriptInvocation<'_>, kind: Kind) {
        for name in [kind.name(), "version", "changes", "log", "last"] {
            invocation.key(self.key(name));
        }
    }

    /// A name for one change, unique to it in practice.
    fn nonce(&self) -> String {
        use std::hash::BuildHasher as _;
        let n = self.changes_made.fetch_add(1, Ordering::Relaxed);
        format!(
            "{:016x}",
            self.nonces
                .hash_one((n, std::process::id(), crate::proxy::unix_ms()))
        )
    }
}

/// Takes an exclusive lock on `<path>.lock` (released when the file is
/// dropped), making the directory first.
fn lock_beside(path: &Path) -> Result<File, String> {
    use std::os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _};
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&name)
        .map_err(|e| format!("{}: {e}", PathBuf::from(&name).display()))?;
    // SAFETY: flock(2) on a descriptor this function owns.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    if rc != 0 {
        return Err(format!(
            "locking {}: {}",
            PathBuf::from(&name).display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(file)
}

/// What tells one version of the state file from another without reading
/// it: each change is a new file renamed over the old.
type Stamp = (std::time::SystemTime, u64, u64);

/// A file's modification time, length and inode; `None` when it is not there.
fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len(), meta.ino()))
}

impl FileShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, FileState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn error(&self, error: String) -> SharedError {
        SharedError::File {
            path: self.path.clone(),
            error,
        }
    }

    /// Reads the file again if it changed since it was last read or
    /// written (`force`: whatever its stamp says).
    fn reload(&self, force: bool) -> Result<(), SharedError> {
        let now = stamp(&self.path);
        let mut state = self.lock();
        if now == state.stamp && !force {
            return Ok(());
        }
        let shared = match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| self.error(e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Shared::default(),
            Err(e) => return Err(self.error(e.to_string())),
        };
        state.shared = shared;
        state.stamp = now;
        state.version += 1;
        Ok(())
    }

    /// Removes `name` if it lapsed by this host's clock (the file's only
    /// clock): at once if `node` made it, `grace_ms` later otherwise.
    fn lapse(
        &self,
        kind: Kind,
        name: &str,
        node: &str,
        grace_ms: u64,
    ) -> Result<bool, SharedError> {
        let Some(current) = self.lock().shared.get_json(kind, name) else {
            return Ok(false);
        };
        let now = crate::proxy::unix_ms();
        let lapsed = serde_json::from_str::<serde_json::Value>(&current).map_or(true, |entry| {
            entry["until_ms"].as_u64().is_some_and(|until| {
                let mine = entry["origin"].as_str() == Some(node);
                now >= if mine {
                    until
                } else {
                    until.saturating_add(grace_ms)
                }
            })
        });
        if !lapsed {
            return Ok(false);
        }
        Ok(matches!(
            self.write(kind, name, None, None, Some(&current), false)?,
            Written::Done { existed: true }
        ))
    }

    fn write(
        &self,
        kind: Kind,
        name: &str,
        value: Option<&str>,
        change: Option<&Change>,
        expected: Option<&str>,
        keep_later: bool,
    ) -> Result<Written, SharedError> {
        // Under the lock, on what the file holds now (another agent on
        // this host may have changed it; read whatever its stamp says).
        let _lock = lock_beside(&self.path).map_err(|e| self.error(e))?;
        self.reload(true)?;
        let mut state = self.lock();
        let current = state.shared.get_json(kind, name);
        if let Some(expected) = expected
            && current.as_deref() != Some(expected)
        {
            return Ok(Written::NotAsExpected);
        }
        match (value, &current) {
            (None, None) => return Ok(Written::Done { existed: false }),
            (Some(_), None) if state.shared.len(kind) >= capacity_for(kind, keep_later) => {
                return Ok(Written::Full);
            }
            (Some(new), Some(old)) if keep_later && kept(old, new) => {
                return Ok(Written::KeptLater);
            }
            _ => {}
        }
        let mut next = state.shared.clone();
        let existed = next.set(kind, name, value);
        if let Some(change) = change {
            next.record(change.clone());
        }
        self.persist(&next).map_err(|e| self.error(e))?;
        state.shared = next;
        state.stamp = stamp(&self.path);
        state.version += 1;
        Ok(Written::Done { existed })
    }

    /// Writes `shared` beside the file (a name of its own per write) and
    /// renames it over, so a crash leaves the old file or the new one.
    fn persist(&self, shared: &Shared) -> Result<(), String> {
        use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
        let n = self.writes.fetch_add(1, Ordering::Relaxed);
        let mut name = self.path.as_os_str().to_owned();
        name.push(format!(".{}.{n}.tmp", std::process::id()));
        let aside = PathBuf::from(name);
        let bytes = serde_json::to_vec_pretty(shared).map_err(|e| e.to_string())?;
        // The operator's changes: readable by the agent's user only.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&aside)
            .map_err(|e| e.to_string())?;
        let written = file
            .write_all(&bytes)
            .and_then(|()| file.sync_all())
            .and_then(|()| std::fs::rename(&aside, &self.path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&aside);
            return Err(e.to_string());
        }
        Ok(())
    }
}

/// Whether an escalation's `new` entry leaves `old` in place: `old` lasts
/// as long or longer, or an operator made it as recently or more (as the
/// Redis script decides).
fn kept(old: &str, new: &str) -> bool {
    let parse = |text: &str| serde_json::from_str::<serde_json::Value>(text).ok();
    let (Some(old), Some(new)) = (parse(old), parse(new)) else {
        return false;
    };
    let field = |v: &serde_json::Value, name: &str| v[name].as_u64();
    let longer = matches!(
        (field(&old, "until_ms"), field(&new, "until_ms")),
        (Some(o), Some(n)) if o >= n
    );
    let decided = old["by"].as_str() != Some("escalation")
        && matches!(
            (field(&old, "at_ms"), field(&new, "at_ms")),
            (Some(o), Some(n)) if o >= n
        );
    longer || decided
}

/// Runs a file operation (a lock, a read, an fsync) off the runtime.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, SharedError> + Send + 'static,
) -> Result<T, SharedError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(SharedError::Redis(format!("state file task: {e}"))))
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
    use crate::fleet::record::{Allow, Ban};

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("limiter-fleet-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[tokio::test]
    async fn a_file_keeps_changes_across_a_restart_and_agents_sharing_it_see_each_other() {
        let dir = dir("file");
        let path = dir.join("sub/runtime.json");
        let store = SharedStore::file(&path).unwrap();
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
        let first = store.read().await.unwrap().version;
        assert!(matches!(store.delta(first, "").await.unwrap(), Delta::None));
        assert_eq!(
            store
                .write(
                    Kind::Allow,
                    "192.0.2.0/24",
                    Some(&entry),
                    Some(&change),
                    None,
                    false
                )
                .await
                .unwrap(),
            Written::Done { existed: false }
        );
        assert!(matches!(store.delta(first, "").await.unwrap(), Delta::Full));
        assert_eq!(
            store
                .write(Kind::Allow, "192.0.2.0/24", None, None, Some("{}"), false)
                .await
                .unwrap(),
            Written::NotAsExpected,
            "a removal of what is no longer there changes nothing"
        );
        // A second agent on the same file: each change on what the file holds.
        let other = SharedStore::file(&path).unwrap();
        assert_eq!(
            other
                .write(
                    Kind::Allow,
                    "198.51.100.0/24",
                    Some(&entry),
                    None,
                    None,
                    false
                )
                .await
                .unwrap(),
            Written::Done { existed: false }
        );
        let mine = first + 1;
        assert!(
            matches!(store.delta(mine, "").await.unwrap(), Delta::Full),
            "the file changed"
        );
        let both = store.read().await.unwrap().shared;
        assert_eq!(both.allow.len(), 2, "{both:?}");
        drop((store, other));
        let again = SharedStore::file(&path).unwrap();
        let shared = again.read().await.unwrap().shared;
        assert_eq!(shared.allow["192.0.2.0/24"].reason, "office");
        assert_eq!(shared.changes, vec![change]);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        drop(again);
        std::fs::write(&path, "{ not json").unwrap();
        assert!(
            SharedStore::file(&path).is_err(),
            "a damaged file is refused"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_later_ban_is_kept_and_a_full_list_refuses_new_entries() {
        let dir = dir("later");
        let store = SharedStore::file(&dir.join("runtime.json")).unwrap();
        let ban = |until_ms| {
            json(&Ban {
                until_ms,
                origin: "a".into(),
                by: "escalation".into(),
                reason: String::new(),
                tier: None,
                at_ms: 1,
            })
        };
        let write = |value: String, keep_later| {
            let store = &store;
            async move {
                store
                    .write(
                        Kind::Bans,
                        "10.0.0.1/32",
                        Some(&value),
                        None,
                        None,
                        keep_later,
                    )
                    .await
                    .unwrap()
            }
        };
        assert_eq!(
            write(ban(2000), true).await,
            Written::Done { existed: false }
        );
        assert_eq!(write(ban(1000), true).await, Written::KeptLater);
        assert_eq!(
            write(ban(3000), true).await,
            Written::Done { existed: true }
        );
        assert_eq!(
            write(ban(1000), false).await,
            Written::Done { existed: true },
            "an operator's ban replaces"
        );
        // A file already holding as many allow entries as there may be.
        let mut full = Shared::default();
        for n in 0..capacity(Kind::Allow) {
            full.allow.insert(
                format!("n{n}"),
                serde_json::from_str(&json(&Allow {
                    until_ms: None,
                    reason: String::new(),
                    origin: "a".into(),
                    by: "b".into(),
                    at_ms: 0,
                }))
                .unwrap(),
            );
        }
        std::fs::write(dir.join("full.json"), serde_json::to_vec(&full).unwrap()).unwrap();
        let store = SharedStore::file(&dir.join("full.json")).unwrap();
        assert_eq!(
            store
                .write(Kind::Allow, "one-more", Some("{}"), None, None, false)
                .await
                .unwrap(),
            Written::Full
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_delta_answer_is_read_as_entries_and_changes() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        assert!(matches!(
            parse_delta(&[Value::Int(7), bulk("none")]),
            Delta::None
        ));
        assert!(matches!(
            parse_delta(&[Value::Int(7), bulk("full")]),
            Delta::Full
        ));
        let answer = [
            Value::Int(9),
            bulk("delta"),
            Value::Array(vec![
                bulk("bans"),
                bulk("10.0.0.1/32"),
                bulk(""),
                bulk("overrides"),
                bulk("ab"),
                bulk("{\"x\":1}"),
            ]),
            Value::Array(vec![]),
        ];
        let Delta::Changes {
            version, entries, ..
        } = parse_delta(&answer)
        else {
            panic!("a delta")
        };
        assert_eq!(version, 9);
        assert_eq!(
            entries,
            vec![
                (Kind::Bans, "10.0.0.1/32".to_owned(), None),
                (
                    Kind::Overrides,
                    "ab".to_owned(),
                    Some("{\"x\":1}".to_owned())
                ),
            ]
        );
    }
}
