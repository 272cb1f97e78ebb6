"""Lightning's per-step overhead: ``Trainer.fit(LSTMLightningModule)`` vs a plain PyTorch loop.

Both arms train the same :class:`StackedLSTM` (same seed, so the same initial weights) on
the same pre-generated character batches, each through its own ``DataLoader`` over them,
doing the same work per step: forward, cross-entropy, zero_grad, backward,
``clip_grad_norm_(5.0)``, Adam step. The Lightning arm also does what the service's module
does on every step (``self.log("train_loss")``, the NaN check, the epoch accumulator):
overhead the service really pays, so it is counted against Lightning. Both arms end with
bit-identical weights, which the script checks.

A step's time is the interval from the start of its batch to the start of the next one,
so it includes everything an arm does between two batches (loop, hooks, logging, the
optimizer closure, fetching the next batch). The first ``--warmup`` steps of a run are not
timed; a run's ms/step is the median (``--stat median``: robust to time stolen by other
processes) or the mean (``--stat mean``: also counts periodic work) of its ``--steps``
timed steps; the summary is the median over ``--reps`` runs and the ratio the median of
the per-run ratios.

Two ways to interleave the arms so that machine noise cancels (``--mode``):

- ``paired`` (default): one ``Trainer.fit`` per run; a Callback's ``on_train_batch_start``
  runs the plain loop's step for the same batch index first, so the two arms alternate
  step by step (plain 0, Lightning 0, plain 1, Lightning 1, ...) and see the same load.
  The Lightning step is the time from the end of that plain step to the next batch start.
- ``runs``: whole fits alternate A B B A A B ...; this mode also reports the one-off cost
  of a fit (``fixed ms/fit``: set-up until the first batch plus teardown after the last).

Two clocks: wall time (``perf_counter``) and the process's CPU time (``process_time``).
With one torch thread and ``num_workers=0`` all the work of both arms runs on the main
thread and nothing waits, so CPU time measures the same work as wall time without the
time other processes take the CPU for; on a shared machine it is the figure to trust.
``--clock`` picks the one the target (ratio <= 1.03) is checked on.

    python bench/training_overhead.py              # 2 x 128, vocab 100, batch 64, bptt 100
    python bench/training_overhead.py --mode runs  # whole fits interleaved; fixed cost
    python bench/training_overhead.py --hidden 16 --bptt 10 --steps 100  # overhead in ms
    python bench/training_overhead.py --profile    # cProfile: where Lightning's time goes

A second section (``--only fused`` runs it alone; by default it follows the first) times
the model itself: :class:`StackedLSTM`'s fused form (one ``nn.LSTM(num_layers=N)``) against
its per-layer form (one ``nn.LSTM`` per layer, ``nn.Dropout`` between), forward + loss +
backward of a training step, for 1, 2 and 4 layers of width 64 and 256, on token input
(char_lm: embedding, every-step cross-entropy over ``--vocab``) and on feature input
(``FUSED_FEATURES`` features, last-step readout over ``FUSED_CLASSES`` classes), batch
``--batch``, ``--bptt`` steps, dropout 0.2 between layers. Both forms start from the same
seed, so from the same weights (checked), and see the same batches; their steps alternate
(per-layer, fused, fused, per-layer, ...) so that machine noise cancels. The ratio is
fused / per-layer, the median of per-pair ratios (below 1: the fused form is faster), and
the ratio of each form's fastest step (``best``: robust to bursts of page faults); one
layer is the control (both forms are the same module there): its spread is the noise.
Each step is seeded, so both forms draw the same dropout masks, and the gradients of the
last pair are compared too (0 on CPU: the same kernels in the same order).

    python bench/training_overhead.py --only fused                  # ~45 s CPU on 1 thread
    python bench/training_overhead.py --only fused --fused-steps 10 # steadier figures
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import json
import logging
import pstats
import statistics
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeAlias

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from service.search_space import LSTMConfig
from service.training.data.base import Problem
from service.training.model import StackedLSTM
from service.training.module import LSTMLightningModule

TARGET_RATIO = 1.03
GRAD_CLIP = 5.0
FUSED_LAYERS = (1, 2, 4)
FUSED_HIDDEN = (64, 256)
FUSED_FEATURES = 16
FUSED_CLASSES = 10
FUSED_DROPOUT = 0.2

Batch: TypeAlias = tuple[Tensor, Tensor]
Clock: TypeAlias = Literal["wall", "cpu"]
CLOCKS: tuple[Clock, ...] = ("wall", "cpu")
Stat: TypeAlias = Literal["median", "mean"]
Stamp: TypeAlias = tuple[float, float]  # (wall, cpu) seconds


def _stamp() -> Stamp:
    return time.perf_counter(), time.process_time()


def _ms(start: Stamp, end: Stamp) -> Stamp:
    return (end[0] - start[0]) * 1000.0, (end[1] - start[1]) * 1000.0


class _Batches(Dataset[Batch]):
    """Pre-generated batches, served as they are (``DataLoader(batch_size=None)``)."""

    def __init__(self, batches: Sequence[Batch]) -> None:
        self.batches = list(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> Batch:
        return self.batches[index]


def _loader(batches: Sequence[Batch]) -> DataLoader[Batch]:
    return DataLoader(_Batches(batches), batch_size=None)


@dataclass
class ArmResult:
    """One timed run of one arm."""

    #: Per timed step, (wall ms, CPU ms).
    steps_ms: list[Stamp]
    final_weights: list[Tensor]
    #: Wall ms of a fit outside its steps (``--mode runs`` only).
    fixed_ms: float | None = None

    def ms_per_step(self, clock: Clock, stat: Stat) -> float:
        """The run's time per step on ``clock``: the median or the mean of its timed steps."""
        steps = [step[CLOCKS.index(clock)] for step in self.steps_ms]
        return statistics.median(steps) if stat == "median" else statistics.fmean(steps)


