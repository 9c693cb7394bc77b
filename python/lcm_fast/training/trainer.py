"""A small, resumable trainer for the LCM variants.

AdamW, linear warmup then cosine decay, gradient clipping and accumulation. Checkpoints go to
``<out_dir>/checkpoints/step_<N>/`` (the model in lcm_fast's native format plus ``trainer_state.pt``:
optimizer, schedule, RNG states and data position), written into a temporary directory and renamed into
place, so a kill at any moment leaves only complete checkpoints. ``resume=True`` continues from the latest
one exactly: the same weights at step n as an uninterrupted run. Metrics go to ``<out_dir>/metrics.jsonl``.

Under ``torchrun`` (an initialised process group) the model is wrapped in DistributedDataParallel, or
sharded with FSDP2 (``parallel="fsdp"``: every transformer layer's parameters, gradients and optimizer
state split over the ranks); every rank replays the same batch stream and trains its share of each
step's batches, and rank 0 logs, validates and checkpoints (gathering the shards first). The result
equals a single process training the same global batches, and checkpoints are interchangeable between
the three set-ups. ``precision="bf16"`` (the default on CUDA) runs forward and loss under bf16 autocast;
weights, gradients and optimizer state stay fp32.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..config import config_to_dict
from ..evaluation import prediction_metrics, teacher_forced_predictions
from ..io.native import from_pretrained, save_pretrained
from ..io.official import CheckpointError
from ..models import BaseLCM, OneTowerLCM, QuantLCM, TwoTowerLCM
from ..models.two_tower import DenoiserLayer
from ..nn.transformer import DecoderLayer
from .data import ROLES, Batch, DataConfig, DataError, batches
from .fragility import FragilityMLP
from .losses import LOSSES

PRECISIONS = ("auto", "fp32", "bf16")
PARALLELISMS = ("ddp", "fsdp")
# optimizer state keyed by parameter names, full (unsharded) tensors: the same file for every set-up
_FULL = StateDictOptions(full_state_dict=True)


def _has_roles(files: Sequence[str]) -> bool:
    """Whether every data file has the LPCM's ``roles`` column (read from the schema: no data is loaded)."""
    for file in files:
        try:
            if ROLES not in pq.read_schema(file).names:
                return False
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{file}: not a readable parquet file ({e})") from e
    return True


