"""AMA under DDP (2 CPU processes, gloo): the logits' gradients are averaged across ranks."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

VOCAB = 48


def _batch(rank: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(100 + rank))


def _averager():
    from taxfree.merging.ama import AdaptiveModelAverager
    from taxfree.models import tiny_llama

    sft = tiny_llama(VOCAB, seed=0, hidden_size=32, num_layers=3, num_heads=2).eval()
    aligned = tiny_llama(VOCAB, seed=1, hidden_size=32, num_layers=3, num_heads=2).eval()
    ama = AdaptiveModelAverager(sft, aligned, blocks="block3")
    with torch.no_grad():
        for p, v in zip(ama.block_logits, [0.4, -0.3, 0.1]):
            p.fill_(v)
    return ama


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(_averager())
        ids = _batch(rank)
        ddp(ids, labels=ids).loss.backward()
        grads = torch.stack([p.grad for p in ddp.module.block_logits])
        optimizer = torch.optim.SGD(ddp.module.trainable_parameters(), lr=10.0)
        optimizer.step()
        logits = torch.stack([p.detach() for p in ddp.module.block_logits])
        torch.save({"grads": grads, "logits": logits, "ignored": len(ddp.parameters_to_ignore)}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_ddp_averages_logit_gradients(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))

    single = []
    for rank in range(2):  # each rank's batch alone, in this process
        ama = _averager()
        ids = _batch(rank)
        ama(ids, labels=ids).loss.backward()
        single.append(torch.stack([p.grad for p in ama.block_logits]))
    mean = (single[0] + single[1]) / 2
    assert not torch.allclose(single[0], single[1])  # the ranks really saw different data
    torch.testing.assert_close(r0["grads"], mean, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(r1["grads"], mean, rtol=1e-5, atol=1e-8)
    assert torch.equal(r0["logits"], r1["logits"])  # identical logits after the step on every rank
    assert r0["ignored"] > 0  # the frozen models are not synchronised by DDP
