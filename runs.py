"""A training run's life on disk and in time: its --out folder (args.json, metrics.jsonl, sample
grids, latest.pt written atomically, best.pt), its status lines, the in-training FID, SIGINT /
SIGTERM (finish the step, save, exit), the flags of a run and the rules of --resume (which
flags may change, that the teacher and the data are the same ones).

A run folder has one writer at a time (<out>/.lock, take_lock), and no command overwrites a
checkpoint with an older state: a fresh run refuses a folder that holds checkpoints, a resume
from an older checkpoint of a folder refuses to write there (check_no_newer_state).

Sampling and FID never import this module; the optimisation
machinery (processes, noise, batches, players) is players.py's.
"""
import argparse
import dataclasses
import datetime
import json
import math
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

from checkpoints import checkpoint_kind, load_checkpoint, save_checkpoint
from run_folder import (check_no_newer_state, check_not_in_use, check_out, check_saved_args_size,
                        holds_run, note_newer_crash, release_lock, remove_stale_temporaries,
                        resume_path, run_checkpoints, take_lock)
from common import (Interrupted, RealUIDError, _number, add_threads_arg, count, decay, fail,
                    given_flags, json_safe, nonnegative_float, peak_memory_mb, positive_float,
                    positive_int)


def describe_data(data):
    """What a resumed run checks of its data (None: no data used): size, image shape and a
    content fingerprint (image_data.ImageData.fingerprint), so that the same data moved elsewhere is
    accepted and other data of the same shape is not."""
    if data is None:
        return None
    return {"n": len(data), "shape": list(data.shape), "content": data.fingerprint()}


def check_same_inputs(saved_config, teacher_fingerprint, data_desc, path):
    """A resumed run must see the teacher and data of the run (files may have moved). Runs
    saved before the data's content was recorded are checked on size and shape."""
    saved = saved_config.get("teacher_fingerprint")
    if saved and saved != teacher_fingerprint:
        fail(f"--teacher is not the teacher {path} was trained with (weights differ); pass the "
             "original teacher file")
    saved = saved_config.get("data", "unrecorded")
    if saved == "unrecorded":
        return
    if isinstance(saved, dict) and isinstance(data_desc, dict) and \
            saved.get("vae") != data_desc.get("vae"):  # a latent teacher's real latents
        fail(f"--vae is not the VAE {path} was trained with (weights differ); pass the original "
             "VAE folder")
    now = data_desc
    if isinstance(saved, dict) and "content" not in saved and isinstance(now, dict):
        now = {k: v for k, v in now.items() if k != "content"}
    if saved != now:
        what = "content differs" if isinstance(saved, dict) and isinstance(now, dict) and \
            saved.get("shape") == now.get("shape") and saved.get("n") == now.get("n") else \
            f"it had {saved}, now {now}"
        fail(f"--data is not the data {path} was trained with ({what}); pass the original "
             "data")


class FiniteCheck:
    """NaN/inf losses without a host synchronisation per update: each update records, on the
    device, the first step at which a loss was not finite; `check` reads the record (at log
    and save steps), so a bad run stops there and never overwrites a good checkpoint."""

    def __init__(self):
        self.first = {}  # name -> (step, value) of the first non-finite value, step inf if none

    def add(self, name, value, step):
        value = value.detach().double()
        if name not in self.first:
            self.first[name] = (torch.full((), math.inf, dtype=torch.float64,
                                           device=value.device), torch.zeros_like(value))
        first_step, first_value = self.first[name]
        bad = ~torch.isfinite(value) & torch.isinf(first_step)
        first_step.copy_(torch.where(bad, float(step), first_step))
        first_value.copy_(torch.where(bad, value, first_value))

    def check(self, proc, out, last_saved):
        for name, (first_step, first_value) in self.first.items():
            step = first_step.clone()
            if proc.world > 1:
                dist.all_reduce(step, op=dist.ReduceOp.MIN)
            if math.isfinite(step.item()):
                kept = (f"the last good checkpoint is {out}/latest.pt (step {last_saved})"
                        if last_saved else "no checkpoint was written")
                fail(f"the {name} is {first_value.item()} at step {int(step.item())}; stopped "
                     f"without saving; {kept}; lower --lr or check the inputs")


