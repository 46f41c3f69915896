"""Activation memory of a patched ViT-B/16 training step with and without gradient checkpointing.

Measures the bytes of the distinct storages autograd saves for backward during the forward
(``torch.autograd.graph.saved_tensors_hooks``): what a training step keeps alive between its
forward and its backward. It runs on CPU (no ``torch.cuda`` needed); inside a non-reentrant
checkpoint nothing is saved but the checkpoint's inputs, which this counts. It also checks that
the gradients match. Random weights, no download.

    python examples/checkpoint_memory.py [--batch 2] [--keep 0.7]
"""
from __future__ import annotations

import argparse
import copy

import torch


def saved_activation_bytes(fn):
    """(fn(), bytes of distinct storages saved for backward while fn runs)."""
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def main(batch: int = 2, keep: float = 0.7, layers=(3, 6, 9)):
    import timm

    import bus

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10).train()
    dense_model = copy.deepcopy(model)
    bus.patch_timm(model, layers=layers, keep=keep)
    ckpt = copy.deepcopy(model)
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(batch, 3, 224, 224)
    rows, grads = [], {}
    for name, m in (("unpatched", dense_model), (f"BUS keep={keep}", model), (f"BUS keep={keep} + checkpointing", ckpt)):
        out, nbytes = saved_activation_bytes(lambda: m(x))
        out.square().mean().backward()
        grads[name] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        rows.append((name, nbytes))
    a, b = grads[rows[1][0]], grads[rows[2][0]]
    diff = max((a[n] - b[n]).abs().max().item() for n in a)
    print(f"ViT-B/16, batch {batch}, 224 px, TSPS at {layers}, CPU fp32; saved-for-backward bytes:")
    for name, nbytes in rows:
        print(f"  {name:36s} {nbytes / 2**20:9.1f} MiB")
    print(f"  checkpointing / no checkpointing: {rows[2][1] / rows[1][1]:.3f}; max |grad difference| {diff:.2e}")
    return rows, diff


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--keep", type=float, default=0.7)
    a = p.parse_args()
    main(a.batch, a.keep)
