"""spyglass.kernels: Triton kernels, each beside its pure-torch reference (advantage, policy_loss, fused_logprob)."""
