//! Worker configuration: defaults, the file, environment overrides, validation.
//!
//! The `config` crate layers [`DEFAULTS_TOML`] and the file (no file: the built-in pool). On
//! the result, a JSON tree, two small walks: environment overrides (`REWARDPOOL__AMQP__URL`,
//! `REWARDPOOL__POOLS__1__ITEMS__0__QUANTITY`: a numeric level indexes an array, one past its
//! end appends an entry; values stay strings) and the integer keys of [`INTS`] (decimal
//! strings become numbers, floats and booleans are refused, bounds are checked). Serde reads
//! [`RawConfig`] (`deny_unknown_fields`) through `config`'s deserializer, which names the key
//! of a bad value; [`RawConfig::validate`] makes the [`Config`] the worker runs on, pools as
//! [`PoolSeed`]s under the rules of [`crate::seed`].
//!
//! Errors name the key path (`pools[1].items[2].weight`, indices 0-based), the pool and item
//! ids and the origin of the value: file and line (from `toml`'s spans), environment variable,
//! or built-in default. The AMQP password never appears in an error nor in a `Debug`.
//!
//! Adding a key: a field in its section struct, its default in [`DEFAULTS_TOML`], a line in
//! [`INTS`] if it is an integer, a check in `validate_sections` for anything else.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use toml::de::DeValue;

use crate::limits::{
    AMQP_NAME_BYTES_MAX, BATCH_RECORDS_MAX, CHANNEL_CAPACITY_MAX, CONFIG_POOLS_MAX,
    DEDUPE_WINDOW_MAX, ID_BLOCK_SIZE_MAX, ID_BYTES_MAX, POOL_ITEMS_MAX, PREFETCH_MAX, PREFETCH_MIN,
    SEED_EPOCH_RECORDS_MAX, SEGMENT_BYTES_MAX, SHUTDOWN_DEADLINE_MS_MAX,
    SNAPSHOT_EVERY_RECORDS_MAX, TIMEOUT_MS_MAX,
};
pub use crate::seed::{Mode, PoolSeed, SeedItem, Stock};
use crate::seed::{RuleError, redact_secrets, shorten};

/// Prefix of environment overrides; `__` also separates their levels.
pub const ENV_PREFIX: &str = "REWARDPOOL__";

/// Every key's default (the contract's), and what it means.
pub const DEFAULTS_TOML: &str = r#"
[amqp]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"  # amqp:// or amqps://; may hold a password
request_queue = "rewardpool.requests"
result_queue = "rewardpool.results"
dead_letter_queue = "rewardpool.dead"
admin_queue = "rewardpool.admin"  # admin commands (contract: Admin commands)
prefetch = 1000                   # unacked deliveries in flight (basic_qos)
queue_type = "quorum"             # or "classic": every queue the worker declares
delivery_limit = 20               # quorum only: deliveries before the broker dead-letters
connect_timeout_ms = 5000
operation_timeout_ms = 10000
reconnect_backoff_min_ms = 100
reconnect_backoff_max_ms = 10000
shutdown_deadline_ms = 30000
dead_letter_exchange = ""         # "" = "<request_queue>.dlx"
tls_ca_file = ""                  # PEM CA for amqps:// ("" = built-in roots)
tls_cert_file = ""                # PEM client certificate and key: both or neither
tls_key_file = ""
exchange = ""                     # routing exchange of a sharded deployment ("" = none)
released_pools = []               # pools moved to another worker: never locked, bound or changed here

[storage]
data_dir = "data"
dedupe_window = 100000            # drawn requests remembered for idempotency
batch_records_max = 4096
channel_capacity = 8192
snapshot_every_records = 1000000
segment_bytes_max = 67108864
id_block_size = 65536
seed_epoch_records = 1000000      # draws per epoch secret (src/epoch.rs)
wal_retain_bytes = 0              # WAL kept for `audit` after snapshots (0 = none)
# rng_seed = 7                    # fixed RNG seed, tests only (absent: from the OS)

[admin]
allowed_users = []                # broker users allowed; empty = any user the broker lets publish

[metrics]
listen = "127.0.0.1:9464"         # socket address of the HTTP endpoint; "" = off

[log]
format = "text"                   # or "json": one object per line
"#;

/// The built-in pool of the contract, used when no file is given.
const BUILTIN_POOLS_TOML: &str = r#"
[[pools]]
id = "default"
mode = "by_quantity"
items = [{ id = "gold", quantity = 10 }, { id = "silver", quantity = 100 },
         { id = "bronze", quantity = 1000 }]
"#;

/// Why the admin queue's and the routing exchange's names are bounded below the broker's limit:
/// the names the worker makes of them.
const ADMIN_DLX: &str = ", to leave room for its dead-letter exchange \"<admin_queue>.dlx\"";
const POOL_LOCKS: &str = ", to leave room for the pool locks \"<exchange>.pool.<pool id>.lock\"";

/// Integer keys (`[]`: any index) and their bounds, inclusive. A new integer key adds a line.
#[rustfmt::skip]
const INTS: &[(&str, i128, i128)] = &[
    ("amqp.prefetch",                  PREFETCH_MIN as _, PREFETCH_MAX as _),
    ("amqp.delivery_limit",            1, u32::MAX as _),
    ("amqp.connect_timeout_ms",        1, TIMEOUT_MS_MAX as _),
    ("amqp.operation_timeout_ms",      1, TIMEOUT_MS_MAX as _),
    ("amqp.reconnect_backoff_min_ms",  1, TIMEOUT_MS_MAX as _),
    ("amqp.reconnect_backoff_max_ms",  1, TIMEOUT_MS_MAX as _),
    ("amqp.shutdown_deadline_ms",      1, SHUTDOWN_DEADLINE_MS_MAX as _),
    ("storage.dedupe_window",          1, DEDUPE_WINDOW_MAX as _),
    ("storage.batch_records_max",      1, BATCH_RECORDS_MAX as _),
    ("storage.channel_capacity",       1, CHANNEL_CAPACITY_MAX as _),
    ("storage.snapshot_every_records", 1, SNAPSHOT_EVERY_RECORDS_MAX as _),
    ("storage.segment_bytes_max",      1, SEGMENT_BYTES_MAX as _),
    ("storage.id_block_size",          1, ID_BLOCK_SIZE_MAX as _),
    ("storage.seed_epoch_records",     1, SEED_EPOCH_RECORDS_MAX as _),
    ("storage.wal_retain_bytes",       0, u64::MAX as _),
    ("storage.rng_seed",               0, u64::MAX as _),
    // Signed, so that negative values reach the rules of crate::seed.
    ("pools[].items[].quantity",       i64::MIN as _, i64::MAX as _),
    ("pools[].items[].weight",         i64::MIN as _, i64::MAX as _),
];

/// The whole configuration as read, before any rule is checked.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub amqp: AmqpConfig,
    pub storage: StorageConfig,
    pub admin: AdminConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    #[serde(default)]
    pub pools: Vec<RawPool>,
}

/// One `[[pools]]` entry as read. Missing `items` reads as empty and fails as "no items".
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    pub id: String,
    pub mode: Mode,
    #[serde(default)]
    pub items: Vec<RawItem>,
}

/// One item as read. Absent quantity: unlimited (by_weight pools only); weight: required in
/// by_weight pools, forbidden in by_quantity pools.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawItem {
    pub id: String,
    pub quantity: Option<i64>,
    pub weight: Option<i64>,
}

/// The validated configuration the worker runs on.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub amqp: AmqpConfig,
    pub storage: StorageConfig,
    pub admin: AdminConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    /// At least one; ids unique; every pool and item follows [`crate::seed`]'s rules.
    pub pools: Vec<PoolSeed>,
}

/// `[amqp]`: broker connection and broker objects (meanings: [`DEFAULTS_TOML`]).
#[derive(Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    pub url: String,
    pub request_queue: String,
    pub result_queue: String,
    pub dead_letter_queue: String,
    pub admin_queue: String,
    pub prefetch: u16,
    pub queue_type: QueueType,
    pub delivery_limit: u32,
    pub connect_timeout_ms: u64,
    pub operation_timeout_ms: u64,
    pub reconnect_backoff_min_ms: u64,
    pub reconnect_backoff_max_ms: u64,
    pub shutdown_deadline_ms: u64,
    pub dead_letter_exchange: String,
    pub tls_ca_file: String,
    pub tls_cert_file: String,
    pub tls_key_file: String,
    pub exchange: String,
    /// Pools of the durable state this worker no longer serves (moved to another worker):
    /// never locked or bound, and no admin command applies to them (README, "Moving a pool").
    pub released_pools: Vec<String>,
}

impl AmqpConfig {
    /// The dead-letter exchange to declare: `dead_letter_exchange`, or `<request_queue>.dlx`.
    pub fn dead_letter_exchange_name(&self) -> String {
        match self.dead_letter_exchange.as_str() {
            "" => format!("{}.dlx", self.request_queue),
            name => name.to_owned(),
        }
    }

    /// The admin queue's own dead-letter exchange, `<admin_queue>.dlx`: its arguments then do
    /// not depend on the request queue, so workers run one after another with other request
    /// queues (benchmarks, tests) can declare the same admin queue.
    pub fn admin_dead_letter_exchange_name(&self) -> String {
        format!("{}.dlx", self.admin_queue)
    }

    /// url with the password replaced by "***" for logs
    pub fn url_redacted(&self) -> String {
        redact_secrets(&self.url)
    }
}

/// Every field, with the URL's password redacted, so `{:?}` of a config never prints it.
impl fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut fields = serde_json::to_value(self).map_err(|_| fmt::Error)?;
        fields["url"] = self.url_redacted().into();
        write!(f, "AmqpConfig {fields}")
    }
}

/// Enums read from a string with a message that lists the accepted values.
macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq, Hash, Default)]
        #[serde(rename_all = "lowercase")]
        pub enum $name { #[default] $($variant),+ }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                $(if text == $text { return Ok($name::$variant); })+
                let accepted = [$(concat!("\"", $text, "\"")),+].join(" or ");
                Err(serde::de::Error::custom(format!("must be {accepted}, got {:?}", shorten(&text))))
            }
        }
    };
}

text_enum!(
    /// `amqp.queue_type`: the type of every queue the worker declares.
    QueueType { Quorum = "quorum", Classic = "classic" }
);

text_enum!(
    /// `log.format`: plain text or one JSON object per line.
    LogFormat { Text = "text", Json = "json" }
);

/// `[storage]`: WAL, snapshots, idempotency (meanings: [`DEFAULTS_TOML`]).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    pub data_dir: PathBuf,
    pub dedupe_window: usize,
    pub batch_records_max: usize,
    pub channel_capacity: usize,
    pub snapshot_every_records: u64,
    pub segment_bytes_max: u64,
    pub id_block_size: u64,
    pub seed_epoch_records: u64,
    pub wal_retain_bytes: u64,
    pub rng_seed: Option<u64>,
}

/// `[admin]`: broker users whose commands are applied; empty = any user the broker lets publish.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub allowed_users: Vec<String>,
}

/// `[metrics]`: the HTTP endpoint, a socket address (`127.0.0.1:9464`); "" = off.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub listen: String,
}

/// `[log]`: the format of the worker's log lines.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
}

/// Where a value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The config file; the line (1-based) when the key is in it.
    File {
        path: PathBuf,
        line: Option<usize>,
    },
    Env {
        var: String,
    },
    Default,
    /// Not known ([`RawConfig::validate`] on a value built in code).
    Unknown,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { path, line } => {
                let line = line.map(|line| format!(" line {line}")).unwrap_or_default();
                write!(f, " in {}{line}", path.display())
            }
            Origin::Env { var } => write!(f, " from environment variable {var}"),
            Origin::Default => f.write_str(" (built-in default)"),
            Origin::Unknown => Ok(()),
        }
    }
}

