"""The ``weightspace merge`` command.

    weightspace merge A B [C ...] --out merged.safetensors --method NAME
        [--model pkg.module:callable [--model-kwargs JSON] --input-shape 2,64] [--base BASE] [--data digits]
        [--option key=value ...] [--weights 0.5,0.5 | --alpha 0.3] [--repair bn_reset|repair]
        [--seed 0] [--device auto] [--overwrite] [--report report.html]

* Elementwise methods (``average``, ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``) need no
  ``--model``: with safetensors inputs and a ``.safetensors`` output they stream, one tensor at a time, so
  checkpoints larger than memory merge on a small machine.
* Methods that permute hidden units (``weight_matching``, ...) need ``--model`` to trace the permutation
  spec (``--input-shape`` gives the example input; zoo models know their own).
* ``--data digits`` uses the embedded scikit-learn digits: for data-driven methods and repair (train split)
  and for the summary (test loss and accuracy of every input and of the merge, and the merge's barrier:
  its test loss minus the weighted mean of the inputs' losses).

The output is written atomically and never replaces an input or an existing file (``--overwrite`` allows
the latter); method, options, weights, seed, inputs and library versions go into the safetensors metadata
(key ``weightspace.merge``, JSON). Every check runs before anything is computed or written.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

__all__ = ["add_parser", "run"]

_METADATA_KEY = "weightspace.merge"


class CLIError(ValueError):
    """A bad command line (the message says which argument and what to do)."""


def add_parser(subparsers) -> Any:
    """Register ``merge`` on the ``weightspace`` command's subparsers."""
    import argparse

    p = subparsers.add_parser(
        "merge",
        help="merge two or more checkpoints (streams elementwise methods)",
        description="\n\n".join(__doc__.split("\n\n")[1:3]) if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", help="checkpoints to merge (.safetensors or .pt state dicts), model_a first")
    p.add_argument("--out", required=True, help="merged checkpoint to write (.safetensors recommended)")
    p.add_argument("--method", default="average", help="a method of merging.methods() (default average)")
    p.add_argument(
        "--model",
        default=None,
        help="model factory pkg.module:callable (or a zoo name); needed by "
        "methods that permute units and by --data/--repair",
    )
    p.add_argument("--model-kwargs", default=None, help="JSON keyword arguments for the factory")
    p.add_argument("--input-shape", default=None, help="example input shape for tracing, e.g. 2,64 or 1,3,32,32")
    p.add_argument("--input-dtype", choices=("float32", "long"), default="float32")
    p.add_argument("--input-high", type=int, default=100, help="exclusive upper bound for --input-dtype long")
    p.add_argument("--base", default=None, help="pretrained checkpoint, for task-vector methods")
    p.add_argument("--data", default=None, choices=("digits",), help="embedded data: digits (scikit-learn)")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help='a method option, repeatable (values parsed as JSON when possible: 0.2, true, "x")',
    )
    p.add_argument("--weights", default=None, help="comma-separated weights, one per input, summing to 1")
    p.add_argument("--alpha", type=float, default=None, help="two inputs: weight of the second, in [0, 1]")
    p.add_argument("--repair", default=None, choices=("bn_reset", "repair"), help="needs --model and --data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--overwrite", action="store_true", help="replace --out / --report if they exist (never an input)")
    p.add_argument("--report", default=None, help="also write an HTML merge report")
    p.set_defaults(func=run)
    return p


# --------------------------------------------------------------------------------------------------
# argument checks (all before any work)
# --------------------------------------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    low = text.strip()
    aliases = {"None": None, "none": None, "True": True, "False": False}
    if low in aliases:
        return aliases[low]
    try:
        return json.loads(low)
    except ValueError:
        return text


