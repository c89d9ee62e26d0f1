"""Attention over a key/value prefix shared by every row of a batch.

Every critique and revision request starts with the same few-shot block (~2,500 tokens with the
paper's examples). Its keys and values are computed once (`PrefixCache`) and read by every row
through broadcasting, instead of being copied into each row's cache: a decode step then reads
the prefix once per layer for the whole batch, not once per row.

The attention function is registered with transformers as "cai_shared_prefix"; the model is
called with two extra keyword arguments that transformers passes down to it:
`cai_prefix` (a PrefixCache or None) and `cai_key_mask` (bool [batch, suffix_len], True where
the suffix cache holds a real token, False for left padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface

ATTENTION_NAME = "cai_shared_prefix"


@dataclass
class PrefixCache:
    """Keys and values of a shared prefix, per layer: [1, kv_heads, prefix_len, head_dim]."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int

    @classmethod
    @torch.no_grad()
    def build(cls, model, prefix_ids: torch.Tensor) -> PrefixCache:
        """Run the model once over `prefix_ids` ([1, prefix_len]) and keep its cache."""
        cache = DynamicCache(config=model.config)
        attn = model.config._attn_implementation
        model.set_attn_implementation("sdpa")
        try:
            model(input_ids=prefix_ids, cache=cache, use_cache=True, logits_to_keep=1)
        finally:
            model.set_attn_implementation(attn)
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        return cls(keys, values, prefix_ids.shape[1])


def shared_prefix_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    scaling=None,
    dropout=0.0,
    cai_prefix: PrefixCache | None = None,
    cai_key_mask: torch.Tensor | None = None,
    cai_visible: torch.Tensor | None = None,
    **kwargs,
):
    """Causal attention over [shared prefix ; this row's suffix cache].

    query: [B, Hq, q, d]; key, value: [B, Hkv, S, d] (the suffix cache, new tokens last);
    cai_key_mask: [B, S] bool. cai_visible: optional [B, q, S] bool that replaces the causal
    suffix mask (scoring feeds several options after one context in a row, each option seeing
    the context and itself only). Returns ([B, q, Hq, d], None) as transformers expects.

    Query heads are grouped by the kv head they share ([B, Hkv, g*q, d]). The prefix part treats
    every row's queries as one long sequence against the single prefix copy (no per-row copy);
    the suffix part is masked attention per row; the two are merged with their log-sum-exps.
    On a CPU without gradients, `_cpu_prefill_attention` computes both parts in one pass.
    """
    if torch.is_autocast_enabled(query.device.type):  # one dtype, as sdpa takes under autocast
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    batch, q_heads, q_len, dim = query.shape
    kv_heads, suffix_len = key.shape[1], key.shape[2]
    groups = q_heads // kv_heads
    scaling = scaling if scaling is not None else dim**-0.5
    grouped = query.reshape(batch, kv_heads, groups * q_len, dim)  # row order: (group, query)

    def causal_visibility() -> torch.Tensor:
        """Suffix visibility [B, q, S]: causal, no padding; a query always sees itself."""
        key_mask = (
            cai_key_mask
            if cai_key_mask is not None
            else torch.ones(batch, suffix_len, dtype=torch.bool, device=key.device)
        )
        query_pos = torch.arange(suffix_len - q_len, suffix_len, device=key.device)
        key_pos = torch.arange(suffix_len, device=key.device)
        causal = key_pos[None, :] <= query_pos[:, None]
        return (causal[None] & key_mask[:, None, :]) | (
            key_pos[None, None, :] == query_pos[None, :, None]
        )

    def suffix_mask() -> torch.Tensor:
        visible = cai_visible if cai_visible is not None else causal_visibility()
        mask = (
            visible[:, None, None]
            .expand(batch, 1, groups, q_len, suffix_len)
            .reshape(batch, 1, groups * q_len, suffix_len)
        )
        if query.device.type == "cpu":  # the fused kernel takes an additive mask, query's dtype
            return torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
                ~mask, float("-inf")
            )
        return mask

    if q_len == 1 and cai_visible is None and query.device.type == "cpu":  # a decode step
        out = _cpu_decode_attention(
            grouped, key, value, cai_key_mask, cai_prefix, module.layer_idx, scaling
        )
        return out.reshape(batch, q_heads, 1, dim).transpose(1, 2).contiguous(), None

    # every layer of one forward pass gets the same mask tensors: build the mask once
    source = cai_visible if cai_visible is not None else cai_key_mask
    shape = (batch, groups, q_len, suffix_len, query.dtype, query.device)
    mask = _LastMask.get(source, shape, suffix_mask)
    if q_len > 1 and query.device.type == "cpu" and not torch.is_grad_enabled():
        out = _cpu_prefill_attention(
            grouped, key, value, mask, cai_prefix, module.layer_idx, scaling
        )
        return out.reshape(batch, q_heads, q_len, dim).transpose(1, 2).contiguous(), None
    out, lse = _flash(grouped, key, value, mask, scaling)  # [B, Hkv, g*q, d], [B, Hkv, g*q]
    if cai_prefix is not None and cai_prefix.length:
        layer = module.layer_idx
        rows = grouped.transpose(0, 1).reshape(1, kv_heads, batch * groups * q_len, dim)
        prefix_out, prefix_lse = _flash(
            rows, cai_prefix.keys[layer], cai_prefix.values[layer], None, scaling
        )
        prefix_out = prefix_out.reshape(kv_heads, batch, groups * q_len, dim).transpose(0, 1)
        prefix_lse = prefix_lse.reshape(kv_heads, batch, groups * q_len).transpose(0, 1)
        top = torch.maximum(lse, prefix_lse)
        w_suffix, w_prefix = torch.exp(lse - top), torch.exp(prefix_lse - top)
        out = (out.float() * w_suffix[..., None] + prefix_out.float() * w_prefix[..., None]) / (
            w_suffix + w_prefix
        )[..., None]
        out = out.to(query.dtype)
    out = out.reshape(batch, q_heads, q_len, dim)
    return out.transpose(1, 2).contiguous(), None


