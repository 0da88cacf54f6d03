"""The four systems under test, each replaying the same timed workload against one model.

Every system gets the same treatment:
- the model is loaded from the same checkpoint folder, with the same torch thread count;
- one short untimed request warms it up (thread pools, allocator, first-call paths);
- the workload is replayed in real time: request i "arrives" at t0 + arrival_s[i], and every
  latency is measured from that scheduled arrival, so time spent queued counts;
- a token's time is when the system hands it back (for `generate`, when its streamer receives
  it: a server streaming each row would send it then, which is the peer's best case).

Each system returns one record per request: arrival, first token, finish (all seconds from t0),
tokens generated. `run_system` is also the body of the child process that `bench.engine`
starts per system, so each system's peak memory is its own.
"""
from __future__ import annotations

import os
import threading
import time
from collections import deque

OURS = "quill"
SERIAL = "generate-serial"
STATIC = "generate-static"
CB = "hf-continuous"
SYSTEMS = (OURS, SERIAL, STATIC, CB)
DESCRIPTIONS = {
    OURS: "Quill engine (continuous batching, our GPT-2 runner)",
    SERIAL: "transformers `generate`, one request at a time (FIFO)",
    STATIC: "transformers `generate`, static batches of the requests that have arrived",
    CB: "transformers continuous batching (`init_continuous_batching()` manager kept running)",
}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak covers the replay only."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _records(workload: list[dict]) -> dict[str, dict]:
    return {
        w["id"]: {"id": w["id"], "arrival": w["arrival_s"], "first": None, "finish": None,
                  "tokens": 0, "prompt_tokens": len(w["prompt"]), "max_tokens": w["max_tokens"]}
        for w in workload
    }


def _sleep_until(deadline: float) -> None:
    delay = deadline - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


# ---- Quill's engine -------------------------------------------------------------------------


def replay_quill(checkpoint: str, workload: list[dict], s: dict) -> dict:
    """Our engine driven the way a server drives it: add what has arrived, then one step."""
    from serve_app.engine import Engine, EngineConfig, GenerationRequest, SamplingParams

    engine = Engine(EngineConfig(
        source=checkpoint, max_batch_size=s["max_batch_size"], max_seq_len=s["max_seq_len"],
        max_prompt_tokens=s["max_prompt_tokens"], max_tokens=s["max_tokens"], threads=s["threads"],
        max_prefill_tokens=s.get("max_prefill_tokens", 256), dtype=s.get("dtype", "float32"),
    ))
    engine.add(GenerationRequest(prompt=list(range(16)), params=SamplingParams(max_tokens=4, temperature=0),
                                 request_id="warmup"))
    while engine.has_work:
        engine.step()

    recs = _records(workload)
    pending = deque(workload)
    reset = _reset_peak_rss()
    steps, step_s = 0, 0.0
    t0 = time.perf_counter()
    while pending or engine.has_work:
        now = time.perf_counter() - t0
        while pending and pending[0]["arrival_s"] <= now:
            w = pending.popleft()
            engine.add(GenerationRequest(
                prompt=w["prompt"], params=SamplingParams(max_tokens=w["max_tokens"], temperature=0),
                request_id=w["id"]))
        if not engine.has_work:
            _sleep_until(t0 + pending[0]["arrival_s"])
            continue
        began = time.perf_counter()
        deltas = engine.step()
        ended = time.perf_counter()
        t = ended - t0  # every delta of a step is handed back when the step returns
        steps, step_s = steps + 1, step_s + (ended - began)
        for d in deltas:
            r = recs[d.request_id]
            if d.token_ids and r["first"] is None:
                r["first"] = t
            r["tokens"] = d.completion_tokens
            if d.finished:
                r["finish"] = t
                r["finish_reason"] = d.finish_reason
    runner = engine.runner  # what one cached position costs attention to read: its keys and values, every layer
    kv_bytes = 2 * runner.k_cache.element_size() * runner.k_cache[:, 0, 0].numel()
    return {"records": list(recs.values()), "peak_reset": reset, "steps": steps, "step_s": step_s,
            "kv_bytes_per_position": kv_bytes}


# ---- transformers generate: one at a time, or static batches --------------------------------


