"""Loading checkpoints safely, and digests that identify weights rather than files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from microscope.errors import InputError
from microscope.models import checkpoint, loading
from schemas.config import ModelConfig
from tests.conftest import build_model

GPT2_CLASS = "transformers:GPT2LMHeadModel"
GPT2_KWARGS = dict(n_layer=3, n_embd=32, n_head=2, n_positions=128, vocab_size=512, bos_token_id=0, eos_token_id=0)


def load(path: Path, **kw) -> torch.nn.Module:
    ref = loading.resolve(ModelConfig(source=str(path), **kw))
    return loading.load_model(ref)


def test_same_weights_same_digest_across_formats(tmp_path: Path) -> None:
    model = build_model("gpt2")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: stored once
    save_file(state, tmp_path / "w.safetensors")
    torch.save(model.state_dict(), tmp_path / "w.pt")  # the pickled dict keeps both tied names
    torch.save(model.state_dict(), tmp_path / "w.bin")
    model.save_pretrained(tmp_path / "hf")
    digests = {
        "safetensors": loading.model_digest(load(tmp_path / "w.safetensors", module=GPT2_CLASS, kwargs=GPT2_KWARGS)),
        "pt": loading.model_digest(load(tmp_path / "w.pt", module=GPT2_CLASS, kwargs=GPT2_KWARGS)),
        "bin": loading.model_digest(load(tmp_path / "w.bin", module=GPT2_CLASS, kwargs=GPT2_KWARGS)),
        "hf": loading.model_digest(load(tmp_path / "hf")),
        "memory": loading.model_digest(model),
    }
    assert len(set(digests.values())) == 1, digests


def test_one_changed_weight_changes_digest() -> None:
    model = build_model("llama")
    before = loading.model_digest(model)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] += 1e-3
    assert loading.model_digest(model) != before


def test_digest_is_independent_of_file_path(tmp_path: Path) -> None:
    model = build_model("bert")
    model.save_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    assert loading.model_digest(load(tmp_path / "a")) == loading.model_digest(load(tmp_path / "b"))


class Evil:
    """Unpickling this would run `touch MARKER`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"weight": torch.zeros(2), "payload": Evil(marker)}, tmp_path / "evil.pt")
    with pytest.raises(InputError) as e:
        load(tmp_path / "evil.pt", module=GPT2_CLASS, kwargs=GPT2_KWARGS)
    assert "refusing to load" in str(e.value) and "safetensors" in str(e.value)
    assert not marker.exists()


def test_malicious_bin_in_hf_folder_is_refused(tmp_path: Path) -> None:
    model = build_model("gpt2")
    model.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"payload": Evil(marker)}, tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(InputError, match="refusing to load"):
        load(tmp_path / "hf")
    assert not marker.exists()


def test_truncated_safetensors(tmp_path: Path) -> None:
    model = build_model("gpt2")
    model.save_pretrained(tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(InputError, match="truncated or corrupt"):
        load(tmp_path / "hf")


def test_missing_path_and_unreachable_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InputError, match="does not exist"):
        loading.resolve(ModelConfig(source=str(tmp_path / "nope")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="Hugging Face Hub could not provide it"):
        loading.resolve(ModelConfig(source="some-org/some-model"))


def test_bare_state_dict_needs_module_and_fitting_kwargs(tmp_path: Path) -> None:
    model = build_model("gpt2")
    torch.save(model.state_dict(), tmp_path / "w.pt")
    with pytest.raises(InputError, match="set model.module"):
        loading.resolve(ModelConfig(source=str(tmp_path / "w.pt")))
    with pytest.raises(InputError, match="does not fit"):
        load(tmp_path / "w.pt", module=GPT2_CLASS, kwargs={**GPT2_KWARGS, "n_layer": 2})
    with pytest.raises(InputError, match="cannot be imported"):
        load(tmp_path / "w.pt", module="nowhere.at_all:Net")


def test_plain_torch_module_state_dict(tmp_path: Path) -> None:
    """A non-HF nn.Module from its import path and kwargs, its blocks and hook points found generically."""
    from tests.toy_models import ToyLM

    torch.manual_seed(0)
    net = ToyLM(n_layers=3)
    save_file(net.state_dict(), tmp_path / "toy.safetensors")
    m = load(tmp_path / "toy.safetensors", module="tests.toy_models:ToyLM", kwargs={"n_layers": 3})
    assert loading.model_digest(m) == loading.model_digest(net)
    arch = loading.describe(m)
    assert arch.family == "generic" and arch.n_layers == 3
    assert arch.hook_points[2].resid == "blocks.2" and arch.hook_points[2].mlp == "blocks.2.mlp"
    assert arch.hook_points[2].attn == "blocks.2.attn"
    with pytest.raises(InputError, match="does not fit"):
        load(tmp_path / "toy.safetensors", module="tests.toy_models:ToyLM", kwargs={"n_layers": 2})
    with pytest.raises(InputError, match="model.kwargs do not fit"):
        load(tmp_path / "toy.safetensors", module="tests.toy_models:ToyLM", kwargs={"width": 3})


def test_describe_tables(tmp_path: Path) -> None:
    for family, n_heads in (("gpt2", 2), ("llama", 4), ("bert", 2), ("gpt_neox", 2)):
        arch = loading.describe(build_model(family))
        assert arch.family == family and arch.n_layers == 3 and arch.hidden_size == 32 and arch.n_heads == n_heads
        assert arch.n_params == sum(
            t.numel() for _, t in loading.unique_state(build_model(family)) if t.is_floating_point()
        )
        assert all(p.resid and p.mlp and p.attn for p in arch.hook_points)
        blocks = [m for m in arch.modules if m.name == arch.hook_points[1].resid]
        assert blocks and blocks[0].params > 0


def test_fingerprint_changes_with_bytes(tmp_path: Path) -> None:
    f = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(3)}, f)
    a = checkpoint.fingerprint(f)
    save_file({"a": torch.ones(3)}, f)
    assert checkpoint.fingerprint(f) != a


