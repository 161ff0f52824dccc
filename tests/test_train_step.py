"""One optimizer step of the training loop, in process (no Ray): WDPO against DPO, micro-batching, precision."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch

from raydora import checkpoint, robust, step, train
from raydora.config import TrainConfig
from raydora.models import build_model, train_tokenizer

TEXTS = ["sort : b a c", "a b c", "reverse : x y z", "z y x", "count : a a b", "3", "well , the answer is"]


@pytest.fixture(scope="module")
def setup():
    tok = train_tokenizer(TEXTS * 5, vocab_size=300)
    model = build_model("tiny-gpt2", tok, dtype=torch.float64, seed=1).train()
    rng = np.random.default_rng(0)
    b, k = 4, 2
    rows = {
        "prompt_ids": np.array([rng.integers(2, 290, size=int(rng.integers(3, 7))) for _ in range(b)], dtype=object),
        "response_ids": np.array(
            [[rng.integers(2, 290, size=int(rng.integers(2, 6))) for _ in range(k)] for _ in range(b)], dtype=object
        ),
        "scores": np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.3, 0.9]], dtype=object),
        "reference_logps": np.array([rng.normal(-20, 2, size=k) for _ in range(b)], dtype=object),
    }
    return tok, model, rows


def cfg_for(**train_kw):
    return step.StepConfig("preference", TrainConfig(grad_clip=0.0, **train_kw), batch_size=4, micro_batch_size=4)


def grads_of(model, value) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    value.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def test_wdpo_differs_from_dpo_by_exactly_the_penalty_gradient(setup) -> None:
    tok, model, rows = setup
    rho = 0.3
    cfg = cfg_for(loss="dpo", objective="wdpo", rho=rho)
    mb = step.collate_micro(rows, slice(0, 4), "preference", "dpo", tok.pad_token_id, None)

    def parts():
        out = step.per_sample_losses(model, mb, cfg, embeddings=True)
        return out["losses"], robust.wdpo_penalty(out["losses"], out["embeds"])

    losses, pen = parts()
    g_wdpo = grads_of(model, robust.wdpo(losses, pen, rho))
    losses, pen = parts()
    g_dpo = grads_of(model, robust.erm(losses))
    losses, pen = parts()
    g_pen = grads_of(model, rho * pen.mean())
    assert g_pen.abs().max() > 1e-8  # the penalty really moves the parameters
    torch.testing.assert_close(g_wdpo - g_dpo, g_pen, atol=1e-12, rtol=1e-9)

    # The penalty is each pair's own ||d l_i / d z||^2: check one pair by a separate forward of that pair alone.
    one = step.collate_micro(rows, slice(2, 3), "preference", "dpo", tok.pad_token_id, None)
    o = step.per_sample_losses(model, one, cfg, embeddings=True)
    (g,) = torch.autograd.grad(o["losses"].sum(), o["embeds"])
    # Padding rows carry no gradient, so the alone-forward norm equals the batched one.
    torch.testing.assert_close(pen[2].detach(), g.pow(2).sum(), atol=1e-12, rtol=1e-8)

    # The loop's step (one worker, no process group) produces the same WDPO gradient.
    model.zero_grad(set_to_none=True)
    mb = step.collate_micro(rows, slice(0, 4), "preference", "dpo", tok.pad_token_id, None)
    step.train_step(model, [mb], cfg, device=torch.device("cpu"))
    g_loop = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(g_loop, g_wdpo, atol=1e-12, rtol=1e-9)


ROW_WEIGHTS = [0.4, 1.7, 0.9, 2.5]  # h~ per row for dora (the collation gives ones without DoRA metadata)


@pytest.mark.parametrize("accumulation", ["online", "window"])
@pytest.mark.parametrize(
    "objective", ["erm", "kl_dro", "kldpo", "dr_dpo", "dora", "dora_outside", "kldpo_clipped", "wdpo_global"]
)
def test_micro_batches_accumulate_the_full_batch_gradient(
    setup, monkeypatch, objective: str, accumulation: str
) -> None:
    """One micro-batch of 4 (the objective gathers itself) against 4 micro-batches of 1, in the order that raises
    the running max at every micro-batch, so the online softmax rescales its accumulated gradient each time.
    Online: exactly one forward per micro-batch; window: one more per micro-batch for coupled objectives."""
    tok, model, rows = setup
    extra = {"dora_outside": {"objective": "dora", "dora_calibration": "outside"},
             "kldpo_clipped": {"objective": "kldpo", "kldpo_normalize": False, "kldpo_clip": 3.0},
             "wdpo_global": {"objective": "wdpo", "wdpo_mode": "global", "rho": 0.3}}.get(objective, {"objective": objective})  # fmt: skip
    cfg = cfg_for(loss="dpo", lam=0.5, tau=0.5, beta_prime=0.7, accumulation=accumulation, **extra)
    weights = torch.tensor(ROW_WEIGHTS, dtype=torch.float64)
    with torch.no_grad():
        full = step.collate_micro(rows, slice(0, 4), "preference", "dpo", tok.pad_token_id, None)
        losses = step.per_sample_losses(model, full, cfg)["losses"]
    tilt = step.objective_tilt(cfg)
    order = torch.argsort(tilt.scores(losses, weights)) if tilt is not None else torch.arange(4)
    assert (tilt is not None) == (accumulation == "online" and objective in ("kl_dro", "kldpo", "dr_dpo", "dora",
                                                                             "dora_outside"))  # fmt: skip

    def take(idx: list[int]) -> dict:
        sub = {k: v[idx] for k, v in rows.items()}
        mb = step.collate_micro(sub, slice(0, len(idx)), "preference", "dpo", tok.pad_token_id, None)
        mb["weights"] = weights[idx]
        return mb

    forwards, rescales = [0], [0]
    real_forward = step.per_sample_losses
    monkeypatch.setattr(step, "per_sample_losses", lambda *a, **k: (forwards.__setitem__(0, forwards[0] + 1),
                                                                     real_forward(*a, **k))[1])  # fmt: skip

    class Counting(robust.OnlineTilt):  # counts the passes over the accumulated gradient
        def __init__(self, tilt, grads, group=None):
            super().__init__(tilt, lambda: (rescales.__setitem__(0, rescales[0] + 1), grads())[1], group)

    monkeypatch.setattr(robust, "OnlineTilt", Counting)
    grads = []
    for micro in ([take(order.tolist())], [take([int(i)]) for i in order]):
        model.zero_grad(set_to_none=True)
        forwards[0] = rescales[0] = 0
        stats = step.train_step(model, micro, cfg, device=torch.device("cpu"))
        grads.append((torch.cat([p.grad.reshape(-1) for p in model.parameters()]), stats["metrics"]["loss"]))
    # The window pass adds a forward per micro-batch for every coupled objective online cannot express.
    assert forwards[0] == (4 if tilt is not None or objective == "erm" else 8)
    if tilt is not None:
        assert rescales[0] == 4  # the running max rose at micro-batches 2, 3 and 4, then finish()'s factor
    assert grads[0][0].abs().sum() > 1e-6
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-12, rtol=1e-9)
    assert grads[0][1] == pytest.approx(grads[1][1], rel=1e-12)


def test_dora_row_weights_match_robust_dora_weights() -> None:
    info = {"shares": {"verbose": 0.4, "sloppy": 0.35}, "gammas": {"verbose": 1.5, "sloppy": 0.8}, "alpha": None}
    p = [[0.9, 0.2, 0.6, 0.05]]
    src = [["golden", "verbose", "sloppy", "unknown"]]
    got = step.dora_row_weights(p, src, info)
    share = torch.tensor([0.75, 0.4, 0.35, 0.75], dtype=torch.float64)
    gamma = torch.tensor([1.0, 1.5, 0.8, 1.0], dtype=torch.float64)
    want = robust.dora_weights(torch.tensor(p[0], dtype=torch.float64), share, 0.25, gamma).mean()
    assert got[0] == pytest.approx(float(want), rel=1e-12)
    # By hand for the verbose response: 1 / (1/4 + 0.4 * 0.8 / (1.5 * 0.2)) = 1 / (1/4 + 16/15) = 60/79.
    assert float(robust.dora_weights(torch.tensor([0.2]), 0.4, 0.25, 1.5)[0]) == pytest.approx(60 / 79, rel=1e-6)
    # A pairwise loss uses the chosen and rejected responses only, with alpha still 1/K = 1/4: golden (chosen)
    # 1 / (1/4 + 0.75 * 0.1 / 0.9) = 3, verbose (rejected) 60/79.
    pair = step.dora_row_weights(p, src, info, np.array([[0, 1]]))
    assert pair[0] == pytest.approx((3 + 60 / 79) / 2, rel=1e-12)
    # The trainer's collation picks the pair by score (best, worst) for DPO and every response for a listwise loss.
    rows = {"prompt_ids": _objects([[5, 6]]), "response_ids": _objects([[[7], [8], [9], [10]]]),
            "scores": _objects([[0.9, 0.1, 0.5, 0.3]]), "reference_logps": _objects([[-1.0, -2.0, -3.0, -4.0]]),
            "p_golden": _objects(p), "sources": _objects(src)}  # fmt: skip
    for loss, want_h in (("dpo", pair[0]), ("dpo_pl", got[0])):
        mb = step.collate_micro(rows, slice(0, 1), "preference", loss, 0, info)
        assert float(mb["weights"][0]) == pytest.approx(want_h, rel=1e-12)


def test_pairwise_collation_takes_rows_of_different_k() -> None:
    # Real data and the online loop's rows hold 2..K responses; a pairwise loss takes each row's best and worst.
    rows = {"prompt_ids": _objects([[5, 6], [7]]), "response_ids": _objects([[[7], [8], [9]], [[10, 11], [12]]]),
            "scores": _objects([[0.2, 0.9, 0.5], [0.0, 1.0]]),
            "reference_logps": _objects([[-1.0, -2.0, -3.0], [-4.0, -5.0]])}  # fmt: skip
    mb = step.collate_micro(rows, slice(0, 2), "preference", "dpo", 0, None)
    assert mb["scores"].tolist() == [[0.9, 0.2], [1.0, 0.0]] and mb["ref"].tolist() == [[-2.0, -1.0], [-5.0, -4.0]]
    assert mb["k"] == 2 and mb["rows"] == 2
    with pytest.raises(ValueError, match="same number of responses"):
        step.collate_micro(rows, slice(0, 2), "preference", "dpo_pl", 0, None)


def _objects(values: list[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def test_schedule_warms_up_then_decays_to_zero() -> None:
    fn = train._lr_lambda(total=10, warmup=2, kind="cosine")
    assert [round(fn(s), 6) for s in (0, 1, 2)] == [round(1 / 3, 6), round(2 / 3, 6), 1.0]
    assert fn(10) == pytest.approx(0.0) and fn(6) == pytest.approx(0.5)
    assert train._lr_lambda(10, 0, "linear")(5) == pytest.approx(0.5)


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_sequences_give_the_padded_log_probs(setup, preset: str, attn: str) -> None:
    from raydora.encoding import forward_logps, pack_sequences, pad_sequences, pair_indices

    tok, _, rows = setup
    model = build_model(preset, tok, dtype=torch.float64, seed=2, attn_implementation=attn)
    prompts = [r.tolist() for r in rows["prompt_ids"]]
    responses = [[x.tolist() for x in rs] for rs in rows["response_ids"]]
    select = pair_indices(rows["scores"].tolist())
    padded = pad_sequences(prompts, responses, select, tok.pad_token_id)
    packed = pack_sequences(prompts, responses, select, tok.pad_token_id)
    assert packed["input_ids"].shape[0] < 8  # 4 pairs = 8 sequences in fewer rows
    assert packed["input_ids"].numel() < padded["input_ids"].numel()  # fewer rows: some sequences share one
    assert int(packed["attention_mask"].sum()) == int(padded["attention_mask"].sum())
    a, la, _ = forward_logps(model, padded, 2)
    b, lb, _ = forward_logps(model, packed, 2)
    # Llama's eager attention takes its softmax in float32 (rows of different lengths round differently), so
    # float32-level agreement; a leak across sequences would differ by ~1e-1.
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(la, lb)
    # Gradients agree too.
    (ga,) = torch.autograd.grad(a.sum(), model.get_input_embeddings().weight)
    b2, _, _ = forward_logps(model, packed, 2)
    (gb,) = torch.autograd.grad(b2.sum(), model.get_input_embeddings().weight)
    torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pack", [False, True])
def test_pad_to_multiple_of_rounds_the_width_and_keeps_the_log_probs(setup, pack: bool, monkeypatch) -> None:
    """``model.pad_to_multiple_of``: the micro-batch's width becomes a multiple of it (more masked tokens, the same
    real ones), and the log-probs and their gradients equal the unrounded layout's."""
    from raydora.encoding import forward_logps
    from raydora.reference import ReferenceModel

    tok, _, rows = setup
    model = build_model("tiny-llama", tok, dtype=torch.float64, seed=4)
    base = step.collate_micro(rows, slice(0, 4), "preference", "dpo", tok.pad_token_id, None, pack)
    wide = step.collate_micro(rows, slice(0, 4), "preference", "dpo", tok.pad_token_id, None, pack, 64)
    w0, w1 = base["enc"]["input_ids"].shape[1], wide["enc"]["input_ids"].shape[1]
    assert w1 % 64 == 0 and w0 <= w1 < w0 + 64 and w0 % 64 != 0  # the rounding did something
    assert base["enc"]["input_ids"].shape[0] == wide["enc"]["input_ids"].shape[0]
    assert int(wide["enc"]["attention_mask"].sum()) == int(base["enc"]["attention_mask"].sum())
    a, la, _ = forward_logps(model, base["enc"], base["k"])
    b, lb, _ = forward_logps(model, wide["enc"], wide["k"])
    # Llama's attention takes its softmax in float32, so float32-level agreement (a leak into the padding: ~1e-1).
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(la, lb)
    emb = model.get_input_embeddings().weight
    (ga,) = torch.autograd.grad(a.sum(), emb)
    (gb,) = torch.autograd.grad(forward_logps(model, wide["enc"], wide["k"])[0].sum(), emb)
    torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-4)
    if not pack:  # the reference pass pads the same way and gets the same log-probs
        ref = ReferenceModel.__new__(ReferenceModel)
        ref.model, ref.tokenizer, ref.device, ref.dtype, ref.batch_size = model, tok, "cpu", torch.float32, 3
        ref.logprob_chunk = 0
        prompts = [r.tolist() for r in rows["prompt_ids"][:4]]
        responses = [[x.tolist() for x in rs] for rs in rows["response_ids"][:4]]
        ref.pad_to_multiple_of = 0
        plain = ref.logps(prompts, responses)
        widths: list[int] = []

        def recording(model, enc, k, **kw):
            widths.append(enc["input_ids"].shape[1])
            return forward_logps(model, enc, k, **kw)

        monkeypatch.setattr("raydora.encoding.forward_logps", recording)
        ref.pad_to_multiple_of = 64
        np.testing.assert_allclose(ref.logps(prompts, responses), plain, rtol=1e-6, atol=1e-6)
        assert len(widths) == 3 and all(w % 64 == 0 for w in widths)  # 8 sequences in batches of 3