@dataclass
class TrainConfig:
    """Defaults follow the official pre-training recipes (reference-lcm-spec.md section 7.2)."""

    variant: str = "two_tower"
    """base (Base-LCM, MSE) | two_tower | one_tower (diffusion) | quant_d | quant_c (Quant-LCM) | lpcm (a One-Tower
    on paragraph-structured data: ``lcm-fast prepare --paragraphs``)"""
    steps: int = 1000
    lr: float = 4e-4
    warmup_steps: int = 100
    final_lr_ratio: float = 0.01
    """The cosine decays to lr * final_lr_ratio at the last step."""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-5
    weight_decay: float = 0.1
    max_grad_norm: float = 25.0
    grad_accumulation: int = 1
    cfg_dropout: float = 0.15
    """Diffusion and Quant-LCM variants: rate of positions trained without context (classifier-free guidance)."""
    cfg_dropout_rule: Optional[str] = None
    """paper (each position with probability cfg_dropout) | official (a fixed count, the same positions in every
    document: the released Two-Tower trainer's); None: official for Two-Tower, paper for the others."""
    loss_weighting: str = "none"
    """none | clamp_snr | fragility (paper eqs. 17 and 25)"""
    snr_clamp: tuple[float, float] = (0.0, 5.0)
    """clamp_snr: (lambda_min, lambda_max) of eq. 17; the paper trains (0, 10) and (0.001, 5)."""
    fragility_model: Optional[str] = None
    """Path of a FragilityMLP state dict (``torch.save(mlp.state_dict())``) for fragility weighting."""
    fragility_ab: tuple[float, float] = (-4.0, 3.5)
    structure_loss_weight: float = 1.0
    """LPCM data (a ``roles`` column): the loss on break and plan targets is multiplied by this."""
    ema_decay: Optional[float] = None
    """Keep an exponential moving average of the weights with this decay (e.g. 0.999); every checkpoint
    then also holds it as a native model in ``ema/`` (``lcm_fast.from_pretrained(ckpt / "ema")``)."""
    save_every: int = 100
    """Checkpoint every N steps and after the last; 0: never, not even at the end (throughput runs: nothing is kept)."""
    keep: int = 0
    """Keep only the newest N checkpoints (older ones are deleted once a new one is complete); 0: keep all."""
    log_every: int = 10
    validate_every: int = 0
    """Every N steps, score held-out documents (l2, CA, PAR; needs ``valid`` data); 0: never."""
    valid_bank: Optional[str] = None
    """Sentence bank directory (``lcm-fast prepare``; of other text than the validation data, or it leaks: warned),
    or ``sonar`` (the SONAR decoder, weights from ``$LCM_FAST_SONAR_DIR``): validation then also reports the round-trip l2 ``|encode(decode(x_hat)) - x|``
    (l2_r) with ``valid_encoder``."""
    valid_encoder: str = "minilm"
    precision: str = "auto"
    """auto (bf16 on CUDA, fp32 elsewhere) | fp32 | bf16: bf16 autocast of forward and loss; weights,
    gradients and optimizer state stay fp32."""
    parallel: str = "ddp"
    """Under torchrun: ddp (replicated weights) | fsdp (FSDP2 ``fully_shard`` of every transformer
    layer and the model: parameters, gradients and optimizer state sharded over the ranks)."""
    tensorboard: bool = True
    """Also write the metrics to ``out_dir/tensorboard`` when the tensorboard package is installed."""
    valid_batches: int = 4
    valid_diffusion_steps: int = 10
    """Two-Tower validation samples with this many DDIM steps (and the paper's guidance settings)."""
    seed: int = 2
    """Seeds the batch order, each batch's noise, and (on a fresh start) torch's global RNG, which dropout draws
    from; ``lcm-fast train`` also seeds the initial weights with it. The same run twice gives bit-identical
    checkpoints on the same machine, thread count and world size (GPU kernels may not be deterministic)."""
    out_dir: str = "lcm_run"


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warmup to 1, then cosine to ``final_lr_ratio`` at ``config.steps``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.final_lr_ratio + (1 - config.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    """Trains ``model`` on the batches of ``data`` under ``config``.

    Args:
        model: a BaseLCM or TwoTowerLCM (its normalizer defines the normalized training space).
        config: optimisation and checkpointing options.
        data: the parquet data stream; epochs repeat it with new shuffles.
    """

    def __init__(self, model: BaseLCM | TwoTowerLCM, config: TrainConfig, data: DataConfig,
                 valid: Optional[DataConfig] = None) -> None:
        if config.variant not in LOSSES:
            raise ValueError(f"unknown variant '{config.variant}'; expected one of {sorted(LOSSES)}")
        if config.steps < 1:
            raise ValueError(f"steps must be >= 1 (optimizer steps to train), got {config.steps}")
        if config.save_every < 0:
            raise ValueError(f"save_every must be >= 0 (0: no checkpoints), got {config.save_every}")
        if config.keep < 0:
            raise ValueError(f"keep must be >= 0 (0: every checkpoint), got {config.keep}")
        expected = {"base": BaseLCM, "two_tower": TwoTowerLCM, "one_tower": OneTowerLCM, "quant_d": QuantLCM,
                    "quant_c": QuantLCM, "lpcm": OneTowerLCM}[config.variant]
        if not isinstance(model, expected):
            raise TypeError(f"variant '{config.variant}' trains a {expected.__name__}, got {type(model).__name__}")
        if isinstance(model, QuantLCM):
            target = {"quant_d": "discrete", "quant_c": "continuous"}[config.variant]
            if model.config.target != target:
                raise ValueError(f"variant '{config.variant}' needs a Quant-LCM with target='{target}', "
                                 f"got target='{model.config.target}'")
            model.require_codebooks()
        if config.variant == "lpcm" and not _has_roles(data.files):
            raise ValueError("variant 'lpcm' trains on paragraph-structured data (a 'roles' column of break and plan "
                             f"concepts), which {data.files[0]} lacks: prepare it with lcm-fast prepare --paragraphs")
        if config.validate_every and valid is None:
            raise ValueError("validate_every is set but no validation data was given (valid=DataConfig(...))")
        if config.precision not in PRECISIONS:
            raise ValueError(f"unknown precision '{config.precision}'; expected one of {PRECISIONS}")
        if config.parallel not in PARALLELISMS:
            raise ValueError(f"unknown parallel '{config.parallel}'; expected one of {PARALLELISMS}")
        if config.parallel == "fsdp" and config.ema_decay is not None:
            raise NotImplementedError("ema_decay with parallel='fsdp' is not supported: use parallel='ddp'")
        self.model, self.config, self.data, self.valid = model, config, data, valid
        self.fragility = None
        if config.fragility_model:
            state = torch.load(config.fragility_model, map_location="cpu", weights_only=True)
            self.fragility = FragilityMLP(state["net.0.weight"].shape[1], state["net.0.weight"].shape[0])
            self.fragility.load_state_dict(state)
        self.out = Path(config.out_dir)
        self.device = next(model.parameters()).device
        self.bf16 = config.precision == "bf16" or (config.precision == "auto" and self.device.type == "cuda")
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.sharded = self.world > 1 and config.parallel == "fsdp"
        # data parallel: DDP and FSDP average gradients over ranks; the losses are scaled so that the result
        # is the mean over every target of the global step, whatever the split across ranks
        if self.sharded:
            self._skeleton = copy.deepcopy(model).to("meta")  # the plain module that gathered weights fill
            _fully_shard(model)
            self.forward = model
        else:
            self.forward = DistributedDataParallel(model) if self.world > 1 else model
        # created after sharding: FSDP2 turns the parameters into DTensor shards
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
        )
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, config))
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        if config.ema_decay is not None and not 0.0 < config.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {config.ema_decay}")
        self.ema = ([p.detach().clone() for p in model.parameters()] if config.ema_decay is not None else None)

    # ---- data ---------------------------------------------------------------------------------------

    def _stream(self) -> Iterator[tuple[Batch, torch.Generator]]:
        """(batch, its noise generator) from the current data position on, epoch after epoch. Each
        batch's randomness (timesteps, noise, CFG rows) is seeded by its position in the stream, so it
        does not depend on resumption or on which rank trains it."""
        while True:
            stream = batches(self.data, self.epoch)
            for index, batch in enumerate(stream):
                if index < self.batch_in_epoch:
                    continue  # resuming: replay the deterministic stream up to the saved position
                self.batch_in_epoch = index + 1
                seed = (self.config.seed * 1_000_003**2 + self.epoch * 1_000_003 + index) % 2**63
                yield batch, torch.Generator().manual_seed(seed)
            if self.batch_in_epoch == 0:
                raise ValueError("the training data is empty")
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    # ---- checkpoints --------------------------------------------------------------------------------

    def _state(self, optimizer: dict) -> dict:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "optimizer": optimizer,
            "schedule": self.schedule.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "config": asdict(self.config),
            "ema": self.ema,
        }

    def ema_model(self) -> BaseLCM | TwoTowerLCM:
        """A copy of the model holding the EMA weights (``ema_decay`` must be set)."""
        if self.ema is None:
            raise ValueError("no EMA: set TrainConfig.ema_decay")
        model = copy.deepcopy(self.model)
        with torch.no_grad():
            for p, e in zip(model.parameters(), self.ema):
                p.copy_(e)
        return model

    def _unsharded(self) -> Optional[nn.Module]:
        """The model with its full weights on rank 0, None on the other ranks. Under FSDP every rank must
        call it: the shards are gathered into a plain copy on the CPU."""
        if not self.sharded:
            return self.model if self.rank == 0 else None
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0:
            return None
        model = copy.deepcopy(self._skeleton)
        model.load_state_dict(state, assign=True)
        return model

    def save(self) -> Optional[Path]:
        """Writes checkpoints/step_<step> atomically (temporary directory, then rename) from rank 0 and
        returns its path (None on the other ranks). Under FSDP every rank must call it."""
        if self.rank != 0 and not self.sharded:
            return None
        model = self._unsharded()
        optimizer = get_optimizer_state_dict(self.model, self.optimizer,
                                             options=StateDictOptions(full_state_dict=True, cpu_offload=self.sharded))
        if self.rank != 0:
            return None
        final = self.out / "checkpoints" / f"step_{self.step}"
        tmp = final.with_name(final.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(model, tmp)
        if self.ema is not None:
            save_pretrained(self.ema_model(), tmp / "ema")
        torch.save(self._state(optimizer), tmp / "trainer_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if self.config.keep:  # only after the new one is complete: a kill never leaves fewer than keep
            for old in Trainer.complete_checkpoints(self.out)[: -self.config.keep]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def complete_checkpoints(out_dir: str | Path) -> list[Path]:
        """The complete checkpoints in out_dir, oldest step first (temporary directories are ignored)."""
        root = Path(out_dir) / "checkpoints"
        done = [p for p in root.glob("step_*") if p.name.split("_")[1].isdigit() and (p / "trainer_state.pt").exists()]
        return sorted(done, key=lambda p: int(p.name.split("_")[1]))

    @staticmethod
    def latest_checkpoint(out_dir: str | Path) -> Optional[Path]:
        """The complete checkpoint with the highest step (temporary directories are ignored)."""
        done = Trainer.complete_checkpoints(out_dir)
        return done[-1] if done else None

    def load(self, checkpoint: str | Path) -> None:
        """Restores model weights, optimizer, schedule, RNG states and data position."""
        checkpoint = Path(checkpoint)
        saved = from_pretrained(checkpoint, dtype=next(self.model.parameters()).dtype)
        _check_same_model(checkpoint, saved, self.model)
        weights = saved.state_dict()
        if self.sharded:
            set_model_state_dict(self.model, weights, options=_FULL)
        else:
            self.model.load_state_dict(weights)
        try:
            state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
        except (OSError, RuntimeError, EOFError) as e:  # a truncated file: torch names neither it nor the cause
            raise CheckpointError(f"{checkpoint / 'trainer_state.pt'}: not a readable trainer state ({e}); resume "
                                  "from an earlier checkpoint (delete this one) or train into a new --out") from e
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=_FULL)
        self.schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        if self.ema is not None:
            if state.get("ema") is None:
                raise ValueError(f"{checkpoint} was trained without EMA; resume with ema_decay=None")
            self.ema = [e.to(p.device) for e, p in zip(state["ema"], self.model.parameters())]
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self._truncate_metrics()

    def _truncate_metrics(self) -> None:
        """Drops metric lines written after the checkpoint we resume from (they will be recomputed)."""
        path = self.out / "metrics.jsonl"
        if path.exists():
            keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= self.step]
            path.write_text("".join(line + "\n" for line in keep))

    # ---- validation -----------------------------------------------------------------------------------

    def _round_trip(self):
        """(encoder, decoder) for l2_r, loaded once; warns when a sentence bank holds validation sentences."""
        if not hasattr(self, "_round_trip_parts"):
            # text depends on training.data, not the reverse
            from ..text import RetrievalDecoder, SonarDecoder, load_encoder
            from ..text.evaluate import prepared_documents
            from ..text.retrieval import warn_on_leak

            bank = self.config.valid_bank
            decoder = SonarDecoder(device=self.device) if bank == "sonar" else RetrievalDecoder.load(bank)
            warn_on_leak(decoder, [s for doc, _ in prepared_documents(self.valid.files) for s in doc], "validation")
            self._round_trip_parts = (load_encoder(self.config.valid_encoder), decoder)
        return self._round_trip_parts

    def validate(self) -> dict[str, float]:
        """l2, CA and PAR of teacher-forced predictions on up to ``valid_batches`` held-out batches
        (scored positions: n >= 1, after the prompt), computed on rank 0 ({} on the other ranks; under
        FSDP every rank must call it)."""
        model = self._unsharded()
        if model is None:
            return {}
        model = model.to(self.device)
        totals: dict[str, float] = {}
        count = 0
        for index, batch in enumerate(batches(self.valid, 0)):
            if index == self.config.valid_batches:
                break
            pred = teacher_forced_predictions(model, batch.embeddings, batch.seq_lens,
                                              steps=self.config.valid_diffusion_steps, seed=index).cpu()
            pos = torch.arange(batch.embeddings.shape[1])[None, :]
            valid = pos < batch.seq_lens[:, None]
            mask = valid & (pos >= torch.clamp(batch.prompt_lens[:, None], min=1))
            n = int(mask.sum())
            if n == 0:
                continue
            metrics = prediction_metrics(pred, batch.embeddings, mask, valid)
            if self.config.valid_bank:
                encoder, bank = self._round_trip()
                round_trip = encoder.encode(bank.decode(pred[mask].float()))
                metrics["l2_r"] = (round_trip - batch.embeddings.float()[mask]).norm(dim=-1).mean().item()
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + value * n
            count += n
        return {name: value / count for name, value in totals.items()}

    # ---- the loop -----------------------------------------------------------------------------------

    def train(self, *, resume: bool | str = False, progress: Optional[bool] = None) -> BaseLCM | TwoTowerLCM:
        """Runs until ``config.steps`` optimizer steps; returns the model (in train mode).

        resume: True continues from the latest complete checkpoint in ``out_dir`` when there is one (and says
        which, or that there is none); ``"must"`` requires one. A checkpoint already at ``config.steps`` or
        beyond is an error (nothing would be trained). progress: a bar with loss, learning rate and concepts/s;
        None: on a terminal, else one log line on stderr every ``log_every`` steps; False: silent."""
        cfg = self.config
        if resume not in (False, True, "must"):
            raise ValueError(f"resume must be False, True or 'must', got {resume!r}")
        latest = self.latest_checkpoint(self.out) if resume else None
        if latest is not None:
            self.load(latest)
            if self.step >= cfg.steps:
                raise ValueError(f"{latest} is at step {self.step} and steps={cfg.steps}: nothing to train; raise "
                                 f"steps (--steps) above {self.step} to continue")
            self._say(f"resuming from {latest} (step {self.step} of {cfg.steps})", progress)
        elif resume == "must":
            raise FileNotFoundError(f"no complete checkpoint in {self.out / 'checkpoints'} to resume from")
        elif resume:
            self._say(f"no checkpoint in {self.out / 'checkpoints'}: starting from step 0", progress)
        if self.step == 0:
            torch.manual_seed(cfg.seed)  # dropout: the same run twice gives the same weights
        self.out.mkdir(parents=True, exist_ok=True)
        loss_fn = LOSSES[cfg.variant]
        self.model.train()
        stream = self._stream()
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"train {cfg.variant}", unit="step",
                   disable=self.rank != 0 or (not progress if progress is not None else None))
        log_lines = self.rank == 0 and progress is None and bar.disable  # not a terminal: a line per log record
        board = self._tensorboard()
        with (self.out / "metrics.jsonl").open("a") as metrics:
            while self.step < cfg.steps:
                start = time.perf_counter()
                # every rank reads the same stream; rank r trains batches r, r + W, ... of the step
                step_batches = [next(stream) for _ in range(cfg.grad_accumulation * self.world)]
                mine = step_batches[self.rank :: self.world]
                local = torch.zeros(2, dtype=torch.float64)  # [targets, summed loss]
                for i, (batch, generator) in enumerate(mine):
                    sync = self.world == 1 or i == len(mine) - 1  # gradients are reduced on the last backward only
                    if self.sharded:
                        self.model.set_requires_gradient_sync(sync)
                    with contextlib.nullcontext() if sync or self.sharded else self.forward.no_sync():
                        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                            loss, n = loss_fn(self.model, batch, generator, forward=self.forward,
                                              cfg_dropout=cfg.cfg_dropout, cfg_dropout_rule=cfg.cfg_dropout_rule,
                                              weighting=cfg.loss_weighting, snr_clamp=cfg.snr_clamp,
                                              fragility=self.fragility, fragility_ab=cfg.fragility_ab,
                                              structure_weight=cfg.structure_loss_weight)
                        loss.backward()
                    local += torch.tensor([n, loss.item()], dtype=torch.float64)
                if self.world > 1:
                    dist.all_reduce(local)
                targets, total = local[0].item(), local[1].item() / max(1.0, local[0].item())
                if targets == 0:
                    raise ValueError(f"step {self.step}: no target sentences in its batches (documents of one sentence?)")
                if not math.isfinite(total):
                    raise FloatingPointError(f"non-finite loss at step {self.step} (epoch {self.epoch})")
                # gradients of summed losses (averaged over ranks by DDP) -> mean over the step's targets
                for p in self.model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(self.world / targets)
                concepts = sum(b.num_concepts for b, _ in step_batches)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                # on every rank: under FSDP the norm is a DTensor and reading it is a collective
                grad_norm = float(grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm)
                self.optimizer.step()
                if self.ema is not None:
                    with torch.no_grad():
                        torch._foreach_lerp_(self.ema, [p.detach() for p in self.model.parameters()],
                                             1.0 - cfg.ema_decay)
                self.optimizer.zero_grad(set_to_none=True)
                self.schedule.step()
                self.step += 1
                rate = concepts / (time.perf_counter() - start)
                bar.update(1)
                # rank 0 logs, validates and checkpoints for everyone (the others take part in gathering
                # FSDP shards)
                lr = self.schedule.get_last_lr()[0]
                if self.rank == 0:
                    bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}", concepts_per_s=f"{rate:.0f}", refresh=False)
                if self.rank == 0 and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    record = dict(step=self.step, loss=total, lr=lr, grad_norm=grad_norm, concepts_per_s=rate)
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    self._board(board, "train", record)
                    if log_lines:
                        print(f"train {cfg.variant} step {self.step}/{cfg.steps}: loss {total:.4f}, lr {lr:.2e}, "
                              f"{rate:.0f} concepts/s", file=sys.stderr, flush=True)
                if cfg.validate_every and self.step % cfg.validate_every == 0:
                    scores = self.validate()
                    if self.rank == 0:
                        metrics.write(json.dumps(dict(step=self.step, split="valid", **scores)) + "\n")
                        metrics.flush()
                        self._board(board, "valid", scores)
                if cfg.save_every and (self.step % cfg.save_every == 0 or self.step == cfg.steps):
                    self.save()
        bar.close()
        if board is not None:
            board.close()
        return self.model

    def _say(self, message: str, progress: Optional[bool]) -> None:
        """A status line on stderr (rank 0, unless progress is False)."""
        if self.rank == 0 and progress is not False:
            print(message, file=sys.stderr, flush=True)

    def _tensorboard(self):
        if not self.config.tensorboard or self.rank != 0:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard not installed: metrics.jsonl only
            return None
        return SummaryWriter(str(self.out / "tensorboard"), purge_step=self.step + 1 if self.step else None)

    def _board(self, board, split: str, values: dict) -> None:
        if board is not None:
            for name, value in values.items():
                if name != "step":
                    board.add_scalar(f"{split}/{name}", value, self.step)


def _check_same_model(checkpoint: Path, saved: nn.Module, model: nn.Module) -> None:
    """A checkpoint resumes only into the model it was trained as: else a CheckpointError listing the differences
    (not torch's size mismatches)."""
    if type(saved) is not type(model):
        raise CheckpointError(f"{checkpoint} holds a {type(saved).__name__}, this run trains a {type(model).__name__}: "
                              "resume with the checkpoint's variant, or train into a new --out")
    ours, theirs = config_to_dict(model.config), config_to_dict(saved.config)
    changed = [f"{key}: {theirs[key]!r} -> {ours[key]!r}" for key in ours if ours[key] != theirs.get(key)]
    if changed:
        raise CheckpointError(f"{checkpoint} was trained with another model config ({'; '.join(changed)}): resume "
                              "with the checkpoint's --arch/--config, or train into a new --out")


def _fully_shard(model: nn.Module) -> None:
    """FSDP2: every transformer layer is its own unit (its weights are gathered just for its forward and
    backward), the rest of the model (frontends, projections, embeddings) one root unit."""
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if isinstance(module, (DecoderLayer, DenoiserLayer)):
            fully_shard(module)
    fully_shard(model)