def _cpu_decode_attention(grouped, key, value, key_mask, prefix, layer: int, scaling):
    """One decode step on a CPU: every row's query against [shared prefix ; its own cache] in
    one softmax, by plain matrix products (scores in the model's dtype, softmax in fp32, as
    transformers' eager attention); the prefix part for all rows at once.

    grouped: [B, Hkv, g, d]; key, value: [B, Hkv, W, d], the suffix cache's whole contiguous
    buffers (`SuffixCache.update` returns them for decode steps on a CPU), of which the first
    S = key_mask.shape[1] columns are filled; the rest are zeros and masked out. Products over
    the whole buffer keep one shape for a batch's steps: a strided [:S] view is slow in batched
    products, a copy costs a fresh allocation per layer and step, and a shape that changes every
    step makes oneDNN keep a new kernel each time (resident memory grows; cai.memory.padded_width).
    Returns [B, Hkv, g, d]."""
    batch, kv_heads, groups, dim = grouped.shape
    width = key.shape[2]
    visible = torch.zeros(batch, width, dtype=torch.bool, device=key.device)
    if key_mask is None:
        visible[:] = True
    else:
        visible[:, : key_mask.shape[1]] = key_mask
    query = grouped * scaling
    scores = torch.matmul(query, key.transpose(-1, -2))  # [B, Hkv, g, W]
    scores.masked_fill_(~visible[:, None, None, :], float("-inf"))
    length = prefix.length if prefix is not None else 0
    if length:
        every_row = query.transpose(0, 1).reshape(kv_heads, batch * groups, dim)
        prefix_scores = torch.matmul(every_row, prefix.keys[layer][0].transpose(-1, -2))
        prefix_scores = prefix_scores.view(kv_heads, batch, groups, length).permute(1, 0, 2, 3)
        scores = torch.cat([prefix_scores, scores], dim=-1)  # [B, Hkv, g, P + W]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(grouped.dtype)
    out = torch.matmul(probs[..., length:], value)
    if length:
        prefix_probs = probs[..., :length].permute(1, 0, 2, 3).reshape(-1, batch * groups, length)
        prefix_out = torch.matmul(prefix_probs, prefix.values[layer][0])  # [Hkv, B*g, d]
        out = out + prefix_out.view(kv_heads, batch, groups, dim).transpose(0, 1)
    return out


