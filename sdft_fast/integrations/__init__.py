"""Drop-ins for other trainers. Each submodule is imported only when used, so that importing
``sdft_fast`` never imports the library it integrates with:

- ``sdft_fast.integrations.causal_lm``: a Hugging Face causal LM split into its backbone (final
  hidden states) and its LM head, the inputs of the fused loss; no trainer library needed.
- ``sdft_fast.integrations.trl``: ``FusedSDFTTrainer`` and ``FusedGKDTrainer``, TRL's SDFT and
  GKD trainers with their distillation loss on the fused kernels (``pip install 'sdft_fast[trl]'``).
"""
