"""Batched generation with transformers models: the `hf` backend.

What makes it fast on a CPU (benchmarks/bench_generation.py measures it against a naive
per-prompt `model.generate` loop):
1. a shared prefix (the few-shot block) is encoded once and read by every row of every batch
   through `shared_prefix_attention`, never copied per row at decode time;
2. a request can continue from an earlier generation's key/value state (`keep_state=True`,
   then `states=`): a revision request, which repeats the critique request's conversation and
   critique, only encodes its new tokens;
3. requests are sorted by length and batched; finished rows leave the batch; the suffix cache
   is preallocated, so a decode step writes one column instead of copying the cache;
4. bf16 weights where the CPU (AVX-512 BF16 / AMX) or GPU supports it.

Sampling is seeded per request (`Request.seed`), so in fp32 a request's output does not depend
on which batch it lands in (in bf16, rounding differs slightly between batch shapes), and a
resumed run reproduces an uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from cai.generation.base import (
    Generation,
    GenerationEngine,
    OptionScores,
    Request,
    ScoreRequest,
)
from cai.generation.shared_prefix import (
    ATTENTION_NAME,
    PackedRows,
    PrefixCache,
    SuffixCache,
    release_mask,
)

log = logging.getLogger(__name__)


@dataclass
class RowState:
    """Keys/values of one finished request after the shared prefix: [layers] x [Hkv, length, d].
    `text` is the text they encode (prompt + the kept part of the generation)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    text: str
    fed_generated: int = 0  # generated tokens that are in keys/values

    @property
    def length(self) -> int:
        return self.keys[0].shape[1]


