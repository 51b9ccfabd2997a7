"""ALSALS under DDP or FSDP2, with a torch.distributed.checkpoint save and resume.

    torchrun --nproc-per-node 2 -m alsals_fused.examples.distributed --mode ddp
    torchrun --nproc-per-node 2 -m alsals_fused.examples.distributed --mode fsdp2

(CPU with gloo here; on GPUs the same script uses NCCL and one GPU per rank.)  Each rank trains on
its own mini-batches; ALSALS averages the losses over process_group=, so every rank takes the same
step sizes, and under FSDP2 it adds the gradient-norm and slope partial sums over the shard group.
"""
import argparse
import datetime
import os
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from alsals_fused import ALSALS


def build(mode, device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).to(device)
    if mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = ALSALS(model.parameters(), process_group=dist.group.WORLD, variant="salsa")
    return model, opt


def train(model, opt, steps, start, device):
    rank = dist.get_rank()
    for k in range(start, start + steps):
        gen = torch.Generator().manual_seed(1000 * k + rank)        # this rank's mini-batch
        x, y = torch.randn(32, 16, generator=gen).to(device), torch.randn(32, 4, generator=gen).to(device)
        opt.zero_grad()
        loss = opt.step(lambda x=x, y=y: torch.nn.functional.mse_loss(model(x), y))
    return loss.item()           # step() returns the closure's loss, which keeps its spent graph


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["ddp", "fsdp2"], default="ddp")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--checkpoint", default=None, help="directory (default: a temporary one)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=60))
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    rank = dist.get_rank()
    path = args.checkpoint or os.path.join(tempfile.gettempdir(), f"alsals_{args.mode}_ckpt")

    model, opt = build(args.mode, device)
    loss = train(model, opt, args.steps, 0, device)
    msd, osd = get_state_dict(model, opt)                    # host state rides in param_groups
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    after = train(model, opt, args.steps, args.steps, device)

    model2, opt2 = build(args.mode, device)                   # a fresh run resumes
    msd2, osd2 = get_state_dict(model2, opt2)
    state = {"model": msd2, "optim": osd2}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    resumed = train(model2, opt2, args.steps, args.steps, device)
    same = all(torch.equal(a.detach(), b.detach()) for a, b in zip(model.parameters(), model2.parameters()))
    if rank == 0:
        print(f"{args.mode}: {dist.get_world_size()} ranks, loss {loss:.4f} after {args.steps} steps, "
              f"{after:.4f} after {2 * args.steps}; resumed from the checkpoint: {resumed:.4f}, "
              f"eta {opt2.eta:.4g}, t {opt2.t}, params bit-identical: {same}")
    dist.barrier()              # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
