"""Loading the policy: built from config (seeded) or from a local HF folder; device choice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

from nexrl_async.config.model import BuiltModel, CharTokenizer, PretrainedModel, PretrainedTokenizer
from nexrl_async.config.training import AlgorithmConfig, OptimConfig, TrainerConfig
from nexrl_async.core.errors import ConfigError
from nexrl_async.train.build import save_model_dir
from nexrl_async.train.model_loading import frozen_copy, load_policy, resolve_device
from nexrl_async.train.spec import TrainerSpec
from nexrl_async.train.trainer import Trainer

TINY = BuiltModel(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_built_models_are_seeded_and_use_the_config_dtype() -> None:
    a, tok = load_policy(TINY, CharTokenizer(alphabet="0123+"), seed=7)
    b, _ = load_policy(TINY, CharTokenizer(alphabet="0123+"), seed=7)
    c, _ = load_policy(TINY, CharTokenizer(alphabet="0123+"), seed=8)
    assert _same(a, b)
    assert not _same(a, c)
    assert a.get_input_embeddings().weight.shape[0] == len(tok) == 9
    assert not a.training
    half, _ = load_policy(TINY, CharTokenizer(), seed=0, dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_pretrained_folders_load_with_their_own_or_a_separate_tokenizer(tmp_path: Path) -> None:
    model, tok = load_policy(TINY, CharTokenizer(), seed=1)
    save_model_dir(model, tok, tmp_path / "m")
    loaded, loaded_tok = load_policy(PretrainedModel(path=str(tmp_path / "m")), None, seed=99)
    assert _same(model, loaded)
    assert loaded_tok.pad_token_id == tok.pad_token_id
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    _, custom = load_policy(
        PretrainedModel(path=str(tmp_path / "m")),
        PretrainedTokenizer(path=str(tmp_path / "m"), chat_template=template),
        seed=0,
    )
    assert custom.chat_template == template


def test_load_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no config\.json"):
        load_policy(PretrainedModel(path=str(tmp_path)), CharTokenizer(), seed=0)
    with pytest.raises(ConfigError, match="tokenizer"):
        load_policy(TINY, None, seed=0)
    model, tok = load_policy(TINY, CharTokenizer(), seed=0)
    save_model_dir(model, tok, tmp_path / "m")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="cannot load a tokenizer"):
        load_policy(
            PretrainedModel(path=str(tmp_path / "m")),
            PretrainedTokenizer(path=str(tmp_path / "empty")),
            seed=0,
        )


def test_device_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            resolve_device("cuda")


def test_reference_is_a_frozen_independent_copy() -> None:
    model, _ = load_policy(TINY, CharTokenizer(), seed=0)
    ref = frozen_copy(model, on_cpu=True)
    assert _same(model, ref)
    assert not any(p.requires_grad for p in ref.parameters())
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert not _same(model, ref)


def test_from_spec_sets_torch_threads() -> None:
    before = torch.get_num_threads()
    try:
        spec = TrainerSpec(
            model=TINY,
            tokenizer=CharTokenizer(),
            algorithm=AlgorithmConfig(),
            optim=OptimConfig(),
            trainer=TrainerConfig(threads=2, device="cpu"),
            seed=0,
            max_new_tokens=4,
        )
        Trainer.from_spec(spec)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _custom_tokenizer() -> PreTrainedTokenizerFast:
    """A character tokenizer whose vocabulary holds space and newline as themselves: no
    pre-tokenizer, so text reaches the model unsplit (a byte-level one would spell them
    ``Ġ`` and ``Ċ``, which this vocabulary lacks)."""
    specials = ["<pad>", "<bos>", "<eos>"]
    vocab = {t: i for i, t in enumerate([*specials, *"0123456789 \nabc"])}
    core = Tokenizer(BPE(vocab=vocab, merges=[], unk_token=None))
    core.decoder = decoders.Fuse()
    core.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )


def test_a_custom_tokenizer_in_a_qwen2_folder_loads_as_saved(tmp_path: Path) -> None:
    from nexrl_async.inference.local.weights import load_model
    from nexrl_async.train.build import build_model

    tok = _custom_tokenizer()
    text = "12 ab\n3 c\n\n 4"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    model = build_model(
        TINY, vocab_size=len(tok), seed=0, pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    folder = save_model_dir(model, tok, tmp_path / "m")
    assert '"model_type": "qwen2"' in (folder / "config.json").read_text()
    _, trainer_tok = load_policy(PretrainedModel(path=str(folder)), None, seed=0)
    served_tok = load_model(folder, device="cpu", dtype="float32").tokenizer
    for loaded in (trainer_tok, served_tok):
        assert loaded.encode(text, add_special_tokens=False) == ids
        assert loaded.decode(ids) == text
        assert loaded.eos_token_id == 2
