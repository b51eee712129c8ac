"""DEQ-Transformer LM vs fairseq's transformer_lm of comparable size: training tokens/s, memory, NFE.

    python -m bench.fairseq_lm [--device cuda] [--sizes tiny wt103] [--steps 20] [--dtype float16]
    python -m bench.fairseq_lm --solve-modes     # the causal solve against the joint one
    python -m bench.fairseq_lm --generation      # incremental decoding against full recompute
    python -m bench.fairseq_lm --flops [--forced-steps 6] [--baseline transformer_lm_wiki103]

Both models train (forward, backward, Adam step) on the same random batches of the same tokens per
batch, timed step by step alternately in one run; the ratios are what to read. The DEQ model
runs its solver phase (no pretraining) with JR at the architecture's frequency (0.35, the
paper's), its segment memory filled from the previous step, and its forward limit's random
reduction. The baseline has the same embedding/softmax, width and heads and as many parameters
outside the embeddings (its FFN width is chosen to match), without memory. Memory: peak CUDA
allocation per step on GPUs, and on every device the activations autograd saves for backward
(distinct storages other than parameters, so the weight-normalized weights of the DEQ count).

``--flops``: the FLOPs of one update as ``torch.utils.flop_counter`` counts them (see
:mod:`bench._flops` for what counts), with JR off and the DEQ held at exactly its training limits
and at every ``--forced-steps`` k/k; FLOP, time and time-per-FLOP ratios to the baseline, all rows
timed interleaved (:func:`flop_comparison`).
"""
from __future__ import annotations

import argparse
import functools
import math
import statistics
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from fairseq import options, utils
from fairseq.data import Dictionary
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.tasks.language_modeling import LanguageModelingTask

import fairseq_deq
from bench._flops import FORCED_STEPS, FlopRow, FlopRun, compare_flops, deq_runs, flop_table
from bench._memory import saved_activation_bytes
from bench._run import add_device_args, describe, device_from, sync

USER_DIR = fairseq_deq.__path__[0]

SIZES = {
    # name: (DEQ arch, vocabulary, segment length, batch per device on cpu / cuda, baseline layers, extra flags)
    "tiny": ("deq_transformer_lm_tiny", 10000, 64, (16, 56), 2, ()),
    "wt103": ("deq_transformer_lm_wt103", 267735, 150, (1, 14), 12,
              ("--criterion", "adaptive_loss_jr", "--ddp-backend", "legacy_ddp")),
}


def _config(flags: List[str]):
    args = options.parse_args_and_arch(options.get_training_parser(), ["-", "--user-dir", USER_DIR, *flags])
    return convert_namespace_to_omegaconf(args)


def _non_embedding_params(model: torch.nn.Module) -> int:
    emb = {id(p) for p in model.decoder.embed_tokens.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in emb)


def build_pair(size: str, device: torch.device, dtype: torch.dtype, baseline: Optional[str] = None):
    """``([("deq", model, criterion), ("base", model, criterion)], segment length, vocabulary,
    baseline label)``. The baseline is a transformer_lm of the DEQ's width with as many
    parameters outside the embeddings, or, when ``baseline`` names a fairseq LM architecture
    (e.g. ``transformer_lm_wiki103``), that architecture as fairseq defines it."""
    arch, vocab, seg, _, layers, extra = SIZES[size]
    common = ["--task", "language_modeling", "--tokens-per-sample", str(seg), "--cpu"]
    task, deq_cfg, deq = build_deq(size, common)
    if baseline is None:
        base_cfg, label = _matched_baseline(deq_cfg, deq, common, layers), f"transformer_lm ({layers} layers)"
    else:
        base_cfg, label = _named_baseline(baseline, common), baseline
    base = task.build_model(base_cfg.model)
    pairs = []
    for name, cfg, model in (("deq", deq_cfg, deq), ("base", base_cfg, base)):
        model = model.to(device=device, dtype=dtype).train()
        pairs.append((name, model, task.build_criterion(cfg.criterion)))
    return pairs, seg, vocab, label


def build_deq(size: str, common: List[str]):
    """(task, config, model) of the DEQ architecture of ``SIZES[size]`` on a dummy vocabulary,
    built from the fairseq-train flags ``common`` (task, segment length, device)."""
    arch, vocab, _, _, _, extra = SIZES[size]
    dictionary = Dictionary()
    for i in range(vocab - len(dictionary)):
        dictionary.add_symbol(f"w{i}")
    deq_cfg = _config([*common, "--arch", arch, "--pretrain-steps", "0",
                       *(extra or ("--criterion", "cross_entropy_jr"))])
    task = LanguageModelingTask(deq_cfg.task, dictionary)
    return task, deq_cfg, task.build_model(deq_cfg.model)


