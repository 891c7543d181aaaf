"""The autocomp custom ops: PyTorch fallbacks, mask checks, and running a registered kernel."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from autocomp_compile.passes import ops
from autocomp_compile.passes.kernels import REGISTRY, BoundKernel
from autocomp_compile.workload import make_workload


def test_prefix_length_of_bool_and_additive_masks():
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    assert ops.prefix_length(causal[None, None, 4:5], 8) == 5
    additive = torch.zeros(1, 1, 1, 8).masked_fill(~causal[4], float("-inf"))
    assert ops.prefix_length(additive, 8) == 5
    assert ops.prefix_length(None, 8) == 8
    holes = causal[4].clone()
    holes[1] = False
    assert ops.prefix_length(holes[None, None, None], 8) is None
    assert ops.prefix_length(torch.full((1, 1, 1, 8), 0.5), 8) is None  # a bias, not a mask


def test_a_decode_mask_is_read_once_for_every_layer_and_again_after_an_in_place_write(monkeypatch):
    reads = []
    monkeypatch.setattr(ops, "prefix_length", lambda mask, kv_len: reads.append(kv_len) or int(mask.sum()))
    monkeypatch.setattr(ops, "_last_prefix", None)
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    mask = causal[None, None, 4:5].clone()
    assert [ops.decode_prefix_length(mask, 8) for _ in range(16)] == [5] * 16  # the 16 layers of one step
    assert len(reads) == 1
    mask[..., 5] = True  # the next step's row written into the same buffer
    assert ops.decode_prefix_length(mask, 8) == 6
    assert ops.decode_prefix_length(causal[None, None, 2:3].clone(), 8) == 3  # another tensor
    assert ops.decode_prefix_length(mask, 8) == 6 and ops.decode_prefix_length(mask, 16) == 6
    assert len(reads) == 5
    assert ops.decode_prefix_length(mask, 8) == 6 and ops.decode_prefix_length(mask, 8) == 6
    assert len(reads) == 6
    mask.numpy()[..., 6] = True  # written through NumPy: no version bump, but the prefix's end moved
    assert ops.decode_prefix_length(mask, 8) == 7
    assert len(reads) == 7
    assert ops.decode_prefix_length(None, 8) == 8


def test_masks_broadcast_over_keys_or_queries_mean_what_sdpa_makes_of_them():
    # a [.., 1] mask broadcasts over the keys: all of them, or none
    assert ops.prefix_length(torch.ones(1, 1, 1, 1, dtype=torch.bool), 32) == 32
    assert ops.prefix_length(torch.zeros(2, 1, 1, 1), 32) == 32
    assert ops.prefix_length(torch.zeros(1, 1, 1, 1, dtype=torch.bool), 32) == 0
    assert ops.prefix_length(torch.ones(1, 1, 1, 5, dtype=torch.bool), 32) is None  # does not broadcast to 32 keys
    padding = torch.ones(2, 1, 1, 8, dtype=torch.bool)  # key padding in prefill: every query sees every key
    assert not ops.is_causal_from_start(padding, 8, 8, False)
    assert ops.is_causal_from_start(torch.ones(8, 8, dtype=torch.bool).tril()[None, None].expand(2, 1, 8, 8), 8, 8, False)
    assert not ops.is_causal_from_start(torch.ones(2, 1, 1, 5, dtype=torch.bool), 8, 8, False)


@pytest.mark.parametrize("shape", [(1, 1, 1, 16), (2, 1, 1, 16), (2, 4, 1, 16), (16,), (1, 16), (1, 1, 1, 1), (3, 1, 1, 1),
                                   (1, 1, 1, 5), (2, 1, 3, 16)])
def test_host_and_torch_prefix_lengths_agree(shape):
    """Boolean CPU masks take the NumPy path, the same mask as an additive one takes torch's: both must read
    every mask alike."""
    gen = torch.Generator().manual_seed(sum(shape))
    for trial in range(40):
        n = int(torch.randint(0, 17, (), generator=gen))
        mask = (torch.arange(shape[-1]) < n).expand(shape).clone()
        if trial % 4 == 1:  # a hole somewhere
            mask.view(-1)[int(torch.randint(0, mask.numel(), (), generator=gen))] ^= True
        if trial % 4 == 2 and mask.dim() > 1 and mask.shape[0] > 1:  # rows with different prefixes
            mask[0] = torch.arange(shape[-1]) < max(n - 1, 0)
        additive = torch.zeros(shape).masked_fill(~mask, float("-inf"))
        assert ops.prefix_length(mask, 16) == ops.prefix_length(additive, 16), (mask, trial)


def test_causal_from_start_detection():
    causal = torch.ones(4, 8, dtype=torch.bool).tril()
    assert ops.is_causal_from_start(causal[None, None], 4, 8, False)
    assert not ops.is_causal_from_start(torch.ones(4, 8, dtype=torch.bool).tril(2)[None, None], 4, 8, False)
    assert ops.is_causal_from_start(None, 4, 4, True)
    assert not ops.is_causal_from_start(None, 4, 4, False)


def test_ops_without_a_kernel_compute_the_pytorch_result():
    x, w = torch.randn(3, 16), torch.randn(8, 16)
    torch.testing.assert_close(ops.LINEAR(x, w, "no-such-key"), x @ w.t())
    wg, wu, wd = torch.randn(32, 16), torch.randn(32, 16), torch.randn(16, 32)
    torch.testing.assert_close(ops.MLP(x, wg, wu, wd, "no-such-key"), (F.silu(x @ wg.t()) * (x @ wu.t())) @ wd.t())
    g = torch.randn(16)
    torch.testing.assert_close(ops.RMSNORM(x, g, 1e-5, "no-such-key"),
                               g * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 6, 8)
    mask = torch.tensor([True] * 3 + [False] * 3)[None, None, None]
    want = F.scaled_dot_product_attention(q, k, k, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(ops.ATTENTION(q, k, k, mask, False, "no-such-key"), want)


def test_attended_keys_is_the_last_key_some_query_may_see():
    causal = torch.ones(64, 64, dtype=torch.bool).tril()
    chunk = causal[None, None, 8:16]  # the second 8-token chunk of a prompt over a 64-position cache
    assert ops.attended_keys(chunk, 64) == 16
    additive = torch.zeros(chunk.shape).masked_fill(~chunk, float("-inf"))
    assert ops.attended_keys(additive, 64) == 16
    assert ops.attended_keys(None, 64) == 64
    assert ops.attended_keys(torch.ones(1, 1, 8, 1, dtype=torch.bool), 64) == 64  # broadcast over the keys
    assert ops.attended_keys(torch.randn(1, 1, 8, 64), 64) == 64  # a bias: nothing is cut
    assert ops.attended_keys(torch.zeros(1, 1, 8, 64, dtype=torch.bool), 64) == 64  # no key at all


@pytest.mark.parametrize("additive", [False, True])
def test_attention_fallback_attends_to_the_keys_the_mask_allows_only(monkeypatch, additive):
    """A prompt's later chunk over a long static cache: PyTorch computes it over the filled part only, exactly."""
    q, k, v = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 256, 16), torch.randn(1, 2, 256, 16)
    mask = torch.ones(256, 256, dtype=torch.bool).tril()[None, None, 40:48]
    if additive:
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    keys = []
    sdpa = ops._sdpa
    monkeypatch.setattr(ops, "_sdpa", lambda q, k, *a: keys.append(k.shape[2]) or sdpa(q, k, *a))
    torch.testing.assert_close(ops.ATTENTION(q, k, v, mask, False, "no-such-key"), want)
    assert keys == [48]
    ops.ATTENTION(q, k[:, :, :8], v[:, :, :8], None, True, "no-such-key")  # is_causal: nothing is cut
    assert keys == [48, 8]


