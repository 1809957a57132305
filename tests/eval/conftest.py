"""A tiny random Llama with SmolLM2's tokenizer, saved to a folder: lm-eval runs end to end on it in seconds."""

import pytest
import torch

pytest.importorskip("lm_eval")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from patchattn.tasks.generators import load_tokenizer

    try:
        return load_tokenizer("smollm2")
    except ImportError as err:
        pytest.skip(f"needs the embedded SmolLM2 tokenizer: {err}")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = smollm2_tokenizer
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def pytest_collection_modifyitems(config, items):
    """Slow tests here (real SmolLM2 weights) run only when asked for: ``-m slow`` or ``PATCHATTN_SLOW=1``; CI's plain
    ``pytest -q -n 2`` keeps to the fast path."""
    import os

    if "slow" in (config.getoption("-m") or "") or os.environ.get("PATCHATTN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="real-model check: run with -m slow or PATCHATTN_SLOW=1")
    for item in items:
        if "slow" in item.keywords and "tests/eval" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)
