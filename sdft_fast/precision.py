"""Mixed precision for training: fp32 master weights, fp32 optimizer state, loss scaling, and the
rule that a step with a non-finite loss or gradient changes nothing.

A model that computes in float16 or bfloat16 cannot hold its own optimizer state: AdamW's
``eps=1e-8`` is 0 in float16 (0/0 = NaN at the first parameter whose gradient is zero), and an
update of lr x ~1 on a weight of size ~1e-2 is below bfloat16's resolution, so it vanishes.
:class:`MixedPrecision` keeps an fp32 copy of every trainable tensor (and of the EMA teacher);
AdamW steps the copies, and the model's half-precision tensors are refreshed from them after
each step. float16 also narrows the range of the gradients, so its loss is multiplied by a
dynamic scale before backward (halved when the gradients overflow, doubled after
``growth_interval`` clean steps) and the gradients divided by it again in fp32.

In float32 the copies are the parameters themselves and the scale is 1: nothing changes, and
a resumed run stays bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)


class TrainingDiverged(RuntimeError):
    """Training produced NaN/inf where it cannot continue: too many non-finite steps in a row,
    or a weight that is no longer finite (which is never saved)."""


def nonfinite_tensor(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf, else None."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


class MixedPrecision:
    """fp32 masters for a model's trainable tensors (see the module docstring).

    It stands in for the model where a checkpoint reads or writes weights
    (``trainable_state_dict`` / ``teacher_state_dict`` and their loaders), so a checkpoint holds
    the fp32 masters and a resumed half-precision run continues from exactly the same numbers.
    """

    def __init__(
        self, model, *, enabled: bool = True, initial_scale: float = 2.0**16, growth_interval: int = 2000
    ):
        """enabled=False: the parameters themselves, whatever their dtype (FSDP2 shards)."""
        self.model = model
        self.params = [p for p in model.trainable_parameters() if p.requires_grad]
        self.enabled = enabled and any(p.dtype in HALF_DTYPES for p in self.params)
        self.scaling = self.enabled and any(p.dtype == torch.float16 for p in self.params)
        self.loss_scale = float(initial_scale) if self.scaling else 1.0
        self.growth_interval = growth_interval
        self.clean_steps = 0  # steps since the scale last changed
        self.names = list(model.trainable_state_dict()) if self.enabled else []
        if self.enabled:
            if len(self.names) != len(self.params):
                raise RuntimeError(
                    f"trainable_state_dict has {len(self.names)} tensors but {len(self.params)} parameters train"
                )
            self.masters = [p.detach().float().clone().requires_grad_(True) for p in self.params]
            self.teacher_masters = {k: v.float().clone() for k, v in model.teacher_state_dict().items()}
        else:
            self.masters = self.params
            self.teacher_masters = {}

    @property
    def master_params(self) -> list[torch.Tensor]:
        """What the optimizer steps: fp32 copies, or the parameters themselves in fp32."""
        return self.masters

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.loss_scale if self.scaling else loss

    def unscale_gradients(self) -> None:
        """Move the model's gradients onto the masters as fp32, divided by the loss scale."""
        if not self.enabled:
            return
        for param, master in zip(self.params, self.masters):
            if param.grad is None:
                master.grad = None
                continue
            grad = param.grad.detach().float()
            master.grad = grad / self.loss_scale if self.scaling else grad
            param.grad = None

    def zero_grad(self) -> None:
        for tensor in [*self.params, *self.masters]:
            tensor.grad = None

    def after_step(self, skipped: bool) -> None:
        """Refresh the model from the masters after an optimizer step; adjust the loss scale."""
        if self.scaling:
            if skipped:
                self.loss_scale = max(self.loss_scale / 2.0, 1.0)
                self.clean_steps = 0
            else:
                self.clean_steps += 1
                if self.clean_steps >= self.growth_interval:
                    self.loss_scale *= 2.0
                    self.clean_steps = 0
        if self.enabled and not skipped:
            with torch.no_grad():
                for param, master in zip(self.params, self.masters):
                    param.copy_(master)

    def ema_update(self, rate: float) -> None:
        """The EMA teacher moves toward the student: in fp32 on the masters, then cast into the model."""
        if not self.enabled:
            self.model.ema_update(rate)
            return
        student = dict(zip(self.names, self.masters))
        with torch.no_grad():
            for name, teacher in self.teacher_masters.items():
                teacher.lerp_(student[_student_name(name)].detach(), rate)
        self.model.load_teacher_state_dict(self.teacher_masters)

    # -- what a checkpoint reads and writes ------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        if not self.enabled:
            return self.model.trainable_state_dict()
        return {name: master.detach().clone() for name, master in zip(self.names, self.masters)}

    def teacher_state_dict(self) -> dict[str, torch.Tensor]:
        if not self.enabled:
            return self.model.teacher_state_dict()
        return {name: t.clone() for name, t in self.teacher_masters.items()}

    @torch.no_grad()
    def load_trainable_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.model.load_trainable_state_dict(state_dict)
        if self.enabled:
            for name, master in zip(self.names, self.masters):
                master.copy_(state_dict[name].float())

    @torch.no_grad()
    def load_teacher_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.model.load_teacher_state_dict(state_dict)
        if self.enabled:
            for name, teacher in self.teacher_masters.items():
                teacher.copy_(state_dict[name].float())

    def state(self) -> dict[str, float | int]:
        return {"loss_scale": self.loss_scale, "clean_steps": self.clean_steps}

    def load_state(self, state: dict | None) -> None:
        if state:
            self.loss_scale = float(state["loss_scale"])
            self.clean_steps = int(state["clean_steps"])


def _student_name(teacher_name: str) -> str:
    """The student tensor an EMA teacher tensor follows: ``<path>.ema_A`` -> ``<path>.lora_A``
    (LoRA); full fine-tuning names both by the parameter's own name."""
    for factor in ("A", "B"):
        if teacher_name.endswith(f".ema_{factor}"):
            return teacher_name[: -len(f".ema_{factor}")] + f".lora_{factor}"
    return teacher_name
