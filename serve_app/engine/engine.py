"""The engine core: a scheduler around one model, advanced one step at a time.

A step (`Engine.step`) does, in order:
1. take in requests added and cancelled since the last step (any thread may call add/cancel),
   and free the slots of sequences that finished or were cancelled (the batch is re-packed);
2. plan this step's prompt chunks: waiting prompts in arrival order, at most
   `max_prefill_tokens` prompt tokens in all, so a long prompt is cut into chunks over several
   steps and no step stalls the running batch for more than one budget's worth of prompt;
3. one forward pass for every running sequence (one new token each) and those prompt chunks
   together;
4. sample (after the repetition guards of the requests that ask for one), turn tokens into
   text, check stop conditions, and hand back the deltas. A prompt whose last chunk ran starts
   its `n` choices: they share that one prefill (the cache slot is copied) and each samples its
   first token; they decode from the next step on.

Why chunks of prompt inside the decode pass: on a CPU a weight matmul over a decode batch of
8-64 rows runs at a third to two thirds of the rate of one with a hundred rows more, so the
decode rows ride along with the prompt tokens almost for free, and every weight is read once
per step. The per-step budget bounds how long the tokens already streaming wait (on this 2-core
CPU a 512-token prompt of gpt2-medium took 6.6 s in one piece).
"""
from __future__ import annotations

import logging
import math
import random
import threading
from collections import deque
from dataclasses import dataclass, field, replace

import torch

from serve_app.engine.config import EngineConfig
from serve_app.engine.detokenize import TextStream, token_bytes_table
from serve_app.engine.gpt2 import GPT2Runner, PromptChunk
from serve_app.engine.loader import CheckpointError, load_tokenizer, load_weights, resolve_device, resolve_dtype
from serve_app.engine.penalties import TokenHistory
from serve_app.engine.prefix_cache import PrefixCache
from serve_app.engine.sampling import RowParams, choice_seed, sample
from serve_app.engine.types import (
    CONTEXT_LENGTH_EXCEEDED,
    Delta,
    EngineOverloaded,
    FinishReason,
    GenerationRequest,
    RequestRejected,
    SamplingParams,
    TokenLogprob,
)

log = logging.getLogger("quill.engine")


@dataclass(eq=False)
class _Request:
    request: GenerationRequest
    prompt_ids: list[int]
    sequences: list[_Sequence] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens already in the cache (a prompt is prefilled in chunks)
    slot: int = -1  # where its prompt is being prefilled
    cached: int = 0  # of those, copied from the prefix cache
    looked_up: bool = False  # the prefix cache was asked (once, when it first got a slot)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # scored so far (scores_prompt)

    @property
    def id(self) -> str:
        return self.request.request_id


@dataclass(eq=False)
class _Sequence:
    """One choice of a request, while it holds a slot in the batch."""

    owner: _Request
    index: int
    seed: int
    stream: TextStream
    slot: int
    length: int  # positions already in the KV cache
    next_token: int = -1  # sampled, not yet run through the model
    generated: int = 0
    finish_reason: FinishReason | None = None
    logprob: TokenLogprob | None = None  # of next_token, for a request that asks for logprobs

    @property
    def params(self) -> SamplingParams:
        return self.owner.request.params

    def row(self) -> RowParams:
        p = self.params
        return RowParams(p.temperature, p.top_k, p.top_p, self.seed, self.generated, p.min_p)


