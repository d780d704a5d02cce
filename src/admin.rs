//! Admin commands: what an operator asks for (by pool and item id), the views its reply and
//! `inspect` show, and the reply body.
//!
//! A command travels as an [`AdminCommand`] (names, numbers as given) to the engine, which
//! alone owns the state: `State::admin` checks it against the current pools with the
//! configuration's rules (`seed.rs`) and, when it passes, turns it into an `AdminOp` (indexes)
//! inside a WAL record and applies that record through the same path replay takes
//! (`State::apply_admin`). So a command is validated where the state is, between two draws,
//! and a replayed command changes the state exactly as the live one did.

use crate::limits::{BODY_BYTES_MAX, POOL_ITEMS_MAX};
use crate::pool::{Item, Mode};
use crate::seed::{PoolSeed, shorten};
use serde::Serialize;
use serde_json::{Map, Value};

/// A command by names, as parsed from the admin queue (or built by tests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminCommand {
    Restock {
        pool: String,
        item: String,
        add: u64,
    },
    SetQuantity {
        pool: String,
        item: String,
        quantity: u64,
    },
    SetWeight {
        pool: String,
        item: String,
        weight: u64,
    },
    /// `quantity` `None` = unlimited (by_weight pools only).
    AddItem {
        pool: String,
        item: String,
        quantity: Option<u64>,
        weight: Option<u64>,
    },
    AddPool {
        pool: PoolSeed,
    },
    ClosePool {
        pool: String,
    },
    OpenPool {
        pool: String,
    },
}

impl AdminCommand {
    /// The contract's name of the op.
    pub fn op(&self) -> &'static str {
        match self {
            AdminCommand::Restock { .. } => "restock",
            AdminCommand::SetQuantity { .. } => "set_quantity",
            AdminCommand::SetWeight { .. } => "set_weight",
            AdminCommand::AddItem { .. } => "add_item",
            AdminCommand::AddPool { .. } => "add_pool",
            AdminCommand::ClosePool { .. } => "close_pool",
            AdminCommand::OpenPool { .. } => "open_pool",
        }
    }

    pub fn pool(&self) -> &str {
        match self {
            AdminCommand::Restock { pool, .. }
            | AdminCommand::SetQuantity { pool, .. }
            | AdminCommand::SetWeight { pool, .. }
            | AdminCommand::AddItem { pool, .. }
            | AdminCommand::ClosePool { pool }
            | AdminCommand::OpenPool { pool } => pool,
            AdminCommand::AddPool { pool } => &pool.id,
        }
    }
}

/// An applied command's outcome, kept in the idempotency window (and snapshots) so a repeat of
/// its `message_id` gets the first reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminApplied {
    pub op: String,
    /// The reply body (JSON), exactly as first sent.
    pub reply: String,
}

/// One item as `inspect` and admin replies show it.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct ItemView {
    pub id: String,
    /// Units left; `null` for an unlimited item.
    pub quantity: Option<u64>,
    /// Units ever drawn.
    pub issued: u64,
    /// Units ever put in (`quantity + issued`); `null` for an unlimited item.
    pub stocked: Option<u64>,
    pub weight: Option<u64>,
}

impl ItemView {
    /// Asserts the accounting it shows: `stocked = quantity + issued`.
    pub fn of(item: &Item) -> ItemView {
        if let (Some(quantity), Some(stocked)) = (item.quantity, item.stocked) {
            assert_eq!(
                quantity.checked_add(item.issued),
                Some(stocked),
                "item {:?}: stocked != quantity + issued",
                item.id
            );
        }
        ItemView {
            id: item.id.clone(),
            quantity: item.quantity,
            issued: item.issued,
            stocked: item.stocked,
            weight: item.weight,
        }
    }
}

/// One pool as `inspect` and admin replies show it.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct PoolView {
    pub id: String,
    pub mode: Mode,
    pub closed: bool,
    pub items: Vec<ItemView>,
}

#[derive(Serialize)]
struct ReplyBody<'a> {
    status: &'static str,
    request_id: u64,
    op: &'a str,
    pool: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    item: Option<ItemView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pool_state: Option<PoolView>,
}

