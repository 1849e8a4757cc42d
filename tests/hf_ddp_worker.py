"""One worker of test_hf_trainer.py's DDP test: SAMTrainer on two CPU processes (gloo, set up
by the Trainer from the environment), global or per-worker SAM; saves its final weights."""
import os
import sys

import torch

STEPS, PER_RANK = 3, 4
HYPER = dict(rho=0.05, lr=0.1, momentum=0.9)


def make_model():
    from trainers import Classifier

    return Classifier(0, batchnorm=False).double()


def make_data(world):
    gen = torch.Generator().manual_seed(1)
    n = STEPS * PER_RANK * world
    x = torch.randn(n, 10, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    return [{"x": a, "labels": b} for a, b in zip(x, y)]


def run(rank, world, port, mode, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world))
    from transformers import TrainingArguments

    import fastsam
    from fastsam.integrations.transformers import SAMTrainer

    model = make_model()
    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=PER_RANK, max_steps=STEPS, use_cpu=True,
        report_to=[], save_strategy="no", train_sampling_strategy="sequential",
        lr_scheduler_type="constant", max_grad_norm=0.0, disable_tqdm=True, ddp_backend="gloo",
        dataloader_drop_last=True,
    )
    trainer = SAMTrainer(model=model, args=args, train_dataset=make_data(world),
                         optimizers=(fastsam.SAM(model.parameters(), torch.optim.SGD, **HYPER),
                                     None),
                         sam_per_worker=(mode == "per_worker"))
    trainer.train()
    torch.save([p.detach() for p in model.parameters()], f"{out}/rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as tests/ddp_worker.py: nothing left to finalize
