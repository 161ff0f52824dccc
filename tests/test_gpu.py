"""GPU tier: the same math on CUDA (bf16 log-probs, objectives) equals the CPU result. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from raydora import checkpoint, hardware, robust, step
from raydora.logprobs import sequence_logps

pytestmark = pytest.mark.gpu


def test_objectives_on_cuda_match_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    x, w = torch.rand(64, generator=g, dtype=torch.float64) * 3, torch.rand(64, generator=g, dtype=torch.float64)
    for fn in (lambda a, b: robust.dora(a, b, 0.5), lambda a, b: robust.kldpo(a, 0.3), lambda a, b: robust.kl_dro(a)):
        torch.testing.assert_close(fn(x.cuda(), w.cuda()).cpu(), fn(x, w))


def test_bf16_logits_give_fp32_logps_on_cuda() -> None:
    assert hardware.resolve_precision("auto", "cuda") == torch.bfloat16
    logits = torch.randn(2, 9, 50, device="cuda")
    labels = torch.randint(0, 50, (2, 9), device="cuda")
    mask = torch.ones(2, 9, dtype=torch.long, device="cuda")
    out = sequence_logps(logits.bfloat16(), labels, mask)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), sequence_logps(logits.cpu(), labels.cpu(), mask.cpu()), atol=0.2, rtol=0.02)


def test_training_step_on_cuda_matches_cpu_and_runs_bf16() -> None:
    """The training loop's step (packed sequences, sdpa, fused AdamW) on CUDA: fp32 equals the CPU step, bf16
    autocast tracks it."""

    import numpy as np

    from raydora.config import TrainConfig
    from raydora.models import build_model, train_tokenizer

    tok = train_tokenizer(["sort : b a c", "a b c", "reverse : x y z", "z y x"] * 5, vocab_size=300)
    rng = np.random.default_rng(0)
    vocab = len(tok)  # the tiny corpus gives fewer than the 300 tokens asked for
    rows = {
        "prompt_ids": np.array([rng.integers(2, vocab, size=5) for _ in range(8)] + [None], dtype=object)[:-1],
        "response_ids": np.array(
            [[rng.integers(2, vocab, size=int(rng.integers(2, 7))) for _ in range(2)] for _ in range(8)] + [None],
            dtype=object,
        )[:-1],
        "scores": np.array([[1.0, 0.0]] * 8 + [None], dtype=object)[:-1],
        "reference_logps": np.array([rng.normal(-20, 2, size=2) for _ in range(8)] + [None], dtype=object)[:-1],
    }
    t = TrainConfig(objective="kldpo", grad_clip=0.0, num_workers=1, batch_size=8)
    cfg = step.StepConfig("preference", t, batch_size=8, micro_batch_size=8)
    grads = {}
    for device, amp in (("cpu", torch.float32), ("cuda", torch.float32), ("cuda", torch.bfloat16)):
        model = build_model("tiny-gpt2", tok, seed=0, attn_implementation="sdpa").to(device).train()
        mb = step.collate_micro(rows, slice(0, 8), "preference", "dpo", tok.pad_token_id, None, pack=True)
        mb["enc"] = {k: v.to(device) for k, v in mb["enc"].items()}
        step.train_step(model, [mb], cfg, device=torch.device(device), amp=amp)
        grads[(device, amp)] = torch.cat([p.grad.reshape(-1).float().cpu() for p in model.parameters()])
    cpu = grads[("cpu", torch.float32)]
    torch.testing.assert_close(grads[("cuda", torch.float32)], cpu, atol=1e-4, rtol=1e-3)
    assert torch.nn.functional.cosine_similarity(grads[("cuda", torch.bfloat16)], cpu, dim=0) > 0.99


def test_lora_base_is_stored_in_bf16_and_the_reference_agrees_at_step_zero(tmp_path) -> None:
    """LoRA on CUDA: the frozen base is held in bf16 and the adapters in fp32; the reference pass, which loads its
    weights the same way, gives the policy's own log-probs at step 0 (bitwise: the same bf16 forward)."""
    pytest.importorskip("peft")
    from raydora.encoding import forward_logps, pad_sequences
    from raydora.models import build_model, save_pretrained, train_tokenizer
    from raydora.reference import ReferenceModel

    tok = train_tokenizer(["sort : b a c", "a b c", "reverse : x y z", "z y x"] * 5, vocab_size=300)
    save_pretrained(build_model("tiny-llama", tok, seed=0), tok, tmp_path / "m")
    policy = checkpoint.load_policy(tmp_path / "m", torch.bfloat16, torch.float32, "sdpa", lora_r=4, lora_alpha=8)
    policy = policy.to("cuda").eval()
    dtypes = {(p.requires_grad, p.dtype) for p in policy.parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
    ref = ReferenceModel(str(tmp_path / "m"), str(tmp_path / "m"), 64, device="cuda", precision="bf16",
                         frozen_in_compute_dtype=True)  # fmt: skip
    assert next(ref.model.parameters()).dtype == torch.bfloat16
    prompts, responses = [[5, 6, 7], [8, 9]], [[[10, 11], [12]], [[13, 14, 15], [16, 17]]]
    want = ref.logps(prompts, responses)
    enc = pad_sequences([p for p, rs in zip(prompts, responses, strict=True) for _ in rs],
                        [[r] for rs in responses for r in rs], None, tok.pad_token_id)  # fmt: skip
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        got, _, _ = forward_logps(policy, {k: v.cuda() for k, v in enc.items()}, 1)
    assert got[:, 0].double().cpu().tolist() == [x for r in want for x in r]


def test_lora_merge_of_a_cuda_model_runs_on_cuda_and_equals_peft_merge_on_cpu(tmp_path, monkeypatch) -> None:
    """The final save's merge of a LoRA model trained on CUDA: each adapted layer is merged on the GPU (one CPU
    thread of a Ray worker took about a minute for an 8B model) and written back into the gathered CPU state (no
    second copy on the host), equal to PEFT's merge on CPU up to bf16 rounding; the live model stays on the GPU,
    untouched."""
    import copy

    pytest.importorskip("peft")
    from peft.tuners.lora import layer as lora_layer

    from raydora import distributed
    from raydora.models import build_model, save_pretrained, train_tokenizer

    tok = train_tokenizer(["sort : b a c", "a b c", "reverse : x y z", "z y x"] * 5, vocab_size=300)
    save_pretrained(build_model("tiny-llama", tok, seed=0), tok, tmp_path / "m")
    policy = checkpoint.load_policy(tmp_path / "m", torch.bfloat16, torch.float32, "sdpa", lora_r=4, lora_alpha=8)
    torch.manual_seed(0)
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            p.data.normal_()  # B starts at zero: a merge would change nothing
    expected = copy.deepcopy(policy).merge_and_unload().state_dict()
    policy = policy.to("cuda")
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    merged_on, merge = [], lora_layer.Linear.merge

    def spy(self, *args, **kwargs):  # where each layer's merge ran
        merged_on.append(self.base_layer.weight.device.type)
        return merge(self, *args, **kwargs)

    monkeypatch.setattr(lora_layer.Linear, "merge", spy)
    state = distributed.full_state_dict(policy)
    merged = checkpoint.merged_lora(policy, state)
    got = merged.state_dict()
    assert merged_on and set(merged_on) == {"cuda"}
    assert sorted(got) == sorted(expected)
    assert {v.device.type for v in got.values()} == {"cpu"}
    for k in expected:
        assert got[k].dtype == expected[k].dtype, k
        torch.testing.assert_close(got[k], expected[k])  # bf16 tolerance: cuBLAS sums B @ A in its own order
    base = build_model("tiny-llama", tok, seed=0).to(torch.bfloat16).state_dict()
    adapted = [k for k in got if k.endswith("_proj.weight")]
    assert len(adapted) == len(merged_on) and all(not torch.equal(got[k], base[k]) for k in adapted)
    # Written back into the gathered state's tensors: the host holds the model once.
    gathered = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in state.items()}
    assert all(got[k].data_ptr() == gathered[k].data_ptr() for k in adapted)
    for k, v in policy.state_dict().items():
        assert v.device.type == "cuda"
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)


def test_classifier_margins_autocast_bf16_on_cuda_and_track_fp32() -> None:
    """classifier.precision=auto on CUDA: bf16 autocast (the classify stage's training and scoring forwards);
    the margins track the fp32 CPU margins of the same weights."""
    import numpy as np

    from raydora import classifier
    from raydora.models import build_model, train_tokenizer

    texts = ["sort : b a c", "a b c", "reverse : x y z", "z y x", "count : a a b", "3"] * 5
    tok = train_tokenizer(texts, vocab_size=300, kind="encoder")
    model = build_model("tiny-bert", tok, num_labels=2, seed=0).eval()
    prompts, responses = texts[0::2], texts[1::2]
    cpu = classifier.margins(model, tok, prompts, responses, 32)
    fp32 = classifier.margins(model.cuda(), tok, prompts, responses, 32, "fp32")
    cuda = classifier.margins(model, tok, prompts, responses, 32, "auto")
    assert classifier.precision_tag("auto", "cuda") == "bf16"
    assert not np.array_equal(cuda, fp32)  # bf16 really ran (fp32 on CUDA already differs from the CPU a little)
    np.testing.assert_allclose(fp32, cpu, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(cuda, cpu, atol=0.1 * np.abs(cpu).max() + 0.05)
