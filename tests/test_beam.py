"""Beam search over sampled concepts (lcm_fast.inference.beam): bookkeeping, scorers, engines, parity at K = B = 1."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lcm_fast
from lcm_fast.inference.beam import BeamSearch, Candidates, DenoisingConsistency, PlanSimilarity
from lcm_fast.inference.planning import latest_plans

from .conftest import random_model, tiny_config

FAMILIES = ("base_lcm", "two_tower_diffusion_lcm", "one_tower_diffusion_lcm", "quant_lcm")


def _model(family: str):
    return random_model(tiny_config(family))


class Target:
    """A deterministic scorer: cosine to a fixed vector (no draws, so scores can be recomputed)."""

    def __init__(self, dim: int = 24, seed: int = 5) -> None:
        self.target = torch.randn(dim, generator=torch.Generator().manual_seed(seed))

    def __call__(self, c: Candidates) -> torch.Tensor:
        return F.cosine_similarity(c.concepts.float(), self.target[None], dim=-1)


def _options(family: str, **kw) -> lcm_fast.GenerationOptions:
    base = dict(seed=0, inference_timesteps=4, guidance_scale=2.0, top_k=3, lcm_temperature=1.0)
    return lcm_fast.GenerationOptions(**{**base, **kw})


# ---- the bookkeeping, on hand-made scores ---------------------------------------------------------------------------

def _advance(beams, scores, stop=None, at_limit=None, forced=None, documents=None, generated=1, step=3):
    R = len(scores)
    seqs = torch.arange(R, dtype=torch.float32)[:, None, None].expand(R, step + 1, 2).clone()
    false = torch.zeros(R, dtype=torch.bool)
    mask = lambda rows: false.clone().index_fill_(0, torch.tensor(rows, dtype=torch.long), True) if rows else false
    return beams.advance(seqs, step, torch.tensor(scores), mask(stop), mask(at_limit), mask(forced),
                         torch.tensor(documents or [0] * R), torch.full((R,), generated), false)


def test_the_best_candidates_continue():
    beams = BeamSearch(num_candidates=2, beam_size=2, documents=1, device=torch.device("cpu"))
    index, keep, done = _advance(beams, [0.1, 0.5, 0.3, 0.2])
    assert index.tolist() == [1, 1, 2, 2] and keep.tolist() == [0, 1, 2, 3] and done == []
    assert beams.total.tolist() == pytest.approx([0.5, 0.5, 0.3, 0.3]) and beams.alive.all()
    # the next sentence adds to the beams' totals: the second beam's candidate 0.3 + 0.4 beats 0.5 + 0.1
    index, _, _ = _advance(beams, [0.1, 0.0, 0.4, -1.0], generated=2)
    assert index.tolist() == [2, 2, 0, 0] and beams.total.tolist() == pytest.approx([0.7, 0.7, 0.6, 0.6])


def test_stopping_candidates_end_hypotheses_and_dead_beams_are_never_chosen():
    beams = BeamSearch(num_candidates=1, beam_size=2, documents=1, device=torch.device("cpu"))
    index, _, done = _advance(beams, [0.9, 0.1], stop=[0], generated=2)
    assert done == [] and index.tolist() == [1, 1] and beams.alive.tolist() == [True, False]  # one beam is dead
    (score, seq), = beams.hypotheses[0]
    assert score == pytest.approx(0.45) and seq[:, 0].tolist() == [0.0] * 4  # the mean of 2 sentences
    index, _, done = _advance(beams, [0.0, 5.0], generated=3)  # the dead row's 5.0 does not count
    assert index.tolist() == [0, 0] and done == []
    _, _, done = _advance(beams, [0.3, 0.3], stop=[0], generated=4)  # the second hypothesis: the document is done
    assert done == [0]
    hypotheses, scores = beams.best(0)
    assert scores.tolist() == pytest.approx([0.45, (0.1 + 0.3) / 4]) and len(hypotheses) == 2


def test_stops_below_the_beam_are_dropped_and_the_limit_ends_the_best():
    beams = BeamSearch(num_candidates=2, beam_size=1, documents=1, device=torch.device("cpu"))
    index, _, done = _advance(beams, [0.9, 0.1], stop=[1])  # a stop ranked below the beam is no hypothesis
    assert index.tolist() == [0, 0] and done == [] and beams.hypotheses[0] == []
    _, _, done = _advance(beams, [0.2, 0.4], at_limit=[0, 1])
    assert done == [0] and beams.best(0)[1].tolist() == pytest.approx([1.3])


def test_ragged_documents_forced_rows_and_finished_documents():
    """Two documents of 2 x 2 rows: the first in its prompt (kept as is), the second done (dropped)."""
    beams = BeamSearch(num_candidates=2, beam_size=2, documents=2, device=torch.device("cpu"))
    index, keep, done = _advance(beams, [0.0] * 4 + [0.1, 0.2, 0.3, 0.4], forced=[0, 1, 2, 3],
                                 at_limit=[4, 5, 6, 7], documents=[0] * 4 + [1] * 4)
    assert index.tolist() == [0, 1, 2, 3] and keep.tolist() == [0, 1, 2, 3] and done == [1]
    assert beams.best(1)[1].tolist() == pytest.approx([0.4, 0.3])
    assert beams.total.tolist() == [0.0] * 4


# ---- generation ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_one_candidate_and_one_beam_are_plain_sampling(family):
    """K = B = 1 is today's generation: the same concepts, and the scorer is never called."""
    model = _model(family)
    prompts, lens = torch.randn(3, 4, 24), torch.tensor([4, 2, 3])
    plain = lcm_fast.generate(model, prompts, lens, options=_options(family), max_gen_len=3)

    def never(candidates):
        raise AssertionError("the scorer ran")

    same = lcm_fast.generate(model, prompts, lens, options=_options(family, beam_scorer=never), max_gen_len=3)
    assert all(torch.equal(a, b) for a, b in zip(plain.sequences, same.sequences))
    assert plain.beams is None and same.beam_scores is None