def test_wdpo_on_packed_sequences_equals_the_padded_layout(setup) -> None:
    tok, _, rows = setup
    model = build_model("tiny-gpt2", tok, dtype=torch.float64, seed=3).train()
    cfg = cfg_for(loss="dpo", objective="wdpo", rho=0.3)
    f = step.objective_fn(cfg)
    out = []
    # Padded, packed, and both with widths rounded up to a multiple of 64 (model.pad_to_multiple_of): the extra
    # positions take no gradient, so the penalty is unchanged.
    for pack, multiple in ((False, 0), (True, 0), (False, 64), (True, 64)):
        model.zero_grad(set_to_none=True)
        mb = step.collate_micro(rows, slice(0, 4), "preference", "dpo", tok.pad_token_id, None, pack, multiple)
        assert mb["enc"]["input_ids"].shape[1] % 64 == 0 or not multiple
        o = step.per_sample_losses(model, mb, cfg, embeddings=True)
        pen = step.wdpo_penalty(o["losses"], o["embeds"], mb["enc"])
        f(o["losses"], torch.ones(4, dtype=torch.float64), pen).backward()
        out.append((pen.detach(), torch.cat([p.grad.reshape(-1) for p in model.parameters()])))
    assert "segment_ids" in mb["enc"] and out[0][0].min() > 0
    for other in out[1:]:
        torch.testing.assert_close(out[0][0], other[0], atol=1e-10, rtol=1e-8)
        torch.testing.assert_close(out[0][1], other[1], atol=1e-10, rtol=1e-8)


