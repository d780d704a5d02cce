#!/usr/bin/env python3
"""Independent verifier of a rewardpool audit bundle (docs/audit.md).

Written from the document alone, with Python's standard library only: it rebuilds every pool
from the bundle's `pool` lines, re-derives every draw of an ended epoch from the epoch's secret
(HMAC-SHA256 in counter mode, Lemire's multiply-and-reject), and checks it against the recorded
items. Draws of the epoch still running (its secret is not in the bundle) are applied as
recorded and counted as unverified. Admin `command` lines are checked against the pools with
the configuration's rules and applied; the `pool` line that follows one must equal the
verifier's own pool. Stock accounting (stocked = quantity + issued) holds after every line.

    python3 verify.py BUNDLE.jsonl

Prints a JSON summary on stdout; exit 0 when every check holds, 1 on the first mismatch
(named with its line number and request ID), 2 on a bundle it cannot read.
"""

import hashlib
import hmac
import json
import struct
import sys

MASK64 = (1 << 64) - 1
QUANTITY_MAX = 1 << 40
WEIGHT_MAX = 1 << 32


class Stream:
    """The random words of one request: HMAC-SHA256(secret, request_id LE64 || block LE64)."""

    def __init__(self, secret, request_id):
        self.secret = secret
        self.request_id = request_id
        self.block = 0
        self.words = []

    def word(self):
        if not self.words:
            msg = struct.pack("<QQ", self.request_id, self.block)
            digest = hmac.digest(self.secret, msg, "sha256")
            self.words = list(struct.unpack("<4Q", digest))
            self.words.reverse()  # pop() from the end = word 0 first
            self.block += 1
        return self.words.pop()


def uniform_below(stream, n):
    """Lemire's multiply-and-reject: exactly uniform in 0..n."""
    product = stream.word() * n
    low = product & MASK64
    if low < n:
        threshold = ((1 << 64) - n) % n  # 2^64 mod n
        while low < threshold:
            product = stream.word() * n
            low = product & MASK64
    return product >> 64


def draw_weight(mode, item):
    if mode == "by_quantity":
        return item["quantity"]
    if item["quantity"] == 0:
        return 0
    return item["weight"]


def issue(item):
    if item["quantity"] is not None:
        if item["quantity"] == 0:
            raise ValueError("issue of an item with no units left")
        item["quantity"] -= 1
    item["issued"] += 1


def new_item(line, mode):
    """An item of a `pool` line (version 1 lines have no issued/stocked: a fresh item)."""
    item = {"id": line["id"], "quantity": line["quantity"], "weight": line["weight"]}
    item["issued"] = line.get("issued", 0)
    item["stocked"] = line.get("stocked", item["quantity"])
    check_item(mode, item)
    return item


def check_item(mode, item):
    """The configuration's rules for one item, and its stock accounting."""
    if mode == "by_quantity":
        if item["quantity"] is None:
            raise Mismatch("item %r: unlimited in a by_quantity pool" % item["id"])
        if item["weight"] is not None:
            raise Mismatch("item %r: a weight in a by_quantity pool" % item["id"])
    elif mode == "by_weight":
        if item["weight"] is None or not 1 <= item["weight"] <= WEIGHT_MAX:
            raise Mismatch("item %r: weight must be 1..2^32" % item["id"])
    else:
        raise Mismatch("unknown mode %r" % mode)
    if item["quantity"] is None:
        if item["stocked"] is not None:
            raise Mismatch("item %r: unlimited with a stocked count" % item["id"])
        return
    if item["stocked"] is None or item["stocked"] > QUANTITY_MAX:
        raise Mismatch("item %r: stocked must be 0..2^40" % item["id"])
    if item["quantity"] < 0 or item["quantity"] + item["issued"] != item["stocked"]:
        raise Mismatch(
            "item %r: stocked %r != quantity %r + issued %r"
            % (item["id"], item["stocked"], item["quantity"], item["issued"])
        )


