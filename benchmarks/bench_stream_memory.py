"""Peak memory of merging multi-GiB safetensors checkpoints: streamed vs loaded, measured side by side.

    python benchmarks/bench_stream_memory.py --size-gib 2            # two 2 GiB checkpoints (+ a base for TIES)

Each mode runs in a fresh subprocess that imports torch/merging first, then records its resident set
from /proc/self/status every 5 ms in a thread (peak RssAnon = memory the process owns; peak RssFile =
file pages mapped into it, which the kernel may drop but which count in RSS) and VmHWM / ru_maxrss
at the end (the kernel's own peak of the total). Page cache used by plain reads is not RSS and is
not counted by any of these.

Modes:
* ``stream``       -- merging.merge(a, b, method="average", out=...): key by key, pread (the library path);
* ``stream_ties``  -- merging.merge(ft1, ft2, base=..., method="ties", trim="global", out=...): two extra
                      read passes for the exact global threshold;
* ``mmap``         -- the same key-by-key loop but reading with safetensors.safe_open (mmap);
* ``in_memory``    -- io.load_state_dict both, merging.merge on the state dicts, io.save_state_dict.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, resource, sys, threading, time
sys.path.insert(0, {root!r})
import torch, merging
from merging import _stream
from weightspace import io

peak = {{"RssAnon": 0, "RssFile": 0, "VmRSS": 0}}
stop = False
def status():
    out = {{}}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
    return out
def sample():
    while not stop:
        s = status()
        for k in peak:
            peak[k] = max(peak[k], s.get(k, 0))
        time.sleep(0.005)
start = status()
th = threading.Thread(target=sample, daemon=True); th.start()
mode, d, out = sys.argv[1], sys.argv[2], sys.argv[3]
a, b, base = os.path.join(d, "ft1.safetensors"), os.path.join(d, "ft2.safetensors"), os.path.join(d, "base.safetensors")
t0 = time.perf_counter()
log = {{}}
if mode == "stream":
    res = merging.merge(a, b, method="average", out=out, device="cpu")
    log = {{k: res.log[k] for k in ("bytes_read", "bytes_written", "largest_key_bytes", "timings")}}
elif mode == "stream_ties":
    res = merging.merge(a, b, base=base, method="ties", trim="global", density=0.2, out=out, device="cpu")
    log = {{k: res.log[k] for k in ("bytes_read", "bytes_written", "largest_key_bytes", "timings")}}
elif mode == "mmap":
    from safetensors import safe_open
    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        keys = list(fa.keys())
        shapes = {{k: fa.get_slice(k).get_shape() for k in keys}}
        with _stream.StreamWriter(out, [(k, torch.float32, shapes[k]) for k in keys]) as w:
            for k in keys:
                w.write(k, 0.5 * fa.get_tensor(k) + 0.5 * fb.get_tensor(k))
elif mode == "in_memory":
    sa, sb = io.load_state_dict(a), io.load_state_dict(b)
    res = merging.merge(sa, sb, method="average", device="cpu")
    io.save_state_dict(res.state_dict, out)
seconds = time.perf_counter() - t0
stop = True; th.join()
end = status()
print(json.dumps({{"mode": mode, "seconds": seconds, "start_rss": start["VmRSS"], "peak_anon": peak["RssAnon"],
                  "peak_file": peak["RssFile"], "vmhwm": end["VmHWM"],
                  "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "log": log}}))
"""


def make_checkpoints(d: Path, size_gib: float, n_tensors: int) -> int:
    import torch

    sys.path.insert(0, str(ROOT))
    from merging import _stream

    per = int(size_gib * 2**30 / 4 / n_tensors)
    rows = 4096
    cols = max(1, per // rows)
    g = torch.Generator().manual_seed(0)
    entries = [(f"layers.{i}.weight", torch.float32, (rows, cols)) for i in range(n_tensors)]
    entries += [(f"layers.{i}.bias", torch.float32, (rows,)) for i in range(n_tensors)]
    for name in ("base", "ft1", "ft2"):
        path = d / f"{name}.safetensors"
        if path.exists():
            continue
        with _stream.StreamWriter(path, entries) as w:
            for k, _, shape in entries:
                w.write(k, torch.rand(shape, generator=g) - 0.5)
    return sum(4 * int(torch.Size(s).numel()) for _, _, s in entries)


def run_mode(mode: str, d: Path) -> dict:
    out = d / f"out_{mode}.safetensors"
    if out.exists():
        out.unlink()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(
        [sys.executable, "-c", CHILD.format(root=str(ROOT)), mode, str(d), str(out)],
        capture_output=True,
        text=True,
        env=env,
    )
    if p.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{p.stderr}")
    out.unlink()
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=2.0, help="size of each checkpoint (default 2 GiB)")
    ap.add_argument("--tensors", type=int, default=32, help="weight tensors per checkpoint (default 32)")
    ap.add_argument("--dir", default=None, help="where to write the checkpoints (default a temporary directory)")
    ap.add_argument("--modes", default="stream,stream_ties,mmap,in_memory")
    args = ap.parse_args()
    d = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="ws_stream_bench_"))
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    size = make_checkpoints(d, args.size_gib, args.tensors)
    print(
        f"checkpoints: 3 x {size / 2**30:.2f} GiB float32 ({args.tensors} weight tensors of "
        f"{size / args.tensors / 2**20:.0f} MiB each) in {d}, written in {time.perf_counter() - t0:.0f} s"
    )
    print(
        f"{'mode':<12} {'inputs read':>12} {'peak RssAnon':>13} {'peak RssFile':>13} {'VmHWM':>8} "
        f"{'VmHWM/ckpt':>10} {'time':>7}"
    )
    rows = []
    for mode in args.modes.split(","):
        r = run_mode(mode, d)
        rows.append(r)
        n_in = 3 if mode == "stream_ties" else 2
        gib = lambda x: x / 2**30  # noqa: E731
        print(
            f"{mode:<12} {n_in} x {size / 2**30:.2f} GiB {gib(r['peak_anon']):>10.2f} GiB {gib(r['peak_file']):>9.2f} GiB "  # noqa: E501
            f"{gib(r['vmhwm']):>5.2f} GiB {r['vmhwm'] / size:>9.2f}x {r['seconds']:>6.1f} s"
            + (
                f"   timings {json.dumps({k: round(v, 1) for k, v in r['log'].get('timings', {}).items()})}"
                if r["log"]
                else ""
            )
        )
    print(f"process baseline (python + torch + merging imported): {rows[0]['start_rss'] / 2**20:.0f} MiB")
    if not args.dir:
        for f in d.iterdir():
            f.unlink()
        d.rmdir()


if __name__ == "__main__":
    main()
