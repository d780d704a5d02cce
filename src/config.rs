//! Worker configuration: loading, defaults, environment overrides and validation.
//!
//! The configuration is a TOML file read with the `config` crate. Every key can be
//! overridden from the environment with the prefix `REWARDPOOL__` and `__` between levels
//! (`REWARDPOOL__AMQP__URL`, `REWARDPOOL__STORAGE__DATA_DIR`,
//! `REWARDPOOL__POOLS__1__ITEMS__0__QUANTITY`). Without a file the worker runs on
//! [`Config::builtin`].
//!
//! Why the module looks the way it does:
//!
//! * Operators read the errors, so every error says what is wrong and where: the key path
//!   (`pools[1].items[2].weight`, indices 0-based), the ids of the pool and item, and the origin
//!   of the value (file and line, environment variable, or built-in default). Line numbers are
//!   found by a small, conservative scan of the file text; when the scan is not sure it reports
//!   no line rather than a wrong one.
//! * Unknown keys are errors (`deny_unknown_fields` for the file; an explicit key list for the
//!   environment, so the error can name the variable).
//! * Environment values are passed to `config` as strings (`try_parsing` off): string keys keep
//!   their exact text (a queue named `007` stays `007`), and numbers are parsed by this module's
//!   strict integer deserializer, which also rejects floats and booleans that `config` would
//!   otherwise round or turn into 0/1.
//! * Pools are arrays of tables, which the `config` crate cannot address from the environment;
//!   this module applies `REWARDPOOL__POOLS__<i>__...` overrides itself, to existing entries only.
//! * Secrets: the AMQP password never appears in an error (`Display` or `Debug`) nor in the
//!   `Debug` of [`AmqpConfig`]; use [`AmqpConfig::url_redacted`] for logs.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Prefix of environment overrides (followed by [`ENV_SEPARATOR`]).
pub const ENV_PREFIX: &str = "REWARDPOOL";
/// Separator between the prefix and each level of an environment override.
pub const ENV_SEPARATOR: &str = "__";

/// Longest pool or item id, in bytes.
pub const MAX_ID_BYTES: usize = 128;
/// Largest item quantity (2^40).
pub const MAX_QUANTITY: u64 = 1 << 40;
/// Largest item weight (2^32).
pub const MAX_WEIGHT: u64 = 1 << 32;
/// Most items in one pool (2^24).
pub const MAX_ITEMS_PER_POOL: usize = 1 << 24;
/// Most pools in one configuration.
pub const MAX_POOLS: usize = 1024;
/// Longest queue or exchange name, in bytes (AMQP short string).
pub const MAX_AMQP_NAME_BYTES: usize = 255;
/// Largest `storage.dedupe_window`.
pub const MAX_DEDUPE_WINDOW: usize = 10_000_000;
/// Largest connect/operation timeout and reconnect backoff (1 hour).
pub const MAX_TIMEOUT_MS: u64 = 3_600_000;
/// Largest `amqp.shutdown_deadline_ms` (1 hour).
pub const MAX_SHUTDOWN_DEADLINE_MS: u64 = 3_600_000;
/// Largest `storage.batch_records_max`.
pub const MAX_BATCH_RECORDS: usize = 1 << 20;
/// Largest `storage.channel_capacity`.
pub const MAX_CHANNEL_CAPACITY: usize = 1 << 20;
/// Largest `storage.snapshot_every_records`.
pub const MAX_SNAPSHOT_EVERY_RECORDS: u64 = 1 << 40;
/// Largest `storage.segment_bytes_max` (4 GiB).
pub const MAX_SEGMENT_BYTES: u64 = 1 << 32;
/// Largest `storage.id_block_size`.
pub const MAX_ID_BLOCK_SIZE: u64 = 1 << 32;

const TOP_KEYS: &[&str] = &["amqp", "storage", "pools", "metrics", "log"];
const METRICS_KEYS: &[&str] = &["listen"];
const LOG_KEYS: &[&str] = &["format"];
const AMQP_KEYS: &[&str] = &[
    "url",
    "request_queue",
    "result_queue",
    "dead_letter_queue",
    "prefetch",
    "queue_type",
    "delivery_limit",
    "connect_timeout_ms",
    "operation_timeout_ms",
    "reconnect_backoff_min_ms",
    "reconnect_backoff_max_ms",
    "shutdown_deadline_ms",
    "dead_letter_exchange",
    "tls_ca_file",
    "tls_cert_file",
    "tls_key_file",
];
const STORAGE_KEYS: &[&str] = &[
    "data_dir",
    "dedupe_window",
    "batch_records_max",
    "channel_capacity",
    "snapshot_every_records",
    "segment_bytes_max",
    "id_block_size",
    "rng_seed",
];
const POOL_KEYS: &[&str] = &["id", "mode", "items"];
const ITEM_KEYS: &[&str] = &["id", "quantity", "weight"];

/// The whole worker configuration.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub amqp: AmqpConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    /// From the file only when a file is given; the built-in pool otherwise.
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub log: LogConfig,
}

/// `[metrics]`: the HTTP listener for /metrics, /healthz and /readyz.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// `host:port`; "" = off.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9464".to_owned(),
        }
    }
}

/// `[log]`: how log lines are written to stderr.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
}

/// `log.format`: `text` (no colour unless stderr is a terminal) or `json` (one object a line).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
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
    /// Unacked deliveries in flight (`basic_qos`), 1..=65535.
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
    /// amqps://: PEM file of CA certificates to trust for the broker ("" = unset).
    pub tls_ca_file: String,
    /// amqps://: PEM client certificate (chain) and its PKCS#8 PEM key, both or neither.
    pub tls_cert_file: String,
    pub tls_key_file: String,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned(),
            request_queue: "rewardpool.requests".to_owned(),
            result_queue: "rewardpool.results".to_owned(),
            dead_letter_queue: "rewardpool.dead".to_owned(),
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
            .finish()
    }
}

/// `amqp.queue_type`: the type of all three queues.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    Quorum,
    Classic,
}

impl QueueType {
    /// The value of the `x-queue-type` argument: `quorum` or `classic`.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

/// `[storage]`: WAL, snapshots, idempotency.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    pub data_dir: PathBuf,
    /// Drawn requests remembered for idempotency, 1..=10,000,000.
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
            rng_seed: None,
        }
    }
}

/// One `[[pools]]` entry.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub id: String,
    pub mode: Mode,
    /// Missing `items` deserializes as empty and fails validation as "no items".
    #[serde(default)]
    pub items: Vec<ItemConfig>,
}

pub use crate::pool::Mode;

/// One item of a pool. Signed so that negative values reach validation.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ItemConfig {
    pub id: String,
    /// Absent: unlimited (only in `by_weight` pools).
    #[serde(
        default,
        deserialize_with = "strict_int::opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub quantity: Option<i64>,
    /// Required in `by_weight` pools, forbidden in `by_quantity` pools.
    #[serde(
        default,
        deserialize_with = "strict_int::opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub weight: Option<i64>,
}

impl ItemConfig {
    /// The quantity; `None` means unlimited. Valid only after [`Config::validate`]
    /// (a negative quantity also gives `None`).
    pub fn quantity_u64(&self) -> Option<u64> {
        self.quantity
            .and_then(|quantity| u64::try_from(quantity).ok())
    }

    /// The weight; `None` in `by_quantity` pools. Valid only after [`Config::validate`].
    pub fn weight_u64(&self) -> Option<u64> {
        self.weight.and_then(|weight| u64::try_from(weight).ok())
    }
}

