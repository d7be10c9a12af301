#!/usr/bin/env python3
"""The proxy's own time on the request path, from a `perf script` dump of syscall tracepoints.

    perf record -a -e raw_syscalls:sys_enter,raw_syscalls:sys_exit -- sleep 1
    perf script -F pid,tid,time,event,trace | trace_halves.py PROXY_PIDS CLIENT_PID

For every read that a proxy thread makes and that is followed, with no other read in
between, by a write to a different socket, the time from the read's return to the write's
start is time the proxy spent on that message in user space. Reads of the client's request
size (the most common size the load generator `CLIENT_PID` writes) open the request half;
the other reads (the upstream's answer) open the response half. Prints one JSON line:
count, p50 and p90 in microseconds for each half.
"""
import collections
import json
import re
import sys

READ = {0, 17, 19, 45, 295}          # read, pread64, readv, recvfrom, preadv
WRITE = {1, 18, 20, 44, 46, 296}      # write, pwrite64, writev, sendto, sendmsg, pwritev

# Runtimes wake their threads through eventfds: 8-byte reads and writes that are not HTTP.
EVENTFD = 8

LINE = re.compile(r"\s*(\d+)/(\d+)\s+([\d.]+):\s+raw_syscalls:(sys_enter|sys_exit):\s+NR (\d+) (.*)")


def pct(values, p):
    v = sorted(values)
    return v[min(len(v) - 1, int(len(v) * p))] if v else None


def main():
    proxies = {int(p) for p in sys.argv[1].split(",")}
    client = int(sys.argv[2])
    entered = {}
    last_read = {}
    reads = []  # (size, µs from read to the next write on another fd)
    client_writes = collections.Counter()
    eventfds = collections.defaultdict(set)
    for line in sys.stdin:
        m = LINE.match(line)
        if not m:
            continue
        pid, tid, t, kind, nr, rest = int(m[1]), int(m[2]), float(m[3]) * 1e6, m[4], int(m[5]), m[6]
        if pid == client:
            if kind == "sys_exit" and nr in WRITE:
                n = int(rest.split("=")[1])
                if n > EVENTFD:
                    client_writes[n] += 1
            continue
        if pid not in proxies:
            continue
        if kind == "sys_enter":
            fd = rest.strip("( ").split(",")[0]
            entered[tid] = (nr, fd)
            if nr in WRITE and tid in last_read and fd not in eventfds[pid]:
                rfd, rt, size = last_read.pop(tid)
                if rfd != fd:
                    reads.append((size, t - rt))
            elif nr in READ:
                last_read.pop(tid, None)
        else:
            if tid not in entered:
                continue
            nr_in, fd = entered.pop(tid)
            ret = int(rest.split("=")[1])
            if ret == EVENTFD and (nr_in in READ or nr_in in WRITE):
                eventfds[pid].add(fd)
            if nr_in in READ and ret > EVENTFD:
                last_read[tid] = (fd, t, ret)
    if not client_writes:
        sys.exit("no writes of the load generator in the trace")
    request_size = client_writes.most_common(1)[0][0]
    halves = {"request": [d for s, d in reads if s == request_size], "response": [d for s, d in reads if s != request_size]}
    out = {"request_bytes": request_size}
    for name, values in halves.items():
        out[name] = {"n": len(values), "p50_us": pct(values, 0.5), "p90_us": pct(values, 0.9)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
