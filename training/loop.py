"""The training loop shared by pretrain_llama.py, sft.py and dpo.py.

One process per rank (torchrun, accelerate launch, deepspeed, or plain python for one process). The loop: build the
ParallelState, model, engine and data; resume from the latest complete checkpoint in checkpoint.dir (unless told not
to); then step: grad_accum micro-batches of forward/backward, then one check of their losses and token ids (a
non-finite step is skipped on every rank, bad ids stop every rank), clip and optimizer step in the engine; metrics,
eval, samples and checkpoints at their intervals (none with checkpoint.save=false); SIGTERM/SIGINT saves a
checkpoint and exits.
"""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from configs.architecture import resolve_model_config
from configs.schema import TrainConfig
from configs.sections import resolve_path
from dataset.tokenizer import Tokenizer
from modeling.compile import CompileWatch, compile_layers
from modeling.generation import generate
from modeling.llama import CausalLMOutput, LlamaForCausalLM
from modeling.native_format import save_native
from parallel.cross_entropy import IGNORE_INDEX
from parallel.deepspeed_engine import offloads_optimizer
from parallel.engine import Engine, build_engine
from parallel.state import ParallelState
from parallel.token_ids import DeferredTokenIdChecks
from training import checkpoint as ckpt_io
from training.data import TrainData, build_eval_batches, build_train_loader, token_byte_lengths
from training.distributed import adopt_accelerate_deepspeed_config, any_rank, auto_dtype, init_distributed, step_values
from training.metrics import MetricsLogger, StepTimer, data_skipped, flops_per_token, memory_bytes, mfu, peak_flops
from training.moe_metrics import MoEStepStats
from training.optim import build_optimizer, schedule_state
from training.pipeline_run import TrainingPipeline


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite losses, a dead rank); the message says why and what to do."""


class Trainer:
    """Builds everything from a TrainConfig and runs the loop; sft.py and dpo.py subclass its hooks."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = True) -> None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        adopt_accelerate_deepspeed_config(cfg)
        cfg.validate(world_size=world)
        self.cfg = cfg
        self.device = init_distributed(cfg)
        self.state = ParallelState.build(**cfg.parallel.layout())
        self.is_main = self.state.rank == 0
        self.out = Path(cfg.checkpoint.dir)
        self.dtype = self._dtype()
        self.grad_accum = cfg.grad_accum_steps(world)
        self.tokenizer = None if cfg.data.synthetic else Tokenizer(cfg.data.tokenizer)
        self.resume = resume  # False under --no-resume
        self.resume_from = ckpt_io.latest_checkpoint(self.out) if resume and cfg.checkpoint.resume else None
        resumed_vocab = None if self.resume_from is None else ckpt_io.saved_vocab_size(self.resume_from)
        self.model_cfg = resolve_model_config(
            cfg, self.tokenizer, grad_accum=self.grad_accum, resumed_vocab=resumed_vocab
        )
        self.pipeline = None
        if cfg.parallel.pp > 1:
            self.pipeline = TrainingPipeline(self.model_cfg, cfg.parallel, self.state, self.grad_accum, say=self._say)
        if not resume and cfg.checkpoint.save and ckpt_io.complete_checkpoints(self.out):
            self._say(f"--no-resume: starting fresh; existing checkpoints in {self.out} will be replaced")

        torch.manual_seed(cfg.train.seed)  # the same on every rank: TP shards are cut from one full init
        self.model = self.build_model()
        self.moe_stats = MoEStepStats(self.model, self.state)  # nothing to count in a dense model
        ds_config = cfg.deepspeed_json()
        offload = cfg.parallel.deepspeed_config if offloads_optimizer(ds_config) else None  # DeepSpeed's CPU Adam
        optimizer, scheduler = build_optimizer(self.model, cfg.optim, cfg.train.max_steps, offload=offload)
        self.engine: Engine = build_engine(
            self.model,
            optimizer,
            scheduler,
            state=self.state,
            grad_accum=self.grad_accum,
            grad_clip=cfg.optim.grad_clip,
            ds_config=ds_config,
            micro_batch_size=cfg.train.micro_batch_size,
            bf16=self.dtype == torch.bfloat16,
        )
        self.forward_model: nn.Module = self.model  # eval and samples (the whole pipeline under pp)
        if self.pipeline is not None:
            self.forward_model = self.pipeline.attach(
                self.model,
                on_forward=self.moe_stats.add_stage,
                autocast_dtype=self.dtype if self._autocast() else None,
                micro_batch_size=cfg.train.micro_batch_size,
                seq_len=cfg.data.seq_len,
                device=self.device,
            )
        self.loader = self.build_data()
        self._batches = None
        self.timer = StepTimer()  # step time and the part of it spent waiting for data
        self.step, self.tokens_seen, self.nonfinite_total = 0, 0, 0
        if self.resume_from is not None:
            self._restore(self.resume_from)
        self.stop_signal: int | None = None

    # ---- hooks (sft.py and dpo.py override these; micro_batch_loss and evaluate too) ----

    def weights_source(self) -> Path | None:
        """Where the weights come from: the checkpoint we resume, else model.init_from (None: a fresh init)."""
        if self.resume_from is not None:
            return self.resume_from
        return resolve_path(self.cfg.model.init_from) if self.cfg.model.init_from else None

    def build_model(self) -> LlamaForCausalLM:
        """The model on this rank's device, its weights loaded from weights_source()."""
        # fp32 master weights: the torch engine autocasts to bf16, DeepSpeed keeps its own bf16 copy
        part = None if self.pipeline is None else self.pipeline.part()
        model = LlamaForCausalLM(self.model_cfg, self.state, device=self.device, dtype=torch.float32, part=part)
        model.activation_checkpointing = self.cfg.train.activation_checkpointing
        if self.cfg.train.compile:
            compile_layers(model)  # regional: one compiled graph for every decoder layer (modeling.compile)
        model.attention_backend = self.cfg.train.attention
        source = self.weights_source()
        if source is not None:
            ckpt_io.load_model_weights(model, Path(source), self.state)
        return model

    def build_data(self) -> TrainData:
        """This rank's infinite, resumable training loader."""
        return build_train_loader(
            self.cfg,
            self.tokenizer,
            vocab_size=self.model_cfg.vocab_size,
            dp_rank=self.state.dp_rank,
            dp_size=self.state.dp_size,
            device=self.device,
        )

    def eval_batches(self) -> Any:
        """The held-out batches of one evaluation (the same at every eval)."""
        return build_eval_batches(self.cfg, self.tokenizer, dp_rank=self.state.dp_rank, dp_size=self.state.dp_size)

    def write_weights(self, directory: Path) -> None:
        """Write what a checkpoint holds of the model (this rank's share; the native format)."""
        with self.engine.full_parameters():
            save_native(self.model, directory)

    # ---- setup helpers ----

    def _say(self, text: str) -> None:
        """Print on the main rank (other ranks stay quiet)."""
        if self.is_main:
            print(text, flush=True)

    def _dtype(self) -> torch.dtype:
        d = self.cfg.train.dtype
        return auto_dtype(self.device) if d == "auto" else (torch.bfloat16 if d == "bf16" else torch.float32)

    def _layout(self) -> dict[str, Any]:
        """The layout and batch split this run trains at (recorded in checkpoints; any of it may change on resume)."""
        t = self.cfg.train
        return {
            **ckpt_io.layout(self.state),
            "zero_stage": self.engine.zero_stage,
            "micro_batch_size": t.micro_batch_size,
            "grad_accum": self.grad_accum,
            "global_batch_size": t.global_batch_size,
        }

    def _restore(self, path: Path) -> None:
        """Continue from a checkpoint written at any layout (training.checkpoint.resume says what changed)."""
        meta = ckpt_io.resume(
            path,
            self.cfg.to_dict(),
            self._layout(),
            engine=self.engine,
            loader=self.loader,
            state=self.state,
            say=self._say,
        )
        self.step, self.tokens_seen = meta["step"], meta["tokens_seen"]
        self.nonfinite_total = meta.get("nonfinite_steps", 0)

    # ---- the loop ----

    def save(self) -> Path:
        """A checkpoint of the current step (collective)."""
        return ckpt_io.save_checkpoint(
            self.out,
            self.step,
            write_weights=self.write_weights,
            engine=self.engine,
            state=self.state,
            trainer_state={
                "tokens_seen": self.tokens_seen,
                "nonfinite_steps": self.nonfinite_total,
                "pipeline": None if self.pipeline is None else self.pipeline.record(),
                "schedule": schedule_state(self.engine.scheduler),
                "layout": self._layout(),
            },
            data_state=self.loader.state_dict(),
            config_dict=self.cfg.to_dict(),
            keep_last=self.cfg.checkpoint.keep_last,
            tokenizer_dir=None if self.tokenizer is None else self.cfg.data.tokenizer,
        )

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        # asynchronous from the loader's pinned memory on CUDA (dataset/loader.py pins when the trainer asks)
        return t.to(self.device, non_blocking=True)

    def _forward(self, batch: dict[str, torch.Tensor], **extra: Any) -> CausalLMOutput:
        kwargs = {"targets": self._to_device(batch["targets"]), **extra}
        if "document_ids" in batch and self.cfg.data.document_attention:
            kwargs["document_ids"] = self._to_device(batch["document_ids"])
        forward = self.engine.forward if self.pipeline is None else self.forward_model  # pp: eval only
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self._autocast()):
            return forward(self._to_device(batch["input_ids"]), **kwargs)

    def _autocast(self) -> bool:
        # the torch engine keeps fp32 weights and autocasts; DeepSpeed casts the module to bf16 itself
        return self.dtype == torch.bfloat16 and self.engine.zero_stage == 0

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches; returns the step's metrics.

        The objective is micro_batch_loss's: the model's loss (cross-entropy + MoE aux losses); `loss` reports the
        cross-entropy alone, so that dense and MoE runs compare (dpo.py: the preference loss, its `rewards/...` and
        `logps/...`); MoE's terms are in `moe_stats`, which `run` reads on logged steps only. The host waits for the
        device where a decision needs a value: the non-finite and token-id checks, the gradient norm, ep's splits.
        """
        if self._batches is None:
            self._batches = self.timer.batches(iter(self.loader))  # after any load_state_dict
        self.moe_stats.reset()  # this step's forwards only
        with DeferredTokenIdChecks() as ids:  # read in step_values, before the optimizer step
            if self.pipeline is None:
                accumulated = self._accumulate()
            else:
                batches = [next(self._batches) for _ in range(self.grad_accum)]
                accumulated = self.pipeline.accumulate(batches, self._to_device, self.cfg.data.document_attention)
        nonfinite, loss, tokens, metrics = step_values(*accumulated, self.state, ids)
        if nonfinite:
            if self.engine.zero_stage:
                raise TrainingError(
                    f"non-finite loss at step {self.step + 1}; under ZeRO the accumulated gradients cannot be "
                    f"discarded, so the run stops here: lower optim.lr or raise optim.warmup_steps and rerun; "
                    f"{ckpt_io.resume_hint(self.cfg.checkpoint, self.resume)}"
                )
            self.engine.skip_step()
            self.moe_stats.reset()  # its row, if logged, is empty
            return {"loss": float("nan"), "grad_norm": float("nan"), "nonfinite": True, "tokens": tokens}
        grad_norm = self.engine.step()
        if self.model_cfg.router_expert_bias:
            self.model.update_expert_bias()  # with the loads of this step's forwards, summed over all replicas
        if not math.isfinite(grad_norm) and self.engine.zero_stage == 3:
            raise TrainingError(
                f"non-finite gradient norm at step {self.step + 1} under ZeRO-3, which cannot skip the update in "
                f"fp32/bf16: lower optim.lr and rerun; {ckpt_io.resume_hint(self.cfg.checkpoint, self.resume)}"
            )
        return {
            "loss": loss,
            "grad_norm": grad_norm,
            "nonfinite": not math.isfinite(grad_norm),  # the engine skipped the update
            "tokens": tokens,
            **metrics,
        }

    def micro_batch_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(objective to backpropagate, loss to report, {name: scalar device tensor} to log) of one micro-batch.

        Here the model's loss (cross-entropy + the MoE aux losses) and its cross-entropy; dpo.py overrides it.
        A pipeline (parallel.pp > 1) computes the cross-entropy in its last stage and does not call it.
        """
        out = self._forward(batch)
        self.moe_stats.add(out.aux_loss)
        return out.loss, out.ce_loss, {}

    def _accumulate(self) -> tuple[torch.Tensor, torch.Tensor, int, dict[str, torch.Tensor]]:
        """Forward and backward of the step's micro-batches: (reported loss, any loss non-finite, tokens, metrics).

        The reported loss and micro_batch_loss's metrics are means over the micro-batches.
        Nothing here waits for the device: a non-finite loss is only flagged (on the device), and its backward
        runs like the others; train_step then discards the step's gradients, the bad ones with them.
        """
        reported, objective, metrics, tokens = [], [], [], 0
        for _ in range(self.grad_accum):
            batch = next(self._batches)
            with self.engine.micro_batch():  # forward and backward: DDP reduces in the last micro-batch only
                loss, report, values = self.micro_batch_loss(batch)
                self.engine.backward(loss)
            tokens += batch["input_ids"].numel()
            objective.append(loss.detach())
            reported.append(report.detach())
            metrics.append(values)
        nonfinite = ~torch.isfinite(torch.stack(objective)).all()
        means = {k: torch.stack([m[k] for m in metrics]).mean() for k in metrics[0]}
        return torch.stack(reported).mean(), nonfinite, tokens, means

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss, perplexity and bits per byte over the first eval_batches batches of data.valid."""
        self.model.eval()
        byte_len = token_byte_lengths(self.tokenizer, self.model_cfg.vocab_size).to(self.device)
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # nats, tokens, bytes
        for batch in self.eval_batches():
            loss = self._forward(batch).ce_loss.double()
            targets = batch["targets"].to(self.device)
            valid = targets != IGNORE_INDEX
            n = valid.sum()
            totals += torch.stack([loss * n, n.double(), byte_len[targets[valid]].sum()])
        if self.state.dp_size > 1:
            dist.all_reduce(totals, group=self.state.dp_group)
        self.model.train()
        nats, n, nbytes = totals.tolist()
        if n == 0:
            raise TrainingError(f"data.valid={self.cfg.data.valid}: no eval batches (too little held-out text?)")
        loss = nats / n
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50)), "eval_bpb": nats / math.log(2) / max(nbytes, 1)}

    @torch.no_grad()
    def sample(self) -> list[str]:
        """Greedy continuations of the configured prompts (all tensor ranks take part; rank 0 decodes)."""
        if self.tokenizer is None:
            return []
        prompts = [self.tokenizer.encode(p, bos=True) for p in self.cfg.train.sample_prompts]
        with self.engine.full_parameters():
            ids = generate(
                self.forward_model,
                prompts,
                max_new_tokens=self.cfg.train.sample_tokens,
                eos_token_id=self.tokenizer.eos_id if self.tokenizer.eos_id >= 0 else None,
            )
        self.model.train()
        return [p + self.tokenizer.decode(out) for p, out in zip(self.cfg.train.sample_prompts, ids, strict=True)]

    def _install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):  # the loop saves and stops after the step
            signal.signal(sig, lambda signum, frame: setattr(self, "stop_signal", signum))

    def run(self) -> None:
        """Train to max_steps (or until a signal), checkpointing, evaluating and sampling on the way."""
        cfg, t = self.cfg, self.cfg.train
        self._install_signal_handlers()
        logger = MetricsLogger(self.out, cfg.logging, cfg.to_dict(), enabled=self.is_main, resume_step=self.step)
        flops_token = flops_per_token(self.model_cfg, cfg.data.seq_len)
        peak = peak_flops(self.device, self.dtype)
        bar = None
        if self.is_main and cfg.logging.progress_bar:
            from tqdm import tqdm

            bar = tqdm(total=t.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        if self.is_main:
            n = self.model_cfg.num_params()
            print(
                f"model {n / 1e6:.1f}M parameters | {self.state.describe()} | engine zero_stage="
                f"{self.engine.zero_stage} | grad_accum {self.grad_accum} | dtype {self.dtype} | device {self.device}",
                flush=True,
            )
        say = bar.write if bar is not None else (lambda s: print(s, flush=True))
        compiles = CompileWatch(enabled=t.compile, say=say if self.is_main else lambda s: None)
        in_a_row, window_t0, window_tokens = 0, time.perf_counter(), 0
        self.model.train()
        while self.step < t.max_steps:
            self.timer.start()
            lr = self.engine.lr
            m = self.train_step()
            self.step += 1
            step_time = self.timer.stop()
            self.tokens_seen += m["tokens"]
            window_tokens += m["tokens"]
            if m["nonfinite"]:
                in_a_row += 1
                self.nonfinite_total += 1
            else:
                in_a_row = 0
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{lr:.2e}")
            last = self.step == t.max_steps
            if self.step % cfg.logging.log_every == 0 or last or self.step == 1 or m["nonfinite"]:
                elapsed = time.perf_counter() - window_t0
                tok_s = window_tokens / max(elapsed, 1e-9)
                row = {
                    "step": self.step,
                    "loss": m["loss"],
                    "lr": lr,
                    "grad_norm": m["grad_norm"],
                    "tokens_per_s": tok_s,
                    "tokens_seen": self.tokens_seen,
                    "mfu": mfu(tok_s, flops_token, peak, self.state.dims.world_size),
                    "memory_gb": memory_bytes(self.device) / 2**30,
                    "step_time_s": step_time,
                    "data_wait_frac": self.timer.data_wait_frac(),  # over the steps since the last row
                    "nonfinite_steps": self.nonfinite_total,
                    "data_skipped": data_skipped(self.loader),
                    **{k: v for k, v in m.items() if "/" in k},  # the objective's (dpo.py: rewards/...)
                    **self.moe_stats.row(),  # moe/... (collective, on every rank: the same steps log)
                    **compiles.row(self.step),  # compile/graphs, compile/recompiles (train.compile)
                }
                logger.log(row)
                window_t0, window_tokens = time.perf_counter(), 0
            if in_a_row >= t.max_nonfinite_steps:
                raise TrainingError(
                    f"{in_a_row} non-finite losses or gradients in a row (train.max_nonfinite_steps="
                    f"{t.max_nonfinite_steps}) at step {self.step}: lower optim.lr or check the data; "
                    f"{ckpt_io.resume_hint(cfg.checkpoint, self.resume)}"
                )
            if cfg.data.valid and ((t.eval_every and self.step % t.eval_every == 0) or last):
                with compiles.outside():
                    ev = self.evaluate()
                logger.log({"step": self.step, **ev})
                logger.plot(self.out / "loss_curve.png")
                if self.is_main:
                    say(f"step {self.step}: eval " + " ".join(f"{k[5:]} {v:.4g}" for k, v in ev.items()))
            if (t.sample_every and self.step % t.sample_every == 0) or last:
                with compiles.outside():
                    texts = self.sample()
                for i, text in enumerate(texts):
                    if self.is_main:
                        say(f"sample {i} @ step {self.step}: {text!r}")
                        logger.log_text(self.step, f"sample_{i}", text)
            signalled = any_rank(self.stop_signal is not None, self.device)  # any rank's: a scheduler may signal one
            stop = signalled or bool(t.exit_interval and self.step % t.exit_interval == 0 and not last)
            due = (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) or last or stop
            if due and cfg.checkpoint.save:
                path = self.save()
                if self.is_main and (stop or last):
                    say(f"checkpoint: {path}")
            if stop:
                if self.is_main:
                    why = "a signal" if signalled else "train.exit_interval"
                    then = (
                        "rerun the same command to resume" if cfg.checkpoint.save else "checkpoint.save=false: unsaved"
                    )
                    print(f"stopped by {why} at step {self.step}; {then}", flush=True)
                break
        if bar is not None:
            bar.close()
        logger.plot(self.out / "loss_curve.png")
        logger.finish()