/// A key of the configuration and where its value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    /// Key path, e.g. `pools[1].items[2].weight`; indices are 0-based.
    pub key: String,
    /// Ids of the pool and item the key belongs to (shortened when very long).
    pub pool_id: Option<String>,
    pub item_id: Option<String>,
    pub origin: Origin,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`", self.key)?;
        if self.key.contains('[') {
            let id = |id: &Option<String>, what| id.as_ref().map(|id| format!("{what}{id:?}"));
            let pool = id(&self.pool_id, "; pool ").unwrap_or_default();
            let item = id(&self.item_id, ", item ").unwrap_or_default();
            write!(f, " (indices 0-based{pool}{item})")?;
        }
        write!(f, "{}", self.origin)
    }
}

/// Everything that can be wrong with a configuration. Messages never contain the AMQP password.
/// A cause is part of its message, never also a `source` (a chain would print it twice).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {} not found", path.display())]
    FileNotFound { path: PathBuf },
    #[error("cannot read config file {}: {error}", path.display())]
    FileRead {
        path: PathBuf,
        error: std::io::Error,
    },
    /// TOML syntax error; `message` is the parser's.
    #[error("syntax error in config file {}{}: {message}", path.display(),
        line.map(|line| format!(" at line {line}")).unwrap_or_default())]
    Syntax {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },
    #[error("unknown config key {at}; known keys here: {known}")]
    UnknownKey { at: Box<Location>, known: String },
    #[error("missing config key {at}")]
    MissingKey { at: Box<Location> },
    #[error("invalid value for {at}: {message}")]
    BadValue { at: Box<Location>, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    /// Anything else the `config` crate reports while loading.
    #[error("cannot load configuration: {message}")]
    Load { message: String },
    #[error("no pools configured{origin}: add at least one [[pools]] table")]
    NoPools { origin: Origin },
    /// A pool or item rule of [`crate::seed`], at a place in the configuration.
    #[error("{at}: {rule}{}", first.as_ref().map(|first| format!(", already used by {first}")).unwrap_or_default())]
    Rule {
        at: Box<Location>,
        rule: RuleError,
        /// For duplicate ids: where the id is first used.
        first: Option<Box<Location>>,
    },
    #[error("{at}: {what} is out of range: must be between {min} and {max}, got {value}")]
    OutOfRange {
        at: Box<Location>,
        what: String,
        value: i128,
        min: i128,
        max: i128,
    },
    #[error("{at}: {reason}")]
    InvalidValue { at: Box<Location>, reason: String },
}

impl Config {
    /// Built-in defaults of the contract (no file).
    pub fn builtin() -> Config {
        Config::load_with_env(None, &[]).expect("the built-in configuration is valid")
    }

    /// Defaults, then the file (if any), then `REWARDPOOL__` variables; validated.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut env = Vec::new();
        for (name, value) in std::env::vars_os() {
            // Variables with non-Unicode names cannot be ours.
            let Some(var) = name.into_string().ok().filter(|var| env_key(var).is_some()) else {
                continue;
            };
            let value = value.into_string().map_err(|_| ConfigError::Env {
                var: var.clone(),
                message: "value is not valid Unicode".to_owned(),
            })?;
            env.push((var, value));
        }
        Self::load_with_env(file, &env)
    }

    /// Same with an explicit environment (tests use this, never the process environment).
    pub fn load_with_env(
        file: Option<&Path>,
        env: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let file = file.map(SourceFile::read).transpose()?;
        let text = file.as_ref().map_or(BUILTIN_POOLS_TOML, |file| &file.text);
        let load_error = |error: &dyn fmt::Display| ConfigError::Load {
            message: redact_secrets(&error.to_string()),
        };
        let toml = |text| config::File::from_str(text, config::FileFormat::Toml);
        let mut tree: Value = config::Config::builder()
            .add_source(toml(DEFAULTS_TOML))
            .add_source(toml(text))
            .build()
            .and_then(config::Config::try_deserialize)
            .map_err(|e| load_error(&e))?;
        let env = apply_env(&mut tree, env)?;
        let ids = tree.clone();
        let ctx = Ctx {
            file: file.as_ref(),
            env,
            tree: Some(&ids),
            ..Ctx::default()
        };
        check_ints(&ctx, &mut tree, "")?;
        // `config`'s deserializer, for the key of every value serde rejects.
        let value = config::Value::deserialize(tree).map_err(|e| load_error(&e))?;
        let raw = RawConfig::deserialize(value).map_err(|e| ctx.deserialize_error(e))?;
        let config = raw.validate_in(&ctx)?;
        let file = file.as_ref().map(|file| &file.path);
        let url = config.amqp.url_redacted();
        tracing::debug!(?file, %url, pools = config.pools.len(), "configuration loaded");
        Ok(config)
    }

    /// The pool with this id.
    pub fn pool(&self, id: &str) -> Option<&PoolSeed> {
        self.pools.iter().find(|pool| pool.id == id)
    }
}

/// The file as read: its path, its text, and the line of every key in it (from the spans).
struct SourceFile {
    path: PathBuf,
    text: String,
    lines: HashMap<String, usize>,
}

impl SourceFile {
    fn read(path: &Path) -> Result<SourceFile, ConfigError> {
        let path = path.to_path_buf();
        let text = std::fs::read_to_string(&path).map_err(|error| match error.kind() {
            std::io::ErrorKind::NotFound => ConfigError::FileNotFound { path: path.clone() },
            _ => ConfigError::FileRead {
                path: path.clone(),
                error,
            },
        })?;
        // Once per file: a line is then a binary search, not a count from the start.
        let newlines: Vec<usize> = text.match_indices('\n').map(|(at, _)| at).collect();
        let document = toml::de::DeTable::parse(&text).map_err(|error| ConfigError::Syntax {
            path: path.clone(),
            line: error.span().map(|span| line_at(&newlines, span.start)),
            message: redact_secrets(error.message()),
        })?;
        let mut lines = HashMap::new();
        let root = DeValue::Table(document.into_inner());
        record_lines(&newlines, &root, "", &mut lines);
        Ok(SourceFile { path, text, lines })
    }
}

/// The line of every key and array entry under `value`, by key path (`newlines`: the byte
/// offsets of the file's newlines).
fn record_lines(
    newlines: &[usize],
    value: &DeValue<'_>,
    key: &str,
    lines: &mut HashMap<String, usize>,
) {
    let mut record = |key: String, start: usize, value: &DeValue<'_>| {
        lines.insert(key.clone(), line_at(newlines, start));
        record_lines(newlines, value, &key, lines);
    };
    match value {
        DeValue::Table(table) => (table.iter())
            .for_each(|(k, v)| record(child(key, k.get_ref()), k.span().start, v.get_ref())),
        DeValue::Array(items) => (items.iter().enumerate())
            .for_each(|(i, v)| record(format!("{key}[{i}]"), v.span().start, v.get_ref())),
        _ => {}
    }
}

/// The 1-based line of a byte offset: 1 + the newlines before it (`newlines`: ascending).
fn line_at(newlines: &[usize], offset: usize) -> usize {
    1 + newlines.partition_point(|&newline| newline < offset)
}

fn child(parent: &str, key: &str) -> String {
    format!("{parent}{}{key}", if parent.is_empty() { "" } else { "." })
}

/// The key one level up (`pools[1].id` → `pools[1]` → `pools`); `None` at the top.
fn parent(key: &str) -> Option<&str> {
    key.rfind(['.', '[']).map(|at| &key[..at])
}

/// Our form of a key of the `config` crate, which writes `pools[1]items[0]id`.
fn canonical(key: &str) -> String {
    let dotted = key.replace(']', "].").replace("]..", "].");
    dotted.replace("].[", "][").trim_end_matches('.').to_owned()
}

/// A key without its indices (`pools[1].items[2]` → `pools[].items[]`).
fn shape(key: &str) -> String {
    let parts: Vec<&str> = (key.split('['))
        .map(|part| part.trim_start_matches(|c: char| c.is_ascii_digit()))
        .collect();
    parts.join("[")
}

/// Applies our variables in key order (indices numerically: an entry's fields come after the
/// entries before it); returns key → the variable that set or created it. A variable sets
/// one scalar: a value, a new key (serde rejects unknown ones) or an entry one past the end.
fn apply_env(
    tree: &mut Value,
    env: &[(String, String)],
) -> Result<BTreeMap<String, String>, ConfigError> {
    // A level is an index (Ok) or a key (Err).
    let level = |text: &str| match text.bytes().all(|byte| byte.is_ascii_digit()) {
        true => text.parse::<usize>().map_err(|_| text.to_owned()),
        false => Err(text.to_owned()),
    };
    let mut vars: Vec<(Vec<_>, &String, &String)> = (env.iter())
        .filter_map(|(name, value)| {
            Some((env_key(name)?.split("__").map(level).collect(), name, value))
        })
        .collect();
    vars.sort();
    let mut set = BTreeMap::new();
    for (levels, var, value) in vars {
        let error = |message: String| ConfigError::Env {
            var: var.clone(),
            message,
        };
        let whole = levels.iter().fold(String::new(), |key, level| match level {
            Ok(index) => format!("{key}[{index}]"),
            Err(name) => child(&key, name),
        });
        let (mut node, mut key) = (&mut *tree, String::new());
        for (depth, level) in levels.iter().enumerate() {
            let fresh = match levels.get(depth + 1) {
                None => Value::Null,
                Some(Ok(_)) => Value::Array(Vec::new()),
                Some(Err(_)) => Value::Object(serde_json::Map::new()),
            };
            node = match (level, node) {
                (Err(name), Value::Object(table)) => {
                    key = child(&key, name);
                    if !table.contains_key(name) {
                        if fresh.is_object() {
                            let known = table.keys().cloned().collect::<Vec<_>>().join(", ");
                            let unknown = format!("unknown config key `{whole}`; known keys here");
                            return Err(error(format!("{unknown}: {known}")));
                        }
                        set.insert(key.clone(), var.clone());
                    }
                    table.entry(name.clone()).or_insert(fresh)
                }
                (Ok(index), Value::Array(items)) => {
                    let length = items.len();
                    if *index > length {
                        return Err(error(format!(
                            "there is no {key}[{index}] ({key} has {length} entries, indices 0-based); \
                             the environment can change an entry or add one at the end ({key}[{length}])"
                        )));
                    }
                    key = format!("{key}[{index}]");
                    if *index == length {
                        items.push(fresh);
                        set.insert(key.clone(), var.clone());
                    }
                    &mut items[*index]
                }
                _ => return Err(error(env_usage(&whole))),
            };
        }
        if node.is_object() || node.is_array() {
            return Err(error(env_usage(&whole)));
        }
        *node = Value::String(value.clone());
        if let Some(previous) = set.insert(key.clone(), var.clone()).filter(|p| p != var) {
            let message = format!("sets key `{key}`, which {previous} already sets");
            return Err(error(message));
        }
    }
    Ok(set)
}

/// What follows [`ENV_PREFIX`] (in any case) in a variable name, lowercased; `None`: not ours.
fn env_key(var: &str) -> Option<String> {
    (var.to_lowercase().strip_prefix(&ENV_PREFIX.to_lowercase())).map(str::to_owned)
}

fn env_usage(key: &str) -> String {
    match key.starts_with("pools") {
        true => "pools can be overridden only key by key, as REWARDPOOL__POOLS__<i>__ID, \
                 REWARDPOOL__POOLS__<i>__MODE or REWARDPOOL__POOLS__<i>__ITEMS__<j>__{ID,QUANTITY,WEIGHT} \
                 (indices 0-based)",
        false => "names no single key; use one variable per key, e.g. REWARDPOOL__AMQP__URL",
    }
    .to_owned()
}

/// Every key of [`INTS`] under `value`: an integer (or decimal string, made one) in bounds.
fn check_ints(ctx: &Ctx<'_>, value: &mut Value, key: &str) -> Result<(), ConfigError> {
    let shape = shape(key);
    let Some(&(_, min, max)) = INTS.iter().find(|(int, ..)| *int == shape) else {
        return match value {
            Value::Object(table) => (table.iter_mut())
                .try_for_each(|(name, value)| check_ints(ctx, value, &child(key, name))),
            Value::Array(items) => (items.iter_mut().enumerate())
                .try_for_each(|(i, value)| check_ints(ctx, value, &format!("{key}[{i}]"))),
            _ => Ok(()),
        };
    };
    let number = match &*value {
        Value::Number(n) => n.as_i128(),
        Value::String(text) => text.parse::<i128>().ok(),
        Value::Null => return Ok(()),
        _ => None,
    };
    let Some(number) = number else {
        let got = match &*value {
            Value::Number(_) => format!("floating point `{value}`"),
            Value::String(text) => format!("string {:?}", shorten(text)),
            other => format!("`{other}`"),
        };
        let message = format!("invalid type: {got}, expected an integer");
        let at = ctx.at(key);
        return Err(ConfigError::BadValue { at, message });
    };
    if !(min..=max).contains(&number) {
        return Err(ConfigError::OutOfRange {
            at: ctx.at(key),
            what: key.rsplit('.').next().unwrap_or(key).to_owned(),
            value: number,
            min,
            max,
        });
    }
    // Above i64 (a u64 seed) stays text: `config`'s tree holds i64; its u64 reads the text.
    *value = i64::try_from(number).map_or_else(|_| Value::from(number.to_string()), Value::from);
    Ok(())
}

/// Where the values of a load came from, and the ids to name in errors.
#[derive(Default)]
struct Ctx<'a> {
    file: Option<&'a SourceFile>,
    /// Key → environment variable that set it.
    env: BTreeMap<String, String>,
    /// The loaded tree, for ids; `None` in [`RawConfig::validate`] (origins unknown).
    tree: Option<&'a Value>,
    /// The config being validated, for ids when there is no tree.
    raw: Option<&'a RawConfig>,
}

impl Ctx<'_> {
    fn origin(&self, key: &str) -> Origin {
        if let Some(var) = self.env.get(key) {
            return Origin::Env { var: var.clone() };
        }
        let Some(file) = self.file else {
            return self.tree.map_or(Origin::Unknown, |_| Origin::Default);
        };
        // A pool or an item as a whole: the line of its id; in pools, else the nearest
        // enclosing key in the file (an entry may come from the environment, or lack the key).
        let in_pools = key.starts_with("pools");
        let id = key.ends_with(']').then(|| child(key, "id"));
        let up = std::iter::successors(Some(key), |key| parent(key).filter(|_| in_pools));
        match (id.as_deref().into_iter().chain(up)).find_map(|key| file.lines.get(key)) {
            None if !in_pools => Origin::Default,
            line => Origin::File {
                path: file.path.clone(),
                line: line.copied(),
            },
        }
    }

    /// The location of `key`, with the ids of its pool and item.
    fn at(&self, key: &str) -> Box<Location> {
        // `pools[p].items[i]...`: p and i.
        let mut indices = (key.split('[').skip(1).filter(|_| key.starts_with("pools[")))
            .filter_map(|rest| rest.split(']').next()?.parse::<usize>().ok());
        let (pool, item) = (indices.next(), indices.next());
        let id = |item: Option<usize>| -> Option<&str> {
            let Some(tree) = self.tree else {
                let pool = self.raw?.pools.get(pool?)?;
                let id = item.map_or(Some(&pool.id), |i| Some(&pool.items.get(i)?.id));
                return id.map(String::as_str);
            };
            let item = item.map(|i| format!("/items/{i}")).unwrap_or_default();
            tree.pointer(&format!("/pools/{}{item}/id", pool?))?
                .as_str()
        };
        Box::new(Location {
            key: key.to_owned(),
            pool_id: id(None).map(shorten),
            item_id: item.and_then(|item| id(Some(item))).map(shorten),
            origin: self.origin(key),
        })
    }

    /// A deserialization error of the `config` crate, with its key and origin.
    fn deserialize_error(&self, error: config::ConfigError) -> ConfigError {
        let key = match &error {
            config::ConfigError::NotFound(key) => {
                let at = self.at(&canonical(key));
                return ConfigError::MissingKey { at };
            }
            config::ConfigError::Type { key, .. } | config::ConfigError::At { key, .. } => {
                key.clone().unwrap_or_default()
            }
            _ => String::new(),
        };
        let message = error.to_string();
        let message = message.trim_end_matches(&format!(" for key `{key}`"));
        let key = canonical(&key);
        // serde's `deny_unknown_fields` message: "unknown field `x`, expected one of `a`, `b`".
        let unknown = message.strip_prefix("unknown field `");
        if let Some((field, known)) = unknown.and_then(|rest| rest.split_once("`, expected ")) {
            let known = known.trim_start_matches("one of ").replace('`', "");
            let at = self.at(&child(&key, field));
            return ConfigError::UnknownKey { at, known };
        }
        let (at, message) = (self.at(&key), redact_secrets(message));
        match key.is_empty() {
            true => ConfigError::Load { message },
            false => ConfigError::BadValue { at, message },
        }
    }
}