def limited(pool, index):
    item = pool["items"][index]
    if item["quantity"] is None:
        raise Mismatch("item %r is unlimited: it has no quantity to change" % item["id"])
    return item


def apply_command(pools, line):
    """An admin command (docs/audit.md), checked as the worker checks it, then applied."""
    op = line["op"]
    index = line["pool_index"]
    if op == "add_pool":
        spec = line["pool"]
        if index in pools:
            raise Mismatch("add_pool at index %d, which exists" % index)
        if index != len(pools):
            raise Mismatch("add_pool at index %d, expected %d" % (index, len(pools)))
        if any(p["id"] == spec["id"] for p in pools.values()):
            raise Mismatch("add_pool of pool %r, which exists" % spec["id"])
        if not spec["items"]:
            raise Mismatch("add_pool of pool %r without items" % spec["id"])
        items = [new_item(item, spec["mode"]) for item in spec["items"]]
        if len({item["id"] for item in items}) != len(items):
            raise Mismatch("add_pool of pool %r: duplicate item id" % spec["id"])
        pools[index] = {"id": spec["id"], "mode": spec["mode"], "closed": False, "items": items}
        return
    pool = pools.get(index)
    if pool is None:
        raise Mismatch("%s names unknown pool index %d" % (op, index))
    if op == "restock":
        item = limited(pool, line["item_index"])
        add = line["add"]
        if not 1 <= add <= QUANTITY_MAX or item["stocked"] + add > QUANTITY_MAX:
            raise Mismatch("restock of %r by %r: stocked would leave 0..2^40" % (item["id"], add))
        item["quantity"] += add
        item["stocked"] += add
    elif op == "set_quantity":
        item = limited(pool, line["item_index"])
        quantity = line["quantity"]
        if not 0 <= quantity <= QUANTITY_MAX or quantity + item["issued"] > QUANTITY_MAX:
            raise Mismatch("set_quantity of %r to %r: out of range" % (item["id"], quantity))
        item["quantity"] = quantity
        item["stocked"] = quantity + item["issued"]
    elif op == "set_weight":
        if pool["mode"] != "by_weight":
            raise Mismatch("set_weight in a by_quantity pool")
        weight = line["weight"]
        if not 1 <= weight <= WEIGHT_MAX:
            raise Mismatch("set_weight to %r: out of range" % weight)
        pool["items"][line["item_index"]]["weight"] = weight
    elif op == "add_item":
        item = new_item(line["item"], pool["mode"])
        if any(other["id"] == item["id"] for other in pool["items"]):
            raise Mismatch("add_item of %r, which the pool has" % item["id"])
        pool["items"].append(item)
    elif op == "close_pool":
        pool["closed"] = True
    elif op == "open_pool":
        pool["closed"] = False
    else:
        raise Mismatch("unknown command op %r" % op)


def draw(pool, count, stream):
    """`count` draws, one after another, from the changing pool; stops when it runs out."""
    out = []
    if pool["closed"]:
        return out
    for _ in range(count):
        weights = [draw_weight(pool["mode"], item) for item in pool["items"]]
        total = sum(weights)
        if total == 0:
            break
        target = uniform_below(stream, total)
        for index, weight in enumerate(weights):
            if target < weight:
                break
            target -= weight
        issue(pool["items"][index])
        out.append(index)
    return out


class Mismatch(Exception):
    pass


