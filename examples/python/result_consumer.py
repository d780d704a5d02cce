#!/usr/bin/env python3
"""Consume rewardpool's result queue and print each draw outcome once.

Results are published persistently to the result queue (rewardpool.results)
after their WAL record is on disk. A result may be published more than once
(after a worker crash or a lost connection), so this consumer dedupes on the
request ID: the `request_id` header, or the body's `request_id` field. A
duplicate is acked and skipped.

Acks are manual, sent after the result is handled (printed): a result whose
handling did not finish is delivered again. The seen-set here lives in memory;
a real consumer keeps it where it keeps its effects (for example a unique key
on request_id in its database).

The queue is declared by the worker; this script only checks it exists
(passive declare) and never declares it with arguments of its own.

    python3 result_consumer.py                   # run until Ctrl-C
    python3 result_consumer.py --idle-timeout 5  # stop after 5 s without a message
    python3 result_consumer.py --max 20          # stop after 20 distinct results
"""

import argparse
import json
import os
import sys

import pika
import pika.exceptions


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
                   help="broker URL (default: $AMQP_URL or the local guest account)")
    p.add_argument("--queue", default="rewardpool.results", help="result queue (amqp.result_queue)")
    p.add_argument("--prefetch", type=int, default=100, help="unacked results in flight")
    p.add_argument("--max", type=int, default=None, help="stop after this many distinct results")
    p.add_argument("--idle-timeout", type=float, default=None,
                   help="stop after this many seconds without a message (default: run until Ctrl-C)")
    return p.parse_args()


def request_id_of(props, payload):
    headers = props.headers or {}
    rid = headers.get("request_id")
    if rid is None and isinstance(payload, dict):
        rid = payload.get("request_id")
    if rid is None and props.message_id:
        rid = props.message_id  # the request ID in decimal
    return int(rid) if rid is not None else None


def main():
    args = parse_args()
    connection = pika.BlockingConnection(pika.URLParameters(args.url))
    channel = connection.channel()
    try:
        channel.queue_declare(queue=args.queue, passive=True)
    except pika.exceptions.ChannelClosedByBroker as e:
        sys.exit(f"result queue {args.queue!r} not found ({e}); start the worker first")
    channel.basic_qos(prefetch_count=args.prefetch)

    seen = set()
    duplicates = 0
    try:
        for method, props, body in channel.consume(args.queue, auto_ack=False,
                                                   inactivity_timeout=args.idle_timeout):
            if method is None:  # idle timeout
                break
            try:
                payload = json.loads(body)
            except ValueError:
                payload = None
            rid = request_id_of(props, payload)
            if rid is not None and rid in seen:
                duplicates += 1
                print(f"duplicate request_id={rid} (skipped)", flush=True)
            else:
                if rid is not None:
                    seen.add(rid)
                if isinstance(payload, dict):
                    print(f"request_id={rid} status={payload.get('status')} pool={payload.get('pool')} "
                          f"user={payload.get('user')} items={payload.get('items')} "
                          f"message_id={payload.get('message_id')} correlation_id={props.correlation_id}",
                          flush=True)
                else:
                    print(f"request_id={rid} unparsable body: {body[:200]!r}", flush=True)
            channel.basic_ack(method.delivery_tag)  # after handling: at-least-once
            if args.max is not None and len(seen) >= args.max:
                break
    except KeyboardInterrupt:
        pass
    finally:
        print(f"{len(seen)} distinct results, {duplicates} duplicates skipped", flush=True)
        if channel.is_open:
            channel.cancel()  # unacked prefetched messages go back to the queue
        if connection.is_open:
            connection.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
