"""The generation engine on a tiny random GPT-2, checked against transformers itself."""
from __future__ import annotations

import json
import asyncio
import contextlib
import threading
import shutil
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from serve_app.engine import (
    AsyncEngine,
    Delta,
    Engine,
    EngineConfig,
    EngineOverloaded,
    GenerationRequest,
    RequestRejected,
    SamplingParams,
)
from serve_app.engine import linear as linear_module
from serve_app.engine.detokenize import TextStream, token_bytes_table
from serve_app.engine.gpt2 import PromptChunk
from serve_app.engine.sampling import RowParams, sample
from tests.conftest import save_tiny_gpt2

PROMPTS = [
    "The court held that",
    "Once upon a time, in a kingdom by the sea, there lived a princess who",
    "Buy",
    "We study the convergence of stochastic gradient descent on non-convex objectives and show",
]


TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "models" / "gpt2-tokenizer"


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoints):
    return tiny_checkpoints["tiny-a"]  # conftest.py: a tiny random GPT-2 saved with save_pretrained


@pytest.fixture(scope="module")
def hf(checkpoint):
    return GPT2LMHeadModel.from_pretrained(checkpoint).eval(), AutoTokenizer.from_pretrained(checkpoint)


def make_engine(checkpoint, **overrides) -> Engine:
    return Engine(EngineConfig(source=str(checkpoint), **{"max_batch_size": 8, "max_seq_len": 256, **overrides}))


def hf_greedy(hf, prompt: str, max_tokens: int, **generate_options) -> list[int]:
    model, tok = hf
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=max_tokens, pad_token_id=tok.eos_token_id,
                             **generate_options)
    return out[0, ids.shape[1]:].tolist()


def openai_greedy(hf, prompt: str, max_tokens: int, frequency: float, presence: float) -> list[int]:
    """Greedy decoding under OpenAI's penalties, written out plainly over transformers' logits
    (transformers has no frequency or presence penalty of its own)."""
    model, tok = hf
    prompt_ids, out = tok(prompt).input_ids, []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([prompt_ids + out])).logits[0, -1]
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0])
            out.append(int((logits - counts * frequency - (counts > 0) * presence).argmax()))
    return out


def run(engine: Engine, requests, add_later=None):
    """Step until idle; `add_later` maps a step number to requests added before that step."""
    tokens, texts, reasons = {}, {}, {}
    step = 0
    for r in requests:
        engine.add(r)
    while engine.has_work or (add_later and any(k >= step for k in add_later)):
        for r in (add_later or {}).get(step, []):
            engine.add(r)
        for d in engine.step():
            key = (d.request_id, d.index)
            tokens.setdefault(key, []).extend(d.token_ids)
            texts[key] = texts.get(key, "") + d.text
            if d.finished:
                reasons[key] = d.finish_reason
        step += 1
    return tokens, texts, reasons


async def assert_goes_idle(engine: Engine) -> None:
    """The engine frees every slot within 2 s (a cancelled request is dropped at the next step)."""
    for _ in range(100):
        if not engine.has_work:
            break
        await asyncio.sleep(0.02)
    assert not engine.has_work and engine.num_running == 0


def greedy(max_tokens=16, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, **kw)


def test_greedy_single_request_matches_transformers(checkpoint, hf):
    engine = make_engine(checkpoint)
    tokens, _, reasons = run(engine, [GenerationRequest(PROMPTS[1], greedy(24), "a")])
    assert tokens[("a", 0)] == hf_greedy(hf, PROMPTS[1], 24)
    assert reasons[("a", 0)] == "length"


def test_logprobs_are_transformers_log_softmax_of_each_chosen_token_and_its_likeliest(checkpoint, hf):
    """With `logprobs` k: each token's log-probability under the model (transformers' own logits,
    log-softmaxed) and the k likeliest tokens, likeliest first; a request beside it without
    logprobs gets none, and sampling with a temperature does not change what is reported."""
    model, tok = hf
    engine = make_engine(checkpoint)
    deltas: dict[str, list[Delta]] = {}
    for r in (GenerationRequest(PROMPTS[0], greedy(6, logprobs=3), "lp"),
              GenerationRequest(PROMPTS[0], SamplingParams(max_tokens=6, temperature=1.5, seed=3, logprobs=0), "hot"),
              GenerationRequest(PROMPTS[1], greedy(6), "plain")):
        engine.add(r)
    while engine.has_work:
        for d in engine.step():
            deltas.setdefault(d.request_id, []).append(d)
    assert all(not d.logprobs for d in deltas["plain"])
    token_bytes = token_bytes_table(tok)

    def text(token: int) -> str:  # a token that is part of a character is written as OpenAI writes it
        raw = token_bytes[token]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    for rid, k in (("lp", 3), ("hot", 0)):
        ids = [t for d in deltas[rid] for t in d.token_ids]
        lps = [lp for d in deltas[rid] for lp in d.logprobs]
        assert len(lps) == len(ids) == 6
        prompt_ids = tok(PROMPTS[0]).input_ids
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + ids])).logits[0, len(prompt_ids) - 1 : -1]
        expected = torch.log_softmax(logits.float(), dim=-1)
        for step, (token, lp) in enumerate(zip(ids, lps)):
            assert lp.token == text(token)
            assert lp.logprob == pytest.approx(float(expected[step, token]), abs=1e-4)
            assert len(lp.top) == k
            top_ids = expected[step].topk(k).indices.tolist() if k else []
            assert [t for t, _ in lp.top] == [text(i) for i in top_ids]
            assert [p for _, p in lp.top] == pytest.approx([float(expected[step, i]) for i in top_ids], abs=1e-4)
        if rid == "lp":  # greedy: the chosen token is the likeliest
            assert all(lp.top[0] == (lp.token, lp.logprob) for lp in lps)
    partial = next(t for t in range(len(token_bytes)) if text(t).startswith("bytes:"))  # e.g. half of "—"
    assert engine._token_text(partial) == text(partial) and "\\x" in text(partial)


def test_echo_starts_each_choice_with_the_prompt_the_model_read(checkpoint):
    engine = make_engine(checkpoint)
    ids = engine.tokenizer.encode(PROMPTS[1])
    _, texts, _ = run(engine, [
        GenerationRequest(PROMPTS[1], greedy(5), "plain"),
        GenerationRequest(PROMPTS[1], greedy(5, echo=True, n=2), "text"),
        GenerationRequest(ids, greedy(5, echo=True), "ids"),
        GenerationRequest(PROMPTS[1], greedy(5, echo=True, truncate_prompt_tokens=4), "cut"),
        GenerationRequest("", greedy(5, echo=True), "empty"),
    ])
    plain = texts[("plain", 0)]
    assert texts[("text", 0)] == texts[("text", 1)] == texts[("ids", 0)] == PROMPTS[1] + plain
    assert texts[("cut", 0)].startswith(engine.tokenizer.decode(ids[-4:])) and not texts[("cut", 0)].startswith(PROMPTS[1])
    assert not texts[("empty", 0)].startswith("<|endoftext|>")  # the model reads "" as end-of-text; echo gives ""


def test_echo_with_logprobs_scores_every_prompt_token_as_transformers_does(checkpoint, hf):
    """What evaluation harnesses send (echo, logprobs, max_tokens 1 or 0): each prompt token's
    log-probability under the model, from transformers' own logits at the position before it,
    null for the first, then the generated token's; the same when the prompt runs in several
    chunks and when its blocks are in the prefix cache (a scored prompt is computed whole)."""
    model, tok = hf
    engine = make_engine(checkpoint, max_prefill_tokens=8, prefix_cache_tokens=256)
    prompt = PROMPTS[1] + " " + PROMPTS[3]
    ids = tok(prompt).input_ids
    assert len(ids) > 32  # two blocks of the prefix cache, and many chunks (a scored token costs more)
    run(engine, [GenerationRequest(prompt, greedy(2), "warm")])  # the prompt's blocks are now cached
    deltas: dict[str, list[Delta]] = {}
    for r in (GenerationRequest(prompt, greedy(1, echo=True, logprobs=2, n=2), "one"),
              GenerationRequest(ids, greedy(0, echo=True, logprobs=0), "zero"),
              GenerationRequest(prompt, greedy(0, echo=True), "plain"),
              GenerationRequest(PROMPTS[0], greedy(3, logprobs=1), "beside")):
        engine.add(r)
    while engine.has_work:
        for d in engine.step():
            deltas.setdefault(d.request_id, []).append(d)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    expected = torch.log_softmax(logits.float(), dim=-1)
    generated = int(expected[-1].argmax())
    for rid, k in (("one", 2), ("zero", 0)):
        lps = [lp for d in deltas[rid] if d.index == 0 for lp in d.logprobs]
        assert len(lps) == len(ids) + (rid == "one")
        assert lps[0].logprob is None and lps[0].top == () and lps[0].token == tok.decode(ids[:1])
        for position, lp in enumerate(lps[1:]):
            token = ids[position + 1] if position + 1 < len(ids) else generated
            assert lp.logprob == pytest.approx(float(expected[position, token]), abs=1e-4)
            assert [p for _, p in lp.top] == pytest.approx(expected[position].topk(k).values.tolist(), abs=1e-4)
        assert all(d.cached_tokens == 0 for d in deltas[rid])
    one = {d.index: d for d in deltas["one"]}
    assert [one[i].text for i in (0, 1)] == [prompt + tok.decode([generated])] * 2
    assert one[1].logprobs == one[0].logprobs and one[0].completion_tokens == 1
    for rid in ("zero", "plain"):  # max_tokens 0: the prompt alone, nothing generated
        (d,) = deltas[rid]
        assert (d.text, d.token_ids, d.finish_reason, d.completion_tokens, d.prompt_tokens) == (prompt, (), "length", 0, len(ids))
    assert not deltas["plain"][0].logprobs and deltas["plain"][0].cached_tokens == 32  # not scored: the cache serves it
    assert [len(d.logprobs) for d in deltas["beside"]] == [1, 1, 1]  # a generating request: its own tokens only
    assert not engine.has_work and engine.num_running == 0