@torch.no_grad()
def _cpu_prefill_attention(
    grouped, key, value, mask, prefix: PrefixCache | None, layer: int, scaling
):
    """Attention of many queries per row over [shared prefix ; suffix cache] on a CPU, one row
    and kv head at a time: one softmax over both parts, scores in the model's dtype (as
    transformers' eager attention), matrix products running at the CPU's matmul speed. About
    2x faster than the fused flash kernel at these shapes (~700 queries per row and head
    against a 2,000-token prefix), because the fused kernel computes the prefix part well
    below matmul speed; a row and head at a time keeps the scores small (a few MB).

    grouped: [B, Hkv, g*q, d]; key, value: [B, Hkv, S, d]; mask: additive [B, 1, g*q, S] in
    the query's dtype. Returns [B, Hkv, g*q, d]."""
    batch, kv_heads, rows, _ = grouped.shape
    length = prefix.length if prefix is not None else 0
    out = torch.empty_like(grouped)
    query = grouped * scaling
    for head in range(kv_heads):
        if length:
            prefix_keys = prefix.keys[layer][0, head].transpose(0, 1)  # [d, P]
            prefix_values = prefix.values[layer][0, head]  # [P, d]
        for row in range(batch):
            scores = query.new_empty(rows, length + key.shape[2])
            if length:
                torch.matmul(query[row, head], prefix_keys, out=scores[:, :length])
            torch.matmul(query[row, head], key[row, head].transpose(0, 1), out=scores[:, length:])
            scores[:, length:] += mask[row, 0]
            probs = torch.softmax(scores, dim=-1)  # fp32 inside, the query's dtype out
            result = torch.matmul(probs[:, length:], value[row, head])
            if length:
                result += torch.matmul(probs[:, :length], prefix_values)
            out[row, head] = result
    return out


class _LastMask:
    """The suffix mask of the last attention call and what it was built from. The layers of one
    forward pass are called with the same `cai_visible` / `cai_key_mask` tensor, so the first
    builds the mask (up to tens of MB for a batch of packed rows) and the others reuse it,
    instead of every layer building its own."""

    source: torch.Tensor | None = None
    shape: tuple | None = None
    mask: torch.Tensor | None = None

    @classmethod
    def get(cls, source, shape: tuple, build) -> torch.Tensor:
        if source is None or cls.source is not source or cls.shape != shape:
            cls.source, cls.shape, cls.mask = source, shape, build()
        return cls.mask

    @classmethod
    def clear(cls) -> None:
        cls.source = cls.shape = cls.mask = None


def release_mask() -> None:
    """Let the last attention mask go (callers do when a generation or scoring call ends)."""
    _LastMask.clear()


def _flash(query, key, value, mask, scale):
    """Attention output and its log-sum-exp (fused CPU kernel; a plain fallback elsewhere).
    mask: None, or on a CPU an additive mask of the query's dtype, elsewhere a bool mask."""
    if query.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, False, attn_mask=mask, scale=scale
        )[:2]
        return out, lse.float()
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.softmax(scores, dim=-1).to(value.dtype), value), lse


