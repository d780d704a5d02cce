//! The durable state: pools, the idempotency window and the request-ID high-water marks.
//!
//! `State` is what a snapshot holds and what WAL replay rebuilds. The engine thread owns the
//! only live instance; recovery builds one from snapshot + WAL and hands it over. Every change
//! goes through `draw` (live) or `apply` (replay), and both end in the same bookkeeping
//! (`commit_draw`), so a replayed draw changes the state exactly as the live draw did.
//! Admin commands likewise: `admin` (live) checks a command against the state, writes its
//! record and applies it with `apply_admin`, which is also what replay calls.
//!
//! A closed pool (`close_pool`) draws nothing: its draws keep their ID and record (no items)
//! and complete with status `closed`. The status is not in the record: replay knows whether
//! the pool was closed at that point of the log, so the draw path's record format is unchanged.

use crate::admin::{AdminApplied, AdminCommand, ItemView, PoolView, applied_reply};
use crate::dedupe::{MessageKey, Window, message_key};
use crate::epoch::EpochState;
use crate::pool::{DrawRng, Item, Mode, Pool, PoolError};
use crate::record::{AdminOp, AdminRecord, DrawRecord, DrawRef, Record};
use crate::seed::PoolSeed;
use std::collections::HashMap;
use std::sync::Arc;

/// What a draw gave; shared by the window, results and repeats.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub request_id: u64,
    pub pool: Arc<str>,
    pub user: Arc<str>,
    pub count: u32,
    /// Item ids in draw order.
    pub items: Vec<Arc<str>>,
    /// The pool was closed when this request was drawn: no items, status `closed`.
    pub closed: bool,
    /// Set for an applied admin command (no draw): its reply, for repeats of its message_id.
    pub admin: Option<Arc<AdminApplied>>,
}

impl Outcome {
    /// `won` when at least one item was drawn, `empty` when the pool had nothing left,
    /// `closed` when the pool was closed; `applied` for an admin command.
    pub fn status(&self) -> &'static str {
        if self.admin.is_some() {
            "applied"
        } else if self.closed {
            "closed"
        } else if self.items.is_empty() {
            "empty"
        } else {
            "won"
        }
    }
}

/// What the engine does with an admin command.
#[derive(Debug)]
pub enum AdminResult {
    /// Applied: its outcome, whose `admin` holds the reply.
    Applied(Arc<Outcome>),
    /// Its message_id is in the window: the first request's outcome (nothing applied).
    Repeat(Arc<Outcome>),
    /// Refused by a rule: the reason (nothing changed, no record written). Not remembered: a
    /// retry with the same message_id is checked again.
    Rejected(String),
}

impl AdminResult {
    /// Applied or repeated: the outcome; rejected: the reason.
    pub fn into_result(self) -> Result<Arc<Outcome>, String> {
        match self {
            AdminResult::Applied(outcome) | AdminResult::Repeat(outcome) => Ok(outcome),
            AdminResult::Rejected(reason) => Err(reason),
        }
    }
}

/// One pool with the names the engine hands out without allocating.
#[derive(Clone, Debug)]
pub struct PoolSlot {
    pub pool: Pool,
    pub id: Arc<str>,
    pub names: Arc<[Arc<str>]>,
    /// What draws never change, shared with snapshot images: (weight, initial). Only admin
    /// commands change it, and they replace it (`refresh`), so a captured image keeps its own.
    pub statics: Arc<[(Option<u64>, Option<u64>)]>,
    /// Closed by `close_pool`: draws get status `closed` and draw nothing.
    pub closed: bool,
}

impl PoolSlot {
    pub fn new(pool: Pool) -> PoolSlot {
        let id: Arc<str> = Arc::from(pool.id());
        let mut slot = PoolSlot {
            pool,
            id,
            names: Arc::from(Vec::new()),
            statics: Arc::from(Vec::new()),
            closed: false,
        };
        slot.refresh();
        slot
    }

    /// Rebuilds the shared names and statics from the pool, after an admin command.
    fn refresh(&mut self) {
        self.names = self
            .pool
            .items()
            .iter()
            .map(|i| Arc::from(&*i.id))
            .collect();
        self.statics = self
            .pool
            .items()
            .iter()
            .map(|i| (i.weight, i.stocked))
            .collect();
    }

