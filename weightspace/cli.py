"""The ``weightspace`` command (also ``python -m weightspace``).

    weightspace demo --out demo.html                    # embedded digits: train, discover, permute, measure
    weightspace spec --model pkg.module:factory --input-shape 1,3,32,32
    weightspace graph --model pkg.module:factory --input-shape 1,3,32,32
    weightspace analyze CKPT --model pkg.module:factory --input-shape 2,64 --report report.html [--compare CKPT_B]

This is the only module of ``weightspace`` that may import the other packages (``analysis``, ``viz``)
and the only one that prints or configures logging.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

log = logging.getLogger("weightspace.cli")


class UsageError(SystemExit):
    """A bad command line: printed as one ``error:`` line, exit status 2 (argparse's convention)."""


def _parse_shape(text: str) -> tuple:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise UsageError(f"error: --input-shape must be comma-separated integers such as 1,3,32,32, got {text!r}")
    if not shape or any(s < 1 for s in shape):
        raise UsageError(f"error: --input-shape must be positive integers, got {text!r}")
    return shape


def _example(args) -> Any:
    g = torch.Generator().manual_seed(args.seed)
    shape = _parse_shape(args.input_shape)
    if args.input_dtype == "long":
        return torch.randint(0, args.input_high, shape, generator=g)
    return torch.randn(shape, generator=g)


def _model_kwargs(args) -> dict:
    """``--model-kwargs`` as a dict; a malformed value names the flag and shows the expected form."""
    if not args.model_kwargs:
        return {}
    try:
        kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as exc:
        raise UsageError(f"error: --model-kwargs is not valid JSON ({exc.msg} at character {exc.pos} of "
                         f"{args.model_kwargs!r}); write a JSON object such as '{{\"width\": 4}}' (double quotes)")
    if not isinstance(kwargs, dict):
        raise UsageError(f"error: --model-kwargs must be a JSON object of keyword arguments such as "
                         f"'{{\"width\": 4}}', got a JSON {type(kwargs).__name__}")
    return kwargs


def _build_model(args) -> torch.nn.Module:
    from weightspace.io import build_model

    kwargs = _model_kwargs(args)
    try:
        return build_model(args.model, **kwargs)
    except TypeError as exc:
        if kwargs and "argument" in str(exc):
            raise UsageError(f"error: the factory {args.model!r} does not accept --model-kwargs "
                             f"{args.model_kwargs}: {exc}")
        raise


def _build(args) -> torch.nn.Module:
    from weightspace.io import load_into

    model = _build_model(args)
    if getattr(args, "checkpoint", None):
        model = load_into(model, args.checkpoint)
    return model


def _output(path: Optional[str], args, flag: str) -> Optional[Path]:
    """Validate an output path before any work (one rule for every writer: refuse to overwrite without
    ``--overwrite``, never create a missing directory)."""
    if path is None:
        return None
    from weightspace.io import OutputPathError, check_output_path

    try:
        return check_output_path(path, overwrite=args.overwrite, flag="--overwrite")
    except (OutputPathError, FileExistsError) as exc:
        raise UsageError(f"error: {flag} {path}: {exc}")


# ---------------------------------------------------------------------------------------------
def cmd_spec(args) -> int:
    import weightspace as ws
    from weightspace.io import atomic_write

    out = _output(args.json, args, "--json")
    model, x = _build(args), _example(args)
    t = time.perf_counter()
    spec = ws.permutation_spec(model, x)
    took = time.perf_counter() - t
    print(spec)
    print(f"\n{len(spec.groups)} permutation groups found in {took:.2f} s")
    if args.check:
        report = ws.check_spec(model, spec, x, trials=args.trials)
        print(f"check_spec ({len(report.inputs)} inputs: the example and {len(report.inputs) - 1} perturbed copies): "
              "largest relative output change " + ", ".join(f"{m} {d:.2e}" for m, d in report.max_rel_diff.items()))
    if out is not None:
        _, a2p = spec.to_rebasin()
        atomic_write(out, json.dumps({"groups": dict(spec.groups), "axes_to_perm": a2p}, indent=1) + "\n",
                     overwrite=args.overwrite, flag="--overwrite")
        print(f"wrote {out}")
    return 0


def cmd_graph(args) -> int:
    import weightspace as ws

    model, x = _build(args), _example(args)
    t = time.perf_counter()
    g = ws.NeuralGraph.from_model(model, x)
    print(g)
    print(f"built in {time.perf_counter() - t:.2f} s")
    for i, l in enumerate(g.layers[: args.max_layers]):
        print(f"  layer {i:>3}  {l.kind:<10} {l.size:>6} units  {l.name}{'  (' + l.activation + ')' if l.activation else ''}")
    if len(g.layers) > args.max_layers:
        print(f"  ... {len(g.layers) - args.max_layers} more layers")
    return 0


class _Progress:
    """A progress bar for long computations: tqdm when installed and stderr is a terminal (or when
    forced), else a line every 10 %; silent with -q."""

    def __init__(self, label: str, quiet: bool) -> None:
        self.label, self.quiet, self.bar, self.last = label, quiet, None, -1

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.bar is None and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=self.label, unit="pt")
            except ImportError:
                self.bar = False
        if self.bar:
            self.bar.update(done - self.bar.n)
            if done >= total:
                self.bar.close()
            return
        step = int(10 * done / max(total, 1))
        if step != self.last:
            self.last = step
            print(f"{self.label}: {done}/{total}", file=sys.stderr)