def _matched_baseline(deq_cfg, deq: torch.nn.Module, common: List[str], layers: int):
    return _config([*common, *matched_baseline_flags(deq_cfg, deq, layers)])


def matched_baseline_flags(deq_cfg, deq: torch.nn.Module, layers: int) -> List[str]:
    """fairseq-train flags of a ``layers``-layer transformer_lm with the DEQ's width, heads,
    dropout and embedding/softmax, and as many parameters outside the embeddings (its FFN width
    is chosen to match)."""
    m = deq_cfg.model
    shape = ["--arch", "transformer_lm", "--decoder-embed-dim", str(m.decoder_embed_dim),
             "--decoder-input-dim", str(m.decoder_embed_dim), "--decoder-output-dim", str(m.decoder_embed_dim),
             "--decoder-attention-heads", str(m.decoder_attention_heads), "--decoder-layers", str(layers),
             "--dropout", str(m.dropout)]
    if m.adaptive_input:
        shape += ["--adaptive-input", "--adaptive-input-cutoff", m.adaptive_input_cutoff,
                  "--adaptive-softmax-cutoff", m.adaptive_softmax_cutoff, "--tie-adaptive-weights",
                  "--tie-adaptive-proj", "--criterion", "adaptive_loss", "--ddp-backend", "legacy_ddp"]
    else:
        shape += ["--share-decoder-input-output-embed", "--criterion", "cross_entropy"]
    d = m.decoder_embed_dim
    per_layer = 4 * d * d + 4 * d + 4 * d + d    # attention + its biases, two LayerNorms, FFN out bias
    ffn = max(1, round((_non_embedding_params(deq) / layers - per_layer) / (2 * d + 1)))
    return shape + ["--decoder-ffn-embed-dim", str(ffn)]


def baseline_flags(size: str) -> List[str]:
    """:func:`matched_baseline_flags` for the DEQ architecture of ``SIZES[size]`` (on CPU)."""
    seg, layers = SIZES[size][2], SIZES[size][4]
    _, deq_cfg, deq = build_deq(size, ["--task", "language_modeling", "--tokens-per-sample", str(seg), "--cpu"])
    return matched_baseline_flags(deq_cfg, deq, layers)


def _named_baseline(arch: str, common: List[str]):
    """fairseq's own architecture ``arch``, with adaptive_loss when it has an adaptive softmax."""
    cfg = _config([*common, "--arch", arch, "--criterion", "cross_entropy"])
    if cfg.model.adaptive_softmax_cutoff:
        cfg = _config([*common, "--arch", arch, "--criterion", "adaptive_loss", "--ddp-backend", "legacy_ddp"])
    return cfg


class _Counter:
    """Counts evaluations of the DEQ layer's f."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        module.register_forward_hook(self._hook)

    def _hook(self, *_) -> None:
        self.calls += 1


def lm_sample(batch: int, seg: int, vocab: int, step: int, device: torch.device) -> Dict:
    """Random tokens as fairseq's LM collater lays them out, continuing stream "train" at ``step``."""
    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(4, vocab, (batch, seg + 1), generator=g)
    sample = {"id": torch.arange(batch), "nsentences": batch, "ntokens": batch * seg,
              "net_input": {"src_tokens": tokens[:, :-1].contiguous(), "src_lengths": torch.full((batch,), seg),
                            "mem_key": "train", "mem_segment": step},
              "target": tokens[:, 1:].contiguous()}
    return utils.apply_to_sample(lambda t: t.to(device), sample)


