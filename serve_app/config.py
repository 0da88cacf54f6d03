"""The model registry (models/registry.yaml): one pydantic schema, loaded in one place.

`load_registry(path)` is the only way the rest of Quill reads a registry. A bad file is refused
before anything starts, with one line per problem naming the file, the model and the field:

    models/registry.yaml: model 'quill-base': engine.max_token: unknown field (did you mean 'max_tokens'?)

Every section forbids unknown keys, because a typo that is silently ignored (``max_token``)
would leave a model running with a default nobody asked for.
"""
from __future__ import annotations

import difflib
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeFloat, ValidationError, ValidationInfo,
                      field_validator, model_validator)

# The request types only: the engine's torch half is imported late (`engine_config`).
from serve_app.engine.types import MAX_OPENAI_PENALTY, MAX_REPETITION_PENALTY

DEFAULT_REGISTRY = "models/registry.yaml"

# `hf://gpt2`, `s3://bucket/x`, `gs://...`: remote, fetched by the replica that loads it
# (serve_app/weights.py), so only the scheme is checked here. Anything without one is a local path.
_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_remote(source: str) -> bool:
    return bool(_URI.match(source))


def _known_scheme(uri: str) -> str:
    """`uri` if fsspec (or transformers, for hf://) knows its scheme; s3fs/gcsfs are not imported."""
    # fsspec's registry module costs ~0.1 s and is only imported for registries naming a URI.
    from fsspec.registry import known_implementations, registry

    scheme = uri.split("://", 1)[0]
    known = {"hf", *known_implementations, *registry}
    if scheme not in known:
        close = difflib.get_close_matches(scheme, sorted(known), n=1)
        hint = f"did you mean '{close[0]}://'?" if close else "use a local path, hf://, s3://, gs:// or another fsspec protocol"
        raise ValueError(f"unknown URI scheme '{scheme}://' ({hint})")
    return uri


