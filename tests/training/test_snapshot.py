"""Snapshots without Ray: the safetensors + JSON codec, the shard split, shared-memory slabs, and the
keeper's bookkeeping."""

import os

import numpy as np
import pytest
import torch

from actors import snapshot as snapshot_module
from actors.ddp_worker import DDPConfig, DDPConfigError
from actors.slab import SlabWriter, read_slab, read_slabs, slab_paths
from actors.snapshot import (
    KeeperConfig,
    Snapshot,
    SnapshotKeeper,
    StateView,
    apply_log,
    assign_shards,
    load_state,
    rng_state,
    set_rng_state,
    state_arrays,
)
from storage import ArtifactStore, StoreConfig
from storage.formats import SAFETENSORS, decode, encode
from storage.maintenance import gc


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


# -- per-step snapshots in shared memory (actors.slab) ------------------------------------------------
@pytest.fixture
def slab_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TIERFLOW_SNAPSHOT_DIR", str(tmp_path))
    return tmp_path


def slab_push(writer, model, opt, step: int, rank: int, losses=()):
    tensors, meta = state_arrays(model, opt)
    owner = assign_shards({k: v.numel() for k, v in tensors.items()}, 2)
    mine = {k: v for k, v in tensors.items() if owner[k] == rank}
    payload = {"shared": meta if rank == 0 else None, "rank": {"data": {"step": step}}, "losses": list(losses)}
    writer.push(step, mine, payload)
    writer.wait()


def test_a_slab_keeps_the_last_two_steps_and_never_shows_a_torn_slot(slab_env):
    paths = slab_paths("run-1", "train", 0)
    writer = SlabWriter(paths)
    big = {"w": torch.arange(300_000, dtype=torch.float32)}  # > INLINE_BYTES: copied on the writer's thread
    for step in (1, 2, 3):
        writer.push(step, {k: v * step for k, v in big.items()}, {"n": step})
        writer.wait()
    slots = sorted(read_slab(paths), key=lambda s: s["step"])
    assert [s["step"] for s in slots] == [2, 3] and slots[1]["meta"] == {"n": 3}
    assert np.array_equal(slots[1]["arrays"]["w"], big["w"].numpy() * 3)
    newest = next(p for p in paths if read_slab([p])[0]["step"] == 3)
    with open(newest, "r+b") as f:  # a writer killed mid-copy of step 5 left its "invalid" stamp
        f.seek(8)
        f.write((-1).to_bytes(8, "little", signed=True))
    assert [s["step"] for s in read_slab(paths)] == [2]
    writer.close(unlink=True)
    assert read_slab(paths) == []


def test_a_new_writer_discards_an_earlier_attempts_slab_and_plants_no_links(slab_env):
    paths = slab_paths("run-1", "train", 0)
    old = SlabWriter(paths)
    old.push(40, {"w": np.ones(3)}, {})
    old.close()
    os.symlink(slab_env / "elsewhere", paths[1])  # someone else's link in the shared directory
    SlabWriter(paths).push(2, {"w": np.zeros(3)}, {})
    assert [s["step"] for s in read_slab(paths)] == [2]  # step 40 of the last attempt is gone
    assert not (slab_env / "elsewhere").exists()


def test_the_keeper_collects_the_newest_step_every_rank_snapshotted(keeper, slab_env):
    model, opt = trained()
    writers = [SlabWriter(slab_paths("run-1", "train", r)) for r in (0, 1)]
    for rank in (0, 1):
        slab_push(writers[rank], model, opt, 4, rank, [(3, 1.0 + rank)])
    slab_push(writers[0], model, opt, 5, 0, [(3, 1.0), (4, 7.0)])  # rank 1 died before step 5 was in
    slabs = [{"node_id": None, "paths": w.paths} for w in writers]
    assert keeper.collect(slabs) == {"step": 4, "seen": 5}
    got = keeper.restore(1)
    assert got["step"] == 4 and got["source"] == "shm"
    assert set(got["shared"]) == set(state_arrays(model, opt)[0])  # both ranks' shares assembled
    assert keeper.losses() == {3: 1.5}  # step 4's loss is trimmed: the replay logs it again
    for rank in (0, 1):
        slab_push(writers[rank], model, opt, 3, rank)  # older than what the keeper holds: not adopted
    assert keeper.collect()["step"] == 4 and keeper.restore(0)["step"] == 4


