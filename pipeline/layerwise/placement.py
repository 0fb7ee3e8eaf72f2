"""Where the layer engine keeps the calibration activations: on the compute device, or in
(pinned) host memory streamed to the device one chunk of windows at a time. No torch here:
the decision is arithmetic on sizes, unit-tested with the numbers of real models.

The engine holds, on the compute device, while it works on one decoder layer:

    A = S * T * d * b                   one activation set: S windows of T tokens, hidden size d,
                                        b bytes per stored value (4 float32, 2 bfloat16). The
                                        engine overwrites each chunk's inputs with its outputs
                                        (windows are independent), so one set is live, not two.
    L = the layer's parameters          float32 (the engine computes with float32 weights)
    H = h * n^2 * 4                     the widest Hessian (n = the largest in_features, the
                                        MLP width for down_proj) times the copies alive at once:
                                        the accumulated one (4, bounding the four groups', when
                                        every group's is collected in one pass: true_sequential
                                        false, or AWQ alone), plus 3 in a GPTQ solve (its Cholesky
                                        factor, cuSOLVER's clone of it and the inverse, alive
                                        together); h = 4 for true-sequential GPTQ
    W = 4 * out * n * 4                 working copies of the widest weight in the solve
    C = c * T * (6 * d + 3 * m) * 4     one chunk of c windows in flight, float32: its input,
                                        the attention's q/k/v/o and residual (SDPA attention,
                                        the transformers default, keeps no T x T scores), and the
                                        MLP's gate, up and product at width m
    X = method extras                   AWQ: the scaling groups' Gram matrices and the raw
                                        inputs of its search windows

    resident on the device   when  A + L + H + W + C + X <= free device memory - reserve
    streamed from the host   when  L + H + W + C + X + c * T * d * 4 <= free - reserve
                             and   A <= available host memory (pinned, so not swappable)

`reserve` (1 GiB + 5% of the free memory) covers the CUDA context's later growth, the caching
allocator's fragmentation and cuBLAS workspaces: the terms above are the tensors the engine
allocates, not everything the allocator will hold.

Llama-3-8B with the llama3 recipe's calibration (S=256, T=2048, d=4096, m=14336, c=8), GPTQ:
A = 256 * 2048 * 4096 * 4 bytes = 8 GiB in float32 (4 GiB in bfloat16); L = 0.81 GiB,
H = 4 * 14336^2 * 4 = 3.1 GiB, W = 0.88 GiB, C = 4.1 GiB: 16.9 GiB resident in float32.
An engine that kept two activation sets (a layer's inputs and its outputs) would need
24.9 GiB and not fit a 24 GB card (23.5 GiB free, 21.3 usable); with one set float32 fits,
with 4.5 GiB to spare (AWQ alone, 20.9 GiB, with 0.4). On a 16 GB card (15.5 GiB free, 13.7
usable) bfloat16 (12.9) is resident and float32 (16.9) streams from the host, needing 9.1 GiB
on the device; on a 12 GB card (11.5 free, 9.9 usable) both stream.
tests/pipeline/test_placement.py checks these numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from qlora_pipeline.errors import InputError

GiB = 1024**3
# A GPTQ solve's copies of its Hessian besides the accumulated one, alive at once on a GPU: the
# solve's own working copy (gathered in processing order, damped in place) is replaced by its
# Cholesky factor, and torch's cholesky_inverse on CUDA (cuSOLVER) clones its input next to the
# result (read in torch's source, not measured on a GPU), so the factor, its clone and the
# inverse are alive together: 3. On the CPU (LAPACK,
# in place) it is 2 (tests/quant/test_gptq.py counts them; scripts/rehearse.py's host figures).
GPTQ_SOLVE_COPIES = 3
Placement = Literal["device", "host"]


@dataclass(frozen=True)
class Workload:
    """The sizes that decide where the activations live (bytes and counts, no tensors).

    Attributes:
        windows, tokens, hidden: S, T, d of the calibration activations.
        storage_bytes: bytes per stored activation value (4 float32, 2 bfloat16).
        layer_bytes: one decoder layer's parameters as the engine holds them (float32).
        widest_in: the largest in_features of the layer's linears (the Hessian's side).
        widest_out: the out_features of that linear.
        intermediate: the MLP width m.
        chunk: windows per forward (c).
        hessian_copies: copies of the widest Hessian alive at once.
        extra_bytes: what the method adds (AWQ's Grams and search samples).
    """

    windows: int
    tokens: int
    hidden: int
    storage_bytes: int
    layer_bytes: int
    widest_in: int
    widest_out: int
    intermediate: int
    chunk: int = 8
    hessian_copies: int = 1 + GPTQ_SOLVE_COPIES
    extra_bytes: int = 0

    @property
    def activations(self) -> int:
        """A: one activation set as stored."""
        return self.windows * self.tokens * self.hidden * self.storage_bytes

    @property
    def hessians(self) -> int:
        return self.hessian_copies * self.widest_in**2 * 4

    @property
    def weights(self) -> int:
        return 4 * self.widest_out * self.widest_in * 4

    @property
    def chunk_work(self) -> int:
        c = min(self.chunk, self.windows)
        return c * self.tokens * (6 * self.hidden + 3 * self.intermediate) * 4

    @property
    def layer_work(self) -> int:
        """Everything on the device besides the activation set: L + H + W + C + X."""
        return self.layer_bytes + self.hessians + self.weights + self.chunk_work + self.extra_bytes

    @property
    def streaming_buffer(self) -> int:
        """The float32 chunk copied in from the host while streaming."""
        return min(self.chunk, self.windows) * self.tokens * self.hidden * 4


def host_available_bytes() -> Optional[int]:
    """MemAvailable of /proc/meminfo in bytes, None where unknown (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reserve(free_bytes: int) -> int:
    return GiB + free_bytes // 20


@dataclass(frozen=True)
class Plan:
    placement: Placement
    need_resident: int   # bytes on the device if resident
    need_streaming: int  # bytes on the device if streamed
    usable: int          # device bytes the plan may use (free - reserve)
    why: str


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def plan(w: Workload, free_device: int, available_host: Optional[int], storage: str = "auto",
         where: str = "the quantize entry") -> Plan:
    """Decide where the activations of `w` live on a device with `free_device` free bytes.

    `storage`: "auto" (device if it fits, else host), "device" or "host" (forced: no fit check,
    the user knows something the estimate does not). `available_host` None: unknown (not checked).

    Raises:
        InputError: `storage: auto` and the work fits neither way; the message gives the sizes
            and the settings that shrink them.
    """
    usable = max(0, free_device - reserve(free_device))
    resident, streaming = w.activations + w.layer_work, w.layer_work + w.streaming_buffer
    sizes = (f"activations {_gib(w.activations)} ({w.windows} x {w.tokens} x {w.hidden} x {w.storage_bytes} B), "
             f"layer work {_gib(w.layer_work)}, device usable {_gib(usable)} of {_gib(free_device)} free")

    def made(placement: Placement, why: str) -> Plan:
        return Plan(placement, resident, streaming, usable, f"{why}: {sizes}")

    if storage == "device":
        return made("device", "activations.storage: device")
    if storage == "host":
        return made("host", "activations.storage: host")
    if resident <= usable:
        return made("device", "fits on the device")
    host_ok = available_host is None or w.activations <= available_host
    if streaming <= usable and host_ok:
        return made("host", "too large for the device, streamed from pinned host memory")
    problems = []
    if streaming > usable:
        problems.append(f"even streamed from the host one layer's work needs {_gib(streaming)} on the device")
    if not host_ok:
        problems.append(f"host memory has {_gib(available_host)} available for the {_gib(w.activations)} of activations")
    hint = ("lower calibration.samples or calibration.seq_len"
            + (", set activations.dtype: bfloat16" if w.storage_bytes > 2 else "")
            + ", or set device: cpu")
    raise InputError(f"{where}: the calibration activations fit neither on the device nor in host memory "
                     f"({'; '.join(problems)}; {sizes}); {hint}")


def workload_for(config: dict, windows: int, tokens: int, storage_bytes: int, chunk: int = 8,
                 hessians: int = 1, solve: bool = True, awq_search_windows: Optional[int] = None) -> Workload:
    """The `Workload` of a decoder model from its config.json (a Llama-like layout: attention
    q/k/v/o, gated MLP). `hessians`: accumulated Hessians alive at once (1 true-sequential, 4
    when every group's is collected in one pass, 0 for a search alone); `solve`: the quantizer
    solves with them (GPTQ: 3 more copies of the widest); `awq_search_windows`: the method runs
    AWQ's search (four Grams, and its sample windows with their reference outputs)."""
    d, m = int(config["hidden_size"]), int(config["intermediate_size"])
    heads = int(config.get("num_attention_heads", 1))
    head_dim = int(config.get("head_dim") or d // heads)
    kv = int(config.get("num_key_value_heads", heads)) * head_dim
    q = heads * head_dim
    params = d * q + 2 * d * kv + q * d + 3 * d * m + 2 * d
    widest_in = max(d, m, q)
    extra = 0
    if awq_search_windows is not None:
        extra = 4 * widest_in**2 * 4 + 2 * 2 * min(awq_search_windows, windows) * tokens * d * 4
    return Workload(windows, tokens, d, storage_bytes, params * 4, widest_in, d if widest_in == m else max(m, q),
                    m, chunk, hessians + (GPTQ_SOLVE_COPIES if solve else 0), extra)
