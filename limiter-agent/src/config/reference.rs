//! Holds `docs/configuration.md` to the config types, so the reference
//! cannot drift: every key the file accepts is documented and no other (read
//! from the raw serde types themselves, tables keyed by name included), every
//! documented default is the one applied (a key left out of the file, even
//! one the base sets; a default `as` another key at that key's example too;
//! `none` only for an option whose absence is unset), and every key's Reload
//! column is the side of the startup/live split its example changes. Configs
//! are compared field by field, never through `Debug`, which prints a
//! `HashMap` in no fixed order.

use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::{
        OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use serde::{
    Deserialize as _,
    de::{self, DeserializeSeed, IntoDeserializer as _, MapAccess, SeqAccess, Visitor},
};

use super::{Config, ConfigError, LiveSettings, raw::RawConfig};

const DOC: &str = include_str!("../../../docs/configuration.md");

/// The smallest valid file, which every check starts from; it declares one
/// key so that the `[[key]]` rows have an entry to set.
const BASE: &str = r#"
[server]
listen = "127.0.0.1:8080"

[[tier]]
route = "/api/chat"
limit = 10
window = "1m"

[[key]]
key_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
"#;

// ---- The keys the config file accepts, read from the raw types ----

/// What the recorder saw of the raw types.
#[derive(Default)]
struct Shapes {
    /// Each struct's field names, by the dotted path of the table it sits in.
    tables: BTreeMap<String, Vec<&'static str>>,
    /// The paths of the fields read through `deserialize_option`: the keys
    /// whose absence can mean unset.
    optional: BTreeSet<String>,
}

/// A deserializer that answers every request with a placeholder value and
/// records, for each struct it is asked for, the field names serde's derive
/// passes to `deserialize_struct`, under the dotted path of the table it
/// sits in (`""` for the file, `"server"`, `"tier"` for each `[[tier]]`,
/// `"name.*"` for the values of a table keyed by name), and which fields are
/// options.
struct Recorder<'a> {
    path: String,
    shapes: &'a RefCell<Shapes>,
}

impl Recorder<'_> {
    fn child(&self, field: &str) -> Self {
        Recorder {
            path: join(&self.path, field),
            shapes: self.shapes,
        }
    }
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_owned()
    } else {
        format!("{path}.{field}")
    }
}

/// Deserializer methods that hand their visitor one fixed value.
macro_rules! placeholder {
    ($($method:ident => $visit:ident($value:expr)),* $(,)?) => {
        $(fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
            visitor.$visit($value)
        })*
    };
}

impl<'de> de::Deserializer<'de> for Recorder<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom(format!(
            "{}: a shape the recorder does not know",
            self.path
        )))
    }

    placeholder! {
        deserialize_bool => visit_bool(false),
        deserialize_i8 => visit_i64(0), deserialize_i16 => visit_i64(0),
        deserialize_i32 => visit_i64(0), deserialize_i64 => visit_i64(0),
        deserialize_u8 => visit_u64(0), deserialize_u16 => visit_u64(0),
        deserialize_u32 => visit_u64(0), deserialize_u64 => visit_u64(0),
        deserialize_f32 => visit_f64(0.0), deserialize_f64 => visit_f64(0.0),
        deserialize_str => visit_str(""), deserialize_string => visit_str(""),
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        self.shapes.borrow_mut().optional.insert(self.path.clone());
        visitor.visit_some(self)
    }

    /// One entry named `*`, so that the values of a table with free-form
    /// keys (`[[key]] limits`) are recorded too, under `path.*`: a table of
    /// tables keyed by name cannot hide its keys.
    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_map(AnyName(Some(self)))
    }

    /// One element, so that a list of tables (`[[tier]]`) is recorded too.
    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_seq(One(Some(self)))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.shapes
            .borrow_mut()
            .tables
            .insert(self.path.clone(), fields.to_vec());
        visitor.visit_map(Fields {
            parent: self,
            names: fields.iter(),
            current: "",
        })
    }

    serde::forward_to_deserialize_any! {
        i128 u128 char bytes byte_buf unit unit_struct newtype_struct tuple
        tuple_struct enum identifier ignored_any
    }
}

/// A sequence of one recorded element.
struct One<'a>(Option<Recorder<'a>>);

