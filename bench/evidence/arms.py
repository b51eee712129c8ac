"""The training methods the vision experiments compare: each an MDEQ trained by ``timm_deq.train``
with the same settings but for the flags that select the method."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

__all__ = ["Arm", "ARMS", "VISION_ARMS", "METHOD_ARMS", "slug", "runs_by_arm"]


@dataclass(frozen=True)
class Arm:
    """One method: ``train_flags`` reach training only (the checkpoint is then evaluated with the
    model's default solves), ``model_flags`` change the model and reach validation too, ``jr``
    turns on the settings' Jacobian regularization."""

    train_flags: Tuple[str, ...] = ()
    model_flags: Tuple[str, ...] = ()
    jr: bool = False


ARMS: Dict[str, Arm] = {
    "implicit": Arm(),
    "implicit + JR": Arm(jr=True),
    # 4 coupled steps: 8 evaluations in the iteration and one for the output, as the forward limit 8
    "reversible (4 steps, beta 0.5)": Arm(("--backward", "reversible", "--reversible-steps", "4",
                                           "--reversible-beta", "0.5")),
    "phantom (5 steps, damping 0.8)": Arm(("--backward", "phantom", "--phantom-steps", "5",
                                           "--phantom-damping", "0.8")),
    "forward inverse, k=0": Arm(("--b-init", "forward_inverse", "--b-refine-steps", "0")),
    "spectral norm": Arm(model_flags=("--model-kwargs", "weight_norm=False", "--spectral-norm")),
    "fp correction (3 states)": Arm(("--fp-correction-states", "3")),
}
#: The arms of the stability experiment (section 1 of the report).
VISION_ARMS = ("implicit", "implicit + JR", "reversible (4 steps, beta 0.5)")
#: The methods experiment's arms (section 3): the other methods beside the implicit reference, at
#: a shorter budget of their own.
METHOD_ARMS = ("implicit",) + tuple(a for a in ARMS if a not in VISION_ARMS)


def slug(arm: str) -> str:
    """``arm`` as a folder name."""
    return "".join(c if c.isalnum() else "_" for c in arm).strip("_")


def runs_by_arm(part: Dict[str, Any]) -> Dict[str, List[Dict[str, Any]]]:
    """The saved runs of an experiment's results ``part`` (vision or methods) by arm, in the order
    of :data:`ARMS`; arms without runs are left out."""
    by_arm = {arm: [r for r in part.get("runs", []) if r["arm"] == arm] for arm in ARMS}
    return {arm: rs for arm, rs in by_arm.items() if rs}
