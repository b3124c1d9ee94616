"""Pipeline parallelism: the 1F1B (one forward, one backward) schedule over micro-batches.

Stage ``s`` of ``P`` runs ``min(P - s - 1, M)`` warmup forwards, then alternates one
forward and one backward, then drains the remaining backwards. A stage therefore holds
the activations of at most ``P - s`` micro-batches at once, whatever the number of
micro-batches ``M``: peak activation memory grows with P, not with M.

Activations and their gradients move between neighbouring stages with point-to-point
``torch.distributed.batch_isend_irecv`` over the pipeline group (gloo or NCCL). Their
shape, ``[micro, seq, hidden]`` in the model's dtype (``seq / TP`` under sequence
parallelism), is known in advance, so no shapes are exchanged. The sends and receives of one
step are posted as one batch, so neighbours that both send and receive in the same step cannot
deadlock even when a send only completes once its receive has been posted. The schedule is
asynchronous as Megatron's: a batch's receives are awaited only when the received tensor is
about to be used and its sends only when at most ``Transfers.MAX_SENDING`` newer batches are
out (or the schedule ends), so the computation never waits for a send to land. Waiting later
changes no batch and no posting order: every rank's point-to-point traffic stays exactly as
matched as in the synchronous path (``asynchronous=False``: every batch awaited at once),
which gives the same bits.
"""
from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist
from torch import nn

from megatron.core.comm import WaitClock
from megatron.core.parallel_state import Topology
from megatron.core.dropout import begin_micro_batch
from megatron.core.micro_batches import MicroBatch, micro_batch_loss


class Transfer:
    """One posted ``batch_isend_irecv``: its receive and send requests (the same coalesced
    request for both on NCCL) and the tensors its receives fill."""

    def __init__(self, ops: list[dist.P2POp], num_recvs: int, received: tuple[torch.Tensor | None, ...]) -> None:
        requests = dist.batch_isend_irecv(ops) if ops else []
        split = len(requests) == len(ops)  # one request per operation (gloo), else one for the batch
        self.recv_requests = requests[:num_recvs] if split else requests
        self.send_requests = requests[num_recvs:] if split else requests
        self.received, self.sends = received, len(ops) > num_recvs
        self.sent = [op.tensor for op in ops[num_recvs:]]  # alive until their sends are done

    def wait_received(self, clock: WaitClock | None, device: torch.device) -> tuple[torch.Tensor | None, ...]:
        self.recv_requests = _wait(self.recv_requests, clock, device)
        return self.received

    def wait_sent(self, clock: WaitClock | None, device: torch.device) -> None:
        self.send_requests = _wait(self.send_requests, clock, device)
        self.sent = []


def _wait(requests: list, clock: WaitClock | None, device: torch.device) -> list:
    """Wait for ``requests`` (counted on ``clock``); returns what is left to wait for: nothing."""
    if requests:
        if clock is None:
            for request in requests:
                request.wait()
        else:
            with clock.blocked(device):
                for request in requests:
                    request.wait()
    return []


class Transfers:
    """Posts batches of point-to-point operations over one group and keeps their sends until
    they must be awaited; shared by the 1F1B and the interleaved schedule."""

    MAX_SENDING = 2  # batches with sends left unawaited: bounds the tensors kept alive for them

    def __init__(self, group, device: torch.device, asynchronous: bool, clock: WaitClock | None) -> None:
        self.group, self.device, self.asynchronous, self.clock = group, device, asynchronous, clock
        self.sending: deque[Transfer] = deque()

    def post(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor | None, int]]) -> Transfer:
        """Post the receives (``None`` tensors skipped) then the sends, ``(tensor, peer)``, as one
        batch; synchronously, wait for all of it before returning."""
        ops = [dist.P2POp(dist.irecv, t, peer, self.group) for t, peer in recvs if t is not None]
        num_recvs = len(ops)
        ops += [dist.P2POp(dist.isend, t.detach().contiguous(), peer, self.group) for t, peer in sends]
        transfer = Transfer(ops, num_recvs, tuple(t for t, _ in recvs))
        if not self.asynchronous:
            transfer.wait_received(self.clock, self.device)
            transfer.wait_sent(self.clock, self.device)
        elif transfer.sends:
            self.sending.append(transfer)
            while len(self.sending) > self.MAX_SENDING:
                self.sending.popleft().wait_sent(self.clock, self.device)
        return transfer

    def wait(self, transfer: Transfer) -> tuple[torch.Tensor | None, ...]:
        """The tensors ``transfer`` receives, once they have arrived."""
        return transfer.wait_received(self.clock, self.device)

    def finish(self) -> None:
        """Wait for every send still out: call once at the end of a schedule."""
        while self.sending:
            self.sending.popleft().wait_sent(self.clock, self.device)


