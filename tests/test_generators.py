"""Long-lived generators (hf backend, tiny GPT-2, CPU): after a weight sync, samples equal those of a generator
started fresh from the same weights; a generator that missed a sync refuses to sample; the weights travel once
through the object store. One pool of 2 actors serves the module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
import ray
import torch

from raydora import generate as gen
from raydora import generators, synth
from raydora.config import load_config
from raydora.models import build_model, load_tokenizer, save_pretrained, train_tokenizer
from raydora.rundir import read_success

GREEDY = gen.Sampling(temperature=0.0, max_new_tokens=10, n=1, seed=0)
SAMPLED = gen.Sampling(temperature=1.0, top_p=0.9, max_new_tokens=10, n=2, seed=7)
GEN = ["generate.backend=hf", "generate.actors=2", "generate.batch_size=3", "generate.threads=1"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny GPT-2 policies with the benchmark's BPE: w0 (seed 0) and w1 (seed 1)."""
    root = tmp_path_factory.mktemp("pool")
    rows = synth.generate_rows(0, 64, k=2, shares={"golden": 0.5, "verbose": 0.5}, label_noise=0.0, seed=0)
    tok = train_tokenizer((x for r in rows for x in (r["prompt"], *r["responses"])), root / "tok", vocab_size=300)
    return {
        name: save_pretrained(build_model("tiny-gpt2", tok, seed=seed), tok, root / name)
        for name, seed in (("w0", 0), ("w1", 1))
    }


@pytest.fixture(scope="module")
def pool(models: dict[str, Path], ray_session: object) -> Iterator[generators.GeneratorPool]:
    cfg = load_config(None, GEN)
    with generators.GeneratorPool(models["w0"], cfg.generate, max_length=64, precision="fp32") as p:
        yield p


def prompts(n: int) -> pa.Table:
    import random

    rng = random.Random(1)
    return pa.table({"id": [f"q{i}" for i in range(n)], "prompt": [synth.make_prompt(rng) for _ in range(n)]})


def fresh(model_dir: Path, table: pa.Table, sampling: gen.Sampling) -> list[list[str]]:
    """The samples of an hf generator loaded from ``model_dir`` in this process, all prompts in one batch, on one
    thread like the pool's actors (restored after)."""
    threads = torch.get_num_threads()
    try:
        g = gen.HFGenerator(str(model_dir), sampling.__dict__, max_length=64, batch_size=64, threads=1)
        out: list[list[str]] = g(table).column("generations").to_pylist()
    finally:
        torch.set_num_threads(threads)
    return out


def samples(pool: generators.GeneratorPool, table: pa.Table, sampling: gen.Sampling) -> list[list[str]]:
    out = pool.sample(table, sampling)
    assert out.column("id").to_pylist() == table.column("id").to_pylist()  # the prompts' order, across 2 actors
    result: list[list[str]] = out.column("generations").to_pylist()
    return result


def test_synced_weights_sample_like_a_generator_started_from_them(
    pool: generators.GeneratorPool, models: dict[str, Path]
) -> None:
    table = prompts(7)  # 3 batches of 3, 3, 1 rows over the 2 actors
    pool.sync(models["w0"], 0)
    before = {s: samples(pool, table, s) for s in (GREEDY, SAMPLED)}
    info = pool.sync(models["w1"], 1)
    assert info["version"] == pool.version == 1 and [r["version"] for r in info["actors"]] == [1, 1]
    assert info["bytes"] == (models["w1"] / "model.safetensors").stat().st_size
    for s in (GREEDY, SAMPLED):
        after = samples(pool, table, s)
        assert after == fresh(models["w1"], table, s)
        assert after != before[s] == fresh(models["w0"], table, s)  # the sync changed what is sampled
        assert all(len(g) == s.n for g in after)