def objects(items: list) -> np.ndarray:
    """A 1-D object array of ``items`` (the shape Ray Data gives list columns)."""
    out = np.empty(len(items), dtype=object)
    for i, x in enumerate(items):
        out[i] = x
    return out


@pytest.fixture(scope="module")
def listwise(setup):
    tok, _, _ = setup
    rng = np.random.default_rng(5)
    b, k = 3, 4
    rows = {
        "prompt_ids": np.array([rng.integers(2, 290, size=4) for _ in range(b)] + [None], dtype=object)[:-1],
        "response_ids": np.array(
            [[rng.integers(2, 290, size=int(rng.integers(2, 6))) for _ in range(k)] for _ in range(b)] + [None],
            dtype=object,
        )[:-1],
        "scores": objects([[0.1, 0.9, 0.5, 0.2], [3.0, 1.0, 2.0, 0.0], [0.0, 0.3, 0.2, 0.1]]),
        "reference_logps": np.array([rng.normal(-15, 2, size=k) for _ in range(b)] + [None], dtype=object)[:-1],
    }
    return tok, rows


@pytest.mark.parametrize("loss", ["dpo", "ipo", "cdpo", "rdpo", "simpo", "dpo_pl", "rrhf", "lire"])
def test_every_loss_is_wired_to_the_right_responses(listwise, loss: str) -> None:
    from raydora import losses as L
    from raydora.encoding import forward_logps, pad_sequences

    tok, rows = listwise
    model = build_model("tiny-gpt2", tok, dtype=torch.float64, seed=4)
    cfg = cfg_for(loss=loss, beta=0.2, label_smoothing=0.1, flip_rate=0.2, simpo_gamma=0.5, sft_weight=0.7)
    mb = step.collate_micro(rows, slice(0, 3), "preference", loss, tok.pad_token_id, None, pack=True)
    got = step.per_sample_losses(model, mb, cfg)["losses"]
    # By hand: all K log-probs in the padded layout, then the library loss on the expected responses.
    prompts = [r.tolist() for r in rows["prompt_ids"]]
    responses = [[x.tolist() for x in rs] for rs in rows["response_ids"]]
    lp, ln, _ = forward_logps(model, pad_sequences(prompts, responses, None, tok.pad_token_id), 4)
    lp, ln = lp.double(), ln.double()
    ref = torch.tensor(np.stack(rows["reference_logps"].tolist()), dtype=torch.float64)
    sc = torch.tensor(np.array(rows["scores"].tolist(), dtype=np.float64))
    best, worst = sc.argmax(-1), sc.argmin(-1)  # chosen = best by score, rejected = worst

    def pick(x, i):
        return x.gather(1, i[:, None]).squeeze(1)

    pair = (pick(lp, best), pick(lp, worst), pick(ref, best), pick(ref, worst))
    want = {
        "dpo": lambda: L.dpo(*pair, 0.2),
        "ipo": lambda: L.ipo(*pair, 0.2),
        "cdpo": lambda: L.cdpo(*pair, 0.2, 0.1),
        "rdpo": lambda: L.rdpo(*pair, 0.2, 0.2),
        "simpo": lambda: L.simpo(pair[0], pair[1], pick(ln, best), pick(ln, worst), 0.2, 0.5),
        "dpo_pl": lambda: L.dpo_pl(lp, ref, sc, 0.2),
        "rrhf": lambda: L.rrhf(lp, ln, sc) - 0.7 * pick(lp, best) / pick(ln, best),
        "lire": lambda: L.lire(lp, sc, 2.0),
    }[loss]()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_bf16_autocast_step_tracks_the_fp32_step(setup) -> None:
    tok, _, rows = setup
    cfg = cfg_for(loss="dpo", objective="kldpo", tau=0.5)
    grads = []
    for amp in (torch.float32, torch.bfloat16):
        model = build_model("tiny-gpt2", tok, dtype=torch.float32, seed=1).train()
        mb = step.collate_micro(rows, slice(0, 4), "preference", "dpo", tok.pad_token_id, None, pack=True)
        stats = step.train_step(model, [mb], cfg, device=torch.device("cpu"), amp=amp)
        assert np.isfinite(stats["metrics"]["loss"])
        assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cos > 0.99, float(cos)
    assert not torch.equal(grads[0], grads[1])  # bf16 really ran