class RunLog:
    """Status lines on the console and the same records in <out>/metrics.jsonl (main rank).

    Speed and ETA come from the average rate since this process started (or resumed), not
    from the last interval; records carry the wall-clock time and the run's elapsed training
    time (continued across resumes)."""

    def __init__(self, out, total_steps, start_step, elapsed=0.0, enabled=True):
        self.out, self.total, self.enabled = out, total_steps, enabled
        self.start_step, self.last_step, self.elapsed_before = start_step, start_step, elapsed
        self.path = os.path.join(out, "metrics.jsonl")
        self.start_clock()

    def start_clock(self):
        """Training time and speed count from now."""
        self.start_time = self.last_time = time.perf_counter()

    def elapsed(self, now=None):
        """Seconds of training in this run so far (until perf_counter `now`), resumes
        included."""
        return self.elapsed_before + (time.perf_counter() if now is None else now) - \
            self.start_time

    def write(self, record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def step(self, step, values, device):
        """One status line: step, each value, speed, ETA, peak memory; the same record in
        metrics.jsonl with `sec_per_step` (since the last record), `time`, `elapsed_s`."""
        now = time.perf_counter()
        sec = (now - self.last_time) / max(1, step - self.last_step)
        self.last_time, self.last_step = now, step
        record = {"step": step, **{k: _plain(v) for k, v in values.items()},
                  "sec_per_step": sec, "time": round(time.time(), 3),
                  "elapsed_s": round(self.elapsed(now), 3)}
        mem = peak_memory_mb(device)
        if mem is not None:
            record["peak_mem_mb"] = round(mem, 1)
        self.write(record)
        if self.enabled:
            rate = (step - self.start_step) / max(now - self.start_time, 1e-9)
            eta = datetime.timedelta(seconds=round((self.total - step) / max(rate, 1e-9)))
            speed = f"{rate:.2f} it/s" if rate >= 1 else f"{1 / max(rate, 1e-9):.2f} s/it"
            parts = [f"{k} {_fmt(record[k])}" for k in values]
            mem_txt = f" | {mem:.0f} MB" if mem is not None else ""
            print(f"step {step}/{self.total} | " + " | ".join(parts) +
                  f" | {speed} | ETA {eta}{mem_txt}", flush=True)
        return record


@dataclasses.dataclass
class Intervals:
    """How often a run logs, draws sample grids, scores its FID and saves (the run flags)."""
    log_every: int = 100
    log_seconds: float = 30.0
    sample_every: int = 0
    save_every: int = 0
    save_minutes: float = 10.0
    snapshot_every: int = 0
    fid_every: int = 0

    @classmethod
    def of(cls, args):
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


class Run:
    """A training run's bookkeeping around its steps, the same for every training script.

    It owns the step counter, the last saved step and the best in-training FID, the status
    lines and metrics.jsonl (RunLog) and the NaN check (FiniteCheck). After each step,
    `end_step` decides, once and agreed by all processes:
    - log: after the first step, then every --log-every steps or --log-seconds, whichever
      comes first, and at the end;
    - sample grids every --sample-every steps and at the end; the in-training FID every
      --fid-every steps (a new best is saved as best.pt);
    - save <out>/latest.pt: every --save-every steps (0: never by count), every --save-minutes
      (0: never by time), with every --snapshot-every snapshot, at the end and on a stop;
    - stop: SIGINT / SIGTERM ask the run to finish its current step, save and exit with
      128 + the signal number; a second signal (more than a second later: torchrun and
      schedulers forward one signal twice) stops at once, without saving.
    - an error that ends the loop (any exception but a stop by signal, Interrupted) keeps the
      steps done since the last save, unless the state is not finite: see `_save_on_error`.
    Use as a context manager around the training loop (it installs the signal handlers, and
    releases the folder's lock that start_run took).
    """

    def __init__(self, script, proc, out, steps, every):
        self.script, self.proc, self.out, self.steps, self.every = script, proc, out, steps, every
        self.check = FiniteCheck()
        self.resumed_at(0, 0.0, math.inf, saved=False)
        self.signal, self.signal_time, self.previous = None, None, {}
        # end_step's save(name), kept for a save when an error ends the run, and whether a
        # save is under way (one that failed is not tried again)
        self.save_fn, self.saving = None, False

    def resumed_at(self, step, elapsed, best_fid, saved=True):
        """Continue from a checkpoint's step, training time and best in-training FID (saved:
        whether <out>/latest.pt holds that step)."""
        # `completed`: the last step whose updates are all done (end_step sets it), so that
        # the state in memory is the state after that step when self.step equals it
        self.step = self.start_step = self.completed = step
        self.last_saved = step if saved else None
        self.best_fid = best_fid
        self.log = RunLog(self.out, self.steps, step, elapsed, enabled=self.proc.main)

    def __enter__(self):
        self.log.start_clock()  # set-up time is not training time
        self.last_log = self.last_save = time.monotonic()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc is not None:  # still under the run's signal handlers: a Ctrl-C waits
                self._save_on_error(exc)
        finally:
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)
            if self.proc.main:
                release_lock(self.out)
        return False

    def _save_on_error(self, exc):
        """An error ended the loop (a data file gone, out of memory, a sample grid or an
        in-training FID that failed): save what was done since the last save, instead of
        losing it. Not for a stop by signal (Interrupted): it has saved already, or was asked
        to stop unsaved. Never a non-finite state: the FiniteCheck is run first (a NaN loss,
        itself a RealUIDError, is refused again here; other RealUIDErrors, an FID that cannot
        be computed say, do save). Not when the failing call was a save (it would fail
        again), nor with several processes (saving gathers from all of them, and the others
        may be waiting elsewhere).
        After a whole step (the error came in end_step: logging, grids, FID) the state is the
        run's at that step, written as latest.pt. In the middle of a step, part of its updates
        are applied: that state is no step of the run, so latest.pt is kept and it is written
        as crash.pt, labelled with the last whole step (a resume of it redoes that step)."""
        if not isinstance(exc, Exception) or isinstance(exc, Interrupted):
            return
        done = self.completed
        since = self.last_saved if self.last_saved is not None else self.start_step
        if self.save_fn is None or self.saving or done <= since:
            return
        what = f"{type(exc).__name__} ended the run"
        if self.proc.world > 1:
            if self.proc.main:
                print(f"note: {what}; not saved (with {self.proc.world} processes a save needs "
                      "all of them)", file=sys.stderr, flush=True)
            return
        try:
            self.check.check(self.proc, self.out, self.last_saved)
        except RealUIDError as e:
            if str(e) != str(exc):  # a NaN that ended the run says so itself
                print(f"note: {what}; not saved: {e}", file=sys.stderr, flush=True)
            return
        whole = self.step == done
        name = "latest.pt" if whole else "crash.pt"
        step, self.step = self.step, done  # the step the checkpoint is labelled with
        try:
            self._write(self.save_fn, name)
        except Exception as e:
            print(f"note: {what}; saving {self.out}/{name} failed too ({type(e).__name__}: "
                  f"{e})", file=sys.stderr, flush=True)
            return
        finally:
            self.step = step
        if whole:
            self.last_saved = done
            print(f"note: {what} after step {done}; saved {self.out}/latest.pt (step {done}); "
                  f"continue with: python {self.script} --resume {self.out}",
                  file=sys.stderr, flush=True)
        else:
            kept = (f"{self.out}/latest.pt stays at step {self.last_saved}"
                    if self.last_saved is not None else "no latest.pt was written")
            print(f"note: {what} during step {done + 1}, part of whose updates were applied: "
                  f"{kept}; that state is saved as {self.out}/crash.pt (labelled step {done}); "
                  f"continue from it with: python {self.script} --resume {self.out}/crash.pt "
                  "(close to, not exactly, the uninterrupted run)", file=sys.stderr, flush=True)

    def _write(self, save, name):
        self.saving = True
        save(name)
        self.saving = False

    def _on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal is None:
            self.signal, self.signal_time = signum, time.monotonic()
            if self.proc.main:
                print(f"\nreceived {name}: finishing step {self.step}, then saving "
                      f"{self.out}/latest.pt (send it again to stop at once, unsaved)",
                      file=sys.stderr, flush=True)
        elif time.monotonic() - self.signal_time > 1.0:
            kept = (f"{self.out}/latest.pt is from step {self.last_saved}"
                    if self.last_saved else "nothing was saved")
            raise Interrupted(f"stopped at once by a second {name} during step {self.step}, "
                              f"without saving; {kept}", 128 + signum)

    def due(self, step):
        """(log, save, stop) after `step`, the same on every process."""
        e, now = self.every, time.monotonic()
        last = step >= self.steps
        log = (step == self.start_step + 1 or step % e.log_every == 0 or last
               or (e.log_seconds and now - self.last_log >= e.log_seconds))
        save = (last or (e.save_every and step % e.save_every == 0)
                or (e.snapshot_every and step % e.snapshot_every == 0)
                or (e.save_minutes and now - self.last_save >= 60 * e.save_minutes))
        log, save, stop = self.proc.agree(log, save, self.signal is not None)
        if log:
            self.last_log = now
        if save or stop:
            self.last_save = now
        return log, save or stop, stop

    def end_step(self, running, values, grids, save, fid=None):
        """Everything after one step: `running` holds device sums of loss terms over the
        steps since the last record (averaged over steps and processes, logged, then zeroed),
        `values` more values for the record (gradient norms, lr); grids() draws the sample
        grids (main process), save(name) writes <out>/name; fid is None or
        (InTrainingFID or None off the main process, sample(z, y), the model's label)."""
        step, proc = self.step, self.proc
        self.completed, self.save_fn = step, save  # the step's updates are all done
        do_log, do_save, stop = self.due(step)
        if do_log:
            self.check.check(proc, self.out, self.last_saved)
            n = step - self.log.last_step  # steps since the last record (also after a resume)
            record = {k: proc.mean(v / n) for k, v in running.items()}
            self.log.step(step, {**record, **values}, proc.device)
            for v in running.values():
                v.zero_()
        if proc.main and self.every.sample_every and (step % self.every.sample_every == 0
                                                       or step == self.steps):
            grids()
        if fid is not None and self.every.fid_every and step % self.every.fid_every == 0:
            self.check.check(proc, self.out, self.last_saved)
            self.evaluate_fid(*fid, save)
        if do_save:
            self.check.check(proc, self.out, self.last_saved)
            self._write(save, "latest.pt")
            self.last_saved = step
        if stop:
            proc.close()
            raise self.stopped(step)

    def evaluate_fid(self, fid_eval, sample, model, save):
        """In-training FID on the main process (shared with the others), logged with its
        sample count and model; a new best is written by save("best.pt")."""
        score = self.proc.broadcast(fid_eval(sample) if self.proc.main else None)
        best = score < self.best_fid
        if self.proc.main:
            self.log.write({"step": self.step, "fid": score, "fid_samples": fid_eval.n,
                            "fid_model": model, "fid_mode": fid_eval.extractor.mode,
                            "fid_kind": "in-training"})
            print(f"step {self.step} | in-training FID ({fid_eval.n} samples, {model}): "
                  f"{score:.3f}" + (" (best so far: <out>/best.pt)" if best else ""), flush=True)
        if best:
            self.best_fid = score
            self._write(save, "best.pt")

    def stopped(self, step):
        """The exception that ends a run stopped by a signal (after its checkpoint is saved)."""
        signum = self.signal or signal.SIGTERM  # the signal reached another process
        message = (f"stopped by {signal.Signals(signum).name} at step {step}/{self.steps}: "
                   f"{self.out}/latest.pt written; continue with: python {self.script} "
                   f"--resume {self.out}" + (" (under the same launcher, e.g. torchrun)"
                                             if self.proc.world > 1 else ""))
        return Interrupted(message if self.proc.main else "", 128 + signum)


