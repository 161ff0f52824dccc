"""Config: YAML + dotted overrides, and errors that name the key."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from pathlib import Path

import pytest

from raydora.config import ConfigError, RunConfig, dump_yaml, explain, field_docs, from_dict, load_config

PRESETS = sorted((Path(__file__).parents[1] / "jobs" / "configs").glob("*.yaml"))


def test_defaults_and_overrides() -> None:
    cfg = load_config(None, ["train.objective=dora", "train.lam=0.5", "evaluate.alphas=[0, 1]", "name=x"])
    assert cfg.train.objective == "dora" and cfg.train.lam == 0.5
    assert cfg.evaluate.alphas == (0.0, 1.0) and isinstance(cfg.evaluate.alphas[0], float)
    assert cfg.run_dir == Path("runs/x")
    assert cfg.train.beta == RunConfig().train.beta  # untouched keys keep their defaults


def test_classifiers_follow_the_run_precision_unless_set(tmp_path: Path) -> None:
    assert load_config(None, ["model.precision=fp32"]).classifier_precision == "fp32"
    assert load_config(None, ["model.precision=bf16"]).classifier_precision == "bf16"
    assert load_config(None, []).classifier_precision == "auto"
    cfg = load_config(None, ["model.precision=bf16", "classifier.precision=fp32"])
    assert (cfg.model.precision, cfg.classifier_precision) == ("bf16", "fp32")
    # Resolved where used, not stored: a saved config reloaded with another model.precision carries it along.
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_yaml(load_config(None, ["model.precision=fp32"])))
    assert load_config(saved, ["model.precision=bf16"]).classifier_precision == "bf16"
    with pytest.raises(ConfigError, match=r"classifier\.precision"):
        load_config(None, ["classifier.precision=fp16"])


def test_classifiers_train_in_this_process_only_one_after_another() -> None:
    assert load_config(None, ["classifier.num_workers=0"]).classifier.num_workers == 0
    with pytest.raises(ConfigError, match=r"classifier\.num_workers: must be >= 0"):
        load_config(None, ["classifier.num_workers=-1"])
    with pytest.raises(ConfigError, match=r"classifier\.concurrency: must be 1 with num_workers=0"):
        load_config(None, ["classifier.num_workers=0", "classifier.concurrency=2"])


def test_configs_are_frozen() -> None:
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lam = 2.0  # type: ignore[misc]


def test_yaml_file_and_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("name: r1\ntrain:\n  objective: kldpo\n  tau: 0.05\n  lr: 1e-5\nsynth:\n  k: 2\n")
    cfg = load_config(path, ["train.tau=0.1"])
    assert (cfg.name, cfg.train.objective, cfg.train.tau, cfg.train.lr, cfg.synth.k) == ("r1", "kldpo", 0.1, 1e-5, 2)
    again = tmp_path / "again.yaml"
    again.write_text(dump_yaml(cfg))
    assert load_config(again) == cfg


def test_dict_override_replaces_the_whole_mapping() -> None:
    cfg = from_dict({"synth": {"source_shares": {"old": 0.75}}}, ["synth.source_shares={a: 0.5, b: 0.25}"])
    assert cfg.synth.source_shares == {"a": 0.5, "b": 0.25}


@pytest.mark.parametrize(
    ("overrides", "key", "message"),
    [
        (["train.lamda=1"], "train.lamda", "unknown key"),
        (["trian.lam=1"], "trian", "unknown key"),
        (["train.lam=abc"], "train.lam", "expected a number"),
        (["train.epochs=1.5"], "train.epochs", "expected an integer"),
        (["train.use_gpu=1"], "train.use_gpu", "expected true or false"),
        (["train.objective=minimax"], "train.objective", "must be one of"),
        (["train.lam=0"], "train.lam", "must be > 0"),
        (["train.lam"], "train.lam", "section.key=value"),
        (["train.lam.x=1"], "train.lam", "expected a number"),
        (["train=1"], "train", "expected a mapping"),
        (["synth.alpha=0.5"], "synth.source_shares", "must be 1"),
        (["evaluate.alphas=[0.5, 2]"], "evaluate.alphas", "[0, 1]"),
        (["train.lam=.nan"], "train.lam", "finite"),
        (["train.objective=wdpo", "model.attn_implementation=sdpa"], "model.attn_implementation", "double backward"),
        (["train.objective=wdpo", "train.loss=lire"], "train.loss", "pairwise"),
        (["train.objective=kldpo", "train.kldpo_normalize=false"], "train.kldpo_clip", "overflow"),
        (["model.attn_implementation=flash_attention_2"], "model.attn_implementation", "CUDA"),
        (["model.attn_implementation=flex_attention"], "model.attn_implementation", "flex_attention needs CUDA"),
        (["model.pad_to_multiple_of=-8"], "model.pad_to_multiple_of", "must be >= 0"),
        (["model.logprob_chunk=-1"], "model.logprob_chunk", "must be >= 0"),
        (["reference.actors=-1"], "reference.actors", "must be >= 0"),
        (["generate.actors=-1"], "generate.actors", "must be >= 0"),
    ],
)
def test_errors_name_the_key(overrides: list[str], key: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        load_config(None, overrides)
    assert err.value.key == key
    assert str(err.value).startswith(key)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  betta: 0.1\n")
    with pytest.raises(ConfigError, match=r"train\.betta: unknown key.*bad\.yaml"):
        load_config(path)
    path.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_override_errors_name_the_override_not_the_file(tmp_path: Path) -> None:
    path = tmp_path / "good.yaml"
    path.write_text("evaluate:\n  bootstrap: 1000\n")
    with pytest.raises(ConfigError, match=r"evaluate\.bootstrap: .*from the override 'evaluate\.bootstrap=50'") as e:
        load_config(path, ["evaluate.bootstrap=50"])
    assert "good.yaml" not in str(e.value)
    path.write_text("evaluate:\n  bootstrap: 50\n")
    with pytest.raises(ConfigError, match=r"evaluate\.bootstrap: .*\(in .*good\.yaml\)"):
        load_config(path, ["train.lam=0.5"])


def test_every_field_is_documented() -> None:
    rows = explain()
    undocumented = [key for key, _, doc in rows if not doc]
    assert not undocumented, f"fields without a docstring: {undocumented}"
    assert ("train.lam", "1.0", field_docs(type(RunConfig().train))["lam"]) in rows


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_presets_load(preset: Path) -> None:
    assert isinstance(load_config(preset), RunConfig)


def test_wdpo_gradient_modes_and_their_attention() -> None:
    """The exact double backward needs eager attention (auto picks it); the finite-difference gradient runs on
    any kernel (auto keeps sdpa) but only in pointwise mode under DDP."""
    from raydora.reference import attn_implementation

    assert attn_implementation(from_dict({"train": {"objective": "wdpo"}})) == "eager"
    fd = from_dict({"train": {"objective": "wdpo", "wdpo_grad": "finite_difference"}})
    assert attn_implementation(fd) == "sdpa"
    from_dict(
        {"train": {"objective": "wdpo", "wdpo_grad": "finite_difference"}, "model": {"attn_implementation": "sdpa"}}
    )
    with pytest.raises(ConfigError, match=r"model\.attn_implementation: 'sdpa' has no double backward"):
        from_dict({"train": {"objective": "wdpo"}, "model": {"attn_implementation": "sdpa"}})
    with pytest.raises(ConfigError, match=r"train\.wdpo_grad: finite_difference needs wdpo_mode=pointwise"):
        from_dict({"train": {"objective": "wdpo", "wdpo_grad": "finite_difference", "wdpo_mode": "global"}})
    with pytest.raises(ConfigError, match=r"train\.wdpo_grad: finite_difference needs strategy=ddp"):
        from_dict({"train": {"objective": "wdpo", "wdpo_grad": "finite_difference", "strategy": "fsdp"}})


def test_a_config_error_survives_ray_and_tune_copying_it() -> None:
    e = ConfigError("name", "expected a string")
    for clone in (copy.copy(e), pickle.loads(pickle.dumps(e))):
        assert isinstance(clone, ConfigError) and (clone.key, str(clone)) == ("name", "name: expected a string")


def test_sft_reads_the_shared_train_keys_and_the_sigterm_setting_but_no_preference_key() -> None:
    from raydora import sft

    cfg = load_config(None, ["train.preemption_checkpoint=false", "train.objective=dora", "train.beta=0.5",
                             "train.grad_clip=0.5", "sft.checkpoint_every=7"])  # fmt: skip
    section, identity = sft.train_section(cfg)
    assert section.preemption_checkpoint is False and "preemption_checkpoint" not in identity  # no fingerprint
    assert (section.objective, section.beta, section.grad_clip, section.packing) == ("erm", 0.1, 0.5, False)
    assert identity["checkpoint_every"] == section.checkpoint_every == 7 and identity["loss"] == "sft"
    assert sft.train_section(load_config(None, ["train.beta=0.5"]))[1] == sft.train_section(load_config())[1]