class HFEngine(GenerationEngine):
    """Generate with a transformers causal LM, in batches, with a cached shared prefix."""

    def __init__(
        self,
        model,
        tokenizer,
        batch_size: int = 32,
        prefix_cache: bool = True,
        progress: bool = True,
        score_batch_size: int | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size  # rows decoded together
        self.score_batch_size = int(score_batch_size or batch_size)  # rows scored together
        self.use_prefix_cache = prefix_cache
        self.progress = progress
        self._prefixes: dict[str, PrefixCache] = {}
        self.stats = {"prefill_tokens": 0, "generated_tokens": 0, "reused_tokens": 0, "wall_s": 0.0}
        stop_ids = {tokenizer.eos_token_id}
        for token in ("<|im_end|>", "<|endoftext|>"):
            token_id = tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
                stop_ids.add(token_id)
        self.stop_token_ids = {i for i in stop_ids if i is not None}

    @property
    def device(self) -> torch.device:
        """Where the model is now (a trainer may move it after the engine was built)."""
        return next(self.model.parameters()).device

    @torch.no_grad()
    def update_weights(self, model) -> None:
        """Copy `model`'s weights into the engine's model (cast to its dtype; a no-op when the
        engine generates with `model` itself). PPO calls it before each rollout."""
        if model is self.model:
            return
        own = self.model.state_dict()
        for name, tensor in model.state_dict().items():
            own[name].copy_(tensor)

    # -----------------------------------------------------------------------------------------
    def generate(
        self,
        requests: list[Request],
        prefix: str = "",
        desc: str = "generate",
        keep_state: bool = False,
        states: list | None = None,
    ) -> list[Generation]:
        """Complete `prefix + request.prompt` for every request; outputs in request order.

        keep_state: attach each request's key/value state to `Generation.extra["state"]`.
        states: one earlier state (or None) per request; where `request.prompt` starts with the
            state's text, only the rest of the prompt is encoded (same text, less work).
        """
        if not requests:
            return []
        start = time.perf_counter()
        prefix_cache, prefix_ids = self._prefix(prefix)
        pasts: list[RowState | None] = []
        encoded = []
        for i, request in enumerate(requests):
            state = states[i] if states and self.use_prefix_cache else None
            if state is not None and request.prompt.startswith(state.text):
                encoded.append(self._encode(request.prompt[len(state.text) :], with_special=False))
                pasts.append(state)
                self.stats["reused_tokens"] += state.length
            else:
                ids = self._encode(request.prompt, with_special=not prefix)
                encoded.append(ids if self.use_prefix_cache or not prefix else prefix_ids + ids)
                pasts.append(None)
        order = sorted(
            range(len(requests)),
            key=lambda i: len(encoded[i]) + (pasts[i].length if pasts[i] else 0),
        )
        results: list[Generation | None] = [None] * len(requests)
        bar = tqdm(
            total=len(requests), desc=desc, disable=not self.progress, unit="req", leave=False
        )
        for first in range(0, len(order), self.batch_size):
            batch = order[first : first + self.batch_size]
            outputs = self._generate_batch(
                [encoded[i] for i in batch],
                [requests[i] for i in batch],
                prefix_cache,
                [pasts[i] for i in batch],
                keep_state,
            )
            for index, output in zip(batch, outputs, strict=True):
                results[index] = output
            bar.update(len(batch))
        bar.close()
        release_mask()
        self.stats["wall_s"] += time.perf_counter() - start
        return results  # type: ignore[return-value]

    # -----------------------------------------------------------------------------------------
    def score(
        self, requests: list[ScoreRequest], prefix: str = "", desc: str = "score"
    ) -> list[OptionScores]:
        """Sum of log-probabilities of each option's tokens after `prefix + request.context`.

        One forward pass per batch: a row holds [context | option 1 | option 2 | ...], each
        option attending to the context and to itself only (positions restart after the
        context), so the context is encoded once for all its options, and the shared prefix
        once for everything (as in `generate`).
        """
        if not requests:
            return []
        start = time.perf_counter()
        prefix_cache, prefix_ids = self._prefix(prefix)
        rows = []
        for request in requests:
            context = self._encode(request.context, with_special=not prefix)
            if not request.options:
                raise ValueError("A ScoreRequest needs at least one option.")
            options = [
                self._continuation(request.context, o, context, prefix) for o in request.options
            ]
            if prefix and not self.use_prefix_cache:
                context = prefix_ids + context
            rows.append((context, options))
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + sum(map(len, rows[i][1])))
        results: list[OptionScores | None] = [None] * len(rows)
        bar = tqdm(total=len(rows), desc=desc, disable=not self.progress, unit="req", leave=False)
        for first in range(0, len(order), self.score_batch_size):
            batch = order[first : first + self.score_batch_size]
            for index, scores in zip(
                batch, self._score_batch([rows[i] for i in batch], prefix_cache), strict=True
            ):
                results[index] = scores
            bar.update(len(batch))
        bar.close()
        release_mask()
        self.stats["wall_s"] += time.perf_counter() - start
        return results  # type: ignore[return-value]

    def _continuation(self, context: str, option: str, context_ids: list[int], prefix: str):
        """The option's token ids as the tokenizer splits context + option (what the model would
        read), falling back to the option alone where the split moves the boundary."""
        full = self._encode(context + option, with_special=not prefix)
        if len(full) > len(context_ids) and full[: len(context_ids)] == context_ids:
            return full[len(context_ids) :]
        return self._encode(option, with_special=False)

    @torch.no_grad()
    def _score_batch(
        self, rows: list[tuple[list[int], list[list[int]]]], prefix: PrefixCache | None
    ) -> list[OptionScores]:
        device = self.device
        prefix_len = prefix.length if prefix is not None else 0
        packed = PackedRows.build(rows, self.tokenizer.pad_token_id, start=prefix_len)
        wanted_pos, wanted_tok = [], []  # (row, position) predicting each option token
        spans = []  # per row, per option: slice of the wanted list
        for row, (_, options) in enumerate(rows):
            row_spans = []
            for option, (first, end) in zip(options, packed.spans[row], strict=True):
                # option token j is predicted at the context's last position (j = 0), else at
                # the option's own token j - 1
                predictors = [packed.contexts_end[row] - 1, *range(first, end - 1)]
                row_spans.append((len(wanted_pos), len(wanted_pos) + len(option)))
                wanted_pos += [(row, p) for p in predictors]
                wanted_tok += option
            spans.append(row_spans)
        input_ids, positions = packed.input_ids, packed.positions
        key_mask, visible = packed.key_mask, packed.visible
        previous_attention = self.model.config._attn_implementation
        self.model.set_attn_implementation(ATTENTION_NAME)
        try:
            hidden = self.model.get_decoder()(
                input_ids=input_ids.to(device),
                position_ids=positions.to(device),
                use_cache=False,
                cai_prefix=prefix,
                cai_key_mask=key_mask.to(device),
                cai_visible=visible.to(device),
            ).last_hidden_state
        finally:
            self.model.set_attn_implementation(previous_attention)
        rows_index = torch.tensor([r for r, _ in wanted_pos], device=device)
        cols_index = torch.tensor([p for _, p in wanted_pos], device=device)
        logits = self.model.get_output_embeddings()(hidden[rows_index, cols_index]).float()
        token_logprobs = (
            torch.log_softmax(logits, dim=-1)
            .gather(1, torch.tensor(wanted_tok, device=device)[:, None])[:, 0]
            .cpu()
        )
        self.stats["prefill_tokens"] += int(key_mask.sum())
        return [
            OptionScores(
                logprobs=tuple(float(token_logprobs[a:b].sum()) for a, b in row_spans),
                num_tokens=tuple(b - a for a, b in row_spans),
            )
            for row_spans in spans
        ]

    # -----------------------------------------------------------------------------------------
    def _encode(self, text: str, with_special: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=with_special).input_ids

    def _prefix(self, prefix: str) -> tuple[PrefixCache | None, list[int]]:
        """The shared prefix's key/value cache (built once), or its token ids without caching."""
        if not prefix:
            return None, []
        if self.use_prefix_cache and prefix in self._prefixes:
            return self._prefixes[prefix], []  # encoded once: no need to tokenize it again
        ids = self._encode(prefix, with_special=True)
        if not self.use_prefix_cache:
            return None, ids
        self._prefixes.clear()  # one prefix at a time: the stages use one few-shot block
        self._prefixes[prefix] = PrefixCache.build(
            self.model, torch.tensor([ids], device=self.device)
        )
        self.stats["prefill_tokens"] += len(ids)
        return self._prefixes[prefix], ids

    @torch.no_grad()
    def _generate_batch(
        self,
        encoded: list[list[int]],
        requests: list[Request],
        prefix: PrefixCache | None,
        pasts: list[RowState | None],
        keep_state: bool,
    ) -> list[Generation]:
        model, device = self.model, self.device
        batch = len(encoded)
        max_new = max(r.max_new_tokens for r in requests)
        past_width = max((p.length for p in pasts if p is not None), default=0)
        width = max(len(ids) for ids in encoded)
        # Layout of row r: [pad | its past state] (past_width columns, in the cache) then
        # [pad | its new prompt tokens] (width columns, fed now). Pads are masked out.
        cache = SuffixCache(model.config, capacity=past_width + width + max_new)
        key_mask = torch.zeros((batch, past_width + width), dtype=torch.bool)
        past_len = torch.zeros(batch, dtype=torch.long)
        if past_width:
            cache.fill_past(
                [(p.keys, p.values) if p is not None else None for p in pasts], past_width
            )
            for row, past in enumerate(pasts):
                if past is not None:
                    key_mask[row, past_width - past.length : past_width] = True
                    past_len[row] = past.length
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((batch, width), pad, dtype=torch.long)
        for row, ids in enumerate(encoded):  # left padding
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            key_mask[row, past_width + width - len(ids) :] = True
        input_ids, key_mask = input_ids.to(device), key_mask.to(device)
        prefix_len = prefix.length if prefix is not None else 0
        new_mask = key_mask[:, past_width:]
        positions = (
            prefix_len + past_len[:, None].to(device) + new_mask.long().cumsum(1) - 1
        ).clamp(min=0)
        generators = [torch.Generator(device="cpu").manual_seed(r.seed) for r in requests]
        states: list[RowState | None] = [None] * batch

        previous_attention = model.config._attn_implementation
        model.set_attn_implementation(ATTENTION_NAME)
        try:
            live = list(range(batch))  # rows still generating, in cache order
            tokens: list[list[int]] = [[] for _ in range(batch)]
            finish = ["length"] * batch
            stop_tokens: list[int | None] = [None] * batch
            logits = model(
                input_ids=input_ids,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
                cai_prefix=prefix,
                cai_key_mask=key_mask,
            ).logits[:, -1]
            cache.advance(width)
            self.stats["prefill_tokens"] += int(new_mask.sum())
            for _step in range(max_new):
                next_ids = self._sample(
                    logits, [requests[i] for i in live], [generators[i] for i in live]
                )  # on the CPU
                sampled = next_ids.tolist()
                next_ids = next_ids.to(device)
                keep = []
                for slot, row in enumerate(live):
                    token = sampled[slot]
                    fed = True  # whether this row's generated tokens are all in the cache
                    if token in self.stop_token_ids:
                        finish[row] = "stop"
                        stop_tokens[row] = token
                    else:
                        tokens[row].append(token)
                        fed = False
                        if self._hit_stop_string(tokens[row], requests[row].stop):
                            finish[row] = "stop"
                        elif len(tokens[row]) >= requests[row].max_new_tokens:
                            finish[row] = "length"
                        else:
                            keep.append(slot)
                            continue
                    if keep_state:
                        states[row] = self._row_state(cache, key_mask, slot, tokens[row], fed)
                self.stats["generated_tokens"] += len(live)
                if not keep:
                    break
                if len(keep) < len(live):  # drop finished rows from the batch
                    index = torch.tensor(keep, device=device)
                    cache.batch_select_indices(index)
                    key_mask, next_ids = key_mask[index], next_ids[index]
                    live = [live[slot] for slot in keep]
                step_positions = (prefix_len + key_mask.sum(1, keepdim=True)).long()
                key_mask = torch.cat([key_mask, key_mask.new_ones(len(live), 1)], dim=1)
                logits = model(
                    input_ids=next_ids[:, None],
                    position_ids=step_positions,
                    cache=cache,
                    use_cache=True,
                    cai_prefix=prefix,
                    cai_key_mask=key_mask,
                ).logits[:, -1]
                cache.advance(1)
        finally:
            model.set_attn_implementation(previous_attention)
        outputs = []
        for row in range(batch):
            text, finish_reason = self._cut(tokens[row], requests[row], finish[row])
            extra = (
                {"state": self._crop_state(states[row], tokens[row], requests[row].prompt, text)}
                if keep_state
                else {}
            )
            outputs.append(
                Generation(
                    text=text,
                    num_tokens=len(tokens[row]),
                    finish_reason=finish_reason,
                    prompt_tokens=len(encoded[row]),
                    token_ids=tuple(tokens[row]),
                    stop_token_id=stop_tokens[row] if finish_reason == "stop" else None,
                    extra=extra,
                )
            )
        return outputs

    @staticmethod
    def _sample(logits: torch.Tensor, requests: list[Request], generators) -> torch.Tensor:
        """One token per row: greedy at temperature 0, else top-p sampling by an exponential race
        (argmax of p / E, E ~ Exp(1), equivalent to drawing from p) with noise from the row's own
        generator: a row's sample does not depend on its batch-mates."""
        logits = logits.float().cpu()
        temperature = torch.tensor([max(r.temperature, 1e-6) for r in requests])[:, None]
        probs = torch.softmax(logits / temperature, dim=-1)
        if any(r.top_p < 1.0 for r in requests):  # nucleus: keep the smallest set with mass top_p
            sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
            top_p = torch.tensor([r.top_p for r in requests])[:, None]
            sorted_probs = sorted_probs.masked_fill(
                sorted_probs.cumsum(-1) - sorted_probs > top_p, 0.0
            )
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

    def _cut(self, tokens: list[int], request: Request, finish: str) -> tuple[str, str]:
        """The generated text, cut at the first stop string (nothing past it is kept), stripped."""
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for stop in request.stop:
            cut = text.find(stop)
            if cut >= 0:
                text, finish = text[:cut], "stop"
        return text.strip(), finish

    @staticmethod
    def _row_state(
        cache: SuffixCache,
        key_mask: torch.Tensor,
        slot: int,
        tokens: list[int],
        fed: bool,
    ) -> RowState:
        """Copy one row's real (unpadded) keys/values out of the batch cache."""
        real = key_mask[slot]
        buffers = cache.layer_buffers()
        return RowState(
            keys=[k[slot][:, real].clone() for k, _ in buffers],
            values=[v[slot][:, real].clone() for _, v in buffers],
            text="",
            fed_generated=len(tokens) if fed else len(tokens) - 1,
        )

    def _crop_state(
        self, state: RowState | None, tokens: list[int], prompt: str, text: str
    ) -> RowState | None:
        """Keep the prompt and the longest run of generated tokens whose decoded text is a prefix
        of the returned `text`, so a follow-up prompt that repeats `prompt + text` can reuse it."""
        if state is None:
            return None
        prompt_len = state.length - state.fed_generated
        keep = 0
        for k in range(state.fed_generated, max(-1, state.fed_generated - 10), -1):
            if text.startswith(self.tokenizer.decode(tokens[:k], skip_special_tokens=True)):
                keep = k
                break
        length = prompt_len + keep
        return RowState(
            [k[:, :length] for k in state.keys],
            [v[:, :length] for v in state.values],
            text=prompt + self.tokenizer.decode(tokens[:keep], skip_special_tokens=True),
        )
