import math

import pytest
import torch

from randprop import random as rnd


def test_derive_seed_is_deterministic_and_distinct():
    seeds = {
        rnd.derive_seed(0, layer, step, rank)
        for layer in range(5)
        for step in range(50)
        for rank in range(3)
    }
    assert len(seeds) == 5 * 50 * 3
    assert rnd.derive_seed(7, 1, 2, 0) == rnd.derive_seed(7, 1, 2, 0)
    assert all(0 <= s < 2**63 for s in seeds)


def test_draws_repeat_from_seed_and_leave_global_rng_alone():
    state = torch.get_rng_state()
    a = rnd.rademacher((100,), rnd.generator(3), torch.device("cpu"), torch.float32)
    b = rnd.rademacher((100,), rnd.generator(3), torch.device("cpu"), torch.float32)
    assert torch.equal(a, b) and set(a.tolist()) == {-1.0, 1.0}
    assert torch.equal(torch.get_rng_state(), state)


def test_sample_indices_without_replacement_are_distinct_and_uniform():
    n, k, draws = 10, 3, 4000
    idx = rnd.sample_indices(n, k, rnd.generator(0), torch.device("cpu"), batch_shape=(draws,))
    assert all(len(set(row.tolist())) == k for row in idx[:100])
    counts = torch.bincount(idx.flatten(), minlength=n).double()
    p = k / n  # inclusion probability of each index
    expected, sd = draws * p, math.sqrt(draws * p * (1 - p))
    assert ((counts - expected).abs() / sd).max() < 4.5


def test_sample_indices_rejects_k_out_of_range():
    with pytest.raises(ValueError, match="k must be"):
        rnd.sample_indices(5, 6, rnd.generator(0), torch.device("cpu"))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_projection_has_identity_second_moment(kind):
    n, k, draws = 6, 3, 3000
    gen = rnd.generator(1)
    rrt = torch.stack(
        [
            (r := rnd.projection(n, k, gen, torch.device("cpu"), torch.float64, kind)) @ r.T
            for _ in range(draws)
        ]
    )
    mean, se = rrt.mean(0), rrt.std(0) / math.sqrt(draws)
    eye = torch.eye(n, dtype=torch.float64)
    noisy = se > 0
    assert ((mean - eye)[noisy].abs() / se[noisy]).max() < 4.5
    assert torch.allclose(mean[~noisy], eye[~noisy])


def test_bernoulli_mask_rate():
    mask = rnd.bernoulli_mask((20000,), 0.1, rnd.generator(2), torch.device("cpu"))
    sd = math.sqrt(0.1 * 0.9 / 20000)
    assert abs(mask.double().mean().item() - 0.1) < 4.5 * sd


def test_streams_never_share_a_seed_and_stay_reproducible():
    args = [(s, layer, step) for s in (0, 1) for layer in (0, 1, 0xDA7A) for step in (0, 1, 2)]
    seeds = {
        (stream, *a): rnd.derive_seed(*a, stream=stream) for stream in rnd.STREAMS for a in args
    }
    assert len(set(seeds.values())) == len(seeds)  # every (stream, seed, layer, step) its own
    assert rnd.derive_seed(3, 1, 2, 0, stream=rnd.STREAM_DATA) == rnd.derive_seed(
        3, 1, 2, 0, stream=rnd.STREAM_DATA
    )
    assert rnd.derive_seed(3, 1, 2) == rnd.derive_seed(3, 1, 2, 0, stream=rnd.STREAM_LAYER)


def test_name_id_is_stable_and_distinct():
    names = ["", "0", "a.0", "b.0", "encoder.layers.10.mlp.fc1", "é"]
    ids = [rnd.name_id(n) for n in names]
    assert len(set(ids)) == len(ids) and all(0 <= i < 2**63 for i in ids)
    assert rnd.name_id("a.0") == 5968579018935537426  # the same in every process


def test_subseed_differs_from_its_seed_and_between_tags():
    from randprop.random import SUBSEED_QUANT, subseed

    seeds = {subseed(s, t) for s in range(50) for t in (SUBSEED_QUANT, 2)}
    assert len(seeds) == 100 and not seeds & set(range(50))
    assert subseed(5, SUBSEED_QUANT) == subseed(5, SUBSEED_QUANT) < 2**63


def test_systematic_slots_inclusion_probabilities_with_a_fractional_total():
    """Each index is in a valid slot with probability probs[i], at most once; the positive
    control (probabilities read off a shifted vector) is rejected by the same check."""
    probs = torch.tensor([0.9, 0.05, 0.4, 0.65, 1.0, 0.0, 0.3])  # sums to 3.3: 4 slots
    gen = rnd.generator(2)
    draws, counts = 3000, torch.zeros(7, dtype=torch.float64)
    for _ in range(draws):
        idx, valid = rnd.systematic_slots(probs, 4, gen)
        kept = idx[valid]
        assert idx.shape == valid.shape == (4,) and kept.unique().numel() == kept.numel()
        counts[kept] += 1
    p = probs.double()
    bound = 4.5 * (p * (1 - p) / draws).sqrt() + 1e-12
    assert ((counts / draws - p).abs() <= bound).all(), counts / draws
    assert not ((counts / draws - p.roll(1)).abs() <= bound).all()
    with pytest.raises(ValueError, match="k must be at least 1"):
        rnd.systematic_slots(probs, 0, gen)