class Engine:
    def __init__(self, config: EngineConfig, model=None, tokenizer=None):
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        device = resolve_device(config.device)
        self.tokenizer = tokenizer or load_tokenizer(config.source)
        model = model or load_weights(
            config.source, config.adapter, device, resolve_dtype(config.dtype, device)
        )
        if len(self.tokenizer) > model.config.vocab_size:
            # Text would encode to ids past the embedding: every request would fail at its first step.
            raise CheckpointError(f"{config.source!r}: its tokenizer has {len(self.tokenizer)} tokens but the model's "
                                  f"vocabulary has {model.config.vocab_size}; pair the model with the tokenizer "
                                  "it was trained with")
        # What a registry's author should hear at start (`quill serve` prints them): the
        # replica's own log is a file of Ray's that nobody reads before a request fails.
        self.load_warnings: list[str] = []
        self.max_seq_len = min(config.max_seq_len, model.config.n_positions)
        positions = model.config.n_positions
        if positions < config.max_seq_len and config.max_prompt_tokens >= positions:
            # The registry checked its limits against engine.max_seq_len; the checkpoint's own
            # positions are fewer. Served anyway: a request that fits is answered.
            self.load_warnings.append(
                f"{config.source} has {positions} positions (fewer than engine.max_seq_len, {config.max_seq_len}): "
                f"prompts of {positions} tokens or more are refused although limits.max_prompt_tokens is "
                f"{config.max_prompt_tokens}")
            log.warning("%s", self.load_warnings[-1])
        # A token of a prompt to score also runs through the LM head (vocab x embed weights;
        # every prompt token runs through 12 x embed^2 per layer): it counts this much of a
        # step's prompt budget, so a step that scores costs the streams beside it what any
        # prefill step does. gpt2-small: 1.45; measured, a step of 16 decode rows and a
        # 256-token chunk took 673 ms scored against 478 unscored, 458 for 176 scored tokens.
        cfg = model.config
        self._scored_token_cost = 1 + cfg.vocab_size / (12 * cfg.n_layer * cfg.n_embd)
        self.runner = GPT2Runner(model, config.max_batch_size, self.max_seq_len,
                                 max_rows=config.max_batch_size + config.max_prefill_tokens)
        self.prefix_cache = (
            PrefixCache(self.runner.k_cache, self.runner.v_cache, config.prefix_cache_tokens)
            if config.prefix_cache_tokens > 0 else None
        )
        self.eos_token_id = self.tokenizer.eos_token_id
        self._token_bytes = token_bytes_table(self.tokenizer)
        self._special_ids = frozenset(self.tokenizer.all_special_ids)  # a stop token of these adds no text
        # The tokens there are. A checkpoint may have more rows of logits than its tokenizer has
        # tokens (nanoGPT pads GPT-2's 50,257 to 50,304): those ids are no text, so the engine
        # reads logits only up to here, never samples them and never accepts them in a prompt.
        self.vocab_size = len(self.tokenizer)
        # The repetition guards' memory of each slot's tokens: allocated by the first request
        # that asks for a guard, never touched for the others.
        self.token_history = TokenHistory(config.max_batch_size, self.max_seq_len, self.vocab_size, self.runner.device)

        self._lock = threading.Lock()  # guards the inbox: add/cancel come from other threads
        self._inbox: list[_Request] = []
        self._cancelled: set[str] = set()
        self._live_ids: set[str] = set()
        self._waiting: deque[_Request] = deque()
        self._prefilling: _Request | None = None  # admitted, prompt partly in the cache
        self._running: list[_Sequence] = []  # index == slot

    # ---- called from any thread -------------------------------------------------------------

    def prepare(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids, refused now if the request can never be served. Touches no
        engine state, so a caller may run it on another thread (tokenizing is the slow part)."""
        prompt_ids = self._prompt_ids(request.prompt)
        keep = request.params.truncate_prompt_tokens
        if keep is not None:  # the end of a document is what the continuation follows
            prompt_ids = prompt_ids[-keep:]
        self._check_limits(request, prompt_ids)
        return prompt_ids

    def add(self, request: GenerationRequest, prompt_ids: list[int] | None = None) -> None:
        """Queue a request (`prompt_ids` from `prepare`, or prepared here); refuse it now if it
        can never be served or the queue is full."""
        if prompt_ids is None:
            prompt_ids = self.prepare(request)
        request = self._fitted(request, len(prompt_ids))
        with self._lock:
            if request.request_id in self._live_ids:
                raise RequestRejected(f"request id {request.request_id!r} is already running")
            if len(self._waiting) + len(self._inbox) >= self.config.max_waiting:
                raise EngineOverloaded(
                    f"the queue is full ({self.config.max_waiting} waiting, engine.max_waiting); try again shortly"
                )
            self._live_ids.add(request.request_id)
            self._inbox.append(_Request(request, prompt_ids))

    def _fitted(self, request: GenerationRequest, prompt_len: int) -> GenerationRequest:
        """A default max_tokens cut to the room the prompt leaves (SamplingParams.fit_max_tokens)."""
        room, p = self.max_seq_len - prompt_len, request.params
        if p.fit_max_tokens and p.max_tokens > room:
            return replace(request, params=replace(p, max_tokens=room, min_tokens=min(p.min_tokens, room)))
        return request

    def cancel(self, request_id: str) -> None:
        """Stop a request; its slots are free for others at the next step."""
        with self._lock:
            if request_id in self._live_ids:
                self._cancelled.add(request_id)

    @property
    def has_work(self) -> bool:
        return bool(self._running or self._waiting or self._prefilling or self._inbox or self._cancelled)

    @property
    def num_running(self) -> int:
        return len({s.owner.id for s in self._running})

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + len(self._inbox) + (self._prefilling is not None)

    # ---- the step loop (one thread) ---------------------------------------------------------

    def step(self) -> list[Delta]:
        deltas: list[Delta] = []
        self._take_inbox(deltas)
        self._release_finished()
        planned = self._plan_prefill()
        if self._running or planned:
            self._forward(planned, deltas)
        return deltas

    def _take_inbox(self, deltas: list[Delta]) -> None:
        with self._lock:
            self._waiting.extend(self._inbox)
            self._inbox.clear()
            cancelled, self._cancelled = self._cancelled, set()
        if not cancelled:
            return
        if self._prefilling is not None and self._prefilling.id in cancelled:
            self._waiting.appendleft(self._prefilling)  # not generating yet: cancelled like a waiter
            self._prefilling = None
        for req in [r for r in self._waiting if r.id in cancelled]:
            self._waiting.remove(req)
            self._forget(req)
            deltas += [self._final_delta(req, i, "cancelled", 0) for i in range(req.request.params.n)]
        for seq in self._running:
            if seq.owner.id in cancelled and seq.finish_reason is None:
                seq.finish_reason = "cancelled"
                deltas.append(self._final_delta(seq.owner, seq.index, "cancelled", seq.generated))

    def _plan_prefill(self) -> list[tuple[_Request, int]]:
        """Choose this step's prompt chunks: prompts in arrival order, at most
        `max_prefill_tokens` tokens in all (a token of a prompt to score counts for more: it also
        runs through the LM head; only the last chunk may leave its prompt unfinished),
        each prompt in the first slots free after the running batch and the prompts before it.
        Returns (request, prompt tokens this step) pairs.

        Nothing is taken off the queue here: that happens once the pass has run (`_forward`),
        so a failed pass leaves the requests it did not fail where they were.
        """
        budget = self.config.max_prefill_tokens
        slot = len(self._running)
        queue = ([self._prefilling] if self._prefilling else []) + list(self._waiting)
        planned = []
        for req in queue:
            n = req.request.params.n
            if budget <= 0 or n > self.config.max_batch_size - slot:
                break  # FIFO: the head waits for room, nobody overtakes it
            if req.prefilled and req.slot != slot:  # the batch was re-packed below it
                self.runner.copy_slot(req.slot, slot, req.prefilled)
            req.slot = slot
            if self.prefix_cache is not None and not req.looked_up and not req.request.params.scores_prompt:
                # Cached prompt blocks cost no budget: they are copied, not computed. A prompt
                # to score is computed whole: a cached block has keys and values, no logits.
                req.looked_up = True
                req.prefilled = req.cached = self.prefix_cache.load(req.prompt_ids, slot)
            cost = self._scored_token_cost if req.request.params.scores_prompt else 1
            fits = int(budget / cost) or (0 if planned else 1)  # a step's first chunk takes a token at least
            take = min(fits, len(req.prompt_ids) - req.prefilled)
            if take == 0:
                break
            budget -= take * cost
            slot += n
            planned.append((req, take))
            if req.prefilled + take < len(req.prompt_ids):
                break  # only the last chunk may leave its prompt unfinished (one prompt is prefilling)
        return planned

    def _start(self, req: _Request, logits: torch.Tensor, deltas: list[Delta]) -> None:
        """The prompt is in the cache: give each of the `n` choices its slot and first token."""
        params = req.request.params
        base_seed = params.seed if params.seed is not None else random.getrandbits(64)
        req.sequences = [
            _Sequence(req, i, choice_seed(base_seed, i), TextStream(params.stop, params.include_stop_str_in_output),
                      slot=req.slot + i, length=len(req.prompt_ids))
            for i in range(params.n)
        ]
        if params.max_tokens == 0:  # echo alone: each choice is the prompt; the slots free next step
            for seq in req.sequences:
                seq.finish_reason = "length"
                deltas.append(Delta(req.id, seq.index, self._echoed(req), (), "length", len(req.prompt_ids), 0,
                                    cached_tokens=req.cached, logprobs=tuple(req.prompt_logprobs)))
            self._running.extend(req.sequences)
            return
        for seq in req.sequences[1:]:
            self.runner.copy_slot(req.slot, seq.slot, seq.length)
        if params.penalised:
            self.token_history.start(req.slot, params.n, req.prompt_ids)
        self._running.extend(req.sequences)
        tokens = self._pick(logits.expand(params.n, -1), req.sequences)
        for seq, token in zip(req.sequences, tokens):
            deltas.append(self._advance(seq, token))

    def _forward(self, planned: list[tuple[_Request, int]], deltas: list[Delta]) -> None:
        running = self._running
        chunks = [PromptChunk(r.slot, r.prefilled, r.prompt_ids[r.prefilled : r.prefilled + take],
                              every_position=r.request.params.scores_prompt)
                  for r, take in planned]
        try:
            logits = self.runner.forward([s.next_token for s in running], [s.length for s in running], chunks)
        except Exception as exc:
            self._recover_from_failed_pass(exc, [r for r, _ in planned], deltas)
            return
        logits = logits[:, : self.vocab_size]  # a view; the whole row where the model has no padding
        for seq in running:
            seq.length += 1
        if running:
            tokens = self._sample_rows(logits[: len(running)], running, deltas)
            for seq, token in zip(running, tokens):
                if token is not None and seq.finish_reason is None:
                    deltas.append(self._advance(seq, token))
        row = len(running)
        for chunk, (req, take) in zip(chunks, planned):
            rows = logits[row : row + (take if chunk.every_position else 1)]  # the chunk's logits
            row += len(rows)
            if req is not self._prefilling:
                self._waiting.popleft()  # planned in queue order, so it is the head
            req.prefilled += take
            finished = req.prefilled == len(req.prompt_ids)
            self._prefilling = None if finished else req
            try:
                if chunk.every_position:
                    self._note_prompt_logprobs(req, chunk.start, rows)
                if finished:
                    if self.prefix_cache is not None:
                        self.prefix_cache.store(req.prompt_ids, req.slot)
                    self._start(req, rows[-1], deltas)
            except torch.OutOfMemoryError as exc:  # its logprobs, first tokens or slot copies
                if self._prefilling is req:
                    self._prefilling = None
                self._fail([req], exc, deltas)  # slots it took free at the next step

    def _sample_rows(self, logits: torch.Tensor, seqs: list[_Sequence], deltas: list[Delta]) -> list[int | None]:
        """One token per row. Out of memory on the whole batch: row by row, and a row that still
        runs out fails its own request alone (None for it); the others go on."""
        try:
            return self._pick(logits, seqs)
        except torch.OutOfMemoryError:
            log.warning("out of memory sampling %d rows at once; sampling row by row", len(seqs))
        tokens: list[int | None] = []
        for i, seq in enumerate(seqs):
            token = None
            if seq.finish_reason is None:  # not failed with an earlier row of its request
                try:
                    token = self._pick(logits[i : i + 1], [seq])[0]
                except torch.OutOfMemoryError as exc:
                    self._fail([seq.owner], exc, deltas)
            tokens.append(token)
        return tokens

    def _pick(self, logits: torch.Tensor, seqs: list[_Sequence]) -> list[int]:
        """One token per row of `logits`, after the repetition guards of the rows that have one;
        each guarded row's token is counted for its next step."""
        guarded = [i for i, s in enumerate(seqs) if s.params.penalised]
        if guarded:
            slots = [seqs[i].slot for i in guarded]
            logits = self.token_history.apply(logits, guarded, slots, [seqs[i].params for i in guarded])
        biased = [(i, t, b) for i, s in enumerate(seqs) for t, b in s.params.logit_bias]
        if self.eos_token_id is not None:
            biased += [(i, self.eos_token_id, -math.inf) for i, s in enumerate(seqs)
                       if s.params.ignore_eos or s.generated < s.params.min_tokens]
        biased += [(i, t, -math.inf) for i, s in enumerate(seqs)
                   if s.generated < s.params.min_tokens for t in s.params.stop_token_ids]
        if biased:  # out of place: `logits` may be a view shared by a request's n rows
            rows, tokens, values = zip(*biased)
            at = (torch.tensor(rows, device=logits.device), torch.tensor(tokens, device=logits.device))
            logits = logits.index_put(at, torch.tensor(values, dtype=logits.dtype, device=logits.device), accumulate=True)
        tokens = sample(logits, [s.row() for s in seqs])
        if guarded:
            self.token_history.record(slots, [tokens[i] for i in guarded])
        wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if wanted:
            self._note_logprobs(logits, [seqs[i] for i in wanted], wanted, [tokens[i] for i in wanted])
        return tokens

    def _note_logprobs(self, logits: torch.Tensor, seqs: list[_Sequence], rows: list[int], tokens: list[int]) -> None:
        """Each row's chosen token's log-probability and its likeliest alternatives, kept on
        the sequence for its delta. Only rows that ask pay for the log-softmax."""
        ks = [s.params.logprobs for s in seqs]
        for seq, logprob in zip(seqs, self._token_logprobs(logits[rows], tokens, ks)):
            seq.logprob = logprob

    def _note_prompt_logprobs(self, req: _Request, start: int, logits: torch.Tensor) -> None:
        """Score a chunk of a prompt: the logits at position p give the prompt's token p + 1
        (the model's own distribution, before any repetition guard or temperature)."""
        ids = req.prompt_ids
        if start == 0:
            req.prompt_logprobs.append(TokenLogprob(self._token_text(ids[0]), None))
        targets = ids[start + 1 : start + len(logits) + 1]  # a last chunk's last row predicts no prompt token
        if targets:
            k = req.request.params.logprobs
            req.prompt_logprobs += self._token_logprobs(logits[: len(targets)], targets, [k] * len(targets))

    def _token_logprobs(self, logits: torch.Tensor, tokens: list[int], ks: list[int]) -> list[TokenLogprob]:
        """Row i's log-probability of tokens[i] and its ks[i] likeliest tokens: one log-softmax
        and one top-k over all the rows."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        chosen = logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
        top_p, top_i = logp.topk(max(ks), dim=-1) if max(ks) else (logp[:, :0], logp[:, :0].long())
        top_p, top_i = top_p.tolist(), top_i.tolist()
        return [TokenLogprob(self._token_text(token), chosen[i],
                             tuple((self._token_text(t), p) for t, p in zip(top_i[i][:k], top_p[i][:k])))
                for i, (token, k) in enumerate(zip(tokens, ks))]

    def _echoed(self, req: _Request) -> str:
        """The prompt as `echo` returns it: the client's text where the model read all of it
        (an empty one too, which the model reads as end-of-text), else the tokens it read."""
        prompt = req.request.prompt
        if isinstance(prompt, str) and req.request.params.truncate_prompt_tokens is None:
            return prompt
        return self.tokenizer.decode(req.prompt_ids)

    def _token_text(self, token: int) -> str:
        raw = self._token_bytes[token]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:  # part of a character: OpenAI's way of writing the bytes
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def _advance(self, seq: _Sequence, token: int) -> Delta:
        """Account for one sampled token: text, stop conditions, the delta to send."""
        params = seq.params
        seq.generated += 1
        seq.next_token = token
        if token == self.eos_token_id:
            seq.finish_reason = "stop"
            text = seq.stream.finish()
        elif token in params.stop_token_ids:
            seq.finish_reason = "stop"
            kept = b"" if token in self._special_ids else self._token_bytes[token]
            text = seq.stream.push(kept, find_stops=False) + seq.stream.finish()
        else:
            text = seq.stream.push(self._token_bytes[token], find_stops=seq.generated >= params.min_tokens)
            if seq.stream.stopped:
                seq.finish_reason = "stop"
            elif seq.generated >= params.max_tokens:
                seq.finish_reason = "length"
                text += seq.stream.finish()
        logprobs = (seq.logprob,) if seq.logprob is not None else ()
        if seq.generated == 1 and params.echo:
            text = self._echoed(seq.owner) + text
            logprobs = tuple(seq.owner.prompt_logprobs) + logprobs
        return Delta(
            seq.owner.id, seq.index, text, (token,), seq.finish_reason,
            len(seq.owner.prompt_ids), seq.generated, cached_tokens=seq.owner.cached, logprobs=logprobs,
        )

    def _release_finished(self) -> None:
        """Free finished slots and pack the survivors into slots 0..B-1 (fewest copies)."""
        if all(s.finish_reason is None for s in self._running):
            return
        for seq in self._running:
            if seq.finish_reason is not None and all(
                s.finish_reason is not None for s in seq.owner.sequences
            ):
                self._forget(seq.owner)
        alive = [s for s in self._running if s.finish_reason is None]
        holes = [s.slot for s in self._running[: len(alive)] if s.finish_reason is not None]
        movers = [s for s in self._running[len(alive):] if s.finish_reason is None]
        for hole, seq in zip(holes, movers):
            self.runner.copy_slot(seq.slot, hole, seq.length)
            if seq.params.penalised:
                self.token_history.move(seq.slot, hole)
            seq.slot = hole
        self._running = sorted(alive, key=lambda s: s.slot)

    # ---- failures ---------------------------------------------------------------------------

    def _recover_from_failed_pass(self, exc: Exception, planned: list[_Request],
                                  deltas: list[Delta]) -> None:
        """Out of memory: fail the newest request in the pass and let the rest go on at the next
        step (their chunks are planned again).

        Anything else is a bug we cannot pin on one request, so every request in the pass fails;
        the engine itself stays up for the next ones.
        """
        owners = list(dict.fromkeys(s.owner for s in self._running if s.finish_reason is None))
        involved = owners + planned
        victims = involved[-1:] if isinstance(exc, torch.OutOfMemoryError) else involved
        for req in victims:
            if req is self._prefilling:
                self._prefilling = None
            elif req in planned:
                self._waiting.remove(req)
        self._fail(victims, exc, deltas)

    def _fail(self, requests: list[_Request], exc: Exception, deltas: list[Delta]) -> None:
        oom = isinstance(exc, torch.OutOfMemoryError)
        message = "out of memory on the model's device" if oom else f"generation failed: {exc}"
        log.error("%s (requests %s)", message, [r.id for r in requests], exc_info=not oom)
        if oom and torch.cuda.is_available():
            torch.cuda.empty_cache()
        for req in requests:
            for i in range(req.request.params.n):
                seq = req.sequences[i] if i < len(req.sequences) else None
                if seq is not None and seq.finish_reason is not None:
                    continue
                if seq is not None:
                    seq.finish_reason = "error"
                deltas.append(self._final_delta(req, i, "error", seq.generated if seq else 0, message))
            if not any(s in self._running for s in req.sequences):
                self._forget(req)

    # ---- helpers ----------------------------------------------------------------------------

    def _final_delta(self, req: _Request, index: int, reason: FinishReason,
                     generated: int, error: str | None = None) -> Delta:
        """The last delta of a choice that ends without a new token (cancelled, failed)."""
        return Delta(req.id, index, "", (), reason, len(req.prompt_ids), generated, error, req.cached)

    def _forget(self, req: _Request) -> None:
        with self._lock:
            self._live_ids.discard(req.id)

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
            if bad:
                raise RequestRejected(
                    f"prompt token ids must be integers in [0, {self.vocab_size}); got {bad[:5]}", param="prompt"
                )
        # An empty prompt continues from the start of a document, as GPT-2 was trained: after
        # its end-of-text token, which a tokenizer may lack.
        if not ids and self.eos_token_id is None:
            raise RequestRejected("the prompt is empty, and this model's tokenizer has no end-of-text token to "
                                  "start a document from: send some text", param="prompt")
        return ids or [self.eos_token_id]

    def _check_limits(self, request: GenerationRequest, prompt_ids: list[int]) -> None:
        c, p = self.config, request.params
        # The context errors say "this model's maximum context length is", as OpenAI's and vLLM's
        # do: clients match the phrase (LiteLLM) or the code.
        if len(prompt_ids) > c.max_prompt_tokens:
            raise RequestRejected(
                f"the prompt has {len(prompt_ids)} tokens; this model accepts at most "
                f"{c.max_prompt_tokens} (this model's maximum context length is {self.max_seq_len} tokens, "
                "prompt and completion together). Shorten the prompt.", param="prompt", code=CONTEXT_LENGTH_EXCEEDED)
        unknown = [t for t in p.stop_token_ids if t >= self.vocab_size]
        if unknown:
            raise RequestRejected(f"stop_token_ids names token ids outside this model's vocabulary (0-{self.vocab_size - 1}): "
                                  f"{unknown[:5]}", param="stop_token_ids")
        unknown = [t for t, _ in p.logit_bias if t >= self.vocab_size]
        if unknown:
            raise RequestRejected(f"logit_bias names token ids outside this model's vocabulary (0-{self.vocab_size - 1}): "
                                  f"{unknown[:5]}", param="logit_bias")
        if p.max_tokens > c.max_tokens:
            raise RequestRejected(f"max_tokens is {p.max_tokens}; this model allows at most {c.max_tokens}", param="max_tokens")
        if p.n > min(c.max_n, c.max_batch_size):
            raise RequestRejected(f"n is {p.n}; this model allows at most {min(c.max_n, c.max_batch_size)}", param="n")
        if len(prompt_ids) > self.max_seq_len or (len(prompt_ids) == self.max_seq_len and p.max_tokens):
            raise RequestRejected(
                f"the prompt has {len(prompt_ids)} tokens; this model's maximum context length is "
                f"{self.max_seq_len} tokens, so they leave no room to generate; shorten the prompt",
                param="prompt", code=CONTEXT_LENGTH_EXCEEDED)
        if len(prompt_ids) + p.max_tokens > self.max_seq_len and not p.fit_max_tokens:
            raise RequestRejected(
                f"this model's maximum context length is {self.max_seq_len} tokens; the prompt "
                f"({len(prompt_ids)} tokens) + max_tokens ({p.max_tokens}) exceed it; lower max_tokens "
                "or shorten the prompt", param="max_tokens", code=CONTEXT_LENGTH_EXCEEDED)
