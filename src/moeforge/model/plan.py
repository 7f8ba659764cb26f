"""A training plan for a :class:`ModelConfig` on a GPU cluster: the parallel layout, memory per GPU,
communication per step, step time, tokens/s and days for a token budget.

Everything is closed-form and built on :mod:`moeforge.model.sizing` (exact parameters, FLOPs/token,
saved activations). Every number the model assumes is a field of :class:`Assumptions`, and the method is
spelled out in :data:`METHOD`; both are printed with each plan (``moeforge model plan``, docs/SCALING.md).

Layout: ``TP × EP × PP × DP = gpus``, ranks ordered TP (innermost, within a node), EP, DP, PP. EP is
carved out of data parallelism (as in Megatron-Core and DeepSpeed-MoE): the ``EP × DP`` replicas of the
dense part each take their share of the batch, while routed experts are sharded over EP and replicated
DP times. Routed experts are tensor-parallel like every other matmul.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

from moeforge.model.config import ModelConfig
from moeforge.model.sizing import GPU_USABLE, count_params, flops_per_token, memory_estimate

__all__ = [
    "MEANING",
    "METHOD",
    "Assumptions",
    "Comms",
    "Layout",
    "Plan",
    "PlanMemory",
    "candidate_layouts",
    "evaluate",
    "plan",
]

BF16 = 2  # bytes of a bf16 element: weights, gradients, activations and all-to-all payloads


@dataclass(frozen=True)
class Assumptions:
    """What a plan assumes; every field appears in the plan's output, with its meaning from :data:`MEANING`."""

    gpu: str = "H100 SXM 80 GB"
    gpu_memory_gb: float = 80.0
    usable_fraction: float = GPU_USABLE
    peak_tflops: float = 989.0
    mfu: float = 0.40
    gpus_per_node: int = 8
    nvlink_gbytes: float = 450.0
    nic_gbits: float = 400.0
    link_efficiency: float = 0.8
    global_batch_tokens: float = 16e6
    seq_len: int | None = None
    micro_batch: int = 1
    train_tokens: float = 1e12
    a2a_overlap: float = 0.0
    tp_overlap: float = 0.0
    dp_overlap: float = 1.0

    def describe(self) -> list[tuple[str, str, str]]:
        """(name, value, meaning) for every field."""
        return [(f.name, _fmt(getattr(self, f.name)), MEANING[f.name]) for f in fields(self)]


MEANING = {
    "gpu": "GPU model",
    "gpu_memory_gb": "memory per GPU, GB",
    "usable_fraction": "share of GPU memory a plan may fill (the rest: fragmentation, NCCL buffers, workspace)",
    "peak_tflops": "dense bf16 peak per GPU, TFLOP/s",
    "mfu": "share of peak the kernels reach while computing; the pipeline bubble and exposed communication "
    "come on top, so the end-to-end (effective) MFU is lower",
    "gpus_per_node": "GPUs per node (one NVLink domain)",
    "nvlink_gbytes": "NVLink per GPU per direction, GB/s (H100: 900 GB/s both directions together)",
    "nic_gbits": "inter-node bandwidth per GPU per direction, Gb/s (8 × 400G NICs per node)",
    "link_efficiency": "share of link bandwidth the collectives achieve",
    "global_batch_tokens": "global batch, tokens (rounded to a power-of-two number of sequences)",
    "seq_len": "sequence length (None: the model's max_seq_len)",
    "micro_batch": "sequences per micro-batch",
    "train_tokens": "tokens of the whole run",
    "a2a_overlap": "share of the expert all-to-all time hidden behind compute",
    "tp_overlap": "share of the tensor-parallel collective time hidden behind compute",
    "dp_overlap": "share of the backward pass the gradient reduce-scatter/all-gather can hide behind",
}