@dataclass
class PackedRows:
    """Rows of [context | option 1 | option 2 | ...], left-padded, for one forward pass in which
    each option attends to its row's context and to itself only (positions restart after the
    context for every option): a context shared by several continuations is encoded once.

    input_ids, positions: [B, W] long; key_mask: [B, W] bool (False on padding); visible:
    [B, W, W] bool (query, key), the `cai_visible` of shared_prefix_attention; spans: per row,
    per option, its (first, end) columns."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    key_mask: torch.Tensor
    visible: torch.Tensor
    spans: list[list[tuple[int, int]]]
    contexts_end: list[int]  # per row: the column after its context (its last context token + 1)

    @classmethod
    def build(
        cls, rows: list[tuple[list[int], list[list[int]]]], pad_id: int, start: int = 0,
        width: int | None = None,
    ) -> PackedRows:  # fmt: skip
        """rows: (context ids, [option ids, ...]); start: the position of the first context
        token (the length of a shared prefix before it); width: at least the longest row."""
        lengths = [len(c) + sum(len(o) for o in opts) for c, opts in rows]
        width = max([*lengths, width or 0])
        batch = len(rows)
        input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
        segment = torch.full((batch, width), -1, dtype=torch.long)  # -1 pad, 0 context, k option
        positions = torch.zeros((batch, width), dtype=torch.long)
        spans, contexts_end = [], []
        for row, (context, options) in enumerate(rows):
            at = width - lengths[row]  # left padding
            n_ctx = len(context)
            input_ids[row, at : at + n_ctx] = torch.tensor(context, dtype=torch.long)
            segment[row, at : at + n_ctx] = 0
            positions[row, at : at + n_ctx] = torch.arange(n_ctx) + start
            cursor, row_spans = at + n_ctx, []
            for k, option in enumerate(options, start=1):
                n = len(option)
                input_ids[row, cursor : cursor + n] = torch.tensor(option, dtype=torch.long)
                segment[row, cursor : cursor + n] = k
                positions[row, cursor : cursor + n] = torch.arange(n) + start + n_ctx
                row_spans.append((cursor, cursor + n))
                cursor += n
            spans.append(row_spans)
            contexts_end.append(at + n_ctx)
        key_mask = segment >= 0
        same = (segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None])
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        eye = torch.eye(width, dtype=torch.bool)
        visible = (same & causal & key_mask[:, None, :]) | eye
        return cls(input_ids, positions, key_mask, visible, spans, contexts_end)


class SuffixCache(DynamicCache):
    """Per-row key/value cache of the tokens after the shared prefix, in preallocated buffers
    that grow by doubling: a decode step writes one column instead of copying the whole cache
    (DynamicCache concatenates, which copies O(length) bytes per layer per step)."""

    def __init__(self, config, capacity: int = 256):
        super().__init__(config=config)
        self.capacity = capacity
        self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.length = 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """key_states, value_states: [B, Hkv, new, d]. Returns views [B, Hkv, length, d]; for a
        decode step on a CPU the whole buffers [B, Hkv, capacity, d], zeros past `length`."""
        new = key_states.shape[2]
        start = self.length
        keys, values = self.buffers.get(layer_idx, (None, None))
        if keys is None or start + new > keys.shape[2]:
            size = max(self.capacity, 2 * (start + new))
            grown_k = key_states.new_zeros(*key_states.shape[:2], size, key_states.shape[3])
            grown_v = value_states.new_zeros(*value_states.shape[:2], size, value_states.shape[3])
            if keys is not None:
                grown_k[:, :, :start] = keys[:, :, :start]
                grown_v[:, :, :start] = values[:, :, :start]
            keys, values = grown_k, grown_v
            self.buffers[layer_idx] = (keys, values)
        keys[:, :, start : start + new] = key_states
        values[:, :, start : start + new] = value_states
        if new == 1 and keys.device.type == "cpu":  # a decode step: the whole (zeroed) buffers
            return keys, values  # (see _cpu_decode_attention)
        return keys[:, :, : start + new], values[:, :, : start + new]

    def fill_past(self, rows: list, width: int) -> None:
        """Start from earlier per-row states: rows[r] is None or (keys, values), lists over layers
        of [Hkv, length, d]; each is written right-aligned in the first `width` columns."""
        sample = next(r for r in rows if r is not None)
        batch, layers = len(rows), len(sample[0])
        kv_heads, _, dim = sample[0][0].shape
        for layer in range(layers):
            keys = sample[0][layer].new_zeros(batch, kv_heads, max(self.capacity, width), dim)
            values = torch.zeros_like(keys)
            for row, past in enumerate(rows):
                if past is not None:
                    length = past[0][layer].shape[1]
                    keys[row, :, width - length : width] = past[0][layer]
                    values[row, :, width - length : width] = past[1][layer]
            self.buffers[layer] = (keys, values)
        self.length = width

    def layer_buffers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) [B, Hkv, length, d] of what is cached so far."""
        return [
            (k[:, :, : self.length], v[:, :, : self.length])
            for _, (k, v) in sorted(self.buffers.items())
        ]

    def advance(self, new: int) -> None:
        """Called by the engine after each forward pass (all layers wrote `new` columns)."""
        self.length += new

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for layer, (keys, values) in self.buffers.items():
            self.buffers[layer] = (keys.index_select(0, indices), values.index_select(0, indices))


def _no_mask(*args, **kwargs):
    """The attention function builds its own mask from `cai_key_mask`."""
    return None


AttentionInterface.register(ATTENTION_NAME, shared_prefix_attention)
AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)