def _digits_for(model: torch.nn.Module, x: Any):
    """The embedded digits, shaped like the model's example input (flat (N, 64) or images (N, 1, 8, 8))."""
    from weightspace import zoo

    flat = not (torch.is_tensor(x) and x.dim() == 4)
    return zoo.load_digits("train", flat=flat), zoo.load_digits("test", flat=flat)


def cmd_analyze(args) -> int:
    """Metrics of one checkpoint (and its connectivity to a second) on the embedded digits."""
    import analysis
    import viz
    from weightspace.io import load_into

    out = _output(args.report, args, "--report")
    model = load_into(_build_model(args), args.checkpoint)
    other = load_into(_build_model(args), args.compare) if args.compare else None  # fail before the long work
    x = _example(args)
    train, test = _digits_for(model, x)
    name = Path(args.checkpoint).name
    lines, results = [], {}
    land = analysis.landscape(model, {"test": test}, grid=args.grid, dims=2, metrics=("loss",), seed=args.seed,
                              progress=_Progress(f"landscape {args.grid}x{args.grid}", args.quiet))
    lines.append(f"test loss at the checkpoint: {land.center['test']['loss']:.4f}" if land.center else "landscape computed")
    results["Filter-normalised loss landscape (Li et al. 2018)"] = land
    if other is not None:
        curve = analysis.interpolate(model, other, {"train": train, "test": test}, alphas=args.alphas)
        b = curve.barrier("loss", split="test")
        lines.append(f"loss barrier to {Path(args.compare).name} (chord, test): {b.value:.4f} at alpha {b.alpha:.2f}")
        results["Linear interpolation"] = {f"{name} -> {Path(args.compare).name}": curve}
    try:
        pn = analysis.path_norm(model, x, q=1)
        lines.append(f"L1 path-norm: {pn.value:.6g}")
        results["Path-norm (Gonon et al. 2024)"] = {name: pn}
    except ValueError as exc:
        lines.append(f"path-norm not defined here: {exc}")
    eig = analysis.hessian_eigenvalues(model, test, k=1, seed=args.seed)
    lines.append(f"top Hessian eigenvalue (test loss): {float(eig.eigenvalues[0]):.4g}")
    results["Sharpness: top Hessian eigenvalue"] = eig
    spec_rows = analysis.spectral_metrics(model)
    lines.append(f"spectral metrics: {len(spec_rows.analysed)} layers analysed, {len(spec_rows.skipped)} skipped")
    results["Spectral metrics per layer"] = spec_rows
    results["Norm-based measures (Jiang et al. 2020)"] = analysis.norm_measures(model, test)
    report = viz.Report(f"weightspace analyze: {name}").add_text("\n".join(lines), title="Summary")
    report.section("Weights").add(
        viz.weight_histogram_figure({name: model} | ({Path(args.compare).name: other} if other else {})),
        title="Weight histograms")
    viz.analysis_report(results, report=report,
                        provenance={"command": "weightspace analyze " + " ".join(sys.argv[2:]),
                                    "checkpoint": args.checkpoint, "seed": args.seed})
    for line in lines:
        print(line)
    report.write(out, overwrite=args.overwrite)
    print(f"wrote {out} ({report.num_figures} figures)")
    return 0


# ---------------------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    """Train digits models, merge them with several methods, measure them and write an offline report
    (see :mod:`weightspace._cli_demo`)."""
    from weightspace import _cli_demo

    _output(args.out, args, "--out")  # refuse a bad --out before any work
    say = (lambda *a: None) if args.quiet else print
    return _cli_demo.run(args, say, lambda label: _Progress(label, args.quiet))


# ---------------------------------------------------------------------------------------------
def _count(least: int, what: str = "a count"):
    """An argparse type: an integer >= ``least`` (``--trials 0`` would check nothing and say so with exit 0)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}")
        if v < least:
            raise argparse.ArgumentTypeError(f"must be an integer >= {least} ({what}), got {v}")
        return v

    parse.__name__ = "integer"
    return parse


