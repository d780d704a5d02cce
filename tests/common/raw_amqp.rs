//! A hand-rolled AMQP 0-9-1 publisher, for what lapin refuses to send: a `message_id` property
//! that is not UTF-8. It connects to the same broker as every other test helper
//! ([`crate::broker::amqp_url`]: host, port, user, password and vhost).

use crate::broker::amqp_url;
use lapin::uri::{AMQPScheme, AMQPUri};
use std::time::Duration;

/// Publishes one message over a hand-rolled AMQP 0-9-1 connection to the test broker
/// (plain `amqp://` only; confirms on), with a raw `message_id` property: lapin only sends
/// valid UTF-8 short strings, and the tests need a producer that does not.
pub fn raw_publish(queue: &str, body: &[u8], message_id: &[u8]) {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![kind];
        f.extend_from_slice(&channel.to_be_bytes());
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(payload);
        f.push(0xCE);
        f
    }
    fn method(class: u16, id: u16, args: &[u8]) -> Vec<u8> {
        let mut m = class.to_be_bytes().to_vec();
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(args);
        m
    }
    fn shortstr(s: &[u8]) -> Vec<u8> {
        let mut v = vec![s.len() as u8];
        v.extend_from_slice(s);
        v
    }
    /// Reads frames until a method frame of (class, id); returns its arguments.
    fn expect(s: &mut TcpStream, class: u16, id: u16) -> Vec<u8> {
        loop {
            let mut header = [0u8; 7];
            s.read_exact(&mut header).expect("AMQP frame header");
            let size = u32::from_be_bytes(header[3..7].try_into().unwrap()) as usize;
            let mut payload = vec![0u8; size + 1];
            s.read_exact(&mut payload).expect("AMQP frame payload");
            if header[0] != 1 {
                continue;
            }
            let got = (
                u16::from_be_bytes([payload[0], payload[1]]),
                u16::from_be_bytes([payload[2], payload[3]]),
            );
            assert!(
                got != (10, 50) && got != (20, 40),
                "the broker closed the raw connection: {}",
                String::from_utf8_lossy(&payload)
            );
            if got == (class, id) {
                return payload[4..size].to_vec();
            }
        }
    }

    let url = amqp_url();
    let uri: AMQPUri = url
        .parse()
        .unwrap_or_else(|e| panic!("test broker URL is not an AMQP URI: {e}"));
    assert!(
        uri.scheme == AMQPScheme::AMQP,
        "raw_publish speaks plain AMQP only; the test broker URL is amqps"
    );
    let auth = &uri.authority;
    let mut s = TcpStream::connect((auth.host.as_str(), auth.port))
        .unwrap_or_else(|e| panic!("connect to RabbitMQ at {}:{}: {e}", auth.host, auth.port));
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(b"AMQP\x00\x00\x09\x01").unwrap();
    expect(&mut s, 10, 10); // connection.start
    let mut start_ok = 0u32.to_be_bytes().to_vec(); // client properties: empty table
    start_ok.extend(shortstr(b"PLAIN"));
    let mut response = vec![0u8];
    response.extend_from_slice(auth.userinfo.username.as_bytes());
    response.push(0);
    response.extend_from_slice(auth.userinfo.password.as_bytes());
    start_ok.extend_from_slice(&(response.len() as u32).to_be_bytes());
    start_ok.extend_from_slice(&response);
    start_ok.extend(shortstr(b"en_US"));
    s.write_all(&frame(1, 0, &method(10, 11, &start_ok)))
        .unwrap();
    let tune = expect(&mut s, 10, 30);
    let mut tune_ok = tune[0..2].to_vec(); // channel-max as offered
    tune_ok.extend_from_slice(&131_072u32.to_be_bytes());
    tune_ok.extend_from_slice(&0u16.to_be_bytes()); // no heartbeats
    s.write_all(&frame(1, 0, &method(10, 31, &tune_ok)))
        .unwrap();
    let mut open = shortstr(uri.vhost.as_bytes());
    open.extend(shortstr(b""));
    open.push(0);
    s.write_all(&frame(1, 0, &method(10, 40, &open))).unwrap();
    expect(&mut s, 10, 41);
    s.write_all(&frame(1, 1, &method(20, 10, &shortstr(b""))))
        .unwrap();
    expect(&mut s, 20, 11);
    s.write_all(&frame(1, 1, &method(85, 10, &[0]))).unwrap(); // confirm.select
    expect(&mut s, 85, 11);

    let mut publish = 0u16.to_be_bytes().to_vec();
    publish.extend(shortstr(b""));
    publish.extend(shortstr(queue.as_bytes()));
    publish.push(0);
    s.write_all(&frame(1, 1, &method(60, 40, &publish)))
        .unwrap();
    let mut header = 60u16.to_be_bytes().to_vec();
    header.extend_from_slice(&0u16.to_be_bytes());
    header.extend_from_slice(&(body.len() as u64).to_be_bytes());
    header.extend_from_slice(&((1u16 << 12) | (1u16 << 7)).to_be_bytes()); // delivery-mode, message-id
    header.push(2);
    header.extend(shortstr(message_id));
    s.write_all(&frame(2, 1, &header)).unwrap();
    for chunk in body.chunks(131_072 - 8) {
        s.write_all(&frame(3, 1, chunk)).unwrap();
    }
    expect(&mut s, 60, 80); // basic.ack
    let mut close = 200u16.to_be_bytes().to_vec();
    close.extend(shortstr(b"bye"));
    close.extend_from_slice(&[0, 0, 0, 0]);
    s.write_all(&frame(1, 0, &method(10, 50, &close))).unwrap();
    let _ = s.flush();
}
