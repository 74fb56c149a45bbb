"""Processor training (fit_processor) on one process and with DistributedDataParallel (2 gloo
processes on localhost), and sharded zoo / INR generation.

Oracles: two ranks end with identical parameters, equal to one process trained on the same global
batches; a sharded zoo equals the single-process zoo exactly (chunks are fixed by the settings).
"""

import os

import pytest
import torch
import torch.multiprocessing as mp

import weightspace as ws
from weightspace import nn as wsnn
from weightspace import zoo


def _data(n=10):
    models = [zoo.DigitsCNN(4, 2, seed=s) for s in range(n)]
    x = models[0].example_input()
    graphs = [ws.NeuralGraph.from_model(m, x) for m in models]
    y = torch.stack([m.head.bias.detach().sum() for m in models]).unsqueeze(1)  # a learnable target
    return graphs, y


def _processor():
    torch.manual_seed(0)
    return wsnn.GraphProcessor(1, hidden_channels=8, num_layers=1)


def _fit(model, graphs, y):
    # 10 items, global batch 4: batches of 4, 4, 2 -> also checks the uneven last batch
    return wsnn.fit_processor(
        model, graphs, y, collate=ws.NeuralGraph.batch, epochs=2, batch_size=4, lr=1e-2, seed=3, device="cpu"
    )


ZOO_KW = dict(n_models=5, n_mixed=2, seed=1, group_size=2, steps=(3, 6), device="cpu", cache=False)
INR_KW = dict(variant="shared_permuted", limit=2, steps=5, batch_size=3, device="cpu", cache=False)


def _worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        graphs, y = _data()
        p = _processor()
        _fit(p, graphs, y)
        z = zoo.digits_cnn_zoo(**ZOO_KW)
        inr = zoo.digits_inrs(**INR_KW)
        torch.save(
            {
                "params": p.state_dict(),
                "zoo": list(z.states),
                "meta": list(z.metadata),
                "inr": list(inr.states),
                "inr_meta": list(inr.metadata),
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_fit_processor_learns_and_is_deterministic():
    graphs, y = _data(16)
    p1, p2, p3 = _processor(), _processor(), _processor()
    r1 = wsnn.fit_processor(
        p1,
        graphs,
        y,
        collate=ws.NeuralGraph.batch,
        epochs=15,
        batch_size=4,
        lr=1e-2,
        seed=0,
        device="cpu",
        eval_inputs=graphs,
        eval_targets=y,
    )
    r2 = wsnn.fit_processor(
        p2, graphs, y, collate=ws.NeuralGraph.batch, epochs=3, batch_size=4, lr=1e-2, seed=0, device="cpu"
    )
    r3 = wsnn.fit_processor(
        p3, graphs, y, collate=ws.NeuralGraph.batch, epochs=3, batch_size=4, lr=1e-2, seed=0, device="cpu"
    )
    assert all(torch.equal(a, b) for a, b in zip(p2.state_dict().values(), p3.state_dict().values()))
    assert r2.history == r3.history
    assert [h["train_loss"] for h in r2.history] == [h["train_loss"] for h in r1.history[:3]]
    assert r1.history[-1]["train_loss"] < 0.75 * r1.history[0]["train_loss"]
    assert r1.history[-1]["eval_kendall_tau"] > 0.5
    assert r1.settings["world_size"] == 1 and r1.to_dict()["type"] == "ProcessorFit"
    pred = wsnn.predict(p1, graphs, collate=ws.NeuralGraph.batch, batch_size=5)
    assert pred.shape == (16, 1)
    with pytest.raises(wsnn.TrainingError, match="targets"):
        wsnn.fit_processor(p1, graphs, y[:3], collate=ws.NeuralGraph.batch)
    with pytest.raises(wsnn.TrainingError, match="empty"):
        wsnn.fit_processor(p1, [], y[:0], collate=ws.NeuralGraph.batch)


def test_ddp_two_processes_equal_one_process_and_sharded_generation(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    # DDP: parameters agree exactly across ranks, and equal a single-process run on the same global batches
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    graphs, y = _data()
    single = _processor()
    before = {k: v.clone() for k, v in single.state_dict().items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _fit(single, graphs, y)
        z = zoo.digits_cnn_zoo(**ZOO_KW)
        inr = zoo.digits_inrs(**INR_KW)
    finally:
        torch.set_num_threads(threads)
    moved = 0
    for k, v in single.state_dict().items():
        torch.testing.assert_close(r0["params"][k], v, rtol=1e-5, atol=1e-6)
        moved += int(not torch.allclose(v, before[k]))
    assert moved > 0  # training changed the parameters, so the comparison is not vacuous
    # sharded zoo and INRs (chunk c on rank c % 2) equal the single-process result exactly
    assert r0["meta"] == list(z.metadata) and r1["meta"] == list(z.metadata)
    for a, b in zip(r0["zoo"], z.states):
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert r0["inr_meta"] == list(inr.metadata)
    for a, b in zip(r1["inr"], inr.states):
        assert all(torch.equal(a[k], b[k]) for k in b)