def verify(lines):
    pools = {}
    epoch = None
    summary = {
        "verified_draws": 0,
        "unverified_draws": 0,
        "verified_commands": 0,
        "epochs": 0,
        "ended_epochs": 0,
        "first_request_id": None,
        "last_request_id": None,
        "mismatches": 0,
    }
    last_id = 0
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        line = json.loads(text)
        kind = line.get("type")
        where = "line %d" % number
        try:
            if kind == "header":
                if line.get("format") != "rewardpool-audit-bundle" or line.get("version") not in (1, 2):
                    raise Mismatch("unknown bundle format %r" % line)
            elif kind == "pool":
                pool = {
                    "id": line["id"],
                    "mode": line["mode"],
                    "closed": line.get("closed", False),
                    "items": [new_item(item, line["mode"]) for item in line["items"]],
                }
                index = line["pool_index"]
                if index in pools and pools[index] != pool:
                    # A pool restated after a command: the audit's state must be ours.
                    raise Mismatch(
                        "pool %d after the command is %r, the verifier has %r"
                        % (index, pool, pools[index])
                    )
                pools[index] = pool
            elif kind == "command":
                request_id = line["request_id"]
                where += " (request %d)" % request_id
                if request_id <= last_id:
                    raise Mismatch("request IDs must increase (%d after %d)" % (request_id, last_id))
                last_id = request_id
                apply_command(pools, line)
                for item in pools[line["pool_index"]]["items"]:
                    check_item(pools[line["pool_index"]]["mode"], item)
                summary["verified_commands"] += 1
            elif kind == "epoch":
                commitment = bytes.fromhex(line["commitment"])
                secret = line.get("secret")
                if secret is not None:
                    secret = bytes.fromhex(secret)
                    if hashlib.sha256(secret).digest() != commitment:
                        raise Mismatch("epoch %d: commitment is not sha256(secret)" % line["number"])
                    summary["ended_epochs"] += 1
                if epoch is not None and line["number"] <= epoch["number"]:
                    raise Mismatch("epoch numbers must increase")
                epoch = {"number": line["number"], "secret": secret}
                summary["epochs"] += 1
            elif kind == "draw":
                request_id = line["request_id"]
                where += " (request %d)" % request_id
                if request_id <= last_id:
                    raise Mismatch("request IDs must increase (%d after %d)" % (request_id, last_id))
                last_id = request_id
                pool = pools.get(line["pool_index"])
                if pool is None:
                    raise Mismatch("unknown pool index %d" % line["pool_index"])
                recorded = line["items"]
                if epoch is None:
                    raise Mismatch("a draw before any epoch")
                if len(recorded) > line["count"]:
                    raise Mismatch("%d items for count %d" % (len(recorded), line["count"]))
                if pool["closed"] and recorded:
                    raise Mismatch("a draw on a closed pool has items %r" % recorded)
                if epoch["secret"] is None:
                    for index in recorded:
                        issue(pool["items"][index])
                    summary["unverified_draws"] += 1
                    continue
                derived = draw(pool, line["count"], Stream(epoch["secret"], request_id))
                if derived != recorded:
                    raise Mismatch("recorded items %r, re-derived %r" % (recorded, derived))
                for index in derived:
                    check_item(pool["mode"], pool["items"][index])
                summary["verified_draws"] += 1
                if summary["first_request_id"] is None:
                    summary["first_request_id"] = request_id
                summary["last_request_id"] = request_id
            elif kind == "end":
                pass
            else:
                raise Mismatch("unknown line type %r" % kind)
        except Mismatch as e:
            summary["mismatches"] += 1
            summary["first_mismatch"] = "%s: %s" % (where, e)
            return summary
        except (KeyError, TypeError, ValueError, IndexError) as e:
            summary["mismatches"] += 1
            summary["first_mismatch"] = "%s: malformed or impossible: %r" % (where, e)
            return summary
    return summary


def main():
    if len(sys.argv) != 2:
        print("usage: verify.py BUNDLE.jsonl", file=sys.stderr)
        return 2
    try:
        with open(sys.argv[1], encoding="utf-8") as f:
            summary = verify(f)
    except (OSError, json.JSONDecodeError) as e:
        print("error: %s" % e, file=sys.stderr)
        return 2
    print(json.dumps(summary))
    if summary["mismatches"]:
        print("error: %s" % summary["first_mismatch"], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
