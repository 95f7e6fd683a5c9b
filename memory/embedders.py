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
import importlib.util
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from tokenizers import Tokenizer

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
        self._model: MeanOfTokens | None = None
        self._loading: asyncio.Lock | None = None

    async def embed(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        model = await self.load()
        return model.embed(texts).tolist()

    async def load(self) -> MeanOfTokens:
        """The model, read (a third of a second, in a thread) the first time it is needed."""
        if self._model is None:
            self._loading = self._loading or asyncio.Lock()
            async with self._loading:
                if self._model is None:
                    self._model = await asyncio.to_thread(_load_wordllama)
        return self._model


@cache  # one copy per process, shared by every embedder (it is read-only)
def _load_wordllama() -> MeanOfTokens:
    # wordllama's own loader looks for the tokenizer under `tokenizer/` while the wheel ships it
    # under `tokenizers/`, and would then fetch it from the Hugging Face hub; the files are read
    # here directly instead, after their hashes are checked. The package itself is not imported
    # (its __init__ configures logging and loads its training helpers): only its files are used.
    from safetensors import safe_open
    from tokenizers import Tokenizer

    root = wordllama_dir()
    for name, expected in WORDLLAMA_FILES.items():
        digest = hashlib.sha256((root / name).read_bytes()).hexdigest()
        if digest != expected:
            raise ModelFilesChanged(
                f"{root / name}: sha256 {digest}, expected {expected}; reinstall requirements.txt"
            )
    tokenizer = Tokenizer.from_file(str(root / "tokenizers/l2_supercat_tokenizer_config.json"))
    with safe_open(str(root / "weights/l2_supercat_256.safetensors"), framework="np") as weights:
        matrix = weights.get_tensor("embedding.weight")
    return MeanOfTokens(matrix, tokenizer)


def wordllama_dir() -> Path:
    spec = importlib.util.find_spec("wordllama")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFilesChanged("the wordllama package is not installed; install requirements.txt")
    return Path(spec.submodule_search_locations[0])


class MeanOfTokens:
    """WordLlama's inference: a text's vector is the mean of its tokens' rows of the embedding
    matrix, scaled to unit length.

    wordllama's WordLlamaInference does the same but first widens the whole 32,000 x 256
    float16 matrix to float32, 32 MB more for the life of the process; widening only the rows
    of the text at hand gives the same vectors (float16 -> float32 is exact) with half the
    memory. tests/test_memory_recall.py compares the two.
    """

    def __init__(self, matrix: np.ndarray, tokenizer: Tokenizer) -> None:
        self.matrix = matrix
        self.tokenizer = tokenizer
        tokenizer.no_padding()  # each text is summed alone: no pad tokens to mask out
        tokenizer.no_truncation()  # a long text is the mean of all of it, as in wordllama

    def embed(self, texts: list[str]) -> np.ndarray:
        vectors = np.zeros((len(texts), self.matrix.shape[1]), dtype=np.float32)
        last_id = self.matrix.shape[0] - 1
        for vector, encoded in zip(
            vectors, self.tokenizer.encode_batch(texts, add_special_tokens=False), strict=True
        ):
            if encoded.ids:
                rows = self.matrix[np.clip(np.asarray(encoded.ids), 0, last_id)]
                vector[:] = rows.sum(axis=0, dtype=np.float32) / np.float32(len(encoded.ids))
        # A text without tokens stays all zeros (wordllama would divide it into NaNs).
        lengths = np.linalg.norm(vectors, axis=1, keepdims=True)
        return np.divide(vectors, lengths, out=vectors, where=lengths > 0)


def build_embedder(settings: Settings, models: ModelGateway) -> Embedder:
    if settings.embedding_provider == "openai":
        return ProviderEmbedder(models, settings.embedding_model)
    return LocalEmbedder()
