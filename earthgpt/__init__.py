"""EarthGPT, the remote-sensing multimodal LLM: model, processor, task templates and parsers, tuning stages, engines.

Modules (import what you need; nothing heavy is imported here):

- ``earthgpt.modeling``: ``EarthGPTConfig``, ``EarthGPTForConditionalGeneration`` (the whole forward pass).
- ``earthgpt.presets``: ``earthgpt_tiny``, ``earthgpt_small``, ``earthgpt_paper``, ``build_model``,
  ``from_backbones``, ``count_parameters``.
- ``earthgpt.processor``: ``EarthGPTProcessor`` (images + prompts -> inputs; ids -> text).
- ``earthgpt.conversation``: the SPHINX ``conv_v1`` template.
- ``earthgpt.tasks``: prompts, MMRS-1M-style answers and their parsers; ``earthgpt.boxes``: boxes and padding.
- ``earthgpt.stages``: ``set_trainable(model, stage)``.
- ``earthgpt.engine``: ``InferenceEngine`` (plain or DeepSpeed-inference).
- ``earthgpt.convert_convnext``: CLIP ConvNeXt (open_clip / timm) -> Hugging Face ``ConvNextModel``.
- ``earthgpt.data``, ``earthgpt.metrics``: MMRS-1M datasets and collator; evaluation metrics.

Never imports Ray, ``catalogs`` or ``pipelines``.
"""
