"""sdft_kernels: fused linear self-distillation kernels.

Three implementations of one semantics (per-token divergence between the
student's and the teacher's next-token distributions, computed from hidden
states and the LM head):

- ``sdft_kernels.reference``: full logits, the float64-capable oracle.
- ``sdft_kernels.torch_sdft``: chunked pure-PyTorch autograd function (CPU path, fallback);
  ``sdft_kernels.torch_linear_ce``: its cross-entropy sibling (SFT loss, target log-probs).
- ``sdft_kernels.triton_sdft``: vocabulary-tiled Triton kernels (CUDA; CPU under TRITON_INTERPRET=1).

Submodules are imported on demand so that importing the package never touches Triton or CUDA.
"""
