"""The registry schema: good files load, bad files are refused naming the file, model and field."""
from __future__ import annotations

import os
import textwrap

import pytest

from serve_app.config import RegistryError, load_registry, parse_registry, required_cpus, share_cpus


def write(tmp_path, body: str, name: str = "registry.yaml"):
    (tmp_path / "ckpt").mkdir(exist_ok=True)
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


GOOD = """
models:
  - name: tiny
    source: ckpt
    dtype: float32
    cpus_per_replica: 0.5
    autoscaling: {min_replicas: 1, max_replicas: 2, target_ongoing_requests: 8}
    engine: {max_batch_size: 8, max_seq_len: 256}
    defaults: {max_tokens: 16, temperature: 0.7, top_k: 40, top_p: 0.9, frequency_penalty: 0.5, repetition_penalty: 1.1}
    limits: {max_prompt_tokens: 128, max_tokens: 64, max_n: 4}
  - name: remote
    source: hf://gpt2
"""


def test_good_registry_resolves_relative_paths(tmp_path):
    reg = load_registry(write(tmp_path, GOOD))
    assert reg.names == ["tiny", "remote"]
    tiny = reg.get("tiny")
    assert tiny.source == str((tmp_path / "ckpt").resolve())  # relative to the registry file
    assert reg.get("remote").source == "hf://gpt2"  # remote sources are not checked
    assert tiny.threads == 1  # half a CPU still gets one thread
    cfg = tiny.engine_config()
    assert (cfg.max_batch_size, cfg.max_prompt_tokens, cfg.max_n, cfg.threads) == (8, 128, 4, 1)
    guards = tiny.defaults.frequency_penalty, tiny.defaults.presence_penalty, tiny.defaults.repetition_penalty
    assert guards == (0.5, 0.0, 1.1)  # a model can ship with a repetition guard on


def test_yaml_merge_keys_share_settings_and_may_be_overridden(tmp_path):
    # A key given twice is refused (below); one that a merge brings in may be overridden.
    path = write(tmp_path, """\
        models:
          - &small {name: a, source: ckpt, engine: {max_batch_size: 16}, cpus_per_replica: 0.5}
          - <<: *small
            name: b
            cpus_per_replica: 1
        """)
    a, b = load_registry(path).models
    assert (a.name, b.name) == ("a", "b") and a.engine.max_batch_size == b.engine.max_batch_size == 16
    assert (a.cpus_per_replica, b.cpus_per_replica) == (0.5, 1)


def test_a_source_that_is_a_file_is_refused_before_anything_starts(tmp_path):
    path = write(tmp_path, "models:\n  - name: tiny\n    source: ckpt/config.json\n")
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    with pytest.raises(RegistryError, match="model 'tiny': source: local path .*config.json is a file; name the folder"):
        load_registry(path)


def test_an_adapter_named_as_source_is_refused_with_the_fix(tmp_path):
    path = write(tmp_path, "models:\n  - name: tiny\n    source: ckpt\n")
    (tmp_path / "ckpt" / "adapter_config.json").write_text("{}")
    with pytest.raises(RegistryError, match="model 'tiny': source: .*ckpt is a LoRA adapter, not a model: name it as `adapter`"):
        load_registry(path)