impl<'de> SeqAccess<'de> for One<'_> {
    type Error = de::value::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Self::Error> {
        self.0.take().map(|item| seed.deserialize(item)).transpose()
    }
}

/// Every field of a struct, each value recorded under the field's path.
struct Fields<'a> {
    parent: Recorder<'a>,
    names: std::slice::Iter<'static, &'static str>,
    current: &'static str,
}

impl<'de> MapAccess<'de> for Fields<'_> {
    type Error = de::value::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Self::Error> {
        let Some(&field) = self.names.next() else {
            return Ok(None);
        };
        self.current = field;
        seed.deserialize(field.into_deserializer()).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, Self::Error> {
        seed.deserialize(self.parent.child(self.current))
    }
}

/// A table with free-form keys (like `[[key]] limits`) of one entry, named
/// `*`, its value recorded under `path.*`. A map whose keys are not names
/// is refused, so a shape the reference cannot describe fails loudly.
struct AnyName<'a>(Option<Recorder<'a>>);

impl<'de> MapAccess<'de> for AnyName<'_> {
    type Error = de::value::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Self::Error> {
        let Some(recorder) = &self.0 else {
            return Ok(None);
        };
        let path = recorder.path.clone();
        seed.deserialize("*".into_deserializer())
            .map(Some)
            .map_err(|e: Self::Error| {
                de::Error::custom(format!("{path}: a table whose keys are not names: {e}"))
            })
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, Self::Error> {
        let recorder = self
            .0
            .take()
            .ok_or_else(|| de::Error::custom("a value without a key"))?;
        seed.deserialize(recorder.child("*"))
    }
}

/// The raw types' shapes, read once.
fn shapes() -> &'static Shapes {
    static SHAPES: OnceLock<Shapes> = OnceLock::new();
    SHAPES.get_or_init(|| {
        let shapes = RefCell::default();
        RawConfig::deserialize(Recorder {
            path: String::new(),
            shapes: &shapes,
        })
        .expect("the raw types take the recorder's placeholders");
        shapes.into_inner()
    })
}

/// The keys the file accepts, by section: each recorded table but the file
/// itself, with the fields that are tables themselves taken out (they are
/// sections of their own, `[name]` or, for a table of tables keyed by name,
/// `[name.*]`).
fn accepted() -> BTreeMap<String, BTreeSet<String>> {
    let tables = &shapes().tables;
    let mut accepted: BTreeMap<String, BTreeSet<String>> = tables
        .iter()
        .map(|(path, fields)| {
            let keys = fields
                .iter()
                .filter(|field| {
                    let path = join(path, field);
                    !tables.contains_key(&path) && !tables.contains_key(&join(&path, "*"))
                })
                .map(|field| (*field).to_owned())
                .collect();
            (path.clone(), keys)
        })
        .collect();
    let top_level = accepted.remove("").unwrap_or_default();
    assert!(
        top_level.is_empty(),
        "top-level keys outside any section: {top_level:?}; the reference has no place for them"
    );
    accepted
}

// ---- The reference's tables ----

/// A key's documented default.
#[derive(Debug)]
enum Documented {
    /// "required": the file is refused without the key.
    Required,
    /// "none": absent means unset, which TOML cannot write.
    Unset,
    /// "as `other`": the documented default of another key of the section.
    As(String),
    /// A TOML value.
    Value(String),
}

/// One row of a section's table.
#[derive(Debug)]
struct Row {
    section: String,
    key: String,
    default: Documented,
    format: String,
    restart: bool,
    example: String,
}

impl Row {
    fn name(&self) -> String {
        format!("{}.{}", self.section, self.key)
    }
}

/// The cells of a table row, split on the `|` that are not escaped.
fn cells(line: &str) -> Vec<String> {
    let mut cells = vec![String::new()];
    let mut chars = line.trim().trim_start_matches('|').chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                cells.last_mut().unwrap().push(chars.next().unwrap());
            }
            '|' => cells.push(String::new()),
            c => cells.last_mut().unwrap().push(c),
        }
    }
    if cells.last().is_some_and(|c| c.trim().is_empty()) {
        cells.pop();
    }
    cells.into_iter().map(|c| c.trim().to_owned()).collect()
}

/// What a cell holds between one pair of backticks.
fn code(cell: &str) -> Option<&str> {
    let inner = cell.strip_prefix('`')?.strip_suffix('`')?;
    (!inner.contains('`')).then_some(inner)
}

