"""Generation: the seeded sampler, the hf backend through Ray Data on 1 and 2 actors, prompt reading, the stage,
and preference rows for the online loop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raydora import generate as gen
from raydora import synth
from raydora.config import load_config
from raydora.models import build_model, load_tokenizer, save_pretrained, train_tokenizer
from raydora.rundir import read_success


# ---- the sampler --------------------------------------------------------------------------------------------------
def draw(sampler: gen.SeededSampler, logits: torch.Tensor) -> torch.Tensor:
    out = sampler(None, logits)
    assert torch.isinf(out).sum(-1).eq(logits.shape[-1] - 1).all()  # exactly one token left per row
    return out.argmax(-1)


def test_seeded_sampler_draws_the_tempered_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    for temperature in (1.0, 0.5):
        sampler = gen.SeededSampler([123], temperature, 1.0)
        counts = np.bincount([int(draw(sampler, logits)[0]) for _ in range(20000)], minlength=4) / 20000
        expected = torch.softmax(logits[0] / temperature, -1).numpy()
        assert np.abs(counts - expected).max() < 0.012, (counts, expected)


def test_seeded_sampler_top_p_keeps_the_smallest_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    sampler = gen.SeededSampler([7], 1.0, 0.7)  # 0.5 < 0.7 <= 0.8: tokens 0 and 1 only, renormalised
    counts = np.bincount([int(draw(sampler, logits)[0]) for _ in range(10000)], minlength=4) / 10000
    assert counts[2] == counts[3] == 0
    assert abs(counts[0] - 0.5 / 0.8) < 0.015
    first = gen.SeededSampler([7], 1.0, 0.01)  # below the top token's mass: always the top token
    assert all(int(draw(first, logits)[0]) == 0 for _ in range(50))


def test_each_row_draws_from_its_own_seed() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    a = gen.SeededSampler([1, 2, 3], 1.0, 1.0)
    b = gen.SeededSampler([3, 1], 1.0, 1.0)  # other batch, other positions
    seq_a = torch.stack([draw(a, logits) for _ in range(30)])
    seq_b = torch.stack([draw(b, logits[[2, 0]]) for _ in range(30)])
    assert torch.equal(seq_a[:, 0], seq_b[:, 1]) and torch.equal(seq_a[:, 2], seq_b[:, 0])
    assert not torch.equal(seq_a[:, 0], seq_a[:, 1])
    assert gen.sample_seed(0, "a", 0) == gen.sample_seed(0, "a", 0) != gen.sample_seed(0, "a", 1)


# ---- a tiny model -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gen")
    rows = synth.generate_rows(0, 64, k=2, shares={"golden": 0.5, "verbose": 0.5}, label_noise=0.0, seed=0)
    text = [x for r in rows for x in (r["prompt"], *r["responses"])]
    tok = train_tokenizer(text, root / "tok", vocab_size=300)
    save_pretrained(build_model("tiny-gpt2", tok, seed=0), tok, root / "model")
    return root / "model"


def prompts_table(n: int, seed: int = 0) -> pa.Table:
    rng = __import__("random").Random(seed)
    return pa.table({"id": [f"p{i}" for i in range(n)], "prompt": [synth.make_prompt(rng) for _ in range(n)]})


def test_hf_generator_batches_equal_one_prompt_at_a_time(model_dir: Path) -> None:
    """Left padding, the attention mask and the per-sample seeds make a batched sample equal to the same prompt
    generated alone (greedy and sampled)."""
    table = prompts_table(6)
    for sampling in ({"temperature": 0.0}, {"temperature": 1.0, "top_p": 0.9}):
        s = {"max_new_tokens": 12, "n": 2, "seed": 5, **sampling}
        batched = gen.HFGenerator(str(model_dir), s, max_length=64, batch_size=12)(table)
        alone = gen.HFGenerator(str(model_dir), s, max_length=64, batch_size=1)(table)
        assert batched.column("generations").to_pylist() == alone.column("generations").to_pylist()
        assert batched.column("generation_tokens").to_pylist() == alone.column("generation_tokens").to_pylist()
        assert batched.column("id").to_pylist() == table.column("id").to_pylist()
        for tokens, finish in zip(batched.column("generation_tokens").to_pylist(),
                                  batched.column("finish_reasons").to_pylist(), strict=True):  # fmt: skip
            assert all((f == "length") == (t == 12) and 1 <= t <= 12 for t, f in zip(tokens, finish, strict=True))


def test_greedy_equals_transformers_generate(model_dir: Path) -> None:
    table = prompts_table(1)
    g = gen.HFGenerator(str(model_dir), {"temperature": 0.0, "max_new_tokens": 10, "n": 1, "seed": 0}, max_length=64)
    tok = load_tokenizer(model_dir)
    ids = gen._prompt_ids(tok, table.column("prompt").to_pylist(), 54)
    with torch.no_grad():
        ref = g.model.generate(torch.tensor(ids), max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = ref[0, len(ids[0]) :].tolist()
    if tok.eos_token_id in expected:
        expected = expected[: expected.index(tok.eos_token_id) + 1]
    assert g.generate_ids(ids, [0]) == [expected]


def gen_config(**kw):
    cfg = load_config(None, [f"generate.{k}={v}" for k, v in kw.items()])
    return cfg.generate


def test_ray_data_generation_on_two_actors_equals_one_generator_in_this_process(
    model_dir: Path, tmp_path: Path, ray_session
) -> None:
    """Two actors (batches spread over both) give the samples of one generator that sees every batch: here,
    generate.actors=0, the same class in this process, which also writes the same rows in the same files."""
    table = prompts_table(20)
    s = gen.Sampling(temperature=1.0, top_p=1.0, max_new_tokens=8, n=2, seed=3)
    two = gen.generate(model_dir, table, tmp_path / "two", gen_config(actors=2, batch_size=4), s, max_length=64,
                       precision="fp32", fp="b")  # fmt: skip
    here = gen.generate(model_dir, table, tmp_path / "here", gen_config(actors=0, batch_size=4), s, max_length=64,
                        precision="fp32", fp="c")  # fmt: skip
    a, b = gen.read_generations(tmp_path / "here"), gen.read_generations(tmp_path / "two")
    assert a.num_rows == b.num_rows == 20 and a.to_pylist() == b.to_pylist()
    assert sorted(p.name for p in (tmp_path / "here").glob("*.parquet")) == sorted(
        p.name for p in (tmp_path / "two").glob("*.parquet")
    )
    assert sorted(a.column("id").to_pylist()) == sorted(table.column("id").to_pylist())
    assert all(len(g) == 2 for g in a.column("generations").to_pylist())
    total = sum(sum(t) for t in a.column("generation_tokens").to_pylist())
    assert here["tokens"] == two["tokens"] == total and two["backend"] == "hf" and two["tokens_per_s"] > 0
    assert (here["actors"], two["actors"]) == (0, 2)
    assert read_success(tmp_path / "two")["rows"] == {"prompts": 20, "samples": 40}
    # Another seed gives other samples: checked through the stage, whose rerun with a new generate.seed
    # (test_generate_stage_samples_the_policy_and_the_sft_model_and_skips_reruns) needs a pass anyway.


def test_an_actor_pool_that_leaves_no_cpu_for_reads_is_refused(model_dir: Path, tmp_path: Path, ray_session) -> None:
    with pytest.raises(ValueError, match=r"generate\.actors=2 x generate\.actor_cpus=1"):
        gen.generate(model_dir, prompts_table(2), tmp_path / "x", gen_config(actors=2, actor_cpus=1.0),
                     gen.Sampling(), max_length=64)  # fmt: skip
    assert not (tmp_path / "x").exists()


# ---- prompts --------------------------------------------------------------------------------------------------------
def test_read_prompts_from_jsonl_json_and_parquet(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"prompt": f"q{i}", "x": i}) for i in range(3)) + "\n")
    (tmp_path / "b.json").write_text(json.dumps([{"id": "b0", "prompt": "r0"}, {"id": "b1", "prompt": "r1"}]))
    pq.write_table(pa.table({"prompt": ["s0"], "id": [7]}), tmp_path / "c.parquet")
    table = gen.read_prompts(tmp_path)
    assert table.column("prompt").to_pylist() == ["q0", "q1", "q2", "r0", "r1", "s0"]
    ids = table.column("id").to_pylist()
    assert ids[0] == gen.prompt_id("q0") and ids[3:] == ["b0", "b1", "7"]
    assert gen.read_prompts(tmp_path, limit=4).num_rows == 4


def test_compressed_prompt_and_target_files_read_like_plain_ones(tmp_path: Path) -> None:
    """Prompt files (and ``data.target``, read the same way) decompress as validate's inputs do: xz JSON lines, a
    gzipped JSON array, a zstd-compressed parquet file (pyarrow's own reader only guesses gzip/bz2/zstd)."""
    import bz2
    import gzip
    import lzma

    from raydora import validate

    lines = "".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(3)).encode()
    (tmp_path / "a.jsonl.xz").write_bytes(lzma.compress(lines))
    (tmp_path / "b.json.gz").write_bytes(gzip.compress(json.dumps([{"id": "b0", "prompt": "r0"}]).encode()))
    (tmp_path / "c.jsonl.bz2").write_bytes(bz2.compress(json.dumps({"prompt": "t0"}).encode()))
    raw = pa.BufferOutputStream()
    pq.write_table(pa.table({"prompt": ["s0"], "id": ["7"]}), raw)
    out = pa.BufferOutputStream()
    with pa.CompressedOutputStream(out, "zstd") as z:
        z.write(raw.getvalue().to_pybytes())
    (tmp_path / "d.parquet.zst").write_bytes(out.getvalue().to_pybytes())
    table = gen.read_prompts(tmp_path)
    assert table.column("prompt").to_pylist() == ["q0", "q1", "q2", "r0", "t0", "s0"]
    target = tmp_path / "target"
    target.mkdir()
    rows = [{"prompt": "p", "response": "r"}, {"prompt": "p2", "response": "r2"}]
    (target / "t.jsonl.xz").write_bytes(lzma.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    assert validate.write_target(target, tmp_path / "target_rows") == 2


def test_bad_prompts_name_the_file_row_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": ""}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: row 2: field 'prompt'"):
        gen.read_prompts(bad)
    nocol = tmp_path / "nocol.jsonl"
    nocol.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"nocol\.jsonl: no 'prompt' column"):
        gen.read_prompts(nocol)