def _train_step(name: str, model, criterion, optimizer, sample: Dict, step: int,
                count_saved: bool = True) -> Tuple[Dict, int]:
    """One update; returns the logging output and the activation bytes autograd saved for
    backward (distinct storages that are not parameters; 0 unless ``count_saved``)."""
    model.set_num_updates(step)
    net_input = sample["net_input"] if name == "deq" else {
        k: v for k, v in sample["net_input"].items() if not k.startswith("mem_")}

    def forward():
        return criterion(model, dict(sample, net_input=net_input))

    (loss, _, log), saved = saved_activation_bytes(forward, model.parameters()) if count_saved else (forward(), 0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return log, saved


@dataclass
class PairCost:
    """Training cost of the DEQ model ("deq") and its baseline ("base") over the timed updates; the
    DEQ's mean solver steps, evaluations of f and (forward, backward) solver limits; whether every
    loss was finite."""

    label: str
    batch: int
    seg: int
    tokens_per_s: Dict[str, float]
    params: Dict[str, Tuple[int, int]]
    saved: Dict[str, int]
    peak: Dict[str, int]
    f_steps: float
    b_steps: float
    f_evals: float
    jr_updates: int
    updates: int
    limits: Tuple[int, int]
    finite: bool


def train_pair(size: str, device: torch.device, dtype: torch.dtype, steps: int,
               baseline: Optional[str] = None) -> PairCost:
    """Train both models of :func:`build_pair` for 2 warm-up and ``steps`` timed updates, alternately."""
    pairs, seg, vocab, label = build_pair(size, device, dtype, baseline)
    batch = SIZES[size][3][device.type == "cuda"]
    counter = _Counter(pairs[0][1].decoder.deq.f)
    optims = {name: torch.optim.Adam(model.parameters(), lr=1e-4, eps=1e-4) for name, model, _ in pairs}
    times: Dict[str, List[float]] = {name: [] for name, _, _ in pairs}
    peak: Dict[str, int] = {name: 0 for name, _, _ in pairs}
    saved: Dict[str, int] = {name: 0 for name, _, _ in pairs}
    deq_logs = []
    finite = True
    for step in range(-2, steps):              # two warm-up steps
        sample = lm_sample(batch, seg, vocab, step + 2, device)
        for name, model, criterion in pairs:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            counter.calls = 0
            t0 = time.perf_counter()
            log, saved_bytes = _train_step(name, model, criterion, optims[name], sample, step + 2)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device))
            finite = finite and math.isfinite(float(log["loss"]))
            if step < 0:
                continue
            times[name].append(time.perf_counter() - t0)
            saved[name] = max(saved[name], saved_bytes)
            if name == "deq":
                deq_logs.append((counter.calls, {k: float(v) for k, v in log.items() if k.startswith("deq_")}))
    return PairCost(
        label=label, batch=batch, seg=seg,
        tokens_per_s={name: batch * seg * len(t) / sum(t) for name, t in times.items()},
        params={name: (sum(p.numel() for p in m.parameters()), _non_embedding_params(m)) for name, m, _ in pairs},
        saved=saved, peak=peak,
        f_steps=statistics.mean(log["deq_f_steps"] for _, log in deq_logs),
        b_steps=statistics.mean(log.get("deq_b_steps", 0.0) for _, log in deq_logs),
        f_evals=statistics.mean(calls for calls, _ in deq_logs),
        jr_updates=sum(1 for _, log in deq_logs if "deq_jr" in log), updates=len(deq_logs),
        limits=(pairs[0][1].decoder.deq.config.f_max_iter, pairs[0][1].decoder.deq.config.b_max_iter), finite=finite)


def rows(cost: PairCost, size: str) -> List[str]:
    """Markdown rows (measurement | result) of one :func:`train_pair` run."""
    c, base = cost, cost.label
    label = f"{size}, {c.batch}x{c.seg} tokens"
    tps, saved, peak, params = c.tokens_per_s, c.saved, c.peak, c.params
    out = [
        f"| parameters (all / outside embeddings), {label} | DEQ {params['deq'][0] / 1e6:.2f}M / "
        f"{params['deq'][1] / 1e6:.2f}M, {base} {params['base'][0] / 1e6:.2f}M / {params['base'][1] / 1e6:.2f}M |",
        f"| training tokens/s, {label} | DEQ {tps['deq']:.0f}, {base} {tps['base']:.0f}: "
        f"DEQ / baseline = {tps['deq'] / tps['base']:.2f}x (time per token {tps['base'] / tps['deq']:.2f}x) |",
        f"| NFE per update, {label} | {c.f_steps:.2f} forward solver steps, {c.b_steps:.2f} backward solver steps; "
        f"{c.f_evals:.2f} evaluations of f in all; JR in {c.jr_updates}/{c.updates} updates |",
        f"| activations saved for backward per update, {label} | DEQ {saved['deq'] / 2**20:.1f} MiB, {base} "
        f"{saved['base'] / 2**20:.1f} MiB: ratio {saved['deq'] / saved['base']:.2f} |",
    ]
    if peak["deq"] > 0:
        out.append(f"| peak CUDA memory per update, {label} | DEQ {peak['deq'] / 2**30:.2f} GiB, {base} "
                   f"{peak['base'] / 2**30:.2f} GiB: ratio {peak['deq'] / peak['base']:.2f} |")
    return out


def measure(size: str, device: torch.device, dtype: torch.dtype, steps: int) -> List[str]:
    """:func:`rows` of :func:`train_pair` against the parameter-matched transformer_lm."""
    return rows(train_pair(size, device, dtype, steps), size)