def test_a_prompt_to_score_takes_smaller_chunks_as_its_logits_cost_more(checkpoint, hf):
    """A scored prompt token also runs through the LM head, so it counts for more of a step's
    prompt budget: on this tiny model, where the LM head is most of the work, a scored prompt
    goes in chunks of a few tokens where a plain one goes in whole, and is scored all the same."""
    model, tok = hf
    engine = make_engine(checkpoint, max_prefill_tokens=64)
    forward, chunks = engine.runner.forward, []

    def recording(tokens, positions, parts=()):
        chunks.extend((len(c.token_ids), c.every_position) for c in parts)
        return forward(tokens, positions, parts)

    engine.runner.forward = recording
    prompt = PROMPTS[1] + " " + PROMPTS[3]
    ids = tok(prompt).input_ids
    run(engine, [GenerationRequest(prompt, greedy(1), "plain")])
    lps = [lp for d in run_deltas(engine, GenerationRequest(prompt, greedy(0, echo=True, logprobs=0), "s")) for lp in d.logprobs]
    assert chunks[0] == (len(ids), False)
    scored = [n for n, every in chunks[1:] if every]
    assert sum(scored) == len(ids) and max(scored) < len(ids) and len(scored) == len(chunks) - 1
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    assert [lp.logprob for lp in lps[1:]] == pytest.approx([float(expected[p, ids[p + 1]]) for p in range(len(ids) - 1)], abs=1e-4)
    # Several prompts to score at once, and a plain one behind them: each gets all its choices.
    together = [GenerationRequest(prompt, greedy(1, echo=True, logprobs=0, n=2), "a"),
                GenerationRequest(PROMPTS[3], greedy(0, echo=True, logprobs=1), "b"),
                GenerationRequest(PROMPTS[0], greedy(2), "c")]
    for r in together:
        engine.add(r)
    finished = {}
    while engine.has_work:
        for d in engine.step():
            finished.setdefault((d.request_id, d.index), []).append(d)
    assert sorted(finished) == [("a", 0), ("a", 1), ("b", 0), ("c", 0)]
    assert [len(d.logprobs) for d in finished[("a", 0)]] == [len(ids) + 1]
    assert [len(d.logprobs) for d in finished[("b", 0)]] == [len(tok(PROMPTS[3]).input_ids)]


def run_deltas(engine: Engine, request: GenerationRequest) -> list[Delta]:
    engine.add(request)
    deltas = []
    while engine.has_work:
        deltas += engine.step()
    return deltas


def test_max_tokens_0_is_refused_without_echo_and_fits_a_prompt_that_fills_the_context(checkpoint):
    engine = make_engine(checkpoint, max_seq_len=16, max_prompt_tokens=16)
    with pytest.raises(RequestRejected, match="0 only with echo"):
        SamplingParams(max_tokens=0)
    full = list(range(1, 17))
    _, texts, _ = run(engine, [GenerationRequest(full, greedy(0, echo=True, logprobs=1), "full")])
    assert texts[("full", 0)] == engine.tokenizer.decode(full)
    with pytest.raises(RequestRejected, match="leave no room"):
        engine.add(GenerationRequest(full, greedy(1, echo=True), "more"))


def test_logit_bias_bans_or_forces_tokens_for_its_own_request_only(checkpoint, hf):
    """OpenAI's logit_bias: -100 on the greedy token makes greedy decoding take transformers'
    runner-up; +100 on a token makes every step choose it; the logprobs are of the biased
    distribution; a request beside them in the batch is unchanged, also its n choices."""
    model, tok = hf
    engine = make_engine(checkpoint)
    ids = tok(PROMPTS[0]).input_ids
    with torch.no_grad():
        first = model(torch.tensor([ids])).logits[0, -1]
    best, runner_up = first.topk(2).indices.tolist()
    deltas: dict[str, list[Delta]] = {}
    for r in (GenerationRequest(PROMPTS[0], greedy(1, logit_bias=((best, -100.0),), logprobs=0), "ban"),
              GenerationRequest(PROMPTS[0], greedy(5, logit_bias=((17, 100.0), (best, 3.5)), n=2), "force"),
              GenerationRequest(PROMPTS[0], greedy(5), "plain")):
        engine.add(r)
    while engine.has_work:
        for d in engine.step():
            deltas.setdefault(d.request_id, []).append(d)
    tokens = lambda rid, i=0: [t for d in deltas[rid] if d.index == i for t in d.token_ids]  # noqa: E731
    assert tokens("ban") == [runner_up]
    biased = first.clone()
    biased[best] -= 100
    assert deltas["ban"][0].logprobs[0].logprob == pytest.approx(float(torch.log_softmax(biased, -1)[runner_up]), abs=1e-4)
    assert tokens("force", 0) == tokens("force", 1) == [17] * 5
    assert tokens("plain") == hf_greedy(hf, PROMPTS[0], 5)
    with pytest.raises(RequestRejected, match="outside this model's vocabulary"):
        engine.add(GenerationRequest("x", greedy(1, logit_bias=((engine.vocab_size, 1.0),))))
    for bad in (((1, 100.5),), ((-1, 1.0),), ((1, float("nan")),)):
        with pytest.raises(RequestRejected, match="logit_bias"):
            greedy(1, logit_bias=bad)


def test_min_tokens_and_ignore_eos_hold_off_end_of_text_and_stop_strings(checkpoint):
    """vLLM's min_tokens and ignore_eos, on a model pushed to say end-of-text at once (a bias of
    +30 on it): min_tokens 3 gives three tokens and then end-of-text; ignore_eos runs to
    max_tokens; a stop string that the first token's text holds ends nothing before min_tokens."""
    engine = make_engine(checkpoint)
    eos = ((engine.eos_token_id, 30.0),)
    _, plain_texts, _ = run(engine, [GenerationRequest(PROMPTS[1], greedy(8), "plain")])
    first = engine.tokenizer.decode(run(engine, [GenerationRequest(PROMPTS[1], greedy(1), "one")])[0][("one", 0)])
    tokens, texts, reasons = run(engine, [
        GenerationRequest(PROMPTS[1], greedy(8, logit_bias=eos), "eos"),
        GenerationRequest(PROMPTS[1], greedy(8, logit_bias=eos, min_tokens=3), "min"),
        GenerationRequest(PROMPTS[1], greedy(8, logit_bias=eos, ignore_eos=True, n=2), "ignore"),
        GenerationRequest(PROMPTS[1], greedy(8, stop=(first,)), "stop"),
        GenerationRequest(PROMPTS[1], greedy(8, stop=(first,), min_tokens=8), "late-stop"),
    ])
    assert tokens[("eos", 0)] == [engine.eos_token_id] and reasons[("eos", 0)] == "stop"
    assert tokens[("min", 0)][3:] == [engine.eos_token_id] and engine.eos_token_id not in tokens[("min", 0)][:3]
    for i in (0, 1):
        assert len(tokens[("ignore", i)]) == 8 and engine.eos_token_id not in tokens[("ignore", i)]
        assert reasons[("ignore", i)] == "length"
    assert (texts[("stop", 0)], reasons[("stop", 0)]) == ("", "stop")
    assert texts[("late-stop", 0)] == plain_texts[("plain", 0)] and reasons[("late-stop", 0)] == "length"
    with pytest.raises(RequestRejected, match="min_tokens must be from 0 to max_tokens"):
        greedy(4, min_tokens=5)


