"""Snapshots without Ray: the safetensors + JSON codec, the shard split, and the keeper's bookkeeping."""

import numpy as np
import pytest
import torch

from actors.snapshot import (
    KeeperConfig,
    Snapshot,
    SnapshotKeeper,
    assign_shards,
    load_state,
    rng_state,
    set_rng_state,
    state_arrays,
)
from storage.formats import SAFETENSORS, decode, encode


def trained() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.9))
    for _ in range(3):
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def snapshot_of(model, opt, step: int, world: int = 2) -> Snapshot:
    tensors, meta = state_arrays(model, opt)
    shared = {k: v.numpy().copy() for k, v in tensors.items()}
    rng, rng_meta = rng_state()
    ranks = [{"arrays": rng, "meta": rng_meta}] + [{"arrays": {}, "meta": {}}] * (world - 1)
    return Snapshot(step, world, shared, meta, ranks, {s: 1.0 / (s + 1) for s in range(step)})


def test_a_snapshot_round_trips_through_safetensors_and_json_without_pickle():
    model, opt = trained()
    fmt, data, _ = encode(snapshot_of(model, opt, 3).to_tensors())
    assert fmt == SAFETENSORS and b"pickle" not in data[:200]
    back = Snapshot.from_tensors(decode(fmt, data))
    assert back.step == 3 and back.world_size == 2 and back.losses == {0: 1.0, 1: 0.5, 2: 1 / 3}

    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1.0)
    load_state(fresh, fresh_opt, back.shared, back.shared_meta)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert fresh_opt.param_groups[0]["lr"] == 1e-2 and fresh_opt.param_groups[0]["betas"] == (0.8, 0.9)
    # Both continue identically: the optimizer moments and step counts came back too.
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (fresh, fresh_opt)):
        m(x).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)


def test_rng_states_round_trip():
    arrays, meta = rng_state()
    first = (torch.rand(3), np.random.rand(3))
    set_rng_state(arrays, meta)
    again = (torch.rand(3), np.random.rand(3))
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])


def test_shards_are_balanced_deterministic_and_cover_every_tensor():
    sizes = {f"t{i}": s for i, s in enumerate([100, 90, 10, 10, 5, 5, 1])}
    owner = assign_shards(sizes, 2)
    assert owner == assign_shards(dict(reversed(sizes.items())), 2)
    assert set(owner) == set(sizes)
    load = [sum(sizes[k] for k, r in owner.items() if r == rank) for rank in (0, 1)]
    assert abs(load[0] - load[1]) <= 10


@pytest.fixture
def keeper():
    return SnapshotKeeper(KeeperConfig("run-1", "train", 2, handle_sigterm=False))


def push(keeper, model, opt, step: int, rank: int, losses=()):
    tensors, meta = state_arrays(model, opt)
    owner = assign_shards({k: v.numel() for k, v in tensors.items()}, 2)
    mine = {k: v.numpy() for k, v in tensors.items() if owner[k] == rank}
    rng, rng_meta = rng_state()
    payload = {"shared": meta if rank == 0 else None, "rank": rng_meta, "losses": list(losses)}
    return keeper.push(step, rank, mine | rng, payload)


def test_a_step_counts_only_once_every_rank_pushed_its_share(keeper):
    model, opt = trained()
    assert keeper.restore(0) is None
    assert push(keeper, model, opt, 1, 0, [(0, 2.0)]) == -1  # rank 1 has not pushed step 1 yet
    assert push(keeper, model, opt, 1, 1, [(0, 4.0)]) == 1
    got = keeper.restore(1)
    assert got["step"] == 1 and got["source"] == "memory"
    assert set(got["shared"]) == set(state_arrays(model, opt)[0])  # both halves assembled
    assert keeper.losses() == {0: 3.0}  # mean over ranks


def test_a_survivors_newer_replica_replaces_the_snapshot_and_trims_losses(keeper):
    model, opt = trained()
    for rank in (0, 1):
        push(keeper, model, opt, 4, rank, [(3, 1.0)])
    keeper._losses[4] = {0: 9.0}  # a step one rank finished but the snapshot did not cover
    tensors, meta = state_arrays(model, opt)
    rng, rng_meta = rng_state()
    arrays = {k: v.numpy() for k, v in tensors.items()} | rng
    assert not keeper.rescue(4, 1, dict(arrays), {"shared": meta, "rank": rng_meta, "losses": []})  # not newer
    assert keeper.rescue(5, 1, arrays, {"shared": meta, "rank": rng_meta, "losses": [(4, 3.0)]})
    got = keeper.restore(0)
    assert got["step"] == 5 and got["source"] == "survivor" and got["arrays"] == {}
    assert keeper.losses() == {3: 1.0, 4: 6.0}