/// Where a value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The config file; the line (1-based) when it could be found.
    File { path: PathBuf, line: Option<usize> },
    /// An environment override.
    Env { var: String },
    /// The built-in default.
    Default,
    /// Not known (e.g. [`Config::validate`] on a config built in code).
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

    /// TOML syntax error; `message` is the parser's, with line, column and snippet.
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

    #[error("{at}: pool has no items")]
    EmptyPool { at: Box<Location> },

    #[error("{at}: duplicate pool id {id:?}, already used by {first}")]
    DuplicatePoolId {
        at: Box<Location>,
        id: String,
        first: Box<Location>,
    },

    #[error("{at}: duplicate item id {id:?} in this pool, already used by {first}")]
    DuplicateItemId {
        at: Box<Location>,
        id: String,
        first: Box<Location>,
    },

    #[error("{at}: quantity must not be negative, got {value} (use 0 for a sold-out item)")]
    NegativeQuantity { at: Box<Location>, value: i64 },

    #[error("{at}: weight must be greater than 0, got {value}")]
    NonPositiveWeight { at: Box<Location>, value: i64 },

    #[error("{at}: missing weight: every item of a by_weight pool needs a weight")]
    MissingWeight { at: Box<Location> },

    #[error("{at}: weight is not allowed in a by_quantity pool (draws follow the quantities)")]
    UnexpectedWeight { at: Box<Location> },

    #[error("{at}: missing quantity: unlimited items are only allowed in by_weight pools")]
    UnlimitedItem { at: Box<Location> },

    #[error("{at}: {what} must be between {min} and {max}, got {value}")]
    OutOfRange {
        at: Box<Location>,
        what: &'static str,
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

impl Config {
    /// Built-in defaults of the contract (no file).
    pub fn builtin() -> Config {
        Config {
            amqp: AmqpConfig::default(),
            storage: StorageConfig::default(),
            pools: builtin_pools(),
            metrics: MetricsConfig::default(),
            log: LogConfig::default(),
        }
    }

    /// Load: defaults, then the file (if Some), then REWARDPOOL__ environment overrides; then validate.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut env = Vec::new();
        for (name, value) in std::env::vars_os() {
            // Variables with non-Unicode names cannot be ours.
            let Ok(name) = name.into_string() else {
                continue;
            };
            if !is_ours(&name) {
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

    /// Same but with an explicit environment (for tests: do not mutate the process env in tests; use this).
    pub fn load_with_env(
        file: Option<&Path>,
        env: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let overrides = classify_env(env)?;
        let file_ctx = match file {
            Some(path) => Some(FileCtx::read(path)?),
            None => None,
        };
        let ctx = Ctx {
            file: file_ctx.as_ref(),
            env: overrides
                .iter()
                .map(|var| (var.key.clone(), var.name.clone()))
                .collect(),
            loaded: true,
        };

        let section_env: HashMap<String, String> = overrides
            .iter()
            .filter(|var| matches!(var.target, EnvTarget::Section))
            .map(|var| (var.name.clone(), var.value.clone()))
            .collect();
        let environment = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator(ENV_SEPARATOR)
            .separator(ENV_SEPARATOR)
            // Off on purpose: values stay strings, so string keys keep their exact text
            // ("007" stays "007"); numbers are parsed by `strict_int`.
            .try_parsing(false)
            .source(Some(section_env));
        let mut builder = config::Config::builder();
        if let Some(file_ctx) = &file_ctx {
            builder = builder.add_source(file_ctx.tree.clone());
        }
        let tree = builder
            .add_source(environment)
            .build()
            .map_err(|error| ctx.load_error(error))?;
        let mut config: Config = tree
            .try_deserialize()
            .map_err(|error| ctx.deserialize_error(error))?;
        if file.is_none() {
            config.pools = builtin_pools();
        }
        for var in &overrides {
            config.apply_pool_override(var)?;
        }
        config.validate_in(&ctx)?;
        tracing::debug!(
            file = ?file,
            url = %config.amqp.url_redacted(),
            pools = config.pools.len(),
            "configuration loaded"
        );
        Ok(config)
    }

    /// Checks every rule of the contract and this module's bounds; the first problem found is
    /// returned. Without the load context, errors carry key paths and ids but no origin.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_in(&Ctx::none())
    }

    /// The pool with this id.
    pub fn pool(&self, id: &str) -> Option<&PoolConfig> {
        self.pools.iter().find(|pool| pool.id == id)
    }

    fn validate_in(&self, ctx: &Ctx<'_>) -> Result<(), ConfigError> {
        self.validate_amqp(ctx)?;
        self.validate_storage(ctx)?;
        self.validate_pools(ctx)
    }

    fn validate_amqp(&self, ctx: &Ctx<'_>) -> Result<(), ConfigError> {
        let amqp = &self.amqp;
        let at = |key: &str| ctx.location(key, None, None);
        if !(amqp.url.starts_with("amqp://") || amqp.url.starts_with("amqps://")) {
            let got = match amqp.url.find("://") {
                Some(end) => format!("scheme {:?}", shorten(&amqp.url[..end])),
                None => "no scheme".to_owned(),
            };
            return Err(ConfigError::InvalidValue {
                at: at("amqp.url"),
                reason: format!("url must start with amqp:// or amqps:// (got {got})"),
            });
        }
        let queues = [
            ("amqp.request_queue", &amqp.request_queue),
            ("amqp.result_queue", &amqp.result_queue),
            ("amqp.dead_letter_queue", &amqp.dead_letter_queue),
        ];
        for (key, name) in queues {
            if let Some(reason) = amqp_name_problem(name, "queue name") {
                return Err(ConfigError::InvalidValue {
                    at: at(key),
                    reason,
                });
            }
        }
        for (index, (key, name)) in queues.iter().enumerate() {
            if let Some((other_key, _)) = queues[..index].iter().find(|(_, other)| other == name) {
                return Err(ConfigError::InvalidValue {
                    at: at(key),
                    reason: format!(
                        "queue name {:?} is also used by {other_key}; the three queues must differ",
                        shorten(name)
                    ),
                });
            }
        }
        if !amqp.dead_letter_exchange.is_empty() {
            if let Some(reason) = amqp_name_problem(&amqp.dead_letter_exchange, "exchange name") {
                return Err(ConfigError::InvalidValue {
                    at: at("amqp.dead_letter_exchange"),
                    reason,
                });
            }
        } else if amqp.dead_letter_exchange_name().len() > MAX_AMQP_NAME_BYTES {
            return Err(ConfigError::InvalidValue {
                at: at("amqp.dead_letter_exchange"),
                reason: format!(
                    "the derived name \"<request_queue>.dlx\" is longer than {MAX_AMQP_NAME_BYTES} bytes; set amqp.dead_letter_exchange"
                ),
            });
        }
        check_range(
            ctx,
            "amqp.prefetch",
            "prefetch",
            u64::from(amqp.prefetch),
            1,
            u64::from(u16::MAX),
        )?;
        check_range(
            ctx,
            "amqp.delivery_limit",
            "delivery_limit",
            u64::from(amqp.delivery_limit),
            1,
            u64::from(u32::MAX),
        )?;
        let timeouts = [
            (
                "amqp.connect_timeout_ms",
                "connect_timeout_ms",
                amqp.connect_timeout_ms,
                MAX_TIMEOUT_MS,
            ),
            (
                "amqp.operation_timeout_ms",
                "operation_timeout_ms",
                amqp.operation_timeout_ms,
                MAX_TIMEOUT_MS,
            ),
            (
                "amqp.reconnect_backoff_min_ms",
                "reconnect_backoff_min_ms",
                amqp.reconnect_backoff_min_ms,
                MAX_TIMEOUT_MS,
            ),
            (
                "amqp.reconnect_backoff_max_ms",
                "reconnect_backoff_max_ms",
                amqp.reconnect_backoff_max_ms,
                MAX_TIMEOUT_MS,
            ),
            (
                "amqp.shutdown_deadline_ms",
                "shutdown_deadline_ms",
                amqp.shutdown_deadline_ms,
                MAX_SHUTDOWN_DEADLINE_MS,
            ),
        ];
        for (key, what, value, max) in timeouts {
            check_range(ctx, key, what, value, 1, max)?;
        }
        if amqp.reconnect_backoff_min_ms > amqp.reconnect_backoff_max_ms {
            // Point at the key the operator set, not at a default.
            let mut location = at("amqp.reconnect_backoff_min_ms");
            if location.origin == Origin::Default {
                location = at("amqp.reconnect_backoff_max_ms");
            }
            return Err(ConfigError::InvalidValue {
                at: location,
                reason: format!(
                    "reconnect_backoff_min_ms ({}) is greater than reconnect_backoff_max_ms ({})",
                    amqp.reconnect_backoff_min_ms, amqp.reconnect_backoff_max_ms
                ),
            });
        }
        Ok(())
    }

    fn validate_storage(&self, ctx: &Ctx<'_>) -> Result<(), ConfigError> {
        let storage = &self.storage;
        if storage.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::InvalidValue {
                at: ctx.location("storage.data_dir", None, None),
                reason: "data_dir must not be empty".to_owned(),
            });
        }
        let checks = [
            (
                "storage.dedupe_window",
                "dedupe_window",
                usize_to_u64(storage.dedupe_window),
                usize_to_u64(MAX_DEDUPE_WINDOW),
            ),
            (
                "storage.batch_records_max",
                "batch_records_max",
                usize_to_u64(storage.batch_records_max),
                usize_to_u64(MAX_BATCH_RECORDS),
            ),
            (
                "storage.channel_capacity",
                "channel_capacity",
                usize_to_u64(storage.channel_capacity),
                usize_to_u64(MAX_CHANNEL_CAPACITY),
            ),
            (
                "storage.snapshot_every_records",
                "snapshot_every_records",
                storage.snapshot_every_records,
                MAX_SNAPSHOT_EVERY_RECORDS,
            ),
            (
                "storage.segment_bytes_max",
                "segment_bytes_max",
                storage.segment_bytes_max,
                MAX_SEGMENT_BYTES,
            ),
            (
                "storage.id_block_size",
                "id_block_size",
                storage.id_block_size,
                MAX_ID_BLOCK_SIZE,
            ),
        ];
        for (key, what, value, max) in checks {
            check_range(ctx, key, what, value, 1, max)?;
        }
        Ok(())
    }

    fn validate_pools(&self, ctx: &Ctx<'_>) -> Result<(), ConfigError> {
        if self.pools.is_empty() {
            return Err(ConfigError::NoPools {
                origin: ctx.origin(&KeyRef::Top("pools")),
            });
        }
        if self.pools.len() > MAX_POOLS {
            return Err(ConfigError::OutOfRange {
                at: ctx.location("pools", None, None),
                what: "number of pools",
                value: self.pools.len().to_string(),
                min: "1".to_owned(),
                max: MAX_POOLS.to_string(),
            });
        }
        let mut pool_index_by_id: HashMap<&str, usize> = HashMap::new();
        for (pool_index, pool) in self.pools.iter().enumerate() {
            let pool_id = Some(pool.id.as_str());
            let pool_at =
                |field: &str| ctx.location(&format!("pools[{pool_index}].{field}"), pool_id, None);
            if let Some(reason) = id_problem(&pool.id, "pool id") {
                return Err(ConfigError::InvalidValue {
                    at: pool_at("id"),
                    reason,
                });
            }
            if let Some(&first_index) = pool_index_by_id.get(pool.id.as_str()) {
                return Err(ConfigError::DuplicatePoolId {
                    at: pool_at("id"),
                    id: shorten(&pool.id),
                    first: ctx.location(&format!("pools[{first_index}].id"), pool_id, None),
                });
            }
            pool_index_by_id.insert(&pool.id, pool_index);
            if pool.items.is_empty() {
                return Err(ConfigError::EmptyPool {
                    at: ctx.location(&format!("pools[{pool_index}]"), pool_id, None),
                });
            }
            check_item_count(ctx, pool_index, pool_id, pool.items.len())?;
            validate_items(ctx, pool_index, pool)?;
        }
        Ok(())
    }

    /// Applies one `REWARDPOOL__POOLS__...` override to the pools already loaded.
    fn apply_pool_override(&mut self, var: &EnvVar) -> Result<(), ConfigError> {
        let env_error = |message: String| ConfigError::Env {
            var: var.name.clone(),
            message: redact_secrets(&message),
        };
        let (pool_index, item_index, field) = match &var.target {
            EnvTarget::Section => return Ok(()),
            EnvTarget::Pool { pool, field } => (*pool, None, field.as_str()),
            EnvTarget::Item { pool, item, field } => (*pool, Some(*item), field.as_str()),
        };
        let pool_count = self.pools.len();
        let Some(pool) = self.pools.get_mut(pool_index) else {
            return Err(env_error(format!(
                "there is no pools[{pool_index}] (the configuration has {pool_count} pools, indices 0-based); the environment can change existing pools, not add new ones"
            )));
        };
        let Some(item_index) = item_index else {
            match field {
                "id" => pool.id = var.value.clone(),
                "mode" => {
                    pool.mode = match var.value.as_str() {
                        "by_quantity" => Mode::ByQuantity,
                        "by_weight" => Mode::ByWeight,
                        other => {
                            return Err(env_error(format!(
                                "mode must be \"by_quantity\" or \"by_weight\", got {:?}",
                                shorten(other)
                            )));
                        }
                    }
                }
                _ => return Err(env_error(format!("cannot set pools[{pool_index}].{field}"))),
            }
            return Ok(());
        };
        let item_count = pool.items.len();
        let Some(item) = pool.items.get_mut(item_index) else {
            return Err(env_error(format!(
                "there is no pools[{pool_index}].items[{item_index}] (that pool has {item_count} items, indices 0-based); the environment can change existing items, not add new ones"
            )));
        };
        let parse_int = |value: &str| {
            value.parse::<i64>().map_err(|_| {
                env_error(format!(
                    "{field} must be an integer, got {:?}",
                    shorten(value)
                ))
            })
        };
        match field {
            "id" => item.id = var.value.clone(),
            "quantity" => item.quantity = Some(parse_int(&var.value)?),
            "weight" => item.weight = Some(parse_int(&var.value)?),
            _ => {
                return Err(env_error(format!(
                    "cannot set pools[{pool_index}].items[{item_index}].{field}"
                )));
            }
        }
        Ok(())
    }
}