def flop_comparison(size: str, device: torch.device, dtype: torch.dtype, steps: int,
                    forced: Sequence[int] = FORCED_STEPS, baseline: Optional[str] = None) -> List[FlopRow]:
    """FLOPs and time of an update of the DEQ model of ``size``, at its training limits (its
    ``f_max_iter`` / ``b_max_iter``) and at k/k solver steps for every k of ``forced``, held there
    by :func:`bench._flops.forced_steps` (JR off), and of the baseline of :func:`build_pair`.

    Every row's FLOPs are counted over one whole update (forward solve, the differentiable call of
    f, backward solve, parameter gradients, Adam step) by FlopCounterMode, with the segment
    memory filled as in training; its time is the median of ``steps`` updates timed interleaved
    with every other row's (after one warm-up each), on random batches of the same size.

    Args:
        size: a key of :data:`SIZES`.
        device: where to train.
        dtype: the precision of the whole models.
        steps: timed updates per row.
        forced: solver steps (forward and backward) to hold the DEQ model at, beside its limits.
        baseline: as for :func:`build_pair`.

    Returns:
        one :class:`~bench._flops.FlopRow` per setting: the DEQ rows, then the baseline.
    """
    pairs, seg, vocab, label = build_pair(size, device, dtype, baseline)
    batch = SIZES[size][3][device.type == "cuda"]
    arch = SIZES[size][0]
    (_, deq, deq_criterion), (_, base, base_criterion) = pairs
    optims = {name: torch.optim.Adam(model.parameters(), lr=1e-4, eps=1e-4) for name, model, _ in pairs}
    updates = {"deq": 0, "base": 0}      # one stream per model: the DEQ's memory continues across rows

    def step(name: str, model, criterion) -> None:
        sample = lm_sample(batch, seg, vocab, updates[name], device)
        _train_step(name, model, criterion, optims[name], sample, updates[name], count_saved=False)
        updates[name] += 1

    runs = deq_runs(arch, functools.partial(step, "deq", deq, deq_criterion), [deq.decoder.deq], forced)
    runs[label] = FlopRun(functools.partial(step, "base", base, base_criterion))
    return compare_flops(runs, steps, device)


SOLVE_MODES = {"causal (sample_dims=2)": "2", "joint (sample_dims=1)": "1"}


def _max_leak(model, tokens: torch.Tensor, positions: List[int]) -> float:
    """The largest change of an earlier position's log-probabilities when one token changes."""
    def log_probs(t):
        with torch.no_grad():
            return torch.log_softmax(model(t)[0].double(), dim=-1)

    base, leak = log_probs(tokens), 0.0
    for t in positions:
        changed = tokens.clone()
        changed[:, t] = 4 + (changed[:, t] + 7) % (model.decoder.dictionary.__len__() - 4)
        leak = max(leak, float((log_probs(changed)[:, :t] - base[:, :t]).abs().max()))
    return leak


def solve_modes(size: str, device: torch.device, steps: int) -> List[str]:
    """Training cost of the causal solve (every position its own solver sample) against the joint
    one (one sample per sequence) from the same initial model, timed alternately, and each mode's
    largest leak: the change of earlier positions' log-probabilities when a later token changes."""
    _, vocab, seg, batches, _, _ = SIZES[size]
    batch = batches[device.type == "cuda"]
    common = ["--task", "language_modeling", "--tokens-per-sample", str(seg), "--cpu"]
    runs = {}
    for mode, dims in SOLVE_MODES.items():
        torch.manual_seed(0)
        task, cfg, model = build_deq(size, [*common, "--sample-dims", dims])
        model = model.to(device)
        runs[mode] = (model, task.build_criterion(cfg.criterion), _Counter(model.decoder.deq.f),
                      torch.optim.Adam(model.parameters(), lr=1e-4, eps=1e-4))
    times: Dict[str, List[float]] = {m: [] for m in runs}
    evals: Dict[str, List[int]] = {m: [] for m in runs}
    f_steps: Dict[str, List[float]] = {m: [] for m in runs}
    for step in range(-2, steps):
        sample = lm_sample(batch, seg, vocab, step + 2, device)
        for mode, (model, criterion, counter, optim) in runs.items():
            model.train()
            counter.calls = 0
            sync(device)
            t0 = time.perf_counter()
            log, _ = _train_step("deq", model, criterion, optim, sample, step + 2)
            sync(device)
            if step >= 0:
                times[mode].append(time.perf_counter() - t0)
                evals[mode].append(counter.calls)
                f_steps[mode].append(float(log["deq_f_steps"]))
    tokens = torch.randint(4, vocab, (2, seg), generator=torch.Generator().manual_seed(1)).to(device)
    out = []
    base = None
    for mode, (model, _, _, _) in runs.items():
        model.eval()
        tps = batch * seg * len(times[mode]) / sum(times[mode])
        base = base or tps
        leak = _max_leak(model, tokens, list(range(8, seg, 8)))
        out.append(f"| {mode}, {size}, {batch}x{seg} tokens | {tps:.0f} tokens/s ({tps / base:.2f}x), "
                   f"{statistics.mean(f_steps[mode]):.2f} forward steps per sample, "
                   f"{statistics.mean(evals[mode]):.2f} evaluations of f per update; largest leak to earlier "
                   f"positions after training {leak:.2e} nats |")
    return out


