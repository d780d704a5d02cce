//! A request as ingest reads it: properties, then the body. Input: lines `key=value` (the
//! properties, decoded lossily like the broker's short strings), an empty line, the body.
//! Whatever is accepted reads one way: a valid request's fields are within the contract.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rewardpool::message::{self, RequestProps};

fuzz_target!(|data: &[u8]| {
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (&data[..0], data),
    };
    let head = String::from_utf8_lossy(head);
    let mut p = RequestProps::default();
    for line in head.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = if v.len() > 255 {
            &v[..v.floor_char_boundary(255)]
        } else {
            v
        };
        match k {
            "message_id" => p.message_id = Some(v),
            "correlation_id" => p.correlation_id = Some(v),
            "reply_to" => p.reply_to = Some(v),
            "type" => p.kind = Some(v),
            "content_type" => p.content_type = Some(v),
            "content_encoding" => p.content_encoding = Some(v),
            _ => {}
        }
    }
    let own = ["rq", "res", "dead", "rq.lock"];
    if message::check_properties(&p, &own).is_err() {
        return;
    }
    if let Ok(r) =
        message::parse_request(body, "default", |pool| pool == "default" || pool == "spin")
    {
        assert!((1..=100).contains(&r.count));
        assert!(r.user.len() <= 256 && !r.user.chars().any(char::is_control));
        assert!(r.pool == "default" || r.pool == "spin");
        assert!(body.len() <= message::BODY_BYTES_MAX);
    }
});