class RegistryError(ValueError):
    """The registry file cannot be served. `problems` holds one message per fault."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        super().__init__("\n".join(problems))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Autoscaling(_Section):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    # Ray Serve adds replicas when the mean number of requests in flight per replica exceeds
    # this. A replica batches up to engine.max_batch_size sequences, so keep them close.
    target_ongoing_requests: float = Field(16, gt=0)
    # How long the load must stay above (below) the target before Serve adds (removes) a
    # replica, and the window it is averaged over. Unset: Ray Serve's defaults (30, 600, 30 s).
    upscale_delay_s: float | None = Field(None, ge=0)
    downscale_delay_s: float | None = Field(None, ge=0)
    # Serve requires the window to exceed its 10 s metrics interval (a warning in Ray 2.60, an
    # error in later releases): refused here, naming the field, rather than there.
    look_back_period_s: float | None = Field(None, gt=10)

    @model_validator(mode="after")
    def _min_le_max(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is greater than max_replicas ({self.max_replicas})"
            )
        return self


class EngineSection(_Section):
    max_batch_size: int = Field(16, ge=1)
    max_seq_len: int = Field(1024, ge=2)
    max_waiting: int = Field(256, ge=0)
    max_prefill_tokens: int = Field(256, ge=1)
    # torch intra-op threads per replica. None: derived from cpus_per_replica, so replicas
    # sharing a small box do not oversubscribe its cores (see docs/registry.md).
    threads: int | None = Field(None, ge=1)
    # Prompt tokens whose keys and values are kept for later requests that start the same way
    # (a writer resending a growing document); 0 turns the cache off. See docs/engine.md.
    prefix_cache_tokens: int = Field(2048, ge=0)
    # Messages per second a replica streams to all its requests together: each request's
    # tokens after its first go out every (requests streaming / this) seconds, the steps in
    # between together. Every message costs the proxy, the ingress and Ray CPU that the engine
    # shares on a small box; a lone writer still gets every step. 0: every step, always.
    # See docs/performance.md ("Where the end-to-end path lost").
    stream_messages_per_s: float = Field(64.0, ge=0)


class Defaults(_Section):
    """Sampling values a request takes when it leaves them out; every field is a request
    parameter of the same name (serve_app/protocol.py)."""

    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.8, ge=0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    min_p: float = Field(0.0, ge=0, le=1)
    # Repetition guards, off by default; a model that loops can ship with one on.
    frequency_penalty: float = Field(0.0, ge=-MAX_OPENAI_PENALTY, le=MAX_OPENAI_PENALTY)
    presence_penalty: float = Field(0.0, ge=-MAX_OPENAI_PENALTY, le=MAX_OPENAI_PENALTY)
    repetition_penalty: float = Field(1.0, gt=0, le=MAX_REPETITION_PENALTY)


class Limits(_Section):
    max_prompt_tokens: int = Field(768, ge=1)
    max_tokens: int = Field(512, ge=1)
    max_n: int = Field(8, ge=1)
    # Prompts in one /v1/completions request (OpenAI's batched shape; docs/api.md). Each is its
    # own request to the engine, so a batch is bounded like that many clients: the queue
    # (engine.max_waiting) refuses what it cannot hold. 32 takes LangChain's batches of 20.
    max_prompts: int = Field(32, ge=1)


# Settings for every process that runs the engine, read by torch's native libraries (libgomp, its
# OpenMP, when torch loads; c10's allocator at its first allocation), so they are set before torch
# loads (this module does not import torch): in `quill serve` before Ray starts its workers, in the
# benchmarks before their peers start, so that both measure the same thing. A value already set
# wins.
TORCH_ENV = {
    # An idle worker sleeps instead of spinning for its default 3 ms, which on a small box
    # steals the core another replica, the ingress or the proxy needs.
    "OMP_WAIT_POLICY": "PASSIVE",
    # ...but first it spins a while (libgomp lets the count override PASSIVE), about 0.1 ms:
    # long enough to catch the next op of the same step without a futex wake-up each (a step
    # has a few hundred parallel ops), short enough to sleep through the gaps between steps.
    # In a replica the Python between two ops is often slower than in-process (the GIL, Ray's
    # threads), and a spin of 1000 ran out: the worker slept 9,000 times in a 32-writer burst
    # (bf16 gpt2-small, the 2-core EPYC) against 1,500-2,200 with 10000, at the same replica
    # CPU (5.0-5.5 CPU-s a burst), and the bursts ran at 675-730 tokens/s against 568-642 (four
    # and eight). In-process the engine gained 2-3% (846-861 against 832-833). 3000 gave 644-701;
    # 30000 713-742, within the spread of 10000. Before HAProxy took the HTTP path (Serve's
    # Python proxy in the replica's way) 10000 had cost `quill serve` more than it gained
    # (docs/performance.md).
    "GOMP_SPINCOUNT": "10000",
    # Tensors of 2 MiB and more go on transparent huge pages (madvise; the kernel's default mode
    # gives them none unless asked): a step reads every weight and each sequence's cache, and with
    # 4 KiB pages that is hundreds of thousands of page-table entries, each TLB miss a two-level
    # walk in a virtual machine. On the 2-core EPYC (a VM) an in-process burst of 32 writers, bf16
    # gpt2-small, gave 794 against 758 tokens/s (four alternating pairs of processes, five bursts
    # each; 1.5 GB of the 2.3 GB resident on huge pages, the same resident size).
    "THP_MEM_ALLOC_ENABLE": "1",
}


def set_torch_env() -> None:
    """`TORCH_ENV` into this process's environment, keeping what is already there."""
    for key, value in TORCH_ENV.items():
        os.environ.setdefault(key, value)


_RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


