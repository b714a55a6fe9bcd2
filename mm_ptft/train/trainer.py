"""The Trainer: build, loop, step, evaluate, save, resume — read it top to bottom.

It trains whatever Task the config names (contrastive pretraining, or a fine-tuning task) under a DeepSpeed engine,
on one process or many. Checks that need no process group (config, shards, output dir, resume checkpoint) run first,
so a bad input fails in one line before any rank starts talking to another.
"""

from __future__ import annotations

import contextlib
import json
import resource
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from mm_ptft import checkpoint as ckpt
from mm_ptft import faults
from mm_ptft.config import Config, ConfigError, config_to_dict, save_config
from mm_ptft.data import DataError, DataPosition, TrainStream, make_loader
from mm_ptft.data.mix import mixture_samples, resolve_sources
from mm_ptft.data.stats import image_norm_stats
from mm_ptft.distributed import (
    all_reduce_max,
    all_reduce_sum,
    average_buffers,
    barrier,
    init_distributed,
    is_main_process,
)
from mm_ptft.eval import plan_evals, run_evaluators
from mm_ptft.finetune import parameter_counts, write_adapters
from mm_ptft.tasks import configure_task, create_task
from mm_ptft.train.accumulate import create_accumulation, negatives_per_loss
from mm_ptft.train.ema import WeightEMA
from mm_ptft.train.logger import MetricsLogger
from mm_ptft.train.optim import create_optimizer, create_scheduler

MIN_SAMPLES_FOR_BAD_CHECK = 512  # don't judge the bad-sample fraction on a handful of samples