/// The `admin_result` body of an applied command: `item` after the change, or `pool_state`
/// for add_pool, close_pool and open_pool.
pub fn applied_reply(
    request_id: u64,
    op: &str,
    pool: &str,
    item: Option<ItemView>,
    pool_state: Option<PoolView>,
) -> String {
    assert!(item.is_some() != pool_state.is_some());
    serde_json::to_string(&ReplyBody {
        status: "applied",
        request_id,
        op,
        pool,
        item,
        pool_state,
    })
    .expect("reply serialises")
}

/// The `rejected` body of a command that changed nothing.
pub fn rejected_reply(error: &str) -> String {
    serde_json::json!({"status": "rejected", "error": error}).to_string()
}

/// The fields each op takes (besides `op`); any other field is an error: an operator's typo
/// (`quantiy`) must not be read as "field absent".
fn fields_of(op: &str) -> Option<&'static [&'static str]> {
    Some(match op {
        "restock" => &["pool", "item", "add"],
        "set_quantity" => &["pool", "item", "quantity"],
        "set_weight" => &["pool", "item", "weight"],
        "add_item" => &["pool", "item", "quantity", "weight"],
        "add_pool" => &["pool", "mode", "items"],
        "close_pool" | "open_pool" => &["pool"],
        _ => return None,
    })
}

/// Parses an admin command body strictly (the same reading as requests: at most 64 KiB, one
/// JSON object, no key twice at any depth, exact types). Rules that need the state (ids that
/// exist, modes, stock arithmetic) are the engine's (`State::check_admin`); the rules that need
/// none (ranges, ids, item lists) are checked here too, so a reply names them early.
pub fn parse_command(body: &[u8]) -> Result<AdminCommand, String> {
    if body.len() > BODY_BYTES_MAX {
        return Err(format!(
            "body is {} bytes, at most 64 KiB ({BODY_BYTES_MAX} bytes) allowed",
            body.len()
        ));
    }
    let crate::message::Strict(value) = serde_json::from_slice(body)
        .map_err(|e| format!("body is not valid JSON (read strictly): {e}"))?;
    let Value::Object(map) = value else {
        return Err("body must be a JSON object".into());
    };
    let op = match map.get("op") {
        Some(Value::String(op)) => op.as_str(),
        Some(_) => return Err("field op must be a string".into()),
        None => return Err("field op is missing".into()),
    };
    let Some(fields) = fields_of(op) else {
        return Err(format!(
            "unknown op {:?}: one of restock, set_quantity, set_weight, add_item, add_pool, close_pool, open_pool",
            shorten(op)
        ));
    };
    if let Some(extra) = map
        .keys()
        .find(|k| *k != "op" && !fields.contains(&k.as_str()))
    {
        return Err(format!(
            "field {:?} is not a field of {op} (fields: {})",
            shorten(extra),
            fields.join(", ")
        ));
    }
    let pool = string(&map, "pool")?;
    crate::seed::check_id(crate::seed::IdKind::Pool, &pool).map_err(|e| e.to_string())?;
    let item = || -> Result<String, String> {
        let item = string(&map, "item")?;
        crate::seed::check_id(crate::seed::IdKind::Item, &item).map_err(|e| e.to_string())?;
        Ok(item)
    };
    Ok(match op {
        "restock" => AdminCommand::Restock {
            pool,
            item: item()?,
            add: unsigned(&map, "add")?,
        },
        "set_quantity" => AdminCommand::SetQuantity {
            pool,
            item: item()?,
            quantity: unsigned(&map, "quantity")?,
        },
        "set_weight" => AdminCommand::SetWeight {
            pool,
            item: item()?,
            weight: unsigned(&map, "weight")?,
        },
        "add_item" => AdminCommand::AddItem {
            pool,
            item: item()?,
            quantity: optional_unsigned(&map, "quantity")?,
            weight: optional_unsigned(&map, "weight")?,
        },
        "add_pool" => AdminCommand::AddPool {
            pool: pool_seed(&map, pool)?,
        },
        "close_pool" => AdminCommand::ClosePool { pool },
        _ => AdminCommand::OpenPool { pool },
    })
}

