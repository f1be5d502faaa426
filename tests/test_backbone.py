"""extract.backbone: loading with SpecAugment, layer naming, and masked pooling checked against direct passes."""
from __future__ import annotations

import math
import re

import pytest
import torch
from helpers import NO_DROPOUT, S, conv_frames, padded_batch
from tiny_model import make_tiny_backbone, tiny_config

from extract.backbone import (
    BackboneError,
    BackboneLoadError,
    forward_layers,
    layer_dims,
    layer_names,
    load_backbone,
)

torch.set_num_threads(1)


def direct_states(model, wave: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """All layers of one clip from a plain forward pass (no extract.backbone code involved)."""
    with torch.no_grad():
        out = model(wave[None], attention_mask=None if mask is None else mask[None], output_hidden_states=True)
    states = {"cnn": out.extract_features[0]}
    states.update({f"hidden_{i}": h[0] for i, h in enumerate(out.hidden_states)})
    return states


@pytest.fixture(scope="module")
def group_model(tmp_path_factory):
    return load_backbone(make_tiny_backbone(tmp_path_factory.mktemp("group"))).eval()


@pytest.fixture(scope="module")
def layer_model(tmp_path_factory):
    path = make_tiny_backbone(tmp_path_factory.mktemp("layer"), feat_extract_norm="layer", do_stable_layer_norm=True)
    return load_backbone(path).eval()


def test_conv_frames_reference_matches_paper():
    assert conv_frames(S) == 125  # the tiny CNN keeps wav2vec2's 20 ms hop (base gives 124 for 2.5 s)


def test_layer_names_and_dims(group_model):
    assert layer_names(group_model) == ["cnn", "hidden_0", "hidden_1", "hidden_2"]
    assert layer_dims(group_model) == {"cnn": 16, "hidden_0": 32, "hidden_1": 32, "hidden_2": 32}


def test_pooled_is_mean_of_valid_frames_of_direct_pass(group_model):
    lengths = [S, 20000, 9000]
    waves, mask = padded_batch(lengths)
    with torch.no_grad():
        pooled, n_frames, frames = forward_layers(group_model, waves, mask)
    assert n_frames.tolist() == [conv_frames(n) for n in lengths] == [125, 62, 28]
    assert set(pooled) == set(layer_names(group_model))
    for b, n in enumerate(n_frames.tolist()):
        states = direct_states(group_model, waves[b])  # group norm: zero padding, no mask (HF's advice)
        for name, h in states.items():
            assert pooled[name].shape == (3, layer_dims(group_model)[name])
            assert pooled[name].dtype == torch.float32
            torch.testing.assert_close(pooled[name][b], h[:n].mean(0), rtol=1e-5, atol=1e-5)
            if n < h.shape[0]:  # the padded frames would change the mean: they really are left out
                assert not torch.allclose(pooled[name][b], h.mean(0), atol=1e-4)
    assert frames == {}


def test_clip_features_do_not_depend_on_batch_mates(group_model):
    waves, mask = padded_batch([S, 20000, 9000], seed=1)
    with torch.no_grad():
        together, _, _ = forward_layers(group_model, waves, mask)
        alone, _, _ = forward_layers(group_model, waves[1:2], mask[1:2])
    for name in together:
        torch.testing.assert_close(together[name][1], alone[name][0], rtol=1e-5, atol=1e-5)


def test_layer_norm_model_gets_mask_so_padding_values_do_not_matter(layer_model):
    waves, mask = padded_batch([S, 12345])
    noisy = waves.clone()
    noisy[1, 12345:] = torch.randn(S - 12345)
    with torch.no_grad():
        clean, n_frames, _ = forward_layers(layer_model, waves, mask)
        dirty, _, _ = forward_layers(layer_model, noisy, mask)
    states = direct_states(layer_model, waves[1], mask[1])
    n = conv_frames(12345)
    assert n_frames[1] == n
    for name in clean:
        torch.testing.assert_close(clean[name], dirty[name], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(clean[name][1], states[name][:n].mean(0), rtol=1e-5, atol=1e-5)


def test_frames_are_strided_valid_frames(group_model):
    lengths = [S, 20000]
    waves, mask = padded_batch(lengths, seed=2)
    with torch.no_grad():
        _, n_frames, frames = forward_layers(group_model, waves, mask, frame_layers=("cnn", "hidden_1"),
                                             frame_stride=4)
    assert set(frames) == {"cnn", "hidden_1"}
    for b, n in enumerate(n_frames.tolist()):
        states = direct_states(group_model, waves[b])
        for name in frames:
            got = frames[name][b]
            assert got.shape == (math.ceil(n / 4), layer_dims(group_model)[name])
            torch.testing.assert_close(got, states[name][:n:4], rtol=1e-5, atol=1e-5)


def test_bad_arguments_give_clear_errors(group_model):
    waves, mask = padded_batch([S])
    with pytest.raises(BackboneError, match=r"^unknown frame layer\(s\) hidden_9; this backbone has cnn, hidden_0"):
        forward_layers(group_model, waves, mask, frame_layers=("hidden_9",))
    with pytest.raises(BackboneError, match=r"^frame_stride must be >= 1, got 0$"):
        forward_layers(group_model, waves, mask, frame_stride=0)
    with pytest.raises(ValueError, match=r"same shape, got \(1, 40000\) and \(1, 39999\)$"):
        forward_layers(group_model, waves, mask[:, 1:])


def test_autocast_bf16_pools_in_float32(group_model):
    """Under bf16 autocast the states may come out in bf16; the pooled means are float32 means of exactly those
    states (the product's contract), not bf16 sums. How far bf16 states are from float32 ones depends on the
    CPU's kernels, so it is not asserted: the states are taken from the very forward pass that was pooled."""
    waves, mask = padded_batch([S, 20000], seed=3)
    seen = []
    hook = group_model.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            low, n_frames, _ = forward_layers(group_model, waves, mask)
    finally:
        hook.remove()
    (out,) = seen
    states = {"cnn": out.extract_features, **{f"hidden_{i}": h for i, h in enumerate(out.hidden_states)}}
    assert any(h.dtype == torch.bfloat16 for h in states.values())   # autocast really was in force
    assert sorted(low) == sorted(states)
    for name, h in states.items():
        assert low[name].dtype == torch.float32
        for b, n in enumerate(n_frames.tolist()):
            want = h[b, :n].double().mean(0).float()
            torch.testing.assert_close(low[name][b], want, rtol=1e-6, atol=1e-6)


def test_load_backbone_sets_spec_augment_and_freezes_cnn(tmp_path):
    path = make_tiny_backbone(tmp_path / "m", **NO_DROPOUT)
    model = load_backbone(path, spec_time_p=0.2, spec_feature_p=0.1, mask_time_length=5, mask_feature_length=3,
                          freeze_cnn=True)
    cfg = model.config
    assert (cfg.apply_spec_augment, cfg.mask_time_prob, cfg.mask_time_length) == (True, 0.2, 5)
    assert (cfg.mask_feature_prob, cfg.mask_feature_length) == (0.1, 3)
    assert not any(p.requires_grad for p in model.feature_extractor.parameters())
    assert all(p.requires_grad for p in model.encoder.parameters())
    defaults = load_backbone(path).config
    assert (defaults.mask_time_prob, defaults.mask_feature_prob, defaults.mask_time_length) == (0.05, 0.05, 10)

    # SpecAugment is the only randomness left (dropouts are 0): active in train mode, absent in eval mode.
    waves, mask = padded_batch([S, S], seed=4)
    with torch.no_grad():
        model.eval()
        a, _, _ = forward_layers(model, waves, mask)
        b, _, _ = forward_layers(model, waves, mask)
        model.train()
        c, _, _ = forward_layers(model, waves, mask)
    torch.testing.assert_close(a["hidden_2"], b["hidden_2"])
    torch.testing.assert_close(a["cnn"], c["cnn"])  # masking acts after the CNN
    assert not torch.allclose(a["hidden_2"], c["hidden_2"], atol=1e-4)


def test_load_backbone_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(BackboneLoadError, match=r"^cannot load backbone '.*nope': it is not a local directory "
                                                r"and could not be downloaded from the Hugging Face Hub \("):
        load_backbone(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BackboneLoadError, match=r"^cannot load backbone from directory .*empty: "):
        load_backbone(empty)
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                         vocab_size=10)).save_pretrained(tmp_path / "bert")
    with pytest.raises(BackboneLoadError, match=r"model type 'bert', which is not a wav2vec2-family audio encoder"):
        load_backbone(tmp_path / "bert")


