//! What a pool is made of when it enters the state, and the rules it must follow.
//!
//! One representation of a seed ([`PoolSeed`]: pool id, mode, items with id, [`Stock`] and
//! weight) is shared by the validated configuration, the WAL's `Seed` records, pool
//! construction and the state, so nothing converts between look-alike types.
//!
//! The rules ([`check_id`], [`item_seed`], [`check_pool`], ...) know nothing of files or
//! keys: they return a typed [`RuleError`], which the configuration loader decorates with the
//! key, the ids, the file and the line, and which an admin command (add_pool, add_item,
//! set_weight, ...) can report as it is. One set of rules, whoever asks.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

use crate::limits::{ID_BYTES_MAX, POOL_ITEMS_MAX, QUANTITY_MAX, RECORD_BYTES_MAX, WEIGHT_MAX};

/// How a pool turns stock into probabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Every remaining unit is equally likely.
    ByQuantity,
    /// An item in stock is drawn with probability weight / total weight in stock.
    ByWeight,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::ByQuantity => "by_quantity",
            Mode::ByWeight => "by_weight",
        }
    }
}

/// Accepts exactly `by_quantity` and `by_weight`, with a message that lists both.
impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        match text.as_str() {
            "by_quantity" => Ok(Mode::ByQuantity),
            "by_weight" => Ok(Mode::ByWeight),
            other => Err(serde::de::Error::custom(format!(
                "must be \"by_quantity\" or \"by_weight\", got {:?}",
                shorten(other)
            ))),
        }
    }
}

/// The stock of an item when seeded: a number of units, or no limit (by_weight pools only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stock {
    Limited(u64),
    Unlimited,
}

impl Stock {
    /// The quantity; `None` when unlimited (the shape of records, snapshots and `inspect`).
    pub fn quantity(self) -> Option<u64> {
        match self {
            Stock::Limited(quantity) => Some(quantity),
            Stock::Unlimited => None,
        }
    }

    pub fn from_quantity(quantity: Option<u64>) -> Stock {
        quantity.map_or(Stock::Unlimited, Stock::Limited)
    }
}

/// One item of a seed. `weight` is `Some` exactly in by_weight pools (see [`item_seed`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeedItem {
    pub id: String,
    pub stock: Stock,
    pub weight: Option<u64>,
}

/// A pool as it enters the state: from the config, a `Seed` record, or (later) `add_pool`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolSeed {
    pub id: String,
    pub mode: Mode,
    pub items: Vec<SeedItem>,
}

impl PoolSeed {
    /// From `(id, quantity, weight)` triples, `None` quantity meaning unlimited (tests,
    /// benchmarks). Not checked: see [`check_pool`].
    pub fn from_parts(
        id: &str,
        mode: Mode,
        items: &[(String, Option<u64>, Option<u64>)],
    ) -> PoolSeed {
        PoolSeed {
            id: id.to_owned(),
            mode,
            items: items
                .iter()
                .map(|(id, quantity, weight)| SeedItem {
                    id: id.clone(),
                    stock: Stock::from_quantity(*quantity),
                    weight: *weight,
                })
                .collect(),
        }
    }
}

/// Which id a rule talks about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdKind {
    Pool,
    Item,
}

impl fmt::Display for IdKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdKind::Pool => "pool id",
            IdKind::Item => "item id",
        })
    }
}