fn builtin_pools() -> Vec<PoolConfig> {
    let item = |id: &str, quantity: i64| ItemConfig {
        id: id.to_owned(),
        quantity: Some(quantity),
        weight: None,
    };
    vec![PoolConfig {
        id: "default".to_owned(),
        mode: Mode::ByQuantity,
        items: vec![item("gold", 10), item("silver", 100), item("bronze", 1000)],
    }]
}

fn usize_to_u64(value: usize) -> u64 {
    u64::try_from(value).unwrap_or(u64::MAX)
}

fn check_range(
    ctx: &Ctx<'_>,
    key: &str,
    what: &'static str,
    value: u64,
    min: u64,
    max: u64,
) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        return Ok(());
    }
    Err(ConfigError::OutOfRange {
        at: ctx.location(key, None, None),
        what,
        value: value.to_string(),
        min: min.to_string(),
        max: max.to_string(),
    })
}

fn check_item_count(
    ctx: &Ctx<'_>,
    pool_index: usize,
    pool_id: Option<&str>,
    item_count: usize,
) -> Result<(), ConfigError> {
    if item_count <= MAX_ITEMS_PER_POOL {
        return Ok(());
    }
    Err(ConfigError::OutOfRange {
        at: ctx.location(&format!("pools[{pool_index}].items"), pool_id, None),
        what: "number of items",
        value: item_count.to_string(),
        min: "1".to_owned(),
        max: MAX_ITEMS_PER_POOL.to_string(),
    })
}