class ModelEntry(_Section):
    # Also the URL postfix (/v1/models/{name}/generate) and the Ray Serve deployment name.
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    source: str = Field(min_length=1)
    adapter: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bfloat16 where the hardware computes in it (CPUs with AVX512-BF16 or AMX, GPUs),
    # float32 elsewhere (serve_app/engine/loader.py `auto_dtype`).
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    gpus_per_replica: float = Field(0, ge=0)
    # Logical CPUs Ray reserves per replica. Unset: a local `quill serve` shares the machine's
    # CPUs among the models that leave it unset (`share_cpus`); elsewhere Ray's default of 1.
    cpus_per_replica: float | None = Field(None, gt=0)
    # Custom Ray resources each replica reserves, e.g. {quill-gpu-node: 1}: replicas then run
    # only on nodes started with that resource (`ray start --resources`, a KubeRay worker group).
    resources: dict[str, NonNegativeFloat] = Field(default_factory=dict)
    autoscaling: Autoscaling = Autoscaling()
    engine: EngineSection = EngineSection()
    defaults: Defaults = Defaults()
    limits: Limits = Limits()

    @field_validator("source", "adapter")
    @classmethod
    def _resolve_local(cls, value: str | None, info: ValidationInfo) -> str | None:
        # Relative local paths are relative to the registry file, not to wherever `quill
        # serve` was started, so the same file works from any directory (and in a container).
        if value is None:
            return value
        if is_remote(value):
            return _known_scheme(value)
        base = (info.context or {}).get("base_dir")
        path = Path(os.path.expanduser(value))
        if base is not None and not path.is_absolute():
            path = Path(base) / path
        if base is not None and not path.exists():
            raise ValueError(f"local path {path} does not exist")
        if base is not None and not path.is_dir():  # refused here, not by a replica after Ray has started
            raise ValueError(f"local path {path} is a file; name the folder that save_pretrained wrote")
        if (base is not None and info.field_name == "source" and (path / "adapter_config.json").is_file()
                and not (path / "config.json").is_file()):
            raise ValueError(f"{path} is a LoRA adapter, not a model: name it as `adapter` and set `source` "
                             "to the base it was trained on")
        return str(path.resolve()) if base is not None else value

    @field_validator("resources")
    @classmethod
    def _custom_resources(cls, value: dict[str, NonNegativeFloat]) -> dict[str, NonNegativeFloat]:
        for key in value:
            if key in _RAY_BUILTIN_RESOURCES:
                raise ValueError(f"{key!r} is Ray's own resource: use cpus_per_replica / gpus_per_replica")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ModelEntry:
        problems = []
        if self.defaults.max_tokens > self.limits.max_tokens:
            problems.append(
                f"defaults.max_tokens ({_given(self.defaults, 'max_tokens')}) is greater than "
                f"limits.max_tokens ({_given(self.limits, 'max_tokens')})"
            )
        if self.limits.max_prompt_tokens >= self.engine.max_seq_len:
            problems.append(
                f"limits.max_prompt_tokens ({_given(self.limits, 'max_prompt_tokens')}) leaves no room to "
                f"generate within engine.max_seq_len ({_given(self.engine, 'max_seq_len')})"
            )
        if self.limits.max_n > self.engine.max_batch_size:
            problems.append(
                f"limits.max_n ({_given(self.limits, 'max_n')}) is greater than "
                f"engine.max_batch_size ({_given(self.engine, 'max_batch_size')})"
            )
        if self.device == "cuda" and self.gpus_per_replica == 0:
            problems.append("device is cuda but gpus_per_replica is 0: the replica would see no GPU")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def cpus(self) -> float:
        """Logical CPUs Ray reserves for one replica."""
        return 1.0 if self.cpus_per_replica is None else self.cpus_per_replica

    @property
    def threads(self) -> int:
        """torch threads for one replica: the logical CPUs Ray reserves for it, rounded half up
        (the ingress's tenth of a CPU must not cost a one-model box its second core)."""
        if self.engine.threads is not None:
            return self.engine.threads
        return max(1, math.floor(self.cpus + 0.5))

    def engine_config(self):
        """The engine's own config for this entry (imported late: the engine pulls in torch)."""
        from serve_app.engine import EngineConfig

        return EngineConfig(
            source=self.source,
            adapter=self.adapter,
            device=self.device,
            dtype=self.dtype,
            max_batch_size=self.engine.max_batch_size,
            max_seq_len=self.engine.max_seq_len,
            max_waiting=self.engine.max_waiting,
            max_prompt_tokens=self.limits.max_prompt_tokens,
            max_tokens=self.limits.max_tokens,
            max_n=self.limits.max_n,
            max_prefill_tokens=self.engine.max_prefill_tokens,
            threads=self.threads,
            prefix_cache_tokens=self.engine.prefix_cache_tokens,
            stream_messages_per_s=self.engine.stream_messages_per_s,
        )


