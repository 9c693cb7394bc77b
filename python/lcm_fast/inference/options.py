"""What a generation call is asked for and what it returns: :class:`GenerationOptions` (the official generator
options), :func:`validate_prompts` and :class:`GenerationOutput`."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor

from ..config import merge_into
from ..models import BaseLCM, OneTowerLCM, QuantLCM, TwoTowerLCM
from .beam import SCORERS, Scorer
from .planning import SENTENCE


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


#: GenerationOptions.validate: (names, check, what the check wants, None allowed)
_OPTION_RULES: tuple[tuple[tuple[str, ...], Callable[[Any], bool], str, bool], ...] = (
    (("max_seq_len", "min_seq_len", "top_k", "inference_timesteps", "num_candidates", "beam_size"),
     lambda v: _integer(v) and v >= 1,
     "an integer >= 1", False),
    (("seed",), _integer, "an integer", True),
    (("guidance_scale",), _real, "a finite number", False),
    (("lcm_temperature", "ddim_eta", "initial_noise_scale", "sample_max_value"), lambda v: _real(v) and v >= 0,
     "a finite number >= 0", False),
    (("guidance_rescale", "dynamic_thresholding_ratio"), lambda v: _real(v) and 0 <= v <= 1, "in [0, 1]", False),
    (("top_p",), lambda v: _real(v) and 0 < v <= 1, "in (0, 1]", False),
    (("clip_noise",), lambda v: _real(v) and v > 0, "a finite number > 0", False),
    (("epsilon_scaling",), lambda v: _real(v) and v > 0, "a finite number > 0", True),
    (("eos_threshold", "stop_on_repetition_cosine_threshold"), lambda v: _real(v) and -1 <= v <= 1,
     "a cosine in [-1, 1]", True),
    (("break_threshold",), lambda v: _real(v) and -1 <= v <= 1, "a cosine in [-1, 1]", False),
    (("beam_scorer",), lambda v: isinstance(v, str) and v in SCORERS or not isinstance(v, str) and callable(v),
     f"one of {sorted(SCORERS)} or a callable", False),
)


@dataclass
class GenerationOptions:
    """Official ``DiffusionLCMGeneratorOptions`` (a superset of ``LCMGeneratorOptions``), same defaults.

    The paper's recommended Two-Tower settings are :meth:`recommended`.
    """

    max_seq_len: int = 200
    """Upper bound on the number of generated sentences (``max_gen_len`` may not exceed it)."""
    min_seq_len: int = 1
    """Default ``min_gen_len``: sentences generated before EOS/repetition may stop a document."""
    eos_threshold: Optional[float] = 0.9
    """Stop when cos(eos_vec, output) >= this (needs an ``eos_vec``)."""
    sample_latent_variable: bool = True
    """Base-LCM: add N(0, lcm_temperature^2) noise in normalized space (the official default)."""
    stop_on_repetition_cosine_threshold: Optional[float] = None
    include_eos_token: bool = False
    trim_hypotheses: bool = False
    """Drop the EOS-like sentence from a document that stopped on EOS/repetition."""
    seed: Optional[int] = None
    """Noise seed (CPU generator, so outputs do not depend on the device). ``None``: torch's global RNG.
    Unlike the official code, ``0`` is a seed like any other."""
    lcm_temperature: float = 1.0
    """Base-LCM latent noise scale; Quant-LCM unit sampling temperature (paper: 1 for -D, 0.005 for -C)."""
    top_k: int = 1
    """Quant-LCM: sample among the top_k units of each codebook (1: greedy, the paper's single-sentence setting)."""
    top_p: float = 1.0
    """Quant-LCM: nucleus sampling mass."""
    guidance_scale: float = 1.0
    """Classifier-free guidance weight w; 1.0 disables CFG."""
    guidance_rescale: float = 0.0
    ddim_eta: float = 0.0
    epsilon_scaling: Optional[float] = None
    initial_noise_scale: float = 1.0
    inference_timesteps: int = 100
    clip_noise: float = 100
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 6.0
    official_timestep_stride: bool = True
    """Reproduce the official integer-stride timestep quirk (T=100, 40 requested steps run 50)."""
    break_threshold: float = 0.9
    """LPCM (with a ``break_vec``): a concept whose cosine to it reaches this is a break, the next one its plan
    (:mod:`lcm_fast.inference.planning`); ``GenerationOutput.roles`` then labels every concept."""
    num_candidates: int = 1
    """Beam search (:mod:`lcm_fast.inference.beam`): concepts sampled per beam at each sentence (K)."""
    beam_size: int = 1
    """Beam search: partial documents kept per document (B). K x B rows per document run through each step;
    K = B = 1 is plain sampling."""
    beam_scorer: str | Scorer = "consistency"
    """Beam search: how candidates are scored (higher is better): ``"consistency"`` (the model's denoising loss of
    the candidate, diffusion LCMs), ``"plan"`` (cosine to the LPCM's latest plan, with a ``break_vec``), or a callable
    ``scorer(Candidates) -> [R]`` (e.g. :class:`~lcm_fast.inference.beam.PlanSimilarity` with plans)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the first option out of its range; NaN and inf never are in range (NaN
        guidance would otherwise generate NaN sentences silently)."""
        for names, check, wanted, optional in _OPTION_RULES:
            for name in names:
                value = getattr(self, name)
                if not (value is None and optional or check(value)):
                    raise ValueError(f"GenerationOptions.{name} must be {wanted}{' or None' if optional else ''}, "
                                     f"got {value!r}")

    @classmethod
    def recommended(cls, **overrides: Any) -> "GenerationOptions":
        """The official README's Two-Tower evaluation settings: 40 steps, w=3, rescale 0.7, noise 0.6 (the README
        sets no epsilon scaling; :meth:`paper` adds the paper's)."""
        base = dict(inference_timesteps=40, guidance_scale=3.0, guidance_rescale=0.7, initial_noise_scale=0.6)
        return cls(**{**base, **overrides})

    @classmethod
    def paper(cls, model: BaseLCM | TwoTowerLCM | OneTowerLCM | QuantLCM, multi_sentence: bool = True,
              **overrides: Any) -> "GenerationOptions":
        """The paper's decoding settings for ``model``'s family (section 2.4.1): diffusion LCMs 40 steps, w = 3,
        rescale 0.7, noise 0.6 and epsilon scaling 1.00045; Quant-LCM-D top-k 1 and w = 2 for one sentence,
        temperature 1, top-k 3 and w = 1 for several; Quant-LCM-C top-k 1 and w = 3, or temperature 0.005, top-k 5
        and w = 1.5; Base-LCM the defaults (it is deterministic)."""
        base: dict[str, Any] = {}
        if isinstance(model, (TwoTowerLCM, OneTowerLCM)):
            base = dict(inference_timesteps=40, guidance_scale=3.0, guidance_rescale=0.7, initial_noise_scale=0.6,
                        epsilon_scaling=1.00045)
        elif isinstance(model, QuantLCM):
            settings = {(True, False): dict(top_k=1, guidance_scale=2.0),
                        (True, True): dict(lcm_temperature=1.0, top_k=3, guidance_scale=1.0),
                        (False, False): dict(top_k=1, guidance_scale=3.0),
                        (False, True): dict(lcm_temperature=0.005, top_k=5, guidance_scale=1.5)}
            base = settings[model.discrete, multi_sentence]
        return cls(**{**base, **overrides})

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any]) -> "GenerationOptions":
        """Strict: an unknown option name is an error."""
        return merge_into(cls(), mapping)