def _plain(v):
    return v.item() if torch.is_tensor(v) else v


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def start_run(out, args, proc, fresh):
    """Create <out>, take its lock (one run per folder, see take_lock), remove the temporary
    files of saves that a kill -9 interrupted, and write args.json (the flags as a dict), once
    setup has succeeded (a run that fails on its inputs leaves no empty folder behind). A
    fresh run in a folder left by an attempt that never saved a checkpoint (stopped during
    set-up, say) starts its metrics.jsonl anew: that attempt cannot be resumed, and its
    records would mix with these. Only the main process writes."""
    if not proc.main:
        return
    os.makedirs(out, exist_ok=True)
    take_lock(out)
    found = run_checkpoints(out) if fresh else []
    if found:  # saved by another run since parse_run_args looked (it held the lock then)
        release_lock(out)
        fail(f"--out {out} now holds checkpoints of another run ({', '.join(found)}); pass "
             "another --out")
    removed, size = remove_stale_temporaries(out)
    if removed:
        print(f"note: removed {removed} temporary file(s) of interrupted saves from {out} "
              f"({size / 2**20:.1f} MB)", flush=True)
    metrics = os.path.join(out, "metrics.jsonl")
    if fresh and os.path.exists(metrics):
        os.replace(metrics, metrics + ".unsaved-attempt")
        print(f"note: {out} held the metrics of an attempt that saved no checkpoint; kept as "
              "metrics.jsonl.unsaved-attempt")
    with open(os.path.join(out, "args.json"), "w") as f:
        json.dump(json_safe(args), f, indent=2)


