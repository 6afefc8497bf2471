"""The decoder graph: token ids in, logits out, attention as ONNX Runtime's GroupQueryAttention over a
shared past/present buffer.

Why: the runtime allocates each layer's KV cache once and binds the same buffer as `past_key_values.*`
input and `present.*` output. GroupQueryAttention writes the new keys and values in place at each row's
position (taken from `seqlens_k`) and attends only over the valid length, so no step concatenates or
reallocates. It also handles grouped KV heads without repeating them.

The same module fuses the rest of a layer the way ONNX Runtime's kernels want it (the choices of
onnxruntime-genai's builder): the token embedding inside the graph, so a decode step is one session call;
q/k/v as one projection; RoPE inside GroupQueryAttention (`do_rotary`) over a position table, or as
MRotaryEmbedding before it for M-RoPE; each residual add with the following RMSNorm as
SkipSimplifiedLayerNormalization; a tied LM head reading the embedding table itself. Each contrib op is
an autograd Function: its PyTorch `forward` computes the same thing eagerly (it runs during tracing and in
tests), and `symbolic` emits the single node.
"""

from __future__ import annotations

from typing import Any

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


def last_tokens_hidden(hidden: torch.Tensor, logits_to_keep: torch.Tensor) -> torch.Tensor:
    """Hidden states of the last `logits_to_keep` tokens of this chunk for every row, [B, keep, H].

    Why: a decode step needs logits for one token, and the LM head over a 150k vocabulary for every
    prefill position would cost more than the rest of prefill; verifying k drafted tokens in one call
    needs the last k, and scoring a text (perplexity) needs all of them. Every row feeds the same number
    of new tokens (rows may have different past lengths), so the kept tokens are the chunk's last ones.
    """
    seq = hidden.shape[1]
    keep = logits_to_keep.reshape(())
    idx = torch.arange(0, keep, dtype=torch.long) + (seq - keep)
    return hidden.gather(1, idx.view(1, -1, 1).expand(hidden.shape[0], -1, hidden.shape[2]))


# Rotary types whose cos/sin depend on the position only, so one table built at export serves every step.
STATIC_ROPE_TYPES = ("default", "linear", "llama3")