METHOD = [
    "Layout: TP × EP × PP × DP = GPUs, ranks ordered TP (inside a node), EP, DP, PP. TP divides heads, "
    "kv heads, d_model, every MLP width and the vocabulary, and is at most GPUs per node; EP divides the "
    "routed experts; PP divides the layers (stages are even; embeddings and head are spread over them); "
    "EP × DP replicas of the dense part split the global batch, each into micro-batches. Every layout and "
    "both recompute modes are evaluated; the plan is the fastest step that fits in memory.",
    "Memory per GPU (ZeRO-1): bf16 weights and bf16 gradients of the GPU's shard (dense part ÷ TP·PP, "
    "routed experts ÷ TP·EP·PP) + 12 bytes/parameter of fp32 master weights and Adam moments, sharded "
    "over the data-parallel ranks that hold the same shard (dense: EP·DP, experts: DP).",
    "Activations (1F1B, sequence parallel): the first stage keeps min(PP, micro-batches) micro-batches in "
    "flight, layers/PP layers each, every tensor ÷ TP. Selective recompute keeps the tensors sizing.py "
    "counts (flash attention: no score matrix); full recompute keeps each layer's input plus one layer's "
    "working set and adds a forward pass (compute × 4/3). Plus fp32 logits ÷ TP on every stage "
    "(conservative). Routing is assumed balanced.",
    "Expert all-to-all per GPU per step: tokens per GPU (global batch ÷ EP·DP·TP) × top_k × d_model × 2 bytes "
    "× 2 (dispatch + combine) × 2 (forward + backward; 3 with full recompute) × MoE layers per stage. The "
    "share (EP−1)/EP leaves the GPU: to peers in other nodes over the NICs, to peers in the node over "
    "NVLink, concurrently (time = the slower).",
    "TP collectives per GPU per step (sequence parallel: all-gather + reduce-scatter = one all-reduce, "
    "2(TP−1)/TP × message): per layer one for attention, one for the dense MLP or shared expert, top_k for "
    "the routed experts; message = tokens per replica × d_model × 2 bytes; forward and backward (and the "
    "recomputed forward); over NVLink.",
    "DP gradients (ZeRO-1 reduce-scatter + parameter all-gather = one all-reduce): 2(n−1)/n × bf16 "
    "gradients of the shard, n = EP·DP for the dense part and DP for experts; over the NICs when the group "
    "spans nodes. PP: each micro-batch sends its activations (÷ TP) forward and their gradients back.",
    "Step time = (compute + exposed TP + exposed all-to-all + PP sends) × (m + PP − 1) / m + exposed DP, "
    "m = micro-batches per replica (bubble (PP−1)/(m+PP−1)); compute = training FLOPs/token (sizing.py) × "
    "batch tokens ÷ (GPUs × peak × MFU); exposed = time × (1 − overlap), DP: time − overlap × backward "
    "time, at least 0.",
]


@dataclass(frozen=True)
class Layout:
    tp: int
    ep: int
    pp: int
    dp: int
    recompute: str  # "selective" or "full"

    @property
    def gpus(self) -> int:
        return self.tp * self.ep * self.pp * self.dp

    def __str__(self) -> str:
        return f"TP{self.tp} × EP{self.ep} × PP{self.pp} × DP{self.dp} ({self.recompute} recompute)"


@dataclass(frozen=True)
class PlanMemory:
    """Bytes per GPU (the fullest stage)."""

    weights: float
    grads: float
    optimizer: float
    activations: float
    total: float
    budget: float


@dataclass(frozen=True)
class Comms:
    """Bytes each GPU sends per step, seconds on its links, and the seconds left exposed."""

    a2a_bytes: float
    a2a_seconds: float
    a2a_exposed: float
    a2a_links: str
    tp_bytes: float
    tp_seconds: float
    tp_exposed: float
    dp_bytes: float
    dp_seconds: float
    dp_exposed: float
    dp_links: str
    pp_bytes: float
    pp_seconds: float


@dataclass(frozen=True)
class Plan:
    model: str
    gpus: int
    layout: Layout
    sequences: int
    batch_tokens: int
    seq_len: int
    microbatches: int
    bubble: float
    memory: PlanMemory
    comms: Comms
    flops_per_token: float
    compute_seconds: float
    step_seconds: float
    tokens_per_second: float
    effective_mfu: float
    days: float
    fits: bool
    assumptions: Assumptions
    alternatives: list[Plan] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["layout"]["gpus"] = self.layout.gpus
        d["alternatives"] = [
            {**asdict(a.layout), "step_seconds": a.step_seconds, "memory_total": a.memory.total}
            for a in self.alternatives
        ]
        return d


def _fmt(v: object) -> str:
    if isinstance(v, float) and v >= 1e6 and v.is_integer():
        return f"{v:,.0f}"
    return str(v)


def _sequences(a: Assumptions, seq_len: int) -> int:
    return 2 ** max(0, round(math.log2(max(a.global_batch_tokens / seq_len, 1.0))))


