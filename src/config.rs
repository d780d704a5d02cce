//! Worker configuration: loading, defaults, environment overrides and validation.
//!
//! The configuration is a TOML file read with the `config` crate. Every key can be
//! overridden from the environment with the prefix `REWARDPOOL__` and `__` between levels
//! (`REWARDPOOL__AMQP__URL`, `REWARDPOOL__POOLS__1__ITEMS__0__QUANTITY`). Without a file the
//! worker runs on [`Config::builtin`].
//!
//! Two types, two stages:
//!
//! * [`RawConfig`] is what serde reads (`deny_unknown_fields`: an unknown key is an error);
//!   quantities and weights are signed there so that a negative value reaches the rules.
//! * [`Config`] is what the worker gets: every rule checked, pools as [`PoolSeed`]s (stock is
//!   [`Stock`], never a signed number). [`RawConfig::validate`] is the only way from one to the
//!   other; the pool and item rules themselves live in [`crate::seed`] and know no file.
//!
//! Loading: `config` layers the built-in pools (no file) or the file, then one override per
//! environment variable. The variables are checked by one small walk over the key schema
//! (taken from the serde structs themselves, no hand-kept key lists): a numeric segment
//! indexes an array, so the environment can edit pool entries or append one at the end.
//! Values stay strings (`"007"` stays `"007"`); integers are parsed by `strict_int`, which
//! also rejects the floats and booleans `config` would round or turn into 0/1.
//!
//! Errors name the key path (`pools[1].items[2].weight`, indices 0-based), the pool and item
//! ids and the origin of the value: the file and line (from `toml`'s spans), the environment
//! variable, or the built-in default. The AMQP password never appears in an error nor in the
//! `Debug` of [`AmqpConfig`]; use [`AmqpConfig::url_redacted`] for logs.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::limits::{
    AMQP_NAME_BYTES_MAX, BATCH_RECORDS_MAX, CHANNEL_CAPACITY_MAX, CONFIG_POOLS_MAX,
    DEDUPE_WINDOW_MAX, ID_BLOCK_SIZE_MAX, ID_BYTES_MAX, POOL_ITEMS_MAX, PREFETCH_MAX, PREFETCH_MIN,
    SEED_EPOCH_RECORDS_MAX, SEGMENT_BYTES_MAX, SHUTDOWN_DEADLINE_MS_MAX,
    SNAPSHOT_EVERY_RECORDS_MAX, TIMEOUT_MS_MAX,
};
pub use crate::seed::{Mode, PoolSeed, SeedItem, Stock};
use crate::seed::{RuleError, shorten as shorten_plain};

/// Prefix of environment overrides (followed by [`ENV_SEPARATOR`]).
pub const ENV_PREFIX: &str = "REWARDPOOL";
/// Separator between the prefix and each level of an environment override.
pub const ENV_SEPARATOR: &str = "__";

/// The built-in pool of the contract, used when no file is given.
const BUILTIN_POOLS_TOML: &str = r#"
[[pools]]
id = "default"
mode = "by_quantity"
items = [
  { id = "gold", quantity = 10 },
  { id = "silver", quantity = 100 },
  { id = "bronze", quantity = 1000 },
]
"#;

// ---------------------------------------------------------------------------------------------
// The types

/// The whole configuration as read, before any rule is checked.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub amqp: AmqpConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub pools: Vec<RawPool>,
}

/// One `[[pools]]` entry as read.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    pub id: String,
    pub mode: Mode,
    /// Missing `items` reads as empty and fails validation as "no items".
    #[serde(default)]
    pub items: Vec<RawItem>,
}

/// One item as read. Signed, so that negative values reach the rules.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawItem {
    pub id: String,
    /// Absent: unlimited (only in `by_weight` pools).
    #[serde(default, deserialize_with = "strict_int::opt")]
    pub quantity: Option<i64>,
    /// Required in `by_weight` pools, forbidden in `by_quantity` pools.
    #[serde(default, deserialize_with = "strict_int::opt")]
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

/// `[amqp]`: broker connection and broker objects.
#[derive(Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpConfig {
    /// `amqp://` or `amqps://` URL; may hold a password (see [`AmqpConfig::url_redacted`]).
    pub url: String,
    pub request_queue: String,
    pub result_queue: String,
    pub dead_letter_queue: String,
    /// Admin commands (contract: Admin commands).
    pub admin_queue: String,
    /// Unacked deliveries in flight (`basic_qos`).
    #[serde(deserialize_with = "strict_int::int")]
    pub prefetch: u16,
    pub queue_type: QueueType,
    /// Quorum queues only: deliveries before the broker dead-letters a request.
    #[serde(deserialize_with = "strict_int::int")]
    pub delivery_limit: u32,
    #[serde(deserialize_with = "strict_int::int")]
    pub connect_timeout_ms: u64,
    #[serde(deserialize_with = "strict_int::int")]
    pub operation_timeout_ms: u64,
    #[serde(deserialize_with = "strict_int::int")]
    pub reconnect_backoff_min_ms: u64,
    #[serde(deserialize_with = "strict_int::int")]
    pub reconnect_backoff_max_ms: u64,
    #[serde(deserialize_with = "strict_int::int")]
    pub shutdown_deadline_ms: u64,
    /// Empty: derived as `<request_queue>.dlx` (see [`AmqpConfig::dead_letter_exchange_name`]).
    pub dead_letter_exchange: String,
    /// PEM CA file for `amqps://` ("" = built-in roots).
    pub tls_ca_file: String,
    /// PEM client certificate and key ("" = none; both or neither).
    pub tls_cert_file: String,
    pub tls_key_file: String,
    /// Routing exchange of a sharded deployment ("" = none).
    pub exchange: String,
    /// Pools of the durable state this worker no longer serves (moved to another worker):
    /// never locked or bound, and no admin command applies to them (README, "Moving a pool").
    pub released_pools: Vec<String>,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned(),
            request_queue: "rewardpool.requests".to_owned(),
            result_queue: "rewardpool.results".to_owned(),
            dead_letter_queue: "rewardpool.dead".to_owned(),
            admin_queue: "rewardpool.admin".to_owned(),
            prefetch: 1000,
            queue_type: QueueType::Quorum,
            delivery_limit: 20,
            connect_timeout_ms: 5000,
            operation_timeout_ms: 10_000,
            reconnect_backoff_min_ms: 100,
            reconnect_backoff_max_ms: 10_000,
            shutdown_deadline_ms: 30_000,
            dead_letter_exchange: String::new(),
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            exchange: String::new(),
            released_pools: Vec::new(),
        }
    }
}