def _make_batches(args: argparse.Namespace) -> list[Batch]:
    generator = torch.Generator().manual_seed(args.seed + 1)
    batches = []
    # One batch more than is timed: the last timed step ends where the next one starts.
    for _ in range(args.warmup + args.steps + 1):
        seq = torch.randint(0, args.vocab, (args.batch, args.bptt + 1), generator=generator)
        batches.append((seq[:, :-1].contiguous(), seq[:, 1:].contiguous()))
    return batches


def _problem_and_params(args: argparse.Namespace) -> tuple[Problem, LSTMConfig]:
    problem = Problem("tokens", args.vocab, args.vocab, "every_step", "cross_entropy", "val_loss")
    params = LSTMConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        lr=2e-3,
        grad_clip=GRAD_CLIP,
        batch_size=args.batch,
        bptt=args.bptt,
        max_epochs=1,
        seed=args.seed,
    )
    return problem, params


class PlainLoop:
    """The plain PyTorch arm, one step at a time."""

    def __init__(self, args: argparse.Namespace, batches: Sequence[Batch]) -> None:
        problem, params = _problem_and_params(args)
        torch.manual_seed(args.seed)
        self.model = StackedLSTM(problem, params).train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=params.lr)
        self.batches: Iterator[Batch] = iter(_loader(batches))

    def step(self) -> None:
        """Train on the next batch."""
        x, y = next(self.batches)
        logits = self.model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        self.optimizer.zero_grad()
        torch.autograd.backward(loss)  # = loss.backward(), which the stubs leave untyped
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
        self.optimizer.step()

    def weights(self) -> list[Tensor]:
        """A copy of the current weights."""
        return [p.detach().clone() for p in self.model.parameters()]


def _lightning_fit(
    args: argparse.Namespace, batches: Sequence[Batch], timer: L.Callback
) -> LSTMLightningModule:
    """``Trainer.fit`` of the service's LightningModule: as for a trial, minus extras."""
    problem, params = _problem_and_params(args)
    torch.manual_seed(args.seed)
    module = LSTMLightningModule.from_config(problem, params)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        gradient_clip_val=GRAD_CLIP,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=_loader(batches))
    # Lightning must not have changed the thread count: that would not be a fair race.
    assert torch.get_num_threads() == args.threads, torch.get_num_threads()
    return module


