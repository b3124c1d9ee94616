"""The interleaved 1F1B schedule (``--num-layers-per-virtual-pipeline-stage``).

Each of the ``P`` stages holds ``V`` model chunks; chunk ``c`` of stage ``s`` is virtual stage
``c * P + s``, so activations go round the ring of stages ``V`` times (the last stage's chunk
``c`` feeds the first stage's chunk ``c + 1``). Every stage runs its forwards and backwards in
Megatron's interleaved order (``stage_order``): micro-batches go through the chunks in groups
of ``P``, warmup is ``2 (P - s - 1) + (V - 1) P`` forwards (every forward first when ``M = P``),
then one forward / one backward, then the remaining backwards. Megatron requires ``M``
divisible by ``P``; so does this.

Communication is planned, not negotiated: ``plan`` simulates the schedule in lockstep steps
(one operation per stage and step, as soon as its input has arrived), and at step ``t`` every
stage posts one ``batch_isend_irecv`` with exactly the sends of its step-``t`` result and the
receives of its neighbours' step-``t`` results. Each batch is therefore matched by the
neighbours' batches of the same step, and a step's work depends only on earlier steps, so no
order can deadlock, on gloo or NCCL. A stage receives at most one tensor per neighbour and step
(a neighbour runs one operation per step), so with ``P = 2`` (where the previous and the next
stage are the same rank) the messages between the two can never be confused. As in the 1F1B
schedule (``Transfers``), a received tensor is awaited only when its operation runs, often
steps after it was posted, and sends are left in flight; the batches and their order are
those of the synchronous path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from megatron.core.comm import WaitClock
from megatron.core.dropout import begin_micro_batch
from megatron.core.micro_batches import MicroBatch
from megatron.core.parallel_state import Topology
from megatron.core.pipeline_parallel import StageRunner, Transfer, Transfers

FORWARD, BACKWARD = "forward", "backward"


@dataclass(frozen=True)
class Op:
    kind: str  # FORWARD | BACKWARD
    chunk: int
    micro: int


def check_interleaving(num_micro: int, pp: int) -> None:
    if num_micro % pp:
        raise ValueError(f"the interleaved pipeline schedule needs the number of micro-batches per step "
                         f"(global batch / (micro batch x data-parallel size) = {num_micro}) to be divisible by "
                         f"--pipeline-model-parallel-size {pp}, as Megatron does; change --global-batch-size or "
                         f"--micro-batch-size, or drop --num-layers-per-virtual-pipeline-stage")


def stage_order(stage: int, pp: int, chunks: int, num_micro: int, backward: bool = True) -> list[Op]:
    """Megatron's interleaved order of one stage's operations."""
    total = num_micro * chunks

    def op(kind: str, k: int) -> Op:
        chunk = (k % (pp * chunks)) // pp
        micro = (k // (pp * chunks)) * pp + k % pp
        return Op(kind, chunk if kind == FORWARD else chunks - 1 - chunk, micro)

    if not backward:
        return [op(FORWARD, k) for k in range(total)]
    warmup = total if num_micro == pp else min(2 * (pp - stage - 1) + (chunks - 1) * pp, total)
    order = [op(FORWARD, k) for k in range(warmup)]
    for k in range(total - warmup):
        order += [op(FORWARD, warmup + k), op(BACKWARD, k)]
    return order + [op(BACKWARD, k) for k in range(total - warmup, total)]


def plan(pp: int, chunks: int, num_micro: int, backward: bool = True) -> list[list[Op | None]]:
    """Per stage, the operation of every lockstep step (None: idle). An operation runs at the
    first step after the one that produced its input (the previous virtual stage's forward, or
    the next virtual stage's backward)."""
    orders = [stage_order(s, pp, chunks, num_micro, backward) for s in range(pp)]
    last_virtual = pp * chunks - 1
    done: dict[tuple[str, int, int], int] = {}
    position, steps = [0] * pp, [[] for _ in range(pp)]
    t = 0
    while any(position[s] < len(orders[s]) for s in range(pp)):
        ran = False
        for s in range(pp):
            op = orders[s][position[s]] if position[s] < len(orders[s]) else None
            if op is not None:
                virtual = op.chunk * pp + s
                if op.kind == FORWARD:
                    needs = (FORWARD, virtual - 1, op.micro) if virtual > 0 else None
                else:
                    needs = (BACKWARD, virtual + 1, op.micro) if virtual < last_virtual else None
                if needs is not None and done.get(needs, t) >= t:
                    op = None
            steps[s].append(op)
            if op is not None:
                done[(op.kind, virtual, op.micro)] = t
                position[s] += 1
                ran = True
        if not ran:
            raise RuntimeError(f"interleaved pipeline plan stalled at step {t} (P={pp}, V={chunks}, M={num_micro})")
        t += 1
    return steps


class RingLinks:
    """This stage's neighbours on the ring of pipeline stages (the last feeds the first)."""

    def __init__(self, topo: Topology, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 asynchronous: bool = True, clock: WaitClock | None = None) -> None:
        self.shape, self.dtype, self.device = shape, dtype, device
        s, ranks = topo.pp_rank, topo.pp_ranks
        self.prev, self.next = ranks[(s - 1) % topo.pp], ranks[(s + 1) % topo.pp]
        self.transfers = Transfers(topo.pp_group, device, asynchronous, clock)

    def post(self, send: tuple[torch.Tensor, int] | None, recv_prev: bool, recv_next: bool) -> Transfer:
        """One batch: receives first (from the previous, then the next stage), then the send,
        ``(tensor, peer rank)``; its ``wait`` gives (from the previous, from the next stage)."""
        def buffer(wanted: bool) -> torch.Tensor | None:
            return torch.empty(self.shape, dtype=self.dtype, device=self.device) if wanted else None

        return self.transfers.post([send] if send is not None else [],
                                   [(buffer(recv_prev), self.prev), (buffer(recv_next), self.next)])


def forward_backward_interleaved(model: nn.Module, batches: list[MicroBatch], topo: Topology, loss_scale: float,
                                 denom: int, device: torch.device, backward: bool = True,
                                 asynchronous: bool = True, clock: WaitClock | None = None) -> torch.Tensor:
    """Run this stage's chunks over every micro-batch in the interleaved order; returns the
    local loss sum as ``forward_backward_pipelined`` does (so do ``asynchronous`` and ``clock``)."""
    local_loss = torch.zeros(1, device=device)
    if not batches:
        return local_loss
    pp, chunks = topo.pp, len(model.chunks)
    check_interleaving(len(batches), pp)
    micro, seq = batches[0].tokens.shape
    links = RingLinks(topo, model.stage_output_shape(micro, seq), next(model.parameters()).dtype, device,
                      asynchronous, clock)
    runner = StageRunner(model, topo, batches, loss_scale, denom, local_loss)
    steps = plan(pp, chunks, len(batches), backward)
    me, before, after = topo.pp_rank, (topo.pp_rank - 1) % pp, (topo.pp_rank + 1) % pp
    # (chunk, micro-batch) -> the transfer bringing its input / output gradient, and which slot
    inputs: dict[tuple[int, int], tuple[Transfer, int]] = {}
    grads: dict[tuple[int, int], tuple[Transfer, int]] = {}
    in_flight: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}

    def arrived(pending: dict[tuple[int, int], tuple[Transfer, int]], key: tuple[int, int]) -> torch.Tensor | None:
        if key not in pending:
            return None
        transfer, slot = pending.pop(key)
        return links.transfers.wait(transfer)[slot]

    for t in range(len(steps[me])):
        send = None
        op = steps[me][t]
        if op is not None and op.kind == FORWARD:
            x, out = runner.forward(op.micro, arrived(inputs, (op.chunk, op.micro)), backward, op.chunk)
            if backward:
                in_flight[(op.chunk, op.micro)] = (x, out)
            if not runner.is_last(op.chunk):
                send = (out, links.next)
        elif op is not None:
            begin_micro_batch(model, batches[op.micro].first_sample)  # a recompute replays its dropout masks
            input_grad = runner.backward(*in_flight.pop((op.chunk, op.micro)),
                                         arrived(grads, (op.chunk, op.micro)), op.chunk)
            if not runner.is_first(op.chunk):
                send = (input_grad, links.prev)
        from_prev = _incoming(steps[before][t], before, pp, chunks, FORWARD)
        from_next = _incoming(steps[after][t], after, pp, chunks, BACKWARD)
        transfer = links.post(send, from_prev is not None, from_next is not None)
        if from_prev is not None:
            inputs[from_prev] = (transfer, 0)
        if from_next is not None:
            grads[from_next] = (transfer, 1)
    links.transfers.finish()
    return local_loss


def _incoming(op: Op | None, stage: int, pp: int, chunks: int, kind: str) -> tuple[int, int] | None:
    """(my chunk, micro-batch) of what neighbour ``stage``'s step ``op`` sends me, if it sends
    me anything of ``kind``: a forward's output to the next virtual stage, or a backward's
    input gradient to the previous one."""
    if op is None or op.kind != kind:
        return None
    virtual = op.chunk * pp + stage
    target = virtual + 1 if kind == FORWARD else virtual - 1
    if not 0 <= target < pp * chunks:
        return None
    return target // pp, op.micro