def test_a_checkpoint_with_padded_vocabulary_never_samples_an_id_that_is_no_token(tmp_path):
    """nanoGPT pads GPT-2's 50,257 tokens to 50,304 rows of logits. Here row 50,300 is made the
    likeliest (1,000 times the greedy token's embedding): transformers would pick it, the
    engine picks among real tokens only, with every sampling option, and refuses it in a prompt."""
    path = save_tiny_gpt2(tmp_path / "padded", vocab_size=50304)
    model = GPT2LMHeadModel.from_pretrained(path).eval()
    ids = AutoTokenizer.from_pretrained(path).encode(PROMPTS[0])
    with torch.no_grad():
        best = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        assert model(torch.tensor([ids])).logits[0, -1, best] > 0
        model.transformer.wte.weight[50300] = 1000 * model.transformer.wte.weight[best]
        assert int(model(torch.tensor([ids])).logits[0, -1].argmax()) == 50300
    model.save_pretrained(path)
    engine = make_engine(path)
    assert engine.vocab_size == 50257
    options = [dict(temperature=0), dict(temperature=1.5, seed=1), dict(temperature=1.0, top_k=5, seed=2),
               dict(temperature=1.0, top_p=0.5, seed=3), dict(temperature=0, frequency_penalty=1.0, repetition_penalty=1.3),
               dict(temperature=0, logprobs=5, echo=True), dict(temperature=2.0, logit_bias=((7, 5.0),), n=3, seed=4)]
    tokens, _, reasons = run(engine, [GenerationRequest(PROMPTS[0], SamplingParams(max_tokens=12, **o), f"r{i}")
                                      for i, o in enumerate(options)])
    assert tokens[("r0", 0)][0] == best
    assert all(t < 50257 for ts in tokens.values() for t in ts) and set(reasons.values()) <= {"stop", "length"}
    with pytest.raises(RequestRejected, match=r"\[0, 50257\)"):
        engine.add(GenerationRequest([50300], greedy(1)))


def test_greedy_batch_of_different_lengths_joining_mid_flight(checkpoint, hf):
    engine = make_engine(checkpoint)
    first = [GenerationRequest(p, greedy(20), f"r{i}") for i, p in enumerate(PROMPTS[:2])]
    later = {3: [GenerationRequest(PROMPTS[2], greedy(12), "r2")],
             7: [GenerationRequest(PROMPTS[3], greedy(20), "r3")]}
    tokens, _, _ = run(engine, first, add_later=later)
    for i, prompt in enumerate(PROMPTS):
        n = 12 if i == 2 else 20
        assert tokens[(f"r{i}", 0)] == hf_greedy(hf, prompt, n), f"request {i} diverged"


def test_the_kv_cache_is_resident_and_finite_from_the_start(checkpoint, hf):
    """The cache is zeroed at allocation: a replica holds its memory from the first second
    (resident memory does not creep up under load), and masked positions, which a pass still
    multiplies by a probability of 0, hold finite numbers across slot reuse."""
    engine = make_engine(checkpoint)
    assert (engine.runner.k_cache == 0).all() and (engine.runner.v_cache == 0).all()
    first = [GenerationRequest(p, greedy(20), f"r{i}") for i, p in enumerate(PROMPTS[:2])]
    later = {5: [GenerationRequest(PROMPTS[2], greedy(70), "r2")], 9: [GenerationRequest(PROMPTS[3], greedy(8), "r3")]}
    tokens, _, _ = run(engine, first, add_later=later)
    for i, n in enumerate((20, 20, 70, 8)):
        assert tokens[(f"r{i}", 0)] == hf_greedy(hf, PROMPTS[i], n), f"request {i} diverged"
    assert torch.isfinite(engine.runner.k_cache).all() and torch.isfinite(engine.runner.v_cache).all()


def test_prompts_prefilled_in_small_chunks_still_match_transformers(checkpoint, hf):
    """A 5-token prefill budget cuts every prompt into chunks spread over several steps,
    interleaved with other requests' decoding and a slot re-pack under a half-prefilled prompt."""
    engine = make_engine(checkpoint, max_prefill_tokens=5)
    first = [GenerationRequest(PROMPTS[2], greedy(3), "short"),
             GenerationRequest(PROMPTS[1], greedy(15), "long")]
    later = {2: [GenerationRequest(PROMPTS[3], greedy(15), "later")]}
    tokens, _, _ = run(engine, first, add_later=later)
    assert tokens[("short", 0)] == hf_greedy(hf, PROMPTS[2], 3)
    assert tokens[("long", 0)] == hf_greedy(hf, PROMPTS[1], 15)
    assert tokens[("later", 0)] == hf_greedy(hf, PROMPTS[3], 15)


def test_cancel_while_the_prompt_is_being_prefilled(checkpoint, hf):
    engine = make_engine(checkpoint, max_prefill_tokens=4)
    engine.add(GenerationRequest(PROMPTS[3], greedy(5), "gone"))
    engine.step()  # the first chunk only
    assert engine.num_waiting == 1 and engine.num_running == 0
    engine.cancel("gone")
    deltas = engine.step()
    assert [(d.request_id, d.finish_reason) for d in deltas] == [("gone", "cancelled")]
    assert not engine.has_work
    tokens, _, _ = run(engine, [GenerationRequest(PROMPTS[2], greedy(4), "next")])
    assert tokens[("next", 0)] == hf_greedy(hf, PROMPTS[2], 4)


def test_seeded_sampling_is_the_same_in_any_batch_mix(checkpoint):
    params = SamplingParams(max_tokens=24, temperature=1.0, top_k=50, top_p=0.9, seed=1234)
    alone, _, _ = run(make_engine(checkpoint), [GenerationRequest(PROMPTS[0], params, "x")])
    crowd = [GenerationRequest(p, SamplingParams(max_tokens=30, temperature=1.2, seed=i), f"o{i}")
             for i, p in enumerate(PROMPTS)]
    later = {2: [GenerationRequest(PROMPTS[0], params, "x")]}
    mixed, _, _ = run(make_engine(checkpoint), crowd, add_later=later)
    assert mixed[("x", 0)] == alone[("x", 0)]
    other_seed, _, _ = run(make_engine(checkpoint), [GenerationRequest(
        PROMPTS[0], SamplingParams(max_tokens=24, temperature=1.0, top_k=50, top_p=0.9, seed=99), "y")])
    assert other_seed[("y", 0)] != alone[("x", 0)]


def test_n_choices_share_a_prefill_and_differ_when_sampled(checkpoint, hf):
    engine = make_engine(checkpoint)
    tokens, _, _ = run(engine, [
        GenerationRequest(PROMPTS[0], SamplingParams(max_tokens=16, temperature=1.0, n=3, seed=7), "s"),
        GenerationRequest(PROMPTS[1], greedy(16, n=2), "g"),
    ])
    sampled = [tuple(tokens[("s", i)]) for i in range(3)]
    assert len(set(sampled)) == 3
    expected = hf_greedy(hf, PROMPTS[1], 16)
    assert tokens[("g", 0)] == expected and tokens[("g", 1)] == expected


@pytest.mark.parametrize("top_k,top_p,min_p", [(5, 1.0, 0), (0, 0.3, 0), (20, 0.5, 0), (0, 1.0, 0.3), (50, 0.9, 0.4)])
def test_sampled_tokens_lie_in_the_allowed_set(top_k, top_p, min_p):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 1000, generator=gen)
    probs = torch.softmax(logits, -1)
    allowed = []
    for row in probs:
        order = row.argsort(descending=True)
        keep = order[: top_k or len(order)]
        p = row[keep] / row[keep].sum()
        before = p.cumsum(0) - p
        allowed.append(set(keep[(before < top_p) & (p >= min_p * p[0])].tolist()))
    seen = [set() for _ in range(4)]
    for counter in range(300):
        rows = [RowParams(1.0, top_k, top_p, seed=b, counter=counter, min_p=min_p) for b in range(4)]
        for b, t in enumerate(sample(logits, rows)):
            seen[b].add(t)
    for b in range(4):
        assert len(allowed[b]) > 1  # the cut leaves a choice to make
        assert seen[b] <= allowed[b]
        assert len(seen[b]) > 1  # it does sample, not just pick the top token