def save_run_checkpoint(ckpt, out, name, step, snapshot_every):
    """<out>/name written atomically (main process), plus a numbered snapshot
    <out>/ckpt_<step>.pt of latest.pt every snapshot_every steps."""
    save_checkpoint(ckpt, os.path.join(out, name))
    if name == "latest.pt" and snapshot_every and step % snapshot_every == 0:
        save_checkpoint(ckpt, os.path.join(out, f"ckpt_{step:07d}.pt"))


def add_run_args(p, steps, batch, lr, warmup_steps, ema, log_every, sample_every, save_every,
                 precisions=("fp32", "tf32", "bf16", "fp16"), precision="fp32"):
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/run",
                   help="output folder of the run (with --resume RUN_DIR: RUN_DIR)")
    g.add_argument("--steps", type=positive_int, default=steps,
                   help="total steps of the run (a larger value extends a resumed run)")
    g.add_argument("--batch-size", type=positive_int, default=batch,
                   help="global batch size (split over processes and --grad-accum)")
    g.add_argument("--lr", type=positive_float, default=lr, help="Adam learning rate")
    g.add_argument("--warmup", type=count, default=warmup_steps,
                   help="linear learning-rate warm-up, in optimizer updates (0: none)")
    g.add_argument("--grad-clip", type=nonnegative_float, default=1.0,
                   help="gradient-norm clipping (0: none)")
    g.add_argument("--ema", type=decay, nargs="+", default=ema,
                   help="EMA decays to track (keys str(decay) in the checkpoint)")
    g.add_argument("--seed", type=count, default=42, help="random seed")
    g.add_argument("--device", default=None,
                   help="cuda, cuda:1, npu, mps or cpu (default: the best available)")
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="RUN",
                   help="continue a run exactly, with its own flags: a run folder, a checkpoint "
                        "file, or no value for <out>/latest.pt. Only how long, how often, where "
                        "and how fast it runs may change (--steps, intervals, --device, "
                        "--grad-accum, ...: runs.RESUMABLE, docs/runs.md)")
    g.add_argument("--log-every", type=positive_int, default=log_every,
                   help="status line and metrics.jsonl record every N steps (and after step 1)")
    g.add_argument("--log-seconds", type=nonnegative_float, default=30.0,
                   help="... or after this many seconds, whichever comes first (0: by count)")
    g.add_argument("--sample-every", type=count, default=sample_every,
                   help="sample grid every N steps (0: never)")
    g.add_argument("--save-every", type=count, default=save_every,
                   help="write <out>/latest.pt every N steps (0: only by --save-minutes, at "
                        "the end and when stopped by SIGINT / SIGTERM)")
    g.add_argument("--save-minutes", type=nonnegative_float, default=10.0,
                   help="also write <out>/latest.pt when it is this many minutes old, so that "
                        "a hard kill loses at most that much (0: never by time)")
    g.add_argument("--snapshot-every", type=count, default=0,
                   help="also keep a numbered copy <out>/ckpt_<step>.pt every N steps (0: never)")
    s = p.add_argument_group("speed")
    s.add_argument("--precision", choices=list(precisions), default=precision,
                   help="fp32 (no TF32); tf32 (TF32 matrix products on CUDA); bf16 / fp16 "
                        "(autocast, losses and optimizer in fp32, fp16 with gradient scaling)"
                        + ("; mixed (bf16, but teacher and fake model in fp32 in the generator "
                           "update, see README); auto: mixed on a CUDA GPU with bf16, fp32 "
                           "elsewhere" if "mixed" in precisions else ""))
    add_threads_arg(s)
    s.add_argument("--grad-accum", type=positive_int, default=1,
                   help="accumulate gradients over K micro-batches (same update as one batch)")
    s.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the networks being trained (forward and backward)")
    s.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune",
                            "max-autotune-no-cudagraphs"],
                   help="torch.compile mode; reduce-overhead captures CUDA graphs")
    s.add_argument("--deterministic", action="store_true",
                   help="deterministic GPU kernels (cuDNN, cuBLAS) for bit-exact resumes on a "
                        "GPU; slower. On a CPU runs are deterministic anyway")
    return g


