"""Every bundled example loads cleanly, and published models count exactly what transformers counts."""

import pytest

import ltmdsl
from ltmdsl.kinds import REGISTRY
from paths import EXAMPLES

EXAMPLE_FILES = sorted(p.name for p in EXAMPLES.glob("*.ltm"))

# Parameter counts that transformers gives on the meta device for the same configs (`sum(p.numel())`
# of the model built from the published config.json),
# and Nemotron-H-8B's published 8,100,852,736.
PUBLISHED = {
    "llama-3.1-8b.ltm": 8_030_261_248,
    "llama-3.1-405b.ltm": 405_853_388_800,
    "llama-2-7b.ltm": 6_738_415_616,
    "mistral-7b-v0.1.ltm": 7_241_732_096,
    "mixtral-8x7b.ltm": 46_702_792_704,
    "jamba-v0.1.ltm": 51_570_323_328,
    "mamba-2.8b.ltm": 2_768_345_600,
    "mamba2-2.7b.ltm": 2_702_599_680,
    "nemotron-h-8b.ltm": 8_100_852_736,
    "bamba-9b.ltm": 9_780_235_392,  # transformers' meta-device count of tests/hf/configs/Bamba-9B.json
    "lfm2-700m.ltm": 742_489_344,  # transformers 5.24 on LiquidAI/LFM2-700M's config
    "recurrentgemma-2b.ltm": 2_682_862_080,  # transformers 5.24 on google/recurrentgemma-2b's config
    "xlstm-7b.ltm": 6_865_424_896,  # transformers 5.24, xLSTMConfig's defaults (xLSTM-7B's dimensions)
    "minimax-text-01.ltm": 456_089_655_296,  # transformers 5.24 on tests/hf/configs/MiniMax-Text-01-hf.json (meta)
    "qwen1.5-moe-a2.7b.ltm": 14_315_784_192,  # transformers' Qwen2MoeConfig() defaults: this model's sizes
    "qwen3-next-80b-a3b.ltm": 79_674_391_296,  # transformers 5.24 on tests/hf/configs/Qwen3-Next-80B-A3B-Instruct.json
    "deepseek-v3.ltm": 671_026_404_352,  # transformers 5.24 on tests/hf/configs/DeepSeek-V3.json (no MTP module)
    "deepseek-v2-lite.ltm": 15_706_484_224,  # transformers 5.24 on tests/hf/configs/DeepSeek-V2-Lite.json
    "kimi-linear-48b-a3b.ltm": 49_133_074_464,
    "qwen3.5-35b-a3b.ltm": 34_660_610_688,  # transformers 5.24, Qwen3_5MoeTextConfig's defaults (tests/hf/configs)  # transformers 5.24, KimiLinearConfig's defaults (tests/hf/configs)
    "gpt-oss-20b.ltm": 20_914_757_184,  # transformers 5.24 on tests/hf/configs/gpt-oss-20b.json
    "gemma-3-27b.ltm": 27_009_346_304,  # transformers 5.24, the text model of tests/hf/configs/gemma-3-27b-it.json
    "nemotron-3-nano-30b-a3b.ltm": 31_577_937_344,  # transformers 5.24 on tests/hf/configs/NVIDIA-Nemotron-3-Nano-*.json
    "granite-4.0-h-small.ltm": 32_207_337_984,  # transformers 5.24 on tests/hf/configs/granite-4.0-h-small.json
    "falcon-h1-34b.ltm": 33_642_221_312,  # transformers 5.24 on tests/hf/configs/Falcon-H1-34B-Instruct.json
}

REQUIRED = set(PUBLISHED) - {"nemotron-h-8b.ltm", "bamba-9b.ltm"} | {"ltm-100m.ltm", "tiny-hybrid.ltm",
                                                                    "stream-hybrid.ltm", "tiny-jamba.ltm"}


def test_required_examples_exist():
    assert REQUIRED <= set(EXAMPLE_FILES)
    assert len(EXAMPLE_FILES) >= len(REQUIRED) + 2  # at least two more published hybrids


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_example_loads_without_warnings(name):
    spec = ltmdsl.load(EXAMPLES / name)
    assert spec.warnings == []
    assert spec.model.layers


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_count(name):
    assert ltmdsl.load(EXAMPLES / name).model.params_total == PUBLISHED[name]


def test_mixtral_active_parameters():
    # 2 of 8 experts per token: 46.7B total, 12.9B active (Mistral AI's "12.9B active").
    m = ltmdsl.load(EXAMPLES / "mixtral-8x7b.ltm").model
    assert m.params_active == 12_879_925_248


def test_qwen_moe_active_parameters():
    # 4 of 60 routed experts per token; the router, the shared expert and its gate are always active:
    # 2.69B active of 14.3B (Qwen's "A2.7B").
    m = ltmdsl.load(EXAMPLES / "qwen1.5-moe-a2.7b.ltm").model
    assert m.params_total - m.params_active == 24 * (60 - 4) * 3 * 2048 * 1408
    assert m.params_active == 2_689_173_504


def test_tiny_hybrid_covers_every_mixer():
    m = ltmdsl.load(EXAMPLES / "tiny-hybrid.ltm").model
    assert {layer.kind for layer in m.layers} == set(REGISTRY)  # every registered kind, the new ones included
    assert 64 <= m.vocab <= 512 and m.d_model <= 128
    windows = [layer.mixer.window for layer in m.layers_of("attention")]
    assert None in windows and any(w is not None and w <= 16 for w in windows)


def test_stream_hybrid_is_constant_memory():
    m = ltmdsl.load(EXAMPLES / "stream-hybrid.ltm").model
    for layer in m.layers_of("attention"):
        assert layer.mixer.window is not None


def test_jamba_layout():
    m = ltmdsl.load(EXAMPLES / "jamba-v0.1.ltm").model
    mixers = [layer for layer in m.layers if not layer.is_ffn]
    ffns = [layer for layer in m.layers if layer.is_ffn]
    assert [i for i, layer in enumerate(mixers) if layer.kind == "attention"] == [4, 12, 20, 28]
    assert [i for i, layer in enumerate(ffns) if layer.kind == "moe"] == list(range(1, 32, 2))