def test_bucket_uris_are_accepted_without_loading_their_clients(tmp_path):
    # `quill render-k8s` loads registries too: no cloud SDK (or torch) just to read one.
    import subprocess
    import sys

    path = write(tmp_path, "models:\n  - name: a\n    source: s3://bucket/a\n    adapter: gs://bucket/lora\n"
                           "  - name: b\n    source: hf://gpt2\n")
    code = (f"import sys; from serve_app.config import load_registry; r = load_registry({str(path)!r}); "
            "print(r.models[0].source, r.models[0].adapter, r.models[1].source, "
            "sorted({'s3fs', 'gcsfs', 'botocore', 'torch'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.split() == ["s3://bucket/a", "gs://bucket/lora", "hf://gpt2", "[]"]


def test_threads_follow_cpus(tmp_path):
    reg = parse_registry({"models": [{"name": "m", "source": "hf://x", "cpus_per_replica": 2}]}, tmp_path)
    assert reg.models[0].threads == 2
    reg = parse_registry({"models": [{"name": "m", "source": "hf://x", "engine": {"threads": 3}}]}, tmp_path)
    assert reg.models[0].threads == 3


def _models(*entries: dict):
    return parse_registry({"models": [{"source": "hf://x", **e} for e in entries]}, None)


def test_one_model_that_sets_no_cpus_gets_the_whole_box():
    (m,) = share_cpus(_models({"name": "only"}), 2).models
    assert (m.cpus_per_replica, m.threads) == (1.9, 2)  # the ingress keeps its tenth


def test_models_that_set_no_cpus_share_what_the_others_leave():
    shared = share_cpus(_models({"name": "a"}, {"name": "b"}), 2)
    assert [(m.cpus_per_replica, m.threads) for m in shared.models] == [(0.95, 1), (0.95, 1)]
    mixed = share_cpus(_models({"name": "fixed", "cpus_per_replica": 0.5}, {"name": "free"},
                               {"name": "scaling", "autoscaling": {"min_replicas": 1, "max_replicas": 2}}), 4)
    assert [m.cpus_per_replica for m in mixed.models] == [0.5, 1.13, 1.13]  # (4 - 0.1 - 0.5) / 3 replicas
    assert required_cpus(mixed) <= 4


def test_without_a_local_share_a_replica_reserves_one_cpu():
    (m,) = _models({"name": "m"}).models
    assert m.cpus_per_replica is None and (m.cpus, m.threads) == (1.0, 1)


ENTRY = "  - name: tiny\n    source: ckpt\n"

# (registry body, substrings the single message must contain)
BAD = [
    pytest.param(ENTRY + "    engine: {max_token: 5}\n",
                 ["registry.yaml", "model 'tiny'", "engine.max_token", "unknown field"], id="unknown-nested-key"),
    pytest.param(ENTRY + "    limits: {max_token: 5}\n",
                 ["model 'tiny'", "limits.max_token", "did you mean 'max_tokens'"], id="typo-did-you-mean"),
    pytest.param(ENTRY + "    sorce: x\n", ["model 'tiny'", "sorce", "did you mean 'source'"], id="unknown-entry-key"),
    pytest.param(ENTRY + ENTRY, ["duplicate model name 'tiny'", "entries 1 and 2"], id="duplicate-name"),
    pytest.param(ENTRY + "    dtype: float64\n", ["model 'tiny'", "dtype", "auto", "float32", "bfloat16"], id="bad-dtype"),
    pytest.param(ENTRY + "    autoscaling: {min_replicas: 3, max_replicas: 2}\n",
                 ["model 'tiny'", "autoscaling", "min_replicas (3) is greater than max_replicas (2)"], id="min-gt-max"),
    pytest.param("  - name: tiny\n    source: no/such/dir\n",
                 ["model 'tiny'", "source", "no/such/dir does not exist"], id="missing-source"),
    pytest.param(ENTRY + "    adapter: missing-adapter\n",
                 ["model 'tiny'", "adapter", "missing-adapter does not exist"], id="missing-adapter"),
    pytest.param("  - name: tiny\n    source: foo://x\n",
                 ["model 'tiny'", "source", "unknown URI scheme 'foo://'", "fsspec"], id="unknown-uri-scheme"),
    pytest.param(ENTRY + "    adapter: gss://bucket/lora\n",
                 ["model 'tiny'", "adapter", "unknown URI scheme 'gss://'", "did you mean 'gs://'?"], id="typo-uri-scheme"),
    pytest.param("  - source: ckpt\n", ["model #1", "name", "required"], id="missing-name"),
    pytest.param("  - name: 'bad name/'\n    source: ckpt\n", ["name", "1 to 64 ASCII letters, digits"], id="bad-name"),
    pytest.param(ENTRY + "    engine:\n", ["model 'tiny'", "engine: must be a mapping"], id="empty-section"),
    pytest.param(ENTRY + "    source: other\n", ["registry.yaml", "'source' is given twice", "lines 3 and 4"],
                 id="key-given-twice"),
    pytest.param(ENTRY + "    device: tpu\n", ["model 'tiny'", "device"], id="bad-device"),
    pytest.param(ENTRY + "    cpus_per_replica: 0\n", ["cpus_per_replica", "greater than 0"], id="zero-cpus"),
    pytest.param(ENTRY + "    resources: {GPU: 1}\n", ["model 'tiny'", "resources", "use cpus_per_replica / gpus_per_replica"],
                 id="builtin-resource"),
    pytest.param(ENTRY + "    autoscaling: {upscale_delay: 1}\n", ["autoscaling.upscale_delay", "did you mean 'upscale_delay_s'"],
                 id="autoscaling-typo"),
    pytest.param(ENTRY + "    defaults: {max_tokens: 100}\n    limits: {max_tokens: 50}\n",
                 ["defaults.max_tokens (100) is greater than limits.max_tokens (50)"], id="default-over-limit"),
    pytest.param(ENTRY + "    limits: {max_tokens: 50}\n",
                 ["defaults.max_tokens (64, its default) is greater than limits.max_tokens (50)"], id="unwritten-default-over-limit"),
    pytest.param(ENTRY + "    device: cuda\n", ["device is cuda but gpus_per_replica is 0"], id="cuda-without-gpu"),
    pytest.param(ENTRY + "    defaults: {frequency_penalty: 3}\n",
                 ["model 'tiny'", "defaults.frequency_penalty", "less than or equal to 2"], id="penalty-out-of-range"),
    pytest.param(ENTRY + "    defaults: {repetition_penalty: 0}\n",
                 ["model 'tiny'", "defaults.repetition_penalty", "greater than 0"], id="repetition-penalty-zero"),
    pytest.param(ENTRY + "    defaults: {presence_penality: 1}\n",
                 ["defaults.presence_penality", "did you mean 'presence_penalty'"], id="penalty-typo"),
    pytest.param(ENTRY + "    limits: {max_n: 32}\n    engine: {max_batch_size: 16}\n",
                 ["limits.max_n (32) is greater than engine.max_batch_size (16)"], id="n-over-batch"),
]


@pytest.mark.parametrize("entries,expected", BAD)
def test_bad_registry_is_refused_with_a_precise_message(tmp_path, entries, expected):
    path = write(tmp_path, "models:\n" + entries)
    with pytest.raises(RegistryError) as info:
        load_registry(path)
    assert len(info.value.problems) == 1, info.value.problems
    message = str(info.value)
    assert message.startswith(str(path)), message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


@pytest.mark.parametrize(
    "body,expected",
    [
        ("models: []\n", "at least 1"),
        ("modles:\n  - name: x\n", "unknown field"),
        ("models: [\n", "not valid YAML"),
        ("- just a list\n", "expected a mapping"),
    ],
)
def test_bad_file_shapes(tmp_path, body, expected):
    with pytest.raises(RegistryError, match=expected):
        load_registry(write(tmp_path, body))


def test_missing_file(tmp_path):
    with pytest.raises(RegistryError, match="registry file not found"):
        load_registry(tmp_path / "nope.yaml")


def test_every_problem_is_reported(tmp_path):
    path = write(tmp_path, "models:\n" + ENTRY + "    dtype: int8\n    engine: {max_token: 1}\n")
    with pytest.raises(RegistryError) as info:
        load_registry(path)
    assert len(info.value.problems) == 2


def test_a_duplicate_name_is_reported_beside_other_problems_and_the_entries_told_apart(tmp_path):
    path = write(tmp_path, "models:\n" + ENTRY + ENTRY + "    cpus_per_replica: x\n")
    with pytest.raises(RegistryError) as info:
        load_registry(path)
    problems = info.value.problems
    assert len(problems) == 2, problems
    assert "model #2 ('tiny'): cpus_per_replica" in problems[0]
    assert "duplicate model name 'tiny' (entries 1 and 2)" in problems[1]


# --- `quill serve` refuses before anything starts (no Ray is started in these) ---

def _quill(*args, cwd=None, env_extra=None):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "serve_app.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env={**os.environ, **(env_extra or {})})


def test_quill_serve_refuses_a_bad_registry(tmp_path):
    path = write(tmp_path, "models:\n" + ENTRY + "    limits: {max_token: 5}\n")
    r = _quill("serve", "--registry", str(path))
    assert r.returncode == 2
    assert "limits.max_token: unknown field (did you mean 'max_tokens'?)" in r.stderr
    assert str(path) in r.stderr


def test_quill_serve_refuses_a_registry_that_cannot_fit(tmp_path):
    # b sets no CPUs, but what tiny leaves of the 2 is less than a replica's smallest share.
    path = write(tmp_path, "models:\n" + ENTRY + "    cpus_per_replica: 2\n  - name: b\n    source: ckpt\n")
    r = _quill("serve", "--registry", str(path), "--num-cpus", "2")
    assert r.returncode == 2
    assert "needs 2.35 logical CPUs" in r.stderr and "Ray has 2" in r.stderr
    assert "leaves cpus_per_replica unset, as 1 here do" in r.stderr and "at least 0.25" in r.stderr


def test_quill_serve_refuses_gpus_this_machine_lacks(tmp_path):
    path = write(tmp_path, "models:\n" + ENTRY + "    gpus_per_replica: 1\n")
    r = _quill("serve", "--registry", str(path), env_extra={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2
    assert "needs 1 GPUs" in r.stderr and "has 0" in r.stderr


def test_quill_serve_refuses_custom_resources_a_local_ray_lacks(tmp_path):
    path = write(tmp_path, "models:\n" + ENTRY + "    resources: {quill-gpu-node: 1}\n")
    r = _quill("serve", "--registry", str(path))
    assert r.returncode == 2
    assert "model 'tiny'" in r.stderr and "quill-gpu-node" in r.stderr and "--address" in r.stderr


def test_resources_and_autoscaling_delays_reach_the_serve_options(tmp_path):
    from serve_app.app import deployment_options

    entry = parse_registry({"models": [{"name": "m", "source": "hf://x", "resources": {"quill-gpu-node": 1},
                                        "autoscaling": {"max_replicas": 2, "upscale_delay_s": 2, "downscale_delay_s": 5}}]},
                           tmp_path).models[0]
    opts = deployment_options(entry)
    assert opts["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 0, "resources": {"quill-gpu-node": 1}}
    scaling = opts["autoscaling_config"]
    assert (scaling["upscale_delay_s"], scaling["downscale_delay_s"]) == (2, 5)
    assert "look_back_period_s" not in scaling  # unset: Serve's own default


def test_quill_help_and_unknown_command():
    assert "serve" in _quill("--help").stdout
    assert _quill("frobnicate").returncode == 2


def test_quill_serve_refuses_a_busy_port(tmp_path):
    import socket

    path = write(tmp_path, "models:\n" + ENTRY)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = _quill("serve", "--registry", str(path), "--port", str(s.getsockname()[1]))
    assert r.returncode == 2 and "already in use" in r.stderr


def test_torch_defaults_fill_what_is_unset_and_keep_what_the_user_set(monkeypatch):
    """`quill serve` and the benchmarks set these before torch loads; a value in the
    environment (a user's own OMP_WAIT_POLICY, say) is kept."""
    from serve_app.config import set_torch_env

    for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "THP_MEM_ALLOC_ENABLE"):
        monkeypatch.delenv(key, raising=False)
    set_torch_env()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and os.environ["GOMP_SPINCOUNT"] == "10000"
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.setenv("GOMP_SPINCOUNT", "0")
    set_torch_env()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE" and os.environ["GOMP_SPINCOUNT"] == "0"


def test_a_registry_that_is_not_utf8_is_refused_naming_the_file(tmp_path):
    """What PowerShell's `>` writes (UTF-16) was a UnicodeDecodeError traceback."""
    path = tmp_path / "registry.yaml"
    path.write_text("models:\n  - name: a\n    source: hf://gpt2\n", encoding="utf-16")
    with pytest.raises(RegistryError, match=rf"{path}: not UTF-8 text .*save it as UTF-8"):
        load_registry(path)
