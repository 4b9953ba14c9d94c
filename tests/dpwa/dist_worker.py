"""Run by tests/dpwa/test_distributed.py under `torchrun --nproc_per_node 2` (gloo, CPU):
writes what each rank saw to OUT/rank{r}.pt for the test to check.

    sum OUT    one logical batch, no noise: each rank's share, the released update and diagnostics,
               and rank 0's single-process reference on the whole batch
    noise OUT  many steps on examples with zero gradient: the released update is the noise alone
    close OUT  imports timm after init (as `dpwa finetune` does), broadcasts, closes: the threads
               of the process before and after (gloo's workers must be gone once closed)
"""

import os
import sys

import torch
import torch.nn as nn

from dpwa.distributed import world_from_env
from dpwa.privacy import PrivateSGD, poisson_batches, secret_generator


class Recorder(torch.optim.Optimizer):
    """Keeps every released gradient; leaves the weights alone."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.0})
        self.released = []

    def step(self, closure=None):
        self.released.append(torch.cat([p.grad.flatten().clone() for g in self.param_groups for p in g["params"]]))


def model_and_data(n=200):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 5)).double()
    x = torch.randn(n, 2, 1, 8, 8, dtype=torch.float64)  # 2 augmented views per example
    y = torch.randint(0, 5, (n,))
    return model, x, y


def released_sum(world, model, x, y, idx, world_size):
    rec = Recorder(model.parameters())
    sgd = PrivateSGD(model, rec, noise_multiplier=0.0, clip_norm=0.5, expected_batch_size=40, world_size=world_size,
                     generator=secret_generator(0))
    stats = sgd.step((x[part], y[part]) for part in idx.split(16))
    return rec.released[0], stats


def threads():
    """Native threads of this process (gloo's are invisible to `threading`)."""
    return len(os.listdir("/proc/self/task"))


def main(mode, out):
    before = threads()
    world = world_from_env("gloo")
    if mode == "close":
        import timm  # noqa: F401 - imports torch._dynamo, hence torch.distributed.nn, after init

        for _ in range(20):  # tensors that gloo's workers release after each collective
            world.broadcast({"report": torch.ones(1000)} if world.main else None)
        world.close()
        torch.save({"before": before, "after": threads()}, f"{out}/rank{world.rank}.pt")
        return
    if mode == "sum":
        model, x, y = model_and_data()
        seed = world.broadcast(1234 if world.main else None)  # rank 0's seed reaches every rank
        idx = next(poisson_batches(len(y), 0.2, torch.Generator().manual_seed(seed)))
        mine = world.shard(idx)
        result = dict(zip(("released", "stats"), released_sum(world, model, x, y, mine, world.size)),
                      idx=idx, mine=mine)
        if world.main:
            model, x, y = model_and_data()
            result["single"], result["single_stats"] = released_sum(world, model, x, y, idx, 1)
    else:
        sigma, clip, b = 1.7, 0.8, 50
        model = nn.Linear(64, 10, bias=False).double()
        rec = Recorder(model.parameters())
        sgd = PrivateSGD(model, rec, noise_multiplier=sigma, clip_norm=clip, expected_batch_size=b,
                         world_size=world.size, generator=secret_generator(None))
        batches = poisson_batches(400, b / 400, torch.Generator().manual_seed(world.broadcast(7 if world.main else 0)))
        for _ in range(300):  # zero inputs: every clipped gradient is 0, the update is noise / B
            mine = world.shard(next(batches))
            sgd.step([(torch.zeros(len(mine), 1, 64, dtype=torch.float64), torch.zeros(len(mine), dtype=torch.long))])
        result = {"released": torch.stack(rec.released), "expected_std": sigma * clip / b}
    torch.save(result, f"{out}/rank{world.rank}.pt")
    world.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