fn validate_items(ctx: &Ctx<'_>, pool_index: usize, pool: &PoolConfig) -> Result<(), ConfigError> {
    let pool_id = Some(pool.id.as_str());
    let mut item_index_by_id: HashMap<&str, usize> = HashMap::new();
    let mut total_quantity: u64 = 0;
    for (item_index, item) in pool.items.iter().enumerate() {
        let item_id = Some(item.id.as_str());
        let at = |field: &str| {
            ctx.location(
                &format!("pools[{pool_index}].items[{item_index}].{field}"),
                pool_id,
                item_id,
            )
        };
        if let Some(reason) = id_problem(&item.id, "item id") {
            return Err(ConfigError::InvalidValue {
                at: at("id"),
                reason,
            });
        }
        if let Some(&first_index) = item_index_by_id.get(item.id.as_str()) {
            return Err(ConfigError::DuplicateItemId {
                at: at("id"),
                id: shorten(&item.id),
                first: ctx.location(
                    &format!("pools[{pool_index}].items[{first_index}].id"),
                    pool_id,
                    item_id,
                ),
            });
        }
        item_index_by_id.insert(&item.id, item_index);
        match item.quantity {
            Some(quantity) if quantity < 0 => {
                return Err(ConfigError::NegativeQuantity {
                    at: at("quantity"),
                    value: quantity,
                });
            }
            Some(quantity) => {
                let quantity = u64::try_from(quantity).unwrap_or(u64::MAX);
                if quantity > MAX_QUANTITY {
                    return Err(ConfigError::OutOfRange {
                        at: at("quantity"),
                        what: "quantity",
                        value: quantity.to_string(),
                        min: "0".to_owned(),
                        max: format!("{MAX_QUANTITY} (2^40)"),
                    });
                }
                total_quantity = total_quantity.checked_add(quantity).ok_or_else(|| {
                    ConfigError::InvalidValue {
                        at: ctx.location(&format!("pools[{pool_index}].items"), pool_id, None),
                        reason: "the sum of the quantities does not fit in 64 bits".to_owned(),
                    }
                })?;
            }
            None if matches!(pool.mode, Mode::ByQuantity) => {
                return Err(ConfigError::UnlimitedItem { at: at("quantity") });
            }
            None => {}
        }
        match (pool.mode, item.weight) {
            (Mode::ByQuantity, Some(_)) => {
                return Err(ConfigError::UnexpectedWeight { at: at("weight") });
            }
            (Mode::ByWeight, None) => {
                return Err(ConfigError::MissingWeight { at: at("weight") });
            }
            (Mode::ByWeight, Some(weight)) if weight <= 0 => {
                return Err(ConfigError::NonPositiveWeight {
                    at: at("weight"),
                    value: weight,
                });
            }
            (Mode::ByWeight, Some(weight)) if weight.unsigned_abs() > MAX_WEIGHT => {
                return Err(ConfigError::OutOfRange {
                    at: at("weight"),
                    what: "weight",
                    value: weight.to_string(),
                    min: "1".to_owned(),
                    max: format!("{MAX_WEIGHT} (2^32)"),
                });
            }
            (Mode::ByWeight, Some(_)) | (Mode::ByQuantity, None) => {}
        }
    }
    Ok(())
}

/// Why `id` is not a valid pool/item id, if it is not.
fn id_problem(id: &str, what: &str) -> Option<String> {
    if id.is_empty() {
        Some(format!("{what} must not be empty"))
    } else if id.len() > MAX_ID_BYTES {
        Some(format!(
            "{what} is {} bytes long, at most {MAX_ID_BYTES} allowed",
            id.len()
        ))
    } else {
        None
    }
}

