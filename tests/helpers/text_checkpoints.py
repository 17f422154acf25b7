"""A tiny chat checkpoint as a downloaded snapshot looks: a random Qwen3 saved by transformers with a
byte-level BPE tokenizer trained here by `tokenizers`, a Qwen3-style chat template (with the
`enable_thinking` switch), tokenizer_config.json and generation_config.json (two eos ids); plus its
DeepSpec-layout DSpark, DFlash and EAGLE-3 drafts, and benchmark files in DeepSpec's JSONL format
({"turns": [...]} per line). `snapshot` builds the checkpoint and drafts once per test session
(read-only: tests write elsewhere)."""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from dspark import checkpoint
from dspark.config import DraftConfig
from dspark.draft.deepspec import DraftModel
from tests.helpers.eagle3 import save_eagle3_checkpoint, tiny_eagle3_draft

# Special tokens come after the trained vocabulary (the tiny targets' favourite ids 2..4 stay text).
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
VOCAB = 336  # the models' vocabulary: the tokenizer's 325 tokens and some never produced by encoding

# Qwen3's template, cut to what the tests exercise: system / user / assistant turns, a refusal of
# unknown roles through raise_exception, and the empty think block when enable_thinking is false.
QWEN3_STYLE_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('unknown role ' + message.role) }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

_CORPUS = ["def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
           "The quick brown fox jumps over the lazy dog. Natalia sold clips to 48 of her friends.",
           "What is 12 times 7? Write a function that reverses a string. Explain the answer."] * 20


@functools.lru_cache(maxsize=None)
def tokenizer_json() -> str:
    """A byte-level BPE (≈ 300 tokens) with SPECIALS appended, as tokenizer.json text."""
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(_CORPUS, trainers.BpeTrainer(vocab_size=320, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.add_special_tokens(SPECIALS)
    return hf.to_str()


def special_id(name: str) -> int:
    return tokenizers.Tokenizer.from_str(tokenizer_json()).token_to_id(name)


def qwen3_model(seed: int = 0) -> transformers.Qwen3ForCausalLM:
    """A tiny random Qwen3 over the tokenizer's vocabulary, weights ~ N(0, 1 / fan-in) so that its
    greedy text varies; LM-head rows 2..4 boosted so that the drafts below are accepted sometimes."""
    config = transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=40, intermediate_size=52, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=10, max_position_embeddings=512, rms_norm_eps=1e-6,
        eos_token_id=special_id("<|im_end|>"), tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = transformers.Qwen3ForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            z = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * z if "norm" in name else z / p.shape[-1] ** 0.5)
        model.lm_head.weight[2:5] *= 3
    return model


def chat_checkpoint(path: Path, *, template: str | None = "config") -> Path:
    """The snapshot in `path`: `qwen3_model()` saved by transformers, and `tokenizer_files`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qwen3_model().save_pretrained(path)
    return tokenizer_files(path, template=template)


def tokenizer_files(path: Path, *, template: str | None = "config", source: str = QWEN3_STYLE_TEMPLATE) -> Path:
    """tokenizer.json, tokenizer_config.json and generation_config.json in `path`, with the chat
    template `source` where `template` says: "config" (tokenizer_config.json's chat_template), "jinja"
    (a chat_template.jinja file) or None (no template at all)."""
    im_end, eot = special_id("<|im_end|>"), special_id("<|endoftext|>")
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(tokenizer_json())
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "bos_token": None, "add_bos_token": False, "clean_up_tokenization_spaces": False}
    if template == "config":
        config["chat_template"] = source
    elif template == "jinja":
        (path / "chat_template.jinja").write_text(source)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [im_end, eot]}))
    return path


def chat_drafts(root: Path, target) -> dict[str, Path]:
    """Untrained DeepSpec-layout drafts of `target`: method → directory (DSpark with Markov and
    confidence heads, DFlash without, EAGLE-3), LM-head rows 2..4 boosted like the target's."""
    dirs = {"dspark": root / "dspark-draft", "dflash": root / "dflash-draft", "eagle3": root / "eagle3-draft"}
    for method, rank in (("dspark", 6), ("dflash", 0)):
        config = DraftConfig.tiny(vocab_size=VOCAB, mask_token_id=special_id("<|endoftext|>"), target_layer_ids=(1, 2),
                                  num_target_layers=target.config.num_layers,
                                  target_hidden_size=target.config.hidden_size, markov_rank=rank,
                                  has_confidence_head=rank > 0, confidence_with_markov=rank > 0, block_size=4)
        draft = DraftModel.random(config, seed=1).eval()
        with torch.no_grad():
            draft.lm_head.weight[2:5] *= 20
        checkpoint.save(draft, dirs[method])
    save_eagle3_checkpoint(tiny_eagle3_draft(target), dirs["eagle3"])
    return dirs


_built: dict[str, tuple[Path, dict[str, Path]]] = {}


def snapshot(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """(model directory with its chat template in tokenizer_config.json, method → draft directory),
    shared by the session (pass pytest's session-scoped `tmp_path_factory`)."""
    if "snapshot" not in _built:
        root = tmp_path_factory.mktemp("chat-snapshot")
        model = chat_checkpoint(root / "model")
        _built["snapshot"] = model, chat_drafts(root, checkpoint.load_target(model))
    return _built["snapshot"]


def bench_file(path: Path, questions: list[str]) -> Path:
    """A benchmark in DeepSpec's eval_datasets format; each row has a second turn (DeepSpec reads the first only)."""
    path.write_text("".join(json.dumps({"question_id": i, "turns": [q, "And now in one word?"]}) + "\n"
                            for i, q in enumerate(questions)), encoding="utf-8")
    return path
