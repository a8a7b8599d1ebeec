"""sdft_fast: memory-lean Self-Distillation Fine-Tuning.

The public loss is importable from the package root::

    from sdft_fast import self_distill_loss, SelfDistillLoss
"""

__version__ = "0.1.0"

__all__ = [
    "SelfDistillLoss",
    "linear_cross_entropy",
    "reduce_token_losses",
    "self_distill_loss",
    "token_logprobs",
]


def __getattr__(name):
    # Lazy: `import sdft_fast` stays cheap (no transformers import) for the CLI's --help.
    if name in __all__:
        from sdft_fast import loss

        return getattr(loss, name)
    raise AttributeError(f"module 'sdft_fast' has no attribute {name!r}")