/// A broken pool or item rule. Messages name no location; callers add it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("{kind} must not be empty")]
    EmptyId { kind: IdKind },
    #[error("{kind} is {bytes} bytes long, at most {ID_BYTES_MAX} allowed")]
    LongId { kind: IdKind, bytes: usize },
    #[error("duplicate pool id {id:?}")]
    DuplicatePoolId { id: String },
    #[error("duplicate item id {id:?} in this pool")]
    DuplicateItemId { id: String },
    #[error("pool has no items")]
    NoItems,
    #[error("number of items must be between 1 and {POOL_ITEMS_MAX}, got {count}")]
    TooManyItems { count: usize },
    #[error("quantity must not be negative, got {value} (use 0 for a sold-out item)")]
    NegativeQuantity { value: i64 },
    #[error("quantity must be between 0 and {QUANTITY_MAX} (2^40), got {value}")]
    QuantityTooLarge { value: i64 },
    #[error("weight must be greater than 0, got {value}")]
    NonPositiveWeight { value: i64 },
    #[error("weight must be between 1 and {WEIGHT_MAX} (2^32), got {value}")]
    WeightTooLarge { value: i64 },
    #[error("missing weight: every item of a by_weight pool needs a weight")]
    MissingWeight,
    #[error("weight is not allowed in a by_quantity pool (draws follow the quantities)")]
    UnexpectedWeight,
    #[error("missing quantity: unlimited items are only allowed in by_weight pools")]
    UnlimitedItem,
    #[error("the sum of the quantities does not fit in 64 bits")]
    StockSumOverflow,
    #[error("the pool's ids take {bytes} bytes in its seed record, at most {RECORD_BYTES_MAX}")]
    SeedTooLarge { bytes: usize },
}

/// Which field of an item a [`RuleError`] is about (the config loader turns it into a key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ItemField {
    Id,
    Quantity,
    Weight,
}

impl ItemField {
    pub fn key(self) -> &'static str {
        match self {
            ItemField::Id => "id",
            ItemField::Quantity => "quantity",
            ItemField::Weight => "weight",
        }
    }
}

/// A pool or item id: non-empty, at most [`ID_BYTES_MAX`] bytes.
pub fn check_id(kind: IdKind, id: &str) -> Result<(), RuleError> {
    if id.is_empty() {
        Err(RuleError::EmptyId { kind })
    } else if id.len() > ID_BYTES_MAX {
        Err(RuleError::LongId {
            kind,
            bytes: id.len(),
        })
    } else {
        Ok(())
    }
}

/// A quantity as given (signed, so that negative values reach the rule): 0..=2^40.
pub fn check_quantity(value: i64) -> Result<u64, RuleError> {
    match u64::try_from(value) {
        Err(_) => Err(RuleError::NegativeQuantity { value }),
        Ok(quantity) if quantity > QUANTITY_MAX => Err(RuleError::QuantityTooLarge { value }),
        Ok(quantity) => Ok(quantity),
    }
}

/// A weight as given: 1..=2^32, and only in by_weight pools.
pub fn check_weight(mode: Mode, weight: Option<i64>) -> Result<Option<u64>, RuleError> {
    match (mode, weight) {
        (Mode::ByQuantity, None) => Ok(None),
        (Mode::ByQuantity, Some(_)) => Err(RuleError::UnexpectedWeight),
        (Mode::ByWeight, None) => Err(RuleError::MissingWeight),
        (Mode::ByWeight, Some(value)) if value <= 0 => Err(RuleError::NonPositiveWeight { value }),
        (Mode::ByWeight, Some(value)) if value.unsigned_abs() > WEIGHT_MAX => {
            Err(RuleError::WeightTooLarge { value })
        }
        (Mode::ByWeight, Some(value)) => Ok(Some(value.unsigned_abs())),
    }
}

/// A stock as given: a quantity, or none (unlimited, by_weight pools only).
pub fn check_stock(mode: Mode, quantity: Option<i64>) -> Result<Stock, RuleError> {
    match quantity {
        Some(value) => check_quantity(value).map(Stock::Limited),
        None if mode == Mode::ByQuantity => Err(RuleError::UnlimitedItem),
        None => Ok(Stock::Unlimited),
    }
}

/// One item as given, checked on its own (ids against the rest of the pool: [`check_pool`]).
pub fn item_seed(
    mode: Mode,
    id: &str,
    quantity: Option<i64>,
    weight: Option<i64>,
) -> Result<SeedItem, (ItemField, RuleError)> {
    check_id(IdKind::Item, id).map_err(|e| (ItemField::Id, e))?;
    let stock = check_stock(mode, quantity).map_err(|e| (ItemField::Quantity, e))?;
    let weight = check_weight(mode, weight).map_err(|e| (ItemField::Weight, e))?;
    Ok(SeedItem {
        id: id.to_owned(),
        stock,
        weight,
    })
}