def test_a_rows_top_k_holds_beside_rows_without_one():
    """A top-k request batched with requests that set no top-k (nor top_p) keeps its cut."""
    logits = torch.randn(2, 1000, generator=torch.Generator().manual_seed(1))
    top5 = set(logits[0].topk(5).indices.tolist())
    seen = {t for counter in range(200)
            for t in sample(logits, [RowParams(1.0, 5, 1.0, seed=1, counter=counter),
                                     RowParams(1.0, 0, 1.0, seed=2, counter=counter)])[:1]}
    assert 1 < len(seen) and seen <= top5


def test_stop_string_across_token_boundary_is_cut_and_not_returned(checkpoint):
    probe, texts, _ = run(make_engine(checkpoint), [GenerationRequest(PROMPTS[0], greedy(20), "p")])
    engine = make_engine(checkpoint)
    pieces = [engine.tokenizer.decode([t]) for t in probe[("p", 0)]]
    full = "".join(pieces)
    assert full == texts[("p", 0)]
    # A stop string made of the end of token 3 and the start of token 4.
    boundary = len("".join(pieces[:4]))
    stop = full[boundary - 2: boundary + 2]
    expected = full[: full.find(stop)]
    _, texts, reasons = run(engine, [GenerationRequest(PROMPTS[0], greedy(20, stop=(stop, "never-seen")), "s")])
    assert texts[("s", 0)] == expected
    assert reasons[("s", 0)] == "stop"


def test_stop_token_ids_end_a_choice_with_its_text_and_stop_strings_may_be_kept(checkpoint):
    """vLLM's stop_token_ids: the token ends the choice (finish_reason "stop") and its text is
    kept; before min_tokens it is never sampled. include_stop_str_in_output keeps the stop
    string, and nothing after it."""
    from serve_app.engine.types import RequestRejected

    engine = make_engine(checkpoint)
    probe, texts, _ = run(engine, [GenerationRequest(PROMPTS[0], greedy(20), "p")])
    tokens, full = probe[("p", 0)], texts[("p", 0)]
    stop_token = tokens[5]
    assert stop_token not in tokens[:5]
    got, texts, reasons = run(engine, [GenerationRequest(PROMPTS[0], greedy(20, stop_token_ids=(stop_token,)), "t")])
    assert got[("t", 0)] == tokens[:6] and reasons[("t", 0)] == "stop"
    assert texts[("t", 0)] == engine.tokenizer.decode(tokens[:6])
    got, _, _ = run(engine, [GenerationRequest(PROMPTS[0], greedy(20, stop_token_ids=(stop_token,), min_tokens=8), "m")])
    assert got[("m", 0)][:5] == tokens[:5] and stop_token not in got[("m", 0)][:8]
    with pytest.raises(RequestRejected, match="stop_token_ids names token ids outside"):
        engine.add(GenerationRequest(PROMPTS[0], greedy(5, stop_token_ids=(engine.vocab_size,)), "x"))

    stop = full[6:10]
    _, texts, reasons = run(engine, [GenerationRequest(PROMPTS[0], greedy(20, stop=(stop,), include_stop_str_in_output=True), "k")])
    assert texts[("k", 0)] == full[: full.find(stop) + len(stop)] and reasons[("k", 0)] == "stop"


def test_cancel_frees_the_slot_for_a_waiting_request(checkpoint):
    engine = make_engine(checkpoint, max_batch_size=2)
    for rid in ("a", "b", "c"):
        engine.add(GenerationRequest(PROMPTS[0], greedy(100), rid))
    engine.step()
    assert engine.num_running == 2 and engine.num_waiting == 1
    engine.cancel("a")
    deltas = engine.step()
    assert any(d.request_id == "a" and d.finish_reason == "cancelled" for d in deltas)
    assert any(d.request_id == "c" for d in deltas)  # admitted into a's slot in the same step
    assert engine.num_running == 2 and engine.num_waiting == 0


def test_utf8_never_split_on_emoji_and_cjk():
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    table = token_bytes_table(tok)
    text = "Writers ✍️ 写作 😀🎉 — naïve café 你好世界"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters really span several tokens
    stream, chunks = TextStream(), []
    for t in ids:
        chunks.append(stream.push(table[t]))
    chunks.append(stream.finish())
    assert "".join(chunks) == text
    assert all("\ufffd" not in c for c in chunks)


def test_engine_stream_equals_whole_decode_on_cjk_prompt(checkpoint):
    engine = make_engine(checkpoint)
    tokens, texts, _ = run(engine, [GenerationRequest(
        "写作的时候 😀", SamplingParams(max_tokens=60, temperature=1.0, seed=3), "u")])
    assert texts[("u", 0)] == engine.tokenizer.decode(tokens[("u", 0)])


@pytest.mark.parametrize("request_,message", [
    (GenerationRequest("word " * 100, greedy(4)), "at most 50"),
    (GenerationRequest("hi", greedy(65)), "at most 64"),
    (GenerationRequest("hi", greedy(4, n=5)), "at most 4"),
    (GenerationRequest("word " * 40, greedy(60)), "maximum context length is 96 tokens"),
    (GenerationRequest([1, 2, 99999], greedy(4)), "token ids"),
])
def test_limits_refuse_oversized_requests_with_a_reason(checkpoint, request_, message):
    engine = make_engine(checkpoint, max_prompt_tokens=50, max_tokens=64, max_n=4, max_seq_len=96)
    with pytest.raises(RequestRejected, match=message):
        engine.add(request_)
    assert not engine.has_work


def test_a_default_max_tokens_is_cut_to_the_room_the_prompt_leaves(checkpoint):
    """A client that sent no max_tokens gets what fits in the context ("length"), not a 400; one
    that asked for more than fits is still refused, and a prompt that fills the context too."""
    engine = make_engine(checkpoint, max_prompt_tokens=200, max_tokens=64, max_seq_len=96)
    prompt = engine.tokenizer.encode("word " * 90)[:90]
    tokens, _, reasons = run(engine, [GenerationRequest(prompt, greedy(60, fit_max_tokens=True), "fit")])
    assert len(tokens[("fit", 0)]) == 6 and reasons[("fit", 0)] == "length"
    with pytest.raises(RequestRejected, match="maximum context length is 96 tokens") as refused:
        engine.add(GenerationRequest(prompt, greedy(60)))
    assert (refused.value.param, refused.value.code) == ("max_tokens", "context_length_exceeded")
    with pytest.raises(RequestRejected, match="leave no room to generate") as refused:
        engine.add(GenerationRequest(prompt + prompt[:6], greedy(60, fit_max_tokens=True)))
    assert (refused.value.param, refused.value.code) == ("prompt", "context_length_exceeded")


