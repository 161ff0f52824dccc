"""Your own data through every stage, as a user brings it: TRL-layout dialogues in ``.jsonl.gz`` and a pairwise file
from named generators (tests/realdata.py), the default preset policy, no ``model.tokenizer``, no prompt file and no
reward model. Plus the pieces that make that work, each checked by value."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from realdata import write_user_data

from raydora import encoding, evaluate, inputs, pipeline, schema, validate
from raydora.config import ConfigError, explain, load_config
from raydora.models import train_tokenizer


def _rows(folder: Path) -> list[dict]:
    return [r for f in sorted(folder.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    return train_tokenizer([f"hello world {i} rivers and bees" for i in range(300)], vocab_size=320)


# ---- lengths -------------------------------------------------------------------------------------------------------
def test_encode_keeps_the_prompt_end_and_flags_truncated_rows(tok) -> None:
    prompt = " ".join(f"w{i}" for i in range(80))
    full = encoding.prompt_tokens(tok, prompt)
    truncated: list[bool] = []
    assert len(full) > 40 and len(encoding.prompt_tokens(tok, "hi")) < 40
    ids, resp = encoding.encode_batch(tok, [prompt, "hi"], [["short", "x " * 90], ["a", "b"]], 96,
                                      max_prompt_length=40, truncated=truncated)  # fmt: skip
    assert ids[0] == full[-40:]  # TRL's keep_end: the prompt's last max_prompt_length tokens
    assert len(ids[0]) + len(resp[0][1]) == 96 and resp[0][1][-1] != tok.eos_token_id  # the long response is cut
    assert resp[0][0][-1] == tok.eos_token_id  # the short one keeps its EOS
    assert truncated == [True, False]
    # null max_prompt_length: unchanged behaviour, the prompt takes what the responses leave (at most half here)
    ids2, _ = encoding.encode_batch(tok, [prompt], [["short", "x " * 90]], 64)
    assert ids2[0] == full[-32:]


def test_classifier_encodes_long_prompts_and_long_responses(tok) -> None:
    """`Sequence to truncate too short to respect the provided max_length` came from truncating only the prompt."""
    from raydora.classifier import encode, fit_pair
    from raydora.models import load_tokenizer, minilm_path

    assert fit_pair([1, 2, 3], [4, 5], 8) == ([1, 2, 3], [4, 5])  # fits: unchanged
    assert fit_pair(list(range(10)), [20, 21], 8) == ([4, 5, 6, 7, 8, 9], [20, 21])  # prompt keeps its end
    assert fit_pair([1, 2], list(range(20, 40)), 8) == ([1, 2], list(range(20, 26)))  # response keeps its start
    assert fit_pair(list(range(10)), list(range(20, 40)), 8) == ([6, 7, 8, 9], [20, 21, 22, 23])
    enc_tok = load_tokenizer(minilm_path())
    prompts, responses = ["short question?", "a " * 400, "b " * 400], ["y " * 500, "ok", "c " * 500]
    out = encode(enc_tok, prompts, responses, 32)
    assert out["input_ids"].shape == (3, 32)
    # a pair that fits is encoded exactly as before (the classifiers of earlier runs see the same inputs)
    same = enc_tok(["q?"], ["an answer"], truncation="only_first", max_length=32, padding=True, return_tensors="pt")
    assert encode(enc_tok, ["q?"], ["an answer"], 32)["input_ids"].tolist() == same["input_ids"].tolist()


def test_explain_says_what_happens_to_long_rows() -> None:
    docs = {k: d for k, _, d in explain()}
    assert "data.truncation" in docs["model.max_length"] and "rejected by validation" not in docs["model.max_length"]
    assert "keep_end" in docs["data.truncation"] and "over_length" in docs["data.truncation"]


# ---- chat templates ------------------------------------------------------------------------------------------------
def test_a_conversational_prompt_is_rendered_once_with_the_policy_template(tok) -> None:
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "and rivers?"}]  # fmt: skip
    row = schema.process_record(
        {"chosen": [*turns, {"role": "assistant", "content": "long"}],
         "rejected": [*turns, {"role": "assistant", "content": "no"}]}, None, 10_000)  # fmt: skip
    assert json.loads(row["prompt_messages"]) == turns and row["responses"] == ["long", "no"]
    rendered = encoding.render_prompt(tok, row["prompt"], row["prompt_messages"])
    assert rendered == tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert rendered.count("<|user|>") == 2 and "<|user|>\n<|user|>" not in rendered
    # a plain prompt is one user turn; a tokenizer without a template sees the canonical text
    assert encoding.render_prompt(tok, "q") == tok.apply_chat_template(
        [{"role": "user", "content": "q"}], tokenize=False, add_generation_prompt=True
    )
    plain = train_tokenizer(["abc"] * 10, vocab_size=300)
    plain.chat_template = None
    assert encoding.render_prompt(plain, row["prompt"], row["prompt_messages"]) == row["prompt"]


# ---- model names -----------------------------------------------------------------------------------------------------
def test_a_policy_that_is_not_a_folder_fails_at_once_and_a_cached_name_loads(tmp_path: Path, monkeypatch) -> None:
    from raydora.paths import resolve_model_paths

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    cfg = load_config(None, ["model.policy=acme/llm-1b"])
    with pytest.raises(
        ConfigError, match=r"model.policy: 'acme/llm-1b' is not a local folder.*huggingface-cli download"
    ):
        resolve_model_paths(cfg)
    snap = cache / "models--acme--llm-1b" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (cache / "models--acme--llm-1b" / "refs").mkdir()
    (cache / "models--acme--llm-1b" / "refs" / "main").write_text("abc123")
    assert resolve_model_paths(cfg).model.policy == str(snap)
    assert resolve_model_paths(load_config(None, [])).model.policy == "tiny-gpt2"  # presets pass through
    with pytest.raises(ConfigError, match=r"model\.tokenizer"):
        resolve_model_paths(load_config(None, [f"model.tokenizer={tmp_path / 'nope'}"]))


# ---- target sources ----------------------------------------------------------------------------------------------
def test_target_sources_are_checked_listing_the_sources_found() -> None:
    counts = {"human": 3, "gen-alpha": 5, "unknown": 2}
    validate.check_target_sources(("human",), counts, "d")
    with pytest.raises(ValueError, match=r"\['golden'\].*gen-alpha \(5\), human \(3\), unknown \(2\)"):
        validate.check_target_sources(("golden",), counts, "d")
    with pytest.raises(ValueError, match="at least one other named source"):
        validate.check_target_sources(("human",), {"human": 3, "unknown": 1}, "d")


# ---- held-out metrics ------------------------------------------------------------------------------------------------
def test_heldout_preference_metrics_by_hand() -> None:
    policy = np.array([[-1.0, -3.0], [-2.0, -1.0], [-5.0, -6.0]])
    ref = np.array([[-2.0, -2.0], [-2.0, -2.0], [-5.0, -5.0]])
    m = evaluate.preference_metrics(policy, ref, beta=0.5, resamples=200)
    # margins: 0.5 * ((1) - (-1)) = 1, 0.5 * (0 - 1) = -0.5, 0.5 * (0 - (-1)) = 0.5
    assert m["margin"]["mean"] == pytest.approx((1 - 0.5 + 0.5) / 3)
    assert m["accuracy"]["mean"] == pytest.approx(2 / 3) and m["logp_accuracy"]["mean"] == pytest.approx(2 / 3)
    lo, hi = m["accuracy"]["ci95"]
    assert 0 <= lo <= 2 / 3 <= hi <= 1
    same = evaluate.preference_metrics(ref, ref, beta=0.5, resamples=200)
    assert same["margin"]["mean"] == 0 and same["accuracy"]["mean"] == 0  # the reference's own implicit reward


# ---- through every stage ---------------------------------------------------------------------------------------------
SMALL = [
    "model.precision=fp32",
    "model.max_length=64",
    "model.vocab_size=320",
    "data.heldout_fraction=0.15",
    "sft.batch_size=8",
    "sft.micro_batch_size=8",
    "sft.num_workers=0",
    "train.num_workers=0",
    "train.batch_size=8",
    "train.micro_batch_size=4",
    "train.max_steps=3",
    "train.checkpoint_every=3",
    "train.lr=1e-3",
    "reference.actors=0",  # the SFT corpus, reference and held-out passes in this process (the pool: test_train.py)
    "classifier.backbone=tiny-bert",
    "classifier.epochs=1",
    "classifier.max_length=32",
    "classifier.score_actors=1",
    "classifier.num_workers=0",
    "generate.max_new_tokens=8",
    "generate.actors=0",  # sampled in this process too
    "evaluate.prompts=6",
    "evaluate.bootstrap=100",
]


@pytest.fixture(scope="module")
def user_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_user_data(tmp_path_factory.mktemp("user") / "prefs")


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run folder for both objectives: the DoRA run reuses the KLDPO run's validate, SFT and SFT samples (their
    fingerprints match), as a user's second run would; every stage's output is still checked in each."""
    return tmp_path_factory.mktemp("own")


