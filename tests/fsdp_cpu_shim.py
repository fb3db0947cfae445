"""Test-only launcher: ``mtakd`` under accelerate's FSDP2 on CPU processes (gloo), for tests/test_scaling.py.

accelerate (1.16) turns a process group into FSDP only when it is of a multi-accelerator type (MULTI_GPU, MULTI_XPU,
...); CPU processes are MULTI_CPU and keep DDP (docs/scaling.md, "FSDP"). This shim reports CPU processes to
accelerate as a MULTI_GPU group on the gloo backend with the CPU as device; everything after that (the FSDP2
plugin, ``fully_shard`` of the student's decoder layers and root, the optimizer over DTensor parameters, FULL_STATE_DICT
checkpoints and export) is accelerate's, torch's and mtakd's own code. With ``MTAKD_FSDP_PROBE=FILE`` the first
training step writes what the trainer sees (engine, parameter types, optimiser groups) to FILE.rank{N}.json.

    accelerate launch --config_file FSDP.yaml tests/fsdp_cpu_shim.py distill --config CFG ...
"""

import json
import os
import sys

import torch
from accelerate import state
from accelerate.utils import DistributedType


def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
    return "gloo", DistributedType.MULTI_GPU


def _set_device(self):
    if self.device is None:
        self.device = torch.device("cpu")


state.PartialState._prepare_backend = _prepare_backend
state.PartialState.set_device = _set_device

import mtakd.run as run  # noqa: E402
from mtakd.trainer import DistillTrainer  # noqa: E402

run._has_accelerator = lambda: True  # the group is "GPU-like": no CPU switch, no refusal of FSDP
probe = os.environ.get("MTAKD_FSDP_PROBE")
real_compute_loss = DistillTrainer.compute_loss


def compute_loss(self, model, inputs, *args, **kwargs):
    if probe and not getattr(self, "_probed", False):
        self._probed = True
        from torch.distributed.tensor import DTensor

        unwrapped = self.accelerator.unwrap_model(model)
        projectors = list(unwrapped.mta_projectors.parameters())
        groups = self.optimizer.param_groups
        own = [g for g in groups if g.get("mtakd_projectors")]
        info = {
            "distributed_type": str(self.accelerator.distributed_type.value), "fsdp": self.is_fsdp_enabled,
            "student_dtensor": all(isinstance(p, DTensor) for p in model.parameters()),
            "projectors_dtensor": all(isinstance(p, DTensor) for p in projectors),
            "teacher_dtensor": any(isinstance(p, DTensor) for p in self.teacher.parameters()),
            "teacher_trainable": any(p.requires_grad for p in self.teacher.parameters()),
            "teacher_in_optimizer": any(p is q for g in groups for p in g["params"] for q in self.teacher.parameters()),
            "projector_group": None if len(own) != 1 else {
                "lr": own[0]["lr"], "weight_decay": own[0]["weight_decay"],
                "same_params": {id(p) for p in own[0]["params"]} == {id(p) for p in projectors}},
            "fused_heads": bool(self._fuse_heads()),
        }
        with open(f"{probe}.rank{self.args.process_index}.json", "w") as fh:
            json.dump(info, fh)
    return real_compute_loss(self, model, inputs, *args, **kwargs)


DistillTrainer.compute_loss = compute_loss

if __name__ == "__main__":
    from mtakd.cli import main

    sys.exit(main(sys.argv[1:]))
