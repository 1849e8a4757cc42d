"""Edits of the optimizer's state between steps, taken as torch.optim takes them (it reads each
parameter's state dict and its entries at every step): a state tensor replaced in its dict, a
parameter's dict replaced or removed, the whole state cleared. Every backend against the
per-parameter oracle whose torch.optim state is edited alike, over the steps after the edit;
on the native backends the held path binds the edited state and stays held
(docs/design.md §5: what a held plan checks)."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from conftest import DEVICE, NATIVE
from harness import Landscape, assert_state_close, clone_params, drive, make_params
from oracle import OracleSAM

import fastsam
from fastsam.backends.native import NativeBackend

SHAPES = [(1,), (7,), (6, 3, 3), (33, 5), (5,)]


def _edit(state, params, edit, base):
    """Edit ``state`` (a parameter → state dict mapping) as ``edit`` says."""
    p, q = params[1], params[3]
    if edit == "entry":  # a state tensor replaced by a new one with other values
        name = "momentum_buffer" if base == "sgd" else "exp_avg_sq"
        state[p][name] = torch.full_like(state[p][name], 0.25)
        if base == "adamw":
            state[q]["exp_avg"] = torch.zeros_like(state[q]["exp_avg"])
    elif edit == "step":  # Adam's step of one parameter set back (its steps then differ)
        state[p]["step"] = torch.tensor(1.0)
    elif edit == "dict":  # a parameter's state started afresh
        state[p] = {}
    elif edit == "del":
        del state[p]
    elif edit == "pop":
        state.pop(q)
    elif edit == "clear":
        state.clear()
    else:
        raise AssertionError(edit)


def _make(base, backend, params):
    if base == "sgd":
        return fastsam.SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9,
                           backend=backend)
    return fastsam.SAM(params, torch.optim.AdamW, rho=0.05, lr=1e-2, weight_decay=0.1,
                       backend=backend)


def _oracle(base, params):
    groups = [{"params": params, "rho": 0.05, "T": ("none", 0.0)}]
    if base == "sgd":
        return OracleSAM(groups, torch.optim.SGD, lr=0.1, momentum=0.9, foreach=False)
    return OracleSAM(groups, torch.optim.AdamW, lr=1e-2, weight_decay=0.1, foreach=False)


EDITS = [("sgd", e) for e in ("entry", "dict", "del", "pop", "clear")] + [
    ("adamw", e) for e in ("entry", "step", "dict", "del", "pop", "clear")]


@pytest.mark.parametrize("base,edit", EDITS)
def test_state_edits_are_followed(backend, base, edit):
    params = make_params(SHAPES, torch.float64, DEVICE, seed=5)
    ref = clone_params(params)
    opt, oracle = _make(base, backend, params), _oracle(base, ref)
    land = Landscape(SHAPES, seed=6)
    drive(opt, params, land, 4)
    drive(oracle, ref, land, 4)
    _edit(opt.state, params, edit, base)
    _edit(oracle.base.state, ref, edit, base)
    drive(opt, params, land, 4, first=4)
    drive(oracle, ref, land, 4, first=4)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-10, atol=1e-12)
    assert_state_close(opt, params, oracle.base, ref, rtol=1e-10, atol=1e-12)
    # the checkpoint holds the state as it is now
    saved = opt.state_dict()["state"]
    assert len(saved) == len(params)
    for i, p in enumerate(params):
        assert all(torch.equal(saved[i][k], v) for k, v in opt.state[p].items()
                   if isinstance(v, torch.Tensor))


@pytest.mark.skipif(not NATIVE or DEVICE.type != "cpu", reason="the cpu backend's held path")
@pytest.mark.parametrize("base,edit", EDITS)
def test_held_path_binds_edited_state(base, edit, monkeypatch):
    """After an edit the held path binds the state it finds (bit for bit the general path's)
    and stays held: once the edited parameters' state is made again, every update is held."""
    updates = []
    name = "held_sgd" if base == "sgd" else "held_adam"
    original = getattr(NativeBackend, name)

    def counted(self, *args, **kwargs):
        updates.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(NativeBackend, name, counted)
    params = make_params(SHAPES, torch.float32, DEVICE, seed=5)
    other = clone_params(params)
    held, general = _make(base, "cpu", params), _make(base, "cpu", other)
    general._held = None
    land = Landscape(SHAPES, seed=6)
    for opt, ps in ((held, params), (general, other)):
        drive(opt, ps, land, 4)
        _edit(opt.state, ps, edit, base)
    before = len(updates)
    for t in range(4, 9):
        for opt, ps in ((held, params), (general, other)):
            drive(opt, ps, land, 1, first=t)
        for p, q in zip(params, other):
            assert torch.equal(p, q)
        for p, q in zip(params, other):
            sa, sb = held.state[p], general.state[q]
            assert set(sa) == set(sb)
            assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # held updates over the 5 steps after the edit: all of them after a replaced entry (bound
    # afresh at once); after a dropped dict, all but the first (the general path makes the
    # state again); none where one parameter's Adam steps now differ from the others' (the
    # per-value update, over the state dicts as found)
    if edit == "entry":
        expected = 5
    elif base == "adamw" and edit != "clear":
        expected = 0
    else:
        expected = 4
    assert len(updates) - before == expected


@pytest.mark.skipif(not NATIVE or DEVICE.type != "cpu", reason="the cpu backend's held plan")
def test_held_entries_check():
    """HeldPlan's check of the state entries it bound from (csrc/binding/held_python.h
    Entries): a replaced or removed entry fails it; the same object set again, another key
    added, or an equal key that is another string object pass."""
    from fastsam import _C

    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(2)]
    dicts = [{"m": torch.ones(3), "other": 1} for _ in params]
    plan = _C.HeldPlan(params, [2], [])
    assert not plan.bind_entries("x", 0, dicts)  # no such entry: nothing bound
    assert plan.bind_entries("m", 0, dicts)
    assert plan.entries_unchanged()
    dicts[0]["m"] = dicts[0]["m"]  # the same object
    dicts[1]["extra"] = 2.0  # another key: the dict changed, its entry did not
    assert plan.entries_unchanged()
    key = "".join(["m"])  # an equal key, another string object (a loaded dict's)
    value = dicts[0].pop("m")
    dicts[0][key] = value
    assert plan.entries_unchanged()
    dicts[1]["m"] = torch.ones(3)  # replaced by an equal tensor: another object
    assert not plan.entries_unchanged()
    plan.unbind_entries()
    assert plan.bind_entries("m", 0, dicts)
    assert plan.entries_unchanged()
    del dicts[0]["m"]
    assert not plan.entries_unchanged()
    dicts[0]["m"] = value  # back: the entry holds its object again
    assert plan.entries_unchanged()
    with pytest.raises(TypeError):
        plan.bind_entries("m", 0, [dicts[0], 3])