/// A whole pool: its id, item count, items (each by [`item_seed`]'s rules) and unique item
/// ids. On error, the index of the item at fault (if one is).
pub fn check_pool(seed: &PoolSeed) -> Result<(), (Option<usize>, RuleError)> {
    check_id(IdKind::Pool, &seed.id).map_err(|e| (None, e))?;
    if seed.items.is_empty() {
        return Err((None, RuleError::NoItems));
    }
    if seed.items.len() > POOL_ITEMS_MAX {
        return Err((
            None,
            RuleError::TooManyItems {
                count: seed.items.len(),
            },
        ));
    }
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(seed.items.len());
    let mut seed_bytes: usize = 64 + seed.id.len();
    let mut stock_total: u64 = 0;
    for (index, item) in seed.items.iter().enumerate() {
        check_item(seed.mode, item).map_err(|e| (Some(index), e))?;
        if seen.insert(&item.id, index).is_some() {
            return Err((
                Some(index),
                RuleError::DuplicateItemId {
                    id: shorten(&item.id),
                },
            ));
        }
        seed_bytes += 1 + item.id.len() + 18;
        if let Stock::Limited(quantity) = item.stock {
            stock_total = stock_total
                .checked_add(quantity)
                .ok_or((None, RuleError::StockSumOverflow))?;
        }
    }
    if seed_bytes > RECORD_BYTES_MAX {
        return Err((None, RuleError::SeedTooLarge { bytes: seed_bytes }));
    }
    Ok(())
}

/// An item already in seed form (e.g. `add_item`): the same rules as [`item_seed`].
pub fn check_item(mode: Mode, item: &SeedItem) -> Result<(), RuleError> {
    check_id(IdKind::Item, &item.id)?;
    match (mode, item.stock) {
        (Mode::ByQuantity, Stock::Unlimited) => return Err(RuleError::UnlimitedItem),
        (_, Stock::Limited(quantity)) if quantity > QUANTITY_MAX => {
            return Err(RuleError::QuantityTooLarge {
                value: i64::try_from(quantity).unwrap_or(i64::MAX),
            });
        }
        _ => {}
    }
    let weight = item
        .weight
        .map(|weight| i64::try_from(weight).unwrap_or(i64::MAX));
    check_weight(mode, weight).map(|_| ())
}

/// Pool ids unique across a set of pools; the index of the first repeat and of its first use.
pub fn check_unique_pool_ids<'a>(
    ids: impl IntoIterator<Item = &'a str>,
) -> Result<(), (usize, usize, RuleError)> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (index, id) in ids.into_iter().enumerate() {
        if let Some(&first) = seen.get(id) {
            return Err((index, first, RuleError::DuplicatePoolId { id: shorten(id) }));
        }
        seen.insert(id, index);
    }
    Ok(())
}

/// A copy of `text` for a message: no password, and short enough (ids and bad values can be
/// long). Redacted first, then cut: a cut before the `@` that ends a password would leave
/// nothing for [`redact_secrets`] to find, and part of the password in the message.
pub fn shorten(text: &str) -> String {
    const CHARS_MAX: usize = 48;
    let text = redact_secrets(text);
    if text.chars().count() <= CHARS_MAX {
        return text;
    }
    let mut short: String = text.chars().take(CHARS_MAX).collect();
    short.push('…');
    short
}

