#!/usr/bin/env python3
"""Chaos benchmark driver (run by bench/chaos.sh): steady load on a running router while a
shard process is killed every few seconds and the balancing policy is hot-swapped mid-run.

Every response is checked: a non-streaming answer must be a 200 with a chat.completion body
and a message; a stream must be a 200 of well-formed SSE events (each `data:` line JSON, one
completion id, no error event) ending in `data: [DONE]`. An answer with the
`x-switchyard-degraded` header counts as answered and, separately, as degraded. Prints a
JSON report on stdout; progress on stderr. Standard library only.
"""

import argparse
import http.client
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

PROMPTS = [
    "What is the capital of France?",
    "Name three colours.",
    "Say hello in Spanish.",
    "What is two plus two?",
    "Give me a word that rhymes with cat.",
    "What colour is the sky?",
]


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.sent = 0
        self.answered = 0
        self.degraded = 0
        self.streams = 0
        self.malformed_streams = 0
        self.failures = []

    def record(self, ok, degraded, stream, malformed, why):
        with self.lock:
            self.sent += 1
            self.streams += stream
            if ok:
                self.answered += 1
                self.degraded += degraded
            else:
                self.malformed_streams += malformed
                if len(self.failures) < 20:
                    self.failures.append(why)


def check_stream(body):
    """(ok, why) for an SSE body."""
    ids, done = set(), False
    for event in body.split("\n\n"):
        event = event.strip()
        if not event:
            continue
        if not event.startswith("data: "):
            return False, f"not a data event: {event[:80]!r}"
        data = event[len("data: "):]
        if data == "[DONE]":
            done = True
            continue
        if done:
            return False, "event after [DONE]"
        try:
            chunk = json.loads(data)
        except ValueError:
            return False, f"bad JSON event: {data[:80]!r}"
        if "error" in chunk:
            return False, f"error event: {data[:120]}"
        ids.add(chunk.get("id"))
    if not done:
        return False, "no [DONE]"
    if len(ids) != 1:
        return False, f"{len(ids)} completion ids in one stream"
    return True, ""


def one_request(conn, stream, max_tokens):
    body = json.dumps({
        "model": "smollm2",
        # A short system message: the model's default one would triple the prompt.
        "messages": [{"role": "system", "content": "Answer briefly."},
                     {"role": "user", "content": random.choice(PROMPTS)}],
        "max_tokens": max_tokens,
        "stream": stream,
    })
    conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
    resp = conn.getresponse()
    data = resp.read().decode("utf-8", "replace")
    degraded = resp.getheader("x-switchyard-degraded") is not None
    if resp.status != 200:
        return False, degraded, f"HTTP {resp.status}: {data[:160]}"
    if stream:
        ok, why = check_stream(data)
        return ok, degraded, why
    try:
        msg = json.loads(data)["choices"][0]["message"]["content"]
        assert isinstance(msg, str)
    except (ValueError, KeyError, IndexError, AssertionError):
        return False, degraded, f"bad body: {data[:160]}"
    return True, degraded, ""


def client(port, stats, stop, total, stream_share, max_tokens):
    conn = None
    while not stop.is_set():
        with stats.lock:
            if stats.sent >= total:
                return
        stream = random.random() < stream_share
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            ok, degraded, why = one_request(conn, stream, max_tokens)
        except (OSError, http.client.HTTPException) as e:
            ok, degraded, why = False, False, f"{type(e).__name__}: {e}"
            conn.close()
            conn = None
        stats.record(ok, degraded, stream, stream and not ok, why)


def shard_pids(router_pid):
    out = subprocess.run(["pgrep", "-P", str(router_pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def publish(src, plugins, name):
    tmp = os.path.join(plugins, f".{name}.wasm.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, os.path.join(plugins, f"{name}.wasm"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--router-pid", type=int, required=True)
    ap.add_argument("--plugins", required=True, help="the router's plugin folder")
    ap.add_argument("--swap-to", required=True, help="component published over bal.wasm mid-run")
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--kill-every", type=float, default=5.0)
    ap.add_argument("--stream-share", type=float, default=0.5)
    ap.add_argument("--max-tokens", type=int, default=6)
    ap.add_argument("--max-seconds", type=float, default=0, help="stop sending after this long (0: no limit)")
    a = ap.parse_args()

    stats, stop = Stats(), threading.Event()
    threads = [threading.Thread(target=client, daemon=True,
                                args=(a.port, stats, stop, a.requests, a.stream_share, a.max_tokens))
               for _ in range(a.concurrency)]
    start = time.time()
    for t in threads:
        t.start()
    kills, swapped, next_kill, next_log = [], None, start + a.kill_every, start + 10
    while any(t.is_alive() for t in threads):
        time.sleep(0.2)
        now = time.time()
        with stats.lock:
            sent = stats.sent
        if swapped is None and sent >= a.requests // 2:
            publish(a.swap_to, a.plugins, "bal")
            swapped = round(now - start, 1)
            print(f"[chaos] {now - start:6.1f}s hot-swapped bal.wasm", file=sys.stderr)
        if now >= next_kill:
            pids = shard_pids(a.router_pid)
            if pids:
                victim = random.choice(pids)
                try:
                    os.kill(victim, signal.SIGKILL)
                    kills.append(round(now - start, 1))
                except ProcessLookupError:
                    pass
            next_kill = now + a.kill_every
        if a.max_seconds and now - start >= a.max_seconds and not stop.is_set():
            stop.set()
            print(f"[chaos] {now - start:6.1f}s time is up: finishing the requests in flight", file=sys.stderr)
        if now >= next_log:
            with stats.lock:
                print(f"[chaos] {now - start:6.1f}s sent {stats.sent} answered {stats.answered} "
                      f"degraded {stats.degraded} kills {len(kills)}", file=sys.stderr)
            next_log = now + 10
    elapsed = time.time() - start
    failed = stats.sent - stats.answered
    report = {
        "requests": stats.sent,
        "answered": stats.answered,
        "answered_share": stats.answered / max(stats.sent, 1),
        "degraded": stats.degraded,
        "failed": failed,
        "streams": stats.streams,
        "malformed_streams": stats.malformed_streams,
        "shard_kills": len(kills),
        "hot_swap_at_s": swapped,
        "seconds": round(elapsed, 1),
        "req_per_s": round(stats.sent / elapsed, 1),
        "failures": stats.failures,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