def _lightning_weights(module: LSTMLightningModule) -> list[Tensor]:
    return [p.detach().clone() for p in module.model.parameters()]


class _PairedSteps(L.Callback):
    """Runs the plain arm's step at the start of each Lightning batch and times both."""

    def __init__(self, plain: PlainLoop) -> None:
        self.plain = plain
        self.plain_ms: list[Stamp] = []
        self.lightning_ms: list[Stamp] = []
        self._plain_done: Stamp | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        start = _stamp()
        if self._plain_done is not None:
            self.lightning_ms.append(_ms(self._plain_done, start))
        self.plain.step()
        self._plain_done = _stamp()
        self.plain_ms.append(_ms(start, self._plain_done))


def run_paired(args: argparse.Namespace, batches: Sequence[Batch]) -> tuple[ArmResult, ArmResult]:
    """One fit with the plain arm's steps interleaved: (plain, Lightning)."""
    plain = PlainLoop(args, batches)
    timer = _PairedSteps(plain)
    module = _lightning_fit(args, batches, timer)
    timed = slice(args.warmup, args.warmup + args.steps)
    return (
        ArmResult(timer.plain_ms[timed], plain.weights()),
        ArmResult(timer.lightning_ms[timed], _lightning_weights(module)),
    )


class _BatchStarts(L.Callback):
    """Timestamps at the start of every training batch, and at the end of the last one."""

    def __init__(self) -> None:
        self.starts: list[Stamp] = []
        self.last_end: Stamp = (0.0, 0.0)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.starts.append(_stamp())

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.last_end = _stamp()


def _arm_from_stamps(
    args: argparse.Namespace,
    begin: Stamp,
    timer: _BatchStarts,
    end: Stamp,
    weights: list[Tensor],
) -> ArmResult:
    timed = timer.starts[args.warmup : args.warmup + args.steps + 1]
    fixed = _ms(begin, timer.starts[0])[0] + _ms(timer.last_end, end)[0]
    return ArmResult([_ms(a, b) for a, b in itertools.pairwise(timed)], weights, fixed)


def run_plain_fit(args: argparse.Namespace, batches: Sequence[Batch]) -> ArmResult:
    """A whole run of the plain loop."""
    begin = _stamp()
    plain = PlainLoop(args, batches)
    timer = _BatchStarts()
    for _ in batches:
        timer.starts.append(_stamp())
        plain.step()
        timer.last_end = _stamp()
    return _arm_from_stamps(args, begin, timer, _stamp(), plain.weights())


def run_lightning_fit(args: argparse.Namespace, batches: Sequence[Batch]) -> ArmResult:
    """A whole ``Trainer.fit``."""
    begin = _stamp()
    timer = _BatchStarts()
    module = _lightning_fit(args, batches, timer)
    return _arm_from_stamps(args, begin, timer, _stamp(), _lightning_weights(module))


def run_reps(
    args: argparse.Namespace, batches: Sequence[Batch]
) -> list[tuple[ArmResult, ArmResult]]:
    """All repetitions, (plain, Lightning) each, after one untimed run of each arm."""
    # First-call costs (lazy imports, allocator growth) stay out of the figures.
    run_paired(args, batches)
    run_lightning_fit(args, batches)
    rows = []
    for rep in range(args.reps):
        if args.mode == "paired":
            rows.append(run_paired(args, batches))
        elif rep % 2 == 0:
            plain = run_plain_fit(args, batches)
            rows.append((plain, run_lightning_fit(args, batches)))
        else:
            lightning = run_lightning_fit(args, batches)
            rows.append((run_plain_fit(args, batches), lightning))
    return rows


