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
    /// An admin command with a new ID (from `assign_admin`); the engine catches its repeats.
    Admin(NewId, AdminSpec),
}

/// What an admin command asks for.
#[derive(Debug, Clone)]
pub struct AdminSpec {
    pub message_id: Option<String>,
    pub command: crate::admin::AdminCommand,
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

    /// A new ID for an admin command. Its message_id is not remembered here: the engine
    /// decides (applied, repeat or rejected) and catches repeats in its own window, because a
    /// rejected command must leave no trace. Its ID is a gap when it is a repeat or rejected.
    pub async fn assign_admin(&mut self) -> Result<NewId, EngineGone> {
        let engine = self.engine.clone();
        let request_id = self.ids.next(move || wake(&engine)).await;
        self.remember(None, request_id)
    }

    pub fn assign_admin_blocking(&mut self) -> Result<NewId, EngineGone> {
        let engine = self.engine.clone();
        let request_id = self.ids.next_blocking(move || wake(&engine));
        self.remember(None, request_id)
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
            Submission::Admin(new, admin) => Command::Admin(crate::engine::AdminRequest {
                request_id: new.request_id,
                message_id: admin.message_id,
                command: admin.command,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An admission whose IDs 1..=`durable` are already reserved, and the engine's receiver.
    fn admission(durable: u64) -> (Admission<u32>, mpsc::Receiver<Command<u32>>) {
        let ids = Arc::new(IdAllocator::new(0, 16));
        ids.set_durable(durable);
        let (tx, rx) = mpsc::channel(16);
        (Admission::new(Window::new(4), ids, tx), rx)
    }

    fn spec(message_id: Option<&str>) -> DrawSpec {
        DrawSpec {
            message_id: message_id.map(str::to_string),
            pool_index: 1,
            user: "alice".into(),
            count: 2,
        }
    }

    #[test]
    fn new_requests_get_increasing_ids_and_a_repeat_gets_the_first_id() {
        let (mut a, _rx) = admission(100);
        let first = a.assign_blocking(Some("m-1")).unwrap();
        let second = a.assign_blocking(Some("m-2")).unwrap();
        let anonymous = a.assign_blocking(None).unwrap();
        assert_eq!(
            (
                first.request_id(),
                second.request_id(),
                anonymous.request_id()
            ),
            (1, 2, 3)
        );
        assert!(
            [&first, &second, &anonymous]
                .iter()
                .all(|a| matches!(a, Assigned::New(_)))
        );
        let again = a.assign_blocking(Some("m-1")).unwrap();
        assert!(matches!(again, Assigned::Repeat(_)));
        assert_eq!(
            again.request_id(),
            1,
            "a repeat meets its first request's ID"
        );
        // A repeat takes no ID: the next new request continues the sequence.
        assert_eq!(a.assign_blocking(Some("m-3")).unwrap().request_id(), 4);
        // Without a message_id there is no repeat: each is new.
        assert!(matches!(a.assign_blocking(None).unwrap(), Assigned::New(_)));
    }

    #[test]
    fn repeat_of_knows_only_keys_already_assigned() {
        let (mut a, _rx) = admission(100);
        let key = Some(message_key("m-1"));
        assert!(a.repeat_of(key).is_none());
        assert!(a.repeat_of(None).is_none());
        let _ = a.assign_blocking(Some("m-1")).unwrap();
        let repeat = a.repeat_of(key).expect("known now");
        assert_eq!(repeat.request_id, 1);
    }

    #[test]
    fn the_window_forgets_the_oldest_beyond_its_capacity() {
        let (mut a, _rx) = admission(100);
        for k in 0..5 {
            let _ = a.assign_blocking(Some(&format!("m-{k}"))).unwrap();
        }
        // Capacity 4: m-0 is gone (a new request again), m-1..m-4 are remembered.
        assert!(a.repeat_of(Some(message_key("m-0"))).is_none());
        for k in 1..5 {
            assert!(a.repeat_of(Some(message_key(&format!("m-{k}")))).is_some());
        }
    }

    #[test]
    fn submit_sends_a_draw_for_a_new_request_and_a_repeat_for_a_repeat() {
        let (mut a, mut rx) = admission(100);
        let first = a.assign_blocking(Some("m-1")).unwrap();
        a.submit_blocking(first.with_draw(spec(Some("m-1"))), 10)
            .unwrap();
        let again = a.assign_blocking(Some("m-1")).unwrap();
        let Assigned::Repeat(again) = again else {
            panic!("a repeat")
        };
        a.submit_blocking(Submission::Repeat(again), 11).unwrap();
        match rx.try_recv().unwrap() {
            Command::Draw(d) => {
                assert_eq!(d.request_id, 1);
                assert_eq!(d.message_id.as_deref(), Some("m-1"));
                assert_eq!(d.key, Some(message_key("m-1")));
                assert_eq!((d.pool_index, d.user.as_str(), d.count), (1, "alice", 2));
                assert_eq!(d.ticket, 10);
            }
            _ => panic!("a new request is a Draw"),
        }
        match rx.try_recv().unwrap() {
            Command::Repeat(r) => {
                assert_eq!(r.request_id, 1);
                assert_eq!(r.key, message_key("m-1"));
                assert_eq!(r.ticket, 11);
            }
            _ => panic!("a repeat is a Repeat"),
        }
        assert!(rx.try_recv().is_err(), "nothing else was sent");
    }

    #[test]
    fn without_an_engine_no_id_is_handed_out_and_nothing_is_submitted() {
        let (mut a, rx) = admission(1);
        let only = a.assign_blocking(Some("m-1")).unwrap();
        drop(rx);
        // ID 1 was the last reserved one; the engine that would reserve more is gone.
        assert!(matches!(a.assign_blocking(Some("m-2")), Err(EngineGone)));
        assert!(
            a.repeat_of(Some(message_key("m-2"))).is_none(),
            "no ID, not remembered"
        );
        assert!(matches!(
            a.submit_blocking(only.with_draw(spec(Some("m-1"))), 1),
            Err(EngineGone)
        ));
    }

    #[tokio::test]
    async fn assign_new_waits_for_a_reservation_then_continues() {
        let (mut a, mut rx) = admission(0);
        let ids = a.ids.clone();
        // The "engine": on the first wake, reserve IDs up to 8.
        let engine = tokio::spawn(async move {
            while let Some(command) = rx.recv().await {
                if matches!(command, Command::Wake) {
                    ids.set_durable(8);
                    break;
                }
            }
        });
        let assigned = a.assign_new(Some(message_key("m-1"))).await.unwrap();
        assert_eq!(assigned.request_id, 1);
        engine.await.unwrap();
    }
}