class Registry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    models: list[ModelEntry] = Field(min_length=1)

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelEntry]) -> list[ModelEntry]:
        problems = _duplicate_names([m.name for m in models])
        if problems:
            raise ValueError(problems[0])
        return models

    def get(self, name: str) -> ModelEntry | None:
        return next((m for m in self.models if m.name == name), None)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]


def _given(section: BaseModel, name: str) -> str:
    """A field's value as a problem quotes it, saying when the registry left it at its default
    (a user who never wrote it must know which one to set)."""
    value = getattr(section, name)
    return f"{value}" if name in section.model_fields_set else f"{value}, its default"


# Field names per section, for "did you mean" hints on unknown keys.
_SECTIONS: dict[str, type[BaseModel]] = {
    "": Registry,
    "model": ModelEntry,
    "autoscaling": Autoscaling,
    "engine": EngineSection,
    "defaults": Defaults,
    "limits": Limits,
}


def _describe(err: dict[str, Any], raw: Any, label: str) -> str:
    loc = list(err["loc"])
    where = label
    if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
        index = loc[1]
        name = None
        if isinstance(raw, dict) and isinstance(raw.get("models"), list) and index < len(raw["models"]):
            entry = raw["models"][index]
            name = entry.get("name") if isinstance(entry, dict) else None
        named = isinstance(name, str) and sum(isinstance(m, dict) and m.get("name") == name for m in raw["models"]) == 1
        where += f": model {name!r}" if named else f": model #{index + 1}" + (f" ({name!r})" if isinstance(name, str) else "")
        loc = loc[2:]
    field = ".".join(str(p) for p in loc)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        section = _SECTIONS.get(str(loc[0]) if len(loc) > 1 else ("model" if where != label else ""))
        known = list(section.model_fields) if section else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        msg = "unknown field" + (f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})")
    elif err["type"] == "missing":
        msg = "required field is missing"
    elif err["type"] == "model_type":  # a section given as something else (an empty `engine:` is null)
        msg = "must be a mapping of its fields (leave the section out for its defaults)"
    elif err["type"] == "string_pattern_mismatch" and loc == ["name"]:
        msg = ("must be 1 to 64 ASCII letters, digits, '.', '_' or '-', starting with a letter or digit "
               "(it names the model in URLs and in Ray Serve)")
    return f"{where}: {field}: {msg}" if field else f"{where}: {msg}"


# The ingress only routes and frames; it reserves a sliver of a CPU so it never crowds out a
# model (Ray Serve's default of one CPU per replica would on a 2-core box leave the second
# model unschedulable and the app waiting forever).
INGRESS_CPUS = 0.1


def required_cpus(registry: Registry) -> float:
    """Logical CPUs the app needs to start: the ingress plus every model's first replicas."""
    return INGRESS_CPUS + sum(max(1, m.autoscaling.min_replicas) * m.cpus for m in registry.models)


MIN_SHARED_CPUS = 0.25  # below this a replica's one torch thread would starve anyway