def test_fingerprint_of_a_folder_under_a_hidden_workspace(tmp_path: Path) -> None:
    """Checkpoints saved under `./.microscope/…` (the demo's, a hidden workspace's) are fingerprinted by their
    bytes: two steps differ, hidden files inside the folder and trainer state do not count, renaming the
    folder does not matter. (A hidden folder above the checkpoint once hid every file: every step of a run
    had one fingerprint, and ingest's cache answered for the first step's weights.)"""
    steps = []
    for step, value in ((200, 0.0), (400, 1.0)):
        d = tmp_path / ".microscope" / "ckpts" / f"step={step}.hf"
        d.mkdir(parents=True)
        save_file({"w": torch.full((3,), value)}, d / "model.safetensors")
        (d / "config.json").write_text('{"model_type": "gpt2"}')
        steps.append(d)
    a, b = (checkpoint.fingerprint(d) for d in steps)
    assert a != b
    (steps[0] / ".cache").write_text("editor state")
    (steps[0] / "trainer_state.json").write_text("{}")
    assert checkpoint.fingerprint(steps[0]) == a
    moved = tmp_path / "elsewhere"
    steps[0].rename(moved)
    assert checkpoint.fingerprint(moved) == a
    (moved / "model.safetensors").unlink()
    assert checkpoint.fingerprint(moved) != a