# dora in the slow tier (CI time, 2026-12-07: 106 s): kldpo covers every stage on your data in the default tier;
# dora adds classify on it (its per-source classifiers are also tested in test_classifier.py).
@pytest.mark.parametrize("objective", ["kldpo", pytest.param("dora", marks=pytest.mark.slow)])
def test_own_data_runs_every_stage_with_no_workaround(
    user_data: Path, shared_root: Path, ray_session, objective
) -> None:
    tmp_path = shared_root
    # DoRA is also judged by one of its own classifiers as the reward: generation win rates on the held-out prompts
    reward = f"evaluate.reward={tmp_path / 'own' / 'classifier' / 'gen-beta'}"
    extra = ["data.target_sources=[human]", reward] if objective == "dora" else []
    cfg = load_config(None, [f"root={tmp_path}", "name=own", f"data.input={user_data}",
                             f"train.objective={objective}", *SMALL, *extra])  # fmt: skip
    results = {r.stage: r for r in pipeline.run(cfg)}
    run = cfg.run_dir
    assert "synth" not in results and ("score" in results) == (objective == "dora")  # classify ends with the score pass
    counts = results["validate"].counts
    assert counts["valid"] + counts["heldout"] + counts["quarantined"] == counts["input"] == 120
    assert counts["heldout"] > 0 and (run / "tokenizer" / "tokenizer.json").is_file()  # trained on the data itself
    # long dialogues were truncated (keep_end), counted, and never crashed any tokenizing stage
    assert results["reference"].counts["truncated"] > 0
    rows = _rows(run / "reference")
    conv = [r for r in rows if r["prompt_messages"]]
    assert conv and all(r["truncated"] == (len(r["prompt_ids"]) + max(map(len, r["response_ids"])) >= 64) or
                        r["truncated"] for r in conv)  # fmt: skip
    report = json.loads((run / "eval" / "report.json").read_text())
    if objective == "kldpo":
        assert report["reward"] == "none" and report["win_rates"] == {}
    else:  # against the SFT policy's samples, each held-out row's chosen response, and each source's responses
        # (the first evaluate.prompts held-out prompts are dialogues: their responses' source is `unknown`)
        assert report["reward"] == "model" and {"sft", "chosen", "unknown"} <= set(report["win_rates"])
        assert all(0 <= w["win_rate"] <= 1 for w in report["win_rates"].values() if w["win_rate"] is not None)
    held = report["heldout"]
    assert held["pairs"] == counts["heldout"] and set(held["policies"]) == {"policy", "sft"}
    assert held["policies"]["sft"]["margin"]["mean"] == 0  # the reference is the SFT policy
    assert "Held-out preference pairs" in (run / "eval" / "report.md").read_text()
    gens = _rows(run / "generations" / "policy")
    assert len(gens) == min(6, counts["heldout"])
    if objective == "dora":
        marker = json.loads((run / "classifier" / "_SUCCESS").read_text())
        assert marker["targets"] == ["human"] and sorted(marker["sources"]) == ["gen-alpha", "gen-beta"]


