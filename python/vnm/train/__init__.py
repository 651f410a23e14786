"""Recovery training for sparse models: three-stage LoRA (Zhao et al. 2024) and SR-STE (Zhou et
al. 2021), with distillation from the dense model, then :func:`merge` into
:class:`vnm.nn.VNMLinear`.

Three-stage LoRA::

    teacher = copy.deepcopy(model)
    vnm.train.prepare_lora(model, "64:2:8", rank=8, alpha=16)
    log = vnm.train.train_three_stage(model, batches, vnm.train.ThreeStageConfig(
        total_steps=1000, lr=1e-4, teacher=teacher, distill="mse"))
    vnm.train.merge(model)          # (W + BA) * mask -> VNMLinear; no LoRA left
    vnm.save(model, "model.vnm.safetensors")

SR-STE::

    vnm.train.prepare_srste(model, "2:4")
    vnm.train.train_srste(model, batches, vnm.train.SRSTEConfig(steps=1000))  # AdamW, lr 1e-4
    vnm.train.merge(model)          # W * mask(|W|) -> VNMLinear
"""

from .layers import choose_layers, merge
from .loop import Schedule, TrainConfig, TrainLog, default_forward, distillation_loss, output_tensor, train_loop
from .lora import LoRASparseLinear, ThreeStageConfig, ThreeStageLoRA, prepare_lora, train_three_stage
from .srste import SRSTE_DECAY, SRSTEConfig, SRSTEFunction, SRSTELinear, prepare_srste, srste_weight, train_srste

__all__ = [
    "LoRASparseLinear", "SRSTEConfig", "SRSTEFunction", "SRSTELinear", "SRSTE_DECAY", "Schedule",
    "ThreeStageConfig", "ThreeStageLoRA", "TrainConfig", "TrainLog", "choose_layers", "default_forward",
    "distillation_loss", "merge", "output_tensor", "prepare_lora", "prepare_srste", "srste_weight",
    "train_loop", "train_srste", "train_three_stage",
]