/// Why `name` is not a valid queue/exchange name, if it is not.
fn amqp_name_problem(name: &str, what: &str) -> Option<String> {
    if name.is_empty() {
        Some(format!("{what} must not be empty"))
    } else if name.len() > MAX_AMQP_NAME_BYTES {
        Some(format!(
            "{what} is {} bytes long, at most {MAX_AMQP_NAME_BYTES} allowed",
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

/// A copy of `text` short enough for a message (user ids can be long).
fn shorten(text: &str) -> String {
    const MAX_CHARS: usize = 48;
    let redacted = redact_secrets(text);
    if redacted.chars().count() <= MAX_CHARS {
        return redacted;
    }
    let mut short: String = redacted.chars().take(MAX_CHARS).collect();
    short.push('…');
    short
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
// Environment

/// What an environment override sets.
#[derive(Debug)]
enum EnvTarget {
    /// `amqp.*` or `storage.*`: handed to the `config` crate.
    Section,
    Pool {
        pool: usize,
        field: String,
    },
    Item {
        pool: usize,
        item: usize,
        field: String,
    },
}

#[derive(Debug)]
struct EnvVar {
    name: String,
    value: String,
    /// Canonical key path, e.g. `amqp.url` or `pools[1].items[0].quantity`.
    key: String,
    target: EnvTarget,
}

fn env_prefix_lowercase() -> String {
    format!("{ENV_PREFIX}{ENV_SEPARATOR}").to_lowercase()
}

/// Whether an environment variable is one of ours (the `config` crate compares lowercased).
fn is_ours(name: &str) -> bool {
    name.to_lowercase().starts_with(&env_prefix_lowercase())
}

/// Picks our variables out of `env` and checks that each names a known key.
fn classify_env(env: &[(String, String)]) -> Result<Vec<EnvVar>, ConfigError> {
    let prefix = env_prefix_lowercase();
    let mut vars: Vec<EnvVar> = Vec::new();
    let mut sorted: Vec<&(String, String)> = env.iter().collect();
    sorted.sort();
    for (name, value) in sorted {
        let lowercase = name.to_lowercase();
        let Some(rest) = lowercase.strip_prefix(&prefix) else {
            continue;
        };
        let segments: Vec<&str> = rest.split(ENV_SEPARATOR).collect();
        let unknown = |key: String, known: &[&str]| ConfigError::UnknownKey {
            at: Box::new(Location {
                key,
                pool_id: None,
                item_id: None,
                origin: Origin::Env { var: name.clone() },
            }),
            known: known.join(", "),
        };
        let index = |segment: &str| -> Option<usize> {
            if segment.bytes().all(|byte| byte.is_ascii_digit()) {
                segment.parse().ok()
            } else {
                None
            }
        };
        let (key, target) = match segments.as_slice() {
            ["amqp", field] if AMQP_KEYS.contains(field) => {
                (format!("amqp.{field}"), EnvTarget::Section)
            }
            ["amqp", field] => return Err(unknown(format!("amqp.{field}"), AMQP_KEYS)),
            ["storage", field] if STORAGE_KEYS.contains(field) => {
                (format!("storage.{field}"), EnvTarget::Section)
            }
            ["storage", field] => return Err(unknown(format!("storage.{field}"), STORAGE_KEYS)),
            ["metrics", field] if METRICS_KEYS.contains(field) => {
                (format!("metrics.{field}"), EnvTarget::Section)
            }
            ["metrics", field] => return Err(unknown(format!("metrics.{field}"), METRICS_KEYS)),
            ["log", field] if LOG_KEYS.contains(field) => {
                (format!("log.{field}"), EnvTarget::Section)
            }
            ["log", field] => return Err(unknown(format!("log.{field}"), LOG_KEYS)),
            ["pools", pool, field] if index(pool).is_some() && ["id", "mode"].contains(field) => {
                let pool = index(pool).unwrap_or_default();
                (
                    format!("pools[{pool}].{field}"),
                    EnvTarget::Pool {
                        pool,
                        field: (*field).to_owned(),
                    },
                )
            }
            ["pools", pool, "items", item, field]
                if index(pool).is_some() && index(item).is_some() && ITEM_KEYS.contains(field) =>
            {
                let pool = index(pool).unwrap_or_default();
                let item = index(item).unwrap_or_default();
                (
                    format!("pools[{pool}].items[{item}].{field}"),
                    EnvTarget::Item {
                        pool,
                        item,
                        field: (*field).to_owned(),
                    },
                )
            }
            ["pools", ..] => {
                return Err(ConfigError::Env {
                    var: name.clone(),
                    message: "pools can be overridden only key by key, as REWARDPOOL__POOLS__<i>__ID, \
                              REWARDPOOL__POOLS__<i>__MODE or REWARDPOOL__POOLS__<i>__ITEMS__<j>__{ID,QUANTITY,WEIGHT} \
                              (indices 0-based, existing entries only)"
                        .to_owned(),
                });
            }
            [top, ..] if !TOP_KEYS.contains(top) => {
                return Err(unknown(segments.join("."), TOP_KEYS));
            }
            _ => {
                return Err(ConfigError::Env {
                    var: name.clone(),
                    message: format!(
                        "names no single key; use one variable per key, e.g. {ENV_PREFIX}{ENV_SEPARATOR}AMQP{ENV_SEPARATOR}URL"
                    ),
                });
            }
        };
        if let Some(previous) = vars.iter().find(|var| var.key == key) {
            return Err(ConfigError::Env {
                var: name.clone(),
                message: format!("sets key `{key}`, which {} already sets", previous.name),
            });
        }
        vars.push(EnvVar {
            name: name.clone(),
            value: value.clone(),
            key,
            target,
        });
    }
    Ok(vars)
}

// ---------------------------------------------------------------------------------------------
// Error context: where values came from

/// The file as read, for origins and line numbers.
struct FileCtx {
    path: PathBuf,
    locator: Locator,
    /// The file alone, parsed by the `config` crate.
    tree: config::Config,
    /// Pool and item ids as written in the file (to check the line scanner's findings).
    skeleton: Vec<PoolSkeleton>,
}

struct PoolSkeleton {
    id: Option<String>,
    items: Vec<Option<String>>,
}

impl FileCtx {
    fn read(path: &Path) -> Result<FileCtx, ConfigError> {
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
        let tree = config::Config::builder()
            .add_source(config::File::from_str(&text, config::FileFormat::Toml))
            .build()
            .map_err(|error| {
                let message = redact_secrets(&error.to_string());
                ConfigError::Syntax {
                    path: path.to_path_buf(),
                    line: parse_error_line(&message),
                    message,
                }
            })?;
        let skeleton = pool_skeleton(&tree);
        Ok(FileCtx {
            path: path.to_path_buf(),
            locator: Locator::new(&text),
            tree,
            skeleton,
        })
    }

    fn has_key(&self, key: &str) -> bool {
        self.tree.get::<config::Value>(key).is_ok()
    }
}

/// The line of a TOML parse error ("... at line 3, column 5 ...").
fn parse_error_line(message: &str) -> Option<usize> {
    let start = message.find("line ")? + "line ".len();
    let digits: String = message[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fn pool_skeleton(tree: &config::Config) -> Vec<PoolSkeleton> {
    let id_of = |value: &config::Value| -> Option<String> {
        value
            .clone()
            .into_table()
            .ok()?
            .get("id")
            .and_then(|id| id.clone().into_string().ok())
    };
    let Ok(pools) = tree.get_array("pools") else {
        return Vec::new();
    };
    pools
        .iter()
        .map(|pool| {
            let items = pool
                .clone()
                .into_table()
                .ok()
                .and_then(|table| table.get("items").cloned())
                .and_then(|items| items.into_array().ok())
                .unwrap_or_default();
            PoolSkeleton {
                id: id_of(pool),
                items: items.iter().map(id_of).collect(),
            }
        })
        .collect()
}

/// A parsed key path.
#[derive(Debug, PartialEq, Eq)]
enum KeyRef<'a> {
    /// A top-level key (`pools`, or an unknown one).
    Top(&'a str),
    /// `amqp.x` / `storage.x`.
    Section {
        table: &'a str,
        field: &'a str,
    },
    Pool {
        pool: usize,
        field: Option<&'a str>,
    },
    Item {
        pool: usize,
        item: usize,
        field: Option<&'a str>,
    },
}

impl<'a> KeyRef<'a> {
    fn parse(key: &'a str) -> KeyRef<'a> {
        fn index(text: &str) -> Option<(usize, &str)> {
            let text = text.strip_prefix('[')?;
            let end = text.find(']')?;
            Some((text[..end].parse().ok()?, &text[end + 1..]))
        }
        fn field(text: &str) -> Option<Option<&str>> {
            if text.is_empty() {
                Some(None)
            } else {
                text.strip_prefix('.').map(Some)
            }
        }
        if let Some((pool, rest)) = key.strip_prefix("pools").and_then(index) {
            if let Some((item, rest)) = rest.strip_prefix(".items").and_then(index) {
                if let Some(field) = field(rest) {
                    return KeyRef::Item { pool, item, field };
                }
            } else if let Some(field) = field(rest) {
                return KeyRef::Pool { pool, field };
            }
        }
        match key.split_once('.') {
            Some((table, field)) if ["amqp", "storage", "metrics", "log"].contains(&table) => {
                KeyRef::Section { table, field }
            }
            _ => KeyRef::Top(key.split(['.', '[']).next().unwrap_or(key)),
        }
    }
}

/// Where the values of a load came from.
struct Ctx<'a> {
    file: Option<&'a FileCtx>,
    /// Canonical key → environment variable that set it.
    env: BTreeMap<String, String>,
    /// False for [`Ctx::none`]: origins are unknown.
    loaded: bool,
}

impl Ctx<'_> {
    /// No knowledge of origins: [`Config::validate`] on a value built in code.
    fn none() -> Ctx<'static> {
        Ctx {
            file: None,
            env: BTreeMap::new(),
            loaded: false,
        }
    }

    fn location(&self, key: &str, pool_id: Option<&str>, item_id: Option<&str>) -> Box<Location> {
        Box::new(Location {
            key: key.to_owned(),
            pool_id: pool_id.map(shorten),
            item_id: item_id.map(shorten),
            origin: self.origin(&KeyRef::parse(key)),
        })
    }

    fn origin(&self, key: &KeyRef<'_>) -> Origin {
        if let Some(var) = self.env.get(&canonical(key)) {
            return Origin::Env { var: var.clone() };
        }
        let Some(file) = self.file else {
            return if self.loaded {
                Origin::Default
            } else {
                Origin::Unknown
            };
        };
        let pools = &file.skeleton;
        let line = match *key {
            KeyRef::Section { table, field } => {
                if !file.has_key(&format!("{table}.{field}")) {
                    return Origin::Default;
                }
                file.locator.section_key_line(table, field)
            }
            KeyRef::Top(name) => file.locator.top_key_line(name),
            KeyRef::Pool { pool, field } => {
                let expected = pools.get(pool).and_then(|pool| pool.id.as_deref());
                file.locator.pool_line(pool, pools.len(), expected, field)
            }
            KeyRef::Item { pool, item, field } => {
                let skeleton = pools.get(pool);
                let item_count = skeleton.map_or(0, |pool| pool.items.len());
                let expected = skeleton
                    .and_then(|pool| pool.items.get(item))
                    .and_then(|id| id.as_deref());
                file.locator
                    .item_line(pool, pools.len(), item, item_count, expected, field)
            }
        };
        Origin::File {
            path: file.path.clone(),
            line,
        }
    }

    /// Ids of the pool/item a key belongs to, as written in the file.
    fn file_ids(&self, key: &KeyRef<'_>) -> (Option<String>, Option<String>) {
        let Some(file) = self.file else {
            return (None, None);
        };
        let (pool, item) = match *key {
            KeyRef::Pool { pool, .. } => (pool, None),
            KeyRef::Item { pool, item, .. } => (pool, Some(item)),
            _ => return (None, None),
        };
        let Some(skeleton) = file.skeleton.get(pool) else {
            return (None, None);
        };
        let item_id = item
            .and_then(|item| skeleton.items.get(item))
            .and_then(|id| id.as_deref())
            .map(shorten);
        (skeleton.id.as_deref().map(shorten), item_id)
    }

    fn location_from_file_ids(&self, key: &str) -> Box<Location> {
        let key_ref = KeyRef::parse(key);
        let (pool_id, item_id) = self.file_ids(&key_ref);
        Box::new(Location {
            key: key.to_owned(),
            pool_id,
            item_id,
            origin: self.origin(&key_ref),
        })
    }

    fn load_error(&self, error: config::ConfigError) -> ConfigError {
        let message = redact_secrets(&error.to_string());
        match (error, self.file) {
            (config::ConfigError::FileParse { .. }, Some(file)) => ConfigError::Syntax {
                path: file.path.clone(),
                line: parse_error_line(&message),
                message,
            },
            _ => ConfigError::Load { message },
        }
    }

    /// Turns a deserialization error of the `config` crate into ours, with key and origin.
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
                let key = normalize_key(&key);
                return ConfigError::MissingKey {
                    at: self.location_from_file_ids(&key),
                };
            }
            config::ConfigError::Message(message) => (None, message),
            other => (None, other.to_string()),
        };
        let key = key.map(|key| normalize_key(&key));
        let message = redact_secrets(&friendlier_enum_message(&message));
        if let Some(field) = unknown_field(&message) {
            let full_key = match &key {
                Some(parent) => format!("{parent}.{field}"),
                None => field.to_owned(),
            };
            let known = match key.as_deref().map(KeyRef::parse) {
                None => TOP_KEYS,
                Some(KeyRef::Top("amqp")) => AMQP_KEYS,
                Some(KeyRef::Top("storage")) => STORAGE_KEYS,
                Some(KeyRef::Top("metrics")) => METRICS_KEYS,
                Some(KeyRef::Top("log")) => LOG_KEYS,
                Some(KeyRef::Pool { field: None, .. }) => POOL_KEYS,
                Some(KeyRef::Item { field: None, .. }) => ITEM_KEYS,
                Some(_) => &[],
            };
            return ConfigError::UnknownKey {
                at: self.location_from_file_ids(&full_key),
                known: known.join(", "),
            };
        }
        match key {
            Some(key) => ConfigError::BadValue {
                at: self.location_from_file_ids(&key),
                message,
            },
            None => ConfigError::Load { message },
        }
    }
}

/// The canonical text of a key path (the form used in messages and in [`Ctx::env`]).
fn canonical(key: &KeyRef<'_>) -> String {
    match *key {
        KeyRef::Top(name) => name.to_owned(),
        KeyRef::Section { table, field } => format!("{table}.{field}"),
        KeyRef::Pool { pool, field: None } => format!("pools[{pool}]"),
        KeyRef::Pool {
            pool,
            field: Some(field),
        } => format!("pools[{pool}].{field}"),
        KeyRef::Item {
            pool,
            item,
            field: None,
        } => format!("pools[{pool}].items[{item}]"),
        KeyRef::Item {
            pool,
            item,
            field: Some(field),
        } => format!("pools[{pool}].items[{item}].{field}"),
    }
}

/// The `config` crate joins `[1]` and a following field without a dot (`pools[1]id`).
fn normalize_key(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len() + 4);
    let mut previous = None;
    for character in raw.chars() {
        if previous == Some(']') && character != '.' && character != '[' {
            out.push('.');
        }
        out.push(character);
        previous = Some(character);
    }
    out
}

/// Rewrites the `config` crate's "enum Mode does not have variant constructor x" to list the
/// accepted values.
fn friendlier_enum_message(message: &str) -> String {
    let Some((enum_name, value)) = message
        .strip_prefix("enum ")
        .and_then(|rest| rest.split_once(" does not have variant constructor "))
    else {
        return message.to_owned();
    };
    let accepted = match enum_name {
        "QueueType" => "\"quorum\" or \"classic\"",
        "Mode" => "\"by_quantity\" or \"by_weight\"",
        _ => return message.to_owned(),
    };
    format!("must be {accepted}, got {:?}", shorten(value))
}

/// The field name of serde's "unknown field `x`, expected ..." message.
fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.find('`').map(|end| &rest[..end])
}