def test_validate_holds_out_prompts_trains_the_tokenizer_and_drops_over_length(tmp_path: Path, ray_session) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    rows = [{"prompt": f"Explain item {i % 40}.", "chosen": "Sure: " + "detail " * (1 + i % 7) * (30 if i % 10 == 0 else 1),
             "rejected": "No.", "chosen_source": "human", "rejected_source": "gen"} for i in range(120)]  # fmt: skip
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = [f"root={tmp_path}", f"data.input={folder}", "model.max_length=64", "data.heldout_fraction=0.2"]
    keep = load_config(None, [*base, "name=keep"])
    result = validate.run(keep, keep.run_dir)
    c = result.counts
    assert c["valid"] + c["heldout"] + c["quarantined"] == c["input"] == 120 and c["quarantined"] == 0
    held = _rows(keep.run_dir / "heldout")
    valid = _rows(keep.run_dir / "data")
    # held out by prompt: every row of a held-out prompt is held out, none of them trains
    assert {r["prompt"] for r in held}.isdisjoint({r["prompt"] for r in valid})
    assert 0.05 < len({r["prompt"] for r in held}) / 40 < 0.4
    assert all(inputs.heldout_bucket(r["prompt"]) < 0.2 for r in held)
    assert (keep.run_dir / "tokenizer" / "tokenizer.json").is_file()
    assert validate.run(keep, keep.run_dir).skipped  # a rerun skips, the tokenizer included

    from raydora.encoding import prompt_tokens
    from raydora.models import load_tokenizer

    tok = load_tokenizer(keep.run_dir / "tokenizer")

    def too_long(r: dict) -> bool:
        n = len(prompt_tokens(tok, r["prompt"]))
        return any(n + len(tok(x, add_special_tokens=False)["input_ids"]) + 1 > 64 for x in r["responses"])

    expected = sum(too_long(r) for r in valid + held)
    assert 0 < expected < 120
    drop = load_config(None, [*base, "name=drop", "data.truncation=drop"])
    dropped = validate.run(drop, drop.run_dir)
    assert dropped.counts["quarantined"] == expected and dropped.info["reasons"] == {"over_length": expected}
    q = _rows(drop.run_dir / "quarantine")
    assert {r["field"] for r in q} == {"responses[0]"} and all("> model.max_length=64" in r["detail"] for r in q)
    assert all(json.loads(r["raw"])["responses"][1] == "No." for r in q)  # the row itself, kept in quarantine
    # DoRA needs its target source: checked here, listing what the data holds
    dora = load_config(None, [*base, "name=keep", "train.objective=dora"])
    with pytest.raises(ValueError, match=r"Sources found \(responses\): gen \(\d+\), human \(\d+\)"):
        validate.run(dora, dora.run_dir)
    validate.run(load_config(None, [*base, "name=keep", "train.objective=dora", "data.target_sources=[human]"]),
             keep.run_dir)  # fmt: skip


