"""Request and response bodies (pydantic), in the shapes the official `openai` client reads.

Fields the OpenAI API has and this server does not use are accepted and ignored (clients such
as LangChain send some by default); those that would change the answer and are not supported
(n > 1, logprobs) are refused by the routes, naming the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

MemoryId = Annotated[StrictInt, Field(ge=0)]  # "12" is refused, never read as 1 and 2


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Sampling(_Request):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)  # not OpenAI's; vLLM's extra
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int | None = Field(None, ge=1)
    logprobs: Any = None
    memory_ids: list[MemoryId] | None = None  # GRC: memories the answer reads (extra_body)
    # GRC: read them under memory priors (docs/design.md section 8) from the prompt's embedding
    # (true) or its self-reasoned one ("reason", for questions that need a second hop); None: the
    # server's default
    memory_prior: bool | Literal["reason"] | None = None
    prior_temperature: float | None = Field(None, gt=0.0)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False


class ChatMessage(_Request):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class EmbeddingRequest(_Request):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    instruction: str | None = None  # GRC: an instruction put before every input
    reason: bool = False  # GRC: self-reasoned embedding
    user: str | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "grc_jax"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- GRC routes -----------------------------------------------------------------------------


class MemoriesAdd(_Request):
    texts: list[str] = Field(min_length=1)
    return_embeddings: bool = True


class MemoryOut(BaseModel):
    id: int
    text: str | None
    version: int
    embedding: list[float] | None = None


class MemoriesAdded(BaseModel):
    ids: list[list[int]]  # per text: one memory per segment
    segments: list[list[str]]
    embeddings: list[list[list[float]]] | None = None


class MemoryPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[MemoryOut]
    total: int
    offset: int
    limit: int


class MemoryReplace(_Request):
    text: str


class SearchRequest(_Request):
    query: str
    top_k: int = Field(5, ge=1)
    reason: bool = False


class SearchHit(BaseModel):
    id: int
    score: float
    text: str | None


class SearchResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[SearchHit]


class RagRequest(_Request):
    question: str
    top_k: int = Field(4, ge=1)
    reason: bool = False
    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    memory_prior: bool | None = None  # priors from the search's own scores, as Engine.rag
    prior_temperature: float | None = Field(None, gt=0.0)


class RagResponse(BaseModel):
    answer: str
    memory_ids: list[int]
    scores: list[float]
    finish_reason: str
    usage: Usage
