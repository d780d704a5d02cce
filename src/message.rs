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
/// An empty `message_id` is rejected: "no key" or "the key ''" are two readings of it, and the
/// second would make every such request a repeat of the first.
pub fn check_message_id(message_id: Option<&str>) -> Result<(), String> {
    match message_id {
        Some(m) if m.len() > MESSAGE_ID_BYTES_MAX => Err(format!(
            "message_id is {} bytes, at most {MESSAGE_ID_BYTES_MAX} allowed",
            m.len()
        )),
        Some(m) if m.contains('\u{FFFD}') => {
            Err("message_id is not valid UTF-8 (or contains U+FFFD)".into())
        }
        Some("") => Err("message_id is empty (leave it out instead)".into()),
        _ => Ok(()),
    }
}

/// The `type`s of the worker's own messages (replies, results, admin replies). A delivery that
/// carries one of them is the worker's own output routed back to it, or made to look like it:
/// never acted on.
pub const OWN_TYPES: [&str; 4] = ["accepted", "rejected", "result", "admin_result"];

/// The producer-controlled properties ingest reads, as the broker decoded them (short strings
/// that were not UTF-8 arrive decoded lossily, with U+FFFD).
#[derive(Debug, Default, Clone, Copy)]
pub struct RequestProps<'a> {
    pub message_id: Option<&'a str>,
    pub correlation_id: Option<&'a str>,
    pub reply_to: Option<&'a str>,
    pub kind: Option<&'a str>,
    pub content_type: Option<&'a str>,
    pub content_encoding: Option<&'a str>,
}

/// Whether a reply may be published to `reply_to`: not to one of the worker's own queues
/// (`own_queues`: request, result, dead-letter, admin), where it would be consumed again as a
/// request, pollute the result stream or the dead letters; not to a name that reached us
/// mangled (U+FFFD: the producer's queue has another name).
pub fn reply_allowed<Q: AsRef<str>>(reply_to: &str, own_queues: &[Q]) -> bool {
    !reply_to.is_empty()
        && !reply_to.contains('\u{FFFD}')
        && !own_queues.iter().any(|q| q.as_ref() == reply_to)
}

/// Checks every property a producer controls, before the repeat lookup and the body: the
/// `message_id`; a `correlation_id` or `reply_to` that was not UTF-8 (it would be echoed or
/// used mangled); a `reply_to` naming one of the worker's own queues; a `type` of the worker's
/// own messages; a body encoding (`content_encoding` other than identity, a charset other than
/// UTF-8) under which the bytes would read differently.
pub fn check_properties<Q: AsRef<str>>(p: &RequestProps, own_queues: &[Q]) -> Result<(), String> {
    check_message_id(p.message_id)?;
    if p.correlation_id.is_some_and(|c| c.contains('\u{FFFD}')) {
        return Err("correlation_id is not valid UTF-8 (or contains U+FFFD)".into());
    }
    if let Some(r) = p.reply_to.filter(|r| !r.is_empty()) {
        if r.contains('\u{FFFD}') {
            return Err("reply_to is not valid UTF-8 (or contains U+FFFD)".into());
        }
        if own_queues.iter().any(|q| q.as_ref() == r) {
            return Err(format!(
                "reply_to {:?} is one of the worker's own queues",
                truncate(r, 128)
            ));
        }
    }
    if let Some(k) = p.kind
        && OWN_TYPES.contains(&k)
    {
        return Err(format!(
            "type {k:?} is the type of the worker's own messages, not a request"
        ));
    }
    if let Some(e) = p.content_encoding
        && !(e.is_empty() || e.eq_ignore_ascii_case("identity"))
    {
        return Err(format!(
            "content_encoding {:?} is not supported: the body must be plain JSON",
            truncate(e, 64)
        ));
    }
    if let Some(t) = p.content_type {
        for param in t.split(';').skip(1) {
            if let Some((k, v)) = param.split_once('=')
                && k.trim().eq_ignore_ascii_case("charset")
            {
                let v = v.trim().trim_matches('"');
                if !(v.eq_ignore_ascii_case("utf-8") || v.eq_ignore_ascii_case("utf8")) {
                    return Err(format!(
                        "content_type charset {:?} is not supported: the body must be UTF-8",
                        truncate(v, 64)
                    ));
                }
            }
        }
    }
    Ok(())
}