# -- the gradient log: full copies every K steps, the all-reduced gradients in between --------------
def net() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)


def train_logging(model, opt, steps: int) -> list[dict[str, np.ndarray]]:
    """Train `steps` steps; return each step's gradients as the log holds them."""
    grads = []
    for _ in range(steps):
        model(torch.randn(5, 4)).pow(2).mean().backward()
        grads.append({f"grad/{n}": p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        opt.zero_grad(set_to_none=True)
    return grads


def copied(model, opt) -> tuple[dict[str, np.ndarray], dict]:
    tensors, meta = state_arrays(model, opt)
    return {k: v.numpy().copy() for k, v in tensors.items()}, meta


def assert_same_state(a, b) -> None:
    ta, ma = state_arrays(*a)
    tb, mb = state_arrays(*b)
    assert set(ta) == set(tb) and ma == mb
    assert all(torch.equal(ta[k], tb[k]) for k in ta)  # bit for bit


def test_redoing_the_logged_gradients_rebuilds_the_state_bit_for_bit():
    live = net()
    train_logging(*live, 3)
    base_arrays, base_meta = copied(*live)
    log = train_logging(*live, 5)  # the live run goes on; its gradients are logged

    rebuilt = net()
    load_state(*rebuilt, base_arrays, base_meta)
    apply_log(*rebuilt, log)
    assert_same_state(live, rebuilt)
    x = torch.randn(5, 4)  # and the next step agrees too (Adam's step counts came back)
    assert torch.equal(live[0](x), rebuilt[0](x))


def test_redoing_the_log_restores_the_buffers_forward_passes_update():
    def bn_net():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    live = bn_net()
    train_logging(*live, 2)
    base = copied(*live)
    log = []
    for entry in train_logging(*live, 3):  # as a rank logs them: the buffers after the step's forward
        log.append(entry | {f"buffer/{n}": b.numpy().copy() for n, b in live[0].named_buffers()})
    rebuilt = bn_net()
    load_state(*rebuilt, *base)
    apply_log(*rebuilt, log)
    assert_same_state(live, rebuilt)
    assert int(rebuilt[0][1].num_batches_tracked) == 5  # not the full copy's 2


def log_push(writer, model, step: int, rank: int, grads: dict[str, np.ndarray], losses=()):
    owner = assign_shards({k: v.nbytes for k, v in grads.items()}, 2)
    mine = {k: v for k, v in grads.items() if owner[k] == rank}
    writer.push(step, mine, {"kind": "grads", "rank": {"data": {"step": step}}, "losses": list(losses)})
    writer.wait()


def test_the_keeper_rebuilds_the_newest_step_from_full_copies_and_the_gradient_log(keeper, slab_env, monkeypatch):
    live = net()
    train_logging(*live, 2)
    model, opt = live
    k = 4  # a full copy every 4 steps, so a log of 5 slots
    paths = [slab_paths("run-1", "train", r, log_slots=k + 1) for r in (0, 1)]
    states, logs = [SlabWriter(p[:2]) for p in paths], [SlabWriter(p[2:]) for p in paths]
    for rank in (0, 1):
        slab_push(states[rank], model, opt, 2, rank)
    grads = train_logging(model, opt, 2)  # steps 2, 3 -> log entries stamped 3, 4
    at_4 = net()
    load_state(*at_4, *copied(model, opt))
    grads += train_logging(model, opt, 1)  # step 4 -> entry 5
    for i, g in enumerate(grads):
        for rank in (0, 1):
            if not (rank == 1 and i == 2):  # rank 1 died before its share of step 4's gradients was in
                log_push(logs[rank], model, 3 + i, rank, g, [(2 + i, float(rank))])
    slabs = [{"node_id": None, "paths": p} for p in paths]
    reads = []
    spy = lambda slabs, *a, **kw: reads.append((slabs, kw.get("with_arrays", True))) or read_slabs(slabs, *a, **kw)  # noqa: E731
    monkeypatch.setattr(snapshot_module, "read_slabs", spy)
    assert keeper.collect(slabs) == {"step": 4, "seen": 5}
    # Headers of every slot, then the arrays of just the full copy of step 2 and log entries 3 and 4.
    assert [(len(s[0]["paths"]), arrays) for s, arrays in reads] == [(len(paths[0]), False), (3, True)]
    monkeypatch.undo()
    got = keeper.restore(0)
    assert got["step"] == 4 and got["source"] == "shm" and len(got["log"]) == 2
    rebuilt = net()
    load_state(*rebuilt, got["shared"], got["shared_meta"])
    apply_log(*rebuilt, got["log"])
    assert_same_state(at_4, rebuilt)

    # The log survives a durable checkpoint: a resumed run redoes it too.
    back = Snapshot.from_tensors(decode(*encode(keeper._frozen(keeper._latest).to_tensors())[:2]))
    assert back.step == 4 and len(back.log) == 2
    assert all(np.array_equal(back.log[i][n], got["log"][i][n]) for i in range(2) for n in got["log"][i])

    # A torn entry ends the chain there: the full copy of step 2 plus entry 3 only.
    with open(next(p for p in paths[0][2:] if read_slab([p]) and read_slab([p])[0]["step"] == 4), "r+b") as f:
        f.seek(8)
        f.write((-1).to_bytes(8, "little", signed=True))
    fresh = SnapshotKeeper(KeeperConfig("run-2", "train", 2, handle_sigterm=False))
    assert fresh.collect(slabs)["step"] == 3 and len(fresh.restore(0)["log"]) == 1


def test_only_the_newest_durable_checkpoints_are_kept_when_asked(tmp_path):
    config = StoreConfig.from_urls([str(tmp_path / "store")])
    keeper = SnapshotKeeper(KeeperConfig("run-1", "train", 2, config, keep_durable=2, handle_sigterm=False))
    model, opt = trained()
    for step in (3, 6, 9):
        keeper._latest = snapshot_of(model, opt, step)
        keeper.persist()
    store = ArtifactStore(config)
    assert sorted(r.stage for r in store.manifests("run-1")) == ["train.ckpt-0000000006", "train.ckpt-0000000009"]
    assert gc(store, min_age_s=0)  # the forgotten checkpoint's blob is now garbage
    # A resumed run's keeper finds the newest.
    assert SnapshotKeeper(KeeperConfig("run-1", "train", 2, config, handle_sigterm=False)).restore(0)["step"] == 9


def test_snapshot_to_is_validated():
    with pytest.raises(DDPConfigError, match="snapshot_to"):
        DDPConfig(snapshot_to="disk")


def test_the_per_step_state_view_matches_state_dict_and_follows_replaced_tensors():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    view = StateView()

    def step():
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
        opt.zero_grad()

    def same_as_state_dict():
        arrays, meta = view.get(model, opt)
        tensors, expected = state_arrays(model, opt)
        assert set(arrays) == set(tensors) and meta == expected
        assert all(np.array_equal(arrays[k], v.numpy()) for k, v in tensors.items())
        return arrays

    before = same_as_state_dict()  # no optimizer state yet: Adam makes it at its first step
    step()
    first = same_as_state_dict()
    assert first is not before and any(k.startswith("optim/") for k in first)
    step()
    assert same_as_state_dict() is first  # steady state: the same views, updated in place
    with torch.no_grad():
        model[0].weight.data = torch.zeros(8, 4)  # reallocated under the optimizer's reference
    model[1].running_mean = torch.ones(8)  # a module reassigning a buffer
    assert same_as_state_dict() is not first
