"""Wanda 2:4 sparsity of a decoder's linears."""

from __future__ import annotations

import json
import dataclasses

import pytest
import torch

from slimsearch.compress.wanda import WandaConfig, sparsify
from slimsearch.exceptions import ConfigError
from slimsearch.structures import llm


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=True)).eval()


@pytest.mark.parametrize("build", [_llama, _gpt2])
def test_two_of_every_four_input_weights_are_kept(build):
    model = build()
    calib = torch.randint(0, 128, (2, 16))
    masks = sparsify(model, WandaConfig(), calib)
    assert set(masks) == set(llm.decoder_linears(model))
    for path, module in llm.decoder_linears(model).items():
        w = llm.weight_of(module)
        groups = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert (groups <= 2).all() and (groups == 2).float().mean() > 0.99
    assert llm.tied(model)  # both tie their output projection to the embedding; the cut leaves it tied


def test_the_input_norm_decides_which_weights_stay():
    model = _llama()
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    with torch.no_grad():
        layer.weight.fill_(1.0)  # equal magnitudes: only the activations rank them
    calib = torch.randint(0, 128, (2, 16))
    sparsify(model, WandaConfig(groups=("down",)), calib)
    from slimsearch.compress.wanda import input_norms

    reference = _llama()
    with torch.no_grad():
        reference.get_submodule("model.layers.0.mlp.down_proj").weight.fill_(1.0)
    norms = input_norms(reference, calib, ["model.layers.0.mlp.down_proj"])["model.layers.0.mlp.down_proj"]
    kept = layer.weight[0] != 0
    for g in range(0, norms.numel(), 4):
        top = set(torch.topk(norms[g:g + 4], 2).indices.tolist())
        assert set(torch.nonzero(kept[g:g + 4]).flatten().tolist()) == top


def test_config_round_trips_and_refuses_bad_values():
    config = WandaConfig(groups=("qkv", "down"))
    assert WandaConfig(**json.loads(json.dumps(dataclasses.asdict(config)))) == config
    with pytest.raises(ConfigError, match="pattern"):
        WandaConfig(pattern="4:8")
    with pytest.raises(ConfigError, match="allowed"):
        WandaConfig(groups=("mlp",))