@pytest.fixture
def fake_kernel():
    """A registered 'kernel' (a Python function) for a decode attention workload, recording its calls."""
    w = make_workload("attention", "fp32", batch=1, heads=4, kv_heads=2, head_dim=8, kv_len=3, max_kv_len=6)
    calls = []

    def run(tensors, dims):
        q, k, v, out = tensors
        calls.append(tuple(dims))
        n = dims[0]
        o = F.scaled_dot_product_attention(q[:, :, None], k[:, :, :n], v[:, :, :n], enable_gqa=True)
        out.copy_(o[:, :, 0])

    REGISTRY._kernels["test-key"] = BoundKernel("test-key", w, run)
    yield calls
    REGISTRY._kernels.pop("test-key", None)


def test_attention_op_runs_the_kernel_with_the_mask_prefix(fake_kernel):
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    mask = torch.ones(6, 6, dtype=torch.bool).tril()[None, None, 3:4]
    out = ops.ATTENTION(q, k, v, mask, False, "test-key")
    assert fake_kernel == [(4,)]
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))
    # a mask with a hole is not a prefix: PyTorch computes it, the kernel is not called
    holes = mask.clone()
    holes[..., 1] = False
    ops.ATTENTION(q, k, v, holes, False, "test-key")
    assert fake_kernel == [(4,)]
    # shapes the kernel was not built for: PyTorch as well
    ops.ATTENTION(q, torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), None, False, "test-key")
    assert fake_kernel == [(4,)]