def _tp_ok(cfg: ModelConfig, tp: int) -> bool:
    widths = [cfg.n_heads, cfg.kv_heads, cfg.d_model, cfg.vocab_size]
    if len(cfg.moe_layer_indices) < cfg.n_layers:
        widths.append(cfg.ffn_hidden)
    if cfg.moe is not None:
        widths += [cfg.moe.expert_hidden, cfg.moe.shared_expert_hidden or tp]
    return all(w % tp == 0 for w in widths)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def evaluate(cfg: ModelConfig, layout: Layout, a: Assumptions | None = None) -> Plan:
    """The plan of ``cfg`` on ``layout.gpus`` GPUs with this layout (``fits`` says whether memory allows)."""
    a = a or Assumptions()
    tp, ep, pp, dp = layout.tp, layout.ep, layout.pp, layout.dp
    gpus, s, full = layout.gpus, a.seq_len or cfg.max_seq_len, layout.recompute == "full"
    if layout.recompute not in ("selective", "full"):
        raise ValueError(f"recompute must be 'selective' or 'full' (got {layout.recompute!r})")
    if not _tp_ok(cfg, tp) or cfg.n_layers % pp or (ep > 1 and (cfg.moe is None or cfg.moe.num_experts % ep)):
        raise ValueError(
            f"{layout}: TP must divide the heads and widths, PP n_layers={cfg.n_layers}, EP the routed experts"
        )
    seqs = _sequences(a, s)
    replicas = ep * dp
    if seqs % (replicas * a.micro_batch):
        raise ValueError(
            f"{layout}: {seqs} sequences per step do not split into micro-batches of {a.micro_batch} "
            f"over EP·DP = {replicas} replicas"
        )
    m = seqs // (replicas * a.micro_batch)
    batch = seqs * s
    p = count_params(cfg)
    n_moe = len(cfg.moe_layer_indices)
    k = cfg.moe.top_k if cfg.moe is not None else 0
    d = cfg.d_model
    node = min(a.gpus_per_node, gpus)
    nvlink = a.nvlink_gbytes * 1e9 * a.link_efficiency
    nic = a.nic_gbits / 8 * 1e9 * a.link_efficiency

    # memory: ZeRO-1 states of this GPU's shard, activations of the first stage
    dense_local = (p.total - p.experts) / (tp * pp)
    expert_local = p.experts / (tp * ep * pp)
    weights = BF16 * (dense_local + expert_local)
    grads = BF16 * (dense_local + expert_local)
    optimizer = 12 * (dense_local / replicas + expert_local / dp)
    mem = memory_estimate(cfg, a.micro_batch, s, "bfloat16")
    t_mb = a.micro_batch * s
    logits = t_mb * cfg.vocab_size * 4
    in_flight = min(pp, m)
    if full:
        layer_inputs = t_mb * BF16 * d * cfg.n_layers
        working = mem.activations_checkpointed - logits - layer_inputs
        acts = layer_inputs / pp * in_flight + working
    else:
        acts = (mem.activations - logits) / pp * in_flight
    acts = (acts + logits) / tp
    total = weights + grads + optimizer + acts
    memory = PlanMemory(
        weights=weights,
        grads=grads,
        optimizer=optimizer,
        activations=acts,
        total=total,
        budget=a.gpu_memory_gb * 1e9 * a.usable_fraction,
    )

    # compute
    flops = flops_per_token(cfg, s)["training"]
    compute = flops * (4 / 3 if full else 1) * batch / (gpus * a.peak_tflops * 1e12 * a.mfu)
    passes = 3 if full else 2

    # expert all-to-all: EP peers are TP apart; those in this node over NVLink, the rest over the NICs
    a2a = a2a_t = 0.0
    a2a_links = "none (EP = 1)"
    if ep > 1:
        tokens_gpu = batch / (replicas * tp)
        a2a = tokens_gpu * k * d * BF16 * 2 * passes * n_moe / pp
        in_node = min(ep, max(1, node // tp))
        inter, intra = a2a * (ep - in_node) / ep, a2a * (in_node - 1) / ep
        a2a_t = max(inter / nic, intra / nvlink)
        a2a_links = "NVLink" if in_node == ep else f"NICs ({ep - in_node} of {ep - 1} peers in other nodes)"

    # tensor parallel (sequence parallel) collectives, inside the node
    tp_bytes = 0.0
    if tp > 1:
        pairs = 0
        for i in range(cfg.n_layers):
            moe_layer = cfg.is_moe_layer(i)
            shared = moe_layer and cfg.moe is not None and cfg.moe.num_shared_experts > 0
            pairs += 1 + (1 if (not moe_layer or shared) else 0) + (k if moe_layer else 0)
        tp_bytes = passes * pairs / pp * 2 * (tp - 1) / tp * (batch / replicas) * d * BF16
    tp_t = tp_bytes / nvlink

    # data-parallel gradient reduce-scatter + all-gather (one all-reduce of bf16 gradients)
    dp_bytes = 2 * (replicas - 1) / replicas * BF16 * dense_local + 2 * (dp - 1) / dp * BF16 * expert_local
    spans = tp * ep * dp > node
    dp_t = dp_bytes / (nic if spans else nvlink)
    dp_links = "NICs" if spans else "NVLink"
    backward = compute * ((3 / 4) if full else (2 / 3))

    # pipeline sends: activations forward, their gradients back, per micro-batch
    pp_bytes = 2 * m * t_mb * d * BF16 / tp if pp > 1 else 0.0
    pp_t = pp_bytes / (nic if gpus // pp >= node else nvlink)

    a2a_x, tp_x = a2a_t * (1 - a.a2a_overlap), tp_t * (1 - a.tp_overlap)
    dp_x = max(0.0, dp_t - a.dp_overlap * backward)
    step = (compute + tp_x + a2a_x + pp_t) * (m + pp - 1) / m + dp_x
    comms = Comms(
        a2a, a2a_t, a2a_x, a2a_links, tp_bytes, tp_t, tp_x, dp_bytes, dp_t, dp_x, dp_links, pp_bytes, pp_t
    )
    return Plan(
        model=cfg.name,
        gpus=gpus,
        layout=layout,
        sequences=seqs,
        batch_tokens=batch,
        seq_len=s,
        microbatches=m,
        bubble=(pp - 1) / (m + pp - 1),
        memory=memory,
        comms=comms,
        flops_per_token=flops,
        compute_seconds=compute,
        step_seconds=step,
        tokens_per_second=batch / step,
        effective_mfu=flops * batch / (step * gpus * a.peak_tflops * 1e12),
        days=a.train_tokens / (batch / step) / 86400,
        fits=total <= memory.budget,
        assumptions=a,
    )


def candidate_layouts(cfg: ModelConfig, gpus: int, a: Assumptions) -> list[Layout]:
    """Every layout of ``gpus`` the divisibility rules of :data:`METHOD` allow, both recompute modes."""
    s = a.seq_len or cfg.max_seq_len
    seqs = _sequences(a, s)
    experts = cfg.moe.num_experts if cfg.moe is not None and cfg.moe_layer_indices else 1
    out = []
    for tp in _divisors(min(a.gpus_per_node, gpus)):
        if gpus % tp or not _tp_ok(cfg, tp):
            continue
        for ep in _divisors(experts):
            for pp in _divisors(cfg.n_layers):
                if gpus % (tp * ep * pp):
                    continue
                dp = gpus // (tp * ep * pp)
                if seqs % (ep * dp * a.micro_batch):
                    continue
                out += [Layout(tp, ep, pp, dp, r) for r in ("selective", "full")]
    return out


def plan(cfg: ModelConfig, gpus: int, a: Assumptions | None = None, alternatives: int = 3) -> Plan:
    """The fastest layout of ``cfg`` on ``gpus`` GPUs that fits in memory, with the runners-up.

    Raises ValueError naming the reason when no layout exists or none fits.
    """
    a = a or Assumptions()
    if gpus < 1:
        raise ValueError(f"gpus must be at least 1 (got {gpus})")
    for name in ("mfu", "usable_fraction", "link_efficiency"):
        if not 0 < getattr(a, name) <= 1:
            raise ValueError(f"{name} must be in (0, 1] (got {getattr(a, name)})")
    layouts = candidate_layouts(cfg, gpus, a)
    if not layouts:
        s = a.seq_len or cfg.max_seq_len
        raise ValueError(
            f"no parallel layout of {cfg.name} on {gpus} GPUs: TP × EP × PP × DP must equal {gpus} with TP "
            f"dividing the heads and widths, EP the experts, PP n_layers={cfg.n_layers}, and EP·DP the "
            f"{_sequences(a, s)} sequences per step"
        )
    plans = [evaluate(cfg, lay, a) for lay in layouts]
    plans.sort(key=lambda q: (q.step_seconds, q.memory.total, q.layout.pp, q.layout.tp))
    fitting = [q for q in plans if q.fits]
    if not fitting:
        least = min(plans, key=lambda q: q.memory.total)
        raise ValueError(
            f"{cfg.name} does not fit on {gpus} GPU{'s' * (gpus > 1)}: the leanest layout, {least.layout}, "
            f"needs {least.memory.total / 1e9:.1f} GB per GPU (weights {least.memory.weights / 1e9:.1f}, "
            f"grads {least.memory.grads / 1e9:.1f}, optimizer {least.memory.optimizer / 1e9:.1f}, "
            f"activations {least.memory.activations / 1e9:.1f}), more than the usable "
            f"{least.memory.budget / 1e9:.1f} GB ({a.gpu_memory_gb:g} GB × {a.usable_fraction:g}); use more GPUs"
        )
    return replace(fitting[0], alternatives=fitting[1 : 1 + alternatives])
