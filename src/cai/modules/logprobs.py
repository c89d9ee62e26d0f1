"""Log-probabilities of target tokens through the LM head, a chunk of positions at a time.

The plain way, `log_softmax(hidden @ W.T)` over all positions, keeps [N, V] logits, their fp32
copy, the log-softmax and their gradients: for SmolLM2 (V = 49,152) about 1 GB per thousand
positions, the largest buffers of an SFT or PPO step. Here the forward pass keeps only the
[N] results; the backward pass recomputes each chunk's logits (one extra LM-head matmul, ~7% of
a step) and adds its gradient, so the memory is [chunk, V], whatever N is.
"""

from __future__ import annotations

import torch

CHUNK = 128  # positions per chunk: [128, 49152] fp32 is 25 MB, under glibc's 32 MB mmap threshold


def _chunk_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(h W^T / T)[target] and the log-softmax, in fp32. hidden [n, H], weight
    [V, H] (hidden's dtype), targets [n] -> ([n], [n, V])."""
    logits = (hidden @ weight.T).float() / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    return logprobs.gather(1, targets[:, None])[:, 0], logprobs


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk):
        out = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
        w = weight.to(hidden.dtype)  # cast once, not per chunk
        with torch.no_grad():
            for start in range(0, len(targets), chunk):
                part = slice(start, start + chunk)
                out[part] = _chunk_logprobs(hidden[part], w, targets[part], temperature)[0]
        ctx.save_for_backward(hidden, weight, targets)
        ctx.temperature, ctx.chunk = temperature, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets = ctx.saved_tensors
        temperature, chunk = ctx.temperature, ctx.chunk
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if ctx.needs_input_grad[1]
            else None
        )
        w = weight.to(hidden.dtype)
        for start in range(0, len(targets), chunk):
            part = slice(start, start + chunk)
            _, logprobs = _chunk_logprobs(hidden[part], w, targets[part], temperature)
            # d logprob[target] / d logits = onehot(target) - softmax, over T
            grad_logits = -logprobs.exp_()
            grad_logits[torch.arange(len(grad_logits)), targets[part]] += 1.0
            grad_logits *= grad_out[part, None] / temperature
            grad_logits = grad_logits.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[part] = grad_logits @ w
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ hidden[part]).float()
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """log pi_T(target) at each position, pi_T = softmax(hidden @ weight.T / T), in fp32.

    hidden [N, H] (any float dtype; the matmul runs in it), weight [V, H] (the LM head),
    targets [N] -> [N]. Differentiable in hidden and weight; memory [chunk, V] at a time.
    """
    if temperature <= 0:
        temperature = 1.0  # greedy rollouts: log-probabilities of the T = 1 distribution
    if torch.is_autocast_enabled(hidden.device.type):  # the matmul in autocast's dtype
        hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
    with torch.autocast(hidden.device.type, enabled=False):
        return _TokenLogprobs.apply(hidden, weight, targets, float(temperature), int(chunk))