impl RawConfig {
    /// Checks every rule and bound; the first problem found is the error. Errors carry key
    /// paths and ids but no origin (a loaded configuration gets those from [`Config::load`]).
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let ctx = Ctx {
            raw: Some(self),
            ..Ctx::default()
        };
        // The tree of the integer keys, without data_dir: a path need not be UTF-8 (a JSON
        // string must, and `json!` panics on one that is not); the rest always serializes.
        let storage = StorageConfig {
            data_dir: PathBuf::new(),
            ..self.storage.clone()
        };
        let mut sections = serde_json::json!({ "amqp": self.amqp, "storage": storage });
        check_ints(&ctx, &mut sections, "")?;
        self.validate_in(&ctx)
    }

    fn validate_in(&self, ctx: &Ctx<'_>) -> Result<Config, ConfigError> {
        validate_sections(ctx, self)?;
        let pools = validate_pools(ctx, &self.pools)?;
        Ok(Config {
            amqp: self.amqp.clone(),
            storage: self.storage.clone(),
            admin: self.admin.clone(),
            metrics: self.metrics.clone(),
            log: self.log.clone(),
            pools,
        })
    }
}

impl From<&Config> for RawConfig {
    /// The raw form of a validated configuration (to edit it in code and validate again).
    fn from(config: &Config) -> RawConfig {
        let signed = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        let item = |item: &SeedItem| RawItem {
            id: item.id.clone(),
            quantity: item.stock.quantity().map(signed),
            weight: item.weight.map(signed),
        };
        let pool = |pool: &PoolSeed| RawPool {
            id: pool.id.clone(),
            mode: pool.mode,
            items: pool.items.iter().map(item).collect(),
        };
        RawConfig {
            amqp: config.amqp.clone(),
            storage: config.storage.clone(),
            admin: config.admin.clone(),
            metrics: config.metrics.clone(),
            log: config.log.clone(),
            pools: config.pools.iter().map(pool).collect(),
        }
    }
}

/// Every rule on section values but [`INTS`], in order; the first broken one is the error.
fn validate_sections(ctx: &Ctx<'_>, raw: &RawConfig) -> Result<(), ConfigError> {
    let (amqp, bytes_max) = (&raw.amqp, AMQP_NAME_BYTES_MAX);
    let mut problems: Vec<(String, Option<String>)> = Vec::new();
    let mut check = |key: &str, problem: Option<String>| problems.push((key.to_owned(), problem));
    let scheme = match amqp.url.split_once("://") {
        Some(("amqp" | "amqps", _)) => None,
        Some((scheme, _)) => Some(format!("scheme {:?}", shorten(scheme))),
        None => Some("no scheme".to_owned()),
    };
    let url = scheme.map(|got| format!("url must start with amqp:// or amqps:// (got {got})"));
    check("amqp.url", url);
    let queues = [
        ("amqp.request_queue", &amqp.request_queue),
        ("amqp.result_queue", &amqp.result_queue),
        ("amqp.dead_letter_queue", &amqp.dead_letter_queue),
        ("amqp.admin_queue", &amqp.admin_queue),
    ];
    for (index, (key, name)) in queues.iter().enumerate() {
        let twin = queues[..index].iter().find(|(_, other)| other == name);
        let twin = twin.map(|(other, _)| {
            let name = shorten(name);
            format!("queue name {name:?} is also used by {other}; the queues must differ")
        });
        let (max, why) = match *key {
            "amqp.admin_queue" => (bytes_max - ".dlx".len(), ADMIN_DLX),
            _ => (bytes_max, ""),
        };
        let problem = amqp_name_problem(name, "queue name", max, why);
        check(key, problem.or(twin));
    }
    let dlx = match amqp.dead_letter_exchange.as_str() {
        "" => (amqp.dead_letter_exchange_name().len() > bytes_max).then(|| format!(
            "the derived name \"<request_queue>.dlx\" is longer than {bytes_max} bytes; set amqp.dead_letter_exchange"
        )),
        dlx => amqp_name_problem(dlx, "exchange name", bytes_max, ""),
    };
    check("amqp.dead_letter_exchange", dlx);
    // The worker also declares, per pool, the lock queue `<exchange>.pool.<pool id>.lock`.
    let room_bytes = bytes_max - ".pool.".len() - ID_BYTES_MAX - ".lock".len();
    let exchange = match amqp.exchange.as_str() {
        "" => None,
        exchange => amqp_name_problem(exchange, "exchange name", room_bytes, POOL_LOCKS),
    };
    check("amqp.exchange", exchange);
    for (index, pool) in amqp.released_pools.iter().enumerate() {
        let rule = crate::seed::check_id(crate::seed::IdKind::Pool, pool).err();
        let twice = amqp.released_pools[..index].contains(pool);
        let twice = twice.then(|| format!("pool {:?} is listed twice", shorten(pool)));
        let problem = rule.map(|rule| rule.to_string()).or(twice);
        check(&format!("amqp.released_pools[{index}]"), problem);
    }
    let (cert, key) = (amqp.tls_cert_file.is_empty(), amqp.tls_key_file.is_empty());
    let tls = "tls_cert_file and tls_key_file go together: set both or neither".to_owned();
    let tls_key = ["amqp.tls_cert_file", "amqp.tls_key_file"][usize::from(cert)];
    check(tls_key, (cert != key).then_some(tls));
    let (min_ms, max_ms) = (amqp.reconnect_backoff_min_ms, amqp.reconnect_backoff_max_ms);
    let backoff = format!(
        "reconnect_backoff_min_ms ({min_ms}) is greater than reconnect_backoff_max_ms ({max_ms})"
    );
    // Point at the key the operator set, not at a default.
    let backoff_key = match ctx.origin("amqp.reconnect_backoff_min_ms") {
        Origin::Default => "amqp.reconnect_backoff_max_ms",
        _ => "amqp.reconnect_backoff_min_ms",
    };
    check(backoff_key, (min_ms > max_ms).then_some(backoff));
    let data_dir = raw.storage.data_dir.as_os_str().is_empty();
    let data_dir = data_dir.then(|| "data_dir must not be empty".to_owned());
    check("storage.data_dir", data_dir);
    for (index, user) in raw.admin.allowed_users.iter().enumerate() {
        let problem = name_problem(user, "user name", bytes_max, "");
        check(&format!("admin.allowed_users[{index}]"), problem);
    }
    let listen = &raw.metrics.listen;
    let bad_listen = !listen.is_empty() && listen.parse::<std::net::SocketAddr>().is_err();
    let listen = format!(
        "listen must be a socket address such as \"127.0.0.1:9464\" (or \"\" for off), got {:?}",
        shorten(listen)
    );
    check("metrics.listen", bad_listen.then_some(listen));
    let mut problems = problems.into_iter();
    let Some((key, reason)) = problems.find_map(|(key, problem)| Some((key, problem?))) else {
        return Ok(());
    };
    let at = ctx.at(&key);
    Err(ConfigError::InvalidValue { at, reason })
}