def test_hubert_cnn_layer_comes_from_the_feature_encoder(tmp_path):
    from transformers import HubertConfig, HubertModel

    cfg = {k: v for k, v in tiny_config().to_dict().items() if k in HubertConfig().to_dict() and k != "model_type"}
    torch.manual_seed(0)
    HubertModel(HubertConfig(**cfg)).save_pretrained(tmp_path / "hubert")
    model = load_backbone(tmp_path / "hubert").eval()
    assert model.config.model_type == "hubert"
    waves, mask = padded_batch([S, 20000], seed=5)
    with torch.no_grad():
        pooled, n_frames, _ = forward_layers(model, waves, mask)
        cnn = model.feature_extractor(waves[1:2]).transpose(1, 2)[0]
    assert layer_dims(model)["cnn"] == 16 and pooled["cnn"].shape == (2, 16)
    torch.testing.assert_close(pooled["cnn"][1], cnn[: n_frames[1]].mean(0), rtol=1e-5, atol=1e-5)


def test_layerdrop_is_switched_off_so_every_layer_keeps_its_name(tmp_path):
    path = make_tiny_backbone(tmp_path / "ld", layerdrop=0.9)
    model = load_backbone(path).train()
    assert model.config.layerdrop == 0.0
    waves, mask = padded_batch([S], seed=6)
    for _ in range(3):  # with layerdrop 0.9 some layer would be dropped in almost every pass
        pooled, _, _ = forward_layers(model, waves, mask)
        assert list(pooled) == ["cnn", "hidden_0", "hidden_1", "hidden_2"]
    # LayerDrop asked for: transformers releases differ (a dropped layer's slot is missing from hidden_states,
    # or kept), so the contract is either every name right or a refusal that says why -- never a wrong name
    dropping = load_backbone(path, layerdrop=1.0).train()
    try:
        pooled, _, _ = forward_layers(dropping, waves, mask)
    except BackboneError as exc:
        assert re.match(r"the backbone returned \d hidden states instead of 3 \(LayerDrop 1.0", str(exc)), exc
    else:
        assert list(pooled) == ["cnn", "hidden_0", "hidden_1", "hidden_2"]
