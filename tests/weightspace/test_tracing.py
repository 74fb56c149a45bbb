"""The public tracing harness: canonical names, categories, rule lookup, traced runs."""
import torch
import torch.nn as nn

from weightspace.tracing import (TracingMode, op_category, op_name, permute_order, tensor_keys, traced_run)


def test_op_name_canonicalises_inplace_and_reflected_dunders():
    assert op_name(torch.Tensor.__iadd__) == "add"
    assert op_name(torch.Tensor.__rmul__) == "mul"
    assert op_name(torch.Tensor.relu_) == "relu"
    assert op_name(torch.nn.functional.linear) == "linear"


def test_rule_lookup_prefers_exact_name_then_category():
    def exact(*a):
        return "exact"

    def unary(*a):
        return "unary"

    class Pass(TracingMode):
        rules = {"relu": exact}
        category_rules = {"unary": unary}

    p = Pass()
    assert p.rule_for("relu") is exact
    assert p.rule_for("tanh") is unary          # category fallback
    assert p.rule_for("add") is None            # binary: no rule in this pass
    assert op_category("linear") is None        # negative control: layers have no category


def test_traced_run_sees_calls_keeps_module_stack_and_restores_modes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.BatchNorm1d(3), nn.Linear(3, 2))
    model.train()
    model[2].eval()  # a frozen submodule of a train-mode model keeps its own flag
    x = torch.randn(5, 4)

    class Record(TracingMode):
        def __init__(self):
            super().__init__()
            self.stack, self.seen = [], []

        def handle(self, name, func, args, kwargs):
            self.seen.append((name, self.stack[-1] if self.stack else ""))
            return func(*args, **kwargs)

    rec = Record()
    out = traced_run(model, x, rec, rec.stack)
    with torch.no_grad():
        model.eval()
        expected = model(x)
        model.train()
        model[2].eval()
    assert torch.equal(out, expected)  # the base runs every call unchanged
    assert ("linear", "0") in rec.seen and ("relu", "1") in rec.seen and ("batch_norm", "2") in rec.seen
    assert not any(n in ("size", "dim", "prop:shape") for n, _ in rec.seen)  # shape queries ignored
    assert model.training and model[0].training and not model[2].training
    assert rec.stack == []


def test_permute_order_matches_torch():
    x = torch.randn(2, 3, 4, 5)
    for name, args, y in [("permute", (x, 2, 0, 3, 1), x.permute(2, 0, 3, 1)),
                          ("transpose", (x, 1, 3), x.transpose(1, 3)),
                          ("movedim", (x, 0, 2), x.movedim(0, 2)),
                          ("prop:mT", (x,), x.mT)]:
        order = permute_order(name, args, {}, x.dim())
        assert tuple(x.shape[i] for i in order) == tuple(y.shape)
        assert torch.equal(x.permute(*order), y)


def test_tensor_keys_groups_tied_weights_and_flags_non_persistent_buffers():
    m = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    m[1].weight = m[0].weight
    m.register_buffer("scratch", torch.zeros(1), persistent=False)
    by_id, tensors, persistent = tensor_keys(m)
    assert sorted(by_id[id(m[0].weight)]) == ["0.weight", "1.weight"]
    assert "scratch" in tensors and "scratch" not in persistent
