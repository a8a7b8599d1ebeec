"""Full fine-tuning on several ranks: the model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

:func:`shard_full_model` makes every decoder layer one FSDP2 unit and a root unit of everything
else (embeddings, final norm, LM head, tied or not). Parameters, gradients and AdamW state then
live in dim-0 shards of 1/N on each rank; a unit's weights are all-gathered just before it runs
and freed after it, in the forward and again in the backward, and its gradients reduce-scattered
as a SUM (each rank's loss is already divided by the global number of sequences, see
:mod:`sdft_fast.trainer`).

What :class:`ShardedSelfDistillModel` changes in :class:`~sdft_fast.model.SelfDistillModel`, and why:

* scoring takes the generic two-pass path through the Hugging Face modules (FSDP2 gathers weights
  from module hooks; the packed one-pass path reads them directly), with the FSDP2 root as the
  module it calls;
* the ``ema`` / ``base`` teacher is a sharded copy of the weights (DTensors placed like the
  parameters). Its pass copies the teacher's local shards into the parameters' local shards and
  back (one shard of extra memory, no all-gather of its own); the EMA moves shard by shard;
* rollouts: every unit is all-gathered once for the whole ``generate`` call (full weights on each
  rank while sampling, as TRL gathers ZeRO-3 weights for generation), then freed;
* each FSDP2 forward and backward is a collective, so every rank must run the same passes: the
  trainer scores a masked stand-in where a rank has nothing to score (``lockstep``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import distribute_tensor

from sdft_fast.model import SelfDistillModel


class _Root(nn.Module):
    """The FSDP2 root unit: it owns the causal LM, so the parameters outside the layer units
    (embeddings, final norm, LM head) are its own; calling it runs the backbone."""

    def __init__(self, causal_lm: nn.Module, layers: list[nn.Module]):
        super().__init__()
        self.causal_lm = causal_lm
        self.__dict__["_layers"] = layers  # already submodules of causal_lm: not registered twice

    def forward(self, **kwargs):
        return self.causal_lm.base_model(**kwargs)

    def gathered(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` with every unit's full weights in place and no FSDP2 collective
        inside (registered as an FSDP2 forward method: the root's own hooks gather its unit)."""
        for layer in self._layers:
            layer.set_reshard_after_forward(False, recurse=False)
            layer.unshard()
        try:
            return fn(*args, **kwargs)
        finally:
            for layer in self._layers:
                layer.reshard()
                layer.set_reshard_after_forward(True, recurse=False)