def test_state_mapping_counts_changes_and_copies():
    """The shared state mapping (fastsam.optimizers._plan.StateMapping) counts each change of
    which dict a parameter has, not the changes inside one; copied and pickled, it is one
    again with the same entries; a state dict holds plain dicts only (torch.load with
    weights_only=True takes it)."""
    params = make_params(SHAPES, torch.float32, torch.device("cpu"), seed=5)
    opt = _make("adamw", "torch", params)
    drive(opt, params, Landscape(SHAPES), 2)
    state = opt.state
    assert state is opt.base_optimizer.state
    before = state.changes
    state[params[0]]["exp_avg"] = torch.zeros(1)  # inside a dict: not counted
    assert state.changes == before
    edits = [lambda: state.__setitem__(params[0], {}), lambda: state[torch.zeros(1)],
             lambda: state.pop(params[0]), lambda: state.setdefault(params[0], {}),
             lambda: state.update({params[1]: {}}), lambda: state.popitem(),
             lambda: state.__delitem__(params[2]), lambda: state.__ior__({}), state.clear]
    for edit in edits:
        count = state.changes
        edit()
        assert state.changes > count
    drive(opt, params, Landscape(SHAPES), 1)
    for twin in (copy.deepcopy(state), pickle.loads(pickle.dumps(state)), state.copy()):
        assert type(twin) is type(state) and twin.default_factory is dict
        assert len(twin) == len(state) > 0
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert len(loaded["state"]) == len(params)


def test_a_whole_optimizer_is_not_copied_but_its_state_dict_is():
    """torch.optim's pickling keeps only defaults, state and param_groups: a fastsam optimizer
    copied whole would lack its base optimizer. Copying or pickling one is refused with what
    to do instead; its state dict, loaded into a new optimizer, continues the same steps."""
    params = make_params(SHAPES, torch.float32, torch.device("cpu"), seed=5)
    opt = _make("adamw", "torch", params)
    land = Landscape(SHAPES)
    drive(opt, params, land, 2)
    for copier in (copy.deepcopy, copy.copy, pickle.dumps, lambda o: torch.save(o, io.BytesIO())):
        with pytest.raises(TypeError, match="state_dict"):
            copier(opt)
    twin_params = clone_params(params)
    twin = _make("adamw", "torch", twin_params)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    drive(opt, params, land, 2, first=2)
    drive(twin, twin_params, land, 2, first=2)
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)
