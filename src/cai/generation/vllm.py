"""The `vllm` backend (optional extra, for GPUs): offline `vllm.LLM` with prefix caching and
tensor parallelism, behind the same interface as the `hf` backend.

Install with `pip install -e ".[vllm]"` on a CUDA machine; select with `generation=vllm`.
"""

from __future__ import annotations

from cai.errors import ConfigError
from cai.generation.base import (
    Generation,
    GenerationEngine,
    OptionScores,
    Request,
    ScoreRequest,
)


def require_vllm():
    """The vllm module, or one clear error saying how to install it."""
    try:
        import vllm  # optional (the vllm extra): imported only when asked for
    except ImportError as error:
        raise ConfigError(
            'generation.backend=vllm needs vLLM: `pip install -e ".[vllm]"` on a CUDA machine, '
            "or use generation=hf."
        ) from error
    return vllm


class VLLMEngine(GenerationEngine):
    def __init__(
        self, model_dir: str, gen_cfg, dtype: str = "auto", trust_remote_code: bool = False
    ):
        LLM = require_vllm().LLM
        self.llm = LLM(
            model=model_dir,
            dtype=dtype,
            enable_prefix_caching=True,  # the shared few-shot block is computed once
            tensor_parallel_size=int(gen_cfg.get("tensor_parallel_size", 1)),
            gpu_memory_utilization=float(gen_cfg.get("gpu_memory_utilization", 0.85)),
            trust_remote_code=trust_remote_code,
            seed=0,
        )

    def generate(
        self,
        requests: list[Request],
        prefix: str = "",
        desc: str = "generate",
        keep_state: bool = False,
        states: list | None = None,
    ) -> list[Generation]:
        # vLLM's automatic prefix caching already reuses repeated prompt prefixes.
        from vllm import SamplingParams  # optional (the vllm extra)

        params = [
            SamplingParams(
                temperature=r.temperature,
                top_p=r.top_p,
                max_tokens=r.max_new_tokens,
                stop=list(r.stop),
                seed=r.seed,
            )
            for r in requests
        ]
        outputs = self.llm.generate([prefix + r.prompt for r in requests], params, use_tqdm=True)
        results = []
        for output in outputs:
            sample = output.outputs[0]
            results.append(
                Generation(
                    text=sample.text.strip(),
                    num_tokens=len(sample.token_ids),
                    finish_reason="stop" if sample.finish_reason == "stop" else "length",
                    prompt_tokens=len(output.prompt_token_ids),
                    token_ids=_sampled_tokens(sample),
                    stop_token_id=_stop_token(sample),
                )
            )
        return results

    def update_weights(self, model) -> None:
        """Load the policy's weights into vLLM's model (as OpenRLHF and TRL do between PPO
        updates), then drop the prefix cache: keys/values of the old weights are stale."""
        weights = [(name, t.detach().cpu()) for name, t in model.state_dict().items()]
        if hasattr(self.llm, "apply_model"):  # vLLM >= 0.9: runs in every worker
            self.llm.apply_model(lambda vllm_model: vllm_model.load_weights(weights))
        else:  # older engines: the in-process driver worker
            executor = self.llm.llm_engine.model_executor
            executor.driver_worker.model_runner.model.load_weights(weights)
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()

    def score(
        self, requests: list[ScoreRequest], prefix: str = "", desc: str = "score"
    ) -> list[OptionScores]:
        """Each option as its own prompt with `prompt_logprobs` (prefix caching shares the
        few-shot block and the context between the options); log-probabilities of the option's
        tokens summed."""
        from vllm import SamplingParams  # optional (the vllm extra)

        tokenizer = self.llm.get_tokenizer()
        prompts, starts, counts = [], [], []
        for r in requests:
            context = tokenizer(prefix + r.context).input_ids
            for option in r.options:
                full = tokenizer(prefix + r.context + option).input_ids
                prompts.append({"prompt_token_ids": full})
                starts.append(len(context))
            counts.append(len(r.options))
        outputs = self.llm.generate(
            prompts, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=True
        )
        sums, tokens = [], []
        for output, start in zip(outputs, starts, strict=True):
            ids = output.prompt_token_ids
            sums.append(
                sum(output.prompt_logprobs[t][ids[t]].logprob for t in range(start, len(ids)))
            )
            tokens.append(len(ids) - start)
        results, at = [], 0
        for n in counts:
            results.append(OptionScores(tuple(sums[at : at + n]), tuple(tokens[at : at + n])))
            at += n
        return results


def _stop_token(sample) -> int | None:
    """The end token a vLLM sample stopped on: `stop_reason` is that token's id, or None when
    it stopped on the model's end-of-sequence token (then the last of its token_ids)."""
    if sample.finish_reason != "stop":
        return None
    if isinstance(sample.stop_reason, int):
        return sample.stop_reason
    if sample.stop_reason is None and sample.token_ids:
        return int(sample.token_ids[-1])
    return None  # a stop string


def _sampled_tokens(sample) -> tuple[int, ...]:
    """The sampled token ids without the end token a sample stopped on (as the hf engine)."""
    ids = tuple(int(t) for t in sample.token_ids)
    stop = _stop_token(sample)
    if ids and stop is not None and ids[-1] == stop:
        ids = ids[:-1]
    return ids
