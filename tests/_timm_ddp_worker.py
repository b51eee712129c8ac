"""Runs what ``python -m timm_deq.train ARGS`` runs (``setup`` then ``train``) in this process, and
saves to ``OUT/rank<R>.pt`` this rank's initial and final model states and, for every training
call of the equilibrium layer, the update count, whether JR ran and the forward limit.

    torchrun --nproc_per_node 2 tests/_timm_ddp_worker.py OUT ARGS...
    python tests/_timm_ddp_worker.py OUT ARGS...          (one process)
"""
import os
import sys

import torch
from timm.utils import unwrap_model


def main(out_dir: str, argv: list) -> None:
    from timm_deq import train
    from timm_deq.task import deq_layers

    run = train.setup(argv)
    decisions = []

    def record(layer, inputs, output):
        if layer.training:
            decisions.append((layer.num_updates, output[1].jac_frobenius is not None, output[1].f_max_iter))

    model = unwrap_model(run.task.get_trainable_module())
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for layer in deq_layers(model):
        layer.register_forward_hook(record)
    metrics = train.train(run)
    torch.save({"rank": run.args.rank, "world_size": run.args.world_size, "decisions": decisions,
                "initial": initial, "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "metrics": metrics, "output_dir": run.output_dir},
               os.path.join(out_dir, f"rank{run.args.rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
