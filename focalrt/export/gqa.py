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


class KVCachedDecoder(torch.nn.Module):
    """A transformers decoder-only LM (Qwen2 / Llama layers) as one graph with an in-place KV cache.

    Reuses the model's projections, norms, MLPs and rotary embedding; replaces attention with
    GroupQueryAttention and computes logits for each row's last token only. Position ids are whatever
    the model's rotary embedding takes: [3, B, S] for Qwen2.5-VL's M-RoPE, [B, S] for Llama.
    """

    def __init__(self, language_model: torch.nn.Module, lm_head: torch.nn.Module):
        super().__init__()
        cfg = language_model.config
        self.layers = language_model.layers
        self.norm = language_model.norm
        self.rotary_emb = language_model.rotary_emb
        self.lm_head = lm_head
        self.num_heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = float(self.head_dim ** -0.5)

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        hidden = inputs_embeds
        bsz, seq, _ = hidden.shape
        cos, sin = self.rotary_emb(hidden, position_ids)  # M-RoPE sections are already merged here
        seqlens_k, total_len = mask_to_seqlens(attention_mask)
        presents = []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(bsz, seq, self.num_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(bsz, seq, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            q = q.transpose(1, 2).reshape(bsz, seq, -1)
            k = k.transpose(1, 2).reshape(bsz, seq, -1)
            out, pk, pv = GroupQueryAttention.apply(q, k, v, past[2 * i], past[2 * i + 1], seqlens_k,
                                                    total_len, self.num_heads, self.kv_heads, self.scale)
            hidden = hidden + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            presents += [pk, pv]
        hidden = self.norm(last_token_hidden(hidden, attention_mask))
        return (self.lm_head(hidden), *presents)


def decoder_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["inputs_embeds", "attention_mask", "position_ids", *past], ["logits", *present]


def export_kv_decoder(module: KVCachedDecoder, path, rope_axes: int) -> None:
    """Trace a KVCachedDecoder with its IO declared in one place; position ids are [3, B, S] or [B, S]."""
    from focalrt.export.onnx_io import export_module

    n_layers = len(module.layers)
    in_names, out_names = decoder_io_names(n_layers)
    axes: dict[str, dict[int, str]] = {
        "inputs_embeds": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {1: "batch", 2: "sequence"} if rope_axes == 3 else {0: "batch", 1: "sequence"},
        "logits": {0: "batch"},
    }
    for name in in_names[3:] + out_names[1:]:
        axes[name] = {0: "batch", 2: "max_context"}
    bsz, seq, past_len, buf = 1, 5, 3, 16
    hidden = module.lm_head.in_features
    embeds = torch.randn(bsz, seq, hidden)
    mask = torch.ones(bsz, past_len + seq, dtype=torch.long)
    pos = torch.arange(past_len, past_len + seq).view(1, -1).expand(bsz, -1)
    if rope_axes == 3:
        pos = pos.unsqueeze(0).expand(3, -1, -1)
    past = [torch.zeros(bsz, module.kv_heads, buf, module.head_dim) for _ in range(2 * n_layers)]
    export_module(module, (embeds, mask, pos.contiguous(), *past), path, in_names, out_names, axes)