def test_bad_sampling_values_are_refused():
    with pytest.raises(RequestRejected, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(RequestRejected, match="top_p"):
        SamplingParams(top_p=0)
    for bad in ({"frequency_penalty": 2.5}, {"presence_penalty": -3}, {"frequency_penalty": float("nan")},
                {"repetition_penalty": 0}, {"repetition_penalty": 11}, {"repetition_penalty": float("inf")}):
        with pytest.raises(RequestRejected, match=next(iter(bad))):
            SamplingParams(**bad)


# ---- repetition guards --------------------------------------------------------------------


def test_greedy_honours_openais_penalties_and_transformers_repetition_penalty_beside_unguarded_requests(checkpoint, hf):
    """Guarded and unguarded requests share a batch: each gets its own rule's tokens, and the
    guarded one keeps its counts when the batch is re-packed under it (the short request ahead
    of it finishes first and it moves into that slot)."""
    engine = make_engine(checkpoint)
    first = [GenerationRequest(PROMPTS[2], greedy(6), "plain"),
             GenerationRequest(PROMPTS[0], greedy(24, frequency_penalty=1.5, presence_penalty=0.5), "openai")]
    later = {3: [GenerationRequest(PROMPTS[1], greedy(20, repetition_penalty=1.3), "hf")]}
    tokens, _, _ = run(engine, first, add_later=later)
    assert tokens[("plain", 0)] == hf_greedy(hf, PROMPTS[2], 6)
    assert tokens[("openai", 0)] == openai_greedy(hf, PROMPTS[0], 24, frequency=1.5, presence=0.5)
    assert tokens[("hf", 0)] == hf_greedy(hf, PROMPTS[1], 20, repetition_penalty=1.3)
    assert tokens[("openai", 0)] != hf_greedy(hf, PROMPTS[0], 24)  # the guard did change the text


def test_a_strong_frequency_penalty_keeps_greedy_text_from_repeating_a_token(checkpoint):
    engine = make_engine(checkpoint)
    for i, prompt in enumerate(PROMPTS[:2]):
        plain, _, _ = run(engine, [GenerationRequest(prompt, greedy(40), "plain")])
        guarded, _, _ = run(engine, [GenerationRequest(prompt, greedy(40, frequency_penalty=2.0), "guarded")])
        assert len(set(plain[("plain", 0)])) < 40, "the unguarded text repeats itself"
        assert len(set(guarded[("guarded", 0)])) == 40, f"prompt {i}: a token came back despite the penalty"


def test_repetition_penalty_counts_the_prompt_and_openais_penalties_do_not(checkpoint):
    """A prompt made of the model's own loop: left alone it goes on reusing the prompt's tokens;
    OpenAI's penalties count generated tokens only, so they still do; repetition_penalty counts
    the prompt too, and no prompt token comes back."""
    engine = make_engine(checkpoint)
    loop, _, _ = run(engine, [GenerationRequest(PROMPTS[2], greedy(40), "loop")])
    prompt = engine.tokenizer.encode(PROMPTS[2]) + loop[("loop", 0)]
    got, _, _ = run(engine, [GenerationRequest(prompt, greedy(12), "plain"),
                             GenerationRequest(prompt, greedy(12, frequency_penalty=2.0, presence_penalty=2.0), "openai"),
                             GenerationRequest(prompt, greedy(12, repetition_penalty=10.0), "hf")])
    reused = {name: set(got[(name, 0)]) & set(prompt) for name in ("plain", "openai", "hf")}
    assert reused["plain"] and reused["openai"]
    assert reused["hf"] == set()


def test_n_guarded_choices_each_count_their_own_tokens(checkpoint, hf):
    tokens, _, _ = run(make_engine(checkpoint), [GenerationRequest(PROMPTS[3], greedy(16, n=3, frequency_penalty=1.0), "n")])
    expected = openai_greedy(hf, PROMPTS[3], 16, frequency=1.0, presence=0.0)
    assert [tokens[("n", i)] for i in range(3)] == [expected] * 3


def test_guarded_seeded_sampling_is_the_same_in_any_batch_mix(checkpoint):
    params = SamplingParams(max_tokens=24, temperature=1.0, top_k=50, seed=1234, frequency_penalty=0.8,
                            presence_penalty=0.4, repetition_penalty=1.2)
    alone, _, _ = run(make_engine(checkpoint), [GenerationRequest(PROMPTS[0], params, "x")])
    crowd = [GenerationRequest(p, SamplingParams(max_tokens=8 + 4 * i, temperature=1.2, seed=i,
                                                 presence_penalty=0.5 * (i % 2)), f"o{i}")
             for i, p in enumerate(PROMPTS)]
    mixed, _, _ = run(make_engine(checkpoint), crowd, add_later={2: [GenerationRequest(PROMPTS[0], params, "x")]})
    assert mixed[("x", 0)] == alone[("x", 0)]
    unguarded, _, _ = run(make_engine(checkpoint), [GenerationRequest(PROMPTS[0], SamplingParams(
        max_tokens=24, temperature=1.0, top_k=50, seed=1234), "y")])
    assert unguarded[("y", 0)] != alone[("x", 0)]


def test_guards_change_only_seen_tokens_by_the_documented_formulas():
    """Rows of different lengths, tokens repeated and shared between prompt and output, logits
    of both signs, one row unguarded: each row against the formulas written out densely."""
    from serve_app.engine.penalties import TokenHistory

    V = 40
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0)) * 5
    history = TokenHistory(slots=4, max_seq_len=32, vocab_size=V, device=torch.device("cpu"))
    prompts = {1: [3, 4, 4, 9], 3: [7]}  # slot -> prompt; slot 1 is row 0, slot 3 row 2
    generated = {1: [4, 5, 5, 5, 11], 3: [3, 7, 7]}
    for slot, prompt in prompts.items():
        history.start(slot, 1, prompt)
    for step in range(5):
        slots = [s for s in generated if step < len(generated[s])]
        history.record(slots, [generated[s][step] for s in slots])
    guards = {1: SamplingParams(frequency_penalty=0.7, presence_penalty=-0.3, repetition_penalty=1.5),
              3: SamplingParams(frequency_penalty=-1.0, presence_penalty=2.0, repetition_penalty=0.8)}
    got = history.apply(logits, [0, 2], [1, 3], [guards[1], guards[3]])

    def dense(row: torch.Tensor, slot: int) -> torch.Tensor:
        p = guards[slot]
        counts = torch.bincount(torch.tensor(generated[slot]), minlength=V).float()
        seen = (counts > 0) | torch.isin(torch.arange(V), torch.tensor(prompts[slot]))
        row = torch.where(seen, torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty), row)
        return row - counts * p.frequency_penalty - (counts > 0) * p.presence_penalty

    torch.testing.assert_close(got[0], dense(logits[0], 1))
    torch.testing.assert_close(got[2], dense(logits[2], 3))
    assert torch.equal(got[1], logits[1])


def test_requests_without_a_guard_cost_no_token_history(checkpoint):
    engine = make_engine(checkpoint)
    run(engine, [GenerationRequest(p, SamplingParams(max_tokens=4, seed=i), str(i)) for i, p in enumerate(PROMPTS)])
    assert not engine.token_history.allocated
    run(engine, [GenerationRequest(PROMPTS[0], greedy(4, presence_penalty=0.1), "guarded")])
    assert engine.token_history.allocated


def test_full_queue_is_refused_not_dropped(checkpoint):
    engine = make_engine(checkpoint, max_batch_size=1, max_waiting=2)
    engine.add(GenerationRequest("a", greedy(4)))
    engine.add(GenerationRequest("b", greedy(4)))
    with pytest.raises(EngineOverloaded):
        engine.add(GenerationRequest("c", greedy(4)))


def test_empty_prompt_continues_from_end_of_text(checkpoint):
    tokens, _, _ = run(make_engine(checkpoint), [GenerationRequest("", greedy(5), "e")])
    assert len(tokens[("e", 0)]) == 5


def test_an_empty_prompt_is_refused_where_the_tokenizer_has_no_end_of_text(checkpoint, tmp_path):
    folder = tmp_path / "no-eos"
    shutil.copytree(checkpoint, folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "eos_token": None, "bos_token": None,
                                                              "unk_token": None, "pad_token": None}))
    engine = make_engine(folder)
    assert engine.eos_token_id is None
    with pytest.raises(RequestRejected, match="tokenizer has no end-of-text") as refused:
        engine.add(GenerationRequest("", greedy(5)))
    assert refused.value.param == "prompt"
    tokens, _, reasons = run(engine, [GenerationRequest("Hello", greedy(5), "h")])  # text still generates
    assert len(tokens[("h", 0)]) == 5 and reasons[("h", 0)] == "length"


@pytest.mark.parametrize("onednn", [True, False], ids=["oneDNN-packed", "F.linear-fallback"])
def test_both_matmul_kernels_give_transformers_greedy_output(checkpoint, hf, monkeypatch, onednn):
    """The runner's weights go through oneDNN when this torch build has it, else F.linear
    (GPUs, other builds): either way the tokens are transformers'."""
    if onednn and not linear_module.onednn_works():
        pytest.skip("this torch build has no working oneDNN linear")
    monkeypatch.setattr(linear_module, "onednn_works", lambda dtype=torch.float32: onednn)
    engine = make_engine(checkpoint)
    tokens, _, _ = run(engine, [GenerationRequest(p, greedy(10), str(i)) for i, p in enumerate(PROMPTS)])
    for i, p in enumerate(PROMPTS):
        assert tokens[(str(i), 0)] == hf_greedy(hf, p, 10)


def test_a_rows_logits_do_not_depend_on_the_other_rows(checkpoint):
    """Why seeded text is the same in any batch: the same token at the same position gives the
    same logits, bit for bit, alone or beside others (with oneDNN's packed matmuls; MKL's
    addmm and GPU kernels may differ in the last bits by batch size)."""
    if not linear_module.onednn_works():
        pytest.skip("this torch build has no working oneDNN linear")
    engine = make_engine(checkpoint, max_batch_size=4)
    runner = engine.runner
    prompt = engine.tokenizer.encode(PROMPTS[1])
    for slot in range(4):
        runner.forward([], [], [PromptChunk(slot, 0, prompt)])
    alone = runner.forward([prompt[-1]], [len(prompt)])
    crowd = runner.forward([prompt[-1], 11, 50, 7], [len(prompt)] * 4)
    assert torch.equal(alone[0], crowd[0])


def fail_pass_once(engine, when):
    """A FAKE GPU out-of-memory (no GPU here): the first forward pass for which
    `when(decode_tokens, chunks)` holds raises torch.OutOfMemoryError; the others run."""
    real_forward, failed = engine.runner.forward, []

    def forward_that_runs_out_of_memory_once(decode_tokens, positions, chunks=()):
        if not failed and when(decode_tokens, chunks):
            failed.append(True)
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return real_forward(decode_tokens, positions, chunks)

    engine.runner.forward = forward_that_runs_out_of_memory_once
    return failed