class StageLinks:
    """Point-to-point traffic of this rank with its neighbouring pipeline stages."""

    def __init__(self, topo: Topology, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 asynchronous: bool = True, clock: WaitClock | None = None) -> None:
        self.shape, self.dtype, self.device = shape, dtype, device
        s = topo.pp_rank
        self.prev = topo.pp_ranks[s - 1] if s > 0 else None
        self.next = topo.pp_ranks[s + 1] if s < topo.pp - 1 else None
        self.transfers = Transfers(topo.pp_group, device, asynchronous, clock)

    def post(self, send_next: torch.Tensor | None = None, send_prev: torch.Tensor | None = None,
             recv_prev: bool = False, recv_next: bool = False) -> Transfer:
        """Post every requested send and receive as one ``batch_isend_irecv``; ``wait`` on the
        result gives (tensor from the previous stage, tensor from the next stage). Requests
        towards a neighbour that does not exist (before the first, after the last stage) are
        no-ops. Every call here is matched by the neighbour's call with the mirrored requests
        (see ``_one_f_one_b``), and NCCL runs one batch as a group, so no order of the pair's
        operations can deadlock."""
        def buffer(wanted: bool, peer: int | None) -> torch.Tensor | None:
            return torch.empty(self.shape, dtype=self.dtype, device=self.device) if wanted and peer is not None else None

        recvs = [(buffer(recv_prev, self.prev), self.prev), (buffer(recv_next, self.next), self.next)]
        sends = [(t, peer) for t, peer in ((send_next, self.next), (send_prev, self.prev))
                 if t is not None and peer is not None]
        return self.transfers.post(sends, recvs)

    def wait(self, transfer: Transfer) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.transfers.wait(transfer)

    def exchange(self, **requests) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``post`` and wait for the receives at once."""
        return self.wait(self.post(**requests))


class StageRunner:
    """Forward and backward of one micro-batch on one model chunk of this stage (the only one
    without interleaving); the last virtual stage adds the loss."""

    def __init__(self, model: nn.Module, topo: Topology, batches: list[MicroBatch], loss_scale: float, denom: int,
                 local_loss: torch.Tensor) -> None:
        self.model, self.topo, self.batches = model, topo, batches
        self.loss_scale, self.denom, self.local_loss = loss_scale, denom, local_loss
        self.num_chunks = len(getattr(model, "chunks", [None]))

    def is_first(self, chunk: int) -> bool:
        return self.topo.is_first_stage and chunk == 0

    def is_last(self, chunk: int) -> bool:
        return self.topo.is_last_stage and chunk == self.num_chunks - 1

    def forward(self, m: int, received: torch.Tensor | None, grad: bool,
                chunk: int = 0) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Returns (this chunk's input if it needs a gradient, the output: hidden states, or the
        micro-batch's loss share on the last virtual stage)."""
        batch = self.batches[m]
        begin_micro_batch(self.model, batch.first_sample)
        x = batch.tokens
        if not self.is_first(chunk):
            x = received.requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            if self.is_last(chunk):
                out = micro_batch_loss(self.model, batch, x, self.denom, chunk)
                self.local_loss += out.detach()
            else:
                out = self.model(x, None, batch.documents, chunk)
        return (x if grad and not self.is_first(chunk) else None), out

    def backward(self, x: torch.Tensor | None, out: torch.Tensor, out_grad: torch.Tensor | None,
                 chunk: int = 0) -> torch.Tensor | None:
        """Backpropagate one micro-batch; returns the gradient to send to the previous stage."""
        if self.is_last(chunk):
            (out * self.loss_scale).backward()
        else:
            torch.autograd.backward(out, grad_tensors=out_grad)
        return None if x is None else x.grad


