#!/usr/bin/env python3
"""Instructions per request from callgrind dumps, and where two binaries differ.

Usage: python3 tests/bench/callgrind_diff.py BASE.callgrind.1 [OTHER.callgrind.1 ...] [--top N]

Requests are counted as calls of hyper's server-side response encoder (one per response
head), so the figure is "user-space instructions per proxied request" for any binary
built on hyper's HTTP/1.1 server (the router, floor-proxy). For each OTHER, prints the
functions whose own (exclusive) instructions per request differ most from BASE's; names
of inlined generic code can differ between binaries, so read the list as an
attribution, not an exact ledger (the totals are exact).
"""

import argparse
import collections
import re
import subprocess

ENCODE = "Server as hyper::proto::h1::Http1Transaction>::encode ("


def annotate(path, *args):
    return subprocess.run(
        ["callgrind_annotate", *args, path], capture_output=True, text=True, check=True
    ).stdout


def load(path):
    """(total Ir, requests, Counter of exclusive Ir per function)."""
    total, per = 0, collections.Counter()
    for line in annotate(path, "--threshold=100", "--auto=no", "--tree=none").splitlines():
        m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*)$", line)
        if not m:
            continue
        n, name = int(m.group(1).replace(",", "")), m.group(2)
        if "PROGRAM TOTALS" in name:
            total = n
            continue
        fn = name.split(":", 1)[1] if ":" in name else name
        fn = re.sub(r" \[.*\]$", "", fn)
        # Code without symbols at run-time addresses: the policy's JIT-compiled guest
        # code (wasmtime), at different addresses in every run.
        if re.fullmatch(r"0x[0-9a-f]+", fn):
            fn = "(JIT-compiled code: the policy guest)"
        per[fn] += n
    requests = 0
    for line in annotate(path, "--tree=calling").splitlines():
        if "=>" in line and ENCODE in line:
            requests = int(re.search(r"\(([\d,]+)x\)", line).group(1).replace(",", ""))
            break
    if not requests:
        raise SystemExit(f"{path}: no hyper server responses found (was load sent?)")
    return total, requests, per


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    runs = [(f, *load(f)) for f in a.files]
    print("\n== user-space instructions per request (callgrind)")
    base = runs[0]
    for f, total, n, _ in runs:
        ratio = (total / n) / (base[1] / base[2])
        print(f"{total / n:10,.0f} Ir/request  ({n:,} requests, {ratio:.2f}x the first)  {f}")
    for f, total, n, per in runs[1:]:
        bt, bn, bper = base[1], base[2], base[3]
        print(f"\n== {f} against {base[0]}: {total / n - bt / bn:+,.0f} Ir/request; largest differences by function")
        diffs = sorted(((per[k] / n - bper[k] / bn, k) for k in set(per) | set(bper)),
                       key=lambda d: -abs(d[0]))
        for d, k in diffs[: a.top]:
            print(f"{d:+9,.0f}  {k[:140]}")


if __name__ == "__main__":
    main()