fn validate_pools(ctx: &Ctx<'_>, pools: &[RawPool]) -> Result<Vec<PoolSeed>, ConfigError> {
    if pools.is_empty() {
        let origin = ctx.origin("pools");
        return Err(ConfigError::NoPools { origin });
    }
    if pools.len() > CONFIG_POOLS_MAX {
        return Err(ConfigError::OutOfRange {
            at: ctx.at("pools"),
            what: "number of pools".to_owned(),
            value: pools.len() as _,
            min: 1,
            max: CONFIG_POOLS_MAX as _,
        });
    }
    let rule = |key: String, rule: RuleError, first: Option<String>| ConfigError::Rule {
        at: ctx.at(&key),
        rule,
        first: first.map(|first| ctx.at(&first)),
    };
    let pool_id = |p: usize| format!("pools[{p}].id");
    let ids = pools.iter().map(|pool| pool.id.as_str());
    if let Err((index, first, e)) = crate::seed::check_unique_pool_ids(ids) {
        return Err(rule(pool_id(index), e, Some(pool_id(first))));
    }
    let mut seeds = Vec::with_capacity(pools.len());
    for (p, pool) in pools.iter().enumerate() {
        let items = format!("pools[{p}].items");
        if pool.items.len() > POOL_ITEMS_MAX {
            let count = pool.items.len();
            return Err(rule(items, RuleError::TooManyItems { count }, None));
        }
        let seeds_of_items = (pool.items.iter().enumerate()).map(|(i, item)| {
            crate::seed::item_seed(pool.mode, &item.id, item.quantity, item.weight)
                .map_err(|(field, e)| rule(format!("{items}[{i}].{}", field.key()), e, None))
        });
        let seed = PoolSeed {
            id: pool.id.clone(),
            mode: pool.mode,
            items: seeds_of_items.collect::<Result<_, _>>()?,
        };
        if let Err((item, error)) = crate::seed::check_pool(&seed) {
            let (key, first) = match (&error, item) {
                (RuleError::DuplicateItemId { .. }, Some(i)) => {
                    let id = &pool.items[i].id;
                    let first = pool.items.iter().position(|item| &item.id == id);
                    let item_id = |i| format!("{items}[{i}].id");
                    (item_id(i), first.map(item_id))
                }
                (RuleError::EmptyId { .. } | RuleError::LongId { .. }, None) => (pool_id(p), None),
                (_, Some(i)) => (format!("{items}[{i}]"), None),
                (_, None) => (format!("pools[{p}]"), None),
            };
            return Err(rule(key, error, first));
        }
        seeds.push(seed);
    }
    Ok(seeds)
}

/// Why `name` (`what`: "user name", ...) is not valid, if it is not: empty or longer than
/// `bytes_max` (`why`: what a bound below the broker's leaves room for, or "").
fn name_problem(name: &str, what: &str, bytes_max: usize, why: &str) -> Option<String> {
    match name.len() {
        0 => Some(format!("{what} must not be empty")),
        bytes => (bytes > bytes_max)
            .then(|| format!("{what} is {bytes} bytes long, at most {bytes_max} allowed{why}")),
    }
}