    /// The pool as `inspect` and admin replies show it (state order).
    pub fn view(&self) -> PoolView {
        PoolView {
            id: self.id.to_string(),
            mode: self.pool.mode(),
            closed: self.closed,
            items: self.pool.items().iter().map(ItemView::of).collect(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("seed of pool {pool:?} at index {index}, expected index {expected}")]
    SeedIndex {
        pool: String,
        index: u32,
        expected: u32,
    },
    #[error("pool {0:?} seeded twice")]
    SeedTwice(String),
    #[error("draw of request {request_id} names pool index {pool_index}, which does not exist")]
    UnknownPool { request_id: u64, pool_index: u32 },
    #[error("request {request_id} drawn after request {last}: IDs must increase")]
    IdOrder { request_id: u64, last: u64 },
    #[error("request {request_id} drawn with {items} items for count {count}")]
    ItemCount {
        request_id: u64,
        items: usize,
        count: u32,
    },
    #[error("message_id of request {request_id} was already drawn by request {first}")]
    DrawnTwice { request_id: u64, first: u64 },
    #[error("request {0} is above the reserved ID range")]
    Unreserved(u64),
    #[error("epoch {number} begins after epoch {last}: epoch numbers must increase")]
    EpochOrder { number: u64, last: u64 },
    #[error("request {0} is drawn before any epoch record")]
    NoEpoch(u64),
    #[error("{0}")]
    Pool(#[from] PoolError),
    #[error("draw of request {request_id} on closed pool {pool:?} has items")]
    ClosedDraw { request_id: u64, pool: String },
    #[error("admin command of request {request_id} does not apply: {reason}")]
    Admin { request_id: u64, reason: String },
}

/// Input of one live draw.
pub struct DrawInput<'a> {
    pub request_id: u64,
    pub message_id: Option<&'a str>,
    pub key: Option<MessageKey>,
    pub pool_index: u32,
    pub user: &'a str,
    pub count: u32,
}

#[derive(Clone, Debug)]
pub struct State {
    pub pools: Vec<PoolSlot>,
    by_id: HashMap<String, u32>,
    /// Drawn requests by `message_id` (admission keeps the same keys in the same order).
    pub window: Window<Arc<Outcome>>,
    /// Applied admin commands by `message_id`, with their replies; the same capacity as
    /// `window`, but apart from it: admission never sees a command's key (only the engine
    /// knows whether a command applies), so keeping commands out of `window` keeps admission's
    /// window and the engine's in step (a repeat admission recognised is always still here).
    pub admin_window: Window<Arc<Outcome>>,
    /// Highest request ID covered by a durable reservation: IDs up to it may have been given.
    pub reserved_ids: u64,
    /// Highest request ID drawn.
    pub last_drawn_id: u64,
    /// Last WAL batch applied.
    pub seq: u64,
    /// The draw epoch of the last `Epoch` record (src/epoch.rs); `None` before the first.
    pub epoch: Option<EpochState>,
    scratch: Vec<u32>,
}

impl State {
    pub fn new(dedupe_window: usize) -> State {
        State {
            pools: Vec::new(),
            by_id: HashMap::new(),
            window: Window::new(dedupe_window),
            admin_window: Window::sparse(dedupe_window),
            reserved_ids: 0,
            last_drawn_id: 0,
            seq: 0,
            epoch: None,
            scratch: Vec::with_capacity(crate::record::COUNT_MAX as usize),
        }
    }

    pub fn pool_index(&self, id: &str) -> Option<u32> {
        self.by_id.get(id).copied()
    }

    pub fn pool(&self, index: u32) -> Option<&PoolSlot> {
        self.pools.get(index as usize)
    }

    /// Adds a pool at the next index.
    pub fn add_pool(&mut self, pool: Pool) -> Result<u32, StateError> {
        if self.by_id.contains_key(pool.id()) {
            return Err(StateError::SeedTwice(pool.id().to_string()));
        }
        let index = self.pools.len() as u32;
        self.by_id.insert(pool.id().to_string(), index);
        self.pools.push(PoolSlot::new(pool));
        Ok(index)
    }

    /// The record that seeds `pool` at the next index.
    pub fn seed_record(&self, pool: &PoolSeed) -> Record {
        Record::Seed {
            pool_index: self.pools.len() as u32,
            pool: pool.clone(),
        }
    }

    /// Replays one record read from the WAL.
    pub fn apply(&mut self, record: &Record) -> Result<(), StateError> {
        match record {
            Record::Seed { pool_index, pool } => {
                let expected = self.pools.len() as u32;
                if *pool_index != expected {
                    return Err(StateError::SeedIndex {
                        pool: pool.id.clone(),
                        index: *pool_index,
                        expected,
                    });
                }
                let pool = Pool::seed(pool)?;
                self.add_pool(pool)?;
            }
            Record::Reserve { ids_up_to } => {
                self.reserved_ids = self.reserved_ids.max(*ids_up_to);
            }
            Record::Epoch(epoch) => {
                let last = self.epoch.as_ref().map_or(0, |e| e.number);
                if epoch.number <= last {
                    return Err(StateError::EpochOrder {
                        number: epoch.number,
                        last,
                    });
                }
                self.epoch = Some(EpochState::new(
                    epoch.number,
                    epoch.secret,
                    epoch.commitment,
                    0,
                ));
            }
            Record::Draw(draw) => {
                if draw.request_id > self.reserved_ids {
                    return Err(StateError::Unreserved(draw.request_id));
                }
                let Some(slot) = self.pools.get_mut(draw.pool_index as usize) else {
                    return Err(StateError::UnknownPool {
                        request_id: draw.request_id,
                        pool_index: draw.pool_index,
                    });
                };
                if draw.items.len() > draw.count as usize {
                    return Err(StateError::ItemCount {
                        request_id: draw.request_id,
                        items: draw.items.len(),
                        count: draw.count,
                    });
                }
                let closed = slot.closed;
                if closed && !draw.items.is_empty() {
                    return Err(StateError::ClosedDraw {
                        request_id: draw.request_id,
                        pool: slot.id.to_string(),
                    });
                }
                for item in &draw.items {
                    slot.pool.apply_issue(*item)?;
                }
                let key = draw.message_id.as_deref().map(message_key);
                let outcome = self.outcome(
                    draw.request_id,
                    draw.pool_index,
                    &draw.user,
                    draw.count,
                    &draw.items,
                    closed,
                );
                self.commit_draw(key, outcome)?;
            }
            Record::Admin(admin) => {
                if admin.request_id > self.reserved_ids {
                    return Err(StateError::Unreserved(admin.request_id));
                }
                self.apply_admin(admin)?;
            }
        }
        Ok(())
    }

    /// Checks a command against the current state with the configuration's rules; the change
    /// by index, or the reason it is rejected (naming the rule).
    pub fn check_admin(&self, command: &AdminCommand) -> Result<AdminOp, String> {
        let find_pool = |id: &str| {
            self.pool_index(id)
                .ok_or_else(|| format!("unknown pool {:?}", crate::seed::shorten(id)))
        };
        let find_item = |pool_index: u32, id: &str| {
            let slot = &self.pools[pool_index as usize];
            slot.pool
                .items()
                .iter()
                .position(|i| i.id == id)
                .map(|i| i as u32)
                .ok_or_else(|| {
                    format!(
                        "pool {:?} has no item {:?}",
                        slot.id,
                        crate::seed::shorten(id)
                    )
                })
        };
        let op = match command {
            AdminCommand::Restock { pool, item, add } => {
                if *add == 0 || *add > crate::limits::QUANTITY_MAX {
                    return Err(format!(
                        "add must be between 1 and {} (2^40), got {add}",
                        crate::limits::QUANTITY_MAX
                    ));
                }
                let pool_index = find_pool(pool)?;
                AdminOp::Restock {
                    pool_index,
                    item_index: find_item(pool_index, item)?,
                    add: *add,
                }
            }
            AdminCommand::SetQuantity {
                pool,
                item,
                quantity,
            } => {
                let value = i64::try_from(*quantity).unwrap_or(i64::MAX);
                crate::seed::check_quantity(value).map_err(|e| e.to_string())?;
                let pool_index = find_pool(pool)?;
                AdminOp::SetQuantity {
                    pool_index,
                    item_index: find_item(pool_index, item)?,
                    quantity: *quantity,
                }
            }
            AdminCommand::SetWeight { pool, item, weight } => {
                let pool_index = find_pool(pool)?;
                let value = i64::try_from(*weight).unwrap_or(i64::MAX);
                crate::seed::check_weight(self.mode(pool_index), Some(value))
                    .map_err(|e| e.to_string())?;
                AdminOp::SetWeight {
                    pool_index,
                    item_index: find_item(pool_index, item)?,
                    weight: *weight,
                }
            }
            AdminCommand::AddItem {
                pool,
                item,
                quantity,
                weight,
            } => {
                let pool_index = find_pool(pool)?;
                let mode = self.mode(pool_index);
                let to_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
                let seed =
                    crate::seed::item_seed(mode, item, quantity.map(to_i64), weight.map(to_i64))
                        .map_err(|(field, e)| format!("{}: {e}", field.key()))?;
                AdminOp::AddItem {
                    pool_index,
                    item: seed,
                }
            }
            AdminCommand::AddPool { pool } => {
                crate::seed::check_pool(pool).map_err(|(index, e)| match index {
                    Some(i) => format!("items[{i}]: {e}"),
                    None => e.to_string(),
                })?;
                if self.pool_index(&pool.id).is_some() {
                    return Err(format!(
                        "pool {:?} already exists",
                        crate::seed::shorten(&pool.id)
                    ));
                }
                AdminOp::AddPool {
                    pool_index: self.pools.len() as u32,
                    pool: pool.clone(),
                }
            }
            AdminCommand::ClosePool { pool } => AdminOp::ClosePool {
                pool_index: find_pool(pool)?,
            },
            AdminCommand::OpenPool { pool } => AdminOp::OpenPool {
                pool_index: find_pool(pool)?,
            },
        };
        self.check_op(&op).map_err(|e| e.to_string())?;
        Ok(op)
    }

    /// The state-dependent checks of a change (pool and item exist, stock arithmetic,
    /// modes), shared by live commands and replay.
    fn check_op(&self, op: &AdminOp) -> Result<(), PoolError> {
        let slot = |index: u32| {
            self.pools
                .get(index as usize)
                .ok_or_else(|| PoolError::Invalid(format!("no pool with index {index}")))
        };
        match op {
            AdminOp::Restock {
                pool_index,
                item_index,
                add,
            } => slot(*pool_index)?
                .pool
                .check_restock(*item_index, *add)
                .map(|_| ()),
            AdminOp::SetQuantity {
                pool_index,
                item_index,
                quantity,
            } => slot(*pool_index)?
                .pool
                .check_set_quantity(*item_index, *quantity),
            AdminOp::SetWeight {
                pool_index,
                item_index,
                weight,
            } => slot(*pool_index)?
                .pool
                .check_set_weight(*item_index, *weight),
            AdminOp::AddItem { pool_index, item } => slot(*pool_index)?.pool.check_add_item(item),
            AdminOp::AddPool { pool_index, pool } => {
                if *pool_index as usize != self.pools.len() {
                    return Err(PoolError::Invalid(format!(
                        "add_pool at index {pool_index}, expected {}",
                        self.pools.len()
                    )));
                }
                if self.pool_index(&pool.id).is_some() {
                    return Err(PoolError::Invalid(format!("pool {:?} exists", pool.id)));
                }
                crate::seed::check_pool(pool).map_err(|(_, e)| PoolError::Invalid(e.to_string()))
            }
            AdminOp::ClosePool { pool_index } | AdminOp::OpenPool { pool_index } => {
                slot(*pool_index).map(|_| ())
            }
        }
    }

    /// Applies one admin command live: a message_id already in the window is a repeat (the
    /// first outcome); else checks it, appends its framed record to `wal`, applies it through
    /// `apply_admin` (the replay path). The caller lets the outcome be seen only once `wal` is
    /// durable.
    ///
    /// Repeats are caught here, by the state's own window, rather than by admission: a
    /// rejected command leaves no trace, so admission cannot know a message_id for good
    /// before the engine has decided.
    pub fn admin(
        &mut self,
        request_id: u64,
        message_id: Option<&str>,
        command: &AdminCommand,
        wal: &mut Vec<u8>,
    ) -> Result<AdminResult, StateError> {
        if let Some(first) = message_id.and_then(|m| self.admin_window.get(&message_key(m))) {
            return Ok(AdminResult::Repeat(first.clone()));
        }
        let op = match self.check_admin(command) {
            Ok(op) => op,
            Err(reason) => return Ok(AdminResult::Rejected(reason)),
        };
        let record = AdminRecord {
            request_id,
            message_id: message_id.map(str::to_string),
            op,
        };
        let at = wal.len();
        crate::record::encode_admin(wal, &record);
        // Pair assertion (commands are rare: release builds too).
        let (back, used) = crate::record::decode(&wal[at..]).expect("own record decodes");
        assert_eq!(used, wal.len() - at);
        assert_eq!(back, Record::Admin(record.clone()));
        self.apply_admin(&record).map(AdminResult::Applied)
    }

    /// Applies an admin record (live after `admin`'s checks, or on replay): changes the pool,
    /// asserts its accounting, records the outcome under the command's message_id.
    pub fn apply_admin(&mut self, record: &AdminRecord) -> Result<Arc<Outcome>, StateError> {
        let request_id = record.request_id;
        if request_id <= self.last_drawn_id {
            return Err(StateError::IdOrder {
                request_id,
                last: self.last_drawn_id,
            });
        }
        let key = record.message_id.as_deref().map(message_key);
        if let Some(key) = key
            && let Some(first) = self.admin_window.get(&key)
        {
            return Err(StateError::DrawnTwice {
                request_id,
                first: first.request_id,
            });
        }
        let bad = |e: PoolError| StateError::Admin {
            request_id,
            reason: e.to_string(),
        };
        self.check_op(&record.op).map_err(bad)?;
        let pool_index = record.op.pool_index();
        let mut changed_item = None;
        match &record.op {
            AdminOp::Restock {
                item_index, add, ..
            } => {
                let slot = &mut self.pools[pool_index as usize];
                slot.pool.restock(*item_index, *add).map_err(bad)?;
                changed_item = Some(*item_index);
            }
            AdminOp::SetQuantity {
                item_index,
                quantity,
                ..
            } => {
                let slot = &mut self.pools[pool_index as usize];
                slot.pool
                    .set_quantity(*item_index, *quantity)
                    .map_err(bad)?;
                changed_item = Some(*item_index);
            }
            AdminOp::SetWeight {
                item_index, weight, ..
            } => {
                let slot = &mut self.pools[pool_index as usize];
                slot.pool.set_weight(*item_index, *weight).map_err(bad)?;
                changed_item = Some(*item_index);
            }
            AdminOp::AddItem { item, .. } => {
                let slot = &mut self.pools[pool_index as usize];
                changed_item = Some(slot.pool.add_item(item).map_err(bad)?);
            }
            AdminOp::AddPool { pool, .. } => {
                let pool = Pool::seed(pool).map_err(bad)?;
                let index = self.add_pool(pool)?;
                assert_eq!(index, pool_index);
            }
            AdminOp::ClosePool { .. } => self.pools[pool_index as usize].closed = true,
            AdminOp::OpenPool { .. } => self.pools[pool_index as usize].closed = false,
        }
        let slot = &mut self.pools[pool_index as usize];
        slot.refresh();
        slot.pool.assert_conserved();
        let op = record.op.name();
        let reply = match changed_item {
            Some(index) => {
                let item = ItemView::of(&slot.pool.items()[index as usize]);
                applied_reply(request_id, op, &slot.id, Some(item), None)
            }
            None => {
                let view = slot.view();
                applied_reply(request_id, op, &slot.id, None, Some(view))
            }
        };
        let outcome = Arc::new(Outcome {
            request_id,
            pool: slot.id.clone(),
            user: Arc::from(""),
            count: 0,
            items: Vec::new(),
            closed: false,
            admin: Some(Arc::new(AdminApplied {
                op: op.to_string(),
                reply,
            })),
        });
        self.last_drawn_id = request_id;
        if let Some(key) = key {
            let inserted = self.admin_window.try_insert(key, outcome.clone());
            assert!(inserted, "admin key checked above");
        }
        Ok(outcome)
    }

    /// Draws one request live. Appends the framed WAL record to `wal` and returns the outcome.
    /// The caller must only let the outcome be seen once `wal` is durable.
    pub fn draw(
        &mut self,
        input: &DrawInput<'_>,
        rng: &mut DrawRng,
        wal: &mut Vec<u8>,
    ) -> Result<Arc<Outcome>, StateError> {
        let pool_index = input.pool_index;
        let Some(slot) = self.pools.get_mut(pool_index as usize) else {
            return Err(StateError::UnknownPool {
                request_id: input.request_id,
                pool_index,
            });
        };
        if input.request_id <= self.last_drawn_id {
            return Err(StateError::IdOrder {
                request_id: input.request_id,
                last: self.last_drawn_id,
            });
        }
        // A key already in the window is caught by `commit_draw`; the engine checks for
        // repeats before it draws, so that error is an invariant violation, not a path.
        let mut items = std::mem::take(&mut self.scratch);
        items.clear();
        let closed = slot.closed;
        if !closed {
            slot.pool.draw(input.count, rng, &mut items);
        }
        let record = DrawRef {
            request_id: input.request_id,
            message_id: input.message_id,
            pool_index,
            user: input.user,
            count: input.count,
            items: &items,
        };
        let at = wal.len();
        crate::record::encode_draw(wal, &record);
        if cfg!(debug_assertions) {
            // Pair assertion: what we write reads back as what we drew.
            let (back, used) = crate::record::decode(&wal[at..]).expect("own record decodes");
            assert_eq!(used, wal.len() - at);
            assert_eq!(back, Record::Draw(record.to_owned()));
        }
        let outcome = self.outcome(
            input.request_id,
            pool_index,
            input.user,
            input.count,
            &items,
            closed,
        );
        self.scratch = items;
        self.commit_draw(input.key, outcome.clone())?;
        Ok(outcome)
    }

    /// Audit: re-derives a recorded draw from the current epoch's secret and the state before
    /// it, with `apply`'s checks and bookkeeping; returns the re-derived items, which the state
    /// now follows (the caller compares them with the record's).
    pub fn redraw(&mut self, draw: &DrawRecord) -> Result<Vec<u32>, StateError> {
        if draw.request_id > self.reserved_ids {
            return Err(StateError::Unreserved(draw.request_id));
        }
        let Some(epoch) = &self.epoch else {
            return Err(StateError::NoEpoch(draw.request_id));
        };
        let mut rng = epoch.key.stream(draw.request_id);
        let Some(slot) = self.pools.get_mut(draw.pool_index as usize) else {
            return Err(StateError::UnknownPool {
                request_id: draw.request_id,
                pool_index: draw.pool_index,
            });
        };
        if draw.items.len() > draw.count as usize {
            return Err(StateError::ItemCount {
                request_id: draw.request_id,
                items: draw.items.len(),
                count: draw.count,
            });
        }
        // A closed pool draws nothing and consumes no words of the stream.
        let closed = slot.closed;
        if closed && !draw.items.is_empty() {
            return Err(StateError::ClosedDraw {
                request_id: draw.request_id,
                pool: slot.id.to_string(),
            });
        }
        let mut items = Vec::with_capacity(draw.count as usize);
        if !closed {
            slot.pool.draw(draw.count, &mut rng, &mut items);
        }
        let key = draw.message_id.as_deref().map(message_key);
        let outcome = self.outcome(
            draw.request_id,
            draw.pool_index,
            &draw.user,
            draw.count,
            &items,
            closed,
        );
        self.commit_draw(key, outcome)?;
        Ok(items)
    }

    fn outcome(
        &self,
        request_id: u64,
        pool_index: u32,
        user: &str,
        count: u32,
        items: &[u32],
        closed: bool,
    ) -> Arc<Outcome> {
        let slot = &self.pools[pool_index as usize];
        Arc::new(Outcome {
            request_id,
            pool: slot.id.clone(),
            user: Arc::from(user),
            count,
            items: items
                .iter()
                .map(|i| slot.names[*i as usize].clone())
                .collect(),
            closed,
            admin: None,
        })
    }

    fn commit_draw(
        &mut self,
        key: Option<MessageKey>,
        outcome: Arc<Outcome>,
    ) -> Result<(), StateError> {
        if outcome.request_id <= self.last_drawn_id {
            return Err(StateError::IdOrder {
                request_id: outcome.request_id,
                last: self.last_drawn_id,
            });
        }
        self.last_drawn_id = outcome.request_id;
        if let Some(epoch) = &mut self.epoch {
            epoch.draws += 1;
        }
        if let Some(key) = key {
            let request_id = outcome.request_id;
            if !self.window.try_insert(key, outcome) {
                return Err(StateError::DrawnTwice {
                    request_id,
                    first: self.window.get(&key).expect("present").request_id,
                });
            }
        }
        Ok(())
    }

    /// Asserts conservation in every pool (O(pools)); the engine calls it once per batch.
    pub fn assert_conserved(&self) {
        for slot in &self.pools {
            slot.pool.assert_conserved();
        }
    }

    /// Sum over limited items of (initial, remaining, issued); conservation holds when
    /// initial == remaining + issued.
    pub fn conservation(&self) -> Vec<(String, u64, u64, u64)> {
        let mut out = Vec::new();
        for slot in &self.pools {
            for item in slot.pool.items() {
                if let (Some(initial), Some(q)) = (item.stocked, item.quantity) {
                    out.push((format!("{}/{}", slot.id, item.id), initial, q, item.issued));
                }
            }
        }
        out
    }

    /// Pool items, for inspect and snapshots.
    pub fn items(&self, index: u32) -> &[Item] {
        self.pools[index as usize].pool.items()
    }

    pub fn mode(&self, index: u32) -> Mode {
        self.pools[index as usize].pool.mode()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::AdminCommand as C;
    use crate::record::decode;
    use rand::SeedableRng;

    fn base() -> State {
        let mut state = State::new(64);
        state.reserved_ids = 1_000;
        for seed in [
            PoolSeed::from_parts(
                "default",
                Mode::ByQuantity,
                &[
                    ("gold".into(), Some(2), None),
                    ("silver".into(), Some(5), None),
                ],
            ),
            PoolSeed::from_parts(
                "spin",
                Mode::ByWeight,
                &[
                    ("car".into(), Some(1), Some(1)),
                    ("try".into(), None, Some(9)),
                ],
            ),
        ] {
            let record = state.seed_record(&seed);
            state.apply(&record).unwrap();
        }
        state
    }

    /// Replays `wal` (framed records) onto `state`.
    fn replay(state: &mut State, wal: &[u8]) {
        let mut at = 0;
        while at < wal.len() {
            let (record, used) = decode(&wal[at..]).unwrap();
            state.apply(&record).unwrap();
            at += used;
        }
    }

    fn views(state: &State) -> Vec<PoolView> {
        state.pools.iter().map(PoolSlot::view).collect()
    }

    fn draw(state: &mut State, id: u64, mid: &str, pool: u32, wal: &mut Vec<u8>) -> Arc<Outcome> {
        let mut rng = DrawRng::seed_from_u64(id);
        state
            .draw(
                &DrawInput {
                    request_id: id,
                    message_id: Some(mid),
                    key: Some(message_key(mid)),
                    pool_index: pool,
                    user: "u",
                    count: 3,
                },
                &mut rng,
                wal,
            )
            .unwrap()
    }

    #[test]
    fn every_op_applies_live_and_replays_to_the_same_state() {
        let mut live = base();
        let mut replayed = live.clone();
        let mut wal = Vec::new();
        let mut id = 0;
        let mut next = || {
            id += 1;
            id
        };
        draw(&mut live, next(), "d1", 0, &mut wal);
        let commands = [
            C::Restock {
                pool: "default".into(),
                item: "gold".into(),
                add: 10,
            },
            C::SetQuantity {
                pool: "default".into(),
                item: "silver".into(),
                quantity: 1,
            },
            C::SetWeight {
                pool: "spin".into(),
                item: "car".into(),
                weight: 50,
            },
            C::AddItem {
                pool: "spin".into(),
                item: "bike".into(),
                quantity: Some(4),
                weight: Some(3),
            },
            C::AddItem {
                pool: "spin".into(),
                item: "hat".into(),
                quantity: None,
                weight: Some(3),
            },
            C::AddItem {
                pool: "default".into(),
                item: "plat".into(),
                quantity: Some(2),
                weight: None,
            },
            C::AddPool {
                pool: PoolSeed::from_parts(
                    "xmas",
                    Mode::ByQuantity,
                    &[("tree".into(), Some(3), None)],
                ),
            },
            C::ClosePool {
                pool: "default".into(),
            },
        ];
        for (n, command) in commands.iter().enumerate() {
            let outcome = live
                .admin(next(), Some(&format!("c{n}")), command, &mut wal)
                .unwrap()
                .into_result()
                .unwrap_or_else(|e| panic!("{command:?}: {e}"));
            let reply: serde_json::Value =
                serde_json::from_str(&outcome.admin.as_ref().unwrap().reply).unwrap();
            assert_eq!(reply["status"], "applied");
            assert_eq!(reply["op"], command.op());
            assert_eq!(reply["request_id"], outcome.request_id);
            draw(&mut live, next(), &format!("d-after-{n}"), 1, &mut wal);
        }
        let gold = &live.items(0)[0];
        assert_eq!(gold.quantity.unwrap() + gold.issued, gold.stocked.unwrap());
        assert_eq!(live.items(0)[1].quantity, Some(1));
        assert_eq!(live.items(0)[2].id, "plat");
        assert_eq!(live.items(1)[1].weight, Some(9));
        assert_eq!(live.items(1)[0].weight, Some(50));
        assert_eq!(live.items(1).len(), 4);
        assert_eq!(live.pool_index("xmas"), Some(2));
        // The closed pool draws nothing: status closed, an ID, a record.
        let closed = draw(&mut live, next(), "on-closed", 0, &mut wal);
        assert_eq!((closed.status(), closed.items.len()), ("closed", 0));
        live.admin(
            next(),
            Some("reopen"),
            &C::OpenPool {
                pool: "default".into(),
            },
            &mut wal,
        )
        .unwrap()
        .into_result()
        .unwrap();
        // A repeat of a command's message_id: the first outcome, nothing applied or written.
        let before = (views(&live), wal.len());
        let again = live
            .admin(next(), Some("c0"), &commands[0], &mut wal)
            .unwrap();
        let AdminResult::Repeat(first) = again else {
            panic!("{again:?}")
        };
        assert_eq!(first.admin.as_ref().unwrap().op, "restock");
        assert_eq!((views(&live), wal.len()), before);
        let open = draw(&mut live, next(), "after-open", 0, &mut wal);
        assert_eq!(open.status(), "won");
        // A repeat after reopening still answers closed.
        assert_eq!(
            live.window.get(&message_key("on-closed")).unwrap().status(),
            "closed"
        );

        replay(&mut replayed, &wal);
        assert_eq!(views(&replayed), views(&live));
        assert_eq!(replayed.last_drawn_id, live.last_drawn_id);
        let entries = |s: &State| {
            s.window
                .iter()
                .map(|(k, v)| (k, (**v).clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(entries(&replayed), entries(&live));
        live.assert_conserved();
        replayed.assert_conserved();

        // Through a snapshot too: the same pools, window, closed flags and replies.
        let image = crate::snapshot::Image::capture(&live);
        let back = crate::snapshot::decode(&crate::snapshot::encode(&image), 64).unwrap();
        assert_eq!(views(&back), views(&live));
        assert_eq!(entries(&back), entries(&live));
    }

    #[test]
    fn every_rule_rejects_and_changes_nothing() {
        let state = base();
        let cases = [
            (
                C::Restock {
                    pool: "nope".into(),
                    item: "gold".into(),
                    add: 1,
                },
                "unknown pool",
            ),
            (
                C::Restock {
                    pool: "default".into(),
                    item: "nope".into(),
                    add: 1,
                },
                "has no item",
            ),
            (
                C::Restock {
                    pool: "default".into(),
                    item: "gold".into(),
                    add: 0,
                },
                "between 1 and",
            ),
            (
                C::Restock {
                    pool: "default".into(),
                    item: "gold".into(),
                    add: (1 << 40) + 1,
                },
                "between 1 and",
            ),
            (
                C::Restock {
                    pool: "default".into(),
                    item: "gold".into(),
                    add: 1 << 40,
                },
                "exceed",
            ),
            (
                C::Restock {
                    pool: "spin".into(),
                    item: "try".into(),
                    add: 1,
                },
                "unlimited",
            ),
            (
                C::SetQuantity {
                    pool: "default".into(),
                    item: "gold".into(),
                    quantity: (1 << 40) + 1,
                },
                "quantity must be between 0",
            ),
            (
                C::SetQuantity {
                    pool: "spin".into(),
                    item: "try".into(),
                    quantity: 1,
                },
                "unlimited",
            ),
            (
                C::SetWeight {
                    pool: "default".into(),
                    item: "gold".into(),
                    weight: 2,
                },
                "not allowed in a by_quantity",
            ),
            (
                C::SetWeight {
                    pool: "spin".into(),
                    item: "car".into(),
                    weight: 0,
                },
                "greater than 0",
            ),
            (
                C::SetWeight {
                    pool: "spin".into(),
                    item: "car".into(),
                    weight: (1 << 32) + 1,
                },
                "between 1 and",
            ),
            (
                C::AddItem {
                    pool: "default".into(),
                    item: "gold".into(),
                    quantity: Some(1),
                    weight: None,
                },
                "already has an item",
            ),
            (
                C::AddItem {
                    pool: "default".into(),
                    item: "x".into(),
                    quantity: None,
                    weight: None,
                },
                "unlimited items",
            ),
            (
                C::AddItem {
                    pool: "default".into(),
                    item: "x".into(),
                    quantity: Some(1),
                    weight: Some(1),
                },
                "weight is not allowed",
            ),
            (
                C::AddItem {
                    pool: "spin".into(),
                    item: "x".into(),
                    quantity: Some(1),
                    weight: None,
                },
                "missing weight",
            ),
            (
                C::AddItem {
                    pool: "spin".into(),
                    item: "".into(),
                    quantity: Some(1),
                    weight: Some(1),
                },
                "must not be empty",
            ),
            (
                C::AddItem {
                    pool: "spin".into(),
                    item: "x".repeat(129),
                    quantity: Some(1),
                    weight: Some(1),
                },
                "bytes long",
            ),
            (
                C::AddPool {
                    pool: PoolSeed::from_parts(
                        "default",
                        Mode::ByQuantity,
                        &[("a".into(), Some(1), None)],
                    ),
                },
                "already exists",
            ),
            (
                C::AddPool {
                    pool: PoolSeed::from_parts("p", Mode::ByQuantity, &[]),
                },
                "no items",
            ),
            (
                C::AddPool {
                    pool: PoolSeed::from_parts("p", Mode::ByQuantity, &[("a".into(), None, None)]),
                },
                "items[0]",
            ),
            (
                C::AddPool {
                    pool: PoolSeed::from_parts(
                        "p",
                        Mode::ByWeight,
                        &[
                            ("a".into(), Some(1), Some(1)),
                            ("a".into(), Some(1), Some(1)),
                        ],
                    ),
                },
                "duplicate item id",
            ),
            (
                C::ClosePool {
                    pool: "nope".into(),
                },
                "unknown pool",
            ),
            (
                C::OpenPool {
                    pool: "nope".into(),
                },
                "unknown pool",
            ),
        ];
        for (command, want) in cases {
            let mut state = state.clone();
            let mut wal = Vec::new();
            let reason = state
                .admin(1, Some("m"), &command, &mut wal)
                .unwrap()
                .into_result()
                .unwrap_err();
            assert!(reason.contains(want), "{command:?}: {reason}");
            assert!(wal.is_empty(), "{command:?} wrote a record");
            assert_eq!(views(&state), views(&base()));
            assert!(state.window.is_empty());
            assert_eq!(state.last_drawn_id, 0);
        }
    }

    #[test]
    fn replay_refuses_a_record_that_does_not_apply() {
        let mut state = base();
        let bad = [
            AdminOp::Restock {
                pool_index: 9,
                item_index: 0,
                add: 1,
            },
            AdminOp::Restock {
                pool_index: 1,
                item_index: 1,
                add: 1,
            },
            AdminOp::SetWeight {
                pool_index: 0,
                item_index: 0,
                weight: 1,
            },
            AdminOp::AddPool {
                pool_index: 5,
                pool: PoolSeed::from_parts("p", Mode::ByQuantity, &[("a".into(), Some(1), None)]),
            },
        ];
        for op in bad {
            let record = Record::Admin(AdminRecord {
                request_id: 7,
                message_id: None,
                op,
            });
            assert!(
                matches!(state.apply(&record), Err(StateError::Admin { .. })),
                "{record:?}"
            );
        }
        assert_eq!(views(&state), views(&base()));
        // A draw with items on a closed pool is a corrupt log.
        state
            .apply(&Record::Admin(AdminRecord {
                request_id: 8,
                message_id: None,
                op: AdminOp::ClosePool { pool_index: 0 },
            }))
            .unwrap();
        let draw = Record::Draw(crate::record::DrawRecord {
            request_id: 9,
            message_id: None,
            pool_index: 0,
            user: String::new(),
            count: 1,
            items: vec![0],
        });
        assert!(matches!(
            state.apply(&draw),
            Err(StateError::ClosedDraw { .. })
        ));
    }
}