impl AmqpConfig {
    /// The dead-letter exchange to declare: `dead_letter_exchange`, or
    /// `<request_queue>.dlx` when that is empty.
    pub fn dead_letter_exchange_name(&self) -> String {
        if self.dead_letter_exchange.is_empty() {
            format!("{}.dlx", self.request_queue)
        } else {
            self.dead_letter_exchange.clone()
        }
    }

    /// url with the password replaced by "***" for logs
    pub fn url_redacted(&self) -> String {
        redact_url(&self.url)
    }
}

/// Redacts the URL so that `{:?}` of a config never prints the password.
impl fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &self.url_redacted())
            .field("request_queue", &self.request_queue)
            .field("result_queue", &self.result_queue)
            .field("dead_letter_queue", &self.dead_letter_queue)
            .field("admin_queue", &self.admin_queue)
            .field("prefetch", &self.prefetch)
            .field("queue_type", &self.queue_type)
            .field("delivery_limit", &self.delivery_limit)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("operation_timeout_ms", &self.operation_timeout_ms)
            .field("reconnect_backoff_min_ms", &self.reconnect_backoff_min_ms)
            .field("reconnect_backoff_max_ms", &self.reconnect_backoff_max_ms)
            .field("shutdown_deadline_ms", &self.shutdown_deadline_ms)
            .field("dead_letter_exchange", &self.dead_letter_exchange)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("exchange", &self.exchange)
            .field("released_pools", &self.released_pools)
            .finish()
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

/// `[storage]`: WAL, snapshots, idempotency.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    pub data_dir: PathBuf,
    /// Drawn requests remembered for idempotency.
    #[serde(deserialize_with = "strict_int::int")]
    pub dedupe_window: usize,
    #[serde(deserialize_with = "strict_int::int")]
    pub batch_records_max: usize,
    #[serde(deserialize_with = "strict_int::int")]
    pub channel_capacity: usize,
    #[serde(deserialize_with = "strict_int::int")]
    pub snapshot_every_records: u64,
    #[serde(deserialize_with = "strict_int::int")]
    pub segment_bytes_max: u64,
    #[serde(deserialize_with = "strict_int::int")]
    pub id_block_size: u64,
    /// Draws per epoch: a new draw secret from the OS after this many (src/epoch.rs).
    #[serde(deserialize_with = "strict_int::int")]
    pub seed_epoch_records: u64,
    /// WAL bytes kept after snapshots make them unnecessary for recovery, for `audit`
    /// (0 = none, as before).
    #[serde(deserialize_with = "strict_int::int")]
    pub wal_retain_bytes: u64,
    /// Fixed RNG seed, for tests only. Absent: seeded from the OS.
    #[serde(
        deserialize_with = "strict_int::opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub rng_seed: Option<u64>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("data"),
            dedupe_window: 100_000,
            batch_records_max: 4096,
            channel_capacity: 8192,
            snapshot_every_records: 1_000_000,
            segment_bytes_max: 67_108_864,
            id_block_size: 65_536,
            seed_epoch_records: 1_000_000,
            wal_retain_bytes: 0,
            rng_seed: None,
        }
    }
}

/// `[admin]`: who may send admin commands.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Broker users whose commands are applied; empty = any user the broker lets publish.
    pub allowed_users: Vec<String>,
}

/// `[metrics]`: the HTTP endpoint.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// A socket address (`127.0.0.1:9464`); "" = off.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9464".to_owned(),
        }
    }
}

/// `[log]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
}

// ---------------------------------------------------------------------------------------------
// Errors

