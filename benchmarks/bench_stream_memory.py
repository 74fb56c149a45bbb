"""Peak memory of merging multi-GiB safetensors checkpoints: streamed vs loaded, measured side by side.

    python benchmarks/bench_stream_memory.py --size-gib 2            # two 2 GiB checkpoints (+ a base for TIES)
    python benchmarks/bench_stream_memory.py --modes wm_stream,wm_in_memory --wm-width 4096 --wm-layers 31
                                                                     # weight matching of two 2 GiB MLPs

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
* ``wm_stream``    -- merging.merge(a, b, method="weight_matching", spec=..., out=...) on two synthetic MLP
                      checkpoints (``--wm-layers`` hidden layers of ``--wm-width`` units, input and output of
                      the same width, float32): B is A with a planted random permutation of every hidden
                      layer plus Gaussian noise (``--wm-noise`` x the weights' std), so the alignment has a
                      known answer (the fraction of units recovered is printed). The spec is traced on the
                      meta device. ``--wm-sweeps`` caps the coordinate-descent sweeps (memory does not
                      depend on it; the time does, linearly);
* ``wm_in_memory`` -- the same merge with both checkpoints loaded (io.load_state_dict) and io.save_state_dict.
                      Its child gets an address-space limit (``--wm-limit-gib``, default: available memory
                      minus 2 GiB) so that on a small machine it fails with MemoryError instead of swapping
                      or invoking the OOM killer on other processes.
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
cfg = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {{}}
if cfg.get("limit_bytes"):
    resource.setrlimit(resource.RLIMIT_AS, (cfg["limit_bytes"], cfg["limit_bytes"]))
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
elif mode.startswith("wm_"):
    import weightspace as ws
    from weightspace import zoo
    w, n_layers = cfg["width"], cfg["layers"]
    with torch.device("meta"):
        template = zoo.MLP(w, (w,) * n_layers, w)
    spec = ws.permutation_spec(template, torch.empty(2, w, device="meta"))
    a, b = os.path.join(d, "wm_a.safetensors"), os.path.join(d, "wm_b.safetensors")
    opts = dict(method="weight_matching", spec=spec, max_sweeps=cfg["sweeps"], device="cpu")
    if mode == "wm_stream":
        res = merging.merge(a, b, out=out, **opts)
        log = {{k: res.log[k] for k in ("bytes_read", "bytes_read_align", "bytes_written", "timings", "work_lru",
                                        "cost_cache_lru")}}
    else:
        t1 = time.perf_counter()
        sa, sb = io.load_state_dict(a), io.load_state_dict(b)
        t_load = time.perf_counter() - t1
        res = merging.merge(sa, sb, **opts)
        t1 = time.perf_counter()
        io.save_state_dict(res.state_dict, out)
        log = {{"timings": {{"load": t_load, **res.log["timings"], "save": time.perf_counter() - t1}}}}
    planted = ws.invert_permutation(ws.random_permutation(spec, seed=cfg["seed"]))
    aln = res.alignment
    run = aln.log["restarts"][aln.log["best_restart"]]
    log["alignment"] = {{
        "objective": aln.objective, "objective_identity": aln.log["objective_identity"],
        "sweeps": len(run["sweeps"]), "converged": run["converged"],
        "recovered": sum(int((aln.permutations[g] == planted[g]).sum()) for g in spec.groups)
        / sum(spec.groups.values()),
        "perm_hash": sum(int((aln.permutations[g] * torch.arange(n)).sum()) for g, n in spec.groups.items()),
    }}
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


def make_wm_checkpoints(d: Path, width: int, layers: int, noise: float, seed: int) -> int:
    """A (random MLP: ``layers`` hidden layers of ``width``, input and output ``width``) and B = a planted
    permutation of A plus noise, written tensor by tensor (the parent never holds a checkpoint)."""
    import torch

    sys.path.insert(0, str(ROOT))
    import weightspace as ws
    from merging import _stream
    from merging._wm_core import permute_axes
    from weightspace import zoo

    with torch.device("meta"):
        template = zoo.MLP(width, (width,) * layers, width)
    spec = ws.permutation_spec(template, torch.empty(2, width, device="meta"))
    shapes = {k: tuple(v.shape) for k, v in template.state_dict().items()}
    entries = [(k, torch.float32, s) for k, s in shapes.items()]
    size = sum(4 * int(torch.Size(s).numel()) for s in shapes.values())
    pa, pb = d / "wm_a.safetensors", d / "wm_b.safetensors"
    if pa.exists() and pb.exists() and pa.stat().st_size > size and pb.stat().st_size > size:
        return size
    for p in (pa, pb):
        if p.exists():
            p.unlink()
    planted = ws.random_permutation(spec, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with _stream.StreamWriter(pa, entries) as wa, _stream.StreamWriter(pb, entries) as wb:
        for k, shape in shapes.items():
            t = torch.randn(shape, generator=g) / shape[-1] ** 0.5
            wa.write(k, t)
            t = permute_axes(t, spec.axes[k], planted) if k in spec.axes else t
            wb.write(k, t + noise * t.std() * torch.randn(shape, generator=g))
            del t
    return size


def run_mode(mode: str, d: Path, cfg: dict = None) -> dict:
    out = d / f"out_{mode}.safetensors"
    if out.exists():
        out.unlink()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(
        [sys.executable, "-c", CHILD.format(root=str(ROOT)), mode, str(d), str(out), json.dumps(cfg or {})],
        capture_output=True,
        text=True,
        env=env,
    )
    if p.returncode != 0:
        if out.exists():
            out.unlink()
        return {"mode": mode, "failed": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"rc {p.returncode}"}
    out.unlink()
    return json.loads(p.stdout.strip().splitlines()[-1])


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=2.0, help="size of each checkpoint (default 2 GiB)")
    ap.add_argument("--tensors", type=int, default=32, help="weight tensors per checkpoint (default 32)")
    ap.add_argument("--dir", default=None, help="where to write the checkpoints (default a temporary directory)")
    ap.add_argument("--modes", default="stream,stream_ties,mmap,in_memory,wm_stream,wm_in_memory")
    ap.add_argument("--wm-width", type=int, default=4096, help="hidden width of the weight-matching MLPs")
    ap.add_argument("--wm-layers", type=int, default=31, help="hidden layers of the weight-matching MLPs")
    ap.add_argument("--wm-noise", type=float, default=0.1, help="B = planted permutation of A + noise x std")
    ap.add_argument("--wm-sweeps", type=int, default=1, help="max_sweeps of weight matching (default 1)")
    ap.add_argument("--wm-limit-gib", type=float, default=None, help="address-space limit of wm_in_memory")
    args = ap.parse_args()
    modes = args.modes.split(",")
    d = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="ws_stream_bench_"))
    d.mkdir(parents=True, exist_ok=True)
    gib = lambda x: x / 2**30  # noqa: E731
    print(
        f"{'mode':<12} {'inputs read':>12} {'peak RssAnon':>13} {'peak RssFile':>13} {'VmHWM':>8} "
        f"{'VmHWM/ckpt':>10} {'time':>7}"
    )
    rows = []
    elementwise = [m for m in modes if not m.startswith("wm_")]
    if elementwise:
        t0 = time.perf_counter()
        size = make_checkpoints(d, args.size_gib, args.tensors)
        print(
            f"checkpoints: 3 x {size / 2**30:.2f} GiB float32 ({args.tensors} weight tensors of "
            f"{size / args.tensors / 2**20:.0f} MiB each) in {d}, written in {time.perf_counter() - t0:.0f} s"
        )
    for mode in modes:
        cfg = {}
        if mode.startswith("wm_"):
            t0 = time.perf_counter()
            size = make_wm_checkpoints(d, args.wm_width, args.wm_layers, args.wm_noise, seed=0)
            cfg = {"width": args.wm_width, "layers": args.wm_layers, "sweeps": args.wm_sweeps, "seed": 0}
            if mode == "wm_in_memory":
                limit = args.wm_limit_gib * 2**30 if args.wm_limit_gib else _available_bytes() - 2 * 2**30
                cfg["limit_bytes"] = int(limit)
            print(
                f"weight matching: 2 x {size / 2**30:.2f} GiB float32 MLPs ({args.wm_layers} hidden layers of "
                f"{args.wm_width}, largest tensor {4 * args.wm_width**2 / 2**20:.0f} MiB), planted permutation + "
                f"noise {args.wm_noise}, max_sweeps {args.wm_sweeps} (files ready in {time.perf_counter() - t0:.0f} s)"
                + (f"; address-space limit {gib(cfg['limit_bytes']):.1f} GiB" if "limit_bytes" in cfg else "")
            )
        r = run_mode(mode, d, cfg)
        rows.append(r)
        if "failed" in r:
            print(f"{mode:<12} FAILED: {r['failed']}")
            continue
        n_in = 3 if mode == "stream_ties" else 2
        extra = ""
        if r["log"]:
            extra = f"   timings {json.dumps({k: round(v, 1) for k, v in r['log'].get('timings', {}).items()})}"
            if "alignment" in r["log"]:
                extra += f"   alignment {json.dumps(r['log']['alignment'])}"
            for k in ("bytes_read_align", "work_lru", "cost_cache_lru"):
                if k in r["log"]:
                    extra += f"   {k} {json.dumps(r['log'][k])}"
        print(
            f"{mode:<12} {n_in} x {size / 2**30:.2f} GiB {gib(r['peak_anon']):>10.2f} GiB {gib(r['peak_file']):>9.2f} GiB "  # noqa: E501
            f"{gib(r['vmhwm']):>5.2f} GiB {r['vmhwm'] / size:>9.2f}x {r['seconds']:>6.1f} s" + extra,
            flush=True,
        )
    ok = [r for r in rows if "start_rss" in r]
    if ok:
        print(f"process baseline (python + torch + merging imported): {ok[0]['start_rss'] / 2**20:.0f} MiB")
    if not args.dir:
        for f in d.iterdir():
            f.unlink()
        d.rmdir()

if __name__ == "__main__":
    main()