def test_same_weights_another_function_is_another_model(tmp_path: Path, tiny_gpt2_dir: Path, corpus_file: Path) -> None:
    """Issue 21 #1: the same weights with another config.json field (the activation, a norm's eps) or another
    tokenizer are another model: another digest, so ingest and trace are never served the first one's
    token ids or activations from the store."""
    import json
    import shutil

    from microscope.stages import ingest
    from microscope.store import open_store
    from schemas.config import AuditConfig

    variants = {"base": tmp_path / "base", "gelu": tmp_path / "gelu", "eps": tmp_path / "eps", "tok": tmp_path / "tok"}
    for d in variants.values():
        shutil.copytree(tiny_gpt2_dir, d)
    for name, field, value in (("gelu", "activation_function", "relu"), ("eps", "layer_norm_epsilon", 1e-3)):
        cfg = json.loads((variants[name] / "config.json").read_text())
        assert cfg[field] != value
        (variants[name] / "config.json").write_text(json.dumps({**cfg, field: value}))
    tok = json.loads((variants["tok"] / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two token ids swapped: same vocabulary, other ids
    (variants["tok"] / "tokenizer.json").write_text(json.dumps(tok))

    store = open_store(str(tmp_path / "store"))
    records = {}
    for name, d in variants.items():
        cfg = AuditConfig.model_validate(
            {"model": {"source": str(d)}, "dataset": {"path": str(corpus_file), "seq_len": 32}}
        )
        records[name] = ingest.run(loading.resolve(cfg.model), cfg, store)
    weights = {r.details["weights_digest"] for r in records.values()}
    assert len(weights) == 1  # the same tensors everywhere
    assert len({r.details["model_digest"] for r in records.values()}) == 4
    assert all(r.status.value == "completed" for r in records.values())  # none served from another's prefix
    assert records["tok"].details["dataset_digest"] != records["base"].details["dataset_digest"]  # other token ids
    again = ingest.run(
        loading.resolve(ModelConfig(source=str(variants["eps"]))),
        AuditConfig.model_validate(
            {"model": {"source": str(variants["eps"])}, "dataset": {"path": str(corpus_file), "seq_len": 32}}
        ),
        store,
    )
    assert again.status.value == "cached" and again.details["model_digest"] == records["eps"].details["model_digest"]


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ("more_layers", "12 missing (transformer.h.3."),
        ("fewer_layers", "11 unexpected (transformer.h.2."),
        ("no_tensors", "missing ("),
    ],
)
def test_weights_that_do_not_cover_the_model_are_refused(
    tmp_path: Path, tiny_gpt2_dir: Path, change: str, said: str
) -> None:
    """Issue 21 #2: never an audit of random initialisation: the keys are named (the flag allows them)."""
    import json
    import shutil

    d = tmp_path / change
    shutil.copytree(tiny_gpt2_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    if change == "no_tensors":
        save_file({}, d / "model.safetensors")
    else:
        (d / "config.json").write_text(json.dumps({**cfg, "n_layer": 4 if change == "more_layers" else 2}))
    with pytest.raises(InputError) as err:
        load(d)
    msg = str(err.value)
    assert said in msg and "does not fit its model" in msg and "model.allow_partial_weights: true" in msg
    if change != "no_tensors":
        model = load(d, allow_partial_weights=True)  # asked for: audited anyway
        assert len(model.transformer.h) == (4 if change == "more_layers" else 2)


def test_a_state_dict_that_does_not_fit_names_the_keys(tmp_path: Path) -> None:
    model = build_model("gpt2")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in ("lm_head.weight",)}
    del state["transformer.h.2.mlp.c_fc.weight"]
    save_file(state, tmp_path / "w.safetensors")
    with pytest.raises(InputError, match=r"1 missing \(transformer.h.2.mlp.c_fc.weight\) keys; check model.module"):
        load(tmp_path / "w.safetensors", module=GPT2_CLASS, kwargs=GPT2_KWARGS)


def test_nonfinite_weights_are_refused_naming_the_tensors(
    tmp_path: Path, tiny_gpt2_dir: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 21 #3: NaN/Inf weights are counted per tensor and refused (or, asked for, audited and recorded)."""
    import shutil

    from safetensors.torch import load_file

    from microscope.stages import ingest
    from microscope.store import open_store
    from schemas.config import AuditConfig

    d = tmp_path / "nan"
    shutil.copytree(tiny_gpt2_dir, d)
    state = load_file(d / "model.safetensors")
    w = state["transformer.h.1.mlp.c_fc.weight"]
    w[0, :3] = float("nan")
    w[1, 0] = float("inf")
    save_file(state, d / "model.safetensors")
    expected = {"transformer.h.1.mlp.c_fc.weight": {"nan": 3, "inf": 1}}
    assert loading.nonfinite(load(d)) == expected
    store = open_store(str(tmp_path / "store"))

    def run(allow: bool):
        cfg = AuditConfig.model_validate(
            {
                "model": {"source": str(d), "allow_nonfinite": allow},
                "dataset": {"path": str(corpus_file), "seq_len": 32},
            }
        )
        return ingest.run(loading.resolve(cfg.model), cfg, store)

    with pytest.raises(
        InputError,
        match=r"1 weight tensor\(s\) hold non-finite values: transformer.h.1.mlp.c_fc.weight \(3 NaN, 1 Inf\); fix the checkpoint or set model.allow_nonfinite: true",
    ):
        run(False)
    assert run(True).details["nonfinite"] == expected
    # audited anyway: the report says so above everything else, the command line under the stages
    from flows.cli import _print_record
    from microscope.report import _header
    from schemas.records import AuditRecord

    said = "1 weight tensor(s) hold non-finite values: transformer.h.1.mlp.c_fc.weight (3 NaN, 1 Inf)"
    rec = run(True)
    assert _header({"ingest": rec}, None, None)["nonfinite"] == said
    audit = AuditRecord.model_validate(
        {
            "audit_id": "a",
            "created_at": "2026-12-06T00:00:00Z",
            "status": "completed",
            "config": {},
            "model": {"source": "m", "source_fingerprint": "0"},
            "store_uri": "s",
            "stages": {"ingest": rec.model_dump(mode="json")},
        }  # fmt: skip
    )
    _print_record(audit, as_json=False)
    assert f"warning        {said} (model.allow_nonfinite)" in capsys.readouterr().out