/// Every row of every section's table: a section is a `## ` heading naming
/// `` `[name]` `` or `` `[[name]]` ``; its table has a `Key` column.
fn rows() -> Vec<Row> {
    let mut rows = Vec::new();
    let mut section: Option<String> = None;
    let mut columns: Vec<String> = Vec::new();
    for line in DOC.lines() {
        if let Some(heading) = line.strip_prefix("## ") {
            section = code(heading.trim())
                .filter(|c| c.starts_with('['))
                .map(|c| c.trim_matches(['[', ']']).to_owned());
            columns.clear();
            continue;
        }
        let Some(section) = &section else { continue };
        if !line.starts_with('|') || line.starts_with("|---") {
            continue;
        }
        let cells = cells(line);
        if cells.first().is_some_and(|c| c == "Key") {
            columns = cells;
            continue;
        }
        let cell = |name: &str| -> &str {
            let i = columns
                .iter()
                .position(|c| c == name)
                .unwrap_or_else(|| panic!("[{section}]: the table has no `{name}` column"));
            cells.get(i).map_or("", String::as_str)
        };
        let key = code(cell("Key"))
            .unwrap_or_else(|| panic!("[{section}]: a row whose key is not in backticks: {line}"))
            .to_owned();
        let name = format!("{section}.{key}");
        let default = match cell("Default") {
            "required" => Documented::Required,
            "none" => Documented::Unset,
            other => match (other.strip_prefix("as "), code(other)) {
                (Some(key), _) => Documented::As(
                    code(key)
                        .unwrap_or_else(|| panic!("{name}: `as` names a key in backticks"))
                        .to_owned(),
                ),
                (None, Some(value)) => Documented::Value(value.to_owned()),
                (None, None) => panic!(
                    "{name}: the default must be a value in backticks, `required`, `none` or `as` a key, not {other:?}"
                ),
            },
        };
        let restart = match cell("Reload") {
            "restart" => true,
            "live" => false,
            other => panic!("{name}: Reload is `live` or `restart`, not {other:?}"),
        };
        let example = code(cell("Example"))
            .unwrap_or_else(|| panic!("{name}: the example must be in backticks"))
            .to_owned();
        rows.push(Row {
            section: section.clone(),
            key,
            default,
            format: cell("Format").to_owned(),
            restart,
            example,
        });
    }
    rows
}

// ---- Config files built from the base and the reference's values ----

fn value(name: &str, text: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {text}"))
        .unwrap_or_else(|e| panic!("{name}: `{text}` is not a TOML value: {e}"))
        .remove("v")
        .expect("the value just parsed")
}

/// A row's example as `key = value` entries of its section: the example is
/// the key's value, or (when the key needs others beside it) a list of
/// `key = value` that names the key too.
fn example(row: &Row) -> Vec<(String, toml::Value)> {
    let name = row.name();
    let entries: Vec<(String, toml::Value)> =
        match toml::from_str::<toml::Table>(&format!("v = {}", row.example)) {
            Ok(mut table) => vec![(row.key.clone(), table.remove("v").expect("parsed"))],
            Err(_) => match value(&name, &format!("{{ {} }}", row.example)) {
                toml::Value::Table(table) => table.into_iter().collect(),
                _ => unreachable!("an inline table parses as a table"),
            },
        };
    assert!(
        entries.iter().any(|(key, _)| *key == row.key),
        "{name}: the example `{}` does not set the key",
        row.example
    );
    entries
}

/// Where the files that examples name are made: a relative path the
/// repository holds is used from there; any other is made in this directory,
/// holding a 32-character secret (what `rls.secret_file` asks for; TLS files
/// are not read when a config is validated).
fn files_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("limiter-config-reference-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    dir
}