def _verbosity(sub: bool) -> argparse.ArgumentParser:
    """-q/-v, accepted before and after the subcommand (the subcommand's copy has its own dest; main()
    adds them up)."""
    p = argparse.ArgumentParser(add_help=False)
    suffix = "_sub" if sub else ""
    p.add_argument("-v", "--verbose", action="count", default=0, dest="verbose" + suffix,
                   help="more log output (-vv for debug and tracebacks)")
    p.add_argument("-q", "--quiet", action="store_true", dest="quiet" + suffix, help="only errors and the final line")
    return p


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="weightspace", description="Weight-space analysis and model merging.",
                                parents=[_verbosity(False)])
    sub = p.add_subparsers(dest="command", required=True)
    common = _verbosity(True)

    d = sub.add_parser("demo", parents=[common], help="train digits models, merge them with several methods, measure, write an offline report")
    d.add_argument("--out", default="demo.html", help="HTML report to write (default demo.html)")
    d.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--epochs", type=_count(1, "training epochs"), default=20)
    d.add_argument("--width", type=_count(1, "hidden units"), default=128)
    d.add_argument("--alphas", type=_count(2, "interpolation points, ends included"), default=25)
    d.add_argument("--grid", type=_count(2, "points per axis"), default=15, help="loss-plane grid points per axis")
    d.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (default cpu)")
    d.set_defaults(func=cmd_demo)

    for name, func, text in (("spec", cmd_spec, "print the permutation spec discovered by tracing"),
                             ("graph", cmd_graph, "print the neural computational graph"),
                             ("analyze", cmd_analyze, "landscape, path-norm, sharpness and spectra of a checkpoint on digits")):
        s = sub.add_parser(name, parents=[common], help=text)
        if name == "analyze":
            s.add_argument("checkpoint", help="weights (.safetensors or .pt state dict)")
        s.add_argument("--model", required=True, help="model factory as pkg.module:callable (or a zoo name: mlp, vgg, resnet20, vit)")
        s.add_argument("--model-kwargs", default=None, help="JSON keyword arguments for the factory")
        if name != "analyze":
            s.add_argument("--checkpoint", default=None, help="optional weights (.safetensors or .pt state dict)")
        s.add_argument("--input-shape", required=name != "analyze", default="2,64", help="example input shape, e.g. 1,3,32,32")
        s.add_argument("--input-dtype", choices=("float32", "long"), default="float32")
        s.add_argument("--input-high", type=_count(1, "token ids are drawn from [0, high)"), default=100, help="exclusive upper bound for --input-dtype long")
        s.add_argument("--seed", type=int, default=0)
        s.set_defaults(func=func)
        if name == "analyze":
            s.add_argument("--report", default="analysis.html", help="HTML report to write")
            s.add_argument("--overwrite", action="store_true")
            s.add_argument("--compare", default=None, help="a second checkpoint: interpolation and barrier")
            s.add_argument("--grid", type=_count(2, "points per axis"), default=21)
            s.add_argument("--alphas", type=_count(2, "interpolation points, ends included"), default=25)
        elif name == "spec":
            s.add_argument("--check", action="store_true", help="also verify the spec numerically")
            s.add_argument("--trials", type=_count(1, "random permutations per mode"), default=3)
            s.add_argument("--json", default=None, help="write groups and Git Re-Basin axes_to_perm to this file")
            s.add_argument("--overwrite", action="store_true", help="replace --json if it exists")
        else:
            s.add_argument("--max-layers", type=_count(1, "layers to list"), default=40)
    from weightspace import _cli_merge  # the merge command lives in its own module

    _cli_merge.add_parser(sub)
    return p


def _cwd_importable() -> None:
    """``--model mypkg.models:build`` resolves against the current directory, as under ``python -m
    weightspace`` (the console script's ``sys.path`` starts at its own bin directory instead)."""
    cwd = os.getcwd()
    if cwd not in [os.path.abspath(p or os.curdir) for p in sys.path]:
        sys.path.insert(0, cwd)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    args.verbose = args.verbose + getattr(args, "verbose_sub", 0)
    args.quiet = args.quiet or getattr(args, "quiet_sub", False)
    _cwd_importable()
    level = logging.ERROR if args.quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(str(exc.code), file=sys.stderr)
        return 2
    except Exception as exc:  # the CLI turns errors into one readable line; -vv shows the traceback
        if args.verbose >= 2:
            raise
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
