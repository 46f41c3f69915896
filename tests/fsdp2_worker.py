"""Run by tests/test_timm_patch.py::test_fsdp2_two_gloo_ranks under torch.distributed.run.

Each rank shards a patched tiny ViT with FSDP2 (``fully_shard`` per block, then the model), runs a
text-guided pruned training step on its own batch and checks its gradients against an unsharded
copy run on both ranks' batches (FSDP2 averages gradients over ranks). Prints "FSDP2 OK" on success.
"""
import copy
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(__file__))
from test_timm_patch import FAMILIES, images  # noqa: E402

import bus  # noqa: E402


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    ref = bus.patch_timm(FAMILIES["vit (class token)"]().train(), layers=(1, 2), keep=0.5, ptm_head=True)
    model = copy.deepcopy(ref)
    for blk in model.blocks:
        fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    xs = [images(2, seed=r) for r in range(world)]
    ts = [torch.randn(2, 64, generator=torch.Generator().manual_seed(10 + r)) for r in range(world)]

    def loss_of(m, x, t):
        out = m(x, text=t)
        ptm = sum(r["ptm_logits"].mean() for r in m.pruning_state().records)
        return out.square().mean() + ptm

    loss_of(model, xs[rank], ts[rank]).backward()
    for r in range(world):  # the unsharded reference: mean of the per-rank losses
        (loss_of(ref, xs[r], ts[r]) / world).backward()
    want = {n: p.grad for n, p in ref.named_parameters()}
    for n, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        torch.testing.assert_close(g, want[n], rtol=1e-4, atol=1e-6, msg=n)
    assert model.pruning_state().patch_ids.shape == (2, 1 + 5 + 1)
    dist.barrier()
    if rank == 0:
        print("FSDP2 OK")
    dist.destroy_process_group()
    # Every check above has run. Skip interpreter teardown: in one CI run of 3 a rank aborted there
    # ("terminate called without an active exception", a joinable C++ thread destroyed at exit)
    # after printing FSDP2 OK, which failed the test on something the test does not check.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
