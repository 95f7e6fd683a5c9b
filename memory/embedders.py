"""What turns memories and questions into vectors: a local model, or the provider's endpoint.

EMBEDDING_PROVIDER=local (the default) embeds with WordLlama's l2_supercat model, whose weights
and tokenizer ship inside the `wordllama` wheel from PyPI: nothing is downloaded at run time,
both files are checked against the hashes below before they are read, and no embeddings API
is needed (Ollama and other OpenAI-compatible endpoints often have none). It embeds a message
in about a millisecond on the CPU. It knows English far better than Russian; lexical recall
(memory/lexical.py) carries Russian.

EMBEDDING_PROVIDER=openai posts to the OpenAI-compatible /embeddings endpoint (EMBEDDING_MODEL),
billed against the user's daily allowance like any other call.

Each vector is stored with its embedder's `space`; vectors of another space are never compared
(`python bot.py migrate-memory reembed` re-embeds them after a change of provider).
"""

from __future__ import annotations

import asyncio
import hashlib
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from graph.model import ModelGateway
    from settings import Settings


class Embedder(Protocol):
    space: str  # names the model and its dimensions: vectors of two spaces are not comparable
    billed: bool  # whether the provider charges tokens for it

    async def embed(self, texts: list[str]) -> list[list[float]]: ...


class ProviderEmbedder:
    """The provider's OpenAI-compatible /embeddings endpoint, through the one model client."""

    billed = True

    def __init__(self, models: ModelGateway, model: str) -> None:
        self._models = models
        self.model = model
        self.space = f"openai:{model}"

    async def embed(self, texts: list[str]) -> list[list[float]]:
        return await self._models.embed(texts) if texts else []


# The files of wordllama 0.4.0.post1's l2_supercat model (requirements.txt pins the release).
WORDLLAMA_FILES = {
    "weights/l2_supercat_256.safetensors":
        "64b47a2dc493cb8e85944076601189739852d7b64e0e1eedcb1937a251cd9fd5",
    "tokenizers/l2_supercat_tokenizer_config.json":
        "93248f2a9ec36c7b35f700a033d5f36228aae48db61aee31007fa49062cdeb68",
}


class ModelFilesChanged(RuntimeError):
    """An installed model file does not match the hash this release was checked with."""


class LocalEmbedder:
    """WordLlama l2_supercat, 256 dimensions, from the installed wheel; loaded on first use."""

    billed = False
    space = "local:wordllama-l2_supercat-256"

    def __init__(self) -> None:
        self._model: Any = None
        self._loading: asyncio.Lock | None = None

    async def embed(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        model = await self.load()
        vectors = model.embed(texts, norm=True)
        return [row.tolist() for row in vectors]

    async def load(self) -> Any:
        """The model, read (half a second, in a thread) the first time it is needed."""
        if self._model is None:
            self._loading = self._loading or asyncio.Lock()
            async with self._loading:
                if self._model is None:
                    self._model = await asyncio.to_thread(_load_wordllama)
        return self._model


@cache  # one copy per process, shared by every embedder (it is read-only)
def _load_wordllama() -> Any:
    # wordllama's own loader looks for the tokenizer under `tokenizer/` while the wheel ships it
    # under `tokenizers/`, and would then fetch it from the Hugging Face hub; the files are read
    # here directly instead, after their hashes are checked.
    import wordllama
    from safetensors import safe_open
    from tokenizers import Tokenizer
    from wordllama.inference import WordLlamaInference

    root = Path(wordllama.__file__).parent
    for name, expected in WORDLLAMA_FILES.items():
        digest = hashlib.sha256((root / name).read_bytes()).hexdigest()
        if digest != expected:
            raise ModelFilesChanged(
                f"{root / name}: sha256 {digest}, expected {expected}; reinstall requirements.txt"
            )
    tokenizer = Tokenizer.from_file(str(root / "tokenizers/l2_supercat_tokenizer_config.json"))
    with safe_open(str(root / "weights/l2_supercat_256.safetensors"), framework="np") as weights:
        embedding = weights.get_tensor("embedding.weight")
    return WordLlamaInference(embedding, tokenizer)


def build_embedder(settings: Settings, models: ModelGateway) -> Embedder:
    if settings.embedding_provider == "openai":
        return ProviderEmbedder(models, settings.embedding_model)
    return LocalEmbedder()