/// A JSON value read strictly: an object with the same key twice (at any depth) is an error,
/// since parsers disagree on which one counts. Everything else is serde_json's grammar (no BOM,
/// no trailing data, UTF-8 only, no lone surrogates, nesting at most 128 deep).
pub(crate) struct Strict(pub(crate) serde_json::Value);

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Strict;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Strict, E> {
                Ok(Strict(v.into()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Strict, E> {
                Ok(Strict(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Strict, E> {
                Ok(Strict(v.into()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Strict, E> {
                Ok(Strict(
                    serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, Into::into),
                ))
            }
            fn visit_str<E>(self, v: &str) -> Result<Strict, E> {
                Ok(Strict(v.into()))
            }
            fn visit_string<E>(self, v: String) -> Result<Strict, E> {
                Ok(Strict(v.into()))
            }
            fn visit_unit<E>(self) -> Result<Strict, E> {
                Ok(Strict(serde_json::Value::Null))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Strict, A::Error> {
                let mut out = Vec::new();
                while let Some(Strict(v)) = a.next_element()? {
                    out.push(v);
                }
                Ok(Strict(out.into()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Strict, A::Error> {
                let mut out = serde_json::Map::new();
                while let Some(k) = a.next_key::<String>()? {
                    let Strict(v) = a.next_value()?;
                    if out.contains_key(&k) {
                        return Err(serde::de::Error::custom(format_args!(
                            "duplicate key {:?}",
                            truncate(&k, 64)
                        )));
                    }
                    out.insert(k, v);
                }
                Ok(Strict(out.into()))
            }
        }
        d.deserialize_any(V)
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
    let Strict(value) = serde_json::from_slice(body)
        .map_err(|e| format!("body is not valid JSON (read strictly): {e}"))?;
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
    // NUL ends the string for C readers, line breaks forge log lines: control characters
    // would make the user read differently downstream.
    if user.chars().any(|c| c.is_control()) {
        return Err("user contains a control character".into());
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

pub fn truncate(s: &str, bytes_max: usize) -> &str {
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
            closed: false,
            admin: None,
        };
        let v: serde_json::Value =
            serde_json::from_slice(&result_body(&outcome, Some("m-17"))).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"status": "won", "request_id": 42, "message_id": "m-17",
                "pool": "default", "user": "alice", "count": 1, "items": ["gold"]})
        );
    }

    /// Bodies other parsers would read differently from serde_json, or not at all: each is
    /// rejected, none is drawn.
    #[test]
    fn hostile_bodies_are_rejected() {
        let cases: [(&[u8], &str); 19] = [
            (
                br#"{"pool":"default","pool":"spin"}"#,
                "duplicate key \"pool\"",
            ),
            (br#"{"count":1,"count":100}"#, "duplicate key"),
            (br#"{"x":{"a":1,"a":2}}"#, "duplicate key"),
            (br#"{"x":[{"a":1,"a":2}]}"#, "duplicate key"),
            (b"\xEF\xBB\xBF{}", "not valid JSON"),
            (b"{\"user\":\"\xff\"}", "not valid JSON"),
            (br#"{} {}"#, "not valid JSON"),
            (br#"{}x"#, "not valid JSON"),
            (br#"{"count":1.0}"#, "from 1 to 100"),
            (br#"{"count":1e0}"#, "from 1 to 100"),
            (br#"{"count":-0}"#, "from 1 to 100"),
            (br#"{"count":18446744073709551617}"#, "from 1 to 100"),
            (br#"{"count":1e400}"#, "not valid JSON"),
            (br#"{"user":"a\u0000b"}"#, "control character"),
            (br#"{"user":"line\nforged log line"}"#, "control character"),
            (br#"{"user":"\ud800"}"#, "not valid JSON"),
            (br#"{"user":"\udc00x"}"#, "not valid JSON"),
            (b"{\"user\":\"a\x00b\"}", "not valid JSON"),
            (b"\x1f\x8b\x08\x00\x00\x00\x00\x00", "not valid JSON"),
        ];
        for (body, want) in cases {
            let err = parse_request(body, "default", |p| p == "default" || p == "spin")
                .expect_err(&String::from_utf8_lossy(body));
            assert!(
                err.contains(want),
                "{:?}: {err}",
                String::from_utf8_lossy(body)
            );
        }
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let deep = format!(r#"{{"x":{deep}}}"#);
        assert!(parse(&deep).unwrap_err().contains("recursion limit"));
        // Still fine: a surrogate pair, trailing whitespace, unicode users, the same key in
        // two different objects.
        assert_eq!(
            parse(r#"{"user":"\ud83d\ude00"}"#).unwrap().user,
            "\u{1F600}"
        );
        assert!(parse("{} \n").is_ok());
        assert!(parse(r#"{"a":{"k":1},"b":{"k":1}}"#).is_ok());
    }

    const OWN: [&str; 3] = ["rq", "res", "dead"];

    fn props<'a>() -> RequestProps<'a> {
        RequestProps::default()
    }

    /// Properties that would make the worker act on its own messages, or read a request in
    /// more than one way, are rejected; replies never go to the worker's own queues.
    #[test]
    fn hostile_properties_are_rejected() {
        let cases: Vec<(RequestProps, &str)> = vec![
            (
                RequestProps {
                    reply_to: Some("rq"),
                    ..props()
                },
                "own queues",
            ),
            (
                RequestProps {
                    reply_to: Some("res"),
                    ..props()
                },
                "own queues",
            ),
            (
                RequestProps {
                    reply_to: Some("dead"),
                    ..props()
                },
                "own queues",
            ),
            (
                RequestProps {
                    reply_to: Some("q-\u{FFFD}"),
                    ..props()
                },
                "UTF-8",
            ),
            (
                RequestProps {
                    correlation_id: Some("c-\u{FFFD}"),
                    ..props()
                },
                "UTF-8",
            ),
            (
                RequestProps {
                    message_id: Some(""),
                    ..props()
                },
                "empty",
            ),
            (
                RequestProps {
                    message_id: Some("m-\u{FFFD}"),
                    ..props()
                },
                "UTF-8",
            ),
            (
                RequestProps {
                    kind: Some("result"),
                    ..props()
                },
                "own messages",
            ),
            (
                RequestProps {
                    kind: Some("accepted"),
                    ..props()
                },
                "own messages",
            ),
            (
                RequestProps {
                    kind: Some("rejected"),
                    ..props()
                },
                "own messages",
            ),
            (
                RequestProps {
                    kind: Some("admin_result"),
                    ..props()
                },
                "own messages",
            ),
            (
                RequestProps {
                    content_encoding: Some("gzip"),
                    ..props()
                },
                "content_encoding",
            ),
            (
                RequestProps {
                    content_encoding: Some("deflate"),
                    ..props()
                },
                "content_encoding",
            ),
            (
                RequestProps {
                    content_type: Some("application/json; charset=utf-16"),
                    ..props()
                },
                "charset",
            ),
            (
                RequestProps {
                    content_type: Some("text/plain;charset=\"latin1\""),
                    ..props()
                },
                "charset",
            ),
        ];
        for (p, want) in cases {
            let err = check_properties(&p, &OWN).expect_err(&format!("{p:?}"));
            assert!(err.contains(want), "{p:?}: {err}");
        }
        for ok in [
            props(),
            RequestProps {
                reply_to: Some(""),
                ..props()
            },
            RequestProps {
                reply_to: Some("amq.rabbitmq.reply-to"),
                ..props()
            },
            RequestProps {
                kind: Some("draw"),
                ..props()
            },
            RequestProps {
                content_encoding: Some("identity"),
                ..props()
            },
            RequestProps {
                content_type: Some("application/json; charset=UTF-8"),
                ..props()
            },
            RequestProps {
                content_type: Some("application/json"),
                ..props()
            },
        ] {
            assert_eq!(check_properties(&ok, &OWN), Ok(()), "{ok:?}");
        }
        assert!(!reply_allowed("rq", &OWN));
        assert!(!reply_allowed("res", &OWN));
        assert!(!reply_allowed("x\u{FFFD}", &OWN));
        assert!(!reply_allowed("", &OWN));
        assert!(reply_allowed("my-replies", &OWN));
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = parse_request(&body, "default", |_| true);
        }
    }
}
