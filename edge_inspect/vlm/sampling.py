"""Grammar-constrained sampling that checks the grammar on the token it picks, not on the whole vocabulary.

Why: llama-cpp-python 0.3.36 puts the grammar sampler first in its chain, so every step runs the
grammar over every token of the vocabulary (262k for Gemma 3) before picking one. Measured with
Gemma-3-270M on 2 cores, that cost about 3.5x the model's own decode time. llama.cpp's own sampler
(common/sampling.cpp, `grammar_first = false`) picks a token first and asks the grammar about that
one token; only when the grammar rejects it does it apply the grammar to the candidates. This module
does the same in three steps, cheapest first:

1. the best token by the sampling rule alone (argmax at temperature 0), checked alone;
2. the `top_k` best tokens (at least 64), checked together: the best one the grammar allows wins;
3. the whole vocabulary under the grammar (what llama-cpp-python does every step), only when none of
   those is allowed.

At temperature 0 the answer is the same token llama-cpp-python would pick (the best token the grammar
allows is the best allowed one among the best k, whenever one of those is allowed), so answers stay
schema-valid and repeatable. At temperature > 0 it samples from the allowed tokens among the top k with
top_p, min_p and the temperature, like llama.cpp's default chain after its top_k cut. The grammar state
advances only on the token that is returned, as in llama.cpp.

Example (inside llama_cpp.Llama._init_sampler):
    return LazyGrammarSampler(llama, grammar, temp=0.0, top_k=40, repeat_penalty=1.0)
"""

from __future__ import annotations

import ctypes
import time
from collections import deque
from typing import Any

import numpy as np

# Tokens the grammar sees at once in step 2: enough that the best allowed token is nearly always among
# them (JSON punctuation and enum words sit high once the model follows the format), few enough to be cheap.
_MIN_CANDIDATES = 64
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=False)