@pytest.mark.parametrize("pack", [False, True])
def test_wdpo_finite_difference_matches_the_double_backward(setup, pack: bool) -> None:
    """train.wdpo_grad=finite_difference: one backward plus a forward-backward at z + s g instead of a double
    backward. In float64 it matches the exact gradient's penalty part to O(s), through the step's both paths
    (one micro-batch, and four micro-batches of one); the penalties it logs are exact (no difference taken)."""
    tok, _, rows = setup
    rho = 0.3
    out = {}
    for grad, fd_step in (("double_backward", 1e-3), ("finite_difference", 1e-6), ("finite_difference", 1e-3)):
        for mbs in (4, 1):
            model = build_model("tiny-gpt2", tok, dtype=torch.float64, seed=3).train()
            cfg = cfg_for(loss="dpo", objective="wdpo", rho=rho, wdpo_grad=grad, wdpo_fd_step=fd_step)
            micro = [step.collate_micro(rows, slice(i, i + mbs), "preference", "dpo", tok.pad_token_id, None, pack)
                     for i in range(0, 4, mbs)]  # fmt: skip
            stats = step.train_step(model, micro, cfg, device=torch.device("cpu"))
            out[grad, fd_step, mbs] = (torch.cat([p.grad.reshape(-1) for p in model.parameters()]), stats["metrics"])
    model = build_model("tiny-gpt2", tok, dtype=torch.float64, seed=3).train()
    cfg = cfg_for(loss="dpo", objective="erm")
    mb = step.collate_micro(rows, slice(0, 4), "preference", "dpo", tok.pad_token_id, None, pack)
    step.train_step(model, [mb], cfg, device=torch.device("cpu"))
    g_dpo = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    exact = out["double_backward", 1e-3, 4][0] - g_dpo  # the penalty's gradient, rho * mean_i grad ||g_i||^2
    assert exact.norm() > 1e-3 * g_dpo.norm()
    for mbs in (4, 1):
        g, metrics = out["finite_difference", 1e-6, mbs]
        rel = float((g - g_dpo - exact).norm() / exact.norm())
        assert rel < 1e-4, (mbs, rel)
        want = out["double_backward", 1e-3, 4][1]
        assert metrics["robust/penalty"] == pytest.approx(want["robust/penalty"], rel=1e-9)
        assert metrics["loss"] == pytest.approx(want["loss"], rel=1e-9)
        g, _ = out["finite_difference", 1e-3, mbs]  # the default step: O(s) error on the penalty's gradient
        assert float((g - g_dpo - exact).norm() / exact.norm()) < 2e-2


@pytest.mark.parametrize(("preset", "base_dtype"), [("tiny-gpt2", torch.float32), ("tiny-llama", torch.bfloat16)])
def test_merged_lora_from_the_gathered_state_equals_peft_merging_the_live_model(
    tmp_path: Any, monkeypatch: Any, preset: str, base_dtype: torch.dtype
) -> None:
    # The final save merges from the gathered state (FSDP modules cannot be deep-copied): same weights as PEFT's
    # own merge of a copy, tied embeddings still tied (GPT-2), a bf16 base kept in bf16, and the live model intact.
    import copy

    pytest.importorskip("peft")
    from raydora import distributed

    tok = train_tokenizer(iter(["the quick brown fox jumps over the lazy dog"] * 20), vocab_size=300)
    build_model(preset, tok).save_pretrained(str(tmp_path))
    tok.save_pretrained(str(tmp_path))
    model = checkpoint.load_policy(tmp_path, base_dtype, torch.float32, "eager", lora_r=4, lora_alpha=8.0)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()  # B starts at zero: a merge would change nothing
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    from peft.tuners.lora import layer as lora_layer

    merged_on, merge = [], lora_layer.Linear.merge

    def spy(self, *args, **kwargs):  # where each layer's merge ran: on CPU for a CPU model
        merged_on.append(self.base_layer.weight.device.type)
        return merge(self, *args, **kwargs)

    monkeypatch.setattr(lora_layer.Linear, "merge", spy)
    merged = checkpoint.merged_lora(model, distributed.full_state_dict(model))
    assert merged_on and set(merged_on) == {"cpu"}
    got = merged.state_dict()
    assert sorted(got) == sorted(expected)
    for k in expected:
        assert got[k].dtype == expected[k].dtype == (base_dtype if k.endswith("weight") else got[k].dtype), k
        torch.testing.assert_close(got[k], expected[k], atol=0, rtol=0)
    changed = [k for k in expected if not torch.equal(got[k], build_model(preset, tok).to(base_dtype).state_dict()[k])]
    assert changed and all(k.endswith("weight") for k in changed)
    tied = merged.lm_head.weight is merged.get_input_embeddings().weight
    assert tied == (preset == "tiny-gpt2") == merged.config.tie_word_embeddings
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)


def test_merged_lora_writes_a_layer_merged_elsewhere_back_into_the_gathered_state(monkeypatch: Any) -> None:
    """On a GPU each adapted layer travels to the device, merges and comes back as new tensors; the merge must
    copy them back into the gathered (CPU) state, so the host holds the model once. Here a spy stands in for the
    round trip: it replaces every parameter of the layer by a copy before the merge."""
    import copy

    pytest.importorskip("peft")
    from peft.tuners.lora import layer as lora_layer

    from raydora import distributed

    tok = train_tokenizer(iter(["the quick brown fox jumps over the lazy dog"] * 20), vocab_size=300)
    model = build_model("tiny-llama", tok)
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    merge, moved = lora_layer.Linear.merge, []

    def round_trip(self, *args, **kwargs):
        for p in self.parameters():
            p.data = p.data.clone()  # what .to("cuda") does: new tensors
        moved.append(self)
        return merge(self, *args, **kwargs)

    monkeypatch.setattr(lora_layer.Linear, "merge", round_trip)
    state = {k: v.clone() for k, v in distributed.full_state_dict(model).items()}  # a GPU run's CPU copy
    merged = checkpoint.merged_lora(model, state)
    got = merged.state_dict()
    adapted = [k for k in got if k.endswith("_proj.weight")]
    assert moved and len(adapted) == len(moved)
    gathered = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in state.items()}
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=0, rtol=0)
    assert all(got[k].data_ptr() == gathered[k].data_ptr() for k in adapted)


