"""Models over several devices (issue 15) on the CPU: accelerate's device map end to end, each cache layer on its
layer's device, the fit estimate, the model identity's dtype, and bad placement options.

A real second device needs a GPU (tests/test_gpu_placement.py); here accelerate's CPU and disk placements stand in:
a disk-offloaded layer runs on the CPU under accelerate's hooks, and a `meta` device receives a layer's tensors
where the logic only moves them."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import qjl.attention  # noqa: F401 - registers "qjl"
from conftest import invoke
from qjl.config import QJLConfig
from qjl.errors import CacheFileError, ConfigError, ModelError
from qjl.models import LoadedModel, load_model, model_identity
from qjl.placement import (Placement, dispatch, layer_counts, layer_devices, make_placement, parse_max_memory,
                           parse_size)
from qjl.session import Session
from qjl_cli.errors import ExitCode

WORDS = ["<unk>", "<eos>"] + [f"w{i}" for i in range(254)]
DOCUMENT = " ".join(WORDS[2 + (i * 7) % 254] for i in range(300))


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer of WORDS (no chat template: the plain prompt), for random-weight models."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama (4 layers) with a word-level tokenizer, saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    word_tokenizer().save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                      eos_token_id=1, bos_token_id=1)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def _question_logits(session: Session, question: str) -> torch.Tensor:
    ids = torch.tensor([session.question_ids(question)], device=session.device)
    with torch.no_grad():
        logits = session.model(input_ids=ids, past_key_values=session.cache, use_cache=True).logits
    session.rollback()
    return logits


def _round_trip(loaded: LoadedModel, path) -> tuple[torch.Tensor, torch.Tensor, Session]:
    """prefill -> logits of a question -> save -> load in a new session -> the same question's logits."""
    first = Session(loaded, QJLConfig())
    first.load_document(DOCUMENT, max_new_tokens=16)
    before = _question_logits(first, "w5 w6 w7")
    first.save_cache(path)
    second = Session(loaded, QJLConfig())
    second.load_cache(path, max_new_tokens=16)
    return before, _question_logits(second, "w5 w6 w7"), second


# --- parsing ---------------------------------------------------------------------------------------------------
def test_max_memory_parses_to_accelerates_dict_of_bytes():
    assert parse_max_memory("0=20GiB, 1=512MiB,cpu=64GB") == {0: 20 << 30, 1: 512 << 20, "cpu": 64 * 10**9}
    assert parse_max_memory("cuda:1=1.5G") == {1: int(1.5 * 2**30)}
    assert parse_size("1000") == 1000
    for bad, what in (("0=lots", "not a size"), ("gpu0=1G", "unknown device"), ("20GiB", "DEVICE=SIZE"),
                      ("0=1G,0=2G", "twice"), ("disk=10G", "unknown device"), ("cpu=0", "no memory")):
        with pytest.raises(ConfigError, match=what):
            parse_max_memory(bad)


def test_placement_from_options_and_environment(monkeypatch):
    monkeypatch.delenv("QJL_DEVICE_MAP", raising=False)
    monkeypatch.delenv("QJL_MAX_MEMORY", raising=False)
    assert make_placement() == Placement()
    assert make_placement(device="cpu") == Placement(device="cpu")
    # --max-memory alone means accelerate's auto placement over it
    assert make_placement(max_memory="cpu=2GiB") == Placement(None, "auto", {"cpu": 2 << 30})
    monkeypatch.setenv("QJL_DEVICE_MAP", "sequential")
    monkeypatch.setenv("QJL_MAX_MEMORY", "cpu=1GiB")
    assert make_placement() == Placement(None, "sequential", {"cpu": 1 << 30})
    assert make_placement(device_map="balanced").device_map == "balanced"  # the option wins
    with pytest.raises(ConfigError, match="not both"):
        make_placement(device="cpu")
    monkeypatch.delenv("QJL_DEVICE_MAP")
    monkeypatch.delenv("QJL_MAX_MEMORY")
    with pytest.raises(ConfigError, match="one of auto, balanced, sequential"):
        make_placement(device_map="everywhere")
    with pytest.raises(ConfigError, match="cpu, cuda or cuda:N"):
        make_placement(device="gpu")


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has a GPU 7")
def test_a_gpu_that_does_not_exist_is_named():
    with pytest.raises(ConfigError, match="cuda:7 does not exist"):
        make_placement(device="cuda:7")
    with pytest.raises(ConfigError, match="GPU 7 does not exist"):
        make_placement(max_memory="7=1GiB,cpu=1GiB")