/// [`name_problem`] for a queue or exchange name, which also must not start with "amq.".
fn amqp_name_problem(name: &str, what: &str, bytes_max: usize, why: &str) -> Option<String> {
    let reserved = || {
        let name = shorten(name);
        format!("{what} {name:?} starts with \"amq.\", which the broker reserves")
    };
    name_problem(name, what, bytes_max, why).or_else(|| name.starts_with("amq.").then(reserved))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{
        AMQP_NAME_BYTES_MAX, CONFIG_POOLS_MAX, ID_BYTES_MAX, QUANTITY_MAX, WEIGHT_MAX,
    };

    /// The contract's example file, verbatim.
    const EXAMPLE: &str = r#"[amqp]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
request_queue = "rewardpool.requests"   # producers publish here
result_queue = "rewardpool.results"     # every draw outcome lands here
dead_letter_queue = "rewardpool.dead"   # rejected requests land here
prefetch = 1000                         # unacked deliveries in flight
queue_type = "quorum"                   # or "classic"
delivery_limit = 20                     # quorum only: deliveries before the broker dead-letters a request

[storage]
data_dir = "data"
dedupe_window = 100000                  # drawn requests remembered for idempotency

[[pools]]
id = "default"
mode = "by_quantity"      # every remaining unit equally likely
items = [
  { id = "gold",   quantity = 10 },
  { id = "silver", quantity = 90 },
]

[[pools]]
id = "spin"
mode = "by_weight"        # P(item) = weight / sum of weights of items still in stock
items = [
  { id = "car",       quantity = 1,  weight = 1 },
  { id = "voucher",   quantity = 50, weight = 99 },
  { id = "try_again", weight = 900 },              # no quantity: unlimited
]
"#;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect()
    }

    /// Writes `text` to a temporary file and loads it with `vars` as the environment.
    fn load_text_env(text: &str, vars: &[(&str, &str)]) -> (PathBuf, Result<Config, ConfigError>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("rewardpool.toml");
        std::fs::write(&path, text).expect("write config");
        let result = Config::load_with_env(Some(&path), &env(vars));
        (path, result)
    }

    fn load_text(text: &str) -> (PathBuf, Result<Config, ConfigError>) {
        load_text_env(text, &[])
    }

    /// The Display of the error loading `text` gives; panics if it loads.
    fn error_of(text: &str) -> (PathBuf, ConfigError, String) {
        let (path, result) = load_text(text);
        let error = result.expect_err("config should be rejected");
        let message = error.to_string();
        (path, error, message)
    }

    fn assert_contains(message: &str, parts: &[&str]) {
        for part in parts {
            assert!(
                message.contains(part),
                "message {message:?} should contain {part:?}"
            );
        }
    }

    fn pool_file(pools: &str) -> String {
        format!("[storage]\ndata_dir = \"d\"\n\n{pools}")
    }

    // --- defaults and loading -----------------------------------------------------------------

    #[test]
    fn builtin_validates_and_has_the_contract_default_pool() {
        let config = Config::builtin();
        RawConfig::from(&config)
            .validate()
            .expect("builtin is valid");
        assert_eq!(config.amqp.url, "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(config.amqp.request_queue, "rewardpool.requests");
        assert_eq!(config.amqp.result_queue, "rewardpool.results");
        assert_eq!(config.amqp.dead_letter_queue, "rewardpool.dead");
        assert_eq!(config.amqp.prefetch, 1000);
        assert_eq!(config.amqp.queue_type, QueueType::Quorum);
        assert_eq!(config.amqp.delivery_limit, 20);
        assert_eq!(config.amqp.connect_timeout_ms, 5000);
        assert_eq!(config.amqp.operation_timeout_ms, 10_000);
        assert_eq!(config.amqp.reconnect_backoff_min_ms, 100);
        assert_eq!(config.amqp.reconnect_backoff_max_ms, 10_000);
        assert_eq!(config.amqp.shutdown_deadline_ms, 30_000);
        assert_eq!(config.amqp.dead_letter_exchange, "");
        assert_eq!(config.storage.data_dir, PathBuf::from("data"));
        assert_eq!(config.storage.dedupe_window, 100_000);
        assert_eq!(config.storage.batch_records_max, 4096);
        assert_eq!(config.storage.channel_capacity, 8192);
        assert_eq!(config.storage.snapshot_every_records, 1_000_000);
        assert_eq!(config.storage.segment_bytes_max, 67_108_864);
        assert_eq!(config.storage.id_block_size, 65_536);
        assert_eq!(config.storage.rng_seed, None);
        assert_eq!(config.pools.len(), 1);
        let pool = &config.pools[0];
        assert_eq!(pool.id, "default");
        assert_eq!(pool.mode, Mode::ByQuantity);
        let items: Vec<(&str, Option<u64>, Option<u64>)> = pool
            .items
            .iter()
            .map(|item| (item.id.as_str(), item.stock.quantity(), item.weight))
            .collect();
        assert_eq!(
            items,
            [
                ("gold", Some(10), None),
                ("silver", Some(100), None),
                ("bronze", Some(1000), None)
            ]
        );
    }

    #[test]
    fn load_without_file_or_env_is_builtin() {
        let config = Config::load_with_env(None, &[]).expect("loads");
        assert_eq!(config, Config::builtin());
    }

    #[test]
    fn contract_example_loads_and_validates() {
        let (_, result) = load_text(EXAMPLE);
        let config = result.expect("example loads");
        RawConfig::from(&config)
            .validate()
            .expect("example validates");
        assert_eq!(config.amqp, Config::builtin().amqp);
        assert_eq!(config.storage, Config::builtin().storage);
        assert_eq!(config.pools.len(), 2);
        let spin = config.pool("spin").expect("spin pool");
        assert_eq!(spin.mode, Mode::ByWeight);
        let items: Vec<(&str, Option<u64>, Option<u64>)> = spin
            .items
            .iter()
            .map(|item| (item.id.as_str(), item.stock.quantity(), item.weight))
            .collect();
        assert_eq!(
            items,
            [
                ("car", Some(1), Some(1)),
                ("voucher", Some(50), Some(99)),
                ("try_again", None, Some(900))
            ]
        );
        let default = config.pool("default").expect("default pool");
        assert_eq!(default.items[1].stock, Stock::Limited(90));
        assert!(config.pool("nope").is_none());
    }

    #[test]
    fn brief_one_line_form_loads() {
        let text = r#"
[[pools]]
id = "default"
mode = "by_quantity"
items = [ { id = "gold", quantity = 10 }, { id = "silver", quantity = 90 } ]
[[pools]]
id = "spin"
mode = "by_weight"
items = [ { id = "car", quantity = 1, weight = 1 }, { id = "voucher", quantity = 50, weight = 99 }, { id = "try_again", weight = 900 } ]
"#;
        let (_, result) = load_text(text);
        let config = result.expect("loads");
        assert_eq!(config.pools[1].items[2].stock, Stock::Unlimited);
        assert_eq!(
            config.amqp,
            Config::builtin().amqp,
            "missing [amqp] keys take defaults"
        );
    }

    #[test]
    fn file_keys_override_defaults_and_missing_keys_take_defaults() {
        let text = pool_file(
            "[amqp]\nprefetch = 7\nqueue_type = \"classic\"\n\n[[pools]]\nid = \"p\"\nmode = \"by_quantity\"\nitems = [ { id = \"a\", quantity = 1 } ]\n",
        );
        let (_, result) = load_text(&text);
        let config = result.expect("loads");
        assert_eq!(config.amqp.prefetch, 7);
        assert_eq!(config.amqp.queue_type, QueueType::Classic);
        assert_eq!(config.amqp.queue_type.as_str(), "classic");
        assert_eq!(config.amqp.url, Config::builtin().amqp.url);
        assert_eq!(config.storage.data_dir, PathBuf::from("d"));
        assert_eq!(config.storage.dedupe_window, 100_000);
        assert_eq!(config.pools.len(), 1, "pools come from the file only");
    }

    #[test]
    fn pools_items_table_form_loads_and_reports_lines() {
        let text = r#"[[pools]]
id = "p"
mode = "by_weight"

[[pools.items]]
id = "a"
weight = 5

[[pools.items]]
id = "b"
quantity = 3
weight = 0
"#;
        let (path, error, message) = error_of(text);
        assert!(matches!(
            error,
            ConfigError::Rule {
                rule: RuleError::NonPositiveWeight { value: 0 },
                ..
            }
        ));
        assert_contains(
            &message,
            &[
                "`pools[0].items[1].weight`",
                "indices 0-based",
                "pool \"p\", item \"b\"",
                &format!("{} line 12", path.display()),
                "greater than 0, got 0",
            ],
        );
    }

    /// A file of one by_weight pool of `count` items, one item a line (item i on line 5 + i).
    fn large_pool_file(count: usize) -> String {
        let mut text = String::from("[[pools]]\nid = \"large\"\nmode = \"by_weight\"\nitems = [\n");
        for i in 0..count {
            let weight = i + 1;
            text.push_str(&format!(
                "  {{ id = \"item{i}\", quantity = {i}, weight = {weight} }},\n"
            ));
        }
        text.push_str("]\n");
        text
    }

    /// A large pool loads through the normal path (file, spans, lines, validation) with every
    /// item intact, and a line number past its end is still exact. (Finding a line used to
    /// count the newlines from the start of the file, for every key: quadratic.)
    #[test]
    fn a_pool_of_fifty_thousand_items_loads_and_lines_stay_exact() {
        const COUNT: usize = 50_000;
        let (_, result) = load_text(&large_pool_file(COUNT));
        let config = result.expect("a large pool loads");
        let pool = config.pool("large").expect("the large pool");
        assert_eq!((pool.mode, pool.items.len()), (Mode::ByWeight, COUNT));
        for (i, item) in pool.items.iter().enumerate() {
            let expected = (
                format!("item{i}"),
                Stock::Limited(i as u64),
                Some(i as u64 + 1),
            );
            assert_eq!((item.id.clone(), item.stock, item.weight), expected);
        }

        // Items on lines 5 to 4 + COUNT, "]" on the next: the bad line comes after. (A syntax
        // error fails at the first parse: the cheap way to a line this far into a file.)
        let text = format!("{}key without value\n", large_pool_file(COUNT));
        let (path, error, message) = error_of(&text);
        assert!(matches!(error, ConfigError::Syntax { .. }), "{message}");
        let line = format!("{} at line {}", path.display(), 6 + COUNT);
        assert_contains(&message, &[&line]);
    }

    // --- environment ---------------------------------------------------------------------------

    #[test]
    fn env_overrides_strings_numbers_and_nested_keys() {
        let vars = env(&[
            ("REWARDPOOL__AMQP__URL", "amqps://user:pw@broker:5671/vh"),
            ("REWARDPOOL__AMQP__REQUEST_QUEUE", "007"),
            ("REWARDPOOL__AMQP__RESULT_QUEUE", "1e3"),
            ("REWARDPOOL__AMQP__DEAD_LETTER_QUEUE", "true"),
            ("REWARDPOOL__AMQP__PREFETCH", "500"),
            ("REWARDPOOL__AMQP__QUEUE_TYPE", "classic"),
            ("REWARDPOOL__STORAGE__DATA_DIR", "/var/lib/rewardpool"),
            ("REWARDPOOL__STORAGE__RNG_SEED", "18446744073709551615"),
            ("rewardpool__storage__dedupe_window", "42"),
            ("OTHER__AMQP__URL", "ignored"),
            ("REWARDPOOL_CONFIG", "not ours: single underscore"),
        ]);
        let config = Config::load_with_env(None, &vars).expect("loads");
        assert_eq!(config.amqp.url, "amqps://user:pw@broker:5671/vh");
        assert_eq!(
            config.amqp.request_queue, "007",
            "strings keep their exact text"
        );
        assert_eq!(config.amqp.result_queue, "1e3");
        assert_eq!(config.amqp.dead_letter_queue, "true");
        assert_eq!(config.amqp.prefetch, 500);
        assert_eq!(config.amqp.queue_type, QueueType::Classic);
        assert_eq!(
            config.storage.data_dir,
            PathBuf::from("/var/lib/rewardpool")
        );
        assert_eq!(config.storage.rng_seed, Some(u64::MAX));
        assert_eq!(config.storage.dedupe_window, 42);
        assert_eq!(config.pools, Config::builtin().pools);
    }

    #[test]
    fn env_overrides_win_over_the_file() {
        let (_, result) = load_text_env(
            EXAMPLE,
            &[
                ("REWARDPOOL__AMQP__PREFETCH", "500"),
                ("REWARDPOOL__POOLS__1__ITEMS__0__QUANTITY", "5"),
                ("REWARDPOOL__POOLS__1__ITEMS__2__ID", "nothing"),
                ("REWARDPOOL__POOLS__0__MODE", "by_quantity"),
            ],
        );
        let config = result.expect("loads");
        assert_eq!(config.amqp.prefetch, 500);
        assert_eq!(config.pools[1].items[0].stock, Stock::Limited(5));
        assert_eq!(config.pools[1].items[2].id, "nothing");
    }

    #[test]
    fn env_pool_override_errors() {
        let (_, result) = load_text_env(EXAMPLE, &[("REWARDPOOL__POOLS__3__ID", "x")]);
        let message = result.expect_err("no pools[3]").to_string();
        assert_contains(
            &message,
            &[
                "REWARDPOOL__POOLS__3__ID",
                "no pools[3]",
                "2 entries",
                "0-based",
                "at the end (pools[2])",
            ],
        );

        // pools[2] is appended; without a mode it is incomplete.
        let (_, result) = load_text_env(EXAMPLE, &[("REWARDPOOL__POOLS__2__ID", "x")]);
        let message = result.expect_err("pools[2] has no mode").to_string();
        assert_contains(
            &message,
            &["missing config key `pools[2].mode`", "pool \"x\""],
        );
        let (_, result) = load_text_env(
            EXAMPLE,
            &[
                ("REWARDPOOL__POOLS__2__ID", "extra"),
                ("REWARDPOOL__POOLS__2__MODE", "by_weight"),
                ("REWARDPOOL__POOLS__2__ITEMS__0__ID", "a"),
                ("REWARDPOOL__POOLS__2__ITEMS__0__WEIGHT", "3"),
                ("REWARDPOOL__POOLS__2__ITEMS__1__ID", "b"),
                ("REWARDPOOL__POOLS__2__ITEMS__1__QUANTITY", "4"),
                ("REWARDPOOL__POOLS__2__ITEMS__1__WEIGHT", "5"),
                ("REWARDPOOL__POOLS__0__ITEMS__2__ID", "copper"),
                ("REWARDPOOL__POOLS__0__ITEMS__2__QUANTITY", "7"),
                ("REWARDPOOL__ADMIN__ALLOWED_USERS__0", "ops"),
            ],
        );
        let config = result.expect("the environment adds a pool, an item and a user");
        assert_eq!(
            config.pools[2],
            PoolSeed::from_parts(
                "extra",
                Mode::ByWeight,
                &[("a".into(), None, Some(3)), ("b".into(), Some(4), Some(5))]
            )
        );
        assert_eq!(config.pools[0].items[2].stock, Stock::Limited(7));
        assert_eq!(config.admin.allowed_users, ["ops"]);

        let (_, result) =
            load_text_env(EXAMPLE, &[("REWARDPOOL__POOLS__0__ITEMS__0__WEIGHT", "x")]);
        let message = result.expect_err("not a number").to_string();
        assert_contains(
            &message,
            &[
                "REWARDPOOL__POOLS__0__ITEMS__0__WEIGHT",
                "expected an integer",
            ],
        );

        let (_, result) =
            load_text_env(EXAMPLE, &[("REWARDPOOL__POOLS__1__ITEMS__1__WEIGHT", "-1")]);
        let message = result.expect_err("negative weight").to_string();
        assert_contains(
            &message,
            &[
                "`pools[1].items[1].weight`",
                "from environment variable REWARDPOOL__POOLS__1__ITEMS__1__WEIGHT",
                "got -1",
            ],
        );

        let (_, result) = load_text_env(EXAMPLE, &[("REWARDPOOL__POOLS__0__ITEMS", "[]")]);
        let message = result.expect_err("whole list").to_string();
        assert_contains(&message, &["REWARDPOOL__POOLS__0__ITEMS", "key by key"]);
    }

    #[test]
    fn env_number_that_is_not_a_number_names_key_and_variable() {
        let vars = env(&[("REWARDPOOL__AMQP__PREFETCH", "lots")]);
        let error = Config::load_with_env(None, &vars).expect_err("not a number");
        assert!(matches!(error, ConfigError::BadValue { .. }), "{error:?}");
        assert_contains(
            &error.to_string(),
            &[
                "`amqp.prefetch`",
                "from environment variable REWARDPOOL__AMQP__PREFETCH",
                "\"lots\"",
                "integer",
            ],
        );
    }

    #[test]
    fn unknown_key_in_env_names_variable_and_key() {
        let vars = env(&[("REWARDPOOL__AMQP__BOGUS", "1")]);
        let error = Config::load_with_env(None, &vars).expect_err("unknown key");
        assert!(matches!(error, ConfigError::UnknownKey { .. }), "{error:?}");
        assert_contains(
            &error.to_string(),
            &[
                "unknown config key `amqp.bogus`",
                "REWARDPOOL__AMQP__BOGUS",
                "prefetch",
            ],
        );

        let vars = env(&[("REWARDPOOL__LOGGING__LEVEL", "debug")]);
        let message = Config::load_with_env(None, &vars)
            .expect_err("unknown table")
            .to_string();
        assert_contains(&message, &["`logging.level`", "REWARDPOOL__LOGGING__LEVEL"]);

        let vars = env(&[("REWARDPOOL__AMQP", "x")]);
        let message = Config::load_with_env(None, &vars)
            .expect_err("whole table")
            .to_string();
        assert_contains(&message, &["REWARDPOOL__AMQP", "one variable per key"]);
    }

    #[test]
    fn origins_name_env_variables_and_defaults() {
        let vars = env(&[("REWARDPOOL__AMQP__RECONNECT_BACKOFF_MIN_MS", "20000")]);
        let message = Config::load_with_env(None, &vars)
            .expect_err("min > max")
            .to_string();
        assert_contains(
            &message,
            &[
                "`amqp.reconnect_backoff_min_ms` from environment variable REWARDPOOL__AMQP__RECONNECT_BACKOFF_MIN_MS",
                "(20000) is greater than reconnect_backoff_max_ms (10000)",
            ],
        );
        let vars = env(&[("REWARDPOOL__AMQP__REQUEST_QUEUE", "rewardpool.results")]);
        let message = Config::load_with_env(None, &vars)
            .expect_err("same queue")
            .to_string();
        assert_contains(
            &message,
            &[
                "`amqp.result_queue` (built-in default)",
                "also used by amqp.request_queue",
            ],
        );
    }

    #[test]
    fn env_variables_that_set_the_same_key_conflict() {
        let vars = env(&[
            ("REWARDPOOL__AMQP__URL", "amqp://a"),
            ("rewardpool__amqp__url", "amqp://b"),
        ]);
        let message = Config::load_with_env(None, &vars)
            .expect_err("conflict")
            .to_string();
        assert_contains(&message, &["`amqp.url`", "already sets"]);
    }

    // --- unknown and malformed keys in the file ------------------------------------------------

    #[test]
    fn unknown_key_in_file_names_key_and_line() {
        let text = "[amqp]\nprefetch = 10\nbogus = 1\n";
        let (path, error, message) = error_of(text);
        assert!(matches!(error, ConfigError::UnknownKey { .. }), "{error:?}");
        assert_contains(
            &message,
            &[
                "unknown config key `amqp.bogus`",
                &format!("{} line 3", path.display()),
                "request_queue",
            ],
        );

        let (path, _, message) = error_of("[logging]\nlevel = 1\n");
        assert_contains(
            &message,
            &["`logging`", &format!("{} line 1", path.display())],
        );
    }

    #[test]
    fn unknown_key_in_pool_item_names_key_and_line() {
        let text = pool_file(
            "[[pools]]\nid = \"p\"\nmode = \"by_quantity\"\nitems = [\n  { id = \"a\", quantity = 1 },\n  { id = \"b\", quantity = 1, colour = \"red\" },\n]\n",
        );
        let (path, _, message) = error_of(&text);
        assert_contains(
            &message,
            &[
                "`pools[0].items[1].colour`",
                "pool \"p\", item \"b\"",
                &format!("{} line 9", path.display()),
                "quantity, weight",
            ],
        );
    }

    #[test]
    fn bad_enum_values_name_the_key() {
        let (path, _, message) = error_of("[amqp]\nqueue_type = \"fifo\"\n");
        assert_contains(
            &message,
            &[
                "`amqp.queue_type`",
                "must be \"quorum\" or \"classic\", got \"fifo\"",
                &format!("{} line 2", path.display()),
            ],
        );

        let text = pool_file(
            "[[pools]]\nid = \"p\"\nmode = \"random\"\nitems = [ { id = \"a\", quantity = 1 } ]\n",
        );
        let (path, _, message) = error_of(&text);
        assert_contains(
            &message,
            &[
                "`pools[0].mode`",
                "must be \"by_quantity\" or \"by_weight\", got \"random\"",
                &format!("{} line 6", path.display()),
            ],
        );
    }

    #[test]
    fn missing_pool_id_is_reported() {
        let text = pool_file(
            "[[pools]]\nmode = \"by_quantity\"\nitems = [ { id = \"a\", quantity = 1 } ]\n",
        );
        let (path, error, message) = error_of(&text);
        assert!(matches!(error, ConfigError::MissingKey { .. }), "{error:?}");
        assert_contains(
            &message,
            &["`pools[0].id`", &format!("{} line 4", path.display())],
        );
    }

    #[test]
    fn floats_and_out_of_type_numbers_are_rejected() {
        let text = pool_file(
            "[[pools]]\nid = \"p\"\nmode = \"by_quantity\"\nitems = [ { id = \"a\", quantity = 2.5 } ]\n",
        );
        let (_, error, message) = error_of(&text);
        assert!(matches!(error, ConfigError::BadValue { .. }), "{error:?}");
        assert_contains(
            &message,
            &["`pools[0].items[0].quantity`", "floating point", "integer"],
        );

        let (path, _, message) = error_of("[amqp]\nprefetch = 70000\n");
        assert_contains(
            &message,
            &[
                "`amqp.prefetch`",
                "70000",
                "65535",
                &format!("{} line 2", path.display()),
            ],
        );
    }

    // --- validation rules ----------------------------------------------------------------------

    #[test]
    fn duplicate_pool_ids_are_rejected() {
        let text = pool_file(
            "[[pools]]\nid = \"p\"\nmode = \"by_quantity\"\nitems = [ { id = \"a\", quantity = 1 } ]\n\n[[pools]]\nid = \"p\"\nmode = \"by_quantity\"\nitems = [ { id = \"a\", quantity = 1 } ]\n",
        );
        let (path, error, message) = error_of(&text);
        assert!(
            matches!(
                error,
                ConfigError::Rule {
                    rule: RuleError::DuplicatePoolId { .. },
                    ..
                }
            ),
            "{error:?}"
        );
        assert_contains(
            &message,
            &[
                "`pools[1].id`",
                "duplicate pool id \"p\"",
                &format!("{} line 10", path.display()),
                "`pools[0].id`",
                &format!("{} line 5", path.display()),
            ],
        );
    }

    #[test]
    fn duplicate_item_ids_are_rejected() {
        let text = pool_file(
            "[[pools]]\nid = \"p\"\nmode = \"by_quantity\"\nitems = [\n  { id = \"a\", quantity = 1 },\n  { id = \"b\", quantity = 1 },\n  { id = \"a\", quantity = 2 },\n]\n",
        );
        let (path, error, message) = error_of(&text);
        assert!(
            matches!(
                error,
                ConfigError::Rule {
                    rule: RuleError::DuplicateItemId { .. },
                    ..
                }
            ),
            "{error:?}"
        );
        assert_contains(
            &message,
            &[
                "`pools[0].items[2].id`",
                "duplicate item id \"a\"",
                &format!("{} line 10", path.display()),
                "`pools[0].items[0].id`",
                &format!("{} line 8", path.display()),
            ],
        );
    }

    #[test]
    fn a_file_without_pools_is_rejected() {
        let (path, error, message) = error_of("[amqp]\nprefetch = 10\n");
        assert!(matches!(error, ConfigError::NoPools { .. }), "{error:?}");
        assert_contains(
            &message,
            &["no pools", &path.display().to_string(), "[[pools]]"],
        );
    }

    #[test]
    fn a_pool_without_items_is_rejected() {
        let text = pool_file("[[pools]]\nid = \"empty\"\nmode = \"by_weight\"\nitems = []\n");
        let (path, error, message) = error_of(&text);
        assert!(
            matches!(
                error,
                ConfigError::Rule {
                    rule: RuleError::NoItems,
                    ..
                }
            ),
            "{error:?}"
        );
        assert_contains(
            &message,
            &[
                "`pools[0]`",
                "pool \"empty\"",
                &format!("{} line 5", path.display()),
                "no items",
            ],
        );

        let text = pool_file("[[pools]]\nid = \"empty\"\nmode = \"by_weight\"\n");
        let (_, error, _) = error_of(&text);
        assert!(
            matches!(
                error,
                ConfigError::Rule {
                    rule: RuleError::NoItems,
                    ..
                }
            ),
            "missing items = empty"
        );
    }

    fn spin_with(item_line: &str) -> String {
        pool_file(&format!(
            "[[pools]]\nid = \"spin\"\nmode = \"by_weight\"\nitems = [\n  {{ id = \"car\", quantity = 1, weight = 1 }},\n  {item_line},\n]\n"
        ))
    }

    #[test]
    fn zero_weight_is_rejected() {
        let (path, error, message) = error_of(&spin_with("{ id = \"x\", weight = 0 }"));
        assert!(matches!(
            error,
            ConfigError::Rule {
                rule: RuleError::NonPositiveWeight { value: 0 },
                ..
            }
        ));
        assert_contains(
            &message,
            &[
                "`pools[0].items[1].weight`",
                "pool \"spin\", item \"x\"",
                &format!("{} line 9", path.display()),
                "greater than 0, got 0",
            ],
        );
    }

    #[test]
    fn negative_weight_is_rejected() {
        let (path, error, message) = error_of(&spin_with("{ id = \"x\", weight = -3 }"));
        assert!(matches!(
            error,
            ConfigError::Rule {
                rule: RuleError::NonPositiveWeight { value: -3 },
                ..
            }
        ));
        assert_contains(
            &message,
            &[
                "`pools[0].items[1].weight`",
                &format!("{} line 9", path.display()),
                "got -3",
            ],
        );
    }

    #[test]
    fn by_weight_item_without_weight_is_rejected() {
        let (path, error, message) = error_of(&spin_with("{ id = \"x\", quantity = 4 }"));
        assert!(matches!(
            error,
            ConfigError::Rule {
                rule: RuleError::MissingWeight,
                ..
            }
        ));
        assert_contains(
            &message,
            &[
                "`pools[0].items[1].weight`",
                &format!("{} line 9", path.display()),
                "missing weight",
                "by_weight",
            ],
        );
    }

    fn quantity_pool_with(item_line: &str) -> String {
        pool_file(&format!(
            "[[pools]]\nid = \"default\"\nmode = \"by_quantity\"\nitems = [\n  {{ id = \"gold\", quantity = 10 }},\n  {item_line},\n]\n"
        ))
    }

    #[test]
    fn weight_on_by_quantity_item_is_rejected() {
        let (path, error, message) = error_of(&quantity_pool_with(
            "{ id = \"x\", quantity = 1, weight = 5 }",
        ));
        assert!(matches!(
            error,
            ConfigError::Rule {
                rule: RuleError::UnexpectedWeight,
                ..
            }
        ));
        assert_contains(
            &message,
            &[
                "`pools[0].items[1].weight`",
                &format!("{} line 9", path.display()),
                "not allowed in a by_quantity pool",
            ],
        );
    }

    #[test]
    fn unlimited_item_in_by_quantity_pool_is_rejected() {
        let (path, error, message) = error_of(&quantity_pool_with("{ id = \"x\" }"));
        assert!(matches!(
            error,
            ConfigError::Rule {
                rule: RuleError::UnlimitedItem,
                ..
            }
        ));
        assert_contains(
            &message,
            &[
                "`pools[0].items[1].quantity`",
                "pool \"default\", item \"x\"",
                &format!("{} line 9", path.display()),
                "unlimited",
            ],
        );
    }

    #[test]
    fn negative_quantity_is_rejected() {
        let (path, error, message) = error_of(&quantity_pool_with("{ id = \"x\", quantity = -1 }"));
        assert!(matches!(
            error,
            ConfigError::Rule {
                rule: RuleError::NegativeQuantity { value: -1 },
                ..
            }
        ));
        assert_contains(
            &message,
            &[
                "`pools[0].items[1].quantity`",
                &format!("{} line 9", path.display()),
                "must not be negative, got -1",
            ],
        );
        // The same rule in a by_weight pool.
        let (_, error, _) = error_of(&spin_with("{ id = \"x\", quantity = -7, weight = 1 }"));
        assert!(matches!(
            error,
            ConfigError::Rule {
                rule: RuleError::NegativeQuantity { value: -7 },
                ..
            }
        ));
    }

    #[test]
    fn quantity_zero_is_accepted() {
        let (_, result) = load_text(&quantity_pool_with("{ id = \"x\", quantity = 0 }"));
        let config = result.expect("quantity 0 is sold out, not an error");
        assert_eq!(config.pools[0].items[1].stock, Stock::Limited(0));
        let (_, result) = load_text(&spin_with("{ id = \"x\", quantity = 0, weight = 3 }"));
        result.expect("quantity 0 in a by_weight pool");
    }

    #[test]
    fn id_bounds() {
        let (_, error, message) = error_of(&quantity_pool_with("{ id = \"\", quantity = 1 }"));
        assert!(matches!(
            error,
            ConfigError::Rule {
                rule: RuleError::EmptyId { .. },
                ..
            }
        ));
        assert_contains(&message, &["`pools[0].items[1].id`", "must not be empty"]);

        let long = "x".repeat(ID_BYTES_MAX + 1);
        let (_, _, message) = error_of(&quantity_pool_with(&format!(
            "{{ id = \"{long}\", quantity = 1 }}"
        )));
        assert_contains(
            &message,
            &["`pools[0].items[1].id`", "129 bytes", "at most 128"],
        );
        let fits = "y".repeat(ID_BYTES_MAX);
        let (_, result) = load_text(&quantity_pool_with(&format!(
            "{{ id = \"{fits}\", quantity = 1 }}"
        )));
        result.expect("128 bytes is allowed");

        let text = pool_file(
            "[[pools]]\nid = \"\"\nmode = \"by_quantity\"\nitems = [ { id = \"a\", quantity = 1 } ]\n",
        );
        let (path, _, message) = error_of(&text);
        assert_contains(
            &message,
            &[
                "`pools[0].id`",
                "pool id must not be empty",
                &format!("{} line 5", path.display()),
            ],
        );
    }

    #[test]
    fn quantity_and_weight_bounds() {
        let too_many = QUANTITY_MAX + 1;
        let (_, error, message) = error_of(&quantity_pool_with(&format!(
            "{{ id = \"x\", quantity = {too_many} }}"
        )));
        assert!(matches!(
            error,
            ConfigError::Rule {
                rule: RuleError::QuantityTooLarge { .. },
                ..
            }
        ));
        assert_contains(
            &message,
            &[
                "`pools[0].items[1].quantity`",
                "2^40",
                &too_many.to_string(),
            ],
        );
        let (_, result) = load_text(&quantity_pool_with(&format!(
            "{{ id = \"x\", quantity = {QUANTITY_MAX} }}"
        )));
        result.expect("2^40 is allowed");

        let heavy = WEIGHT_MAX + 1;
        let (_, error, message) =
            error_of(&spin_with(&format!("{{ id = \"x\", weight = {heavy} }}")));
        assert!(matches!(
            error,
            ConfigError::Rule {
                rule: RuleError::WeightTooLarge { .. },
                ..
            }
        ));
        assert_contains(
            &message,
            &["`pools[0].items[1].weight`", "2^32", &heavy.to_string()],
        );
        let (_, result) = load_text(&spin_with(&format!(
            "{{ id = \"x\", weight = {WEIGHT_MAX} }}"
        )));
        result.expect("2^32 is allowed");
    }

    #[test]
    fn item_and_pool_counts_are_bounded() {
        let mut raw = RawConfig::from(&Config::builtin());
        // Empty ids (no allocation per item): the count is checked before any item.
        let item = RawItem {
            id: String::new(),
            quantity: Some(1),
            weight: None,
        };
        raw.pools[0].items = vec![item; POOL_ITEMS_MAX + 1];
        let message = raw.validate().expect_err("too many items").to_string();
        assert_contains(
            &message,
            &[
                "`pools[0].items`",
                "number of items",
                "16777216",
                "16777217",
            ],
        );

        let mut text = String::new();
        for index in 0..=CONFIG_POOLS_MAX {
            text.push_str(&format!(
                "[[pools]]\nid = \"p{index}\"\nmode = \"by_quantity\"\nitems = [ {{ id = \"a\", quantity = 1 }} ]\n"
            ));
        }
        let (_, error, message) = error_of(&text);
        assert!(matches!(error, ConfigError::OutOfRange { .. }));
        assert_contains(
            &message,
            &["`pools`", "number of pools", "1024", "1025", "line 1"],
        );
    }

    #[test]
    fn amqp_bounds() {
        let cases: &[(&str, &[&str])] = &[
            (
                "prefetch = 0",
                &["`amqp.prefetch`", "between 1 and 65535, got 0"],
            ),
            ("delivery_limit = 0", &["`amqp.delivery_limit`", "got 0"]),
            (
                "url = \"http://broker\"",
                &["`amqp.url`", "amqp://", "amqps://", "\"http\""],
            ),
            ("url = \"broker:5672\"", &["`amqp.url`", "no scheme"]),
            (
                "request_queue = \"\"",
                &["`amqp.request_queue`", "must not be empty"],
            ),
            (
                "result_queue = \"amq.results\"",
                &["`amqp.result_queue`", "reserves"],
            ),
            (
                "dead_letter_queue = \"rewardpool.requests\"",
                &[
                    "`amqp.dead_letter_queue`",
                    "also used by amqp.request_queue",
                ],
            ),
            (
                "connect_timeout_ms = 0",
                &["`amqp.connect_timeout_ms`", "got 0"],
            ),
            (
                "operation_timeout_ms = 3600001",
                &["`amqp.operation_timeout_ms`", "3600000"],
            ),
            ("shutdown_deadline_ms = 0", &["`amqp.shutdown_deadline_ms`"]),
            (
                "reconnect_backoff_min_ms = 0",
                &["`amqp.reconnect_backoff_min_ms`"],
            ),
            (
                "reconnect_backoff_max_ms = 50",
                &[
                    "`amqp.reconnect_backoff_max_ms`",
                    "greater than reconnect_backoff_max_ms (50)",
                ],
            ),
            (
                "dead_letter_exchange = \"amq.direct\"",
                &["`amqp.dead_letter_exchange`", "reserves"],
            ),
        ];
        for (line, expected) in cases {
            let text = format!("[amqp]\n{line}\n\n{}", pool_file(""));
            let (path, _, message) = error_of(&format!(
                "{text}\n[[pools]]\nid = \"p\"\nmode = \"by_quantity\"\nitems = [ {{ id = \"a\", quantity = 1 }} ]\n"
            ));
            assert_contains(&message, expected);
            assert_contains(&message, &[&format!("{} line 2", path.display())]);
        }
        let long = "q".repeat(AMQP_NAME_BYTES_MAX + 1);
        let mut config = RawConfig::from(&Config::builtin());
        config.amqp.request_queue = long.clone();
        let message = config.validate().expect_err("too long").to_string();
        assert_contains(
            &message,
            &["`amqp.request_queue`", "256 bytes", "at most 255"],
        );
        config.amqp.request_queue = "q".repeat(AMQP_NAME_BYTES_MAX);
        let message = config
            .validate()
            .expect_err("derived dlx too long")
            .to_string();
        assert_contains(&message, &["`amqp.dead_letter_exchange`", "derived"]);
        config.amqp.dead_letter_exchange = "dlx".to_owned();
        config
            .validate()
            .expect("255-byte queue name with explicit exchange");
    }

    #[test]
    fn storage_bounds() {
        let cases: &[(&str, &[&str])] = &[
            (
                "dedupe_window = 0",
                &["`storage.dedupe_window`", "between 1 and 10000000, got 0"],
            ),
            (
                "dedupe_window = 10000001",
                &["`storage.dedupe_window`", "got 10000001"],
            ),
            ("batch_records_max = 0", &["`storage.batch_records_max`"]),
            ("channel_capacity = 0", &["`storage.channel_capacity`"]),
            (
                "snapshot_every_records = 0",
                &["`storage.snapshot_every_records`"],
            ),
            ("segment_bytes_max = 0", &["`storage.segment_bytes_max`"]),
            ("id_block_size = 0", &["`storage.id_block_size`"]),
            ("seed_epoch_records = 0", &["`storage.seed_epoch_records`"]),
            (
                "data_dir = \"\"",
                &["`storage.data_dir`", "must not be empty"],
            ),
            ("rng_seed = -1", &["`storage.rng_seed`", "out of range"]),
        ];
        for (line, expected) in cases {
            let text = format!(
                "[storage]\n{line}\n\n[[pools]]\nid = \"p\"\nmode = \"by_quantity\"\nitems = [ {{ id = \"a\", quantity = 1 }} ]\n"
            );
            let (path, _, message) = error_of(&text);
            assert_contains(&message, expected);
            assert_contains(&message, &[&format!("{} line 2", path.display())]);
        }
        let (_, result) = load_text(&format!(
            "[storage]\ndedupe_window = 10000000\nrng_seed = 7\n\n{}",
            quantity_pool_with("{ id = \"x\", quantity = 1 }")
                .trim_start_matches("[storage]\ndata_dir = \"d\"\n")
        ));
        let config = result.expect("upper bound allowed");
        assert_eq!(config.storage.rng_seed, Some(7));
    }

    #[test]
    fn validate_without_context_reports_no_origin() {
        let mut config = RawConfig::from(&Config::builtin());
        config.pools[0].items[0].quantity = Some(-2);
        let message = config.validate().expect_err("negative").to_string();
        assert_eq!(
            message,
            "`pools[0].items[0].quantity` (indices 0-based; pool \"default\", item \"gold\"): \
             quantity must not be negative, got -2 (use 0 for a sold-out item)"
        );
        config.pools.clear();
        assert!(matches!(
            config.validate(),
            Err(ConfigError::NoPools { .. })
        ));
    }

    /// A data_dir that is not UTF-8 (from `--data-dir`, or a config built in code) is a path
    /// the worker can use: validate accepts it, keeps it as is and still checks the integers.
    #[cfg(unix)]
    #[test]
    fn validate_accepts_a_data_dir_that_is_not_utf8() {
        use std::os::unix::ffi::OsStrExt;
        let data_dir = PathBuf::from(std::ffi::OsStr::from_bytes(b"data-\xff\xfe"));
        assert!(data_dir.to_str().is_none());
        let mut config = RawConfig::from(&Config::builtin());
        config.storage.data_dir = data_dir.clone();
        let valid = config
            .validate()
            .expect("a data_dir that is not UTF-8 is valid");
        assert_eq!(valid.storage, config.storage);
        assert_eq!(valid.storage.data_dir, data_dir);
        config.storage.dedupe_window = 0;
        let message = config.validate().expect_err("out of range").to_string();
        assert_contains(&message, &["`storage.dedupe_window`", "got 0"]);
    }

    // --- file errors -----------------------------------------------------------------------

    #[test]
    fn toml_syntax_error_names_file_and_line() {
        let (path, error, message) = error_of("[amqp]\nprefetch = 10\nurl = = 3\n");
        match &error {
            ConfigError::Syntax { line, .. } => assert_eq!(*line, Some(3)),
            other => panic!("expected a syntax error, got {other:?}"),
        }
        assert_contains(&message, &[&path.display().to_string(), "line 3"]);

        let (_, error, _) = error_of("[amqp]\nprefetch = 1\nprefetch = 2\n");
        assert!(
            matches!(error, ConfigError::Syntax { line: Some(3), .. }),
            "{error:?}"
        );
    }

    #[test]
    fn missing_file_names_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nope.toml");
        let error = Config::load_with_env(Some(&path), &[]).expect_err("missing");
        assert!(matches!(error, ConfigError::FileNotFound { .. }));
        assert_contains(
            &error.to_string(),
            &[&path.display().to_string(), "not found"],
        );

        let error = Config::load_with_env(Some(dir.path()), &[]).expect_err("a directory");
        assert!(matches!(error, ConfigError::FileRead { .. }), "{error:?}");
        assert_contains(&error.to_string(), &[&dir.path().display().to_string()]);
    }

    // --- secrets -------------------------------------------------------------------------------

    #[test]
    fn url_redacted_hides_the_password() {
        let mut amqp = Config::builtin().amqp;
        assert_eq!(amqp.url_redacted(), "amqp://guest:***@127.0.0.1:5672/%2f");
        amqp.url = "amqps://user:p@ss/word@host:5671/vh?x=1".to_owned();
        assert!(!amqp.url_redacted().contains("ss/word"));
        assert!(amqp.url_redacted().starts_with("amqps://user:***@"));
        amqp.url = "amqp://user@host/".to_owned();
        assert_eq!(amqp.url_redacted(), "amqp://user@host/");
        amqp.url = "amqp://host".to_owned();
        assert_eq!(amqp.url_redacted(), "amqp://host");
        amqp.url = "amqp://user:s3cret@host/v@h".to_owned();
        assert_eq!(
            amqp.url_redacted(),
            "amqp://user:***@h",
            "over-redacts, never leaks"
        );
        let debug = format!(
            "{:?}",
            Config {
                amqp,
                ..Config::builtin()
            }
        );
        assert!(!debug.contains("s3cret"), "{debug}");
    }

    #[test]
    fn the_password_never_appears_in_errors() {
        const SECRET: &str = "hunter2secret";
        let texts = [
            // Syntax error on the url line (the parser quotes the line).
            format!("[amqp]\nurl = \"amqp://admin:{SECRET}@broker/%2f\n"),
            format!("[amqp]\nurl = \"amqp://admin:{SECRET}@broker/%2f\" extra\n"),
            // The url where a number belongs.
            format!("[amqp]\nprefetch = \"amqp://admin:{SECRET}@broker/%2f\"\n"),
            // A url with a wrong scheme.
            format!("[amqp]\nurl = \"http://admin:{SECRET}@broker/\"\n"),
            // The url as a pool id.
            pool_file(&format!(
                "[[pools]]\nid = \"amqp://admin:{SECRET}@broker\"\nmode = \"by_quantity\"\nitems = []\n"
            )),
        ];
        for text in &texts {
            let (_, error, message) = error_of(text);
            assert!(!message.contains(SECRET), "{message}");
            let debug = format!("{error:?}");
            assert!(!debug.contains(SECRET), "{debug}");
        }
        let vars = env(&[
            (
                "REWARDPOOL__AMQP__URL",
                &format!("amqp://admin:{SECRET}@broker/%2f"),
            ),
            (
                "REWARDPOOL__AMQP__PREFETCH",
                &format!("amqp://admin:{SECRET}@broker/%2f"),
            ),
        ]);
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let error = Config::load_with_env(None, &env(&vars)).expect_err("bad prefetch");
        assert!(!error.to_string().contains(SECRET), "{error}");
        assert!(!format!("{error:?}").contains(SECRET));
    }

    /// Asserts that not even a part (5 characters in a row) of `secret` is in `text`.
    fn assert_no_part_of(secret: &str, text: &str) {
        let chars: Vec<char> = secret.chars().collect();
        for part in chars.windows(5).map(String::from_iter) {
            assert!(!text.contains(&part), "{part:?} of the password in {text}");
        }
    }

    /// A url with a password as the value of an enum-valued key, short or long enough to be
    /// shortened in the message: no part of the password appears (the value is redacted before
    /// it is shortened, else the cut can fall before the `@` that ends the password).
    #[test]
    fn no_part_of_a_password_appears_in_errors_on_enum_values_short_or_long() {
        const PASSWORD: &str = "Hx7Qz2Wv9Kp4Lm6Nr8Bt3Jy5Fd1Gs0CuAe4Io8UyTrEwQaSdFgHjKlZxCvBnM";
        let values = [
            format!("amqp://user:{}@broker", &PASSWORD[..12]),
            format!("amqp://user:{PASSWORD}@broker.example.com:5672/%2f"),
            format!("amqps://u:{PASSWORD}@b"),
        ];
        for value in &values {
            let texts = [
                format!("[amqp]\nqueue_type = {value:?}\n"),
                format!("[log]\nformat = {value:?}\n"),
                pool_file(&format!(
                    "[[pools]]\nid = \"p\"\nmode = {value:?}\nitems = [ {{ id = \"a\", quantity = 1 }} ]\n"
                )),
            ];
            for text in &texts {
                let (_, error, message) = error_of(text);
                assert_contains(&message, &["must be \"", ", got \"amqp"]);
                assert_no_part_of(PASSWORD, &message);
                assert_no_part_of(PASSWORD, &format!("{error:?}"));
            }
            // The same keys from the environment.
            for var in ["AMQP__QUEUE_TYPE", "LOG__FORMAT", "POOLS__0__MODE"] {
                let vars = [(format!("{ENV_PREFIX}{var}"), value.clone())];
                let error = Config::load_with_env(None, &vars).expect_err("bad enum value");
                assert_no_part_of(PASSWORD, &error.to_string());
                assert_no_part_of(PASSWORD, &format!("{error:?}"));
            }
            // A url as a pool or item id used twice: the rule's message quotes the id.
            let pool = |id: &str, items: &str| {
                format!("[[pools]]\nid = {id:?}\nmode = \"by_quantity\"\nitems = [ {items} ]\n")
            };
            let item = |id: &str| format!("{{ id = {id:?}, quantity = 1 }}");
            let twice = [
                pool(value, &item("a")).repeat(2),
                pool("p", &format!("{}, {}", item(value), item(value))),
            ];
            for text in &twice {
                let (_, error, message) = error_of(&pool_file(text));
                assert_contains(&message, &["duplicate"]);
                assert_no_part_of(PASSWORD, &message);
                assert_no_part_of(PASSWORD, &format!("{error:?}"));
            }
        }
    }

    // --- helpers -------------------------------------------------------------------------------

    #[test]
    fn the_routing_exchange_leaves_room_for_the_pool_lock_names() {
        // <exchange>.pool.<pool id up to ID_BYTES_MAX>.lock must fit an AMQP name.
        let fits = AMQP_NAME_BYTES_MAX - ".pool.".len() - ID_BYTES_MAX - ".lock".len();
        let file = |exchange: String| {
            format!(
                "[amqp]\nexchange = {exchange:?}\n\n[[pools]]\nid = \"p\"\nmode = \"by_quantity\"\nitems = [{{ id = \"a\", quantity = 1 }}]\n"
            )
        };
        let (_, ok) = load_text(&file("e".repeat(fits)));
        assert_eq!(ok.expect("fits").amqp.exchange.len(), fits);
        let (_, _, message) = error_of(&file("e".repeat(fits + 1)));
        assert_contains(
            &message,
            &["amqp.exchange", "pool locks", &fits.to_string()],
        );
    }

    #[test]
    fn the_admin_queue_leaves_room_for_its_dead_letter_exchange_and_user_names_are_bounded() {
        let mut config = RawConfig::from(&Config::builtin());
        config.amqp.admin_queue = "a".repeat(AMQP_NAME_BYTES_MAX - ".dlx".len());
        config.validate().expect("<admin_queue>.dlx fits");
        config.amqp.admin_queue.push('a');
        let message = config.validate().expect_err("too long").to_string();
        assert_eq!(
            message,
            "`amqp.admin_queue`: queue name is 252 bytes long, at most 251 allowed, to leave room \
             for its dead-letter exchange \"<admin_queue>.dlx\""
        );
        let mut config = RawConfig::from(&Config::builtin());
        config.admin.allowed_users = vec!["u".repeat(AMQP_NAME_BYTES_MAX + 1)];
        let message = config.validate().expect_err("too long").to_string();
        assert_contains(
            &message,
            &["`admin.allowed_users[0]`", "256 bytes long, at most 255"],
        );
    }

    #[test]
    fn released_pools_are_pool_ids_listed_once_and_settable_from_the_environment() {
        let file = |list: &str| {
            format!(
                "[amqp]\nreleased_pools = {list}\n\n[[pools]]\nid = \"p\"\nmode = \"by_quantity\"\nitems = [{{ id = \"a\", quantity = 1 }}]\n"
            )
        };
        assert!(Config::builtin().amqp.released_pools.is_empty());
        let (_, ok) = load_text(&file(r#"["xmas", "p"]"#));
        assert_eq!(ok.expect("loads").amqp.released_pools, ["xmas", "p"]);
        let (_, _, message) = error_of(&file(r#"["xmas", "xmas"]"#));
        assert_contains(&message, &["`amqp.released_pools[1]`", "twice", "line 2"]);
        let (_, _, message) = error_of(&file(r#"[""]"#));
        assert_contains(&message, &["`amqp.released_pools[0]`", "pool id"]);
        let (_, _, message) = error_of(&file(&format!("[{:?}]", "x".repeat(ID_BYTES_MAX + 1))));
        assert_contains(&message, &["`amqp.released_pools[0]`", "at most"]);
        let vars = env(&[("REWARDPOOL__AMQP__RELEASED_POOLS__0", "xmas")]);
        let config = Config::load_with_env(None, &vars).expect("env sets released_pools");
        assert_eq!(config.amqp.released_pools, ["xmas"]);
    }

    #[test]
    fn dead_letter_exchange_name_is_derived_when_empty() {
        let mut amqp = Config::builtin().amqp;
        assert_eq!(amqp.dead_letter_exchange_name(), "rewardpool.requests.dlx");
        amqp.dead_letter_exchange = "my.dlx".to_owned();
        assert_eq!(amqp.dead_letter_exchange_name(), "my.dlx");
    }

    #[test]
    fn key_paths_parse() {
        assert_eq!(
            canonical("pools[1]items[2]weight"),
            "pools[1].items[2].weight"
        );
        assert_eq!(canonical("pools[1]id"), "pools[1].id");
        assert_eq!(canonical("pools[0]"), "pools[0]");
        assert_eq!(canonical("amqp.url"), "amqp.url");
        assert_eq!(shape("pools[10].items[2].weight"), "pools[].items[].weight");
        assert_eq!(parent("pools[1].id"), Some("pools[1]"));
        assert_eq!(parent("pools[1]"), Some("pools"));
        assert_eq!(parent("pools"), None);
        assert_eq!(child("", "amqp"), "amqp");
        assert_eq!(child("amqp", "url"), "amqp.url");
    }

    #[test]
    fn locator_handles_dotted_and_inline_tables() {
        let text = "amqp.prefetch = 0\n\n[[pools]]\nid = \"p\"\nmode = \"by_quantity\"\nitems = [ { id = \"a\", quantity = 1 } ]\n";
        let (path, _, message) = error_of(text);
        assert_contains(
            &message,
            &["`amqp.prefetch`", &format!("{} line 1", path.display())],
        );

        let text = "storage = { data_dir = \"d\", dedupe_window = 0 }\n\n[[pools]]\nid = \"p\"\nmode = \"by_quantity\"\nitems = [ { id = \"a\", quantity = 1 } ]\n";
        let (path, _, message) = error_of(text);
        assert_contains(
            &message,
            &[
                "`storage.dedupe_window`",
                &format!("{} line 1", path.display()),
            ],
        );

        // Inline pools: the spans still give the line.
        let text =
            "pools = [ { id = \"p\", mode = \"by_quantity\", items = [ { id = \"a\" } ] } ]\n";
        let (path, _, message) = error_of(text);
        assert_contains(
            &message,
            &[
                "`pools[0].items[0].quantity`",
                &format!("{} line 1", path.display()),
            ],
        );
    }

    #[test]
    fn contract_keys_of_admin_metrics_log_tls_and_shards() {
        let config = Config::builtin();
        assert_eq!(config.amqp.admin_queue, "rewardpool.admin");
        assert_eq!(config.amqp.tls_ca_file, "");
        assert_eq!(config.amqp.exchange, "");
        assert!(config.admin.allowed_users.is_empty());
        assert_eq!(config.metrics.listen, "127.0.0.1:9464");
        assert_eq!(config.log.format, LogFormat::Text);

        let text = "[amqp]\nadmin_queue = \"ops\"\nexchange = \"rp\"\ntls_ca_file = \"ca.pem\"\n\
                    [admin]\nallowed_users = [\"alice\"]\n[metrics]\nlisten = \"\"\n[log]\nformat = \"json\"\n";
        let (_, result) = load_text(&format!(
            "{text}\n{}",
            quantity_pool_with("{ id = \"x\", quantity = 1 }")
                .trim_start_matches("[storage]\ndata_dir = \"d\"\n")
        ));
        let config = result.expect("loads");
        assert_eq!(config.amqp.admin_queue, "ops");
        assert_eq!(config.amqp.exchange, "rp");
        assert_eq!(config.amqp.tls_ca_file, "ca.pem");
        assert_eq!(config.admin.allowed_users, ["alice"]);
        assert_eq!(config.metrics.listen, "");
        assert_eq!(config.log.format, LogFormat::Json);

        let cases: &[(&str, &[&str])] = &[
            (
                "[metrics]\nlisten = \"localhost\"",
                &["`metrics.listen`", "socket address", "line 2"],
            ),
            (
                "[admin]\nallowed_users = [\"\"]",
                &["`admin.allowed_users[0]`", "must not be empty"],
            ),
            (
                "[log]\nformat = \"xml\"",
                &[
                    "`log.format`",
                    "must be \"text\" or \"json\", got \"xml\"",
                    "line 2",
                ],
            ),
            (
                "[amqp]\ntls_cert_file = \"c.pem\"",
                &["`amqp.tls_cert_file`", "both or neither", "line 2"],
            ),
            (
                "[amqp]\nadmin_queue = \"rewardpool.requests\"",
                &["`amqp.admin_queue`", "also used by amqp.request_queue"],
            ),
            (
                "[amqp]\nexchange = \"amq.topic\"",
                &["`amqp.exchange`", "reserves"],
            ),
        ];
        for (section, expected) in cases {
            let (_, _, message) = error_of(&format!(
                "{section}\n\n[[pools]]\nid = \"p\"\nmode = \"by_quantity\"\nitems = [ {{ id = \"a\", quantity = 1 }} ]\n"
            ));
            assert_contains(&message, expected);
        }
        let vars = env(&[("REWARDPOOL__METRICS__LISTEN", "0.0.0.0:9100")]);
        let config = Config::load_with_env(None, &vars).expect("env sets metrics.listen");
        assert_eq!(config.metrics.listen, "0.0.0.0:9100");
    }

    #[test]
    fn the_deploy_example_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/config.example.toml");
        let config = Config::load_with_env(Some(&path), &[]).expect("the example is valid");
        assert_eq!(config.amqp.admin_queue, "rewardpool.admin");
        assert_eq!(config.metrics.listen, "127.0.0.1:9464");
    }
}
