"""sdft_kernels: fused linear self-distillation kernels.

Three implementations of one semantics (per-token divergence between the student's and the
teacher's next-token distributions, computed from hidden states and the LM head):

- ``reference``: full logits, the float64-capable oracle.
- ``torch_sdft``: chunked pure-PyTorch autograd function (the CPU path and the fallback);
  ``torch_linear_ce``: its cross-entropy sibling (SFT loss, target log-probs);
  ``torch_tiles``: the row chunks, vocabulary tiles and second sweep both share.
- ``torch_vocab_parallel``: the chunked twin with the LM head split by rows across the ranks of a
  ``torch.distributed`` group (tensor parallel), statistics merged with one small all-gather.
- ``triton_sdft``: vocabulary-tiled Triton kernels (CUDA; CPU under TRITON_INTERPRET=1), the
  public function over ``triton_forward`` (statistics and loss kernels), ``triton_backward``
  (dh and dW kernels), ``triton_tiles`` (the @triton.jit helpers they share) and
  ``triton_configs`` (block configurations and launch choices).

Names shared by every implementation, per token n and vocabulary column v:

    z_s = (W h_s + b) / tau, z_t = (W h_t + b) / tau        student and teacher logits
    lse_s, lse_t                                              their log-sum-exps
    g = dLoss/dz_s                                            the gradient w.r.t. the logits
    grad_center                                               the p_s-weighted mean that the
        softmax Jacobian subtracts inside g: reverse KL E_s[z_s - z_t], JSD KL(S||M), forward
        KL none (stored as 0). With lse_s, lse_t it is all a backward sweep needs to rebuild g.

Submodules are imported on demand so that importing the package never touches Triton or CUDA.
The measurements behind the designs are in docs/kernels.md.
"""