@pytest.mark.parametrize("args,code,words", [
    (["--max-memory", "0=lots"], ExitCode.USAGE, "'lots' is not a size"),
    (["--device-map", "everywhere"], ExitCode.USAGE, "--device-map"),
    (["--device", "cuda:7"] if torch.cuda.device_count() < 8 else ["--device", "tpu"], ExitCode.USAGE, "--device"),
    (["--device", "cpu", "--device-map", "auto"], ExitCode.USAGE, "not both"),
])
def test_bad_placement_options_are_one_line_errors(fake_model, doc, args, code, words):
    for command in (["ask", doc, "Who?"], ["cache", "save", doc, "-o", doc.with_suffix(".qjl")]):
        result = invoke(*command, *args)
        assert result.exit_code == code, result.output
        assert result.stderr.count("\n") == 1 and words in result.stderr and "Traceback" not in result.stderr
        assert "load" not in fake_model.calls  # refused before the model loads


def test_the_cli_passes_the_placement_and_what_must_fit(fake_model, doc, monkeypatch):
    monkeypatch.setenv("QJL_MAX_MEMORY", "cpu=3GiB")
    result = invoke("ask", doc, "Who?", "--json")
    assert result.exit_code == 0, result.output
    assert fake_model.calls["placement"] == Placement(None, "auto", {"cpu": 3 << 30})
    text, kv = fake_model.calls["fit"]
    assert kv == "turbo" and "Ana Ruiz" in text
    import json

    assert json.loads(result.stdout)["layers"] == {"cpu": 30}


# --- where the layers went -------------------------------------------------------------------------------------
def test_layer_devices_follow_accelerates_device_map():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=32))
    assert layer_devices(model) == [torch.device("cpu")] * 4  # no map: the parameters' device
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1,
                           "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": 1, "lm_head": 1}
    devices = layer_devices(model)
    assert devices == [torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cpu"), torch.device("cpu")]
    assert layer_counts(devices) == {"cuda:0": 1, "cuda:1": 1, "cpu": 2}
    model.hf_device_map = {"model": "cpu", "lm_head": "cpu"}  # an ancestor's entry places its children
    assert layer_devices(model) == [torch.device("cpu")] * 4


def test_a_device_map_on_the_cpu_round_trips_prefill_save_load(tiny_folder, tmp_path):
    loaded = load_model(str(tiny_folder), placement=make_placement(device_map="auto", max_memory="cpu=1GiB"))
    assert loaded.dtype == torch.float32 and loaded.placement == {"cpu": 4}
    before, after, session = _round_trip(loaded, tmp_path / "doc.qjl")
    assert torch.equal(before, after)
    assert all(layer.device == torch.device("cpu") for layer in session.cache.layers)


def test_layers_accelerate_offloads_to_disk_run_under_its_hooks_and_round_trip(tiny_folder, tmp_path):
    """A real two-place split: layers 2-3 offloaded to disk by accelerate's dispatch_model (weights read at each
    forward by its hooks); their cache stays in CPU memory; prefill -> save -> load gives the same logits as the
    model that was never split."""
    from accelerate import dispatch_model

    whole = load_model(str(tiny_folder), device="cpu")
    split_model = LlamaForCausalLM.from_pretrained(tiny_folder, attn_implementation="qjl").eval()
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "cpu", "model.layers.2": "disk", "model.layers.3": "disk", "model.norm": "cpu",
                  "lm_head": "cpu"}
    dispatch_model(split_model, device_map=device_map, offload_dir=str(tmp_path / "offload"))
    assert split_model.model.layers[3].self_attn.q_proj.weight.device.type == "meta"  # really offloaded
    split = LoadedModel(split_model, whole.tokenizer, whole.name, whole.identity, whole.revision)
    assert split.placement == {"cpu": 4} and split.input_device == torch.device("cpu")
    before, after, _ = _round_trip(split, tmp_path / "split.qjl")
    reference, _, _ = _round_trip(whole, tmp_path / "whole.qjl")
    assert torch.equal(before, after) and torch.allclose(before, reference, atol=1e-5)
    assert (tmp_path / "split.qjl").read_bytes()[:200] != b""  # the same file layout either way
    from qjl.cachefile import open_file

    assert open_file(tmp_path / "split.qjl").tensors.keys() == open_file(tmp_path / "whole.qjl").tensors.keys()


