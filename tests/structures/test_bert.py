"""BertStructure pruning, capture_hidden and hidden_state_loss on a tiny random BERT."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimsearch.structures.bert import BertStructure, capture_hidden, hidden_state_loss
from slimsearch.exceptions import ConfigError, SlimSearchError

LAYERS, HEADS, HEAD_SIZE, FFN = 4, 4, 8, 64


@pytest.fixture(scope="module")
def encoder():
    """A SentenceEncoder around a random 4-layer BERT (4 heads of 8, 64 FFN neurons), no dropout."""
    from transformers import BertConfig, BertModel

    from slimsearch.tasks._minilm import SentenceEncoder

    torch.manual_seed(0)
    config = BertConfig(vocab_size=60, hidden_size=HEADS * HEAD_SIZE, num_hidden_layers=LAYERS,
                        num_attention_heads=HEADS, intermediate_size=FFN, max_position_embeddings=16,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    bert = BertModel(config, add_pooling_layer=False)
    return SentenceEncoder(bert.embeddings, bert.encoder).eval()


@pytest.fixture
def ids():
    """Five sequences of 16 token ids, right-padded with 0 to different lengths."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(1, 60, (5, 16), generator=gen)
    for row, length in enumerate((16, 9, 4, 12, 1)):
        x[row, length:] = 0
    return x


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_group_and_layer_names(encoder, ids):
    structure = BertStructure()
    assert structure.groups(encoder, ids[:1]) == [
        f"encoder.layer.{i}.{kind}" for i in range(LAYERS) for kind in ("attention", "ffn")
    ]
    assert structure.droppable(encoder) == [f"encoder.layer.{i}" for i in range(LAYERS)]


