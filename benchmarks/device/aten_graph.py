"""What the autocomp backend sees of the compact Llama on a device: the aten graph's matmul and attention
nodes (with where their operands come from) and the subgraphs `passes.fx` recognises, for one decode step.

    python benchmarks/device/aten_graph.py --device cuda --model llama-3.2-1b

Differences between devices come from inductor's device-specific passes and attention lowering.
"""
from __future__ import annotations

import argparse

import torch
import torch.fx as fx

import autocomp_compile  # noqa: F401
from autocomp_compile.models import build_llama
from autocomp_compile.passes.fx import find_subgraphs


class _Stop(Exception):
    pass


def describe(n: object) -> str:
    if not isinstance(n, fx.Node):
        return repr(n)
    val = n.meta.get("val")
    shape = tuple(val.shape) if isinstance(val, torch.Tensor) else "?"
    origin = n.target if n.op == "call_function" else n.op
    return f"{n.name}[{origin}, {shape}]"


def report(gm: fx.GraphModule) -> None:
    interesting = ("mm", "addmm", "bmm", "matmul", "linear", "attention", "embedding")
    for node in gm.graph.nodes:
        if node.op == "call_function" and any(t in str(node.target) for t in interesting):
            srcs = []
            for a in node.args:
                if isinstance(a, fx.Node) and a.op == "call_function":
                    srcs.append(f"{describe(a)} <- {', '.join(describe(x) for x in a.args if isinstance(x, fx.Node))}")
                else:
                    srcs.append(describe(a))
            users = ", ".join(describe(u) for u in node.users)
            print(f"{describe(node)}\n    args: {' | '.join(srcs)}\n    users: {users}")
    for m in find_subgraphs(gm):
        print(f"match {m.kind}: {m.workload.name if m.workload else 'no workload: ' + m.reason}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        def inner(aten_gm, aten_inputs, **kwargs):
            report(aten_gm)
            raise _Stop

        with torch._functorch.config.patch(enable_autograd_cache=False):  # a cache hit skips `inner`
            return compile_fx(gm, example_inputs, inner_compile=inner)

    model = build_llama(args.model, "bf16", seed=0).to(args.device)
    model.setup_caches(1)
    fn = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        try:
            fn(torch.zeros(1, 1, dtype=torch.long, device=args.device), torch.tensor([7], device=args.device),
               last_only=True)
        except Exception as exc:  # noqa: BLE001 - dynamo wraps our stop signal
            if "_Stop" not in repr(exc) and not isinstance(exc.__cause__, _Stop):
                raise
            return
    raise SystemExit("the backend's inner compiler was never called")


if __name__ == "__main__":
    main()