def test_out_of_memory_fails_only_the_newest_request(checkpoint, hf):
    engine = make_engine(checkpoint)
    failed = fail_pass_once(engine, lambda decode, chunks: len(decode) == 2)  # both decoding
    tokens, _, reasons = run(engine, [GenerationRequest(PROMPTS[0], greedy(12), "old"),
                                      GenerationRequest(PROMPTS[1], greedy(12), "new")])
    assert failed
    assert reasons[("new", 0)] == "error"
    assert reasons[("old", 0)] == "length"
    assert tokens[("old", 0)] == hf_greedy(hf, PROMPTS[0], 12)
    # and the engine keeps serving
    tokens, _, _ = run(engine, [GenerationRequest(PROMPTS[2], greedy(6), "next")])
    assert tokens[("next", 0)] == hf_greedy(hf, PROMPTS[2], 6)


def test_out_of_memory_during_a_prompt_fails_that_prompt_only(checkpoint, hf):
    """The pass that runs out of memory holds a decoding request and the newest one's prompt
    chunk: the newcomer fails, the one already streaming goes on as if nothing happened."""
    engine = make_engine(checkpoint, max_prefill_tokens=4)
    failed = fail_pass_once(engine, lambda decode, chunks: decode and chunks)
    tokens, _, reasons = run(engine, [GenerationRequest(PROMPTS[0], greedy(12), "old")],
                             add_later={6: [GenerationRequest(PROMPTS[1], greedy(12), "new")]})
    assert failed
    assert reasons[("new", 0)] == "error" and tokens.get(("new", 0), []) == []
    assert reasons[("old", 0)] == "length"
    assert tokens[("old", 0)] == hf_greedy(hf, PROMPTS[0], 12)


@pytest.mark.parametrize("after", [0, 3], ids=["first-token", "mid-stream"])
def test_out_of_memory_while_sampling_fails_only_the_request_that_needs_it(checkpoint, hf, monkeypatch, after):
    """A FAKE out-of-memory error (no device here runs out): sampling raises it whenever the
    poisoned request's row is in the call, from its `after`-th token on. Only that request
    ends in error, the rest stream on to the same tokens as transformers, the engine goes on."""
    from serve_app.engine import engine as engine_module

    real = engine_module.sample

    def sample(logits, rows):
        if any(r.temperature == 0.77 and r.counter >= after for r in rows):
            raise torch.OutOfMemoryError("fake: out of memory")
        return real(logits, rows)

    monkeypatch.setattr(engine_module, "sample", sample)
    engine = make_engine(checkpoint)
    poisoned = GenerationRequest(PROMPTS[3], SamplingParams(max_tokens=12, temperature=0.77, n=2, seed=1), "poisoned")
    tokens, _, reasons = run(engine, [GenerationRequest(PROMPTS[0], greedy(12), "a"), poisoned,
                                      GenerationRequest(PROMPTS[1], greedy(12), "b")])
    assert reasons[("poisoned", 0)] == reasons[("poisoned", 1)] == "error"
    assert len(tokens.get(("poisoned", 0), [])) == after
    for rid, prompt in (("a", PROMPTS[0]), ("b", PROMPTS[1])):
        assert reasons[(rid, 0)] == "length" and tokens[(rid, 0)] == hf_greedy(hf, prompt, 12)
    assert not engine.has_work and engine.num_running == 0
    tokens, _, _ = run(engine, [GenerationRequest(PROMPTS[2], greedy(6), "next")])
    assert tokens[("next", 0)] == hf_greedy(hf, PROMPTS[2], 6)


async def test_coalesced_stream_delivers_every_token_in_order_first_one_at_once(checkpoint, hf):
    """With a message budget of 5/s a lone caller hears every 0.2 s: the steps in between
    arrive together, in order, and the first token is not held back."""
    aengine = AsyncEngine(make_engine(checkpoint, stream_messages_per_s=5))
    try:
        messages = [step async for step in aengine.generate_steps(GenerationRequest(PROMPTS[1], greedy(60), "c"))]
        tokens = [t for step in messages for d in step for t in d.token_ids]
        assert tokens == hf_greedy(hf, PROMPTS[1], 60)
        assert [d.completion_tokens for step in messages for d in step] == list(range(1, 61))
        # Not held: a held first message would carry every step of the first 0.2 s, dozens on
        # this tiny model. It goes out at once, but the step thread may file another step or
        # two before the caller's loop takes it (once in CI: two).
        assert messages[0][0].completion_tokens == 1 and len(messages[0]) <= 4, [len(m) for m in messages]
        assert len(messages) < 30 and max(len(m) for m in messages) > 1  # steps went out together
        assert messages[-1][-1].finish_reason == "length"
    finally:
        aengine.shutdown()


async def test_the_end_of_a_request_is_not_held_back(checkpoint, hf):
    """A budget of one message a second holds a lone caller's tokens for a second after its
    first; the request ends a few steps in, and its end goes out then, not when the hold is up."""
    aengine = AsyncEngine(make_engine(checkpoint, stream_messages_per_s=1))
    try:
        started = time.monotonic()
        messages = [step async for step in aengine.generate_steps(GenerationRequest(PROMPTS[1], greedy(8), "e"))]
        elapsed = time.monotonic() - started
        assert [t for step in messages for d in step for t in d.token_ids] == hf_greedy(hf, PROMPTS[1], 8)
        assert len(messages) == 2 and messages[-1][-1].finish_reason == "length"  # the rest was held
        assert elapsed < 0.7, f"the end waited out the hold ({elapsed:.2f} s)"
    finally:
        aengine.shutdown()


async def test_tokenizing_a_huge_prompt_does_not_stall_other_streams(checkpoint):
    """The event loop keeps delivering a running stream while a megabyte prompt is tokenized
    (on the loop itself, the running stream got nothing until the tokenizer was done)."""
    aengine = AsyncEngine(make_engine(checkpoint))
    try:
        received: list[int] = []
        done_tokenizing = asyncio.Event()

        async def run_long():
            async for step in aengine.generate_steps(GenerationRequest(PROMPTS[1], greedy(230), "long")):
                if not done_tokenizing.is_set():
                    received.append(len(step))

        long_stream = asyncio.create_task(run_long())
        while not received:
            await asyncio.sleep(0.01)
        before = len(received)
        huge = "the court held that the contract was void " * 30_000  # 1.3 MB
        with pytest.raises(RequestRejected, match="tokens"):
            await anext(aengine.generate_steps(GenerationRequest(huge, greedy(4), "huge")))
        done_tokenizing.set()
        assert len(received) - before >= 3, "the running stream stalled while the prompt was tokenized"
        long_stream.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await long_stream
    finally:
        aengine.shutdown()


async def test_a_caller_that_leaves_while_its_tokens_are_held_frees_its_slot(checkpoint):
    engine = make_engine(checkpoint, stream_messages_per_s=1)  # a second between messages
    aengine = AsyncEngine(engine)
    try:
        stream = aengine.generate_steps(GenerationRequest(PROMPTS[0], greedy(200), "held"))
        await anext(stream)
        second = asyncio.ensure_future(anext(stream))  # held: waits out the interval
        await asyncio.sleep(0.1)
        second.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await second
        await stream.aclose()
        await assert_goes_idle(engine)
    finally:
        aengine.shutdown()


@pytest.mark.parametrize("amx", [True, False], ids=["cpu-with-amx", "cpu-without-amx"])
@pytest.mark.parametrize("numba", [True, False], ids=["numba-attention", "no-numba"])
def test_bfloat16_weights_stay_within_tolerance_of_float32(checkpoint, monkeypatch, amx, numba):
    """bf16 weights (the fast path on CPUs with bf16 units) against float32: the same logits
    within bf16's precision, for a prompt and for the decode steps that read the cache. The
    cache is bf16 where AMX or attention.py's loop runs attention, float32 elsewhere (faster
    there): the CPU's answer and numba's are faked, all four ways, so every cache and attention
    path is checked on whatever CPU runs the suite."""
    from serve_app.engine import gpt2

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    if not numba:
        monkeypatch.setattr(gpt2, "fused_decode_serves", lambda device, dtype: False)
    ids = [464, 3381, 2714, 326, 262, 1110, 286, 257] * 4
    logits = {}
    for dtype in ("float32", "bfloat16"):
        engine = make_engine(checkpoint, dtype=dtype)
        want_cache = torch.bfloat16 if dtype == "bfloat16" and (amx or numba) else torch.float32
        assert engine.runner.k_cache.dtype == want_cache  # half the bytes in bf16
        assert engine.runner.fused_decode == numba
        rows = [engine.runner.forward([], [], [PromptChunk(0, 0, ids)])[0]]
        for step, token in enumerate([290, 11, 262]):  # three decode steps on the cached prompt
            rows.append(engine.runner.forward([token], [len(ids) + step])[0])
        logits[dtype] = torch.stack(rows)
    scale = logits["float32"].abs().max()
    assert (logits["bfloat16"] - logits["float32"]).abs().max() <= 0.05 * scale


