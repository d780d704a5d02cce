//! The one way tests write a config file: a [`ConfigFile`] is a TOML table built with the `toml`
//! crate and serialised by it, so paths, queue names and ids are always quoted and escaped
//! correctly. [`Setup`] is one broker test's world (names, temp dir, config file, data dir).
//!
//! Deliberately malformed files (the CLI's syntax-error tests) are the only text written by
//! hand, in the test that needs it.

use crate::broker::{Names, amqp_url};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use toml::{Table, Value};

/// A config file under construction: sections of keys, and pools.
#[derive(Clone, Debug, Default)]
pub struct ConfigFile {
    table: Table,
}

impl ConfigFile {
    pub fn new() -> ConfigFile {
        ConfigFile::default()
    }

    /// Sets `[section] key = value`.
    pub fn set(&mut self, section: &str, key: &str, value: impl Into<Value>) -> &mut ConfigFile {
        self.section(section).insert(key.to_string(), value.into());
        self
    }

    /// Merges TOML text of `key = value` lines into `[section]` (the text is parsed, not
    /// pasted: a line that is not TOML fails the test).
    pub fn merge(&mut self, section: &str, toml_lines: &str) -> &mut ConfigFile {
        let parsed: Table = toml::from_str(toml_lines)
            .unwrap_or_else(|e| panic!("test config fragment {toml_lines:?} is not TOML: {e}"));
        self.section(section).extend(parsed);
        self
    }

    /// Appends the `[[pools]]` of TOML text (a fixed pool set written as in the contract).
    pub fn pools_toml(&mut self, text: &str) -> &mut ConfigFile {
        let mut parsed: Table =
            toml::from_str(text).unwrap_or_else(|e| panic!("test pools are not TOML: {e}\n{text}"));
        let Some(Value::Array(pools)) = parsed.remove("pools") else {
            panic!("test pools text has no [[pools]]: {text}");
        };
        self.pools_mut().extend(pools);
        self
    }

    /// Appends one `by_quantity` pool.
    pub fn pool(&mut self, spec: &PoolSpec) -> &mut ConfigFile {
        let items: Vec<Value> = spec
            .items
            .iter()
            .map(|(id, q)| {
                let mut item = Table::new();
                item.insert("id".into(), id.as_str().into());
                item.insert("quantity".into(), Value::Integer(*q as i64));
                Value::Table(item)
            })
            .collect();
        let mut pool = Table::new();
        pool.insert("id".into(), spec.id.as_str().into());
        pool.insert("mode".into(), "by_quantity".into());
        pool.insert("items".into(), Value::Array(items));
        self.pools_mut().push(Value::Table(pool));
        self
    }

    /// True when `[section] key` is set.
    pub fn has(&self, section: &str, key: &str) -> bool {
        self.table
            .get(section)
            .and_then(Value::as_table)
            .is_some_and(|t| t.contains_key(key))
    }

    pub fn render(&self) -> String {
        toml::to_string(&self.table).expect("a TOML table serialises")
    }

    /// Writes the file (the test fails if it cannot).
    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.render())
            .unwrap_or_else(|e| panic!("write config {}: {e}", path.display()));
    }

    fn section(&mut self, name: &str) -> &mut Table {
        self.table
            .entry(name)
            .or_insert_with(|| Value::Table(Table::new()))
            .as_table_mut()
            .unwrap_or_else(|| panic!("[{name}] is not a table"))
    }

    fn pools_mut(&mut self) -> &mut Vec<Value> {
        self.table
            .entry("pools")
            .or_insert_with(|| Value::Array(Vec::new()))
            .as_array_mut()
            .expect("pools is an array")
    }
}

/// One `by_quantity` pool of the test config.
#[derive(Clone, Debug)]
pub struct PoolSpec {
    pub id: String,
    pub items: Vec<(String, u64)>,
}

impl PoolSpec {
    pub fn new(id: &str, items: &[(&str, u64)]) -> PoolSpec {
        PoolSpec {
            id: id.to_string(),
            items: items.iter().map(|(i, q)| (i.to_string(), *q)).collect(),
        }
    }

