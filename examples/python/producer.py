#!/usr/bin/env python3
"""Publish draw requests to rewardpool and print the replies.

Each request goes to the default exchange with routing key = the request
queue's name, persistent (delivery_mode=2), with a message_id (the
idempotency key), a correlation_id and reply_to = an exclusive reply queue of
this process. Publisher confirms are on: a request counts as sent only once
the broker has confirmed it. The worker then sends to reply_to first an
`accepted` reply (with the request's ID) and later a copy of the `result`
(or a `rejected` reply for a request it can never draw); the AMQP `type`
property tells which.

The request queue is declared by the worker (quorum, with dead-lettering);
this script only checks that it exists (passive declare) and never declares
it itself, so it cannot create it with other arguments.

    python3 producer.py -n 20
    python3 producer.py -n 5 --pool spin --count 3 --user alice
    python3 producer.py -n 5 --id-prefix demo-1   # run twice: repeats get the first IDs/outcomes
"""

import argparse
import json
import os
import sys
import time
import uuid

import pika
import pika.exceptions


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
                   help="broker URL (default: $AMQP_URL or the local guest account)")
    p.add_argument("--queue", default="rewardpool.requests", help="request queue (amqp.request_queue)")
    p.add_argument("-n", "--requests", type=int, default=20, help="number of requests to publish")
    p.add_argument("--pool", default=None, help="pool id (default: the worker's first pool)")
    p.add_argument("--user", default="demo-user", help="user field of the body")
    p.add_argument("--count", type=int, default=1, help="items drawn per request (1..100)")
    p.add_argument("--id-prefix", default=None,
                   help="message_id prefix; message_id = PREFIX-i (default: a random prefix, so every run is new)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds to wait for all final replies after publishing")
    return p.parse_args()


def main():
    args = parse_args()
    prefix = args.id_prefix or "req-" + uuid.uuid4().hex[:12]

    connection = pika.BlockingConnection(pika.URLParameters(args.url))
    channel = connection.channel()
    channel.confirm_delivery()  # basic_publish now waits for the broker's ack (raises on nack)

    # Fails with 404 NOT_FOUND if the worker has not declared the queue yet.
    try:
        channel.queue_declare(queue=args.queue, passive=True)
    except pika.exceptions.ChannelClosedByBroker as e:
        sys.exit(f"request queue {args.queue!r} not found ({e}); start the worker first")

    # Server-named, exclusive reply queue: deleted when this connection closes.
    reply_queue = channel.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue

    pending = {}   # correlation_id -> message_id, until its final reply arrives
    counts = {"accepted": 0, "result": 0, "rejected": 0}

    def on_reply(ch, method, props, body):
        kind = props.type or "?"
        counts[kind] = counts.get(kind, 0) + 1
        try:
            payload = json.loads(body)
        except ValueError:
            payload = body.decode("utf-8", "replace")
        print(f"{kind:<8} correlation_id={props.correlation_id} {json.dumps(payload)}", flush=True)
        if kind in ("result", "rejected"):
            pending.pop(props.correlation_id, None)

    # Consume before publishing so no reply is missed; the queue is ours, auto-ack is fine.
    channel.basic_consume(queue=reply_queue, on_message_callback=on_reply, auto_ack=True)

    for i in range(args.requests):
        body = {"user": args.user, "count": args.count}
        if args.pool is not None:
            body["pool"] = args.pool
        message_id = f"{prefix}-{i}"
        correlation_id = f"{prefix}-c{i}"
        props = pika.BasicProperties(
            message_id=message_id,
            correlation_id=correlation_id,
            reply_to=reply_queue,
            delivery_mode=2,  # persistent
            content_type="application/json",
        )
        pending[correlation_id] = message_id
        try:
            # mandatory: raise UnroutableError instead of losing a request that routes nowhere
            channel.basic_publish(exchange="", routing_key=args.queue, body=json.dumps(body).encode(),
                                  properties=props, mandatory=True)
        except pika.exceptions.UnroutableError:
            sys.exit(f"request {message_id} was returned unroutable: does {args.queue!r} exist?")
        except pika.exceptions.NackError:
            sys.exit(f"request {message_id} was nacked by the broker")
    print(f"published {args.requests} requests (confirmed), message_id prefix {prefix!r}; "
          f"replies on {reply_queue}", flush=True)

    deadline = time.monotonic() + args.timeout
    while pending and time.monotonic() < deadline:
        connection.process_data_events(time_limit=min(1.0, max(0.0, deadline - time.monotonic())))

    print(f"replies: {counts.get('accepted', 0)} accepted, {counts.get('result', 0)} result, "
          f"{counts.get('rejected', 0)} rejected", flush=True)
    connection.close()
    if pending:
        print(f"timed out after {args.timeout}s: {len(pending)} request(s) without a final reply: "
              + ", ".join(sorted(pending.values())[:10]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