def _summarise(
    args: argparse.Namespace, rows: Sequence[tuple[ArmResult, ArmResult]]
) -> dict[str, Any]:
    summary: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    for clock in CLOCKS:
        plain = [p.ms_per_step(clock, args.stat) for p, _ in rows]
        lightning = [lt.ms_per_step(clock, args.stat) for _, lt in rows]
        summary[f"plain_{clock}_ms_per_step"] = statistics.median(plain)
        summary[f"lightning_{clock}_ms_per_step"] = statistics.median(lightning)
        summary[f"{clock}_ratio"] = statistics.median(
            lt / p for p, lt in zip(plain, lightning, strict=True)
        )
        summary[f"{clock}_overhead_ms_per_step"] = statistics.median(
            lt - p for p, lt in zip(plain, lightning, strict=True)
        )
    if args.mode == "runs":
        summary["plain_fixed_ms"] = statistics.median(p.fixed_ms or 0.0 for p, _ in rows)
        summary["lightning_fixed_ms"] = statistics.median(lt.fixed_ms or 0.0 for _, lt in rows)
    summary["max_weight_diff"] = max(
        (a - b).abs().max().item()
        for p, lt in rows
        for a, b in zip(p.final_weights, lt.final_weights, strict=True)
    )
    summary["reps"] = [
        {"plain_steps_ms": p.steps_ms, "lightning_steps_ms": lt.steps_ms} for p, lt in rows
    ]
    return summary


def _print_table(
    args: argparse.Namespace, rows: Sequence[tuple[ArmResult, ArmResult]], summary: dict[str, Any]
) -> None:
    print(
        f"StackedLSTM {args.layers} x {args.hidden}, vocab {args.vocab}, batch {args.batch}, "
        f"bptt {args.bptt}; {args.reps} runs ({args.mode}) of {args.steps} timed steps after "
        f"{args.warmup} warm-up; {args.threads} thread(s); torch {torch.__version__}, "
        f"lightning {L.__version__}"
    )
    print(f"a run's ms/step: the {args.stat} of its steps; summary: the median over runs")
    print(f"{'':>6} | {'wall ms/step':^27} | {'CPU ms/step':^27}")
    print(f"{'run':>6}" + f" | {'plain':>9} {'Lightning':>9} {'ratio':>7}" * 2)

    def cells(plain: float, lightning: float, ratio: float) -> str:
        return f" | {plain:>9.2f} {lightning:>9.2f} {ratio:>7.3f}"

    for rep, (p, lt) in enumerate(rows):
        line = ""
        for c in CLOCKS:
            plain, lightning = p.ms_per_step(c, args.stat), lt.ms_per_step(c, args.stat)
            line += cells(plain, lightning, lightning / plain)
        print(f"{rep:>6}{line}")
    line = "".join(
        cells(
            summary[f"plain_{c}_ms_per_step"],
            summary[f"lightning_{c}_ms_per_step"],
            summary[f"{c}_ratio"],
        )
        for c in CLOCKS
    )
    print(f"{'median':>6}{line}")
    for c in CLOCKS:
        extra = summary[f"{c}_overhead_ms_per_step"]
        print(
            f"Lightning overhead, {c} clock: {extra:+.2f} ms/step (median of per-run differences)"
        )
    if args.mode == "runs":
        print(
            f"fixed ms/fit (wall): plain {summary['plain_fixed_ms']:.1f}, "
            f"Lightning {summary['lightning_fixed_ms']:.1f}"
        )
    print(f"same final weights in both arms: max |diff| = {summary['max_weight_diff']:.2e}")


def _profile_lightning(args: argparse.Namespace, batches: Sequence[Batch]) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    run_lightning_fit(args, batches)
    profiler.disable()
    print("\ncProfile of one Lightning run (top 30 by own time):")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


# --------------------------------------------------------------------------------------
# Fused multi-layer module vs per-layer stack
# --------------------------------------------------------------------------------------

InputKind: TypeAlias = Literal["tokens", "features"]