class _StepTimer:
    """A `generate` streamer that records when each decoding step's tokens reach the host."""

    def __init__(self, t0: float):
        self.t0 = t0
        self.times: list[float] = []
        self.tokens: list[list[int]] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate first hands over the prompt itself
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter() - self.t0)
        self.tokens.append(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


def _load_hf_model(checkpoint: str, dtype: str = "float32"):
    import torch
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(checkpoint, dtype=getattr(torch, dtype)).eval()


def _generate(model, prompts: list[list[int]], max_new_tokens: int, eos: int, streamer=None):
    """Left-padded batch generate, greedy, as a 2019-style server would call it."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), eos, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                       pad_token_id=eos, eos_token_id=eos, streamer=streamer)


def replay_generate(checkpoint: str, workload: list[dict], s: dict, batch_size: int) -> dict:
    """FIFO over `generate`: each call takes up to `batch_size` requests that have arrived and
    runs to the longest max_tokens among them; the next call starts when this one returns.
    batch_size 1 is the one-request-at-a-time server."""
    model = _load_hf_model(checkpoint, s.get("dtype", "float32"))
    eos = model.config.eos_token_id
    _generate(model, [list(range(16)), list(range(8))], 4, eos)  # warm-up, untimed

    recs = _records(workload)
    pending = deque(workload)
    reset = _reset_peak_rss()
    t0 = time.perf_counter()
    batches = []
    while pending:
        now = time.perf_counter() - t0
        if pending[0]["arrival_s"] > now:
            _sleep_until(t0 + pending[0]["arrival_s"])
            continue
        batch = []
        while pending and len(batch) < batch_size and pending[0]["arrival_s"] <= now:
            batch.append(pending.popleft())
        timer = _StepTimer(t0)
        _generate(model, [w["prompt"] for w in batch], max(w["max_tokens"] for w in batch), eos, timer)
        batches.append(len(batch))
        for row, w in enumerate(batch):
            # The row's own answer ends at its max_tokens or at its first EOS; the steps after that
            # are padding the static batch pays for, not tokens the request receives.
            n = 0
            for step_tokens in timer.tokens[: w["max_tokens"]]:
                n += 1
                if step_tokens[row] == eos:
                    break
            r = recs[w["id"]]
            r["tokens"] = n
            r["first"] = timer.times[0]
            r["finish"] = timer.times[n - 1]
            r["finish_reason"] = "stop" if timer.tokens[n - 1][row] == eos else "length"
    return {"records": list(recs.values()), "peak_reset": reset, "batch_sizes": batches}


# ---- transformers' own continuous batching --------------------------------------------------


def replay_hf_continuous(checkpoint: str, workload: list[dict], s: dict) -> dict:
    """`model.init_continuous_batching()` started once and fed requests as they arrive.

    Sized like our engine: room for max_batch_size sequences of max_seq_len tokens in the paged
    cache, at most max_batch_size requests per step. Its tokens-per-step budget is its own
    default unless `s["hf_max_batch_tokens"]` is set. Called outside inference_mode: inside it,
    transformers 5.23 fails with "Inplace update to inference tensor outside InferenceMode".
    """
    from transformers import ContinuousBatchingConfig, GenerationConfig

    model = _load_hf_model(checkpoint, s.get("dtype", "float32"))
    eos = model.config.eos_token_id
    page = 256
    cb_config = ContinuousBatchingConfig(
        page_size=page,
        num_blocks=s["max_batch_size"] * s["max_seq_len"] // page,
        max_requests_per_batch=s["max_batch_size"],
        max_batch_tokens=s.get("hf_max_batch_tokens"),
    )
    gen_config = GenerationConfig(do_sample=False, max_new_tokens=s["max_tokens"], eos_token_id=eos,
                                  pad_token_id=eos)
    manager = model.init_continuous_batching(generation_config=gen_config, continuous_batching_config=cb_config)
    manager.warmup()
    manager.start()
    try:
        manager.add_request(list(range(16)), request_id="warmup", max_new_tokens=4)
        while True:
            out = manager.get_result(timeout=60)
            if out is None or out.is_finished():
                break

        recs = _records(workload)
        reset = _reset_peak_rss()
        t0 = time.perf_counter()
        failed: list[str] = []

        def feed() -> None:
            for w in workload:
                _sleep_until(t0 + w["arrival_s"])
                if manager.add_request(w["prompt"], request_id=w["id"], max_new_tokens=w["max_tokens"],
                                       record_timestamps=True) is None:
                    failed.append(w["id"])

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        done = 0
        while done < len(workload) - len(failed):
            out = manager.get_result(timeout=1)
            if out is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' continuous batching loop stopped")
                continue
            if not out.is_finished() or out.request_id not in recs:
                continue
            done += 1
            r = recs[out.request_id]
            if out.error:
                r["error"] = out.error
                continue
            stamps = [x - t0 for x in (out.timestamps or [])]
            r["tokens"] = len(out.generated_tokens)
            if stamps:
                r["first"], r["finish"] = stamps[0], stamps[-1]
            r["finish_reason"] = "stop" if out.generated_tokens and out.generated_tokens[-1] == eos else "length"
        feeder.join()
        resolved = {k: getattr(manager.continuous_batching_config, k, None)
                    for k in ("num_blocks", "max_batch_tokens", "max_requests_per_batch")}
        attn = model.config._attn_implementation
    finally:
        manager.stop(block=True, timeout=30)
    return {"records": list(recs.values()), "peak_reset": reset, "hf_config": resolved,
            "attn_implementation": attn}


# ---- the child process ----------------------------------------------------------------------


def run_system(system: str, checkpoint: str, workload: list[dict], settings: dict) -> dict:
    """Replay the workload on one system in this process; add its memory figures."""
    import torch

    torch.set_num_threads(settings["threads"])
    started = time.perf_counter()
    if system == OURS:
        out = replay_quill(checkpoint, workload, settings)
    elif system == SERIAL:
        out = replay_generate(checkpoint, workload, settings, batch_size=1)
    elif system == STATIC:
        out = replay_generate(checkpoint, workload, settings, batch_size=settings["max_batch_size"])
    elif system == CB:
        out = replay_hf_continuous(checkpoint, workload, settings)
    else:
        raise ValueError(f"unknown system {system!r}; choose from {SYSTEMS}")
    out.update(
        system=system,
        threads=torch.get_num_threads(),
        phase_s=round(time.perf_counter() - started, 1),
        # Whole-process high-water mark: since the replay began when the reset worked
        # (model, warm-up leftovers and the replay's own working set), else since start-up.
        peak_rss_mib=round(_status_kib("VmHWM") / 1024, 1),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", ""),
    )
    return out


def child_main(system: str, checkpoint: str, workload: list[dict], settings: dict, conn) -> None:
    """Entry point of a spawned child: run one system, send the result (or the error) back."""
    try:
        conn.send(run_system(system, checkpoint, workload, settings))
    except BaseException as exc:  # the parent reports it and goes on with the next system
        import traceback

        conn.send({"system": system, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
    finally:
        conn.close()
