"""One worker of tests/test_ddp.py: SAM under DistributedDataParallel on CPU (gloo), in the global
or the per-worker mode; saves its final weights and the number of all-reduces DDP made."""
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

import fastsam

STEPS = 3
HYPER = dict(rho=0.05, lr=0.1, momentum=0.9)


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 3)).double()


def make_data(world):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8 * world, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (8 * world,), generator=gen)
    return x, y


def run(rank, world, init_file, mode, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    model = make_model()
    ddp = DistributedDataParallel(model)
    allreduces = {"n": 0}

    def counting_hook(state, bucket):
        state["n"] += 1
        return allreduce_hook(None, bucket)

    ddp.register_comm_hook(allreduces, counting_hook)
    opt = fastsam.SAM(ddp.parameters(), torch.optim.SGD, **HYPER)
    x, y = (t.chunk(world)[rank] for t in make_data(world))
    loss_fn = torch.nn.functional.cross_entropy
    for _ in range(STEPS):
        if mode == "local":
            with fastsam.local_pass(ddp):
                loss_fn(ddp(x), y).backward()
        else:
            loss_fn(ddp(x), y).backward()
        opt.first_step(zero_grad=True)
        loss_fn(ddp(x), y).backward()
        opt.second_step(zero_grad=True)
    torch.save({"params": [p.detach() for p in model.parameters()], "allreduces": allreduces["n"]},
               f"{out}/rank{rank}.pt")
    dist.barrier()  # both ranks past their last all-reduce before either leaves
    dist.destroy_process_group()
    # Leave without interpreter finalization: a gloo worker thread may still be releasing the
    # comm hook's Python callback (allreduce_hook's Future.then), and taking the GIL during
    # Py_FinalizeEx ends that thread with a forced unwind that aborts the process
    # ("terminate called without an active exception"; about 1 run in 10 here, seen in a core
    # dump). The results are saved and the group is shut down: nothing is left to finalize.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