/// Redacts every `scheme://user:password@` in free text (URLs, error messages, parser
/// snippets): per whitespace-separated token, from the user's `:` to the token's last `@`, so a
/// raw `/` or `@` in a password stays hidden too (over-redacting beats leaking).
pub fn redact_secrets(text: &str) -> String {
    let redact = |token: &str| {
        let user = token.find("://")? + 3;
        let (colon, at) = (user + token[user..].find(':')?, token.rfind('@')?);
        (colon < at).then(|| format!("{}:***{}", &token[..colon], &token[at..]))
    };
    (text.split_inclusive(char::is_whitespace))
        .map(|token| redact(token).unwrap_or_else(|| token.to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str, stock: Stock, weight: Option<u64>) -> SeedItem {
        SeedItem {
            id: id.to_owned(),
            stock,
            weight,
        }
    }

    #[test]
    fn item_rules_without_a_location() {
        let q = Mode::ByQuantity;
        let w = Mode::ByWeight;
        assert_eq!(
            item_seed(q, "a", Some(3), None),
            Ok(item("a", Stock::Limited(3), None))
        );
        assert_eq!(
            item_seed(w, "a", None, Some(7)),
            Ok(item("a", Stock::Unlimited, Some(7)))
        );
        let err = |mode, id, quantity, weight| item_seed(mode, id, quantity, weight).unwrap_err();
        assert_eq!(
            err(q, "", Some(1), None),
            (ItemField::Id, RuleError::EmptyId { kind: IdKind::Item })
        );
        assert_eq!(
            err(q, "a", Some(-1), None),
            (
                ItemField::Quantity,
                RuleError::NegativeQuantity { value: -1 }
            )
        );
        assert_eq!(
            err(q, "a", None, None),
            (ItemField::Quantity, RuleError::UnlimitedItem)
        );
        assert_eq!(
            err(q, "a", Some(1), Some(1)),
            (ItemField::Weight, RuleError::UnexpectedWeight)
        );
        assert_eq!(
            err(w, "a", Some(1), None),
            (ItemField::Weight, RuleError::MissingWeight)
        );
        assert_eq!(
            err(w, "a", Some(1), Some(0)),
            (ItemField::Weight, RuleError::NonPositiveWeight { value: 0 })
        );
        let heavy = (WEIGHT_MAX + 1) as i64;
        assert_eq!(
            err(w, "a", Some(1), Some(heavy)),
            (
                ItemField::Weight,
                RuleError::WeightTooLarge { value: heavy }
            )
        );
        let many = (QUANTITY_MAX + 1) as i64;
        assert_eq!(
            err(q, "a", Some(many), None),
            (
                ItemField::Quantity,
                RuleError::QuantityTooLarge { value: many }
            )
        );
        assert_eq!(check_quantity(QUANTITY_MAX as i64), Ok(QUANTITY_MAX));
        assert_eq!(
            check_weight(w, Some(WEIGHT_MAX as i64)),
            Ok(Some(WEIGHT_MAX))
        );
    }

    #[test]
    fn pool_rules_without_a_location() {
        let mut seed = PoolSeed {
            id: "p".to_owned(),
            mode: Mode::ByWeight,
            items: vec![
                item("a", Stock::Limited(1), Some(1)),
                item("b", Stock::Unlimited, Some(2)),
            ],
        };
        assert_eq!(check_pool(&seed), Ok(()));
        seed.items.push(item("a", Stock::Limited(1), Some(1)));
        assert_eq!(
            check_pool(&seed),
            Err((Some(2), RuleError::DuplicateItemId { id: "a".to_owned() }))
        );
        seed.mode = Mode::ByQuantity;
        assert_eq!(
            check_pool(&seed),
            Err((Some(0), RuleError::UnexpectedWeight))
        );
        seed.items.clear();
        assert_eq!(check_pool(&seed), Err((None, RuleError::NoItems)));
        assert_eq!(
            check_unique_pool_ids(["x", "y", "x"]),
            Err((2, 0, RuleError::DuplicatePoolId { id: "x".to_owned() }))
        );
    }

    #[test]
    fn shorten_redacts_before_it_cuts() {
        let password = "p".repeat(60);
        let short = shorten(&format!(
            "amqp://user:{password}@host/and/a/long/path/to/cut"
        ));
        assert_eq!(short, "amqp://user:***@host/and/a/long/path/to/cut");
        let long = shorten(&format!("amqp://user:{password}@host/{}", "x".repeat(60)));
        assert!(long.starts_with("amqp://user:***@host/x") && long.ends_with('…'));
        assert_eq!(long.chars().count(), 49, "{long}");
        assert_eq!(shorten("by_count"), "by_count");
    }
}