def num_warmup_forwards(topo: Topology, num_micro: int, all_forward_first: bool = False) -> int:
    """Forwards before the first backward: P - s - 1 in 1F1B (capped by M); M when all
    forwards run first (the GPipe order, kept for memory comparisons)."""
    if all_forward_first:
        return num_micro
    return min(topo.pp - topo.pp_rank - 1, num_micro)


def forward_backward_pipelined(model: nn.Module, batches: list[MicroBatch], topo: Topology, loss_scale: float,
                               denom: int, device: torch.device, backward: bool = True,
                               all_forward_first: bool = False, asynchronous: bool = True,
                               clock: WaitClock | None = None) -> torch.Tensor:
    """Run this stage's part of every micro-batch in the 1F1B order.

    Returns this rank's local loss sum: the sum over micro-batches of token-loss-sum /
    ``denom`` on the last stage, zero elsewhere (the caller all-reduces over the world).
    With ``backward=False`` only forwards run (evaluation). ``all_forward_first`` runs the
    GPipe order instead (every forward, then every backward) for comparison.
    ``asynchronous=False`` awaits every batch at once (the reference path of the tests);
    ``clock`` adds the time spent waiting for point-to-point traffic.
    """
    local_loss = torch.zeros(1, device=device)
    if not batches:
        return local_loss
    dtype = next(model.parameters()).dtype
    micro, seq = batches[0][0].shape
    links = StageLinks(topo, model.stage_output_shape(micro, seq), dtype, device, asynchronous, clock)
    runner = StageRunner(model, topo, batches, loss_scale, denom, local_loss)
    if not backward:
        for m in range(len(batches)):
            received, _ = links.exchange(recv_prev=True)
            _, out = runner.forward(m, received, grad=False)
            links.post(send_next=out)
    else:
        _one_f_one_b(runner, links, len(batches), num_warmup_forwards(topo, len(batches), all_forward_first))
    links.transfers.finish()
    return local_loss


def _one_f_one_b(runner: StageRunner, links: StageLinks, num_micro: int, warmup: int) -> None:
    """Warmup forwards, steady one-forward-one-backward, cooldown backwards. ``in_flight`` holds
    (input, output) of the micro-batches whose backward has not run yet: never more than
    ``warmup + 1`` of them. (The last stage's "output" is its loss; sends past it are no-ops.)
    Sends are posted and left in flight; receives are awaited right before their use."""
    in_flight: deque[tuple[torch.Tensor | None, torch.Tensor]] = deque()
    for m in range(warmup):
        received, _ = links.exchange(recv_prev=True)
        x, out = runner.forward(m, received, grad=True)
        in_flight.append((x, out))
        links.post(send_next=out)
    steady = num_micro - warmup
    next_input = links.post(recv_prev=True) if steady else None
    for i in range(steady):
        x, out = runner.forward(warmup + i, links.wait(next_input)[0], grad=True)
        in_flight.append((x, out))
        _, out_grad = links.exchange(send_next=out, recv_next=True)
        input_grad = runner.backward(*in_flight.popleft(), out_grad)
        next_input = links.post(send_prev=input_grad, recv_prev=i < steady - 1)
    for _ in range(warmup):
        _, out_grad = links.exchange(recv_next=True)
        input_grad = runner.backward(*in_flight.popleft(), out_grad)
        links.post(send_prev=input_grad)