// ---------------------------------------------------------------------------------------------
// Line numbers: a conservative scan of the TOML text

/// One `key = value` found in a line.
#[derive(Debug)]
struct Assign {
    key: String,
    /// Nesting depth (`[`/`{`) at the `=`.
    depth: u32,
    /// The value when it is a one-line string.
    value: Option<String>,
}

#[derive(Debug, Default)]
struct LineInfo {
    /// `(name, is_array)` for `[name]` / `[[name]]` header lines.
    header: Option<(String, bool)>,
    assigns: Vec<Assign>,
    /// Depths reached by each inline table `{` opened on the line.
    table_opens: Vec<u32>,
}

/// Finds lines of keys in the file text. Understands `[table]`, `[[pools]]`,
/// `[[pools.items]]`, dotted keys and inline tables/arrays; returns `None` when unsure.
struct Locator {
    lines: Vec<LineInfo>,
}

impl Locator {
    fn new(text: &str) -> Locator {
        let mut depth = 0u32;
        let lines = text
            .lines()
            .map(|line| scan_line(line, &mut depth))
            .collect();
        Locator { lines }
    }

    fn headers(&self) -> impl Iterator<Item = (usize, &str, bool)> {
        self.lines.iter().enumerate().filter_map(|(index, line)| {
            line.header
                .as_ref()
                .map(|(name, array)| (index, name.as_str(), *array))
        })
    }

    /// The line of `table.field`.
    fn section_key_line(&self, table: &str, field: &str) -> Option<usize> {
        let dotted = format!("{table}.{field}");
        let mut current: Option<&str> = None;
        let mut in_inline_table = false;
        for (index, line) in self.lines.iter().enumerate() {
            if let Some((name, _)) = &line.header {
                current = Some(name);
                continue;
            }
            for assign in &line.assigns {
                match current {
                    Some(name) if name == table && assign.depth == 0 && assign.key == field => {
                        return Some(index + 1);
                    }
                    None if assign.depth == 0 => {
                        if assign.key == dotted {
                            return Some(index + 1);
                        }
                        in_inline_table = assign.key == table;
                    }
                    None if in_inline_table && assign.depth == 1 && assign.key == field => {
                        return Some(index + 1);
                    }
                    _ => {}
                }
            }
        }
        None
    }

    /// The line of a top-level key or table.
    fn top_key_line(&self, name: &str) -> Option<usize> {
        let dotted = format!("{name}.");
        let mut at_top = true;
        for (index, line) in self.lines.iter().enumerate() {
            if let Some((header, _)) = &line.header {
                if header == name || header.starts_with(&dotted) {
                    return Some(index + 1);
                }
                at_top = false;
                continue;
            }
            if at_top
                && line.assigns.iter().any(|assign| {
                    assign.depth == 0 && (assign.key == name || assign.key.starts_with(&dotted))
                })
            {
                return Some(index + 1);
            }
        }
        None
    }

    /// `(header line, end)` of each `[[pools]]` entry, sub-tables included.
    fn pool_sections(&self) -> Vec<(usize, usize)> {
        let mut sections: Vec<(usize, usize)> = Vec::new();
        let mut open: Option<usize> = None;
        for (index, name, array) in self.headers() {
            let is_pool = name == "pools" && array;
            let is_pool_child = name.starts_with("pools.");
            if let Some(start) = open
                && (is_pool || !is_pool_child)
            {
                sections.push((start, index));
                open = None;
            }
            if is_pool {
                open = Some(index);
            }
        }
        if let Some(start) = open {
            sections.push((start, self.lines.len()));
        }
        sections
    }

    /// End of the table that starts after header line `start` (the next header, or `end`).
    fn table_end(&self, start: usize, end: usize) -> usize {
        (start + 1..end)
            .find(|&index| self.lines[index].header.is_some())
            .unwrap_or(end)
    }

