"""The paper's efficiency claims, measured: RCCA (R = 2) against a non-local block.

    python -m ccnet.efficiency                 # CPU; CUDA peak memory too when a GPU is present
    python -m ccnet.efficiency --device cuda --size 97

CCNet (sec. 4.3 and the authors' issue #2) compares the modules alone on a 1 x 512 x 97 x 97
input (a 769 x 769 crop at output stride 8): "about 85% fewer FLOPs" and "11x less GPU
memory" than a non-local block. Two settings: the attention modules alone (512 channels), and
the whole head on the backbone's 2048 channels (RCCA head with R = 2 against the same head
with one non-local block in place of the recurrent criss-cross attention). FLOPs come from
``torch.utils.flop_counter`` (forward pass), activation memory is the bytes autograd saves for
backward (``saved_tensors_hooks``, parameters excluded, each storage counted once), and on
CUDA the peak memory of forward + backward above the inputs and weights.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import ops

from .attention import CrissCrossAttention
from .heads import RCCAHead
from .non_local import NonLocal2d


class Recurrent(nn.Module):
    """One attention module applied R times (weights shared), as in the RCCA head."""

    def __init__(self, module: nn.Module, recurrence: int) -> None:
        super().__init__()
        self.module, self.recurrence = module, recurrence

    def forward(self, x):
        for _ in range(self.recurrence):
            x = self.module(x)
        return x


def forward_flops(module: nn.Module, x: torch.Tensor) -> int:
    ops.load_compiled()  # registers the op's FLOP formulas, which a counter reads when it starts
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops()


def saved_activation_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward in one forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x.requires_grad_(True))
    return sum(seen.values())


def peak_cuda_bytes(module: nn.Module, x: torch.Tensor) -> int | None:
    if x.device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    module(x.requires_grad_(True)).sum().backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def settings(channels: int, head_in: int, recurrence: int) -> dict[str, tuple[nn.Module, nn.Module, int]]:
    """name -> (RCCA, non-local, input channels)."""
    return {
        f"module ({channels} ch)": (Recurrent(CrissCrossAttention(channels), recurrence),
                                   NonLocal2d(channels), channels),
        f"head ({head_in} ch in)": (RCCAHead(head_in, 19, channels=channels, recurrence=recurrence),
                                   RCCAHead(head_in, 19, channels=channels, recurrence=1,
                                            attention_layer=NonLocal2d), head_in),
    }


def measure(device: str, size: int, channels: int, head_in: int, recurrence: int) -> list[dict]:
    rows = []
    for name, (rcca, nonlocal_, cin) in settings(channels, head_in, recurrence).items():
        row = {"setting": name}
        for tag, module in (("rcca", rcca), ("nl", nonlocal_)):
            module = module.to(device).train()
            x = torch.randn(1, cin, size, size, device=device)
            row[f"{tag}_gflops"] = forward_flops(module, x) / 1e9
            row[f"{tag}_saved_mb"] = saved_activation_bytes(module, x.clone()) / 2**20
            peak = peak_cuda_bytes(module, x.clone())
            row[f"{tag}_peak_mb"] = None if peak is None else peak / 2**20
            del module, x
            if device == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    return rows


def table(rows: list[dict], recurrence: int) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    lines = [f"| setting | RCCA R={recurrence} GFLOPs | non-local GFLOPs | FLOPs saved | RCCA saved MB | "
             "non-local saved MB | memory ratio | RCCA peak MB | non-local peak MB | peak ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak_ratio = (f"{r['nl_peak_mb'] / r['rcca_peak_mb']:.1f}x" if r["rcca_peak_mb"] else "-")
        lines.append(
            f"| {r['setting']} | {r['rcca_gflops']:.1f} | {r['nl_gflops']:.1f} | "
            f"{100 * (1 - r['rcca_gflops'] / r['nl_gflops']):.1f}% | {r['rcca_saved_mb']:.1f} | "
            f"{r['nl_saved_mb']:.1f} | {r['nl_saved_mb'] / r['rcca_saved_mb']:.1f}x | "
            f"{fmt(r['rcca_peak_mb'])} | {fmt(r['nl_peak_mb'])} | {peak_ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=97, help="feature map side (97: a 769 crop)")
    parser.add_argument("--channels", type=int, default=512, help="attention channels (512)")
    parser.add_argument("--head-in", type=int, default=2048, help="head input channels (2048)")
    parser.add_argument("--recurrence", type=int, default=2)
    args = parser.parse_args(argv)
    rows = measure(args.device, args.size, args.channels, args.head_in, args.recurrence)
    print(f"RCCA vs non-local, 1 x C x {args.size} x {args.size}, {args.device}, torch {torch.__version__}")
    print(table(rows, args.recurrence))


if __name__ == "__main__":
    main()