def _fsdp_rows(n: int = 8) -> dict[str, Any]:
    rng = np.random.default_rng(3)
    return {
        "prompt_ids": _objects([rng.integers(2, 290, size=int(rng.integers(3, 7))) for _ in range(n)]),
        "response_ids": _objects(
            [[rng.integers(2, 290, size=int(rng.integers(2, 6))) for _ in range(2)] for _ in range(n)]
        ),
        "scores": _objects([[1.0, 0.0] if i % 2 else [0.0, 1.0] for i in range(n)]),
        "reference_logps": _objects([rng.normal(-20, 2, size=2) for _ in range(n)]),
    }


def _two_rank_worker(rank: int, world: int, port: int, out: str, lora: bool) -> None:
    """One spawn of 2 gloo ranks for both multi-process checks of this file (a spawn's start-up, torch and
    transformers imports, costs seconds): the FSDP2 accumulation (:func:`_fsdp_worker`), then the chunked log-probs
    under DDP and FSDP2 (:func:`_chunk_dist_worker`), each saving its own results."""
    import os

    import torch.distributed as dist

    tok = train_tokenizer(TEXTS * 5, vocab_size=300)
    run_fsdp = _fsdp_worker(rank, world, tok)  # its single-process reference, before any process group exists
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(run_fsdp(), os.path.join(out, f"fsdp-rank{rank}.pt"))
        torch.save(_chunk_dist_worker(rank, world, tok, lora), os.path.join(out, f"chunk-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _fsdp_worker(rank: int, world: int, tok: Any) -> Any:
    """2 gloo ranks, FSDP2 over a float64 tiny GPT-2, 4 rows each in 2 micro-batches of 2, against one process
    stepping all 8 rows as one micro-batch; both ``train.fsdp_grad_sync`` settings, counting the forwards. Computes
    the single-process reference now; returns the distributed part, to call once the process group exists."""
    from raydora import distributed

    rows, weights = _fsdp_rows(), torch.tensor([0.4, 1.7, 0.9, 2.5, 1.1, 0.3, 2.0, 0.8], dtype=torch.float64)
    cpu, results = torch.device("cpu"), {}
    forwards, scales = [0], [0]
    real_forward, real_scale = step.per_sample_losses, robust.OnlineTilt._scale

    def counting(*a: Any, **k: Any) -> Any:
        forwards[0] += 1
        return real_forward(*a, **k)

    def counting_scale(self: Any, factor: float) -> None:
        scales[0] += 1
        real_scale(self, factor)

    # This spawned process's own modules.
    step.per_sample_losses, robust.OnlineTilt._scale = counting, counting_scale  # type: ignore[method-assign]

    def micro(idx: list[int]) -> dict[str, Any]:
        mb = step.collate_micro({k: v[idx] for k, v in rows.items()}, slice(0, len(idx)), "preference", "dpo",
                                 tok.pad_token_id, None)  # fmt: skip
        mb["weights"] = weights[idx]
        return mb

    cases = [(o, s) for o in ("dora", "kldpo") for s in ("micro_batch", "step")]
    order = {}
    for objective, sync in cases:  # the single-process reference, before any process group exists
        cfg = cfg_for(loss="dpo", objective=objective, lam=0.5, tau=0.5, fsdp_grad_sync=sync)
        cfg = dataclasses.replace(cfg, batch_size=8)
        model = build_model("tiny-gpt2", tok, dtype=torch.float64, seed=1).train()
        with torch.no_grad():
            losses = real_forward(model, micro(list(range(8))), cfg)["losses"]
        # Rows in rising score order, cut contiguously: the ranks' shared running max rises at micro-batch 2.
        order[objective] = torch.argsort(step.objective_tilt(cfg).scores(losses, weights)).tolist()
        step.train_step(model, [micro(order[objective])], cfg, device=cpu)
        results[f"{objective}/{sync}/ref"] = {n: p.grad.clone() for n, p in model.named_parameters()}

    def in_the_group() -> dict[str, Any]:
        for objective, sync in cases:
            cfg = cfg_for(loss="dpo", objective=objective, lam=0.5, tau=0.5, fsdp_grad_sync=sync)
            cfg = dataclasses.replace(cfg, batch_size=8)
            model = distributed.shard_fsdp(build_model("tiny-gpt2", tok, dtype=torch.float64, seed=1).train())
            mine = order[objective][4 * rank : 4 * rank + 4]
            with torch.no_grad():  # as the loop's packing check does: leaves the root's unsharded parameters in
                real_forward(model, micro(mine[:2]), cfg)
            forwards[0] = scales[0] = 0
            group = distributed.default_group()
            step.train_step(
                model, [micro(mine[:2]), micro(mine[2:])], cfg, group=group, world=world, device=cpu, fsdp=True
            )
            results[f"{objective}/{sync}/forwards"] = forwards[0]
            results[f"{objective}/{sync}/scales"] = scales[0]
            results[f"{objective}/{sync}/fsdp"] = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        step.per_sample_losses, robust.OnlineTilt._scale = real_forward, real_scale  # type: ignore[method-assign]
        return results

    return in_the_group


@pytest.mark.parametrize("sync", ["micro_batch", "step"])
@pytest.mark.parametrize("objective", ["dora", "kldpo"])
def test_fsdp2_accumulation_gives_the_single_process_gradient(
    fsdp_results: list[dict[str, Any]], objective: str, sync: str
) -> None:
    """FSDP2 reducing after every micro-batch accumulates the log-sum-exp objectives in one pass (a running max
    shared by the ranks: 2 forwards, one per micro-batch, a rescale when the max rises at the second and the final
    factor); reducing once per step takes the window pass (4 forwards). Both hold the single-process gradient of
    the 8 rows, on every rank."""
    for res in fsdp_results:
        assert res[f"{objective}/{sync}/forwards"] == (2 if sync == "micro_batch" else 4)
        assert res[f"{objective}/{sync}/scales"] == (2 if sync == "micro_batch" else 0)
        ref, got = res[f"{objective}/{sync}/ref"], res[f"{objective}/{sync}/fsdp"]
        assert sorted(ref) == sorted(got) and sum(g.abs().sum() for g in ref.values()) > 1e-6
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], atol=1e-12, rtol=1e-9, msg=name)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The folder of :func:`_two_rank_worker`'s results (one spawn for both multi-process checks)."""
    import importlib.util
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path_factory.mktemp("two_ranks")
    lora = importlib.util.find_spec("peft") is not None
    mp.spawn(_two_rank_worker, args=(2, port, str(out), lora), nprocs=2, join=True)
    return out