@pytest.mark.parametrize("family", FAMILIES)
def test_a_ragged_batch_equals_each_document_alone(family):
    """With each document's own noise, beam search over a ragged batch (teacher-forced rows, documents finishing at
    different sentences) gives every document what it gets alone."""
    model, scorer = _model(family), Target()
    prompts, lens = torch.randn(3, 4, 24), torch.tensor([4, 1, 3])
    # an EOS concept and a threshold that about a third of the sampled concepts reach
    sampled = torch.cat([s[-4:] for s in lcm_fast.generate(model, prompts, lens, options=_options(family),
                                                           max_gen_len=4).sequences])
    eos = sampled[0]
    threshold = float(F.cosine_similarity(sampled[1:], eos[None]).quantile(0.62))
    options = _options(family, num_candidates=3, beam_size=2, beam_scorer=scorer, eos_threshold=threshold)
    keys = ["a", "b", "c"]
    batched = lcm_fast.generate(model, prompts, lens, options=options, eos_vec=eos, max_gen_len=4,
                                noise=lcm_fast.DocumentNoise(3, keys))
    lengths = set()
    for i in range(3):
        alone = lcm_fast.generate(model, prompts[i : i + 1, : lens[i]], options=options, eos_vec=eos, max_gen_len=4,
                                  noise=lcm_fast.DocumentNoise(3, keys[i : i + 1]))
        assert len(batched.beams[i]) == len(alone.beams[0]) <= 2
        for a, b in zip(batched.beams[i], alone.beams[0]):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)  # batched and single-row BLAS sums differ
        torch.testing.assert_close(batched.beam_scores[i], alone.beam_scores[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(batched.sequences[i], batched.beams[i][0])
        lengths |= {len(h) - int(lens[i]) for h in batched.beams[i]}
    assert len(lengths) > 1  # hypotheses ended at different sentences


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_are_the_mean_of_the_sentences_and_beat_sampling_one(family):
    model, scorer = _model(family), Target()
    prompts = torch.randn(4, 3, 24)
    options = _options(family, num_candidates=4, beam_size=2, beam_scorer=scorer)
    out = lcm_fast.generate(model, prompts, options=options, max_gen_len=3)
    plain = lcm_fast.generate(model, prompts, options=_options(family), max_gen_len=3)
    for i in range(4):
        assert out.beam_scores[i].tolist() == sorted(out.beam_scores[i].tolist(), reverse=True)
        for hypothesis, score in zip(out.beams[i], out.beam_scores[i]):
            generated = hypothesis[3:]
            assert float(score) == pytest.approx(float(F.cosine_similarity(generated, scorer.target[None]).mean()),
                                                 abs=1e-5)
    best = torch.stack([s[0] for s in out.beam_scores])
    sampled = torch.stack([F.cosine_similarity(s[3:], scorer.target[None]).mean() for s in plain.sequences])
    assert best.mean() > sampled.mean()


@pytest.mark.parametrize("family", ["two_tower_diffusion_lcm", "one_tower_diffusion_lcm", "base_lcm"])
def test_both_engines_and_static_shapes_agree(family):
    """Beam search through the fast engine (caches reordered with repeated rows), the static-shape path (in place)
    and the reference engine: the same beams (the diffusion families with the consistency scorer)."""
    model = _model(family)
    prompts, lens = torch.randn(2, 3, 24), torch.tensor([3, 2])
    options = _options(family, num_candidates=3, beam_size=2,
                       beam_scorer=Target() if family == "base_lcm" else "consistency")
    runs = {engine: lcm_fast.generate(model, prompts, lens, options=options, engine=engine, max_gen_len=3)
            for engine in ("fast", "reference")}
    with pytest.warns(UserWarning, match="not on a GPU"):
        runs["static"] = lcm_fast.generate(model, prompts, lens, options=options, cuda_graphs=True, max_gen_len=3)
    for engine in ("reference", "static"):
        for a, b in zip(runs["fast"].beams, runs[engine].beams):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
        for a, b in zip(runs["fast"].beam_scores, runs[engine].beam_scores):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_denoising_consistency_is_the_denoising_loss_at_its_level():
    """-mean((denoise(x_t) - x)^2) in normalized space, x_t = sqrt(a_t) x + sqrt(1 - a_t) eps at t = level (T - 1)."""
    model = _model("two_tower_diffusion_lcm")
    x, eps = torch.randn(3, 24), torch.randn(3, 24)
    seen = {}

    def denoise(noisy, t):
        seen["t"] = t
        return noisy * 0.5

    c = Candidates(concepts=x, context=torch.randn(3, 2, 24), documents=torch.arange(3), model=model,
                   randn=lambda shape: eps, denoise=denoise)
    scores = DenoisingConsistency(0.25)(c)
    a = model.noise_scheduler.alphas_cumprod[25]
    clean = model.normalizer.normalize(x)
    assert seen["t"] == 25  # round(0.25 * 99)
    torch.testing.assert_close(scores, -(0.5 * (a.sqrt() * clean + (1 - a).sqrt() * eps) - clean).pow(2).mean(-1))


def test_plan_similarity_follows_the_latest_plan_or_given_plans():
    brk = torch.tensor([1.0, 0.0, 0.0])
    context = torch.tensor([[[0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 1]],     # break, then plan [0, 0, 1]
                            [[0, 1, 0], [0, 1, 1], [0, 1, 0], [0, 0, 1]]], dtype=torch.float32)  # no break
    plans, found = latest_plans(context, brk, 0.9)
    assert found.tolist() == [True, False] and plans[0].tolist() == [0, 0, 1]
    candidates = Candidates(concepts=torch.tensor([[0, 0, 2.0], [0, 1.0, 0]]), context=context,
                            documents=torch.tensor([0, 1]), model=None, randn=None, break_vec=brk)
    assert PlanSimilarity()(candidates).tolist() == pytest.approx([1.0, 0.0])
    given = PlanSimilarity(torch.tensor([[0, 1.0, 0], [0, 1.0, 0]]))
    assert given(candidates).tolist() == pytest.approx([0.0, 1.0])


def test_plan_scorer_steers_generation_towards_the_plans():
    model = _model("two_tower_diffusion_lcm")
    prompts = torch.randn(3, 2, 24)
    topics = torch.randn(3, 24)
    steer = PlanSimilarity(topics)
    out = lcm_fast.generate(model, prompts, options=_options("two_tower_diffusion_lcm", num_candidates=6,
                                                              beam_scorer=steer), max_gen_len=3)
    plain = lcm_fast.generate(model, prompts, options=_options("two_tower_diffusion_lcm"), max_gen_len=3)
    cos = lambda out: torch.stack([F.cosine_similarity(out.sequences[i][2:], topics[i][None]).mean() for i in range(3)])
    assert (cos(out) >= cos(plain)).all() and cos(out).mean() > cos(plain).mean()


def test_bad_beam_options_and_scorers():
    base_lcm = _model("base_lcm")
    prompts = torch.randn(1, 2, 24)
    with pytest.raises(ValueError, match="num_candidates must be an integer >= 1"):
        lcm_fast.GenerationOptions(num_candidates=0)
    with pytest.raises(ValueError, match="beam_scorer must be one of"):
        lcm_fast.GenerationOptions(beam_scorer="likelihood")
    with pytest.raises(ValueError, match="'consistency' re-noises and denoises candidates: it needs a diffusion LCM"):
        lcm_fast.generate(base_lcm, prompts, options=lcm_fast.GenerationOptions(beam_size=2), max_gen_len=1)
    with pytest.raises(ValueError, match="'plan' scores candidates by their LPCM plan: give the Generator"):
        lcm_fast.generate(base_lcm, prompts, options=lcm_fast.GenerationOptions(beam_size=2, beam_scorer="plan"),
                          max_gen_len=1)
    with pytest.raises(ValueError, match="PlanSimilarity.plans has dim 5"):
        lcm_fast.generate(base_lcm, prompts, max_gen_len=1, options=lcm_fast.GenerationOptions(
            beam_size=2, beam_scorer=PlanSimilarity(torch.zeros(1, 5))))
    with pytest.raises(ValueError, match=r"must return a \[2\] tensor without NaN, got torch.Size\(\[1\]\)"):
        lcm_fast.generate(base_lcm, prompts, max_gen_len=1, options=lcm_fast.GenerationOptions(
            num_candidates=2, beam_scorer=lambda c: torch.zeros(1)))
    with pytest.raises(ValueError, match=r"without NaN, got torch.Size\(\[2\]\) with NaN"):
        lcm_fast.generate(base_lcm, prompts, max_gen_len=1, options=lcm_fast.GenerationOptions(
            num_candidates=2, beam_scorer=lambda c: torch.full((2,), float("nan"))))
    with pytest.raises(ValueError, match=r"level must be in \[0, 1\]"):
        DenoisingConsistency(2)


def test_document_noise_gives_every_candidate_its_own_draws():
    noise = lcm_fast.DocumentNoise(1, ["a", "b"])
    noise.expand(3)
    assert noise.keys == ["a", ("a", 1), ("a", 2), "b", ("b", 1), ("b", 2)]
    draws = noise.randn((6, 4), site="initial_latents", device=torch.device("cpu"))
    alone = lcm_fast.DocumentNoise(1, ["a"]).randn((1, 4), site="initial_latents", device=torch.device("cpu"))
    assert torch.equal(draws[0], alone[0]) and len({tuple(r.tolist()) for r in draws}) == 6
