//! Message bodies of the contract: parsing draw requests, building replies and results.
//!
//! Pure functions, no broker: everything a producer can send passes through `parse_request`,
//! which never panics and returns the reason a request can never be drawn. The size checks come
//! before JSON parsing, so a huge body costs nothing but its length check.

use crate::record::{COUNT_MAX, MESSAGE_ID_BYTES_MAX, USER_BYTES_MAX};
use crate::state::Outcome;
use serde::Serialize;

/// Bodies over this are rejected unparsed.
pub use crate::limits::BODY_BYTES_MAX;

/// A request that can be drawn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedRequest {
    /// Pool id (the config's first pool when the body names none).
    pub pool: String,
    pub user: String,
    pub count: u32,
}

/// Validates the `message_id` property (checked before anything else, even for repeats).
/// A `message_id` that was not valid UTF-8 reaches us decoded lossily (see the patched
/// amq-protocol-types in vendor/): it contains U+FFFD and is rejected, since distinct ids could
/// decode to the same string and be taken for repeats.
pub fn check_message_id(message_id: Option<&str>) -> Result<(), String> {
    match message_id {
        Some(m) if m.len() > MESSAGE_ID_BYTES_MAX => Err(format!(
            "message_id is {} bytes, at most {MESSAGE_ID_BYTES_MAX} allowed",
            m.len()
        )),
        Some(m) if m.contains('\u{FFFD}') => {
            Err("message_id is not valid UTF-8 (or contains U+FFFD)".into())
        }
        _ => Ok(()),
    }
}

/// Parses and validates a request body. `pool_exists` answers for the configured pools.
pub fn parse_request(
    body: &[u8],
    default_pool: &str,
    pool_exists: impl Fn(&str) -> bool,
) -> Result<ParsedRequest, String> {
    if body.len() > BODY_BYTES_MAX {
        return Err(format!(
            "body is {} bytes, at most 64 KiB ({BODY_BYTES_MAX} bytes) allowed",
            body.len()
        ));
    }
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("body is not valid JSON: {e}"))?;
    let serde_json::Value::Object(map) = value else {
        return Err("body must be a JSON object".into());
    };
    // Fields other than pool, user and count are ignored: producers may add their own.
    let pool = match map.get("pool") {
        None | Some(serde_json::Value::Null) => default_pool.to_string(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(_) => return Err("field pool must be a string".into()),
    };
    if !pool_exists(&pool) {
        return Err(format!("unknown pool {:?}", truncate(&pool, 128)));
    }
    let user = match map.get("user") {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(_) => return Err("field user must be a string".into()),
    };
    if user.len() > USER_BYTES_MAX {
        return Err(format!(
            "user is {} bytes, at most {USER_BYTES_MAX} allowed",
            user.len()
        ));
    }
    let count = match map.get("count") {
        None | Some(serde_json::Value::Null) => 1,
        Some(serde_json::Value::Number(n)) => match n.as_u64() {
            Some(c) if (1..=COUNT_MAX as u64).contains(&c) => c as u32,
            _ => {
                return Err(format!(
                    "count must be an integer from 1 to {COUNT_MAX}, got {n}"
                ));
            }
        },
        Some(_) => return Err("field count must be an integer".into()),
    };
    Ok(ParsedRequest { pool, user, count })
}

fn truncate(s: &str, bytes_max: usize) -> &str {
    if s.len() <= bytes_max {
        return s;
    }
    let mut end = bytes_max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[derive(Serialize)]
struct Accepted {
    status: &'static str,
    request_id: u64,
}

pub fn accepted_body(request_id: u64) -> Vec<u8> {
    serde_json::to_vec(&Accepted {
        status: "accepted",
        request_id,
    })
    .expect("serialises")
}

#[derive(Serialize)]
struct Rejected<'a> {
    status: &'static str,
    error: &'a str,
}

pub fn rejected_body(error: &str) -> Vec<u8> {
    serde_json::to_vec(&Rejected {
        status: "rejected",
        error,
    })
    .expect("serialises")
}

#[derive(Serialize)]
struct ResultBody<'a> {
    status: &'static str,
    request_id: u64,
    message_id: Option<&'a str>,
    pool: &'a str,
    user: &'a str,
    count: u32,
    items: Vec<&'a str>,
}

/// The result body. For a repeat, `outcome` is the first request's and `message_id` the
/// repeat's own (the same string, since repeats are known by it).
pub fn result_body(outcome: &Outcome, message_id: Option<&str>) -> Vec<u8> {
    serde_json::to_vec(&ResultBody {
        status: outcome.status(),
        request_id: outcome.request_id,
        message_id,
        pool: &outcome.pool,
        user: &outcome.user,
        count: outcome.count,
        items: outcome.items.iter().map(|s| &**s).collect(),
    })
    .expect("serialises")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn parse(body: &str) -> Result<ParsedRequest, String> {
        parse_request(body.as_bytes(), "default", |p| {
            p == "default" || p == "spin"
        })
    }

    #[test]
    fn defaults_apply() {
        assert_eq!(
            parse("{}").unwrap(),
            ParsedRequest {
                pool: "default".into(),
                user: String::new(),
                count: 1
            }
        );
        let p = parse(r#"{"pool":"spin","user":"alice","count":100,"extra":[1]}"#).unwrap();
        assert_eq!(
            (p.pool.as_str(), p.user.as_str(), p.count),
            ("spin", "alice", 100)
        );
    }

    #[test]
    fn every_bad_input_is_a_clear_error() {
        let cases = [
            ("[1,2]", "JSON object"),
            ("\"x\"", "JSON object"),
            ("not json", "not valid JSON"),
            (r#"{"pool":1}"#, "pool must be a string"),
            (r#"{"pool":"nope"}"#, "unknown pool"),
            (r#"{"user":5}"#, "user must be a string"),
            (r#"{"count":"1"}"#, "count must be an integer"),
            (r#"{"count":0}"#, "from 1 to 100"),
            (r#"{"count":101}"#, "from 1 to 100"),
            (r#"{"count":-1}"#, "from 1 to 100"),
            (r#"{"count":1.5}"#, "from 1 to 100"),
        ];
        for (body, want) in cases {
            let err = parse(body).unwrap_err();
            assert!(err.contains(want), "{body}: {err}");
        }
        let long_user = format!(r#"{{"user":"{}"}}"#, "u".repeat(257));
        assert!(parse(&long_user).unwrap_err().contains("at most 256"));
        assert!(parse(&format!(r#"{{"user":"{}"}}"#, "u".repeat(256))).is_ok());
        let huge = vec![b' '; BODY_BYTES_MAX + 1];
        assert!(
            parse_request(&huge, "default", |_| true)
                .unwrap_err()
                .contains("64")
        );
        assert!(check_message_id(Some(&"m".repeat(256))).is_err());
        assert!(check_message_id(Some(&"m".repeat(255))).is_ok());
        assert!(
            check_message_id(Some("m-\u{FFFD}"))
                .unwrap_err()
                .contains("UTF-8")
        );
    }

    #[test]
    fn result_body_matches_the_contract() {
        let outcome = Outcome {
            request_id: 42,
            pool: Arc::from("default"),
            user: Arc::from("alice"),
            count: 1,
            items: vec![Arc::from("gold")],
        };
        let v: serde_json::Value =
            serde_json::from_slice(&result_body(&outcome, Some("m-17"))).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"status": "won", "request_id": 42, "message_id": "m-17",
                "pool": "default", "user": "alice", "count": 1, "items": ["gold"]})
        );
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = parse_request(&body, "default", |_| true);
        }
    }
}
