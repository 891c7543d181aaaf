"""Derived (prepacked) weights: one copy per weight, a new one after an in-place update, none after it is freed."""
from __future__ import annotations

import pytest
import torch

from autocomp_compile.targets.cuda import derived
from autocomp_compile.targets.cuda.runtime import CudaKernelError, launch_spec


def test_one_copy_per_weight_shared_by_views_and_detached_aliases():
    cache = derived.DerivedCache()
    w = torch.randn(6, 4)
    t = cache.get("transpose", w)
    assert torch.equal(t, w.t()) and t.is_contiguous()
    assert cache.get("transpose", w) is t
    assert cache.get("transpose", w.detach()) is t  # same storage, geometry and version counter
    assert cache.get("transpose", w.view(6, 4)) is t
    assert cache.made == 1
    assert torch.equal(cache.get("transpose", w[:3]), w[:3].t())  # another view: its own copy
    assert cache.made == 2


def test_an_in_place_update_refreshes_the_copy_where_it_is():
    cache = derived.DerivedCache()
    w = torch.randn(5, 3)
    copy = cache.get("transpose", w)
    before = copy.clone()
    w.mul_(-2.0)
    assert cache.get("transpose", w.detach()) is copy  # same address: a captured CUDA graph reads the new values
    assert torch.equal(copy, w.t()) and not torch.equal(copy, before)
    assert (cache.made, cache.refreshed) == (1, 1)


def test_a_freed_weight_leaves_no_copy_behind():
    cache = derived.DerivedCache()
    w = torch.randn(8, 8)
    cache.get("transpose", w)
    assert len(cache) == 1
    del w
    assert len(cache) == 0
    fresh = torch.randn(8, 8)  # may reuse the freed memory: must not see the old copy
    assert torch.equal(cache.get("transpose", fresh), fresh.t())


def test_writes_the_version_counter_misses_need_a_clear():
    cache = derived.DerivedCache()
    with torch.inference_mode():
        w = torch.randn(4, 2)
    assert torch.equal(cache.get("transpose", w), w.t())
    assert cache.get("transpose", w) is cache.get("transpose", w) and cache.made == 1  # inference tensors: cached
    v = torch.randn(4, 2)
    cache.get("transpose", v)
    v.data.copy_(torch.randn(4, 2))  # `.data` has a version counter of its own
    assert not torch.equal(cache.get("transpose", v), v.t())
    cache.clear()
    assert torch.equal(cache.get("transpose", v), v.t())


def test_refresh_updates_copies_in_place_without_a_kernel_call():
    """A CUDA graph's replay runs no Python: refresh() is what brings a captured copy up to date."""
    cache = derived.DerivedCache()
    w, untouched = torch.randn(5, 3), torch.randn(4, 4)
    copy, other = cache.get("transpose", w), cache.get("transpose", untouched)
    w.add_(1.0)
    assert not torch.equal(copy, w.t())  # no call since the update: stale
    assert cache.refresh() == 1 and torch.equal(copy, w.t())  # in place: the same address
    assert cache.get("transpose", w) is copy and cache.refreshed == 1  # not refreshed a second time
    w.data.mul_(3.0)  # missed by the version counter
    assert cache.refresh() == 0 and not torch.equal(copy, w.t())
    assert cache.refresh(force=True) == 2 and torch.equal(copy, w.t()) and torch.equal(other, untouched.t())
    del untouched
    assert cache.refresh(force=True) == 1  # a freed weight's copy is skipped


def test_copies_of_freed_weights_are_dropped_within_a_sweep(monkeypatch):
    monkeypatch.setattr(derived, "SWEEP_EVERY", 4)
    cache = derived.DerivedCache()
    kept, dropped = torch.randn(3, 3), torch.randn(3, 3)
    cache.get("transpose", dropped)
    del dropped
    for _ in range(4):
        cache.get("transpose", kept)  # only hits: the fourth call sweeps
    assert len(cache._entries) == 1 and len(cache._recent) == 1


def test_launch_lines_with_bad_derived_tensors_are_refused():
    head = '// autocomp-launch: {"kernels": [{"name": "k", "grid": [1, 1, 1], "block": [32, 1, 1], "args": ["@wt"]}]'
    assert launch_spec(head + ', "derived": {"wt": ["transpose", "w"]}}\n')["derived"] == {"wt": ["transpose", "w"]}
    with pytest.raises(CudaKernelError, match="does not define"):
        launch_spec(head + "}\n")
    with pytest.raises(CudaKernelError, match="expected"):
        launch_spec(head + ', "derived": {"wt": ["rotate", "w"]}}\n')
    with pytest.raises(ValueError, match="does not have"):
        derived.check_spec({"wt": ["transpose", "w"]}, ["x", "out"])


def test_a_tensor_pointed_at_other_memory_gets_its_copy():
    cache = derived.DerivedCache()
    w = torch.randn(4, 4)
    cache.get("transpose", w)
    w.data = torch.randn(4, 4)  # no in-place op, so no new version: the address tells
    assert torch.equal(cache.get("transpose", w), w.t())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here: the side-stream path needs one")
def test_gpu_copies_are_made_on_a_side_stream_and_refused_during_capture(monkeypatch):
    cache = derived.DerivedCache()
    w = torch.randn(64, 32, device="cuda")
    copy = cache.get("transpose", w)
    assert torch.equal(copy, w.t())  # the current stream waited for the side stream's copy
    w.mul_(2.0)
    assert cache.get("transpose", w) is copy and torch.equal(copy, w.t())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="captured"):
        cache.get("transpose", torch.randn(8, 8, device="cuda"))
