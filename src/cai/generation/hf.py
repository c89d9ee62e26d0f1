"""Batched generation with transformers models: the `hf` backend.

What makes it fast on a CPU (benchmarks/bench_generation.py measures each against a naive
per-prompt `model.generate` loop):
1. a shared prefix (the few-shot block) is encoded once and read by every row of every batch
   through `shared_prefix_attention`, never copied per row at decode time;
2. requests are sorted by length and batched, rows that finished are dropped from the batch;
3. bf16 weights where the CPU (AVX-512 BF16 / AMX) or GPU supports it.

Sampling is seeded per request (`Request.seed`), so a request's output does not depend on
which batch it lands in, and a resumed run reproduces an uninterrupted one.
"""

from __future__ import annotations

import logging
import time

import torch
from tqdm.auto import tqdm

from cai.generation.base import Generation, GenerationEngine, Request
from cai.generation.shared_prefix import ATTENTION_NAME, PrefixCache, SuffixCache

log = logging.getLogger(__name__)


class HFEngine(GenerationEngine):
    """Generate with a transformers causal LM, in batches, with a cached shared prefix."""

    def __init__(self, model, tokenizer, batch_size: int = 32, prefix_cache: bool = True,
                 progress: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.use_prefix_cache = prefix_cache
        self.progress = progress
        self.device = next(model.parameters()).device
        self._prefixes: dict[str, PrefixCache] = {}
        self.stats = {"prefill_tokens": 0, "generated_tokens": 0, "wall_s": 0.0}
        stop_ids = {tokenizer.eos_token_id}
        for token in ("<|im_end|>", "<|endoftext|>"):
            token_id = tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
                stop_ids.add(token_id)
        self.stop_token_ids = torch.tensor(sorted(i for i in stop_ids if i is not None))

    # -----------------------------------------------------------------------------------------
    def generate(self, requests: list[Request], prefix: str = "", desc: str = "generate") -> list[Generation]:
        """Complete `prefix + request.prompt` for every request; outputs in request order."""
        if not requests:
            return []
        start = time.perf_counter()
        prefix_cache, prefix_ids = self._prefix(prefix)
        encoded = [self._encode(r.prompt, with_special=not prefix) for r in requests]
        if not self.use_prefix_cache and prefix:
            encoded = [prefix_ids + ids for ids in encoded]
        order = sorted(range(len(requests)), key=lambda i: len(encoded[i]))
        results: list[Generation | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc=desc, disable=not self.progress, unit="req", leave=False)
        for first in range(0, len(order), self.batch_size):
            batch = order[first:first + self.batch_size]
            outputs = self._generate_batch([encoded[i] for i in batch], [requests[i] for i in batch],
                                           prefix_cache)
            for index, output in zip(batch, outputs, strict=True):
                results[index] = output
            bar.update(len(batch))
        bar.close()
        self.stats["wall_s"] += time.perf_counter() - start
        return results  # type: ignore[return-value]

    # -----------------------------------------------------------------------------------------
    def _encode(self, text: str, with_special: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=with_special).input_ids

    def _prefix(self, prefix: str) -> tuple[PrefixCache | None, list[int]]:
        if not prefix:
            return None, []
        ids = self._encode(prefix, with_special=True)
        if not self.use_prefix_cache:
            return None, ids
        if prefix not in self._prefixes:
            self._prefixes.clear()  # one prefix at a time: the stages use one few-shot block
            tensor = torch.tensor([ids], device=self.device)
            self._prefixes[prefix] = PrefixCache.build(self.model, tensor)
            self.stats["prefill_tokens"] += len(ids)
        return self._prefixes[prefix], ids

    @torch.no_grad()
    def _generate_batch(self, encoded: list[list[int]], requests: list[Request],
                        prefix: PrefixCache | None) -> list[Generation]:
        model, device = self.model, self.device
        batch = len(encoded)
        max_new = max(r.max_new_tokens for r in requests)
        width = max(len(ids) for ids in encoded)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((batch, width), pad, dtype=torch.long)
        key_mask = torch.zeros((batch, width), dtype=torch.bool)
        for row, ids in enumerate(encoded):  # left padding
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            key_mask[row, width - len(ids):] = True
        input_ids, key_mask = input_ids.to(device), key_mask.to(device)
        prefix_len = prefix.length if prefix is not None else 0
        positions = (prefix_len + key_mask.long().cumsum(1) - 1).clamp(min=0)
        generators = [torch.Generator(device="cpu").manual_seed(r.seed) for r in requests]
        stop_ids_set = set(self.stop_token_ids.tolist())

        previous_attention = model.config._attn_implementation
        model.set_attn_implementation(ATTENTION_NAME)
        try:
            cache = SuffixCache(model.config, capacity=width + max_new)
            live = list(range(batch))  # rows still generating, in cache order
            tokens: list[list[int]] = [[] for _ in range(batch)]
            finish = ["length"] * batch
            logits = model(input_ids=input_ids, position_ids=positions, cache=cache, use_cache=True,
                           logits_to_keep=1, cai_prefix=prefix, cai_key_mask=key_mask).logits[:, -1]
            cache.advance(width)
            self.stats["prefill_tokens"] += int(key_mask.sum())
            for step in range(max_new):
                next_ids = self._sample(logits, [requests[i] for i in live], [generators[i] for i in live])
                keep = []
                for slot, row in enumerate(live):
                    token = int(next_ids[slot])
                    if token in stop_ids_set:
                        finish[row] = "stop"
                        continue
                    tokens[row].append(token)
                    if self._hit_stop_string(tokens[row], requests[row].stop):
                        finish[row] = "stop"
                    elif len(tokens[row]) >= requests[row].max_new_tokens:
                        finish[row] = "length"
                    else:
                        keep.append(slot)
                self.stats["generated_tokens"] += len(live)
                if not keep or step == max_new - 1:
                    break
                if len(keep) < len(live):  # drop finished rows from the batch
                    index = torch.tensor(keep, device=device)
                    cache.batch_select_indices(index)
                    key_mask, next_ids = key_mask[index], next_ids[index]
                    live = [live[slot] for slot in keep]
                step_positions = (prefix_len + key_mask.sum(1, keepdim=True)).long()
                key_mask = torch.cat([key_mask, key_mask.new_ones(len(live), 1)], dim=1)
                logits = model(input_ids=next_ids[:, None], position_ids=step_positions, cache=cache,
                               use_cache=True, cai_prefix=prefix, cai_key_mask=key_mask).logits[:, -1]
                cache.advance(1)
        finally:
            model.set_attn_implementation(previous_attention)
        return [self._finish(tokens[row], requests[row], finish[row], len(encoded[row]))
                for row in range(batch)]

    @staticmethod
    def _sample(logits: torch.Tensor, requests: list[Request], generators) -> torch.Tensor:
        """One token per row: greedy at temperature 0, else top-p sampling by an exponential race
        (argmax of p / E, E ~ Exp(1), equivalent to drawing from p) with noise from the row's own
        generator: a row's sample does not depend on its batch-mates, and the small numeric
        differences bf16 shows between batch shapes rarely change it."""
        logits = logits.float().cpu()
        temperature = torch.tensor([max(r.temperature, 1e-6) for r in requests])[:, None]
        probs = torch.softmax(logits / temperature, dim=-1)
        if any(r.top_p < 1.0 for r in requests):  # nucleus: keep the smallest set with mass top_p
            sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
            top_p = torch.tensor([r.top_p for r in requests])[:, None]
            sorted_probs = sorted_probs.masked_fill(sorted_probs.cumsum(-1) - sorted_probs > top_p, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        uniform = torch.stack([torch.rand(probs.shape[-1], generator=g) for g in generators])
        sampled = (probs / uniform.log_().neg_()).argmax(-1)  # -log(U) ~ Exp(1)
        greedy = torch.tensor([r.temperature <= 0 for r in requests])
        return torch.where(greedy, logits.argmax(-1), sampled)

    def _hit_stop_string(self, tokens: list[int], stops: tuple[str, ...]) -> bool:
        if not stops:
            return False
        tail = self.tokenizer.decode(tokens[-12:], skip_special_tokens=False)
        return any(stop in tail for stop in stops)

    def _finish(self, tokens: list[int], request: Request, finish: str, prompt_tokens: int) -> Generation:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for stop in request.stop:  # cut at the first stop string: nothing past it is kept
            cut = text.find(stop)
            if cut >= 0:
                text = text[:cut]
                finish = "stop"
        return Generation(text=text.strip(), num_tokens=len(tokens), finish_reason=finish,
                          prompt_tokens=prompt_tokens)
