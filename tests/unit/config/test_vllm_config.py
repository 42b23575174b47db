"""``inference.backend = "vllm"``: the variant, attach by ``api``, weights resolved per backend,
and the checks that refuse what vLLM cannot do (tied embeddings on a CPU disk reload, the
distributed transport)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nexrl_async.config.inference import (
    AttachInference,
    VLLMInference,
    WeightsConfig,
    resolve_weights,
)
from nexrl_async.config.loader import load_recipe
from nexrl_async.config.preflight import preflight
from nexrl_async.core.errors import ConfigError

UNTIED = "[model]\ntie_word_embeddings = false\n"


def test_the_vllm_variant_loads_with_its_launch_fields(write) -> None:
    path = write(
        'extends = "base.toml"\n' + UNTIED + '[inference]\nbackend = "vllm"\n'
        'python = "/v/bin/python"\ndtype = "float32"\nmax_model_len = 32\n'
    )
    inference = load_recipe(path).config.inference
    assert isinstance(inference, VLLMInference)
    assert (inference.python, inference.dtype, inference.max_model_len) == (
        "/v/bin/python", "float32", 32,
    )  # fmt: skip
    assert inference.device == "cpu"


def test_python_can_be_set_from_the_command_line(write) -> None:
    path = write('extends = "base.toml"\n' + UNTIED + '[inference]\nbackend = "vllm"\n')
    loaded = load_recipe(path, overrides=["inference.python=/opt/v/bin/python"])
    assert isinstance(loaded.config.inference, VLLMInference)
    assert loaded.config.inference.python == "/opt/v/bin/python"


def test_attach_names_the_api_the_servers_speak(write) -> None:
    path = write(
        'extends = "base.toml"\n' + UNTIED + '[inference]\nbackend = "attach"\n'
        'urls = ["http://h:8000"]\napi = "vllm"\n'
    )
    inference = load_recipe(path).config.inference
    assert isinstance(inference, AttachInference)
    assert inference.api == "vllm"


def test_an_unknown_backend_names_the_field_and_the_known_ones(write) -> None:
    path = write('extends = "base.toml"\n[inference]\nbackend = "trtllm"\n')
    with pytest.raises(ConfigError, match=r"inference.backend = \"trtllm\": .*'vllm'") as err:
        load_recipe(path)
    assert err.value.path == "inference.backend"


def test_tied_embeddings_are_refused_for_a_cpu_vllm_server(write) -> None:
    path = write('extends = "base.toml"\n[inference]\nbackend = "vllm"\n')  # tied by default
    with pytest.raises(ConfigError, match=r"model\.tie_word_embeddings = true") as err:
        load_recipe(path)
    assert err.value.path == "model.tie_word_embeddings"
    attach = write(
        'extends = "base.toml"\n[inference]\nbackend = "attach"\nurls = ["http://h:1"]\n'
        'api = "vllm"\n'
    )
    with pytest.raises(ConfigError, match=r"model\.tie_word_embeddings"):
        load_recipe(attach)


def test_tied_embeddings_are_fine_elsewhere(write) -> None:
    load_recipe(write('extends = "base.toml"\n[inference]\nbackend = "local"\n'))
    gpu = write('extends = "base.toml"\n[inference]\nbackend = "vllm"\ndevice = "cuda"\n')
    load_recipe(gpu)  # unverified on GPU, not refused


def test_the_distributed_transport_is_refused_for_vllm(write) -> None:
    path = write(
        'extends = "base.toml"\n' + UNTIED + '[inference]\nbackend = "vllm"\n'
        '[weights]\ntransport = "distributed"\n'
    )
    with pytest.raises(ConfigError, match="no weight-transfer engine") as err:
        load_recipe(path)
    assert err.value.path == "weights.transport"


@pytest.mark.parametrize(
    "inference", ['backend = "vllm"', 'backend = "attach"\nurls = ["http://h:1"]']
)
def test_the_shared_transport_is_refused_beyond_local_servers(write, inference: str) -> None:
    path = write(
        f'extends = "base.toml"\n{UNTIED}[inference]\n{inference}\n'
        '[weights]\ntransport = "shared"\n'
    )
    with pytest.raises(ConfigError, match=r'needs inference\.backend = "local"') as err:
        load_recipe(path)
    assert err.value.path == "weights.transport"


def test_a_pretrained_folder_with_tied_embeddings_is_refused_by_preflight(
    write, recipe_dir: Path
) -> None:
    model = recipe_dir / "hf"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    text = (
        '[model]\nkind = "pretrained"\npath = "hf"\n[tokenizer]\nkind = "chars"\n'
        '[data]\nkind = "jsonl"\npath = "train.jsonl"\n'
        '[rollout]\nevaluator = "evaluator.py:Evaluator"\n[inference]\nbackend = "vllm"\n'
    )
    loaded = load_recipe(write(text))
    with pytest.raises(ConfigError, match="ties the word embeddings") as err:
        preflight(loaded)
    assert err.value.path == "model.path"
    (model / "config.json").write_text(json.dumps({"tie_word_embeddings": False}))
    preflight(loaded)


@pytest.mark.parametrize(
    ("inference", "expected"),
    [
        (VLLMInference(), ("disk", "drain")),
        (AttachInference(urls=["http://h:1"], api="vllm"), ("disk", "drain")),
    ],
)
def test_auto_weights_for_vllm_are_disk_and_drain(
    inference: object, expected: tuple[str, str]
) -> None:
    resolved = resolve_weights(WeightsConfig(), inference)  # type: ignore[arg-type]
    assert (resolved.transport, resolved.inflight) == expected