/// Where a value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The config file; the line (1-based) when the key is in it.
    File { path: PathBuf, line: Option<usize> },
    /// An environment override.
    Env { var: String },
    /// The built-in default.
    Default,
    /// Not known (e.g. [`RawConfig::validate`] on a value built in code).
    Unknown,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File {
                path,
                line: Some(line),
            } => write!(f, " in {} line {line}", path.display()),
            Origin::File { path, line: None } => write!(f, " in {}", path.display()),
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
    /// Id of the pool the key belongs to (shortened when very long).
    pub pool_id: Option<String>,
    /// Id of the item the key belongs to (shortened when very long).
    pub item_id: Option<String>,
    pub origin: Origin,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`", self.key)?;
        if self.key.contains('[') {
            f.write_str(" (indices 0-based")?;
            if let Some(pool_id) = &self.pool_id {
                write!(f, "; pool {pool_id:?}")?;
            }
            if let Some(item_id) = &self.item_id {
                write!(f, ", item {item_id:?}")?;
            }
            f.write_str(")")?;
        }
        write!(f, "{}", self.origin)
    }
}

/// Everything that can be wrong with a configuration. Messages never contain the AMQP password.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {} not found", path.display())]
    FileNotFound { path: PathBuf },

    #[error("cannot read config file {}: {source}", path.display())]
    FileRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// TOML syntax error; `message` is the parser's.
    #[error("syntax error in config file {}{}: {message}", path.display(), line_suffix(*line))]
    Syntax {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },

    #[error("unknown config key {at}; known keys here: {known}")]
    UnknownKey { at: Box<Location>, known: String },

    #[error("missing config key {at}")]
    MissingKey { at: Box<Location> },

    /// A value of the wrong type or format (e.g. a string where a number belongs).
    #[error("invalid value for {at}: {message}")]
    BadValue { at: Box<Location>, message: String },

    /// An environment variable that cannot be applied.
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

    #[error("{at}: {what} must be between {min} and {max}, got {value}")]
    OutOfRange {
        at: Box<Location>,
        what: String,
        value: String,
        min: String,
        max: String,
    },

    #[error("{at}: {reason}")]
    InvalidValue { at: Box<Location>, reason: String },
}

fn line_suffix(line: Option<usize>) -> String {
    line.map(|line| format!(" at line {line}"))
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Loading

impl Config {
    /// Built-in defaults of the contract (no file).
    pub fn builtin() -> Config {
        Config::load_with_env(None, &[]).expect("the built-in configuration is valid")
    }

    /// Load: defaults, then the file (if Some), then `REWARDPOOL__` environment overrides;
    /// then validate.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut env = Vec::new();
        for (name, value) in std::env::vars_os() {
            // Variables with non-Unicode names cannot be ours.
            let Ok(name) = name.into_string() else {
                continue;
            };
            if !name.to_lowercase().starts_with(&env_prefix_lowercase()) {
                continue;
            }
            match value.into_string() {
                Ok(value) => env.push((name, value)),
                Err(_) => {
                    return Err(ConfigError::Env {
                        var: name,
                        message: "value is not valid Unicode".to_owned(),
                    });
                }
            }
        }
        Self::load_with_env(file, &env)
    }

    /// Same with an explicit environment (tests use this, never the process environment).
    pub fn load_with_env(
        file: Option<&Path>,
        env: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let file = match file {
            Some(path) => Some(SourceFile::read(path)?),
            None => None,
        };
        let text = file.as_ref().map_or(BUILTIN_POOLS_TOML, |file| &file.text);
        let base = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .map_err(|error| ConfigError::Load {
                message: redact_secrets(&error.to_string()),
            })?;
        let overrides = env_overrides(env, &base)?;
        let mut builder = config::Config::builder().add_source(base);
        for var in &overrides {
            builder = builder
                .set_override(var.config_path.as_str(), var.value.clone())
                .map_err(|error| ConfigError::Env {
                    var: var.name.clone(),
                    message: redact_secrets(&error.to_string()),
                })?;
        }
        let tree = builder.build().map_err(|error| ConfigError::Load {
            message: redact_secrets(&error.to_string()),
        })?;
        let ctx = Ctx {
            file: file.as_ref(),
            env: overrides
                .iter()
                .map(|var| (var.key.clone(), var.name.clone()))
                .collect(),
            loaded: true,
            tree: Some(&tree),
        };
        let document: config::Value = tree
            .clone()
            .try_deserialize()
            .map_err(|error| ctx.deserialize_error(error))?;
        check_known_keys(&ctx, &document, &mut Vec::new())?;
        let raw: RawConfig = tree
            .clone()
            .try_deserialize()
            .map_err(|error| ctx.deserialize_error(error))?;
        let config = raw.validate_in(&ctx)?;
        tracing::debug!(
            file = ?file.as_ref().map(|file| &file.path),
            url = %config.amqp.url_redacted(),
            pools = config.pools.len(),
            "configuration loaded"
        );
        Ok(config)
    }

    /// The pool with this id.
    pub fn pool(&self, id: &str) -> Option<&PoolSeed> {
        self.pools.iter().find(|pool| pool.id == id)
    }
}

/// The file as read: its path and text (for lines).
struct SourceFile {
    path: PathBuf,
    text: String,
}

impl SourceFile {
    fn read(path: &Path) -> Result<SourceFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                ConfigError::FileNotFound {
                    path: path.to_path_buf(),
                }
            } else {
                ConfigError::FileRead {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        if let Err(error) = toml::de::DeTable::parse(&text) {
            return Err(ConfigError::Syntax {
                path: path.to_path_buf(),
                line: error.span().map(|span| line_at(&text, span.start)),
                message: redact_secrets(error.message()),
            });
        }
        Ok(SourceFile {
            path: path.to_path_buf(),
            text,
        })
    }

    /// The line of `key` in the file: of the key itself, or (`ancestor`) of the nearest
    /// enclosing key or table that is in the file.
    fn line_of(&self, key: &[Seg], ancestor: bool) -> Option<usize> {
        use toml::de::DeValue;
        let document = toml::de::DeTable::parse(&self.text).ok()?;
        let root = DeValue::Table(document.into_inner());
        let mut value = &root;
        let mut found = None;
        for segment in key {
            let next = match (segment, value) {
                (Seg::Key(name), DeValue::Table(table)) => table
                    .iter()
                    .find(|(k, _)| k.get_ref().as_ref() == name.as_str())
                    .map(|(k, v)| (k.span().start, v.get_ref())),
                (Seg::Index(index), DeValue::Array(items)) => {
                    items.get(*index).map(|v| (v.span().start, v.get_ref()))
                }
                _ => None,
            };
            match next {
                Some((start, next)) => {
                    found = Some(line_at(&self.text, start));
                    value = next;
                }
                None if ancestor => return found,
                None => return None,
            }
        }
        found
    }
}

/// The 1-based line of a byte offset.
fn line_at(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&byte| byte == b'\n')
        .count()
        + 1
}

// ---------------------------------------------------------------------------------------------
// Key paths and the key schema

/// One level of a key path.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Seg {
    Key(String),
    Index(usize),
}

/// `pools[1].items[2].weight`.
fn key_text(path: &[Seg]) -> String {
    let mut out = String::new();
    for segment in path {
        match segment {
            Seg::Key(name) if out.is_empty() => out.push_str(name),
            Seg::Key(name) => {
                out.push('.');
                out.push_str(name);
            }
            Seg::Index(index) => out.push_str(&format!("[{index}]")),
        }
    }
    out
}

/// The inverse of [`key_text`] (also reads the `config` crate's `pools[1]items[0]id`).
fn key_path(text: &str) -> Vec<Seg> {
    let mut path = Vec::new();
    let mut name = String::new();
    let mut chars = text.chars();
    while let Some(character) = chars.next() {
        if character != '.' && character != '[' {
            name.push(character);
            continue;
        }
        if !name.is_empty() {
            path.push(Seg::Key(std::mem::take(&mut name)));
        }
        if character == '[' {
            let digits: String = chars.by_ref().take_while(|c| *c != ']').collect();
            path.push(Seg::Index(digits.parse().unwrap_or(usize::MAX)));
        }
    }
    if !name.is_empty() {
        path.push(Seg::Key(name));
    }
    path
}

/// Whether the value at `path` is an array (its next level is an index).
fn is_array(path: &[Seg]) -> bool {
    matches!(path.last(), Some(Seg::Key(key)) if ["pools", "items", "allowed_users", "released_pools"].contains(&key.as_str()))
}

/// The keys of the table at `path`, if a table belongs there.
fn table_keys(path: &[Seg]) -> Option<&'static [&'static str]> {
    match path {
        [] => Some(fields_of::<RawConfig>()),
        [Seg::Key(section)] if section != "pools" => Some(section_keys(section)),
        [Seg::Key(pools), Seg::Index(_)] if pools == "pools" => Some(fields_of::<RawPool>()),
        [
            Seg::Key(pools),
            Seg::Index(_),
            Seg::Key(items),
            Seg::Index(_),
        ] if pools == "pools" && items == "items" => Some(fields_of::<RawItem>()),
        _ => None,
    }
}

fn section_keys(section: &str) -> &'static [&'static str] {
    match section {
        "amqp" => fields_of::<AmqpConfig>(),
        "storage" => fields_of::<StorageConfig>(),
        "admin" => fields_of::<AdminConfig>(),
        "metrics" => fields_of::<MetricsConfig>(),
        "log" => fields_of::<LogConfig>(),
        _ => &[],
    }
}

/// The field names of a serde struct, asked from serde itself (so no key list can drift).
fn fields_of<T: serde::de::DeserializeOwned>() -> &'static [&'static str] {
    use serde::de::{self, Visitor};

    struct Probe<'a>(&'a mut &'static [&'static str]);

    impl<'de> serde::Deserializer<'de> for Probe<'_> {
        type Error = de::value::Error;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("probe"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("probe"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }

    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

/// Every key of the loaded tree is one the structs know.
fn check_known_keys(
    ctx: &Ctx<'_>,
    value: &config::Value,
    path: &mut Vec<Seg>,
) -> Result<(), ConfigError> {
    match &value.kind {
        config::ValueKind::Table(table) => {
            let Some(known) = table_keys(path) else {
                return Ok(());
            };
            let mut keys: Vec<&String> = table.keys().collect();
            keys.sort();
            for key in keys {
                path.push(Seg::Key(key.clone()));
                if !known.contains(&key.as_str()) {
                    return Err(ConfigError::UnknownKey {
                        at: ctx.location_of(path),
                        known: known.join(", "),
                    });
                }
                check_known_keys(ctx, &table[key], path)?;
                path.pop();
            }
        }
        config::ValueKind::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                path.push(Seg::Index(index));
                check_known_keys(ctx, item, path)?;
                path.pop();
            }
        }
        _ => {}
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Environment

/// One `REWARDPOOL__...` variable, checked against the schema.
#[derive(Debug)]
struct EnvOverride {
    name: String,
    value: String,
    /// Canonical key (`pools[1].items[0].quantity`), also the `config` crate's path syntax.
    key: String,
    config_path: String,
}

fn env_prefix_lowercase() -> String {
    format!("{ENV_PREFIX}{ENV_SEPARATOR}").to_lowercase()
}

/// Our variables, in key order (indices numerically, so an appended entry's fields come
/// after the entries before it), each walked down the key schema to one scalar key.
fn env_overrides(
    env: &[(String, String)],
    base: &config::Config,
) -> Result<Vec<EnvOverride>, ConfigError> {
    let prefix = env_prefix_lowercase();
    let mut vars: Vec<(Vec<Seg>, &String, &String)> = Vec::new();
    for (name, value) in env {
        let lowercase = name.to_lowercase();
        let Some(rest) = lowercase.strip_prefix(&prefix) else {
            continue;
        };
        let path = rest
            .split(ENV_SEPARATOR)
            .map(|segment| match segment.parse::<usize>() {
                Ok(index) if segment.bytes().all(|byte| byte.is_ascii_digit()) => Seg::Index(index),
                _ => Seg::Key(segment.to_owned()),
            })
            .collect();
        vars.push((path, name, value));
    }
    vars.sort();
    // Lengths of the arrays so far (file, then earlier variables).
    let mut lengths: BTreeMap<String, usize> = BTreeMap::new();
    let mut out: Vec<EnvOverride> = Vec::new();
    for (path, name, value) in vars {
        let env_error = |message: String| ConfigError::Env {
            var: name.clone(),
            message,
        };
        for (depth, segment) in path.iter().enumerate() {
            let here = &path[..depth];
            match segment {
                Seg::Key(key) => {
                    let Some(known) = table_keys(here) else {
                        return Err(env_error(env_usage(&path)));
                    };
                    if !known.contains(&key.as_str()) {
                        return Err(ConfigError::UnknownKey {
                            at: Box::new(Location {
                                key: key_text(&path),
                                pool_id: None,
                                item_id: None,
                                origin: Origin::Env { var: name.clone() },
                            }),
                            known: known.join(", "),
                        });
                    }
                }
                Seg::Index(index) if is_array(here) => {
                    let array = key_text(here);
                    let length = *lengths
                        .entry(array.clone())
                        .or_insert_with(|| base.get_array(&array).map_or(0, |items| items.len()));
                    if *index > length {
                        return Err(env_error(format!(
                            "there is no {array}[{index}] ({array} has {length} entries, indices 0-based); \
                             the environment can change an entry or add one at the end ({array}[{length}])"
                        )));
                    }
                    if *index == length {
                        lengths.insert(array, length + 1);
                    }
                }
                Seg::Index(_) => return Err(env_error(env_usage(&path))),
            }
        }
        // One variable sets one scalar: not a table, not a whole array.
        if table_keys(&path).is_some() || is_array(&path) {
            return Err(env_error(env_usage(&path)));
        }
        let key = key_text(&path);
        if let Some(previous) = out.iter().find(|var| var.key == key) {
            return Err(env_error(format!(
                "sets key `{key}`, which {} already sets",
                previous.name
            )));
        }
        out.push(EnvOverride {
            name: name.clone(),
            value: value.clone(),
            config_path: key.clone(),
            key,
        });
    }
    Ok(out)
}

fn env_usage(path: &[Seg]) -> String {
    if matches!(path.first(), Some(Seg::Key(top)) if top == "pools") {
        format!(
            "pools can be overridden only key by key, as {ENV_PREFIX}__POOLS__<i>__ID, \
             {ENV_PREFIX}__POOLS__<i>__MODE or {ENV_PREFIX}__POOLS__<i>__ITEMS__<j>__{{ID,QUANTITY,WEIGHT}} \
             (indices 0-based)"
        )
    } else {
        format!(
            "names no single key; use one variable per key, e.g. {ENV_PREFIX}{ENV_SEPARATOR}AMQP{ENV_SEPARATOR}URL"
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Origins

/// Where the values of a load came from.
struct Ctx<'a> {
    file: Option<&'a SourceFile>,
    /// Canonical key → environment variable that set it.
    env: BTreeMap<String, String>,
    /// False for [`RawConfig::validate`]: origins are unknown.
    loaded: bool,
    /// The merged tree, for pool and item ids in errors found before validation.
    tree: Option<&'a config::Config>,
}

impl Ctx<'_> {
    fn none() -> Ctx<'static> {
        Ctx {
            file: None,
            env: BTreeMap::new(),
            loaded: false,
            tree: None,
        }
    }

    fn origin(&self, path: &[Seg]) -> Origin {
        if let Some(var) = self.env.get(&key_text(path)) {
            return Origin::Env { var: var.clone() };
        }
        if !self.loaded {
            return Origin::Unknown;
        }
        let Some(file) = self.file else {
            return Origin::Default;
        };
        let in_pools = matches!(path.first(), Some(Seg::Key(top)) if top == "pools");
        // A pool or an item as a whole: the line of its id, if it has one.
        let line = match path.last() {
            Some(Seg::Index(_)) if in_pools => {
                let mut id = path.to_vec();
                id.push(Seg::Key("id".to_owned()));
                file.line_of(&id, false)
            }
            _ => None,
        };
        match line.or_else(|| file.line_of(path, in_pools)) {
            Some(line) => Origin::File {
                path: file.path.clone(),
                line: Some(line),
            },
            None if in_pools => Origin::File {
                path: file.path.clone(),
                line: None,
            },
            None => Origin::Default,
        }
    }

    fn location(&self, key: &str, pool_id: Option<&str>, item_id: Option<&str>) -> Box<Location> {
        Box::new(Location {
            key: key.to_owned(),
            pool_id: pool_id.map(shorten),
            item_id: item_id.map(shorten),
            origin: self.origin(&key_path(key)),
        })
    }

    /// A location with the pool and item ids read from the loaded tree.
    fn location_of(&self, path: &[Seg]) -> Box<Location> {
        let id_at = |prefix: &[Seg]| -> Option<String> {
            let tree = self.tree?;
            tree.get_string(&format!("{}.id", key_text(prefix))).ok()
        };
        let (pool_id, item_id) = match path {
            [Seg::Key(_), Seg::Index(_), Seg::Key(_), Seg::Index(_), ..] => {
                (id_at(&path[..2]), id_at(&path[..4]))
            }
            [Seg::Key(_), Seg::Index(_), ..] => (id_at(&path[..2]), None),
            _ => (None, None),
        };
        self.location(&key_text(path), pool_id.as_deref(), item_id.as_deref())
    }

    /// A deserialization error of the `config` crate, with its key and origin.
    fn deserialize_error(&self, error: config::ConfigError) -> ConfigError {
        let (key, message) = match error {
            config::ConfigError::Type {
                unexpected,
                expected,
                key,
                ..
            } => (
                key,
                format!("invalid type: {unexpected}, expected {expected}"),
            ),
            config::ConfigError::At { error, key, .. } => (key, error.to_string()),
            config::ConfigError::NotFound(key) => {
                return ConfigError::MissingKey {
                    at: self.location_of(&key_path(&key)),
                };
            }
            other => (None, other.to_string()),
        };
        let message = redact_secrets(&message);
        match key {
            Some(key) => ConfigError::BadValue {
                at: self.location_of(&key_path(&key)),
                message,
            },
            None => ConfigError::Load { message },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Validation

impl RawConfig {
    /// Checks every rule of the contract and this module's bounds and returns the validated
    /// configuration; the first problem found is the error. Errors carry key paths and ids
    /// but no origin (a loaded configuration gets those from [`Config::load`]).
    pub fn validate(&self) -> Result<Config, ConfigError> {
        self.validate_in(&Ctx::none())
    }

    fn validate_in(&self, ctx: &Ctx<'_>) -> Result<Config, ConfigError> {
        validate_amqp(ctx, &self.amqp)?;
        validate_storage(ctx, &self.storage)?;
        validate_edges(ctx, self)?;
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
        RawConfig {
            amqp: config.amqp.clone(),
            storage: config.storage.clone(),
            admin: config.admin.clone(),
            metrics: config.metrics.clone(),
            log: config.log.clone(),
            pools: config
                .pools
                .iter()
                .map(|pool| RawPool {
                    id: pool.id.clone(),
                    mode: pool.mode,
                    items: pool
                        .items
                        .iter()
                        .map(|item| RawItem {
                            id: item.id.clone(),
                            quantity: item.stock.quantity().map(signed),
                            weight: item.weight.map(signed),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

fn invalid(at: Box<Location>, reason: String) -> ConfigError {
    ConfigError::InvalidValue { at, reason }
}

fn check_range(
    ctx: &Ctx<'_>,
    key: &str,
    value: u64,
    min: u64,
    max: u64,
) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        return Ok(());
    }
    Err(ConfigError::OutOfRange {
        at: ctx.location(key, None, None),
        what: key.rsplit('.').next().unwrap_or(key).to_owned(),
        value: value.to_string(),
        min: min.to_string(),
        max: max.to_string(),
    })
}

fn validate_amqp(ctx: &Ctx<'_>, amqp: &AmqpConfig) -> Result<(), ConfigError> {
    let at = |key: &str| ctx.location(key, None, None);
    if !(amqp.url.starts_with("amqp://") || amqp.url.starts_with("amqps://")) {
        let got = match amqp.url.find("://") {
            Some(end) => format!("scheme {:?}", shorten(&amqp.url[..end])),
            None => "no scheme".to_owned(),
        };
        return Err(invalid(
            at("amqp.url"),
            format!("url must start with amqp:// or amqps:// (got {got})"),
        ));
    }
    let queues = [
        ("amqp.request_queue", &amqp.request_queue),
        ("amqp.result_queue", &amqp.result_queue),
        ("amqp.dead_letter_queue", &amqp.dead_letter_queue),
        ("amqp.admin_queue", &amqp.admin_queue),
    ];
    for (key, name) in queues {
        if let Some(reason) = amqp_name_problem(name, "queue name") {
            return Err(invalid(at(key), reason));
        }
    }
    for (index, (key, name)) in queues.iter().enumerate() {
        if let Some((other_key, _)) = queues[..index].iter().find(|(_, other)| other == name) {
            return Err(invalid(
                at(key),
                format!(
                    "queue name {:?} is also used by {other_key}; the queues must differ",
                    shorten(name)
                ),
            ));
        }
    }
    if !amqp.dead_letter_exchange.is_empty() {
        if let Some(reason) = amqp_name_problem(&amqp.dead_letter_exchange, "exchange name") {
            return Err(invalid(at("amqp.dead_letter_exchange"), reason));
        }
    } else if amqp.dead_letter_exchange_name().len() > AMQP_NAME_BYTES_MAX {
        return Err(invalid(
            at("amqp.dead_letter_exchange"),
            format!(
                "the derived name \"<request_queue>.dlx\" is longer than {AMQP_NAME_BYTES_MAX} bytes; set amqp.dead_letter_exchange"
            ),
        ));
    }
    if !amqp.exchange.is_empty() {
        if let Some(reason) = amqp_name_problem(&amqp.exchange, "exchange name") {
            return Err(invalid(at("amqp.exchange"), reason));
        }
        // The worker also declares `<exchange>.unrouted`, `<exchange>.ae` and, per pool, the
        // lock queue `<exchange>.pool.<pool id>.lock` (pool ids up to ID_BYTES_MAX).
        if amqp.exchange.len() + ".pool.".len() + ID_BYTES_MAX + ".lock".len() > AMQP_NAME_BYTES_MAX
        {
            return Err(invalid(
                at("amqp.exchange"),
                format!(
                    "exchange name is too long for the pool locks \"<exchange>.pool.<pool id>.lock\" (at most {} bytes)",
                    AMQP_NAME_BYTES_MAX - ".pool.".len() - ID_BYTES_MAX - ".lock".len()
                ),
            ));
        }
    }
    for (index, pool) in amqp.released_pools.iter().enumerate() {
        let key = format!("amqp.released_pools[{index}]");
        if let Err(rule) = crate::seed::check_id(crate::seed::IdKind::Pool, pool) {
            return Err(invalid(at(&key), rule.to_string()));
        }
        if amqp.released_pools[..index].contains(pool) {
            return Err(invalid(
                at(&key),
                format!("pool {:?} is listed twice", shorten(pool)),
            ));
        }
    }
    if amqp.tls_cert_file.is_empty() != amqp.tls_key_file.is_empty() {
        let key = if amqp.tls_cert_file.is_empty() {
            "amqp.tls_key_file"
        } else {
            "amqp.tls_cert_file"
        };
        return Err(invalid(
            at(key),
            "tls_cert_file and tls_key_file go together: set both or neither".to_owned(),
        ));
    }
    check_range(
        ctx,
        "amqp.prefetch",
        u64::from(amqp.prefetch),
        u64::from(PREFETCH_MIN),
        u64::from(PREFETCH_MAX),
    )?;
    check_range(
        ctx,
        "amqp.delivery_limit",
        u64::from(amqp.delivery_limit),
        1,
        u64::from(u32::MAX),
    )?;
    let timeouts = [
        (
            "amqp.connect_timeout_ms",
            amqp.connect_timeout_ms,
            TIMEOUT_MS_MAX,
        ),
        (
            "amqp.operation_timeout_ms",
            amqp.operation_timeout_ms,
            TIMEOUT_MS_MAX,
        ),
        (
            "amqp.reconnect_backoff_min_ms",
            amqp.reconnect_backoff_min_ms,
            TIMEOUT_MS_MAX,
        ),
        (
            "amqp.reconnect_backoff_max_ms",
            amqp.reconnect_backoff_max_ms,
            TIMEOUT_MS_MAX,
        ),
        (
            "amqp.shutdown_deadline_ms",
            amqp.shutdown_deadline_ms,
            SHUTDOWN_DEADLINE_MS_MAX,
        ),
    ];
    for (key, value, max) in timeouts {
        check_range(ctx, key, value, 1, max)?;
    }
    if amqp.reconnect_backoff_min_ms > amqp.reconnect_backoff_max_ms {
        // Point at the key the operator set, not at a default.
        let mut location = at("amqp.reconnect_backoff_min_ms");
        if location.origin == Origin::Default {
            location = at("amqp.reconnect_backoff_max_ms");
        }
        return Err(invalid(
            location,
            format!(
                "reconnect_backoff_min_ms ({}) is greater than reconnect_backoff_max_ms ({})",
                amqp.reconnect_backoff_min_ms, amqp.reconnect_backoff_max_ms
            ),
        ));
    }
    Ok(())
}

fn validate_storage(ctx: &Ctx<'_>, storage: &StorageConfig) -> Result<(), ConfigError> {
    if storage.data_dir.as_os_str().is_empty() {
        return Err(invalid(
            ctx.location("storage.data_dir", None, None),
            "data_dir must not be empty".to_owned(),
        ));
    }
    let wide = |value: usize| u64::try_from(value).unwrap_or(u64::MAX);
    let checks = [
        (
            "storage.dedupe_window",
            wide(storage.dedupe_window),
            wide(DEDUPE_WINDOW_MAX),
        ),
        (
            "storage.batch_records_max",
            wide(storage.batch_records_max),
            wide(BATCH_RECORDS_MAX),
        ),
        (
            "storage.channel_capacity",
            wide(storage.channel_capacity),
            wide(CHANNEL_CAPACITY_MAX),
        ),
        (
            "storage.snapshot_every_records",
            storage.snapshot_every_records,
            SNAPSHOT_EVERY_RECORDS_MAX,
        ),
        (
            "storage.segment_bytes_max",
            storage.segment_bytes_max,
            SEGMENT_BYTES_MAX,
        ),
        (
            "storage.id_block_size",
            storage.id_block_size,
            ID_BLOCK_SIZE_MAX,
        ),
        (
            "storage.seed_epoch_records",
            storage.seed_epoch_records,
            SEED_EPOCH_RECORDS_MAX,
        ),
    ];
    for (key, value, max) in checks {
        check_range(ctx, key, value, 1, max)?;
    }
    Ok(())
}

/// `[admin]`, `[metrics]`, `[log]`.
fn validate_edges(ctx: &Ctx<'_>, raw: &RawConfig) -> Result<(), ConfigError> {
    for (index, user) in raw.admin.allowed_users.iter().enumerate() {
        let key = format!("admin.allowed_users[{index}]");
        if user.is_empty() {
            return Err(invalid(
                ctx.location(&key, None, None),
                "a user name must not be empty".to_owned(),
            ));
        }
        if user.len() > AMQP_NAME_BYTES_MAX {
            return Err(invalid(
                ctx.location(&key, None, None),
                format!(
                    "user name is {} bytes long, at most {AMQP_NAME_BYTES_MAX} allowed",
                    user.len()
                ),
            ));
        }
    }
    let listen = &raw.metrics.listen;
    if !listen.is_empty() && listen.parse::<std::net::SocketAddr>().is_err() {
        return Err(invalid(
            ctx.location("metrics.listen", None, None),
            format!(
                "listen must be a socket address such as \"127.0.0.1:9464\" (or \"\" for off), got {:?}",
                shorten(listen)
            ),
        ));
    }
    Ok(())
}

fn validate_pools(ctx: &Ctx<'_>, pools: &[RawPool]) -> Result<Vec<PoolSeed>, ConfigError> {
    if pools.is_empty() {
        return Err(ConfigError::NoPools {
            origin: ctx.origin(&[Seg::Key("pools".to_owned())]),
        });
    }
    if pools.len() > CONFIG_POOLS_MAX {
        return Err(ConfigError::OutOfRange {
            at: ctx.location("pools", None, None),
            what: "number of pools".to_owned(),
            value: pools.len().to_string(),
            min: "1".to_owned(),
            max: CONFIG_POOLS_MAX.to_string(),
        });
    }
    let mut seeds = Vec::with_capacity(pools.len());
    for (pool_index, pool) in pools.iter().enumerate() {
        let pool_id = Some(pool.id.as_str());
        let rule = |key: String, item_id: Option<&str>, rule: RuleError| ConfigError::Rule {
            at: ctx.location(&key, pool_id, item_id),
            rule,
            first: None,
        };
        crate::seed::check_id(crate::seed::IdKind::Pool, &pool.id)
            .map_err(|e| rule(format!("pools[{pool_index}].id"), None, e))?;
        if let Err((index, first, error)) =
            crate::seed::check_unique_pool_ids(pools[..=pool_index].iter().map(|p| p.id.as_str()))
        {
            return Err(ConfigError::Rule {
                at: ctx.location(&format!("pools[{index}].id"), pool_id, None),
                rule: error,
                first: Some(ctx.location(&format!("pools[{first}].id"), pool_id, None)),
            });
        }
        if pool.items.len() > POOL_ITEMS_MAX {
            let count = pool.items.len();
            let key = format!("pools[{pool_index}].items");
            return Err(rule(key, None, RuleError::TooManyItems { count }));
        }
        let mut items = Vec::with_capacity(pool.items.len());
        for (item_index, item) in pool.items.iter().enumerate() {
            let seed = crate::seed::item_seed(pool.mode, &item.id, item.quantity, item.weight)
                .map_err(|(field, e)| {
                    rule(
                        format!("pools[{pool_index}].items[{item_index}].{}", field.key()),
                        Some(&item.id),
                        e,
                    )
                })?;
            if let Some(first) = pool.items[..item_index]
                .iter()
                .position(|i| i.id == item.id)
            {
                return Err(ConfigError::Rule {
                    at: ctx.location(
                        &format!("pools[{pool_index}].items[{item_index}].id"),
                        pool_id,
                        Some(&item.id),
                    ),
                    rule: RuleError::DuplicateItemId {
                        id: shorten(&item.id),
                    },
                    first: Some(ctx.location(
                        &format!("pools[{pool_index}].items[{first}].id"),
                        pool_id,
                        Some(&item.id),
                    )),
                });
            }
            items.push(seed);
        }
        let seed = PoolSeed {
            id: pool.id.clone(),
            mode: pool.mode,
            items,
        };
        if let Err((item_index, error)) = crate::seed::check_pool(&seed) {
            let key = match (&error, item_index) {
                (RuleError::TooManyItems { .. }, _) => format!("pools[{pool_index}].items"),
                (_, Some(item)) => format!("pools[{pool_index}].items[{item}]"),
                (_, None) => format!("pools[{pool_index}]"),
            };
            return Err(rule(key, None, error));
        }
        seeds.push(seed);
    }
    Ok(seeds)
}

/// Why `name` is not a valid queue/exchange name, if it is not.
fn amqp_name_problem(name: &str, what: &str) -> Option<String> {
    if name.is_empty() {
        Some(format!("{what} must not be empty"))
    } else if name.len() > AMQP_NAME_BYTES_MAX {
        Some(format!(
            "{what} is {} bytes long, at most {AMQP_NAME_BYTES_MAX} allowed",
            name.len()
        ))
    } else if name.starts_with("amq.") {
        Some(format!(
            "{what} {:?} starts with \"amq.\", which the broker reserves",
            shorten(name)
        ))
    } else {
        None
    }
}

/// A copy of `text` for a message: no password, not too long.
fn shorten(text: &str) -> String {
    shorten_plain(&redact_secrets(text))
}

// ---------------------------------------------------------------------------------------------
// Secrets

/// `url` with the password of its userinfo replaced by `***`.
fn redact_url(url: &str) -> String {
    match url.find("://") {
        Some(scheme_end) => {
            let (scheme, rest) = url.split_at(scheme_end + 3);
            format!("{scheme}{}", redact_userinfo(rest))
        }
        None => redact_userinfo(url),
    }
}

/// Redacts `user:password@` at the start of the text that follows `scheme://`.
///
/// The userinfo ends at the last `@` of the text, not of the authority: a password with a raw
/// `/` or `@` then stays hidden, at the price of also hiding the host when a path holds an `@`.
/// Over-redacting beats leaking.
fn redact_userinfo(after_scheme: &str) -> String {
    let Some(at) = after_scheme.rfind('@') else {
        return after_scheme.to_owned();
    };
    let userinfo = &after_scheme[..at];
    match userinfo.find(':') {
        Some(colon) => format!("{}:***{}", &userinfo[..colon], &after_scheme[at..]),
        None => after_scheme.to_owned(),
    }
}

