"""What a session returns: the statistics of a document read or loaded, and of each answer. Torch-free, so the
CLI can name them without importing torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Answer:
    text: str
    question_tokens: int
    generated_tokens: int
    first_token_s: float  # question prefill + first token
    decode_ms_per_token: float  # mean over tokens after the first
    stopped: bool = False  # True when interrupted
    history_tokens: int = 0  # earlier turns of the conversation in the prompt (between document and question)
    dropped_turns: int = 0  # oldest turns dropped so that this one fits the context

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationTiming:
    """Filled in by Session.generate as tokens come."""
    question_tokens: int = 0
    history_tokens: int = 0
    dropped_turns: int = 0
    generated: int = 0
    first_token_s: float = 0.0  # question prefill + first token
    decode_s: float = 0.0  # every step after the first


@dataclass
class DocumentStats:
    document_tokens: int
    prefill_s: float
    kv_bytes: int
    kv_bits_per_number: float
    fp16_bytes: int
    extra: dict = field(default_factory=dict)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.document_tokens / self.prefill_s if self.prefill_s > 0 else 0.0
