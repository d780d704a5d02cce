//! Admission: the front door of the engine. Gives each new request its ID and recognises
//! repeats by `message_id` before anything else.
//!
//! Ingest owns one `Admission` (it is `&mut self`: a single caller, so IDs reach the engine in
//! the order they were handed out). It keeps a window of the same size as the engine's, keyed
//! by `message_id`, holding every request it sent on — drawn or still in flight. A message
//! meets the same ID every time it comes: a repeat is sent to the engine as a `Repeat` behind
//! its first, so it completes with the first's outcome, in order, after the first is durable.
//!
//! Two steps, so a caller can reply "accepted" between them and the reply always precedes the
//! result: `repeat_of` / `assign_new` (ID, window) then `submit` (to the engine). Ingest asks
//! `repeat_of` before it parses the body, since a repeat's body is not looked at.

use crate::dedupe::{MessageKey, Window, message_key};
use crate::engine::{Command, DrawRequest, RepeatRequest};
use crate::ids::IdAllocator;
use crate::state::State;
use std::sync::Arc;
use tokio::sync::mpsc;

/// A new request's ID, handed out, not yet submitted: pass it to `submit` with its draw.
#[must_use = "an assigned request must be submitted"]
#[derive(Debug)]
pub struct NewId {
    pub request_id: u64,
    key: Option<MessageKey>,
}

/// A repeat: the first request's ID. Pass it to `submit` as it is (it draws nothing).
#[must_use = "an assigned request must be submitted"]
#[derive(Debug)]
pub struct RepeatOf {
    pub request_id: u64,
    key: MessageKey,
}

/// What admission decided: a new ID, or the ID of the request this one repeats.
#[must_use = "an assigned request must be submitted"]
#[derive(Debug)]
pub enum Assigned {
    New(NewId),
    Repeat(RepeatOf),
}

impl Assigned {
    pub fn request_id(&self) -> u64 {
        match self {
            Assigned::New(new) => new.request_id,
            Assigned::Repeat(repeat) => repeat.request_id,
        }
    }

    /// The submission: a new request draws `draw`; a repeat ignores it (drills, tests).
    pub fn with_draw(self, draw: DrawSpec) -> Submission {
        match self {
            Assigned::New(new) => Submission::New(new, draw),
            Assigned::Repeat(repeat) => Submission::Repeat(repeat),
        }
    }
}

/// What goes to the engine: a new request with what it draws, or a repeat (no draw: it is
/// completed with the first request's pool, user, count and items). No other shape exists.
#[derive(Debug)]
pub enum Submission {
    New(NewId, DrawSpec),
    Repeat(RepeatOf),
}

/// What a new request draws.
#[derive(Debug, Clone)]
pub struct DrawSpec {
    pub message_id: Option<String>,
    pub pool_index: u32,
    pub user: String,
    pub count: u32,
}

#[derive(Debug, thiserror::Error)]
#[error("the engine has stopped")]
pub struct EngineGone;

/// Asks the engine to reserve IDs; false when the engine has stopped.
fn wake<T>(engine: &mpsc::Sender<Command<T>>) -> bool {
    !matches!(
        engine.try_send(Command::Wake),
        Err(mpsc::error::TrySendError::Closed(_))
    )
}

pub struct Admission<T> {
    ids: Arc<IdAllocator>,
    window: Window<u64>,
    engine: mpsc::Sender<Command<T>>,
}

impl<T> Admission<T> {
    /// The admission window for a recovered state: the same entries in the same order.
    pub fn window_of(state: &State) -> Window<u64> {
        let mut window = Window::new(state.window.capacity());
        for (key, outcome) in state.window.iter() {
            window.insert(key, outcome.request_id);
        }
        window
    }

    pub fn new(
        window: Window<u64>,
        ids: Arc<IdAllocator>,
        engine: mpsc::Sender<Command<T>>,
    ) -> Self {
        Admission {
            ids,
            window,
            engine,
        }
    }

    /// The first request's ID if a request with this key was drawn recently or is in flight:
    /// the caller must not look at the body then. `key` is `message_key(message_id)`.
    pub fn repeat_of(&self, key: Option<MessageKey>) -> Option<RepeatOf> {
        let key = key?;
        let first = self.window.get(&key)?;
        Some(RepeatOf {
            request_id: *first,
            key,
        })
    }

    /// Hands out a new request ID for a key `repeat_of` did not know. Async: waits only if
    /// ingest outran the ID reservation.
    pub async fn assign_new(&mut self, key: Option<MessageKey>) -> Result<NewId, EngineGone> {
        let engine = self.engine.clone();
        let request_id = self.ids.next(move || wake(&engine)).await;
        self.remember(key, request_id)
    }

    /// `repeat_of`, else `assign_new`, blocking: for threads outside the runtime (drills,
    /// benchmarks, tests).
    pub fn assign_blocking(&mut self, message_id: Option<&str>) -> Result<Assigned, EngineGone> {
        let key = message_id.map(message_key);
        if let Some(repeat) = self.repeat_of(key) {
            return Ok(Assigned::Repeat(repeat));
        }
        let engine = self.engine.clone();
        let request_id = self.ids.next_blocking(move || wake(&engine));
        self.remember(key, request_id).map(Assigned::New)
    }

    /// Remembers a new request's ID (`None`: the engine is gone, no ID will come).
    fn remember(
        &mut self,
        key: Option<MessageKey>,
        request_id: Option<u64>,
    ) -> Result<NewId, EngineGone> {
        let request_id = request_id.ok_or(EngineGone)?;
        if let Some(key) = key {
            let inserted = self.window.try_insert(key, request_id);
            assert!(inserted, "a known message_id was given a new ID");
        }
        Ok(NewId { request_id, key })
    }

    /// The engine command for a submission.
    fn command(submission: Submission, ticket: T) -> Command<T> {
        match submission {
            Submission::Repeat(repeat) => Command::Repeat(RepeatRequest {
                request_id: repeat.request_id,
                key: repeat.key,
                ticket,
            }),
            Submission::New(new, draw) => Command::Draw(DrawRequest {
                request_id: new.request_id,
                message_id: draw.message_id,
                key: new.key,
                pool_index: draw.pool_index,
                user: draw.user,
                count: draw.count,
                ticket,
            }),
        }
    }

    /// Sends the request to the engine (waits while the engine's channel is full).
    pub async fn submit(&mut self, submission: Submission, ticket: T) -> Result<(), EngineGone> {
        let command = Self::command(submission, ticket);
        self.engine.send(command).await.map_err(|_| EngineGone)
    }

    pub fn submit_blocking(&mut self, submission: Submission, ticket: T) -> Result<(), EngineGone> {
        let command = Self::command(submission, ticket);
        self.engine.blocking_send(command).map_err(|_| EngineGone)
    }
}