/// Redacts the password of every `scheme://user:password@...` in free text (error messages,
/// parser snippets). A URL runs until whitespace.
fn redact_secrets(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(scheme_end) = rest.find("://") {
        let (before, after) = rest.split_at(scheme_end + 3);
        out.push_str(before);
        let token_end = after.find(char::is_whitespace).unwrap_or(after.len());
        out.push_str(&redact_userinfo(&after[..token_end]));
        rest = &after[token_end..];
    }
    out.push_str(rest);
    out
}

// ---------------------------------------------------------------------------------------------
// Strict integers

/// Integer fields: accept integers and decimal strings (environment values); reject floats and
/// booleans, which `config` would otherwise round or turn into 0/1.
mod strict_int {
    use std::fmt;

    use serde::Deserializer;
    use serde::de::{self, Visitor};

    pub(super) trait Bounded: TryFrom<i128> {
        const MIN: i128;
        const MAX: i128;
    }

    macro_rules! bounded {
        ($($int:ty),*) => {$(
            impl Bounded for $int {
                const MIN: i128 = <$int>::MIN as i128;
                const MAX: i128 = <$int>::MAX as i128;
            }
        )*};
    }
    bounded!(u16, u32, u64, usize, i64);

    struct IntVisitor;

    impl Visitor<'_> for IntVisitor {
        type Value = i128;

        fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
            formatter.write_str("an integer")
        }

        fn visit_i64<E: de::Error>(self, value: i64) -> Result<i128, E> {
            Ok(i128::from(value))
        }

        fn visit_u64<E: de::Error>(self, value: u64) -> Result<i128, E> {
            Ok(i128::from(value))
        }

        fn visit_i128<E: de::Error>(self, value: i128) -> Result<i128, E> {
            Ok(value)
        }

        fn visit_u128<E: de::Error>(self, value: u128) -> Result<i128, E> {
            i128::try_from(value).map_err(|_| E::custom(format!("integer {value} is too large")))
        }

        fn visit_str<E: de::Error>(self, value: &str) -> Result<i128, E> {
            value
                .parse()
                .map_err(|_| E::invalid_value(de::Unexpected::Str(value), &self))
        }
    }

    pub(super) fn int<'de, D: Deserializer<'de>, T: Bounded>(
        deserializer: D,
    ) -> Result<T, D::Error> {
        let value = deserializer.deserialize_any(IntVisitor)?;
        T::try_from(value).map_err(|_| {
            de::Error::custom(format!(
                "integer {value} is out of range (must be between {} and {})",
                T::MIN,
                T::MAX
            ))
        })
    }

    pub(super) fn opt<'de, D: Deserializer<'de>, T: Bounded>(
        deserializer: D,
    ) -> Result<Option<T>, D::Error> {
        int(deserializer).map(Some)
    }
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
        assert_eq!(config.amqp, AmqpConfig::default());
        assert_eq!(config.storage, StorageConfig::default());
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
            AmqpConfig::default(),
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
        assert_eq!(config.amqp.url, AmqpConfig::default().url);
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
        let mut amqp = AmqpConfig::default();
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
        let mut amqp = AmqpConfig::default();
        assert_eq!(amqp.dead_letter_exchange_name(), "rewardpool.requests.dlx");
        amqp.dead_letter_exchange = "my.dlx".to_owned();
        assert_eq!(amqp.dead_letter_exchange_name(), "my.dlx");
    }

    #[test]
    fn key_paths_parse() {
        let path = key_path("pools[1].items[2].weight");
        assert_eq!(
            path,
            vec![
                Seg::Key("pools".into()),
                Seg::Index(1),
                Seg::Key("items".into()),
                Seg::Index(2),
                Seg::Key("weight".into())
            ]
        );
        assert_eq!(key_text(&path), "pools[1].items[2].weight");
        assert_eq!(key_text(&key_path("pools[1]id")), "pools[1].id");
        assert_eq!(
            key_text(&key_path("pools[0]items[0]quantity")),
            "pools[0].items[0].quantity"
        );
        assert_eq!(key_text(&key_path("amqp.url")), "amqp.url");
        assert!(fields_of::<AmqpConfig>().contains(&"admin_queue"));
        assert_eq!(fields_of::<RawItem>(), ["id", "quantity", "weight"]);
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