fn with_files(value: toml::Value) -> toml::Value {
    static MADE: AtomicUsize = AtomicUsize::new(0);
    match value {
        toml::Value::Array(items) => {
            toml::Value::Array(items.into_iter().map(with_files).collect())
        }
        toml::Value::String(text) => {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            let in_repo = root.join(&text);
            if Path::new(&text).is_relative() && in_repo.exists() {
                return toml::Value::String(in_repo.display().to_string());
            }
            let name = Path::new(&text).file_name().expect("a file name");
            let made = files_dir().join(name);
            if !made.exists() {
                // Written aside and renamed, so a test running beside this
                // one never reads it half written.
                let aside =
                    made.with_extension(format!("{}.tmp", MADE.fetch_add(1, Ordering::Relaxed)));
                std::fs::write(&aside, "0123456789abcdef0123456789abcdef\n").expect("a test file");
                std::fs::rename(&aside, &made).expect("a test file");
            }
            toml::Value::String(made.display().to_string())
        }
        other => other,
    }
}

/// The base file with `entries` set in `section` (for a list of tables,
/// in its first entry); keys documented as paths name real files.
fn file(rows: &[Row], section: &str, entries: &[(String, toml::Value)]) -> toml::Table {
    let mut file: toml::Table = toml::from_str(BASE).expect("the base parses");
    for (key, value) in entries {
        set(rows, &mut file, section, key, value);
    }
    file
}

/// `key = value` in `section` of `file`; a key documented as a path names a
/// real file.
fn set(rows: &[Row], file: &mut toml::Table, section: &str, key: &str, value: &toml::Value) {
    let is_path = rows
        .iter()
        .any(|r| r.section == section && r.key == key && r.format.contains("path"));
    let value = if is_path {
        with_files(value.clone())
    } else {
        value.clone()
    };
    table(file, section).insert(key.to_owned(), value);
}

/// `section` of `file`, made if absent; a dotted section (`tier.tokens`)
/// is a table inside its parent, and a list of tables stands for its first.
fn table<'a>(file: &'a mut toml::Table, section: &str) -> &'a mut toml::Table {
    let mut current = file;
    for part in section.split('.') {
        let entry = current
            .entry(part)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let entry = match entry {
            toml::Value::Array(items) => items.first_mut().expect("the base's entry"),
            other => other,
        };
        current = entry
            .as_table_mut()
            .unwrap_or_else(|| panic!("[{section}] is a table in the base"));
    }
    current
}

fn parse(file: &toml::Table) -> Result<Config, ConfigError> {
    Config::parse(&toml::to_string(file).expect("a table prints"))
}

/// A row's example split into what it needs beside the key, and the key's
/// own value.
fn context(row: &Row) -> (Vec<(String, toml::Value)>, toml::Value) {
    let mut entries = example(row);
    let at = entries
        .iter()
        .position(|(key, _)| *key == row.key)
        .expect("checked by example()");
    let (_, own) = entries.remove(at);
    (entries, own)
}

// ---- The checks ----

