"""Prompt text for the SL-CAI loop, in two formats (`model.prompt_format`):

- `raw`: the paper's transcript format (Bai et al. 2022, Appendix C.1):
  "\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nCritiqueRequest: ...\\n\\nCritique:" after the few-shot
  dialogues; for pretrained base models.
- `chat`: the same turns through the tokenizer's chat template (the few-shot dialogues become
  earlier user/assistant turns); for instruction-tuned models such as SmolLM2-Instruct.

Every critique or revision prompt is `prefix + suffix`: the prefix (few-shot block) is the same
for every request, so the generation engine encodes it once.
"""

from __future__ import annotations

from collections.abc import Sequence

from cai.constitution import Constitution, CritiqueExample, Principle, Turn

# Generation ends at any of these: a sample never runs into a new turn or section.
RAW_STOPS = (
    "\n\nHuman:",
    "\n\nAssistant:",
    "\n\nCritiqueRequest:",
    "\n\nCritique:",
    "\n\nRevisionRequest:",
    "\n\nRevision:",
    "\n\n---",
)
CHAT_STOPS = (
    "<|im_end|>",
    "<|endoftext|>",
    "\n\nHuman:",
    "\n\nCritiqueRequest:",
    "\n\nRevisionRequest:",
)


def raw_conversation(turns: Sequence[Turn]) -> str:
    names = {"user": "Human", "assistant": "Assistant"}
    return "".join(f"\n\n{names[t.role]}: {t.content}" for t in turns)


def answer_prompt(tokenizer, request: str, prompt_format: str) -> str:
    """The prompt under which a model answers a bare request: "\n\nHuman: ..\n\nAssistant:"
    (raw) or the chat template with the generation prompt (chat)."""
    return conversation_prompt(tokenizer, [{"role": "user", "content": request}], prompt_format)


def conversation_prompt(tokenizer, turns: list[dict], prompt_format: str) -> str:
    """The prompt under which a model gives the next answer of a conversation ({"role",
    "content"} turns ending with the human's): the raw transcript then "\n\nAssistant:", or the
    chat template with the generation prompt."""
    if prompt_format == "raw":
        return raw_conversation([Turn(t["role"], t["content"]) for t in turns]) + "\n\nAssistant:"
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)


class SLPrompts:
    """Builds initial-answer, critique and revision prompts for one constitution and format."""

    def __init__(
        self,
        constitution: Constitution,
        tokenizer,
        prompt_format: str,
        critique: bool = True,
        num_fewshot: int | None = None,
    ):
        if prompt_format not in ("raw", "chat"):
            raise ValueError(f"prompt_format must be raw or chat, not {prompt_format!r}")
        self.format = prompt_format
        self.tokenizer = tokenizer
        self.critique_enabled = critique  # False: direct revision (paper Figure 7 ablation)
        self.examples = constitution.critique_fewshot[:num_fewshot]
        self.stops = RAW_STOPS if prompt_format == "raw" else CHAT_STOPS
        self._fewshot_messages = [m for e in self.examples for m in self._chat_example(e)]
        self.prefix = self._fewshot_prefix()

    # -- initial answers: the helpful model answers the bare request ---------------------------
    def initial(self, request: str) -> str:
        return answer_prompt(self.tokenizer, request, self.format)

    # -- critique and revision: suffixes that follow self.prefix --------------------------------
    def critique(self, request: str, answer: str, principle: Principle) -> str:
        conversation = (Turn("user", request), Turn("assistant", answer))
        if self.format == "raw":
            return (
                raw_conversation(conversation)
                + f"\n\nCritiqueRequest: {principle.critique}\n\nCritique:"
            )
        messages = [
            {
                "role": "user",
                "content": self._task(conversation, "CritiqueRequest", principle.critique),
            }
        ]
        return self._suffix(messages)

    def revision(
        self, request: str, answer: str, principle: Principle, critique_text: str | None
    ) -> str:
        conversation = (Turn("user", request), Turn("assistant", answer))
        if self.format == "raw":
            text = raw_conversation(conversation)
            if critique_text is not None:
                text += f"\n\nCritiqueRequest: {principle.critique}\n\nCritique: {critique_text}"
            return text + f"\n\nRevisionRequest: {principle.revision}\n\nRevision:"
        if critique_text is None:
            messages = [
                {
                    "role": "user",
                    "content": self._task(conversation, "RevisionRequest", principle.revision),
                }
            ]
        else:
            messages = [
                {
                    "role": "user",
                    "content": self._task(conversation, "CritiqueRequest", principle.critique),
                },
                {"role": "assistant", "content": critique_text},
                {"role": "user", "content": f"RevisionRequest: {principle.revision}"},
            ]
        return self._suffix(messages)

    # -----------------------------------------------------------------------------------------
    def _fewshot_prefix(self) -> str:
        if self.format == "raw":
            return "".join(self._raw_example(e) for e in self.examples)
        return self._chat(self._fewshot_messages, generation_prompt=False)

    def _raw_example(self, example: CritiqueExample) -> str:
        text = raw_conversation(example.conversation)
        if self.critique_enabled:
            text += (
                f"\n\nCritiqueRequest: {example.critique_request}\n\nCritique: {example.critique}"
            )
        return (
            text
            + f"\n\nRevisionRequest: {example.revision_request}\n\nRevision: {example.revision}\n\n---"
        )

    def _chat_example(self, example: CritiqueExample) -> list[dict]:
        if not self.critique_enabled:
            return [
                {
                    "role": "user",
                    "content": self._task(
                        example.conversation, "RevisionRequest", example.revision_request
                    ),
                },
                {"role": "assistant", "content": example.revision},
            ]
        return [
            {
                "role": "user",
                "content": self._task(
                    example.conversation, "CritiqueRequest", example.critique_request
                ),
            },
            {"role": "assistant", "content": example.critique},
            {"role": "user", "content": f"RevisionRequest: {example.revision_request}"},
            {"role": "assistant", "content": example.revision},
        ]

    @staticmethod
    def _task(conversation: Sequence[Turn], label: str, request: str) -> str:
        return f"Here is a conversation:{raw_conversation(conversation)}\n\n{label}: {request}"

    def _chat(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _suffix(self, messages: list[dict]) -> str:
        """Chat text of few-shot turns + `messages`, minus the shared prefix."""
        full = self._chat(self._fewshot_messages + messages, generation_prompt=True)
        if not full.startswith(self.prefix):
            raise ValueError(
                "This chat template does not extend a conversation by appending text; "
                "use model.prompt_format=raw for this model."
            )
        return full[len(self.prefix) :]