def test_a_file_loads_each_layer_onto_its_own_device(tiny_folder, tmp_path, monkeypatch):
    """The loader sends layer i's tensors to devices[i], straight from the memory map; `meta` stands in for a second device, and a recording load_tensors for the layers that would sit there."""
    from qjl.cache import QJLLayer
    from qjl.store import read_cache_file

    loaded = load_model(str(tiny_folder), device="cpu")
    session = Session(loaded, QJLConfig())
    session.load_document(DOCUMENT, max_new_tokens=16)
    path = session.save_cache(tmp_path / "doc.qjl")
    got = {}

    def record(layer, tensors, shared, dtype=None):
        got[layer.layer_idx] = (tensors, shared)

    monkeypatch.setattr(QJLLayer, "load_tensors", record)
    devices = ["cpu", "meta", "cpu", "meta"]
    read_cache_file(path, loaded.model.config, loaded.identity, devices=devices, dtype=torch.float32,
                    revision=loaded.revision)
    for i, device in enumerate(devices):
        tensors, shared = got[i]
        assert {t.device.type for t in [*tensors.values(), *shared.values()]} == {device}
        assert "key_codes" in tensors and "window_keys" in tensors
    # each shared matrix once a device, shared by that device's layers
    assert got[0][1]["rotation"] is got[2][1]["rotation"] and got[1][1]["rotation"] is got[3][1]["rotation"]
    assert got[0][1]["rotation"] is not got[1][1]["rotation"]


def test_a_saved_file_is_a_plain_safetensors_file(tiny_folder, tmp_path):
    """The save writes tensor by tensor; safetensors' own reader reads it back, every tensor equal."""
    from safetensors import safe_open

    from qjl.store import _file_tensors

    loaded = load_model(str(tiny_folder), device="cpu")
    session = Session(loaded, QJLConfig())
    session.load_document(DOCUMENT, max_new_tokens=16)
    path = session.save_cache(tmp_path / "doc.qjl")
    tensors = _file_tensors(session.cache)
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(tensors)
        assert all(torch.equal(f.get_tensor(n), tensors[n]) for n in tensors)
        meta = f.metadata()
    assert meta["model_dtype"] == "float32" and meta["model_revision"] == loaded.revision


# --- the model's identity: dtype and revision ------------------------------------------------------------------
def test_identity_holds_dtype_and_revision(tiny_folder):
    loaded = load_model(str(tiny_folder), device="cpu")
    cfg, tok = loaded.model.config, loaded.tokenizer
    assert loaded.revision.startswith("local-")
    base = model_identity(cfg, tok, torch.float32, loaded.revision)
    assert loaded.identity == base
    assert model_identity(cfg, tok, torch.bfloat16, loaded.revision) != base
    assert model_identity(cfg, tok, torch.float32, "abc123") != base


def test_a_cache_of_another_dtype_is_refused_naming_both(tiny_folder, tmp_path):
    fp32 = load_model(str(tiny_folder), device="cpu")
    session = Session(fp32, QJLConfig())
    session.load_document(DOCUMENT, max_new_tokens=16)
    path = session.save_cache(tmp_path / "doc.qjl")
    bf16 = load_model(str(tiny_folder), device="cpu", dtype=torch.bfloat16)
    with pytest.raises(CacheFileError, match="float32.*not .*bfloat16"):
        Session(bf16, QJLConfig()).load_cache(path, max_new_tokens=16)
    Session(fp32, QJLConfig()).load_cache(path, max_new_tokens=16)  # its own dtype loads