@dataclass
class FusedCase:
    """The two forms of one configuration, timed side by side."""

    input_kind: InputKind
    layers: int
    hidden: int
    #: Per timed pair, (wall ms, CPU ms) of the per-layer step and of the fused step.
    per_layer_ms: list[Stamp]
    fused_ms: list[Stamp]
    max_grad_diff: float

    def ratio(self, clock: Clock) -> float:
        """Fused / per-layer on ``clock``: the median of the per-pair ratios."""
        c = CLOCKS.index(clock)
        return statistics.median(
            f[c] / p[c] for p, f in zip(self.per_layer_ms, self.fused_ms, strict=True)
        )

    def best_ratio(self, clock: Clock) -> float:
        """Fused / per-layer on ``clock``: the ratio of each form's fastest step (noise only
        ever adds time: page-fault bursts when the allocator hands big buffers back to the
        system and takes them again can stretch a step by half, in either form)."""
        c = CLOCKS.index(clock)
        return min(f[c] for f in self.fused_ms) / min(p[c] for p in self.per_layer_ms)

    def ms(self, clock: Clock, fused: bool) -> float:
        """The median ms per step of one form on ``clock``."""
        steps = self.fused_ms if fused else self.per_layer_ms
        return statistics.median(step[CLOCKS.index(clock)] for step in steps)


def _fused_problem(args: argparse.Namespace, input_kind: InputKind) -> Problem:
    if input_kind == "tokens":
        return Problem("tokens", args.vocab, args.vocab, "every_step", "cross_entropy", "val_loss")
    return Problem(
        "features", FUSED_FEATURES, FUSED_CLASSES, "last_step", "cross_entropy", "val_acc"
    )


def _fused_batches(args: argparse.Namespace, problem: Problem, count: int) -> list[Batch]:
    generator = torch.Generator().manual_seed(args.seed + 2)
    batches = []
    shape = (args.batch, args.bptt)
    for _ in range(count):
        if problem.input_kind == "tokens":
            seq = torch.randint(0, args.vocab, (args.batch, args.bptt + 1), generator=generator)
            batches.append((seq[:, :-1].contiguous(), seq[:, 1:].contiguous()))
        else:
            x = torch.randn(*shape, FUSED_FEATURES, generator=generator)
            y = torch.randint(0, FUSED_CLASSES, (args.batch,), generator=generator)
            batches.append((x, y))
    return batches


def _forward_backward(model: StackedLSTM, batch: Batch) -> Stamp:
    """Forward, cross-entropy and backward of one step; its (wall, CPU) ms."""
    x, y = batch
    start = _stamp()
    model.zero_grad(set_to_none=True)
    logits = model(x)
    loss = F.cross_entropy(logits.flatten(0, -2), y.flatten())
    torch.autograd.backward(loss)
    return _ms(start, _stamp())


def _gradients(model: StackedLSTM) -> list[Tensor]:
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def run_fused_case(
    args: argparse.Namespace, input_kind: InputKind, layers: int, hidden: int
) -> FusedCase:
    """Time the per-layer and the fused form of one configuration, steps alternating."""
    problem = _fused_problem(args, input_kind)
    params = LSTMConfig(num_layers=layers, hidden_size=hidden, dropout=FUSED_DROPOUT)
    models = []
    for fused in (False, True):
        torch.manual_seed(args.seed)
        models.append(StackedLSTM(problem, params, fused=fused).train())
    per_layer, fused_model = models
    assert not per_layer.fused and fused_model.fused
    # Same seed, same weights: the parameters are created and drawn in the same order.
    for a, b in zip(per_layer.parameters(), fused_model.parameters(), strict=True):
        assert torch.equal(a, b)
    batches = _fused_batches(args, problem, args.fused_warmup + args.fused_steps)
    per_layer_ms: list[Stamp] = []
    fused_ms: list[Stamp] = []
    for step, batch in enumerate(batches):
        # Alternate which form goes first, so that neither always follows the other.
        order = (per_layer, fused_model) if step % 2 == 0 else (fused_model, per_layer)
        times = {}
        for model in order:
            # The same dropout masks in both forms (on CPU both draw them from this
            # generator in the same order), so that their gradients can be compared.
            torch.manual_seed(args.seed + step)
            times[id(model)] = _forward_backward(model, batch)
        if step >= args.fused_warmup:
            per_layer_ms.append(times[id(per_layer)])
            fused_ms.append(times[id(fused_model)])
    grad_diff = max(
        (a - b).abs().max().item()
        for a, b in zip(_gradients(per_layer), _gradients(fused_model), strict=True)
    )
    return FusedCase(input_kind, layers, hidden, per_layer_ms, fused_ms, grad_diff)