def test_generation_counts_the_prompts_it_cuts(tok, tmp_path: Path) -> None:
    import pyarrow as pa

    from raydora.generate import truncated_prompts

    tok.save_pretrained(str(tmp_path / "m"))
    turns = json.dumps([{"role": "user", "content": "w " * 60}])
    table = pa.table({"prompt": ["hi", "w " * 60, "x"], "prompt_messages": [None, None, turns]})
    n = [len(encoding.prompt_tokens(tok, p, m)) for p, m in zip(*table.to_pydict().values(), strict=True)]
    limit = (n[0] + n[1]) // 2
    assert n[0] <= limit < n[1] and n[2] > limit
    assert truncated_prompts(tmp_path / "m", table, limit) == 2


# ---- data.target: one target-vs-mixture classifier when the rows carry no source labels ---------------------------
def test_target_rows_from_each_layout() -> None:
    import pyarrow as pa

    rows = validate.target_rows(pa.table({"prompt": ["p", "q"], "response": ["a", "b"]}), "f")
    got = [(r["prompt"], r["responses"], r["sources"]) for r in rows]
    assert got == [("p", ["a"], ["target"]), ("q", ["b"], ["target"])]
    many = validate.target_rows(pa.table({"prompt": ["p"], "responses": [["a", "b"]]}), "f")
    assert [r["responses"] for r in many] == [["a"], ["b"]] and len({r["id"] for r in many}) == 2
    chosen = [{"role": "user", "content": "p"}, {"role": "assistant", "content": "yes"}]
    messages = pa.Table.from_pylist([{"prompt": "p", "chosen": chosen}])
    assert validate.target_rows(messages, "f")[0]["responses"] == ["yes"]
    with pytest.raises(inputs.InputError, match=r"f: data.target rows need a `prompt` and a `response`"):
        validate.target_rows(pa.table({"text": ["x"]}), "f")
    with pytest.raises(inputs.InputError, match="row 2"):
        validate.target_rows(pa.table({"prompt": ["p", "q"], "response": ["a", " "]}), "f")