@pytest.fixture(scope="module")
def fsdp_results(two_ranks: Any) -> list[dict[str, Any]]:
    return [torch.load(two_ranks / f"fsdp-rank{r}.pt", weights_only=True) for r in range(2)]


# ---- model.logprob_chunk: the LM head's log-probs in chunks, inside the model's forward ---------------------------
def _chunk_calls(monkeypatch: Any) -> list[tuple[int, int]]:
    """Records ``(tokens, chunk)`` of every ``chunked_target_logps`` call that forward_logps makes."""
    from raydora import encoding

    calls: list[tuple[int, int]] = []
    real = encoding.chunked_target_logps

    def spy(hidden: Any, weight: Any, targets: Any, bias: Any = None, chunk_size: int = 1024) -> Any:
        calls.append((hidden.shape[0], chunk_size))
        return real(hidden, weight, targets, bias, chunk_size)

    monkeypatch.setattr(encoding, "chunked_target_logps", spy)
    return calls


def _logps_and_grads(model: Any, enc: dict[str, Any], chunk: int, embeddings: bool = False) -> tuple[Any, ...]:
    """forward_logps's log-probs and lengths, and the gradients of a weighted sum of them (every parameter, and the
    input embeddings with ``embeddings``)."""
    from raydora.encoding import forward_logps

    model.zero_grad(set_to_none=True)
    logps, lengths, embeds = forward_logps(model, enc, 2, embeddings=embeddings, chunk=chunk)
    weights = torch.linspace(0.5, 2.0, logps.numel(), dtype=logps.dtype).reshape(logps.shape)
    if embeds is not None:
        embeds.retain_grad()
    (logps * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), lengths, grads, None if embeds is None else embeds.grad.clone()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama"])
def test_chunked_log_probs_equal_the_full_logits(setup, monkeypatch, preset: str, pack: bool, dtype) -> None:
    """``chunk=5`` and ``7`` (several chunks, the last one partial) against the full logits: the same log-probs,
    lengths and gradients, for every parameter and for the input embeddings (WDPO's ``embeddings=True``), padded
    and packed, GPT-2 (head tied to the token embeddings) and Llama (untied). float64 to 1e-10, float32 within its
    rounding."""
    from raydora.encoding import chunk_head

    tok, _, rows = setup
    model = build_model(preset, tok, dtype=dtype, seed=5).train()
    head, why = chunk_head(model)
    assert head is model.lm_head and why == ""
    assert (head.weight is model.get_input_embeddings().weight) == (preset == "tiny-gpt2")
    enc = step.collate_micro(rows, slice(0, 4), "preference", "dpo", tok.pad_token_id, None, pack)["enc"]
    tokens = int(enc["loss_mask"][:, 1:].sum())
    calls = _chunk_calls(monkeypatch)
    want = _logps_and_grads(model, enc, 0, embeddings=True)
    assert calls == []
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    for chunk in (5, 7):
        assert tokens % chunk != 0 and tokens > 2 * chunk  # several chunks, the last one partial
        for embeddings in (False, True):
            got = _logps_and_grads(model, enc, chunk, embeddings=embeddings)
            assert calls.pop() == (tokens, chunk) and calls == []  # once per forward, on the response tokens only
            torch.testing.assert_close(got[0], want[0], **tol)
            torch.testing.assert_close(got[1], want[1], atol=0, rtol=0)
            assert sorted(got[2]) == sorted(want[2])
            for name in want[2]:
                torch.testing.assert_close(got[2][name], want[2][name], **tol, msg=name)
            if embeddings:
                torch.testing.assert_close(got[3], want[3], **tol)
    # The head's own gradient is there: a token that is never an input gets gradient only through the head's
    # softmax (for GPT-2 the tied embedding row gets the head's contribution on top of the inputs' ones).
    unseen = sorted(set(range(len(tok))) - set(enc["input_ids"].unique().tolist()))[0]
    g_head = got[2]["lm_head.weight" if preset == "tiny-llama" else "transformer.wte.weight"][unseen]
    assert g_head.abs().max() > 0
    assert "forward" not in vars(model.lm_head)  # the override is gone after every forward


