//! The durable state: pools, the idempotency window and the request-ID high-water marks.
//!
//! `State` is what a snapshot holds and what WAL replay rebuilds. The engine thread owns the
//! only live instance; recovery builds one from snapshot + WAL and hands it over. Every change
//! goes through `draw` (live) or `apply` (replay), and both end in the same bookkeeping
//! (`commit_draw`), so a replayed draw changes the state exactly as the live draw did.

use crate::dedupe::{MessageKey, Window, message_key};
use crate::epoch::EpochState;
use crate::pool::{DrawRng, Item, Mode, Pool, PoolError};
use crate::record::{DrawRecord, DrawRef, Record};
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
}

impl Outcome {
    /// `won` when at least one item was drawn, `empty` when the pool had nothing left.
    pub fn status(&self) -> &'static str {
        if self.items.is_empty() {
            "empty"
        } else {
            "won"
        }
    }
}

/// One pool with the names the engine hands out without allocating.
#[derive(Clone, Debug)]
pub struct PoolSlot {
    pub pool: Pool,
    pub id: Arc<str>,
    pub names: Arc<[Arc<str>]>,
    /// What never changes after seeding, shared with snapshot images: (weight, initial).
    pub statics: Arc<[(Option<u64>, Option<u64>)]>,
}

impl PoolSlot {
    fn new(pool: Pool) -> PoolSlot {
        let id: Arc<str> = Arc::from(pool.id());
        let names: Arc<[Arc<str>]> = pool.items().iter().map(|i| Arc::from(&*i.id)).collect();
        let statics = pool.items().iter().map(|i| (i.weight, i.initial)).collect();
        PoolSlot {
            pool,
            id,
            names,
            statics,
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
    // Transparent: with `{0}` plus `#[from]` a chain printed the pool error twice.
    #[error(transparent)]
    Pool(#[from] PoolError),
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
    pub window: Window<Arc<Outcome>>,
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
                );
                self.commit_draw(key, outcome)?;
            }
        }
        Ok(())
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
        slot.pool.draw(input.count, rng, &mut items);
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
        let mut items = Vec::with_capacity(draw.count as usize);
        slot.pool.draw(draw.count, &mut rng, &mut items);
        let key = draw.message_id.as_deref().map(message_key);
        let outcome = self.outcome(
            draw.request_id,
            draw.pool_index,
            &draw.user,
            draw.count,
            &items,
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
                if let (Some(initial), Some(q)) = (item.initial, item.quantity) {
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