def run_fused_section(args: argparse.Namespace) -> list[FusedCase]:
    """Every configuration of the fused-vs-per-layer section; prints its table."""
    inputs: tuple[InputKind, ...] = ("tokens", "features")
    print(
        f"\nFused nn.LSTM(num_layers=N) vs per-layer stack: forward + backward of a training "
        f"step, batch {args.batch}, {args.bptt} steps, dropout {FUSED_DROPOUT}; "
        f"{args.fused_steps} timed pairs after {args.fused_warmup} warm-up; "
        f"{args.threads} thread(s); torch {torch.__version__}, "
        f"oneDNN {torch.backends.mkldnn.is_available()}"  # type: ignore[no-untyped-call]
    )
    print(
        f"{'input':>8} {'layers':>6} {'hidden':>6} | {'CPU ms/step':^21} {'ratio':>6} "
        f"{'best':>6} | {'wall ratio':>10} | {'max |grad diff|':>15}"
    )
    print(f"{'':>22} | {'per-layer':>10} {'fused':>10} {'':>6} {'':>6} |")
    cases = []
    for input_kind, hidden, layers in itertools.product(inputs, FUSED_HIDDEN, FUSED_LAYERS):
        case = run_fused_case(args, input_kind, layers, hidden)
        cases.append(case)
        print(
            f"{input_kind:>8} {layers:>6} {hidden:>6} | {case.ms('cpu', False):>10.1f} "
            f"{case.ms('cpu', True):>10.1f} {case.ratio('cpu'):>6.3f} "
            f"{case.best_ratio('cpu'):>6.3f} | "
            f"{case.ratio('wall'):>10.3f} | {case.max_grad_diff:>15.2e}"
        )
    print(
        "ratio: fused / per-layer, the median of per-pair ratios (< 1: fused is faster); "
        "best: the ratio of each form's fastest step"
    )
    return cases


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the table; exit status 1 when the ratio misses the target."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--bptt", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of a run")
    parser.add_argument("--reps", type=int, default=7, help="runs (repetitions)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", choices=["paired", "runs"], default="paired")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--stat", choices=["median", "mean"], default="median")
    parser.add_argument("--profile", action="store_true", help="cProfile one Lightning run")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--only",
        choices=["overhead", "fused"],
        default=None,
        help="run one section: Lightning's overhead, or the fused vs per-layer stack",
    )
    parser.add_argument("--fused-steps", type=int, default=5, help="timed pairs per config")
    parser.add_argument("--fused-warmup", type=int, default=1, help="untimed pairs per config")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or args.reps < 1:
        parser.error("--steps, --warmup and --reps must be >= 1")
    if args.fused_steps < 1 or args.fused_warmup < 0:
        parser.error("--fused-steps must be >= 1 and --fused-warmup >= 0")

    torch.set_num_threads(args.threads)
    if args.only == "fused":
        run_fused_section(args)
        return 0
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers")
    batches = _make_batches(args)

    rows = run_reps(args, batches)
    summary = _summarise(args, rows)
    _print_table(args, rows, summary)
    ratio: float = summary[f"{args.clock}_ratio"]
    verdict = "PASS" if ratio <= TARGET_RATIO else "FAIL"
    print(f"target: ratio <= {TARGET_RATIO} on the {args.clock} clock: {ratio:.3f} {verdict}")
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2))
    if args.profile:
        _profile_lightning(args, batches)
    if args.only is None:
        run_fused_section(args)
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    raise SystemExit(main())