async def test_an_engine_given_as_a_builder_is_built_on_the_thread_that_steps_it(checkpoint, hf, tmp_path):
    """One thread loads, warms and steps the model, so the process keeps one OpenMP pool (a
    second pool made libgomp put its workers to sleep between ops). A model that fails to load
    fails the constructor with the loader's own error, as building it in place did."""
    from serve_app.engine import CheckpointError

    built_on = []
    aengine = AsyncEngine(lambda: built_on.append(threading.get_ident()) or make_engine(checkpoint))
    try:
        assert built_on == [aengine._thread.ident] and aengine.engine is not None
        got = [d async for d in aengine.generate(GenerationRequest(PROMPTS[0], greedy(8), "built"))]
        assert [t for d in got for t in d.token_ids] == hf_greedy(hf, PROMPTS[0], 8)
    finally:
        aengine.shutdown()
    with pytest.raises(CheckpointError, match="not a folder"):
        AsyncEngine(lambda: make_engine(tmp_path / "no-such-model"))


async def test_async_engine_streams_and_cancels_when_the_caller_leaves(checkpoint, hf):
    engine = make_engine(checkpoint)
    aengine = AsyncEngine(engine)
    try:
        got = [d async for d in aengine.generate(GenerationRequest(PROMPTS[0], greedy(10), "s"))]
        assert [t for d in got for t in d.token_ids] == hf_greedy(hf, PROMPTS[0], 10)
        assert got[-1].finish_reason == "length"

        stream = aengine.generate(GenerationRequest(PROMPTS[1], greedy(200), "leaver"))
        async for _ in stream:
            break
        await stream.aclose()
        await assert_goes_idle(engine)
    finally:
        aengine.shutdown()


def test_lora_adapter_is_merged_at_load(checkpoint, hf, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tok = hf
    base = GPT2LMHeadModel.from_pretrained(checkpoint)
    lora = LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False)
    peft_model = get_peft_model(base, lora)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload().eval()

    ids = tok(PROMPTS[1], return_tensors="pt").input_ids
    with torch.no_grad():
        expected = merged.generate(ids, do_sample=False, max_new_tokens=12, pad_token_id=tok.eos_token_id)
    expected = expected[0, ids.shape[1]:].tolist()
    assert expected != hf_greedy(hf, PROMPTS[1], 12)  # the adapter really changes the model

    engine = make_engine(checkpoint, adapter=str(tmp_path / "adapter"))
    tokens, _, _ = run(engine, [GenerationRequest(PROMPTS[1], greedy(12), "l")])
    assert tokens[("l", 0)] == expected



@pytest.mark.parametrize("targets", [{"target_modules": ["c_attn", "lm_head"]}, {"target_modules": ["wte"]}],
                         ids=["lora-on-lm_head", "lora-on-wte"])
def test_a_lora_on_a_tied_embedding_serves_the_model_it_trained(checkpoint, hf, tmp_path, targets):
    """GPT-2's lm_head is its token embedding. Merged in place, a LoRA on one moved the other
    too: the served model was not the one trained. The engine must say what peft says unmerged."""
    from peft import LoraConfig, PeftModel, get_peft_model

    model, tok = hf
    base = GPT2LMHeadModel.from_pretrained(checkpoint)
    assert base.config.tie_word_embeddings
    lora = LoraConfig(r=4, init_lora_weights=False, **targets)
    get_peft_model(base, lora).save_pretrained(tmp_path / "adapter")
    trained = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(checkpoint), tmp_path / "adapter").eval()

    ids = tok(PROMPTS[1], return_tensors="pt").input_ids
    with torch.no_grad():
        expected = trained.generate(input_ids=ids, do_sample=False, max_new_tokens=12, pad_token_id=tok.eos_token_id)
    expected = expected[0, ids.shape[1]:].tolist()
    assert expected != hf_greedy(hf, PROMPTS[1], 12)  # the adapter really changes the model

    engine = make_engine(checkpoint, adapter=str(tmp_path / "adapter"))
    tokens, _, _ = run(engine, [GenerationRequest(PROMPTS[1], greedy(12), "t")])
    assert tokens[("t", 0)] == expected



def test_a_broken_adapter_folder_is_refused_naming_the_file(checkpoint, tmp_path):
    from peft import LoraConfig, get_peft_model

    from serve_app.engine import CheckpointError

    get_peft_model(GPT2LMHeadModel.from_pretrained(checkpoint), LoraConfig(r=2, target_modules=["c_attn"])).save_pretrained(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    with pytest.raises(CheckpointError, match=r"cannot be loaded: adapter_model.safetensors: "):
        make_engine(checkpoint, adapter=str(tmp_path / "a"))
    (tmp_path / "a" / "adapter_config.json").unlink()
    with pytest.raises(CheckpointError, match="has no adapter_config.json"):
        make_engine(checkpoint, adapter=str(tmp_path / "a"))


def test_pickled_weights_are_refused(tmp_path):
    from serve_app.engine import CheckpointError

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2))
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # a pickle, as old checkpoints ship
    AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="safetensors"):
        make_engine(tmp_path)