def rope_tables(rotary_emb: torch.nn.Module, positions: int, head_dim: int, axes: int) -> tuple[torch.Tensor, ...]:
    """cos/sin caches [positions, head_dim/2] from the model's own rotary module (its scaling included).

    Why a table: the contrib rotary ops look rows up by position id, so no per-step trigonometry or
    M-RoPE section shuffling stays in the graph. Asking the module for equal positions on every M-RoPE
    axis gives the plain per-position table; the sections are applied by the op.
    """
    rope_type = (getattr(rotary_emb, "rope_type", None) or "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise ValueError(f"rotary embedding type {rope_type!r} changes with the sequence length and cannot be "
                         f"exported as a fixed table; supported: {', '.join(STATIC_ROPE_TYPES)}")
    pos = torch.arange(positions).view(1, -1)
    if axes == 3:
        pos = pos.view(1, 1, -1).expand(3, 1, -1)
    probe = torch.zeros(1, positions, head_dim)
    with torch.no_grad():
        cos, sin = rotary_emb(probe, pos)
    return cos.reshape(positions, head_dim)[:, : head_dim // 2].contiguous(), \
        sin.reshape(positions, head_dim)[:, : head_dim // 2].contiguous()


def rotary_reference(x: torch.Tensor, position_ids: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                     num_heads: int, sections: tuple[int, ...]) -> torch.Tensor:
    """Eager rotate-half RoPE on [B, S, heads*head_dim]; M-RoPE takes each section's angle from its own axis."""
    bsz, seq, _ = x.shape
    if sections:
        cos = torch.cat([cos_cache[position_ids[i % 3]][..., a:b] for i, (a, b) in enumerate(_spans(sections))], -1)
        sin = torch.cat([sin_cache[position_ids[i % 3]][..., a:b] for i, (a, b) in enumerate(_spans(sections))], -1)
    else:
        cos, sin = cos_cache[position_ids], sin_cache[position_ids]
    cos, sin = torch.cat([cos, cos], -1).unsqueeze(2), torch.cat([sin, sin], -1).unsqueeze(2)
    xh = x.view(bsz, seq, num_heads, -1)
    half = xh.shape[-1] // 2
    rotated = torch.cat([-xh[..., half:], xh[..., :half]], -1)
    return (xh * cos + rotated * sin).reshape(bsz, seq, -1)


def _spans(sections: tuple[int, ...]) -> list[tuple[int, int]]:
    edges = [0]
    for s in sections:
        edges.append(edges[-1] + s)
    return list(zip(edges[:-1], edges[1:], strict=True))


class Rotary(torch.autograd.Function):
    """RoPE as one contrib node: MRotaryEmbedding (Qwen2.5-VL, [3, B, S] positions) or RotaryEmbedding ([B, S])."""

    @staticmethod
    def forward(ctx, x, position_ids, cos_cache, sin_cache, num_heads, sections):  # noqa: ARG004
        return rotary_reference(x, position_ids, cos_cache, sin_cache, num_heads, sections)

    @staticmethod
    def symbolic(g, x, position_ids, cos_cache, sin_cache, num_heads, sections):
        if sections:
            out = g.op("com.microsoft::MRotaryEmbedding", x, position_ids, cos_cache, sin_cache,
                       num_heads_i=num_heads, mrope_section_i=list(sections), interleaved_i=0)
        else:
            out = g.op("com.microsoft::RotaryEmbedding", x, position_ids, cos_cache, sin_cache,
                       num_heads_i=num_heads, interleaved_i=0)
        out.setType(x.type())
        return out


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Plain ops, which ONNX Runtime fuses into SimplifiedLayerNormalization at load (a standard-domain graph)."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


class SkipRMSNorm(torch.autograd.Function):
    """residual + x, and RMSNorm of that sum, as one SkipSimplifiedLayerNormalization node.

    Why: the residual add and the following norm are two kernels per sublayer otherwise; fused, a decode
    step launches two fewer kernels per sublayer.
    """

    @staticmethod
    def forward(ctx, x, residual, weight, eps):  # noqa: ARG004
        total = residual + x
        return rms_norm_reference(total, weight, eps), total

    @staticmethod
    def symbolic(g, x, residual, weight, eps):
        out, _mean, _inv_std, total = g.op("com.microsoft::SkipSimplifiedLayerNormalization", residual, x, weight,
                                           epsilon_f=eps, outputs=4)
        out.setType(x.type())
        total.setType(x.type())
        return out, total


def _norm_eps(norm: torch.nn.Module) -> float:
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None)
    if "RMSNorm" not in type(norm).__name__ or eps is None or getattr(norm, "weight", None) is None:
        raise ValueError(f"{type(norm).__name__} is not an RMSNorm with a weight and an epsilon; only RMSNorm "
                         f"decoders (Qwen2, Llama) are supported")
    return float(eps)


class TokenEmbedding(torch.nn.Module):
    """input_ids [B, S] -> embeddings [B, S, H]; with an image token id, image rows [N, H] replace its positions.

    The image token may lie outside the embedding table (a checkpoint tokenizer with <image> appended), so
    it is looked up as id 0 and then replaced. A decode step feeds no image: one zero row stands in.
    """

    def __init__(self, embed_tokens: torch.nn.Embedding, image_token_id: int | None = None):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.image_token_id = image_token_id

    def forward(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if self.image_token_id is None:
            return self.embed_tokens(input_ids)
        is_image = input_ids == self.image_token_id
        embeds = self.embed_tokens(torch.where(is_image, torch.zeros_like(input_ids), input_ids))
        index = (is_image.reshape(-1).long().cumsum(0) - 1).clamp(min=0)
        placed = image_embeds.index_select(0, index).view(embeds.shape)
        return torch.where(is_image.unsqueeze(-1), placed, embeds)


def _absent(g):
    """An omitted optional input of a contrib node (ONNX's empty input name)."""
    none = g.op("prim::Constant")
    none.setType(torch._C.OptionalType.ofTensor())
    return none


class RotaryPackedGQA(torch.autograd.Function):
    """Packed QKV [B, S, (N + 2 KV) * D] -> GroupQueryAttention with do_rotary: RoPE of q and k inside the op.

    Why: one kernel instead of a Split, two RotaryEmbedding nodes and the attention; the cos/sin caches are
    the same [positions, D/2] tables, looked up at the explicit position ids (so a row's positions may
    start anywhere, as Qwen2.5-VL's text continuation and draft verification need).
    """

    @staticmethod
    def forward(ctx, qkv, past_k, past_v, seqlens_k, total_len, cos, sin, position_ids,  # noqa: ARG004
                num_heads, kv_heads, scale):
        d = past_k.shape[-1]
        q, k, v = qkv.split([num_heads * d, kv_heads * d, kv_heads * d], -1)
        q = rotary_reference(q, position_ids, cos, sin, num_heads, ())
        k = rotary_reference(k, position_ids, cos, sin, kv_heads, ())
        return gqa_reference(q, k, v, past_k, past_v, seqlens_k, num_heads, kv_heads, scale)

    @staticmethod
    def symbolic(g, qkv, past_k, past_v, seqlens_k, total_len, cos, sin, position_ids, num_heads, kv_heads, scale):
        out, present_k, present_v = g.op(
            "com.microsoft::GroupQueryAttention", qkv, _absent(g), _absent(g), past_k, past_v, seqlens_k,
            total_len, cos, sin, position_ids, num_heads_i=num_heads, kv_num_heads_i=kv_heads, scale_f=scale,
            do_rotary_i=1, rotary_interleaved_i=0, outputs=3)
        out.setType(qkv.type().with_sizes([None, None, None]))
        present_k.setType(past_k.type())
        present_v.setType(past_v.type())
        return out, present_k, present_v


class LMHead(torch.autograd.Function):
    """hidden [T, H] @ weight[V, H]^T as one Gemm(transB=1), over the weight as the checkpoint stores it.

    Why: a Linear exports as a MatMul over a transposed copy, so a tied table would be stored (and loaded)
    twice; Gemm with transB reads the very table the token Gather reads. Untied heads take the same form, so
    every decoder has one LM head shape; the int4/int8 conversion turns it into MatMulNBits, and a tied
    pair into MatMulNBits + GatherBlockQuantized over one quantized table.
    """

    @staticmethod
    def forward(ctx, hidden, weight):  # noqa: ARG004
        return hidden @ weight.t()

    @staticmethod
    def symbolic(g, hidden, weight):
        out = g.op("Gemm", hidden, weight, transB_i=1)
        out.setType(hidden.type().with_sizes([None, None]))
        return out


def fused_projection(*linears: torch.nn.Linear) -> torch.nn.Linear:
    """One Linear computing several Linears of the same input, their outputs concatenated in order.

    Why: one matmul (one MatMulNBits at int4) a layer instead of three; a post-export pass that looks for
    a source weight finds it as a row block of the fused one ([q; k; v] along the output dimension).
    """
    bias = any(lin.bias is not None for lin in linears)
    fused = torch.nn.Linear(linears[0].in_features, sum(lin.out_features for lin in linears), bias=bias)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([lin.weight for lin in linears], 0))
        if bias:
            fused.bias.copy_(torch.cat([lin.bias if lin.bias is not None else torch.zeros(lin.out_features)
                                        for lin in linears], 0))
    return fused.eval()


def is_tied(embed_tokens: torch.nn.Embedding, lm_head: torch.nn.Linear) -> bool:
    """The LM head's weight is the embedding table itself (tie_word_embeddings), not a copy."""
    return lm_head.bias is None and lm_head.weight.data_ptr() == embed_tokens.weight.data_ptr()


class KVCachedDecoder(torch.nn.Module):
    """A transformers decoder-only LM (Qwen2 / Llama layers) as one graph with an in-place KV cache.

    A decode step is one call: token ids in (the embedding lookup, and for the vision families the image
    rows placed at the image token, are in the graph), logits out. Reuses the model's MLPs and norm
    weights; per layer, q/k/v are one fused projection; attention is GroupQueryAttention over the packed
    projection with RoPE inside it (`do_rotary`, cos/sin tables of `max_positions` rows) for plain RoPE,
    while Qwen2.5-VL's M-RoPE keeps an MRotaryEmbedding on q and k before it; each residual add is fused
    with the norm after it (SkipSimplifiedLayerNormalization); logits come from each row's last
    `logits_to_keep` tokens only, through one Gemm over the [V, H] head (`LMHead`): a tied head reads the
    embedding table itself, stored once.
    Position ids are [3, B, S] for M-RoPE and [B, S] otherwise.
    """

    def __init__(self, language_model: torch.nn.Module, lm_head: torch.nn.Module, max_positions: int,
                 image_token_id: int | None = None):
        super().__init__()
        cfg = language_model.config
        self.embed = TokenEmbedding(language_model.embed_tokens, image_token_id)
        self.layers = language_model.layers
        self.qkv = torch.nn.ModuleList(fused_projection(layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                        layer.self_attn.v_proj) for layer in self.layers)
        self.norm = language_model.norm
        self.lm_head = lm_head
        self.tied = is_tied(language_model.embed_tokens, lm_head)
        self.num_heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.hidden_size = cfg.hidden_size
        self.scale = float(self.head_dim ** -0.5)
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        self.sections = tuple(int(s) for s in rope.get("mrope_section") or ())
        if self.sections and sum(self.sections) != self.head_dim // 2:
            raise ValueError(f"mrope_section {list(self.sections)} must sum to head_dim/2 = {self.head_dim // 2}")
        cos, sin = rope_tables(language_model.rotary_emb, max_positions, self.head_dim, 3 if self.sections else 1)
        self.register_buffer("cos_cache", cos, persistent=False)
        self.register_buffer("sin_cache", sin, persistent=False)
        self.eps = _norm_eps(self.norm)

    @property
    def takes_image(self) -> bool:
        return self.embed.image_token_id is not None

    def attention(self, i: int, x: torch.Tensor, position_ids: torch.Tensor, past_k: torch.Tensor,
                  past_v: torch.Tensor, seqlens_k: torch.Tensor, total_len: torch.Tensor):
        qkv = self.qkv[i](x)
        if not self.sections:
            return RotaryPackedGQA.apply(qkv, past_k, past_v, seqlens_k, total_len, self.cos_cache, self.sin_cache,
                                         position_ids, self.num_heads, self.kv_heads, self.scale)
        d = self.head_dim
        q, k, v = qkv.split([self.num_heads * d, self.kv_heads * d, self.kv_heads * d], -1)
        q = Rotary.apply(q, position_ids, self.cos_cache, self.sin_cache, self.num_heads, self.sections)
        k = Rotary.apply(k, position_ids, self.cos_cache, self.sin_cache, self.kv_heads, self.sections)
        return GroupQueryAttention.apply(q, k, v, past_k, past_v, seqlens_k, total_len, self.num_heads,
                                         self.kv_heads, self.scale)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed.embed_tokens.weight if self.tied else self.lm_head.weight
        flat = LMHead.apply(hidden.reshape(-1, self.hidden_size), weight)
        if self.lm_head.bias is not None:
            flat = flat + self.lm_head.bias
        return flat.view(hidden.shape[0], hidden.shape[1], -1)

    def forward(self, input_ids, *rest):
        image_embeds, rest = (rest[0], rest[1:]) if self.takes_image else (None, rest)
        attention_mask, position_ids, logits_to_keep, *past = rest
        seqlens_k, total_len = mask_to_seqlens(attention_mask)
        presents = []
        residual = self.embed(input_ids, image_embeds)
        first = self.layers[0].input_layernorm
        x = rms_norm_reference(residual, first.weight, _norm_eps(first))
        for i, layer in enumerate(self.layers):
            out, pk, pv = self.attention(i, x, position_ids, past[2 * i], past[2 * i + 1], seqlens_k, total_len)
            presents += [pk, pv]
            post = layer.post_attention_layernorm
            x, residual = SkipRMSNorm.apply(layer.self_attn.o_proj(out), residual, post.weight, _norm_eps(post))
            mlp = layer.mlp(x)
            if i + 1 < len(self.layers):
                nxt = self.layers[i + 1].input_layernorm
                x, residual = SkipRMSNorm.apply(mlp, residual, nxt.weight, _norm_eps(nxt))
            else:
                residual = residual + mlp
        hidden = rms_norm_reference(last_tokens_hidden(residual, logits_to_keep), self.norm.weight, self.eps)
        return (self.logits(hidden), *presents)


def decoder_io_names(num_layers: int, takes_image: bool = False) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    tokens = ["input_ids", "image_embeds"] if takes_image else ["input_ids"]
    return [*tokens, "attention_mask", "position_ids", "logits_to_keep", *past], ["logits", *present]


def export_kv_decoder(module: KVCachedDecoder, path) -> dict[str, Any]:
    """Trace a KVCachedDecoder with its IO declared in one place; position ids are [3, B, S] or [B, S]."""
    from focalrt.export.onnx_io import export_module

    n_layers = len(module.layers)
    in_names, out_names = decoder_io_names(n_layers, module.takes_image)
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "image_embeds": {0: "image_tokens"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {1: "batch", 2: "sequence"} if module.sections else {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "kept"},
    }
    for name in in_names[-2 * n_layers:] + out_names[1:]:
        axes[name] = {0: "batch", 2: "max_context"}
    bsz, seq, past_len, buf = 1, 5, 3, 16
    ids = torch.tensor([[1, 2, 3, 4, 5]], dtype=torch.long)
    tokens: tuple[torch.Tensor, ...] = (ids,)
    if module.takes_image:
        ids = ids.clone()
        ids[0, 1:3] = module.embed.image_token_id
        tokens = (ids, torch.randn(2, module.hidden_size))
    mask = torch.ones(bsz, past_len + seq, dtype=torch.long)
    pos = torch.arange(past_len, past_len + seq).view(1, -1).expand(bsz, -1)
    if module.sections:
        pos = pos.unsqueeze(0).expand(3, -1, -1)
    past = [torch.zeros(bsz, module.kv_heads, buf, module.head_dim) for _ in range(2 * n_layers)]
    keep = torch.tensor([2], dtype=torch.long)
    export_module(module, (*tokens, mask, pos.contiguous(), keep, *past), path, in_names, out_names,
                  {k: v for k, v in axes.items() if k in in_names or k in out_names})
    return {"rotary": "MRotaryEmbedding" if module.sections else "GroupQueryAttention do_rotary",
            "rotary_table_positions": int(module.cos_cache.shape[0]),
            "qkv": "fused: one projection a layer, rows [q; k; v]",
            "embedding": "inside the decoder" + (" (image rows placed at the image token)" if module.takes_image
                                                 else ""),
            "lm_head": "Gemm(transB=1) over " + ("the embedding table (tied)" if module.tied else "its [V, H] weight"),
            "norms": "SkipSimplifiedLayerNormalization (residual add fused)"}


def validate_kv_decoder(module: KVCachedDecoder, language_model: torch.nn.Module, lm_head: torch.nn.Module, path,
                        prompt_len: int = 7, steps: int = 3, buf: int = 32) -> float:
    """decoder.onnx against transformers with a DynamicCache: prefill, then cached single-token steps; logits
    and the first layer's KV cache. The prefill asks (`logits_to_keep`) for every prompt position's logits
    and checks them all. Token ids go in; for the vision families three of them are the image token, whose
    rows come from `image_embeds` (and, for M-RoPE, take distinct h/w positions as an image prompt has)."""
    import numpy as np
    from transformers import DynamicCache

    from focalrt.export.onnx_io import compare, cpu_session

    tcfg = language_model.config
    n_layers, kv = tcfg.num_hidden_layers, tcfg.num_key_value_heads
    total = prompt_len + steps
    gen = torch.Generator().manual_seed(3)
    table = language_model.embed_tokens.weight
    ids = torch.randint(0, table.shape[0], (1, total), generator=gen)
    with torch.no_grad():
        embeds = table[ids]
    image = torch.randn(3, tcfg.hidden_size, generator=gen)
    if module.takes_image:
        ids[0, 2:5] = module.embed.image_token_id
        embeds[0, 2:5] = image
    pos = torch.arange(total).view(1, -1)
    if module.sections:
        pos = pos.view(1, 1, -1).repeat(3, 1, 1)
        pos[1, 0, 2:5] = torch.tensor([2, 2, 3])
        pos[2, 0, 2:5] = torch.tensor([2, 3, 2])
    sess = cpu_session(path)
    cache = [np.zeros((1, kv, buf, module.head_dim), np.float32) for _ in range(2 * n_layers)]
    ref_cache = DynamicCache(config=tcfg)
    worst, start = 0.0, 0
    for end in [prompt_len] + list(range(prompt_len + 1, total + 1)):
        keep = end - start  # every prefill position, then the one step
        feeds = {"input_ids": ids[:, start:end].numpy(), "attention_mask": np.ones((1, end), np.int64),
                 "position_ids": pos[..., start:end].numpy(), "logits_to_keep": np.array([keep], np.int64)}
        if module.takes_image:
            feeds["image_embeds"] = image.numpy() if start == 0 else np.zeros((1, tcfg.hidden_size), np.float32)
        feeds.update({f"past_key_values.{i // 2}.{'key' if i % 2 == 0 else 'value'}": c
                      for i, c in enumerate(cache)})
        outs = sess.run(None, feeds)
        cache = outs[1:]
        with torch.no_grad():
            h = language_model(inputs_embeds=embeds[:, start:end], position_ids=pos[..., start:end],
                               attention_mask=torch.ones(1, end, dtype=torch.long), past_key_values=ref_cache,
                               use_cache=True).last_hidden_state
            ref = lm_head(h[:, -keep:]).numpy()
        worst = max(worst, compare(f"decoder logits at length {end}", outs[0], ref, atol=1e-4))
        ref_k = ref_cache.layers[0].keys.numpy()
        worst = max(worst, compare(f"decoder KV cache at length {end}", cache[0][:, :, :end], ref_k, atol=1e-4))
        start = end
    return worst