def parse_options(items: Sequence[str], valid: Dict[str, Any], method: str) -> Dict[str, Any]:
    """``["density=0.2", "trim=global"]`` -> ``{"density": 0.2, "trim": "global"}``, checked against ``valid``."""
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CLIError(f"--option {item!r} is not KEY=VALUE (e.g. --option density=0.2)")
        if key not in valid:
            raise CLIError(
                f"--option {key}: method {method!r} has no option {key!r}; its options are "
                f"{', '.join(f'{k} (default {v!r})' for k, v in valid.items()) or 'none'}"
            )
        if key in out:
            raise CLIError(f"--option {key} is given twice")
        out[key] = _parse_value(value)
    return out


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _check_paths(args, inputs: List[Path], base: Optional[Path]) -> tuple:
    out = Path(args.out)
    report = Path(args.report) if args.report else None
    for p in inputs + ([base] if base is not None else []):
        if not p.exists():
            raise CLIError(f"input checkpoint {p} does not exist")
        if p.is_dir():
            raise CLIError(f"input checkpoint {p} is a directory; pass the weights file inside it")
    for target, flag in ((out, "--out"), (report, "--report")):
        if target is None:
            continue
        for p in inputs + ([base] if base is not None else []):
            if _same_file(target, p):
                raise CLIError(f"{flag} {target} is the input checkpoint {p}; write to a new file")
        if target.exists() and not args.overwrite:
            raise CLIError(f"{flag} {target} already exists; pass --overwrite to replace it")
        if not target.parent.is_dir():
            raise CLIError(f"the directory of {flag} {target} does not exist; create it first")
    if report is not None and _same_file(report, out):
        raise CLIError("--report and --out name the same file")
    if out.suffix not in (".safetensors", ".pt", ".pth", ".bin"):
        raise CLIError(f"--out {out}: use a .safetensors (recommended) or .pt file name")
    return out, report


def _weights(args, n: int) -> dict:
    if args.weights is None:
        return {} if args.alpha is None else {"alpha": args.alpha}
    if args.alpha is not None:
        raise CLIError("pass either --weights or --alpha, not both")
    try:
        w = [float(x) for x in args.weights.split(",") if x.strip()]
    except ValueError:
        raise CLIError(f"--weights must be comma-separated numbers, got {args.weights!r}") from None
    if len(w) != n:
        raise CLIError(f"--weights has {len(w)} values for {n} inputs")
    return {"weights": w}


def _example(args, model: torch.nn.Module) -> Any:
    if args.input_shape:
        try:
            shape = tuple(int(s) for s in args.input_shape.replace("x", ",").split(",") if s.strip())
        except ValueError:
            raise CLIError(
                f"--input-shape must be comma-separated integers such as 2,64, got {args.input_shape!r}"
            ) from None
        if not shape or any(s < 1 for s in shape):
            raise CLIError(f"--input-shape must be positive integers, got {args.input_shape!r}")
        g = torch.Generator().manual_seed(args.seed)
        if args.input_dtype == "long":
            return torch.randint(0, args.input_high, shape, generator=g)
        return torch.randn(shape, generator=g)
    from weightspace import zoo

    try:
        return zoo.example_inputs(model, batch=2, seed=args.seed)
    except TypeError:
        return None


def _streams_aligned(args, info, inputs: List[Path], out: Path) -> bool:
    """Weight matching (aligning, data-free) of two safetensors files into a .safetensors file, no --data or
    --repair: ``merging.merge`` streams it (the other aligning methods need the models)."""
    return (
        info.aligns
        and "data" not in info.needs
        and len(inputs) == 2
        and out.suffix == ".safetensors"
        and all(p.suffix == ".safetensors" for p in inputs)
        and args.data is None
        and args.repair is None
    )


META_TEMPLATE_BYTES = 256 * 2**20  # checkpoints from this size on: the template is built on the meta device


def _trace_spec_on_meta(args, kwargs: Dict[str, Any], checkpoint_bytes: int):
    """The permutation spec of ``--model``, traced on a template built on the meta device (no memory for
    its weights) when the checkpoint has at least ``META_TEMPLATE_BYTES``; smaller ones, and models that
    cannot be built or traced on meta, get a CPU template (tracing on meta first imports torch's meta
    kernels, which takes seconds). Returns ``(spec, device name)``."""
    import logging

    import weightspace as ws
    from weightspace import io

    if checkpoint_bytes < META_TEMPLATE_BYTES:
        template = io.build_model(args.model, **kwargs)
        return ws.permutation_spec(template, _example(args, template)), "cpu"

    def to_meta(x):
        if torch.is_tensor(x):
            return x.to("meta")
        if isinstance(x, (list, tuple)):
            return type(x)(to_meta(v) for v in x)
        if isinstance(x, dict):
            return {k: to_meta(v) for k, v in x.items()}
        return x

    try:
        with torch.device("meta"):
            template = io.build_model(args.model, **kwargs)
        x = _example(args, template)
        return ws.permutation_spec(template, to_meta(x)), "meta"
    except Exception as e:  # noqa: BLE001 -- any failure on meta: the CPU template is the reference path
        logging.getLogger(__name__).warning("tracing --model on the meta device failed (%s); building it on the CPU", e)
    template = io.build_model(args.model, **kwargs)
    return ws.permutation_spec(template, _example(args, template)), "cpu"