def decoder_layers(causal_lm: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a Hugging Face causal LM (``model.layers``, GPT-2's ``transformer.h``)."""
    backbone = getattr(causal_lm, "base_model", causal_lm)
    for name in ("layers", "h", "blocks"):
        blocks = getattr(backbone, name, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return list(blocks)
    raise ValueError(
        f"{type(causal_lm).__name__}: no decoder layers found (base_model.layers / .h / .blocks); "
        "full fine-tuning on several ranks shards one FSDP2 unit per layer"
    )


class ShardedSelfDistillModel(SelfDistillModel):
    """A :class:`SelfDistillModel` whose weights are FSDP2 shards (built by :func:`shard_full_model`)."""

    sharded = True  # the trainer keeps ranks in lockstep and lets FSDP2 reduce the gradients
    _fsdp_root: _Root
    _teacher_shards: dict[str, torch.Tensor]  # name -> DTensor placed like the parameter

    # -- scoring: the generic path through the FSDP2 root -------------------------------------------
    def _backbone(self) -> nn.Module:
        return self._fsdp_root

    def _use_fast_path(self, lengths: list[int]) -> bool:
        return False

    def _generic_hidden(self, seqs, prompt_lens, completion_lens, for_teacher: bool) -> torch.Tensor:
        context = (
            self._teacher_in_place() if for_teacher and self._teacher_shards else contextlib.nullcontext()
        )
        with context:
            return super()._generic_hidden(seqs, prompt_lens, completion_lens, for_teacher)

    def _sharded_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters as their shards (the root unit stays gathered after a forward: free it)."""
        self._fsdp_root.reshard()
        return dict(self.hf_model.named_parameters())

    @contextlib.contextmanager
    def _teacher_in_place(self) -> Iterator[None]:
        """The teacher's shards in the parameters' local shards for the block, the student's after."""
        params = self._sharded_parameters()
        saved = {}
        with torch.no_grad():
            for name, shard in self._teacher_shards.items():
                local = params[name].to_local()
                saved[name] = local.clone()
                local.copy_(shard.to_local())
        try:
            yield
        finally:
            self._fsdp_root.reshard()  # its gathered weights are the teacher's: the student pass re-gathers
            with torch.no_grad():
                for name, student in saved.items():
                    params[name].to_local().copy_(student)

    # -- EMA teacher ---------------------------------------------------------------------------------
    @torch.no_grad()
    def ema_update(self, rate: float) -> None:
        if self.teacher_mode != "ema":
            raise RuntimeError(
                f"ema_update needs teacher='ema', this model has teacher={self.teacher_mode!r}"
            )
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"ema rate must be in [0, 1], got {rate!r}")
        params = self._sharded_parameters()
        for name, shard in self._teacher_shards.items():
            shard.to_local().lerp_(params[name].to_local(), rate)

    def teacher_state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self._teacher_shards) if self.teacher_mode == "ema" else {}

    @torch.no_grad()
    def load_teacher_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.teacher_state_dict()) ^ set(state_dict))
        if missing:
            raise ValueError(f"teacher state dict: keys differ: {missing[:5]}")
        for name, shard in self._teacher_shards.items():
            shard.copy_(state_dict[name])

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        if self.teacher_mode != "base":
            raise RuntimeError("adapters_disabled() with full fine-tuning needs teacher='base'")
        with self._teacher_in_place():
            yield

    # -- rollouts and exports ------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts, **kwargs) -> list[list[int]]:
        """As :meth:`SelfDistillModel.generate`, on the full weights gathered once for the call."""
        try:
            return self._fsdp_root.gathered(super().generate, prompts, **kwargs)
        finally:
            self._fsdp_root.reshard()

    def save_adapter(self, directory) -> None:
        """The full weights as a Hugging Face folder, written by rank 0 (a collective: every rank calls it)."""
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        self._fsdp_root.reshard()
        full = get_model_state_dict(
            self.hf_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if dist.get_rank() == 0:
            self.hf_model.save_pretrained(directory, state_dict=full, safe_serialization=True)
        dist.barrier()

    def merge_and_save(self, directory) -> None:
        self.save_adapter(directory)  # full fine-tuning: the weights are the merged model


def shard_full_model(model: SelfDistillModel) -> ShardedSelfDistillModel:
    """Shard a full fine-tuning model over the default process group, in place (FSDP2 itself turns
    modules into FSDP classes in place; this turns the wrapper into :class:`ShardedSelfDistillModel`).

    Every rank must call it with the same weights (checked before: ``distributed.check_run_agrees``).
    """
    import torch.distributed as dist

    if model.lora_config is not None:
        raise ValueError("shard_full_model shards full fine-tuning; LoRA runs keep the whole model per rank")
    device = model.device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    layers = decoder_layers(model.hf_model)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    root = _Root(model.hf_model, layers)
    fully_shard(root, mesh=mesh)
    register_fsdp_forward_method(root, "gathered")
    for unit in (root, *layers):
        unit.set_gradient_divide_factor(1.0)  # sum: the losses are already global means
        unit.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
    # The teacher copy, sharded like the parameters (then the full copy is freed).
    params = dict(model.hf_model.named_parameters())
    teacher_shards = {}
    for name, full in model._teacher_params.items():
        shard = distribute_tensor(full, params[name].device_mesh, params[name].placements)
        if shard.to_local().shape != params[name].to_local().shape:
            raise RuntimeError(f"teacher shard of {name} does not match the parameter's shard")
        teacher_shards[name] = shard
    model._teacher_params, model._teacher_by_param_id = {}, {}
    model.__class__ = ShardedSelfDistillModel
    model.__dict__["_fsdp_root"] = root  # not a submodule: the causal LM is registered once, as hf_model
    model._teacher_shards = teacher_shards
    return model
