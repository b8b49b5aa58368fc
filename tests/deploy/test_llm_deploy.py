"""A decoder LLM deployed: the builder's float graph, our codes as MatMulNBits, the
compressed-tensors folder, and the timing of generation, each checked against PyTorch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime_genai")
pytest.importorskip("compressed_tensors")

from slimsearch.compress.quant.grid import quantize_weight  # noqa: E402
from slimsearch.deploy.hf_folder import reload, save_hf_folder  # noqa: E402
from slimsearch.deploy.llm_timing import onnx_logits, onnx_perplexity, time_generation  # noqa: E402
from slimsearch.compress.output_head import quantize_output_projection  # noqa: E402
from slimsearch.deploy.onnx_nbits import block_size_for, build_onnx, export_genai, to_matmul_nbits  # noqa: E402
from slimsearch.exceptions import ConfigError  # noqa: E402
from slimsearch.structures.llm import decoder_linears, set_weight, tied, weight_of  # noqa: E402

VOCAB = 256


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0", bos_token="t1", eos_token="t2")


def _llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                         max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def _rtn(model, scheme):
    """RTN codes of every decoder linear (``scheme(path) -> (bits, group, symmetric)``), written back de-quantized."""
    codes = {}
    for path, module in decoder_linears(model).items():
        bits, group, symmetric = scheme(path)
        qw = quantize_weight(weight_of(module), bits, group_size=group, symmetric=symmetric)
        set_weight(module, qw.dequantize())
        codes[path] = qw
    return codes


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


IDS = np.random.default_rng(0).integers(0, VOCAB, (1, 24))
SCHEMES = {
    "4bit-g32-sym": lambda path: (4, 32, True),
    # q/k/v share a grid (the graph fuses them); 3-bit runs in the 4-bit kernel, 6-bit in the 8-bit one
    "mixed-asym": lambda path: ((4, 32, False) if path.split(".")[-1] in ("q_proj", "k_proj", "v_proj") else
                                (3, 16, True) if path.endswith("o_proj") else
                                (2, 48, False) if path.endswith("down_proj") else (6, 0, True)),
}


@pytest.fixture(scope="module", params=list(SCHEMES))
def quantized_graph(request, tmp_path_factory):
    """A tiny GQA Llama holding RTN-de-quantized weights, its codes, and its builder float graph."""
    root = tmp_path_factory.mktemp(request.param)
    model = _llama()
    codes = _rtn(model, SCHEMES[request.param])
    model.save_pretrained(root / "hf")
    _tokenizer().save_pretrained(root / "hf")
    build_onnx(root / "hf", root / "float", threads=1)
    return model, codes, root


def test_builder_float_graph_matches_torch(quantized_graph):
    model, _, root = quantized_graph
    np.testing.assert_allclose(onnx_logits(root / "float", IDS), _logits(model, IDS), rtol=1e-4, atol=1e-4)
    config = json.loads((root / "float" / "genai_config.json").read_text())
    assert config["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 1


@pytest.mark.parametrize("level, atol", [(0, 1e-4), (4, 0.05)])
def test_matmul_nbits_holds_our_codes(quantized_graph, level, atol):
    model, codes, root = quantized_graph
    report = to_matmul_nbits(root / "float", codes, out_dir=root / f"nbits{level}", accuracy_level=level)
    assert len(report.replaced) == 2 * 5 and report.left_float == ("/lm_head/MatMul",)  # qkv, o, gate, up, down
    assert report.embedding is None
    np.testing.assert_allclose(onnx_logits(report.path, IDS), _logits(model, IDS), atol=atol, rtol=0)


@pytest.mark.parametrize("head, embedding", [((4, 32, True), "GatherBlockQuantized"),
                                             ((8, 16, False), "GatherBlockQuantized"),
                                             ((2, 32, True), "float")])
def test_quantized_output_projection_keeps_the_embedding_tied(tmp_path, head, embedding):
    model = _llama(1)
    codes = _rtn(model, SCHEMES["4bit-g32-sym"])
    bits, group, symmetric = head
    lm_head = quantize_output_projection(model, bits=bits, group_size=group, symmetric=symmetric)
    assert tied(model) and torch.equal(model.model.embed_tokens.weight, lm_head.dequantize())
    model.save_pretrained(tmp_path / "hf")
    _tokenizer().save_pretrained(tmp_path / "hf")
    build_onnx(tmp_path / "hf", tmp_path / "float")
    report = to_matmul_nbits(tmp_path / "float", codes, out_dir=tmp_path / "q", accuracy_level=0, lm_head=lm_head)
    assert report.left_float == () and report.embedding == embedding
    np.testing.assert_allclose(onnx_logits(report.path, IDS), _logits(model, IDS), atol=1e-4, rtol=0)


def test_matmul_nbits_refuses_codes_that_do_not_match_the_graph(quantized_graph, tmp_path):
    model, codes, root = quantized_graph
    path, qw = "model.layers.0.mlp.down_proj", codes["model.layers.0.mlp.down_proj"]
    noise = torch.randn_like(weight_of(model.get_submodule(path)))
    other = dict(codes, **{path: quantize_weight(noise, qw.bits, group_size=qw.group_size, symmetric=qw.symmetric)})
    with pytest.raises(ConfigError, match="differs from the de-quantized codes"):
        to_matmul_nbits(root / "float", other, out_dir=tmp_path / "a")
    with pytest.raises(ConfigError, match="not found in"):
        to_matmul_nbits(root / "float", dict(codes, **{"model.layers.9.mlp.up_proj": codes[path]}),
                        out_dir=tmp_path / "b")
    q = "model.layers.0.self_attn.q_proj"
    narrower = dict(codes, **{q: quantize_weight(codes[q].dequantize(), 8)})
    with pytest.raises(ConfigError, match="must share bits"):
        to_matmul_nbits(root / "float", narrower, out_dir=tmp_path / "c", check_weights=False)


@pytest.mark.parametrize("k, group, bits, block", [(576, 128, 4, 128), (576, 96, 4, 32), (576, 0, 4, 128),
                                                   (64, 0, 8, 64), (40, 0, 4, 64), (2048, 1024, 2, 256)])
def test_block_size_holds_the_group_exactly(k, group, bits, block):
    assert block_size_for(k, group, bits) == block


def test_block_size_refuses_groups_without_a_kernel_block():
    with pytest.raises(ConfigError, match="power-of-two divisor >= 16"):
        block_size_for(576, 40, 4)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_hf_folder_reloads_equal_and_tied(tmp_path, scheme):
    model = _llama()
    codes = _rtn(model, SCHEMES[scheme])
    out = save_hf_folder(model, _tokenizer(), tmp_path / "hf", quantized=codes)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    back = reload(out)
    np.testing.assert_allclose(_logits(back, IDS), _logits(model, IDS), atol=1e-5, rtol=0)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    with pytest.raises(ConfigError, match="not empty"):
        save_hf_folder(model, None, out, quantized=codes)
    save_hf_folder(model, None, out, quantized=codes, overwrite=True)
    assert not list(tmp_path.glob(".hf.*"))


def test_time_generation_measures(quantized_graph):
    _, _, root = quantized_graph
    result = time_generation(root / "float", prompt_tokens=8, new_tokens=4, repeats=1)
    assert result["source"] == "measured" and result["tokens_decoded"] == 4
    for key in ("prefill_ms", "decode_ms_per_token", "decode_tok_s", "peak_rss_mb", "file_bytes"):
        assert result[key] > 0, key


def test_time_generation_paired_with_a_reference_times_both_round_by_round(quantized_graph):
    _, _, root = quantized_graph
    result = time_generation(root / "float", prompt_tokens=8, new_tokens=4, repeats=3, reference=root / "float")
    ref = result["reference"]
    assert len(result["decode_runs_ms_per_token"]) == len(ref["decode_runs_ms_per_token"]) == 3
    assert len(result["prefill_runs_ms"]) == len(ref["prefill_runs_ms"]) == 3
    assert ref["tokens_decoded"] == 4 and ref["decode_tok_s"] > 0
    with pytest.raises(ConfigError, match="has no genai_config.json"):
        time_generation(root / "float", reference=root)


def test_onnx_perplexity_matches_torch(quantized_graph):
    model, _, root = quantized_graph
    windows = [IDS[0, :12], IDS[0, 12:]]
    with torch.no_grad():
        losses = [model(torch.from_numpy(w[None]), labels=torch.from_numpy(w[None])).loss.item() for w in windows]
    assert onnx_perplexity(root / "float", windows) == pytest.approx(float(np.exp(np.mean(losses))), rel=1e-4)


def test_build_onnx_names_an_unsupported_family(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(
        tmp_path / "gpt2")
    _tokenizer().save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ConfigError, match="GPT2LMHeadModel is not supported"):
        build_onnx(tmp_path / "gpt2", tmp_path / "out")


def test_build_onnx_refuses_a_folder_without_tokenizer_or_a_used_output(quantized_graph, tmp_path):
    _, _, root = quantized_graph
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text((root / "hf" / "config.json").read_text())
    with pytest.raises(ConfigError, match="no tokenizer"):
        build_onnx(tmp_path / "bare", tmp_path / "out")
    with pytest.raises(ConfigError, match="not empty"):
        build_onnx(root / "hf", root / "float")


def test_export_genai_writes_the_quantized_folder_in_one_call(tmp_path):
    model = _llama(2)
    codes = _rtn(model, SCHEMES["mixed-asym"])
    lm_head = quantize_output_projection(model)
    out = export_genai(model, _tokenizer(), tmp_path / "genai", quantized=codes, lm_head=lm_head, accuracy_level=0)
    np.testing.assert_allclose(onnx_logits(out, IDS), _logits(model, IDS), atol=1e-4, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["genai"]


# -- deployed_graph: a compressed model as the graph it deploys as, from its record ---------------


def _graph_ops(folder) -> dict:
    import onnx

    ops: dict = {}
    for node in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return ops


def test_deployed_graph_runs_the_records_codes_as_matmul_nbits(tmp_path):
    from slimsearch.compress.llm_methods import _update
    from slimsearch.deploy.llm_graph import deployed_graph

    model = _llama()
    codes = _rtn(model, SCHEMES["4bit-g32-sym"])
    del codes["model.layers.1.mlp.down_proj"]  # left in float: it stays a MatMul
    _update(model, quantized=codes)
    out = deployed_graph(model, tmp_path / "graph")
    # per block: fused qkv, o, gate, up, down: 10 linears, block 1's down left float, the output projection float
    assert _graph_ops(out)["MatMulNBits"] == 9
    assert [w for w in _matmul_weights(out) if not w.endswith("_Q4")] == [
        "model.layers.1.mlp.down_proj.MatMul.weight", "lm_head.MatMul.weight"]
    np.testing.assert_allclose(onnx_logits(out, IDS), _logits(model, IDS), atol=0.05, rtol=0)


def test_a_plans_rounded_output_projection_is_deployed_packed_and_costed_so(tmp_path):
    from slimsearch.compress.llm_methods import _update, output_head, record_of
    from slimsearch.compress.output_head import HeadConfig
    from slimsearch.deploy.llm_graph import deployed_graph
    from slimsearch.evaluators.decoder import decoder_costs
    from slimsearch.evaluators.llm_costs import weight_bytes

    model = _llama()
    codes = _rtn(model, SCHEMES["4bit-g32-sym"])
    _update(model, quantized=codes)
    float_bytes = decoder_costs(model, []).values["size_bytes"]
    output_head(model, HeadConfig(8), None)
    head = record_of(model).head
    assert (head.bits, head.symmetric) == (8, True)  # blocks of 64: here the whole hidden size
    assert torch.equal(model.get_input_embeddings().weight, head.dequantize())  # tied: the embedding is rounded too
    size = decoder_costs(model, []).values["size_bytes"]
    assert size == weight_bytes(model, quantized=codes, lm_head_bits=8, lm_head_group=64)
    assert float_bytes - size == VOCAB * 64 * 4 - (VOCAB * 64 + VOCAB * 4)  # float32 -> codes + a scale per block
    out = deployed_graph(model, tmp_path / "graph")
    ops = _graph_ops(out)
    assert (ops["MatMulNBits"], ops["GatherBlockQuantized"]) == (11, 1)  # 10 linears and the output projection
    assert "lm_head.MatMul.weight" not in _matmul_weights(out)
    np.testing.assert_allclose(onnx_logits(out, IDS), _logits(model, IDS), atol=0.05, rtol=0)


def _matmul_weights(folder) -> list:
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    return [node.input[1] for node in graph.node if node.op_type in ("MatMul", "MatMulNBits") and len(node.input) > 1]


def test_deployed_graph_of_smoothquant_inputs_uses_integer_matmuls(tmp_path):
    from slimsearch.compress.llm_methods import _update
    from slimsearch.deploy.llm_graph import deployed_graph

    model = _llama()
    codes = _rtn(model, lambda path: (8, 0, True))
    _update(model, quantized=codes, act_paths=tuple(codes))
    ops = _graph_ops(deployed_graph(model, tmp_path / "graph"))
    assert ops.get("MatMulIntegerToFloat", 0) >= 2 * 3 and "MatMulNBits" not in ops


def test_deployed_graph_refuses_int8_inputs_without_an_integer_kernel(tmp_path):
    from slimsearch.compress.llm_methods import _update
    from slimsearch.deploy.llm_graph import deployed_graph

    model = _llama()
    codes = _rtn(model, SCHEMES["4bit-g32-sym"])
    _update(model, quantized=codes, act_paths=tuple(codes))
    with pytest.raises(ConfigError, match="no integer kernel here; allowed: 8-bit per-channel"):
        deployed_graph(model, tmp_path / "graph")
    assert not (tmp_path / "graph").exists()


def test_deployed_graph_of_an_unsupported_architecture_says_so(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from slimsearch.deploy.llm_graph import deployed_graph
    from slimsearch.exceptions import UnsupportedArchitecture

    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    with pytest.raises(UnsupportedArchitecture, match="GPT2LMHeadModel is not supported"):
        deployed_graph(model, tmp_path / "graph")