def _digits(x: Any):
    from weightspace import zoo

    flat = not (torch.is_tensor(x) and x.dim() == 4)
    return zoo.load_digits("train", flat=flat), zoo.load_digits("test", flat=flat)


# --------------------------------------------------------------------------------------------------
def _save(state_dict, out: Path, settings: dict, overwrite: bool) -> None:
    """Write the merged weights (atomically, never over an input) with the settings in the metadata."""
    from weightspace import io
    from weightspace.results import to_jsonable

    io.save_state_dict(state_dict, out, {_METADATA_KEY: json.dumps(to_jsonable(settings))}, overwrite=overwrite)


def run(args) -> int:
    """Run ``weightspace merge``; returns the exit status (errors raise with a message naming the argument)."""
    import merging
    from weightspace import io
    from weightspace.results import to_jsonable, versions

    t_start = time.perf_counter()
    stages: Dict[str, float] = {}
    say = (lambda *a, **k: None) if getattr(args, "quiet", False) else print
    methods = merging.methods()
    if args.method not in methods:
        raise CLIError(f"--method {args.method!r} is unknown; valid methods: {', '.join(sorted(methods))}")
    info = methods[args.method]
    inputs = [Path(p) for p in args.inputs]
    base = Path(args.base) if args.base else None
    if len(inputs) < info.min_models:
        raise CLIError(f"method {info.name!r} needs at least {info.min_models} inputs, got {len(inputs)}")
    if "base" in info.needs and base is None:
        raise CLIError(f"method {info.name!r} merges task vectors: pass --base (the pretrained checkpoint)")
    if base is not None and "base" not in info.needs:
        raise CLIError(f"method {info.name!r} does not use --base")
    out, report = _check_paths(args, inputs, base)
    valid = dict(info.options)
    if len(inputs) >= 3 and info.aligns and "merge_many" in methods:  # merge() runs MergeMany around the method
        valid = {**{k: v for k, v in methods["merge_many"].options.items() if k != "inner"}, **info.align_options}
    options = parse_options(args.option, valid, info.name)
    wkw = _weights(args, len(inputs))
    needs_model = (not info.elementwise) or args.repair is not None or args.data is not None or "spec" in info.needs
    if needs_model and not args.model:
        why = (
            "it permutes hidden units and needs the permutation spec"
            if not info.elementwise
            else "--repair/--data run the model"
        )
        raise CLIError(
            f"method {info.name!r} with these arguments needs --model pkg.module:callable (and --input-shape "
            f"unless it is a zoo model): {why}"
        )
    if "data" in info.needs and args.data is None:
        raise CLIError(f"method {info.name!r} is data-driven: pass --data digits")
    if args.repair is not None and args.data is None:
        raise CLIError(f"--repair {args.repair} measures activations: pass --data digits")
    common = dict(method=info.name, seed=args.seed, device=args.device, **wkw, **options)
    meta_settings = {
        "method": info.name,
        "options": {**valid, **options},
        "seed": args.seed,
        "inputs": [p.name for p in inputs],
        "base": base.name if base else None,
        "repair": args.repair,
        "device": args.device,
        **wkw,
        "versions": versions(),
    }

    metrics: Dict[str, Dict[str, float]] = {}
    res = None
    curves = {}
    if not args.model:
        files = inputs + ([base] if base is not None else [])
        stream = out.suffix == ".safetensors" and all(p.suffix == ".safetensors" for p in files)
        t0 = time.perf_counter()
        if stream:
            res = merging.merge(*inputs, base=base, out=out, overwrite=args.overwrite, **common)
            stages["merge"] = res.log["timings"]["total"]
            inner = {k: v for k, v in res.log.get("timings", {}).items() if k != "total"}
        else:
            res = merging.merge(*inputs, base=base, **common)
            stages["merge"] = time.perf_counter() - t0
            inner = dict(res.log.get("timings", {}))
            t0 = time.perf_counter()
            _save(res.state_dict, out, meta_settings, args.overwrite)
            stages["write"] = time.perf_counter() - t0
    elif _streams_aligned(args, info, inputs, out):
        # weight matching of two safetensors files streams: the spec is traced on a template built on the
        # meta device (no weights allocated), and merging.merge reads the files lazily and writes as it goes
        kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
        t0 = time.perf_counter()
        spec, where = _trace_spec_on_meta(args, kwargs, inputs[0].stat().st_size)
        stages["spec"] = time.perf_counter() - t0
        res = merging.merge(*inputs, spec=spec, out=out, overwrite=args.overwrite, **common)
        stages["merge"] = res.log["timings"]["total"]
        inner = {k: v for k, v in res.log.get("timings", {}).items() if k != "total"}
        say(f"permutation spec traced on a template on the {where} device: {len(spec.groups)} groups")
    else:
        kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
        t0 = time.perf_counter()
        template = io.build_model(args.model, **kwargs)
        models = [io.load_into(template, p) for p in inputs]
        base_model = io.load_into(template, base) if base is not None else None
        x = _example(args, template)
        train = test = None
        if args.data == "digits":
            train, test = _digits(x)
        stages["load"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = merging.merge(*models, base=base_model, example_inputs=x, data=train, repair=args.repair, **common)
        stages["merge"] = time.perf_counter() - t0
        inner = dict(res.log.get("timings", {}))
        t0 = time.perf_counter()
        _save(res.state_dict, out, meta_settings, args.overwrite)
        stages["write"] = time.perf_counter() - t0
        if test is not None:
            from weightspace.state import evaluate

            t0 = time.perf_counter()
            for p, m in zip(inputs, models):
                metrics[p.name] = evaluate(m, test)
            if res.model is not None:
                metrics["merged"] = evaluate(res.model, test)
            if report is not None and len(models) == 2 and res.model is not None:
                import analysis

                curves["A -> B (naive)"] = analysis.interpolate(models[0], models[1], {"test": test}, alphas=11)
                if res.alignment is not None:
                    b_aligned = res.alignment.apply(models[1])
                    curves["A -> B aligned"] = analysis.interpolate(models[0], b_aligned, {"test": test}, alphas=11)
            stages["evaluate"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- summary
    lines = [
        f"merged {len(inputs)} checkpoints with {info.name}: {info.paper}",
        f"options: {json.dumps(to_jsonable({**valid, **options}))}; seed {args.seed}",
    ]
    if res.log.get("streamed"):
        lg = res.log
        lines.append(
            f"streamed: read {lg['bytes_read'] / 2**20:.1f} MiB in all from {lg['input_bytes'] / 2**20:.1f} MiB of inputs, "  # noqa: E501
            f"wrote {lg['bytes_written'] / 2**20:.1f} MiB; largest working set {lg['largest_key_bytes'] / 2**20:.2f} MiB"  # noqa: E501
        )
    if res.alignment is not None and math.isfinite(float(res.alignment.objective)):
        lines.append(f"alignment objective: {float(res.alignment.objective):.6g}")
    if metrics:
        for name, m in metrics.items():
            lines.append(f"  {name:<28} test loss {m['loss']:.4f}  accuracy {m['accuracy']:.4f}")
        if "merged" in metrics:
            w = res.settings.get("weights") or [1 / len(inputs)] * len(inputs)
            mean_loss = sum(wk * metrics[p.name]["loss"] for wk, p in zip(w, inputs))
            lines.append(
                f"merge barrier (test loss of the merge - weighted mean of the inputs'): "
                f"{metrics['merged']['loss'] - mean_loss:.4f}"
            )
    stages["total"] = time.perf_counter() - t_start
    lines.append(
        "time: "
        + ", ".join(
            f"{k} {v:.2f} s"
            + (" (" + ", ".join(f"{ik} {iv:.2f} s" for ik, iv in inner.items()) + ")" if k == "merge" and inner else "")
            for k, v in stages.items()
        )
    )
    lines.append(f"wrote {out} ({out.stat().st_size / 2**20:.2f} MiB)")
    for line in lines:
        say(line)
    if report is not None:
        import viz

        rep = viz.Report(f"weightspace merge: {info.name}")
        rep.add_text("\n".join(lines), title="Summary")
        rep.add_text(
            json.dumps(to_jsonable({"settings": res.settings, "log": res.log}), indent=1, default=str),
            title="Settings and log",
        )
        if curves:
            rep.add(viz.barrier_figure(curves, metric="loss", split="test"), title="Test loss along the linear path")
        rep.write(report, overwrite=args.overwrite)
        say(f"wrote {report}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:  # pragma: no cover - convenience for python -m
    import argparse

    parser = argparse.ArgumentParser(prog="weightspace")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return run(args)
    except Exception as exc:  # noqa: BLE001
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