fn string(map: &Map<String, Value>, key: &str) -> Result<String, String> {
    match map.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(format!("field {key} must be a string")),
        None => Err(format!("field {key} is missing")),
    }
}

/// A non-negative integer; a negative one reaches the rule that names it (e.g. quantity).
fn unsigned(map: &Map<String, Value>, key: &str) -> Result<u64, String> {
    optional_unsigned(map, key)?.ok_or_else(|| format!("field {key} is missing"))
}

fn optional_unsigned(map: &Map<String, Value>, key: &str) -> Result<Option<u64>, String> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
            (Some(v), _) => Ok(Some(v)),
            (None, Some(v)) => Err(format!("{key} must not be negative, got {v}")),
            _ => Err(format!("{key} must be an integer, got {n}")),
        },
        Some(_) => Err(format!("field {key} must be an integer")),
    }
}

/// `add_pool`'s `mode` and `items`, as in the config, checked with the config's rules.
fn pool_seed(map: &Map<String, Value>, id: String) -> Result<PoolSeed, String> {
    let mode = match map.get("mode") {
        Some(Value::String(m)) if m == "by_quantity" => Mode::ByQuantity,
        Some(Value::String(m)) if m == "by_weight" => Mode::ByWeight,
        Some(_) => return Err("mode must be \"by_quantity\" or \"by_weight\"".into()),
        None => return Err("field mode is missing".into()),
    };
    let items = match map.get("items") {
        Some(Value::Array(items)) => items,
        Some(_) => return Err("field items must be an array".into()),
        None => return Err("field items is missing".into()),
    };
    if items.len() > POOL_ITEMS_MAX {
        return Err(format!(
            "items has {} entries, at most {POOL_ITEMS_MAX}",
            items.len()
        ));
    }
    let mut seed = PoolSeed {
        id,
        mode,
        items: Vec::with_capacity(items.len()),
    };
    for (index, item) in items.iter().enumerate() {
        let Value::Object(item) = item else {
            return Err(format!("items[{index}] must be an object"));
        };
        if let Some(extra) = item
            .keys()
            .find(|k| !["id", "quantity", "weight"].contains(&k.as_str()))
        {
            return Err(format!(
                "items[{index}]: unknown field {:?}",
                shorten(extra)
            ));
        }
        let id = string(item, "id").map_err(|e| format!("items[{index}]: {e}"))?;
        let signed = |key: &str| -> Result<Option<i64>, String> {
            match item.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Number(n)) => n
                    .as_i64()
                    .map(Some)
                    .ok_or_else(|| format!("items[{index}]: {key} must be an integer, got {n}")),
                Some(_) => Err(format!("items[{index}]: {key} must be an integer")),
            }
        };
        let entry = crate::seed::item_seed(mode, &id, signed("quantity")?, signed("weight")?)
            .map_err(|(field, e)| format!("items[{index}].{}: {e}", field.key()))?;
        seed.items.push(entry);
    }
    crate::seed::check_pool(&seed).map_err(|(index, e)| match index {
        Some(i) => format!("items[{i}]: {e}"),
        None => e.to_string(),
    })?;
    Ok(seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<AdminCommand, String> {
        parse_command(body.as_bytes())
    }

    #[test]
    fn every_op_parses() {
        assert_eq!(
            parse(r#"{"op":"restock","pool":"default","item":"gold","add":10}"#),
            Ok(AdminCommand::Restock {
                pool: "default".into(),
                item: "gold".into(),
                add: 10
            })
        );
        assert_eq!(
            parse(r#"{"op":"set_quantity","pool":"p","item":"i","quantity":0}"#),
            Ok(AdminCommand::SetQuantity {
                pool: "p".into(),
                item: "i".into(),
                quantity: 0
            })
        );
        assert_eq!(
            parse(r#"{"op":"set_weight","pool":"p","item":"i","weight":7}"#),
            Ok(AdminCommand::SetWeight {
                pool: "p".into(),
                item: "i".into(),
                weight: 7
            })
        );
        assert_eq!(
            parse(r#"{"op":"add_item","pool":"p","item":"i","weight":3}"#),
            Ok(AdminCommand::AddItem {
                pool: "p".into(),
                item: "i".into(),
                quantity: None,
                weight: Some(3)
            })
        );
        assert_eq!(
            parse(
                r#"{"op":"add_pool","pool":"xmas","mode":"by_weight","items":[{"id":"a","quantity":2,"weight":1},{"id":"b","weight":9}]}"#
            ),
            Ok(AdminCommand::AddPool {
                pool: PoolSeed::from_parts(
                    "xmas",
                    Mode::ByWeight,
                    &[("a".into(), Some(2), Some(1)), ("b".into(), None, Some(9))]
                )
            })
        );
        assert_eq!(
            parse(r#"{"op":"close_pool","pool":"p"}"#),
            Ok(AdminCommand::ClosePool { pool: "p".into() })
        );
        assert_eq!(
            parse(r#"{"op":"open_pool","pool":"p"}"#),
            Ok(AdminCommand::OpenPool { pool: "p".into() })
        );
    }

    #[test]
    fn hostile_and_wrong_bodies_are_clear_errors() {
        let cases = [
            ("[1]", "JSON object"),
            ("nope", "not valid JSON"),
            (r#"{"pool":"p"}"#, "op is missing"),
            (r#"{"op":1}"#, "op must be a string"),
            (r#"{"op":"explode","pool":"p"}"#, "unknown op"),
            (
                r#"{"op":"close_pool","pool":"p","pool":"q"}"#,
                "duplicate key",
            ),
            (
                r#"{"op":"close_pool","op":"open_pool","pool":"p"}"#,
                "duplicate key",
            ),
            (
                r#"{"op":"close_pool","pool":"p","force":true}"#,
                "not a field of close_pool",
            ),
            (
                r#"{"op":"restock","pool":"p","item":"i","quantiy":1}"#,
                "not a field of restock",
            ),
            (
                r#"{"op":"restock","pool":"p","item":"i"}"#,
                "add is missing",
            ),
            (
                r#"{"op":"restock","pool":"p","item":"i","add":"1"}"#,
                "must be an integer",
            ),
            (
                r#"{"op":"restock","pool":"p","item":"i","add":1.5}"#,
                "must be an integer",
            ),
            (
                r#"{"op":"restock","pool":"p","item":"i","add":-1}"#,
                "must not be negative",
            ),
            (
                r#"{"op":"restock","pool":7,"item":"i","add":1}"#,
                "pool must be a string",
            ),
            (
                r#"{"op":"restock","pool":"","item":"i","add":1}"#,
                "must not be empty",
            ),
            (
                r#"{"op":"add_pool","pool":"x","mode":"random","items":[]}"#,
                "mode must be",
            ),
            (
                r#"{"op":"add_pool","pool":"x","mode":"by_quantity","items":[]}"#,
                "no items",
            ),
            (
                r#"{"op":"add_pool","pool":"x","mode":"by_quantity","items":[{"id":"a"}]}"#,
                "items[0].quantity",
            ),
            (
                r#"{"op":"add_pool","pool":"x","mode":"by_quantity","items":[{"id":"a","quantity":-1}]}"#,
                "negative",
            ),
            (
                r#"{"op":"add_pool","pool":"x","mode":"by_weight","items":[{"id":"a","weight":0}]}"#,
                "weight",
            ),
            (
                r#"{"op":"add_pool","pool":"x","mode":"by_quantity","items":[{"id":"a","quantity":1,"colour":"red"}]}"#,
                "unknown field",
            ),
            (
                r#"{"op":"add_pool","pool":"x","mode":"by_quantity","items":[{"id":"a","quantity":1},{"id":"a","quantity":1}]}"#,
                "duplicate item id",
            ),
        ];
        for (body, want) in cases {
            let err = parse(body).unwrap_err();
            assert!(err.contains(want), "{body}: {err}");
        }
        let long = format!(r#"{{"op":"close_pool","pool":"{}"}}"#, "p".repeat(129));
        assert!(parse(&long).unwrap_err().contains("bytes long"));
        let huge = vec![b' '; BODY_BYTES_MAX + 1];
        assert!(parse_command(&huge).unwrap_err().contains("64 KiB"));
    }
}
