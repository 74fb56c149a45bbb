"""Time of permutation-spec discovery and neural-graph construction on two larger models.

    python benchmarks/bench_spec.py            # ResNet-20 x4 and a 12-layer, 768-wide BERT encoder
    python benchmarks/bench_spec.py --quick    # smaller BERT (4 layers, 256 wide)

Prints a table (median of --repeats runs after one warm-up) with the model's size and forward time for
reference; record it in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import weightspace as ws
from weightspace import zoo


def timed(fn, repeats):
    """(first call, median of ``repeats`` further calls): the first call pays page faults on fresh memory."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return first, statistics.median(out)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-graph-bert", action="store_true", help="skip the (memory-hungry) BERT graph")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    cases = [("ResNet-20 x4 (BN)", zoo.make("resnet20", width=4, norm="batch"), None)]
    try:
        import transformers

        L, H = (4, 256) if args.quick else (12, 768)
        cfg = transformers.BertConfig(num_hidden_layers=L, hidden_size=H, num_attention_heads=H // 64,
                                      intermediate_size=4 * H)
        bert = transformers.BertModel(cfg).eval()
        ids = torch.randint(0, cfg.vocab_size, (1, 16))
        cases.append((f"BERT encoder {L} x {H} (HF transformers)", bert,
                      {"input_ids": ids, "attention_mask": torch.ones_like(ids)}))
    except ImportError:
        print("transformers not installed: BERT skipped")
    for name, model, x in cases:
        x = zoo.example_inputs(model, batch=2) if x is None else x
        n_params = sum(p.numel() for p in model.parameters())
        with torch.no_grad():
            fwd = timed(lambda: model.eval()(**x) if isinstance(x, dict) else model.eval()(x), args.repeats)[1]
        t_spec = timed(lambda: ws.permutation_spec(model, x), args.repeats)
        spec = ws.permutation_spec(model, x)
        t_check = timed(lambda: ws.check_spec(model, spec, x, trials=1, modes=("eval",)), 1)[1]
        if "BERT" in name and args.no_graph_bert:
            t_graph, g = (float("nan"), float("nan")), None
        else:
            t_graph = timed(lambda: ws.NeuralGraph.from_model(model, x), 1)
            g = ws.NeuralGraph.from_model(model, x)
        rows.append((name, n_params, len(spec.groups), fwd, t_spec, t_check, t_graph, g))
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}")
    print("| model | params | groups | forward (s) | permutation_spec first / warm (s) | check_spec 1 trial (s) | "
          "NeuralGraph.from_model first / warm (s) | graph nodes / edges |")
    print("|---|---|---|---|---|---|---|---|")
    for name, n, k, fwd, ts, tc, tg, g in rows:
        ge = f"{g.num_nodes:,} / {g.num_edges:,}" if g is not None else "-"
        print(f"| {name} | {n / 1e6:.2f}M | {k} | {fwd:.3f} | {ts[0]:.3f} / {ts[1]:.3f} | {tc:.3f} | {tg[0]:.2f} / "
              f"{tg[1]:.2f} | {ge} |")


if __name__ == "__main__":
    main()