def add_fid_args(p):
    g = p.add_argument_group("in-training FID (cheap and labelled as such; final numbers: fid.py)")
    g.add_argument("--fid-every", type=count, default=0,
                   help="FID of the first EMA model every N steps, logged to metrics.jsonl; the "
                        "best one is kept as <out>/best.pt (0: never)")
    g.add_argument("--fid-n", type=_number(int, lambda v: v >= 2, "an integer >= 2"),
                   default=10_000,
                   help="samples per in-training FID (the paper's protocol uses 50,000)")
    g.add_argument("--fid-ref", default=None,
                   help="reference statistics from `python fid.py ref` (e.g. "
                        "cifar10_train_tf.npz); needed with --fid-every")
    g.add_argument("--fid-weights", default=None,
                   help="Inception weights file (default: torch hub cache, see fid.py)")
    g.add_argument("--fid-mode", choices=["tf", "pytorch-fid"], default="tf",
                   help="FID preprocessing (tf: the paper's clean-fid legacy_tensorflow)")
    g.add_argument("--fid-batch", type=positive_int, default=250,
                   help="images per sampling batch")
    return g


# Flags a resumed run may change on the command line: how long, how often, where and how fast
# it runs. Flags not given are all restored from the checkpoint; giving another value to a flag
# outside this set is refused. (--teacher and --data may point to moved files: setup checks
# their content; --init-from only matters at the start of a run.)
RESUMABLE = {"steps", "out", "resume", "device", "workers", "data_root", "log_every",
             "grad_accum", "threads",
             "log_seconds", "sample_every", "save_every", "save_minutes", "snapshot_every",
             "fid_every", "fid_n", "fid_ref", "fid_weights", "fid_mode", "fid_batch",
             "compile", "compile_mode", "channels_last", "deterministic", "teacher", "data",
             "init_from", "sample_nfe", "vae"}