class LazyGrammarSampler:
    """Stands in for llama-cpp-python's `LlamaSampler` in `Llama.generate` (only `sample` is called there).

    `stats` counts how each token was found (checked alone, among the top k, over the whole vocabulary)
    and the seconds spent sampling, for the runner's timing split.
    """

    def __init__(
        self,
        llama: Any,
        grammar: Any,
        temp: float = 0.0,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        seed: int = 0,
    ) -> None:
        import llama_cpp

        self._api = llama_cpp
        self._vocab = llama._model.vocab
        self._n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self._grammar = llama_cpp.llama_sampler_init_grammar(
            self._vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8")
        )
        if not self._grammar:
            raise ValueError("llama.cpp could not parse the grammar")
        self.temp = temp
        self.top_k = top_k
        self.top_p = top_p
        self.min_p = min_p
        self.repeat_penalty = repeat_penalty
        self._recent: deque[int] = deque(maxlen=max(0, int(getattr(llama, "last_n_tokens_size", 64))))
        self._rng = np.random.default_rng(seed if seed >= 0 else None)
        self._k = max(_MIN_CANDIDATES, top_k if top_k > 0 else 0)
        self._small = (self._api.llama_token_data * self._k)()
        self._small_view = np.frombuffer(self._small, dtype=_TOKEN_DATA)
        self._full: Any = None  # the whole-vocabulary array, made on first need (3 MB for 262k tokens)
        self._full_view: np.ndarray | None = None
        self.stats = {"alone": 0, "top_k": 0, "vocabulary": 0, "seconds": 0.0}

    # --- what Llama.generate calls ----------------------------------------------------------------

    def sample(self, ctx: Any, idx: int = -1) -> int:
        started = time.perf_counter()
        raw = self._api.llama_get_logits_ith(ctx.ctx, idx)
        logits = np.ctypeslib.as_array(raw, shape=(self._n_vocab,))
        if self.repeat_penalty != 1.0 and self._recent:
            logits = self._penalised(logits)
        token = self._pick(logits)
        self._api.llama_sampler_accept(self._grammar, token)
        self._recent.append(token)
        self.stats["seconds"] += time.perf_counter() - started
        return token

    def accept(self, token: int) -> None:  # LlamaSampler's interface; generate() does not call it
        self._api.llama_sampler_accept(self._grammar, token)
        self._recent.append(token)

    def reset(self) -> None:
        self._api.llama_sampler_reset(self._grammar)
        self._recent.clear()

    def close(self) -> None:
        if self._grammar:
            self._api.llama_sampler_free(self._grammar)
            self._grammar = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # --- the three steps --------------------------------------------------------------------------

    def _pick(self, logits: np.ndarray) -> int:
        if self.temp <= 0.0:
            best = int(np.argmax(logits))
            if self._allowed_alone(best, float(logits[best])):
                self.stats["alone"] += 1
                return best
        ids = np.argpartition(logits, -self._k)[-self._k:]
        ids = ids[np.argsort(logits[ids])[::-1]]  # best first
        allowed = self._allowed(self._small, self._small_view, ids, logits[ids])
        if allowed.size:
            self.stats["top_k"] += 1
            return self._choose(allowed, logits[allowed])
        self.stats["vocabulary"] += 1
        if self._full is None:
            self._full = (self._api.llama_token_data * self._n_vocab)()
            self._full_view = np.frombuffer(self._full, dtype=_TOKEN_DATA)
        everything = np.arange(self._n_vocab, dtype=np.int32)
        allowed = self._allowed(self._full, self._full_view, everything, logits)
        if not allowed.size:
            raise RuntimeError("the grammar allows no token here (llama.cpp grammar state is stuck)")
        return self._choose(allowed, logits[allowed])

    def _allowed_alone(self, token: int, logit: float) -> bool:
        view = self._small_view[:1]
        view["id"][0], view["logit"][0], view["p"][0] = token, logit, 0.0
        array = self._api.llama_token_data_array(self._small, 1, -1, False)
        self._api.llama_sampler_apply(self._grammar, ctypes.byref(array))
        return bool(np.isfinite(view["logit"][0]))

    def _allowed(self, buffer: Any, view: np.ndarray, ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """The ids the grammar allows here, in the order given."""
        n = len(ids)
        view["id"][:n] = ids
        view["logit"][:n] = logits
        view["p"][:n] = 0.0
        array = self._api.llama_token_data_array(buffer, n, -1, False)
        self._api.llama_sampler_apply(self._grammar, ctypes.byref(array))
        # The grammar sampler only sets rejected logits to -inf; it never reorders or resizes the array.
        keep = np.isfinite(view["logit"][:n])
        return view["id"][:n][keep].astype(np.int64)

    def _choose(self, ids: np.ndarray, logits: np.ndarray) -> int:
        """Greedy: the best allowed. Otherwise top_k, top_p, min_p and temperature over the allowed ones."""
        order = np.argsort(logits)[::-1]
        ids, logits = ids[order], logits[order].astype(np.float64)
        if self.temp <= 0.0:
            return int(ids[0])
        if self.top_k > 0:
            ids, logits = ids[: self.top_k], logits[: self.top_k]
        probs = np.exp(logits - logits[0])
        probs /= probs.sum()
        if self.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), self.top_p) + 1)
            ids, logits, probs = ids[:keep], logits[:keep], probs[:keep]
        if self.min_p > 0.0:
            keep = probs >= self.min_p * probs[0]
            ids, logits = ids[keep], logits[keep]
        scaled = np.exp((logits - logits[0]) / self.temp)
        return int(self._rng.choice(ids, p=scaled / scaled.sum()))

    def _penalised(self, logits: np.ndarray) -> np.ndarray:
        """llama.cpp's repeat penalty over the tokens generated so far (its window: last_n_tokens_size)."""
        out = logits.copy()
        seen = np.fromiter(set(self._recent), dtype=np.int64)
        values = out[seen]
        out[seen] = np.where(values > 0, values / self.repeat_penalty, values * self.repeat_penalty)
        return out
