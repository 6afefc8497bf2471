"""Attention that exports as ONNX Runtime's GroupQueryAttention with a shared past/present buffer.

Why: the runtime preallocates each layer's KV cache once, at the maximum context, and binds the same
buffer as `past_key_values.*` input and `present.*` output. GroupQueryAttention writes the new keys and
values in place at each row's position (taken from `seqlens_k`) and attends only over the valid length,
so no step concatenates or reallocates. It also handles grouped KV heads without repeating them.

The PyTorch `forward` below computes the same thing eagerly; it runs during tracing (shapes) and in
tests, while `symbolic` emits the single contrib node into the graph.
"""

from __future__ import annotations

import torch


def gqa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor,
                  past_v: torch.Tensor, seqlens_k: torch.Tensor, num_heads: int, kv_heads: int,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager GQA with right-padded rows: row b holds seqlens_k[b]+1 valid tokens after this call."""
    bsz, seq, _ = q.shape
    head_dim = q.shape[-1] // num_heads
    present_k, present_v = past_k.clone(), past_v.clone()
    out = torch.zeros_like(q)
    for b in range(bsz):
        total = int(seqlens_k[b]) + 1
        start = total - seq
        kb = k[b].view(seq, kv_heads, head_dim).transpose(0, 1)
        vb = v[b].view(seq, kv_heads, head_dim).transpose(0, 1)
        present_k[b, :, start:total] = kb
        present_v[b, :, start:total] = vb
        keys = present_k[b, :, :total].repeat_interleave(num_heads // kv_heads, 0)
        values = present_v[b, :, :total].repeat_interleave(num_heads // kv_heads, 0)
        qb = q[b].view(seq, num_heads, head_dim).transpose(0, 1)
        scores = qb @ keys.transpose(1, 2) * scale
        causal = torch.arange(total)[None, :] > (torch.arange(seq)[:, None] + start)
        scores = scores.masked_fill(causal, float("-inf"))
        out[b] = (scores.softmax(-1) @ values).transpose(0, 1).reshape(seq, num_heads * head_dim)
    return out, present_k, present_v


class GroupQueryAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, seqlens_k, total_len, num_heads, kv_heads, scale):  # noqa: ARG004
        return gqa_reference(q, k, v, past_k, past_v, seqlens_k, num_heads, kv_heads, scale)

    @staticmethod
    def symbolic(g, q, k, v, past_k, past_v, seqlens_k, total_len, num_heads, kv_heads, scale):
        out, present_k, present_v = g.op(
            "com.microsoft::GroupQueryAttention", q, k, v, past_k, past_v, seqlens_k, total_len,
            num_heads_i=num_heads, kv_num_heads_i=kv_heads, scale_f=scale, outputs=3)
        out.setType(q.type())
        present_k.setType(past_k.type())
        present_v.setType(past_v.type())
        return out, present_k, present_v


def mask_to_seqlens(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GQA's length inputs from a right-padded [B, total] mask; both stay dynamic in the traced graph."""
    seqlens_k = (attention_mask.sum(-1) - 1).to(torch.int32)
    total_len = torch.ones_like(attention_mask[0]).sum().to(torch.int32)
    return seqlens_k, total_len


def last_token_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of each row's last valid token in this chunk, [B, 1, H].

    Why: logits are only needed for the next token, and the LM head over a 150k vocabulary for every
    prefill position would cost more than the rest of prefill. Rows share the same past length during
    prefill; during decode (S=1) the index is 0 for every row.
    """
    seq = hidden.shape[1]
    valid = attention_mask.sum(-1)
    idx = (valid - attention_mask.shape[1] + seq - 1).clamp(min=0)
    idx = idx.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
    return hidden.gather(1, idx)