def restored_value(action, value, path):
    """A flag's saved value, checked as if it had been typed: through its action's type and
    choices (and arity), so that a restored flag can hold nothing its parser would refuse.
    The saved value is returned unchanged when the parser reads it back as an equal value
    (every value this code saves); a value given as text of another type (a number saved as
    "5") comes back as typed."""
    flag = action.option_strings[0] if action.option_strings else action.dest

    def refuse(why):
        fail(f"--resume {path}: its saved {flag} {why}; its flags were not written by this "
             "code (or were edited): start a new run from its weights with --init-from instead")

    def typed(item):
        if isinstance(item, str) and "\0" in item:
            refuse("holds a NUL character, which no command line can")
        if item is None:
            if action.default is None:
                return None  # left open, as without the flag
            try:
                if action.type is not None and action.type("none") is None:
                    return None  # e.g. --teacher-ema none
            except (argparse.ArgumentTypeError, TypeError, ValueError):
                pass
            refuse("is empty (None), which the flag cannot be")
        if isinstance(item, (list, tuple)):  # a type that reads a list: --channel-mult 1,2,2
            if action.type is None or any(isinstance(v, (bool, list, tuple)) for v in item):
                refuse(f"is a list ({_flag_text(item)[:60]}), not a single value")
            text = ",".join(map(str, item))
        else:
            text = str(item)
        try:
            result = action.type(text) if action.type is not None else text
        except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
            refuse(f"is {text[:60]!r}, which the flag refuses ({e})")
        if action.choices is not None and result not in action.choices:
            refuse(f"is {text[:60]!r}, not one of {', '.join(map(str, action.choices))}")
        return item if result == item else result

    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                           argparse._StoreConstAction)):
        if not any(type(value) is type(v) and value == v for v in (action.default, action.const)):
            refuse(f"is {str(value)[:60]!r}, not {action.const!r} or {action.default!r}")
        return value
    if not isinstance(action, argparse._StoreAction):
        return value  # no such flag in our parsers; check_saved_args_size bounded it
    if action.nargs in ("+", "*") or isinstance(action.nargs, int) and action.nargs > 1:
        if not isinstance(value, (list, tuple)):
            refuse(f"is {value!r}, not a list of values")
        if action.nargs == "+" and not value or \
                isinstance(action.nargs, int) and len(value) != action.nargs:
            refuse(f"has {len(value)} values")
        return [typed(v) for v in value]
    return typed(value)


