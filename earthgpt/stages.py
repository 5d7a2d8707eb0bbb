"""EarthGPT's three tuning stages: which parameters train in each.

1. **Alignment**: the visual fusion (CNN pyramid convs) and the projector. Everything else is frozen.
2. **Partial LLM tuning**: stage 1 + the LLM's attention ``q_proj`` / ``k_proj`` / ``v_proj`` and every RMSNorm
   (``input_layernorm``, ``post_attention_layernorm``, the final ``norm``).
3. **Unified instruction tuning**: only the added per-linear-layer scale and bias ("shift") parameters
   (:class:`earthgpt.modeling.ShiftParameters`, created here if absent, initialised so the outputs are unchanged).

The fusion convs are new (randomly initialised) parameters that sit before the projector, so we train them with it
in stages 1 and 2 (our choice; the paper names only the projector). The encoders never train.
"""

from __future__ import annotations

import re

from earthgpt.modeling import EarthGPTForConditionalGeneration

STAGES = (1, 2, 3)

_STAGE2_LLM = re.compile(
    r"^language_model\.model\.(layers\.\d+\.(self_attn\.[qkv]_proj\.|input_layernorm\.|post_attention_layernorm\.)"
    r"|norm\.)"
)


def stage_parameter_names(model: EarthGPTForConditionalGeneration, stage: int) -> set[str]:
    """Names of the parameters that train in ``stage`` (see the module docstring).

    Raises:
        ValueError: for a stage other than 1, 2, 3, or stage 3 on a model without shift parameters.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    names = [n for n, _ in model.named_parameters()]
    if stage == 3:
        if model.shift is None:
            raise ValueError("stage 3 needs shift parameters: call model.add_shift_parameters() first")
        return {n for n in names if n.startswith("shift.")}
    chosen = {n for n in names if n.startswith(("fusion.", "multi_modal_projector."))}
    if stage == 2:
        chosen |= {n for n in names if _STAGE2_LLM.match(n)}
    return chosen


def set_trainable(model: EarthGPTForConditionalGeneration, stage: int) -> list[str]:
    """Marks exactly the parameters of ``stage`` trainable (``requires_grad``) and freezes the rest.

    Stage 3 first adds the shift parameters when the model has none (``model.add_shift_parameters()``).

    Args:
        model: The model, modified in place.
        stage: 1, 2 or 3.

    Returns:
        The sorted names of the trainable parameters.

    Raises:
        ValueError: for an unknown stage.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if stage == 3:
        model.add_shift_parameters()
    chosen = stage_parameter_names(model, stage)
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
    return sorted(chosen)