def test_linear_op_leaves_unaligned_views_to_pytorch():
    """A kernel with 16-byte vector loads is only given tensors that start on a 16-byte boundary."""
    w = make_workload("gemm", "fp32", m=1, n=4, k=8)
    calls = []

    def run(tensors, dims):
        x, wt, out = tensors
        calls.append(x.data_ptr())
        torch.mm(x, wt.t(), out=out)

    run.alignment = 16
    REGISTRY._kernels["aligned-key"] = BoundKernel("aligned-key", w, run)
    try:
        weight, buf = torch.randn(4, 8), torch.randn(2 * 8 + 1)
        aligned, odd = buf[:8].view(1, 8), buf[1:9].view(1, 8)  # fp32: the second starts 4 bytes in
        assert buf.data_ptr() % 16 == 0
        torch.testing.assert_close(ops.LINEAR(aligned, weight, "aligned-key"), aligned @ weight.t())
        torch.testing.assert_close(ops.LINEAR(odd, weight, "aligned-key"), odd @ weight.t())
        assert calls == [aligned.data_ptr()]
    finally:
        REGISTRY._kernels.pop("aligned-key", None)


def test_mlp_op_leaves_a_call_during_graph_capture_without_its_prepacked_weight_to_pytorch():
    """A kernel whose transposed weight copy would have to be made inside CUDA-graph capture refuses; the op
    computes that call with PyTorch instead of failing the capture."""
    from autocomp_compile.targets.cuda.derived import MadeDuringCapture

    w = make_workload("mlp", "fp32", batch=1, hidden=8, intermediate=16)

    def run(tensors, dims):
        raise MadeDuringCapture("no copy")

    REGISTRY._kernels["capture-key"] = BoundKernel("capture-key", w, run)
    try:
        x, wg, wu, wd = torch.randn(1, 8), torch.randn(16, 8), torch.randn(16, 8), torch.randn(8, 16)
        torch.testing.assert_close(ops.MLP(x, wg, wu, wd, "capture-key"), (F.silu(x @ wg.t()) * (x @ wu.t())) @ wd.t())
    finally:
        REGISTRY._kernels.pop("capture-key", None)


def test_ops_leave_order_dependent_kernels_to_pytorch_in_deterministic_mode():
    """A kernel that sums with float atomics runs normally, and steps aside call by call while
    torch.use_deterministic_algorithms(True) is in force."""
    w = make_workload("mlp", "fp32", batch=1, hidden=8, intermediate=16)
    calls = []

    def run(tensors, dims):
        x, wg, wu, wd, out = tensors
        calls.append(1)
        torch.mm(F.silu(x @ wg.t()) * (x @ wu.t()), wd.t(), out=out)

    run.order_dependent = True
    REGISTRY._kernels["atomic-key"] = BoundKernel("atomic-key", w, run)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        x, wg, wu, wd = torch.randn(1, 8), torch.randn(16, 8), torch.randn(16, 8), torch.randn(8, 16)
        expected = (F.silu(x @ wg.t()) * (x @ wu.t())) @ wd.t()
        torch.testing.assert_close(ops.MLP(x, wg, wu, wd, "atomic-key"), expected)
        assert len(calls) == 1
        torch.use_deterministic_algorithms(True)
        torch.testing.assert_close(ops.MLP(x, wg, wu, wd, "atomic-key"), expected)
        assert len(calls) == 1
        torch.use_deterministic_algorithms(False)
        ops.MLP(x, wg, wu, wd, "atomic-key")
        assert len(calls) == 2
    finally:
        torch.use_deterministic_algorithms(before)
        REGISTRY._kernels.pop("atomic-key", None)


@pytest.mark.parametrize("op,args", [
    ("RMSNORM", lambda: (torch.randn(2, 64, 5).transpose(1, 2), torch.randn(64), 1e-6)),  # normalised over a strided dim
    ("LINEAR", lambda: (torch.randn(16, 3).t(), torch.randn(8, 16))),
    ("MLP", lambda: (torch.randn(16, 3).t(), torch.randn(32, 16), torch.randn(32, 16), torch.randn(16, 32))),
    ("ATTENTION", lambda: (torch.randn(2, 4, 8, 16), torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16), None, True)),
])
def test_fake_kernels_give_the_sizes_and_strides_the_ops_return(op, args):
    """Inductor plans buffers from the fake kernels and asserts the real outputs match them."""
    result = torch.library.opcheck(getattr(ops, op), (*args(), "no-such-key"), test_utils=("test_faketensor",))
    assert result == {"test_faketensor": "SUCCESS"}


def test_rmsnorm_of_a_non_contiguous_input_is_contiguous_and_a_kernel_is_given_a_contiguous_output():
    w = make_workload("rmsnorm", "fp32", rows=8, hidden=16)
    outs = []

    def run(tensors, dims):
        x, weight, out = tensors
        outs.append(out.is_contiguous())
        out.copy_(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight)

    REGISTRY._kernels["norm-key"] = BoundKernel("norm-key", w, run)
    try:
        x, weight = torch.randn(16, 8).t(), torch.randn(16)  # [8, 16] with strides (1, 8)
        got = ops.RMSNORM(x, weight, 1e-5, "norm-key")
        assert got.is_contiguous() and outs == [True]
        torch.testing.assert_close(got, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight)
    finally:
        REGISTRY._kernels.pop("norm-key", None)