    /// The first line in `range` that assigns `key` at depth 0.
    fn key_line_in(&self, range: std::ops::Range<usize>, key: &str) -> Option<usize> {
        range.into_iter().find(|&index| {
            self.lines[index]
                .assigns
                .iter()
                .any(|assign| assign.depth == 0 && assign.key == key)
        })
    }

    /// The line of `pools[pool]` (or of its `field`), for `[[pools]]` files only.
    fn pool_line(
        &self,
        pool: usize,
        pool_count: usize,
        expected_id: Option<&str>,
        field: Option<&str>,
    ) -> Option<usize> {
        let sections = self.pool_sections();
        if sections.len() != pool_count {
            return None;
        }
        let (start, end) = *sections.get(pool)?;
        let own_end = self.table_end(start, end);
        if let Some(field) = field.filter(|&field| field != "id")
            && let Some(index) = self.key_line_in(start + 1..own_end, field)
        {
            return Some(index + 1);
        }
        match self.key_line_in(start + 1..own_end, "id") {
            Some(index) if self.id_matches(index, 0, expected_id) => Some(index + 1),
            _ => Some(start + 1),
        }
    }

    /// The line of `pools[pool].items[item]` (or of its `field`).
    fn item_line(
        &self,
        pool: usize,
        pool_count: usize,
        item: usize,
        item_count: usize,
        expected_id: Option<&str>,
        field: Option<&str>,
    ) -> Option<usize> {
        let sections = self.pool_sections();
        if sections.len() != pool_count {
            return None;
        }
        let (start, end) = *sections.get(pool)?;
        let item_headers: Vec<usize> = self
            .headers()
            .filter(|&(index, name, array)| {
                index > start && index < end && name == "pools.items" && array
            })
            .map(|(index, _, _)| index)
            .collect();
        if !item_headers.is_empty() {
            // `[[pools.items]]` tables.
            if item_headers.len() != item_count {
                return None;
            }
            let header = *item_headers.get(item)?;
            let own_end = self.table_end(header, end);
            if let Some(field) = field.filter(|&field| field != "id")
                && let Some(index) = self.key_line_in(header + 1..own_end, field)
            {
                return Some(index + 1);
            }
            return match self.key_line_in(header + 1..own_end, "id") {
                Some(index) if self.id_matches(index, 0, expected_id) => Some(index + 1),
                Some(_) => None,
                None => Some(header + 1),
            };
        }
        // `items = [ { id = ... }, ... ]`: the inline tables at depth 2 of the pool's table.
        let own_end = self.table_end(start, end);
        let opens: Vec<usize> = (start + 1..own_end)
            .flat_map(|index| {
                self.lines[index]
                    .table_opens
                    .iter()
                    .filter(|&&depth| depth == 2)
                    .map(move |_| index)
            })
            .collect();
        if opens.len() != item_count {
            return None;
        }
        let index = *opens.get(item)?;
        let ids_on_line = self.lines[index]
            .assigns
            .iter()
            .filter(|assign| assign.depth == 2 && assign.key == "id")
            .count();
        if ids_on_line > 1 {
            // Several items on one line: check the right one is there.
            let found = self.lines[index].assigns.iter().any(|assign| {
                assign.depth == 2
                    && assign.key == "id"
                    && expected_id.is_none_or(|id| assign.value.as_deref() == Some(id))
            });
            return found.then_some(index + 1);
        }
        self.id_matches(index, 2, expected_id).then_some(index + 1)
    }

    /// Whether the `id` assigned at `depth` on line `index` (if any) is `expected`.
    fn id_matches(&self, index: usize, depth: u32, expected: Option<&str>) -> bool {
        let Some(expected) = expected else {
            return true;
        };
        self.lines[index]
            .assigns
            .iter()
            .filter(|assign| assign.depth == depth && assign.key == "id")
            .all(|assign| {
                assign
                    .value
                    .as_deref()
                    .is_none_or(|value| value == expected)
            })
    }
}

/// Scans one line: header, `key =` assignments and inline-table openings, outside strings
/// and comments. `depth` carries bracket nesting across lines.
fn scan_line(line: &str, depth: &mut u32) -> LineInfo {
    let trimmed = line.trim_start();
    if *depth == 0 && trimmed.starts_with('[') {
        return LineInfo {
            header: parse_header(trimmed),
            ..LineInfo::default()
        };
    }
    let bytes = line.as_bytes();
    let mut info = LineInfo::default();
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'#' => break,
            b'"' | b'\'' => {
                index = skip_string(bytes, index);
                continue;
            }
            b'[' => *depth += 1,
            b'{' => {
                *depth += 1;
                info.table_opens.push(*depth);
            }
            b']' | b'}' => *depth = depth.saturating_sub(1),
            b'=' => {
                if let Some(key) = key_before(&line[..index]) {
                    info.assigns.push(Assign {
                        key,
                        depth: *depth,
                        value: string_at(&line[index + 1..]),
                    });
                }
            }
            _ => {}
        }
        index += 1;
    }
    info
}

/// `[name]` → `(name, false)`, `[[name]]` → `(name, true)`; whitespace and quotes dropped.
fn parse_header(trimmed: &str) -> Option<(String, bool)> {
    let code = trimmed.split('#').next().unwrap_or(trimmed).trim_end();
    let (inner, array) = if let Some(inner) = code.strip_prefix("[[") {
        (inner.strip_suffix("]]")?, true)
    } else {
        (code.strip_prefix('[')?.strip_suffix(']')?, false)
    };
    let name: String = inner
        .chars()
        .filter(|character| !character.is_whitespace() && *character != '"' && *character != '\'')
        .collect();
    Some((name, array))
}

/// Index just past the string starting at `start` (or the end of the line).
fn skip_string(bytes: &[u8], start: usize) -> usize {
    let quote = bytes[start];
    let mut index = start + 1;
    while index < bytes.len() {
        if bytes[index] == b'\\' && quote == b'"' {
            index += 2;
            continue;
        }
        if bytes[index] == quote {
            return index + 1;
        }
        index += 1;
    }
    bytes.len()
}

/// The bare or quoted key just before an `=`.
fn key_before(before: &str) -> Option<String> {
    let before = before.trim_end();
    if let Some(inner) = before.strip_suffix('"') {
        let open = inner.rfind('"')?;
        return Some(inner[open + 1..].to_owned());
    }
    let start = before
        .rfind(|character: char| {
            !(character.is_ascii_alphanumeric() || matches!(character, '_' | '-' | '.'))
        })
        .map_or(0, |index| index + 1);
    let key = &before[start..];
    (!key.is_empty()).then(|| key.to_owned())
}

