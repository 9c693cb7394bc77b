"""Forward passes of every fixture model against the official implementation."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

import lcm_fast
from lcm_fast.models.factory import official_parameter_count

from ..tolerances import PARITY_FORWARD
from .conftest import FIXTURES, loaded_model, model_fixture, model_names, record


def _valid(seq_lens: torch.Tensor, length: int) -> torch.Tensor:  # [B, S] bool
    return torch.arange(length)[None, :] < seq_lens[:, None]


def _check(group: str, where: str, actual: torch.Tensor, expected: torch.Tensor, mask=None) -> None:
    if mask is not None:  # padded positions are whatever the reference computed there
        actual, expected = actual[mask], expected[mask]
    record(group, where, actual, expected)
    torch.testing.assert_close(actual, expected, **PARITY_FORWARD, msg=lambda m: f"{where}: {m}")


@pytest.mark.parametrize("name", model_names())
def test_parameter_count_and_config(name):
    fx = model_fixture(name)
    model = loaded_model(name)
    assert official_parameter_count(model) == fx.spec["num_parameters"]
    assert model.config.model_type == fx.spec["model_type"]
    import dataclasses

    assert dataclasses.asdict(model.config) == fx.spec["config"]


@pytest.mark.parametrize("name", model_names())
def test_loads_from_model_pt_and_directory(name):
    import lcm_fast

    fx = model_fixture(name)
    card = FIXTURES / fx.spec["model_card"]
    ref = loaded_model(name).state_dict()
    for path in (FIXTURES / fx.spec["checkpoint"], card.parent):
        state = lcm_fast.load_official(path).state_dict()
        assert state.keys() == ref.keys()
        assert all(torch.equal(state[k], ref[k]) for k in ref)


@contextmanager
def capture_outputs(model, names):
    """Records the outputs of the named submodules during the block: {name: tensor}."""
    out, handles = {}, []
    for n in names:
        def hook(_m, _i, o, n=n):
            out[n] = o[0] if isinstance(o, tuple) else o
        handles.append(model.get_submodule(n).register_forward_hook(hook))
    try:
        with torch.no_grad():
            yield out
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("backend", ["ref", "ext"])
@pytest.mark.parametrize("name", model_names("two_tower"))
def test_two_tower_forward(name, backend):
    fx, model = model_fixture(name), loaded_model(name)
    fw = fx.spec["forward"]
    lens = fx[fw["seq_lens"]]
    mask = _valid(lens, fx[fw["clean_seqs"]].shape[1])
    noisy = model.noise_scheduler.add_noise(
        fx[fw["clean_seqs"]].flatten(0, 1), fx[fw["noise"]].flatten(0, 1), fx[fw["timesteps"]].flatten()
    ).view_as(fx[fw["clean_seqs"]])
    _check("two_tower/add_noise", f"{name} noisy_seqs", noisy, fx[fw["noisy_seqs"]], mask)
    with capture_outputs(model, fw["intermediates"]) as captured, lcm_fast.set_backend(backend):
        out = model(fx[fw["clean_seqs"]], fx[fw["noisy_seqs"]], fx[fw["timesteps"]], lens)
    _check(f"two_tower/forward/{backend}", f"{name} output", out, fx[fw["output"]], mask)
    for module, ref in fw["intermediates"].items():
        _check(f"two_tower/forward/{backend}", f"{name} {module}", captured[module], fx[ref], mask)


@pytest.mark.parametrize("backend", ["ref", "ext"])
@pytest.mark.parametrize("name", model_names("two_tower"))
def test_two_tower_denoise_inference(name, backend):
    fx, model = model_fixture(name), loaded_model(name)
    di = fx.spec["denoise_inference"]
    with torch.no_grad(), lcm_fast.set_backend(backend):
        out = model.denoiser(
            fx[di["latents"]], fx[di["timesteps"]], fx[di["context"]], fx[di["context_seq_lens"]], inference=True
        )
    _check(f"two_tower/denoise_inference/{backend}", name, out, fx[di["output"]])


@pytest.mark.parametrize("name", model_names("base_lcm"))
def test_base_lcm_forward_and_predict(name):
    fx, model = model_fixture(name), loaded_model(name)
    fw = fx.spec["forward"]
    lens = fx[fw["seq_lens"]]
    mask = _valid(lens, fx[fw["seqs"]].shape[1])
    if model.normalizer is not None:
        _check("base_lcm/forward", f"{name} normalize", model.normalizer.normalize(fx[fw["raw_seqs"]]), fx[fw["seqs"]], mask)
    with capture_outputs(model, fw["intermediates"]) as captured:
        out = model(fx[fw["seqs"]], lens)
        pred = model.predict_next_sentence(fx[fw["raw_seqs"]], lens)
    _check("base_lcm/forward", f"{name} output", out, fx[fw["output"]], mask)
    for module, ref in fw["intermediates"].items():
        _check("base_lcm/forward", f"{name} {module}", captured[module], fx[ref], mask)
    _check("base_lcm/predict_next_sentence", name, pred, fx[fx.spec["predict_next_sentence"]["output"]], mask)