KINDS = {"teacher": "train_teacher.py", "distilled": "distill.py (or finetune.py)"}


def parse_run_args(parser, argv, script, init_hint, kind):
    """A training script's flags. With --resume, the run's own flags are restored from its
    checkpoint: flags given on the command line must be RESUMABLE or equal the saved ones;
    restored ones are checked as if typed (restored_value) and bounded in size. Sets
    args.resume to the checkpoint path (None without --resume) and args.from_authors for the
    authors' files, which carry no flags (all then come from the command line). A resumed run
    writes where it lives, unless that folder holds a newer state than the checkpoint
    (check_no_newer_state), or into an --out that holds no run. Without --resume, an --out that
    already holds a run's checkpoints is refused: a repeated command never overwrites the
    checkpoint it could have resumed. A folder another running process writes to (its .lock)
    is refused either way. `kind` is the checkpoint kind the script makes ("teacher" or
    "distilled")."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if any(a == "--resume" or a.startswith("--resume=") for a in argv):
        for action in parser._actions:  # required flags (--teacher) are restored instead
            action.required = False
    args = parser.parse_args(argv)
    args.from_authors = False
    if args.resume is None:
        check_out(args.out)
        check_not_in_use(args.out)  # first: a live run's folder is in use, whatever it holds
        if os.path.exists(os.path.join(args.out, "latest.pt")):  # never overwrite a run
            fail(f"--out {args.out} already holds a run (latest.pt); continue it with "
                 f"`python {script} --resume {args.out}`, or pass another --out (delete the "
                 "folder to start that run over)")
        found = run_checkpoints(args.out)
        if found:  # no latest.pt, but a new run would still overwrite these
            fail(f"--out {args.out} holds checkpoints of a run ({', '.join(found)}); a new run "
                 "would overwrite them: pass another --out (delete the folder to start over)")
        return args
    given = given_flags(parser, argv)
    path = resume_path(args.resume, args.out)
    ckpt = load_checkpoint(path, "resume checkpoint", mmap=True)
    config = ckpt.get("config", {})
    if not isinstance(config, dict):
        fail(f"--resume {path}: its `config` is a {type(config).__name__}, not a record; "
             "start a new run from its weights with --init-from instead")
    found = config.get("kind") or checkpoint_kind(ckpt)
    if found != kind and found in KINDS:
        fail(f"--resume {path} is a {found} run, made by {KINDS[found]}; resume it with that "
             f"script: python {KINDS[found].split()[0]} --resume {path}")
    saved = config.get("args")
    step = ckpt.get("step") if isinstance(ckpt.get("step"), int) else None
    args.resume = path
    home = os.path.dirname(path) or "."
    if "out" in given and os.path.abspath(args.out) != os.path.abspath(home):
        if holds_run(args.out):
            fail(f"--out {args.out} holds another run; a resumed run writes where it lives "
                 f"({home}) or into an empty folder: drop --out or pass a new folder")
        check_out(args.out)
    if saved is None:  # the authors' layout (or a file written by hand): no flags inside
        if "out" not in given and holds_run(args.out):
            fail(f"--out {args.out} (the default) holds another run; continuing {path}, a file "
                 "without a run folder, needs a new --out")
        check_out(args.out)
        check_not_in_use(args.out)
        if os.path.abspath(args.out) == os.path.abspath(home):
            check_no_newer_state(path, step, home, script)
        args.from_authors = True
        return args
    check_saved_args_size(saved, path)
    if "out" not in given:
        args.out = home
    check_not_in_use(args.out)
    if os.path.abspath(args.out) == os.path.abspath(home):
        check_no_newer_state(path, step, home, script)
        note_newer_crash(path, step, home, script)
    actions = {a.dest: a for a in parser._actions}
    differ = []
    for key, value in vars(args).items():
        if key not in saved or key in ("out", "resume", "from_authors"):
            continue
        if key not in given:
            setattr(args, key, restored_value(actions[key], saved[key], path)
                    if key in actions else saved[key])
        elif key not in RESUMABLE and json_safe(value) != saved[key]:
            differ.append(f"--{key.replace('_', '-')} {_flag_text(value)} (the run: "
                          f"{_flag_text(saved[key])})")
    if differ:
        fail(f"--resume {path}: {', '.join(differ)} differ from the run's own flags; drop them "
             f"to continue the run exactly, or start a new run from these weights: python "
             f"{script} {init_hint.format(path=path)} --out NEW_FOLDER ...")
    return args


def _flag_text(value):
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def check_resume_step(path, step, steps):
    """A resumed run (from `path`, at `step`) must have steps left of its --steps."""
    if step >= steps:
        fail(f"the run in {path} is already at step {step} of --steps {steps}; "
             "pass a larger --steps to extend it")