def test_a_lora_merge_synced_from_memory_samples_like_its_saved_folder(
    pool: generators.GeneratorPool, models: dict[str, Path], tmp_path: Path
) -> None:
    """The merged weights of a LoRA policy (checkpoint.merged_lora, what train/final holds), put from memory."""
    from raydora.checkpoint import load_policy, merged_lora

    peft = load_policy(models["w0"], torch.float32, torch.float32, "eager", lora_r=4, lora_alpha=8.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)  # B = 0 at init: make the adapters count
    merged = merged_lora(peft, {k: v.detach() for k, v in peft.state_dict().items()})
    folder = save_pretrained(merged, load_tokenizer(models["w0"]), tmp_path / "merged")
    weights = generators.put_state(merged.state_dict(), source="merged")
    pool.sync(weights, 2)
    table = prompts(5)
    for s in (GREEDY, SAMPLED):
        assert samples(pool, table, s) == fresh(folder, table, s) != fresh(models["w0"], table, s)


def test_the_weights_travel_once_through_the_object_store(
    pool: generators.GeneratorPool, models: dict[str, Path]
) -> None:
    weights = generators.put_folder(models["w1"])
    info = pool.sync(weights, 3)
    # Every actor fetched the one object the driver put (an ObjectRef in the call, not a copy of the weights).
    assert [r["ref"] for r in info["actors"]] == [weights.ref.hex()] * 2
    blobs = ray.get(weights.ref)
    assert blobs == [(models["w1"] / "model.safetensors").read_bytes()]
    model = build_model("tiny-gpt2", load_tokenizer(models["w1"]), seed=5)
    n = generators.load_blobs(model, blobs)  # the tied LM head is left out of the file, and shared again
    assert n == len(model.state_dict()) - 1 and model.lm_head.weight is model.transformer.wte.weight
    assert info["actors"][0]["tensors"] == n
    with pytest.raises(KeyError, match="names this model does not have"):
        generators.load_blobs(model, [generators.state_blob({"nope.weight": torch.zeros(2)})])
    partial = {k: v for k, v in model.state_dict().items() if "h.1." not in k}
    with pytest.raises(KeyError, match=r"leave out \d+ of the model's tensors"):
        generators.load_blobs(model, [generators.state_blob(partial)])


def test_a_generator_that_missed_a_sync_refuses_to_sample(
    pool: generators.GeneratorPool, models: dict[str, Path]
) -> None:
    pool.sync(models["w0"], 4)
    table = prompts(2)
    # One actor gets version 5 behind the pool's back: the pool (version 4) must not sample from it.
    weights = generators.put_folder(models["w1"])
    ray.get(pool.actors[1].sync.remote([weights.ref], 5))
    with pytest.raises(generators.StaleWeightsError, match="holds weights version 5 but was asked to sample with"):
        pool.sample(prompts(6), GREEDY)
    with pytest.raises(generators.StaleWeightsError, match="version 4 but was asked to sample with version 3"):
        ray.get(pool.actors[0].sample.remote(table, GREEDY.__dict__, 3))
    pool.sync(models["w0"], 4)  # both again: it samples
    assert samples(pool, table, GREEDY) == fresh(models["w0"], table, GREEDY)


def test_pool_generate_writes_what_the_generate_stage_writes(
    pool: generators.GeneratorPool, models: dict[str, Path], tmp_path: Path
) -> None:
    """The pool's folder equals a fresh Ray Data generation from the same folder: rows, samples, token counts."""
    pool.sync(models["w1"], 6)
    table = prompts(8)
    cfg = load_config(None, [*GEN, "generate.actors=1"])  # one stage actor: fewer start-ups
    ours = pool.generate(table, tmp_path / "pool", SAMPLED, fp="x", stage="loop-sample")
    theirs = gen.generate(models["w1"], table, tmp_path / "stage", cfg.generate, SAMPLED, max_length=64,
                          precision="fp32", fp="x")  # fmt: skip
    a, b = gen.read_generations(tmp_path / "pool"), gen.read_generations(tmp_path / "stage")
    for column in ("id", "prompt", *gen.OUTPUT_COLUMNS):
        assert a.column(column).to_pylist() == b.column(column).to_pylist()
    marker = read_success(tmp_path / "pool")
    assert {k: marker[k] for k in ours} == ours and ours["weights_version"] == 6 and ours["actors"] == 2
    same = ("fingerprint", "rows", "prompts_truncated", "model", "backend", "device", "sampling", "tokens")
    assert {k: ours[k] for k in same} == {k: theirs[k] for k in same}
