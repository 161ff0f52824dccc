"""vllm tier: real vLLM engines (vLLM's CPU build via ``make test-vllm`` here; vllm on a GPU machine).

Skipped, with the reason, where vLLM is not installed (the default ``make test``). With vLLM's GPU build and a
CUDA GPU the same tests run there (``bench/gpu_check.sh`` with ``VLLM=1``): still fp32 and eager, so that greedy
decoding can equal the hf backend's token for token, with the in-process engine and the Ray Data actor's engine
each taking a share of the GPU's memory small enough for both."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from conftest import vllm_cpu_build  # tests/ is on sys.path (pytest's rootdir-relative import)

from raydora import generate as gen
from raydora import synth
from raydora.config import load_config

pytestmark = pytest.mark.vllm


# cuda with vLLM's GPU build and a GPU; cpu with its CPU build (vllm-cpu), which runs without one.
DEVICE = "cpu" if vllm_cpu_build() or not torch.cuda.is_available() else "cuda"
GPU_SHARE = 0.3  # of the GPU's memory, for each of the two engines that may be up at once (fixture, Ray actor)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """small-gpt2 (head size 32, which vLLM's CPU attention supports) with the benchmark's BPE."""
    from raydora.models import build_model, save_pretrained, train_tokenizer

    root = tmp_path_factory.mktemp("vllm")
    rows = synth.generate_rows(0, 200, k=2, shares={"golden": 0.5, "verbose": 0.5}, label_noise=0.0, seed=0)
    tok = train_tokenizer((x for r in rows for x in (r["prompt"], *r["responses"])), root / "tok", vocab_size=400)
    return save_pretrained(build_model("small-gpt2", tok, seed=0), tok, root / "model")


def prompts(n: int) -> pa.Table:
    import random

    rng = random.Random(3)
    return pa.table({"id": [f"p{i}" for i in range(n)], "prompt": [synth.make_prompt(rng) for _ in range(n)]})


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[gen.VLLMGenerator]:
    sampling = {"temperature": 0.0, "max_new_tokens": 12, "n": 1, "seed": 0}
    g = gen.VLLMGenerator(str(model_dir), sampling, max_length=128, device=DEVICE, precision="fp32",
                          enforce_eager=True, gpu_memory_utilization=GPU_SHARE)  # fmt: skip
    if DEVICE == "cpu":  # raydora's CPU default: no core held back from the engine's threads (docs/generation.md)
        assert os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU") == "0"
    yield g
    core = g.llm.llm_engine.engine_core
    g.close()  # stops the engine's processes (idle CPU workers would otherwise keep polling)
    for proc in core.resources.engine_manager.processes:
        proc.join(timeout=10)  # killed at the end of close()'s 5 s: gone once the kernel has reaped it
        assert not proc.is_alive()


def test_vllm_greedy_equals_the_hf_backend(engine: gen.VLLMGenerator, model_dir: Path) -> None:
    table = prompts(8)
    hf = gen.HFGenerator(str(model_dir), {"temperature": 0.0, "max_new_tokens": 12, "n": 1, "seed": 0}, 128,
                         device=DEVICE, precision="fp32")  # fmt: skip
    ours, theirs = engine(table), hf(table)
    assert ours.column("generations").to_pylist() == theirs.column("generations").to_pylist()
    assert ours.column("generation_tokens").to_pylist() == theirs.column("generation_tokens").to_pylist()
    assert ours.column("finish_reasons").to_pylist() == theirs.column("finish_reasons").to_pylist()


def test_vllm_sampling_is_deterministic_per_seed(engine: gen.VLLMGenerator) -> None:
    import dataclasses

    # 1,200 seeded requests: more prompt tokens than one engine step takes (vLLM CPU: 4,096), which made vLLM
    # 0.32's CPU build split a prefill and die rewinding a CPU generator (raydora turns chunked prefill off there).
    table = prompts(400)
    engine.sampling = dataclasses.replace(engine.sampling, temperature=1.0, n=3, seed=11)
    try:
        a, b = engine(table), engine(table.slice(396, 4))
        assert all(len(g) == 3 for g in a.column("generations").to_pylist())
        # Per-request seeds: a prompt's samples do not depend on the batch it is in.
        assert a.column("generations").to_pylist()[396:] == b.column("generations").to_pylist()
        engine.sampling = dataclasses.replace(engine.sampling, seed=12)
        assert engine(table).column("generations").to_pylist() != a.column("generations").to_pylist()
    finally:
        engine.sampling = dataclasses.replace(engine.sampling, temperature=0.0, n=1, seed=0)


def test_vllm_backend_through_ray_data(model_dir: Path, tmp_path: Path, ray_session) -> None:
    cfg = load_config(None, ["generate.backend=vllm", f"generate.device={DEVICE}", "generate.actors=1",
                             "generate.actor_cpus=1", "generate.vllm_batch_size=8", "generate.enforce_eager=true",
                             f"generate.gpu_memory_utilization={GPU_SHARE}"])  # fmt: skip
    sampling = gen.Sampling(temperature=0.0, max_new_tokens=10, n=2, seed=0)
    info = gen.generate(model_dir, prompts(16), tmp_path / "out", cfg.generate, sampling, max_length=128,
                        precision="fp32", fp="vllm")  # fmt: skip
    table = gen.read_generations(tmp_path / "out")
    assert info["backend"] == "vllm" and table.num_rows == 16 and info["tokens_per_s"] > 0
    assert all(len(g) == 2 and g[0] == g[1] for g in table.column("generations").to_pylist())  # greedy: n equal
    assert info["tokens"] == sum(sum(t) for t in table.column("generation_tokens").to_pylist())


def test_a_synced_vllm_generator_samples_like_one_started_from_the_weights(
    model_dir: Path, tmp_path: Path, ray_session
) -> None:
    """The long-lived vLLM generator (raydora.generators) takes new weights through vLLM's worker extension and
    ``collective_rpc`` without a restart: greedy samples then equal a fresh generator's (the hf backend's, which
    equals vLLM's in greedy decoding above), and a stale version refuses to sample."""
    import ray

    from raydora import generators
    from raydora.models import build_model, load_tokenizer, save_pretrained

    other = save_pretrained(build_model("small-gpt2", load_tokenizer(model_dir), seed=1), load_tokenizer(model_dir),
                            tmp_path / "w1")  # fmt: skip
    cfg = load_config(None, ["generate.backend=vllm", f"generate.device={DEVICE}", "generate.actors=1",
                             "generate.enforce_eager=true", f"generate.gpu_memory_utilization={GPU_SHARE}"])  # fmt: skip
    greedy = gen.Sampling(temperature=0.0, max_new_tokens=12, n=1, seed=0)
    table = prompts(8)

    def fresh(folder: Path) -> list[list[str]]:
        hf = gen.HFGenerator(str(folder), greedy.__dict__, 128, device=DEVICE, precision="fp32")
        return hf(table).column("generations").to_pylist()

    with generators.GeneratorPool(model_dir, cfg.generate, max_length=128, precision="fp32") as pool:
        assert pool.backend == "vllm"
        before = pool.sample(table, greedy).column("generations").to_pylist()
        info = pool.sync(other, 1)
        assert info["actors"][0]["tensors"] > 0
        after = pool.sample(table, greedy).column("generations").to_pylist()
        assert before == fresh(model_dir) and after == fresh(other) != before
        with pytest.raises(generators.StaleWeightsError, match="version 1 but was asked to sample with version 0"):
            ray.get(pool.actors[0].sample.remote(table, greedy.__dict__, 0))
