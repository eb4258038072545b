from __future__ import annotations

from pathlib import Path

import pytest

from schemas.config import AuditConfig, ConfigError, canonical_hash, load_config


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "audit.yaml"
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, "dataset:\n  seq_len: 64\ntrace:\n  layers: [0, -1]\n  hooks: [mlp, resid]\n"),
        {"dataset.path": "x.txt", "model.source": None},
    )
    assert cfg.dataset.seq_len == 64 and cfg.dataset.path == "x.txt"
    assert cfg.trace.layers == [0, -1]
    assert cfg.trace.hooks == ["resid", "mlp"]  # canonical order, so the config hash is order-free
    assert cfg.model.source is None


def test_unknown_key_names_key_and_allowed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "dataset:\n  seq_lenn: 64\n"))
    msg = str(e.value)
    assert "unknown key 'dataset.seq_lenn'" in msg and "seq_len" in msg and "max_tokens" in msg
    assert "\n" not in msg


def test_unknown_section(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match="unknown key 'tracee'.*allowed here: attribution, dataset, gate, landscape, metrics, model, quantize, reliability, report, robustness, sae, seed, trace",
    ):
        load_config(write(tmp_path, "tracee: {}\n"))


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("dataset:\n  seq_len: many\n", "dataset.seq_len: Input should be a valid integer"),
        ("trace:\n  hooks: [resid, mlpp]\n", "trace.hooks.1: Input should be 'resid', 'mlp' or 'attn'"),
        ("trace:\n  layers: []\n", "list at least one layer"),
        ("dataset:\n  seq_len: 128\n  max_tokens: 64\n", "raise max_tokens or lower seq_len"),
        ("model:\n  module: mypkg.Net\n", "'package.module:ClassName'"),
        ("- a\n- b\n", "must hold a mapping"),
        ("dataset: [\n", "not valid YAML at line"),
    ],
)
def test_bad_values_say_how_to_fix(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert needle in str(e.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_config_hash_is_canonical() -> None:
    def h(cfg: AuditConfig) -> str:
        return canonical_hash(cfg.trace.model_dump())

    a = AuditConfig.model_validate({"trace": {"hooks": ["mlp", "resid"]}})
    b = AuditConfig.model_validate({"trace": {"hooks": ["resid", "mlp"]}})
    c = AuditConfig.model_validate({"trace": {"hooks": ["resid"]}})
    assert h(a) == h(b) != h(c)
    assert canonical_hash({"b": 1, "a": [1, 2]}) == canonical_hash({"a": [1, 2], "b": 1})


def test_json_schema_exports() -> None:
    schema = AuditConfig.model_json_schema()
    assert set(schema["properties"]) >= {"model", "dataset", "trace", "report"}


def test_robustness_section_names_the_fix(tmp_path: Path) -> None:
    cases = {
        "robustness:\n  attacks: [apgd-ce]\n": "only used with version 'custom'",
        "robustness:\n  version: custom\n": "version 'custom' needs an attacks list",
        "robustness:\n  version: custom\n  attacks: [pgd]\n": "unknown AutoAttack attack 'pgd'; choose from apgd-ce",
        "robustness:\n  eps: {Linfinity: 0.1}\n": "eps key 'Linfinity' is not a norm",
        "robustness:\n  sweep: [0.1, 0.0]\n": "increasing order",
        "robustness:\n  norms: [L3]\n": "robustness.norms.0",
    }
    for text, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_config(write(tmp_path, text))


def test_yaml_that_parses_silently_wrong_is_refused(tmp_path: Path) -> None:
    """Issue 21 #11: a key given twice (yaml keeps the last) and aliases (a billion laughs) name the line."""
    with pytest.raises(ConfigError, match=r"audit.yaml line 3: key 'seq_len' is given twice; keep one"):
        load_config(write(tmp_path, "dataset:\n  seq_len: 32\n  seq_len: 64\n"))
    laughs = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    laughs += "".join(f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))
    with pytest.raises(ConfigError, match=r"audit.yaml line 2: YAML aliases \(\*name\) are not accepted"):
        load_config(write(tmp_path, laughs))
    big = write(tmp_path, "# " + "x" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match="a config is a few KB"):
        load_config(big)


def test_audit_ids_that_name_other_files_are_refused() -> None:
    from schemas.stages import check_audit_id

    assert check_audit_id("20261206-154912-a2c5ba") == "20261206-154912-a2c5ba"
    for bad in ("../x", "a/b", "a..b", ".hidden", "x" * 129, ""):
        with pytest.raises(ValueError, match="is not allowed: use letters, digits"):
            check_audit_id(bad)
