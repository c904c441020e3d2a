"""Evidence for the knowledge-intensive tasks: a BM25 index over the user's corpus (offline, the default) or
web search through Serper.dev when its key is in the environment."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path

import requests

from raypipe.data.rows import DataError, as_object, read_jsonl, text_problem

log = logging.getLogger(__name__)
SERPER_URL = "https://google.serper.dev/search"
JUNK_PREFIXES = ("Missing:", "Duration:", "Posted:")
"""Search-result snippets that carry no evidence (the published cleaning step drops them)."""


class Retriever(ABC):
    @abstractmethod
    def search(self, query: str, k: int) -> list[str]:
        """Up to `k` evidence passages for the query, best first (possibly none)."""


class BM25Retriever(Retriever):
    """A BM25 index (bm25s) over a JSONL corpus of `{"text": ..., "title": ...}` passages."""

    def __init__(self, corpus_path: Path) -> None:
        import bm25s

        self.passages = load_corpus(corpus_path)
        self._bm25s = bm25s
        self.index = bm25s.BM25()
        self.index.index(bm25s.tokenize(self.passages, stopwords="en", show_progress=False), show_progress=False)

    def search(self, query: str, k: int) -> list[str]:
        tokens = self._bm25s.tokenize([query], stopwords="en", show_progress=False)
        if not tokens.vocab:  # nothing but stop words
            return []
        ids, scores = self.index.retrieve(tokens, k=min(k, len(self.passages)), show_progress=False)
        return [self.passages[i] for i, s in zip(ids[0], scores[0]) if s > 0]


class SerperRetriever(Retriever):
    """Google results through Serper.dev: the answer box, the knowledge graph, then organic snippets."""

    def __init__(self, api_key: str, timeout_s: float = 30.0) -> None:
        self.api_key = api_key
        self.timeout_s = timeout_s

    def search(self, query: str, k: int) -> list[str]:
        try:
            response = requests.post(SERPER_URL, json={"q": query, "gl": "us", "hl": "en"},
                                     headers={"X-API-KEY": self.api_key}, timeout=self.timeout_s)
            response.raise_for_status()
            result = response.json()
        except (requests.RequestException, ValueError) as err:  # ValueError: a body that is not JSON
            log.warning("web search failed for %r: %s (rewriting without evidence)", query[:80], err)
            return []
        return serper_snippets(result)[:k]


def serper_snippets(result: dict) -> list[str]:
    """Cleaned snippets of one Serper response, in the published order."""
    snippets: list[str] = []
    box = result.get("answerBox") or {}
    for key in ("answer", "snippet", "snippetHighlighted"):
        if box.get(key):
            value = box[key]
            snippets.append(" ".join(value) if isinstance(value, list) else str(value))
            break
    graph = result.get("knowledgeGraph") or {}
    if graph.get("title") and graph.get("type"):
        snippets.append(f"{graph['title']}: {graph['type']}.")
    if graph.get("description"):
        snippets.append(str(graph["description"]))
    snippets += [f"{graph.get('title', '')} {name}: {value}." for name, value in graph.get("attributes", {}).items()]
    for item in result.get("organic", []):
        if item.get("snippet"):
            snippets.append(str(item["snippet"]))
        snippets += [f"{name}: {value}." for name, value in item.get("attributes", {}).items()]
    return [s.strip() for s in snippets if s.strip() and not s.strip().startswith(JUNK_PREFIXES)]


def load_corpus(path: Path) -> list[str]:
    """Passages of a JSONL corpus; a line that is not a JSON object with a non-empty `text` is a DataError (a corpus
    with a broken passage is not indexed half)."""
    if not path.is_file():
        raise DataError(f"{path}: retrieval corpus not found")
    passages = []
    for raw in read_jsonl(path):
        problem = raw.problem or as_object(raw.value) or text_problem(raw.value, "text")
        if problem is not None:
            raise DataError(f"{path}:{raw.row}: field '{problem.field}': {problem.error}")
        title, text = raw.value.get("title"), raw.value["text"]
        passages.append(f"{title}: {text.strip()}" if isinstance(title, str) and title else text)
    if not passages:
        raise DataError(f"{path}: the retrieval corpus has no passages")
    return passages