def test_one_mixture_weights_by_hand() -> None:
    import torch

    from raydora import robust, step

    p = torch.tensor([0.5, 0.8, 0.99], dtype=torch.float64)
    # odds p / (1 - p) = dQ0/dP: 1, 4, 99 -> capped at 1 / alpha = 4
    assert robust.dora_mixture_weights(p, alpha=0.25).tolist() == pytest.approx([1.0, 4.0, 4.0])
    info = {"shares": {"mixture": 1.0}, "gammas": {"mixture": 3.0}, "alpha": None, "form": "target_vs_mixture"}
    w = step.dora_row_weights([[0.5, 0.2]], [["unknown", "gen"]], info)  # alpha = 1/K = 0.5: cap 2
    assert w.tolist() == pytest.approx([(1.0 + 0.25) / 2])
    per_source = dict(info, form="per_source")  # the same inputs through the per-source form differ
    assert step.dora_row_weights([[0.5, 0.2]], [["unknown", "gen"]], per_source)[0] != pytest.approx(w[0])


def test_a_target_file_trains_one_target_vs_mixture_classifier(user_data: Path, tmp_path: Path, ray_session) -> None:
    from raydora import classify, train
    from raydora.classify import mixture_p_golden

    # the pairwise file without its source labels; the target: curated answers to other prompts
    unlabelled = tmp_path / "in"
    unlabelled.mkdir()
    rows = [json.loads(x) for x in (user_data / "pairs.jsonl").read_text().splitlines()]
    for r in rows:
        del r["chosen_source"], r["rejected_source"]
    (unlabelled / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    target = tmp_path / "target.jsonl"
    answers = [
        {"prompt": f"Explain topic {i}.", "response": f"Sure. About topic {i}: people study it."} for i in range(40)
    ]
    target.write_text("".join(json.dumps(a) + "\n" for a in answers))
    cfg = load_config(None, [f"root={tmp_path}", "name=t", f"data.input={unlabelled}", f"data.target={target}",
                             "train.objective=dora", *SMALL, "data.heldout_fraction=0"])  # fmt: skip
    assert validate.run(cfg, cfg.run_dir).counts["target"] == 40  # no target_sources check: no labels needed
    classify.run(cfg, cfg.run_dir)
    marker = json.loads((cfg.run_dir / "classifier" / "_SUCCESS").read_text())
    assert marker["sources"] == ["mixture"] and marker["targets"] == ["target"]
    cal = json.loads((cfg.run_dir / "classifier" / "mixture" / "calibration.json").read_text())
    n_target, n_mixture = cal["train_examples"]["golden"], cal["train_examples"]["mixture"]
    assert cal["gamma"] == pytest.approx(n_mixture / n_target) and n_mixture > n_target > 0
    scored = json.loads((cfg.run_dir / "scored" / "_SUCCESS").read_text())
    assert scored["form"] == "target_vs_mixture" and scored["shares"] == {"mixture": 1.0}
    out = _rows(cfg.run_dir / "scored")
    assert len(out) == 60
    for r in out[:5]:  # every response: the mixture classifier's probability with its imbalance divided out
        c = np.array(r["p_golden_by_source"])
        assert r["p_golden"] == pytest.approx(mixture_p_golden(c, np.array([1.0]), np.array([cal["gamma"]])).tolist())
    assert train.dora_info(cfg, cfg.run_dir / "data")["form"] == "target_vs_mixture"