    pub fn total(&self) -> u64 {
        self.items.iter().map(|(_, q)| q).sum()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueType {
    Classic,
    Quorum,
}

/// What a test's config file says.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub queue_type: QueueType,
    /// `amqp.delivery_limit`; `None` keeps the built-in default (20).
    pub delivery_limit: Option<u32>,
    pub pools: Vec<PoolSpec>,
    /// Extra `key = value` lines (TOML, parsed and merged) for `[amqp]` and `[storage]`;
    /// they override the harness's own keys.
    pub amqp_extra: Vec<String>,
    pub storage_extra: Vec<String>,
    /// More `[[pools]]` as TOML text (e.g. a `by_weight` pool), after `pools`.
    pub pools_toml: String,
    /// `admin.allowed_users` (empty: not set, anyone).
    pub allowed_users: Vec<String>,
}

impl WorkerConfig {
    pub fn new(queue_type: QueueType, pools: Vec<PoolSpec>) -> WorkerConfig {
        WorkerConfig {
            queue_type,
            delivery_limit: None,
            pools,
            amqp_extra: Vec::new(),
            storage_extra: Vec::new(),
            pools_toml: String::new(),
            allowed_users: Vec::new(),
        }
    }
}

/// One test's world: names, a temp dir holding the config file, the data dir and worker logs.
pub struct Setup {
    pub names: Names,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub data_dir: PathBuf,
    pub config: WorkerConfig,
    pub(crate) logs: AtomicUsize,
}

impl Setup {
    pub fn new(test: &str, config: WorkerConfig) -> Setup {
        let names = Names::new(test);
        let dir = tempfile::Builder::new()
            .prefix(&format!("rpt-{test}-"))
            .tempdir()
            .expect("temp dir");
        let data_dir = dir.path().join("data");
        let config_path = dir.path().join("rewardpool.toml");
        let setup = Setup {
            names,
            config_path,
            data_dir,
            config,
            dir,
            logs: AtomicUsize::new(0),
        };
        std::fs::write(&setup.config_path, setup.render()).expect("write config");
        setup
    }

    pub fn render(&self) -> String {
        let c = &self.config;
        let n = &self.names;
        let mut file = ConfigFile::new();
        file.set("amqp", "url", amqp_url())
            .set("amqp", "request_queue", n.request.as_str())
            .set("amqp", "result_queue", n.result.as_str())
            .set("amqp", "dead_letter_queue", n.dead.as_str())
            .set("amqp", "admin_queue", n.admin.as_str())
            .set(
                "amqp",
                "queue_type",
                match c.queue_type {
                    QueueType::Classic => "classic",
                    QueueType::Quorum => "quorum",
                },
            );
        if let Some(limit) = c.delivery_limit {
            file.set("amqp", "delivery_limit", i64::from(limit));
        }
        // Reconnect quickly: the disruption tests wait for the worker to come back.
        file.set("amqp", "reconnect_backoff_min_ms", 50).set(
            "amqp",
            "reconnect_backoff_max_ms",
            1000,
        );
        for line in &c.amqp_extra {
            file.merge("amqp", line);
        }
        file.set(
            "storage",
            "data_dir",
            self.data_dir.to_str().expect("utf-8 temp path"),
        );
        // Snapshots (and WAL pruning) happen during the tests, not only at shutdown.
        file.set("storage", "snapshot_every_records", 2000);
        for line in &c.storage_extra {
            file.merge("storage", line);
        }
        // Two workers run at once: no metrics listener unless a test asks for one
        // (REWARDPOOL__METRICS__LISTEN overrides this).
        file.set("metrics", "listen", "");
        for p in &c.pools {
            file.pool(p);
        }
        if !c.pools_toml.is_empty() {
            file.pools_toml(&c.pools_toml);
        }
        if !c.allowed_users.is_empty() {
            let users: Vec<Value> = c
                .allowed_users
                .iter()
                .map(|u| Value::String(u.clone()))
                .collect();
            file.set("admin", "allowed_users", Value::Array(users));
        }
        file.render()
    }
}