#[test]
fn every_key_the_file_accepts_is_documented_and_no_other() {
    let accepted = accepted();
    let mut documented: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut problems = Vec::new();
    for row in rows() {
        if !documented
            .entry(row.section.clone())
            .or_default()
            .insert(row.key.clone())
        {
            problems.push(format!("{}: documented twice", row.name()));
        }
    }
    let sections: BTreeSet<&String> = accepted.keys().chain(documented.keys()).collect();
    let none = BTreeSet::new();
    for section in sections {
        let accepts = accepted.get(section).unwrap_or(&none);
        let lists = documented.get(section).unwrap_or(&none);
        for key in accepts.difference(lists) {
            problems.push(format!(
                "{section}.{key}: accepted by the config file but not in docs/configuration.md"
            ));
        }
        for key in lists.difference(accepts) {
            problems.push(format!(
                "{section}.{key}: in docs/configuration.md but not accepted by the config file"
            ));
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

/// Whether two configs are the same, field by field: `PartialEq` where the
/// types have it, so that neither the order a `HashMap` (`keys`, `limits`)
/// prints in nor what a `Debug` hides (Redis passwords) can decide.
fn same(a: &Config, b: &Config) -> bool {
    a.startup == b.startup && same_live(&a.live, &b.live)
}

/// [`same`] for the live part, which has no `PartialEq` of its own: every
/// field is named, so one added to `LiveSettings` cannot go uncompared.
fn same_live(a: &LiveSettings, b: &LiveSettings) -> bool {
    let LiveSettings {
        upstream,
        trusted_proxies,
        ietf_headers,
        path_policy,
        upstream_timeout,
        header_read_timeout,
        body_read_timeout,
        idle_timeout,
        max_connections_per_source,
        max_connections_per_proxy,
        send_timeout,
        body_min_rate,
        max_requests_in_flight_per_source,
        upstream_wait,
        api_key_headers,
        ipv6_prefix,
        client_ip_header,
        verify_keys,
        on_error,
        xdp,
        rls,
        tiers,
        keys,
        admin_tokens,
    } = a;
    *upstream == b.upstream
        && *trusted_proxies == b.trusted_proxies
        && *ietf_headers == b.ietf_headers
        && *path_policy == b.path_policy
        && *upstream_timeout == b.upstream_timeout
        && *header_read_timeout == b.header_read_timeout
        && *body_read_timeout == b.body_read_timeout
        && *idle_timeout == b.idle_timeout
        && *max_connections_per_source == b.max_connections_per_source
        && *max_connections_per_proxy == b.max_connections_per_proxy
        && *send_timeout == b.send_timeout
        && *body_min_rate == b.body_min_rate
        && *max_requests_in_flight_per_source == b.max_requests_in_flight_per_source
        && *upstream_wait == b.upstream_wait
        && *api_key_headers == b.api_key_headers
        && *ipv6_prefix == b.ipv6_prefix
        && *client_ip_header == b.client_ip_header
        && *verify_keys == b.verify_keys
        && *on_error == b.on_error
        && *xdp == b.xdp
        && *rls == b.rls
        && *tiers == b.tiers
        && *keys == b.keys
        && *admin_tokens == b.admin_tokens
}

/// The file a key's default is checked in: the base with `setting` (entries
/// both files hold) and, where the example shows the key needs others beside
/// it (a Redis URL beside the Redis settings), those too when the file
/// takes them; the key itself taken out, even where the base sets it.
fn without_key(rows: &[Row], row: &Row, setting: &[(String, toml::Value)]) -> toml::Table {
    let (companions, _) = context(row);
    let mut entries = companions;
    entries.extend_from_slice(setting);
    let mut without = file(rows, &row.section, &entries);
    if parse(&without).is_err() {
        without = file(rows, &row.section, setting);
    }
    table(&mut without, &row.section).remove(&row.key);
    without
}

/// Whether setting the key to `default` in the file without it changes
/// nothing; the problem, if any.
fn default_applies(
    rows: &[Row],
    row: &Row,
    setting: &[(String, toml::Value)],
    default: &str,
) -> Result<(), String> {
    let name = row.name();
    let without = without_key(rows, row, setting);
    let expected = parse(&without).map_err(|e| {
        format!("{name}: documented default `{default}`, but the key is required: a file without it is refused: {e}")
    })?;
    let mut with = without;
    set(
        rows,
        &mut with,
        &row.section,
        &row.key,
        &value(&name, default),
    );
    let set = parse(&with)
        .map_err(|e| format!("{name}: the documented default `{default}` is refused: {e}"))?;
    if same(&set, &expected) {
        Ok(())
    } else {
        Err(format!(
            "{name}: `{default}` is not its default: a file setting it differs from one without it"
        ))
    }
}

/// A file's raw config with the key explicitly unset (`None`), which TOML
/// cannot write: the file is read as JSON with the key `null`.
fn unset(file: &toml::Table, row: &Row) -> Result<Config, String> {
    let mut json = serde_json::to_value(file).map_err(|e| e.to_string())?;
    let section = &mut json[row.section.as_str()];
    let section = match section {
        serde_json::Value::Array(items) => items.first_mut().ok_or("no entry")?,
        other => other,
    };
    section
        .as_object_mut()
        .ok_or("not a table")?
        .insert(row.key.clone(), serde_json::Value::Null);
    let raw: RawConfig = serde_json::from_value(json).map_err(|e| e.to_string())?;
    raw.validate().map_err(|e| e.to_string())
}

/// Whether a key documented as `none` is an option whose absence is its
/// unset value; the problem, if any.
fn unset_by_default(rows: &[Row], row: &Row) -> Result<(), String> {
    let name = row.name();
    if !shapes().optional.contains(&name) {
        return Err(format!(
            "{name}: documented as `none`, but the key is not optional: left out, it takes a value"
        ));
    }
    let mut without = without_key(rows, row, &[]);
    // The section must be there for the key to be unset in it; an empty one
    // is the same as none.
    table(&mut without, &row.section);
    let absent = parse(&without).map_err(|e| {
        format!("{name}: documented as `none`, but a file without it is refused: {e}")
    })?;
    let unset = unset(&without, row)
        .map_err(|e| format!("{name}: a file with the key unset is refused: {e}"))?;
    if same(&absent, &unset) {
        Ok(())
    } else {
        Err(format!(
            "{name}: documented as `none`, but a file without it differs from one with it unset: its default is a value"
        ))
    }
}

#[test]
fn every_documented_default_is_the_default_applied() {
    let rows = rows();
    let mut problems = Vec::new();
    for row in &rows {
        let name = row.name();
        let checked = match &row.default {
            Documented::Unset => unset_by_default(&rows, row),
            Documented::Required => {
                // With what its example shows beside it (the other
                // required keys of a nested table).
                let mut without = file(&rows, &row.section, &context(row).0);
                table(&mut without, &row.section).remove(&row.key);
                match parse(&without) {
                    Ok(_) => Err(format!(
                        "{name}: documented as required, but a file without it is valid"
                    )),
                    Err(e) if !e.to_string().contains(&row.key) => Err(format!(
                        "{name}: required, but the refusal does not name it: {e}"
                    )),
                    Err(_) => Ok(()),
                }
            }
            Documented::Value(text) => default_applies(&rows, row, &[], text),
            Documented::As(other) => match rows
                .iter()
                .find(|r| r.section == row.section && r.key == *other)
            {
                Some(
                    other_row @ Row {
                        default: Documented::Value(text),
                        ..
                    },
                ) => {
                    // At the other key's default, and at its example: a
                    // fixed default that happens to equal the other's
                    // passes only the first.
                    let (mut setting, own) = context(other_row);
                    setting.push((other.clone(), own.clone()));
                    default_applies(&rows, row, &[], text).and_then(|()| {
                        default_applies(&rows, row, &setting, &own.to_string())
                            .map_err(|e| format!("{e} (with `{other} = {own}`)"))
                    })
                }
                _ => Err(format!(
                    "{name}: its default is that of `{other}`, which has no value in the table"
                )),
            },
        };
        if let Err(problem) = checked {
            problems.push(problem);
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

/// Whether a name `Config::needs_restart` reports (`server.max_connections`,
/// `server.tls_cert/tls_key`, `store` for any store setting) is the key's.
fn reports(reported: &str, section: &str, key: &str) -> bool {
    match reported.split_once('.') {
        None => reported == section,
        Some((s, keys)) => s == section && keys.split('/').any(|k| k == key),
    }
}

#[test]
fn every_example_changes_the_part_its_reload_column_names() {
    let rows = rows();
    let mut problems = Vec::new();
    for row in &rows {
        let name = row.name();
        let (context, own) = context(row);
        let mut all = context.clone();
        all.push((row.key.clone(), own));
        // Before and after setting the key, beside what it needs; a key that
        // cannot go without its partner (a TLS key without its certificate)
        // is compared with the base instead.
        let before = match parse(&file(&rows, &row.section, &context))
            .or_else(|_| parse(&file(&rows, &row.section, &[])))
        {
            Ok(before) => before,
            Err(e) => {
                problems.push(format!("{name}: the base file is refused: {e}"));
                continue;
            }
        };
        let after = match parse(&file(&rows, &row.section, &all)) {
            Ok(after) => after,
            Err(e) => {
                problems.push(format!(
                    "{name}: the example `{}` is refused: {e}",
                    row.example
                ));
                continue;
            }
        };
        // The split a reload uses: what `needs_restart` names is kept until
        // a restart, everything in `live` is applied.
        let restart = after.needs_restart(&before);
        let live_changed = !same_live(&after.live, &before.live);
        if row.restart {
            if !restart.iter().any(|r| reports(r, &row.section, &row.key)) {
                problems.push(format!(
                    "{name}: documented as `restart`, but a reload setting it to `{}` names no restart for it (named: {restart:?}; live part changed: {live_changed})",
                    row.example
                ));
            }
        } else if !restart.is_empty() {
            problems.push(format!(
                "{name}: documented as `live`, but setting it to `{}` needs a restart of {restart:?}",
                row.example
            ));
        } else if !live_changed {
            problems.push(format!(
                "{name}: documented as `live`, but its example `{}` changes nothing a reload applies",
                row.example
            ));
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}