def test_an_hf_source_serves_from_the_hub_cache_offline_and_is_refused_plainly_when_absent(checkpoint, hf, tmp_path, monkeypatch):
    """hf://owner/name is read from the machine's hub cache where it is there (an air-gapped
    replica with a pre-filled HF_HOME); where it is not, the hub's unreachability is one clear
    error (left to transformers, 50 s of retries and then a raw OSError)."""
    from huggingface_hub import constants

    from serve_app.engine import CheckpointError

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny"
    shutil.copytree(checkpoint, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as on a machine with no route to the hub

    engine = make_engine("hf://acme/tiny")
    tokens, _, _ = run(engine, [GenerationRequest(PROMPTS[0], greedy(6), "h")])
    assert tokens[("h", 0)] == hf_greedy(hf, PROMPTS[0], 6)
    with pytest.raises(CheckpointError, match=r"'hf://acme/absent' cannot be fetched: the Hugging Face hub cannot be reached.*HF_HOME"):
        make_engine("hf://acme/absent")
    with pytest.raises(CheckpointError, match="not a hub model id"):
        make_engine("hf://a b")


def test_a_checkpoint_that_would_load_as_random_weights_is_refused_by_name(tmp_path):
    """transformers fills what a checkpoint lacks with random weights and only logs it; served,
    that is noise. Another architecture, a missing tensor, shapes config.json contradicts, no
    config.json at all, a LoRA adapter of another base, and a tokenizer the vocabulary cannot hold
    are each refused with what to fix."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from serve_app.engine import CheckpointError
    from serve_app.engine.loader import load_model

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    llama = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(llama)
    tokenizer.save_pretrained(llama)
    with pytest.raises(CheckpointError, match="type 'llama'.*GPT-2"):
        make_engine(llama)

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2)).save_pretrained(gpt2)
    tokenizer.save_pretrained(gpt2)
    weights = load_file(gpt2 / "model.safetensors")
    del weights["transformer.h.1.mlp.c_fc.weight"]
    save_file(weights, gpt2 / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lacks 1 of the model.s weights \(transformer\.h\.1\.mlp\.c_fc\.weight"):
        make_engine(gpt2)

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2)).save_pretrained(gpt2)
    config = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**config, "n_embd": 64}))
    with pytest.raises(CheckpointError, match="shapes do not match its config.json"):
        make_engine(gpt2)

    (gpt2 / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        make_engine(gpt2)

    # ...while the hub's own GPT-2 layout (no "transformer." prefix, no lm_head: it is tied, and
    # the old attention-mask buffers) loads, with the same logits.
    hub = tmp_path / "hub"
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64)).eval()
    model.config.save_pretrained(hub)
    tokenizer.save_pretrained(hub)
    weights = {k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items()
               if not k.startswith("lm_head")}
    weights.update({f"h.{i}.attn.bias": torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64) for i in range(2)})
    save_file(weights, hub / "model.safetensors", metadata={"format": "pt"})
    ids = torch.tensor([[1, 2, 3]])
    loaded = load_model(str(hub), None, torch.device("cpu"), torch.float32)
    assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)

    # A LoRA adapter trained on another base (wider layers) is refused by name too.
    from peft import LoraConfig, get_peft_model

    wider = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=64))
    get_peft_model(wider, LoraConfig(r=4, target_modules=["c_attn"])).save_pretrained(tmp_path / "adapter")
    with pytest.raises(CheckpointError, match="does not fit its base model.*size mismatch"):
        make_engine(hub, adapter=str(tmp_path / "adapter"))

    # A tokenizer bigger than the model's vocabulary: text would encode past the embedding.
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=500)).save_pretrained(gpt2)
    with pytest.raises(CheckpointError, match="tokenizer has 50257 tokens but the model's vocabulary has 500"):
        make_engine(gpt2)


def test_the_loader_reads_what_transformers_loads_from_one_file_or_shards_and_keeps_lm_head_tied(tmp_path):
    """The engine reads a checkpoint's safetensors itself (loader.py): the same tensors as
    transformers' `from_pretrained`, from a sharded save too, and GPT-2's tied lm_head stays one
    tensor in the served dtype, not a second copy of the embedding."""
    from serve_app.engine.loader import load_weights

    model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=64, n_head=4, n_positions=64)).eval()
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "shards", max_shard_size="100KB")
    assert len(list((tmp_path / "shards").glob("*.safetensors"))) > 1
    want = GPT2LMHeadModel.from_pretrained(tmp_path / "one").state_dict()
    for folder in ("one", "shards"):
        got = load_weights(str(tmp_path / folder), None, torch.device("cpu"), torch.float32).tensors
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), folder
    half = load_weights(str(tmp_path / "shards"), None, torch.device("cpu"), torch.bfloat16).tensors
    assert half["lm_head.weight"].dtype == torch.bfloat16
    assert half["lm_head.weight"].data_ptr() == half["transformer.wte.weight"].data_ptr()


def test_an_engine_starts_without_importing_transformers_model_classes(checkpoint):
    """A model replica's start: importing transformers' GPT-2 model module costs 3.3 s on a
    2-core box (it pulls in torch._dynamo and torch.distributed.tensor); a plain checkpoint
    needs none of it. In a fresh process, as a replica starts."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from serve_app.engine import Engine, EngineConfig, GenerationRequest, SamplingParams\n"
            f"e = Engine(EngineConfig(source={str(checkpoint)!r}, max_batch_size=2, max_seq_len=64))\n"
            "e.add(GenerationRequest('Hello', SamplingParams(max_tokens=3, temperature=0)))\n"
            "while e.has_work: e.step()\n"
            "print(sorted(m for m in sys.modules if m.startswith('transformers.models.gpt2.modeling')"
            " or m.startswith('torch._dynamo')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-500:]


async def test_many_concurrent_callers_some_leaving_early(checkpoint):
    """20 callers at once on an 8-slot engine; every third leaves after its first delta."""
    engine = make_engine(checkpoint, max_batch_size=8)
    solo = {i: run(make_engine(checkpoint), [GenerationRequest(PROMPTS[i % 4], SamplingParams(
        max_tokens=8 + i, temperature=0.9, seed=i), "solo")])[0][("solo", 0)] for i in range(0, 20, 4)}
    aengine = AsyncEngine(engine)

    async def caller(i):
        req = GenerationRequest(PROMPTS[i % 4], SamplingParams(max_tokens=8 + i, temperature=0.9, seed=i), f"c{i}")
        tokens = []
        stream = aengine.generate(req)
        async for d in stream:
            tokens += d.token_ids
            if i % 3 == 2:
                await stream.aclose()
                return i, None
        return i, tokens

    try:
        results = dict(await asyncio.wait_for(asyncio.gather(*(caller(i) for i in range(20))), 120))
        for i, tokens in results.items():
            if i % 3 == 2:
                continue
            assert len(tokens) == 8 + i
            if i in solo:
                assert tokens == solo[i]  # seeded: the crowd changed nothing
        for _ in range(100):
            if not engine.has_work:
                break
            await asyncio.sleep(0.02)
        assert engine.num_running == 0 and engine.num_waiting == 0
    finally:
        aengine.shutdown()


def test_checkpoint_without_tokenizer_is_named(tmp_path):
    from serve_app.engine import CheckpointError

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no tokenizer"):
        make_engine(tmp_path)


async def _collect(aengine, request):
    return [d async for d in aengine.generate(request)]


async def test_a_duplicate_request_id_is_refused_and_the_live_request_keeps_streaming(checkpoint):
    aengine = AsyncEngine(make_engine(checkpoint))
    try:
        live = aengine.generate(GenerationRequest(PROMPTS[0], greedy(40), "same"))
        deltas = [await live.__anext__()]  # it is streaming: its route is live
        with pytest.raises(RequestRejected, match="already running"):
            await _collect(aengine, GenerationRequest(PROMPTS[1], greedy(3), "same"))
        async def rest():
            return [d async for d in live]

        deltas += await asyncio.wait_for(rest(), 60)  # a lost route would leave it waiting forever
        assert sum(len(d.token_ids) for d in deltas) == 40 and deltas[-1].finish_reason == "length"
    finally:
        aengine.shutdown()


async def test_a_step_that_raises_ends_every_stream_with_an_error(checkpoint):
    """A FAKE fault outside the forward pass (the engine handles those itself): `Engine.step`
    raising must not leave callers waiting forever, nor the loop spinning."""
    engine = make_engine(checkpoint)
    aengine = AsyncEngine(engine)
    calls = 0

    def broken_step():
        nonlocal calls
        calls += 1
        raise RuntimeError("a bug in the scheduler")

    engine.step = broken_step
    try:
        deltas = await asyncio.wait_for(_collect(aengine, GenerationRequest(PROMPTS[0], greedy(8, n=2), "x")), 10)
        assert [(d.index, d.finish_reason) for d in deltas] == [(0, "error"), (1, "error")]
        assert "inside the engine" in deltas[0].error and "scheduler" not in deltas[0].error
        await asyncio.sleep(1.0)
        assert calls <= 4  # paused between failing steps, not a hot loop
    finally:
        aengine.shutdown()


class ScriptedEngine:
    """A FAKE engine for the async layer alone: each step returns the next scripted list of
    deltas for the one request it holds, or raises what the script says."""

    def __init__(self, script: list, stream_messages_per_s: float = 0.0):
        self.script = list(script)
        self.config = type("Config", (), {"stream_messages_per_s": stream_messages_per_s})()
        self.request_id: str | None = None

    def prepare(self, request):
        return [1, 2, 3]

    def add(self, request, prompt_ids):
        self.request_id = request.request_id

    def cancel(self, request_id):
        self.script = []

    @property
    def has_work(self):
        return self.request_id is not None and bool(self.script)

    def step(self):
        item = self.script.pop(0)
        if isinstance(item, Exception):
            raise item
        return [Delta(self.request_id, i, text, (7,), reason) for i, text, reason in item]


async def test_a_failure_after_one_choice_ended_ends_only_the_others_each_by_its_index():
    """n=2: choice 1 ends (length) at the first step, the second step raises. The caller gets
    choice 1's end and one error for choice 0, not a second ending for choice 1."""
    fake = ScriptedEngine([[(0, "a", None), (1, "b", "length")], RuntimeError("a bug in the scheduler")])
    aengine = AsyncEngine(lambda: fake)
    try:
        deltas = await asyncio.wait_for(_collect(aengine, GenerationRequest("x", greedy(4, n=2), "n2")), 10)
        assert [(d.index, d.text, d.finish_reason) for d in deltas] == [(0, "a", None), (1, "b", "length"),
                                                                         (0, "", "error")]
    finally:
        aengine.shutdown()


async def test_shutdown_ends_waiting_streams_with_an_error(checkpoint):
    aengine = AsyncEngine(make_engine(checkpoint, max_batch_size=1))
    long = aengine.generate(GenerationRequest(PROMPTS[0], greedy(200), "long"))
    started = await long.__anext__()  # streaming, in the only slot (200 tokens: a few hundred ms)

    async def rest():
        return [started] + [d async for d in long]

    first = asyncio.create_task(rest())
    waiting = asyncio.create_task(_collect(aengine, GenerationRequest(PROMPTS[1], greedy(5), "queued")))
    await asyncio.sleep(0.02)  # the queued request reaches the engine
    await asyncio.to_thread(aengine.shutdown)
    for task in (first, waiting):
        deltas = await asyncio.wait_for(task, 10)
        assert deltas[-1].finish_reason == "error" and "shutting down" in deltas[-1].error
    with pytest.raises(RequestRejected, match="shutting down"):
        await _collect(aengine, GenerationRequest(PROMPTS[2], greedy(2), "late"))