def share_cpus(registry: Registry, num_cpus: float) -> Registry:
    """The registry with `cpus_per_replica` filled in where it was left unset: an equal share,
    per replica at max_replicas, of the CPUs the ingress and the other models leave. One model
    on a 2-core box gets 1.9 CPUs and two torch threads; two models get 0.95 and one thread
    each, so they do not oversubscribe the cores. Measured through `quill serve` (gpt2-small
    shape, 32 streaming writers): 131 tokens/s with one thread, 168 with two."""
    unset = [m for m in registry.models if m.cpus_per_replica is None]
    if not unset:
        return registry
    taken = INGRESS_CPUS + sum(max(1, m.autoscaling.min_replicas) * m.cpus for m in registry.models
                               if m.cpus_per_replica is not None)
    replicas = sum(m.autoscaling.max_replicas for m in unset)
    share = max(MIN_SHARED_CPUS, math.floor((num_cpus - taken) / replicas * 100) / 100)
    models = [m.model_copy(update={"cpus_per_replica": share}) if m.cpus_per_replica is None else m
              for m in registry.models]
    return registry.model_copy(update={"models": models})


def required_gpus(registry: Registry) -> float:
    """GPUs the app needs to start: every model's first replicas."""
    return sum(max(1, m.autoscaling.min_replicas) * m.gpus_per_replica for m in registry.models)


def parse_registry(data: Any, base_dir: str | os.PathLike | None, label: str = "<registry>") -> Registry:
    """Validate an already-parsed registry (e.g. the `args` of a KubeRay serveConfigV2)."""
    if not isinstance(data, dict):
        raise RegistryError(label, [f"{label}: expected a mapping with a 'models' list"])
    try:
        return Registry.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        problems = [_describe(e, data, label) for e in exc.errors()]
        # Pydantic checks the names only once every entry is valid: say it beside the rest.
        entries = data.get("models") if isinstance(data.get("models"), list) else []
        names = [m.get("name") if isinstance(m, dict) else None for m in entries]
        for duplicate in _duplicate_names(names):
            if not any(duplicate in p for p in problems):
                problems.append(f"{label}: models: {duplicate}")
        raise RegistryError(label, problems) from None


def _duplicate_names(names: list) -> list[str]:
    seen: dict[str, int] = {}
    problems = []
    for i, name in enumerate(names):
        if isinstance(name, str) and name in seen:
            problems.append(f"duplicate model name {name!r} (entries {seen[name] + 1} and {i + 1})")
        elif isinstance(name, str):
            seen[name] = i
    return problems


class _RegistryLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping: plain YAML keeps the
    last one silently, so a second `source:` in an entry would serve another checkpoint than
    the first one names. Keys a merge (`<<: *defaults`) brings in may still be overridden."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"{key!r} is given twice in one mapping (lines {seen[key] + 1} and "
                            f"{key_node.start_mark.line + 1}); keep one", key_node.start_mark)
                    seen[key] = key_node.start_mark.line
                except TypeError:  # an unhashable key: SafeLoader refuses it itself
                    continue
        return super().construct_mapping(node, deep)


def load_registry(path: str | os.PathLike = DEFAULT_REGISTRY, *, check_paths: bool = True) -> Registry:
    """Read and validate a registry file; raise RegistryError naming the file, model and field.
    `check_paths=False`: local sources are kept as written, neither resolved nor checked (for a
    registry whose paths resolve elsewhere, such as in a cluster's image)."""
    label = str(path)
    p = Path(path)
    if not p.is_file():
        raise RegistryError(label, [f"{label}: registry file not found"])
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_RegistryLoader)
    except yaml.YAMLError as exc:
        raise RegistryError(label, [f"{label}: not valid YAML: {exc}"]) from None
    except UnicodeDecodeError as exc:  # e.g. UTF-16, what PowerShell's `>` writes
        raise RegistryError(label, [f"{label}: not UTF-8 text (byte {exc.start}); save it as UTF-8"]) from None
    except OSError as exc:
        raise RegistryError(label, [f"{label}: cannot be read ({exc.strerror or exc})"]) from None
    return parse_registry(data, p.resolve().parent if check_paths else None, label)
