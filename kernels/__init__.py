"""sdft_kernels: fused linear self-distillation kernels.

Three implementations of one semantics (per-token divergence between the
student's and the teacher's next-token distributions, computed from hidden
states and the LM head without building [tokens, vocab] logits):

- ``reference``: full logits, the float64-capable oracle (``reference.py``).
- ``torch``: chunked pure-PyTorch autograd function (``torch_sdft.py``).
- ``triton``: vocabulary-tiled Triton kernels (``triton_sdft.py``).
"""

from sdft_kernels.reference import reference_token_losses
from sdft_kernels.torch_sdft import torch_token_losses

__all__ = ["reference_token_losses", "torch_token_losses"]
