#!/usr/bin/python3
"""Independently verify test_api checkpoint files written by SCR's examples/test_api.

File layout (examples/test_common.c): 7-byte header sprintf("%06d") + NUL holding the
checkpoint/timestep number, followed by (base_size + rank) bytes where byte i is
(rank + i) % 256.

usage: check_ckpt.py PREFIX CKPT_NUM NRANKS BASE_SIZE_BYTES
exit 0 if prefix/ckpt.N/rank_R.ckpt exist for all R with the right size and content
and the directory holds nothing else.
"""
import os
import sys


def main():
    prefix, num, nranks, base = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    d = os.path.join(prefix, "ckpt.%d" % num)
    ok = True
    if not os.path.isdir(d):
        print("MISSING dir %s" % d)
        return 1
    expected = set("rank_%d.ckpt" % r for r in range(nranks))
    extra = set(os.listdir(d)) - expected
    if extra:
        print("UNEXPECTED files in %s: %s" % (d, sorted(extra)))
        ok = False
    pattern = bytes(range(256))
    for r in range(nranks):
        f = os.path.join(d, "rank_%d.ckpt" % r)
        if not os.path.isfile(f):
            print("MISSING %s" % f)
            ok = False
            continue
        datalen = base + r
        want_size = 7 + datalen
        size = os.path.getsize(f)
        if size != want_size:
            print("BADSIZE %s: %d != %d" % (f, size, want_size))
            ok = False
            continue
        with open(f, "rb") as fh:
            data = fh.read()
        hdr = ("%06d" % num).encode() + b"\0"
        if data[:7] != hdr:
            print("BADHEADER %s: %r != %r" % (f, data[:7], hdr))
            ok = False
            continue
        body = data[7:]
        # expected body: pattern rotated by rank, repeated
        rot = pattern[r % 256:] + pattern[:r % 256]
        want = (rot * (datalen // 256 + 1))[:datalen]
        if body != want:
            first = next(i for i in range(datalen) if body[i] != want[i])
            print("BADDATA %s at offset %d" % (f, 7 + first))
            ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
