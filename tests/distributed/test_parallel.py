"""DDP and FSDP2 on 2 CPU processes (gloo): per-rank draws and estimator state, shared feedback
matrices, MEM-DFA through DDP, FSDP2 gradients against single-process runs.

One spawn runs every check (workers.py); the tests compare its per-rank results with each other
and with runs in this (non-distributed, rank 0) process.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import workers

import randprop as rp
from randprop.rules import MemDFA
from randprop.train.distributed import Context, per_rank_buffers

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return workers.run(["ddp", "fsdp"], tmp_path_factory.mktemp("ranks"))


def assert_same(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol, msg=k)


def test_draws_differ_per_rank_and_rank0_is_the_single_process_draw(ranks):
    r0, r1 = (r["ddp"]["rad_same_batch"] for r in ranks)
    assert_same(r0, workers.rad_grads(0), rtol=0, atol=0)  # here: not distributed, rank 0
    for name in r0:  # the same batch: sketched weight gradients differ, exact biases agree
        assert torch.equal(r0[name], r1[name]) == name.endswith("bias"), name


def test_feedback_matrices_identical_on_every_rank(ranks):
    r0, r1 = (r["ddp"] for r in ranks)
    assert_same(r0["fa"], r1["fa"], rtol=0, atol=0)
    for a, b in zip(r0["dfa"], r1["dfa"], strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(r0["dfa"][0], r0["dfa"][1])  # distinct per block


def test_estimator_state_stays_per_rank_through_a_ddp_forward(ranks):
    def memory(rank: int, name: str, when: int) -> torch.Tensor:
        return ranks[rank]["ddp"][f"state_{name}"][when]["3"]["aop_memory_x"]

    for rank in (0, 1):  # data_parallel: the forward leaves each rank's AOP memory as it was
        assert torch.equal(memory(rank, "kept", 0), memory(rank, "kept", 1))
    assert not torch.equal(memory(0, "kept", 1), memory(1, "kept", 1))
    # control: plain DDP overwrites rank 1's memory with rank 0's
    assert not torch.equal(memory(1, "plain", 0), memory(1, "plain", 1))
    assert torch.equal(memory(1, "plain", 1), memory(0, "plain", 1))
    # batch-norm statistics are still broadcast from rank 0
    assert torch.equal(ranks[0]["ddp"]["bn_kept"], ranks[1]["ddp"]["bn_kept"])


@pytest.mark.parametrize("static", [True, False])
def test_memdfa_through_ddp_equals_one_process_on_the_whole_batch(ranks, static):
    model = workers.mlp(4)
    rule = MemDFA(model, F.cross_entropy)
    both = [workers.batch(0, s) + workers.batch(1, s) for s in range(3)]
    whole = workers.memdfa_steps(
        model, rule, lambda s: (torch.cat(both[s][::2]), torch.cat(both[s][1::2]))
    )
    for rank in (0, 1):
        for got, want in zip(ranks[rank]["ddp"][f"memdfa_static={static}"], whole, strict=True):
            assert_same(got, want, rtol=1e-5, atol=1e-6)


def test_fsdp2_gradient_is_the_mean_of_the_ranks_single_process_gradients(ranks):
    """Same seeds: rank r's draws (seed, layer, step, r) on rank r's batch. FSDP2's reduced
    gradient must equal the mean over r of the unsharded single-process gradient with those
    draws and that batch; rank 0's is also what a non-distributed process computes."""
    r0, r1 = (r["fsdp"] for r in ranks)
    mean = {k: (r0["single"][k] + r1["single"][k]) / 2 for k in r0["single"]}
    for res in (r0, r1):
        assert_same(res["fsdp"], mean, rtol=1e-6, atol=1e-7)
    model = workers.mlp(5)
    rp.convert(model, "rad:keep=0.5", seed=7)
    F.cross_entropy(model(workers.batch(0)[0]), workers.batch(0)[1]).backward()
    assert_same(r0["single"], workers.grads(model), rtol=0, atol=0)
    assert any(not torch.equal(r0["single"][k], r1["single"][k]) for k in mean)  # can fail


def test_fsdp2_trains(ranks):
    for res in ranks:
        losses = res["fsdp"]["fsdp_losses"]
        assert losses[-1] < 0.97 * losses[0]


def test_shard_splits_a_batch_evenly_or_names_the_constraint():
    assert Context(1, 2).shard(torch.arange(6)).tolist() == [1, 3, 5]
    with pytest.raises(ValueError, match="batch 5 must be a multiple of the number of processes"):
        Context(0, 2).shard(torch.arange(5))


def test_per_rank_buffers_names_estimator_state_before_a_forward_creates_it():
    model = workers.mlp(0)
    rp.convert(model, {"0": "aop", "2": "crs", "*": "exact"})
    assert per_rank_buffers(model) == [
        "0.aop_memory_x", "0.aop_memory_d", "0.aop_memory_count", "2.crs_grad_norm"
    ]  # fmt: skip
    assert not dict(model.named_buffers())