@pytest.mark.parametrize("old", ["3", "4", "5", "6"])
def test_a_file_of_an_older_format_version_is_refused_with_one_line(tiny_folder, tmp_path, old):
    """Files written before the identity held dtype and revision (version 3) would fail the identity check with a
    misleading message, version 4's turbo scales and values are laid out otherwise than version 5's, a version 5
    config lacks turbo_layer_bits (its layer 1 would read as 3-bit values) and a version 6 one sketch_residual_weight
    (its qjl signs would read against a block-weighted projection); the version says what happened."""
    from qjl.cachefile import FORMAT_VERSION
    from qjl.store import _file_tensors, cache_metadata, read_cache_file, write_cache_file

    loaded = load_model(str(tiny_folder), device="cpu")
    session = Session(loaded, QJLConfig())
    session.load_document(DOCUMENT, max_new_tokens=16)
    meta = cache_metadata(session.cache, model_name="tiny", identity=loaded.identity, suffix_template="{question}")
    meta["format_version"] = old
    write_cache_file(tmp_path / "old.qjl", _file_tensors(session.cache), meta)
    assert FORMAT_VERSION == "7"
    with pytest.raises(CacheFileError, match=f"version '{old}', this qjl reads version 7; save the document again"):
        read_cache_file(tmp_path / "old.qjl", loaded.model.config, loaded.identity)


# --- will it fit? ----------------------------------------------------------------------------------------------
def test_a_model_that_cannot_fit_is_refused_before_loading_with_the_estimate(tiny_folder, monkeypatch):
    from transformers import AutoModelForCausalLM

    def never(*args, **kwargs):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", never)
    placement = make_placement(max_memory="cpu=1MiB")
    with pytest.raises(ModelError, match=r"does not fit even with offload: it needs about \d\.\d MiB \(weights "
                                         r"\d\.\d MiB in float32 \+ the turbo cache of 300 tokens .*names 1\.0 MiB"):
        load_model(str(tiny_folder), placement=placement, fit=(DOCUMENT, "turbo"))
    # 256k tokens: the exact cache (the fp32 model's 32 bits a number, 1 GiB) outgrows 256 MiB; the compressed fits
    with pytest.raises(ModelError, match="exact cache of 262,144 tokens"):
        load_model(str(tiny_folder), placement=make_placement(max_memory="cpu=256MiB"), fit=(1 << 18, "exact"))
    with pytest.raises(AssertionError, match="weights were read"):  # the compressed one passes the check
        load_model(str(tiny_folder), placement=make_placement(max_memory="cpu=256MiB"), fit=(1 << 18, "turbo"))


def test_the_cli_refuses_a_model_too_big_for_max_memory_with_exit_4(tiny_folder, doc, qjl_home):
    result = invoke("ask", doc, "Who?", "-m", tiny_folder, "--max-memory", "cpu=100KiB")
    assert result.exit_code == ExitCode.MODEL, result.output
    assert result.stderr.count("\n") == 1 and "does not fit even with offload" in result.stderr


def test_a_model_accelerate_cannot_place_is_a_model_error(tiny_folder, monkeypatch):
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise ValueError("LlamaForCausalLM does not support `device_map='sequential'` yet.\nmore detail")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    with pytest.raises(ModelError, match=r"with --device-map sequential: LlamaForCausalLM does not support .*yet\.$"):
        load_model(str(tiny_folder), placement=make_placement(device_map="sequential"))


def test_dispatch_places_a_model_built_in_memory_with_accelerate():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=32)).eval()
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        want = model(ids).logits
    placed = dispatch(model, make_placement(device_map="sequential", max_memory="cpu=1GiB"))
    assert placed.hf_device_map and layer_devices(placed) == [torch.device("cpu")] * 2
    with torch.no_grad():
        assert torch.equal(placed(ids).logits, want)
    with pytest.raises(ModelError, match="does not fit the memory named"):
        dispatch(LlamaForCausalLM(model.config), make_placement(max_memory="cpu=10KiB"))


def test_info_names_the_layers_per_device():
    from qjl.results import DocumentStats
    from qjl_cli import render

    class Loaded:
        name, context_length, placement = "m", 4096, {"cuda:0": 16, "cpu": 16}

    class Sess:
        def history(self):
            return []

        def tail_tokens(self):
            return 0

    line = render.session_info(DocumentStats(100, 1.0, 1000, 3.0, 6000), Loaded(), "turbo", "doc", 0, Sess())
    assert line.endswith("layers: cuda:0 16, cpu 16")