def test_prune_heads_neurons_and_layers(encoder, ids):
    structure = BertStructure()
    ratios = {name: 0.5 for name in structure.groups(encoder, ids[:1])}
    before = copy.deepcopy(encoder.state_dict())
    small = structure.prune(encoder, ids[:1], ratios, drop=("encoder.layer.1", "encoder.layer.2"))

    assert [type(layer) for layer in small.encoder.layer][1:3] == [nn.Identity, nn.Identity]
    assert structure.droppable(small) == ["encoder.layer.0", "encoder.layer.3"]
    for layer in (small.encoder.layer[0], small.encoder.layer[3]):
        attn = layer.attention.self
        assert (attn.num_attention_heads, attn.all_head_size) == (HEADS // 2, HEADS // 2 * HEAD_SIZE)
        assert attn.query.weight.shape == attn.key.weight.shape == attn.value.weight.shape == (16, 32)
        assert layer.attention.output.dense.weight.shape == (32, 16)
        assert layer.intermediate.dense.weight.shape == (FFN // 2, 32)
        assert layer.output.dense.weight.shape == (32, FFN // 2)
    assert _params(small) < _params(encoder)
    with torch.no_grad():
        assert small(ids).shape == encoder(ids).shape == (5, 32)
        assert small(ids[:1]).shape == (1, 32)
    # the model handed in is untouched
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    assert len(encoder.encoder.layer) == LAYERS


def test_zero_ratio_is_an_identical_copy(encoder, ids):
    structure = BertStructure()
    same = structure.prune(encoder, ids[:1], {name: 0.0 for name in structure.groups(encoder, ids[:1])})
    assert same is not encoder
    assert same.state_dict().keys() == encoder.state_dict().keys()
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in same.state_dict().items())
    with torch.no_grad():
        assert torch.equal(same(ids), encoder(ids))


@pytest.mark.parametrize("importance", ["l1", "l2"])
def test_removing_units_equals_zeroing_their_output(encoder, ids, importance):
    """Pruned heads/neurons are the weakest ones, and removing them changes nothing else."""
    model = copy.deepcopy(encoder)
    layer = model.encoder.layer[0]
    strong_heads, strong_neurons = [1, 3], torch.arange(0, FFN, 2)
    with torch.no_grad():  # make heads 1, 3 and the even neurons clearly the most important
        for lin in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
            for h in strong_heads:
                lin.weight[h * HEAD_SIZE : (h + 1) * HEAD_SIZE] *= 4
        layer.intermediate.dense.weight[strong_neurons] *= 4
    ratios = {"encoder.layer.0.attention": 0.5, "encoder.layer.0.ffn": 0.5}
    small = BertStructure().prune(model, ids[:1], ratios, importance=importance)

    reference = copy.deepcopy(model)
    ref_layer = reference.encoder.layer[0]
    with torch.no_grad():
        for h in set(range(HEADS)) - set(strong_heads):
            ref_layer.attention.output.dense.weight[:, h * HEAD_SIZE : (h + 1) * HEAD_SIZE] = 0
        ref_layer.output.dense.weight[:, torch.arange(1, FFN, 2)] = 0
        torch.testing.assert_close(small(ids), reference(ids), atol=1e-6, rtol=1e-5)
    kept_q = small.encoder.layer[0].attention.self.query.weight
    expected_q = torch.cat([layer.attention.self.query.weight[h * HEAD_SIZE : (h + 1) * HEAD_SIZE]
                            for h in strong_heads])
    assert torch.equal(kept_q, expected_q)


def test_some_heads_and_neurons_always_stay(encoder, ids):
    structure = BertStructure()
    small = structure.prune(encoder, ids[:1], {name: 0.99 for name in structure.groups(encoder, ids[:1])})
    for layer in small.encoder.layer:
        assert layer.attention.self.num_attention_heads == 1
        assert layer.intermediate.dense.out_features == 1
    with torch.no_grad():
        assert small(ids).shape == (5, 32)


def test_quantized_layers_stay_quantized(encoder, ids):
    from slimsearch.compress.quant.layers import QLinear, freeze
    from slimsearch.compress.quantize import quantize_layers
    from slimsearch.spaces.plan import CompressionPlan, LayerPlan

    names = [n for n, m in encoder.named_modules() if isinstance(m, nn.Linear)]
    quantized = quantize_layers(copy.deepcopy(encoder), CompressionPlan(layers={n: LayerPlan(weight_bits=8) for n in names}))
    small = BertStructure().prune(quantized, ids[:1], {"encoder.layer.0.attention": 0.5, "encoder.layer.0.ffn": 0.5})
    layer = small.encoder.layer[0]
    assert isinstance(layer.attention.self.query, QLinear) and layer.attention.self.query.out_features == 16
    assert isinstance(layer.output.dense, QLinear) and layer.output.dense.in_features == FFN // 2
    # the weight grid (one row per output) follows the rows, so the pruned layers still freeze
    assert layer.attention.self.query.weight_scale.shape == (16, 1)
    with torch.no_grad():
        assert small(ids).shape == (5, 32)
    freeze(small)
    with torch.no_grad():
        assert small(ids).shape == (5, 32)


def test_a_sparsity_mask_follows_the_pruned_rows_and_columns(encoder, ids):
    from slimsearch.compress.quantize import quantize_layers
    from slimsearch.spaces.plan import CompressionPlan, LayerPlan

    plan = CompressionPlan(layers={"encoder.layer.0.intermediate.dense": LayerPlan(sparsity=0.5),
                                   "encoder.layer.0.output.dense": LayerPlan(sparsity=0.5)})
    sparse = quantize_layers(copy.deepcopy(encoder), plan)
    small = BertStructure().prune(sparse, ids[:1], {"encoder.layer.0.ffn": 0.5})
    up, down = small.encoder.layer[0].intermediate.dense, small.encoder.layer[0].output.dense
    kept = torch.sort(torch.topk(_ffn_scores(sparse), FFN // 2).indices).values  # the l1 rule
    assert torch.equal(up.weight_mask, sparse.encoder.layer[0].intermediate.dense.weight_mask[kept])
    assert torch.equal(down.weight_mask, sparse.encoder.layer[0].output.dense.weight_mask[:, kept])
    with torch.no_grad():
        assert small(ids).shape == (5, 32)


def _ffn_scores(model: nn.Module) -> torch.Tensor:
    layer = model.encoder.layer[0]
    return layer.intermediate.dense.weight.abs().sum(1) + layer.output.dense.weight.abs().sum(0)


class TaggedLinear(nn.Linear):
    """A Linear with a per-output buffer of its own, which pruning cannot know how to follow."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features)
        self.load_state_dict(linear.state_dict())
        self.register_buffer("tag", torch.arange(linear.out_features))


def test_a_group_whose_layers_pruning_cannot_slice_is_not_offered(encoder, ids):
    model = copy.deepcopy(encoder)
    layer = model.encoder.layer[0]
    layer.intermediate.dense = TaggedLinear(layer.intermediate.dense)
    structure = BertStructure()
    groups = structure.groups(model, ids[:1])
    assert "encoder.layer.0.ffn" not in groups and "encoder.layer.0.attention" in groups
    with pytest.raises(ConfigError, match="cannot prune group 'encoder.layer.0.ffn'"):
        structure.prune(model, ids[:1], {"encoder.layer.0.ffn": 0.5})


def test_a_pruned_encoder_that_would_not_run_is_refused(encoder, ids, monkeypatch):
    from slimsearch.structures import bert as transformer

    monkeypatch.setattr(transformer, "_keep_columns", lambda lin, idx: None)  # output layers keep every input
    with pytest.raises(SlimSearchError, match=(
            r"^pruning SentenceEncoder broke it: layer 'encoder.layer.0.output.dense' \(Linear\) fails on the "
            r"example input \(RuntimeError: [^\n]*\)$")):
        BertStructure().prune(encoder, ids[:1], {"encoder.layer.0.ffn": 0.5})


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"ratios": {"encoder.layer.9.attention": 0.5}}, ["'encoder.layer.9.attention'", "encoder.layer.0.ffn"]),
        ({"ratios": {"encoder.layer.0.ffn": 1.0}}, ["[0, 1)", "1.0"]),
        ({"ratios": {}, "drop": ("encoder.layer.7",)}, ["'encoder.layer.7'", "encoder.layer.3"]),
        ({"ratios": {"encoder.layer.0.ffn": 0.5}, "importance": "taylor"}, ["'taylor'", "not supported", "'l1'"]),
    ],
)
def test_bad_requests_say_what_is_allowed(encoder, ids, kwargs, words):
    kwargs = dict(kwargs)
    ratios = kwargs.pop("ratios")
    with pytest.raises(ConfigError) as info:
        BertStructure().prune(encoder, ids[:1], ratios, **kwargs)
    for word in words:
        assert word in str(info.value)


def test_model_without_the_layer_list_is_refused():
    with pytest.raises(ConfigError, match="no layer list 'encoder.layer'"):
        BertStructure().groups(nn.Sequential(nn.Linear(2, 2)), torch.zeros(1, 2))


def test_dropped_layers_keep_later_names(encoder, ids):
    """Layer 2 is still called encoder.layer.2 after layer 1 is dropped, and it is the same layer."""
    small = BertStructure().prune(encoder, ids[:1], {}, drop=("encoder.layer.1",))
    assert isinstance(small.encoder.layer[1], nn.Identity)
    assert torch.equal(small.encoder.layer[2].output.dense.weight, encoder.encoder.layer[2].output.dense.weight)
    assert not any(name.startswith("encoder.layer.1.") for name, _ in small.named_modules())
    assert _params(encoder) - _params(small) == _params(encoder.encoder.layer[1])
    again = BertStructure().prune(small, ids[:1], {"encoder.layer.2.ffn": 0.5}, drop=("encoder.layer.3",))
    assert BertStructure().droppable(again) == ["encoder.layer.0", "encoder.layer.2"]
    with pytest.raises(ConfigError, match="cannot prune group 'encoder.layer.1.ffn'"):
        BertStructure().prune(small, ids[:1], {"encoder.layer.1.ffn": 0.5})
    with torch.no_grad():
        assert again(ids).shape == (5, 32)


def test_every_layer_can_be_dropped(encoder, ids):
    structure = BertStructure()
    bare = structure.prune(encoder, ids[:1], {}, drop=tuple(structure.droppable(encoder)))
    assert structure.droppable(bare) == [] and structure.groups(bare, ids[:1]) == []
    with torch.no_grad():
        assert bare(ids).shape == (5, 32)


def test_ratios_of_dropped_layers_are_ignored(encoder, ids):
    structure = BertStructure()
    small = structure.prune(encoder, ids[:1], {"encoder.layer.1.attention": 0.5}, drop=("encoder.layer.1",))
    plain = structure.prune(encoder, ids[:1], {}, drop=("encoder.layer.1",))
    with torch.no_grad():
        assert torch.equal(small(ids), plain(ids))


def test_hidden_states_are_keyed_by_layer_index(encoder, ids):
    small = BertStructure().prune(encoder, ids[:1], {}, drop=("encoder.layer.1",))
    mask = ids != 0
    with torch.no_grad(), capture_hidden(encoder) as teacher_states, capture_hidden(small) as student_states:
        encoder(ids)
        small(ids)
    assert sorted(teacher_states) == [0, 1, 2, 3]
    assert sorted(student_states) == [0, 2, 3]
    assert student_states[0].shape == (5, 16, 32)
    # layer 0 is the same in both; the later ones differ since layer 1 is gone
    torch.testing.assert_close(student_states[0], teacher_states[0])
    assert hidden_state_loss(student_states, teacher_states, mask) > 0
    assert float(hidden_state_loss(teacher_states, teacher_states, mask)) == 0.0
    # hooks are removed on exit
    assert not any(layer._forward_hooks for layer in encoder.encoder.layer)


def test_pruned_model_exports_to_onnx(encoder, ids):
    from slimsearch.deploy.onnx_graph import onnx_bytes, ort_predict, ort_session

    structure = BertStructure()
    small = structure.prune(encoder, ids[:1], {name: 0.5 for name in structure.groups(encoder, ids[:1])},
                            drop=("encoder.layer.2",))
    session = ort_session(onnx_bytes(small, ids[:1]), threads=1)
    with torch.no_grad():
        expected = small(ids)
    torch.testing.assert_close(ort_predict(session, ids), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ort_predict(session, ids[2:3]), expected[2:3], atol=1e-5, rtol=1e-4)