def generation(size: str, device: torch.device, prefixes: Tuple[int, ...] = (150, 600), tokens: int = 8) -> List[str]:
    """Milliseconds per generated token after a prefix: incremental decoding (the new position
    solved against the cached fixed points) against recomputing the whole sequence every step."""
    _, vocab, seg, _, _, _ = SIZES[size]
    torch.manual_seed(0)
    _, _, model = build_deq(size, ["--task", "language_modeling", "--tokens-per-sample", str(seg), "--cpu"])
    model = model.to(device).eval()
    out = []
    for prefix in prefixes:
        seq = torch.randint(4, vocab, (1, prefix + tokens), generator=torch.Generator().manual_seed(prefix)).to(device)
        timings = {}
        with torch.no_grad():
            state: Dict = {}
            model(seq[:, :prefix], incremental_state=state)   # the prefix, cached
            sync(device)
            t0 = time.perf_counter()
            for t in range(prefix, prefix + tokens):
                model(seq[:, : t + 1], incremental_state=state)
            sync(device)
            timings["incremental"] = (time.perf_counter() - t0) / tokens
            t0 = time.perf_counter()
            for t in range(prefix, prefix + tokens):
                model(seq[:, : t + 1])
            sync(device)
            timings["full recompute"] = (time.perf_counter() - t0) / tokens
        out.append(f"| generation after a {prefix}-token prefix, {size} | incremental "
                   f"{timings['incremental'] * 1e3:.1f} ms/token, full recompute {timings['full recompute'] * 1e3:.1f} "
                   f"ms/token ({timings['full recompute'] / timings['incremental']:.1f}x) |")
    return out


def main(argv=None) -> None:
    parser = add_device_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=None,
                        help="default: tiny on CPU, tiny and wt103 on CUDA")
    parser.add_argument("--steps", type=int, default=20, help="timed updates per model (after 2 warm-up ones)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="precision of the whole model (float16 is what fairseq's --fp16 does)")
    parser.add_argument("--solve-modes", action="store_true",
                        help="instead: the causal solve against the joint one (training cost, leak)")
    parser.add_argument("--generation", action="store_true",
                        help="instead: ms per generated token, incremental against full recompute")
    parser.add_argument("--flops", action="store_true",
                        help="instead: FLOPs per update (FlopCounterMode), FLOP, time and time-per-FLOP ratios "
                             "to the baseline, the DEQ at its training limits and at --forced-steps (JR off)")
    parser.add_argument("--forced-steps", type=int, nargs="+", default=list(FORCED_STEPS), metavar="K",
                        help="with --flops: also hold the DEQ at exactly K forward and K backward solver steps")
    parser.add_argument("--baseline", default=None, metavar="ARCH",
                        help="with --flops: a fairseq LM architecture as the baseline (default: the "
                             "transformer_lm of the DEQ's width with as many parameters outside the embeddings)")
    args = parser.parse_args(argv)
    device = device_from(args)
    sizes = args.sizes or (["tiny", "wt103"] if device.type == "cuda" else ["tiny"])
    torch.manual_seed(0)
    print(f"{describe(device)}, {args.dtype}, {args.steps} timed updates per model")
    if args.flops:
        for size in sizes:
            rows = flop_comparison(size, device, getattr(torch, args.dtype), args.steps, args.forced_steps,
                                   args.baseline)
            batch, seg = SIZES[size][3][device.type == "cuda"], SIZES[size][2]
            print(f"\n{size}: {batch} x {seg} tokens per update")
            print("\n".join(flop_table(rows, [rows[-1].label])))
        return
    print("| measurement | result |")
    print("|---|---|")
    if args.solve_modes or args.generation:
        for size in sizes:
            for row in (solve_modes(size, device, args.steps) if args.solve_modes else generation(size, device)):
                print(row, flush=True)
        return
    for size in sizes:
        for row in measure(size, device, getattr(torch, args.dtype), args.steps):
            print(row, flush=True)


if __name__ == "__main__":
    main()