@pytest.mark.parametrize("pack", [False, True])
def test_chunked_wdpo_penalty_and_gradient_equal_the_full_logits(setup, monkeypatch, pack: bool) -> None:
    """WDPO's double backward through the chunks: the per-sample penalties ``||d l_i / d z||^2`` and the step's
    gradient (``StepConfig.logprob_chunk``) equal the full logits' in float64."""
    tok, _, rows = setup
    calls = _chunk_calls(monkeypatch)
    out = []
    for chunk in (0, 3):
        model = build_model("tiny-gpt2", tok, dtype=torch.float64, seed=3).train()
        cfg = dataclasses.replace(cfg_for(loss="dpo", objective="wdpo", rho=0.3), logprob_chunk=chunk)
        mb = step.collate_micro(rows, slice(0, 4), "preference", "dpo", tok.pad_token_id, None, pack)
        o = step.per_sample_losses(model, mb, cfg, embeddings=True)
        pen = step.wdpo_penalty(o["losses"], o["embeds"], mb["enc"])
        model.zero_grad(set_to_none=True)
        stats = step.train_step(model, [mb], cfg, device=torch.device("cpu"))
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        out.append((o["losses"].detach(), pen.detach(), grads, stats["metrics"]["robust/penalty"]))
        assert len(calls) == (2 if chunk else 0)  # per_sample_losses, then the step's forward
    assert out[0][1].min() > 0
    for a, b in zip(out[0][:3], out[1][:3], strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
    assert out[0][3] == pytest.approx(out[1][3], rel=1e-9)


def _one_step(model: Any, micro: list[dict[str, Any]], cfg: Any) -> dict[str, Any]:
    """One AdamW step of ``train_step``'s gradient: the updated weights."""
    opt = train.make_optimizer([p for p in model.parameters() if p.requires_grad], 1e-2, 0.0)
    step.train_step(model, micro, cfg, device=torch.device("cpu"))
    opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(("mode", "loss", "objective"), [("preference", "dpo", "kldpo"),
                                                         ("preference", "dpo_pl", "kl_dro"), ("sft", "dpo", "erm")])  # fmt: skip
def test_one_optimizer_step_with_chunks_equals_the_full_logits(setup, listwise, monkeypatch, mode, loss, objective):
    """``train_step`` with ``logprob_chunk=3`` over two packed micro-batches (the online tilt for kldpo and
    kl_dro), then an AdamW step: the same weights as with the full logits, in float64; DPO + KLDPO, a listwise
    loss (DPO-PL + KL-DRO) and SFT."""
    tok, rows = listwise if loss == "dpo_pl" else setup[::2]
    n = len(rows["prompt_ids"])
    calls = _chunk_calls(monkeypatch)
    weights = []
    for chunk in (0, 3):
        model = build_model("tiny-llama", tok, dtype=torch.float64, seed=6).train()
        cfg = step.StepConfig(mode, TrainConfig(loss=loss, objective=objective, tau=0.5, lam=0.5, grad_clip=0.0),
                              batch_size=n, micro_batch_size=2, logprob_chunk=chunk)  # fmt: skip
        micro = [step.collate_micro(rows, slice(i, i + 2), mode, loss, tok.pad_token_id, None, True)
                 for i in range(0, n, 2)]  # fmt: skip
        before = {k: p.detach().clone() for k, p in model.named_parameters()}
        weights.append(_one_step(model, micro, cfg))
        assert len(calls) == (len(micro) if chunk else 0)  # one forward per micro-batch, all chunked
    assert any(not torch.equal(before[k], weights[0][k]) for k in before)
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], atol=1e-10, rtol=1e-9, msg=name)


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama"])
def test_chunked_log_probs_under_lora_and_a_lora_adapted_head_falls_back(setup, monkeypatch, capsys, preset) -> None:
    """PEFT LoRA (``all-linear`` leaves the head a plain, frozen Linear): the chunks run inside the PEFT model and
    the adapters' gradients equal the full logits'. A head that LoRA adapts too is not a plain Linear: the chunked
    path refuses it, says why once, and computes the full logits (same values)."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    from raydora.encoding import chunk_head

    tok, _, rows = setup
    enc = step.collate_micro(rows, slice(0, 4), "preference", "dpo", tok.pad_token_id, None, True)["enc"]
    calls = _chunk_calls(monkeypatch)
    monkeypatch.setattr("raydora.encoding._refused", set())  # the reason is printed once per process
    for targets, chunked in (("all-linear", True), (["lm_head", "c_attn", "q_proj", "v_proj"], False)):
        model = build_model(preset, tok, dtype=torch.float64, seed=7)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets)).train()
        torch.manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_()  # B starts at zero: the adapters' A would get no gradient
        head, why = chunk_head(model)
        assert (head is not None) == chunked and (head is model.get_base_model().lm_head or not chunked)
        want = _logps_and_grads(model, enc, 0)
        got = _logps_and_grads(model, enc, 3)
        assert len(calls) == int(chunked)
        calls.clear()
        assert want[2] and all("lora_" in k for k in want[2]) and sorted(got[2]) == sorted(want[2])
        torch.testing.assert_close(got[0], want[0], atol=1e-10, rtol=1e-10)
        for name in want[2]:
            torch.testing.assert_close(got[2][name], want[2][name], atol=1e-10, rtol=1e-9, msg=name)
        if not chunked:
            assert "peft.tuners.lora.layer.Linear, not a plain torch Linear" in why
            assert why in capsys.readouterr().out


def test_chunked_log_probs_refuse_models_that_transform_their_logits(setup) -> None:
    """Post-head transforms break the stand-in: a config with softcapping (or an unknown model type) is refused
    up front; a model that changes its head's output anyway (here a subclass scaling the logits) fails loudly
    instead of returning wrong log-probs."""
    from transformers import GPT2LMHeadModel

    from raydora.encoding import chunk_head, forward_logps

    tok, _, rows = setup
    model = build_model("tiny-gpt2", tok, dtype=torch.float64, seed=1)
    model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in chunk_head(model)[1]
    model.config.final_logit_softcapping = None
    model.config.model_type = "gemma2"
    assert "'gemma2' is not known" in chunk_head(model)[1]

    class Scaled(GPT2LMHeadModel):
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    scaled = Scaled(build_model("tiny-gpt2", tok, dtype=torch.float64, seed=1).config)
    enc = step.collate_micro(rows, slice(0, 4), "preference", "dpo", tok.pad_token_id, None)["enc"]
    assert chunk_head(scaled)[0] is scaled.lm_head
    with pytest.raises(RuntimeError, match="changed its head's output"):
        forward_logps(scaled, enc, 2, chunk=3)
    assert "forward" not in vars(scaled.lm_head)  # restored after the failure too


def test_auto_chunks_from_the_vocabulary_size_up_and_only_where_the_head_allows(setup, monkeypatch, capsys) -> None:
    """``model.logprob_chunk=auto``: chunks of 1,024 where the head can be chunked and has >= 32,000 outputs (here
    the threshold is moved to the tiny model's vocabulary), else the full logits, without the message an explicit
    chunk size gets; the log-probs equal either way. An int passes through."""
    from raydora import encoding
    from raydora.config import ConfigError, load_config

    tok, _, rows = setup
    model = build_model("tiny-llama", tok, dtype=torch.float64, seed=4)
    vocab = model.lm_head.out_features
    assert encoding.AUTO_MIN_VOCAB == 32_000 > vocab and encoding.resolve_chunk(model, "auto") == 0
    assert encoding.resolve_chunk(model, 7) == 7 and encoding.resolve_chunk(model, 0) == 0
    enc = step.collate_micro(rows, slice(0, 4), "preference", "dpo", tok.pad_token_id, None)["enc"]
    calls = _chunk_calls(monkeypatch)
    with torch.no_grad():
        full, _, _ = encoding.forward_logps(model, enc, 2, chunk="auto")
        assert calls == []
        monkeypatch.setattr(encoding, "AUTO_MIN_VOCAB", vocab)
        assert encoding.resolve_chunk(model, "auto") == encoding.AUTO_CHUNK == 1024
        chunked, _, _ = encoding.forward_logps(model, enc, 2, chunk="auto")
        assert calls == [(int(enc["loss_mask"][:, 1:].sum()), 1024)]
        torch.testing.assert_close(chunked, full, atol=1e-10, rtol=1e-10)
        monkeypatch.setattr(encoding, "CHUNKABLE", ())  # a model type the chunks do not know: quietly off
        capsys.readouterr()
        assert encoding.resolve_chunk(model, "auto") == 0
        encoding.forward_logps(model, enc, 2, chunk="auto")
    assert len(calls) == 1 and "[logprobs]" not in capsys.readouterr().out
    assert load_config(None, ["model.logprob_chunk=auto"]).model.logprob_chunk == "auto"
    with pytest.raises(ConfigError, match=r"model\.logprob_chunk: expected int or 'auto', got 'fast'"):
        load_config(None, ["model.logprob_chunk=fast"])


def test_reference_pass_with_chunks_equals_the_full_logits(setup, monkeypatch) -> None:
    """The reference pass (``reference.logprob_chunk``, no grad, batches of 3 sequences) gives the same
    reference log-probs."""
    from raydora.reference import ReferenceModel

    tok, _, rows = setup
    ref = ReferenceModel.__new__(ReferenceModel)
    ref.model = build_model("tiny-llama", tok, dtype=torch.float64, seed=4)
    ref.tokenizer, ref.device, ref.dtype, ref.batch_size, ref.pad_to_multiple_of = tok, "cpu", torch.float32, 3, 0
    prompts = [r.tolist() for r in rows["prompt_ids"]]
    responses = [[x.tolist() for x in rs] for rs in rows["response_ids"]]
    calls = _chunk_calls(monkeypatch)
    out = []
    for chunk in (0, 2):
        ref.logprob_chunk = chunk
        out.append(ref.logps(prompts, responses))
    assert [c[1] for c in calls] == [2, 2, 2]  # 8 sequences in batches of 3
    assert np.max(np.abs(out[0])) > 1
    np.testing.assert_allclose(out[1], out[0], atol=1e-10, rtol=1e-10)


def _chunk_dist_worker(rank: int, world: int, tok: Any, lora: bool) -> dict[str, Any]:
    """2 gloo ranks (the process group already made), 4 rows each, float64: DDP over GPT-2 (tied head), FSDP2 over
    GPT-2 through ``train_step`` in two micro-batches, and FSDP2 over a LoRA Llama (when peft is installed); each
    with ``logprob_chunk`` 0 and 3. Returns every gradient and how many chunked calls ran."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from raydora import distributed, encoding

    rows = _fsdp_rows()
    mine = {k: v[4 * rank : 4 * rank + 4] for k, v in rows.items()}
    calls = [0]
    real = encoding.chunked_target_logps

    def counting(*a: Any, **k: Any) -> Any:
        calls[0] += 1
        return real(*a, **k)

    encoding.chunked_target_logps = counting  # this spawned process's own module
    results: dict[str, Any] = {}
    group, cpu = distributed.default_group(), torch.device("cpu")
    try:
        for chunk in (0, 3):
            calls[0] = 0
            ddp = DDP(build_model("tiny-gpt2", tok, dtype=torch.float64, seed=1).train())
            enc = step.collate_micro(mine, slice(0, 4), "preference", "dpo", tok.pad_token_id, None, True)["enc"]
            logps, _, _ = encoding.forward_logps(ddp, enc, 2, chunk=chunk)
            (logps * torch.linspace(0.5, 2.0, 8, dtype=logps.dtype).reshape(4, 2)).sum().backward()
            results[f"ddp/{chunk}"] = {n: p.grad.clone() for n, p in ddp.module.named_parameters()}
            models = [("fsdp", build_model("tiny-gpt2", tok, dtype=torch.float64, seed=1))]
            if lora:
                models.append(("fsdp-lora", _lora(build_model("tiny-llama", tok, dtype=torch.float64, seed=1))))
            for name, model in models:
                model = distributed.shard_fsdp(model.train())
                cfg = dataclasses.replace(cfg_for(loss="dpo", objective="kldpo", tau=0.5), batch_size=8)
                cfg = dataclasses.replace(cfg, logprob_chunk=chunk)
                micro = [step.collate_micro(mine, slice(i, i + 2), "preference", "dpo", tok.pad_token_id, None, True)
                         for i in (0, 2)]  # fmt: skip
                step.train_step(model, micro, cfg, group=group, world=world, device=cpu, fsdp=True)
                grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
                results[f"{name}/{chunk}"] = grads
            results[f"calls/{chunk}"] = calls[0]
    finally:
        encoding.chunked_target_logps = real
    return results


def _lora(model: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)  # the adapters' A starts random: the same on every rank and for every chunk setting
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()  # B starts at zero: A would get no gradient
    return model


def test_chunked_log_probs_under_ddp_and_fsdp2_give_the_full_logits_gradients(two_ranks: Any) -> None:
    """The override goes through the head module's ``__call__``: under DDP (GPT-2's tied head and embeddings, one
    parameter, both contributions), FSDP2 (the head's weight unsharded by the root unit's hooks, gradients
    reduce-scattered after every micro-batch) and FSDP2 over a LoRA model, the gradients with ``chunk=3`` equal the
    full logits' on both ranks, and the chunks really ran (one call per forward: 1 under DDP, 2 micro-batches x 2
    models under FSDP2)."""
    pytest.importorskip("peft")
    for r in range(2):
        res = torch.load(two_ranks / f"chunk-rank{r}.pt", weights_only=True)
        assert res["calls/0"] == 0 and res["calls/3"] == 1 + 2 * 2
        for name in ("ddp", "fsdp", "fsdp-lora"):
            want, got = res[f"{name}/0"], res[f"{name}/3"]
            assert sorted(got) == sorted(want) and sum(g.abs().sum() for g in want.values()) > 1e-6
            assert name != "fsdp-lora" or all("lora_" in k for k in want)
            for key in want:
                torch.testing.assert_close(got[key], want[key], atol=1e-10, rtol=1e-9, msg=f"{name} {key}")


def test_bf16_autocast_step_with_chunks_tracks_the_full_logits(setup) -> None:
    """Under bf16 autocast each chunk's logits are the same bf16 logits as the full path's (the loss is equal); the
    backward recomputes them under the forward's autocast but multiplies in fp32 (the full path's backward in bf16),
    so the gradient differs by bf16 rounding and lands no farther from the fp32 step's than the full path's does."""
    tok, _, rows = setup
    out = {}
    for amp, chunk in ((torch.float32, 0), (torch.bfloat16, 0), (torch.bfloat16, 3)):
        model = build_model("tiny-llama", tok, dtype=torch.float32, seed=1).train()
        cfg = dataclasses.replace(cfg_for(loss="dpo", objective="kldpo", tau=0.5), logprob_chunk=chunk)
        mb = step.collate_micro(rows, slice(0, 4), "preference", "dpo", tok.pad_token_id, None, pack=True)
        stats = step.train_step(model, [mb], cfg, device=torch.device("cpu"), amp=amp)
        out[amp, chunk] = (torch.cat([p.grad.reshape(-1) for p in model.parameters()]), stats["metrics"]["loss"])
    fp32, full, chunked = out[torch.float32, 0], out[torch.bfloat16, 0], out[torch.bfloat16, 3]
    assert chunked[1] == pytest.approx(full[1], rel=1e-6) and full[1] != fp32[1]  # bf16 really ran
    assert torch.nn.functional.cosine_similarity(chunked[0], full[0], dim=0) > 0.999
    assert (chunked[0] - fp32[0]).norm() <= 1.5 * (full[0] - fp32[0]).norm()
