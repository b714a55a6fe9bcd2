"""What is about fine-tuning only: the policies that decide which part of a pretrained tower trains
(:mod:`.policy`; the parameter-efficient ones — peft adapters, bias-only — in :mod:`.peft`) and where a fine-tuned
model starts — a tower from a pretraining checkpoint, a head from the zero-shot classifier (:mod:`.init`). The tasks
that fine-tune live in :mod:`mm_ptft.tasks`, their models in :mod:`mm_ptft.models`, WiSE-FT and ``mm-ptft diff`` in
:mod:`mm_ptft.analysis`."""

from mm_ptft.finetune.init import head_input_of, load_tower, tower_state, zeroshot_head
from mm_ptft.finetune.peft import ADAPTER_POLICIES, write_adapters
from mm_ptft.finetune.policy import POLICIES, apply_policy, parameter_counts

__all__ = [
    "ADAPTER_POLICIES",
    "POLICIES",
    "apply_policy",
    "head_input_of",
    "load_tower",
    "parameter_counts",
    "tower_state",
    "write_adapters",
    "zeroshot_head",
]