@dataclass
class GenerationOutput:
    """One embedding sequence per input document, in input order; each **includes its prompt**."""

    sequences: list[Tensor]  # each [L_i, sonar_dim], SONAR space
    roles: Optional[list[Tensor]] = None
    """With a ``break_vec`` (LPCM): each sequence's [L_i] int8 roles (sentence 0, break 1, plan 2)."""
    beams: Optional[list[list[Tensor]]] = None
    """Beam search: each document's hypotheses, best first (``sequences[i]`` is ``beams[i][0]``), [L, D] each."""
    beam_scores: Optional[list[Tensor]] = None
    """Beam search: each document's hypotheses' scores [n_i] float64 (mean score of their generated sentences)."""

    def sentences(self, i: int) -> Tensor:
        """Document i's concepts without the LPCM's breaks and plans ([n, sonar_dim]; all of them without roles)."""
        seq = self.sequences[i]
        return seq if self.roles is None else seq[self.roles[i] == SENTENCE]

    @property
    def lengths(self) -> Tensor:  # [B] int64
        return torch.tensor([s.shape[0] for s in self.sequences], dtype=torch.long)

    def padded(self) -> tuple[Tensor, Tensor]:
        """-> (sequences [B, L_max, D] right-padded with zeros, lengths [B])."""
        return torch.nn.utils.rnn.pad_sequence(self.sequences, batch_first=True), self.lengths


def validate_prompts(prompts: Tensor, seq_lens: Optional[Tensor], dim: int) -> Tensor:
    """Checks the batch and returns seq_lens [B] int64 (full length when None)."""
    if not isinstance(prompts, Tensor) or prompts.dim() != 3:
        raise ValueError(f"prompts must be a [batch, sentences, dim] tensor, got {getattr(prompts, 'shape', prompts)}")
    B, P, D = prompts.shape
    if B == 0:
        raise ValueError("empty batch: prompts has 0 documents")
    if P == 0:
        raise ValueError("empty prompts: every document needs at least one sentence embedding")
    if D != dim:
        raise ValueError(f"prompt embedding dim {D} does not match the model's sonar_embed_dim {dim}")
    if seq_lens is None:
        seq_lens = torch.full((B,), P, dtype=torch.long, device=prompts.device)
    else:
        seq_lens = torch.as_tensor(seq_lens, device=prompts.device)
        if seq_lens.shape != (B,) or seq_lens.is_floating_point():
            raise ValueError(f"seq_lens must be an integer tensor of shape [{B}], got a {seq_lens.dtype} tensor of "
                             f"shape {tuple(seq_lens.shape)}")
        seq_lens = seq_lens.long()
        if int(seq_lens.max()) > P:
            i = int(seq_lens.argmax())
            raise ValueError(f"seq_lens[{i}]={int(seq_lens[i])} is longer than the prompt tensor ({P} sentences)")
        if int(seq_lens.min()) < 1:
            i = int(seq_lens.argmin())
            raise ValueError(f"document {i} has an empty prompt (seq_lens[{i}]={int(seq_lens[i])}); give at least one sentence")
    valid = torch.arange(P, device=prompts.device)[None, :] < seq_lens[:, None]
    bad = ~torch.isfinite(prompts).all(dim=-1) & valid
    if bad.any():
        doc, pos = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"prompt contains NaN or inf at document {doc}, sentence {pos}")
    return seq_lens