/// The one-line string value at the start of `after` (the text after `=`).
fn string_at(after: &str) -> Option<String> {
    let after = after.trim_start();
    if let Some(rest) = after.strip_prefix('\'') {
        return rest.find('\'').map(|end| rest[..end].to_owned());
    }
    let rest = after.strip_prefix('"')?;
    let mut value = String::new();
    let mut characters = rest.chars();
    while let Some(character) = characters.next() {
        match character {
            '"' => return Some(value),
            '\\' => match characters.next()? {
                'n' => value.push('\n'),
                't' => value.push('\t'),
                other => value.push(other),
            },
            other => value.push(other),
        }
    }
    None
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
        config.validate().expect("builtin is valid");
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
            .map(|item| (item.id.as_str(), item.quantity_u64(), item.weight_u64()))
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
        config.validate().expect("example validates");
        assert_eq!(config.amqp, AmqpConfig::default());
        assert_eq!(config.storage, StorageConfig::default());
        assert_eq!(config.pools.len(), 2);
        let spin = config.pool("spin").expect("spin pool");
        assert_eq!(spin.mode, Mode::ByWeight);
        let items: Vec<(&str, Option<u64>, Option<u64>)> = spin
            .items
            .iter()
            .map(|item| (item.id.as_str(), item.quantity_u64(), item.weight_u64()))
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
        assert_eq!(default.items[1].quantity, Some(90));
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
        assert_eq!(config.pools[1].items[2].quantity, None);
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
            ConfigError::NonPositiveWeight { value: 0, .. }
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
        assert_eq!(config.pools, builtin_pools());
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
        assert_eq!(config.pools[1].items[0].quantity, Some(5));
        assert_eq!(config.pools[1].items[2].id, "nothing");
    }

    #[test]
    fn env_pool_override_errors() {
        let (_, result) = load_text_env(EXAMPLE, &[("REWARDPOOL__POOLS__2__ID", "x")]);
        let message = result.expect_err("no pools[2]").to_string();
        assert_contains(
            &message,
            &[
                "REWARDPOOL__POOLS__2__ID",
                "no pools[2]",
                "2 pools",
                "0-based",
            ],
        );

        let (_, result) =
            load_text_env(EXAMPLE, &[("REWARDPOOL__POOLS__0__ITEMS__0__WEIGHT", "x")]);
        let message = result.expect_err("not a number").to_string();
        assert_contains(
            &message,
            &[
                "REWARDPOOL__POOLS__0__ITEMS__0__WEIGHT",
                "must be an integer",
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
            matches!(error, ConfigError::DuplicatePoolId { .. }),
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
            matches!(error, ConfigError::DuplicateItemId { .. }),
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
        assert!(matches!(error, ConfigError::EmptyPool { .. }), "{error:?}");
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
            matches!(error, ConfigError::EmptyPool { .. }),
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
            ConfigError::NonPositiveWeight { value: 0, .. }
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
            ConfigError::NonPositiveWeight { value: -3, .. }
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
        assert!(matches!(error, ConfigError::MissingWeight { .. }));
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
        assert!(matches!(error, ConfigError::UnexpectedWeight { .. }));
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
        assert!(matches!(error, ConfigError::UnlimitedItem { .. }));
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
            ConfigError::NegativeQuantity { value: -1, .. }
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
            ConfigError::NegativeQuantity { value: -7, .. }
        ));
    }

    #[test]
    fn quantity_zero_is_accepted() {
        let (_, result) = load_text(&quantity_pool_with("{ id = \"x\", quantity = 0 }"));
        let config = result.expect("quantity 0 is sold out, not an error");
        assert_eq!(config.pools[0].items[1].quantity_u64(), Some(0));
        let (_, result) = load_text(&spin_with("{ id = \"x\", quantity = 0, weight = 3 }"));
        result.expect("quantity 0 in a by_weight pool");
    }

    #[test]
    fn id_bounds() {
        let (_, error, message) = error_of(&quantity_pool_with("{ id = \"\", quantity = 1 }"));
        assert!(matches!(error, ConfigError::InvalidValue { .. }));
        assert_contains(&message, &["`pools[0].items[1].id`", "must not be empty"]);

        let long = "x".repeat(MAX_ID_BYTES + 1);
        let (_, _, message) = error_of(&quantity_pool_with(&format!(
            "{{ id = \"{long}\", quantity = 1 }}"
        )));
        assert_contains(
            &message,
            &["`pools[0].items[1].id`", "129 bytes", "at most 128"],
        );
        let fits = "y".repeat(MAX_ID_BYTES);
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
        let too_many = MAX_QUANTITY + 1;
        let (_, error, message) = error_of(&quantity_pool_with(&format!(
            "{{ id = \"x\", quantity = {too_many} }}"
        )));
        assert!(matches!(error, ConfigError::OutOfRange { .. }));
        assert_contains(
            &message,
            &[
                "`pools[0].items[1].quantity`",
                "2^40",
                &too_many.to_string(),
            ],
        );
        let (_, result) = load_text(&quantity_pool_with(&format!(
            "{{ id = \"x\", quantity = {MAX_QUANTITY} }}"
        )));
        result.expect("2^40 is allowed");

        let heavy = MAX_WEIGHT + 1;
        let (_, error, message) =
            error_of(&spin_with(&format!("{{ id = \"x\", weight = {heavy} }}")));
        assert!(matches!(error, ConfigError::OutOfRange { .. }));
        assert_contains(
            &message,
            &["`pools[0].items[1].weight`", "2^32", &heavy.to_string()],
        );
        let (_, result) = load_text(&spin_with(&format!(
            "{{ id = \"x\", weight = {MAX_WEIGHT} }}"
        )));
        result.expect("2^32 is allowed");
    }

    #[test]
    fn item_and_pool_counts_are_bounded() {
        let ctx = Ctx::none();
        check_item_count(&ctx, 0, Some("p"), MAX_ITEMS_PER_POOL).expect("2^24 items allowed");
        let message = check_item_count(&ctx, 3, Some("p"), MAX_ITEMS_PER_POOL + 1)
            .expect_err("too many items")
            .to_string();
        assert_contains(
            &message,
            &[
                "`pools[3].items`",
                "number of items",
                "16777216",
                "16777217",
            ],
        );

        let mut text = String::new();
        for index in 0..=MAX_POOLS {
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
        let long = "q".repeat(MAX_AMQP_NAME_BYTES + 1);
        let mut config = Config::builtin();
        config.amqp.request_queue = long.clone();
        let message = config.validate().expect_err("too long").to_string();
        assert_contains(
            &message,
            &["`amqp.request_queue`", "256 bytes", "at most 255"],
        );
        config.amqp.request_queue = "q".repeat(MAX_AMQP_NAME_BYTES);
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
        let mut config = Config::builtin();
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
    fn key_lists_match_the_structs() {
        fn keys<T: Serialize>(value: &T) -> Vec<String> {
            let tree = config::Config::try_from(value).expect("serialize");
            let table: HashMap<String, config::Value> = tree.try_deserialize().expect("table");
            let mut keys: Vec<String> = table.into_keys().collect();
            keys.sort();
            keys
        }
        fn sorted(list: &[&str]) -> Vec<String> {
            let mut list: Vec<String> = list.iter().map(|key| (*key).to_owned()).collect();
            list.sort();
            list
        }
        let mut config = Config::builtin();
        config.storage.rng_seed = Some(1);
        assert_eq!(keys(&config), sorted(TOP_KEYS));
        assert_eq!(keys(&config.amqp), sorted(AMQP_KEYS));
        assert_eq!(keys(&config.storage), sorted(STORAGE_KEYS));
        let pool = config.pools[0].clone();
        assert_eq!(keys(&pool), sorted(POOL_KEYS));
        let item = ItemConfig {
            id: "i".to_owned(),
            quantity: Some(1),
            weight: Some(1),
        };
        assert_eq!(keys(&item), sorted(ITEM_KEYS));
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
        assert_eq!(normalize_key("pools[1]id"), "pools[1].id");
        assert_eq!(
            normalize_key("pools[1].items[2]weight"),
            "pools[1].items[2].weight"
        );
        assert_eq!(
            KeyRef::parse("pools[1].items[2].weight"),
            KeyRef::Item {
                pool: 1,
                item: 2,
                field: Some("weight")
            }
        );
        assert_eq!(
            KeyRef::parse("pools[3]"),
            KeyRef::Pool {
                pool: 3,
                field: None
            }
        );
        assert_eq!(
            KeyRef::parse("amqp.url"),
            KeyRef::Section {
                table: "amqp",
                field: "url"
            }
        );
        assert_eq!(KeyRef::parse("pools"), KeyRef::Top("pools"));
        assert_eq!(KeyRef::parse("bogus.x"), KeyRef::Top("bogus"));
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

        // Inline pools: no line rather than a wrong one.
        let text =
            "pools = [ { id = \"p\", mode = \"by_quantity\", items = [ { id = \"a\" } ] } ]\n";
        let (path, _, message) = error_of(text);
        assert_contains(
            &message,
            &["`pools[0].items[0].quantity`", &path.display().to_string()],
        );
        assert!(!message.contains(" line "), "{message}");
    }
}