def _check_writable(directory: Path) -> None:
    """Create ``directory`` and a file in it now, so an unusable output path fails before any training."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"config: train.output_dir {directory} is not writable ({e.strerror or e})") from None


def bf16_slowdown(size: int = 256, repeats: int = 3) -> float:
    """How many times slower a bf16 matrix product is than an fp32 one on this CPU (~0.4 with AVX-512 BF16 or AMX;
    ~80 on an AVX2-only host, where bf16 has no hardware path). A few milliseconds on a fast host."""
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.ones(size, size, dtype=dtype)
        a @ a  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ a
        times[dtype] = time.perf_counter() - t0
    return times[torch.bfloat16] / max(times[torch.float32], 1e-9)


def _warn_if_slow_bf16() -> None:
    ratio = bf16_slowdown()
    if ratio > 4:
        print(
            f"warning: on this CPU a bf16 matrix product is {ratio:.0f}x slower than fp32 (no AVX-512 BF16 / AMX); "
            "deepspeed.precision=fp32 will train much faster here",
            flush=True,
        )


class Trainer:
    """Trains ``cfg.task`` for ``cfg.train.steps`` optimizer steps; see ``train()``."""

    # ------------------------------------------------------------------------------------------------- build
    def __init__(self, cfg: Config, local_rank: int | None = None):
        self.cfg = cfg
        self.run_dir = Path(cfg.train.output_dir) / (cfg.train.name or "run")
        self.ckpt_dir = self.run_dir / "checkpoints"
        self._preflight()
        self.dist = init_distributed(cfg.deepspeed.backend, local_rank, cfg.deepspeed.timeout_s)
        self.rank, self.world = self.dist.rank, self.dist.world_size
        self.device = self.dist.device
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if is_main_process() and self.device.type == "cpu" and cfg.deepspeed.precision in ("bf16", "amp_bf16"):
            _warn_if_slow_bf16()
        if is_main_process():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        barrier()

        torch.manual_seed(cfg.train.seed)  # identical initialisation on every rank
        self.task = create_task(cfg, self.rank, self.world)
        self.model = self.task.model
        self.params = parameter_counts(self.model)  # before the engine partitions anything (ZeRO-3)
        if cfg.deepspeed.activation_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.tokenize = self._create_tokenize()
        self.mean, self.std = image_norm_stats(cfg)

        self.global_batch = cfg.data.batch_size * cfg.deepspeed.grad_accum_steps * self.world
        self.total_steps = self._total_steps()
        optimizer = create_optimizer(self.model, cfg.optim, prefix="model.")
        self.param_group_names = [g["param_names"] for g in optimizer.param_groups]
        scheduler = create_scheduler(optimizer, cfg.optim, self.total_steps)
        # the average starts from the fp32 weights, before the engine casts the module to its precision
        self.ema = WeightEMA(self.task, cfg.train.ema_decay, cfg.train.ema_warmup) if cfg.train.ema_decay else None
        from mm_ptft.distributed.engine import build_ds_config, create_engine

        self.engine = create_engine(self.task, optimizer, scheduler, build_ds_config(cfg, self.world))
        self.accumulation = create_accumulation(cfg, self.task, self.engine, self._to_device, self.device, self.rank)
        self.negatives = negatives_per_loss(cfg, self.task, self.world, self.accumulation.cached)
        self._say_how_batches_accumulate()

        self.step = 0
        self.params_logged = False  # the parameter counts go into this start's first train record (and the summary)
        self.best: dict | None = None  # {"step", "value"} of eval.select_metric's best evaluation
        self.report_images: dict[str, Path] = {}  # figures evaluators drew (caption → path), shown in the report
        self.evals_since_best = 0
        mixture = [s.name for s in self.sources] if len(self.sources) > 1 else []
        self.position = DataPosition(self.world, max(cfg.data.workers, 1), sources=mixture)
        self.bad = Counter()
        self.samples_read = 0  # raw samples this rank consumed (good + bad)
        # a mixture's raw samples and bad samples per source on this rank (logged summed over ranks)
        self.source_counts = {name: {"samples": 0, "bad": 0} for name in mixture}
        self.logger = MetricsLogger(self.run_dir, cfg.train.tensorboard, enabled=is_main_process())
        if self.resume_dir is not None:
            self._resume(self.resume_dir)
        else:
            torch.manual_seed(cfg.train.seed + 1 + self.rank)  # different dropout / drop-path noise per rank
        self._say_params()

    def _say_how_batches_accumulate(self) -> None:
        k = self.cfg.deepspeed.grad_accum_steps
        if not is_main_process() or k == 1 or self.negatives is None:
            return
        if self.accumulation.cached:
            print(
                f"accumulation: cached over {k} micro-batches: one loss over the global batch of "
                f"{self.global_batch} pairs ({self.negatives} negatives per sample)",
                flush=True,
            )
        else:
            print(
                f"warning: loss.accumulation=plain sums {k} micro-batch losses, each with {self.negatives} negatives "
                f"per sample, not the {self.global_batch - 1} of the global batch; loss.accumulation=cached "
                "gives one loss over all of them",
                flush=True,
            )

    def _say_params(self) -> None:
        if is_main_process():
            p = self.params
            tower = f", {p['params/tower_trainable_share']:.2%} of the tower" if "params/tower" in p else ""
            print(f"parameters: {p['params/trainable']:,} of {p['params/total']:,} train{tower}", flush=True)

    def _preflight(self) -> None:
        """Every check that needs no process group: fail here in one line, before ranks connect."""
        cfg = configure_task(self.cfg)  # the task's sections, checked; the others left out of the saved config
        if cfg.data.train is None:
            raise ConfigError("config: data.train is required (a shard pattern or a data_tools dataset dir)")
        self.sources = resolve_sources(cfg.data)  # one source, or a weighted mixture (data/mix.py)
        self.epoch_samples = cfg.data.num_samples or mixture_samples(self.sources)
        # (metric prefix, plan) of eval.data and of each eval.also dataset: shards, evaluators, class names, templates
        self.eval_plans = plan_evals(cfg) if cfg.eval.data else []
        _check_writable(Path(cfg.train.output_dir))
        self.resume_dir = None
        if cfg.train.resume:
            self.resume_dir = ckpt.resolve_resume(self.ckpt_dir, cfg.train.resume)
            if self.resume_dir is None:
                if cfg.train.resume != "latest":
                    raise ckpt.CheckpointError(f"checkpoint: nothing to resume in {self.ckpt_dir}")
            else:
                ckpt.check_architecture(self.resume_dir, config_to_dict(cfg)["model"])

    def _create_tokenize(self):
        """The picklable caption tokenizer the data workers and evaluators use (None for a task without text)."""
        if not self.task.needs_caption:
            return None
        from mm_ptft.models import Tokenize

        return Tokenize.create(self.cfg.model.text)

    def _total_steps(self) -> int:
        if self.cfg.train.steps is not None:
            return self.cfg.train.steps
        n = self.epoch_samples
        if n is None:
            unknown = [s.name for s in self.sources if s.shards.num_samples is None]
            raise ConfigError(
                "config: set train.steps or data.num_samples (no sample counts for the shards of "
                f"{', '.join(unknown)}: no dataset.json, sizes.json or img2dataset *_stats.json)"
            )
        return max(1, int(self.cfg.train.epochs * n // self.global_batch))

    def _train_loader(self):
        cfg = self.cfg
        stream = TrainStream(
            self.sources,
            cfg.data,
            self.task.decoder(cfg, True, self.mean, self.std),
            self.task.collator(self.tokenize),
            cfg.train.seed,
            self.rank,
            self.position,
        )
        return make_loader(stream, cfg.data.workers, cfg.data.prefetch)

    # -------------------------------------------------------------------------------------------------- loop
    def train(self) -> dict:
        """Run to ``total_steps`` (or ``train.stop_after``); evaluate, checkpoint, consolidate and report."""
        cfg = self.cfg
        batches = iter(self._train_loader())
        progress = self._progress()
        window = {"time": 0.0, "data": 0.0, "steps": 0, "loss": 0.0}
        stopped_early = False
        if cfg.eval.at_start and self.step == 0:
            self.evaluate()  # e.g. a zero-shot head: best-checkpoint selection never ends below the start
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            out, data_time = self.train_step(batches)
            elapsed = time.perf_counter() - t0
            window["time"] += elapsed
            window["data"] += data_time
            window["steps"] += 1
            window["loss"] += out["loss"]
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{out['loss']:.3f}", sps=f"{self.global_batch / elapsed:.0f}")
            if self.step % cfg.train.log_every == 0 or self.step == self.total_steps:
                self._log_train(out, window)
                window = {"time": 0.0, "data": 0.0, "steps": 0, "loss": 0.0}
            if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < self.total_steps:
                self.evaluate()
                if cfg.train.early_stop_patience and self.evals_since_best >= cfg.train.early_stop_patience:
                    if is_main_process():
                        print(
                            f"early stop at step {self.step}: {cfg.eval.select_metric} has not improved for "
                            f"{self.evals_since_best} evaluations (best {self.best})",
                            flush=True,
                        )
                    break
            if cfg.train.save_every and self.step % cfg.train.save_every == 0 and self.step < self.total_steps:
                self.save()
            faults.maybe_fail("step", self.step, self.rank)
            if cfg.train.stop_after is not None and self.step >= cfg.train.stop_after:
                stopped_early = True
                break
        if progress is not None:
            progress.close()
        return self._finish(stopped_early)

    def train_step(self, batches) -> tuple[dict, float]:
        """One optimizer step (``grad_accum_steps`` micro-batches, see train/accumulate.py). Returns (metrics,
        seconds waiting for data)."""
        data_time = 0.0

        def next_batch() -> dict:
            nonlocal data_time
            t = time.perf_counter()
            batch = next(batches)
            data_time += time.perf_counter() - t
            self._account(batch)
            return batch

        metrics = self.accumulation.step(next_batch)
        if self.ema is not None:
            self.ema.update(self.engine.module)
        self.step += 1
        return metrics, data_time

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _account(self, batch: dict) -> None:
        state = batch.pop("_state")
        self.position.update(state)
        self.samples_read += state["samples"]
        self.bad.update(state["bad"])
        for name, counts in self.source_counts.items():
            for k in counts:
                counts[k] += state["sources"][name][k]
        if self.cfg.train.record_keys:
            with (self.run_dir / f"keys_rank{self.rank}.jsonl").open("a") as f:
                f.write(json.dumps({"step": self.step, "keys": batch["key"]}) + "\n")

    def _source_values(self) -> list[float]:
        """This rank's per-source counts, flat in the order the logs read them: samples, bad of each source."""
        return [float(c[k]) for c in self.source_counts.values() for k in ("samples", "bad")]

    def _progress(self):
        if not (self.cfg.train.progress and is_main_process()):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, initial=self.step, desc=self.run_dir.name, unit="step", dynamic_ncols=True)

    def _log_train(self, out: dict, window: dict) -> None:
        # one collective per log step: loss averaged over ranks, bad-sample counts summed over ranks
        stats = all_reduce_sum(
            torch.tensor(
                [window["loss"], float(sum(self.bad.values())), float(self.samples_read), *self._source_values()],
                dtype=torch.float64,
            )
        )
        loss = stats[0].item() / self.world / max(window["steps"], 1)
        bad, read = int(stats[1].item()), int(stats[2].item())
        peak_rss_mb = all_reduce_max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        step_time = window["time"] / max(window["steps"], 1)
        optimizer = self.engine.optimizer
        record = {
            "loss": loss,
            "lr": self.engine.lr_scheduler.get_last_lr()[0] / optimizer.param_groups[0].get("lr_scale", 1.0),
            "samples": self.step * self.global_batch,
            "epoch": self.step * self.global_batch / (self.epoch_samples or 1),
            "samples_per_s": self.global_batch / step_time if step_time > 0 else None,
            "step_time_s": step_time,
            "data_wait_frac": window["data"] / window["time"] if window["time"] > 0 else 0.0,
            "bad_samples": bad,
            "peak_rss_mb": peak_rss_mb,  # the largest rank's peak resident memory
        }
        if self.negatives is not None:
            record["negatives"] = self.negatives  # each sample's negatives in the contrastive loss
        for i, name in enumerate(self.source_counts):  # raw samples read and bad samples per source, all ranks
            record[f"data/{name}/samples"] = int(stats[3 + 2 * i].item())
            record[f"data/{name}/bad"] = int(stats[4 + 2 * i].item())
        for group in optimizer.param_groups:
            if "name" in group:
                record[f"lr/{group['name']}"] = group["lr"]
        for k, v in out.items():
            if k != "loss":
                record[k] = v
        if not self.params_logged:
            record.update(self.params)
            self.params_logged = True
        self.logger.log("train", self.step, record)
        if bad and read >= MIN_SAMPLES_FOR_BAD_CHECK and bad / read > self.cfg.data.max_bad_fraction:
            raise DataError(
                f"data: {bad} of {read} samples were bad ({dict(self.bad)} on rank {self.rank}), above "
                f"data.max_bad_fraction={self.cfg.data.max_bad_fraction}; check the shards with "
                + " and ".join(f"`python -m data_tools verify {s.shards.spec}`" for s in self.sources)
            )

    # -------------------------------------------------------------------------------------------- evaluate
    def _average_buffers(self) -> None:
        """Float buffers (BatchNorm statistics) averaged over ranks, the engine's and the weight EMA's."""
        average_buffers(self.engine.module)
        if self.ema is not None:
            self.ema.average_buffers()

    def evaluate(self) -> dict:
        """Run ``eval.evaluators`` on the held-out shards, on every rank (ZeRO-3 needs all ranks), log on rank 0.
        With ``train.ema_decay`` the moving average is what is evaluated (and what best-selection keeps)."""
        if not self.eval_plans:
            return {}
        self._average_buffers()  # every rank evaluates (and later saves) the same BatchNorm statistics
        module = self.engine.module
        was_training = module.training
        module.eval()
        t0 = time.perf_counter()
        metrics = {}
        for prefix, plan in self.eval_plans:
            ctx = plan.context(
                self.task,
                rank=self.rank,
                world_size=self.world,
                device=self.device,
                tokenize=self.tokenize,
                out_dir=self.run_dir,
            )
            with self.ema.applied_to(module) if self.ema is not None else contextlib.nullcontext():
                metrics.update({prefix + k: v for k, v in run_evaluators(self.cfg.eval.evaluators, ctx).items()})
            self.report_images.update({prefix + k: v for k, v in ctx.images.items()})
        metrics["eval_time_s"] = time.perf_counter() - t0
        module.train(was_training)
        self.logger.log("eval", self.step, metrics)
        self._track_best(metrics)
        if is_main_process():
            headline = ("acc1", "recall@1", "/map", "/map_50")
            shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.endswith(headline))
            print(f"[eval step {self.step}] {shown}", flush=True)
        return metrics

    def _track_best(self, metrics: dict) -> None:
        """Keep the checkpoint of the best ``eval.select_metric`` as tag ``best`` (never moves ``latest``)."""
        name = self.cfg.eval.select_metric
        if name is None:
            return
        if name not in metrics:
            raise ConfigError(f"config: eval.select_metric '{name}' is not logged; logged: {', '.join(metrics)}")
        value = float(metrics[name])
        sign = 1.0 if self.cfg.eval.select_mode == "max" else -1.0
        if self.best is None or sign * (value - self.best["value"]) > 0:
            self.best = {"step": self.step, "value": value}
            self.evals_since_best = 0
            self.save(ckpt.BEST, move_latest=False)
        else:
            self.evals_since_best += 1

    # ------------------------------------------------------------------------------------------ save/resume
    def save(self, tag: str | None = None, move_latest: bool = True) -> Path:
        """Checkpoint model, optimizer, scheduler, data position and RNG; published atomically (see checkpoint)."""
        tag = tag or ckpt.tag_for(self.step)
        self._average_buffers()  # rank 0's buffers are what the checkpoint keeps: make them everyone's
        partial = self.ckpt_dir / f"{ckpt.PARTIAL_PREFIX}{tag}"
        if self.dist.local_rank == 0:
            ckpt.clean_partials(self.ckpt_dir)
        barrier()
        try:
            self._write_checkpoint(partial, tag)
        except OSError as e:
            previous = ckpt.resolve_resume(self.ckpt_dir, "latest")
            raise ckpt.CheckpointError(
                f"checkpoint: saving {tag} failed on rank {self.rank} ({e.strerror or e}); "
                f"the previous checkpoint {previous.name if previous else '(none)'} is intact"
            ) from None
        barrier()  # every rank's files are on disk before the checkpoint becomes visible
        faults.maybe_fail("before_publish", self.step, self.rank)
        if self.dist.local_rank == 0:
            ckpt.publish(self.ckpt_dir, tag, self.cfg.train.keep_last, move_latest, primary=is_main_process())
        barrier()
        return self.ckpt_dir / tag

    def _write_checkpoint(self, partial: Path, tag: str) -> None:
        from mm_ptft.distributed.engine import save_engine_checkpoint

        save_engine_checkpoint(self.engine, self.ckpt_dir, partial.name, {"mm_ptft_step": self.step})
        faults.maybe_fail("mid_save", self.step, self.rank)
        ckpt.save_trainer_state(
            partial,
            self.rank,
            {
                "step": self.step,
                "data": self.position.state_dict(),
                "samples_read": self.samples_read,
                "bad": dict(self.bad),
                "source_counts": self.source_counts,
                "rng": torch.get_rng_state(),
            },
        )
        if is_main_process():
            if self.ema is not None:
                ckpt.save_weights(self.ema.state_dict(), partial / ckpt.EMA, {"updates": str(self.ema.updates)})
            save_config(self.cfg, partial / "config.yaml")
            meta = {
                "step": self.step,
                "tag": tag,
                "zero_stage": self.cfg.deepspeed.zero_stage,
                "precision": self.cfg.deepspeed.precision,
                "world_size": self.world,
                "task": self.cfg.task,
                "model_prefix": "model.",
                "param_group_names": self.param_group_names,
                "best": self.best,
                "evals_since_best": self.evals_since_best,
            }
            ckpt.atomic_write_text(partial / ckpt.META, json.dumps(meta, indent=1))

    def _resume(self, tag_dir: Path) -> None:
        from mm_ptft.distributed.engine import load_engine_checkpoint

        meta = ckpt.read_meta(tag_dir)
        if meta.get("world_size") != self.world:
            raise ckpt.CheckpointError(
                f"checkpoint: {tag_dir} was written by {meta.get('world_size')} ranks, this run has {self.world}; "
                "resume with the same number of ranks (or consolidate it and fine-tune from the weights)"
            )
        load_engine_checkpoint(self.engine, tag_dir.parent, tag_dir.name)
        state = ckpt.load_trainer_state(tag_dir, self.rank)
        self.step = int(state["step"])
        self.position = DataPosition.from_state_dict(
            state["data"], self.world, max(self.cfg.data.workers, 1), self.position.sources
        )
        self.samples_read = int(state["samples_read"])
        self.bad = Counter(state["bad"])
        self.source_counts = {k: dict(v) for k, v in state.get("source_counts", self.source_counts).items()}
        self.best, self.evals_since_best = meta.get("best"), int(meta.get("evals_since_best", 0))
        torch.set_rng_state(state["rng"])
        if self.ema is not None:
            self._resume_ema(tag_dir)
        if is_main_process():
            print(f"resumed from {tag_dir} at step {self.step}", flush=True)

    def _resume_ema(self, tag_dir: Path) -> None:
        path = tag_dir / ckpt.EMA
        if not path.is_file():  # EMA switched on for the rest of a run: it starts from the resumed weights
            self.ema.reset_to(self.engine.module)
            if is_main_process():
                print(f"{tag_dir} has no {ckpt.EMA}: the weight average starts from the resumed weights", flush=True)
            return
        state, meta = ckpt.load_weights_with_metadata(path)
        try:
            self.ema.load_state_dict(state, int(meta.get("updates", self.step)))
        except KeyError as e:
            raise ckpt.CheckpointError(f"checkpoint: {path} does not fit this model ({e.args[0]})") from None

    # ------------------------------------------------------------------------------------------------ finish
    def _finish(self, stopped_early: bool) -> dict:
        if stopped_early:
            self.logger.close()
            return {"step": self.step, "stopped_early": True}
        metrics = self.evaluate()
        tag_dir = self.save()
        if self.cfg.train.consolidate and is_main_process():
            state = ckpt.consolidate(tag_dir)
            ckpt.save_weights(state, self.run_dir / "model.safetensors", {"step": str(self.step)})
            if self.best is not None:
                best = ckpt.consolidate(self.ckpt_dir / ckpt.BEST)
                ckpt.save_weights(best, self.run_dir / "best.safetensors", {"step": str(self.best["step"])})
            # peft adapters (finetune.policy lora / ia3) also unmerged, in peft's format: <run>/adapter[-best]
            write_adapters(self.cfg, self.run_dir, tag_dir, self.ckpt_dir / ckpt.BEST if self.best else None)
        totals = all_reduce_sum(
            torch.tensor([float(sum(self.bad.values())), *self._source_values()], dtype=torch.float64)
        )
        summary = {"step": self.step, "samples": self.step * self.global_batch, "bad_samples": int(totals[0].item())}
        for i, name in enumerate(self.source_counts):  # a mixture: raw samples and bad samples per source, all ranks
            summary[f"data/{name}/samples"] = int(totals[1 + 2 * i].item())
            summary[f"data/{name}/bad"] = int(totals[2 + 2 * i].item())
        if self.negatives is not None:
            summary["negatives_per_loss"] = self.negatives
        summary.update(self.params)
        summary.update(metrics)
        if self.best is not None:
            summary.update({"best_step": self.best["step"], f"best/{self.cfg.eval.select_metric}": self.best["value"]})
        self.logger.log("summary", self.step, summary)
        self.logger.close()
        if self.cfg.train.report and is_main_process():
            from mm_ptft.report import write_report

            path = write_report(self.run_dir, images=self.report_images)
            print(f"report: {path}", flush=True)
        return summary