# ---- preferences for the online loop ----------------------------------------------------------------------------
def test_samples_become_validated_preference_rows(tmp_path: Path, ray_session) -> None:
    from raydora import validate

    p = "reverse: oak pear rose"
    table = pa.table({"id": ["a", "b", "c"], "prompt": [p, p, "count: oak pear"],
                      "generations": [["rose pear oak", "definitely : rose oak", "rose pear oak"], ["x", "x"],
                                      ["2", "3"]]})  # fmt: skip
    from raydora.loop import to_preferences
    from raydora.rewards import gold

    rows, dropped = to_preferences(table, gold(), "policy-r1")
    assert dropped == 1  # "b": one distinct response
    assert rows[0]["responses"] == ["rose pear oak", "definitely : rose oak"]
    assert rows[0]["scores"] == [synth.gold_reward(p, "rose pear oak"), synth.gold_reward(p, "definitely : rose oak")]
    assert rows[0]["sources"] == ["policy-r1", "policy-r1"] and rows[1]["scores"][0] > rows[1]["scores"][1]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in" / "p.parquet")
    result = validate.validate(tmp_path / "in", tmp_path / "out")
    assert result.counts["valid"] == 2 and result.counts["quarantined"] == 0


# ---- the stage ------------------------------------------------------------------------------------------------------
def test_generate_stage_samples_the_policy_and_the_sft_model_and_skips_reruns(tmp_path: Path, ray_session) -> None:
    from raydora import reference
    from raydora.rundir import write_success

    # generate.actors=0 (in this process): the pool is the test above's; this one is about the stage.
    base = [f"root={tmp_path}", "name=r", "synth.rows=16", "synth.eval_rows=6", "sft.enabled=false",
            "model.max_length=64", "model.precision=fp32", "generate.max_new_tokens=6", "generate.n=2",
            "generate.batch_size=4", "evaluate.prompts=5", "generate.actors=0"]  # fmt: skip
    cfg = load_config(None, base)
    run_dir = cfg.run_dir.absolute()
    synth.run(cfg, run_dir)
    init = reference.initial_policy(cfg, run_dir)
    # A second model stands in for the trained policy: the stage only needs a finished train/ with final/.
    tok = load_tokenizer(init)
    save_pretrained(build_model("tiny-gpt2", tok, seed=1), tok, run_dir / "train" / "final")
    write_success(run_dir / "train", {"stage": "train"})
    result = gen.run(cfg, run_dir)
    assert result.counts == {"policy": 10, "sft": 10} and not result.skipped
    pol, sft = (
        gen.read_generations(run_dir / "generations" / "policy"),
        gen.read_generations(run_dir / "generations" / "sft"),
    )
    assert pol.num_rows == sft.num_rows == 5 and set(pol.column_names) >= {"id", "prompt", "reference", "task"}
    assert pol.column("generations").to_pylist() != sft.column("generations").to_pylist()
    assert gen.run(cfg, run_dir).skipped
    # New sampling parameters redo the stage; another seed gives other samples.
    cfg2 = load_config(None, [*base, "generate.seed=9"])
    other = gen.run(cfg2, run_dir)
    assert not other.skipped
    assert (
        other.info["policy"]["tokens"] != result.info["policy"]["tokens"]
        or gen.read_generations(run_dir / "generations" / "policy").column("generations").to_pylist()
        != pol.column("generations").to_pylist()
    )


def test_auto_device_follows_the_cluster(ray_session, monkeypatch: pytest.MonkeyPatch) -> None:
    from raydora.cluster import resolve_device

    assert resolve_device("cpu") == "cpu" and resolve_device("cuda") == "cuda"
    assert resolve_device("auto") == "cpu"  # no GPU here, none in the test cluster
    # A CPU-only driver on a cluster with GPU workers (a KubeRay head) still picks CUDA for the actors.
    monkeypatch.setattr(ray_session, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 1.0})
    assert resolve_device("auto") == "cuda"
    # ... but a pass in this process (reference.actors=0, generate.actors=0) runs where this process is: CPU.
    assert resolve_device("auto", here=True) == "cpu"
    assert gen.resolve_backend("hf", "cuda") == "hf" and gen.resolve_backend("auto", "cpu") == "hf"
